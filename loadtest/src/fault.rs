//! A fault-injecting relay of the client link: a small TCP proxy that sits
//! between clients and a gateway and, on a seeded schedule, breaks the
//! gateway's promises once, the way a broken gateway would. It exists to
//! prove that the checkers (the load tester's scenarios, the randomized
//! tests) catch what they claim to catch: a test plants one [`Fault`] and
//! expects the checker to report it by its [`symptom`](Fault::symptom).
//!
//! Blocking std sockets, two threads per relayed connection: it is test
//! support, not the data path. Client-to-gateway bytes pass through as they
//! are (frames are only scanned, to see `RESUME`); gateway-to-client frames
//! are decoded, maybe altered, and written again.

use crate::check;
use bytes::BytesMut;
use slg_gateway::protocol::{encode, parse_session_body, Decoder, Frame, Kind, Link};
use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One way a gateway could break its wire contract (PROTOCOL.md section 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// One sequenced frame never reaches the client (frames after it do).
    Drop,
    /// One sequenced frame is delivered twice in a row.
    Duplicate,
    /// Two consecutive sequenced frames are delivered in the wrong order.
    Swap,
    /// One sequenced frame carries the seq of the frame before it.
    RewriteSeq,
    /// Two consecutive answers trade req_ids (pushes: msg_ids), so each
    /// correlation id gets exactly one answer, but the wrong one.
    WrongReqId,
    /// Right after a resume's `SESSION` (resume point R), a frame with seq
    /// <= R that the client already had is delivered again. Only sessions
    /// that resume can meet it.
    StaleReplay,
}

impl Fault {
    pub const ALL: [Fault; 6] = [
        Fault::Drop,
        Fault::Duplicate,
        Fault::Swap,
        Fault::RewriteSeq,
        Fault::WrongReqId,
        Fault::StaleReplay,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Drop => "drop",
            Fault::Duplicate => "duplicate",
            Fault::Swap => "swap",
            Fault::RewriteSeq => "rewrite-seq",
            Fault::WrongReqId => "wrong-req-id",
            Fault::StaleReplay => "stale-replay",
        }
    }

    /// The words a checker's violation message uses for this fault (the
    /// phrases of [`crate::check`]).
    pub fn symptom(self) -> &'static str {
        match self {
            Fault::Drop => check::LOST,
            Fault::Duplicate => check::REPEATED,
            Fault::Swap => check::OUT_OF_ORDER,
            Fault::RewriteSeq => check::TWO_FRAMES,
            Fault::WrongReqId => check::MISDELIVERED,
            Fault::StaleReplay => check::STALE,
        }
    }
}

/// What the relay plants, and when.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub fault: Fault,
    /// Sequenced frames (over all connections) relayed untouched before the
    /// fault is armed.
    pub after: u64,
    /// Plant it again after this many more frames (None: once). A fault in
    /// frames a client never reads (its connection was going anyway) harms
    /// nobody; repeating makes sure one lands where it is read.
    pub every: Option<u64>,
}

impl Plan {
    /// The fault, armed after 10..50 sequenced frames, chosen by `seed`.
    pub fn seeded(fault: Fault, seed: u64) -> Plan {
        Plan {
            fault,
            after: 10 + shards::splitmix64(seed) % 40,
            every: None,
        }
    }

    /// The same, planted again every `n` frames after the first.
    pub fn repeated(self, n: u64) -> Plan {
        Plan {
            every: Some(n.max(1)),
            ..self
        }
    }
}

/// Frames of a player kept for [`Fault::StaleReplay`].
const HISTORY: usize = 64;
/// How long a frame held back (drop, swap, wrong req_id) waits for the
/// frame that should follow it before the relay gives up on pairing.
const HOLD: Duration = Duration::from_millis(300);

struct State {
    /// Sequenced frames still to relay before the fault is armed.
    countdown: u64,
    /// What was planted, in order (the first few).
    fired: Vec<String>,
    /// Frames between plantings (None: plant once).
    every: Option<u64>,
    planted: usize,
    /// A connection holds a frame back to plant the fault with the next:
    /// no other connection may start one meanwhile.
    holding: bool,
    /// Recent sequenced frames by player.
    history: HashMap<u64, VecDeque<Frame>>,
}

/// A relayed connection: its two sockets and its two threads.
type Relayed = (TcpStream, TcpStream, Vec<JoinHandle<()>>);

struct Shared {
    upstream: SocketAddr,
    fault: Fault,
    stop: AtomicBool,
    state: Mutex<State>,
    /// Every relayed socket (to shut down on stop) and its threads.
    conns: Mutex<Vec<Relayed>>,
    relayed: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The relay: listens on a port of its own, relays to `upstream`.
pub struct FaultRelay {
    /// Where clients connect instead of the gateway.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FaultRelay {
    /// Listen on a free loopback port and relay every connection to
    /// `upstream`, planting `plan`'s fault once.
    pub fn start(upstream: SocketAddr, plan: Plan) -> io::Result<FaultRelay> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            upstream,
            fault: plan.fault,
            stop: AtomicBool::new(false),
            state: Mutex::new(State {
                countdown: plan.after,
                fired: Vec::new(),
                every: plan.every,
                history: HashMap::new(),
                planted: 0,
                holding: false,
            }),
            conns: Mutex::new(Vec::new()),
            relayed: AtomicU64::new(0),
        });
        let sh = shared.clone();
        let accept = std::thread::Builder::new()
            .name("fault-relay".into())
            .spawn(move || accept_loop(listener, sh))?;
        Ok(FaultRelay {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// What was planted first (None: the fault's moment never came).
    pub fn fired(&self) -> Option<String> {
        lock(&self.shared.state).fired.first().cloned()
    }

    /// How many times the fault was planted.
    pub fn planted(&self) -> usize {
        lock(&self.shared.state).planted
    }

    /// Sequenced frames relayed so far.
    pub fn relayed(&self) -> u64 {
        self.shared.relayed.load(Ordering::Relaxed)
    }

    /// Close every relayed connection and join every thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let conns = std::mem::take(&mut *lock(&self.shared.conns));
        for (a, b, threads) in conns {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
            for t in threads {
                let _ = t.join();
            }
        }
    }
}

impl Drop for FaultRelay {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(listener: TcpListener, sh: Arc<Shared>) {
    while !sh.stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((client, _)) => {
                if let Err(e) = relay_one(client, &sh) {
                    eprintln!("fault relay: cannot relay a connection: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => {
                eprintln!("fault relay: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Per relayed connection, what both directions share.
#[derive(Default)]
struct ConnFlags {
    /// The client sent `RESUME` and its `SESSION` has not passed yet.
    resuming: AtomicBool,
}

fn relay_one(client: TcpStream, sh: &Arc<Shared>) -> io::Result<()> {
    client.set_nonblocking(false)?;
    client.set_nodelay(true)?;
    let upstream = match TcpStream::connect(sh.upstream) {
        Ok(u) => u,
        Err(e) => {
            let _ = client.shutdown(Shutdown::Both);
            return Err(e);
        }
    };
    upstream.set_nodelay(true)?;
    let flags = Arc::new(ConnFlags::default());
    let up = {
        let (from, to, flags, sh) = (
            client.try_clone()?,
            upstream.try_clone()?,
            flags.clone(),
            sh.clone(),
        );
        std::thread::spawn(move || client_to_gateway(from, to, &flags, &sh))
    };
    let down = {
        let (from, to, sh) = (upstream.try_clone()?, client.try_clone()?, sh.clone());
        std::thread::spawn(move || gateway_to_client(from, to, &flags, &sh))
    };
    lock(&sh.conns).push((client, upstream, vec![up, down]));
    Ok(())
}

/// Bytes pass unchanged; frames are scanned only to see `RESUME`.
fn client_to_gateway(mut from: TcpStream, mut to: TcpStream, flags: &ConnFlags, sh: &Shared) {
    let decoder = Decoder::new(Link::ClientToGateway, u32::MAX);
    let mut scan = BytesMut::new();
    let mut scanning = true;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if scanning {
            scan.extend_from_slice(&buf[..n]);
            loop {
                match decoder.decode(&mut scan) {
                    Ok(Some(f)) if f.header.kind == Kind::Resume => {
                        flags.resuming.store(true, Ordering::Release)
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    // Not ours to judge: the gateway answers it.
                    Err(_) => {
                        scanning = false;
                        break;
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).is_err() || sh.stop.load(Ordering::Acquire) {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// A frame held back, waiting for the one that follows it.
struct Held {
    frame: Frame,
    since: Instant,
}

/// One connection's gateway-to-client direction.
struct Down<'a> {
    sh: &'a Shared,
    flags: &'a ConnFlags,
    player: u64,
    /// Seq of the last sequenced frame relayed on this connection.
    last_relayed: u64,
    held: Option<Held>,
}

fn sequenced(f: &Frame) -> bool {
    matches!(f.header.kind, Kind::Response | Kind::Push) && f.header.seq > 0
}

impl Down<'_> {
    /// What to send the client for `f` (maybe nothing, maybe more).
    fn on_frame(&mut self, f: Frame, out: &mut Vec<Frame>) {
        let mut st = lock(&self.sh.state);
        if f.header.kind == Kind::Session {
            let resumed = self.flags.resuming.swap(false, Ordering::AcqRel);
            let r = f.header.seq;
            if let Some((player, _)) = parse_session_body(&f.body) {
                self.player = player;
            }
            out.push(f);
            if resumed && self.sh.fault == Fault::StaleReplay && armed(&st) {
                let stale = st
                    .history
                    .get(&self.player)
                    .and_then(|h| h.iter().rev().find(|g| g.header.seq <= r).cloned());
                if let Some(g) = stale {
                    st.fire(format!(
                        "stale-replay: seq {} sent again after the resume at {r} (player {})",
                        g.header.seq, self.player
                    ));
                    out.push(g);
                }
            }
            return;
        }
        if !sequenced(&f) {
            out.push(f);
            return;
        }
        self.sh.relayed.fetch_add(1, Ordering::Relaxed);
        let h = st.history.entry(self.player).or_default();
        if h.len() == HISTORY {
            h.pop_front();
        }
        h.push_back(f.clone());
        let seq = f.header.seq;
        if let Some(held) = self.held.take() {
            self.pair(&mut st, held.frame, f, out);
        } else if armed(&st) && self.sh.fault != Fault::StaleReplay {
            match self.sh.fault {
                Fault::Duplicate => {
                    st.fire(format!("duplicate: seq {seq} sent twice"));
                    out.push(f.clone());
                    out.push(f);
                }
                Fault::RewriteSeq if self.last_relayed + 1 == seq && seq > 1 => {
                    st.fire(format!("rewrite-seq: seq {seq} sent as {}", seq - 1));
                    let mut g = f;
                    g.header.seq = seq - 1;
                    out.push(g);
                }
                Fault::RewriteSeq => out.push(f),
                _ => {
                    st.holding = true;
                    self.held = Some(Held {
                        frame: f,
                        since: Instant::now(),
                    })
                }
            }
        } else {
            st.countdown = st.countdown.saturating_sub(1);
            out.push(f);
        }
        self.last_relayed = seq;
    }

    /// `first` was held back; `next` follows it.
    fn pair(&mut self, st: &mut State, first: Frame, next: Frame, out: &mut Vec<Frame>) {
        st.holding = false;
        let (a, b) = (first.header.seq, next.header.seq);
        match self.sh.fault {
            Fault::Drop => {
                st.fire(format!("drop: seq {a} never sent, {b} went on"));
                out.push(next);
            }
            Fault::Swap => {
                st.fire(format!("swap: seq {b} sent before {a}"));
                out.push(next);
                out.push(first);
            }
            Fault::WrongReqId if first.header.kind == next.header.kind => {
                let (mut x, mut y) = (first, next);
                if x.header.kind == Kind::Response && x.header.req_id != y.header.req_id {
                    std::mem::swap(&mut x.header.req_id, &mut y.header.req_id);
                    st.fire(format!(
                        "wrong-req-id: seqs {a} and {b} traded req_ids {} and {}",
                        y.header.req_id, x.header.req_id
                    ));
                } else if x.header.kind == Kind::Push && x.header.msg_id != y.header.msg_id {
                    std::mem::swap(&mut x.header.msg_id, &mut y.header.msg_id);
                    st.fire(format!(
                        "wrong-req-id: pushes at seqs {a} and {b} traded msg_ids"
                    ));
                }
                out.push(x);
                out.push(y);
            }
            _ => {
                out.push(first);
                out.push(next);
            }
        }
    }

    /// The held frame waited long enough: no frame will follow it soon.
    fn hold_expired(&mut self, out: &mut Vec<Frame>) {
        let Some(held) = self.held.take_if(|h| h.since.elapsed() >= HOLD) else {
            return;
        };
        let mut st = lock(&self.sh.state);
        st.holding = false;
        if self.sh.fault == Fault::Drop {
            st.fire(format!(
                "drop: seq {} never sent (nothing followed it)",
                held.frame.header.seq
            ));
        } else {
            // Nothing to pair it with: send it as it is and stay armed.
            out.push(held.frame);
        }
    }
}

fn armed(st: &State) -> bool {
    st.countdown == 0 && !st.holding && (st.every.is_some() || st.planted == 0)
}

impl State {
    fn fire(&mut self, what: String) {
        self.planted += 1;
        if self.fired.len() < 16 {
            self.fired.push(what);
        }
        if let Some(n) = self.every {
            self.countdown = n;
        }
    }
}

fn gateway_to_client(mut from: TcpStream, mut to: TcpStream, flags: &ConnFlags, sh: &Shared) {
    let decoder = Decoder::new(Link::GatewayToClient, u32::MAX);
    let mut down = Down {
        sh,
        flags,
        player: 0,
        last_relayed: 0,
        held: None,
    };
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut inbuf = BytesMut::with_capacity(16 * 1024);
    let mut chunk = vec![0u8; 16 * 1024];
    let mut frames = Vec::new();
    let mut outbuf = BytesMut::new();
    'conn: loop {
        if sh.stop.load(Ordering::Acquire) {
            break;
        }
        let n = match from.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                0
            }
            Err(_) => break,
        };
        inbuf.extend_from_slice(&chunk[..n]);
        loop {
            match decoder.decode(&mut inbuf) {
                Ok(Some(f)) => down.on_frame(f, &mut frames),
                Ok(None) => break,
                Err(e) => {
                    eprintln!("fault relay: bad frame from the gateway: {e}");
                    break 'conn;
                }
            }
        }
        down.hold_expired(&mut frames);
        if frames.is_empty() {
            continue;
        }
        outbuf.clear();
        for f in frames.drain(..) {
            encode(&mut outbuf, &f.header, &f.body);
        }
        if to.write_all(&outbuf).is_err() {
            break;
        }
    }
    // A frame still held is lost with the connection; the client gets it
    // again by resume, so nothing was planted: the fault is armed again.
    if down.held.take().is_some() {
        lock(&sh.state).holding = false;
    }
    let _ = to.shutdown(Shutdown::Write);
}
