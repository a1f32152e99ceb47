//! The hot tier: the newest version of recently read or written `(entity, feature)` pairs, in
//! memory, bounded by bytes, in front of memtables and tables.
//!
//! # Layout
//!
//! One cache entry per *entity*: a row holding, for each of its cached features, the pair's
//! state (below), sorted by feature. Online requests ask for many features of one entity, so a
//! lookup is one cache probe per entity rather than one per pair, and the key is stored once.
//! A row may hold any subset of the entity's features; a feature missing from the row misses.
//!
//! # What a pair's state means
//!
//! The state of a pair is its *newest* version — greatest event time, then greatest system
//! time — among every version the engine holds or is committing, or `Absent` when the pair has
//! no version at all. That one fact answers every as-of read it covers:
//!
//! - a read `(as_of T, known_at K)` with `newest.event_time <= T` and `newest.system_time <= K`
//!   has it as its winner: every version with event time `<= T` and system time `<= K` orders
//!   at or below it, and it qualifies itself; the read's lookback then applies as usual (older
//!   than `T - L`: absent), and a tombstone means absent;
//! - `Absent` answers every read: absent. (Retention never removes a pair's newest version
//!   except a settled tombstone that was its only entry, after which the pair reads absent
//!   anyway, from any snapshot.)
//!
//! Any other read misses and goes to the engine. So a read served here returns exactly what
//! the engine would, whatever snapshot it reads from: a snapshot older than the state misses on
//! `system_time <= K`.
//!
//! # Complete mode: the online tier
//!
//! An engine opened on an empty directory starts its tier *complete*: every entity that has a
//! version has a row, and every row holds a state for every pair of its entity that has a
//! version. Writes keep it so: in complete mode they create rows and add features (a write into
//! an empty engine knows every version there is). Then a missing row, or a feature missing from
//! a row, answers *absent* — online lookups never touch memtables or tables, whether the
//! entity exists or not.
//!
//! Completeness is kept while the rows fit the budget: no row is evicted while complete (rows
//! are pinned in the cache, whose capacity is set above the budget so shards never fill). The
//! insert that would take the tier past its budget first clears the flag, then lowers the
//! cache's capacity to the budget; only then can rows be evicted, and from then on the tier is
//! the cache described above. A reader looks up the row *before* reading the flag: if the row
//! was evicted before its lookup, the flag was cleared before that, so the reader sees it
//! cleared and misses instead of answering absent. An engine opened on existing data starts in
//! cache mode.
//!
//! # Keeping states newest
//!
//! - **Writes** (the commit path, under the writer lock, in commit order): before a batch is
//!   published, [`HotTier::write_begin`] runs once per entity of the batch with all of its
//!   cells and replaces the states of features already in the row that the new versions are
//!   newer than (a late write of an older event leaves a state alone). States are only
//!   replaced, never created by writes: a write does not know whether the pair holds newer
//!   versions on disk. After publishing, [`HotTier::write_end`].
//! - **Fills** (readers on a miss): a reader takes a [`Ticket`] for the entity *before* it
//!   takes its read view, reads the missing pairs' newest versions from that view, and offers
//!   them with [`HotTier::fill`]. The fill is refused when a write of the entity may be missing
//!   from the view: the ticket saw a write in flight (`pending > 0`), or a write began since
//!   (`gen` moved). Per stripe of entities: `write_begin` bumps `pending` then `gen` and updates
//!   the row under the stripe lock; `fill` checks `gen` and inserts under the same lock; the
//!   ticket reads `gen` then `pending`. A write that began before the ticket is either still
//!   pending (refused) or published before the view (in the view); one that begins after the
//!   ticket either moves `gen` before the fill (refused) or runs after it and replaces what the
//!   fill inserted. Stripes are shared by many entities, which only costs a few refused fills.
//!
//! Rows are immutable once shared: updates build a new row and replace the entry.
//!
//! # Dropped features
//!
//! Feature ids the service has dropped ([`crate::Db::set_dropped_features`]) are never answered
//! here, from then on until the engine closes: compaction removes their versions, which a state
//! could not follow, so their reads miss and go to the engine (which answers what its files
//! still hold).
//!
//! # Admission and eviction
//!
//! An entity's pairs are filled on its *second* miss within a window (a TinyLFU-style
//! doorkeeper: one bit per hash slot, all cleared once an eighth are set), so a one-off scan or
//! a uniformly random sweep over more entities than fit does not churn the tier. Eviction is
//! `quick_cache`'s (S3-FIFO-like, scan resistant), bounded by the rows' approximate bytes. An
//! evicted row simply misses.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, Lifecycle, OptionsBuilder, Weighter};

use crate::types::{CellVersion, EventTime, FeatureId, SystemTime};

/// Bytes a row costs beyond its key and states (cache slot, `Arc`, vector headers).
const ROW_OVERHEAD_BYTES: usize = 256;
/// Typical row size, for sizing the cache's index and the doorkeeper.
const ROW_BYTES_TYPICAL: usize = 1024;
/// Fewest doorkeeper bits (a tiny tier still remembers this many recent misses).
const DOORKEEPER_BITS_MIN: usize = 1 << 12;
/// Doorkeeper bits per typical row; with a reset at 1/8 of the bits set, a first miss is
/// mistaken for a second one at most 1 time in 8 (hash collisions).
const DOORKEEPER_BITS_PER_ROW: usize = 16;
/// `State::len` of a pair with no version.
const ABSENT: u32 = u32::MAX;
/// In complete mode the cache's capacity is this many times the budget, so that no shard of
/// it fills (and evicts) before the rows as a whole reach the budget.
const COMPLETE_CAPACITY_FACTOR: u64 = 4;
/// In complete mode a row heavier than the budget over this ends completeness before it is
/// inserted: the cache refuses (and so drops) a row heavier than about one shard's capacity,
/// `budget x COMPLETE_CAPACITY_FACTOR / CACHE_SHARDS x 0.97`, a 16th of the budget.
const COMPLETE_ROW_FRACTION: u64 = 32;
/// Shards of the cache (each has its own lock and an equal share of the capacity).
const CACHE_SHARDS: usize = 64;

/// A pair's newest state, as offered by readers and writers: `cell` is the encoded cell
/// (see [`crate::cell`]) of its newest version, `None` when the pair has no version.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NewState {
    pub event_time: EventTime,
    pub system_time: SystemTime,
    pub cell: Option<Vec<u8>>,
}

impl NewState {
    /// The state of a pair with no version.
    pub fn absent() -> Self {
        NewState { event_time: EventTime(i64::MIN), system_time: SystemTime(0), cell: None }
    }

    /// The state of a pair whose newest version is `v`.
    pub fn of(v: &CellVersion) -> Self {
        let mut cell = Vec::new();
        crate::cell::encode(v.value.as_ref(), &v.version_vector, &mut cell);
        NewState { event_time: v.event_time, system_time: v.system_time, cell: Some(cell) }
    }

    fn offer(&self) -> Offer<'_> {
        Offer { event_time: self.event_time, system_time: self.system_time, cell: self.cell.as_deref() }
    }
}

/// A state offered to a row, borrowing its encoded cell (`None`: no version).
#[derive(Debug, Clone, Copy)]
struct Offer<'a> {
    event_time: EventTime,
    system_time: SystemTime,
    cell: Option<&'a [u8]>,
}

/// The cached states of one entity's features, sorted by feature, compact (column-wise): a
/// state is its feature (4 bytes), an index into the row's distinct `(event time, system
/// time)` pairs (4 bytes; features written together share one pair), the end of its cell
/// (4 bytes) and the cell in [`crate::cell::compact`] form (11 bytes for a float64 written
/// locally). So about 23 bytes per state, against 48 with times and full cells per state.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Row {
    /// Distinct `(event time, system time)` pairs of the states.
    times: Vec<(EventTime, SystemTime)>,
    features: Vec<FeatureId>,
    /// Per feature: its index in `times`, or [`ABSENT`] for a pair with no version.
    time_of: Vec<u32>,
    /// Per feature: the end of its compact cell in `cells` (it starts at the previous end).
    ends: Vec<u32>,
    cells: Vec<u8>,
}

impl Row {
    fn position(&self, f: FeatureId) -> Option<usize> {
        self.features.binary_search(&f).ok()
    }

    /// The state at `i`: its times and compact cell, or `None` for a pair with no version.
    fn state(&self, i: usize) -> Option<((EventTime, SystemTime), &[u8])> {
        let t = *self.time_of.get(i)?;
        let times = *self.times.get(t as usize)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        Some((times, self.cells.get(start..self.ends[i] as usize).unwrap_or(&[])))
    }

    fn bytes(&self) -> usize {
        use std::mem::size_of;
        self.times.len() * size_of::<(EventTime, SystemTime)>()
            + self.features.len() * (size_of::<FeatureId>() + 2 * size_of::<u32>())
            + self.cells.len()
    }

    /// The answer for feature `f` at `as_of` / `known_at` if the row covers the read: the
    /// winning version (`None`: absent). `complete`: the row holds every pair of its entity
    /// that has a version, so a feature it lacks is absent.
    pub fn answer(
        &self,
        f: FeatureId,
        as_of: EventTime,
        known_at: SystemTime,
        complete: bool,
    ) -> Option<Option<CellVersion>> {
        let Some(i) = self.position(f) else { return complete.then_some(None) };
        let Some(((event_time, system_time), cell)) = self.state(i) else { return Some(None) };
        if !crate::asof::answers((event_time, system_time), as_of, known_at) {
            return None;
        }
        // Cells were encoded by this engine; one that does not decode is not served from here.
        let (value, version_vector) = crate::cell::decode_stored(cell, system_time.0).ok()?;
        Some(Some(CellVersion { event_time, system_time, value, version_vector }))
    }

    /// A copy of the row with `updates` (sorted by feature, each newer than what it replaces
    /// or new to the row) applied; the copy's buffers are exactly as large as they need to be.
    fn with(&self, updates: &[(FeatureId, Offer<'_>)]) -> Row {
        /// Where a state of the merged row comes from.
        enum Src {
            /// The state at this index of `self`.
            Kept(usize),
            /// The update at this index.
            New(usize),
        }
        // The merged feature list first, to size the buffers exactly.
        let mut merged: Vec<(FeatureId, Src)> = Vec::with_capacity(self.features.len() + updates.len());
        let (mut i, mut j) = (0, 0);
        loop {
            match (self.features.get(i), updates.get(j)) {
                (Some(&f), Some((g, _))) if *g <= f => {
                    merged.push((*g, Src::New(j)));
                    i += usize::from(*g == f);
                    j += 1;
                }
                (Some(&f), _) => {
                    merged.push((f, Src::Kept(i)));
                    i += 1;
                }
                (None, Some((g, _))) => {
                    merged.push((*g, Src::New(j)));
                    j += 1;
                }
                (None, None) => break,
            }
        }
        let cells_len: usize = merged
            .iter()
            .map(|(_, src)| match *src {
                Src::Kept(i) => self.state(i).map_or(0, |(_, c)| c.len()),
                Src::New(j) => {
                    let u = &updates[j].1;
                    u.cell.map_or(0, |c| crate::cell::compact_len(c, u.system_time.0))
                }
            })
            .sum();
        let n = merged.len();
        let mut out = Row {
            times: Vec::new(),
            features: Vec::with_capacity(n),
            time_of: Vec::with_capacity(n),
            ends: Vec::with_capacity(n),
            cells: Vec::with_capacity(cells_len),
        };
        for (f, src) in merged {
            let times = match src {
                Src::Kept(i) => self.state(i).map(|(t, c)| {
                    out.cells.extend_from_slice(c);
                    t
                }),
                Src::New(j) => {
                    let u = &updates[j].1;
                    u.cell.map(|c| {
                        crate::cell::compact(c, u.system_time.0, &mut out.cells);
                        (u.event_time, u.system_time)
                    })
                }
            };
            let t = match times {
                None => ABSENT,
                Some(t) => match out.times.iter().position(|x| *x == t) {
                    Some(k) => k as u32,
                    None => {
                        out.times.push(t);
                        (out.times.len() - 1) as u32
                    }
                },
            };
            out.features.push(f);
            out.time_of.push(t);
            out.ends.push(out.cells.len() as u32);
        }
        out.times.shrink_to_fit();
        debug_assert_eq!(out.cells.len(), cells_len, "compact_len must match compact");
        out
    }
}

/// The offers that replace or add to `row`, sorted by feature, one per feature: the newest
/// offer of each feature, kept if the row lacks the feature or holds an older state (an equal
/// one too when `ties_win`: a later write of the same cell in one batch wins in the memtable).
fn newer_than<'a>(
    row: Option<&Row>,
    mut offers: Vec<(FeatureId, Offer<'a>)>,
    ties_win: bool,
) -> Vec<(FeatureId, Offer<'a>)> {
    // Stable sort: among equal features, later offers stay later.
    offers.sort_by_key(|o| o.0);
    let mut out: Vec<(FeatureId, Offer<'a>)> = Vec::with_capacity(offers.len());
    for (f, n) in offers {
        let order = (n.event_time, n.system_time);
        match out.last_mut() {
            Some((g, prev)) if *g == f => {
                if order >= (prev.event_time, prev.system_time) {
                    *prev = n;
                }
            }
            _ => out.push((f, n)),
        }
    }
    out.retain(|(f, n)| {
        let order = (n.event_time, n.system_time);
        match row.and_then(|r| r.position(*f).map(|i| r.state(i).map(|(t, _)| t))) {
            None => true,
            Some(None) => n.cell.is_some(),
            Some(Some(s)) => crate::asof::newer(order, Some(s)) || ties_win && order == s,
        }
    });
    out
}

#[derive(Debug, Clone, Copy)]
struct RowWeighter;

impl Weighter<Vec<u8>, Arc<Row>> for RowWeighter {
    fn weight(&self, key: &Vec<u8>, val: &Arc<Row>) -> u64 {
        row_weight(key, val)
    }
}

/// What the tier counts a row as: its key, its states and [`ROW_OVERHEAD_BYTES`].
fn row_weight(key: &[u8], row: &Row) -> u64 {
    (key.len() + row.bytes() + ROW_OVERHEAD_BYTES) as u64
}

/// The cache's policy: rows are pinned while the tier is complete; evictions are counted.
#[derive(Debug, Clone, Default)]
struct Policy {
    evictions: Arc<AtomicU64>,
    complete: Arc<AtomicBool>,
}

impl Lifecycle<Vec<u8>, Arc<Row>> for Policy {
    type RequestState = ();

    fn is_pinned(&self, _key: &Vec<u8>, _val: &Arc<Row>) -> bool {
        self.complete.load(Ordering::SeqCst)
    }

    fn on_evict(&self, _state: &mut Self::RequestState, _key: Vec<u8>, _val: Arc<Row>) {
        self.evictions.fetch_add(1, Ordering::Relaxed);
    }
}

/// What the tier holds of one entity, for answering several of its pairs.
#[derive(Debug, Clone)]
pub(crate) struct EntityView {
    row: Option<Arc<Row>>,
    complete: bool,
    /// Dropped feature ids (sorted), when there are any.
    dropped: Option<Arc<Vec<u32>>>,
}

impl EntityView {
    /// The answer for feature `f`, if the tier covers the read (see [`Row::answer`]).
    pub fn answer(&self, f: FeatureId, as_of: EventTime, known_at: SystemTime) -> Option<Option<CellVersion>> {
        if self.dropped.as_ref().is_some_and(|d| d.binary_search(&f.0).is_ok()) {
            return None;
        }
        match &self.row {
            Some(row) => row.answer(f, as_of, known_at, self.complete),
            // No row in complete mode: the entity has no version at all.
            None => self.complete.then_some(None),
        }
    }
}

/// What a reader saw of an entity's stripe before taking its view (see the module docs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    hash: u64,
    guard: crate::stripes::Ticket,
}

pub(crate) use crate::stripes::WriteToken;

/// Counters of the hot tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HotStats {
    /// Pair reads answered here.
    pub hits: u64,
    /// Pair reads that went to the engine.
    pub misses: u64,
    /// Pair states inserted by readers.
    pub fills: u64,
    /// Fills refused because a write of the entity could be missing from the reader's view.
    pub fills_refused: u64,
    /// Fills skipped by the doorkeeper (first miss of an entity within its window).
    pub fills_deferred: u64,
    /// Pair states replaced by writes.
    pub write_updates: u64,
    /// Rows evicted by the admission policy.
    pub evictions: u64,
    /// Rows (entities) held.
    pub entries: u64,
    /// Whether the tier is complete (holds every entity's newest states; see `src/hot.rs`).
    pub complete: bool,
    /// Approximate bytes held.
    pub bytes: u64,
}

/// The hot tier of one engine.
#[derive(Debug)]
pub(crate) struct HotTier {
    cache: Cache<Vec<u8>, Arc<Row>, RowWeighter, DefaultHashBuilder, Policy>,
    /// The budget, bytes.
    budget: u64,
    /// Complete mode (see the module docs); shared with the cache's policy.
    complete: Arc<AtomicBool>,
    /// Bytes held, tracked while complete (no evictions happen then).
    held: AtomicU64,
    /// Serialises the inserts of complete mode with the switch out of it.
    grow: Mutex<()>,
    stripes: crate::stripes::Stripes,
    doorkeeper: Box<[AtomicU64]>,
    doorkeeper_set: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    fills: AtomicU64,
    fills_refused: AtomicU64,
    fills_deferred: AtomicU64,
    write_updates: AtomicU64,
    evictions: Arc<AtomicU64>,
    /// Dropped feature ids (sorted; see the module docs), and whether there are any.
    dropped: parking_lot::RwLock<Arc<Vec<u32>>>,
    any_dropped: AtomicBool,
}

use crate::stripes::hash_of;

impl HotTier {
    /// A hot tier of about `bytes`; `None` when `bytes` is 0 (disabled). `complete`: the
    /// engine holds no version yet, so the tier starts complete (see the module docs).
    pub fn new(bytes: usize, complete: bool) -> Option<HotTier> {
        if bytes == 0 {
            return None;
        }
        let evictions = Arc::new(AtomicU64::new(0));
        let rows = (bytes / ROW_BYTES_TYPICAL).max(16);
        let budget = bytes as u64;
        let capacity = if complete { budget.saturating_mul(COMPLETE_CAPACITY_FACTOR) } else { budget };
        let options = match OptionsBuilder::new()
            .estimated_items_capacity(rows)
            .weight_capacity(capacity)
            .shards(CACHE_SHARDS)
            .build()
        {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(bytes, error = ?e, "hot tier disabled: its cache options were refused");
                return None;
            }
        };
        let complete = Arc::new(AtomicBool::new(complete));
        Some(HotTier {
            cache: Cache::with_options(
                options,
                RowWeighter,
                DefaultHashBuilder::default(),
                Policy { evictions: evictions.clone(), complete: complete.clone() },
            ),
            budget,
            complete,
            held: AtomicU64::new(0),
            grow: Mutex::new(()),
            stripes: crate::stripes::Stripes::new(),
            doorkeeper: (0..((rows * DOORKEEPER_BITS_PER_ROW).next_power_of_two().max(DOORKEEPER_BITS_MIN) / 64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            doorkeeper_set: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            fills: AtomicU64::new(0),
            fills_refused: AtomicU64::new(0),
            fills_deferred: AtomicU64::new(0),
            write_updates: AtomicU64::new(0),
            evictions,
            dropped: parking_lot::RwLock::new(Arc::new(Vec::new())),
            any_dropped: AtomicBool::new(false),
        })
    }

    /// What the tier holds of `entity` (one probe for all of its features). The row is looked
    /// up before the flag is read (see the module docs).
    pub fn entity(&self, entity: &[u8]) -> EntityView {
        let row = self.cache.get(entity);
        let dropped = self.any_dropped.load(Ordering::Acquire).then(|| self.dropped.read().clone());
        EntityView { row, complete: self.complete.load(Ordering::SeqCst), dropped }
    }

    /// Stops answering the feature ids `ids` (see the module docs). The set only grows: an id
    /// taken out of the engine's dropped set may have rows whose states compaction has since
    /// outdated, so its reads keep going to the files.
    pub fn set_dropped(&self, ids: &[u32]) {
        let mut d = self.dropped.write();
        let mut all: Vec<u32> = d.iter().chain(ids).copied().collect();
        all.sort_unstable();
        all.dedup();
        let any = !all.is_empty();
        *d = Arc::new(all);
        self.any_dropped.store(any, Ordering::Release);
    }

    /// Whether the tier is complete.
    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::SeqCst)
    }

    /// Ends complete mode: clears the flag, then lets the cache evict down to the budget.
    fn end_complete(&self, why: &str) {
        if self.complete.swap(false, Ordering::SeqCst) {
            self.cache.set_capacity(self.budget);
            tracing::info!(
                budget = self.budget,
                why,
                "hot tier no longer complete: online reads of missing rows go to tables"
            );
        }
    }

    /// Stores `row` as the entity's row, replacing `old`. In complete mode the row replaces
    /// the old one in one step (a reader never sees the entity without a row), unless it would
    /// take the tier past its budget, which ends complete mode first.
    fn store(&self, entity: &[u8], old: Option<&Row>, row: Row) {
        if self.complete.load(Ordering::SeqCst) {
            let _g = self.grow.lock();
            let (new, old) = (row_weight(entity, &row), old.map_or(0, |r| row_weight(entity, r)));
            let held = self.held.load(Ordering::Relaxed);
            let after = held.saturating_add(new).saturating_sub(old);
            if after <= self.budget && new <= self.budget / COMPLETE_ROW_FRACTION {
                self.held.store(after, Ordering::Relaxed);
                self.cache.insert(entity.to_vec(), Arc::new(row));
                return;
            }
            self.end_complete(if after > self.budget { "budget reached" } else { "a row is too large" });
        }
        // Remove first: if the new row is not admitted, no stale one may stay behind.
        if old.is_some() {
            self.cache.remove(entity);
        }
        self.cache.insert(entity.to_vec(), Arc::new(row));
    }

    /// Counts `hits` and `misses` pair reads.
    pub fn count(&self, hits: u64, misses: u64) {
        if hits > 0 {
            self.hits.fetch_add(hits, Ordering::Relaxed);
        }
        if misses > 0 {
            self.misses.fetch_add(misses, Ordering::Relaxed);
        }
    }

    /// The answer for one pair read, if the tier covers it (counted).
    pub fn lookup(
        &self,
        entity: &[u8],
        f: FeatureId,
        as_of: EventTime,
        known_at: SystemTime,
    ) -> Option<Option<CellVersion>> {
        let r = self.entity(entity).answer(f, as_of, known_at);
        self.count(u64::from(r.is_some()), u64::from(r.is_none()));
        r
    }

    /// A ticket for a later [`HotTier::fill`] of `entity`; take it before the read view.
    pub fn ticket(&self, entity: &[u8]) -> Ticket {
        let hash = hash_of(entity);
        Ticket { hash, guard: self.stripes.ticket(hash) }
    }

    /// The doorkeeper: true if the entity missed before within the current window (fill it),
    /// false on a first miss (remember it, do not fill).
    fn admit(&self, hash: u64) -> bool {
        let bits = self.doorkeeper.len() * 64;
        let slot = (hash.rotate_left(32) as usize) & (bits - 1);
        let (word, bit) = (&self.doorkeeper[slot / 64], 1u64 << (slot % 64));
        if word.fetch_or(bit, Ordering::Relaxed) & bit != 0 {
            return true;
        }
        if self.doorkeeper_set.fetch_add(1, Ordering::Relaxed) + 1 >= bits as u64 / 8 {
            // Start a new window; racing setters only make the reset approximate.
            for w in self.doorkeeper.iter() {
                w.store(0, Ordering::Relaxed);
            }
            self.doorkeeper_set.store(0, Ordering::Relaxed);
        }
        false
    }

    /// Offers the newest states of some of the entity's pairs, as read from a view taken after
    /// `ticket`.
    pub fn fill(&self, entity: &[u8], ticket: Ticket, newest: Vec<(FeatureId, NewState)>) {
        // A complete tier holds every newest state already.
        if newest.is_empty() || self.is_complete() {
            return;
        }
        if !self.admit(ticket.hash) {
            self.fills_deferred.fetch_add(newest.len() as u64, Ordering::Relaxed);
            return;
        }
        let filled = self.stripes.fill(ticket.guard, || {
            let cur = self.cache.peek(entity);
            let offers = newest.iter().map(|(f, n)| (*f, n.offer())).collect();
            let updates = newer_than(cur.as_deref(), offers, false);
            if updates.is_empty() {
                return;
            }
            let row = cur.as_deref().map_or_else(Row::default, Row::clone).with(&updates);
            self.store(entity, cur.as_deref(), row);
            self.fills.fetch_add(updates.len() as u64, Ordering::Relaxed);
        });
        if filled.is_none() {
            self.fills_refused.fetch_add(newest.len() as u64, Ordering::Relaxed);
        }
    }

    /// Versions of the entity's pairs are about to be published (`cells`: feature, event
    /// time, system time, encoded cell): replaces the states of features in the row that they
    /// are newer than, and in complete mode adds the features (and the row) that are missing.
    /// Hand the returned token to [`HotTier::write_end`] once published.
    pub fn write_begin<'c>(
        &self,
        entity: &[u8],
        cells: impl Iterator<Item = (FeatureId, EventTime, SystemTime, &'c [u8])>,
    ) -> WriteToken {
        let (token, ()) = self.stripes.write_begin(hash_of(entity), || {
            let complete = self.is_complete();
            let cur = self.cache.peek(entity);
            if cur.is_none() && !complete {
                return;
            }
            let offered = cells
                .filter(|c| complete || cur.as_ref().is_some_and(|r| r.position(c.0).is_some()))
                .map(|(f, e, t, cell)| (f, Offer { event_time: e, system_time: t, cell: Some(cell) }))
                .collect();
            let updates = newer_than(cur.as_deref(), offered, true);
            if updates.is_empty() {
                return;
            }
            self.write_updates.fetch_add(updates.len() as u64, Ordering::Relaxed);
            let row = match cur.as_deref() {
                Some(r) => r.with(&updates),
                None => Row::default().with(&updates),
            };
            self.store(entity, cur.as_deref(), row);
        });
        token
    }

    /// The versions announced by the [`HotTier::write_begin`] that returned `token` are
    /// published (or abandoned).
    pub fn write_end(&self, token: WriteToken) {
        self.stripes.write_end(token);
    }

    /// The counters.
    pub fn stats(&self) -> HotStats {
        HotStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            fills: self.fills.load(Ordering::Relaxed),
            fills_refused: self.fills_refused.load(Ordering::Relaxed),
            fills_deferred: self.fills_deferred.load(Ordering::Relaxed),
            write_updates: self.write_updates.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            entries: self.cache.len() as u64,
            complete: self.is_complete(),
            bytes: self.cache.weight(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Value, VersionVector};

    fn v(e: i64, s: u64, x: i64) -> CellVersion {
        CellVersion {
            event_time: EventTime(e),
            system_time: SystemTime(s),
            value: Some(Value::Int64(x)),
            version_vector: VersionVector::new(),
        }
    }

    const F: FeatureId = FeatureId(7);

    /// A fill past the doorkeeper (as on an entity's second miss).
    fn fill(hot: &HotTier, entity: &[u8], t: Ticket, newest: Option<CellVersion>) {
        hot.admit(t.hash);
        hot.fill(entity, t, vec![(F, state(newest))]);
    }

    fn state(v: Option<CellVersion>) -> NewState {
        v.as_ref().map_or_else(NewState::absent, NewState::of)
    }

    /// Announces a write of `version` to feature `f` (without publishing it).
    fn begin(hot: &HotTier, entity: &[u8], f: FeatureId, version: CellVersion) -> WriteToken {
        let n = NewState::of(&version);
        let cell = n.cell.unwrap_or_default();
        hot.write_begin(entity, std::iter::once((f, n.event_time, n.system_time, cell.as_slice())))
    }

    fn write(hot: &HotTier, entity: &[u8], version: CellVersion) {
        let token = begin(hot, entity, F, version);
        hot.write_end(token);
    }

    fn read(hot: &HotTier, entity: &[u8], as_of: i64, known_at: SystemTime) -> Option<Option<CellVersion>> {
        hot.lookup(entity, F, EventTime(as_of), known_at)
    }

    #[test]
    fn an_entity_is_filled_on_its_second_miss_only() {
        let hot = HotTier::new(1 << 20, false).expect("enabled");
        let p = b"entity".as_slice();
        hot.fill(p, hot.ticket(p), vec![(F, state(Some(v(1, 1, 1))))]);
        assert_eq!(read(&hot, p, 1, SystemTime::MAX), None, "a first miss is only remembered");
        hot.fill(p, hot.ticket(p), vec![(F, state(Some(v(1, 1, 1))))]);
        assert_eq!(read(&hot, p, 1, SystemTime::MAX), Some(Some(v(1, 1, 1))));
        let s = hot.stats();
        assert_eq!((s.fills_deferred, s.fills), (1, 1));
        // A sweep over many more entities than the window resets it rather than saturating.
        for i in 0..100_000u32 {
            let q = i.to_be_bytes();
            hot.fill(&q, hot.ticket(&q), vec![(F, NewState::absent())]);
        }
        assert!(hot.stats().fills < 20_000, "{:?}", hot.stats());
    }

    #[test]
    fn a_state_answers_only_reads_it_covers() {
        let hot = HotTier::new(1 << 20, false).expect("enabled");
        let p = b"entity".as_slice();
        assert_eq!(read(&hot, p, 10, SystemTime::MAX), None);
        fill(&hot, p, hot.ticket(p), Some(v(10, 5, 1)));
        assert_eq!(read(&hot, p, 10, SystemTime::MAX), Some(Some(v(10, 5, 1))));
        assert_eq!(read(&hot, p, 9, SystemTime::MAX), None, "as of before the newest event");
        assert_eq!(read(&hot, p, 10, SystemTime(4)), None, "known before the newest version");
        assert_eq!(hot.lookup(p, FeatureId(8), EventTime(10), SystemTime::MAX), None, "another feature");
        // A late write of an older event leaves the state; a correction replaces it.
        write(&hot, p, v(3, 6, 2));
        assert_eq!(read(&hot, p, 20, SystemTime::MAX), Some(Some(v(10, 5, 1))));
        write(&hot, p, v(10, 7, 3));
        assert_eq!(read(&hot, p, 20, SystemTime::MAX), Some(Some(v(10, 7, 3))));
        assert_eq!(hot.stats().write_updates, 1);
        // Writes never add a feature the row does not hold.
        let token = begin(&hot, p, FeatureId(8), v(1, 8, 1));
        hot.write_end(token);
        assert_eq!(hot.lookup(p, FeatureId(8), EventTime(10), SystemTime::MAX), None);
    }

    #[test]
    fn fills_are_refused_while_a_write_may_be_missing_from_the_view() {
        let hot = HotTier::new(1 << 20, false).expect("enabled");
        let p = b"entity".as_slice();
        // A write in flight when the ticket is taken.
        let token = begin(&hot, p, F, v(5, 9, 1));
        let t = hot.ticket(p);
        hot.write_end(token);
        fill(&hot, p, t, None);
        assert_eq!(read(&hot, p, 5, SystemTime::MAX), None);
        // A write that begins after the ticket.
        let t = hot.ticket(p);
        write(&hot, p, v(6, 10, 1));
        fill(&hot, p, t, Some(v(5, 9, 1)));
        assert_eq!(read(&hot, p, 6, SystemTime::MAX), None);
        assert_eq!(hot.stats().fills_refused, 2);
        // A quiet stripe: the fill lands, and an older fill never replaces a newer state.
        fill(&hot, p, hot.ticket(p), Some(v(6, 10, 1)));
        fill(&hot, p, hot.ticket(p), Some(v(5, 9, 1)));
        assert_eq!(read(&hot, p, 6, SystemTime::MAX), Some(Some(v(6, 10, 1))));
        // Absent answers any read until a write replaces it.
        let q = b"other".as_slice();
        fill(&hot, q, hot.ticket(q), None);
        assert_eq!(read(&hot, q, i64::MIN, SystemTime(0)), Some(None));
        write(&hot, q, v(1, 11, 4));
        assert_eq!(read(&hot, q, 0, SystemTime::MAX), None);
        assert_eq!(read(&hot, q, 1, SystemTime::MAX), Some(Some(v(1, 11, 4))));
    }

    #[test]
    fn rows_merge_updates_in_feature_order() {
        let hot = HotTier::new(1 << 20, false).expect("enabled");
        let p = b"entity".as_slice();
        let t = hot.ticket(p);
        hot.admit(t.hash);
        let offers = vec![
            (FeatureId(9), state(Some(v(1, 1, 9)))),
            (FeatureId(2), NewState::absent()),
            (FeatureId(5), state(Some(v(1, 1, 5)))),
            (FeatureId(5), state(Some(v(2, 1, 6)))),
        ];
        hot.fill(p, t, offers);
        let at = |f: u32| hot.lookup(p, FeatureId(f), EventTime(10), SystemTime::MAX);
        assert_eq!(at(2), Some(None));
        assert_eq!(at(5), Some(Some(v(2, 1, 6))), "the newest of two offers");
        assert_eq!(at(9), Some(Some(v(1, 1, 9))));
        assert_eq!(at(3), None);
        // A write to a feature that was absent gives it a version; others stay as they were.
        let token = begin(&hot, p, FeatureId(2), v(4, 3, 2));
        hot.write_end(token);
        assert_eq!(at(2), Some(Some(v(4, 3, 2))));
        assert_eq!(at(9), Some(Some(v(1, 1, 9))));
        assert_eq!(hot.stats().entries, 1);
    }

    #[test]
    fn the_budget_bounds_the_bytes_held() {
        let hot = HotTier::new(64 << 10, false).expect("enabled");
        for i in 0..10_000u32 {
            let p = i.to_be_bytes();
            fill(&hot, &p, hot.ticket(&p), Some(v(1, 1, 1)));
        }
        let s = hot.stats();
        assert!(s.bytes <= 64 << 10, "{s:?}");
        assert!(s.evictions > 0 && s.entries > 0, "{s:?}");
    }

    #[test]
    fn a_complete_tier_answers_absent_for_what_it_lacks() {
        let hot = HotTier::new(1 << 20, true).expect("enabled");
        let p = b"entity".as_slice();
        assert_eq!(read(&hot, p, 10, SystemTime::MAX), Some(None), "no row: the entity has no version");
        write(&hot, p, v(10, 5, 1));
        assert_eq!(read(&hot, p, 10, SystemTime::MAX), Some(Some(v(10, 5, 1))), "writes create rows");
        assert_eq!(hot.lookup(p, FeatureId(8), EventTime(10), SystemTime::MAX), Some(None), "a feature it lacks");
        // A late write of an older event leaves the newest state; the read before it misses.
        write(&hot, p, v(3, 6, 2));
        assert_eq!(read(&hot, p, 20, SystemTime::MAX), Some(Some(v(10, 5, 1))));
        assert_eq!(read(&hot, p, 9, SystemTime::MAX), None);
        // Writes add features to rows; a known_at before the state misses.
        let token = begin(&hot, p, FeatureId(8), v(4, 7, 9));
        hot.write_end(token);
        assert_eq!(hot.lookup(p, FeatureId(8), EventTime(10), SystemTime::MAX), Some(Some(v(4, 7, 9))));
        assert_eq!(hot.lookup(p, FeatureId(8), EventTime(10), SystemTime(6)), None);
        // Fills are not needed, and not taken.
        fill(&hot, b"other", hot.ticket(b"other"), Some(v(1, 1, 1)));
        assert_eq!(hot.stats().fills, 0);
        assert!(hot.stats().complete);
    }

    #[test]
    fn a_complete_tier_past_its_budget_becomes_a_cache() {
        let hot = HotTier::new(16 << 10, true).expect("enabled");
        let mut n = 0u32;
        while hot.is_complete() {
            write(&hot, &n.to_be_bytes(), v(1, u64::from(n) + 1, 1));
            n += 1;
            assert!(n < 10_000, "the budget must end complete mode");
        }
        let s = hot.stats();
        assert!(s.bytes <= 16 << 10, "nothing past the budget is kept: {s:?}");
        // Every row written while complete that is still held answers; a row that is not held
        // (the one that ended complete mode, or an evicted one) now misses instead of
        // answering absent.
        let (mut held, mut missed) = (0, 0);
        for i in 0..n {
            match read(&hot, &i.to_be_bytes(), 1, SystemTime::MAX) {
                Some(Some(got)) => {
                    assert_eq!(got, v(1, u64::from(i) + 1, 1));
                    held += 1;
                }
                None => missed += 1,
                Some(None) => panic!("entity {i} answered absent after complete mode ended"),
            }
        }
        assert!(held > 0 && missed > 0, "held {held}, missed {missed}");
        assert_eq!(hot.lookup(b"never", F, EventTime(1), SystemTime::MAX), None);
    }
}
