//! The pool's rules (balancing, retries, broadcast groups, deadlines,
//! retirement) against real loopback backends.

use super::*;

/// A request of session 1 (msg_id 1) for `player`.
fn asker(player: u64, req_id: u32) -> Asker {
    Asker {
        session: 1,
        player,
        life: 0,
        req_id,
        msg_id: 1,
        login: false,
        bytes: 0,
        light: false,
        lane: None,
    }
}
use crate::config::Balance;
use crate::router::Route;

fn route(balance: Balance) -> Route {
    Route {
        first: 1,
        last: 1,
        service: 0,
        auth: false,
        login: false,
        balance,
        idempotent: false,
        lane: None,
    }
}

#[test]
fn every_connection_of_an_instance_takes_requests() {
    let addr: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let pool = BackendPool::new(
        vec![("s".into(), vec![addr], 2)],
        Duration::from_secs(5),
        (100, 1 << 20),
    );
    for balance in [Balance::RoundRobin, Balance::HashPlayer] {
        for i in 0..10 {
            let now = Instant::now();
            let p = Pending::new(asker(7, i), now);
            pool.send(
                &route(balance),
                &Header::new(Kind::Request),
                &Bytes::new(),
                p,
                now,
            )
            .expect("send");
        }
    }
    let per: Vec<usize> = pool.connections().iter().map(|c| c.in_flight()).collect();
    assert_eq!(per, vec![10, 10], "requests spread over both connections");
}

#[test]
fn the_earliest_deadline_comes_first_whatever_the_order() {
    let addr: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let pool = BackendPool::new(
        vec![("s".into(), vec![addr], 1)],
        Duration::from_secs(3),
        (100, 1 << 20),
    );
    let send = |req| {
        pool.send(
            &route(Balance::RoundRobin),
            &Header::new(Kind::Request),
            &Bytes::new(),
            Pending::new(asker(0, req), Instant::now()),
            Instant::now(),
        )
        .expect("send")
    };
    send(1);
    let late = pool.next_deadline().expect("deadline");
    pool.reload(
        vec![("s".into(), vec![addr], 1)],
        Duration::from_millis(300),
        (100, 1 << 20),
    );
    send(2);
    let early = pool.next_deadline().expect("deadline");
    assert!(
        early + Duration::from_secs(2) < late,
        "the shorter timeout is due first"
    );
    let gone = pool.expired(early);
    assert_eq!(
        gone.iter().map(|p| p.asker.req_id).collect::<Vec<_>>(),
        vec![2]
    );
}
