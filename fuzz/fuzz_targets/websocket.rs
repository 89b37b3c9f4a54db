//! The WebSocket layer of the client port (`wire::Wire::ingest` over
//! in-memory buffers: tungstenite's upgrade handshake with the path,
//! `Origin` and size checks, then binary messages that each carry one
//! client-link frame). Byte 0 picks whether a valid upgrade request comes
//! first (so the fuzzer works on the frames after it) and the settings,
//! byte 1 how many of the next bytes are chunk sizes, the rest is what the
//! client sent, fed in those chunks.
//!
//! Checked: no panic; the client-link bytes it gives are the same however
//! the input is chunked, and so is whether it fails; it never gives more
//! bytes than it was fed; the answer to the upgrade is an HTTP status line.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use slg_gateway::wire::{Wire, WireKind, WsSettings};
use std::sync::Arc;

const UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: https://game.example\r\n\r\n";

/// What feeding gave: the client-link bytes, whether it failed, the
/// peer's close, and the first bytes answered.
#[derive(Debug, PartialEq, Eq)]
struct Fed {
    plain: Vec<u8>,
    failed: bool,
    closed: bool,
    answer: Vec<u8>,
}

fn feed(settings: &Arc<WsSettings>, input: &[u8], sizes: &[usize]) -> Fed {
    let kind = WireKind {
        tls: None,
        ws: Some(settings.clone()),
    };
    let mut wire = Wire::new(&kind).expect("a WebSocket wire without TLS");
    let mut plain = BytesMut::new();
    let mut fed = Fed {
        plain: Vec::new(),
        failed: false,
        closed: false,
        answer: Vec::new(),
    };
    let mut at = 0;
    let mut turn = 0;
    while at < input.len() {
        let n = match sizes {
            [] => input.len(),
            s => s[turn % s.len()],
        };
        turn += 1;
        let end = input.len().min(at + n);
        let r = wire.ingest(&input[at..end], &mut plain);
        if slg_gateway_fuzz::trace() {
            eprintln!(
                "fed {at}..{end}: {:?}, {} client-link bytes, answer {:?}",
                r.as_ref().map_err(|e| e.to_string()),
                plain.len(),
                String::from_utf8_lossy(wire.pending())
            );
        }
        at = end;
        if fed.answer.len() < 12 {
            fed.answer
                .extend_from_slice(&wire.pending()[..wire.pending().len().min(12)]);
            fed.answer.truncate(12);
        }
        let n = wire.pending().len();
        wire.consumed(n);
        match r {
            Ok(i) => fed.closed |= i.closed,
            Err(_) => {
                fed.failed = true;
                break;
            }
        }
        if fed.closed {
            break;
        }
    }
    fed.plain = plain.to_vec();
    assert!(
        fed.plain.len() <= input.len(),
        "more client-link bytes than fed"
    );
    fed
}

fuzz_target!(|data: &[u8]| {
    let [pick, n, rest @ ..] = data else {
        return;
    };
    let n = usize::from(n % 16).min(rest.len());
    let (sizes, body) = rest.split_at(n);
    let sizes: Vec<usize> = sizes.iter().map(|&s| usize::from(s) + 1).collect();
    let settings = Arc::new(WsSettings {
        path: "/ws".into(),
        allowed_origins: if pick & 2 == 0 {
            Vec::new()
        } else {
            vec!["https://game.example".into()]
        },
        max_request: if pick & 4 == 0 { 8192 } else { 256 },
        max_message: if pick & 8 == 0 { 65540 } else { 64 },
    });
    let input = if pick & 1 == 1 {
        [UPGRADE, body].concat()
    } else {
        body.to_vec()
    };
    let whole = feed(&settings, &input, &[]);
    let chunked = feed(&settings, &input, &sizes);
    // (After a close the rest is not fed in chunks: compare up to there.)
    if !whole.closed && !chunked.closed {
        assert_eq!(
            whole.failed, chunked.failed,
            "chunking changed whether it failed"
        );
        if !whole.failed {
            assert_eq!(
                whole.plain, chunked.plain,
                "chunking changed the client-link bytes"
            );
        }
    }
    if !whole.answer.is_empty() {
        assert!(
            whole.answer.starts_with(b"HTTP/1.1 "),
            "answered {:?}",
            whole.answer
        );
    }
});
