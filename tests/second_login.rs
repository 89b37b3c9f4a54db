//! `on_second_login`: with `RejectNew` a login of a player who already has
//! a live session is answered `ALREADY_ONLINE` and the live session plays
//! on untouched; a resume with the player's valid token still replaces it
//! (the same client coming back); a player without a live session (its
//! connection dropped) logs in as always. On one gateway, and across two
//! gateways on Redis (the holder decides). `ReplaceOld`, the default, is
//! today's rule and is what every other test runs with.

mod common;

use common::ha::{Backing, Kind};
use common::Harness;
use slg_gateway::client::{Client, ClientError};
use slg_gateway::config::SecondLogin;
use slg_gateway::demo::DemoBackend;
use slg_gateway::gateway::Gateway;
use slg_gateway::protocol::Code;
use std::time::{Duration, Instant};

const ECHO: u32 = 100;

fn refused(r: Result<slg_gateway::client::LoggedIn, ClientError>) -> bool {
    matches!(r, Err(ClientError::LoginRejected(c)) if c == u16::from(Code::AlreadyOnline))
}

#[test]
fn reject_new_keeps_the_live_session_and_a_resume_still_replaces_it() {
    let h = Harness::with(2, |c| c.on_second_login = SecondLogin::RejectNew);
    let mut first = Client::connect(h.addr()).expect("connect");
    let li = first.login_demo(5).expect("login");
    assert_eq!(first.request(ECHO, b"1").expect("echo").header.code, 0);

    // A second login of player 5: refused, and the connection may log in
    // as someone else.
    let mut second = Client::connect(h.addr()).expect("connect");
    assert!(
        refused(second.login_demo(5)),
        "second login refused ALREADY_ONLINE"
    );
    assert_eq!(
        first
            .request(ECHO, b"2")
            .expect("still playing")
            .header
            .code,
        0
    );
    first.timeout = Duration::from_millis(200);
    assert!(!first.is_closed(), "the live session was not kicked");
    second
        .login_demo(6)
        .expect("another player on that connection");

    // A resume with player 5's token replaces the live session.
    let mut back = Client::connect(h.addr()).expect("connect");
    back.set_next_req_id(first.next_req_id() + 10);
    let last = first.last_seq;
    let token = {
        // The token of the latest SESSION: the login's.
        li.token.clone()
    };
    back.resume(&token, last).expect("a resume replaces");
    first.timeout = Duration::from_secs(5);
    assert_eq!(
        first.expect_kick().expect("kick"),
        u16::from(Code::Replaced)
    );
    assert_eq!(back.request(ECHO, b"3").expect("echo").header.code, 0);

    // With its connection gone, player 5 has no live session: a login
    // goes through.
    drop(back);
    let mut later = Client::connect(h.addr()).expect("connect");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match later.login_demo(5) {
            Ok(_) => break,
            Err(ClientError::LoginRejected(c))
                if c == u16::from(Code::AlreadyOnline) && Instant::now() < deadline =>
            {
                // The gateway has not seen the close yet.
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("login after the drop: {e}"),
        }
    }
    let (_, metrics) = common::http(h.http_addr(), "GET", "/metrics", b"");
    let refusals: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("slg_second_logins_refused_total"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum();
    assert!(refusals >= 1.0, "counted: {refusals}");
}

#[test]
fn reject_new_holds_across_two_gateways_on_redis() {
    let Some(redis) = Backing::start(Kind::Server) else {
        return;
    };
    let demo = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    let start = |id: &str| {
        let mut cfg = common::config(demo.addr, 2);
        cfg.listen = format!("127.0.0.1:{}", common::free_port());
        cfg.cluster = Some(redis.cluster_config(id, &cfg.listen, Duration::from_secs(5)));
        cfg.on_second_login = SecondLogin::RejectNew;
        Gateway::start(cfg).expect("gateway")
    };
    let (a, b) = (start("gw-a"), start("gw-b"));
    std::thread::sleep(Duration::from_millis(200));
    let mut on_a = Client::connect(a.client_addr).expect("connect a");
    let li = on_a.login_demo(42).expect("login on a");
    assert_eq!(on_a.request(ECHO, b"1").expect("echo").header.code, 0);

    // A login on gw-b of the player playing on gw-a: gw-a refuses to hand
    // it over, gw-b answers ALREADY_ONLINE, gw-a's session plays on.
    let mut on_b = Client::connect(b.client_addr).expect("connect b");
    assert!(refused(on_b.login_demo(42)), "refused across the cluster");
    assert_eq!(
        on_a.request(ECHO, b"2").expect("still playing").header.code,
        0
    );
    on_a.timeout = Duration::from_millis(200);
    assert!(!on_a.is_closed(), "not kicked");

    // The same client coming back on gw-b with its token: taken over.
    let last = on_a.last_seq;
    on_b.set_next_req_id(on_a.next_req_id() + 10);
    let s = on_b.resume(&li.token, last).expect("resume on b");
    assert!(!s.gap);
    on_a.timeout = Duration::from_secs(5);
    assert_eq!(on_a.expect_kick().expect("kick"), u16::from(Code::Replaced));
    let r = on_b.request(ECHO, b"3").expect("echo on b");
    assert_eq!((r.header.code, r.header.seq), (0, last + 1));
    a.stop();
    b.stop();
    demo.stop();
}
