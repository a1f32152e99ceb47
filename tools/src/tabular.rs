//! Tables in files, row by row: CSV (every cell text) and Parquet (typed cells), chosen by
//! the file's extension, and the conversions from their cells to the API's keys, times and
//! values with one error per bad cell naming the file, the row and the column. A Parquet
//! table's keys and times can also be read as whole columns ([`KeyBatches`]), with the same
//! checks and messages.
//!
//! Parquet column types accepted (nulls are missing values):
//!
//! | target                  | Parquet / Arrow column                                         |
//! |-------------------------|----------------------------------------------------------------|
//! | int64 join key, INT64   | Int8..Int64, UInt8..UInt64 (within i64)                        |
//! | string join key, STRING | Utf8, LargeUtf8, Utf8View                                      |
//! | event_time              | Timestamp (any unit, whole microseconds), or Int64 µs          |
//! | BOOL                    | Boolean                                                        |
//! | FLOAT32 / FLOAT64       | Float32, Float64, integers                                     |
//! | BYTES                   | Binary, LargeBinary, BinaryView, FixedSizeBinary, Utf8         |
//! | FLOAT32_VECTOR          | List / LargeList / FixedSizeList of Float32 or Float64         |
//! | INT64_LIST              | List / LargeList / FixedSizeList of integers                   |
//! | STRING_LIST             | List / LargeList / FixedSizeList of strings                    |

use std::fmt;
use std::fs::File;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, TimestampMicrosecondType,
    TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType, UInt16Type, UInt32Type, UInt64Type,
    UInt8Type,
};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use quiver_proto::v1 as pb;

use crate::common::{parse_value, Result};

/// Rows per Parquet record batch read at once.
const PARQUET_BATCH_ROWS: usize = 8192;

/// One cell of an input table.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Cell {
    /// Null (Parquet) or empty (CSV): no value.
    #[default]
    Null,
    Text(String),
    Bool(bool),
    Int(i64),
    Float(f64),
    Bytes(Vec<u8>),
    /// A timestamp in microseconds since the epoch.
    Time(i64),
    FloatList(Vec<f64>),
    IntList(Vec<i64>),
    TextList(Vec<String>),
}

/// Where a row is, for error messages.
#[derive(Debug, Clone, Copy)]
pub enum Location {
    /// A CSV line (of the record's first line; 1 is the header).
    Line(u64),
    /// A Parquet row, 1-based.
    Row(u64),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line(n) => write!(f, "line {n}"),
            Location::Row(n) => write!(f, "row {n}"),
        }
    }
}

/// A table read row by row.
pub trait Rows {
    /// Column names, in order.
    fn header(&self) -> &[String];
    /// The next row's location and cells (one per column), or `None` at the end.
    fn next_row(&mut self) -> Result<Option<(Location, Vec<Cell>)>>;
}

/// Opens `path` by its extension: `.csv` or `.parquet` / `.pq`.
pub fn open(path: &Path) -> Result<Box<dyn Rows + Send>> {
    let what = path.display().to_string();
    if is_parquet(path) {
        return Ok(Box::new(ParquetRows::open(path, what)?));
    }
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("csv") => Ok(Box::new(CsvRows::open(path, what)?)),
        _ => Err(format!("{what}: unknown file type (expected .csv or .parquet)")),
    }
}

struct CsvRows {
    what: String,
    header: Vec<String>,
    reader: csv::Reader<File>,
    record: csv::StringRecord,
}

impl CsvRows {
    fn open(path: &Path, what: String) -> Result<Self> {
        let mut reader = csv::Reader::from_path(path).map_err(|e| format!("{what}: {e}"))?;
        let header = reader.headers().map_err(|e| format!("{what}: {e}"))?.iter().map(str::to_string).collect();
        Ok(CsvRows { what, header, reader, record: csv::StringRecord::new() })
    }
}

impl Rows for CsvRows {
    fn header(&self) -> &[String] {
        &self.header
    }

    fn next_row(&mut self) -> Result<Option<(Location, Vec<Cell>)>> {
        let more = self.reader.read_record(&mut self.record).map_err(|e| format!("{}: {e}", self.what))?;
        if !more {
            return Ok(None);
        }
        // The position of the record's first line, right even when a quoted field spans lines.
        let line = self.record.position().map_or(0, csv::Position::line);
        let cells =
            self.record.iter().map(|s| if s.is_empty() { Cell::Null } else { Cell::Text(s.to_string()) }).collect();
        Ok(Some((Location::Line(line), cells)))
    }
}

struct ParquetRows {
    what: String,
    header: Vec<String>,
    reader: ParquetRecordBatchReader,
    /// The current batch, column by column, drained front to back.
    columns: Vec<std::vec::IntoIter<Cell>>,
    row: u64,
}

impl ParquetRows {
    fn open(path: &Path, what: String) -> Result<Self> {
        let file = File::open(path).map_err(|e| format!("{what}: {e}"))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| format!("{what}: {e}"))?;
        let header = builder.schema().fields().iter().map(|f| f.name().clone()).collect();
        let reader = builder.with_batch_size(PARQUET_BATCH_ROWS).build().map_err(|e| format!("{what}: {e}"))?;
        Ok(ParquetRows { what, header, reader, columns: Vec::new(), row: 0 })
    }

    fn load(&mut self, batch: &RecordBatch) -> Result<()> {
        self.columns = batch
            .columns()
            .iter()
            .zip(&self.header)
            .map(|(a, name)| {
                column_cells(a).map(Vec::into_iter).map_err(|e| format!("{}: column {name}: {e}", self.what))
            })
            .collect::<Result<_>>()?;
        Ok(())
    }
}

impl Rows for ParquetRows {
    fn header(&self) -> &[String] {
        &self.header
    }

    fn next_row(&mut self) -> Result<Option<(Location, Vec<Cell>)>> {
        loop {
            if let Some(first) = self.columns.first() {
                if first.len() > 0 {
                    self.row += 1;
                    let cells = self.columns.iter_mut().map(|c| c.next().unwrap_or_default()).collect();
                    return Ok(Some((Location::Row(self.row), cells)));
                }
            }
            match self.reader.next() {
                None => return Ok(None),
                Some(batch) => {
                    let batch = batch.map_err(|e| format!("{}: {e}", self.what))?;
                    if batch.num_columns() == 0 {
                        return Ok(None);
                    }
                    self.load(&batch)?;
                }
            }
        }
    }
}

fn time_us(v: i64, unit: TimeUnit) -> std::result::Result<i64, String> {
    let overflow = || format!("timestamp {v} {unit:?} is out of range");
    match unit {
        TimeUnit::Second => v.checked_mul(1_000_000).ok_or_else(overflow),
        TimeUnit::Millisecond => v.checked_mul(1_000).ok_or_else(overflow),
        TimeUnit::Microsecond => Ok(v),
        TimeUnit::Nanosecond if v % 1000 == 0 => Ok(v / 1000),
        TimeUnit::Nanosecond => Err(format!("timestamp {v} ns is not a whole microsecond")),
    }
}

macro_rules! prim {
    ($a:expr, $t:ty, $f:expr) => {{
        let a = $a.as_primitive::<$t>();
        (0..a.len()).map(|i| if a.is_null(i) { Ok(Cell::Null) } else { $f(a.value(i)) }).collect()
    }};
}

/// Every cell of one Arrow column.
fn column_cells(a: &ArrayRef) -> std::result::Result<Vec<Cell>, String> {
    let int = |v: i64| Ok(Cell::Int(v));
    let nulls = |a: &ArrayRef, f: &dyn Fn(usize) -> std::result::Result<Cell, String>| {
        (0..a.len()).map(|i| if a.is_null(i) { Ok(Cell::Null) } else { f(i) }).collect()
    };
    match a.data_type() {
        DataType::Null => Ok(vec![Cell::Null; a.len()]),
        DataType::Boolean => {
            let b = a.as_boolean();
            nulls(a, &|i| Ok(Cell::Bool(b.value(i))))
        }
        DataType::Int8 => prim!(a, Int8Type, |v| int(i64::from(v))),
        DataType::Int16 => prim!(a, Int16Type, |v| int(i64::from(v))),
        DataType::Int32 => prim!(a, Int32Type, |v| int(i64::from(v))),
        DataType::Int64 => prim!(a, Int64Type, int),
        DataType::UInt8 => prim!(a, UInt8Type, |v| int(i64::from(v))),
        DataType::UInt16 => prim!(a, UInt16Type, |v| int(i64::from(v))),
        DataType::UInt32 => prim!(a, UInt32Type, |v| int(i64::from(v))),
        DataType::UInt64 => {
            prim!(a, UInt64Type, |v: u64| i64::try_from(v).map(Cell::Int).map_err(|_| format!("{v} exceeds int64")))
        }
        DataType::Float32 => prim!(a, Float32Type, |v: f32| Ok(Cell::Float(f64::from(v)))),
        DataType::Float64 => prim!(a, Float64Type, |v| Ok(Cell::Float(v))),
        DataType::Timestamp(unit, _) => match unit {
            TimeUnit::Second => prim!(a, TimestampSecondType, |v| time_us(v, *unit).map(Cell::Time)),
            TimeUnit::Millisecond => prim!(a, TimestampMillisecondType, |v| time_us(v, *unit).map(Cell::Time)),
            TimeUnit::Microsecond => prim!(a, TimestampMicrosecondType, |v| time_us(v, *unit).map(Cell::Time)),
            TimeUnit::Nanosecond => prim!(a, TimestampNanosecondType, |v| time_us(v, *unit).map(Cell::Time)),
        },
        DataType::Utf8 => {
            let s = a.as_string::<i32>();
            nulls(a, &|i| Ok(Cell::Text(s.value(i).to_string())))
        }
        DataType::LargeUtf8 => {
            let s = a.as_string::<i64>();
            nulls(a, &|i| Ok(Cell::Text(s.value(i).to_string())))
        }
        DataType::Utf8View => {
            let s = a.as_string_view();
            nulls(a, &|i| Ok(Cell::Text(s.value(i).to_string())))
        }
        DataType::Binary => {
            let b = a.as_binary::<i32>();
            nulls(a, &|i| Ok(Cell::Bytes(b.value(i).to_vec())))
        }
        DataType::LargeBinary => {
            let b = a.as_binary::<i64>();
            nulls(a, &|i| Ok(Cell::Bytes(b.value(i).to_vec())))
        }
        DataType::BinaryView => {
            let b = a.as_binary_view();
            nulls(a, &|i| Ok(Cell::Bytes(b.value(i).to_vec())))
        }
        DataType::FixedSizeBinary(_) => {
            let b = a.as_fixed_size_binary();
            nulls(a, &|i| Ok(Cell::Bytes(b.value(i).to_vec())))
        }
        DataType::List(_) => {
            let l = a.as_list::<i32>();
            nulls(a, &|i| list_cell(&l.value(i)))
        }
        DataType::LargeList(_) => {
            let l = a.as_list::<i64>();
            nulls(a, &|i| list_cell(&l.value(i)))
        }
        DataType::FixedSizeList(_, _) => {
            let l = a.as_fixed_size_list();
            nulls(a, &|i| list_cell(&l.value(i)))
        }
        other => Err(format!("unsupported column type {other}")),
    }
}

/// A list value from its elements (nulls inside a list are refused).
fn list_cell(items: &ArrayRef) -> std::result::Result<Cell, String> {
    let cells = column_cells(items)?;
    if cells.contains(&Cell::Null) {
        return Err("null inside a list".into());
    }
    let of = |f: fn(&Cell) -> bool| cells.iter().all(f);
    Ok(if of(|c| matches!(c, Cell::Int(_))) && !cells.is_empty() {
        Cell::IntList(cells.into_iter().map(|c| if let Cell::Int(v) = c { v } else { 0 }).collect())
    } else if of(|c| matches!(c, Cell::Float(_))) {
        Cell::FloatList(cells.into_iter().map(|c| if let Cell::Float(v) = c { v } else { 0.0 }).collect())
    } else if of(|c| matches!(c, Cell::Text(_))) {
        Cell::TextList(cells.into_iter().map(|c| if let Cell::Text(v) = c { v } else { String::new() }).collect())
    } else {
        return Err(format!("unsupported list element type {}", items.data_type()));
    })
}

fn describe(c: &Cell) -> &'static str {
    match c {
        Cell::Null => "null",
        Cell::Text(_) => "a string",
        Cell::Bool(_) => "a boolean",
        Cell::Int(_) => "an integer",
        Cell::Float(_) => "a float",
        Cell::Bytes(_) => "bytes",
        Cell::Time(_) => "a timestamp",
        Cell::FloatList(_) => "a float list",
        Cell::IntList(_) => "an integer list",
        Cell::TextList(_) => "a string list",
    }
}

/// Where a table's entity key (one column per join key) and time column are.
pub struct KeyColumns {
    what: String,
    keys: Vec<(usize, String, pb::JoinKeyType)>,
    time: usize,
    time_name: String,
}

impl KeyColumns {
    /// Finds the join key columns of `et` and the column `time_name` in `header`; `what`
    /// names the file in errors.
    pub fn locate(what: &str, header: &[String], et: &pb::EntityType, time_name: &str) -> Result<Self> {
        let col = |name: &str| header.iter().position(|h| h == name);
        let keys = et
            .join_keys
            .iter()
            .map(|k| {
                col(&k.name)
                    .map(|i| (i, k.name.clone(), k.r#type()))
                    .ok_or_else(|| format!("{what}: no column for join key {:?}", k.name))
            })
            .collect::<Result<Vec<_>>>()?;
        let time = col(time_name).ok_or_else(|| format!("{what}: no {time_name} column"))?;
        Ok(KeyColumns { what: what.to_string(), keys, time, time_name: time_name.to_string() })
    }

    /// True if column `i` is a key or the time column.
    pub fn holds(&self, i: usize) -> bool {
        i == self.time || self.keys.iter().any(|k| k.0 == i)
    }

    /// Takes the entity key and the time (µs) out of a row's cells.
    pub fn take(&self, at: Location, cells: &mut [Cell]) -> Result<(pb::EntityKey, i64)> {
        let what = &self.what;
        let mut take = |i: usize| cells.get_mut(i).map(std::mem::take).unwrap_or_default();
        let parts = self
            .keys
            .iter()
            .map(|(i, name, t)| key_part(take(*i), *t).map_err(|e| format!("{what}: {at}: {name}: {e}")))
            .collect::<Result<_>>()?;
        let t = time(take(self.time)).map_err(|e| format!("{what}: {at}: {}: {e}", self.time_name))?;
        Ok((pb::EntityKey { parts }, t))
    }
}

/// True if `path` names a Parquet file (by its extension, as [`open`] decides).
pub fn is_parquet(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref(), Some("parquet" | "pq"))
}

/// A Parquet table's join key and time columns read whole, a record batch at a time (for a
/// join's spine, where converting each row to cells cost more than the rest of the client).
/// Only those columns are decoded. Every row is checked as [`KeyColumns::take`] checks it, with
/// the same messages, and the first bad row of a batch is the one reported.
pub struct KeyBatches {
    what: String,
    reader: ParquetRecordBatchReader,
    keys: Vec<(String, pb::JoinKeyType)>,
    time_name: String,
    /// Rows read so far.
    row: u64,
}

/// One batch of a [`KeyBatches`]: the join key columns (Int64 or Utf8, one per join key of the
/// entity type, no nulls) and the times in microseconds.
pub struct KeyBatch {
    pub keys: Vec<ArrayRef>,
    pub times: Vec<i64>,
}

/// Where a column of a batch first fails: at a row (its index in the batch, and the message
/// after the row's location, naming the column), or as a whole column (before any row, as the
/// row path fails on loading the batch).
type ColumnError = (Option<usize>, String);

impl KeyBatches {
    /// Opens `path` (a Parquet file) for the join keys of `et` and the column `time_name`;
    /// `missing` adds to the error of a column that is not there (a hint for the user).
    pub fn open(path: &Path, et: &pb::EntityType, time_name: &str, missing: impl Fn(String) -> String) -> Result<Self> {
        let what = path.display().to_string();
        let file = File::open(path).map_err(|e| format!("{what}: {e}"))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| format!("{what}: {e}"))?;
        let header: Vec<String> = builder.schema().fields().iter().map(|f| f.name().clone()).collect();
        // The same lookups (and errors) as the row path.
        let cols = KeyColumns::locate(&what, &header, et, time_name).map_err(missing)?;
        let mut wanted: Vec<usize> = cols.keys.iter().map(|k| k.0).chain([cols.time]).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mask = parquet::arrow::ProjectionMask::roots(builder.parquet_schema(), wanted);
        let reader = builder
            .with_projection(mask)
            .with_batch_size(PARQUET_BATCH_ROWS)
            .build()
            .map_err(|e| format!("{what}: {e}"))?;
        let keys = cols.keys.into_iter().map(|(_, name, t)| (name, t)).collect();
        Ok(KeyBatches { what, reader, keys, time_name: cols.time_name, row: 0 })
    }

    /// The next batch, or `None` at the end of the file. `check` is a time's last check (its
    /// range, say), made at its row like the conversions; its error names the column itself.
    pub fn next_batch(&mut self, check: impl Fn(i64) -> std::result::Result<(), String>) -> Result<Option<KeyBatch>> {
        let what = &self.what;
        let batch = loop {
            match self.reader.next() {
                None => return Ok(None),
                Some(b) => {
                    let b = b.map_err(|e| format!("{what}: {e}"))?;
                    if b.num_rows() > 0 {
                        break b;
                    }
                }
            }
        };
        let first_row = self.row + 1;
        let column = |name: &str| batch.column_by_name(name).ok_or_else(|| format!("{what}: no {name} column"));
        // Each column converted whole; of their failures, the one the row path meets first: a
        // whole column's, else the lowest row's (a row's keys in order, then its time).
        let mut keys = Vec::with_capacity(self.keys.len());
        let mut first: Option<(Option<usize>, usize, String)> = None;
        let mut fail = |col: usize, name: &str, (i, e): ColumnError| {
            if first.as_ref().is_none_or(|(fi, fc, _)| (i, col) < (*fi, *fc)) {
                let e = match i {
                    Some(i) => format!("{what}: {}: {e}", Location::Row(first_row + i as u64)),
                    None => format!("{what}: column {name}: {e}"),
                };
                first = Some((i, col, e));
            }
        };
        for (c, (name, t)) in self.keys.iter().enumerate() {
            match key_array(column(name)?, *t, name) {
                Ok(a) => keys.push(a),
                Err(e) => fail(c, name, e),
            }
        }
        let name = &self.time_name;
        let times = match time_values(column(name)?, name, &check) {
            Ok(times) => Some(times),
            Err(e) => {
                fail(self.keys.len(), name, e);
                None
            }
        };
        if let Some((_, _, e)) = first {
            return Err(e);
        }
        // (A failed time column is in `first`.)
        let times = times.ok_or_else(|| format!("{what}: column {name}: unreadable"))?;
        self.row += batch.num_rows() as u64;
        Ok(Some(KeyBatch { keys, times }))
    }
}

/// A join key column as Int64 or Utf8 values: as it is when it already is one without nulls,
/// else cell by cell through [`key_part`] (its conversions and messages).
fn key_array(a: &ArrayRef, t: pb::JoinKeyType, name: &str) -> std::result::Result<ArrayRef, ColumnError> {
    use pb::key_part::Kind;
    let exact = match t {
        pb::JoinKeyType::Int64 => a.data_type() == &DataType::Int64,
        pb::JoinKeyType::String => a.data_type() == &DataType::Utf8,
        _ => false,
    };
    if exact && a.null_count() == 0 {
        return Ok(a.clone());
    }
    let cells = column_cells(a).map_err(|e| (None, e))?;
    let mut ints = Vec::new();
    let mut strs = arrow_array::builder::StringBuilder::new();
    for (i, c) in cells.into_iter().enumerate() {
        match key_part(c, t).map_err(|e| (Some(i), format!("{name}: {e}")))?.kind {
            Some(Kind::Int64Value(v)) => ints.push(v),
            Some(Kind::StringValue(s)) => strs.append_value(s),
            None => return Err((Some(i), format!("{name}: a join key is missing"))),
        }
    }
    Ok(match t {
        pb::JoinKeyType::Int64 => std::sync::Arc::new(arrow_array::Int64Array::from(ints)),
        _ => std::sync::Arc::new(strs.finish()),
    })
}

/// A time column in microseconds, each passing `check`: read directly from an Int64 or
/// timestamp (µs) column without nulls, else cell by cell through [`time`] (its conversions and
/// messages).
fn time_values(
    a: &ArrayRef,
    name: &str,
    check: &impl Fn(i64) -> std::result::Result<(), String>,
) -> std::result::Result<Vec<i64>, ColumnError> {
    let direct = match a.data_type() {
        _ if a.null_count() > 0 => None,
        DataType::Int64 => Some(a.as_primitive::<Int64Type>().values().to_vec()),
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            Some(a.as_primitive::<TimestampMicrosecondType>().values().to_vec())
        }
        _ => None,
    };
    match direct {
        Some(times) => {
            for (i, &t) in times.iter().enumerate() {
                check(t).map_err(|e| (Some(i), e))?;
            }
            Ok(times)
        }
        None => {
            // Each cell converted and checked in turn: the first bad row is the first reported.
            let cells = column_cells(a).map_err(|e| (None, e))?;
            let converted = |(i, c): (usize, Cell)| {
                let t = time(c).map_err(|e| (Some(i), format!("{name}: {e}")))?;
                check(t).map_err(|e| (Some(i), e))?;
                Ok(t)
            };
            cells.into_iter().enumerate().map(converted).collect()
        }
    }
}

/// A join key part of type `t` from a cell.
pub fn key_part(c: Cell, t: pb::JoinKeyType) -> Result<pb::KeyPart> {
    use pb::key_part::Kind;
    let kind = match (c, t) {
        (Cell::Int(v), pb::JoinKeyType::Int64) => Kind::Int64Value(v),
        (Cell::Text(s), pb::JoinKeyType::Int64) => {
            Kind::Int64Value(s.parse().map_err(|_| format!("{s:?} is not an int64"))?)
        }
        (Cell::Text(s), pb::JoinKeyType::String) => Kind::StringValue(s),
        (Cell::Null, _) => return Err("a join key is missing".into()),
        (c, t) => return Err(format!("{} is not a {t:?} join key", describe(&c))),
    };
    Ok(pb::KeyPart { kind: Some(kind) })
}

/// Microseconds since the epoch from a timestamp cell, an integer, or decimal text.
pub fn time(c: Cell) -> Result<i64> {
    match c {
        Cell::Time(v) | Cell::Int(v) => Ok(v),
        Cell::Text(s) => s.parse().map_err(|_| format!("{s:?} is not microseconds since the epoch")),
        Cell::Null => Err("missing".into()),
        c => Err(format!("{} is not a timestamp", describe(&c))),
    }
}

/// A value of type `t` from a cell; `None` for a null (no value in this row).
pub fn value(c: Cell, t: pb::ValueType) -> Result<Option<pb::Value>> {
    use pb::value::Kind;
    use pb::ValueType as T;
    let kind = match (c, t) {
        (Cell::Null, _) => return Ok(None),
        (Cell::Text(s), T::Bytes) => Kind::BytesValue(s.into_bytes()),
        (Cell::Text(s), t) => return parse_value(&s, t).map(Some),
        (Cell::Bool(b), T::Bool) => Kind::BoolValue(b),
        (Cell::Int(v), T::Int64) => Kind::Int64Value(v),
        (Cell::Int(v), T::Float32) => Kind::Float32Value(v as f32),
        (Cell::Int(v), T::Float64) => Kind::Float64Value(v as f64),
        (Cell::Float(v), T::Float32) => Kind::Float32Value(v as f32),
        (Cell::Float(v), T::Float64) => Kind::Float64Value(v),
        (Cell::Bytes(b), T::Bytes) => Kind::BytesValue(b),
        (Cell::FloatList(v), T::Float32Vector) => {
            Kind::Float32Vector(pb::Float32List { values: v.into_iter().map(|x| x as f32).collect() })
        }
        (Cell::IntList(v), T::Float32Vector) => {
            Kind::Float32Vector(pb::Float32List { values: v.into_iter().map(|x| x as f32).collect() })
        }
        (Cell::IntList(v), T::Int64List) => Kind::Int64List(pb::Int64List { values: v }),
        (Cell::TextList(v), T::StringList) => Kind::StringList(pb::StringList { values: v }),
        (c, t) => return Err(format!("{} is not a {t:?}", describe(&c))),
    };
    Ok(Some(pb::Value { kind: Some(kind) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_convert_to_their_targets_and_refuse_the_rest() {
        assert_eq!(time(Cell::Time(5)), Ok(5));
        assert_eq!(time(Cell::Text("7".into())), Ok(7));
        assert!(time(Cell::Bool(true)).is_err());
        assert!(time(Cell::Null).is_err());
        assert_eq!(time_us(3, TimeUnit::Millisecond), Ok(3000));
        assert!(time_us(1001, TimeUnit::Nanosecond).is_err());
        assert!(time_us(i64::MAX, TimeUnit::Second).is_err());
        assert!(key_part(Cell::Float(1.0), pb::JoinKeyType::Int64).is_err());
        assert!(key_part(Cell::Null, pb::JoinKeyType::String).is_err());
        assert_eq!(value(Cell::Null, pb::ValueType::Int64), Ok(None));
        let f = value(Cell::Int(2), pb::ValueType::Float64).expect("int to float");
        assert_eq!(f.and_then(|v| v.kind), Some(pb::value::Kind::Float64Value(2.0)));
        let err = value(Cell::Float(2.5), pb::ValueType::Int64).expect_err("float to int");
        assert!(err.contains("a float is not a Int64"), "{err}");
        assert!(value(Cell::Text("x".into()), pb::ValueType::Bool).is_err());
    }
}
