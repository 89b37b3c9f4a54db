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
//! Files: this one holds the pool (services, instances, choosing a
//! connection, the pending table's send/answer/timeout paths and broadcast
//! groups); `conn.rs` one connection's state and the task that drives it;
//! `deadline.rs` the ordered deadline queue.

mod conn;
mod deadline;
#[cfg(test)]
mod tests;

pub use conn::{run_connection, AnswerSink, BackendConn, ConnState, LinkSettings};
use deadline::{Deadline, DeadlineQueue};

use crate::protocol::{encode, Code, Header, Kind};
use bytes::Bytes;
use std::cell::{Cell, RefCell};
// foldhash: the keys are ids, hashed on every frame; SipHash cost 6% of
// the relay's CPU (docs/PERFORMANCE.md). Seeded per process.
use foldhash::{HashMap, HashMapExt};
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
    /// A pending request of `asker`, made `now`; the pool fills in the rest.
    pub fn new(asker: Asker, now: Instant) -> Pending {
        Pending {
            asker,
            ticket: 0,
            sent_at: now,
            group: 0,
            retry: None,
        }
    }

    /// Time from when it was sent to `now`.
    pub fn elapsed(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.sent_at)
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
/// All backend connections of one shard.
pub struct BackendPool {
    /// In router service order; replaced whole by a config reload.
    services: RefCell<Vec<Rc<Service>>>,
    /// Connections a reload removed, until their last requests are answered.
    retired: RefCell<Vec<Rc<BackendConn>>>,
    deadlines: RefCell<DeadlineQueue>,
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
            deadlines: RefCell::new(DeadlineQueue::default()),
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

    /// Whether a connection takes one more request. A request of a
    /// session with nothing else in flight (`light`) may use a reserve of
    /// as much again past the bounds: a flood of a few clients fills a
    /// backend connection to its bounds, and every other player's next
    /// request still goes (the flood's are refused OVERLOADED).
    fn has_room(&self, light: bool) -> impl Fn(&BackendConn) -> bool {
        let (max_inflight, max_queue) = self.bounds.get();
        let k = if light { 2 } else { 1 };
        move |c: &BackendConn| {
            c.in_flight() < max_inflight.saturating_mul(k)
                && c.out.borrow().queued() < max_queue.saturating_mul(k)
        }
    }

    /// Send a request to `route.service`: one instance chosen by the
    /// route's balancing, or every instance for a broadcast route. On
    /// error nothing was sent and the caller answers the client with it.
    /// `now` is the time it is sent (its deadline counts from it).
    pub fn send(
        &self,
        route: &crate::router::Route,
        header: &Header,
        body: &Bytes,
        pending: Pending,
        now: Instant,
    ) -> Result<(), crate::error::Error> {
        self.send_from(route, header, body, pending, now, now)
    }

    /// [`send`](Self::send), its deadline counting from `since` (a request
    /// that waited in an order group before it could go keeps the
    /// deadline it had from when it was read).
    pub fn send_from(
        &self,
        route: &crate::router::Route,
        header: &Header,
        body: &Bytes,
        mut pending: Pending,
        now: Instant,
        since: Instant,
    ) -> Result<(), crate::error::Error> {
        use crate::error::Error;
        let service = self
            .services
            .borrow()
            .get(route.service)
            .cloned()
            .ok_or_else(|| Error::not_sent(Code::NoRoute, "the route's service is gone"))?;
        let room = self.has_room(pending.asker.light);
        let deadline = since.min(now) + self.request_timeout.get();
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
                self.send_on(&conn, header.msg_id, body, pending.clone(), deadline, now);
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
        self.send_on(&conn, header.msg_id, body, pending, deadline, now);
        Ok(())
    }

    fn send_on(
        &self,
        conn: &Rc<BackendConn>,
        msg_id: u32,
        body: &[u8],
        mut pending: Pending,
        deadline: Instant,
        now: Instant,
    ) {
        let player = pending.asker.player;
        let req_id = conn.alloc_req_id();
        let ticket = self.next_ticket.get();
        self.next_ticket.set(ticket + 1);
        pending.ticket = ticket;
        pending.sent_at = now;
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
        let now = Instant::now();
        if now >= r.deadline || p.group != 0 {
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
        let room = self.has_room(p.asker.light);
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
        self.send_on(&conn, r.msg_id, &r.body.clone(), p, r.deadline, now);
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
