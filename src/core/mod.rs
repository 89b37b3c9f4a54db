//! The shard's protocol core, with no I/O: the tables one shard owns
//! (sessions, players, players migrating away), every rule that changes
//! them, and what the shell must do as a result. It never reads a clock
//! (`now` is passed in), never draws randomness itself (an [`Entropy`] is
//! injected), never touches a socket and never spawns a task.
//!
//! Inputs are `handle_*` calls (a client frame, a backend answer, a timer,
//! a push or admin command); outputs are drained by the shell:
//! [`Core::poll_transmit`] (bytes to write to a session),
//! [`Core::poll_wake`] (a session's read loop or writer to wake),
//! [`Core::poll_forward`] (requests for a backend) and
//! [`Core::poll_cluster`] (what the cluster must hear).
//!
//! | file | job |
//! |---|---|
//! | `mod.rs` | the tables, output queues, kicks and closes |
//! | [`client`] | client frames: requests, acks, resume, login |
//! | [`answer`] | backend answers to the player or session, login answers |
//! | [`budget`] | memory budgets, `max_players`, the takeover guard |
//! | [`players`] | push, admin, timers, drain, snapshots, migration steps |
//! | [`stats`] | the counters, each declared once with its help text |

mod answer;
mod budget;
mod client;
mod entropy;
mod event;
mod lifecycle;
mod order;
mod output;
mod players;
mod stats;
mod upgrade;
pub use upgrade::Leaving;

pub use budget::Budgets;
pub use client::Step;
use output::Tx;
pub use output::{Flushed, Transmit, WriteNow};
pub use players::{PlayerInfo, PushCounts};

use crate::config::Config;
use crate::error::Error;
use crate::player::{Player, SECRET_LEN};
use crate::protocol::{encode, Code, Header, Kind};
use crate::router::{Route, Router};
use crate::session::{Arrival, CloseReason, Session, SessionId};
use bytes::Bytes;
use foldhash::{HashMap, HashMapExt};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Instant;

pub use entropy::{Entropy, SeededEntropy};
pub use event::{Event, PlayerEnd};
pub use lifecycle::Lifecycle;
pub use stats::Stats;
use stats::{add, bump};

/// With the `fault-injection` feature (the tests' builds only), a request
/// with this msg_id panics while the core handles it.
#[cfg(feature = "fault-injection")]
pub const FAULT_PANIC_MSG_ID: u32 = 0xFA17_0001;

/// What a backend (or the gateway on its behalf) answered.
#[derive(Debug, Clone)]
pub struct Answer {
    /// From the backend itself (false: the gateway answered for it).
    pub from_backend: bool,
    pub code: u16,
    pub msg_id: u32,
    pub player: u64,
    pub body: Bytes,
}

/// Whose request a backend answer belongs to (what the core put in a
/// [`Forward`], carried back with the answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asker {
    pub session: SessionId,
    /// The authenticated player it was sent for (0: none).
    pub player: u64,
    /// That player's life when it was sent.
    pub life: u64,
    /// The client's req_id and msg_id, echoed in the answer.
    pub req_id: u32,
    pub msg_id: u32,
    /// A login request: its answer may authenticate the session.
    pub login: bool,
    /// Its body's length (counted in the session's bytes in flight).
    pub bytes: u32,
    /// Its session had nothing else in flight (see the backends' reserve).
    pub light: bool,
    /// The order group of a `PerPlayer` route (see `order`): its answer
    /// lets the player's next request of the group go.
    pub lane: Option<u16>,
}

/// A request for a backend. If it cannot be sent, the shell says so with
/// [`Core::handle_not_sent`] before anything else happens.
#[derive(Debug, Clone)]
pub struct Forward {
    pub route: Route,
    pub header: Header,
    pub body: Bytes,
    pub asker: Asker,
    /// When it was read, if it waited in an order group before going: its
    /// deadline counts from then (None: from when it is sent).
    pub read_at: Option<Instant>,
}

/// What the cluster must hear (the shell's bridge carries it).
#[derive(Debug, Clone)]
pub enum ClusterOut {
    /// In a cluster, a player this gateway does not hold is claimed (and
    /// fetched) first: then [`Core::handle_claimed`].
    Claim { sid: SessionId, arrival: Arrival },
    /// The player ended here.
    Release { player: u64 },
    /// The player's state goes to gateway `to` (a takeover from there).
    Give {
        player: u64,
        to: String,
        image: Option<Vec<u8>>,
    },
    /// Gateway `to` may not have the player (`on_second_login: RejectNew`).
    Refuse { player: u64, to: String },
}

/// Which of a session's tasks to wake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wake {
    pub sid: SessionId,
    /// The read loop: look at [`Core::next_step`].
    pub reader: bool,
    /// The writer: look at [`Core::poll_transmit`].
    pub writer: bool,
}

/// A session as the core holds it.
struct Conn {
    session: Session,
    tx: Tx,
}

/// Everything one shard owns, and its rules.
pub struct Core {
    pub id: usize,
    /// Shards in the gateway (a player's home is `home_shard(id, count)`).
    pub count: usize,
    cfg: Rc<Config>,
    router: Rc<Router>,
    sessions: HashMap<SessionId, Conn>,
    /// Sessions not yet logged in, with when they were accepted (the
    /// `login_timeout` sweep); a session leaves it when the sweep finds it
    /// bound, or when it closes.
    unbound: HashMap<SessionId, Instant>,
    /// Sessions whose connection holds a frame begun and not whole: since
    /// when (the `frame_timeout` sweep), and the bytes held for it.
    partial: HashMap<SessionId, (Instant, usize)>,
    /// Their sum.
    partial_bytes: usize,
    /// Unsent output of open sessions at the last sweep.
    buffered: usize,
    /// The most outboxes and buffers held since the shell last asked.
    held_peak: usize,
    /// Bytes of all outboxes of this shard.
    outbox_meter: crate::player::outbox::Meter,
    budgets: Budgets,
    players: HashMap<u64, Player>,
    /// Players being migrated away, with the pushes that arrived meanwhile
    /// (they follow the player once it has moved).
    migrating: HashMap<u64, Vec<(u32, Bytes)>>,
    /// The order groups with a request at a backend, by (player, group):
    /// the requests waiting behind it (`order: PerPlayer`).
    lanes: HashMap<(u64, u16), order::Lane>,
    next_session: u64,
    /// Source of player lives (see `Player::life`).
    next_life: u64,
    lifecycle: Lifecycle,
    /// The time of the event being handled (every `handle_*` sets it).
    now: Instant,
    /// Part of a cluster: a player not held here is claimed first.
    clustered: bool,
    pub stats: Stats,
    pub metrics: crate::metrics::Metrics,
    entropy: Box<dyn Entropy>,
    wakes: VecDeque<Wake>,
    forwards: VecDeque<Forward>,
    cluster_out: VecDeque<ClusterOut>,
    events: VecDeque<Event>,
    /// A live upgrade hands every session over (see `upgrade.rs`).
    upgrading: bool,
    /// Players on their way between two processes in a live upgrade
    /// (see `upgrade::Transit`).
    transit: HashMap<u64, upgrade::Transit>,
}

impl Core {
    pub fn new(
        id: usize,
        count: usize,
        cfg: Rc<Config>,
        clustered: bool,
        entropy: Box<dyn Entropy>,
        now: Instant,
    ) -> Core {
        let budgets = Budgets::new(&cfg, count);
        Core {
            budgets,
            id,
            count,
            router: Rc::new(Router::new(&cfg)),
            cfg,
            sessions: HashMap::new(),
            unbound: HashMap::default(),
            partial: HashMap::default(),
            partial_bytes: 0,
            buffered: 0,
            held_peak: 0,
            outbox_meter: Default::default(),
            players: HashMap::new(),
            migrating: HashMap::new(),
            lanes: HashMap::new(),
            next_session: 1,
            next_life: 1,
            lifecycle: Lifecycle::Running,
            now,
            clustered,
            stats: Stats::default(),
            metrics: Default::default(),
            entropy,
            wakes: VecDeque::new(),
            forwards: VecDeque::new(),
            cluster_out: VecDeque::new(),
            events: VecDeque::new(),
            upgrading: false,
            transit: HashMap::new(),
        }
    }

    /// The config now (a reload may replace it between two calls).
    pub fn cfg(&self) -> Rc<Config> {
        self.cfg.clone()
    }

    /// The route table now.
    pub fn router(&self) -> Rc<Router> {
        self.router.clone()
    }

    /// A reloaded config: routes, limits and timeouts change; sessions,
    /// players and requests in flight stay.
    pub fn reload(&mut self, cfg: Rc<Config>, router: Rc<Router>) {
        self.metrics.reset_routes();
        self.budgets = Budgets::new(&cfg, self.count);
        self.cfg = cfg;
        self.router = router;
    }

    // ----- lifecycle -----------------------------------------------------

    pub fn lifecycle(&self) -> Lifecycle {
        self.lifecycle
    }

    /// A drain began (or is over): no new connections, pushes or requests.
    pub fn is_draining(&self) -> bool {
        self.lifecycle != Lifecycle::Running
    }

    /// The drain handed the players over: nothing may change them now.
    pub fn is_drained(&self) -> bool {
        self.lifecycle == Lifecycle::Drained
    }

    /// The drain must finish at once.
    pub fn is_forced(&self) -> bool {
        self.lifecycle == Lifecycle::Draining { forced: true }
    }

    /// Begin a drain (forced or not) or force the one going on; true when
    /// this call began it.
    pub fn drain(&mut self, force: bool) -> bool {
        let (next, began) = self.lifecycle.drain(force);
        self.lifecycle = next;
        began
    }

    /// The players went to the drain's report.
    pub fn drained(&mut self) {
        self.lifecycle = Lifecycle::Drained;
    }

    fn new_life(&mut self) -> u64 {
        let l = self.next_life;
        self.next_life += 1;
        l
    }

    fn new_secret(&mut self) -> [u8; SECRET_LEN] {
        let mut t = [0u8; SECRET_LEN];
        self.entropy.fill(&mut t);
        t
    }

    // ----- outputs -------------------------------------------------------

    /// The next session task to wake.
    pub fn poll_wake(&mut self) -> Option<Wake> {
        self.wakes.pop_front()
    }

    /// The next request for a backend.
    pub fn poll_forward(&mut self) -> Option<Forward> {
        self.forwards.pop_front()
    }

    /// The next message for the cluster.
    pub fn poll_cluster(&mut self) -> Option<ClusterOut> {
        self.cluster_out.pop_front()
    }

    /// Whether any output waits (the shell drains until none does).
    pub fn has_output(&self) -> bool {
        !(self.wakes.is_empty()
            && self.forwards.is_empty()
            && self.cluster_out.is_empty()
            && self.events.is_empty())
    }

    fn wake(&mut self, sid: SessionId, reader: bool, writer: bool) {
        if let Some(w) = self.wakes.back_mut().filter(|w| w.sid == sid) {
            w.reader |= reader;
            w.writer |= writer;
            return;
        }
        self.wakes.push_back(Wake {
            sid,
            reader,
            writer,
        });
    }

    // ----- the session table -------------------------------------------

    /// Register a new session on this shard.
    pub fn add_session(&mut self, now: Instant) -> SessionId {
        self.now = now;
        let n = self.next_session;
        self.next_session += 1;
        let sid = ((self.id as u64) << 48) | n;
        let session = Session::new(now, self.cfg.limits.rate);
        self.unbound.insert(sid, now);
        self.sessions.insert(
            sid,
            Conn {
                session,
                tx: Tx::default(),
            },
        );
        sid
    }

    /// Forget a session whose connection is gone (or moved). Its player, if
    /// bound to it, stays without a session and starts to linger. Returns
    /// the player it was bound to and why it closed.
    pub fn remove_session(&mut self, sid: SessionId, now: Instant) -> (Option<u64>, CloseReason) {
        self.now = now;
        self.unbound.remove(&sid);
        self.forget_partial(sid);
        let Some(c) = self.sessions.remove(&sid) else {
            return (None, CloseReason::Open);
        };
        let player = c.session.player();
        if let Some(p) = player {
            self.detach(p, sid);
        }
        (player, c.session.close_reason())
    }

    fn detach(&mut self, player: u64, sid: SessionId) {
        let now = self.now;
        if let Some(p) = self.players.get_mut(&player) {
            p.detach(sid, now);
        }
    }

    /// Whether `sid` is closing (or gone).
    pub fn is_closing(&self, sid: SessionId) -> bool {
        self.sessions
            .get(&sid)
            .is_none_or(|c| c.session.is_closing())
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn player_count(&self) -> usize {
        self.players.len()
    }

    /// The player `sid` is bound to.
    pub fn session_player(&self, sid: SessionId) -> Option<u64> {
        self.sessions.get(&sid).and_then(|c| c.session.player())
    }

    /// The session of `player`, if it has one here.
    pub fn player_session(&self, player: u64) -> Option<SessionId> {
        self.players.get(&player).and_then(|p| p.session)
    }

    // ----- closing -------------------------------------------------------

    /// `KICK code` to `sid` (the shell's own reasons: shutdown, idle).
    pub fn handle_kick(&mut self, sid: SessionId, code: Code, now: Instant) {
        self.now = now;
        self.kick(sid, code);
    }

    /// Close `sid` without a KICK (end of stream, read error).
    pub fn handle_close(&mut self, sid: SessionId, reason: CloseReason, now: Instant) {
        self.now = now;
        self.close(sid, reason);
    }

    /// A frame that broke the protocol arrived on `sid` (undecodable).
    pub fn handle_protocol_error(
        &mut self,
        sid: SessionId,
        err: crate::error::Error,
        now: Instant,
    ) {
        self.now = now;
        self.protocol_error(sid, err);
    }

    /// Send `KICK code` and close the session after its queued output (for
    /// a slow consumer, instead of it: its frames stay in the outbox).
    fn kick(&mut self, sid: SessionId, code: Code) {
        let player = {
            let Some(c) = self.sessions.get_mut(&sid) else {
                return;
            };
            let player = c.session.player();
            if !c.session.close(CloseReason::Kick(code)) {
                return;
            }
            self.metrics.kick(code.into());
            if code == Code::SlowConsumer {
                // Drop what is queued, but not the end of a frame already
                // partly written: the client must see whole frames.
                let keep = c.tx.head_rest.min(c.tx.buf.len());
                c.tx.pushed_total -= (c.tx.buf.len() - keep) as u64;
                c.tx.buf.truncate(keep);
            }
            let mut h = Header::new(Kind::Kick);
            h.code = code.into();
            let before = c.tx.buf.len();
            encode(&mut c.tx.buf, &h, &[]);
            c.tx.pushed_total += (c.tx.buf.len() - before) as u64;
            player
        };
        self.close_tx(sid);
        self.event(Event::Kicked { sid, player, code });
        if let Some(p) = player {
            self.detach(p, sid);
        }
    }

    /// Handling an event of `sid` panicked (the shell caught it): close the
    /// session without a KICK. Its player, if any, keeps its outbox and may
    /// resume; what the panic left half done is not trusted further.
    pub fn handle_panic(&mut self, sid: SessionId, now: Instant) {
        self.now = now;
        bump(&self.stats.session_panics);
        self.event(Event::Panicked { sid });
        self.close(sid, CloseReason::Panic);
    }

    /// Close without a KICK (BYE, end of stream, read error).
    fn close(&mut self, sid: SessionId, reason: CloseReason) {
        let Some(c) = self.sessions.get_mut(&sid) else {
            return;
        };
        let player = c.session.player();
        c.session.close(reason);
        self.close_tx(sid);
        if let Some(p) = player {
            self.detach(p, sid);
        }
    }

    /// A frame that broke the protocol arrived on `sid`.
    fn protocol_error(&mut self, sid: SessionId, error: Error) {
        bump(&self.stats.protocol_errors);
        self.failed(sid, None, error);
        self.kick(sid, Code::ProtocolError);
    }

    /// A failure at the core's border: counted by origin and code, logged.
    fn failed(&mut self, sid: SessionId, req_id: Option<u32>, error: Error) {
        self.metrics.error(error.origin, error.code.into());
        self.event(Event::Failed { sid, req_id, error });
    }

    /// Kick every session (the gateway is stopping).
    pub fn kick_all(&mut self, code: Code, now: Instant) {
        self.now = now;
        self.kick_where(code, |_| true);
    }
}
