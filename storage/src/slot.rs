//! Slots: how a sharded region splits its entities over nodes (`server/CLUSTER.md` §1).
//!
//! Every entity belongs to one of [`SLOTS`] slots, decided by its encoded entity key alone
//! ([`encode_entity_key`](crate::encode_entity_key)). Routing clients must compute the same
//! function; the tests below pin its values (and `tests/tests/cluster.rs` computes it from its
//! definition), so it can never change under stored data.

use crate::hash::stable_hash64_salted;

/// The salt of the slot hash: without one, the slot would be the top bits of the very hash that
/// decides which entities the served log samples, and a node's entities would all be sampled
/// or all not.
pub const SLOT_HASH_SALT: &[u8] = b"quiver/slot\0";

/// How many slots the entity keyspace of a sharded region is split into. Fixed for the life of
/// a cluster: changing it would move every entity.
pub const SLOTS: u16 = 4096;

/// A slot number, `0..SLOTS`.
pub type Slot = u16;

/// The slot of an encoded entity key: the top 12 bits of
/// [`stable_hash64_salted`]`(`[`SLOT_HASH_SALT`]`, key)`.
pub fn slot_of(entity_key: &[u8]) -> Slot {
    const SHIFT: u32 = 64 - SLOTS.trailing_zeros();
    (stable_hash64_salted(SLOT_HASH_SALT, entity_key) >> SHIFT) as Slot
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encode_entity_key, KeyPart};

    #[test]
    fn slots_are_a_power_of_two_and_cover_the_hash() {
        assert!(SLOTS.is_power_of_two());
        assert!(slot_of(&[0xff; 64]) < SLOTS);
    }

    /// Pinned values: a change here moves stored entities to other nodes.
    #[test]
    fn slot_values_never_change() {
        let cases: [(&[KeyPart<'_>], Slot); 6] = [
            (&[KeyPart::Str("")], 1521),
            (&[KeyPart::Str("u1")], 2258),
            (&[KeyPart::Str("user-42")], 831),
            (&[KeyPart::Int(0)], 2825),
            (&[KeyPart::Int(-7)], 553),
            (&[KeyPart::Str("u1"), KeyPart::Int(3)], 3486),
        ];
        for (parts, want) in cases {
            assert_eq!(slot_of(&encode_entity_key(parts)), want, "{parts:?}");
        }
    }

    /// The served log samples entities whose unsalted hash is small; the salt keeps that
    /// independent of the slot, so every node of a sharded region logs its share.
    #[test]
    fn sampled_entities_spread_over_every_part_of_the_slots() {
        let mut thirds = [0u32; 3];
        for i in 0..60_000u32 {
            let key = encode_entity_key(&[KeyPart::Str(&format!("u{i}"))]);
            if crate::hash::stable_hash64(&key) < u64::MAX / 10 {
                thirds[usize::from(slot_of(&key)) * 3 / usize::from(SLOTS)] += 1;
            }
        }
        // About 2,000 each; unsalted, all would be in the first third.
        assert!(thirds.iter().all(|&n| (1_700..=2_300).contains(&n)), "{thirds:?}");
    }

    #[test]
    fn entities_spread_evenly_over_slots() {
        let mut counts = vec![0u32; usize::from(SLOTS)];
        let n = 409_600u32;
        for i in 0..n {
            let key = format!("u{i}");
            counts[usize::from(slot_of(&encode_entity_key(&[KeyPart::Str(&key)])))] += 1;
        }
        // 100 per slot on average; a fair hash keeps every slot within about 5 sigma.
        let (min, max) = (counts.iter().min().copied(), counts.iter().max().copied());
        assert!(min >= Some(50) && max <= Some(150), "min {min:?} max {max:?}");
    }
}
