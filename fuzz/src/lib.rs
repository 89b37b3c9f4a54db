//! What the fuzz targets share: the chunked frame-decoder check (both links
//! use it), structured snapshot images (`image`), and the switches for
//! findings already reported and for tracing.
//!
//! Each target in `fuzz_targets/` is a thin `fuzz_target!` around one
//! function here or in the target itself; docs/reliability.md lists what
//! each one checks.

use bytes::BytesMut;
use slg_gateway::protocol::{
    encode, encode_head, frame_len, parse_redirect_body, parse_session_body, redirect_body,
    session_body, DecodeError, Decoder, Frame, Kind, Link, LEN_PREFIX,
};
use std::sync::OnceLock;

/// Whether the targets check the findings reported and not yet fixed in
/// docs/reliability.md ("Findings") too. Off by default, so a run goes on
/// past a known bug and looks for new ones; `SLG_FUZZ_KNOWN=1` turns the
/// checks on (to replay `fuzz/regressions/` and see whether a fix holds).
pub fn check_known() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("SLG_FUZZ_KNOWN").is_some_and(|v| v != "0"))
}

/// `SLG_FUZZ_TRACE=1`: the structured targets print what they do (to
/// read a crash input as a story).
pub fn trace() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("SLG_FUZZ_TRACE").is_some_and(|v| v != "0"))
}

/// `max_frame` values the decoder targets pick from (one byte of input):
/// below the header, the smallest legal, the gateway's bounds and default.
const MAX_FRAMES: [u32; 8] = [0, 19, 20, 24, 64, 1024, 65536, 16 * 1024 * 1024];

/// The input cut into chunks as a socket could deliver it: byte 0 picks
/// the decoder (link and `max_frame`), byte 1 how many of the next bytes
/// are chunk sizes (1..=256 bytes each, cycled), the rest is the stream.
pub struct Chunked<'a> {
    pub decoder: Decoder,
    pub sizes: Vec<usize>,
    pub stream: &'a [u8],
}

impl<'a> Chunked<'a> {
    pub fn parse(data: &'a [u8], links: [Link; 2]) -> Option<Chunked<'a>> {
        let (&pick, rest) = data.split_first()?;
        let (&n, rest) = rest.split_first()?;
        let n = usize::from(n % 16).min(rest.len());
        let (sizes, stream) = rest.split_at(n);
        let link = links[usize::from(pick & 1)];
        let max = MAX_FRAMES[usize::from(pick >> 1) % MAX_FRAMES.len()];
        Some(Chunked {
            decoder: Decoder::new(link, max),
            sizes: sizes.iter().map(|&s| usize::from(s) + 1).collect(),
            stream,
        })
    }
}

/// What decoding a stream gave: the frames, the bytes they took, and the
/// error that stopped it (if any).
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    pub frames: Vec<Frame>,
    pub consumed: usize,
    pub error: Option<DecodeError>,
}

/// Decode `stream` fed in chunks of `sizes` (one chunk when empty), the
/// way the connection's read loop does, checking the decoder's contract at
/// every step.
pub fn decode_chunked(d: &Decoder, stream: &[u8], sizes: &[usize]) -> Decoded {
    let mut buf = BytesMut::new();
    let mut out = Decoded {
        frames: Vec::new(),
        consumed: 0,
        error: None,
    };
    let mut at = 0;
    let mut turn = 0;
    while at < stream.len() {
        let n = match sizes {
            [] => stream.len(),
            s => s[turn % s.len()],
        };
        turn += 1;
        let end = stream.len().min(at + n);
        buf.extend_from_slice(&stream[at..end]);
        at = end;
        loop {
            let (len, cap) = (buf.len(), buf.capacity());
            match d.decode(&mut buf) {
                Ok(Some(f)) => {
                    let took = len - buf.len();
                    assert_eq!(took, frame_len(f.body.len()), "a frame is 24 + body bytes");
                    assert!(buf.capacity() <= cap, "decode grew the buffer");
                    assert!(d.link().accepts(f.header.kind as u8).is_some());
                    out.consumed += took;
                    out.frames.push(f);
                }
                Ok(None) => {
                    assert_eq!(buf.len(), len, "an incomplete frame left the buffer alone");
                    let need = d.needed(&buf);
                    assert!(need >= 1, "incomplete, yet nothing more needed");
                    let cap = LEN_PREFIX.saturating_add(d.max_frame() as usize);
                    assert!(
                        need <= cap.saturating_sub(buf.len()),
                        "needed {need} beyond one maximal frame"
                    );
                    break;
                }
                Err(e) => {
                    assert_eq!(buf.len(), len, "an error left the buffer alone");
                    // The same error again: decode is stateless.
                    assert_eq!(d.decode(&mut buf), Err(e));
                    out.error = Some(e);
                    return out;
                }
            }
        }
    }
    out
}

/// The decoder target of one link pair: no panic, chunking does not change
/// what is decoded, re-encoding gives the bytes back, and the structured
/// bodies (SESSION, REDIRECT) round-trip.
pub fn check_decoder(data: &[u8], links: [Link; 2]) {
    let Some(input) = Chunked::parse(data, links) else {
        return;
    };
    let d = input.decoder;
    let chunked = decode_chunked(&d, input.stream, &input.sizes);
    let whole = decode_chunked(&d, input.stream, &[]);
    assert_eq!(chunked, whole, "chunking changed the result");
    // One byte at a time, the hardest split, on short streams.
    if input.stream.len() <= 512 {
        assert_eq!(decode_chunked(&d, input.stream, &[1]), whole);
    }
    let mut again = BytesMut::new();
    for f in &whole.frames {
        let before = again.len();
        encode(&mut again, &f.header, &f.body);
        assert_eq!(
            again[before..before + 24],
            encode_head(&f.header, f.body.len())
        );
        check_body(f);
    }
    assert_eq!(
        &again[..],
        &input.stream[..whole.consumed],
        "re-encoding the frames gave other bytes"
    );
}

/// SESSION and REDIRECT bodies parse, and build back to the same bytes.
fn check_body(f: &Frame) {
    match f.header.kind {
        Kind::Session => {
            if let Some((player, token)) = parse_session_body(&f.body) {
                let mut b = BytesMut::new();
                session_body(&mut b, player, token);
                assert_eq!(&b[..], &f.body[..]);
            } else {
                assert!(f.body.len() < 8);
            }
        }
        Kind::Redirect => {
            if let Some((addr, token)) = parse_redirect_body(&f.body) {
                let mut b = BytesMut::new();
                redirect_body(&mut b, addr, token);
                assert_eq!(&b[..], &f.body[..]);
            }
        }
        _ => {}
    }
}

/// Structured snapshot images, mostly within the rules `Image::decode`
/// checks and sometimes just outside them, so that the targets reach past
/// the checksum and the archive into the bounds checks and the loading of
/// players.
pub mod image {
    use arbitrary::{Result, Unstructured};
    use bytes::BytesMut;
    use slg_gateway::protocol::{encode, Header, Kind};
    use slg_gateway::snapshot::{FrameImage, Image, PlayerImage};

    /// Around the time the targets call "now" on the Unix clock.
    pub const NOW_UNIX_MS: u64 = 1_796_256_000_000;

    /// A value near the interesting ones: small, around `near`, or any.
    fn pick_u64(u: &mut Unstructured, near: u64) -> Result<u64> {
        Ok(match u.int_in_range(0..=7u8)? {
            0 => 0,
            1 => u64::MAX - u64::from(u.int_in_range(0..=3u8)?),
            2 | 3 => near.saturating_add(u64::from(u.int_in_range(0..=16u8)?)),
            4 | 5 => u64::from(u.int_in_range(0..=64u8)?),
            6 => near.saturating_sub(u64::from(u.int_in_range(0..=16u8)?)),
            _ => u.arbitrary()?,
        })
    }

    /// One outbox frame: usually a whole gateway-to-client frame with its
    /// seq, sometimes arbitrary bytes.
    fn frame(u: &mut Unstructured, seq: u64) -> Result<Vec<u8>> {
        if u.ratio(1, 8)? {
            return u.arbitrary();
        }
        let kind = *u.choose(&[
            Kind::Response,
            Kind::Push,
            Kind::Response,
            Kind::Push,
            Kind::Kick,
        ])?;
        let mut h = Header::new(kind);
        h.code = u.arbitrary()?;
        h.msg_id = u.arbitrary()?;
        h.req_id = u.arbitrary()?;
        h.seq = if u.ratio(1, 16)? { u.arbitrary()? } else { seq };
        let n = u.int_in_range(0..=48usize)?;
        let body = u.bytes(n.min(u.len()))?;
        let mut out = BytesMut::new();
        encode(&mut out, &h, body);
        Ok(out.to_vec())
    }

    pub fn player(u: &mut Unstructured) -> Result<PlayerImage> {
        let id = if u.ratio(1, 16)? {
            0
        } else {
            pick_u64(u, 42)?.max(1)
        };
        let seq = pick_u64(u, 1000)?;
        let acked = if u.ratio(1, 16)? {
            pick_u64(u, seq)?
        } else {
            seq - seq.min(pick_u64(u, 8)?)
        };
        let room = (seq - acked.min(seq)).min(8);
        let kept = u.int_in_range(0..=room)?;
        let evicted_through = if u.ratio(1, 16)? {
            pick_u64(u, seq)?
        } else {
            seq - kept - (seq - kept).min(u64::from(u.int_in_range(0..=3u8)?))
        };
        let mut outbox = Vec::new();
        for i in 0..kept {
            let s = if u.ratio(1, 32)? {
                pick_u64(u, seq)?
            } else {
                seq - kept + 1 + i
            };
            outbox.push(FrameImage {
                seq: s,
                frame: frame(u, s)?,
            });
        }
        Ok(PlayerImage {
            id,
            seq,
            acked,
            outbox,
            evicted_through,
            evictions: pick_u64(u, 3)?,
            token_secret: u.arbitrary()?,
            token_expires_unix_ms: pick_u64(u, NOW_UNIX_MS)?,
            detached_unix_ms: pick_u64(u, NOW_UNIX_MS)?,
        })
    }

    pub fn image(u: &mut Unstructured) -> Result<Image> {
        let n = u.int_in_range(0..=4usize)?;
        let mut players = Vec::with_capacity(n);
        for _ in 0..n {
            players.push(player(u)?);
        }
        Ok(Image {
            taken_unix_ms: pick_u64(u, NOW_UNIX_MS)?,
            shards: u.arbitrary()?,
            players,
        })
    }

    /// The rules of `Image::decode` written again from its documentation
    /// (snapshot/mod.rs), to compare with: `Err` names the broken rule.
    pub fn model_check(img: &Image) -> std::result::Result<(), &'static str> {
        for p in &img.players {
            if p.id == 0 {
                return Err("player id 0");
            }
            if p.seq >= slg_gateway::snapshot::MAX_SEQ {
                return Err("seq beyond any real stream");
            }
            if p.acked > p.seq || p.evicted_through > p.seq {
                return Err("acked or evicted beyond the last seq");
            }
            for (i, f) in p.outbox.iter().enumerate() {
                if f.seq <= p.acked || f.seq <= p.evicted_through || f.seq > p.seq {
                    return Err("outbox frame outside (acked, seq]");
                }
                if i > 0 && p.outbox[i - 1].seq.checked_add(1) != Some(f.seq) {
                    return Err("outbox seqs not consecutive");
                }
                if f.frame.len() < 24 {
                    return Err("outbox frame shorter than a header");
                }
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&f.frame[16..24]);
                if !matches!(f.frame[4], 0x81 | 0x82) || u64::from_be_bytes(seq) != f.seq {
                    return Err("outbox frame not a RESPONSE or PUSH with its seq");
                }
            }
            if p.outbox.last().is_some_and(|l| l.seq != p.seq) {
                return Err("outbox does not end at the last seq");
            }
        }
        Ok(())
    }

    /// The file bytes with `payload` behind a header that passes: magic,
    /// version, length and checksum right, so the archive itself is tested.
    pub fn wrap(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + payload.len());
        out.extend_from_slice(&slg_gateway::snapshot::MAGIC);
        out.extend_from_slice(&slg_gateway::snapshot::VERSION.to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(payload);
        out
    }
}
