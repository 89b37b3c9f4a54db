//! Client frames and what they lead to: requests (routed, refused or sent
//! to a backend), ACK and PING, RESUME, BYE; a login or resume completed on
//! the player's home shard; backend answers delivered to the player.

use super::event::{Event, PlayerEnd};
use super::{add, bump, Asker, ClusterOut, Core, Forward};
use crate::error::Error;
use crate::player::{token_player, Player, ResumeError};
use crate::protocol::{encode, session_body, Code, Frame, Header, Kind};
use crate::session::{Arrival, CloseReason, Decision, LoginReply, Next, Session, SessionId};
use bytes::{Bytes, BytesMut};
use std::time::Instant;

/// What the read loop of a session must do next, decided by the core.
#[derive(Debug, Default)]
pub enum Step {
    /// Go on reading.
    Read,
    /// Stop reading and wait to be woken.
    Pause,
    /// Close the connection after the queued output.
    #[default]
    Close,
    /// Move the connection to shard `home`, where `arrival` completes.
    Handoff { home: usize, arrival: Arrival },
    /// Hand the connection to the new process (a live upgrade): nothing
    /// more is read or answered here.
    Upgrade,
}

impl Core {
    /// What the read loop of `sid` must do now. A login or resume whose
    /// player lives on this shard completes here and now.
    pub fn next_step(&mut self, sid: SessionId, now: Instant) -> Step {
        self.now = now;
        let next = match self.sessions.get_mut(&sid) {
            Some(c) => c.session.next_step(),
            None => Next::Close,
        };
        let arrival = match next {
            Next::Read if self.upgrading => {
                return if self.can_leave(sid) {
                    Step::Upgrade
                } else {
                    Step::Pause
                };
            }
            Next::Read => return Step::Read,
            Next::Pause => return Step::Pause,
            Next::Close => return Step::Close,
            Next::Arrive(a) => a,
        };
        let home = shards::home_shard(arrival.player(), self.count);
        if home == self.id {
            self.arrive(sid, arrival);
            Step::Read
        } else {
            Step::Handoff { home, arrival }
        }
    }

    /// A connection handed over by another shard, registered here as `sid`.
    pub fn handle_handoff(&mut self, sid: SessionId, arrival: Arrival, now: Instant) {
        self.now = now;
        bump(&self.stats.handoffs_in);
        let rate = self.cfg.limits.rate;
        if let Some(c) = self.sessions.get_mut(&sid) {
            c.session = Session::arriving(&arrival, now, rate);
        }
        self.arrive(sid, arrival);
    }

    /// A session on the player's home shard completes its login or resume.
    fn arrive(&mut self, sid: SessionId, arrival: Arrival) {
        if self.is_drained() {
            // The players went to the snapshot: this one must come back
            // through the next gateway.
            return self.kick(sid, Code::Shutdown);
        }
        // A player not held here needs room for one more (max_players).
        let Some(arrival) = self.room_for(sid, arrival) else {
            return;
        };
        // In a cluster, a player this gateway does not hold is claimed (and
        // fetched from its holder) first.
        if self.clustered && !self.players.contains_key(&arrival.player()) {
            self.cluster_out
                .push_back(ClusterOut::Claim { sid, arrival });
            return;
        }
        self.arrive_here(sid, arrival);
    }

    /// The cluster's answer to a [`ClusterOut::Claim`]: the player may be
    /// served here (its state, if any, already restored), or not (the
    /// login is answered `BACKEND_UNAVAILABLE`, the resume refused).
    pub fn handle_claimed(
        &mut self,
        sid: SessionId,
        arrival: Arrival,
        claim: Result<(), Error>,
        now: Instant,
    ) {
        self.now = now;
        match claim {
            Ok(()) => self.arrive_here(sid, arrival),
            Err(error) => {
                let code = match error.code {
                    Code::AlreadyOnline => {
                        bump(&self.stats.second_logins_refused);
                        Code::AlreadyOnline
                    }
                    _ => Code::BackendUnavailable,
                };
                self.metrics.error(error.origin, error.code.into());
                self.event(Event::ArrivalRefused {
                    sid,
                    player: arrival.player(),
                    error,
                });
                self.refuse_arrival(sid, arrival, code);
            }
        }
    }

    /// Complete a login or resume with the player (if any) in this table.
    fn arrive_here(&mut self, sid: SessionId, arrival: Arrival) {
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

    /// A login or resume that cannot be served (the cluster could not give
    /// this gateway the player): the session stays open, logged out; a
    /// login is answered `code`.
    fn refuse_arrival(&mut self, sid: SessionId, arrival: Arrival, code: Code) {
        if let Some(c) = self.sessions.get_mut(&sid) {
            c.session.binding_failed();
        }
        match arrival {
            Arrival::Login { reply, .. } => {
                bump(&self.stats.logins_rejected);
                self.respond(sid, reply.req_id, reply.msg_id, code.into(), &[]);
            }
            Arrival::Resume { .. } => self.reject_resume(sid, Code::ResumeRejected),
        }
    }

    // ----- output of sequenced frames ----------------------------------

    /// A sequenced frame to `player`: it takes the next seq and waits in
    /// the outbox until acknowledged; if the player has a session it is
    /// queued there too. Returns false if this shard does not hold the player.
    /// `body` is kept as it is (a broadcast passes one shared body to
    /// every player): a body sliced from a larger read buffer is copied
    /// by the caller, or it would keep the whole buffer alive.
    pub(super) fn deliver(&mut self, player: u64, h: Header, body: Bytes) -> bool {
        let Some(p) = self.players.get_mut(&player) else {
            return false;
        };
        let limit = self.cfg.write_queue_bytes;
        let sessions = &mut self.sessions;
        let mut queued = None;
        let session = p.session;
        let evicted = p.sequence(h, body, |frame| {
            if let Some(sid) = session {
                queued = Self::push_tx(sessions, sid, limit, |out| frame.write_to(out))
                    .map(|over| (sid, over));
            }
        });
        add(&self.stats.evictions, evicted as u64);
        if let Some((sid, over)) = queued {
            self.queued(sid, over);
        }
        self.check_outboxes();
        true
    }

    /// A RESPONSE to a request of session `sid`: sequenced when the session
    /// is bound to a player, seq 0 before login.
    pub(super) fn respond(
        &mut self,
        sid: SessionId,
        req_id: u32,
        msg_id: u32,
        code: u16,
        body: &[u8],
    ) {
        self.metrics.response(self.router.slot(msg_id), code);
        let h = Header {
            kind: Kind::Response,
            flags: 0,
            code,
            msg_id,
            req_id,
            seq: 0,
        };
        match self.session_player(sid) {
            Some(p) if self.deliver(p, h, Bytes::copy_from_slice(body)) => {}
            _ => self.send_plain(sid, h, body),
        }
    }

    // ----- client frames -------------------------------------------------

    /// One frame from a client.
    pub fn handle_frame(&mut self, sid: SessionId, frame: Frame, now: Instant) {
        self.now = now;
        // A whole frame keeps the session alive (stray bytes do not).
        if let Some(c) = self.sessions.get_mut(&sid) {
            c.session.touch(now);
        }
        let h = frame.header;
        match h.kind {
            Kind::Request => self.on_request(sid, &h, frame.body),
            Kind::Ping | Kind::Ack => self.on_ack(sid, &h),
            Kind::Resume => self.on_resume(sid, &h, frame.body),
            Kind::Bye => self.on_bye(sid),
            // The client-link decoder admits no other kind.
            _ => self.protocol_error(
                sid,
                Error::protocol(format!("kind {} from a client", h.kind.name())),
            ),
        }
    }

    fn on_ack(&mut self, sid: SessionId, h: &Header) {
        let mut last = 0;
        if let Some(p) = self.session_player(sid) {
            let acked = self
                .players
                .get_mut(&p)
                .map(|pl| (pl.ack(h.seq), pl.last_seq()));
            match acked {
                Some((Err(e), _)) => {
                    return self.protocol_error(sid, Error::protocol(e.to_string()))
                }
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

    fn on_bye(&mut self, sid: SessionId) {
        let player = self.session_player(sid);
        self.close(sid, CloseReason::Bye);
        if let Some(p) = player {
            self.players.remove(&p);
            self.released(p);
            self.event(Event::PlayerEnded {
                player: p,
                why: PlayerEnd::Bye,
            });
        }
    }

    fn on_resume(&mut self, sid: SessionId, h: &Header, token: Bytes) {
        if self.is_draining() {
            // Resume on the gateway that comes next.
            return self.kick(sid, Code::Shutdown);
        }
        let refused = {
            let Some(c) = self.sessions.get_mut(&sid) else {
                return;
            };
            match c.session.resume(token_player(&token), token, h.seq) {
                Decision::Forward { .. } => {
                    self.wake(sid, true, false);
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

    pub(super) fn reject_resume(&mut self, sid: SessionId, code: Code) {
        match code {
            Code::ResumeGap => bump(&self.stats.resumes_gap),
            _ => bump(&self.stats.resumes_rejected),
        }
        self.send_error(sid, code);
        let failures = self
            .sessions
            .get_mut(&sid)
            .map_or(0, |c| c.session.resume_refused());
        // Each refused resume may have moved the connection between
        // shards: a client that keeps guessing is cut off.
        if failures >= crate::session::MAX_RESUME_FAILURES {
            self.protocol_error(
                sid,
                Error::protocol(format!("{failures} resumes refused on one connection")),
            );
        }
    }

    fn on_request(&mut self, sid: SessionId, h: &Header, body: Bytes) {
        #[cfg(feature = "fault-injection")]
        if h.msg_id == super::FAULT_PANIC_MSG_ID {
            panic!("fault injection: a panic while handling session {sid}'s request");
        }
        self.metrics.request(self.router.slot(h.msg_id));
        if self.is_draining() {
            return self.respond(sid, h.req_id, h.msg_id, Code::ShuttingDown.into(), &[]);
        }
        let router = self.router.clone();
        let route = router.lookup(h.msg_id);
        let now = self.now;
        let (decision, player) = {
            let Some(c) = self.sessions.get_mut(&sid) else {
                return;
            };
            let mut decision = c.session.admit(route, &self.cfg.limits, now);
            // The bytes a session may have at backends: a few clients
            // sending large requests cannot take a backend connection's
            // whole queue (one request always goes, however large).
            let heavy =
                c.session.inflight_bytes() + body.len() > self.cfg.limits.session_inflight_bytes;
            if decision == (Decision::Forward { login: false }) && heavy && c.session.inflight() > 0
            {
                decision = Decision::Reply(Code::Overloaded);
            }
            match decision {
                Decision::Reply(Code::RateLimited) => bump(&self.stats.rate_limited),
                Decision::Reply(Code::Overloaded) => bump(&self.stats.overloaded),
                _ => {}
            }
            (decision, c.session.player().unwrap_or(0))
        };
        match decision {
            Decision::Ignore => {}
            Decision::Reply(code) => self.respond(sid, h.req_id, h.msg_id, code.into(), &[]),
            Decision::Forward { login } => {
                let Some(route) = route else { return };
                let life = self.players.get(&player).map_or(0, |p| p.life);
                let mut light = true;
                let bytes = body.len();
                if let Some(c) = self.sessions.get_mut(&sid) {
                    light = c.session.inflight() == 0;
                    c.session.forwarded(login);
                    c.session.count_inflight_bytes(body.len(), true);
                }
                let lane = route.lane.filter(|_| player != 0 && !login);
                let fwd = Forward {
                    route: route.clone(),
                    header: *h,
                    body,
                    asker: Asker {
                        session: sid,
                        player,
                        life,
                        req_id: h.req_id,
                        msg_id: h.msg_id,
                        login,
                        bytes: bytes as u32,
                        light,
                        lane,
                    },
                    read_at: None,
                };
                match lane {
                    // A route with `order: PerPlayer`: one at a time.
                    Some(g) => self.send_ordered(g, fwd),
                    None => self.forwards.push_back(fwd),
                }
            }
        }
    }

    /// A [`Forward`] could not be sent: the client gets the error's code.
    pub fn handle_not_sent(&mut self, asker: Asker, err: Error, now: Instant) {
        self.now = now;
        let code = err.code;
        self.failed(asker.session, Some(asker.req_id), err);
        if let Some(c) = self.sessions.get_mut(&asker.session) {
            c.session.not_forwarded(asker.login);
            c.session.count_inflight_bytes(asker.bytes as usize, false);
        }
        if code == Code::Overloaded {
            bump(&self.stats.overloaded);
        }
        let same_life = self
            .players
            .get(&asker.player)
            .is_some_and(|p| p.life == asker.life);
        if asker.player != 0 && !asker.login && same_life {
            // A logged-in player's request: the answer is the player's,
            // whichever session it has now. (A request waiting in an order
            // group is sent, or not, long after it was read: its session
            // may be gone.)
            let h = Header {
                kind: Kind::Response,
                flags: 0,
                code: code.into(),
                msg_id: asker.msg_id,
                req_id: asker.req_id,
                seq: 0,
            };
            self.metrics
                .response(self.router.slot(asker.msg_id), code.into());
            self.deliver(asker.player, h, Bytes::new());
        } else if asker.player != 0 && !asker.login {
            self.event(Event::StrayAnswer {
                player: asker.player,
                req_id: asker.req_id,
            });
        } else {
            self.respond(asker.session, asker.req_id, asker.msg_id, code.into(), &[]);
        }
        self.next_ordered(&asker);
    }

    // ----- login and resume on the home shard ---------------------------

    /// Bind `sid` to `player`, which this shard now holds: an older session
    /// of the player is kicked (`REPLACED`) and the new one is queued
    /// `frames_before` (SESSION and any replay). Returns false if `sid` is gone.
    fn attach(
        &mut self,
        sid: SessionId,
        player: u64,
        old: Option<SessionId>,
        frames_before: BytesMut,
    ) -> bool {
        if let Some(old) = old.filter(|&o| o != sid) {
            self.kick(old, Code::Replaced);
        }
        let bound = match self.sessions.get_mut(&sid) {
            Some(c) if !c.session.is_closing() => {
                c.session.bind(player);
                c.tx.buf.extend_from_slice(&frames_before);
                c.tx.pushed_total += frames_before.len() as u64;
                c.session.replayed_until(c.tx.pushed_total);
                true
            }
            _ => false,
        };
        if !bound {
            self.detach(player, sid);
            return false;
        }
        self.wake(sid, false, true);
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
    fn login(&mut self, sid: SessionId, player: u64, reply: LoginReply) {
        if self.cfg.on_second_login == crate::config::SecondLogin::RejectNew
            && self.has_live_session(player, Some(sid))
        {
            if let Some(c) = self.sessions.get_mut(&sid) {
                c.session.binding_failed();
            }
            bump(&self.stats.logins_rejected);
            bump(&self.stats.second_logins_refused);
            self.event(Event::SecondLoginRefused { sid, player });
            let code = Code::AlreadyOnline.into();
            return self.respond(sid, reply.req_id, reply.msg_id, code, &[]);
        }
        if !self.may_take_over(sid, player) {
            if let Some(c) = self.sessions.get_mut(&sid) {
                c.session.binding_failed();
            }
            bump(&self.stats.logins_rejected);
            let code = Code::RateLimited.into();
            return self.respond(sid, reply.req_id, reply.msg_id, code, &[]);
        }
        let now = self.now;
        let secret = self.new_secret();
        let life = if self.players.contains_key(&player) {
            0
        } else {
            self.new_life()
        };
        let (old, frames) = {
            let o = self.cfg.outbox;
            let lifetime = self.cfg.token_lifetime;
            let meter = &self.outbox_meter;
            let p = self.players.entry(player).or_insert_with(|| {
                let mut p = Player::new(player, o.max_frames, o.max_bytes, now);
                p.life = life;
                p.outbox.meter(meter);
                p
            });
            let old = p.attach(sid);
            let token = p.issue_token(secret, now, lifetime);
            let (r, gap) = p.login_point();
            p.lost_history = false;
            let mut frames = BytesMut::new();
            Self::session_frame(player, &token, r, gap, &mut frames);
            for f in p.outbox.after(r) {
                f.write_to(&mut frames);
            }
            (old, frames)
        };
        if !self.attach(sid, player, old, frames) {
            return;
        }
        self.event(Event::Login {
            sid,
            player,
            replaced: old,
        });
        bump(&self.stats.logins_ok);
        self.respond(sid, reply.req_id, reply.msg_id, reply.code, &reply.body);
    }

    /// A RESUME on the player's home shard: `SESSION` (R = L) with a new
    /// token, then exactly the frames after L; or `ERROR`, leaving the
    /// session logged out and open.
    fn resume(&mut self, sid: SessionId, player: u64, token: &[u8], last: u64) {
        let now = self.now;
        let secret = self.new_secret();
        let lifetime = self.cfg.token_lifetime;
        let outcome = match self.players.get_mut(&player) {
            None => Err(ResumeError::Rejected),
            Some(p) => p.resume(token, last, now).map(|()| {
                let old = p.attach(sid);
                let token = p.issue_token(secret, now, lifetime);
                let mut frames = BytesMut::new();
                Self::session_frame(player, &token, last, false, &mut frames);
                for f in p.outbox.after(last) {
                    f.write_to(&mut frames);
                }
                (old, frames)
            }),
        };
        match outcome {
            Ok((old, frames)) => {
                if self.attach(sid, player, old, frames) {
                    bump(&self.stats.resumes_ok);
                    self.event(Event::Resume {
                        sid,
                        player,
                        from: last,
                        replaced: old,
                    });
                }
            }
            Err(e) => {
                if let Some(c) = self.sessions.get_mut(&sid) {
                    c.session.resume_failed();
                }
                self.event(Event::ResumeRefused {
                    sid,
                    player,
                    why: e,
                });
                match e {
                    ResumeError::Rejected => self.reject_resume(sid, Code::ResumeRejected),
                    ResumeError::Gap(_) => self.reject_resume(sid, Code::ResumeGap),
                    ResumeError::Beyond { .. } => {
                        self.protocol_error(sid, Error::protocol(e.to_string()))
                    }
                }
            }
        }
    }
}
