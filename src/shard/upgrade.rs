//! A live upgrade on one shard: the old process's side (sessions leave
//! in batches the coordinator pulls, with their sockets) and the new
//! process's (the batches taken in, each session on its player's home
//! shard). The rules are the core's (`core/upgrade.rs`); the sockets and
//! tasks are here.

use crate::core::Leaving;
use crate::net::{SharedStream, Slot};
use crate::session::SessionId;
use crate::shard::ShardCtx;
use crate::snapshot::PlayerImage;
use bytes::BytesMut;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How a leaving session travels: its socket, or (TLS, WebSocket: their
/// state does not move) no socket: its player moves, and the connection
/// closes once the new process holds it, so the client resumes there.
pub enum Carried {
    Socket(OwnedFd),
    /// The key of the connection kept here until then.
    Closing(u64),
}

/// What one pull takes from a shard.
pub struct Batch {
    pub shard: usize,
    pub sessions: Vec<(Leaving, Carried)>,
    /// Players without a session.
    pub players: Vec<PlayerImage>,
    /// Sessions and players still on the shard after this batch.
    pub left: usize,
}

/// The shard's side of an upgrade in progress (old process).
#[derive(Default)]
pub struct Leavers {
    ready: Vec<(Leaving, Carried)>,
    /// Wired connections whose players are on their way.
    closing: foldhash::HashMap<u64, SharedStream>,
    next: u64,
}

/// The read loop of `sid` ended for the upgrade: take it out of the core,
/// keep what travels.
pub fn leave(
    ctx: &ShardCtx,
    sid: SessionId,
    slot: Slot,
    stream: SharedStream,
    peer: SocketAddr,
    buf: BytesMut,
) {
    let unix = crate::snapshot::unix_ms_now();
    let wired = stream.is_wired();
    let read = if wired { Vec::new() } else { buf.to_vec() };
    let left = ctx.with(|c, now| c.take_leaving(sid, peer.to_string(), read, now, unix));
    ctx.tasks.borrow_mut().remove(&sid);
    let Some(leaving) = left else {
        // It could not leave after all: it closes, its player stays here
        // (and moves as a player without a session).
        tracing::warn!(session = sid, %peer, "upgrade: a session could not leave; closed");
        ctx.remove_session(sid);
        return;
    };
    let carried = if wired {
        let mut l = ctx.leavers.borrow_mut();
        l.next += 1;
        let key = l.next;
        l.closing.insert(key, stream);
        Carried::Closing(key)
    } else {
        let fd = stream.with(|s| s.as_raw_fd());
        // SAFETY: fd is open (owned by `stream`); dup returns a new fd we own.
        let dup = unsafe { libc::dup(fd) };
        if dup < 0 {
            tracing::warn!(session = sid, %peer, "upgrade: cannot duplicate the socket; closed");
            let mut l = ctx.leavers.borrow_mut();
            l.next += 1;
            let key = l.next;
            l.closing.insert(key, stream);
            l.ready.push((leaving, Carried::Closing(key)));
            return;
        }
        // SAFETY: a fresh descriptor from dup, owned by nobody else.
        Carried::Socket(unsafe { OwnedFd::from_raw_fd(dup) })
    };
    drop(slot);
    ctx.leavers.borrow_mut().ready.push((leaving, carried));
}

/// How long one pull waits for sessions to become ready to leave.
const PULL_WAIT: Duration = Duration::from_millis(50);

/// The coordinator's pull: up to `max` sessions (and players without one)
/// ready to leave. The first pull starts the upgrade on this shard.
pub async fn pull(ctx: Rc<ShardCtx>, max: usize) -> Batch {
    if !ctx.core.borrow().is_upgrading() {
        ctx.with(|c, _| c.set_upgrading(true));
    }
    let until = Instant::now() + PULL_WAIT;
    loop {
        let ready = ctx.leavers.borrow().ready.len();
        if ready >= max || ctx.session_count() == 0 || Instant::now() >= until {
            break;
        }
        // Sessions waiting for an answer look again once it came.
        let sids: Vec<_> = ctx.tasks.borrow().keys().copied().collect();
        for sid in sids {
            if let Some(t) = ctx.tasks.borrow().get(&sid) {
                t.reader.notify();
            }
        }
        glommio::timer::sleep(Duration::from_millis(2)).await;
    }
    let sessions: Vec<_> = {
        let mut l = ctx.leavers.borrow_mut();
        let n = l.ready.len().min(max);
        l.ready.drain(..n).collect()
    };
    let room = max.saturating_sub(sessions.len());
    let unix = crate::snapshot::unix_ms_now();
    let players = ctx.with(|c, now| c.take_lingering(room, now, unix));
    let left =
        ctx.session_count() + ctx.core.borrow().player_count() + ctx.leavers.borrow().ready.len();
    Batch {
        shard: ctx.id,
        sessions,
        players,
        left,
    }
}

/// The new process holds the batch's players now: the wired connections
/// of `closing` close (their clients resume there), and the pushes held
/// for `players` meanwhile follow them, in order, ahead of any later one
/// (which finds the player gone and is forwarded after these).
pub fn confirmed(ctx: &ShardCtx, closing: &[u64], players: &[u64]) {
    let held = ctx.with(|c, _| c.departed(players));
    if !held.is_empty() {
        let to = ctx.upgrade_to.borrow().clone();
        for (player, pushes) in held {
            for (msg_id, body) in pushes {
                let f = crate::upgrade::Forward {
                    players: vec![player],
                    msg_id,
                    body,
                    reply: None,
                };
                let sent = to
                    .as_ref()
                    .is_some_and(|to| to.send(crate::upgrade::Event::Forward(f)).is_ok());
                if !sent {
                    tracing::warn!(player, "upgrade: a held push could not follow its player");
                }
            }
        }
    }
    let mut l = ctx.leavers.borrow_mut();
    for k in closing {
        if let Some(s) = l.closing.remove(k) {
            let fd = s.with(|s| s.as_raw_fd());
            // SAFETY: fd is open, owned by `s`; a FIN tells the client.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }
}

/// The batch went nowhere (the new process refused it or failed): its
/// sessions and players are served here again.
pub fn take_back(ctx: Rc<ShardCtx>, sessions: Vec<(Leaving, Carried)>, players: Vec<PlayerImage>) {
    for (leaving, carried) in sessions {
        let stream = match carried {
            Carried::Socket(fd) => Some(stream_of(fd)),
            Carried::Closing(k) => ctx.leavers.borrow_mut().closing.remove(&k),
        };
        let Some(stream) = stream else { continue };
        adopt(ctx.clone(), stream, leaving);
    }
    if !players.is_empty() {
        ctx.restore(&players);
    }
}

/// Stop handing sessions over (a rollback): everything left reads again.
pub fn cancel(ctx: &ShardCtx) {
    ctx.with(|c, _| c.set_upgrading(false));
    let ready: Vec<_> = ctx.leavers.borrow_mut().ready.drain(..).collect();
    if let Some(me) = ctx.this.borrow().upgrade() {
        take_back(me, ready, Vec::new());
    }
}

fn stream_of(fd: OwnedFd) -> SharedStream {
    // SAFETY: a connected TCP socket whose ownership we hold.
    SharedStream::new(unsafe { glommio::net::TcpStream::from_raw_fd(fd.into_raw_fd()) })
}

/// Serve a session that arrived by an upgrade (or came back).
fn adopt(ctx: Rc<ShardCtx>, stream: SharedStream, leaving: Leaving) {
    let peer = leaving
        .image
        .peer
        .parse()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let buf = BytesMut::from(&leaving.image.read[..]);
    let Some(slot) = Slot::take(&ctx.connections, usize::MAX) else {
        return;
    };
    glommio::spawn_local(crate::shard::conn::serve(
        ctx,
        slot,
        stream,
        peer,
        buf,
        crate::shard::conn::Start::Upgraded(Box::new(leaving)),
    ))
    .detach();
}

/// The new process: take in sessions (with their sockets) and players.
/// Returns (sessions, players) taken.
pub fn take_in(
    ctx: Rc<ShardCtx>,
    sessions: Vec<(Leaving, OwnedFd)>,
    players: Vec<PlayerImage>,
) -> (u32, u32) {
    let n = sessions.len() as u32;
    // Their tasks bind them a moment later: pushes forwarded meanwhile
    // wait for them.
    ctx.with(|c, _| {
        c.expect(
            sessions
                .iter()
                .filter_map(|(l, _)| l.player.as_ref().map(|p| p.id)),
        )
    });
    let mut with_player = 0;
    for (leaving, fd) in sessions {
        with_player += u32::from(leaving.player.is_some());
        adopt(ctx.clone(), stream_of(fd), leaving);
    }
    // `restore` answers the shard's total and those dropped as expired.
    let dropped = if players.is_empty() {
        0
    } else {
        ctx.restore(&players).1
    };
    (
        n,
        with_player + (players.len() - dropped.min(players.len())) as u32,
    )
}

impl ShardCtx {
    /// Register the upgraded session `sid` in the core (see
    /// `Core::adopt_arrived`); false: refused.
    pub fn adopt_upgraded(&self, sid: SessionId, l: &Leaving) -> bool {
        let unix = crate::snapshot::unix_ms_now();
        let ok = self.with(|c, now| c.adopt_arrived(sid, &l.image, l.player.as_ref(), now, unix));
        tracing::debug!(
            session = sid,
            player = l.image.player,
            ok,
            "upgrade: session taken in"
        );
        ok
    }
}
