//! The player table seen from outside a session: pushes and broadcasts,
//! the admin commands, the sweep timer (idle kicks, linger), the drain's
//! steps, snapshots, and the core's side of a migration.

use super::event::{Event, PlayerEnd};
use super::{add, ClusterOut, Core};
use crate::player::Player;
use crate::protocol::{encode, Code, Header, Kind};
use crate::session::SessionId;
use bytes::{Bytes, BytesMut};
use std::time::Instant;

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
    /// Players handed to a new process by a live upgrade: not counted
    /// yet, the push is forwarded to it.
    pub away_players: Vec<u64>,
}

impl PushCounts {
    pub fn add(&mut self, o: PushCounts) {
        self.delivered += o.delivered;
        self.cached += o.cached;
        self.offline += o.offline;
        self.offline_players.extend(o.offline_players);
        self.away_players.extend(o.away_players);
    }
}

/// A copy of a player's state, for the admin API and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlayerInfo {
    pub player: u64,
    pub online: bool,
    pub seq: u64,
    pub acked: u64,
    pub outbox: usize,
    pub outbox_bytes: usize,
    pub evictions: u64,
    /// Every seq up to this one is gone from the outbox unacknowledged
    /// (evicted); 0 when nothing was.
    pub evicted_through: u64,
    pub shard: usize,
}

impl Core {
    // ----- push and admin --------------------------------------------------

    /// One PUSH to each of `players` (homed here). Every counted frame has
    /// its seq when this returns.
    pub fn handle_push(
        &mut self,
        players: &[u64],
        msg_id: u32,
        body: &[u8],
        now: Instant,
    ) -> PushCounts {
        self.now = now;
        let mut counts = PushCounts::default();
        let mut h = Header::new(Kind::Push);
        h.msg_id = msg_id;
        let max_held = self.cfg.outbox.max_frames;
        // One copy of the body for every player this shard delivers it to.
        let body = Bytes::copy_from_slice(body);
        for &player in players {
            let online = self.players.get(&player).map(|p| p.session.is_some());
            if online.is_none() {
                match self.transit.get_mut(&player) {
                    // On its way to (or into) a process: the push waits
                    // with it, and follows once it has landed.
                    Some(super::upgrade::Transit::Held(held)) => {
                        if held.len() < max_held {
                            held.push((msg_id, body.clone()));
                            counts.cached += 1;
                        } else {
                            counts.offline += 1;
                        }
                        continue;
                    }
                    Some(super::upgrade::Transit::Gone) => {
                        counts.away_players.push(player);
                        continue;
                    }
                    None => {}
                }
            }
            if let Some(held) = self.migrating.get_mut(&player) {
                // It leaves for another gateway: the push goes with it, up
                // to what an outbox could hold; beyond, it is not taken.
                if held.len() < max_held {
                    held.push((msg_id, body.clone()));
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
                    self.deliver(player, h, body.clone());
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
    pub fn handle_broadcast(&mut self, msg_id: u32, body: &[u8], now: Instant) -> PushCounts {
        let mut ids: Vec<u64> = self.players.keys().copied().collect();
        ids.sort_unstable();
        self.handle_push(&ids, msg_id, body, now)
    }

    /// `KICK ADMIN` to the player's session (`kicked`: it had one here);
    /// with `end`, the player ends too (`ended`: it was held here): its
    /// token stops working, its outbox is dropped, pushes to it count
    /// offline. Without `end` it lingers and may resume (a soft kick).
    pub fn handle_admin_kick(&mut self, player: u64, end: bool, now: Instant) -> (bool, bool) {
        self.now = now;
        let kicked = match self.player_session(player) {
            Some(sid) => {
                self.kick(sid, Code::Admin);
                true
            }
            None => false,
        };
        let ended = end && self.players.remove(&player).is_some();
        if ended {
            self.released(player);
            self.event(Event::PlayerEnded {
                player,
                why: PlayerEnd::Admin,
            });
        }
        (kicked, ended)
    }

    /// Up to `limit` players with id > `after`, ascending.
    pub fn list_players(&self, after: u64, limit: usize) -> Vec<PlayerInfo> {
        let mut ids: Vec<u64> = self
            .players
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

    /// A copy of a player's state.
    pub fn player_info(&self, player: u64) -> Option<PlayerInfo> {
        let p = self.players.get(&player)?;
        Some(PlayerInfo {
            player,
            online: p.session.is_some(),
            seq: p.last_seq(),
            acked: p.acked(),
            outbox: p.outbox.len(),
            outbox_bytes: p.outbox.bytes(),
            evictions: p.outbox.evictions(),
            evicted_through: p.outbox.evicted_through(),
            shard: self.id,
        })
    }

    // ----- timers ----------------------------------------------------------

    /// The sweep: kick every session idle for `session_idle`, end every
    /// player without a session for `player_linger`.
    pub fn handle_tick(&mut self, now: Instant) {
        self.now = now;
        if let Some(cutoff) = now.checked_sub(self.cfg.session_idle) {
            self.kick_where(Code::Idle, |s| s.quiet_since(cutoff));
        }
        self.login_deadlines(now);
        self.frame_deadlines(now);
        self.end_lingering(now);
        self.check_buffers();
        self.check_outboxes();
    }

    /// A connection that has not logged in (or resumed) `login_timeout`
    /// after it was accepted gets `KICK LOGIN_TIMEOUT`: a crowd of silent
    /// or slow sockets cannot hold the connection slots for long.
    fn login_deadlines(&mut self, now: Instant) {
        let limit = self.cfg.login_timeout;
        let sessions = &self.sessions;
        let mut late = Vec::new();
        self.unbound.retain(|sid, since| {
            let Some(c) = sessions.get(sid) else {
                return false;
            };
            if c.session.player().is_some() || c.session.is_closing() {
                return false;
            }
            // A login or resume in progress is bounded by its own
            // deadline (the backend's request timeout); the next sweep
            // after it failed finds the session plain Connected again.
            let waiting = c.session.state() == crate::session::State::Connected;
            if waiting && now.saturating_duration_since(*since) >= limit {
                late.push(*sid);
                return false;
            }
            true
        });
        for sid in late {
            super::bump(&self.stats.login_timeouts);
            self.kick(sid, Code::LoginTimeout);
        }
    }

    /// A frame begun and not finished within `frame_timeout`: `KICK IDLE`
    /// (a client that trickles bytes never sends a frame).
    fn frame_deadlines(&mut self, now: Instant) {
        let limit = self.cfg.frame_timeout;
        let late: Vec<SessionId> = self
            .partial
            .iter()
            .filter(|(_, (since, _))| now.saturating_duration_since(*since) >= limit)
            .map(|(&sid, _)| sid)
            .collect();
        for sid in late {
            self.forget_partial(sid);
            super::bump(&self.stats.frame_timeouts);
            self.kick(sid, Code::Idle);
        }
    }

    /// `KICK code` to every session for which `pred` holds.
    pub(super) fn kick_where(
        &mut self,
        code: Code,
        pred: impl Fn(&crate::session::Session) -> bool,
    ) {
        let chosen: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, c)| pred(&c.session))
            .map(|(&sid, _)| sid)
            .collect();
        for sid in chosen {
            self.kick(sid, code);
        }
    }

    fn end_lingering(&mut self, now: Instant) {
        let linger = self.cfg.player_linger;
        let before = self.players.len();
        let mut ended = Vec::new();
        self.players.retain(|id, p| {
            let keep = !p.expired(now, linger);
            if !keep {
                ended.push(*id);
            }
            keep
        });
        for id in ended {
            self.event(Event::PlayerEnded {
                player: id,
                why: PlayerEnd::LingerExpired,
            });
            self.released(id);
        }
        let ended = before - self.players.len();
        if ended > 0 {
            add(&self.stats.players_expired, ended as u64);
            if self.players.capacity() > 64 && self.players.len() < self.players.capacity() / 4 {
                self.players.shrink_to_fit();
            }
        }
    }

    /// The player ended here: tell the cluster.
    pub(super) fn released(&mut self, player: u64) {
        if self.clustered {
            self.cluster_out.push_back(ClusterOut::Release { player });
        }
    }

    // ----- drain and snapshots ------------------------------------------

    /// During a drain: `KICK SHUTDOWN` (after its queued output) to every
    /// session with no request in flight that has sent nothing since
    /// `quiet_since`, or to every such session whatever it sends once
    /// `grace_over`. The grace lets a request already on its way be read
    /// and answered `SHUTTING_DOWN`; after it, a client that keeps sending
    /// cannot hold the drain open (each new request is answered at once, so
    /// a session's in-flight count only falls). Returns the sessions still
    /// open.
    pub fn handle_drain_kicks(
        &mut self,
        quiet_since: Instant,
        grace_over: bool,
        now: Instant,
    ) -> usize {
        self.now = now;
        self.kick_where(Code::Shutdown, |s| {
            s.inflight() == 0 && !s.is_closing() && (grace_over || s.quiet_after(quiet_since))
        });
        self.session_count()
    }

    /// Every player as a snapshot keeps it.
    pub fn images(&self, now: Instant, unix_ms: u64) -> Vec<crate::snapshot::PlayerImage> {
        let mut v: Vec<_> = self
            .players
            .values()
            .map(|p| p.to_image(now, unix_ms))
            .collect();
        v.sort_unstable_by_key(|p| p.id);
        v
    }

    /// Load players from a snapshot (all homed here). Players whose linger
    /// ran out while the gateway was down are dropped. Returns (loaded, dropped).
    pub fn restore(
        &mut self,
        images: &[crate::snapshot::PlayerImage],
        now: Instant,
        unix_ms: u64,
    ) -> (usize, usize) {
        self.now = now;
        let o = self.cfg.outbox;
        let linger = self.cfg.player_linger;
        let mut dropped = 0;
        for img in images {
            let mut p = Player::from_image(img, o.max_frames, o.max_bytes, now, unix_ms);
            if p.expired(now, linger) {
                dropped += 1;
                self.transit.remove(&p.id);
                continue;
            }
            p.life = self.new_life();
            p.outbox.meter(self.meter());
            let id = p.id;
            self.players.insert(id, p);
            self.land(id);
        }
        (self.players.len(), dropped)
    }

    // ----- the cluster -------------------------------------------------------

    /// Whether this shard holds `player`.
    pub fn holds(&self, player: u64) -> bool {
        self.players.contains_key(&player)
    }

    /// Another gateway takes `player` over: its session here is kicked
    /// (`REPLACED`) and its state goes to gateway `to`. For a `login` under
    /// `on_second_login: RejectNew`, a player with a live session here
    /// stays, and `to` is refused.
    pub fn handle_give_away(
        &mut self,
        player: u64,
        to: &str,
        login: bool,
        now: Instant,
        unix_ms: u64,
    ) {
        self.now = now;
        if !self.clustered {
            return;
        }
        if login
            && self.cfg.on_second_login == crate::config::SecondLogin::RejectNew
            && self.has_live_session(player, None)
        {
            crate::core::stats::bump(&self.stats.second_logins_refused);
            self.cluster_out.push_back(ClusterOut::Refuse {
                player,
                to: to.to_string(),
            });
            return;
        }
        if let Some(sid) = self.player_session(player) {
            self.kick(sid, Code::Replaced);
        }
        let image = self.players.remove(&player).and_then(|p| {
            let img = crate::snapshot::Image {
                taken_unix_ms: unix_ms,
                shards: 1,
                players: vec![p.to_image(now, unix_ms)],
            };
            img.encode().ok()
        });
        self.event(Event::GaveAway {
            player,
            to: to.to_string(),
            with_state: image.is_some(),
        });
        self.cluster_out.push_back(ClusterOut::Give {
            player,
            to: to.to_string(),
            image,
        });
    }

    /// A player whose gateway died holding it starts here with nothing;
    /// its first SESSION says `GAP`.
    pub fn start_lost(&mut self, player: u64, now: Instant) {
        self.now = now;
        let o = self.cfg.outbox;
        let mut p = Player::new(player, o.max_frames, o.max_bytes, now);
        p.life = self.new_life();
        p.lost_history = true;
        p.outbox.meter(self.meter());
        self.players.entry(player).or_insert(p);
    }

    /// A migration of `player` begins: its session reads nothing more and
    /// pushes for it are held. Err: it cannot begin.
    pub fn begin_migration(&mut self, player: u64) -> Result<(), crate::error::Error> {
        use crate::error::{Error, Origin};
        if !self.players.contains_key(&player) {
            let why = format!("player {player} is not on this gateway");
            return Err(Error::new(Origin::Cluster, Code::Migrating, true, why));
        }
        if self.migrating.contains_key(&player) {
            let why = format!("player {player} is already migrating");
            return Err(Error::new(Origin::Cluster, Code::Migrating, true, why));
        }
        self.migrating.insert(player, Vec::new());
        self.hold_session(player, true);
        Ok(())
    }

    /// The requests of `player`'s session still at a backend.
    pub fn player_inflight(&self, player: u64) -> u32 {
        self.player_session(player)
            .and_then(|sid| self.sessions.get(&sid).map(|c| c.session.inflight()))
            .unwrap_or(0)
    }

    /// The image a migration hands over (None: the player ended meanwhile).
    pub fn migration_image(
        &self,
        player: u64,
        now: Instant,
        unix_ms: u64,
    ) -> Option<Result<Vec<u8>, crate::error::Error>> {
        let p = self.players.get(&player)?;
        Some(
            crate::snapshot::Image {
                taken_unix_ms: unix_ms,
                shards: 1,
                players: vec![p.to_image(now, unix_ms)],
            }
            .encode()
            .map_err(|e| {
                crate::error::Error::new(
                    crate::error::Origin::Internal,
                    Code::Migrating,
                    true,
                    format!("the player's image could not be encoded: {e}"),
                )
            }),
        )
    }

    /// The migration failed (`why`, counted and logged): the held pushes
    /// are delivered here and the session reads again.
    pub fn rollback_migration(&mut self, player: u64, why: &crate::error::Error, now: Instant) {
        self.now = now;
        self.metrics.error(why.origin, why.code.into());
        self.event(Event::MigrationRolledBack {
            player,
            error: why.clone(),
        });
        let held = self.migrating.remove(&player).unwrap_or_default();
        for (msg_id, body) in held {
            let mut h = Header::new(Kind::Push);
            h.msg_id = msg_id;
            self.deliver(player, h, body);
        }
        self.hold_session(player, false);
    }

    /// The target took the player: the client goes to `addr` with a token
    /// valid there (`REDIRECT`), the player is forgotten here. Returns the
    /// pushes held meanwhile, which follow it.
    pub fn complete_migration(
        &mut self,
        player: u64,
        addr: &str,
        now: Instant,
    ) -> Vec<(u32, Bytes)> {
        self.now = now;
        let held = self.migrating.remove(&player).unwrap_or_default();
        self.redirect_away(player, addr);
        held
    }

    fn hold_session(&mut self, player: u64, held: bool) {
        if let Some(sid) = self.player_session(player) {
            if let Some(c) = self.sessions.get_mut(&sid) {
                c.session.hold(held);
            }
            self.wake(sid, true, false);
        }
    }

    /// Tell the client of `player` to go to `addr` with a token valid
    /// there (`REDIRECT`), close its session, and forget the player.
    fn redirect_away(&mut self, player: u64, addr: &str) {
        let Some(p) = self.players.remove(&player) else {
            return;
        };
        let Some(sid) = p.session else { return };
        let (secret, _) = p.token();
        let mut token = Vec::with_capacity(crate::player::TOKEN_LEN);
        token.extend_from_slice(&player.to_be_bytes());
        token.extend_from_slice(&secret);
        let mut body = BytesMut::new();
        crate::protocol::redirect_body(&mut body, addr, &token);
        let h = Header::new(Kind::Redirect);
        if let Some(c) = self.sessions.get_mut(&sid) {
            let before = c.tx.buf.len();
            encode(&mut c.tx.buf, &h, &body);
            c.tx.pushed_total += (c.tx.buf.len() - before) as u64;
            c.session.close(crate::session::CloseReason::Redirect);
        }
        self.close_tx(sid);
    }

    /// Players held here, ascending (an evacuation moves them all).
    pub fn player_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.players.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    // ----- metrics -------------------------------------------------------------

    /// The core's part of the shard's metrics (the shell adds the backend
    /// pool's and the mesh's).
    pub fn snapshot(&self) -> crate::metrics::Snapshot {
        use crate::session::State;
        let mut s = crate::metrics::Snapshot {
            shard: self.id,
            ..Default::default()
        };
        for c in self.sessions.values() {
            let i = match c.session.state() {
                State::Connected => 0,
                State::Authenticating => 1,
                State::Binding { .. } => 2,
                State::Resuming => 3,
                State::Authenticated { .. } => 4,
                State::Closing => 5,
            };
            s.sessions[i] += 1;
        }
        for p in self.players.values() {
            if p.session.is_some() {
                s.players_online += 1;
            } else {
                s.players_lingering += 1;
            }
            s.outbox_frames += p.outbox.len() as u64;
            s.outbox_bytes += p.outbox.bytes() as u64;
        }
        let b = self.budgets();
        s.outbox_budget = b.outboxes.map(|b| b as u64);
        s.buffer_budget = b.buffers.map(|b| b as u64);
        s.buffer_bytes = self.buffer_bytes() as u64;
        s.players_max = b.players as u64;
        s.draining = self.is_draining();
        self.metrics.fill(&mut s);
        s
    }
}
