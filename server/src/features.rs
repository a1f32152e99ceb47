//! The feature service's logic, independent of gRPC: online lookups and atomic writes.
//!
//! Online statuses (`storage/READS.md`, online = `value_at(as_of, now, ttl)`), in this order:
//! `PRESENT` if a value lies within the group's TTL of `as_of`; else `DEFAULTED` if the feature
//! has a registered default (the default is served); else `STALE` if an older value exists;
//! else `NOT_FOUND`. All features of one request are read from one engine snapshot, so a batch
//! is seen whole or not at all.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use prost::Message;
use quiver_proto::v1 as pb;
use quiver_storage::agg::{AggAnswer, AggValue};
use quiver_storage::AggQuery;
use quiver_storage::{
    AsOf, CellVersion, Db, Durability, EventTime, Expectation, FeatureId, SystemTime, Value, VersionVector, WriteBatch,
    WriteIf,
};

use crate::admission::ONLINE_ANSWER_BYTES_MAX;
use crate::convert::{self, push_value, Invalid};
use crate::health::{status_index, Health, ServedCounts, ServedTrack, Written};
use crate::registry::{AggregateSpec, Registry, RegistryError, ResolvedFeature};
use crate::replication::REGION_ID_MAX;

/// Most entities in one online request.
pub const ONLINE_ENTITIES_MAX: usize = 10_000;
/// Most features in one request.
pub const FEATURES_PER_REQUEST_MAX: usize = 1_000;
/// Most entity x feature cells in one online request.
pub const ONLINE_CELLS_MAX: usize = 1_000_000;
/// Online requests of at most this many cells run on the gRPC worker thread itself: they are
/// answered from memory (hot tier, block cache) or a few page-cache reads in microseconds,
/// and a hop to the blocking pool costs more than that. Larger ones go to the blocking pool.
pub const ONLINE_INLINE_CELLS_MAX: usize = 5_000;
/// Most rows in one write request.
pub const WRITE_ROWS_MAX: usize = 10_000;
/// Most values (and deletes) in one write request: one engine batch, less the slot of the
/// idempotency record.
pub const WRITE_VALUES_MAX: usize = quiver_storage::limits::BATCH_OPS_MAX - 1;
/// Longest idempotency key.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 128;

const IDEMPOTENCY_PREFIX: &[u8] = quiver_storage::reserved::IDEMPOTENCY;

/// What an idempotency record stores (under `IDEMPOTENCY_PREFIX + key`, feature 0, event
/// time 0, written in the write's own batch): the answer's count, and the SHA-256 of the
/// request it answered ([`request_digest`]), so that the key reused for a different request
/// is refused instead of answered with the first one's result. The system time and version of
/// the answer are the record's own. Records written before the digest existed hold only field
/// 1 (they were encoded `WriteFeaturesResponse`s, whose other fields were unset) and are
/// replayed without the check.
#[derive(Clone, PartialEq, prost::Message)]
struct IdempotencyRecord {
    #[prost(uint64, tag = "1")]
    values_written: u64,
    #[prost(bytes = "vec", tag = "15")]
    request_digest: Vec<u8>,
}

/// SHA-256 of everything in a write request but its idempotency key, in a canonical order
/// (within a row: values, deletes and expected versions by feature name, a vector's entries by
/// region; protobuf maps have no order), so that the same request sent in another order
/// hashes the same. Rows keep their order: a later row's write of a cell replaces an earlier
/// one's.
fn request_digest(req: &pb::WriteFeaturesRequest) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut buf = Vec::new();
    let part = |h: &mut Sha256, bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    h.update(req.durability.to_le_bytes());
    h.update((req.rows.len() as u64).to_le_bytes());
    for row in &req.rows {
        part(&mut h, row.group.as_bytes());
        buf.clear();
        if let Some(e) = &row.entity {
            e.encode(&mut buf).ok();
        }
        part(&mut h, &buf);
        let t = row.event_time.unwrap_or_default();
        h.update([u8::from(row.event_time.is_some())]);
        h.update(t.seconds.to_le_bytes());
        h.update(t.nanos.to_le_bytes());
        let mut names: Vec<&String> = row.values.keys().collect();
        names.sort();
        h.update((names.len() as u64).to_le_bytes());
        for name in names {
            part(&mut h, name.as_bytes());
            buf.clear();
            row.values[name].encode(&mut buf).ok();
            part(&mut h, &buf);
        }
        let mut deletes: Vec<&String> = row.deletes.iter().collect();
        deletes.sort();
        h.update((deletes.len() as u64).to_le_bytes());
        for name in deletes {
            part(&mut h, name.as_bytes());
        }
        let mut names: Vec<&String> = row.expected_versions.keys().collect();
        names.sort();
        h.update((names.len() as u64).to_le_bytes());
        for name in names {
            part(&mut h, name.as_bytes());
            let mut entries: Vec<(u32, u64)> =
                row.expected_versions[name].entries.iter().map(|e| (e.region, e.counter)).collect();
            entries.sort_unstable();
            h.update((entries.len() as u64).to_le_bytes());
            for (region, counter) in entries {
                h.update(region.to_le_bytes());
                h.update(counter.to_le_bytes());
            }
        }
    }
    h.finalize().into()
}

/// Why a request failed, by the gRPC code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// `INVALID_ARGUMENT`
    #[error("{0}")]
    Invalid(String),
    /// `NOT_FOUND`
    #[error("{0}")]
    NotFound(String),
    /// `RESOURCE_EXHAUSTED`: the request is over a limit whatever the load.
    #[error("{0}")]
    TooLarge(String),
    /// `RESOURCE_EXHAUSTED` with retry advice: the server is too busy for it now.
    #[error("{0}")]
    Overloaded(String),
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
    /// A sharded node does not serve an entity of the request (`FAILED_PRECONDITION` with
    /// `SlotNotOwned` details, or `UNAVAILABLE` before the map exists).
    #[error("{0}")]
    NotServed(crate::cluster::NotServed),
    /// The engine failed (`INTERNAL`, or `DATA_LOSS` for corruption).
    #[error("storage: {0}")]
    Storage(#[from] quiver_storage::Error),
}

impl From<Invalid> for ServiceError {
    fn from(e: Invalid) -> Self {
        ServiceError::Invalid(e.0)
    }
}

/// An aggregate met a stored value of another type than its source's: the registry gives a
/// retyped feature a fresh id, so this is data the engine should never hold (`DATA_LOSS`).
impl From<quiver_storage::agg::AggError> for ServiceError {
    fn from(e: quiver_storage::agg::AggError) -> Self {
        corrupt(STORED_CELL, &format!("aggregate: {e}"))
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

use crate::convert::vector_to_proto as api_vv;

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

/// Refuses an online lookup over the limits on entities, features and cells.
fn check_online_size(req: &pb::GetOnlineFeaturesRequest) -> Result<()> {
    let (n, m) = (req.entities.len(), req.features.len());
    if n > ONLINE_ENTITIES_MAX || m > FEATURES_PER_REQUEST_MAX || n * m > ONLINE_CELLS_MAX {
        return Err(ServiceError::TooLarge(format!(
            "{n} entities x {m} features is over the limits ({ONLINE_ENTITIES_MAX} entities, \
             {FEATURES_PER_REQUEST_MAX} features, {ONLINE_CELLS_MAX} cells)"
        )));
    }
    Ok(())
}

/// When and how an online answer was served, as logged.
struct Served<'a> {
    /// The engine's system time after the read (the replay's known_at).
    at_us: i64,
    /// The time the lookup read as of.
    as_of_us: i64,
    request_id: Option<&'a str>,
}

/// Offers the answers of the entities the features' groups sample to the served log.
fn log_answers(
    log: &crate::servedlog::ServedLog,
    req: &pb::GetOnlineFeaturesRequest,
    entity_type: &str,
    rates: &[f64],
    keys: &[Vec<u8>],
    columns: &[pb::FeatureColumn],
    served: &Served<'_>,
) {
    let most = rates.iter().copied().fold(0.0, f64::max);
    let mut id: Option<String> = served.request_id.map(str::to_string);
    for (i, key) in keys.iter().enumerate() {
        let point = crate::servedlog::sample_point(key);
        if point >= most {
            continue;
        }
        let logged: Vec<pb::LoggedFeature> = (0..rates.len())
            .filter(|&j| point < rates[j])
            .map(|j| {
                let col = &columns[j];
                pb::LoggedFeature {
                    feature_ref: col.feature_ref.clone(),
                    status: col.statuses[i],
                    event_time_us: col.event_times_us[i],
                    value: convert::column_value(col, i),
                    group_version: col.group_version,
                }
            })
            .collect();
        let answer = pb::LoggedAnswer {
            request_id: id.get_or_insert_with(|| log.next_request_id()).clone(),
            served_at: Some(convert::timestamp(served.at_us)),
            as_of: Some(convert::timestamp(served.as_of_us)),
            entity_type: entity_type.to_string(),
            entity: req.entities.get(i).cloned(),
            features: logged,
            default_missing: req.default_missing,
        };
        log.offer(&answer, served.at_us);
    }
}

/// The served status, event time and value of one cell (see the module docs for the order).
/// Status, event time and value of one cell from the winning version of a read *without*
/// lookback (tombstones included): `value_at` with the feature's TTL as lookback is that
/// version when it lies within the TTL of `as_of`, and absent otherwise (`storage/READS.md`).
fn cell_status(
    newest: Option<CellVersion>,
    as_of: EventTime,
    f: &ResolvedFeature,
    default: Option<&Value>,
) -> (pb::FeatureStatus, i64, Option<Value>) {
    let value = newest.and_then(|v| Some((v.event_time, v.value?)));
    match (status_of(value.as_ref().map(|v| v.0), as_of, f, default.is_some()), value) {
        (pb::FeatureStatus::Present, Some((t, v))) => (pb::FeatureStatus::Present, t.0, Some(v)),
        (pb::FeatureStatus::Defaulted, _) => (pb::FeatureStatus::Defaulted, 0, default.cloned()),
        (status, _) => (status, 0, None),
    }
}

/// The one status rule: `value_event` is the event time of the winning version of a read
/// without lookback when that version holds a value (`None`: no version, or a tombstone).
/// Within the feature's TTL of `as_of` it is PRESENT; otherwise the default if there is one,
/// else STALE (an older value exists) or NOT_FOUND.
fn status_of(
    value_event: Option<EventTime>,
    as_of: EventTime,
    f: &ResolvedFeature,
    has_default: bool,
) -> pb::FeatureStatus {
    let q = AsOf { as_of, known_at: SystemTime::MAX, lookback_us: lookback(f) };
    match value_event {
        Some(e) if e >= q.event_time_min() => pb::FeatureStatus::Present,
        _ if has_default => pb::FeatureStatus::Defaulted,
        Some(_) => pb::FeatureStatus::Stale,
        None => pb::FeatureStatus::NotFound,
    }
}

fn lookback(f: &ResolvedFeature) -> Option<u64> {
    f.ttl.map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn default_of(f: &ResolvedFeature) -> Result<Option<Value>> {
    match &f.default {
        Some(d) => Ok(Some(convert::to_engine(d, f.value_type, "default")?)),
        None => Ok(None),
    }
}

/// What an online answer may still allocate: the request's own bound and the server's charge.
struct AnswerBudget<'a> {
    spent: usize,
    max: usize,
    charge: &'a mut dyn FnMut(usize) -> bool,
    too_large: bool,
}

impl AnswerBudget<'_> {
    /// Whether `bytes` more fit (charged if they do).
    fn spend(&mut self, bytes: usize) -> bool {
        self.spent = self.spent.saturating_add(bytes);
        self.too_large = self.spent > self.max;
        !self.too_large && (self.charge)(bytes)
    }

    /// Why the last [`AnswerBudget::spend`] was refused.
    fn refusal(&self) -> ServiceError {
        if self.too_large {
            ServiceError::TooLarge(format!(
                "the answer is over {} bytes (ONLINE_ANSWER_BYTES_MAX, or less: the server's memory for requests in \
                 flight): ask for fewer entities or features per request",
                self.max
            ))
        } else {
            ServiceError::Overloaded(
                "overloaded: requests in flight hold the memory this answer needs; retry shortly".into(),
            )
        }
    }
}

/// Bytes of point-in-time join answers held in memory by default; past this they spill to a
/// temporary file (the spine's sort keys and 32 bytes per row stay in memory). quiverd sets it
/// to its memory budget / [`JOIN_MEMORY_SHARE_DIVISOR`] instead.
pub const JOIN_SPILL_BYTES: usize = 64 << 20;

/// Bytes a join's answer is expected to take per (row, feature) in memory: a status byte, an
/// event time, a length and a small cell. A join may hold `rows x features x` this in memory
/// (at least [`JOIN_ANSWER_BYTES_MIN`], at most the spill bound) and spills past it, so a
/// small join reserves little of the requests' memory and joins run side by side.
pub const JOIN_ANSWER_BYTES_PER_CELL: usize = 32;

/// The least answer memory a join holds before it spills.
pub const JOIN_ANSWER_BYTES_MIN: usize = 64 << 10;

/// quiverd holds a join's answers in memory up to its memory budget divided by this.
pub const JOIN_MEMORY_SHARE_DIVISOR: usize = 16;

/// A join's answers in the order they are computed (entity order), read back in spine order.
struct AnswerLog {
    mem: Vec<u8>,
    file: Option<std::fs::File>,
    file_len: u64,
    spill_at: usize,
}

impl AnswerLog {
    /// A log expecting about `expected` bytes (memory reserved up to the spill bound, so the
    /// buffer is not copied as it grows).
    fn new(spill_at: usize, expected: usize) -> Self {
        AnswerLog { mem: Vec::with_capacity(expected.min(spill_at)), file: None, file_len: 0, spill_at }
    }

    fn io(e: std::io::Error) -> ServiceError {
        ServiceError::Storage(quiver_storage::Error::Io { path: std::env::temp_dir().join("(join spill)"), source: e })
    }

    /// Appends a record; returns where it lies.
    fn append(&mut self, rec: &[u8]) -> Result<u64> {
        if !self.mem.is_empty() && self.mem.len() + rec.len() > self.spill_at {
            use std::io::Write;
            if self.file.is_none() {
                self.file = Some(tempfile::tempfile().map_err(Self::io)?);
            }
            if let Some(f) = self.file.as_mut() {
                f.write_all(&self.mem).map_err(Self::io)?;
            }
            self.file_len += self.mem.len() as u64;
            self.mem.clear();
        }
        let at = self.file_len + self.mem.len() as u64;
        let need = self.mem.len() + rec.len();
        if need > self.mem.capacity() {
            // Grow by doubling, but not past the spill bound: a doubled buffer could hold twice
            // what admission reserved. (A first record larger than the bound is kept whole.)
            let target = need.max((self.mem.capacity() * 2).min(self.spill_at));
            self.mem.reserve_exact(target - self.mem.len());
        }
        self.mem.extend_from_slice(rec);
        Ok(at)
    }

    /// The record at `at` (`len` bytes), from memory or the spill file (through `buf`).
    fn read<'a>(&'a self, at: u64, len: usize, buf: &'a mut Vec<u8>) -> Result<&'a [u8]> {
        if at >= self.file_len {
            let i = (at - self.file_len) as usize;
            return Ok(&self.mem[i..i + len]);
        }
        use std::os::unix::fs::FileExt;
        buf.resize(len, 0);
        let f = self.file.as_ref().ok_or_else(|| Self::io(std::io::Error::other("spill file missing")))?;
        f.read_exact_at(buf, at).map_err(Self::io)?;
        Ok(buf)
    }
}

/// A version as a join answers with it: its event time and its cell (or the cell's value part).
type Answered<'a> = Option<(EventTime, &'a [u8])>;

/// The status of an answer from its as-of winner without lookback (event time, encoded cell),
/// and the winner's event time and value part (none for a tombstone).
fn answer_of<'a>(
    winner: Answered<'a>,
    as_of: EventTime,
    f: &ResolvedFeature,
    has_default: bool,
) -> Result<(pb::FeatureStatus, Answered<'a>)> {
    let value = match winner {
        Some((e, cell)) => quiver_storage::cell::value_part(cell)
            .map_err(|w| corrupt(STORED_CELL, &format!("cell value: {w}")))?
            .map(|part| (e, part)),
        None => None,
    };
    Ok((status_of(value.map(|v| v.0), as_of, f, has_default), value))
}

/// Appends one answer: its status byte, then for PRESENT the event time and the cell's value
/// part (its version vector is not part of the answer). `winner` is the as-of winner without
/// lookback (event time, encoded cell); [`status_of`] decides the status.
fn encode_answer(
    rec: &mut Vec<u8>,
    winner: Option<(EventTime, &[u8])>,
    as_of: EventTime,
    f: &ResolvedFeature,
    has_default: bool,
) -> Result<()> {
    let (status, value) = answer_of(winner, as_of, f, has_default)?;
    rec.push(status as u8);
    if let (pb::FeatureStatus::Present, Some((e, part))) = (status, value) {
        push_present(rec, e.0, |r| r.extend_from_slice(part));
    }
    Ok(())
}

/// Appends a PRESENT answer's event time and value part (written by `part`), with the part's
/// length before it, as [`decode_answer`] reads them.
fn push_present(rec: &mut Vec<u8>, event_us: i64, part: impl FnOnce(&mut Vec<u8>)) {
    rec.extend_from_slice(&event_us.to_le_bytes());
    let at = rec.len();
    rec.extend_from_slice(&[0; 4]);
    part(rec);
    let len = (rec.len() - at - 4) as u32;
    rec[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

/// Where a join's corruption error lies: its answer log, or a stored cell it read (its table
/// passed its checksum, so this is a cell written wrong, not a flipped bit).
const ANSWER_LOG: &str = "(point-in-time join answers)";
const STORED_CELL: &str = "(a stored cell the point-in-time join read)";

/// A join's answer log, or a stored cell it read, that does not decode.
fn corrupt(file: &str, what: &str) -> ServiceError {
    ServiceError::Storage(quiver_storage::Error::Corruption { file: file.into(), offset: 0, what: what.to_string() })
}

/// Reads one answer written by [`encode_answer`] from the front of `r`.
fn decode_answer(r: &mut &[u8], default: Option<&Value>) -> Result<(pb::FeatureStatus, i64, Option<Value>)> {
    let bad = |what: &str| corrupt(ANSWER_LOG, what);
    let (&s, rest) = r.split_first().ok_or_else(|| bad("answer record ends early"))?;
    *r = rest;
    let status = pb::FeatureStatus::try_from(i32::from(s)).map_err(|_| bad("bad answer status"))?;
    match status {
        pb::FeatureStatus::Present => {
            if r.len() < 12 {
                return Err(bad("answer record ends early"));
            }
            let e = i64::from_le_bytes(r[..8].try_into().map_err(|_| bad("event time"))?);
            let n = u32::from_le_bytes(r[8..12].try_into().map_err(|_| bad("cell length"))?) as usize;
            let cell = r.get(12..12 + n).ok_or_else(|| bad("answer record ends early"))?;
            let value = quiver_storage::cell::decode_value_part(cell).map_err(|w| bad(&format!("cell value: {w}")))?;
            *r = &r[12 + n..];
            Ok((status, e, Some(value)))
        }
        pb::FeatureStatus::Defaulted => Ok((status, 0, default.cloned())),
        _ => Ok((status, 0, None)),
    }
}

/// Bytes one answer takes in a [`FixedAnswers`] record: its status, its event time (if the
/// join answers them) and its value's 8-byte slot, for a fixed-width type (`None` for the other
/// types, which go to an [`AnswerLog`]).
fn fixed_answer_bytes(t: pb::ValueType, event_times: bool) -> Option<usize> {
    matches!(t, pb::ValueType::Bool | pb::ValueType::Int64 | pb::ValueType::Float32 | pb::ValueType::Float64)
        .then_some(fixed_width(event_times))
}

/// Bytes of one answer in a [`FixedAnswers`] record.
const fn fixed_width(event_times: bool) -> usize {
    1 + 8 * event_times as usize + 8
}

/// A join run's answers for features whose values have a fixed width, one fixed-size record
/// per spine row in the order the run answered them (entity order): per feature, its status
/// byte, its event time (i64 LE; only if the join answers them) and its value in an 8-byte
/// little-endian slot (the served value where PRESENT, the default where DEFAULTED,
/// else zero, as [`push_value`] fills a protobuf column). Nothing is encoded or decoded per
/// answer, and a row's answers lie together for the gather in spine order.
struct FixedAnswers {
    types: Vec<pb::ValueType>,
    event_times: bool,
    buf: Vec<u8>,
    rows: usize,
    /// Answers of the current row so far.
    answered: usize,
}

impl FixedAnswers {
    /// Records for `rows` rows of answers to features of `types` (all fixed-width), with their
    /// event times if `event_times`.
    fn new(types: Vec<pb::ValueType>, event_times: bool, rows: usize) -> Self {
        let width = fixed_width(event_times);
        FixedAnswers { buf: Vec::with_capacity(rows * types.len() * width), types, event_times, rows: 0, answered: 0 }
    }

    /// The current row's next answer (features in order): a status, an event time and the
    /// value that goes with it.
    fn push(&mut self, status: pb::FeatureStatus, event_us: i64, value: Option<&Value>) {
        // A value of another type than the feature's is zero, as in push_value.
        let t = self.types[self.answered];
        self.answered += 1;
        let slot: [u8; 8] = match (t, value) {
            (pb::ValueType::Bool, Some(Value::Bool(x))) => u64::from(*x).to_le_bytes(),
            (pb::ValueType::Int64, Some(Value::Int64(x))) => x.to_le_bytes(),
            (pb::ValueType::Float32, Some(Value::Float32(x))) => u64::from(x.to_bits()).to_le_bytes(),
            (pb::ValueType::Float64, Some(Value::Float64(x))) => x.to_le_bytes(),
            _ => [0; 8],
        };
        self.buf.push(status as u8);
        if self.event_times {
            self.buf.extend_from_slice(&event_us.to_le_bytes());
        }
        self.buf.extend_from_slice(&slot);
    }

    /// Ends the current row (one answer per feature pushed); returns its index.
    fn end_row(&mut self) -> usize {
        debug_assert_eq!(self.answered, self.types.len(), "answers in a row");
        self.answered = 0;
        self.rows += 1;
        self.rows - 1
    }

    /// Appends row `i`'s answers to `out` (one column per feature, as [`column`] made them;
    /// their event times only if this join answers them).
    fn copy_row(&self, i: usize, out: &mut [pb::FeatureColumn]) -> Result<()> {
        let width = fixed_width(self.event_times);
        let stride = self.types.len() * width;
        let rec = self.buf.get(i * stride..(i + 1) * stride).ok_or_else(|| corrupt(ANSWER_LOG, "no such row"))?;
        let word = |b: &[u8]| {
            let mut w = [0u8; 8];
            w.copy_from_slice(b);
            w
        };
        for ((a, t), col) in rec.chunks_exact(width).zip(&self.types).zip(out) {
            let status =
                pb::FeatureStatus::try_from(i32::from(a[0])).map_err(|_| corrupt(ANSWER_LOG, "bad answer status"))?;
            col.statuses.push(status as i32);
            if self.event_times {
                col.event_times_us.push(i64::from_le_bytes(word(&a[1..9])));
            }
            let slot = word(&a[width - 8..]);
            // A Value of the feature's own type: so a stored value of another type was written
            // as zero (and is read back as zero), as `push_value` treats it.
            match t {
                pb::ValueType::Bool => col.bool_values.push(u64::from_le_bytes(slot) != 0),
                pb::ValueType::Int64 => col.int64_values.push(i64::from_le_bytes(slot)),
                pb::ValueType::Float32 => col.float32_values.push(f32::from_bits(u64::from_le_bytes(slot) as u32)),
                pb::ValueType::Float64 => col.float64_values.push(f64::from_le_bytes(slot)),
                _ => return Err(corrupt(ANSWER_LOG, "a variable-width answer among fixed ones")),
            }
        }
        Ok(())
    }
}

/// Where one join run keeps its answers until they are streamed in spine order: as fixed-size
/// records when every feature has a fixed-width type and they fit the run's share of the
/// join's memory, else as encoded records in an [`AnswerLog`] (which spills to a temporary
/// file).
enum RunStore {
    Fixed(FixedAnswers),
    Log { log: AnswerLog, rec: Vec<u8> },
}

impl RunStore {
    /// A store for `rows` answers to each of `features` (with their event times if
    /// `event_times`) within `spill_at` bytes of memory.
    fn new(features: &[ResolvedFeature], event_times: bool, rows: usize, spill_at: usize) -> Self {
        let bytes: Option<usize> = features.iter().map(|f| fixed_answer_bytes(f.value_type, event_times)).sum();
        if bytes.is_some_and(|b| b.saturating_mul(rows) <= spill_at) {
            let types = features.iter().map(|f| f.value_type).collect();
            return RunStore::Fixed(FixedAnswers::new(types, event_times, rows));
        }
        // A status byte per answer, and for values an event time, a length and a small cell.
        RunStore::Log { log: AnswerLog::new(spill_at, rows * features.len() * 24), rec: Vec::new() }
    }

    /// The current row's next answer (features in order) from its as-of winner (see [`encode_answer`]).
    fn winner(
        &mut self,
        winner: Option<(EventTime, &[u8])>,
        as_of: EventTime,
        f: &ResolvedFeature,
        default: Option<&Value>,
    ) -> Result<()> {
        match self {
            RunStore::Log { rec, .. } => encode_answer(rec, winner, as_of, f, default.is_some()),
            RunStore::Fixed(c) => {
                let (status, value) = answer_of(winner, as_of, f, default.is_some())?;
                match (status, value) {
                    (pb::FeatureStatus::Present, Some((e, part))) => {
                        let v = quiver_storage::cell::decode_value_part(part)
                            .map_err(|w| corrupt(STORED_CELL, &format!("cell value: {w}")))?;
                        c.push(status, e.0, Some(&v));
                    }
                    (pb::FeatureStatus::Defaulted, _) => c.push(status, 0, default),
                    _ => c.push(status, 0, None),
                }
                Ok(())
            }
        }
    }

    /// The current row's next answer as a status, event time and value (an
    /// aggregate's; see [`encode_value_answer`]).
    fn value(&mut self, answer: (pb::FeatureStatus, i64, Option<Value>), default: Option<&Value>) {
        match self {
            RunStore::Log { rec, .. } => encode_value_answer(rec, answer),
            RunStore::Fixed(c) => match answer {
                (pb::FeatureStatus::Present, e, v) => c.push(pb::FeatureStatus::Present, e, v.as_ref()),
                (pb::FeatureStatus::Defaulted, _, _) => c.push(pb::FeatureStatus::Defaulted, 0, default),
                (s, _, _) => c.push(s, 0, None),
            },
        }
    }

    /// Ends the current row: returns where its answers lie, `(offset, length)` in the log, or
    /// `(index, 0)` among the fixed records.
    fn end_row(&mut self) -> Result<(u64, u32)> {
        match self {
            RunStore::Fixed(c) => Ok((c.end_row() as u64, 0)),
            RunStore::Log { log, rec } => {
                let at = log.append(rec)?;
                let len = rec.len() as u32;
                rec.clear();
                Ok((at, len))
            }
        }
    }

    /// Appends the answers of the row at `(at, len)` to `out`, one column per feature.
    fn copy_row(
        &self,
        (at, len): (u64, u32),
        buf: &mut Vec<u8>,
        features: &[ResolvedFeature],
        defaults: &[Option<Value>],
        out: &mut [pb::FeatureColumn],
    ) -> Result<()> {
        match self {
            RunStore::Fixed(c) => c.copy_row(at as usize, out)?,
            RunStore::Log { log, .. } => {
                let mut r = log.read(at, len as usize, buf)?;
                for (j, f) in features.iter().enumerate() {
                    let (status, event_us, value) = decode_answer(&mut r, defaults[j].as_ref())?;
                    let col = &mut out[j];
                    col.statuses.push(status as i32);
                    col.event_times_us.push(event_us);
                    push_value(col, f.value_type, value.as_ref());
                }
            }
        }
        Ok(())
    }

    /// Bytes spilled to disk.
    fn spilled(&self) -> u64 {
        match self {
            RunStore::Fixed(_) => 0,
            RunStore::Log { log, .. } => log.file_len,
        }
    }
}

/// Where each requested feature's versions lie among one entity's gathered versions (a
/// [`quiver_storage::EntityVersions`], in key order: one run per feature, event time
/// descending, then system time descending).
struct PairHistory {
    runs: Vec<std::ops::Range<usize>>,
}

impl PairHistory {
    fn new(features: usize) -> Self {
        PairHistory { runs: vec![0..0; features] }
    }

    /// Finds the runs of the `distinct` (sorted) features in `versions`.
    fn index(&mut self, versions: &quiver_storage::EntityVersions<'_>, distinct: &[FeatureId]) {
        for r in &mut self.runs {
            *r = 0..0;
        }
        for (f, run) in versions.runs() {
            if let Ok(d) = distinct.binary_search(&f) {
                self.runs[d] = run;
            }
        }
    }

    /// The winner of `value_at(as_of, known_at)` without lookback (tombstones included) for
    /// feature slot `d`: the first version in key order at or before `as_of` that was known,
    /// as its event time and encoded cell.
    fn winner<'a>(
        &self,
        versions: &quiver_storage::EntityVersions<'a>,
        d: usize,
        as_of: EventTime,
        known_at: SystemTime,
    ) -> Option<(EventTime, &'a [u8])> {
        let run = &versions.versions()[self.runs[d].clone()];
        quiver_storage::asof::winner_in_sorted(run, |v| (v.event_time, v.system_time), as_of, known_at)
            .map(|v| (v.event_time, versions.cell(v)))
    }

    /// `aggregate_at` (`storage/READS.md`) of feature slot `d` (the aggregate's source) with
    /// the window of `spec` ending at each of `at` (any order), all at `known_at`, in one pass
    /// over the source's versions ([`quiver_storage::agg::aggregate_many`]).
    fn aggregate_many(
        &self,
        versions: &quiver_storage::EntityVersions<'_>,
        d: usize,
        spec: &AggregateSpec,
        at: &[EventTime],
        known_at: SystemTime,
    ) -> Result<Vec<AggAnswer>> {
        let run = &versions.versions()[self.runs[d].clone()];
        quiver_storage::agg::aggregate_many(
            run,
            |v| (v.event_time, v.system_time),
            |v| stored_value(versions.cell(v)),
            spec.agg,
            spec.source_type,
            spec.width_us,
            known_at,
            at,
        )
    }
}

/// Why a write to `group`'s feature `name` is refused when `name` is one of its aggregates
/// (they are not among a group's written features).
pub fn aggregate_refusal(registry: &Registry, group: &str, name: &str) -> Option<String> {
    let a = registry.resolve(&format!("{group}:{name}")).ok()?.aggregate?;
    Some(format!("{group}:{name} is an aggregate of {0}: aggregates are computed, write {0} instead", a.source))
}

/// The value of a stored cell a read gathered (`None`: a tombstone).
fn stored_value(cell: &[u8]) -> Result<Option<Value>> {
    let bad = |w: &str| corrupt(STORED_CELL, &format!("cell value: {w}"));
    let part = quiver_storage::cell::value_part(cell).map_err(bad)?;
    part.map(|p| quiver_storage::cell::decode_value_part(p).map_err(bad)).transpose()
}

/// The served status, event time and value of an aggregate's answer: PRESENT with its value
/// and the newest event time in its window (0 for an empty one); OVERFLOW for an int64 sum
/// outside int64; an absent answer (the mean, min or max of an empty window) is the default
/// (DEFAULTED) when there is one, else NOT_FOUND.
fn aggregate_status(
    answer: AggAnswer,
    t: pb::ValueType,
    default: Option<&Value>,
) -> (pb::FeatureStatus, i64, Option<Value>) {
    let event_us = answer.newest.map_or(0, |e| e.0);
    match answer.value {
        AggValue::Overflow => (pb::FeatureStatus::Overflow, 0, None),
        value => match convert::engine_type(t).and_then(|t| value.into_value(t)) {
            Some(v) => (pb::FeatureStatus::Present, event_us, Some(v)),
            None if default.is_some() => (pb::FeatureStatus::Defaulted, 0, default.cloned()),
            None => (pb::FeatureStatus::NotFound, 0, None),
        },
    }
}

/// Writes a join answer with its status, event time and value as [`decode_answer`] reads it
/// (aggregates; plain features go through [`encode_answer`]).
fn encode_value_answer(rec: &mut Vec<u8>, (status, event_us, value): (pb::FeatureStatus, i64, Option<Value>)) {
    rec.push(status as u8);
    if let (pb::FeatureStatus::Present, Some(v)) = (status, value) {
        push_present(rec, event_us, |r| quiver_storage::cell::encode_value_part(&v, r));
    }
}

/// Spine rows from which a join checks and sorts its spine in parts, one per join thread.
pub const SPINE_ROWS_PER_PART_MIN: usize = 1 << 16;

/// A spine row's place in the join's sort (24 bytes): its entity key's first 16 bytes (as two
/// big-endian integers, so integer order is byte order, zero-padded) and length, and its row.
#[derive(Debug, Clone, Copy)]
struct SpineKey {
    head: (u64, u64),
    len: u32,
    row: u32,
}

impl SpineKey {
    const HEAD: usize = 16;

    fn of(key: &[u8], row: u32) -> SpineKey {
        let mut b = [0u8; Self::HEAD];
        let n = key.len().min(Self::HEAD);
        b[..n].copy_from_slice(&key[..n]);
        let (hi, lo) = b.split_at(8);
        let word = |w: &[u8]| u64::from_be_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        SpineKey { head: (word(hi), word(lo)), len: key.len() as u32, row }
    }

    /// Byte order of the two rows' keys (`key` gives a row's key). Equal heads with both keys
    /// within them: each key is its zero-padded head, so the shorter is a prefix of the longer
    /// and sorts first. Only a tie involving a longer key compares the keys themselves.
    fn cmp<'k>(&self, o: &SpineKey, key: impl Fn(u32) -> &'k [u8]) -> std::cmp::Ordering {
        self.head.cmp(&o.head).then_with(|| {
            if self.len as usize <= Self::HEAD && o.len as usize <= Self::HEAD {
                self.len.cmp(&o.len)
            } else {
                key(self.row).cmp(key(o.row))
            }
        })
    }
}

/// The merge of two sorted lists.
fn merge_sorted<T: Copy>(a: &[T], b: &[T], cmp: impl Fn(&T, &T) -> std::cmp::Ordering) -> Vec<T> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if cmp(&b[j], &a[i]).is_lt() {
            out.push(b[j]);
            j += 1;
        } else {
            out.push(a[i]);
            i += 1;
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

/// Logs (at debug) when a join's answer has been streamed, however it ends.
struct Streamed(std::time::Instant);

impl Drop for Streamed {
    fn drop(&mut self) {
        tracing::debug!(elapsed = ?self.0.elapsed(), "point-in-time join streamed");
    }
}

/// The error of a join whose worker thread panicked, with the panic's message.
fn worker_panicked(payload: &(dyn std::any::Any + Send)) -> ServiceError {
    let why = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    ServiceError::Storage(quiver_storage::Error::PreviousError(format!("internal: a join worker panicked: {why}")))
}

/// What one thread of a join produced: its answers and, per spine row it answered, `(row,
/// offset, length)` of the row's answers in them (see [`RunStore::end_row`]).
type RunAnswers = (RunStore, Vec<(u32, u64, u32)>);

/// Threads a point-in-time join reads the engine with: one per core, at most
/// [`JOIN_THREADS_MAX`].
fn join_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(JOIN_THREADS_MAX)
}

/// Most threads one point-in-time join uses.
pub const JOIN_THREADS_MAX: usize = 8;

/// Rows per streamed chunk of a point-in-time join.
pub const HISTORICAL_CHUNK_ROWS: usize = 4096;

/// A point-in-time join's parameters, whatever carries its spine (`GetHistoricalFeatures`'s
/// protobuf rows, or an Arrow table through Flight).
#[derive(Debug, Clone, Copy)]
pub struct JoinSpec<'a> {
    /// The entity type of the spine's keys.
    pub entity_type: &'a str,
    /// "group:feature" or "group@3:feature", in output order.
    pub features: &'a [String],
    /// Only versions the store knew at this system time (None: no limit).
    pub known_at: Option<&'a prost_types::Timestamp>,
    /// Each row sees only versions known by its own time.
    pub strict_availability: bool,
    /// Serve registered defaults where nothing is within the TTL.
    pub use_defaults: bool,
    /// Answer each value's event time (`FeatureColumn.event_times_us`). Without it the join
    /// need not fill that list, and keeps less per answer (for a caller that sends only values).
    pub event_times: bool,
}

impl<'a> JoinSpec<'a> {
    /// The join a `GetHistoricalFeatures` request asks for (event times answered).
    pub fn of(req: &'a pb::GetHistoricalFeaturesRequest) -> Self {
        JoinSpec {
            entity_type: &req.entity_type,
            features: &req.features,
            known_at: req.known_at.as_ref(),
            strict_availability: req.strict_availability,
            use_defaults: req.use_defaults,
            event_times: true,
        }
    }
}

/// Where a join's spine rows come from. `check` turns rows `range` into (encoded entity key,
/// time) pairs against the entity type, refusing a bad row with INVALID_ARGUMENT naming it; the
/// join calls it on disjoint ranges from several threads.
pub trait SpineRows: Sync {
    /// Rows in the spine.
    fn len(&self) -> usize;
    /// No rows.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Rows `range`, checked and encoded.
    fn check(&self, et: &pb::EntityType, range: std::ops::Range<usize>) -> Result<Vec<(Vec<u8>, EventTime)>>;
}

impl SpineRows for Vec<pb::SpineRow> {
    fn len(&self) -> usize {
        Vec::len(self)
    }

    fn check(&self, et: &pb::EntityType, range: std::ops::Range<usize>) -> Result<Vec<(Vec<u8>, EventTime)>> {
        let mut rows = Vec::with_capacity(range.len());
        for i in range {
            let r = &self[i];
            let entity =
                r.entity.as_ref().ok_or_else(|| ServiceError::Invalid(format!("spine row {i}: entity is required")))?;
            let key =
                convert::entity_key(et, entity).map_err(|e| ServiceError::Invalid(format!("spine row {i}: {e}")))?;
            let t = convert::event_time(r.timestamp.as_ref(), &format!("spine row {i}: timestamp"))?;
            rows.push((key, t));
        }
        Ok(rows)
    }
}
/// Most spine rows in one point-in-time join.
pub const SPINE_ROWS_MAX: usize = 10_000_000;
/// Versions per streamed chunk of a history scan.
pub const SCAN_CHUNK_VERSIONS: usize = 1024;
/// Most versions one history scan returns.
pub const SCAN_VERSIONS_MAX: u64 = 1_000_000;

/// A validated write, ready to commit.
struct Prepared<'a> {
    batch: WriteBatch,
    /// The compare-and-swap expectations, and the `group:feature` each names.
    expect: Vec<Expectation>,
    names: Vec<String>,
    /// Each row's group and event time, for feature health once committed.
    written: Vec<Written<'a>>,
    /// Each row's encoded entity key (on a sharded node only).
    keys: Vec<Vec<u8>>,
}

/// The feature service of one node.
#[derive(Debug)]
pub struct Features {
    registry: Arc<Registry>,
    resolutions: Mutex<ResolutionCache>,
    resolution_hasher: std::collections::hash_map::RandomState,
    join_spill_bytes: usize,
    join_threads: usize,
    db: Arc<Db>,
    default_durability: Durability,
    /// Where writes and online answers are recorded for monitoring (`None`: not recorded).
    health: Option<Arc<Health>>,
    /// Where sampled online answers are logged (`None`: not logged).
    served_log: Option<Arc<crate::servedlog::ServedLog>>,
    /// Where sampled lookups are offered for shadow reads (`None`: none).
    shadow: Option<Arc<crate::shadow::Shadow>>,
    /// The slot map this node serves under (`None`: not sharded, it owns every entity).
    cluster: Option<Arc<crate::cluster::Cluster>>,
    #[cfg(feature = "testing")]
    before_commit: Mutex<Option<Arc<TestHook>>>,
}

/// A test's code run between a write's preparation and its commit.
#[cfg(feature = "testing")]
pub struct TestHook(pub Box<dyn Fn() + Send + Sync>);

#[cfg(feature = "testing")]
impl std::fmt::Debug for TestHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestHook")
    }
}

/// Distinct (entity type, feature list) resolutions kept; the cache is cleared when full.
pub const RESOLUTIONS_CACHED_MAX: usize = 1024;

/// A request's entity type and features, checked, with their defaults converted.
#[derive(Debug)]
struct Resolution {
    entity_type: pb::EntityType,
    refs: Vec<String>,
    features: Vec<ResolvedFeature>,
    defaults: Vec<Option<Value>>,
    /// The distinct feature ids of the features that are not aggregates, in order of first
    /// mention (a feature named twice is read once).
    distinct: Vec<FeatureId>,
    /// Per requested feature: its index in `distinct` (`usize::MAX` for an aggregate).
    slot: Vec<usize>,
    /// Per distinct feature: the last requested feature it answers (its value moves there).
    last_use: Vec<usize>,
    /// Per requested feature: where its served statuses are counted (empty: not counted).
    served: Vec<Arc<ServedTrack>>,
    /// Per requested feature: the share of entities whose answers are logged (empty: none).
    log_rates: Vec<f64>,
}

impl Resolution {
    fn new(
        entity_type: pb::EntityType,
        refs: Vec<String>,
        features: Vec<ResolvedFeature>,
        health: Option<&Health>,
        served_log: Option<&crate::servedlog::ServedLog>,
    ) -> Result<Resolution> {
        let log_rates: Vec<f64> = match served_log {
            Some(log) => features.iter().map(|f| f.log_sample_rate.unwrap_or(log.default_rate())).collect(),
            None => Vec::new(),
        };
        let log_rates = if log_rates.iter().any(|&r| r > 0.0) { log_rates } else { Vec::new() };
        let served =
            health.map_or_else(Vec::new, |h| features.iter().map(|f| h.served(&f.group, &f.feature)).collect());
        let defaults = features.iter().map(default_of).collect::<Result<Vec<_>>>()?;
        let mut distinct: Vec<FeatureId> = Vec::with_capacity(features.len());
        let mut seen: HashMap<FeatureId, usize> = HashMap::with_capacity(features.len());
        // Aggregates are not in the batch read (they read their sources' windows).
        let slot: Vec<usize> = features
            .iter()
            .map(|f| {
                if f.aggregate.is_some() {
                    return usize::MAX;
                }
                *seen.entry(f.id).or_insert_with(|| {
                    distinct.push(f.id);
                    distinct.len() - 1
                })
            })
            .collect();
        let mut last_use = vec![0; distinct.len()];
        for (j, &k) in slot.iter().enumerate().filter(|(_, &k)| k != usize::MAX) {
            last_use[k] = j;
        }
        Ok(Resolution { entity_type, refs, features, defaults, distinct, slot, last_use, served, log_rates })
    }
}

/// Resolutions by a hash of (entity type, refs), valid for one registry generation.
#[derive(Debug, Default)]
struct ResolutionCache {
    generation: u64,
    map: std::collections::HashMap<u64, Arc<Resolution>>,
}

impl Features {
    /// A service over `registry` and its engine; writes that do not say how durable they must
    /// be get `default_durability`.
    pub fn new(registry: Arc<Registry>, default_durability: Durability) -> Self {
        let db = registry.db().clone();
        Features {
            registry,
            db,
            resolutions: Mutex::new(ResolutionCache::default()),
            resolution_hasher: std::collections::hash_map::RandomState::new(),
            join_spill_bytes: JOIN_SPILL_BYTES,
            join_threads: join_threads(),
            default_durability,
            health: None,
            served_log: None,
            shadow: None,
            cluster: None,
            #[cfg(feature = "testing")]
            before_commit: Mutex::new(None),
        }
    }

    /// Runs `hook` in every write after the service has prepared it and before the engine
    /// commits it: tests race other commits (a peer's replicated version) into that window.
    #[cfg(feature = "testing")]
    pub fn set_before_commit(&self, hook: Option<TestHook>) {
        *self.before_commit.lock() = hook.map(Arc::new);
    }

    /// The registry this service resolves features in.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The engine this service reads and writes.
    pub fn db(&self) -> &Arc<Db> {
        &self.db
    }

    /// Bytes of answers a join holds in memory before it spills, at most.
    pub fn join_spill_bytes(&self) -> usize {
        self.join_spill_bytes
    }

    /// Bytes of answers a join of `rows` spine rows (at most) and `features` features holds in
    /// memory before it spills: what admission reserves for them (see
    /// [`JOIN_ANSWER_BYTES_PER_CELL`]).
    pub fn join_answer_bytes(&self, rows: usize, features: usize) -> usize {
        rows.saturating_mul(features)
            .saturating_mul(JOIN_ANSWER_BYTES_PER_CELL)
            .max(JOIN_ANSWER_BYTES_MIN)
            .min(self.join_spill_bytes)
    }

    /// The same service with join answers spilling to disk past `bytes` (tests use tiny
    /// bounds to cover the spill path).
    pub fn with_join_spill_bytes(mut self, bytes: usize) -> Self {
        self.join_spill_bytes = bytes.max(1);
        self
    }

    /// The same service recording writes and online answers in `health`.
    pub fn with_health(mut self, health: Arc<Health>) -> Self {
        self.health = Some(health);
        self
    }

    /// The same service logging sampled online answers to `log`.
    pub fn with_served_log(mut self, log: Arc<crate::servedlog::ServedLog>) -> Self {
        self.served_log = Some(log);
        self
    }

    /// The same service serving only the entities `cluster`'s slot map gives this node.
    pub fn with_cluster(mut self, cluster: Arc<crate::cluster::Cluster>) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// Whether this node serves only the slots a slot map gives it.
    pub fn is_sharded(&self) -> bool {
        self.cluster.is_some()
    }

    /// Refuses the request unless this node owns every entity of `keys` (always, when it is not
    /// sharded): one map decides for the whole request.
    pub(crate) fn check_owned<'a>(&self, keys: impl IntoIterator<Item = &'a [u8]>) -> Result<()> {
        let Some(cluster) = &self.cluster else { return Ok(()) };
        let map = cluster.map();
        keys.into_iter().try_for_each(|k| cluster.check(&map, k)).map_err(ServiceError::NotServed)
    }

    /// Whether this node owns `key` under its map now (always, when it is not sharded).
    pub(crate) fn owns(&self, key: &[u8]) -> bool {
        self.cluster.as_ref().is_none_or(|c| c.check(&c.map(), key).is_ok())
    }

    /// On a sharded node, checks that it may write `keys` now (it owns them, and no fenced
    /// move holds them) and returns the guard the write holds until it has committed
    /// (`server/CLUSTER.md` §5). `None` on an unsharded node.
    pub(crate) fn write_guard(&self, keys: &[Vec<u8>]) -> Result<Option<parking_lot::RwLockReadGuard<'_, ()>>> {
        let Some(cluster) = &self.cluster else { return Ok(None) };
        cluster.write_guard(keys.iter().map(Vec::as_slice)).map(Some).map_err(ServiceError::NotServed)
    }

    /// Where the entities of a request go when this node forwards (`server/CLUSTER.md` §4):
    /// `None` when it owns every one of `keys`, or is not sharded, or refuses rather than
    /// forwards; else the split, under one map. A key whose owner has no address refuses the
    /// request as [`Features::check_owned`] does.
    pub(crate) fn route(&self, keys: &[Vec<u8>]) -> Result<Option<crate::cluster::Split>> {
        let Some(cluster) = self.cluster.as_ref().filter(|c| c.config().forward) else { return Ok(None) };
        let split = cluster.split(keys.iter().map(Vec::as_slice)).map_err(ServiceError::NotServed)?;
        Ok((!split.remote.is_empty()).then_some(split))
    }

    /// The encoded entity keys of an online lookup, in request order, once the whole lookup is
    /// checked as [`Features::get_online_charged`] checks it (its limits, its features): what a
    /// forwarding node does before it splits a lookup over shards.
    pub(crate) fn online_keys(&self, req: &pb::GetOnlineFeaturesRequest) -> Result<Vec<Vec<u8>>> {
        check_online_size(req)?;
        let resolution = self.resolve_features(&req.entity_type, &req.features)?;
        let et = &resolution.entity_type;
        Ok(req.entities.iter().map(|k| convert::entity_key(et, k)).collect::<std::result::Result<_, _>>()?)
    }

    /// The encoded entity keys of a join's spine, in spine order, once the whole join is
    /// checked as [`Features::join`] checks it (its size, its features, every spine row), but
    /// not who owns the entities: what a forwarding node does before it splits a join.
    pub(crate) fn join_keys(&self, req: &pb::GetHistoricalFeaturesRequest) -> Result<Vec<Vec<u8>>> {
        if req.spine.len() > SPINE_ROWS_MAX {
            return Err(ServiceError::TooLarge(format!("spine has more than {SPINE_ROWS_MAX} rows")));
        }
        let spec = JoinSpec::of(req);
        let (resolution, _) = self.join_resolution(&spec)?;
        Ok(req.spine.check(&resolution.entity_type, 0..req.spine.len())?.into_iter().map(|(k, _)| k).collect())
    }

    /// The answer to `req` when none of it could be read in time (its part was forwarded and
    /// the owner did not answer by the deadline): every cell UNAVAILABLE, or with
    /// `default_unavailable` DEFAULTED with its registered default (the type's zero value when
    /// it has none), as a deadline does on one node.
    pub(crate) fn unread_answer(&self, req: &pb::GetOnlineFeaturesRequest) -> Result<pb::GetOnlineFeaturesResponse> {
        let resolution = self.resolve_features(&req.entity_type, &req.features)?;
        let n = req.entities.len();
        let mut columns = Vec::with_capacity(req.features.len());
        for (j, (f, reference)) in resolution.features.iter().zip(&req.features).enumerate() {
            let mut col = column(f, reference, n);
            let (status, value) = if req.default_unavailable {
                (pb::FeatureStatus::Defaulted, resolution.defaults[j].as_ref())
            } else {
                (pb::FeatureStatus::Unavailable, None)
            };
            for _ in 0..n {
                col.statuses.push(status as i32);
                col.event_times_us.push(0);
                push_value(&mut col, f.value_type, value);
            }
            columns.push(col);
        }
        Ok(pb::GetOnlineFeaturesResponse { columns })
    }

    /// The encoded entity key of a history scan.
    pub(crate) fn scan_key(&self, req: &pb::ScanHistoryRequest) -> Result<Vec<u8>> {
        let et = self.registry.entity_type(&req.entity_type)?;
        let entity = req.entity.as_ref().ok_or_else(|| ServiceError::Invalid("entity is required".into()))?;
        Ok(convert::entity_key(&et, entity)?)
    }

    /// This node's id in its sharded region (`None` when it is not sharded).
    pub fn node_id(&self) -> Option<String> {
        self.cluster.as_ref().map(|c| c.config().node.clone())
    }

    /// Whether this node forwards what it does not own (a sharded node, unless `--no-forward`).
    pub fn forwards(&self) -> bool {
        self.cluster.as_ref().is_some_and(|c| c.config().forward)
    }

    /// The same service offering sampled lookups to `shadow` (none if it shadows no group).
    pub fn with_shadow(mut self, shadow: Arc<crate::shadow::Shadow>) -> Self {
        self.shadow = (!shadow.is_empty()).then_some(shadow);
        self
    }

    /// An online lookup that is neither logged, counted in the feature health nor shadowed:
    /// the shadow reads of a staged version.
    pub fn get_online_quiet(
        &self,
        req: &pb::GetOnlineFeaturesRequest,
        now_us: i64,
    ) -> Result<pb::GetOnlineFeaturesResponse> {
        let (et, features) = self.resolve_uncached(&req.entity_type, &req.features, SystemTime::MAX)?;
        let resolution = Resolution::new(et, req.features.clone(), features, None, None)?;
        let mut yes = |_| true;
        self.answer_online(req, &resolution, now_us, ONLINE_ANSWER_BYTES_MAX, &mut yes, None, None, false)
    }

    /// The same service with joins read by `threads` threads (at least 1, at most
    /// [`JOIN_THREADS_MAX`]).
    pub fn with_join_threads(mut self, threads: usize) -> Self {
        self.join_threads = threads.clamp(1, JOIN_THREADS_MAX);
        self
    }

    /// `GetOnlineFeatures`, with `now_us` the server's clock (used when the request has no
    /// `as_of`).
    pub fn get_online(&self, req: &pb::GetOnlineFeaturesRequest, now_us: i64) -> Result<pb::GetOnlineFeaturesResponse> {
        self.get_online_charged(req, now_us, ONLINE_ANSWER_BYTES_MAX, &mut |_| true, None, None)
    }

    /// [`Features::get_online`], charging the answer's memory to `charge` as it is read and as
    /// its columns are built; `Overloaded` when a charge is refused, `TooLarge` past
    /// `answer_max` bytes (at most [`ONLINE_ANSWER_BYTES_MAX`]). With a `deadline`, features
    /// the hot tier does not hold are read only while that is expected to end before it; the
    /// others come back UNAVAILABLE (or DEFAULTED, if the request asks), never as an error.
    pub fn get_online_charged(
        &self,
        req: &pb::GetOnlineFeaturesRequest,
        now_us: i64,
        answer_max: usize,
        charge: &mut dyn FnMut(usize) -> bool,
        deadline: Option<std::time::Instant>,
        request_id: Option<&str>,
    ) -> Result<pb::GetOnlineFeaturesResponse> {
        check_online_size(req)?;
        let resolution = self.resolve_features(&req.entity_type, &req.features)?;
        self.answer_online(req, &resolution, now_us, answer_max, charge, deadline, request_id, true)
    }

    /// Answers an online lookup with its features resolved; `shadow`: offer it for shadow reads.
    #[allow(clippy::too_many_arguments)]
    fn answer_online(
        &self,
        req: &pb::GetOnlineFeaturesRequest,
        resolution: &Resolution,
        now_us: i64,
        answer_max: usize,
        charge: &mut dyn FnMut(usize) -> bool,
        deadline: Option<std::time::Instant>,
        request_id: Option<&str>,
        shadow: bool,
    ) -> Result<pb::GetOnlineFeaturesResponse> {
        let (n, m) = (req.entities.len(), req.features.len());
        let (et, features) = (&resolution.entity_type, &resolution.features);
        let keys: Vec<Vec<u8>> =
            req.entities.iter().map(|k| convert::entity_key(et, k)).collect::<std::result::Result<_, _>>()?;
        self.check_owned(keys.iter().map(Vec::as_slice))?;
        let as_of = match &req.as_of {
            Some(ts) => convert::micros(ts, "as_of")?,
            None => now_us,
        };
        // One batch read of every distinct pair from one view, hot tier first; TTLs apply per
        // feature. A feature asked for twice is read once.
        let (ids, slot, last_use) = (&resolution.distinct, &resolution.slot, &resolution.last_use);
        let d = ids.len();
        let q = AsOf { as_of: EventTime(as_of), known_at: SystemTime::MAX, lookback_us: None };
        let mut budget = AnswerBudget { spent: 0, max: answer_max, charge, too_large: false };
        let read = self.db.multi_version_at_within(&keys, ids, q, &mut |bytes| budget.spend(bytes), deadline);
        let quiver_storage::BatchRead { mut versions, unread, known_at } = match read {
            Err(quiver_storage::Error::OverBudget(_)) => return Err(budget.refusal()),
            r => r?,
        };
        // Aggregates from the view the batch read saw (a later snapshot, read at its known_at).
        let mut aggregates =
            self.online_aggregates(&keys, features, EventTime(as_of), known_at, deadline, &mut budget)?;
        if unread.contains(&true) {
            if let Some(h) = &self.health {
                h.cut_short();
            }
        }
        // The columns are charged as they are built: the values they copy, and each cell's
        // status, event time and value slot.
        const CELL_BYTES: usize = 4 + 8 + std::mem::size_of::<String>();
        const CHARGE_EVERY: usize = 256 << 10;
        let mut pending = 0usize;
        let mut columns = Vec::with_capacity(m);
        for (j, (f, reference)) in features.iter().zip(&req.features).enumerate() {
            let mut col = column(f, reference, n);
            let default = &resolution.defaults[j];
            let k = slot[j];
            let mut counts: ServedCounts = Default::default();
            for i in 0..n {
                // An aggregate's answer (`None`: not read, the deadline was near), or a plain
                // feature's winning version.
                let (unread_cell, answer) = match aggregates.get_mut(j).and_then(Option::as_mut) {
                    Some(answers) => {
                        let a = answers[i].take();
                        (a.is_none(), a.map(|a| aggregate_status(a, f.value_type, default.as_ref())))
                    }
                    None => {
                        let v = match versions.get_mut(i * d + k) {
                            Some(v) if last_use[k] == j => v.take(),
                            Some(v) => v.clone(),
                            None => None,
                        };
                        let unread = unread.get(i * d + k).copied().unwrap_or(false);
                        (unread, Some(cell_status(v, EventTime(as_of), f, default.as_ref())))
                    }
                };
                let (status, event_us, value) = if unread_cell {
                    if req.default_unavailable {
                        (pb::FeatureStatus::Defaulted, 0, default.clone())
                    } else {
                        (pb::FeatureStatus::Unavailable, 0, None)
                    }
                } else {
                    match answer.unwrap_or((pb::FeatureStatus::NotFound, 0, None)) {
                        // Without a registered default, the type's zero value (`None` here).
                        (pb::FeatureStatus::NotFound | pb::FeatureStatus::Stale, _, _) if req.default_missing => {
                            (pb::FeatureStatus::Defaulted, 0, None)
                        }
                        answer => answer,
                    }
                };
                pending += CELL_BYTES + value.as_ref().map_or(0, Value::heap_bytes);
                if pending >= CHARGE_EVERY {
                    if !budget.spend(pending) {
                        return Err(budget.refusal());
                    }
                    pending = 0;
                }
                if let Some(s) = status_index(status) {
                    counts[s] += 1;
                }
                col.statuses.push(status as i32);
                col.event_times_us.push(event_us);
                push_value(&mut col, f.value_type, value.as_ref());
            }
            if let Some(track) = resolution.served.get(j) {
                track.add(&counts, now_us);
            }
            columns.push(col);
        }
        if let (Some(log), false) = (&self.served_log, resolution.log_rates.is_empty()) {
            let served = Served { at_us: self.db.system_time_now().0 as i64, as_of_us: as_of, request_id };
            log_answers(log, req, &et.name, &resolution.log_rates, &keys, &columns, &served);
        }
        if let (Some(s), true) = (&self.shadow, shadow) {
            s.offer(req, as_of, features, &columns);
        }
        Ok(pb::GetOnlineFeaturesResponse { columns })
    }

    /// The answers of a lookup's aggregate features (`None` for the other features), per
    /// entity (`None`: not read, the deadline was near): one engine read of every distinct
    /// entity and aggregate from one view at `known_at`, folded from hour and day tiles where they
    /// answer (`Db::aggregates_at`).
    fn online_aggregates(
        &self,
        keys: &[Vec<u8>],
        features: &[ResolvedFeature],
        as_of: EventTime,
        known_at: SystemTime,
        deadline: Option<std::time::Instant>,
        budget: &mut AnswerBudget<'_>,
    ) -> Result<Vec<Option<Vec<Option<AggAnswer>>>>> {
        let mut queries: Vec<AggQuery> = Vec::new();
        let slots: Vec<Option<usize>> = features
            .iter()
            .map(|f| {
                let spec = f.aggregate.as_ref()?;
                let q = AggQuery { feature: f.id, source: spec.source_type, agg: spec.agg, width_us: spec.width_us };
                Some(queries.iter().position(|x| *x == q).unwrap_or_else(|| {
                    queries.push(q);
                    queries.len() - 1
                }))
            })
            .collect();
        if queries.is_empty() {
            return Ok(Vec::new());
        }
        // Each distinct entity once, in key order.
        let mut distinct: Vec<Vec<u8>> = keys.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let late = || deadline.is_some_and(|d| std::time::Instant::now() >= d);
        let read =
            match self.db.aggregates_at(&distinct, &queries, as_of, known_at, || !late(), &mut |b| budget.spend(b)) {
                Err(quiver_storage::Error::OverBudget(_)) => return Err(budget.refusal()),
                r => r?,
            };
        if read.iter().any(Option::is_none) {
            if let Some(h) = &self.health {
                h.cut_short();
            }
        }
        let rows: Vec<Option<&Vec<AggAnswer>>> =
            keys.iter().map(|k| distinct.binary_search(k).ok().and_then(|i| read[i].as_ref())).collect();
        Ok(slots
            .iter()
            .map(|slot| slot.map(|q| rows.iter().map(|r| r.map(|answers| answers[q].clone())).collect()))
            .collect())
    }

    /// The entity type and features of a request, from the resolution cache when the registry
    /// has not changed since (the online path asks the same lists again and again).
    fn resolve_features(&self, entity_type: &str, refs: &[String]) -> Result<Arc<Resolution>> {
        let generation = self.registry.generation();
        let hash = {
            use std::hash::{BuildHasher, Hash, Hasher};
            let mut h = self.resolution_hasher.build_hasher();
            entity_type.hash(&mut h);
            refs.hash(&mut h);
            h.finish()
        };
        {
            let cache = self.resolutions.lock();
            if cache.generation == generation {
                if let Some(r) = cache.map.get(&hash).filter(|r| r.entity_type.name == entity_type && r.refs == refs) {
                    return Ok(r.clone());
                }
            }
        }
        let (et, features) = self.resolve_uncached(entity_type, refs, SystemTime::MAX)?;
        let r =
            Arc::new(Resolution::new(et, refs.to_vec(), features, self.health.as_deref(), self.served_log.as_deref())?);
        let mut cache = self.resolutions.lock();
        if cache.generation != generation || cache.map.len() >= RESOLUTIONS_CACHED_MAX {
            cache.map.clear();
            cache.generation = generation;
        }
        cache.map.insert(hash, r.clone());
        Ok(r)
    }

    /// The entity type and features of a request, unpinned references resolved as of
    /// `known_at` (`SystemTime::MAX`: the serving versions now).
    fn resolve_uncached(
        &self,
        entity_type: &str,
        refs: &[String],
        known_at: SystemTime,
    ) -> Result<(pb::EntityType, Vec<ResolvedFeature>)> {
        if refs.is_empty() {
            return Err(ServiceError::Invalid("no features requested".into()));
        }
        if refs.len() > FEATURES_PER_REQUEST_MAX {
            return Err(ServiceError::TooLarge(format!("more than {FEATURES_PER_REQUEST_MAX} features requested")));
        }
        let et = self.registry.entity_type(entity_type)?;
        let features = self.registry.resolve_all_at(refs, known_at)?;
        if let Some(f) = features.iter().find(|f| f.entity_type != et.name) {
            return Err(ServiceError::Invalid(format!(
                "feature {}:{} is on entity type {}, not {}",
                f.group, f.feature, f.entity_type, et.name
            )));
        }
        Ok((et, features))
    }

    /// `GetHistoricalFeatures`: the point-in-time join of `storage/READS.md`, one output row per
    /// spine row in spine order, from one snapshot. Chunks of [`HISTORICAL_CHUNK_ROWS`] rows go
    /// to `emit`; it returns false to stop early (the client went away).
    pub fn historical(
        &self,
        req: &pb::GetHistoricalFeaturesRequest,
        emit: impl FnMut(pb::GetHistoricalFeaturesResponse) -> bool,
    ) -> Result<()> {
        let spec = JoinSpec::of(req);
        self.join(&spec, &req.spine, emit)
    }

    /// The features a join of `spec` answers with, resolved as the join resolves them: (type,
    /// group version) per requested reference (for a caller that needs the output's shape
    /// before any row, e.g. an Arrow schema).
    pub fn join_columns(&self, spec: &JoinSpec<'_>) -> Result<Vec<(pb::ValueType, u32)>> {
        let (resolution, _) = self.join_resolution(spec)?;
        Ok(resolution.features.iter().map(|f| (f.value_type, f.version)).collect())
    }

    fn join_resolution(&self, spec: &JoinSpec<'_>) -> Result<(Arc<Resolution>, SystemTime)> {
        let known_at = match spec.known_at {
            Some(t) => convert::system_time(t, "known_at")?,
            None => SystemTime::MAX,
        };
        // Unpinned references resolve to the versions that served as of `known_at`, so a
        // pinned training set does not change when a group's serving version does.
        let resolution = if known_at == SystemTime::MAX {
            self.resolve_features(spec.entity_type, spec.features)?
        } else {
            let (et, features) = self.resolve_uncached(spec.entity_type, spec.features, known_at)?;
            Arc::new(Resolution::new(et, spec.features.to_vec(), features, None, None)?)
        };
        Ok((resolution, known_at))
    }

    /// The point-in-time join of `spec` over `spine` (whatever carries it: protobuf rows or an
    /// Arrow table), as [`Features::historical`].
    pub fn join(
        &self,
        spec: &JoinSpec<'_>,
        spine: &dyn SpineRows,
        mut emit: impl FnMut(pb::GetHistoricalFeaturesResponse) -> bool,
    ) -> Result<()> {
        let spine_len = spine.len();
        if spine_len > SPINE_ROWS_MAX {
            return Err(ServiceError::TooLarge(format!("spine has more than {SPINE_ROWS_MAX} rows")));
        }
        let started = std::time::Instant::now();
        let (resolution, known_at) = self.join_resolution(spec)?;
        let (et, features) = (&resolution.entity_type, &resolution.features);
        // Check the whole spine before streaming anything: a long spine in parts, one per
        // join thread (the first failing row is reported either way).
        let parts = if spine_len >= SPINE_ROWS_PER_PART_MIN { self.join_threads } else { 1 };
        let part_rows = spine_len.div_ceil(parts).max(1);
        let rows = if parts == 1 {
            spine.check(et, 0..spine_len)?
        } else {
            std::thread::scope(|scope| -> Result<_> {
                let handles: Vec<_> = (0..spine_len)
                    .step_by(part_rows)
                    .map(|start| scope.spawn(move || spine.check(et, start..(start + part_rows).min(spine_len))))
                    .collect();
                let mut rows = Vec::with_capacity(spine_len);
                for h in handles {
                    rows.extend(h.join().unwrap_or_else(|p| Err(worker_panicked(&*p)))?);
                }
                Ok(rows)
            })?
        };
        self.check_owned(rows.iter().map(|(k, _)| k.as_slice()))?;
        let defaults: Vec<Option<Value>> = if spec.use_defaults {
            features.iter().map(default_of).collect::<Result<_>>()?
        } else {
            vec![None; features.len()]
        };
        // Sort-merge: the spine is sorted by entity, and a cursor over one snapshot walks the
        // entities in key order, reading every version of an entity's requested features in
        // one forward pass; each row's answer is the as-of rule applied to that list. Answers
        // are kept in that order (as fixed-size records, or in a log that spills to a temporary
        // file past a memory bound; see `RunStore`) and streamed in spine order. The entities are split into runs read by parallel threads.
        let checked = started.elapsed();
        let snap = self.db.snapshot();
        let mut distinct: Vec<FeatureId> = features.iter().map(|f| f.id).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let slot: Vec<usize> = features.iter().map(|f| distinct.binary_search(&f.id).unwrap_or(0)).collect();
        let (lo, hi) = (distinct[0], distinct[distinct.len() - 1]);
        // Rows of one entity may come in any order: each answer is placed by its row number.
        // Sorted by `SpineKey` (the keys' first 16 bytes, then their length): sorting and
        // grouping the usual short entity keys touch no key at all.
        let mut keyed: Vec<SpineKey> = rows.iter().enumerate().map(|(i, r)| SpineKey::of(&r.0, i as u32)).collect();
        let by_key = |a: &SpineKey, b: &SpineKey| a.cmp(b, |i| &rows[i as usize].0);
        // A long spine is sorted in parts in parallel, then merged.
        let keyed: Vec<SpineKey> = if parts == 1 {
            keyed.sort_unstable_by(by_key);
            keyed
        } else {
            std::thread::scope(|scope| {
                for part in keyed.chunks_mut(part_rows) {
                    scope.spawn(move || part.sort_unstable_by(by_key));
                }
            });
            let mut merged: Vec<SpineKey> = Vec::new();
            for part in keyed.chunks(part_rows) {
                merged = merge_sorted(&merged, part, by_key);
            }
            merged
        };
        let order: Vec<u32> = keyed.iter().map(|k| k.row).collect();
        let mut at = 0;
        let groups: Vec<&[u32]> = keyed
            .chunk_by(|a, b| by_key(a, b).is_eq())
            .map(|g| {
                at += g.len();
                &order[at - g.len()..at]
            })
            .collect();
        // Only `order` (4 bytes a row) stays for the answers.
        drop(keyed);
        // The entity groups are cut into JOIN_THREADS runs of about equal row counts; each run
        // gets its own cursor over the same snapshot and its own answer store.
        let threads = self.join_threads.min(groups.len()).max(1);
        let per_run = rows.len().div_ceil(threads);
        let mut runs: Vec<&[&[u32]]> = Vec::with_capacity(threads);
        let (mut start, mut rows_so_far) = (0, 0);
        for (i, g) in groups.iter().enumerate() {
            rows_so_far += g.len();
            if runs.len() + 1 < threads && rows_so_far >= per_run * (runs.len() + 1) {
                runs.push(&groups[start..=i]);
                start = i + 1;
            }
        }
        runs.push(&groups[start..]);
        let sorted = started.elapsed();
        // The memory admission reserved for the answers, shared by the runs.
        let spill_at = (self.join_answer_bytes(spine_len, features.len()) / threads).max(1);
        let answer_run = |run: &[&[u32]]| -> Result<RunAnswers> {
            let run_started = std::time::Instant::now();
            let mut cursor = snap.pair_cursor(known_at);
            let mut history = PairHistory::new(distinct.len());
            let run_rows: usize = run.iter().map(|g| g.len()).sum();
            let mut store = RunStore::new(features, spec.event_times, run_rows, spill_at);
            let mut placed = Vec::with_capacity(run_rows);
            for group in run {
                let versions = cursor.entity(&rows[group[0] as usize].0, lo, hi)?;
                history.index(&versions, &distinct);
                // Aggregates of the group's rows in one pass each (a window sliding along the
                // rows' times), unless every row has a known_at of its own (strict).
                let mut many: Vec<Option<Vec<AggAnswer>>> = Vec::new();
                if !spec.strict_availability {
                    let at: Vec<EventTime> = group.iter().map(|&r| rows[r as usize].1).collect();
                    for (j, f) in features.iter().enumerate() {
                        many.push(match &f.aggregate {
                            Some(a) => Some(history.aggregate_many(&versions, slot[j], a, &at, known_at)?),
                            None => None,
                        });
                    }
                }
                for (p, &r) in group.iter().enumerate() {
                    let t = rows[r as usize].1;
                    let k = if spec.strict_availability {
                        quiver_storage::asof::strict_known_at(known_at, t)
                    } else {
                        known_at
                    };
                    for (j, f) in features.iter().enumerate() {
                        if let Some(spec) = &f.aggregate {
                            let answer = match many.get_mut(j).and_then(Option::as_mut) {
                                Some(answers) => std::mem::take(&mut answers[p]),
                                // Strict: this row's own known_at.
                                None => {
                                    history.aggregate_many(&versions, slot[j], spec, &[t], k)?.pop().unwrap_or_default()
                                }
                            };
                            let answer = aggregate_status(answer, f.value_type, defaults[j].as_ref());
                            store.value(answer, defaults[j].as_ref());
                            continue;
                        }
                        let winner = history.winner(&versions, slot[j], t, k);
                        store.winner(winner, t, f, defaults[j].as_ref())?;
                    }
                    let (at, len) = store.end_row()?;
                    placed.push((r, at, len));
                }
            }
            tracing::debug!(rows = placed.len(), elapsed = ?run_started.elapsed(), spilled = store.spilled(), "join run answered");
            Ok((store, placed))
        };
        let results: Vec<Result<RunAnswers>> = if threads == 1 {
            vec![answer_run(runs[0])]
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = runs.iter().map(|run| scope.spawn(|| answer_run(run))).collect();
                handles.into_iter().map(|h| h.join().unwrap_or_else(|p| Err(worker_panicked(&*p)))).collect()
            })
        };
        let answered = started.elapsed();
        tracing::debug!(rows = rows.len(), threads, ?checked, ?sorted, ?answered, "point-in-time join answered");
        let mut stores = Vec::with_capacity(threads);
        let mut at = vec![(0u32, 0u64, 0u32); rows.len()];
        for (i, result) in results.into_iter().enumerate() {
            let (store, placed) = result?;
            for (r, offset, len) in placed {
                at[r as usize] = (i as u32, offset, len);
            }
            stores.push(store);
        }
        // Chunks in spine order, built from the runs' answers by the same number of threads (each
        // takes every `workers`-th chunk) and emitted here in order.
        let build = |c: usize, buf: &mut Vec<u8>| -> Result<pb::GetHistoricalFeaturesResponse> {
            let chunk = &at[c * HISTORICAL_CHUNK_ROWS..((c + 1) * HISTORICAL_CHUNK_ROWS).min(at.len())];
            let mut columns: Vec<pb::FeatureColumn> =
                features.iter().zip(spec.features).map(|(f, reference)| column(f, reference, chunk.len())).collect();
            for &(i, offset, len) in chunk {
                stores[i as usize].copy_row((offset, len), buf, features, &defaults, &mut columns)?;
            }
            Ok(pb::GetHistoricalFeaturesResponse { first_row: (c * HISTORICAL_CHUNK_ROWS) as u64, columns })
        };
        let chunks = at.len().div_ceil(HISTORICAL_CHUNK_ROWS);
        let workers = threads.min(chunks).max(1);
        let _streamed = Streamed(started);
        if workers == 1 {
            let mut buf = Vec::new();
            for c in 0..chunks {
                if !emit(build(c, &mut buf)?) {
                    return Ok(());
                }
            }
            return Ok(());
        }
        std::thread::scope(|scope| {
            let (mut receivers, mut handles) = (Vec::with_capacity(workers), Vec::with_capacity(workers));
            for w in 0..workers {
                // Two chunks ahead per worker: enough to keep the sender busy, bounded memory.
                let (tx, rx) = std::sync::mpsc::sync_channel(2);
                receivers.push(rx);
                let build = &build;
                handles.push(scope.spawn(move || {
                    let mut buf = Vec::new();
                    for c in (w..chunks).step_by(workers) {
                        let r = build(c, &mut buf);
                        let failed = r.is_err();
                        // A closed channel: the client went away or another chunk failed.
                        if tx.send(r).is_err() || failed {
                            break;
                        }
                    }
                }));
            }
            let result = (|| {
                for c in 0..chunks {
                    match receivers[c % workers].recv() {
                        Ok(chunk) => {
                            if !emit(chunk?) {
                                return Ok(());
                            }
                        }
                        // The worker is gone before its chunk: it panicked, and its join
                        // below gives the error with the panic's message.
                        Err(_) => {
                            return Err(ServiceError::Storage(quiver_storage::Error::PreviousError(
                                "internal: a join worker stopped early".into(),
                            )))
                        }
                    }
                }
                Ok(())
            })();
            drop(receivers);
            // Every worker is joined (not short-circuited) before the scope ends; a panic is
            // the error, with its message.
            let mut panic = None;
            for h in handles {
                if let Err(p) = h.join() {
                    panic.get_or_insert(p);
                }
            }
            match panic {
                Some(p) => Err(worker_panicked(&*p)),
                None => result,
            }
        })
    }

    /// `ScanHistory`: every version of one entity's features in range, in key order, in chunks
    /// of [`SCAN_CHUNK_VERSIONS`] to `emit` (which returns false to stop early).
    pub fn scan_history(
        &self,
        req: &pb::ScanHistoryRequest,
        mut emit: impl FnMut(pb::ScanHistoryResponse) -> bool,
    ) -> Result<()> {
        let features: Vec<ResolvedFeature> = match (req.features.is_empty(), req.group.is_empty()) {
            (false, _) => self.registry.resolve_written_at(&req.features, SystemTime::MAX)?,
            (true, false) => self.registry.resolve_group(&req.group)?,
            (true, true) => return Err(ServiceError::Invalid("name features or a group to scan".into())),
        };
        let et = self.registry.entity_type(&req.entity_type)?;
        if let Some(f) = features.iter().find(|f| f.entity_type != et.name) {
            return Err(ServiceError::Invalid(format!(
                "feature {}:{} is not on entity type {}",
                f.group, f.feature, et.name
            )));
        }
        let entity = req.entity.as_ref().ok_or_else(|| ServiceError::Invalid("entity is required".into()))?;
        let key = convert::entity_key(&et, entity)?;
        self.check_owned([key.as_slice()])?;
        let mut range = quiver_storage::ScanRange::entity(&key);
        if let Some(t) = &req.event_time_from {
            range.event_time_min = EventTime(convert::micros(t, "event_time_from")?);
        }
        if let Some(t) = &req.event_time_to {
            range.event_time_max = EventTime(convert::micros(t, "event_time_to")?);
        }
        if let Some(t) = &req.system_time_from {
            range.system_time_min = convert::system_time(t, "system_time_from")?;
        }
        if let Some(t) = &req.system_time_to {
            range.system_time_max = convert::system_time(t, "system_time_to")?;
        }
        if range.event_time_min > range.event_time_max || range.system_time_min > range.system_time_max {
            return Err(ServiceError::Invalid("scan time range is empty (from > to)".into()));
        }
        let limit = if req.limit == 0 { SCAN_VERSIONS_MAX } else { req.limit.min(SCAN_VERSIONS_MAX) };
        let by_id: HashMap<u32, String> =
            features.iter().map(|f| (f.id.0, format!("{}@{}:{}", f.group, f.version, f.feature))).collect();
        let mut chunk = Vec::with_capacity(SCAN_CHUNK_VERSIONS);
        let mut sent = 0u64;
        for item in self.db.scan(range)? {
            let item = item?;
            let Some(name) = by_id.get(&item.feature.0) else { continue };
            let v = item.version;
            chunk.push(pb::HistoryVersion {
                feature_ref: name.clone(),
                event_time: Some(convert::timestamp(v.event_time.0)),
                system_time: Some(convert::timestamp(v.system_time.0 as i64)),
                value: v.value.as_ref().map(convert::to_api),
                version: Some(api_vv(&v.version_vector)),
            });
            sent += 1;
            if chunk.len() == SCAN_CHUNK_VERSIONS
                && !emit(pb::ScanHistoryResponse { versions: std::mem::take(&mut chunk) })
            {
                return Ok(());
            }
            if sent == limit {
                break;
            }
        }
        if !chunk.is_empty() {
            emit(pb::ScanHistoryResponse { versions: chunk });
        }
        Ok(())
    }

    /// `WriteFeatures`: all rows or none.
    pub fn write(&self, req: &pb::WriteFeaturesRequest) -> Result<pb::WriteFeaturesResponse> {
        let durability = self.check_write_request(req)?;
        // A retry gets the first answer whatever changed since (even the registry), so the
        // record is looked up before anything else. Two requests with one key racing past this
        // look-up are settled by the engine: the record is written only if it is still absent
        // (below), and the loser replays the winner's answer.
        let digest = if req.idempotency_key.is_empty() { [0; 32] } else { request_digest(req) };
        if let Some(resp) = self.replay(&req.idempotency_key, &digest)? {
            return Ok(resp);
        }
        let result = self.prepare(req).and_then(|prepared| {
            #[cfg(feature = "testing")]
            {
                // Not called under the fence or the engine's lock: the hook may write through
                // this service itself.
                let hook = self.before_commit.lock().clone();
                if let Some(hook) = hook {
                    (hook.0)();
                }
            }
            // A sharded node checks ownership (and the fence of a moving slot) under one map,
            // and holds the fence's guard until the write has committed (CLUSTER.md §5).
            let _fence = self.write_guard(&prepared.keys)?;
            self.commit(req, &digest, prepared, durability)
        });
        self.after_write(req, &digest, result)
    }

    /// Checks a whole write as [`Features::write`] would (its limits, and every row against the
    /// registry), but not who owns its entities, and writes nothing: what a forwarding node
    /// does before it splits a write over shards, so that a write refused anywhere is refused
    /// whole. Each row's encoded entity key.
    pub(crate) fn write_keys(&self, req: &pb::WriteFeaturesRequest) -> Result<Vec<Vec<u8>>> {
        self.check_write_request(req)?;
        Ok(self.prepare(req)?.keys)
    }

    /// A write's limits and durability, checked before anything else.
    fn check_write_request(&self, req: &pb::WriteFeaturesRequest) -> Result<Durability> {
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
        match pb::Durability::try_from(req.durability) {
            Ok(pb::Durability::Async) => Ok(Durability::Async),
            Ok(pb::Durability::Sync) => Ok(Durability::Sync),
            Ok(pb::Durability::Unspecified) => Ok(self.default_durability),
            Err(_) => Err(ServiceError::Invalid(format!(
                "durability {} is not a Durability (0 unspecified, 1 sync, 2 async)",
                req.durability
            ))),
        }
    }

    /// A write's outcome, or on failure with an idempotency key the first answer if a request
    /// with the same key committed meanwhile.
    fn after_write(
        &self,
        req: &pb::WriteFeaturesRequest,
        digest: &[u8; 32],
        result: Result<pb::WriteFeaturesResponse>,
    ) -> Result<pb::WriteFeaturesResponse> {
        match result {
            // A request with the same key may have committed since the look-up, and then
            // changed what this one is checked against (the registry, the event horizon): the
            // retry still gets the first answer.
            // If that look-up fails too, the write's own error is the one to report.
            Err(e) if !req.idempotency_key.is_empty() => match self.replay(&req.idempotency_key, digest) {
                Ok(Some(resp)) => Ok(resp),
                Ok(None) => Err(e),
                Err(refused @ ServiceError::Refused(_)) => Err(refused),
                Err(again) => {
                    tracing::warn!(error = %again, "idempotency record unreadable after a failed write");
                    Err(e)
                }
            },
            other => other,
        }
    }

    /// The reserved key of an idempotency record.
    fn idempotency_key(key: &str) -> Vec<u8> {
        let mut k = IDEMPOTENCY_PREFIX.to_vec();
        k.extend_from_slice(key.as_bytes());
        k
    }

    /// The stored answer of an earlier request with this idempotency key (none for an empty
    /// key); `FAILED_PRECONDITION` if that request was not this one (`digest`).
    fn replay(&self, key: &str, digest: &[u8; 32]) -> Result<Option<pb::WriteFeaturesResponse>> {
        if key.is_empty() {
            return Ok(None);
        }
        let prev = self.db.value_at(&Self::idempotency_key(key), FeatureId(0), AsOf::at(EventTime(0)))?;
        prev.as_ref().and_then(|p| Self::replayed(key, digest, p)).transpose()
    }

    /// The answer a stored idempotency record gives a retry (`None`: not a record).
    fn replayed(key: &str, digest: &[u8; 32], prev: &CellVersion) -> Option<Result<pb::WriteFeaturesResponse>> {
        let Some(Value::Bytes(b)) = &prev.value else { return None };
        let record = match IdempotencyRecord::decode(b.as_slice()) {
            Ok(r) => r,
            Err(e) => {
                return Some(Err(ServiceError::Storage(quiver_storage::Error::InvalidArgument(format!(
                    "stored idempotency record does not decode: {e}"
                )))))
            }
        };
        if !record.request_digest.is_empty() && record.request_digest != digest {
            return Some(Err(ServiceError::Refused(format!(
                "idempotency key {key:?} was used for a different request; a new request needs a new key"
            ))));
        }
        // The record was written in the write's own batch: its stamp and vector are the write's.
        Some(Ok(pb::WriteFeaturesResponse {
            values_written: record.values_written,
            system_time: Some(convert::timestamp(prev.system_time.0 as i64)),
            deduplicated: true,
            version: Some(api_vv(&prev.version_vector)),
        }))
    }

    /// Checks every row against the registry and builds the engine batch, with each row's
    /// entity key on a sharded node (whose ownership the caller checks); writes nothing.
    fn prepare<'a>(&self, req: &'a pb::WriteFeaturesRequest) -> Result<Prepared<'a>> {
        let mut batch = WriteBatch::new();
        let mut written = Vec::with_capacity(req.rows.len());
        let (mut expect, mut cas_names) = (Vec::new(), Vec::new());
        let mut groups: HashMap<&str, (String, HashMap<String, ResolvedFeature>)> = HashMap::new();
        // A sharded node checks every row's entity against one map once the rows are read.
        let mut owned_keys: Vec<Vec<u8>> = Vec::new();
        for (i, row) in req.rows.iter().enumerate() {
            if !groups.contains_key(row.group.as_str()) {
                let feats = self.registry.resolve_group(&row.group)?;
                if let Some(f) = feats.first().filter(|f| self.registry.is_retired(&f.group, f.version)) {
                    return Err(ServiceError::Refused(format!(
                        "row {i}: {}@{} is retired: it takes no writes",
                        f.group, f.version
                    )));
                }
                let et = feats.first().map(|f| f.entity_type.clone()).unwrap_or_default();
                groups.insert(&row.group, (et, feats.into_iter().map(|f| (f.feature.clone(), f)).collect()));
            }
            let Some((et_name, feats)) = groups.get(row.group.as_str()) else { continue };
            let et = self.registry.entity_type(et_name)?;
            let entity =
                row.entity.as_ref().ok_or_else(|| ServiceError::Invalid(format!("row {i}: entity is required")))?;
            let key = convert::entity_key(&et, entity).map_err(|e| ServiceError::Invalid(format!("row {i}: {e}")))?;
            if self.cluster.is_some() {
                owned_keys.push(key.clone());
            }
            let e = convert::event_time(row.event_time.as_ref(), &format!("row {i}: event_time"))?;
            if let Some((group, _)) = crate::registry::parse_group_ref(&row.group) {
                written.push(Written {
                    group,
                    event_us: e.0,
                    values: (row.values.len() + row.deletes.len()) as u64,
                    row,
                });
            }
            if row.values.is_empty() && row.deletes.is_empty() {
                return Err(ServiceError::Invalid(format!("row {i} writes nothing")));
            }
            let feature = |name: &str| {
                feats.get(name).ok_or_else(|| match aggregate_refusal(&self.registry, &row.group, name) {
                    Some(why) => ServiceError::Invalid(format!("row {i}: {why}")),
                    None => ServiceError::NotFound(format!("row {i}: group {} has no feature {name:?}", row.group)),
                })
            };
            let mut names: Vec<&String> = row.values.keys().collect();
            names.sort();
            for name in names {
                let f = feature(name)?;
                let v = convert::to_engine(&row.values[name], f.value_type, &format!("row {i}: {}", name))?;
                if let Value::Float32Vector(x) = &v {
                    if f.dim != 0 && x.len() != f.dim as usize {
                        return Err(ServiceError::Invalid(format!(
                            "row {i}: {name}: a vector of {} elements; {}:{name} has dim {}",
                            x.len(),
                            row.group,
                            f.dim
                        )));
                    }
                }
                batch.put(&key, f.id, e, v).map_err(|err| ServiceError::Invalid(format!("row {i}: {name}: {err}")))?;
            }
            for name in &row.deletes {
                let f = feature(name)?;
                batch.delete(&key, f.id, e).map_err(|err| ServiceError::Invalid(format!("row {i}: {name}: {err}")))?;
            }
            for (name, vv) in &row.expected_versions {
                let f = feature(name)?;
                if let Some(x) = vv.entries.iter().find(|x| x.region > REGION_ID_MAX) {
                    return Err(ServiceError::Invalid(format!(
                        "row {i}: expected version of {name} names region {}; regions are 0 to {REGION_ID_MAX}",
                        x.region
                    )));
                }
                let entries = vv.entries.iter().map(|x| (x.region, x.counter)).collect();
                let version = VersionVector::from_entries(entries)
                    .map_err(|err| ServiceError::Invalid(format!("row {i}: expected version of {name}: {err}")))?;
                expect.push(Expectation {
                    entity: key.clone(),
                    feature: f.id,
                    event_time: e,
                    // The empty vector: the cell must hold no value.
                    version: (!version.is_empty()).then_some(version),
                });
                cas_names.push(format!("{}:{name}", row.group));
            }
        }
        Ok(Prepared { batch, expect, names: cas_names, written, keys: owned_keys })
    }

    /// Commits a prepared write in one engine step: its compare-and-swap expectations, and
    /// with an idempotency key the record's absence, are checked under the engine's writer lock
    /// together with the commit, so no other write (local or replicated) lands in between.
    fn commit(
        &self,
        req: &pb::WriteFeaturesRequest,
        digest: &[u8; 32],
        prepared: Prepared<'_>,
        durability: Durability,
    ) -> Result<pb::WriteFeaturesResponse> {
        let Prepared { mut batch, mut expect, names, written: rows, .. } = prepared;
        // Cell versions stored: a later write of a cell in the batch replaces an earlier one.
        let written = batch.distinct_cells() as u64;
        let idempotent = !req.idempotency_key.is_empty();
        if idempotent {
            // The answer is stored with the write, in the same atomic batch; its system time
            // and vector are only known after the commit, so the stored record holds the count
            // and a retry reads the rest back from the record's own version.
            let idem_key = Self::idempotency_key(&req.idempotency_key);
            let record = IdempotencyRecord { values_written: written, request_digest: digest.to_vec() };
            batch.put(&idem_key, FeatureId(0), EventTime(0), Value::Bytes(record.encode_to_vec()))?;
            expect.push(Expectation {
                entity: idem_key,
                feature: FeatureId(0),
                event_time: EventTime(0),
                version: None,
            });
        }
        let receipt = match self.db.write_if(batch, expect, durability)? {
            WriteIf::Committed(receipt) => receipt,
            WriteIf::Refused(mismatches) => {
                // The idempotency record is the last expectation: if it is there, a request
                // with the same key committed first, and this one is its retry.
                if idempotent {
                    if let Some(m) = mismatches.iter().find(|m| m.index == names.len()) {
                        if let Some(resp) =
                            m.current.as_ref().and_then(|p| Self::replayed(&req.idempotency_key, digest, p))
                        {
                            return resp;
                        }
                    }
                }
                let current: Vec<(String, pb::VersionVector)> = mismatches
                    .iter()
                    .filter_map(|m| {
                        let name = names.get(m.index)?;
                        Some((name.clone(), m.current.as_ref().map(|c| api_vv(&c.version_vector)).unwrap_or_default()))
                    })
                    .collect();
                let listed: Vec<&str> = current.iter().map(|m| m.0.as_str()).collect();
                return Err(ServiceError::Aborted {
                    message: format!("compare-and-swap failed for {}: the current version differs", listed.join(", ")),
                    current,
                });
            }
        };
        if let Some(health) = &self.health {
            health.written(&rows, receipt.system_time.0 as i64);
        }
        Ok(pb::WriteFeaturesResponse {
            values_written: written,
            system_time: Some(convert::timestamp(receipt.system_time.0 as i64)),
            deduplicated: false,
            version: Some(api_vv(&receipt.version_vector)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spine_keys_sort_in_the_byte_order_of_their_keys() {
        let mut keys: Vec<Vec<u8>> = vec![
            vec![],
            b"a".to_vec(),
            b"a\0".to_vec(),
            b"a\0\0".to_vec(),
            b"a\x01".to_vec(),
            b"\xff".to_vec(),
            b"0123456789abcdef".to_vec(),
            b"0123456789abcde\0".to_vec(),
            b"0123456789abcdef\0".to_vec(),
            b"0123456789abcdefg".to_vec(),
            b"0123456789abcdef\xff\xff".to_vec(),
            b"0123456789abcdee\xff\xff".to_vec(),
            b"01234567".to_vec(),
            b"01234567\0".to_vec(),
            b"012345678".to_vec(),
        ];
        keys.extend((0..40u8).map(|i| [b"customer-000000".as_slice(), &[i % 3, i]].concat()));
        let spine: Vec<SpineKey> = keys.iter().enumerate().map(|(i, k)| SpineKey::of(k, i as u32)).collect();
        for a in &spine {
            for b in &spine {
                let want = keys[a.row as usize].cmp(&keys[b.row as usize]);
                assert_eq!(
                    a.cmp(b, |r| &keys[r as usize]),
                    want,
                    "{:?} vs {:?}",
                    keys[a.row as usize],
                    keys[b.row as usize]
                );
            }
        }
        assert_eq!(std::mem::size_of::<SpineKey>(), 24);
    }

    #[test]
    fn fixed_answers_give_back_what_a_protobuf_column_would_hold() {
        use pb::FeatureStatus as S;
        use pb::ValueType as T;
        let types = vec![T::Bool, T::Int64, T::Float32, T::Float64];
        let rows: Vec<Vec<(S, i64, Option<Value>)>> = vec![
            vec![
                (S::Present, 7, Some(Value::Bool(true))),
                (S::Present, -1, Some(Value::Int64(i64::MIN))),
                (S::Present, 3, Some(Value::Float32(-1.5e-7))),
                (S::Present, i64::MAX, Some(Value::Float64(f64::MAX))),
            ],
            vec![
                (S::NotFound, 0, None),
                (S::Defaulted, 0, Some(Value::Int64(42))),
                (S::Stale, 0, None),
                // A stored value of another type is answered as zero, as push_value does.
                (S::Present, 9, Some(Value::Int64(5))),
            ],
        ];
        for event_times in [true, false] {
            let mut fixed = FixedAnswers::new(types.clone(), event_times, rows.len());
            for row in &rows {
                for (status, e, v) in row {
                    fixed.push(*status, *e, v.as_ref());
                }
                fixed.end_row();
            }
            // Read back in the other order, as a spine's order may be.
            for i in [1, 0] {
                let column = |t: T| pb::FeatureColumn { r#type: t as i32, ..Default::default() };
                let mut got: Vec<pb::FeatureColumn> = types.iter().map(|&t| column(t)).collect();
                fixed.copy_row(i, &mut got).expect("row");
                for (j, (status, e, v)) in rows[i].iter().enumerate() {
                    let mut want = column(types[j]);
                    want.statuses.push(*status as i32);
                    if event_times {
                        want.event_times_us.push(*e);
                    }
                    push_value(&mut want, types[j], v.as_ref());
                    assert_eq!(got[j], want, "row {i}, feature {j}, event times {event_times}");
                }
            }
            assert!(fixed.copy_row(2, &mut []).is_err(), "no third row");
        }
    }
}
