//! Where token secrets come from: the shell injects the OS's CSPRNG; tests
//! and the in-memory harness a seeded generator, so a run repeats.

/// A source of random bytes.
pub trait Entropy {
    fn fill(&mut self, buf: &mut [u8]);
}

/// A seeded generator (splitmix64), for tests and the in-memory harness.
pub struct SeededEntropy(pub u64);

impl Entropy for SeededEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 = shards::splitmix64(self.0.wrapping_add(0x9E37_79B9_7F4A_7C15));
            let b = self.0.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }
}
