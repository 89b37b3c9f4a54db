//! The keys of the WebSocket listener and of TLS (`ws_listen`, `ws`, `tls`).

use super::{invalid, positive, ConfigError};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// The WebSocket client listener's settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WsConfig {
    /// The path of the upgrade request; any other is answered 404.
    pub path: String,
    /// `Origin` values allowed to connect; empty: any (browsers send one,
    /// other clients often none).
    pub allowed_origins: Vec<String>,
    /// The most bytes the upgrade request may have (431 beyond).
    pub max_request: usize,
    /// Time from accept to a finished upgrade (after TLS, if any).
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            path: "/ws".into(),
            allowed_origins: Vec::new(),
            max_request: 8192,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// TLS: one certificate chain and key, on the listeners chosen.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file: the certificate chain, leaf first.
    pub cert: String,
    /// PEM file: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
    /// TLS on the client TCP port (`listen`).
    #[serde(default)]
    pub client: bool,
    /// TLS on the WebSocket port (`ws_listen`): `wss://`.
    #[serde(default)]
    pub websocket: bool,
    /// TLS on the HTTP API (`http_listen`).
    #[serde(default)]
    pub http: bool,
    /// Time from accept to a finished TLS handshake.
    #[serde(with = "humantime_serde", default = "default_tls_handshake")]
    pub handshake_timeout: Duration,
}

fn default_tls_handshake() -> Duration {
    Duration::from_secs(10)
}

impl super::Config {
    /// `ws_listen` as a socket address, if set.
    pub fn ws_listen_addr(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        self.ws_listen
            .as_deref()
            .map(|a| super::parse_addr("ws_listen", a))
            .transpose()
    }

    pub(super) fn validate_wire(&self) -> Result<(), ConfigError> {
        self.ws_listen_addr()?;
        let ws = &self.ws;
        if !ws.path.starts_with('/') {
            return Err(invalid("ws.path", "must start with `/`"));
        }
        if ws.max_request < 256 {
            return Err(invalid("ws.max_request", "must be at least 256 bytes"));
        }
        positive("ws.handshake_timeout", ws.handshake_timeout)?;
        if let Some(t) = &self.tls {
            if !(t.client || t.websocket || t.http) {
                return Err(invalid(
                    "tls",
                    "names no listener: set client, websocket or http to true",
                ));
            }
            if t.websocket && self.ws_listen.is_none() {
                return Err(invalid("tls.websocket", "needs ws_listen"));
            }
            positive("tls.handshake_timeout", t.handshake_timeout)?;
        }
        Ok(())
    }

    /// Read the certificate and key `tls` names (None: no TLS). The error
    /// names the key whose file is at fault.
    pub fn load_tls(&self) -> Result<Option<Arc<rustls::ServerConfig>>, ConfigError> {
        let Some(t) = &self.tls else {
            return Ok(None);
        };
        crate::wire::tls::load(&t.cert, &t.key)
            .map(Some)
            .map_err(|(key, message)| invalid(format!("tls.{key}"), message))
    }
}
