//! Test harness: a real gateway on port 0 with a real demo backend, both on
//! their own threads, stopped (threads joined, ports closed) on drop.
#![allow(dead_code)]

pub mod ha;

use slg_gateway::client::Client;
use slg_gateway::config::{Balance, Config, RouteConfig, ServiceConfig};
use slg_gateway::demo::{DemoBackend, WHOAMI};
use slg_gateway::gateway::Gateway;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::time::Duration;

/// The embedded default, on port 0, with the demo service at `backend`.
pub fn config(backend: SocketAddr, shards: usize) -> Config {
    let mut cfg = Config::embedded_default();
    // Tests keep no snapshot unless they say where (the default `state`
    // would be shared by every test run in this directory).
    cfg.snapshot_dir = None;
    cfg.listen = "127.0.0.1:0".into();
    cfg.http_listen = "127.0.0.1:0".into();
    cfg.shards = Some(shards);
    cfg.demo_backend = None;
    cfg.services.insert(
        "demo".into(),
        ServiceConfig {
            instances: vec![backend.to_string()],
            connections: 1,
        },
    );
    cfg.backend.request_timeout = Duration::from_secs(5);
    cfg
}

pub struct Harness {
    pub gateway: Option<Gateway>,
    pub demo: Option<DemoBackend>,
}

impl Harness {
    /// A gateway with `shards` shards in front of a fresh demo backend.
    pub fn start(shards: usize) -> Harness {
        Harness::with(shards, |_| {})
    }

    /// Same, with the config adjusted by `tune` first.
    pub fn with(shards: usize, tune: impl FnOnce(&mut Config)) -> Harness {
        let demo = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo backend");
        let mut cfg = config(demo.addr, shards);
        tune(&mut cfg);
        let gateway = Gateway::start(cfg).expect("gateway starts");
        Harness {
            gateway: Some(gateway),
            demo: Some(demo),
        }
    }

    /// A gateway whose only backend address has nothing listening.
    pub fn without_backend(shards: usize) -> Harness {
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let mut cfg = config(dead, shards);
        cfg.backend.reconnect_min = Duration::from_millis(50);
        cfg.backend.reconnect_max = Duration::from_millis(200);
        let gateway = Gateway::start(cfg).expect("gateway starts");
        Harness {
            gateway: Some(gateway),
            demo: None,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.gateway
            .as_ref()
            .map(|g| g.client_addr)
            .expect("running")
    }

    pub fn client(&self) -> Client {
        let mut c = Client::connect(self.addr()).expect("connect");
        c.timeout = Duration::from_secs(10);
        c
    }

    /// Stop the demo backend now (the gateway stays up).
    pub fn kill_backend(&mut self) {
        if let Some(d) = self.demo.take() {
            d.stop();
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(g) = self.gateway.take() {
            g.stop();
        }
        if let Some(d) = self.demo.take() {
            d.stop();
        }
    }
}

/// One HTTP request with `Connection: close`; returns (status, body).
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect http");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write head");
    s.write_all(body).expect("write body");
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&raw).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: Option<usize> = text[..end]
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse().ok());
            if let Some(len) = len {
                if raw.len() >= end + 4 + len {
                    let status = text
                        .split_whitespace()
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .expect("status");
                    return (status, text[end + 4..end + 4 + len].to_string());
                }
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => panic!("http connection closed early: {text:?}"),
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
        }
    }
}

impl Harness {
    pub fn http_addr(&self) -> SocketAddr {
        self.gateway.as_ref().map(|g| g.http_addr).expect("running")
    }

    /// The player's state from `GET /v1/players/{id}`, or None on 404.
    pub fn player(&self, id: u64) -> Option<serde_json::Value> {
        let (status, body) = http(self.http_addr(), "GET", &format!("/v1/players/{id}"), b"");
        match status {
            200 => Some(serde_json::from_str(&body).expect("json")),
            404 => None,
            other => panic!("GET /v1/players/{id}: {other} {body}"),
        }
    }
}

/// The gateway binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_slg-gateway");

/// A child process killed (and reaped) on drop.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Read stdout lines until one starts with `prefix`; return the address after it.
pub fn address_after(child: &mut std::process::Child, prefix: &str) -> SocketAddr {
    let out = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(out).lines();
    loop {
        let line = lines
            .next()
            .expect("the process printed its address")
            .expect("utf-8 line");
        if let Some(rest) = line.strip_prefix(prefix) {
            let addr = rest.split_whitespace().next().expect("address");
            // Keep draining stdout so the child never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return addr.parse().expect("socket address");
        }
    }
}

pub fn sigterm(child: &std::process::Child) {
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}

pub fn wait_exit(child: &mut std::process::Child, limit: Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The shipped config, with port 0 and the demo service at `backend`.
pub fn config_text(backend: SocketAddr) -> String {
    slg_gateway::config::DEFAULT_RON
        .replace("snapshot_dir: Some(\"state\")", "snapshot_dir: None")
        .replace("\"127.0.0.1:7000\"", "\"127.0.0.1:0\"")
        .replace("\"127.0.0.1:7001\"", "\"127.0.0.1:0\"")
        .replace(
            "demo_backend: Some(\"127.0.0.1:7100\")",
            "demo_backend: None",
        )
        .replace(
            "instances: [\"127.0.0.1:7100\"]",
            &format!("instances: [\"{backend}\"]"),
        )
}

/// A redis-server of a test's own, on a free loopback port, killed on drop.
pub struct Redis {
    pub child: std::process::Child,
    pub port: u16,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Redis {
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

/// Whether a test that lacks an external tool must fail rather than skip:
/// when `CI` is set (to anything but "", "0" or "false"; .ci/run exports
/// CI=1), or when the variable `require` names is set (SLG_REQUIRE_REDIS).
pub fn tool_required(require: Option<&str>) -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"));
    ci || require.is_some_and(|var| std::env::var_os(var).is_some())
}

/// The one way a test skips for want of an external tool: it fails (panics)
/// when [`tool_required`] says so, and otherwise prints
/// `SKIPPED: <test name>: <why>` to stderr (cargo shows it with
/// `--nocapture`, or when the test fails) and returns, so the caller can
/// skip. The test name is the test thread's (libtest names it after the
/// test), or the caller's file and line.
#[track_caller]
pub fn skip(why: &str, require: Option<&str>) {
    let thread = std::thread::current();
    let name = match thread.name() {
        Some(n) if n != "main" => n.to_string(),
        _ => std::panic::Location::caller().to_string(),
    };
    if tool_required(require) {
        panic!(
            "{name}: {why}; CI{} is set, so this fails instead of skipping",
            require.map(|v| format!(" or {v}")).unwrap_or_default()
        );
    }
    eprintln!("SKIPPED: {name}: {why}");
}

/// redis-server's arguments for a test's own server on `port`: loopback
/// only, nothing persisted.
pub fn redis_args(port: u16) -> Vec<String> {
    let args = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ];
    args.iter().map(|s| s.to_string()).collect()
}

/// Start redis-server on `port` (0: a free one). None, after [`skip`] said
/// so, when it is not installed; under CI or with SLG_REQUIRE_REDIS set
/// (.ci/run sets both) a missing server fails the test instead.
#[track_caller]
pub fn start_redis_on(port: u16) -> Option<Redis> {
    let port = if port == 0 { free_port() } else { port };
    let child = match std::process::Command::new("redis-server")
        .args(redis_args(port))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            let why = if e.kind() == std::io::ErrorKind::NotFound {
                "redis-server not installed".to_string()
            } else {
                format!("redis-server could not be started: {e}")
            };
            skip(&why, Some("SLG_REQUIRE_REDIS"));
            return None;
        }
    };
    ha::wait_until(Duration::from_secs(5), "redis-server to start", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    Some(Redis { child, port })
}

#[track_caller]
pub fn start_redis() -> Option<Redis> {
    start_redis_on(0)
}

/// The gateway binary as a command, run in a scratch directory of its own:
/// whatever it writes relative to its working directory (the default
/// snapshot_dir, `state`) stays out of the repository and away from other
/// tests.
pub fn bin() -> std::process::Command {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("slg-cwd-{}-{n}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let mut c = std::process::Command::new(BIN);
    c.current_dir(dir);
    c
}

/// Start the gateway binary on `cfg` with `shards`; (process, client
/// address, HTTP address) from its stdout.
// The child is owned by the returned Proc, which kills and reaps it.
#[allow(clippy::zombie_processes)]
pub fn spawn_gateway(cfg: &std::path::Path, shards: usize) -> (Proc, SocketAddr, SocketAddr) {
    let mut child = bin()
        .args([
            "--config",
            cfg.to_str().expect("path"),
            "--shards",
            &shards.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn gateway");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    loop {
        let line = lines
            .next()
            .expect("the gateway printed its addresses")
            .expect("line");
        if let Some(rest) = line.strip_prefix("gateway listening on ") {
            let w: Vec<&str> = rest.split_whitespace().collect();
            std::thread::spawn(move || for _ in lines {});
            return (
                Proc(child),
                w[0].parse().expect("client addr"),
                w[2].parse().expect("http addr"),
            );
        }
    }
}

/// A free loopback port (for a gateway that must advertise its address).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A gateway whose `demo` service is `instances` with `balance` on the
/// WHOAMI route, reconnecting fast; `tune` changes the rest.
pub fn balanced_gateway(
    instances: &[SocketAddr],
    balance: Balance,
    tune: impl FnOnce(&mut Config),
) -> Gateway {
    let mut cfg = config(instances[0], 1);
    cfg.services.insert(
        "demo".into(),
        ServiceConfig {
            instances: instances.iter().map(|a| a.to_string()).collect(),
            connections: 1,
        },
    );
    cfg.routes.push(RouteConfig {
        msgs: (WHOAMI, WHOAMI),
        service: "demo".into(),
        auth: balance == Balance::HashPlayer,
        login: false,
        balance,
        idempotent: false,
        order: Default::default(),
        group: None,
    });
    cfg.backend.reconnect_min = Duration::from_millis(50);
    cfg.backend.reconnect_max = Duration::from_millis(200);
    tune(&mut cfg);
    Gateway::start(cfg).expect("gateway")
}

/// Wait until every instance's connection is up (the first requests could
/// otherwise queue on a connection still being made).
pub fn settle_backends() {
    std::thread::sleep(Duration::from_millis(150));
}

/// Start a logging demo instance on `addr`; when it is a port an instance
/// just left, the port may be busy a moment: try again, then fail the test.
pub fn start_logged(
    addr: SocketAddr,
    log: &flume::Sender<slg_gateway::demo::Answered>,
) -> DemoBackend {
    let mut last = None;
    for _ in 0..40 {
        match DemoBackend::start_with_log(addr, log.clone()) {
            Ok(d) => return d,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("a demo instance cannot start on {addr}: {last:?}");
}

/// Logs of the gateways a test starts, on stderr, when SLG_TEST_LOG is set
/// (an env-filter, e.g. `SLG_TEST_LOG=slg_gateway=debug`).
pub fn test_log() {
    if let Ok(filter) = std::env::var("SLG_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}
