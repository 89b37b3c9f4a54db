//! The per-session loops of each scenario, run on a load executor.
//!
//! Every loop checks correctness as it goes, through [`Sess`]: each
//! sequenced frame against the client's own record of its stream, each
//! answer against one outstanding request (req_id, msg_id and the whole
//! body); what is still outstanding at the end is a violation. Any client
//! error (connect, login, kick, close, decode) is counted and fails the run
//! unless `allow_errors` admits it.
//!
//! One file of this length: one loop per scenario, side by side, so the
//! checks each applies are compared at a glance.

use crate::check::{LOST, MISDELIVERED, REPEATED};
use crate::options::{Options, Scenario, Target};
use crate::session::{record_error, Event, Sess};
use crate::stats::{Live, Stats};
use slg_gateway::client::ClientError;
use slg_gateway::protocol::Code;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::session::ACK_EVERY;

/// How long a run waits for the last answers after the load stops, beyond
/// the gateway's request timeout.
pub const GRACE: Duration = Duration::from_secs(2);
/// msg_id of the first push of push-fanout (push k has `PUSH_MSG + k`).
pub const PUSH_MSG: u32 = 9000;

/// What the executors share with the run (and the pusher thread).
pub struct Shared {
    pub opts: Options,
    /// How sessions connect (TLS, WebSocket).
    pub connect: slg_gateway::client::ConnectOptions,
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
    pub fn new(
        opts: Options,
        live: Arc<Live>,
        connect: slg_gateway::client::ConnectOptions,
    ) -> Shared {
        let pushes = opts.pushes;
        Shared {
            opts,
            connect,
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

    /// How long to wait for answers after the load: every request the
    /// gateway read is answered within its request timeout.
    pub fn grace(&self) -> Duration {
        self.opts.request_timeout + GRACE
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

/// The body of push k of push-fanout, `len` bytes long (at least its
/// name): the tester recognises each one.
pub fn push_body(k: usize, len: usize) -> String {
    let mut b = format!("push-{k:05}");
    if b.len() < len {
        b.extend(std::iter::repeat_n('.', len - b.len()));
    }
    b
}

/// A small deterministic generator for jitter.
struct Jitter(u64);

impl Jitter {
    fn next(&mut self) -> u64 {
        self.0 = shards::splitmix64(self.0);
        self.0
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

/// Open the session and mark it ready (whether or not it opened).
async fn open<'a>(sh: &'a Shared, i: usize, st: &mut Stats) -> Option<Sess<'a>> {
    let s = Sess::open(sh, i, st).await;
    mark_ready(sh);
    if s.is_some() {
        st.sessions_up += 1;
        sh.live.sessions_up.fetch_add(1, Ordering::Relaxed);
    }
    s
}

/// Steady: keep `inflight` requests outstanding (or send at `rate`) until
/// the deadline, then collect the last answers.
async fn steady(sh: &Shared, i: usize, st: &mut Stats) {
    let Some(mut s) = open(sh, i, st).await else {
        return;
    };
    // Every session starts with the load phase, not before.
    let (_, deadline) = sh.phase().await;
    let interval = (sh.opts.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / sh.opts.rate));
    let mut jitter = Jitter(i as u64 + 1);
    let mut next_send = Instant::now()
        + interval
            .map(|d| d.mul_f64((jitter.next() % 1000) as f64 / 1000.0))
            .unwrap_or_default();
    if interval.is_none() {
        for _ in 0..sh.opts.inflight.max(1) {
            s.request(st);
        }
    }
    let give_up = deadline + sh.grace();
    loop {
        let now = Instant::now();
        if (now >= deadline && s.ledger.outstanding.is_empty()) || now >= give_up {
            break;
        }
        let wake = match interval {
            Some(iv) if now < deadline => {
                if now >= next_send {
                    s.request(st);
                    next_send += iv;
                    continue;
                }
                next_send.min(give_up)
            }
            _ => give_up,
        };
        match s.c.recv_before(Some(wake)).await {
            Ok(None) => {}
            Ok(Some(f)) => match s.on_frame(f, st) {
                Event::Answered { .. } if interval.is_none() && Instant::now() < deadline => {
                    s.request(st);
                }
                Event::Kicked => break,
                Event::Push(f) => st.violation(format!(
                    "session {i}: a PUSH (msg {}) nobody sent",
                    f.header.msg_id
                )),
                _ => {}
            },
            Err(e) => {
                record_error(st, "receive", &e);
                break;
            }
        }
    }
    s.end_connection(st);
    s.unanswered(st);
    s.c.close().await;
}

/// Login storm: connect, log in (SESSION and seqs checked), log out;
/// latency = connect to login answer.
async fn login_storm(sh: &Shared, i: usize, st: &mut Stats) {
    let t0 = Instant::now();
    let Some(s) = open(sh, i, st).await else {
        return;
    };
    st.latency_us(t0.elapsed().as_micros() as u64);
    sh.live.answered();
    if sh.opts.linger {
        // No BYE: the player stays on the gateway, lingering.
        s.c.close().await;
    } else {
        s.bye().await;
    }
}

/// Push fan-out: log in, then receive every broadcast, each once, with its
/// own body; latency = POST to arrival.
async fn push_fanout(sh: &Shared, i: usize, st: &mut Stats) {
    let Some(mut s) = open(sh, i, st).await else {
        return;
    };
    let mut got = HashSet::new();
    let mut max_by_push = vec![0u64; sh.opts.pushes];
    let (_, deadline) = sh.phase().await;
    let give_up = deadline + sh.grace();
    while got.len() < sh.opts.pushes && Instant::now() < give_up {
        let f = match s.c.recv_before(Some(give_up)).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                record_error(st, "receive", &e);
                break;
            }
        };
        let f = match s.on_frame(f, st) {
            Event::Push(f) => f,
            Event::Kicked => break,
            _ => continue,
        };
        let k = f.header.msg_id.wrapping_sub(PUSH_MSG) as usize;
        if k >= sh.opts.pushes {
            st.violation(format!(
                "session {i}: push msg {} that was never sent",
                f.header.msg_id
            ));
            continue;
        }
        if f.body[..] != *push_body(k, sh.opts.body).as_bytes() {
            st.violation(format!(
                "session {i}: push msg {} {MISDELIVERED}: body {:?} is another push's",
                f.header.msg_id,
                String::from_utf8_lossy(&f.body)
            ));
            continue;
        }
        if !got.insert(k) {
            st.violation(format!(
                "session {i}: push msg {} {REPEATED}",
                f.header.msg_id
            ));
            continue;
        }
        let sent = sh
            .push_sent
            .get(k)
            .map(|a| a.load(Ordering::Acquire))
            .unwrap_or(0);
        let us = sh.now_ns().saturating_sub(sent) / 1000;
        st.latency_us(us);
        max_by_push[k] = max_by_push[k].max(us);
        st.pushes_received += 1;
        sh.live.answered();
    }
    s.end_connection(st);
    let missing = sh.opts.pushes - got.len();
    if missing > 0 {
        st.violation(format!(
            "session {i}: {missing} pushes {LOST}: never arrived"
        ));
    }
    for (k, us) in max_by_push.into_iter().enumerate() {
        st.extra.insert(format!("max_push_us_{k:05}"), us as f64);
    }
    s.c.close().await;
}

/// Churn's record of requests whose connection dropped before they were
/// answered, and which the gateway may or may not have read.
#[derive(Default)]
struct Unsure {
    /// req_id -> when it may be declared unread (drop + request timeout).
    by_req: HashMap<u32, Instant>,
    /// Declared unread (and sent again): an answer to one is a violation.
    unread: HashSet<u32>,
    /// When the PING that will settle the due ones was sent.
    ping_at: Option<Instant>,
    /// Requests declared unread and sent again.
    resent: u64,
}

impl Unsure {
    fn next_due(&self) -> Option<Instant> {
        if self.ping_at.is_some() {
            return None;
        }
        self.by_req.values().min().copied()
    }
}

/// Handle one frame of churn; false: the connection is over.
fn churn_frame(
    s: &mut Sess<'_>,
    f: slg_gateway::protocol::Frame,
    un: &mut Unsure,
    st: &mut Stats,
    answered_here: &mut u32,
    resend: bool,
) -> bool {
    let req = f.header.req_id;
    if f.header.kind == slg_gateway::protocol::Kind::Response && un.unread.contains(&req) {
        st.violation(format!(
            "session {}: req {req} answered after it was declared unread \
             (request_timeout had passed and a PONG came first)",
            s.i
        ));
        return true;
    }
    match s.on_frame(f, st) {
        Event::Answered { conn, .. } => {
            un.by_req.remove(&req);
            if conn == s.conn {
                *answered_here = (*answered_here).max(req);
            }
            if resend {
                s.request(st);
            }
        }
        Event::Pong { sent_at } => {
            if un.ping_at.is_some_and(|p| p <= sent_at) {
                un.ping_at = None;
                // Every answer generated before this PING was read is in
                // the stream before its PONG: the due requests were never
                // read by the gateway. Send them again.
                let due: Vec<u32> = un
                    .by_req
                    .iter()
                    .filter(|(_, &at)| at <= sent_at)
                    .map(|(&r, _)| r)
                    .collect();
                for r in due {
                    un.by_req.remove(&r);
                    s.ledger.outstanding.remove(&r);
                    un.unread.insert(r);
                    un.resent += 1;
                    s.request(st);
                }
            }
        }
        Event::Kicked => return false,
        Event::Push(p) => st.violation(format!(
            "session {}: a PUSH (msg {}) nobody sent",
            s.i, p.header.msg_id
        )),
        Event::Other => {}
    }
    true
}

/// Churn: traffic on connections that drop after a random time (with
/// requests in flight) and resume. The resume point must be what the
/// client received, seqs go on exactly, and every request is accounted
/// for: answered exactly once, or shown unread (no answer within the
/// gateway's request timeout, settled by a PING) and sent again.
async fn churn(sh: &Shared, i: usize, st: &mut Stats) {
    let Some(mut s) = open(sh, i, st).await else {
        return;
    };
    let (_, deadline) = sh.phase().await;
    let mut un = Unsure::default();
    let mut jitter = Jitter(0xC0FFEE ^ i as u64);
    let mean = sh.opts.churn_every.as_millis().max(2) as u64;
    let inflight = sh.opts.inflight.max(1);
    'life: while Instant::now() < deadline {
        let life = Duration::from_millis(mean / 2 + jitter.next() % mean);
        let drop_at = (Instant::now() + life).min(deadline);
        let mut answered_here = 0u32;
        let here = s
            .ledger
            .outstanding
            .values()
            .filter(|r| r.conn == s.conn)
            .count();
        for _ in here..inflight {
            s.request(st);
        }
        loop {
            let wake = un.next_due().map_or(drop_at, |d| d.min(drop_at));
            match s.c.recv_before(Some(wake)).await {
                Ok(None) if Instant::now() >= drop_at => break,
                Ok(None) => {
                    un.ping_at = Some(s.ping());
                }
                Ok(Some(f)) => {
                    let live = Instant::now() < drop_at;
                    if !churn_frame(&mut s, f, &mut un, st, &mut answered_here, live) {
                        break 'life;
                    }
                }
                Err(e) => {
                    record_error(st, "receive", &e);
                    break 'life;
                }
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        // Drop with requests in flight. The gateway reads a connection in
        // order, so those written before one that was answered were read
        // and must be answered; about the later ones only time can tell.
        s.end_connection(st);
        let settle = Instant::now() + sh.opts.request_timeout + Duration::from_millis(500);
        for (&req, r) in &s.ledger.outstanding {
            if r.conn == s.conn && req > answered_here {
                un.by_req.entry(req).or_insert(settle);
            }
        }
        un.ping_at = None;
        let last = s.check.last();
        let next_req = s.c.next_req_id();
        let mut tries = 0;
        let fresh = loop {
            match Sess::connect(sh, i, st).await {
                Some(c) => break c,
                None if tries < 3 => tries += 1,
                None => {
                    abandon(&mut s, &un, st);
                    return;
                }
            }
            glommio::timer::sleep(Duration::from_millis(20)).await;
        };
        std::mem::replace(&mut s.c, fresh).abort();
        s.c.set_next_req_id(next_req);
        s.conn += 1;
        let token = s.token.clone();
        match s.c.resume(&token, last).await {
            Ok(r) => {
                st.resumes += 1;
                s.token = r.token;
                if let Err(v) = s.check.resumed(last, r.resume_point) {
                    st.violation(format!("session {i}: {v}"));
                }
            }
            Err(ClientError::ResumeRefused(code))
                if code == u16::from(Code::ResumeGap) && sh.opts.expect_eviction =>
            {
                if !s.login(st).await {
                    abandon(&mut s, &un, st);
                    return;
                }
            }
            Err(ClientError::ResumeRefused(code)) => {
                st.violation(format!(
                    "session {i}: resume from {last} refused with {} ({LOST} session)",
                    slg_gateway::client::code_name(code)
                ));
                abandon(&mut s, &un, st);
                return;
            }
            Err(e) => {
                record_error(st, "resume", &e);
                abandon(&mut s, &un, st);
                return;
            }
        }
    }
    // Collect the last answers (replayed ones included) and settle the
    // unsure ones.
    let give_up = Instant::now() + sh.grace() + Duration::from_millis(500);
    let mut answered_here = 0;
    while (!s.ledger.outstanding.is_empty() || !un.by_req.is_empty()) && Instant::now() < give_up {
        let wake = un.next_due().map_or(give_up, |d| d.min(give_up));
        match s.c.recv_before(Some(wake)).await {
            Ok(None) if Instant::now() >= give_up => break,
            Ok(None) => {
                un.ping_at = Some(s.ping());
            }
            Ok(Some(f)) => {
                if !churn_frame(&mut s, f, &mut un, st, &mut answered_here, false) {
                    break;
                }
            }
            Err(e) => {
                record_error(st, "receive", &e);
                break;
            }
        }
    }
    s.end_connection(st);
    for req in un.by_req.keys() {
        s.ledger.outstanding.remove(req);
        st.violation(format!(
            "session {i}: req {req} unaccounted: neither answered nor shown unread"
        ));
    }
    s.unanswered(st);
    *st.extra
        .entry("requests_unread_at_a_drop_sent_again".into())
        .or_default() += un.resent as f64;
    s.c.close().await;
}

/// The session cannot go on: what it still waited for is counted, as
/// errors (the run fails unless errors are allowed).
fn abandon(s: &mut Sess<'_>, un: &Unsure, st: &mut Stats) {
    let n = s.ledger.outstanding.len() + un.by_req.len();
    if n > 0 {
        *st.errors
            .entry("requests abandoned with a session".into())
            .or_default() += n as u64;
    }
}

/// Idle: log in, keep the session alive until the deadline, then check it
/// is still open and answers a PING with the seq it last received.
async fn idle(sh: &Shared, i: usize, st: &mut Stats) {
    let Some(mut s) = open(sh, i, st).await else {
        return;
    };
    let ping_every = Duration::from_secs(20);
    let (_, deadline) = sh.phase().await;
    let mut final_ping = None;
    let give_up = deadline + sh.grace();
    loop {
        let now = Instant::now();
        if now >= give_up {
            st.error("idle: no PONG to the final PING");
            break;
        }
        if now >= deadline && final_ping.is_none() {
            let _ = s.ping();
            final_ping = Some(s.check.last());
        }
        let wake = if final_ping.is_some() {
            give_up
        } else {
            (now + ping_every).min(deadline)
        };
        match s.c.recv_before(Some(wake)).await {
            Ok(None) => {
                if Instant::now() < deadline {
                    let _ = s.ping();
                }
            }
            Ok(Some(f)) => {
                let pong_seq = f.header.seq;
                match s.on_frame(f, st) {
                    Event::Kicked => return,
                    Event::Pong { .. } if s.pings_outstanding() == 0 => {
                        if let Some(last) = final_ping {
                            if sh.opts.target == Target::Gateway && pong_seq != last {
                                st.violation(format!(
                                    "session {i}: final PONG seq {pong_seq}, last received {last}"
                                ));
                            }
                            break;
                        }
                    }
                    Event::Answered { .. } => {
                        st.violation(format!("session {i}: an answer to a request never sent"))
                    }
                    Event::Push(p) => st.violation(format!(
                        "session {i}: a PUSH (msg {}) nobody sent",
                        p.header.msg_id
                    )),
                    _ => {}
                }
            }
            Err(e) => {
                record_error(st, "idle", &e);
                return;
            }
        }
    }
    s.end_connection(st);
    s.c.close().await;
}
