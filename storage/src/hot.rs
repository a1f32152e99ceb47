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
//! # Admission and eviction
//!
//! An entity's pairs are filled on its *second* miss within a window (a TinyLFU-style
//! doorkeeper: one bit per hash slot, all cleared once an eighth are set), so a one-off scan or
//! a uniformly random sweep over more entities than fit does not churn the tier. Eviction is
//! `quick_cache`'s (S3-FIFO-like, scan resistant), bounded by the rows' approximate bytes. An
//! evicted row simply misses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, Lifecycle, OptionsBuilder, Weighter};

use crate::types::{CellVersion, EventTime, FeatureId, SystemTime, Value};

/// Stripes of entities sharing one fill/write guard.
const STRIPES: usize = 1024;
/// Bytes a row costs beyond its key and states (cache slot, `Arc`, vector headers).
const ROW_OVERHEAD_BYTES: usize = 96;
/// Bytes a state costs beyond its value's heap bytes.
const STATE_OVERHEAD_BYTES: usize = 64;
/// Typical row size, for sizing the cache's index and the doorkeeper.
const ROW_BYTES_TYPICAL: usize = 1024;
/// Fewest doorkeeper bits (a tiny tier still remembers this many recent misses).
const DOORKEEPER_BITS_MIN: usize = 1 << 12;
/// Doorkeeper bits per typical row; with a reset at 1/8 of the bits set, a first miss is
/// mistaken for a second one at most 1 time in 8 (hash collisions).
const DOORKEEPER_BITS_PER_ROW: usize = 16;

/// A pair's newest state.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum HotEntry {
    /// The pair has no version.
    Absent,
    /// Its newest version (a tombstone has `value: None`).
    Newest(CellVersion),
}

impl HotEntry {
    fn order(&self) -> (EventTime, SystemTime) {
        match self {
            HotEntry::Absent => (EventTime(i64::MIN), SystemTime(0)),
            HotEntry::Newest(v) => (v.event_time, v.system_time),
        }
    }

    fn bytes(&self) -> usize {
        STATE_OVERHEAD_BYTES
            + match self {
                HotEntry::Absent => 0,
                HotEntry::Newest(v) => {
                    let value = match &v.value {
                        None => 0,
                        Some(Value::String(s)) => s.len(),
                        Some(Value::Bytes(b)) => b.len(),
                        Some(Value::Float32Vector(x)) => x.len() * 4,
                        Some(Value::Int64List(x)) => x.len() * 8,
                        Some(Value::StringList(x)) => x.iter().map(|s| s.len() + 24).sum(),
                        Some(_) => 0,
                    };
                    value + v.version_vector.len() * 16
                }
            }
    }

    /// The answer to a read at `as_of` / `known_at` if this state covers it.
    fn answer(&self, as_of: EventTime, known_at: SystemTime) -> Option<Option<CellVersion>> {
        match self {
            HotEntry::Absent => Some(None),
            HotEntry::Newest(v) if v.event_time <= as_of && v.system_time <= known_at => Some(Some(v.clone())),
            HotEntry::Newest(_) => None,
        }
    }
}

/// The cached states of one entity's features, sorted by feature.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Row {
    states: Vec<(FeatureId, HotEntry)>,
}

impl Row {
    fn get(&self, f: FeatureId) -> Option<&HotEntry> {
        self.states.binary_search_by_key(&f, |s| s.0).ok().map(|i| &self.states[i].1)
    }

    fn bytes(&self) -> usize {
        self.states.iter().map(|s| s.1.bytes()).sum()
    }

    /// The answer for feature `f` if the row covers the read.
    pub fn answer(&self, f: FeatureId, as_of: EventTime, known_at: SystemTime) -> Option<Option<CellVersion>> {
        self.get(f).and_then(|e| e.answer(as_of, known_at))
    }
}

#[derive(Debug, Clone, Copy)]
struct RowWeighter;

impl Weighter<Vec<u8>, Arc<Row>> for RowWeighter {
    fn weight(&self, key: &Vec<u8>, val: &Arc<Row>) -> u64 {
        (key.len() + val.bytes() + ROW_OVERHEAD_BYTES) as u64
    }
}

#[derive(Debug, Clone, Default)]
struct CountEvictions(Arc<AtomicU64>);

impl Lifecycle<Vec<u8>, Arc<Row>> for CountEvictions {
    type RequestState = ();

    fn on_evict(&self, _state: &mut Self::RequestState, _key: Vec<u8>, _val: Arc<Row>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct Stripe {
    lock: Mutex<()>,
    gen: AtomicU64,
    pending: AtomicU64,
}

/// What a reader saw of an entity's stripe before taking its view (see the module docs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    hash: u64,
    stripe: usize,
    gen: u64,
    quiet: bool,
}

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
    /// Approximate bytes held.
    pub bytes: u64,
}

/// The hot tier of one engine.
#[derive(Debug)]
pub(crate) struct HotTier {
    cache: Cache<Vec<u8>, Arc<Row>, RowWeighter, DefaultHashBuilder, CountEvictions>,
    stripes: Box<[Stripe]>,
    doorkeeper: Box<[AtomicU64]>,
    doorkeeper_set: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    fills: AtomicU64,
    fills_refused: AtomicU64,
    fills_deferred: AtomicU64,
    write_updates: AtomicU64,
    evictions: Arc<AtomicU64>,
}

fn hash_of(entity: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(entity)
}

fn stripe_of(hash: u64) -> usize {
    (hash % STRIPES as u64) as usize
}

impl HotTier {
    /// A hot tier of about `bytes`; `None` when `bytes` is 0 (disabled).
    pub fn new(bytes: usize) -> Option<HotTier> {
        if bytes == 0 {
            return None;
        }
        let evictions = Arc::new(AtomicU64::new(0));
        let rows = (bytes / ROW_BYTES_TYPICAL).max(16);
        let options =
            OptionsBuilder::new().estimated_items_capacity(rows).weight_capacity(bytes as u64).build().ok()?;
        Some(HotTier {
            cache: Cache::with_options(
                options,
                RowWeighter,
                DefaultHashBuilder::default(),
                CountEvictions(evictions.clone()),
            ),
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
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
        })
    }

    /// The entity's row, if cached (one probe for all of its features).
    pub fn row(&self, entity: &[u8]) -> Option<Arc<Row>> {
        self.cache.get(entity)
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
        let r = self.row(entity).and_then(|row| row.answer(f, as_of, known_at));
        self.count(u64::from(r.is_some()), u64::from(r.is_none()));
        r
    }

    /// A ticket for a later [`HotTier::fill`] of `entity`; take it before the read view.
    pub fn ticket(&self, entity: &[u8]) -> Ticket {
        let hash = hash_of(entity);
        let stripe = stripe_of(hash);
        let s = &self.stripes[stripe];
        let gen = s.gen.load(Ordering::SeqCst);
        let quiet = s.pending.load(Ordering::SeqCst) == 0;
        Ticket { hash, stripe, gen, quiet }
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

    /// Offers the newest versions of some of the entity's pairs, as read from a view taken
    /// after `ticket` (`None`: the pair has no version in that view).
    pub fn fill(&self, entity: &[u8], ticket: Ticket, newest: Vec<(FeatureId, Option<CellVersion>)>) {
        if newest.is_empty() {
            return;
        }
        if !self.admit(ticket.hash) {
            self.fills_deferred.fetch_add(newest.len() as u64, Ordering::Relaxed);
            return;
        }
        let s = &self.stripes[ticket.stripe];
        let _g = s.lock.lock();
        if !ticket.quiet || s.gen.load(Ordering::SeqCst) != ticket.gen {
            self.fills_refused.fetch_add(newest.len() as u64, Ordering::Relaxed);
            return;
        }
        let mut row = self.cache.peek(entity).map(|r| (*r).clone()).unwrap_or_default();
        let mut filled = 0;
        for (f, v) in newest {
            let state = v.map_or(HotEntry::Absent, HotEntry::Newest);
            match row.states.binary_search_by_key(&f, |s| s.0) {
                Ok(i) if state.order() > row.states[i].1.order() => row.states[i].1 = state,
                Ok(_) => continue,
                Err(i) => row.states.insert(i, (f, state)),
            }
            filled += 1;
        }
        if filled > 0 {
            self.cache.insert(entity.to_vec(), Arc::new(row));
            self.fills.fetch_add(filled, Ordering::Relaxed);
        }
    }

    /// Versions of the entity's pairs are about to be published (`cells`: feature, event
    /// time, system time, and a builder decoding the version, called only when the pair is in
    /// the row): replaces the states they are newer than.
    pub fn write_begin<F>(&self, entity: &[u8], cells: impl Iterator<Item = (FeatureId, EventTime, SystemTime, F)>)
    where
        F: FnOnce() -> Option<CellVersion>,
    {
        let s = &self.stripes[stripe_of(hash_of(entity))];
        let _g = s.lock.lock();
        s.pending.fetch_add(1, Ordering::SeqCst);
        s.gen.fetch_add(1, Ordering::SeqCst);
        let Some(cur) = self.cache.peek(entity) else { return };
        let mut row: Option<Row> = None;
        let mut dropped = false;
        for (f, e, t, version) in cells {
            let states = &row.as_ref().unwrap_or(cur.as_ref()).states;
            let Ok(i) = states.binary_search_by_key(&f, |s| s.0) else { continue };
            // Equal order: a later write of the same cell in one batch, which wins in the
            // memtable too.
            if states[i].1.order() > (e, t) {
                continue;
            }
            let r = row.get_or_insert_with(|| (*cur).clone());
            match version() {
                Some(v) => r.states[i].1 = HotEntry::Newest(v),
                None => {
                    r.states.remove(i);
                    dropped = true;
                }
            }
            self.write_updates.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(r) = row {
            // Remove first: if the new row is not admitted, no stale one may stay behind.
            self.cache.remove(entity);
            if !r.states.is_empty() || !dropped {
                self.cache.insert(entity.to_vec(), Arc::new(r));
            }
        }
    }

    /// The versions announced by [`HotTier::write_begin`] for `entity` are published (or
    /// abandoned).
    pub fn write_end(&self, entity: &[u8]) {
        self.stripes[stripe_of(hash_of(entity))].pending.fetch_sub(1, Ordering::SeqCst);
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
            bytes: self.cache.weight(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::VersionVector;

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
        hot.fill(entity, t, vec![(F, newest)]);
    }

    fn write(hot: &HotTier, entity: &[u8], version: CellVersion) {
        let (e, s) = (version.event_time, version.system_time);
        hot.write_begin(entity, std::iter::once((F, e, s, move || Some(version))));
        hot.write_end(entity);
    }

    fn read(hot: &HotTier, entity: &[u8], as_of: i64, known_at: SystemTime) -> Option<Option<CellVersion>> {
        hot.lookup(entity, F, EventTime(as_of), known_at)
    }

    #[test]
    fn an_entity_is_filled_on_its_second_miss_only() {
        let hot = HotTier::new(1 << 20).expect("enabled");
        let p = b"entity".as_slice();
        hot.fill(p, hot.ticket(p), vec![(F, Some(v(1, 1, 1)))]);
        assert_eq!(read(&hot, p, 1, SystemTime::MAX), None, "a first miss is only remembered");
        hot.fill(p, hot.ticket(p), vec![(F, Some(v(1, 1, 1)))]);
        assert_eq!(read(&hot, p, 1, SystemTime::MAX), Some(Some(v(1, 1, 1))));
        let s = hot.stats();
        assert_eq!((s.fills_deferred, s.fills), (1, 1));
        // A sweep over many more entities than the window resets it rather than saturating.
        for i in 0..100_000u32 {
            let q = i.to_be_bytes();
            hot.fill(&q, hot.ticket(&q), vec![(F, None)]);
        }
        assert!(hot.stats().fills < 20_000, "{:?}", hot.stats());
    }

    #[test]
    fn a_state_answers_only_reads_it_covers() {
        let hot = HotTier::new(1 << 20).expect("enabled");
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
        hot.write_begin(p, std::iter::once((FeatureId(8), EventTime(1), SystemTime(8), || Some(v(1, 8, 1)))));
        hot.write_end(p);
        assert_eq!(hot.lookup(p, FeatureId(8), EventTime(10), SystemTime::MAX), None);
    }

    #[test]
    fn fills_are_refused_while_a_write_may_be_missing_from_the_view() {
        let hot = HotTier::new(1 << 20).expect("enabled");
        let p = b"entity".as_slice();
        // A write in flight when the ticket is taken.
        hot.write_begin(p, std::iter::once((F, EventTime(5), SystemTime(9), || Some(v(5, 9, 1)))));
        let t = hot.ticket(p);
        hot.write_end(p);
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
    fn the_budget_bounds_the_bytes_held() {
        let hot = HotTier::new(64 << 10).expect("enabled");
        for i in 0..10_000u32 {
            let p = i.to_be_bytes();
            fill(&hot, &p, hot.ticket(&p), Some(v(1, 1, 1)));
        }
        let s = hot.stats();
        assert!(s.bytes <= 64 << 10, "{s:?}");
        assert!(s.evictions > 0 && s.entries > 0, "{s:?}");
    }
}
