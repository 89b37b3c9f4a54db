//! Gateway configuration: the RON schema, loading and start-up validation.
//!
//! This module owns the one configuration file of the gateway
//! (`config/gateway.ron`, also embedded as [`DEFAULT_RON`]): its types, how it
//! is parsed, and every rule checked before the gateway starts. Every error is
//! a [`ConfigError`] whose `Display` is one line naming the file (with line
//! and column) or the key at fault, so `main` can print it and exit with
//! status 2. Command-line overrides (`--listen`, `--http-listen`, `--shards`)
//! are applied by the caller on the parsed [`Config`], which then calls
//! [`Config::validate`] again.
//!
//! Why one file of this length: the schema and the validation of every key
//! sit together so a key and its checks are read at once; the tests are in
//! `tests.rs`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod wire;
pub use wire::{TlsConfig, WsConfig};

/// The shipped default configuration, which is also the documented template.
pub const DEFAULT_RON: &str = include_str!("../../config/gateway.ron");

/// Smallest accepted `max_frame` (bytes after the length prefix).
pub const MIN_MAX_FRAME: u32 = 64;
/// Largest accepted `max_frame`: 16 MiB.
pub const MAX_MAX_FRAME: u32 = 16 * 1024 * 1024;
/// Largest accepted `shards`.
pub const MAX_SHARDS: usize = 1024;
/// Bytes of the length prefix that precedes `len` bytes of frame.
const LEN_PREFIX: usize = 4;

/// The whole gateway configuration (one RON file).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Client TCP address, bound by every shard with SO_REUSEPORT.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Push/admin HTTP address.
    #[serde(default = "default_http_listen")]
    pub http_listen: String,
    /// `Some(n)`: n shards; `None`: one per available core.
    #[serde(default)]
    pub shards: Option<usize>,
    /// Largest allowed frame `len` field (bytes after the length prefix).
    #[serde(default = "default_max_frame")]
    pub max_frame: u32,
    /// Client connections per gateway; beyond it new ones are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A session silent for this long is closed.
    #[serde(with = "humantime_serde", default = "default_session_idle")]
    pub session_idle: Duration,
    /// A connection not logged in (or resumed) this long after it was
    /// accepted is closed (KICK LOGIN_TIMEOUT).
    #[serde(with = "humantime_serde", default = "default_login_timeout")]
    pub login_timeout: Duration,
    /// A frame begun and not finished this long gets the session kicked
    /// (KICK IDLE).
    #[serde(with = "humantime_serde", default = "default_frame_timeout")]
    pub frame_timeout: Duration,
    /// How long a player without a connection is kept for resume.
    #[serde(with = "humantime_serde", default = "default_player_linger")]
    pub player_linger: Duration,
    /// A login of a player who already has a live session: `ReplaceOld`
    /// kicks that session (`REPLACED`), `RejectNew` refuses the login
    /// (`ALREADY_ONLINE`). A resume with a valid token replaces either way.
    #[serde(default)]
    pub on_second_login: SecondLogin,
    /// How long a reconnect token stays valid after it is issued.
    #[serde(with = "humantime_serde", default = "default_token_lifetime")]
    pub token_lifetime: Duration,
    /// Per-player outbox bounds.
    #[serde(default)]
    pub outbox: OutboxLimits,
    /// Per-session queued-output byte limit; beyond it KICK SLOW_CONSUMER.
    #[serde(default = "default_write_queue_bytes")]
    pub write_queue_bytes: usize,
    /// Backend link timings.
    #[serde(default)]
    pub backend: BackendConfig,
    /// Service name -> instances.
    pub services: BTreeMap<String, ServiceConfig>,
    /// msg_id ranges -> service.
    pub routes: Vec<RouteConfig>,
    /// Bearer token of the push endpoints (push, broadcast, player
    /// lookup); `None` = no check there unless `admin_token` is set.
    #[serde(default)]
    pub push_token: Option<String>,
    /// Bearer token of the admin endpoints (kick, drain, reload, migrate,
    /// evacuate, listing, metrics); it opens the push endpoints too.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// An HTTP API reachable from other hosts (`http_listen` not on the
    /// loopback) with no token is refused at start unless this is true.
    #[serde(default)]
    pub http_open: bool,
    /// Limits and deadlines of the HTTP API.
    #[serde(default)]
    pub http: HttpConfig,
    /// Backpressure: in-flight bounds and the per-session rate limit.
    #[serde(default)]
    pub limits: Limits,
    /// Several gateways as one, on Redis (None: this gateway alone).
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
    /// An idle shard spins this long before it sleeps in the kernel.
    #[serde(default, with = "humantime_serde")]
    pub park_spin: Option<Duration>,
    /// Directory for snapshots of player state at shutdown (None: none).
    #[serde(default = "default_snapshot_dir")]
    pub snapshot_dir: Option<String>,
    /// How long a drain may take before it is forced.
    #[serde(with = "humantime_serde", default = "default_drain_timeout")]
    pub drain_timeout: Duration,
    /// Start the in-process demo backend on this address.
    #[serde(default)]
    pub demo_backend: Option<String>,
    /// tracing filter; `RUST_LOG` overrides it.
    #[serde(default = "default_log")]
    pub log: String,
    /// How log lines are written on stderr.
    #[serde(default)]
    pub log_format: LogFormat,
    /// WebSocket client address, bound by every shard (None: no WebSocket).
    #[serde(default)]
    pub ws_listen: Option<String>,
    /// The WebSocket listener's path, origins and handshake bounds.
    #[serde(default)]
    pub ws: WsConfig,
    /// TLS on the listeners it names (None: plain everywhere).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Players held at once, lingering ones included (each shard holds at
    /// most its share); a login of one more is answered OVERLOADED.
    #[serde(default = "default_max_players")]
    pub max_players: usize,
    /// Per-shard memory budgets.
    #[serde(default)]
    pub memory: MemoryConfig,
}

fn default_snapshot_dir() -> Option<String> {
    Some("state".into())
}

fn default_listen() -> String {
    "127.0.0.1:7000".into()
}

fn default_http_listen() -> String {
    "127.0.0.1:7001".into()
}

fn default_max_frame() -> u32 {
    65536
}

fn default_max_connections() -> usize {
    100_000
}

fn default_session_idle() -> Duration {
    Duration::from_secs(60)
}

fn default_player_linger() -> Duration {
    Duration::from_secs(300)
}

fn default_token_lifetime() -> Duration {
    Duration::from_secs(3600)
}

fn default_write_queue_bytes() -> usize {
    1024 * 1024
}

fn default_max_players() -> usize {
    200_000
}

/// The form of log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum LogFormat {
    /// Human-readable lines; colours only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `message` and the
    /// event's fields), for log shippers.
    Json,
}

/// What one shard may hold, beyond which it frees memory itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// Bytes of all outboxes of a shard: beyond it the oldest frames of the
    /// largest outboxes are evicted. `Auto`: a quarter of the machine's
    /// memory, shared among the shards.
    pub outboxes: Budget,
    /// Bytes of a shard's connection buffers: frames begun and not
    /// finished, and output not yet written. Beyond it the sessions holding
    /// the most are kicked SLOW_CONSUMER. `Auto`: an eighth of the
    /// machine's memory, shared among the shards.
    pub buffers: Budget,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            outboxes: Budget::Auto,
            buffers: Budget::Auto,
        }
    }
}

/// A memory budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum Budget {
    /// Derived from the machine's memory (see where it is used).
    Auto,
    /// This many bytes per shard.
    Bytes(usize),
    /// No budget.
    Unlimited,
}

impl Budget {
    /// Bytes per shard: `Auto` is `memory / divisor / shards` (`memory`
    /// the machine's physical memory, if known; else no budget).
    pub fn per_shard(self, memory: Option<u64>, divisor: u64, shards: usize) -> Option<usize> {
        match self {
            Budget::Bytes(n) => Some(n),
            Budget::Unlimited => None,
            Budget::Auto => memory.map(|m| (m / divisor / shards.max(1) as u64) as usize),
        }
    }
}

fn default_frame_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_login_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_drain_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_log() -> String {
    "info".to_string()
}

/// Bounds of a player's outbox (frames kept for resume).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxLimits {
    pub max_frames: usize,
    pub max_bytes: usize,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        OutboxLimits {
            max_frames: 1024,
            max_bytes: 4 * 1024 * 1024,
        }
    }
}

/// This gateway's place in a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// One Redis server, `redis://host:port/db`; "" (the default) when
    /// `redis_sentinel` or `redis_cluster` names the directory instead.
    #[serde(default)]
    pub redis: String,
    /// Redis under Sentinel: the master's name and the sentinels asking
    /// whom to follow; a failover is followed on the next reconnection.
    #[serde(default)]
    pub redis_sentinel: Option<SentinelConfig>,
    /// A Redis Cluster: seed nodes (`redis://host:port`), any of them.
    #[serde(default)]
    pub redis_cluster: Vec<String>,
    /// Replicas each change of the directory waits for (Redis `WAIT`, at
    /// most 250 ms), so a failover loses no change the gateway acted on.
    /// None: 1 under Sentinel or Cluster, 0 for one server. Some(0) for a
    /// Redis Cluster without replicas.
    #[serde(default)]
    pub wait_replicas: Option<u32>,
    /// This gateway's name in the cluster (unique).
    pub gateway_id: String,
    /// The client address other gateways send players to (`host:port`).
    pub advertise: String,
    /// The HTTP address other gateways forward pushes to (`host:port`);
    /// None: the address `http_listen` bound.
    #[serde(default)]
    pub http_advertise: Option<String>,
    /// The WebSocket URL other gateways send this gateway's WebSocket
    /// clients to in a REDIRECT (`ws://host:port/ws`, `wss://...`); None:
    /// they are sent `advertise`, like TCP clients.
    #[serde(default)]
    pub ws_advertise: Option<String>,
    /// This gateway's lease: if it cannot renew it for this long, others
    /// take its players over.
    #[serde(with = "humantime_serde", default = "default_lease")]
    pub lease: Duration,
    /// Key prefix in Redis.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// What a login or resume does while Redis cannot be reached.
    #[serde(default)]
    pub when_redis_down: RedisDown,
    /// Migrations in flight at once per shard during an evacuation.
    #[serde(default = "default_migrate_parallel")]
    pub migrate_parallel: usize,
    /// Migrations the whole gateway starts per second during an evacuation
    /// (None: as fast as `migrate_parallel` allows).
    #[serde(default)]
    pub migrate_rate: Option<u32>,
    /// A drain (SIGTERM, `POST /v1/drain`) first evacuates every player to
    /// the peers with room, so none sees a restart (`POST
    /// /v1/drain?evacuate=true` does it for one drain).
    #[serde(default)]
    pub evacuate_on_drain: bool,
}

fn default_migrate_parallel() -> usize {
    16
}

/// What a login does to a live session of the same player.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum SecondLogin {
    /// The new login wins: the live session gets `KICK REPLACED`.
    #[default]
    ReplaceOld,
    /// The live session wins: the login is answered `ALREADY_ONLINE`.
    RejectNew,
}

/// Redis under Sentinel.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SentinelConfig {
    /// The master's name in the sentinels' config (`sentinel monitor NAME`).
    pub master: String,
    /// The sentinels, `redis://host:port` each (at least one; every one is
    /// tried in turn).
    pub sentinels: Vec<String>,
    /// The master's password (AUTH), if it has one.
    #[serde(default)]
    pub password: Option<String>,
    /// The master's database number.
    #[serde(default)]
    pub db: i64,
}

/// Behaviour while Redis is unreachable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum RedisDown {
    /// Refuse logins and resumes of players this gateway does not hold
    /// (BACKEND_UNAVAILABLE / RESUME_REJECTED); sessions already here go on.
    #[default]
    Refuse,
    /// Serve them from this gateway alone: the player may then have a
    /// session on two gateways until Redis is back.
    Local,
}

fn default_lease() -> Duration {
    Duration::from_secs(10)
}

fn default_prefix() -> String {
    "slg:".into()
}

/// Backpressure and fairness.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Requests of one session waiting for backends; beyond it OVERLOADED.
    pub session_inflight: u32,
    /// Bytes of request bodies of one session at backends; beyond it
    /// OVERLOADED (one request always goes, however large).
    pub session_inflight_bytes: usize,
    /// Requests of one player waiting behind one at a backend in an order
    /// group (`order: PerPlayer` routes); beyond it OVERLOADED.
    pub ordered_queue: usize,
    /// Requests waiting on one backend connection; beyond it the instance
    /// is skipped, and OVERLOADED when every instance is that full.
    pub backend_inflight: usize,
    /// Bytes queued to one backend connection, likewise.
    pub backend_queue_bytes: usize,
    /// Per-session token bucket (requests per second, burst); None: no limit.
    pub rate: Option<RateLimit>,
    /// The takeover flapping guard; None: off.
    pub takeovers: Option<TakeoverLimit>,
    /// Connection-rate limits of the client ports.
    pub accept: AcceptLimits,
}

/// New client connections per second (token buckets), per source IP and
/// per listener; None: no limit. Each shard accepts on its own, so each
/// enforces `per_second / shards` with `burst / shards` (at least 1): the
/// kernel spreads one address's connections over the shards.
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AcceptLimits {
    pub per_ip: Option<RateLimit>,
    pub per_listener: Option<RateLimit>,
}

/// At most `max` takeovers of one player (a login that replaces a live
/// session) per `window`; the next one starts a `backoff` during which
/// logins that would take over are refused RATE_LIMITED (one with no live
/// session to replace never is, nor is a resume).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TakeoverLimit {
    pub max: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
}

impl Default for TakeoverLimit {
    fn default() -> Self {
        TakeoverLimit {
            max: 5,
            window: Duration::from_secs(10),
            backoff: Duration::from_secs(30),
        }
    }
}

/// A token bucket: `per_second` tokens added each second, at most `burst` kept.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            session_inflight: 256,
            session_inflight_bytes: 1024 * 1024,
            ordered_queue: 32,
            backend_inflight: 65536,
            backend_queue_bytes: 8 * 1024 * 1024,
            rate: None,
            takeovers: Some(TakeoverLimit::default()),
            accept: AcceptLimits::default(),
        }
    }
}

/// Limits and deadlines of the push/admin HTTP listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Open HTTP connections per gateway; beyond it new ones are closed.
    pub max_connections: usize,
    /// Time from a request's first byte to the end of its head.
    #[serde(with = "humantime_serde")]
    pub head_timeout: Duration,
    /// Time from the end of the head to the end of the body.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// A keep-alive connection idle this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_connections: 1024,
            head_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Backend connection timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// How often each backend connection is sent a PING.
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    /// A PING unanswered this long takes the instance out of rotation
    /// until it answers again.
    #[serde(with = "humantime_serde")]
    pub health_timeout: Duration,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            health_interval: Duration::from_secs(2),
            health_timeout: Duration::from_secs(1),
        }
    }
}

/// One backend service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// `"ip:port"` of each instance.
    pub instances: Vec<String>,
    /// Connections from each shard to each instance (requests are spread
    /// over them); default 1.
    #[serde(default = "one")]
    pub connections: usize,
}

fn one() -> usize {
    1
}

/// One route: an inclusive msg_id range sent to a service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Inclusive `(first, last)` msg_id range.
    pub msgs: (u32, u32),
    pub service: String,
    /// The player must be logged in.
    #[serde(default)]
    pub auth: bool,
    /// This msg_id is a login request.
    #[serde(default)]
    pub login: bool,
    /// Safe to send twice: when its backend connection dies, the request
    /// is sent to another instance (within its deadline) instead of
    /// failing with BACKEND_UNAVAILABLE.
    #[serde(default)]
    pub idempotent: bool,
    #[serde(default)]
    pub balance: Balance,
    /// `PerPlayer`: a player's requests on the routes of one order group
    /// go to the backend one at a time, in the order sent, and are
    /// answered in that order. `Concurrent` (the default): as they come.
    #[serde(default)]
    pub order: Order,
    /// The order group of a `PerPlayer` route (None: the service's one
    /// group, shared by its `PerPlayer` routes without a group).
    #[serde(default)]
    pub group: Option<String>,
}

/// Whether a route's requests of one player wait for each other.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
pub enum Order {
    /// Sent as they come, several in flight; answers as backends finish.
    #[default]
    Concurrent,
    /// One at a time per player and order group, answers in request order.
    PerPlayer,
}

/// How a route picks an instance of its service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
pub enum Balance {
    /// Spread requests over the instances in turn.
    #[default]
    RoundRobin,
    /// The same player always goes to the same instance.
    HashPlayer,
    /// Send to every instance.
    Broadcast,
}

/// A configuration that cannot be used. `Display` is one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// RON syntax error, unknown/missing/duplicate key or wrong type.
    #[error("config {origin}:{line}:{col}: {message}")]
    Syntax {
        origin: String,
        line: usize,
        col: usize,
        message: String,
    },
    /// Parsed, but a value breaks a rule.
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: one_line(&key.into()),
        message: one_line(&message.into()),
    }
}

fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            key,
            format!("`{value}` is not an address of the form ip:port (e.g. \"127.0.0.1:7000\")"),
        )
    })
}

/// Longest accepted duration of any key: a year. Beyond it a deadline
/// computed from it could overflow the clock.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

fn positive(key: &str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        Err(invalid(key, "must be greater than 0"))
    } else if d > MAX_DURATION {
        Err(invalid(key, format!("must be at most 365 days, got {d:?}")))
    } else {
        Ok(())
    }
}

impl Config {
    /// Parses `text` (RON) and validates it. `origin` names it in errors
    /// (a file path, or e.g. `"<embedded>"`).
    pub fn from_ron(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = ron::from_str(text).map_err(|e| syntax_error(text, origin, &e))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_ron(&text, &path.display().to_string())
    }

    /// The shipped default ([`DEFAULT_RON`]).
    pub fn embedded_default() -> Config {
        Config::from_ron(DEFAULT_RON, "<embedded gateway.ron>")
            .expect("the embedded config/gateway.ron must be valid (tested)")
    }

    /// Checks every rule; the first broken one is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        let http = self.http_listen_addr()?;
        let open = self.push_token.is_none() && self.admin_token.is_none();
        if open && !http.ip().is_loopback() && !self.http_open {
            return Err(invalid(
                "http_listen",
                format!(
                    "{http} is reachable from other hosts and neither push_token nor \
                     admin_token is set: set them, or http_open: true to serve the API \
                     to anyone"
                ),
            ));
        }
        self.validate_wire()?;
        if let Some(n) = self.shards {
            if n == 0 || n > MAX_SHARDS {
                return Err(invalid(
                    "shards",
                    format!("must be None or Some(1..={MAX_SHARDS}), got Some({n})"),
                ));
            }
        }
        if !(MIN_MAX_FRAME..=MAX_MAX_FRAME).contains(&self.max_frame) {
            return Err(invalid(
                "max_frame",
                format!(
                    "must be in {MIN_MAX_FRAME}..={MAX_MAX_FRAME} bytes (20-byte header + body), got {}",
                    self.max_frame
                ),
            ));
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be greater than 0"));
        }
        positive("session_idle", self.session_idle)?;
        positive("login_timeout", self.login_timeout)?;
        positive("frame_timeout", self.frame_timeout)?;
        if self.max_players == 0 {
            return Err(invalid("max_players", "must be greater than 0"));
        }
        // A budget smaller than one frame would evict or kick at once.
        let one_frame = self.max_frame as usize + LEN_PREFIX;
        for (key, b) in [
            ("memory.outboxes", self.memory.outboxes),
            ("memory.buffers", self.memory.buffers),
        ] {
            if let Budget::Bytes(n) = b {
                if n < one_frame {
                    return Err(invalid(key, "must be at least max_frame + 4 bytes"));
                }
            }
        }
        let l = &self.limits;
        if l.session_inflight_bytes == 0 {
            return Err(invalid(
                "limits.session_inflight_bytes",
                "must be greater than 0",
            ));
        }
        if l.session_inflight == 0 {
            return Err(invalid("limits.session_inflight", "must be greater than 0"));
        }
        if l.backend_inflight == 0 {
            return Err(invalid("limits.backend_inflight", "must be greater than 0"));
        }
        if l.backend_queue_bytes < self.max_frame as usize + LEN_PREFIX {
            return Err(invalid(
                "limits.backend_queue_bytes",
                "must be at least max_frame + 4 so that one largest request fits",
            ));
        }
        if let Some(r) = l.rate {
            if !(r.per_second > 0.0 && r.per_second.is_finite()) {
                return Err(invalid(
                    "limits.rate.per_second",
                    "must be a positive number",
                ));
            }
            if !(r.burst >= 1.0 && r.burst.is_finite()) {
                return Err(invalid("limits.rate.burst", "must be at least 1"));
            }
        }
        for (key, rate) in [
            ("limits.accept.per_ip", l.accept.per_ip),
            ("limits.accept.per_listener", l.accept.per_listener),
        ] {
            if let Some(r) = rate {
                if !(r.per_second > 0.0
                    && r.per_second.is_finite()
                    && r.burst >= 1.0
                    && r.burst.is_finite())
                {
                    return Err(invalid(key, "per_second must be > 0 and burst >= 1"));
                }
            }
        }
        if let Some(t) = l.takeovers {
            if t.max == 0 {
                return Err(invalid("limits.takeovers.max", "must be greater than 0"));
            }
            positive("limits.takeovers.window", t.window)?;
            positive("limits.takeovers.backoff", t.backoff)?;
        }
        if self.http.max_connections == 0 {
            return Err(invalid("http.max_connections", "must be greater than 0"));
        }
        positive("http.head_timeout", self.http.head_timeout)?;
        positive("http.body_timeout", self.http.body_timeout)?;
        positive("http.idle_timeout", self.http.idle_timeout)?;
        positive("player_linger", self.player_linger)?;
        positive("token_lifetime", self.token_lifetime)?;
        positive("drain_timeout", self.drain_timeout)?;
        if let Some(c) = &self.cluster {
            let named = [
                !c.redis.is_empty(),
                c.redis_sentinel.is_some(),
                !c.redis_cluster.is_empty(),
            ];
            if named.iter().filter(|n| **n).count() != 1 {
                return Err(invalid(
                    "cluster.redis",
                    "name the directory once: redis (one server), redis_sentinel or redis_cluster",
                ));
            }
            let url = |key: &str, u: &str| {
                if u.starts_with("redis://") || u.starts_with("rediss://") {
                    Ok(())
                } else {
                    Err(invalid(key, format!("must be a redis:// URL, got {u:?}")))
                }
            };
            if !c.redis.is_empty() {
                url("cluster.redis", &c.redis)?;
            }
            if let Some(s) = &c.redis_sentinel {
                if s.master.is_empty() {
                    return Err(invalid(
                        "cluster.redis_sentinel.master",
                        "must not be empty",
                    ));
                }
                if s.sentinels.is_empty() {
                    return Err(invalid(
                        "cluster.redis_sentinel.sentinels",
                        "needs at least one sentinel",
                    ));
                }
                for u in &s.sentinels {
                    url("cluster.redis_sentinel.sentinels", u)?;
                }
            }
            for u in &c.redis_cluster {
                url("cluster.redis_cluster", u)?;
            }
            if c.gateway_id.is_empty() || c.gateway_id.contains(char::is_whitespace) {
                return Err(invalid(
                    "cluster.gateway_id",
                    "must be a non-empty name without spaces",
                ));
            }
            if c.advertise.parse::<SocketAddr>().is_err() && !c.advertise.contains(':') {
                return Err(invalid("cluster.advertise", "must be host:port"));
            }
            if let Some(u) = &c.ws_advertise {
                let ok = (u.starts_with("ws://") || u.starts_with("wss://"))
                    && !u.contains(char::is_whitespace);
                if !ok {
                    return Err(invalid(
                        "cluster.ws_advertise",
                        format!("must be a ws:// or wss:// URL, got `{u}`"),
                    ));
                }
            }
            positive("cluster.lease", c.lease)?;
            if c.migrate_parallel == 0 {
                return Err(invalid(
                    "cluster.migrate_parallel",
                    "must be greater than 0",
                ));
            }
            if c.migrate_rate == Some(0) {
                return Err(invalid(
                    "cluster.migrate_rate",
                    "must be greater than 0 (None: no bound)",
                ));
            }
        }
        if self.snapshot_dir.as_deref() == Some("") {
            return Err(invalid(
                "snapshot_dir",
                "must not be empty (use None for no snapshots)",
            ));
        }
        if self.limits.ordered_queue == 0 {
            return Err(invalid("limits.ordered_queue", "must be greater than 0"));
        }
        if self.outbox.max_frames == 0 {
            return Err(invalid("outbox.max_frames", "must be greater than 0"));
        }
        if self.outbox.max_bytes == 0 {
            return Err(invalid("outbox.max_bytes", "must be greater than 0"));
        }
        let largest_frame = self.max_frame as usize + LEN_PREFIX;
        if self.write_queue_bytes < largest_frame {
            return Err(invalid(
                "write_queue_bytes",
                format!(
                    "must be at least max_frame + 4 = {largest_frame} bytes so that one largest frame fits, got {}",
                    self.write_queue_bytes
                ),
            ));
        }
        let b = &self.backend;
        positive("backend.request_timeout", b.request_timeout)?;
        positive("backend.connect_timeout", b.connect_timeout)?;
        positive("backend.reconnect_min", b.reconnect_min)?;
        positive("backend.reconnect_max", b.reconnect_max)?;
        positive("backend.health_interval", b.health_interval)?;
        positive("backend.health_timeout", b.health_timeout)?;
        if b.reconnect_min > b.reconnect_max {
            return Err(invalid(
                "backend.reconnect_min",
                format!(
                    "{:?} is greater than backend.reconnect_max ({:?})",
                    b.reconnect_min, b.reconnect_max
                ),
            ));
        }
        if self.services.is_empty() && !self.routes.is_empty() {
            return Err(invalid(
                "services",
                "is empty but routes are configured; add at least one service",
            ));
        }
        for (name, service) in &self.services {
            if service.instances.is_empty() {
                return Err(invalid(
                    format!("services.{name}.instances"),
                    "a service needs at least one instance",
                ));
            }
            for (i, inst) in service.instances.iter().enumerate() {
                parse_addr(&format!("services.{name}.instances[{i}]"), inst)?;
            }
            if !(1..=64).contains(&service.connections) {
                return Err(invalid(
                    format!("services.{name}.connections"),
                    "must be in 1..=64",
                ));
            }
        }
        for (i, route) in self.routes.iter().enumerate() {
            let (first, last) = route.msgs;
            if first > last {
                return Err(invalid(
                    format!("routes[{i}].msgs"),
                    format!(
                        "first {first} is greater than last {last} (the range is ({first}, {last}) inclusive)"
                    ),
                ));
            }
            for (j, earlier) in self.routes[..i].iter().enumerate() {
                let (ef, el) = earlier.msgs;
                if ef <= el && first <= el && ef <= last {
                    return Err(invalid(
                        format!("routes[{i}].msgs"),
                        format!("range {first}..={last} overlaps routes[{j}] ({ef}..={el})"),
                    ));
                }
            }
            if !self.services.contains_key(&route.service) {
                let known: Vec<&str> = self.services.keys().map(String::as_str).collect();
                return Err(invalid(
                    format!("routes[{i}].service"),
                    format!(
                        "unknown service `{}` (known: {})",
                        route.service,
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            }
            if route.login && route.auth {
                return Err(invalid(
                    format!("routes[{i}].auth"),
                    "a login route (login: true) cannot require auth; set auth: false",
                ));
            }
        }
        for (key, token) in [
            ("push_token", &self.push_token),
            ("admin_token", &self.admin_token),
        ] {
            if token.as_deref() == Some("") {
                return Err(invalid(
                    key,
                    "must not be empty; use None to disable the check",
                ));
            }
        }
        if let Some(addr) = &self.demo_backend {
            parse_addr("demo_backend", addr)?;
        }
        Ok(())
    }

    /// Number of shards to run: `shards`, or one per available core.
    pub fn shard_count(&self) -> usize {
        self.shards.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }

    /// `listen` as a socket address.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        parse_addr("listen", &self.listen)
    }

    /// `http_listen` as a socket address.
    pub fn http_listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        parse_addr("http_listen", &self.http_listen)
    }
}

/// Turns a RON error into a one-line [`ConfigError::Syntax`], naming the key
/// at the error position where it can be found.
fn syntax_error(text: &str, origin: &str, e: &ron::error::SpannedError) -> ConfigError {
    let ron::error::Position { line, col } = e.position;
    let path = key_path_at(text, line, col);
    let message = match &e.code {
        ron::Error::NoSuchStructField {
            expected, found, ..
        } => {
            let mut m = format!("unknown field `{found}`");
            if !path.parent.is_empty() {
                let _ = write!(m, " in `{}`", path.parent);
            }
            let list: Vec<String> = expected.iter().map(|f| format!("`{f}`")).collect();
            let _ = write!(m, ", expected one of {}", list.join(", "));
            m
        }
        ron::Error::MissingStructField { field, .. } => {
            let mut m = format!("missing field `{field}`");
            if !path.parent.is_empty() {
                let _ = write!(m, " in `{}`", path.parent);
            }
            m
        }
        ron::Error::DuplicateStructField { field, .. } => {
            let mut m = format!("duplicate field `{field}`");
            if !path.parent.is_empty() {
                let _ = write!(m, " in `{}`", path.parent);
            }
            m
        }
        other => {
            // ron 0.8 writes "`Variant`in enum"; restore the space.
            let mut m = other.to_string().replace("`in ", "` in ");
            if matches!(other, ron::Error::ExpectedOption) {
                m.push_str(" (write Some(value) or None)");
            }
            if path.full.is_empty() {
                m
            } else {
                format!("key `{}`: {m}", path.full)
            }
        }
    };
    ConfigError::Syntax {
        origin: one_line(origin),
        line,
        col,
        message: one_line(&message),
    }
}

/// Text from the file (a key, a value) made fit for the one line of a
/// [`ConfigError`]: control characters (a newline in a string value
/// would forge a second log line) are written as escapes.
fn one_line(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[derive(Debug, Default, PartialEq)]
struct KeyPath {
    /// Path of the value being parsed at the position, e.g. `routes[2].msgs`.
    full: String,
    /// Path of the struct or map that contains it, e.g. `routes[2]`.
    parent: String,
}

struct Level {
    open: u8,
    key: Option<String>,
    index: usize,
}

fn path_of(levels: &[Level], with_last_key: bool) -> String {
    let mut out = String::new();
    let n = levels.len();
    for (k, level) in levels.iter().enumerate() {
        match level.open {
            b'[' => {
                let _ = write!(out, "[{}]", level.index);
            }
            _ => {
                if k + 1 == n && !with_last_key {
                    continue;
                }
                if let Some(key) = &level.key {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(key);
                }
            }
        }
    }
    out
}

/// Best-effort: the key path of the value at 1-based (`line`, `col` in bytes)
/// of `text`, found by scanning brackets, keys, strings and comments.
fn key_path_at(text: &str, line: usize, col: usize) -> KeyPath {
    let b = text.as_bytes();
    let mut end = 0;
    let mut cur = 1;
    while cur < line && end < b.len() {
        if b[end] == b'\n' {
            cur += 1;
        }
        end += 1;
    }
    let end = (end + col.saturating_sub(1)).min(b.len());
    let mut levels: Vec<Level> = Vec::new();
    let mut pending: Option<String> = None; // identifier or string awaiting ':'
    let mut i = 0;
    while i < end {
        let c = b[i];
        match c {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < end && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < end && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i += 2;
                continue;
            }
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < end && b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                let stop = i.min(end);
                pending = Some(String::from_utf8_lossy(&b[start..stop]).into_owned());
                i += 1;
                continue;
            }
            b'(' | b'[' | b'{' => {
                levels.push(Level {
                    open: c,
                    key: None,
                    index: 0,
                });
                pending = None;
            }
            b')' | b']' | b'}' => {
                levels.pop();
                pending = None;
            }
            b',' => {
                if let Some(level) = levels.last_mut() {
                    level.index += 1;
                    level.key = None;
                }
                pending = None;
            }
            b':' => {
                if let (Some(level), Some(key)) = (levels.last_mut(), pending.take()) {
                    level.key = Some(key);
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < end && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                pending = Some(String::from_utf8_lossy(&b[start..i]).into_owned());
                continue;
            }
            c if c.is_ascii_whitespace() => {}
            _ => pending = None,
        }
        i += 1;
    }
    KeyPath {
        full: path_of(&levels, true),
        parent: path_of(&levels, false),
    }
}

#[cfg(test)]
mod tests;
