//! A player's outbox: the frames sent (or to be sent) with a seq and not yet
//! acknowledged, kept for replay on resume or login. Bounded by frame count
//! and by bytes; when either bound is passed the oldest frames go first and
//! the loss is remembered, so a later resume or login can report the gap.
//!
//! A frame is kept as its own 24-byte head (len, header with the player's
//! seq) and a body that may be shared: a broadcast to 10,000 players keeps
//! one copy of its body, not 10,000.

use crate::protocol::{encode_head, Header, FRAME_HEAD};
use bytes::{BufMut, Bytes, BytesMut};
use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;

/// A shard's running total of the bytes its outboxes hold: each outbox
/// given one adds and subtracts its own changes, and its remainder when
/// it is dropped, so the total is right however a player ends.
pub type Meter = Rc<Cell<usize>>;

/// One sequenced frame: its head (len prefix and header) and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqFrame {
    head: [u8; FRAME_HEAD],
    body: Bytes,
}

impl SeqFrame {
    /// The frame `h` with `body` (which it keeps, shared or not).
    pub fn new(h: &Header, body: Bytes) -> SeqFrame {
        SeqFrame {
            head: encode_head(h, body.len()),
            body,
        }
    }

    /// A whole encoded frame as a snapshot keeps it; `None` if it is
    /// shorter than a head or its len prefix does not match.
    pub fn from_wire(frame: &[u8]) -> Option<SeqFrame> {
        let (head, body) = frame.split_first_chunk::<FRAME_HEAD>()?;
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        (len + crate::protocol::LEN_PREFIX == frame.len()).then(|| SeqFrame {
            head: *head,
            body: Bytes::copy_from_slice(body),
        })
    }

    /// Encoded length (head and body).
    pub fn len(&self) -> usize {
        FRAME_HEAD + self.body.len()
    }

    /// Never: a frame has at least its head.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Appends the encoded frame to `out`.
    pub fn write_to(&self, out: &mut BytesMut) {
        out.reserve(self.len());
        out.put_slice(&self.head);
        out.put_slice(&self.body);
    }

    /// The encoded frame in one buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        v.extend_from_slice(&self.head);
        v.extend_from_slice(&self.body);
        v
    }
}

/// The bounded ring of unacknowledged frames of one player.
#[derive(Debug)]
pub struct Outbox {
    /// (seq, frame), seqs consecutive and ascending.
    frames: VecDeque<(u64, SeqFrame)>,
    bytes: usize,
    max_frames: usize,
    max_bytes: usize,
    /// Highest seq dropped unacknowledged (0: none).
    evicted_through: u64,
    /// Frames dropped unacknowledged, over the player's life.
    evictions: u64,
    /// The shard's total, if this outbox counts in one.
    meter: Option<Meter>,
}

/// A copy counts in no shard's total.
impl Clone for Outbox {
    fn clone(&self) -> Outbox {
        Outbox {
            frames: self.frames.clone(),
            bytes: self.bytes,
            max_frames: self.max_frames,
            max_bytes: self.max_bytes,
            evicted_through: self.evicted_through,
            evictions: self.evictions,
            meter: None,
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if let Some(m) = &self.meter {
            m.set(m.get().saturating_sub(self.bytes));
        }
    }
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
            meter: None,
        }
    }

    /// Count this outbox's bytes in `meter` from now on.
    pub fn meter(&mut self, meter: &Meter) {
        if let Some(old) = self.meter.take() {
            old.set(old.get().saturating_sub(self.bytes));
        }
        meter.set(meter.get() + self.bytes);
        self.meter = Some(meter.clone());
    }

    fn grow(&mut self, n: usize) {
        self.bytes += n;
        if let Some(m) = &self.meter {
            m.set(m.get() + n);
        }
    }

    fn shrink(&mut self, n: usize) {
        self.bytes -= n;
        if let Some(m) = &self.meter {
            m.set(m.get().saturating_sub(n));
        }
    }

    /// Evict the oldest frames until at most `level` bytes are held (the
    /// shard's outbox budget). Returns how many went.
    pub fn evict_to(&mut self, level: usize) -> usize {
        self.evict_while(|o| o.bytes > level)
    }

    /// Evict the oldest frames while `over` says the outbox is over a
    /// bound; the loss is remembered. Returns how many went.
    fn evict_while(&mut self, over: impl Fn(&Outbox) -> bool) -> usize {
        let mut evicted = 0;
        while over(self) {
            let Some((s, f)) = self.frames.pop_front() else {
                break;
            };
            self.shrink(f.len());
            self.evicted_through = s;
            evicted += 1;
        }
        self.evictions = self.evictions.saturating_add(evicted as u64);
        evicted
    }

    /// Keep `frame` (with `seq`, the player's newest) until acknowledged;
    /// evicts the oldest beyond the bounds. Returns how many were evicted.
    pub fn push(&mut self, seq: u64, frame: SeqFrame) -> usize {
        if self.frames.capacity() == 0 {
            // Room for exactly one: an idle player holds one unacknowledged
            // frame (its login's answer), and a first allocation of four
            // entries would cost 192 bytes more per idle session.
            self.frames.reserve_exact(1);
        }
        self.grow(frame.len());
        self.frames.push_back((seq, frame));
        self.evict_while(|o| o.frames.len() > o.max_frames || o.bytes > o.max_bytes)
    }

    /// Free every frame with seq <= `seq`.
    pub fn ack(&mut self, seq: u64) {
        while self.frames.front().is_some_and(|(s, _)| *s <= seq) {
            if let Some((_, f)) = self.frames.pop_front() {
                self.shrink(f.len());
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
    pub fn after(&self, seq: u64) -> impl Iterator<Item = &SeqFrame> {
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
        frames: impl IntoIterator<Item = (u64, SeqFrame)>,
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
    pub fn iter(&self) -> impl Iterator<Item = (u64, &SeqFrame)> {
        self.frames.iter().map(|(s, f)| (*s, f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::protocol::Kind;

    /// A frame with an `n`-byte body (24 + n bytes in all).
    fn f(n: usize) -> SeqFrame {
        SeqFrame::new(&Header::new(Kind::Push), Bytes::from(vec![0u8; n]))
    }

    #[test]
    fn the_meter_follows_every_change_and_a_dropped_outbox() {
        let meter = Meter::default();
        let mut a = Outbox::new(10, 1 << 20);
        a.push(1, f(76));
        a.meter(&meter);
        assert_eq!(meter.get(), 100, "what it held before counts");
        let mut b = Outbox::new(2, 1 << 20);
        b.meter(&meter);
        for seq in 1..=3 {
            b.push(seq, f(26));
        }
        assert_eq!(meter.get(), 200, "b evicted one of its three");
        a.push(2, f(0));
        a.ack(1);
        assert_eq!(meter.get(), 124);
        assert_eq!(b.evict_to(60), 1);
        assert_eq!((b.bytes(), b.evicted_through(), meter.get()), (50, 2, 74));
        let copy = b.clone();
        drop(copy);
        assert_eq!(meter.get(), 74, "a copy counts nowhere");
        drop(b);
        assert_eq!(meter.get(), 24);
        drop(a);
        assert_eq!(meter.get(), 0);
    }

    #[test]
    fn a_frame_is_its_head_and_body_and_round_trips_the_wire() {
        let mut h = Header::new(Kind::Push);
        h.seq = 9;
        h.msg_id = 77;
        let body = Bytes::from_static(b"hello");
        let fr = SeqFrame::new(&h, body.clone());
        let mut wire = BytesMut::new();
        crate::protocol::encode(&mut wire, &h, &body);
        assert_eq!(fr.to_vec(), wire.to_vec());
        let mut out = BytesMut::new();
        fr.write_to(&mut out);
        assert_eq!(out, wire);
        assert_eq!(fr.len(), wire.len());
        assert_eq!(SeqFrame::from_wire(&wire), Some(fr));
        assert_eq!(
            SeqFrame::from_wire(&wire[..23]),
            None,
            "shorter than a head"
        );
        assert_eq!(
            SeqFrame::from_wire(&wire[..26]),
            None,
            "len prefix disagrees"
        );
    }

    #[test]
    fn a_shared_body_is_stored_once() {
        let body = Bytes::from(vec![7u8; 1000]);
        let mut boxes: Vec<Outbox> = (0..3).map(|_| Outbox::new(10, 1 << 20)).collect();
        for o in &mut boxes {
            o.push(1, SeqFrame::new(&Header::new(Kind::Push), body.clone()));
        }
        for o in &boxes {
            let (_, fr) = o.iter().next().expect("kept");
            assert_eq!(
                fr.body().as_ptr(),
                body.as_ptr(),
                "the same bytes, not a copy"
            );
            assert_eq!(o.bytes(), 1024);
        }
    }

    #[test]
    fn evicts_oldest_by_count_and_by_bytes() {
        // Frames of 34 bytes (24 + 10), then one of 114 (24 + 90).
        let mut o = Outbox::new(3, 148);
        for s in 1..=3 {
            assert_eq!(o.push(s, f(10)), 0);
        }
        assert_eq!(o.push(4, f(10)), 1);
        assert_eq!(
            (o.first_seq(), o.len(), o.bytes(), o.evicted_through()),
            (Some(2), 3, 102, 1)
        );
        assert_eq!(o.push(5, f(90)), 2);
        assert_eq!(
            (o.first_seq(), o.len(), o.bytes(), o.evicted_through()),
            (Some(4), 2, 148, 3)
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
