//! The demo backend: a real backend speaking the backend link over TCP, so
//! the gateway works out of the box and tests and benchmarks have a peer.
//!
//! Contract (also in config/gateway.ron and docs/demo-backend.md):
//! - msg 1, login: body = decimal player id; code 0 and `player` = id when it
//!   parses to a u64 > 0, else application code 1 ([`LOGIN_REJECTED`]).
//! - msg 2 and 100..=199: echo the body.
//! - msg 3: answer the instance's own listen address (`ip:port`), so
//!   callers can see which instance served them.
//! - msg 200: wait body-ms (decimal), then answer an empty body.
//! - any other msg: application code 2 ([`UNKNOWN_MSG`]), empty body.
//! - PING: PONG.
//!
//! Requests are served concurrently (a delayed one does not hold up the
//! others), so answers leave in any order.

use crate::net::{Outbound, SharedStream};
use crate::protocol::{encode, Decoder, Frame, Header, Kind, Link, DEFAULT_MAX_FRAME};
use bytes::BytesMut;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

/// Application code of a refused login.
pub const LOGIN_REJECTED: u16 = 1;
/// Application code of a msg_id the demo does not serve.
pub const UNKNOWN_MSG: u16 = 2;
/// msg_id answered with the instance's own address (for balancing tests).
pub const WHOAMI: u32 = 3;
/// Longest delay msg 200 honours.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// A demo backend running on its own thread.
pub struct DemoBackend {
    pub addr: SocketAddr,
    shards: shards::Shards<(), ()>,
}

impl DemoBackend {
    /// Bind `addr` (port 0 picks one) and serve on a thread of its own.
    pub fn start(addr: SocketAddr) -> std::io::Result<DemoBackend> {
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
                        glommio::spawn_local(serve_conn(s, bound, stop.clone())).detach();
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
        200 => {
            let ms = text.and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
            (
                0,
                0,
                Vec::new(),
                Some(Duration::from_millis(ms).min(MAX_DELAY)),
            )
        }
        _ => (UNKNOWN_MSG, 0, Vec::new(), None),
    }
}

async fn serve_conn(stream: glommio::net::TcpStream, me: SocketAddr, stop: shards::StopToken) {
    let _ = stream.set_nodelay(true);
    let stream = SharedStream::new(stream);
    let out = Rc::new(Outbound::new());
    let writer = {
        let (out, stream) = (out.clone(), stream.clone());
        glommio::spawn_local(async move { out.run_writer(stream).await })
    };
    let decoder = Decoder::new(Link::GatewayToBackend, DEFAULT_MAX_FRAME);
    let mut buf = BytesMut::with_capacity(16 * 1024);
    'conn: loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => handle(&out, frame, me),
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

fn handle(out: &Rc<Outbound>, frame: Frame, me: SocketAddr) {
    let h = frame.header;
    match h.kind {
        Kind::Ping => out.push(|b| encode(b, &Header::new(Kind::Pong), &[])),
        Kind::Request => {
            let (code, player, mut body, delay) = answer(h.msg_id, &frame.body);
            if h.msg_id == WHOAMI {
                body = me.to_string().into_bytes();
            }
            let reply = Header {
                kind: Kind::Response,
                flags: 0,
                code,
                msg_id: h.msg_id,
                req_id: h.req_id,
                seq: player,
            };
            match delay {
                None => out.push(|b| encode(b, &reply, &body)),
                Some(d) => {
                    let out = out.clone();
                    glommio::spawn_local(async move {
                        glommio::timer::sleep(d).await;
                        if !out.is_closing() {
                            out.push(|b| encode(b, &reply, &body));
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
        assert_eq!(answer(200, b"999999999").3, Some(MAX_DELAY));
        assert_eq!(answer(WHOAMI, b"").0, 0);
        assert_eq!(answer(4, b"").0, UNKNOWN_MSG);
    }
}
