//! The Redis player directory against a real redis-server: claims, leases
//! that lapse, fencing epochs, transfer and release.
//!
//! Needs `redis-server` on the PATH. Without it each test prints
//! `SKIPPED: <test>: redis-server not installed` and passes, unless `CI` or
//! SLG_REQUIRE_REDIS is set (.ci/run sets both): then it fails.

mod common;

use common::start_redis;
use slg_gateway::cluster::{Claim, Directory};
use std::time::{Duration, Instant};

#[test]
fn claims_leases_fencing_transfer_release() {
    let Some(redis) = start_redis() else { return };
    let lease = Duration::from_millis(300);
    let mut a = Directory::connect(&redis.url(), "gw-a", lease, "slg:").expect("connect a");
    let mut b = Directory::connect(&redis.url(), "gw-b", lease, "slg:").expect("connect b");
    a.heartbeat().expect("lease a");
    b.heartbeat().expect("lease b");
    assert!(a.alive("gw-b").expect("alive"));

    assert_eq!(a.claim(42).expect("claim"), Claim::Granted { epoch: 1 });
    assert_eq!(
        a.claim(42).expect("claim again"),
        Claim::Granted { epoch: 1 },
        "idempotent"
    );
    assert_eq!(
        b.claim(42).expect("claim"),
        Claim::Held {
            epoch: 1,
            by: "gw-a".into()
        }
    );
    assert_eq!(a.holder(42).expect("holder"), Some(("gw-a".into(), 1)));

    // gw-a stops renewing its lease (a pause or a partition): gw-b takes
    // the player over, and gw-a, fenced off, can no longer change it.
    std::thread::sleep(lease + Duration::from_millis(150));
    b.heartbeat().expect("lease b");
    assert!(!b.alive("gw-a").expect("alive"));
    assert_eq!(
        b.claim(42).expect("claim"),
        Claim::TakenOver {
            epoch: 2,
            from: "gw-a".into()
        }
    );
    assert!(
        !a.release(42, 1).expect("release"),
        "a stale holder changes nothing"
    );
    assert_eq!(a.transfer(42, 1, "gw-c").expect("transfer"), None, "fenced");
    assert_eq!(b.holder(42).expect("holder"), Some(("gw-b".into(), 2)));

    // A hand-over from gw-b back to gw-a raises the epoch.
    a.heartbeat().expect("lease a");
    assert_eq!(b.transfer(42, 2, "gw-a").expect("transfer"), Some(3));
    assert_eq!(a.claim(42).expect("claim"), Claim::Granted { epoch: 3 });
    assert!(!b.release(42, 3).expect("release"), "not b's any more");
    assert!(a.release(42, 3).expect("release"));
    assert_eq!(a.holder(42).expect("holder"), None);
    // Epochs never go back, even across lives of the player.
    assert_eq!(b.claim(42).expect("claim"), Claim::Granted { epoch: 4 });

    // A migration's adoption and its rollback: only one of them wins.
    assert_eq!(b.transfer(42, 4, "gw-a").expect("transfer"), Some(5));
    assert_eq!(a.transfer(42, 5, "gw-a").expect("adopt"), Some(6));
    assert_eq!(b.take_back(42, "gw-a", 5).expect("take back"), None);
    assert_eq!(a.holder(42).expect("holder"), Some(("gw-a".into(), 6)));
    // The other order: the rollback first, then the late adoption fails.
    assert_eq!(a.transfer(42, 6, "gw-b").expect("transfer"), Some(7));
    assert_eq!(a.take_back(42, "gw-b", 7).expect("take back"), Some(8));
    assert_eq!(b.transfer(42, 7, "gw-b").expect("late adopt"), None);
    assert_eq!(a.holder(42).expect("holder"), Some(("gw-a".into(), 8)));

    // A hand-over request is served once, and only while its asker waits.
    b.want(42, Duration::from_secs(5)).expect("want");
    assert!(a.wanted(42, "gw-b").expect("wanted"));
    assert!(!a.wanted(42, "gw-b").expect("wanted"), "served once");
    b.want(43, Duration::from_millis(50)).expect("want");
    std::thread::sleep(Duration::from_millis(120));
    assert!(!a.wanted(43, "gw-b").expect("wanted"), "the asker gave up");
}

#[test]
fn a_dead_redis_is_an_error_not_a_hang() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let t = Instant::now();
    let r = Directory::connect(
        &format!("redis://127.0.0.1:{port}/"),
        "gw-a",
        Duration::from_secs(1),
        "slg:",
    );
    assert!(r.is_err());
    assert!(t.elapsed() < Duration::from_secs(3));
}
