//! Tiles (`src/tiles.rs`, `src/db/window.rs`): aggregates folded from hourly tiles and raw edges
//! answer exactly as the brute-force read of every version in the window (`Db::aggregate_at`),
//! through random writes, corrections, deletes, late writes, flushes, compactions, horizon moves,
//! reopens, `known_at` pins and window edges at ±1 µs, with a tile cache that holds everything
//! or almost nothing; and writes racing reads never leave a tile behind that misses a write.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use quiver_storage::agg::{Agg, AggValue, AggWindow};
use quiver_storage::tiles::TILE_US;
use quiver_storage::{
    AggQuery, Background, Db, Durability, EventTime, FeatureId, ManualClock, Options, SystemTime, Value, ValueType,
    WriteBatch,
};
use quiver_testkit::model::{window_values, Version};

const ENTITIES: [&[u8]; 3] = [b"alice", b"bob", b"carol"];
const SLOT_US: i64 = TILE_US / 3;
/// Not a whole number of days: day tiles start 16 hours in.
const BASE: i64 = 1_800_000_000_000_000;
const AGGS: [Agg; 7] = [Agg::Count, Agg::Sum, Agg::Mean, Agg::Min, Agg::Max, Agg::LastN(3), Agg::CountDistinct];

#[derive(Debug, Clone)]
enum Op {
    /// (entity, feature, slot, -1/0/+1 µs, value or delete)
    Write(Vec<(usize, u32, i64, i64, Option<i64>)>),
    /// entity, feature, aggregate, as_of slot, -1/0/+1 µs, width in hours, width ±1 µs, known_at
    /// (an index into the receipts so far; `None`: everything).
    Read(usize, u32, usize, i64, i64, u64, i64, Option<usize>),
    Flush,
    Compact,
    Reopen,
    Horizon(i64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => prop::collection::vec(
            (0..ENTITIES.len(), 0u32..2, 0i64..200, -1i64..=1, prop::option::weighted(0.8, -50i64..50)),
            1..6
        ).prop_map(Op::Write),
        6 => (0..ENTITIES.len(), 0u32..2, 0..AGGS.len(), 0i64..220, -1i64..=1, 1u64..60, -1i64..=1, prop::option::of(0usize..40))
            .prop_map(|(e, f, a, t, d, w, dw, k)| Op::Read(e, f, a, t, d, w, dw, k)),
        1 => Just(Op::Flush),
        1 => Just(Op::Compact),
        1 => Just(Op::Reopen),
        1 => (0i64..60).prop_map(Op::Horizon),
    ]
}

/// Feature 0 holds int64 values; feature 1 float64 ones, with NaN, infinities and -0.0 among
/// them (a float sum is exact, so any grouping of tiles must round it the same).
fn value_of(feature: u32, x: i64) -> Value {
    match (feature, x) {
        (0, x) => Value::Int64(x),
        (_, 49) => Value::Float64(f64::NAN),
        (_, 48) => Value::Float64(f64::INFINITY),
        (_, -50) => Value::Float64(f64::NEG_INFINITY),
        (_, 0) => Value::Float64(-0.0),
        (_, x) => Value::Float64(x as f64 / 3.0),
    }
}

fn source_of(feature: u32) -> ValueType {
    if feature == 0 {
        ValueType::Int64
    } else {
        ValueType::Float64
    }
}

fn options(clock: &ManualClock, tile_cache_bytes: usize, hot_tier_bytes: usize) -> Options {
    Options {
        memtable_bytes: 2048,
        block_bytes: 256,
        table_bytes: 2048,
        l0_compaction_trigger: 2,
        l1_bytes: 4096,
        hot_tier_bytes,
        tile_cache_bytes,
        background: Background::Inline,
        clock: Arc::new(clock.clone()),
        ..Options::default()
    }
}

fn run(tile_cache_bytes: usize, hot_tier_bytes: usize, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(1_000_000);
    let open = || Db::open(tmp.path(), options(&clock, tile_cache_bytes, hot_tier_bytes)).expect("open");
    let mut db = open();
    let mut versions: std::collections::HashMap<(usize, u32), Vec<Version<Value>>> = Default::default();
    let mut receipts: Vec<u64> = Vec::new();
    let mut horizon = i64::MIN;
    for op in ops {
        match op {
            Op::Write(cells) => {
                let mut batch = WriteBatch::new();
                let mut written = Vec::new();
                for (e, f, slot, d, v) in cells {
                    let t = BASE + slot * SLOT_US + d;
                    if t < horizon || written.iter().any(|(e2, f2, t2, _)| (*e2, *f2, *t2) == (e, f, t)) {
                        continue;
                    }
                    let v = v.map(|x| value_of(f, x));
                    match &v {
                        Some(x) => batch.put(ENTITIES[e], FeatureId(f), EventTime(t), x.clone()).expect("put"),
                        None => batch.delete(ENTITIES[e], FeatureId(f), EventTime(t)).expect("delete"),
                    }
                    written.push((e, f, t, v));
                }
                if written.is_empty() {
                    continue;
                }
                clock.advance(7);
                let r = db.write(batch, Durability::Async).expect("write");
                receipts.push(r.system_time.0);
                for (e, f, t, v) in written {
                    versions.entry((e, f)).or_default().push(Version {
                        event_time: t,
                        system_time: r.system_time.0,
                        value: v,
                    });
                }
            }
            Op::Read(e, f, a, slot, d, hours, dw, k) => {
                let as_of = EventTime(BASE + slot * SLOT_US + d);
                let width = (hours as i64 * TILE_US + dw) as u64;
                let known_at = k.and_then(|k| receipts.get(k)).map_or(SystemTime::MAX, |&s| SystemTime(s));
                let q = AggQuery { feature: FeatureId(f), source: source_of(f), agg: AGGS[a], width_us: width };
                let got = db
                    .aggregates_at(&[ENTITIES[e].to_vec()], &[q], as_of, known_at, || true, &mut |_| true)
                    .expect("tiled read");
                let got = got[0].as_ref().expect("read")[0].clone();
                let w = AggWindow { as_of, width_us: width, known_at };
                let brute = db.aggregate_at(ENTITIES[e], FeatureId(f), source_of(f), AGGS[a], w).expect("brute");
                let same = match (&got.value, &brute) {
                    (AggValue::Float(x), AggValue::Float(y)) => {
                        x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
                    }
                    // Lists may hold NaN: compared as printed.
                    (x, y) => format!("{x:?}") == format!("{y:?}"),
                };
                prop_assert!(same, "{:?} of {}/{} over {:?}: {:?} vs {:?}", AGGS[a], e, f, w, got.value, brute);
                // Below the horizon compaction may have forgotten versions the model keeps.
                if i128::from(as_of.0) - i128::from(width) >= i128::from(horizon) {
                    let model = versions.get(&(e, f)).map(Vec::as_slice).unwrap_or_default();
                    let newest = window_values(model, as_of.0, width, known_at.0).last().map(|(t, _)| EventTime(*t));
                    prop_assert_eq!(got.newest, newest, "newest of {:?} of {}/{} over {:?}", AGGS[a], e, f, w);
                }
            }
            Op::Flush => db.flush().expect("flush"),
            Op::Compact => db.compact_all().expect("compact"),
            Op::Reopen => {
                drop(db);
                db = open();
            }
            Op::Horizon(slot) => {
                let t = BASE + slot * SLOT_US;
                if t > horizon {
                    db.set_event_horizon(EventTime(t)).expect("horizon");
                    horizon = t;
                }
            }
        }
    }
    // Every tile still held folds again to the same answers (`Db::verify`).
    db.verify().expect("verify");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn tiled_aggregates_answer_as_the_raw_versions(
        cache in prop_oneof![Just(0usize), Just(600), Just(1 << 20)],
        hot in prop_oneof![Just(0usize), Just(1 << 20)],
        ops in prop::collection::vec(op(), 1..120),
    ) {
        run(cache, hot, ops)?;
    }
}

/// Tiles are reused by the next read and removed by a write into their hour.
#[test]
fn a_second_read_uses_the_tiles_and_a_write_replaces_only_its_hour() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let db = Db::open(tmp.path(), Options { background: Background::Inline, ..Options::default() }).expect("open");
    let mut batch = WriteBatch::new();
    for i in 0..2_000i64 {
        batch.put(b"e", FeatureId(1), EventTime(BASE + i * 10_000_000), Value::Int64(i)).expect("put");
    }
    db.write(batch, Durability::Async).expect("write");
    let q = AggQuery { feature: FeatureId(1), source: ValueType::Int64, agg: Agg::Sum, width_us: 5 * TILE_US as u64 };
    let as_of = EventTime(BASE + 1_999 * 10_000_000);
    let read = || {
        let r = db.aggregates_at(&[b"e".to_vec()], &[q], as_of, SystemTime::MAX, || true, &mut |_| true).expect("read");
        r[0].as_ref().expect("read")[0].value.clone()
    };
    let first = read();
    let s1 = db.stats().tiles;
    assert!(s1.fills >= 4 && s1.hits == 0, "{s1:?}");
    assert_eq!(read(), first);
    let s2 = db.stats().tiles;
    assert_eq!((s2.hits - s1.hits, s2.misses - s1.misses), (s1.misses, 0), "every tile answered: {s2:?}");
    // A correction inside the window: its hour is folded again, and the answer moves by it.
    let mut batch = WriteBatch::new();
    batch.put(b"e", FeatureId(1), EventTime(BASE + 1_000 * 10_000_000), Value::Int64(1_000_000)).expect("put");
    db.write(batch, Durability::Async).expect("write");
    let s3 = db.stats().tiles;
    assert_eq!(s3.invalidations - s2.invalidations, 1);
    match (first, read()) {
        (quiver_storage::agg::AggValue::Int(a), quiver_storage::agg::AggValue::Int(b)) => {
            assert_eq!(b - a, 1_000_000 - 1_000)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(db.stats().tiles.misses - s3.misses, 1, "only the written hour is folded again");
}

/// Writers racing tiled readers: afterwards every tile still held answers as the raw versions
/// (a fill that missed a write would stay behind and differ).
#[test]
fn tiles_filled_while_writes_race_never_miss_a_write() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let db = Arc::new(Db::open(tmp.path(), Options::default()).expect("open"));
    let q = AggQuery { feature: FeatureId(1), source: ValueType::Int64, agg: Agg::Sum, width_us: 30 * TILE_US as u64 };
    let as_of = EventTime(BASE + 30 * TILE_US);
    // Tiles held from the start (of an empty history), so the writes below must remove them.
    db.aggregates_at(&[b"e".to_vec()], &[q], as_of, SystemTime::MAX, || true, &mut |_| true).expect("read");
    assert!(db.stats().tiles.entries > 0);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (db, stop) = (db.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    db.aggregates_at(&[b"e".to_vec()], &[q], as_of, SystemTime::MAX, || true, &mut |_| true)
                        .expect("read");
                }
            })
        })
        .collect();
    let mut x = 17u64;
    for i in 0..3_000i64 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let t = BASE + (x >> 33) as i64 % (30 * TILE_US);
        let mut batch = WriteBatch::new();
        batch.put(b"e", FeatureId(1), EventTime(t), Value::Int64(i)).expect("put");
        db.write(batch, Durability::Async).expect("write");
        // Quiet moments, so readers fill tiles that later writes must remove.
        if i % 20 == 0 {
            std::thread::sleep(Duration::from_micros(300));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.join().expect("reader");
    }
    let tiled = db.aggregates_at(&[b"e".to_vec()], &[q], as_of, SystemTime::MAX, || true, &mut |_| true).expect("read");
    let w = AggWindow { as_of, width_us: q.width_us, known_at: SystemTime::MAX };
    let brute = db.aggregate_at(b"e", FeatureId(1), ValueType::Int64, Agg::Sum, w).expect("brute");
    assert_eq!(tiled[0].as_ref().expect("read")[0].value, brute);
    let s = db.stats().tiles;
    assert!(s.invalidations > 0, "writes removed tiles: {s:?}");
}

/// A batch replicated from another region (versions with that region's stamps, applied after
/// tiles were filled) removes the tiles it falls in like a local write.
#[test]
fn replicated_writes_remove_the_tiles_they_fall_in() {
    let (tmp_a, tmp_b) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let opts = |region: u32| Options {
        region,
        replication_log_bytes: 1 << 30,
        background: Background::Inline,
        ..Options::default()
    };
    let (a, b) = (Db::open(tmp_a.path(), opts(1)).expect("a"), Db::open(tmp_b.path(), opts(2)).expect("b"));
    let q = AggQuery { feature: FeatureId(1), source: ValueType::Int64, agg: Agg::Sum, width_us: 10 * TILE_US as u64 };
    let as_of = EventTime(BASE + 10 * TILE_US);
    let write = |db: &Db, t: i64, v: i64| {
        let mut batch = WriteBatch::new();
        batch.put(b"e", FeatureId(1), EventTime(BASE + t), Value::Int64(v)).expect("put");
        db.write(batch, Durability::Async).expect("write");
    };
    for h in 0..10 {
        write(&b, h * TILE_US + 1, 1);
    }
    let read = |db: &Db| {
        let r = db.aggregates_at(&[b"e".to_vec()], &[q], as_of, SystemTime::MAX, || true, &mut |_| true).expect("read");
        r[0].as_ref().expect("read")[0].value.clone()
    };
    assert_eq!(read(&b), quiver_storage::agg::AggValue::Int(10));
    assert!(b.stats().tiles.entries > 0);
    // Region 1 writes into hour 3 and corrects hour 5's event; region 2 applies both.
    write(&a, 3 * TILE_US + 7, 100);
    write(&a, 5 * TILE_US + 1, 1_000);
    for batch in a.origin_log(0, usize::MAX).expect("log") {
        b.apply_replicated(&batch, Durability::Async).expect("apply");
    }
    let w = AggWindow { as_of, width_us: q.width_us, known_at: SystemTime::MAX };
    let brute = b.aggregate_at(b"e", FeatureId(1), ValueType::Int64, Agg::Sum, w).expect("brute");
    assert_eq!(read(&b), brute);
    assert!(b.stats().tiles.invalidations >= 2, "{:?}", b.stats().tiles);
}
