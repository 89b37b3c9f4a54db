//! `slg-loadtest`: the gateway's load tester. See `--help` and
//! docs/PERFORMANCE.md.

use clap::Parser;
use slg_loadtest::{Options, Scenario, Target};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "slg-loadtest",
    version,
    about = "Load tester for slg-gateway: load, correctness checks, reports"
)]
struct Cli {
    /// Scenario to run.
    #[arg(value_enum)]
    scenario: Scenario,
    /// gateway: log in and check seqs; direct: the demo backend's port (or a
    /// TCP relay in front of it), no login.
    #[arg(long, value_enum, default_value = "gateway")]
    target: Target,
    /// Address the sessions connect to.
    #[arg(long, default_value = "127.0.0.1:7000")]
    addr: SocketAddr,
    /// The gateway's HTTP API (push-fanout).
    #[arg(long, default_value = "127.0.0.1:7001")]
    http: SocketAddr,
    /// Sessions (connections). One process may open 20000 files here.
    #[arg(long, default_value_t = 100)]
    sessions: usize,
    /// Seconds of load (steady, churn, idle).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Requests per second per session; 0 = closed loop with --inflight.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Requests outstanding per session in closed loop.
    #[arg(long, default_value_t = 1)]
    inflight: usize,
    /// Request body bytes (push-fanout: each broadcast's body).
    #[arg(long, default_value_t = 100)]
    body: usize,
    /// msg_id of the requests (an echo route).
    #[arg(long, default_value_t = 100)]
    msg: u32,
    /// First player id.
    #[arg(long, default_value_t = 1_000_000)]
    player_base: u64,
    /// Load threads (glommio executors).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Spread connections over this many loopback source addresses
    /// (127.0.0.1, 127.0.0.2, ...): more than one port range.
    #[arg(long, default_value_t = 0)]
    sources: u8,
    /// push-fanout: broadcasts to send, and ms between them.
    #[arg(long, default_value_t = 20)]
    pushes: usize,
    #[arg(long, default_value_t = 200)]
    push_interval_ms: u64,
    /// churn: mean ms a connection lives before it drops.
    #[arg(long, default_value_t = 300)]
    churn_ms: u64,
    /// The gateway's pid, for its RSS and CPU time.
    #[arg(long)]
    gateway_pid: Option<u32>,
    /// Another process to watch the same way (e.g. a relay compared).
    #[arg(long)]
    watch_pid: Option<u32>,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw the latency curve and throughput over time here (SVG).
    #[arg(long)]
    svg: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
    /// Client errors (failed connects or logins, unexpected kicks or
    /// closes, decode errors) the run may meet and still pass.
    #[arg(long, default_value_t = 0)]
    allow_errors: u64,
    /// The gateway's backend.request_timeout in ms (churn settles requests
    /// in flight at a drop by it; a smaller value than the gateway's gives
    /// false violations).
    #[arg(long, default_value_t = 5000)]
    request_timeout_ms: u64,
    /// The gateway evicts frames (small outbox): GAP and RESUME_GAP are
    /// expected, not violations.
    #[arg(long)]
    expect_eviction: bool,
    /// login-storm: close each connection without BYE, so the players
    /// linger on the gateway (player_linger) instead of ending.
    #[arg(long)]
    linger: bool,
    /// How sessions reach the gateway: tcp, tls, ws (WebSocket) or wss.
    /// --addr is then the matching port (ws_listen for ws and wss).
    #[arg(long, value_enum, default_value = "tcp")]
    transport: slg_loadtest::options::Transport,
    /// TLS (tls, wss): PEM file of the certificates to trust.
    #[arg(long)]
    tls_ca: Option<String>,
    /// TLS: the name the gateway's certificate is checked for.
    #[arg(long, default_value = "localhost")]
    tls_name: String,
    /// WebSocket: the upgrade path (the gateway's ws.path).
    #[arg(long, default_value = "/ws")]
    ws_path: String,
}

/// `slg-loadtest compare`: several saved runs on one chart.
#[derive(Parser, Debug)]
#[command(
    name = "slg-loadtest compare",
    about = "Draw saved runs (--json reports) on one SVG: latency by percentile, throughput \
             and CPU per message over time; or, for push-fanout runs, the distribution of \
             per-broadcast full-delivery times"
)]
struct CompareCli {
    /// The SVG to write.
    #[arg(long)]
    out: PathBuf,
    /// Title of the chart.
    #[arg(long, default_value = "")]
    title: String,
    /// LABEL=REPORT.json, one per run (e.g. gateway=docs/perf/relay/x.json).
    #[arg(required = true)]
    runs: Vec<String>,
}

fn compare(args: impl Iterator<Item = String>) -> ExitCode {
    let cli = CompareCli::parse_from(args);
    let mut runs = Vec::new();
    for r in &cli.runs {
        let Some((label, path)) = r.split_once('=') else {
            eprintln!("slg-loadtest compare: {r:?} is not LABEL=REPORT.json");
            return ExitCode::from(2);
        };
        match slg_loadtest::chart::Run::load(label, std::path::Path::new(path)) {
            Ok(run) => runs.push(run),
            Err(e) => {
                eprintln!("slg-loadtest compare: {e}");
                return ExitCode::from(2);
            }
        }
    }
    match slg_loadtest::chart::draw(&cli.out, &cli.title, &runs) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("slg-loadtest compare: {e}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args();
    if std::env::args().nth(1).as_deref() == Some("compare") {
        let bin = args.next().unwrap_or_default();
        return compare(std::iter::once(bin).chain(args.skip(1)));
    }
    let cli = Cli::parse();
    let mut o = Options::new(cli.scenario, cli.target, cli.addr);
    o.http = Some(cli.http);
    o.sessions = cli.sessions;
    o.duration = Duration::from_secs_f64(cli.duration.max(0.0));
    o.rate = cli.rate;
    o.inflight = cli.inflight;
    o.body = cli.body;
    o.msg_id = cli.msg;
    o.player_base = cli.player_base;
    o.threads = cli.threads;
    o.sources = (1..=cli.sources)
        .map(|i| IpAddr::from([127, 0, 0, i]))
        .collect();
    o.pushes = cli.pushes;
    o.push_interval = Duration::from_millis(cli.push_interval_ms);
    if cli.scenario == Scenario::PushFanout {
        o.duration = o.push_interval * cli.pushes as u32 + Duration::from_secs(1);
    }
    o.churn_every = Duration::from_millis(cli.churn_ms);
    o.gateway_pid = cli.gateway_pid;
    o.watch_pid = cli.watch_pid;
    o.progress = !cli.quiet;
    o.allow_errors = cli.allow_errors;
    o.request_timeout = Duration::from_millis(cli.request_timeout_ms);
    o.expect_eviction = cli.expect_eviction;
    o.linger = cli.linger;
    o.transport = cli.transport;
    o.tls_ca = cli.tls_ca;
    o.tls_name = cli.tls_name;
    o.ws_path = cli.ws_path;
    let report = match slg_loadtest::run(o) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("slg-loadtest: {e}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report.summary());
    if let Some(p) = &cli.json {
        if let Err(e) = report.write_json(p) {
            eprintln!("cannot write {}: {e}", p.display());
            return ExitCode::from(2);
        }
    }
    if let Some(p) = &cli.svg {
        if let Err(e) = report.write_svg(p) {
            eprintln!("cannot write {}: {e}", p.display());
            return ExitCode::from(2);
        }
    }
    if !report.passed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
