//! The reference client of the client link (PROTOCOL.md section 2), blocking
//! and dependency-free: connect, log in, send requests, ping, ack, and check
//! that sequenced frames arrive 1, 2, 3 ... with no gap.
//!
//! Tests use it; game client programmers can read it as the contract in code.
//! [`asynch`] is the same client on glommio, for the load tester.
//!
//! It connects over plain TCP, TLS, a WebSocket, or a WebSocket over TLS
//! ([`Client::connect_via`]); frames are the same bytes on each.

pub mod asynch;
mod transport;

use transport::Conn;
pub use transport::{ConnectOptions, WsOptions};

use crate::protocol::{
    encode, parse_session_body, Code, DecodeError, Decoder, Frame, Header, Kind, Link,
};
use bytes::BytesMut;
use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// What went wrong on the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("io: {0}")]
    Io(#[from] io::Error),
    #[error("bad frame from the gateway: {0}")]
    Decode(#[from] DecodeError),
    #[error("the gateway closed the connection")]
    Closed,
    #[error("no frame within {0:?}")]
    Timeout(Duration),
    #[error("seq {got} arrived where {expected} was due")]
    SeqGap { expected: u64, got: u64 },
    #[error("unexpected frame: {0:?}")]
    Unexpected(Box<Frame>),
    #[error("login rejected with code {0:#06x}")]
    LoginRejected(u16),
    #[error("resume refused with code {0:#06x}")]
    ResumeRefused(u16),
    #[error("kicked with code {0:#06x}")]
    Kicked(u16),
}

/// The outcome of a successful login.
#[derive(Debug, Clone)]
pub struct LoggedIn {
    pub player: u64,
    pub token: Vec<u8>,
    /// Resume point R of the `SESSION` frame.
    pub resume_point: u64,
    /// `SESSION` came with code `GAP`: frames before R were lost.
    pub gap: bool,
    /// The login `RESPONSE` (for a resume: the `SESSION` frame).
    pub response: Frame,
}

/// A blocking client connection.
pub struct Client {
    conn: Conn,
    decoder: Decoder,
    buf: BytesMut,
    /// Frames received but not yet asked for.
    queued: VecDeque<Frame>,
    next_req_id: u32,
    /// Highest seq received in order (what PING/ACK report).
    pub last_seq: u64,
    /// How long a receive waits.
    pub timeout: Duration,
    /// Check the seq contract on every frame received (tests that check
    /// the stream themselves turn it off).
    pub check_seqs: bool,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Result<Client, ClientError> {
        Client::connect_via(addr, &ConnectOptions::default())
    }

    /// Connect with TLS and/or over a WebSocket, as `opts` says.
    pub fn connect_via(addr: SocketAddr, opts: &ConnectOptions) -> Result<Client, ClientError> {
        let conn = Conn::open(addr, opts)?;
        Ok(Client {
            conn,
            decoder: Decoder::new(Link::GatewayToClient, crate::protocol::DEFAULT_MAX_FRAME),
            buf: BytesMut::with_capacity(4096),
            queued: VecDeque::new(),
            next_req_id: first_req_id(),
            last_seq: 0,
            timeout: Duration::from_secs(10),
            check_seqs: true,
        })
    }

    /// Set the req_id of the next request (keep counting across reconnects:
    /// replayed frames carry earlier req_ids).
    pub fn set_next_req_id(&mut self, id: u32) {
        self.next_req_id = id.max(1);
    }

    /// The req_id the next request will carry.
    pub fn next_req_id(&self) -> u32 {
        self.next_req_id
    }

    /// The raw socket, for tests that write bytes of their own.
    pub fn stream(&mut self) -> &mut TcpStream {
        self.conn.tcp_mut()
    }

    /// The WebSocket (None: not over one), for tests that send messages
    /// of their own.
    pub fn websocket(&mut self) -> Option<&mut tungstenite::WebSocket<transport::Io>> {
        self.conn.websocket()
    }

    /// Send one frame (over a WebSocket: one binary message).
    pub fn send(&mut self, h: &Header, body: &[u8]) -> Result<(), ClientError> {
        let mut out = BytesMut::with_capacity(crate::protocol::frame_len(body.len()));
        encode(&mut out, h, body);
        self.conn.send(out.freeze())?;
        Ok(())
    }

    /// Send raw bytes (over a WebSocket: as one binary message).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.conn.send(bytes::Bytes::copy_from_slice(bytes))?;
        Ok(())
    }

    /// Send a REQUEST; returns its req_id.
    pub fn send_request(&mut self, msg_id: u32, body: &[u8]) -> Result<u32, ClientError> {
        let req_id = self.next_req_id;
        self.next_req_id = self.next_req_id.wrapping_add(1).max(1);
        let mut h = Header::new(Kind::Request);
        h.msg_id = msg_id;
        h.req_id = req_id;
        self.send(&h, body)?;
        Ok(req_id)
    }

    /// Send a REQUEST and wait for its RESPONSE (other frames stay queued).
    pub fn request(&mut self, msg_id: u32, body: &[u8]) -> Result<Frame, ClientError> {
        let req_id = self.send_request(msg_id, body)?;
        self.response_to(req_id)
    }

    /// Wait for the RESPONSE with this req_id.
    pub fn response_to(&mut self, req_id: u32) -> Result<Frame, ClientError> {
        self.wait_for(|f| f.header.kind == Kind::Response && f.header.req_id == req_id)
    }

    /// Wait for the first frame `want` accepts; frames before it stay queued.
    pub fn wait_for(&mut self, want: impl Fn(&Frame) -> bool) -> Result<Frame, ClientError> {
        if let Some(i) = self.queued.iter().position(&want) {
            return self.queued.remove(i).ok_or(ClientError::Closed);
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            let f = self.read_frame(deadline)?;
            if want(&f) {
                return Ok(f);
            }
            self.queued.push_back(f);
        }
    }

    /// The next frame, queued or new.
    pub fn recv(&mut self) -> Result<Frame, ClientError> {
        if let Some(f) = self.queued.pop_front() {
            return Ok(f);
        }
        let deadline = Instant::now() + self.timeout;
        self.read_frame(deadline)
    }

    /// Log in through the login route `msg_id` with `body`: expects
    /// `SESSION`, any replayed frames, then the login `RESPONSE`.
    pub fn login(&mut self, msg_id: u32, body: &[u8]) -> Result<LoggedIn, ClientError> {
        let req_id = self.send_request(msg_id, body)?;
        let first = self.wait_for(|f| {
            f.header.kind == Kind::Session
                || (f.header.kind == Kind::Response && f.header.req_id == req_id)
        })?;
        if first.header.kind == Kind::Response {
            return Err(ClientError::LoginRejected(first.header.code));
        }
        let (player, token) = parse_session_body(&first.body)
            .ok_or_else(|| ClientError::Unexpected(Box::new(first.clone())))?;
        let token = token.to_vec();
        self.last_seq = first.header.seq;
        let response = self.response_to(req_id)?;
        Ok(LoggedIn {
            player,
            token,
            resume_point: first.header.seq,
            gap: first.header.code == u16::from(Code::GAP),
            response,
        })
    }

    /// Resume with `token` from `last` (the highest seq received in order).
    /// On success `SESSION` carried R = `last` and a new token (the old one
    /// no longer works); the missed frames follow and arrive through
    /// [`Client::recv`] in order. An `ERROR` (`RESUME_REJECTED`,
    /// `RESUME_GAP`) leaves the connection open for a login.
    pub fn resume(&mut self, token: &[u8], last: u64) -> Result<LoggedIn, ClientError> {
        let mut h = Header::new(Kind::Resume);
        h.seq = last;
        self.send(&h, token)?;
        let f =
            self.wait_for(|f| matches!(f.header.kind, Kind::Session | Kind::Error | Kind::Kick))?;
        match f.header.kind {
            Kind::Error => return Err(ClientError::ResumeRefused(f.header.code)),
            Kind::Kick => return Err(ClientError::Kicked(f.header.code)),
            _ => {}
        }
        let (player, token) = parse_session_body(&f.body)
            .ok_or_else(|| ClientError::Unexpected(Box::new(f.clone())))?;
        let token = token.to_vec();
        self.last_seq = f.header.seq;
        Ok(LoggedIn {
            player,
            token,
            resume_point: f.header.seq,
            gap: f.header.code == u16::from(Code::GAP),
            response: f,
        })
    }

    /// Log in to the demo backend as `player`.
    pub fn login_demo(&mut self, player: u64) -> Result<LoggedIn, ClientError> {
        self.login(1, player.to_string().as_bytes())
    }

    /// PING with the last seq; returns the PONG's seq (last seq assigned).
    pub fn ping(&mut self) -> Result<u64, ClientError> {
        let mut h = Header::new(Kind::Ping);
        h.seq = self.last_seq;
        self.send(&h, &[])?;
        Ok(self.wait_for(|f| f.header.kind == Kind::Pong)?.header.seq)
    }

    /// ACK every seq received so far.
    pub fn ack(&mut self) -> Result<(), ClientError> {
        let mut h = Header::new(Kind::Ack);
        h.seq = self.last_seq;
        self.send(&h, &[])
    }

    /// Wait for a KICK and return its code.
    pub fn expect_kick(&mut self) -> Result<u16, ClientError> {
        Ok(self.wait_for(|f| f.header.kind == Kind::Kick)?.header.code)
    }

    /// Whether the gateway closed the connection (reads EOF or reset
    /// within the timeout, after any frames still queued).
    pub fn is_closed(&mut self) -> bool {
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.read_frame(deadline) {
                Ok(f) => self.queued.push_back(f),
                Err(ClientError::Closed) | Err(ClientError::Io(_)) => return true,
                Err(_) => return false,
            }
        }
    }

    fn read_frame(&mut self, deadline: Instant) -> Result<Frame, ClientError> {
        loop {
            if let Some(f) = self.decoder.decode(&mut self.buf)? {
                if self.check_seqs {
                    self.check_seq(&f)?;
                }
                return Ok(f);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout(self.timeout));
            }
            self.conn.tcp_mut().set_read_timeout(Some(left))?;
            let len = self.buf.len();
            let want = self.decoder.needed(&self.buf).max(4096);
            let r = self.conn.read_into(&mut self.buf, want);
            match r {
                Ok(0) => {
                    self.buf.truncate(len);
                    return Err(ClientError::Closed);
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    self.buf.truncate(len);
                    return Err(ClientError::Timeout(self.timeout));
                }
                Err(e) => {
                    self.buf.truncate(len);
                    return Err(e.into());
                }
            }
        }
    }

    fn check_seq(&mut self, f: &Frame) -> Result<(), ClientError> {
        check_seq(&mut self.last_seq, f)
    }
}

/// The client's side of the seq contract: a sequenced frame (RESPONSE or
/// PUSH with seq > 0) must be `last + 1`; then it becomes `last`.
pub fn check_seq(last: &mut u64, f: &Frame) -> Result<(), ClientError> {
    let sequenced = matches!(f.header.kind, Kind::Response | Kind::Push) && f.header.seq > 0;
    if !sequenced {
        return Ok(());
    }
    let expected = *last + 1;
    if f.header.seq != expected {
        return Err(ClientError::SeqGap {
            expected,
            got: f.header.seq,
        });
    }
    *last = f.header.seq;
    Ok(())
}

/// A random first req_id: replayed frames carry the req_ids of earlier
/// connections, so a new connection must not count from 1 again (a real
/// client keeps its counter across reconnects; this one starts at random).
pub fn first_req_id() -> u32 {
    let mut b = [0u8; 4];
    let _ = getrandom::getrandom(&mut b);
    u32::from_be_bytes(b).max(1)
}

/// The name of a gateway code, or the number for an application code.
pub fn code_name(code: u16) -> String {
    Code::from_u16(code)
        .map(|c| c.name().to_string())
        .unwrap_or_else(|| format!("{code:#06x}"))
}
