//! One load session: a connection (and the ones after it), its player's
//! stream checked by [`StreamCheck`], its requests matched by [`Ledger`].
//! Scenarios drive it; every frame that arrives goes through
//! [`Sess::on_frame`], so no scenario can forget a check.

use crate::check::{sequenced, Answer, Ledger, StreamCheck, LOST};
use crate::options::Target;
use crate::scenario::Shared;
use crate::stats::Stats;
use slg_gateway::client::asynch::AsyncClient;
use slg_gateway::client::{code_name, ClientError};
use slg_gateway::protocol::{parse_session_body, Code, Frame, Header, Kind};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A session acknowledges after this many sequenced frames.
pub const ACK_EVERY: u64 = 32;
/// Longest wait for a login's answer.
const LOGIN_WAIT: Duration = Duration::from_secs(30);

/// What a frame meant to the scenario.
pub enum Event {
    /// An answer to one of our requests (its connection, and its code).
    Answered { conn: u32, code: u16 },
    /// A PUSH (already seq-checked).
    Push(Frame),
    /// A PONG to the PING sent at this time.
    Pong { sent_at: Instant },
    /// Something the scenario need not see (a violation is recorded).
    Other,
    /// The gateway kicked us: the connection is over (error recorded).
    Kicked,
}

/// One session of a scenario.
pub struct Sess<'a> {
    pub sh: &'a Shared,
    /// The session's number in the run (player `player_base + i`).
    pub i: usize,
    pub c: AsyncClient,
    pub check: StreamCheck,
    pub ledger: Ledger,
    /// Which connection of the session this is (0, 1, ...).
    pub conn: u32,
    pub token: Vec<u8>,
    last_ack: u64,
    /// PINGs sent and not answered: (seq carried, when).
    pings: VecDeque<(u64, Instant)>,
}

fn short(e: &ClientError) -> String {
    match e {
        ClientError::Io(io) => format!("{:?}", io.kind()),
        other => other.to_string(),
    }
}

/// The error of a receive, recorded; a seq error cannot come (the client's
/// own check is off: [`StreamCheck`] does it).
pub fn record_error(st: &mut Stats, what: &str, e: &ClientError) {
    st.error(format!("{what}: {}", short(e)));
}

impl<'a> Sess<'a> {
    /// Connect (from the session's source address).
    pub async fn connect(sh: &Shared, i: usize, st: &mut Stats) -> Option<AsyncClient> {
        let source =
            (!sh.opts.sources.is_empty()).then(|| sh.opts.sources[i % sh.opts.sources.len()]);
        match AsyncClient::connect_via(sh.opts.addr, source, &sh.connect).await {
            Ok(mut c) => {
                c.check_seqs = false;
                Some(c)
            }
            Err(e) => {
                record_error(st, "connect", &e);
                None
            }
        }
    }

    /// Connect and (through the gateway) log in as `player_base + i`.
    pub async fn open(sh: &'a Shared, i: usize, st: &mut Stats) -> Option<Sess<'a>> {
        let c = Sess::connect(sh, i, st).await?;
        let mut s = Sess {
            sh,
            i,
            c,
            check: StreamCheck::new(),
            ledger: Ledger::new(i, sh.opts.body),
            conn: 0,
            token: Vec::new(),
            last_ack: 0,
            pings: VecDeque::new(),
        };
        if sh.opts.target == Target::Gateway && !s.login(st).await {
            return None;
        }
        Some(s)
    }

    pub fn player(&self) -> u64 {
        self.sh.opts.player_base + self.i as u64
    }

    /// Log in on the current connection: `SESSION` for our player with a
    /// token and a resume point the stream allows, the replays after it,
    /// then the login `RESPONSE`, all seq-checked. False: it failed (an
    /// error or a violation is recorded).
    pub async fn login(&mut self, st: &mut Stats) -> bool {
        let player = self.player();
        let req_id = self
            .c
            .send_request(self.sh.opts.login_msg, player.to_string().as_bytes());
        let give_up = Instant::now() + LOGIN_WAIT;
        let mut session = false;
        loop {
            let f = match self.c.recv_before(Some(give_up)).await {
                Ok(Some(f)) => f,
                Ok(None) => {
                    st.error("login: no answer");
                    return false;
                }
                Err(e) => {
                    record_error(st, "login", &e);
                    return false;
                }
            };
            match f.header.kind {
                Kind::Session => {
                    let Some((who, token)) = parse_session_body(&f.body) else {
                        st.violation(format!("session {}: SESSION body unreadable", self.i));
                        return false;
                    };
                    if who != player || token.is_empty() {
                        st.violation(format!(
                            "session {}: SESSION for player {who} (token {} bytes), logged in as {player}",
                            self.i,
                            token.len()
                        ));
                    }
                    self.token = token.to_vec();
                    let gap = f.header.code == u16::from(Code::GAP);
                    if let Err(v) =
                        self.check
                            .logged_in(f.header.seq, gap, self.sh.opts.expect_eviction)
                    {
                        st.violation(format!("session {}: {v}", self.i));
                    }
                    self.last_ack = self.check.last();
                    session = true;
                }
                Kind::Response if f.header.req_id == req_id => {
                    if f.header.code != 0 {
                        st.error(format!("login refused: {}", code_name(f.header.code)));
                        return false;
                    }
                    if !session {
                        st.violation(format!(
                            "session {}: login answered before its SESSION",
                            self.i
                        ));
                        return false;
                    }
                    self.seq_check(&f, st);
                    st.logins += 1;
                    return true;
                }
                Kind::Kick => {
                    st.error(format!("login: kicked {}", code_name(f.header.code)));
                    return false;
                }
                // Replays (at-least-once) of what the player had before:
                // answers to our own requests are matched, the rest (an
                // earlier life's, or an earlier run's) only seq-checked.
                Kind::Response if !self.ledger.outstanding.contains_key(&f.header.req_id) => {
                    self.seq_check(&f, st);
                }
                Kind::Push => self.seq_check(&f, st),
                _ => {
                    self.on_frame(f, st);
                }
            }
        }
    }

    fn seq_check(&mut self, f: &Frame, st: &mut Stats) {
        if self.sh.opts.target == Target::Gateway && sequenced(f) {
            if let Err(v) = self.check.frame(f) {
                st.violation(format!("session {}: {v}", self.i));
            }
            if self.check.last() >= self.last_ack + ACK_EVERY {
                // Acknowledge as a real client does, so the gateway frees
                // its outbox.
                self.c.last_seq = self.check.last();
                self.c.ack();
                self.last_ack = self.check.last();
            }
        }
    }

    /// Send one request (a recognisable body) on the current connection.
    pub fn request(&mut self, st: &mut Stats) -> u32 {
        let msg_id = self.sh.opts.msg_id;
        let want = self.c.next_req_id();
        let req_id = self.c.send_request(msg_id, self.ledger.body(want));
        debug_assert_eq!(req_id, want);
        self.ledger.sent(req_id, msg_id, self.conn);
        st.sent += 1;
        req_id
    }

    /// PING with the last seq received in order; when it was sent (its
    /// PONG's [`Event::Pong`] carries the same instant).
    pub fn ping(&mut self) -> Instant {
        self.c.last_seq = self.check.last();
        self.c.ping();
        let at = Instant::now();
        self.pings.push_back((self.check.last(), at));
        at
    }

    /// PINGs not yet answered.
    pub fn pings_outstanding(&self) -> usize {
        self.pings.len()
    }

    /// Check one frame and say what it was.
    pub fn on_frame(&mut self, f: Frame, st: &mut Stats) -> Event {
        self.seq_check(&f, st);
        match f.header.kind {
            Kind::Response => match self.ledger.answer(&f) {
                Answer::Matched { us, code } => {
                    st.latency_us(us);
                    st.answered += 1;
                    st.code(code);
                    self.sh.live.answered();
                    // The ledger removed it; its connection was recorded.
                    Event::Answered {
                        conn: self.ledger.last_conn,
                        code,
                    }
                }
                Answer::Violation(v) => {
                    st.violation(format!("session {}: {v}", self.i));
                    Event::Other
                }
            },
            Kind::Push => Event::Push(f),
            Kind::Pong => match self.pings.pop_front() {
                Some((seq, sent_at)) => {
                    self.check.confirmed_ack(seq);
                    Event::Pong { sent_at }
                }
                None => {
                    st.violation(format!("session {}: a PONG no PING asked for", self.i));
                    Event::Other
                }
            },
            Kind::Kick => {
                st.error(format!("kicked {}", code_name(f.header.code)));
                Event::Kicked
            }
            Kind::Error => {
                st.error(format!("ERROR {}", code_name(f.header.code)));
                Event::Other
            }
            other => {
                st.violation(format!(
                    "session {}: unexpected {} frame",
                    self.i,
                    other.name()
                ));
                Event::Other
            }
        }
    }

    /// The connection is over (dropped by us, or the run ended): a gap
    /// still open in the stream is a loss.
    pub fn end_connection(&mut self, st: &mut Stats) {
        if let Err(v) = self.check.end_connection() {
            st.violation(format!("session {}: {v}", self.i));
        }
        self.pings.clear();
    }

    /// Every request still outstanding is a violation.
    pub fn unanswered(&mut self, st: &mut Stats) {
        let mut reqs: Vec<u32> = self.ledger.outstanding.keys().copied().collect();
        reqs.sort_unstable();
        for req in reqs {
            st.violation(format!(
                "session {}: req {req} never answered ({LOST})",
                self.i
            ));
        }
    }

    /// Log out (BYE) and close.
    pub async fn bye(self) {
        self.c.send(&Header::new(Kind::Bye), &[]);
        self.c.close().await;
    }
}
