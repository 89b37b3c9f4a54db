//! Routes with `order: PerPlayer`: a player's requests of one order group
//! go to the backend one at a time, in the order the client sent them, so
//! their answers come back in that order too. The next one is sent when
//! the one at the backend is answered (or timed out, or could not be
//! sent); one that waited past its deadline (`backend.request_timeout`
//! from when it was read) is answered `TIMEOUT` instead. At most
//! `limits.ordered_queue` wait per player and group; beyond, `OVERLOADED`.
//!
//! The queue belongs to the player, not the session: what a client sent
//! before a drop is sent and answered (into the outbox) while it is away,
//! and replayed in order after its resume. When the gateway drains or the
//! player migrates, the requests still waiting are answered
//! `SHUTTING_DOWN` or `MIGRATING`, in order, once the one at the backend
//! is answered.

use super::{Answer, Asker, Core, Forward};
use crate::error::Error;
use crate::protocol::Code;
use bytes::Bytes;
use std::collections::VecDeque;
use std::time::Instant;

/// One player's order group with a request at a backend.
#[derive(Debug, Default)]
pub(super) struct Lane {
    /// The player's life the requests belong to.
    life: u64,
    /// Requests waiting, with when each was read.
    waiting: VecDeque<(Forward, Instant)>,
}

impl Core {
    /// Send `fwd` (of order group `g`) now if its group has nothing at a
    /// backend, else queue it behind (or refuse it, queue full).
    pub(super) fn send_ordered(&mut self, g: u16, fwd: Forward) {
        let key = (fwd.asker.player, g);
        let max = self.cfg.limits.ordered_queue;
        let now = self.now;
        match self.lanes.get_mut(&key) {
            Some(lane) if lane.life == fwd.asker.life => {
                if lane.waiting.len() >= max {
                    // Not queued, not sent: answered as a request that
                    // could not be sent, with nothing to let go after it.
                    let mut asker = fwd.asker;
                    asker.lane = None;
                    let why = Error::not_sent(Code::Overloaded, "ordered queue full");
                    return self.handle_not_sent(asker, why, now);
                }
                lane.waiting.push_back((fwd, now));
            }
            _ => {
                let old = self.lanes.insert(
                    key,
                    Lane {
                        life: fwd.asker.life,
                        waiting: VecDeque::new(),
                    },
                );
                self.forwards.push_back(fwd);
                // A lane of an earlier life of the player (it ended with a
                // request still at a backend): what waited there is
                // answered now (its accounting balanced; the answer is a
                // stray of that life).
                for (waiting, _) in old.map(|l| l.waiting).unwrap_or_default() {
                    self.answer_instead(waiting, Code::Timeout);
                }
            }
        }
    }

    /// The request of `asker` (of an ordered route) is answered: the next
    /// one of its group goes, or the group has nothing at a backend.
    pub(super) fn next_ordered(&mut self, asker: &Asker) {
        let Some(g) = asker.lane else { return };
        let key = (asker.player, g);
        let timeout = self.cfg.backend.request_timeout;
        loop {
            let next = match self.lanes.get_mut(&key) {
                Some(lane) if lane.life == asker.life => lane.waiting.pop_front(),
                _ => return,
            };
            let Some((fwd, read_at)) = next else {
                self.lanes.remove(&key);
                return;
            };
            // Answered here, in its turn, without reaching the backend:
            // the gateway drains, the player moves, or it waited its whole
            // deadline.
            let instead = if self.is_draining() {
                Some(Code::ShuttingDown)
            } else if self.migrating.contains_key(&asker.player) {
                Some(Code::Migrating)
            } else if self.now.saturating_duration_since(read_at) >= timeout {
                bump_timeout(self);
                Some(Code::Timeout)
            } else {
                None
            };
            if let Some(code) = instead {
                self.answer_instead(fwd, code);
                continue;
            }
            let mut fwd = fwd;
            fwd.read_at = Some(read_at);
            self.forwards.push_back(fwd);
            return;
        }
    }
}

impl Core {
    /// Answer a waiting request `code` without sending it, as the gateway
    /// answers for a backend (its session's accounting balanced).
    fn answer_instead(&mut self, fwd: Forward, code: Code) {
        let a = Answer {
            from_backend: false,
            code: code.into(),
            msg_id: fwd.header.msg_id,
            player: 0,
            body: Bytes::new(),
        };
        let mut asker = fwd.asker;
        asker.lane = None;
        self.handle_answer(asker, a, self.now);
    }
}

fn bump_timeout(core: &mut Core) {
    super::bump(&core.stats.ordered_timeouts);
}
