//! The hot tier: the newest version of recently read or written `(entity, feature)` pairs, in
//! memory, bounded by bytes, in front of memtables and tables.
//!
//! # What an entry means
//!
//! The entry of a pair is its *newest* version — greatest event time, then greatest system
//! time — among every version the engine holds or is committing, or `Absent` when the pair has
//! no version at all. That one fact answers every as-of read it covers:
//!
//! - a read `(as_of T, known_at K)` with `entry.event_time <= T` and `entry.system_time <= K`
//!   has the entry as its winner: every version with event time `<= T` and system time `<= K`
//!   orders at or below it, and it qualifies itself; the read's lookback then applies as usual
//!   (older than `T - L`: absent), and a tombstone means absent;
//! - `Absent` answers every read: absent. (Retention never removes a pair's newest version
//!   except a settled tombstone that was its only entry, after which the pair reads absent
//!   anyway, from any snapshot.)
//!
//! Any other read misses and goes to the engine. So a read served here returns exactly what
//! the engine would, whatever snapshot it reads from: a snapshot older than the entry misses
//! on `system_time <= K`.
//!
//! # Keeping entries newest
//!
//! - **Writes** (the commit path, under the writer lock, in commit order): before a batch is
//!   published, each cell calls [`HotTier::write_begin`], which replaces a present entry when
//!   the new version is newer (a late write of an older event leaves it alone). Entries are
//!   only replaced, never created by writes: a write does not know whether the pair holds
//!   newer versions on disk. After publishing, [`HotTier::write_end`].
//! - **Fills** (readers on a miss): a reader takes a [`Ticket`] for the pair *before* it takes
//!   its read view, reads the pair's newest version from that view, and offers it with
//!   [`HotTier::fill`]. The fill is refused when a write of the pair may be missing from the
//!   view: the ticket saw a write in flight (`pending > 0`), or a write began since (`gen`
//!   moved). Per stripe of pairs: `write_begin` bumps `pending` then `gen` and updates the
//!   entry under the stripe lock; `fill` checks `gen` and inserts under the same lock; the
//!   ticket reads `gen` then `pending`. A write that began before the ticket is either still
//!   pending (refused) or published before the view (in the view); one that begins after the
//!   ticket either moves `gen` before the fill (refused) or runs after it and replaces what the
//!   fill inserted. Stripes are shared by many pairs, which only costs a few refused fills.
//!
//! # Admission and eviction
//!
//! A pair is filled on its *second* miss within a window (a TinyLFU-style doorkeeper: one bit
//! per hash slot, all cleared once an eighth are set), so a one-off scan or a uniformly random
//! sweep over more pairs than fit does not churn the tier. Eviction is `quick_cache`'s
//! (S3-FIFO-like, scan resistant), bounded by the entries' approximate bytes. An evicted pair
//! simply misses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, Lifecycle, OptionsBuilder, Weighter};

use crate::types::{CellVersion, EventTime, SystemTime, Value};

/// Stripes of pairs sharing one fill/write guard.
const STRIPES: usize = 1024;
/// Bytes an entry costs beyond its key and value (cache slot, `Arc`, vectors' headers).
const ENTRY_OVERHEAD_BYTES: usize = 96;
/// Typical entry size, for sizing the cache's index and the doorkeeper.
const ENTRY_BYTES_TYPICAL: usize = 128;
/// Fewest doorkeeper bits (a tiny tier still remembers this many recent misses).
const DOORKEEPER_BITS_MIN: usize = 1 << 12;
/// Doorkeeper bits per typical entry; with a reset at 1/8 of the bits set, a first miss is
/// mistaken for a second one at most 1 time in 8 (hash collisions).
const DOORKEEPER_BITS_PER_ENTRY: usize = 16;

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

    fn is_newer_than(&self, other: &HotEntry) -> bool {
        matches!(other, HotEntry::Absent) && !matches!(self, HotEntry::Absent) || self.order() > other.order()
    }

    fn bytes(&self) -> usize {
        match self {
            HotEntry::Absent => 0,
            HotEntry::Newest(v) => {
                let value = match &v.value {
                    None => 0,
                    Some(Value::String(s)) => s.len(),
                    Some(Value::Bytes(b)) => b.len(),
                    Some(Value::Float32Vector(x)) => x.len() * 4,
                    Some(Value::Int64List(x)) => x.len() * 8,
                    Some(Value::StringList(x)) => x.iter().map(|s| s.len() + 24).sum(),
                    Some(_) => 8,
                };
                value + v.version_vector.len() * 16
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct EntryWeighter;

impl Weighter<Vec<u8>, Arc<HotEntry>> for EntryWeighter {
    fn weight(&self, key: &Vec<u8>, val: &Arc<HotEntry>) -> u64 {
        (key.len() + val.bytes() + ENTRY_OVERHEAD_BYTES) as u64
    }
}

#[derive(Debug, Clone, Default)]
struct CountEvictions(Arc<AtomicU64>);

impl Lifecycle<Vec<u8>, Arc<HotEntry>> for CountEvictions {
    type RequestState = ();

    fn on_evict(&self, _state: &mut Self::RequestState, _key: Vec<u8>, _val: Arc<HotEntry>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct Stripe {
    lock: Mutex<()>,
    gen: AtomicU64,
    pending: AtomicU64,
}

/// What a reader saw of a pair's stripe before taking its view (see the module docs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    hash: u64,
    stripe: usize,
    gen: u64,
    quiet: bool,
}

/// The answer of a read served from the hot tier.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Lookup {
    /// The winner (tombstones included; `None`: absent), before lookback.
    Hit(Option<CellVersion>),
    /// The entry does not cover this read, or there is none.
    Miss,
}

/// Counters of the hot tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HotStats {
    /// Reads answered here.
    pub hits: u64,
    /// Reads that went to the engine.
    pub misses: u64,
    /// Entries inserted by readers.
    pub fills: u64,
    /// Fills refused because a write of the pair could be missing from the reader's view.
    pub fills_refused: u64,
    /// Fills skipped by the doorkeeper (first miss of a pair within its window).
    pub fills_deferred: u64,
    /// Entries replaced by writes.
    pub write_updates: u64,
    /// Entries evicted by the admission policy.
    pub evictions: u64,
    /// Entries held.
    pub entries: u64,
    /// Approximate bytes held.
    pub bytes: u64,
}

/// The hot tier of one engine.
#[derive(Debug)]
pub(crate) struct HotTier {
    cache: Cache<Vec<u8>, Arc<HotEntry>, EntryWeighter, DefaultHashBuilder, CountEvictions>,
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

fn hash_of(prefix: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(prefix)
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
        let options = OptionsBuilder::new()
            .estimated_items_capacity((bytes / ENTRY_BYTES_TYPICAL).max(16))
            .weight_capacity(bytes as u64)
            .build()
            .ok()?;
        Some(HotTier {
            cache: Cache::with_options(
                options,
                EntryWeighter,
                DefaultHashBuilder::default(),
                CountEvictions(evictions.clone()),
            ),
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
            doorkeeper: (0..((bytes / ENTRY_BYTES_TYPICAL * DOORKEEPER_BITS_PER_ENTRY)
                .next_power_of_two()
                .max(DOORKEEPER_BITS_MIN)
                / 64))
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

    /// The answer for a read of `prefix` (an `(entity, feature)` key prefix) at `as_of`, with
    /// the effective `known_at` (already capped at the reader's visible stamp).
    pub fn lookup(&self, prefix: &[u8], as_of: EventTime, known_at: SystemTime) -> Lookup {
        let r = match self.cache.get(prefix).as_deref() {
            Some(HotEntry::Absent) => Lookup::Hit(None),
            Some(HotEntry::Newest(v)) if v.event_time <= as_of && v.system_time <= known_at => {
                Lookup::Hit(Some(v.clone()))
            }
            _ => Lookup::Miss,
        };
        match r {
            Lookup::Hit(_) => self.hits.fetch_add(1, Ordering::Relaxed),
            Lookup::Miss => self.misses.fetch_add(1, Ordering::Relaxed),
        };
        r
    }

    /// A ticket for a later [`HotTier::fill`] of `prefix`; take it before the read view.
    pub fn ticket(&self, prefix: &[u8]) -> Ticket {
        let hash = hash_of(prefix);
        let stripe = stripe_of(hash);
        let s = &self.stripes[stripe];
        let gen = s.gen.load(Ordering::SeqCst);
        let quiet = s.pending.load(Ordering::SeqCst) == 0;
        Ticket { hash, stripe, gen, quiet }
    }

    /// The doorkeeper: true if the pair missed before within the current window (fill it),
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

    /// Offers the pair's newest version as read from a view taken after `ticket` (`None`: the
    /// pair has no version in that view).
    pub fn fill(&self, prefix: &[u8], ticket: Ticket, newest: Option<&CellVersion>) {
        if !self.admit(ticket.hash) {
            self.fills_deferred.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let s = &self.stripes[ticket.stripe];
        let _g = s.lock.lock();
        if !ticket.quiet || s.gen.load(Ordering::SeqCst) != ticket.gen {
            self.fills_refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let entry = newest.map_or(HotEntry::Absent, |v| HotEntry::Newest(v.clone()));
        if self.cache.peek(prefix).is_some_and(|cur| !entry.is_newer_than(&cur)) {
            return;
        }
        self.cache.insert(prefix.to_vec(), Arc::new(entry));
        self.fills.fetch_add(1, Ordering::Relaxed);
    }

    /// A version of the pair is about to be published: replaces a present entry it is newer
    /// than. `version` builds it (decoding the cell) only when an entry is present.
    pub fn write_begin(
        &self,
        prefix: &[u8],
        event_time: EventTime,
        system_time: SystemTime,
        version: impl FnOnce() -> Option<CellVersion>,
    ) {
        let s = &self.stripes[stripe_of(hash_of(prefix))];
        let _g = s.lock.lock();
        s.pending.fetch_add(1, Ordering::SeqCst);
        s.gen.fetch_add(1, Ordering::SeqCst);
        let Some(cur) = self.cache.peek(prefix) else { return };
        // Equal order: a later write of the same cell in one batch, which wins in the memtable too.
        if cur.order() > (event_time, system_time) {
            return;
        }
        // Remove first: if the new entry is not admitted, no stale one may stay behind.
        self.cache.remove(prefix);
        if let Some(v) = version() {
            self.cache.insert(prefix.to_vec(), Arc::new(HotEntry::Newest(v)));
            self.write_updates.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The version announced by [`HotTier::write_begin`] is published (or abandoned).
    pub fn write_end(&self, prefix: &[u8]) {
        self.stripes[stripe_of(hash_of(prefix))].pending.fetch_sub(1, Ordering::SeqCst);
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

    /// A fill past the doorkeeper (as on a pair's second miss).
    fn fill(hot: &HotTier, prefix: &[u8], t: Ticket, newest: Option<&CellVersion>) {
        hot.admit(t.hash);
        hot.fill(prefix, t, newest);
    }

    #[test]
    fn a_pair_is_filled_on_its_second_miss_only() {
        let hot = HotTier::new(1 << 20).expect("enabled");
        let p = b"pair".as_slice();
        hot.fill(p, hot.ticket(p), Some(&v(1, 1, 1)));
        assert_eq!(hot.lookup(p, EventTime(1), SystemTime::MAX), Lookup::Miss, "a first miss is only remembered");
        hot.fill(p, hot.ticket(p), Some(&v(1, 1, 1)));
        assert_eq!(hot.lookup(p, EventTime(1), SystemTime::MAX), Lookup::Hit(Some(v(1, 1, 1))));
        let s = hot.stats();
        assert_eq!((s.fills_deferred, s.fills), (1, 1));
        // A sweep over many more pairs than the window resets it rather than saturating.
        for i in 0..100_000u32 {
            let q = i.to_be_bytes();
            hot.fill(&q, hot.ticket(&q), None);
        }
        assert!(hot.stats().fills < 20_000, "{:?}", hot.stats());
    }

    #[test]
    fn an_entry_answers_only_reads_it_covers() {
        let hot = HotTier::new(1 << 20).expect("enabled");
        let p = b"pair".as_slice();
        assert_eq!(hot.lookup(p, EventTime(10), SystemTime::MAX), Lookup::Miss);
        let t = hot.ticket(p);
        fill(&hot, p, t, Some(&v(10, 5, 1)));
        assert_eq!(hot.lookup(p, EventTime(10), SystemTime::MAX), Lookup::Hit(Some(v(10, 5, 1))));
        assert_eq!(hot.lookup(p, EventTime(9), SystemTime::MAX), Lookup::Miss, "as of before the newest event");
        assert_eq!(hot.lookup(p, EventTime(10), SystemTime(4)), Lookup::Miss, "known before the newest version");
        // A late write of an older event leaves the entry; a correction replaces it.
        hot.write_begin(p, EventTime(3), SystemTime(6), || Some(v(3, 6, 2)));
        hot.write_end(p);
        assert_eq!(hot.lookup(p, EventTime(20), SystemTime::MAX), Lookup::Hit(Some(v(10, 5, 1))));
        hot.write_begin(p, EventTime(10), SystemTime(7), || Some(v(10, 7, 3)));
        hot.write_end(p);
        assert_eq!(hot.lookup(p, EventTime(20), SystemTime::MAX), Lookup::Hit(Some(v(10, 7, 3))));
        assert_eq!(hot.stats().write_updates, 1);
    }

    #[test]
    fn fills_are_refused_while_a_write_may_be_missing_from_the_view() {
        let hot = HotTier::new(1 << 20).expect("enabled");
        let p = b"pair".as_slice();
        // A write in flight when the ticket is taken.
        hot.write_begin(p, EventTime(5), SystemTime(9), || Some(v(5, 9, 1)));
        let t = hot.ticket(p);
        hot.write_end(p);
        fill(&hot, p, t, None);
        assert_eq!(hot.lookup(p, EventTime(5), SystemTime::MAX), Lookup::Miss);
        // A write that begins after the ticket.
        let t = hot.ticket(p);
        hot.write_begin(p, EventTime(6), SystemTime(10), || Some(v(6, 10, 1)));
        hot.write_end(p);
        fill(&hot, p, t, Some(&v(5, 9, 1)));
        assert_eq!(hot.lookup(p, EventTime(6), SystemTime::MAX), Lookup::Miss);
        assert_eq!(hot.stats().fills_refused, 2);
        // A quiet stripe: the fill lands, and an older fill never replaces a newer entry.
        let t = hot.ticket(p);
        fill(&hot, p, t, Some(&v(6, 10, 1)));
        let t = hot.ticket(p);
        fill(&hot, p, t, Some(&v(5, 9, 1)));
        assert_eq!(hot.lookup(p, EventTime(6), SystemTime::MAX), Lookup::Hit(Some(v(6, 10, 1))));
        // Absent answers any read until a write replaces it.
        let q = b"other".as_slice();
        let t = hot.ticket(q);
        fill(&hot, q, t, None);
        assert_eq!(hot.lookup(q, EventTime(i64::MIN), SystemTime(0)), Lookup::Hit(None));
        hot.write_begin(q, EventTime(1), SystemTime(11), || Some(v(1, 11, 4)));
        hot.write_end(q);
        assert_eq!(hot.lookup(q, EventTime(0), SystemTime::MAX), Lookup::Miss);
        assert_eq!(hot.lookup(q, EventTime(1), SystemTime::MAX), Lookup::Hit(Some(v(1, 11, 4))));
    }

    #[test]
    fn the_budget_bounds_the_bytes_held() {
        let hot = HotTier::new(64 << 10).expect("enabled");
        for i in 0..10_000u32 {
            let p = i.to_be_bytes();
            let t = hot.ticket(&p);
            fill(&hot, &p, t, Some(&v(1, 1, 1)));
        }
        let s = hot.stats();
        assert!(s.bytes <= 64 << 10, "{s:?}");
        assert!(s.evictions > 0 && s.entries > 0, "{s:?}");
    }
}
