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

/// Bytes of a [`SlotSet`] on the wire: one bit per slot.
pub const SLOT_SET_BYTES: usize = SLOTS as usize / 8;

/// A set of slots, as a bitmap of [`SLOTS`] bits (slot `s` at bit `s % 8` of byte `s / 8`):
/// what a replication puller of a sharded region asks its peers for (`server/CLUSTER.md` §7).
#[derive(Clone, PartialEq, Eq)]
pub struct SlotSet(Box<[u8; SLOT_SET_BYTES]>);

impl SlotSet {
    /// No slot.
    pub fn empty() -> SlotSet {
        SlotSet(Box::new([0; SLOT_SET_BYTES]))
    }

    /// The set of a bitmap on the wire; `None` unless it is [`SLOT_SET_BYTES`] long.
    pub fn from_bytes(bytes: &[u8]) -> Option<SlotSet> {
        let bits: [u8; SLOT_SET_BYTES] = bytes.try_into().ok()?;
        Some(SlotSet(Box::new(bits)))
    }

    /// Adds slots `first..=last` (slots past [`SLOTS`] are ignored).
    pub fn insert_range(&mut self, first: Slot, last: Slot) {
        for s in first..=last.min(SLOTS - 1) {
            self.0[usize::from(s / 8)] |= 1 << (s % 8);
        }
    }

    /// Whether `slot` is in the set.
    pub fn contains(&self, slot: Slot) -> bool {
        slot < SLOTS && self.0[usize::from(slot / 8)] & (1 << (slot % 8)) != 0
    }

    /// How many slots are in the set.
    pub fn len(&self) -> usize {
        self.0.iter().map(|b| b.count_ones() as usize).sum()
    }

    /// Whether no slot is in the set.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|b| *b == 0)
    }

    /// The bitmap, as sent.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0[..]
    }
}

impl std::fmt::Debug for SlotSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SlotSet({} slots)", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_set_holds_its_ranges_and_round_trips() {
        let mut set = SlotSet::empty();
        assert!(set.is_empty());
        set.insert_range(7, 9);
        set.insert_range(4095, 4095);
        assert_eq!(set.len(), 4);
        assert!(set.contains(7) && set.contains(9) && set.contains(4095));
        assert!(!set.contains(6) && !set.contains(10) && !set.contains(4096));
        let back = SlotSet::from_bytes(set.as_bytes()).expect("512 bytes");
        assert_eq!(back, set);
        assert_eq!(set.as_bytes()[0], 0b1000_0000);
        assert!(SlotSet::from_bytes(&[0; 511]).is_none());
    }
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
