//! Writing sessions' output: straight from the core's queue at the end of
//! a batch (one non-blocking `send` per session), or by a writer task
//! spawned for a socket that took less than was queued.

use super::{conn, ShardCtx};
use crate::core::{Flushed, WriteNow};
use crate::session::SessionId;
use std::os::fd::AsRawFd;

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
                let fd = {
                    let mut tasks = self.tasks.borrow_mut();
                    let Some(t) = tasks.get_mut(&sid) else {
                        continue;
                    };
                    t.dirty = false;
                    if t.writing {
                        // It takes what was queued when it has written.
                        continue;
                    }
                    t.stream.with(|s| s.as_raw_fd())
                };
                let r = self
                    .core
                    .borrow_mut()
                    .write_now(sid, now, |b| crate::net::send_now(fd, b));
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

    /// The socket of `sid` took less than all: a writer task waits for it
    /// to drain. Or the output is finished: wake whoever waits for that.
    pub(super) fn backlog(&self, sid: SessionId) {
        let flushed = self.core.borrow().flushed(sid);
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

    /// Whether everything queued for `sid` was written.
    pub fn flushed(&self, sid: SessionId) -> Flushed {
        self.core.borrow().flushed(sid)
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
