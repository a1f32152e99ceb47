//! Tiles: the partial aggregates of one hour, or one day, of one pair's history, kept in
//! memory, so that an aggregate over a long window reads its whole days, then the whole hours
//! of its two ragged ends, then the raw versions of what is left (less than an hour at each
//! end) instead of every version in the window (`storage/READS.md`, "`aggregate_at`").
//!
//! # What a tile is
//!
//! Tile `i` of level `l` of a pair `(entity, feature)` covers the event times `(i x w, (i + 1)
//! x w]` for the level's width `w` ([`LEVEL_US`]: an hour, a day) — the same orientation as an
//! aggregate window, so a window whose ends fall on hour boundaries is exactly a run of tiles. A tile holds, for each aggregate function asked
//! of it, the [`Accumulator`] of the winners of its event times (each event time's version
//! with the greatest system time; tombstone winners left out), computed from one read view
//! with nothing filtered by system time, together with the greatest system time of any
//! version in its range (`max_system_time`) and its newest event time with a value. Merging
//! accumulators is exact (`crate::agg`), so a window folded from tiles and edges answers bit for
//! bit as the raw versions do; tiles are derived data, rebuilt from the raw versions whenever
//! they are missing.
//!
//! # When a tile answers a read
//!
//! A read at `known_at = K` from a view may use a tile when the tile is *current* (it holds
//! every version of its range that any view taken before the lookup holds) and
//! `max_system_time <= K`: then the tile's versions are exactly the view's versions of the
//! range known at `K` (the view holds every version stamped `<= K`, and the tile holds no other).
//! Otherwise the read folds that tile's range from the raw versions itself.
//!
//! Tiles are kept current the way the hot tier keeps its states, with stripes of entities of
//! their own (`src/stripes.rs`):
//! - **writes** announce themselves before they are published ([`Tiles::write_begin`], under
//!   the stripe lock: `pending` then `gen` move, and the tiles of every written (feature, hour)
//!   and (feature, day) are removed) and end after ([`Tiles::write_end`]);
//! - **fills**: a reader takes a [`TileTicket`] before its view and offers the tiles it folded
//!   from that view; the fill is refused when a write of the entity may be missing from the
//!   view (a write was in flight at the ticket, or `gen` moved since).
//!
//! A write that began before the ticket was published before the view (or the fill is
//! refused); one that begins after the ticket either moves `gen` before the fill (refused) or
//! removes the tile after it. So a tile found in the cache holds every version published before
//! the lookup.
//!
//! Compaction never changes a tile's answer at `K >= max_system_time` (retention keeps every
//! pair's current winners), except where the engine forgets history on purpose: below the
//! event-time horizon, which tiles never cover (a read takes the horizon after its view, so a
//! tile it uses starts above any horizon compaction applied), and for dropped feature ids,
//! which tiles never serve from the moment they are dropped until the engine closes (the set
//! only grows, as the hot tier's; tiles held of them are forgotten).
//!
//! Versions replicated from another region keep their origin's stamps, which may lie below
//! the reader's `known_at` although they were published after its view was taken: a read may
//! then see such a batch through a tile and not through its raw edges, as a plain read of
//! several pairs can see part of such a batch while it is being published into the memtable
//! it reads; a read made after the batch is published sees all of it.
//!
//! # Bounds
//!
//! The cache is bounded by bytes (`Options::tile_cache_bytes`; quiverd gives it a sixteenth of
//! its memory budget), evicting with `quick_cache`'s policy; a tile evicted or never filled
//! is folded from the raw versions again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, OptionsBuilder, Weighter};

use crate::agg::{Accumulator, Agg};
use crate::types::{EventTime, FeatureId, SystemTime, ValueType};

/// The narrowest tile's width: one hour of event time, in microseconds.
pub const TILE_US: i64 = 3_600_000_000;
/// The tiles' widths by level: hours, then days (each a whole number of the level below).
pub const LEVEL_US: [i64; 2] = [TILE_US, 24 * TILE_US];
/// Windows narrower than this many hours are folded from raw versions alone.
pub const TILE_WINDOW_MIN_TILES: u64 = 3;
/// Windows wider than this (microseconds: 400 days) are folded from raw versions alone: the
/// registry's longest window is 366 days, and the engine's API takes any width.
pub const TILE_WINDOW_MAX_US: u64 = 400 * 86_400_000_000;
/// Bytes a tile costs beyond its key and accumulators (cache slot, `Arc`, vector headers).
const TILE_OVERHEAD_BYTES: usize = 128;
/// Typical tile size, for sizing the cache's index.
const TILE_BYTES_TYPICAL: usize = 512;
/// Suffix of a tile's cache key after the entity: feature id, level and tile index.
const KEY_SUFFIX_BYTES: usize = 4 + 1 + 8;

/// The tile of level `level` holding event time `e`: tile `i` covers `(i x w, (i + 1) x w]`
/// for the level's width `w` ([`LEVEL_US`]).
pub fn tile_of(level: usize, e: EventTime) -> i64 {
    (i128::from(e.0) - 1).div_euclid(i128::from(LEVEL_US[level])) as i64
}

/// The event-time range `(start, end]` of tile `i` of level `level`, as `(start, end)`
/// (i128: no overflow).
pub fn tile_range(level: usize, i: i64) -> (i128, i128) {
    let w = i128::from(LEVEL_US[level]);
    let start = i128::from(i) * w;
    (start, start + w)
}

/// One hour, or one day, of a pair, folded (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct Tile {
    /// The greatest system time of any version in the tile's range.
    pub max_system_time: SystemTime,
    /// The newest event time in the range whose winner holds a value.
    pub newest: Option<EventTime>,
    /// One accumulator per aggregate asked of the tile.
    pub accs: Vec<Accumulator>,
}

impl Tile {
    /// The accumulator of `agg` over a source of type `source`, if the tile holds it.
    pub fn get(&self, agg: Agg, source: ValueType) -> Option<&Accumulator> {
        self.accs.iter().find(|a| a.agg() == agg && a.source() == source)
    }

    fn bytes(&self) -> usize {
        TILE_OVERHEAD_BYTES + self.accs.iter().map(Accumulator::heap_bytes).sum::<usize>()
    }
}

#[derive(Debug, Clone, Copy)]
struct TileWeighter;

impl Weighter<Vec<u8>, Arc<Tile>> for TileWeighter {
    fn weight(&self, key: &Vec<u8>, val: &Arc<Tile>) -> u64 {
        (key.len() + val.bytes()) as u64
    }
}

/// What a reader saw of an entity's stripe before taking its view (`src/stripes.rs`).
pub(crate) type TileTicket = crate::stripes::Ticket;
/// A write announced to the tiles and not yet ended.
pub(crate) type TileWriteToken = crate::stripes::WriteToken;

/// A tile held: (entity, feature, level, tile index, tile).
pub(crate) type Held = (Vec<u8>, FeatureId, usize, i64, Arc<Tile>);

/// Counters of the tile cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TileStats {
    /// Tiles that answered a read.
    pub hits: u64,
    /// Tiles a read folded from raw versions (missing, or not valid at its `known_at`).
    pub misses: u64,
    /// Tiles inserted by readers.
    pub fills: u64,
    /// Fills refused because a write of the entity could be missing from the reader's view.
    pub fills_refused: u64,
    /// Tiles removed by writes.
    pub invalidations: u64,
    /// Tiles held.
    pub entries: u64,
    /// Approximate bytes held.
    pub bytes: u64,
}

/// The tile cache of one engine.
#[derive(Debug)]
pub(crate) struct Tiles {
    cache: Cache<Vec<u8>, Arc<Tile>, TileWeighter, DefaultHashBuilder>,
    stripes: crate::stripes::Stripes,
    hits: AtomicU64,
    misses: AtomicU64,
    fills: AtomicU64,
    fills_refused: AtomicU64,
    invalidations: AtomicU64,
    /// Feature ids never served from tiles (sorted; see the module docs).
    dropped: parking_lot::RwLock<Arc<Vec<u32>>>,
}

use crate::stripes::hash_of;

/// The cache key of tile `tile` of level `level` of `(entity, feature)` in `out` (cleared
/// first).
fn key_into(out: &mut Vec<u8>, entity: &[u8], feature: FeatureId, level: usize, tile: i64) {
    out.clear();
    out.reserve(entity.len() + KEY_SUFFIX_BYTES);
    out.extend_from_slice(entity);
    out.extend_from_slice(&feature.0.to_be_bytes());
    out.push(level as u8);
    out.extend_from_slice(&tile.to_be_bytes());
}

impl Tiles {
    /// A tile cache of about `bytes`; `None` when `bytes` is 0 (disabled: aggregates read raw
    /// versions only).
    pub fn new(bytes: usize) -> Option<Tiles> {
        if bytes == 0 {
            return None;
        }
        let options = match OptionsBuilder::new()
            .estimated_items_capacity((bytes / TILE_BYTES_TYPICAL).max(16))
            .weight_capacity(bytes as u64)
            .build()
        {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(bytes, error = ?e, "tiles disabled: their cache options were refused");
                return None;
            }
        };
        Some(Tiles {
            cache: Cache::with_options(options, TileWeighter, DefaultHashBuilder::default(), Default::default()),
            stripes: crate::stripes::Stripes::new(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            fills: AtomicU64::new(0),
            fills_refused: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            dropped: parking_lot::RwLock::new(Arc::new(Vec::new())),
        })
    }

    /// A ticket for later [`Tiles::fill`]s of `entity`; take it before the read view.
    pub fn ticket(&self, entity: &[u8]) -> TileTicket {
        self.stripes.ticket(hash_of(entity))
    }

    /// Tile `tile` of level `level` of `(entity, feature)`, if held (`key`: scratch).
    pub fn get(
        &self,
        key: &mut Vec<u8>,
        entity: &[u8],
        feature: FeatureId,
        level: usize,
        tile: i64,
    ) -> Option<Arc<Tile>> {
        key_into(key, entity, feature, level, tile);
        self.cache.get(key.as_slice())
    }

    /// Every tile held now.
    pub fn held(&self) -> Vec<Held> {
        self.cache
            .iter()
            .filter_map(|(key, tile)| {
                let (entity, suffix) = key.split_at(key.len().checked_sub(KEY_SUFFIX_BYTES)?);
                let feature = u32::from_be_bytes(suffix[..4].try_into().ok()?);
                let i = i64::from_be_bytes(suffix[5..].try_into().ok()?);
                Some((entity.to_vec(), FeatureId(feature), usize::from(suffix[4]), i, tile))
            })
            .collect()
    }

    /// Whether `tile` is still the cache's tile `i` of level `level` of `(entity, feature)`
    /// and no write of the entity began since `ticket`.
    pub fn unchanged(
        &self,
        ticket: TileTicket,
        entity: &[u8],
        feature: FeatureId,
        level: usize,
        i: i64,
        tile: &Arc<Tile>,
    ) -> bool {
        let mut key = Vec::new();
        self.stripes
            .fill(ticket, || self.get(&mut key, entity, feature, level, i).is_some_and(|t| Arc::ptr_eq(&t, tile)))
            .unwrap_or(false)
    }

    /// Counts tiles that answered and tiles folded from raw versions.
    pub fn count(&self, hits: u64, misses: u64) {
        self.hits.fetch_add(hits, Ordering::Relaxed);
        self.misses.fetch_add(misses, Ordering::Relaxed);
    }

    /// Offers tiles of level `level` of `(entity, feature)` folded from a view taken after
    /// `ticket`: each `(tile index, tile)` holding one accumulator, merged into what the cache
    /// holds of it.
    pub fn fill(&self, entity: &[u8], feature: FeatureId, level: usize, ticket: TileTicket, tiles: Vec<(i64, Tile)>) {
        if tiles.is_empty() {
            return;
        }
        if !ticket.quiet() {
            self.fills_refused.fetch_add(tiles.len() as u64, Ordering::Relaxed);
            return;
        }
        // The other aggregates a held tile has are merged in outside the stripe lock (writers
        // wait on it); the held tile is current if the fill's ticket still holds, checked
        // under the lock before anything is inserted.
        let merged: Vec<(Vec<u8>, Tile)> = tiles
            .into_iter()
            .map(|(i, mut tile)| {
                let mut key = Vec::new();
                key_into(&mut key, entity, feature, level, i);
                if let Some(old) = self.cache.peek(key.as_slice()) {
                    for a in &old.accs {
                        if tile.get(a.agg(), a.source()).is_none() {
                            tile.accs.push(a.clone());
                        }
                    }
                }
                (key, tile)
            })
            .collect();
        let n = merged.len() as u64;
        let filled = self.stripes.fill(ticket, || {
            for (key, tile) in merged {
                // Remove first: if the new tile is not admitted, no stale one may stay behind.
                self.cache.remove(key.as_slice());
                self.cache.insert(key, Arc::new(tile));
            }
        });
        match filled {
            Some(()) => self.fills.fetch_add(n, Ordering::Relaxed),
            None => self.fills_refused.fetch_add(n, Ordering::Relaxed),
        };
    }

    /// Versions of `entity` (`cells`: feature and event time) are about to be published:
    /// removes the tiles they fall in, of every level. Hand the token to [`Tiles::write_end`] once published.
    pub fn write_begin(&self, entity: &[u8], cells: impl Iterator<Item = (FeatureId, EventTime)>) -> TileWriteToken {
        let (token, ()) = self.stripes.write_begin(hash_of(entity), || {
            // Fills insert under this lock, so an empty cache has nothing of this entity.
            if self.cache.is_empty() {
                return;
            }
            let mut key = Vec::new();
            let mut last = None;
            for (f, e) in cells {
                let t = tile_of(0, e);
                if last == Some((f, t)) {
                    continue;
                }
                last = Some((f, t));
                for level in 0..LEVEL_US.len() {
                    key_into(&mut key, entity, f, level, tile_of(level, e));
                    if self.cache.remove(key.as_slice()).is_some() {
                        self.invalidations.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        token
    }

    /// The versions announced by the [`Tiles::write_begin`] that returned `token` are
    /// published (or abandoned).
    pub fn write_end(&self, token: TileWriteToken) {
        self.stripes.write_end(token);
    }

    /// Stops serving the feature ids `ids` from tiles, from now until the engine closes (the
    /// set only grows: compaction may have removed versions of an id taken out of it, which a
    /// tile could not follow). When the set grows every tile is forgotten, after the new set is
    /// published; fills in flight are refused.
    pub fn set_dropped(&self, ids: &[u32]) {
        let grew = {
            let mut d = self.dropped.write();
            let mut all: Vec<u32> = d.iter().chain(ids).copied().collect();
            all.sort_unstable();
            all.dedup();
            let grew = all.len() > d.len();
            *d = Arc::new(all);
            grew
        };
        if grew {
            self.clear();
        }
    }

    /// Whether `feature` is never served from tiles.
    pub fn is_dropped(&self, feature: FeatureId) -> bool {
        self.dropped.read().binary_search(&feature.0).is_ok()
    }

    /// Forgets every tile. Fills in flight are refused: every stripe's `gen` moves.
    pub fn clear(&self) {
        self.stripes.refuse_all(|| self.cache.clear());
    }

    /// The counters.
    pub fn stats(&self) -> TileStats {
        TileStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            fills: self.fills.load(Ordering::Relaxed),
            fills_refused: self.fills_refused.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            entries: self.cache.len() as u64,
            bytes: self.cache.weight(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_hours_open_at_their_start_and_closed_at_their_end() {
        assert_eq!(tile_of(0, EventTime(TILE_US)), 0);
        assert_eq!(tile_of(0, EventTime(TILE_US + 1)), 1);
        assert_eq!(tile_of(0, EventTime(1)), 0);
        assert_eq!(tile_of(0, EventTime(0)), -1);
        assert_eq!(tile_of(1, EventTime(25 * TILE_US)), 1);
        assert_eq!(tile_of(0, EventTime(i64::MIN)), i64::MIN / TILE_US - 1);
        assert_eq!(tile_range(0, 2), (2 * i128::from(TILE_US), 3 * i128::from(TILE_US)));
        for level in 0..LEVEL_US.len() {
            for e in [i64::MIN, -TILE_US - 1, -1, 0, 1, TILE_US, i64::MAX] {
                let (lo, hi) = tile_range(level, tile_of(level, EventTime(e)));
                assert!(lo < i128::from(e) && i128::from(e) <= hi, "{e}");
            }
        }
    }

    fn tile(agg: Agg) -> Tile {
        let acc = Accumulator::new(agg, ValueType::Int64).expect("acc");
        Tile { max_system_time: SystemTime(1), newest: None, accs: vec![acc] }
    }

    #[test]
    fn writes_remove_the_tiles_they_fall_in_and_refuse_fills_they_race() {
        let tiles = Tiles::new(1 << 20).expect("tiles");
        let (e, f) = (b"entity".as_slice(), FeatureId(7));
        let mut key = Vec::new();
        let t = tiles.ticket(e);
        tiles.fill(e, f, 0, t, vec![(0, tile(Agg::Sum)), (1, tile(Agg::Sum))]);
        tiles.fill(e, f, 1, t, vec![(0, tile(Agg::Sum))]);
        // A second aggregate of the same tile is merged in.
        tiles.fill(e, f, 0, tiles.ticket(e), vec![(0, tile(Agg::Count))]);
        let held = tiles.get(&mut key, e, f, 0, 0).expect("tile 0");
        assert!(held.get(Agg::Sum, ValueType::Int64).is_some() && held.get(Agg::Count, ValueType::Int64).is_some());
        // A write into hour 1 removes it and its day, not hour 0.
        let w = tiles.write_begin(e, [(f, EventTime(TILE_US + 5))].into_iter());
        assert!(tiles.get(&mut key, e, f, 0, 1).is_none() && tiles.get(&mut key, e, f, 1, 0).is_none());
        assert!(tiles.get(&mut key, e, f, 0, 0).is_some());
        // A ticket taken while it is in flight, or before it began, cannot fill.
        let during = tiles.ticket(e);
        tiles.write_end(w);
        tiles.fill(e, f, 0, during, vec![(1, tile(Agg::Sum))]);
        assert!(tiles.get(&mut key, e, f, 0, 1).is_none());
        let before = tiles.ticket(e);
        let w = tiles.write_begin(e, [(FeatureId(8), EventTime(1))].into_iter());
        tiles.write_end(w);
        tiles.fill(e, f, 0, before, vec![(1, tile(Agg::Sum))]);
        assert!(tiles.get(&mut key, e, f, 0, 1).is_none());
        assert_eq!(tiles.stats().fills_refused, 2);
        tiles.clear();
        assert!(tiles.get(&mut key, e, f, 0, 0).is_none());
    }
}
