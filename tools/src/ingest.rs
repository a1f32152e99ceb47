//! `quiver ingest FILE.csv --group G`: a CSV bulk load over the streaming write. The whole file
//! is checked against the registry (columns, types, keys, times) before the first batch is
//! sent, so a malformed file writes nothing; each batch of `--batch-rows` rows is atomic.

use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use quiver_proto::v1 as pb;

use crate::{channel, fetch_group, grpc, parse_value, Result};

/// Most rows one batch may hold (the server's write limit).
const BATCH_ROWS_MAX: usize = 10_000;

pub async fn run(addr: &str, file: &Path, group: &str, batch_rows: usize) -> Result<()> {
    if batch_rows == 0 || batch_rows > BATCH_ROWS_MAX {
        return Err(format!("--batch-rows must be 1..={BATCH_ROWS_MAX}"));
    }
    let ch = channel(addr).await?;
    let (def, et) = fetch_group(&ch, group).await?;

    let what = file.display().to_string();
    let mut reader = csv::Reader::from_path(file).map_err(|e| format!("{what}: {e}"))?;
    let header: Vec<String> =
        reader.headers().map_err(|e| format!("{what}: {e}"))?.iter().map(str::to_string).collect();
    let col = |name: &str| header.iter().position(|h| h == name);
    let key_cols: Vec<usize> = et
        .join_keys
        .iter()
        .map(|k| col(&k.name).ok_or_else(|| format!("{what}: no column for join key {:?}", k.name)))
        .collect::<Result<_>>()?;
    let time_col = col("event_time").ok_or_else(|| format!("{what}: no event_time column"))?;
    let mut feature_cols = Vec::new();
    for (i, h) in header.iter().enumerate() {
        if key_cols.contains(&i) || i == time_col {
            continue;
        }
        let f = def
            .features
            .iter()
            .find(|f| &f.name == h)
            .ok_or_else(|| format!("{what}: column {h:?} is not a feature of {group}"))?;
        feature_cols.push((i, f.name.clone(), f.r#type()));
    }

    // Parse everything first: a bad line anywhere means nothing is written.
    let mut rows = Vec::new();
    for (n, rec) in reader.records().enumerate() {
        let line = n + 2;
        let rec = rec.map_err(|e| format!("{what}: line {line}: {e}"))?;
        let field = |i: usize| rec.get(i).unwrap_or("");
        let parts: Vec<pb::KeyPart> = key_cols
            .iter()
            .zip(&et.join_keys)
            .map(|(&i, k)| {
                let v = field(i);
                Ok(pb::KeyPart {
                    kind: Some(match k.r#type() {
                        pb::JoinKeyType::Int64 => pb::key_part::Kind::Int64Value(
                            v.parse().map_err(|_| format!("{what}: line {line}: {}: {v:?} is not an int64", k.name))?,
                        ),
                        _ => pb::key_part::Kind::StringValue(v.to_string()),
                    }),
                })
            })
            .collect::<Result<_>>()?;
        let t: i64 = field(time_col).parse().map_err(|_| {
            format!("{what}: line {line}: event_time {:?} is not microseconds since the epoch", field(time_col))
        })?;
        let mut row = pb::WriteRow {
            entity: Some(pb::EntityKey { parts }),
            // Pinned to the version checked above, so an apply during the load cannot split it.
            group: format!("{}@{}", def.name, def.version),
            event_time: Some(quiver_server::convert::timestamp(t)),
            ..Default::default()
        };
        for (i, name, ty) in &feature_cols {
            let v = field(*i);
            if !v.is_empty() {
                row.values.insert(
                    name.clone(),
                    parse_value(v, *ty).map_err(|e| format!("{what}: line {line}: {name}: {e}"))?,
                );
            }
        }
        if !row.values.is_empty() {
            rows.push(row);
        }
    }

    let total = rows.len() as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} rows {per_sec} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::WriteFeaturesRequest>(4);
    let mut client = pb::feature_service_client::FeatureServiceClient::new(ch);
    let call =
        tokio::spawn(
            async move { client.write_features_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await },
        );
    let mut chunk = Vec::with_capacity(batch_rows);
    for row in rows {
        chunk.push(row);
        if chunk.len() == batch_rows {
            bar.inc(chunk.len() as u64);
            if tx
                .send(pb::WriteFeaturesRequest { rows: std::mem::take(&mut chunk), ..Default::default() })
                .await
                .is_err()
            {
                break;
            }
        }
    }
    if !chunk.is_empty() {
        bar.inc(chunk.len() as u64);
        let _ = tx.send(pb::WriteFeaturesRequest { rows: chunk, ..Default::default() }).await;
    }
    drop(tx);
    let summary = call.await.map_err(|e| format!("ingest task: {e}"))?.map_err(grpc)?.into_inner();
    bar.finish_and_clear();
    println!(
        "ingested {} rows, {} values in {} batches into {group}",
        summary.rows, summary.values_written, summary.requests
    );
    Ok(())
}
