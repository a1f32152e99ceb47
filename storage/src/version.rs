//! Versions: immutable, reference-counted snapshots of which tables make up each level.
//!
//! Invariants:
//! - L0 tables may overlap; they are ordered newest first (by file number, descending). A newer
//!   L0 table wins over an older one for an equal key.
//! - In L1 and below, tables are sorted by smallest key and do not overlap.
//! - For an equal key, a higher level (smaller number) wins over a lower one; a key is never in
//!   a lower level with newer contents than a higher level holds.
//! - A table file is deleted only when it is no longer in the current version *and* no reader
//!   holds a version that contains it: [`TableHandle`] deletes the file on drop once marked
//!   obsolete.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::fs::Fs;
use crate::limits::LEVELS;
use crate::manifest::{FileMeta, VersionEdit};
use crate::sstable::Table;

/// An open table in a version.
#[derive(Debug)]
pub struct TableHandle {
    /// The manifest's metadata.
    pub meta: FileMeta,
    /// The open table.
    pub table: Arc<Table>,
    obsolete: AtomicBool,
    fs: Arc<dyn Fs>,
    path: PathBuf,
}

impl TableHandle {
    /// Wraps an open table.
    pub fn new(meta: FileMeta, table: Arc<Table>, fs: Arc<dyn Fs>) -> Arc<Self> {
        let path = table.path().to_path_buf();
        Arc::new(TableHandle { meta, table, obsolete: AtomicBool::new(false), fs, path })
    }

    /// Marks the file for deletion once the last reference goes.
    pub fn mark_obsolete(&self) {
        self.obsolete.store(true, Ordering::Release);
    }
}

impl Drop for TableHandle {
    fn drop(&mut self) {
        if self.obsolete.load(Ordering::Acquire) {
            if let Err(e) = self.fs.remove(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "could not delete obsolete table; it is removed at next open");
            }
        }
    }
}

/// One version of the file set.
#[derive(Debug, Clone, Default)]
pub struct Version {
    /// Tables per level (see the module invariants for their order).
    pub levels: [Vec<Arc<TableHandle>>; LEVELS],
}

impl Version {
    /// Applies an edit, with `opened` holding the tables the edit adds.
    pub fn apply(&self, edit: &VersionEdit, opened: &[Arc<TableHandle>]) -> Version {
        let mut v = self.clone();
        for &(level, number) in &edit.deleted {
            v.levels[level].retain(|t| t.meta.number != number);
        }
        for (level, meta) in &edit.added {
            if let Some(t) = opened.iter().find(|t| t.meta.number == meta.number) {
                v.levels[*level].push(t.clone());
            }
        }
        v.levels[0].sort_by_key(|t| std::cmp::Reverse(t.meta.number));
        for l in &mut v.levels[1..] {
            l.sort_by(|a, b| a.meta.smallest.cmp(&b.meta.smallest));
        }
        v
    }

    /// Checks the level invariants; returns a description of the first violation.
    pub fn check(&self) -> Result<(), String> {
        for (n, level) in self.levels.iter().enumerate().skip(1) {
            for w in level.windows(2) {
                if w[0].meta.largest >= w[1].meta.smallest {
                    return Err(format!("L{n} tables {} and {} overlap", w[0].meta.number, w[1].meta.number));
                }
            }
        }
        Ok(())
    }

    /// Total bytes in a level.
    pub fn level_bytes(&self, level: usize) -> u64 {
        self.levels[level].iter().map(|t| t.meta.size).sum()
    }

    /// Tables of `level` whose key range intersects `[lo, hi]`.
    pub fn overlapping(&self, level: usize, lo: &[u8], hi: &[u8]) -> Vec<Arc<TableHandle>> {
        self.levels[level]
            .iter()
            .filter(|t| t.meta.largest.as_slice() >= lo && t.meta.smallest.as_slice() <= hi)
            .cloned()
            .collect()
    }

    /// Every table, all levels.
    pub fn all_tables(&self) -> impl Iterator<Item = &Arc<TableHandle>> {
        self.levels.iter().flatten()
    }
}
