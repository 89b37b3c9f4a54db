//! Writing sessions' output: straight from the core's queue at the end of
//! a batch (one non-blocking `send` per session), or by a writer task
//! spawned for a socket that took less than was queued.

use super::{conn, ShardCtx};
use crate::core::{Flushed, WriteNow};
use crate::net::SharedStream;
use crate::session::SessionId;
use crate::wire::Wire;
use std::os::fd::AsRawFd;
use std::time::Instant;

impl ShardCtx {
    /// Write the output of every session marked dirty straight to its
    /// socket, without waking its writer task (one non-blocking `send`
    /// each; what the socket does not take is left to the writer). Several
    /// answers to one session in one batch go out in one write.
    pub(super) fn write_dirty(&self) {
        loop {
            let mut batch = std::mem::take(&mut *self.dirty.borrow_mut());
            if batch.is_empty() {
                return;
            }
            let now = self.now();
            for sid in batch.drain(..) {
                let (fd, stream) = {
                    let mut tasks = self.tasks.borrow_mut();
                    let Some(t) = tasks.get_mut(&sid) else {
                        continue;
                    };
                    t.dirty = false;
                    if t.writing {
                        // It takes what was queued when it has written.
                        continue;
                    }
                    let wired = t.stream.is_wired().then(|| t.stream.clone());
                    (t.stream.with(|s| s.as_raw_fd()), wired)
                };
                let r = match stream {
                    None => self
                        .core
                        .borrow_mut()
                        .write_now(sid, now, |b| crate::net::send_now(fd, b)),
                    Some(stream) => self.write_wired(sid, &stream, now),
                };
                if r == WriteNow::Writer {
                    self.backlog(sid);
                }
            }
            self.carry_out();
            let mut dirty = self.dirty.borrow_mut();
            if dirty.is_empty() {
                // Keep the allocation for the next batch.
                *dirty = batch;
            }
        }
    }

    /// [`write_dirty`](Self::write_dirty) through a wire: what the wire
    /// holds goes first; only if the socket took all of it are the queued
    /// frames encoded (all of them: the queue stays at a frame boundary)
    /// and written as far as the socket takes them.
    fn write_wired(&self, sid: SessionId, stream: &SharedStream, now: Instant) -> WriteNow {
        let mut core = self.core.borrow_mut();
        stream.with_wire(|fd, wire| {
            let Some(wire) = wire else {
                return WriteNow::Writer;
            };
            let flush = |wire: &mut Wire| -> std::io::Result<bool> {
                while !wire.pending().is_empty() {
                    match crate::net::send_now(fd, wire.pending()) {
                        Ok(n) => wire.consumed(n),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(true)
            };
            match flush(wire) {
                Ok(true) => {}
                Ok(false) => return WriteNow::Writer,
                Err(_) => {
                    core.handle_written(sid, false, now);
                    return WriteNow::Writer;
                }
            }
            let r = core.write_now(sid, now, |b| {
                wire.encode(b)
                    .map(|()| b.len())
                    .map_err(std::io::Error::other)
            });
            match flush(wire) {
                Ok(true) => r,
                Ok(false) => WriteNow::Writer,
                Err(_) => {
                    core.handle_written(sid, false, now);
                    WriteNow::Writer
                }
            }
        })
    }

    /// Whether `player`'s session (if it has one here) is a WebSocket.
    pub fn player_on_websocket(&self, player: u64) -> bool {
        let Some(sid) = self.core.borrow().player_session(player) else {
            return false;
        };
        self.tasks
            .borrow()
            .get(&sid)
            .is_some_and(|t| t.stream.is_websocket())
    }

    /// A wire queued its own reply (a pong): write it at the batch's end.
    pub fn wire_output(&self, sid: SessionId) {
        self.mark_dirty(sid);
    }

    /// The socket of `sid` took less than all: a writer task waits for it
    /// to drain. Or the output is finished: wake whoever waits for that.
    pub(super) fn backlog(&self, sid: SessionId) {
        let flushed = self.flushed(sid);
        let mut tasks = self.tasks.borrow_mut();
        let Some(t) = tasks.get_mut(&sid) else {
            return;
        };
        if flushed != Flushed::NotYet {
            t.reader.notify();
            return;
        }
        let Some(ctx) = self.this.borrow().upgrade() else {
            return;
        };
        t.writing = true;
        {
            let st = self.stats();
            st.write_backlogs.set(st.write_backlogs.get() + 1);
        }
        let stream = t.stream.clone();
        t.writer = Some(glommio::spawn_local(conn::write_backlog(ctx, sid, stream)));
    }

    /// The writer task of `sid` has written all it was given (or failed).
    pub fn backlog_written(&self, sid: SessionId) {
        // It stopped at an empty queue: later output is written at the
        // end of batches again. A closing connection waits on the reader's
        // wake-up for this.
        if let Some(t) = self.tasks.borrow_mut().get_mut(&sid) {
            t.writing = false;
            // The task ends now: its handle (and the task's memory with
            // it) need not live as long as the session.
            if let Some(h) = t.writer.take() {
                h.detach();
            }
            t.reader.notify();
        }
    }

    /// Whether everything queued for `sid` was written (through its wire,
    /// if it has one).
    pub fn flushed(&self, sid: SessionId) -> Flushed {
        let f = self.core.borrow().flushed(sid);
        if f == Flushed::Yes {
            let pending = self
                .tasks
                .borrow()
                .get(&sid)
                .is_some_and(|t| t.stream.wire_pending());
            if pending {
                return Flushed::NotYet;
            }
        }
        f
    }

    pub(super) fn mark_dirty(&self, sid: SessionId) {
        if let Some(t) = self.tasks.borrow_mut().get_mut(&sid) {
            if !t.dirty {
                t.dirty = true;
                self.dirty.borrow_mut().push(sid);
            }
        }
    }
}
