//! Bloom filter over `(entity, feature)` prefixes.
//!
//! ```text
//! filter = bits (m bytes, bit i at byte i/8, mask 1 << (i%8)) | k u8
//! probe i (0 <= i < k) of prefix p: h = xxh3_64(p); bit (lo32(h) + i * hi32(h)) mod (8m)
//! ```

use xxhash_rust::xxh3::xxh3_64;

use crate::coding::DecodeError;

/// Hash of a prefix as the filter uses it.
pub fn hash(prefix: &[u8]) -> u64 {
    xxh3_64(prefix)
}

fn probes(h: u64) -> impl Iterator<Item = u32> {
    let h1 = h as u32;
    let h2 = (h >> 32) as u32 | 1;
    (0u32..).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)))
}

/// Builds a filter from prefix hashes.
pub fn build(hashes: &[u64], bits_per_key: usize) -> Vec<u8> {
    let k = ((bits_per_key as f64) * 0.69).round().clamp(1.0, 30.0) as usize;
    let nbits = (hashes.len() * bits_per_key).max(64);
    let nbytes = nbits.div_ceil(8);
    let nbits = (nbytes * 8) as u64;
    let mut out = vec![0u8; nbytes + 1];
    for &h in hashes {
        for p in probes(h).take(k) {
            let bit = u64::from(p) % nbits;
            out[(bit / 8) as usize] |= 1 << (bit % 8);
        }
    }
    out[nbytes] = k as u8;
    out
}

/// A loaded filter.
#[derive(Debug, Clone)]
pub struct Bloom {
    bits: Vec<u8>,
    k: usize,
}

impl Bloom {
    /// Parses a filter block.
    pub fn parse(mut raw: Vec<u8>) -> Result<Bloom, DecodeError> {
        let k = raw.pop().ok_or("empty filter")? as usize;
        if k == 0 || k > 30 || raw.is_empty() {
            return Err("bad filter parameters");
        }
        Ok(Bloom { bits: raw, k })
    }

    /// Bytes the filter holds in memory.
    pub fn memory_bytes(&self) -> usize {
        self.bits.capacity()
    }

    /// False only if the prefix with this hash was certainly not added.
    pub fn may_contain(&self, h: u64) -> bool {
        let nbits = (self.bits.len() * 8) as u64;
        probes(h).take(self.k).all(|p| {
            let bit = u64::from(p) % nbits;
            self.bits[(bit / 8) as usize] & (1 << (bit % 8)) != 0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_and_few_false_positives() {
        let hs: Vec<u64> = (0..10_000u32).map(|i| hash(&i.to_le_bytes())).collect();
        let f = Bloom::parse(build(&hs, 10)).expect("parses");
        assert!(hs.iter().all(|&h| f.may_contain(h)));
        let fp = (10_000..110_000u32).filter(|i| f.may_contain(hash(&i.to_le_bytes()))).count();
        assert!(fp < 3_000, "false positive rate {fp}/100000 too high");
    }
}
