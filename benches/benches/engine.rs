//! Engine benchmarks: batch writes (sync and async), point as-of reads, a 50-feature
//! multi-get of one entity, and range-scan throughput.
//!
//! Run: `cargo bench -p quiver-bench --bench engine`. Data lives in a temp directory on the
//! local disk; reads run against data flushed and compacted into tables with a warm block cache.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use quiver_bench::{entity, load, Rng, FEATURES};
use quiver_storage::{AsOf, Db, Durability, EventTime, FeatureId, Options, ScanRange, Value, WriteBatch};

const ENTITIES: u64 = 20_000;
const VERSIONS: i64 = 3;

fn writes(c: &mut Criterion) {
    let mut g = c.benchmark_group("write");
    g.throughput(Throughput::Elements(u64::from(FEATURES) * 2));
    // Baseline on the same disk in the same run: append one batch's worth of bytes and
    // fdatasync, which is the floor under a single writer's sync batch.
    {
        use std::io::Write;
        let tmp = tempfile::tempdir().expect("tmp");
        let mut f = std::fs::File::create(tmp.path().join("baseline")).expect("file");
        let buf = vec![7u8; 100 * 40];
        g.bench_function("baseline_append_fdatasync", |b| {
            b.iter(|| {
                f.write_all(&buf).expect("write");
                f.sync_data().expect("sync");
            })
        });
    }
    for (name, d) in [("batch100_async", Durability::Async), ("batch100_sync", Durability::Sync)] {
        let tmp = tempfile::tempdir().expect("tmp");
        let db = Db::open(tmp.path(), Options::default()).expect("open");
        let mut i = 0u64;
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    i += 1;
                    let mut batch = WriteBatch::new();
                    for e in [i * 2, i * 2 + 1] {
                        for f in 0..FEATURES {
                            batch
                                .put(&entity(e), FeatureId(f), EventTime(i as i64), Value::Float32(f as f32))
                                .expect("put");
                        }
                    }
                    batch
                },
                |batch| db.write(batch, d).expect("write"),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn loaded(hot_tier_bytes: usize) -> (tempfile::TempDir, Db) {
    let tmp = tempfile::tempdir().expect("tmp");
    let db = Db::open(tmp.path(), Options { hot_tier_bytes, ..Options::default() }).expect("open");
    load(&db, ENTITIES, VERSIONS).expect("load");
    db.compact_all().expect("compact");
    (tmp, db)
}

fn reads(c: &mut Criterion) {
    // Without a hot tier: the engine's own read path (memtables, blooms, block cache).
    let (_tmp, db) = loaded(0);
    let mut rng = Rng::new(7);
    let q = AsOf::at(EventTime(VERSIONS * 1_000_000));
    // Warm the block cache.
    for e in 0..ENTITIES {
        db.value_at(&entity(e), FeatureId(0), q).expect("read");
    }
    let mut g = c.benchmark_group("read");
    g.throughput(Throughput::Elements(1));
    g.bench_function("point_as_of", |b| {
        b.iter(|| {
            let e = entity(rng.below(ENTITIES));
            let f = FeatureId(rng.below(u64::from(FEATURES)) as u32);
            db.value_at(&e, f, q).expect("read").expect("present")
        })
    });
    let features: Vec<FeatureId> = (0..FEATURES).map(FeatureId).collect();
    g.throughput(Throughput::Elements(u64::from(FEATURES)));
    g.bench_function("multi_get_1x50", |b| {
        b.iter(|| {
            let e = vec![entity(rng.below(ENTITIES))];
            db.multi_get(&e, &features, q).expect("multi_get")
        })
    });
    // The same with every pair in the hot tier (it holds the whole data set here).
    let (_tmp_hot, hot) = loaded(512 << 20);
    for _ in 0..2 {
        for e in 0..ENTITIES {
            hot.multi_get(&[entity(e)], &features, q).expect("multi_get");
        }
    }
    g.bench_function("multi_get_1x50_hot", |b| {
        b.iter(|| {
            let e = vec![entity(rng.below(ENTITIES))];
            hot.multi_get(&e, &features, q).expect("multi_get")
        })
    });
    eprintln!("hot tier: {:?}", hot.stats().hot);
    let span = 100u64;
    g.throughput(Throughput::Elements(span * u64::from(FEATURES) * VERSIONS as u64));
    g.bench_function("scan_100_entities_all_versions", |b| {
        b.iter(|| {
            let start = rng.below(ENTITIES - span);
            let mut r = ScanRange::all();
            r.entity_start = entity(start);
            r.entity_end = Some(entity(start + span));
            let n = db.scan(r).expect("scan").count();
            assert_eq!(n as u64, span * u64::from(FEATURES) * VERSIONS as u64);
            n
        })
    });
    g.finish();
    let s = db.stats();
    eprintln!(
        "block cache: {} hits, {} misses, {} bytes",
        s.block_cache_hits, s.block_cache_misses, s.block_cache_bytes
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = writes, reads
}
criterion_main!(benches);
