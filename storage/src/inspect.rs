//! Offline inspection of an engine's files, as typed records: what `quiver wal dump`,
//! `quiver sst dump` and `quiver verify` print. Read-only; the caller needs no knowledge of
//! the encodings (`storage/FORMAT.md`).

use std::path::Path;
use std::sync::Arc;

use crate::fs::{self, Fs, RealFs};
use crate::key::KeyRef;
use crate::sstable::{self, Table, TableIter};
use crate::types::{EventTime, FeatureId, RegionId, SystemTime, Value, VersionVector};
use crate::{batch, cell, record, wal, Error, Result};

pub use crate::db::VerifyReport;

/// Checks every file of a stopped engine's data directory (or a checkpoint) on the local file
/// system: the manifest, every table's checksums and order, every WAL segment.
pub fn verify(dir: &Path) -> Result<VerifyReport> {
    crate::db::verify_dir(&RealFs, dir)
}

/// One cell version as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredVersion {
    /// Entity key.
    pub entity: Vec<u8>,
    /// Feature.
    pub feature: FeatureId,
    /// Event time.
    pub event_time: EventTime,
    /// System time: the version's own (in a replicated batch, its origin's stamp).
    pub system_time: SystemTime,
    /// The value (`None`: a tombstone) and version vector, or why the cell does not decode.
    pub cell: std::result::Result<(Option<Value>, VersionVector), String>,
}

/// One batch of a WAL segment.
#[derive(Debug, Clone, PartialEq)]
pub struct WalBatch {
    /// Offset of its record in the segment.
    pub offset: u64,
    /// Sequence number.
    pub seqno: u64,
    /// The batch's stamp (a local batch's versions all carry it).
    pub system_time: SystemTime,
    /// For a replicated batch: the region it was written in and its sequence number there.
    pub origin: Option<(RegionId, u64)>,
    /// Its versions, in order.
    pub versions: Vec<StoredVersion>,
}

/// A WAL segment, read whole.
#[derive(Debug, Clone, PartialEq)]
pub struct WalSegment {
    /// Bytes in the file.
    pub bytes: u64,
    /// Its batches.
    pub batches: Vec<WalBatch>,
    /// Where a torn tail starts (recovery truncates it), if the file ends in one.
    pub torn_tail_at: Option<u64>,
}

fn file_number(path: &Path, parse: fn(&str) -> Option<u64>, kind: &str) -> Result<u64> {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(parse)
        .ok_or_else(|| Error::InvalidArgument(format!("{}: not a {kind} file name (NNNNNN.{kind})", path.display())))
}

/// Reads the WAL segment at `path` (a file named `NNNNNN.wal`).
pub fn wal_segment(path: &Path) -> Result<WalSegment> {
    let number = file_number(path, wal::parse_segment_name, "wal")?;
    let f = RealFs.open(path)?;
    let bytes = fs::read_all(f.as_ref())?;
    let recs = record::read_all(path, number, &bytes, true)?;
    let mut batches = Vec::with_capacity(recs.records.len());
    for (offset, payload) in &recs.records {
        let b = batch::decode(payload).map_err(|w| Error::corruption(path, *offset, w))?;
        let versions = b
            .ops
            .iter()
            .map(|op| StoredVersion {
                entity: op.entity.to_vec(),
                feature: op.feature,
                event_time: op.event_time,
                system_time: op.system_time,
                cell: cell::decode(op.cell).map_err(|w| w.to_string()),
            })
            .collect();
        batches.push(WalBatch {
            offset: *offset,
            seqno: b.seqno,
            system_time: b.system_time,
            origin: b.origin,
            versions,
        });
    }
    let torn_tail_at = (recs.valid_len < bytes.len() as u64).then_some(recs.valid_len);
    Ok(WalSegment { bytes: bytes.len() as u64, batches, torn_tail_at })
}

/// An SSTable opened for inspection.
#[derive(Debug)]
pub struct TableFile {
    table: Arc<Table>,
}

/// One entry of a table: a version, or a key that does not parse (corruption).
#[derive(Debug, Clone, PartialEq)]
pub enum TableEntry {
    /// A well-formed entry.
    Version(StoredVersion),
    /// A key that is not a valid internal key.
    MalformedKey(Vec<u8>),
}

impl TableFile {
    /// Opens the table at `path` (a file named `NNNNNN.sst`), checking its footer and index.
    pub fn open(path: &Path) -> Result<TableFile> {
        let number = file_number(path, sstable::parse_table_name, "sst")?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Ok(TableFile { table: Table::open(&RealFs, dir, number)? })
    }

    /// Bytes in the file.
    pub fn size(&self) -> u64 {
        self.table.size()
    }

    /// `(offset, length)` of each data block.
    pub fn blocks(&self) -> Vec<(u64, u64)> {
        (0..self.table.block_count()).map(|i| self.table.block_handle(i)).map(|h| (h.offset, h.len)).collect()
    }

    /// Every entry, in key order (each block's checksum is checked as it is read).
    pub fn entries(&self) -> Result<TableEntries> {
        let mut it = self.table.iter();
        it.seek_to_first()?;
        Ok(TableEntries { it, failed: false })
    }
}

/// The entries of a [`TableFile`].
pub struct TableEntries {
    it: TableIter,
    failed: bool,
}

impl Iterator for TableEntries {
    type Item = Result<TableEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || !self.it.valid() {
            return None;
        }
        let (k, v) = (self.it.key(), self.it.value());
        let entry = match KeyRef::parse(k) {
            Some(kr) => TableEntry::Version(StoredVersion {
                entity: kr.entity(),
                feature: kr.feature(),
                event_time: kr.event_time(),
                system_time: kr.system_time(),
                cell: cell::decode_stored(v, kr.system_time().0).map_err(|w| w.to_string()),
            }),
            None => TableEntry::MalformedKey(k.to_vec()),
        };
        if let Err(e) = self.it.step() {
            self.failed = true;
            return Some(Err(e));
        }
        Some(Ok(entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Db, Durability, Options, ShippedBatch, ShippedOp, WriteBatch};

    fn shipped_batch(origin: RegionId, seqno: u64, stamp: u64, entity: &[u8], v: Value) -> ShippedBatch {
        let mut c = Vec::new();
        cell::encode(Some(&v), &VersionVector::single(origin, stamp), &mut c);
        ShippedBatch {
            origin,
            seqno,
            system_time: SystemTime(stamp),
            ops: vec![ShippedOp { entity: entity.to_vec(), feature: FeatureId(1), event_time: EventTime(5), cell: c }],
        }
    }

    #[test]
    fn wal_dump_shows_each_version_its_own_stamp() {
        let tmp = tempfile::tempdir().expect("tmp");
        let db = Db::open(tmp.path(), Options { region: 1, ..Options::default() }).expect("open");
        let mut b = WriteBatch::new();
        b.put(b"\x01a", FeatureId(1), EventTime(5), Value::Int64(1)).expect("put");
        let local = db.write(b, Durability::Sync).expect("write");
        // A peer's batch whose version is older than the batch the node logs it in.
        let peer_stamp = local.system_time.0 + 10;
        db.apply_replicated(&shipped_batch(2, 1, peer_stamp, b"\x01b", Value::Int64(2)), Durability::Sync)
            .expect("apply");
        drop(db);
        let seg = std::fs::read_dir(tmp.path())
            .expect("dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "wal"))
            .expect("a segment");
        let dump = wal_segment(&seg).expect("dump");
        assert_eq!(dump.batches.len(), 2);
        assert_eq!(dump.batches[0].versions[0].system_time, local.system_time);
        let replicated = &dump.batches[1];
        assert_eq!(replicated.origin, Some((2, 1)));
        let v = replicated.versions.iter().find(|v| v.entity == b"\x01b").expect("the peer's version");
        assert_eq!(v.system_time, SystemTime(peer_stamp), "its own stamp, not the batch's");
        assert!(replicated.system_time > v.system_time);
        assert_eq!(v.cell.as_ref().map(|c| c.0.clone()), Ok(Some(Value::Int64(2))));
    }
}
