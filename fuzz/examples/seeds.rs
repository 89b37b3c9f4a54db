//! Writes the checked-in seed corpus: a handful of valid inputs per target
//! in `fuzz/corpus/<target>/seed-*`. Run from `fuzz/` (no sanitizer needed):
//!
//!     cargo +nightly run --example seeds
//!
//! The inputs follow each target's layout (see the target's header).

use bytes::BytesMut;
use slg_gateway::protocol::{encode, redirect_body, session_body, Header, Kind};
use slg_gateway::snapshot::{FrameImage, Image, PlayerImage};
use std::path::Path;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let targets: [(&str, Vec<Vec<u8>>); 9] = [
        ("client_decoder", client_decoder()),
        ("backend_decoder", backend_decoder()),
        ("http_request", http_request()),
        ("snapshot_image", snapshot_image()),
        ("handoff_image", handoff_image()),
        ("token", token()),
        ("config", config()),
        ("core_events", core_events()),
        ("websocket", websocket()),
    ];
    for (target, seeds) in targets {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        for (i, seed) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), seed)?;
        }
        println!("{target}: {} seeds", seeds.len());
    }
    Ok(())
}

fn frame(
    out: &mut BytesMut,
    kind: Kind,
    code: u16,
    msg_id: u32,
    req_id: u32,
    seq: u64,
    body: &[u8],
) {
    let h = Header {
        kind,
        flags: 0,
        code,
        msg_id,
        req_id,
        seq,
    };
    encode(out, &h, body);
}

/// `pick` (link, max_frame), chunk sizes, then the stream.
fn chunked(pick: u8, sizes: &[u8], stream: &[u8]) -> Vec<u8> {
    let mut v = vec![pick, sizes.len() as u8];
    v.extend_from_slice(sizes);
    v.extend_from_slice(stream);
    v
}

/// Byte 0 of the decoder targets: link (bit 0), max_frame 65536 (index 6).
const LINK_A: u8 = 6 << 1;
const LINK_B: u8 = (6 << 1) | 1;

fn token_bytes(player: u64) -> Vec<u8> {
    let mut t = player.to_be_bytes().to_vec();
    t.extend_from_slice(&[0x5a; 16]);
    t
}

fn client_decoder() -> Vec<Vec<u8>> {
    let mut up = BytesMut::new();
    frame(&mut up, Kind::Request, 0, 1, 1, 0, b"42");
    frame(&mut up, Kind::Request, 0, 150, 2, 0, b"hello");
    frame(&mut up, Kind::Ack, 0, 0, 0, 2, b"");
    frame(&mut up, Kind::Ping, 0, 0, 0, 2, b"");
    frame(&mut up, Kind::Resume, 0, 0, 0, 7, &token_bytes(42));
    frame(&mut up, Kind::Bye, 0, 0, 0, 0, b"");
    let mut down = BytesMut::new();
    let mut body = BytesMut::new();
    session_body(&mut body, 42, &token_bytes(42));
    frame(&mut down, Kind::Session, 0, 0, 0, 3, &body);
    frame(&mut down, Kind::Push, 0, 2001, 0, 4, b"push 1");
    frame(&mut down, Kind::Response, 0, 150, 2, 5, b"hello");
    frame(&mut down, Kind::Pong, 0, 0, 0, 5, b"");
    let mut body = BytesMut::new();
    redirect_body(&mut body, "10.0.0.5:7000", &token_bytes(42));
    frame(&mut down, Kind::Redirect, 0, 0, 0, 0, &body);
    frame(&mut down, Kind::Kick, 0x8101, 0, 0, 0, b"");
    vec![
        chunked(LINK_A, &[], &up),
        chunked(LINK_A, &[2, 9, 30], &up),
        chunked(LINK_B, &[], &down),
        chunked(LINK_B, &[0, 5], &down),
        // A lying length, then a kind from the other direction.
        chunked(LINK_A, &[], &[0xff, 0xff, 0xff, 0xff, 1]),
        chunked(LINK_A, &[], &down[..30]),
    ]
}

fn backend_decoder() -> Vec<Vec<u8>> {
    let mut up = BytesMut::new();
    frame(&mut up, Kind::Response, 0, 150, 2, 42, b"hello");
    frame(&mut up, Kind::Response, 9, 1, 1, 42, b"no");
    frame(&mut up, Kind::Pong, 0, 0, 0, 0, b"");
    let mut down = BytesMut::new();
    frame(&mut down, Kind::Request, 0, 150, 2, 42, b"hello");
    frame(&mut down, Kind::Ping, 0, 0, 0, 0, b"");
    vec![
        chunked(LINK_A, &[], &up),
        chunked(LINK_A, &[1, 23, 4], &up),
        chunked(LINK_B, &[], &down),
        chunked(LINK_B, &[7], &down),
        chunked(LINK_A, &[], &[0, 0, 0, 10, 0x81]),
    ]
}

fn http_request() -> Vec<Vec<u8>> {
    let reqs: [&[u8]; 7] = [
        b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n",
        b"POST /v1/push?players=1,2&msg=7 HTTP/1.1\r\nAuthorization: Bearer x\r\nContent-Length: 5\r\n\r\nhello",
        b"POST /v1/broadcast?msg=9 HTTP/1.1\r\nContent-Length: 2\r\n\r\nhiGET /metrics HTTP/1.1\r\n\r\n",
        b"GET /v1/players?after=10&limit=5 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        b"POST /v1/kick?player=7&resume=0 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET /v1/push?players=1%2C2&to=gw%2Db&msg=7 HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"POST /v1/migrate?player=5&to=gw-b HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
    ];
    reqs.iter()
        .enumerate()
        .map(|(i, r)| {
            let mut v = vec![i as u8 % 4 + 2];
            v.extend_from_slice(r);
            v
        })
        .collect()
}

fn image() -> Image {
    let mut outbox = Vec::new();
    for seq in 4..=5 {
        let mut f = BytesMut::new();
        frame(&mut f, Kind::Push, 0, 2001, 0, seq, b"push");
        outbox.push(FrameImage {
            seq,
            frame: f.to_vec(),
        });
    }
    Image {
        taken_unix_ms: slg_gateway_fuzz::image::NOW_UNIX_MS - 1000,
        shards: 2,
        players: vec![
            PlayerImage {
                id: 42,
                seq: 5,
                acked: 3,
                outbox,
                evicted_through: 0,
                evictions: 0,
                token_secret: [7; 16],
                token_expires_unix_ms: slg_gateway_fuzz::image::NOW_UNIX_MS + 60_000,
                detached_unix_ms: slg_gateway_fuzz::image::NOW_UNIX_MS - 1000,
            },
            PlayerImage {
                id: 43,
                seq: 9,
                acked: 9,
                outbox: Vec::new(),
                evicted_through: 2,
                evictions: 2,
                token_secret: [9; 16],
                token_expires_unix_ms: slg_gateway_fuzz::image::NOW_UNIX_MS + 60_000,
                detached_unix_ms: slg_gateway_fuzz::image::NOW_UNIX_MS,
            },
        ],
    }
}

fn prefixed(head: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut v = head.to_vec();
    v.extend_from_slice(rest);
    v
}

fn snapshot_image() -> Vec<Vec<u8>> {
    let file = image().encode().expect("the seed image encodes");
    let empty = Image {
        taken_unix_ms: 0,
        shards: 1,
        players: Vec::new(),
    }
    .encode()
    .expect("the empty image encodes");
    vec![
        prefixed(&[0], &file),
        prefixed(&[1], &file[24..]),
        prefixed(&[0], &empty),
        prefixed(
            &[2],
            &[3, 1, 42, 4, 200, 3, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        ),
    ]
}

fn handoff_image() -> Vec<Vec<u8>> {
    let file = image().encode().expect("the seed image encodes");
    vec![
        prefixed(&[0, 0], &file[24..]),
        prefixed(&[0, 1], &file[24..]),
        prefixed(&[0, 0x12], &file[24..]),
        prefixed(
            &[1, 2],
            &[3, 1, 42, 4, 200, 3, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        ),
    ]
}

fn token() -> Vec<Vec<u8>> {
    let mut session = BytesMut::new();
    session_body(&mut session, 42, &token_bytes(42));
    let mut redirect = BytesMut::new();
    redirect_body(&mut redirect, "gw-b.example:7000", &token_bytes(42));
    vec![
        token_bytes(42),
        session.to_vec(),
        redirect.to_vec(),
        [token_bytes(7), vec![9; 40]].concat(),
    ]
}

fn config() -> Vec<Vec<u8>> {
    let text = slg_gateway::config::DEFAULT_RON;
    let bare: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .map(|l| format!("{l}\n"))
        .collect();
    let clustered = bare.replace(
        "cluster: None,",
        "cluster: Some((redis: \"redis://127.0.0.1:6379/\", gateway_id: \"gw-a\", \
         advertise: \"10.0.0.5:7000\", ws_advertise: Some(\"wss://gw-a.example/ws\"), \
         lease: \"10s\", when_redis_down: Local)),",
    );
    let other = bare
        .replace("shards: None", "shards: Some(4)")
        .replace("rate: None", "rate: Some((per_second: 50.0, burst: 10.0))")
        .replace("ws_listen: None", "ws_listen: Some(\"127.0.0.1:7002\")");
    vec![
        text.as_bytes().to_vec(),
        bare.into_bytes(),
        clustered.into_bytes(),
        other.into_bytes(),
    ]
}

/// The byte layout `arbitrary` reads for the `core_events` input.
struct Events(Vec<u8>);

impl Events {
    fn setup(shards: u8, outbox: u8, write_queue: u8, inflight: u8, seed: u64) -> Events {
        let mut v = vec![shards, outbox, write_queue, inflight];
        v.extend_from_slice(&seed.to_le_bytes());
        Events(v)
    }

    /// Variant `i` of an enum of `n` (arbitrary maps a u32 onto the range).
    fn variant(&mut self, i: u32, n: u32) -> &mut Events {
        let v = ((u64::from(i) << 32).div_ceil(u64::from(n))) as u32;
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Events {
        self.0.extend_from_slice(b);
        self
    }
}

/// Variant indexes of `Ev` in core_events.rs (16 of them).
const EV: u32 = 16;
const CONNECT: u32 = 0;
const LOGIN: u32 = 1;
const RESUME: u32 = 2;
const REQUEST: u32 = 3;
const PUSH: u32 = 4;
const ACK: u32 = 5;
const HANG_UP: u32 = 7;
const ANSWER: u32 = 10;
const ADVANCE: u32 = 13;
const RUN: u32 = 15;

fn core_events() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (shards, outbox) in [(0u8, 0u8), (1, 1), (2, 3)] {
        let mut e = Events::setup(shards, outbox, 0, 3, 7);
        for p in 0..2u8 {
            e.variant(CONNECT, EV).bytes(&[p, p]);
            e.variant(LOGIN, EV).bytes(&[p]);
            e.variant(RUN, EV);
            e.variant(ANSWER, EV).bytes(&[0, 0, 0]);
            e.variant(RUN, EV);
        }
        for i in 0..4u8 {
            e.variant(PUSH, EV).bytes(&[i % 2, 8]);
            e.variant(REQUEST, EV).bytes(&[i % 2, 2, 16]);
            e.variant(RUN, EV);
            e.variant(ANSWER, EV).bytes(&[0, 0, 0]);
        }
        e.variant(ACK, EV).bytes(&[0, 1, 0]);
        e.variant(RUN, EV);
        e.variant(HANG_UP, EV).bytes(&[0, 1]);
        e.variant(RUN, EV);
        e.variant(PUSH, EV).bytes(&[0, 3]);
        e.variant(CONNECT, EV).bytes(&[0, 1]);
        e.variant(RESUME, EV).bytes(&[2]).variant(0, 5);
        e.variant(RUN, EV);
        e.variant(ADVANCE, EV).bytes(&[200, 0, 3]);
        e.variant(RUN, EV);
        seeds.push(e.0);
    }
    seeds
}

/// A client's (masked) binary WebSocket message.
fn ws_binary(payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut v = vec![0x82];
    if payload.len() < 126 {
        v.push(0x80 | payload.len() as u8);
    } else {
        v.push(0x80 | 126);
        v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    v.extend_from_slice(&mask);
    v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    v
}

fn websocket() -> Vec<Vec<u8>> {
    let upgrade: &[u8] =
        b"GET /ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let mut login = BytesMut::new();
    frame(&mut login, Kind::Request, 0, 1, 1, 0, b"42");
    let mut ping = BytesMut::new();
    frame(&mut ping, Kind::Ping, 0, 0, 0, 0, b"");
    let frames = [ws_binary(&login), ws_binary(&ping)].concat();
    let close = [0x88, 0x82, 1, 2, 3, 4, 0x03 ^ 1, 0xe8 ^ 2];
    vec![
        prefixed(&[1, 0], &frames),
        prefixed(&[1, 2, 3, 40], &frames),
        prefixed(&[0, 1, 17], &[upgrade, &frames[..]].concat()),
        prefixed(&[3, 0], &[&frames[..], &close[..]].concat()),
        prefixed(&[0, 0], b"GET /other HTTP/1.1\r\nHost: gw\r\n\r\n"),
    ]
}
