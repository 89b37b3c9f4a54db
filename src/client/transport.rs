//! The byte streams the blocking client speaks over: TCP, TLS (rustls), and
//! a WebSocket (tungstenite) over either.

use bytes::{Bytes, BytesMut};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use tungstenite::client::IntoClientRequest;
use tungstenite::Message;

/// How to reach the gateway (the default: plain TCP).
#[derive(Clone, Default)]
pub struct ConnectOptions {
    /// TLS with this configuration, checking the certificate for this name.
    pub tls: Option<(Arc<rustls::ClientConfig>, String)>,
    /// A WebSocket (on the gateway's `ws_listen` port).
    pub websocket: Option<WsOptions>,
}

/// The upgrade request of a WebSocket connection.
#[derive(Debug, Clone)]
pub struct WsOptions {
    /// The path (the gateway's `ws.path`, `/ws` by default).
    pub path: String,
    /// An `Origin` header, as a browser sends.
    pub origin: Option<String>,
}

impl Default for WsOptions {
    fn default() -> Self {
        WsOptions {
            path: "/ws".into(),
            origin: None,
        }
    }
}

/// TCP, or TLS over TCP.
pub enum Io {
    Tcp(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Io {
    /// The TCP socket under it (for timeouts).
    pub fn tcp_mut(&mut self) -> &mut TcpStream {
        match self {
            Io::Tcp(s) => s,
            Io::Tls(s) => &mut s.sock,
        }
    }
}

impl Read for Io {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Io::Tcp(s) => s.read(buf),
            Io::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Io {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Io::Tcp(s) => s.write(buf),
            Io::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Io::Tcp(s) => s.flush(),
            Io::Tls(s) => s.flush(),
        }
    }
}

/// A connection: bytes as they are, or binary WebSocket messages.
pub(super) enum Conn {
    Raw(Io),
    Ws(Box<tungstenite::WebSocket<Io>>),
}

fn ws_err(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            io::ErrorKind::ConnectionAborted.into()
        }
        other => io::Error::other(other.to_string()),
    }
}

impl Conn {
    pub(super) fn open(addr: SocketAddr, opts: &ConnectOptions) -> io::Result<Conn> {
        let tcp = TcpStream::connect(addr)?;
        tcp.set_nodelay(true)?;
        let mut io = match &opts.tls {
            None => Io::Tcp(tcp),
            Some((cfg, name)) => {
                let name = rustls::pki_types::ServerName::try_from(name.clone())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let conn = rustls::ClientConnection::new(cfg.clone(), name)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                let mut s = rustls::StreamOwned::new(conn, tcp);
                // Finish the handshake now: errors show at connect.
                while s.conn.is_handshaking() {
                    s.conn.complete_io(&mut s.sock)?;
                }
                Io::Tls(Box::new(s))
            }
        };
        let Some(ws) = &opts.websocket else {
            return Ok(Conn::Raw(io));
        };
        io.tcp_mut()
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        let scheme = if opts.tls.is_some() { "wss" } else { "ws" };
        let mut req = format!("{scheme}://{addr}{}", ws.path)
            .into_client_request()
            .map_err(ws_err)?;
        if let Some(o) = &ws.origin {
            let v = o
                .parse()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad origin"))?;
            req.headers_mut().insert("origin", v);
        }
        match tungstenite::client::client(req, io) {
            Ok((ws, _resp)) => Ok(Conn::Ws(Box::new(ws))),
            Err(tungstenite::HandshakeError::Failure(e)) => Err(ws_err(e)),
            Err(tungstenite::HandshakeError::Interrupted(_)) => Err(io::ErrorKind::TimedOut.into()),
        }
    }

    pub(super) fn tcp_mut(&mut self) -> &mut TcpStream {
        match self {
            Conn::Raw(io) => io.tcp_mut(),
            Conn::Ws(ws) => ws.get_mut().tcp_mut(),
        }
    }

    pub(super) fn websocket(&mut self) -> Option<&mut tungstenite::WebSocket<Io>> {
        match self {
            Conn::Ws(ws) => Some(ws),
            Conn::Raw(_) => None,
        }
    }

    pub(super) fn send(&mut self, bytes: Bytes) -> io::Result<()> {
        match self {
            Conn::Raw(io) => {
                io.write_all(&bytes)?;
                io.flush()
            }
            Conn::Ws(ws) => ws.send(Message::Binary(bytes)).map_err(ws_err),
        }
    }

    /// Read what arrives (up to `want` bytes over a raw stream, one message
    /// over a WebSocket) onto the end of `buf`; 0: the stream ended.
    pub(super) fn read_into(&mut self, buf: &mut BytesMut, want: usize) -> io::Result<usize> {
        match self {
            Conn::Raw(io) => {
                let len = buf.len();
                buf.resize(len + want, 0);
                let r = io.read(&mut buf[len..]);
                buf.truncate(len + *r.as_ref().unwrap_or(&0));
                r
            }
            Conn::Ws(ws) => loop {
                match ws.read() {
                    Ok(Message::Binary(b)) => {
                        buf.extend_from_slice(&b);
                        return Ok(b.len().max(1));
                    }
                    Ok(Message::Close(_)) => return Ok(0),
                    Ok(_) => {}
                    Err(tungstenite::Error::ConnectionClosed)
                    | Err(tungstenite::Error::AlreadyClosed) => return Ok(0),
                    Err(e) => return Err(ws_err(e)),
                }
            },
        }
    }
}
