//! The shard's admin side: pushes and broadcasts from the HTTP API,
//! kicks, player listings, metrics, and the steps of drains, snapshots and
//! migrations.

use super::ShardCtx;
use crate::core::{Core, PlayerInfo, PushCounts};
use std::time::Instant;

impl ShardCtx {
    // ----- push and admin --------------------------------------------------

    pub fn push(&self, players: &[u64], msg_id: u32, body: &[u8]) -> PushCounts {
        self.with(|c, now| c.handle_push(players, msg_id, body, now))
    }

    pub fn broadcast(&self, msg_id: u32, body: &[u8]) -> PushCounts {
        self.with(|c, now| c.handle_broadcast(msg_id, body, now))
    }

    /// `(kicked, ended)`: see `Core::handle_admin_kick`.
    pub fn admin_kick(&self, player: u64, end: bool) -> (bool, bool) {
        self.with(|c, now| c.handle_admin_kick(player, end, now))
    }

    pub fn list_players(&self, after: u64, limit: usize) -> Vec<PlayerInfo> {
        self.core.borrow().list_players(after, limit)
    }

    pub fn player_info(&self, player: u64) -> Option<PlayerInfo> {
        self.core.borrow().player_info(player)
    }

    /// The shard's metrics now.
    pub fn snapshot(&self) -> crate::metrics::Snapshot {
        let mut s = self.core.borrow().snapshot();
        let c = self.core.borrow();
        let st = &c.stats;
        let b = &self.backends;
        s.counters = st.list();
        s.counters.extend(b.counters());
        s.mesh_backlog = self.mesh.stats().backlog;
        (s.backends_up, s.backends_unhealthy, s.backends_down) = b.health();
        s
    }

    // ----- cluster, drain and snapshots ------------------------------------

    /// Another gateway takes `player` over.
    pub fn give_away(&self, player: u64, to: &str, login: bool) {
        let unix = crate::snapshot::unix_ms_now();
        self.with(|c, now| c.handle_give_away(player, to, login, now, unix));
    }

    /// A player whose gateway died holding it starts here with nothing.
    pub fn start_lost(&self, player: u64) {
        self.with(|c, now| c.start_lost(player, now));
    }

    /// Requests of this shard waiting for a backend.
    pub fn in_flight(&self) -> usize {
        self.backends.in_flight()
    }

    /// During a drain: `KICK SHUTDOWN` to every session with nothing in
    /// flight that is quiet (or to all of them once `grace_over`); the
    /// sessions still open.
    pub fn drain_kicks(&self, quiet_since: Instant, grace_over: bool) -> usize {
        self.with(|c, now| c.handle_drain_kicks(quiet_since, grace_over, now))
    }

    /// Every player as a snapshot keeps it.
    pub fn images(&self) -> Vec<crate::snapshot::PlayerImage> {
        let unix = crate::snapshot::unix_ms_now();
        self.core.borrow().images(Instant::now(), unix)
    }

    /// Load players from a snapshot (all homed here); (loaded, dropped).
    pub fn restore(&self, images: &[crate::snapshot::PlayerImage]) -> (usize, usize) {
        let unix = crate::snapshot::unix_ms_now();
        self.with(|c, now| c.restore(images, now, unix))
    }

    /// Whether this shard holds `player`.
    pub fn holds(&self, player: u64) -> bool {
        self.core.borrow().holds(player)
    }

    /// Run `f` on the core (the cluster flows' steps).
    pub(crate) fn core_step<R>(&self, f: impl FnOnce(&mut Core, Instant) -> R) -> R {
        self.with(f)
    }
}
