//! Balancing across several real backend instances, instance failure and
//! return, and health checks taking an unresponsive instance out of
//! rotation.

mod common;

use slg_gateway::client::{Client, ClientError};
use slg_gateway::config::{Balance, Config, RouteConfig, ServiceConfig};
use slg_gateway::demo::{Answered, DemoBackend, WHOAMI};
use slg_gateway::gateway::Gateway;
use slg_gateway::protocol::{Code, Frame, Kind};
use slg_loadtest::check::{self, StreamCheck};
use slg_loadtest::fault::{Fault, FaultRelay, Plan};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn gateway(instances: &[SocketAddr], balance: Balance, tune: impl FnOnce(&mut Config)) -> Gateway {
    let mut cfg = common::config(instances[0], 1);
    cfg.services.insert(
        "demo".into(),
        ServiceConfig {
            instances: instances.iter().map(|a| a.to_string()).collect(),
            connections: 1,
        },
    );
    cfg.routes.push(RouteConfig {
        msgs: (WHOAMI, WHOAMI),
        service: "demo".into(),
        auth: balance == Balance::HashPlayer,
        login: false,
        balance,
        idempotent: false,
    });
    cfg.backend.reconnect_min = Duration::from_millis(50);
    cfg.backend.reconnect_max = Duration::from_millis(200);
    tune(&mut cfg);
    Gateway::start(cfg).expect("gateway")
}

fn who(c: &mut Client) -> String {
    let r = c.request(WHOAMI, b"").expect("answer");
    assert_eq!(r.header.code, 0, "whoami failed: {:#x}", r.header.code);
    String::from_utf8(r.body.to_vec()).expect("utf-8")
}

fn demos(n: usize) -> Vec<DemoBackend> {
    (0..n)
        .map(|_| DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo"))
        .collect()
}

/// Wait until every instance's connection is up (the first requests could
/// otherwise queue on a connection still being made).
fn settle() {
    std::thread::sleep(Duration::from_millis(150));
}

#[test]
fn round_robin_spreads_requests_evenly() {
    let ds = demos(3);
    let addrs: Vec<SocketAddr> = ds.iter().map(|d| d.addr).collect();
    let gw = gateway(&addrs, Balance::RoundRobin, |_| {});
    settle();
    let mut c = Client::connect(gw.client_addr).expect("connect");
    let mut count: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        *count.entry(who(&mut c)).or_default() += 1;
    }
    assert_eq!(count.len(), 3, "{count:?}");
    assert!(count.values().all(|&n| n == 10), "{count:?}");
    gw.stop();
    ds.into_iter().for_each(DemoBackend::stop);
}

#[test]
fn hash_by_player_sticks_and_moves_only_the_lost_instances_players() {
    let mut ds = demos(3);
    let addrs: Vec<SocketAddr> = ds.iter().map(|d| d.addr).collect();
    let gw = gateway(&addrs, Balance::HashPlayer, |_| {});
    settle();
    let mut clients: Vec<(u64, Client)> = (1..=24u64)
        .map(|p| {
            let mut c = Client::connect(gw.client_addr).expect("connect");
            c.login_demo(p).expect("login");
            (p, c)
        })
        .collect();
    let mut home: HashMap<u64, String> = HashMap::new();
    for (p, c) in clients.iter_mut() {
        let first = who(c);
        for _ in 0..4 {
            assert_eq!(who(c), first, "player {p} must stick to one instance");
        }
        home.insert(*p, first);
    }
    let used: std::collections::HashSet<&String> = home.values().collect();
    assert_eq!(used.len(), 3, "24 players spread over the 3 instances");
    // One instance goes away: only its players move.
    let gone = ds.remove(0);
    let gone_addr = gone.addr.to_string();
    gone.stop();
    std::thread::sleep(Duration::from_millis(150));
    for (p, c) in clients.iter_mut() {
        let now = who(c);
        if home[p] == gone_addr {
            assert_ne!(now, gone_addr);
        } else {
            assert_eq!(now, home[p], "player {p} moved though its instance is fine");
        }
    }
    gw.stop();
    ds.into_iter().for_each(DemoBackend::stop);
}

#[test]
fn an_instance_dying_fails_exactly_its_in_flight_requests_and_comes_back() {
    let mut ds = demos(2);
    let addrs: Vec<SocketAddr> = ds.iter().map(|d| d.addr).collect();
    let gw = gateway(&addrs, Balance::RoundRobin, |_| {});
    settle();
    let mut c = Client::connect(gw.client_addr).expect("connect");
    c.login_demo(9).expect("login");
    // Ten slow requests, alternating over the two instances.
    let reqs: Vec<u32> = (0..10)
        .map(|_| c.send_request(200, b"400").expect("send"))
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let dead = ds.remove(0);
    let dead_addr = dead.addr;
    dead.stop();
    let codes: Vec<u16> = reqs
        .iter()
        .map(|&r| c.response_to(r).expect("answer").header.code)
        .collect();
    let failed = codes
        .iter()
        .filter(|&&x| x == u16::from(Code::BackendUnavailable))
        .count();
    let ok = codes.iter().filter(|&&x| x == 0).count();
    assert_eq!(
        (failed, ok),
        (5, 5),
        "exactly the dead instance's half fails: {codes:?}"
    );
    // The rest carry on with the survivor.
    for _ in 0..6 {
        assert_eq!(who(&mut c), addrs[1].to_string());
    }
    // The instance restarts on its address and comes back into rotation.
    let back = DemoBackend::start(dead_addr).expect("restart on the same port");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if who(&mut c) == dead_addr.to_string() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted instance never came back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    gw.stop();
    back.stop();
    ds.into_iter().for_each(DemoBackend::stop);
}

#[test]
fn an_unresponsive_instance_leaves_rotation() {
    let good = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    // Accepts connections, never answers anything: a hung backend.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hung_addr = hung.local_addr().expect("addr");
    let keep = std::thread::spawn(move || {
        let mut held = Vec::new();
        hung.set_nonblocking(true).expect("nonblocking");
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok((s, _)) = hung.accept() {
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let gw = gateway(&[hung_addr, good.addr], Balance::RoundRobin, |c| {
        c.backend.health_interval = Duration::from_millis(50);
        c.backend.health_timeout = Duration::from_millis(150);
        c.backend.request_timeout = Duration::from_millis(500);
    });
    // Wait (up to 5 s, for a loaded machine) until the hung instance has
    // missed its health check.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !common::http(gw.http_addr, "GET", "/metrics", b"")
        .1
        .contains("slg_backend_connections{shard=\"0\",state=\"unhealthy\"} 1")
    {
        assert!(
            Instant::now() < deadline,
            "the hung instance never left rotation"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = Client::connect(gw.client_addr).expect("connect");
    for _ in 0..10 {
        assert_eq!(
            who(&mut c),
            good.addr.to_string(),
            "only the healthy instance serves"
        );
    }
    let metrics = common::http(gw.http_addr, "GET", "/metrics", b"").1;
    assert!(
        metrics.contains("slg_backend_unhealthy_total{shard=\"0\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("slg_backend_connections{shard=\"0\",state=\"unhealthy\"} 1"),
        "{metrics}"
    );
    gw.stop();
    good.stop();
    keep.join().expect("hung backend thread");
}

#[test]
fn broadcast_goes_to_every_instance_and_answers_once() {
    let mut ds = demos(3);
    let addrs: Vec<SocketAddr> = ds.iter().map(|d| d.addr).collect();
    let gw = gateway(&addrs, Balance::Broadcast, |_| {});
    settle();
    let mut c = Client::connect(gw.client_addr).expect("connect");
    c.login_demo(77).expect("login");
    let served = who(&mut c);
    assert!(addrs.iter().any(|a| a.to_string() == served));
    // Each of the three instances answered; the client got exactly one.
    c.timeout = Duration::from_millis(200);
    let stray = c.recv();
    assert!(
        matches!(stray, Err(ClientError::Timeout(_))),
        "one answer per broadcast request, then silence: {stray:?}"
    );
    // With one instance gone, still one successful answer.
    ds.remove(0).stop();
    std::thread::sleep(Duration::from_millis(100));
    c.timeout = Duration::from_secs(5);
    assert_ne!(who(&mut c), addrs[0].to_string());
    // With all gone: one failure.
    ds.into_iter().for_each(DemoBackend::stop);
    std::thread::sleep(Duration::from_millis(100));
    let r = c.request(WHOAMI, b"").expect("answer");
    assert_eq!(r.header.code, u16::from(Code::BackendUnavailable));
    gw.stop();
}

#[test]
fn several_connections_per_instance() {
    let ds = demos(2);
    let addrs: Vec<SocketAddr> = ds.iter().map(|d| d.addr).collect();
    let gw = gateway(&addrs, Balance::RoundRobin, |c| {
        if let Some(s) = c.services.get_mut("demo") {
            s.connections = 3;
        }
    });
    settle();
    let metrics = common::http(gw.http_addr, "GET", "/metrics", b"").1;
    assert!(
        metrics.contains("slg_backend_connections{shard=\"0\",state=\"up\"} 6"),
        "{metrics}"
    );
    let mut c = Client::connect(gw.client_addr).expect("connect");
    let mut count: HashMap<String, usize> = HashMap::new();
    for _ in 0..12 {
        *count.entry(who(&mut c)).or_default() += 1;
    }
    assert!(count.values().all(|&n| n == 6), "{count:?}");
    gw.stop();
    ds.into_iter().for_each(DemoBackend::stop);
}

#[test]
fn idempotent_requests_are_retried_on_another_instance() {
    let mut ds = demos(2);
    let addrs: Vec<SocketAddr> = ds.iter().map(|d| d.addr).collect();
    let gw = gateway(&addrs, Balance::RoundRobin, |c| {
        for r in c.routes.iter_mut().filter(|r| r.msgs == (200, 200)) {
            r.idempotent = true;
        }
    });
    settle();
    let mut c = Client::connect(gw.client_addr).expect("connect");
    c.login_demo(88).expect("login");
    let reqs: Vec<u32> = (0..10)
        .map(|_| c.send_request(200, b"400").expect("send"))
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    ds.remove(0).stop();
    let codes: Vec<u16> = reqs
        .iter()
        .map(|&r| c.response_to(r).expect("answer").header.code)
        .collect();
    assert!(
        codes.iter().all(|&x| x == 0),
        "every request retried and answered: {codes:?}"
    );
    let metrics = common::http(gw.http_addr, "GET", "/metrics", b"").1;
    assert!(
        metrics.contains("slg_backend_retries_total{shard=\"0\"} 5"),
        "{metrics}"
    );
    gw.stop();
    ds.into_iter().for_each(DemoBackend::stop);
}

#[test]
fn the_demo_backend_logs_only_the_answers_it_wrote() {
    let (tx, rx) = flume::unbounded::<Answered>();
    let d = DemoBackend::start_with_log("127.0.0.1:0".parse().expect("addr"), tx.clone())
        .expect("demo");
    let addr = d.addr;
    let gw = gateway(&[addr], Balance::RoundRobin, |_| {});
    settle();
    let mut c = Client::connect(gw.client_addr).expect("connect");
    c.login_demo(9).expect("login");
    // msg 200 waits the body's leading digits, then echoes the body.
    let r = c.request(200, b"5:tagged").expect("answer");
    assert_eq!((r.header.code, &r.body[..]), (0, &b"5:tagged"[..]));
    let slow = c.send_request(200, b"3000:never").expect("send");
    std::thread::sleep(Duration::from_millis(100));
    d.stop();
    let r = c.response_to(slow).expect("answer");
    assert_eq!(r.header.code, u16::from(Code::BackendUnavailable));
    // A restarted instance reports on the same channel.
    let back = start_logged(addr, &tx);
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.request(200, b"0:again").expect("answer").header.code != 0 {
        assert!(Instant::now() < deadline, "the instance never came back");
        std::thread::sleep(Duration::from_millis(20));
    }
    gw.stop();
    back.stop();
    drop(tx);
    let log: Vec<(u32, u16, u64, Vec<u8>)> = rx
        .try_iter()
        .map(|a| {
            assert_eq!(a.by, addr);
            (a.msg_id, a.code, a.player, a.body)
        })
        .collect();
    assert_eq!(
        log,
        vec![
            (1, 0, 0, vec![]),
            (200, 0, 9, b"5:tagged".to_vec()),
            (200, 0, 9, b"0:again".to_vec()),
        ],
        "the answer cut off by the stop is not logged"
    );
}

// ---------------------------------------------------------------------
// Random backend kills: clients keep requests in flight while a killer
// stops instances and starts them again on their ports. Every request
// sent must get exactly one answer, the right one: OK with its own body,
// BACKEND_UNAVAILABLE, or TIMEOUT for a request the backend never
// answered (the demo backend logs what it wrote toward the gateway, so a
// TIMEOUT for an answered request is an answer the gateway lost).

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

/// Start a logging demo instance on `addr`; when it is a port an instance
/// just left, the port may be busy a moment: try again, then fail the test.
fn start_logged(addr: SocketAddr, log: &flume::Sender<Answered>) -> DemoBackend {
    let mut last = None;
    for _ in 0..40 {
        match DemoBackend::start_with_log(addr, log.clone()) {
            Ok(d) => return d,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("a demo instance cannot start on {addr}: {last:?}");
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
        .map(|_| start_logged("127.0.0.1:0".parse().expect("addr"), &log_tx))
        .collect();
    let addrs: Vec<SocketAddr> = ds.iter().map(|d| d.addr).collect();
    let gw = gateway(&addrs, Balance::RoundRobin, |c| {
        c.backend.request_timeout = REQUEST_TIMEOUT
    });
    let relay =
        fault.map(|f| FaultRelay::start(gw.client_addr, Plan::seeded(f, seed)).expect("relay"));
    let target = relay.as_ref().map_or(gw.client_addr, |r| r.addr);
    settle();
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
            None => running[i] = Some(start_logged(addrs[i], &log_tx)),
        }
        std::thread::sleep(Duration::from_millis(40 + (x >> 32) % 120));
    }
    for (i, slot) in running.iter_mut().enumerate() {
        if slot.is_none() {
            *slot = Some(start_logged(addrs[i], &log_tx));
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
