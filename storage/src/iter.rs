//! Merging iteration over memtables and tables.
//!
//! Sources are given newest first. The merged stream is in key order; for a key present in
//! several sources only the newest source's entry appears.
//!
//! A level below L0 is one source ([`LevelIter`]): its tables are sorted and do not overlap
//! (`version.rs`), so it is read as one concatenated run. A merge over a view therefore has one
//! source per memtable, per L0 table and per non-empty lower level, however many tables those
//! levels hold; each step compares that handful of current keys.

use std::sync::Arc;

use crate::db::ReadView;
use crate::memtable::Memtable;
use crate::sstable::block::EntryAt;
use crate::sstable::TableIter;
use crate::version::TableHandle;
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

/// A cursor over one level below L0: its tables (sorted by smallest key, not overlapping) read
/// as one run. Only the table under the cursor is open.
#[derive(Debug)]
pub struct LevelIter {
    tables: Vec<Arc<TableHandle>>,
    /// Index of the table `cur` reads; `tables.len()` once past the end.
    idx: usize,
    cur: Option<TableIter>,
    /// Whether the blocks read are added to the block cache (see [`crate::sstable::Table::iter_filling`]).
    fill_cache: bool,
}

impl LevelIter {
    /// A cursor over `tables` (sorted, non-overlapping), not positioned, that adds the blocks
    /// it reads to the block cache only if `fill_cache`.
    pub fn filling(tables: Vec<Arc<TableHandle>>, fill_cache: bool) -> Self {
        let idx = tables.len();
        LevelIter { tables, idx, cur: None, fill_cache }
    }

    /// Opens table `idx` at its first entry, moving on past empty tables.
    fn open_from(&mut self, mut idx: usize) -> Result<()> {
        self.cur = None;
        while idx < self.tables.len() {
            let mut it = self.tables[idx].table.iter_filling(self.fill_cache);
            it.seek_to_first()?;
            if it.valid() {
                self.idx = idx;
                self.cur = Some(it);
                return Ok(());
            }
            idx += 1;
        }
        self.idx = self.tables.len();
        Ok(())
    }

    fn seek(&mut self, target: &[u8]) -> Result<()> {
        // The first table whose largest key is >= target; earlier tables hold only smaller keys.
        let idx = self.tables.partition_point(|t| t.meta.largest.as_slice() < target);
        if idx >= self.tables.len() {
            self.idx = idx;
            self.cur = None;
            return Ok(());
        }
        if idx != self.idx || self.cur.is_none() {
            self.idx = idx;
            self.cur = Some(self.tables[idx].table.iter_filling(self.fill_cache));
        }
        if let Some(it) = &mut self.cur {
            it.seek(target)?;
            if !it.valid() {
                return self.open_from(idx + 1);
            }
        }
        Ok(())
    }

    fn valid(&self) -> bool {
        self.cur.as_ref().is_some_and(TableIter::valid)
    }

    /// [`TableIter::visit`] across the level's tables.
    fn visit(&mut self, f: &mut impl FnMut(&[u8], &[u8], Option<EntryAt<'_>>) -> bool) -> Result<bool> {
        while let Some(it) = &mut self.cur {
            if it.visit(f)? {
                return Ok(true);
            }
            self.open_from(self.idx + 1)?;
        }
        Ok(false)
    }

    fn key(&self) -> &[u8] {
        self.cur.as_ref().map_or(&[], TableIter::key)
    }

    fn value(&self) -> &[u8] {
        self.cur.as_ref().map_or(&[], TableIter::value)
    }

    fn next(&mut self) -> Result<()> {
        if let Some(it) = &mut self.cur {
            it.step()?;
            if !it.valid() {
                return self.open_from(self.idx + 1);
            }
        }
        Ok(())
    }
}

/// Merge sources for `tables` given in priority order (newest first): each maximal stretch of
/// consecutive tables that are in key order and do not overlap (a level below L0, or the part
/// of one a compaction takes) becomes one [`LevelIter`]; any other table is its own source.
/// Within a stretch no two tables share a key, so the priority between sources is unchanged.
/// These are a compaction's inputs: the blocks they read are not added to the block cache.
pub fn table_runs(tables: impl IntoIterator<Item = Arc<TableHandle>>) -> Vec<Source> {
    let mut runs: Vec<Vec<Arc<TableHandle>>> = Vec::new();
    for t in tables {
        match runs.last_mut() {
            Some(run) if run.last().is_some_and(|p| p.meta.largest < t.meta.smallest) => run.push(t),
            _ => runs.push(vec![t]),
        }
    }
    runs.into_iter()
        .map(|run| match run.len() {
            1 => Source::Table(run[0].table.iter_filling(false)),
            _ => Source::Level(LevelIter::filling(run, false)),
        })
        .collect()
}

/// One input of a merge.
#[derive(Debug)]
pub enum Source {
    /// A memtable.
    Mem(MemCursor),
    /// A table.
    Table(TableIter),
    /// A level below L0.
    Level(LevelIter),
}

impl Source {
    /// The sources of a merge over `view`, newest first: the active memtable, the immutable
    /// ones, each L0 table, then one [`LevelIter`] per non-empty lower level.
    pub fn of_view(view: &ReadView) -> Vec<Source> {
        Self::of_view_filling(view, true)
    }

    /// [`Source::of_view`], adding the blocks read to the block cache only if `fill_cache`
    /// (a sort-merge pass reads each block once: caching them would evict what point reads
    /// want, for nothing).
    pub fn of_view_filling(view: &ReadView, fill_cache: bool) -> Vec<Source> {
        let mut sources = vec![Source::Mem(MemCursor::new(view.mem.clone()))];
        sources.extend(view.imms.iter().map(|m| Source::Mem(MemCursor::new(m.clone()))));
        let (l0, lower) = view.version.levels.split_at(1);
        sources.extend(l0[0].iter().map(|t| Source::Table(t.table.iter_filling(fill_cache))));
        sources.extend(
            lower.iter().filter(|l| !l.is_empty()).map(|l| Source::Level(LevelIter::filling(l.clone(), fill_cache))),
        );
        sources
    }
}

impl Source {
    pub(crate) fn seek(&mut self, target: &[u8]) -> Result<()> {
        match self {
            Source::Mem(m) => {
                m.cur = m.mem.next_after(target, None);
                Ok(())
            }
            Source::Table(t) => t.seek(target),
            Source::Level(l) => l.seek(target),
        }
    }
    pub(crate) fn key(&self) -> Option<&[u8]> {
        match self {
            Source::Mem(m) => m.cur.as_ref().map(|(k, _)| k.as_slice()),
            Source::Table(t) => t.valid().then(|| t.key()),
            Source::Level(l) => l.valid().then(|| l.key()),
        }
    }
    fn value(&self) -> &[u8] {
        match self {
            Source::Mem(m) => m.cur.as_ref().map_or(&[], |(_, v)| v.as_slice()),
            Source::Table(t) => t.value(),
            Source::Level(l) => l.value(),
        }
    }
    /// Calls `f` with each entry from the current one on, in order, until it returns false
    /// (the source stays at that entry) or the source runs out. An entry of a table comes with
    /// where it lies in its block ([`EntryAt`]); a memtable's without.
    pub(crate) fn visit(&mut self, mut f: impl FnMut(&[u8], &[u8], Option<EntryAt<'_>>) -> bool) -> Result<()> {
        match self {
            Source::Table(t) => t.visit(&mut f).map(drop),
            Source::Level(l) => l.visit(&mut f).map(drop),
            Source::Mem(_) => {
                while let Some(k) = self.key() {
                    if !f(k, self.value(), None) {
                        break;
                    }
                    self.next()?;
                }
                Ok(())
            }
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
            Source::Level(l) => l.next(),
        }
    }
}

/// The merge of several sources.
///
/// Besides the current source it remembers the best of the others (`runner_up`), so a step that
/// leaves the current source still ahead (the common case: a long run from one table) costs one
/// key comparison, not one per source.
#[derive(Debug)]
pub struct MergingIter {
    sources: Vec<Source>,
    current: Option<usize>,
    runner_up: Option<usize>,
}

impl MergingIter {
    /// A merge of `sources`, newest first. Call [`MergingIter::seek`] before reading.
    pub fn new(sources: Vec<Source>) -> Self {
        MergingIter { sources, current: None, runner_up: None }
    }

    /// Finds the smallest key (the newest source on ties) and the best of the rest.
    fn pick(&mut self) {
        let (mut best, mut second): (Option<usize>, Option<usize>) = (None, None);
        for (i, s) in self.sources.iter().enumerate() {
            let Some(k) = s.key() else { continue };
            let key_of = |j: Option<usize>| j.and_then(|j| self.sources[j].key());
            if key_of(best).is_none_or(|b| k < b) {
                second = best;
                best = Some(i);
            } else if key_of(second).is_none_or(|b| k < b) {
                second = Some(i);
            }
        }
        self.current = best;
        self.runner_up = second;
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
        let other = self.runner_up;
        if other.is_some_and(|o| self.sources[o].key() == self.sources[i].key()) {
            // The same key in older sources (rare): each moves past it, compared against the
            // current source's key in place; then the current source moves.
            for j in 0..self.sources.len() {
                if j != i && self.sources[j].key() == self.sources[i].key() {
                    self.sources[j].next()?;
                }
            }
            self.sources[i].next()?;
            self.pick();
            return Ok(());
        }
        self.sources[i].next()?;
        // Still ahead of every other source: stays current, and the runner-up has not moved.
        let ahead = match (self.sources[i].key(), other.and_then(|o| self.sources[o].key())) {
            (Some(k), Some(o)) => k < o,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !ahead {
            self.pick();
        }
        Ok(())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::key;
    use crate::types::{EventTime, FeatureId, SystemTime};

    fn internal_key() -> impl Strategy<Value = Vec<u8>> {
        (prop::sample::select(vec![&b"a"[..], b"ab", b"b"]), 0u32..3, 0i64..4, 0u64..3)
            .prop_map(|(e, f, t, s)| key::encode(e, FeatureId(f), EventTime(t), SystemTime(s)))
    }

    proptest! {
        /// The merge of overlapping memtables is every key once, in order, with the newest
        /// source's value; after any seek it continues from the first key >= the target.
        #[test]
        fn merge_is_newest_value_per_key_in_order(
            sources in prop::collection::vec(prop::collection::btree_map(internal_key(), any::<u8>(), 0..12), 1..5),
            target in internal_key(),
        ) {
            let mut want: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            let mut cursors = Vec::new();
            for (age, keys) in sources.iter().enumerate() {
                let mem = Arc::new(Memtable::new(age as u64));
                for (k, v) in keys {
                    mem.insert(k.clone(), vec![*v, age as u8]);
                    want.entry(k.clone()).or_insert_with(|| vec![*v, age as u8]);
                }
                cursors.push(Source::Mem(MemCursor::new(mem)));
            }
            let mut merge = MergingIter::new(cursors);
            for start in [Vec::new(), target] {
                merge.seek(&start).expect("seek");
                let mut got = Vec::new();
                while merge.valid() {
                    got.push((merge.key().to_vec(), merge.value().to_vec()));
                    merge.step().expect("step");
                }
                let expected: Vec<_> = want.range(start..).map(|(k, v)| (k.clone(), v.clone())).collect();
                prop_assert_eq!(got, expected);
            }
        }
    }
}
