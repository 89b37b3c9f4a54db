//! A session's output: the queue the core encodes frames into, and how
//! the shell takes it (written straight from the queue at the end of a
//! batch, or by a writer task when the socket falls behind).

use super::{Conn, Core};
use crate::protocol::{encode, Code, Header, Kind, LEN_PREFIX};
use crate::session::{CloseReason, SessionId};
use bytes::{Bytes, BytesMut};
use foldhash::HashMap;
use std::time::Instant;

/// What a session's writer does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Transmit {
    /// Write these bytes, then report with [`Core::handle_written`].
    Bytes(Bytes),
    /// Nothing to write now: wait to be woken.
    Idle,
    /// Closing and everything is written (or the session is gone): stop.
    Done,
}

/// What [`Core::write_now`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteNow {
    /// Nothing was queued, or the writer task holds a batch.
    Nothing,
    /// Everything queued was written (and the output is not closing).
    Written,
    /// The writer task must go on: the socket took less than all (the rest
    /// stays queued), the write failed, or the output is closing and done.
    Writer,
}

/// Where a closing session's output stands (see [`Core::flushed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// Everything queued was written.
    Yes,
    /// Bytes are still queued or being written.
    NotYet,
    /// A write failed, or the session is gone.
    Failed,
}

/// A session's output queue: bytes the writer has not taken, and offsets
/// into its stream.
#[derive(Debug, Default)]
pub(super) struct Tx {
    pub(super) buf: BytesMut,
    /// Bytes taken by the writer and not yet reported written.
    pub(super) in_write: usize,
    pub(super) pushed_total: u64,
    pub(super) written_total: u64,
    pub(super) closing: bool,
    /// Bytes at the front of `buf` that finish a frame partly written by
    /// [`Core::write_now`]: they must go out before anything may be
    /// dropped from the queue (a slow consumer's kick keeps them).
    pub(super) head_rest: usize,
    /// A write failed: nothing more will be written.
    pub(super) failed: bool,
}

impl Tx {
    /// An empty queue gives back a buffer that grew for a burst.
    fn reclaim(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 64 * 1024 {
            self.buf = BytesMut::new();
        }
    }

    pub(super) fn queued(&self) -> usize {
        self.buf.len() + self.in_write
    }
}

impl Core {
    /// What `sid`'s writer does next: the bytes queued, all at once.
    pub fn poll_transmit(&mut self, sid: SessionId) -> Transmit {
        let Some(c) = self.sessions.get_mut(&sid) else {
            return Transmit::Done;
        };
        let tx = &mut c.tx;
        if tx.in_write > 0 {
            return Transmit::Idle;
        }
        if tx.buf.is_empty() {
            if tx.closing {
                return Transmit::Done;
            }
            tx.reclaim();
            return Transmit::Idle;
        }
        let batch = tx.buf.split().freeze();
        tx.in_write = batch.len();
        tx.head_rest = 0;
        Transmit::Bytes(batch)
    }

    /// Write what is queued for `sid` at once with `send` (a non-blocking
    /// write to its socket, returning how much it took), from the queue
    /// itself: no batch is split off and nothing is allocated. Used after a
    /// batch of input, so that answers go out without waking the writer
    /// task; whatever `send` does not take is left to the writer.
    pub fn write_now(
        &mut self,
        sid: SessionId,
        now: Instant,
        send: impl FnOnce(&[u8]) -> std::io::Result<usize>,
    ) -> WriteNow {
        self.now = now;
        let Some(c) = self.sessions.get_mut(&sid) else {
            return WriteNow::Writer;
        };
        let tx = &mut c.tx;
        if tx.in_write > 0 {
            return WriteNow::Nothing;
        }
        if tx.buf.is_empty() {
            return if tx.closing {
                WriteNow::Writer
            } else {
                WriteNow::Nothing
            };
        }
        match send(&tx.buf) {
            Ok(n) if n >= tx.buf.len() => {
                tx.written_total += tx.buf.len() as u64;
                tx.head_rest = 0;
                tx.buf.clear();
                tx.reclaim();
                // A closing output is done: the writer task ends now.
                if tx.closing {
                    WriteNow::Writer
                } else {
                    WriteNow::Written
                }
            }
            Ok(n) => {
                tx.written_total += n as u64;
                // Frames start at `head_rest` (at 0 unless an earlier
                // write cut one): find where the frame this write cut ends.
                let rest = tx.head_rest.min(tx.buf.len());
                let end = if n < rest {
                    rest
                } else {
                    rest + frame_boundary_after(&tx.buf[rest..], n - rest)
                };
                tx.head_rest = end - n;
                bytes::Buf::advance(&mut tx.buf, n);
                WriteNow::Writer
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => WriteNow::Writer,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => WriteNow::Writer,
            Err(_) => {
                tx.closing = true;
                tx.failed = true;
                tx.buf.clear();
                self.close(sid, CloseReason::WriteFailed);
                WriteNow::Writer
            }
        }
    }

    /// The writer wrote the batch it took (`ok`), or failed to.
    pub fn handle_written(&mut self, sid: SessionId, ok: bool, now: Instant) {
        self.now = now;
        let Some(c) = self.sessions.get_mut(&sid) else {
            return;
        };
        let n = std::mem::take(&mut c.tx.in_write);
        if ok {
            c.tx.written_total += n as u64;
        } else {
            // The peer is gone: nothing more will be written.
            c.tx.closing = true;
            c.tx.failed = true;
            c.tx.buf.clear();
            self.close(sid, CloseReason::WriteFailed);
        }
    }

    /// Whether everything queued for `sid` was written (what a connection
    /// that closes or moves waits for).
    pub fn flushed(&self, sid: SessionId) -> Flushed {
        match self.sessions.get(&sid) {
            None => Flushed::Failed,
            Some(c) if c.tx.failed => Flushed::Failed,
            Some(c) if c.tx.queued() == 0 => Flushed::Yes,
            Some(_) => Flushed::NotYet,
        }
    }

    /// Bytes queued for `sid` and not yet written (0: gone).
    pub fn unsent(&self, sid: SessionId) -> usize {
        self.sessions.get(&sid).map_or(0, |c| c.tx.queued())
    }

    /// Queue encoded bytes to a session; kicks it if its queue passes the
    /// limit (the frames stay in the player's outbox).
    pub(super) fn queue(&mut self, sid: SessionId, f: impl FnOnce(&mut BytesMut)) {
        let limit = self.cfg.write_queue_bytes;
        if let Some(over) = Self::push_tx(&mut self.sessions, sid, limit, f) {
            self.queued(sid, over);
        }
    }

    /// The first half of [`Core::queue`], on the session table alone (so a
    /// caller may hold a player meanwhile): appends to the session's
    /// output; `Some(over its limit)` if it took it, `None` if the session
    /// is gone or closing.
    pub(super) fn push_tx(
        sessions: &mut HashMap<SessionId, Conn>,
        sid: SessionId,
        limit: usize,
        f: impl FnOnce(&mut BytesMut),
    ) -> Option<bool> {
        let c = sessions.get_mut(&sid)?;
        if c.tx.closing {
            return None;
        }
        let before = c.tx.buf.len();
        f(&mut c.tx.buf);
        c.tx.pushed_total += (c.tx.buf.len() - before) as u64;
        Some(c.session.counted_queue(c.tx.queued(), c.tx.written_total) > limit)
    }

    /// The second half of [`Core::queue`]: wake the writer; a queue over
    /// its limit is a slow consumer.
    pub(super) fn queued(&mut self, sid: SessionId, over: bool) {
        self.wake(sid, false, true);
        if over {
            self.kick(sid, Code::SlowConsumer);
        }
    }

    /// An unsequenced frame (seq as given) to a session.
    pub(super) fn send_plain(&mut self, sid: SessionId, h: Header, body: &[u8]) {
        self.queue(sid, |out| encode(out, &h, body));
    }

    pub(super) fn send_error(&mut self, sid: SessionId, code: Code) {
        let mut h = Header::new(Kind::Error);
        h.code = code.into();
        self.send_plain(sid, h, &[]);
    }

    /// Stop `sid`'s writer once what is queued is written (its connection
    /// closes, or moves to another shard).
    pub fn finish_output(&mut self, sid: SessionId) {
        self.close_tx(sid);
    }

    /// Mark `sid`'s output closing: the writer stops once it is written.
    pub(super) fn close_tx(&mut self, sid: SessionId) {
        if let Some(c) = self.sessions.get_mut(&sid) {
            c.tx.closing = true;
        }
        self.wake(sid, true, true);
    }
}

/// The first frame boundary at or after `n` in `buf`, which starts at a
/// frame (the end of `buf` if the frames there run past it).
fn frame_boundary_after(buf: &[u8], n: usize) -> usize {
    let mut at = 0;
    while at < n {
        let Some(len) = buf.get(at..at + LEN_PREFIX) else {
            return buf.len();
        };
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        at = at.saturating_add(LEN_PREFIX + len);
    }
    at.min(buf.len())
}

#[cfg(test)]
mod tests {
    use super::frame_boundary_after;
    use crate::protocol::{encode, Header, Kind};

    #[test]
    fn the_boundary_after_a_partial_write_ends_the_frame_it_cut() {
        let mut buf = bytes::BytesMut::new();
        encode(&mut buf, &Header::new(Kind::Push), &[7; 10]); // 0..34
        encode(&mut buf, &Header::new(Kind::Push), &[8; 5]); // 34..63
        assert_eq!(buf.len(), 63);
        assert_eq!(frame_boundary_after(&buf, 0), 0);
        assert_eq!(frame_boundary_after(&buf, 1), 34);
        assert_eq!(frame_boundary_after(&buf, 34), 34);
        assert_eq!(frame_boundary_after(&buf, 35), 63);
        assert_eq!(frame_boundary_after(&buf, 63), 63);
    }
}
