//! Several gateways on one Redis: a player has one session in the whole
//! cluster, and a login or resume on another gateway takes it over with
//! its seq and outbox.
//!
//! Needs `redis-server`; skips (`SKIPPED: ...` on stderr) without it, and
//! fails instead when `CI` or SLG_REQUIRE_REDIS is set (.ci/run sets both).

mod common;

use common::ha::{Backing, Kind};

use slg_gateway::client::{Client, ClientError};
use slg_gateway::config::ClusterConfig;
use slg_gateway::demo::DemoBackend;
use slg_gateway::gateway::Gateway;
use slg_gateway::protocol::Code;
use std::time::Duration;

const ECHO: u32 = 100;

fn gateway(demo: &DemoBackend, redis: &Backing, id: &str, lease: Duration) -> Gateway {
    gateway_with(demo, redis, id, lease, false)
}

/// A free port on the loopback.
fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

/// A gateway of the cluster; with `ws`, also a WebSocket listener it
/// advertises (`ws_advertise`).
fn gateway_with(
    demo: &DemoBackend,
    redis: &Backing,
    id: &str,
    lease: Duration,
    ws: bool,
) -> Gateway {
    let mut cfg = common::config(demo.addr, 2);
    let ws_advertise = ws.then(|| {
        let addr = format!("127.0.0.1:{}", port());
        cfg.ws_listen = Some(addr.clone());
        format!("ws://{addr}/ws")
    });
    // A fixed port, so the gateway can advertise its client address.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    cfg.listen = format!("127.0.0.1:{port}");
    cfg.cluster = Some(ClusterConfig {
        ws_advertise,
        ..redis.cluster_config(id, &cfg.listen, lease)
    });
    Gateway::start(cfg).expect("gateway")
}

/// The demo backend and gateways gw-a and gw-b on `redis`, their leases
/// taken.
fn two_gateways(redis: &Backing, lease: Duration) -> (DemoBackend, Gateway, Gateway) {
    common::test_log();
    let demo = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    let a = gateway(&demo, redis, "gw-a", lease);
    let b = gateway(&demo, redis, "gw-b", lease);
    std::thread::sleep(Duration::from_millis(150));
    (demo, a, b)
}

fn login_and_resume_on_another_gateway_take_the_player_over(redis: &mut Backing) {
    let (demo, a, b) = two_gateways(redis, Duration::from_secs(5));

    let mut c1 = Client::connect(a.client_addr).expect("connect a");
    c1.login_demo(42).expect("login on a");
    for i in 2..=4u64 {
        assert_eq!(c1.request(ECHO, b"a").expect("echo").header.seq, i);
    }
    // A login for the same player on gateway B: A's session is replaced,
    // and B goes on with the seq and the unacknowledged frames.
    let mut c2 = Client::connect(b.client_addr).expect("connect b");
    c2.set_next_req_id(c1.next_req_id() + 100);
    let li = c2.login_demo(42).expect("login on b");
    assert_eq!(c1.expect_kick().expect("kick"), u16::from(Code::Replaced));
    assert_eq!((li.resume_point, li.gap), (0, false));
    assert_eq!(li.response.header.seq, 5, "seq continues across gateways");
    let replay: Vec<u64> = (0..4)
        .map(|_| c2.recv().expect("replay").header.seq)
        .collect();
    assert_eq!(replay, vec![1, 2, 3, 4]);
    assert_eq!(c2.request(ECHO, b"b").expect("echo").header.seq, 6);

    // A resume on A with the token B issued: A takes the player back.
    let token = li.token.clone();
    let next = c2.next_req_id();
    drop(c2);
    std::thread::sleep(Duration::from_millis(50));
    let mut c3 = Client::connect(a.client_addr).expect("connect a");
    c3.set_next_req_id(next + 100);
    let r = c3.resume(&token, 6).expect("resume on a with b's token");
    assert_eq!(r.resume_point, 6);
    assert_eq!(c3.request(ECHO, b"a again").expect("echo").header.seq, 7);

    a.stop();
    b.stop();
    demo.stop();
}

fn a_dead_gateways_players_can_log_in_elsewhere_after_its_lease(redis: &mut Backing) {
    // Long enough that B's login below surely comes while A's lease still
    // runs, on a loaded 2-core machine running the other cluster tests.
    // (Renewed every third of it; the stop itself takes ~0.35 s.)
    let lease = Duration::from_secs(3);
    let (demo, a, b) = two_gateways(redis, lease);
    let mut c1 = Client::connect(a.client_addr).expect("connect a");
    c1.login_demo(7).expect("login on a");
    c1.request(ECHO, b"x").expect("echo");
    // Gateway A goes away without handing anything over.
    a.stop();
    drop(c1);
    // While its lease still runs, B cannot get the player from it.
    let mut c2 = Client::connect(b.client_addr).expect("connect b");
    match c2.login_demo(7) {
        Err(ClientError::LoginRejected(code)) => {
            assert_eq!(code, u16::from(Code::BackendUnavailable))
        }
        other => panic!("expected a refusal while A's lease runs: {other:?}"),
    }
    // Once it lapsed, B takes the player over: a new life (A's unacked
    // state died with A).
    std::thread::sleep(lease + Duration::from_millis(300));
    let li = c2.login_demo(7).expect("login on b after the lease");
    // What only A held is gone, and the client is told so.
    assert!(
        li.gap,
        "SESSION says GAP after a takeover from a dead gateway"
    );
    assert_eq!(li.response.header.seq, 1);
    b.stop();
    demo.stop();
}

fn redis_going_away_refuses_new_players_and_keeps_sessions(redis: &mut Backing) {
    let demo = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    let a = gateway(&demo, redis, "gw-a", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(100));
    let mut c1 = Client::connect(a.client_addr).expect("connect");
    c1.login_demo(9).expect("login");
    redis.kill_all();
    // The session here goes on.
    assert_eq!(c1.request(ECHO, b"still").expect("echo").header.code, 0);
    // A new player cannot be claimed: refused, the connection stays usable.
    let mut c2 = Client::connect(a.client_addr).expect("connect");
    match c2.login_demo(10) {
        Err(ClientError::LoginRejected(code)) => {
            assert_eq!(code, u16::from(Code::BackendUnavailable))
        }
        other => panic!("expected a refusal without redis: {other:?}"),
    }
    assert_eq!(c2.request(2, b"open").expect("echo").header.code, 0);
    // A push still reaches the player held here; the one the cluster would
    // have to find counts offline, and the answer is not an error (an
    // error would invite a retry that doubles the frame already sent).
    let (status, text) = common::http(a.http_addr, "POST", "/v1/push?players=9,10&msg=79", b"p");
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(
        (v["delivered"].as_u64(), v["offline"].as_u64()),
        (Some(1), Some(1)),
        "{text}"
    );
    let p = c1
        .wait_for(|f| f.header.kind == slg_gateway::protocol::Kind::Push)
        .expect("push");
    assert_eq!((p.header.msg_id, &p.body[..]), (79, &b"p"[..]));
    // A broadcast too: the local players count, the rest is logged.
    let (status, text) = common::http(a.http_addr, "POST", "/v1/broadcast?msg=80", b"b");
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["delivered"].as_u64(), Some(1), "{text}");
    a.stop();
    demo.stop();
}

fn a_push_to_any_gateway_reaches_the_player_where_it_is(redis: &mut Backing) {
    let (demo, a, b) = two_gateways(redis, Duration::from_secs(5));
    let mut on_a = Client::connect(a.client_addr).expect("connect a");
    on_a.login_demo(1).expect("login");
    let mut on_b = Client::connect(b.client_addr).expect("connect b");
    on_b.login_demo(2).expect("login");
    // Posted to A: player 1 is here, player 2 on B, player 3 nowhere.
    let (status, text) = common::http(a.http_addr, "POST", "/v1/push?players=1,2,3&msg=77", b"hi");
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(
        (
            v["delivered"].as_u64(),
            v["cached"].as_u64(),
            v["offline"].as_u64()
        ),
        (Some(2), Some(0), Some(1))
    );
    for c in [&mut on_a, &mut on_b] {
        let p = c
            .wait_for(|f| f.header.kind == slg_gateway::protocol::Kind::Push)
            .expect("push");
        assert_eq!(
            (p.header.seq, p.header.msg_id, &p.body[..]),
            (2, 77, &b"hi"[..])
        );
    }
    // A broadcast posted to B covers both gateways.
    let (status, text) = common::http(b.http_addr, "POST", "/v1/broadcast?msg=78", b"all");
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["delivered"].as_u64(), Some(2), "{text}");
    for c in [&mut on_a, &mut on_b] {
        let p = c
            .wait_for(|f| {
                f.header.kind == slg_gateway::protocol::Kind::Push && f.header.msg_id == 78
            })
            .expect("push");
        assert_eq!(p.header.seq, 3);
    }
    a.stop();
    b.stop();
    demo.stop();
}

fn migration_redirects_the_client_and_loses_nothing(redis: &mut Backing) {
    let (demo, a, b) = two_gateways(redis, Duration::from_secs(5));
    let mut c = Client::connect(a.client_addr).expect("connect a");
    c.login_demo(50).expect("login");
    for _ in 0..3 {
        c.request(ECHO, b"before").expect("echo"); // seq 2..4
    }
    let (status, text) = common::http(a.http_addr, "POST", "/v1/migrate?player=50&to=gw-b", b"");
    assert_eq!(status, 200, "{text}");
    assert!(text.contains(&b.client_addr.to_string()), "{text}");
    let r = c
        .wait_for(|f| f.header.kind == slg_gateway::protocol::Kind::Redirect)
        .expect("redirect");
    let (addr, token) = slg_gateway::protocol::parse_redirect_body(&r.body).expect("redirect body");
    assert_eq!(addr, b.client_addr.to_string());
    let token = token.to_vec();
    let last = c.last_seq;
    let next = c.next_req_id();
    assert!(c.is_closed());
    // A push posted to the old gateway meanwhile follows the player.
    let (status, text) = common::http(a.http_addr, "POST", "/v1/push?players=50&msg=90", b"after");
    assert_eq!(status, 200, "{text}");
    let mut c2 = Client::connect(addr.parse().expect("addr")).expect("connect b");
    c2.set_next_req_id(next + 10);
    let s = c2.resume(&token, last).expect("resume at the target");
    assert_eq!(s.resume_point, last);
    let p = c2
        .wait_for(|f| f.header.kind == slg_gateway::protocol::Kind::Push)
        .expect("push");
    assert_eq!((p.header.seq, &p.body[..]), (last + 1, &b"after"[..]));
    assert_eq!(
        c2.request(ECHO, b"after").expect("echo").header.seq,
        last + 2
    );
    a.stop();
    b.stop();
    demo.stop();
}

fn migration_redirects_a_websocket_client_to_the_targets_websocket_url(redis: &mut Backing) {
    let demo = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    let a = gateway_with(&demo, redis, "gw-a", Duration::from_secs(5), true);
    let b = gateway_with(&demo, redis, "gw-b", Duration::from_secs(5), true);
    std::thread::sleep(Duration::from_millis(150));
    let ws = |addr| {
        let opts = slg_gateway::client::ConnectOptions {
            websocket: Some(slg_gateway::client::WsOptions::default()),
            ..Default::default()
        };
        Client::connect_via(addr, &opts).expect("ws connect")
    };
    let mut c = ws(a.ws_addr.expect("ws a"));
    c.login_demo(52).expect("login");
    c.request(ECHO, b"before").expect("echo");
    // A TCP client of another player is sent the TCP address.
    let mut t = Client::connect(a.client_addr).expect("connect a");
    t.login_demo(53).expect("login");

    let mut token = Vec::new();
    for (player, want) in [
        (52, format!("ws://{}/ws", b.ws_addr.expect("ws b"))),
        (53, b.client_addr.to_string()),
    ] {
        let path = format!("/v1/migrate?player={player}&to=gw-b");
        let (status, text) = common::http(a.http_addr, "POST", &path, b"");
        assert_eq!(status, 200, "{text}");
        let client = if player == 52 { &mut c } else { &mut t };
        let r = client
            .wait_for(|f| f.header.kind == slg_gateway::protocol::Kind::Redirect)
            .expect("redirect");
        let (addr, tok) = slg_gateway::protocol::parse_redirect_body(&r.body).expect("body");
        assert_eq!(addr, want, "player {player}");
        if player == 52 {
            token = tok.to_vec();
        }
    }
    // The WebSocket client follows the URL and resumes there.
    let last = c.last_seq;
    let next = c.next_req_id();
    assert!(c.is_closed());
    let mut c2 = ws(b.ws_addr.expect("ws b"));
    c2.set_next_req_id(next + 10);
    assert_eq!(c2.resume(&token, last).expect("resume").resume_point, last);
    assert_eq!(
        c2.request(ECHO, b"after").expect("echo").header.seq,
        last + 1
    );
    a.stop();
    b.stop();
    demo.stop();
}

fn a_migration_waits_for_a_slow_request_and_its_answer_moves_with_the_player(redis: &mut Backing) {
    let (demo, a, b) = two_gateways(redis, Duration::from_secs(5));
    let mut c = Client::connect(a.client_addr).expect("connect a");
    c.login_demo(51).expect("login");
    // The demo answers msg 200 after the delay in its body (well inside
    // the 5 s request timeout): the migration waits for it.
    let slow = c.send_request(200, b"2500").expect("send");
    std::thread::sleep(Duration::from_millis(100));
    let (status, text) = common::http(a.http_addr, "POST", "/v1/migrate?player=51&to=gw-b", b"");
    assert_eq!(status, 200, "{text}");
    // The answer came before the REDIRECT, on the source: once.
    let mut answers = 0;
    let r = c
        .wait_for(|f| {
            f.header.kind == slg_gateway::protocol::Kind::Redirect
                || (f.header.kind == slg_gateway::protocol::Kind::Response
                    && f.header.req_id == slow)
        })
        .expect("answer or redirect");
    let r = if r.header.kind == slg_gateway::protocol::Kind::Response {
        answers += 1;
        c.wait_for(|f| f.header.kind == slg_gateway::protocol::Kind::Redirect)
            .expect("redirect")
    } else {
        r
    };
    let (addr, token) = slg_gateway::protocol::parse_redirect_body(&r.body).expect("redirect body");
    let token = token.to_vec();
    // Resume from before the answer: the target replays it, in seq.
    let last = c.last_seq - answers;
    let mut c2 = Client::connect(addr.parse().expect("addr")).expect("connect b");
    c2.set_next_req_id(slow + 10);
    assert_eq!(c2.resume(&token, last).expect("resume").resume_point, last);
    let answer = c2.response_to(slow).expect("the slow answer");
    assert_eq!((answer.header.seq, answer.header.code), (last + 1, 0));
    assert_eq!(
        c2.request(ECHO, b"next").expect("echo").header.seq,
        last + 2
    );
    a.stop();
    b.stop();
    demo.stop();
}

fn migration_to_a_dead_gateway_rolls_back(redis: &mut Backing) {
    let demo = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    let a = gateway(&demo, redis, "gw-a", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(150));
    let mut c = Client::connect(a.client_addr).expect("connect a");
    c.login_demo(60).expect("login");
    c.request(ECHO, b"x").expect("echo");
    let (status, text) = common::http(
        a.http_addr,
        "POST",
        "/v1/migrate?player=60&to=gw-nobody",
        b"",
    );
    assert_eq!(status, 409, "{text}");
    // The player stayed, unharmed: the session goes on with the next seq.
    assert_eq!(c.request(ECHO, b"still here").expect("echo").header.seq, 3);
    // And it is still this gateway's in the directory: a login elsewhere
    // would have to take it from here.
    let info = common::http(a.http_addr, "GET", "/v1/players/60", b"");
    assert_eq!(info.0, 200);
    // Migrating or evacuating to this very gateway is refused up front.
    for path in ["/v1/migrate?player=60&to=gw-a", "/v1/evacuate?to=gw-a"] {
        let (status, text) = common::http(a.http_addr, "POST", path, b"");
        assert_eq!(status, 409, "{path}: {text}");
    }
    assert_eq!(c.request(ECHO, b"still").expect("echo").header.seq, 4);
    a.stop();
    demo.stop();
}

fn evacuation_moves_every_player_and_each_resumes_at_the_target(redis: &mut Backing) {
    let (demo, a, b) = two_gateways(redis, Duration::from_secs(5));
    let mut clients: Vec<(u64, Client)> = (200..240u64)
        .map(|p| {
            let mut c = Client::connect(a.client_addr).expect("connect");
            c.login_demo(p).expect("login");
            c.request(ECHO, b"x").expect("echo");
            (p, c)
        })
        .collect();
    let (status, text) = common::http(a.http_addr, "POST", "/v1/evacuate?to=gw-b", b"");
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(
        (v["migrated"].as_u64(), v["failed"].as_u64()),
        (Some(40), Some(0)),
        "{text}"
    );
    for (p, c) in clients.iter_mut() {
        let r = c
            .wait_for(|f| f.header.kind == slg_gateway::protocol::Kind::Redirect)
            .expect("redirect");
        let (addr, token) = slg_gateway::protocol::parse_redirect_body(&r.body).expect("body");
        let mut n = Client::connect(addr.parse().expect("addr")).expect("connect b");
        n.set_next_req_id(c.next_req_id() + 10);
        let s = n
            .resume(token, c.last_seq)
            .unwrap_or_else(|e| panic!("player {p}: {e}"));
        assert_eq!(s.resume_point, 2);
        assert_eq!(
            n.request(ECHO, b"y").expect("echo").header.seq,
            3,
            "player {p}"
        );
    }
    a.stop();
    b.stop();
    demo.stop();
}

fn migration_under_request_and_push_load_keeps_every_stream_whole(redis: &mut Backing) {
    use slg_gateway::protocol::{parse_redirect_body, Kind};
    use std::collections::{BTreeMap, HashSet};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let (demo, a, b) = two_gateways(redis, Duration::from_secs(5));
    const PLAYERS: u64 = 6;
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let players: Vec<_> = (1..=PLAYERS)
        .map(|i| {
            let (stop, ready, addr) = (stop.clone(), ready.clone(), a.client_addr);
            std::thread::spawn(move || {
                let player = 300 + i;
                let mut c = Client::connect(addr).expect("connect");
                let li = c.login_demo(player).expect("login");
                ready.fetch_add(1, Ordering::AcqRel);
                let mut token = li.token.clone();
                let mut stream: BTreeMap<u64, (Kind, u32, Vec<u8>)> = BTreeMap::new();
                let mut sent: Vec<u32> = Vec::new();
                let mut redirects = 0;
                let record = |stream: &mut BTreeMap<u64, (Kind, u32, Vec<u8>)>,
                              f: &slg_gateway::protocol::Frame| {
                    if f.header.seq > 0 && matches!(f.header.kind, Kind::Response | Kind::Push) {
                        let old = stream.insert(
                            f.header.seq,
                            (f.header.kind, f.header.req_id, f.body.to_vec()),
                        );
                        assert!(old.is_none(), "player {player}: seq {} twice", f.header.seq);
                    }
                };
                record(&mut stream, &li.response);
                while !stop.load(Ordering::Acquire) {
                    let req = c
                        .send_request(ECHO, format!("{player}").as_bytes())
                        .expect("send");
                    sent.push(req);
                    // Wait for its answer, following redirects.
                    loop {
                        let f = c.recv().unwrap_or_else(|e| panic!("player {player}: {e}"));
                        record(&mut stream, &f);
                        if f.header.kind == Kind::Response && f.header.req_id == req {
                            break;
                        }
                        if f.header.kind == Kind::Redirect {
                            redirects += 1;
                            let (to, t) = parse_redirect_body(&f.body).expect("redirect body");
                            let last = c.last_seq;
                            let next = c.next_req_id();
                            let mut n =
                                Client::connect(to.parse().expect("addr")).expect("connect target");
                            n.set_next_req_id(next);
                            let s = n
                                .resume(t, last)
                                .unwrap_or_else(|e| panic!("player {player}: resume: {e}"));
                            token = s.token.clone();
                            // Replays come before the PONG.
                            let mut h = slg_gateway::protocol::Header::new(Kind::Ping);
                            h.seq = last;
                            n.send(&h, &[]).expect("ping");
                            let mut answered = false;
                            loop {
                                let f = n.recv().expect("replay");
                                record(&mut stream, &f);
                                answered |=
                                    f.header.kind == Kind::Response && f.header.req_id == req;
                                if f.header.kind == Kind::Pong {
                                    break;
                                }
                            }
                            c = n;
                            if answered {
                                break;
                            }
                            // The source never read it: send it again, same req_id.
                            let mut h = slg_gateway::protocol::Header::new(Kind::Request);
                            h.msg_id = ECHO;
                            h.req_id = req;
                            c.send(&h, format!("{player}").as_bytes()).expect("resend");
                        }
                    }
                }
                // Settle: everything up to the last seq.
                std::thread::sleep(Duration::from_millis(300));
                let end = c.ping().expect("final ping");
                let mut rest = Vec::new();
                c.timeout = Duration::from_millis(50);
                while let Ok(f) = c.recv() {
                    rest.push(f);
                }
                for f in &rest {
                    record(&mut stream, f);
                }
                let _ = token;
                (player, end, stream, sent, redirects)
            })
        })
        .collect();
    while ready.load(Ordering::Acquire) < PLAYERS {
        std::thread::sleep(Duration::from_millis(5));
    }
    // Pushes to everyone, through both gateways in turn.
    let pushed = Arc::new(Mutex::new(Vec::new()));
    let pusher = {
        let (stop, pushed) = (stop.clone(), pushed.clone());
        let https = [a.http_addr, b.http_addr];
        std::thread::spawn(move || {
            let list: Vec<String> = (1..=PLAYERS).map(|i| (300 + i).to_string()).collect();
            let mut k = 0;
            while !stop.load(Ordering::Acquire) {
                let body = format!("push-{k}");
                let (status, text) = common::http(
                    https[k % 2],
                    "POST",
                    &format!("/v1/push?players={}&msg=5", list.join(",")),
                    body.as_bytes(),
                );
                assert_eq!(status, 200, "{text}");
                assert!(
                    text.contains("\"offline\":0"),
                    "push {k} via {}: {text}",
                    https[k % 2]
                );
                pushed.lock().expect("lock").push(body);
                k += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    // Migrate every player a -> b, then back b -> a, while all that runs.
    for (from, to) in [(a.http_addr, "gw-b"), (b.http_addr, "gw-a")] {
        for i in 1..=PLAYERS {
            let (status, text) = common::http(
                from,
                "POST",
                &format!("/v1/migrate?player={}&to={to}", 300 + i),
                b"",
            );
            assert_eq!(status, 200, "{text}");
            std::thread::sleep(Duration::from_millis(30));
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Release);
    pusher.join().expect("pusher");
    let pushed: HashSet<Vec<u8>> = pushed
        .lock()
        .expect("lock")
        .iter()
        .map(|s| s.clone().into_bytes())
        .collect();
    for t in players {
        let (player, end, stream, sent, redirects) = t.join().expect("player");
        assert_eq!(redirects, 2, "player {player} moved twice");
        let seqs: Vec<u64> = stream.keys().copied().collect();
        assert_eq!(
            seqs,
            (1..=end).collect::<Vec<_>>(),
            "player {player}: stream 1..={end}"
        );
        for req in &sent {
            let n = stream
                .values()
                .filter(|(k, r, _)| *k == Kind::Response && r == req)
                .count();
            assert_eq!(n, 1, "player {player}: req {req} answered {n} times");
        }
        let got: HashSet<Vec<u8>> = stream
            .values()
            .filter(|(k, _, _)| *k == Kind::Push)
            .map(|(_, _, b)| b.clone())
            .collect();
        for p in &pushed {
            assert!(
                got.contains(p),
                "player {player}: {} lost",
                String::from_utf8_lossy(p)
            );
        }
    }
    a.stop();
    b.stop();
    demo.stop();
}

/// Each test above, on each kind of Redis a studio runs.
macro_rules! on_each_store {
    ($($name:ident),* $(,)?) => {
        mod on_one_server {
            $(#[test] fn $name() { if let Some(mut r) = super::Backing::start(super::Kind::Server) { super::$name(&mut r) } })*
        }
        mod on_a_redis_cluster {
            $(#[test] fn $name() { if let Some(mut r) = super::Backing::start(super::Kind::Cluster) { super::$name(&mut r) } })*
        }
        mod under_sentinel {
            $(#[test] fn $name() { if let Some(mut r) = super::Backing::start(super::Kind::Sentinel) { super::$name(&mut r) } })*
        }
    };
}

on_each_store!(
    login_and_resume_on_another_gateway_take_the_player_over,
    a_dead_gateways_players_can_log_in_elsewhere_after_its_lease,
    redis_going_away_refuses_new_players_and_keeps_sessions,
    a_push_to_any_gateway_reaches_the_player_where_it_is,
    migration_redirects_the_client_and_loses_nothing,
    migration_redirects_a_websocket_client_to_the_targets_websocket_url,
    a_migration_waits_for_a_slow_request_and_its_answer_moves_with_the_player,
    migration_to_a_dead_gateway_rolls_back,
    evacuation_moves_every_player_and_each_resumes_at_the_target,
    migration_under_request_and_push_load_keeps_every_stream_whole,
);
