//! One client connection's rules: its state (connected, authenticating,
//! binding, authenticated, closing), what each request is allowed to do in
//! it (auth, login gate, rate, in-flight bound), the login or resume it
//! waits to complete, and its liveness. Plain data driven by events with
//! `now` passed in, tested without sockets; the glommio tasks that move
//! bytes live in the shell (`shard::conn`).

use crate::config::{Limits, RateLimit};
use crate::protocol::Code;
use crate::router::Route;
use bytes::Bytes;
use std::time::Instant;

/// A session's id, unique in the process: the shard index in the top 16
/// bits, a per-shard counter below.
pub type SessionId = u64;

/// Why a session closed: the `reason` of its `close` log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Open (not closing yet).
    Open,
    /// The gateway sent `KICK code`.
    Kick(Code),
    /// The client said BYE.
    Bye,
    /// The client closed its end.
    PeerClosed,
    /// Reading from the connection failed.
    ReadFailed,
    /// Writing to the connection failed.
    WriteFailed,
    /// Its player moved to another gateway (after `REDIRECT`).
    Redirect,
    /// Handling one of its events panicked (an internal fault).
    Panic,
}

impl CloseReason {
    /// The label in the log line.
    pub fn name(self) -> &'static str {
        match self {
            CloseReason::Open => "open",
            CloseReason::Kick(code) => code.name(),
            CloseReason::Bye => "BYE",
            CloseReason::PeerClosed => "peer closed",
            CloseReason::ReadFailed => "read error",
            CloseReason::WriteFailed => "write error",
            CloseReason::Redirect => "REDIRECT",
            CloseReason::Panic => "panic",
        }
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The lifecycle of a session (DESIGN.md, session row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Connected, not logged in.
    Connected,
    /// A login request is with the backend.
    Authenticating,
    /// The backend accepted the login; the session waits for its other
    /// requests to finish, then is bound to the player on its home shard.
    Binding { player: u64 },
    /// A RESUME is being served (on the player's home shard).
    Resuming,
    /// Bound to a player.
    Authenticated { player: u64 },
    /// Going away: no new work.
    Closing,
}

/// What to do with a client request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Answer at once with this gateway code.
    Reply(Code),
    /// Send it to the route's service; `login` marks a login request.
    Forward { login: bool },
    /// Drop it (the session is closing).
    Ignore,
}

/// The login answer that completes a login on the home shard.
#[derive(Debug, Clone)]
pub struct LoginReply {
    pub req_id: u32,
    pub msg_id: u32,
    pub code: u16,
    pub body: Bytes,
}

/// Why a session goes to a player's home shard.
#[derive(Debug, Clone)]
pub enum Arrival {
    /// The backend accepted a login for `player`.
    Login { player: u64, reply: LoginReply },
    /// The client asked to resume `player` from seq `last` with `token`;
    /// `failures` resumes already failed on this connection.
    Resume {
        player: u64,
        token: Bytes,
        last: u64,
        failures: u8,
    },
}

impl Arrival {
    pub fn player(&self) -> u64 {
        match self {
            Arrival::Login { player, .. } | Arrival::Resume { player, .. } => *player,
        }
    }
}

/// What the read loop of a session must do next.
#[derive(Debug)]
pub enum Next {
    /// Go on reading.
    Read,
    /// Stop reading and wait: a login or resume waits for the session's
    /// other requests to finish, or its player is migrating.
    Pause,
    /// Close the connection after the queued output.
    Close,
    /// Complete this login or resume (on the player's home shard).
    Arrive(Arrival),
}

/// The per-session token bucket of `limits.rate`.
#[derive(Debug, Clone, Copy)]
pub struct RateBucket {
    /// Requests that may go now (fractions accrue).
    tokens: f64,
    /// When `tokens` was last brought up to date.
    refilled_at: Instant,
}

impl RateBucket {
    /// A full bucket (`burst` tokens; 0 without a rate limit).
    pub fn full(rate: Option<RateLimit>, now: Instant) -> RateBucket {
        RateBucket {
            tokens: rate.map_or(0.0, |r| r.burst),
            refilled_at: now,
        }
    }

    /// Whether the bucket would be full at `now` (nothing to remember).
    pub fn is_full(&self, rate: RateLimit, now: Instant) -> bool {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens + elapsed * rate.per_second >= rate.burst
    }

    /// Take one token if there is one.
    pub fn take(&mut self, rate: RateLimit, now: Instant) -> bool {
        let tokens = (self.tokens
            + now
                .saturating_duration_since(self.refilled_at)
                .as_secs_f64()
                * rate.per_second)
            .min(rate.burst);
        self.refilled_at = now;
        if tokens < 1.0 {
            self.tokens = tokens;
            false
        } else {
            self.tokens = tokens - 1.0;
            true
        }
    }
}

/// The rules of one session.
#[derive(Debug, Clone)]
pub struct Session {
    state: State,
    /// Requests of this session at a backend, login excluded.
    inflight: u32,
    /// Bytes of the requests in flight.
    inflight_bytes: usize,
    /// A login or resume waiting for `inflight` to reach 0.
    /// Boxed: set only between a login's answer and its hand-off, and
    /// 64 bytes inline in every session.
    arrival: Option<Box<Arrival>>,
    /// Resumes refused on this connection (it moves with a hand-off: a
    /// client that keeps guessing is cut off).
    resume_failures: u8,
    /// Its player is migrating: read nothing more until it is done.
    held: bool,
    /// The per-session rate limit.
    bucket: RateBucket,
    /// Why the session is closing, for the log line of its end.
    close_reason: CloseReason,
    /// Stream offset where the last outbox replay ends: replayed bytes not
    /// yet written do not count against `write_queue_bytes` (they are
    /// bounded by the outbox limits already).
    replay_end: u64,
    /// When the client last sent anything (the idle kick).
    last_rx: Instant,
}

/// Refused resumes one connection may make before it is closed.
pub const MAX_RESUME_FAILURES: u8 = 8;

impl Session {
    /// A new connection, not logged in.
    pub fn new(now: Instant, rate: Option<RateLimit>) -> Session {
        Session {
            state: State::Connected,
            inflight: 0,
            inflight_bytes: 0,
            arrival: None,
            resume_failures: 0,
            held: false,
            bucket: RateBucket::full(rate, now),
            close_reason: CloseReason::Open,
            replay_end: 0,
            last_rx: now,
        }
    }

    /// A connection that arrives from another shard to complete `arrival`.
    pub fn arriving(arrival: &Arrival, now: Instant, rate: Option<RateLimit>) -> Session {
        let mut s = Session::new(now, rate);
        match arrival {
            Arrival::Login { player, .. } => s.state = State::Binding { player: *player },
            Arrival::Resume { failures, .. } => {
                s.state = State::Resuming;
                s.resume_failures = *failures;
            }
        }
        s
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// The player this session is bound to.
    pub fn player(&self) -> Option<u64> {
        match self.state {
            State::Authenticated { player } => Some(player),
            _ => None,
        }
    }

    /// Requests of this session at a backend (login excluded).
    pub fn inflight(&self) -> u32 {
        self.inflight
    }

    /// Why it is closing (`Open` while open).
    pub fn close_reason(&self) -> CloseReason {
        self.close_reason
    }

    /// Bytes arrived from the client.
    pub fn touch(&mut self, now: Instant) {
        self.last_rx = now;
    }

    /// Open, and nothing received since before `cutoff`.
    pub fn quiet_since(&self, cutoff: Instant) -> bool {
        !self.is_closing() && self.last_rx < cutoff
    }

    /// Open, and nothing received after `t` (a drain's quiet check).
    pub fn quiet_after(&self, t: Instant) -> bool {
        !self.is_closing() && self.last_rx <= t
    }

    /// Decide what a request with this route (None: no route) does.
    pub fn on_request(&mut self, route: Option<&Route>) -> Decision {
        if matches!(self.state, State::Closing) {
            return Decision::Ignore;
        }
        let Some(route) = route else {
            return Decision::Reply(Code::NoRoute);
        };
        if route.login {
            return match self.state {
                State::Connected => {
                    self.state = State::Authenticating;
                    Decision::Forward { login: true }
                }
                State::Authenticating | State::Binding { .. } | State::Resuming => {
                    Decision::Reply(Code::LoginInProgress)
                }
                State::Authenticated { .. } => Decision::Reply(Code::AlreadyAuthenticated),
                State::Closing => Decision::Ignore,
            };
        }
        if route.auth && self.player().is_none() {
            return Decision::Reply(Code::NotAuthenticated);
        }
        Decision::Forward { login: false }
    }

    /// The whole pipeline of a request: state and route ([`on_request`]),
    /// then the rate limit (`RATE_LIMITED`), then the in-flight bound
    /// (`OVERLOADED`; a login is not bounded by it).
    ///
    /// [`on_request`]: Session::on_request
    pub fn admit(&mut self, route: Option<&Route>, limits: &Limits, now: Instant) -> Decision {
        let decision = self.on_request(route);
        let Decision::Forward { login } = decision else {
            return decision;
        };
        if let Some(rate) = limits.rate {
            if !self.bucket.take(rate, now) {
                if login {
                    self.on_login_result(None);
                }
                return Decision::Reply(Code::RateLimited);
            }
        }
        if !login && self.inflight >= limits.session_inflight {
            return Decision::Reply(Code::Overloaded);
        }
        decision
    }

    /// A request [`admit`](Session::admit) let through went to a backend.
    pub fn forwarded(&mut self, login: bool) {
        if !login {
            self.inflight += 1;
        }
    }

    /// Bytes of request bodies of this session at backends.
    pub fn inflight_bytes(&self) -> usize {
        self.inflight_bytes
    }

    /// A request of `bytes` went to a backend, or (`add` false) is back.
    pub fn count_inflight_bytes(&mut self, bytes: usize, add: bool) {
        if add {
            self.inflight_bytes += bytes;
        } else {
            self.inflight_bytes = self.inflight_bytes.saturating_sub(bytes);
        }
    }

    /// A request [`forwarded`](Session::forwarded) could not be sent after
    /// all (the gateway answers it): it is not in flight.
    pub fn not_forwarded(&mut self, login: bool) {
        if login {
            self.on_login_result(None);
        } else {
            self.inflight = self.inflight.saturating_sub(1);
        }
    }

    /// A request of this session was answered. True: a login or resume
    /// waited for it and may now go on (wake the read loop).
    pub fn answered(&mut self) -> bool {
        self.inflight = self.inflight.saturating_sub(1);
        self.inflight == 0 && self.arrival.is_some()
    }

    /// The login's answer: `Some(player)` accepted, `None` rejected (or it
    /// failed). Returns whether the session now waits to be bound.
    pub fn on_login_result(&mut self, accepted: Option<u64>) -> bool {
        if self.state != State::Authenticating {
            return false;
        }
        match accepted {
            Some(player) => {
                self.state = State::Binding { player };
                true
            }
            None => {
                self.state = State::Connected;
                false
            }
        }
    }

    /// The backend accepted the login: once the session's other requests
    /// are done, `arrival` completes it. False: the session was not
    /// logging in (a late answer), nothing changes.
    pub fn login_accepted(&mut self, arrival: Arrival) -> bool {
        let binding = self.on_login_result(Some(arrival.player()));
        if binding {
            self.arrival = Some(Box::new(arrival));
        }
        binding
    }

    /// A RESUME arrived. `Forward` = serve it (the session is now
    /// resuming); `Reply` = answer `ERROR` with the code; `Ignore` = closing.
    pub fn on_resume(&mut self) -> Decision {
        match self.state {
            State::Connected => {
                self.state = State::Resuming;
                Decision::Forward { login: false }
            }
            State::Closing => Decision::Ignore,
            _ => Decision::Reply(Code::ResumeRejected),
        }
    }

    /// A RESUME with `token` (for `player`) from seq `last`: served once
    /// the session's other requests are done. `Reply`: refused at once
    /// (`player` None: the token names nobody).
    pub fn resume(&mut self, player: Option<u64>, token: Bytes, last: u64) -> Decision {
        let d = self.on_resume();
        if d != (Decision::Forward { login: false }) {
            return d;
        }
        match player {
            Some(player) => {
                self.arrival = Some(Box::new(Arrival::Resume {
                    player,
                    token,
                    last,
                    failures: self.resume_failures,
                }));
                d
            }
            None => {
                self.resume_failed();
                Decision::Reply(Code::ResumeRejected)
            }
        }
    }

    /// The resume failed: back to logged out (the client may log in).
    pub fn resume_failed(&mut self) {
        if self.state == State::Resuming {
            self.state = State::Connected;
        }
    }

    /// One more resume was refused on this connection; how many now.
    pub fn resume_refused(&mut self) -> u8 {
        self.resume_failures = self.resume_failures.saturating_add(1);
        self.resume_failures
    }

    /// A login accepted by the backend could not be completed (the player
    /// could not be had): back to logged out.
    pub fn binding_failed(&mut self) {
        if matches!(self.state, State::Binding { .. } | State::Resuming) {
            self.state = State::Connected;
        }
    }

    /// Refused resumes on this connection so far.
    pub fn resume_failures(&self) -> u8 {
        self.resume_failures
    }

    pub fn set_resume_failures(&mut self, n: u8) {
        self.resume_failures = n;
    }

    /// How long the client has sent nothing.
    pub fn quiet_for(&self, now: Instant) -> std::time::Duration {
        now.saturating_duration_since(self.last_rx)
    }

    /// The client last sent something `ago` before `now`.
    pub fn quiet_since_ago(&mut self, now: Instant, ago: std::time::Duration) {
        self.last_rx = now.checked_sub(ago).unwrap_or(now);
    }

    /// Bind to `player` (on its home shard).
    pub fn bind(&mut self, player: u64) {
        if self.state != State::Closing {
            self.state = State::Authenticated { player };
        }
    }

    /// The outbox replay queued at bind ends at this stream offset.
    pub fn replayed_until(&mut self, end: u64) {
        self.replay_end = end;
    }

    /// Of `queued` unsent bytes, those that count against
    /// `write_queue_bytes` (`written`: bytes written so far).
    pub fn counted_queue(&self, queued: usize, written: u64) -> usize {
        queued.saturating_sub(self.replay_end.saturating_sub(written) as usize)
    }

    /// Its player is migrating (true) or no longer (false).
    pub fn hold(&mut self, held: bool) {
        self.held = held;
    }

    /// What the read loop must do now.
    pub fn next_step(&mut self) -> Next {
        if self.is_closing() {
            return Next::Close;
        }
        if self.held || (self.arrival.is_some() && self.inflight > 0) {
            return Next::Pause;
        }
        match self.arrival.take() {
            Some(a) => Next::Arrive(*a),
            None => Next::Read,
        }
    }

    /// Start closing for `reason`; returns false if it already was.
    pub fn close(&mut self, reason: CloseReason) -> bool {
        let was = self.state != State::Closing;
        self.state = State::Closing;
        self.held = false;
        if was {
            self.close_reason = reason;
        }
        was
    }

    pub fn is_closing(&self) -> bool {
        self.state == State::Closing
    }
}

#[cfg(test)]
mod tests;
