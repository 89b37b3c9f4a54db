//! What a test's client does most: log in, find its request at the
//! backend, have every request answered; and the header a client sets.

use super::{ConnId, Sim};
use crate::protocol::{Frame, Header, Kind};

impl Sim {
    /// The first login route's msg_id.
    pub fn login_msg(&self) -> u32 {
        let cfg = self.cores[0].cfg();
        cfg.routes
            .iter()
            .find(|r| r.login)
            .map(|r| r.msgs.0)
            .expect("the config has a login route")
    }

    /// The index of the request of connection `c` waiting at the backend
    /// with this req_id.
    pub fn pending_of(&self, c: ConnId, req_id: u32) -> Option<usize> {
        let conn = &self.conns[c];
        self.backend.iter().position(|s| {
            s.shard == conn.shard
                && s.forward.asker.session == conn.sid
                && s.forward.asker.req_id == req_id
        })
    }

    /// Log `c` in as `player` (the backend accepts at once); the frames
    /// it received.
    pub fn login(&mut self, c: ConnId, player: u64, req_id: u32) -> Vec<Frame> {
        let msg = self.login_msg();
        self.send(c, &header(Kind::Request, msg, req_id, 0), b"login");
        self.run();
        let i = self
            .pending_of(c, req_id)
            .expect("the login request reached the backend");
        self.answer(i, 0, player, b"welcome");
        self.run();
        self.recv(c)
    }

    /// Answer every waiting request with its own body (code 0).
    pub fn answer_all(&mut self) {
        while !self.backend.is_empty() {
            let body = self.backend[0].forward.body.clone();
            self.answer(0, 0, 0, &body);
        }
        self.run();
    }
}

/// A header of `kind` with the fields a client sets.
pub fn header(kind: Kind, msg_id: u32, req_id: u32, seq: u64) -> Header {
    Header {
        kind,
        flags: 0,
        code: 0,
        msg_id,
        req_id,
        seq,
    }
}
