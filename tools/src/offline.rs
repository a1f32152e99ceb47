//! Offline inspection through the storage crate's public readers: `quiver verify`,
//! `quiver sst dump`, `quiver wal dump`. They read files only; nothing is changed.

use std::io::Write;
use std::path::Path;

use quiver_storage::inspect::{self, StoredVersion, TableEntry, TableFile};

use crate::common::Result;

fn describe(v: &StoredVersion) -> String {
    let key = format!(
        "entity={:?} feature={} event_time_us={} system_time_us={}",
        String::from_utf8_lossy(&v.entity),
        v.feature.0,
        v.event_time.0,
        v.system_time.0
    );
    let value = match &v.cell {
        Ok((Some(value), vv)) => format!("{value:?} vv={:?}", vv.entries()),
        Ok((None, vv)) => format!("(tombstone) vv={:?}", vv.entries()),
        Err(e) => format!("undecodable value: {e}"),
    };
    format!("{key} {value}")
}

/// Runs a dump that writes to stdout through a buffer. A reader that stops reading (a closed
/// pipe, as in `quiver sst dump F | head`) ends the dump quietly, as it does any Unix tool;
/// other write errors and the dump's own are reported.
fn to_stdout(dump: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match dump(&mut out).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(|e| e.to_string()),
    }
}

/// A dump's own error (not the output's), carried through `to_stdout`.
fn failed(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Prints a table's footer-level figures, its blocks and its first `limit` entries.
pub fn sst_dump(path: &Path, limit: usize) -> Result<()> {
    let table = TableFile::open(path).map_err(|e| e.to_string())?;
    to_stdout(|out| {
        let blocks = table.blocks();
        writeln!(out, "table {} ({} bytes, {} data blocks)", path.display(), table.size(), blocks.len())?;
        for (i, (offset, len)) in blocks.iter().enumerate() {
            writeln!(out, "  block {i}: offset {offset} length {len}")?;
        }
        let mut n = 0;
        for entry in table.entries().map_err(failed)? {
            let entry = entry.map_err(failed)?;
            if n < limit {
                match entry {
                    TableEntry::Version(v) => writeln!(out, "{}", describe(&v))?,
                    TableEntry::MalformedKey(k) => writeln!(out, "malformed key {k:?}")?,
                }
            }
            n += 1;
        }
        writeln!(out, "{n} entries")
    })
}

/// Prints a WAL segment's batches (a torn tail is reported, not an error). Every version shows
/// its own system time: a replicated batch's versions keep their origin's stamps.
pub fn wal_dump(path: &Path, limit: usize) -> Result<()> {
    let seg = inspect::wal_segment(path).map_err(|e| e.to_string())?;
    to_stdout(|out| {
        writeln!(out, "segment {} ({} bytes, {} records)", path.display(), seg.bytes, seg.batches.len())?;
        for b in seg.batches.iter().take(limit) {
            let origin = b.origin.map(|(r, s)| format!(" origin=region {r} seqno {s}")).unwrap_or_default();
            writeln!(
                out,
                "batch seqno={} system_time_us={}{origin} ops={} (offset {})",
                b.seqno,
                b.system_time.0,
                b.versions.len(),
                b.offset
            )?;
            for v in &b.versions {
                writeln!(out, "  {}", describe(v))?;
            }
        }
        if let Some(at) = seg.torn_tail_at {
            writeln!(out, "torn tail at offset {at} ({} bytes recovery would truncate)", seg.bytes - at)?;
        }
        Ok(())
    })
}

/// Checks every file of a stopped engine's data directory (or a checkpoint) and prints what it
/// holds.
pub fn verify(dir: &Path, json: bool) -> Result<()> {
    let r = inspect::verify(dir).map_err(|e| e.to_string())?;
    if json {
        let line = serde_json::json!({
            "tables": r.tables,
            "table_entries": r.table_entries,
            "wal_segments": r.wal_segments,
            "wal_batches": r.wal_batches,
            "torn_tail": r.torn_tail.is_some(),
        });
        println!("{line}");
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
