//! The sans-IO core driven through the in-memory gateway (`sim::Sim`) by an
//! event sequence decoded from the input (`arbitrary`): connections and
//! logins, resumes honest and not, requests, pushes, acknowledgements true
//! and lying, BYE, hang-ups, stalled readers, garbage bytes, the backend
//! answering in any order, late, refusing, timing out or down, and the
//! clock jumping past idle, login, token and linger limits. A simpler
//! cousin of tests/core_random.rs, with the checks that do not need its
//! full model of each stream.
//!
//! Checked after every event, for every frame a client receives:
//! - no panic, and every byte the gateway writes decodes (`Sim::recv`);
//! - after `SESSION` R on a connection, its sequenced frames are exactly
//!   R+1, R+2, ... (gap-free and increasing); none come before a SESSION,
//!   and nothing at all after a KICK;
//! - a SESSION names the connection's player with a token of that player;
//!   R is never beyond a seq a client acknowledged, except with
//!   `GAP`, which comes only for a login and only when the outbox can
//!   evict; a RESUME from L is answered R = L;
//! - ERROR only answers a RESUME; KICK PROTOCOL_ERROR only a client that
//!   broke the protocol, SLOW_CONSUMER only one that stopped reading,
//!   LOGIN_TIMEOUT only one not logged in; PONG never reports less than
//!   the connection already received;
//! - memory stays bounded: sessions, players, requests at the backend,
//!   each outbox and each connection's write queue within their limits.
//!
//! At the end every request is answered and each player's live connection
//! is asked for a PONG: it must hold every seq up to the player's last.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use slg_gateway::config::Config;
use slg_gateway::player::{token_player, TOKEN_LEN};
use slg_gateway::protocol::{parse_session_body, Code, Frame, Header, Kind};
use slg_gateway::sim::{ConnId, Sim};
use std::time::Duration;

const LOGIN: u32 = 1;
const PLAYERS: [u64; 3] = [100, 107, 114];
const MAX_EVENTS: usize = 300;
const MAX_FRAME: u32 = 1024;
const OUTBOXES: [(usize, usize); 4] = [
    (100_000, 1 << 30),
    (2, 1 << 30),
    (5, 1 << 30),
    (100_000, 400),
];
const WRITE_QUEUES: [usize; 3] = [1 << 20, MAX_FRAME as usize + 4, 4096];
const MSGS: [u32; 6] = [LOGIN, 2, 150, 100, 200, 999];

#[derive(Debug, Arbitrary)]
struct Setup {
    shards: u8,
    outbox: u8,
    write_queue: u8,
    inflight: u8,
    seed: u64,
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Resume {
    /// From what the client holds, with its token.
    Honest,
    FromZero,
    Beyond(u8),
    /// With the token of another player.
    OtherToken,
    /// With a token one bit off.
    Flipped(u8),
}

#[derive(Debug, Arbitrary)]
enum Ev {
    Connect { player: u8, shard: u8 },
    Login { conn: u8 },
    Resume { conn: u8, how: Resume },
    Request { conn: u8, msg: u8, len: u8 },
    Push { player: u8, len: u8 },
    Ack { conn: u8, ping: bool, lie: u8 },
    Bye { conn: u8 },
    HangUp { conn: u8, lose: bool },
    Stall { conn: u8, on: bool },
    Garbage { conn: u8, bytes: [u8; 6], n: u8 },
    Answer { i: u8, code: u8, no_player: bool },
    TimeOut { i: u8 },
    BackendDown,
    Advance { amount: u16, unit: u8 },
    Pump { conn: u8, frames: u8 },
    Run,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asked {
    /// A login with this req_id.
    Login(u32),
    /// A RESUME from this seq.
    Resume(u64),
}

/// What a client knows of one connection.
struct Conn {
    id: ConnId,
    player: usize,
    /// A login or resume sent on a connection with none out and not bound.
    asked: Option<Asked>,
    /// After SESSION: the seq due next.
    next: Option<u64>,
    /// A login or resume sent while another was out, or once bound: which
    /// answer comes for which is not modelled, only the stream after it.
    extra: bool,
    /// RESUMEs sent on it.
    resumes_sent: u32,
    /// The client broke the protocol (garbage, a lying ACK, a resume
    /// beyond the stream): the gateway may kick it PROTOCOL_ERROR.
    broke: bool,
    stalled_ever: bool,
    stalled: bool,
    kicked: bool,
    /// A RESUME with another player's token was sent on it: a SESSION
    /// may name that player, whose connection it then is.
    other: Option<usize>,
}

struct Player {
    token: Option<Vec<u8>>,
}

struct Case {
    sim: Sim,
    conns: Vec<Conn>,
    players: Vec<Player>,
    /// The highest seq any client sent in an ACK, PING or RESUME: the most
    /// the gateway can have recorded as acknowledged for any player.
    claimed: u64,
    next_req: u32,
    next_push: u64,
    evicting: bool,
    max_frames: usize,
    max_bytes: usize,
    write_queue: usize,
    inflight: usize,
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(setup) = Setup::arbitrary(&mut u) else {
        return;
    };
    let mut case = Case::new(&setup);
    let mut n = 0;
    while !u.is_empty() && n < MAX_EVENTS {
        let Ok(ev) = Ev::arbitrary(&mut u) else {
            break;
        };
        if slg_gateway_fuzz::trace() {
            eprintln!("{ev:?}");
        }
        case.event(ev);
        case.receive();
        case.check_bounds();
        n += 1;
    }
    case.settle();
});

impl Case {
    fn new(s: &Setup) -> Case {
        let mut cfg = Config::embedded_default();
        cfg.session_idle = Duration::from_secs(60);
        cfg.login_timeout = Duration::from_secs(30);
        cfg.player_linger = Duration::from_secs(120);
        cfg.token_lifetime = Duration::from_secs(90);
        cfg.max_frame = MAX_FRAME;
        let (max_frames, max_bytes) = OUTBOXES[usize::from(s.outbox) % OUTBOXES.len()];
        cfg.outbox.max_frames = max_frames;
        cfg.outbox.max_bytes = max_bytes;
        let write_queue = WRITE_QUEUES[usize::from(s.write_queue) % WRITE_QUEUES.len()];
        cfg.write_queue_bytes = write_queue;
        let inflight = 1 + u32::from(s.inflight % 4);
        cfg.limits.session_inflight = inflight;
        let shards = 1 + usize::from(s.shards % 3);
        Case {
            sim: Sim::new(cfg, shards, s.seed),
            conns: Vec::new(),
            players: PLAYERS.iter().map(|_| Player { token: None }).collect(),
            claimed: 0,
            next_req: 1,
            next_push: 1,
            evicting: (max_frames, max_bytes) != OUTBOXES[0],
            max_frames,
            max_bytes,
            write_queue,
            inflight: inflight as usize,
        }
    }

    fn conn(&self, pick: u8) -> Option<usize> {
        let c = (!self.conns.is_empty()).then(|| usize::from(pick) % self.conns.len());
        if slg_gateway_fuzz::trace() {
            eprintln!("  (conn {c:?})");
        }
        c
    }

    fn send(&mut self, c: usize, h: Header, body: &[u8]) {
        let id = self.conns[c].id;
        self.sim.send(id, &h, body);
    }

    /// What the client holds of player `p`'s stream: the most any of its
    /// live connections received (everything up to it). Connections gone
    /// may be of an earlier life of the player.
    fn holds(&self, p: usize) -> u64 {
        (0..self.conns.len())
            .filter(|&o| {
                let m = &self.conns[o];
                m.player == p && !m.kicked && self.sim.is_open(m.id)
            })
            .map(|o| self.held(o))
            .max()
            .unwrap_or(0)
    }

    /// What the client holds on connection `c` (everything up to it).
    fn held(&self, c: usize) -> u64 {
        self.conns[c].next.map_or(0, |n| n - 1)
    }

    fn ask(&mut self, c: usize, what: Asked) {
        let m = &mut self.conns[c];
        if m.asked.is_some() || m.next.is_some() || m.extra {
            m.extra = true;
        } else {
            m.asked = Some(what);
        }
    }

    fn event(&mut self, ev: Ev) {
        match ev {
            Ev::Connect { player, shard } => {
                let shard = usize::from(shard) % self.sim.cores.len();
                let id = self.sim.connect(shard);
                self.conns.push(Conn {
                    id,
                    player: usize::from(player) % PLAYERS.len(),
                    asked: None,
                    next: None,
                    extra: false,
                    resumes_sent: 0,
                    broke: false,
                    stalled_ever: false,
                    stalled: false,
                    kicked: false,
                    other: None,
                });
            }
            Ev::Login { conn } => {
                let Some(c) = self.conn(conn) else { return };
                let id = PLAYERS[self.conns[c].player];
                let r = self.req();
                self.send(c, header(Kind::Request, LOGIN, r, 0), &id.to_be_bytes());
                self.ask(c, Asked::Login(r));
            }
            Ev::Resume { conn, how } => {
                let Some(c) = self.conn(conn) else { return };
                let p = self.conns[c].player;
                let mut token = self.players[p].token.clone().unwrap_or_else(|| {
                    let mut t = vec![0u8; TOKEN_LEN];
                    t[..8].copy_from_slice(&PLAYERS[p].to_be_bytes());
                    t
                });
                let holds = self.holds(p);
                let last = match how {
                    Resume::Honest => holds,
                    Resume::FromZero => 0,
                    Resume::Beyond(k) => {
                        self.conns[c].broke = true;
                        holds + 1 + u64::from(k)
                    }
                    Resume::OtherToken => {
                        let q = (p + 1) % PLAYERS.len();
                        match &self.players[q].token {
                            Some(t) => {
                                token = t.clone();
                                self.conns[c].other = Some(q);
                                self.holds(q)
                            }
                            None => holds,
                        }
                    }
                    Resume::Flipped(bit) => {
                        let at = usize::from(bit) % (TOKEN_LEN * 8);
                        token[at / 8] ^= 1 << (at % 8);
                        holds
                    }
                };
                self.send(c, header(Kind::Resume, 0, 0, last), &token);
                self.claimed = self.claimed.max(last);
                let m = &mut self.conns[c];
                m.resumes_sent += 1;
                if m.resumes_sent >= 8 {
                    // Refused that often, the gateway cuts it off.
                    m.broke = true;
                }
                self.ask(c, Asked::Resume(last));
            }
            Ev::Request { conn, msg, len } => {
                let Some(c) = self.conn(conn) else { return };
                let msg = MSGS[usize::from(msg) % MSGS.len()];
                let r = self.req();
                let body = vec![b'x'; usize::from(len)];
                self.send(c, header(Kind::Request, msg, r, 0), &body);
                if msg == LOGIN {
                    // Its body names nobody: the backend refuses it.
                    self.ask(c, Asked::Login(r));
                }
            }
            Ev::Push { player, len } => {
                let id = PLAYERS[usize::from(player) % PLAYERS.len()];
                let n = self.next_push;
                self.next_push += 1;
                let mut body = format!("push {n}").into_bytes();
                body.resize(body.len() + usize::from(len), b'.');
                self.sim.push(id, 2001, &body);
            }
            Ev::Ack { conn, ping, lie } => {
                let Some(c) = self.conn(conn) else { return };
                let mut seq = self.held(c);
                if lie > 0 {
                    seq += u64::from(lie);
                    self.conns[c].broke = true;
                }
                let kind = if ping { Kind::Ping } else { Kind::Ack };
                self.send(c, header(kind, 0, 0, seq), &[]);
                self.claimed = self.claimed.max(seq);
            }
            Ev::Bye { conn } => {
                let Some(c) = self.conn(conn) else { return };
                self.send(c, header(Kind::Bye, 0, 0, 0), &[]);
            }
            Ev::HangUp { conn, lose } => {
                let Some(c) = self.conn(conn) else { return };
                self.sim.hang_up(self.conns[c].id, lose);
            }
            Ev::Stall { conn, on } => {
                let Some(c) = self.conn(conn) else { return };
                let m = &mut self.conns[c];
                m.stalled = on;
                m.stalled_ever |= on;
                self.sim.stall(m.id, on);
            }
            Ev::Garbage { conn, bytes, n } => {
                let Some(c) = self.conn(conn) else { return };
                let n = usize::from(n) % (bytes.len() + 1);
                self.sim.send_raw(self.conns[c].id, &bytes[..n]);
                self.conns[c].broke = true;
            }
            Ev::Answer { i, code, no_player } => {
                if self.sim.backend.is_empty() {
                    return;
                }
                let i = usize::from(i) % self.sim.backend.len();
                let f = &self.sim.backend[i].forward;
                let code = match code % 8 {
                    0..=4 => 0,
                    5 => 9,
                    6 => u16::from(code),
                    _ => 0x8000 | u16::from(code),
                };
                if f.asker.login {
                    // The player the body names, if it is one of ours.
                    let named = <[u8; 8]>::try_from(&f.body[..])
                        .ok()
                        .map(u64::from_be_bytes)
                        .filter(|id| PLAYERS.contains(id) && !no_player)
                        .unwrap_or(0);
                    self.sim.answer(i, code, named, b"ok");
                } else {
                    let body = f.body.clone();
                    self.sim.answer(i, code, 0, &body);
                }
            }
            Ev::TimeOut { i } => {
                if !self.sim.backend.is_empty() {
                    let i = usize::from(i) % self.sim.backend.len();
                    self.sim.time_out(i);
                }
            }
            Ev::BackendDown => self.sim.backend_down = !self.sim.backend_down,
            Ev::Advance { amount, unit } => {
                let n = u64::from(amount);
                let d = match unit % 4 {
                    0 | 1 => Duration::from_millis(n % 2000),
                    2 => Duration::from_millis(n * 10),
                    _ => Duration::from_secs(n % 400),
                };
                self.sim.advance(d);
            }
            Ev::Pump { conn, frames } => {
                let Some(c) = self.conn(conn) else { return };
                self.sim.pump(self.conns[c].id, 1 + usize::from(frames % 4));
            }
            Ev::Run => self.sim.run(),
        }
    }

    fn req(&mut self) -> u32 {
        self.next_req += 1;
        self.next_req
    }

    /// Every client reads what it was sent and checks it.
    fn receive(&mut self) {
        for c in 0..self.conns.len() {
            let id = self.conns[c].id;
            for f in self.sim.recv(id) {
                if slg_gateway_fuzz::trace() {
                    eprintln!(
                        "  conn {id} got {:?} {:#x} seq {} req {}",
                        f.header.kind, f.header.code, f.header.seq, f.header.req_id
                    );
                }
                if let Err(e) = self.on_frame(c, &f) {
                    panic!(
                        "conn {id} (player {}): {e}\nframe: {:?}",
                        PLAYERS[self.conns[c].player], f.header
                    );
                }
            }
        }
    }

    fn on_frame(&mut self, c: usize, f: &Frame) -> Result<(), String> {
        let evicting = self.evicting;
        let claimed = self.claimed;
        let m = &mut self.conns[c];
        let h = f.header;
        if m.kicked {
            return Err("a frame after KICK".into());
        }
        match h.kind {
            Kind::Session => {
                let r = h.seq;
                let gap = h.code == u16::from(Code::GAP);
                if h.code != 0 && !gap {
                    return Err(format!("SESSION with code {:#x}", h.code));
                }
                let (named, token) =
                    parse_session_body(&f.body).ok_or("a SESSION body too short")?;
                if m.other.is_some_and(|q| PLAYERS[q] == named) {
                    m.player = m.other.take().unwrap_or(m.player);
                }
                let player = PLAYERS[m.player];
                if named != player
                    || token.len() != TOKEN_LEN
                    || token_player(token) != Some(player)
                {
                    return Err(format!(
                        "SESSION for {named} with a token for {:?}",
                        token_player(token)
                    ));
                }
                if gap && !evicting {
                    return Err(format!(
                        "SESSION GAP R = {r} with an outbox that never evicts"
                    ));
                }
                if !gap && r > claimed {
                    return Err(format!(
                        "SESSION R = {r}, but the client acknowledged at most {claimed}"
                    ));
                }
                if !m.extra {
                    match m.asked {
                        None => return Err("SESSION with no login or resume out".into()),
                        Some(Asked::Resume(last)) if gap || r != last => {
                            return Err(format!(
                                "RESUME from {last} answered R = {r} (gap: {gap})"
                            ));
                        }
                        _ => {}
                    }
                }
                m.asked = None;
                m.next = Some(r + 1);
                let who = m.player;
                self.players[who].token = Some(token.to_vec());
            }
            Kind::Response | Kind::Push if h.seq != 0 => {
                let Some(next) = m.next else {
                    return Err(format!(
                        "sequenced {:?} seq {} before SESSION",
                        h.kind, h.seq
                    ));
                };
                if h.seq != next {
                    return Err(format!("seq {} where {next} was due", h.seq));
                }
                m.next = Some(next + 1);
            }
            Kind::Response | Kind::Push => {
                if m.next.is_some() {
                    return Err(format!("an unsequenced {:?} after SESSION", h.kind));
                }
                let refused = h.kind == Kind::Response && h.code != 0;
                if refused && !m.extra && m.asked == Some(Asked::Login(h.req_id)) {
                    // The login was refused: the connection is fresh again.
                    m.asked = None;
                }
            }
            Kind::Error => {
                let out = if m.extra {
                    m.resumes_sent > 0
                } else {
                    matches!(m.asked, Some(Asked::Resume(_)))
                };
                if !out {
                    return Err(format!("ERROR {:#x} with no RESUME out", h.code));
                }
                let ok = [Code::ResumeRejected, Code::ResumeGap, Code::RateLimited];
                if !ok.iter().any(|&k| h.code == u16::from(k)) {
                    return Err(format!("RESUME refused with {:#x}", h.code));
                }
                if !m.extra && matches!(m.asked, Some(Asked::Resume(_))) {
                    m.asked = None;
                }
            }
            Kind::Kick => {
                let code = Code::from_u16(h.code);
                let ok = match code {
                    Some(Code::Replaced | Code::Idle) => true,
                    Some(Code::ProtocolError) => m.broke,
                    Some(Code::SlowConsumer) => m.stalled_ever,
                    Some(Code::LoginTimeout) => m.next.is_none(),
                    _ => false,
                };
                if !ok {
                    return Err(format!("KICK {:#x}", h.code));
                }
                m.kicked = true;
            }
            Kind::Pong => {
                if let Some(next) = m.next {
                    if h.seq + 1 < next {
                        return Err(format!(
                            "PONG {} after seq {} was received",
                            h.seq,
                            next - 1
                        ));
                    }
                }
            }
            k => return Err(format!("{k:?} to a client")),
        }
        Ok(())
    }

    fn check_bounds(&self) {
        let sessions: usize = self.sim.cores.iter().map(|c| c.session_count()).sum();
        let players: usize = self.sim.cores.iter().map(|c| c.player_count()).sum();
        assert!(
            sessions <= self.conns.len(),
            "{sessions} sessions for {} connections",
            self.conns.len()
        );
        assert!(players <= PLAYERS.len(), "{players} players held");
        let waiting = self.sim.backend.len();
        let lives: usize = self
            .conns
            .iter()
            .map(|m| 1 + self.sim.handoffs(m.id) as usize)
            .sum();
        assert!(
            waiting <= lives * (self.inflight + 1),
            "{waiting} requests at the backend for {} connections",
            self.conns.len()
        );
        for &id in &PLAYERS {
            if let Some(i) = self.sim.home_core(id).player_info(id) {
                assert!(i.outbox <= self.max_frames && i.outbox_bytes <= self.max_bytes);
                assert!(i.acked <= i.seq && i.evicted_through <= i.seq);
            }
        }
        // The write queue: the limit, plus what a login or resume replays
        // (the outbox) and the frame that passed the limit.
        let bound = self.write_queue
            + self.max_bytes.min(self.max_frames * 2048)
            + 2 * (MAX_FRAME as usize + 4)
            + 64;
        for m in &self.conns {
            if self.sim.is_open(m.id) {
                let q = self.sim.unsent(m.id);
                assert!(
                    q <= bound,
                    "{q} bytes queued to conn {} (bound {bound})",
                    m.id
                );
            }
        }
    }

    /// Answer everything, let every connection read, and ask each player's
    /// live connection for a PONG: it holds every seq up to the last.
    fn settle(&mut self) {
        self.sim.backend_down = false;
        for c in 0..self.conns.len() {
            if self.conns[c].stalled {
                self.conns[c].stalled = false;
                self.sim.stall(self.conns[c].id, false);
            }
        }
        self.sim.answer_all();
        self.receive();
        for c in 0..self.conns.len() {
            let m = &self.conns[c];
            let id = PLAYERS[m.player];
            let home = self.sim.home(id);
            // (Garbage may have left half a frame that the PING would
            // complete into nonsense.)
            let bound = self.sim.is_open(m.id)
                && !m.kicked
                && !m.broke
                && self.sim.shard_of(m.id) == home
                && self.sim.home_core(id).player_session(id) == Some(self.sim.session_of(m.id))
                && !self.sim.home_core(id).is_closing(self.sim.session_of(m.id));
            let Some(next) = m.next.filter(|_| bound) else {
                continue;
            };
            let Some(info) = self.sim.home_core(id).player_info(id) else {
                continue;
            };
            self.send(c, header(Kind::Ping, 0, 0, next - 1), &[]);
            self.sim.run();
            let frames = self.sim.recv(self.conns[c].id);
            let pong = frames.iter().rev().find(|f| f.header.kind == Kind::Pong);
            let got = self.conns[c].next.map_or(0, |n| n - 1);
            for f in &frames {
                if let Err(e) = self.on_frame(c, f) {
                    panic!("settling conn {}: {e}", self.conns[c].id);
                }
            }
            let got = self.conns[c].next.map_or(got, |n| n - 1);
            let Some(pong) = pong else {
                panic!("player {id}: no PONG on its live connection");
            };
            {
                assert!(
                    pong.header.seq == got && info.seq <= got,
                    "player {id}: the live connection holds up to {got}, the gateway sent up to {} (PONG {})",
                    info.seq,
                    pong.header.seq
                );
            }
        }
    }
}

fn header(kind: Kind, msg_id: u32, req_id: u32, seq: u64) -> Header {
    Header {
        kind,
        flags: 0,
        code: 0,
        msg_id,
        req_id,
        seq,
    }
}
