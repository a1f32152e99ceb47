//! `quiver baseline capture | list` and `quiver drift` (README "Drift"): baselines summarised
//! from a training file, and the drift of served values against them.
//!
//! A capture reads every row of the file (CSV or Parquet, as `quiver join` writes them) and
//! summarises each of the group's features that has a column — named as the feature, or
//! `group__feature` — with [`quiver_server::drift::Summary`], the same code the server
//! measures with; a cell that is not a value of the feature's type is an error naming its row.

use std::path::Path;

use quiver_proto::v1 as pb;
use quiver_server::drift::{observe, summarised, Summary};

use crate::common::{fetch_group, grpc, Result, Server};
use crate::logs::parse_time;
use crate::tabular;

/// The exit status of `quiver drift` when a feature breaches its bounds.
pub const EXIT_DRIFTED: i32 = 2;

/// Summarises the group's features in `file` (the group's serving definition `group`).
pub fn summarise(file: &Path, group: &pb::FeatureGroup) -> Result<Vec<pb::FeatureBaseline>> {
    let mut rows = tabular::open(file)?;
    let what = file.display().to_string();
    let header = rows.header().to_vec();
    // (column, feature type, summary) per feature found.
    let mut columns: Vec<(usize, pb::ValueType, Summary)> = Vec::new();
    for f in &group.features {
        if !summarised(f.r#type()) {
            continue;
        }
        let long = format!("{}__{}", group.name, f.name);
        if let Some(i) = header.iter().position(|h| *h == f.name || *h == long) {
            columns.push((i, f.r#type(), Summary::new(&f.name, f.r#type())));
        }
    }
    if columns.is_empty() {
        return Err(format!(
            "{what}: no column is a feature of {} with a baseline (columns: {}; features are named `feature` or `{}__feature`)",
            group.name,
            header.join(", "),
            group.name
        ));
    }
    while let Some((at, mut cells)) = rows.next_row()? {
        for (i, t, s) in &mut columns {
            let cell = cells.get_mut(*i).map(std::mem::take).unwrap_or_default();
            let v = tabular::value(cell, *t).map_err(|e| format!("{what}: {at}, column {}: {e}", header[*i]))?;
            s.add(observe(v.as_ref()));
        }
    }
    Ok(columns.into_iter().map(|(_, _, s)| s.baseline()).collect())
}

/// `quiver baseline capture`.
pub async fn capture(server: &Server, json: bool, file: &Path, group: &str, name: &str) -> Result<()> {
    let ch = server.channel().await?;
    let (def, _) = fetch_group(&ch, group).await?;
    let (path, d) = (file.to_path_buf(), def.clone());
    let features = tokio::task::spawn_blocking(move || summarise(&path, &d))
        .await
        .map_err(|e| format!("reading {}: {e}", file.display()))??;
    let baseline = pb::Baseline {
        group: def.name.clone(),
        name: name.to_string(),
        captured_at: None,
        source: file.file_name().map_or(String::new(), |n| n.to_string_lossy().into_owned()),
        features,
    };
    let r = pb::monitor_service_client::MonitorServiceClient::new(ch)
        .put_baseline(pb::PutBaselineRequest { baseline: Some(baseline.clone()) })
        .await
        .map_err(grpc)?
        .into_inner();
    if json {
        println!(
            "{}",
            serde_json::json!({ "group": def.name, "baseline": name, "features": baseline_json(&baseline)["features"] })
        );
        return Ok(());
    }
    let at = r.captured_at.as_ref().and_then(|t| quiver_server::convert::micros(t, "time").ok()).unwrap_or(0);
    println!(
        "baseline {name} of {}: {} features from {}, captured at {at} µs",
        def.name,
        baseline.features.len(),
        file.display()
    );
    for f in &baseline.features {
        println!("    {}: {} rows, {} null", f.feature, f.rows, f.nulls);
    }
    Ok(())
}

fn baseline_json(b: &pb::Baseline) -> serde_json::Value {
    use pb::feature_baseline::Summary as S;
    serde_json::json!({
        "group": b.group,
        "name": b.name,
        "captured_at_us": b.captured_at.as_ref().and_then(|t| quiver_server::convert::micros(t, "time").ok()),
        "source": b.source,
        "features": b.features.iter().map(|f| {
            let mut o = serde_json::json!({ "feature": f.feature, "rows": f.rows, "nulls": f.nulls });
            match &f.summary {
                Some(S::Numeric(n)) => {
                    o["edges"] = serde_json::json!(n.edges);
                    o["counts"] = serde_json::json!(n.counts);
                    o["sample"] = serde_json::json!(n.sample);
                }
                Some(S::Categorical(c)) => {
                    o["categories"] = serde_json::json!(c.categories);
                    o["counts"] = serde_json::json!(c.counts);
                    o["other"] = serde_json::json!(c.other);
                }
                None => {}
            }
            o
        }).collect::<Vec<_>>(),
    })
}

/// `quiver baseline list`.
pub async fn list(server: &Server, json: bool, group: Option<String>) -> Result<()> {
    let r = pb::monitor_service_client::MonitorServiceClient::new(server.channel().await?)
        .list_baselines(pb::ListBaselinesRequest { group: group.unwrap_or_default() })
        .await
        .map_err(grpc)?
        .into_inner();
    if json {
        println!("{}", serde_json::json!({ "baselines": r.baselines.iter().map(baseline_json).collect::<Vec<_>>() }));
        return Ok(());
    }
    for b in &r.baselines {
        let at = b
            .captured_at
            .as_ref()
            .and_then(|t| quiver_server::convert::micros(t, "time").ok())
            .map_or("-".to_string(), |us| us.to_string());
        println!("{} {}: {} features, captured at {at} µs from {:?}", b.group, b.name, b.features.len(), b.source);
    }
    if r.baselines.is_empty() {
        println!("no baselines");
    }
    Ok(())
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |v| format!("{v:.4}"))
}

/// One line per feature of a measurement.
pub fn print_drift(m: &pb::MeasureDriftResponse, indent: &str) {
    for f in &m.features {
        let mark = if f.breached { "  BREACHED" } else { "" };
        println!(
            "{indent}{}: psi {} (max {}), ks {} (max {}), js {}; {} values, {} null{mark}",
            f.feature,
            opt(f.psi),
            f.max_psi,
            opt(f.ks),
            f.max_ks,
            opt(f.js),
            f.values,
            f.nulls
        );
    }
}

/// A measurement as JSON.
pub fn drift_json(m: &pb::MeasureDriftResponse) -> serde_json::Value {
    serde_json::json!({
        "group": m.group,
        "baseline": m.baseline,
        "from_us": m.from.as_ref().and_then(|t| quiver_server::convert::micros(t, "time").ok()),
        "to_us": m.to.as_ref().and_then(|t| quiver_server::convert::micros(t, "time").ok()),
        "answers": m.answers,
        "source": if m.source() == pb::DriftSource::Ingested { "ingested" } else { "served" },
        "breached": m.features.iter().any(|f| f.breached),
        "features": m.features.iter().map(|f| serde_json::json!({
            "feature": f.feature, "values": f.values, "nulls": f.nulls, "psi": f.psi, "js": f.js,
            "ks": f.ks, "max_psi": f.max_psi, "max_ks": f.max_ks, "breached": f.breached,
        })).collect::<Vec<_>>(),
    })
}

/// `quiver drift`: `Ok(true)` when a feature breaches.
pub async fn run(
    server: &Server,
    json: bool,
    group: &str,
    baseline: Option<String>,
    from: Option<String>,
    to: Option<String>,
    ingested: bool,
) -> Result<bool> {
    let source = if ingested { pb::DriftSource::Ingested } else { pb::DriftSource::Served };
    let req = pb::MeasureDriftRequest {
        group: group.to_string(),
        baseline: baseline.unwrap_or_default(),
        from: from.as_deref().map(|s| parse_time("--from", s)).transpose()?,
        to: to.as_deref().map(|s| parse_time("--to", s)).transpose()?,
        source: source as i32,
    };
    let m = pb::monitor_service_client::MonitorServiceClient::new(server.channel().await?)
        .measure_drift(req)
        .await
        .map_err(grpc)?
        .into_inner();
    let any = m.features.iter().any(|f| f.breached);
    if json {
        println!("{}", drift_json(&m));
    } else {
        match m.source() {
            pb::DriftSource::Ingested => {
                println!("{} against baseline {}: values written in the last hour", m.group, m.baseline)
            }
            pb::DriftSource::Served => {
                println!("{} against baseline {}: {} logged answers", m.group, m.baseline, m.answers)
            }
        }
        print_drift(&m, "    ");
    }
    Ok(any)
}
