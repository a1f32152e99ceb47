//! The release gate: what `PromoteGroup` checks before a candidate version serves (README
//! "Group versions").
//!
//! One scan of the engine (user keyspace, the features of both versions) reads, for every
//! entity holding a cell of either version, each feature's *latest* version: the greatest event
//! time, then system time (the first in key order), as `value_at` at `as_of = +inf` and
//! `known_at = now` answers it, TTL not applied. A tombstone is no value. Per feature of the
//! candidate, by name:
//! - **coverage**: the share of those entities with a value, in each version; the candidate
//!   fails below `min_coverage_ratio` (group; default [`MIN_COVERAGE_RATIO_DEFAULT`]) times the
//!   serving version's share (a feature the serving version lacks is not compared);
//! - **nulls**: the candidate's null share (1 - coverage) against the feature's
//!   `max_null_rate`, when set;
//! - **drift against the serving version**: the serving version's values summarised as a
//!   baseline (deciles, or top categories, and nulls, as `drift::Summary` does for training
//!   files) and the candidate's compared with it (`drift::compare`: PSI with the null bucket,
//!   KS), against the feature's `max_psi` / `max_ks` (not compared when the serving version
//!   holds no value of the feature);
//! - **drift against the group's newest baseline**, when it has one with the feature;
//! - **shadow reads**: the share of shadow comparisons that differed, against the group's
//!   `max_shadow_mismatch_rate` (default [`MAX_SHADOW_MISMATCH_RATE_DEFAULT`]), when any were
//!   made.
//!
//! Bounded: at most [`GATE_ENTITIES_MAX`] entities (in key order; past it the report says it
//! is truncated) and a uniform sample of [`GATE_SAMPLE_VALUES`] values per feature and side for
//! the drift statistics. The gate reads; it never writes, and it runs outside the registry's
//! lock (the promotion that follows is one registry write).

use std::collections::HashMap;

use quiver_proto::v1 as pb;
use quiver_storage::{Db, FeatureId, ScanRange};

use crate::drift::{self, Observation};
use crate::features::ServiceError;
use crate::registry::Registry;

/// Most entities one gate reads.
pub const GATE_ENTITIES_MAX: u64 = 1_000_000;
/// Values per feature and version the drift statistics are computed from (a uniform sample).
pub const GATE_SAMPLE_VALUES: usize = 100_000;
/// `min_coverage_ratio` when the group does not set it.
pub const MIN_COVERAGE_RATIO_DEFAULT: f64 = 0.95;
/// `max_shadow_mismatch_rate` when the group does not set it.
pub const MAX_SHADOW_MISMATCH_RATE_DEFAULT: f64 = 0.01;

type Result<T> = std::result::Result<T, ServiceError>;

/// A uniform sample of at most `cap` items (Algorithm R, seeded: the same data gives the same
/// sample).
#[derive(Debug, Clone)]
pub(crate) struct Sample<T> {
    cap: usize,
    seen: u64,
    rng: u64,
    pub(crate) kept: Vec<T>,
}

impl<T> Sample<T> {
    pub(crate) fn new(cap: usize) -> Self {
        Sample { cap, seen: 0, rng: 0x6761_7465, kept: Vec::new() }
    }

    pub(crate) fn add(&mut self, o: T) {
        self.seen += 1;
        if self.kept.len() < self.cap {
            self.kept.push(o);
            return;
        }
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let j = ((z ^ (z >> 31)) % self.seen) as usize;
        if j < self.cap {
            self.kept[j] = o;
        }
    }
}

/// One feature of the candidate, and its serving counterpart.
struct Checked {
    def: pb::FeatureDef,
    candidate: FeatureId,
    serving: Option<(FeatureId, pb::ValueType)>,
    present: [u64; 2],
    serving_values: Option<drift::Summary>,
    candidate_values: Sample<Observation>,
}

/// Shadow comparisons of one feature: (compared, differed).
pub type ShadowCounts = Option<(u64, u64)>;

/// Runs the gate for `group@candidate` against the group's serving version; `shadow` gives
/// each feature's shadow comparisons.
pub fn check(
    db: &Db,
    registry: &Registry,
    group: &str,
    candidate: u32,
    shadow: impl Fn(&str) -> ShadowCounts,
) -> Result<pb::GateReport> {
    let serving_def = registry.group(group, 0)?;
    let candidate_def = registry.group(group, candidate)?;
    let serving_ids = registry.resolve_group(&format!("{group}@{}", serving_def.version))?;
    let candidate_ids = registry.resolve_group(&format!("{group}@{candidate}"))?;
    // resolve_group lists the written features, in definition order (aggregates hold no data
    // of their own and are not gated).
    let written = candidate_def.features.iter().filter(|f| f.aggregation.is_none());
    let mut checked: Vec<Checked> = candidate_ids
        .iter()
        .zip(written)
        .map(|(c, def)| {
            let serving = serving_ids.iter().find(|s| s.feature == c.feature).map(|s| (s.id, s.value_type));
            let same_type = serving.is_some_and(|(_, t)| t == c.value_type) && drift::summarised(c.value_type);
            Checked {
                def: def.clone(),
                candidate: c.id,
                serving,
                present: [0, 0],
                serving_values: same_type
                    .then(|| drift::Summary::sampling(&c.feature, c.value_type, GATE_SAMPLE_VALUES)),
                candidate_values: Sample::new(GATE_SAMPLE_VALUES),
            }
        })
        .collect();
    // Feature id -> the checks reading it: (index, 0 serving / 1 candidate).
    let mut readers: HashMap<u32, Vec<(usize, usize)>> = HashMap::new();
    for (i, c) in checked.iter().enumerate() {
        readers.entry(c.candidate.0).or_default().push((i, 1));
        if let Some((s, _)) = c.serving {
            readers.entry(s.0).or_default().push((i, 0));
        }
    }
    let lo = readers.keys().min().copied().unwrap_or(0);
    let hi = readers.keys().max().copied().unwrap_or(0);
    let mut range = ScanRange::all();
    range.entity_start = vec![1]; // the user keyspace (reserved keys start with 0)
    range.features = Some((FeatureId(lo), FeatureId(hi)));

    // The current entity's latest value per (check, side): None = no cell yet.
    let mut latest: Vec<[Option<Option<pb::Value>>; 2]> = vec![[None, None]; checked.len()];
    let mut entity: Option<Vec<u8>> = None;
    let mut last_feature: Option<u32> = None;
    let (mut entities, mut truncated) = (0u64, false);
    let finish = |latest: &mut Vec<[Option<Option<pb::Value>>; 2]>, checked: &mut Vec<Checked>| {
        for (c, l) in checked.iter_mut().zip(latest.iter_mut()) {
            let [s, n] = std::mem::take(l);
            let (s, n) = (s.flatten(), n.flatten());
            if c.serving.is_some() {
                c.present[0] += u64::from(s.is_some());
                if let Some(sum) = &mut c.serving_values {
                    sum.add(drift::observe(s.as_ref()));
                }
            }
            c.present[1] += u64::from(n.is_some());
            c.candidate_values.add(drift::observe(n.as_ref()));
        }
    };
    for item in db.scan(range)? {
        let item = item?;
        let Some(rs) = readers.get(&item.feature.0) else { continue };
        if entity.as_deref() != Some(item.entity.as_slice()) {
            if entity.is_some() {
                finish(&mut latest, &mut checked);
            }
            if entities == GATE_ENTITIES_MAX {
                truncated = true;
                entity = None;
                break;
            }
            entities += 1;
            entity = Some(item.entity.clone());
            last_feature = None;
        }
        if last_feature == Some(item.feature.0) {
            continue; // an older version: the first one met is the latest
        }
        last_feature = Some(item.feature.0);
        let v = item.version.value.as_ref().map(crate::convert::to_api);
        for &(i, side) in rs {
            latest[i][side] = Some(v.clone());
        }
    }
    if entity.is_some() {
        finish(&mut latest, &mut checked);
    }

    let min_ratio = candidate_def.min_coverage_ratio.unwrap_or(MIN_COVERAGE_RATIO_DEFAULT);
    let max_mismatch = candidate_def.max_shadow_mismatch_rate.unwrap_or(MAX_SHADOW_MISMATCH_RATE_DEFAULT);
    let baseline = drift::list(db, Some(group))?.into_iter().next();
    let share = |n: u64| if entities == 0 { 0.0 } else { n as f64 / entities as f64 };
    let mut features = Vec::with_capacity(checked.len());
    for c in checked {
        let name = c.def.name.clone();
        let mut failures = Vec::new();
        let (cov_s, cov_n) = (share(c.present[0]), share(c.present[1]));
        if c.serving.is_some() && cov_n < min_ratio * cov_s {
            failures.push(format!(
                "coverage {:.2}% is below {min_ratio} x the serving version's {:.2}%",
                cov_n * 100.0,
                cov_s * 100.0
            ));
        }
        let null_rate = if entities == 0 { 0.0 } else { 1.0 - cov_n };
        if let Some(max) = c.def.max_null_rate {
            if null_rate > max {
                failures.push(format!("null rate {null_rate:.4} is over max_null_rate {max}"));
            }
        }
        let observations = c.candidate_values.kept;
        // Nothing to compare with when the serving version holds no value of the feature.
        let versus_serving = c.serving_values.filter(|_| c.present[0] > 0).map(|s| {
            let d = drift::compare(&s.baseline(), Some(&c.def), observations.iter().cloned());
            if d.breached {
                failures.push(breach("the serving version", &d));
            }
            d
        });
        let versus_baseline = baseline.as_ref().and_then(|b| b.features.iter().find(|f| f.feature == name)).map(|b| {
            let d = drift::compare(b, Some(&c.def), observations.iter().cloned());
            if d.breached {
                failures.push(breach("the baseline", &d));
            }
            d
        });
        let (shadow_compared, shadow_mismatch_rate) = match shadow(&name) {
            Some((n, differed)) if n > 0 => {
                let rate = differed as f64 / n as f64;
                if rate > max_mismatch {
                    failures.push(format!(
                        "{differed} of {n} shadow reads differed ({rate:.4}), over max_shadow_mismatch_rate {max_mismatch}"
                    ));
                }
                (n, Some(rate))
            }
            _ => (0, None),
        };
        features.push(pb::FeatureGate {
            feature: name,
            coverage_serving: cov_s,
            coverage_candidate: cov_n,
            null_rate,
            max_null_rate: c.def.max_null_rate,
            versus_serving,
            versus_baseline,
            shadow_compared,
            shadow_mismatch_rate,
            failures,
        });
    }
    Ok(pb::GateReport {
        group: group.to_string(),
        serving_version: serving_def.version,
        candidate_version: candidate,
        entities,
        truncated,
        baseline: baseline.map(|b| b.name).unwrap_or_default(),
        min_coverage_ratio: min_ratio,
        max_shadow_mismatch_rate: max_mismatch,
        passed: features.iter().all(|f| f.failures.is_empty()),
        features,
    })
}

fn breach(against: &str, d: &pb::FeatureDrift) -> String {
    let psi = d.psi.map_or("-".to_string(), |p| format!("{p:.4}"));
    let ks = d.ks.map_or("-".to_string(), |k| format!("{k:.4}"));
    format!("drift against {against}: PSI {psi} (max {}), KS {ks} (max {})", d.max_psi, d.max_ks)
}

/// The failing features of a report, one line each (the FAILED_PRECONDITION message).
pub fn failures(r: &pb::GateReport) -> String {
    let lines: Vec<String> =
        r.features.iter().flat_map(|f| f.failures.iter().map(move |x| format!("{}: {x}", f.feature))).collect();
    format!(
        "release gate refused {}@{} (serving v{}): {}; promote with force to override",
        r.group,
        r.candidate_version,
        r.serving_version,
        lines.join("; ")
    )
}
