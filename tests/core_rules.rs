//! The gateway's rules, each by name, on the in-memory harness
//! (`slg_gateway::sim`): the real shard cores, fake clients and a fake
//! backend on a simulated clock. No sockets and no sleeps: a timer "passes"
//! when the test moves the clock.
//!
//! One file of this length on purpose: one test per rule of the issue's
//! list, each short, and a reader looks a rule up here by its name.

use bytes::Bytes;
use slg_gateway::config::{Config, RateLimit};
use slg_gateway::core::{Event, PlayerEnd};
use slg_gateway::error::Origin;
use slg_gateway::protocol::{parse_session_body, Code, Frame, Kind};
use slg_gateway::sim::{header, ConnId, Sim};
use std::time::Duration;

/// The login route of the default config.
const LOGIN: u32 = 1;

fn config() -> Config {
    Config::embedded_default()
}

/// A player id whose home is shard `shard` of `count`.
fn homed_on(shard: usize, count: usize) -> u64 {
    (1000..)
        .find(|&p| shards::home_shard(p, count) == shard)
        .expect("some id is homed there")
}

/// (kind, code, seq) of each frame, for compact assertions.
fn shape(frames: &[Frame]) -> Vec<(Kind, u16, u64)> {
    frames
        .iter()
        .map(|f| (f.header.kind, f.header.code, f.header.seq))
        .collect()
}

/// The events (log lines) the cores reported since the last call.
fn events(sim: &mut Sim) -> Vec<Event> {
    sim.take_events().into_iter().map(|(_, e)| e).collect()
}

fn code(c: Code) -> u16 {
    c.into()
}

/// The token a SESSION frame carries.
fn token(frames: &[Frame]) -> Bytes {
    let s = frames
        .iter()
        .rev()
        .find(|f| f.header.kind == Kind::Session)
        .expect("a SESSION frame");
    let (_, t) = parse_session_body(&s.body).expect("a SESSION body");
    Bytes::copy_from_slice(t)
}

fn push(sim: &mut Sim, player: u64, body: &str) {
    let counts = sim.push(player, 2001, body.as_bytes());
    assert_eq!(counts.delivered + counts.cached, 1, "{counts:?}");
    sim.run();
}

fn resume(sim: &mut Sim, c: ConnId, token: &Bytes, last: u64) -> Vec<Frame> {
    sim.send(c, &header(Kind::Resume, 0, 0, last), token);
    sim.run();
    sim.recv(c)
}

fn request(sim: &mut Sim, c: ConnId, msg_id: u32, req_id: u32) {
    sim.send(c, &header(Kind::Request, msg_id, req_id, 0), b"ask");
    sim.run();
}

#[test]
fn login_binds_the_session_and_starts_the_sequence() {
    let mut sim = Sim::new(config(), 1, 1);
    let c = sim.connect(0);
    // Before login, a request that needs auth is refused with seq 0.
    request(&mut sim, c, 150, 9);
    let f = sim.recv(c);
    assert_eq!(
        shape(&f),
        [(Kind::Response, code(Code::NotAuthenticated), 0)]
    );
    let f = sim.login(c, 7, 1);
    assert_eq!(
        shape(&f),
        [(Kind::Session, 0, 0), (Kind::Response, 0, 1)],
        "SESSION R=0 then the login answer as seq 1"
    );
    let (player, _) = parse_session_body(&f[0].body).unwrap();
    assert_eq!(player, 7);
    assert_eq!(f[1].header.req_id, 1);
    assert_eq!(&f[1].body[..], b"welcome");
    // A request after login goes to the backend with the player, and its
    // answer takes the next seq.
    request(&mut sim, c, 150, 2);
    assert_eq!(sim.backend[0].forward.asker.player, 7);
    sim.answer_all();
    let f = sim.recv(c);
    assert_eq!(shape(&f), [(Kind::Response, 0, 2)]);
    assert_eq!(f[0].header.req_id, 2);
    // A second login on a logged-in session is refused.
    request(&mut sim, c, LOGIN, 3);
    let f = sim.recv(c);
    assert_eq!(
        shape(&f),
        [(Kind::Response, code(Code::AlreadyAuthenticated), 3)]
    );
}

#[test]
fn a_rejected_login_leaves_the_session_open_and_logged_out() {
    let mut sim = Sim::new(config(), 1, 1);
    let c = sim.connect(0);
    request(&mut sim, c, LOGIN, 1);
    // A second login while the first is at the backend.
    request(&mut sim, c, LOGIN, 2);
    sim.answer(0, 42, 0, b"no");
    sim.run();
    let f = sim.recv(c);
    assert_eq!(
        shape(&f),
        [
            (Kind::Response, code(Code::LoginInProgress), 0),
            (Kind::Response, 42, 0)
        ]
    );
    assert!(sim.is_open(c));
    let f = sim.login(c, 7, 3);
    assert_eq!(shape(&f), [(Kind::Session, 0, 0), (Kind::Response, 0, 1)]);
}

#[test]
fn resume_replays_exactly_the_frames_after_last() {
    let mut sim = Sim::new(config(), 1, 1);
    let c = sim.connect(0);
    let t = token(&sim.login(c, 7, 1));
    push(&mut sim, 7, "a");
    push(&mut sim, 7, "b");
    assert_eq!(
        shape(&sim.recv(c)),
        [(Kind::Push, 0, 2), (Kind::Push, 0, 3)]
    );
    sim.hang_up(c, true);
    sim.run();
    assert!(!sim.is_open(c));
    // Pushed while away: waits in the outbox.
    push(&mut sim, 7, "c");
    let c2 = sim.connect(0);
    let f = resume(&mut sim, c2, &t, 2);
    assert_eq!(
        shape(&f),
        [
            (Kind::Session, 0, 2),
            (Kind::Push, 0, 3),
            (Kind::Push, 0, 4)
        ]
    );
    assert_eq!(&f[1].body[..], b"b");
    assert_eq!(&f[2].body[..], b"c");
    // Live again: the next frame takes the next seq.
    push(&mut sim, 7, "d");
    assert_eq!(shape(&sim.recv(c2)), [(Kind::Push, 0, 5)]);
    // The old token stopped working; the new one works.
    let c3 = sim.connect(0);
    let f = resume(&mut sim, c3, &t, 5);
    assert_eq!(shape(&f), [(Kind::Error, code(Code::ResumeRejected), 0)]);
    assert!(
        sim.is_open(c3),
        "a refused resume leaves the connection open"
    );
}

#[test]
fn an_answer_after_the_connection_dropped_waits_for_the_resume() {
    let mut sim = Sim::new(config(), 1, 1);
    let c = sim.connect(0);
    let t = token(&sim.login(c, 7, 1));
    request(&mut sim, c, 150, 2);
    sim.hang_up(c, false);
    sim.run();
    sim.answer_all();
    let c2 = sim.connect(0);
    let f = resume(&mut sim, c2, &t, 1);
    assert_eq!(shape(&f), [(Kind::Session, 0, 1), (Kind::Response, 0, 2)]);
    assert_eq!(f[1].header.req_id, 2);
}

#[test]
fn a_takeover_on_the_same_shard_kicks_the_old_session() {
    let mut sim = Sim::new(config(), 1, 1);
    let a = sim.connect(0);
    sim.login(a, 7, 1);
    push(&mut sim, 7, "x");
    sim.recv(a);
    sim.send(a, &header(Kind::Ack, 0, 0, 2), &[]);
    push(&mut sim, 7, "y");
    let old_sid = sim.session_of(a);
    let b = sim.connect(0);
    sim.take_events();
    let f = sim.login(b, 7, 2);
    let new_sid = sim.session_of(b);
    let log = events(&mut sim);
    assert!(
        log.contains(&Event::Kicked {
            sid: old_sid,
            player: Some(7),
            code: Code::Replaced
        }),
        "{log:?}"
    );
    assert!(
        log.contains(&Event::Login {
            sid: new_sid,
            player: 7,
            replaced: Some(old_sid)
        }),
        "{log:?}"
    );
    // The new session: R = the last ack, the unacknowledged frame, then the
    // login answer.
    assert_eq!(
        shape(&f),
        [
            (Kind::Session, 0, 2),
            (Kind::Push, 0, 3),
            (Kind::Response, 0, 4)
        ]
    );
    let old = sim.recv(a);
    assert_eq!(
        shape(&old).last(),
        Some(&(Kind::Kick, code(Code::Replaced), 0))
    );
    assert!(!sim.is_open(a));
}

#[test]
fn takeover_flapping_is_refused_rate_limited_and_a_reconnect_after_a_drop_is_not() {
    let mut cfg = config();
    cfg.limits.takeovers = Some(slg_gateway::config::TakeoverLimit {
        max: 3,
        window: Duration::from_secs(10),
        backoff: Duration::from_secs(30),
    });
    let mut sim = Sim::new(cfg, 1, 1);
    let mut live = sim.connect(0);
    let mut t = token(&sim.login(live, 7, 1));
    // Three takeovers within the window: each kicks the one before.
    for r in 0..3 {
        let next = sim.connect(0);
        t = token(&sim.login(next, 7, 10 + r));
        sim.run();
        assert!(!sim.is_open(live));
        live = next;
        sim.advance(Duration::from_secs(1));
    }
    // The fourth: the backend accepted the login, the gateway refuses it.
    let flapper = sim.connect(0);
    let f = sim.login(flapper, 7, 20);
    assert_eq!(shape(&f), [(Kind::Response, code(Code::RateLimited), 0)]);
    assert!(
        sim.is_open(flapper) && sim.is_open(live),
        "both stay; the live one bound"
    );
    // The live session still works.
    request(&mut sim, live, 150, 30);
    assert_eq!(sim.backend.len(), 1);
    sim.answer_all();
    assert_eq!(sim.recv(live).len(), 1);
    // Its client comes back with its token before the gateway noticed the
    // old connection drop: a resume is never refused by the guard (only the
    // latest session's client holds a valid token).
    let again = sim.connect(0);
    let f = resume(&mut sim, again, &t, 0);
    assert_eq!(shape(&f).first().map(|s| s.0), Some(Kind::Session));
    sim.run();
    assert!(!sim.is_open(live));
    // Its connection drops: a login (no live session to replace) is served
    // although the back-off runs.
    sim.hang_up(again, false);
    sim.run();
    let back = sim.connect(0);
    let f = sim.login(back, 7, 40);
    assert_eq!(
        shape(&f).first().map(|s| s.0),
        Some(Kind::Session),
        "{:?}",
        shape(&f)
    );
    // While it is live, takeovers stay refused until the back-off ends.
    let f = sim.login(flapper, 7, 41);
    assert_eq!(shape(&f), [(Kind::Response, code(Code::RateLimited), 0)]);
    sim.advance(Duration::from_secs(31));
    // (`flapper` went meanwhile: not logged in within login_timeout.)
    let later = sim.connect(0);
    let f = sim.login(later, 7, 42);
    assert_eq!(shape(&f).first().map(|s| s.0), Some(Kind::Session));
    sim.run();
    assert!(!sim.is_open(back), "REPLACED after the back-off");
    assert_eq!(sim.cores[0].stats.takeovers_refused.get(), 2);
}

#[test]
fn a_takeover_from_another_shard_moves_the_connection_home() {
    let mut sim = Sim::new(config(), 2, 1);
    let p = homed_on(1, 2);
    let a = sim.connect(1);
    sim.login(a, p, 1);
    assert_eq!(sim.handoffs(a), 0);
    let b = sim.connect(0);
    let f = sim.login(b, p, 2);
    assert_eq!(sim.shard_of(b), 1, "the login moved the connection home");
    assert_eq!(sim.handoffs(b), 1);
    // R = 0 (nothing acknowledged): the first login's answer again, then
    // this one's.
    assert_eq!(
        shape(&f),
        [
            (Kind::Session, 0, 0),
            (Kind::Response, 0, 1),
            (Kind::Response, 0, 2)
        ]
    );
    let old = sim.recv(a);
    assert_eq!(shape(&old), [(Kind::Kick, code(Code::Replaced), 0)]);
    assert!(!sim.is_open(a));
    assert_eq!(sim.cores[0].player_count(), 0);
    assert!(sim.cores[1].holds(p));
    // A resume that lands on the wrong shard moves too.
    let t = token(&f);
    sim.hang_up(b, true);
    sim.run();
    let c = sim.connect(0);
    let f = resume(&mut sim, c, &t, 2);
    assert_eq!(sim.shard_of(c), 1);
    assert_eq!(shape(&f), [(Kind::Session, 0, 2)]);
}

#[test]
fn eviction_makes_resume_gap_and_a_login_says_gap() {
    let mut cfg = config();
    cfg.outbox.max_frames = 4;
    let mut sim = Sim::new(cfg, 1, 1);
    let c = sim.connect(0);
    let t = token(&sim.login(c, 7, 1));
    sim.hang_up(c, true);
    sim.run();
    for i in 0..6 {
        push(&mut sim, 7, &format!("p{i}"));
    }
    // Seqs 2..=7 were pushed; the outbox kept 4..=7.
    let info = sim.home_core(7).player_info(7).unwrap();
    assert_eq!((info.seq, info.outbox, info.evictions), (7, 4, 3));
    let c2 = sim.connect(0);
    let f = resume(&mut sim, c2, &t, 1);
    assert_eq!(shape(&f), [(Kind::Error, code(Code::ResumeGap), 0)]);
    let f = sim.login(c2, 7, 2);
    assert_eq!(
        shape(&f),
        [
            (Kind::Session, code(Code::GAP), 3),
            (Kind::Push, 0, 4),
            (Kind::Push, 0, 5),
            (Kind::Push, 0, 6),
            (Kind::Push, 0, 7),
            (Kind::Response, 0, 8),
        ]
    );
}

#[test]
fn ack_and_ping_trim_the_outbox() {
    let mut sim = Sim::new(config(), 1, 1);
    let c = sim.connect(0);
    sim.login(c, 7, 1);
    for i in 0..4 {
        push(&mut sim, 7, &format!("p{i}"));
    }
    let outbox = |sim: &Sim| sim.home_core(7).player_info(7).unwrap().outbox;
    assert_eq!(outbox(&sim), 5);
    sim.send(c, &header(Kind::Ack, 0, 0, 3), &[]);
    sim.run();
    assert_eq!(outbox(&sim), 2);
    sim.recv(c);
    sim.send(c, &header(Kind::Ping, 0, 0, 5), &[]);
    sim.run();
    assert_eq!(
        shape(&sim.recv(c)),
        [(Kind::Pong, 0, 5)],
        "PONG carries the last seq"
    );
    assert_eq!(outbox(&sim), 0);
    // An ack beyond what was sent breaks the protocol.
    sim.send(c, &header(Kind::Ack, 0, 0, 9), &[]);
    sim.run();
    assert_eq!(
        shape(&sim.recv(c)),
        [(Kind::Kick, code(Code::ProtocolError), 0)]
    );
    assert!(!sim.is_open(c));
}

#[test]
fn an_idle_session_is_kicked_and_a_busy_one_is_not() {
    let mut cfg = config();
    // The quiet session never logs in: its login deadline must not come first.
    cfg.login_timeout = cfg.session_idle * 2;
    let idle = cfg.session_idle;
    let mut sim = Sim::new(cfg, 1, 1);
    let quiet = sim.connect(0);
    let busy = sim.connect(0);
    sim.login(busy, 7, 1);
    for _ in 0..4 {
        sim.advance(idle / 3);
        sim.send(busy, &header(Kind::Ping, 0, 0, 1), &[]);
        sim.run();
    }
    assert_eq!(shape(&sim.recv(quiet)), [(Kind::Kick, code(Code::Idle), 0)]);
    assert!(!sim.is_open(quiet));
    let quiet_sid = sim.session_of(quiet);
    let kicks: Vec<Event> = events(&mut sim)
        .into_iter()
        .filter(|e| matches!(e, Event::Kicked { .. }))
        .collect();
    assert_eq!(
        kicks,
        [Event::Kicked {
            sid: quiet_sid,
            player: None,
            code: Code::Idle
        }]
    );
    assert!(sim.is_open(busy));
}

#[test]
fn a_player_without_a_session_ends_after_linger() {
    let cfg = config();
    let linger = cfg.player_linger;
    let mut sim = Sim::new(cfg, 1, 1);
    let c = sim.connect(0);
    let t = token(&sim.login(c, 7, 1));
    sim.hang_up(c, true);
    sim.run();
    sim.advance(linger - Duration::from_secs(1));
    assert!(sim.home_core(7).holds(7), "still within its linger");
    sim.take_events();
    sim.advance(Duration::from_secs(2));
    assert!(!sim.home_core(7).holds(7));
    assert_eq!(
        events(&mut sim),
        [Event::PlayerEnded {
            player: 7,
            why: PlayerEnd::LingerExpired
        }]
    );
    let counts = sim.push(7, 2001, b"late");
    assert_eq!(counts.offline, 1);
    let c2 = sim.connect(0);
    let f = resume(&mut sim, c2, &t, 1);
    assert_eq!(shape(&f), [(Kind::Error, code(Code::ResumeRejected), 0)]);
    // A new life starts from 1.
    let f = sim.login(c2, 7, 2);
    assert_eq!(shape(&f), [(Kind::Session, 0, 0), (Kind::Response, 0, 1)]);
}

#[test]
fn an_expired_token_is_rejected() {
    let mut cfg = config();
    cfg.token_lifetime = Duration::from_secs(30);
    let mut sim = Sim::new(cfg, 1, 1);
    let c = sim.connect(0);
    let t = token(&sim.login(c, 7, 1));
    sim.hang_up(c, true);
    sim.run();
    sim.advance(Duration::from_secs(31));
    assert!(sim.home_core(7).holds(7));
    let c2 = sim.connect(0);
    let f = resume(&mut sim, c2, &t, 1);
    assert_eq!(shape(&f), [(Kind::Error, code(Code::ResumeRejected), 0)]);
}

#[test]
fn a_slow_consumer_is_kicked_and_its_frames_wait_for_resume() {
    let mut cfg = config();
    cfg.write_queue_bytes = 4096;
    let mut sim = Sim::new(cfg, 1, 1);
    let c = sim.connect(0);
    let t = token(&sim.login(c, 7, 1));
    sim.stall(c, true);
    let body = "x".repeat(500);
    let mut pushed = 0;
    while sim.is_open(c) {
        push(&mut sim, 7, &body);
        pushed += 1;
        assert!(pushed < 100, "never kicked");
    }
    // The client reads nothing, so the KICK cannot reach it: the gateway
    // closes the connection after its flush deadline.
    assert_eq!(sim.cores[0].metrics.kicks_of(code(Code::SlowConsumer)), 1);
    // Every frame is still in the outbox: a resume gets them all.
    let c2 = sim.connect(0);
    let f = resume(&mut sim, c2, &t, 1);
    assert_eq!(f.len(), 1 + pushed);
    assert_eq!(f.last().unwrap().header.seq, 1 + pushed as u64);
}

#[test]
fn a_drain_refuses_requests_and_resumes_and_kicks_quiet_sessions() {
    let mut sim = Sim::new(config(), 1, 1);
    let c = sim.connect(0);
    let t = token(&sim.login(c, 7, 1));
    let other = sim.connect(0);
    let began = sim.on_core(0, |core, _| core.drain(false));
    assert!(began);
    request(&mut sim, c, 150, 2);
    assert_eq!(
        shape(&sim.recv(c)),
        [(Kind::Response, code(Code::ShuttingDown), 2)]
    );
    let f = resume(&mut sim, other, &t, 2);
    assert_eq!(shape(&f), [(Kind::Kick, code(Code::Shutdown), 0)]);
    // A session that sent nothing since the drain began is kicked.
    let since = sim.now;
    sim.advance(Duration::from_millis(10));
    sim.on_core(0, |core, now| core.handle_drain_kicks(since, false, now));
    sim.run();
    assert_eq!(sim.cores[0].session_count(), 0);
    assert_eq!(shape(&sim.recv(c)), [(Kind::Kick, code(Code::Shutdown), 0)]);
    // The player stays for the snapshot.
    assert!(sim.cores[0].holds(7));
}

#[test]
fn after_the_grace_a_drain_kicks_a_busy_session_once_its_requests_are_answered() {
    let mut sim = Sim::new(config(), 1, 1);
    let busy = sim.connect(0);
    sim.login(busy, 7, 1);
    let waiting = sim.connect(0);
    sim.login(waiting, 8, 1);
    // `waiting` has a request at the backend when the drain begins.
    request(&mut sim, waiting, 150, 2);
    assert_eq!(sim.backend.len(), 1);
    sim.on_core(0, |core, _| core.drain(false));
    let since = sim.now;
    // `busy` keeps sending: each request is answered SHUTTING_DOWN at once.
    for r in 2..=4 {
        sim.advance(Duration::from_millis(40));
        request(&mut sim, busy, 150, r);
        let f = sim.recv(busy);
        assert_eq!(
            shape(&f),
            [(Kind::Response, code(Code::ShuttingDown), r as u64)]
        );
        // Within the grace, a session that is not quiet stays.
        sim.on_core(0, |core, now| core.handle_drain_kicks(since, false, now));
        sim.run();
        assert!(sim.is_open(busy));
    }
    // The grace is over: `busy` goes though it just sent, `waiting` stays
    // until its answer is in.
    let open = sim.on_core(0, |core, now| core.handle_drain_kicks(since, true, now));
    sim.run();
    assert_eq!(
        shape(&sim.recv(busy)),
        [(Kind::Kick, code(Code::Shutdown), 0)]
    );
    assert!(!sim.is_open(busy));
    assert!(open >= 1);
    assert!(sim.is_open(waiting));
    sim.answer(0, 0, 8, b"done");
    sim.run();
    sim.on_core(0, |core, now| core.handle_drain_kicks(since, true, now));
    sim.run();
    let f = sim.recv(waiting);
    assert_eq!(
        shape(&f),
        [
            (Kind::Response, 0, 2),
            (Kind::Kick, code(Code::Shutdown), 0)
        ],
        "the answer, then the KICK"
    );
    assert_eq!(sim.cores[0].session_count(), 0);
}

#[test]
fn the_rate_limit_refuses_beyond_the_burst_and_refills() {
    let mut cfg = config();
    cfg.limits.rate = Some(RateLimit {
        per_second: 10.0,
        burst: 3.0,
    });
    let mut sim = Sim::new(cfg, 1, 1);
    let c = sim.connect(0);
    sim.login(c, 7, 1); // takes one token
    for r in 2..=4 {
        sim.send(c, &header(Kind::Request, 150, r, 0), b"q");
    }
    sim.run();
    assert_eq!(sim.backend.len(), 2);
    assert_eq!(
        shape(&sim.recv(c)),
        [(Kind::Response, code(Code::RateLimited), 2)]
    );
    sim.advance(Duration::from_millis(100));
    request(&mut sim, c, 150, 5);
    assert_eq!(sim.backend.len(), 3, "a tenth of a second gives one token");
}

#[test]
fn the_in_flight_bound_refuses_overloaded_and_frees_on_answer() {
    let mut cfg = config();
    cfg.limits.session_inflight = 2;
    let mut sim = Sim::new(cfg, 1, 1);
    let c = sim.connect(0);
    sim.login(c, 7, 1);
    for r in 2..=4 {
        sim.send(c, &header(Kind::Request, 150, r, 0), b"q");
    }
    sim.run();
    assert_eq!(sim.backend.len(), 2);
    let f = sim.recv(c);
    assert_eq!(shape(&f), [(Kind::Response, code(Code::Overloaded), 2)]);
    assert_eq!(f[0].header.req_id, 4);
    sim.answer(0, 0, 0, b"a");
    sim.run();
    request(&mut sim, c, 150, 5);
    assert_eq!(sim.backend.len(), 2, "an answer frees a place");
}

#[test]
fn a_request_with_no_instance_up_is_answered_backend_unavailable() {
    let mut sim = Sim::new(config(), 1, 1);
    let c = sim.connect(0);
    sim.login(c, 7, 1);
    sim.backend_down = true;
    request(&mut sim, c, 150, 2);
    assert_eq!(
        shape(&sim.recv(c)),
        [(Kind::Response, code(Code::BackendUnavailable), 2)]
    );
    let errors = |sim: &Sim, o, c| sim.cores[0].metrics.errors_of(o, code(c));
    assert_eq!(errors(&sim, Origin::Backend, Code::BackendUnavailable), 1);
    // And a timeout is an answer too, given once.
    sim.backend_down = false;
    request(&mut sim, c, 150, 3);
    sim.time_out(0);
    sim.run();
    let f = sim.recv(c);
    assert_eq!(shape(&f), [(Kind::Response, code(Code::Timeout), 3)]);
}

#[test]
fn garbage_on_the_wire_is_a_protocol_error_for_that_connection_only() {
    let mut sim = Sim::new(config(), 1, 1);
    let bad = sim.connect(0);
    let good = sim.connect(0);
    sim.login(good, 7, 1);
    sim.take_events();
    // A length beyond max_frame.
    sim.send_raw(bad, &[0xff, 0xff, 0xff, 0xff, 0, 0]);
    sim.run();
    let bad_sid = sim.session_of(bad);
    match events(&mut sim).as_slice() {
        [Event::Failed {
            sid,
            req_id: None,
            error,
        }, Event::Kicked {
            sid: kicked,
            code: Code::ProtocolError,
            ..
        }] => {
            assert_eq!((*sid, *kicked), (bad_sid, bad_sid));
            assert_eq!(
                (error.origin, error.code),
                (Origin::Client, Code::ProtocolError)
            );
        }
        other => panic!("a protocol error, then its kick: {other:?}"),
    }
    assert_eq!(
        shape(&sim.recv(bad)),
        [(Kind::Kick, code(Code::ProtocolError), 0)]
    );
    assert!(!sim.is_open(bad));
    let errors = sim.cores[0]
        .metrics
        .errors_of(Origin::Client, code(Code::ProtocolError));
    assert_eq!(errors, 1);
    push(&mut sim, 7, "still here");
    assert_eq!(shape(&sim.recv(good)), [(Kind::Push, 0, 2)]);
}

#[test]
fn bye_ends_the_player_and_drops_its_late_answers() {
    let mut sim = Sim::new(config(), 1, 1);
    let c = sim.connect(0);
    let t = token(&sim.login(c, 7, 1));
    request(&mut sim, c, 150, 2);
    sim.take_events();
    sim.send(c, &header(Kind::Bye, 0, 0, 0), &[]);
    sim.run();
    assert!(!sim.is_open(c));
    assert_eq!(
        events(&mut sim),
        [Event::PlayerEnded {
            player: 7,
            why: PlayerEnd::Bye
        }]
    );
    assert!(!sim.home_core(7).holds(7));
    // A new life: the old life's answer must not enter its stream.
    let c2 = sim.connect(0);
    let f = sim.login(c2, 7, 3);
    assert_eq!(shape(&f), [(Kind::Session, 0, 0), (Kind::Response, 0, 1)]);
    let i = sim.pending_of(c, 2).expect("the old request is still out");
    sim.take_events();
    sim.answer(i, 0, 0, b"old");
    sim.run();
    assert!(sim.recv(c2).is_empty());
    assert_eq!(
        events(&mut sim),
        [Event::StrayAnswer {
            player: 7,
            req_id: 2
        }]
    );
    let c3 = sim.connect(0);
    let f = resume(&mut sim, c3, &t, 1);
    assert_eq!(shape(&f), [(Kind::Error, code(Code::ResumeRejected), 0)]);
}

#[test]
fn a_session_closed_after_a_panic_leaves_its_player_to_resume() {
    let mut sim = Sim::new(config(), 1, 1);
    let c = sim.connect(0);
    let t = token(&sim.login(c, 7, 1));
    push(&mut sim, 7, "kept");
    sim.recv(c);
    // What the shell does when handling this session's event panicked.
    let sid = sim.session_of(c);
    sim.on_core(0, |core, now| core.handle_panic(sid, now));
    sim.run();
    assert!(!sim.is_open(c));
    assert_eq!(sim.cores[0].stats.session_panics.get(), 1);
    assert!(events(&mut sim).contains(&Event::Panicked { sid }));
    push(&mut sim, 7, "while away");
    let c2 = sim.connect(0);
    let f = resume(&mut sim, c2, &t, 1);
    assert_eq!(
        shape(&f),
        [
            (Kind::Session, 0, 1),
            (Kind::Push, 0, 2),
            (Kind::Push, 0, 3)
        ]
    );
}

/// A socket takes half a frame, then the queue passes its limit before the
/// writer task runs: the kick drops what is queued but not the rest of the
/// cut frame, so the client reads whole frames and then the KICK.
#[test]
fn a_slow_consumer_kick_after_a_partial_write_keeps_frames_whole() {
    let mut cfg = config();
    cfg.write_queue_bytes = 4096;
    let max = cfg.max_frame;
    let mut sim = Sim::new(cfg, 1, 1);
    let c = sim.connect(0);
    sim.login(c, 7, 1);
    sim.recv(c);
    sim.stall(c, true);
    let sid = sim.session_of(c);
    let body = vec![b'x'; 1000];
    let mut wire = bytes::BytesMut::new();
    sim.on_core(0, |core, now| {
        core.handle_push(&[7], 2001, &body, now);
    });
    sim.on_core(0, |core, now| {
        core.write_now(sid, now, |b| {
            let n = b.len() / 2;
            wire.extend_from_slice(&b[..n]);
            Ok(n)
        })
    });
    for _ in 0..6 {
        sim.on_core(0, |core, now| {
            core.handle_push(&[7], 2001, &body, now);
        });
    }
    sim.on_core(0, |core, now| {
        while let slg_gateway::core::Transmit::Bytes(b) = core.poll_transmit(sid) {
            wire.extend_from_slice(&b);
            core.handle_written(sid, true, now);
        }
    });
    let d = slg_gateway::protocol::Decoder::new(slg_gateway::protocol::Link::GatewayToClient, max);
    let mut seen = Vec::new();
    while let Some(f) = d.decode(&mut wire).expect("whole frames") {
        seen.push((f.header.kind, f.header.code, f.body.len()));
    }
    assert!(wire.is_empty(), "{} bytes of a cut frame left", wire.len());
    assert_eq!(
        seen,
        [
            (Kind::Push, 0, 1000),
            (Kind::Kick, code(Code::SlowConsumer), 0)
        ]
    );
}
