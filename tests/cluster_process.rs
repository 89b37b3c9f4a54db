//! The cluster with real gateway processes on one Redis: takeover across
//! three processes, a gateway killed with SIGKILL (its players come back
//! elsewhere after its lease, with GAP), Redis stopped and restarted
//! while clients play, and a drain with evacuation (SIGTERM with
//! `evacuate_on_drain`, and `POST /v1/drain?evacuate=true`) that moves
//! every player to a peer before the process exits.
//!
//! Needs `redis-server`; skips (`SKIPPED: ...` on stderr) without it, and
//! fails instead when `CI` or SLG_REQUIRE_REDIS is set (.ci/run sets both).

mod common;

use common::{config_text, free_port, spawn_gateway, start_redis, start_redis_on, Proc};
use slg_gateway::client::{Client, ClientError};
use slg_gateway::demo::DemoBackend;
use slg_gateway::protocol::Code;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const ECHO: u32 = 100;

struct Gw {
    proc: Proc,
    addr: SocketAddr,
    http: SocketAddr,
}

fn gateway(dir: &std::path::Path, demo: SocketAddr, redis_port: u16, id: &str, lease: &str) -> Gw {
    gateway_with(dir, demo, redis_port, id, lease, "")
}

/// A gateway process; `extra` adds keys to its `cluster` section.
fn gateway_with(
    dir: &std::path::Path,
    demo: SocketAddr,
    redis_port: u16,
    id: &str,
    lease: &str,
    extra: &str,
) -> Gw {
    let port = free_port();
    let text = config_text(demo).replace(
        "    cluster: None,",
        &format!(
            "    cluster: Some((redis: \"redis://127.0.0.1:{redis_port}/\", gateway_id: \"{id}\", advertise: \"127.0.0.1:{port}\", lease: \"{lease}\"{extra})),"
        ),
    );
    let text = text.replacen(
        "listen: \"127.0.0.1:0\"",
        &format!("listen: \"127.0.0.1:{port}\""),
        1,
    );
    let path = dir.join(format!("{id}.ron"));
    std::fs::write(&path, text).expect("config");
    let (proc, addr, http) = spawn_gateway(&path, 2);
    assert_eq!(addr.port(), port);
    Gw { proc, addr, http }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("slg-cluster-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).expect("dir");
    d
}

#[test]
fn three_processes_one_session_per_player_and_a_sigkilled_gateway() {
    let Some(redis) = start_redis() else { return };
    let demo = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    let dir = temp_dir("three");
    let a = gateway(&dir, demo.addr, redis.port, "gw-a", "1s");
    let b = gateway(&dir, demo.addr, redis.port, "gw-b", "1s");
    let c = gateway(&dir, demo.addr, redis.port, "gw-c", "1s");
    std::thread::sleep(Duration::from_millis(300));

    // Player 10 moves a -> b -> c by logging in again, its seq going on.
    let mut on_a = Client::connect(a.addr).expect("connect a");
    on_a.login_demo(10).expect("login a");
    on_a.request(ECHO, b"1").expect("echo"); // seq 2
    on_a.ack().expect("ack");
    let mut on_b = Client::connect(b.addr).expect("connect b");
    on_b.set_next_req_id(on_a.next_req_id() + 10);
    let li = on_b.login_demo(10).expect("login b");
    assert_eq!(on_a.expect_kick().expect("kick"), u16::from(Code::Replaced));
    assert_eq!((li.resume_point, li.response.header.seq), (2, 3));
    let mut on_c = Client::connect(c.addr).expect("connect c");
    on_c.set_next_req_id(on_b.next_req_id() + 10);
    let li = on_c.login_demo(10).expect("login c");
    assert_eq!(on_b.expect_kick().expect("kick"), u16::from(Code::Replaced));
    assert_eq!(li.response.header.seq, 4);

    // Player 11 plays on b; b is killed with SIGKILL.
    let mut p11 = Client::connect(b.addr).expect("connect b");
    p11.login_demo(11).expect("login");
    p11.request(ECHO, b"unacked").expect("echo"); // seq 2, never acked
    let mut b = b;
    let _ = b.proc.0.kill();
    let _ = b.proc.0.wait();
    let mut back = Client::connect(a.addr).expect("connect a");
    // While b's lease runs, its players cannot be had.
    match back.login_demo(11) {
        Err(ClientError::LoginRejected(code)) => {
            assert_eq!(code, u16::from(Code::BackendUnavailable))
        }
        other => panic!("expected a refusal while b's lease runs: {other:?}"),
    }
    // After it, a new life on a, and SESSION says GAP: nothing silent.
    let deadline = Instant::now() + Duration::from_secs(10);
    let li = loop {
        match back.login_demo(11) {
            Ok(li) => break li,
            Err(ClientError::LoginRejected(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("login after b's lease: {e}"),
        }
    };
    assert!(li.gap);
    assert_eq!(li.response.header.seq, 1);
    drop((a, c));
    demo.stop();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn redis_stopped_and_restarted_while_clients_play() {
    let Some(redis) = start_redis() else { return };
    let port = redis.port;
    let demo = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    let dir = temp_dir("redis");
    let a = gateway(&dir, demo.addr, port, "gw-a", "2s");
    std::thread::sleep(Duration::from_millis(300));
    let mut c = Client::connect(a.addr).expect("connect");
    c.login_demo(20).expect("login");
    drop(redis);
    // Playing goes on without Redis.
    for _ in 0..5 {
        assert_eq!(c.request(ECHO, b"x").expect("echo").header.code, 0);
    }
    let mut newcomer = Client::connect(a.addr).expect("connect");
    match newcomer.login_demo(21) {
        Err(ClientError::LoginRejected(code)) => {
            assert_eq!(code, u16::from(Code::BackendUnavailable))
        }
        other => panic!("expected a refusal without redis: {other:?}"),
    }
    // Redis comes back (empty): new players can log in again.
    let _redis = start_redis_on(port).expect("restart redis");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match newcomer.login_demo(21) {
            Ok(li) => {
                assert_eq!(li.response.header.seq, 1);
                break;
            }
            Err(ClientError::LoginRejected(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("login after redis came back: {e}"),
        }
    }
    assert_eq!(c.request(ECHO, b"still").expect("echo").header.code, 0);
    drop(a);
    demo.stop();
    let _ = std::fs::remove_dir_all(dir);
}

/// Each client's REDIRECT, its resume at the target (which must be `to`),
/// and an echo there whose seq follows the last one seen.
fn follow_to(clients: Vec<(u64, Client)>, to: SocketAddr) -> Vec<(u64, Client)> {
    clients
        .into_iter()
        .map(|(p, mut c)| {
            let f = c
                .wait_for(|f| f.header.kind == slg_gateway::protocol::Kind::Redirect)
                .unwrap_or_else(|e| panic!("player {p}: no redirect: {e}"));
            let (addr, token) =
                slg_gateway::protocol::parse_redirect_body(&f.body).expect("redirect");
            assert_eq!(addr, to.to_string(), "player {p} sent to the peer");
            let last = c.last_seq;
            let mut n = Client::connect(to).expect("connect target");
            n.set_next_req_id(c.next_req_id());
            let s = n
                .resume(token, last)
                .unwrap_or_else(|e| panic!("player {p}: {e}"));
            assert!(!s.gap);
            let r = n.request(ECHO, b"there").expect("echo");
            assert_eq!((r.header.code, r.header.seq), (0, last + 1), "player {p}");
            (p, n)
        })
        .collect()
}

#[test]
fn a_drain_with_evacuation_moves_every_player_before_the_process_exits() {
    let Some(redis) = start_redis() else { return };
    let demo = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    let dir = temp_dir("evacuate");
    let extra = ", evacuate_on_drain: true";
    let mut a = gateway_with(&dir, demo.addr, redis.port, "gw-a", "1s", extra);
    let mut b = gateway(&dir, demo.addr, redis.port, "gw-b", "1s");
    std::thread::sleep(Duration::from_millis(1200));
    let clients: Vec<(u64, Client)> = (30..36)
        .map(|p| {
            let mut c = Client::connect(a.addr).expect("connect");
            c.login_demo(p).expect("login");
            assert_eq!(c.request(ECHO, b"here").expect("echo").header.code, 0);
            (p, c)
        })
        .collect();
    // SIGTERM: with evacuate_on_drain every player goes to gw-b first, and
    // the process exits cleanly.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(a.proc.0.id() as i32, libc::SIGTERM) };
    let clients = follow_to(clients, b.addr);
    assert_eq!(
        common::wait_exit(&mut a.proc.0, Duration::from_secs(15)),
        Some(0)
    );
    // A new gw-a; then gw-b drains with ?evacuate=true (its own config
    // does not ask for it) and its players come back to gw-a.
    let a2 = gateway(&dir, demo.addr, redis.port, "gw-a", "1s");
    std::thread::sleep(Duration::from_millis(1200));
    let (status, text) = common::http(b.http, "POST", "/v1/drain?evacuate=true", b"");
    assert_eq!(status, 202, "{text}");
    assert!(text.contains("\"evacuate\":true"), "{text}");
    let clients = follow_to(clients, a2.addr);
    assert_eq!(
        common::wait_exit(&mut b.proc.0, Duration::from_secs(15)),
        Some(0)
    );
    assert_eq!(clients.len(), 6);
    drop(a2);
    demo.stop();
    let _ = std::fs::remove_dir_all(dir);
}
