//! A player as its home shard holds it: the sequence counter, the highest
//! acknowledged seq, the outbox of unacknowledged frames, the reconnect
//! token, the session bound now and since when it has none (linger).
//!
//! Plain data driven by calls with `now` passed in; the shard's player
//! table owns every `Player`.

pub mod outbox;

pub use outbox::{Outbox, SeqFrame};

use crate::protocol::Header;
use crate::session::SessionId;
use bytes::Bytes;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// Bytes of the secret part of a reconnect token (128 bits).
pub const SECRET_LEN: usize = 16;
/// Bytes of a reconnect token: the player id (u64, big-endian) that names
/// the player, then the secret.
pub const TOKEN_LEN: usize = 8 + SECRET_LEN;

/// The player named by a token, if it has a token's shape.
pub fn token_player(token: &[u8]) -> Option<u64> {
    if token.len() != TOKEN_LEN {
        return None;
    }
    let (id, _) = token.split_first_chunk::<8>()?;
    Some(u64::from_be_bytes(*id)).filter(|&p| p != 0)
}

/// Why a resume cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    #[error("invalid or expired token")]
    Rejected,
    #[error("frames after seq {0} were evicted")]
    Gap(u64),
    #[error("resume from seq {last_client} beyond the last seq sent ({last_sent})")]
    Beyond { last_client: u64, last_sent: u64 },
}

/// An acknowledgement beyond the last seq sent: the client is lying or broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("ack of seq {acked} beyond the last seq sent ({last})")]
pub struct AckBeyond {
    pub acked: u64,
    pub last: u64,
}

#[derive(Debug, Clone)]
pub struct Player {
    pub id: u64,
    /// Which life of this player id this is (set by the shard, unique per
    /// shard): answers to requests of an earlier life are dropped.
    pub life: u64,
    /// Taken over from a gateway that died holding it: what it held is
    /// lost, and the next SESSION says `GAP`.
    pub lost_history: bool,
    /// Last seq assigned (0: none yet).
    seq: u64,
    /// Highest seq the client acknowledged.
    acked: u64,
    pub outbox: Outbox,
    /// The session bound to the player now, if any.
    pub session: Option<SessionId>,
    /// When the player lost its last session (None while it has one).
    pub detached_since: Option<Instant>,
    secret: [u8; SECRET_LEN],
    token_expires: Instant,
    /// Takeovers of this player, for the flapping guard.
    pub takeovers: Takeovers,
}

/// The takeovers of one player in the current window (a fixed window
/// from the first one), and the back-off the guard started, if any.
#[derive(Debug, Clone, Default)]
pub struct Takeovers {
    window_start: Option<Instant>,
    count: u32,
    refused_until: Option<Instant>,
}

impl Takeovers {
    /// A new session would take over the player's live one at `now`.
    /// Ok: it may (and is counted); Err: refused, until the instant given.
    pub fn take_over(
        &mut self,
        limit: crate::config::TakeoverLimit,
        now: Instant,
    ) -> Result<(), Instant> {
        if let Some(until) = self.refused_until {
            if now < until {
                return Err(until);
            }
            *self = Takeovers::default();
        }
        let start = *self.window_start.get_or_insert(now);
        if now.saturating_duration_since(start) >= limit.window {
            self.window_start = Some(now);
            self.count = 0;
        }
        if self.count >= limit.max {
            let until = now + limit.backoff;
            self.refused_until = Some(until);
            return Err(until);
        }
        self.count += 1;
        Ok(())
    }
}

impl Player {
    pub fn new(id: u64, max_frames: usize, max_bytes: usize, now: Instant) -> Player {
        Player {
            id,
            life: 0,
            lost_history: false,
            seq: 0,
            acked: 0,
            outbox: Outbox::new(max_frames, max_bytes),
            session: None,
            detached_since: Some(now),
            secret: [0; SECRET_LEN],
            token_expires: now,
            takeovers: Takeovers::default(),
        }
    }

    /// Last seq assigned (what PONG reports).
    pub fn last_seq(&self) -> u64 {
        self.seq
    }

    /// Highest acknowledged seq.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Give `h` the next seq and keep the frame (with `body`, shared or
    /// not) in the outbox; `send` sees it first (to queue it to the
    /// session, if any: a frame too big for the outbox is still sent).
    /// Returns how many old frames the outbox evicted for it.
    pub fn sequence(&mut self, mut h: Header, body: Bytes, send: impl FnOnce(&SeqFrame)) -> usize {
        self.seq += 1;
        h.seq = self.seq;
        let frame = SeqFrame::new(&h, body);
        send(&frame);
        self.outbox.push(self.seq, frame)
    }

    /// Record that the client holds every seq <= `seq`; frees the outbox.
    /// Stale acks are ignored; an ack of a seq never sent is an error.
    pub fn ack(&mut self, seq: u64) -> Result<(), AckBeyond> {
        if seq > self.seq {
            return Err(AckBeyond {
                acked: seq,
                last: self.seq,
            });
        }
        if seq > self.acked {
            self.acked = seq;
            self.outbox.ack(seq);
        }
        Ok(())
    }

    /// A fresh token (single use: the previous one stops working).
    pub fn issue_token(
        &mut self,
        secret: [u8; SECRET_LEN],
        now: Instant,
        lifetime: Duration,
    ) -> [u8; TOKEN_LEN] {
        self.secret = secret;
        self.token_expires = now + lifetime;
        let mut t = [0u8; TOKEN_LEN];
        t[..8].copy_from_slice(&self.id.to_be_bytes());
        t[8..].copy_from_slice(&secret);
        t
    }

    /// The current token and when it expires (for snapshots).
    pub fn token(&self) -> ([u8; SECRET_LEN], Instant) {
        (self.secret, self.token_expires)
    }

    /// Whether `token` is this player's current, unexpired token. The
    /// secret is compared in constant time.
    pub fn token_valid(&self, token: &[u8], now: Instant) -> bool {
        let Some((id, secret)) = token.split_first_chunk::<8>() else {
            return false;
        };
        let id_ok = u64::from_be_bytes(*id) == self.id;
        let secret_ok: bool = secret.ct_eq(&self.secret).into();
        id_ok & secret_ok & (secret.len() == SECRET_LEN) & (now < self.token_expires)
    }

    /// Check a resume from `last` (the client's highest seq) with `token`;
    /// on success the client's ack is recorded and the outbox holds
    /// exactly the frames to replay (`last + 1 ..`).
    pub fn resume(&mut self, token: &[u8], last: u64, now: Instant) -> Result<(), ResumeError> {
        if !self.token_valid(token, now) {
            return Err(ResumeError::Rejected);
        }
        if last > self.seq {
            return Err(ResumeError::Beyond {
                last_client: last,
                last_sent: self.seq,
            });
        }
        if !self.outbox.holds_after(last, self.seq) {
            return Err(ResumeError::Gap(last));
        }
        // last <= seq was checked: the ack cannot fail.
        let _ = self.ack(last);
        Ok(())
    }

    /// The resume point of a fresh login: R and whether frames were lost.
    /// R is the last acknowledged seq, or the seq before the oldest
    /// retained frame when frames after the ack were evicted.
    pub fn login_point(&self) -> (u64, bool) {
        let evicted = self.outbox.evicted_through();
        if self.lost_history {
            return (self.acked.max(evicted), true);
        }
        if evicted > self.acked {
            (evicted, true)
        } else {
            (self.acked, false)
        }
    }

    /// Bind a session (clears the linger clock).
    pub fn attach(&mut self, sid: SessionId) -> Option<SessionId> {
        self.detached_since = None;
        self.session.replace(sid)
    }

    /// The session `sid` is gone; if it was the bound one, linger from `now`.
    pub fn detach(&mut self, sid: SessionId, now: Instant) {
        if self.session == Some(sid) {
            self.session = None;
            self.detached_since = Some(now);
        }
    }

    /// The player as a snapshot keeps it. `now` and `now_unix_ms` are the
    /// same instant on the two clocks.
    pub fn to_image(&self, now: Instant, now_unix_ms: u64) -> crate::snapshot::PlayerImage {
        let unix = |t: Instant| -> u64 {
            if t >= now {
                now_unix_ms + t.duration_since(now).as_millis() as u64
            } else {
                now_unix_ms.saturating_sub(now.duration_since(t).as_millis() as u64)
            }
        };
        crate::snapshot::PlayerImage {
            id: self.id,
            seq: self.seq,
            acked: self.acked,
            outbox: self
                .outbox
                .iter()
                .map(|(seq, f)| crate::snapshot::FrameImage {
                    seq,
                    frame: f.to_vec(),
                })
                .collect(),
            evicted_through: self.outbox.evicted_through(),
            evictions: self.outbox.evictions(),
            token_secret: self.secret,
            token_expires_unix_ms: unix(self.token_expires),
            // An online player is detached by the snapshot (its session ends).
            detached_unix_ms: unix(self.detached_since.unwrap_or(now)),
        }
    }

    /// A player back from a snapshot, without a session (lingering since it
    /// lost it). The outbox takes the current bounds.
    pub fn from_image(
        img: &crate::snapshot::PlayerImage,
        max_frames: usize,
        max_bytes: usize,
        now: Instant,
        now_unix_ms: u64,
    ) -> Player {
        let instant = |t: u64| -> Instant {
            if t >= now_unix_ms {
                now + Duration::from_millis(t - now_unix_ms)
            } else {
                now.checked_sub(Duration::from_millis(now_unix_ms - t))
                    .unwrap_or(now)
            }
        };
        // An image holding something that is not a frame (it passed its
        // checksum, so a bug of whoever wrote it) keeps none of them: the
        // next login reports the gap rather than replaying a hole.
        let frames: Option<Vec<(u64, SeqFrame)>> = img
            .outbox
            .iter()
            .map(|f| Some((f.seq, SeqFrame::from_wire(&f.frame)?)))
            .collect();
        let (evicted_through, frames) = match frames {
            Some(f) => (img.evicted_through, f),
            None => (img.seq, Vec::new()),
        };
        Player {
            id: img.id,
            life: 0,
            lost_history: false,
            seq: img.seq,
            acked: img.acked,
            outbox: Outbox::restore(
                max_frames,
                max_bytes,
                evicted_through,
                img.evictions,
                frames,
            ),
            session: None,
            detached_since: Some(instant(img.detached_unix_ms)),
            secret: img.token_secret,
            token_expires: instant(img.token_expires_unix_ms),
            takeovers: Takeovers::default(),
        }
    }

    /// Whether the player has lingered without a session past `linger`.
    pub fn expired(&self, now: Instant, linger: Duration) -> bool {
        self.detached_since
            .is_some_and(|t| now.saturating_duration_since(t) >= linger)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Kind;

    fn player() -> (Player, Instant) {
        let now = Instant::now();
        (Player::new(7, 4, 1 << 20, now), now)
    }

    fn push(p: &mut Player, n: usize) {
        for _ in 0..n {
            p.sequence(Header::new(Kind::Push), Bytes::from_static(b"x"), |_| ());
        }
    }

    #[test]
    fn takeovers_beyond_the_window_limit_start_a_backoff() {
        let limit = crate::config::TakeoverLimit {
            max: 3,
            window: Duration::from_secs(10),
            backoff: Duration::from_secs(30),
        };
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut t = Takeovers::default();
        for i in 0..3 {
            assert_eq!(t.take_over(limit, t0 + s(i)), Ok(()));
        }
        // The fourth within the window: refused for the back-off.
        assert_eq!(t.take_over(limit, t0 + s(4)), Err(t0 + s(34)));
        assert_eq!(t.take_over(limit, t0 + s(20)), Err(t0 + s(34)));
        // After it, a fresh window.
        for i in 0..3 {
            assert_eq!(t.take_over(limit, t0 + s(34 + i)), Ok(()));
        }
        // Takeovers spread wider than the window never trip it.
        let mut t = Takeovers::default();
        for i in 0..20 {
            assert_eq!(t.take_over(limit, t0 + s(4 * i)), Ok(()));
        }
    }

    #[test]
    fn seqs_are_gap_free_and_acks_free_the_outbox() {
        let (mut p, _) = player();
        push(&mut p, 3);
        assert_eq!((p.last_seq(), p.outbox.len()), (3, 3));
        assert_eq!(p.ack(2), Ok(()));
        assert_eq!(p.ack(1), Ok(()));
        assert_eq!((p.acked(), p.outbox.len()), (2, 1));
        assert_eq!(p.ack(4), Err(AckBeyond { acked: 4, last: 3 }));
    }

    #[test]
    fn tokens_are_single_use_and_expire() {
        let (mut p, now) = player();
        let life = Duration::from_secs(10);
        let t1 = p.issue_token([1; SECRET_LEN], now, life);
        assert_eq!(token_player(&t1), Some(7));
        assert!(p.token_valid(&t1, now));
        assert!(!p.token_valid(&t1, now + life), "expired");
        let t2 = p.issue_token([2; SECRET_LEN], now, life);
        assert!(!p.token_valid(&t1, now), "the old token stops working");
        assert!(p.token_valid(&t2, now));
        let mut forged = t2;
        forged[TOKEN_LEN - 1] ^= 1;
        assert!(!p.token_valid(&forged, now));
        let mut other = t2;
        other[7] = 8;
        assert!(!p.token_valid(&other, now), "names another player");
        assert!(!p.token_valid(&t2[..TOKEN_LEN - 1], now));
        assert_eq!(token_player(&t2[..3]), None);
    }

    #[test]
    fn resume_rules() {
        let (mut p, now) = player();
        let t = p.issue_token([3; SECRET_LEN], now, Duration::from_secs(60));
        push(&mut p, 3);
        assert_eq!(
            p.resume(&t, 4, now),
            Err(ResumeError::Beyond {
                last_client: 4,
                last_sent: 3
            })
        );
        assert_eq!(
            p.resume(&[0; TOKEN_LEN], 1, now),
            Err(ResumeError::Rejected)
        );
        assert_eq!(p.resume(&t, 1, now), Ok(()));
        assert_eq!(p.outbox.after(1).count(), 2);
        // Outbox of 4 frames: push 4 more, seq 2..3 evicted.
        push(&mut p, 4);
        assert_eq!(p.outbox.first_seq(), Some(4));
        assert_eq!(p.resume(&t, 1, now), Err(ResumeError::Gap(1)));
        assert_eq!(p.login_point(), (3, true));
        assert_eq!(p.resume(&t, 3, now), Ok(()));
        assert_eq!(p.login_point(), (3, false));
    }

    #[test]
    fn snapshot_image_round_trip() {
        let (mut p, now) = player();
        let t = p.issue_token([4; SECRET_LEN], now, Duration::from_secs(60));
        push(&mut p, 6); // outbox of 4: 3..=6 kept, 1..=2 evicted
        p.ack(3).expect("ack");
        p.attach(5);
        let img = p.to_image(now, 1_000_000);
        assert_eq!(
            (img.seq, img.acked, img.evicted_through, img.outbox.len()),
            (6, 3, 2, 3)
        );
        assert_eq!(img.token_expires_unix_ms, 1_060_000);
        let q = Player::from_image(&img, 4, 1 << 20, now, 1_000_000);
        assert_eq!(
            (q.last_seq(), q.acked(), q.outbox.len(), q.session),
            (6, 3, 3, None)
        );
        assert!(q.token_valid(&t, now));
        assert!(!q.token_valid(&t, now + Duration::from_secs(61)));
        assert_eq!(q.login_point(), (3, false));
        // A smaller outbox on the new gateway evicts on load.
        let r = Player::from_image(&img, 1, 1 << 20, now, 1_000_000);
        assert_eq!((r.outbox.len(), r.login_point()), (1, (5, true)));
    }

    #[test]
    fn linger_clock() {
        let (mut p, now) = player();
        assert!(p.expired(now + Duration::from_secs(5), Duration::from_secs(5)));
        assert_eq!(p.attach(11), None);
        assert!(!p.expired(now + Duration::from_secs(99), Duration::from_secs(5)));
        p.detach(12, now);
        assert_eq!(p.session, Some(11), "another session's end changes nothing");
        p.detach(11, now);
        assert!(!p.expired(now + Duration::from_secs(4), Duration::from_secs(5)));
        assert!(p.expired(now + Duration::from_secs(5), Duration::from_secs(5)));
    }

    mod model {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Send(usize),
            Ack(u64),
            Resume(u64),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => (0usize..300).prop_map(Op::Send),
                2 => (0u64..60).prop_map(Op::Ack),
                1 => (0u64..60).prop_map(Op::Resume),
            ]
        }

        proptest! {
            /// Whatever happens, the outbox holds consecutive seqs within its
            /// bounds, and a resume that succeeds replays exactly last+1..=seq.
            #[test]
            fn outbox_and_resume_invariants(ops in proptest::collection::vec(op(), 1..200),
                                            max_frames in 1usize..20, max_bytes in 24usize..2000) {
                let now = Instant::now();
                let mut p = Player::new(9, max_frames, max_bytes, now);
                let token = p.issue_token([5; SECRET_LEN], now, Duration::from_secs(60));
                for op in ops {
                    match op {
                        Op::Send(n) => { p.sequence(Header::new(Kind::Push), Bytes::from(vec![1u8; n]), |_| ()); }
                        Op::Ack(s) => {
                            let r = p.ack(s);
                            prop_assert_eq!(r.is_ok(), s <= p.last_seq());
                        }
                        Op::Resume(l) => {
                            let before = p.clone();
                            match p.resume(&token, l, now) {
                                Ok(()) => {
                                    let seqs: Vec<u64> = p.outbox.iter().map(|(s, _)| s).collect();
                                    let want: Vec<u64> = (l + 1..=p.last_seq()).collect();
                                    prop_assert_eq!(seqs, want);
                                }
                                Err(ResumeError::Beyond { .. }) => prop_assert!(l > before.last_seq()),
                                Err(ResumeError::Gap(_)) => {
                                    prop_assert!(before.outbox.evicted_through() > l || l < before.acked()
                                        || before.outbox.first_seq().is_some_and(|f| f > l + 1));
                                }
                                Err(ResumeError::Rejected) => prop_assert!(false, "valid token refused"),
                            }
                        }
                    }
                    let seqs: Vec<u64> = p.outbox.iter().map(|(s, _)| s).collect();
                    prop_assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "consecutive");
                    prop_assert!(p.outbox.len() <= max_frames);
                    prop_assert!(p.outbox.bytes() <= max_bytes);
                    prop_assert_eq!(p.outbox.bytes(), p.outbox.iter().map(|(_, f)| f.len()).sum::<usize>());
                    if let Some(last) = seqs.last() { prop_assert_eq!(*last, p.last_seq()); }
                    prop_assert!(seqs.first().is_none_or(|f| *f > p.acked()));
                    let (r, gap) = p.login_point();
                    prop_assert!(seqs.first().is_none_or(|f| *f == r + 1) || seqs.is_empty());
                    prop_assert_eq!(gap, p.outbox.evicted_through() > p.acked());
                }
            }
        }
    }
}
