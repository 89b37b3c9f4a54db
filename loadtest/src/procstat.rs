//! Resource use of a process from /proc: resident memory and CPU time.

use std::time::Duration;

/// One reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProcSample {
    /// Resident set size, bytes.
    pub rss: u64,
    /// CPU time in user mode.
    pub user_us: u64,
    /// CPU time in kernel mode.
    pub sys_us: u64,
}

/// Read /proc/PID/status (VmRSS) and /proc/PID/stat (utime, stime).
pub fn sample(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(ProcSample {
        rss: rss_kb * 1024,
        user_us: utime * 1_000_000 / hz,
        sys_us: stime * 1_000_000 / hz,
    })
}

/// What changed between two readings.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ProcDelta {
    pub before: ProcSample,
    pub after: ProcSample,
    /// CPU time used (user + system) between the readings, microseconds.
    pub cpu_us: u64,
    /// Of the wall time between the readings, the share of one core used.
    pub cores: f64,
}

impl ProcDelta {
    pub fn new(before: ProcSample, after: ProcSample, wall: Duration) -> ProcDelta {
        let cpu_us = (after.user_us + after.sys_us).saturating_sub(before.user_us + before.sys_us);
        let wall_us = wall.as_micros().max(1) as f64;
        ProcDelta {
            before,
            after,
            cpu_us,
            cores: cpu_us as f64 / wall_us,
        }
    }

    /// RSS growth, bytes (may be negative).
    pub fn rss_growth(&self) -> i64 {
        self.after.rss as i64 - self.before.rss as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let s = sample(std::process::id()).expect("own /proc");
        assert!(s.rss > 0);
        let d = ProcDelta::new(s, s, Duration::from_secs(1));
        assert_eq!((d.cpu_us, d.rss_growth()), (0, 0));
    }
}
