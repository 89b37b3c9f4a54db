//! The cluster's shared state in Redis: which gateway holds each player
//! (with a fencing epoch), and each gateway's lease.
//!
//! It is synchronous on purpose: it runs on control threads of their own
//! ([`runtime`]), bridged to the shards by channels, so no second async
//! runtime touches the data path.
//!
//! Redis is one server, a master found through Sentinel, or a Redis
//! Cluster ([`Store`]). Every script touches one key, and the keys of one
//! player (its entry, its hand-overs, its acknowledgements) share the hash
//! tag `{player}`, so each command and script runs on the one node that
//! owns the player's slot.
//!
//! Keys (prefix `slg:` by default):
//! - `{prefix}gw:{id}`: the gateway's lease, a hash with a TTL of `lease`
//!   (its HTTP address and its load: sessions, players, room, draining),
//!   renewed by [`Directory::renew`]. A gateway whose lease lapsed
//!   (partition, pause, crash) holds nothing any more.
//! - `{prefix}gateways`: the set of gateway ids ever seen (a member whose
//!   lease is gone is no peer).
//! - `{prefix}p:{player}`: hash `gw` (the holder) and `epoch`, raised by
//!   every change of holder and never reset (a released player keeps it,
//!   with no holder). Every change is a Lua script that checks the
//!   caller still is the holder at the epoch it knows (fencing), so a
//!   gateway acting on stale ownership changes nothing.
//! - `{prefix}want:{player}:{gw}`, `{prefix}handover:{player}:{gw}`,
//!   `{prefix}ack:{player}:{gw}:{epoch}`: one hand-over or migration.
//! - `{prefix}inbox:{gw}`: requests of other gateways to this one.
//!
//! Why one file of this length: each Lua script of the directory stands
//! next to the one call that runs it, and their fencing rules (epochs,
//! idempotent retries, the lapsed-lease claim) read as one protocol.

pub mod placement;
pub mod runtime;
mod store;

pub use store::Store;
use store::{transient, Conn};

use std::time::Duration;

/// What went wrong talking to Redis.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis answered something unexpected: {0}")]
    Protocol(String),
}

/// What a gateway's lease says of it: where to reach it and how loaded it
/// is, for the peers that place players on it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lease {
    /// Its HTTP address (forwarded pushes, migrations).
    pub http: String,
    /// Client connections open.
    pub sessions: u64,
    /// Players held (connected or lingering).
    pub players: u64,
    /// `max_connections` (after the open-files limit).
    pub max_connections: u64,
    /// `max_players` (after the budgets).
    pub max_players: u64,
    /// Draining: it takes no player.
    pub draining: bool,
}

impl Lease {
    /// Players it can still take: the smaller of its free connections and
    /// its free player slots (0 while draining).
    pub fn room(&self) -> u64 {
        if self.draining {
            return 0;
        }
        self.max_connections
            .saturating_sub(self.sessions)
            .min(self.max_players.saturating_sub(self.players))
    }
}

/// A live peer: its id and its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub id: String,
    pub lease: Lease,
}

/// How long a directory call rides out a failover by default.
pub const RETRY_FOR: Duration = Duration::from_secs(3);
/// Pause between two tries.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// The longest a change waits for its replicas.
pub const WAIT_TIMEOUT: Duration = Duration::from_millis(250);

/// What a holder hands over instead of a player's state when it refuses a
/// login's takeover (`on_second_login: RejectNew`, the player online
/// there). No snapshot image starts like this.
pub const HANDOVER_REFUSED: &[u8] = b"\xffslg:refused:already-online";
/// The error a fetch answers then.
pub const ALREADY_ONLINE: &str =
    "the player is online on another gateway (on_second_login: RejectNew)";

/// Lifetime of a gateway's inbox list after its last message.
const INBOX_TTL_MS: u64 = 60_000;

/// The outcome of claiming a player for this gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Nobody held it (or this gateway already did): ours at `epoch`.
    Granted { epoch: u64 },
    /// Its holder's lease had lapsed: ours now, the old holder fenced off.
    TakenOver { epoch: u64, from: String },
    /// Held by a live gateway: it must hand the player over first.
    Held { epoch: u64, by: String },
}

/// Claim KEYS[1] for ARGV[1]. ARGV[2] and ARGV[3], when not empty, name a
/// holder and epoch whose lease the caller saw lapse: held by exactly that,
/// the player is taken over. (The lease is another key, in another slot of
/// a Redis Cluster: the caller checks it between two runs of this script,
/// and the epoch fences off any change in between.)
const CLAIM: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'gw', 'epoch')
local holder = h[1]
local epoch = tonumber(h[2] or '0') or 0
if holder == ARGV[1] then
  return {'granted', tostring(epoch), ''}
end
if not holder or holder == '' then
  epoch = epoch + 1
  redis.call('HSET', KEYS[1], 'gw', ARGV[1], 'epoch', epoch)
  return {'granted', tostring(epoch), ''}
end
if holder == ARGV[2] and tostring(epoch) == ARGV[3] then
  epoch = epoch + 1
  redis.call('HSET', KEYS[1], 'gw', ARGV[1], 'epoch', epoch)
  return {'expired', tostring(epoch), holder}
end
return {'held', tostring(epoch), holder}
"#;

/// Append ARGV[1] to list KEYS[1], which expires ARGV[2] ms after.
const PUSH: &str = r#"
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#;

/// Renew lease KEYS[1] for ARGV[1] ms with the fields that follow (one
/// script: a lease never exists without its TTL).
const RENEW: &str = r#"
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"#;

/// Release KEYS[1] held by ARGV[1] at ARGV[2]; done already (a retry
/// after a lost answer) counts as done.
const RELEASE: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'gw', 'epoch')
if h[1] == ARGV[1] and h[2] == ARGV[2] then
  -- Keep the epoch: it only ever grows, across lives of the player.
  redis.call('HSET', KEYS[1], 'gw', '')
  return 1
end
if h[1] == '' and h[2] == ARGV[2] then
  return 1
end
return 0
"#;

/// Move a player from holder ARGV[1] at epoch ARGV[2] to ARGV[3], raising
/// the epoch: transfer, adoption and take-back are all this one step.
/// A retry whose first run did move it (the answer was lost) finds it
/// moved, at the next epoch, and says so again.
const CAS: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'gw', 'epoch')
if h[1] == ARGV[1] and h[2] == ARGV[2] then
  local epoch = tonumber(h[2]) + 1
  redis.call('HSET', KEYS[1], 'gw', ARGV[3], 'epoch', epoch)
  return epoch
end
if ARGV[1] ~= ARGV[3] and h[1] == ARGV[3] and tonumber(h[2] or '0') == tonumber(ARGV[2]) + 1 then
  return tonumber(h[2])
end
return -1
"#;

/// One gateway's view of the directory (one Redis connection).
pub struct Directory {
    conn: Conn,
    store: Store,
    /// Replicas each change of the directory waits for (`WAIT`), at most
    /// [`WAIT_TIMEOUT`]: a failover then loses no change it acknowledged.
    replicas: u32,
    /// How long a call rides out a failover (reconnecting) before failing.
    retry_for: Duration,
    gateway: String,
    lease: Duration,
    prefix: String,
    claim: redis::Script,
    release: redis::Script,
    cas: redis::Script,
    renew: redis::Script,
    push: redis::Script,
}

impl Directory {
    /// Connect to one Redis server at `url` (`redis://host:port/db`) as
    /// gateway `gateway`.
    pub fn connect(
        url: &str,
        gateway: &str,
        lease: Duration,
        prefix: &str,
    ) -> Result<Directory, DirError> {
        Directory::open(&Store::Server(url.to_string()), gateway, lease, prefix)
    }

    /// Connect to `store` as gateway `gateway`.
    pub fn open(
        store: &Store,
        gateway: &str,
        lease: Duration,
        prefix: &str,
    ) -> Result<Directory, DirError> {
        let replicas = match store {
            Store::Server(_) => 0,
            Store::Sentinel { .. } | Store::Cluster(_) => 1,
        };
        Ok(Directory {
            conn: Conn::open(store)?,
            store: store.clone(),
            replicas,
            retry_for: RETRY_FOR,
            gateway: gateway.to_string(),
            lease,
            prefix: prefix.to_string(),
            claim: redis::Script::new(CLAIM),
            release: redis::Script::new(RELEASE),
            cas: redis::Script::new(CAS),
            renew: redis::Script::new(RENEW),
            push: redis::Script::new(PUSH),
        })
    }

    /// Replicas each change waits for (0: none), and how long a call rides
    /// out a failover.
    pub fn set_durability(&mut self, replicas: u32, retry_for: Duration) {
        self.replicas = replicas;
        self.retry_for = retry_for;
    }

    /// Run `f`, reconnecting and trying again while the store is failing
    /// over (a dropped connection, a demoted master, a cluster that moves
    /// or lost a slot), for up to `retry_for`. Only for calls that may run
    /// twice: every script here is idempotent for its own caller.
    fn retrying<T>(
        &mut self,
        mut f: impl FnMut(&mut Directory) -> Result<T, DirError>,
    ) -> Result<T, DirError> {
        let deadline = std::time::Instant::now() + self.retry_for;
        loop {
            match f(self) {
                Err(DirError::Redis(e))
                    if transient(&e) && std::time::Instant::now() < deadline =>
                {
                    tracing::debug!(error = %e, "cluster: redis failing over; trying again");
                    std::thread::sleep(RETRY_PAUSE);
                    if let Ok(conn) = Conn::open(&self.store) {
                        self.conn = conn;
                    }
                }
                other => return other,
            }
        }
    }

    /// [`replicate`](Self::replicate), its failure logged: the change
    /// happened whether or not WAIT could say it reached a replica, and the
    /// caller must act on it.
    fn replicated(&mut self, key: &str) {
        if let Err(e) = self.replicate(key) {
            tracing::warn!(key, error = %e, "cluster: WAIT for a replica failed; the change stands");
        }
    }

    /// Wait until `key`'s change reached `replicas` replicas (or
    /// [`WAIT_TIMEOUT`] passed: the change stands either way).
    fn replicate(&mut self, key: &str) -> Result<(), DirError> {
        if self.replicas == 0 {
            return Ok(());
        }
        let mut wait = redis::cmd("WAIT");
        wait.arg(self.replicas).arg(WAIT_TIMEOUT.as_millis() as u64);
        let acked: u64 = match &mut self.conn {
            Conn::Node(c) => wait.query(c)?,
            // WAIT names no key: send it to the master of `key`'s slot.
            Conn::Cluster(c) => {
                use redis::cluster_routing::{
                    get_slot, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
                };
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::new(get_slot(key.as_bytes()), SlotAddr::Master),
                ));
                redis::FromRedisValue::from_redis_value(&c.route_command(&wait, route)?)?
            }
        };
        if acked < u64::from(self.replicas) {
            tracing::debug!(
                key,
                acked,
                "cluster: a change reached fewer replicas than asked"
            );
        }
        Ok(())
    }

    /// The key of `player`'s entry: `{player}` is its hash tag, shared by
    /// every key of the player.
    fn player_key(&self, player: u64) -> String {
        format!("{}p:{{{player}}}", self.prefix)
    }

    fn lease_key(&self, id: &str) -> String {
        format!("{}gw:{id}", self.prefix)
    }

    /// Renew this gateway's lease with no load to report (tests, tools).
    pub fn heartbeat(&mut self) -> Result<(), DirError> {
        self.renew(&Lease::default())
    }

    /// Renew this gateway's lease (call every lease/3 or so) with what it
    /// tells its peers, and announce it in the set of gateways.
    pub fn renew(&mut self, lease: &Lease) -> Result<(), DirError> {
        let key = self.lease_key(&self.gateway);
        let ms = self.lease.as_millis().max(1) as u64;
        let fields: [(&str, String); 6] = [
            ("http", lease.http.clone()),
            ("sessions", lease.sessions.to_string()),
            ("players", lease.players.to_string()),
            ("max_connections", lease.max_connections.to_string()),
            ("max_players", lease.max_players.to_string()),
            ("draining", u8::from(lease.draining).to_string()),
        ];
        let mut call = self.renew.key(&key);
        call.arg(ms);
        for (k, v) in &fields {
            call.arg(*k).arg(v);
        }
        call.invoke::<()>(&mut self.conn)?;
        redis::cmd("SADD")
            .arg(format!("{}gateways", self.prefix))
            .arg(&self.gateway)
            .query::<()>(&mut self.conn)?;
        Ok(())
    }

    /// Gateway `id`'s lease, if it is alive.
    pub fn lease_of(&mut self, id: &str) -> Result<Option<Lease>, DirError> {
        let map: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.lease_key(id))
            .query(&mut self.conn)?;
        if map.is_empty() {
            return Ok(None);
        }
        let n = |k: &str| map.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        Ok(Some(Lease {
            http: map.get("http").cloned().unwrap_or_default(),
            sessions: n("sessions"),
            players: n("players"),
            max_connections: n("max_connections"),
            max_players: n("max_players"),
            draining: n("draining") == 1,
        }))
    }

    /// Every other live gateway, with its lease.
    pub fn peer_leases(&mut self) -> Result<Vec<Peer>, DirError> {
        self.retrying(Directory::peer_leases_once)
    }

    fn peer_leases_once(&mut self) -> Result<Vec<Peer>, DirError> {
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(format!("{}gateways", self.prefix))
            .query(&mut self.conn)?;
        let mut out = Vec::new();
        for id in ids {
            if id == self.gateway {
                continue;
            }
            if let Some(lease) = self.lease_of(&id)? {
                out.push(Peer { id, lease });
            }
        }
        Ok(out)
    }

    /// Every other live gateway that announced an HTTP address, with it.
    pub fn peers(&mut self) -> Result<Vec<(String, String)>, DirError> {
        Ok(self
            .peer_leases()?
            .into_iter()
            .filter(|p| !p.lease.http.is_empty())
            .map(|p| (p.id, p.lease.http))
            .collect())
    }

    /// The holders of `players` (None: nobody).
    pub fn holders(&mut self, players: &[u64]) -> Result<Vec<Option<String>>, DirError> {
        self.retrying(|d| d.holders_once(players))
    }

    fn holders_once(&mut self, players: &[u64]) -> Result<Vec<Option<String>>, DirError> {
        let keys: Vec<String> = players.iter().map(|p| self.player_key(*p)).collect();
        let got: Vec<Option<String>> = match &mut self.conn {
            Conn::Node(c) => {
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.cmd("HGET").arg(k).arg("gw");
                }
                pipe.query(c)?
            }
            // Each player's key lives on the node of its slot.
            Conn::Cluster(c) => {
                let mut pipe = redis::cluster::cluster_pipe();
                for k in &keys {
                    pipe.cmd("HGET").arg(k).arg("gw");
                }
                pipe.query(c.as_mut())?
            }
        };
        Ok(got
            .into_iter()
            .map(|g| g.filter(|g| !g.is_empty()))
            .collect())
    }

    /// Whether gateway `id` holds a live lease.
    pub fn alive(&mut self, id: &str) -> Result<bool, DirError> {
        let key = self.lease_key(id);
        Ok(redis::cmd("EXISTS")
            .arg(&key)
            .query::<u64>(&mut self.conn)?
            == 1)
    }

    /// Say that this gateway waits for `player`'s state for `ttl`: a
    /// "take" message read after that is stale and must be ignored.
    pub fn want(&mut self, player: u64, ttl: Duration) -> Result<(), DirError> {
        let key = format!("{}want:{{{player}}}:{}", self.prefix, self.gateway);
        redis::cmd("SET")
            .arg(&key)
            .arg(1)
            .arg("PX")
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1))
            .query::<()>(&mut self.conn)?;
        Ok(())
    }

    /// Whether gateway `by` still waits for `player`'s state (and from now
    /// on no longer: one hand-over per request).
    pub fn wanted(&mut self, player: u64, by: &str) -> Result<bool, DirError> {
        let key = format!("{}want:{{{player}}}:{by}", self.prefix);
        Ok(redis::cmd("DEL").arg(&key).query::<u64>(&mut self.conn)? == 1)
    }

    /// Claim `player` for this gateway.
    pub fn claim(&mut self, player: u64) -> Result<Claim, DirError> {
        // Kept across retries: a lost answer of the run that took the
        // player over from a lapsed holder must still say TakenOver.
        let mut lapsed: Option<(String, u64)> = None;
        let claim = self.retrying(|d| d.claim_settled(player, &mut lapsed))?;
        if !matches!(claim, Claim::Held { .. }) {
            let key = self.player_key(player);
            self.replicated(&key);
        }
        Ok(claim)
    }

    fn claim_settled(
        &mut self,
        player: u64,
        lapsed: &mut Option<(String, u64)>,
    ) -> Result<Claim, DirError> {
        // A holder seen dead may have handed the player on meanwhile: look
        // again, a few times, then report whom it is held by.
        for _ in 0..3 {
            let (by, epoch) = match self.claim_once(player, lapsed.as_ref())? {
                Claim::Held { epoch, by } => (by, epoch),
                // Ours already, one epoch past the lapsed holder's: the
                // takeover happened (its answer was lost to a failover).
                Claim::Granted { epoch } => {
                    return Ok(match lapsed.take() {
                        Some((from, e)) if epoch == e + 1 => Claim::TakenOver { epoch, from },
                        _ => Claim::Granted { epoch },
                    })
                }
                done => return Ok(done),
            };
            if self.alive(&by)? {
                return Ok(Claim::Held { epoch, by });
            }
            *lapsed = Some((by, epoch));
        }
        match lapsed.take() {
            Some((by, epoch)) => Ok(Claim::Held { epoch, by }),
            None => Err(DirError::Protocol("claim did not settle".into())),
        }
    }

    fn claim_once(
        &mut self,
        player: u64,
        lapsed: Option<&(String, u64)>,
    ) -> Result<Claim, DirError> {
        let (dead, dead_epoch) = match lapsed {
            Some((by, epoch)) => (by.as_str(), epoch.to_string()),
            None => ("", String::new()),
        };
        let (kind, epoch, other): (String, String, String) = self
            .claim
            .key(self.player_key(player))
            .arg(&self.gateway)
            .arg(dead)
            .arg(dead_epoch)
            .invoke(&mut self.conn)?;
        let epoch = epoch
            .parse::<u64>()
            .map_err(|_| DirError::Protocol(format!("epoch {epoch:?}")))?;
        match kind.as_str() {
            "granted" => Ok(Claim::Granted { epoch }),
            "expired" => Ok(Claim::TakenOver { epoch, from: other }),
            "held" => Ok(Claim::Held { epoch, by: other }),
            k => Err(DirError::Protocol(format!("claim answered {k:?}"))),
        }
    }

    /// Forget `player` (it ended), if this gateway still holds it at `epoch`.
    pub fn release(&mut self, player: u64, epoch: u64) -> Result<bool, DirError> {
        let key = self.player_key(player);
        let done: i64 = self.retrying(|d| {
            Ok(d.release
                .key(&key)
                .arg(&d.gateway)
                .arg(epoch.to_string())
                .invoke(&mut d.conn)?)
        })?;
        self.replicated(&key);
        Ok(done == 1)
    }

    /// Hand `player` to gateway `to`, if this gateway still holds it at
    /// `epoch`; returns the new epoch, or None when fenced off.
    pub fn transfer(&mut self, player: u64, epoch: u64, to: &str) -> Result<Option<u64>, DirError> {
        let me = self.gateway.clone();
        self.cas(player, &me, epoch, to)
    }

    /// `player` from `holder` at `epoch` to `to`; the new epoch, or None
    /// when the directory says otherwise.
    fn cas(
        &mut self,
        player: u64,
        holder: &str,
        epoch: u64,
        to: &str,
    ) -> Result<Option<u64>, DirError> {
        let key = self.player_key(player);
        let e: i64 = self.retrying(|d| {
            Ok(d.cas
                .key(&key)
                .arg(holder)
                .arg(epoch.to_string())
                .arg(to)
                .invoke(&mut d.conn)?)
        })?;
        self.replicated(&key);
        Ok(u64::try_from(e).ok())
    }

    /// Append `value` to list `key`, which expires `ttl_ms` after (one
    /// script: a Redis Cluster connection takes no pipeline).
    fn push_expiring(&mut self, key: &str, value: &[u8], ttl_ms: u64) -> Result<(), DirError> {
        self.push
            .key(key)
            .arg(value)
            .arg(ttl_ms)
            .invoke::<()>(&mut self.conn)?;
        Ok(())
    }

    /// Leave `msg` in gateway `to`'s inbox.
    pub fn push_inbox(&mut self, to: &str, msg: &str) -> Result<(), DirError> {
        let key = format!("{}inbox:{to}", self.prefix);
        // An inbox of a gateway that is gone does not stay for ever.
        self.push_expiring(&key, msg.as_bytes(), INBOX_TTL_MS)
    }

    /// The next message of this gateway's inbox, waiting up to `wait`.
    pub fn pop_inbox(&mut self, wait: Duration) -> Result<Option<String>, DirError> {
        let key = format!("{}inbox:{}", self.prefix, self.gateway);
        let got: Option<(String, String)> = redis::cmd("BLPOP")
            .arg(&key)
            .arg(wait.as_secs_f64().max(0.01))
            .query(&mut self.conn)?;
        Ok(got.map(|(_, v)| v))
    }

    /// Hand the state of `player` (snapshot bytes; empty: nothing held) to
    /// gateway `to`, which waits for it with [`take_handover`](Self::take_handover).
    pub fn put_handover(&mut self, player: u64, to: &str, bytes: &[u8]) -> Result<(), DirError> {
        let key = format!("{}handover:{{{player}}}:{to}", self.prefix);
        self.push_expiring(&key, bytes, 30_000)
    }

    /// Wait up to `wait` for the state of `player` handed to this gateway.
    pub fn take_handover(
        &mut self,
        player: u64,
        wait: Duration,
    ) -> Result<Option<Vec<u8>>, DirError> {
        let key = format!("{}handover:{{{player}}}:{}", self.prefix, self.gateway);
        let got: Option<(String, Vec<u8>)> = redis::cmd("BLPOP")
            .arg(&key)
            .arg(wait.as_secs_f64().max(0.01))
            .query(&mut self.conn)?;
        Ok(got.map(|(_, v)| v))
    }

    /// Give `player` back from `holder` (at `epoch`) to this gateway: the
    /// rollback of a hand-over the other side never confirmed.
    pub fn take_back(
        &mut self,
        player: u64,
        holder: &str,
        epoch: u64,
    ) -> Result<Option<u64>, DirError> {
        let me = self.gateway.clone();
        self.cas(player, holder, epoch, &me)
    }

    /// Leave `value` on list `key` (expires in 30 s).
    pub fn post(&mut self, key: &str, value: &str) -> Result<(), DirError> {
        let key = format!("{}{key}", self.prefix);
        self.push_expiring(&key, value.as_bytes(), 30_000)
    }

    /// Wait up to `wait` for a value on list `key`.
    pub fn wait_post(&mut self, key: &str, wait: Duration) -> Result<Option<String>, DirError> {
        let key = format!("{}{key}", self.prefix);
        let got: Option<(String, String)> = redis::cmd("BLPOP")
            .arg(&key)
            .arg(wait.as_secs_f64().max(0.01))
            .query(&mut self.conn)?;
        Ok(got.map(|(_, v)| v))
    }

    /// This gateway's name.
    pub fn gateway(&self) -> &str {
        &self.gateway
    }

    /// Who holds `player`, at which epoch.
    pub fn holder(&mut self, player: u64) -> Result<Option<(String, u64)>, DirError> {
        let (gw, epoch): (Option<String>, Option<u64>) = redis::cmd("HMGET")
            .arg(self.player_key(player))
            .arg("gw")
            .arg("epoch")
            .query(&mut self.conn)?;
        Ok(gw.filter(|g| !g.is_empty()).zip(epoch))
    }
}
