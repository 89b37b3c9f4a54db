//! The core's events as log lines: the one place that turns a
//! [`crate::core::Event`] into `tracing` (the fields match the table in
//! docs/operations.md).

use crate::core::{Event, PlayerEnd};

/// Write the log line of `e`, which shard `shard`'s core reported.
pub fn log(shard: usize, e: &Event) {
    match e {
        Event::Login {
            sid,
            player,
            replaced,
        } => tracing::info!(session = sid, player, shard, replaced = ?replaced, "login"),
        Event::Resume {
            sid,
            player,
            from,
            replaced,
        } => tracing::info!(session = sid, player, from, replaced = ?replaced, "resume"),
        Event::ResumeRefused { sid, player, why } => {
            tracing::debug!(session = sid, player, error = %why, "resume refused")
        }
        // One line per refusal of a flapping pair would be a flood of its
        // own; slg_takeovers_refused_total counts them.
        Event::TakeoverRefused { sid, player } => tracing::debug!(
            session = sid,
            player,
            "takeover refused: limits.takeovers (flapping)"
        ),
        Event::SecondLoginRefused { sid, player } => tracing::debug!(
            session = sid,
            player,
            "login refused ALREADY_ONLINE: on_second_login RejectNew"
        ),
        Event::Kicked { sid, player, code } => {
            tracing::info!(session = sid, player = ?player, reason = code.name(), "kick")
        }
        Event::Failed { sid, req_id, error } => match req_id {
            // A protocol error ends the connection: worth an info line.
            None => tracing::info!(session = sid, error = %error, "protocol error"),
            Some(req_id) => tracing::debug!(session = sid, req_id, error = %error, "not sent"),
        },
        Event::ArrivalRefused { sid, player, error } => tracing::warn!(
            session = sid,
            player,
            error = %error,
            "login or resume refused: the cluster could not give this gateway the player"
        ),
        Event::Panicked { sid } => {
            tracing::error!(session = sid, "a panic while handling this session: closed")
        }
        Event::PlayerEnded { player, why } => match why {
            PlayerEnd::Bye => tracing::info!(player, "bye: player ended"),
            PlayerEnd::LingerExpired => tracing::info!(player, "player ended: linger expired"),
            PlayerEnd::Admin => tracing::info!(player, "player ended: kicked by an operator"),
        },
        Event::StrayAnswer { player, req_id } => {
            tracing::debug!(player, req_id, "answer for an ended player dropped")
        }
        Event::LoginWithoutPlayer { sid } => tracing::warn!(
            session = sid,
            "login accepted by backend without a player id: refused"
        ),
        Event::MigrationRolledBack { player, error } => {
            tracing::warn!(player, error = %error, "migration rolled back")
        }
        Event::GaveAway {
            player,
            to,
            with_state,
        } => tracing::info!(player, to, with_state, "player handed to another gateway"),
    }
}
