//! `quiver backfill --group G@N`: fills a staged version with history, resumably.
//!
//! Two sources (README "Group versions"):
//! - `--from FILE.parquet|csv` loads rows the way `quiver ingest` does (same columns, checked
//!   whole before anything is written), pinned to `G@N`. Each batch of `--batch-rows` rows is
//!   one atomic, synced write carrying the idempotency key `backfill-<run>-<batch>`; after a
//!   batch is acknowledged the progress file records the rows done. A rerun after a crash (of
//!   the command or of quiverd) reads the progress file, skips the rows done and sends the
//!   following batches with the same keys, so a batch that committed before the crash but was
//!   not yet recorded is answered from its idempotency record instead of being written twice:
//!   no value is missing and none is written twice.
//! - `--copy-from M` copies features' history from `G@M` inside the engine
//!   (`CopyFeatureHistory`); the progress file records the entity to resume at.
//!
//! The progress file (JSON, replaced atomically after each step) names its source, the file's
//! size and modification time and the target; a rerun against anything else is refused unless
//! `--restart`. Backfilling the serving version, or features whose data the serving version
//! shares, is refused: it would change what is served (use `quiver ingest` for that).

use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use quiver_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::common::{fetch_group, grpc, now_us, Result, Server};
use crate::ingest::{for_each_row, Columns};
use crate::tabular;

/// Most rows one batch may hold (the server's write limit).
const BATCH_ROWS_MAX: usize = 10_000;
/// Batches written concurrently (acknowledged, and recorded, in order).
const BATCHES_IN_FLIGHT: usize = 4;

/// What `quiver backfill` was asked.
pub struct Args {
    /// "group@N".
    pub group: String,
    /// Rows to load.
    pub from: Option<PathBuf>,
    /// Or the version to copy from.
    pub copy_from: Option<u32>,
    /// With `copy_from`: the features to copy (empty: all that can be).
    pub features: Vec<String>,
    /// Rows per batch.
    pub batch_rows: usize,
    /// Where progress is kept.
    pub progress_file: Option<PathBuf>,
    /// Ignore saved progress.
    pub restart: bool,
}

/// The saved progress of one backfill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Progress {
    /// "file" or "copy".
    kind: String,
    /// The target, "group@N".
    target: String,
    /// The file (absolute path) or "group@M".
    source: String,
    /// The file's size and modification time (ns since the epoch); 0 for a copy.
    size: u64,
    modified_ns: u128,
    /// Rows per batch (a resumed load cuts the same batches, so their keys match).
    batch_rows: usize,
    /// Names this backfill's idempotency keys.
    run: String,
    /// Rows with values written and acknowledged (a file).
    rows_done: u64,
    /// The entity to resume a copy at (hex).
    next_entity: String,
    /// Cells copied so far (a copy, over every run).
    cells_copied: u64,
    done: bool,
}

impl Progress {
    fn load(path: &Path) -> Result<Option<Progress>> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| format!("progress file {}: {e} (remove it or pass --restart)", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("progress file {}: {e}", path.display())),
        }
    }

    /// Replaces the file atomically (written beside it, synced, renamed).
    fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| format!("progress file {}: {e}", path.display()))
    }

    /// True if `self` (saved) describes the same backfill as `want`.
    fn same_job(&self, want: &Progress) -> bool {
        (&self.kind, &self.target, &self.source, self.size, self.modified_ns)
            == (&want.kind, &want.target, &want.source, want.size, want.modified_ns)
    }
}

fn bar(total: u64, done: u64, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let template = format!("{{bar:40}} {{pos}}/{{len}} {unit} {{per_sec}} ETA {{eta}}");
    bar.set_style(ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    bar.set_position(done);
    bar
}

pub async fn run(server: &Server, json: bool, args: Args) -> Result<()> {
    let (group, version) = match quiver_server::registry::parse_group_ref(&args.group) {
        Some((g, v)) if v > 0 => (g.to_string(), v),
        _ => return Err(format!("--group {:?} must name a version: group@N", args.group)),
    };
    let ch = server.channel().await?;
    let versions = pb::registry_service_client::RegistryServiceClient::new(ch.clone())
        .list_group_versions(pb::ListGroupVersionsRequest { group: group.clone() })
        .await
        .map_err(grpc)?
        .into_inner();
    let target = versions
        .versions
        .iter()
        .find(|v| v.version == version)
        .ok_or_else(|| format!("feature group {group:?} has no version {version}"))?;
    if versions.serving_version == version {
        return Err(format!(
            "{group}@{version} is the serving version: a backfill would change what is served (use quiver ingest)"
        ));
    }
    match (&args.from, args.copy_from) {
        (Some(file), None) => load(server, json, &args, &group, version, &target.shared_with_serving, file).await,
        (None, Some(from)) => copy(server, json, &args, &group, version, from).await,
        _ => Err("give exactly one of --from FILE and --copy-from VERSION".into()),
    }
}

fn progress_path(args: &Args, default: PathBuf) -> PathBuf {
    args.progress_file.clone().unwrap_or(default)
}

/// Resolves the saved progress against the job wanted: resume, start over, or refuse.
fn resume(path: &Path, want: Progress, restart: bool) -> Result<Progress> {
    match Progress::load(path)? {
        Some(saved) if !restart => {
            if saved.same_job(&want) {
                Ok(saved)
            } else {
                Err(format!(
                    "progress file {} is for another backfill ({} into {}, or the file changed since); \
                     pass --restart to start over or --progress-file for another",
                    path.display(),
                    saved.source,
                    saved.target
                ))
            }
        }
        _ => Ok(want),
    }
}

async fn load(
    server: &Server,
    json: bool,
    args: &Args,
    group: &str,
    version: u32,
    shared: &[String],
    file: &Path,
) -> Result<()> {
    let batch_rows = args.batch_rows;
    if batch_rows == 0 || batch_rows > BATCH_ROWS_MAX {
        return Err(format!("--batch-rows must be 1..={BATCH_ROWS_MAX}"));
    }
    let ch = server.channel().await?;
    let target = format!("{group}@{version}");
    let (def, et) = fetch_group(&ch, &target).await?;
    let header = tabular::open(file)?.header().to_vec();
    let cols = std::sync::Arc::new(Columns::new(file.display().to_string(), &header, &def, &et)?);
    if let Some(f) = cols.feature_names().find(|f| shared.iter().any(|s| s == f)) {
        return Err(format!(
            "{}: column {f:?}: {target}:{f} shares its data with the serving version (unchanged name, type and code), \
             so its history is already there and writing it would change what is served; drop the column",
            file.display()
        ));
    }
    let abs = std::fs::canonicalize(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let meta = std::fs::metadata(&abs).map_err(|e| format!("{}: {e}", file.display()))?;
    let modified_ns =
        meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    let path = progress_path(args, {
        let mut p = abs.clone().into_os_string();
        p.push(format!(".backfill-{group}-v{version}.json"));
        PathBuf::from(p)
    });
    let want = Progress {
        kind: "file".into(),
        target: target.clone(),
        source: abs.display().to_string(),
        size: meta.len(),
        modified_ns,
        batch_rows,
        run: format!("{:x}{:x}", now_us(), std::process::id()),
        rows_done: 0,
        next_entity: String::new(),
        cells_copied: 0,
        done: false,
    };
    let mut progress = resume(&path, want, args.restart)?;
    if progress.done {
        println!("{target}: the backfill from {} is already complete ({} rows)", file.display(), progress.rows_done);
        return Ok(());
    }
    let batch_rows = progress.batch_rows;

    // Pass 1: check every row; a bad row anywhere means nothing (more) is written.
    let (p, c) = (file.to_path_buf(), cols.clone());
    let total = tokio::task::spawn_blocking(move || {
        let mut n = 0u64;
        for_each_row(&p, &c, |_| {
            n += 1;
            Ok(())
        })
        .map(|()| n)
    })
    .await
    .map_err(|e| format!("reading {}: {e}", file.display()))??;
    if progress.rows_done > total {
        return Err(format!("progress file {} counts more rows than the file has", path.display()));
    }
    let resumed_at = progress.rows_done;
    progress.save(&path)?;

    // Pass 2: batches after the rows done, BATCHES_IN_FLIGHT at a time, recorded in order.
    let started = std::time::Instant::now();
    let bar = bar(total, resumed_at, "rows");
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, Vec<pb::WriteRow>)>(BATCHES_IN_FLIGHT);
    let (p, c, skip) = (file.to_path_buf(), cols.clone(), resumed_at);
    let reader = tokio::task::spawn_blocking(move || {
        let (mut seen, mut index) = (0u64, skip / batch_rows as u64);
        let mut chunk = Vec::with_capacity(batch_rows);
        let r = for_each_row(&p, &c, |row| {
            seen += 1;
            if seen <= skip {
                return Ok(());
            }
            chunk.push(row);
            if chunk.len() == batch_rows {
                let rows = std::mem::replace(&mut chunk, Vec::with_capacity(batch_rows));
                tx.blocking_send((index, rows)).map_err(|_| "stopped".to_string())?;
                index += 1;
            }
            Ok(())
        });
        if r.is_ok() && !chunk.is_empty() {
            let _ = tx.blocking_send((index, chunk));
        }
        r
    });
    let client = pb::feature_service_client::FeatureServiceClient::new(ch);
    let mut in_flight = std::collections::VecDeque::new();
    let mut values = 0u64;
    let mut deduplicated = 0u64;
    loop {
        while in_flight.len() < BATCHES_IN_FLIGHT {
            let Some((index, rows)) = rx.recv().await else { break };
            let n = rows.len() as u64;
            let req = pb::WriteFeaturesRequest {
                rows,
                durability: pb::Durability::Sync as i32,
                idempotency_key: format!("backfill-{}-{index}", progress.run),
            };
            let mut c = client.clone();
            in_flight.push_back((n, tokio::spawn(async move { c.write_features(req).await })));
        }
        let Some((n, call)) = in_flight.pop_front() else { break };
        let r = call.await.map_err(|e| format!("write task: {e}"))?.map_err(grpc)?.into_inner();
        values += r.values_written;
        deduplicated += u64::from(r.deduplicated);
        progress.rows_done += n;
        progress.save(&path)?;
        bar.inc(n);
    }
    drop(rx);
    reader.await.map_err(|e| format!("backfill reader: {e}"))?.map_err(|e| format!("the file changed: {e}"))?;
    progress.done = true;
    progress.save(&path)?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let rows = total - resumed_at;
    if json {
        let line = serde_json::json!({
            "target": target, "rows": rows, "rows_total": total, "resumed_at": resumed_at, "values": values,
            "batches_already_written": deduplicated, "seconds": secs,
        });
        println!("{line}");
    } else {
        let resumed = if resumed_at > 0 { format!(" (resumed after {resumed_at} rows)") } else { String::new() };
        println!(
            "backfilled {rows} rows, {values} values into {target} in {secs:.1} s ({:.0} rows/s){resumed}; \
             {deduplicated} batches were already written",
            rows as f64 / secs.max(1e-9)
        );
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return Err(format!("bad entity {s:?} in the progress file"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| format!("bad entity {s:?} in the progress file")))
        .collect()
}

async fn copy(server: &Server, json: bool, args: &Args, group: &str, version: u32, from: u32) -> Result<()> {
    let target = format!("{group}@{version}");
    let path = progress_path(args, PathBuf::from(format!(".quiver-copy-{group}-v{from}-v{version}.json")));
    let want = Progress {
        kind: "copy".into(),
        target: target.clone(),
        source: format!("{group}@{from} {}", args.features.join(",")),
        size: 0,
        modified_ns: 0,
        batch_rows: 0,
        run: String::new(),
        rows_done: 0,
        next_entity: String::new(),
        cells_copied: 0,
        done: false,
    };
    let mut progress = resume(&path, want, args.restart)?;
    if progress.done {
        println!("{target}: the copy from v{from} is already complete ({} cells)", progress.cells_copied);
        return Ok(());
    }
    let req = pb::CopyFeatureHistoryRequest {
        group: group.to_string(),
        from_version: from,
        to_version: version,
        features: args.features.clone(),
        start_entity: unhex(&progress.next_entity)?,
    };
    let started = std::time::Instant::now();
    let mut stream = pb::feature_service_client::FeatureServiceClient::new(server.channel().await?)
        .copy_feature_history(req)
        .await
        .map_err(grpc)?
        .into_inner();
    let spinner = ProgressBar::new_spinner();
    let before = progress.cells_copied;
    let mut last = pb::CopyFeatureHistoryProgress::default();
    while let Some(p) = stream.message().await.map_err(grpc)? {
        progress.cells_copied = before + p.cells_copied;
        progress.next_entity = hex(&p.next_entity);
        progress.done = p.done;
        progress.save(&path)?;
        spinner.set_message(format!("{} cells, {} entities", p.cells_copied, p.entities));
        last = p;
    }
    spinner.finish_and_clear();
    if !progress.done {
        return Err("the server ended the copy early; run the command again to resume".into());
    }
    let secs = started.elapsed().as_secs_f64();
    if json {
        let line = serde_json::json!({
            "target": target, "from": from, "copied": last.copying, "already_shared": last.already_shared,
            "cells": last.cells_copied, "entities": last.entities, "seconds": secs,
        });
        println!("{line}");
    } else {
        println!(
            "copied {} cells of {} entities ({}) from v{from} into {target} in {secs:.1} s ({:.0} cells/s)",
            last.cells_copied,
            last.entities,
            if last.copying.is_empty() { "no feature".to_string() } else { last.copying.join(", ") },
            last.cells_copied as f64 / secs.max(1e-9)
        );
        if !last.already_shared.is_empty() {
            println!("already shared with v{from} (nothing to copy): {}", last.already_shared.join(", "));
        }
    }
    Ok(())
}
