//! The cluster's control threads: one that owns this gateway's lease and
//! its directory entries (claims, releases, hand-overs), one that reads
//! this gateway's inbox (other gateways asking for a player). The shards
//! talk to them with [`ClusterHandle`] and get answers on channels they
//! await; nothing here runs on a shard.

use super::{Claim, Directory};
use crate::config::ClusterConfig;
use crate::shard::ShardMsg;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a gateway waits for another to hand a player over.
pub const HANDOVER_WAIT: Duration = Duration::from_secs(3);

/// Requests of the shards to the command thread.
pub enum Cmd {
    /// Claim `player` for this gateway.
    Claim {
        player: u64,
        reply: flume::Sender<Result<Claim, String>>,
    },
    /// Ask gateway `from` for `player`; the answer is its snapshot bytes
    /// (None: it held nothing), once the directory names this gateway.
    Fetch {
        player: u64,
        from: String,
        reply: flume::Sender<Result<Option<Vec<u8>>, String>>,
    },
    /// This gateway let `player` go to `to`, with its state.
    Give {
        player: u64,
        to: String,
        image: Option<Vec<u8>>,
    },
    /// `player` ended on this gateway.
    Release { player: u64 },
    /// `player` is this gateway's at `epoch` (after a fetch).
    Claimed { player: u64, epoch: u64 },
}

/// What the shards hold to reach the cluster's control threads.
#[derive(Clone)]
pub struct ClusterHandle {
    pub cmds: flume::Sender<Cmd>,
    pub gateway_id: String,
    pub when_redis_down: crate::config::RedisDown,
}

/// The running control threads.
pub struct ClusterRuntime {
    pub handle: ClusterHandle,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl ClusterRuntime {
    /// The handle for the shards, made before the shards start; pass the
    /// receiver to [`start`](Self::start) once they run.
    pub fn handle(cfg: &ClusterConfig) -> (ClusterHandle, flume::Receiver<Cmd>) {
        let (tx, rx) = flume::unbounded();
        let handle = ClusterHandle {
            cmds: tx,
            gateway_id: cfg.gateway_id.clone(),
            when_redis_down: cfg.when_redis_down,
        };
        (handle, rx)
    }

    /// Start the threads; `shards` reach the shard inboxes (for requests
    /// of other gateways).
    pub fn start(
        cfg: &ClusterConfig,
        handle: ClusterHandle,
        rx: flume::Receiver<Cmd>,
        shards: Vec<flume::Sender<ShardMsg>>,
    ) -> ClusterRuntime {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        {
            let (cfg, stop, tx) = (cfg.clone(), stop.clone(), handle.cmds.clone());
            threads.push(std::thread::spawn(move || {
                command_loop(&cfg, &rx, &tx, &stop)
            }));
        }
        {
            let (cfg, stop) = (cfg.clone(), stop.clone());
            threads.push(std::thread::spawn(move || inbox_loop(&cfg, &shards, &stop)));
        }
        ClusterRuntime {
            handle,
            stop,
            threads,
        }
    }

    /// Stop the threads (within about a second).
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn connect(cfg: &ClusterConfig) -> Option<Directory> {
    match Directory::connect(&cfg.redis, &cfg.gateway_id, cfg.lease, &cfg.prefix) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(error = %e, "cluster: cannot reach redis");
            None
        }
    }
}

fn command_loop(
    cfg: &ClusterConfig,
    rx: &flume::Receiver<Cmd>,
    tx: &flume::Sender<Cmd>,
    stop: &AtomicBool,
) {
    let mut dir = connect(cfg);
    // Players this gateway holds, with the epoch it holds them at.
    let mut held: HashMap<u64, u64> = HashMap::new();
    let beat = (cfg.lease / 3).max(Duration::from_millis(10));
    let mut next_beat = Instant::now();
    while !stop.load(Ordering::Acquire) {
        if Instant::now() >= next_beat {
            if dir.is_none() {
                dir = connect(cfg);
            }
            if let Some(d) = dir.as_mut() {
                if let Err(e) = d.heartbeat() {
                    tracing::warn!(error = %e, "cluster: lease not renewed");
                    dir = None;
                }
            }
            next_beat = Instant::now() + beat;
        }
        let cmd = match rx.recv_timeout(
            next_beat
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(200)),
        ) {
            Ok(c) => c,
            Err(flume::RecvTimeoutError::Timeout) => continue,
            Err(flume::RecvTimeoutError::Disconnected) => break,
        };
        if dir.is_none() {
            dir = connect(cfg);
        }
        let Some(d) = dir.as_mut() else {
            if let Cmd::Claim { reply, .. } = cmd {
                let _ = reply.send(Err("redis unreachable".into()));
            } else if let Cmd::Fetch { reply, .. } = cmd {
                let _ = reply.send(Err("redis unreachable".into()));
            }
            continue;
        };
        let failed = match cmd {
            Cmd::Claim { player, reply } => {
                let r = d.claim(player);
                if let Ok(Claim::Granted { epoch } | Claim::TakenOver { epoch, .. }) = &r {
                    held.insert(player, *epoch);
                }
                let failed = r.is_err();
                let _ = reply.send(r.map_err(|e| e.to_string()));
                failed
            }
            Cmd::Claimed { player, epoch } => {
                held.insert(player, epoch);
                false
            }
            Cmd::Release { player } => match held.remove(&player) {
                Some(epoch) => d.release(player, epoch).is_err(),
                None => false,
            },
            Cmd::Give { player, to, image } => {
                // The directory first, then the state: when the taker wakes
                // up the directory already names it.
                let mut failed = false;
                if let Some(epoch) = held.remove(&player) {
                    failed |= d.transfer(player, epoch, &to).is_err();
                }
                failed |= d
                    .put_handover(player, &to, image.as_deref().unwrap_or(&[]))
                    .is_err();
                failed
            }
            Cmd::Fetch {
                player,
                from,
                reply,
            } => {
                // Wait for the other gateway on a thread of its own, so
                // other commands go on meanwhile.
                let (cfg, tx) = (cfg.clone(), tx.clone());
                std::thread::spawn(move || fetch(&cfg, player, &from, &tx, &reply));
                false
            }
        };
        if failed {
            tracing::warn!("cluster: a redis command failed; reconnecting");
            dir = None;
        }
    }
}

fn fetch(
    cfg: &ClusterConfig,
    player: u64,
    from: &str,
    tx: &flume::Sender<Cmd>,
    reply: &flume::Sender<Result<Option<Vec<u8>>, String>>,
) {
    let outcome = (|| -> Result<Option<Vec<u8>>, String> {
        let mut d = connect(cfg).ok_or("redis unreachable")?;
        d.push_inbox(from, &format!("take {player} {}", cfg.gateway_id))
            .map_err(|e| e.to_string())?;
        let bytes = d
            .take_handover(player, HANDOVER_WAIT)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("gateway {from} did not hand player {player} over in time"))?;
        match d.claim(player).map_err(|e| e.to_string())? {
            Claim::Granted { epoch } | Claim::TakenOver { epoch, .. } => {
                let _ = tx.send(Cmd::Claimed { player, epoch });
            }
            Claim::Held { by, .. } => {
                return Err(format!(
                    "player {player} is held by {by} after the hand-over"
                ))
            }
        }
        Ok((!bytes.is_empty()).then_some(bytes))
    })();
    let _ = reply.send(outcome);
}

fn inbox_loop(cfg: &ClusterConfig, shards: &[flume::Sender<ShardMsg>], stop: &AtomicBool) {
    let mut dir = None;
    while !stop.load(Ordering::Acquire) {
        if dir.is_none() {
            dir = connect(cfg);
            if dir.is_none() {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        }
        let Some(d) = dir.as_mut() else { continue };
        match d.pop_inbox(Duration::from_millis(500)) {
            Ok(None) => {}
            Ok(Some(msg)) => {
                let mut words = msg.split_whitespace();
                match (
                    words.next(),
                    words.next().and_then(|p| p.parse::<u64>().ok()),
                    words.next(),
                ) {
                    (Some("take"), Some(player), Some(to)) if !shards.is_empty() => {
                        let home = shards::home_shard(player, shards.len());
                        let _ = shards[home].send(ShardMsg::GiveAway {
                            player,
                            to: to.to_string(),
                        });
                    }
                    _ => tracing::warn!(message = %msg, "cluster: unknown inbox message"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cluster: inbox read failed");
                dir = None;
            }
        }
    }
}
