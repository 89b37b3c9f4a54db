//! Frame codec: length-prefixed decoding and encoding of the 24-byte frame
//! prefix (`len` + header) and body, plus the structured `SESSION` and
//! `REDIRECT` bodies (PROTOCOL.md sections 1 and 2).
//!
//! The decoder works on the connection's read buffer in place: it validates
//! `len` and `kind` as soon as the first bytes are there, returns `Ok(None)`
//! while a frame is incomplete, and splits a complete frame off the front of
//! the buffer so that the body is a zero-copy slice of it. It never grows the
//! buffer; [`Decoder::needed`] tells the reader how much more to read, never
//! more than one maximal frame, so a lying length cannot make it allocate.

use bytes::{Buf, BufMut, BytesMut};

use super::{Frame, Header, Link, HEADER_LEN, LEN_PREFIX};

/// Why a frame on the wire is a protocol error (PROTOCOL.md section 1). The
/// connection that sent it is answered with `KICK` `PROTOCOL_ERROR` and closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame length {len} is below the 20-byte header")]
    TooShort { len: u32 },
    #[error("frame length {len} exceeds max_frame {max}")]
    TooLong { len: u32, max: u32 },
    #[error("unknown frame kind 0x{0:02x} on this link")]
    UnknownKind(u8),
}

/// Stateless frame decoder for one direction of one link.
#[derive(Debug, Clone, Copy)]
pub struct Decoder {
    max_frame: u32,
    link: Link,
}

/// Reads the big-endian `len` field at the front of `buf`, if it is there.
fn peek_len(buf: &[u8]) -> Option<u32> {
    match buf {
        [a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

impl Decoder {
    /// A decoder for `link` that accepts `len` (header + body) up to
    /// `max_frame`. A `max_frame` below 20 makes every frame an error.
    pub fn new(link: Link, max_frame: u32) -> Decoder {
        Decoder { max_frame, link }
    }

    /// The largest accepted `len` (header + body).
    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }

    /// The link direction this decoder reads.
    pub fn link(&self) -> Link {
        self.link
    }

    /// Decodes the frame at the front of `buf`.
    ///
    /// `Ok(None)` means incomplete: wait for more bytes; `buf` is untouched.
    /// `len` is validated as soon as 4 bytes are buffered and `kind` as soon
    /// as 5 are, before the body arrives. On success the frame is split off
    /// the front of `buf` (`split_to` + `freeze`), so the body is a zero-copy
    /// slice of the read buffer. On error `buf` is untouched and the
    /// connection should be closed. Never reserves or allocates buffer space.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        let Some(len) = peek_len(buf) else {
            return Ok(None);
        };
        if (len as usize) < HEADER_LEN {
            return Err(DecodeError::TooShort { len });
        }
        if len > self.max_frame {
            return Err(DecodeError::TooLong {
                len,
                max: self.max_frame,
            });
        }
        let Some(&raw_kind) = buf.get(LEN_PREFIX) else {
            return Ok(None);
        };
        let kind = self
            .link
            .accepts(raw_kind)
            .ok_or(DecodeError::UnknownKind(raw_kind))?;
        let total = LEN_PREFIX.saturating_add(len as usize);
        if buf.len() < total {
            return Ok(None);
        }
        // `total >= LEN_PREFIX + HEADER_LEN` bytes are present: the getters
        // below cannot run short.
        let mut frame = buf.split_to(total).freeze();
        frame.advance(LEN_PREFIX + 1);
        let header = Header {
            kind,
            flags: frame.get_u8(),
            code: frame.get_u16(),
            msg_id: frame.get_u32(),
            req_id: frame.get_u32(),
            seq: frame.get_u64(),
        };
        Ok(Some(Frame {
            header,
            body: frame,
        }))
    }

    /// How many more bytes are needed to finish the frame at the front of
    /// `buf`: at least 1 when incomplete, 0 when a whole frame is buffered,
    /// and never more than `LEN_PREFIX + max_frame - buf.len()` (saturating),
    /// whatever `len` claims. Call it after [`Decoder::decode`] returned
    /// `Ok(None)` to size the next read.
    pub fn needed(&self, buf: &[u8]) -> usize {
        let cap = LEN_PREFIX.saturating_add(self.max_frame as usize);
        let target = match peek_len(buf) {
            // Before the length is known, ask for the smallest whole frame.
            None => LEN_PREFIX + HEADER_LEN,
            Some(len) => LEN_PREFIX.saturating_add((len as usize).max(HEADER_LEN)),
        };
        target.min(cap).saturating_sub(buf.len())
    }
}

/// Encoded size of a frame with a body of `body_len` bytes: `24 + body_len`.
pub fn frame_len(body_len: usize) -> usize {
    (LEN_PREFIX + HEADER_LEN).saturating_add(body_len)
}

/// Appends one frame (`len`, header, body) to `out`. Several calls batch
/// frames into one buffer for one write.
///
/// `body.len()` must be at most `u32::MAX - 20`; callers enforce
/// `max_frame`, which is far below that.
pub fn encode(out: &mut BytesMut, header: &Header, body: &[u8]) {
    debug_assert!(
        body.len() <= u32::MAX as usize - HEADER_LEN,
        "frame body of {} bytes does not fit the u32 len field",
        body.len()
    );
    out.reserve(frame_len(body.len()));
    out.put_slice(&encode_head(header, body.len()));
    out.put_slice(body);
}

/// Bytes before a frame's body: the `len` prefix and the header.
pub const FRAME_HEAD: usize = LEN_PREFIX + HEADER_LEN;

/// The `len` prefix and header of a frame whose body is `body_len` bytes:
/// what goes before a body kept (and shared) elsewhere. Same bound on
/// `body_len` as [`encode`].
pub fn encode_head(header: &Header, body_len: usize) -> [u8; FRAME_HEAD] {
    let mut b = [0u8; FRAME_HEAD];
    b[0..4].copy_from_slice(&((HEADER_LEN + body_len) as u32).to_be_bytes());
    b[4] = header.kind as u8;
    b[5] = header.flags;
    b[6..8].copy_from_slice(&header.code.to_be_bytes());
    b[8..12].copy_from_slice(&header.msg_id.to_be_bytes());
    b[12..16].copy_from_slice(&header.req_id.to_be_bytes());
    b[16..24].copy_from_slice(&header.seq.to_be_bytes());
    b
}

/// Appends a `SESSION` body: player id (u64 BE) then the reconnect token.
pub fn session_body(out: &mut BytesMut, player: u64, token: &[u8]) {
    out.reserve(8 + token.len());
    out.put_u64(player);
    out.put_slice(token);
}

/// Splits a `SESSION` body into player id and reconnect token; `None` when
/// it is shorter than the 8-byte player id.
pub fn parse_session_body(body: &[u8]) -> Option<(u64, &[u8])> {
    let (id, token) = body.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*id), token))
}

/// Appends a `REDIRECT` body: u16 BE address length, the address
/// (`host:port`, UTF-8), then the reconnect token valid there.
///
/// `addr` must be at most 65535 bytes (debug-asserted); a longer one is cut
/// at the last character boundary that fits, so the body stays well formed.
pub fn redirect_body(out: &mut BytesMut, addr: &str, token: &[u8]) {
    debug_assert!(
        addr.len() <= u16::MAX as usize,
        "redirect address of {} bytes does not fit a u16 length",
        addr.len()
    );
    let mut n = addr.len().min(u16::MAX as usize);
    while !addr.is_char_boundary(n) {
        n -= 1;
    }
    let addr = &addr.as_bytes()[..n];
    out.reserve(2 + addr.len() + token.len());
    out.put_u16(n as u16);
    out.put_slice(addr);
    out.put_slice(token);
}

/// Splits a `REDIRECT` body into address and token; `None` when the body is
/// shorter than its length field claims or the address is not UTF-8.
pub fn parse_redirect_body(body: &[u8]) -> Option<(&str, &[u8])> {
    let (n, rest) = body.split_first_chunk::<2>()?;
    let n = u16::from_be_bytes(*n) as usize;
    if rest.len() < n {
        return None;
    }
    let (addr, token) = rest.split_at(n);
    Some((std::str::from_utf8(addr).ok()?, token))
}

#[cfg(test)]
#[path = "codec_tests.rs"]
mod tests;
