//! The result of a run: a terminal summary, JSON for machines, and an SVG
//! (drawn by [`crate::chart`]).

use crate::options::{Options, Scenario};
use crate::procstat::ProcDelta;
use crate::stats::Stats;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Latency {
    pub count: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    /// (percentile, µs) points of the whole curve, for plots.
    pub curve: Vec<(f64, u64)>,
}

/// Everything a run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub options: Options,
    /// Length of the load phase, seconds.
    pub seconds: f64,
    pub sessions_up: u64,
    pub sent: u64,
    pub answered: u64,
    /// Answers (or deliveries, or logins) per second over the load phase.
    pub throughput: f64,
    pub latency_us: Latency,
    pub codes: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub violations: u64,
    pub violation_samples: Vec<String>,
    /// Client errors of every kind, summed (`errors` has them by kind).
    pub error_count: u64,
    /// The verdict: no violation, and at most `allow_errors` errors.
    pub passed: bool,
    pub logins: u64,
    pub resumes: u64,
    pub pushes_received: u64,
    /// Answers per second, second by second.
    pub series: Vec<(f64, f64)>,
    /// CPU microseconds per answer of the relay measured (the gateway, or
    /// else the watched process), second by second (/proc, 10 ms ticks:
    /// each point is coarse, their trend is not).
    pub cpu_series: Vec<(f64, f64)>,
    /// push-fanout: each broadcast's full-delivery time (from its POST to
    /// the last session receiving it), microseconds, in broadcast order.
    pub broadcast_full_delivery_us: Vec<f64>,
    pub gateway: Option<ProcDelta>,
    /// The second watched process (e.g. a relay being compared).
    pub watched: Option<ProcDelta>,
    /// Gateway CPU microseconds per answered request (or delivery).
    pub gateway_cpu_us_per_message: Option<f64>,
    pub watched_cpu_us_per_message: Option<f64>,
    pub extra: BTreeMap<String, f64>,
}

impl Report {
    pub fn build(
        opts: &Options,
        stats: Stats,
        elapsed: Duration,
        series: Vec<(f64, f64)>,
        gateway: Option<ProcDelta>,
        watched: Option<ProcDelta>,
    ) -> Report {
        let h = &stats.latency;
        let mut curve = Vec::new();
        if !h.is_empty() {
            for q in [
                0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 99.999,
                100.0,
            ] {
                curve.push((q, h.value_at_quantile(q / 100.0)));
            }
        }
        let latency = Latency {
            count: h.len(),
            mean: if !h.is_empty() { h.mean() } else { 0.0 },
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            curve,
        };
        let messages = match opts.scenario {
            Scenario::PushFanout => stats.pushes_received,
            Scenario::LoginStorm => stats.logins,
            _ => stats.answered,
        };
        let seconds = elapsed.as_secs_f64();
        let per = |d: &Option<ProcDelta>| {
            d.as_ref()
                .filter(|_| messages > 0)
                .map(|d| d.cpu_us as f64 / messages as f64)
        };
        let mut extra = stats.extra.clone();
        let mut broadcasts = Vec::new();
        if opts.scenario == Scenario::PushFanout {
            let mut maxes: Vec<f64> = extra
                .iter()
                .filter(|(k, _)| k.starts_with("max_push_us_"))
                .map(|(_, v)| *v)
                .collect();
            extra.retain(|k, _| !k.starts_with("max_push_us_"));
            // The keys sort in broadcast order (zero-padded k).
            broadcasts = maxes.clone();
            maxes.sort_by(f64::total_cmp);
            if let (Some(worst), Some(median)) = (maxes.last(), maxes.get(maxes.len() / 2)) {
                extra.insert("broadcast_full_delivery_us_worst".into(), *worst);
                extra.insert("broadcast_full_delivery_us_median".into(), *median);
            }
            if let Some(g) = gateway.as_ref().filter(|g| g.cpu_us > 0) {
                extra.insert(
                    "deliveries_per_gateway_cpu_second".into(),
                    stats.pushes_received as f64 / (g.cpu_us as f64 / 1e6),
                );
            }
        }
        let error_count = stats.errors.values().sum();
        Report {
            options: opts.clone(),
            seconds,
            sessions_up: stats.sessions_up,
            sent: stats.sent,
            answered: stats.answered,
            throughput: if seconds > 0.0 {
                messages as f64 / seconds
            } else {
                0.0
            },
            latency_us: latency,
            codes: stats.codes,
            errors: stats.errors,
            violations: stats.violation_count,
            violation_samples: stats.violations,
            error_count,
            passed: stats.violation_count == 0 && error_count <= opts.allow_errors,
            logins: stats.logins,
            resumes: stats.resumes,
            pushes_received: stats.pushes_received,
            series,
            cpu_series: Vec::new(),
            broadcast_full_delivery_us: broadcasts,
            gateway_cpu_us_per_message: per(&gateway),
            watched_cpu_us_per_message: per(&watched),
            gateway,
            watched,
            extra,
        }
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let o = &self.options;
        let l = &self.latency_us;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "scenario {:?}, target {:?} at {}, {} sessions ({} up), {:.1} s",
            o.scenario, o.target, o.addr, o.sessions, self.sessions_up, self.seconds
        );
        let _ = writeln!(
            s,
            "throughput {:.0}/s   sent {}   answered {}   logins {}   resumes {}   pushes received {}",
            self.throughput, self.sent, self.answered, self.logins, self.resumes, self.pushes_received
        );
        let _ = writeln!(
            s,
            "latency us: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {:.0}, n {})",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean, l.count
        );
        if !self.codes.is_empty() {
            let _ = writeln!(s, "codes: {:?}", self.codes);
        }
        if !self.errors.is_empty() {
            let _ = writeln!(s, "client errors: {:?}", self.errors);
        }
        for (name, d, per) in [
            ("gateway", &self.gateway, self.gateway_cpu_us_per_message),
            ("watched", &self.watched, self.watched_cpu_us_per_message),
        ] {
            if let Some(d) = d {
                let _ = writeln!(
                    s,
                    "{name}: cpu {:.2} cores, {} us/message, rss {:.1} -> {:.1} MiB",
                    d.cores,
                    per.map(|p| format!("{p:.2}")).unwrap_or_else(|| "-".into()),
                    d.before.rss as f64 / 1048576.0,
                    d.after.rss as f64 / 1048576.0
                );
            }
        }
        for (k, v) in &self.extra {
            let _ = writeln!(s, "{k}: {v:.1}");
        }
        let verdict = if self.passed {
            "OK (every stream gap-free and in order, every request answered once)".to_string()
        } else if self.violations > 0 {
            format!(
                "FAILED: {} VIOLATIONS, {} errors (allowed {})",
                self.violations, self.error_count, o.allow_errors
            )
        } else {
            format!(
                "FAILED: {} client errors (allowed {}; --allow-errors N to accept some)",
                self.error_count, o.allow_errors
            )
        };
        let _ = writeln!(s, "correctness: {verdict}");
        for v in self.violation_samples.iter().take(10) {
            let _ = writeln!(s, "  {v}");
        }
        s
    }

    pub fn write_json(&self, path: &std::path::Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, text)
    }

    /// This run alone on the charts of [`crate::chart`].
    pub fn write_svg(&self, path: &std::path::Path) -> Result<(), String> {
        let report = serde_json::to_value(self).map_err(|e| e.to_string())?;
        let label = format!("{:?}", self.options.target).to_lowercase();
        let title = format!("{:?} via {:?}", self.options.scenario, self.options.target);
        crate::chart::draw(path, &title, &[crate::chart::Run { label, report }])
    }
}
