//! The WebSocket layer of a client connection (tungstenite, driven over
//! in-memory buffers): the upgrade handshake with its path and `Origin`
//! checks, then binary messages that each carry exactly one client-link
//! frame (docs/PROTOCOL.md, "WebSocket").

use super::WireError;
use crate::protocol::LEN_PREFIX;
use bytes::{Bytes, BytesMut};
use std::io::{self, Read, Write};
use std::sync::Arc;
use tungstenite::handshake::server::{ErrorResponse, Request, Response, ServerHandshake};
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tungstenite::{Message, WebSocket};

/// What the upgrade request must satisfy (from the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsSettings {
    /// The request path (`/ws` by default); any other is answered 404.
    pub path: String,
    /// Origins allowed to connect; empty: any (and requests without one).
    pub allowed_origins: Vec<String>,
    /// The most bytes the upgrade request may have.
    pub max_request: usize,
    /// The largest frame a message may carry (the client-link `max_frame`
    /// plus the length prefix): tungstenite refuses longer messages.
    pub max_message: usize,
}

/// The two ends tungstenite reads from and writes to: bytes received and
/// not yet taken, and bytes it wrote. Reads of an empty input would block;
/// writes always succeed (the shell sends `output` when it can).
#[derive(Debug, Default)]
pub(super) struct Mem {
    pub(super) input: BytesMut,
    pub(super) output: Vec<u8>,
}

impl Read for Mem {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        bytes::Buf::advance(&mut self.input, n);
        Ok(n)
    }
}

impl Write for Mem {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The upgrade request's checks, run by tungstenite once it has the request.
struct Check(Arc<WsSettings>);

impl tungstenite::handshake::server::Callback for Check {
    fn on_request(self, req: &Request, resp: Response) -> Result<Response, ErrorResponse> {
        let refuse = |status: u16, why: &str| {
            let mut r = ErrorResponse::new(Some(why.to_string()));
            *r.status_mut() = tungstenite::http::StatusCode::from_u16(status)
                .unwrap_or(tungstenite::http::StatusCode::BAD_REQUEST);
            r
        };
        if req.uri().path() != self.0.path {
            return Err(refuse(404, "no WebSocket endpoint at this path\n"));
        }
        if !self.0.allowed_origins.is_empty() {
            let origin = req
                .headers()
                .get("origin")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !self.0.allowed_origins.iter().any(|o| o == origin) {
                return Err(refuse(403, "origin not allowed\n"));
            }
        }
        Ok(resp)
    }
}

type Mid = MidHandshake<ServerHandshake<Mem, Check>>;
type ClientMid = MidHandshake<tungstenite::handshake::client::ClientHandshake<Mem>>;

enum State {
    /// Waiting for (the rest of) the upgrade request.
    Upgrading(Option<Box<Mid>>, Arc<WsSettings>),
    /// A client's upgrade request is out: waiting for the answer.
    Connecting(Option<Box<ClientMid>>),
    Open(Box<WebSocket<Mem>>),
    /// Failed or closed: nothing more is read or written.
    Done,
}

/// One connection's WebSocket layer.
pub(super) struct Ws {
    state: State,
    /// The upgrade request so far: tungstenite gets it whole, once its
    /// head is complete (it decides on how the bytes came in reads, not on
    /// the bytes: bytes behind the head in the same read were "junk", a
    /// head in many small reads an "attack"; fuzz/regressions/websocket).
    request: Vec<u8>,
}

/// What feeding bytes to the layer gave.
pub(super) struct Fed {
    /// The peer sent its close frame (or the stream ended cleanly).
    pub closed: bool,
}

impl Ws {
    pub(super) fn new(settings: Arc<WsSettings>) -> Ws {
        // The config must go in here: tungstenite sizes its read buffer
        // when the handshake makes the socket (128 KiB by default, zeroed
        // on every read), and a later set_config does not change it.
        let cfg = ws_config(settings.max_message);
        let mid = ServerHandshake::start(Mem::default(), Check(settings.clone()), Some(cfg));
        Ws {
            state: State::Upgrading(Some(Box::new(mid)), settings),
            request: Vec::new(),
        }
    }

    /// A client's side: the upgrade request for `url` (`ws://host:port/path`)
    /// goes onto `out` now.
    pub(super) fn client(url: &str, out: &mut Vec<u8>) -> Result<Ws, WireError> {
        use tungstenite::client::IntoClientRequest;
        let req = url
            .into_client_request()
            .map_err(|e| WireError::Upgrade(e.to_string()))?;
        let cfg = ws_config(crate::protocol::DEFAULT_MAX_FRAME as usize + LEN_PREFIX);
        let mid =
            tungstenite::handshake::client::ClientHandshake::start(Mem::default(), req, Some(cfg))
                .map_err(|e| WireError::Upgrade(e.to_string()))?;
        let state = match mid.handshake() {
            Err(HandshakeError::Interrupted(mut m)) => {
                out.append(&mut m.get_mut().get_mut().output);
                State::Connecting(Some(Box::new(m)))
            }
            Err(HandshakeError::Failure(e)) => return Err(WireError::Upgrade(e.to_string())),
            Ok(_) => return Err(WireError::Upgrade("answered before asked".into())),
        };
        Ok(Ws {
            state,
            request: Vec::new(),
        })
    }

    /// The upgrade is done: messages flow.
    pub(super) fn is_open(&self) -> bool {
        matches!(self.state, State::Open(_))
    }

    /// Take `bytes` from the wire: frames carried by whole binary messages
    /// are appended to `plain`; what the layer answers (the upgrade
    /// response, pongs, a close reply) is appended to `out`.
    pub(super) fn feed(
        &mut self,
        bytes: &[u8],
        plain: &mut BytesMut,
        out: &mut Vec<u8>,
    ) -> Result<Fed, WireError> {
        match &mut self.state {
            State::Upgrading(mid, settings) => {
                self.request.extend_from_slice(bytes);
                // Where the head ends, as httparse (tungstenite's parser)
                // sees it: empty lines before the request line are part of
                // it. Not HTTP at all: tungstenite answers the whole (400).
                let mut headers = [httparse::EMPTY_HEADER; 64];
                let end = match httparse::Request::new(&mut headers).parse(&self.request) {
                    Ok(httparse::Status::Complete(n)) => Some(n),
                    Ok(httparse::Status::Partial) => None,
                    // More headers than any upgrade needs: refused here,
                    // wherever the reads split them (tungstenite's own
                    // limit is higher; fuzz/regressions/websocket).
                    Err(httparse::Error::TooManyHeaders) => Some(usize::MAX),
                    Err(_) => Some(self.request.len()),
                };
                if end.unwrap_or(self.request.len()) > settings.max_request {
                    self.state = State::Done;
                    out.extend_from_slice(
                        b"HTTP/1.1 431 Request Header Fields Too Large\r\n\
                          connection: close\r\ncontent-length: 0\r\n\r\n",
                    );
                    return Err(WireError::Upgrade("request too large".into()));
                }
                let Some(end) = end else {
                    return Ok(Fed { closed: false });
                };
                let Some(mut m) = mid.take() else {
                    return Err(WireError::Closed);
                };
                // What follows the head is the WebSocket's already.
                let rest = self.request.split_off(end);
                let head = std::mem::take(&mut self.request);
                m.get_mut().get_mut().input.extend_from_slice(&head);
                match m.handshake() {
                    Ok(mut ws) => {
                        out.append(&mut ws.get_mut().output);
                        self.state = State::Open(Box::new(ws));
                        if rest.is_empty() {
                            Ok(Fed { closed: false })
                        } else {
                            self.feed(&rest, plain, out)
                        }
                    }
                    // The whole head was given: tungstenite cannot want more.
                    Err(HandshakeError::Interrupted(_)) => {
                        self.state = State::Done;
                        out.extend_from_slice(
                            b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\
                              content-length: 0\r\n\r\n",
                        );
                        Err(WireError::Upgrade(
                            "an upgrade request tungstenite did not finish".into(),
                        ))
                    }
                    Err(HandshakeError::Failure(e)) => {
                        self.state = State::Done;
                        // tungstenite wrote a refusal (404, 403) to the
                        // buffer it owned and dropped: write it again here.
                        let (status, body) = match &e {
                            tungstenite::Error::Http(resp) => {
                                (resp.status(), resp.body().clone().unwrap_or_default())
                            }
                            _ => (
                                tungstenite::http::StatusCode::BAD_REQUEST,
                                b"not a WebSocket upgrade request\n".to_vec(),
                            ),
                        };
                        let head = format!(
                            "HTTP/1.1 {} {}\r\nconnection: close\r\n\
                             content-type: text/plain\r\ncontent-length: {}\r\n\r\n",
                            status.as_u16(),
                            status.canonical_reason().unwrap_or(""),
                            body.len()
                        );
                        out.extend_from_slice(head.as_bytes());
                        out.extend_from_slice(&body);
                        Err(WireError::Upgrade(e.to_string()))
                    }
                }
            }
            State::Connecting(mid) => {
                let Some(mut m) = mid.take() else {
                    return Err(WireError::Closed);
                };
                m.get_mut().get_mut().input.extend_from_slice(bytes);
                match m.handshake() {
                    Ok((mut ws, _)) => {
                        let rest = std::mem::take(&mut ws.get_mut().input);
                        self.state = State::Open(Box::new(ws));
                        // Frames sent right behind the 101 (tungstenite
                        // keeps what it read past the answer).
                        self.feed(&rest, plain, out)
                    }
                    Err(HandshakeError::Interrupted(m)) => {
                        *mid = Some(Box::new(m));
                        Ok(Fed { closed: false })
                    }
                    Err(HandshakeError::Failure(e)) => {
                        self.state = State::Done;
                        Err(WireError::Upgrade(e.to_string()))
                    }
                }
            }
            State::Open(ws) => {
                ws.get_mut().input.extend_from_slice(bytes);
                let mut fed = Fed { closed: false };
                let result = loop {
                    match ws.read() {
                        Ok(Message::Binary(b)) => {
                            if let Err(e) = one_frame(&b) {
                                break Err(e);
                            }
                            plain.extend_from_slice(&b);
                        }
                        Ok(Message::Text(_)) => break Err(WireError::Text),
                        Ok(Message::Close(_)) => fed.closed = true,
                        Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
                        Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                            break Ok(())
                        }
                        Err(tungstenite::Error::ConnectionClosed)
                        | Err(tungstenite::Error::AlreadyClosed) => {
                            fed.closed = true;
                            break Ok(());
                        }
                        Err(tungstenite::Error::Capacity(e)) => {
                            break Err(WireError::TooLarge(e.to_string()))
                        }
                        Err(e) => break Err(WireError::WebSocket(e.to_string())),
                    }
                };
                // Pongs and a close reply tungstenite queued.
                let _ = ws.flush();
                out.append(&mut ws.get_mut().output);
                result.map(|()| fed)
            }
            State::Done => Err(WireError::Closed),
        }
    }

    /// Wrap each frame of `plain` (whole frames) in a binary message.
    pub(super) fn wrap(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), WireError> {
        let State::Open(ws) = &mut self.state else {
            return Err(WireError::Closed);
        };
        let mut at = 0;
        while at < plain.len() {
            let end = frame_end(plain, at).ok_or(WireError::Closed)?;
            let msg = Message::Binary(Bytes::copy_from_slice(&plain[at..end]));
            ws.write(msg)
                .map_err(|e| WireError::WebSocket(e.to_string()))?;
            at = end;
        }
        let _ = ws.flush();
        out.append(&mut ws.get_mut().output);
        Ok(())
    }

    /// Queue a close frame with `code` (once; later calls do nothing).
    pub(super) fn close(&mut self, code: CloseCode, out: &mut Vec<u8>) {
        if let State::Open(ws) = &mut self.state {
            if ws.can_write() {
                let _ = ws.close(Some(CloseFrame {
                    code,
                    reason: "".into(),
                }));
                let _ = ws.flush();
            }
            out.append(&mut ws.get_mut().output);
        }
    }
}

/// tungstenite's settings: a small read buffer (it is zeroed on each read),
/// no write buffering (the shell batches), messages of one frame at most.
fn ws_config(max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

/// Where the frame starting at `at` ends (`None`: `buf` does not hold it whole).
fn frame_end(buf: &[u8], at: usize) -> Option<usize> {
    let len = buf.get(at..at + LEN_PREFIX)?;
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let end = at.checked_add(LEN_PREFIX)?.checked_add(len)?;
    (end <= buf.len()).then_some(end)
}

/// A message must hold exactly one frame: its length prefix matches.
fn one_frame(msg: &[u8]) -> Result<(), WireError> {
    match frame_end(msg, 0) {
        Some(end) if end == msg.len() => Ok(()),
        Some(_) => Err(WireError::NotOneFrame("more than one frame in a message")),
        None => Err(WireError::NotOneFrame("less than one frame in a message")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_holds_exactly_one_frame() {
        let mut f = vec![0, 0, 0, 3, 1, 2, 3];
        assert!(one_frame(&f).is_ok());
        assert!(one_frame(&f[..6]).is_err());
        assert!(one_frame(&[0, 0]).is_err());
        f.extend_from_slice(&[0, 0, 0, 0]);
        assert!(one_frame(&f).is_err());
        assert_eq!(frame_end(&f, 7), Some(11));
    }
}
