//! A panic while the gateway handles one session's event closes that
//! session only: the shard, and every other player on it, go on. The panic
//! comes from the fault-injection hook (a cargo feature only the tests'
//! builds turn on): a request with `FAULT_PANIC_MSG_ID`.

mod common;

use common::{http, Harness};
use slg_gateway::core::FAULT_PANIC_MSG_ID;

const ECHO: u32 = 100;

#[test]
fn a_panic_in_one_session_closes_it_and_spares_the_shard() {
    // One shard: both players are served by the thread that panics.
    let h = Harness::start(1);
    let mut victim = h.client();
    let mut other = h.client();
    victim.login_demo(1).expect("login");
    other.login_demo(2).expect("login");
    let r = other.request(ECHO, b"before").expect("echo");
    assert_eq!(r.header.seq, 2);

    victim
        .send_request(FAULT_PANIC_MSG_ID, b"boom")
        .expect("send");
    assert!(victim.is_closed(), "the panicking session is closed");

    // The other player's stream goes on, unbroken, on the same shard.
    for i in 0..5u64 {
        let r = other.request(ECHO, b"after").expect("echo after the panic");
        assert_eq!((r.header.code, r.header.seq), (0, 3 + i));
    }
    // New connections are served too, and the victim's player resumes.
    let mut again = h.client();
    let li = again.login_demo(1).expect("the victim logs in again");
    assert_eq!(li.response.header.code, 0);

    let (status, metrics) = http(h.http_addr(), "GET", "/metrics", b"");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("slg_session_panics_total{shard=\"0\"} 1"),
        "{metrics}"
    );
}
