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
                expect = Some(f.seq + 1);
                if f.frame.len() < crate::protocol::LEN_PREFIX + crate::protocol::HEADER_LEN {
                    return Err(bad("outbox frame shorter than a header"));
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

    fn image() -> Image {
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
                        frame: vec![0; 30],
                    },
                    FrameImage {
                        seq: 5,
                        frame: vec![1; 24],
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
