//! The read contract, decided here and nowhere else.
//!
//! Every read Quiver serves — an online lookup, a time-travel scan bounded in system time, a
//! point-in-time join, the hot tier — returns what this one function returns
//! (`storage/READS.md` states it in full, with the reasons):
//!
//! ```text
//! value_at(entity, feature, as_of = T, known_at = K, lookback = L):
//!     among the versions of (entity, feature) with
//!         T - L <= event_time <= T     (both inclusive; no lower bound when L is None)
//!         system_time <= K             (K = +infinity unless given)
//!     take the greatest event time; among its versions, the greatest system time;
//!     a tombstone there means "absent".
//!     none -> absent.
//! ```
//!
//! The pieces, each used by every path that needs it:
//! - [`AsOf::event_time_min`]: where the lookback window starts.
//! - [`judge`]: what a read does with the next version of its pair met in key order (event time
//!   descending, then system time descending) — the memtables and the tables walk with it.
//! - [`newer`]: the winner among candidates by their times (the hot tier's states), and
//!   [`newer_key`], the same order on internal keys (the memtables' and tables' candidates).
//! - [`in_window`]: the lookback applied to a winner found without it (the hot tier, the
//!   online path's newest-version reads, the service's statuses).
//! - [`answers`]: whether a pair's newest version alone answers a read (the hot tier's
//!   coverage).
//! - [`winner_in_sorted`]: the winner in a list of one pair's versions in key order (the
//!   point-in-time join's sort-merge).
//! - [`present`]: tombstones read as absent.
//! - [`strict_known_at`]: `strict_availability`, which caps `known_at` at the row's time.
//!
//! Windowed aggregates (`aggregate_at` in `storage/READS.md`; folded by [`crate::agg`]) see
//! the versions this module picks:
//!
//! ```text
//! aggregate_at(entity, source, agg, window W, as_of = T, known_at = K):
//!     for each event time e with  T - W < e <= T:
//!         its winner: among the versions at e with system_time <= K, the greatest system_time
//!     agg over the winners' values in event-time order; a tombstone winner removes its e.
//! ```
//!
//! - [`in_agg_window`]: the window's bounds.
//! - [`window_winners`]: the winners in one pair's versions listed in key order.

use crate::types::{AsOf, CellVersion, EventTime, SystemTime};

impl AsOf {
    /// The oldest event time inside the lookback window (`as_of - lookback`, saturating).
    pub fn event_time_min(&self) -> EventTime {
        match self.lookback_us {
            None => EventTime(i64::MIN),
            Some(l) => EventTime((i128::from(self.as_of.0) - i128::from(l)).max(i128::from(i64::MIN)) as i64),
        }
    }
}

/// What an as-of point read does with the next version of its pair, in key order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    /// Below the lookback window: nothing further in this source qualifies.
    Stop,
    /// The answer of this source (the first visible version at or after the seek).
    Take,
    /// Written after `known_at`: look at the next version.
    Skip,
}

/// Judges a version of the read's pair met at or after the read's seek (`event_time <= as_of`),
/// in key order: the first one taken is the source's winner.
#[inline]
pub fn judge(
    event_time: EventTime,
    system_time: SystemTime,
    event_time_min: EventTime,
    known_at: SystemTime,
) -> Visibility {
    if event_time < event_time_min {
        Visibility::Stop
    } else if system_time <= known_at {
        Visibility::Take
    } else {
        Visibility::Skip
    }
}

/// True if a candidate at `(event_time, system_time)` beats the best so far: the greater event
/// time, then the greater system time. On a tie the best so far stays (sources are consulted
/// newest first).
#[inline]
pub fn newer(candidate: (EventTime, SystemTime), best: Option<(EventTime, SystemTime)>) -> bool {
    best.is_none_or(|b| candidate > b)
}

/// [`newer`] on two internal keys of one pair, without decoding them: keys order event time,
/// then system time, descending, so the smaller key is the newer version (`storage/FORMAT.md`).
/// The read path's hot loops compare candidates this way.
#[inline]
pub(crate) fn newer_key(candidate: &[u8], best: Option<&[u8]>) -> bool {
    best.is_none_or(|b| candidate < b)
}

/// A winner found without the lookback bound, with it applied: a winner older than the window
/// means absent (no other version can be in the window: the winner is the newest at or before
/// `as_of`).
#[inline]
pub fn in_window(winner: Option<CellVersion>, q: &AsOf) -> Option<CellVersion> {
    winner.filter(|v| v.event_time >= q.event_time_min())
}

/// Whether a pair's newest version — greatest event time, then system time, among every
/// version it has — is the winner of the read `(as_of, known_at)` without lookback: when it
/// lies at or before `as_of` and was known at `known_at`, every other qualifying version
/// orders below it.
#[inline]
pub fn answers(newest: (EventTime, SystemTime), as_of: EventTime, known_at: SystemTime) -> bool {
    newest.0 <= as_of && newest.1 <= known_at
}

/// The winner without lookback in one pair's versions listed in key order (event time
/// descending, then system time descending): the first at or before `as_of` known at
/// `known_at`. Tombstones included; the caller applies [`present`] and the window.
pub fn winner_in_sorted<V>(
    versions: &[V],
    times: impl Fn(&V) -> (EventTime, SystemTime),
    as_of: EventTime,
    known_at: SystemTime,
) -> Option<&V> {
    let first = versions.partition_point(|v| times(v).0 > as_of);
    versions[first..].iter().find(|v| times(v).1 <= known_at)
}

/// `value_at` from the winning version: a tombstone means absent.
#[inline]
pub fn present(winner: Option<CellVersion>) -> Option<CellVersion> {
    winner.filter(|v| v.value.is_some())
}

/// The `known_at` of a point-in-time join row at `as_of` under `strict_availability`: only
/// what was known by the row's own time (a negative time knows nothing yet).
#[inline]
pub fn strict_known_at(known_at: SystemTime, as_of: EventTime) -> SystemTime {
    known_at.min(SystemTime(as_of.0.max(0) as u64))
}

/// Whether `event_time` is in the aggregate window of width `width_us` ending at `as_of`:
/// `as_of - width < event_time <= as_of`. The upper bound is inclusive, as `value_at`'s (an
/// event at `as_of` is known then); the lower one exclusive, so that windows of one width laid
/// end to end cover each instant once, and a day's window is the sum of its hours'.
#[inline]
pub fn in_agg_window(event_time: EventTime, as_of: EventTime, width_us: u64) -> bool {
    event_time <= as_of && i128::from(event_time.0) > i128::from(as_of.0) - i128::from(width_us)
}

/// The winners of an aggregate window (see [`in_agg_window`]) in one pair's versions listed in
/// key order (event time descending, then system time descending): for each event time in the
/// window, its first version known at `known_at`. Newest event time first; tombstones included
/// (a tombstone winner removes its event time: the caller skips it).
pub fn window_winners<'a, V>(
    versions: &'a [V],
    times: impl Fn(&V) -> (EventTime, SystemTime) + Copy + 'a,
    as_of: EventTime,
    width_us: u64,
    known_at: SystemTime,
) -> impl Iterator<Item = &'a V> + 'a {
    let first = versions.partition_point(|v| times(v).0 > as_of);
    let in_window = versions[first..].iter().take_while(move |v| in_agg_window(times(v).0, as_of, width_us));
    winners_of(in_window, times, known_at)
}

/// Every event time's winner known at `known_at` among `versions` (one pair's, in key order),
/// with no window: what [`window_winners`] picks, over all of them. Newest event time first;
/// tombstones included.
pub fn all_winners<'a, V>(
    versions: &'a [V],
    times: impl Fn(&V) -> (EventTime, SystemTime) + Copy + 'a,
    known_at: SystemTime,
) -> impl Iterator<Item = &'a V> + 'a {
    winners_of(versions.iter(), times, known_at)
}

fn winners_of<'a, V: 'a>(
    versions: impl Iterator<Item = &'a V> + 'a,
    times: impl Fn(&V) -> (EventTime, SystemTime) + Copy + 'a,
    known_at: SystemTime,
) -> impl Iterator<Item = &'a V> + 'a {
    let mut last_event: Option<EventTime> = None;
    versions.filter(move |v| {
        let (e, s) = times(v);
        // The first version of an event time known at K wins it; the rest of it is skipped.
        if last_event == Some(e) || s > known_at {
            return false;
        }
        last_event = Some(e);
        true
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregate_windows_include_their_end_and_exclude_their_start() {
        let (t, w) = (EventTime(1_000), 100);
        assert!(in_agg_window(EventTime(1_000), t, w));
        assert!(!in_agg_window(EventTime(1_001), t, w));
        assert!(in_agg_window(EventTime(901), t, w));
        assert!(!in_agg_window(EventTime(900), t, w));
        // Saturating at the start of time: everything up to as_of.
        assert!(in_agg_window(EventTime(i64::MIN), EventTime(i64::MIN + 5), u64::MAX));
        // Key order: event time descending, system time descending; (event, system, value).
        let versions = [
            (1_001, 9, 'a'),
            (1_000, 8, 'b'),
            (1_000, 3, 'c'),
            (950, 7, 'd'),
            (950, 2, 'e'),
            (901, 1, 'f'),
            (900, 1, 'g'),
        ];
        let times = |v: &(i64, u64, char)| (EventTime(v.0), SystemTime(v.1));
        let won: Vec<char> = window_winners(&versions, times, t, w, SystemTime::MAX).map(|v| v.2).collect();
        assert_eq!(won, ['b', 'd', 'f']);
        // Known at 5: 1,000's correction and 950's first write are not yet known.
        let won: Vec<char> = window_winners(&versions, times, t, w, SystemTime(5)).map(|v| v.2).collect();
        assert_eq!(won, ['c', 'e', 'f']);
        let won: Vec<char> =
            window_winners(&versions, times, EventTime(1_001), 1, SystemTime::MAX).map(|v| v.2).collect();
        assert_eq!(won, ['a']);
    }

    #[test]
    fn lookback_saturates() {
        let q = AsOf { as_of: EventTime(i64::MIN + 5), known_at: SystemTime::MAX, lookback_us: Some(100) };
        assert_eq!(q.event_time_min(), EventTime(i64::MIN));
        let q = AsOf { as_of: EventTime(100), known_at: SystemTime::MAX, lookback_us: Some(40) };
        assert_eq!(q.event_time_min(), EventTime(60));
    }

    #[test]
    fn winner_in_sorted_is_the_first_qualifying_version_in_key_order() {
        let v = [(9, 5), (9, 3), (7, 8), (7, 1), (2, 2)].map(|(e, s)| (EventTime(e), SystemTime(s)));
        let w = |as_of, known_at| winner_in_sorted(&v, |x| *x, EventTime(as_of), SystemTime(known_at)).copied();
        assert_eq!(w(10, 10), Some(v[0]));
        assert_eq!(w(9, 4), Some(v[1]), "a later correction not yet known");
        assert_eq!(w(8, 10), Some(v[2]));
        assert_eq!(w(8, 2), Some(v[3]));
        assert_eq!(w(8, 1), Some(v[3]));
        assert_eq!(w(1, 10), None);
        assert_eq!(w(10, 0), None);
        // The same answers as walking with `judge`.
        for as_of in 0..11 {
            for known_at in 0..10 {
                let walked = v
                    .iter()
                    .filter(|x| x.0 .0 <= as_of)
                    .find(|x| judge(x.0, x.1, EventTime(i64::MIN), SystemTime(known_at)) == Visibility::Take);
                assert_eq!(w(as_of, known_at).as_ref(), walked);
            }
        }
    }

    #[test]
    fn newer_key_is_newer_on_encoded_keys() {
        let times = [(i64::MIN, 0), (-5, 3), (-5, 9), (0, 0), (0, u64::MAX), (7, 1), (i64::MAX, 2)];
        for &(e1, s1) in &times {
            for &(e2, s2) in &times {
                let (a, b) = (
                    crate::key::encode(b"e", crate::types::FeatureId(1), EventTime(e1), SystemTime(s1)),
                    crate::key::encode(b"e", crate::types::FeatureId(1), EventTime(e2), SystemTime(s2)),
                );
                let by_times = newer((EventTime(e1), SystemTime(s1)), Some((EventTime(e2), SystemTime(s2))));
                assert_eq!(newer_key(&a, Some(&b)), by_times, "{e1},{s1} vs {e2},{s2}");
            }
        }
    }

    #[test]
    fn the_window_the_tie_and_strictness() {
        let q = AsOf { as_of: EventTime(100), known_at: SystemTime::MAX, lookback_us: Some(10) };
        let v = |e| {
            Some(CellVersion {
                event_time: EventTime(e),
                system_time: SystemTime(1),
                value: None,
                version_vector: Default::default(),
            })
        };
        assert!(in_window(v(90), &q).is_some(), "the window is inclusive");
        assert!(in_window(v(89), &q).is_none());
        assert!(present(v(95)).is_none(), "a tombstone is absent");
        assert!(newer((EventTime(2), SystemTime(1)), Some((EventTime(1), SystemTime(9)))));
        assert!(!newer((EventTime(1), SystemTime(9)), Some((EventTime(1), SystemTime(9)))), "a tie keeps the first");
        assert!(answers((EventTime(5), SystemTime(5)), EventTime(5), SystemTime(5)));
        assert!(!answers((EventTime(6), SystemTime(5)), EventTime(5), SystemTime(9)));
        assert_eq!(strict_known_at(SystemTime::MAX, EventTime(-3)), SystemTime(0));
        assert_eq!(strict_known_at(SystemTime(7), EventTime(100)), SystemTime(7));
    }
}
