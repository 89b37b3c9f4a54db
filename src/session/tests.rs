use super::*;
use crate::config::Balance;
use std::time::Duration;

fn fresh() -> Session {
    Session::new(Instant::now(), None)
}

fn route(auth: bool, login: bool) -> Route {
    Route {
        first: 1,
        last: 1,
        service: 0,
        auth,
        login,
        balance: Balance::RoundRobin,
        idempotent: false,
        lane: None,
    }
}

#[test]
fn login_lifecycle() {
    let (login, game, open) = (route(false, true), route(true, false), route(false, false));
    let mut s = fresh();
    assert_eq!(s.on_request(None), Decision::Reply(Code::NoRoute));
    assert_eq!(
        s.on_request(Some(&game)),
        Decision::Reply(Code::NotAuthenticated)
    );
    assert_eq!(
        s.on_request(Some(&open)),
        Decision::Forward { login: false }
    );
    assert_eq!(
        s.on_request(Some(&login)),
        Decision::Forward { login: true }
    );
    assert_eq!(s.state(), State::Authenticating);
    assert_eq!(
        s.on_request(Some(&login)),
        Decision::Reply(Code::LoginInProgress)
    );
    assert_eq!(
        s.on_request(Some(&game)),
        Decision::Reply(Code::NotAuthenticated)
    );
    // Rejected: usable again.
    assert!(!s.on_login_result(None));
    assert_eq!(s.state(), State::Connected);
    assert_eq!(
        s.on_request(Some(&login)),
        Decision::Forward { login: true }
    );
    assert!(s.on_login_result(Some(42)));
    assert_eq!(
        s.on_request(Some(&login)),
        Decision::Reply(Code::LoginInProgress)
    );
    s.bind(42);
    assert_eq!(s.player(), Some(42));
    assert_eq!(
        s.on_request(Some(&game)),
        Decision::Forward { login: false }
    );
    assert_eq!(
        s.on_request(Some(&login)),
        Decision::Reply(Code::AlreadyAuthenticated)
    );
    assert!(s.close(CloseReason::Bye));
    assert!(!s.close(CloseReason::Bye));
    assert_eq!(s.on_request(Some(&game)), Decision::Ignore);
    s.bind(42);
    assert!(s.is_closing());
}

#[test]
fn resume_only_from_a_logged_out_session() {
    let mut s = fresh();
    assert_eq!(s.on_resume(), Decision::Forward { login: false });
    assert_eq!(s.state(), State::Resuming);
    assert_eq!(s.on_resume(), Decision::Reply(Code::ResumeRejected));
    assert_eq!(
        s.on_request(Some(&route(false, true))),
        Decision::Reply(Code::LoginInProgress)
    );
    s.resume_failed();
    assert_eq!(s.state(), State::Connected);
    s.bind(3);
    assert_eq!(s.on_resume(), Decision::Reply(Code::ResumeRejected));
    let mut t = fresh();
    assert_eq!(
        t.on_request(Some(&route(false, true))),
        Decision::Forward { login: true }
    );
    assert_eq!(t.on_resume(), Decision::Reply(Code::ResumeRejected));
    t.close(CloseReason::Bye);
    assert_eq!(t.on_resume(), Decision::Ignore);
}

#[test]
fn a_late_login_answer_changes_nothing() {
    let mut s = fresh();
    assert!(!s.on_login_result(Some(1)));
    assert_eq!(s.state(), State::Connected);
}

fn limits(rate: Option<RateLimit>, inflight: u32) -> Limits {
    Limits {
        rate,
        session_inflight: inflight,
        ..Limits::default()
    }
}

#[test]
fn the_rate_bucket_refills_with_time_and_refuses_when_empty() {
    let t0 = Instant::now();
    let rate = RateLimit {
        per_second: 10.0,
        burst: 2.0,
    };
    let l = limits(Some(rate), 100);
    let mut s = Session::new(t0, Some(rate));
    let open = route(false, false);
    assert_eq!(
        s.admit(Some(&open), &l, t0),
        Decision::Forward { login: false }
    );
    assert_eq!(
        s.admit(Some(&open), &l, t0),
        Decision::Forward { login: false }
    );
    assert_eq!(
        s.admit(Some(&open), &l, t0),
        Decision::Reply(Code::RateLimited)
    );
    // 100 ms at 10/s: one more.
    let t1 = t0 + Duration::from_millis(100);
    assert_eq!(
        s.admit(Some(&open), &l, t1),
        Decision::Forward { login: false }
    );
    assert_eq!(
        s.admit(Some(&open), &l, t1),
        Decision::Reply(Code::RateLimited)
    );
    // A refused login leaves the session logged out, able to try again.
    let t2 = t1 + Duration::from_secs(10);
    let login = route(false, true);
    assert_eq!(
        s.admit(Some(&login), &l, t2),
        Decision::Forward { login: true }
    );
    assert!(!s.on_login_result(None));
    assert_eq!(
        s.admit(Some(&login), &l, t2),
        Decision::Forward { login: true }
    );
    s.on_login_result(None);
    let t2 = t2 + Duration::from_millis(1);
    assert_eq!(
        s.admit(Some(&login), &l, t2),
        Decision::Reply(Code::RateLimited)
    );
    assert_eq!(s.state(), State::Connected);
}

#[test]
fn the_in_flight_bound_counts_forwarded_requests_but_not_logins() {
    let now = Instant::now();
    let l = limits(None, 2);
    let mut s = fresh();
    let open = route(false, false);
    for _ in 0..2 {
        assert_eq!(
            s.admit(Some(&open), &l, now),
            Decision::Forward { login: false }
        );
        s.forwarded(false);
    }
    assert_eq!(
        s.admit(Some(&open), &l, now),
        Decision::Reply(Code::Overloaded)
    );
    assert_eq!(
        s.admit(Some(&route(false, true)), &l, now),
        Decision::Forward { login: true }
    );
    s.forwarded(true);
    assert_eq!(s.inflight(), 2);
    s.not_forwarded(false);
    assert_eq!(
        s.inflight(),
        1,
        "a request that could not be sent is not in flight"
    );
    s.forwarded(false);
    assert!(!s.answered(), "nothing waits for it");
    assert_eq!(
        s.admit(Some(&open), &l, now),
        Decision::Forward { login: false }
    );
}

#[test]
fn a_login_waits_for_the_requests_in_flight_then_arrives() {
    let mut s = fresh();
    let l = limits(None, 10);
    let now = Instant::now();
    s.admit(Some(&route(false, false)), &l, now);
    s.forwarded(false);
    s.admit(Some(&route(false, true)), &l, now);
    s.forwarded(true);
    let reply = LoginReply {
        req_id: 1,
        msg_id: 1,
        code: 0,
        body: Bytes::new(),
    };
    assert!(s.login_accepted(Arrival::Login { player: 7, reply }));
    assert!(matches!(s.next_step(), Next::Pause));
    assert!(s.answered(), "the last request in flight wakes it");
    assert!(matches!(
        s.next_step(),
        Next::Arrive(Arrival::Login { player: 7, .. })
    ));
    assert!(matches!(s.next_step(), Next::Read));
    s.hold(true);
    assert!(matches!(s.next_step(), Next::Pause));
    s.close(CloseReason::Bye);
    assert!(matches!(s.next_step(), Next::Close));
    assert_eq!(s.close_reason(), CloseReason::Bye);
}

#[test]
fn a_resume_with_a_token_for_nobody_is_refused_and_counted() {
    let mut s = fresh();
    assert_eq!(
        s.resume(None, Bytes::new(), 0),
        Decision::Reply(Code::ResumeRejected)
    );
    assert_eq!(s.state(), State::Connected);
    assert_eq!(s.resume_refused(), 1);
    assert_eq!(
        s.resume(Some(9), Bytes::from_static(b"t"), 4),
        Decision::Forward { login: false }
    );
    match s.next_step() {
        Next::Arrive(Arrival::Resume {
            player: 9,
            last: 4,
            failures: 1,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let moved = Session::arriving(
        &Arrival::Resume {
            player: 9,
            token: Bytes::new(),
            last: 4,
            failures: 3,
        },
        Instant::now(),
        None,
    );
    assert_eq!(moved.state(), State::Resuming);
    assert_eq!(moved.clone().resume_refused(), 4, "failures move with it");
}

#[test]
fn replayed_bytes_do_not_count_against_the_write_queue() {
    let mut s = fresh();
    s.replayed_until(1000);
    assert_eq!(s.counted_queue(1200, 0), 200);
    assert_eq!(s.counted_queue(700, 500), 200);
    assert_eq!(s.counted_queue(50, 2000), 50);
}

#[test]
fn idle_and_quiet_checks_use_the_last_receive() {
    let t0 = Instant::now();
    let mut s = Session::new(t0, None);
    let t1 = t0 + Duration::from_secs(5);
    assert!(s.quiet_since(t1));
    s.touch(t1);
    assert!(!s.quiet_since(t1));
    assert!(s.quiet_after(t1));
    s.close(CloseReason::Bye);
    assert!(
        !s.quiet_since(t1 + Duration::from_secs(1)),
        "closing is not idle"
    );
}
