//! An in-memory gateway for tests and benchmarks: several shard cores (the
//! real [`Core`], with all its rules), fake client connections and a fake
//! backend, on a simulated clock. No sockets, no threads, no sleeps: a test
//! moves the clock itself, and a run repeats exactly from its seed (the
//! idea of quinn's `Pair`).
//!
//! The harness plays the shell's part the way `shard::conn` does: a
//! connection's read loop asks [`Core::next_step`] before each frame, its
//! output is written straight from the queue whenever the core asks
//! ([`Core::write_now`], the socket taking all, half or nothing in turn)
//! and its writer drains [`Core::poll_transmit`] for the rest, a login or resume for a player
//! homed on another shard moves the connection there (what was queued is
//! written first, then the hand-off travels an in-memory mesh, in order,
//! and is registered on the home shard when delivered: other events may
//! happen while it is on its way), and
//! every output the core asks for (wakes, requests for a backend) is
//! carried out right after the call that produced it. A reader that
//! paused, or a writer with nothing to write, runs again only when the core
//! wakes it, so a forgotten wake shows up as a stuck connection.

use crate::config::Config;
use crate::core::{Answer, Core, Event, Forward, PushCounts, SeededEntropy, Step};
use crate::protocol::{encode, Code, Decoder, Frame, Header, Link};
use crate::session::{Arrival, CloseReason, SessionId};
use bytes::{Bytes, BytesMut};
// foldhash: the keys are ids, hashed on every frame; SipHash cost 6% of
// the relay's CPU (docs/PERFORMANCE.md). Seeded per process.
use foldhash::{HashMap, HashMapExt};
use std::rc::Rc;
use std::time::{Duration, Instant};

mod client;
mod write;
pub use client::header;

/// A connection of the harness (an index, stable for the whole run).
pub type ConnId = usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reader {
    Running,
    /// Waits to be woken by the core.
    Paused,
    /// The gateway's side of the connection is gone.
    Ended,
    /// Handed to another shard: the message is on the mesh, no shard
    /// serves the connection until it arrives.
    InTransit,
}

/// One client connection, both ends.
struct Conn {
    shard: usize,
    sid: SessionId,
    /// Bytes the client sent that the gateway has not read.
    inbound: BytesMut,
    /// Bytes the gateway wrote that the client has not read.
    outbound: BytesMut,
    reader: Reader,
    /// The writer found nothing to write and waits to be woken.
    writer_idle: bool,
    /// The writer is finished (the core said `Done`).
    writer_done: bool,
    /// The client closed its side: the reader sees end of stream once it
    /// has read what came before.
    eof: bool,
    /// The client is gone: writes fail.
    peer_gone: bool,
    /// The client reads nothing: the batch being written waits.
    stalled: bool,
    in_write: Option<Bytes>,
    /// How many times the connection moved between shards.
    handoffs: u32,
}

/// A request the fake backend received and has not answered.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The shard whose backend connection carried it.
    pub shard: usize,
    pub forward: Forward,
    pub at: Instant,
}

/// The in-memory gateway.
pub struct Sim {
    pub now: Instant,
    pub cores: Vec<Core>,
    conns: Vec<Conn>,
    by_sid: HashMap<(usize, SessionId), ConnId>,
    /// Hand-offs on the mesh, in the order they were sent.
    mesh: std::collections::VecDeque<(ConnId, usize, Arrival)>,
    /// Requests waiting for the fake backend, oldest first.
    pub backend: Vec<Sent>,
    /// While set, every request for a backend fails to be sent (as when no
    /// instance is up): the core hears `BACKEND_UNAVAILABLE` for it.
    pub backend_down: bool,
    /// While set, every client frame the gateway reads is logged in
    /// [`Sim::take_read`] (a test's record of what the gateway accepted).
    pub log_reads: bool,
    read_log: Vec<(ConnId, Header)>,
    /// What the cores reported for the log, with the shard, oldest first.
    events: Vec<(usize, Event)>,
    client_decoder: Decoder,
    server_decoder: Decoder,
    /// Writes straight from the queue so far (see [`Sim::write_now`]).
    turns: u64,
    /// One of them did something since [`Sim::run`] last looked.
    wrote_now: bool,
}

impl Sim {
    /// `shards` cores on `cfg`; token secrets drawn from `seed`.
    pub fn new(cfg: Config, shards: usize, seed: u64) -> Sim {
        let now = Instant::now();
        let max = cfg.max_frame;
        let cfg = Rc::new(cfg);
        let cores = (0..shards)
            .map(|i| {
                let entropy = SeededEntropy(seed ^ (i as u64).wrapping_mul(0x9E37_79B9));
                Core::new(i, shards, cfg.clone(), false, Box::new(entropy), now)
            })
            .collect();
        Sim {
            now,
            cores,
            conns: Vec::new(),
            by_sid: HashMap::new(),
            mesh: std::collections::VecDeque::new(),
            backend: Vec::new(),
            backend_down: false,
            log_reads: false,
            events: Vec::new(),
            read_log: Vec::new(),
            client_decoder: Decoder::new(Link::GatewayToClient, max),
            server_decoder: Decoder::new(Link::ClientToGateway, max),
            turns: 0,
            wrote_now: false,
        }
    }

    /// The shard a player lives on.
    pub fn home(&self, player: u64) -> usize {
        shards::home_shard(player, self.cores.len())
    }

    /// The core of the player's home shard.
    pub fn home_core(&self, player: u64) -> &Core {
        &self.cores[self.home(player)]
    }

    // ----- clients -------------------------------------------------------

    /// A client connects; the connection is accepted by `shard`.
    pub fn connect(&mut self, shard: usize) -> ConnId {
        let sid = self.cores[shard].add_session(self.now);
        let id = self.conns.len();
        self.conns.push(Conn {
            shard,
            sid,
            inbound: BytesMut::new(),
            outbound: BytesMut::new(),
            reader: Reader::Running,
            writer_idle: false,
            writer_done: false,
            eof: false,
            peer_gone: false,
            stalled: false,
            in_write: None,
            handoffs: 0,
        });
        self.by_sid.insert((shard, sid), id);
        id
    }

    /// The client sends one frame (read by the gateway on the next run).
    pub fn send(&mut self, c: ConnId, h: &Header, body: &[u8]) {
        let conn = &mut self.conns[c];
        if !conn.eof {
            encode(&mut conn.inbound, h, body);
        }
    }

    /// The client sends raw bytes (a broken frame, a lying length).
    pub fn send_raw(&mut self, c: ConnId, bytes: &[u8]) {
        let conn = &mut self.conns[c];
        if !conn.eof {
            conn.inbound.extend_from_slice(bytes);
        }
    }

    /// The client closes its side. `lose_unread`: what it sent and the
    /// gateway has not read is lost too (the connection broke, rather than
    /// closed cleanly). From now on nothing it is sent arrives.
    pub fn hang_up(&mut self, c: ConnId, lose_unread: bool) {
        let conn = &mut self.conns[c];
        conn.eof = true;
        conn.peer_gone = true;
        conn.outbound.clear();
        if lose_unread {
            conn.inbound.clear();
        }
        // A paused read loop waits for the core alone (as the shell's does):
        // it sees the end of stream once the core wakes it.
    }

    /// The client stops reading (its writes pile up in the gateway), or
    /// starts again.
    pub fn stall(&mut self, c: ConnId, stalled: bool) {
        self.conns[c].stalled = stalled;
        if !stalled {
            self.complete_write(c);
        }
    }

    /// The frames the client has received since it last looked.
    pub fn recv(&mut self, c: ConnId) -> Vec<Frame> {
        let mut out = Vec::new();
        let conn = &mut self.conns[c];
        // The gateway writes whole frames: anything undecodable is a bug.
        while let Some(f) = self
            .client_decoder
            .decode(&mut conn.outbound)
            .expect("the gateway wrote an undecodable frame")
        {
            out.push(f);
        }
        out
    }

    /// The client frames the gateway read since the last call, in order
    /// (with [`Sim::log_reads`] set).
    pub fn take_read(&mut self) -> Vec<(ConnId, Header)> {
        std::mem::take(&mut self.read_log)
    }

    /// What the cores reported for the log since the last call (shard,
    /// event), oldest first: the log lines a real gateway would write.
    pub fn take_events(&mut self) -> Vec<(usize, Event)> {
        std::mem::take(&mut self.events)
    }

    /// Whether the gateway still serves the connection.
    pub fn is_open(&self, c: ConnId) -> bool {
        self.conns[c].reader != Reader::Ended
    }

    /// The shard serving the connection now.
    pub fn shard_of(&self, c: ConnId) -> usize {
        self.conns[c].shard
    }

    /// The session id the connection has on its shard now.
    pub fn session_of(&self, c: ConnId) -> SessionId {
        self.conns[c].sid
    }

    /// How many times the connection moved between shards.
    pub fn handoffs(&self, c: ConnId) -> u32 {
        self.conns[c].handoffs
    }

    /// Bytes the gateway has queued for the connection and not written.
    pub fn unsent(&self, c: ConnId) -> usize {
        let conn = &self.conns[c];
        self.cores[conn.shard].unsent(conn.sid)
    }

    // ----- the clock, pushes, the backend ------------------------------

    /// Move the clock and fire every shard's sweep timer.
    pub fn advance(&mut self, d: Duration) {
        self.now += d;
        for s in 0..self.cores.len() {
            self.cores[s].handle_tick(self.now);
            self.flush(s);
        }
    }

    /// A push to one player (on its home shard).
    pub fn push(&mut self, player: u64, msg_id: u32, body: &[u8]) -> PushCounts {
        let s = self.home(player);
        let counts = self.cores[s].handle_push(&[player], msg_id, body, self.now);
        self.flush(s);
        counts
    }

    /// Run `f` on shard `s`'s core with the clock, then carry out its outputs.
    pub fn on_core<R>(&mut self, s: usize, f: impl FnOnce(&mut Core, Instant) -> R) -> R {
        let r = f(&mut self.cores[s], self.now);
        self.flush(s);
        r
    }

    /// The backend answers its `i`-th waiting request.
    pub fn answer(&mut self, i: usize, code: u16, player: u64, body: &[u8]) {
        let sent = self.backend.remove(i);
        let a = Answer {
            from_backend: true,
            code,
            msg_id: sent.forward.header.msg_id,
            player,
            body: Bytes::copy_from_slice(body),
        };
        self.deliver_answer(sent, a);
    }

    /// The gateway gives up on the `i`-th waiting request (its deadline
    /// passed): the client gets `TIMEOUT` and a late answer is dropped.
    pub fn time_out(&mut self, i: usize) {
        let sent = self.backend.remove(i);
        let a = Answer {
            from_backend: false,
            code: Code::Timeout.into(),
            msg_id: sent.forward.header.msg_id,
            player: 0,
            body: Bytes::new(),
        };
        self.deliver_answer(sent, a);
    }

    fn deliver_answer(&mut self, sent: Sent, a: Answer) {
        let s = sent.shard;
        self.cores[s].handle_answer(sent.forward.asker, a, self.now);
        self.flush(s);
    }

    // ----- running -------------------------------------------------------

    /// Run every connection until nothing more happens.
    pub fn run(&mut self) {
        loop {
            let mut busy = self.deliver_mesh();
            for c in 0..self.conns.len() {
                busy |= self.pump(c, usize::MAX);
            }
            busy |= std::mem::take(&mut self.wrote_now);
            if !busy {
                return;
            }
        }
    }

    /// Let connection `c` read at most `frames` frames and write what it
    /// can; true if anything happened.
    pub fn pump(&mut self, c: ConnId, frames: usize) -> bool {
        if self.conns[c].reader == Reader::InTransit {
            // Its hand-off arrives, and those sent before it.
            while let Some(&(first, _, _)) = self.mesh.front() {
                self.deliver_one();
                if first == c {
                    break;
                }
            }
            return true;
        }
        let read = self.read(c, frames);
        let wrote = self.write(c);
        read || wrote
    }

    /// Carry out what core `s` asked for.
    fn flush(&mut self, s: usize) {
        loop {
            let core = &mut self.cores[s];
            if !core.has_output() {
                return;
            }
            while let Some(e) = core.poll_event() {
                self.events.push((s, e));
            }
            if let Some(w) = core.poll_wake() {
                if let Some(&c) = self.by_sid.get(&(s, w.sid)) {
                    let conn = &mut self.conns[c];
                    if w.reader && conn.reader == Reader::Paused {
                        conn.reader = Reader::Running;
                    }
                    if w.writer {
                        self.write_now(c);
                    }
                }
            }
            if let Some(forward) = self.cores[s].poll_forward() {
                if self.backend_down {
                    let asker = forward.asker;
                    let err = crate::error::Error::not_sent(
                        Code::BackendUnavailable,
                        "the harness's backend is down",
                    );
                    self.cores[s].handle_not_sent(asker, err, self.now);
                } else {
                    self.backend.push(Sent {
                        shard: s,
                        forward,
                        at: self.now,
                    });
                }
            }
            // This gateway is alone: the core asks the cluster nothing.
            if let Some(out) = self.cores[s].poll_cluster() {
                panic!("a gateway alone asked the cluster: {out:?}");
            }
        }
    }

    /// The read loop of `c` (as `shard::conn::read_loop`).
    fn read(&mut self, c: ConnId, mut budget: usize) -> bool {
        let mut did = false;
        while self.conns[c].reader == Reader::Running {
            let (s, sid) = (self.conns[c].shard, self.conns[c].sid);
            let step = self.cores[s].next_step(sid, self.now);
            self.flush(s);
            match step {
                Step::Read => {}
                Step::Pause => {
                    self.conns[c].reader = Reader::Paused;
                    return did;
                }
                Step::Close => {
                    self.end(c);
                    return true;
                }
                Step::Handoff { home, arrival } => {
                    self.hand_off(c, home, arrival);
                    return true;
                }
                Step::Upgrade => panic!("the simulation runs no upgrade"),
            }
            if budget == 0 {
                return did;
            }
            match self.server_decoder.decode(&mut self.conns[c].inbound) {
                Ok(Some(frame)) => {
                    budget -= 1;
                    did = true;
                    if self.log_reads {
                        self.read_log.push((c, frame.header));
                    }
                    self.cores[s].handle_frame(sid, frame, self.now);
                    self.flush(s);
                }
                Ok(None) if self.conns[c].eof => {
                    self.cores[s].handle_close(sid, CloseReason::PeerClosed, self.now);
                    self.flush(s);
                    self.end(c);
                    return true;
                }
                Ok(None) => return did,
                Err(e) => {
                    did = true;
                    self.conns[c].inbound.clear();
                    let err = crate::error::Error::protocol(e.to_string());
                    self.cores[s].handle_protocol_error(sid, err, self.now);
                    self.flush(s);
                }
            }
        }
        did
    }

    /// Write what is queued before the connection closes or moves: false if
    /// it could not all be written (a stalled client: the shell gives up
    /// after its flush deadline).
    fn flush_output(&mut self, c: ConnId) -> bool {
        let (s, sid) = (self.conns[c].shard, self.conns[c].sid);
        self.cores[s].finish_output(sid);
        self.flush(s);
        self.conns[c].writer_idle = false;
        self.write(c);
        self.conns[c].writer_done
    }

    /// The connection closes on the gateway's side.
    fn end(&mut self, c: ConnId) {
        self.flush_output(c);
        let (s, sid) = (self.conns[c].shard, self.conns[c].sid);
        self.cores[s].remove_session(sid, self.now);
        self.flush(s);
        self.by_sid.remove(&(s, sid));
        let conn = &mut self.conns[c];
        conn.reader = Reader::Ended;
        conn.in_write = None;
        conn.writer_done = true;
    }

    /// The connection moves to shard `home` (as `shard::conn::serve`).
    fn hand_off(&mut self, c: ConnId, home: usize, arrival: Arrival) {
        let flushed = self.flush_output(c);
        let (s, sid) = (self.conns[c].shard, self.conns[c].sid);
        // A kick while the output flushed wins: close.
        let kicked = self.cores[s].is_closing(sid);
        self.cores[s].remove_session(sid, self.now);
        self.flush(s);
        self.by_sid.remove(&(s, sid));
        if !flushed || kicked {
            let conn = &mut self.conns[c];
            conn.reader = Reader::Ended;
            conn.in_write = None;
            return;
        }
        self.conns[c].reader = Reader::InTransit;
        self.mesh.push_back((c, home, arrival));
    }

    /// Deliver every hand-off on the mesh; true if there was any.
    fn deliver_mesh(&mut self) -> bool {
        let any = !self.mesh.is_empty();
        while !self.mesh.is_empty() {
            self.deliver_one();
        }
        any
    }

    /// The oldest hand-off arrives on its home shard (as `shard::conn::adopt`).
    fn deliver_one(&mut self) {
        let Some((c, home, arrival)) = self.mesh.pop_front() else {
            return;
        };
        let new = self.cores[home].add_session(self.now);
        self.by_sid.insert((home, new), c);
        let conn = &mut self.conns[c];
        conn.shard = home;
        conn.sid = new;
        conn.reader = Reader::Running;
        conn.writer_idle = false;
        conn.writer_done = false;
        conn.handoffs += 1;
        self.cores[home].handle_handoff(new, arrival, self.now);
        self.flush(home);
    }
}
