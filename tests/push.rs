//! The push and admin HTTP API against a running gateway, with real HTTP
//! and game clients (PROTOCOL.md section 5).

mod common;

use common::{http, Harness};
use slg_gateway::client::Client;
use slg_gateway::protocol::{Code, Frame, Kind};
use std::time::Duration;

const ECHO: u32 = 100;
const DELAY: u32 = 200;

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn push(h: &Harness, players: &str, msg: u32, body: &[u8]) -> serde_json::Value {
    let (status, text) = http(
        h.http_addr(),
        "POST",
        &format!("/v1/push?players={players}&msg={msg}"),
        body,
    );
    assert_eq!(status, 200, "{text}");
    json(&text)
}

fn counts(v: &serde_json::Value) -> (u64, u64, u64) {
    (
        v["delivered"].as_u64().expect("delivered"),
        v["cached"].as_u64().expect("cached"),
        v["offline"].as_u64().expect("offline"),
    )
}

fn next_push(c: &mut Client) -> Frame {
    c.wait_for(|f| f.header.kind == Kind::Push).expect("push")
}

fn wait_offline(h: &Harness, player: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while h
        .player(player)
        .is_some_and(|i| i["online"] == serde_json::Value::Bool(true))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "player {player} still online"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn push_to_online_lingering_and_unknown_players_counts_exactly() {
    let h = Harness::start(4);
    let mut online = h.client();
    online.login_demo(1).expect("login");
    let mut gone = h.client();
    let li = gone.login_demo(2).expect("login");
    drop(gone);
    wait_offline(&h, 2);

    let c = push(&h, "1,2,3", 2001, b"hello");
    assert_eq!(counts(&c), (1, 1, 1));
    // Listing a player twice pushes once.
    let c = push(&h, "1,1", 2002, b"once");
    assert_eq!(counts(&c), (1, 0, 0));

    let p = next_push(&mut online);
    assert_eq!(
        (
            p.header.seq,
            p.header.msg_id,
            p.header.req_id,
            p.header.code
        ),
        (2, 2001, 0, 0)
    );
    assert_eq!(&p.body[..], b"hello");
    let p = next_push(&mut online);
    assert_eq!(
        (p.header.seq, p.header.msg_id, &p.body[..]),
        (3, 2002, &b"once"[..])
    );

    // The lingering player gets its push on resume.
    let mut back = h.client();
    back.resume(&li.token, 1).expect("resume");
    let p = back.recv().expect("replayed push");
    assert_eq!(
        (p.header.kind, p.header.seq, &p.body[..]),
        (Kind::Push, 2, &b"hello"[..])
    );
}

#[test]
fn pushes_interleave_with_responses_in_seq_order() {
    let h = Harness::start(2);
    let mut c = h.client();
    c.login_demo(7).expect("login"); // seq 1
    let slow = c.send_request(DELAY, b"200").expect("send");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(counts(&push(&h, "7", 3000, b"p1")), (1, 0, 0)); // seq 2
    let echo = c.request(ECHO, b"e").expect("echo"); // seq 3
    assert_eq!(echo.header.seq, 3);
    assert_eq!(counts(&push(&h, "7", 3001, b"p2")), (1, 0, 0)); // seq 4
    let late = c.response_to(slow).expect("slow"); // seq 5
    assert_eq!(late.header.seq, 5);
    let p1 = next_push(&mut c);
    let p2 = next_push(&mut c);
    assert_eq!((p1.header.seq, p2.header.seq), (2, 4));
    // The reference client checked every frame arrived as last + 1.
    assert_eq!(c.last_seq, 5);
}

#[test]
fn broadcast_reaches_players_on_every_shard() {
    let h = Harness::start(4);
    let ids: Vec<u64> = (100..116).collect();
    let homes: std::collections::HashSet<usize> =
        ids.iter().map(|&p| shards::home_shard(p, 4)).collect();
    assert_eq!(homes.len(), 4, "players on all four shards");
    let mut clients: Vec<Client> = ids
        .iter()
        .map(|&p| {
            let mut c = h.client();
            c.login_demo(p).expect("login");
            c
        })
        .collect();
    // One lingering player too.
    let mut gone = h.client();
    gone.login_demo(99).expect("login");
    drop(gone);
    wait_offline(&h, 99);
    let (status, text) = http(h.http_addr(), "POST", "/v1/broadcast?msg=9", b"to all");
    assert_eq!(status, 200, "{text}");
    assert_eq!(counts(&json(&text)), (16, 1, 0));
    for c in clients.iter_mut() {
        let p = next_push(c);
        assert_eq!(
            (p.header.seq, p.header.msg_id, &p.body[..]),
            (2, 9, &b"to all"[..])
        );
    }
}

/// Many sessions on one shard, written at the end of one batch: every
/// session gets each broadcast, in order, once. 1,300 client sockets plus
/// the gateway's.
#[test]
fn a_broadcast_to_many_sessions_of_one_shard_reaches_everyone_in_order() {
    let h = Harness::start(1);
    let mut clients: Vec<Client> = (1000..2300u64)
        .map(|p| {
            let mut c = h.client();
            c.login_demo(p).expect("login");
            c
        })
        .collect();
    for (msg, body) in [(21u32, &b"first"[..]), (22, &b"second"[..])] {
        let path = format!("/v1/broadcast?msg={msg}");
        let (status, text) = http(h.http_addr(), "POST", &path, body);
        assert_eq!(status, 200, "{text}");
        assert_eq!(counts(&json(&text)), (1300, 0, 0));
    }
    for c in clients.iter_mut() {
        let a = next_push(c);
        let b = next_push(c);
        assert_eq!(
            [
                (a.header.seq, a.header.msg_id),
                (b.header.seq, b.header.msg_id)
            ],
            [(2, 21), (3, 22)]
        );
        assert_eq!((&a.body[..], &b.body[..]), (&b"first"[..], &b"second"[..]));
    }
}

#[test]
fn admin_kick_and_player_state() {
    let h = Harness::start(2);
    let mut c = h.client();
    c.login_demo(42).expect("login");
    c.request(ECHO, b"x").expect("echo");
    c.ack().expect("ack");
    std::thread::sleep(Duration::from_millis(50));
    let info = h.player(42).expect("player");
    assert_eq!(info["player"], 42);
    assert_eq!(info["online"], true);
    assert_eq!(info["seq"], 2);
    assert_eq!(info["acked"], 2);
    assert_eq!(info["outbox"], 0);
    assert_eq!(info["shard"], shards::home_shard(42, 2) as u64);

    // A soft kick: the player lingers and may resume.
    let (status, text) = http(h.http_addr(), "POST", "/v1/kick?player=42&resume=true", b"");
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        (json(&text)["kicked"].clone(), json(&text)["ended"].clone()),
        (true.into(), false.into())
    );
    assert_eq!(c.expect_kick().expect("kick"), u16::from(Code::Admin));
    assert!(c.is_closed());
    wait_offline(&h, 42);
    assert!(h.player(42).is_some(), "a soft-kicked player lingers");
    // Without resume=true the player ends, session or not.
    let (_, text) = http(h.http_addr(), "POST", "/v1/kick?player=42", b"");
    assert_eq!(
        (json(&text)["kicked"].clone(), json(&text)["ended"].clone()),
        (false.into(), true.into())
    );
    assert!(h.player(42).is_none(), "an ended player is gone");
    let (_, text) = http(h.http_addr(), "POST", "/v1/kick?player=4242", b"");
    assert_eq!(
        (json(&text)["kicked"].clone(), json(&text)["ended"].clone()),
        (false.into(), false.into())
    );
    let (status, _) = http(
        h.http_addr(),
        "POST",
        "/v1/kick?player=42&resume=maybe",
        b"",
    );
    assert_eq!(status, 400);
}

#[test]
fn an_admin_kick_ends_the_player_and_its_token() {
    let h = Harness::start(2);
    let mut c = h.client();
    let li = c.login_demo(43).expect("login");
    c.request(100, b"x").expect("echo");
    let (status, text) = http(h.http_addr(), "POST", "/v1/kick?player=43", b"");
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        (json(&text)["kicked"].clone(), json(&text)["ended"].clone()),
        (true.into(), true.into())
    );
    assert_eq!(c.expect_kick().expect("kick"), u16::from(Code::Admin));
    assert!(c.is_closed());
    // The token no longer works; pushes count the player offline.
    let mut again = h.client();
    match again.resume(&li.token, 2) {
        Err(slg_gateway::client::ClientError::ResumeRefused(code)) => {
            assert_eq!(code, u16::from(Code::ResumeRejected))
        }
        other => panic!("a kicked player's token must be refused: {other:?}"),
    }
    let (_, text) = http(h.http_addr(), "POST", "/v1/push?players=43&msg=7", b"p");
    assert_eq!(json(&text)["offline"], 1, "{text}");
    // A new login starts a new life.
    assert_eq!(again.login_demo(43).expect("login").response.header.seq, 1);
}

#[test]
fn player_listing_pages_across_shards() {
    let h = Harness::start(4);
    let _clients: Vec<Client> = (1..=25u64)
        .map(|p| {
            let mut c = h.client();
            c.login_demo(p * 10).expect("login");
            c
        })
        .collect();
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let (status, text) = http(
            h.http_addr(),
            "GET",
            &format!("/v1/players?after={after}&limit=10"),
            b"",
        );
        assert_eq!(status, 200, "{text}");
        let page = json(&text);
        let players = page["players"].as_array().expect("array");
        seen.extend(players.iter().map(|p| p["player"].as_u64().expect("id")));
        match page["next"].as_u64() {
            Some(n) => after = n,
            None => break,
        }
    }
    assert_eq!(seen, (1..=25u64).map(|p| p * 10).collect::<Vec<_>>());
    let (status, _) = http(h.http_addr(), "GET", "/v1/players?limit=0", b"");
    assert_eq!(status, 400);
}

#[test]
fn bad_input_gets_its_status_and_changes_nothing() {
    let h = Harness::with(2, |cfg| cfg.max_frame = 1024);
    let mut c = h.client();
    c.login_demo(5).expect("login");
    let before = h.player(5).expect("player");
    let addr = h.http_addr();
    let cases: Vec<(&str, &str, Vec<u8>, u16)> = vec![
        ("POST", "/v1/push?players=5", b"x".to_vec(), 400),
        ("POST", "/v1/push?msg=1", b"x".to_vec(), 400),
        ("POST", "/v1/push?players=&msg=1", b"x".to_vec(), 400),
        ("POST", "/v1/push?players=5,abc&msg=1", b"x".to_vec(), 400),
        ("POST", "/v1/push?players=5,0&msg=1", b"x".to_vec(), 400),
        ("POST", "/v1/push?players=5&msg=-1", b"x".to_vec(), 400),
        (
            "POST",
            "/v1/push?players=5&msg=99999999999",
            b"x".to_vec(),
            400,
        ),
        ("POST", "/v1/broadcast", b"x".to_vec(), 400),
        ("POST", "/v1/kick?player=x", b"".to_vec(), 400),
        ("POST", "/v1/kick", b"".to_vec(), 400),
        ("GET", "/v1/players/abc", b"".to_vec(), 400),
        ("GET", "/v1/players/0", b"".to_vec(), 400),
        ("GET", "/v1/players/6", b"".to_vec(), 404),
        ("GET", "/v1/nothing", b"".to_vec(), 404),
        ("GET", "/v1/push?players=5&msg=1", b"".to_vec(), 405),
        ("DELETE", "/v1/players/5", b"".to_vec(), 405),
        ("GET", "/v1/kick?player=5", b"".to_vec(), 405),
        // Body over max_frame - 20 = 1004 bytes.
        ("POST", "/v1/push?players=5&msg=1", vec![b'x'; 1005], 413),
    ];
    for (method, path, body, want) in &cases {
        let (status, text) = http(addr, method, path, body);
        assert_eq!(status, *want, "{method} {path}: {text}");
        assert!(
            json(&text)["error"].is_string(),
            "{method} {path}: JSON error body"
        );
    }
    // 411 and 431 need hand-made requests.
    let raw = |bytes: &[u8]| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(bytes).expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    assert!(raw(b"POST /v1/push?players=5&msg=1 HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 411"));
    let huge = format!(
        "POST /v1/push?players=5&msg=1 HTTP/1.1\r\nX: {}\r\nContent-Length: 1\r\n\r\nx",
        "y".repeat(40_000)
    );
    assert!(raw(huge.as_bytes()).starts_with("HTTP/1.1 431"));
    // The largest allowed body is fine.
    assert_eq!(counts(&push(&h, "5", 1, &[b'x'; 1004])), (1, 0, 0));
    // Nothing but that one push changed the player.
    let after = h.player(5).expect("player");
    assert_eq!(after["seq"].as_u64(), before["seq"].as_u64().map(|s| s + 1));
    let p = next_push(&mut c);
    assert_eq!(p.body.len(), 1004);
}

#[test]
fn push_token_is_required_when_configured() {
    let h = Harness::with(2, |cfg| cfg.push_token = Some("s3cret".into()));
    let mut c = h.client();
    c.login_demo(8).expect("login");
    let addr = h.http_addr();
    let send = |auth: Option<&str>| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let auth = auth
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        let req = format!("POST /v1/push?players=8&msg=1 HTTP/1.1\r\n{auth}Content-Length: 2\r\nConnection: close\r\n\r\nhi");
        s.write_all(req.as_bytes()).expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    assert!(send(None).starts_with("HTTP/1.1 401"));
    assert!(send(Some("Bearer wrong")).starts_with("HTTP/1.1 401"));
    assert!(send(Some("Bearer s3cret!")).starts_with("HTTP/1.1 401"));
    assert!(send(Some("s3cret")).starts_with("HTTP/1.1 401"));
    let (status, _) = http(addr, "GET", "/healthz", b"");
    assert_eq!(status, 401, "every request needs the token");
    let ok = send(Some("Bearer s3cret"));
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    // Only the authorized push reached the player.
    let p = next_push(&mut c);
    assert_eq!((p.header.seq, &p.body[..]), (2, &b"hi"[..]));
    assert_eq!(c.ping().expect("ping"), 2);
}

#[test]
fn concurrent_pushes_keep_per_connection_order_for_each_player() {
    let h = Harness::start(4);
    let players = [301u64, 302, 303, 304];
    let mut clients: Vec<Client> = players
        .iter()
        .map(|&p| {
            let mut c = h.client();
            c.login_demo(p).expect("login");
            c
        })
        .collect();
    let addr = h.http_addr();
    const SENDERS: usize = 4;
    const EACH: usize = 25;
    let threads: Vec<_> = (0..SENDERS)
        .map(|s| {
            std::thread::spawn(move || {
                for i in 0..EACH {
                    let body = format!("{s}:{i}");
                    let (status, text) = http(
                        addr,
                        "POST",
                        "/v1/push?players=301,302,303,304&msg=77",
                        body.as_bytes(),
                    );
                    assert_eq!(status, 200, "{text}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("sender");
    }
    for c in clients.iter_mut() {
        let mut next = [0usize; SENDERS];
        for _ in 0..SENDERS * EACH {
            let p = next_push(c);
            let text = String::from_utf8(p.body.to_vec()).expect("utf-8");
            let (s, i) = text.split_once(':').expect("s:i");
            let (s, i): (usize, usize) = (s.parse().expect("s"), i.parse().expect("i"));
            assert_eq!(
                i, next[s],
                "sender {s}: pushes answered in order arrive in order"
            );
            next[s] += 1;
        }
        assert_eq!(c.last_seq, (SENDERS * EACH + 1) as u64);
    }
}

#[test]
fn metrics_pass_the_exposition_format_check() {
    let h = Harness::start(2);
    let mut c = h.client();
    c.login_demo(9).expect("login");
    c.request(ECHO, b"x").expect("echo");
    c.request(55, b"x").expect("no route");
    push(&h, "9,10", 1, b"m");
    let (status, text) = http(h.http_addr(), "GET", "/metrics", b"");
    assert_eq!(status, 200);
    // A real parser of the text format.
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("parses as Prometheus text");
    let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    assert_eq!(value("slg_logins_ok_total", None), 1.0);
    assert_eq!(
        value("slg_pushes_total", Some(("outcome", "delivered"))),
        1.0
    );
    assert_eq!(value("slg_pushes_total", Some(("outcome", "offline"))), 1.0);
    assert_eq!(
        value("slg_responses_total", Some(("code", "NO_ROUTE"))),
        1.0
    );
    assert_eq!(
        value("slg_responses_total", Some(("route", "100-199"))),
        1.0
    );
    assert_eq!(value("slg_players", Some(("state", "online"))), 1.0);
    assert_eq!(value("slg_connections", None), 1.0);
    assert!(
        text.contains("slg_backend_latency_seconds_bucket{le=\"+Inf\"} 2"),
        "login and echo timed"
    );
    // promtool is the reference check: required under CI (.ci/run installs
    // it), skipped out loud elsewhere.
    match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())
                .expect("write");
            let out = child.wait_with_output().expect("promtool");
            assert!(
                out.status.success(),
                "promtool check metrics: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // The rest of the test ran: only the promtool check is skipped.
        Err(e) => common::skip(
            &if e.kind() == std::io::ErrorKind::NotFound {
                "promtool check: promtool not installed".to_string()
            } else {
                format!("promtool check: promtool could not be started: {e}")
            },
            None,
        ),
    }
}

#[test]
fn the_push_token_opens_push_endpoints_only_and_the_admin_token_opens_all() {
    let h = Harness::with(2, |cfg| {
        cfg.push_token = Some("pusher".into());
        cfg.admin_token = Some("operator".into());
    });
    let mut c = h.client();
    c.login_demo(9).expect("login");
    let addr = h.http_addr();
    let call = |method: &str, path: &str, token: Option<&str>| -> u16 {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\n{auth}Content-Length: 2\r\nConnection: close\r\n\r\nhi"
        );
        s.write_all(req.as_bytes()).expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0)
    };
    // Push scope: either token.
    assert_eq!(
        call("POST", "/v1/push?players=9&msg=1", Some("pusher")),
        200
    );
    assert_eq!(
        call("POST", "/v1/push?players=9&msg=1", Some("operator")),
        200
    );
    assert_eq!(call("GET", "/v1/players/9", Some("pusher")), 200);
    assert_eq!(call("POST", "/v1/push?players=9&msg=1", None), 401);
    // Admin scope: the admin token only; the push token is told why not.
    for (method, path) in [
        ("POST", "/v1/kick?player=9&resume=true"),
        ("GET", "/v1/players"),
        ("GET", "/metrics"),
        ("POST", "/v1/reload"),
    ] {
        assert_eq!(call(method, path, Some("pusher")), 403, "{path}");
        assert_eq!(call(method, path, None), 401, "{path}");
        assert_eq!(call(method, path, Some("wrong")), 401, "{path}");
    }
    assert_eq!(call("GET", "/v1/players", Some("operator")), 200);
    assert_eq!(call("GET", "/healthz", Some("pusher")), 200);
    assert_eq!(call("GET", "/healthz", Some("operator")), 200);
    assert_eq!(
        call("POST", "/v1/kick?player=9&resume=true", Some("operator")),
        200
    );
}
