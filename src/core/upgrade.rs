//! A live upgrade's part in the core: while the shard hands its sessions
//! to a new process, each session reads nothing more and, once it has
//! nothing at a backend, leaves with its player's state; the new process
//! takes each one in without a word on the wire (no SESSION, no KICK: the
//! client's stream goes on with the next seq).

use super::Core;
use crate::player::Player;
use crate::protocol::{Header, Kind};
use crate::session::{SessionId, State};
use crate::snapshot::PlayerImage;
use crate::upgrade::channel::SessionImage;
use bytes::Bytes;
use std::time::{Duration, Instant};

/// A session as it leaves for the new process (its socket goes with it).
#[derive(Debug)]
pub struct Leaving {
    pub image: SessionImage,
    pub player: Option<PlayerImage>,
}

/// A player between two processes. In the old one: `Held` from the
/// moment its state is taken out until the new process confirms it holds
/// it (pushes meanwhile wait here and follow it, or are delivered here
/// again if it comes back), then `Gone` (pushes are forwarded). In the
/// new one: `Held` from the batch's arrival until its session binds it
/// (its task starts a moment later), pushes forwarded meanwhile wait.
#[derive(Debug)]
pub enum Transit {
    Held(Vec<(u32, Bytes)>),
    Gone,
}

impl Core {
    /// `players` are on their way into this shard (the new process):
    /// pushes for them wait until each lands.
    pub fn expect(&mut self, players: impl IntoIterator<Item = u64>) {
        for id in players {
            self.transit.insert(id, Transit::Held(Vec::new()));
        }
    }

    /// The new process holds `players` now: the pushes held for them here
    /// go after them (in order), and later ones are forwarded.
    pub fn departed(&mut self, players: &[u64]) -> Vec<(u64, Vec<(u32, Bytes)>)> {
        let mut out = Vec::new();
        for &id in players {
            if let Some(Transit::Held(held)) = self.transit.insert(id, Transit::Gone) {
                if !held.is_empty() {
                    out.push((id, held));
                }
            }
        }
        out
    }

    /// `player` is held here again (taken back, or arrived): the pushes
    /// that waited for it are delivered, in order.
    pub(super) fn land(&mut self, player: u64) {
        if !self.players.contains_key(&player) {
            return;
        }
        let Some(t) = self.transit.remove(&player) else {
            return;
        };
        if let Transit::Held(held) = t {
            for (msg_id, body) in held {
                let mut h = Header::new(Kind::Push);
                h.msg_id = msg_id;
                self.deliver(player, h, body);
            }
        }
    }

    /// Begin (true) or stop (false, a rollback) handing every session over.
    pub fn set_upgrading(&mut self, on: bool) {
        self.upgrading = on;
        let sids: Vec<SessionId> = self.sessions.keys().copied().collect();
        for sid in sids {
            self.wake(sid, true, false);
        }
    }

    pub fn is_upgrading(&self) -> bool {
        self.upgrading
    }

    /// Whether `sid` can leave now: logged in or not (no login or resume
    /// under way), nothing at a backend or waiting in an order lane, its
    /// player not migrating, no write in progress.
    pub(super) fn can_leave(&self, sid: SessionId) -> bool {
        let Some(c) = self.sessions.get(&sid) else {
            return false;
        };
        if c.session.inflight() > 0 || c.tx.in_write > 0 || c.tx.closing || c.tx.failed {
            return false;
        }
        match c.session.state() {
            State::Connected => true,
            State::Authenticated { player } => {
                !self.migrating.contains_key(&player)
                    && !self.lanes.keys().any(|(p, _)| *p == player)
                    && self
                        .players
                        .get(&player)
                        .is_some_and(|p| p.session == Some(sid))
            }
            _ => false,
        }
    }

    /// Take `sid` out of this shard for the new process: the session and
    /// its player are forgotten here, their state returned. `read`: the
    /// bytes the connection read past its last whole frame. None: it
    /// cannot leave now (see [`Core::can_leave`]).
    pub fn take_leaving(
        &mut self,
        sid: SessionId,
        peer: String,
        read: Vec<u8>,
        now: Instant,
        unix_ms: u64,
    ) -> Option<Leaving> {
        if !self.can_leave(sid) {
            return None;
        }
        self.now = now;
        self.unbound.remove(&sid);
        self.forget_partial(sid);
        let c = self.sessions.remove(&sid)?;
        let player = c.session.player().and_then(|id| self.players.remove(&id));
        if let Some(p) = &player {
            self.transit.insert(p.id, Transit::Held(Vec::new()));
        }
        let image = SessionImage {
            player: player.as_ref().map_or(0, |p| p.id),
            peer,
            read,
            unsent: c.tx.buf.to_vec(),
            resume_failures: c.session.resume_failures(),
            quiet_ms: c.session.quiet_for(now).as_millis() as u64,
            rate_tokens: 0,
        };
        crate::core::stats::bump(&self.stats.upgraded_out);
        Some(Leaving {
            image,
            player: player.map(|p| p.to_image(now, unix_ms)),
        })
    }

    /// Up to `max` players without a session (lingering), taken out for
    /// the new process; players migrating stay.
    pub fn take_lingering(&mut self, max: usize, now: Instant, unix_ms: u64) -> Vec<PlayerImage> {
        let ids: Vec<u64> = self
            .players
            .values()
            .filter(|p| p.session.is_none() && !self.migrating.contains_key(&p.id))
            .filter(|p| !self.lanes.keys().any(|(q, _)| *q == p.id))
            .map(|p| p.id)
            .take(max)
            .collect();
        let out: Vec<PlayerImage> = ids
            .into_iter()
            .filter_map(|id| self.players.remove(&id))
            .map(|p| p.to_image(now, unix_ms))
            .collect();
        for p in &out {
            self.transit.insert(p.id, Transit::Held(Vec::new()));
        }
        out
    }

    /// A session handed over by the old process, registered here as `sid`
    /// (its connection is open, the shell reads it next): bound to its
    /// player at once when it had one, its unsent output queued first.
    /// A player this shard already holds (the client logged in here
    /// meanwhile) keeps its state here, and the arriving session is
    /// refused: false.
    pub fn adopt_arrived(
        &mut self,
        sid: SessionId,
        image: &SessionImage,
        player: Option<&PlayerImage>,
        now: Instant,
        unix_ms: u64,
    ) -> bool {
        self.now = now;
        crate::core::stats::bump(&self.stats.upgraded_in);
        let Some(c) = self.sessions.get_mut(&sid) else {
            return false;
        };
        c.session.set_resume_failures(image.resume_failures);
        c.session
            .quiet_since_ago(now, Duration::from_millis(image.quiet_ms));
        c.tx.buf.extend_from_slice(&image.unsent);
        let Some(img) = player else {
            if !image.unsent.is_empty() {
                self.wake(sid, false, true);
            }
            return true;
        };
        if self.players.contains_key(&img.id) {
            // What waited for the arriving state goes to the one held.
            self.land(img.id);
            return false;
        }
        let o = self.cfg.outbox;
        let mut p = Player::from_image(img, o.max_frames, o.max_bytes, now, unix_ms);
        p.life = self.new_life();
        p.outbox.meter(self.meter());
        p.attach(sid);
        self.players.insert(p.id, p);
        self.unbound.remove(&sid);
        if let Some(c) = self.sessions.get_mut(&sid) {
            c.session.bind(img.id);
        }
        // Unsent output is older than the pushes that waited: it is
        // already in the buffer ahead of them.
        self.land(img.id);
        if !image.unsent.is_empty() {
            self.wake(sid, false, true);
        }
        true
    }
}
