//! One shard of the gateway, the shell around its [`Core`]: the glommio
//! side that feeds the core its inputs (frames, answers, timers, mesh and
//! admin commands, each with `now`) and carries out its outputs (wake a
//! session's tasks, send a request to a backend, tell the cluster). Every
//! call runs on the shard's own thread and never awaits; other shards are
//! reached by [`ShardMsg`] over the mesh.
//!
//! Nothing here decides a protocol rule: that is the core's. What stays is
//! what moves bytes and tasks: the session tasks' handles, the backend
//! pool, the mesh, the cluster bridge ([`cluster`]).
//!
//! Why one file of this length: `ShardCtx` is one struct whose fields and
//! thin wrappers over the core belong together; the flows that use it
//! (connections, accept, cluster, upgrade, output) are in submodules.

pub mod accept;
mod admin;
pub mod cluster;
pub mod conn;
pub mod handshake;
mod log;
mod msg;
mod output;
pub mod upgrade;

pub use crate::core::{PlayerInfo, PushCounts, Step};
pub use msg::{Arrival, DrainReport, GatewayEvent, Handoff, LoginReply, ShardMsg};

use crate::backend::{Answer, AnswerSink, BackendPool, Pending};
use crate::config::Config;
use crate::core::{ClusterOut, Core, Forward, Lifecycle, Stats, Transmit};
use crate::protocol::{Code, Decoder, Frame, Link};
use crate::router::Router;
use crate::session::{CloseReason, SessionId};
use std::cell::{Cell, Ref, RefCell};
// foldhash: the keys are ids, hashed on every frame; SipHash cost 6% of
// the relay's CPU (docs/PERFORMANCE.md). Seeded per process.
use crate::net::SharedStream;
use foldhash::{HashMap, HashMapExt};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Instant;

pub use crate::session::MAX_RESUME_FAILURES;

/// The tasks of one session the core may ask to wake.
struct Tasks {
    /// The read loop: looks at [`ShardCtx::next_step`].
    reader: Rc<shards::Notify>,
    /// The connection's socket, for writes straight from a batch's end
    /// (open while the session is registered).
    stream: SharedStream,
    /// The task writing what the socket did not take at once (see
    /// [`conn::write_backlog`]): there is none while the socket keeps up,
    /// and dropping the handle (the session ends) cancels it.
    writer: Option<glommio::Task<()>>,
    /// `writer` is still running.
    writing: bool,
    /// Listed in [`ShardCtx::dirty`].
    dirty: bool,
}

/// Everything one shard owns.
pub struct ShardCtx {
    pub id: usize,
    pub count: usize,
    /// The rules and tables (sessions, players): borrowed for one call at a
    /// time, never across an await.
    core: RefCell<Core>,
    tasks: RefCell<HashMap<SessionId, Tasks>>,
    /// Sessions with output queued during the batch being handled: written
    /// once each when it ends (see [`ShardCtx::write_dirty`]).
    dirty: RefCell<Vec<SessionId>>,
    pub backends: BackendPool,
    pub mesh: shards::Mesh<ShardMsg>,
    pub stop: shards::StopToken,
    client_decoder: Cell<Decoder>,
    /// The instant of the batch being handled (see [`ShardCtx::at`]); None
    /// between batches, when every call reads the clock.
    clock: Cell<Option<Instant>>,
    /// Open client connections of the whole gateway (once per connect and
    /// close, never per frame).
    pub connections: Arc<AtomicUsize>,
    /// Open HTTP connections of the whole gateway.
    pub http_connections: Arc<AtomicUsize>,
    /// Woken when a drain begins (the accept loop stops).
    pub drain_started: shards::Notify,
    /// Client connections the open-files limit allows at most (read at
    /// start): `max_connections` is cut to it, so the HTTP API keeps its
    /// descriptors when the client port is full.
    pub fd_cap: usize,
    /// The most the outboxes and buffers held since the heap was last
    /// trimmed, and when that was (see `tick`).
    heap_peak: std::cell::Cell<usize>,
    last_trim: std::cell::Cell<Option<Instant>>,
    trims_due: std::cell::Cell<u8>,
    /// Woken when a drain is forced.
    pub force_wake: shards::Notify,
    /// Where `POST /v1/drain` goes (the process's coordinator).
    pub events: Option<flume::Sender<GatewayEvent>>,
    /// The cluster's control threads (None: this gateway alone).
    pub cluster: Option<crate::cluster::runtime::ClusterHandle>,
    /// What each listener puts on its new connections (TLS, WebSocket); a
    /// reload replaces it for connections accepted after.
    pub wires: RefCell<crate::wire::Wires>,
    /// This context's own `Rc`, for tasks it spawns.
    pub this: RefCell<std::rc::Weak<ShardCtx>>,
    /// The client ports' accept loops may accept (open at once, unless
    /// the listeners were inherited from a process being upgraded).
    pub accept_clients: accept::Latch,
    /// The same for the HTTP port.
    pub accept_http: accept::Latch,
    /// Every accept loop ends after the accept it has armed (an upgrade:
    /// the new process accepts from now on).
    pub stop_accepting: accept::Latch,
    /// Opened once an upgrade has moved everything: HTTP connections
    /// close between requests.
    pub http_quit: accept::Latch,
    /// An upgrade's coordinator (old process): pushes for players the new
    /// process holds go there.
    pub upgrade_to: RefCell<Option<flume::Sender<crate::upgrade::Event>>>,
    /// Accept loops running in the whole gateway.
    pub accepting: Arc<std::sync::atomic::AtomicUsize>,
    /// Sessions on their way to a new process (a live upgrade).
    leavers: RefCell<upgrade::Leavers>,
    /// The live upgrade that started this process, once done (metrics).
    pub upgraded: Arc<std::sync::OnceLock<crate::upgrade::Taken>>,
}

impl ShardCtx {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: usize,
        count: usize,
        cfg: Rc<Config>,
        mesh: shards::Mesh<ShardMsg>,
        stop: shards::StopToken,
        connections: Arc<AtomicUsize>,
        http_connections: Arc<AtomicUsize>,
        cluster: Option<crate::cluster::runtime::ClusterHandle>,
    ) -> ShardCtx {
        let router = Router::new(&cfg);
        let backends = BackendPool::new(
            service_specs(&cfg, &router),
            cfg.backend.request_timeout,
            (cfg.limits.backend_inflight, cfg.limits.backend_queue_bytes),
        );
        let core = Core::new(
            id,
            count,
            cfg.clone(),
            cluster.is_some(),
            Box::new(OsEntropy),
            Instant::now(),
        );
        ShardCtx {
            id,
            count,
            client_decoder: Cell::new(Decoder::new(Link::ClientToGateway, cfg.max_frame)),
            clock: Cell::new(None),
            core: RefCell::new(core),
            tasks: RefCell::new(HashMap::new()),
            dirty: RefCell::new(Vec::new()),
            backends,
            mesh,
            stop,
            connections,
            http_connections,
            drain_started: shards::Notify::new(),
            fd_cap: crate::limits::client_fd_cap(cfg.http.max_connections).unwrap_or(usize::MAX),
            heap_peak: Default::default(),
            last_trim: Default::default(),
            trims_due: Default::default(),
            force_wake: shards::Notify::new(),
            events: None,
            cluster,
            wires: RefCell::new(crate::wire::Wires::default()),
            this: RefCell::new(std::rc::Weak::new()),
            accept_clients: Default::default(),
            accept_http: Default::default(),
            stop_accepting: Default::default(),
            http_quit: Default::default(),
            upgrade_to: RefCell::new(None),
            upgraded: Default::default(),
            accepting: Default::default(),
            leavers: Default::default(),
        }
    }

    /// The time: the batch's instant inside [`ShardCtx::at`], else the clock.
    pub fn now(&self) -> Instant {
        self.clock.get().unwrap_or_else(Instant::now)
    }

    /// Run `f` (synchronous: no await can hide inside) with every call on
    /// this shard seeing `now` as the time. What one read brought (a batch
    /// of client frames, of backend answers) is handled at one instant: a
    /// clock read per frame cost 4-5% of the relay's CPU on this project's
    /// machine (docs/PERFORMANCE.md).
    pub fn at<R>(&self, now: Instant, f: impl FnOnce() -> R) -> R {
        struct Restore<'a>(&'a Cell<Option<Instant>>, Option<Instant>);
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                self.0.set(self.1);
            }
        }
        let outer = self.clock.replace(Some(now));
        let _restore = Restore(&self.clock, outer);
        let r = f();
        if outer.is_none() {
            self.write_dirty();
        }
        r
    }

    /// Run `f` on the core with `now`, then carry out what it asked for.
    fn with<R>(&self, f: impl FnOnce(&mut Core, Instant) -> R) -> R {
        let r = f(&mut self.core.borrow_mut(), self.now());
        self.flush();
        r
    }

    /// As [`ShardCtx::with`], for an event of one session: a panic while
    /// the core handles it closes that session (counted, logged) and the
    /// shard goes on serving everyone else. `R::default()` is the result
    /// of a call that panicked.
    fn guarded<R: Default>(&self, sid: SessionId, f: impl FnOnce(&mut Core, Instant) -> R) -> R {
        use std::panic::{catch_unwind, AssertUnwindSafe};
        // The RefMut is dropped while unwinding: the core is not left borrowed.
        let now = self.now();
        let r = catch_unwind(AssertUnwindSafe(|| f(&mut self.core.borrow_mut(), now)));
        let r = match r {
            Ok(r) => r,
            Err(_) => {
                let closed = catch_unwind(AssertUnwindSafe(|| {
                    self.core.borrow_mut().handle_panic(sid, now)
                }));
                if closed.is_err() {
                    tracing::error!(
                        session = sid,
                        "closing a session after a panic panicked too"
                    );
                }
                R::default()
            }
        };
        self.flush();
        r
    }

    /// Carry out the core's outputs; outside a batch, write what they
    /// queued at once.
    fn flush(&self) {
        self.carry_out();
        if self.clock.get().is_none() {
            self.write_dirty();
        }
    }

    /// Carry out the core's outputs until it has none.
    fn carry_out(&self) {
        loop {
            let (wake, forward, cluster) = {
                let mut c = self.core.borrow_mut();
                if !c.has_output() {
                    return;
                }
                while let Some(e) = c.poll_event() {
                    log::log(self.id, &e);
                }
                (c.poll_wake(), c.poll_forward(), c.poll_cluster())
            };
            if let Some(w) = wake {
                if let Some(t) = self.tasks.borrow().get(&w.sid) {
                    if w.reader {
                        t.reader.notify();
                    }
                }
                if w.writer {
                    self.mark_dirty(w.sid);
                }
            }
            if let Some(f) = forward {
                self.forward(f);
            }
            if let Some(c) = cluster {
                self.to_cluster(c);
            }
        }
    }

    fn forward(&self, f: Forward) {
        let a = f.asker;
        let now = self.now();
        let pending = Pending::new(a, now);
        let since = f.read_at.unwrap_or(now);
        if let Err(err) = self
            .backends
            .send_from(&f.route, &f.header, &f.body, pending, now, since)
        {
            self.core.borrow_mut().handle_not_sent(a, err, now);
        }
    }

    fn to_cluster(&self, out: ClusterOut) {
        let Some(cluster) = self.cluster.clone() else {
            return;
        };
        use crate::cluster::runtime::Cmd;
        match out {
            ClusterOut::Claim { sid, arrival } => match self.this.borrow().upgrade() {
                Some(ctx) => {
                    glommio::spawn_local(cluster::arrive_clustered(ctx, cluster, sid, arrival))
                        .detach();
                }
                None => self.claimed(
                    sid,
                    arrival,
                    Err(crate::error::Error::cluster("the shard is stopping")),
                ),
            },
            ClusterOut::Release { player } => {
                let _ = cluster.cmds.send(Cmd::Release { player });
            }
            ClusterOut::Give { player, to, image } => {
                let _ = cluster.cmds.send(Cmd::Give { player, to, image });
            }
            ClusterOut::Refuse { player, to } => {
                tracing::info!(player, to, "takeover refused: online here (RejectNew)");
                let _ = cluster.cmds.send(Cmd::Refuse { player, to });
            }
        }
    }

    /// The counters (read, or bumped by the shell's own events).
    pub fn stats(&self) -> Ref<'_, Stats> {
        Ref::map(self.core.borrow(), |c| &c.stats)
    }

    /// The per-route and per-code metrics.
    pub fn metrics(&self) -> Ref<'_, crate::metrics::Metrics> {
        Ref::map(self.core.borrow(), |c| &c.metrics)
    }

    // ----- config --------------------------------------------------------

    /// The config now (a reload may replace it between two calls).
    pub fn cfg(&self) -> Rc<Config> {
        self.core.borrow().cfg()
    }

    /// The route table now.
    pub fn router(&self) -> Rc<Router> {
        self.core.borrow().router()
    }

    /// The decoder of client frames (its max_frame follows reloads).
    pub fn client_decoder(&self) -> Decoder {
        self.client_decoder.get()
    }

    /// Apply a reloaded config: routes, services, limits and timeouts
    /// change; sessions, players and requests in flight stay. Returns the
    /// new backend connections, whose tasks the caller starts.
    pub fn reload(&self, cfg: Rc<Config>) -> Vec<Rc<crate::backend::BackendConn>> {
        let router = Router::new(&cfg);
        let fresh = self.backends.reload(
            service_specs(&cfg, &router),
            cfg.backend.request_timeout,
            (cfg.limits.backend_inflight, cfg.limits.backend_queue_bytes),
        );
        self.client_decoder
            .set(Decoder::new(Link::ClientToGateway, cfg.max_frame));
        self.core.borrow_mut().reload(cfg, Rc::new(router));
        fresh
    }

    // ----- lifecycle -----------------------------------------------------

    pub fn lifecycle(&self) -> Lifecycle {
        self.core.borrow().lifecycle()
    }

    pub fn is_draining(&self) -> bool {
        self.core.borrow().is_draining()
    }

    pub fn is_drained(&self) -> bool {
        self.core.borrow().is_drained()
    }

    pub fn is_forced(&self) -> bool {
        self.core.borrow().is_forced()
    }

    /// Begin a drain (forced or not), or force the one going on. Returns
    /// true when this call began it.
    pub fn drain(&self, force: bool) -> bool {
        let began = self.core.borrow_mut().drain(force);
        if began {
            self.drain_started.notify();
        }
        if force {
            self.force_wake.notify();
        }
        began
    }

    /// The players went to the drain's report.
    pub fn drained(&self) {
        self.core.borrow_mut().drained();
    }

    // ----- sessions --------------------------------------------------------

    /// Register a new session; its read loop and writer wait on the two
    /// notifiers.
    pub fn add_session(
        &self,
        peer: SocketAddr,
        stream: SharedStream,
        reader: Rc<shards::Notify>,
    ) -> SessionId {
        let sid = self.core.borrow_mut().add_session(self.now());
        tracing::debug!(session = sid, %peer, "session registered");
        self.tasks.borrow_mut().insert(
            sid,
            Tasks {
                reader,
                stream,
                writer: None,
                writing: false,
                dirty: false,
            },
        );
        sid
    }

    /// Forget a session whose connection is gone (or moved).
    pub fn remove_session(&self, sid: SessionId) -> (Option<u64>, CloseReason) {
        self.tasks.borrow_mut().remove(&sid);
        self.with(|c, now| c.remove_session(sid, now))
    }

    pub fn is_closing(&self, sid: SessionId) -> bool {
        self.core.borrow().is_closing(sid)
    }

    pub fn session_count(&self) -> usize {
        self.core.borrow().session_count()
    }

    pub fn player_count(&self) -> usize {
        self.core.borrow().player_count()
    }

    /// `sid`'s read buffer holds `bytes` for a frame begun and not whole
    /// (0: no more).
    pub fn partial_frame(&self, sid: SessionId, bytes: usize) {
        self.core
            .borrow_mut()
            .handle_partial_frame(sid, bytes, self.now());
    }

    /// What the read loop of `sid` must do now.
    pub fn next_step(&self, sid: SessionId) -> Step {
        self.guarded(sid, |c, now| c.next_step(sid, now))
    }

    /// What the writer of `sid` writes next.
    pub fn poll_transmit(&self, sid: SessionId) -> Transmit {
        self.core.borrow_mut().poll_transmit(sid)
    }

    /// The writer wrote what it took (or failed to).
    pub fn written(&self, sid: SessionId, ok: bool) {
        self.with(|c, now| c.handle_written(sid, ok, now));
    }

    /// Stop `sid`'s writer once what is queued is written (the connection
    /// closes or moves).
    pub fn finish_output(&self, sid: SessionId) {
        self.with(|c, _| c.finish_output(sid));
    }

    /// A connection handed over by another shard, registered here as `sid`.
    pub fn accept_handoff(&self, sid: SessionId, arrival: Arrival) {
        self.with(|c, now| c.handle_handoff(sid, arrival, now));
    }

    /// The cluster's answer to a claim.
    pub fn claimed(
        &self,
        sid: SessionId,
        arrival: Arrival,
        claim: Result<(), crate::error::Error>,
    ) {
        self.with(|c, now| c.handle_claimed(sid, arrival, claim, now));
    }

    /// One frame from a client.
    pub fn on_client_frame(&self, sid: SessionId, frame: Frame) {
        self.guarded(sid, |c, now| c.handle_frame(sid, frame, now));
    }

    /// A frame that could not be decoded arrived on `sid`.
    pub fn protocol_error(&self, sid: SessionId, why: &dyn std::fmt::Display) {
        let err = crate::error::Error::protocol(why.to_string());
        self.guarded(sid, |c, now| c.handle_protocol_error(sid, err, now));
    }

    /// Close without a KICK (end of stream, read error).
    pub fn close(&self, sid: SessionId, reason: CloseReason) {
        self.with(|c, now| c.handle_close(sid, reason, now));
    }

    pub fn kick(&self, sid: SessionId, code: Code) {
        self.with(|c, now| c.handle_kick(sid, code, now));
    }

    /// Kick every session (the gateway is stopping).
    pub fn kick_all(&self, code: Code) {
        self.with(|c, now| c.kick_all(code, now));
    }

    /// The sweep timer. After a burst (outboxes and connection buffers
    /// holding [`TRIM_AFTER`] less than at their peak) freed heap memory
    /// goes back to the kernel, at most every [`TRIM_EVERY`].
    pub fn tick(&self) {
        let (held, peak) = self.with(|c, now| {
            c.handle_tick(now);
            if let Some(cl) = &self.cluster {
                cl.load.set_players(self.id, c.player_count());
            }
            c.take_held()
        });
        let peak = self.heap_peak.get().max(peak);
        let now = Instant::now();
        let due = self
            .last_trim
            .get()
            .is_none_or(|t| now.saturating_duration_since(t) >= TRIM_EVERY);
        if peak - held >= TRIM_AFTER {
            // This trim and one more: what a burst's last connections
            // held is freed only as they finish closing.
            self.trims_due.set(2);
            self.heap_peak.set(held);
        } else {
            self.heap_peak.set(peak);
        }
        if due && self.trims_due.get() > 0 {
            crate::limits::trim_heap();
            self.last_trim.set(Some(now));
            self.trims_due.set(self.trims_due.get() - 1);
        }
    }
}

/// How much less than at their peak the outboxes and buffers must hold
/// before freed heap memory is given back to the kernel.
const TRIM_AFTER: usize = 8 << 20;
/// The most often the heap is trimmed.
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Token secrets from the OS CSPRNG.
struct OsEntropy;

impl crate::core::Entropy for OsEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        if let Err(e) = getrandom::getrandom(buf) {
            // Without randomness a token could be guessed: better to stop
            // than to hand out weak tokens.
            tracing::error!("the OS random source failed: {e}");
            std::process::abort();
        }
    }
}

/// The backend services of `cfg`, in `router`'s service order.
pub fn service_specs(cfg: &Config, router: &Router) -> Vec<crate::backend::ServiceSpec> {
    router
        .services()
        .iter()
        .map(|name| {
            let (addrs, per) = cfg
                .services
                .get(name)
                .map(|s| {
                    (
                        s.instances.iter().filter_map(|a| a.parse().ok()).collect(),
                        s.connections,
                    )
                })
                .unwrap_or_default();
            (name.clone(), addrs, per)
        })
        .collect()
}

impl AnswerSink for ShardCtx {
    fn on_answer(&self, p: Pending, a: Answer, now: Instant) {
        self.at(now, || self.answer(p, a, now));
    }

    fn batch<R>(&self, now: Instant, f: impl FnOnce() -> R) -> R {
        self.at(now, f)
    }
}

impl ShardCtx {
    fn answer(&self, p: Pending, a: Answer, now: Instant) {
        if a.from_backend {
            self.metrics().backend_latency(p.elapsed(now));
        }
        // A broadcast request gets one answer from all its instances.
        let a = if p.group != 0 {
            match self.backends.group_answer(p.group, a) {
                crate::backend::GroupVerdict::Deliver(a) => a,
                crate::backend::GroupVerdict::Drop => return,
            }
        } else {
            a
        };
        let asker = p.asker;
        self.guarded(asker.session, |c, now| c.handle_answer(asker, a, now));
    }
}
