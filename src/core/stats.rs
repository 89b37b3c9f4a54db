//! The core's counters, declared once with their help texts.

use std::cell::Cell;

crate::counters! {
    /// Shard-local counters of the core and the shell's accept loop: the
    /// one list of their names and help texts (summed across shards when
    /// read; each becomes `slg_<name>_total` in `/metrics`).
    pub struct Stats {
        accepted: "Client connections accepted.",
        refused_max_connections: "Client connections refused by max_connections.",
        refused_rate: "Client connections refused by limits.accept (per source IP or per listener).",
        handoffs_out: "Connections handed to another shard.",
        handoffs_in: "Connections received from another shard.",
        upgraded_out: "Sessions handed to a new process by a live upgrade.",
        upgraded_in: "Sessions taken in from the old process by a live upgrade.",
        logins_ok: "Logins accepted.",
        logins_rejected: "Logins rejected (by the backend or for lack of one).",
        resumes_ok: "Resumes served.",
        resumes_rejected: "Resumes refused: RESUME_REJECTED.",
        resumes_gap: "Resumes refused: RESUME_GAP.",
        protocol_errors: "Connections closed for a protocol error.",
        evictions: "Unacknowledged frames evicted from outboxes.",
        players_expired: "Players ended after player_linger without a session.",
        overloaded: "Requests refused OVERLOADED (session or backend in-flight bounds).",
        rate_limited: "Requests refused RATE_LIMITED by the per-session token bucket.",
        session_panics: "Panics caught while handling one session's event (that session closed).",
        write_backlogs: "Times a client socket took less than was queued (a writer task waited for it to drain).",
        login_timeouts: "Connections closed for not logging in within login_timeout (KICK LOGIN_TIMEOUT).",
        takeovers_refused: "Logins refused RATE_LIMITED by the takeover flapping guard (limits.takeovers).",
        ordered_timeouts: "Requests of PerPlayer routes answered TIMEOUT after waiting their deadline behind earlier ones.",
        second_logins_refused: "Logins refused ALREADY_ONLINE: the player had a live session (on_second_login: RejectNew).",
        budget_evictions: "Outbox frames evicted because the shard's outboxes passed memory.outboxes (also counted in evictions).",
        budget_kicks: "Sessions kicked SLOW_CONSUMER because the shard's connection buffers passed memory.buffers.",
        players_refused: "Logins of a new player refused OVERLOADED: the shard held its share of max_players.",
        frame_timeouts: "Sessions kicked IDLE for a frame begun and not finished within frame_timeout.",
        handshakes_failed: "Client connections whose TLS handshake or WebSocket upgrade failed or was refused.",
        handshakes_timed_out: "Client connections whose TLS handshake or WebSocket upgrade took longer than its handshake_timeout.",
    }
}

pub(super) fn bump(c: &Cell<u64>) {
    add(c, 1);
}

pub(super) fn add(c: &Cell<u64>, n: u64) {
    c.set(c.get() + n);
}

#[cfg(test)]
mod tests {
    use super::Stats;

    #[test]
    fn every_counter_is_listed_once_with_its_help() {
        let st = Stats::default();
        st.session_panics.set(3);
        let list = st.list();
        let mut names: Vec<&str> = list.iter().map(|c| c.0).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), list.len(), "a name listed twice");
        assert!(list.iter().all(|c| !c.1.is_empty()));
        assert!(list.contains(&(
            "session_panics",
            "Panics caught while handling one session's event (that session closed).",
            3
        )));
    }
}
