//! Windowed aggregates from one read view, folded from hour and day tiles (`crate::tiles`) where they
//! answer and from raw versions elsewhere: `aggregate_at` of `storage/READS.md`, exactly.
//!
//! A window `(T - W, T]` of at least [`TILE_WINDOW_MIN_TILES`] hours is cut into the whole
//! days inside it, then the whole hours of what is left at each end, then the raw versions of
//! what is left after that (less than an hour at each end). Each whole tile comes from the
//! cache when it is there and valid at the read's `known_at`; the tiles that are not are folded
//! from one raw pass over each run of them (which also refills them, when no write of the
//! entity can be missing from the view). Tiles are never used for ranges below
//! the event-time horizon or for dropped feature ids: compaction may remove those versions,
//! which a tile could not follow.

use super::ReadView;
use std::sync::Arc;

use crate::agg::{Accumulator, AggAnswer};
use crate::iter::{MergingIter, Source};
use crate::key;
use crate::tiles::{tile_range, Tile, TileTicket, Tiles, LEVEL_US, TILE_US, TILE_WINDOW_MAX_US, TILE_WINDOW_MIN_TILES};
use crate::types::{EventTime, FeatureId, SystemTime, Value, ValueType};
use crate::{Error, Result};

use super::Inner;

/// One aggregate a [`crate::Db::aggregates_at`] read computes for every entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AggQuery {
    /// The source feature.
    pub feature: FeatureId,
    /// The type of its values.
    pub source: ValueType,
    /// The function.
    pub agg: crate::agg::Agg,
    /// The window's width, microseconds (at least 1).
    pub width_us: u64,
}

/// One version of a pair as a raw pass reads it.
struct Raw {
    event_time: EventTime,
    system_time: SystemTime,
    value: Option<Value>,
}

fn to_event(t: i128) -> EventTime {
    EventTime(t.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64)
}

/// Folds `versions` (one pair's, key order) into `acc`: each event time's first version known
/// at `known_at` wins, tombstones left out, oldest first. Returns the newest event time with a
/// value.
fn fold(versions: &[Raw], known_at: SystemTime, acc: &mut Accumulator) -> Result<Option<EventTime>> {
    let times = |v: &Raw| (v.event_time, v.system_time);
    let winners: Vec<&Raw> = crate::asof::all_winners(versions, times, known_at).collect();
    crate::agg::fold_winners(&winners, times, |v| Ok::<_, Error>(v.value.clone()), acc)
}

impl Inner {
    /// Every version of `(entity, feature)` in `view` with an event time in `(lo, hi]`, in key
    /// order (event time descending, then system time descending).
    fn pair_raw(&self, view: &ReadView, entity: &[u8], feature: FeatureId, lo: i128, hi: i128) -> Result<Vec<Raw>> {
        let mut out = Vec::new();
        if hi <= lo || hi < i128::from(i64::MIN) {
            return Ok(out);
        }
        let prefix = key::prefix(entity, feature);
        let mut merge = MergingIter::new(Source::of_view(view));
        merge.seek(&key::encode(entity, feature, to_event(hi), SystemTime::MAX))?;
        while merge.valid() {
            let k = merge.key();
            if key::prefix_of(k) != prefix.as_slice() {
                break;
            }
            let e = key::event_time_of(k);
            if i128::from(e.0) <= lo {
                break;
            }
            let (value, _) = crate::cell::decode_stored(merge.value(), key::system_time_of(k).0)
                .map_err(|w| Error::Corruption { file: "(a window read)".into(), offset: 0, what: w.to_string() })?;
            out.push(Raw { event_time: e, system_time: key::system_time_of(k), value });
            merge.step()?;
        }
        Ok(out)
    }

    /// `aggregate_at` of `q` for `entity` at `as_of`, from `view` at `known_at` (see the module
    /// docs); `ticket` was taken before the view. The raw versions each step holds in memory
    /// are offered to `charge` as they are read (false: refuse the read, `OverBudget`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn window_answer(
        &self,
        view: &ReadView,
        known_at: SystemTime,
        entity: &[u8],
        q: &AggQuery,
        as_of: EventTime,
        tiles: Option<(&Tiles, TileTicket)>,
        scratch: &mut Vec<u8>,
        charge: &mut dyn FnMut(usize) -> bool,
    ) -> Result<AggAnswer> {
        let (lo, hi) = (i128::from(as_of.0) - i128::from(q.width_us), i128::from(as_of.0));
        let tiled = tiles.filter(|(cache, _)| {
            (TILE_WINDOW_MIN_TILES * TILE_US as u64..=TILE_WINDOW_MAX_US).contains(&q.width_us)
                && !cache.is_dropped(q.feature)
        });
        let acc = Accumulator::new(q.agg, q.source)?;
        let mut w = Window { inner: self, view, known_at, entity, q, scratch, charge, acc, newest: None };
        match tiled {
            Some((cache, ticket)) => {
                // Taken after the view (see `src/tiles.rs`), without queueing behind writers.
                let horizon = i128::from(self.horizon_now.load(std::sync::atomic::Ordering::Acquire));
                w.fold_levels(cache, ticket, horizon, LEVEL_US.len(), lo, hi)?;
            }
            None => w.fold_raw(lo, hi)?,
        }
        Ok(AggAnswer { value: w.acc.value(), newest: w.newest })
    }
}

/// One aggregate of one entity being folded: pieces are merged oldest first (the cheap case
/// of every merge, `last_n`'s above all).
struct Window<'a> {
    inner: &'a Inner,
    view: &'a ReadView,
    known_at: SystemTime,
    entity: &'a [u8],
    q: &'a AggQuery,
    scratch: &'a mut Vec<u8>,
    charge: &'a mut dyn FnMut(usize) -> bool,
    acc: Accumulator,
    newest: Option<EventTime>,
}

impl Window<'_> {
    /// The raw versions of `(lo, hi]`, charged.
    fn raw(&mut self, lo: i128, hi: i128) -> Result<Vec<Raw>> {
        let raw = self.inner.pair_raw(self.view, self.entity, self.q.feature, lo, hi)?;
        let bytes = raw.len() * std::mem::size_of::<Raw>()
            + raw.iter().map(|r| r.value.as_ref().map_or(0, Value::heap_bytes)).sum::<usize>();
        if !(self.charge)(bytes) {
            return Err(Error::OverBudget("an aggregate's window is over the memory budget of its request".into()));
        }
        Ok(raw)
    }

    fn fold_raw(&mut self, lo: i128, hi: i128) -> Result<()> {
        let raw = self.raw(lo, hi)?;
        self.absorb(&raw)
    }

    /// Folds raw versions at this read's `known_at` through an accumulator of their own and
    /// merges it (adding wants event times ascending; merging takes any order).
    fn absorb(&mut self, raw: &[Raw]) -> Result<()> {
        let mut part = Accumulator::new(self.q.agg, self.q.source)?;
        let n = fold(raw, self.known_at, &mut part)?;
        self.acc.merge(&part);
        self.newest = self.newest.max(n);
        Ok(())
    }

    /// Folds `(lo, hi]` with the tiles of the levels below `levels` (the widest first), and
    /// raw versions for what no whole tile covers, oldest first. Tiles start at or above
    /// `horizon`.
    fn fold_levels(
        &mut self,
        cache: &Tiles,
        ticket: TileTicket,
        horizon: i128,
        levels: usize,
        lo: i128,
        hi: i128,
    ) -> Result<()> {
        if hi <= lo {
            return Ok(());
        }
        let Some(level) = levels.checked_sub(1) else { return self.fold_raw(lo, hi) };
        let width = i128::from(LEVEL_US[level]);
        // Whole tiles: start >= max(lo, horizon) and end <= hi.
        let from = lo.max(horizon);
        let first = from.div_euclid(width) + i128::from(from.rem_euclid(width) != 0);
        let last = hi.div_euclid(width) - 1;
        if first > last {
            return self.fold_levels(cache, ticket, horizon, level, lo, hi);
        }
        let (first, last) = (first as i64, last as i64);
        self.fold_levels(cache, ticket, horizon, level, lo, tile_range(level, first).0)?;
        let (q, known_at) = (self.q, self.known_at);
        // Each tile from the cache when it answers at known_at; runs of the others folded from
        // one raw pass each (and refilled).
        // Each tile looked up once: it answers when held, with this aggregate, known at
        // known_at. Runs of those that do not are folded from one raw pass each (and refilled).
        let held: Vec<Option<Arc<Tile>>> = (first..=last)
            .map(|i| {
                cache
                    .get(self.scratch, self.entity, q.feature, level, i)
                    .filter(|t| t.max_system_time <= known_at && t.get(q.agg, q.source).is_some())
            })
            .collect();
        let mut fills = Vec::new();
        let mut a = first;
        for run in held.chunk_by(|x, y| x.is_some() == y.is_some()) {
            let b = a + run.len() as i64 - 1;
            if run[0].is_some() {
                for t in run.iter().flatten() {
                    if let Some(acc) = t.get(q.agg, q.source) {
                        self.acc.merge(acc);
                    }
                    self.newest = self.newest.max(t.newest);
                }
                cache.count(run.len() as u64, 0);
                a = b + 1;
                continue;
            }
            cache.count(0, run.len() as u64);
            let raw = self.raw(tile_range(level, a).0, tile_range(level, b).1)?;
            // Key order is newest first: the oldest tile's versions are the run's tail.
            let mut upto = raw.len();
            for t in a..=b {
                let stop = tile_range(level, t).1;
                let from = raw[..upto].partition_point(|v| i128::from(v.event_time.0) > stop);
                let part = &raw[from..upto];
                upto = from;
                let mut full = Accumulator::new(q.agg, q.source)?;
                let tile_newest = fold(part, SystemTime::MAX, &mut full)?;
                let max_system_time = part.iter().map(|v| v.system_time).max().unwrap_or(SystemTime(0));
                if max_system_time <= known_at {
                    self.acc.merge(&full);
                    self.newest = self.newest.max(tile_newest);
                } else {
                    self.absorb(part)?;
                }
                fills.push((t, Tile { max_system_time, newest: tile_newest, accs: vec![full] }));
            }
            a = b + 1;
        }
        cache.fill(self.entity, q.feature, level, ticket, fills);
        self.fold_levels(cache, ticket, horizon, level, tile_range(level, last).1, hi)
    }
}

impl Inner {
    /// Checks every tile held against the raw versions of its range (tiles are derived data:
    /// folded again they must give the same answers). Tiles a write changes meanwhile, and
    /// tiles no read uses any more (below the horizon, or of dropped ids), are skipped.
    /// Returns how many were checked; a tile that differs is [`Error::Corruption`].
    pub(super) fn verify_tiles(&self) -> Result<u64> {
        let Some(tiles) = &self.tiles else { return Ok(0) };
        let horizon = i128::from(self.horizon_now.load(std::sync::atomic::Ordering::Acquire));
        let mut checked = 0;
        for (entity, feature, level, i, tile) in tiles.held() {
            let (lo, hi) = tile_range(level, i);
            if lo < horizon || tiles.is_dropped(feature) {
                continue;
            }
            // The ticket before the view, as a fill takes it.
            let ticket = tiles.ticket(&entity);
            let (view, _) = self.read_view(SystemTime::MAX);
            let raw = self.pair_raw(&view, &entity, feature, lo, hi)?;
            // Compaction may have removed superseded versions, never added any.
            let max_system_time = raw.iter().map(|v| v.system_time).max().unwrap_or(SystemTime(0));
            let mut same = max_system_time <= tile.max_system_time;
            for acc in &tile.accs {
                let mut again = Accumulator::new(acc.agg(), acc.source())?;
                let newest = fold(&raw, SystemTime::MAX, &mut again)?;
                // As printed: NaN answers equal NaN.
                same &= newest == tile.newest && format!("{:?}", again.value()) == format!("{:?}", acc.value());
            }
            if !tiles.unchanged(ticket, &entity, feature, level, i, &tile) {
                continue;
            }
            if !same {
                return Err(Error::corruption(
                    "(tiles)",
                    0,
                    format!("tile {i} of level {level} of feature {} differs from its raw versions", feature.0),
                ));
            }
            checked += 1;
        }
        Ok(checked)
    }
}

/// Checks a query before anything is read.
pub(super) fn check_query(q: &AggQuery) -> Result<()> {
    Accumulator::new(q.agg, q.source)?;
    if q.width_us == 0 {
        return Err(Error::InvalidArgument("an aggregate window is at least 1 microsecond wide".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agg::Agg;
    use crate::{Db, Durability, Options, WriteBatch};

    #[test]
    fn verify_folds_every_tile_again_and_finds_one_that_differs() {
        let tmp = tempfile::tempdir().expect("tmp");
        let db = Db::open(tmp.path(), Options::default()).expect("open");
        let mut batch = WriteBatch::new();
        for h in 0..12i64 {
            batch.put(b"e", FeatureId(1), EventTime(h * TILE_US + 5), Value::Int64(h)).expect("put");
        }
        db.write(batch, Durability::Async).expect("write");
        let q =
            AggQuery { feature: FeatureId(1), source: ValueType::Int64, agg: Agg::Sum, width_us: 12 * TILE_US as u64 };
        db.aggregates_at(&[b"e".to_vec()], &[q], EventTime(12 * TILE_US), SystemTime::MAX, || true, &mut |_| true)
            .expect("read");
        let tiles = db.inner.tiles.as_ref().expect("tiles");
        assert!(tiles.stats().entries >= 10);
        db.verify().expect("every tile answers as its raw versions");
        assert_eq!(db.inner.verify_tiles().expect("tiles"), tiles.stats().entries);
        // A tile that lies: hour 3 summing to 1,000.
        let mut lie = Accumulator::new(Agg::Sum, ValueType::Int64).expect("acc");
        lie.add(3 * TILE_US + 5, &Value::Int64(1_000)).expect("add");
        let t =
            Tile { max_system_time: SystemTime(u64::MAX), newest: Some(EventTime(3 * TILE_US + 5)), accs: vec![lie] };
        tiles.fill(b"e", FeatureId(1), 0, tiles.ticket(b"e"), vec![(3, t)]);
        match db.verify() {
            Err(Error::Corruption { what, .. }) => assert!(what.contains("tile 3 of level 0"), "{what}"),
            other => panic!("a tile that differs: {other:?}"),
        }
    }
}
