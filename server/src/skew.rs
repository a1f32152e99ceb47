//! Skew, online against offline (README "Skew"): the served-feature log replayed through the
//! point-in-time join, value by value.
//!
//! Each logged answer is a spine row: its entity at its `as_of`, read with `known_at` = its
//! served-at time (the engine's system time right after the online read, so the replay sees
//! exactly the versions the read could see, whatever the clocks did), the features pinned to
//! the group versions that answered, registered defaults on (as online serves them): one join
//! per logged lookup and list of features. A served value and its replay are *equal* when
//! status, event time and value (its encoding: NaN equals NaN) agree; a lookup that asked for
//! `default_missing` is replayed the same way (NOT_FOUND and STALE become
//! DEFAULTED with the type's zero value). Answers served UNAVAILABLE were never read: they are
//! *missing*, as are features whose group version is gone.

use std::collections::BTreeMap;

use prost::Message;
use quiver_proto::v1 as pb;

use crate::features::{Features, ServiceError};
use crate::servedlog::ServedLog;

/// Most logged answers one `MeasureSkew` replays.
pub const SKEW_ANSWERS_MAX: usize = 1_000_000;
/// Most bytes of logged answers (encoded) one `MeasureSkew` holds: the replay keeps the range in
/// memory, so a range of wide answers is refused before it grows past this.
pub const SKEW_LOG_BYTES_MAX: usize = 32 << 20;
/// Most mismatches shown per feature.
pub const SKEW_EXAMPLES_MAX: u32 = 100;
/// Mismatches shown per feature when the request does not say.
pub const SKEW_EXAMPLES_DEFAULT: u32 = 5;

type Result<T> = std::result::Result<T, ServiceError>;

/// `group:feature` or `group@N:feature` pinned to version `v`.
fn pinned(reference: &str, v: u32) -> Option<String> {
    let (group, feature) = reference.split_once(':')?;
    let (name, _) = crate::registry::parse_group_ref(group)?;
    Some(format!("{name}@{v}:{feature}"))
}

/// One logged answer's place in a replay.
struct Row<'a> {
    answer: &'a pb::LoggedAnswer,
    /// Per feature of the batch: the logged feature, if this answer has it.
    served: Vec<Option<&'a pb::LoggedFeature>>,
}

/// Logged answers of one entity type and one list of pinned features (the batch's key).
#[derive(Default)]
struct Batch<'a> {
    /// The features as logged, in the order of the pinned ones.
    logged: Vec<String>,
    rows: Vec<Row<'a>>,
}

/// What a replay gave for one row and feature: status, event time, value.
type Replayed = (i32, i64, Option<pb::Value>);

/// Runs one join and returns, per spine row, per feature, what it gave.
fn replay(
    features: &Features,
    entity_type: &str,
    refs: &[String],
    spine: Vec<pb::SpineRow>,
    known_at: i64,
) -> Result<Vec<Vec<Replayed>>> {
    let n = spine.len();
    let req = pb::GetHistoricalFeaturesRequest {
        entity_type: entity_type.to_string(),
        spine,
        features: refs.to_vec(),
        known_at: Some(crate::convert::timestamp(known_at)),
        strict_availability: false,
        use_defaults: true,
    };
    let mut out: Vec<Vec<Replayed>> = Vec::with_capacity(n);
    features.historical(&req, |chunk| {
        let rows = chunk.columns.first().map_or(0, |c| c.statuses.len());
        for i in 0..rows {
            out.push(
                chunk
                    .columns
                    .iter()
                    .map(|c| (c.statuses[i], c.event_times_us[i], crate::convert::column_value(c, i)))
                    .collect(),
            );
        }
        true
    })?;
    Ok(out)
}

fn same(served: &pb::LoggedFeature, replayed: &Replayed) -> bool {
    served.status == replayed.0
        && served.event_time_us == replayed.1
        && served.value.as_ref().map(Message::encode_to_vec) == replayed.2.as_ref().map(Message::encode_to_vec)
}

/// `MeasureSkew` over the log of `log`, replayed through `features`; `visible` filters groups.
pub fn measure(
    features: &Features,
    log: &ServedLog,
    req: &pb::MeasureSkewRequest,
    visible: impl Fn(&str) -> bool,
) -> Result<pb::MeasureSkewResponse> {
    let (from, to) = crate::servedlog::served_range(req.from.as_ref(), req.to.as_ref())?;
    if req.examples > SKEW_EXAMPLES_MAX {
        return Err(ServiceError::Invalid(format!("examples must be at most {SKEW_EXAMPLES_MAX}")));
    }
    let examples = if req.examples == 0 { SKEW_EXAMPLES_DEFAULT } else { req.examples } as usize;
    let mut answers: Vec<pb::LoggedAnswer> = Vec::new();
    let (mut too_many, mut bytes) = (false, 0usize);
    log.scan(from, to, &mut |chunk| {
        bytes += chunk.iter().map(Message::encoded_len).sum::<usize>();
        answers.extend(chunk);
        too_many = answers.len() > SKEW_ANSWERS_MAX || bytes > SKEW_LOG_BYTES_MAX;
        !too_many
    })?;
    if too_many {
        return Err(ServiceError::TooLarge(format!(
            "the range holds more than {SKEW_ANSWERS_MAX} logged answers or {} MiB of them (SKEW_ANSWERS_MAX, \
             SKEW_LOG_BYTES_MAX): measure a shorter range",
            SKEW_LOG_BYTES_MAX >> 20
        )));
    }
    let keep = |f: &pb::LoggedFeature| {
        let group = crate::auth::group_of(&f.feature_ref);
        let name = crate::registry::parse_group_ref(group).map_or(group, |(n, _)| n);
        visible(name) && (req.group.is_empty() || req.group == name)
    };
    let mut stats: BTreeMap<String, pb::FeatureSkew> = BTreeMap::new();
    // Batches by (entity type, pinned features); features served UNAVAILABLE are missing.
    let mut batches: BTreeMap<(String, Vec<String>), Batch<'_>> = BTreeMap::new();
    let mut replayed_answers = 0u64;
    // A sharded node replays only the answers of entities it owns now: those of slots that
    // moved away are no longer here to read (CLUSTER.md §5), and are left out.
    let mut entity_types: BTreeMap<String, Option<pb::EntityType>> = BTreeMap::new();
    let mut owned = |a: &pb::LoggedAnswer| {
        if !features.is_sharded() {
            return true;
        }
        let et = entity_types
            .entry(a.entity_type.clone())
            .or_insert_with(|| features.registry().entity_type(&a.entity_type).ok());
        match (et.as_ref(), a.entity.as_ref()) {
            (Some(et), Some(e)) => crate::convert::entity_key(et, e).map_or(true, |k| features.owns(&k)),
            _ => true,
        }
    };
    for a in answers.iter().filter(|a| owned(a)) {
        let mut pins = Vec::new();
        let mut served = Vec::new();
        for f in a.features.iter().filter(|f| keep(f)) {
            let s = stats
                .entry(f.feature_ref.clone())
                .or_insert_with(|| pb::FeatureSkew { feature_ref: f.feature_ref.clone(), ..Default::default() });
            match pinned(&f.feature_ref, f.group_version) {
                Some(p) if f.status != pb::FeatureStatus::Unavailable as i32 => {
                    pins.push(p);
                    served.push(f);
                }
                _ => s.missing += 1,
            }
        }
        if pins.is_empty() {
            continue;
        }
        replayed_answers += 1;
        let b = batches.entry((a.entity_type.clone(), pins)).or_default();
        if b.logged.is_empty() {
            b.logged = served.iter().map(|f| f.feature_ref.clone()).collect();
        }
        b.rows.push(Row { answer: a, served: served.into_iter().map(Some).collect() });
    }
    for ((entity_type, pinned), batch) in &batches {
        // A group version that is gone makes the whole batch missing.
        if let Some(gone) = pinned.iter().find(|p| features.registry().resolve(p).is_err()) {
            tracing::debug!(feature = %gone, "skew: group version gone; its rows are missing");
            for r in &batch.logged {
                if let Some(s) = stats.get_mut(r) {
                    s.missing += batch.rows.len() as u64;
                }
            }
            continue;
        }
        // One join per served-at time (the answers of one lookup).
        let mut runs: BTreeMap<i64, Vec<&Row<'_>>> = BTreeMap::new();
        for row in &batch.rows {
            runs.entry(micros(&row.answer.served_at)).or_default().push(row);
        }
        for (known_at, rows) in runs {
            let spine = rows
                .iter()
                .map(|r| pb::SpineRow { entity: r.answer.entity.clone(), timestamp: r.answer.as_of })
                .collect();
            let got = replay(features, entity_type, pinned, spine, known_at)?;
            if got.len() != rows.len() {
                return Err(ServiceError::Storage(quiver_storage::Error::InvalidArgument(format!(
                    "a replay of {} rows answered {}",
                    rows.len(),
                    got.len()
                ))));
            }
            for (row, replayed) in rows.iter().zip(got) {
                for ((served, mut again), logged) in row.served.iter().zip(replayed).zip(&batch.logged) {
                    let Some(served) = served else { continue };
                    if row.answer.default_missing
                        && matches!(
                            pb::FeatureStatus::try_from(again.0),
                            Ok(pb::FeatureStatus::NotFound | pb::FeatureStatus::Stale)
                        )
                    {
                        again = (pb::FeatureStatus::Defaulted as i32, 0, zero_value(served));
                    }
                    let Some(s) = stats.get_mut(logged) else { continue };
                    s.compared += 1;
                    if same(served, &again) {
                        s.equal += 1;
                    } else {
                        s.mismatched += 1;
                        if s.examples.len() < examples {
                            s.examples.push(pb::SkewExample {
                                request_id: row.answer.request_id.clone(),
                                entity: row.answer.entity.clone(),
                                served_at: row.answer.served_at,
                                served: Some((*served).clone()),
                                replayed: Some(pb::LoggedFeature {
                                    feature_ref: served.feature_ref.clone(),
                                    status: again.0,
                                    event_time_us: again.1,
                                    value: again.2,
                                    group_version: served.group_version,
                                }),
                            });
                        }
                    }
                }
            }
        }
    }
    Ok(pb::MeasureSkewResponse { answers: replayed_answers, features: stats.into_values().collect() })
}

/// A logged time in µs (0 if absent or malformed: such a record was not written by quiverd).
fn micros(t: &Option<prost_types::Timestamp>) -> i64 {
    t.as_ref().and_then(|t| crate::convert::micros(t, "served_at").ok()).unwrap_or(0)
}

/// The zero value online serves a `default_missing` lookup for a feature without a default:
/// what was served when it was served DEFAULTED, else nothing to compare.
fn zero_value(served: &pb::LoggedFeature) -> Option<pb::Value> {
    use pb::value::Kind;
    let zero = |k: &Kind| match k {
        Kind::BoolValue(_) => Kind::BoolValue(false),
        Kind::Int64Value(_) => Kind::Int64Value(0),
        Kind::Float32Value(_) => Kind::Float32Value(0.0),
        Kind::Float64Value(_) => Kind::Float64Value(0.0),
        Kind::StringValue(_) => Kind::StringValue(String::new()),
        Kind::BytesValue(_) => Kind::BytesValue(Vec::new()),
        Kind::Float32Vector(_) => Kind::Float32Vector(Default::default()),
        Kind::Int64List(_) => Kind::Int64List(Default::default()),
        Kind::StringList(_) => Kind::StringList(Default::default()),
    };
    served.value.as_ref().and_then(|v| v.kind.as_ref()).map(|k| pb::Value { kind: Some(zero(k)) })
}
