//! The client's side of the wire contract, checked frame by frame: one
//! player's stream of sequenced frames ([`StreamCheck`]) and the answers to
//! one session's requests ([`Ledger`]). The load tester's scenarios and the
//! randomized tests share them, and the fault relay's tests
//! ([`crate::fault`]) prove each violation is reported, by the phrase
//! constants below.
//!
//! Every check is against the client's own record of what it received,
//! sent and acknowledged, never against what the gateway says.

use slg_gateway::protocol::{Frame, Kind};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Instant;

/// Phrase of a frame that never arrived while later ones did.
pub const LOST: &str = "lost";
/// Phrase of a frame delivered again with the same contents.
pub const REPEATED: &str = "repeated";
/// Phrase of frames delivered in the wrong order.
pub const OUT_OF_ORDER: &str = "out of order";
/// Phrase of one seq given to two different frames.
pub const TWO_FRAMES: &str = "two different frames";
/// Phrase of an answer that belongs to another request (or push).
pub const MISDELIVERED: &str = "misdelivered";
/// Phrase of a frame from before a resume point delivered after it.
pub const STALE: &str = "stale";

/// Frames a stream remembers the contents of, to check replays.
const WINDOW: usize = 256;

/// A frame's identity: everything the client sees but the seq, hashed.
fn fingerprint(f: &Frame) -> u64 {
    // FNV-1a: cheap, and collisions only weaken a check, never fail one.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    eat(f.header.kind as u8);
    f.header.code.to_be_bytes().into_iter().for_each(&mut eat);
    f.header.msg_id.to_be_bytes().into_iter().for_each(&mut eat);
    f.header.req_id.to_be_bytes().into_iter().for_each(&mut eat);
    f.body.iter().copied().for_each(&mut eat);
    h
}

/// Does this frame carry a seq of the player's stream?
pub fn sequenced(f: &Frame) -> bool {
    matches!(f.header.kind, Kind::Response | Kind::Push) && f.header.seq > 0
}

/// One player's stream as the client receives it, across connections.
#[derive(Debug, Default)]
pub struct StreamCheck {
    /// Highest seq received in order: what PING, ACK and RESUME report.
    last: u64,
    /// Fingerprints of seqs `seen_base ..` (contiguous, the last WINDOW).
    seen: VecDeque<u64>,
    seen_base: u64,
    /// Seqs that arrived ahead of `last + 1`, waiting for the gap to fill.
    ahead: BTreeMap<u64, u64>,
    /// After a resume at R: every seq <= R is stale.
    resumed_at: Option<u64>,
    /// Highest seq the client acknowledged and saw the gateway process
    /// (a PONG answered the PING that carried it).
    acked_confirmed: u64,
    /// Frames accepted in order.
    pub accepted: u64,
    /// A login or resume has been seen: before it the client has no record
    /// to hold the gateway to (a player left from an earlier run starts
    /// wherever the gateway has it).
    started: bool,
}

impl StreamCheck {
    pub fn new() -> StreamCheck {
        StreamCheck {
            seen_base: 1,
            ..StreamCheck::default()
        }
    }

    /// Highest seq received in order.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// A PONG answered a PING that carried `seq`: the gateway has it.
    pub fn confirmed_ack(&mut self, seq: u64) {
        self.acked_confirmed = self.acked_confirmed.max(seq);
    }

    fn known(&self, seq: u64) -> Option<u64> {
        let i = seq.checked_sub(self.seen_base)?;
        self.seen.get(usize::try_from(i).ok()?).copied()
    }

    fn remember(&mut self, seq: u64, fp: u64) -> Result<(), String> {
        match self.known(seq) {
            Some(old) if old != fp => {
                return Err(format!(
                    "seq {seq} carried {TWO_FRAMES} (it was delivered before with other contents)"
                ))
            }
            Some(_) => {}
            None if seq == self.seen_base + self.seen.len() as u64 => {
                self.seen.push_back(fp);
                if self.seen.len() > WINDOW {
                    self.seen.pop_front();
                    self.seen_base += 1;
                }
            }
            // Older than the window, or after a rewind past it: unknown.
            None => {
                if seq >= self.seen_base + self.seen.len() as u64 {
                    self.seen.clear();
                    self.seen.push_back(fp);
                    self.seen_base = seq;
                }
            }
        }
        Ok(())
    }

    /// A sequenced frame arrived. Err: the violation, named.
    pub fn frame(&mut self, f: &Frame) -> Result<(), String> {
        let seq = f.header.seq;
        let fp = fingerprint(f);
        if seq <= self.last {
            return match self.known(seq) {
                Some(old) if old != fp => Err(format!(
                    "seq {seq} carried {TWO_FRAMES} (last in order {})",
                    self.last
                )),
                _ => match self.resumed_at {
                    Some(r) if seq <= r => Err(format!(
                        "seq {seq} delivered after the resume at {r}: a {STALE} frame"
                    )),
                    _ => Err(format!(
                        "seq {seq} {REPEATED} (already received up to {})",
                        self.last
                    )),
                },
            };
        }
        if seq > self.last + 1 {
            if self.ahead.insert(seq, fp).is_some() {
                return Err(format!(
                    "seq {seq} {REPEATED} while seq {} was due",
                    self.last + 1
                ));
            }
            if self.ahead.len() >= 2 {
                return Err(self.give_up_gap());
            }
            return Ok(());
        }
        self.accept(seq, fp)?;
        if let Some((&next, _)) = self.ahead.first_key_value() {
            if next == self.last + 1 {
                let fp = self.ahead.remove(&next).unwrap_or(0);
                self.accept(next, fp)?;
                return Err(format!(
                    "seq {next} arrived before seq {seq}: {OUT_OF_ORDER}"
                ));
            }
        }
        Ok(())
    }

    fn accept(&mut self, seq: u64, fp: u64) -> Result<(), String> {
        self.last = seq;
        self.accepted += 1;
        self.remember(seq, fp)
    }

    /// The missing frame is not coming: report it and go on after it.
    fn give_up_gap(&mut self) -> String {
        let due = self.last + 1;
        let next = self.ahead.keys().next().copied().unwrap_or(due);
        let msg = format!("seq {due} {LOST}: the stream went on at seq {next}");
        self.last = next - 1;
        let ahead = std::mem::take(&mut self.ahead);
        for (s, fp) in ahead {
            if s == self.last + 1 {
                let _ = self.accept(s, fp);
            }
        }
        msg
    }

    /// The connection ended (or the run did): a gap still open is a loss
    /// (the gateway never sends out of order, so no later frame fills it).
    pub fn end_connection(&mut self) -> Result<(), String> {
        if self.ahead.is_empty() {
            Ok(())
        } else {
            Err(self.give_up_gap())
        }
    }

    /// A resume sent with `sent_last` was answered by `SESSION` R.
    pub fn resumed(&mut self, sent_last: u64, r: u64) -> Result<(), String> {
        self.ahead.clear();
        self.started = true;
        if r != sent_last {
            return Err(format!(
                "resume from {sent_last} answered with resume point {r}"
            ));
        }
        self.resumed_at = Some(r);
        Ok(())
    }

    /// A login answered with `SESSION` R (`gap`: code GAP). The frames
    /// after R come again (at-least-once) and must be what they were.
    pub fn logged_in(&mut self, r: u64, gap: bool, gap_allowed: bool) -> Result<(), String> {
        self.ahead.clear();
        self.resumed_at = None;
        if !std::mem::replace(&mut self.started, true) {
            // The first login: whatever came before is not ours to judge.
            self.last = r;
            return Ok(());
        }
        if gap && !gap_allowed {
            return Err(format!(
                "login answered SESSION GAP at {r}: frames were evicted ({LOST})"
            ));
        }
        if r > self.last && !gap {
            return Err(format!(
                "login resume point {r} is past the last seq received, {}",
                self.last
            ));
        }
        if r < self.acked_confirmed && !gap {
            return Err(format!(
                "login resume point {r} is before the acknowledged {}",
                self.acked_confirmed
            ));
        }
        // R past last only with GAP: the frames between were evicted.
        self.last = r;
        Ok(())
    }
}

/// The body of request `req_id` of session `session`, `len` bytes long
/// (at least its tag): an echo answer must bring it back whole.
pub fn request_body(out: &mut Vec<u8>, session: usize, req_id: u32, len: usize) {
    out.clear();
    use std::io::Write;
    let _ = write!(out, "s{session}r{req_id}:");
    let tag = out.len();
    out.resize(len.max(tag), b'.');
}

/// One request the client sent and has not seen answered.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    pub msg_id: u32,
    pub at: Instant,
    /// Which connection of the session wrote it (0, 1, ...).
    pub conn: u32,
}

/// What an answer was.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// The answer to a request outstanding: latency in µs, and its code.
    Matched { us: u64, code: u16 },
    /// Not a request of ours: the violation, named.
    Violation(String),
}

/// One session's requests, matched to their answers by req_id, msg_id and
/// the whole body.
#[derive(Debug)]
pub struct Ledger {
    session: usize,
    body_len: usize,
    pub outstanding: HashMap<u32, Sent>,
    /// The connection the last matched answer's request was written on.
    pub last_conn: u32,
    scratch: Vec<u8>,
}

impl Ledger {
    pub fn new(session: usize, body_len: usize) -> Ledger {
        Ledger {
            session,
            body_len,
            outstanding: HashMap::new(),
            last_conn: 0,
            scratch: Vec::new(),
        }
    }

    /// The body to send with `req_id` (valid until the next call).
    pub fn body(&mut self, req_id: u32) -> &[u8] {
        request_body(&mut self.scratch, self.session, req_id, self.body_len);
        &self.scratch
    }

    pub fn sent(&mut self, req_id: u32, msg_id: u32, conn: u32) {
        self.outstanding.insert(
            req_id,
            Sent {
                msg_id,
                at: Instant::now(),
                conn,
            },
        );
    }

    /// A RESPONSE arrived.
    pub fn answer(&mut self, f: &Frame) -> Answer {
        let req = f.header.req_id;
        let Some(s) = self.outstanding.get(&req).copied() else {
            return Answer::Violation(format!(
                "answer to req {req} that is not outstanding ({REPEATED} or stray)"
            ));
        };
        if f.header.code == 0 {
            request_body(&mut self.scratch, self.session, req, self.body_len);
            if f.body[..] != self.scratch[..] || f.header.msg_id != s.msg_id {
                // Leave it outstanding: its own answer may still come.
                return Answer::Violation(format!(
                    "req {req}: {MISDELIVERED} answer (msg {} body {:?}, another request's)",
                    f.header.msg_id,
                    String::from_utf8_lossy(&f.body[..f.body.len().min(24)])
                ));
            }
        }
        self.outstanding.remove(&req);
        self.last_conn = s.conn;
        Answer::Matched {
            us: s.at.elapsed().as_micros() as u64,
            code: f.header.code,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use slg_gateway::protocol::Header;

    fn resp(seq: u64, req: u32) -> Frame {
        let mut h = Header::new(Kind::Response);
        h.seq = seq;
        h.req_id = req;
        Frame {
            header: h,
            body: Bytes::from(format!("b{req}")),
        }
    }

    #[test]
    fn in_order_stream_passes_and_each_fault_has_its_name() {
        let mut s = StreamCheck::new();
        for i in 1..=5 {
            s.frame(&resp(i, i as u32)).expect("in order");
        }
        assert_eq!(s.last(), 5);
        // repeat
        assert!(s.frame(&resp(5, 5)).expect_err("repeat").contains(REPEATED));
        // rewrite: seq 5 with other contents
        assert!(s
            .frame(&resp(5, 6))
            .expect_err("rewrite")
            .contains(TWO_FRAMES));
        // swap: 7 then 6
        assert!(s.frame(&resp(7, 7)).is_ok());
        assert!(s
            .frame(&resp(6, 6))
            .expect_err("swap")
            .contains(OUT_OF_ORDER));
        assert_eq!(s.last(), 7);
        // drop: 8 never comes
        assert!(s.frame(&resp(9, 9)).is_ok());
        assert!(s.frame(&resp(10, 10)).expect_err("drop").contains(LOST));
        assert_eq!(s.last(), 10);
        s.frame(&resp(11, 11)).expect("goes on");
        // a gap open at the end of a connection is a loss
        assert!(s.frame(&resp(13, 13)).is_ok());
        assert!(s.end_connection().expect_err("lost").contains(LOST));
    }

    #[test]
    fn a_first_login_starts_wherever_the_gateway_has_the_player() {
        let mut s = StreamCheck::new();
        s.logged_in(500, true, false)
            .expect("no record to hold it to");
        s.frame(&resp(501, 1)).expect("goes on from R");
        assert!(
            s.logged_in(600, false, false).is_err(),
            "a later one is checked"
        );
    }

    #[test]
    fn resume_and_login_rules() {
        let mut s = StreamCheck::new();
        s.logged_in(0, false, false).expect("first login");
        for i in 1..=4 {
            s.frame(&resp(i, i as u32)).expect("in order");
        }
        assert!(s.resumed(4, 3).is_err(), "R must be what the client sent");
        s.resumed(4, 4).expect("resume");
        assert!(s.frame(&resp(3, 3)).expect_err("stale").contains(STALE));
        s.frame(&resp(5, 5)).expect("live");
        // A login replays from the acknowledged point, same contents.
        s.confirmed_ack(2);
        assert!(s.logged_in(1, false, false).is_err(), "before the ack");
        s.logged_in(2, false, false).expect("login");
        s.frame(&resp(3, 3)).expect("replayed, same");
        assert!(s
            .frame(&resp(4, 99))
            .expect_err("changed")
            .contains(TWO_FRAMES));
        assert!(s.logged_in(9, true, false).is_err(), "GAP not allowed");
        s.logged_in(9, true, true).expect("GAP allowed");
        s.frame(&resp(10, 10)).expect("after the gap");
    }

    #[test]
    fn ledger_matches_req_id_msg_id_and_body() {
        let mut l = Ledger::new(3, 40);
        let body_a = l.body(7).to_vec();
        let body_b = l.body(8).to_vec();
        assert_eq!(body_a.len(), 40);
        assert_ne!(body_a, body_b);
        l.sent(7, 100, 0);
        l.sent(8, 100, 0);
        let mut f = resp(1, 7);
        f.header.msg_id = 100;
        f.body = Bytes::from(body_b.clone());
        assert!(matches!(l.answer(&f), Answer::Violation(v) if v.contains(MISDELIVERED)));
        f.body = Bytes::from(body_a);
        assert!(matches!(l.answer(&f), Answer::Matched { code: 0, .. }));
        assert!(matches!(l.answer(&f), Answer::Violation(v) if v.contains(REPEATED)));
        // A gateway error carries no body.
        let mut e = resp(2, 8);
        e.header.code = 0x8004;
        e.body = Bytes::new();
        assert!(matches!(l.answer(&e), Answer::Matched { code: 0x8004, .. }));
    }
}
