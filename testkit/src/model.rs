//! The reference model of the read contract, written as plainly as `storage/READS.md` states it:
//!
//! ```text
//! value_at(entity, feature, as_of = T, known_at = K, lookback = L):
//!     among the cell versions of (entity, feature) with
//!         T - L <= event_time <= T      (both bounds inclusive; no lower bound when L is none)
//!         system_time <= K
//!     take the greatest event_time; among its versions the greatest system_time;
//!     a tombstone there means "absent".
//!     none -> absent.
//! ```
//!
//! [`value_at`] answers it over the versions of one `(entity, feature)` pair and returns the
//! winning version, tombstones included (a caller that wants the value takes
//! [`Version::value`], where a winning tombstone is `None` like no winner at all). [`Model`]
//! keeps every version ever written per key (an `(entity, feature)` pair in whatever types the
//! test uses), nothing dropped. The engine's own implementation (`storage/src/asof.rs`) is
//! checked against this one; keep this one naive.

use std::collections::BTreeMap;

/// One version of one `(entity, feature)` pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version<V> {
    /// When the fact became true (µs since the epoch).
    pub event_time: i64,
    /// When the store accepted the write (its stamp, µs).
    pub system_time: u64,
    /// The value; `None` is a tombstone.
    pub value: Option<V>,
}

/// Whether `event_time` lies in the window `[as_of - lookback, as_of]` (both bounds inclusive;
/// no lower bound without a lookback). Exact for every input: a lookback reaching past the
/// start of time takes everything up to `as_of`.
pub fn in_window(event_time: i64, as_of: i64, lookback: Option<u64>) -> bool {
    event_time <= as_of && lookback.is_none_or(|l| i128::from(event_time) >= i128::from(as_of) - i128::from(l))
}

/// `value_at` over the versions of one `(entity, feature)` pair: the winning version (a
/// tombstone included), or `None` when no version is within the window and known at
/// `known_at`. Pass `u64::MAX` as `known_at` for "everything known". Should two versions share
/// both times, the later in the list wins (a later write of a cell in the same batch replaces
/// an earlier one).
pub fn value_at<V>(versions: &[Version<V>], as_of: i64, known_at: u64, lookback: Option<u64>) -> Option<&Version<V>> {
    versions
        .iter()
        .filter(|v| in_window(v.event_time, as_of, lookback) && v.system_time <= known_at)
        .max_by_key(|v| (v.event_time, v.system_time))
}

/// What `aggregate_at` (`storage/READS.md`) folds: for each event time `e` with
/// `as_of - width < e <= as_of`, oldest first, the value of `e`'s winner known at `known_at`
/// (`value_at` at `e` with no lookback); event times whose winner is a tombstone are left out.
pub fn window_values<V>(versions: &[Version<V>], as_of: i64, width: u64, known_at: u64) -> Vec<(i64, &V)> {
    let mut times: Vec<i64> = versions
        .iter()
        .map(|v| v.event_time)
        .filter(|&e| e <= as_of && i128::from(e) > i128::from(as_of) - i128::from(width))
        .collect();
    times.sort_unstable();
    times.dedup();
    times
        .into_iter()
        .filter_map(|e| value_at(versions, e, known_at, Some(0)).and_then(|w| w.value.as_ref()).map(|v| (e, v)))
        .collect()
}

/// Every version ever written, per key (for example `(entity, feature)`); nothing dropped.
#[derive(Debug, Clone)]
pub struct Model<K, V> {
    pairs: BTreeMap<K, Vec<Version<V>>>,
}

impl<K, V> Default for Model<K, V> {
    fn default() -> Self {
        Model { pairs: BTreeMap::new() }
    }
}

impl<K: Ord, V> Model<K, V> {
    /// An empty model.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one write batch, every write stamped `system_time`: `(key, event_time, value)`,
    /// `None` a delete. A later write of the same cell `(key, event_time)` in the batch replaces
    /// an earlier one, as it does in the engine.
    pub fn apply(&mut self, system_time: u64, writes: impl IntoIterator<Item = (K, i64, Option<V>)>) {
        for (key, event_time, value) in writes {
            let versions = self.pairs.entry(key).or_default();
            versions.retain(|v| !(v.event_time == event_time && v.system_time == system_time));
            versions.push(Version { event_time, system_time, value });
        }
    }

    /// Every version of `key`, in the order written.
    pub fn versions(&self, key: &K) -> &[Version<V>] {
        self.pairs.get(key).map_or(&[], Vec::as_slice)
    }

    /// [`value_at`] of `key`: the winning version, tombstones included.
    pub fn version_at(&self, key: &K, as_of: i64, known_at: u64, lookback: Option<u64>) -> Option<&Version<V>> {
        value_at(self.versions(key), as_of, known_at, lookback)
    }

    /// The value `value_at` answers for `key`: `None` when absent or a tombstone wins.
    pub fn value_at(&self, key: &K, as_of: i64, known_at: u64, lookback: Option<u64>) -> Option<&V> {
        self.version_at(key, as_of, known_at, lookback).and_then(|v| v.value.as_ref())
    }

    /// Every version, by key, each key's in the order written.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &Version<V>)> {
        self.pairs.iter().flat_map(|(k, vs)| vs.iter().map(move |v| (k, v)))
    }

    /// Keeps only the versions `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &Version<V>) -> bool) {
        for (k, vs) in &mut self.pairs {
            vs.retain(|v| keep(k, v));
        }
        self.pairs.retain(|_, vs| !vs.is_empty());
    }

    /// How many versions are recorded.
    pub fn len(&self) -> usize {
        self.pairs.values().map(Vec::len).sum()
    }

    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(event_time: i64, system_time: u64, value: Option<i32>) -> Version<i32> {
        Version { event_time, system_time, value }
    }

    fn winner(
        vs: &[Version<i32>],
        as_of: i64,
        known_at: u64,
        lookback: Option<u64>,
    ) -> Option<(i64, u64, Option<i32>)> {
        value_at(vs, as_of, known_at, lookback).map(|w| (w.event_time, w.system_time, w.value))
    }

    #[test]
    fn nothing_is_absent() {
        assert_eq!(winner(&[], 10, u64::MAX, None), None);
        // Only later events, or events unknown at known_at: absent too.
        let vs = [v(20, 1, Some(1)), v(5, 9, Some(2))];
        assert_eq!(winner(&vs, 10, 8, None), None);
    }

    #[test]
    fn as_of_is_inclusive_and_later_events_are_invisible() {
        let vs = [v(10, 1, Some(1)), v(11, 2, Some(2))];
        assert_eq!(winner(&vs, 10, u64::MAX, None), Some((10, 1, Some(1))));
        assert_eq!(winner(&vs, 11, u64::MAX, None), Some((11, 2, Some(2))));
        assert_eq!(winner(&vs, 9, u64::MAX, None), None);
    }

    #[test]
    fn the_lookback_bound_is_inclusive() {
        let vs = [v(100, 1, Some(1))];
        // as_of - lookback == event_time: inside.
        assert_eq!(winner(&vs, 150, u64::MAX, Some(50)), Some((100, 1, Some(1))));
        // One microsecond further: outside.
        assert_eq!(winner(&vs, 151, u64::MAX, Some(50)), None);
        // A zero lookback sees only events exactly at as_of.
        assert_eq!(winner(&vs, 100, u64::MAX, Some(0)), Some((100, 1, Some(1))));
        assert_eq!(winner(&vs, 101, u64::MAX, Some(0)), None);
        // No lookback: no lower bound.
        assert_eq!(winner(&vs, i64::MAX, u64::MAX, None), Some((100, 1, Some(1))));
    }

    #[test]
    fn the_lookback_saturates_at_the_start_of_time() {
        let vs = [v(i64::MIN, 1, Some(1)), v(-5, 2, Some(2))];
        assert_eq!(winner(&vs, i64::MIN, u64::MAX, Some(u64::MAX)), Some((i64::MIN, 1, Some(1))));
        assert_eq!(winner(&vs, 0, u64::MAX, Some(u64::MAX)), Some((-5, 2, Some(2))));
        assert_eq!(winner(&vs[..1], i64::MAX, u64::MAX, Some(u64::MAX)), Some((i64::MIN, 1, Some(1))));
        // A lookback just short of the distance excludes it.
        assert_eq!(winner(&vs[..1], 0, u64::MAX, Some(i64::MAX as u64)), None);
        assert!(in_window(i64::MIN, 0, Some(i64::MAX as u64 + 1)));
    }

    #[test]
    fn the_greatest_event_time_wins_over_a_later_system_time() {
        let vs = [v(20, 1, Some(1)), v(10, 5, Some(2))];
        assert_eq!(winner(&vs, 30, u64::MAX, None), Some((20, 1, Some(1))));
    }

    #[test]
    fn a_tie_on_event_time_is_broken_by_system_time() {
        let vs = [v(10, 3, Some(3)), v(10, 7, Some(7)), v(10, 5, Some(5))];
        assert_eq!(winner(&vs, 10, u64::MAX, None), Some((10, 7, Some(7))));
    }

    #[test]
    fn known_at_excludes_a_later_correction() {
        let vs = [v(10, 3, Some(1)), v(10, 8, Some(2))];
        // Known at 7: the correction written at 8 is not yet known.
        assert_eq!(winner(&vs, 10, 7, None), Some((10, 3, Some(1))));
        // known_at is inclusive.
        assert_eq!(winner(&vs, 10, 8, None), Some((10, 8, Some(2))));
        // Known at 2: nothing.
        assert_eq!(winner(&vs, 10, 2, None), None);
    }

    #[test]
    fn a_winning_tombstone_is_returned_and_means_absent() {
        let vs = [v(10, 1, Some(1)), v(20, 2, None), v(30, 3, Some(3))];
        assert_eq!(winner(&vs, 25, u64::MAX, None), Some((20, 2, None)));
        // A tombstone loses like any version: to a later event.
        assert_eq!(winner(&vs, 30, u64::MAX, None), Some((30, 3, Some(3))));
        // A tombstone correcting a value at the same event time wins from when it is known.
        let vs = [v(10, 1, Some(1)), v(10, 2, None)];
        assert_eq!(winner(&vs, 10, u64::MAX, None), Some((10, 2, None)));
        assert_eq!(winner(&vs, 10, 1, None), Some((10, 1, Some(1))));
        let mut m = Model::new();
        m.apply(1, [("k", 10, Some(1))]);
        m.apply(2, [("k", 10, None)]);
        assert_eq!(m.value_at(&"k", 10, u64::MAX, None), None);
        assert!(m.version_at(&"k", 10, u64::MAX, None).is_some(), "the tombstone is the winner");
        assert_eq!(m.value_at(&"k", 10, 1, None), Some(&1));
    }

    #[test]
    fn a_later_write_of_a_cell_in_one_batch_replaces_the_earlier() {
        let mut m = Model::new();
        m.apply(5, [(("e", 1), 10, Some(1)), (("e", 1), 10, Some(2)), (("e", 2), 10, Some(3))]);
        assert_eq!(m.len(), 2);
        assert_eq!(m.value_at(&("e", 1), 10, u64::MAX, None), Some(&2));
        assert_eq!(m.versions(&("e", 2)), &[v(10, 5, Some(3))]);
        assert!(m.versions(&("f", 1)).is_empty());
        m.retain(|k, _| k.1 == 2);
        assert_eq!(m.iter().map(|(k, v)| (*k, v.value)).collect::<Vec<_>>(), vec![(("e", 2), Some(3))]);
    }
}
