//! The demo backend: a real backend speaking the backend link over TCP, so
//! the gateway works out of the box and tests and benchmarks have a peer.
//!
//! Contract (also in config/gateway.ron and docs/demo-backend.md):
//! - msg 1, login: body = decimal player id; code 0 and `player` = id when it
//!   parses to a u64 > 0, else application code 1 ([`LOGIN_REJECTED`]).
//! - msg 2 and 100..=199: echo the body.
//! - msg 3: answer the instance's own listen address (`ip:port`), so
//!   callers can see which instance served them.
//! - msg 200: wait the number of milliseconds in the body's leading decimal
//!   digits (none: 0; at most [`MAX_DELAY`]), then echo the body. So `400`
//!   waits 400 ms, and `60:c3r17` waits 60 ms and answers `60:c3r17`: a
//!   test can tag a delayed request and recognise its answer.
//! - msg 201 ([`ARRIVALS`]): as msg 200, but the answer's body is `N:` and
//!   then the request's body, N being the number of msg 201 requests of
//!   this player that reached this connection so far, this one included:
//!   the order in which the backend received a player's requests, for
//!   tests of `order: PerPlayer` routes.
//! - any other msg: application code 2 ([`UNKNOWN_MSG`]), empty body.
//! - PING: PONG.
//!
//! Requests are served concurrently (a delayed one does not hold up the
//! others), so answers leave in any order.
//!
//! [`DemoBackend::start_with_log`] also reports every `RESPONSE` once it
//! was written to the socket toward the gateway ([`Answered`]), so a test
//! knows which requests the backend really answered (a `TIMEOUT` for one
//! of them is a lost answer, not a slow backend).

use crate::net::{Outbound, SharedStream};
use crate::protocol::{encode, Decoder, Frame, Header, Kind, Link, DEFAULT_MAX_FRAME};
use bytes::BytesMut;
use futures_lite::AsyncWrite;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Application code of a refused login.
pub const LOGIN_REJECTED: u16 = 1;
/// Application code of a msg_id the demo does not serve.
pub const UNKNOWN_MSG: u16 = 2;
/// msg_id answered with the instance's own address (for balancing tests).
pub const WHOAMI: u32 = 3;
/// msg_id whose answer numbers the player's arrivals (see the module doc).
pub const ARRIVALS: u32 = 201;
/// Longest delay msg 200 honours.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// One `RESPONSE` a demo backend wrote toward the gateway (see
/// [`DemoBackend::start_with_log`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answered {
    /// The request's `player` field (backend link): the authenticated
    /// player, or 0.
    pub player: u64,
    pub msg_id: u32,
    /// The gateway's req_id on that backend connection (not the client's).
    pub req_id: u32,
    /// The answer's code.
    pub code: u16,
    /// The answer's body.
    pub body: Vec<u8>,
    /// The instance that answered (its listen address).
    pub by: SocketAddr,
    /// When the write that completed it returned.
    pub at: Instant,
}

/// A demo backend running on its own thread.
pub struct DemoBackend {
    pub addr: SocketAddr,
    shards: shards::Shards<(), ()>,
}

impl DemoBackend {
    /// Bind `addr` (port 0 picks one) and serve on a thread of its own.
    pub fn start(addr: SocketAddr) -> std::io::Result<DemoBackend> {
        DemoBackend::serve(addr, None)
    }

    /// [`DemoBackend::start`], reporting each `RESPONSE` on `log` once it
    /// was written to the socket toward the gateway (the kernel has it).
    /// An answer still queued when the instance stops, or whose write
    /// failed, is not reported (nor, rarely, one whose write was completing
    /// as the instance stopped): the log may miss an answer, never invent
    /// one. Give it an unbounded channel (the backend's thread would wait
    /// on a full one); several instances, or an instance restarted, may
    /// share one channel.
    pub fn start_with_log(
        addr: SocketAddr,
        log: flume::Sender<Answered>,
    ) -> std::io::Result<DemoBackend> {
        DemoBackend::serve(addr, Some(log))
    }

    fn serve(
        addr: SocketAddr,
        log: Option<flume::Sender<Answered>>,
    ) -> std::io::Result<DemoBackend> {
        let (reservation, bound) = crate::net::reserve_port(addr)?;
        let (ready_tx, ready_rx) = flume::bounded::<std::io::Result<()>>(1);
        let cfg = shards::ShardsConfig {
            shards: 1,
            pin: false,
            name: "demo-backend".into(),
            mesh_capacity: 1,
            spin_before_park: None,
        };
        let shards = shards::start(&cfg, move |shard: shards::Shard<()>| async move {
            let listener = match crate::net::listen_reuseport(bound) {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            let stop = shard.stop_token().clone();
            loop {
                let accepted =
                    futures_lite::future::or(async { Some(listener.accept().await) }, async {
                        stop.stopped().await;
                        None
                    })
                    .await;
                match accepted {
                    None => break,
                    Some(Ok(s)) => {
                        glommio::spawn_local(serve_conn(s, bound, stop.clone(), log.clone()))
                            .detach();
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "demo backend accept failed");
                        glommio::timer::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        })
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        let ready = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("demo backend thread ended")));
        drop(reservation);
        if let Err(e) = ready {
            shards.stop();
            let _ = shards.join();
            return Err(e);
        }
        Ok(DemoBackend {
            addr: bound,
            shards,
        })
    }

    /// Stop and join its thread; open connections are closed.
    pub fn stop(self) {
        self.shards.stop();
        let _ = self.shards.join();
    }

    /// Wait until stopped from elsewhere.
    pub fn join(self) {
        let _ = self.shards.join();
    }

    pub fn stop_handle(&self) -> shards::StopHandle {
        self.shards.stop_handle()
    }
}

/// The answer to one request: (code, player, body, delay).
pub fn answer(msg_id: u32, body: &[u8]) -> (u16, u64, Vec<u8>, Option<Duration>) {
    let text = std::str::from_utf8(body).ok().map(str::trim);
    match msg_id {
        1 => match text.and_then(|t| t.parse::<u64>().ok()) {
            Some(p) if p > 0 => (0, p, Vec::new(), None),
            _ => (LOGIN_REJECTED, 0, Vec::new(), None),
        },
        2 | 100..=199 => (0, 0, body.to_vec(), None),
        WHOAMI => (0, 0, Vec::new(), None),
        200 | ARRIVALS => (0, 0, body.to_vec(), Some(leading_ms(body).min(MAX_DELAY))),
        _ => (UNKNOWN_MSG, 0, Vec::new(), None),
    }
}

/// The delay of msg 200: the body's leading decimal digits (after any
/// leading whitespace), in milliseconds; none is 0.
fn leading_ms(body: &[u8]) -> Duration {
    let digits = body
        .iter()
        .skip_while(|b| b.is_ascii_whitespace())
        .take_while(|b| b.is_ascii_digit());
    let ms = digits.fold(0u64, |n, &d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    });
    Duration::from_millis(ms)
}

/// Answers queued on one connection and not yet written, each with the
/// stream offset just past it, to report once the writer got that far.
struct AnswerLog {
    tx: flume::Sender<Answered>,
    pending: RefCell<VecDeque<(u64, Answered)>>,
    written: Cell<u64>,
}

impl AnswerLog {
    /// `n` more bytes reached the socket: report what they complete.
    fn wrote(&self, n: usize) {
        let written = self.written.get() + n as u64;
        self.written.set(written);
        let mut pending = self.pending.borrow_mut();
        let now = Instant::now();
        while pending.front().is_some_and(|(end, _)| *end <= written) {
            if let Some((_, mut a)) = pending.pop_front() {
                a.at = now;
                let _ = self.tx.send(a);
            }
        }
    }
}

/// The connection's socket as the writer sees it, counting the bytes each
/// write got into the kernel for the [`AnswerLog`].
struct Logged {
    stream: SharedStream,
    log: Option<Rc<AnswerLog>>,
}

impl AsyncWrite for Logged {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write(cx, buf);
        if let (Poll::Ready(Ok(n)), Some(log)) = (&r, &this.log) {
            log.wrote(*n);
        }
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_close(cx)
    }
}

/// What [`handle`] needs of its connection.
struct Conn {
    out: Rc<Outbound>,
    me: SocketAddr,
    log: Option<Rc<AnswerLog>>,
    /// msg 201 requests received, by player.
    arrivals: RefCell<std::collections::HashMap<u64, u64>>,
}

impl Conn {
    /// Queue a `RESPONSE` (and its report, if logging).
    fn respond(&self, reply: &Header, player: u64, body: &[u8]) {
        self.out.push(|b| encode(b, reply, body));
        if let Some(log) = &self.log {
            log.pending.borrow_mut().push_back((
                self.out.pushed_total(),
                Answered {
                    player,
                    msg_id: reply.msg_id,
                    req_id: reply.req_id,
                    code: reply.code,
                    body: body.to_vec(),
                    by: self.me,
                    at: Instant::now(),
                },
            ));
        }
    }
}

async fn serve_conn(
    stream: glommio::net::TcpStream,
    me: SocketAddr,
    stop: shards::StopToken,
    log: Option<flume::Sender<Answered>>,
) {
    let _ = stream.set_nodelay(true);
    let stream = SharedStream::new(stream);
    let conn = Rc::new(Conn {
        arrivals: RefCell::new(std::collections::HashMap::new()),
        out: Rc::new(Outbound::new()),
        me,
        log: log.map(|tx| {
            Rc::new(AnswerLog {
                tx,
                pending: RefCell::new(VecDeque::new()),
                written: Cell::new(0),
            })
        }),
    });
    let out = conn.out.clone();
    let writer = {
        let sink = Logged {
            stream: stream.clone(),
            log: conn.log.clone(),
        };
        let out = out.clone();
        glommio::spawn_local(async move { out.run_writer(sink).await })
    };
    let decoder = Decoder::new(Link::GatewayToBackend, DEFAULT_MAX_FRAME);
    let mut buf = BytesMut::with_capacity(16 * 1024);
    'conn: loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => handle(&conn, frame),
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "demo backend: bad frame, closing");
                    break 'conn;
                }
            }
        }
        let want = decoder.needed(&buf).max(16 * 1024);
        if !matches!(
            crate::net::read_more(&stream, &mut buf, want, stop.stopped()).await,
            crate::net::ReadMore::Data(_)
        ) {
            break;
        }
    }
    out.discard();
    out.close();
    drop(writer);
}

fn handle(conn: &Rc<Conn>, frame: Frame) {
    let h = frame.header;
    match h.kind {
        Kind::Ping => conn.out.push(|b| encode(b, &Header::new(Kind::Pong), &[])),
        Kind::Request => {
            let (code, player, mut body, delay) = answer(h.msg_id, &frame.body);
            if h.msg_id == WHOAMI {
                body = conn.me.to_string().into_bytes();
            }
            if h.msg_id == ARRIVALS {
                let n = {
                    let mut arrivals = conn.arrivals.borrow_mut();
                    let n = arrivals.entry(h.seq).or_insert(0);
                    *n += 1;
                    *n
                };
                let mut tagged = format!("{n}:").into_bytes();
                tagged.extend_from_slice(&body);
                body = tagged;
            }
            let reply = Header {
                kind: Kind::Response,
                flags: 0,
                code,
                msg_id: h.msg_id,
                req_id: h.req_id,
                seq: player,
            };
            let from = h.seq;
            match delay {
                None => conn.respond(&reply, from, &body),
                Some(d) => {
                    let conn = conn.clone();
                    glommio::spawn_local(async move {
                        glommio::timer::sleep(d).await;
                        if !conn.out.is_closing() {
                            conn.respond(&reply, from, &body);
                        }
                    })
                    .detach();
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract() {
        assert_eq!(answer(1, b"42"), (0, 42, vec![], None));
        assert_eq!(answer(1, b"0").0, LOGIN_REJECTED);
        assert_eq!(answer(1, b"x").0, LOGIN_REJECTED);
        assert_eq!(answer(1, b"-3").0, LOGIN_REJECTED);
        assert_eq!(answer(2, b"hi"), (0, 0, b"hi".to_vec(), None));
        assert_eq!(answer(150, b"yo").2, b"yo".to_vec());
        assert_eq!(answer(200, b"25").3, Some(Duration::from_millis(25)));
        assert_eq!(answer(200, b"25").2, b"25".to_vec());
        assert_eq!(
            answer(200, b"60:c3r17"),
            (0, 0, b"60:c3r17".to_vec(), Some(Duration::from_millis(60)))
        );
        assert_eq!(answer(200, b" 7 ").3, Some(Duration::from_millis(7)));
        assert_eq!(answer(200, b"tag").3, Some(Duration::ZERO));
        assert_eq!(answer(200, b"").3, Some(Duration::ZERO));
        assert_eq!(answer(200, b"999999999").3, Some(MAX_DELAY));
        assert_eq!(answer(200, b"99999999999999999999999").3, Some(MAX_DELAY));
        assert_eq!(answer(WHOAMI, b"").0, 0);
        assert_eq!(answer(4, b"").0, UNKNOWN_MSG);
    }
}
