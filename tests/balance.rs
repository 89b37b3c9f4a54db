//! Balancing across several real backend instances, instance failure and
//! return, and health checks taking an unresponsive instance out of
//! rotation.

mod common;

use slg_gateway::client::{Client, ClientError};
use slg_gateway::config::Balance;
use slg_gateway::demo::{Answered, DemoBackend, WHOAMI};
use slg_gateway::protocol::Code;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn who(c: &mut Client) -> String {
    let r = c.request(WHOAMI, b"").expect("answer");
    assert_eq!(r.header.code, 0, "whoami failed: {:#x}", r.header.code);
    String::from_utf8(r.body.to_vec()).expect("utf-8")
}

fn demos(n: usize) -> Vec<DemoBackend> {
    (0..n)
        .map(|_| DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo"))
        .collect()
}

#[test]
fn round_robin_spreads_requests_evenly() {
    let ds = demos(3);
    let addrs: Vec<SocketAddr> = ds.iter().map(|d| d.addr).collect();
    let gw = common::balanced_gateway(&addrs, Balance::RoundRobin, |_| {});
    common::settle_backends();
    let mut c = Client::connect(gw.client_addr).expect("connect");
    let mut count: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        *count.entry(who(&mut c)).or_default() += 1;
    }
    assert_eq!(count.len(), 3, "{count:?}");
    assert!(count.values().all(|&n| n == 10), "{count:?}");
    gw.stop();
    ds.into_iter().for_each(DemoBackend::stop);
}

#[test]
fn hash_by_player_sticks_and_moves_only_the_lost_instances_players() {
    let mut ds = demos(3);
    let addrs: Vec<SocketAddr> = ds.iter().map(|d| d.addr).collect();
    let gw = common::balanced_gateway(&addrs, Balance::HashPlayer, |_| {});
    common::settle_backends();
    let mut clients: Vec<(u64, Client)> = (1..=24u64)
        .map(|p| {
            let mut c = Client::connect(gw.client_addr).expect("connect");
            c.login_demo(p).expect("login");
            (p, c)
        })
        .collect();
    let mut home: HashMap<u64, String> = HashMap::new();
    for (p, c) in clients.iter_mut() {
        let first = who(c);
        for _ in 0..4 {
            assert_eq!(who(c), first, "player {p} must stick to one instance");
        }
        home.insert(*p, first);
    }
    let used: std::collections::HashSet<&String> = home.values().collect();
    assert_eq!(used.len(), 3, "24 players spread over the 3 instances");
    // One instance goes away: only its players move.
    let gone = ds.remove(0);
    let gone_addr = gone.addr.to_string();
    gone.stop();
    std::thread::sleep(Duration::from_millis(150));
    for (p, c) in clients.iter_mut() {
        let now = who(c);
        if home[p] == gone_addr {
            assert_ne!(now, gone_addr);
        } else {
            assert_eq!(now, home[p], "player {p} moved though its instance is fine");
        }
    }
    gw.stop();
    ds.into_iter().for_each(DemoBackend::stop);
}

#[test]
fn an_instance_dying_fails_exactly_its_in_flight_requests_and_comes_back() {
    let mut ds = demos(2);
    let addrs: Vec<SocketAddr> = ds.iter().map(|d| d.addr).collect();
    let gw = common::balanced_gateway(&addrs, Balance::RoundRobin, |_| {});
    common::settle_backends();
    let mut c = Client::connect(gw.client_addr).expect("connect");
    c.login_demo(9).expect("login");
    // Ten slow requests, alternating over the two instances.
    let reqs: Vec<u32> = (0..10)
        .map(|_| c.send_request(200, b"400").expect("send"))
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let dead = ds.remove(0);
    let dead_addr = dead.addr;
    dead.stop();
    let codes: Vec<u16> = reqs
        .iter()
        .map(|&r| c.response_to(r).expect("answer").header.code)
        .collect();
    let failed = codes
        .iter()
        .filter(|&&x| x == u16::from(Code::BackendUnavailable))
        .count();
    let ok = codes.iter().filter(|&&x| x == 0).count();
    assert_eq!(
        (failed, ok),
        (5, 5),
        "exactly the dead instance's half fails: {codes:?}"
    );
    // The rest carry on with the survivor.
    for _ in 0..6 {
        assert_eq!(who(&mut c), addrs[1].to_string());
    }
    // The instance restarts on its address and comes back into rotation.
    let back = DemoBackend::start(dead_addr).expect("restart on the same port");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if who(&mut c) == dead_addr.to_string() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted instance never came back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    gw.stop();
    back.stop();
    ds.into_iter().for_each(DemoBackend::stop);
}

#[test]
fn an_unresponsive_instance_leaves_rotation() {
    let good = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    // Accepts connections, never answers anything: a hung backend.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hung_addr = hung.local_addr().expect("addr");
    let keep = std::thread::spawn(move || {
        let mut held = Vec::new();
        hung.set_nonblocking(true).expect("nonblocking");
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok((s, _)) = hung.accept() {
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let gw = common::balanced_gateway(&[hung_addr, good.addr], Balance::RoundRobin, |c| {
        c.backend.health_interval = Duration::from_millis(50);
        c.backend.health_timeout = Duration::from_millis(150);
        c.backend.request_timeout = Duration::from_millis(500);
    });
    // Wait (up to 5 s, for a loaded machine) until the hung instance has
    // missed its health check.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !common::http(gw.http_addr, "GET", "/metrics", b"")
        .1
        .contains("slg_backend_connections{shard=\"0\",state=\"unhealthy\"} 1")
    {
        assert!(
            Instant::now() < deadline,
            "the hung instance never left rotation"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = Client::connect(gw.client_addr).expect("connect");
    for _ in 0..10 {
        assert_eq!(
            who(&mut c),
            good.addr.to_string(),
            "only the healthy instance serves"
        );
    }
    let metrics = common::http(gw.http_addr, "GET", "/metrics", b"").1;
    assert!(
        metrics.contains("slg_backend_unhealthy_total{shard=\"0\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("slg_backend_connections{shard=\"0\",state=\"unhealthy\"} 1"),
        "{metrics}"
    );
    gw.stop();
    good.stop();
    keep.join().expect("hung backend thread");
}

#[test]
fn broadcast_goes_to_every_instance_and_answers_once() {
    let mut ds = demos(3);
    let addrs: Vec<SocketAddr> = ds.iter().map(|d| d.addr).collect();
    let gw = common::balanced_gateway(&addrs, Balance::Broadcast, |_| {});
    common::settle_backends();
    let mut c = Client::connect(gw.client_addr).expect("connect");
    c.login_demo(77).expect("login");
    let served = who(&mut c);
    assert!(addrs.iter().any(|a| a.to_string() == served));
    // Each of the three instances answered; the client got exactly one.
    c.timeout = Duration::from_millis(200);
    let stray = c.recv();
    assert!(
        matches!(stray, Err(ClientError::Timeout(_))),
        "one answer per broadcast request, then silence: {stray:?}"
    );
    // With one instance gone, still one successful answer.
    ds.remove(0).stop();
    std::thread::sleep(Duration::from_millis(100));
    c.timeout = Duration::from_secs(5);
    assert_ne!(who(&mut c), addrs[0].to_string());
    // With all gone: one failure.
    ds.into_iter().for_each(DemoBackend::stop);
    std::thread::sleep(Duration::from_millis(100));
    let r = c.request(WHOAMI, b"").expect("answer");
    assert_eq!(r.header.code, u16::from(Code::BackendUnavailable));
    gw.stop();
}

#[test]
fn several_connections_per_instance() {
    let ds = demos(2);
    let addrs: Vec<SocketAddr> = ds.iter().map(|d| d.addr).collect();
    let gw = common::balanced_gateway(&addrs, Balance::RoundRobin, |c| {
        if let Some(s) = c.services.get_mut("demo") {
            s.connections = 3;
        }
    });
    common::settle_backends();
    let metrics = common::http(gw.http_addr, "GET", "/metrics", b"").1;
    assert!(
        metrics.contains("slg_backend_connections{shard=\"0\",state=\"up\"} 6"),
        "{metrics}"
    );
    let mut c = Client::connect(gw.client_addr).expect("connect");
    let mut count: HashMap<String, usize> = HashMap::new();
    for _ in 0..12 {
        *count.entry(who(&mut c)).or_default() += 1;
    }
    assert!(count.values().all(|&n| n == 6), "{count:?}");
    gw.stop();
    ds.into_iter().for_each(DemoBackend::stop);
}

#[test]
fn idempotent_requests_are_retried_on_another_instance() {
    let mut ds = demos(2);
    let addrs: Vec<SocketAddr> = ds.iter().map(|d| d.addr).collect();
    let gw = common::balanced_gateway(&addrs, Balance::RoundRobin, |c| {
        for r in c.routes.iter_mut().filter(|r| r.msgs == (200, 200)) {
            r.idempotent = true;
        }
    });
    common::settle_backends();
    let mut c = Client::connect(gw.client_addr).expect("connect");
    c.login_demo(88).expect("login");
    let reqs: Vec<u32> = (0..10)
        .map(|_| c.send_request(200, b"400").expect("send"))
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    ds.remove(0).stop();
    let codes: Vec<u16> = reqs
        .iter()
        .map(|&r| c.response_to(r).expect("answer").header.code)
        .collect();
    assert!(
        codes.iter().all(|&x| x == 0),
        "every request retried and answered: {codes:?}"
    );
    let metrics = common::http(gw.http_addr, "GET", "/metrics", b"").1;
    assert!(
        metrics.contains("slg_backend_retries_total{shard=\"0\"} 5"),
        "{metrics}"
    );
    gw.stop();
    ds.into_iter().for_each(DemoBackend::stop);
}

#[test]
fn the_demo_backend_logs_only_the_answers_it_wrote() {
    let (tx, rx) = flume::unbounded::<Answered>();
    let d = DemoBackend::start_with_log("127.0.0.1:0".parse().expect("addr"), tx.clone())
        .expect("demo");
    let addr = d.addr;
    let gw = common::balanced_gateway(&[addr], Balance::RoundRobin, |_| {});
    common::settle_backends();
    let mut c = Client::connect(gw.client_addr).expect("connect");
    c.login_demo(9).expect("login");
    // msg 200 waits the body's leading digits, then echoes the body.
    let r = c.request(200, b"5:tagged").expect("answer");
    assert_eq!((r.header.code, &r.body[..]), (0, &b"5:tagged"[..]));
    let slow = c.send_request(200, b"3000:never").expect("send");
    std::thread::sleep(Duration::from_millis(100));
    d.stop();
    let r = c.response_to(slow).expect("answer");
    assert_eq!(r.header.code, u16::from(Code::BackendUnavailable));
    // A restarted instance reports on the same channel.
    let back = common::start_logged(addr, &tx);
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.request(200, b"0:again").expect("answer").header.code != 0 {
        assert!(Instant::now() < deadline, "the instance never came back");
        std::thread::sleep(Duration::from_millis(20));
    }
    gw.stop();
    back.stop();
    drop(tx);
    let log: Vec<(u32, u16, u64, Vec<u8>)> = rx
        .try_iter()
        .map(|a| {
            assert_eq!(a.by, addr);
            (a.msg_id, a.code, a.player, a.body)
        })
        .collect();
    assert_eq!(
        log,
        vec![
            (1, 0, 0, vec![]),
            (200, 0, 9, b"5:tagged".to_vec()),
            (200, 0, 9, b"0:again".to_vec()),
        ],
        "the answer cut off by the stop is not logged"
    );
}
