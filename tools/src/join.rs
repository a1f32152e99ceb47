//! `quiver join SPINE.csv|SPINE.parquet --feature group:feature ... -o OUT.parquet`: the
//! point-in-time join of a training spine over Arrow Flight (`DoGet` with a join ticket; see
//! `proto/quiver/v1/flight.proto`), written as Parquet.
//!
//! The spine has one column per join key of the features' entity type and a time column
//! (`event_time` unless `--time-column` says otherwise; a Parquet timestamp, or microseconds
//! since the epoch). The output has the spine's rows in the spine's order: the join keys, the
//! time as `event_time` (timestamp µs, UTC), and one nullable column per feature, named by the
//! feature (or `group__feature` when two requested groups share a feature name). A value is
//! null where the join found nothing within the TTL (NOT_FOUND, STALE); `--use-defaults` fills
//! registered defaults.
//!
//! The spine is read [`SPINE_ROWS_PER_REQUEST`] rows at a time (each row checked) and each part
//! sent as Arrow IPC in one ticket; the answer batches (feature columns only, in spine order)
//! are written to Parquet with their rows' keys as they arrive (the writer buffers up to a row
//! group), so memory holds one part of the spine and its answers whatever the spine's length.
//! The output goes to a temporary file renamed at the end: a join that fails midway (a bad row
//! in a later part, the server gone) leaves nothing at the output path. Flight moves columns
//! both ways: the server neither parses a protobuf message per spine row nor builds one per
//! answer row.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{
    BinaryBuilder, BooleanBuilder, Float32Builder, Float64Builder, Int64Builder, ListBuilder, StringBuilder,
};
use arrow_array::{Array, ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::Ticket;
use arrow_ipc::writer::StreamWriter;
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use futures::{StreamExt, TryStreamExt};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use prost::Message;
use quiver_proto::v1 as pb;

use crate::common::{fetch_group, grpc, Result, Server};
use crate::tabular;

/// Spine rows per join ticket (the server takes up to 10,000,000; smaller tickets keep each
/// message and each answer's memory modest).
pub const SPINE_ROWS_PER_REQUEST: usize = 1_000_000;

/// `arrays` (a spine chunk's key and time columns, [`SpineReader::next_chunk`]) as the Arrow IPC
/// stream a join ticket carries:
/// the join keys by name, then the time as `time_column` (the spine file's own name for it, so
/// the server's errors name it as the user does; it is not a join key's).
fn spine_ipc(arrays: &[ArrayRef], et: &pb::EntityType, time_column: &str) -> Result<Vec<u8>> {
    let names = et.join_keys.iter().map(|k| k.name.as_str()).chain([time_column]);
    let fields: Vec<Field> = names.zip(arrays).map(|(n, a)| Field::new(n, a.data_type().clone(), true)).collect();
    let batch =
        RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays.to_vec()).map_err(|e| format!("spine: {e}"))?;
    let mut w = StreamWriter::try_new(Vec::new(), &batch.schema()).map_err(|e| format!("spine: {e}"))?;
    w.write(&batch).map_err(|e| format!("spine: {e}"))?;
    w.finish().map_err(|e| format!("spine: {e}"))?;
    w.into_inner().map_err(|e| format!("spine: {e}"))
}

/// A Flight call's error as the CLI reports gRPC errors (code: message).
fn flight_error(e: FlightError) -> String {
    match e {
        FlightError::Tonic(s) => grpc(*s),
        e => format!("the server's answer: {e}"),
    }
}

/// What to join.
#[derive(Debug)]
pub struct JoinArgs {
    pub spine: PathBuf,
    pub output: PathBuf,
    pub features: Vec<String>,
    pub time_column: String,
    pub known_at_us: Option<i64>,
    pub strict_availability: bool,
    pub use_defaults: bool,
    pub compression: OutputCompression,
}

/// The output file's Parquet compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputCompression {
    /// zstd at level 1: the smallest files.
    Zstd,
    /// Snappy: most Parquet writers' default; writes faster, about twice the size for floats.
    Snappy,
    /// Uncompressed.
    None,
}

impl OutputCompression {
    fn parquet(self) -> Result<Compression> {
        Ok(match self {
            OutputCompression::Zstd => Compression::ZSTD(ZstdLevel::try_new(1).map_err(|e| e.to_string())?),
            OutputCompression::Snappy => Compression::SNAPPY,
            OutputCompression::None => Compression::UNCOMPRESSED,
        })
    }
}

/// What a join did.
#[derive(Debug)]
pub struct JoinSummary {
    pub rows: u64,
    /// Per feature column: output name and rows with a value.
    pub filled: Vec<(String, u64)>,
}

/// The spine file, read [`SPINE_ROWS_PER_REQUEST`] rows at a time as the Arrow columns a join
/// ticket carries (see [`spine_ipc`]): one per join key, then the time. Every row is checked.
struct SpineReader {
    path: PathBuf,
    source: SpineSource,
    time_column: String,
    /// Rows per chunk: [`SPINE_ROWS_PER_REQUEST`] (tests take fewer).
    chunk_rows: usize,
    /// The last Parquet batch, and the index in it of its first row not yet in a chunk.
    pending: Option<(tabular::KeyBatch, usize)>,
}

/// A spine time outside what the API carries is its row's error, not a null later.
fn check_time(path: &Path, time_column: &str, t: i64, at: tabular::Location) -> Result<()> {
    time_in_range(time_column, t).map_err(|e| format!("{}: {at}: {e}", path.display()))
}

/// Whether the API carries time `t` (µs); the error names `time_column`.
fn time_in_range(time_column: &str, t: i64) -> Result<()> {
    quiver_server::convert::micros(&quiver_server::convert::timestamp(t), time_column)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Where spine rows come from: a Parquet file's key and time columns a record batch at a time,
/// or a table row by row (CSV).
enum SpineSource {
    Columns(tabular::KeyBatches),
    Rows { table: Box<dyn tabular::Rows + Send>, cols: tabular::KeyColumns, et: pb::EntityType },
}

impl SpineReader {
    fn open(path: &Path, et: &pb::EntityType, time_column: &str) -> Result<SpineReader> {
        let see = |e: String| format!("{e} (see --time-column)");
        let source = if tabular::is_parquet(path) {
            SpineSource::Columns(tabular::KeyBatches::open(path, et, time_column, see)?)
        } else {
            let table = tabular::open(path)?;
            let cols = tabular::KeyColumns::locate(&path.display().to_string(), table.header(), et, time_column)
                .map_err(see)?;
            SpineSource::Rows { table, cols, et: et.clone() }
        };
        Ok(SpineReader {
            path: path.to_path_buf(),
            source,
            time_column: time_column.to_string(),
            chunk_rows: SPINE_ROWS_PER_REQUEST,
            pending: None,
        })
    }

    /// The next rows' key and time columns, at most `chunk_rows` rows (`None` at the end of
    /// the file).
    fn next_chunk(&mut self) -> Result<Option<Vec<ArrayRef>>> {
        if let SpineSource::Rows { table, cols, et } = &mut self.source {
            let mut rows = Vec::new();
            while rows.len() < self.chunk_rows {
                let Some((at, mut cells)) = table.next_row()? else { break };
                let (entity, t) = cols.take(at, &mut cells)?;
                check_time(&self.path, &self.time_column, t, at)?;
                rows.push(pb::SpineRow { entity: Some(entity), timestamp: Some(quiver_server::convert::timestamp(t)) });
            }
            return Ok((!rows.is_empty()).then(|| key_arrays(&rows, et)));
        }
        // Parquet: whole batches, the last one cut at the chunk's end (its rest starts the next).
        let mut parts: Vec<Vec<ArrayRef>> = Vec::new();
        let mut times: Vec<i64> = Vec::new();
        while times.len() < self.chunk_rows {
            let (batch, from) = match self.pending.take() {
                Some(p) => p,
                None => {
                    let SpineSource::Columns(reader) = &mut self.source else { break };
                    let column = self.time_column.as_str();
                    match reader.next_batch(|t| time_in_range(column, t))? {
                        Some(b) => (b, 0),
                        None => break,
                    }
                }
            };
            let take = (batch.times.len() - from).min(self.chunk_rows - times.len());
            parts.push(batch.keys.iter().map(|a| a.slice(from, take)).collect());
            times.extend_from_slice(&batch.times[from..from + take]);
            if from + take < batch.times.len() {
                self.pending = Some((batch, from + take));
            }
        }
        if times.is_empty() {
            return Ok(None);
        }
        let mut columns = Vec::with_capacity(parts[0].len() + 1);
        for k in 0..parts[0].len() {
            let pieces: Vec<&dyn Array> = parts.iter().map(|p| p[k].as_ref()).collect();
            columns.push(arrow_select::concat::concat(&pieces).map_err(|e| format!("{}: {e}", self.path.display()))?);
        }
        columns.push(Arc::new(TimestampMicrosecondArray::new(times.into(), None).with_timezone("UTC")));
        Ok(Some(columns))
    }
}

pub(crate) fn arrow_type(t: pb::ValueType) -> DataType {
    let item = |dt: DataType| DataType::List(Arc::new(Field::new("item", dt, true)));
    match t {
        pb::ValueType::Bool => DataType::Boolean,
        pb::ValueType::Int64 => DataType::Int64,
        pb::ValueType::Float32 => DataType::Float32,
        pb::ValueType::Float64 | pb::ValueType::Unspecified => DataType::Float64,
        pb::ValueType::String => DataType::Utf8,
        pb::ValueType::Bytes => DataType::Binary,
        pb::ValueType::Float32Vector => item(DataType::Float32),
        pb::ValueType::Int64List => item(DataType::Int64),
        pb::ValueType::StringList => item(DataType::Utf8),
    }
}

/// One feature column of the answer as Arrow, null where the status carries no value.
pub(crate) fn feature_array(c: &pb::FeatureColumn) -> ArrayRef {
    let n = c.statuses.len();
    let has = |i: usize| {
        matches!(
            pb::FeatureStatus::try_from(c.statuses[i]),
            Ok(pb::FeatureStatus::Present | pb::FeatureStatus::Defaulted)
        )
    };
    macro_rules! scalar {
        ($b:expr, $vals:expr) => {{
            let mut b = $b;
            for i in 0..n {
                b.append_option($vals.get(i).filter(|_| has(i)).cloned());
            }
            Arc::new(b.finish()) as ArrayRef
        }};
    }
    macro_rules! list {
        ($inner:expr, $vals:expr) => {{
            let mut b = ListBuilder::new($inner);
            for i in 0..n {
                match $vals.get(i).filter(|_| has(i)) {
                    Some(l) => {
                        for v in &l.values {
                            b.values().append_value(v.clone());
                        }
                        b.append(true);
                    }
                    None => b.append(false),
                }
            }
            Arc::new(b.finish()) as ArrayRef
        }};
    }
    match c.r#type() {
        pb::ValueType::Bool => scalar!(BooleanBuilder::with_capacity(n), c.bool_values),
        pb::ValueType::Int64 => scalar!(Int64Builder::with_capacity(n), c.int64_values),
        pb::ValueType::Float32 => scalar!(Float32Builder::with_capacity(n), c.float32_values),
        pb::ValueType::Float64 | pb::ValueType::Unspecified => {
            scalar!(Float64Builder::with_capacity(n), c.float64_values)
        }
        pb::ValueType::String => scalar!(StringBuilder::new(), c.string_values),
        pb::ValueType::Bytes => scalar!(BinaryBuilder::new(), c.bytes_values),
        pb::ValueType::Float32Vector => list!(Float32Builder::new(), c.float32_vector_values),
        pb::ValueType::Int64List => list!(Int64Builder::new(), c.int64_list_values),
        pb::ValueType::StringList => list!(StringBuilder::new(), c.string_list_values),
    }
}

/// Output column names: the feature name, or `group__feature` for every feature when two
/// requested features share a name.
pub(crate) fn output_names(refs: &[String]) -> Vec<String> {
    let feature = |r: &str| r.rsplit(':').next().unwrap_or(r).to_string();
    let names: Vec<String> = refs.iter().map(|r| feature(r)).collect();
    let unique = names.iter().collect::<std::collections::HashSet<_>>().len() == names.len();
    if unique {
        names
    } else {
        refs.iter().map(|r| r.replacen(':', "__", 1).replace('@', "_v")).collect()
    }
}

pub(crate) fn key_arrays(rows: &[pb::SpineRow], et: &pb::EntityType) -> Vec<ArrayRef> {
    use pb::key_part::Kind;
    let part = |r: &pb::SpineRow, j: usize| r.entity.as_ref().and_then(|e| e.parts.get(j)).and_then(|p| p.kind.clone());
    let mut out: Vec<ArrayRef> = et
        .join_keys
        .iter()
        .enumerate()
        .map(|(j, k)| match k.r#type() {
            pb::JoinKeyType::Int64 => Arc::new(Int64Array::from_iter(rows.iter().map(|r| match part(r, j) {
                Some(Kind::Int64Value(v)) => Some(v),
                _ => None,
            }))) as ArrayRef,
            _ => Arc::new(StringArray::from_iter(rows.iter().map(|r| match part(r, j) {
                Some(Kind::StringValue(s)) => Some(s),
                _ => None,
            }))) as ArrayRef,
        })
        .collect();
    let micros =
        |r: &pb::SpineRow| r.timestamp.as_ref().and_then(|t| quiver_server::convert::micros(t, "spine time").ok());
    out.push(Arc::new(TimestampMicrosecondArray::from_iter(rows.iter().map(micros)).with_timezone("UTC")));
    out
}

/// `quiver join`: runs the join and prints what it did (one JSON line with `json`).
pub async fn run(server: &Server, json: bool, args: JoinArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let output = args.output.clone();
    let s = join(server, args).await?;
    let secs = started.elapsed().as_secs_f64();
    if json {
        let filled: serde_json::Map<String, serde_json::Value> =
            s.filled.iter().map(|(n, c)| (n.clone(), (*c).into())).collect();
        let line = serde_json::json!({
            "rows": s.rows, "output": output.display().to_string(), "filled": filled, "seconds": secs,
        });
        println!("{line}");
    } else {
        let filled: Vec<String> = s.filled.iter().map(|(n, c)| format!("{n} {c}")).collect();
        println!(
            "joined {} spine rows in {secs:.2} s -> {} (rows with a value: {})",
            s.rows,
            output.display(),
            filled.join(", ")
        );
    }
    Ok(())
}

/// Joins the spine with the features and writes the Parquet output.
pub async fn join(server: &Server, args: JoinArgs) -> Result<JoinSummary> {
    let first = args.features.first().ok_or("give at least one --feature group:feature")?;
    let group = first.split_once(':').map(|(g, _)| g).ok_or_else(|| format!("bad feature reference {first:?}"))?;
    let ch = server.channel().await?;
    let (_, et) = fetch_group(&ch, group).await?;
    let mut spine = SpineReader::open(&args.spine, &et, &args.time_column)?;
    // The output is written to a temporary file beside it and renamed at the end: a join that
    // fails midway (a bad spine row in a later chunk, the server gone) leaves nothing there.
    let out = args.output.display().to_string();
    let dir = match args.output.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Readable as a file `File::create` makes (0644 less the umask), not a temporary file's 0600.
    let partial = tempfile::Builder::new()
        .prefix(".quiver-join-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .tempfile_in(&dir)
        .map_err(|e| format!("{out}: {e}"))?;

    let names = output_names(&args.features);
    let mut writer: Option<(ArrowWriter<File>, Arc<Schema>)> = None;
    let mut filled = vec![0u64; names.len()];
    let mut client =
        FlightServiceClient::new(ch).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX);
    let mut base = 0usize;
    loop {
        // Read on a blocking thread (the file may be large); the reader goes there and back.
        let (back, chunk) = tokio::task::spawn_blocking(move || {
            let chunk = spine.next_chunk();
            (spine, chunk)
        })
        .await
        .map_err(|e| format!("reading the spine: {e}"))?;
        spine = back;
        // The chunk's key and time columns: sent in the ticket, then sliced beside each answer.
        let Some(keys) = chunk? else { break };
        let rows = keys[0].len();
        let ticket = pb::FlightTicket {
            kind: Some(pb::flight_ticket::Kind::Join(pb::FlightJoin {
                entity_type: et.name.clone(),
                features: args.features.clone(),
                known_at: args.known_at_us.map(quiver_server::convert::timestamp),
                strict_availability: args.strict_availability,
                use_defaults: args.use_defaults,
                spine_ipc: spine_ipc(&keys, &et, &args.time_column)?,
                timestamp_column: args.time_column.clone(),
                with_status: false,
            })),
        };
        let flight = client.do_get(Ticket { ticket: ticket.encode_to_vec().into() }).await.map_err(grpc)?.into_inner();
        let mut answers = FlightRecordBatchStream::new_from_flight_data(flight.map_err(FlightError::from));
        let mut next = 0usize;
        while let Some(batch) = answers.next().await {
            let batch = batch.map_err(flight_error)?;
            let n = batch.num_rows();
            if batch.num_columns() != names.len() || next + n > rows {
                return Err(format!("the server's answer does not fit the spine at row {}", base + next));
            }
            let mut columns: Vec<ArrayRef> = keys.iter().map(|a| a.slice(next, n)).collect();
            for (j, a) in batch.columns().iter().enumerate() {
                filled[j] += (a.len() - a.null_count()) as u64;
                columns.push(a.clone());
            }
            if writer.is_none() {
                let mut fields: Vec<Field> = et
                    .join_keys
                    .iter()
                    .zip(&columns)
                    .map(|(k, a)| Field::new(&k.name, a.data_type().clone(), true))
                    .collect();
                fields.push(Field::new(
                    "event_time",
                    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                    true,
                ));
                for (name, a) in names.iter().zip(batch.columns()) {
                    fields.push(Field::new(name, a.data_type().clone(), true));
                }
                let file = partial.reopen().map_err(|e| format!("{out}: {e}"))?;
                // Dictionaries only for the join keys (which repeat): feature values rarely do,
                // and building their dictionaries cost more than the rest of the write.
                let mut props = WriterProperties::builder()
                    .set_compression(args.compression.parquet()?)
                    .set_dictionary_enabled(false);
                for k in &et.join_keys {
                    props = props.set_column_dictionary_enabled(ColumnPath::from(k.name.as_str()), true);
                }
                let props = props.build();
                let schema = Arc::new(Schema::new(fields));
                let w = ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(|e| format!("{out}: {e}"))?;
                writer = Some((w, schema));
            }
            if let Some((w, schema)) = writer.as_mut() {
                let batch = RecordBatch::try_new(schema.clone(), columns).map_err(|e| format!("{out}: {e}"))?;
                w.write(&batch).map_err(|e| format!("{out}: {e}"))?;
            }
            next += n;
        }
        if next != rows {
            return Err(format!("the server's answer ended early at spine row {}", base + next));
        }
        base += rows;
    }
    match writer {
        Some((w, _)) => {
            w.close().map_err(|e| format!("{out}: {e}"))?;
        }
        None => return Err(format!("{}: the spine has no rows", args.spine.display())),
    }
    partial.persist(&args.output).map_err(|e| format!("{out}: {}", e.error))?;
    Ok(JoinSummary { rows: base as u64, filled: names.into_iter().zip(filled).collect() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::cast::AsArray;
    use arrow_array::{LargeStringArray, TimestampMillisecondArray};

    fn user() -> pb::EntityType {
        pb::EntityType {
            name: "user".into(),
            join_keys: vec![pb::JoinKey { name: "user_id".into(), r#type: pb::JoinKeyType::String as i32 }],
            ..Default::default()
        }
    }

    fn write_parquet(path: &Path, columns: Vec<(&str, ArrayRef)>) {
        let batch = RecordBatch::try_from_iter(columns).expect("batch");
        let mut w = ArrowWriter::try_new(File::create(path).expect("create"), batch.schema(), None).expect("writer");
        w.write(&batch).expect("write");
        w.close().expect("close");
    }

    /// Every chunk of `path` read `chunk_rows` at a time: (keys, times) per chunk.
    fn chunks(path: &Path, chunk_rows: usize) -> Result<Vec<(Vec<String>, Vec<i64>)>> {
        let mut r = SpineReader::open(path, &user(), "ts")?;
        r.chunk_rows = chunk_rows;
        let mut out = Vec::new();
        while let Some(c) = r.next_chunk()? {
            assert!(c[0].len() <= chunk_rows);
            let keys = c[0].as_string::<i32>().iter().map(|k| k.expect("no nulls").to_string()).collect();
            let times = c[1].as_primitive::<arrow_array::types::TimestampMicrosecondType>().values().to_vec();
            out.push((keys, times));
        }
        Ok(out)
    }

    #[test]
    fn a_parquet_spine_read_by_columns_gives_the_rows_and_errors_of_the_row_path() {
        let tmp = tempfile::tempdir().expect("tmp");
        // Several Parquet batches (8,192 rows), cut into chunks at other places.
        let n = 20_000;
        let ids: Vec<String> = (0..n).map(|i| format!("u{}", (i * 7919) % 1000)).collect();
        let ts: Vec<i64> = (0..n).map(|i| 1_000_000 + i as i64 * 1_000).collect();
        let csv = tmp.path().join("spine.csv");
        let mut text = String::from("user_id,ts\n");
        for (u, t) in ids.iter().zip(&ts) {
            text.push_str(&format!("{u},{t}\n"));
        }
        std::fs::write(&csv, text).expect("csv");
        let fast = tmp.path().join("fast.parquet");
        write_parquet(
            &fast,
            vec![
                ("ts", Arc::new(Int64Array::from(ts.clone())) as ArrayRef),
                ("user_id", Arc::new(StringArray::from(ids.clone()))),
            ],
        );
        // Types the fast path does not take: converted cell by cell.
        let slow = tmp.path().join("slow.parquet");
        let ms: Vec<i64> = ts.iter().map(|t| t / 1_000).collect();
        write_parquet(
            &slow,
            vec![
                ("user_id", Arc::new(LargeStringArray::from(ids.clone())) as ArrayRef),
                ("ts", Arc::new(TimestampMillisecondArray::from(ms))),
            ],
        );
        let want = chunks(&csv, 5_000).expect("csv");
        assert_eq!(want.len(), 4);
        assert_eq!(want.iter().flat_map(|c| c.0.clone()).collect::<Vec<_>>(), ids);
        assert_eq!(want.iter().flat_map(|c| c.1.clone()).collect::<Vec<_>>(), ts);
        for file in [&fast, &slow] {
            assert_eq!(chunks(file, 5_000).expect("parquet"), want, "{}", file.display());
            assert_eq!(chunks(file, 1_000_000).expect("parquet").len(), 1);
        }

        // Bad rows past the first batch: the first one in row order is reported, whichever
        // column it is in; within a row, its key before its time.
        let bad = |key_row: usize, time_row: usize| {
            let path = tmp.path().join("bad.parquet");
            let ids: Vec<Option<String>> =
                ids.iter().enumerate().map(|(i, u)| (i + 1 != key_row).then(|| u.clone())).collect();
            let ts: Vec<i64> =
                ts.iter().enumerate().map(|(i, &t)| if i + 1 == time_row { i64::MAX } else { t }).collect();
            write_parquet(
                &path,
                vec![("user_id", Arc::new(StringArray::from(ids)) as ArrayRef), ("ts", Arc::new(Int64Array::from(ts)))],
            );
            chunks(&path, 5_000).expect_err("a bad row")
        };
        let err = bad(16_995, 16_990);
        assert!(err.contains("bad.parquet: row 16990: ts: ") && err.contains("9999-12-31"), "{err}");
        let err = bad(16_990, 16_995);
        assert_eq!(
            err,
            format!("{}: row 16990: user_id: a join key is missing", tmp.path().join("bad.parquet").display())
        );
        let err = bad(16_990, 16_990);
        assert!(err.ends_with("row 16990: user_id: a join key is missing"), "{err}");
        // A time column with nulls is converted cell by cell, and checked in the same pass: an
        // out-of-range time before a null is the one reported.
        let path = tmp.path().join("null_time.parquet");
        let mut times: Vec<Option<i64>> = ts.iter().map(|&t| Some(t)).collect();
        times[12_000] = Some(i64::MAX);
        times[12_005] = None;
        write_parquet(
            &path,
            vec![
                ("user_id", Arc::new(StringArray::from(ids.clone())) as ArrayRef),
                ("ts", Arc::new(Int64Array::from(times))),
            ],
        );
        let err = chunks(&path, 5_000).expect_err("a bad time");
        assert!(err.contains("null_time.parquet: row 12001: ts: ") && err.contains("9999-12-31"), "{err}");
        // A missing column gets the hint; a missing file does not.
        let err = chunks(&tmp.path().join("none.parquet"), 10).expect_err("no file");
        assert!(!err.contains("--time-column"), "{err}");
        let err = SpineReader::open(&fast, &user(), "event_time").map(drop).expect_err("no such column");
        assert!(err.contains("no event_time column (see --time-column)"), "{err}");
    }
}
