//! Slots: how a sharded region splits its entities over nodes (`server/CLUSTER.md` §1).
//!
//! Every entity belongs to one of [`SLOTS`] slots, decided by its encoded entity key alone
//! ([`encode_entity_key`](crate::encode_entity_key)). Clients compute the same function (the
//! Python SDK has a copy), and `tests` pin its values, so it can never change under stored data.

use crate::hash::stable_hash64;

/// How many slots the entity keyspace of a sharded region is split into. Fixed for the life of
/// a cluster: changing it would move every entity.
pub const SLOTS: u16 = 4096;

/// A slot number, `0..SLOTS`.
pub type Slot = u16;

/// The slot of an encoded entity key: the top 12 bits of its [`stable_hash64`].
pub fn slot_of(entity_key: &[u8]) -> Slot {
    const SHIFT: u32 = 64 - SLOTS.trailing_zeros();
    (stable_hash64(entity_key) >> SHIFT) as Slot
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

    /// Pinned values: a change here moves stored entities to other nodes. The Python SDK's
    /// test pins the same values.
    #[test]
    fn slot_values_never_change() {
        let cases: [(&[KeyPart<'_>], Slot); 6] = [
            (&[KeyPart::Str("")], 1253),
            (&[KeyPart::Str("u1")], 2809),
            (&[KeyPart::Str("user-42")], 3344),
            (&[KeyPart::Int(0)], 423),
            (&[KeyPart::Int(-7)], 227),
            (&[KeyPart::Str("u1"), KeyPart::Int(3)], 1218),
        ];
        for (parts, want) in cases {
            assert_eq!(slot_of(&encode_entity_key(parts)), want, "{parts:?}");
        }
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
