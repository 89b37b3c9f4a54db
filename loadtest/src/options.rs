//! What a load run does.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// The load shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// N sessions send requests (a rate each, or a fixed number in flight).
    Steady,
    /// N logins as fast as possible.
    LoginStorm,
    /// Broadcasts over HTTP to N sessions; delivery latency POST -> client.
    PushFanout,
    /// Sessions that drop and resume while traffic flows.
    Churn,
    /// N idle logged-in sessions held, to measure memory per connection.
    Idle,
}

/// Who the load talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// The gateway: login first, seqs checked.
    Gateway,
    /// The demo backend's port (or a TCP relay in front of it): no login,
    /// no seqs; the same requests and answers.
    Direct,
}

/// How the sessions reach the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// Plain TCP (`listen`).
    Tcp,
    /// TLS over TCP (`listen` with `tls.client`).
    Tls,
    /// A WebSocket (`ws_listen`).
    Ws,
    /// A WebSocket over TLS (`ws_listen` with `tls.websocket`).
    Wss,
}

/// Everything a run needs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Options {
    pub scenario: Scenario,
    pub target: Target,
    /// Address the sessions connect to.
    pub addr: SocketAddr,
    /// The gateway's HTTP API (push-fanout).
    pub http: Option<SocketAddr>,
    /// Sessions (connections).
    pub sessions: usize,
    /// How long the load runs (steady, churn, idle).
    pub duration: Duration,
    /// Requests per second per session; 0 = as fast as answers come back
    /// with `inflight` outstanding.
    pub rate: f64,
    /// Requests outstanding per session in closed loop.
    pub inflight: usize,
    /// Request body bytes (push-fanout: each broadcast's body).
    pub body: usize,
    /// msg_id of the requests (an echo route).
    pub msg_id: u32,
    /// msg_id of the login route.
    pub login_msg: u32,
    /// First player id; session i logs in as `player_base + i`.
    pub player_base: u64,
    /// Load executors (threads).
    pub threads: usize,
    /// Source addresses to spread connections over (empty: the kernel picks).
    pub sources: Vec<IpAddr>,
    /// Connections opened at once while ramping up.
    pub connect_concurrency: usize,
    /// push-fanout: broadcasts to send.
    pub pushes: usize,
    /// push-fanout: time between broadcasts.
    pub push_interval: Duration,
    /// churn: mean time a connection lives before it drops.
    pub churn_every: Duration,
    /// The gateway's pid, for RSS and CPU (optional).
    pub gateway_pid: Option<u32>,
    /// A second process to watch (e.g. a relay being compared).
    pub watch_pid: Option<u32>,
    /// Print a progress line every second.
    pub progress: bool,
    /// Client errors (failed connects or logins, unexpected kicks or
    /// closes, decode errors) a run may meet and still pass. Churn's own
    /// drops are not errors.
    pub allow_errors: u64,
    /// The gateway's `backend.request_timeout`: a request it read is
    /// answered within it, so churn declares a request unread (and sends
    /// it again) once this has passed since its connection dropped.
    pub request_timeout: Duration,
    /// The gateway is configured to evict frames (a small outbox): `GAP`
    /// and `RESUME_GAP` are expected, not violations.
    pub expect_eviction: bool,
    /// login-storm: close without BYE (the players linger).
    pub linger: bool,
    /// TCP, TLS, WebSocket or WebSocket over TLS.
    pub transport: Transport,
    /// TLS: the PEM file of the certificates to trust, and the name the
    /// gateway's certificate must have.
    pub tls_ca: Option<String>,
    pub tls_name: String,
    /// WebSocket: the upgrade path.
    pub ws_path: String,
}

impl Options {
    /// How to connect, as the client library takes it (the TLS trust
    /// loaded from `tls_ca`).
    pub fn connect_options(&self) -> Result<slg_gateway::client::ConnectOptions, String> {
        let tls = match self.transport {
            Transport::Tls | Transport::Wss => {
                let ca = self
                    .tls_ca
                    .as_deref()
                    .ok_or("--transport tls/wss needs --tls-ca FILE")?;
                let cfg = slg_gateway::wire::tls::client_config(ca)?;
                Some((cfg, self.tls_name.clone()))
            }
            _ => None,
        };
        let websocket = matches!(self.transport, Transport::Ws | Transport::Wss).then(|| {
            slg_gateway::client::WsOptions {
                path: self.ws_path.clone(),
                origin: None,
            }
        });
        Ok(slg_gateway::client::ConnectOptions { tls, websocket })
    }

    pub fn new(scenario: Scenario, target: Target, addr: SocketAddr) -> Options {
        Options {
            scenario,
            target,
            addr,
            http: None,
            sessions: 100,
            duration: Duration::from_secs(10),
            rate: 0.0,
            inflight: 1,
            body: 100,
            msg_id: 100,
            login_msg: 1,
            player_base: 1_000_000,
            threads: 1,
            sources: Vec::new(),
            connect_concurrency: 256,
            pushes: 20,
            push_interval: Duration::from_millis(200),
            churn_every: Duration::from_millis(300),
            gateway_pid: None,
            watch_pid: None,
            progress: false,
            allow_errors: 0,
            request_timeout: Duration::from_secs(5),
            expect_eviction: false,
            linger: false,
            transport: Transport::Tcp,
            tls_ca: None,
            tls_name: "localhost".into(),
            ws_path: "/ws".into(),
        }
    }
}
