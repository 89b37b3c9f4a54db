//! What lies between a client's socket and its client-link frames when the
//! connection is not plain TCP: TLS, a WebSocket, or both. Sans-IO: bytes
//! read from the socket go in with [`Wire::ingest`] and come out as frame
//! bytes; frames to send go in with [`Wire::encode`] and wait as wire bytes
//! in [`Wire::pending`] until the shell writes them. The shell keeps the
//! core's output queue as it is: it hands the wire whole frames, and only
//! when the wire has written what it held, so a slow client's backlog stays
//! in the core's queue where its limit counts it.
//!
//! A plain TCP connection has no `Wire` at all: its path is unchanged.

pub mod tls;
pub mod ws;

use bytes::{Bytes, BytesMut};
use std::sync::Arc;
pub use tungstenite::protocol::frame::coding::CloseCode;
pub use ws::WsSettings;

/// Why a wire refused what the client sent.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("text WebSocket message (frames travel in binary messages)")]
    Text,
    #[error("WebSocket message: {0}")]
    NotOneFrame(&'static str),
    #[error("WebSocket message too large: {0}")]
    TooLarge(String),
    #[error("WebSocket: {0}")]
    WebSocket(String),
    #[error("WebSocket upgrade refused: {0}")]
    Upgrade(String),
    #[error("TLS: {0}")]
    Tls(rustls::Error),
    #[error("TLS record layer: {0}")]
    Io(String),
    #[error("the connection is closed")]
    Closed,
}

impl WireError {
    /// The close code a WebSocket peer is sent for this error.
    pub fn close_code(&self) -> CloseCode {
        match self {
            WireError::Text => CloseCode::Unsupported,
            WireError::TooLarge(_) => CloseCode::Size,
            _ => CloseCode::Protocol,
        }
    }

    /// Whether the client broke the client-link contract over a working
    /// wire (answered `KICK PROTOCOL_ERROR`), rather than the wire itself
    /// failing (the connection just closes).
    pub fn is_protocol_error(&self) -> bool {
        matches!(
            self,
            WireError::Text
                | WireError::NotOneFrame(_)
                | WireError::TooLarge(_)
                | WireError::WebSocket(_)
        )
    }
}

/// Which layers a listener puts on its connections.
#[derive(Clone)]
pub struct WireKind {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub ws: Option<Arc<WsSettings>>,
}

/// What each listener puts on the connections it accepts.
#[derive(Clone, Default)]
pub struct Wires {
    /// The client TCP port (`listen`): TLS, or None for plain TCP.
    pub client: Option<WireKind>,
    /// The WebSocket port (`ws_listen`), if there is one.
    pub ws: Option<WireKind>,
    /// TLS on the HTTP API.
    pub http: Option<Arc<rustls::ServerConfig>>,
}

impl Wires {
    /// From the config, with the TLS configuration loaded from its files.
    pub fn from_config(
        cfg: &crate::config::Config,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Wires {
        let on = |pick: fn(&crate::config::TlsConfig) -> bool| match (&cfg.tls, &tls) {
            (Some(t), Some(server)) if pick(t) => Some(server.clone()),
            _ => None,
        };
        let client = on(|t| t.client).map(|tls| WireKind {
            tls: Some(tls),
            ws: None,
        });
        let ws = cfg.ws_listen.as_ref().map(|_| WireKind {
            tls: on(|t| t.websocket),
            ws: Some(Arc::new(WsSettings {
                path: cfg.ws.path.clone(),
                allowed_origins: cfg.ws.allowed_origins.clone(),
                max_request: cfg.ws.max_request,
                max_message: cfg.max_frame as usize + crate::protocol::LEN_PREFIX,
            })),
        });
        Wires {
            client,
            ws,
            http: on(|t| t.http),
        }
    }
}

/// What one [`Wire::ingest`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Ingested {
    /// The peer ended the stream cleanly (WebSocket close, TLS close_notify).
    pub closed: bool,
}

/// One connection's layers and the wire bytes waiting for its socket.
pub struct Wire {
    tls: Option<Box<tls::Tls>>,
    ws: Option<Box<ws::Ws>>,
    /// Wire bytes not yet written to the socket.
    out: BytesMut,
    /// A WebSocket layer's output before TLS seals it.
    scratch: Vec<u8>,
    /// Close code for the WebSocket close frame when the connection ends.
    close_code: CloseCode,
}

impl Wire {
    pub fn new(kind: &WireKind) -> Result<Wire, WireError> {
        let tls = match &kind.tls {
            Some(cfg) => Some(Box::new(tls::Tls::new(cfg.clone())?)),
            None => None,
        };
        let ws = kind.ws.as_ref().map(|s| Box::new(ws::Ws::new(s.clone())));
        Ok(Wire {
            tls,
            ws,
            out: BytesMut::new(),
            scratch: Vec::new(),
            close_code: CloseCode::Normal,
        })
    }

    /// A client's side (the load tester's): TLS to `name` if `tls`, then a
    /// WebSocket to `ws_url` if given. The first handshake bytes are
    /// pending at once.
    pub fn client(
        tls: Option<(Arc<rustls::ClientConfig>, String)>,
        ws_url: Option<&str>,
    ) -> Result<Wire, WireError> {
        let mut w = Wire {
            tls: None,
            ws: None,
            out: BytesMut::new(),
            scratch: Vec::new(),
            close_code: CloseCode::Normal,
        };
        if let Some(url) = ws_url {
            w.ws = Some(Box::new(ws::Ws::client(url, &mut w.scratch)?));
        }
        match tls {
            Some((cfg, name)) => {
                let mut t = tls::Tls::client(cfg, &name)?;
                t.start(&mut w.out);
                // The upgrade request waits in rustls until TLS is up.
                if !w.scratch.is_empty() {
                    t.seal(&w.scratch, &mut w.out)?;
                    w.scratch.clear();
                }
                w.tls = Some(Box::new(t));
            }
            None => {
                w.out.extend_from_slice(&w.scratch);
                w.scratch.clear();
            }
        }
        Ok(w)
    }

    /// The handshakes are done: frames may flow.
    pub fn is_open(&self) -> bool {
        self.tls.as_ref().is_none_or(|t| !t.is_handshaking())
            && self.ws.as_ref().is_none_or(|w| w.is_open())
    }

    /// The TLS handshake is still going on.
    pub fn tls_handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.is_handshaking())
    }

    /// Whether frames travel in WebSocket messages.
    pub fn is_websocket(&self) -> bool {
        self.ws.is_some()
    }

    /// Take bytes read from the socket: the client-link bytes they carry
    /// are appended to `plain`, anything to answer is left in
    /// [`Wire::pending`].
    pub fn ingest(&mut self, raw: &[u8], plain: &mut BytesMut) -> Result<Ingested, WireError> {
        let mut closed = false;
        let result = match self.tls.as_mut() {
            Some(tls) => {
                let ws = &mut self.ws;
                let scratch = &mut self.scratch;
                let r = tls.open(raw, &mut self.out, |p| match ws.as_mut() {
                    Some(ws) => ws.feed(p, plain, scratch).map(|f| closed |= f.closed),
                    None => {
                        plain.extend_from_slice(p);
                        Ok(())
                    }
                });
                // What the WebSocket layer answered, sealed.
                if !self.scratch.is_empty() {
                    let answer = std::mem::take(&mut self.scratch);
                    let sealed = tls.seal(&answer, &mut self.out);
                    self.scratch = answer;
                    self.scratch.clear();
                    sealed?;
                }
                r.map(|c| closed |= c)
            }
            None => match self.ws.as_mut() {
                Some(ws) => {
                    let r = ws.feed(raw, plain, &mut self.scratch);
                    self.out.extend_from_slice(&self.scratch);
                    self.scratch.clear();
                    r.map(|f| closed |= f.closed)
                }
                None => {
                    plain.extend_from_slice(raw);
                    Ok(())
                }
            },
        };
        if let Err(e) = &result {
            self.close_code = e.close_code();
        }
        result.map(|()| Ingested { closed })
    }

    /// Queue whole frames (`plain` starts and ends at frame boundaries).
    pub fn encode(&mut self, plain: &[u8]) -> Result<(), WireError> {
        let framed: &[u8] = match self.ws.as_mut() {
            Some(ws) => {
                ws.wrap(plain, &mut self.scratch)?;
                &self.scratch
            }
            None => plain,
        };
        let r = match self.tls.as_mut() {
            Some(tls) => tls.seal(framed, &mut self.out),
            None => {
                self.out.extend_from_slice(framed);
                Ok(())
            }
        };
        self.scratch.clear();
        if self.scratch.capacity() > 64 * 1024 {
            self.scratch = Vec::new();
        }
        r
    }

    /// The close code the WebSocket close frame will carry.
    pub fn set_close_code(&mut self, code: CloseCode) {
        self.close_code = code;
    }

    /// Queue the end of the stream: a WebSocket close frame, TLS close_notify.
    pub fn close(&mut self) {
        if let Some(ws) = self.ws.as_mut() {
            ws.close(self.close_code, &mut self.scratch);
        }
        match self.tls.as_mut() {
            Some(tls) => {
                if !self.scratch.is_empty() {
                    let _ = tls.seal(&self.scratch, &mut self.out);
                }
                tls.close(&mut self.out);
            }
            None => self.out.extend_from_slice(&self.scratch),
        }
        self.scratch.clear();
    }

    /// Wire bytes waiting for the socket.
    pub fn pending(&self) -> &[u8] {
        &self.out
    }

    /// The socket took `n` bytes of [`Wire::pending`].
    pub fn consumed(&mut self, n: usize) {
        let n = n.min(self.out.len());
        bytes::Buf::advance(&mut self.out, n);
        if self.out.is_empty() && self.out.capacity() > 64 * 1024 {
            self.out = BytesMut::new();
        }
    }

    /// Take every pending byte (for a write that awaits the socket).
    pub fn take_pending(&mut self) -> Bytes {
        self.out.split().freeze()
    }
}

#[cfg(test)]
mod tests;
