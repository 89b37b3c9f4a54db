//! Messages between shards, and between a shard and the process: what
//! travels over the mesh (a connection in transit, push and admin
//! commands, cluster steps, the drain) and what a shard tells the
//! coordinator.

use crate::config::Config;
use crate::core::{PlayerInfo, PushCounts};
use bytes::{Bytes, BytesMut};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;

/// Messages between shards.
pub enum ShardMsg {
    /// A connection moving to its player's home shard.
    Handoff(Box<Handoff>),
    /// Ask the home shard of `player` for its state.
    PlayerInfo {
        player: u64,
        reply: flume::Sender<Option<PlayerInfo>>,
    },
    /// One PUSH to each of `players` (all homed on the receiving shard).
    Push {
        players: Vec<u64>,
        msg_id: u32,
        body: Bytes,
        /// None: refused (the shard has drained; its players are gone).
        reply: flume::Sender<Option<PushCounts>>,
    },
    /// One PUSH to every player the receiving shard holds.
    Broadcast {
        msg_id: u32,
        body: Bytes,
        reply: flume::Sender<Option<PushCounts>>,
    },
    /// `KICK ADMIN` to the session of `player`; with `end` the player ends.
    Kick {
        player: u64,
        end: bool,
        reply: flume::Sender<(bool, bool)>,
    },
    /// Up to `limit` players with id > `after`, ascending.
    ListPlayers {
        after: u64,
        limit: usize,
        reply: flume::Sender<Vec<PlayerInfo>>,
    },
    /// The shard's metrics now.
    Metrics {
        reply: flume::Sender<crate::metrics::Snapshot>,
    },
    /// Apply a reloaded config (the fields that need a restart are kept
    /// as they were); the shard answers when done.
    Reload {
        cfg: Arc<Config>,
        /// The listeners' TLS and WebSocket settings (certificates read
        /// again), for connections accepted from now on.
        wires: crate::wire::Wires,
        reply: flume::Sender<usize>,
    },
    /// Another gateway takes `player` over: let it go to gateway `to`.
    GiveAway {
        player: u64,
        to: String,
        login: bool,
    },
    /// A player migrated here: load it.
    Adopt {
        image: crate::snapshot::Image,
        reply: flume::Sender<()>,
    },
    /// Move every player of the receiving shard to the targets of `evac`;
    /// the answer is (migrated, failed).
    Evacuate {
        evac: std::sync::Arc<crate::cluster::placement::Evacuation>,
        reply: flume::Sender<(u64, u64)>,
    },
    /// Move `player` to gateway `to` (an operator's migration); the answer
    /// is the target's client address.
    Migrate {
        player: u64,
        to: String,
        reply: flume::Sender<Result<String, crate::error::Error>>,
    },
    /// Open the accept loops of inherited listeners (an upgrade's new
    /// process, once the old one no longer accepts there).
    Accept { clients: bool, http: bool },
    /// End every accept loop after the accept it has armed (an upgrade's
    /// old process).
    StopAccepting,
    /// Accept again on these listeners (an upgrade rolled back after the
    /// old process had stopped accepting).
    ResumeAccepting { listeners: Vec<(u8, OwnedFd)> },
    /// An upgrade's pull: up to `max` sessions ready to leave.
    /// (The answer is `Event::Pulled`.)
    UpgradePull {
        max: usize,
        reply: flume::Sender<crate::upgrade::Event>,
    },
    /// An upgrade begins: pushes for players the new process holds go to
    /// `to` (None: it ended or was abandoned).
    UpgradeForwardTo {
        to: Option<flume::Sender<crate::upgrade::Event>>,
    },
    /// The new process holds the batch: these wired connections close,
    /// and the pushes held for its players follow them.
    UpgradeConfirmed {
        closing: Vec<u64>,
        players: Vec<u64>,
    },
    /// Everything moved: HTTP connections close between requests.
    UpgradeHttpQuit,
    /// The batch was not taken: serve it here again.
    UpgradeTakeBack { batch: crate::shard::upgrade::Batch },
    /// The upgrade is abandoned: every session reads again.
    UpgradeCancel,
    /// The new process: sessions (with their sockets) and players taken in.
    UpgradeTakeIn {
        sessions: Vec<(crate::core::Leaving, OwnedFd)>,
        players: Vec<crate::snapshot::PlayerImage>,
        reply: flume::Sender<(u32, u32)>,
    },
    /// Drain (or, with `force`, stop draining and finish now); the shard
    /// answers once, with its players.
    Drain {
        force: bool,
        reply: flume::Sender<DrainReport>,
    },
}

/// What a shard hands the coordinator at the end of a drain.
#[derive(Debug)]
pub struct DrainReport {
    pub shard: usize,
    /// Everything finished within the deadline, nothing forced.
    pub clean: bool,
    pub players: Vec<crate::snapshot::PlayerImage>,
}

/// Events a shard raises for the process (the coordinator).
#[derive(Debug, Clone)]
pub enum GatewayEvent {
    /// `POST /v1/drain` (`evacuate`: `?evacuate=true`, the players go to
    /// the peers first).
    DrainRequested { evacuate: bool },
    /// A stop signal (SIGTERM, SIGINT).
    Signal(i32),
    /// Re-read the config file (SIGHUP, `POST /v1/reload`); the outcome
    /// goes to the sender, if any.
    Reload(Option<flume::Sender<Result<(), String>>>),
    /// Hand everything to a new process (SIGUSR2, `POST /v1/upgrade`):
    /// `binary`, or the one this process was started from; the answer
    /// (the new process's pid once it runs, or why not) goes to `reply`.
    Upgrade {
        binary: Option<String>,
        reply: Option<flume::Sender<Result<u32, String>>>,
    },
}

pub use crate::session::{Arrival, LoginReply};

/// A connection in transit: its socket, the bytes read past the frame that
/// sent it, and what to do on arrival.
pub struct Handoff {
    pub fd: OwnedFd,
    /// The connection's place under `max_connections`, moving with it.
    pub slot: crate::net::Slot,
    pub peer: SocketAddr,
    pub leftover: BytesMut,
    pub arrival: Arrival,
    /// The connection's TLS / WebSocket state (None: plain TCP).
    pub wire: Option<Box<crate::wire::Wire>>,
}
