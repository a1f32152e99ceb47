//! Read-only access to a data directory: verification of a stopped engine's files (or a
//! checkpoint) without opening it for writes, and checkpoints of a running engine.

use std::path::Path;

use super::recovery::{read_manifest, write_snapshot_manifest};
use super::Inner;
use crate::fs::{self, Fs};
use crate::manifest::CURRENT;
use crate::sstable::{self, Table};
use crate::{batch, record, wal, Error, Result};

/// What [`verify_dir`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Tables the manifest names (all read and checked).
    pub tables: usize,
    /// Entries in those tables.
    pub table_entries: u64,
    /// WAL segments that recovery would replay.
    pub wal_segments: usize,
    /// Batches in those segments that recovery would replay.
    pub wal_batches: u64,
    /// Where the newest segment ends in a torn record, if it does (recovery truncates there).
    pub torn_tail: Option<(std::path::PathBuf, u64)>,
}

/// Checks every file of a data directory the way recovery would read it, without changing
/// anything: the manifest, every table it names (every block's checksum and order), and the WAL
/// segments to be replayed (every record's checksum, every batch, sequence continuity). Meant for
/// a stopped engine or a checkpoint; a running engine changes files under it.
pub fn verify_dir(fs: &dyn Fs, dir: &Path) -> Result<VerifyReport> {
    if !fs.exists(&dir.join(CURRENT)) {
        return Err(Error::corruption(dir.join(CURRENT), 0, "no CURRENT file: not a Quiver data directory"));
    }
    let rec = read_manifest(fs, dir)?;
    let mut report = VerifyReport::default();
    for metas in &rec.levels {
        for meta in metas.values() {
            let t = Table::open(fs, dir, meta.number)?;
            if t.size() != meta.size {
                return Err(Error::corruption(
                    t.path(),
                    t.size(),
                    format!("table is {} bytes, the manifest says {}", t.size(), meta.size),
                ));
            }
            let n = t.verify()?;
            if n != meta.entries {
                return Err(Error::corruption(
                    t.path(),
                    0,
                    format!("table holds {n} entries, the manifest says {}", meta.entries),
                ));
            }
            report.tables += 1;
            report.table_entries += n;
        }
    }
    let mut segments: Vec<u64> =
        fs.list(dir)?.iter().filter_map(|n| wal::parse_segment_name(n)).filter(|&n| n >= rec.log_number).collect();
    segments.sort_unstable();
    let mut expected = rec.last_seqno + 1;
    for (i, &number) in segments.iter().enumerate() {
        let path = wal::segment_path(dir, number);
        let bytes = fs::read_all(fs.open(&path)?.as_ref())?;
        let records = record::read_all(&path, number, &bytes, i + 1 == segments.len())?;
        for (offset, payload) in &records.records {
            let b = batch::decode(payload).map_err(|w| Error::corruption(&path, *offset, w))?;
            if b.seqno < expected {
                continue;
            }
            if b.seqno != expected {
                return Err(Error::corruption(
                    &path,
                    *offset,
                    format!("sequence gap: expected batch {expected}, found {}", b.seqno),
                ));
            }
            expected += 1;
            report.wal_batches += 1;
        }
        if records.valid_len < bytes.len() as u64 {
            report.torn_tail = Some((path.clone(), records.valid_len));
        }
        report.wal_segments += 1;
    }
    Ok(report)
}

impl Inner {
    /// Writes a consistent copy of the engine into the new directory `target`: every table of
    /// the current version hard-linked, and a manifest describing exactly them. Every batch
    /// acknowledged before the call is in it (the memtables are flushed first).
    pub(super) fn checkpoint(&self, target: &Path) -> Result<()> {
        if self.fs.exists(&target.join(CURRENT)) || self.fs.list(target).is_ok_and(|l| !l.is_empty()) {
            return Err(Error::InvalidArgument(format!(
                "checkpoint target {} exists and is not empty",
                target.display()
            )));
        }
        self.flush_all()?;
        // Holding the version keeps its tables from being deleted while they are linked.
        let (version, state) = {
            let vs = self.versions.lock();
            (vs.current.clone(), (vs.next_file_number, vs.last_seqno, vs.event_horizon))
        };
        self.fs.create_dir_all(target)?;
        for t in version.all_tables() {
            let name = sstable::table_name(t.meta.number);
            self.fs.hard_link(&self.dir.join(&name), &target.join(&name))?;
        }
        let knowledge = self.knowledge.lock().clone();
        write_snapshot_manifest(self.fs.as_ref(), target, &version, state, self.hlc.high_water(), knowledge)?;
        Ok(())
    }
}
