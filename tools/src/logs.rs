//! `quiver logs export --from T --to T -o served.parquet`: the served-feature log of one node
//! (README "Served-feature logging") as Parquet, ready to be used as training data.
//!
//! One row per logged answer (one entity of one online lookup), in served-at order:
//! `request_id`, `served_at` (the server's system time after the read) and `as_of` (the time the
//! lookup read as of; timestamps µs, UTC), the entity type's join keys, then per logged feature its value
//! (named as `quiver join` names features; null where nothing was served or the feature was not
//! logged for that row), `<name>__status` (present, not_found, stale, defaulted, unavailable)
//! and `<name>__event_time`. Every row has one entity type: a log holding several needs
//! `--entity-type`. The export is assembled in memory: bound it with `--from` and `--to`.

use std::path::PathBuf;
use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use parquet::arrow::ArrowWriter;
use quiver_proto::v1 as pb;

use crate::common::{fetch_entity_type, fetch_group, grpc, Result, Server};

/// What to export.
#[derive(Debug)]
pub struct ExportArgs {
    /// First served-at time (RFC 3339, or µs since the epoch).
    pub from: String,
    /// End of the range (exclusive).
    pub to: String,
    /// Output Parquet file.
    pub output: PathBuf,
    /// Only answers of this entity type.
    pub entity_type: Option<String>,
}

/// A time given as RFC 3339 (`2026-11-26T18:00:00Z`) or microseconds since the epoch.
pub fn parse_time(what: &str, s: &str) -> Result<prost_types::Timestamp> {
    if let Ok(us) = s.parse::<i64>() {
        return Ok(quiver_server::convert::timestamp(us));
    }
    s.parse::<prost_types::Timestamp>().map_err(|_| {
        format!("{what} {s:?} is neither RFC 3339 (2026-11-26T18:00:00Z) nor microseconds since the epoch")
    })
}

fn micros(t: &Option<prost_types::Timestamp>) -> Option<i64> {
    t.as_ref().map(|t| t.seconds * 1_000_000 + i64::from(t.nanos) / 1000)
}

/// Appends one row's value (or the type's zero value) to a column, as the server builds them.
fn push(col: &mut pb::FeatureColumn, v: Option<&pb::Value>) {
    use pb::value::Kind;
    let kind = v.and_then(|v| v.kind.as_ref());
    match col.r#type() {
        pb::ValueType::Bool => col.bool_values.push(matches!(kind, Some(Kind::BoolValue(true)))),
        pb::ValueType::Int64 => col.int64_values.push(match kind {
            Some(Kind::Int64Value(x)) => *x,
            _ => 0,
        }),
        pb::ValueType::Float32 => col.float32_values.push(match kind {
            Some(Kind::Float32Value(x)) => *x,
            _ => 0.0,
        }),
        pb::ValueType::Float64 | pb::ValueType::Unspecified => col.float64_values.push(match kind {
            Some(Kind::Float64Value(x)) => *x,
            _ => 0.0,
        }),
        pb::ValueType::String => col.string_values.push(match kind {
            Some(Kind::StringValue(x)) => x.clone(),
            _ => String::new(),
        }),
        pb::ValueType::Bytes => col.bytes_values.push(match kind {
            Some(Kind::BytesValue(x)) => x.clone(),
            _ => Vec::new(),
        }),
        pb::ValueType::Float32Vector => col.float32_vector_values.push(match kind {
            Some(Kind::Float32Vector(x)) => x.clone(),
            _ => Default::default(),
        }),
        pb::ValueType::Int64List => col.int64_list_values.push(match kind {
            Some(Kind::Int64List(x)) => x.clone(),
            _ => Default::default(),
        }),
        pb::ValueType::StringList => col.string_list_values.push(match kind {
            Some(Kind::StringList(x)) => x.clone(),
            _ => Default::default(),
        }),
    }
}

/// The status of a logged feature as a word.
fn status_word(s: i32) -> Option<String> {
    let s = pb::FeatureStatus::try_from(s).ok().filter(|s| *s != pb::FeatureStatus::Unspecified)?;
    Some(s.as_str_name().trim_start_matches("FEATURE_STATUS_").to_lowercase())
}

/// `quiver logs export`: writes the log's answers in the range; returns how many.
pub async fn export(server: &Server, json: bool, args: ExportArgs) -> Result<()> {
    let from = parse_time("--from", &args.from)?;
    let to = parse_time("--to", &args.to)?;
    let ch = server.channel().await?;
    let mut stream = pb::monitor_service_client::MonitorServiceClient::new(ch.clone())
        .scan_served_log(pb::ScanServedLogRequest { from: Some(from), to: Some(to) })
        .await
        .map_err(grpc)?
        .into_inner();
    let mut answers = Vec::new();
    while let Some(chunk) = stream.message().await.map_err(grpc)? {
        answers.extend(
            chunk.answers.into_iter().filter(|a| args.entity_type.as_ref().is_none_or(|t| *t == a.entity_type)),
        );
    }
    let mut types: Vec<&str> = answers.iter().map(|a| a.entity_type.as_str()).collect();
    types.sort_unstable();
    types.dedup();
    if types.len() > 1 {
        return Err(format!(
            "the log holds answers of several entity types ({}): choose one with --entity-type",
            types.join(", ")
        ));
    }
    let et = match types.first() {
        Some(t) => Some(fetch_entity_type(&ch, t).await?),
        None => None,
    };
    // Every logged feature, in order of first appearance, typed by the registry.
    let mut refs: Vec<String> = Vec::new();
    for a in &answers {
        for f in &a.features {
            if !refs.contains(&f.feature_ref) {
                refs.push(f.feature_ref.clone());
            }
        }
    }
    let mut columns = Vec::with_capacity(refs.len());
    for r in &refs {
        let (group, feature) = r.split_once(':').ok_or_else(|| format!("logged feature {r:?} is not group:feature"))?;
        let (def, _) = fetch_group(&ch, group).await?;
        let t = def.features.iter().find(|f| f.name == feature).map_or(pb::ValueType::Unspecified, |f| f.r#type());
        columns.push(pb::FeatureColumn { feature_ref: r.clone(), r#type: t as i32, ..Default::default() });
    }
    let mut event_times: Vec<Vec<Option<i64>>> = vec![Vec::with_capacity(answers.len()); refs.len()];
    for a in &answers {
        for (k, col) in columns.iter_mut().enumerate() {
            let f = a.features.iter().find(|f| f.feature_ref == refs[k]);
            col.statuses.push(f.map_or(0, |f| f.status));
            col.event_times_us.push(f.map_or(0, |f| f.event_time_us));
            event_times[k].push(f.map(|f| f.event_time_us).filter(|&t| t != 0));
            push(col, f.and_then(|f| f.value.as_ref()));
        }
    }
    let ts = |v: Vec<Option<i64>>| Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC")) as ArrayRef;
    let ts_type = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let mut fields = vec![
        Field::new("request_id", DataType::Utf8, false),
        Field::new("served_at", ts_type.clone(), false),
        Field::new("as_of", ts_type.clone(), true),
    ];
    let mut arrays: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(answers.iter().map(|a| a.request_id.as_str()))),
        ts(answers.iter().map(|a| micros(&a.served_at)).collect()),
        ts(answers.iter().map(|a| micros(&a.as_of)).collect()),
    ];
    if let Some(et) = &et {
        let rows: Vec<pb::SpineRow> =
            answers.iter().map(|a| pb::SpineRow { entity: a.entity.clone(), timestamp: None }).collect();
        let mut keys = crate::join::key_arrays(&rows, et);
        keys.pop(); // the spine time, which a log has not
        for (k, a) in et.join_keys.iter().zip(keys) {
            fields.push(Field::new(&k.name, a.data_type().clone(), true));
            arrays.push(a);
        }
    }
    for ((name, col), times) in crate::join::output_names(&refs).iter().zip(&columns).zip(event_times) {
        fields.push(Field::new(name, crate::join::arrow_type(col.r#type()), true));
        arrays.push(crate::join::feature_array(col));
        fields.push(Field::new(format!("{name}__status"), DataType::Utf8, true));
        arrays.push(Arc::new(StringArray::from_iter(col.statuses.iter().map(|&s| status_word(s)))));
        fields.push(Field::new(format!("{name}__event_time"), ts_type.clone(), true));
        arrays.push(ts(times));
    }
    let schema = Arc::new(Schema::new(fields));
    let out = args.output.display().to_string();
    let batch = RecordBatch::try_new(schema.clone(), arrays).map_err(|e| format!("{out}: {e}"))?;
    let file = std::fs::File::create(&args.output).map_err(|e| format!("{out}: {e}"))?;
    let mut w = ArrowWriter::try_new(file, schema, None).map_err(|e| format!("{out}: {e}"))?;
    w.write(&batch).map_err(|e| format!("{out}: {e}"))?;
    w.close().map_err(|e| format!("{out}: {e}"))?;
    if json {
        println!("{}", serde_json::json!({ "answers": answers.len(), "features": refs, "output": out }));
    } else {
        println!("exported {} logged answers ({} features) to {out}", answers.len(), refs.len());
    }
    Ok(())
}
