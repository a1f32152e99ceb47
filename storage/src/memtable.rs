//! The in-memory, concurrently readable table of recent writes.
//!
//! A lock-free skip list (`crossbeam-skiplist`) ordered by internal key. The write path inserts
//! (one inserter at a time: the group-commit leader); readers never block. When it reaches its
//! size it is frozen (made immutable) and flushed to an L0 table by the background.

use std::ops::Bound;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crossbeam_skiplist::SkipMap;

use crate::key;

/// A memtable and the WAL segment that holds its writes.
#[derive(Debug)]
pub struct Memtable {
    map: SkipMap<Vec<u8>, Vec<u8>>,
    bytes: AtomicUsize,
    wal_number: u64,
    last_seqno: AtomicU64,
}

const ENTRY_OVERHEAD_BYTES: usize = 64;

impl Memtable {
    /// An empty memtable whose writes go to WAL segment `wal_number`.
    pub fn new(wal_number: u64) -> Self {
        Memtable { map: SkipMap::new(), bytes: AtomicUsize::new(0), wal_number, last_seqno: AtomicU64::new(0) }
    }

    /// The WAL segment of this memtable.
    pub fn wal_number(&self) -> u64 {
        self.wal_number
    }

    /// Inserts an entry (replacing an equal key: the later write of a batch wins).
    pub fn insert(&self, k: Vec<u8>, v: Vec<u8>) {
        debug_assert!(crate::key::KeyRef::parse(&k).is_some(), "the memtable holds internal keys only");
        self.bytes.fetch_add(k.len() + v.len() + ENTRY_OVERHEAD_BYTES, Ordering::Relaxed);
        self.map.insert(k, v);
    }

    /// Records that batches up to `seqno` are in this memtable.
    pub fn set_last_seqno(&self, seqno: u64) {
        self.last_seqno.fetch_max(seqno, Ordering::AcqRel);
    }

    /// The last batch sequence number inserted.
    pub fn last_seqno(&self) -> u64 {
        self.last_seqno.load(Ordering::Acquire)
    }

    /// Approximate memory used.
    pub fn approximate_bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The newest version visible to the as-of read `probe` (see [`key::Probe`]).
    pub fn get_best(&self, probe: &key::Probe<'_>) -> Option<(Vec<u8>, Vec<u8>)> {
        for e in self.map.range::<[u8], _>((Bound::Included(probe.seek), Bound::Unbounded)) {
            match probe.judge(e.key()) {
                crate::asof::Visibility::Stop => return None,
                crate::asof::Visibility::Take => return Some((e.key().clone(), e.value().clone())),
                crate::asof::Visibility::Skip => {}
            }
        }
        None
    }

    /// True if any key starts with `prefix`.
    pub fn has_prefix(&self, prefix: &[u8]) -> bool {
        self.map
            .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
            .next()
            .is_some_and(|e| e.key().starts_with(prefix))
    }

    /// The first entry with key > `after` (or >= `from` when `after` is `None`).
    pub fn next_after(&self, from: &[u8], after: Option<&[u8]>) -> Option<(Vec<u8>, Vec<u8>)> {
        let lower = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Included(from),
        };
        self.map.range::<[u8], _>((lower, Bound::Unbounded)).next().map(|e| (e.key().clone(), e.value().clone()))
    }

    /// Calls `f` on every entry in key order.
    pub fn for_each(&self, mut f: impl FnMut(&[u8], &[u8]) -> crate::Result<()>) -> crate::Result<()> {
        for e in self.map.iter() {
            f(e.key(), e.value())?;
        }
        Ok(())
    }
}
