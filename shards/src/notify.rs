//! A one-waiter wake-up flag for tasks of one shard: `notify` sets it and
//! wakes the waiter; `notified` resolves once it is set, and clears it.
//! Notifications do not queue: many `notify` calls before a wait count once.

use std::cell::Cell;
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// See the module documentation. Not `Send`: it lives on one shard.
#[derive(Default)]
pub struct Notify {
    set: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Notify {
    pub fn new() -> Notify {
        Notify::default()
    }

    /// Set the flag and wake the waiter, if any.
    pub fn notify(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Resolves when the flag is set (at once if it already is); clears it.
    pub async fn notified(&self) {
        poll_fn(|cx| self.poll_notified(cx)).await
    }

    /// [`Notify::notified`] as a poll, for a hand-written future that
    /// waits on something else too.
    pub fn poll_notified(&self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if self.set.replace(false) {
            Poll::Ready(())
        } else {
            self.waker.set(Some(cx.waker().clone()));
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn notify_before_and_after_wait() {
        glommio::LocalExecutor::default().run(async {
            let n = Rc::new(Notify::new());
            n.notify();
            n.notify();
            n.notified().await; // already set: immediate
            let n2 = n.clone();
            let t = glommio::spawn_local(async move {
                n2.notified().await;
                7
            });
            glommio::yield_if_needed().await;
            glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
            n.notify();
            assert_eq!(t.await, 7);
        });
    }
}
