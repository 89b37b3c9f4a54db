//! Routing: which service serves a `msg_id`, whether it needs a login, and
//! which of the service's instances takes a given request.
//!
//! The route table is a sorted array of non-overlapping inclusive msg_id
//! ranges (config validation guarantees it), searched by binary search.

use crate::config::{Balance, Config};
use std::cell::Cell;

/// One msg_id range and how to serve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub first: u32,
    pub last: u32,
    /// Index into [`Router::services`].
    pub service: usize,
    /// Needs an authenticated session.
    pub auth: bool,
    /// A login request: its answer authenticates the session.
    pub login: bool,
    pub balance: Balance,
    /// Safe to send again to another instance when its connection dies.
    pub idempotent: bool,
    /// `order: PerPlayer`: the index of its order group (one queue per
    /// player and group); None: concurrent.
    pub lane: Option<u16>,
}

/// The route table of one shard.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<Route>,
    services: Vec<String>,
}

impl Router {
    /// Build from a validated config (services in name order).
    pub fn new(cfg: &Config) -> Router {
        let services: Vec<String> = cfg.services.keys().cloned().collect();
        // Order groups: (service, group name), numbered as first met.
        let mut groups: Vec<(String, Option<String>)> = Vec::new();
        let mut routes: Vec<Route> = cfg
            .routes
            .iter()
            .filter_map(|r| {
                let service = services.iter().position(|s| s == &r.service)?;
                let lane = (r.order == crate::config::Order::PerPlayer).then(|| {
                    let key = (r.service.clone(), r.group.clone());
                    let i = groups.iter().position(|g| *g == key).unwrap_or_else(|| {
                        groups.push(key);
                        groups.len() - 1
                    });
                    i as u16
                });
                Some(Route {
                    first: r.msgs.0,
                    last: r.msgs.1,
                    service,
                    auth: r.auth,
                    login: r.login,
                    balance: r.balance,
                    idempotent: r.idempotent,
                    lane,
                })
            })
            .collect();
        routes.sort_by_key(|r| r.first);
        Router { routes, services }
    }

    /// The route serving `msg_id`, if any.
    pub fn lookup(&self, msg_id: u32) -> Option<&Route> {
        let i = self.routes.partition_point(|r| r.first <= msg_id);
        let r = self.routes.get(i.checked_sub(1)?)?;
        (msg_id <= r.last).then_some(r)
    }

    /// The metrics slot of `msg_id`: 0 when no route serves it, else the
    /// route's index + 1.
    pub fn slot(&self, msg_id: u32) -> usize {
        let i = self.routes.partition_point(|r| r.first <= msg_id);
        match i
            .checked_sub(1)
            .and_then(|j| self.routes.get(j).map(|r| (j, r)))
        {
            Some((j, r)) if msg_id <= r.last => j + 1,
            _ => 0,
        }
    }

    /// Metrics label of every slot: "none", then "first-last" per route.
    pub fn slot_labels(&self) -> Vec<String> {
        std::iter::once("none".to_string())
            .chain(self.routes.iter().map(|r| {
                if r.first == r.last {
                    r.first.to_string()
                } else {
                    format!("{}-{}", r.first, r.last)
                }
            }))
            .collect()
    }

    /// Service names; a route's `service` indexes this.
    pub fn services(&self) -> &[String] {
        &self.services
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

/// Pick one instance among `n` for a request, skipping those `usable`
/// rejects. Round robin advances `cursor`; hash-by-player uses rendezvous
/// hashing, so a player sticks to one instance while it is usable and only
/// the players of an instance that leaves move. Broadcast is not a single
/// pick: callers fan out to every usable instance instead.
pub fn pick(
    balance: Balance,
    player: u64,
    n: usize,
    cursor: &Cell<usize>,
    usable: impl Fn(usize) -> bool,
) -> Option<usize> {
    match balance {
        Balance::HashPlayer => (0..n)
            .filter(|&i| usable(i))
            .max_by_key(|&i| shards::splitmix64(player ^ shards::splitmix64(i as u64 + 1))),
        Balance::RoundRobin | Balance::Broadcast => {
            let start = cursor.get();
            let found = (0..n).map(|k| (start + k) % n).find(|&i| usable(i))?;
            cursor.set(found + 1);
            Some(found)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(routes: &[(u32, u32, bool, bool)]) -> Router {
        Router {
            routes: routes
                .iter()
                .map(|&(first, last, auth, login)| Route {
                    first,
                    last,
                    service: 0,
                    auth,
                    login,
                    balance: Balance::RoundRobin,
                    idempotent: false,
                    lane: None,
                })
                .collect(),
            services: vec!["s".into()],
        }
    }

    #[test]
    fn per_player_routes_of_a_service_share_a_lane_unless_grouped() {
        use crate::config::{Order, RouteConfig};
        let mut cfg = crate::config::Config::embedded_default();
        let route = |first: u32, order: Order, group: Option<&str>| RouteConfig {
            msgs: (first, first),
            service: "demo".into(),
            auth: true,
            login: false,
            balance: Balance::RoundRobin,
            idempotent: false,
            order,
            group: group.map(str::to_string),
        };
        cfg.routes = vec![
            route(300, Order::PerPlayer, None),
            route(301, Order::PerPlayer, None),
            route(302, Order::PerPlayer, Some("trade")),
            route(303, Order::PerPlayer, Some("trade")),
            route(304, Order::Concurrent, Some("ignored")),
        ];
        let r = Router::new(&cfg);
        let lane = |m: u32| r.lookup(m).and_then(|r| r.lane);
        assert_eq!(lane(300), lane(301), "one group per service by default");
        assert_eq!(lane(302), lane(303));
        assert_ne!(lane(300), lane(302), "a named group is its own");
        assert!(lane(300).is_some() && lane(302).is_some());
        assert_eq!(lane(304), None, "concurrent: no lane");
    }

    #[test]
    fn lookup_finds_ranges_and_gaps() {
        let r = router(&[
            (1, 1, false, true),
            (2, 2, false, false),
            (100, 199, true, false),
            (200, 200, true, false),
        ]);
        assert!(r.lookup(0).is_none());
        assert!(r.lookup(1).map(|x| x.login).unwrap_or(false));
        assert_eq!(r.lookup(2).map(|x| x.first), Some(2));
        assert!(r.lookup(3).is_none());
        assert!(r.lookup(99).is_none());
        assert_eq!(r.lookup(100).map(|x| x.first), Some(100));
        assert_eq!(r.lookup(150).map(|x| x.last), Some(199));
        assert_eq!(r.lookup(199).map(|x| x.first), Some(100));
        assert_eq!(r.lookup(200).map(|x| x.first), Some(200));
        assert!(r.lookup(201).is_none());
        assert!(r.lookup(u32::MAX).is_none());
        assert_eq!(
            (r.slot(0), r.slot(1), r.slot(150), r.slot(200), r.slot(201)),
            (0, 1, 3, 4, 0)
        );
        assert_eq!(r.slot_labels(), vec!["none", "1", "2", "100-199", "200"]);
    }

    #[test]
    fn round_robin_skips_unusable() {
        let c = Cell::new(0);
        let picks: Vec<_> = (0..6)
            .map(|_| pick(Balance::RoundRobin, 0, 3, &c, |i| i != 1))
            .collect();
        assert_eq!(
            picks,
            vec![Some(0), Some(2), Some(0), Some(2), Some(0), Some(2)]
        );
        assert_eq!(pick(Balance::RoundRobin, 0, 3, &c, |_| false), None);
        assert_eq!(pick(Balance::RoundRobin, 0, 0, &c, |_| true), None);
    }

    #[test]
    fn hash_player_is_sticky_and_moves_little() {
        let c = Cell::new(0);
        let mut moved = 0;
        for p in 1..=3000u64 {
            let a = pick(Balance::HashPlayer, p, 4, &c, |_| true).expect("pick");
            assert_eq!(Some(a), pick(Balance::HashPlayer, p, 4, &c, |_| true));
            let b = pick(Balance::HashPlayer, p, 4, &c, |i| i != 3).expect("pick");
            if a != 3 {
                assert_eq!(a, b, "a player not on the removed instance must stay");
            } else {
                moved += 1;
            }
        }
        assert!(
            (600..=900).contains(&moved),
            "about a quarter move: {moved}"
        );
    }
}
