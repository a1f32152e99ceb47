//! Arrow Flight on quiverd's gRPC port (`proto/quiver/v1/flight.proto`): point-in-time joins out
//! and bulk writes in, as Arrow record batches, so that a Python or Spark client moves columns
//! instead of building and parsing a protobuf message per row.
//!
//! - `DoGet(FlightTicket::join)`: the spine arrives as an Arrow IPC stream inside the ticket; its
//!   key and time columns are checked and encoded by [`ArrowSpine`] and handed to the same join
//!   as `GetHistoricalFeatures` ([`Features::join`]); each answer chunk's columns are moved into
//!   Arrow arrays ([`answer_batch`]) and streamed in spine order.
//! - `DoGet(FlightTicket::scan)`: `ScanHistory`'s chunks as Arrow ([`scan_batch`]).
//! - `DoPut(FlightWrite)`: each record batch becomes `WriteFeatures` requests (at most
//!   `WRITE_ROWS_MAX` rows and `WRITE_VALUES_MAX` values each), written as that RPC writes them,
//!   with one `PutResult` per batch.
//!
//! Authentication, scopes, rate limits and admission are the protobuf API's: the service sits
//! behind the same interceptor, joins need `read` on every feature's group, writes `write` on
//! the group. The other Flight methods are UNIMPLEMENTED.

use std::io::Cursor;
use std::sync::Arc;

use arrow_array::builder::{Float32Builder, Int64Builder, ListBuilder, StringBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, TimestampMicrosecondType,
    TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType, UInt16Type, UInt32Type, UInt64Type,
    UInt8Type,
};
use arrow_array::{
    Array, ArrayRef, BinaryArray, BooleanArray, DictionaryArray, Float32Array, Float64Array, Int64Array, Int8Array,
    RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow_buffer::{BooleanBuffer, NullBuffer, ScalarBuffer};
use arrow_flight::encode::{DictionaryHandling, FlightDataEncoderBuilder};
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo, HandshakeRequest, HandshakeResponse,
    PollInfo, PutResult, SchemaResult, Ticket,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use quiver_proto::v1 as pb;
use quiver_storage::types::{encode_entity_key, KeyPart};
use quiver_storage::EventTime;
use tonic::{Request, Response, Status, Streaming};

use crate::admission::Admission;
use crate::auth::Scope;
use crate::convert::{TIMESTAMP_SECONDS_MAX, TIMESTAMP_SECONDS_MIN};
use crate::features::{
    Features, JoinSpec, ServiceError, SpineRows, FEATURES_PER_REQUEST_MAX, IDEMPOTENCY_KEY_BYTES_MAX, SPINE_ROWS_MAX,
    WRITE_ROWS_MAX, WRITE_VALUES_MAX,
};
use crate::metrics::Metrics;
use crate::service::{
    authorize, blocking, status, stream_blocking, BoxStream, FeatureApi, Stopping, DECODED_BYTES_PER_ENCODED,
    SCAN_RESERVE_BYTES,
};

type Result<T, E = ServiceError> = std::result::Result<T, E>;

/// The spine's time column when the ticket names none.
pub const DEFAULT_TIMESTAMP_COLUMN: &str = "event_timestamp";
/// Field metadata key holding the group version that answered a feature column.
pub const GROUP_VERSION_METADATA: &str = "quiver.group_version";
/// Status names by `quiver.v1.FeatureStatus` value: the status columns' dictionary.
pub const STATUS_NAMES: [&str; 7] =
    ["UNSPECIFIED", "PRESENT", "NOT_FOUND", "STALE", "DEFAULTED", "UNAVAILABLE", "OVERFLOW"];

/// `arrow.flight.protocol.FlightService`.
#[derive(Debug, Clone)]
pub struct FlightApi {
    features: Arc<Features>,
    metrics: Arc<Metrics>,
    admission: Arc<Admission>,
    stopping: Option<Stopping>,
    /// The protobuf API over the same features: on a sharded node that forwards, what it does
    /// not own goes through it (joins split by owner, writes routed, scans passed through).
    api: FeatureApi,
}

impl FlightApi {
    /// The Flight endpoints beside `api` (its features, metrics, admission, forwarder, and
    /// streams ending with UNAVAILABLE when its server stops).
    pub fn new(api: FeatureApi) -> Self {
        Self {
            features: api.features.clone(),
            metrics: api.metrics.clone(),
            admission: api.admission.clone(),
            stopping: api.stopping.clone(),
            api,
        }
    }
}

fn invalid(m: impl Into<String>) -> ServiceError {
    ServiceError::Invalid(m.into())
}

/// The Arrow type of a feature's values.
pub fn arrow_type(t: pb::ValueType) -> DataType {
    let list = |dt: DataType| DataType::List(Arc::new(Field::new_list_field(dt, true)));
    match t {
        pb::ValueType::Bool => DataType::Boolean,
        pb::ValueType::Int64 => DataType::Int64,
        pb::ValueType::Float32 => DataType::Float32,
        pb::ValueType::Float64 => DataType::Float64,
        pb::ValueType::String => DataType::Utf8,
        pb::ValueType::Bytes => DataType::Binary,
        pb::ValueType::Float32Vector => list(DataType::Float32),
        pb::ValueType::Int64List => list(DataType::Int64),
        pb::ValueType::StringList => list(DataType::Utf8),
        pb::ValueType::Unspecified => DataType::Null,
    }
}

fn status_type() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int8), Box::new(DataType::Utf8))
}

fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The schema of a join's answers: per feature its value column, and with `with_status` its
/// status and event-time columns.
pub fn answer_schema(refs: &[String], columns: &[(pb::ValueType, u32)], with_status: bool) -> Schema {
    let mut fields = Vec::with_capacity(refs.len() * 3);
    for (r, (t, version)) in refs.iter().zip(columns) {
        let meta: std::collections::HashMap<String, String> =
            [(GROUP_VERSION_METADATA.to_string(), version.to_string())].into_iter().collect();
        fields.push(Field::new(r, arrow_type(*t), true).with_metadata(meta));
        if with_status {
            fields.push(Field::new(format!("{r}:status"), status_type(), false));
            fields.push(Field::new(format!("{r}:event_timestamp"), timestamp_type(), true));
        }
    }
    Schema::new(fields)
}

/// One answer chunk as a record batch of `schema`: the columns' vectors are moved into Arrow
/// buffers; values are null where the status serves none, event times where it is not PRESENT.
pub fn answer_batch(
    schema: &SchemaRef,
    chunk: pb::GetHistoricalFeaturesResponse,
    with_status: bool,
) -> Result<RecordBatch> {
    let mut arrays: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    let status_values: ArrayRef = Arc::new(StringArray::from(STATUS_NAMES.to_vec()));
    let per_feature = if with_status { 3 } else { 1 };
    for (j, mut col) in chunk.columns.into_iter().enumerate() {
        // The schema was sent before the join resolved its features again; a promotion in
        // between may have changed what a reference names.
        let field =
            schema.fields().get(j * per_feature).ok_or_else(|| invalid("more answer columns than the schema"))?;
        let version = col.group_version.to_string();
        if field.data_type() != &arrow_type(col.r#type())
            || field.metadata().get(GROUP_VERSION_METADATA) != Some(&version)
        {
            return Err(ServiceError::Refused(format!(
                "{}: the registry changed as the join started (now version {version}); run it again",
                col.feature_ref
            )));
        }
        let n = col.statuses.len();
        let served = |s: &i32| *s == pb::FeatureStatus::Present as i32 || *s == pb::FeatureStatus::Defaulted as i32;
        let valid: Vec<bool> = col.statuses.iter().map(served).collect();
        let nulls = valid.iter().any(|v| !v).then(|| NullBuffer::from(valid.as_slice()));
        let values = feature_array(col.r#type(), &mut col, &valid, nulls)
            .map_err(|e| invalid(format!("{}: {n} rows: {e}", col.feature_ref)))?;
        if values.len() != n {
            return Err(invalid(format!("{}: {} values for {n} rows", col.feature_ref, values.len())));
        }
        arrays.push(values);
        if with_status {
            let keys = Int8Array::from(col.statuses.iter().map(|&s| s as i8).collect::<Vec<_>>());
            let statuses = DictionaryArray::<Int8Type>::try_new(keys, status_values.clone())
                .map_err(|e| invalid(format!("{}: statuses: {e}", col.feature_ref)))?;
            arrays.push(Arc::new(statuses));
            let present: Vec<bool> = col.statuses.iter().map(|&s| s == pb::FeatureStatus::Present as i32).collect();
            let present = present.iter().any(|p| !p).then(|| NullBuffer::from(present));
            let times =
                TimestampMicrosecondArray::new(ScalarBuffer::from(col.event_times_us), present).with_timezone("UTC");
            arrays.push(Arc::new(times));
        }
    }
    RecordBatch::try_new(schema.clone(), arrays).map_err(|e| invalid(format!("answer batch: {e}")))
}

/// A column's values as an Arrow array; the scalar vectors are moved out of `col`, not copied.
fn feature_array(
    t: pb::ValueType,
    col: &mut pb::FeatureColumn,
    valid: &[bool],
    nulls: Option<NullBuffer>,
) -> Result<ArrayRef> {
    let pick = |i: usize| valid.get(i).copied().unwrap_or(false);
    Ok(match t {
        pb::ValueType::Bool => {
            if col.bool_values.len() != valid.len() {
                return Err(invalid(format!("{} values", col.bool_values.len())));
            }
            Arc::new(BooleanArray::new(BooleanBuffer::from(std::mem::take(&mut col.bool_values)), nulls))
        }
        pb::ValueType::Int64 => Arc::new(
            Int64Array::try_new(ScalarBuffer::from(std::mem::take(&mut col.int64_values)), nulls)
                .map_err(|e| invalid(e.to_string()))?,
        ),
        pb::ValueType::Float32 => Arc::new(
            Float32Array::try_new(ScalarBuffer::from(std::mem::take(&mut col.float32_values)), nulls)
                .map_err(|e| invalid(e.to_string()))?,
        ),
        pb::ValueType::Float64 => Arc::new(
            Float64Array::try_new(ScalarBuffer::from(std::mem::take(&mut col.float64_values)), nulls)
                .map_err(|e| invalid(e.to_string()))?,
        ),
        pb::ValueType::String => Arc::new(StringArray::from_iter(
            col.string_values.iter().enumerate().map(|(i, s)| pick(i).then_some(s.as_str())),
        )),
        pb::ValueType::Bytes => Arc::new(BinaryArray::from_iter(
            col.bytes_values.iter().enumerate().map(|(i, b)| pick(i).then_some(b.as_slice())),
        )),
        pb::ValueType::Float32Vector => {
            let mut b = ListBuilder::new(Float32Builder::new());
            for (i, l) in col.float32_vector_values.iter().enumerate() {
                if pick(i) {
                    b.values().append_slice(&l.values);
                }
                b.append(pick(i));
            }
            Arc::new(b.finish())
        }
        pb::ValueType::Int64List => {
            let mut b = ListBuilder::new(Int64Builder::new());
            for (i, l) in col.int64_list_values.iter().enumerate() {
                if pick(i) {
                    b.values().append_slice(&l.values);
                }
                b.append(pick(i));
            }
            Arc::new(b.finish())
        }
        pb::ValueType::StringList => {
            let mut b = ListBuilder::new(StringBuilder::new());
            for (i, l) in col.string_list_values.iter().enumerate() {
                if pick(i) {
                    for s in &l.values {
                        b.values().append_value(s);
                    }
                }
                b.append(pick(i));
            }
            Arc::new(b.finish())
        }
        pb::ValueType::Unspecified => return Err(invalid(format!("{}: no value type", col.feature_ref))),
    })
}

/// A key column of an Arrow table, read as its join key's type.
enum KeyColumn {
    Str(ArrayRef),
    Int(Vec<i64>),
}

impl KeyColumn {
    fn of(a: &ArrayRef, kind: pb::JoinKeyType, name: &str, what: &str) -> Result<KeyColumn> {
        if a.null_count() > 0 {
            return Err(invalid(format!("{what}: join key column {name:?} has {} nulls", a.null_count())));
        }
        match kind {
            pb::JoinKeyType::String => match a.data_type() {
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Ok(KeyColumn::Str(a.clone())),
                other => Err(invalid(format!("{what}: join key {name:?} is a string, the column holds {other}"))),
            },
            pb::JoinKeyType::Int64 => Ok(KeyColumn::Int(integers(a).ok_or_else(|| {
                invalid(format!(
                    "{what}: join key {name:?} is int64, the column holds {} (or a value past int64)",
                    a.data_type()
                ))
            })?)),
            pb::JoinKeyType::Unspecified => Err(invalid(format!("{what}: join key {name:?} has no type"))),
        }
    }

    fn str_at(&self, i: usize) -> Option<&str> {
        let KeyColumn::Str(a) = self else { return None };
        match a.data_type() {
            DataType::Utf8 => Some(a.as_string::<i32>().value(i)),
            DataType::LargeUtf8 => Some(a.as_string::<i64>().value(i)),
            _ => Some(a.as_string_view().value(i)),
        }
    }

    fn part(&self, i: usize) -> KeyPart<'_> {
        match self {
            KeyColumn::Int(v) => KeyPart::Int(v[i]),
            KeyColumn::Str(_) => KeyPart::Str(self.str_at(i).unwrap_or("")),
        }
    }

    fn proto(&self, i: usize) -> pb::KeyPart {
        use pb::key_part::Kind;
        let kind = match self {
            KeyColumn::Int(v) => Kind::Int64Value(v[i]),
            KeyColumn::Str(_) => Kind::StringValue(self.str_at(i).unwrap_or("").to_string()),
        };
        pb::KeyPart { kind: Some(kind) }
    }
}

/// An integer column of any width as i64 (None: not integers, or a u64 past i64).
fn integers(a: &ArrayRef) -> Option<Vec<i64>> {
    Some(match a.data_type() {
        DataType::Int64 => a.as_primitive::<Int64Type>().values().to_vec(),
        DataType::Int32 => a.as_primitive::<Int32Type>().values().iter().map(|&v| i64::from(v)).collect(),
        DataType::Int16 => a.as_primitive::<Int16Type>().values().iter().map(|&v| i64::from(v)).collect(),
        DataType::Int8 => a.as_primitive::<Int8Type>().values().iter().map(|&v| i64::from(v)).collect(),
        DataType::UInt32 => a.as_primitive::<UInt32Type>().values().iter().map(|&v| i64::from(v)).collect(),
        DataType::UInt16 => a.as_primitive::<UInt16Type>().values().iter().map(|&v| i64::from(v)).collect(),
        DataType::UInt8 => a.as_primitive::<UInt8Type>().values().iter().map(|&v| i64::from(v)).collect(),
        DataType::UInt64 => {
            a.as_primitive::<UInt64Type>().values().iter().map(|&v| i64::try_from(v).ok()).collect::<Option<_>>()?
        }
        _ => return None,
    })
}

/// A timestamp column as microseconds since the epoch, within protobuf's timestamp range.
fn micros_column(a: &ArrayRef, name: &str, what: &str) -> Result<Vec<i64>> {
    if a.null_count() > 0 {
        return Err(invalid(format!("{what}: time column {name:?} has {} nulls", a.null_count())));
    }
    let DataType::Timestamp(unit, _) = a.data_type() else {
        return Err(invalid(format!("{what}: time column {name:?} is {}, not a timestamp", a.data_type())));
    };
    let raw = match unit {
        TimeUnit::Second => a.as_primitive::<TimestampSecondType>().values(),
        TimeUnit::Millisecond => a.as_primitive::<TimestampMillisecondType>().values(),
        TimeUnit::Microsecond => a.as_primitive::<TimestampMicrosecondType>().values(),
        TimeUnit::Nanosecond => a.as_primitive::<TimestampNanosecondType>().values(),
    };
    let (lo, hi) = (TIMESTAMP_SECONDS_MIN * 1_000_000, TIMESTAMP_SECONDS_MAX * 1_000_000 + 999_999);
    let mut out = Vec::with_capacity(raw.len());
    for (i, &v) in raw.iter().enumerate() {
        let us = match unit {
            TimeUnit::Second => v.checked_mul(1_000_000),
            TimeUnit::Millisecond => v.checked_mul(1000),
            TimeUnit::Microsecond => Some(v),
            TimeUnit::Nanosecond if v % 1000 == 0 => Some(v / 1000),
            TimeUnit::Nanosecond => {
                return Err(invalid(format!("{what}: row {i}: {name:?} has nanoseconds below a microsecond")))
            }
        };
        match us {
            Some(us) if (lo..=hi).contains(&us) => out.push(us),
            _ => {
                return Err(invalid(format!(
                    "{what}: row {i}: {name:?} is outside protobuf's timestamp range (0001-01-01 to 9999-12-31)"
                )))
            }
        }
    }
    Ok(out)
}

/// The key columns and times of one Arrow table (a spine, or a batch to write).
struct KeyedBatch {
    keys: Vec<KeyColumn>,
    times: Vec<i64>,
    rows: usize,
}

impl KeyedBatch {
    fn new(batch: &RecordBatch, et: &pb::EntityType, time_column: &str, what: &str) -> Result<KeyedBatch> {
        let mut keys = Vec::with_capacity(et.join_keys.len());
        for jk in &et.join_keys {
            let col = batch.column_by_name(&jk.name).ok_or_else(|| {
                invalid(format!("{what}: missing join key column {:?} (entity type {})", jk.name, et.name))
            })?;
            keys.push(KeyColumn::of(col, jk.r#type(), &jk.name, what)?);
        }
        let time = batch
            .column_by_name(time_column)
            .ok_or_else(|| invalid(format!("{what}: missing time column {time_column:?}")))?;
        Ok(KeyedBatch { keys, times: micros_column(time, time_column, what)?, rows: batch.num_rows() })
    }

    fn encoded_key(&self, i: usize, what: &str) -> Result<Vec<u8>> {
        let parts: Vec<KeyPart<'_>> = self.keys.iter().map(|k| k.part(i)).collect();
        let key = encode_entity_key(&parts);
        quiver_storage::types::check_entity_key(&key).map_err(|e| invalid(format!("{what}: row {i}: {e}")))?;
        Ok(key)
    }
}

/// A join's spine from an Arrow IPC stream.
pub struct ArrowSpine {
    batches: Vec<KeyedBatch>,
    /// Row number of each batch's first row (and the total at the end).
    starts: Vec<usize>,
}

impl ArrowSpine {
    /// Reads the IPC stream and checks its key and time columns against the entity type.
    pub fn decode(ipc: &[u8], et: &pb::EntityType, time_column: &str) -> Result<ArrowSpine> {
        let reader = arrow_ipc::reader::StreamReader::try_new(Cursor::new(ipc), None)
            .map_err(|e| invalid(format!("spine_ipc is not an Arrow IPC stream: {e}")))?;
        let (mut batches, mut starts) = (Vec::new(), vec![0]);
        for batch in reader {
            let batch = batch.map_err(|e| invalid(format!("spine_ipc: {e}")))?;
            let at = starts[starts.len() - 1];
            let what = format!("spine rows {at}..{}", at + batch.num_rows());
            let keyed = KeyedBatch::new(&batch, et, time_column, &what)?;
            starts.push(at + keyed.rows);
            batches.push(keyed);
        }
        Ok(ArrowSpine { batches, starts })
    }

    /// The spine's rows as protobuf spine rows, in order: the parts a forwarding node sends to
    /// the other owners (`server/CLUSTER.md` §6) travel over the protobuf join.
    fn proto_rows(&self) -> Vec<pb::SpineRow> {
        let mut out = Vec::with_capacity(self.len());
        for b in &self.batches {
            for i in 0..b.rows {
                out.push(pb::SpineRow {
                    entity: Some(pb::EntityKey { parts: b.keys.iter().map(|k| k.proto(i)).collect() }),
                    timestamp: Some(crate::convert::timestamp(b.times[i])),
                });
            }
        }
        out
    }
}

impl SpineRows for ArrowSpine {
    fn len(&self) -> usize {
        self.starts[self.starts.len() - 1]
    }

    fn check(&self, _et: &pb::EntityType, range: std::ops::Range<usize>) -> Result<Vec<(Vec<u8>, EventTime)>> {
        let mut out = Vec::with_capacity(range.len());
        let mut b = self.starts.partition_point(|&s| s <= range.start).saturating_sub(1);
        for row in range {
            while row >= self.starts[b + 1] {
                b += 1;
            }
            let (batch, i) = (&self.batches[b], row - self.starts[b]);
            out.push((batch.encoded_key(i, &format!("spine row {row}"))?, EventTime(batch.times[i])));
        }
        Ok(out)
    }
}

/// Values of an Arrow column as API values of a feature's type (None where null).
fn column_values(a: &ArrayRef, t: pb::ValueType, name: &str) -> Result<Vec<Option<pb::Value>>> {
    use pb::value::Kind;
    let bad = || invalid(format!("column {name:?} holds {}, which cannot feed a {t:?} feature", a.data_type()));
    let n = a.len();
    let valid = |i: usize| a.is_valid(i);
    let wrap = |k: Kind| Some(pb::Value { kind: Some(k) });
    let floats = |a: &ArrayRef| -> Option<Vec<f64>> {
        match a.data_type() {
            DataType::Float64 => Some(a.as_primitive::<Float64Type>().values().to_vec()),
            DataType::Float32 => Some(a.as_primitive::<Float32Type>().values().iter().map(|&v| f64::from(v)).collect()),
            _ => integers(a).map(|v| v.into_iter().map(|x| x as f64).collect()),
        }
    };
    let out: Vec<Option<pb::Value>> = match t {
        pb::ValueType::Bool => {
            let DataType::Boolean = a.data_type() else { return Err(bad()) };
            let b = a.as_boolean();
            (0..n).map(|i| valid(i).then(|| pb::Value { kind: Some(Kind::BoolValue(b.value(i))) })).collect()
        }
        pb::ValueType::Int64 => {
            let v = integers(a).ok_or_else(bad)?;
            (0..n).map(|i| if valid(i) { wrap(Kind::Int64Value(v[i])) } else { None }).collect()
        }
        pb::ValueType::Float32 => {
            if let DataType::Float32 = a.data_type() {
                let v = a.as_primitive::<Float32Type>().values();
                (0..n).map(|i| if valid(i) { wrap(Kind::Float32Value(v[i])) } else { None }).collect()
            } else {
                let v = floats(a).ok_or_else(bad)?;
                (0..n).map(|i| if valid(i) { wrap(Kind::Float32Value(v[i] as f32)) } else { None }).collect()
            }
        }
        pb::ValueType::Float64 => {
            let v = floats(a).ok_or_else(bad)?;
            (0..n).map(|i| if valid(i) { wrap(Kind::Float64Value(v[i])) } else { None }).collect()
        }
        pb::ValueType::String => {
            let s = KeyColumn::Str(a.clone());
            if !matches!(a.data_type(), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) {
                return Err(bad());
            }
            (0..n)
                .map(|i| if valid(i) { wrap(Kind::StringValue(s.str_at(i).unwrap_or("").to_string())) } else { None })
                .collect()
        }
        pb::ValueType::Bytes => {
            let bytes = |i: usize| -> Vec<u8> {
                match a.data_type() {
                    DataType::LargeBinary => a.as_binary::<i64>().value(i).to_vec(),
                    _ => a.as_binary::<i32>().value(i).to_vec(),
                }
            };
            if !matches!(a.data_type(), DataType::Binary | DataType::LargeBinary) {
                return Err(bad());
            }
            (0..n).map(|i| if valid(i) { wrap(Kind::BytesValue(bytes(i))) } else { None }).collect()
        }
        pb::ValueType::Float32Vector | pb::ValueType::Int64List | pb::ValueType::StringList => {
            let inner_t = match t {
                pb::ValueType::Float32Vector => pb::ValueType::Float32,
                pb::ValueType::Int64List => pb::ValueType::Int64,
                _ => pb::ValueType::String,
            };
            let lists: Vec<Option<ArrayRef>> = match a.data_type() {
                DataType::List(_) => a.as_list::<i32>().iter().collect(),
                DataType::LargeList(_) => a.as_list::<i64>().iter().collect(),
                _ => return Err(bad()),
            };
            let mut out = Vec::with_capacity(n);
            for l in lists {
                let Some(l) = l else {
                    out.push(None);
                    continue;
                };
                // An empty list may come typed list<null> (nothing to infer from).
                let items = if l.is_empty() { Vec::new() } else { column_values(&l, inner_t, name)? };
                let items: Vec<pb::Value> = items
                    .into_iter()
                    .map(|v| v.ok_or_else(|| invalid(format!("column {name:?}: a list holds a null"))))
                    .collect::<Result<_>>()?;
                let kind = match t {
                    pb::ValueType::Float32Vector => Kind::Float32Vector(pb::Float32List {
                        values: items
                            .iter()
                            .map(|v| if let Some(Kind::Float32Value(x)) = v.kind { x } else { 0.0 })
                            .collect(),
                    }),
                    pb::ValueType::Int64List => Kind::Int64List(pb::Int64List {
                        values: items
                            .iter()
                            .map(|v| if let Some(Kind::Int64Value(x)) = v.kind { x } else { 0 })
                            .collect(),
                    }),
                    _ => Kind::StringList(pb::StringList {
                        values: items
                            .into_iter()
                            .map(|v| if let Some(Kind::StringValue(s)) = v.kind { s } else { String::new() })
                            .collect(),
                    }),
                };
                out.push(wrap(kind));
            }
            out
        }
        pb::ValueType::Unspecified => return Err(bad()),
    };
    Ok(out)
}

/// One Arrow batch of a DoPut as WriteFeatures requests within the request limits. Unless
/// `routed` (the requests will go to their rows' owners), a sharded node refuses the batch whole
/// if it names an entity of another node's slot.
fn write_requests(
    features: &Features,
    cmd: &pb::FlightWrite,
    batch_no: u64,
    batch: &RecordBatch,
    routed: bool,
) -> Result<Vec<pb::WriteFeaturesRequest>> {
    let what = format!("batch {batch_no}");
    let resolved = features.registry().resolve_group(&cmd.group)?;
    let et_name = resolved.first().map(|f| f.entity_type.clone()).unwrap_or_default();
    let et = features.registry().entity_type(&et_name)?;
    let time_column = if cmd.timestamp_column.is_empty() { DEFAULT_TIMESTAMP_COLUMN } else { &cmd.timestamp_column };
    let keyed = KeyedBatch::new(batch, &et, time_column, &what)?;
    // A sharded node refuses the whole batch before any of its requests is written.
    if features.is_sharded() && !routed {
        let keys = (0..keyed.rows).map(|i| keyed.encoded_key(i, &what)).collect::<Result<Vec<_>>>()?;
        features.check_owned(keys.iter().map(Vec::as_slice))?;
    }
    let mut columns = Vec::new();
    for (field, col) in batch.schema().fields().iter().zip(batch.columns()) {
        let name = field.name();
        if name == time_column || et.join_keys.iter().any(|k| &k.name == name) {
            continue;
        }
        let f = resolved.iter().find(|f| &f.feature == name).ok_or_else(|| {
            invalid(match crate::features::aggregate_refusal(features.registry(), &cmd.group, name) {
                Some(why) => format!("{what}: {why}"),
                None => format!(
                    "{what}: column {name:?} is not a feature of {} (nor a join key or the time column)",
                    cmd.group
                ),
            })
        })?;
        columns
            .push((name.clone(), column_values(col, f.value_type, name).map_err(|e| invalid(format!("{what}: {e}")))?));
    }
    if columns.is_empty() {
        return Err(invalid(format!("{what}: no feature columns")));
    }
    let rows_per_request = WRITE_ROWS_MAX.min(WRITE_VALUES_MAX / columns.len()).max(1);
    let mut out = Vec::new();
    for (r, start) in (0..keyed.rows).step_by(rows_per_request).enumerate() {
        let end = (start + rows_per_request).min(keyed.rows);
        let mut rows = Vec::with_capacity(end - start);
        for i in start..end {
            let mut values = std::collections::HashMap::with_capacity(columns.len());
            for (name, vals) in &mut columns {
                if let Some(v) = vals[i].take() {
                    values.insert(name.clone(), v);
                }
            }
            rows.push(pb::WriteRow {
                entity: Some(pb::EntityKey { parts: keyed.keys.iter().map(|k| k.proto(i)).collect() }),
                group: cmd.group.clone(),
                event_time: Some(crate::convert::timestamp(keyed.times[i])),
                values,
                ..Default::default()
            });
        }
        let idempotency_key = if cmd.idempotency_key.is_empty() {
            String::new()
        } else {
            format!("{}/{batch_no}/{r}", cmd.idempotency_key)
        };
        if idempotency_key.len() > IDEMPOTENCY_KEY_BYTES_MAX {
            return Err(invalid(format!(
                "idempotency key {idempotency_key:?} is over {IDEMPOTENCY_KEY_BYTES_MAX} bytes (with /<batch>/<request>)"
            )));
        }
        out.push(pb::WriteFeaturesRequest { rows, durability: cmd.durability, idempotency_key });
    }
    Ok(out)
}

fn flight_status(e: FlightError) -> Status {
    match e {
        FlightError::Tonic(s) => *s,
        other => Status::invalid_argument(other.to_string()),
    }
}

type FlightStream<T> = BoxStream<T>;

/// Record batches of `schema` as a `DoGet` answer: the schema first, dictionaries sent with
/// each batch (the join's status columns; a scan has none), an error ending the stream.
fn encoded(
    schema: SchemaRef,
    batches: impl futures::Stream<Item = Result<RecordBatch, Status>> + Send + 'static,
) -> FlightStream<FlightData> {
    Box::pin(
        FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .with_dictionary_handling(DictionaryHandling::Resend)
            .build(batches.map_err(|s| FlightError::Tonic(Box::new(s))))
            .map_err(flight_status),
    )
}

#[tonic::async_trait]
impl FlightService for FlightApi {
    type HandshakeStream = FlightStream<HandshakeResponse>;
    type ListFlightsStream = FlightStream<FlightInfo>;
    type DoGetStream = FlightStream<FlightData>;
    type DoPutStream = FlightStream<PutResult>;
    type DoExchangeStream = FlightStream<FlightData>;
    type DoActionStream = FlightStream<arrow_flight::Result>;
    type ListActionsStream = FlightStream<ActionType>;

    async fn do_get(&self, req: Request<Ticket>) -> Result<Response<Self::DoGetStream>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("FlightDoGet", async move {
                let ticket = pb::FlightTicket::decode(req.get_ref().ticket.as_ref())
                    .map_err(|e| Status::invalid_argument(format!("ticket is not a quiver.v1.FlightTicket: {e}")))?;
                let join = match ticket.kind {
                    Some(pb::flight_ticket::Kind::Join(join)) => join,
                    Some(pb::flight_ticket::Kind::Scan(scan)) => return self.scan(&req, scan).await,
                    // An empty ticket, or a kind this server does not know (a newer client).
                    None => {
                        return Err(Status::unimplemented(
                            "the ticket holds no request this server serves (it serves join and scan)",
                        ))
                    }
                };
                let p = authorize(&req, Scope::Read, join.features.iter().map(String::as_str))?;
                // The spine, and its answers: the rows are not counted before the spine is
                // decoded, so the reservation takes the most the IPC bytes can hold (a row
                // has at least its 8-byte time).
                let answers = self.features.join_answer_bytes(join.spine_ipc.len() / 8, join.features.len());
                let admitted = self.admission.admit(join.spine_ipc.len() * DECODED_BYTES_PER_ENCODED + answers)?;
                let f = self.features.clone();
                let stopping = self.stopping.clone();
                let forwarder = self.api.forwarding(req.metadata());
                let routes = forwarder.is_some();
                // The spine is decoded and checked off the async threads; on a node that
                // forwards, it is checked whole and split by owner (`None`: all of it here).
                let (spine, schema, join, split) = blocking(move || {
                    let et = f.registry().entity_type(&join.entity_type).map_err(|e| status(e.into()))?;
                    let time_column = if join.timestamp_column.is_empty() {
                        DEFAULT_TIMESTAMP_COLUMN
                    } else {
                        &join.timestamp_column
                    };
                    let spine = ArrowSpine::decode(&join.spine_ipc, &et, time_column).map_err(status)?;
                    let spec = spec_of(&join);
                    let columns = f.join_columns(&spec).map_err(status)?;
                    let schema = Arc::new(answer_schema(&join.features, &columns, join.with_status));
                    let split = if routes && spine.len() <= SPINE_ROWS_MAX {
                        let keys: Vec<Vec<u8>> =
                            spine.check(&et, 0..spine.len()).map_err(status)?.into_iter().map(|(k, _)| k).collect();
                        f.route(&keys).map_err(status)?
                    } else {
                        None
                    };
                    Ok((spine, schema, join, split))
                })
                .await?;
                p.take_values(
                    spine.len().min(SPINE_ROWS_MAX) as u64 * join.features.len().min(FEATURES_PER_REQUEST_MAX) as u64,
                )?;
                if let (Some(split), Some(fw)) = (split, forwarder) {
                    // Split over shards: the parts go over the protobuf join, their answers
                    // merged in spine order and turned into Arrow here.
                    let with_status = join.with_status;
                    let request = pb::GetHistoricalFeaturesRequest {
                        entity_type: join.entity_type,
                        spine: spine.proto_rows(),
                        features: join.features,
                        known_at: join.known_at,
                        strict_availability: join.strict_availability,
                        use_defaults: join.use_defaults,
                    };
                    drop(spine);
                    let chunks = self.api.join_split(&fw, req.metadata(), request, split)?;
                    let batch_schema = schema.clone();
                    let batches = chunks.map(move |chunk| {
                        let _admitted = &admitted;
                        answer_batch(&batch_schema, chunk?, with_status).map_err(status)
                    });
                    return Ok(Response::new(encoded(schema, batches)));
                }
                let f = self.features.clone();
                let batch_schema = schema.clone();
                let batches = stream_blocking(stopping, move |emit: &mut dyn FnMut(RecordBatch) -> bool| {
                    let _admitted = admitted;
                    let mut failed = None;
                    let spec = spec_of(&join);
                    f.join(&spec, &spine, |chunk| match answer_batch(&batch_schema, chunk, join.with_status) {
                        Ok(b) => emit(b),
                        Err(e) => {
                            failed = Some(e);
                            false
                        }
                    })?;
                    failed.map_or(Ok(()), Err)
                });
                Ok(Response::new(encoded(schema, batches)))
            })
            .await
    }

    async fn do_put(&self, req: Request<Streaming<FlightData>>) -> Result<Response<Self::DoPutStream>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("FlightDoPut", async move {
                let principal = authorize(&req, Scope::Write, [])?;
                let mut ticket = self.admission.admit(0)?;
                let caller = req.metadata().clone();
                let mut input = req.into_inner();
                let first = input.message().await?.ok_or_else(|| {
                    Status::invalid_argument("DoPut: no messages (a descriptor and a schema come first)")
                })?;
                let cmd = first
                    .flight_descriptor
                    .as_ref()
                    .ok_or_else(|| Status::invalid_argument("DoPut: the first message has no FlightDescriptor"))
                    .and_then(|d| {
                        pb::FlightWrite::decode(d.cmd.as_ref()).map_err(|e| {
                            Status::invalid_argument(format!(
                                "DoPut: the descriptor's cmd is not a quiver.v1.FlightWrite: {e}"
                            ))
                        })
                    })?;
                principal.require_group(Scope::Write, &cmd.group)?;
                let cmd = Arc::new(cmd);
                // On a node that forwards, each request goes to its rows' owners; one that
                // does not refuses a batch naming another node's entity before writing any.
                let routes = self.api.forwarding(&caller).is_some();
                let rest = futures::stream::once(async move { Ok(first) })
                    .chain(input)
                    .map_err(|s| FlightError::Tonic(Box::new(s)));
                let mut batches = arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(rest);
                let mut results = Vec::new();
                let mut batch_no = 0u64;
                let mut stopping = self.stopping.clone();
                loop {
                    let next = match stopping.as_mut() {
                        Some(s) => tokio::select! {
                            b = batches.next() => b,
                            Ok(_) = s.wait_for(|stop| *stop) => return Err(Status::unavailable(format!(
                                "the server is stopping; the call's first {batch_no} batches were applied"
                            ))),
                        },
                        None => batches.next().await,
                    };
                    let Some(batch) = next else { break };
                    let batch = batch.map_err(flight_status)?;
                    let in_batch = |s: Status| {
                        let message = format!("DoPut batch {batch_no} (earlier batches were applied): {}", s.message());
                        Status::with_details(s.code(), message, s.details().to_vec().into())
                    };
                    if batch_no > 0 {
                        principal.take_request().map_err(in_batch)?;
                    }
                    // The batch's own bytes (its arrays may share the whole message's buffer, which
                    // get_array_memory_size would count once per column).
                    let bytes: usize =
                        batch.columns().iter().map(|c| c.to_data().get_slice_memory_size().unwrap_or(0)).sum();
                    let reserved = bytes * (DECODED_BYTES_PER_ENCODED + 1);
                    if !ticket.charge(reserved) {
                        return Err(in_batch(crate::admission::shed_status(
                            "overloaded: requests in flight hold the memory this batch needs; retry shortly".into(),
                        )));
                    }
                    let (f, c) = (self.features.clone(), cmd.clone());
                    let rows = batch.num_rows() as u64;
                    let requests = blocking(move || write_requests(&f, &c, batch_no, &batch, routes).map_err(status))
                        .await
                        .map_err(in_batch)?;
                    let mut result = pb::FlightWriteResult { batch: batch_no, rows, ..Default::default() };
                    for r in requests {
                        let values: u64 = r.rows.iter().map(|w| w.values.len() as u64).sum();
                        principal.take_values(values).map_err(in_batch)?;
                        let resp = self.api.write_routed(&caller, r).await.map_err(in_batch)?;
                        result.values_written += resp.values_written;
                        result.requests += 1;
                        result.system_time = resp.system_time;
                        result.version = resp.version;
                        if resp.deduplicated {
                            result.deduplicated += 1;
                        }
                    }
                    ticket.refund(reserved);
                    results.push(Ok(PutResult { app_metadata: result.encode_to_vec().into() }));
                    batch_no += 1;
                }
                Ok(Response::new(Box::pin(futures::stream::iter(results)) as Self::DoPutStream))
            })
            .await
    }

    async fn handshake(
        &self,
        _: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        Err(unimplemented_status("Handshake (authenticate with `authorization: Bearer <token>` on each call)"))
    }

    async fn list_flights(&self, _: Request<Criteria>) -> Result<Response<Self::ListFlightsStream>, Status> {
        Err(unimplemented_status("ListFlights"))
    }

    async fn get_flight_info(&self, _: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        Err(unimplemented_status("GetFlightInfo (call DoGet with a FlightTicket directly)"))
    }

    async fn poll_flight_info(&self, _: Request<FlightDescriptor>) -> Result<Response<PollInfo>, Status> {
        Err(unimplemented_status("PollFlightInfo"))
    }

    async fn get_schema(&self, _: Request<FlightDescriptor>) -> Result<Response<SchemaResult>, Status> {
        Err(unimplemented_status("GetSchema"))
    }

    async fn do_exchange(&self, _: Request<Streaming<FlightData>>) -> Result<Response<Self::DoExchangeStream>, Status> {
        Err(unimplemented_status("DoExchange"))
    }

    async fn do_action(&self, _: Request<Action>) -> Result<Response<Self::DoActionStream>, Status> {
        Err(unimplemented_status("DoAction"))
    }

    async fn list_actions(&self, _: Request<Empty>) -> Result<Response<Self::ListActionsStream>, Status> {
        Err(unimplemented_status("ListActions"))
    }
}

impl FlightApi {
    /// DoGet of a history scan: ScanHistory's versions as Arrow (flight.proto, FlightTicket).
    async fn scan(
        &self,
        req: &Request<Ticket>,
        scan: pb::ScanHistoryRequest,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        authorize(req, Scope::Read, scan.features.iter().map(String::as_str).chain([scan.group.as_str()]))?;
        let admitted = self.admission.admit(scan.encoded_len() * DECODED_BYTES_PER_ENCODED + SCAN_RESERVE_BYTES)?;
        let f = self.features.clone();
        let (scan, features) = blocking(move || {
            let registry = f.registry();
            let features = if scan.features.is_empty() {
                registry.resolve_group(&scan.group)
            } else {
                registry.resolve_written_at(&scan.features, quiver_storage::SystemTime::MAX)
            }
            .map_err(|e| status(e.into()))?;
            Ok((scan, features))
        })
        .await?;
        let columns: Vec<(String, pb::ValueType)> =
            features.iter().map(|f| (format!("{}@{}:{}", f.group, f.version, f.feature), f.value_type)).collect();
        let schema = Arc::new(scan_schema(&columns));
        let batch_schema = schema.clone();
        // An entity another node owns: its owner's protobuf stream, turned into Arrow here.
        if let Some(chunks) = self.api.scan_elsewhere(req.metadata(), &scan).await? {
            let batches = chunks.map(move |chunk| {
                let _admitted = &admitted;
                scan_batch(&batch_schema, &columns, chunk?).map_err(status)
            });
            return Ok(Response::new(encoded(schema, batches)));
        }
        let f = self.features.clone();
        let batches = stream_blocking(self.stopping.clone(), move |emit: &mut dyn FnMut(RecordBatch) -> bool| {
            let _admitted = admitted;
            let mut failed = None;
            f.scan_history(&scan, |chunk| match scan_batch(&batch_schema, &columns, chunk) {
                Ok(b) => emit(b),
                Err(e) => {
                    failed = Some(e);
                    false
                }
            })?;
            failed.map_or(Ok(()), Err)
        });
        Ok(Response::new(encoded(schema, batches)))
    }
}

/// The schema of a history scan's batches over `columns` (ref, type).
pub fn scan_schema(columns: &[(String, pb::ValueType)]) -> Schema {
    let list = |dt: DataType| DataType::List(Arc::new(Field::new_list_field(dt, true)));
    let mut fields = vec![
        Field::new("feature", DataType::Utf8, false),
        Field::new("event_timestamp", timestamp_type(), false),
        Field::new("system_timestamp", timestamp_type(), false),
        Field::new("deleted", DataType::Boolean, false),
        Field::new("version_regions", list(DataType::UInt32), false),
        Field::new("version_counters", list(DataType::UInt64), false),
    ];
    fields.extend(columns.iter().map(|(r, t)| Field::new(r, arrow_type(*t), true)));
    Schema::new(fields)
}

/// One ScanHistory chunk as a record batch of [`scan_schema`].
pub fn scan_batch(
    schema: &SchemaRef,
    columns: &[(String, pb::ValueType)],
    chunk: pb::ScanHistoryResponse,
) -> Result<RecordBatch> {
    use arrow_array::builder::{UInt32Builder, UInt64Builder};
    let n = chunk.versions.len();
    let micros = |t: &Option<prost_types::Timestamp>| {
        t.as_ref().map_or(0, |t| t.seconds * 1_000_000 + i64::from(t.nanos / 1000))
    };
    let mut regions = ListBuilder::new(UInt32Builder::new());
    let mut counters = ListBuilder::new(UInt64Builder::new());
    let mut per_feature: Vec<(pb::FeatureColumn, Vec<bool>)> = columns
        .iter()
        .map(|(r, t)| {
            (
                pb::FeatureColumn { feature_ref: r.clone(), r#type: *t as i32, ..Default::default() },
                Vec::with_capacity(n),
            )
        })
        .collect();
    for v in &chunk.versions {
        for e in v.version.iter().flat_map(|vv| &vv.entries) {
            regions.values().append_value(e.region);
            counters.values().append_value(e.counter);
        }
        regions.append(true);
        counters.append(true);
        for (col, valid) in &mut per_feature {
            let value = match &v.value {
                Some(x) if col.feature_ref == v.feature_ref => {
                    Some(crate::convert::to_engine(x, col.r#type(), &col.feature_ref)?)
                }
                _ => None,
            };
            valid.push(value.is_some());
            crate::convert::push_value(col, col.r#type(), value.as_ref());
        }
    }
    let mut arrays: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(chunk.versions.iter().map(|v| v.feature_ref.as_str()))),
        Arc::new(
            TimestampMicrosecondArray::from(chunk.versions.iter().map(|v| micros(&v.event_time)).collect::<Vec<_>>())
                .with_timezone("UTC"),
        ),
        Arc::new(
            TimestampMicrosecondArray::from(chunk.versions.iter().map(|v| micros(&v.system_time)).collect::<Vec<_>>())
                .with_timezone("UTC"),
        ),
        Arc::new(BooleanArray::from(chunk.versions.iter().map(|v| v.value.is_none()).collect::<Vec<_>>())),
        Arc::new(regions.finish()),
        Arc::new(counters.finish()),
    ];
    for (col, valid) in &mut per_feature {
        let nulls = valid.iter().any(|v| !v).then(|| NullBuffer::from(valid.as_slice()));
        arrays.push(feature_array(col.r#type(), col, valid, nulls)?);
    }
    RecordBatch::try_new(schema.clone(), arrays).map_err(|e| invalid(format!("scan batch: {e}")))
}

fn unimplemented_status(what: &str) -> Status {
    Status::unimplemented(format!("Flight {what} is not served; quiverd serves DoGet (joins) and DoPut (writes)"))
}

fn spec_of(join: &pb::FlightJoin) -> JoinSpec<'_> {
    JoinSpec {
        entity_type: &join.entity_type,
        features: &join.features,
        known_at: join.known_at.as_ref(),
        strict_availability: join.strict_availability,
        use_defaults: join.use_defaults,
        // Answered only with the statuses (see answer_batch).
        event_times: join.with_status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::TimestampNanosecondArray;

    fn column(statuses: &[pb::FeatureStatus], values: Vec<f64>, times: Vec<i64>) -> pb::FeatureColumn {
        pb::FeatureColumn {
            feature_ref: "g:f".into(),
            group_version: 3,
            r#type: pb::ValueType::Float64 as i32,
            statuses: statuses.iter().map(|s| *s as i32).collect(),
            event_times_us: times,
            float64_values: values,
            ..Default::default()
        }
    }

    #[test]
    fn answers_are_null_where_nothing_is_served_and_statuses_keep_their_names() {
        use pb::FeatureStatus::*;
        let refs = vec!["g:f".to_string()];
        let schema = Arc::new(answer_schema(&refs, &[(pb::ValueType::Float64, 3)], true));
        let chunk = pb::GetHistoricalFeaturesResponse {
            first_row: 0,
            columns: vec![column(&[Present, NotFound, Defaulted, Stale], vec![1.5, 0.0, 7.0, 0.0], vec![10, 0, 0, 0])],
        };
        let b = answer_batch(&schema, chunk, true).expect("batch");
        let v = b.column(0).as_primitive::<Float64Type>();
        assert_eq!((v.value(0), v.is_null(1), v.value(2), v.is_null(3)), (1.5, true, 7.0, true));
        let s = b.column(1).as_dictionary::<Int8Type>();
        let names = s.values().as_string::<i32>();
        let got: Vec<&str> = s.keys().values().iter().map(|&k| names.value(k as usize)).collect();
        assert_eq!(got, ["PRESENT", "NOT_FOUND", "DEFAULTED", "STALE"]);
        let t = b.column(2).as_primitive::<TimestampMicrosecondType>();
        assert_eq!((t.value(0), t.is_null(1), t.is_null(2)), (10, true, true));
        assert_eq!(schema.field(0).metadata().get(GROUP_VERSION_METADATA).map(String::as_str), Some("3"));
        // A column whose values do not line up with its statuses is refused, not sliced.
        let short = pb::GetHistoricalFeaturesResponse {
            first_row: 0,
            columns: vec![column(&[Present, Present], vec![1.0], vec![1, 1])],
        };
        assert!(matches!(answer_batch(&schema, short, true), Err(ServiceError::Invalid(_))));
        // A reference that resolves to another version than the schema announced: refused.
        let mut moved = column(&[Present], vec![1.0], vec![1]);
        moved.group_version = 4;
        let moved = pb::GetHistoricalFeaturesResponse { first_row: 0, columns: vec![moved] };
        assert!(matches!(answer_batch(&schema, moved, true), Err(ServiceError::Refused(_))));
    }

    #[test]
    fn times_are_whole_microseconds_within_protobufs_range() {
        let ns: ArrayRef = Arc::new(TimestampNanosecondArray::from(vec![1_000, 2_001]));
        let e = micros_column(&ns, "t", "spine").expect_err("a nanosecond part");
        assert!(e.to_string().contains("row 1") && e.to_string().contains("below a microsecond"), "{e}");
        let ok: ArrayRef = Arc::new(TimestampNanosecondArray::from(vec![1_000, -3_000]));
        assert_eq!(micros_column(&ok, "t", "spine").expect("whole"), vec![1, -3]);
        let far: ArrayRef = Arc::new(arrow_array::TimestampSecondArray::from(vec![TIMESTAMP_SECONDS_MAX + 1]));
        assert!(micros_column(&far, "t", "spine").is_err());
        let overflow: ArrayRef = Arc::new(arrow_array::TimestampSecondArray::from(vec![i64::MAX]));
        assert!(micros_column(&overflow, "t", "spine").is_err());
        let not_time: ArrayRef = Arc::new(Int64Array::from(vec![1]));
        assert!(micros_column(&not_time, "t", "spine").is_err());
    }

    #[test]
    fn columns_feed_only_features_of_a_fitting_type() {
        let ints: ArrayRef = Arc::new(arrow_array::Int32Array::from(vec![Some(1), None]));
        let v = column_values(&ints, pb::ValueType::Float64, "c").expect("ints feed floats");
        assert_eq!(v[0], Some(pb::Value { kind: Some(pb::value::Kind::Float64Value(1.0)) }));
        assert_eq!(v[1], None);
        assert!(column_values(&ints, pb::ValueType::String, "c").is_err());
        let big: ArrayRef = Arc::new(arrow_array::UInt64Array::from(vec![u64::MAX]));
        assert!(column_values(&big, pb::ValueType::Int64, "c").is_err());
        let strings: ArrayRef = Arc::new(StringArray::from(vec!["a"]));
        assert!(column_values(&strings, pb::ValueType::Bool, "c").is_err());
        let mut lists = ListBuilder::new(Int64Builder::new());
        lists.values().append_value(5);
        lists.values().append_null();
        lists.append(true);
        let lists: ArrayRef = Arc::new(lists.finish());
        let e = column_values(&lists, pb::ValueType::Int64List, "c").expect_err("a null inside a list");
        assert!(e.to_string().contains("null"), "{e}");
    }

    #[test]
    fn scan_rows_fill_only_their_own_features_column() {
        let columns = vec![("g@1:a".to_string(), pb::ValueType::Int64), ("g@1:b".to_string(), pb::ValueType::String)];
        let schema = Arc::new(scan_schema(&columns));
        let version =
            |region, counter| Some(pb::VersionVector { entries: vec![pb::version_vector::Entry { region, counter }] });
        let value = |k| Some(pb::Value { kind: Some(k) });
        let chunk = pb::ScanHistoryResponse {
            versions: vec![
                pb::HistoryVersion {
                    feature_ref: "g@1:b".into(),
                    event_time: Some(crate::convert::timestamp(5)),
                    system_time: Some(crate::convert::timestamp(9)),
                    value: value(pb::value::Kind::StringValue("x".into())),
                    version: version(2, 9),
                },
                pb::HistoryVersion {
                    feature_ref: "g@1:a".into(),
                    event_time: Some(crate::convert::timestamp(-1)),
                    system_time: Some(crate::convert::timestamp(8)),
                    value: None,
                    version: version(0, 8),
                },
            ],
        };
        let b = scan_batch(&schema, &columns, chunk).expect("batch");
        assert_eq!(b.num_rows(), 2);
        let a = b.column_by_name("g@1:a").expect("a").as_primitive::<Int64Type>();
        let s = b.column_by_name("g@1:b").expect("b").as_string::<i32>();
        assert!(a.is_null(0) && a.is_null(1), "a tombstone has no value");
        assert_eq!((s.value(0), s.is_null(1)), ("x", true));
        let deleted = b.column_by_name("deleted").expect("deleted").as_boolean();
        assert_eq!((deleted.value(0), deleted.value(1)), (false, true));
        let t = b.column_by_name("event_timestamp").expect("t").as_primitive::<TimestampMicrosecondType>();
        assert_eq!((t.value(0), t.value(1)), (5, -1));
        let counters = b.column_by_name("version_counters").expect("v").as_list::<i32>();
        assert_eq!(counters.value(0).as_primitive::<UInt64Type>().values().to_vec(), vec![9]);
        // A value of the wrong type for its feature is refused.
        let bad = pb::ScanHistoryResponse {
            versions: vec![pb::HistoryVersion {
                feature_ref: "g@1:a".into(),
                value: value(pb::value::Kind::StringValue("not an int".into())),
                ..Default::default()
            }],
        };
        assert!(scan_batch(&schema, &columns, bad).is_err());
    }
}
