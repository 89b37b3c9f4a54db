//! The player's stream across connections (PROTOCOL.md section 2):
//! takeover, resume, tokens, eviction, BYE, linger and slow consumers,
//! over real TCP.

mod common;

use common::Harness;
use slg_gateway::client::{Client, ClientError};
use slg_gateway::protocol::{encode, Code, Header, Kind};
use std::io::Write;
use std::time::Duration;

const ECHO: u32 = 100;
const DELAY: u32 = 200;

fn code(c: Code) -> u16 {
    c.into()
}

/// PING acknowledging exactly `seq` (not the client's last).
fn ack_upto(c: &mut Client, seq: u64) {
    let mut h = Header::new(Kind::Ping);
    h.seq = seq;
    c.send(&h, &[]).expect("ping");
    c.wait_for(|f| f.header.kind == Kind::Pong).expect("pong");
}

fn takeover(h: &Harness, player: u64) {
    let mut a = h.client();
    a.login_demo(player).expect("login");
    for i in 0..3u64 {
        assert_eq!(a.request(ECHO, b"x").expect("echo").header.seq, i + 2);
    }
    ack_upto(&mut a, 2);
    // A request still in flight when the takeover happens.
    let slow = a.send_request(DELAY, b"300").expect("send");
    std::thread::sleep(Duration::from_millis(50));

    let mut b = h.client();
    b.set_next_req_id(slow.wrapping_add(1000));
    let li = b.login_demo(player).expect("takeover login");
    assert_eq!(
        a.expect_kick().expect("kick"),
        code(Code::Replaced),
        "player {player}"
    );
    assert!(a.is_closed());
    // SESSION R = last ack; the unacknowledged 3 and 4 are replayed before
    // the login response.
    assert_eq!((li.resume_point, li.gap), (2, false), "player {player}");
    assert_eq!(li.response.header.seq, 5);
    let replay: Vec<u64> = (0..2)
        .map(|_| b.recv().expect("replay").header.seq)
        .collect();
    assert_eq!(replay, vec![3, 4]);
    // The old session's request is answered to the new one, in sequence.
    let late = b
        .response_to(slow)
        .expect("in-flight answer reaches the new session");
    assert_eq!((late.header.code, late.header.seq), (0, 6));
    assert_eq!(b.request(ECHO, b"y").expect("echo").header.seq, 7);
}

#[test]
fn login_takeover_on_one_shard() {
    let h = Harness::start(1);
    takeover(&h, 1);
}

#[test]
fn login_takeover_across_shards() {
    // With 4 shards the kernel spreads the two connections of a player
    // over different shards for most players; both move to the home shard.
    let h = Harness::start(4);
    for player in 10..22 {
        takeover(&h, player);
    }
}

#[test]
fn resume_replays_exactly_the_missed_frames_then_goes_live() {
    // The rule itself is core_rules' (resume_replays_exactly_the_frames_after_last,
    // an_answer_after_the_connection_dropped_waits_for_the_resume); here
    // two players over four shards check the wiring: fds handed home, the
    // backend's late answer routed to the outbox.
    let h = Harness::start(4);
    for player in 40..42u64 {
        let mut a = h.client();
        let li = a.login_demo(player).expect("login");
        for _ in 0..3 {
            a.request(ECHO, b"e").expect("echo"); // seq 2, 3, 4
        }
        // Answered while nobody is connected: seq 5 waits in the outbox.
        let slow = a.send_request(DELAY, b"150").expect("send");
        drop(a);
        std::thread::sleep(Duration::from_millis(400));

        let mut b = h.client();
        // The client processed up to 3 before it lost the connection.
        let r = b.resume(&li.token, 3).expect("resume");
        assert_eq!((r.player, r.resume_point, r.gap), (player, 3, false));
        assert_ne!(r.token, li.token, "a resume issues a new token");
        let f4 = b.recv().expect("replay 4");
        let f5 = b.recv().expect("replay 5");
        assert_eq!((f4.header.seq, f5.header.seq), (4, 5));
        assert_eq!(f5.header.req_id, slow);
        // Then live, with no repeat.
        assert_eq!(b.request(ECHO, b"live").expect("echo").header.seq, 6);
        b.timeout = Duration::from_millis(200);
        assert!(
            matches!(b.recv(), Err(ClientError::Timeout(_))),
            "nothing more"
        );

        // The first token was used up: it is refused, and that connection
        // stays open and may log in.
        let mut c = h.client();
        match c.resume(&li.token, 6) {
            Err(ClientError::ResumeRefused(x)) => assert_eq!(x, code(Code::ResumeRejected)),
            other => panic!("old token must be refused: {other:?}"),
        }
        // The login takes over from b.
        let again = c.login_demo(player).expect("login after a refused resume");
        assert_eq!(again.response.header.seq, 7);
        assert_eq!(b.expect_kick().expect("kick"), code(Code::Replaced));
    }
}

#[test]
fn resume_of_an_older_session_kicks_it() {
    let h = Harness::start(2);
    let mut a = h.client();
    let li = a.login_demo(61).expect("login");
    // The old connection is still open (the client thinks it is dead).
    let mut b = h.client();
    let r = b.resume(&li.token, 1).expect("resume");
    assert_eq!(r.resume_point, 1);
    assert_eq!(a.expect_kick().expect("kick"), code(Code::Replaced));
    assert_eq!(b.request(ECHO, b"z").expect("echo").header.seq, 2);
}

#[test]
fn garbage_tokens_are_rejected_and_the_connection_stays_usable() {
    let h = Harness::start(2);
    let mut c = h.client();
    for token in [&b""[..], b"short", &[0u8; 24], &[0xff; 24], &[1u8; 200]] {
        match c.resume(token, 0) {
            Err(ClientError::ResumeRefused(x)) => assert_eq!(x, code(Code::ResumeRejected)),
            other => panic!("token {token:?}: {other:?}"),
        }
    }
    assert_eq!(c.login_demo(71).expect("login").response.header.seq, 1);
    // RESUME on a logged-in session is refused too, and changes nothing.
    match c.resume(&[0u8; 24], 1) {
        Err(ClientError::ResumeRefused(x)) => assert_eq!(x, code(Code::ResumeRejected)),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.request(ECHO, b"ok").expect("echo").header.seq, 2);
}

#[test]
fn resume_beyond_the_last_seq_is_a_protocol_error() {
    let h = Harness::start(2);
    let mut a = h.client();
    let li = a.login_demo(72).expect("login");
    drop(a);
    let mut b = h.client();
    match b.resume(&li.token, 99) {
        Err(ClientError::Kicked(x)) => assert_eq!(x, code(Code::ProtocolError)),
        other => panic!("{other:?}"),
    }
    assert!(b.is_closed());
}

#[test]
fn evicted_frames_give_resume_gap_and_a_login_gets_gap() {
    let h = Harness::with(2, |cfg| cfg.outbox.max_frames = 4);
    let mut a = h.client();
    let li = a.login_demo(80).expect("login");
    for _ in 0..10 {
        a.request(ECHO, b"e").expect("echo"); // seq 2..=11
    }
    drop(a);
    let mut b = h.client();
    match b.resume(&li.token, 2) {
        Err(ClientError::ResumeRefused(x)) => assert_eq!(x, code(Code::ResumeGap)),
        other => panic!("{other:?}"),
    }
    let info = h.player(80).expect("player");
    assert_eq!(
        (info["outbox"].as_u64(), info["evictions"].as_u64()),
        (Some(4), Some(7))
    );
    // A login on the same connection: SESSION with GAP, R = 7 (the seq
    // before the oldest retained frame), 8..=11 replayed, then seq 12.
    let li2 = b.login_demo(80).expect("login");
    assert_eq!((li2.resume_point, li2.gap), (7, true));
    assert_eq!(li2.response.header.seq, 12);
    let replay: Vec<u64> = (0..4)
        .map(|_| b.recv().expect("replay").header.seq)
        .collect();
    assert_eq!(replay, vec![8, 9, 10, 11]);
}

#[test]
fn bye_ends_the_player_and_its_token() {
    let h = Harness::start(2);
    let mut a = h.client();
    let li = a.login_demo(90).expect("login");
    a.request(ECHO, b"e").expect("echo");
    a.send(&Header::new(Kind::Bye), &[]).expect("bye");
    assert!(a.is_closed());
    assert!(h.player(90).is_none(), "the player ended at once");
    let mut b = h.client();
    match b.resume(&li.token, 2) {
        Err(ClientError::ResumeRefused(x)) => assert_eq!(x, code(Code::ResumeRejected)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_lingering_player_ends_after_player_linger() {
    let h = Harness::with(2, |cfg| cfg.player_linger = Duration::from_millis(300));
    let mut a = h.client();
    let li = a.login_demo(95).expect("login");
    a.request(ECHO, b"e").expect("echo");
    drop(a);
    std::thread::sleep(Duration::from_millis(100));
    let lingering = h.player(95).expect("still held while lingering");
    assert_eq!(lingering["online"], serde_json::Value::Bool(false));
    std::thread::sleep(Duration::from_millis(700));
    assert!(h.player(95).is_none(), "ended and released");
    let mut b = h.client();
    match b.resume(&li.token, 2) {
        Err(ClientError::ResumeRefused(x)) => assert_eq!(x, code(Code::ResumeRejected)),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        b.login_demo(95).expect("login").response.header.seq,
        1,
        "a new life"
    );
}

/// Write `n` echo requests of `size` bytes without reading; stop early if
/// the gateway closes. Returns the req_ids fully written.
fn flood(c: &mut Client, n: usize, size: usize) -> Vec<u32> {
    let body = vec![b'z'; size];
    let mut written = Vec::new();
    for _ in 0..n {
        let req_id = c.next_req_id();
        let mut h = Header::new(Kind::Request);
        h.msg_id = ECHO;
        h.req_id = req_id;
        let mut buf = bytes::BytesMut::new();
        encode(&mut buf, &h, &body);
        if c.stream().write_all(&buf).is_err() {
            break;
        }
        c.set_next_req_id(req_id + 1);
        written.push(req_id);
    }
    written
}

/// Wait (up to 20 s) until the player has no session.
fn wait_offline(h: &Harness, player: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while h
        .player(player)
        .is_some_and(|i| i["online"] == serde_json::Value::Bool(true))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "player {player} was never kicked"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_slow_consumer_is_kicked_and_resumes_with_nothing_lost() {
    let h = Harness::with(2, |cfg| {
        cfg.write_queue_bytes = 256 * 1024;
        cfg.outbox.max_frames = 100_000;
        cfg.outbox.max_bytes = 64 * 1024 * 1024;
        // Every request of the flood goes to the backend (by default a
        // session's 1 MiB in flight would refuse most OVERLOADED).
        cfg.limits.session_inflight_bytes = 64 * 1024 * 1024;
    });
    let mut a = h.client();
    a.set_next_req_id(1);
    let li = a.login_demo(120).expect("login");
    a.stream()
        .set_write_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    flood(&mut a, 400, 32 * 1024);
    // The answers come back at the backend's pace; the kick comes once more
    // than the queue limit waits for this client, which reads nothing.
    wait_offline(&h, 120);
    // Read what reached us: answers, then the KICK (or a reset after it).
    let mut got = vec![li.response.clone()];
    let mut kicked = false;
    loop {
        match a.recv() {
            Ok(f) if f.header.kind == Kind::Kick => {
                assert_eq!(f.header.code, code(Code::SlowConsumer));
                kicked = true;
                break;
            }
            Ok(f) => got.push(f),
            Err(_) => break,
        }
    }
    // The socket fell behind: a writer task waited for it (counted).
    let (_, metrics) = common::http(h.http_addr(), "GET", "/metrics", b"");
    let backlogs: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("slg_write_backlogs_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(backlogs > 0, "no write backlog counted:\n{metrics}");
    let last = a.last_seq;
    // Let the backend finish the requests the gateway had already read, so
    // their answers are in the outbox (and replayed) rather than arriving
    // live in a burst behind the replay.
    let mut seq = 0;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = h.player(120).expect("player")["seq"].as_u64().expect("seq");
        if now == seq {
            break;
        }
        seq = now;
    }
    let info = h.player(120).expect("player lingers");
    assert_eq!(
        info["online"],
        serde_json::Value::Bool(false),
        "kicked (KICK seen: {kicked})"
    );
    let total = info["seq"].as_u64().expect("seq");
    assert!(total > last, "some answers were cut off by the kick");

    // Resume: everything after `last` comes back, in order, exactly once.
    let mut b = h.client();
    let r = b.resume(&li.token, last).expect("resume");
    assert_eq!(r.resume_point, last);
    for seq in last + 1..=total {
        let f = b.recv().expect("replay");
        assert_eq!(f.header.seq, seq);
        got.push(f);
    }
    // Every answer the gateway produced is accounted for, each once.
    let mut req_ids: Vec<u32> = got
        .iter()
        .filter(|f| f.header.kind == Kind::Response)
        .map(|f| f.header.req_id)
        .collect();
    let n = req_ids.len();
    req_ids.sort_unstable();
    req_ids.dedup();
    assert_eq!(req_ids.len(), n, "no answer twice");
    assert_eq!(n as u64, total, "seq 1..={total} all received");
}

#[test]
fn a_client_that_never_reads_cannot_grow_memory_past_the_limits() {
    let h = Harness::with(1, |cfg| {
        cfg.write_queue_bytes = 256 * 1024;
        cfg.limits.session_inflight_bytes = 64 * 1024 * 1024;
        cfg.outbox.max_frames = 1000;
        // Smaller than the write queue: a kick (over 256 KiB unwritten)
        // needs more answers than the outbox holds, so it has evicted by
        // then whatever the kernel's socket buffers took first.
        cfg.outbox.max_bytes = 128 * 1024;
    });
    let mut a = h.client();
    a.login_demo(130).expect("login");
    a.stream()
        .set_write_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let written = flood(&mut a, 600, 32 * 1024);
    assert!(written.len() > 100);
    wait_offline(&h, 130);
    let info = h.player(130).expect("player");
    assert_eq!(info["online"], serde_json::Value::Bool(false), "kicked");
    let bytes = info["outbox_bytes"].as_u64().expect("bytes");
    assert!(bytes <= 128 * 1024, "outbox {bytes} bytes within its limit");
    assert!(info["outbox"].as_u64().expect("frames") <= 1000);
    assert!(
        info["evictions"].as_u64().expect("evictions") > 0,
        "the oldest were evicted"
    );
}

#[test]
fn an_answer_to_an_earlier_life_never_reaches_the_next_one() {
    let h = Harness::start(2);
    let mut a = h.client();
    a.login_demo(140).expect("login");
    let old = a.send_request(DELAY, b"300").expect("send");
    a.send(&Header::new(Kind::Bye), &[]).expect("bye");
    assert!(a.is_closed());
    let mut b = h.client();
    b.set_next_req_id(old); // a client that starts counting afresh
    let li = b.login_demo(140).expect("a new life");
    assert_eq!(li.response.header.seq, 1);
    std::thread::sleep(Duration::from_millis(500));
    b.timeout = Duration::from_millis(200);
    match b.recv() {
        Err(ClientError::Timeout(_)) => {}
        other => panic!("the old life's answer leaked into the new one: {other:?}"),
    }
    assert_eq!(b.request(ECHO, b"x").expect("echo").header.seq, 2);
}

#[test]
fn a_connection_that_keeps_guessing_tokens_is_closed() {
    let h = Harness::start(4);
    let mut c = h.client();
    for i in 0..slg_gateway::shard::MAX_RESUME_FAILURES as u64 {
        // Tokens naming players on every shard: each may move the connection.
        let mut token = [0u8; 24];
        token[..8].copy_from_slice(&(1000 + i).to_be_bytes());
        match c.resume(&token, 0) {
            Err(ClientError::ResumeRefused(x)) => assert_eq!(x, code(Code::ResumeRejected)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(c.expect_kick().expect("kick"), code(Code::ProtocolError));
    assert!(c.is_closed());
}
