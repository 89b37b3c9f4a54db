//! The harness's writers: the shell's write straight from the queue at the
//! end of a batch, and the writer task for what the socket did not take.

use super::{ConnId, Sim};
use crate::core::Transmit;

impl Sim {
    /// The writer of `c` (as `shard::conn::write_backlog`).
    pub(super) fn write(&mut self, c: ConnId) -> bool {
        let mut did = false;
        loop {
            let conn = &self.conns[c];
            if conn.writer_idle || conn.writer_done || conn.in_write.is_some() {
                return did;
            }
            let (s, sid) = (conn.shard, conn.sid);
            match self.cores[s].poll_transmit(sid) {
                Transmit::Bytes(b) => {
                    did = true;
                    self.conns[c].in_write = Some(b);
                    if self.conns[c].stalled {
                        return did;
                    }
                    self.complete_write(c);
                }
                Transmit::Idle => self.conns[c].writer_idle = true,
                Transmit::Done => self.conns[c].writer_done = true,
            }
        }
    }

    /// The shell's write straight from the queue at the end of a batch
    /// (`ShardCtx::write_dirty`): the socket takes all, half, or nothing
    /// (in turn, so partial writes are exercised); whatever it leaves is
    /// the writer's.
    pub(super) fn write_now(&mut self, c: ConnId) {
        self.turns += 1;
        let turn = self.turns;
        let conn = &mut self.conns[c];
        if conn.writer_done {
            return;
        }
        let (s, sid, stalled, gone) = (conn.shard, conn.sid, conn.stalled, conn.peer_gone);
        let out = &mut conn.outbound;
        let r = self.cores[s].write_now(sid, self.now, |b| {
            if gone {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            let n = match turn % 3 {
                _ if stalled => 0,
                0 => b.len() / 2,
                _ => b.len(),
            };
            if n == 0 && !b.is_empty() {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            out.extend_from_slice(&b[..n]);
            Ok(n)
        });
        if r != crate::core::WriteNow::Nothing {
            self.wrote_now = true;
        }
        if r == crate::core::WriteNow::Writer {
            self.conns[c].writer_idle = false;
        }
    }

    /// The batch being written reaches the client (or fails to).
    pub(super) fn complete_write(&mut self, c: ConnId) {
        let conn = &mut self.conns[c];
        let Some(b) = conn.in_write.take() else {
            return;
        };
        let ok = !conn.peer_gone;
        if ok {
            conn.outbound.extend_from_slice(&b);
        }
        let (s, sid) = (conn.shard, conn.sid);
        self.cores[s].handle_written(sid, ok, self.now);
        self.flush(s);
    }
}
