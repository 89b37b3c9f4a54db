//! Starting and stopping a whole gateway: reserve the ports, start the
//! shards, and on every shard the accept loop, the inbox of the mesh, the
//! backend connections and the timers.
//!
//! `Gateway::start(config)` returns once every shard listens, with the
//! addresses actually bound (port 0 picks one), so tests and harnesses start
//! a real gateway and talk to it.
//!
//! Why one file of this length: it is the process's wiring (start, the
//! per-shard tasks, drain coordination, stop), read top to bottom as the
//! order things happen in; each part is short and calls into the modules
//! that hold the rules.

use crate::backend::{run_connection, AnswerSink};
use crate::config::{Config, ConfigError};
use crate::shard::{DrainReport, GatewayEvent, ShardCtx, ShardMsg};
use crate::snapshot::{Image, LocalDir, PlayerImage, SnapshotStore};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot bind {what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start shards: {0}")]
    Shards(#[from] shards::ShardError),
    #[error("shard {shard} failed to start: {message}")]
    ShardInit { shard: usize, message: String },
}

/// How the cluster's threads reach the shards' inboxes.
fn cluster_sink(senders: Vec<flume::Sender<ShardMsg>>) -> crate::cluster::runtime::Shards {
    use crate::cluster::runtime::ToShard;
    crate::cluster::runtime::Shards {
        count: senders.len(),
        send: Arc::new(move |i, m| {
            let msg = match m {
                ToShard::GiveAway { player, to, login } => ShardMsg::GiveAway { player, to, login },
                ToShard::Adopt { image, reply } => ShardMsg::Adopt { image, reply },
            };
            senders.get(i).is_some_and(|s| s.send(msg).is_ok())
        }),
    }
}

/// Counters of one shard, returned when it stops: the same list, names
/// and help texts as its `/metrics` counters.
#[derive(Debug, Clone, Default)]
pub struct ShardReport {
    pub shard: usize,
    /// (name, help, value) of every counter.
    pub counters: Vec<(&'static str, &'static str, u64)>,
}

impl ShardReport {
    /// The counter `name` (0 if there is none of that name).
    pub fn get(&self, name: &str) -> u64 {
        self.counters
            .iter()
            .find(|(n, _, _)| *n == name)
            .map_or(0, |c| c.2)
    }
}

/// A running gateway.
pub struct Gateway {
    /// The client port every shard listens on.
    pub client_addr: SocketAddr,
    /// The HTTP API's port, also on every shard.
    pub http_addr: SocketAddr,
    /// The WebSocket port (`ws_listen`), also on every shard.
    pub ws_addr: Option<SocketAddr>,
    shards: shards::Shards<ShardMsg, ShardReport>,
    connections: Arc<AtomicUsize>,
    events: (flume::Sender<GatewayEvent>, flume::Receiver<GatewayEvent>),
    store: Option<LocalDir>,
    drain_timeout: Duration,
    /// The config in force (reloads replace it).
    cfg: Config,
    /// Players loaded from a snapshot at start.
    pub restored: usize,
    cluster: Option<crate::cluster::runtime::ClusterRuntime>,
    /// Every shard's listening sockets (duplicates), for an upgrade.
    listeners: Vec<Listener>,
    /// Accept loops running (an upgrade waits for them to end).
    accepting: Arc<AtomicUsize>,
    /// Open HTTP API connections, all shards.
    http_open: Arc<AtomicUsize>,
    /// The live upgrade that started this process, once done.
    upgraded: Arc<std::sync::OnceLock<crate::upgrade::Taken>>,
}

/// How a drain ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainOutcome {
    /// Every shard finished within `drain_timeout`, nothing forced.
    pub clean: bool,
    /// Players in the snapshot written (None: no snapshot_dir, or the
    /// write failed, in which case `error` says why).
    pub snapshot_players: Option<usize>,
    pub error: Option<String>,
}

/// What a shard says once it listens: its listening sockets (duplicates,
/// for an upgrade to hand over), or why it could not start.
type Ready = Result<(usize, Vec<Listener>), (usize, String)>;

/// A listening socket of a running gateway, as an upgrade hands it over.
pub type Listener = (crate::upgrade::channel::ListenerImage, std::os::fd::OwnedFd);

/// handed[i]: the inherited listening sockets of shard i, by port.
type Handed = Arc<Vec<flume::Receiver<Vec<(u8, std::os::fd::OwnedFd)>>>>;

/// Per-shard start data.
struct ShardStart {
    cfg: Arc<Config>,
    client_addr: SocketAddr,
    http_addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    http_conns: Arc<AtomicUsize>,
    ready: flume::Sender<Ready>,
    events: flume::Sender<GatewayEvent>,
    /// restore[i]: the players homed on shard i, from the snapshot.
    restore: Arc<Vec<flume::Receiver<Vec<PlayerImage>>>>,
    cluster: Option<crate::cluster::runtime::ClusterHandle>,
    /// The WebSocket port, if any.
    ws_addr: Option<SocketAddr>,
    wires: crate::wire::Wires,
    /// inherited[i]: the listening sockets shard i starts on (an upgrade).
    inherited: Handed,
    /// The listeners were inherited: accept only once told to.
    gated: bool,
    accepting: Arc<AtomicUsize>,
    upgraded: Arc<std::sync::OnceLock<crate::upgrade::Taken>>,
}

impl Clone for ShardStart {
    fn clone(&self) -> Self {
        ShardStart {
            cfg: self.cfg.clone(),
            client_addr: self.client_addr,
            http_addr: self.http_addr,
            connections: self.connections.clone(),
            http_conns: self.http_conns.clone(),
            ready: self.ready.clone(),
            events: self.events.clone(),
            restore: self.restore.clone(),
            cluster: self.cluster.clone(),
            ws_addr: self.ws_addr,
            wires: self.wires.clone(),
            inherited: self.inherited.clone(),
            gated: self.gated,
            accepting: self.accepting.clone(),
            upgraded: self.upgraded.clone(),
        }
    }
}

/// Load the snapshot in `store`, if any; a damaged one is moved aside.
/// Either way the file is gone from its place afterwards, so a later crash
/// never brings back this (then stale) state.
fn load_snapshot(store: &LocalDir) -> Vec<PlayerImage> {
    let bytes = match store.load() {
        Ok(Some(b)) => b,
        Ok(None) => {
            tracing::info!(path = %store.path().display(), "no snapshot: fresh start");
            return Vec::new();
        }
        Err(e) => {
            tracing::error!(path = %store.path().display(), error = %e, "cannot read the snapshot: starting empty");
            return Vec::new();
        }
    };
    match Image::decode(&bytes) {
        Ok(img) => {
            match store.quarantine("loaded") {
                Ok(to) => {
                    tracing::info!(players = img.players.len(), moved_to = %to, "snapshot loaded")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "snapshot loaded but could not be moved aside")
                }
            }
            img.players
        }
        Err(e) => {
            let moved = store.quarantine("corrupt");
            tracing::error!(
                path = %store.path().display(),
                error = %e,
                moved_to = ?moved.as_ref().ok(),
                "snapshot unusable: moved aside, starting empty"
            );
            Vec::new()
        }
    }
}

impl Gateway {
    /// Validate `cfg`, bind, start every shard; returns once all listen.
    pub fn start(cfg: Config) -> Result<Gateway, StartError> {
        Gateway::start_on(cfg, None)
    }

    /// As [`Gateway::start`], on the listening sockets of `inherited` (an
    /// upgrade: the old process's) instead of binding them; the accept
    /// loops wait for [`Gateway::open_accept`].
    pub fn start_on(
        cfg: Config,
        inherited: Option<crate::upgrade::Inherited>,
    ) -> Result<Gateway, StartError> {
        cfg.validate()?;
        match inherited {
            None => Gateway::bind_and_start(cfg),
            Some(inh) => Gateway::start_inherited(cfg, inh),
        }
    }

    fn start_inherited(
        cfg: Config,
        mut inh: crate::upgrade::Inherited,
    ) -> Result<Gateway, StartError> {
        use crate::upgrade::channel::{PORT_CLIENT, PORT_HTTP, PORT_WS};
        let missing = |what: &'static str, addr: SocketAddr| StartError::Bind {
            what,
            addr,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such listener was handed over",
            ),
        };
        let client_addr = inh.addr(PORT_CLIENT).ok_or_else(|| {
            missing(
                "client listener",
                cfg.listen_addr().unwrap_or(([0; 4], 0).into()),
            )
        })?;
        let http_addr = inh.addr(PORT_HTTP).ok_or_else(|| {
            missing(
                "http listener",
                cfg.http_listen_addr().unwrap_or(([0; 4], 0).into()),
            )
        })?;
        let ws_addr = inh.addr(PORT_WS);
        if cfg
            .listen_addr()
            .ok()
            .is_some_and(|a| a.port() != 0 && a != client_addr)
        {
            tracing::warn!(%client_addr, listen = %cfg.listen, "upgrade: the config names another client address; the handed-over one stays (a restart moves it)");
        }
        let n = cfg.shard_count();
        let per_shard = (0..n)
            .map(|i| {
                let mut v = Vec::new();
                for port in [PORT_CLIENT, PORT_HTTP, PORT_WS] {
                    v.extend(inh.take(port, i, n).into_iter().map(|fd| (port, fd)));
                }
                let (tx, rx) = flume::bounded(1);
                let _ = tx.send(v);
                rx
            })
            .collect();
        Gateway::launch(
            cfg,
            client_addr,
            http_addr,
            ws_addr,
            Arc::new(per_shard),
            true,
            Vec::new(),
        )
    }

    fn bind_and_start(cfg: Config) -> Result<Gateway, StartError> {
        let client = cfg.listen_addr()?;
        let http = cfg.http_listen_addr()?;
        let (client_res, client_addr) =
            crate::net::reserve_port(client).map_err(|source| StartError::Bind {
                what: "client listener",
                addr: client,
                source,
            })?;
        let (http_res, http_addr) =
            crate::net::reserve_port(http).map_err(|source| StartError::Bind {
                what: "http listener",
                addr: http,
                source,
            })?;
        let ws = match cfg.ws_listen_addr()? {
            Some(addr) => {
                Some(
                    crate::net::reserve_port(addr).map_err(|source| StartError::Bind {
                        what: "websocket listener",
                        addr,
                        source,
                    })?,
                )
            }
            None => None,
        };
        let ws_addr = ws.as_ref().map(|w| w.1);
        let reservations = vec![Some(client_res), Some(http_res), ws.map(|w| w.0)];
        Gateway::launch(
            cfg,
            client_addr,
            http_addr,
            ws_addr,
            Arc::new(Vec::new()),
            false,
            reservations,
        )
    }

    /// Start the shards on the addresses chosen (bound by each shard, or
    /// inherited); `reservations` are dropped once every shard listens.
    fn launch(
        cfg: Config,
        client_addr: SocketAddr,
        http_addr: SocketAddr,
        ws_addr: Option<SocketAddr>,
        inherited: Handed,
        gated: bool,
        reservations: Vec<Option<socket2::Socket>>,
    ) -> Result<Gateway, StartError> {
        let wires = crate::wire::Wires::from_config(&cfg, cfg.load_tls()?);
        let shards_cfg = shards::ShardsConfig {
            shards: cfg.shard_count(),
            pin: true,
            name: "shard".into(),
            mesh_capacity: 4096,
            spin_before_park: cfg.park_spin,
        };
        let connections = Arc::new(AtomicUsize::new(0));
        let (ready_tx, ready_rx) = flume::unbounded::<Ready>();
        let accepting = Arc::new(AtomicUsize::new(0));
        let http_open = Arc::new(AtomicUsize::new(0));
        let upgraded = Arc::new(std::sync::OnceLock::new());
        let store = cfg.snapshot_dir.as_ref().map(LocalDir::new);
        // Players from the snapshot, homed again by hash on this shard count.
        let n = shards_cfg.shards;
        let mut homed: Vec<Vec<PlayerImage>> = (0..n).map(|_| Vec::new()).collect();
        for p in store.as_ref().map(load_snapshot).unwrap_or_default() {
            homed[shards::home_shard(p.id, n)].push(p);
        }
        let restored = homed.iter().map(Vec::len).sum();
        let restore = homed
            .into_iter()
            .map(|v| {
                let (tx, rx) = flume::bounded(1);
                let _ = tx.send(v);
                rx
            })
            .collect();
        let events = flume::unbounded();
        let drain_timeout = cfg.drain_timeout;
        let kept = cfg.clone();
        let cluster = cfg.cluster.as_ref().map(|c| {
            let max_connections = crate::limits::client_fd_cap(cfg.http.max_connections)
                .map_or(cfg.max_connections, |cap| cfg.max_connections.min(cap));
            let load = crate::cluster::runtime::Load::new(
                n,
                connections.clone(),
                max_connections,
                cfg.max_players,
            );
            crate::cluster::runtime::ClusterRuntime::handle(c, load)
        });
        let start = ShardStart {
            cfg: Arc::new(cfg),
            client_addr,
            http_addr,
            connections: connections.clone(),
            http_conns: http_open.clone(),
            ready: ready_tx,
            events: events.0.clone(),
            restore: Arc::new(restore),
            cluster: cluster.as_ref().map(|(h, _)| h.clone()),
            ws_addr,
            wires,
            inherited,
            gated,
            accepting: accepting.clone(),
            upgraded: upgraded.clone(),
        };
        let shards = shards::start(&shards_cfg, move |shard: shards::Shard<ShardMsg>| {
            run_shard(shard, start)
        })?;
        let mut listeners = Vec::new();
        for _ in 0..shards.count() {
            match ready_rx.recv() {
                Ok(Ok((_, mut l))) => listeners.append(&mut l),
                Ok(Err((shard, message))) => {
                    shards.stop();
                    let _ = shards.join();
                    return Err(StartError::ShardInit { shard, message });
                }
                Err(_) => {
                    shards.stop();
                    let _ = shards.join();
                    return Err(StartError::ShardInit {
                        shard: 0,
                        message: "a shard ended during start".into(),
                    });
                }
            }
        }
        drop(reservations);
        let cluster = match (kept.cluster.as_ref(), cluster) {
            (Some(c), Some((handle, rx))) => Some(crate::cluster::runtime::ClusterRuntime::start(
                c,
                c.http_advertise
                    .clone()
                    .unwrap_or_else(|| http_addr.to_string()),
                handle,
                rx,
                cluster_sink(shards.senders()),
            )),
            _ => None,
        };
        Ok(Gateway {
            client_addr,
            http_addr,
            ws_addr,
            shards,
            connections,
            events,
            store,
            drain_timeout,
            cfg: kept,
            restored,
            cluster,
            listeners,
            accepting,
            http_open,
            upgraded,
        })
    }

    /// The sum over every shard of its counter `name` (as in
    /// `ShardReport`; 0 for a shard that did not answer within a second).
    pub fn counter(&self, name: &str) -> u64 {
        let mut total = 0;
        for tx in self.shards.senders() {
            let (reply, rx) = flume::bounded(1);
            if tx.send(ShardMsg::Metrics { reply }).is_err() {
                continue;
            }
            if let Ok(s) = rx.recv_timeout(Duration::from_secs(1)) {
                total += s
                    .counters
                    .iter()
                    .find(|(n, _, _)| *n == name)
                    .map_or(0, |c| c.2);
            }
        }
        total
    }

    /// The shards' inboxes (the upgrade's coordinator talks to them).
    pub(crate) fn senders(&self) -> Vec<flume::Sender<ShardMsg>> {
        self.shards.senders()
    }

    /// Duplicates of every listening socket, for a new process.
    pub fn listeners(&self) -> std::io::Result<Vec<Listener>> {
        self.listeners
            .iter()
            .map(|(img, fd)| Ok((img.clone(), fd.try_clone()?)))
            .collect()
    }

    /// Let the accept loops of inherited listeners accept (an upgrade's
    /// new process, once the old one stopped accepting there).
    pub fn open_accept(&self, clients: bool, http: bool) {
        for tx in self.shards.senders() {
            let _ = tx.send(ShardMsg::Accept { clients, http });
        }
    }

    /// Stop accepting, losing no connection: every accept loop ends after
    /// the accept it has armed, which the port is poked to complete (the
    /// pokes that reach the new process are connections closed at once).
    /// True when every loop ended within `limit`.
    /// What the live upgrade that started this process did (its metrics).
    pub fn set_upgraded(&self, t: crate::upgrade::Taken) {
        let _ = self.upgraded.set(t);
    }

    /// Open HTTP API connections now, all shards.
    pub fn http_open(&self) -> usize {
        self.http_open.load(Ordering::Acquire)
    }

    pub fn stop_accepting(&self, limit: Duration) -> bool {
        for tx in self.shards.senders() {
            let _ = tx.send(ShardMsg::StopAccepting);
        }
        let mut addrs = vec![self.client_addr, self.http_addr];
        addrs.extend(self.ws_addr);
        let deadline = Instant::now() + limit;
        // Let the shards see the message before the first poke.
        std::thread::sleep(Duration::from_millis(2));
        while self.accepting.load(Ordering::Acquire) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            for a in &addrs {
                let to = if a.ip().is_unspecified() {
                    SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), a.port())
                } else {
                    *a
                };
                let _ = std::net::TcpStream::connect_timeout(&to, Duration::from_millis(100));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// The evacuation phase of a drain; true when a signal forced it.
    fn evacuate_for_drain(&self, force: &flume::Receiver<GatewayEvent>) -> bool {
        use crate::cluster::placement::Evacuation;
        use crate::cluster::runtime::Cmd;
        let Some(c) = &self.cluster else {
            return false;
        };
        let handle = &c.handle;
        handle
            .load
            .draining
            .store(true, std::sync::atomic::Ordering::Release);
        let ask =
            |make: &dyn Fn(flume::Sender<Result<Vec<crate::cluster::Peer>, String>>) -> Cmd| {
                let (tx, rx) = flume::bounded(1);
                handle
                    .cmds
                    .send(make(tx))
                    .map_err(|_| "the cluster is stopped".to_string())?;
                rx.recv_timeout(Duration::from_secs(10))
                    .map_err(|_| "the cluster did not answer".to_string())?
            };
        let peers = match ask(&|reply| Cmd::PeerLeases { reply }) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "drain: cannot evacuate (no peers known); draining in place");
                return false;
            }
        };
        let n = self.shards.count();
        let evac = Arc::new(Evacuation::over(&peers, n));
        if evac.targets.is_empty() {
            tracing::error!("drain: no live peer has room; draining in place");
            return false;
        }
        let (stx, srx) = flume::bounded(1);
        let _ = handle.cmds.send(Cmd::StartEvacuation {
            evac: evac.clone(),
            reply: stx,
        });
        if let Ok(Err(e)) | Err(e) = srx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|e| e.to_string())
        {
            tracing::error!(error = %e, "drain: cannot evacuate; draining in place");
            return false;
        }
        tracing::info!(
            targets = evac.targets.len(),
            timeout = ?self.drain_timeout,
            "drain: evacuating the players to the peers"
        );
        let (tx, rx) = flume::unbounded();
        for i in 0..n {
            let msg = ShardMsg::Evacuate {
                evac: evac.clone(),
                reply: tx.clone(),
            };
            if self.shards.send_blocking(i, msg).is_err() {
                evac.shard_done();
            }
        }
        let deadline = Instant::now() + self.drain_timeout;
        let mut got = 0;
        let mut forced = false;
        while got < n {
            let event = flume::Selector::new()
                .recv(&rx, |r| r.is_ok().then_some(None))
                .recv(force, |e| e.ok().map(Some))
                .wait_timeout(deadline.saturating_duration_since(Instant::now()));
            match event {
                Ok(Some(None)) => got += 1,
                Ok(Some(Some(GatewayEvent::Signal(_)))) => {
                    tracing::warn!("drain: evacuation cancelled by a signal");
                    forced = true;
                    break;
                }
                Ok(Some(Some(GatewayEvent::Reload(Some(reply))))) => {
                    let _ = reply.send(Err("the gateway is draining".into()));
                }
                Ok(Some(Some(_))) => {}
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!("drain: evacuation did not finish in drain_timeout");
                    break;
                }
            }
        }
        evac.cancelled
            .store(true, std::sync::atomic::Ordering::Release);
        tracing::info!(report = %evac.json(), "drain: evacuation over");
        forced
    }

    /// Events for the process: drain requests from the HTTP API, and
    /// whatever is sent with [`event_sender`](Self::event_sender).
    pub fn events(&self) -> &flume::Receiver<GatewayEvent> {
        &self.events.1
    }

    /// Where signal handlers send their events.
    pub fn event_sender(&self) -> flume::Sender<GatewayEvent> {
        self.events.0.clone()
    }

    /// Apply a new config to every shard without dropping a connection or
    /// a request: routes, services, limits and timeouts change. Keys that
    /// need a restart (listen, http_listen, ws_listen, shards,
    /// snapshot_dir, demo_backend, log) keep their running values, with a
    /// warning. TLS certificates are read again and serve connections
    /// accepted from now on (live ones keep theirs). An invalid config or
    /// an unreadable certificate is refused and nothing changes.
    pub fn reload(&mut self, mut cfg: Config) -> Result<(), String> {
        cfg.validate().map_err(|e| e.to_string())?;
        let old = &self.cfg;
        for (key, changed) in [
            ("listen", cfg.listen != old.listen),
            ("http_listen", cfg.http_listen != old.http_listen),
            ("ws_listen", cfg.ws_listen != old.ws_listen),
            ("shards", cfg.shards != old.shards),
            ("snapshot_dir", cfg.snapshot_dir != old.snapshot_dir),
            ("demo_backend", cfg.demo_backend != old.demo_backend),
            ("log", cfg.log != old.log),
        ] {
            if changed {
                tracing::warn!(key, "config key changed: takes effect at the next restart");
            }
        }
        cfg.listen = old.listen.clone();
        cfg.http_listen = old.http_listen.clone();
        cfg.ws_listen = old.ws_listen.clone();
        cfg.shards = old.shards;
        cfg.snapshot_dir = old.snapshot_dir.clone();
        cfg.demo_backend = old.demo_backend.clone();
        cfg.log = old.log.clone();
        let tls = cfg.load_tls().map_err(|e| e.to_string())?;
        let wires = crate::wire::Wires::from_config(&cfg, tls);
        let shared = Arc::new(cfg.clone());
        let (tx, rx) = flume::unbounded();
        let n = self.shards.count();
        let mut sent = 0;
        for i in 0..n {
            let msg = ShardMsg::Reload {
                cfg: shared.clone(),
                wires: wires.clone(),
                reply: tx.clone(),
            };
            if self.shards.send_blocking(i, msg).is_ok() {
                sent += 1;
            }
        }
        let mut fresh = 0;
        let mut confirmed = 0;
        for _ in 0..sent {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(k) => {
                    fresh += k;
                    confirmed += 1;
                }
                Err(_) => break,
            }
        }
        self.drain_timeout = cfg.drain_timeout;
        self.cfg = cfg;
        if confirmed < n {
            // Some shards run the new config: it is the config now, but say
            // that not every shard confirmed it.
            return Err(format!(
                "the new config was confirmed by {confirmed} of {n} shards"
            ));
        }
        tracing::info!(new_backend_connections = fresh, "config reloaded");
        Ok(())
    }

    /// Drain, snapshot and stop: in-flight requests finish, every session
    /// gets `KICK SHUTDOWN` once flushed, every shard hands over its
    /// players, the snapshot is written, the shards stop. Waits at most
    /// `drain_timeout`, then forces; any event on `force` forces at once.
    pub fn drain(self, force: &flume::Receiver<GatewayEvent>) -> DrainOutcome {
        let evacuate = self
            .cfg
            .cluster
            .as_ref()
            .is_some_and(|c| c.evacuate_on_drain);
        self.drain_evacuating(force, evacuate)
    }

    /// [`drain`](Self::drain), first evacuating every player to the peers
    /// when `evacuate` (and in a cluster): the lease says draining (peers
    /// place no player here, `/healthz` answers 503), the players migrate
    /// (REDIRECT) to the live peers by their room for up to
    /// `drain_timeout`, then the drain proper runs (for up to
    /// `drain_timeout` more) for whatever is left.
    pub fn drain_evacuating(
        mut self,
        force: &flume::Receiver<GatewayEvent>,
        evacuate: bool,
    ) -> DrainOutcome {
        // The ports close when the accept loops end (a client is refused,
        // not queued): the upgrade's duplicates go first.
        self.listeners.clear();
        let forced_early = evacuate && self.evacuate_for_drain(force);
        let n = self.shards.count();
        let (tx, rx) = flume::unbounded::<DrainReport>();
        let send_all = |force: bool| {
            for i in 0..n {
                let _ = self.shards.send_blocking(
                    i,
                    ShardMsg::Drain {
                        force,
                        reply: tx.clone(),
                    },
                );
            }
        };
        tracing::info!(timeout = ?self.drain_timeout, "drain started");
        if let Some(c) = &self.cluster {
            // Peers place no player here from the next lease renewal on.
            c.handle
                .load
                .draining
                .store(true, std::sync::atomic::Ordering::Release);
        }
        send_all(false);
        // A signal during the evacuation forces the drain at once.
        let deadline = if forced_early {
            Instant::now()
        } else {
            Instant::now() + self.drain_timeout
        };
        let mut reports: Vec<Option<DrainReport>> = (0..n).map(|_| None).collect();
        let mut forced = false;
        let mut got = 0;
        // Give up on silent shards this long after a force.
        let mut force_deadline = None;
        while got < n {
            let until = force_deadline.unwrap_or(deadline);
            let event = flume::Selector::new()
                .recv(&rx, |r| r.ok().map(Ok))
                .recv(force, |e| e.ok().map(Err))
                .wait_timeout(until.saturating_duration_since(Instant::now()));
            let force_now = match event {
                Ok(Some(Ok(r))) => {
                    let i = r.shard;
                    if i < n && reports[i].is_none() {
                        reports[i] = Some(r);
                        got += 1;
                    }
                    false
                }
                // Only a signal forces; a repeated drain request changes
                // nothing, and a reload is refused while draining.
                Ok(Some(Err(GatewayEvent::Signal(_)))) => true,
                Ok(Some(Err(GatewayEvent::Reload(Some(reply))))) => {
                    let _ = reply.send(Err("the gateway is draining".into()));
                    false
                }
                Ok(Some(Err(_))) | Ok(None) => false,
                // The deadline (or, once forced, the grace) passed.
                Err(_) if force_deadline.is_none() => true,
                Err(_) => {
                    tracing::error!(
                        answered = got,
                        shards = n,
                        "shards did not answer the forced drain"
                    );
                    break;
                }
            };
            if force_now && force_deadline.is_none() {
                tracing::warn!("drain forced");
                forced = true;
                force_deadline = Some(Instant::now() + Duration::from_secs(5));
                send_all(true);
            }
        }
        let clean = !forced && reports.iter().all(|r| r.as_ref().is_some_and(|r| r.clean));
        let players: Vec<PlayerImage> = reports
            .into_iter()
            .flatten()
            .flat_map(|r| r.players)
            .collect();
        let mut outcome = DrainOutcome {
            clean: clean && got == n,
            snapshot_players: None,
            error: None,
        };
        if let Some(store) = &self.store {
            let count = players.len();
            let image = Image {
                taken_unix_ms: crate::snapshot::unix_ms_now(),
                shards: n as u32,
                players,
            };
            match image
                .encode()
                .map_err(|e| e.to_string())
                .and_then(|b| store.save(&b).map_err(|e| e.to_string()))
            {
                Ok(()) => {
                    tracing::info!(players = count, path = %store.path().display(), "snapshot written");
                    outcome.snapshot_players = Some(count);
                }
                Err(e) => {
                    tracing::error!(error = %e, "snapshot NOT written");
                    outcome.error = Some(e);
                }
            }
        }
        self.stop();
        tracing::info!(clean = outcome.clean, "drain finished");
        outcome
    }

    /// Open client connections now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// A handle that stops the gateway from any thread (signal handlers).
    pub fn stop_handle(&self) -> shards::StopHandle {
        self.shards.stop_handle()
    }

    /// Stop and wait for every shard.
    pub fn stop(self) -> Vec<ShardReport> {
        self.shards.stop();
        self.join()
    }

    /// Wait for every shard to end (after a stop from elsewhere).
    pub fn join(mut self) -> Vec<ShardReport> {
        if let Some(c) = self.cluster.take() {
            c.stop();
        }
        self.shards
            .join()
            .into_iter()
            .filter_map(|r| match r {
                Ok(rep) => Some(rep),
                Err(e) => {
                    tracing::error!(error = %e, "shard ended badly");
                    None
                }
            })
            .collect()
    }
}

async fn run_shard(shard: shards::Shard<ShardMsg>, start: ShardStart) -> ShardReport {
    let ShardStart {
        cfg,
        client_addr,
        http_addr,
        connections,
        http_conns,
        ready,
        events,
        restore,
        cluster,
        ws_addr,
        wires,
        inherited,
        gated,
        accepting,
        upgraded,
    } = start;
    let (id, count, mesh, inbox, stop, _stop_handle) = shard.into_parts();
    let mut handed = inherited
        .get(id)
        .and_then(|rx| rx.try_recv().ok())
        .unwrap_or_default();
    let listeners = shard_listeners(id, &mut handed, client_addr, http_addr, ws_addr);
    let (listeners, exported) = match listeners {
        Ok(all) => all,
        Err(e) => {
            let _ = ready.send(Err((id, e)));
            return ShardReport {
                shard: id,
                ..Default::default()
            };
        }
    };
    let (client_listeners, http_listeners, ws_listeners) = listeners;
    let cfg = Rc::new((*cfg).clone());
    let mut ctx = ShardCtx::new(
        id,
        count,
        cfg.clone(),
        mesh,
        stop.clone(),
        connections,
        http_conns,
        cluster,
    );
    ctx.events = Some(events);
    ctx.accepting = accepting;
    ctx.upgraded = upgraded;
    if !gated {
        ctx.accept_clients.open();
        ctx.accept_http.open();
    }
    *ctx.wires.borrow_mut() = wires;
    let ctx = Rc::new(ctx);
    *ctx.this.borrow_mut() = Rc::downgrade(&ctx);
    if let Some(images) = restore.get(id).and_then(|rx| rx.try_recv().ok()) {
        if !images.is_empty() {
            let (loaded, dropped) = ctx.restore(&images);
            tracing::info!(
                shard = id,
                loaded,
                dropped_expired = dropped,
                "players restored"
            );
        }
    }
    let http_tasks: Vec<_> = http_listeners
        .into_iter()
        .map(|l| glommio::spawn_local(run_http(ctx.clone(), l)))
        .collect();

    // Backend connections.
    let mut backend_tasks = Vec::new();
    for conn in ctx.backends.connections() {
        let ctx2 = ctx.clone();
        let stop = stop.clone();
        let link = crate::backend::LinkSettings::from_config(&cfg);
        backend_tasks.push(glommio::spawn_local(async move {
            run_connection(ctx2.clone(), &ctx2.backends, conn, link, stop).await
        }));
    }

    // Request deadlines.
    let deadlines = {
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            loop {
                let next = ctx.backends.next_deadline();
                let wait = async {
                    match next {
                        // An earlier deadline may be added meanwhile (after
                        // a reload shortened the timeout): wake for it too.
                        Some(at) => {
                            futures_lite::future::or(
                                glommio::timer::sleep(at.saturating_duration_since(Instant::now())),
                                ctx.backends.deadline_added(),
                            )
                            .await
                        }
                        None => ctx.backends.deadline_added().await,
                    }
                };
                futures_lite::future::or(wait, ctx.stop.stopped()).await;
                if ctx.stop.is_stopped() {
                    break;
                }
                let now = Instant::now();
                for p in ctx.backends.expired(now) {
                    let a = crate::backend::Answer::error(&p, crate::protocol::Code::Timeout);
                    ctx.on_answer(p, a, now);
                }
            }
        })
    };

    // Idle sessions: a coarse sweep rather than a timer per session.
    let idle = {
        let ctx = ctx.clone();
        let period = (cfg.session_idle.min(cfg.player_linger) / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        glommio::spawn_local(async move {
            while !ctx.stop.is_stopped() {
                futures_lite::future::or(glommio::timer::sleep(period), ctx.stop.stopped()).await;
                ctx.tick();
            }
        })
    };

    // The mesh inbox: drained in its own task (never one that also sends).
    let inbox_task = {
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            loop {
                let msg =
                    futures_lite::future::or(async { inbox.recv_async().await.ok() }, async {
                        ctx.stop.stopped().await;
                        None
                    })
                    .await;
                match msg {
                    Some(ShardMsg::Handoff(h)) => crate::shard::conn::adopt(ctx.clone(), *h),
                    Some(ShardMsg::PlayerInfo { player, reply }) => {
                        let _ = reply.try_send(ctx.player_info(player));
                    }
                    Some(ShardMsg::Push {
                        players,
                        msg_id,
                        body,
                        reply,
                    }) => {
                        let counts = (!ctx.is_drained()).then(|| ctx.push(&players, msg_id, &body));
                        let _ = reply.try_send(counts);
                    }
                    Some(ShardMsg::Broadcast {
                        msg_id,
                        body,
                        reply,
                    }) => {
                        let counts = (!ctx.is_drained()).then(|| ctx.broadcast(msg_id, &body));
                        let _ = reply.try_send(counts);
                    }
                    Some(ShardMsg::Kick { player, end, reply }) => {
                        let _ = reply.try_send(ctx.admin_kick(player, end));
                    }
                    Some(ShardMsg::ListPlayers {
                        after,
                        limit,
                        reply,
                    }) => {
                        let _ = reply.try_send(ctx.list_players(after, limit));
                    }
                    Some(ShardMsg::Metrics { reply }) => {
                        let _ = reply.try_send(ctx.snapshot());
                    }
                    Some(ShardMsg::Reload { cfg, wires, reply }) => {
                        *ctx.wires.borrow_mut() = wires;
                        let fresh = ctx.reload(Rc::new((*cfg).clone()));
                        let n = fresh.len();
                        for conn in fresh {
                            let link = crate::backend::LinkSettings::from_config(&cfg);
                            let (ctx2, stop) = (ctx.clone(), ctx.stop.clone());
                            glommio::spawn_local(async move {
                                run_connection(ctx2.clone(), &ctx2.backends, conn, link, stop).await
                            })
                            .detach();
                        }
                        let _ = reply.send(n);
                    }
                    Some(ShardMsg::GiveAway { player, to, login }) => {
                        ctx.give_away(player, &to, login)
                    }
                    Some(ShardMsg::Adopt { image, reply }) => {
                        let (loaded, _) = ctx.restore(&image.players);
                        tracing::info!(
                            shard = ctx.id,
                            players = loaded,
                            "migrated players adopted"
                        );
                        let _ = reply.send(());
                    }
                    Some(ShardMsg::Evacuate { evac, reply }) => {
                        let ctx = ctx.clone();
                        glommio::spawn_local(async move {
                            let _ =
                                reply.send(crate::shard::cluster::evacuate_shard(ctx, evac).await);
                        })
                        .detach();
                    }
                    Some(ShardMsg::Migrate { player, to, reply }) => {
                        let ctx = ctx.clone();
                        glommio::spawn_local(async move {
                            let r = crate::shard::cluster::migrate_player(ctx, player, to).await;
                            let _ = reply.send(r);
                        })
                        .detach();
                    }
                    Some(ShardMsg::Accept { clients, http }) => {
                        if clients {
                            ctx.accept_clients.open();
                        }
                        if http {
                            ctx.accept_http.open();
                        }
                    }
                    Some(ShardMsg::StopAccepting) => ctx.stop_accepting.open(),
                    Some(ShardMsg::ResumeAccepting { listeners }) => {
                        ctx.stop_accepting.close();
                        use crate::shard::accept::{accept_clients, Port};
                        use crate::upgrade::channel::{PORT_HTTP, PORT_WS};
                        for (port, fd) in listeners {
                            let l = crate::net::listener_from(fd);
                            let task = match port {
                                PORT_HTTP => glommio::spawn_local(run_http(ctx.clone(), l)),
                                PORT_WS => glommio::spawn_local(accept_clients(
                                    ctx.clone(),
                                    l,
                                    Port::WebSocket,
                                )),
                                _ => {
                                    glommio::spawn_local(accept_clients(ctx.clone(), l, Port::Tcp))
                                }
                            };
                            task.detach();
                        }
                    }
                    Some(ShardMsg::UpgradePull { max, reply }) => {
                        let ctx = ctx.clone();
                        glommio::spawn_local(async move {
                            let batch = crate::shard::upgrade::pull(ctx, max).await;
                            let _ = reply.send(crate::upgrade::Event::Pulled(batch));
                        })
                        .detach();
                    }
                    Some(ShardMsg::UpgradeForwardTo { to }) => *ctx.upgrade_to.borrow_mut() = to,
                    Some(ShardMsg::UpgradeConfirmed { closing, players }) => {
                        crate::shard::upgrade::confirmed(&ctx, &closing, &players)
                    }
                    Some(ShardMsg::UpgradeHttpQuit) => ctx.http_quit.open(),
                    Some(ShardMsg::UpgradeTakeBack { batch }) => {
                        crate::shard::upgrade::take_back(ctx.clone(), batch.sessions, batch.players)
                    }
                    Some(ShardMsg::UpgradeCancel) => crate::shard::upgrade::cancel(&ctx),
                    Some(ShardMsg::UpgradeTakeIn {
                        sessions,
                        players,
                        reply,
                    }) => {
                        let _ = reply.send(crate::shard::upgrade::take_in(
                            ctx.clone(),
                            sessions,
                            players,
                        ));
                    }
                    Some(ShardMsg::Drain { force, reply }) => {
                        if ctx.drain(force) {
                            glommio::spawn_local(drain_shard(ctx.clone(), reply)).detach();
                        }
                    }
                    None => break,
                }
            }
        })
    };

    let _ = ready.send(Ok((id, exported)));
    tracing::debug!(shard = id, "listening on {client_addr}");

    // Accept until stopped or draining.
    use crate::shard::accept::{accept_clients, Port};
    let accepts: Vec<_> = client_listeners
        .into_iter()
        .map(|l| (l, Port::Tcp))
        .chain(ws_listeners.into_iter().map(|l| (l, Port::WebSocket)))
        .map(|(l, port)| glommio::spawn_local(accept_clients(ctx.clone(), l, port)))
        .collect();
    for t in accepts {
        t.await;
    }
    // A drain stops accepting first; the shard itself ends on the stop.
    ctx.stop.stopped().await;

    // Stopping: tell every client, give the writers a moment, then end.
    ctx.kick_all(crate::protocol::Code::Shutdown);
    let deadline = Instant::now() + Duration::from_secs(2);
    while ctx.session_count() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    for t in http_tasks {
        t.await;
    }
    let _ = inbox_task.await;
    let _ = deadlines.await;
    let _ = idle.await;
    for t in backend_tasks {
        t.await;
    }
    ShardReport {
        shard: id,
        counters: ctx.snapshot().counters,
    }
}

/// One shard's listeners of each port (client, HTTP, WebSocket): the
/// inherited ones it was given, else one bound here; and a duplicate of
/// each, for a later upgrade.
#[allow(clippy::type_complexity)]
fn shard_listeners(
    id: usize,
    handed: &mut Vec<(u8, std::os::fd::OwnedFd)>,
    client_addr: SocketAddr,
    http_addr: SocketAddr,
    ws_addr: Option<SocketAddr>,
) -> Result<
    (
        (
            Vec<glommio::net::TcpListener>,
            Vec<glommio::net::TcpListener>,
            Vec<glommio::net::TcpListener>,
        ),
        Vec<Listener>,
    ),
    String,
> {
    use crate::upgrade::channel::{ListenerImage, PORT_CLIENT, PORT_HTTP, PORT_WS};
    let mut exported = Vec::new();
    let mut per_port =
        |port: u8, addr: Option<SocketAddr>| -> Result<Vec<glommio::net::TcpListener>, String> {
            let Some(addr) = addr else {
                return Ok(Vec::new());
            };
            let mut fds: Vec<std::os::fd::OwnedFd> = Vec::new();
            let mut rest = Vec::new();
            for (p, fd) in handed.drain(..) {
                if p == port {
                    fds.push(fd);
                } else {
                    rest.push((p, fd));
                }
            }
            *handed = rest;
            if fds.is_empty() {
                fds.push(
                    crate::net::listen_reuseport_fd(addr)
                        .map_err(|e| format!("cannot listen on {addr}: {e}"))?,
                );
            }
            let mut out = Vec::new();
            for fd in fds {
                socket2::SockRef::from(&fd)
                    .set_nonblocking(true)
                    .map_err(|e| format!("listener on {addr}: {e}"))?;
                let dup = fd
                    .try_clone()
                    .map_err(|e| format!("cannot duplicate the listener on {addr}: {e}"))?;
                let img = ListenerImage {
                    port,
                    shard: id as u32,
                };
                exported.push((img, dup));
                out.push(crate::net::listener_from(fd));
            }
            Ok(out)
        };
    let client = per_port(PORT_CLIENT, Some(client_addr))?;
    let http = per_port(PORT_HTTP, Some(http_addr))?;
    let ws = per_port(PORT_WS, ws_addr)?;
    Ok(((client, http, ws), exported))
}

/// Accept HTTP connections on this shard until stopped; at most
/// `http.max_connections` open in the whole gateway.
async fn run_http(ctx: Rc<ShardCtx>, listener: glommio::net::TcpListener) {
    let open = ctx.http_connections.clone();
    let _running = crate::shard::accept::Running::new(&ctx.accepting);
    if !crate::shard::accept::gate(&ctx, &ctx.accept_http).await {
        return;
    }
    loop {
        let stopped = ctx.stop.stopped();
        let soft = Some(&ctx.stop_accepting);
        let Some(stream) =
            crate::shard::accept::accept_until(&listener, stopped, soft, ctx.id, "http").await
        else {
            break;
        };
        // Limits as configured now (a reload changes them for new connections).
        let cfg = ctx.cfg();
        let h = cfg.http;
        let limits = crate::http::HttpLimits {
            head_timeout: h.head_timeout,
            body_timeout: h.body_timeout,
            idle_timeout: h.idle_timeout,
            max_body: (cfg.max_frame as usize).saturating_sub(crate::protocol::HEADER_LEN),
        };
        let Some(slot) = crate::net::Slot::take(&open, h.max_connections) else {
            tracing::debug!(
                shard = ctx.id,
                "http connection refused: http.max_connections"
            );
            // Say so rather than close in silence (plain HTTP only: on a
            // TLS port these bytes would mean nothing): one non-blocking
            // send into the fresh socket's empty buffer, no task.
            if ctx.wires.borrow().http.is_none() {
                let mut out = bytes::BytesMut::new();
                ctx.metrics().http(503);
                crate::http::Response::error(
                    503,
                    "too many HTTP connections: http.max_connections",
                )
                .closing()
                .encode(&mut out);
                use std::os::fd::AsRawFd;
                let _ = crate::net::send_now(stream.as_raw_fd(), &out);
            }
            continue;
        };
        let ctx2 = ctx.clone();
        let tls = ctx.wires.borrow().http.clone();
        glommio::spawn_local(async move {
            let stop = ctx2.stop.clone();
            let handler = |req| {
                let ctx = ctx2.clone();
                async move {
                    let resp = crate::http::api::handle(ctx.clone(), req).await;
                    // Handed over: the client's next request goes to the
                    // new process.
                    if ctx.http_quit.is_open() {
                        resp.closing()
                    } else {
                        resp
                    }
                }
            };
            let count = |status| ctx2.metrics().http(status);
            let serve = async {
                let peer = stream
                    .peer_addr()
                    .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                let (stream, read) = match tls {
                    None => (
                        crate::net::SharedStream::new(stream),
                        bytes::BytesMut::new(),
                    ),
                    Some(tls) => {
                        let kind = crate::wire::WireKind {
                            tls: Some(tls),
                            ws: None,
                        };
                        let Some(s) = crate::shard::handshake::wired(stream, &kind, peer) else {
                            return;
                        };
                        let times = (limits.head_timeout, limits.head_timeout);
                        match crate::shard::handshake::handshake(&s, times, peer).await {
                            // A request sent with the handshake's last flight.
                            Ok(read) => (s, read),
                            Err(_) => return,
                        }
                    }
                };
                // An upgrade's old process, once everything moved, closes
                // connections between requests: their clients reconnect to
                // the new process.
                let quit = {
                    let ctx = ctx2.clone();
                    move || {
                        let ctx = ctx.clone();
                        async move { ctx.http_quit.opened().await }
                    }
                };
                crate::http::serve_conn(stream.clone(), read, limits, handler, count, quit).await;
                if stream.is_wired() {
                    // HTTPS ends with close_notify.
                    stream.with_wire(|_, w| w.map(|w| w.close()));
                    let flushed = stream.flush_wire();
                    let _ = futures_lite::future::or(async { flushed.await.is_ok() }, async {
                        glommio::timer::sleep(Duration::from_secs(1)).await;
                        false
                    })
                    .await;
                }
            };
            futures_lite::future::or(serve, stop.stopped()).await;
            drop(slot);
        })
        .detach();
    }
}

/// A drain's grace: a session that has sent nothing for this long is
/// kicked at once, and once the drain is this old every session with no
/// request in flight is, whether or not its client keeps sending.
const DRAIN_QUIET: Duration = Duration::from_millis(100);

/// Drain this shard: new requests are answered `SHUTTING_DOWN`; each
/// session gets `KICK SHUTDOWN` after its queued output as soon as its own
/// requests at a backend are answered (or timed out) and the grace is over
/// (or it fell quiet); then, once no request of any player is in flight,
/// the players go to the coordinator. So a busy gateway drains in about one
/// request timeout. Everything is bounded by `drain_timeout`; a force
/// finishes at once.
async fn drain_shard(ctx: Rc<ShardCtx>, reply: flume::Sender<DrainReport>) {
    let began = Instant::now();
    let deadline = began + ctx.cfg().drain_timeout;
    let tick = Duration::from_millis(5);
    let wait = |ctx: Rc<ShardCtx>| async move {
        futures_lite::future::or(glommio::timer::sleep(tick), ctx.force_wake.notified()).await;
    };
    let mut clean = true;
    loop {
        let now = Instant::now();
        let quiet_since = now.checked_sub(DRAIN_QUIET).unwrap_or(began);
        let open = ctx.drain_kicks(quiet_since, now >= began + DRAIN_QUIET);
        // Answers for players whose session is gone still go to their
        // outboxes, so the images wait for every request in flight.
        if open == 0 && ctx.in_flight() == 0 {
            break;
        }
        if ctx.is_forced() || Instant::now() >= deadline {
            clean = false;
            ctx.kick_all(crate::protocol::Code::Shutdown);
            break;
        }
        wait(ctx.clone()).await;
    }
    // Let the KICKs flush, unless forced.
    while ctx.session_count() > 0 && !ctx.is_forced() && Instant::now() < deadline {
        wait(ctx.clone()).await;
    }
    if ctx.session_count() > 0 {
        clean = false;
    }
    ctx.drained();
    let players = ctx.images();
    tracing::info!(
        shard = ctx.id,
        players = players.len(),
        clean,
        "shard drained"
    );
    let _ = reply.send(DrainReport {
        shard: ctx.id,
        clean,
        players,
    });
}
