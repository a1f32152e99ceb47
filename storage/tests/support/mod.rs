//! Test support: the reference model of `storage/READS.md` over a plain list of versions.
#![allow(dead_code)]

use quiver_storage::{AsOf, CellVersion, EventTime, FeatureId, ScanItem, ScanRange, SystemTime, Value};

/// A scanned version as a plain tuple: entity, feature, event time, system time, value.
pub type Tuple = (Vec<u8>, FeatureId, EventTime, SystemTime, Option<Value>);

/// One stored version in the model.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub entity: Vec<u8>,
    pub feature: FeatureId,
    pub event_time: EventTime,
    pub system_time: SystemTime,
    pub value: Option<Value>,
}

/// Every version ever written, nothing dropped.
#[derive(Debug, Clone, Default)]
pub struct Model {
    pub rows: Vec<Row>,
}

impl Model {
    /// Records one batch's writes, all at system time `s`; a later write of the same cell in the
    /// batch replaces an earlier one.
    pub fn apply(&mut self, s: SystemTime, ops: &[(Vec<u8>, FeatureId, EventTime, Option<Value>)]) {
        for (entity, feature, e, v) in ops {
            self.rows.retain(|r| {
                !(r.entity == *entity && r.feature == *feature && r.event_time == *e && r.system_time == s)
            });
            self.rows.push(Row {
                entity: entity.clone(),
                feature: *feature,
                event_time: *e,
                system_time: s,
                value: v.clone(),
            });
        }
    }

    /// `value_at` exactly as `storage/READS.md` writes it, tombstones included in the result.
    pub fn version_at(&self, entity: &[u8], feature: FeatureId, q: AsOf) -> Option<&Row> {
        let lo = q.lookback_us.map(|l| i128::from(q.as_of.0) - i128::from(l));
        self.rows
            .iter()
            .filter(|r| r.entity == entity && r.feature == feature)
            .filter(|r| r.event_time <= q.as_of && lo.is_none_or(|lo| i128::from(r.event_time.0) >= lo))
            .filter(|r| r.system_time <= q.known_at)
            .max_by_key(|r| (r.event_time, r.system_time))
    }

    /// `value_at`: absent for a tombstone.
    pub fn value_at(&self, entity: &[u8], feature: FeatureId, q: AsOf) -> Option<Value> {
        self.version_at(entity, feature, q).and_then(|r| r.value.clone())
    }

    /// The scan contract: every version in range, in key order.
    pub fn scan(&self, range: &ScanRange) -> Vec<Tuple> {
        let mut out: Vec<_> = self
            .rows
            .iter()
            .filter(|r| r.entity >= range.entity_start && range.entity_end.as_ref().is_none_or(|e| r.entity < *e))
            .filter(|r| range.features.is_none_or(|(a, b)| a <= r.feature && r.feature <= b))
            .filter(|r| range.event_time_min <= r.event_time && r.event_time <= range.event_time_max)
            .filter(|r| range.system_time_min <= r.system_time && r.system_time <= range.system_time_max)
            .map(|r| (r.entity.clone(), r.feature, r.event_time, r.system_time, r.value.clone()))
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
pub fn same(engine: &Option<CellVersion>, model: Option<&Row>) -> bool {
    match (engine, model) {
        (None, None) => true,
        (None, Some(m)) => m.value.is_none(),
        (Some(e), Some(m)) => e.event_time == m.event_time && e.system_time == m.system_time && e.value == m.value,
        _ => false,
    }
}
