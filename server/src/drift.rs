//! Drift (README "Drift"): how far the values a group's features are served with moved from a
//! *baseline*, the same features in a training set.
//!
//! # Baselines
//! `quiver baseline capture` reads a training file and summarises each feature of one group
//! with [`Summary`]; `PutBaseline` stores it in the reserved keyspace — entity
//! [`quiver_storage::reserved::MONITOR_BASELINES`] + group + `0x00` + name, feature 0, event
//! time 0, value the encoded [`pb::Baseline`] (at most [`BASELINE_BYTES_MAX`]) — which
//! replicates, so every region compares against the same baselines. A name put again is
//! replaced (the newest version is the baseline); a group is measured against its newest.
//!
//! Per feature, over the rows of the file ([`observe`] turns a value into an observation):
//! - numeric (int64, float32, float64, and float32 vectors by their L2 norm): bin edges at the
//!   deciles of the values ([`BASELINE_BINS`] bins at most: equal deciles merge), the values per
//!   bin, and a sorted sample of at most [`BASELINE_SAMPLE_MAX`] values for the KS statistic
//!   (all values when there are that few, else the values at evenly spaced ranks);
//! - categorical (string, bool): the [`BASELINE_CATEGORIES_MAX`] most frequent values and the
//!   count of every other;
//! - the rows with no value (nulls; NaN and ±infinity count as null).
//!
//! A file with more than [`CAPTURE_VALUES_MAX`] values of a numeric feature is summarised from
//! a uniform sample of that many (reservoir sampling, seeded: the same file gives the same
//! baseline).
//!
//! # Current values
//! From the served-feature log over a window (default [`DRIFT_WINDOW`]): the values of PRESENT
//! and DEFAULTED answers of the group's features (any version) are binned with the baseline's
//! edges (or categories), NOT_FOUND and STALE answers count as nulls, UNAVAILABLE ones (never
//! read) are left out. Numeric values are also kept for KS, at most [`DRIFT_VALUES_MAX`] per
//! feature (a uniform sample beyond). Memory is bounded by those and by the group's size.
//!
//! # Statistics
//! Both sides become shares over the same buckets — the bins (or categories and "other") and
//! a null bucket: bucket i's share is `count_i / Σcount × (rows − nulls) / rows`, the null
//! bucket's `nulls / rows` (so a baseline summarised from a sample weighs its buckets right).
//! - PSI = Σ (c − b) · ln(c / b), each share floored at [`PSI_SHARE_FLOOR`] (an empty bucket on
//!   one side would make it infinite);
//! - Jensen–Shannon divergence = ½ Σ b · log2(b / m) + ½ Σ c · log2(c / m), m = (b + c) / 2, with
//!   0 · log 0 = 0: in [0, 1], no floor needed;
//! - KS = sup over x of |F_b(x) − F_c(x)|, the empirical CDFs of the non-null numeric values
//!   (the baseline's sample against the current values): the two-sample statistic.
//!
//! Written values (the ingest sketches) carry no null rows — a delete is not a null answer — so
//! they are compared over the value buckets only, the baseline's nulls left out on both sides.
//!
//! PSI and JS are absent when a side has no rows, KS when a side has no non-null value. A
//! feature breaches when PSI is over its `max_psi` or KS over its `max_ks` (registry; defaults
//! [`MAX_PSI_DEFAULT`], [`MAX_KS_DEFAULT`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use quiver_proto::v1 as pb;
use quiver_storage::{Db, Durability, EventTime, FeatureId, ScanRange, Value, WriteBatch};

use crate::features::ServiceError;
use crate::registry::Registry;
use crate::servedlog::ServedLog;

/// Most bins of a numeric baseline (decile edges).
pub const BASELINE_BINS: usize = 10;
/// Most values of a numeric baseline's sample (for KS).
pub const BASELINE_SAMPLE_MAX: usize = 1_000;
/// Most categories a baseline keeps per feature (the rest are "other").
pub const BASELINE_CATEGORIES_MAX: usize = 20;
/// Most bytes of an encoded baseline (one engine value).
pub const BASELINE_BYTES_MAX: usize = quiver_storage::limits::VALUE_BYTES_MAX;
/// Baseline names: `[a-z0-9][a-z0-9_.-]{0,62}`.
pub const BASELINE_NAME_BYTES_MAX: usize = 63;
/// Most values of a numeric feature a capture summarises (a uniform sample beyond).
pub const CAPTURE_VALUES_MAX: usize = 1_000_000;
/// The floor of each share in PSI.
pub const PSI_SHARE_FLOOR: f64 = 1e-4;
/// `max_psi` when the registry sets none.
pub const MAX_PSI_DEFAULT: f64 = 0.2;
/// `max_ks` when the registry sets none.
pub const MAX_KS_DEFAULT: f64 = 0.1;
/// The window drift is measured over when a request (or the gauges) give none.
pub const DRIFT_WINDOW: Duration = Duration::from_secs(3600);
/// How often quiverd measures every group with a baseline (gauges, `GetFeatureHealth`).
pub const DRIFT_INTERVAL: Duration = Duration::from_secs(300);
/// Most numeric values per feature a measurement keeps for KS (a uniform sample beyond).
pub const DRIFT_VALUES_MAX: usize = 100_000;
/// Most logged answers one measurement reads.
pub const DRIFT_ANSWERS_MAX: usize = 1_000_000;

/// One value as drift sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// No value (or NaN).
    Null,
    /// A numeric feature's value (a vector's L2 norm).
    Number(f64),
    /// A string's or bool's value.
    Category(String),
}

/// Whether features of type `t` are summarised (bytes and lists are not).
pub fn summarised(t: pb::ValueType) -> bool {
    use pb::ValueType as T;
    matches!(t, T::Bool | T::Int64 | T::Float32 | T::Float64 | T::String | T::Float32Vector)
}

/// Whether features of type `t` are numeric (binned, KS) rather than categorical.
pub fn numeric(t: pb::ValueType) -> bool {
    use pb::ValueType as T;
    matches!(t, T::Int64 | T::Float32 | T::Float64 | T::Float32Vector)
}

/// A value (`None`: no value) as an observation; kinds that are not summarised are null.
pub fn observe(v: Option<&pb::Value>) -> Observation {
    use pb::value::Kind;
    let number = |x: f64| if x.is_finite() { Observation::Number(x) } else { Observation::Null };
    match v.and_then(|v| v.kind.as_ref()) {
        Some(Kind::BoolValue(b)) => Observation::Category(b.to_string()),
        Some(Kind::Int64Value(i)) => number(*i as f64),
        Some(Kind::Float32Value(f)) => number(f64::from(*f)),
        Some(Kind::Float64Value(f)) => number(*f),
        Some(Kind::StringValue(s)) => Observation::Category(s.clone()),
        Some(Kind::Float32Vector(l)) => {
            number(l.values.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt())
        }
        _ => Observation::Null,
    }
}

/// A deterministic generator for reservoir sampling (splitmix64).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n.max(1)
    }
}

/// A uniform sample of at most `cap` numbers (Algorithm R).
#[derive(Debug, Clone)]
struct Reservoir {
    cap: usize,
    seen: u64,
    values: Vec<f64>,
    rng: Rng,
}

impl Reservoir {
    fn new(cap: usize) -> Self {
        Reservoir { cap, seen: 0, values: Vec::new(), rng: Rng(0x5155_4956_4552) }
    }

    fn add(&mut self, x: f64) {
        self.seen += 1;
        if self.values.len() < self.cap {
            self.values.push(x);
        } else {
            let j = self.rng.below(self.seen) as usize;
            if j < self.cap {
                self.values[j] = x;
            }
        }
    }

    fn sorted(mut self) -> Vec<f64> {
        self.values.sort_by(f64::total_cmp);
        self.values
    }
}

/// One feature's observations in a training file, summarised by [`Summary::baseline`].
#[derive(Debug, Clone)]
pub struct Summary {
    feature: String,
    value_type: pb::ValueType,
    rows: u64,
    nulls: u64,
    numbers: Reservoir,
    categories: HashMap<String, u64>,
}

impl Summary {
    /// An empty summary of `feature` of type `t`.
    pub fn new(feature: &str, t: pb::ValueType) -> Self {
        Self::sampling(feature, t, CAPTURE_VALUES_MAX)
    }

    /// An empty summary keeping a uniform sample of at most `numbers` values.
    pub fn sampling(feature: &str, t: pb::ValueType, numbers: usize) -> Self {
        Summary {
            feature: feature.to_string(),
            value_type: t,
            rows: 0,
            nulls: 0,
            numbers: Reservoir::new(numbers),
            categories: HashMap::new(),
        }
    }

    /// Adds one row's value.
    pub fn add(&mut self, o: Observation) {
        self.rows += 1;
        match o {
            Observation::Null => self.nulls += 1,
            Observation::Number(x) if numeric(self.value_type) => self.numbers.add(x),
            Observation::Category(c) if !numeric(self.value_type) => *self.categories.entry(c).or_insert(0) += 1,
            // A value of another kind than the feature's: not this feature's, so a null.
            _ => self.nulls += 1,
        }
    }

    /// The feature's baseline.
    pub fn baseline(self) -> pb::FeatureBaseline {
        let summary = if numeric(self.value_type) {
            let sorted = self.numbers.sorted();
            let n = sorted.len();
            let mut edges: Vec<f64> = Vec::new();
            if n > 0 {
                for q in 1..BASELINE_BINS {
                    let e = sorted[(q * n / BASELINE_BINS).min(n - 1)];
                    if edges.last() != Some(&e) {
                        edges.push(e);
                    }
                }
            }
            let mut counts = vec![0u64; edges.len() + 1];
            for &x in &sorted {
                counts[bin(&edges, x)] += 1;
            }
            let sample = if n <= BASELINE_SAMPLE_MAX {
                sorted
            } else {
                (0..BASELINE_SAMPLE_MAX).map(|i| sorted[i * (n - 1) / (BASELINE_SAMPLE_MAX - 1)]).collect()
            };
            pb::feature_baseline::Summary::Numeric(pb::NumericSummary { edges, counts, sample })
        } else {
            let mut all: Vec<(String, u64)> = self.categories.into_iter().collect();
            all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            let other = all.iter().skip(BASELINE_CATEGORIES_MAX).map(|c| c.1).sum();
            all.truncate(BASELINE_CATEGORIES_MAX);
            let (categories, counts) = all.into_iter().unzip();
            pb::feature_baseline::Summary::Categorical(pb::CategoricalSummary { categories, counts, other })
        };
        pb::FeatureBaseline {
            feature: self.feature,
            r#type: self.value_type as i32,
            rows: self.rows,
            nulls: self.nulls,
            summary: Some(summary),
        }
    }
}

/// The bin of `x` among ascending `edges`: the number of edges at or below it.
fn bin(edges: &[f64], x: f64) -> usize {
    edges.partition_point(|&e| e <= x)
}

/// Shares over the buckets and a null bucket (last); `None` with no rows.
pub fn shares(counts: &[u64], nulls: u64, rows: u64) -> Option<Vec<f64>> {
    if rows == 0 {
        return None;
    }
    let total = counts.iter().fold(0u64, |a, &n| a.saturating_add(n));
    let non_null = rows.saturating_sub(nulls) as f64 / rows as f64;
    let mut s: Vec<f64> =
        counts.iter().map(|&c| if total == 0 { 0.0 } else { c as f64 / total as f64 * non_null }).collect();
    s.push(nulls.min(rows) as f64 / rows as f64);
    Some(s)
}

/// Population stability index of `current` against `base` (shares over the same buckets).
pub fn psi(base: &[f64], current: &[f64]) -> f64 {
    base.iter()
        .zip(current)
        .map(|(&b, &c)| {
            let (b, c) = (b.max(PSI_SHARE_FLOOR), c.max(PSI_SHARE_FLOOR));
            (c - b) * (c / b).ln()
        })
        .sum()
}

/// Jensen–Shannon divergence (base 2) of two share vectors over the same buckets.
pub fn js(base: &[f64], current: &[f64]) -> f64 {
    let term = |p: f64, m: f64| if p > 0.0 { p * (p / m).log2() } else { 0.0 };
    base.iter()
        .zip(current)
        .map(|(&b, &c)| {
            let m = (b + c) / 2.0;
            0.5 * term(b, m) + 0.5 * term(c, m)
        })
        .sum::<f64>()
        .clamp(0.0, 1.0)
}

/// The two-sample Kolmogorov–Smirnov statistic of two ascending samples (`None`: one is empty).
pub fn ks(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j, mut d) = (0usize, 0usize, 0f64);
    while i < a.len() && j < b.len() {
        let x = if a[i].total_cmp(&b[j]).is_le() { a[i] } else { b[j] };
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / na - j as f64 / nb).abs());
    }
    Some(d)
}

/// Where an observation goes among a baseline's buckets.
enum Class {
    Null,
    /// A bucket, and the number (numeric features) kept for KS.
    Bucket(usize, Option<f64>),
    /// A value of another kind (a group version where the feature had another type): left out.
    Skip,
}

fn classify(base: &pb::FeatureBaseline, o: Observation) -> Class {
    match (o, &base.summary) {
        (Observation::Null, _) => Class::Null,
        (Observation::Number(x), Some(pb::feature_baseline::Summary::Numeric(n))) => {
            Class::Bucket(bin(&n.edges, x), Some(x))
        }
        (Observation::Category(v), Some(pb::feature_baseline::Summary::Categorical(c))) => {
            Class::Bucket(c.categories.iter().position(|k| *k == v).unwrap_or(c.categories.len()), None)
        }
        _ => Class::Skip,
    }
}

fn bucket_count(base: &pb::FeatureBaseline) -> usize {
    match &base.summary {
        Some(pb::feature_baseline::Summary::Numeric(n)) => n.edges.len() + 1,
        Some(pb::feature_baseline::Summary::Categorical(c)) => c.categories.len() + 1,
        None => 0,
    }
}

/// Values bucketed like a baseline, and numbers sampled for KS.
#[derive(Debug, Clone)]
struct Tally {
    buckets: Vec<u64>,
    nulls: u64,
    values: u64,
    numbers: Reservoir,
}

impl Tally {
    fn new(base: &pb::FeatureBaseline, sample: usize) -> Self {
        Tally { buckets: vec![0; bucket_count(base)], nulls: 0, values: 0, numbers: Reservoir::new(sample) }
    }

    fn add(&mut self, base: &pb::FeatureBaseline, o: Observation) {
        match classify(base, o) {
            Class::Null => self.nulls += 1,
            Class::Bucket(i, x) => {
                if let Some(b) = self.buckets.get_mut(i) {
                    *b += 1;
                    self.values += 1;
                }
                if let Some(x) = x {
                    self.numbers.add(x);
                }
            }
            Class::Skip => {}
        }
    }
}

/// Whether the null bucket takes part in PSI and JS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Nulls {
    /// Served values: a null answer is an outcome to compare with the training set's nulls.
    Compared,
    /// Written values: a write carries values (a delete is not a null row), so both sides are
    /// compared over their values only.
    Left,
}

/// The drift of `current` (its numbers sorted in `sorted`) against `base`, with the bounds of
/// `def`.
fn drift_of(
    base: &pb::FeatureBaseline,
    def: Option<&pb::FeatureDef>,
    buckets: &[u64],
    (nulls, values): (u64, u64),
    sorted: &[f64],
    null_bucket: Nulls,
) -> pb::FeatureDrift {
    let max_psi = def.and_then(|d| d.max_psi).unwrap_or(MAX_PSI_DEFAULT);
    let max_ks = def.and_then(|d| d.max_ks).unwrap_or(MAX_KS_DEFAULT);
    let (base_counts, base_sample): (Vec<u64>, &[f64]) = match &base.summary {
        Some(pb::feature_baseline::Summary::Numeric(n)) => (n.counts.clone(), &n.sample),
        Some(pb::feature_baseline::Summary::Categorical(c)) => {
            (c.counts.iter().copied().chain([c.other]).collect(), &[])
        }
        None => (Vec::new(), &[]),
    };
    let (b, c) = match null_bucket {
        Nulls::Compared => (shares(&base_counts, base.nulls, base.rows), shares(buckets, nulls, values + nulls)),
        Nulls::Left => {
            let base_values = base_counts.iter().fold(0u64, |a, &n| a.saturating_add(n));
            (shares(&base_counts, 0, base_values), shares(buckets, 0, values))
        }
    };
    let (psi_v, js_v) = match (b, c) {
        (Some(b), Some(c)) if b.len() == c.len() => (Some(psi(&b, &c)), Some(js(&b, &c))),
        _ => (None, None),
    };
    let numeric_base = matches!(base.summary, Some(pb::feature_baseline::Summary::Numeric(_)));
    let ks_v = if numeric_base { ks(base_sample, sorted) } else { None };
    let breached = psi_v.is_some_and(|p| p > max_psi) || ks_v.is_some_and(|k| k > max_ks);
    pb::FeatureDrift {
        feature: base.feature.clone(),
        values,
        nulls,
        psi: psi_v,
        js: js_v,
        ks: ks_v,
        max_psi,
        max_ks,
        breached,
        counts: buckets.to_vec(),
    }
}

/// The current values of one feature, bucketed like its baseline.
#[derive(Debug)]
struct Current<'a> {
    base: &'a pb::FeatureBaseline,
    tally: Tally,
}

impl<'a> Current<'a> {
    fn new(base: &'a pb::FeatureBaseline) -> Self {
        Current { base, tally: Tally::new(base, DRIFT_VALUES_MAX) }
    }

    fn add(&mut self, o: Observation) {
        self.tally.add(self.base, o);
    }

    fn drift(self, def: Option<&pb::FeatureDef>) -> pb::FeatureDrift {
        let t = self.tally;
        drift_of(self.base, def, &t.buckets, (t.nulls, t.values), &t.numbers.sorted(), Nulls::Compared)
    }
}

/// The drift of `observations` (one per row, nulls included and compared) against `base`,
/// with the bounds of `def`: how the release gate compares a candidate version's values with
/// the serving version's and with the group's baseline.
pub fn compare(
    base: &pb::FeatureBaseline,
    def: Option<&pb::FeatureDef>,
    observations: impl IntoIterator<Item = Observation>,
) -> pb::FeatureDrift {
    let mut c = Current::new(base);
    for o in observations {
        c.add(o);
    }
    c.drift(def)
}

/// Slots of the ingested-values window ([`DRIFT_WINDOW`] / `INGEST_SLOTS` each).
pub const INGEST_SLOTS: usize = 4;
/// Written values each slot keeps for KS (a uniform sample of the slot's).
pub const INGEST_SLOT_VALUES: usize = 256;

fn slot_us() -> i64 {
    (DRIFT_WINDOW.as_micros() as i64 / INGEST_SLOTS as i64).max(1)
}

/// One feature's written values over the last [`DRIFT_WINDOW`] (to within one slot), bucketed
/// like its baseline: exact counts, and a sample of [`INGEST_SLOT_VALUES`] numbers per slot.
#[derive(Debug, Clone)]
pub struct IngestSketch {
    base: pb::FeatureBaseline,
    /// Per slot: its number (time / slot length) and tally.
    slots: Vec<(i64, Tally)>,
}

impl IngestSketch {
    /// An empty sketch against `base`.
    pub fn new(base: pb::FeatureBaseline) -> Self {
        let empty = Tally::new(&base, INGEST_SLOT_VALUES);
        IngestSketch { slots: vec![(i64::MIN, empty); INGEST_SLOTS], base }
    }

    /// Adds a value written at `now_us`.
    pub fn add(&mut self, o: Observation, now_us: i64) {
        let epoch = now_us.div_euclid(slot_us());
        let i = epoch.rem_euclid(INGEST_SLOTS as i64) as usize;
        if self.slots[i].0 != epoch {
            self.slots[i] = (epoch, Tally::new(&self.base, INGEST_SLOT_VALUES));
        }
        self.slots[i].1.add(&self.base, o);
    }

    /// The drift of the values written in the slots that are not older than the window at
    /// `now_us`. The slots' samples are merged in proportion to the values each stands for.
    pub fn drift(&self, def: Option<&pb::FeatureDef>, now_us: i64) -> pb::FeatureDrift {
        let epoch = now_us.div_euclid(slot_us());
        let live: Vec<&Tally> = self
            .slots
            .iter()
            .filter(|(e, _)| *e <= epoch && *e > epoch - INGEST_SLOTS as i64)
            .map(|(_, t)| t)
            .collect();
        let mut buckets = vec![0u64; bucket_count(&self.base)];
        let (mut nulls, mut values) = (0u64, 0u64);
        for t in &live {
            for (b, n) in buckets.iter_mut().zip(&t.buckets) {
                *b += n;
            }
            nulls += t.nulls;
            values += t.values;
        }
        // The smallest share of its numbers a slot kept: every slot contributes that share.
        let ratio = live
            .iter()
            .filter(|t| t.numbers.seen > 0)
            .map(|t| t.numbers.values.len() as f64 / t.numbers.seen as f64)
            .fold(1.0f64, f64::min);
        let mut sorted = Vec::new();
        for t in &live {
            let k = ((t.numbers.seen as f64 * ratio).round() as usize).min(t.numbers.values.len());
            let mut pool = t.numbers.values.clone();
            let mut rng = Rng(t.numbers.seen);
            // A uniform k-subset of the slot's sample (partial Fisher-Yates).
            for j in 0..k {
                let r = j + rng.below((pool.len() - j) as u64) as usize;
                pool.swap(j, r);
            }
            sorted.extend_from_slice(&pool[..k]);
        }
        sorted.sort_by(f64::total_cmp);
        drift_of(&self.base, def, &buckets, (nulls, values), &sorted, Nulls::Left)
    }
}

type Result<T> = std::result::Result<T, ServiceError>;

fn invalid(msg: String) -> ServiceError {
    ServiceError::Invalid(msg)
}

fn baseline_key(group: &str, name: &str) -> Vec<u8> {
    let mut key = quiver_storage::reserved::MONITOR_BASELINES.to_vec();
    key.extend_from_slice(group.as_bytes());
    key.push(0);
    key.extend_from_slice(name.as_bytes());
    key
}

/// Checks a baseline against the group's serving version: a valid name, known features of
/// their types with summaries of their kind, and a size that fits.
pub fn validate(registry: &Registry, b: &pb::Baseline) -> Result<()> {
    let name_ok = !b.name.is_empty()
        && b.name.len() <= BASELINE_NAME_BYTES_MAX
        && b.name.bytes().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && b.name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_.-".contains(&c));
    if !name_ok {
        return Err(invalid(format!("baseline name {:?} is not [a-z0-9][a-z0-9_.-]{{0,62}}", b.name)));
    }
    let group = registry.group(&b.group, 0).map_err(ServiceError::from)?;
    if b.features.is_empty() {
        return Err(invalid(format!("baseline {:?} describes no feature", b.name)));
    }
    let mut seen = std::collections::HashSet::new();
    for f in &b.features {
        let def = group.features.iter().find(|d| d.name == f.feature).ok_or_else(|| {
            invalid(format!("baseline {:?}: group {} has no feature {:?}", b.name, b.group, f.feature))
        })?;
        if !seen.insert(f.feature.as_str()) {
            return Err(invalid(format!("baseline {:?}: feature {:?} appears twice", b.name, f.feature)));
        }
        if def.r#type != f.r#type || !summarised(def.r#type()) {
            return Err(invalid(format!(
                "baseline {:?}: feature {} has type {:?}, the baseline says {:?} (bytes and lists have no baseline)",
                b.name,
                f.feature,
                def.r#type(),
                f.r#type()
            )));
        }
        if f.nulls > f.rows {
            return Err(invalid(format!("baseline {:?}: feature {} has more nulls than rows", b.name, f.feature)));
        }
        let sum = |xs: &[u64], more: u64| xs.iter().try_fold(more, |a, &n| a.checked_add(n));
        let values = f.rows - f.nulls;
        let ok = match &f.summary {
            Some(pb::feature_baseline::Summary::Numeric(n)) => {
                sum(&n.counts, 0).is_some_and(|t| t <= values)
                    && numeric(def.r#type())
                    && n.edges.len() < BASELINE_BINS
                    && n.counts.len() == n.edges.len() + 1
                    && n.edges.iter().all(|e| e.is_finite())
                    && n.edges.windows(2).all(|w| w[0] < w[1])
                    && n.sample.len() <= BASELINE_SAMPLE_MAX
                    && n.sample.iter().all(|x| !x.is_nan())
                    && n.sample.windows(2).all(|w| w[0] <= w[1])
            }
            Some(pb::feature_baseline::Summary::Categorical(c)) => {
                sum(&c.counts, c.other).is_some_and(|t| t <= values)
                    && !numeric(def.r#type())
                    && c.categories.len() <= BASELINE_CATEGORIES_MAX
                    && c.counts.len() == c.categories.len()
            }
            None => false,
        };
        if !ok {
            return Err(invalid(format!(
                "baseline {:?}: feature {}'s summary is not a valid {} summary (see monitor.proto)",
                b.name,
                f.feature,
                if numeric(def.r#type()) { "numeric" } else { "categorical" }
            )));
        }
    }
    let size = b.encoded_len();
    if size > BASELINE_BYTES_MAX {
        return Err(invalid(format!(
            "baseline {:?} is {size} bytes encoded, over BASELINE_BYTES_MAX ({BASELINE_BYTES_MAX})",
            b.name
        )));
    }
    Ok(())
}

/// Validates and stores `b`, captured at `now_us`; returns the stored baseline.
pub fn put(registry: &Registry, mut b: pb::Baseline, now_us: i64) -> Result<pb::Baseline> {
    validate(registry, &b)?;
    b.captured_at = Some(crate::convert::timestamp(now_us));
    let mut batch = WriteBatch::new();
    batch.put(&baseline_key(&b.group, &b.name), FeatureId(0), EventTime(0), Value::Bytes(b.encode_to_vec()))?;
    registry.db().write(batch, Durability::Sync)?;
    Ok(b)
}

/// The stored baselines (of `group` only, if given), by group then newest first.
pub fn list(db: &Db, group: Option<&str>) -> Result<Vec<pb::Baseline>> {
    let prefix = match group {
        Some(g) => baseline_key(g, ""),
        None => quiver_storage::reserved::MONITOR_BASELINES.to_vec(),
    };
    let mut end = prefix.clone();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    let mut range = ScanRange::all();
    range.entity_start = prefix;
    range.entity_end = Some(end);
    let mut out: Vec<pb::Baseline> = Vec::new();
    let mut last_entity: Option<Vec<u8>> = None;
    for item in db.scan(range)? {
        let item = item?;
        // Newest version first: the rest of an entity's versions are replaced ones.
        if last_entity.as_ref() == Some(&item.entity) {
            continue;
        }
        last_entity = Some(item.entity.clone());
        let Some(Value::Bytes(bytes)) = &item.version.value else { continue };
        match pb::Baseline::decode(bytes.as_slice()) {
            Ok(b) => out.push(b),
            Err(e) => tracing::warn!(error = %e, "a stored baseline does not decode; ignored"),
        }
    }
    let at = |b: &pb::Baseline| b.captured_at.as_ref().map_or((0, 0), |t| (t.seconds, t.nanos));
    out.sort_by(|a, b| a.group.cmp(&b.group).then_with(|| at(b).cmp(&at(a))).then_with(|| a.name.cmp(&b.name)));
    Ok(out)
}

/// Measures each of `baselines` (at most one per group) against the answers logged in
/// `[from_us, to_us)`, reading the log once; the thresholds are the serving registry's.
pub fn measure(
    registry: &Registry,
    log: &ServedLog,
    baselines: &[pb::Baseline],
    from_us: i64,
    to_us: i64,
) -> Result<Vec<pb::MeasureDriftResponse>> {
    // group -> (feature -> current values).
    let mut current: BTreeMap<&str, HashMap<&str, Current<'_>>> = BTreeMap::new();
    for b in baselines {
        let features = b.features.iter().map(|f| (f.feature.as_str(), Current::new(f))).collect();
        current.insert(b.group.as_str(), features);
    }
    let mut answers = 0u64;
    log.scan(from_us, to_us, &mut |chunk| {
        for a in &chunk {
            for f in &a.features {
                let group = crate::auth::group_of(&f.feature_ref);
                let Some(features) = current.get_mut(group) else { continue };
                let name = f.feature_ref.split_once(':').map_or("", |(_, n)| n);
                let Some(c) = features.get_mut(name) else { continue };
                match f.status() {
                    pb::FeatureStatus::Present | pb::FeatureStatus::Defaulted => c.add(observe(f.value.as_ref())),
                    pb::FeatureStatus::NotFound | pb::FeatureStatus::Stale => c.add(Observation::Null),
                    _ => {}
                }
            }
        }
        answers += chunk.len() as u64;
        answers < DRIFT_ANSWERS_MAX as u64
    })?;
    let mut out = Vec::new();
    for b in baselines {
        let defs = registry.group(&b.group, 0).map(|g| g.features).unwrap_or_default();
        let Some(mut features) = current.remove(b.group.as_str()) else { continue };
        let drift = b
            .features
            .iter()
            .filter_map(|f| features.remove(f.feature.as_str()))
            .map(|c| {
                let def = defs.iter().find(|d| d.name == c.base.feature);
                c.drift(def)
            })
            .collect();
        out.push(pb::MeasureDriftResponse {
            group: b.group.clone(),
            baseline: b.name.clone(),
            from: Some(crate::convert::timestamp(from_us)),
            to: Some(crate::convert::timestamp(to_us)),
            answers,
            features: drift,
            source: pb::DriftSource::Served as i32,
        });
    }
    Ok(out)
}

/// `MeasureDrift`: one group against its baseline (`""`: the newest) over `[from, to)`.
pub fn measure_one(
    registry: &Registry,
    log: &ServedLog,
    health: &crate::health::Health,
    req: &pb::MeasureDriftRequest,
    now_us: i64,
) -> Result<pb::MeasureDriftResponse> {
    if req.group.is_empty() {
        return Err(invalid("MeasureDrift needs a group".into()));
    }
    registry.group(&req.group, 0).map_err(ServiceError::from)?;
    if req.source() == pb::DriftSource::Ingested {
        if req.from.is_some() || req.to.is_some() {
            return Err(invalid(
                "ingested values are measured over the last window only: leave from and to unset".into(),
            ));
        }
        let newest = list(registry.db(), Some(&req.group))?
            .into_iter()
            .next()
            .ok_or_else(|| ServiceError::NotFound(format!("group {} has no baseline", req.group)))?;
        if !req.baseline.is_empty() && req.baseline != newest.name {
            if !list(registry.db(), Some(&req.group))?.iter().any(|b| b.name == req.baseline) {
                return Err(ServiceError::NotFound(format!("group {} has no baseline {:?}", req.group, req.baseline)));
            }
            return Err(ServiceError::Refused(format!(
                "written values are sketched against the group's newest baseline ({:?}) only",
                newest.name
            )));
        }
        // A baseline that arrived by replication is sketched from now on.
        health.watch_group(&newest);
        return health
            .ingested_drift(&req.group, now_us)
            .ok_or_else(|| ServiceError::NotFound(format!("group {} has no baseline", req.group)));
    }
    let (from_us, to_us) = match (&req.from, &req.to) {
        (None, None) => (now_us - DRIFT_WINDOW.as_micros() as i64, now_us),
        (f, t) => {
            let to_us = t.as_ref().map_or(Ok(now_us), |t| crate::convert::micros(t, "to"))?;
            let from_us = match f {
                Some(f) => crate::convert::micros(f, "from")?,
                None => to_us - DRIFT_WINDOW.as_micros() as i64,
            };
            if from_us >= to_us {
                return Err(invalid(format!("from ({from_us} µs) is not before to ({to_us} µs)")));
            }
            (from_us, to_us)
        }
    };
    let all = list(registry.db(), Some(&req.group))?;
    let chosen = if req.baseline.is_empty() {
        all.into_iter().next().ok_or_else(|| ServiceError::NotFound(format!("group {} has no baseline", req.group)))?
    } else {
        all.into_iter()
            .find(|b| b.name == req.baseline)
            .ok_or_else(|| ServiceError::NotFound(format!("group {} has no baseline {:?}", req.group, req.baseline)))?
    };
    let mut out = measure(registry, log, std::slice::from_ref(&chosen), from_us, to_us)?;
    out.pop().ok_or_else(|| invalid("no measurement".into()))
}

/// Measures every group with a baseline over the last [`DRIFT_WINDOW`] (the newest baseline of
/// each), every `interval`, into `health`, until dropped.
pub async fn measure_every_interval(
    registry: Arc<Registry>,
    log: Arc<ServedLog>,
    health: Arc<crate::health::Health>,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (r, l, h) = (registry.clone(), log.clone(), health.clone());
        let done = tokio::task::spawn_blocking(move || -> Result<()> {
            let now = crate::service::now_us();
            let mut newest: Vec<pb::Baseline> = Vec::new();
            for b in list(r.db(), None)? {
                if newest.last().is_none_or(|n| n.group != b.group) && r.group(&b.group, 0).is_ok() {
                    newest.push(b);
                }
            }
            h.watch(&newest);
            let measured = measure(&r, &l, &newest, now - DRIFT_WINDOW.as_micros() as i64, now)?;
            h.set_drift(measured, now);
            Ok(())
        })
        .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "drift not measured; retrying next interval"),
            Err(e) => tracing::warn!(error = %e, "measuring drift failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbers(xs: &[f64], nulls: usize) -> pb::FeatureBaseline {
        let mut s = Summary::new("x", pb::ValueType::Float64);
        for &x in xs {
            s.add(Observation::Number(x));
        }
        for _ in 0..nulls {
            s.add(Observation::Null);
        }
        s.baseline()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn deciles_make_the_edges_and_merge_when_equal() {
        let xs: Vec<f64> = (0..100).map(f64::from).collect();
        let b = numbers(&xs, 5);
        let Some(pb::feature_baseline::Summary::Numeric(n)) = &b.summary else { panic!("numeric") };
        assert_eq!(n.edges, vec![10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0]);
        assert_eq!(n.counts, vec![10; 10]);
        assert_eq!(n.sample.len(), 100);
        assert_eq!((b.rows, b.nulls), (105, 5));
        // Mostly one value: the deciles collapse into few edges.
        let b = numbers(&[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 3.0], 0);
        let Some(pb::feature_baseline::Summary::Numeric(n)) = &b.summary else { panic!("numeric") };
        assert_eq!(n.edges, vec![1.0, 2.0, 3.0]);
        assert_eq!(n.counts, vec![0, 8, 1, 1]);
        // Many values: the sample keeps the ends and is sorted.
        let xs: Vec<f64> = (0..10_000).rev().map(f64::from).collect();
        let b = numbers(&xs, 0);
        let Some(pb::feature_baseline::Summary::Numeric(n)) = &b.summary else { panic!("numeric") };
        assert_eq!(n.sample.len(), BASELINE_SAMPLE_MAX);
        assert_eq!((n.sample[0], n.sample[999]), (0.0, 9999.0));
        assert!(n.sample.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn categories_keep_the_most_frequent_and_count_the_rest() {
        let mut s = Summary::new("c", pb::ValueType::String);
        for i in 0..30u64 {
            for _ in 0..(i + 1) {
                s.add(Observation::Category(format!("k{i:02}")));
            }
        }
        s.add(Observation::Null);
        let b = s.baseline();
        let Some(pb::feature_baseline::Summary::Categorical(c)) = &b.summary else { panic!("categorical") };
        assert_eq!(c.categories.len(), BASELINE_CATEGORIES_MAX);
        assert_eq!(c.categories[0], "k29");
        assert_eq!(c.counts[0], 30);
        // k00..k09 (1 + ... + 10 values) are "other".
        assert_eq!(c.other, 55);
        assert_eq!((b.rows, b.nulls), (466, 1));
    }

    #[test]
    fn statistics_match_hand_worked_values() {
        // PSI of (0.5, 0.5) -> (0.25, 0.75): 0.25 ln 3 ... worked: -0.25 ln(0.5) + 0.25 ln(1.5).
        let (b, c) = ([0.5, 0.5], [0.25, 0.75]);
        assert!(close(psi(&b, &c), -0.25 * (0.5f64).ln() + 0.25 * (1.5f64).ln()));
        // JS of disjoint distributions is 1; of equal ones 0.
        assert!(close(js(&[1.0, 0.0], &[0.0, 1.0]), 1.0));
        assert!(close(js(&b, &b), 0.0));
        // JS of (1, 0) and (0.5, 0.5): m = (0.75, 0.25); ½·log2(1/0.75) + ½(½ log2(0.5/0.75) + ½ log2(0.5/0.25)).
        let want = 0.5 * (1.0f64 / 0.75).log2() + 0.5 * (0.5 * (0.5f64 / 0.75).log2() + 0.5 * 2f64.log2());
        assert!(close(js(&[1.0, 0.0], &[0.5, 0.5]), want));
        // An empty bucket: PSI floors its share at 1e-4.
        let want = (0.5 - 1e-4) * (0.5f64 / 1e-4).ln() + (0.5 - 1.0) * (0.5f64 / 1.0).ln();
        assert!(close(psi(&[0.0, 1.0], &[0.5, 0.5]), want));
        // KS: scipy.stats.ks_2samp([1,2,3,4], [3,4,5,6]).statistic == 0.5; ties count once.
        assert_eq!(ks(&[1.0, 2.0, 3.0, 4.0], &[3.0, 4.0, 5.0, 6.0]), Some(0.5));
        assert_eq!(ks(&[1.0, 1.0, 2.0], &[1.0, 2.0, 2.0]), Some(1.0 / 3.0));
        assert_eq!(ks(&[1.0], &[2.0]), Some(1.0));
        assert_eq!(ks(&[], &[2.0]), None);
        // Shares put the nulls last and weigh buckets by the non-null share.
        assert_eq!(shares(&[1, 3], 4, 8), Some(vec![0.125, 0.375, 0.5]));
        assert_eq!(shares(&[0, 0], 2, 2), Some(vec![0.0, 0.0, 1.0]));
        assert_eq!(shares(&[0, 0], 0, 0), None);
    }

    #[test]
    fn all_null_features_drift_only_by_their_null_share() {
        let base = numbers(&[], 10);
        let mut c = Current::new(&base);
        for _ in 0..4 {
            c.add(Observation::Null);
        }
        let d = c.drift(None);
        assert_eq!((d.psi, d.js, d.ks, d.breached), (Some(0.0), Some(0.0), None, false));
        let mut c = Current::new(&base);
        c.add(Observation::Number(1.0));
        c.add(Observation::Null);
        let d = c.drift(None);
        // Half the answers have a value where the baseline had none: (0.5, 0.5) against (0, 1).
        let want = (0.5 - 1e-4) * (0.5f64 / 1e-4).ln() + (0.5 - 1.0) * (0.5f64).ln();
        assert!(close(d.psi.expect("psi"), want), "{d:?}");
        assert!(d.breached && d.ks.is_none(), "{d:?}");
    }

    #[test]
    fn ingest_sketches_keep_the_last_window_and_merge_slots_in_proportion() {
        let xs: Vec<f64> = (0..100).map(f64::from).collect();
        let base = numbers(&xs, 0);
        let mut s = IngestSketch::new(base.clone());
        let slot = slot_us();
        let t0 = 1_000 * slot;
        // 1,000 values in the first slot (sampled to 256), 10 in the second.
        for i in 0..1_000 {
            s.add(Observation::Number(f64::from(i % 100)), t0);
        }
        for _ in 0..10 {
            s.add(Observation::Number(500.0), t0 + slot);
        }
        s.add(Observation::Null, t0 + slot);
        let d = s.drift(None, t0 + slot);
        assert_eq!((d.values, d.nulls), (1_010, 1));
        // The buckets are exact: 100 values per decile bin, 10 more in the last.
        let mut want_buckets = vec![100u64; 10];
        want_buckets[9] += 10;
        let want = drift_of(&base, None, &want_buckets, (1, 1_010), &[], Nulls::Left);
        // Written values are compared over their values: a baseline with nulls does not make
        // them drift.
        let with_nulls = numbers(&xs, 25);
        let mut s2 = IngestSketch::new(with_nulls);
        for i in 0..100 {
            s2.add(Observation::Number(f64::from(i)), t0);
        }
        assert_eq!(s2.drift(None, t0).psi, Some(0.0));
        assert!(close(d.psi.expect("psi"), want.psi.expect("psi")), "{d:?}");
        // KS over the merged sample: the second slot stands for ~1% of it, as it should.
        let ks = d.ks.expect("ks");
        assert!(ks < 0.05, "{ks}");
        // A window later, the first slot has left it; four slots later, everything has.
        let d = s.drift(None, t0 + INGEST_SLOTS as i64 * slot);
        assert_eq!((d.values, d.nulls), (10, 1));
        assert_eq!(d.ks, Some(1.0));
        let d = s.drift(None, t0 + (INGEST_SLOTS as i64 + 1) * slot);
        assert_eq!((d.values, d.nulls, d.psi, d.ks), (0, 0, None, None));
        // A slot reused a lap later starts from zero.
        s.add(Observation::Number(1.0), t0 + INGEST_SLOTS as i64 * slot);
        let d = s.drift(None, t0 + INGEST_SLOTS as i64 * slot);
        assert_eq!(d.values, 11);
    }

    #[test]
    fn observations_of_each_type() {
        let v = |k| pb::Value { kind: Some(k) };
        use pb::value::Kind;
        assert_eq!(observe(Some(&v(Kind::BoolValue(true)))), Observation::Category("true".into()));
        assert_eq!(observe(Some(&v(Kind::Int64Value(-3)))), Observation::Number(-3.0));
        assert_eq!(observe(Some(&v(Kind::Float64Value(f64::NAN)))), Observation::Null);
        let vec = v(Kind::Float32Vector(pb::Float32List { values: vec![3.0, 4.0] }));
        assert_eq!(observe(Some(&vec)), Observation::Number(5.0));
        assert_eq!(observe(None), Observation::Null);
    }
}
