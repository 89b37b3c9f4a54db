//! The reference client on glommio: the same contract as the blocking
//! [`super::Client`], for programs that drive thousands of connections
//! from one thread (the load tester). Writes are queued and sent in
//! batches by a writer task; reads check the seq contract as they go.

use super::{check_seq, first_req_id, ClientError, LoggedIn};
use crate::net::{Outbound, SharedStream};
use crate::protocol::{
    encode, parse_session_body, Code, Decoder, Frame, Header, Kind, Link, DEFAULT_MAX_FRAME,
};
use bytes::BytesMut;
use glommio::net::TcpStream;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;

/// One client connection on the current glommio executor.
pub struct AsyncClient {
    stream: SharedStream,
    out: Rc<Outbound>,
    decoder: Decoder,
    buf: BytesMut,
    next_req_id: u32,
    /// Highest seq received in order.
    pub last_seq: u64,
    /// Check the seq contract on every frame (off when talking to a
    /// backend directly, which has no seqs).
    pub check_seqs: bool,
}

impl AsyncClient {
    /// Connect to `addr`, from `source` if given (several loopback source
    /// addresses give more than one port range of connections).
    pub async fn connect(
        addr: SocketAddr,
        source: Option<IpAddr>,
    ) -> Result<AsyncClient, ClientError> {
        let stream = connect_tcp(addr, source).await?;
        AsyncClient::over(SharedStream::new(stream), BytesMut::with_capacity(512))
    }

    /// Connect as [`connect`](Self::connect) does, then with TLS and/or a
    /// WebSocket as `opts` says (handshakes within 10 s).
    pub async fn connect_via(
        addr: SocketAddr,
        source: Option<IpAddr>,
        opts: &super::ConnectOptions,
    ) -> Result<AsyncClient, ClientError> {
        if opts.tls.is_none() && opts.websocket.is_none() {
            return AsyncClient::connect(addr, source).await;
        }
        let tcp = connect_tcp(addr, source).await?;
        let scheme = if opts.tls.is_some() { "wss" } else { "ws" };
        let url = opts
            .websocket
            .as_ref()
            .map(|w| format!("{scheme}://{addr}{}", w.path));
        let wire = crate::wire::Wire::client(opts.tls.clone(), url.as_deref())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let stream = SharedStream::wired(tcp, Box::new(wire));
        let mut buf = BytesMut::with_capacity(512);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            stream.flush_wire().await?;
            if stream.wire_open() {
                break;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match crate::net::read_more(&stream, &mut buf, 4096, glommio::timer::sleep(left)).await
            {
                crate::net::ReadMore::Data(_) => {}
                crate::net::ReadMore::Interrupted => {
                    return Err(ClientError::Timeout(std::time::Duration::from_secs(10)))
                }
                crate::net::ReadMore::Eof => return Err(ClientError::Closed),
                crate::net::ReadMore::Err(e) => return Err(e.into()),
            }
        }
        // What the handshake's last flight left (TLS tickets, ...).
        stream.flush_wire().await?;
        AsyncClient::over(stream, buf)
    }

    fn over(stream: SharedStream, buf: BytesMut) -> Result<AsyncClient, ClientError> {
        let out = Rc::new(Outbound::new());
        {
            let (out, stream) = (out.clone(), stream.clone());
            glommio::spawn_local(async move {
                let _ = out.run_writer(stream).await;
            })
            .detach();
        }
        Ok(AsyncClient {
            stream,
            out,
            decoder: Decoder::new(Link::GatewayToClient, DEFAULT_MAX_FRAME),
            buf,
            next_req_id: first_req_id(),
            last_seq: 0,
            check_seqs: true,
        })
    }

    /// Queue one frame (sent with whatever else is queued).
    pub fn send(&self, h: &Header, body: &[u8]) {
        self.out.push(|b| encode(b, h, body));
    }

    /// Queue a REQUEST; returns its req_id.
    pub fn send_request(&mut self, msg_id: u32, body: &[u8]) -> u32 {
        let req_id = self.next_req_id;
        self.next_req_id = self.next_req_id.wrapping_add(1).max(1);
        let mut h = Header::new(Kind::Request);
        h.msg_id = msg_id;
        h.req_id = req_id;
        self.send(&h, body);
        req_id
    }

    pub fn set_next_req_id(&mut self, id: u32) {
        self.next_req_id = id.max(1);
    }

    pub fn next_req_id(&self) -> u32 {
        self.next_req_id
    }

    /// Bytes queued and not yet written.
    pub fn unsent(&self) -> usize {
        self.out.queued()
    }

    /// ACK everything received so far.
    pub fn ack(&self) {
        let mut h = Header::new(Kind::Ack);
        h.seq = self.last_seq;
        self.send(&h, &[]);
    }

    /// PING with the last seq (the PONG comes through [`recv`](Self::recv)).
    pub fn ping(&self) {
        let mut h = Header::new(Kind::Ping);
        h.seq = self.last_seq;
        self.send(&h, &[]);
    }

    /// The next frame; checks the seq contract when `check_seqs`.
    pub async fn recv(&mut self) -> Result<Frame, ClientError> {
        loop {
            if let Some(f) = self.recv_before(None).await? {
                return Ok(f);
            }
        }
    }

    /// The next frame, or `None` once `deadline` passes first (a timed-out
    /// wait loses nothing: bytes already read stay buffered).
    pub async fn recv_before(
        &mut self,
        deadline: Option<std::time::Instant>,
    ) -> Result<Option<Frame>, ClientError> {
        loop {
            if let Some(f) = self.decoder.decode(&mut self.buf)? {
                if self.check_seqs {
                    check_seq(&mut self.last_seq, &f)?;
                }
                return Ok(Some(f));
            }
            if self.buf.is_empty() && self.buf.capacity() > 64 * 1024 {
                self.buf = BytesMut::with_capacity(512);
            }
            let want = self.decoder.needed(&self.buf).max(4096);
            let wait = async {
                match deadline {
                    Some(d) => {
                        glommio::timer::sleep(
                            d.saturating_duration_since(std::time::Instant::now()),
                        )
                        .await
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            match crate::net::read_more(&self.stream, &mut self.buf, want, wait).await {
                crate::net::ReadMore::Interrupted => return Ok(None),
                crate::net::ReadMore::Eof => return Err(ClientError::Closed),
                crate::net::ReadMore::Data(_) => {}
                crate::net::ReadMore::Err(e) => return Err(e.into()),
            }
        }
    }

    /// Log in through route `msg_id`: `SESSION`, replays, then the login
    /// `RESPONSE`. Frames other than these are dropped (the caller logs in
    /// before it has anything else in flight).
    pub async fn login(&mut self, msg_id: u32, body: &[u8]) -> Result<LoggedIn, ClientError> {
        let req_id = self.send_request(msg_id, body);
        let mut session = None;
        loop {
            let f = self.recv().await?;
            match f.header.kind {
                Kind::Session => {
                    let (player, token) = parse_session_body(&f.body)
                        .ok_or_else(|| ClientError::Unexpected(Box::new(f.clone())))?;
                    session = Some((player, token.to_vec(), f.header.seq, f.header.code));
                    self.last_seq = f.header.seq;
                }
                Kind::Response if f.header.req_id == req_id => {
                    let Some((player, token, r, code)) = session else {
                        return Err(ClientError::LoginRejected(f.header.code));
                    };
                    return Ok(LoggedIn {
                        player,
                        token,
                        resume_point: r,
                        gap: code == u16::from(Code::GAP),
                        response: f,
                    });
                }
                Kind::Kick => return Err(ClientError::Kicked(f.header.code)),
                _ => {}
            }
        }
    }

    /// Resume with `token` from `last`; the missed frames follow through
    /// [`recv`](Self::recv).
    pub async fn resume(&mut self, token: &[u8], last: u64) -> Result<LoggedIn, ClientError> {
        let mut h = Header::new(Kind::Resume);
        h.seq = last;
        self.send(&h, token);
        loop {
            let f = self.recv().await?;
            match f.header.kind {
                Kind::Error => return Err(ClientError::ResumeRefused(f.header.code)),
                Kind::Kick => return Err(ClientError::Kicked(f.header.code)),
                Kind::Session => {
                    let (player, token) = parse_session_body(&f.body)
                        .ok_or_else(|| ClientError::Unexpected(Box::new(f.clone())))?;
                    let token = token.to_vec();
                    self.last_seq = f.header.seq;
                    return Ok(LoggedIn {
                        player,
                        token,
                        resume_point: f.header.seq,
                        gap: f.header.code == u16::from(Code::GAP),
                        response: f,
                    });
                }
                _ => {}
            }
        }
    }

    /// Close at once: queued output is dropped (a connection that dies).
    pub fn abort(self) {
        self.out.discard();
        self.out.close();
    }

    /// Close after the queued output is written.
    pub async fn close(self) {
        self.out.close();
        self.out.flushed().await;
    }
}

impl Drop for AsyncClient {
    fn drop(&mut self) {
        self.out.close();
    }
}

/// A TCP connection to `addr`, from `source` if given.
async fn connect_tcp(addr: SocketAddr, source: Option<IpAddr>) -> Result<TcpStream, ClientError> {
    let stream = match source {
        None => TcpStream::connect(addr)
            .await
            .map_err(std::io::Error::from)?,
        Some(ip) => {
            let sock = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )?;
            sock.bind(&SocketAddr::new(ip, 0).into())?;
            // Loopback connects complete at once; a blocking connect
            // here is a handful of microseconds.
            sock.connect(&addr.into())?;
            sock.set_nonblocking(true)?;
            // SAFETY: a connected TCP socket whose fd we hand over whole.
            unsafe { TcpStream::from_raw_fd(sock.into_raw_fd()) }
        }
    };
    stream.set_nodelay(true).map_err(std::io::Error::from)?;
    Ok(stream)
}
