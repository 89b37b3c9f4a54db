//! One load run: start the executors, open the sessions, start the load
//! phase when all are connected, sample progress, and build the report.

use crate::options::{Options, Scenario, Target};
use crate::procstat::{sample, ProcDelta};
use crate::report::Report;
use crate::scenario::{push_body, run_executor, Shared, PUSH_MSG};
use crate::stats::{Live, Stats};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a run could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Options(String),
    #[error("cannot start the load executors: {0}")]
    Executors(String),
}

fn check(opts: &Options) -> Result<(), RunError> {
    if opts.sessions == 0 {
        return Err(RunError::Options("--sessions must be at least 1".into()));
    }
    if opts.target == Target::Direct && !matches!(opts.scenario, Scenario::Steady | Scenario::Idle)
    {
        return Err(RunError::Options(
            "--target direct serves only steady and idle (the backend has no login, seqs or pushes)".into(),
        ));
    }
    if opts.scenario == Scenario::PushFanout && opts.http.is_none() {
        return Err(RunError::Options(
            "push-fanout needs --http ADDR (the gateway's HTTP API)".into(),
        ));
    }
    if opts.sessions > 19_000 {
        return Err(RunError::Options(format!(
            "{} sessions: a process may open 20000 files here; run several load testers",
            opts.sessions
        )));
    }
    Ok(())
}

/// Run the load described by `opts`; blocks until it ends.
pub fn run(opts: Options) -> Result<Report, RunError> {
    check(&opts)?;
    // Sockets: one fd per session; take what the hard limit allows.
    let _ = slg_gateway::limits::raise(libc::RLIMIT_NOFILE);
    let live = Live::new();
    let connect = opts.connect_options().map_err(RunError::Options)?;
    let shared = Arc::new(Shared::new(opts.clone(), live.clone(), connect));
    let threads = opts.threads.max(1).min(opts.sessions);
    let gw_before = opts.gateway_pid.and_then(sample);
    let watch_before = opts.watch_pid.and_then(sample);
    let t_before = Instant::now();
    if opts.scenario == Scenario::LoginStorm {
        shared.start_now();
    }

    let per = opts.sessions.div_ceil(threads);
    let cfg = shards::ShardsConfig {
        shards: threads,
        pin: false,
        name: "load".into(),
        mesh_capacity: 1,
        spin_before_park: None,
    };
    let sh = shared.clone();
    let executors = shards::start::<(), Stats, _, _>(&cfg, move |shard| {
        let lo = (shard.id() * per).min(sh.opts.sessions);
        let hi = ((shard.id() + 1) * per).min(sh.opts.sessions);
        run_executor(sh, lo..hi)
    })
    .map_err(|e| RunError::Executors(e.to_string()))?;

    // Wait until every session is connected (or failed), then start.
    let connect_deadline = Instant::now() + Duration::from_secs(120);
    while shared.ready.load(Ordering::Acquire) < opts.sessions as u64
        && Instant::now() < connect_deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    let connected_in = t_before.elapsed();
    let gw_ready = opts.gateway_pid.and_then(sample);
    let start = match shared.started() {
        Some(s) => s,
        None => shared.start_now(),
    };
    let gw_start = opts.gateway_pid.and_then(sample);
    let watch_start = opts.watch_pid.and_then(sample);

    // Progress and throughput over time, sampled every second.
    let done = Arc::new(AtomicBool::new(false));
    // The relay measured: the gateway if given, else the watched process.
    let relay = opts.gateway_pid.or(opts.watch_pid);
    let sampler = {
        let (live, done, progress) = (live.clone(), done.clone(), opts.progress);
        let total = opts.duration;
        std::thread::spawn(move || {
            let mut series = Vec::new();
            let mut cpu_series = Vec::new();
            let mut cpu_last = relay.and_then(sample);
            let mut last = live.answered.load(Ordering::Relaxed);
            let mut t = 0u64;
            while !done.load(Ordering::Acquire) {
                let tick = start + Duration::from_secs(t + 1);
                while Instant::now() < tick && !done.load(Ordering::Acquire) {
                    std::thread::sleep(
                        Duration::from_millis(10)
                            .min(tick.saturating_duration_since(Instant::now())),
                    );
                }
                if done.load(Ordering::Acquire) {
                    break;
                }
                t += 1;
                let now = live.answered.load(Ordering::Relaxed);
                series.push((t as f64, (now - last) as f64));
                let cpu_now = relay.and_then(sample);
                if let (Some(a), Some(b)) = (cpu_last, cpu_now) {
                    let us = (b.user_us + b.sys_us).saturating_sub(a.user_us + a.sys_us);
                    if now > last {
                        cpu_series.push((t as f64, us as f64 / (now - last) as f64));
                    }
                }
                cpu_last = cpu_now;
                if progress {
                    eprint!(
                        "\r[{t:>4}s/{}s] {:>9} answers/s, {} sessions up, {} violations   ",
                        total.as_secs(),
                        now - last,
                        live.sessions_up.load(Ordering::Relaxed),
                        live.violations.load(Ordering::Relaxed)
                    );
                }
                last = now;
            }
            if progress {
                eprintln!();
            }
            (series, cpu_series)
        })
    };

    let pusher = (opts.scenario == Scenario::PushFanout).then(|| {
        let sh = shared.clone();
        std::thread::spawn(move || push_loop(&sh))
    });

    let results = executors.join();
    let end = Instant::now();
    done.store(true, Ordering::Release);
    let (series, cpu_series) = sampler.join().unwrap_or_default();
    let push_counts = pusher.and_then(|p| p.join().ok()).unwrap_or_default();

    let mut stats = Stats::default();
    for r in results {
        match r {
            Ok(s) => stats.merge(s),
            Err(e) => stats.violation(format!("a load executor failed: {e}")),
        }
    }
    for (k, v) in push_counts {
        stats.extra.insert(k, v);
    }
    let gw = match (gw_start, opts.gateway_pid.and_then(sample)) {
        (Some(a), Some(b)) => Some(ProcDelta::new(a, b, end - start)),
        _ => None,
    };
    let watch = match (watch_start, opts.watch_pid.and_then(sample)) {
        (Some(a), Some(b)) => Some(ProcDelta::new(a, b, end - start)),
        _ => None,
    };
    if let (Some(b), Some(r)) = (gw_before, gw_ready) {
        let up = stats.sessions_up.max(1) as f64;
        stats.extra.insert(
            "gateway_rss_per_session_bytes".into(),
            (r.rss as f64 - b.rss as f64) / up,
        );
        stats
            .extra
            .insert("gateway_rss_before_bytes".into(), b.rss as f64);
        stats
            .extra
            .insert("gateway_rss_with_sessions_bytes".into(), r.rss as f64);
    }
    let _ = watch_before;
    stats
        .extra
        .insert("connect_seconds".into(), connected_in.as_secs_f64());
    let mut report = Report::build(&opts, stats, end - start, series, gw, watch);
    report.cpu_series = cpu_series;
    Ok(report)
}

/// push-fanout: POST `/v1/broadcast` `pushes` times, `push_interval` apart,
/// over one keep-alive HTTP connection; returns what the gateway counted.
fn push_loop(sh: &Shared) -> Vec<(String, f64)> {
    let Some(addr) = sh.opts.http else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut delivered = 0.0;
    let mut failures = 0.0;
    let mut conn = std::net::TcpStream::connect(addr).ok();
    for k in 0..sh.opts.pushes {
        let at = Instant::now() + sh.opts.push_interval;
        let msg = PUSH_MSG + k as u32;
        let body = push_body(k, sh.opts.body);
        let req = format!(
            "POST /v1/broadcast?msg={msg} HTTP/1.1\r\nHost: load\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if let Some(slot) = sh.push_sent.get(k) {
            slot.store(sh.now_ns().max(1), Ordering::Release);
        }
        let answer = conn.as_mut().and_then(|c| {
            c.write_all(req.as_bytes()).ok()?;
            read_http_body(c)
        });
        match answer.and_then(|b| {
            let v: serde_json::Value = serde_json::from_str(&b).ok()?;
            v["delivered"].as_f64()
        }) {
            Some(d) => delivered += d,
            None => {
                failures += 1.0;
                conn = std::net::TcpStream::connect(addr).ok();
            }
        }
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
    }
    out.push(("push_http_delivered_total".into(), delivered));
    out.push(("push_http_failures".into(), failures));
    out
}

/// Read one HTTP response with a Content-Length body; the body.
fn read_http_body(c: &mut std::net::TcpStream) -> Option<String> {
    c.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&raw[..end]).ok()?;
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))?
                .trim()
                .parse()
                .ok()?;
            if raw.len() >= end + 4 + len {
                if !head.starts_with("HTTP/1.1 200") {
                    return None;
                }
                return String::from_utf8(raw[end + 4..end + 4 + len].to_vec()).ok();
            }
        }
        let n = c.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&chunk[..n]);
    }
}
