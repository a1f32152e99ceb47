//! `quiver skew --from T --to T [--group G]`: online against offline, from the served-feature
//! log (README "Skew"). Exits with 2 when any served value differs from its replay.

use quiver_proto::v1 as pb;

use crate::common::{grpc, status_name, Result, Server};
use crate::logs::parse_time;

/// The exit status of `quiver skew` when a served value differs from its replay.
pub const EXIT_MISMATCHED: i32 = 2;

fn entity_text(e: &Option<pb::EntityKey>) -> String {
    use pb::key_part::Kind;
    let parts = e.as_ref().map(|e| e.parts.as_slice()).unwrap_or_default();
    parts
        .iter()
        .map(|p| match &p.kind {
            Some(Kind::StringValue(s)) => s.clone(),
            Some(Kind::Int64Value(i)) => i.to_string(),
            None => String::new(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn served_text(f: &Option<pb::LoggedFeature>) -> String {
    let Some(f) = f else { return "-".into() };
    let status = status_name(f.status).unwrap_or_else(|| "?".into());
    let value = f.value.as_ref().and_then(|v| v.kind.as_ref()).map_or(String::new(), |k| format!(" {k:?}"));
    format!("{status}{value} @ {} µs", f.event_time_us)
}

/// `quiver skew`: prints per feature what was compared; `Ok(true)` when anything mismatched.
pub async fn run(
    server: &Server,
    json: bool,
    from: &str,
    to: &str,
    group: Option<String>,
    examples: u32,
) -> Result<bool> {
    let req = pb::MeasureSkewRequest {
        from: Some(parse_time("--from", from)?),
        to: Some(parse_time("--to", to)?),
        group: group.unwrap_or_default(),
        examples,
    };
    let r = pb::monitor_service_client::MonitorServiceClient::new(server.channel().await?)
        .measure_skew(req)
        .await
        .map_err(grpc)?
        .into_inner();
    let any = r.features.iter().any(|f| f.mismatched > 0);
    if json {
        let features: Vec<serde_json::Value> = r
            .features
            .iter()
            .map(|f| {
                serde_json::json!({
                    "feature": f.feature_ref, "compared": f.compared, "equal": f.equal,
                    "mismatched": f.mismatched, "missing": f.missing,
                    "examples": f.examples.iter().map(|e| serde_json::json!({
                        "request_id": e.request_id, "entity": entity_text(&e.entity),
                        "served": served_text(&e.served), "replayed": served_text(&e.replayed),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::json!({ "answers": r.answers, "mismatched": any, "features": features }));
        return Ok(any);
    }
    println!("{} logged answers replayed", r.answers);
    for f in &r.features {
        println!(
            "{}: {} compared, {} equal, {} mismatched, {} missing",
            f.feature_ref, f.compared, f.equal, f.mismatched, f.missing
        );
        for e in &f.examples {
            println!(
                "    request {} entity {}: served {}, replayed {}",
                e.request_id,
                entity_text(&e.entity),
                served_text(&e.served),
                served_text(&e.replayed)
            );
        }
    }
    Ok(any)
}

/// What `quiver skew --training-set` compares.
#[derive(Debug)]
pub struct TrainingArgs {
    /// The training set: the spine's key and time columns and one column per feature.
    pub file: std::path::PathBuf,
    pub features: Vec<String>,
    pub time_column: String,
    pub known_at_us: Option<i64>,
    pub use_defaults: bool,
    pub examples: u32,
}

/// One feature's comparison of a training set with Quiver's join.
#[derive(Debug, Default)]
struct Compared {
    column: String,
    rows: u64,
    equal: u64,
    /// Both have a value, and they differ.
    differ: u64,
    /// The training set has a value where the join has none.
    only_training: u64,
    /// The join has a value where the training set has none.
    only_quiver: u64,
    examples: Vec<serde_json::Value>,
}

fn value_text(v: &Option<pb::Value>) -> String {
    v.as_ref().map_or_else(|| "null".into(), quiver_server::convert::value_text)
}

/// `quiver skew --training-set`: joins the training set's own spine through Quiver and compares
/// every feature cell with the file's; `Ok(true)` when any differs.
///
/// Cells are compared as values of the feature's type (so a float32 feature stored as float64
/// in the file compares at float32 precision); equal means the same encoding (NaN equals NaN),
/// or both null. The join writes to a temporary Parquet file that is read back row by row next
/// to the training set, so memory holds the spine's keys, not the features.
pub async fn training(server: &Server, json: bool, args: TrainingArgs) -> Result<bool> {
    use prost::Message;
    if args.examples > quiver_server::skew::SKEW_EXAMPLES_MAX {
        return Err(format!("--examples: at most {}", quiver_server::skew::SKEW_EXAMPLES_MAX));
    }
    let ch = server.channel().await?;
    let mut types = Vec::new();
    for r in &args.features {
        let (group, name) = r.split_once(':').ok_or_else(|| format!("bad feature reference {r:?} (group:feature)"))?;
        let (def, _) = crate::common::fetch_group(&ch, group).await?;
        let f = def
            .features
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| format!("feature group {group} has no feature {name:?}"))?;
        types.push(f.r#type());
    }
    let names = crate::join::output_names(&args.features);
    let what = args.file.display().to_string();
    let header = crate::tabular::open(&args.file)?.header().to_vec();
    let mut training_cols = Vec::new();
    for n in &names {
        let i = header.iter().position(|h| h == n).ok_or_else(|| {
            format!("{what}: no column {n:?} (feature columns are named as `quiver join` names them)")
        })?;
        training_cols.push(i);
    }
    let joined = tempfile::Builder::new().suffix(".parquet").tempfile().map_err(|e| format!("temporary file: {e}"))?;
    crate::join::join(
        server,
        crate::join::JoinArgs {
            spine: args.file.clone(),
            output: joined.path().to_path_buf(),
            features: args.features.clone(),
            time_column: args.time_column.clone(),
            known_at_us: args.known_at_us,
            strict_availability: false,
            use_defaults: args.use_defaults,
            compression: crate::join::OutputCompression::Zstd,
        },
    )
    .await?;
    let (file, joined_path, examples) = (args.file.clone(), joined.path().to_path_buf(), args.examples as usize);
    let (names2, what2) = (names.clone(), what.clone());
    let compared = tokio::task::spawn_blocking(move || -> Result<Vec<Compared>> {
        let mut train = crate::tabular::open(&file)?;
        let mut ours = crate::tabular::open(&joined_path)?;
        let keys = ours.header().len() - names2.len();
        let mut out: Vec<Compared> =
            names2.iter().map(|n| Compared { column: n.clone(), ..Default::default() }).collect();
        loop {
            let (t, o) = (train.next_row()?, ours.next_row()?);
            let ((at, mut t), (_, mut o)) = match (t, o) {
                (Some(t), Some(o)) => (t, o),
                (None, None) => break,
                _ => return Err(format!("{what2}: the join gave another number of rows than the file has")),
            };
            let spine: Vec<String> = o[..keys]
                .iter()
                .map(|c| match c {
                    crate::tabular::Cell::Text(s) => s.clone(),
                    crate::tabular::Cell::Int(i) | crate::tabular::Cell::Time(i) => i.to_string(),
                    other => format!("{other:?}"),
                })
                .collect();
            for (j, c) in out.iter_mut().enumerate() {
                let cell = t.get_mut(training_cols[j]).map(std::mem::take).unwrap_or_default();
                let theirs = crate::tabular::value(cell, types[j])
                    .map_err(|e| format!("{what2}: {at}, column {}: {e}", c.column))?;
                let mine = crate::tabular::value(std::mem::take(&mut o[keys + j]), types[j])
                    .map_err(|e| format!("the join's output, column {}: {e}", c.column))?;
                c.rows += 1;
                let same = match (&theirs, &mine) {
                    (None, None) => true,
                    (Some(a), Some(b)) => a.encode_to_vec() == b.encode_to_vec(),
                    _ => false,
                };
                if same {
                    c.equal += 1;
                    continue;
                }
                match (&theirs, &mine) {
                    (Some(_), Some(_)) => c.differ += 1,
                    (Some(_), None) => c.only_training += 1,
                    _ => c.only_quiver += 1,
                }
                if c.examples.len() < examples {
                    c.examples.push(serde_json::json!({
                        "at": at.to_string(), "keys": spine.join(","),
                        "training": value_text(&theirs), "quiver": value_text(&mine),
                    }));
                }
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| format!("comparing: {e}"))??;
    let any = compared.iter().any(|c| c.equal < c.rows);
    if json {
        let features: Vec<serde_json::Value> = compared
            .iter()
            .zip(&args.features)
            .map(|(c, r)| {
                serde_json::json!({
                    "feature": r, "column": c.column, "rows": c.rows, "equal": c.equal, "differ": c.differ,
                    "only_training": c.only_training, "only_quiver": c.only_quiver, "examples": c.examples,
                })
            })
            .collect();
        println!("{}", serde_json::json!({ "training_set": what, "mismatched": any, "features": features }));
        return Ok(any);
    }
    let rows = compared.first().map_or(0, |c| c.rows);
    println!("{what}: {rows} rows compared with Quiver's point-in-time join of the same spine");
    for (c, r) in compared.iter().zip(&args.features) {
        println!(
            "{r}: {} equal, {} differ, {} only in the training set, {} only in Quiver",
            c.equal, c.differ, c.only_training, c.only_quiver
        );
        for e in &c.examples {
            println!(
                "    {} ({}): training {}, quiver {}",
                e["at"].as_str().unwrap_or(""),
                e["keys"].as_str().unwrap_or(""),
                e["training"].as_str().unwrap_or(""),
                e["quiver"].as_str().unwrap_or("")
            );
        }
    }
    Ok(any)
}
