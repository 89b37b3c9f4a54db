//! Live reload of the config file (POST /v1/reload and SIGHUP): services
//! and routes come and go while clients stay connected and requests in
//! flight finish; a bad file changes nothing.

mod common;

use common::{http, wait_exit};
use slg_gateway::client::Client;
use slg_gateway::demo::{DemoBackend, WHOAMI};
use slg_gateway::protocol::Code;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A config with service "demo" at `main`, and `extra` lines of RON put
/// before the closing `services` brace and the closing `routes` bracket.
fn config(main: SocketAddr, extra_service: &str, extra_route: &str) -> String {
    common::config_text(main)
        .replace(
            "            connections: 1,\n        ),\n    },",
            &format!("            connections: 1,\n        ),\n{extra_service}    }},"),
        )
        .replace(
            "order: PerPlayer),\n    ],",
            &format!("order: PerPlayer),\n{extra_route}    ],"),
        )
}

fn who(c: &mut Client) -> (u16, String) {
    let r = c.request(WHOAMI, b"").expect("answer");
    (r.header.code, String::from_utf8_lossy(&r.body).to_string())
}

#[test]
fn reload_changes_services_and_routes_under_live_clients() {
    let a = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo a");
    let b = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo b");
    let slow = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo slow");
    let dir = std::env::temp_dir().join(format!("slg-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("gw.ron");
    // Start: msg 200 (the demo's delay) goes to the "slow" service.
    let slow_service = format!("        \"slow\": (instances: [\"{}\"]),\n", slow.addr);
    let start = config(
        a.addr,
        &slow_service,
        "        (msgs: (300, 300), service: \"slow\", auth: true),\n",
    )
    .replace(
        "(msgs: (200, 200), service: \"demo\", auth: true)",
        "(msgs: (200, 200), service: \"slow\", auth: true)",
    );
    std::fs::write(&path, start).expect("write");
    let (mut gw, addr, http_addr) = common::spawn_gateway(&path, 2);
    let mut c = Client::connect(addr).expect("connect");
    c.login_demo(5).expect("login");
    assert_eq!(
        who(&mut c).0,
        u16::from(Code::NoRoute),
        "no route for msg 3 yet"
    );
    // A slow request in flight on the service the reload removes.
    let in_flight = c.send_request(200, b"400").expect("send");
    std::thread::sleep(Duration::from_millis(50));

    // Reload: service "extra" (b) and a route to it for WHOAMI; "slow" and
    // its route go.
    let extra = format!("        \"extra\": (instances: [\"{}\"]),\n", b.addr);
    std::fs::write(
        &path,
        config(
            a.addr,
            &extra,
            "        (msgs: (3, 3), service: \"extra\"),\n",
        ),
    )
    .expect("write");
    let (status, body) = http(http_addr, "POST", "/v1/reload", b"");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        who(&mut c),
        (0, b.addr.to_string()),
        "the new route and service serve"
    );
    // The request sent before the reload was answered by its backend,
    // whose connection the reload retired only after that.
    let r = c.response_to(in_flight).expect("in-flight answer");
    assert_eq!(
        r.header.code, 0,
        "answered by the removed service's backend, not failed"
    );
    assert_eq!(
        c.request(300, b"").expect("answer").header.code,
        u16::from(Code::NoRoute),
        "the removed route is gone"
    );
    // Msg 200 now goes to "demo" (its route changed service).
    assert_eq!(c.request(200, b"1").expect("answer").header.code, 0);
    assert_eq!(c.request(100, b"still here").expect("echo").header.code, 0);

    // A bad file is refused with the reason, and nothing changes.
    std::fs::write(&path, "( this is not a config").expect("write");
    let (status, body) = http(http_addr, "POST", "/v1/reload", b"");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("gw.ron"), "{body}");
    assert_eq!(who(&mut c), (0, b.addr.to_string()));
    // An invalid one too (a route to an unknown service).
    std::fs::write(
        &path,
        config(a.addr, "", "        (msgs: (3, 3), service: \"nope\"),\n"),
    )
    .expect("write");
    let (status, body) = http(http_addr, "POST", "/v1/reload", b"");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("nope"), "{body}");
    assert_eq!(who(&mut c), (0, b.addr.to_string()));

    // SIGHUP reloads too: back to the plain config.
    std::fs::write(&path, config(a.addr, "", "")).expect("write");
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe {
        libc::kill(gw.0.id() as i32, libc::SIGHUP);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while who(&mut c).0 != u16::from(Code::NoRoute) {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The client never left: its seq went on through all of it.
    let last = c.ping().expect("ping");
    assert!(last >= 8, "seq {last}");
    common::sigterm(&gw.0);
    assert_eq!(wait_exit(&mut gw.0, Duration::from_secs(10)), Some(0));
    for d in [a, b, slow] {
        d.stop();
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_shorter_request_timeout_applies_at_once_after_a_reload() {
    let demo = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    let mut cfg = common::config(demo.addr, 1);
    cfg.backend.request_timeout = Duration::from_secs(3);
    let mut gw = slg_gateway::gateway::Gateway::start(cfg.clone()).expect("gateway");
    let mut c = Client::connect(gw.client_addr).expect("connect");
    c.login_demo(3).expect("login");
    let long = c.send_request(200, b"2500").expect("send");
    std::thread::sleep(Duration::from_millis(50));
    cfg.backend.request_timeout = Duration::from_millis(300);
    gw.reload(cfg).expect("reload");
    let t = Instant::now();
    let short = c.send_request(200, b"1500").expect("send");
    let r = c.response_to(short).expect("answer");
    assert_eq!(r.header.code, u16::from(Code::Timeout));
    assert!(
        t.elapsed() < Duration::from_millis(1200),
        "timed out after {:?}",
        t.elapsed()
    );
    assert_eq!(
        c.response_to(long).expect("answer").header.code,
        0,
        "the older request keeps its deadline"
    );
    gw.stop();
    demo.stop();
}
