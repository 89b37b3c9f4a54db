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
//!
//! Why one file of this length: the pending table, the deadline queue and
//! the connection tasks share the exactly-once invariant above, and it is
//! easiest to check with all three in view. Splitting it (pool / connection
//! task / deadlines) is planned with issue 14's work on this path.

use crate::net::{Outbound, ReadMore, SharedStream};
use crate::protocol::{encode, Code, Decoder, Header, Kind, Link};
use bytes::{Bytes, BytesMut};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// A request in flight to a backend: where its answer goes.
#[derive(Debug, Clone)]
pub struct Pending {
    /// Whose request it is (what the core carries back with the answer).
    pub asker: Asker,
    /// Unique per shard; tells a deadline entry from a reused req_id.
    pub(crate) ticket: u64,
    /// When it was sent to the backend (for the latency histogram).
    pub(crate) sent_at: Instant,
    /// The fan-out group of a broadcast request (0: none).
    pub group: u64,
    /// For an idempotent route: what it takes to send it again elsewhere.
    pub(crate) retry: Option<Rc<Retry>>,
}

/// What a retry of an idempotent request needs.
#[derive(Debug)]
pub struct Retry {
    /// The service's name: a retry after a reload uses the new instances.
    service: String,
    balance: crate::config::Balance,
    msg_id: u32,
    body: Bytes,
    /// The request's own deadline: a retry never extends it.
    deadline: Instant,
}

impl Pending {
    /// A pending request of `asker`; the pool fills in the rest.
    pub fn new(asker: Asker) -> Pending {
        Pending {
            asker,
            ticket: 0,
            sent_at: Instant::now(),
            group: 0,
            retry: None,
        }
    }

    /// Time since it was sent.
    pub fn elapsed(&self) -> Duration {
        self.sent_at.elapsed()
    }
}

pub use crate::core::{Answer, Asker};

impl Answer {
    /// A gateway error answer for `p`.
    pub fn error(p: &Pending, code: Code) -> Answer {
        Answer {
            from_backend: false,
            code: code.into(),
            msg_id: p.asker.msg_id,
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
    /// Removed by a config reload: takes no new requests, closes once its
    /// in-flight ones are answered.
    retired: Cell<bool>,
    retire_wake: shards::Notify,
    /// No connect has been tried to the end yet.
    first_connect: Cell<bool>,
}

impl BackendConn {
    fn new(addr: SocketAddr) -> BackendConn {
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

    fn retired_and_idle(&self) -> bool {
        self.retired.get() && self.pending.borrow().is_empty()
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

/// A deadline of one pending request (ordered for a min-heap).
struct Deadline {
    at: Instant,
    conn: Rc<BackendConn>,
    req_id: u32,
    ticket: u64,
}

impl PartialEq for Deadline {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at && self.ticket == o.ticket
    }
}
impl Eq for Deadline {}
impl PartialOrd for Deadline {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Deadline {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // Reversed: the earliest deadline is the heap's greatest.
        o.at.cmp(&self.at).then(o.ticket.cmp(&self.ticket))
    }
}

/// One instance of a service: its connections of this shard.
#[derive(Debug)]
pub struct Instance {
    pub addr: SocketAddr,
    conns: Vec<Rc<BackendConn>>,
    cursor: Cell<usize>,
}

impl Instance {
    /// A usable connection with room, in turn.
    fn conn(&self, room: impl Fn(&BackendConn) -> bool) -> Option<&Rc<BackendConn>> {
        let n = self.conns.len();
        let start = self.cursor.get();
        let k = (0..n)
            .map(|k| (start + k) % n)
            .find(|&k| self.conns[k].usable() && room(&self.conns[k]))?;
        self.cursor.set(k + 1);
        self.conns.get(k)
    }

    /// Whether [`conn`](Self::conn) would find one (moves no cursor).
    fn has_conn(&self, room: impl Fn(&BackendConn) -> bool) -> bool {
        self.conns.iter().any(|c| c.usable() && room(c))
    }

    fn reachable(&self) -> bool {
        self.conns.iter().any(|c| c.usable())
    }
}

/// One service: its instances, in config order.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    instances: Vec<Instance>,
    cursor: Cell<usize>,
}

/// What a service is made of, from the config: name, instance addresses,
/// connections per instance.
pub type ServiceSpec = (String, Vec<SocketAddr>, usize);

/// The fate of one answer of a broadcast request.
#[derive(Debug)]
pub enum GroupVerdict {
    /// Deliver this answer (the first success, or the last of all failures).
    Deliver(Answer),
    /// Drop it: an answer was delivered already, or others are awaited.
    Drop,
}

/// A broadcast request waiting for its answers.
struct Group {
    remaining: usize,
    delivered: bool,
}

impl std::fmt::Debug for BackendConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendConn")
            .field("addr", &self.addr)
            .field("state", &self.state.get())
            .finish()
    }
}

/// All backend connections of one shard.
pub struct BackendPool {
    /// In router service order; replaced whole by a config reload.
    services: RefCell<Vec<Rc<Service>>>,
    /// Connections a reload removed, until their last requests are answered.
    retired: RefCell<Vec<Rc<BackendConn>>>,
    deadlines: RefCell<std::collections::BinaryHeap<Deadline>>,
    deadline_wake: shards::Notify,
    groups: RefCell<HashMap<u64, Group>>,
    next_group: Cell<u64>,
    request_timeout: Cell<Duration>,
    /// (in-flight requests, queued bytes) one connection may hold.
    bounds: Cell<(usize, usize)>,
    next_ticket: Cell<u64>,
    /// Answers whose req_id matched nothing (late after a timeout, or bogus).
    pub unknown_answers: Cell<u64>,
    pub timeouts: Cell<u64>,
    pub failed_by_disconnect: Cell<u64>,
    /// Idempotent requests sent again after their connection died.
    pub retries: Cell<u64>,
    /// Times an instance left rotation for missing its health checks.
    pub unhealthy: Rc<Cell<u64>>,
    /// Connections (re)established.
    pub connects: Cell<u64>,
}

impl BackendPool {
    /// The pool's counters: (name, help, value), each named once here.
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        vec![
            (
                "backend_connects",
                "Backend connections established (reconnects included).",
                self.connects.get(),
            ),
            (
                "backend_retries",
                "Idempotent requests sent again after their backend connection died.",
                self.retries.get(),
            ),
            (
                "backend_unhealthy",
                "Times a backend connection left rotation for missing health checks.",
                self.unhealthy.get(),
            ),
            (
                "backend_unknown_answers",
                "Backend answers to no pending request (dropped).",
                self.unknown_answers.get(),
            ),
            (
                "backend_timeouts",
                "Requests answered TIMEOUT.",
                self.timeouts.get(),
            ),
            (
                "backend_failed_by_disconnect",
                "Requests failed because their backend connection died.",
                self.failed_by_disconnect.get(),
            ),
        ]
    }
}

fn build(
    spec: Vec<ServiceSpec>,
    reuse: &mut HashMap<(String, SocketAddr, usize), Rc<BackendConn>>,
) -> Vec<Rc<Service>> {
    spec.into_iter()
        .map(|(name, addrs, per)| {
            let instances = addrs
                .into_iter()
                .map(|addr| Instance {
                    addr,
                    conns: (0..per.max(1))
                        .map(|k| {
                            reuse
                                .remove(&(name.clone(), addr, k))
                                .unwrap_or_else(|| Rc::new(BackendConn::new(addr)))
                        })
                        .collect(),
                    cursor: Cell::new(0),
                })
                .collect();
            Rc::new(Service {
                name,
                instances,
                cursor: Cell::new(0),
            })
        })
        .collect()
}

impl BackendPool {
    pub fn new(
        spec: Vec<ServiceSpec>,
        request_timeout: Duration,
        bounds: (usize, usize),
    ) -> BackendPool {
        BackendPool {
            services: RefCell::new(build(spec, &mut HashMap::new())),
            retired: RefCell::new(Vec::new()),
            deadlines: RefCell::new(std::collections::BinaryHeap::new()),
            deadline_wake: shards::Notify::new(),
            groups: RefCell::new(HashMap::new()),
            next_group: Cell::new(1),
            request_timeout: Cell::new(request_timeout),
            bounds: Cell::new(bounds),
            next_ticket: Cell::new(1),
            unknown_answers: Cell::new(0),
            timeouts: Cell::new(0),
            failed_by_disconnect: Cell::new(0),
            retries: Cell::new(0),
            unhealthy: Rc::new(Cell::new(0)),
            connects: Cell::new(0),
        }
    }

    fn unhealthy_counter(&self) -> Rc<Cell<u64>> {
        self.unhealthy.clone()
    }

    /// Every connection, for starting their tasks.
    pub fn connections(&self) -> Vec<Rc<BackendConn>> {
        self.services
            .borrow()
            .iter()
            .flat_map(|s| s.instances.iter().flat_map(|i| i.conns.iter().cloned()))
            .collect()
    }

    /// A new config: connections to instances that stay are kept (with
    /// their requests in flight), those that go are retired, new ones are
    /// returned for their tasks to be started.
    pub fn reload(
        &self,
        spec: Vec<ServiceSpec>,
        request_timeout: Duration,
        bounds: (usize, usize),
    ) -> Vec<Rc<BackendConn>> {
        let mut old: HashMap<(String, SocketAddr, usize), Rc<BackendConn>> = HashMap::new();
        for s in self.services.borrow().iter() {
            for i in &s.instances {
                for (k, c) in i.conns.iter().enumerate() {
                    old.insert((s.name.clone(), i.addr, k), c.clone());
                }
            }
        }
        let before: Vec<*const BackendConn> = old.values().map(Rc::as_ptr).collect();
        let services = build(spec, &mut old);
        let mut retired = self.retired.borrow_mut();
        retired.retain(|c| c.in_flight() > 0);
        for c in old.values() {
            c.retire();
            retired.push(c.clone());
        }
        drop(retired);
        let fresh: Vec<Rc<BackendConn>> = services
            .iter()
            .flat_map(|s| s.instances.iter().flat_map(|i| i.conns.iter().cloned()))
            .filter(|c| !before.contains(&Rc::as_ptr(c)))
            .collect();
        *self.services.borrow_mut() = services;
        self.request_timeout.set(request_timeout);
        self.bounds.set(bounds);
        fresh
    }

    /// Requests waiting for an answer, on every connection (retired ones
    /// included).
    pub fn in_flight(&self) -> usize {
        let retired: usize = self.retired.borrow().iter().map(|c| c.in_flight()).sum();
        self.connections()
            .iter()
            .map(|c| c.in_flight())
            .sum::<usize>()
            + retired
    }

    /// (up, unhealthy, down) connection counts.
    pub fn health(&self) -> (u64, u64, u64) {
        let (mut up, mut sick, mut down) = (0, 0, 0);
        for c in self.connections() {
            match (c.state(), c.healthy.get()) {
                (ConnState::Up, true) => up += 1,
                (ConnState::Up, false) => sick += 1,
                _ => down += 1,
            }
        }
        (up, sick, down)
    }

    fn has_room(&self) -> impl Fn(&BackendConn) -> bool {
        let (max_inflight, max_queue) = self.bounds.get();
        move |c: &BackendConn| c.in_flight() < max_inflight && c.out.borrow().queued() < max_queue
    }

    /// Send a request to `route.service`: one instance chosen by the
    /// route's balancing, or every instance for a broadcast route. On
    /// error nothing was sent and the caller answers the client with it.
    pub fn send(
        &self,
        route: &crate::router::Route,
        header: &Header,
        body: &Bytes,
        mut pending: Pending,
    ) -> Result<(), crate::error::Error> {
        use crate::error::Error;
        let service = self
            .services
            .borrow()
            .get(route.service)
            .cloned()
            .ok_or_else(|| Error::not_sent(Code::NoRoute, "the route's service is gone"))?;
        let room = self.has_room();
        let deadline = Instant::now() + self.request_timeout.get();
        if route.idempotent {
            pending.retry = Some(Rc::new(Retry {
                service: service.name.clone(),
                balance: route.balance,
                msg_id: header.msg_id,
                body: body.clone(),
                deadline,
            }));
        }
        let refusal = || {
            // Reachable instances, all full: the gateway refuses for load.
            if service.instances.iter().any(Instance::reachable) {
                Error::not_sent(Code::Overloaded, "every instance of the service is full")
            } else {
                Error::not_sent(
                    Code::BackendUnavailable,
                    "no instance of the service is reachable",
                )
            }
        };
        if route.balance == crate::config::Balance::Broadcast {
            let targets: Vec<Rc<BackendConn>> = service
                .instances
                .iter()
                .filter_map(|i| i.conn(&room).cloned())
                .collect();
            if targets.is_empty() {
                return Err(refusal());
            }
            let gid = self.next_group.get();
            self.next_group.set(gid + 1);
            self.groups.borrow_mut().insert(
                gid,
                Group {
                    remaining: targets.len(),
                    delivered: false,
                },
            );
            pending.group = gid;
            for conn in targets {
                self.send_on(&conn, header.msg_id, body, pending.clone(), deadline);
            }
            return Ok(());
        }
        let n = service.instances.len();
        let i = crate::router::pick(
            route.balance,
            pending.asker.player,
            n,
            &service.cursor,
            |i| service.instances[i].has_conn(&room),
        )
        .ok_or_else(refusal)?;
        let conn = service.instances[i]
            .conn(&room)
            .cloned()
            .ok_or_else(refusal)?;
        self.send_on(&conn, header.msg_id, body, pending, deadline);
        Ok(())
    }

    fn send_on(
        &self,
        conn: &Rc<BackendConn>,
        msg_id: u32,
        body: &[u8],
        mut pending: Pending,
        deadline: Instant,
    ) {
        let player = pending.asker.player;
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
            msg_id,
            req_id,
            seq: player,
        };
        conn.out.borrow().push(|out| encode(out, &h, body));
        let mut deadlines = self.deadlines.borrow_mut();
        if deadlines.peek().is_none_or(|d| deadline < d.at) {
            self.deadline_wake.notify();
        }
        deadlines.push(Deadline {
            at: deadline,
            conn: conn.clone(),
            req_id,
            ticket,
        });
        // Answered requests leave their entry until it falls due; when
        // they far outnumber the live ones, drop them in one pass.
        if deadlines.len() > 4096 && deadlines.len() > 4 * self.in_flight() {
            deadlines.retain(|d| {
                d.conn
                    .pending
                    .borrow()
                    .get(&d.req_id)
                    .is_some_and(|p| p.ticket == d.ticket)
            });
        }
    }

    /// A request whose connection died: send it again to another instance
    /// if its route is idempotent and its deadline has not passed;
    /// otherwise hand it back to be answered.
    pub fn retry(&self, p: Pending) -> Result<(), Pending> {
        let Some(r) = p.retry.clone() else {
            return Err(p);
        };
        if Instant::now() >= r.deadline || p.group != 0 {
            return Err(p);
        }
        let Some(service) = self
            .services
            .borrow()
            .iter()
            .find(|s| s.name == r.service)
            .cloned()
        else {
            return Err(p);
        };
        let room = self.has_room();
        let n = service.instances.len();
        let Some(i) = crate::router::pick(r.balance, p.asker.player, n, &service.cursor, |i| {
            service.instances[i].has_conn(&room)
        }) else {
            return Err(p);
        };
        let Some(conn) = service.instances[i].conn(&room).cloned() else {
            return Err(p);
        };
        self.retries.set(self.retries.get() + 1);
        self.send_on(&conn, r.msg_id, &r.body.clone(), p, r.deadline);
        Ok(())
    }

    /// One answer of broadcast group `gid`: the first success is delivered,
    /// later answers dropped; when all failed, the last failure is delivered.
    pub fn group_answer(&self, gid: u64, a: Answer) -> GroupVerdict {
        let mut groups = self.groups.borrow_mut();
        let Some(g) = groups.get_mut(&gid) else {
            return GroupVerdict::Drop;
        };
        g.remaining = g.remaining.saturating_sub(1);
        let verdict = if g.delivered {
            GroupVerdict::Drop
        } else if a.code == 0 || g.remaining == 0 {
            g.delivered = true;
            GroupVerdict::Deliver(a)
        } else {
            GroupVerdict::Drop
        };
        if g.remaining == 0 {
            groups.remove(&gid);
        }
        verdict
    }

    /// Pop every request whose deadline passed and is still pending.
    pub fn expired(&self, now: Instant) -> Vec<Pending> {
        let mut out = Vec::new();
        let mut deadlines = self.deadlines.borrow_mut();
        while deadlines.peek().is_some_and(|d| d.at <= now) {
            let Some(d) = deadlines.pop() else { break };
            let mut pending = d.conn.pending.borrow_mut();
            if pending.get(&d.req_id).is_some_and(|p| p.ticket == d.ticket) {
                if let Some(p) = pending.remove(&d.req_id) {
                    out.push(p);
                }
                if pending.is_empty() && d.conn.retired.get() {
                    // Its last request ended by deadline: let it close.
                    d.conn.retire_wake.notify();
                }
            }
        }
        self.timeouts.set(self.timeouts.get() + out.len() as u64);
        out
    }

    /// When the earliest deadline falls (None: no request in flight).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.borrow().peek().map(|d| d.at)
    }

    /// Resolves when a deadline earlier than all others is added.
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
            sink.on_answer(p, a);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A request of session 1 (msg_id 1) for `player`.
    fn asker(player: u64, req_id: u32) -> Asker {
        Asker {
            session: 1,
            player,
            life: 0,
            req_id,
            msg_id: 1,
            login: false,
        }
    }
    use crate::config::Balance;
    use crate::router::Route;

    fn route(balance: Balance) -> Route {
        Route {
            first: 1,
            last: 1,
            service: 0,
            auth: false,
            login: false,
            balance,
            idempotent: false,
        }
    }

    #[test]
    fn every_connection_of_an_instance_takes_requests() {
        let addr: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let pool = BackendPool::new(
            vec![("s".into(), vec![addr], 2)],
            Duration::from_secs(5),
            (100, 1 << 20),
        );
        for balance in [Balance::RoundRobin, Balance::HashPlayer] {
            for i in 0..10 {
                let p = Pending::new(asker(7, i));
                pool.send(
                    &route(balance),
                    &Header::new(Kind::Request),
                    &Bytes::new(),
                    p,
                )
                .expect("send");
            }
        }
        let per: Vec<usize> = pool.connections().iter().map(|c| c.in_flight()).collect();
        assert_eq!(per, vec![10, 10], "requests spread over both connections");
    }

    #[test]
    fn the_earliest_deadline_comes_first_whatever_the_order() {
        let addr: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let pool = BackendPool::new(
            vec![("s".into(), vec![addr], 1)],
            Duration::from_secs(3),
            (100, 1 << 20),
        );
        let send = |req| {
            pool.send(
                &route(Balance::RoundRobin),
                &Header::new(Kind::Request),
                &Bytes::new(),
                Pending::new(asker(0, req)),
            )
            .expect("send")
        };
        send(1);
        let late = pool.next_deadline().expect("deadline");
        pool.reload(
            vec![("s".into(), vec![addr], 1)],
            Duration::from_millis(300),
            (100, 1 << 20),
        );
        send(2);
        let early = pool.next_deadline().expect("deadline");
        assert!(
            early + Duration::from_secs(2) < late,
            "the shorter timeout is due first"
        );
        let gone = pool.expired(early);
        assert_eq!(
            gone.iter().map(|p| p.asker.req_id).collect::<Vec<_>>(),
            vec![2]
        );
    }
}
