//! Entry points for the fuzz targets in `storage/fuzz/`. Each takes arbitrary bytes, runs one
//! decoder over them and checks what it returns; none may panic. The checked-in corpora replay
//! through these same functions as ordinary tests (`tests/fuzz_corpus.rs`).

use std::path::Path;
use std::sync::Arc;

use crate::fs::{Fs, MemFs};
use crate::sstable::block::{Block, BlockIter, ScanIter};
use crate::sstable::Table;
use crate::sstable::TableIter;
use crate::{batch, cell, key, manifest, record};

/// Data/index block decoder: parse, then walk and seek every key; a scan of the same bytes
/// must hand out the same entries, or fail with the parse's error.
pub fn block(data: &[u8]) {
    let scanned = ScanIter::new(data.to_vec(), None).and_then(|mut it| {
        let mut out = Vec::new();
        it.visit(&mut |k, v, at| {
            out.push((k.to_vec(), v.to_vec(), at.is_some_and(|a| a.shares_entity)));
            true
        })?;
        Ok(out)
    });
    match Block::parse(data.to_vec()) {
        Ok(b) => {
            let all: Vec<_> =
                (0..b.len()).map(|i| (b.key(i).to_vec(), b.value(i).to_vec(), b.entry_at(i).shares_entity)).collect();
            assert_eq!(scanned.as_ref(), Ok(&all), "a scan must read what the parse did");
        }
        Err(e) => assert_eq!(scanned.err(), Some(e), "a scan must fail where the parse did"),
    }
    if let Ok(b) = Block::parse(data.to_vec()) {
        let b = Arc::new(b);
        let mut it = BlockIter::new(b.clone());
        let mut prev: Option<Vec<u8>> = None;
        while it.valid() {
            let k = it.key().to_vec();
            assert!(prev.as_ref().is_none_or(|p| *p < k), "parsed block keys must increase");
            assert!(key::KeyRef::parse(&k).is_some(), "parsed block keys must be valid");
            let _ = cell::decode_stored(it.value(), key::system_time_of(&k).0);
            let mut s = BlockIter::new(b.clone());
            s.seek(&k);
            assert_eq!(s.key(), k.as_slice(), "seek must find an existing key");
            prev = Some(k);
            it.next();
        }
    }
}

/// Whole-table decoder: open (footer, index, filter), verify, iterate, point lookups.
pub fn table(data: &[u8]) {
    let fs = MemFs::new();
    let dir = Path::new("/f");
    let path = dir.join(crate::sstable::table_name(1));
    let Ok(f) = fs.create(&path) else { return };
    if f.append(data).is_err() {
        return;
    }
    let Ok(t) = Table::from_file(f, path, 1, None, None) else { return };
    let _ = t.verify();
    // A scanning cursor reads what a parsing one does, wherever the parsing one succeeds.
    let (parsed, parsed_ok) = walk(&mut t.iter(), 100_000);
    let (scanned, scanned_ok) = walk(&mut t.iter_filling(false), 100_000);
    // (A scan hands out a bad block's entries up to its first bad one; a parse none of them.)
    assert!(scanned.starts_with(&parsed), "a scan must read what the parse did");
    if scanned.len() < 100_000 {
        assert_eq!(scanned_ok, parsed_ok, "a scan must fail where the parse did");
    }
    if parsed_ok {
        assert_eq!(scanned.len(), parsed.len());
    }
    let mut it = t.iter();
    if it.seek_to_first().is_ok() {
        let mut n = 0;
        while it.valid() && n < 100_000 {
            let k = it.key().to_vec();
            if let Some(kr) = key::KeyRef::parse(&k) {
                let probe = key::Probe {
                    prefix: kr.prefix(),
                    seek: &k,
                    event_time_min: crate::EventTime(i64::MIN),
                    known_at: crate::SystemTime::MAX,
                };
                let _ = t.get_best(&probe, None);
            }
            if it.step().is_err() {
                break;
            }
            n += 1;
        }
    }
}

/// A table's entries: keys and values.
pub(crate) type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// The first `n` entries of `it` (or fewer, up to its end or an error), and whether the walk
/// ended without an error.
pub(crate) fn walk(it: &mut TableIter, n: usize) -> (Entries, bool) {
    let mut out = Vec::new();
    if it.seek_to_first().is_err() {
        return (out, false);
    }
    while it.valid() && out.len() < n {
        out.push((it.key().to_vec(), it.value().to_vec()));
        if it.step().is_err() {
            return (out, false);
        }
    }
    (out, true)
}

/// WAL segment decoder: records (tail may be torn), then each batch and its cells.
pub fn wal(data: &[u8]) {
    for torn in [true, false] {
        if let Ok(recs) = record::read_all(Path::new("w"), 1, data, torn) {
            assert!(recs.valid_len as usize <= data.len());
            for (_, payload) in recs.records {
                if let Ok(b) = batch::decode(payload) {
                    for op in b.ops {
                        assert!(cell::decode(op.cell).is_ok(), "decoded batches hold valid cells");
                        let k = key::encode(op.entity, op.feature, op.event_time, b.system_time);
                        assert!(key::KeyRef::parse(&k).is_some());
                    }
                }
            }
        }
    }
}

/// Manifest decoder: records, then version edits; a decoded edit must re-encode to itself.
pub fn manifest(data: &[u8]) {
    let check = |payload: &[u8]| {
        if let Ok(e) = manifest::VersionEdit::decode(payload) {
            let again = manifest::VersionEdit::decode(&e.encode());
            assert_eq!(again.as_ref(), Ok(&e), "edits must round-trip");
        }
    };
    check(data);
    if let Ok(recs) = record::read_all(Path::new("m"), 1, data, true) {
        for (_, p) in recs.records {
            check(p);
        }
    }
}
