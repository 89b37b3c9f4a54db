//! A cluster that places players itself: evacuation and migration without
//! a named target (by the room each peer's lease reports), a target that
//! fails skipped, paced evacuations with progress and cancellation, the
//! migration steps in `/metrics`, and a rolling restart of three gateways
//! under load in which no player sees a restart.
//!
//! Needs `redis-server`; skips (`SKIPPED: ...` on stderr) without it, and
//! fails instead when `CI` or SLG_REQUIRE_REDIS is set (.ci/run sets both).

mod common;

use common::ha::{Backing, Kind as Store};
use slg_gateway::client::Client;
use slg_gateway::config::Config;
use slg_gateway::demo::DemoBackend;
use slg_gateway::gateway::Gateway;
use slg_gateway::protocol::{parse_redirect_body, Header, Kind};
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ECHO: u32 = 100;
const LEASE: Duration = Duration::from_secs(2);

/// Where a gateway of these tests listens: fixed, so it can restart there.
#[derive(Clone)]
struct Spot {
    id: String,
    client: String,
    http: String,
}

impl Spot {
    fn new(id: &str) -> Spot {
        Spot {
            id: id.into(),
            client: format!("127.0.0.1:{}", common::free_port()),
            http: format!("127.0.0.1:{}", common::free_port()),
        }
    }

    fn http_addr(&self) -> SocketAddr {
        self.http.parse().expect("addr")
    }
}

fn start(
    demo: &DemoBackend,
    redis: &Backing,
    spot: &Spot,
    tune: impl FnOnce(&mut Config),
) -> Gateway {
    let mut cfg = common::config(demo.addr, 2);
    cfg.listen = spot.client.clone();
    cfg.http_listen = spot.http.clone();
    cfg.cluster = Some(redis.cluster_config(&spot.id, &spot.client, LEASE));
    tune(&mut cfg);
    // A restart may find the old listener's port still closing.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Gateway::start(cfg.clone()) {
            Ok(g) => return g,
            Err(e) if Instant::now() < deadline => {
                eprintln!("start {}: {e}; retrying", spot.id);
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("start {}: {e}", spot.id),
        }
    }
}

/// One HTTP request; None when the gateway cannot be reached or does not
/// answer within 15 s (a request caught by a gateway stopping is never
/// answered: in a process of its own the exit would close it).
fn try_http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(15))).ok()?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// A metric's value in a `/metrics` text (0 when absent).
fn metric(addr: SocketAddr, series: &str) -> f64 {
    let (_, text) = try_http(addr, "GET", "/metrics", b"").expect("metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// What a player saw: its stream by seq (kind, req_id, body), the requests
/// it sent, how many times it was redirected, and the gateways it was on.
struct Seen {
    player: u64,
    end: u64,
    stream: BTreeMap<u64, (Kind, u32, Vec<u8>)>,
    sent: Vec<u32>,
    redirects: u32,
    addrs: Vec<String>,
}

/// A player that logs in at `addr` and sends echo requests until `stop`,
/// following every REDIRECT (resume at the target, replay, resend what was
/// never read). Any KICK or refusal fails the test: nobody sees a restart.
fn player(player: u64, addr: String, stop: Arc<AtomicBool>, ready: Arc<AtomicU64>) -> Seen {
    let mut c = Client::connect(addr.parse().expect("addr")).expect("connect");
    let li = c.login_demo(player).expect("login");
    ready.fetch_add(1, Ordering::AcqRel);
    let mut seen = Seen {
        player,
        end: 0,
        stream: BTreeMap::new(),
        sent: Vec::new(),
        redirects: 0,
        addrs: vec![addr],
    };
    let record = |seen: &mut Seen, f: &slg_gateway::protocol::Frame| {
        if f.header.seq > 0 && matches!(f.header.kind, Kind::Response | Kind::Push) {
            let old = seen.stream.insert(
                f.header.seq,
                (f.header.kind, f.header.req_id, f.body.to_vec()),
            );
            assert!(old.is_none(), "player {player}: seq {} twice", f.header.seq);
        }
    };
    record(&mut seen, &li.response);
    while !stop.load(Ordering::Acquire) {
        let req = c
            .send_request(ECHO, format!("{player}").as_bytes())
            .expect("send");
        seen.sent.push(req);
        loop {
            let f = c.recv().unwrap_or_else(|e| panic!("player {player}: {e}"));
            record(&mut seen, &f);
            if f.header.kind == Kind::Response && f.header.req_id == req {
                break;
            }
            assert_ne!(
                f.header.kind,
                Kind::Kick,
                "player {player} was kicked: {:?}",
                String::from_utf8_lossy(&f.body)
            );
            if f.header.kind != Kind::Redirect {
                continue;
            }
            seen.redirects += 1;
            let (to, t) = parse_redirect_body(&f.body).expect("redirect body");
            seen.addrs.push(to.to_string());
            let (last, next) = (c.last_seq, c.next_req_id());
            let mut n = Client::connect(to.parse().expect("addr")).expect("connect target");
            n.set_next_req_id(next);
            n.resume(t, last)
                .unwrap_or_else(|e| panic!("player {player}: resume at {to}: {e}"));
            // Replays come before the PONG.
            let mut h = Header::new(Kind::Ping);
            h.seq = last;
            n.send(&h, &[]).expect("ping");
            let mut answered = false;
            loop {
                let f = n.recv().expect("replay");
                record(&mut seen, &f);
                answered |= f.header.kind == Kind::Response && f.header.req_id == req;
                if f.header.kind == Kind::Pong {
                    break;
                }
            }
            c = n;
            if answered {
                break;
            }
            // The source never read it: the same req_id again.
            let mut h = Header::new(Kind::Request);
            h.msg_id = ECHO;
            h.req_id = req;
            c.send(&h, format!("{player}").as_bytes()).expect("resend");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    seen.end = c.ping().expect("final ping");
    c.timeout = Duration::from_millis(50);
    while let Ok(f) = c.recv() {
        record(&mut seen, &f);
    }
    seen
}

/// Every player's stream is 1..=end, each request answered once, each
/// push in `pushed` there.
fn check_streams(seen: &[Seen], pushed: &HashSet<Vec<u8>>) {
    for s in seen {
        let player = s.player;
        let seqs: Vec<u64> = s.stream.keys().copied().collect();
        assert_eq!(
            seqs,
            (1..=s.end).collect::<Vec<_>>(),
            "player {player}: stream"
        );
        for req in &s.sent {
            let n = s
                .stream
                .values()
                .filter(|(k, r, _)| *k == Kind::Response && r == req)
                .count();
            assert_eq!(n, 1, "player {player}: req {req} answered {n} times");
        }
        let got: HashSet<&Vec<u8>> = s
            .stream
            .values()
            .filter(|(k, _, _)| *k == Kind::Push)
            .map(|(_, _, b)| b)
            .collect();
        for p in pushed {
            assert!(
                got.contains(p),
                "player {player}: {} lost",
                String::from_utf8_lossy(p)
            );
        }
    }
}

/// Logged-in players on `addr`, waiting for their REDIRECT (no traffic).
fn idle_players(addr: SocketAddr, ids: std::ops::Range<u64>) -> Vec<(u64, Client)> {
    ids.map(|p| {
        let mut c = Client::connect(addr).expect("connect");
        c.login_demo(p).expect("login");
        (p, c)
    })
    .collect()
}

/// Each client's REDIRECT, its resume at the target, and the target's
/// address.
fn follow(clients: Vec<(u64, Client)>) -> Vec<(u64, String)> {
    clients
        .into_iter()
        .map(|(p, mut c)| {
            let f = c
                .wait_for(|f| f.header.kind == Kind::Redirect)
                .unwrap_or_else(|e| panic!("player {p}: no redirect: {e}"));
            let (to, token) = parse_redirect_body(&f.body).expect("redirect");
            let last = c.last_seq;
            let mut n = Client::connect(to.parse().expect("addr")).expect("connect target");
            n.resume(token, last)
                .unwrap_or_else(|e| panic!("player {p}: resume at {to}: {e}"));
            assert_eq!(n.request(ECHO, b"here").expect("echo").header.code, 0);
            (p, to.to_string())
        })
        .collect()
}

#[test]
fn evacuation_spreads_players_by_room_and_skips_a_failing_target() {
    common::test_log();
    let Some(redis) = Backing::start(Store::Server) else {
        return;
    };
    let demo = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    let (sa, sb, sc) = (Spot::new("gw-a"), Spot::new("gw-b"), Spot::new("gw-c"));
    let a = start(&demo, &redis, &sa, |_| {});
    let b = start(&demo, &redis, &sb, |c| c.max_players = 1000);
    let c = start(&demo, &redis, &sc, |c| c.max_players = 3000);
    let d = start(&demo, &redis, &Spot::new("gw-d"), |c| {
        c.max_players = 50_000
    });
    // A peer whose lease claims the most room but which never adopts
    // anything (its HTTP port is closed): the first migrations to it fail,
    // and then it is skipped.
    let mut ghost = slg_gateway::cluster::Directory::open(
        &redis.store(),
        "gw-x",
        Duration::from_secs(60),
        "slg:",
    )
    .expect("directory");
    ghost
        .renew(&slg_gateway::cluster::Lease {
            http: format!("127.0.0.1:{}", common::free_port()),
            sessions: 0,
            players: 0,
            max_connections: 100_000,
            max_players: 100_000,
            draining: false,
        })
        .expect("ghost lease");
    // gw-d drains: it is no target, whatever its room.
    let (dtx, drx) = flume::unbounded();
    drop(dtx);
    let drained = std::thread::spawn(move || d.drain(&drx));
    std::thread::sleep(LEASE);
    let clients = idle_players(a.client_addr, 1..41);
    let (status, text) = try_http(a.http_addr, "POST", "/v1/evacuate", b"").expect("evacuate");
    assert_eq!(status, 200, "{text}");
    let v = json(&text);
    assert_eq!(
        (v["migrated"].as_u64(), v["failed"].as_u64()),
        (Some(40), Some(0)),
        "{text}"
    );
    let targets = v["evacuation"]["targets"]
        .as_array()
        .expect("targets")
        .clone();
    let by = |id: &str| targets.iter().find(|t| t["id"] == id).cloned();
    assert!(by("gw-d").is_none(), "a draining peer is no target: {text}");
    let x = by("gw-x").expect("the ghost was a target");
    assert_eq!(
        (x["failed"].as_bool(), x["moved"].as_u64()),
        (Some(true), Some(0)),
        "{text}"
    );
    let (nb, nc) = (
        by("gw-b").and_then(|t| t["moved"].as_u64()).unwrap_or(0),
        by("gw-c").and_then(|t| t["moved"].as_u64()).unwrap_or(0),
    );
    assert_eq!(nb + nc, 40, "{text}");
    assert!(
        (8..=12).contains(&nb),
        "gw-b (room 1000) took {nb} of 40, gw-c (3000) {nc}: {text}"
    );
    // Every client was sent to where the directory put it, and resumed.
    let moved = follow(clients);
    let to_b = moved.iter().filter(|(_, to)| *to == sb.client).count() as u64;
    assert_eq!(to_b, nb);
    assert!(moved
        .iter()
        .all(|(_, to)| *to == sb.client || *to == sc.client));
    // The failures were counted by step.
    assert!(
        metric(
            a.http_addr,
            "slg_migration_step_failures_total{step=\"confirm\",reason=\"target_timeout\"}"
        ) >= 1.0
    );
    assert!(
        metric(
            sc.http_addr(),
            "slg_migration_step_seconds_count{step=\"adopt\"}"
        ) >= nc as f64 - 0.5
    );
    drop(ghost);
    assert!(drained.join().expect("drain").clean);
    a.stop();
    b.stop();
    c.stop();
    demo.stop();
}

#[test]
fn a_migration_without_a_target_goes_to_the_peer_with_most_room_and_is_measured() {
    let Some(redis) = Backing::start(Store::Server) else {
        return;
    };
    let demo = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    let (sa, sb, sc) = (Spot::new("gw-a"), Spot::new("gw-b"), Spot::new("gw-c"));
    let a = start(&demo, &redis, &sa, |_| {});
    let b = start(&demo, &redis, &sb, |c| c.max_players = 10);
    let c = start(&demo, &redis, &sc, |c| c.max_players = 1000);
    std::thread::sleep(LEASE);
    let clients = idle_players(a.client_addr, 7..8);
    let (status, text) =
        try_http(a.http_addr, "POST", "/v1/migrate?player=7", b"").expect("migrate");
    assert_eq!(status, 200, "{text}");
    assert_eq!(json(&text)["to"], "gw-c", "{text}");
    assert_eq!(follow(clients)[0].1, sc.client);
    for step in ["hold", "wait_inflight", "transfer", "confirm", "redirect"] {
        let n = metric(
            a.http_addr,
            &format!("slg_migration_step_seconds_count{{step=\"{step}\"}}"),
        );
        assert_eq!(n, 1.0, "step {step} on the source");
    }
    assert_eq!(
        metric(
            sc.http_addr(),
            "slg_migration_step_seconds_count{step=\"adopt\"}"
        ),
        1.0
    );
    // A player that is not here fails at its first step, and says why.
    let (status, _) = try_http(a.http_addr, "POST", "/v1/migrate?player=99", b"").expect("migrate");
    assert_eq!(status, 409);
    assert_eq!(
        metric(
            a.http_addr,
            "slg_migration_step_failures_total{step=\"hold\",reason=\"not_held\"}"
        ),
        1.0
    );
    a.stop();
    b.stop();
    c.stop();
    demo.stop();
}

#[test]
fn a_paced_evacuation_reports_its_progress_and_can_be_cancelled() {
    let Some(redis) = Backing::start(Store::Server) else {
        return;
    };
    let demo = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    let (sa, sb) = (Spot::new("gw-a"), Spot::new("gw-b"));
    let a = start(&demo, &redis, &sa, |c| {
        if let Some(cl) = c.cluster.as_mut() {
            cl.migrate_rate = Some(5);
        }
    });
    let b = start(&demo, &redis, &sb, |_| {});
    std::thread::sleep(LEASE);
    let (status, _) = try_http(a.http_addr, "GET", "/v1/evacuation", b"").expect("get");
    assert_eq!(status, 404, "none has run yet");
    let _clients = idle_players(a.client_addr, 1..31);
    let t = Instant::now();
    let (status, text) =
        try_http(a.http_addr, "POST", "/v1/evacuate?to=gw-b&wait=false", b"").expect("evacuate");
    assert_eq!(status, 202, "{text}");
    assert_eq!(json(&text)["state"], "running");
    let (status, _) = try_http(a.http_addr, "POST", "/v1/evacuate?to=gw-b", b"").expect("again");
    assert_eq!(status, 409, "one evacuation at a time");
    std::thread::sleep(Duration::from_millis(1500));
    let (_, text) = try_http(a.http_addr, "GET", "/v1/evacuation", b"").expect("get");
    let v = json(&text);
    assert_eq!(
        (v["state"].as_str(), v["total"].as_u64()),
        (Some("running"), Some(30)),
        "{text}"
    );
    let moved = v["moved"].as_u64().unwrap_or(0);
    // 5 a second: about 8 by now (two shards start at once), never all.
    assert!((2..=14).contains(&moved), "{text}");
    let (status, _) = try_http(a.http_addr, "DELETE", "/v1/evacuation", b"").expect("cancel");
    assert_eq!(status, 200);
    common::ha::wait_until(Duration::from_secs(10), "the cancellation", || {
        try_http(a.http_addr, "GET", "/v1/evacuation", b"")
            .is_some_and(|(_, t)| json(&t)["state"] == "cancelled")
    });
    let (_, text) = try_http(a.http_addr, "GET", "/v1/evacuation", b"").expect("get");
    let v = json(&text);
    let (moved, left) = (
        v["moved"].as_u64().unwrap_or(0),
        v["left"].as_u64().unwrap_or(0),
    );
    assert!(left >= 10 && moved + left == 30, "{text}");
    let rate = moved as f64 / t.elapsed().as_secs_f64();
    assert!(rate < 8.0, "paced at 5/s: {rate:.1}/s ({text})");
    a.stop();
    b.stop();
    demo.stop();
}

#[test]
fn a_rolling_restart_under_load_moves_every_player_and_loses_nothing() {
    common::test_log();
    let Some(redis) = Backing::start(Store::Server) else {
        return;
    };
    let demo = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    let spots = [Spot::new("gw-a"), Spot::new("gw-b"), Spot::new("gw-c")];
    let tune = |c: &mut Config| {
        c.drain_timeout = Duration::from_secs(20);
        if let Some(cl) = c.cluster.as_mut() {
            cl.evacuate_on_drain = true;
        }
    };
    let mut gws: Vec<Option<Gateway>> = spots
        .iter()
        .map(|s| Some(start(&demo, &redis, s, tune)))
        .collect();
    std::thread::sleep(LEASE);
    const PLAYERS: u64 = 12;
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicU64::new(0));
    let players: Vec<_> = (0..PLAYERS)
        .map(|i| {
            let (stop, ready) = (stop.clone(), ready.clone());
            let addr = spots[i as usize % 3].client.clone();
            std::thread::spawn(move || player(500 + i, addr, stop, ready))
        })
        .collect();
    while ready.load(Ordering::Acquire) < PLAYERS {
        std::thread::sleep(Duration::from_millis(5));
    }
    // Pushes to every player through any gateway that answers; a 503 (a
    // gateway draining) or no answer goes to the next one: such a push was
    // delivered to nobody, so sending it again doubles nothing.
    let pushed = Arc::new(Mutex::new(HashSet::new()));
    let pusher = {
        let (stop, pushed) = (stop.clone(), pushed.clone());
        let https: Vec<SocketAddr> = spots.iter().map(Spot::http_addr).collect();
        std::thread::spawn(move || {
            let list: Vec<String> = (0..PLAYERS).map(|i| (500 + i).to_string()).collect();
            let mut k = 0usize;
            let mut via = 0usize;
            while !stop.load(Ordering::Acquire) {
                let body = format!("push-{k}");
                let path = format!("/v1/push?players={}&msg=5", list.join(","));
                let deadline = Instant::now() + Duration::from_secs(40);
                loop {
                    assert!(Instant::now() < deadline, "push {k}: no gateway took it");
                    via = (via + 1) % https.len();
                    let t = Instant::now();
                    let got = try_http(https[via], "POST", &path, body.as_bytes());
                    if t.elapsed() > Duration::from_secs(1) {
                        eprintln!(
                            "push {k} via {}: {:?} after {:?}",
                            https[via],
                            got,
                            t.elapsed()
                        );
                    }
                    match got {
                        Some((200, text)) => {
                            let v = json(&text);
                            assert_eq!(
                                v["offline"].as_u64(),
                                Some(0),
                                "push {k} via {}: {text}",
                                https[via]
                            );
                            assert_eq!(
                                v["delivered"].as_u64().unwrap_or(0)
                                    + v["cached"].as_u64().unwrap_or(0),
                                PLAYERS,
                                "push {k}: {text}"
                            );
                            break;
                        }
                        Some((503, _)) | None => std::thread::sleep(Duration::from_millis(20)),
                        Some((s, text)) => panic!("push {k}: {s} {text}"),
                    }
                }
                pushed.lock().expect("lock").insert(body.into_bytes());
                k += 1;
                std::thread::sleep(Duration::from_millis(25));
            }
            k
        })
    };
    // Each gateway in turn: drain with evacuation, stop, start again.
    for (i, spot) in spots.iter().enumerate() {
        std::thread::sleep(Duration::from_millis(500));
        let gw = gws[i].take().expect("running");
        let (_tx, rx) = flume::unbounded();
        let t = Instant::now();
        let outcome = gw.drain(&rx);
        assert!(outcome.clean, "{} drained: {outcome:?}", spot.id);
        eprintln!(
            "{} ({}) drained with evacuation in {:?}",
            spot.id,
            spot.http,
            t.elapsed()
        );
        gws[i] = Some(start(&demo, &redis, spot, tune));
        // Its lease, with room, before the next one evacuates.
        std::thread::sleep(LEASE);
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Release);
    let pushes = pusher.join().expect("pusher");
    let seen: Vec<Seen> = players
        .into_iter()
        .map(|t| t.join().expect("player"))
        .collect();
    let pushed = pushed.lock().expect("lock").clone();
    assert!(pushes > 20, "pushes went on during the restarts: {pushes}");
    check_streams(&seen, &pushed);
    for s in &seen {
        assert!(
            s.redirects >= 1,
            "player {} was moved at least once",
            s.player
        );
    }
    let last: HashSet<&String> = seen.iter().filter_map(|s| s.addrs.last()).collect();
    assert!(
        last.len() >= 2,
        "the players end spread over the gateways: {last:?}"
    );
    for g in gws.into_iter().flatten() {
        g.stop();
    }
    demo.stop();
}
