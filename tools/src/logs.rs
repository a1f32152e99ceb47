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

use crate::common::{fetch_entity_type, fetch_group, grpc, status_name, Result, Server};

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
    t.as_ref().and_then(|t| quiver_server::convert::micros(t, "time").ok())
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
        // The registry's type; for a feature no longer defined, the type of its logged values.
        let logged_type = || {
            answers
                .iter()
                .flat_map(|a| &a.features)
                .filter(|f| f.feature_ref == *r)
                .find_map(|f| f.value.as_ref().and_then(quiver_server::registry::value_type_of))
        };
        let t = def
            .features
            .iter()
            .find(|f| f.name == feature)
            .map(|f| f.r#type())
            .or_else(logged_type)
            .unwrap_or(pb::ValueType::Float64);
        columns.push(pb::FeatureColumn { feature_ref: r.clone(), r#type: t as i32, ..Default::default() });
    }
    let mut event_times: Vec<Vec<Option<i64>>> = vec![Vec::with_capacity(answers.len()); refs.len()];
    for a in &answers {
        for (k, col) in columns.iter_mut().enumerate() {
            let f = a.features.iter().find(|f| f.feature_ref == refs[k]);
            col.statuses.push(f.map_or(0, |f| f.status));
            col.event_times_us.push(f.map_or(0, |f| f.event_time_us));
            event_times[k].push(f.map(|f| f.event_time_us).filter(|&t| t != 0));
            let value = f.and_then(|f| f.value.as_ref());
            let value = value.map(|v| quiver_server::convert::to_engine(v, col.r#type(), &refs[k])).transpose();
            let value = value.map_err(|e| format!("a logged value of {}: {e}", refs[k]))?;
            quiver_server::convert::push_value(col, col.r#type(), value.as_ref());
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
        arrays.push(Arc::new(StringArray::from_iter(col.statuses.iter().map(|&s| status_name(s)))));
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
