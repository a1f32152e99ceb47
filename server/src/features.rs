//! The feature service's logic, independent of gRPC: online lookups and atomic writes.
//!
//! Online statuses (DESIGN.md §2, online = `value_at(as_of, now, ttl)`), in this order:
//! `PRESENT` if a value lies within the group's TTL of `as_of`; else `DEFAULTED` if the feature
//! has a registered default (the default is served); else `STALE` if an older value exists;
//! else `NOT_FOUND`. All features of one request are read from one engine snapshot, so a batch
//! is seen whole or not at all.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use prost::Message;
use quiver_proto::v1 as pb;
use quiver_storage::{AsOf, Db, Durability, EventTime, FeatureId, SystemTime, Value, VersionVector, WriteBatch};

use crate::convert::{self, Invalid};
use crate::registry::{Registry, RegistryError, ResolvedFeature};

/// Most entities in one online request.
pub const ONLINE_ENTITIES_MAX: usize = 10_000;
/// Most features in one request.
pub const FEATURES_PER_REQUEST_MAX: usize = 1_000;
/// Most entity x feature cells in one online request.
pub const ONLINE_CELLS_MAX: usize = 1_000_000;
/// Most rows in one write request.
pub const WRITE_ROWS_MAX: usize = 10_000;
/// Most values (and deletes) in one write request.
pub const WRITE_VALUES_MAX: usize = 1_000_000;
/// Longest idempotency key.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 128;

const IDEMPOTENCY_PREFIX: &[u8] = b"\x00idem\x00";

/// Why a request failed, by the gRPC code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// `INVALID_ARGUMENT`
    #[error("{0}")]
    Invalid(String),
    /// `NOT_FOUND`
    #[error("{0}")]
    NotFound(String),
    /// `RESOURCE_EXHAUSTED`
    #[error("{0}")]
    TooLarge(String),
    /// `FAILED_PRECONDITION`
    #[error("{0}")]
    Refused(String),
    /// `ABORTED`: a compare-and-swap did not match; the current versions are attached.
    #[error("{message}")]
    Aborted {
        /// What did not match.
        message: String,
        /// `(feature, current version vector)` of every mismatching cell.
        current: Vec<(String, pb::VersionVector)>,
    },
    /// The engine failed (`INTERNAL`, or `DATA_LOSS` for corruption).
    #[error("storage: {0}")]
    Storage(#[from] quiver_storage::Error),
}

impl From<Invalid> for ServiceError {
    fn from(e: Invalid) -> Self {
        ServiceError::Invalid(e.0)
    }
}

impl From<RegistryError> for ServiceError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Invalid(m) => ServiceError::Invalid(m),
            RegistryError::Refused(m) => ServiceError::Refused(m),
            RegistryError::NotFound(m) => ServiceError::NotFound(m),
            RegistryError::TooLarge(m) => ServiceError::TooLarge(m),
            RegistryError::Storage(e) => ServiceError::Storage(e),
        }
    }
}

type Result<T> = std::result::Result<T, ServiceError>;

fn api_vv(vv: &VersionVector) -> pb::VersionVector {
    pb::VersionVector {
        entries: vv.entries().iter().map(|&(region, counter)| pb::version_vector::Entry { region, counter }).collect(),
    }
}

fn column(f: &ResolvedFeature, reference: &str, rows: usize) -> pb::FeatureColumn {
    pb::FeatureColumn {
        feature_ref: reference.to_string(),
        group_version: f.version,
        r#type: f.value_type as i32,
        statuses: Vec::with_capacity(rows),
        event_times_us: Vec::with_capacity(rows),
        ..Default::default()
    }
}

/// Appends one row's value (or the type's zero value when `v` is `None`) to a column.
fn push_value(col: &mut pb::FeatureColumn, t: pb::ValueType, v: Option<&Value>) {
    match (t, v) {
        (pb::ValueType::Bool, Some(Value::Bool(b))) => col.bool_values.push(*b),
        (pb::ValueType::Bool, _) => col.bool_values.push(false),
        (pb::ValueType::Int64, Some(Value::Int64(i))) => col.int64_values.push(*i),
        (pb::ValueType::Int64, _) => col.int64_values.push(0),
        (pb::ValueType::Float32, Some(Value::Float32(x))) => col.float32_values.push(*x),
        (pb::ValueType::Float32, _) => col.float32_values.push(0.0),
        (pb::ValueType::Float64, Some(Value::Float64(x))) => col.float64_values.push(*x),
        (pb::ValueType::Float64, _) => col.float64_values.push(0.0),
        (pb::ValueType::String, Some(Value::String(s))) => col.string_values.push(s.clone()),
        (pb::ValueType::String, _) => col.string_values.push(String::new()),
        (pb::ValueType::Bytes, Some(Value::Bytes(b))) => col.bytes_values.push(b.clone()),
        (pb::ValueType::Bytes, _) => col.bytes_values.push(Vec::new()),
        (pb::ValueType::Float32Vector, Some(Value::Float32Vector(l))) => {
            col.float32_vector_values.push(pb::Float32List { values: l.clone() })
        }
        (pb::ValueType::Float32Vector, _) => col.float32_vector_values.push(pb::Float32List::default()),
        (pb::ValueType::Int64List, Some(Value::Int64List(l))) => {
            col.int64_list_values.push(pb::Int64List { values: l.clone() })
        }
        (pb::ValueType::Int64List, _) => col.int64_list_values.push(pb::Int64List::default()),
        (pb::ValueType::StringList, Some(Value::StringList(l))) => {
            col.string_list_values.push(pb::StringList { values: l.clone() })
        }
        (pb::ValueType::StringList, _) => col.string_list_values.push(pb::StringList::default()),
        (pb::ValueType::Unspecified, _) => {}
    }
}

/// The feature service of one node.
#[derive(Debug)]
pub struct Features {
    registry: Arc<Registry>,
    db: Arc<Db>,
    /// Plain writes share it; writes with compare-and-swap or an idempotency key take it alone,
    /// so their check and their write are one atomic step (linearizable within this node).
    check_then_write: RwLock<()>,
}

impl Features {
    /// A service over `registry` and its engine.
    pub fn new(registry: Arc<Registry>) -> Self {
        let db = registry.db().clone();
        Features { registry, db, check_then_write: RwLock::new(()) }
    }

    /// `GetOnlineFeatures`, with `now_us` the server's clock (used when the request has no
    /// `as_of`).
    pub fn get_online(&self, req: &pb::GetOnlineFeaturesRequest, now_us: i64) -> Result<pb::GetOnlineFeaturesResponse> {
        let (n, m) = (req.entities.len(), req.features.len());
        if n > ONLINE_ENTITIES_MAX || m > FEATURES_PER_REQUEST_MAX || n * m > ONLINE_CELLS_MAX {
            return Err(ServiceError::TooLarge(format!(
                "{n} entities x {m} features is over the limits ({ONLINE_ENTITIES_MAX} entities, \
                 {FEATURES_PER_REQUEST_MAX} features, {ONLINE_CELLS_MAX} cells)"
            )));
        }
        if m == 0 {
            return Err(ServiceError::Invalid("no features requested".into()));
        }
        let et = self.registry.entity_type(&req.entity_type)?;
        let features: Vec<ResolvedFeature> =
            req.features.iter().map(|r| self.registry.resolve(r)).collect::<std::result::Result<_, _>>()?;
        if let Some(f) = features.iter().find(|f| f.entity_type != et.name) {
            return Err(ServiceError::Invalid(format!(
                "feature {}:{} is on entity type {}, not {}",
                f.group, f.feature, f.entity_type, et.name
            )));
        }
        let keys: Vec<Vec<u8>> =
            req.entities.iter().map(|k| convert::entity_key(&et, k)).collect::<std::result::Result<_, _>>()?;
        let as_of = match &req.as_of {
            Some(ts) => convert::micros(ts, "as_of")?,
            None => now_us,
        };
        let snap = self.db.snapshot();
        let mut columns = Vec::with_capacity(m);
        for (f, reference) in features.iter().zip(&req.features) {
            let mut col = column(f, reference, n);
            let lookback_us = f.ttl.map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
            let q = AsOf { as_of: EventTime(as_of), known_at: SystemTime::MAX, lookback_us };
            let default = match &f.default {
                Some(d) => Some(convert::to_engine(d, f.value_type, "default").map_err(ServiceError::from)?),
                None => None,
            };
            for key in &keys {
                let found = snap.value_at(key, f.id, q)?;
                let (status, event_us, value) = match (&found, &default) {
                    (Some(v), _) => (pb::FeatureStatus::Present, v.event_time.0, v.value.as_ref()),
                    (None, Some(d)) => (pb::FeatureStatus::Defaulted, 0, Some(d)),
                    (None, None) => {
                        let older = lookback_us.is_some()
                            && snap.value_at(key, f.id, AsOf { lookback_us: None, ..q })?.is_some();
                        (if older { pb::FeatureStatus::Stale } else { pb::FeatureStatus::NotFound }, 0, None)
                    }
                };
                col.statuses.push(status as i32);
                col.event_times_us.push(event_us);
                push_value(&mut col, f.value_type, value);
            }
            columns.push(col);
        }
        Ok(pb::GetOnlineFeaturesResponse { columns })
    }

    /// `WriteFeatures`: all rows or none.
    pub fn write(&self, req: &pb::WriteFeaturesRequest) -> Result<pb::WriteFeaturesResponse> {
        if req.rows.is_empty() {
            return Err(ServiceError::Invalid("write has no rows".into()));
        }
        if req.rows.len() > WRITE_ROWS_MAX {
            return Err(ServiceError::TooLarge(format!(
                "{} rows is over the limit of {WRITE_ROWS_MAX}",
                req.rows.len()
            )));
        }
        let values: usize = req.rows.iter().map(|r| r.values.len() + r.deletes.len()).sum();
        if values > WRITE_VALUES_MAX {
            return Err(ServiceError::TooLarge(format!("{values} values is over the limit of {WRITE_VALUES_MAX}")));
        }
        if req.idempotency_key.len() > IDEMPOTENCY_KEY_BYTES_MAX {
            return Err(ServiceError::Invalid(format!(
                "idempotency key is longer than {IDEMPOTENCY_KEY_BYTES_MAX} bytes"
            )));
        }
        let durability = match req.durability() {
            pb::Durability::Async => Durability::Async,
            pb::Durability::Sync | pb::Durability::Unspecified => Durability::Sync,
        };
        // Validate and build the whole batch before taking any lock or writing anything.
        let mut batch = WriteBatch::new();
        let mut cas: Vec<(Vec<u8>, FeatureId, EventTime, String, pb::VersionVector)> = Vec::new();
        let mut groups: HashMap<&str, (String, HashMap<String, ResolvedFeature>)> = HashMap::new();
        let mut written = 0u64;
        for (i, row) in req.rows.iter().enumerate() {
            if !groups.contains_key(row.group.as_str()) {
                let feats = self.registry.resolve_group(&row.group)?;
                let et = feats.first().map(|f| f.entity_type.clone()).unwrap_or_default();
                groups.insert(&row.group, (et, feats.into_iter().map(|f| (f.feature.clone(), f)).collect()));
            }
            let Some((et_name, feats)) = groups.get(row.group.as_str()) else { continue };
            let et = self.registry.entity_type(et_name)?;
            let entity =
                row.entity.as_ref().ok_or_else(|| ServiceError::Invalid(format!("row {i}: entity is required")))?;
            let key = convert::entity_key(&et, entity).map_err(|e| ServiceError::Invalid(format!("row {i}: {e}")))?;
            let e = convert::event_time(row.event_time.as_ref(), &format!("row {i}: event_time"))?;
            if row.values.is_empty() && row.deletes.is_empty() {
                return Err(ServiceError::Invalid(format!("row {i} writes nothing")));
            }
            let feature = |name: &str| {
                feats.get(name).ok_or_else(|| {
                    ServiceError::NotFound(format!("row {i}: group {} has no feature {name:?}", row.group))
                })
            };
            let mut names: Vec<&String> = row.values.keys().collect();
            names.sort();
            for name in names {
                let f = feature(name)?;
                let v = convert::to_engine(&row.values[name], f.value_type, &format!("row {i}: {}", name))?;
                batch.put(&key, f.id, e, v).map_err(|err| ServiceError::Invalid(format!("row {i}: {name}: {err}")))?;
                written += 1;
            }
            for name in &row.deletes {
                let f = feature(name)?;
                batch.delete(&key, f.id, e).map_err(|err| ServiceError::Invalid(format!("row {i}: {name}: {err}")))?;
                written += 1;
            }
            for (name, vv) in &row.expected_versions {
                let f = feature(name)?;
                cas.push((key.clone(), f.id, e, format!("{}:{name}", row.group), vv.clone()));
            }
        }
        let exclusive = !cas.is_empty() || !req.idempotency_key.is_empty();
        let _shared;
        let _alone;
        if exclusive {
            _alone = self.check_then_write.write();
        } else {
            _shared = self.check_then_write.read();
        }
        let mut idem_key = IDEMPOTENCY_PREFIX.to_vec();
        idem_key.extend_from_slice(req.idempotency_key.as_bytes());
        if !req.idempotency_key.is_empty() {
            if let Some(prev) = self.db.value_at(&idem_key, FeatureId(0), AsOf::at(EventTime(0)))? {
                if let Some(Value::Bytes(b)) = &prev.value {
                    let mut resp = pb::WriteFeaturesResponse::decode(b.as_slice()).map_err(|e| {
                        ServiceError::Invalid(format!("stored idempotency record does not decode: {e}"))
                    })?;
                    resp.system_time = Some(convert::timestamp(prev.system_time.0 as i64));
                    resp.deduplicated = true;
                    return Ok(resp);
                }
            }
        }
        let mut mismatches = Vec::new();
        for (key, id, e, name, expected) in &cas {
            let q = AsOf { as_of: *e, known_at: SystemTime::MAX, lookback_us: Some(0) };
            let current = self.db.version_at(key, *id, q)?;
            let current_vv = current.as_ref().filter(|v| v.value.is_some()).map(|v| api_vv(&v.version_vector));
            let matches = match &current_vv {
                None => expected.entries.is_empty(),
                Some(c) => c == expected,
            };
            if !matches {
                mismatches.push((name.clone(), current_vv.unwrap_or_default()));
            }
        }
        if !mismatches.is_empty() {
            let names: Vec<&str> = mismatches.iter().map(|m| m.0.as_str()).collect();
            return Err(ServiceError::Aborted {
                message: format!("compare-and-swap failed for {}: the current version differs", names.join(", ")),
                current: mismatches,
            });
        }
        let receipt = if req.idempotency_key.is_empty() {
            self.db.write(batch, durability)?
        } else {
            // The answer is stored with the write, in the same atomic batch; its system time
            // is only known after the commit, so the stored record holds the count and the
            // retry reads the time back from the record's own version.
            let record = pb::WriteFeaturesResponse { values_written: written, system_time: None, deduplicated: false };
            batch.put(&idem_key, FeatureId(0), EventTime(0), Value::Bytes(record.encode_to_vec()))?;
            self.db.write(batch, durability)?
        };
        Ok(pb::WriteFeaturesResponse {
            values_written: written,
            system_time: Some(convert::timestamp(receipt.system_time.0 as i64)),
            deduplicated: false,
        })
    }
}
