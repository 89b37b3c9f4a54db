//! The shard-wide stop signal: raised once from any thread, awaited by any
//! number of tasks on every shard.
//!
//! Each shard has a one-slot channel from the [`StopHandle`]; a watcher task
//! on the shard waits on it and then drops the only sender of a shard-local
//! channel, so every local waiter (each holding a receiver of it) wakes with
//! "disconnected". No lock is involved.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

struct Inner {
    flag: AtomicBool,
    wake: Vec<flume::Sender<()>>,
}

/// Raises the stop signal. Cloneable and `Send`: signal handlers, the
/// starting thread and the shards themselves may hold one.
#[derive(Clone)]
pub struct StopHandle {
    inner: Arc<Inner>,
}

impl StopHandle {
    pub(crate) fn new(shards: usize) -> (StopHandle, Vec<flume::Receiver<()>>) {
        let (wake, rxs) = (0..shards).map(|_| flume::bounded(1)).unzip();
        let inner = Arc::new(Inner {
            flag: AtomicBool::new(false),
            wake,
        });
        (StopHandle { inner }, rxs)
    }

    pub(crate) fn flag(&self) -> Arc<dyn Fn() -> bool + Send + Sync> {
        let inner = self.inner.clone();
        Arc::new(move || inner.flag.load(Ordering::Acquire))
    }

    /// Ask every shard to stop. Idempotent.
    pub fn stop(&self) {
        if !self.inner.flag.swap(true, Ordering::AcqRel) {
            for w in &self.inner.wake {
                let _ = w.try_send(());
            }
        }
    }

    /// Whether a stop was requested.
    pub fn is_stopped(&self) -> bool {
        self.inner.flag.load(Ordering::Acquire)
    }
}

/// A shard's view of the stop signal. Cheap to clone; stays on its shard.
#[derive(Clone)]
pub struct StopToken {
    local: flume::Receiver<()>,
    flag: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl StopToken {
    /// Start the watcher on the current shard.
    pub(crate) fn start(
        remote: flume::Receiver<()>,
        flag: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> StopToken {
        let (local_tx, local) = flume::bounded::<()>(1);
        glommio::spawn_local(async move {
            // Returns on the signal, or when the handle is gone.
            let _ = remote.recv_async().await;
            drop(local_tx);
        })
        .detach();
        StopToken { local, flag }
    }

    /// Whether a stop was requested.
    pub fn is_stopped(&self) -> bool {
        (self.flag)()
    }

    /// Resolves once a stop is requested (at once if it already was).
    pub async fn stopped(&self) {
        // The local channel never carries a message: it only disconnects.
        let _ = self.local.recv_async().await;
    }
}
