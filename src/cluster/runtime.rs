//! The cluster's control threads: one that owns this gateway's lease and
//! its directory entries (claims, releases, hand-overs), one that reads
//! this gateway's inbox (other gateways asking for a player). The shards
//! talk to them with [`ClusterHandle`] and get answers on channels they
//! await; nothing here runs on a shard.
//!
//! Why one file of this length: the two control threads and the commands
//! they serve are one protocol with Redis; the directory's own rules are in
//! `cluster/mod.rs`.

use super::placement::{Evacuation, MigrationStats, Step};
use super::{Claim, Directory, Lease, Peer, Store};
use crate::config::ClusterConfig;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a gateway waits for another to hand a player over.
pub const HANDOVER_WAIT: Duration = Duration::from_secs(3);

/// Players grouped by the gateway holding them: (its HTTP address, players);
/// an empty address is this gateway itself.
pub type Routes = Vec<(String, Vec<u64>)>;

/// Where players are, as the directory says, or (`guessed`) while Redis
/// cannot say: every peer last known, each with all the players, so a
/// push still reaches a player wherever it is during a failover (each
/// peer delivers to those it holds and forwards no further).
#[derive(Debug, Clone, Default)]
pub struct Routed {
    pub routes: Routes,
    pub guessed: bool,
}

impl Routed {
    fn guess(peers: &[String], players: &[u64]) -> Routed {
        Routed {
            routes: peers
                .iter()
                .map(|h| (h.clone(), players.to_vec()))
                .collect(),
            guessed: true,
        }
    }
}

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
        /// For a login (not a resume): under `on_second_login: RejectNew`
        /// the holder refuses while the player has a live session.
        login: bool,
        reply: flume::Sender<Result<Option<Vec<u8>>, String>>,
    },
    /// Refuse gateway `to` the player it asked for (it is online here and
    /// `on_second_login` is `RejectNew`).
    Refuse { player: u64, to: String },
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
    /// `player` is no longer this gateway's (migrated away).
    Forget { player: u64 },
    /// Move `player` (its state in `image`) to gateway `to`; the answer is
    /// the client address of `to`, once it confirmed. On failure the
    /// player is this gateway's again.
    Migrate {
        player: u64,
        to: String,
        image: Vec<u8>,
        reply: flume::Sender<Result<String, String>>,
    },
    /// Which other gateways hold some of `players`: (HTTP address, players).
    Route {
        players: Vec<u64>,
        reply: flume::Sender<Result<Routed, String>>,
    },
    /// The HTTP addresses of every other live gateway.
    Peers {
        reply: flume::Sender<Result<Vec<String>, String>>,
    },
    /// Every other live gateway with its lease (load, room).
    PeerLeases {
        reply: flume::Sender<Result<Vec<Peer>, String>>,
    },
    /// Make `evac` this gateway's evacuation; refused while another runs.
    StartEvacuation {
        evac: Arc<Evacuation>,
        reply: flume::Sender<Result<(), String>>,
    },
    /// This gateway's evacuation (running or the last one), if any.
    Evacuation {
        reply: flume::Sender<Result<Option<Arc<Evacuation>>, String>>,
    },
    /// POST `path` with `body` to another gateway's HTTP API; the answer's
    /// push counts.
    Forward {
        http: String,
        path: String,
        body: bytes::Bytes,
        token: Option<String>,
        reply: flume::Sender<Result<crate::core::PushCounts, ForwardError>>,
    },
}

/// What the shards hold to reach the cluster's control threads.
#[derive(Clone)]
pub struct ClusterHandle {
    pub cmds: flume::Sender<Cmd>,
    pub gateway_id: String,
    pub when_redis_down: crate::config::RedisDown,
    /// What this gateway's lease tells its peers.
    pub load: Arc<Load>,
    /// Durations and failures of the migration steps.
    pub migrations: Arc<MigrationStats>,
    /// Migrations in flight per shard during an evacuation, and started per
    /// second by the whole gateway (0: no bound).
    pub migrate_parallel: usize,
    pub migrate_rate: u32,
}

/// This gateway's load as its lease reports it: each shard stores its
/// player count on its tick, the coordinator sets `draining`; the lease
/// thread reads them at each renewal.
pub struct Load {
    /// Open client connections of the gateway.
    pub sessions: Arc<AtomicUsize>,
    /// Players held, per shard.
    pub players: Vec<AtomicUsize>,
    /// `max_connections`, after the open-files limit.
    pub max_connections: usize,
    /// `max_players`.
    pub max_players: usize,
    /// The gateway drains: it takes no player.
    pub draining: AtomicBool,
}

impl Load {
    pub fn new(
        shards: usize,
        sessions: Arc<AtomicUsize>,
        max_connections: usize,
        max_players: usize,
    ) -> Load {
        Load {
            sessions,
            players: (0..shards).map(|_| AtomicUsize::new(0)).collect(),
            max_connections,
            max_players,
            draining: AtomicBool::new(false),
        }
    }

    /// Shard `shard` holds `n` players now.
    pub fn set_players(&self, shard: usize, n: usize) {
        if let Some(slot) = self.players.get(shard) {
            slot.store(n, Ordering::Release);
        }
    }

    /// The lease as of now, with `http` as the address.
    pub fn lease(&self, http: &str) -> Lease {
        Lease {
            http: http.to_string(),
            sessions: self.sessions.load(Ordering::Acquire) as u64,
            players: self
                .players
                .iter()
                .map(|p| p.load(Ordering::Acquire) as u64)
                .sum(),
            max_connections: self.max_connections as u64,
            max_players: self.max_players as u64,
            draining: self.draining.load(Ordering::Acquire),
        }
    }
}

/// What the cluster's threads ask of a shard (the gateway puts it in the
/// shard's inbox; this module knows nothing of the shard's messages).
pub enum ToShard {
    /// Another gateway takes the player over: send it its state (`login`:
    /// for a login, which `on_second_login: RejectNew` may refuse).
    GiveAway {
        player: u64,
        to: String,
        login: bool,
    },
    /// A player migrated here: load it, then answer on `reply`.
    Adopt {
        image: crate::snapshot::Image,
        reply: flume::Sender<()>,
    },
}

/// The gateway's shards as the cluster's threads reach them.
#[derive(Clone)]
pub struct Shards {
    pub count: usize,
    /// Deliver to shard `i`; false if it is gone.
    pub send: Arc<dyn Fn(usize, ToShard) -> bool + Send + Sync>,
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
    pub fn handle(cfg: &ClusterConfig, load: Load) -> (ClusterHandle, flume::Receiver<Cmd>) {
        let (tx, rx) = flume::unbounded();
        let handle = ClusterHandle {
            cmds: tx,
            gateway_id: cfg.gateway_id.clone(),
            when_redis_down: cfg.when_redis_down,
            load: Arc::new(load),
            migrations: Arc::new(MigrationStats::default()),
            migrate_parallel: cfg.migrate_parallel.max(1),
            migrate_rate: cfg.migrate_rate.unwrap_or(0),
        };
        (handle, rx)
    }

    /// Start the threads; `shards` delivers to the gateway's shards (for
    /// requests of other gateways).
    pub fn start(
        cfg: &ClusterConfig,
        http: String,
        handle: ClusterHandle,
        rx: flume::Receiver<Cmd>,
        shards: Shards,
    ) -> ClusterRuntime {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        {
            let (cfg, stop, tx) = (cfg.clone(), stop.clone(), handle.cmds.clone());
            let (load, stats) = (handle.load.clone(), handle.migrations.clone());
            threads.push(std::thread::spawn(move || {
                command_loop(&cfg, &http, &load, &stats, &rx, &tx, &stop)
            }));
        }
        {
            let (cfg, stop, cmds) = (cfg.clone(), stop.clone(), handle.cmds.clone());
            let stats = handle.migrations.clone();
            threads.push(std::thread::spawn(move || {
                inbox_loop(&cfg, &shards, &cmds, &stats, &stop)
            }));
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
    match Directory::open(&Store::of(cfg), &cfg.gateway_id, cfg.lease, &cfg.prefix) {
        Ok(mut d) => {
            if let Some(n) = cfg.wait_replicas {
                d.set_durability(n, super::RETRY_FOR);
            }
            Some(d)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cluster: cannot reach redis");
            None
        }
    }
}

fn command_loop(
    cfg: &ClusterConfig,
    http: &str,
    load: &Load,
    stats: &Arc<MigrationStats>,
    rx: &flume::Receiver<Cmd>,
    tx: &flume::Sender<Cmd>,
    stop: &AtomicBool,
) {
    let mut dir = connect(cfg);
    // This gateway's evacuation, running or the last one.
    let mut evacuation: Option<Arc<Evacuation>> = None;
    // The peers' HTTP addresses as last read (for pushes while Redis
    // fails over).
    let mut known_peers: Vec<String> = Vec::new();
    // Players this gateway holds, with the epoch it holds them at.
    let mut held: HashMap<u64, u64> = HashMap::new();
    // Worker threads (forwards, hand-overs, migrations) alive now.
    let workers = Arc::new(AtomicUsize::new(0));
    let beat = (cfg.lease / 3).max(Duration::from_millis(10));
    let mut next_beat = Instant::now();
    while !stop.load(Ordering::Acquire) {
        if Instant::now() >= next_beat {
            if dir.is_none() {
                dir = connect(cfg);
            }
            if let Some(d) = dir.as_mut() {
                match d.renew(&load.lease(http)).and_then(|()| d.peers()) {
                    Ok(peers) => known_peers = peers.into_iter().map(|(_, h)| h).collect(),
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster: lease not renewed");
                        dir = None;
                    }
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
        let cmd = match cmd {
            Cmd::StartEvacuation { evac, reply } => {
                let r = match &evacuation {
                    Some(e) if e.running() => Err("an evacuation is running".to_string()),
                    _ => {
                        evacuation = Some(evac);
                        Ok(())
                    }
                };
                let _ = reply.send(r);
                continue;
            }
            Cmd::Evacuation { reply } => {
                let _ = reply.send(Ok(evacuation.clone()));
                continue;
            }
            // A forward needs no Redis (it is how pushes go on while Redis
            // fails over).
            Cmd::Forward { reply, .. } if workers.load(Ordering::Acquire) >= MAX_WORKERS => {
                let _ = reply.send(Err(ForwardError {
                    delivered_nothing: true,
                    reason: busy(),
                }));
                continue;
            }
            Cmd::Forward {
                http,
                path,
                body,
                token,
                reply,
            } => {
                let slot = Worker::take(&workers);
                std::thread::spawn(move || {
                    let _slot = slot;
                    let _ = reply.send(forward(&http, &path, &body, token.as_deref()));
                });
                continue;
            }
            other => other,
        };
        if dir.is_none() {
            dir = connect(cfg);
        }
        let Some(d) = dir.as_mut() else {
            let down = || "redis unreachable".to_string();
            match cmd {
                Cmd::Claim { reply, .. } => drop(reply.send(Err(down()))),
                Cmd::Fetch { reply, .. } => drop(reply.send(Err(down()))),
                Cmd::Refuse { player, to } => {
                    tracing::warn!(
                        player,
                        to,
                        "cluster: cannot refuse a takeover without redis"
                    );
                }
                Cmd::Route { players, reply } => drop(reply.send(if known_peers.is_empty() {
                    Err(down())
                } else {
                    Ok(Routed::guess(&known_peers, &players))
                })),
                Cmd::Peers { reply } => drop(reply.send(Err(down()))),
                Cmd::PeerLeases { reply } => drop(reply.send(Err(down()))),
                Cmd::Migrate { reply, .. } => drop(reply.send(Err(down()))),
                _ => {}
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
            Cmd::Forget { player } => {
                held.remove(&player);
                false
            }
            Cmd::Migrate {
                player,
                to,
                image,
                reply,
            } => {
                match held.get(&player).copied() {
                    None => {
                        let _ = reply.send(Err(format!("player {player} is not held here")));
                    }
                    Some(_) if workers.load(Ordering::Acquire) >= MAX_WORKERS => {
                        let _ = reply.send(Err(busy()));
                    }
                    Some(epoch) => {
                        // The directory moves at once (the target's adoption
                        // then moves the epoch on); the wait for the target's
                        // confirmation happens on a thread of its own.
                        let t0 = Instant::now();
                        match d.transfer(player, epoch, &to) {
                            Ok(Some(new_epoch)) => {
                                held.remove(&player);
                                let (cfg, tx, stats) = (cfg.clone(), tx.clone(), stats.clone());
                                let slot = Worker::take(&workers);
                                std::thread::spawn(move || {
                                    let _slot = slot;
                                    let m = Migration {
                                        player,
                                        to: &to,
                                        epoch: new_epoch,
                                        image: &image,
                                        started: t0,
                                    };
                                    migrate(&cfg, &m, &stats, &tx, &reply)
                                });
                            }
                            Ok(None) => {
                                stats.fail(Step::Transfer, "not_held");
                                let _ = reply.send(Err(format!(
                                    "player {player}: fenced off (not ours any more)"
                                )));
                            }
                            Err(e) => {
                                stats.fail(Step::Transfer, "redis");
                                let _ = reply.send(Err(e.to_string()));
                            }
                        }
                    }
                }
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
            Cmd::Route { players, reply } => {
                let r = route(d, &players, &mut known_peers);
                let failed = r.is_err();
                let r = match r {
                    Ok(routes) => Ok(Routed {
                        routes,
                        guessed: false,
                    }),
                    Err(_) if !known_peers.is_empty() => Ok(Routed::guess(&known_peers, &players)),
                    Err(e) => Err(e.to_string()),
                };
                let _ = reply.send(r);
                failed
            }
            Cmd::Peers { reply } => {
                let r = d.peers().map(|v| v.into_iter().map(|(_, h)| h).collect());
                let failed = r.is_err();
                let _ = reply.send(r.map_err(|e| e.to_string()));
                failed
            }
            Cmd::PeerLeases { reply } => {
                let r = d.peer_leases();
                let failed = r.is_err();
                let _ = reply.send(r.map_err(|e| e.to_string()));
                failed
            }
            // Served above, whatever Redis does.
            Cmd::StartEvacuation { .. } | Cmd::Evacuation { .. } => false,
            // Served above, without Redis.
            Cmd::Forward { .. } => false,
            Cmd::Refuse { player, to } => d
                .put_handover(player, &to, super::HANDOVER_REFUSED)
                .is_err(),
            Cmd::Fetch {
                player,
                from,
                login,
                reply,
            } => {
                // Wait for the other gateway on a thread of its own, so
                // other commands go on meanwhile.
                if workers.load(Ordering::Acquire) >= MAX_WORKERS {
                    let _ = reply.send(Err(busy()));
                    false
                } else {
                    let (cfg, tx) = (cfg.clone(), tx.clone());
                    let slot = Worker::take(&workers);
                    std::thread::spawn(move || {
                        let _slot = slot;
                        fetch(&cfg, player, &from, login, &tx, &reply)
                    });
                    false
                }
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
    login: bool,
    tx: &flume::Sender<Cmd>,
    reply: &flume::Sender<Result<Option<Vec<u8>>, String>>,
) {
    let outcome = (|| -> Result<Option<Vec<u8>>, String> {
        let mut d = connect(cfg).ok_or("redis unreachable")?;
        d.want(player, HANDOVER_WAIT)
            .and_then(|()| {
                let what = if login { "login" } else { "resume" };
                d.push_inbox(from, &format!("take {player} {} {what}", cfg.gateway_id))
            })
            .map_err(|e| e.to_string())?;
        let bytes = d
            .take_handover(player, HANDOVER_WAIT)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("gateway {from} did not hand player {player} over in time"))?;
        if bytes == super::HANDOVER_REFUSED {
            return Err(super::ALREADY_ONLINE.to_string());
        }
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

fn inbox_loop(
    cfg: &ClusterConfig,
    shards: &Shards,
    cmds: &flume::Sender<Cmd>,
    stats: &MigrationStats,
    stop: &AtomicBool,
) {
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
                    (Some("adopt"), Some(player), Some(from)) if shards.count > 0 => {
                        match words.next().and_then(|e| e.parse::<u64>().ok()) {
                            Some(epoch) => {
                                let t = Instant::now();
                                match adopt(cfg, d, player, from, epoch, shards, cmds) {
                                    Ok(()) => stats.record(Step::Adopt, t.elapsed()),
                                    Err(reason) => stats.fail(Step::Adopt, reason),
                                }
                            }
                            None => tracing::warn!(message = %msg, "cluster: adopt without epoch"),
                        }
                    }
                    (Some("take"), Some(player), Some(to)) if shards.count > 0 => {
                        // A request read late (the asker gave up) would hand
                        // the state to nobody: only a live one is served.
                        match d.wanted(player, to) {
                            Ok(true) => {
                                let home = shards::home_shard(player, shards.count);
                                // A request without the word (an older
                                // gateway's) is a takeover as before.
                                let login = words.next() == Some("login");
                                (shards.send)(
                                    home,
                                    ToShard::GiveAway {
                                        player,
                                        to: to.to_string(),
                                        login,
                                    },
                                );
                            }
                            Ok(false) => tracing::warn!(
                                player,
                                to,
                                "cluster: a stale hand-over request ignored"
                            ),
                            Err(e) => tracing::warn!(
                                player,
                                to,
                                error = %e,
                                "cluster: hand-over request not checked; ignored"
                            ),
                        }
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

/// Group `players` by the other live gateway holding them: (HTTP address, players).
fn route(
    d: &mut Directory,
    players: &[u64],
    known: &mut Vec<String>,
) -> Result<Routes, super::DirError> {
    let mut peers: HashMap<String, String> = d.peers()?.into_iter().collect();
    *known = peers.values().cloned().collect();
    // This gateway itself, as "": a player on its way here.
    peers.insert(d.gateway().to_string(), String::new());
    let holders = d.holders(players)?;
    let mut by: HashMap<String, Vec<u64>> = HashMap::new();
    for (p, h) in players.iter().zip(holders) {
        if let Some(http) = h.and_then(|h| peers.get(&h).cloned()) {
            by.entry(http).or_default().push(*p);
        }
    }
    Ok(by.into_iter().collect())
}

/// POST to another gateway's HTTP API; its push counts.
/// Most worker threads at once; beyond, a command is refused ("busy")
/// rather than letting remote load start threads without bound.
pub const MAX_WORKERS: usize = 256;

fn busy() -> String {
    "the cluster's worker threads are all busy".into()
}

/// One worker thread's place in the count; freed when dropped.
struct Worker(Arc<AtomicUsize>);

impl Worker {
    fn take(count: &Arc<AtomicUsize>) -> Worker {
        count.fetch_add(1, Ordering::AcqRel);
        Worker(count.clone())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a forwarded push failed; `delivered_nothing` when the peer surely
/// sent no frame (it could not be reached, or answered 503), so the push
/// may go again to wherever its players are now.
#[derive(Debug, Clone)]
pub struct ForwardError {
    pub delivered_nothing: bool,
    pub reason: String,
}

impl std::fmt::Display for ForwardError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// Longest answer a peer's push API may give to a forwarded push.
const FORWARD_ANSWER_MAX: usize = 64 * 1024;
/// Longest a forwarded push may take in all.
const FORWARD_DEADLINE: Duration = Duration::from_secs(10);

fn forward(
    http: &str,
    path: &str,
    body: &[u8],
    token: Option<&str>,
) -> Result<crate::core::PushCounts, ForwardError> {
    let nothing = |reason: String| ForwardError {
        delivered_nothing: true,
        reason,
    };
    let addr: std::net::SocketAddr = http
        .parse()
        .map_err(|_| nothing(format!("bad peer address {http:?}")))?;
    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| nothing(e.to_string()))?;
    match forward_on(s, http, path, body, token) {
        // Only the refusal of a draining gateway's push endpoint says it
        // sent nothing; another 503 may come after some frames went out.
        Err(reason)
            if reason.starts_with("peer answered HTTP/1.1 503")
                && reason.ends_with(crate::http::PUSH_REFUSED_DRAINING) =>
        {
            Err(nothing(reason))
        }
        other => other.map_err(|reason| ForwardError {
            delivered_nothing: false,
            reason,
        }),
    }
}

/// The request of [`forward`] on a connection made.
fn forward_on(
    mut s: std::net::TcpStream,
    http: &str,
    path: &str,
    body: &[u8],
    token: Option<&str>,
) -> Result<crate::core::PushCounts, String> {
    use std::io::{Read, Write};
    let deadline = Instant::now() + FORWARD_DEADLINE;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {http}\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
    s.write_all(body).map_err(|e| e.to_string())?;
    // Bounded in bytes and in time, however the peer trickles.
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("the peer did not answer in time".into());
        }
        s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if raw.len() > FORWARD_ANSWER_MAX {
            return Err("the peer's answer is too long".into());
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("no answer from the peer")?;
    if !head.starts_with("HTTP/1.1 200") {
        // The status line, and (for the one refusal that says it sent
        // nothing) the answer's body.
        let mut why = format!("peer answered {}", head.lines().next().unwrap_or(""));
        if body.contains(crate::http::PUSH_REFUSED_DRAINING) {
            why.push_str(": ");
            why.push_str(crate::http::PUSH_REFUSED_DRAINING);
        }
        return Err(why);
    }
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    Ok(crate::core::PushCounts {
        delivered: n("delivered"),
        cached: n("cached"),
        offline: n("offline"),
        ..Default::default()
    })
}

/// How long a migration waits for the target to confirm.
pub const MIGRATE_WAIT: Duration = Duration::from_secs(3);

/// How long a source whose take-back was refused (the target adopted the
/// player late) waits more for the target's confirmation.
pub const ADOPT_LATE_WAIT: Duration = Duration::from_millis(1500);

/// One migration under way, its directory step done.
struct Migration<'a> {
    player: u64,
    to: &'a str,
    /// The epoch the directory gave the target.
    epoch: u64,
    image: &'a [u8],
    /// When its transfer step began.
    started: Instant,
}

/// Hand `player` to `to` and wait for its confirmation; without one, take
/// the player back in the directory (the rollback).
fn migrate(
    cfg: &ClusterConfig,
    m: &Migration,
    stats: &MigrationStats,
    tx: &flume::Sender<Cmd>,
    reply: &flume::Sender<Result<String, String>>,
) {
    let (player, to, epoch, image) = (m.player, m.to, m.epoch, m.image);
    let Some(mut d) = connect(cfg) else {
        stats.fail(Step::Transfer, "redis");
        let _ = reply.send(Err("redis unreachable".into()));
        return;
    };
    let me = cfg.gateway_id.clone();
    // One ack key per transfer (the epoch): a late ack of an earlier
    // migration of the player can never confirm this one.
    let ack_key = format!("ack:{{{player}}}:{me}:{epoch}");
    let sent = d
        .put_handover(player, to, image)
        .and_then(|()| d.push_inbox(to, &format!("adopt {player} {me} {epoch}")));
    let confirmed = match sent {
        Ok(()) => {
            stats.record(Step::Transfer, m.started.elapsed());
            let t = Instant::now();
            let got = d.wait_post(&ack_key, MIGRATE_WAIT).ok().flatten();
            match got {
                Some(_) => stats.record(Step::Confirm, t.elapsed()),
                None => stats.fail(Step::Confirm, "target_timeout"),
            }
            got
        }
        Err(_) => {
            stats.fail(Step::Transfer, "redis");
            None
        }
    };
    match confirmed {
        Some(addr) => {
            let _ = reply.send(Ok(addr));
        }
        None => {
            // Roll back: the player is ours again, unless the target
            // adopted it meanwhile (its adoption moved the epoch on, so the
            // take-back is refused): then its confirmation is on the way.
            let back = d.take_back(player, to, epoch);
            if let Ok(Some(e)) = back {
                let _ = tx.send(Cmd::Claimed { player, epoch: e });
            } else if let Ok(Some(addr)) = d.wait_post(&ack_key, ADOPT_LATE_WAIT) {
                let _ = reply.send(Ok(addr));
                return;
            }
            let _ = reply.send(Err(format!(
                "gateway {to} did not take player {player} over in time (rolled back: {})",
                matches!(back, Ok(Some(_)))
            )));
        }
    }
}

/// Another gateway migrates `player` here: load its state on the home
/// shard, make sure the directory names this gateway, and confirm with
/// this gateway's client address.
fn adopt(
    cfg: &ClusterConfig,
    d: &mut Directory,
    player: u64,
    from: &str,
    epoch: u64,
    shards: &Shards,
    cmds: &flume::Sender<Cmd>,
) -> Result<(), &'static str> {
    let Ok(Some(bytes)) = d.take_handover(player, Duration::from_secs(1)) else {
        tracing::warn!(player, from, "migration: no state came with the request");
        return Err("redis");
    };
    let Ok(image) = crate::snapshot::Image::decode(&bytes) else {
        tracing::warn!(player, from, "migration: the state does not decode");
        return Err("other");
    };
    // The source handed the player here at `epoch`; moving the epoch on
    // fences the source's rollback off (only one of the two succeeds).
    match d.transfer(player, epoch, &cfg.gateway_id) {
        Ok(Some(epoch)) => {
            let _ = cmds.send(Cmd::Claimed { player, epoch });
        }
        other => {
            tracing::warn!(
                player,
                from,
                ?other,
                "migration: the directory does not give the player here (rolled back?)"
            );
            return Err("not_held");
        }
    }
    let (tx, rx) = flume::bounded(1);
    let home = shards::home_shard(player, shards.count);
    if !(shards.send)(home, ToShard::Adopt { image, reply: tx })
        || rx.recv_timeout(Duration::from_secs(2)).is_err()
    {
        tracing::warn!(
            player,
            from,
            "migration: the home shard did not load the player"
        );
        return Err("other");
    }
    // The client addresses: TCP, then (on a line of its own) WebSocket.
    let addrs = match &cfg.ws_advertise {
        Some(ws) => format!("{}\n{ws}", cfg.advertise),
        None => cfg.advertise.clone(),
    };
    if let Err(e) = d.post(&format!("ack:{{{player}}}:{from}:{epoch}"), &addrs) {
        tracing::warn!(player, from, error = %e, "migration: cannot confirm");
        return Err("redis");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A one-shot peer that reads the request head and answers `answer`.
    fn peer(answer: Vec<u8>) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(&answer);
                // Read what is left of the request before closing: a close
                // with unread bytes would reset the connection.
                let _ = s.shutdown(std::net::Shutdown::Write);
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            }
        });
        addr
    }

    #[test]
    fn forward_reads_a_peers_counts() {
        let body = br#"{"delivered":2,"cached":1,"offline":3}"#;
        let mut answer =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        answer.extend_from_slice(body);
        let c = forward(&peer(answer), "/v1/push?players=1&msg=1", b"x", None).expect("counts");
        assert_eq!((c.delivered, c.cached, c.offline), (2, 1, 3));
    }

    #[test]
    fn forward_refuses_an_endless_answer_and_a_refusal() {
        let mut long = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        long.resize(FORWARD_ANSWER_MAX * 2, b' ');
        let e = forward(&peer(long), "/v1/push?players=1&msg=1", b"", None).expect_err("long");
        assert!(e.reason.contains("too long") && !e.delivered_nothing, "{e}");
        let no = b"HTTP/1.1 401 Unauthorized\r\n\r\n{}".to_vec();
        let e = forward(&peer(no), "/v1/push?players=1&msg=1", b"", None).expect_err("401");
        assert!(e.reason.contains("401") && !e.delivered_nothing, "{e}");
        // A 503 (the peer drains) or no peer at all: nothing was sent, so
        // the push may go again wherever its players are now.
        let draining = format!(
            "HTTP/1.1 503 Service Unavailable\r\n\r\n{{\"error\":\"{}\"}}",
            crate::http::PUSH_REFUSED_DRAINING
        );
        let e = forward(
            &peer(draining.into_bytes()),
            "/v1/push?players=1&msg=1",
            b"",
            None,
        )
        .expect_err("503");
        assert!(e.delivered_nothing, "{e}");
        // Another 503 (a shard did not answer) may come after some frames
        // went out: not to be sent again.
        let other =
            b"HTTP/1.1 503 Service Unavailable\r\n\r\n{\"error\":\"a shard did not answer\"}"
                .to_vec();
        let e = forward(&peer(other), "/v1/push?players=1&msg=1", b"", None).expect_err("503");
        assert!(!e.delivered_nothing, "{e}");
        let closed = format!("127.0.0.1:{}", {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        });
        let e = forward(&closed, "/v1/push?players=1&msg=1", b"", None).expect_err("refused");
        assert!(e.delivered_nothing, "{e}");
    }

    #[test]
    fn worker_slots_are_counted_and_freed() {
        let n = Arc::new(AtomicUsize::new(0));
        let a = Worker::take(&n);
        let b = Worker::take(&n);
        assert_eq!(n.load(Ordering::Acquire), 2);
        drop(a);
        std::thread::spawn(move || drop(b)).join().expect("join");
        assert_eq!(n.load(Ordering::Acquire), 0);
    }
}
