//! The accept loops of the client ports: the TCP port (`listen`, plain or
//! TLS) and the WebSocket port (`ws_listen`, plain or TLS). Each takes a
//! place under `max_connections` first; a connection with a wire runs its
//! handshakes before it is a session (`handshake.rs`).

use crate::net::Slot;
use crate::shard::ShardCtx;
use bytes::BytesMut;
use glommio::net::TcpListener;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

/// The next connection on `listener`, or None once `end` resolves. A
/// failed accept (out of fds, say) is logged and retried after a pause
/// rather than in a busy loop.
pub async fn accept_until(
    listener: &TcpListener,
    end: impl std::future::Future<Output = ()>,
    shard: usize,
    what: &str,
) -> Option<glommio::net::TcpStream> {
    let mut end = std::pin::pin!(end);
    // At the open-files limit every accept fails: one line a second (with
    // how many were not logged), not one per failure.
    let mut last_warn: Option<std::time::Instant> = None;
    let mut quiet = 0u64;
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            end.as_mut().await;
            None
        })
        .await;
        match accepted {
            None => return None,
            Some(Ok(s)) => return Some(s),
            Some(Err(e)) => {
                let now = std::time::Instant::now();
                if last_warn.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
                    tracing::warn!(shard, error = %e, what, not_logged = quiet, "accept failed");
                    last_warn = Some(now);
                    quiet = 0;
                } else {
                    quiet += 1;
                }
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Which client port a loop serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Tcp,
    WebSocket,
}

/// Accept on `listener` until the shard stops or drains.
pub async fn accept_clients(ctx: Rc<ShardCtx>, listener: TcpListener, port: Port) {
    let id = ctx.id;
    let what = match port {
        Port::Tcp => "client",
        Port::WebSocket => "websocket",
    };
    loop {
        let end = futures_lite::future::or(ctx.stop.stopped(), ctx.drain_started.notified());
        let Some(stream) = accept_until(&listener, end, id, what).await else {
            break;
        };
        let peer = stream
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let Some(slot) = Slot::take(&ctx.connections, ctx.cfg().max_connections) else {
            let st = ctx.stats();
            st.refused_max_connections
                .set(st.refused_max_connections.get() + 1);
            tracing::debug!(shard = id, %peer, "refused: max_connections");
            drop(stream);
            continue;
        };
        ctx.stats().accepted.set(ctx.stats().accepted.get() + 1);
        let kind = {
            let wires = ctx.wires.borrow();
            match port {
                Port::Tcp => wires.client.clone(),
                Port::WebSocket => wires.ws.clone(),
            }
        };
        match kind {
            None => {
                glommio::spawn_local(crate::shard::conn::serve(
                    ctx.clone(),
                    slot,
                    crate::net::SharedStream::new(stream),
                    peer,
                    BytesMut::new(),
                    None,
                ))
                .detach();
            }
            Some(kind) => {
                glommio::spawn_local(crate::shard::handshake::handshake_then_serve(
                    ctx.clone(),
                    slot,
                    stream,
                    peer,
                    kind,
                ))
                .detach();
            }
        }
    }
}
