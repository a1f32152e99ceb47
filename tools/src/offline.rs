//! Offline inspection through the storage crate's public readers: `quiver verify`,
//! `quiver sst dump`, `quiver wal dump`. They read files only; nothing is changed.

use std::path::Path;

use quiver_storage::fs::{self, Fs, RealFs};
use quiver_storage::key::KeyRef;
use quiver_storage::sstable::Table;
use quiver_storage::{batch, cell, record, sstable, wal};

use crate::common::Result;

fn file_number(path: &Path, parse: fn(&str) -> Option<u64>, kind: &str) -> Result<u64> {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(parse)
        .ok_or_else(|| format!("{}: not a {kind} file name (NNNNNN.{kind})", path.display()))
}

fn describe(k: &[u8], v: &[u8]) -> String {
    let key = match KeyRef::parse(k) {
        Some(kr) => format!(
            "entity={:?} feature={} event_time_us={} system_time_us={}",
            String::from_utf8_lossy(&kr.entity()),
            kr.feature().0,
            kr.event_time().0,
            kr.system_time().0
        ),
        None => format!("malformed key {k:?}"),
    };
    let value = match cell::decode(v) {
        Ok((Some(v), vv)) => format!("{v:?} vv={:?}", vv.entries()),
        Ok((None, vv)) => format!("(tombstone) vv={:?}", vv.entries()),
        Err(e) => format!("undecodable value: {e}"),
    };
    format!("{key} {value}")
}

/// Prints a table's footer-level figures, its blocks and its first `limit` entries.
pub fn sst_dump(path: &Path, limit: usize) -> Result<()> {
    let number = file_number(path, sstable::parse_table_name, "sst")?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let table = Table::open(&RealFs, dir, number).map_err(|e| e.to_string())?;
    println!("table {} ({} bytes, {} data blocks)", path.display(), table.size(), table.block_count());
    for i in 0..table.block_count() {
        let h = table.block_handle(i);
        println!("  block {i}: offset {} length {}", h.offset, h.len);
    }
    let mut it = table.iter();
    it.seek_to_first().map_err(|e| e.to_string())?;
    let mut n = 0;
    while it.valid() {
        if n < limit {
            println!("{}", describe(it.key(), it.value()));
        }
        n += 1;
        it.step().map_err(|e| e.to_string())?;
    }
    println!("{n} entries");
    Ok(())
}

/// Prints a WAL segment's batches (a torn tail is reported, not an error).
pub fn wal_dump(path: &Path, limit: usize) -> Result<()> {
    let number = file_number(path, wal::parse_segment_name, "wal")?;
    let f = RealFs.open(path).map_err(|e| e.to_string())?;
    let bytes = fs::read_all(f.as_ref()).map_err(|e| e.to_string())?;
    let recs = record::read_all(path, number, &bytes, true).map_err(|e| e.to_string())?;
    println!("segment {} ({} bytes, {} records)", path.display(), bytes.len(), recs.records.len());
    for (i, (offset, payload)) in recs.records.iter().enumerate() {
        let b = batch::decode(payload).map_err(|w| format!("{} at offset {offset}: {w}", path.display()))?;
        if i < limit {
            println!(
                "batch seqno={} system_time_us={} ops={} (offset {offset})",
                b.seqno,
                b.system_time.0,
                b.ops.len()
            );
            for op in &b.ops {
                let key = quiver_storage::key::encode(op.entity, op.feature, op.event_time, b.system_time);
                println!("  {}", describe(&key, op.cell));
            }
        }
    }
    if recs.valid_len < bytes.len() as u64 {
        println!(
            "torn tail at offset {} ({} bytes recovery would truncate)",
            recs.valid_len,
            bytes.len() as u64 - recs.valid_len
        );
    }
    Ok(())
}

/// Checks every file of a stopped engine's data directory (or a checkpoint) and prints what it
/// holds.
pub fn verify(dir: &Path, json: bool) -> Result<()> {
    let r = quiver_storage::verify_dir(&RealFs, dir).map_err(|e| e.to_string())?;
    if json {
        println!(
            "{{\"tables\":{},\"table_entries\":{},\"wal_segments\":{},\"wal_batches\":{},\"torn_tail\":{}}}",
            r.tables,
            r.table_entries,
            r.wal_segments,
            r.wal_batches,
            r.torn_tail.is_some()
        );
    } else {
        println!(
            "ok: {} tables ({} entries), {} WAL segments ({} batches to replay){}",
            r.tables,
            r.table_entries,
            r.wal_segments,
            r.wal_batches,
            r.torn_tail
                .map(|(p, o)| format!("; torn tail in {} at {o} (recovery truncates it)", p.display()))
                .unwrap_or_default()
        );
    }
    Ok(())
}
