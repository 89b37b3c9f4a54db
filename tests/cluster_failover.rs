//! Two gateways on a Redis that fails over under them, while players log
//! in, take each other over and receive pushes: a Sentinel failover (the
//! master killed, its replica promoted) and a Redis Cluster master killed
//! (its replica takes its slots). No player is online on two gateways, no
//! login's stream has a gap it did not report (`GAP`), and every push is
//! answered 200 and reaches every player.
//!
//! Needs `redis-server` and `redis-cli`; skips (`SKIPPED: ...` on stderr)
//! without them, and fails instead when `CI` or SLG_REQUIRE_REDIS is set.

mod common;

use common::ha::{Backing, Kind as Store};
use slg_gateway::client::{Client, ClientError};
use slg_gateway::demo::DemoBackend;
use slg_gateway::gateway::Gateway;
use slg_gateway::protocol::Kind;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ECHO: u32 = 100;
/// Longer than any failover here, so no lease lapses during one.
const LEASE: Duration = Duration::from_secs(10);
const STEADY: u64 = 6;

fn gateway(demo: &DemoBackend, redis: &Backing, id: &str) -> Gateway {
    let mut cfg = common::config(demo.addr, 2);
    cfg.listen = format!("127.0.0.1:{}", common::free_port());
    cfg.cluster = Some(redis.cluster_config(id, &cfg.listen, LEASE));
    Gateway::start(cfg).expect("gateway")
}

fn push(addr: SocketAddr, players: &str, body: &str) -> (u16, String) {
    common::http(
        addr,
        "POST",
        &format!("/v1/push?players={players}&msg=7"),
        body.as_bytes(),
    )
}

fn online_on(addr: SocketAddr, player: u64) -> bool {
    let (status, text) = common::http(addr, "GET", &format!("/v1/players/{player}"), b"");
    status == 200 && text.contains("\"online\":true")
}

fn fails_over(kind: Store) {
    let Some(mut redis) = Backing::start(kind) else {
        return;
    };
    let demo = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    let (a, b) = (
        gateway(&demo, &redis, "gw-a"),
        gateway(&demo, &redis, "gw-b"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let gws = [(a.client_addr, a.http_addr), (b.client_addr, b.http_addr)];

    // Steady players, half on each gateway, reading pushes.
    let mut steady: Vec<(u64, Client)> = (1..=STEADY)
        .map(|p| {
            let mut c = Client::connect(gws[p as usize % 2].0).expect("connect");
            c.login_demo(p).expect("login");
            (p, c)
        })
        .collect();
    let list: Vec<String> = (1..=STEADY).map(|p| p.to_string()).collect();
    let list = list.join(",");

    let stop = Arc::new(AtomicBool::new(false));
    // Logins, and takeovers of each player by the other gateway, all along.
    let refused = Arc::new(Mutex::new(0u32));
    let churn = {
        let (stop, refused) = (stop.clone(), refused.clone());
        std::thread::spawn(move || {
            // Each churned player's last seq as its holder promised it.
            let mut last: HashMap<u64, (usize, u64)> = HashMap::new();
            let mut k = 0u64;
            while !stop.load(Ordering::Acquire) {
                let player = 100 + k % 10;
                let on = (k as usize / 10) % 2;
                k += 1;
                let mut c = Client::connect(gws[on].0).expect("connect");
                match c.login_demo(player) {
                    Ok(li) => {
                        // Nothing else is sent to these players: the login's
                        // answer is the next seq after the last one, unless
                        // the login said GAP.
                        if let Some((_, seq)) = last.get(&player) {
                            assert!(
                                li.gap || li.response.header.seq == seq + 1,
                                "player {player}: login answered at seq {} after seq {seq} without GAP",
                                li.response.header.seq
                            );
                        }
                        let r = c.request(ECHO, b"x").expect("echo");
                        last.insert(player, (on, r.header.seq));
                    }
                    Err(ClientError::LoginRejected(_)) => *refused.lock().expect("lock") += 1,
                    Err(e) => panic!("login of {player}: {e}"),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            last
        })
    };
    // Pushes to the steady players through both gateways in turn.
    let pushed = Arc::new(Mutex::new(Vec::new()));
    let pusher = {
        let (stop, pushed, list) = (stop.clone(), pushed.clone(), list.clone());
        std::thread::spawn(move || {
            let mut k = 0usize;
            let mut slowest = Duration::ZERO;
            while !stop.load(Ordering::Acquire) {
                let body = format!("p{k}");
                let t = Instant::now();
                let (status, text) = push(gws[k % 2].1, &list, &body);
                slowest = slowest.max(t.elapsed());
                assert_eq!(status, 200, "push {k}: {text}");
                let v: serde_json::Value = serde_json::from_str(&text).expect("json");
                assert_eq!(
                    (v["delivered"].as_u64(), v["offline"].as_u64()),
                    (Some(STEADY), Some(0)),
                    "push {k} via gateway {}: {text}",
                    k % 2
                );
                pushed.lock().expect("lock").push(body);
                k += 1;
                std::thread::sleep(Duration::from_millis(30));
            }
            slowest
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    let mut victim = None;
    match &mut redis {
        Backing::Sentinel(s) => s.master.kill(),
        Backing::Cluster(c) => {
            let v = c.master_of("slg:p:{1}").expect("a master owns player 1");
            c.nodes[v].kill();
            victim = Some(v);
        }
        Backing::Server(_) => unreachable!("a single server does not fail over"),
    }
    // Through the failover and a while after it.
    common::ha::wait_until(Duration::from_secs(30), "the failover", || match &redis {
        Backing::Cluster(c) => {
            c.healthy() && c.master_of("slg:p:{1}").is_some_and(|m| Some(m) != victim)
        }
        Backing::Sentinel(s) => s.master_port().is_some_and(|p| p == s.replica.port),
        Backing::Server(_) => true,
    });
    eprintln!("{kind:?}: failed over in {:?}", t.elapsed());
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Release);
    let last = churn.join().expect("churn");
    let slowest = pusher.join().expect("pusher");
    let refused = *refused.lock().expect("lock");
    eprintln!("{kind:?}: {refused} logins refused during the failover, slowest push {slowest:?}");

    // Every push reached every steady player, in one gap-free stream.
    let pushed = pushed.lock().expect("lock").clone();
    assert!(pushed.len() > 20, "pushes went on: {}", pushed.len());
    for (p, c) in &mut steady {
        let end = c.ping().expect("ping");
        let mut stream: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        c.timeout = Duration::from_millis(200);
        while let Ok(f) = c.recv() {
            if f.header.kind == Kind::Push {
                stream.insert(f.header.seq, f.body.to_vec());
            }
        }
        let bodies: Vec<String> = stream
            .values()
            .map(|b| String::from_utf8_lossy(b).to_string())
            .collect();
        assert_eq!(bodies, pushed, "player {p}: every push, in order");
        let seqs: Vec<u64> = stream.keys().copied().collect();
        assert_eq!(seqs.last().copied(), Some(end), "player {p}");
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "player {p}: no gap"
        );
    }
    // No player online on both gateways.
    for player in last.keys() {
        let n = [a.http_addr, b.http_addr]
            .iter()
            .filter(|h| online_on(**h, *player))
            .count();
        assert!(n <= 1, "player {player} online on {n} gateways");
    }
    a.stop();
    b.stop();
    demo.stop();
}

#[test]
fn a_sentinel_failover_under_logins_and_pushes_loses_nothing() {
    fails_over(Store::Sentinel);
}

#[test]
fn a_killed_redis_cluster_master_under_logins_and_pushes_loses_nothing() {
    fails_over(Store::Cluster);
}
