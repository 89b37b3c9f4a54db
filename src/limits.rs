//! Process limits the gateway needs: RLIMIT_NOFILE (one fd per client and
//! backend connection) and RLIMIT_MEMLOCK (io_uring rings). Each is raised
//! to its hard limit where the soft one is lower; what was obtained is
//! reported so operators see it at start.

use std::fmt;

/// One limit after the attempt to raise it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub soft: u64,
    pub hard: u64,
    /// Whether this process raised the soft limit.
    pub raised: bool,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: u64| {
            if v == libc::RLIM_INFINITY {
                "unlimited".to_string()
            } else {
                v.to_string()
            }
        };
        write!(
            f,
            "{} (hard {}{})",
            show(self.soft),
            show(self.hard),
            if self.raised { ", raised" } else { "" }
        )
    }
}

/// Raise `resource`'s soft limit to its hard limit; report what it is now.
pub fn raise(resource: libc::__rlimit_resource_t) -> std::io::Result<Limit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(resource, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut raised = false;
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(resource, &want) } == 0 {
            lim = want;
            raised = true;
        }
    }
    Ok(Limit {
        soft: lim.rlim_cur,
        hard: lim.rlim_max,
        raised,
    })
}

/// Raise both limits and log the result; returns (nofile, memlock).
pub fn raise_all() -> (Option<Limit>, Option<Limit>) {
    let nofile = raise(libc::RLIMIT_NOFILE);
    let memlock = raise(libc::RLIMIT_MEMLOCK);
    match &nofile {
        Ok(l) => tracing::info!("open files limit: {l}"),
        Err(e) => tracing::warn!("cannot read the open files limit: {e}"),
    }
    match &memlock {
        Ok(l) => tracing::info!("locked memory limit (io_uring): {l} bytes"),
        Err(e) => tracing::warn!("cannot read the locked memory limit: {e}"),
    }
    (nofile.ok(), memlock.ok())
}

/// Descriptors the process needs besides client connections: the HTTP
/// API's, backend connections, listeners, files; what is left of the
/// open-files limit after them is all that clients can have.
pub const RESERVED_FDS: u64 = 256;

/// A warning when `max_connections` client connections (plus the HTTP
/// API's `http_connections` and [`RESERVED_FDS`]) cannot all be open
/// under the open-files limit `nofile`: past it accepts fail, and the
/// HTTP API with them. None when they fit.
pub fn fd_budget_warning(
    nofile: u64,
    max_connections: usize,
    http_connections: usize,
) -> Option<String> {
    let need = max_connections as u64 + http_connections as u64 + RESERVED_FDS;
    (need > nofile).then(|| {
        format!(
            "max_connections ({max_connections}) + http.max_connections ({http_connections}) + \
             {RESERVED_FDS} reserved need {need} open files, but the limit is {nofile}: \
             lower max_connections to at most {} or raise the limit (ulimit -n, LimitNOFILE=)",
            nofile.saturating_sub(http_connections as u64 + RESERVED_FDS)
        )
    })
}

/// The most client connections the open-files limit leaves room for:
/// its soft value now, less the HTTP API's `http_connections` and
/// [`RESERVED_FDS`] (backend connections, listeners, snapshots, logs), but
/// never less than half of it (a small limit is shared, not given away).
/// Accepting beyond it would take the descriptors the admin API needs when
/// a crowd fills the client port. None when the limit is unknown.
pub fn client_fd_cap(http_connections: usize) -> Option<usize> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0
        || lim.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    let cap = lim
        .rlim_cur
        .saturating_sub(http_connections as u64 + RESERVED_FDS)
        .max(lim.rlim_cur / 2);
    Some(usize::try_from(cap).unwrap_or(usize::MAX))
}

/// The memory this process may use: the machine's physical memory, or
/// its cgroup's limit (cgroup v2 `memory.max`) where that is smaller.
/// What the `Auto` memory budgets are derived from.
pub fn physical_memory() -> Option<u64> {
    // SAFETY: sysconf reads a system constant; no memory is passed.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let machine = (pages > 0 && page > 0).then(|| pages as u64 * page as u64);
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    match (machine, cgroup) {
        (Some(m), Some(c)) => Some(m.min(c)),
        (m, c) => m.or(c),
    }
}

/// Give freed heap memory back to the kernel (glibc keeps it for reuse,
/// so the RSS of a burst would stay after it ends).
pub fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn physical_memory_is_known_here() {
        let m = physical_memory().expect("Linux tells");
        assert!(m > 64 << 20, "{m}");
    }

    #[test]
    fn the_fd_budget_warns_only_past_the_limit() {
        assert_eq!(fd_budget_warning(20000, 10000, 1024), None);
        let w = fd_budget_warning(20000, 100_000, 1024).expect("a warning");
        assert!(w.contains("100000") && w.contains("18720"), "{w}");
    }

    #[test]
    fn nofile_soft_reaches_hard() {
        let l = raise(libc::RLIMIT_NOFILE).expect("getrlimit");
        assert_eq!(l.soft, l.hard);
        assert!(l.to_string().contains("hard"));
    }
}
