//! Shadow reads: online lookups of a group's serving version, sampled, read again from a staged
//! version and compared cell by cell (README "Group versions").
//!
//! quiverd `--shadow group@N` names the staged versions; `--shadow-sample-rate r` the share of
//! eligible lookups (those asking an unpinned feature of a shadowed group, while version N is
//! not the serving one) that are shadowed: every `round(1/r)`-th one, counted per node. The
//! lookup's path pays only that count and, for a sampled lookup, a copy of its entities and of
//! the shadowed columns into a queue bounded at [`SHADOW_QUEUE_LOOKUPS`] lookups (full:
//! dropped and counted). One background thread answers each queued lookup from the staged
//! version — the same request with `group@N:feature`, the same `as_of` and `default_missing`,
//! TTLs and defaults of version N, no logging and no health counting — and compares, per entity
//! and feature, the status and the value (bit for bit: NaN equals NaN); cells the lookup's
//! deadline left UNAVAILABLE are not compared. The served answer is never changed.
//!
//! Kept per feature since quiverd started: cells compared and mismatched; where both sides are
//! numbers, the absolute and relative differences (uniform samples of [`SHADOW_DIFFS_KEPT`]);
//! the served and staged values (samples of [`SHADOW_VALUES_KEPT`]) for PSI, bins from the
//! served values as `drift::Summary` makes them. Exposed in `GetFeatureHealth` (`quiver
//! monitor`), in metrics (`quiver_shadow_values_total{group,feature,result}`,
//! `quiver_shadow_mismatch_rate`, `quiver_shadow_psi`, `quiver_shadow_dropped_total`), and to
//! the release gate.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use prometheus::core::Collector;
use prometheus::{GaugeVec, IntCounter, IntCounterVec, Opts};
use quiver_proto::v1 as pb;

use crate::drift::{self, Observation};
use crate::features::Features;
use crate::gate::Sample;
use crate::registry::ResolvedFeature;

/// Sampled lookups waiting for the shadow thread; past it they are dropped (and counted).
pub const SHADOW_QUEUE_LOOKUPS: usize = 256;
/// Differences kept per feature for the quantiles (a uniform sample).
pub const SHADOW_DIFFS_KEPT: usize = 4096;
/// Values kept per feature and side for PSI (a uniform sample).
pub const SHADOW_VALUES_KEPT: usize = 10_000;
/// `--shadow-sample-rate` when not given.
pub const SHADOW_SAMPLE_RATE_DEFAULT: f64 = 0.01;

/// One sampled lookup: what was served for one shadowed group.
struct Job {
    entity_type: String,
    entities: Vec<pb::EntityKey>,
    as_of_us: i64,
    /// The lookup's `default_missing`, so the staged answer is made the same way.
    default_missing: bool,
    group: String,
    version: u32,
    /// Per shadowed feature: its name and the served column.
    served: Vec<(String, pb::FeatureColumn)>,
}

#[derive(Debug)]
struct FeatureState {
    compared: u64,
    mismatched: u64,
    abs: Sample<f64>,
    rel: Sample<f64>,
    served: drift::Summary,
    staged: Sample<Observation>,
}

#[derive(Debug, Default)]
struct GroupState {
    lookups: u64,
    dropped: u64,
    features: BTreeMap<String, FeatureState>,
}

/// The shadow reads of one node.
pub struct Shadow {
    /// Group -> the staged version shadowed.
    targets: BTreeMap<String, u32>,
    every: u64,
    seen: AtomicU64,
    tx: SyncSender<Job>,
    rx: Mutex<Option<Receiver<Job>>>,
    state: Mutex<BTreeMap<String, GroupState>>,
    values: IntCounterVec,
    mismatch_rate: GaugeVec,
    psi: GaugeVec,
    dropped: IntCounter,
}

impl std::fmt::Debug for Shadow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shadow").field("targets", &self.targets).field("every", &self.every).finish()
    }
}

fn err(e: prometheus::Error) -> String {
    format!("shadow metrics: {e}")
}

/// Quantiles 0.5, 0.9, 0.99 of `x` (empty: none).
fn quantiles(mut x: Vec<f64>) -> Vec<f64> {
    if x.is_empty() {
        return Vec::new();
    }
    x.sort_by(f64::total_cmp);
    [0.5, 0.9, 0.99].iter().map(|q| x[((x.len() - 1) as f64 * q).round() as usize]).collect()
}

fn number(v: Option<&pb::Value>) -> Option<f64> {
    match drift::observe(v) {
        Observation::Number(x) => Some(x),
        _ => None,
    }
}

impl Shadow {
    /// Shadows `targets` ("group@N" each) for a share `rate` (0 < rate <= 1) of eligible lookups.
    pub fn new(targets: &[String], rate: f64) -> Result<Shadow, String> {
        if !(rate > 0.0 && rate <= 1.0) {
            return Err(format!("--shadow-sample-rate {rate} must be above 0 and at most 1"));
        }
        let mut map = BTreeMap::new();
        for t in targets {
            match crate::registry::parse_group_ref(t) {
                Some((g, v)) if v > 0 && !map.contains_key(g) => {
                    map.insert(g.to_string(), v);
                }
                Some((g, v)) if v > 0 => return Err(format!("--shadow names group {g} twice")),
                _ => return Err(format!("--shadow {t:?} must be group@N")),
            }
        }
        let (tx, rx) = sync_channel(SHADOW_QUEUE_LOOKUPS);
        let labels = &["group", "feature"];
        Ok(Shadow {
            targets: map,
            every: (1.0 / rate).round().max(1.0) as u64,
            seen: AtomicU64::new(0),
            tx,
            rx: Mutex::new(Some(rx)),
            state: Mutex::new(BTreeMap::new()),
            values: IntCounterVec::new(
                Opts::new("shadow_values_total", "shadow-read cells compared, by result (match, mismatch)"),
                &["group", "feature", "result"],
            )
            .map_err(err)?,
            mismatch_rate: GaugeVec::new(
                Opts::new("shadow_mismatch_rate", "share of shadow-read cells that differed, since start"),
                labels,
            )
            .map_err(err)?,
            psi: GaugeVec::new(Opts::new("shadow_psi", "PSI of the staged values against the served ones"), labels)
                .map_err(err)?,
            dropped: IntCounter::new("shadow_dropped_total", "sampled lookups dropped: the shadow queue was full")
                .map_err(err)?,
        })
    }

    /// True if no group is shadowed.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// The metrics to register.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.values.clone()),
            Box::new(self.mismatch_rate.clone()),
            Box::new(self.psi.clone()),
            Box::new(self.dropped.clone()),
        ]
    }

    /// Starts the shadow thread, answering from `features` while it lives.
    pub fn start(self: &Arc<Self>, features: Weak<Features>) -> Result<(), String> {
        let Some(rx) = self.rx.lock().take() else { return Ok(()) };
        let me = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("quiver-shadow".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    let (Some(shadow), Some(features)) = (me.upgrade(), features.upgrade()) else { return };
                    shadow.answer(&features, job);
                }
            })
            .map(|_| ())
            .map_err(|e| format!("shadow thread: {e}"))
    }

    /// Called by a lookup after answering: queues a sampled copy of the columns of shadowed
    /// groups. `features[j]` answered `refs[j]` into `columns[j]`.
    pub fn offer(
        &self,
        req: &pb::GetOnlineFeaturesRequest,
        as_of_us: i64,
        features: &[ResolvedFeature],
        columns: &[pb::FeatureColumn],
    ) {
        for (group, &staged) in &self.targets {
            let eligible = |j: usize| {
                let f = &features[j];
                f.group == *group && f.version != staged && !req.features[j].contains('@')
            };
            if !(0..features.len()).any(eligible) {
                continue;
            }
            if !self.seen.fetch_add(1, Ordering::Relaxed).is_multiple_of(self.every) {
                continue;
            }
            let served = (0..features.len())
                .filter(|&j| eligible(j))
                .map(|j| (features[j].feature.clone(), columns[j].clone()))
                .collect();
            let job = Job {
                entity_type: req.entity_type.clone(),
                entities: req.entities.clone(),
                as_of_us,
                default_missing: req.default_missing,
                group: group.clone(),
                version: staged,
                served,
            };
            let full = matches!(self.tx.try_send(job), Err(TrySendError::Full(_)));
            let mut st = self.state.lock();
            let g = st.entry(group.clone()).or_default();
            g.lookups += 1;
            if full {
                g.dropped += 1;
                self.dropped.inc();
            }
        }
    }

    /// Reads one queued lookup from the staged version and records the comparison.
    fn answer(&self, features: &Features, job: Job) {
        let req = pb::GetOnlineFeaturesRequest {
            entity_type: job.entity_type,
            entities: job.entities,
            features: job.served.iter().map(|(f, _)| format!("{}@{}:{f}", job.group, job.version)).collect(),
            as_of: Some(crate::convert::timestamp(job.as_of_us)),
            default_missing: job.default_missing,
            ..Default::default()
        };
        let staged = match features.get_online_quiet(&req, job.as_of_us) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, group = %job.group, "shadow read failed");
                return;
            }
        };
        let mut st = self.state.lock();
        let g = st.entry(job.group.clone()).or_default();
        for ((name, served), staged) in job.served.iter().zip(&staged.columns) {
            let f = g.features.entry(name.clone()).or_insert_with(|| FeatureState {
                compared: 0,
                mismatched: 0,
                abs: Sample::new(SHADOW_DIFFS_KEPT),
                rel: Sample::new(SHADOW_DIFFS_KEPT),
                served: drift::Summary::sampling(name, served.r#type(), SHADOW_VALUES_KEPT),
                staged: Sample::new(SHADOW_VALUES_KEPT),
            });
            let (mut matched, mut differed) = (0u64, 0u64);
            for i in 0..served.statuses.len() {
                // A cell the deadline left unread was not served: nothing to compare.
                if served.statuses[i] == pb::FeatureStatus::Unavailable as i32 {
                    continue;
                }
                let a = (served.statuses[i], crate::convert::column_value(served, i));
                let b = (staged.statuses.get(i).copied().unwrap_or(0), crate::convert::column_value(staged, i));
                let same = a.0 == b.0 && same_value(a.1.as_ref(), b.1.as_ref());
                if same {
                    matched += 1;
                } else {
                    differed += 1;
                }
                if let (Some(x), Some(y)) = (number(a.1.as_ref()), number(b.1.as_ref())) {
                    f.abs.add((y - x).abs());
                    if x != 0.0 {
                        f.rel.add(((y - x) / x).abs());
                    }
                }
                f.served.add(drift::observe(a.1.as_ref()));
                f.staged.add(drift::observe(b.1.as_ref()));
            }
            f.compared += matched + differed;
            f.mismatched += differed;
            self.values.with_label_values(&[&job.group, name, "match"]).inc_by(matched);
            self.values.with_label_values(&[&job.group, name, "mismatch"]).inc_by(differed);
        }
    }

    /// Cells of `group@version`'s `feature` compared and mismatched (for the release gate).
    pub fn counts(&self, group: &str, version: u32, feature: &str) -> Option<(u64, u64)> {
        if self.targets.get(group) != Some(&version) {
            return None;
        }
        let st = self.state.lock();
        st.get(group)?.features.get(feature).map(|f| (f.compared, f.mismatched))
    }

    /// What `GetFeatureHealth` shows for `group` (None: not shadowed).
    pub fn report(&self, group: &str) -> Option<pb::ShadowHealth> {
        let staged = *self.targets.get(group)?;
        let st = self.state.lock();
        let Some(g) = st.get(group) else {
            return Some(pb::ShadowHealth { staged_version: staged, ..Default::default() });
        };
        let features = g
            .features
            .iter()
            .map(|(name, f)| {
                let psi = drift::compare(&f.served.clone().baseline(), None, f.staged.kept.iter().cloned()).psi;
                pb::ShadowFeature {
                    feature: name.clone(),
                    compared: f.compared,
                    mismatched: f.mismatched,
                    mismatch_rate: if f.compared == 0 { 0.0 } else { f.mismatched as f64 / f.compared as f64 },
                    abs_diff_quantiles: quantiles(f.abs.kept.clone()),
                    rel_diff_quantiles: quantiles(f.rel.kept.clone()),
                    psi,
                }
            })
            .collect();
        Some(pb::ShadowHealth { staged_version: staged, lookups: g.lookups, dropped: g.dropped, features })
    }

    /// Sets the gauges (at every scrape).
    pub fn refresh_gauges(&self) {
        for group in self.targets.keys() {
            for f in self.report(group).map(|r| r.features).unwrap_or_default() {
                self.mismatch_rate.with_label_values(&[group, &f.feature]).set(f.mismatch_rate);
                if let Some(p) = f.psi {
                    self.psi.with_label_values(&[group, &f.feature]).set(p);
                }
            }
        }
    }
}

/// Whether two served values are the same, floats bit for bit (NaN equals NaN, 0.0 is not -0.0).
fn same_value(a: Option<&pb::Value>, b: Option<&pb::Value>) -> bool {
    use pb::value::Kind;
    match (a.and_then(|v| v.kind.as_ref()), b.and_then(|v| v.kind.as_ref())) {
        (Some(Kind::Float64Value(x)), Some(Kind::Float64Value(y))) => x.to_bits() == y.to_bits(),
        (Some(Kind::Float32Value(x)), Some(Kind::Float32Value(y))) => x.to_bits() == y.to_bits(),
        (Some(Kind::Float32Vector(x)), Some(Kind::Float32Vector(y))) => {
            x.values.len() == y.values.len() && x.values.iter().zip(&y.values).all(|(p, q)| p.to_bits() == q.to_bits())
        }
        (x, y) => x == y,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f64v(x: f64) -> pb::Value {
        pb::Value { kind: Some(pb::value::Kind::Float64Value(x)) }
    }

    #[test]
    fn values_compare_bit_for_bit() {
        assert!(same_value(Some(&f64v(f64::NAN)), Some(&f64v(f64::NAN))));
        assert!(!same_value(Some(&f64v(0.0)), Some(&f64v(-0.0))));
        assert!(same_value(Some(&f64v(1.5)), Some(&f64v(1.5))));
        assert!(!same_value(Some(&f64v(1.5)), None));
        assert!(same_value(None, None));
        let s = |x: &str| pb::Value { kind: Some(pb::value::Kind::StringValue(x.into())) };
        assert!(same_value(Some(&s("a")), Some(&s("a"))) && !same_value(Some(&s("a")), Some(&s("b"))));
        assert_eq!(quantiles(vec![3.0, 1.0, 2.0]), vec![2.0, 3.0, 3.0]);
        assert!(quantiles(Vec::new()).is_empty());
    }
}
