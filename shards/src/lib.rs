//! Thread-per-core runtime: N glommio executors, each pinned to a core, joined
//! by a typed cross-shard mesh, with a shard-wide stop signal and join.
//!
//! This crate knows nothing about games. It gives:
//! - [`start`]: spawn one executor per shard and run a user future on each;
//! - [`Mesh`]: every shard can send a message of type `M` to every shard
//!   (itself included) without ever blocking: a full peer queue makes the
//!   message wait in a local, ordered backlog that a background task drains;
//! - [`home_shard`]: the stable hash that places a key on a shard;
//! - [`StopHandle`] / [`StopToken`]: a stop signal any thread may raise and
//!   every shard may await;
//! - [`Shards::join`]: wait for every shard to return.
//!
//! Layout: `mesh.rs` (the mesh), `stop.rs` (stop signal), this file (start,
//! join, placement, hashing).

mod mesh;
mod notify;
mod stop;

pub use mesh::{Mesh, MeshError, MeshStats};
pub use notify::Notify;
pub use stop::{StopHandle, StopToken};

use glommio::{LocalExecutorBuilder, Placement};
use std::future::Future;
use std::thread;

/// How to start the shards.
#[derive(Debug, Clone)]
pub struct ShardsConfig {
    /// Number of shards (executors). Zero is refused.
    pub shards: usize,
    /// Pin shard `i` to the `i`-th CPU this process may run on (wrapping).
    /// Unpinned shards float; useful where CPUs are shared with other work.
    pub pin: bool,
    /// Thread name prefix; threads are named `{name}-{i}`.
    pub name: String,
    /// Capacity of each shard's inbox before senders spill into their local
    /// backlog.
    pub mesh_capacity: usize,
    /// Spin this long before an idle shard parks (sleeps in the kernel):
    /// fewer syscalls and wake-ups under moderate load, at the price of CPU
    /// burnt while idle. None: park at once.
    pub spin_before_park: Option<std::time::Duration>,
}

impl ShardsConfig {
    /// One pinned shard per CPU this process may use.
    pub fn per_core(name: &str) -> ShardsConfig {
        ShardsConfig {
            shards: available_cpus().len().max(1),
            pin: true,
            name: name.to_string(),
            mesh_capacity: 1024,
            spin_before_park: None,
        }
    }
}

/// Why the shards could not start or a shard ended badly.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("shard count must be at least 1")]
    NoShards,
    #[error("could not start shard {shard}: {message}")]
    Spawn { shard: usize, message: String },
    #[error("shard {shard} panicked: {message}")]
    Panicked { shard: usize, message: String },
}

/// What each shard's entry function receives.
pub struct Shard<M: Send + 'static> {
    id: usize,
    count: usize,
    mesh: Mesh<M>,
    inbox: flume::Receiver<M>,
    stop: StopToken,
    stop_handle: StopHandle,
}

impl<M: Send + 'static> Shard<M> {
    /// This shard's index, `0..count`.
    pub fn id(&self) -> usize {
        self.id
    }
    /// Number of shards.
    pub fn count(&self) -> usize {
        self.count
    }
    /// The sending side of the mesh, owned by this shard.
    pub fn mesh(&self) -> &Mesh<M> {
        &self.mesh
    }
    /// Messages sent to this shard, by any shard or by the [`Shards`] handle.
    /// Drain it in a task of its own (never in a task that also awaits a send).
    pub fn inbox(&self) -> &flume::Receiver<M> {
        &self.inbox
    }
    /// Resolves when a stop is requested.
    pub fn stop_token(&self) -> &StopToken {
        &self.stop
    }
    /// Lets this shard ask every shard to stop.
    pub fn stop_handle(&self) -> &StopHandle {
        &self.stop_handle
    }
    /// Split into parts, for code that keeps them in different places.
    #[allow(clippy::type_complexity)]
    pub fn into_parts(
        self,
    ) -> (
        usize,
        usize,
        Mesh<M>,
        flume::Receiver<M>,
        StopToken,
        StopHandle,
    ) {
        (
            self.id,
            self.count,
            self.mesh,
            self.inbox,
            self.stop,
            self.stop_handle,
        )
    }
}

/// The running shards, seen from the thread that started them.
pub struct Shards<M: Send + 'static, R: Send + 'static> {
    handles: Vec<glommio::ExecutorJoinHandle<R>>,
    inboxes: Vec<flume::Sender<M>>,
    stop: StopHandle,
}

impl<M: Send + 'static, R: Send + 'static> Shards<M, R> {
    /// Number of shards.
    pub fn count(&self) -> usize {
        self.inboxes.len()
    }
    /// Send a message to shard `to` from outside the shards; waits (on this
    /// outside thread only) while that shard's inbox is full.
    pub fn send_blocking(&self, to: usize, msg: M) -> Result<(), MeshError> {
        let tx = self.inboxes.get(to).ok_or(MeshError::NoSuchShard(to))?;
        tx.send(msg).map_err(|_| MeshError::Closed(to))
    }
    /// Senders into every shard's inbox, for threads outside the shards
    /// (they wait when an inbox is full, never a shard).
    pub fn senders(&self) -> Vec<flume::Sender<M>> {
        self.inboxes.clone()
    }

    /// A handle that raises the stop signal; cloneable, usable from any thread.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }
    /// Ask every shard to stop.
    pub fn stop(&self) {
        self.stop.stop();
    }
    /// Wait for every shard to return; results in shard order.
    pub fn join(self) -> Vec<Result<R, ShardError>> {
        self.handles
            .into_iter()
            .enumerate()
            .map(|(shard, h)| {
                h.join().map_err(|e| ShardError::Panicked {
                    shard,
                    message: e.to_string(),
                })
            })
            .collect()
    }
}

/// Start `config.shards` executors; each runs `entry(shard)` to completion.
///
/// `entry` is cloned once per shard and moved to that shard's thread; the
/// future it returns lives on that thread only (it need not be `Send`).
pub fn start<M, R, F, Fut>(config: &ShardsConfig, entry: F) -> Result<Shards<M, R>, ShardError>
where
    M: Send + 'static,
    R: Send + 'static,
    F: FnOnce(Shard<M>) -> Fut + Send + Clone + 'static,
    Fut: Future<Output = R> + 'static,
{
    let n = config.shards;
    if n == 0 {
        return Err(ShardError::NoShards);
    }
    let cap = config.mesh_capacity.max(1);
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| flume::bounded::<M>(cap)).unzip();
    let (stop, stop_rxs) = StopHandle::new(n);
    let cpus = available_cpus();
    let mut handles = Vec::with_capacity(n);
    for (id, (inbox, stop_rx)) in rxs.into_iter().zip(stop_rxs).enumerate() {
        let placement = match (config.pin, cpus.is_empty()) {
            (true, false) => Placement::Fixed(cpus[id % cpus.len()]),
            _ => Placement::Unbound,
        };
        let peers = txs.clone();
        let entry = entry.clone();
        let stop_handle = stop.clone();
        let mut builder =
            LocalExecutorBuilder::new(placement).name(&format!("{}-{id}", config.name));
        if let Some(spin) = config.spin_before_park {
            builder = builder.spin_before_park(spin);
        }
        let spawned = builder.spawn(move || async move {
            let token = StopToken::start(stop_rx, stop_handle.flag());
            let shard = Shard {
                id,
                count: n,
                mesh: Mesh::new(id, peers),
                inbox,
                stop: token,
                stop_handle,
            };
            entry(shard).await
        });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                // Stop and reap what already started, then report.
                stop.stop();
                for h in handles {
                    let _ = h.join();
                }
                return Err(ShardError::Spawn {
                    shard: id,
                    message: e.to_string(),
                });
            }
        }
    }
    Ok(Shards {
        handles,
        inboxes: txs,
        stop,
    })
}

/// The shard that owns `key` among `shards` shards.
///
/// Stable across processes, hosts and versions of this crate (snapshots and
/// other gateways depend on it): splitmix64 of the key, then a
/// multiply-shift reduction onto `0..shards`.
pub fn home_shard(key: u64, shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    let h = splitmix64(key);
    ((h as u128 * shards as u128) >> 64) as usize
}

/// The splitmix64 finaliser: a cheap, well-mixed 64-bit hash.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// CPUs this process may run on (its affinity mask), in ascending order.
pub fn available_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most
    // size_of::<cpu_set_t>() bytes into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        let n = thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        return (0..n).collect();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: i < CPU_SETSIZE, the bound CPU_ISSET expects.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::time::Duration;

    fn cfg(n: usize) -> ShardsConfig {
        ShardsConfig {
            shards: n,
            pin: true,
            name: "test".into(),
            mesh_capacity: 4,
            spin_before_park: None,
        }
    }

    #[test]
    fn home_shard_is_stable_and_spreads() {
        // Fixed values: a change here breaks every snapshot and cluster peer.
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(home_shard(42, 1), 0);
        let n = 8;
        let mut counts = vec![0usize; n];
        for id in 1..=80_000u64 {
            let s = home_shard(id, n);
            assert!(s < n);
            assert_eq!(s, home_shard(id, n));
            counts[s] += 1;
        }
        for c in counts {
            assert!((9_000..=11_000).contains(&c), "uneven spread: {c}");
        }
    }

    #[test]
    fn zero_shards_is_refused() {
        let r = start::<(), (), _, _>(&cfg(0), |_s| async {});
        assert!(matches!(r, Err(ShardError::NoShards)));
    }

    #[test]
    fn each_shard_runs_on_its_own_thread_with_its_id() {
        let shards = start::<(), _, _, _>(&cfg(3), |s| async move {
            (s.id(), s.count(), format!("{:?}", thread::current().id()))
        })
        .expect("start");
        let out: Vec<_> = shards
            .join()
            .into_iter()
            .map(|r| r.expect("join"))
            .collect();
        assert_eq!(out.iter().map(|o| o.0).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!(out.iter().all(|o| o.1 == 3));
        let threads: HashSet<_> = out.iter().map(|o| o.2.clone()).collect();
        assert_eq!(threads.len(), 3);
    }

    #[test]
    fn mesh_delivers_every_message_in_order_past_a_full_inbox() {
        // Capacity 4, 500 messages from every shard to every shard: senders
        // spill into their backlog and never block; each receiver sees each
        // sender's messages in order.
        const PER_PEER: u64 = 500;
        let n = 3;
        let shards = start::<(usize, u64), _, _, _>(&cfg(n), move |s| async move {
            let me = s.id();
            for i in 0..PER_PEER {
                for to in 0..s.count() {
                    s.mesh().send(to, (me, i)).expect("send");
                }
            }
            let mut next = vec![0u64; s.count()];
            let mut got = 0;
            while got < PER_PEER as usize * s.count() {
                let (from, i) = s.inbox().recv_async().await.expect("recv");
                assert_eq!(i, next[from], "out of order from {from}");
                next[from] += 1;
                got += 1;
            }
            s.mesh().flushed().await;
            (got, s.mesh().stats().spilled)
        })
        .expect("start");
        let mut spilled = 0;
        for r in shards.join() {
            let (got, sp) = r.expect("join");
            assert_eq!(got, PER_PEER as usize * n);
            spilled += sp;
        }
        assert!(spilled > 0, "the test must exercise the backlog");
    }

    #[test]
    fn stop_wakes_every_waiter_on_every_shard() {
        let shards = start::<(), _, _, _>(&cfg(2), |s| async move {
            let t1 = s.stop_token().clone();
            let t2 = s.stop_token().clone();
            let a = glommio::spawn_local(async move {
                t1.stopped().await;
                1
            });
            let b = glommio::spawn_local(async move {
                t2.stopped().await;
                2
            });
            // Shard 1 raises the stop for everyone.
            if s.id() == 1 {
                glommio::timer::sleep(Duration::from_millis(20)).await;
                s.stop_handle().stop();
            }
            let sum = a.await + b.await;
            assert!(s.stop_token().is_stopped());
            sum
        })
        .expect("start");
        for r in shards.join() {
            assert_eq!(r.expect("join"), 3);
        }
    }

    #[test]
    fn outside_stop_and_outside_send() {
        let shards = start::<u32, _, _, _>(&cfg(2), |s| async move {
            let v = s.inbox().recv_async().await.unwrap_or(0);
            s.stop_token().stopped().await;
            v
        })
        .expect("start");
        shards.send_blocking(0, 7).expect("send");
        shards.send_blocking(1, 9).expect("send");
        assert!(matches!(
            shards.send_blocking(5, 1),
            Err(MeshError::NoSuchShard(5))
        ));
        shards.stop();
        let out: Vec<u32> = shards
            .join()
            .into_iter()
            .map(|r| r.expect("join"))
            .collect();
        assert_eq!(out, vec![7, 9]);
    }

    #[test]
    fn available_cpus_is_not_empty() {
        assert!(!available_cpus().is_empty());
    }
}
