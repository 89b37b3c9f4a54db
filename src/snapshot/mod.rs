//! Snapshots of player state (seq, acked, outbox, token, linger) for a
//! restart that loses nothing: an rkyv image behind a small header with a
//! version and a CRC-32 checksum, written atomically by a [`SnapshotStore`].
//!
//! File layout (all integers little-endian):
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `SLGSNAP\0` |
//! | 8 | 4 | format version ([`VERSION`]) |
//! | 12 | 4 | CRC-32 of the payload |
//! | 16 | 8 | payload length |
//! | 24 | n | payload: rkyv archive of [`Image`] |

pub mod store;

pub use store::{LocalDir, SnapshotStore};

use rkyv::{Archive, Deserialize, Serialize};

/// First bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"SLGSNAP\0";
/// Format version written by this build; another version is refused.
pub const VERSION: u32 = 1;
const HEADER: usize = 24;

/// Every player of a gateway at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct Image {
    /// Wall-clock time of the snapshot, ms since the Unix epoch.
    pub taken_unix_ms: u64,
    /// Shard count of the gateway that wrote it (informative: players are
    /// homed again by hash on load).
    pub shards: u32,
    pub players: Vec<PlayerImage>,
}

/// One player.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct PlayerImage {
    pub id: u64,
    /// Last seq assigned.
    pub seq: u64,
    pub acked: u64,
    /// Unacknowledged frames, whole and encoded, oldest first.
    pub outbox: Vec<FrameImage>,
    /// Highest seq evicted unacknowledged.
    pub evicted_through: u64,
    pub evictions: u64,
    pub token_secret: [u8; 16],
    /// Token expiry, ms since the Unix epoch.
    pub token_expires_unix_ms: u64,
    /// Since when the player has had no session, ms since the Unix epoch.
    pub detached_unix_ms: u64,
}

/// One outbox frame.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct FrameImage {
    pub seq: u64,
    pub frame: Vec<u8>,
}

/// Why a snapshot file cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("too short to be a snapshot ({0} bytes)")]
    Truncated(usize),
    #[error("not a snapshot file (bad magic)")]
    Magic,
    #[error("snapshot format version {found}, this build reads {VERSION}")]
    Version { found: u32 },
    #[error("payload length {declared} but {actual} bytes follow the header")]
    Length { declared: u64, actual: usize },
    #[error("checksum mismatch: the file is corrupt")]
    Checksum,
    #[error("payload does not decode: {0}")]
    Decode(String),
    #[error("player {player}: {what}")]
    Bounds { player: u64, what: String },
}

impl Image {
    /// The file bytes of this image.
    pub fn encode(&self) -> Result<Vec<u8>, SnapshotError> {
        let payload = rkyv::to_bytes::<rkyv::rancor::Error>(self)
            .map_err(|e| SnapshotError::Decode(e.to_string()))?;
        let mut out = Vec::with_capacity(HEADER + payload.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// Validate (magic, version, length, checksum, archive, bounds) and decode.
    pub fn decode(bytes: &[u8]) -> Result<Image, SnapshotError> {
        if bytes.len() < HEADER {
            return Err(SnapshotError::Truncated(bytes.len()));
        }
        let (head, payload) = bytes.split_at(HEADER);
        if head[..8] != MAGIC {
            return Err(SnapshotError::Magic);
        }
        let word = |at: usize| -> [u8; 4] {
            let mut w = [0u8; 4];
            w.copy_from_slice(&head[at..at + 4]);
            w
        };
        let version = u32::from_le_bytes(word(8));
        if version != VERSION {
            return Err(SnapshotError::Version { found: version });
        }
        let crc = u32::from_le_bytes(word(12));
        let mut len = [0u8; 8];
        len.copy_from_slice(&head[16..24]);
        let declared = u64::from_le_bytes(len);
        if declared != payload.len() as u64 {
            return Err(SnapshotError::Length {
                declared,
                actual: payload.len(),
            });
        }
        if crc32fast::hash(payload) != crc {
            return Err(SnapshotError::Checksum);
        }
        // rkyv wants an aligned buffer; validation (bytecheck) runs here.
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(payload.len());
        aligned.extend_from_slice(payload);
        let image = rkyv::from_bytes::<Image, rkyv::rancor::Error>(&aligned)
            .map_err(|e| SnapshotError::Decode(e.to_string()))?;
        image.check()?;
        Ok(image)
    }

    /// The rules a player image must keep to be loaded.
    fn check(&self) -> Result<(), SnapshotError> {
        for p in &self.players {
            let bad = |what: &str| SnapshotError::Bounds {
                player: p.id,
                what: what.to_string(),
            };
            if p.id == 0 {
                return Err(bad("player id 0"));
            }
            // No real stream comes near it (2^62 frames), and the next
            // frame's seq must not wrap to 0, the unsequenced value.
            if p.seq >= MAX_SEQ {
                return Err(bad("seq beyond any real stream"));
            }
            if p.acked > p.seq || p.evicted_through > p.seq {
                return Err(bad("acked or evicted beyond the last seq"));
            }
            let mut expect = None;
            for f in &p.outbox {
                if f.seq <= p.acked || f.seq <= p.evicted_through || f.seq > p.seq {
                    return Err(bad("outbox frame outside (acked, seq]"));
                }
                if expect.is_some_and(|e| e != f.seq) {
                    return Err(bad("outbox seqs not consecutive"));
                }
                expect = f.seq.checked_add(1);
                let head = crate::protocol::LEN_PREFIX + crate::protocol::HEADER_LEN;
                if f.frame.len() < head {
                    return Err(bad("outbox frame shorter than a header"));
                }
                // An outbox holds sequenced frames only, each with its own
                // seq: anything else would be replayed to the client as is.
                let kind = f.frame[crate::protocol::LEN_PREFIX];
                let sequenced = [crate::protocol::Kind::Response, crate::protocol::Kind::Push]
                    .iter()
                    .any(|k| *k as u8 == kind);
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&f.frame[head - 8..head]);
                if !sequenced || u64::from_be_bytes(seq) != f.seq {
                    return Err(bad("outbox frame not a RESPONSE or PUSH with its seq"));
                }
            }
            if let Some(last) = p.outbox.last() {
                if last.seq != p.seq {
                    return Err(bad("outbox does not end at the last seq"));
                }
            }
        }
        Ok(())
    }
}

/// Seqs at or beyond this are refused in an image (see `Image::check`).
pub const MAX_SEQ: u64 = 1 << 62;

/// Wall-clock now, ms since the Unix epoch.
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sequenced frame as an outbox keeps it.
    fn frame(kind: crate::protocol::Kind, seq: u64, body: &[u8]) -> Vec<u8> {
        let mut h = crate::protocol::Header::new(kind);
        h.seq = seq;
        let mut v = crate::protocol::encode_head(&h, body.len()).to_vec();
        v.extend_from_slice(body);
        v
    }

    fn image() -> Image {
        use crate::protocol::Kind;
        Image {
            taken_unix_ms: 1_700_000_000_000,
            shards: 4,
            players: vec![PlayerImage {
                id: 42,
                seq: 5,
                acked: 3,
                outbox: vec![
                    FrameImage {
                        seq: 4,
                        frame: frame(Kind::Response, 4, b"answer"),
                    },
                    FrameImage {
                        seq: 5,
                        frame: frame(Kind::Push, 5, b""),
                    },
                ],
                evicted_through: 0,
                evictions: 0,
                token_secret: [7; 16],
                token_expires_unix_ms: 1_700_000_100_000,
                detached_unix_ms: 1_700_000_000_000,
            }],
        }
    }

    #[test]
    fn round_trip() {
        let img = image();
        let bytes = img.encode().expect("encode");
        assert_eq!(&bytes[..8], b"SLGSNAP\0");
        assert_eq!(Image::decode(&bytes), Ok(img));
    }

    #[test]
    fn every_damage_is_caught() {
        let bytes = image().encode().expect("encode");
        assert_eq!(
            Image::decode(&bytes[..10]),
            Err(SnapshotError::Truncated(10))
        );
        assert!(matches!(
            Image::decode(&bytes[..bytes.len() - 1]),
            Err(SnapshotError::Length { .. })
        ));
        let mut flipped = bytes.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x40;
        assert_eq!(Image::decode(&flipped), Err(SnapshotError::Checksum));
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert_eq!(Image::decode(&magic), Err(SnapshotError::Magic));
        let mut version = bytes.clone();
        version[8] = 9;
        assert_eq!(
            Image::decode(&version),
            Err(SnapshotError::Version { found: 9 })
        );
    }

    #[test]
    fn out_of_bounds_players_are_refused() {
        let mut img = image();
        img.players[0].acked = 9;
        let e = Image::decode(&img.encode().expect("encode"));
        assert!(matches!(e, Err(SnapshotError::Bounds { player: 42, .. })));
        let mut img = image();
        img.players[0].outbox[1].seq = 7;
        assert!(matches!(
            Image::decode(&img.encode().expect("encode")),
            Err(SnapshotError::Bounds { .. })
        ));
    }

    #[test]
    fn fuzzed_images_are_refused_whole() {
        use crate::protocol::Kind;
        let refused = |img: Image| {
            let e = Image::decode(&img.encode().expect("encode"));
            assert!(
                matches!(e, Err(SnapshotError::Bounds { player: 42, .. })),
                "{e:?}"
            );
        };
        // fuzz/regressions/snapshot_image/crash-96fd9095...: a frame with
        // seq u64::MAX overflowed the consecutive check, and a seq there
        // would wrap the next one to 0 (the unsequenced value).
        let mut img = image();
        let p = &mut img.players[0];
        p.seq = u64::MAX;
        p.outbox = vec![FrameImage {
            seq: u64::MAX,
            frame: frame(Kind::Push, u64::MAX, b""),
        }];
        refused(img);
        let mut img = image();
        img.players[0].seq = MAX_SEQ;
        img.players[0].outbox.clear();
        refused(img);
        // fuzz/regressions/handoff_image/crash-3ae4b229...: a KICK in an
        // outbox (it would be replayed to the client with a seq).
        let mut img = image();
        img.players[0].outbox[1].frame = frame(Kind::Kick, 5, b"");
        refused(img);
        // A frame whose header says another seq than its place.
        let mut img = image();
        img.players[0].outbox[1].frame = frame(Kind::Push, 9, b"");
        refused(img);
        // fuzz/regressions/handoff_image/crash-6b5e30e6...: an evictions
        // counter at the end of its range may not overflow on the next one.
        let mut img = image();
        img.players[0].evictions = u64::MAX;
        let bytes = img.encode().expect("encode");
        let img = Image::decode(&bytes).expect("a counter is not refused");
        let now = std::time::Instant::now();
        let mut p = crate::player::Player::from_image(&img.players[0], 1, 1 << 20, now, 0);
        p.sequence(
            crate::protocol::Header::new(Kind::Push),
            bytes::Bytes::new(),
            |_| (),
        );
        assert_eq!(p.outbox.evictions(), u64::MAX);
    }

    #[test]
    fn random_bytes_never_panic() {
        let good = image().encode().expect("encode");
        let mut x = 1u64;
        for n in 0..2000 {
            let mut b = good.clone();
            x = shards::splitmix64(x);
            let i = HEADER + (x as usize % (b.len() - HEADER));
            b[i] ^= (x >> 32) as u8 | 1;
            // Fix the checksum so the archive itself is tested.
            let crc = crc32fast::hash(&b[HEADER..]);
            b[12..16].copy_from_slice(&crc.to_le_bytes());
            let _ = Image::decode(&b);
            let _ = Image::decode(&b[..(n % b.len())]);
        }
    }
}
