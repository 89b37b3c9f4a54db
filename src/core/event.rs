//! What the core reports for the log: one [`Event`] per lifecycle step of a
//! session or player, drained by the shell with [`Core::poll_event`] and
//! written as a log line there (`shard::log`). The core itself writes
//! nothing: the harness collects the same events and tests read them.
//!
//! Counters are not events: they are a table the core owns (`Stats`,
//! `Metrics`) and the shell reads at scrape time, so the per-message path
//! costs an increment and nothing more.

use super::Core;
use crate::error::Error;
use crate::player::ResumeError;
use crate::protocol::Code;
use crate::session::SessionId;

/// One thing worth a log line.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `sid` logged in as `player` (`replaced`: the session it took over).
    Login {
        sid: SessionId,
        player: u64,
        replaced: Option<SessionId>,
    },
    /// `sid` resumed `player` after seq `from`.
    Resume {
        sid: SessionId,
        player: u64,
        from: u64,
        replaced: Option<SessionId>,
    },
    /// A RESUME was refused (the session stays, logged out).
    ResumeRefused {
        sid: SessionId,
        player: u64,
        why: ResumeError,
    },
    /// A login of `player` on `sid` was refused `RATE_LIMITED`
    /// by the takeover flapping guard (its live session stays).
    TakeoverRefused { sid: SessionId, player: u64 },
    /// A login refused: the player has a live session (`RejectNew`).
    SecondLoginRefused { sid: SessionId, player: u64 },
    /// The gateway sent `KICK code` to `sid`.
    Kicked {
        sid: SessionId,
        player: Option<u64>,
        code: Code,
    },
    /// A failure at the core's border (a protocol error of `sid`, a request
    /// that could not be sent). Counted in `slg_errors_total`.
    Failed {
        sid: SessionId,
        req_id: Option<u32>,
        error: Error,
    },
    /// A login or resume of `player` was refused: the cluster could not
    /// give this gateway the player. Counted in `slg_errors_total`.
    ArrivalRefused {
        sid: SessionId,
        player: u64,
        error: Error,
    },
    /// Handling an event of `sid` panicked; the session was closed.
    Panicked { sid: SessionId },
    /// The player is gone from this gateway (its outbox with it).
    PlayerEnded { player: u64, why: PlayerEnd },
    /// A backend's answer for a life of `player` that has ended: dropped.
    StrayAnswer { player: u64, req_id: u32 },
    /// A backend accepted a login without naming the player: refused.
    LoginWithoutPlayer { sid: SessionId },
    /// A migration of `player` failed and was undone: it stays here.
    /// Counted in `slg_errors_total`.
    MigrationRolledBack { player: u64, error: Error },
    /// `player` was handed to gateway `to` (a takeover from there).
    GaveAway {
        player: u64,
        to: String,
        with_state: bool,
    },
}

/// Why a player ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlayerEnd {
    /// Its client said BYE.
    Bye,
    /// No session came back within `player_linger`.
    LingerExpired,
    /// An operator kicked it (`POST /v1/kick`).
    Admin,
}

impl Core {
    /// The next event for the log.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub(super) fn event(&mut self, e: Event) {
        self.events.push_back(e);
    }
}
