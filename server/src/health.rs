//! Feature health (README "Monitoring"): how fresh each feature group is against its SLA, and
//! the statuses its features are served with.
//!
//! # Freshness
//! Every write through this node records, per group, the newest event time written, the
//! write's system time, and each row's ingestion delay (system time − event time, a histogram).
//! Those *watermarks* are also stored in the engine's reserved keyspace: entity
//! [`quiver_storage::reserved::MONITOR_WATERMARKS`] + group name, feature id = the writing
//! region, event time 0, value a [`StoredWatermark`]; written when they changed, at most every
//! [`WATERMARK_PERSIST_INTERVAL`], and when the server stops. The prefix replicates with the
//! data, in the log's order, so a region that receives a group only by replication learns the
//! writer's watermark after the data it covers, and a restarted node still knows how fresh its
//! groups are (at worst one interval staler than they were: it errs toward alerting).
//!
//! A group's newest event time is the largest of this node's and every known region's stored
//! watermark; freshness = now − that. A group with a `freshness_sla` breaches it when freshness
//! is over the SLA, or when no write to it is known at all.
//!
//! # Served statuses
//! Each online answer adds its statuses, per requested (group, feature), to the counter
//! `quiver_served_values_total` and to per-minute counts over [`HEALTH_WINDOW`] (a ring of
//! [`WINDOW_SLOTS`] minutes). The null rate is the share of NOT_FOUND, STALE and DEFAULTED
//! answers over the window; it breaches the feature's `max_null_rate` once the window holds at
//! least [`NULL_RATE_ANSWERS_MIN`] answers (a handful of lookups proves nothing).
//!
//! Memory: one record per group and one per served (group, feature), both bounded by the
//! registry's size.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::core::Collector;
use prometheus::{GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts};
use prost::Message;
use quiver_proto::v1 as pb;
use quiver_storage::{AsOf, Durability, EventTime, FeatureId, Value, WriteBatch};

use crate::registry::Registry;

/// The window null rates are measured over.
pub const HEALTH_WINDOW: Duration = Duration::from_secs(WINDOW_SLOTS as u64 * SLOT_SECONDS);
/// Minutes in the window.
pub const WINDOW_SLOTS: usize = 15;
const SLOT_SECONDS: u64 = 60;
/// Answers the window must hold before a null rate can breach its bound.
pub const NULL_RATE_ANSWERS_MIN: u64 = 100;
/// How often changed watermarks are stored in the engine.
pub const WATERMARK_PERSIST_INTERVAL: Duration = Duration::from_secs(60);
/// Ingestion delay buckets, in seconds: 10 ms to a week.
const DELAY_BUCKETS_S: [f64; 12] =
    [0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 4.0 * 3600.0, 86_400.0, 3.0 * 86_400.0, 7.0 * 86_400.0];

/// The statuses counted, in the order of [`ServedCounts`].
pub const STATUSES: [(pb::FeatureStatus, &str); 5] = [
    (pb::FeatureStatus::Present, "present"),
    (pb::FeatureStatus::NotFound, "not_found"),
    (pb::FeatureStatus::Stale, "stale"),
    (pb::FeatureStatus::Defaulted, "defaulted"),
    (pb::FeatureStatus::Unavailable, "unavailable"),
];

/// Answers by status, indexed as [`STATUSES`].
pub type ServedCounts = [u64; STATUSES.len()];

/// The index of a status in [`ServedCounts`] (`None`: not counted). [`STATUSES`] lists them in
/// the order of their numbers, from 1.
pub fn status_index(status: pb::FeatureStatus) -> Option<usize> {
    (status as usize).checked_sub(1).filter(|&i| i < STATUSES.len())
}

/// How a region's watermark of one group is stored.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredWatermark {
    /// The newest event time written to the group, microseconds since the epoch.
    #[prost(int64, tag = "1")]
    pub newest_event_us: i64,
    /// The system time of the newest write to the group.
    #[prost(int64, tag = "2")]
    pub newest_system_us: i64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Watermark {
    event_us: i64,
    system_us: i64,
}

impl Watermark {
    fn max(a: Option<Watermark>, b: Option<Watermark>) -> Option<Watermark> {
        match (a, b) {
            (Some(a), Some(b)) => {
                Some(Watermark { event_us: a.event_us.max(b.event_us), system_us: a.system_us.max(b.system_us) })
            }
            (a, b) => a.or(b),
        }
    }
}

#[derive(Debug)]
struct GroupTrack {
    newest: Option<Watermark>,
    persisted: Option<Watermark>,
    /// The group's series of `quiver_feature_group_values_written_total` (values since start).
    values: IntCounter,
    /// The group's series of the ingestion delay histogram.
    delay: Histogram,
}

impl GroupTrack {
    fn new(gauges: &Gauges, group: &str) -> GroupTrack {
        GroupTrack {
            newest: None,
            persisted: None,
            values: gauges.values.with_label_values(&[group]),
            delay: gauges.delay.with_label_values(&[group]),
        }
    }
}

/// One minute of a window: which minute it holds, and its counts.
#[derive(Debug, Default)]
struct Slot {
    minute: AtomicU64,
    counts: [AtomicU64; STATUSES.len()],
}

/// One served (group, feature): its status counters and its window (atomics only: the online
/// path never takes a lock here).
#[derive(Debug)]
pub struct ServedTrack {
    counters: [IntCounter; STATUSES.len()],
    window: [Slot; WINDOW_SLOTS],
}

fn minute_of(now_us: i64) -> u64 {
    now_us.max(0) as u64 / (SLOT_SECONDS * 1_000_000)
}

impl ServedTrack {
    fn new(counters: [IntCounter; STATUSES.len()]) -> ServedTrack {
        ServedTrack { counters, window: std::array::from_fn(|_| Slot::default()) }
    }

    /// Adds one answer's counts, at `now_us`.
    pub fn add(&self, counts: &ServedCounts, now_us: i64) {
        for (c, &n) in self.counters.iter().zip(counts) {
            if n > 0 {
                c.inc_by(n);
            }
        }
        let minute = minute_of(now_us);
        let slot = &self.window[(minute % WINDOW_SLOTS as u64) as usize];
        let seen = slot.minute.load(Ordering::Acquire);
        // The first add of a minute a lap later clears the slot: one thread wins the exchange.
        // An add racing the clear may be lost, or counted in the new minute (counts are
        // approximate for that instant; the counters above are exact).
        if seen != minute && slot.minute.compare_exchange(seen, minute, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            for c in &slot.counts {
                c.store(0, Ordering::Relaxed);
            }
        }
        for (a, &n) in slot.counts.iter().zip(counts) {
            if n > 0 {
                a.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Answers by status since start.
    fn totals(&self) -> ServedCounts {
        self.counters.each_ref().map(IntCounter::get)
    }

    /// The counts of the window ending at `now_us`.
    fn window(&self, now_us: i64) -> ServedCounts {
        let now = minute_of(now_us);
        let mut out = [0; STATUSES.len()];
        for slot in &self.window {
            let minute = slot.minute.load(Ordering::Acquire);
            if minute <= now && minute + WINDOW_SLOTS as u64 > now {
                for (a, n) in out.iter_mut().zip(&slot.counts) {
                    *a += n.load(Ordering::Relaxed);
                }
            }
        }
        out
    }
}

/// The null rate of some counts, and whether it breaches `max` (see the module docs).
pub fn null_rate(counts: &ServedCounts, max: Option<f64>) -> (Option<f64>, bool) {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return (None, false);
    }
    let rate = (counts[1] + counts[2] + counts[3]) as f64 / total as f64;
    let breached = total >= NULL_RATE_ANSWERS_MIN && max.is_some_and(|m| rate > m);
    (Some(rate), breached)
}

/// Prometheus collectors of feature health.
#[derive(Debug)]
struct Gauges {
    served: IntCounterVec,
    cut_short: IntCounter,
    delay: HistogramVec,
    values: IntCounterVec,
    freshness: GaugeVec,
    sla: GaugeVec,
    sla_breached: IntGaugeVec,
    newest_event: GaugeVec,
    newest_system: GaugeVec,
    null_rate: GaugeVec,
    max_null_rate: GaugeVec,
    null_rate_breached: IntGaugeVec,
    drift: GaugeVec,
    drift_breached: IntGaugeVec,
    skew: IntCounterVec,
}

fn err(e: prometheus::Error) -> String {
    format!("metrics: {e}")
}

impl Gauges {
    fn new() -> Result<Gauges, String> {
        let group = &["group"];
        let feature = &["group", "feature"];
        let gauge = |name: &str, help: &str, labels: &[&str]| GaugeVec::new(Opts::new(name, help), labels).map_err(err);
        let flag = |name: &str, help: &str, labels: &[&str]| IntGaugeVec::new(Opts::new(name, help), labels);
        Ok(Gauges {
            served: IntCounterVec::new(
                Opts::new("served_values_total", "online answers per feature by status, since start"),
                &["group", "feature", "status"],
            )
            .map_err(err)?,
            cut_short: IntCounter::new(
                "online_requests_cut_short_total",
                "online lookups answered in part (some features UNAVAILABLE or defaulted) because their deadline was near",
            )
            .map_err(err)?,
            delay: HistogramVec::new(
                HistogramOpts::new(
                    "feature_group_ingestion_delay_seconds",
                    "system time minus event time of the rows written to a group through this node",
                )
                .buckets(DELAY_BUCKETS_S.to_vec()),
                group,
            )
            .map_err(err)?,
            values: IntCounterVec::new(
                Opts::new("feature_group_values_written_total", "values written to a group through this node"),
                group,
            )
            .map_err(err)?,
            freshness: gauge(
                "feature_group_freshness_seconds",
                "now minus the newest event time written to the group (absent while none is known)",
                group,
            )?,
            sla: gauge("feature_group_freshness_sla_seconds", "the group's freshness SLA (absent: none)", group)?,
            sla_breached: flag(
                "feature_group_sla_breached",
                "1 while a group with a freshness SLA is staler than it (or was never written)",
                group,
            )
            .map_err(err)?,
            newest_event: gauge(
                "feature_group_newest_event_time_seconds",
                "the newest event time written to the group, seconds since the epoch",
                group,
            )?,
            newest_system: gauge(
                "feature_group_newest_system_time_seconds",
                "the system time of the newest write to the group, seconds since the epoch",
                group,
            )?,
            null_rate: gauge(
                "feature_null_rate",
                "share of NOT_FOUND, STALE and DEFAULTED online answers over the health window (15 min)",
                feature,
            )?,
            max_null_rate: gauge("feature_max_null_rate", "the feature's max_null_rate (absent: none)", feature)?,
            null_rate_breached: flag(
                "feature_null_rate_breached",
                "1 while the null rate is over max_null_rate (with at least 100 answers in the window)",
                feature,
            )
            .map_err(err)?,
            drift: gauge(
                "feature_drift",
                "drift against the group's newest baseline over the last hour (stat: psi, js, ks; source: served, ingested)",
                &["group", "feature", "stat", "source"],
            )?,
            skew: IntCounterVec::new(
                Opts::new(
                    "skew_values_total",
                    "served values replayed by MeasureSkew on this node, by result (equal, mismatched, missing)",
                ),
                &["group", "feature", "result"],
            )
            .map_err(err)?,
            drift_breached: flag(
                "feature_drift_breached",
                "1 while a feature's PSI is over its max_psi or its KS over its max_ks (source: served, ingested)",
                &["group", "feature", "source"],
            )
            .map_err(err)?,
        })
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.served.clone()),
            Box::new(self.cut_short.clone()),
            Box::new(self.delay.clone()),
            Box::new(self.values.clone()),
            Box::new(self.freshness.clone()),
            Box::new(self.sla.clone()),
            Box::new(self.sla_breached.clone()),
            Box::new(self.newest_event.clone()),
            Box::new(self.newest_system.clone()),
            Box::new(self.null_rate.clone()),
            Box::new(self.max_null_rate.clone()),
            Box::new(self.null_rate_breached.clone()),
            Box::new(self.drift.clone()),
            Box::new(self.drift_breached.clone()),
            Box::new(self.skew.clone()),
        ]
    }
}

/// One group's rows of a write, for [`Health::written`].
#[derive(Debug, Clone, Copy)]
pub struct Written<'a> {
    /// The group's name (no `@N`).
    pub group: &'a str,
    /// The row's event time.
    pub event_us: i64,
    /// Values and deletes the row wrote.
    pub values: u64,
    /// The row (its values feed the drift sketches of groups with a baseline).
    pub row: &'a pb::WriteRow,
}

/// The health of this node's feature groups.
#[derive(Debug)]
pub struct Health {
    registry: Arc<Registry>,
    /// This node's region (the feature id of its watermark cells).
    region: u32,
    /// Every region whose watermarks count: this one and its peers.
    regions: Vec<u32>,
    groups: Mutex<HashMap<String, GroupTrack>>,
    served: Mutex<HashMap<(String, String), Arc<ServedTrack>>>,
    gauges: Gauges,
    persist_interval: Duration,
    /// The last drift measurements per group (`crate::drift::measure_every_interval`): served
    /// values, and ingested values.
    drift: Mutex<HashMap<String, Drifts>>,
    /// Per group with a baseline: the baseline (name, capture time) and its features' sketches
    /// of the values written through this node.
    ingest: Mutex<HashMap<String, Ingest>>,
    /// Whether any group has a baseline (the write path takes no lock otherwise).
    watching: AtomicBool,
    /// The last skew measurement that covered each group.
    skew: Mutex<HashMap<String, pb::SkewCounts>>,
    /// The node's shadow reads, if it shadows any group.
    shadow: Option<Arc<crate::shadow::Shadow>>,
}

/// A group's last drift measurements: of its served values, and of its written values.
type Drifts = (Option<pb::MeasureDriftResponse>, Option<pb::MeasureDriftResponse>);

/// The sketches of one group's written values against its newest baseline.
#[derive(Debug)]
struct Ingest {
    baseline: String,
    captured_at: Option<prost_types::Timestamp>,
    features: HashMap<String, crate::drift::IngestSketch>,
}

fn duration_of(us: i64) -> prost_types::Duration {
    prost_types::Duration { seconds: us.div_euclid(1_000_000), nanos: (us.rem_euclid(1_000_000) * 1000) as i32 }
}

impl Health {
    /// The health of the groups of `registry`, on a node of `region` with `peers`.
    pub fn new(registry: Arc<Registry>, region: u32, peers: &[u32]) -> Result<Health, String> {
        let mut regions = vec![region];
        regions.extend(peers.iter().copied().filter(|&p| p != region));
        Ok(Health {
            registry,
            region,
            regions,
            groups: Mutex::new(HashMap::new()),
            served: Mutex::new(HashMap::new()),
            gauges: Gauges::new()?,
            persist_interval: WATERMARK_PERSIST_INTERVAL,
            drift: Mutex::new(HashMap::new()),
            ingest: Mutex::new(HashMap::new()),
            watching: AtomicBool::new(false),
            skew: Mutex::new(HashMap::new()),
            shadow: None,
        })
    }

    /// Stores changed watermarks every `interval` instead (tests).
    pub fn set_persist_interval(&mut self, interval: Duration) {
        self.persist_interval = interval;
    }

    /// The Prometheus collectors to register.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        let mut c = self.gauges.collectors();
        if let Some(s) = &self.shadow {
            c.extend(s.collectors());
        }
        c
    }

    /// Reports (and exports) the shadow reads of `shadow` with each group's health.
    pub fn set_shadow(&mut self, shadow: Arc<crate::shadow::Shadow>) {
        self.shadow = (!shadow.is_empty()).then_some(shadow);
    }

    /// Records a committed write: its rows and its system time.
    pub fn written(&self, rows: &[Written<'_>], system_us: i64) {
        // Most writes name one group: aggregate by group before taking the lock once.
        let mut by_group: Vec<(&str, i64, u64)> = Vec::new();
        for r in rows {
            match by_group.iter_mut().find(|g| g.0 == r.group) {
                Some(g) => {
                    g.1 = g.1.max(r.event_us);
                    g.2 += r.values;
                }
                None => by_group.push((r.group, r.event_us, r.values)),
            }
        }
        let delays: Vec<Histogram> = {
            let mut groups = self.groups.lock();
            by_group
                .iter()
                .map(|&(name, event_us, values)| {
                    if !groups.contains_key(name) {
                        groups.insert(name.to_string(), GroupTrack::new(&self.gauges, name));
                    }
                    let t = groups.get_mut(name).expect("inserted above");
                    t.newest = Watermark::max(t.newest, Some(Watermark { event_us, system_us }));
                    t.values.inc_by(values);
                    t.delay.clone()
                })
                .collect()
        };
        for r in rows {
            if let Some(i) = by_group.iter().position(|g| g.0 == r.group) {
                delays[i].observe(system_us.saturating_sub(r.event_us).max(0) as f64 / 1e6);
            }
        }
        if self.watching.load(Ordering::Relaxed) {
            let mut ingest = self.ingest.lock();
            for r in rows {
                let Some(g) = ingest.get_mut(r.group) else { continue };
                for (name, v) in &r.row.values {
                    if let Some(s) = g.features.get_mut(name) {
                        s.add(crate::drift::observe(Some(v)), system_us);
                    }
                }
                for name in &r.row.deletes {
                    if let Some(s) = g.features.get_mut(name) {
                        s.add(crate::drift::Observation::Null, system_us);
                    }
                }
            }
        }
    }

    /// Sketches the values written to each group of `newest` (a group's newest baseline) from
    /// now on; a group whose baseline changed starts over, one with none is no longer sketched.
    pub fn watch(&self, newest: &[pb::Baseline]) {
        let mut ingest = self.ingest.lock();
        ingest.retain(|g, _| newest.iter().any(|b| b.group == *g));
        for b in newest {
            Self::sketch(&mut ingest, b);
        }
        self.watching.store(!ingest.is_empty(), Ordering::Relaxed);
    }

    /// Like [`Health::watch`] for one group's newest baseline `b` (others are left as they are).
    pub fn watch_group(&self, b: &pb::Baseline) {
        let mut ingest = self.ingest.lock();
        Self::sketch(&mut ingest, b);
        self.watching.store(true, Ordering::Relaxed);
    }

    fn sketch(ingest: &mut HashMap<String, Ingest>, b: &pb::Baseline) {
        let at = |t: &Option<prost_types::Timestamp>| t.as_ref().map_or((0, 0), |t| (t.seconds, t.nanos));
        if let Some(i) = ingest.get(&b.group) {
            // The same baseline, or an older one than this node sketches (a listing made before
            // a PutBaseline): keep the sketch.
            if (i.baseline == b.name && i.captured_at == b.captured_at) || at(&i.captured_at) > at(&b.captured_at) {
                return;
            }
        }
        let features =
            b.features.iter().map(|f| (f.feature.clone(), crate::drift::IngestSketch::new(f.clone()))).collect();
        ingest.insert(b.group.clone(), Ingest { baseline: b.name.clone(), captured_at: b.captured_at, features });
    }

    /// The drift of the values written through this node to `group` over the last window.
    pub fn ingested_drift(&self, group: &str, now_us: i64) -> Option<pb::MeasureDriftResponse> {
        let defs = self.registry.group(group, 0).map(|g| g.features).unwrap_or_default();
        let ingest = self.ingest.lock();
        let g = ingest.get(group)?;
        let mut features: Vec<(&String, &crate::drift::IngestSketch)> = g.features.iter().collect();
        // In the group's definition order.
        features.sort_by_key(|(name, _)| defs.iter().position(|d| d.name == **name).unwrap_or(usize::MAX));
        let from = now_us - crate::drift::DRIFT_WINDOW.as_micros() as i64;
        Some(pb::MeasureDriftResponse {
            group: group.to_string(),
            baseline: g.baseline.clone(),
            from: Some(crate::convert::timestamp(from)),
            to: Some(crate::convert::timestamp(now_us)),
            answers: 0,
            features: features
                .into_iter()
                .map(|(name, s)| s.drift(defs.iter().find(|d| d.name == *name), now_us))
                .collect(),
            source: pb::DriftSource::Ingested as i32,
        })
    }

    /// Keeps the drift measured of each group with a baseline — `served` from the log, and the
    /// ingested values' at `now_us` — replacing the last measurement, and sets the drift gauges.
    pub fn set_drift(&self, served: Vec<pb::MeasureDriftResponse>, now_us: i64) {
        let mut now: HashMap<String, Drifts> = served.into_iter().map(|m| (m.group.clone(), (Some(m), None))).collect();
        let groups: Vec<String> = self.ingest.lock().keys().cloned().collect();
        for g in groups {
            let ingested = self.ingested_drift(&g, now_us);
            now.entry(g).or_default().1 = ingested;
        }
        let g = &self.gauges;
        let labels_of = |m: &Drifts| {
            let mut out = Vec::new();
            for (source, d) in [("served", &m.0), ("ingested", &m.1)] {
                for f in d.iter().flat_map(|d| &d.features) {
                    out.push((f.feature.clone(), source, f.clone()));
                }
            }
            out
        };
        let mut drift = self.drift.lock();
        for (group, old) in drift.iter() {
            let kept = now.get(group).map(labels_of).unwrap_or_default();
            for (feature, source, _) in labels_of(old) {
                if !kept.iter().any(|(f, s, _)| *f == feature && *s == source) {
                    for stat in ["psi", "js", "ks"] {
                        let _ = g.drift.remove_label_values(&[group, &feature, stat, source]);
                    }
                    let _ = g.drift_breached.remove_label_values(&[group, &feature, source]);
                }
            }
        }
        for (group, m) in &now {
            for (feature, source, f) in labels_of(m) {
                for (stat, v) in [("psi", f.psi), ("js", f.js), ("ks", f.ks)] {
                    let labels = [group.as_str(), feature.as_str(), stat, source];
                    match v {
                        Some(v) => g.drift.with_label_values(&labels).set(v),
                        None => {
                            let _ = g.drift.remove_label_values(&labels);
                        }
                    }
                }
                g.drift_breached.with_label_values(&[group, &feature, source]).set(i64::from(f.breached));
            }
        }
        *drift = now;
    }

    /// Records the skew measurement `req` made at `now_us`: its counts per
    /// feature (the counters) and, per group it covered, as that group's last measurement.
    pub fn record_skew(&self, r: &pb::MeasureSkewResponse, req: &pb::MeasureSkewRequest, now_us: i64) {
        let mut by_group: HashMap<String, pb::SkewCounts> = HashMap::new();
        for f in &r.features {
            let group = crate::auth::group_of(&f.feature_ref);
            let feature = f.feature_ref.split_once(':').map_or("", |(_, n)| n);
            for (result, n) in [("equal", f.equal), ("mismatched", f.mismatched), ("missing", f.missing)] {
                self.gauges.skew.with_label_values(&[group, feature, result]).inc_by(n);
            }
            let counts = by_group.entry(group.to_string()).or_insert_with(|| pb::SkewCounts {
                measured_at: Some(crate::convert::timestamp(now_us)),
                from: req.from,
                to: req.to,
                features: Vec::new(),
            });
            counts.features.push(pb::FeatureSkew { examples: Vec::new(), ..f.clone() });
        }
        self.skew.lock().extend(by_group);
    }

    /// Counts an online lookup answered in part because its deadline was near.
    pub fn cut_short(&self) {
        self.gauges.cut_short.inc();
    }

    /// The served-status record of `group:feature` (kept for as long as the server runs).
    pub fn served(&self, group: &str, feature: &str) -> Arc<ServedTrack> {
        let key = (group.to_string(), feature.to_string());
        let mut served = self.served.lock();
        served
            .entry(key)
            .or_insert_with(|| {
                // Three labels, as the vector was made with: `with_label_values` cannot fail.
                let counters =
                    STATUSES.map(|(_, status)| self.gauges.served.with_label_values(&[group, feature, status]));
                Arc::new(ServedTrack::new(counters))
            })
            .clone()
    }

    fn watermark_key(group: &str) -> Vec<u8> {
        let mut key = quiver_storage::reserved::MONITOR_WATERMARKS.to_vec();
        key.extend_from_slice(group.as_bytes());
        key
    }

    /// The watermarks stored for `group` by every known region.
    fn stored(&self, group: &str) -> Result<Option<Watermark>, quiver_storage::Error> {
        let key = Self::watermark_key(group);
        let mut newest = None;
        for &r in &self.regions {
            let v = self.registry.db().value_at(&key, FeatureId(r), AsOf::at(EventTime(0)))?;
            if let Some(Value::Bytes(b)) = v.and_then(|v| v.value) {
                match StoredWatermark::decode(b.as_slice()) {
                    Ok(w) => {
                        let w = Watermark { event_us: w.newest_event_us, system_us: w.newest_system_us };
                        newest = Watermark::max(newest, Some(w));
                    }
                    Err(e) => {
                        tracing::warn!(group, region = r, error = %e, "stored watermark does not decode; ignored")
                    }
                }
            }
        }
        Ok(newest)
    }

    /// Stores the watermarks that changed since they were last stored; returns how many.
    pub fn persist(&self) -> Result<usize, quiver_storage::Error> {
        let changed: Vec<(String, Watermark)> = {
            let groups = self.groups.lock();
            groups
                .iter()
                .filter_map(|(g, t)| t.newest.filter(|n| Some(*n) != t.persisted).map(|n| (g.clone(), n)))
                .collect()
        };
        if changed.is_empty() {
            return Ok(0);
        }
        let mut batch = WriteBatch::new();
        for (g, w) in &changed {
            let v = StoredWatermark { newest_event_us: w.event_us, newest_system_us: w.system_us };
            batch.put(
                &Self::watermark_key(g),
                FeatureId(self.region),
                EventTime(0),
                Value::Bytes(v.encode_to_vec()),
            )?;
        }
        self.registry.db().write(batch, Durability::Async)?;
        let mut groups = self.groups.lock();
        for (g, w) in &changed {
            if let Some(t) = groups.get_mut(g) {
                t.persisted = Some(*w);
            }
        }
        Ok(changed.len())
    }

    /// Stores changed watermarks every [`WATERMARK_PERSIST_INTERVAL`], until dropped.
    pub async fn persist_every_interval(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.persist_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let h = self.clone();
            match tokio::task::spawn_blocking(move || h.persist()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "feature group watermarks not stored; retrying next interval"),
                Err(e) => tracing::warn!(error = %e, "storing watermarks failed"),
            }
        }
    }

    /// Online answers per group since start, by status, summed over the group's features.
    pub fn served_totals(&self) -> HashMap<String, ServedCounts> {
        let mut out: HashMap<String, ServedCounts> = HashMap::new();
        for ((group, _), track) in self.served.lock().iter() {
            let sum = out.entry(group.clone()).or_default();
            for (a, n) in sum.iter_mut().zip(track.totals()) {
                *a += n;
            }
        }
        out
    }

    /// The health of every group (or only `only`) at `now_us`; `visible` filters groups.
    pub fn report(
        &self,
        now_us: i64,
        only: Option<&str>,
        visible: impl Fn(&str) -> bool,
    ) -> Result<Vec<pb::GroupHealth>, quiver_storage::Error> {
        let mut out = Vec::new();
        for def in self.registry.groups() {
            if only.is_some_and(|g| g != def.name) || !visible(&def.name) {
                continue;
            }
            let (local, values) = {
                let groups = self.groups.lock();
                groups.get(&def.name).map_or((None, 0), |t| (t.newest, t.values.get()))
            };
            let newest = Watermark::max(local, self.stored(&def.name)?);
            let sla = def.freshness_sla.filter(|d| d.seconds > 0 || d.nanos > 0);
            let sla_us = sla.map(|d| d.seconds.saturating_mul(1_000_000).saturating_add(i64::from(d.nanos) / 1000));
            let freshness_us = newest.map(|w| now_us.saturating_sub(w.event_us));
            let sla_breached = match (sla_us, freshness_us) {
                (Some(s), Some(f)) => f > s,
                (Some(_), None) => true,
                (None, _) => false,
            };
            let features = {
                let served = self.served.lock();
                def.features
                    .iter()
                    .map(|f| {
                        let counts = served
                            .get(&(def.name.clone(), f.name.clone()))
                            .map_or([0; STATUSES.len()], |t| t.window(now_us));
                        let (rate, breached) = null_rate(&counts, f.max_null_rate);
                        pb::FeatureHealth {
                            feature: f.name.clone(),
                            present: counts[0],
                            not_found: counts[1],
                            stale: counts[2],
                            defaulted: counts[3],
                            unavailable: counts[4],
                            null_rate: rate,
                            max_null_rate: f.max_null_rate,
                            null_rate_breached: breached,
                        }
                    })
                    .collect()
            };
            let skew = self.skew.lock().get(&def.name).cloned();
            // One lock: a guard in the literal below would live to the end of the statement.
            let (drift, ingested_drift) = self.drift.lock().get(&def.name).cloned().unwrap_or_default();
            out.push(pb::GroupHealth {
                group: def.name.clone(),
                version: def.version,
                newest_event_time: newest.map(|w| crate::convert::timestamp(w.event_us)),
                newest_system_time: newest.map(|w| crate::convert::timestamp(w.system_us)),
                freshness: freshness_us.map(duration_of),
                freshness_sla: sla,
                sla_breached,
                features,
                values_written: values,
                drift,
                ingested_drift,
                skew,
                shadow: self.shadow.as_ref().and_then(|s| s.report(&def.name)),
            });
        }
        Ok(out)
    }

    /// Sets the health gauges to the report at `now_us` (at every scrape).
    pub fn refresh_gauges(&self, now_us: i64) {
        if let Some(s) = &self.shadow {
            s.refresh_gauges();
        }
        let report = match self.report(now_us, None, |_| true) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "feature health not measured for this scrape");
                return;
            }
        };
        let g = &self.gauges;
        let secs = |t: &prost_types::Timestamp| t.seconds as f64 + f64::from(t.nanos) / 1e9;
        let dur = |d: &prost_types::Duration| d.seconds as f64 + f64::from(d.nanos) / 1e9;
        for h in &report {
            let group = [h.group.as_str()];
            g.sla_breached.with_label_values(&group).set(i64::from(h.sla_breached));
            if let Some(f) = &h.freshness {
                g.freshness.with_label_values(&group).set(dur(f));
            }
            match &h.freshness_sla {
                Some(s) => g.sla.with_label_values(&group).set(dur(s)),
                None => {
                    let _ = g.sla.remove_label_values(&group);
                }
            }
            if let Some(t) = &h.newest_event_time {
                g.newest_event.with_label_values(&group).set(secs(t));
            }
            if let Some(t) = &h.newest_system_time {
                g.newest_system.with_label_values(&group).set(secs(t));
            }
            for f in &h.features {
                let labels = [h.group.as_str(), f.feature.as_str()];
                match f.null_rate {
                    Some(r) => g.null_rate.with_label_values(&labels).set(r),
                    None => {
                        let _ = g.null_rate.remove_label_values(&labels);
                    }
                }
                match f.max_null_rate {
                    Some(m) => g.max_null_rate.with_label_values(&labels).set(m),
                    None => {
                        let _ = g.max_null_rate.remove_label_values(&labels);
                    }
                }
                g.null_rate_breached.with_label_values(&labels).set(i64::from(f.null_rate_breached));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_indexes_follow_the_list() {
        for (i, (s, _)) in STATUSES.iter().enumerate() {
            assert_eq!(status_index(*s), Some(i));
        }
        assert_eq!(status_index(pb::FeatureStatus::Unspecified), None);
    }

    #[test]
    fn null_rate_counts_every_status_but_present_and_needs_enough_answers() {
        assert_eq!(null_rate(&[0, 0, 0, 0, 0], Some(0.0)), (None, false));
        // 3 of 4 null, but too few answers to breach.
        assert_eq!(null_rate(&[1, 1, 1, 1, 0], Some(0.5)), (Some(0.75), false));
        assert_eq!(null_rate(&[25, 25, 25, 25, 0], Some(0.5)), (Some(0.75), true));
        assert_eq!(null_rate(&[25, 25, 25, 25, 0], Some(0.75)), (Some(0.75), false));
        assert_eq!(null_rate(&[25, 25, 25, 25, 0], None), (Some(0.75), false));
        assert_eq!(null_rate(&[0, 100, 0, 0, 0], Some(1.0)), (Some(1.0), false));
        assert_eq!(null_rate(&[100, 0, 0, 0, 0], Some(0.0)), (Some(0.0), false));
        assert_eq!(null_rate(&[99, 1, 0, 0, 0], Some(0.0)), (Some(0.01), true));
        // Answers not read in time are answers, not nulls.
        assert_eq!(null_rate(&[50, 0, 0, 0, 50], Some(0.0)), (Some(0.0), false));
    }

    #[test]
    fn the_window_keeps_the_last_fifteen_minutes() {
        let t = ServedTrack::new(std::array::from_fn(|i| IntCounter::new(format!("c{i}"), "test").expect("counter")));
        let min = 60_000_000i64;
        let start = 1_000_000 * min;
        t.add(&[1, 0, 0, 0, 0], start);
        t.add(&[0, 2, 0, 0, 0], start + 5 * min);
        t.add(&[0, 0, 3, 0, 0], start + 14 * min + min / 2);
        assert_eq!(t.window(start + 13 * min), [1, 2, 0, 0, 0]);
        assert_eq!(t.window(start + 15 * min - 1), [1, 2, 3, 0, 0]);
        // The first minute leaves the window.
        assert_eq!(t.window(start + 15 * min), [0, 2, 3, 0, 0]);
        // A slot reused a lap later starts from zero.
        t.add(&[0, 0, 0, 4, 0], start + 20 * min);
        assert_eq!(t.window(start + 20 * min), [0, 0, 3, 4, 0]);
        assert_eq!(t.counters[1].get(), 2);
        assert_eq!(t.window(start + 40 * min), [0, 0, 0, 0, 0]);
    }
}
