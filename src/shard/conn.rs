//! The glommio side of a client connection: the read loop that decodes
//! frames and feeds them to the shard, the writer task for output a full
//! socket did not take (see `shard/output.rs`), and the hand-off of a logged-in connection to its
//! player's home shard (the fd moves with the bytes already read).

use crate::core::{Flushed, Transmit};
use crate::net::Slot;
use crate::net::{read_or_notified, ReadMore, SharedStream};
use crate::session::{CloseReason, SessionId};
use crate::shard::{Arrival, Handoff, ShardCtx, ShardMsg, Step};
use bytes::BytesMut;
use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// The most one read takes from a client (it lands in the shard's scratch
/// buffer; the connection keeps only the bytes of a frame not yet whole).
const READ_MAX: usize = crate::net::SCRATCH_LEN;
/// An empty read buffer with more room than this is given back.
const RECLAIM: usize = 16 * 1024;
/// How long a closing connection may take to flush its last frames.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);

/// After its FIN, how long a closed connection still reads (and drops)
/// what its client sends, and how much at most.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

/// How a read loop ended.
enum End {
    Close,
    Handoff {
        home: usize,
        arrival: Arrival,
    },
    /// To the new process of a live upgrade.
    Upgrade,
}

/// How a connection starts on this shard.
pub enum Start {
    /// Accepted here.
    Fresh,
    /// Handed over by another shard.
    Arrived(Arrival),
    /// Handed over by the old process of a live upgrade.
    Upgraded(Box<crate::core::Leaving>),
}

/// Serve one client connection on this shard until it closes or moves.
/// `arrived` is set for a connection handed over by another shard.
///
/// The setup runs here, before the task's future exists: an `async fn`
/// would keep its arguments (the 120-byte glommio stream, the arrival) in
/// the future next to the values moved out of them, for the connection's
/// whole life. The future holds only what the read loop and the ending use.
pub fn serve(
    ctx: Rc<ShardCtx>,
    slot: Slot,
    stream: SharedStream,
    peer: SocketAddr,
    buf: BytesMut,
    start: Start,
) -> impl std::future::Future<Output = ()> {
    let _ = stream.with(|s| s.set_nodelay(true));
    let ctl = Rc::new(shards::Notify::new());
    let sid = ctx.add_session(peer, stream.clone(), ctl.clone());
    let mut adopted = true;
    match start {
        Start::Arrived(arrival) => ctx.accept_handoff(sid, arrival),
        Start::Fresh => tracing::info!(session = sid, %peer, shard = ctx.id, "accept"),
        Start::Upgraded(l) => adopted = ctx.adopt_upgraded(sid, &l),
    }
    let mut buf = buf;
    async move {
        if !adopted {
            // Its player logged in here meanwhile: that session keeps it.
            ctx.kick(sid, crate::protocol::Code::Replaced);
        }
        let end = read_loop(&ctx, sid, &stream, &mut buf, &ctl).await;
        if let End::Upgrade = end {
            crate::shard::upgrade::leave(&ctx, sid, slot, stream, peer, buf);
            return;
        }
        // The ending runs in its own boxed future: its timers and hand-off
        // state would otherwise sit in every idle session's task all its
        // life.
        Box::pin(finish(ctx, sid, slot, stream, peer, buf, ctl, end)).await;
    }
}

/// After the read loop: flush what is queued, then close or hand the
/// connection to its player's home shard.
#[allow(clippy::too_many_arguments)]
async fn finish(
    ctx: Rc<ShardCtx>,
    sid: SessionId,
    slot: Slot,
    stream: SharedStream,
    peer: SocketAddr,
    buf: BytesMut,
    ctl: Rc<shards::Notify>,
    end: End,
) {
    ctx.finish_output(sid);
    let flushed = futures_lite::future::or(
        async {
            loop {
                match ctx.flushed(sid) {
                    Flushed::Yes => return true,
                    Flushed::Failed => return false,
                    // The writer task wakes the reader's notifier when done.
                    Flushed::NotYet => ctl.notified().await,
                }
            }
        },
        async {
            glommio::timer::sleep(CLOSE_FLUSH).await;
            false
        },
    )
    .await;
    match end {
        End::Close => {
            if flushed && stream.is_wired() {
                // A WebSocket close frame, TLS close_notify.
                stream.with_wire(|_, w| w.map(|w| w.close()));
                let _ =
                    futures_lite::future::or(async { stream.flush_wire().await.is_ok() }, async {
                        glommio::timer::sleep(CLOSE_FLUSH).await;
                        false
                    })
                    .await;
            }
            let (player, reason) = ctx.remove_session(sid);
            tracing::info!(session = sid, %peer, ?player, reason = reason.name(), "close");
            if flushed && shutdown_write(&stream).is_ok() {
                // The read buffer may hold most of a large frame: it goes
                // now, not after the linger.
                drop(buf);
                linger(&stream, BytesMut::new()).await;
            }
            drop(slot);
        }
        End::Upgrade => unreachable_upgrade(),
        End::Handoff { home, arrival } => {
            // Everything already queued went out from here first.
            // A kick while the output flushed (idle, shutdown) wins: close.
            let kicked = ctx.is_closing(sid);
            ctx.remove_session(sid);
            let fd = if flushed && !kicked {
                dup_fd(&stream)
            } else {
                None
            };
            let wire = stream.take_wire();
            drop(stream);
            let Some(fd) = fd else {
                tracing::info!(session = sid, %peer, kicked, "hand-off abandoned");
                return;
            };
            {
                let st = ctx.stats();
                st.handoffs_out.set(st.handoffs_out.get() + 1);
            }
            let msg = ShardMsg::Handoff(Box::new(Handoff {
                fd,
                slot,
                peer,
                leftover: buf,
                arrival,
                wire,
            }));
            // If the home shard is gone (stopping), the message is dropped
            // and with it the fd and the slot.
            let _ = ctx.mesh.send(home, msg);
        }
    }
}

/// `serve` hands an upgrading session over before `finish`.
fn unreachable_upgrade() {
    tracing::error!("an upgrading session reached the ordinary end of a connection");
}

/// The writer of a socket that fell behind: writes what the core queued
/// for `sid`, batch by batch, waiting for the socket each time, until the
/// queue is empty (then output is written at the end of batches again, see
/// `ShardCtx::write_dirty`) or a write fails.
///
/// Through a wire, what the wire holds goes first; a batch taken is
/// encoded whole (and counts as written then), and the loop ends only when
/// the wire is empty too.
pub(crate) async fn write_backlog(ctx: Rc<ShardCtx>, sid: SessionId, mut stream: SharedStream) {
    loop {
        if stream.flush_wire().await.is_err() {
            ctx.written(sid, false);
            break;
        }
        match ctx.poll_transmit(sid) {
            Transmit::Bytes(batch) => {
                let r = stream.write_all(&batch).await;
                ctx.written(sid, r.is_ok());
                if r.is_err() {
                    break;
                }
            }
            // A reply the reader's wire queued meanwhile (a pong).
            _ if stream.wire_pending() => {}
            _ => break,
        }
    }
    ctx.backlog_written(sid);
}

/// The lingering close of HTTP servers: after our FIN, read and drop what
/// the client still sends until its own FIN, [`LINGER`] or [`LINGER_BYTES`].
/// A socket closed with unread bytes in it (or that gets some later)
/// answers with a reset, and a reset makes the client's kernel drop what
/// it had not yet read: the `KICK` that said why, after a client that kept
/// sending (a busy session in a drain, a flood). The descriptor keeps its
/// `max_connections` slot until then.
async fn linger(stream: &SharedStream, mut buf: BytesMut) {
    let until = Instant::now() + LINGER;
    let mut dropped = 0;
    while dropped < LINGER_BYTES {
        buf.clear();
        let wait = until.saturating_duration_since(Instant::now());
        match crate::net::read_more(stream, &mut buf, 4096, glommio::timer::sleep(wait)).await {
            ReadMore::Data(n) => dropped += n,
            _ => break,
        }
    }
}

fn shutdown_write(stream: &SharedStream) -> std::io::Result<()> {
    let fd = stream.with(|s| s.as_raw_fd());
    // SAFETY: fd is the open socket owned by `stream`, alive for this call.
    let rc = unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn dup_fd(stream: &SharedStream) -> Option<OwnedFd> {
    let fd = stream.with(|s| s.as_raw_fd());
    // SAFETY: fd is open (owned by `stream`); dup returns a new fd we own.
    let new = unsafe { libc::dup(fd) };
    // SAFETY: a non-negative result of dup is a fresh fd owned by nobody else.
    (new >= 0).then(|| unsafe { OwnedFd::from_raw_fd(new) })
}

/// Rebuild a handed-over connection on this (its home) shard.
pub fn adopt(ctx: Rc<ShardCtx>, h: Handoff) {
    use std::os::fd::IntoRawFd;
    // SAFETY: the fd is a connected TCP socket whose ownership the message carried.
    let stream = unsafe { TcpStream::from_raw_fd(h.fd.into_raw_fd()) };
    let stream = match h.wire {
        Some(w) => SharedStream::wired(stream, w),
        None => SharedStream::new(stream),
    };
    glommio::spawn_local(serve(
        ctx,
        h.slot,
        stream,
        h.peer,
        h.leftover,
        Start::Arrived(h.arrival),
    ))
    .detach();
}

/// What the read loop does after handling what it has buffered.
enum Next {
    End(End),
    /// Wait for the core's wake-up (a paused session).
    Pause,
    /// Read at least this many bytes.
    Read(usize),
}

async fn read_loop(
    ctx: &ShardCtx,
    sid: SessionId,
    stream: &SharedStream,
    buf: &mut BytesMut,
    ctl: &shards::Notify,
) -> End {
    // A frame begun and not yet whole is in `buf`: the core is told what
    // it holds (it times the frame, frame_timeout, and counts the bytes in
    // the shard's buffer budget), again whenever that changes.
    let mut reported = 0;
    loop {
        // Between two awaits everything happens at one instant: one clock
        // read per read, not per frame.
        let next = ctx.at(Instant::now(), || {
            let next = handle_buffered(ctx, sid, buf);
            if buf.is_empty() && buf.capacity() > RECLAIM {
                // A large frame is done: its buffer goes (what the frame's
                // Bytes still share of it goes with them).
                *buf = BytesMut::new();
            }
            let held = if buf.is_empty() {
                0
            } else {
                buf.capacity().max(buf.len())
            };
            if held != reported {
                reported = held;
                ctx.partial_frame(sid, held);
            }
            next
        });
        // `next` is gone before any await: it would sit in the future.
        let want = match next {
            Next::End(end) => return end,
            Next::Pause => None,
            Next::Read(want) => Some(want),
        };
        let Some(want) = want else {
            ctl.notified().await;
            continue;
        };
        match read_or_notified(stream, buf, want, ctl).await {
            ReadMore::Interrupted => {}
            ReadMore::Eof => {
                ctx.close(sid, CloseReason::PeerClosed);
                return End::Close;
            }
            // Only whole frames keep a session alive (the core sees
            // them); a wire's own reply (a pong) still has to go out.
            ReadMore::Data(_) => {
                let pending = stream.wire_pending_len();
                if pending > ctx.cfg().write_queue_bytes {
                    // Replies the wire owes (pongs to a ping flood) that
                    // the client does not read: a slow consumer.
                    ctx.kick(sid, crate::protocol::Code::SlowConsumer);
                } else if pending > 0 {
                    // Written when the next batch (just below) ends.
                    ctx.wire_output(sid);
                }
            }
            ReadMore::Err(e) => {
                match crate::net::wire_error(&e) {
                    // A text WebSocket message, two frames in one: KICK
                    // PROTOCOL_ERROR, then the close frame.
                    Some(w) if w.is_protocol_error() => {
                        ctx.protocol_error(sid, w);
                        continue;
                    }
                    _ => {}
                }
                tracing::debug!(session = sid, error = %e, "read error");
                ctx.close(sid, CloseReason::ReadFailed);
                return End::Close;
            }
        }
    }
}

/// Hand the core every whole frame in `buf` until it says stop, pause or
/// read more.
fn handle_buffered(ctx: &ShardCtx, sid: SessionId, buf: &mut BytesMut) -> Next {
    loop {
        match ctx.next_step(sid) {
            Step::Read => {}
            Step::Close => return Next::End(End::Close),
            Step::Handoff { home, arrival } => return Next::End(End::Handoff { home, arrival }),
            Step::Upgrade => return Next::End(End::Upgrade),
            Step::Pause => return Next::Pause,
        }
        // Read each time: a reload may change max_frame.
        let decoder = ctx.client_decoder();
        match decoder.decode(buf) {
            Ok(Some(frame)) => {
                ctx.on_client_frame(sid, frame);
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                ctx.protocol_error(sid, &e);
                continue;
            }
        }
        if buf.is_empty() {
            // Every frame was taken: a connection waiting for its next
            // request holds no buffer (the frames keep theirs alive).
            *buf = BytesMut::new();
        }
        return Next::Read(decoder.needed(buf).max(READ_MAX));
    }
}
