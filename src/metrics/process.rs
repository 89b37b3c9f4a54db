//! The standard `process_*` series of every Prometheus exporter (the
//! names the Prometheus client libraries use), read from /proc/self at
//! each scrape.

use std::fmt::Write as _;

/// What `/proc/self` tells about this process (for the `process_*`
/// metrics); each field None where it could not be read.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub start_time_seconds: Option<f64>,
}

/// Read [`ProcessStats`] now (a few small files of /proc; called per scrape).
pub fn process_stats() -> ProcessStats {
    // SAFETY: sysconf reads system constants.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let ticks = (ticks > 0).then_some(ticks as f64);
    let page = (page > 0).then_some(page as u64);
    // Fields after the command name (which may hold spaces), from `state`.
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    let fields: Vec<&str> = stat
        .as_deref()
        .and_then(|s| s.rsplit_once(')'))
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // proc(5): utime is field 14, stime 15, starttime 22, vsize 23, rss 24;
    // `fields[0]` is field 3 (state).
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<u64>().ok())
    });
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    let max_fds = (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0
        && lim.rlim_cur != libc::RLIM_INFINITY)
        .then_some(lim.rlim_cur);
    ProcessStats {
        cpu_seconds: match (field(14), field(15), ticks) {
            (Some(u), Some(s), Some(t)) => Some((u + s) as f64 / t),
            _ => None,
        },
        resident_bytes: field(24).zip(page).map(|(r, p)| r * p),
        virtual_bytes: field(23),
        open_fds: std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64),
        max_fds,
        start_time_seconds: match (field(22), boot, ticks) {
            (Some(st), Some(b), Some(t)) => Some(b as f64 + st as f64 / t),
            _ => None,
        },
    }
}

/// The standard `process_*` series every Prometheus exporter has (the
/// names of the Prometheus client libraries), read from /proc/self.
pub(super) fn process_metrics(out: &mut String) {
    let p = process_stats();
    let mut series = |name: &str, kind: &str, help: &str, value: Option<f64>| {
        if let Some(v) = value {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {v}");
        }
    };
    series(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        p.cpu_seconds,
    );
    series(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        p.resident_bytes.map(|b| b as f64),
    );
    series(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        p.virtual_bytes.map(|b| b as f64),
    );
    series(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        p.open_fds.map(|n| n as f64),
    );
    series(
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
        p.max_fds.map(|n| n as f64),
    );
    series(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        p.start_time_seconds,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_stats_are_read_from_proc() {
        let p = process_stats();
        assert!(p.cpu_seconds.is_some_and(|c| c >= 0.0), "{p:?}");
        assert!(p.resident_bytes.is_some_and(|r| r > 1 << 20), "{p:?}");
        assert!(p.open_fds.is_some_and(|n| n >= 3), "{p:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let started = p.start_time_seconds.expect("start time");
        assert!(
            started <= now + 1.0 && started > now - 86_400.0 * 365.0,
            "{started}"
        );
    }
}
