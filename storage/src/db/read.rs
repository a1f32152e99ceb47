//! The read path: as-of point reads and time-travel scans.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::{Inner, ReadView};
use crate::asof;
use crate::cell;
use crate::hot::NewState;
use crate::iter::{MergingIter, Source};
use crate::key::{self, KeyRef};
use crate::sstable::block::EntryAt;
use crate::sstable::{Prefetched, Table};
use crate::types::{AsOf, CellVersion, EntityKey, EventTime, FeatureId, SystemTime, Value};
use crate::{Error, Result};

type Found = Option<(Vec<u8>, Vec<u8>)>;

/// What a batch read under a deadline found ([`crate::Db::multi_version_at_within`]).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRead {
    /// Row major, `versions[e * features + f]`: the winning version of each pair (tombstones
    /// included); `None` for pairs not read.
    pub versions: Vec<Option<CellVersion>>,
    /// Empty when every pair was read; otherwise `unread[i]` is true for each pair left unread
    /// because the deadline was near.
    pub unread: Vec<bool>,
    /// The system time the read saw everything through (its effective `known_at`): a
    /// [`crate::Snapshot`] taken afterwards and read at this `known_at` sees what it saw.
    pub known_at: SystemTime,
}

/// The pairs of one entity a batch lookup must read from the view: its features missed by the
/// hot tier, distinct and ascending, and where each answer goes.
struct EntityMisses {
    features: Vec<FeatureId>,
    /// (column in the request, index in `features`).
    slots: Vec<(usize, usize)>,
}

impl EntityMisses {
    /// From one entity's row of hot-tier answers (`None`: missed).
    fn new(features: &[FeatureId], row: &[Option<Option<CellVersion>>]) -> Self {
        let mut missed: Vec<(FeatureId, usize)> =
            features.iter().zip(row).enumerate().filter(|(_, (_, a))| a.is_none()).map(|(j, (&f, _))| (f, j)).collect();
        missed.sort_unstable();
        let mut out = EntityMisses { features: Vec::new(), slots: Vec::with_capacity(missed.len()) };
        for (f, j) in missed {
            if out.features.last() != Some(&f) {
                out.features.push(f);
            }
            out.slots.push((j, out.features.len() - 1));
        }
        out
    }
}

/// The probe keys of one entity's pairs for one as-of read, in one buffer.
struct EntityProbes {
    buf: Vec<u8>,
    /// Per pair: (start, end of prefix, end of seek key) in `buf`.
    spans: Vec<(usize, usize, usize)>,
    event_time_min: EventTime,
    known_at: SystemTime,
}

impl EntityProbes {
    /// The probes of `q` (capped at `known_at`) for `features` of `entity`.
    fn new(entity: &[u8], features: &[FeatureId], q: AsOf, known_at: SystemTime) -> Self {
        let mut buf = Vec::with_capacity(features.len() * (entity.len() + 2 + 4 + key::TIME_SUFFIX_BYTES));
        let mut spans = Vec::with_capacity(features.len());
        for &f in features {
            let a = buf.len();
            key::push_prefix(&mut buf, entity, f);
            let p = buf.len();
            key::push_times(&mut buf, q.as_of, SystemTime::MAX);
            spans.push((a, p, buf.len()));
        }
        EntityProbes { buf, spans, event_time_min: q.event_time_min(), known_at }
    }

    fn probes(&self) -> Vec<key::Probe<'_>> {
        self.spans
            .iter()
            .map(|&(a, p, e)| key::Probe {
                prefix: &self.buf[a..p],
                seek: &self.buf[a..e],
                event_time_min: self.event_time_min,
                known_at: self.known_at,
            })
            .collect()
    }
}

/// Keeps the better of two candidates of one pair ([`asof::newer_key`]; on a tie the earlier,
/// newer source is kept).
fn consider(best: &mut Found, cand: Found) {
    if let Some(c) = cand {
        if asof::newer_key(&c.0, best.as_ref().map(|b| b.0.as_slice())) {
            *best = Some(c);
        }
    }
}

fn to_version(path: &std::path::Path, k: &[u8], v: &[u8]) -> Result<CellVersion> {
    let (value, version_vector) = cell::decode_stored(v, key::system_time_of(k).0)
        .map_err(|w| Error::corruption(path, 0, format!("cell value: {w}")))?;
    Ok(CellVersion { event_time: key::event_time_of(k), system_time: key::system_time_of(k), value, version_vector })
}

impl Inner {
    /// The read view and the effective `known_at` (capped at the visible system time). The
    /// visible stamp is read before the view, so everything it covers is in the view.
    pub(super) fn read_view(&self, known_at: SystemTime) -> (Arc<ReadView>, SystemTime) {
        let visible = SystemTime(self.visible.load(Ordering::Acquire));
        let view = self.view.read().clone();
        (view, known_at.min(visible))
    }

    pub(super) fn get(
        &self,
        view: &ReadView,
        entity: &[u8],
        feature: FeatureId,
        q: AsOf,
        known_at: SystemTime,
    ) -> Result<Option<CellVersion>> {
        crate::types::check_entity_key(entity)?;
        if let Some(hot) = &self.hot {
            if let Some(v) = hot.lookup(entity, feature, q.as_of, known_at) {
                return Ok(asof::in_window(v, &q));
            }
        }
        self.get_in_view(view, &key::prefix(entity, feature), q, known_at, None)
    }

    /// The batch read of the online path: the winning version (tombstones included) of every
    /// `entity x feature` pair, row major, from one view, in three passes:
    ///
    /// 1. the hot tier answers the pairs it covers;
    /// 2. with io_uring, the data blocks the other pairs' reads will start in (every table that
    ///    may hold the pair: key range and bloom filter) and that are not cached are read in
    ///    one round ([`crate::sstable::SsdTier::prefetch`]);
    /// 3. the other pairs are read from the view, using those blocks.
    ///
    /// When the read is unbounded in system time (`known_at` = MAX), a missed pair's newest
    /// version is read and offered to the hot tier (it is also the answer whenever its event
    /// time is at or before `as_of`, the common online case).
    pub(super) fn multi_get(
        &self,
        entities: &[EntityKey],
        features: &[FeatureId],
        q: AsOf,
        charge: &mut dyn FnMut(usize) -> bool,
        deadline: Option<Instant>,
    ) -> Result<BatchRead> {
        for e in entities {
            crate::types::check_entity_key(e)?;
        }
        let mut charge = |bytes: usize| {
            if charge(bytes) {
                Ok(())
            } else {
                Err(Error::OverBudget("the answer is over the memory budget of its request".into()))
            }
        };
        // A complete tier needs no fills.
        let fill = self.hot.as_ref().filter(|hot| q.known_at == SystemTime::MAX && !hot.is_complete());
        // Tickets first, then the view (see `src/hot.rs`).
        let tickets: Vec<_> = fill.map(|hot| entities.iter().map(|e| hot.ticket(e)).collect()).unwrap_or_default();
        let (view, known_at) = self.read_view(q.known_at);
        let in_window = |v: Option<CellVersion>| asof::in_window(v, &q);
        let newest_q = AsOf { as_of: EventTime(i64::MAX), known_at: SystemTime::MAX, lookback_us: None };

        // Pass 1: the hot tier. `None` marks a pair it does not cover.
        let mut answers: Vec<Option<Option<CellVersion>>> = Vec::with_capacity(entities.len() * features.len());
        for e in entities {
            let held = self.hot.as_ref().map(|hot| hot.entity(e));
            let before = answers.len();
            answers.extend(features.iter().map(|&f| held.as_ref().and_then(|h| h.answer(f, q.as_of, known_at))));
            if let Some(hot) = &self.hot {
                let hits = answers[before..].iter().filter(|a| a.is_some()).count() as u64;
                hot.count(hits, (features.len() as u64).saturating_sub(hits));
            }
            // The hits are charged now, the misses once they are read (pass 3).
            charge(answers[before..].iter().map(answer_bytes).sum())?;
        }

        // The misses of each entity, by feature (distinct, ascending), for one forward pass per
        // table.
        let misses: Vec<EntityMisses> = (0..entities.len())
            .map(|i| EntityMisses::new(features, &answers[i * features.len()..(i + 1) * features.len()]))
            .collect();

        // The probe keys of each entity's misses, built once for passes 2 and 3.
        let first_q = if fill.is_some() { newest_q } else { q };
        let probes: Vec<EntityProbes> =
            entities.iter().zip(&misses).map(|(e, m)| EntityProbes::new(e, &m.features, first_q, known_at)).collect();

        // Past the deadline once a round of block reads (as long as recent ones took) would
        // end after it.
        let late = || {
            deadline.is_some_and(|d| Instant::now() + std::time::Duration::from_micros(self.ssd.round_latency_us()) > d)
        };
        let mut unread: Vec<bool> = Vec::new();
        let mut out_of_time = misses.iter().any(|m| !m.features.is_empty()) && late();

        // Pass 2: one round of block reads for the misses.
        let pre = if self.ssd.batches_reads() && !out_of_time { self.prefetch_entities(&view, &probes) } else { None };

        // Pass 3: the misses, from the view.
        let mut prefix = Vec::new();
        for (i, e) in entities.iter().enumerate() {
            let row = &mut answers[i * features.len()..(i + 1) * features.len()];
            for slot in row.iter_mut() {
                if let Some(hit) = slot.take() {
                    *slot = Some(in_window(hit));
                }
            }
            let m = &misses[i];
            if m.features.is_empty() {
                continue;
            }
            out_of_time = out_of_time || late();
            if out_of_time {
                unread.resize(answers.len(), false);
                for &(j, _) in &m.slots {
                    unread[i * features.len() + j] = true;
                }
                continue;
            }
            let firsts = self.entity_in_view(&view, &probes[i], pre.as_ref())?;
            let mut answers_by_feature = Vec::with_capacity(firsts.len());
            let mut filled = Vec::new();
            for (k, first) in firsts.into_iter().enumerate() {
                let f = m.features[k];
                let got = if fill.is_some() {
                    filled.push((f, first.as_ref().map_or_else(NewState::absent, NewState::of)));
                    match first {
                        Some(n) if n.event_time > q.as_of => {
                            prefix.clear();
                            key::push_prefix(&mut prefix, e, f);
                            self.get_in_view(&view, &prefix, q, known_at, pre.as_ref())?
                        }
                        n => in_window(n),
                    }
                } else {
                    first
                };
                answers_by_feature.push(got);
            }
            for &(j, k) in &m.slots {
                row[j] = Some(answers_by_feature[k].clone());
            }
            charge(m.slots.iter().map(|&(j, _)| value_bytes(&row[j])).sum())?;
            if let (Some(hot), Some(&ticket)) = (fill, tickets.get(i)) {
                hot.fill(e, ticket, filled);
            }
        }
        Ok(BatchRead { versions: answers.into_iter().map(Option::flatten).collect(), unread, known_at })
    }

    /// The newest version visible to each probe of one entity, from the view: the memtables
    /// pair by pair, each table in one forward pass ([`Table::get_best_many`]).
    fn entity_in_view(
        &self,
        view: &ReadView,
        probes: &EntityProbes,
        pre: Option<&Prefetched>,
    ) -> Result<Vec<Option<CellVersion>>> {
        let probes = probes.probes();
        let mut best: Vec<Found> = vec![None; probes.len()];
        for (b, probe) in best.iter_mut().zip(&probes) {
            consider(b, view.mem.get_best(probe));
            for m in &view.imms {
                consider(b, m.get_best(probe));
            }
        }
        for t in self.tables_for(view, &probes) {
            t.table.get_best_many(&probes, pre, |i, k, v| {
                if asof::newer_key(k, best[i].as_ref().map(|b| b.0.as_slice())) {
                    best[i] = Some((k.to_vec(), v.to_vec()));
                }
            })?;
        }
        best.into_iter().map(|b| b.map(|(k, v)| to_version(&self.dir, &k, &v)).transpose()).collect()
    }

    /// The tables that may hold keys of `probes` (one entity's, ascending): the L0 tables and
    /// the tables of each deeper level whose key ranges meet the probes' range.
    fn tables_for<'v>(&self, view: &'v ReadView, probes: &[key::Probe<'_>]) -> Vec<&'v crate::version::TableHandle> {
        let (Some(f), Some(l)) = (probes.first(), probes.last()) else { return Vec::new() };
        let (first, last) = (f.seek, l.prefix);
        let mut out = Vec::new();
        for (level, tables) in view.version.levels.iter().enumerate() {
            let start = if level == 0 { 0 } else { tables.partition_point(|t| t.meta.largest.as_slice() < first) };
            for t in &tables[start..] {
                let starts_after = key::prefix_of(&t.meta.smallest) > last;
                if starts_after && level > 0 {
                    break;
                }
                if !starts_after && first <= t.meta.largest.as_slice() {
                    out.push(t.as_ref());
                }
            }
        }
        out
    }

    /// Reads ahead, in one round, the uncached data blocks the forward passes of
    /// [`Inner::entity_in_view`] will start in, for every entity with misses. `None` if there is
    /// nothing to read.
    fn prefetch_entities(&self, view: &ReadView, entities: &[EntityProbes]) -> Option<Prefetched> {
        if view.version.levels.iter().all(|l| l.is_empty()) {
            return None;
        }
        let mut wanted = Vec::new();
        for probes in entities {
            let probes = probes.probes();
            if probes.is_empty() {
                continue;
            }
            for t in self.tables_for(view, &probes) {
                for b in t.table.blocks_for_many(&probes) {
                    wanted.push((t.table.clone(), b));
                }
            }
        }
        if wanted.is_empty() {
            return None;
        }
        let refs: Vec<(&Table, usize)> = wanted.iter().map(|(t, b)| (t.as_ref(), *b)).collect();
        Some(self.ssd.prefetch(&refs))
    }

    /// The current version of the cell `(entity, feature, event_time)` in `view`: its newest
    /// system time, tombstones included. Compare-and-swap and replicated applies judge against it.
    pub(super) fn cell_in_view(
        &self,
        view: &ReadView,
        entity: &[u8],
        feature: FeatureId,
        event_time: EventTime,
    ) -> Result<Option<CellVersion>> {
        let exact = AsOf { as_of: event_time, known_at: SystemTime::MAX, lookback_us: Some(0) };
        self.get_in_view(view, &key::prefix(entity, feature), exact, SystemTime::MAX, None)
    }

    /// `get` from the view alone, for the pair `prefix`.
    pub(super) fn get_in_view(
        &self,
        view: &ReadView,
        prefix: &[u8],
        q: AsOf,
        known_at: SystemTime,
        pre: Option<&Prefetched>,
    ) -> Result<Option<CellVersion>> {
        let mut seek = Vec::with_capacity(prefix.len() + key::TIME_SUFFIX_BYTES);
        seek.extend_from_slice(prefix);
        key::push_times(&mut seek, q.as_of, SystemTime::MAX);
        let probe = key::Probe { prefix, seek: &seek, event_time_min: q.event_time_min(), known_at };
        let mut best: Found = None;
        consider(&mut best, view.mem.get_best(&probe));
        for m in &view.imms {
            consider(&mut best, m.get_best(&probe));
        }
        let in_range = |t: &crate::version::TableHandle| {
            key::prefix_of(&t.meta.smallest) <= prefix && prefix <= key::prefix_of(&t.meta.largest)
        };
        for t in &view.version.levels[0] {
            if in_range(t) {
                consider(&mut best, t.table.get_best(&probe, pre)?);
            }
        }
        for level in &view.version.levels[1..] {
            let start = level.partition_point(|t| t.meta.largest.as_slice() < seek.as_slice());
            for t in &level[start..] {
                if key::prefix_of(&t.meta.smallest) > prefix {
                    break;
                }
                let found = t.table.get_best(&probe, pre)?;
                if found.is_some() {
                    consider(&mut best, found);
                    break;
                }
            }
        }
        match best {
            None => Ok(None),
            Some((k, v)) => to_version(&self.dir, &k, &v).map(Some),
        }
    }

    pub(super) fn scan(&self, range: ScanRange) -> Result<ScanIter> {
        range.check()?;
        let (view, known_at) = self.read_view(range.system_time_max);
        let mut merge = MergingIter::new(Source::of_view(&view));
        merge.seek(&key::entity_prefix(&range.entity_start))?;
        let end = range.entity_end.as_deref().map(key::entity_prefix);
        Ok(ScanIter { merge, range, known_at, end, dir: self.dir.clone(), _view: view, done: false })
    }
}

/// What a time-travel scan covers. All bounds are inclusive except `entity_end`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanRange {
    /// First entity key.
    pub entity_start: Vec<u8>,
    /// Entity key the scan stops before; `None` scans to the end.
    pub entity_end: Option<Vec<u8>>,
    /// Features to include (inclusive range); `None` for all.
    pub features: Option<(FeatureId, FeatureId)>,
    /// Oldest event time.
    pub event_time_min: EventTime,
    /// Newest event time.
    pub event_time_max: EventTime,
    /// Oldest system time.
    pub system_time_min: SystemTime,
    /// Newest system time.
    pub system_time_max: SystemTime,
}

impl ScanRange {
    /// All versions of one entity.
    pub fn entity(entity: &[u8]) -> Self {
        let mut end = entity.to_vec();
        end.push(0);
        ScanRange {
            entity_start: entity.to_vec(),
            entity_end: Some(end),
            features: None,
            event_time_min: EventTime(i64::MIN),
            event_time_max: EventTime(i64::MAX),
            system_time_min: SystemTime(0),
            system_time_max: SystemTime::MAX,
        }
    }

    /// Everything.
    pub fn all() -> Self {
        ScanRange { entity_start: Vec::new(), entity_end: None, ..Self::entity(b"") }
    }

    fn check(&self) -> Result<()> {
        if self.event_time_min > self.event_time_max || self.system_time_min > self.system_time_max {
            return Err(Error::InvalidArgument("scan time range is empty (min > max)".into()));
        }
        if self.features.is_some_and(|(a, b)| a > b) {
            return Err(Error::InvalidArgument("scan feature range is empty (first > last)".into()));
        }
        Ok(())
    }
}

/// One version returned by a scan.
#[derive(Debug, Clone, PartialEq)]
pub struct ScanItem {
    /// Entity key.
    pub entity: Vec<u8>,
    /// Feature.
    pub feature: FeatureId,
    /// The version.
    pub version: CellVersion,
}

/// A streaming scan; holds its read view (and so the files it reads) until dropped.
#[derive(Debug)]
pub struct ScanIter {
    merge: MergingIter,
    range: ScanRange,
    known_at: SystemTime,
    end: Option<Vec<u8>>,
    dir: std::path::PathBuf,
    _view: Arc<ReadView>,
    done: bool,
}

impl ScanIter {
    fn advance(&mut self) -> Result<Option<ScanItem>> {
        while self.merge.valid() {
            let k = self.merge.key();
            let Some(kr) = KeyRef::parse(k) else {
                return Err(Error::corruption(&self.dir, 0, "malformed key in scan"));
            };
            if self.end.as_deref().is_some_and(|end| kr.entity_prefix() >= end) {
                return Ok(None);
            }
            let f = kr.feature();
            if let Some((lo, hi)) = self.range.features {
                if f < lo {
                    let target = key::prefix(&kr.entity(), lo);
                    self.merge.seek(&target)?;
                    continue;
                }
                if f > hi {
                    let mut target = kr.entity_prefix().to_vec();
                    target.extend_from_slice(&[0xff; 21]);
                    self.merge.seek(&target)?;
                    continue;
                }
            }
            let e = kr.event_time();
            if e > self.range.event_time_max {
                let mut target = kr.prefix().to_vec();
                key::push_times(&mut target, self.range.event_time_max, SystemTime::MAX);
                self.merge.seek(&target)?;
                continue;
            }
            if e < self.range.event_time_min {
                let mut target = kr.prefix().to_vec();
                target.extend_from_slice(&[0xff; 17]);
                self.merge.seek(&target)?;
                continue;
            }
            let s = kr.system_time();
            if s < self.range.system_time_min || s > self.known_at {
                self.merge.step()?;
                continue;
            }
            let item =
                ScanItem { entity: kr.entity(), feature: f, version: to_version(&self.dir, k, self.merge.value())? };
            self.merge.step()?;
            return Ok(Some(item));
        }
        Ok(None)
    }
}

impl Iterator for ScanIter {
    type Item = Result<ScanItem>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.advance() {
            Ok(Some(i)) => Some(Ok(i)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// One version as a [`PairCursor`] hands it out: times and the encoded cell (see
/// [`crate::cell`]; decode it with [`crate::cell::decode_stored`] and its system time, or take
/// its value with [`crate::cell::value_part`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawVersion<'a> {
    /// Event time.
    pub event_time: EventTime,
    /// System time.
    pub system_time: SystemTime,
    /// The encoded cell.
    pub cell: &'a [u8],
}

/// A cursor over one read view for sort-merge reads (the point-in-time join): it visits
/// entities in ascending key order and hands out every version of a range of their features
/// in key order (feature, then event time descending, then system time descending).
///
/// Each source of the view (memtables, L0 tables, lower levels) keeps its own cursor for the
/// whole pass: moving to the next entity is a forward seek, skipped when the source is already
/// past it. An entity's versions are gathered source by source, with no comparison between
/// sources per version; only when more than one source holds versions of the entity are they
/// sorted into key order, keeping the newest source's version of equal keys (as the merging
/// iterator does). A version from a table keeps its cell in its block (the cursor holds the
/// entity's blocks until the next entity); only a memtable's cells are copied. It reads around
/// the block cache (using blocks already there, adding none): a pass reads each block once.
#[derive(Debug)]
pub struct PairCursor {
    sources: Vec<Source>,
    /// Whether each source has been positioned (an unpositioned one has no key either).
    positioned: Vec<bool>,
    known_at: SystemTime,
    found: Vec<Gathered>,
    cells: Vec<u8>,
    /// The table blocks the current entity's versions lie in (held so their cells need no
    /// copy; dropped at the next entity).
    blocks: Vec<Arc<Vec<u8>>>,
    _view: Arc<ReadView>,
}

/// One version a [`PairCursor`] gathered: its key's times, its feature, and (private) its
/// source and where its cell lies.
#[derive(Debug, Clone)]
pub struct Gathered {
    /// The feature.
    pub feature: FeatureId,
    /// Event time.
    pub event_time: EventTime,
    /// System time.
    pub system_time: SystemTime,
    source: usize,
    cell: CellAt,
}

/// Where a gathered version's cell lies: copied into the cursor's buffer (from a memtable), or
/// in a table block's bytes the cursor holds for the entity (index in its list, range in them).
#[derive(Debug, Clone, Copy)]
enum CellAt {
    Copied(usize, usize),
    Block(u32, u32, u32),
}

impl Gathered {
    /// Key order, then source order (the newest source first).
    fn order(&self, o: &Gathered) -> std::cmp::Ordering {
        self.feature
            .cmp(&o.feature)
            .then(o.event_time.cmp(&self.event_time))
            .then(o.system_time.cmp(&self.system_time))
            .then(self.source.cmp(&o.source))
    }

    fn same_key(&self, o: &Gathered) -> bool {
        (self.feature, self.event_time, self.system_time) == (o.feature, o.event_time, o.system_time)
    }
}

/// One entity's versions as [`PairCursor::entity`] gathered them, in key order: each
/// feature's versions are one run, event time descending, then system time descending.
#[derive(Debug, Clone, Copy)]
pub struct EntityVersions<'a> {
    found: &'a [Gathered],
    cells: &'a [u8],
    blocks: &'a [Arc<Vec<u8>>],
}

impl<'a> EntityVersions<'a> {
    /// The versions, in key order.
    pub fn versions(&self) -> &'a [Gathered] {
        self.found
    }

    /// The encoded cell of `v` (one of [`EntityVersions::versions`]).
    pub fn cell(&self, v: &Gathered) -> &'a [u8] {
        match v.cell {
            CellAt::Copied(a, b) => &self.cells[a..b],
            CellAt::Block(block, start, end) => &self.blocks[block as usize][start as usize..end as usize],
        }
    }

    /// Each feature's run of versions: `(feature, range in versions())`, features ascending.
    pub fn runs(&self) -> impl Iterator<Item = (FeatureId, std::ops::Range<usize>)> + 'a {
        let found = self.found;
        let mut at = 0;
        std::iter::from_fn(move || {
            let f = found.get(at)?.feature;
            let end = at + found[at..].partition_point(|g| g.feature == f);
            let run = at..end;
            at = end;
            Some((f, run))
        })
    }
}

impl PairCursor {
    pub(super) fn new(view: Arc<ReadView>, known_at: SystemTime) -> PairCursor {
        let sources = Source::of_view_filling(&view, false);
        PairCursor {
            positioned: vec![false; sources.len()],
            sources,
            known_at,
            found: Vec::new(),
            cells: Vec::new(),
            blocks: Vec::new(),
            _view: view,
        }
    }

    /// Gathers every version of `entity`'s features `lo..=hi` known at this cursor's
    /// `known_at`, in key order. Entities must come in ascending order.
    pub fn entity(&mut self, entity: &[u8], lo: FeatureId, hi: FeatureId) -> Result<EntityVersions<'_>> {
        crate::types::check_entity_key(entity)?;
        let start = key::prefix(entity, lo);
        let entity_prefix = &start[..start.len() - key::FEATURE_BYTES];
        let (found, cells, blocks, known_at) = (&mut self.found, &mut self.cells, &mut self.blocks, self.known_at);
        found.clear();
        cells.clear();
        blocks.clear();
        let mut holding = 0;
        for (i, s) in self.sources.iter_mut().enumerate() {
            // A source already at or past `start` has nothing before it: no seek. (One that
            // ran out stays out: what a memtable gains later is not in this view's known_at.)
            let behind = match s.key() {
                Some(k) => k < start.as_slice(),
                None => !self.positioned[i],
            };
            if behind {
                s.seek(&start)?;
                self.positioned[i] = true;
            }
            let before = found.len();
            // Whether this visit has taken an entry (each is of this entity). A visit hands
            // out a block's entries one after another from where it starts, and a new block
            // from its first entry (which shares nothing), so an entry that shares its entity
            // part comes right after the entry it shares it with.
            let mut took = false;
            s.visit(|k, v, at| {
                // A key of another entity (or malformed) ends the entity's run. A table
                // entry right after one of this entity that shares its entity part (checked
                // when the block was loaded or the entry decoded) needs no comparison.
                let follows = took && at.is_some_and(|a| a.shares_entity);
                let kr = if follows {
                    KeyRef::known_valid(k)
                } else {
                    match KeyRef::with_entity_prefix(k, entity_prefix) {
                        Some(kr) => kr,
                        None => return false,
                    }
                };
                took = true;
                let feature = kr.feature();
                if feature > hi {
                    return false;
                }
                let system_time = kr.system_time();
                if system_time <= known_at {
                    // A table's cell stays in its block's bytes (its offsets fit in u32: a block
                    // is at most BLOCK_BYTES_MAX); a memtable's is copied.
                    let cell = match at {
                        Some(EntryAt { bytes, value: (start, end), .. }) => {
                            if !blocks.last().is_some_and(|b| Arc::ptr_eq(b, bytes)) {
                                blocks.push(bytes.clone());
                            }
                            CellAt::Block((blocks.len() - 1) as u32, start, end)
                        }
                        None => {
                            let start = cells.len();
                            cells.extend_from_slice(v);
                            CellAt::Copied(start, cells.len())
                        }
                    };
                    found.push(Gathered { feature, event_time: kr.event_time(), system_time, source: i, cell });
                }
                true
            })?;
            holding += usize::from(found.len() > before);
        }
        if holding > 1 {
            found.sort_unstable_by(Gathered::order);
            // Equal keys: the first (newest source) stays.
            found.dedup_by(|later, kept| later.same_key(kept));
        }
        Ok(EntityVersions { found, cells, blocks })
    }

    /// Calls `f` with every version [`PairCursor::entity`] gathers, in key order.
    pub fn entity_versions(
        &mut self,
        entity: &[u8],
        lo: FeatureId,
        hi: FeatureId,
        mut f: impl FnMut(FeatureId, RawVersion<'_>),
    ) -> Result<()> {
        let e = self.entity(entity, lo, hi)?;
        for g in e.versions() {
            f(g.feature, RawVersion { event_time: g.event_time, system_time: g.system_time, cell: e.cell(g) });
        }
        Ok(())
    }
}

/// Memory one answer of a multi-read holds: its slot and its value's heap bytes.
fn answer_bytes(a: &Option<Option<CellVersion>>) -> usize {
    std::mem::size_of::<Option<CellVersion>>() + value_bytes(a)
}

/// The heap bytes of an answer's value.
fn value_bytes(a: &Option<Option<CellVersion>>) -> usize {
    a.as_ref().and_then(|v| v.as_ref()?.value.as_ref()).map_or(0, Value::heap_bytes)
}
