//! A connection with a wire (TLS, WebSocket) before it is a session: the
//! TLS handshake and the WebSocket upgrade, each bounded by its own
//! `handshake_timeout`, while the connection already holds its place under
//! `max_connections`. Only a connection whose handshakes finished becomes a
//! session (see `conn::serve`).

use crate::net::{read_more, ReadMore, SharedStream, Slot};
use crate::shard::ShardCtx;
use crate::wire::{Wire, WireKind};
use bytes::BytesMut;
use glommio::net::TcpStream;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How long a refused handshake may take to send its answer (a 4xx, an alert).
const REFUSAL_FLUSH: Duration = Duration::from_secs(1);

/// Run the handshakes of `kind` on `tcp`, then serve it as a session.
pub async fn handshake_then_serve(
    ctx: Rc<ShardCtx>,
    slot: Slot,
    tcp: TcpStream,
    peer: SocketAddr,
    kind: WireKind,
) {
    let _ = tcp.set_nodelay(true);
    let Some(stream) = wired(tcp, &kind, peer) else {
        return;
    };
    let times = {
        let cfg = ctx.cfg();
        (
            cfg.tls
                .as_ref()
                .map_or(Duration::ZERO, |t| t.handshake_timeout),
            cfg.ws.handshake_timeout,
        )
    };
    match handshake(&stream, times, peer).await {
        Ok(buf) => {
            crate::shard::conn::serve(
                ctx,
                slot,
                stream,
                peer,
                buf,
                crate::shard::conn::Start::Fresh,
            )
            .await
        }
        Err(why) => {
            let st = ctx.stats();
            if why == TIMED_OUT {
                st.handshakes_timed_out
                    .set(st.handshakes_timed_out.get() + 1);
            } else {
                st.handshakes_failed.set(st.handshakes_failed.get() + 1);
            }
        }
    }
}

/// `tcp` with a fresh wire of `kind` (None: TLS could not be set up).
pub fn wired(tcp: TcpStream, kind: &WireKind, peer: SocketAddr) -> Option<SharedStream> {
    match Wire::new(kind) {
        Ok(w) => Some(SharedStream::wired(tcp, Box::new(w))),
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot set up the connection's TLS");
            None
        }
    }
}

/// Why [`handshake`] gave up on a connection that was too slow.
pub const TIMED_OUT: &str = "timed out";

/// Drive the wire's handshakes on `stream` (TLS within `times.0`, then a
/// WebSocket upgrade within `times.1`). Ok: the bytes read past them
/// (what the client sent after the handshake, already through the wire).
pub async fn handshake(
    stream: &SharedStream,
    times: (Duration, Duration),
    peer: SocketAddr,
) -> Result<BytesMut, &'static str> {
    let (tls_time, ws_time) = times;
    let mut tls_done = !stream.with_wire(|_, w| w.is_some_and(|w| w.tls_handshaking()));
    let mut buf = BytesMut::new();
    let mut deadline = Instant::now() + if tls_done { ws_time } else { tls_time };
    let outcome = loop {
        if !tls_done && !stream.with_wire(|_, w| w.is_some_and(|w| w.tls_handshaking())) {
            tls_done = true;
            // The upgrade's own time starts when TLS is done.
            deadline = Instant::now() + ws_time;
        }
        if stream.wire_open() {
            break Ok(buf);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let r = read_more(stream, &mut buf, 4096, glommio::timer::sleep(left)).await;
        // Whatever the wire answered (the next TLS flight, a 101, a 4xx).
        let sent = within(stream, REFUSAL_FLUSH.max(left)).await;
        match r {
            ReadMore::Data(_) if sent => {}
            ReadMore::Data(_) => break Err("write failed"),
            ReadMore::Interrupted => break Err(TIMED_OUT),
            ReadMore::Eof => break Err("closed by the client"),
            ReadMore::Err(e) => {
                tracing::debug!(%peer, error = %e, "handshake refused");
                break Err("refused");
            }
        }
    };
    if let Err(why) = &outcome {
        tracing::debug!(%peer, why, "handshake failed");
    }
    outcome
}

/// Write what the wire holds within `limit`; false on error or deadline.
async fn within(stream: &SharedStream, limit: Duration) -> bool {
    futures_lite::future::or(async { stream.flush_wire().await.is_ok() }, async {
        glommio::timer::sleep(limit).await;
        false
    })
    .await
}
