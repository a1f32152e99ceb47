//! Test support: the engine's types over the shared reference model of `storage/READS.md`
//! (`quiver_testkit::model`), and the scan contract over the same versions.
#![allow(dead_code)]

use quiver_storage::{AsOf, CellVersion, EventTime, FeatureId, ScanItem, ScanRange, SystemTime, Value};
use quiver_testkit::model::{self, Version};

/// A scanned version as a plain tuple: entity, feature, event time, system time, value.
pub type Tuple = (Vec<u8>, FeatureId, EventTime, SystemTime, Option<Value>);

/// A model key: one `(entity, feature)` pair.
pub type Key = (Vec<u8>, FeatureId);

/// Every version ever written, nothing dropped.
#[derive(Debug, Clone, Default)]
pub struct Model(pub model::Model<Key, Value>);

impl Model {
    /// Records one batch's writes, all at system time `s`; a later write of the same cell in the
    /// batch replaces an earlier one.
    pub fn apply(&mut self, s: SystemTime, ops: &[(Vec<u8>, FeatureId, EventTime, Option<Value>)]) {
        self.0.apply(s.0, ops.iter().map(|(entity, feature, e, v)| ((entity.clone(), *feature), e.0, v.clone())));
    }

    /// `value_at` exactly as `storage/READS.md` writes it, tombstones included in the result.
    pub fn version_at(&self, entity: &[u8], feature: FeatureId, q: AsOf) -> Option<&Version<Value>> {
        self.0.version_at(&(entity.to_vec(), feature), q.as_of.0, q.known_at.0, q.lookback_us)
    }

    /// `value_at`: absent for a tombstone.
    pub fn value_at(&self, entity: &[u8], feature: FeatureId, q: AsOf) -> Option<Value> {
        self.version_at(entity, feature, q).and_then(|r| r.value.clone())
    }

    /// What `aggregate_at` folds over `(entity, feature)` in window `w`: each event time's
    /// winning value, oldest first (`quiver_testkit::model::window_values`).
    pub fn window(&self, entity: &[u8], feature: FeatureId, w: quiver_storage::agg::AggWindow) -> Vec<(i64, &Value)> {
        model::window_values(self.0.versions(&(entity.to_vec(), feature)), w.as_of.0, w.width_us, w.known_at.0)
    }

    /// Every version as a tuple, in no particular order.
    pub fn rows(&self) -> impl Iterator<Item = Tuple> + '_ {
        self.0.iter().map(|((entity, feature), v)| {
            (entity.clone(), *feature, EventTime(v.event_time), SystemTime(v.system_time), v.value.clone())
        })
    }

    /// The scan contract: every version in range, in key order.
    pub fn scan(&self, range: &ScanRange) -> Vec<Tuple> {
        let mut out: Vec<_> = self
            .rows()
            .filter(|r| r.0 >= range.entity_start && range.entity_end.as_ref().is_none_or(|e| r.0 < *e))
            .filter(|r| range.features.is_none_or(|(a, b)| a <= r.1 && r.1 <= b))
            .filter(|r| range.event_time_min <= r.2 && r.2 <= range.event_time_max)
            .filter(|r| range.system_time_min <= r.3 && r.3 <= range.system_time_max)
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)).then(b.2.cmp(&a.2)).then(b.3.cmp(&a.3)));
        out
    }
}

/// A scan item as the model's tuple.
pub fn item_tuple(i: &ScanItem) -> Tuple {
    (i.entity.clone(), i.feature, i.version.event_time, i.version.system_time, i.version.value.clone())
}

/// The model's answer in the engine's shape, for comparison. A winning tombstone may have been
/// dropped by retention, which leaves the same answer ("absent"), so it matches `None` too.
pub fn same(engine: &Option<CellVersion>, model: Option<&Version<Value>>) -> bool {
    match (engine, model) {
        (None, None) => true,
        (None, Some(m)) => m.value.is_none(),
        (Some(e), Some(m)) => e.event_time.0 == m.event_time && e.system_time.0 == m.system_time && e.value == m.value,
        _ => false,
    }
}
