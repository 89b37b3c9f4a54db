//! Random backend kills: clients keep requests in flight while a killer
//! stops instances and starts them again on their ports. Every request
//! sent must get exactly one answer, the right one: OK with its own body,
//! BACKEND_UNAVAILABLE, or TIMEOUT for a request the backend never
//! answered (the demo backend logs what it wrote toward the gateway, so a
//! TIMEOUT for an answered request is an answer the gateway lost).

mod common;

use slg_gateway::client::{Client, ClientError};
use slg_gateway::config::Balance;
use slg_gateway::demo::{Answered, DemoBackend};
use slg_gateway::protocol::{Code, Frame, Kind};
use slg_loadtest::check::{self, StreamCheck};
use slg_loadtest::fault::{Fault, FaultRelay, Plan};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The fixed seed CI always runs.
const KILL_SEED: u64 = 0xBADC0DE;
/// The gateway's request timeout in these runs (the slowest request asks
/// the backend for 60 ms).
const REQUEST_TIMEOUT: Duration = Duration::from_millis(800);
/// How long a client waits for an answer the gateway owes it (by its
/// request timeout, it owes one to every request; the rest is slack for a
/// loaded machine).
const ANSWER_WAIT: Duration = Duration::from_secs(3);
/// How long a client keeps trying to log in while instances come and go.
const LOGIN_FOR: Duration = Duration::from_secs(5);
/// How long a client waits for the seq missing from a gap: the gateway
/// never sends out of order, so a gap that does not fill at once is a loss.
const GAP_WAIT: Duration = Duration::from_millis(300);
/// How long a client listens for a stray answer at the end.
const STRAY_WAIT: Duration = Duration::from_millis(300);

/// KILL_SEED from the environment (decimal, or hex with 0x).
fn env_seed() -> Option<u64> {
    let s = std::env::var("KILL_SEED").ok()?;
    let t = s.trim();
    let seed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    };
    Some(seed.unwrap_or_else(|| panic!("KILL_SEED={s:?} is not a number")))
}

/// A new seed for each run (the time, should the OS have no randomness).
fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return shards::splitmix64(t.as_nanos() as u64);
    }
    u64::from_le_bytes(b)
}

/// What a random-kills run saw, over every client.
#[derive(Debug, Default)]
struct Totals {
    kills: usize,
    requests: usize,
    ok: usize,
    unavailable: usize,
    /// TIMEOUTs (each for a request the backend never answered, or
    /// answered only after the gateway's deadline).
    timeouts: usize,
    /// TIMEOUTs for requests the backend answered after the gateway's
    /// deadline had passed (a stalled backend: TIMEOUT is right).
    late_answers: usize,
    /// BACKEND_UNAVAILABLE for a request the backend did answer (the
    /// instance wrote it, then died before the gateway read it or while
    /// the gateway was failing the connection): allowed, counted.
    unavailable_but_answered: usize,
    /// Answers the backend instances wrote, all instances together.
    backend_answers: usize,
}

/// A run's verdict, and what the relay planted (with a fault).
struct Outcome {
    result: Result<Totals, String>,
    fired: Option<String>,
}

/// A request sent: its body, and when.
type Sent = (Vec<u8>, Instant);

/// One client's record: how every request it sent ended.
#[derive(Default)]
struct Tally {
    sent: usize,
    ok: usize,
    /// The requests answered TIMEOUT, and BACKEND_UNAVAILABLE.
    timeouts: Vec<Sent>,
    unavailable: Vec<Sent>,
}

/// One client of the run: logs in as `player` through `target`, then
/// keeps 1..=4 requests in flight (msg 200, some delayed), each with a
/// body naming it, checking every frame: the player's seqs in order
/// (StreamCheck's phrases), each answer for a request outstanding
/// (else "repeated"), with its own body (else "misdelivered").
struct KillClient {
    c: Client,
    player: u64,
    check: StreamCheck,
    /// Sent and not yet answered, by req_id.
    outstanding: HashMap<u32, Sent>,
    /// req_ids already answered.
    answered: HashSet<u32>,
    /// Highest seq received (above `check.last()`: a gap is open).
    highest: u64,
    tally: Tally,
}

impl KillClient {
    fn log_in(target: SocketAddr, player: u64) -> Result<KillClient, String> {
        let mut c = Client::connect(target).map_err(|e| format!("connect: {e}"))?;
        // The stream is checked here, with the frames in hand.
        c.check_seqs = false;
        c.timeout = ANSWER_WAIT;
        // A login may meet an instance being killed: try again.
        let (mut tries, until) = (1, Instant::now() + LOGIN_FOR);
        let li = loop {
            match c.login_demo(player) {
                Ok(li) => break li,
                Err(ClientError::LoginRejected(_)) if Instant::now() < until => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(ClientError::Timeout(t)) => {
                    return Err(format!(
                        "no answer to the login within {t:?}: the login answer was {}",
                        check::LOST
                    ))
                }
                Err(e) => return Err(format!("login (try {tries}): {e}")),
            }
        };
        let mut check = StreamCheck::new();
        check.logged_in(li.resume_point, li.gap, false)?;
        check.frame(&li.response)?;
        Ok(KillClient {
            c,
            player,
            check,
            outstanding: HashMap::new(),
            answered: HashSet::new(),
            highest: li.response.header.seq,
            tally: Tally::default(),
        })
    }

    fn send(&mut self, delay_ms: u32) -> Result<(), String> {
        let r = self.c.next_req_id();
        let body = format!("{delay_ms}:p{}r{r}", self.player).into_bytes();
        let sent = self
            .c
            .send_request(200, &body)
            .map_err(|e| format!("send: {e}"))?;
        assert_eq!(sent, r);
        self.outstanding.insert(r, (body, Instant::now()));
        self.tally.sent += 1;
        Ok(())
    }

    /// Wait for every request outstanding to be answered.
    fn drain(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + ANSWER_WAIT;
        while !self.outstanding.is_empty() {
            let gap_open = self.highest > self.check.last();
            let left = deadline.saturating_duration_since(Instant::now());
            self.c.timeout = if gap_open { GAP_WAIT } else { left }.max(Duration::from_millis(1));
            match self.c.recv() {
                Ok(f) => self.frame(f)?,
                Err(ClientError::Timeout(_)) if gap_open => {
                    return Err(self.check.end_connection().err().unwrap_or_else(|| {
                        format!(
                            "a seq gap below {} never filled ({})",
                            self.highest,
                            check::LOST
                        )
                    }))
                }
                Err(ClientError::Timeout(_)) if Instant::now() >= deadline => {
                    let mut left: Vec<String> = self
                        .outstanding
                        .iter()
                        .map(|(r, (b, _))| format!("req {r} ({})", String::from_utf8_lossy(b)))
                        .collect();
                    left.sort();
                    return Err(format!(
                        "no answer within {ANSWER_WAIT:?} to {}: {} (the gateway owes one by its request timeout)",
                        left.join(", "),
                        check::LOST
                    ));
                }
                Err(ClientError::Timeout(_)) => {}
                Err(e) => return Err(format!("while answers were due: {e}")),
            }
        }
        Ok(())
    }

    /// One frame from the gateway.
    fn frame(&mut self, f: Frame) -> Result<(), String> {
        let h = f.header;
        if h.kind != Kind::Response {
            return Err(format!("unexpected {:?} frame (seq {})", h.kind, h.seq));
        }
        self.highest = self.highest.max(h.seq);
        self.check.frame(&f)?;
        let r = h.req_id;
        let Some(sent) = self.outstanding.remove(&r) else {
            return Err(if self.answered.contains(&r) {
                format!(
                    "req {r} answered twice: a {} answer (seq {})",
                    check::REPEATED,
                    h.seq
                )
            } else {
                format!(
                    "an answer to req {r}, never sent ({} or stray; seq {})",
                    check::REPEATED,
                    h.seq
                )
            });
        };
        self.answered.insert(r);
        let code = h.code;
        if code == 0 {
            let body = &sent.0;
            if h.msg_id != 200 || f.body[..] != body[..] {
                return Err(format!(
                    "req {r}: {} answer: msg {} body {:?}, its own is {:?}",
                    check::MISDELIVERED,
                    h.msg_id,
                    String::from_utf8_lossy(&f.body),
                    String::from_utf8_lossy(body)
                ));
            }
            self.tally.ok += 1;
        } else if code == u16::from(Code::BackendUnavailable) {
            self.tally.unavailable.push(sent);
        } else if code == u16::from(Code::Timeout) {
            self.tally.timeouts.push(sent);
        } else {
            return Err(format!("req {r}: unexpected code {code:#x}"));
        }
        Ok(())
    }

    /// Nothing more may arrive: no request got a second answer.
    fn no_strays(&mut self) -> Result<(), String> {
        self.c.timeout = STRAY_WAIT;
        match self.c.recv() {
            Err(ClientError::Timeout(_)) => {}
            Ok(f) => {
                self.frame(f)?;
                return Err("a frame after the last answer".into());
            }
            Err(e) => return Err(format!("after the last answer: {e}")),
        }
        self.check.end_connection()
    }
}

/// One client's whole run.
fn kill_client(
    target: SocketAddr,
    player: u64,
    seed: u64,
    stop: &AtomicBool,
) -> Result<Tally, String> {
    let mut k = KillClient::log_in(target, player)?;
    let mut x = shards::splitmix64(seed ^ player);
    while !stop.load(Ordering::Acquire) {
        // A few requests in flight at once, some slow.
        x = shards::splitmix64(x);
        let n = 1 + (x % 4) as usize;
        for i in 0..n {
            let delay = if (x >> (8 * i + 8)).is_multiple_of(3) {
                60
            } else {
                0
            };
            k.send(delay)?;
        }
        k.drain()?;
    }
    k.no_strays()?;
    Ok(k.tally)
}

/// What a client thread's panic said.
fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

/// The run: 3 instances, 8 clients, `kill_for` of random kills (through a
/// relay planting `fault`, when given). Its failure is the Err.
fn random_kills(seed: u64, kill_for: Duration, fault: Option<Fault>) -> Outcome {
    let (log_tx, log_rx) = flume::unbounded::<Answered>();
    let ds: Vec<DemoBackend> = (0..3)
        .map(|_| common::start_logged("127.0.0.1:0".parse().expect("addr"), &log_tx))
        .collect();
    let addrs: Vec<SocketAddr> = ds.iter().map(|d| d.addr).collect();
    let gw = common::balanced_gateway(&addrs, Balance::RoundRobin, |c| {
        c.backend.request_timeout = REQUEST_TIMEOUT
    });
    let relay =
        fault.map(|f| FaultRelay::start(gw.client_addr, Plan::seeded(f, seed)).expect("relay"));
    let target = relay.as_ref().map_or(gw.client_addr, |r| r.addr);
    common::settle_backends();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8u64)
        .map(|i| {
            let stop = stop.clone();
            std::thread::spawn(move || kill_client(target, 100 + i, seed, &stop))
        })
        .collect();
    // Through a relay, the kills start once the fault is planted: two
    // answers traded by req_id are then answers with bodies of their own,
    // not two identical errors (which no client could tell apart).
    if let Some(r) = &relay {
        let until = Instant::now() + Duration::from_secs(1);
        while r.fired().is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // The killer: stop a random instance, restart it on its port, repeat.
    let mut running: Vec<Option<DemoBackend>> = ds.into_iter().map(Some).collect();
    let mut x = seed;
    let mut kills = 0;
    let until = Instant::now() + kill_for;
    while Instant::now() < until {
        x = shards::splitmix64(x);
        let i = (x % 3) as usize;
        match running[i].take() {
            Some(d) => {
                d.stop();
                kills += 1;
            }
            None => running[i] = Some(common::start_logged(addrs[i], &log_tx)),
        }
        std::thread::sleep(Duration::from_millis(40 + (x >> 32) % 120));
    }
    for (i, slot) in running.iter_mut().enumerate() {
        if slot.is_none() {
            *slot = Some(common::start_logged(addrs[i], &log_tx));
        }
    }
    stop.store(true, Ordering::Release);
    let mut errors = Vec::new();
    let mut tallies = Vec::new();
    for (i, t) in clients.into_iter().enumerate() {
        match t.join() {
            Ok(Ok(t)) => tallies.push(t),
            Ok(Err(e)) => errors.push(format!("player {}: {e}", 100 + i)),
            Err(p) => errors.push(format!("player {} panicked: {}", 100 + i, panic_text(p))),
        }
    }
    let fired = relay.as_ref().and_then(FaultRelay::fired);
    if let Some(r) = relay {
        r.stop();
    }
    gw.stop();
    running.into_iter().flatten().for_each(DemoBackend::stop);
    drop(log_tx);
    // Every instance has stopped: the log holds every answer written.
    let written: Vec<Answered> = log_rx.try_iter().collect();
    // Request bodies are unique: body -> when the backend wrote its answer.
    let answered: HashMap<&[u8], Instant> = written
        .iter()
        .filter(|a| a.msg_id == 200 && a.code == 0)
        .map(|a| (&a.body[..], a.at))
        .collect();
    let mut t = Totals {
        kills,
        backend_answers: written.len(),
        ..Totals::default()
    };
    for tally in &tallies {
        t.requests += tally.sent;
        t.ok += tally.ok;
        t.unavailable += tally.unavailable.len();
        t.timeouts += tally.timeouts.len();
        let accounted = tally.ok + tally.unavailable.len() + tally.timeouts.len();
        if accounted != tally.sent {
            errors.push(format!(
                "{} requests sent, {accounted} answered",
                tally.sent
            ));
        }
        for (b, sent_at) in &tally.timeouts {
            let Some(&at) = answered.get(&b[..]) else {
                continue;
            };
            // The gateway's deadline is REQUEST_TIMEOUT after it got the
            // request, so after `sent_at + REQUEST_TIMEOUT`: an answer
            // written before that reached it in time.
            if at < *sent_at + REQUEST_TIMEOUT {
                errors.push(format!(
                    "{:?} answered TIMEOUT although the backend answered it {:?} after it was sent: an answer {}",
                    String::from_utf8_lossy(b),
                    at.duration_since(*sent_at),
                    check::LOST
                ));
            } else {
                t.late_answers += 1;
            }
        }
        t.unavailable_but_answered += tally
            .unavailable
            .iter()
            .filter(|(b, _)| answered.contains_key(&b[..]))
            .count();
    }
    Outcome {
        result: if errors.is_empty() {
            Ok(t)
        } else {
            Err(errors.join("; "))
        },
        fired,
    }
}

/// A run that must pass: enough kills and answers, every one accounted for.
fn kills_pass(seed: u64) {
    let t = random_kills(seed, Duration::from_millis(2500), None)
        .result
        .unwrap_or_else(|e| panic!("seed {seed} (rerun with KILL_SEED={seed}): {e}"));
    eprintln!("seed {seed}: {t:?}");
    assert!(
        t.kills >= 5 && t.requests > 100 && t.ok > 0 && t.backend_answers >= t.ok,
        "seed {seed}: {t:?}"
    );
}

#[test]
fn random_backend_kills_never_lose_or_double_an_answer() {
    let seed = env_seed().unwrap_or(KILL_SEED);
    eprintln!("backend kill seed {seed} (rerun with KILL_SEED={seed})");
    kills_pass(seed);
}

#[test]
fn random_backend_kills_with_a_new_seed_each_run() {
    let seed = env_seed().unwrap_or_else(random_seed);
    eprintln!("backend kill seed {seed} (rerun with KILL_SEED={seed})");
    kills_pass(seed);
}

/// The run through a relay planting `fault` must fail, naming it.
fn kills_catch(fault: Fault) {
    let seed = env_seed().unwrap_or(KILL_SEED);
    let out = random_kills(seed, Duration::from_secs(1), Some(fault));
    let fired = out
        .fired
        .unwrap_or_else(|| panic!("{}: the relay never planted it (seed {seed})", fault.name()));
    match out.result {
        Ok(t) => panic!("{fired}: the run passed: {t:?} (seed {seed})"),
        Err(e) => {
            eprintln!("{fired}: the run failed: {e}");
            assert!(
                e.contains(fault.symptom()),
                "{fired}: the failure does not say {:?}: {e} (seed {seed})",
                fault.symptom()
            )
        }
    }
}

#[test]
fn kills_catch_a_dropped_frame() {
    kills_catch(Fault::Drop);
}

#[test]
fn kills_catch_a_duplicated_frame() {
    kills_catch(Fault::Duplicate);
}

#[test]
fn kills_catch_two_swapped_frames() {
    kills_catch(Fault::Swap);
}

#[test]
fn kills_catch_a_rewritten_seq() {
    kills_catch(Fault::RewriteSeq);
}

#[test]
fn kills_catch_an_answer_to_the_wrong_request() {
    kills_catch(Fault::WrongReqId);
}

// No test for Fault::StaleReplay: these clients never resume, and a stale
// replay is a frame sent again right after a resume's SESSION, so the
// relay never gets to plant it here (tests/resume.rs and the load tester's
// churn meet resumes).
