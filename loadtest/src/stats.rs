//! What each load executor counts, merged at the end of the run.

use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Violations kept verbatim (the count goes on past it).
pub const MAX_VIOLATIONS_KEPT: usize = 50;

/// One executor's results.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Latency of each answered request (or delivered push, or login), µs.
    pub latency: Histogram<u64>,
    pub sent: u64,
    pub answered: u64,
    /// Answers by code name (`OK`, gateway codes, `app_N`).
    pub codes: BTreeMap<String, u64>,
    /// Client-side errors (connect, closed, timeouts) by kind.
    pub errors: BTreeMap<String, u64>,
    pub violations: Vec<String>,
    pub violation_count: u64,
    pub logins: u64,
    pub resumes: u64,
    pub pushes_received: u64,
    /// Sessions that were up at the end (or held, for idle).
    pub sessions_up: u64,
    /// Scenario-specific numbers.
    pub extra: BTreeMap<String, f64>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            // 1 µs .. 100 s, 3 significant digits.
            latency: Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid histogram bounds"),
            sent: 0,
            answered: 0,
            codes: BTreeMap::new(),
            errors: BTreeMap::new(),
            violations: Vec::new(),
            violation_count: 0,
            logins: 0,
            resumes: 0,
            pushes_received: 0,
            sessions_up: 0,
            extra: BTreeMap::new(),
        }
    }
}

impl Stats {
    pub fn latency_us(&mut self, us: u64) {
        self.latency.saturating_record(us.max(1));
    }

    pub fn code(&mut self, code: u16) {
        *self
            .codes
            .entry(slg_gateway::client::code_name(code))
            .or_default() += 1;
    }

    pub fn error(&mut self, what: impl Into<String>) {
        *self.errors.entry(what.into()).or_default() += 1;
    }

    pub fn violation(&mut self, what: String) {
        self.violation_count += 1;
        if self.violations.len() < MAX_VIOLATIONS_KEPT {
            self.violations.push(what);
        }
    }

    pub fn merge(&mut self, o: Stats) {
        let _ = self.latency.add(&o.latency);
        self.sent += o.sent;
        self.answered += o.answered;
        for (k, v) in o.codes {
            *self.codes.entry(k).or_default() += v;
        }
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.violation_count += o.violation_count;
        for v in o.violations {
            if self.violations.len() < MAX_VIOLATIONS_KEPT {
                self.violations.push(v);
            }
        }
        self.logins += o.logins;
        self.resumes += o.resumes;
        self.pushes_received += o.pushes_received;
        self.sessions_up += o.sessions_up;
        for (k, v) in o.extra {
            let e = self.extra.entry(k.clone()).or_insert(0.0);
            if k.starts_with("max_") {
                *e = e.max(v);
            } else {
                *e += v;
            }
        }
    }
}

/// Counters every executor bumps, read by the progress sampler (the load
/// tester is not the gateway: a few shared atomics are fine here).
#[derive(Debug, Default)]
pub struct Live {
    pub answered: AtomicU64,
    pub sessions_up: AtomicU64,
    pub violations: AtomicU64,
}

impl Live {
    pub fn new() -> Arc<Live> {
        Arc::new(Live::default())
    }
    pub fn answered(&self) {
        self.answered.fetch_add(1, Ordering::Relaxed);
    }
}
