//! One shard of the gateway: the tables it owns (sessions, players, route
//! table, backend pool) and the handlers that change them. Every handler runs
//! on the shard's own thread, never awaits, and touches only this shard's
//! state; other shards are reached by [`ShardMsg`] over the mesh.
//!
//! Borrow discipline: `sessions` and `players` are separate `RefCell`s; a
//! handler may hold both at once but never calls another handler while it
//! holds either.

use crate::backend::{Answer, AnswerSink, BackendPool, Pending};
use crate::config::Config;
use crate::net::Outbound;
use crate::player::{token_player, Player, ResumeError, SECRET_LEN};
use crate::protocol::{encode, session_body, Code, Decoder, Frame, Header, Kind, Link};
use crate::router::Router;
use crate::session::{Decision, Next, Session, SessionId};
use bytes::{Bytes, BytesMut};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Instant;

/// Messages between shards.
pub enum ShardMsg {
    /// A connection moving to its player's home shard.
    Handoff(Box<Handoff>),
    /// Ask the home shard of `player` for its state.
    PlayerInfo {
        player: u64,
        reply: flume::Sender<Option<PlayerInfo>>,
    },
    /// One PUSH to each of `players` (all homed on the receiving shard).
    Push {
        players: Vec<u64>,
        msg_id: u32,
        body: Bytes,
        /// None: refused (the shard has drained; its players are gone).
        reply: flume::Sender<Option<PushCounts>>,
    },
    /// One PUSH to every player the receiving shard holds.
    Broadcast {
        msg_id: u32,
        body: Bytes,
        reply: flume::Sender<Option<PushCounts>>,
    },
    /// `KICK ADMIN` to the session of `player`.
    Kick {
        player: u64,
        reply: flume::Sender<bool>,
    },
    /// Up to `limit` players with id > `after`, ascending.
    ListPlayers {
        after: u64,
        limit: usize,
        reply: flume::Sender<Vec<PlayerInfo>>,
    },
    /// The shard's metrics now.
    Metrics {
        reply: flume::Sender<crate::metrics::Snapshot>,
    },
    /// Apply a reloaded config (the fields that need a restart are kept
    /// as they were); the shard answers when done.
    Reload {
        cfg: Arc<Config>,
        reply: flume::Sender<usize>,
    },
    /// Another gateway takes `player` over: let it go to gateway `to`.
    GiveAway { player: u64, to: String },
    /// A player migrated here: load it.
    Adopt {
        image: crate::snapshot::Image,
        reply: flume::Sender<()>,
    },
    /// Move every player of the receiving shard to gateway `to`; the
    /// answer is (migrated, failed).
    Evacuate {
        to: String,
        reply: flume::Sender<(u64, u64)>,
    },
    /// Move `player` to gateway `to` (an operator's migration); the answer
    /// is the target's client address.
    Migrate {
        player: u64,
        to: String,
        reply: flume::Sender<Result<String, String>>,
    },
    /// Drain (or, with `force`, stop draining and finish now); the shard
    /// answers once, with its players.
    Drain {
        force: bool,
        reply: flume::Sender<DrainReport>,
    },
}

/// A shard's life: it serves, then drains (forced: finish now), then has
/// handed its players over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Running,
    Draining { forced: bool },
    Drained,
}

impl Lifecycle {
    /// A drain asked for (forced or not): the next state, and whether this
    /// began the drain. A drain only moves forward.
    pub fn drain(self, force: bool) -> (Lifecycle, bool) {
        match self {
            Lifecycle::Running => (Lifecycle::Draining { forced: force }, true),
            Lifecycle::Draining { forced } => (
                Lifecycle::Draining {
                    forced: forced || force,
                },
                false,
            ),
            Lifecycle::Drained => (Lifecycle::Drained, false),
        }
    }
}

/// What a shard hands the coordinator at the end of a drain.
#[derive(Debug)]
pub struct DrainReport {
    pub shard: usize,
    /// Everything finished within the deadline, nothing forced.
    pub clean: bool,
    pub players: Vec<crate::snapshot::PlayerImage>,
}

/// Events a shard raises for the process (the coordinator).
#[derive(Debug, Clone)]
pub enum GatewayEvent {
    /// `POST /v1/drain`.
    DrainRequested,
    /// A stop signal (SIGTERM, SIGINT).
    Signal(i32),
    /// Re-read the config file (SIGHUP, `POST /v1/reload`); the outcome
    /// goes to the sender, if any.
    Reload(Option<flume::Sender<Result<(), String>>>),
}

/// What a push did, player by player (PROTOCOL.md section 5).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushCounts {
    /// Players with a live session: the frame is queued to it.
    pub delivered: u64,
    /// Players held without a session: the frame waits in the outbox.
    pub cached: u64,
    /// Players not held here: dropped.
    pub offline: u64,
    /// Which players were offline here (a cluster forwards to their holder).
    pub offline_players: Vec<u64>,
}

impl PushCounts {
    pub fn add(&mut self, o: PushCounts) {
        self.delivered += o.delivered;
        self.cached += o.cached;
        self.offline += o.offline;
        self.offline_players.extend(o.offline_players);
    }
}

pub use crate::session::{Arrival, LoginReply};

/// A connection in transit: its socket, the bytes read past the frame that
/// sent it, and what to do on arrival.
pub struct Handoff {
    pub fd: OwnedFd,
    /// The connection's place under `max_connections`, moving with it.
    pub slot: crate::net::Slot,
    pub peer: SocketAddr,
    pub leftover: BytesMut,
    pub arrival: Arrival,
}

/// What the read loop of a session must do next, decided by the shard.
pub enum Control {
    /// Go on reading.
    Continue,
    /// Stop reading and wait (a login or resume waits for the session's
    /// other requests to finish).
    Pause,
    /// Close the connection after the queued output.
    Close,
    /// Move the connection to shard `home`.
    Handoff { home: usize, arrival: Arrival },
}

/// A session as the shard's table holds it: its rules, and the handles of
/// its connection's tasks.
pub struct SessionEntry {
    pub session: Session,
    pub out: Rc<Outbound>,
    /// Wakes the read loop to look at [`ShardCtx::control`].
    pub ctl: Rc<shards::Notify>,
    pub peer: SocketAddr,
}

/// Shard-local counters (summed across shards when read).
#[derive(Default)]
pub struct Stats {
    pub accepted: Cell<u64>,
    pub refused_max_connections: Cell<u64>,
    pub handoffs_out: Cell<u64>,
    pub handoffs_in: Cell<u64>,
    pub logins_ok: Cell<u64>,
    pub logins_rejected: Cell<u64>,
    pub resumes_ok: Cell<u64>,
    pub resumes_rejected: Cell<u64>,
    pub resumes_gap: Cell<u64>,
    pub requests: Cell<u64>,
    pub responses: Cell<u64>,
    pub protocol_errors: Cell<u64>,
    pub kicks: Cell<u64>,
    pub evictions: Cell<u64>,
    pub players_expired: Cell<u64>,
    pub overloaded: Cell<u64>,
    pub rate_limited: Cell<u64>,
}

pub use crate::session::MAX_RESUME_FAILURES;

fn bump(c: &Cell<u64>) {
    add(c, 1);
}

fn add(c: &Cell<u64>, n: u64) {
    c.set(c.get() + n);
}

/// Everything one shard owns.
pub struct ShardCtx {
    pub id: usize,
    pub count: usize,
    /// The config and the route table; a reload replaces both.
    cfg: RefCell<Rc<Config>>,
    router: RefCell<Rc<Router>>,
    pub backends: BackendPool,
    pub mesh: shards::Mesh<ShardMsg>,
    pub stop: shards::StopToken,
    client_decoder: Cell<Decoder>,
    sessions: RefCell<HashMap<SessionId, SessionEntry>>,
    players: RefCell<HashMap<u64, Player>>,
    next_session: Cell<u64>,
    /// Source of player lives (see `Player::life`).
    next_life: Cell<u64>,
    /// Open client connections of the whole gateway (once per connect and
    /// close, never per frame).
    pub connections: Arc<AtomicUsize>,
    /// Open HTTP connections of the whole gateway.
    pub http_connections: Arc<AtomicUsize>,
    pub stats: Stats,
    pub metrics: crate::metrics::Metrics,
    /// Running, draining (forced or not), or drained.
    lifecycle: Cell<Lifecycle>,
    /// Woken when a drain begins (the accept loop stops).
    pub drain_started: shards::Notify,
    /// Woken when a drain is forced.
    pub force_wake: shards::Notify,
    /// Where `POST /v1/drain` goes (the process's coordinator).
    pub events: Option<flume::Sender<GatewayEvent>>,
    /// The cluster's control threads (None: this gateway alone).
    pub cluster: Option<crate::cluster::runtime::ClusterHandle>,
    /// This context's own `Rc`, for tasks it spawns.
    pub this: RefCell<std::rc::Weak<ShardCtx>>,
    /// Players being migrated away, with the pushes that arrived meanwhile
    /// (they follow the player once it has moved).
    migrating: RefCell<HashMap<u64, Vec<(u32, Bytes)>>>,
}

impl ShardCtx {
    pub fn new(
        id: usize,
        count: usize,
        cfg: Rc<Config>,
        mesh: shards::Mesh<ShardMsg>,
        stop: shards::StopToken,
        connections: Arc<AtomicUsize>,
        http_connections: Arc<AtomicUsize>,
    ) -> ShardCtx {
        let router = Router::new(&cfg);
        let backends = BackendPool::new(
            service_specs(&cfg, &router),
            cfg.backend.request_timeout,
            (cfg.limits.backend_inflight, cfg.limits.backend_queue_bytes),
        );
        ShardCtx {
            id,
            count,
            client_decoder: Cell::new(Decoder::new(Link::ClientToGateway, cfg.max_frame)),
            router: RefCell::new(Rc::new(router)),
            backends,
            mesh,
            stop,
            sessions: RefCell::new(HashMap::new()),
            players: RefCell::new(HashMap::new()),
            next_session: Cell::new(1),
            next_life: Cell::new(1),
            connections,
            http_connections,
            stats: Stats::default(),
            metrics: Default::default(),
            lifecycle: Cell::new(Lifecycle::Running),
            drain_started: shards::Notify::new(),
            force_wake: shards::Notify::new(),
            events: None,
            cluster: None,
            this: RefCell::new(std::rc::Weak::new()),
            migrating: RefCell::new(HashMap::new()),
            cfg: RefCell::new(cfg),
        }
    }

    /// Where the shard is in its life.
    pub fn lifecycle(&self) -> Lifecycle {
        self.lifecycle.get()
    }

    /// A drain began (or is over): no new connections, pushes or requests.
    pub fn is_draining(&self) -> bool {
        self.lifecycle.get() != Lifecycle::Running
    }

    /// The drain handed the players over: nothing may change them now.
    pub fn is_drained(&self) -> bool {
        self.lifecycle.get() == Lifecycle::Drained
    }

    /// The drain must finish at once.
    pub fn is_forced(&self) -> bool {
        self.lifecycle.get() == Lifecycle::Draining { forced: true }
    }

    /// Begin a drain (forced or not), or force the one going on. Returns
    /// true when this call began it.
    pub fn drain(&self, force: bool) -> bool {
        let (next, began) = self.lifecycle.get().drain(force);
        self.lifecycle.set(next);
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
        self.lifecycle.set(Lifecycle::Drained);
    }

    /// The config now (a reload may replace it between two calls).
    pub fn cfg(&self) -> Rc<Config> {
        self.cfg.borrow().clone()
    }

    /// The route table now.
    pub fn router(&self) -> Rc<Router> {
        self.router.borrow().clone()
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
        *self.router.borrow_mut() = Rc::new(router);
        self.metrics.reset_routes();
        *self.cfg.borrow_mut() = cfg;
        fresh
    }

    fn new_life(&self) -> u64 {
        let l = self.next_life.get();
        self.next_life.set(l + 1);
        l
    }

    // ----- the session table -------------------------------------------

    /// Register a new session on this shard.
    pub fn add_session(
        &self,
        peer: SocketAddr,
        out: Rc<Outbound>,
        ctl: Rc<shards::Notify>,
    ) -> SessionId {
        let n = self.next_session.get();
        self.next_session.set(n + 1);
        let sid = ((self.id as u64) << 48) | n;
        let session = Session::new(Instant::now(), self.cfg().limits.rate);
        self.sessions.borrow_mut().insert(
            sid,
            SessionEntry {
                session,
                out,
                ctl,
                peer,
            },
        );
        sid
    }

    /// Forget a session whose connection is gone (or moved). Its player, if
    /// bound to it, stays without a session and starts to linger. Returns
    /// the player it was bound to and why it closed.
    pub fn remove_session(&self, sid: SessionId) -> (Option<u64>, &'static str) {
        let Some(entry) = self.sessions.borrow_mut().remove(&sid) else {
            return (None, "");
        };
        let player = entry.session.player();
        if let Some(p) = player {
            self.detach(p, sid);
        }
        (player, entry.session.close_reason())
    }

    fn detach(&self, player: u64, sid: SessionId) {
        if let Some(p) = self.players.borrow_mut().get_mut(&player) {
            p.detach(sid, Instant::now());
        }
    }

    /// Whether `sid` is closing (or gone).
    pub fn is_closing(&self, sid: SessionId) -> bool {
        self.sessions
            .borrow()
            .get(&sid)
            .is_none_or(|e| e.session.is_closing())
    }

    pub fn session_count(&self) -> usize {
        self.sessions.borrow().len()
    }

    pub fn player_count(&self) -> usize {
        self.players.borrow().len()
    }

    /// Bytes arrived on a session.
    pub fn touch(&self, sid: SessionId, now: Instant) {
        if let Some(e) = self.sessions.borrow_mut().get_mut(&sid) {
            e.session.touch(now);
        }
    }

    /// What the read loop of `sid` must do now.
    pub fn control(&self, sid: SessionId) -> Control {
        let next = match self.sessions.borrow_mut().get_mut(&sid) {
            Some(e) => e.session.next_step(),
            None => Next::Close,
        };
        let arrival = match next {
            Next::Read => return Control::Continue,
            Next::Pause => return Control::Pause,
            Next::Close => return Control::Close,
            Next::Arrive(a) => a,
        };
        let home = shards::home_shard(arrival.player(), self.count);
        if home == self.id {
            self.arrive(sid, arrival);
            Control::Continue
        } else {
            Control::Handoff { home, arrival }
        }
    }

    /// A session on the player's home shard completes its login or resume.
    pub fn arrive(&self, sid: SessionId, arrival: Arrival) {
        if self.is_drained() {
            // The players went to the snapshot: this one must come back
            // through the next gateway.
            return self.kick(sid, Code::Shutdown);
        }
        // In a cluster, a player this gateway does not hold is claimed (and
        // fetched from its holder) first; that waits on Redis, off the shard.
        if let Some(cluster) = self.cluster.clone() {
            if !self.players.borrow().contains_key(&arrival.player()) {
                if let Some(ctx) = self.this.borrow().upgrade() {
                    glommio::spawn_local(arrive_clustered(ctx, cluster, sid, arrival)).detach();
                    return;
                }
            }
        }
        self.arrive_here(sid, arrival);
    }

    /// Complete a login or resume with the player (if any) in this table.
    pub fn arrive_here(&self, sid: SessionId, arrival: Arrival) {
        match arrival {
            Arrival::Login { player, reply } => self.login(sid, player, reply),
            Arrival::Resume {
                player,
                token,
                last,
                ..
            } => self.resume(sid, player, &token, last),
        }
    }

    /// A connection handed over by another shard, registered here as `sid`.
    pub fn accept_handoff(&self, sid: SessionId, arrival: Arrival) {
        bump(&self.stats.handoffs_in);
        if let Some(e) = self.sessions.borrow_mut().get_mut(&sid) {
            e.session = Session::arriving(&arrival, Instant::now(), self.cfg().limits.rate);
        }
        self.arrive(sid, arrival);
    }

    // ----- output --------------------------------------------------------

    /// Queue encoded bytes to a session; kicks it if its queue passes the
    /// limit (the frames stay in the player's outbox).
    fn queue(&self, sid: SessionId, f: impl FnOnce(&mut BytesMut)) {
        let over = {
            let sessions = self.sessions.borrow();
            let Some(e) = sessions.get(&sid) else { return };
            if e.out.is_closing() {
                return;
            }
            e.out.push(f);
            e.session
                .counted_queue(e.out.queued(), e.out.written_total())
                > self.cfg().write_queue_bytes
        };
        if over {
            self.kick(sid, Code::SlowConsumer);
        }
    }

    /// An unsequenced frame (seq as given) to a session.
    fn send_plain(&self, sid: SessionId, h: Header, body: &[u8]) {
        self.queue(sid, |out| encode(out, &h, body));
    }

    /// A sequenced frame to `player`: it takes the next seq and waits in
    /// the outbox until acknowledged; if the player has a session it is
    /// queued there too. Returns false if this shard does not hold the player.
    pub fn deliver(&self, player: u64, h: Header, body: &[u8]) -> bool {
        let (frame, session) = {
            let mut players = self.players.borrow_mut();
            let Some(p) = players.get_mut(&player) else {
                return false;
            };
            let (frame, evicted) = p.sequence(h, body);
            add(&self.stats.evictions, evicted as u64);
            (frame, p.session)
        };
        if let Some(sid) = session {
            self.queue(sid, |out| out.extend_from_slice(&frame));
        }
        true
    }

    /// A RESPONSE to a request of session `sid`: sequenced when the session
    /// is bound to a player, seq 0 before login.
    fn respond(&self, sid: SessionId, req_id: u32, msg_id: u32, code: u16, body: &[u8]) {
        bump(&self.stats.responses);
        self.metrics.response(self.router().slot(msg_id), code);
        let h = Header {
            kind: Kind::Response,
            flags: 0,
            code,
            msg_id,
            req_id,
            seq: 0,
        };
        let player = self
            .sessions
            .borrow()
            .get(&sid)
            .and_then(|e| e.session.player());
        match player {
            Some(p) if self.deliver(p, h, body) => {}
            _ => self.send_plain(sid, h, body),
        }
    }

    fn send_error(&self, sid: SessionId, code: Code) {
        let mut h = Header::new(Kind::Error);
        h.code = code.into();
        self.send_plain(sid, h, &[]);
    }

    // ----- closing -------------------------------------------------------

    /// Send `KICK code` and close the session after its queued output (for
    /// a slow consumer, instead of it: its frames stay in the outbox).
    pub fn kick(&self, sid: SessionId, code: Code) {
        let player = {
            let mut sessions = self.sessions.borrow_mut();
            let Some(e) = sessions.get_mut(&sid) else {
                return;
            };
            let player = e.session.player();
            if !e.session.close(code.name()) {
                return;
            }
            bump(&self.stats.kicks);
            self.metrics.kick(code.into());
            tracing::info!(session = sid, peer = %e.peer, ?player, reason = code.name(), "kick");
            if code == Code::SlowConsumer {
                e.out.discard();
            }
            let mut h = Header::new(Kind::Kick);
            h.code = code.into();
            e.out.push(|out| encode(out, &h, &[]));
            e.out.close();
            e.ctl.notify();
            player
        };
        if let Some(p) = player {
            self.detach(p, sid);
        }
    }

    /// Close without a KICK (BYE, end of stream, read error).
    pub fn close(&self, sid: SessionId, reason: &'static str) {
        let player = {
            let mut sessions = self.sessions.borrow_mut();
            let Some(e) = sessions.get_mut(&sid) else {
                return;
            };
            let player = e.session.player();
            e.session.close(reason);
            e.out.close();
            e.ctl.notify();
            player
        };
        if let Some(p) = player {
            self.detach(p, sid);
        }
    }

    /// A frame that broke the protocol arrived on `sid`.
    pub fn protocol_error(&self, sid: SessionId, why: &dyn std::fmt::Display) {
        bump(&self.stats.protocol_errors);
        tracing::info!(session = sid, error = %why, "protocol error");
        self.kick(sid, Code::ProtocolError);
    }

    // ----- client frames -------------------------------------------------

    /// One frame from a client.
    pub fn on_client_frame(&self, sid: SessionId, frame: Frame) {
        let h = frame.header;
        match h.kind {
            Kind::Request => self.on_request(sid, &h, frame.body),
            Kind::Ping | Kind::Ack => self.on_ack(sid, &h),
            Kind::Resume => self.on_resume(sid, &h, frame.body),
            Kind::Bye => self.on_bye(sid),
            // The client-link decoder admits no other kind.
            _ => self.protocol_error(sid, &format_args!("kind {} from a client", h.kind.name())),
        }
    }

    fn on_ack(&self, sid: SessionId, h: &Header) {
        let player = self
            .sessions
            .borrow()
            .get(&sid)
            .and_then(|e| e.session.player());
        let mut last = 0;
        if let Some(p) = player {
            let acked = self
                .players
                .borrow_mut()
                .get_mut(&p)
                .map(|pl| (pl.ack(h.seq), pl.last_seq()));
            match acked {
                Some((Err(e), _)) => return self.protocol_error(sid, &e),
                Some((Ok(()), l)) => last = l,
                None => {}
            }
        }
        if h.kind == Kind::Ping {
            let mut pong = Header::new(Kind::Pong);
            pong.seq = last;
            self.send_plain(sid, pong, &[]);
        }
    }

    fn on_bye(&self, sid: SessionId) {
        let player = self
            .sessions
            .borrow()
            .get(&sid)
            .and_then(|e| e.session.player());
        self.close(sid, "BYE");
        if let Some(p) = player {
            self.players.borrow_mut().remove(&p);
            self.released(p);
            tracing::info!(session = sid, player = p, "bye: player ended");
        }
    }

    fn on_resume(&self, sid: SessionId, h: &Header, token: Bytes) {
        if self.is_draining() {
            // Resume on the gateway that comes next.
            return self.kick(sid, Code::Shutdown);
        }
        let refused = {
            let mut sessions = self.sessions.borrow_mut();
            let Some(e) = sessions.get_mut(&sid) else {
                return;
            };
            match e.session.resume(token_player(&token), token, h.seq) {
                Decision::Forward { .. } => {
                    e.ctl.notify();
                    None
                }
                Decision::Reply(code) => Some(code),
                Decision::Ignore => None,
            }
        };
        if let Some(code) = refused {
            self.reject_resume(sid, code);
        }
    }

    fn reject_resume(&self, sid: SessionId, code: Code) {
        match code {
            Code::ResumeGap => bump(&self.stats.resumes_gap),
            _ => bump(&self.stats.resumes_rejected),
        }
        self.send_error(sid, code);
        let failures = self
            .sessions
            .borrow_mut()
            .get_mut(&sid)
            .map_or(0, |e| e.session.resume_refused());
        // Each refused resume may have moved the connection between
        // shards: a client that keeps guessing is cut off.
        if failures >= MAX_RESUME_FAILURES {
            self.protocol_error(
                sid,
                &format_args!("{failures} resumes refused on one connection"),
            );
        }
    }

    fn on_request(&self, sid: SessionId, h: &Header, body: Bytes) {
        bump(&self.stats.requests);
        self.metrics.request(self.router().slot(h.msg_id));
        if self.is_draining() {
            return self.respond(sid, h.req_id, h.msg_id, Code::ShuttingDown.into(), &[]);
        }
        let router = self.router();
        let route = router.lookup(h.msg_id);
        let limits = self.cfg().limits;
        let (decision, player) = {
            let mut sessions = self.sessions.borrow_mut();
            let Some(e) = sessions.get_mut(&sid) else {
                return;
            };
            let decision = e.session.admit(route, &limits, Instant::now());
            match decision {
                Decision::Reply(Code::RateLimited) => bump(&self.stats.rate_limited),
                Decision::Reply(Code::Overloaded) => bump(&self.stats.overloaded),
                _ => {}
            }
            (decision, e.session.player().unwrap_or(0))
        };
        match decision {
            Decision::Ignore => {}
            Decision::Reply(code) => self.respond(sid, h.req_id, h.msg_id, code.into(), &[]),
            Decision::Forward { login } => {
                let Some(route) = route else { return };
                let mut pending = Pending::new(sid, player, h.req_id, h.msg_id, login);
                pending.life = self.players.borrow().get(&player).map_or(0, |p| p.life);
                let sent = self.backends.send(route, h, &body, pending);
                let mut sessions = self.sessions.borrow_mut();
                let Some(e) = sessions.get_mut(&sid) else {
                    return;
                };
                match sent {
                    Ok(()) => e.session.forwarded(login),
                    Err(code) => {
                        e.session.not_forwarded(login);
                        if code == Code::Overloaded {
                            bump(&self.stats.overloaded);
                        }
                        drop(sessions);
                        self.respond(sid, h.req_id, h.msg_id, code.into(), &[]);
                    }
                }
            }
        }
    }

    // ----- login and resume on the home shard ---------------------------

    /// Bind `sid` to `player`, which this shard now holds: an older session
    /// of the player is kicked (`REPLACED`) and the new one is queued
    /// `frames_before` (SESSION and any replay). Returns false if `sid` is gone.
    fn attach(
        &self,
        sid: SessionId,
        player: u64,
        old: Option<SessionId>,
        frames_before: BytesMut,
    ) -> bool {
        if let Some(old) = old.filter(|&o| o != sid) {
            self.kick(old, Code::Replaced);
        }
        let bound = {
            let mut sessions = self.sessions.borrow_mut();
            match sessions.get_mut(&sid) {
                Some(e) if !e.session.is_closing() => {
                    e.session.bind(player);
                    true
                }
                _ => false,
            }
        };
        if !bound {
            self.detach(player, sid);
            return false;
        }
        let mut sessions = self.sessions.borrow_mut();
        if let Some(e) = sessions.get_mut(&sid) {
            e.out.push(|out| out.extend_from_slice(&frames_before));
            e.session.replayed_until(e.out.pushed_total());
        }
        true
    }

    fn session_frame(player: u64, token: &[u8], resume_point: u64, gap: bool, out: &mut BytesMut) {
        let mut h = Header::new(Kind::Session);
        h.seq = resume_point;
        if gap {
            h.code = Code::GAP.into();
        }
        let mut body = BytesMut::with_capacity(8 + token.len());
        session_body(&mut body, player, token);
        encode(out, &h, &body);
    }

    /// A login accepted by the backend, on the player's home shard:
    /// `SESSION` (R = last ack, or `GAP`), every retained unacknowledged
    /// frame, then the login `RESPONSE` with the next seq.
    fn login(&self, sid: SessionId, player: u64, reply: LoginReply) {
        let now = Instant::now();
        let (old, frames) = {
            let mut players = self.players.borrow_mut();
            let o = self.cfg().outbox;
            let p = players.entry(player).or_insert_with(|| {
                let mut p = Player::new(player, o.max_frames, o.max_bytes, now);
                p.life = self.new_life();
                p
            });
            let old = p.attach(sid);
            let token = p.issue_token(new_secret(), now, self.cfg().token_lifetime);
            let (r, gap) = p.login_point();
            p.lost_history = false;
            let mut frames = BytesMut::new();
            Self::session_frame(player, &token, r, gap, &mut frames);
            for f in p.outbox.after(r) {
                frames.extend_from_slice(f);
            }
            (old, frames)
        };
        if !self.attach(sid, player, old, frames) {
            return;
        }
        tracing::info!(session = sid, player, shard = self.id, replaced = ?old, "login");
        bump(&self.stats.logins_ok);
        self.respond(sid, reply.req_id, reply.msg_id, reply.code, &reply.body);
    }

    /// A RESUME on the player's home shard: `SESSION` (R = L) with a new
    /// token, then exactly the frames after L; or `ERROR`, leaving the
    /// session logged out and open.
    fn resume(&self, sid: SessionId, player: u64, token: &[u8], last: u64) {
        let now = Instant::now();
        let outcome = {
            let mut players = self.players.borrow_mut();
            match players.get_mut(&player) {
                None => Err(ResumeError::Rejected),
                Some(p) => p.resume(token, last, now).map(|()| {
                    let old = p.attach(sid);
                    let token = p.issue_token(new_secret(), now, self.cfg().token_lifetime);
                    let mut frames = BytesMut::new();
                    Self::session_frame(player, &token, last, false, &mut frames);
                    for f in p.outbox.after(last) {
                        frames.extend_from_slice(f);
                    }
                    (old, frames)
                }),
            }
        };
        match outcome {
            Ok((old, frames)) => {
                if self.attach(sid, player, old, frames) {
                    bump(&self.stats.resumes_ok);
                    tracing::info!(session = sid, player, from = last, replaced = ?old, "resume");
                }
            }
            Err(e) => {
                if let Some(en) = self.sessions.borrow_mut().get_mut(&sid) {
                    en.session.resume_failed();
                }
                tracing::debug!(session = sid, player, error = %e, "resume refused");
                match e {
                    ResumeError::Rejected => self.reject_resume(sid, Code::ResumeRejected),
                    ResumeError::Gap(_) => self.reject_resume(sid, Code::ResumeGap),
                    ResumeError::Beyond { .. } => self.protocol_error(sid, &e),
                }
            }
        }
    }

    // ----- timers ----------------------------------------------------------

    /// Close every session idle since before `cutoff`.
    pub fn kick_idle(&self, cutoff: Instant) {
        let idle: Vec<SessionId> = self
            .sessions
            .borrow()
            .iter()
            .filter(|(_, e)| e.session.quiet_since(cutoff))
            .map(|(&sid, _)| sid)
            .collect();
        for sid in idle {
            self.kick(sid, Code::Idle);
        }
    }

    /// End every player without a session for `player_linger`.
    pub fn end_lingering(&self, now: Instant) {
        let linger = self.cfg().player_linger;
        let mut players = self.players.borrow_mut();
        let before = players.len();
        let mut ended = Vec::new();
        players.retain(|id, p| {
            let keep = !p.expired(now, linger);
            if !keep {
                tracing::info!(player = id, "player ended: linger expired");
                ended.push(*id);
            }
            keep
        });
        for id in ended {
            self.released(id);
        }
        let ended = before - players.len();
        if ended > 0 {
            add(&self.stats.players_expired, ended as u64);
            if players.capacity() > 64 && players.len() < players.capacity() / 4 {
                players.shrink_to_fit();
            }
        }
    }

    /// Kick every session (the gateway is stopping).
    pub fn kick_all(&self, code: Code) {
        let all: Vec<SessionId> = self.sessions.borrow().keys().copied().collect();
        for sid in all {
            self.kick(sid, code);
        }
    }

    // ----- push and admin --------------------------------------------------

    /// One PUSH to each of `players` (homed here). Every counted frame has
    /// its seq when this returns.
    pub fn push(&self, players: &[u64], msg_id: u32, body: &[u8]) -> PushCounts {
        let mut counts = PushCounts::default();
        let mut h = Header::new(Kind::Push);
        h.msg_id = msg_id;
        for &player in players {
            let online = self
                .players
                .borrow()
                .get(&player)
                .map(|p| p.session.is_some());
            if let Some(held) = self.migrating.borrow_mut().get_mut(&player) {
                // It leaves for another gateway: the push goes with it, up
                // to what an outbox could hold; beyond, it is not taken.
                if held.len() < self.cfg().outbox.max_frames {
                    held.push((msg_id, Bytes::copy_from_slice(body)));
                    counts.cached += 1;
                } else {
                    counts.offline += 1;
                }
                continue;
            }
            match online {
                None => {
                    counts.offline += 1;
                    counts.offline_players.push(player);
                }
                Some(online) => {
                    self.deliver(player, h, body);
                    if online {
                        counts.delivered += 1;
                    } else {
                        counts.cached += 1;
                    }
                }
            }
        }
        self.metrics
            .pushes(counts.delivered, counts.cached, counts.offline);
        counts
    }

    /// One PUSH to every player held here.
    pub fn broadcast(&self, msg_id: u32, body: &[u8]) -> PushCounts {
        let mut ids: Vec<u64> = self.players.borrow().keys().copied().collect();
        ids.sort_unstable();
        self.push(&ids, msg_id, body)
    }

    /// `KICK ADMIN` to the player's session; false if it has none here.
    pub fn admin_kick(&self, player: u64) -> bool {
        let session = self.players.borrow().get(&player).and_then(|p| p.session);
        match session {
            Some(sid) => {
                self.kick(sid, Code::Admin);
                true
            }
            None => false,
        }
    }

    /// Up to `limit` players with id > `after`, ascending.
    pub fn list_players(&self, after: u64, limit: usize) -> Vec<PlayerInfo> {
        let mut ids: Vec<u64> = self
            .players
            .borrow()
            .keys()
            .copied()
            .filter(|&id| id > after)
            .collect();
        ids.sort_unstable();
        ids.truncate(limit);
        ids.into_iter()
            .filter_map(|id| self.player_info(id))
            .collect()
    }

    /// The shard's metrics now.
    pub fn snapshot(&self) -> crate::metrics::Snapshot {
        use crate::session::State;
        let mut s = crate::metrics::Snapshot {
            shard: self.id,
            ..Default::default()
        };
        for e in self.sessions.borrow().values() {
            let i = match e.session.state() {
                State::Connected => 0,
                State::Authenticating => 1,
                State::Binding { .. } => 2,
                State::Resuming => 3,
                State::Authenticated { .. } => 4,
                State::Closing => 5,
            };
            s.sessions[i] += 1;
        }
        for p in self.players.borrow().values() {
            if p.session.is_some() {
                s.players_online += 1;
            } else {
                s.players_lingering += 1;
            }
            s.outbox_frames += p.outbox.len() as u64;
            s.outbox_bytes += p.outbox.bytes() as u64;
        }
        let st = &self.stats;
        let b = &self.backends;
        s.counters = vec![
            (
                "accepted",
                "Client connections accepted.",
                st.accepted.get(),
            ),
            (
                "refused_max_connections",
                "Client connections refused by max_connections.",
                st.refused_max_connections.get(),
            ),
            (
                "handoffs_out",
                "Connections handed to another shard.",
                st.handoffs_out.get(),
            ),
            (
                "handoffs_in",
                "Connections received from another shard.",
                st.handoffs_in.get(),
            ),
            ("logins_ok", "Logins accepted.", st.logins_ok.get()),
            (
                "logins_rejected",
                "Logins rejected (by the backend or for lack of one).",
                st.logins_rejected.get(),
            ),
            ("resumes_ok", "Resumes served.", st.resumes_ok.get()),
            (
                "resumes_rejected",
                "Resumes refused: RESUME_REJECTED.",
                st.resumes_rejected.get(),
            ),
            (
                "resumes_gap",
                "Resumes refused: RESUME_GAP.",
                st.resumes_gap.get(),
            ),
            (
                "protocol_errors",
                "Connections closed for a protocol error.",
                st.protocol_errors.get(),
            ),
            (
                "evictions",
                "Unacknowledged frames evicted from outboxes.",
                st.evictions.get(),
            ),
            (
                "players_expired",
                "Players ended after player_linger without a session.",
                st.players_expired.get(),
            ),
            (
                "backend_connects",
                "Backend connections established (reconnects included).",
                b.connects.get(),
            ),
            (
                "backend_retries",
                "Idempotent requests sent again after their backend connection died.",
                b.retries.get(),
            ),
            (
                "backend_unhealthy",
                "Times a backend connection left rotation for missing health checks.",
                b.unhealthy.get(),
            ),
            (
                "overloaded",
                "Requests refused OVERLOADED (session or backend in-flight bounds).",
                st.overloaded.get(),
            ),
            (
                "rate_limited",
                "Requests refused RATE_LIMITED by the per-session token bucket.",
                st.rate_limited.get(),
            ),
            (
                "backend_unknown_answers",
                "Backend answers to no pending request (dropped).",
                b.unknown_answers.get(),
            ),
            (
                "backend_timeouts",
                "Requests answered TIMEOUT.",
                b.timeouts.get(),
            ),
            (
                "backend_failed_by_disconnect",
                "Requests failed because their backend connection died.",
                b.failed_by_disconnect.get(),
            ),
        ];
        self.metrics.fill(&mut s);
        s.mesh_backlog = self.mesh.stats().backlog;
        (s.backends_up, s.backends_unhealthy, s.backends_down) = b.health();
        s
    }

    /// A login or resume that cannot be served (the cluster could not give
    /// this gateway the player): the session stays open, logged out.
    pub fn refuse_arrival(&self, sid: SessionId, arrival: Arrival) {
        if let Some(e) = self.sessions.borrow_mut().get_mut(&sid) {
            e.session.binding_failed();
        }
        match arrival {
            Arrival::Login { reply, .. } => {
                bump(&self.stats.logins_rejected);
                self.respond(
                    sid,
                    reply.req_id,
                    reply.msg_id,
                    Code::BackendUnavailable.into(),
                    &[],
                );
            }
            Arrival::Resume { .. } => self.reject_resume(sid, Code::ResumeRejected),
        }
    }

    /// Another gateway takes `player` over: its session here is kicked
    /// (`REPLACED`) and its state goes to gateway `to`.
    pub fn give_away(&self, player: u64, to: &str) {
        let Some(cluster) = self.cluster.clone() else {
            return;
        };
        let session = self.players.borrow().get(&player).and_then(|p| p.session);
        if let Some(sid) = session {
            self.kick(sid, Code::Replaced);
        }
        let image = self.players.borrow_mut().remove(&player).and_then(|p| {
            let img = crate::snapshot::Image {
                taken_unix_ms: crate::snapshot::unix_ms_now(),
                shards: 1,
                players: vec![p.to_image(Instant::now(), crate::snapshot::unix_ms_now())],
            };
            img.encode().ok()
        });
        tracing::info!(
            player,
            to,
            with_state = image.is_some(),
            "player handed to another gateway"
        );
        let _ = cluster.cmds.send(crate::cluster::runtime::Cmd::Give {
            player,
            to: to.to_string(),
            image,
        });
    }

    /// The requests of `player`'s session still at a backend.
    fn player_inflight(&self, player: u64) -> u32 {
        let session = self.players.borrow().get(&player).and_then(|p| p.session);
        session
            .and_then(|sid| {
                self.sessions
                    .borrow()
                    .get(&sid)
                    .map(|e| e.session.inflight())
            })
            .unwrap_or(0)
    }

    fn hold_session(&self, player: u64, held: bool) {
        let session = self.players.borrow().get(&player).and_then(|p| p.session);
        if let Some(sid) = session {
            if let Some(e) = self.sessions.borrow_mut().get_mut(&sid) {
                e.session.hold(held);
                e.ctl.notify();
            }
        }
    }

    /// Tell the client of `player` to go to `addr` with a token valid
    /// there (`REDIRECT`), close its session, and forget the player.
    fn redirect_away(&self, player: u64, addr: &str) {
        let Some(p) = self.players.borrow_mut().remove(&player) else {
            return;
        };
        if let Some(sid) = p.session {
            let (secret, _) = p.token();
            let mut token = Vec::with_capacity(crate::player::TOKEN_LEN);
            token.extend_from_slice(&player.to_be_bytes());
            token.extend_from_slice(&secret);
            let mut body = BytesMut::new();
            crate::protocol::redirect_body(&mut body, addr, &token);
            let h = Header::new(Kind::Redirect);
            let mut sessions = self.sessions.borrow_mut();
            if let Some(e) = sessions.get_mut(&sid) {
                e.out.push(|out| encode(out, &h, &body));
                e.session.close("REDIRECT");
                e.out.close();
                e.ctl.notify();
            }
        }
    }

    /// A player whose gateway died holding it starts here with nothing;
    /// its first SESSION says `GAP`.
    pub fn start_lost(&self, player: u64) {
        let o = self.cfg().outbox;
        let mut p = Player::new(player, o.max_frames, o.max_bytes, Instant::now());
        p.life = self.new_life();
        p.lost_history = true;
        self.players.borrow_mut().entry(player).or_insert(p);
    }

    /// The player ended here: tell the cluster.
    fn released(&self, player: u64) {
        if let Some(c) = &self.cluster {
            let _ = c
                .cmds
                .send(crate::cluster::runtime::Cmd::Release { player });
        }
    }

    // ----- drain and snapshots ------------------------------------------

    /// Requests of this shard waiting for a backend.
    pub fn in_flight(&self) -> usize {
        self.backends.in_flight()
    }

    /// During a drain: `KICK SHUTDOWN` to every session that has sent
    /// nothing since `quiet_since` (a client that got `SHUTTING_DOWN` stops
    /// sending, so a request still on its way is read and answered first).
    /// Returns the sessions still open.
    pub fn kick_quiet(&self, quiet_since: Instant) -> usize {
        let quiet: Vec<SessionId> = self
            .sessions
            .borrow()
            .iter()
            .filter(|(_, e)| e.session.quiet_after(quiet_since))
            .map(|(&sid, _)| sid)
            .collect();
        for sid in quiet {
            self.kick(sid, Code::Shutdown);
        }
        self.session_count()
    }

    /// Every player as a snapshot keeps it.
    pub fn images(&self) -> Vec<crate::snapshot::PlayerImage> {
        let now = Instant::now();
        let unix = crate::snapshot::unix_ms_now();
        let mut v: Vec<_> = self
            .players
            .borrow()
            .values()
            .map(|p| p.to_image(now, unix))
            .collect();
        v.sort_unstable_by_key(|p| p.id);
        v
    }

    /// Load players from a snapshot (all homed here). Players whose linger
    /// ran out while the gateway was down are dropped. Returns (loaded, dropped).
    pub fn restore(&self, images: &[crate::snapshot::PlayerImage]) -> (usize, usize) {
        let now = Instant::now();
        let unix = crate::snapshot::unix_ms_now();
        let o = self.cfg().outbox;
        let mut players = self.players.borrow_mut();
        let mut dropped = 0;
        for img in images {
            let mut p = Player::from_image(img, o.max_frames, o.max_bytes, now, unix);
            if p.expired(now, self.cfg().player_linger) {
                dropped += 1;
                continue;
            }
            p.life = self.new_life();
            players.insert(p.id, p);
        }
        (players.len(), dropped)
    }

    /// A copy of a player's state, for the admin API and tests.
    pub fn player_info(&self, player: u64) -> Option<PlayerInfo> {
        let players = self.players.borrow();
        let p = players.get(&player)?;
        Some(PlayerInfo {
            player,
            online: p.session.is_some(),
            seq: p.last_seq(),
            acked: p.acked(),
            outbox: p.outbox.len(),
            outbox_bytes: p.outbox.bytes(),
            evictions: p.outbox.evictions(),
            shard: self.id,
        })
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

/// What the admin API shows of a player.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlayerInfo {
    pub player: u64,
    pub online: bool,
    pub seq: u64,
    pub acked: u64,
    pub outbox: usize,
    pub outbox_bytes: usize,
    pub evictions: u64,
    pub shard: usize,
}

impl AnswerSink for ShardCtx {
    fn on_answer(&self, p: Pending, a: Answer) {
        if a.from_backend {
            self.metrics.backend_latency(p.elapsed());
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
        if p.login {
            return self.on_login_answer(p, a);
        }
        if let Some(e) = self.sessions.borrow_mut().get_mut(&p.session) {
            if e.session.answered() {
                e.ctl.notify();
            }
        }
        let h = Header {
            kind: Kind::Response,
            flags: 0,
            code: a.code,
            msg_id: a.msg_id,
            req_id: p.req_id,
            seq: 0,
        };
        if p.player != 0 {
            // A request of a logged-in player: the answer belongs to the
            // player, whichever session it has now (or none: outbox); but
            // not to a later life of the same id (after BYE or linger).
            let same_life = self
                .players
                .borrow()
                .get(&p.player)
                .is_some_and(|pl| pl.life == p.life);
            if !same_life {
                tracing::debug!(
                    player = p.player,
                    req_id = p.req_id,
                    "answer for an ended player dropped"
                );
                return;
            }
            bump(&self.stats.responses);
            self.metrics.response(self.router().slot(p.msg_id), a.code);
            self.deliver(p.player, h, &a.body);
        } else {
            self.respond(p.session, p.req_id, p.msg_id, a.code, &a.body);
        }
    }
}

impl ShardCtx {
    fn on_login_answer(&self, p: Pending, a: Answer) {
        let accepted = (a.code == 0 && a.player != 0).then_some(a.player);
        if a.code == 0 && a.player == 0 {
            tracing::warn!(
                session = p.session,
                "login accepted by backend without a player id: refused"
            );
        }
        let binding = {
            let mut sessions = self.sessions.borrow_mut();
            let Some(e) = sessions.get_mut(&p.session) else {
                return;
            };
            let binding = match accepted {
                Some(player) => e.session.login_accepted(Arrival::Login {
                    player,
                    reply: LoginReply {
                        req_id: p.req_id,
                        msg_id: a.msg_id,
                        code: a.code,
                        body: a.body.clone(),
                    },
                }),
                None => e.session.on_login_result(None),
            };
            if binding {
                e.ctl.notify();
            }
            binding
        };
        if !binding {
            bump(&self.stats.logins_rejected);
            let code = if accepted.is_none() && a.code == 0 {
                Code::BackendUnavailable.into()
            } else {
                a.code
            };
            self.respond(p.session, p.req_id, a.msg_id, code, &a.body);
        }
    }
}

/// A fresh token secret: 128 bits from the OS CSPRNG.
pub fn new_secret() -> [u8; SECRET_LEN] {
    let mut t = [0u8; SECRET_LEN];
    if let Err(e) = getrandom::getrandom(&mut t) {
        // Without randomness a token could be guessed: better to stop
        // than to hand out weak tokens.
        tracing::error!("the OS random source failed: {e}");
        std::process::abort();
    }
    t
}

/// In a cluster: claim the player (fetching its state from the gateway
/// that holds it), then complete the login or resume here.
async fn arrive_clustered(
    ctx: Rc<ShardCtx>,
    cluster: crate::cluster::runtime::ClusterHandle,
    sid: SessionId,
    arrival: Arrival,
) {
    use crate::cluster::runtime::Cmd;
    use crate::cluster::Claim;
    let player = arrival.player();
    let wait = |d: std::time::Duration| glommio::timer::sleep(d);
    let (tx, rx) = flume::bounded(1);
    let claim = if cluster.cmds.send(Cmd::Claim { player, reply: tx }).is_ok() {
        futures_lite::future::or(async { rx.recv_async().await.ok() }, async {
            wait(std::time::Duration::from_secs(5)).await;
            None
        })
        .await
        .unwrap_or_else(|| Err("the cluster did not answer".into()))
    } else {
        Err("the cluster is stopped".into())
    };
    let outcome: Result<(), String> = match claim {
        Ok(Claim::Granted { .. }) => Ok(()),
        Ok(Claim::TakenOver { from, .. }) => {
            // Its gateway died without handing it over: what it held is
            // lost, and a fresh login will say so (a new life).
            tracing::warn!(
                player,
                from,
                "player taken over from a gateway whose lease lapsed"
            );
            ctx.start_lost(player);
            Ok(())
        }
        Ok(Claim::Held { by, .. }) => {
            let (tx, rx) = flume::bounded(1);
            let fetched = if cluster
                .cmds
                .send(Cmd::Fetch {
                    player,
                    from: by.clone(),
                    reply: tx,
                })
                .is_ok()
            {
                // No timeout of our own: the control thread always answers
                // (its Redis calls are bounded), and giving up before it
                // did could drop a state it was about to hand us.
                rx.recv_async()
                    .await
                    .unwrap_or_else(|_| Err("the cluster is stopped".into()))
            } else {
                Err("the cluster is stopped".into())
            };
            match fetched {
                Ok(Some(bytes)) => match crate::snapshot::Image::decode(&bytes) {
                    Ok(img) => {
                        ctx.restore(&img.players);
                        tracing::info!(player, from = by, "player taken over from another gateway");
                        Ok(())
                    }
                    Err(e) => Err(format!("hand-over state unusable: {e}")),
                },
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Err(e) if cluster.when_redis_down == crate::config::RedisDown::Local => {
            tracing::warn!(player, error = %e, "cluster unreachable: serving the player here alone");
            Ok(())
        }
        Err(e) => Err(e),
    };
    match outcome {
        Ok(()) => ctx.arrive_here(sid, arrival),
        Err(e) => {
            tracing::warn!(player, error = %e, "login or resume refused: the cluster could not give this gateway the player");
            ctx.refuse_arrival(sid, arrival);
        }
    }
}

/// Migrate `player` to gateway `to`: hold its session's new requests, let
/// those in flight finish, hand its state over through the cluster, then
/// `REDIRECT` the client there. Any failure rolls back: the player stays.
pub async fn migrate_player(ctx: Rc<ShardCtx>, player: u64, to: String) -> Result<String, String> {
    let Some(cluster) = ctx.cluster.clone() else {
        return Err("this gateway is not in a cluster".into());
    };
    if !ctx.players.borrow().contains_key(&player) {
        return Err(format!("player {player} is not on this gateway"));
    }
    if ctx.migrating.borrow().contains_key(&player) {
        return Err(format!("player {player} is already migrating"));
    }
    ctx.migrating.borrow_mut().insert(player, Vec::new());
    ctx.hold_session(player, true);
    let rollback = |ctx: &ShardCtx, why: String| -> Result<String, String> {
        let held = ctx
            .migrating
            .borrow_mut()
            .remove(&player)
            .unwrap_or_default();
        for (msg_id, body) in held {
            let mut h = Header::new(Kind::Push);
            h.msg_id = msg_id;
            ctx.deliver(player, h, &body);
        }
        ctx.hold_session(player, false);
        tracing::warn!(player, error = %why, "migration rolled back");
        Err(why)
    };
    // Requests in flight finish first: each gets its answer (or TIMEOUT)
    // within the backend's request timeout, so after this wait no backend
    // answer can reach this gateway for the player, and the client's
    // contract stays simple: what the source read is answered in the
    // replay at the target; what it never read, the client sends again.
    let deadline =
        Instant::now() + ctx.cfg().backend.request_timeout + std::time::Duration::from_secs(1);
    while ctx.player_inflight(player) > 0 {
        if Instant::now() >= deadline {
            return rollback(&ctx, "requests in flight did not finish in time".into());
        }
        glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
    }
    let image = {
        let players = ctx.players.borrow();
        let Some(p) = players.get(&player) else {
            drop(players);
            return rollback(&ctx, "the player ended meanwhile".into());
        };
        crate::snapshot::Image {
            taken_unix_ms: crate::snapshot::unix_ms_now(),
            shards: 1,
            players: vec![p.to_image(Instant::now(), crate::snapshot::unix_ms_now())],
        }
        .encode()
    };
    let image = match image {
        Ok(b) => b,
        Err(e) => return rollback(&ctx, e.to_string()),
    };
    let (tx, rx) = flume::bounded(1);
    let cmd = crate::cluster::runtime::Cmd::Migrate {
        player,
        to: to.clone(),
        image,
        reply: tx,
    };
    if cluster.cmds.send(cmd).is_err() {
        return rollback(&ctx, "the cluster is stopped".into());
    }
    // No timeout of our own: the control thread always answers (its waits
    // are bounded), and only its answer says whether the target took the
    // player; rolling back before it could leave the player on both.
    let answer = rx.recv_async().await.ok();
    match answer {
        Some(Ok(addr)) => {
            let held = ctx
                .migrating
                .borrow_mut()
                .remove(&player)
                .unwrap_or_default();
            ctx.redirect_away(player, &addr);
            tracing::info!(player, to, addr, "player migrated");
            // Pushes that came meanwhile follow it to its new gateway.
            if !held.is_empty() {
                let (rtx, rrx) = flume::bounded(1);
                let _ = cluster.cmds.send(crate::cluster::runtime::Cmd::Route {
                    players: vec![player],
                    reply: rtx,
                });
                if let Ok(Ok(routes)) = rrx.recv_async().await {
                    for (http, _) in routes.into_iter().filter(|(h, _)| !h.is_empty()) {
                        for (msg_id, body) in &held {
                            let (ftx, frx) = flume::bounded(1);
                            let _ = cluster.cmds.send(crate::cluster::runtime::Cmd::Forward {
                                http: http.clone(),
                                path: format!("/v1/push?players={player}&msg={msg_id}&hops=1"),
                                body: body.clone(),
                                token: ctx.cfg().push_token.clone(),
                                reply: ftx,
                            });
                            // One at a time, so they keep their order there.
                            if let Ok(Err(e)) | Err(e) =
                                frx.recv_async().await.map_err(|e| e.to_string())
                            {
                                tracing::error!(
                                    player,
                                    msg_id,
                                    error = %e,
                                    "a push held during the migration could not follow it"
                                );
                            }
                        }
                    }
                } else {
                    tracing::error!(
                        player,
                        pushes = held.len(),
                        "pushes held during the migration could not follow it"
                    );
                }
            }
            Ok(addr)
        }
        Some(Err(e)) => rollback(&ctx, e),
        None => rollback(&ctx, "the cluster is stopped".into()),
    }
}

/// Players migrated at once per shard during an evacuation.
pub const EVACUATE_PARALLEL: usize = 16;

/// Migrate every player of this shard to `to`, `EVACUATE_PARALLEL` at a
/// time; returns (migrated, failed).
pub async fn evacuate_shard(ctx: Rc<ShardCtx>, to: String) -> (u64, u64) {
    let ids: Vec<u64> = ctx.players.borrow().keys().copied().collect();
    let (mut ok, mut failed) = (0, 0);
    for chunk in ids.chunks(EVACUATE_PARALLEL) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|&p| glommio::spawn_local(migrate_player(ctx.clone(), p, to.clone())))
            .collect();
        for t in tasks {
            if t.await.is_ok() {
                ok += 1;
            } else {
                failed += 1;
            }
        }
    }
    (ok, failed)
}

#[cfg(test)]
mod tests {
    use super::Lifecycle;

    #[test]
    fn a_drain_only_moves_forward() {
        let (d, began) = Lifecycle::Running.drain(false);
        assert_eq!((d, began), (Lifecycle::Draining { forced: false }, true));
        let (f, began) = d.drain(true);
        assert_eq!((f, began), (Lifecycle::Draining { forced: true }, false));
        assert_eq!(f.drain(false).0, f, "a forced drain stays forced");
        assert_eq!(
            Lifecycle::Running.drain(true),
            (Lifecycle::Draining { forced: true }, true)
        );
        assert_eq!(Lifecycle::Drained.drain(true), (Lifecycle::Drained, false));
    }
}
