//! End-to-end behaviour of the core gateway over real sockets: login,
//! sequencing, routing errors, backend failures and protocol errors.

mod common;

use common::Harness;
use slg_gateway::client::{Client, ClientError};
use slg_gateway::protocol::{encode, Code, Header, Kind};
use std::io::Write;
use std::time::Duration;

const LOGIN: u32 = 1;
const ECHO_OPEN: u32 = 2;
const ECHO: u32 = 100;
const DELAY: u32 = 200;

fn code(c: Code) -> u16 {
    c.into()
}

#[test]
fn login_then_requests_get_seq_1_2_3_without_gap() {
    let h = Harness::start(2);
    let mut c = h.client();
    let li = c.login_demo(42).expect("login");
    assert_eq!(li.player, 42);
    assert_eq!(li.token.len(), 24);
    assert_eq!((li.resume_point, li.gap), (0, false));
    assert_eq!(li.response.header.code, 0);
    assert_eq!(li.response.header.seq, 1);
    for i in 0..20u64 {
        let body = format!("hello {i}");
        let r = c.request(ECHO, body.as_bytes()).expect("echo");
        assert_eq!(r.header.code, 0);
        assert_eq!(r.header.msg_id, ECHO);
        assert_eq!(r.header.seq, i + 2);
        assert_eq!(&r.body[..], body.as_bytes());
    }
    // PONG reports the last seq assigned.
    assert_eq!(c.ping().expect("ping"), 21);
}

#[test]
fn requests_before_login_get_not_authenticated_with_seq_0() {
    let h = Harness::start(2);
    let mut c = h.client();
    let r = c.request(ECHO, b"x").expect("response");
    assert_eq!(r.header.code, code(Code::NotAuthenticated));
    assert_eq!(r.header.seq, 0);
    assert!(r.body.is_empty());
    // A route without auth works before login, still with seq 0.
    let r = c.request(ECHO_OPEN, b"open").expect("response");
    assert_eq!(
        (r.header.code, r.header.seq, &r.body[..]),
        (0, 0, &b"open"[..])
    );
    assert_eq!(c.ping().expect("ping"), 0);
}

#[test]
fn second_login_while_pending_gets_login_in_progress() {
    let h = Harness::start(2);
    let mut c = h.client();
    // Both logins and an auth request in one write: the gateway reads them
    // together, before the backend can answer the first.
    let mut buf = bytes::BytesMut::new();
    for (req_id, msg, body) in [
        (1, LOGIN, &b"5"[..]),
        (2, LOGIN, &b"6"[..]),
        (3, ECHO, &b"e"[..]),
    ] {
        let mut hd = Header::new(Kind::Request);
        hd.msg_id = msg;
        hd.req_id = req_id;
        encode(&mut buf, &hd, body);
    }
    c.stream().write_all(&buf).expect("write");
    let second = c.response_to(2).expect("second login answered");
    assert_eq!(second.header.code, code(Code::LoginInProgress));
    assert_eq!(second.header.seq, 0);
    let third = c.response_to(3).expect("auth request answered");
    assert_eq!(third.header.code, code(Code::NotAuthenticated));
    let session = c
        .wait_for(|f| f.header.kind == Kind::Session)
        .expect("session");
    assert_eq!(
        slg_gateway::protocol::parse_session_body(&session.body).map(|x| x.0),
        Some(5)
    );
    let first = c.response_to(1).expect("first login answered");
    assert_eq!((first.header.code, first.header.seq), (0, 1));
    // A login on an authenticated session.
    let again = c.request(LOGIN, b"5").expect("answer");
    assert_eq!(
        (again.header.code, again.header.seq),
        (code(Code::AlreadyAuthenticated), 2)
    );
}

#[test]
fn rejected_login_leaves_the_session_usable() {
    let h = Harness::start(2);
    let mut c = h.client();
    match c.login(LOGIN, b"not-a-number") {
        Err(ClientError::LoginRejected(code)) => {
            assert_eq!(code, slg_gateway::demo::LOGIN_REJECTED)
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    match c.login(LOGIN, b"0") {
        Err(ClientError::LoginRejected(code)) => {
            assert_eq!(code, slg_gateway::demo::LOGIN_REJECTED)
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    let r = c.request(ECHO, b"x").expect("response");
    assert_eq!(r.header.code, code(Code::NotAuthenticated));
    let li = c.login_demo(77).expect("login after rejections");
    assert_eq!((li.player, li.response.header.seq), (77, 1));
    assert_eq!(c.request(ECHO, b"y").expect("echo").header.seq, 2);
}

#[test]
fn unknown_msg_id_gets_no_route() {
    let h = Harness::start(1);
    let mut c = h.client();
    let r = c.request(50, b"").expect("response");
    assert_eq!(
        (r.header.code, r.header.seq, r.header.msg_id),
        (code(Code::NoRoute), 0, 50)
    );
    c.login_demo(3).expect("login");
    // After login, gateway errors are sequenced like everything else.
    let r = c.request(9999, b"").expect("response");
    assert_eq!((r.header.code, r.header.seq), (code(Code::NoRoute), 2));
}

#[test]
fn slow_backend_answer_gets_timeout_and_the_late_answer_is_dropped() {
    let h = Harness::with(2, |cfg| {
        cfg.backend.request_timeout = Duration::from_millis(300)
    });
    let mut c = h.client();
    c.login_demo(9).expect("login");
    let r = c.request(DELAY, b"1000").expect("response");
    assert_eq!(
        (r.header.code, r.header.seq, r.header.msg_id),
        (code(Code::Timeout), 2, DELAY)
    );
    // The late answer must not reach the client: wait past it, then the
    // next response has the next seq and no stray frame came in between.
    std::thread::sleep(Duration::from_millis(900));
    let r = c.request(ECHO, b"after").expect("echo");
    assert_eq!((r.header.code, r.header.seq), (0, 3));
    c.timeout = Duration::from_millis(200);
    assert!(
        matches!(c.recv(), Err(ClientError::Timeout(_))),
        "no second answer"
    );
}

#[test]
fn out_of_order_backend_answers_reach_the_right_requests() {
    let h = Harness::start(2);
    let mut c = h.client();
    c.login_demo(11).expect("login");
    let slow = c.send_request(DELAY, b"400").expect("send");
    let medium = c.send_request(DELAY, b"150").expect("send");
    let fast = c.send_request(ECHO, b"fast").expect("send");
    let order: Vec<(u32, u64)> = (0..3)
        .map(|_| {
            let f = c
                .wait_for(|f| f.header.kind == Kind::Response)
                .expect("response");
            assert_eq!(f.header.code, 0);
            (f.header.req_id, f.header.seq)
        })
        .collect();
    assert_eq!(order, vec![(fast, 2), (medium, 3), (slow, 4)]);
}

#[test]
fn dead_backend_gives_backend_unavailable() {
    let h = Harness::without_backend(2);
    let mut c = h.client();
    let r = c.request(LOGIN, b"1").expect("answer");
    assert_eq!(
        (r.header.code, r.header.seq),
        (code(Code::BackendUnavailable), 0)
    );
    // The session was not left authenticating: a second try is a login again.
    let r = c.request(LOGIN, b"1").expect("answer");
    assert_eq!(r.header.code, code(Code::BackendUnavailable));
}

#[test]
fn backend_dying_fails_requests_in_flight() {
    let mut h = Harness::start(1);
    let mut c = h.client();
    c.login_demo(5).expect("login");
    let req = c.send_request(DELAY, b"5000").expect("send");
    std::thread::sleep(Duration::from_millis(100));
    h.kill_backend();
    let r = c.response_to(req).expect("answer");
    assert_eq!(
        (r.header.code, r.header.seq),
        (code(Code::BackendUnavailable), 2)
    );
    let r = c.request(ECHO, b"x").expect("answer");
    assert_eq!(
        (r.header.code, r.header.seq),
        (code(Code::BackendUnavailable), 3)
    );
}

fn raw_frame(len: u32, kind: u8) -> Vec<u8> {
    let mut v = len.to_be_bytes().to_vec();
    v.push(kind);
    v.extend_from_slice(&[0u8; 19]);
    v
}

#[test]
fn bad_frames_kick_only_their_own_connection() {
    let h = Harness::start(2);
    let mut good = h.client();
    good.login_demo(100).expect("login");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("len below 20", raw_frame(19, 0x01)),
        ("len above max_frame", raw_frame(65537, 0x01)),
        ("lying huge len", raw_frame(u32::MAX, 0x01)),
        ("unknown kind", raw_frame(20, 0x7f)),
        ("gateway kind from a client", raw_frame(20, 0x81)),
    ];
    for (what, bytes) in cases {
        let mut bad = h.client();
        bad.stream().write_all(&bytes).expect("write");
        let kick = bad
            .expect_kick()
            .unwrap_or_else(|e| panic!("{what}: no KICK: {e}"));
        assert_eq!(kick, code(Code::ProtocolError), "{what}");
        assert!(bad.is_closed(), "{what}: connection must close");
        let r = good
            .request(ECHO, what.as_bytes())
            .expect("the other client carries on");
        assert_eq!(&r.body[..], what.as_bytes());
    }
    // A logged-in client that breaks the protocol is kicked too.
    let mut bad = h.client();
    bad.login_demo(101).expect("login");
    bad.stream().write_all(&raw_frame(10, 0x01)).expect("write");
    assert_eq!(bad.expect_kick().expect("kick"), code(Code::ProtocolError));
    assert!(bad.is_closed());
    assert_eq!(good.request(ECHO, b"still").expect("echo").header.code, 0);
}

#[test]
fn many_clients_on_several_shards_get_gap_free_seqs() {
    let h = Harness::start(4);
    let addr = h.addr();
    let threads: Vec<_> = (0..16u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut clients: Vec<(u64, Client)> = (0..8u64)
                    .map(|i| {
                        let player = 1000 + t * 8 + i;
                        let mut c = Client::connect(addr).expect("connect");
                        c.login_demo(player).expect("login");
                        (player, c)
                    })
                    .collect();
                for round in 0..25u64 {
                    for (player, c) in clients.iter_mut() {
                        let body = format!("{player}:{round}");
                        let r = c.request(ECHO, body.as_bytes()).expect("echo");
                        assert_eq!(r.header.code, 0);
                        assert_eq!(r.header.seq, round + 2, "player {player}");
                        assert_eq!(&r.body[..], body.as_bytes());
                    }
                }
                clients.len()
            })
        })
        .collect();
    let total: usize = threads
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .sum();
    assert_eq!(total, 128);
    // The players were spread over all shards' homes, so most logins moved.
    let homes: std::collections::HashSet<usize> =
        (1000..1128u64).map(|p| shards::home_shard(p, 4)).collect();
    assert_eq!(homes.len(), 4);
}

#[test]
fn a_new_login_replaces_the_old_session() {
    let h = Harness::start(2);
    let mut old = h.client();
    old.login_demo(555).expect("login");
    assert_eq!(old.request(ECHO, b"a").expect("echo").header.seq, 2);
    let mut new = h.client();
    let li = new.login_demo(555).expect("second login");
    assert_eq!(old.expect_kick().expect("kick"), code(Code::Replaced));
    assert!(old.is_closed());
    // Nothing was acknowledged: R = 0, and seq 1 and 2 are replayed before
    // the login response, which takes the next seq.
    assert_eq!((li.resume_point, li.gap), (0, false));
    assert_eq!(li.response.header.seq, 3);
    let replayed: Vec<u64> = (0..2)
        .map(|_| new.recv().expect("replay").header.seq)
        .collect();
    assert_eq!(replayed, vec![1, 2]);
    assert_eq!(new.request(ECHO, b"b").expect("echo").header.seq, 4);
}

#[test]
fn connections_beyond_max_connections_are_closed_at_once() {
    let h = Harness::with(2, |cfg| cfg.max_connections = 2);
    let mut a = h.client();
    let mut b = h.client();
    a.login_demo(1).expect("login a");
    b.login_demo(2).expect("login b");
    let mut c = h.client();
    c.timeout = Duration::from_secs(2);
    assert!(c.is_closed(), "the third connection is refused");
    drop(a);
    // Once one leaves, a new one is served.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut d = h.client();
        d.timeout = Duration::from_secs(2);
        if d.login_demo(4).is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a slot never freed up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(b.request(ECHO, b"b").expect("echo").header.code, 0);
}

#[test]
fn idle_sessions_are_kicked() {
    let h = Harness::with(1, |cfg| cfg.session_idle = Duration::from_millis(300));
    let mut c = h.client();
    c.login_demo(8).expect("login");
    assert_eq!(c.expect_kick().expect("kick"), code(Code::Idle));
    assert!(c.is_closed());
}

#[test]
fn bye_ends_the_session() {
    let h = Harness::start(2);
    let mut c = h.client();
    c.login_demo(31).expect("login");
    c.send(&Header::new(Kind::Bye), &[]).expect("bye");
    assert!(c.is_closed());
    // The player ended: a new login starts its seq again at 1.
    let mut c = h.client();
    assert_eq!(c.login_demo(31).expect("login").response.header.seq, 1);
}

#[test]
fn bytes_read_past_the_login_move_with_the_connection() {
    // Login plus the first half of the next request in one write: the
    // accepting shard reads both, and the half frame must travel with the
    // fd to the player's home shard, where the second half completes it.
    let h = Harness::start(4);
    for player in 700..716u64 {
        let mut c = h.client();
        let mut buf = bytes::BytesMut::new();
        let mut login = Header::new(Kind::Request);
        login.msg_id = LOGIN;
        login.req_id = 1;
        encode(&mut buf, &login, player.to_string().as_bytes());
        let mut echo = Header::new(Kind::Request);
        echo.msg_id = ECHO;
        echo.req_id = 2;
        let mut next = bytes::BytesMut::new();
        encode(&mut next, &echo, b"split across the hand-off");
        let (first, second) = next.split_at(13);
        buf.extend_from_slice(first);
        c.stream().write_all(&buf).expect("write");
        let login_answer = c.response_to(1).expect("login answer");
        assert_eq!((login_answer.header.code, login_answer.header.seq), (0, 1));
        c.stream().write_all(second).expect("write rest");
        let r = c.response_to(2).expect("echo");
        assert_eq!((r.header.code, r.header.seq), (0, 2), "player {player}");
        assert_eq!(&r.body[..], b"split across the hand-off");
    }
}

#[test]
fn a_second_gateway_on_the_same_port_is_refused_not_shared() {
    let h = common::Harness::start(1);
    let taken = h.addr();
    let demo = h.demo.as_ref().expect("demo").addr;
    for (what, tune) in [
        (
            "listen",
            Box::new(move |c: &mut slg_gateway::config::Config| c.listen = taken.to_string())
                as Box<dyn Fn(&mut slg_gateway::config::Config)>,
        ),
        ("http_listen", {
            let http = h.gateway.as_ref().expect("gw").http_addr;
            Box::new(move |c: &mut slg_gateway::config::Config| c.http_listen = http.to_string())
        }),
    ] {
        let mut cfg = common::config(demo, 1);
        tune(&mut cfg);
        match slg_gateway::gateway::Gateway::start(cfg) {
            Ok(g) => {
                g.stop();
                panic!("a second gateway started on the {what} port of the first");
            }
            Err(e) => assert!(e.to_string().contains("already in use"), "{what}: {e}"),
        }
    }
    // The first one still serves everyone.
    let mut c = h.client();
    c.login_demo(5).expect("login");
}
