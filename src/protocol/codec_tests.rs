//! The codec's tests: fixed vectors, then property tests for each of the
//! four link directions (round trips, lying lengths, illegal kinds); one
//! file of this length because every direction needs its own generators.

use super::*;
use crate::protocol::{Code, Kind, DEFAULT_MAX_FRAME};
use proptest::prelude::*;

const LINKS: [Link; 4] = [
    Link::ClientToGateway,
    Link::GatewayToClient,
    Link::GatewayToBackend,
    Link::BackendToGateway,
];

fn dec(link: Link) -> Decoder {
    Decoder::new(link, DEFAULT_MAX_FRAME)
}

#[test]
fn constants() {
    assert_eq!(LEN_PREFIX, 4);
    assert_eq!(HEADER_LEN, 20);
    assert_eq!(DEFAULT_MAX_FRAME, 65536);
    assert_eq!(frame_len(0), 24);
    assert_eq!(frame_len(100), 124);
}

#[test]
fn kind_values_match_protocol() {
    let table: [(u8, Kind, &str); 12] = [
        (0x01, Kind::Request, "REQUEST"),
        (0x02, Kind::Ping, "PING"),
        (0x03, Kind::Resume, "RESUME"),
        (0x04, Kind::Ack, "ACK"),
        (0x05, Kind::Bye, "BYE"),
        (0x81, Kind::Response, "RESPONSE"),
        (0x82, Kind::Push, "PUSH"),
        (0x83, Kind::Pong, "PONG"),
        (0x84, Kind::Session, "SESSION"),
        (0x85, Kind::Kick, "KICK"),
        (0x86, Kind::Redirect, "REDIRECT"),
        (0x87, Kind::Error, "ERROR"),
    ];
    for (v, k, name) in table {
        assert_eq!(k as u8, v);
        assert_eq!(Kind::from_u8(v), Some(k));
        assert_eq!(k.name(), name);
    }
    assert_eq!(Kind::ALL.len(), table.len());
    let known = (0..=255u8).filter(|v| Kind::from_u8(*v).is_some()).count();
    assert_eq!(known, 12);
}

#[test]
fn link_kind_tables() {
    for v in 0..=255u8 {
        let c2g = (0x01..=0x05).contains(&v);
        let g2c = (0x81..=0x87).contains(&v);
        let g2b = v == 0x01 || v == 0x02;
        let b2g = v == 0x81 || v == 0x83;
        assert_eq!(Link::ClientToGateway.accepts(v).is_some(), c2g, "{v:#x}");
        assert_eq!(Link::GatewayToClient.accepts(v).is_some(), g2c, "{v:#x}");
        assert_eq!(Link::GatewayToBackend.accepts(v).is_some(), g2b, "{v:#x}");
        assert_eq!(Link::BackendToGateway.accepts(v).is_some(), b2g, "{v:#x}");
        for link in LINKS {
            if let Some(k) = link.accepts(v) {
                assert_eq!(k as u8, v);
            }
        }
    }
}

#[test]
fn code_values_match_protocol() {
    let table: [(u16, Code, &str); 21] = [
        (0x0000, Code::Ok, "OK"),
        (0x8001, Code::NoRoute, "NO_ROUTE"),
        (0x8002, Code::NotAuthenticated, "NOT_AUTHENTICATED"),
        (0x8003, Code::BackendUnavailable, "BACKEND_UNAVAILABLE"),
        (0x8004, Code::Timeout, "TIMEOUT"),
        (0x8005, Code::Overloaded, "OVERLOADED"),
        (0x8006, Code::AlreadyAuthenticated, "ALREADY_AUTHENTICATED"),
        (0x8007, Code::LoginInProgress, "LOGIN_IN_PROGRESS"),
        (0x8008, Code::ShuttingDown, "SHUTTING_DOWN"),
        (0x8009, Code::Migrating, "MIGRATING"),
        (0x8010, Code::ResumeRejected, "RESUME_REJECTED"),
        (0x8011, Code::ResumeGap, "RESUME_GAP"),
        (0x8012, Code::RateLimited, "RATE_LIMITED"),
        (0x8013, Code::AlreadyOnline, "ALREADY_ONLINE"),
        (0x8101, Code::Replaced, "REPLACED"),
        (0x8102, Code::Idle, "IDLE"),
        (0x8103, Code::Shutdown, "SHUTDOWN"),
        (0x8104, Code::Admin, "ADMIN"),
        (0x8105, Code::ProtocolError, "PROTOCOL_ERROR"),
        (0x8106, Code::SlowConsumer, "SLOW_CONSUMER"),
        (0x8107, Code::LoginTimeout, "LOGIN_TIMEOUT"),
    ];
    for (v, c, name) in table {
        assert_eq!(c as u16, v);
        assert_eq!(u16::from(c), v);
        assert_eq!(Code::from_u16(v), Some(c));
        assert_eq!(c.name(), name);
        assert_eq!(Code::is_gateway(v), v != 0);
    }
    assert_eq!(Code::ALL.len(), table.len());
    assert_eq!(Code::GAP, Code::ResumeGap);
    assert_eq!(u16::from(Code::GAP), 0x8011);
    assert_eq!(Code::from_u16(1), None);
    assert_eq!(Code::from_u16(0x8000), None);
    assert!(!Code::is_gateway(0x7fff));
    assert!(Code::is_gateway(0x8000));
    assert!(Code::is_gateway(0xffff));
    let known = (0..=u16::MAX)
        .filter(|v| Code::from_u16(*v).is_some())
        .count();
    assert_eq!(known, 21);
}

#[test]
fn header_new_zeroes() {
    let h = Header::new(Kind::Ping);
    assert_eq!(
        h,
        Header {
            kind: Kind::Ping,
            flags: 0,
            code: 0,
            msg_id: 0,
            req_id: 0,
            seq: 0
        }
    );
}

/// REQUEST, code 0x1234, msg_id 1001, req_id 7, seq 0, body "hi",
/// written by hand from the table of section 1.
const KNOWN_REQUEST: [u8; 26] = [
    0x00, 0x00, 0x00, 0x16, // len = 22
    0x01, // kind REQUEST
    0x00, // flags
    0x12, 0x34, // code
    0x00, 0x00, 0x03, 0xe9, // msg_id 1001
    0x00, 0x00, 0x00, 0x07, // req_id 7
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // seq 0
    b'h', b'i', // body
];

#[test]
fn decode_known_bytes() {
    let mut buf = BytesMut::from(&KNOWN_REQUEST[..]);
    let f = dec(Link::ClientToGateway)
        .decode(&mut buf)
        .expect("valid")
        .expect("complete");
    assert!(buf.is_empty());
    assert_eq!(
        f.header,
        Header {
            kind: Kind::Request,
            flags: 0,
            code: 0x1234,
            msg_id: 1001,
            req_id: 7,
            seq: 0
        }
    );
    assert_eq!(&f.body[..], b"hi");

    let mut out = BytesMut::new();
    encode(&mut out, &f.header, b"hi");
    assert_eq!(&out[..], &KNOWN_REQUEST[..]);
}

#[test]
fn decode_known_backend_response() {
    // RESPONSE, flags 0xff (ignored but kept), code 0x8003, msg_id
    // 0x01020304, req_id 0xdeadbeef, player 42, empty body.
    let bytes: [u8; 24] = [
        0x00, 0x00, 0x00, 0x14, // len 20
        0x81, 0xff, 0x80, 0x03, // kind, flags, code
        0x01, 0x02, 0x03, 0x04, // msg_id
        0xde, 0xad, 0xbe, 0xef, // req_id
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x2a, // player 42
    ];
    let mut buf = BytesMut::from(&bytes[..]);
    let f = dec(Link::BackendToGateway)
        .decode(&mut buf)
        .expect("valid")
        .expect("complete");
    assert_eq!(f.header.kind, Kind::Response);
    assert_eq!(f.header.flags, 0xff);
    assert_eq!(f.header.code, u16::from(Code::BackendUnavailable));
    assert_eq!(f.header.msg_id, 0x0102_0304);
    assert_eq!(f.header.req_id, 0xdead_beef);
    assert_eq!(f.header.seq, 42);
    assert!(f.body.is_empty());
    let mut out = BytesMut::new();
    encode(&mut out, &f.header, &[]);
    assert_eq!(&out[..], &bytes[..]);
}

#[test]
fn incomplete_prefixes() {
    let d = dec(Link::ClientToGateway);
    let mut empty = BytesMut::new();
    encode(&mut empty, &Header::new(Kind::Ack), &[]);
    assert_eq!(empty.len(), 24);
    for n in 0..24 {
        let mut buf = BytesMut::from(&empty[..n]);
        assert_eq!(d.decode(&mut buf), Ok(None), "prefix {n}");
        assert_eq!(buf.len(), n, "untouched on incomplete");
        assert_eq!(d.needed(&buf), 24 - n);
    }
    for n in 0..KNOWN_REQUEST.len() {
        let mut buf = BytesMut::from(&KNOWN_REQUEST[..n]);
        assert_eq!(d.decode(&mut buf), Ok(None), "prefix {n}");
        assert_eq!(&buf[..], &KNOWN_REQUEST[..n]);
        let need = d.needed(&buf);
        assert!(need >= 1);
        if n >= 4 {
            assert_eq!(need, KNOWN_REQUEST.len() - n);
        }
    }
    let mut buf = BytesMut::from(&empty[..]);
    assert_eq!(d.needed(&buf), 0);
    assert!(d.decode(&mut buf).expect("valid").is_some());
}

#[test]
fn too_short() {
    for link in LINKS {
        let d = dec(link);
        for len in 0..20u32 {
            // Detected with only the length buffered.
            let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
            assert_eq!(d.decode(&mut buf), Err(DecodeError::TooShort { len }));
            assert_eq!(buf.len(), 4, "untouched on error");
            let mut full = BytesMut::new();
            full.put_u32(len);
            full.put_slice(&[0x01; 40]);
            assert_eq!(d.decode(&mut full), Err(DecodeError::TooShort { len }));
        }
    }
}

#[test]
fn too_long_detected_early() {
    let d = dec(Link::ClientToGateway);
    for len in [65537u32, 1 << 20, u32::MAX] {
        let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
        let err = DecodeError::TooLong {
            len,
            max: DEFAULT_MAX_FRAME,
        };
        assert_eq!(d.decode(&mut buf), Err(err));
        buf.put_u8(0x01);
        assert_eq!(d.decode(&mut buf), Err(err));
        // needed() never asks for more than one maximal frame.
        assert!(d.needed(&buf) <= LEN_PREFIX + DEFAULT_MAX_FRAME as usize - buf.len());
    }
    // Exactly max_frame is fine, and so is a maximal body.
    let mut buf = BytesMut::from(&65536u32.to_be_bytes()[..]);
    assert_eq!(d.decode(&mut buf), Ok(None));
    assert_eq!(d.needed(&buf), 65536);
    let body = vec![0xab; DEFAULT_MAX_FRAME as usize - HEADER_LEN];
    let mut buf = BytesMut::new();
    encode(&mut buf, &Header::new(Kind::Request), &body);
    let f = d.decode(&mut buf).expect("valid").expect("complete");
    assert_eq!(&f.body[..], &body[..]);
    // A smaller configured max.
    let d = Decoder::new(Link::ClientToGateway, 100);
    assert_eq!(d.max_frame(), 100);
    let mut buf = BytesMut::from(&101u32.to_be_bytes()[..]);
    assert_eq!(
        d.decode(&mut buf),
        Err(DecodeError::TooLong { len: 101, max: 100 })
    );
}

#[test]
fn unknown_kind() {
    let frame_with = |kind: u8| {
        let mut b = BytesMut::new();
        b.put_u32(20);
        b.put_u8(kind);
        b
    };
    for link in LINKS {
        for k in [0x00u8, 0x06, 0x80, 0x88, 0xff] {
            let mut buf = frame_with(k);
            assert_eq!(dec(link).decode(&mut buf), Err(DecodeError::UnknownKind(k)));
        }
    }
    // Kinds legal on another link, detected with 5 bytes buffered.
    let cases = [
        (Link::ClientToGateway, 0x81u8),
        (Link::ClientToGateway, 0x83),
        (Link::GatewayToClient, 0x01),
        (Link::GatewayToBackend, 0x03),
        (Link::GatewayToBackend, 0x81),
        (Link::BackendToGateway, 0x82),
        (Link::BackendToGateway, 0x01),
    ];
    for (link, k) in cases {
        let mut buf = frame_with(k);
        assert_eq!(dec(link).decode(&mut buf), Err(DecodeError::UnknownKind(k)));
        assert_eq!(buf.len(), 5, "untouched on error");
    }
    assert_eq!(
        DecodeError::UnknownKind(0x06).to_string(),
        "unknown frame kind 0x06 on this link"
    );
}

#[test]
fn batched_frames_decode_in_order() {
    let d = dec(Link::GatewayToClient);
    let mut h1 = Header::new(Kind::Push);
    h1.seq = 1;
    h1.msg_id = 2001;
    let mut h2 = Header::new(Kind::Kick);
    h2.code = Code::Replaced.into();
    let mut buf = BytesMut::new();
    encode(&mut buf, &h1, b"first");
    encode(&mut buf, &h2, b"");
    assert_eq!(buf.len(), frame_len(5) + frame_len(0));
    let f1 = d.decode(&mut buf).expect("valid").expect("complete");
    let f2 = d.decode(&mut buf).expect("valid").expect("complete");
    assert_eq!((f1.header, &f1.body[..]), (h1, &b"first"[..]));
    assert_eq!((f2.header, &f2.body[..]), (h2, &b""[..]));
    assert_eq!(d.decode(&mut buf), Ok(None));
    assert!(buf.is_empty());
}

#[test]
fn body_is_zero_copy() {
    let d = dec(Link::ClientToGateway);
    let mut buf = BytesMut::with_capacity(4096);
    encode(&mut buf, &Header::new(Kind::Request), b"payload one");
    encode(&mut buf, &Header::new(Kind::Resume), b"token-two");
    let start = buf.as_ptr() as usize;
    let end = start + buf.capacity();
    let f1 = d.decode(&mut buf).expect("valid").expect("complete");
    let f2 = d.decode(&mut buf).expect("valid").expect("complete");
    for (f, body) in [(&f1, &b"payload one"[..]), (&f2, &b"token-two"[..])] {
        let p = f.body.as_ptr() as usize;
        assert!(p >= start && p + f.body.len() <= end, "body copied");
        assert_eq!(&f.body[..], body);
    }
    assert_eq!(f1.body.as_ptr() as usize, start + 24);
}

#[test]
fn session_body_round_trip() {
    let mut out = BytesMut::new();
    session_body(&mut out, 0x0102_0304_0506_0708, b"tok");
    assert_eq!(&out[..], &[1, 2, 3, 4, 5, 6, 7, 8, b't', b'o', b'k'][..]);
    assert_eq!(
        parse_session_body(&out),
        Some((0x0102_0304_0506_0708, &b"tok"[..]))
    );
    let mut out = BytesMut::new();
    session_body(&mut out, 42, b"");
    assert_eq!(parse_session_body(&out), Some((42, &b""[..])));
    for n in 0..8 {
        assert_eq!(parse_session_body(&out[..n]), None);
    }
}

#[test]
fn redirect_body_round_trip() {
    let mut out = BytesMut::new();
    redirect_body(&mut out, "10.0.0.2:7000", b"secret");
    assert_eq!(&out[..2], &[0, 13]);
    assert_eq!(&out[2..15], b"10.0.0.2:7000");
    assert_eq!(
        parse_redirect_body(&out),
        Some(("10.0.0.2:7000", &b"secret"[..]))
    );
    let mut out = BytesMut::new();
    redirect_body(&mut out, "", b"");
    assert_eq!(parse_redirect_body(&out), Some(("", &b""[..])));
    // Short and lying lengths.
    assert_eq!(parse_redirect_body(&[]), None);
    assert_eq!(parse_redirect_body(&[0]), None);
    assert_eq!(parse_redirect_body(&[0, 10, b'a', b'b']), None);
    assert_eq!(parse_redirect_body(&[0xff, 0xff]), None);
    assert_eq!(
        parse_redirect_body(&[0, 2, b'a', b'b']),
        Some(("ab", &[][..]))
    );
    // Non-UTF-8 address.
    assert_eq!(parse_redirect_body(&[0, 2, 0xc3, 0x28, 1]), None);
}

// ---- property tests ----

fn link_strategy() -> impl Strategy<Value = Link> {
    prop::sample::select(LINKS.to_vec())
}

fn header_strategy(link: Link) -> impl Strategy<Value = Header> {
    let kinds: Vec<Kind> = Kind::ALL
        .iter()
        .copied()
        .filter(|k| link.accepts(*k as u8).is_some())
        .collect();
    (
        prop::sample::select(kinds),
        any::<u8>(),
        any::<u16>(),
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
    )
        .prop_map(|(kind, flags, code, msg_id, req_id, seq)| Header {
            kind,
            flags,
            code,
            msg_id,
            req_id,
            seq,
        })
}

/// (link, max_frame, frames, chunk sizes)
type Batch = (Link, u32, Vec<(Header, Vec<u8>)>, Vec<usize>);

fn batch_strategy() -> impl Strategy<Value = Batch> {
    (link_strategy(), 20u32..=600).prop_flat_map(|(link, max)| {
        let body_max = max as usize - HEADER_LEN;
        let frame = (
            header_strategy(link),
            prop::collection::vec(any::<u8>(), 0..=body_max),
        );
        (
            Just(link),
            Just(max),
            prop::collection::vec(frame, 0..8),
            prop::collection::vec(1usize..200, 1..16),
        )
    })
}

/// A length field that lies or tells the truth, then arbitrary bytes.
fn hostile_input(max: u32) -> impl Strategy<Value = Vec<u8>> {
    let len = prop_oneof![
        any::<u32>(),
        0u32..20,
        Just(max),
        max.saturating_add(1)..=u32::MAX,
        20u32..=max.max(20),
    ];
    let kind = prop_oneof![
        any::<u8>(),
        prop::sample::select(vec![1u8, 2, 3, 4, 5, 0x81, 0x83, 0x87])
    ];
    (
        len,
        kind,
        prop::collection::vec(any::<u8>(), 0..1200),
        any::<bool>(),
    )
        .prop_map(|(len, kind, rest, framed)| {
            if !framed {
                return rest;
            }
            let mut v = len.to_be_bytes().to_vec();
            v.push(kind);
            v.extend_from_slice(&rest);
            v
        })
}

proptest! {
    #[test]
    fn prop_single_round_trip(
        (link, max, header, body) in (link_strategy(), 20u32..=4096).prop_flat_map(|(link, max)| (
            Just(link),
            Just(max),
            header_strategy(link),
            prop::collection::vec(any::<u8>(), 0..=(max as usize - HEADER_LEN)),
        ))
    ) {
        let d = Decoder::new(link, max);
        let mut buf = BytesMut::new();
        encode(&mut buf, &header, &body);
        prop_assert_eq!(buf.len(), frame_len(body.len()));
        prop_assert_eq!(d.needed(&buf), 0);
        let f = d.decode(&mut buf).expect("valid").expect("complete");
        prop_assert_eq!(f.header, header);
        prop_assert_eq!(&f.body[..], &body[..]);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn prop_batched_chunked_round_trip((link, max, frames, chunks) in batch_strategy()) {
        let d = Decoder::new(link, max);
        let mut wire = BytesMut::new();
        for (h, b) in &frames {
            encode(&mut wire, h, b);
        }
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut pos = 0;
        let mut i = 0;
        while pos < wire.len() {
            let n = chunks[i % chunks.len()].min(wire.len() - pos);
            i += 1;
            buf.extend_from_slice(&wire[pos..pos + n]);
            pos += n;
            while let Some(f) = d.decode(&mut buf).expect("valid") {
                got.push(f);
            }
            prop_assert!(d.needed(&buf) >= 1 || buf.is_empty() && pos == wire.len());
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got.len(), frames.len());
        for (f, (h, b)) in got.iter().zip(&frames) {
            prop_assert_eq!(&f.header, h);
            prop_assert_eq!(&f.body[..], &b[..]);
        }
    }

    #[test]
    fn prop_never_panics_on_arbitrary_chunks(
        link in link_strategy(),
        max in 0u32..=700,
        input in prop::collection::vec(any::<u8>(), 0..1500),
        chunks in prop::collection::vec(1usize..300, 1..8),
    ) {
        let d = Decoder::new(link, max);
        let mut buf = BytesMut::new();
        let mut pos = 0;
        let mut i = 0;
        'outer: while pos < input.len() {
            let n = chunks[i % chunks.len()].min(input.len() - pos);
            i += 1;
            buf.extend_from_slice(&input[pos..pos + n]);
            pos += n;
            loop {
                match d.decode(&mut buf) {
                    Ok(Some(f)) => prop_assert!(f.body.len() + HEADER_LEN <= max as usize),
                    Ok(None) => break,
                    Err(_) => break 'outer,
                }
            }
        }
    }

    #[test]
    fn prop_reader_bounded_by_needed(
        link in link_strategy(),
        (max, input) in (0u32..=700).prop_flat_map(|max| (Just(max), hostile_input(max))),
        short_reads in prop::collection::vec(1usize..64, 1..8),
    ) {
        let d = Decoder::new(link, max);
        let bound = LEN_PREFIX + max as usize;
        let mut buf = BytesMut::new();
        let mut pos = 0;
        let mut i = 0;
        loop {
            match d.decode(&mut buf) {
                Err(_) => break,
                Ok(Some(f)) => {
                    prop_assert!(f.body.len() + HEADER_LEN <= max as usize);
                }
                Ok(None) => {
                    let need = d.needed(&buf);
                    prop_assert!(need >= 1, "incomplete but needed 0");
                    prop_assert!(buf.len() + need <= bound);
                    if pos == input.len() {
                        break;
                    }
                    // A read of at most `need` bytes, maybe a short one.
                    let n = need.min(short_reads[i % short_reads.len()]).min(input.len() - pos);
                    i += 1;
                    buf.extend_from_slice(&input[pos..pos + n]);
                    pos += n;
                    prop_assert!(buf.len() <= bound);
                }
            }
        }
    }

    #[test]
    fn prop_session_redirect_round_trip(
        player in any::<u64>(),
        addr in "\\PC{0,40}",
        token in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut out = BytesMut::new();
        session_body(&mut out, player, &token);
        prop_assert_eq!(parse_session_body(&out), Some((player, &token[..])));
        let mut out = BytesMut::new();
        redirect_body(&mut out, &addr, &token);
        prop_assert_eq!(parse_redirect_body(&out), Some((addr.as_str(), &token[..])));
        // Any truncation that cuts into the address is rejected.
        for n in 0..2 + addr.len() {
            prop_assert_eq!(parse_redirect_body(&out[..n]), None);
        }
    }

    #[test]
    fn prop_body_parsers_never_panic(body in prop::collection::vec(any::<u8>(), 0..80)) {
        let _ = parse_session_body(&body);
        if let Some((addr, token)) = parse_redirect_body(&body) {
            prop_assert_eq!(2 + addr.len() + token.len(), body.len());
        }
    }
}
