//! Per-shard backend pools: one persistent connection per service instance,
//! requests multiplexed on it by req_id, answers matched back in any order,
//! deadlines on a shard-wide ordered queue, reconnect with backoff.
//!
//! A connection is `Connecting`, `Up` or `Down`. Requests are accepted while
//! connecting (they wait in the write queue and go out on connect); a `Down`
//! instance is skipped until its reconnect succeeds. When a connection dies,
//! every request in flight on it ends with `BACKEND_UNAVAILABLE`: none is
//! left without an answer and none gets two (each pending entry is removed
//! exactly once, by the answer, the deadline or the failure, whichever
//! comes first).

use crate::net::{Outbound, ReadMore, SharedStream};
use crate::protocol::{encode, Code, Decoder, Header, Kind, Link};
use crate::session::SessionId;
use bytes::{Bytes, BytesMut};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// A request in flight to a backend: where its answer goes.
#[derive(Debug, Clone)]
pub struct Pending {
    pub session: SessionId,
    /// The authenticated player the request was sent for (0: none).
    pub player: u64,
    /// That player's life when it was sent.
    pub life: u64,
    /// The client's req_id and msg_id, echoed in the answer.
    pub req_id: u32,
    pub msg_id: u32,
    /// A login request: its answer may authenticate the session.
    pub login: bool,
    /// Unique per shard; tells a deadline entry from a reused req_id.
    pub(crate) ticket: u64,
    /// When it was sent to the backend (for the latency histogram).
    pub(crate) sent_at: Instant,
}

impl Pending {
    /// A pending request for `session`; the pool fills in the rest.
    pub fn new(session: SessionId, player: u64, req_id: u32, msg_id: u32, login: bool) -> Pending {
        Pending {
            session,
            player,
            life: 0,
            req_id,
            msg_id,
            login,
            ticket: 0,
            sent_at: Instant::now(),
        }
    }

    /// Time since it was sent.
    pub fn elapsed(&self) -> Duration {
        self.sent_at.elapsed()
    }
}

/// What a backend (or the gateway on its behalf) answered.
#[derive(Debug, Clone)]
pub struct Answer {
    /// From the backend itself (false: the gateway answered for it).
    pub from_backend: bool,
    pub code: u16,
    pub msg_id: u32,
    pub player: u64,
    pub body: Bytes,
}

impl Answer {
    /// A gateway error answer for `p`.
    pub fn error(p: &Pending, code: Code) -> Answer {
        Answer {
            from_backend: false,
            code: code.into(),
            msg_id: p.msg_id,
            player: 0,
            body: Bytes::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    Connecting,
    Up,
    Down,
}

/// One connection to one backend instance.
pub struct BackendConn {
    pub addr: SocketAddr,
    state: Cell<ConnState>,
    /// The current connection's write queue; replaced on each reconnect.
    out: RefCell<Rc<Outbound>>,
    pending: RefCell<HashMap<u32, Pending>>,
    next_req_id: Cell<u32>,
    /// Answers its PINGs; an unhealthy connection is out of rotation.
    healthy: Cell<bool>,
    /// When the PING now unanswered was sent.
    ping_sent: Cell<Option<Instant>>,
}

impl BackendConn {
    fn new(addr: SocketAddr) -> BackendConn {
        BackendConn {
            addr,
            healthy: Cell::new(true),
            ping_sent: Cell::new(None),
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
        self.state.get() != ConnState::Down && self.healthy.get()
    }

    pub fn in_flight(&self) -> usize {
        self.pending.borrow().len()
    }

    fn alloc_req_id(&self) -> u32 {
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
    fn take(&self, req_id: u32) -> Option<Pending> {
        self.pending.borrow_mut().remove(&req_id)
    }

    /// Remove every pending entry (the connection died).
    fn take_all(&self) -> Vec<Pending> {
        self.pending.borrow_mut().drain().map(|(_, p)| p).collect()
    }
}

/// A deadline of one pending request.
struct Deadline {
    at: Instant,
    service: usize,
    instance: usize,
    req_id: u32,
    ticket: u64,
}

/// All backend connections of one shard.
pub struct BackendPool {
    /// services[s][i]: instance i of service s (router service order).
    services: Vec<Vec<Rc<BackendConn>>>,
    cursors: Vec<Cell<usize>>,
    deadlines: RefCell<VecDeque<Deadline>>,
    deadline_wake: shards::Notify,
    request_timeout: Duration,
    /// (in-flight requests, queued bytes) one connection may hold.
    bounds: (usize, usize),
    next_ticket: Cell<u64>,
    /// Answers whose req_id matched nothing (late after a timeout, or bogus).
    pub unknown_answers: Cell<u64>,
    /// Times an instance left rotation for missing its health checks.
    pub unhealthy: Rc<Cell<u64>>,
    /// Connections (re)established.
    pub connects: Cell<u64>,
    pub timeouts: Cell<u64>,
    pub failed_by_disconnect: Cell<u64>,
}

impl BackendPool {
    /// `services[s]` lists the instance addresses of router service `s`.
    pub fn new(
        services: Vec<Vec<SocketAddr>>,
        request_timeout: Duration,
        bounds: (usize, usize),
    ) -> BackendPool {
        let cursors = services.iter().map(|_| Cell::new(0)).collect();
        BackendPool {
            services: services
                .into_iter()
                .map(|addrs| {
                    addrs
                        .into_iter()
                        .map(|a| Rc::new(BackendConn::new(a)))
                        .collect()
                })
                .collect(),
            cursors,
            deadlines: RefCell::new(VecDeque::new()),
            deadline_wake: shards::Notify::new(),
            request_timeout,
            bounds,
            next_ticket: Cell::new(1),
            unknown_answers: Cell::new(0),
            unhealthy: Rc::new(Cell::new(0)),
            connects: Cell::new(0),
            timeouts: Cell::new(0),
            failed_by_disconnect: Cell::new(0),
        }
    }

    /// Every (service, instance, connection), for starting their tasks.
    fn unhealthy_counter(&self) -> Rc<Cell<u64>> {
        self.unhealthy.clone()
    }

    /// Requests waiting for an answer, on every connection.
    pub fn in_flight(&self) -> usize {
        self.services.iter().flatten().map(|c| c.in_flight()).sum()
    }

    /// (up, unhealthy, down) connection counts.
    pub fn health(&self) -> (u64, u64, u64) {
        let (mut up, mut sick, mut down) = (0, 0, 0);
        for c in self.services.iter().flatten() {
            match (c.state(), c.healthy.get()) {
                (ConnState::Up, true) => up += 1,
                (ConnState::Up, false) => sick += 1,
                _ => down += 1,
            }
        }
        (up, sick, down)
    }

    pub fn connections(&self) -> Vec<(usize, usize, Rc<BackendConn>)> {
        self.services
            .iter()
            .enumerate()
            .flat_map(|(s, v)| v.iter().enumerate().map(move |(i, c)| (s, i, c.clone())))
            .collect()
    }

    /// Send a request to one instance of `route.service`. On error nothing
    /// was sent and the caller answers the client with the code.
    pub fn send(
        &self,
        route: &crate::router::Route,
        header: &Header,
        body: &[u8],
        mut pending: Pending,
    ) -> Result<(), Code> {
        let (Some(conns), Some(cursor)) = (
            self.services.get(route.service),
            self.cursors.get(route.service),
        ) else {
            return Err(Code::NoRoute);
        };
        let player = pending.player;
        let (max_inflight, max_queue) = self.bounds;
        let has_room =
            |c: &BackendConn| c.in_flight() < max_inflight && c.out.borrow().queued() < max_queue;
        let i = crate::router::pick(route.balance, player, conns.len(), cursor, |i| {
            conns[i].usable() && has_room(&conns[i])
        })
        .ok_or_else(|| {
            // Reachable instances, all full: the gateway refuses for load.
            if conns.iter().any(|c| c.usable()) {
                Code::Overloaded
            } else {
                Code::BackendUnavailable
            }
        })?;
        let conn = &conns[i];
        let req_id = conn.alloc_req_id();
        let ticket = self.next_ticket.get();
        self.next_ticket.set(ticket + 1);
        pending.ticket = ticket;
        pending.sent_at = Instant::now();
        conn.pending.borrow_mut().insert(req_id, pending);
        let h = Header {
            kind: Kind::Request,
            flags: 0,
            code: 0,
            msg_id: header.msg_id,
            req_id,
            seq: player,
        };
        conn.out.borrow().push(|out| encode(out, &h, body));
        let mut deadlines = self.deadlines.borrow_mut();
        if deadlines.is_empty() {
            self.deadline_wake.notify();
        }
        deadlines.push_back(Deadline {
            at: Instant::now() + self.request_timeout,
            service: route.service,
            instance: i,
            req_id,
            ticket,
        });
        Ok(())
    }

    /// Pop every request whose deadline passed and is still pending.
    pub fn expired(&self, now: Instant) -> Vec<Pending> {
        let mut out = Vec::new();
        let mut deadlines = self.deadlines.borrow_mut();
        while deadlines.front().is_some_and(|d| d.at <= now) {
            let Some(d) = deadlines.pop_front() else {
                break;
            };
            let Some(conn) = self.services.get(d.service).and_then(|v| v.get(d.instance)) else {
                continue;
            };
            let mut pending = conn.pending.borrow_mut();
            if pending.get(&d.req_id).is_some_and(|p| p.ticket == d.ticket) {
                if let Some(p) = pending.remove(&d.req_id) {
                    out.push(p);
                }
            }
        }
        self.timeouts.set(self.timeouts.get() + out.len() as u64);
        out
    }

    /// When the earliest deadline falls (None: no request in flight).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.borrow().front().map(|d| d.at)
    }

    /// Resolves when a deadline is added to an empty queue.
    pub async fn deadline_added(&self) {
        self.deadline_wake.notified().await
    }
}

/// Where a backend connection task hands its answers.
pub trait AnswerSink {
    fn on_answer(&self, pending: Pending, answer: Answer);
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
    while !stop.is_stopped() {
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
        tracing::warn!(backend = %conn.addr, reason = %why, "backend connection lost");
        out.discard();
        out.close();
        drop(writer); // cancels a write blocked on a dead peer
        drop(pinger);
        *conn.out.borrow_mut() = Rc::new(Outbound::new());
        conn.state.set(ConnState::Down);
        fail_all(&*sink, pool_stats, &conn);
        if stop.is_stopped() {
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

fn fail_all<S: AnswerSink>(sink: &S, stats: &BackendPool, conn: &BackendConn) {
    let failed = conn.take_all();
    stats
        .failed_by_disconnect
        .set(stats.failed_by_disconnect.get() + failed.len() as u64);
    for p in failed {
        let a = Answer::error(&p, Code::BackendUnavailable);
        sink.on_answer(p, a);
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
        loop {
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
                    ),
                    None => {
                        stats.unknown_answers.set(stats.unknown_answers.get() + 1);
                        tracing::debug!(backend = %conn.addr, req_id = frame.header.req_id, "answer to unknown req_id dropped");
                    }
                },
                Ok(None) => break,
                Err(e) => return format!("protocol error from backend: {e}"),
            }
        }
        let want = decoder.needed(&buf).max(16 * 1024);
        match crate::net::read_more(stream, &mut buf, want, stop.stopped()).await {
            ReadMore::Interrupted => return "gateway stopping".into(),
            ReadMore::Eof => return "closed by backend".into(),
            ReadMore::Data(_) => {}
            ReadMore::Err(e) => return e.to_string(),
        }
    }
}
