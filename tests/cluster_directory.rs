//! The Redis player directory against a real redis-server: claims, leases
//! that lapse, fencing epochs, transfer and release.
//!
//! Each runs on one Redis server, on a Redis Cluster (three masters with a
//! replica each) and under Sentinel (a master, a replica, three
//! sentinels), and survives a failover of the latter two.
//!
//! Needs `redis-server` on the PATH. Without it each test prints
//! `SKIPPED: <test>: redis-server not installed` and passes, unless `CI` or
//! SLG_REQUIRE_REDIS is set (.ci/run sets both): then it fails.

mod common;

use common::ha::{Backing, Kind};
use slg_gateway::cluster::{Claim, Directory, Lease};
use std::time::{Duration, Instant};

#[test]
fn claims_leases_fencing_transfer_release_on_one_server() {
    if let Some(b) = Backing::start(Kind::Server) {
        claims_leases_fencing_transfer_release(&b);
    }
}

#[test]
fn claims_leases_fencing_transfer_release_on_a_redis_cluster() {
    if let Some(b) = Backing::start(Kind::Cluster) {
        claims_leases_fencing_transfer_release(&b);
    }
}

#[test]
fn claims_leases_fencing_transfer_release_under_sentinel() {
    if let Some(b) = Backing::start(Kind::Sentinel) {
        claims_leases_fencing_transfer_release(&b);
    }
}

fn claims_leases_fencing_transfer_release(store: &Backing) {
    let lease = Duration::from_millis(300);
    let open = |id: &str| Directory::open(&store.store(), id, lease, "slg:").expect("connect");
    let (mut a, mut b) = (open("gw-a"), open("gw-b"));
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

    // A lease carries the gateway's address and load; the room it has is
    // what its peers place players by, and a draining one has none.
    let lease_b = Lease {
        http: "127.0.0.1:9".into(),
        sessions: 10,
        players: 30,
        max_connections: 100,
        max_players: 50,
        draining: false,
    };
    b.renew(&lease_b).expect("renew");
    let peers = a.peer_leases().expect("peers");
    let seen = peers
        .iter()
        .find(|p| p.id == "gw-b")
        .expect("gw-b is a peer");
    assert_eq!(seen.lease, lease_b);
    assert_eq!(
        seen.lease.room(),
        20,
        "the fewer of free connections and players"
    );
    b.renew(&Lease {
        draining: true,
        ..lease_b.clone()
    })
    .expect("renew");
    let peers = a.peer_leases().expect("peers");
    assert_eq!(
        peers
            .iter()
            .find(|p| p.id == "gw-b")
            .map(|p| p.lease.room()),
        Some(0)
    );
    assert!(
        a.peer_leases()
            .expect("peers")
            .iter()
            .all(|p| p.id != "gw-a"),
        "not its own peer"
    );

    // Many players at once, on whichever nodes their slots live.
    let players: Vec<u64> = (1000..1064).collect();
    for p in &players {
        assert!(matches!(a.claim(*p).expect("claim"), Claim::Granted { .. }));
    }
    let holders = b.holders(&players).expect("holders");
    assert!(
        holders.iter().all(|h| h.as_deref() == Some("gw-a")),
        "{holders:?}"
    );
}

#[test]
fn a_redis_cluster_master_killed_fails_over_and_the_directory_goes_on() {
    let Some(Backing::Cluster(mut cluster)) = Backing::start(Kind::Cluster) else {
        return;
    };
    let store = slg_gateway::cluster::Store::Cluster(cluster.urls());
    let lease = Duration::from_secs(30);
    let mut a = Directory::open(&store, "gw-a", lease, "slg:").expect("connect");
    a.heartbeat().expect("lease");
    let players: Vec<u64> = (1..=40).collect();
    for p in &players {
        assert!(matches!(
            a.claim(*p).expect("claim"),
            Claim::Granted { epoch: 1 }
        ));
    }
    // The master of player 1's slot crashes; its replica takes over after
    // the node timeout. Calls made meanwhile wait for it (up to their
    // retry time) rather than fail.
    let victim = cluster
        .master_of("slg:p:{1}")
        .expect("a master owns the slot");
    cluster.nodes[victim].kill();
    let t = Instant::now();
    a.set_durability(1, Duration::from_secs(15));
    assert!(a.release(1, 1).expect("release rides out the failover"));
    eprintln!("release during failover took {:?}", t.elapsed());
    // Every change acknowledged before the crash is still there.
    let holders = a.holders(&players[1..]).expect("holders");
    assert!(
        holders.iter().all(|h| h.as_deref() == Some("gw-a")),
        "{holders:?}"
    );
    assert_eq!(a.claim(1).expect("claim"), Claim::Granted { epoch: 2 });
}

#[test]
fn a_sentinel_failover_is_followed_and_the_directory_goes_on() {
    let Some(Backing::Sentinel(mut setup)) = Backing::start(Kind::Sentinel) else {
        return;
    };
    let store = slg_gateway::cluster::Store::Sentinel {
        master: common::ha::MASTER_NAME.into(),
        sentinels: setup.sentinel_urls(),
        password: None,
        db: 0,
    };
    let lease = Duration::from_secs(30);
    let mut a = Directory::open(&store, "gw-a", lease, "slg:").expect("connect");
    a.heartbeat().expect("lease");
    for p in 1..=20u64 {
        assert!(matches!(
            a.claim(p).expect("claim"),
            Claim::Granted { epoch: 1 }
        ));
    }
    let old = setup.master.port;
    setup.master.kill();
    a.set_durability(1, Duration::from_secs(20));
    let t = Instant::now();
    // WAIT finds no replica until the old replica is promoted and the
    // claim lands on it; then the claim of a new player goes through.
    assert_eq!(
        a.claim(21).expect("claim rides out the failover"),
        Claim::Granted { epoch: 1 }
    );
    eprintln!("claim during failover took {:?}", t.elapsed());
    assert_ne!(
        setup.master_port(),
        Some(old),
        "the sentinels promoted the replica"
    );
    let holders = a.holders(&(1..=20).collect::<Vec<_>>()).expect("holders");
    assert!(
        holders.iter().all(|h| h.as_deref() == Some("gw-a")),
        "{holders:?}"
    );
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

#[test]
fn a_redis_cluster_slot_move_is_followed_while_the_directory_works() {
    let Some(Backing::Cluster(cluster)) = Backing::start(Kind::Cluster) else {
        return;
    };
    let store = slg_gateway::cluster::Store::Cluster(cluster.urls());
    let mut a = Directory::open(&store, "gw-a", Duration::from_secs(30), "slg:").expect("connect");
    a.heartbeat().expect("lease");
    let players: Vec<u64> = (1..=200).collect();
    for p in &players {
        assert!(matches!(
            a.claim(*p).expect("claim"),
            Claim::Granted { epoch: 1 }
        ));
    }
    // Every slot of player 1's master goes to another master while a
    // second connection keeps changing the directory.
    let from = cluster.master_of("slg:p:{1}").expect("owner");
    let to = (0..cluster.nodes.len())
        .find(|&i| i != from && cluster.is_master(i))
        .expect("another master");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut b =
                Directory::open(&store, "gw-b", Duration::from_secs(30), "slg:").expect("connect");
            let mut epoch = 1;
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                // Player 1 back and forth between gw-a and gw-b: epochs
                // must rise by one each time, whatever node answers.
                let next = a_to_b(&mut b, epoch);
                assert_eq!(next, epoch + 1, "a transfer during the slot move");
                epoch = next;
                n += 1;
            }
            (n, epoch)
        })
    };
    cluster.reshard(from, to, cluster.slots_of(from));
    stop.store(true, std::sync::atomic::Ordering::Release);
    let (moves, epoch) = writer.join().expect("writer");
    assert!(moves > 0);
    assert_eq!(cluster.master_of("slg:p:{1}"), Some(to), "the slot moved");
    let holders = a.holders(&players[1..]).expect("holders");
    assert!(
        holders.iter().all(|h| h.as_deref() == Some("gw-a")),
        "keys moved with their slots"
    );
    assert_eq!(a.holder(1).expect("holder").map(|(_, e)| e), Some(epoch));
    eprintln!("{moves} transfers of player 1 during the slot move");
}

/// Move player 1 between gw-a and gw-b (`b` is gw-b's directory): take
/// it from gw-a, or give it back; the new epoch.
fn a_to_b(b: &mut Directory, epoch: u64) -> u64 {
    let (holder, _) = b.holder(1).expect("holder").expect("held");
    let moved = if holder == "gw-a" {
        b.take_back(1, "gw-a", epoch)
    } else {
        b.transfer(1, epoch, "gw-a")
    };
    moved.expect("transfer").expect("not fenced")
}
