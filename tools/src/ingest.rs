//! `quiver ingest FILE.csv|FILE.parquet --group G`: a bulk load over the streaming write.
//!
//! Two passes over the file: the first checks every row against the registry (columns, types,
//! keys, times) and writes nothing, so a malformed file changes nothing; the second reads it
//! again and streams it in batches of `--batch-rows` rows, each atomic. Memory stays bounded by
//! a few batches whatever the file's size.

use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use quiver_proto::v1 as pb;

use crate::common::{fetch_group, grpc, Result, Server};
use crate::tabular::{self, Cell, Location};

/// Most rows one batch may hold (the server's write limit).
const BATCH_ROWS_MAX: usize = 10_000;
/// Batches in flight between the file reader and the gRPC stream.
const BATCHES_IN_FLIGHT: usize = 4;

/// The reader's stop signal when the server has ended the stream (its status says why).
const STREAM_CLOSED: &str = "stream closed";

/// Which column feeds what.
pub(crate) struct Columns {
    what: String,
    group_ref: String,
    key: tabular::KeyColumns,
    features: Vec<(usize, String, pb::ValueType)>,
}

impl Columns {
    pub(crate) fn new(what: String, header: &[String], def: &pb::FeatureGroup, et: &pb::EntityType) -> Result<Self> {
        let key = tabular::KeyColumns::locate(&what, header, et, "event_time")?;
        let mut features = Vec::new();
        for (i, h) in header.iter().enumerate() {
            if key.holds(i) {
                continue;
            }
            let f = def
                .features
                .iter()
                .find(|f| &f.name == h)
                .ok_or_else(|| format!("{what}: column {h:?} is not a feature of {}", def.name))?;
            features.push((i, f.name.clone(), f.r#type()));
        }
        // Pinned to the version checked here, so an apply during the load cannot split it.
        Ok(Columns { what, group_ref: format!("{}@{}", def.name, def.version), key, features })
    }

    /// The names of the features the file has columns for.
    pub(crate) fn feature_names(&self) -> impl Iterator<Item = &str> {
        self.features.iter().map(|(_, n, _)| n.as_str())
    }

    /// The write row of one table row; `None` if it has no value at all.
    fn row(&self, at: Location, mut cells: Vec<Cell>) -> Result<Option<pb::WriteRow>> {
        let what = &self.what;
        let (entity, t) = self.key.take(at, &mut cells)?;
        let mut row = pb::WriteRow {
            entity: Some(entity),
            group: self.group_ref.clone(),
            event_time: Some(quiver_server::convert::timestamp(t)),
            ..Default::default()
        };
        for (i, name, ty) in &self.features {
            let cell = cells.get_mut(*i).map(std::mem::take).unwrap_or_default();
            if let Some(v) = tabular::value(cell, *ty).map_err(|e| format!("{what}: {at}: {name}: {e}"))? {
                row.values.insert(name.clone(), v);
            }
        }
        Ok((!row.values.is_empty()).then_some(row))
    }
}

/// Calls `f` with every row of the file that has a value.
pub(crate) fn for_each_row(file: &Path, cols: &Columns, mut f: impl FnMut(pb::WriteRow) -> Result<()>) -> Result<()> {
    let mut rows = tabular::open(file)?;
    while let Some((at, cells)) = rows.next_row()? {
        if let Some(row) = cols.row(at, cells)? {
            f(row)?;
        }
    }
    Ok(())
}

pub async fn run(server: &Server, file: &Path, group: &str, batch_rows: usize) -> Result<()> {
    if batch_rows == 0 || batch_rows > BATCH_ROWS_MAX {
        return Err(format!("--batch-rows must be 1..={BATCH_ROWS_MAX}"));
    }
    let ch = server.channel().await?;
    let (def, et) = fetch_group(&ch, group).await?;
    let header = tabular::open(file)?.header().to_vec();
    let cols = std::sync::Arc::new(Columns::new(file.display().to_string(), &header, &def, &et)?);

    // Pass 1: check everything; a bad row anywhere means nothing is written.
    let (path, c) = (file.to_path_buf(), cols.clone());
    let total = tokio::task::spawn_blocking(move || {
        let mut n = 0u64;
        for_each_row(&path, &c, |_| {
            n += 1;
            Ok(())
        })
        .map(|()| n)
    })
    .await
    .map_err(|e| format!("reading {}: {e}", file.display()))??;

    // Pass 2: stream it.
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} rows {per_sec} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::WriteFeaturesRequest>(BATCHES_IN_FLIGHT);
    let mut client = pb::feature_service_client::FeatureServiceClient::new(ch);
    let call =
        tokio::spawn(
            async move { client.write_features_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await },
        );
    let (path, b): (PathBuf, ProgressBar) = (file.to_path_buf(), bar.clone());
    let reader = tokio::task::spawn_blocking(move || {
        let mut chunk = Vec::with_capacity(batch_rows);
        let send = |rows: Vec<pb::WriteRow>| {
            b.inc(rows.len() as u64);
            // A closed stream means the server ended the call; its status is the error.
            tx.blocking_send(pb::WriteFeaturesRequest { rows, ..Default::default() }).is_ok()
        };
        let r = for_each_row(&path, &cols, |row| {
            chunk.push(row);
            if chunk.len() == batch_rows && !send(std::mem::replace(&mut chunk, Vec::with_capacity(batch_rows))) {
                return Err(STREAM_CLOSED.into());
            }
            Ok(())
        });
        match r {
            Ok(()) => {
                if !chunk.is_empty() {
                    send(chunk);
                }
                Ok(())
            }
            Err(e) if e == STREAM_CLOSED => Ok(()),
            Err(e) => Err(format!("the file changed while it was loaded: {e}")),
        }
    });
    let summary = call.await.map_err(|e| format!("ingest task: {e}"))?.map_err(grpc)?.into_inner();
    reader.await.map_err(|e| format!("ingest reader: {e}"))??;
    bar.finish_and_clear();
    println!(
        "ingested {} rows, {} values in {} batches into {group}",
        summary.rows, summary.values_written, summary.requests
    );
    Ok(())
}
