//! A shard's memory budgets: no crowd of slow, silent or lingering clients
//! can make it hold more than its share of the machine.
//!
//! - **Outboxes** (`memory.outboxes`): every outbox counts its bytes in
//!   the shard's [`Meter`]; past the budget the oldest frames of the
//!   largest outboxes go first, down to seven eighths of it, so that one
//!   pass frees room for many frames (a later resume of those players gets
//!   `RESUME_GAP`, a login `GAP`, as for any eviction).
//! - **Connection buffers** (`memory.buffers`): frames begun and not
//!   finished (the shell reports what each connection holds) and output
//!   not yet written; past the budget the sessions holding the most are
//!   kicked `SLOW_CONSUMER` until the rest fit in seven eighths of it.
//! - **Players** (`max_players`): each shard holds at most its share; a
//!   login of a player it does not hold is answered `OVERLOADED` beyond it.
//! - **Takeovers** (`limits.takeovers`): the flapping guard of logins that
//!   replace a live session.

use super::{bump, Core, Event};
use crate::config::Config;
use crate::player::outbox::Meter;
use crate::protocol::Code;
use crate::session::{Arrival, SessionId};
use std::time::Instant;

/// The budgets of one shard, resolved from the config and the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    /// Bytes of all outboxes (None: no budget).
    pub outboxes: Option<usize>,
    /// Bytes of partial frames and unsent output (None: no budget).
    pub buffers: Option<usize>,
    /// Players held.
    pub players: usize,
}

impl Budgets {
    /// `cfg`'s budgets for one of `shards` shards. `Auto` takes a quarter of
    /// the memory (`crate::limits::physical_memory`) for outboxes and an
    /// eighth for buffers, shared equally.
    pub fn new(cfg: &Config, shards: usize) -> Budgets {
        let memory = crate::limits::physical_memory();
        let m = cfg.memory;
        Budgets {
            outboxes: m.outboxes.per_shard(memory, 4, shards),
            buffers: m.buffers.per_shard(memory, 8, shards),
            players: cfg.max_players.div_ceil(shards.max(1)),
        }
    }
}

/// Seven eighths of a budget: where a pass that found it exceeded stops.
fn low_water(budget: usize) -> usize {
    budget - budget / 8
}

impl Core {
    /// The budgets this shard enforces now.
    pub fn budgets(&self) -> Budgets {
        self.budgets
    }

    /// Bytes held in this shard's outboxes.
    pub fn outbox_bytes(&self) -> usize {
        self.outbox_meter.get()
    }

    /// What the outboxes and the connection buffers hold now (as of the
    /// last sweep for unsent output), and the most they held since the
    /// last call: the shell gives memory back to the kernel when a burst
    /// has ended.
    pub fn take_held(&mut self) -> (usize, usize) {
        let now = self.outbox_meter.get() + self.partial_bytes + self.buffered;
        let peak = self.held_peak.max(now);
        self.held_peak = now;
        (now, peak)
    }

    fn note_held(&mut self) {
        let now = self.outbox_meter.get() + self.partial_bytes + self.buffered;
        self.held_peak = self.held_peak.max(now);
    }

    /// Bytes of partial frames (as last reported) and unsent output.
    pub fn buffer_bytes(&self) -> usize {
        self.partial_bytes + self.sessions.values().map(|c| c.tx.queued()).sum::<usize>()
    }

    pub(super) fn meter(&self) -> &Meter {
        &self.outbox_meter
    }

    /// Whether a player not held here may be added.
    pub(super) fn has_room_for_a_player(&self) -> bool {
        self.players.len() < self.budgets.players
    }

    /// After outbox growth: trim if over the budget.
    pub(super) fn check_outboxes(&mut self) {
        self.note_held();
        if let Some(budget) = self.budgets.outboxes {
            if self.outbox_meter.get() > budget {
                self.trim_outboxes(budget);
            }
        }
    }

    /// Bring the outboxes to the low-water mark: the largest are cut to
    /// one level, the smallest such that enough is freed (water-filling),
    /// so the oldest frames of the largest outboxes go first.
    fn trim_outboxes(&mut self, budget: usize) {
        let total = self.outbox_meter.get();
        let Some(excess) = total.checked_sub(low_water(budget)) else {
            return;
        };
        let mut sizes: Vec<(usize, u64)> = self
            .players
            .iter()
            .filter(|(_, p)| !p.outbox.is_empty())
            .map(|(&id, p)| (p.outbox.bytes(), id))
            .collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        // Cut the k largest to `level`, k the fewest that free `excess`.
        let mut sum = 0usize;
        let mut cut = (sizes.len(), 0usize);
        for (k, &(bytes, _)) in sizes.iter().enumerate() {
            sum += bytes;
            let n = k + 1;
            let level = sum.saturating_sub(excess) / n;
            let next = sizes.get(n).map_or(0, |s| s.0);
            if level >= next {
                cut = (n, level);
                break;
            }
        }
        let (n, level) = cut;
        let mut evicted = 0u64;
        for &(_, id) in &sizes[..n] {
            if let Some(p) = self.players.get_mut(&id) {
                evicted += p.outbox.evict_to(level) as u64;
            }
        }
        super::add(&self.stats.evictions, evicted);
        super::add(&self.stats.budget_evictions, evicted);
    }

    /// The shell's report: the connection of `sid` now holds `bytes` of a
    /// frame begun and not whole (0: none). Past `frame_timeout` such a
    /// frame gets the session kicked (`IDLE`: a frame that never finishes
    /// is no frame); past the buffer budget, the largest holders go.
    pub fn handle_partial_frame(&mut self, sid: SessionId, bytes: usize, now: Instant) {
        self.now = now;
        if bytes > 0 && self.sessions.contains_key(&sid) {
            let entry = self.partial.entry(sid).or_insert((now, 0));
            self.partial_bytes = self.partial_bytes - entry.1 + bytes;
            entry.1 = bytes;
            self.note_held();
            if let Some(budget) = self.budgets.buffers {
                // Partial frames alone over the budget: a pass (which sums
                // every session) brings all to the low-water mark, so the
                // next one needs an eighth of the budget in new bytes;
                // output is summed on every sweep.
                if self.partial_bytes > budget {
                    self.check_buffers();
                }
            }
        } else {
            self.forget_partial(sid);
        }
    }

    pub(super) fn forget_partial(&mut self, sid: SessionId) {
        if let Some((_, held)) = self.partial.remove(&sid) {
            self.partial_bytes -= held;
        }
    }

    /// Kick the sessions holding the most buffered bytes until the rest
    /// fit in the low-water mark, if the budget is exceeded. Closing
    /// sessions count for nothing: what they hold goes with them.
    pub(super) fn check_buffers(&mut self) {
        let mut held: Vec<(usize, SessionId)> = self
            .sessions
            .iter()
            .filter(|(_, c)| !c.session.is_closing())
            .map(|(&sid, c)| {
                let partial = self.partial.get(&sid).map_or(0, |p| p.1);
                (partial + c.tx.queued(), sid)
            })
            .filter(|h| h.0 > 0)
            .collect();
        let mut total: usize = held.iter().map(|h| h.0).sum();
        self.buffered = total.saturating_sub(self.partial_bytes.min(total));
        self.note_held();
        let Some(budget) = self.budgets.buffers.filter(|&b| total > b) else {
            return;
        };
        held.sort_unstable_by(|a, b| b.cmp(a));
        for (bytes, sid) in held {
            if total <= low_water(budget) {
                break;
            }
            total -= bytes;
            bump(&self.stats.budget_kicks);
            self.kick(sid, Code::SlowConsumer);
            // Its buffer goes with the close (the shell drops it once the
            // KICK is out): not counted again by the next report.
            self.forget_partial(sid);
        }
    }

    /// `arrival` if its player is held here or there is room for one more
    /// (`max_players`); else it is refused (a login `OVERLOADED`, a resume
    /// `RESUME_REJECTED`) and None.
    pub(super) fn room_for(&mut self, sid: SessionId, arrival: Arrival) -> Option<Arrival> {
        if self.players.contains_key(&arrival.player()) || self.has_room_for_a_player() {
            return Some(arrival);
        }
        bump(&self.stats.players_refused);
        if let Some(c) = self.sessions.get_mut(&sid) {
            c.session.binding_failed();
        }
        match arrival {
            Arrival::Login { reply, .. } => {
                bump(&self.stats.logins_rejected);
                let code = Code::Overloaded.into();
                self.respond(sid, reply.req_id, reply.msg_id, code, &[]);
            }
            Arrival::Resume { .. } => self.reject_resume(sid, Code::ResumeRejected),
        }
        None
    }

    /// Whether `player` has a session (other than `sid`) that is not
    /// closing.
    pub(super) fn has_live_session(&self, player: u64, sid: Option<SessionId>) -> bool {
        self.players
            .get(&player)
            .and_then(|p| p.session)
            .is_some_and(|old| {
                Some(old) != sid
                    && self
                        .sessions
                        .get(&old)
                        .is_some_and(|c| !c.session.is_closing())
            })
    }

    /// The takeover flapping guard (`limits.takeovers`): whether the login
    /// on `sid` may replace the player's live session, if it has one (a
    /// player with no session, such as one whose connection dropped, is
    /// never refused). Resumes are not guarded: a token is single use and
    /// replaced by every login, so a valid one is held only by the client
    /// of the latest session; its resume is that client coming back, often
    /// before the gateway noticed its old connection drop. Two clients
    /// taking an account from each other must log in each time.
    pub(super) fn may_take_over(&mut self, sid: SessionId, player: u64) -> bool {
        let Some(limit) = self.cfg.limits.takeovers else {
            return true;
        };
        let now = self.now;
        let Some(p) = self.players.get_mut(&player) else {
            return true;
        };
        let live = p.session.is_some_and(|old| {
            old != sid
                && self
                    .sessions
                    .get(&old)
                    .is_some_and(|c| !c.session.is_closing())
        });
        if !live || p.takeovers.take_over(limit, now).is_ok() {
            return true;
        }
        bump(&self.stats.takeovers_refused);
        self.event(Event::TakeoverRefused { sid, player });
        false
    }
}
