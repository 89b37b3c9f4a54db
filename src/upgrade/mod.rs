//! Live binary upgrade (issue 20): the running gateway hands its listening
//! sockets, then its live sessions, to a new process over a Unix socket
//! ([`channel`]), so that an upgrade drops no connection.
//!
//! What is here so far: the channel (framed rkyv messages with a checksum
//! and the descriptors passed with them) and the listeners a gateway can
//! start on instead of binding ([`Inherited`]), with their accept loops
//! gated until the old process stops accepting. The hand-over of sessions
//! and the trigger (`SIGUSR2`, `POST /v1/upgrade`) build on these.

pub mod channel;
pub use channel::Taken;

use std::os::fd::OwnedFd;

/// Listening sockets a gateway starts on instead of binding its own: the
/// old process's, passed over the channel. Each is given to shard
/// `shard % shards` of the new process; a shard that gets none of a port
/// binds its own SO_REUSEPORT socket on the same address (it joins the
/// group the inherited sockets are in).
#[derive(Debug, Default)]
pub struct Inherited {
    pub listeners: Vec<(channel::ListenerImage, OwnedFd)>,
}

impl Inherited {
    /// The inherited sockets of `port` that shard `shard` of `shards` takes.
    pub fn take(&mut self, port: u8, shard: usize, shards: usize) -> Vec<OwnedFd> {
        let mut out = Vec::new();
        let mut keep = Vec::new();
        for (img, fd) in self.listeners.drain(..) {
            if img.port == port && img.shard as usize % shards.max(1) == shard {
                out.push(fd);
            } else {
                keep.push((img, fd));
            }
        }
        self.listeners = keep;
        out
    }

    /// The local address of the first inherited socket of `port`.
    pub fn addr(&self, port: u8) -> Option<std::net::SocketAddr> {
        self.listeners
            .iter()
            .find(|(img, _)| img.port == port)
            .and_then(|(_, fd)| {
                let sock = socket2::SockRef::from(fd);
                sock.local_addr().ok()?.as_socket()
            })
    }
}

use crate::gateway::Gateway;
use crate::shard::upgrade::{Batch, Carried};
use crate::shard::ShardMsg;
use channel::{Channel, ChannelError, Msg};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// An upgrade runs in this process (one at a time).
static RUNNING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether an upgrade runs now.
pub fn running() -> bool {
    RUNNING.load(std::sync::atomic::Ordering::Acquire)
}

/// The environment variable naming the inherited channel's descriptor.
pub const ENV_FD: &str = "SLG_UPGRADE_FD";

/// Start `binary` with this process's arguments and the channel's other
/// end, then hand everything over to it (see [`hand_over`]). `ready` hears
/// the new pid once it runs. Refused while another upgrade runs. On any
/// failure the child is killed and this process goes on serving.
pub fn upgrade_to(
    gw: &Gateway,
    binary: &std::path::Path,
    limits: Deadlines,
    ready: Option<flume::Sender<Result<u32, String>>>,
) -> Result<Report, String> {
    use std::sync::atomic::Ordering;
    if RUNNING.swap(true, Ordering::AcqRel) {
        let why = "an upgrade is already running".to_string();
        if let Some(r) = ready {
            let _ = r.send(Err(why.clone()));
        }
        return Err(why);
    }
    struct Done;
    impl Drop for Done {
        fn drop(&mut self) {
            RUNNING.store(false, std::sync::atomic::Ordering::Release);
        }
    }
    let _done = Done;
    let fail = |why: String, ready: Option<flume::Sender<Result<u32, String>>>| {
        tracing::error!(error = %why, "upgrade failed; this process goes on serving");
        if let Some(r) = ready {
            let _ = r.send(Err(why.clone()));
        }
        Err(why)
    };
    let (mut ch, theirs) = match Channel::pair() {
        Ok(p) => p,
        Err(e) => return fail(format!("cannot make the channel: {e}"), ready),
    };
    let fd = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new(binary);
    cmd.args(std::env::args_os().skip(1))
        .env(ENV_FD, fd.to_string());
    // The child's end survives exec; everything else stays close-on-exec.
    // SAFETY: between fork and exec only fcntl (async-signal-safe) runs.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || channel::set_cloexec(fd, false));
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start {}: {e}", binary.display()), ready),
    };
    drop(theirs);
    tracing::info!(binary = %binary.display(), pid = child.id(), "upgrade: new process started");
    let outcome = hand_over(gw, &mut ch, limits, ready.clone());
    match outcome {
        Ok(r) => Ok(r),
        Err(e) => {
            let _ = child.kill();
            let status = child.wait().ok();
            fail(format!("{e} (new process ended: {status:?})"), ready)
        }
    }
}

/// Format of the channel's messages; a new process of another version
/// says so and the old one goes on.
pub const VERSION: u32 = 2;

/// Sessions per batch (one frame carries at most `channel::MAX_FDS`
/// sockets).
pub const BATCH: usize = 200;

/// How long the old process waits for each answer of the new one.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// For `Ready` (the new process starts its shards).
    pub ready: Duration,
    /// For the answer to each batch.
    pub batch: Duration,
    /// For a shard whose sessions cannot leave (an answer never comes, a
    /// write never ends): past it they stay behind and end with this
    /// process.
    pub settle: Duration,
    /// For the HTTP connections of this process to close once everything
    /// moved (pushes on them are forwarded until then).
    pub http: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            ready: Duration::from_secs(10),
            batch: Duration::from_secs(5),
            settle: Duration::from_secs(30),
            http: Duration::from_secs(10),
        }
    }
}

/// What an upgrade did, from the old process's side.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub pid: u32,
    pub sessions: u64,
    pub players: u64,
    pub batches: u64,
    /// The longest a batch was away (from its pull to the new process's
    /// answer): the longest any of its sessions read nothing.
    pub longest_batch: Duration,
    /// How long each batch was away, in order.
    pub holds: Vec<Duration>,
    /// Sessions that never became ready to leave (they end with this
    /// process).
    pub left_behind: u64,
    pub took: Duration,
}

impl Report {
    /// What the new process shows of it.
    pub fn taken(&self, pushes_forwarded: u64) -> Taken {
        let mut holds = self.holds.clone();
        holds.sort_unstable();
        let us = |d: Duration| d.as_micros() as u64;
        Taken {
            sessions: self.sessions,
            players: self.players,
            batches: self.batches,
            longest_hold_us: us(self.longest_batch),
            median_hold_us: holds.get(holds.len() / 2).copied().map_or(0, us),
            took_us: us(self.took),
            pushes_forwarded,
            left_behind: self.left_behind,
        }
    }
}

/// Why an upgrade did not happen; the old process goes on serving.
#[derive(Debug, thiserror::Error)]
#[error("upgrade abandoned ({stage}): {why}")]
pub struct Abandoned {
    pub stage: &'static str,
    pub why: String,
}

fn abandoned(stage: &'static str, why: impl std::fmt::Display) -> Abandoned {
    Abandoned {
        stage,
        why: why.to_string(),
    }
}

/// The old process's side: hand `gw`'s listeners, then every session and
/// player, to the process at the other end of `ch`. On an error before
/// everything moved, what is still here stays (and accepts again); what
/// the new process took is its own.
pub fn hand_over(
    gw: &Gateway,
    ch: &mut Channel,
    limits: Deadlines,
    ready: Option<flume::Sender<Result<u32, String>>>,
) -> Result<Report, Abandoned> {
    let began = Instant::now();
    let listeners = gw.listeners().map_err(|e| abandoned("listeners", e))?;
    let images = listeners.iter().map(|(img, _)| img.clone()).collect();
    let fds: Vec<_> = listeners.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    ch.send(
        &Msg::Hello {
            version: VERSION,
            listeners: images,
        },
        &fds,
    )
    .map_err(|e| abandoned("hello", e))?;
    ch.set_timeout(Some(limits.ready)).ok();
    let pid = match ch.recv() {
        Ok((Msg::Ready { pid, .. }, _)) => pid,
        Ok((Msg::Failed { why }, _)) => return Err(abandoned("start", why)),
        Ok((other, _)) => return Err(abandoned("start", format!("unexpected {other:?}"))),
        Err(e) => return Err(abandoned("start", e)),
    };
    tracing::info!(pid, "upgrade: the new process runs; handing over");
    if let Some(r) = ready {
        let _ = r.send(Ok(pid));
    }
    let mut report = Report {
        pid,
        ..Default::default()
    };
    // From here on a failure must accept here again.
    let senders = gw.senders();
    let rollback = |why: Abandoned| -> Abandoned {
        tracing::error!(error = %why, "upgrade: rolling back; this process goes on serving");
        for tx in &senders {
            let _ = tx.send(ShardMsg::UpgradeForwardTo { to: None });
            let _ = tx.send(ShardMsg::UpgradeCancel);
        }
        if let Ok(ls) = gw.listeners() {
            let mut per: Vec<Vec<(u8, std::os::fd::OwnedFd)>> =
                senders.iter().map(|_| Vec::new()).collect();
            for (img, fd) in ls {
                if let Some(v) = per.get_mut(img.shard as usize) {
                    v.push((img.port, fd));
                }
            }
            for (tx, listeners) in senders.iter().zip(per) {
                let _ = tx.send(ShardMsg::ResumeAccepting { listeners });
            }
        }
        why
    };
    // One thread reads the channel; this one writes it and runs the
    // hand-over as a loop over events: the shards' batches, the new
    // process's answers, and pushes for players already there.
    let (events, rx) = flume::unbounded::<Event>();
    let reader = match ch.try_clone() {
        Ok(r) => r,
        Err(e) => return Err(rollback(abandoned("channel", e))),
    };
    ch.set_timeout(Some(limits.batch)).ok();
    let reader = {
        let events = events.clone();
        let mut reader = reader;
        std::thread::Builder::new()
            .name("upgrade-rx".into())
            .spawn(move || loop {
                let got = reader.recv();
                let end = match &got {
                    Ok(_) => false,
                    // The socket's read timeout (the writer's): read on.
                    Err(ChannelError::Io(e))
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        continue
                    }
                    Err(_) => true,
                };
                if events.send(Event::Answer(got)).is_err() || end {
                    break;
                }
            })
    };
    let reader = match reader {
        Ok(t) => t,
        Err(e) => return Err(rollback(abandoned("channel", e))),
    };
    for tx in &senders {
        let _ = tx.send(ShardMsg::UpgradeForwardTo {
            to: Some(events.clone()),
        });
    }
    if !gw.stop_accepting(Duration::from_secs(5)) {
        tracing::warn!("upgrade: an accept loop did not end in time");
    }
    if let Err(e) = ch.send(&Msg::AcceptClients, &[]) {
        return Err(rollback(abandoned("accept", e)));
    }
    let mut fwd = Forwarder::default();
    let moved = move_sessions(ch, &senders, &events, &rx, &mut fwd, limits, &mut report);
    if let Err(why) = moved {
        // The reader ends when the new process does (it is killed).
        drop(reader);
        return Err(rollback(why));
    }
    // Everything moved: the HTTP port is the new process's too. HTTP
    // connections here close between requests; until the last one has,
    // pushes that reach this process are forwarded.
    let _ = ch.send(&Msg::AcceptHttp, &[]);
    for tx in &senders {
        let _ = tx.send(ShardMsg::UpgradeHttpQuit);
    }
    let until = Instant::now() + limits.http;
    loop {
        let open = gw.http_open();
        if open == 0 && fwd.waiting.is_empty() {
            break;
        }
        if Instant::now() >= until {
            tracing::warn!(
                open,
                forwards = fwd.waiting.len(),
                "upgrade: HTTP connections still open at the deadline"
            );
            break;
        }
        match rx.recv_timeout(Duration::from_millis(5)) {
            Ok(Event::Forward(f)) => fwd.send(ch, f),
            Ok(Event::Answer(Ok((m, _)))) => {
                fwd.answer(m);
            }
            Ok(Event::Answer(Err(_))) => break,
            Ok(Event::Pulled(b)) => {
                tracing::warn!(shard = b.shard, "upgrade: a late batch stays here")
            }
            Err(_) => {}
        }
    }
    for tx in &senders {
        let _ = tx.send(ShardMsg::UpgradeForwardTo { to: None });
    }
    report.took = began.elapsed();
    let _ = ch.send(&Msg::Done(report.taken(fwd.sent)), &[]);
    ch.shutdown();
    let _ = reader.join();
    tracing::info!(
        pid,
        sessions = report.sessions,
        players = report.players,
        batches = report.batches,
        pushes_forwarded = fwd.sent,
        left_behind = report.left_behind,
        longest_batch_ms = report.longest_batch.as_millis() as u64,
        took_ms = report.took.as_millis() as u64,
        "upgrade: everything handed over"
    );
    Ok(report)
}

/// What the old process's coordinator hears.
pub enum Event {
    /// A shard's answer to a pull.
    Pulled(Batch),
    /// A push for players the new process holds.
    Forward(Forward),
    /// A message from the new process.
    Answer(Result<(Msg, Vec<std::os::fd::OwnedFd>), ChannelError>),
}

/// A push to forward to the new process; `reply` hears what it did there
/// (None: it was already answered, as cached with its player).
pub struct Forward {
    pub players: Vec<u64>,
    pub msg_id: u32,
    pub body: bytes::Bytes,
    pub reply: Option<flume::Sender<crate::core::PushCounts>>,
}

/// The pushes forwarded and not yet answered.
#[derive(Default)]
struct Forwarder {
    next: u64,
    sent: u64,
    waiting: foldhash::HashMap<u64, Option<flume::Sender<crate::core::PushCounts>>>,
}

impl Forwarder {
    fn send(&mut self, ch: &mut Channel, f: Forward) {
        self.next += 1;
        let id = self.next;
        let msg = Msg::Push {
            id,
            players: f.players.clone(),
            msg_id: f.msg_id,
            body: f.body.to_vec(),
        };
        match ch.send(&msg, &[]) {
            Ok(()) => {
                self.sent += 1;
                self.waiting.insert(id, f.reply);
            }
            Err(e) => {
                tracing::error!(error = %e, players = f.players.len(), "upgrade: a push could not be forwarded");
                if let Some(r) = f.reply {
                    let _ = r.send(crate::core::PushCounts {
                        offline: f.players.len() as u64,
                        ..Default::default()
                    });
                }
            }
        }
    }

    /// A push's answer: its sender hears it.
    fn answer(&mut self, m: Msg) {
        let Msg::Pushed {
            id,
            delivered,
            cached,
            offline,
        } = m
        else {
            tracing::warn!(msg = ?m, "upgrade: unexpected message ignored");
            return;
        };
        if let Some(Some(r)) = self.waiting.remove(&id) {
            let _ = r.send(crate::core::PushCounts {
                delivered,
                cached,
                offline,
                ..Default::default()
            });
        }
    }
}

/// Pull every shard's sessions and players in batches and send them,
/// forwarding pushes all along. On an error, the batch under way is back
/// on its shard.
fn move_sessions(
    ch: &mut Channel,
    senders: &[flume::Sender<ShardMsg>],
    events: &flume::Sender<Event>,
    rx: &flume::Receiver<Event>,
    fwd: &mut Forwarder,
    limits: Deadlines,
    report: &mut Report,
) -> Result<(), Abandoned> {
    enum Stage {
        Idle,
        Pulling { shard: usize, at: Instant },
        Sent { batch: Batch, id: u64, at: Instant },
    }
    let n = senders.len();
    let mut done = vec![false; n];
    let mut cursor = 0usize;
    let mut stage = Stage::Idle;
    let mut id = 0u64;
    // When each shard last gave something (it may hold sessions that
    // cannot leave yet: an answer still due, a write under way).
    let began = Instant::now();
    let mut gave = vec![began; n];
    loop {
        if let Stage::Idle = stage {
            let Some(i) = (0..n).map(|k| (cursor + k) % n).find(|&i| !done[i]) else {
                return Ok(());
            };
            cursor = i + 1;
            let pull = ShardMsg::UpgradePull {
                max: BATCH,
                reply: events.clone(),
            };
            if senders[i].send(pull).is_err() {
                done[i] = true;
                continue;
            }
            stage = Stage::Pulling {
                shard: i,
                at: Instant::now(),
            };
        }
        let deadline = match &stage {
            Stage::Pulling { at, .. } => *at + Duration::from_secs(5),
            Stage::Sent { at, .. } => *at + limits.batch,
            Stage::Idle => Instant::now(),
        };
        let ev = match rx.recv_deadline(deadline) {
            Ok(ev) => ev,
            Err(_) => {
                return Err(match std::mem::replace(&mut stage, Stage::Idle) {
                    Stage::Pulling { shard, .. } => {
                        abandoned("pull", format!("shard {shard} did not answer"))
                    }
                    Stage::Sent { batch, .. } => {
                        let shard = batch.shard;
                        let _ = senders[shard].send(ShardMsg::UpgradeTakeBack { batch });
                        abandoned("batch", "the new process did not answer in time")
                    }
                    Stage::Idle => abandoned("batch", "lost track"),
                });
            }
        };
        match ev {
            Event::Forward(f) => fwd.send(ch, f),
            Event::Pulled(batch) => {
                let Stage::Pulling { shard, at } = stage else {
                    tracing::warn!(
                        shard = batch.shard,
                        "upgrade: an unexpected batch goes back"
                    );
                    let s = batch.shard;
                    let _ = senders[s].send(ShardMsg::UpgradeTakeBack { batch });
                    continue;
                };
                let i = shard;
                if batch.sessions.is_empty() && batch.players.is_empty() {
                    if batch.left == 0 {
                        done[i] = true;
                    } else if gave[i].elapsed() >= limits.settle {
                        tracing::error!(
                            shard = i,
                            left = batch.left,
                            "upgrade: sessions that never became ready to leave stay behind"
                        );
                        report.left_behind += batch.left as u64;
                        done[i] = true;
                    }
                    stage = Stage::Idle;
                    continue;
                }
                gave[i] = Instant::now();
                id += 1;
                if let Err(e) = send_batch(ch, id, &batch) {
                    let _ = senders[i].send(ShardMsg::UpgradeTakeBack { batch });
                    return Err(abandoned("batch", e));
                }
                stage = Stage::Sent { batch, id, at };
            }
            Event::Answer(Err(e)) => {
                if let Stage::Sent { batch, .. } = std::mem::replace(&mut stage, Stage::Idle) {
                    let s = batch.shard;
                    let _ = senders[s].send(ShardMsg::UpgradeTakeBack { batch });
                }
                return Err(abandoned("channel", e));
            }
            Event::Answer(Ok((m, _))) => match (m, std::mem::replace(&mut stage, Stage::Idle)) {
                (
                    Msg::Adopted {
                        id: got,
                        sessions,
                        players,
                    },
                    Stage::Sent { batch, id, at },
                ) if got == id => {
                    report.sessions += sessions as u64;
                    report.players += players as u64;
                    report.batches += 1;
                    let held = at.elapsed();
                    report.longest_batch = report.longest_batch.max(held);
                    report.holds.push(held);
                    let closing = batch
                        .sessions
                        .iter()
                        .filter_map(|(_, c)| match c {
                            Carried::Closing(k) => Some(*k),
                            Carried::Socket(_) => None,
                        })
                        .collect();
                    let players = batch
                        .sessions
                        .iter()
                        .filter_map(|(l, _)| l.player.as_ref().map(|p| p.id))
                        .chain(batch.players.iter().map(|p| p.id))
                        .collect();
                    let _ =
                        senders[batch.shard].send(ShardMsg::UpgradeConfirmed { closing, players });
                    // The sockets sent are the new process's now; ours close.
                    drop(batch);
                }
                (Msg::Refused { why, .. }, Stage::Sent { batch, .. }) => {
                    let s = batch.shard;
                    let _ = senders[s].send(ShardMsg::UpgradeTakeBack { batch });
                    return Err(abandoned("batch", format!("refused: {why}")));
                }
                (m, st) => {
                    stage = st;
                    fwd.answer(m);
                }
            },
        }
    }
}

/// Send one batch (its answer comes to the reader thread).
fn send_batch(ch: &mut Channel, id: u64, batch: &Batch) -> Result<(), String> {
    let mut sessions = Vec::new();
    let mut fds = Vec::new();
    let mut players = Vec::new();
    let mut lingering = Vec::new();
    for (l, carried) in &batch.sessions {
        match carried {
            Carried::Socket(fd) => {
                if let Some(p) = &l.player {
                    players.push(p.clone());
                }
                sessions.push(l.image.clone());
                fds.push(fd.as_raw_fd());
            }
            // Its client resumes there: the player alone moves.
            Carried::Closing(_) => lingering.extend(l.player.clone()),
        }
    }
    players.extend(lingering);
    players.extend(batch.players.iter().cloned());
    let image = crate::snapshot::Image {
        taken_unix_ms: crate::snapshot::unix_ms_now(),
        shards: 1,
        players,
    }
    .encode()
    .map_err(|e| e.to_string())?;
    ch.send(
        &Msg::Batch {
            id,
            sessions,
            players: image,
        },
        &fds,
    )
    .map_err(|e| e.to_string())
}

/// The new process's side: start on the listeners the old process sends,
/// take in every batch, and return the running gateway once the old
/// process is done (it then ends).
pub fn take_over(cfg: crate::config::Config, ch: &mut Channel) -> Result<Gateway, String> {
    let (msg, fds) = ch.recv().map_err(|e| e.to_string())?;
    let Msg::Hello { version, listeners } = msg else {
        return Err(format!("expected Hello, got {msg:?}"));
    };
    if version != VERSION {
        let why = format!("channel version {version}, this build speaks {VERSION}");
        let _ = ch.send(&Msg::Failed { why: why.clone() }, &[]);
        return Err(why);
    }
    if fds.len() != listeners.len() {
        let why = "listener descriptors missing".to_string();
        let _ = ch.send(&Msg::Failed { why: why.clone() }, &[]);
        return Err(why);
    }
    let inherited = Inherited {
        listeners: listeners.into_iter().zip(fds).collect(),
    };
    let gw = match Gateway::start_on(cfg, Some(inherited)) {
        Ok(g) => g,
        Err(e) => {
            let why = e.to_string();
            let _ = ch.send(&Msg::Failed { why: why.clone() }, &[]);
            return Err(why);
        }
    };
    let shards = gw.senders();
    ch.send(
        &Msg::Ready {
            pid: std::process::id(),
            shards: shards.len() as u32,
        },
        &[],
    )
    .map_err(|e| e.to_string())?;
    let mut round = 0usize;
    loop {
        let (msg, fds) = match ch.recv() {
            Ok(m) => m,
            // The old process died mid-way: what arrived is served; it
            // takes the rest with it. Accept on every port.
            Err(ChannelError::Closed) => {
                tracing::error!("upgrade: the old process went away before it was done");
                gw.open_accept(true, true);
                return Ok(gw);
            }
            Err(e) => {
                tracing::error!(error = %e, "upgrade: the channel failed");
                gw.open_accept(true, true);
                return Ok(gw);
            }
        };
        match msg {
            Msg::AcceptClients => gw.open_accept(true, false),
            Msg::AcceptHttp => gw.open_accept(false, true),
            Msg::Done(taken) => {
                gw.open_accept(true, true);
                gw.set_upgraded(taken);
                tracing::info!("upgrade: done; this process serves alone");
                return Ok(gw);
            }
            Msg::Batch {
                id,
                sessions,
                players,
            } => {
                let answer = match take_batch(&shards, &mut round, sessions, fds, &players) {
                    Ok((s, p)) => Msg::Adopted {
                        id,
                        sessions: s,
                        players: p,
                    },
                    Err(why) => Msg::Refused { id, why },
                };
                ch.send(&answer, &[]).map_err(|e| e.to_string())?;
            }
            Msg::Push {
                id,
                players,
                msg_id,
                body,
            } => {
                let c = push_here(&shards, players, msg_id, bytes::Bytes::from(body));
                let answer = Msg::Pushed {
                    id,
                    delivered: c.delivered,
                    cached: c.cached,
                    offline: c.offline,
                };
                ch.send(&answer, &[]).map_err(|e| e.to_string())?;
            }
            other => tracing::warn!(msg = ?other, "upgrade: unexpected message ignored"),
        }
    }
}

/// A push forwarded by the old process, delivered on its players' home
/// shards here (in the order the pushes came: the next waits for this).
fn push_here(
    shards: &[flume::Sender<ShardMsg>],
    players: Vec<u64>,
    msg_id: u32,
    body: bytes::Bytes,
) -> crate::core::PushCounts {
    let n = shards.len();
    let mut by: Vec<Vec<u64>> = vec![Vec::new(); n];
    for p in players {
        by[shards::home_shard(p, n)].push(p);
    }
    let mut total = crate::core::PushCounts::default();
    let mut waiting = Vec::new();
    for (tx, players) in shards.iter().zip(by) {
        if players.is_empty() {
            continue;
        }
        let k = players.len() as u64;
        let (reply, rx) = flume::bounded(1);
        let m = ShardMsg::Push {
            players,
            msg_id,
            body: body.clone(),
            reply,
        };
        if tx.send(m).is_err() {
            total.offline += k;
            continue;
        }
        waiting.push((k, rx));
    }
    for (k, rx) in waiting {
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Some(c)) => total.add(c),
            _ => total.offline += k,
        }
    }
    total
}

/// One shard's part of a batch: sessions with their sockets, players.
type Share = (
    Vec<(crate::core::Leaving, std::os::fd::OwnedFd)>,
    Vec<crate::snapshot::PlayerImage>,
);

/// Give a batch's sessions and players to their home shards.
fn take_batch(
    shards: &[flume::Sender<ShardMsg>],
    round: &mut usize,
    sessions: Vec<channel::SessionImage>,
    fds: Vec<std::os::fd::OwnedFd>,
    players: &[u8],
) -> Result<(u32, u32), String> {
    if sessions.len() != fds.len() {
        return Err(format!(
            "{} sessions, {} sockets",
            sessions.len(),
            fds.len()
        ));
    }
    let image = crate::snapshot::Image::decode(players).map_err(|e| e.to_string())?;
    let n = shards.len();
    let mut by_id: foldhash::HashMap<u64, crate::snapshot::PlayerImage> =
        image.players.into_iter().map(|p| (p.id, p)).collect();
    let mut per: Vec<Share> = (0..n).map(|_| (Vec::new(), Vec::new())).collect();
    for (img, fd) in sessions.into_iter().zip(fds) {
        let player = (img.player != 0)
            .then(|| by_id.remove(&img.player))
            .flatten();
        if img.player != 0 && player.is_none() {
            return Err(format!("no image for player {}", img.player));
        }
        let home = match &player {
            Some(p) => shards::home_shard(p.id, n),
            None => {
                *round += 1;
                *round % n
            }
        };
        per[home]
            .0
            .push((crate::core::Leaving { image: img, player }, fd));
    }
    for p in by_id.into_values() {
        per[shards::home_shard(p.id, n)].1.push(p);
    }
    let mut waiting = Vec::new();
    for (tx, (sessions, players)) in shards.iter().zip(per) {
        if sessions.is_empty() && players.is_empty() {
            continue;
        }
        let (reply, rx) = flume::bounded(1);
        tx.send(ShardMsg::UpgradeTakeIn {
            sessions,
            players,
            reply,
        })
        .map_err(|_| "a shard is stopping".to_string())?;
        waiting.push(rx);
    }
    let mut total = (0, 0);
    for rx in waiting {
        let (s, p) = rx
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| "a shard did not answer".to_string())?;
        total.0 += s;
        total.1 += p;
    }
    Ok(total)
}
