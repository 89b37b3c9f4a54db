//! Redis as studios run it, started by the tests on loopback: a Redis
//! Cluster (three masters, a replica each, made with `redis-cli --cluster
//! create`) and a Sentinel setup (a master, a replica, three sentinels).
//! Every process is killed and its scratch directory removed on drop.
//!
//! [`Backing`] is any of them (or one plain server) as a test uses it: the
//! directory's [`Store`] and the gateway's config keys.

use super::{free_port, skip, start_redis, Redis};
use slg_gateway::cluster::Store;
use slg_gateway::config::{ClusterConfig, RedisDown};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One redis-server (node, replica or sentinel) of a setup.
pub struct Node {
    pub child: Option<Child>,
    pub port: u16,
}

impl Node {
    /// Kill it (SIGKILL): a crash, not a shutdown.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn conn(&self) -> Option<redis::Connection> {
        let c = redis::Client::open(self.url()).ok()?;
        let conn = c
            .get_connection_with_timeout(Duration::from_millis(500))
            .ok()?;
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        Some(conn)
    }

    /// `args` as a command to this node; None when it does not answer.
    pub fn query<T: redis::FromRedisValue>(&self, args: &[&str]) -> Option<T> {
        let mut conn = self.conn()?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut conn).ok()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn scratch(what: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("slg-{what}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Start `redis-server` with `args`; None (after [`skip`]) when it is not
/// installed.
#[track_caller]
fn spawn(port: u16, args: &[String]) -> Option<Node> {
    let child = match Command::new("redis-server")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            skip(
                &format!("redis-server could not be started: {e}"),
                Some("SLG_REQUIRE_REDIS"),
            );
            return None;
        }
    };
    let node = Node {
        child: Some(child),
        port,
    };
    wait_until(Duration::from_secs(5), "redis-server to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    Some(node)
}

/// Poll `ok` until it holds; panics after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn base_args(port: u16, dir: &std::path::Path) -> Vec<String> {
    let mut args = super::redis_args(port);
    args.extend(["--dir".to_string(), dir.display().to_string()]);
    args
}

/// A Redis Cluster of three masters with a replica each.
pub struct RedisCluster {
    pub nodes: Vec<Node>,
    dir: PathBuf,
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl RedisCluster {
    /// Seed URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    /// Index of the node that is master of `key`'s slot now.
    pub fn master_of(&self, key: &str) -> Option<usize> {
        let slot = redis::cluster_routing::get_slot(key.as_bytes()) as i64;
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            let Some(text) = n.query::<String>(&["CLUSTER", "NODES"]) else {
                continue;
            };
            for line in text.lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                    continue;
                }
                let port = f[1]
                    .split(['@', ':'])
                    .nth(1)
                    .and_then(|p| p.parse::<u16>().ok());
                let owns = f[8..].iter().any(|r| {
                    let mut ends = r.split('-').filter_map(|x| x.parse::<i64>().ok());
                    match (ends.next(), ends.next()) {
                        (Some(a), Some(b)) => (a..=b).contains(&slot),
                        (Some(a), None) => a == slot,
                        _ => false,
                    }
                });
                if owns {
                    return self.nodes.iter().position(|n| Some(n.port) == port);
                }
            }
            return None;
        }
        None
    }

    /// Whether node `i` is a master now.
    pub fn is_master(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
            && self.nodes[i]
                .query::<String>(&["INFO", "replication"])
                .is_some_and(|t| t.contains("role:master"))
    }

    /// How many slots node `i` owns.
    pub fn slots_of(&self, i: usize) -> u32 {
        let Some(id) = self.id_of(i) else { return 0 };
        let text: String = self.nodes[i]
            .query(&["CLUSTER", "NODES"])
            .unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(&id))
            .flat_map(|l| {
                l.split_whitespace()
                    .skip(8)
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .map(|r| {
                let mut ends = r.split('-').filter_map(|x| x.parse::<u32>().ok());
                match (ends.next(), ends.next()) {
                    (Some(a), Some(b)) => b - a + 1,
                    (Some(_), None) => 1,
                    _ => 0,
                }
            })
            .sum()
    }

    /// The node id (CLUSTER MYID) of node `i`.
    pub fn id_of(&self, i: usize) -> Option<String> {
        self.nodes[i].query(&["CLUSTER", "MYID"])
    }

    /// Move `slots` slots (the lowest first) from node `from` to node `to`
    /// with `redis-cli --cluster reshard`: the keys move with them, and
    /// clients meanwhile get ASK and MOVED.
    pub fn reshard(&self, from: usize, to: usize, slots: u32) {
        let (Some(f), Some(t)) = (self.id_of(from), self.id_of(to)) else {
            panic!("node ids of {from} and {to}");
        };
        let out = Command::new("redis-cli")
            .args([
                "--cluster",
                "reshard",
                &format!("127.0.0.1:{}", self.nodes[from].port),
                "--cluster-from",
                &f,
                "--cluster-to",
                &t,
                "--cluster-slots",
                &slots.to_string(),
                "--cluster-yes",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "reshard: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Whether every live node says the cluster is whole.
    pub fn healthy(&self) -> bool {
        self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
            n.query::<String>(&["CLUSTER", "INFO"])
                .is_some_and(|i| i.contains("cluster_state:ok"))
        })
    }
}

/// Start a Redis Cluster (3 masters, 3 replicas, node timeout 1 s).
#[track_caller]
pub fn start_redis_cluster() -> Option<RedisCluster> {
    let dir = scratch("rcluster");
    let mut nodes = Vec::new();
    for i in 0..6 {
        let port = free_port();
        let mut args = base_args(port, &dir);
        args.extend(
            [
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &free_port().to_string(),
                "--cluster-config-file",
                &dir.join(format!("nodes-{i}.conf")).display().to_string(),
                "--cluster-node-timeout",
                "1000",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        nodes.push(spawn(port, &args)?);
    }
    let mut create = Command::new("redis-cli");
    create.arg("--cluster").arg("create");
    for n in &nodes {
        create.arg(format!("127.0.0.1:{}", n.port));
    }
    let out = match create
        .args(["--cluster-replicas", "1", "--cluster-yes"])
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            skip(
                &format!("redis-cli could not be started: {e}"),
                Some("SLG_REQUIRE_REDIS"),
            );
            return None;
        }
    };
    assert!(
        out.status.success(),
        "redis-cli --cluster create: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let cluster = RedisCluster { nodes, dir };
    wait_until(Duration::from_secs(20), "the Redis Cluster to form", || {
        cluster.healthy()
    });
    // Replicas in sync, so a killed master fails over.
    wait_until(Duration::from_secs(20), "the replicas to sync", || {
        cluster.nodes.iter().all(|n| {
            n.query::<String>(&["INFO", "replication"])
                .is_some_and(|i| {
                    i.contains("role:master") && i.contains("connected_slaves:1")
                        || i.contains("master_link_status:up")
                })
        })
    });
    Some(cluster)
}

/// A master, its replica and three sentinels (quorum 2, down after 1 s).
pub struct RedisSentinel {
    pub master: Node,
    pub replica: Node,
    pub sentinels: Vec<Node>,
    dir: PathBuf,
}

/// The master's name in the sentinels' config.
pub const MASTER_NAME: &str = "slgmaster";

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        self.master.kill();
        self.replica.kill();
        for s in &mut self.sentinels {
            s.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl RedisSentinel {
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(Node::url).collect()
    }

    /// The port of the master the sentinels name now.
    pub fn master_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|s| {
            let (_, port): (String, String) =
                s.query(&["SENTINEL", "get-master-addr-by-name", MASTER_NAME])?;
            port.parse().ok()
        })
    }
}

/// Start a Sentinel setup; returns once the sentinels know the master, its
/// replica and each other (so a failover can happen).
#[track_caller]
pub fn start_redis_sentinel() -> Option<RedisSentinel> {
    let dir = scratch("rsentinel");
    let mport = free_port();
    let master = spawn(mport, &base_args(mport, &dir))?;
    let rport = free_port();
    let mut rargs = base_args(rport, &dir);
    rargs.extend([
        "--replicaof".to_string(),
        "127.0.0.1".into(),
        mport.to_string(),
    ]);
    let replica = spawn(rport, &rargs)?;
    let mut sentinels = Vec::new();
    for _ in 0..3 {
        let port = free_port();
        let conf = dir.join(format!("sentinel-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {mport} 2\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                 sentinel failover-timeout {MASTER_NAME} 4000\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n",
                dir.display()
            ),
        )
        .expect("sentinel conf");
        sentinels.push(spawn(
            port,
            &[conf.display().to_string(), "--sentinel".into()],
        )?);
    }
    let setup = RedisSentinel {
        master,
        replica,
        sentinels,
        dir,
    };
    wait_until(
        Duration::from_secs(20),
        "the sentinels to know the replica and each other",
        || {
            setup.sentinels.iter().all(|s| {
                let replicas: Vec<redis::Value> = s
                    .query(&["SENTINEL", "replicas", MASTER_NAME])
                    .unwrap_or_default();
                let others: Vec<redis::Value> = s
                    .query(&["SENTINEL", "sentinels", MASTER_NAME])
                    .unwrap_or_default();
                replicas.len() == 1 && others.len() == 2
            })
        },
    );
    wait_until(Duration::from_secs(10), "the replica to sync", || {
        setup
            .replica
            .query::<String>(&["INFO", "replication"])
            .is_some_and(|i| i.contains("master_link_status:up"))
    });
    Some(setup)
}

/// The Redis a cluster test runs on.
pub enum Backing {
    Server(Redis),
    Cluster(RedisCluster),
    Sentinel(RedisSentinel),
}

/// Which kind of Redis to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Server,
    Cluster,
    Sentinel,
}

impl Backing {
    /// Start one of `kind`; None (after [`skip`]) without redis-server.
    #[track_caller]
    pub fn start(kind: Kind) -> Option<Backing> {
        Some(match kind {
            Kind::Server => Backing::Server(start_redis()?),
            Kind::Cluster => Backing::Cluster(start_redis_cluster()?),
            Kind::Sentinel => Backing::Sentinel(start_redis_sentinel()?),
        })
    }

    /// The directory's store.
    pub fn store(&self) -> Store {
        match self {
            Backing::Server(r) => Store::Server(r.url()),
            Backing::Cluster(c) => Store::Cluster(c.urls()),
            Backing::Sentinel(s) => Store::Sentinel {
                master: MASTER_NAME.into(),
                sentinels: s.sentinel_urls(),
                password: None,
                db: 0,
            },
        }
    }

    /// A gateway's cluster config on this Redis.
    pub fn cluster_config(&self, id: &str, advertise: &str, lease: Duration) -> ClusterConfig {
        let mut c = ClusterConfig {
            redis: String::new(),
            redis_sentinel: None,
            redis_cluster: Vec::new(),
            wait_replicas: None,
            gateway_id: id.into(),
            advertise: advertise.into(),
            http_advertise: None,
            ws_advertise: None,
            lease,
            prefix: "slg:".into(),
            when_redis_down: RedisDown::Refuse,
            migrate_parallel: 16,
            migrate_rate: None,
            evacuate_on_drain: false,
        };
        match self.store() {
            Store::Server(url) => c.redis = url,
            Store::Cluster(nodes) => c.redis_cluster = nodes,
            Store::Sentinel {
                master, sentinels, ..
            } => {
                c.redis_sentinel = Some(slg_gateway::config::SentinelConfig {
                    master,
                    sentinels,
                    password: None,
                    db: 0,
                })
            }
        }
        c
    }

    /// Kill every Redis process (the whole store goes away).
    pub fn kill_all(&mut self) {
        match self {
            Backing::Server(r) => {
                let _ = r.child.kill();
                let _ = r.child.wait();
            }
            Backing::Cluster(c) => c.nodes.iter_mut().for_each(Node::kill),
            Backing::Sentinel(s) => {
                s.master.kill();
                s.replica.kill();
                s.sentinels.iter_mut().for_each(Node::kill);
            }
        }
    }
}
