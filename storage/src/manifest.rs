//! The manifest: a log of version edits describing which tables make up each level.
//!
//! ```text
//! CURRENT             = "MANIFEST-NNNNNN\n" (replaced atomically: temp file, fsync, rename, dir fsync)
//! MANIFEST-NNNNNN     = record* (see crate::record; records are seeded with the manifest's number)
//! record payload      = one version edit = field*
//! field               = tag uvarint | len uvarint | body (len bytes)
//! tags  1 format version  uvarint
//!       2 log number      uvarint   WAL segments numbered below it are flushed
//!       3 next file number uvarint
//!       4 last sequence   uvarint   last batch whose writes are all in tables
//!       5 hlc high water  uvarint   no system time above it was issued before this edit
//!       6 event horizon   zigzag uvarint
//!       7 add table       level, number, size, entries, system time min, system time max (uvarints),
//!                         smallest key, largest key (len uvarint + bytes)
//!       8 delete table    level, number (uvarints)
//!       64 knowledge      count uvarint, then (region uvarint, counter uvarint) * count: what this
//!                         node knew of other regions' writes (REPLICATION.md §2); written only
//!                         once replication has taught it something
//!       >= 64             reserved for fields an older reader may skip; other unknown tags are corruption
//! ```
//!
//! A new manifest starts with one edit holding the whole state (a snapshot). Every later edit is
//! appended and fsynced before the change it records takes effect (tables become visible,
//! obsolete files are deleted). The tail of the manifest may be torn by a crash; a torn edit was
//! never acknowledged, so recovery stops before it.

use std::path::Path;

use crate::coding::{put_bytes, put_uvarint, unzigzag, zigzag, DecodeError, Reader};
use crate::limits::{ENTITY_KEY_BYTES_MAX, LEVELS};
use crate::types::SystemTime;

/// Format version of the manifest this code writes.
pub const FORMAT_VERSION: u64 = 1;

/// Metadata of one table, as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMeta {
    /// File number.
    pub number: u64,
    /// Size in bytes.
    pub size: u64,
    /// Number of entries.
    pub entries: u64,
    /// Smallest system time in the table.
    pub system_time_min: SystemTime,
    /// Greatest system time in the table.
    pub system_time_max: SystemTime,
    /// Smallest internal key.
    pub smallest: Vec<u8>,
    /// Largest internal key.
    pub largest: Vec<u8>,
}

impl From<crate::sstable::TableInfo> for FileMeta {
    fn from(t: crate::sstable::TableInfo) -> Self {
        FileMeta {
            number: t.number,
            size: t.size,
            entries: t.entries,
            system_time_min: t.system_time_min,
            system_time_max: t.system_time_max,
            smallest: t.smallest,
            largest: t.largest,
        }
    }
}

/// One change to the engine's persistent state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VersionEdit {
    /// Format version (in the first edit of a manifest).
    pub format_version: Option<u64>,
    /// Smallest WAL segment still needed.
    pub log_number: Option<u64>,
    /// Next file number to allocate.
    pub next_file_number: Option<u64>,
    /// Last sequence number whose batch is entirely in tables.
    pub last_seqno: Option<u64>,
    /// HLC high-water mark.
    pub hlc_high_water: Option<u64>,
    /// Event-time horizon.
    pub event_horizon: Option<i64>,
    /// Tables added, with their level.
    pub added: Vec<(usize, FileMeta)>,
    /// Tables removed: (level, number).
    pub deleted: Vec<(usize, u64)>,
    /// The knowledge vector (replication).
    pub knowledge: Option<crate::types::VersionVector>,
}

const TAG_FORMAT_VERSION: u64 = 1;
const TAG_LOG_NUMBER: u64 = 2;
const TAG_NEXT_FILE: u64 = 3;
const TAG_LAST_SEQNO: u64 = 4;
const TAG_HLC: u64 = 5;
const TAG_HORIZON: u64 = 6;
const TAG_ADD: u64 = 7;
const TAG_DELETE: u64 = 8;
const TAG_KNOWLEDGE: u64 = 64;
const TAG_SKIPPABLE_MIN: u64 = 64;
const KEY_BYTES_MAX: usize = 2 * ENTITY_KEY_BYTES_MAX + 64;

impl VersionEdit {
    /// Encodes the edit.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let field = |tag: u64, body: &[u8], out: &mut Vec<u8>| {
            put_uvarint(out, tag);
            put_bytes(out, body);
        };
        let uv = |v: u64| {
            let mut b = Vec::new();
            put_uvarint(&mut b, v);
            b
        };
        for (tag, v) in [
            (TAG_FORMAT_VERSION, self.format_version),
            (TAG_LOG_NUMBER, self.log_number),
            (TAG_NEXT_FILE, self.next_file_number),
            (TAG_LAST_SEQNO, self.last_seqno),
            (TAG_HLC, self.hlc_high_water),
            (TAG_HORIZON, self.event_horizon.map(zigzag)),
        ] {
            if let Some(v) = v {
                field(tag, &uv(v), &mut out);
            }
        }
        for (level, f) in &self.added {
            let mut b = Vec::new();
            for v in [*level as u64, f.number, f.size, f.entries, f.system_time_min.0, f.system_time_max.0] {
                put_uvarint(&mut b, v);
            }
            put_bytes(&mut b, &f.smallest);
            put_bytes(&mut b, &f.largest);
            field(TAG_ADD, &b, &mut out);
        }
        for (level, n) in &self.deleted {
            let mut b = uv(*level as u64);
            put_uvarint(&mut b, *n);
            field(TAG_DELETE, &b, &mut out);
        }
        if let Some(k) = self.knowledge.as_ref().filter(|k| !k.is_empty()) {
            let mut b = uv(k.len() as u64);
            for &(r, c) in k.entries() {
                put_uvarint(&mut b, u64::from(r));
                put_uvarint(&mut b, c);
            }
            field(TAG_KNOWLEDGE, &b, &mut out);
        }
        out
    }

    /// Decodes an edit.
    pub fn decode(buf: &[u8]) -> Result<VersionEdit, DecodeError> {
        let mut e = VersionEdit::default();
        let mut r = Reader::new(buf);
        let level = |r: &mut Reader<'_>| -> Result<usize, DecodeError> {
            let l = r.uvarint()?;
            if l >= LEVELS as u64 {
                return Err("level out of range");
            }
            Ok(l as usize)
        };
        while !r.is_empty() {
            let tag = r.uvarint()?;
            let body = r.len_bytes(buf.len())?;
            let mut b = Reader::new(body);
            match tag {
                TAG_FORMAT_VERSION => e.format_version = Some(b.uvarint()?),
                TAG_LOG_NUMBER => e.log_number = Some(b.uvarint()?),
                TAG_NEXT_FILE => e.next_file_number = Some(b.uvarint()?),
                TAG_LAST_SEQNO => e.last_seqno = Some(b.uvarint()?),
                TAG_HLC => e.hlc_high_water = Some(b.uvarint()?),
                TAG_HORIZON => e.event_horizon = Some(unzigzag(b.uvarint()?)),
                TAG_ADD => {
                    let lvl = level(&mut b)?;
                    let meta = FileMeta {
                        number: b.uvarint()?,
                        size: b.uvarint()?,
                        entries: b.uvarint()?,
                        system_time_min: SystemTime(b.uvarint()?),
                        system_time_max: SystemTime(b.uvarint()?),
                        smallest: b.len_bytes(KEY_BYTES_MAX)?.to_vec(),
                        largest: b.len_bytes(KEY_BYTES_MAX)?.to_vec(),
                    };
                    if meta.smallest > meta.largest
                        || crate::key::KeyRef::parse(&meta.smallest).is_none()
                        || crate::key::KeyRef::parse(&meta.largest).is_none()
                    {
                        return Err("table key range invalid");
                    }
                    e.added.push((lvl, meta));
                }
                TAG_DELETE => {
                    let lvl = level(&mut b)?;
                    e.deleted.push((lvl, b.uvarint()?));
                }
                TAG_KNOWLEDGE => {
                    let n = b.uvarint()?;
                    if n > crate::limits::VERSION_VECTOR_ENTRIES_MAX as u64 {
                        return Err("knowledge vector too long");
                    }
                    let mut entries = Vec::with_capacity(n as usize);
                    for _ in 0..n {
                        let r = u32::try_from(b.uvarint()?).map_err(|_| "region id out of range")?;
                        entries.push((r, b.uvarint()?));
                    }
                    e.knowledge =
                        Some(crate::types::VersionVector::from_entries(entries).map_err(|_| "bad knowledge vector")?);
                }
                t if t >= TAG_SKIPPABLE_MIN => continue,
                _ => return Err("unknown manifest field"),
            }
            if !b.is_empty() {
                return Err("trailing bytes in manifest field");
            }
        }
        if e.format_version.is_some_and(|v| v > FORMAT_VERSION) {
            return Err("unsupported manifest format version");
        }
        Ok(e)
    }
}

/// The file name of manifest `n`.
pub fn manifest_name(n: u64) -> String {
    format!("MANIFEST-{n:06}")
}

/// Parses a manifest file name.
pub fn parse_manifest_name(name: &str) -> Option<u64> {
    name.strip_prefix("MANIFEST-")?.parse().ok()
}

/// Name of the file that names the current manifest.
pub const CURRENT: &str = "CURRENT";

/// Parses the contents of CURRENT.
pub fn parse_current(path: &Path, bytes: &[u8]) -> crate::Result<u64> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.strip_suffix('\n'))
        .and_then(parse_manifest_name)
        .ok_or_else(|| crate::Error::corruption(path, 0, "CURRENT does not name a manifest"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key;
    use crate::types::{EventTime, FeatureId};

    #[test]
    fn round_trip_and_known_bytes() {
        let e = VersionEdit { log_number: Some(3), ..Default::default() };
        assert_eq!(e.encode(), [2, 1, 3]);
        let k1 = key::encode(b"a", FeatureId(1), EventTime(1), SystemTime(1));
        let k2 = key::encode(b"b", FeatureId(1), EventTime(1), SystemTime(1));
        let e = VersionEdit {
            format_version: Some(1),
            log_number: Some(9),
            next_file_number: Some(12),
            last_seqno: Some(77),
            hlc_high_water: Some(1_700_000_000_000_000),
            event_horizon: Some(-5),
            added: vec![(
                1,
                FileMeta {
                    number: 10,
                    size: 4096,
                    entries: 3,
                    system_time_min: SystemTime(1),
                    system_time_max: SystemTime(2),
                    smallest: k1,
                    largest: k2,
                },
            )],
            deleted: vec![(0, 4), (0, 5)],
            knowledge: Some(crate::types::VersionVector::from_entries(vec![(1, 900), (2, 950)]).expect("vector")),
        };
        let enc = e.encode();
        assert_eq!(VersionEdit::decode(&enc).as_ref(), Ok(&e));
        // Truncation is caught by the record checksum; the decoder itself must never panic and
        // never return the whole edit from part of it.
        for cut in 1..enc.len() {
            assert_ne!(VersionEdit::decode(&enc[..cut]).as_ref(), Ok(&e), "cut {cut}");
        }
        // A skippable unknown field is ignored; an unknown required one is not.
        let mut with_extra = enc.clone();
        with_extra.extend_from_slice(&[70, 1, 0]);
        assert!(VersionEdit::decode(&with_extra).is_ok());
        let mut bad = enc;
        bad.extend_from_slice(&[20, 1, 0]);
        assert!(VersionEdit::decode(&bad).is_err());
    }
}
