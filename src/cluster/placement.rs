//! Where players go when they leave this gateway, and how their moves are
//! counted: the choice of a target by the room each peer's lease reports,
//! an evacuation's plan and progress (shared by the shards that carry it
//! out, the HTTP API that reports it and the drain that waits for it), and
//! the durations and failures of each migration step.
//!
//! Nothing here is on the data path: a migration is a control-plane act,
//! and these are atomics read by `/metrics` and `GET /v1/evacuation`.

use super::Peer;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The live, non-draining peer with the most room, if any has some.
pub fn pick(peers: &[Peer]) -> Option<&Peer> {
    peers
        .iter()
        .filter(|p| !p.lease.http.is_empty() && p.lease.room() > 0)
        .max_by_key(|p| (p.lease.room(), std::cmp::Reverse(p.id.clone())))
}

/// One target of an evacuation.
#[derive(Debug)]
pub struct Target {
    pub id: String,
    /// Its room when the evacuation began: its share of the players.
    pub weight: u64,
    /// It refused or failed a migration: skipped from then on.
    pub failed: AtomicBool,
    /// Players moved there.
    pub moved: AtomicU64,
}

/// An evacuation: its targets and its counts, shared by every shard.
#[derive(Debug)]
pub struct Evacuation {
    pub targets: Vec<Target>,
    /// Players of the gateway when it began.
    pub total: AtomicU64,
    pub moved: AtomicU64,
    pub failed: AtomicU64,
    /// Shards still at work.
    pub shards_left: AtomicU64,
    pub cancelled: AtomicBool,
    pub started: Instant,
    /// Milliseconds from `started` to the end (0: not ended).
    pub ended_ms: AtomicU64,
}

impl Evacuation {
    /// An evacuation to `targets` (id, weight) by `shards` shards. With no
    /// weight above 0 every target weighs the same.
    pub fn new(targets: Vec<(String, u64)>, shards: usize) -> Evacuation {
        let even = targets.iter().all(|(_, w)| *w == 0);
        Evacuation {
            targets: targets
                .into_iter()
                .map(|(id, w)| Target {
                    id,
                    weight: if even { 1 } else { w },
                    failed: AtomicBool::new(false),
                    moved: AtomicU64::new(0),
                })
                .collect(),
            total: AtomicU64::new(0),
            moved: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            shards_left: AtomicU64::new(shards as u64),
            cancelled: AtomicBool::new(false),
            started: Instant::now(),
            ended_ms: AtomicU64::new(0),
        }
    }

    /// The peers' rooms as targets: each weighs what it can still take.
    pub fn over(peers: &[Peer], shards: usize) -> Evacuation {
        let targets = peers
            .iter()
            .filter(|p| !p.lease.http.is_empty() && p.lease.room() > 0)
            .map(|p| (p.id.clone(), p.lease.room()))
            .collect();
        Evacuation::new(targets, shards)
    }

    /// A shard finished its part.
    pub fn shard_done(&self) {
        if self.shards_left.fetch_sub(1, Ordering::AcqRel) == 1 {
            let ms = self.started.elapsed().as_millis().max(1) as u64;
            self.ended_ms.store(ms, Ordering::Release);
        }
    }

    pub fn running(&self) -> bool {
        self.ended_ms.load(Ordering::Acquire) == 0
    }

    /// How long it has run (or ran).
    pub fn elapsed(&self) -> Duration {
        match self.ended_ms.load(Ordering::Acquire) {
            0 => self.started.elapsed(),
            ms => Duration::from_millis(ms),
        }
    }

    /// The report of `GET /v1/evacuation`.
    pub fn json(&self) -> String {
        let moved = self.moved.load(Ordering::Acquire);
        let failed = self.failed.load(Ordering::Acquire);
        let total = self.total.load(Ordering::Acquire);
        let secs = self.elapsed().as_secs_f64();
        let state = match (self.running(), self.cancelled.load(Ordering::Acquire)) {
            (true, false) => "running",
            (true, true) => "cancelling",
            (false, false) => "done",
            (false, true) => "cancelled",
        };
        let targets: Vec<String> = self
            .targets
            .iter()
            .map(|t| {
                format!(
                    "{{\"id\":{},\"weight\":{},\"moved\":{},\"failed\":{}}}",
                    crate::http::json_string(&t.id),
                    t.weight,
                    t.moved.load(Ordering::Acquire),
                    t.failed.load(Ordering::Acquire)
                )
            })
            .collect();
        format!(
            "{{\"state\":\"{state}\",\"total\":{total},\"moved\":{moved},\"failed\":{failed},\
             \"left\":{},\"seconds\":{secs:.3},\"rate\":{:.1},\"targets\":[{}]}}",
            total.saturating_sub(moved + failed),
            if secs > 0.0 { moved as f64 / secs } else { 0.0 },
            targets.join(",")
        )
    }
}

/// One shard's walk over the targets: smooth weighted round robin (each
/// target gets players in proportion to its weight, interleaved), skipping
/// those that failed.
#[derive(Debug, Default)]
pub struct Spread {
    current: Vec<i64>,
    /// The live targets of the last pick: when one fails the walk starts
    /// afresh, so what the failed one was owed skews nothing.
    live: Vec<usize>,
}

impl Spread {
    /// The next target's index, or None when every target failed.
    pub fn next(&mut self, evac: &Evacuation) -> Option<usize> {
        self.current.resize(evac.targets.len(), 0);
        let live: Vec<usize> = (0..evac.targets.len())
            .filter(|&i| !evac.targets[i].failed.load(Ordering::Acquire))
            .collect();
        if live != self.live {
            self.current.iter_mut().for_each(|c| *c = 0);
            self.live.clone_from(&live);
        }
        let total: i64 = live
            .iter()
            .map(|&i| evac.targets[i].weight.min(i64::MAX as u64 / 4) as i64)
            .sum();
        let mut best: Option<usize> = None;
        for &i in &live {
            self.current[i] += evac.targets[i].weight.min(i64::MAX as u64 / 4) as i64;
            if best.is_none_or(|b| self.current[i] > self.current[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        self.current[b] -= total;
        Some(b)
    }
}

/// The steps of a migration, as `/metrics` labels them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The session's new requests held (source).
    Hold,
    /// Requests in flight answered (source).
    Drain,
    /// The directory moved and the state handed over (source).
    Transfer,
    /// The state loaded and the directory taken (target).
    Adopt,
    /// The target's confirmation awaited (source).
    Confirm,
    /// The client redirected and held pushes sent on (source).
    Redirect,
    /// A failed migration undone (source).
    Rollback,
}

impl Step {
    pub const ALL: [Step; 7] = [
        Step::Hold,
        Step::Drain,
        Step::Transfer,
        Step::Adopt,
        Step::Confirm,
        Step::Redirect,
        Step::Rollback,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Step::Hold => "hold",
            Step::Drain => "wait_inflight",
            Step::Transfer => "transfer",
            Step::Adopt => "adopt",
            Step::Confirm => "confirm",
            Step::Redirect => "redirect",
            Step::Rollback => "rollback",
        }
    }
}

/// Why a migration failed, as `/metrics` labels it.
pub const FAILURES: [&str; 6] = [
    "not_held",
    "inflight_timeout",
    "ended",
    "target_timeout",
    "redis",
    "other",
];

/// Upper bounds (seconds) of the step duration buckets.
pub const STEP_BUCKETS: [f64; 12] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Durations of each step (a histogram each) and failures by reason.
#[derive(Debug, Default)]
pub struct MigrationStats {
    /// Per step: a count per bucket (not cumulative; the last is +Inf),
    /// the sum in microseconds and the count.
    buckets: [[AtomicU64; STEP_BUCKETS.len() + 1]; 7],
    sum_us: [AtomicU64; 7],
    count: [AtomicU64; 7],
    failures: [[AtomicU64; FAILURES.len()]; 7],
}

impl MigrationStats {
    fn index(step: Step) -> usize {
        Step::ALL.iter().position(|s| *s == step).unwrap_or(0)
    }

    /// `step` took `d`.
    pub fn record(&self, step: Step, d: Duration) {
        let i = Self::index(step);
        let secs = d.as_secs_f64();
        let b = STEP_BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(STEP_BUCKETS.len());
        self.buckets[i][b].fetch_add(1, Ordering::Relaxed);
        self.sum_us[i].fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count[i].fetch_add(1, Ordering::Relaxed);
    }

    /// `step` failed for `reason` (one of [`FAILURES`]; else "other").
    pub fn fail(&self, step: Step, reason: &str) {
        let r = FAILURES
            .iter()
            .position(|f| *f == reason)
            .unwrap_or(FAILURES.len() - 1);
        self.failures[Self::index(step)][r].fetch_add(1, Ordering::Relaxed);
    }

    /// Steps recorded and failures counted of `step` (tests, reports).
    pub fn counts(&self, step: Step) -> (u64, u64) {
        let i = Self::index(step);
        let failed = self.failures[i]
            .iter()
            .map(|f| f.load(Ordering::Relaxed))
            .sum();
        (self.count[i].load(Ordering::Relaxed), failed)
    }

    /// The Prometheus text of these numbers.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(
            out,
            "# HELP slg_migration_step_seconds Duration of each step of a migration (source side but adopt)."
        );
        let _ = writeln!(out, "# TYPE slg_migration_step_seconds histogram");
        for (i, step) in Step::ALL.iter().enumerate() {
            let label = step.label();
            let mut cumulative = 0;
            for (b, le) in STEP_BUCKETS.iter().enumerate() {
                cumulative += self.buckets[i][b].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "slg_migration_step_seconds_bucket{{step=\"{label}\",le=\"{le}\"}} {cumulative}"
                );
            }
            cumulative += self.buckets[i][STEP_BUCKETS.len()].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "slg_migration_step_seconds_bucket{{step=\"{label}\",le=\"+Inf\"}} {cumulative}"
            );
            let _ = writeln!(
                out,
                "slg_migration_step_seconds_sum{{step=\"{label}\"}} {}",
                self.sum_us[i].load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(
                out,
                "slg_migration_step_seconds_count{{step=\"{label}\"}} {}",
                self.count[i].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP slg_migration_step_failures_total Failed migration steps, by step and reason."
        );
        let _ = writeln!(out, "# TYPE slg_migration_step_failures_total counter");
        for (i, step) in Step::ALL.iter().enumerate() {
            for (r, reason) in FAILURES.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "slg_migration_step_failures_total{{step=\"{}\",reason=\"{reason}\"}} {}",
                    step.label(),
                    self.failures[i][r].load(Ordering::Relaxed)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Lease;

    fn peer(id: &str, room: u64, draining: bool) -> Peer {
        Peer {
            id: id.into(),
            lease: Lease {
                http: "127.0.0.1:1".into(),
                sessions: 0,
                players: 0,
                max_connections: room,
                max_players: u64::MAX,
                draining,
            },
        }
    }

    #[test]
    fn the_peer_with_most_room_is_picked_and_a_draining_one_never() {
        let peers = [
            peer("a", 10, false),
            peer("b", 30, false),
            peer("c", 99, true),
        ];
        assert_eq!(pick(&peers).map(|p| p.id.as_str()), Some("b"));
        assert!(pick(&[peer("c", 99, true), peer("d", 0, false)]).is_none());
    }

    #[test]
    fn players_are_spread_in_proportion_to_room_and_failed_targets_skipped() {
        let evac = Evacuation::over(
            &[
                peer("a", 100, false),
                peer("b", 300, false),
                peer("c", 5, true),
            ],
            1,
        );
        assert_eq!(evac.targets.len(), 2, "a draining peer is no target");
        let mut s = Spread::default();
        let mut n = [0u32; 2];
        for _ in 0..400 {
            n[s.next(&evac).expect("a target")] += 1;
        }
        assert_eq!(n, [100, 300]);
        evac.targets[1].failed.store(true, Ordering::Release);
        assert!((0..10).all(|_| s.next(&evac) == Some(0)));
        evac.targets[0].failed.store(true, Ordering::Release);
        assert_eq!(s.next(&evac), None);
    }

    #[test]
    fn an_evacuation_ends_when_its_last_shard_is_done_and_reports_json() {
        let evac = Evacuation::new(vec![("gw-b".into(), 0)], 2);
        evac.total.store(10, Ordering::Release);
        evac.moved.store(7, Ordering::Release);
        evac.failed.store(1, Ordering::Release);
        evac.shard_done();
        assert!(evac.running());
        evac.shard_done();
        assert!(!evac.running());
        let v: serde_json::Value = serde_json::from_str(&evac.json()).expect("json");
        assert_eq!(v["state"], "done");
        assert_eq!(
            (v["moved"].as_u64(), v["left"].as_u64()),
            (Some(7), Some(2))
        );
        assert_eq!(v["targets"][0]["weight"], 1, "no room known: even weights");
    }

    #[test]
    fn step_histograms_and_failures_render() {
        let m = MigrationStats::default();
        m.record(Step::Transfer, Duration::from_millis(3));
        m.record(Step::Transfer, Duration::from_secs(9));
        m.fail(Step::Confirm, "target_timeout");
        m.fail(Step::Confirm, "no such reason");
        assert_eq!(m.counts(Step::Transfer), (2, 0));
        assert_eq!(m.counts(Step::Confirm), (0, 2));
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("slg_migration_step_seconds_bucket{step=\"transfer\",le=\"0.005\"} 1"));
        assert!(out.contains("slg_migration_step_seconds_bucket{step=\"transfer\",le=\"+Inf\"} 2"));
        assert!(out.contains(
            "slg_migration_step_failures_total{step=\"confirm\",reason=\"target_timeout\"} 1"
        ));
        assert!(
            out.contains("slg_migration_step_failures_total{step=\"confirm\",reason=\"other\"} 1")
        );
    }
}
