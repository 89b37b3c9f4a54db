//! Where the directory lives (one Redis server, a master under Sentinel,
//! or a Redis Cluster), and the one connection type the directory's calls
//! use on any of them.

use super::DirError;
use std::time::Duration;

/// Where the directory lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    /// One Redis server, `redis://host:port/db`.
    Server(String),
    /// The master that Redis Sentinel names `master`, asked of `sentinels`
    /// (`redis://host:port` each) at every (re)connection, so a failover is
    /// followed by the next reconnect.
    Sentinel {
        master: String,
        sentinels: Vec<String>,
        password: Option<String>,
        db: i64,
    },
    /// A Redis Cluster, found from any of its `nodes` (`redis://host:port`).
    Cluster(Vec<String>),
}

impl Store {
    /// The store a cluster config names.
    pub fn of(cfg: &crate::config::ClusterConfig) -> Store {
        if let Some(s) = &cfg.redis_sentinel {
            Store::Sentinel {
                master: s.master.clone(),
                sentinels: s.sentinels.clone(),
                password: s.password.clone(),
                db: s.db,
            }
        } else if !cfg.redis_cluster.is_empty() {
            Store::Cluster(cfg.redis_cluster.clone())
        } else {
            Store::Server(cfg.redis.clone())
        }
    }
}

/// How long connecting to a Redis node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one answer may take: long enough for the blocking pops (up to
/// 5 s) to answer.
const READ_TIMEOUT: Duration = Duration::from_secs(8);

/// A connection to the store: one node (a server, or Sentinel's master),
/// or a Redis Cluster (routed by key, following MOVED and ASK).
pub(super) enum Conn {
    Node(redis::Connection),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl Conn {
    pub(super) fn open(store: &Store) -> Result<Conn, DirError> {
        let node = |client: redis::Client| -> Result<Conn, DirError> {
            let conn = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
            conn.set_read_timeout(Some(READ_TIMEOUT))?;
            conn.set_write_timeout(Some(CONNECT_TIMEOUT))?;
            Ok(Conn::Node(conn))
        };
        match store {
            Store::Server(url) => node(redis::Client::open(url.as_str())?),
            Store::Sentinel {
                master,
                sentinels,
                password,
                db,
            } => {
                let mut sentinel = redis::sentinel::Sentinel::build(sentinels.clone())?;
                let info = redis::sentinel::SentinelNodeConnectionInfo {
                    tls_mode: None,
                    redis_connection_info: Some(redis::RedisConnectionInfo {
                        db: *db,
                        password: password.clone(),
                        ..Default::default()
                    }),
                };
                // Sentinel names the master it believes in and the crate
                // checks its ROLE: a demoted master is never written to.
                node(sentinel.master_for(master, Some(&info))?)
            }
            Store::Cluster(nodes) => {
                let client = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(READ_TIMEOUT)
                    .build()?;
                Ok(Conn::Cluster(Box::new(client.get_connection()?)))
            }
        }
    }
}

impl redis::ConnectionLike for Conn {
    fn req_packed_command(&mut self, cmd: &[u8]) -> redis::RedisResult<redis::Value> {
        match self {
            Conn::Node(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> redis::RedisResult<Vec<redis::Value>> {
        match self {
            Conn::Node(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn req_command(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<redis::Value> {
        match self {
            Conn::Node(c) => c.req_command(cmd),
            Conn::Cluster(c) => c.req_command(cmd),
        }
    }

    fn supports_pipelining(&self) -> bool {
        match self {
            Conn::Node(c) => c.supports_pipelining(),
            Conn::Cluster(c) => c.supports_pipelining(),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Node(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }

    fn check_connection(&mut self) -> bool {
        match self {
            Conn::Node(c) => c.check_connection(),
            Conn::Cluster(c) => c.check_connection(),
        }
    }

    fn is_open(&self) -> bool {
        match self {
            Conn::Node(c) => c.is_open(),
            Conn::Cluster(c) => c.is_open(),
        }
    }
}

/// Errors of a store failing over or moving: worth another try on a new
/// connection.
pub(super) fn transient(e: &redis::RedisError) -> bool {
    use redis::ErrorKind as K;
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            K::ReadOnly
                | K::MasterDown
                | K::ClusterDown
                | K::TryAgain
                | K::BusyLoadingError
                | K::Moved
                | K::Ask
                | K::MasterNameNotFoundBySentinel
        )
}
