//! A player's outbox: the frames sent (or to be sent) with a seq and not yet
//! acknowledged, kept for replay on resume or login. Bounded by frame count
//! and by bytes; when either bound is passed the oldest frames go first and
//! the loss is remembered, so a later resume or login can report the gap.

use bytes::Bytes;
use std::collections::VecDeque;

/// The bounded ring of unacknowledged frames of one player.
#[derive(Debug, Clone)]
pub struct Outbox {
    /// (seq, whole encoded frame), seqs consecutive and ascending.
    frames: VecDeque<(u64, Bytes)>,
    bytes: usize,
    max_frames: usize,
    max_bytes: usize,
    /// Highest seq dropped unacknowledged (0: none).
    evicted_through: u64,
    /// Frames dropped unacknowledged, over the player's life.
    evictions: u64,
}

impl Outbox {
    pub fn new(max_frames: usize, max_bytes: usize) -> Outbox {
        Outbox {
            frames: VecDeque::new(),
            bytes: 0,
            max_frames: max_frames.max(1),
            max_bytes: max_bytes.max(1),
            evicted_through: 0,
            evictions: 0,
        }
    }

    /// Keep `frame` (with `seq`, the player's newest) until acknowledged;
    /// evicts the oldest beyond the bounds. Returns how many were evicted.
    pub fn push(&mut self, seq: u64, frame: Bytes) -> usize {
        self.bytes += frame.len();
        self.frames.push_back((seq, frame));
        let mut evicted = 0;
        while self.frames.len() > self.max_frames || self.bytes > self.max_bytes {
            let Some((s, f)) = self.frames.pop_front() else {
                break;
            };
            self.bytes -= f.len();
            self.evicted_through = s;
            evicted += 1;
        }
        self.evictions += evicted as u64;
        evicted
    }

    /// Free every frame with seq <= `seq`.
    pub fn ack(&mut self, seq: u64) {
        while self.frames.front().is_some_and(|(s, _)| *s <= seq) {
            if let Some((_, f)) = self.frames.pop_front() {
                self.bytes -= f.len();
            }
        }
    }

    /// Whether every frame after `seq` is still here (given `last`, the
    /// newest seq assigned): what a resume from `seq` needs.
    pub fn holds_after(&self, seq: u64, last: u64) -> bool {
        if self.evicted_through > seq {
            return false;
        }
        match self.frames.front() {
            Some((first, _)) => *first <= seq + 1,
            None => seq >= last,
        }
    }

    /// Frames with seq > `seq`, oldest first.
    pub fn after(&self, seq: u64) -> impl Iterator<Item = &Bytes> {
        self.frames
            .iter()
            .filter(move |(s, _)| *s > seq)
            .map(|(_, f)| f)
    }

    /// Highest seq evicted unacknowledged (0: none).
    pub fn evicted_through(&self) -> u64 {
        self.evicted_through
    }

    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Seq of the oldest frame kept.
    pub fn first_seq(&self) -> Option<u64> {
        self.frames.front().map(|(s, _)| *s)
    }

    /// Rebuild from a snapshot: the eviction record, then `frames` pushed
    /// in order under the current bounds (which may evict more).
    pub fn restore(
        max_frames: usize,
        max_bytes: usize,
        evicted_through: u64,
        evictions: u64,
        frames: impl IntoIterator<Item = (u64, Bytes)>,
    ) -> Outbox {
        let mut o = Outbox::new(max_frames, max_bytes);
        o.evicted_through = evicted_through;
        o.evictions = evictions;
        for (seq, f) in frames {
            o.push(seq, f);
        }
        o
    }

    /// Every kept frame with its seq, oldest first (for snapshots).
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Bytes)> {
        self.frames.iter().map(|(s, f)| (*s, f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(n: usize) -> Bytes {
        Bytes::from(vec![0u8; n])
    }

    #[test]
    fn evicts_oldest_by_count_and_by_bytes() {
        let mut o = Outbox::new(3, 100);
        for s in 1..=3 {
            assert_eq!(o.push(s, f(10)), 0);
        }
        assert_eq!(o.push(4, f(10)), 1);
        assert_eq!(
            (o.first_seq(), o.len(), o.bytes(), o.evicted_through()),
            (Some(2), 3, 30, 1)
        );
        assert_eq!(o.push(5, f(90)), 2);
        assert_eq!(
            (o.first_seq(), o.len(), o.bytes(), o.evicted_through()),
            (Some(4), 2, 100, 3)
        );
        assert_eq!(o.evictions(), 3);
        // A frame bigger than the byte bound evicts everything, itself included.
        o.push(6, f(200));
        assert!(o.is_empty());
        assert_eq!((o.bytes(), o.evicted_through()), (0, 6));
    }

    #[test]
    fn acks_free_at_once_and_resume_checks_hold() {
        let mut o = Outbox::new(10, 1000);
        for s in 1..=5 {
            o.push(s, f(1));
        }
        assert!(o.holds_after(0, 5));
        o.ack(2);
        assert_eq!((o.first_seq(), o.len()), (Some(3), 3));
        assert!(o.holds_after(2, 5));
        assert!(o.holds_after(4, 5));
        assert!(o.holds_after(5, 5));
        assert!(!o.holds_after(1, 5), "seq 2 was freed");
        assert_eq!(o.after(3).count(), 2);
        o.ack(5);
        assert!(o.holds_after(5, 5));
        assert!(!o.holds_after(4, 5));
        let mut small = Outbox::new(2, 1000);
        for s in 1..=4 {
            small.push(s, f(1));
        }
        assert!(!small.holds_after(1, 4));
        assert!(small.holds_after(2, 4));
    }
}
