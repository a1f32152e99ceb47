//! Compaction: choosing what to merge (a pure function of a version) and the retention rules
//! applied to the merged stream.
//!
//! # Retention
//!
//! With a system-time retention window `W` and an event-time horizon `H`, compaction keeps the
//! answer of every `value_at(T, K, L)` with `K >= now - W` and `T >= H` unchanged (reads outside
//! that set may change). Within one `(entity, feature)`, entries arrive in key order (event time
//! descending, then system time descending). Let `cutoff = now - W`. A version is *settled* when
//! its system time is `<= cutoff`: every guaranteed read sees it.
//! 1. After a settled version of event time `e`, older versions of the same `e` are dropped:
//!    any guaranteed read that could pick them picks the settled one.
//! 2. After a settled version with event time `<= H`, every later entry of the pair is dropped:
//!    a guaranteed read has `T >= H`, so it sees that version (or a newer one) whenever it could
//!    see the older entries, whatever its lookback.
//! 3. At the bottom level, a settled tombstone with event time `< H` that is the last entry of
//!    its pair is dropped when no memtable and no table outside the compaction (at any level)
//!    holds the pair: it shadows nothing, and writes below the horizon are refused, so nothing
//!    can come to be shadowed by it. (Key-range overlap is not enough to rule out a lower
//!    table: a pair's newer versions sort first, so a lower table can start with the same pair
//!    just past the compaction's range.)
//!
//! 4. A version of the served log ([`crate::reserved::SERVED_LOG`]) with a system time older
//!    than the log's retention is dropped: every log record is a pair of its own, written once,
//!    so nothing else answers through it.
//!
//! 5. A version of a user key (not reserved) whose feature id is in the *dropped features*
//!    ([`crate::Db::set_dropped_features`]) is dropped: the service names the feature ids that
//!    no registry version can read any more (retired group versions past their retention), so
//!    no read can reach them.
//!
//! Without a window no version is settled and nothing is dropped by rules 1 to 3.

use std::sync::Arc;

use crate::limits::LEVELS;
use crate::version::{TableHandle, Version};

/// Sizing options the picker needs.
#[derive(Debug, Clone, Copy)]
pub struct PickerOptions {
    /// L0 table count that triggers a compaction into L1.
    pub l0_trigger: usize,
    /// Target size of L1 in bytes.
    pub l1_bytes: u64,
    /// Size ratio between adjacent levels.
    pub level_multiplier: u64,
}

/// What one compaction merges.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The level inputs are taken from.
    pub level: usize,
    /// Inputs from `level`, in priority order (newest first for L0).
    pub inputs: Vec<Arc<TableHandle>>,
    /// Inputs from `level + 1` (or the output level for a full compaction).
    pub next_inputs: Vec<Arc<TableHandle>>,
    /// Where outputs go.
    pub output_level: usize,
    /// True if no level below the output level overlaps: tombstones may be dropped.
    pub bottom: bool,
}

impl Plan {
    /// All inputs in priority order (newest first).
    pub fn all_inputs(&self) -> impl Iterator<Item = &Arc<TableHandle>> {
        self.inputs.iter().chain(self.next_inputs.iter())
    }

    /// The key range covered by all inputs.
    pub fn key_range(&self) -> (Vec<u8>, Vec<u8>) {
        let lo = self.all_inputs().map(|t| t.meta.smallest.clone()).min().unwrap_or_default();
        let hi = self.all_inputs().map(|t| t.meta.largest.clone()).max().unwrap_or_default();
        (lo, hi)
    }
}

fn level_target(o: &PickerOptions, level: usize) -> u64 {
    let mut t = o.l1_bytes.max(1);
    for _ in 1..level {
        t = t.saturating_mul(o.level_multiplier.max(2));
    }
    t
}

fn is_bottom(v: &Version, output_level: usize, lo: &[u8], hi: &[u8]) -> bool {
    (output_level + 1..LEVELS).all(|l| v.overlapping(l, lo, hi).is_empty())
}

/// Picks the most needed compaction, if any level is over its target. `cursor[l]` is the key
/// after which the next table of level `l` is chosen (round robin over the key space).
pub fn pick(v: &Version, o: &PickerOptions, cursor: &[Vec<u8>; LEVELS]) -> Option<Plan> {
    let mut best: Option<(f64, usize)> = None;
    let l0_score = v.levels[0].len() as f64 / o.l0_trigger.max(1) as f64;
    if l0_score >= 1.0 {
        best = Some((l0_score, 0));
    }
    for level in 1..LEVELS - 1 {
        let score = v.level_bytes(level) as f64 / level_target(o, level) as f64;
        if score >= 1.0 && best.is_none_or(|(s, _)| score > s) {
            best = Some((score, level));
        }
    }
    let (_, level) = best?;
    let inputs: Vec<_> = if level == 0 {
        v.levels[0].clone()
    } else {
        let files = &v.levels[level];
        let i = files.iter().position(|t| t.meta.smallest > cursor[level]).unwrap_or(0);
        vec![files[i].clone()]
    };
    let lo = inputs.iter().map(|t| t.meta.smallest.clone()).min()?;
    let hi = inputs.iter().map(|t| t.meta.largest.clone()).max()?;
    let next_inputs = v.overlapping(level + 1, &lo, &hi);
    let (lo2, hi2) =
        next_inputs.iter().fold((lo, hi), |(l, h), t| (l.min(t.meta.smallest.clone()), h.max(t.meta.largest.clone())));
    Some(Plan { level, inputs, next_inputs, output_level: level + 1, bottom: is_bottom(v, level + 1, &lo2, &hi2) })
}

/// A plan that merges every table of every level into the deepest non-empty level (at least
/// L1): a manual full compaction. `None` if the version has no tables.
pub fn pick_full(v: &Version) -> Option<Plan> {
    let deepest = deepest_level(v);
    let inputs: Vec<_> = (0..deepest).flat_map(|l| v.levels[l].iter().cloned()).collect();
    let next_inputs = v.levels[deepest].clone();
    if inputs.is_empty() && next_inputs.is_empty() {
        return None;
    }
    Some(Plan { level: 0, inputs, next_inputs, output_level: deepest, bottom: true })
}

/// One step of a manual compaction of the internal-key range `[lo, hi]`: the plan that moves
/// the range's data from `level` into `level + 1`, where `deepest` is the deepest non-empty
/// level (at least 1). Running the steps for `level = 0, 1, .., deepest - 1` in turn leaves all
/// of the range's data in `deepest`, rewritten once with retention applied.
///
/// - At L0, tables may overlap one another, so the inputs are every L0 table overlapping
///   `[lo, hi]` plus, to a fixpoint, every L0 table overlapping the inputs' range: an L0 table
///   left behind then shares no key with the output and the level order stays "newer above".
/// - At `level + 1 == deepest` the next-level inputs also cover all of `[lo, hi]`, so the
///   range's tables at the bottom are rewritten too (retention applies there) even when no
///   level above holds any of the range.
///
/// `None` when the step has nothing to merge.
pub fn pick_range(v: &Version, level: usize, deepest: usize, lo: &[u8], hi: &[u8]) -> Option<Plan> {
    if level + 1 >= LEVELS || level >= deepest {
        return None;
    }
    let mut inputs = v.overlapping(level, lo, hi);
    let bounds = |ts: &[Arc<TableHandle>]| -> Option<(Vec<u8>, Vec<u8>)> {
        let l = ts.iter().map(|t| t.meta.smallest.clone()).min()?;
        let h = ts.iter().map(|t| t.meta.largest.clone()).max()?;
        Some((l, h))
    };
    if level == 0 {
        while let Some((l, h)) = bounds(&inputs) {
            let grown = v.overlapping(0, &l, &h);
            if grown.len() == inputs.len() {
                break;
            }
            inputs = grown;
        }
    }
    let (mut nlo, mut nhi) = bounds(&inputs).unwrap_or_else(|| (hi.to_vec(), lo.to_vec()));
    if level + 1 == deepest {
        nlo = nlo.min(lo.to_vec());
        nhi = nhi.max(hi.to_vec());
    }
    let next_inputs = if nlo <= nhi { v.overlapping(level + 1, &nlo, &nhi) } else { Vec::new() };
    if inputs.is_empty() && next_inputs.is_empty() {
        return None;
    }
    let mut plan = Plan { level, inputs, next_inputs, output_level: level + 1, bottom: false };
    let (rlo, rhi) = plan.key_range();
    plan.bottom = is_bottom(v, level + 1, &rlo, &rhi);
    Some(plan)
}

/// The deepest level holding a table, at least 1: where a manual range compaction ends.
pub fn deepest_level(v: &Version) -> usize {
    (1..LEVELS).rev().find(|&l| !v.levels[l].is_empty()).unwrap_or(1)
}

/// Retention settings for one compaction.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Versions with system time `<=` this are settled; `None`: nothing is settled.
    pub cutoff: Option<u64>,
    /// The event-time horizon.
    pub horizon: i64,
    /// Tombstones may be dropped (output is the bottom level).
    pub bottom: bool,
    /// Served-log versions with system time `<` this are dropped (rule 4); `None`: kept.
    pub log_cutoff: Option<u64>,
}

/// Decides, entry by entry in key order, what compaction keeps.
#[derive(Debug)]
pub struct RetentionFilter {
    r: Retention,
    /// Rule 5: feature ids whose versions are dropped (sorted).
    dropped_features: Arc<Vec<u32>>,
    /// The escaped served-log prefix every internal key of a log record starts with.
    log_keys: Vec<u8>,
    prefix: Vec<u8>,
    settled_event: Option<i64>,
    drop_rest: bool,
}

/// What to do with one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Write it.
    Keep,
    /// Drop it.
    Drop,
    /// A tombstone that rule 3 may drop if it is the last entry of its pair and no upper source
    /// holds the pair; the caller decides when it sees the next entry.
    TombstoneCandidate,
}

impl RetentionFilter {
    /// A filter with the given settings.
    pub fn new(r: Retention) -> Self {
        // The escaped prefix, less the entity terminator: escaping is byte-wise, so the escaped
        // prefix of an entity is the escape of its prefix.
        let mut log_keys = crate::key::entity_prefix(crate::reserved::SERVED_LOG);
        log_keys.truncate(log_keys.len() - 2);
        RetentionFilter {
            r,
            dropped_features: Arc::new(Vec::new()),
            log_keys,
            prefix: Vec::new(),
            settled_event: None,
            drop_rest: false,
        }
    }

    /// The same filter dropping every version of user keys of the (sorted) feature ids
    /// `features` (rule 5).
    pub fn with_dropped_features(mut self, features: Arc<Vec<u32>>) -> Self {
        self.dropped_features = features;
        self
    }

    /// Decides for the next entry (keys strictly increasing).
    pub fn decide(&mut self, key: &[u8], tombstone: bool) -> Decision {
        let prefix = crate::key::prefix_of(key);
        if prefix != self.prefix.as_slice() {
            self.prefix.clear();
            self.prefix.extend_from_slice(prefix);
            self.settled_event = None;
            self.drop_rest = false;
        }
        if !self.dropped_features.is_empty() && key.first() != Some(&crate::reserved::RESERVED_BYTE) {
            if let Some(f) = crate::key::KeyRef::parse(key).map(|k| k.feature().0) {
                if self.dropped_features.binary_search(&f).is_ok() {
                    return Decision::Drop;
                }
            }
        }
        if let Some(c) = self.r.log_cutoff {
            if key.starts_with(&self.log_keys) && crate::key::system_time_of(key).0 < c {
                return Decision::Drop;
            }
        }
        let Some(cutoff) = self.r.cutoff else { return Decision::Keep };
        if self.drop_rest {
            return Decision::Drop;
        }
        let e = crate::key::event_time_of(key).0;
        if self.settled_event == Some(e) {
            return Decision::Drop;
        }
        let s = crate::key::system_time_of(key).0;
        if s <= cutoff {
            self.settled_event = Some(e);
            if e <= self.r.horizon {
                self.drop_rest = true;
                if tombstone && self.r.bottom && e < self.r.horizon {
                    return Decision::TombstoneCandidate;
                }
            }
        }
        Decision::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::encode;
    use crate::types::{EventTime, FeatureId, SystemTime};

    fn k(f: u32, e: i64, s: u64) -> Vec<u8> {
        encode(b"x", FeatureId(f), EventTime(e), SystemTime(s))
    }

    #[test]
    fn retention_rules() {
        let mut f = RetentionFilter::new(Retention { cutoff: Some(100), horizon: 50, bottom: true, log_cutoff: None });
        // e=90: a recent correction (s=150) and two settled versions: the older settled one goes.
        assert_eq!(f.decide(&k(1, 90, 150), false), Decision::Keep);
        assert_eq!(f.decide(&k(1, 90, 80), false), Decision::Keep);
        assert_eq!(f.decide(&k(1, 90, 70), false), Decision::Drop);
        // e=60 is above the horizon: kept.
        assert_eq!(f.decide(&k(1, 60, 10), false), Decision::Keep);
        // e=40 settled, below the horizon: it stays, everything older goes.
        assert_eq!(f.decide(&k(1, 40, 10), false), Decision::Keep);
        assert_eq!(f.decide(&k(1, 30, 10), false), Decision::Drop);
        // A new pair starts fresh; a settled tombstone below the horizon is a candidate.
        assert_eq!(f.decide(&k(2, 10, 5), true), Decision::TombstoneCandidate);
        assert_eq!(f.decide(&k(2, 5, 5), false), Decision::Drop);
        // Without a window nothing is dropped.
        let mut f = RetentionFilter::new(Retention { cutoff: None, horizon: i64::MAX, bottom: true, log_cutoff: None });
        assert_eq!(f.decide(&k(1, 1, 1), true), Decision::Keep);
        assert_eq!(f.decide(&k(1, 1, 0), false), Decision::Keep);
    }

    #[test]
    fn served_log_records_expire_by_system_time_and_nothing_else_does() {
        let log = |n: u8, s: u64| {
            let mut entity = crate::reserved::SERVED_LOG.to_vec();
            entity.extend_from_slice(&[0, 0, 0, n]);
            encode(&entity, FeatureId(0), EventTime(s as i64), SystemTime(s))
        };
        let r = Retention { cutoff: None, horizon: i64::MIN, bottom: false, log_cutoff: Some(100) };
        let mut f = RetentionFilter::new(r);
        assert_eq!(f.decide(&log(1, 99), false), Decision::Drop);
        assert_eq!(f.decide(&log(2, 100), false), Decision::Keep);
        assert_eq!(f.decide(&log(3, 150), false), Decision::Keep);
        // Other reserved records and feature values of any age stay.
        let mut f = RetentionFilter::new(r);
        let monitor = encode(crate::reserved::MONITOR_WATERMARKS, FeatureId(0), EventTime(0), SystemTime(1));
        assert_eq!(f.decide(&monitor, false), Decision::Keep);
        assert_eq!(f.decide(&k(1, 1, 1), false), Decision::Keep);
        // Without a log retention nothing expires.
        let mut f = RetentionFilter::new(Retention { log_cutoff: None, ..r });
        assert_eq!(f.decide(&log(1, 1), false), Decision::Keep);
    }

    #[test]
    fn dropped_features_go_from_user_keys_only() {
        let r = Retention { cutoff: None, horizon: i64::MIN, bottom: false, log_cutoff: None };
        let mut f = RetentionFilter::new(r).with_dropped_features(Arc::new(vec![3, 7]));
        assert_eq!(f.decide(&k(1, 5, 5), false), Decision::Keep);
        assert_eq!(f.decide(&k(3, 5, 5), false), Decision::Drop);
        assert_eq!(f.decide(&k(3, 4, 5), true), Decision::Drop);
        assert_eq!(f.decide(&k(5, 5, 5), false), Decision::Keep);
        assert_eq!(f.decide(&k(7, 1, 1), false), Decision::Drop);
        // A registry cell whose feature id (a group version) is 3 stays.
        let reg = encode(crate::reserved::REGISTRY_GROUPS, FeatureId(3), EventTime(0), SystemTime(1));
        let mut f = RetentionFilter::new(r).with_dropped_features(Arc::new(vec![3]));
        assert_eq!(f.decide(&reg, false), Decision::Keep);
    }
}
