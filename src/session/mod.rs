//! One client connection's rules: its state (connected, authenticating,
//! binding, authenticated, closing) and what each request is allowed to do
//! in it. Plain data driven by events, tested without sockets; the glommio
//! tasks that move bytes live in [`conn`].

pub mod conn;

use crate::protocol::Code;
use crate::router::Route;

/// A session's id, unique in the process: the shard index in the top 16
/// bits, a per-shard counter below.
pub type SessionId = u64;

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

/// The rules of one session.
#[derive(Debug, Clone)]
pub struct Session {
    state: State,
}

impl Default for Session {
    fn default() -> Self {
        Session::new()
    }
}

impl Session {
    pub fn new() -> Session {
        Session {
            state: State::Connected,
        }
    }

    /// A session that arrives from another shard with its login accepted.
    pub fn binding(player: u64) -> Session {
        Session {
            state: State::Binding { player },
        }
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

    /// A session that arrives from another shard to resume.
    pub fn resuming() -> Session {
        Session {
            state: State::Resuming,
        }
    }

    /// The resume failed: back to logged out (the client may log in).
    pub fn resume_failed(&mut self) {
        if self.state == State::Resuming {
            self.state = State::Connected;
        }
    }

    /// A login accepted by the backend could not be completed (the player
    /// could not be had): back to logged out.
    pub fn binding_failed(&mut self) {
        if matches!(self.state, State::Binding { .. } | State::Resuming) {
            self.state = State::Connected;
        }
    }

    /// Bind to `player` (on its home shard).
    pub fn bind(&mut self, player: u64) {
        if self.state != State::Closing {
            self.state = State::Authenticated { player };
        }
    }

    /// Start closing; returns false if it already was.
    pub fn close(&mut self) -> bool {
        let was = self.state != State::Closing;
        self.state = State::Closing;
        was
    }

    pub fn is_closing(&self) -> bool {
        self.state == State::Closing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Balance;

    fn route(auth: bool, login: bool) -> Route {
        Route {
            first: 1,
            last: 1,
            service: 0,
            auth,
            login,
            balance: Balance::RoundRobin,
            idempotent: false,
        }
    }

    #[test]
    fn login_lifecycle() {
        let (login, game, open) = (route(false, true), route(true, false), route(false, false));
        let mut s = Session::new();
        assert_eq!(s.on_request(None), Decision::Reply(Code::NoRoute));
        assert_eq!(
            s.on_request(Some(&game)),
            Decision::Reply(Code::NotAuthenticated)
        );
        assert_eq!(
            s.on_request(Some(&open)),
            Decision::Forward { login: false }
        );
        assert_eq!(
            s.on_request(Some(&login)),
            Decision::Forward { login: true }
        );
        assert_eq!(s.state(), State::Authenticating);
        assert_eq!(
            s.on_request(Some(&login)),
            Decision::Reply(Code::LoginInProgress)
        );
        assert_eq!(
            s.on_request(Some(&game)),
            Decision::Reply(Code::NotAuthenticated)
        );
        // Rejected: usable again.
        assert!(!s.on_login_result(None));
        assert_eq!(s.state(), State::Connected);
        assert_eq!(
            s.on_request(Some(&login)),
            Decision::Forward { login: true }
        );
        assert!(s.on_login_result(Some(42)));
        assert_eq!(
            s.on_request(Some(&login)),
            Decision::Reply(Code::LoginInProgress)
        );
        s.bind(42);
        assert_eq!(s.player(), Some(42));
        assert_eq!(
            s.on_request(Some(&game)),
            Decision::Forward { login: false }
        );
        assert_eq!(
            s.on_request(Some(&login)),
            Decision::Reply(Code::AlreadyAuthenticated)
        );
        assert!(s.close());
        assert!(!s.close());
        assert_eq!(s.on_request(Some(&game)), Decision::Ignore);
        s.bind(42);
        assert!(s.is_closing());
    }

    #[test]
    fn resume_only_from_a_logged_out_session() {
        let mut s = Session::new();
        assert_eq!(s.on_resume(), Decision::Forward { login: false });
        assert_eq!(s.state(), State::Resuming);
        assert_eq!(s.on_resume(), Decision::Reply(Code::ResumeRejected));
        assert_eq!(
            s.on_request(Some(&route(false, true))),
            Decision::Reply(Code::LoginInProgress)
        );
        s.resume_failed();
        assert_eq!(s.state(), State::Connected);
        s.bind(3);
        assert_eq!(s.on_resume(), Decision::Reply(Code::ResumeRejected));
        let mut t = Session::new();
        assert_eq!(
            t.on_request(Some(&route(false, true))),
            Decision::Forward { login: true }
        );
        assert_eq!(t.on_resume(), Decision::Reply(Code::ResumeRejected));
        t.close();
        assert_eq!(t.on_resume(), Decision::Ignore);
    }

    #[test]
    fn a_late_login_answer_changes_nothing() {
        let mut s = Session::new();
        assert!(!s.on_login_result(Some(1)));
        assert_eq!(s.state(), State::Connected);
    }
}
