//! Backend answers on their way to the client: a request's answer goes to
//! its player (sequenced, into the outbox) or, before login, to its
//! session; a login's answer binds the session or refuses it.

use super::event::Event;
use super::{bump, Answer, Asker, Core};
use crate::protocol::{Code, Header, Kind};
use crate::session::{Arrival, LoginReply};
use bytes::Bytes;
use std::time::Instant;

impl Core {
    /// A backend answered a request (or the gateway did for it: TIMEOUT,
    /// BACKEND_UNAVAILABLE).
    pub fn handle_answer(&mut self, asker: Asker, a: Answer, now: Instant) {
        self.now = now;
        if asker.login {
            return self.on_login_answer(asker, a);
        }
        self.answer(asker, a);
        // An ordered route's answer lets the next request of its group go.
        self.next_ordered(&asker);
    }

    fn answer(&mut self, asker: Asker, a: Answer) {
        // One lookup: the request's bytes are back, and a login or resume
        // may wait for its last answer.
        let wake = self.sessions.get_mut(&asker.session).is_some_and(|c| {
            c.session.count_inflight_bytes(asker.bytes as usize, false);
            c.session.answered()
        });
        if wake {
            self.wake(asker.session, true, false);
        }
        let h = Header {
            kind: Kind::Response,
            flags: 0,
            code: a.code,
            msg_id: a.msg_id,
            req_id: asker.req_id,
            seq: 0,
        };
        if asker.player != 0 {
            // A request of a logged-in player: the answer belongs to the
            // player, whichever session it has now (or none: outbox); but
            // not to a later life of the same id (after BYE or linger).
            let same_life = self
                .players
                .get(&asker.player)
                .is_some_and(|pl| pl.life == asker.life);
            if !same_life {
                self.event(Event::StrayAnswer {
                    player: asker.player,
                    req_id: asker.req_id,
                });
                return;
            }
            self.metrics
                .response(self.router.slot(asker.msg_id), a.code);
            // Copied out of the backend's read buffer (see `deliver`).
            self.deliver(asker.player, h, Bytes::copy_from_slice(&a.body));
        } else {
            self.respond(asker.session, asker.req_id, asker.msg_id, a.code, &a.body);
        }
    }

    fn on_login_answer(&mut self, asker: Asker, a: Answer) {
        let accepted = (a.code == 0 && a.player != 0).then_some(a.player);
        if a.code == 0 && a.player == 0 {
            self.event(Event::LoginWithoutPlayer { sid: asker.session });
        }
        let binding = {
            let Some(c) = self.sessions.get_mut(&asker.session) else {
                return;
            };
            c.session.count_inflight_bytes(asker.bytes as usize, false);
            match accepted {
                Some(player) => c.session.login_accepted(Arrival::Login {
                    player,
                    reply: LoginReply {
                        req_id: asker.req_id,
                        msg_id: a.msg_id,
                        code: a.code,
                        body: a.body.clone(),
                    },
                }),
                None => c.session.on_login_result(None),
            }
        };
        if binding {
            self.wake(asker.session, true, false);
        } else {
            bump(&self.stats.logins_rejected);
            let code = if accepted.is_none() && a.code == 0 {
                Code::BackendUnavailable.into()
            } else {
                a.code
            };
            self.respond(asker.session, asker.req_id, a.msg_id, code, &a.body);
        }
    }
}
