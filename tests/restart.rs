//! Graceful shutdown and restart that lose nothing: drain on SIGTERM,
//! snapshot, restore in a new process, resume with the old token.

mod common;

use common::{http, sigterm, wait_exit, Proc};
use slg_gateway::client::{Client, ClientError};
use slg_gateway::config::{Config, ServiceConfig};
use slg_gateway::demo::DemoBackend;
use slg_gateway::gateway::Gateway;
use slg_gateway::protocol::{Code, Frame, Kind};
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const ECHO: u32 = 100;
const DELAY: u32 = 200;

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("slg-restart-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// The shipped config on port 0, the demo service at `backend`, snapshots in `dir`.
fn config_text(backend: SocketAddr, dir: &Path, drain: &str) -> String {
    common::config_text(backend)
        .replace(
            "snapshot_dir: None",
            &format!("snapshot_dir: Some({:?})", dir.display().to_string()),
        )
        .replace(
            "drain_timeout: \"10s\"",
            &format!("drain_timeout: {drain:?}"),
        )
}

struct Gw {
    proc: Proc,
    addr: SocketAddr,
    http: SocketAddr,
}

/// Start the gateway binary; its client and HTTP addresses from stdout.
// The child is owned by the returned Proc, which kills and reaps it.
#[allow(clippy::zombie_processes)]
fn spawn_gateway(cfg: &Path, shards: usize) -> Gw {
    use std::io::{BufRead, BufReader};
    let mut child = common::bin()
        .args([
            "--config",
            cfg.to_str().expect("path"),
            "--shards",
            &shards.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(
            std::fs::File::create(cfg.with_extension(format!("{shards}.log")))
                .map(Stdio::from)
                .unwrap_or(Stdio::null()),
        )
        .spawn()
        .expect("spawn gateway");
    let out = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(out).lines();
    loop {
        let line = lines
            .next()
            .expect("gateway printed its addresses")
            .expect("line");
        if let Some(rest) = line.strip_prefix("gateway listening on ") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let addr = words[0].parse().expect("client addr");
            let http = words[2].parse().expect("http addr");
            std::thread::spawn(move || for _ in lines {});
            return Gw {
                proc: Proc(child),
                addr,
                http,
            };
        }
    }
}

/// One player's view: every sequenced frame by seq, requests sent and answered.
#[derive(Default)]
struct Seen {
    stream: BTreeMap<u64, Frame>,
    sent: Vec<u32>,
}

impl Seen {
    fn record(&mut self, f: &Frame) {
        if matches!(f.header.kind, Kind::Response | Kind::Push) && f.header.seq > 0 {
            let old = self.stream.insert(f.header.seq, f.clone());
            assert!(old.is_none(), "seq {} received twice", f.header.seq);
        }
    }
}

#[test]
fn sigterm_drains_snapshots_and_a_new_process_resumes_every_player() {
    let demo = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    let dir = temp_dir("main");
    let cfg = dir.join("gw.ron");
    std::fs::write(&cfg, config_text(demo.addr, &dir, "5s")).expect("config");
    let mut gw1 = spawn_gateway(&cfg, 2);

    const PLAYERS: u64 = 12;
    let stop = Arc::new(AtomicBool::new(false));
    let logged_in = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Clients: log in, then requests one at a time until told to stop;
    // then they close without reading what is still coming.
    let clients: Vec<_> = (1..=PLAYERS)
        .map(|i| {
            let (addr, stop, logged_in) = (gw1.addr, stop.clone(), logged_in.clone());
            std::thread::spawn(move || {
                let player = 700 + i;
                let mut c = Client::connect(addr).expect("connect");
                let li = c.login_demo(player).expect("login");
                logged_in.fetch_add(1, Ordering::AcqRel);
                let mut seen = Seen::default();
                seen.record(&li.response);
                let mut n = 0;
                while !stop.load(Ordering::Acquire) {
                    let req = c
                        .send_request(ECHO, format!("{player}:{n}").as_bytes())
                        .expect("send");
                    seen.sent.push(req);
                    n += 1;
                    let r = loop {
                        let f = c.recv().unwrap_or_else(|e| {
                            panic!(
                                "player {player}: frames until answer {req}: {e}; seen {:?}",
                                seen.stream.values().last().map(|f| (
                                    f.header.kind,
                                    f.header.code,
                                    f.header.seq
                                ))
                            )
                        });
                        seen.record(&f);
                        if f.header.kind == Kind::Response && f.header.req_id == req {
                            break f;
                        }
                    };
                    if r.header.code == u16::from(Code::ShuttingDown) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                (player, li.token, c.last_seq, seen)
            })
        })
        .collect();
    // Pushes to everyone until the gateway refuses; remember the accepted ones.
    let pushed = Arc::new(Mutex::new(Vec::new()));
    let pusher = {
        let (http_addr, stop, pushed, logged_in) =
            (gw1.http, stop.clone(), pushed.clone(), logged_in.clone());
        std::thread::spawn(move || {
            // Every player is held before the first push: each 200 then
            // promises a frame to each of them.
            while logged_in.load(Ordering::Acquire) < PLAYERS {
                std::thread::sleep(Duration::from_millis(1));
            }
            let players: Vec<String> = (1..=PLAYERS).map(|i| (700 + i).to_string()).collect();
            let path = format!("/v1/push?players={}&msg=500", players.join(","));
            let mut k = 0;
            while !stop.load(Ordering::Acquire) {
                let body = format!("push-{k}");
                let r =
                    std::panic::catch_unwind(|| http(http_addr, "POST", &path, body.as_bytes()));
                match r {
                    Ok((200, text)) => {
                        assert!(text.contains("\"offline\":0"), "{text}");
                        pushed.lock().expect("lock").push(body)
                    }
                    _ => break,
                }
                k += 1;
                std::thread::sleep(Duration::from_millis(7));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(400));
    sigterm(&gw1.proc.0);
    std::thread::sleep(Duration::from_millis(30));
    stop.store(true, Ordering::Release);
    let results: Vec<_> = clients
        .into_iter()
        .map(|t| t.join().expect("client"))
        .collect();
    pusher.join().expect("pusher");
    assert_eq!(
        wait_exit(&mut gw1.proc.0, Duration::from_secs(10)),
        Some(0),
        "a clean drain exits 0"
    );
    assert!(dir.join("players.snap").exists(), "snapshot written");
    let pushed = pushed.lock().expect("lock").clone();
    assert!(
        !pushed.is_empty(),
        "some pushes were accepted before the drain"
    );

    // A new process, with another shard count, on the same snapshot.
    let gw2 = spawn_gateway(&cfg, 3);
    assert!(
        dir.join("players.snap.loaded").exists(),
        "the loaded snapshot is moved aside"
    );
    for (player, token, last, mut seen) in results {
        let mut c = Client::connect(gw2.addr).expect("connect");
        c.set_next_req_id(seen.sent.last().map_or(1, |r| r + 1));
        c.last_seq = last;
        let r = c
            .resume(&token, last)
            .unwrap_or_else(|e| panic!("player {player} resume from {last}: {e}"));
        assert_eq!((r.player, r.resume_point), (player, last));
        let end = c.ping().expect("ping");
        // Everything up to the last seq assigned, in order (the client
        // checks last + 1), replayed before the PONG.
        while c.last_seq < end {
            let f = c.recv().expect("replay");
            seen.record(&f);
        }
        let mut queued = Vec::new();
        c.timeout = Duration::from_millis(50);
        while let Ok(f) = c.recv() {
            queued.push(f);
        }
        for f in &queued {
            seen.record(f);
        }
        let seqs: Vec<u64> = seen.stream.keys().copied().collect();
        assert_eq!(
            seqs,
            (1..=end).collect::<Vec<_>>(),
            "player {player}: stream 1..={end}"
        );
        // Every request answered exactly once (its answer or SHUTTING_DOWN).
        let answers: Vec<u32> = seen
            .stream
            .values()
            .filter(|f| f.header.kind == Kind::Response)
            .map(|f| f.header.req_id)
            .collect();
        for req in &seen.sent {
            assert_eq!(
                answers.iter().filter(|&&a| a == *req).count(),
                1,
                "player {player}: req {req}"
            );
        }
        // Every push answered 200 before the shutdown arrived.
        let bodies: HashSet<Vec<u8>> = seen
            .stream
            .values()
            .filter(|f| f.header.kind == Kind::Push)
            .map(|f| f.body.to_vec())
            .collect();
        for p in &pushed {
            assert!(bodies.contains(p.as_bytes()), "player {player}: {p} lost");
        }
        // And the player goes on.
        let live = c.request(ECHO, b"after restart").expect("echo");
        assert_eq!(live.header.seq, end + 1);
    }
    let mut gw2 = gw2;
    sigterm(&gw2.proc.0);
    assert_eq!(wait_exit(&mut gw2.proc.0, Duration::from_secs(10)), Some(0));
    demo.stop();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_second_signal_forces_and_the_snapshot_still_loads() {
    let demo = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    let dir = temp_dir("forced");
    let cfg = dir.join("gw.ron");
    std::fs::write(&cfg, config_text(demo.addr, &dir, "30s")).expect("config");
    let mut gw1 = spawn_gateway(&cfg, 2);
    let mut c = Client::connect(gw1.addr).expect("connect");
    let li = c.login_demo(901).expect("login");
    c.request(ECHO, b"one").expect("echo");
    // A request the drain would wait 20 s for.
    c.send_request(DELAY, b"20000").expect("send");
    std::thread::sleep(Duration::from_millis(100));
    sigterm(&gw1.proc.0);
    std::thread::sleep(Duration::from_millis(300));
    sigterm(&gw1.proc.0);
    let status = wait_exit(&mut gw1.proc.0, Duration::from_secs(8));
    assert_eq!(
        status,
        Some(3),
        "a forced drain exits 3, well before its 30 s timeout"
    );
    let gw2 = spawn_gateway(&cfg, 1);
    let mut b = Client::connect(gw2.addr).expect("connect");
    let r = b
        .resume(&li.token, 2)
        .expect("resume after a forced shutdown");
    assert_eq!(r.resume_point, 2);
    assert_eq!(b.request(ECHO, b"two").expect("echo").header.seq, 3);
    drop(gw2);
    demo.stop();
    let _ = std::fs::remove_dir_all(dir);
}

fn in_process(
    demo: &DemoBackend,
    dir: &Path,
    shards: usize,
    tune: impl FnOnce(&mut Config),
) -> Gateway {
    let mut cfg = Config::embedded_default();
    cfg.listen = "127.0.0.1:0".into();
    cfg.http_listen = "127.0.0.1:0".into();
    cfg.shards = Some(shards);
    cfg.demo_backend = None;
    cfg.snapshot_dir = Some(dir.display().to_string());
    cfg.services.insert(
        "demo".into(),
        ServiceConfig {
            instances: vec![demo.addr.to_string()],
            connections: 1,
        },
    );
    tune(&mut cfg);
    Gateway::start(cfg).expect("gateway")
}

#[test]
fn damaged_snapshots_are_moved_aside_and_the_gateway_starts_empty() {
    let demo = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    let dir = temp_dir("damaged");
    // A real snapshot to damage.
    let gw = in_process(&demo, &dir, 2, |_| {});
    let mut c = Client::connect(gw.client_addr).expect("connect");
    c.login_demo(55).expect("login");
    drop(c);
    let (_tx, rx) = flume::unbounded();
    let out = gw.drain(&rx);
    assert_eq!(out.snapshot_players, Some(1));
    let good = std::fs::read(dir.join("players.snap")).expect("snapshot");
    let mut wrong_version = good.clone();
    wrong_version[8] = 99;
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    for (what, bytes) in [
        ("truncated", good[..good.len() / 2].to_vec()),
        ("corrupt", flipped),
        ("wrong version", wrong_version),
        ("not a snapshot", b"hello".to_vec()),
    ] {
        std::fs::write(dir.join("players.snap"), &bytes).expect("write");
        let _ = std::fs::remove_file(dir.join("players.snap.corrupt"));
        let gw = in_process(&demo, &dir, 2, |_| {});
        assert_eq!(gw.restored, 0, "{what}");
        assert!(!dir.join("players.snap").exists(), "{what}: moved away");
        assert_eq!(
            std::fs::read(dir.join("players.snap.corrupt")).expect("kept aside"),
            bytes,
            "{what}"
        );
        let mut c = Client::connect(gw.client_addr).expect("connect");
        assert_eq!(
            c.login_demo(55).expect("login").response.header.seq,
            1,
            "{what}: empty start"
        );
        gw.stop();
    }
    // No snapshot at all: a fresh start.
    let _ = std::fs::remove_file(dir.join("players.snap"));
    let gw = in_process(&demo, &dir, 2, |_| {});
    assert_eq!(gw.restored, 0);
    gw.stop();
    demo.stop();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_token_that_expires_while_the_gateway_is_down_is_rejected() {
    let demo = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    let dir = temp_dir("expiry");
    let short = |c: &mut Config| c.token_lifetime = Duration::from_millis(800);
    let gw = in_process(&demo, &dir, 2, short);
    let mut a = Client::connect(gw.client_addr).expect("connect");
    let fresh = a.login_demo(66).expect("login").token;
    let mut b = Client::connect(gw.client_addr).expect("connect");
    let li_b = b.login_demo(67).expect("login");
    a.request(ECHO, b"x").expect("echo");
    drop((a, b));
    let (_tx, rx) = flume::unbounded();
    assert_eq!(gw.drain(&rx).snapshot_players, Some(2));
    std::thread::sleep(Duration::from_millis(1000));
    let gw = in_process(&demo, &dir, 3, short);
    assert_eq!(gw.restored, 2);
    let mut c = Client::connect(gw.client_addr).expect("connect");
    match c.resume(&fresh, 2) {
        Err(ClientError::ResumeRefused(x)) => assert_eq!(x, u16::from(Code::ResumeRejected)),
        other => panic!("an expired token must be refused: {other:?}"),
    }
    // The player itself survived: a login continues its seq.
    assert_eq!(c.login_demo(66).expect("login").response.header.seq, 3);
    let _ = li_b;
    let (_tx, rx) = flume::unbounded();
    assert_eq!(gw.drain(&rx).snapshot_players, Some(2));
    // Players whose linger runs out while the gateway is down are not restored.
    std::thread::sleep(Duration::from_millis(50));
    let gw = in_process(&demo, &dir, 2, |c| {
        c.player_linger = Duration::from_millis(10)
    });
    for p in [66, 67] {
        assert_eq!(
            http(gw.http_addr, "GET", &format!("/v1/players/{p}"), b"").0,
            404,
            "player {p} expired"
        );
    }
    gw.stop();
    demo.stop();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_drain_request_or_reload_during_a_drain_does_not_force_it() {
    let demo = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    let dir = temp_dir("no-force");
    let gw = in_process(&demo, &dir, 2, |_| {});
    let mut c = Client::connect(gw.client_addr).expect("connect");
    c.login_demo(91).expect("login");
    let slow = c.send_request(DELAY, b"400").expect("send");
    std::thread::sleep(Duration::from_millis(50));
    let (tx, rx) = flume::unbounded();
    let drain = std::thread::spawn(move || gw.drain(&rx));
    std::thread::sleep(Duration::from_millis(50));
    tx.send(slg_gateway::shard::GatewayEvent::DrainRequested { evacuate: false })
        .expect("send");
    let (rtx, rrx) = flume::bounded(1);
    tx.send(slg_gateway::shard::GatewayEvent::Reload(Some(rtx)))
        .expect("send");
    assert!(
        rrx.recv_timeout(Duration::from_secs(5))
            .expect("answer")
            .is_err(),
        "no reload while draining"
    );
    let outcome = drain.join().expect("drain");
    assert!(outcome.clean, "{outcome:?}");
    let r = c.response_to(slow).expect("the in-flight request finished");
    assert_eq!(r.header.code, 0);
    assert_eq!(c.expect_kick().expect("kick"), u16::from(Code::Shutdown));
    demo.stop();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_drain_kicks_clients_that_keep_sending_and_ends_clean_in_about_a_request_timeout() {
    let demo = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    let dir = temp_dir("busy");
    let gw = in_process(&demo, &dir, 2, |c| {
        c.drain_timeout = Duration::from_secs(10)
    });
    let addr = gw.client_addr;
    let clients: Vec<_> = (0..8u64)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = Client::connect(addr).expect("connect");
                c.login_demo(300 + i).expect("login");
                let mut refused = 0;
                // One request every 50 ms, whatever the answer, until
                // kicked (or long after the test gave up).
                let give_up = std::time::Instant::now() + Duration::from_secs(20);
                while std::time::Instant::now() < give_up {
                    match c.request(ECHO, b"tick") {
                        Ok(f) if f.header.code == u16::from(Code::ShuttingDown) => refused += 1,
                        Ok(f) => assert_eq!(f.header.code, 0),
                        // The KICK came instead of the answer (it stays
                        // queued, read by expect_kick).
                        Err(ClientError::Closed) => {
                            return (c.expect_kick().ok(), refused);
                        }
                        Err(e) => panic!("client {i}: {e}"),
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                (None, refused)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (_tx, rx) = flume::unbounded();
    let began = std::time::Instant::now();
    let outcome = gw.drain(&rx);
    let took = began.elapsed();
    assert!(outcome.clean, "{outcome:?}");
    assert_eq!(outcome.snapshot_players, Some(8));
    // The demo answers at once; the grace is 100 ms. Well under the 10 s
    // drain_timeout the old quiet-wait rule always ran to.
    assert!(took < Duration::from_secs(3), "drain took {took:?}");
    for c in clients {
        let (kick, _refused) = c.join().expect("client");
        assert_eq!(kick, Some(u16::from(Code::Shutdown)));
    }
    demo.stop();
    let _ = std::fs::remove_dir_all(dir);
}
