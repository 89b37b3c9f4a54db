//! Reconnect tokens and the bodies that carry them: `player::token_player`,
//! `protocol::parse_session_body` and `parse_redirect_body` on arbitrary
//! bytes, and `Player::resume` with an arbitrary token and seq against a
//! player with a real token and stream.
//!
//! Checked: no panic; `token_player` names a player exactly for 24 bytes
//! whose first 8 are a non-zero id; the bodies parse exactly when their
//! documented shape is there and build back to the same bytes; a resume is
//! served only with the player's current, unexpired token, byte for byte,
//! from a seq not beyond the last sent and with every frame after it kept,
//! and then leaves exactly those frames to replay.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use slg_gateway::player::{token_player, Player, ResumeError, SECRET_LEN, TOKEN_LEN};
use slg_gateway::protocol::{
    parse_redirect_body, parse_session_body, redirect_body, session_body, Header, Kind,
};
use std::time::{Duration, Instant};

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    raw: &'a [u8],
    player: u64,
    secret: [u8; SECRET_LEN],
    /// Token lifetime in ms, then the time of the resume after issue.
    lifetime_ms: u16,
    at_ms: u16,
    frames: u8,
    max_frames: u8,
    ack: u8,
    /// How the presented token is made from the real one.
    tamper: Tamper<'a>,
    last: u8,
}

#[derive(Debug, Arbitrary)]
enum Tamper<'a> {
    None,
    Flip { at: u8, bit: u8 },
    Cut(u8),
    Extend(u8),
    Raw(&'a [u8]),
}

fuzz_target!(|data: &[u8]| {
    check_raw(data);
    let mut u = Unstructured::new(data);
    if let Ok(input) = Input::arbitrary(&mut u) {
        check_raw(input.raw);
        check_resume(&input);
    }
});

fn check_raw(raw: &[u8]) {
    let named = token_player(raw);
    let want = (raw.len() == TOKEN_LEN)
        .then(|| u64::from_be_bytes(raw[..8].try_into().expect("8 bytes")))
        .filter(|&p| p != 0);
    assert_eq!(named, want);

    match parse_session_body(raw) {
        Some((player, token)) => {
            let mut b = BytesMut::new();
            session_body(&mut b, player, token);
            assert_eq!(&b[..], raw);
        }
        None => assert!(raw.len() < 8),
    }

    match parse_redirect_body(raw) {
        Some((addr, token)) => {
            let mut b = BytesMut::new();
            redirect_body(&mut b, addr, token);
            assert_eq!(&b[..], raw);
        }
        None => {
            let fits = raw.len() >= 2 && {
                let n = usize::from(u16::from_be_bytes([raw[0], raw[1]]));
                raw.len() - 2 >= n && std::str::from_utf8(&raw[2..2 + n]).is_ok()
            };
            assert!(!fits, "a well-formed REDIRECT body refused");
        }
    }
}

fn check_resume(input: &Input) {
    let now = Instant::now();
    let id = input.player.max(1);
    let max_frames = usize::from(input.max_frames % 16) + 1;
    let mut p = Player::new(id, max_frames, 1 << 20, now);
    for _ in 0..input.frames % 64 {
        p.sequence(Header::new(Kind::Push), Bytes::from_static(b"x"), |_| ());
    }
    let sent = p.last_seq();
    let _ = p.ack(u64::from(input.ack).min(sent));
    let lifetime = Duration::from_millis(u64::from(input.lifetime_ms));
    let real = p.issue_token(input.secret, now, lifetime);
    assert_eq!(token_player(&real), Some(id));
    let presented: Vec<u8> = match &input.tamper {
        Tamper::None => real.to_vec(),
        Tamper::Flip { at, bit } => {
            let mut t = real.to_vec();
            t[usize::from(*at) % TOKEN_LEN] ^= 1 << (bit % 8);
            t
        }
        Tamper::Cut(n) => real[..usize::from(*n) % TOKEN_LEN].to_vec(),
        Tamper::Extend(b) => {
            let mut t = real.to_vec();
            t.push(*b);
            t
        }
        Tamper::Raw(raw) => raw.to_vec(),
    };
    let at = now + Duration::from_millis(u64::from(input.at_ms));
    let last = u64::from(input.last);
    let acked = p.acked();
    let token_ok = presented == real && at < now + lifetime;
    assert_eq!(p.token_valid(&presented, at), token_ok);
    let held = p.outbox.evicted_through() <= last
        && p.outbox.first_seq().map_or(last >= sent, |f| f <= last + 1);
    match p.resume(&presented, last, at) {
        Ok(()) => {
            assert!(token_ok && last <= sent && held);
            let replay: Vec<u64> = p
                .outbox
                .iter()
                .map(|(s, _)| s)
                .filter(|&s| s > last)
                .collect();
            assert_eq!(replay, (last + 1..=sent).collect::<Vec<_>>());
            assert_eq!(p.acked(), acked.max(last));
        }
        Err(ResumeError::Rejected) => assert!(!token_ok),
        Err(ResumeError::Beyond {
            last_client,
            last_sent,
        }) => {
            assert!(token_ok && last > sent);
            assert_eq!((last_client, last_sent), (last, sent));
        }
        Err(ResumeError::Gap(from)) => {
            assert!(token_ok && last <= sent && !held);
            assert_eq!(from, last);
        }
    }
}
