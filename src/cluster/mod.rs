//! The cluster's shared state in Redis: which gateway holds each player
//! (with a fencing epoch), and each gateway's lease.
//!
//! It is synchronous on purpose: it runs on control threads of their own
//! ([`runtime`]), bridged to the shards by channels, so no second async
//! runtime touches the data path.
//!
//! Keys (prefix `slg:` by default):
//! - `{prefix}gw:{id}`: the gateway's lease, a value with a TTL of `lease`,
//!   renewed by [`Directory::heartbeat`]. A gateway whose lease lapsed
//!   (partition, pause, crash) holds nothing any more.
//! - `{prefix}p:{player}`: hash `gw` (the holder) and `epoch`, raised by
//!   every change of holder and never reset (a released player keeps it,
//!   with no holder). Every change is a Lua script that checks the
//!   caller still is the holder at the epoch it knows (fencing), so a
//!   gateway acting on stale ownership changes nothing.

pub mod runtime;

use std::time::Duration;

/// What went wrong talking to Redis.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis answered something unexpected: {0}")]
    Protocol(String),
}

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
if redis.call('EXISTS', ARGV[2] .. holder) == 0 then
  epoch = epoch + 1
  redis.call('HSET', KEYS[1], 'gw', ARGV[1], 'epoch', epoch)
  return {'expired', tostring(epoch), holder}
end
return {'held', tostring(epoch), holder}
"#;

const RELEASE: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'gw', 'epoch')
if h[1] == ARGV[1] and h[2] == ARGV[2] then
  -- Keep the epoch: it only ever grows, across lives of the player.
  redis.call('HSET', KEYS[1], 'gw', '')
  return 1
end
return 0
"#;

/// Move a player from holder ARGV[1] at epoch ARGV[2] to ARGV[3], raising
/// the epoch: transfer, adoption and take-back are all this one step.
const CAS: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'gw', 'epoch')
if h[1] == ARGV[1] and h[2] == ARGV[2] then
  local epoch = tonumber(h[2]) + 1
  redis.call('HSET', KEYS[1], 'gw', ARGV[3], 'epoch', epoch)
  return epoch
end
return -1
"#;

/// One gateway's view of the directory (one Redis connection).
pub struct Directory {
    conn: redis::Connection,
    gateway: String,
    lease: Duration,
    prefix: String,
    claim: redis::Script,
    release: redis::Script,
    cas: redis::Script,
}

impl Directory {
    /// Connect to `url` (`redis://host:port/db`) as gateway `gateway`.
    pub fn connect(
        url: &str,
        gateway: &str,
        lease: Duration,
        prefix: &str,
    ) -> Result<Directory, DirError> {
        let client = redis::Client::open(url)?;
        let conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
        // Long enough for the blocking pops (up to 5 s) to answer.
        conn.set_read_timeout(Some(Duration::from_secs(8)))?;
        conn.set_write_timeout(Some(Duration::from_secs(2)))?;
        Ok(Directory {
            conn,
            gateway: gateway.to_string(),
            lease,
            prefix: prefix.to_string(),
            claim: redis::Script::new(CLAIM),
            release: redis::Script::new(RELEASE),
            cas: redis::Script::new(CAS),
        })
    }

    fn player_key(&self, player: u64) -> String {
        format!("{}p:{player}", self.prefix)
    }

    fn gateway_prefix(&self) -> String {
        format!("{}gw:", self.prefix)
    }

    /// Renew this gateway's lease (call every lease/3 or so).
    pub fn heartbeat(&mut self) -> Result<(), DirError> {
        let key = format!("{}{}", self.gateway_prefix(), self.gateway);
        let ms = self.lease.as_millis().max(1) as u64;
        redis::cmd("SET")
            .arg(&key)
            .arg("alive")
            .arg("PX")
            .arg(ms)
            .query::<()>(&mut self.conn)?;
        Ok(())
    }

    /// Announce this gateway and the HTTP address it takes forwarded
    /// pushes on (expires with the lease).
    pub fn register(&mut self, http: &str) -> Result<(), DirError> {
        let ms = self.lease.as_millis().max(1) as u64;
        redis::pipe()
            .cmd("SADD")
            .arg(format!("{}gateways", self.prefix))
            .arg(&self.gateway)
            .ignore()
            .cmd("SET")
            .arg(format!("{}gwhttp:{}", self.prefix, self.gateway))
            .arg(http)
            .arg("PX")
            .arg(ms)
            .ignore()
            .query::<()>(&mut self.conn)?;
        Ok(())
    }

    /// Every other live gateway, with its HTTP address.
    pub fn peers(&mut self) -> Result<Vec<(String, String)>, DirError> {
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(format!("{}gateways", self.prefix))
            .query(&mut self.conn)?;
        let mut out = Vec::new();
        for id in ids.into_iter().filter(|i| *i != self.gateway) {
            let http: Option<String> = redis::cmd("GET")
                .arg(format!("{}gwhttp:{id}", self.prefix))
                .query(&mut self.conn)?;
            if let Some(h) = http {
                out.push((id, h));
            }
        }
        Ok(out)
    }

    /// The holders of `players` (None: nobody).
    pub fn holders(&mut self, players: &[u64]) -> Result<Vec<Option<String>>, DirError> {
        let mut pipe = redis::pipe();
        for p in players {
            pipe.cmd("HGET").arg(self.player_key(*p)).arg("gw");
        }
        let got: Vec<Option<String>> = pipe.query(&mut self.conn)?;
        Ok(got
            .into_iter()
            .map(|g| g.filter(|g| !g.is_empty()))
            .collect())
    }

    /// Whether gateway `id` holds a live lease.
    pub fn alive(&mut self, id: &str) -> Result<bool, DirError> {
        let key = format!("{}{id}", self.gateway_prefix());
        Ok(redis::cmd("EXISTS")
            .arg(&key)
            .query::<u64>(&mut self.conn)?
            == 1)
    }

    /// Say that this gateway waits for `player`'s state for `ttl`: a
    /// "take" message read after that is stale and must be ignored.
    pub fn want(&mut self, player: u64, ttl: Duration) -> Result<(), DirError> {
        let key = format!("{}want:{player}:{}", self.prefix, self.gateway);
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
        let key = format!("{}want:{player}:{by}", self.prefix);
        Ok(redis::cmd("DEL").arg(&key).query::<u64>(&mut self.conn)? == 1)
    }

    /// Claim `player` for this gateway.
    pub fn claim(&mut self, player: u64) -> Result<Claim, DirError> {
        let (kind, epoch, other): (String, String, String) = self
            .claim
            .key(self.player_key(player))
            .arg(&self.gateway)
            .arg(self.gateway_prefix())
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
        let done: i64 = self
            .release
            .key(self.player_key(player))
            .arg(&self.gateway)
            .arg(epoch.to_string())
            .invoke(&mut self.conn)?;
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
        let e: i64 = self
            .cas
            .key(self.player_key(player))
            .arg(holder)
            .arg(epoch.to_string())
            .arg(to)
            .invoke(&mut self.conn)?;
        Ok(u64::try_from(e).ok())
    }

    /// Leave `msg` in gateway `to`'s inbox.
    pub fn push_inbox(&mut self, to: &str, msg: &str) -> Result<(), DirError> {
        let key = format!("{}inbox:{to}", self.prefix);
        // An inbox of a gateway that is gone does not stay for ever.
        redis::pipe()
            .cmd("RPUSH")
            .arg(&key)
            .arg(msg)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(INBOX_TTL_MS)
            .ignore()
            .query::<()>(&mut self.conn)?;
        Ok(())
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
        let key = format!("{}handover:{player}:{to}", self.prefix);
        redis::pipe()
            .cmd("RPUSH")
            .arg(&key)
            .arg(bytes)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(30_000)
            .ignore()
            .query::<()>(&mut self.conn)?;
        Ok(())
    }

    /// Wait up to `wait` for the state of `player` handed to this gateway.
    pub fn take_handover(
        &mut self,
        player: u64,
        wait: Duration,
    ) -> Result<Option<Vec<u8>>, DirError> {
        let key = format!("{}handover:{player}:{}", self.prefix, self.gateway);
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
        redis::pipe()
            .cmd("RPUSH")
            .arg(&key)
            .arg(value)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(30_000)
            .ignore()
            .query::<()>(&mut self.conn)?;
        Ok(())
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
