//! Merging iteration over memtables and tables.
//!
//! Sources are given newest first. The merged stream is in key order; for a key present in
//! several sources only the newest source's entry appears.

use std::sync::Arc;

use crate::memtable::Memtable;
use crate::sstable::TableIter;
use crate::Result;

/// A cursor over a memtable. Each step is a skip-list search from the last key, so the cursor
/// owns no borrow of the memtable.
#[derive(Debug)]
pub struct MemCursor {
    mem: Arc<Memtable>,
    cur: Option<(Vec<u8>, Vec<u8>)>,
}

impl MemCursor {
    /// A cursor, not positioned.
    pub fn new(mem: Arc<Memtable>) -> Self {
        MemCursor { mem, cur: None }
    }
}

/// One input of a merge.
#[derive(Debug)]
pub enum Source {
    /// A memtable.
    Mem(MemCursor),
    /// A table.
    Table(TableIter),
}

impl Source {
    fn seek(&mut self, target: &[u8]) -> Result<()> {
        match self {
            Source::Mem(m) => {
                m.cur = m.mem.next_after(target, None);
                Ok(())
            }
            Source::Table(t) => t.seek(target),
        }
    }
    fn key(&self) -> Option<&[u8]> {
        match self {
            Source::Mem(m) => m.cur.as_ref().map(|(k, _)| k.as_slice()),
            Source::Table(t) => t.valid().then(|| t.key()),
        }
    }
    fn value(&self) -> &[u8] {
        match self {
            Source::Mem(m) => m.cur.as_ref().map_or(&[], |(_, v)| v.as_slice()),
            Source::Table(t) => t.value(),
        }
    }
    fn next(&mut self) -> Result<()> {
        match self {
            Source::Mem(m) => {
                let next = m.cur.as_ref().and_then(|(k, _)| m.mem.next_after(k, Some(k)));
                m.cur = next;
                Ok(())
            }
            Source::Table(t) => t.step(),
        }
    }
}

/// The merge of several sources.
#[derive(Debug)]
pub struct MergingIter {
    sources: Vec<Source>,
    current: Option<usize>,
}

impl MergingIter {
    /// A merge of `sources`, newest first. Call [`MergingIter::seek`] before reading.
    pub fn new(sources: Vec<Source>) -> Self {
        MergingIter { sources, current: None }
    }

    fn pick(&mut self) {
        let mut best: Option<(usize, &[u8])> = None;
        for (i, s) in self.sources.iter().enumerate() {
            if let Some(k) = s.key() {
                if best.is_none_or(|(_, bk)| k < bk) {
                    best = Some((i, k));
                }
            }
        }
        self.current = best.map(|(i, _)| i);
    }

    /// Moves every source to the first key >= `target`.
    pub fn seek(&mut self, target: &[u8]) -> Result<()> {
        for s in &mut self.sources {
            s.seek(target)?;
        }
        self.pick();
        Ok(())
    }

    /// True while positioned at an entry.
    pub fn valid(&self) -> bool {
        self.current.is_some()
    }

    /// Current key.
    pub fn key(&self) -> &[u8] {
        self.current.and_then(|i| self.sources[i].key()).unwrap_or(&[])
    }

    /// Current value.
    pub fn value(&self) -> &[u8] {
        self.current.map_or(&[], |i| self.sources[i].value())
    }

    /// Advances past the current key in every source that has it.
    pub fn step(&mut self) -> Result<()> {
        let Some(i) = self.current else { return Ok(()) };
        let k = self.key().to_vec();
        for (j, s) in self.sources.iter_mut().enumerate() {
            if j == i || s.key() == Some(k.as_slice()) {
                s.next()?;
            }
        }
        self.pick();
        Ok(())
    }
}
