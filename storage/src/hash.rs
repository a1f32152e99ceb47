//! A fixed 64-bit hash for decisions that must be the same on every build and machine
//! (which entities are sampled for logging, the registers of a distinct count).

/// FNV-1a over `bytes`, then MurmurHash3's 64-bit finaliser (FNV alone leaves the top bits of
/// similar keys clustered). Never change it: sampled entities and stored sketches depend on it.
pub fn stable_hash64(bytes: &[u8]) -> u64 {
    stable_hash64_salted(&[], bytes)
}

/// [`stable_hash64`] of `salt` followed by `bytes` (without copying them): a hash of its own
/// for each salt, so that decisions made on different salts do not agree by construction (an
/// entity's slot says nothing of whether it is sampled for logging).
pub fn stable_hash64_salted(salt: &[u8], bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in salt.iter().chain(bytes) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}
