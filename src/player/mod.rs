//! A player as its home shard holds it: the sequence counter, the highest
//! acknowledged seq, the reconnect token and the session currently bound.
//!
//! Plain data driven by calls; the shard's player table owns every `Player`.

use crate::session::SessionId;

/// Length of a reconnect token in bytes (128 bits).
pub const TOKEN_LEN: usize = 16;

#[derive(Debug, Clone)]
pub struct Player {
    pub id: u64,
    /// Last seq assigned to a frame for this player (0: none yet).
    seq: u64,
    /// Highest seq the client acknowledged.
    acked: u64,
    /// The session bound to the player now, if any.
    pub session: Option<SessionId>,
    /// The current reconnect token.
    pub token: [u8; TOKEN_LEN],
}

/// An acknowledgement beyond the last seq sent: the client is lying or broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("ack of seq {acked} beyond the last seq sent ({last})")]
pub struct AckBeyond {
    pub acked: u64,
    pub last: u64,
}

impl Player {
    pub fn new(id: u64, token: [u8; TOKEN_LEN]) -> Player {
        Player {
            id,
            seq: 0,
            acked: 0,
            session: None,
            token,
        }
    }

    /// Take the next seq for a frame to this player: 1, 2, 3 ...
    pub fn take_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Last seq assigned (what PONG reports).
    pub fn last_seq(&self) -> u64 {
        self.seq
    }

    /// Highest acknowledged seq (the resume point of a fresh login).
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Record that the client holds every seq <= `seq`. Stale acks are
    /// ignored; an ack of a seq never sent is an error.
    pub fn ack(&mut self, seq: u64) -> Result<(), AckBeyond> {
        if seq > self.seq {
            return Err(AckBeyond {
                acked: seq,
                last: self.seq,
            });
        }
        self.acked = self.acked.max(seq);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqs_are_gap_free_and_acks_monotonic() {
        let mut p = Player::new(7, [0; TOKEN_LEN]);
        assert_eq!(
            (1..=5).map(|_| p.take_seq()).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        assert_eq!(p.last_seq(), 5);
        assert_eq!(p.ack(3), Ok(()));
        assert_eq!(p.ack(2), Ok(()));
        assert_eq!(p.acked(), 3);
        assert_eq!(p.ack(6), Err(AckBeyond { acked: 6, last: 5 }));
        assert_eq!(p.acked(), 3);
    }
}
