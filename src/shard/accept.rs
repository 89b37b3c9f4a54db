//! The accept loops of the client ports: the TCP port (`listen`, plain or
//! TLS) and the WebSocket port (`ws_listen`, plain or TLS). Each takes a
//! place under `max_connections` first; a connection with a wire runs its
//! handshakes before it is a session (`handshake.rs`).

use crate::config::{AcceptLimits, RateLimit};
use crate::net::Slot;
use crate::session::RateBucket;
use crate::shard::ShardCtx;
use bytes::BytesMut;
use glommio::net::TcpListener;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// A flag tasks of one shard wait for, many at once: once opened it stays
/// open (the accept loops of an inherited listener wait for theirs).
#[derive(Default)]
pub struct Latch {
    open: std::cell::Cell<bool>,
    waiters: std::cell::RefCell<Vec<std::task::Waker>>,
}

impl Latch {
    /// Open it and wake every waiter.
    pub fn open(&self) {
        self.open.set(true);
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Close it again (a rolled-back upgrade accepts again).
    pub fn close(&self) {
        self.open.set(false);
    }

    pub fn is_open(&self) -> bool {
        self.open.get()
    }

    /// Resolves once it is open.
    pub async fn opened(&self) {
        std::future::poll_fn(|cx| {
            if self.open.get() {
                std::task::Poll::Ready(())
            } else {
                self.waiters.borrow_mut().push(cx.waker().clone());
                std::task::Poll::Pending
            }
        })
        .await
    }
}

/// How long an accept loop told to stop softly (an upgrade: its listener
/// now belongs to the new process too) waits for the accept it has armed.
/// Cancelling an armed io_uring accept can lose a connection the kernel
/// gave it meanwhile, so the loop lets it finish: the old process pokes
/// the port until every such loop has one (see `Gateway::stop_accepting`).
const SOFT_GRACE: Duration = Duration::from_secs(2);

/// The next connection on `listener`, or None once `end` resolves, or
/// once `soft` is open and the accept already armed has finished (its
/// connection, if it got one, is returned and served). A failed accept
/// (out of fds, say) is logged and retried after a pause rather than in a
/// busy loop.
pub async fn accept_until(
    listener: &TcpListener,
    end: impl std::future::Future<Output = ()>,
    soft: Option<&Latch>,
    shard: usize,
    what: &str,
) -> Option<glommio::net::TcpStream> {
    let mut end = std::pin::pin!(end);
    // At the open-files limit every accept fails: one line a second (with
    // how many were not logged), not one per failure.
    let mut last_warn: Option<std::time::Instant> = None;
    let mut quiet = 0u64;
    loop {
        if soft.is_some_and(Latch::is_open) {
            return None;
        }
        let mut accept = std::pin::pin!(listener.accept());
        enum Got<T> {
            Conn(T),
            End,
            Soft,
        }
        let got = futures_lite::future::or(async { Got::Conn(accept.as_mut().await) }, async {
            match soft {
                Some(l) => {
                    futures_lite::future::or(
                        async {
                            end.as_mut().await;
                            Got::End
                        },
                        async {
                            l.opened().await;
                            Got::Soft
                        },
                    )
                    .await
                }
                None => {
                    end.as_mut().await;
                    Got::End
                }
            }
        })
        .await;
        let accepted = match got {
            Got::Conn(r) => r,
            Got::End => return None,
            Got::Soft => {
                let r = futures_lite::future::or(async { Some(accept.as_mut().await) }, async {
                    glommio::timer::sleep(SOFT_GRACE).await;
                    None
                })
                .await;
                match r {
                    Some(Ok(s)) => return Some(s),
                    Some(Err(_)) => return None,
                    None => {
                        tracing::warn!(
                            shard,
                            what,
                            "an armed accept did not finish in time; cancelled"
                        );
                        return None;
                    }
                }
            }
        };
        match accepted {
            Ok(s) => return Some(s),
            Err(e) => {
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

/// Wait until `latch` opens (true) or the shard stops (false).
pub async fn gate(ctx: &ShardCtx, latch: &Latch) -> bool {
    futures_lite::future::or(
        async {
            latch.opened().await;
            true
        },
        async {
            ctx.stop.stopped().await;
            false
        },
    )
    .await
}

/// Counts a running accept loop in `n` while alive.
pub struct Running(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Running {
    pub fn new(n: &std::sync::Arc<std::sync::atomic::AtomicUsize>) -> Running {
        n.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Running(n.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The connection-rate limits of one accept loop (`limits.accept`), at
/// this shard's share of each rate.
struct AcceptLimiter {
    per_ip: foldhash::HashMap<std::net::IpAddr, RateBucket>,
    listener: Option<RateBucket>,
    pruned: Instant,
}

/// Source addresses remembered at most (full buckets are forgotten first).
const MAX_TRACKED: usize = 65536;

impl AcceptLimiter {
    fn new(now: Instant) -> AcceptLimiter {
        AcceptLimiter {
            per_ip: Default::default(),
            listener: None,
            pruned: now,
        }
    }

    /// Whether a connection from `ip` may be accepted at `now`.
    fn admit(
        &mut self,
        limits: AcceptLimits,
        shards: usize,
        ip: std::net::IpAddr,
        now: Instant,
    ) -> bool {
        let share = |r: RateLimit| RateLimit {
            per_second: r.per_second / shards as f64,
            burst: (r.burst / shards as f64).max(1.0),
        };
        if let Some(rate) = limits.per_listener.map(share) {
            let bucket = self
                .listener
                .get_or_insert_with(|| RateBucket::full(Some(rate), now));
            if !bucket.take(rate, now) {
                return false;
            }
        }
        let Some(rate) = limits.per_ip.map(share) else {
            return true;
        };
        if self.per_ip.len() >= MAX_TRACKED
            || now.saturating_duration_since(self.pruned) >= PRUNE_EVERY
        {
            self.per_ip.retain(|_, b| !b.is_full(rate, now));
            self.pruned = now;
        }
        let ip = ip.to_canonical();
        let room = self.per_ip.len() < MAX_TRACKED;
        match self.per_ip.get_mut(&ip) {
            Some(b) => b.take(rate, now),
            // Every tracked address is busy: a new one goes unlimited
            // rather than the map growing without end.
            None if !room => true,
            None => {
                let mut b = RateBucket::full(Some(rate), now);
                let ok = b.take(rate, now);
                self.per_ip.insert(ip, b);
                ok
            }
        }
    }
}

const PRUNE_EVERY: Duration = Duration::from_secs(10);

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
    let mut limiter = AcceptLimiter::new(Instant::now());
    let _running = Running::new(&ctx.accepting);
    // An inherited listener accepts once the old process no longer does.
    if !gate(&ctx, &ctx.accept_clients).await {
        return;
    }
    loop {
        let end = futures_lite::future::or(ctx.stop.stopped(), ctx.drain_started.notified());
        let soft = Some(&ctx.stop_accepting);
        let Some(stream) = accept_until(&listener, end, soft, id, what).await else {
            break;
        };
        let peer = stream
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let cfg = ctx.cfg();
        if !limiter.admit(cfg.limits.accept, ctx.count, peer.ip(), Instant::now()) {
            let st = ctx.stats();
            st.refused_rate.set(st.refused_rate.get() + 1);
            tracing::debug!(shard = id, %peer, "refused: limits.accept");
            drop(stream);
            continue;
        }
        let cap = cfg.max_connections.min(ctx.fd_cap);
        let Some(slot) = Slot::take(&ctx.connections, cap) else {
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
                    crate::shard::conn::Start::Fresh,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_address_has_its_own_bucket_at_the_shards_share() {
        let limits = AcceptLimits {
            per_ip: Some(RateLimit {
                per_second: 2.0,
                burst: 6.0,
            }),
            per_listener: None,
        };
        let t0 = Instant::now();
        let mut l = AcceptLimiter::new(t0);
        let a: std::net::IpAddr = "10.0.0.1".parse().expect("ip");
        let b: std::net::IpAddr = "::ffff:10.0.0.2".parse().expect("ip");
        // Two shards: a burst of 3 each, then one a second.
        let taken = (0..10).filter(|_| l.admit(limits, 2, a, t0)).count();
        assert_eq!(taken, 3);
        assert!(
            l.admit(limits, 2, b, t0),
            "another address is not limited by a"
        );
        assert!(!l.admit(limits, 2, a, t0 + Duration::from_millis(500)));
        assert!(l.admit(limits, 2, a, t0 + Duration::from_millis(1100)));
        // A full bucket is forgotten at the next prune.
        let later = t0 + Duration::from_secs(60);
        assert!(l.admit(limits, 2, b, later));
        assert_eq!(l.per_ip.len(), 1, "{:?}", l.per_ip.keys());
        assert!(l.per_ip.contains_key(&b.to_canonical()), "stored as IPv4");
    }

    #[test]
    fn the_listener_bucket_limits_every_address_together() {
        let limits = AcceptLimits {
            per_ip: None,
            per_listener: Some(RateLimit {
                per_second: 10.0,
                burst: 5.0,
            }),
        };
        let t0 = Instant::now();
        let mut l = AcceptLimiter::new(t0);
        let taken = (0..20u8)
            .filter(|&i| l.admit(limits, 1, std::net::IpAddr::from([10, 0, 0, i]), t0))
            .count();
        assert_eq!(taken, 5);
        assert!(l.admit(
            limits,
            1,
            [10, 0, 0, 99].into(),
            t0 + Duration::from_millis(100)
        ));
    }
}
