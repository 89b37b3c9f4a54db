//! One shard of the gateway: the tables it owns (sessions, players, route
//! table, backend pool) and the handlers that change them. Every handler runs
//! on the shard's own thread, never awaits, and touches only this shard's
//! state; other shards are reached by [`ShardMsg`] over the mesh.

use crate::backend::{Answer, AnswerSink, BackendPool, Pending};
use crate::config::Config;
use crate::net::Outbound;
use crate::player::{Player, TOKEN_LEN};
use crate::protocol::{encode, session_body, Code, Decoder, Frame, Header, Kind, Link};
use crate::router::Router;
use crate::session::{Decision, Session, SessionId};
use bytes::{Bytes, BytesMut};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Messages between shards.
pub enum ShardMsg {
    /// A logged-in connection moving to its player's home shard.
    Handoff(Box<Handoff>),
}

/// The login answer that completes a hand-off on the home shard.
#[derive(Debug, Clone)]
pub struct LoginReply {
    pub req_id: u32,
    pub msg_id: u32,
    pub code: u16,
    pub body: Bytes,
}

/// A connection in transit: its socket, the bytes read past the login
/// frame, and the login to complete.
pub struct Handoff {
    pub fd: OwnedFd,
    pub peer: SocketAddr,
    pub leftover: BytesMut,
    pub player: u64,
    pub reply: LoginReply,
}

/// What the read loop of a session must do next, decided by the shard.
pub enum Control {
    /// Go on reading.
    Continue,
    /// Stop reading and wait (a login waits for other requests to finish).
    Pause,
    /// Close the connection after the queued output.
    Close,
    /// Move the connection to `home` for `player`.
    Handoff {
        home: usize,
        player: u64,
        reply: LoginReply,
    },
}

/// A session as the shard's table holds it.
pub struct SessionEntry {
    pub session: Session,
    pub out: Rc<Outbound>,
    /// Wakes the read loop to look at [`ShardCtx::control`].
    pub ctl: Rc<shards::Notify>,
    pub peer: SocketAddr,
    /// Requests of this session at a backend, login excluded.
    inflight: u32,
    /// A login accepted, waiting for `inflight` to reach 0.
    bind: Option<(u64, LoginReply)>,
    last_rx: Instant,
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
    pub requests: Cell<u64>,
    pub responses: Cell<u64>,
    pub protocol_errors: Cell<u64>,
    pub kicks: Cell<u64>,
}

fn bump(c: &Cell<u64>) {
    c.set(c.get() + 1);
}

/// Everything one shard owns.
pub struct ShardCtx {
    pub id: usize,
    pub count: usize,
    pub cfg: Rc<Config>,
    pub router: Router,
    pub backends: BackendPool,
    pub mesh: shards::Mesh<ShardMsg>,
    pub stop: shards::StopToken,
    pub client_decoder: Decoder,
    sessions: RefCell<HashMap<SessionId, SessionEntry>>,
    players: RefCell<HashMap<u64, Player>>,
    next_session: Cell<u64>,
    /// Open client connections of the whole gateway (once per connect and
    /// close, never per frame).
    pub connections: Arc<AtomicUsize>,
    pub stats: Stats,
}

impl ShardCtx {
    pub fn new(
        id: usize,
        count: usize,
        cfg: Rc<Config>,
        mesh: shards::Mesh<ShardMsg>,
        stop: shards::StopToken,
        connections: Arc<AtomicUsize>,
    ) -> ShardCtx {
        let router = Router::new(&cfg);
        let services = router
            .services()
            .iter()
            .map(|name| {
                cfg.services
                    .get(name)
                    .map(|s| s.instances.iter().filter_map(|a| a.parse().ok()).collect())
                    .unwrap_or_default()
            })
            .collect();
        let backends = BackendPool::new(services, cfg.backend.request_timeout);
        ShardCtx {
            id,
            count,
            client_decoder: Decoder::new(Link::ClientToGateway, cfg.max_frame),
            router,
            backends,
            mesh,
            stop,
            sessions: RefCell::new(HashMap::new()),
            players: RefCell::new(HashMap::new()),
            next_session: Cell::new(1),
            connections,
            stats: Stats::default(),
            cfg,
        }
    }

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
        self.sessions.borrow_mut().insert(
            sid,
            SessionEntry {
                session: Session::new(),
                out,
                ctl,
                peer,
                inflight: 0,
                bind: None,
                last_rx: Instant::now(),
            },
        );
        sid
    }

    /// Forget a session whose connection is gone (or moved). Its player, if
    /// bound to it, stays without a session.
    pub fn remove_session(&self, sid: SessionId) {
        let Some(entry) = self.sessions.borrow_mut().remove(&sid) else {
            return;
        };
        if let Some(p) = entry.session.player() {
            if let Some(player) = self.players.borrow_mut().get_mut(&p) {
                if player.session == Some(sid) {
                    player.session = None;
                }
            }
        }
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
            e.last_rx = now;
        }
    }

    /// What the read loop of `sid` must do now.
    pub fn control(&self, sid: SessionId) -> Control {
        let mut sessions = self.sessions.borrow_mut();
        let Some(e) = sessions.get_mut(&sid) else {
            return Control::Close;
        };
        if e.session.is_closing() {
            return Control::Close;
        }
        match &e.bind {
            None => Control::Continue,
            Some(_) if e.inflight > 0 => Control::Pause,
            Some(_) => {
                let Some((player, reply)) = e.bind.take() else {
                    return Control::Continue;
                };
                let home = shards::home_shard(player, self.count);
                if home == self.id {
                    drop(sessions);
                    self.bind_player(sid, player, reply);
                    Control::Continue
                } else {
                    Control::Handoff {
                        home,
                        player,
                        reply,
                    }
                }
            }
        }
    }

    /// Queue one frame to a session's client. `sequenced` frames to an
    /// authenticated player take the player's next seq.
    fn send_client(&self, sid: SessionId, mut h: Header, body: &[u8], sequenced: bool) {
        let sessions = self.sessions.borrow();
        let Some(e) = sessions.get(&sid) else { return };
        if e.out.is_closing() {
            return;
        }
        if sequenced {
            if let Some(p) = e.session.player() {
                if let Some(player) = self.players.borrow_mut().get_mut(&p) {
                    h.seq = player.take_seq();
                }
            }
        }
        e.out.push(|out| encode(out, &h, body));
        if e.out.queued() > self.cfg.write_queue_bytes {
            drop(sessions);
            self.kick(sid, Code::SlowConsumer);
        }
    }

    fn respond(&self, sid: SessionId, req_id: u32, msg_id: u32, code: u16, body: &[u8]) {
        bump(&self.stats.responses);
        let h = Header {
            kind: Kind::Response,
            flags: 0,
            code,
            msg_id,
            req_id,
            seq: 0,
        };
        self.send_client(sid, h, body, true);
    }

    /// Send `KICK code` and close the session after its queued output
    /// (for a slow consumer, instead of it).
    pub fn kick(&self, sid: SessionId, code: Code) {
        let mut sessions = self.sessions.borrow_mut();
        let Some(e) = sessions.get_mut(&sid) else {
            return;
        };
        if !e.session.close() {
            return;
        }
        bump(&self.stats.kicks);
        tracing::info!(session = sid, peer = %e.peer, reason = code.name(), "kick");
        if code == Code::SlowConsumer {
            e.out.discard();
        }
        let mut h = Header::new(Kind::Kick);
        h.code = code.into();
        e.out.push(|out| encode(out, &h, &[]));
        e.out.close();
        e.ctl.notify();
    }

    /// Close without a KICK (BYE, end of stream, read error).
    pub fn close(&self, sid: SessionId) {
        let mut sessions = self.sessions.borrow_mut();
        let Some(e) = sessions.get_mut(&sid) else {
            return;
        };
        e.session.close();
        e.out.close();
        e.ctl.notify();
    }

    /// A frame that broke the protocol arrived on `sid`.
    pub fn protocol_error(&self, sid: SessionId, why: &dyn std::fmt::Display) {
        bump(&self.stats.protocol_errors);
        tracing::info!(session = sid, error = %why, "protocol error");
        self.kick(sid, Code::ProtocolError);
    }

    /// One frame from a client.
    pub fn on_client_frame(&self, sid: SessionId, frame: Frame) {
        let h = frame.header;
        match h.kind {
            Kind::Request => self.on_request(sid, &h, frame.body),
            Kind::Ping | Kind::Ack => {
                let player = self
                    .sessions
                    .borrow()
                    .get(&sid)
                    .and_then(|e| e.session.player());
                let mut last = 0;
                if let Some(p) = player {
                    let mut players = self.players.borrow_mut();
                    if let Some(pl) = players.get_mut(&p) {
                        if let Err(e) = pl.ack(h.seq) {
                            drop(players);
                            return self.protocol_error(sid, &e);
                        }
                        last = pl.last_seq();
                    }
                }
                if h.kind == Kind::Ping {
                    let mut pong = Header::new(Kind::Pong);
                    pong.seq = last;
                    self.send_client(sid, pong, &[], false);
                }
            }
            Kind::Resume => {
                // No token issued by this gateway can be resumed yet.
                let mut e = Header::new(Kind::Error);
                e.code = Code::ResumeRejected.into();
                self.send_client(sid, e, &[], false);
            }
            Kind::Bye => {
                let player = self
                    .sessions
                    .borrow()
                    .get(&sid)
                    .and_then(|e| e.session.player());
                if let Some(p) = player {
                    self.players.borrow_mut().remove(&p);
                    tracing::info!(session = sid, player = p, "bye: player ended");
                }
                self.close(sid);
            }
            // The client-link decoder admits no other kind.
            _ => self.protocol_error(sid, &format_args!("kind {} from a client", h.kind.name())),
        }
    }

    fn on_request(&self, sid: SessionId, h: &Header, body: Bytes) {
        bump(&self.stats.requests);
        let route = self.router.lookup(h.msg_id);
        let (decision, player) = {
            let mut sessions = self.sessions.borrow_mut();
            let Some(e) = sessions.get_mut(&sid) else {
                return;
            };
            (e.session.on_request(route), e.session.player().unwrap_or(0))
        };
        match decision {
            Decision::Ignore => {}
            Decision::Reply(code) => self.respond(sid, h.req_id, h.msg_id, code.into(), &[]),
            Decision::Forward { login } => {
                let Some(route) = route else { return };
                let pending = Pending {
                    session: sid,
                    player,
                    req_id: h.req_id,
                    msg_id: h.msg_id,
                    login,
                    ticket: 0,
                };
                match self.backends.send(route, h, &body, pending) {
                    Ok(()) => {
                        if !login {
                            if let Some(e) = self.sessions.borrow_mut().get_mut(&sid) {
                                e.inflight += 1;
                            }
                        }
                    }
                    Err(code) => {
                        if login {
                            if let Some(e) = self.sessions.borrow_mut().get_mut(&sid) {
                                e.session.on_login_result(None);
                            }
                        }
                        self.respond(sid, h.req_id, h.msg_id, code.into(), &[]);
                    }
                }
            }
        }
    }

    /// Bind session `sid` (on this, the player's home shard) to `player`:
    /// an older session of the player is kicked (`REPLACED`); the new one
    /// gets `SESSION`, then the login `RESPONSE` with the next seq.
    pub fn bind_player(&self, sid: SessionId, player: u64, reply: LoginReply) {
        let token = new_token();
        let (old, resume_point, gap) = {
            let mut players = self.players.borrow_mut();
            let p = players
                .entry(player)
                .or_insert_with(|| Player::new(player, token));
            p.token = token;
            // Nothing unacknowledged is retained for replay yet, so every
            // frame after the last ack is lost to this session: say so.
            let gap = p.last_seq() > p.acked();
            (p.session.replace(sid), p.last_seq(), gap)
        };
        if let Some(old) = old.filter(|&o| o != sid) {
            self.kick(old, Code::Replaced);
        }
        {
            let mut sessions = self.sessions.borrow_mut();
            let Some(e) = sessions.get_mut(&sid) else {
                return;
            };
            e.session.bind(player);
            tracing::info!(session = sid, player, peer = %e.peer, shard = self.id, "login");
        }
        bump(&self.stats.logins_ok);
        let mut h = Header::new(Kind::Session);
        h.seq = resume_point;
        if gap {
            h.code = Code::GAP.into();
        }
        let mut body = BytesMut::with_capacity(8 + TOKEN_LEN);
        session_body(&mut body, player, &token);
        self.send_client(sid, h, &body, false);
        self.respond(sid, reply.req_id, reply.msg_id, reply.code, &reply.body);
    }

    /// A connection handed over by another shard, now registered here as `sid`.
    pub fn accept_handoff(&self, sid: SessionId, player: u64, reply: LoginReply) {
        bump(&self.stats.handoffs_in);
        if let Some(e) = self.sessions.borrow_mut().get_mut(&sid) {
            // Its login was accepted on the shard it came from.
            e.session = Session::binding(player);
        }
        self.bind_player(sid, player, reply);
    }

    /// Close every session idle since before `cutoff`.
    pub fn kick_idle(&self, cutoff: Instant) {
        let idle: Vec<SessionId> = self
            .sessions
            .borrow()
            .iter()
            .filter(|(_, e)| e.last_rx < cutoff && !e.session.is_closing())
            .map(|(&sid, _)| sid)
            .collect();
        for sid in idle {
            self.kick(sid, Code::Idle);
        }
    }

    /// Kick every session (the gateway is stopping).
    pub fn kick_all(&self, code: Code) {
        let all: Vec<SessionId> = self.sessions.borrow().keys().copied().collect();
        for sid in all {
            self.kick(sid, code);
        }
    }
}

impl AnswerSink for ShardCtx {
    fn on_answer(&self, p: Pending, a: Answer) {
        if p.login {
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
                let binding = e.session.on_login_result(accepted);
                if binding {
                    let reply = LoginReply {
                        req_id: p.req_id,
                        msg_id: a.msg_id,
                        code: a.code,
                        body: a.body.clone(),
                    };
                    e.bind = Some((a.player, reply));
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
            return;
        }
        if let Some(e) = self.sessions.borrow_mut().get_mut(&p.session) {
            e.inflight = e.inflight.saturating_sub(1);
            if e.inflight == 0 && e.bind.is_some() {
                e.ctl.notify();
            }
        }
        self.respond(p.session, p.req_id, a.msg_id, a.code, &a.body);
    }
}

/// A fresh reconnect token: 128 bits from the OS CSPRNG.
pub fn new_token() -> [u8; TOKEN_LEN] {
    let mut t = [0u8; TOKEN_LEN];
    if getrandom::getrandom(&mut t).is_err() {
        // The OS refused randomness: fall back to a hash of time and
        // address space, still unique per call. Logged: it should not happen.
        tracing::error!("getrandom failed; token from a weaker source");
        let x = shards::splitmix64(
            Instant::now().elapsed().as_nanos() as u64 ^ (&t as *const _ as u64),
        );
        t[..8].copy_from_slice(&x.to_be_bytes());
        t[8..].copy_from_slice(&shards::splitmix64(x).to_be_bytes());
    }
    t
}

/// Count a connection closing.
pub fn release_connection(counter: &AtomicUsize) {
    counter.fetch_sub(1, Ordering::AcqRel);
}
