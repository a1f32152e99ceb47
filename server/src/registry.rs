//! The registry: entity types and versioned feature groups, stored inside the engine.
//!
//! # Storage
//! Registry objects live in the engine's *reserved keyspace*: entity keys that start with
//! `0x00`, which [`quiver_storage::encode_entity_key`] never produces (its parts start with tag
//! `0x01` or `0x02`). So they are durable, checkpointed and replicated with the data.
//!
//! | object | entity key | feature id | event time | value |
//! | --- | --- | --- | --- | --- |
//! | entity type `n` | `00 "reg" 00 "et" 00 n` | 0 | 0 | bytes: `quiver.v1.EntityType` |
//! | group `n`, version `v` | `00 "reg" 00 "fg" 00 n` | `v` | 0 | bytes: [`StoredGroup`] |
//! | a change of group `n`'s serving version | `00 "reg" 00 "sv" 00 n` | 0 | when it took effect (µs) | bytes: `quiver.v1.GroupPromotion` |
//! | group `n`, version `v` retired | `00 "reg" 00 "rt" 00 n` | `v` | 0 | bytes: `quiver.v1.GroupRetirement` |
//!
//! Every cell is written once (a new event time for each serving change), so nothing is ever
//! overwritten and the whole history stays readable.
//!
//! # Versions
//! Applying a group whose definition differs from its latest version creates version
//! latest + 1. A group's first version serves at once; a later one is *staged*: unpinned
//! references (`group:feature`, writes to `group`) keep resolving to the serving version, and
//! `group@N:feature` reads or writes any version. `promote` (or an apply with `promote`) makes
//! a version serve, `rollback` returns to the version that served before the current one was
//! promoted; each is one registry cell, written in one synced batch, and resolutions are
//! cached per registry generation, so one request resolves every reference against one
//! serving version.
//!
//! A feature of a new version *shares its data* with the latest version (keeps its feature id)
//! when its name, type and `dim` are unchanged and the group's `transformation` and `code_hash`
//! are unchanged: metadata edits, TTL changes and added features need no backfill. Otherwise —
//! a new, retyped or resized feature, or any feature of a group whose code changed — it gets a
//! fresh id (its own keyspace: a backfill of the staged version never touches serving data, and
//! history of another type is never reinterpreted). A removed feature is simply absent from the
//! new version. Applying an identical definition is a no-op. Entity types are immutable once
//! created (their join keys define how every key of theirs is encoded).
//!
//! # The serving version, now and as of a `known_at`
//! The serving version is the `to_version` of the serving cell with the greatest event time
//! whose version this node has (the read rule of `storage/READS.md` at `as_of = +inf`: regions
//! that promote concurrently converge on the later promotion). A join pinned to `known_at = K`
//! resolves unpinned references with the same rule over the cells with system time `<= K`;
//! before a group's first serving cell (groups registered before serving pointers existed) its
//! serving version is its newest version written by `K`, and a group with no version by `K`
//! resolves to its first version (whose values at `K` are all missing).
//!
//! # Retirement
//! A version that does not serve can be retired: from then on writes to it are refused, it can
//! never serve again (promote and rollback refuse it), and once its retention has passed
//! ([`Registry::dropped_feature_ids`]) the feature ids that only retired versions past their
//! retention use are handed to the engine, whose compactions drop their data. An id that any
//! other version uses (shared data) is never dropped.
//!
//! A group without serving cells (registered before pointers existed) serves its newest
//! version; the first staged apply writes its serving version down (`KIND_PINNED`) in the same
//! batch, so staging never moves it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prost::Message;
use quiver_proto::v1 as pb;
use quiver_storage::agg::Agg;
use quiver_storage::{AsOf, Db, Durability, EventTime, FeatureId, ScanRange, SystemTime, Value, WriteBatch};

/// Longest name of an entity type, group or feature.
pub const NAME_BYTES_MAX: usize = 63;
/// Most features in one group version.
pub const FEATURES_PER_GROUP_MAX: usize = 10_000;
/// Most join keys of one entity type.
pub const JOIN_KEYS_MAX: usize = 8;
/// Most objects in one apply.
pub const OBJECTS_PER_APPLY_MAX: usize = 1_000;
/// Longest free-text field (description, owner, source, tag).
pub const TEXT_BYTES_MAX: usize = 4096;
/// The longest `dim` a float32_vector feature may declare.
pub const VECTOR_DIM_MAX: u32 = 65_536;
/// The shortest window of an aggregate feature, in seconds.
pub const AGG_WINDOW_SECONDS_MIN: i64 = 1;
/// The longest window of an aggregate feature, in seconds: a leap year.
pub const AGG_WINDOW_SECONDS_MAX: i64 = 366 * 86_400;
/// Most values a `last_n` aggregate keeps (the engine's bound).
pub const LAST_N_MAX: u32 = quiver_storage::agg::LAST_N_MAX;
/// Most versions of one feature group: every version stays addressable (`group@N`) and in
/// memory, so repeated applies stop here instead of growing the registry without end.
pub const GROUP_VERSIONS_MAX: u32 = 1_000;

/// The reserved entity prefix of every registry object: cells under it replicate with the data.
pub const PREFIX: &[u8] = quiver_storage::reserved::REGISTRY;

/// In a cluster, region `r` allocates feature ids `i` with `i % FEATURE_ID_STRIDE == r`
/// (region ids are below it).
pub const FEATURE_ID_STRIDE: u32 = 64;
const ENTITY_TYPE_PREFIX: &[u8] = quiver_storage::reserved::REGISTRY_ENTITY_TYPES;
const GROUP_PREFIX: &[u8] = quiver_storage::reserved::REGISTRY_GROUPS;
const SERVING_PREFIX: &[u8] = quiver_storage::reserved::REGISTRY_SERVING;
const RETIRED_PREFIX: &[u8] = quiver_storage::reserved::REGISTRY_RETIRED;

/// How long a retired version's data stays before compaction may drop it, unless the
/// retirement says otherwise.
pub const RETIREMENT_RETENTION_DEFAULT: Duration = Duration::from_secs(7 * 24 * 3600);
/// The longest retention a retirement may ask (ten years).
pub const RETIREMENT_RETENTION_MAX: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// How a group version is stored: its definition and the engine feature id of each feature.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredGroup {
    /// The definition, with `version` and `created_at` set.
    #[prost(message, optional, tag = "1")]
    pub def: Option<pb::FeatureGroup>,
    /// `feature_ids[i]` is the engine feature id of `def.features[i]`.
    #[prost(uint32, repeated, tag = "2")]
    pub feature_ids: Vec<u32>,
}

/// What can go wrong, by the gRPC code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Malformed definition (`INVALID_ARGUMENT`).
    #[error("{0}")]
    Invalid(String),
    /// A change the registry refuses (`FAILED_PRECONDITION`).
    #[error("{0}")]
    Refused(String),
    /// Unknown object (`NOT_FOUND`).
    #[error("{0}")]
    NotFound(String),
    /// Too many objects (`RESOURCE_EXHAUSTED`).
    #[error("{0}")]
    TooLarge(String),
    /// The engine failed.
    #[error("storage: {0}")]
    Storage(#[from] quiver_storage::Error),
}

type Result<T> = std::result::Result<T, RegistryError>;

/// A resolved feature reference: where its values live and how to serve them.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedFeature {
    /// The group's name.
    pub group: String,
    /// The group version.
    pub version: u32,
    /// The feature's name.
    pub feature: String,
    /// The engine feature id of this (group version, feature).
    pub id: FeatureId,
    /// The feature's type.
    pub value_type: pb::ValueType,
    /// The group's TTL (`None`: values never go stale).
    pub ttl: Option<Duration>,
    /// The registered default.
    pub default: Option<pb::Value>,
    /// The entity type of the group.
    pub entity_type: String,
    /// For a float32_vector: the length every written vector must have (0: any).
    pub dim: u32,
    /// The group's share of entities whose answers are logged (`None`: the server's default).
    pub log_sample_rate: Option<f64>,
    /// Set for an aggregate feature: what it computes. Its `id` is then its source's (the
    /// versions it reads) and `value_type` the type of its answers.
    pub aggregate: Option<AggregateSpec>,
}

/// An aggregate feature, resolved (README "Windowed aggregations").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregateSpec {
    /// The source feature's name.
    pub source: String,
    /// The function.
    pub agg: Agg,
    /// The window's width in microseconds.
    pub width_us: u64,
    /// The type of the source's values.
    pub source_type: quiver_storage::ValueType,
}

/// The engine's aggregate function of an aggregation (`None`: unspecified).
fn agg_of(a: &pb::Aggregation) -> Option<Agg> {
    use pb::AggFunction as F;
    Some(match a.function() {
        F::Unspecified => return None,
        F::Count => Agg::Count,
        F::Sum => Agg::Sum,
        F::Mean => Agg::Mean,
        F::Min => Agg::Min,
        F::Max => Agg::Max,
        F::LastN => Agg::LastN(a.n),
        F::CountDistinct => Agg::CountDistinct,
    })
}

/// The type of an aggregate feature's answers, its definition checked against its group's
/// other features (`f.aggregation` must be set).
fn aggregate_type(g: &pb::FeatureGroup, f: &pb::FeatureDef) -> Result<pb::ValueType> {
    let bad = |why: String| RegistryError::Invalid(format!("feature {}:{}: {why}", g.name, f.name));
    let Some(a) = &f.aggregation else { return Err(bad("not an aggregate".into())) };
    let source = g
        .features
        .iter()
        .find(|o| o.name == a.source && o.name != f.name)
        .ok_or_else(|| bad(format!("its source {:?} is not another feature of the group", a.source)))?;
    if source.aggregation.is_some() {
        return Err(bad(format!("its source {} is an aggregate; aggregate a written feature", source.name)));
    }
    let agg = agg_of(a).ok_or_else(|| bad("an aggregate needs a function".into()))?;
    match agg {
        Agg::LastN(n) if !(1..=LAST_N_MAX).contains(&n) => {
            return Err(bad(format!("last_n keeps 1 to {LAST_N_MAX} values, not {n}")))
        }
        Agg::LastN(_) => {}
        _ if a.n != 0 => return Err(bad(format!("n is for last_n, not {:?}", a.function()))),
        _ => {}
    }
    let window = a.window.as_ref().ok_or_else(|| bad("an aggregate needs a window".into()))?;
    if window.nanos != 0 || !(AGG_WINDOW_SECONDS_MIN..=AGG_WINDOW_SECONDS_MAX).contains(&window.seconds) {
        return Err(bad(format!(
            "a window is whole seconds from {AGG_WINDOW_SECONDS_MIN} to {AGG_WINDOW_SECONDS_MAX} (366 days), not {}.{:09} s",
            window.seconds, window.nanos
        )));
    }
    let source_type = crate::convert::engine_type(source.r#type())
        .ok_or_else(|| bad(format!("its source {} has no type", source.name)))?;
    let t = agg.answer_type(source_type).map_err(|e| bad(e.to_string()))?;
    Ok(crate::convert::api_type(t))
}

/// `g` with each aggregate feature's unset type set to the type of its answers (left unset
/// when its definition is bad: [`check_group`] says why).
fn with_aggregate_types(g: &pb::FeatureGroup) -> pb::FeatureGroup {
    let mut out = g.clone();
    for f in out.features.iter_mut().filter(|f| f.aggregation.is_some() && f.r#type() == pb::ValueType::Unspecified) {
        if let Ok(t) = aggregate_type(g, f) {
            f.r#type = t as i32;
        }
    }
    out
}

/// One serving cell of a group.
#[derive(Debug, Clone, PartialEq)]
struct Pointer {
    /// The cell's event time: when the change took effect (µs).
    event_us: i64,
    /// The cell's system time.
    system_time: u64,
    promotion: pb::GroupPromotion,
}

#[derive(Debug, Default, Clone, PartialEq)]
struct State {
    entity_types: BTreeMap<String, pb::EntityType>,
    groups: BTreeMap<String, BTreeMap<u32, StoredGroup>>,
    /// The system time of each group version's cell.
    created: BTreeMap<String, BTreeMap<u32, u64>>,
    /// Each group's serving cells, by event time (oldest first).
    serving: BTreeMap<String, Vec<Pointer>>,
    /// Each group's retired versions.
    retired: BTreeMap<String, BTreeMap<u32, pb::GroupRetirement>>,
    next_feature_id: u32,
}

impl State {
    /// The serving version of `group` as of `known_at` (`u64::MAX`: now); see the module docs.
    fn serving_at(&self, group: &str, known_at: u64) -> Option<u32> {
        let versions = self.groups.get(group)?;
        let pointed = self.serving.get(group).and_then(|h| {
            h.iter().rev().find(|p| p.system_time <= known_at && versions.contains_key(&p.promotion.to_version))
        });
        if let Some(p) = pointed {
            return Some(p.promotion.to_version);
        }
        let created = self.created.get(group);
        let by_then = versions.keys().rev().find(|v| created.and_then(|c| c.get(v)).is_none_or(|&t| t <= known_at));
        by_then.or_else(|| versions.keys().next()).copied()
    }

    fn is_retired(&self, group: &str, version: u32) -> bool {
        self.retired.get(group).is_some_and(|r| r.contains_key(&version))
    }

    /// The newest serving cell of `group`.
    fn last_pointer(&self, group: &str) -> Option<&Pointer> {
        self.serving.get(group).and_then(|h| h.last())
    }
}

/// The registry of one node.
#[derive(Debug)]
pub struct Registry {
    db: Arc<Db>,
    state: Mutex<State>,
    /// Bumped by every apply that changes the registry (for caches of resolutions).
    generation: std::sync::atomic::AtomicU64,
    /// This node's region when it is part of a cluster (feature ids are strided by region).
    region: Option<u32>,
}

fn check_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name.as_bytes()[0].is_ascii_lowercase()
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!(
            "{kind} name {name:?} must match [a-z][a-z0-9_]* and be at most {NAME_BYTES_MAX} bytes"
        )))
    }
}

fn check_text(what: &str, s: &str) -> Result<()> {
    if s.len() > TEXT_BYTES_MAX {
        return Err(RegistryError::Invalid(format!("{what} is longer than {TEXT_BYTES_MAX} bytes")));
    }
    Ok(())
}

/// The value type a `pb::Value` holds.
pub fn value_type_of(v: &pb::Value) -> Option<pb::ValueType> {
    use pb::value::Kind;
    Some(match v.kind.as_ref()? {
        Kind::BoolValue(_) => pb::ValueType::Bool,
        Kind::Int64Value(_) => pb::ValueType::Int64,
        Kind::Float32Value(_) => pb::ValueType::Float32,
        Kind::Float64Value(_) => pb::ValueType::Float64,
        Kind::StringValue(_) => pb::ValueType::String,
        Kind::BytesValue(_) => pb::ValueType::Bytes,
        Kind::Float32Vector(_) => pb::ValueType::Float32Vector,
        Kind::Int64List(_) => pb::ValueType::Int64List,
        Kind::StringList(_) => pb::ValueType::StringList,
    })
}

fn check_entity_type(e: &pb::EntityType) -> Result<()> {
    check_name("entity type", &e.name)?;
    check_text("entity type description", &e.description)?;
    if e.join_keys.is_empty() || e.join_keys.len() > JOIN_KEYS_MAX {
        return Err(RegistryError::Invalid(format!(
            "entity type {} needs 1 to {JOIN_KEYS_MAX} join keys, has {}",
            e.name,
            e.join_keys.len()
        )));
    }
    for (i, k) in e.join_keys.iter().enumerate() {
        check_name("join key", &k.name)?;
        if e.join_keys[..i].iter().any(|o| o.name == k.name) {
            return Err(RegistryError::Invalid(format!("entity type {} names join key {} twice", e.name, k.name)));
        }
        if !matches!(k.r#type(), pb::JoinKeyType::String | pb::JoinKeyType::Int64) {
            return Err(RegistryError::Invalid(format!(
                "join key {}.{} needs a type (string or int64)",
                e.name, k.name
            )));
        }
    }
    Ok(())
}

/// A group's duration field (`ttl`, `freshness_sla`): non-negative whole microseconds, within
/// `google.protobuf.Duration`'s range and normalised.
fn check_duration(group: &str, what: &str, d: Option<&prost_types::Duration>) -> Result<()> {
    let Some(d) = d else { return Ok(()) };
    if d.seconds < 0 || d.nanos < 0 || d.nanos % 1000 != 0 {
        return Err(RegistryError::Invalid(format!(
            "feature group {group}: {what} must be non-negative whole microseconds"
        )));
    }
    // google.protobuf.Duration spans at most ±315,576,000,000 s (about 10,000 years).
    if d.seconds > 315_576_000_000 {
        return Err(RegistryError::Invalid(format!(
            "feature group {group}: {what} of {} s is outside google.protobuf.Duration's range",
            d.seconds
        )));
    }
    if d.nanos >= 1_000_000_000 {
        return Err(RegistryError::Invalid(format!(
            "feature group {group}: {what} is not a normalised Duration (nanos {} must be below 1,000,000,000)",
            d.nanos
        )));
    }
    Ok(())
}

/// A positive duration field as a [`Duration`] (`None` when unset or zero).
fn positive(d: Option<&prost_types::Duration>) -> Option<Duration> {
    d.map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32)).filter(|d| !d.is_zero())
}

fn check_group(g: &pb::FeatureGroup, entity_known: bool) -> Result<()> {
    check_name("feature group", &g.name)?;
    if !entity_known {
        return Err(RegistryError::Invalid(format!(
            "feature group {} is on unknown entity type {:?}",
            g.name, g.entity_type
        )));
    }
    for (what, s) in [("owner", &g.owner), ("description", &g.description), ("source", &g.source)] {
        check_text(what, s)?;
    }
    check_text("transformation", &g.transformation)?;
    check_text("code hash", &g.code_hash)?;
    for (k, v) in &g.tags {
        check_text("tag", k)?;
        check_text("tag value", v)?;
    }
    check_duration(&g.name, "ttl", g.ttl.as_ref())?;
    check_duration(&g.name, "freshness_sla", g.freshness_sla.as_ref())?;
    for (what, r) in [
        ("log_sample_rate", g.log_sample_rate),
        ("min_coverage_ratio", g.min_coverage_ratio),
        ("max_shadow_mismatch_rate", g.max_shadow_mismatch_rate),
    ] {
        if let Some(r) = r {
            if !(0.0..=1.0).contains(&r) {
                return Err(RegistryError::Invalid(format!(
                    "feature group {}: {what} {r} is not a share between 0 and 1",
                    g.name
                )));
            }
        }
    }
    if g.features.is_empty() || g.features.len() > FEATURES_PER_GROUP_MAX {
        return Err(RegistryError::Invalid(format!(
            "feature group {} needs 1 to {FEATURES_PER_GROUP_MAX} features, has {}",
            g.name,
            g.features.len()
        )));
    }
    for (i, f) in g.features.iter().enumerate() {
        check_name("feature", &f.name)?;
        check_text("feature description", &f.description)?;
        if g.features[..i].iter().any(|o| o.name == f.name) {
            return Err(RegistryError::Invalid(format!("feature group {} names feature {} twice", g.name, f.name)));
        }
        if f.aggregation.is_some() {
            let t = aggregate_type(g, f)?;
            if f.r#type() != t {
                return Err(RegistryError::Invalid(format!(
                    "feature {}:{}: the aggregate answers {t:?}, not {:?}",
                    g.name,
                    f.name,
                    f.r#type()
                )));
            }
            if f.dim != 0 {
                return Err(RegistryError::Invalid(format!(
                    "feature {}:{}: an aggregate takes no dim",
                    g.name, f.name
                )));
            }
        }
        if f.r#type() == pb::ValueType::Unspecified {
            return Err(RegistryError::Invalid(format!("feature {}:{} needs a type", g.name, f.name)));
        }
        if let Some(d) = &f.default_value {
            if value_type_of(d) != Some(f.r#type()) {
                return Err(RegistryError::Invalid(format!(
                    "feature {}:{}: default value does not have type {:?}",
                    g.name,
                    f.name,
                    f.r#type()
                )));
            }
        }
        if let Some(r) = f.max_null_rate {
            if !(0.0..=1.0).contains(&r) {
                return Err(RegistryError::Invalid(format!(
                    "feature {}:{}: max_null_rate {r} is not a share between 0 and 1",
                    g.name, f.name
                )));
            }
        }
        if let Some(p) = f.max_psi {
            if !(p >= 0.0 && p.is_finite()) {
                return Err(RegistryError::Invalid(format!(
                    "feature {}:{}: max_psi {p} is not a finite number at least 0",
                    g.name, f.name
                )));
            }
        }
        if let Some(k) = f.max_ks {
            if !(0.0..=1.0).contains(&k) {
                return Err(RegistryError::Invalid(format!(
                    "feature {}:{}: max_ks {k} is not between 0 and 1",
                    g.name, f.name
                )));
            }
        }
        if f.dim != 0 {
            if f.r#type() != pb::ValueType::Float32Vector {
                return Err(RegistryError::Invalid(format!(
                    "feature {}:{}: dim is for float32_vector features, not {:?}",
                    g.name,
                    f.name,
                    f.r#type()
                )));
            }
            if f.dim > VECTOR_DIM_MAX {
                return Err(RegistryError::Invalid(format!(
                    "feature {}:{}: dim {} is over VECTOR_DIM_MAX ({VECTOR_DIM_MAX})",
                    g.name, f.name, f.dim
                )));
            }
            if let Some(pb::value::Kind::Float32Vector(v)) = f.default_value.as_ref().and_then(|d| d.kind.as_ref()) {
                if v.values.len() != f.dim as usize {
                    return Err(RegistryError::Invalid(format!(
                        "feature {}:{}: the default has {} elements, not dim {}",
                        g.name,
                        f.name,
                        v.values.len(),
                        f.dim
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Parses `group` or `group@N` (N >= 1) into the name and the version (0: the serving one).
pub fn parse_group_ref(reference: &str) -> Option<(&str, u32)> {
    match reference.split_once('@') {
        Some((g, v)) => v.parse::<u32>().ok().filter(|&v| v > 0).map(|v| (g, v)),
        None => Some((reference, 0)),
    }
}

/// Feature `i` of a stored group version, resolved.
fn resolved(
    group: &str,
    version: u32,
    def: &pb::FeatureGroup,
    stored: &StoredGroup,
    i: usize,
) -> Result<ResolvedFeature> {
    let f = &def.features[i];
    let id = stored.feature_ids.get(i).copied().ok_or_else(|| {
        RegistryError::Storage(quiver_storage::Error::InvalidArgument(format!(
            "registry record of {group}@{version} has no feature id for {}",
            f.name
        )))
    })?;
    let ttl = positive(def.ttl.as_ref());
    let aggregate = match &f.aggregation {
        Some(a) => {
            let bad = || {
                RegistryError::Storage(quiver_storage::Error::InvalidArgument(format!(
                    "registry record of {group}@{version}: aggregate {} is malformed",
                    f.name
                )))
            };
            let source = def.features.iter().find(|o| o.name == a.source).ok_or_else(bad)?;
            Some(AggregateSpec {
                source: a.source.clone(),
                agg: agg_of(a).ok_or_else(bad)?,
                width_us: a
                    .window
                    .as_ref()
                    .and_then(|w| u64::try_from(w.seconds).ok()?.checked_mul(1_000_000))
                    .filter(|&w| w > 0)
                    .ok_or_else(bad)?,
                source_type: crate::convert::engine_type(source.r#type()).ok_or_else(bad)?,
            })
        }
        None => None,
    };
    Ok(ResolvedFeature {
        group: group.to_string(),
        version,
        feature: f.name.clone(),
        id: FeatureId(id),
        value_type: f.r#type(),
        ttl,
        default: f.default_value.clone(),
        entity_type: def.entity_type.clone(),
        dim: f.dim,
        log_sample_rate: def.log_sample_rate,
        aggregate,
    })
}

/// A group definition with the registry-assigned fields cleared and a zero TTL written as
/// none, encoded with sorted tags: equal bytes mean an equal definition (NaN defaults
/// included, which `==` on floats would never call equal).
fn comparable(g: &pb::FeatureGroup) -> Vec<u8> {
    let ttl = g.ttl.filter(|d| d.seconds != 0 || d.nanos != 0);
    let freshness_sla = g.freshness_sla.filter(|d| d.seconds != 0 || d.nanos != 0);
    let mut c = pb::FeatureGroup { version: 0, created_at: None, ttl, freshness_sla, ..g.clone() };
    let tags: BTreeMap<String, String> = c.tags.drain().collect();
    let mut out = c.encode_to_vec();
    for (k, v) in tags {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

fn fmt_ttl(d: &Option<prost_types::Duration>) -> String {
    match d {
        None => "none".into(),
        Some(d) => format!("{}s", d.seconds as f64 + f64::from(d.nanos) / 1e9),
    }
}

/// An aggregation, for change details (`-`: a written feature).
fn fmt_aggregation(f: &pb::FeatureDef) -> String {
    match &f.aggregation {
        None => "-".into(),
        Some(a) => {
            let n = if a.function() == pb::AggFunction::LastN { format!("({})", a.n) } else { String::new() };
            let window = a.window.as_ref().map_or(0, |w| w.seconds);
            format!("{:?}{n} of {} over {window} s", a.function(), a.source)
        }
    }
}

/// Human-readable differences between two definitions of a group.
fn diff(old: &pb::FeatureGroup, new: &pb::FeatureGroup) -> Vec<String> {
    let mut out = Vec::new();
    let mut field = |name: &str, a: String, b: String| {
        if a != b {
            out.push(format!("~ {name}: {a:?} -> {b:?}"));
        }
    };
    field("entity_type", old.entity_type.clone(), new.entity_type.clone());
    field("owner", old.owner.clone(), new.owner.clone());
    field("description", old.description.clone(), new.description.clone());
    field("ttl", fmt_ttl(&old.ttl), fmt_ttl(&new.ttl));
    field("freshness_sla", fmt_ttl(&old.freshness_sla), fmt_ttl(&new.freshness_sla));
    field("log_sample_rate", format!("{:?}", old.log_sample_rate), format!("{:?}", new.log_sample_rate));
    field("min_coverage_ratio", format!("{:?}", old.min_coverage_ratio), format!("{:?}", new.min_coverage_ratio));
    field(
        "max_shadow_mismatch_rate",
        format!("{:?}", old.max_shadow_mismatch_rate),
        format!("{:?}", new.max_shadow_mismatch_rate),
    );
    field("source", old.source.clone(), new.source.clone());
    field("transformation", old.transformation.clone(), new.transformation.clone());
    field("code_hash", old.code_hash.clone(), new.code_hash.clone());
    field("tags", format!("{:?}", old.tags), format!("{:?}", new.tags));
    for f in &new.features {
        match old.features.iter().find(|o| o.name == f.name) {
            None => out.push(format!("+ feature {}: {:?}", f.name, f.r#type())),
            Some(o) if o != f => {
                let mut what = Vec::new();
                if o.dim != f.dim {
                    what.push(format!("dim {} -> {}", o.dim, f.dim));
                }
                if o.aggregation != f.aggregation {
                    what.push(format!("aggregation {} -> {}", fmt_aggregation(o), fmt_aggregation(f)));
                }
                if o.max_null_rate != f.max_null_rate {
                    what.push(format!("max_null_rate {:?} -> {:?}", o.max_null_rate, f.max_null_rate));
                }
                if o.max_psi != f.max_psi {
                    what.push(format!("max_psi {:?} -> {:?}", o.max_psi, f.max_psi));
                }
                if o.max_ks != f.max_ks {
                    what.push(format!("max_ks {:?} -> {:?}", o.max_ks, f.max_ks));
                }
                if o.default_value != f.default_value || o.description != f.description {
                    what.push("default or description changed".into());
                }
                let what = if what.is_empty() { String::new() } else { format!(" ({})", what.join(", ")) };
                out.push(format!("~ feature {}: {:?} -> {:?}{what}", f.name, o.r#type(), f.r#type()))
            }
            Some(_) => {}
        }
    }
    for o in &old.features {
        if !new.features.iter().any(|f| f.name == o.name) {
            out.push(format!("- feature {}", o.name));
        }
    }
    out
}

fn now_timestamp() -> prost_types::Timestamp {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: (d.subsec_micros() * 1000) as i32 }
}

impl Registry {
    /// Loads the registry stored in `db` (a single-region node).
    pub fn open(db: Arc<Db>) -> Result<Registry> {
        Self::open_in_cluster(db, None)
    }

    /// Loads the registry of a node of a cluster: `region` set, feature ids are allocated
    /// only from this region's residue class modulo [`FEATURE_ID_STRIDE`], so regions that
    /// apply new groups concurrently never hand out the same id.
    pub fn open_in_cluster(db: Arc<Db>, region: Option<u32>) -> Result<Registry> {
        let state = Self::load(&db)?;
        let r = Registry { db, state: Mutex::new(state), generation: std::sync::atomic::AtomicU64::new(0), region };
        r.refresh_dropped_features();
        Ok(r)
    }

    /// Reloads the registry from the engine, after replication applied another region's
    /// registry changes.
    pub fn reload(&self) -> Result<()> {
        let mut st = self.state.lock();
        let state = Self::load(&self.db)?;
        if state != *st {
            *st = state;
            self.generation.fetch_add(1, std::sync::atomic::Ordering::Release);
        }
        drop(st);
        // A retirement may have arrived.
        self.refresh_dropped_features();
        Ok(())
    }

    /// Reads the registry stored in `db`.
    fn load(db: &Db) -> Result<State> {
        let mut state = State { next_feature_id: 1, ..State::default() };
        let mut serving: BTreeMap<String, BTreeMap<i64, Pointer>> = BTreeMap::new();
        let mut range = ScanRange::all();
        range.entity_start = PREFIX.to_vec();
        let mut end = PREFIX.to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        range.entity_end = Some(end);
        // Each registry cell is written once; the scan yields it (newest version first).
        for item in db.scan(range)? {
            let item = item?;
            let Some(Value::Bytes(bytes)) = &item.version.value else { continue };
            let corrupt = |what: &str| {
                RegistryError::Storage(quiver_storage::Error::InvalidArgument(format!(
                    "registry object {:?} does not decode: {what}",
                    String::from_utf8_lossy(&item.entity)
                )))
            };
            if let Some(name) = item.entity.strip_prefix(ENTITY_TYPE_PREFIX) {
                let e = pb::EntityType::decode(bytes.as_slice()).map_err(|e| corrupt(&e.to_string()))?;
                state.entity_types.entry(String::from_utf8_lossy(name).into_owned()).or_insert(e);
            } else if let Some(name) = item.entity.strip_prefix(GROUP_PREFIX) {
                let g = StoredGroup::decode(bytes.as_slice()).map_err(|e| corrupt(&e.to_string()))?;
                if let Some(max) = g.feature_ids.iter().max() {
                    state.next_feature_id = state.next_feature_id.max(max + 1);
                }
                let name = String::from_utf8_lossy(name).into_owned();
                state
                    .created
                    .entry(name.clone())
                    .or_default()
                    .entry(item.feature.0)
                    .or_insert(item.version.system_time.0);
                state.groups.entry(name).or_default().entry(item.feature.0).or_insert(g);
            } else if let Some(name) = item.entity.strip_prefix(RETIRED_PREFIX) {
                let r = pb::GroupRetirement::decode(bytes.as_slice()).map_err(|e| corrupt(&e.to_string()))?;
                let name = String::from_utf8_lossy(name).into_owned();
                state.retired.entry(name).or_default().entry(item.feature.0).or_insert(r);
            } else if let Some(name) = item.entity.strip_prefix(SERVING_PREFIX) {
                let promotion = pb::GroupPromotion::decode(bytes.as_slice()).map_err(|e| corrupt(&e.to_string()))?;
                // The scan yields a cell's winning version first (two regions may write the
                // same event time): keep it.
                serving
                    .entry(String::from_utf8_lossy(name).into_owned())
                    .or_default()
                    .entry(item.version.event_time.0)
                    .or_insert(Pointer {
                        event_us: item.version.event_time.0,
                        system_time: item.version.system_time.0,
                        promotion,
                    });
            }
        }
        state.serving = serving.into_iter().map(|(g, h)| (g, h.into_values().collect())).collect();
        Ok(state)
    }

    /// Applies definitions as an unnamed local caller (tests, tools on files).
    pub fn apply(&self, req: &pb::ApplyRegistryRequest) -> Result<Vec<pb::RegistryChange>> {
        self.apply_as(req, "local")
    }

    /// Applies definitions (see the module docs) on behalf of `by` (kept in the serving
    /// history); with `dry_run` only reports the changes. All or nothing: one atomic, synced
    /// engine batch.
    pub fn apply_as(&self, req: &pb::ApplyRegistryRequest, by: &str) -> Result<Vec<pb::RegistryChange>> {
        if req.entity_types.len() + req.feature_groups.len() > OBJECTS_PER_APPLY_MAX {
            return Err(RegistryError::TooLarge(format!("an apply holds at most {OBJECTS_PER_APPLY_MAX} objects")));
        }
        let mut st = self.state.lock();
        let mut next = st.clone();
        let mut batch = WriteBatch::new();
        let mut changes = Vec::new();
        // Group versions and serving cells this apply writes: their system time is the batch's.
        let mut new_versions: Vec<(String, u32)> = Vec::new();
        let mut new_pointers: Vec<(String, Pointer)> = Vec::new();
        let mut at = self.next_event_us(&st);
        let kind = |k: pb::registry_change::Kind| k as i32;
        for (i, e) in req.entity_types.iter().enumerate() {
            check_entity_type(e)?;
            if req.entity_types[..i].iter().any(|o| o.name == e.name) {
                return Err(RegistryError::Invalid(format!("entity type {} appears twice", e.name)));
            }
            let object = format!("entity_type:{}", e.name);
            match next.entity_types.get(&e.name) {
                Some(old) if old == e => changes.push(pb::RegistryChange {
                    kind: kind(pb::registry_change::Kind::Unchanged),
                    object,
                    version: 1,
                    details: vec![],
                    serving: false,
                }),
                Some(_) => {
                    return Err(RegistryError::Refused(format!(
                    "entity type {} exists with a different definition; entity types are immutable (create a new one)",
                    e.name
                )))
                }
                None => {
                    let mut key = ENTITY_TYPE_PREFIX.to_vec();
                    key.extend_from_slice(e.name.as_bytes());
                    batch.put(&key, FeatureId(0), EventTime(0), Value::Bytes(e.encode_to_vec()))?;
                    next.entity_types.insert(e.name.clone(), e.clone());
                    changes.push(pb::RegistryChange {
                        kind: kind(pb::registry_change::Kind::Created),
                        object,
                        version: 1,
                        details: e
                            .join_keys
                            .iter()
                            .map(|k| format!("+ join key {}: {:?}", k.name, k.r#type()))
                            .collect(),
                        serving: false,
                    });
                }
            }
        }
        let groups: Vec<pb::FeatureGroup> = req.feature_groups.iter().map(with_aggregate_types).collect();
        for (i, g) in groups.iter().enumerate() {
            check_group(g, next.entity_types.contains_key(&g.entity_type))?;
            if groups[..i].iter().any(|o| o.name == g.name) {
                return Err(RegistryError::Invalid(format!("feature group {} appears twice", g.name)));
            }
            let object = format!("feature_group:{}", g.name);
            let latest = next.groups.get(&g.name).and_then(|v| v.iter().next_back()).map(|(v, s)| (*v, s.clone()));
            let old_def = latest.as_ref().and_then(|(_, s)| s.def.clone());
            let serving_before = next.serving_at(&g.name, u64::MAX);
            if let (Some((v, _)), Some(old)) = (&latest, &old_def) {
                if comparable(old) == comparable(g) {
                    // An apply with `promote` of the latest definition makes it serve.
                    let mut details = vec![];
                    if req.promote && serving_before != Some(*v) {
                        if next.is_retired(&g.name, *v) {
                            return Err(RegistryError::Refused(format!(
                                "{}@{v} is retired: it can never serve again; change the definition for a new version",
                                g.name
                            )));
                        }
                        let from = serving_before.unwrap_or(0);
                        details.push(format!("~ serving: v{from} -> v{v}"));
                        let p =
                            self.pointer(&mut at, pb::group_promotion::Kind::Promoted, from, *v, by, "apply --promote");
                        Self::put_pointer(&mut batch, &g.name, &p)?;
                        new_pointers.push((g.name.clone(), p));
                    }
                    changes.push(pb::RegistryChange {
                        kind: kind(pb::registry_change::Kind::Unchanged),
                        object,
                        version: *v,
                        details,
                        serving: req.promote || serving_before == Some(*v),
                    });
                    continue;
                }
            }
            let version = latest.as_ref().map_or(1, |(v, _)| v + 1);
            if version > GROUP_VERSIONS_MAX {
                return Err(RegistryError::TooLarge(format!(
                    "feature group {} has {GROUP_VERSIONS_MAX} versions, the most one group may have; \
                     define a new group for further changes",
                    g.name
                )));
            }
            // A feature whose name, type and dim are unchanged, in a group whose code is
            // unchanged, keeps its id, so its data stays served across metadata edits and
            // added features; any other feature gets a fresh id (a new keyspace: a staged
            // version's backfill never touches serving data, and history of another type or
            // length is never reinterpreted).
            // Ids are kept from the newest version that is not retired (a retired version's
            // data may be dropped).
            let base = next
                .groups
                .get(&g.name)
                .and_then(|vs| vs.iter().rev().find(|(n, _)| !next.is_retired(&g.name, **n)))
                .map(|(v, s)| (*v, s.clone()));
            let mut feature_ids = Vec::with_capacity(g.features.len());
            for f in &g.features {
                // An aggregate reads its source's versions: it has the source's id (filled
                // in below, once every written feature has its id).
                if f.aggregation.is_some() {
                    feature_ids.push(0);
                    continue;
                }
                let kept = base.as_ref().and_then(|(_, s)| {
                    let old = s.def.as_ref()?;
                    if old.transformation != g.transformation || old.code_hash != g.code_hash {
                        return None;
                    }
                    let i = old.features.iter().position(|o| {
                        o.name == f.name && o.r#type == f.r#type && o.dim == f.dim && o.aggregation.is_none()
                    })?;
                    s.feature_ids.get(i).copied()
                });
                let id = match kept {
                    Some(id) => id,
                    None => {
                        let exhausted = || RegistryError::TooLarge("feature id space exhausted".into());
                        let mut id = next.next_feature_id;
                        if let Some(r) = self.region {
                            // The next id of this region's residue class.
                            let base = id - id % FEATURE_ID_STRIDE + r % FEATURE_ID_STRIDE;
                            id = if base >= id {
                                base
                            } else {
                                base.checked_add(FEATURE_ID_STRIDE).ok_or_else(exhausted)?
                            };
                        }
                        next.next_feature_id = id.checked_add(1).ok_or_else(exhausted)?;
                        id
                    }
                };
                feature_ids.push(id);
            }
            for (i, f) in g.features.iter().enumerate() {
                if let Some(a) = &f.aggregation {
                    // check_group found the source.
                    let src = g.features.iter().position(|o| o.name == a.source).ok_or_else(|| {
                        RegistryError::Invalid(format!("feature {}:{}: no source {:?}", g.name, f.name, a.source))
                    })?;
                    feature_ids[i] = feature_ids[src];
                }
            }
            let def = pb::FeatureGroup { version, created_at: Some(now_timestamp()), ..g.clone() };
            let shared =
                feature_ids.iter().filter(|id| base.as_ref().is_some_and(|(_, s)| s.feature_ids.contains(id))).count();
            let base_version = base.as_ref().map_or(0, |(v, _)| *v);
            let stored = StoredGroup { def: Some(def), feature_ids };
            let mut key = GROUP_PREFIX.to_vec();
            key.extend_from_slice(g.name.as_bytes());
            batch.put(&key, FeatureId(version), EventTime(0), Value::Bytes(stored.encode_to_vec()))?;
            next.groups.entry(g.name.clone()).or_default().insert(version, stored);
            new_versions.push((g.name.clone(), version));
            use pb::group_promotion::Kind as P;
            let (k, mut details, pointer) = match &old_def {
                None => (
                    pb::registry_change::Kind::Created,
                    g.features.iter().map(|f| format!("+ feature {}: {:?}", f.name, f.r#type())).collect(),
                    Some(self.pointer(&mut at, P::Created, 0, version, by, "")),
                ),
                Some(old) => {
                    let from = serving_before.unwrap_or(0);
                    let pointer = if req.promote {
                        Some(self.pointer(&mut at, P::Promoted, from, version, by, "apply --promote"))
                    } else if next.last_pointer(&g.name).is_none() {
                        // Written down so that staging never moves it (module docs).
                        Some(self.pointer(&mut at, P::Pinned, from, from, by, "staged a new version"))
                    } else {
                        None
                    };
                    (pb::registry_change::Kind::NewVersion, diff(old, g), pointer)
                }
            };
            let serving = old_def.is_none() || req.promote;
            if old_def.is_some() {
                details.push(format!(
                    "{}: {shared} of {} features share data with v{base_version}",
                    if serving { "serving" } else { "staged (quiver promote to serve it)" },
                    g.features.len(),
                ));
            }
            if let Some(p) = pointer {
                Self::put_pointer(&mut batch, &g.name, &p)?;
                new_pointers.push((g.name.clone(), p));
            }
            changes.push(pb::RegistryChange { kind: kind(k), object, version, details, serving });
        }
        if !req.dry_run && !batch.is_empty() {
            let receipt = self.db.write(batch, Durability::Sync)?;
            for (g, v) in new_versions {
                next.created.entry(g).or_default().insert(v, receipt.system_time.0);
            }
            for (g, mut p) in new_pointers {
                p.system_time = receipt.system_time.0;
                next.serving.entry(g).or_default().push(p);
            }
            *st = next;
            self.generation.fetch_add(1, std::sync::atomic::Ordering::Release);
            drop(st);
            self.refresh_dropped_features();
        }
        Ok(changes)
    }

    /// The event time for the next serving cell: the clock, after every cell this node has.
    fn next_event_us(&self, st: &State) -> i64 {
        let last = st.serving.values().filter_map(|h| h.last()).map(|p| p.event_us).max().unwrap_or(i64::MIN);
        (self.db.system_time_now().0 as i64).max(last.saturating_add(1))
    }

    /// A serving cell taking effect at `*at` (which moves on by 1 µs, so cells of one apply
    /// differ); its system time is set once written.
    fn pointer(
        &self,
        at: &mut i64,
        kind: pb::group_promotion::Kind,
        from: u32,
        to: u32,
        by: &str,
        reason: &str,
    ) -> Pointer {
        let event_us = *at;
        *at = at.saturating_add(1);
        let promotion = pb::GroupPromotion {
            kind: kind as i32,
            from_version: from,
            to_version: to,
            by: by.to_string(),
            at: Some(prost_types::Timestamp {
                seconds: event_us.div_euclid(1_000_000),
                nanos: (event_us.rem_euclid(1_000_000) * 1000) as i32,
            }),
            reason: reason.to_string(),
            forced: false,
        };
        Pointer { event_us, system_time: 0, promotion }
    }

    fn put_pointer(batch: &mut WriteBatch, group: &str, p: &Pointer) -> Result<()> {
        let mut key = SERVING_PREFIX.to_vec();
        key.extend_from_slice(group.as_bytes());
        batch.put(&key, FeatureId(0), EventTime(p.event_us), Value::Bytes(p.promotion.encode_to_vec()))?;
        Ok(())
    }

    /// Writes one serving cell of `group` and makes it the state's.
    fn write_pointer(&self, st: &mut State, group: &str, mut p: Pointer) -> Result<pb::GroupPromotion> {
        let mut batch = WriteBatch::new();
        Self::put_pointer(&mut batch, group, &p)?;
        let receipt = self.db.write(batch, Durability::Sync)?;
        p.system_time = receipt.system_time.0;
        let promotion = p.promotion.clone();
        st.serving.entry(group.to_string()).or_default().push(p);
        self.generation.fetch_add(1, std::sync::atomic::Ordering::Release);
        Ok(promotion)
    }

    /// Makes `group@version` the serving version (one synced registry write) on behalf of
    /// `by`. Returns the promotion and whether anything changed (false: it already served).
    pub fn promote(
        &self,
        group: &str,
        version: u32,
        force: bool,
        reason: &str,
        by: &str,
    ) -> Result<(pb::GroupPromotion, bool)> {
        check_text("reason", reason)?;
        if version == 0 {
            return Err(RegistryError::Invalid(format!("promote {group}: the version must be at least 1")));
        }
        let mut st = self.state.lock();
        Self::stored(&st, group, version)?;
        if st.is_retired(group, version) {
            return Err(RegistryError::Refused(format!("{group}@{version} is retired: it can never serve again")));
        }
        let serving = st.serving_at(group, u64::MAX).unwrap_or(0);
        if serving == version {
            let made = st.serving.get(group).and_then(|h| h.iter().rev().find(|p| p.promotion.to_version == version));
            let promotion = made
                .map(|p| p.promotion.clone())
                .unwrap_or_else(|| pb::GroupPromotion { to_version: version, ..Default::default() });
            return Ok((promotion, false));
        }
        let mut at = self.next_event_us(&st);
        let mut p = self.pointer(&mut at, pb::group_promotion::Kind::Promoted, serving, version, by, reason);
        p.promotion.forced = force;
        Ok((self.write_pointer(&mut st, group, p)?, true))
    }

    /// Points `group` back at the version that served before the current one was promoted
    /// (walking back through earlier rollbacks), in one synced registry write.
    pub fn rollback(&self, group: &str, reason: &str, by: &str) -> Result<pb::GroupPromotion> {
        check_text("reason", reason)?;
        let mut st = self.state.lock();
        Self::stored(&st, group, 0)?;
        let serving = st.serving_at(group, u64::MAX).unwrap_or(0);
        let versions = st.groups.get(group);
        // The newest change that made the serving version serve, other than a rollback to it.
        let previous = st
            .serving
            .get(group)
            .and_then(|h| {
                h.iter().rev().find(|p| {
                    p.promotion.to_version == serving
                        && p.promotion.from_version != serving
                        && p.promotion.kind() != pb::group_promotion::Kind::RolledBack
                })
            })
            .map(|p| p.promotion.from_version)
            .filter(|v| *v != 0 && versions.is_some_and(|vs| vs.contains_key(v)));
        let Some(to) = previous else {
            return Err(RegistryError::Refused(format!(
                "feature group {group}: v{serving} was not promoted over another version, so there is nothing to roll back to"
            )));
        };
        if st.is_retired(group, to) {
            return Err(RegistryError::Refused(format!(
                "feature group {group}: the version before v{serving}, v{to}, is retired; promote another version"
            )));
        }
        let mut at = self.next_event_us(&st);
        let p = self.pointer(&mut at, pb::group_promotion::Kind::RolledBack, serving, to, by, reason);
        self.write_pointer(&mut st, group, p)
    }

    /// Retires `group@version` on behalf of `by` (module docs): its data may be dropped
    /// `retention` after now. Returns the retirement and whether it is new.
    pub fn retire(
        &self,
        group: &str,
        version: u32,
        retention: Duration,
        reason: &str,
        by: &str,
    ) -> Result<(pb::GroupRetirement, bool)> {
        check_text("reason", reason)?;
        if retention > RETIREMENT_RETENTION_MAX {
            return Err(RegistryError::Invalid(format!(
                "a retention of {} s is over the most, {} s",
                retention.as_secs(),
                RETIREMENT_RETENTION_MAX.as_secs()
            )));
        }
        let mut st = self.state.lock();
        Self::stored(&st, group, version)?;
        if let Some(r) = st.retired.get(group).and_then(|r| r.get(&version)) {
            return Ok((r.clone(), false));
        }
        if st.serving_at(group, u64::MAX) == Some(version) {
            return Err(RegistryError::Refused(format!(
                "{group}@{version} is the serving version: promote another version before retiring it"
            )));
        }
        let now = self.db.system_time_now().0 as i64;
        let drop_us = now.saturating_add(retention.as_micros().min(i64::MAX as u128) as i64);
        let r = pb::GroupRetirement {
            version,
            by: by.to_string(),
            at: Some(crate::convert::timestamp(now)),
            drop_after: Some(crate::convert::timestamp(drop_us)),
            reason: reason.to_string(),
        };
        let mut key = RETIRED_PREFIX.to_vec();
        key.extend_from_slice(group.as_bytes());
        let mut batch = WriteBatch::new();
        batch.put(&key, FeatureId(version), EventTime(0), Value::Bytes(r.encode_to_vec()))?;
        self.db.write(batch, Durability::Sync)?;
        st.retired.entry(group.to_string()).or_default().insert(version, r.clone());
        self.generation.fetch_add(1, std::sync::atomic::Ordering::Release);
        Ok((r, true))
    }

    /// Whether `group@version` is retired (writes to it are refused).
    pub fn is_retired(&self, group: &str, version: u32) -> bool {
        self.state.lock().is_retired(group, version)
    }

    /// The feature ids no version can read any more at `now_us`: those of retired versions
    /// past their retention that no other version (retired within its retention, or not
    /// retired) uses.
    pub fn dropped_feature_ids(&self, now_us: i64) -> Vec<FeatureId> {
        Self::dropped_in(&self.state.lock(), now_us)
    }

    fn dropped_in(st: &State, now_us: i64) -> Vec<FeatureId> {
        let (mut dead, mut live) = (std::collections::BTreeSet::new(), std::collections::BTreeSet::new());
        for (group, versions) in &st.groups {
            // The serving version is live whatever happened (a promotion racing a retirement
            // in another region).
            let serving = st.serving_at(group, u64::MAX);
            for (v, stored) in versions {
                let expired = Some(*v) != serving
                    && st
                        .retired
                        .get(group)
                        .and_then(|r| r.get(v))
                        .and_then(|r| r.drop_after.as_ref())
                        .and_then(|t| crate::convert::micros(t, "drop_after").ok())
                        .is_some_and(|t| t <= now_us);
                let set = if expired { &mut dead } else { &mut live };
                set.extend(stored.feature_ids.iter().copied());
            }
        }
        dead.difference(&live).map(|&id| FeatureId(id)).collect()
    }

    /// Hands [`Registry::dropped_feature_ids`] now to the engine's compactions. The registry's
    /// lock is held from reading the clock to handing the set over, so concurrent refreshes
    /// (the periodic check racing a retirement) hand theirs over in clock order: the last set
    /// handed over is never one computed before a retirement it should include.
    pub fn refresh_dropped_features(&self) {
        let st = self.state.lock();
        let now_us = self.db.system_time_now().0 as i64;
        self.db.set_dropped_features(&Self::dropped_in(&st, now_us));
    }

    /// Every version of `group`, its state, and its serving history.
    pub fn versions(&self, group: &str) -> Result<pb::ListGroupVersionsResponse> {
        let st = self.state.lock();
        let versions =
            st.groups.get(group).ok_or_else(|| RegistryError::NotFound(format!("no feature group {group:?}")))?;
        let serving = st.serving_at(group, u64::MAX).unwrap_or(0);
        let history: Vec<pb::GroupPromotion> =
            st.serving.get(group).map(|h| h.iter().map(|p| p.promotion.clone()).collect()).unwrap_or_default();
        let served = |v: u32| history.iter().any(|p| p.to_version == v);
        let mut out = Vec::with_capacity(versions.len());
        let mut before: Option<&StoredGroup> = None;
        for (&v, stored) in versions {
            use pb::group_version::State as S;
            let retirement = st.retired.get(group).and_then(|r| r.get(&v)).cloned();
            let state = if v == serving {
                S::Serving
            } else if retirement.is_some() {
                S::Retired
            } else if v > serving && !served(v) {
                S::Staged
            } else {
                S::Inactive
            };
            let def = stored.def.clone().unwrap_or_default();
            let (details, shared) = match before.and_then(|b| b.def.as_ref().map(|d| (b, d))) {
                Some((b, d)) => {
                    (diff(d, &def), stored.feature_ids.iter().filter(|id| b.feature_ids.contains(id)).count())
                }
                None => (Vec::new(), 0),
            };
            let serving_ids = versions.get(&serving).map(|s| s.feature_ids.as_slice()).unwrap_or_default();
            let shared_with_serving = if v == serving {
                Vec::new()
            } else {
                def.features
                    .iter()
                    .zip(&stored.feature_ids)
                    .filter(|(_, id)| serving_ids.contains(id))
                    .map(|(f, _)| f.name.clone())
                    .collect()
            };
            out.push(pb::GroupVersion {
                retirement,
                shared_with_serving,
                version: v,
                state: state as i32,
                created_at: def.created_at,
                details,
                shared_features: shared as u32,
                own_features: (stored.feature_ids.len() - shared) as u32,
            });
            before = Some(stored);
        }
        Ok(pb::ListGroupVersionsResponse { serving_version: serving, versions: out, promotions: history })
    }

    /// A group version (`version` 0: the serving one).
    pub fn group(&self, name: &str, version: u32) -> Result<pb::FeatureGroup> {
        let st = self.state.lock();
        let (version, stored) = Self::stored(&st, name, version)?;
        stored
            .def
            .clone()
            .ok_or_else(|| RegistryError::NotFound(format!("feature group {name:?} has no version {version}")))
    }

    /// The serving version of every group.
    pub fn groups(&self) -> Vec<pb::FeatureGroup> {
        let st = self.state.lock();
        st.groups.keys().filter_map(|g| Self::stored(&st, g, 0).ok().and_then(|(_, s)| s.def.clone())).collect()
    }

    /// An entity type.
    pub fn entity_type(&self, name: &str) -> Result<pb::EntityType> {
        self.state
            .lock()
            .entity_types
            .get(name)
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(format!("no entity type {name:?}")))
    }

    /// Every entity type.
    pub fn entity_types(&self) -> Vec<pb::EntityType> {
        self.state.lock().entity_types.values().cloned().collect()
    }

    /// Resolves `group:feature` or `group@N:feature` (unpinned: the serving version).
    pub fn resolve(&self, reference: &str) -> Result<ResolvedFeature> {
        self.resolve_at(reference, SystemTime::MAX)
    }

    /// Resolves `group:feature` or `group@N:feature`, an unpinned reference to the version that
    /// served as of `known_at` (module docs; `SystemTime::MAX`: now).
    pub fn resolve_at(&self, reference: &str, known_at: SystemTime) -> Result<ResolvedFeature> {
        Self::resolve_in(&self.state.lock(), reference, known_at)
    }

    /// Resolves every reference of one request against one state of the registry, so a
    /// promotion meanwhile never gives it features of two versions of a group.
    pub fn resolve_all_at(&self, references: &[String], known_at: SystemTime) -> Result<Vec<ResolvedFeature>> {
        let st = self.state.lock();
        references.iter().map(|r| Self::resolve_in(&st, r, known_at)).collect()
    }

    /// [`Registry::resolve_all_at`] for reads of stored history (scans): an aggregate has no
    /// history of its own, so naming one is refused with its source's name.
    pub fn resolve_written_at(&self, references: &[String], known_at: SystemTime) -> Result<Vec<ResolvedFeature>> {
        let features = self.resolve_all_at(references, known_at)?;
        if let Some(f) = features.iter().find(|f| f.aggregate.is_some()) {
            let source = f.aggregate.as_ref().map_or("", |a| a.source.as_str());
            return Err(RegistryError::Invalid(format!(
                "{}:{} is an aggregate of {source}: it has no history of its own; scan {source}",
                f.group, f.feature
            )));
        }
        Ok(features)
    }

    fn resolve_in(st: &State, reference: &str, known_at: SystemTime) -> Result<ResolvedFeature> {
        let bad = || {
            RegistryError::Invalid(format!("feature reference {reference:?} is not group:feature or group@N:feature"))
        };
        let (group_part, feature) = reference.split_once(':').ok_or_else(bad)?;
        let (group, version) = parse_group_ref(group_part).ok_or_else(bad)?;
        let (version, stored) = Self::stored_at(st, group, version, known_at)?;
        let def =
            stored.def.as_ref().ok_or_else(|| RegistryError::NotFound(format!("feature group {group:?} is empty")))?;
        let i = def.features.iter().position(|f| f.name == feature).ok_or_else(|| {
            RegistryError::NotFound(format!("feature group {group}@{version} has no feature {feature:?}"))
        })?;
        resolved(group, version, def, stored, i)
    }

    /// Resolves `group` or `group@N` to its version and every written feature of it (its
    /// aggregates hold no data of their own: writes, scans, backfills and gates skip them).
    pub fn resolve_group(&self, reference: &str) -> Result<Vec<ResolvedFeature>> {
        let (group, version) = parse_group_ref(reference)
            .ok_or_else(|| RegistryError::Invalid(format!("group reference {reference:?} is not group or group@N")))?;
        let st = self.state.lock();
        let (version, stored) = Self::stored(&st, group, version)?;
        let def =
            stored.def.as_ref().ok_or_else(|| RegistryError::NotFound(format!("feature group {group:?} is empty")))?;
        (0..def.features.len())
            .filter(|&i| def.features[i].aggregation.is_none())
            .map(|i| resolved(group, version, def, stored, i))
            .collect()
    }

    /// A stored group version (`version` 0: the serving one).
    fn stored<'s>(st: &'s State, group: &str, version: u32) -> Result<(u32, &'s StoredGroup)> {
        Self::stored_at(st, group, version, SystemTime::MAX)
    }

    /// A stored group version (`version` 0: the one serving as of `known_at`).
    fn stored_at<'s>(st: &'s State, group: &str, version: u32, known_at: SystemTime) -> Result<(u32, &'s StoredGroup)> {
        let versions =
            st.groups.get(group).ok_or_else(|| RegistryError::NotFound(format!("no feature group {group:?}")))?;
        let version = if version == 0 { st.serving_at(group, known_at.0).unwrap_or(0) } else { version };
        versions
            .get_key_value(&version)
            .map(|(v, s)| (*v, s))
            .ok_or_else(|| RegistryError::NotFound(format!("feature group {group:?} has no version {version}")))
    }

    /// A number that changes whenever the registry does: a resolution made while it read `g`
    /// stays valid as long as it still reads `g`.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The engine this registry writes to.
    pub fn db(&self) -> &Arc<Db> {
        &self.db
    }

    /// True if the registry cell of `group` version `v` is readable from the engine (used by
    /// tests to show the registry is stored in the engine, not only in memory).
    pub fn stored_in_engine(&self, group: &str, v: u32) -> Result<bool> {
        let mut key = GROUP_PREFIX.to_vec();
        key.extend_from_slice(group.as_bytes());
        Ok(self.db.value_at(&key, FeatureId(v), AsOf::at(EventTime(0)))?.is_some())
    }
}
