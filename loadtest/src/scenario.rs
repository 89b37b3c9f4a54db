//! The per-session loops of each scenario, run on a load executor.
//!
//! Every loop checks correctness as it goes: the client checks each
//! sequenced frame is `last + 1`; the loops check each answer matches one
//! outstanding request, once; what is still outstanding at the end is a
//! violation.

use crate::options::{Options, Scenario, Target};
use crate::stats::{Live, Stats};
use slg_gateway::client::asynch::AsyncClient;
use slg_gateway::client::ClientError;
use slg_gateway::protocol::{Frame, Header, Kind};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a run waits for the last answers after the load stops.
pub const GRACE: Duration = Duration::from_secs(5);
/// A session acknowledges after this many sequenced frames.
pub const ACK_EVERY: u64 = 32;
/// msg_id of the first push of push-fanout (push k has `PUSH_MSG + k`).
pub const PUSH_MSG: u32 = 9000;

/// What the executors share with the run (and the pusher thread).
pub struct Shared {
    pub opts: Options,
    pub live: Arc<Live>,
    /// The clock origin of the run.
    pub base: Instant,
    /// Nanoseconds after `base` when the load phase starts (0: not yet;
    /// the run sets it once every session is connected).
    pub start_ns: AtomicU64,
    /// push-fanout: nanoseconds after `base` when push k was POSTed.
    pub push_sent: Vec<AtomicU64>,
    /// Sessions that finished their login (ok or not).
    pub ready: AtomicU64,
}

impl Shared {
    pub fn new(opts: Options, live: Arc<Live>) -> Shared {
        let pushes = opts.pushes;
        Shared {
            opts,
            live,
            base: Instant::now(),
            start_ns: AtomicU64::new(0),
            push_sent: (0..pushes).map(|_| AtomicU64::new(0)).collect(),
            ready: AtomicU64::new(0),
        }
    }

    /// When the load phase started, if it has.
    pub fn started(&self) -> Option<Instant> {
        let n = self.start_ns.load(Ordering::Acquire);
        (n > 0).then(|| self.base + Duration::from_nanos(n))
    }

    /// Start the load phase now.
    pub fn start_now(&self) -> Instant {
        let n = (self.base.elapsed().as_nanos() as u64).max(1);
        self.start_ns.store(n, Ordering::Release);
        self.base + Duration::from_nanos(n)
    }

    /// Nanoseconds since `base`.
    pub fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// Wait for the load phase; returns its (start, deadline).
    async fn phase(&self) -> (Instant, Instant) {
        loop {
            if let Some(s) = self.started() {
                return (s, s + self.opts.duration);
            }
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// A small deterministic generator for jitter.
struct Jitter(u64);

impl Jitter {
    fn next(&mut self) -> u64 {
        self.0 = shards::splitmix64(self.0);
        self.0
    }
}

async fn connect(sh: &Shared, i: usize, st: &mut Stats) -> Option<AsyncClient> {
    let source = (!sh.opts.sources.is_empty()).then(|| sh.opts.sources[i % sh.opts.sources.len()]);
    match AsyncClient::connect(sh.opts.addr, source).await {
        Ok(mut c) => {
            c.check_seqs = sh.opts.target == Target::Gateway;
            Some(c)
        }
        Err(e) => {
            st.error(format!("connect: {}", short(&e)));
            None
        }
    }
}

fn short(e: &ClientError) -> String {
    match e {
        ClientError::Io(io) => format!("{:?}", io.kind()),
        other => other.to_string(),
    }
}

/// Connect and (through the gateway) log in as `player_base + i`.
async fn open_session(sh: &Shared, i: usize, st: &mut Stats) -> Option<(AsyncClient, Vec<u8>)> {
    let mut c = connect(sh, i, st).await?;
    if sh.opts.target == Target::Direct {
        return Some((c, Vec::new()));
    }
    let player = sh.opts.player_base + i as u64;
    match c
        .login(sh.opts.login_msg, player.to_string().as_bytes())
        .await
    {
        Ok(li) => {
            st.logins += 1;
            Some((c, li.token))
        }
        Err(e) => {
            st.error(format!("login: {}", short(&e)));
            None
        }
    }
}

/// Run sessions `range` of the scenario on this executor.
pub async fn run_executor(sh: Arc<Shared>, range: std::ops::Range<usize>) -> Stats {
    let stats = Rc::new(RefCell::new(Stats::default()));
    // Open connections in waves of at most `connect_concurrency` per executor.
    let wave = (sh.opts.connect_concurrency / sh.opts.threads.max(1)).max(1);
    let ids: Vec<usize> = range.collect();
    let mut tasks = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(wave) {
        let mut opened = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let (sh, stats) = (sh.clone(), stats.clone());
            opened.push(glommio::spawn_local(
                async move { session(sh, i, stats).await },
            ));
        }
        // Let this wave connect and log in before the next one starts.
        let target = sh.ready.load(Ordering::Acquire) + chunk.len() as u64;
        let wait_until = Instant::now() + Duration::from_secs(10);
        while sh.ready.load(Ordering::Acquire) < target && Instant::now() < wait_until {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        tasks.extend(opened);
    }
    for t in tasks {
        t.await;
    }
    Rc::try_unwrap(stats)
        .map(RefCell::into_inner)
        .unwrap_or_default()
}

async fn session(sh: Arc<Shared>, i: usize, stats: Rc<RefCell<Stats>>) {
    let mut st = Stats::default();
    match sh.opts.scenario {
        Scenario::Steady => steady(&sh, i, &mut st).await,
        Scenario::LoginStorm => login_storm(&sh, i, &mut st).await,
        Scenario::PushFanout => push_fanout(&sh, i, &mut st).await,
        Scenario::Churn => churn(&sh, i, &mut st).await,
        Scenario::Idle => idle(&sh, i, &mut st).await,
    }
    if st.violation_count > 0 {
        sh.live
            .violations
            .fetch_add(st.violation_count, Ordering::Relaxed);
    }
    stats.borrow_mut().merge(st);
}

fn mark_ready(sh: &Shared) {
    sh.ready.fetch_add(1, Ordering::AcqRel);
}

/// Requests outstanding on a session, by req_id.
struct Outstanding {
    sent: HashMap<u32, Instant>,
    body: Vec<u8>,
}

impl Outstanding {
    fn new(body: usize) -> Outstanding {
        Outstanding {
            sent: HashMap::new(),
            body: vec![b'x'; body],
        }
    }

    fn send(&mut self, c: &mut AsyncClient, msg_id: u32, st: &mut Stats) {
        let req_id = c.send_request(msg_id, &self.body);
        self.sent.insert(req_id, Instant::now());
        st.sent += 1;
    }

    /// An answer arrived: match it to its request. False: a violation.
    fn answer(&mut self, f: &Frame, sh: &Shared, st: &mut Stats) -> bool {
        match self.sent.remove(&f.header.req_id) {
            Some(at) => {
                st.latency_us(at.elapsed().as_micros() as u64);
                st.answered += 1;
                st.code(f.header.code);
                sh.live.answered();
                if f.header.code == 0 && f.body.len() != self.body.len() {
                    st.violation(format!(
                        "req {}: answer body of {} bytes, sent {}",
                        f.header.req_id,
                        f.body.len(),
                        self.body.len()
                    ));
                }
                true
            }
            None => {
                st.violation(format!(
                    "answer to req {} that is not outstanding (repeat or stray)",
                    f.header.req_id
                ));
                false
            }
        }
    }
}

/// Steady: keep `inflight` requests outstanding (or send at `rate`) until
/// the deadline, then collect the last answers.
async fn steady(sh: &Shared, i: usize, st: &mut Stats) {
    let opened = open_session(sh, i, st).await;
    mark_ready(sh);
    let Some((mut c, _)) = opened else { return };
    sh.live.sessions_up.fetch_add(1, Ordering::Relaxed);
    st.sessions_up += 1;
    // Every session starts with the load phase, not before.
    let (_, deadline) = sh.phase().await;
    let mut out = Outstanding::new(sh.opts.body);
    let interval = (sh.opts.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / sh.opts.rate));
    let mut jitter = Jitter(i as u64 + 1);
    let mut next_send = Instant::now()
        + interval
            .map(|d| d.mul_f64((jitter.next() % 1000) as f64 / 1000.0))
            .unwrap_or_default();
    if interval.is_none() {
        for _ in 0..sh.opts.inflight.max(1) {
            out.send(&mut c, sh.opts.msg_id, st);
        }
    }
    let give_up = deadline + GRACE;
    let mut last_ack = 0;
    loop {
        let now = Instant::now();
        if now >= deadline && out.sent.is_empty() {
            break;
        }
        if now >= give_up {
            break;
        }
        let wake = match interval {
            Some(iv) if now < deadline => {
                if now >= next_send {
                    out.send(&mut c, sh.opts.msg_id, st);
                    next_send += iv;
                    continue;
                }
                next_send.min(give_up)
            }
            _ => give_up,
        };
        match c.recv_before(Some(wake)).await {
            Ok(None) => {}
            Ok(Some(f)) => match f.header.kind {
                Kind::Response => {
                    out.answer(&f, sh, st);
                    if interval.is_none() && Instant::now() < deadline {
                        out.send(&mut c, sh.opts.msg_id, st);
                    }
                    // Acknowledge as a real client does, so the gateway
                    // frees its outbox.
                    if c.last_seq >= last_ack + ACK_EVERY {
                        c.ack();
                        last_ack = c.last_seq;
                    }
                }
                Kind::Kick => {
                    st.error(format!(
                        "kicked {}",
                        slg_gateway::client::code_name(f.header.code)
                    ));
                    break;
                }
                _ => {}
            },
            Err(e @ ClientError::SeqGap { .. }) => {
                st.violation(format!("session {i}: {e}"));
                break;
            }
            Err(e) => {
                st.error(short(&e));
                break;
            }
        }
    }
    for req in out.sent.keys() {
        st.violation(format!("session {i}: req {req} never answered"));
    }
    c.close().await;
}

/// Login storm: connect, log in, log out; latency = connect to login answer.
async fn login_storm(sh: &Shared, i: usize, st: &mut Stats) {
    let t0 = Instant::now();
    let opened = open_session(sh, i, st).await;
    mark_ready(sh);
    let Some((c, _)) = opened else { return };
    st.latency_us(t0.elapsed().as_micros() as u64);
    sh.live.answered();
    c.send(&Header::new(Kind::Bye), &[]);
    c.close().await;
}

/// Push fan-out: log in, then receive every broadcast; latency = POST to
/// arrival.
async fn push_fanout(sh: &Shared, i: usize, st: &mut Stats) {
    let opened = open_session(sh, i, st).await;
    mark_ready(sh);
    let Some((mut c, _)) = opened else { return };
    st.sessions_up += 1;
    sh.live.sessions_up.fetch_add(1, Ordering::Relaxed);
    let mut got = HashSet::new();
    let mut max_by_push = vec![0u64; sh.opts.pushes];
    let (_, deadline) = sh.phase().await;
    let give_up = deadline + GRACE;
    let mut last_ack = 0;
    while got.len() < sh.opts.pushes && Instant::now() < give_up {
        match c.recv_before(Some(give_up)).await {
            Ok(Some(f)) if f.header.kind == Kind::Push => {
                let k = f.header.msg_id.wrapping_sub(PUSH_MSG) as usize;
                let sent = sh
                    .push_sent
                    .get(k)
                    .map(|a| a.load(Ordering::Acquire))
                    .unwrap_or(0);
                if k >= sh.opts.pushes || !got.insert(k) {
                    st.violation(format!(
                        "session {i}: unexpected or repeated push msg {}",
                        f.header.msg_id
                    ));
                    continue;
                }
                let us = sh.now_ns().saturating_sub(sent) / 1000;
                st.latency_us(us);
                max_by_push[k] = max_by_push[k].max(us);
                st.pushes_received += 1;
                sh.live.answered();
                if c.last_seq >= last_ack + ACK_EVERY {
                    c.ack();
                    last_ack = c.last_seq;
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e @ ClientError::SeqGap { .. }) => {
                st.violation(format!("session {i}: {e}"));
                break;
            }
            Err(e) => {
                st.error(short(&e));
                break;
            }
        }
    }
    let missing = sh.opts.pushes - got.len();
    if missing > 0 {
        st.violation(format!("session {i}: {missing} pushes never arrived"));
    }
    for (k, us) in max_by_push.into_iter().enumerate() {
        st.extra.insert(format!("max_push_us_{k:05}"), us as f64);
    }
    c.close().await;
}

/// Churn: steady traffic on connections that drop after a random time and
/// resume; seqs must continue exactly, answers arrive once.
async fn churn(sh: &Shared, i: usize, st: &mut Stats) {
    let opened = open_session(sh, i, st).await;
    mark_ready(sh);
    let Some((mut c, mut token)) = opened else {
        return;
    };
    st.sessions_up += 1;
    let (_, deadline) = sh.phase().await;
    let mut out = Outstanding::new(sh.opts.body);
    // Requests of dropped connections the gateway may never have read.
    let mut maybe: HashSet<u32> = HashSet::new();
    let mut jitter = Jitter(0xC0FFEE ^ i as u64);
    let mean = sh.opts.churn_every.as_millis().max(2) as u64;
    let mut next_req = c.next_req_id();
    let mut last_ack = 0;
    'life: while Instant::now() < deadline {
        let life = Duration::from_millis(mean / 2 + jitter.next() % mean);
        let drop_at = (Instant::now() + life).min(deadline);
        let first_req_here = next_req;
        let mut max_answered_here = 0u32;
        for _ in 0..sh.opts.inflight.max(1) {
            out.send(&mut c, sh.opts.msg_id, st);
        }
        loop {
            match c.recv_before(Some(drop_at)).await {
                Ok(None) => break,
                Ok(Some(f)) if f.header.kind == Kind::Response => {
                    let req = f.header.req_id;
                    if maybe.remove(&req) {
                        st.answered += 1;
                        sh.live.answered();
                    } else if out.answer(&f, sh, st) && req >= first_req_here {
                        max_answered_here = max_answered_here.max(req);
                    }
                    if Instant::now() < drop_at {
                        out.send(&mut c, sh.opts.msg_id, st);
                    }
                    if c.last_seq >= last_ack + ACK_EVERY {
                        c.ack();
                        last_ack = c.last_seq;
                    }
                }
                Ok(Some(f)) if f.header.kind == Kind::Kick => {
                    st.error(format!(
                        "kicked {}",
                        slg_gateway::client::code_name(f.header.code)
                    ));
                    break 'life;
                }
                Ok(Some(_)) => {}
                Err(e @ ClientError::SeqGap { .. }) => {
                    st.violation(format!("session {i}: {e}"));
                    break 'life;
                }
                Err(e) => {
                    st.error(short(&e));
                    break 'life;
                }
            }
        }
        next_req = c.next_req_id();
        if Instant::now() >= deadline {
            break;
        }
        // Drop with requests in flight. Those sent on this connection
        // before one that was answered were read by the gateway (it reads
        // in order), so they must still be answered; later ones may not.
        for (&req, _) in out
            .sent
            .iter()
            .filter(|(&r, _)| r >= first_req_here && r > max_answered_here)
        {
            maybe.insert(req);
        }
        out.sent.retain(|r, _| !maybe.contains(r));
        let last = c.last_seq;
        c.abort();
        let Some(mut nc) = connect(sh, i, st).await else {
            return;
        };
        nc.set_next_req_id(next_req);
        nc.last_seq = last;
        match nc.resume(&token, last).await {
            Ok(r) => {
                st.resumes += 1;
                token = r.token;
            }
            Err(e) => {
                st.violation(format!("session {i}: resume from {last} failed: {e}"));
                return;
            }
        }
        c = nc;
        last_ack = last;
    }
    // Collect the last answers (including replayed ones).
    let give_up = Instant::now() + GRACE;
    while !out.sent.is_empty() && Instant::now() < give_up {
        match c.recv_before(Some(give_up)).await {
            Ok(Some(f)) if f.header.kind == Kind::Response => {
                if maybe.remove(&f.header.req_id) {
                    st.answered += 1;
                } else {
                    out.answer(&f, sh, st);
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e @ ClientError::SeqGap { .. }) => {
                st.violation(format!("session {i}: {e}"));
                break;
            }
            Err(e) => {
                st.error(short(&e));
                break;
            }
        }
    }
    for req in out.sent.keys() {
        st.violation(format!("session {i}: req {req} never answered"));
    }
    *st.extra
        .entry("requests_lost_with_a_dropped_connection".into())
        .or_default() += maybe.len() as f64;
    c.close().await;
}

/// Idle: log in, then only keep the session alive until the deadline.
async fn idle(sh: &Shared, i: usize, st: &mut Stats) {
    let opened = open_session(sh, i, st).await;
    mark_ready(sh);
    let Some((mut c, _)) = opened else { return };
    st.sessions_up += 1;
    sh.live.sessions_up.fetch_add(1, Ordering::Relaxed);
    let ping_every = Duration::from_secs(20);
    let (_, deadline) = sh.phase().await;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let wake = (now + ping_every).min(deadline);
        match c.recv_before(Some(wake)).await {
            Ok(None) => {
                if Instant::now() < deadline && sh.opts.target == Target::Gateway {
                    c.ping();
                }
            }
            Ok(Some(f)) if f.header.kind == Kind::Kick => {
                st.error(format!(
                    "kicked {}",
                    slg_gateway::client::code_name(f.header.code)
                ));
                return;
            }
            Ok(Some(_)) => {}
            Err(e) => {
                st.error(short(&e));
                return;
            }
        }
    }
    c.close().await;
}
