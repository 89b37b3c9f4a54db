//! One connection to one backend instance: its state, its pending table
//! (req_id -> where the answer goes), and the task that connects, writes,
//! reads answers, checks health and reconnects with backoff.

use super::{Answer, BackendPool, Pending};

use crate::net::{Outbound, ReadMore, SharedStream};
use crate::protocol::{encode, Code, Decoder, Header, Kind, Link};
use bytes::BytesMut;
use std::cell::{Cell, RefCell};
// foldhash: the keys are ids, hashed on every frame; SipHash cost 6% of
// the relay's CPU (docs/PERFORMANCE.md). Seeded per process.
use foldhash::{HashMap, HashMapExt};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    Connecting,
    Up,
    Down,
}

/// One connection to one backend instance.
pub struct BackendConn {
    pub addr: SocketAddr,
    pub(super) state: Cell<ConnState>,
    /// The current connection's write queue; replaced on each reconnect.
    pub(super) out: RefCell<Rc<Outbound>>,
    pub(super) pending: RefCell<HashMap<u32, Pending>>,
    pub(super) next_req_id: Cell<u32>,
    /// Answers its PINGs; an unhealthy connection is out of rotation.
    pub(super) healthy: Cell<bool>,
    /// When the PING now unanswered was sent.
    pub(super) ping_sent: Cell<Option<Instant>>,
    /// Removed by a config reload: takes no new requests, closes once its
    /// in-flight ones are answered.
    pub(super) retired: Cell<bool>,
    pub(super) retire_wake: shards::Notify,
    /// No connect has been tried to the end yet.
    pub(super) first_connect: Cell<bool>,
}

impl BackendConn {
    pub(super) fn new(addr: SocketAddr) -> BackendConn {
        BackendConn {
            addr,
            healthy: Cell::new(true),
            ping_sent: Cell::new(None),
            retired: Cell::new(false),
            retire_wake: shards::Notify::new(),
            first_connect: Cell::new(true),
            state: Cell::new(ConnState::Connecting),
            out: RefCell::new(Rc::new(Outbound::new())),
            pending: RefCell::new(HashMap::new()),
            next_req_id: Cell::new(1),
        }
    }

    pub fn state(&self) -> ConnState {
        self.state.get()
    }

    /// In rotation: not down, and answering its health checks.
    pub fn usable(&self) -> bool {
        let state_ok = match self.state.get() {
            ConnState::Up => self.healthy.get(),
            // Only a first connect takes requests (they wait for it): a
            // reconnect after a failure is not trusted until it succeeds.
            ConnState::Connecting => self.first_connect.get(),
            ConnState::Down => false,
        };
        state_ok && !self.retired.get()
    }

    /// Take no new requests; close once the in-flight ones are answered.
    pub fn retire(&self) {
        self.retired.set(true);
        self.retire_wake.notify();
    }

    pub(super) fn retired_and_idle(&self) -> bool {
        self.retired.get() && self.pending.borrow().is_empty()
    }

    pub fn in_flight(&self) -> usize {
        self.pending.borrow().len()
    }

    pub(super) fn alloc_req_id(&self) -> u32 {
        let pending = self.pending.borrow();
        loop {
            let id = self.next_req_id.get();
            self.next_req_id.set(id.wrapping_add(1).max(1));
            if !pending.contains_key(&id) {
                return id;
            }
        }
    }

    /// Remove the pending entry for an answer to `req_id`.
    pub(super) fn take(&self, req_id: u32) -> Option<Pending> {
        self.pending.borrow_mut().remove(&req_id)
    }

    /// Remove every pending entry (the connection died).
    pub(super) fn take_all(&self) -> Vec<Pending> {
        self.pending.borrow_mut().drain().map(|(_, p)| p).collect()
    }
}

impl std::fmt::Debug for BackendConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendConn")
            .field("addr", &self.addr)
            .field("state", &self.state.get())
            .finish()
    }
}

/// Where a backend connection task hands its answers.
pub trait AnswerSink {
    /// `now`: when the answer arrived (one clock read per read batch).
    fn on_answer(&self, pending: Pending, answer: Answer, now: Instant);

    /// Run `f`, the handling of one read's answers, as one batch: what they
    /// produce may be carried out once at its end.
    fn batch<R>(&self, now: Instant, f: impl FnOnce() -> R) -> R {
        let _ = now;
        f()
    }
}

/// How one backend connection is run (from the config).
#[derive(Debug, Clone, Copy)]
pub struct LinkSettings {
    pub max_frame: u32,
    pub connect_timeout: Duration,
    /// Backoff (first, largest).
    pub reconnect: (Duration, Duration),
    /// Health checks (interval, timeout).
    pub health: (Duration, Duration),
}

impl LinkSettings {
    pub fn from_config(cfg: &crate::config::Config) -> LinkSettings {
        let b = &cfg.backend;
        LinkSettings {
            max_frame: cfg.max_frame,
            connect_timeout: b.connect_timeout,
            reconnect: (b.reconnect_min, b.reconnect_max),
            health: (b.health_interval, b.health_timeout),
        }
    }
}

/// Drive one backend connection until `stopped` resolves: connect, write,
/// read answers, and on failure fail what was in flight and reconnect after
/// an exponential backoff with jitter.
pub async fn run_connection<S: AnswerSink>(
    sink: Rc<S>,
    pool_stats: &BackendPool,
    conn: Rc<BackendConn>,
    link: LinkSettings,
    stop: shards::StopToken,
) {
    let LinkSettings {
        max_frame,
        connect_timeout,
        reconnect,
        health,
    } = link;
    let decoder = Decoder::new(Link::BackendToGateway, max_frame);
    let mut backoff = reconnect.0;
    let mut jitter_state =
        shards::splitmix64(conn.addr.port() as u64 ^ Instant::now().elapsed().as_nanos() as u64);
    while !stop.is_stopped() && !conn.retired_and_idle() {
        conn.state.set(ConnState::Connecting);
        let connected = futures_lite::future::or(
            async {
                Some(glommio::net::TcpStream::connect_timeout(conn.addr, connect_timeout).await)
            },
            async {
                stop.stopped().await;
                None
            },
        )
        .await;
        let stream = match connected {
            None => break,
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                conn.first_connect.set(false);
                tracing::warn!(backend = %conn.addr, error = %e, "backend connect failed");
                // What was queued while connecting is answered now; it
                // must never reach the backend later.
                *conn.out.borrow_mut() = Rc::new(Outbound::new());
                fail_all(&*sink, pool_stats, &conn);
                conn.state.set(ConnState::Down);
                backoff = sleep_backoff(backoff, reconnect, &mut jitter_state, &stop).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tracing::info!(backend = %conn.addr, "backend connected");
        conn.state.set(ConnState::Up);
        conn.first_connect.set(false);
        conn.healthy.set(true);
        conn.ping_sent.set(None);
        pool_stats.connects.set(pool_stats.connects.get() + 1);
        backoff = reconnect.0;
        let stream = SharedStream::new(stream);
        let out = conn.out.borrow().clone();
        let pinger = glommio::spawn_local(health_checks(
            conn.clone(),
            out.clone(),
            health,
            pool_stats.unhealthy_counter(),
        ));
        let writer = {
            let out = out.clone();
            let stream = stream.clone();
            glommio::spawn_local(async move { out.run_writer(stream).await })
        };
        let why = read_answers(&*sink, pool_stats, &conn, &stream, &decoder, &stop).await;
        if conn.retired_and_idle() {
            tracing::info!(backend = %conn.addr, "backend connection retired by a reload");
        } else {
            tracing::warn!(backend = %conn.addr, reason = %why, "backend connection lost");
        }
        out.discard();
        out.close();
        drop(writer); // cancels a write blocked on a dead peer
        drop(pinger);
        *conn.out.borrow_mut() = Rc::new(Outbound::new());
        conn.state.set(ConnState::Down);
        fail_all(&*sink, pool_stats, &conn);
        if stop.is_stopped() || conn.retired_and_idle() {
            break;
        }
        backoff = sleep_backoff(backoff, reconnect, &mut jitter_state, &stop).await;
    }
    conn.state.set(ConnState::Down);
    fail_all(&*sink, pool_stats, &conn);
}

/// PING the connection every `interval`; one unanswered past `timeout`
/// takes it out of rotation (the PONG handler brings it back). Ends when
/// this incarnation of the connection closes.
async fn health_checks(
    conn: Rc<BackendConn>,
    out: Rc<Outbound>,
    (interval, timeout): (Duration, Duration),
    sick: Rc<Cell<u64>>,
) {
    let tick = interval.min(timeout).max(Duration::from_millis(1));
    let mut last_ping = Instant::now();
    while !out.is_closing() {
        glommio::timer::sleep(tick).await;
        if out.is_closing() {
            break;
        }
        match conn.ping_sent.get() {
            Some(t) if t.elapsed() >= timeout && conn.healthy.get() => {
                conn.healthy.set(false);
                sick.set(sick.get() + 1);
                tracing::warn!(backend = %conn.addr, "backend does not answer its health check: out of rotation");
            }
            Some(_) => {}
            None if last_ping.elapsed() >= interval => {
                last_ping = Instant::now();
                conn.ping_sent.set(Some(last_ping));
                out.push(|b| encode(b, &Header::new(Kind::Ping), &[]));
            }
            None => {}
        }
    }
}

/// The connection died: each request in flight on it is sent again
/// elsewhere (idempotent routes, within their deadline) or answered
/// `BACKEND_UNAVAILABLE`.
fn fail_all<S: AnswerSink>(sink: &S, pool: &BackendPool, conn: &BackendConn) {
    for p in conn.take_all() {
        if let Err(p) = pool.retry(p) {
            pool.failed_by_disconnect
                .set(pool.failed_by_disconnect.get() + 1);
            let a = Answer::error(&p, Code::BackendUnavailable);
            sink.on_answer(p, a, Instant::now());
        }
    }
}

/// Sleep `current` with +-25% jitter (or until stop); return the next backoff.
async fn sleep_backoff(
    current: Duration,
    (min, max): (Duration, Duration),
    jitter: &mut u64,
    stop: &shards::StopToken,
) -> Duration {
    *jitter = shards::splitmix64(*jitter);
    let quarter = current.as_micros() as u64 / 4;
    let spread = if quarter == 0 {
        0
    } else {
        *jitter % (2 * quarter + 1)
    };
    let wait = Duration::from_micros((current.as_micros() as u64 - quarter) + spread);
    futures_lite::future::or(glommio::timer::sleep(wait), stop.stopped()).await;
    (current * 2).clamp(min, max)
}

async fn read_answers<S: AnswerSink>(
    sink: &S,
    stats: &BackendPool,
    conn: &BackendConn,
    stream: &SharedStream,
    decoder: &Decoder,
    stop: &shards::StopToken,
) -> String {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        // Every answer this read brought arrived at one instant.
        let now = Instant::now();
        let r = sink.batch(now, || loop {
            match decoder.decode(&mut buf) {
                // Anything but a RESPONSE is a PONG: the link is alive.
                Ok(Some(frame)) if frame.header.kind != Kind::Response => {
                    conn.ping_sent.set(None);
                    if !conn.healthy.replace(true) {
                        tracing::info!(backend = %conn.addr, "backend answers again: back in rotation");
                    }
                }
                Ok(Some(frame)) => match conn.take(frame.header.req_id) {
                    Some(p) => sink.on_answer(
                        p,
                        Answer {
                            from_backend: true,
                            code: frame.header.code,
                            msg_id: frame.header.msg_id,
                            player: frame.header.seq,
                            body: frame.body,
                        },
                        now,
                    ),
                    None => {
                        stats.unknown_answers.set(stats.unknown_answers.get() + 1);
                        tracing::debug!(backend = %conn.addr, req_id = frame.header.req_id, "answer to unknown req_id dropped");
                    }
                },
                Ok(None) => break Ok(()),
                Err(e) => break Err(format!("protocol error from backend: {e}")),
            }
        });
        if let Err(e) = r {
            return e;
        }
        if conn.retired_and_idle() {
            return "retired".into();
        }
        let want = decoder.needed(&buf).max(16 * 1024);
        let interrupt = futures_lite::future::or(stop.stopped(), conn.retire_wake.notified());
        match crate::net::read_more(stream, &mut buf, want, interrupt).await {
            ReadMore::Interrupted if stop.is_stopped() => return "gateway stopping".into(),
            ReadMore::Interrupted => {}
            ReadMore::Eof => return "closed by backend".into(),
            ReadMore::Data(_) => {}
            ReadMore::Err(e) => return e.to_string(),
        }
    }
}
