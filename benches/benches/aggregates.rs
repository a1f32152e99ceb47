//! Online windowed aggregates (issue 17): 10 aggregate features of one entity whose source has
//! 10,000 events within the window, folded from hourly tiles against the same read with tiles
//! off (every version of the window read and folded), same data, same run.
//!
//! Run: `cargo bench -p quiver-bench --bench aggregates`. Data lives in a temp directory on the
//! local disk, flushed and compacted into tables; the block cache is warm.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use quiver_bench::{entity, Rng};
use quiver_storage::agg::Agg;
use quiver_storage::{
    AggQuery, Db, Durability, EventTime, FeatureId, Options, SystemTime, Value, ValueType, WriteBatch,
};

const ENTITIES: u64 = 100;
const EVENTS: i64 = 10_000;
/// One event a minute: 10,000 events span just under 7 days.
const STEP_US: i64 = 60_000_000;
const DAY_US: u64 = 86_400_000_000;
const START: i64 = 1_800_000_000_000_000;

fn queries() -> Vec<AggQuery> {
    let q = |agg, days: u64| AggQuery { feature: FeatureId(1), source: ValueType::Int64, agg, width_us: days * DAY_US };
    vec![
        q(Agg::Sum, 7),
        q(Agg::Count, 7),
        q(Agg::Mean, 7),
        q(Agg::Min, 7),
        q(Agg::Max, 7),
        q(Agg::Sum, 1),
        q(Agg::Count, 1),
        q(Agg::Mean, 3),
        q(Agg::Max, 3),
        q(Agg::LastN(5), 7),
    ]
}

fn loaded(tile_cache_bytes: usize) -> (tempfile::TempDir, Db) {
    let tmp = tempfile::tempdir().expect("tmp");
    let db = Db::open(tmp.path(), Options { tile_cache_bytes, ..Options::default() }).expect("open");
    let mut rng = Rng::new(3);
    for e in 0..ENTITIES {
        let mut batch = WriteBatch::new();
        for i in 0..EVENTS {
            let v = rng.below(1_000) as i64;
            batch.put(&entity(e), FeatureId(1), EventTime(START + i * STEP_US), Value::Int64(v)).expect("put");
        }
        db.write(batch, Durability::Async).expect("write");
    }
    db.compact_all().expect("compact");
    (tmp, db)
}

fn online(c: &mut Criterion) {
    let as_of = EventTime(START + EVENTS * STEP_US);
    let qs = queries();
    let mut g = c.benchmark_group("aggregates");
    g.throughput(Throughput::Elements(qs.len() as u64));
    for (name, bytes) in [("online_10_aggs_raw", 0usize), ("online_10_aggs_tiles", 256 << 20)] {
        let (_tmp, db) = loaded(bytes);
        let mut rng = Rng::new(7);
        // Warm the block cache and (with tiles) every entity's tiles.
        for e in 0..ENTITIES {
            db.aggregates_at(&[entity(e)], &qs, as_of, SystemTime::MAX, || true, &mut |_| true).expect("read");
        }
        g.bench_function(name, |b| {
            b.iter(|| {
                let e = entity(rng.below(ENTITIES));
                db.aggregates_at(&[e], &qs, as_of, SystemTime::MAX, || true, &mut |_| true).expect("read")
            })
        });
        eprintln!("{name}: tiles {:?}", db.stats().tiles);
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = online
}
criterion_main!(benches);
