//! Concurrency with real background threads: many writers, readers checking batch atomicity and
//! read-your-writes while flushes and compactions run, group commit sharing fsyncs, and the
//! bound on how long an `Async` write stays unsynced.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quiver_storage::fs::MemFs;
use quiver_storage::{AsOf, Db, Durability, EventTime, FeatureId, Options, ScanRange, Value, WriteBatch};

const FEATURES: u32 = 8;

fn small() -> Options {
    Options {
        memtable_bytes: 16 << 10,
        block_bytes: 512,
        l0_compaction_trigger: 2,
        l1_bytes: 64 << 10,
        level_multiplier: 4,
        table_bytes: 32 << 10,
        ..Options::default()
    }
}

/// Each batch writes the same counter to all features of one entity; a reader must never see
/// an entity whose features disagree (a partial batch), and a writer must read its own write.
#[test]
fn readers_never_see_partial_batches_while_background_work_runs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let db = Arc::new(Db::open(tmp.path(), small()).expect("open"));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let db = db.clone();
            std::thread::spawn(move || {
                for i in 0..300i64 {
                    let entity = format!("w{w}-e{}", i % 5).into_bytes();
                    let mut b = WriteBatch::new();
                    for f in 0..FEATURES {
                        b.put(&entity, FeatureId(f), EventTime(0), Value::Int64(i)).expect("put");
                    }
                    let d = if i % 2 == 0 { Durability::Sync } else { Durability::Async };
                    db.write(b, d).expect("write");
                    let got = db.value_at(&entity, FeatureId(FEATURES - 1), AsOf::at(EventTime(0))).expect("read");
                    assert_eq!(got.and_then(|v| v.value), Some(Value::Int64(i)), "read your own write");
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let db = db.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut checks = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let entities: Vec<Vec<u8>> =
                        (0..4).flat_map(|w| (0..5).map(move |e| format!("w{w}-e{e}").into_bytes())).collect();
                    let features: Vec<FeatureId> = (0..FEATURES).map(FeatureId).collect();
                    let rows = db.multi_get(&entities, &features, AsOf::at(EventTime(0))).expect("multi_get");
                    for row in rows.chunks(FEATURES as usize) {
                        let vals: Vec<_> = row.iter().map(|v| v.as_ref().and_then(|v| v.value.clone())).collect();
                        assert!(vals.windows(2).all(|w| w[0] == w[1]), "partial batch visible: {vals:?}");
                        checks += 1;
                    }
                }
                checks
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    stop.store(true, Ordering::Release);
    for r in readers {
        assert!(r.join().expect("reader") > 0);
    }
    let s = db.stats();
    assert!(s.flushes > 0 && s.compactions > 0, "background work ran: {s:?}");
    // Every fsync covers bytes no earlier one did, so there are at most as many as groups
    // (the background syncer's included: concurrent syncs coalesce).
    assert!(s.wal_syncs <= s.write_groups, "{s:?}");
    db.verify().expect("verify");
    // Every entity's last batch is complete after a reopen too.
    drop(db);
    let db = Db::open(tmp.path(), small()).expect("reopen");
    let mut n = 0;
    for item in db.scan(ScanRange::all()).expect("scan") {
        item.expect("item");
        n += 1;
    }
    assert_eq!(n, 4 * 300 * FEATURES as usize, "every version of every batch is kept");
}

/// The hot tier under races: writers append newer events (and late writes of older events)
/// while readers fill a tiny hot tier through `multi_get` and evictions churn it. A reader
/// must never see an entity's newest value go backwards or a late write win, and after the
/// writers stop every read must see each entity's last value (a stale fill would stick).
#[test]
fn hot_tier_fills_never_hide_a_newer_write() {
    let tmp = tempfile::tempdir().expect("tmp");
    let opts = Options { hot_tier_bytes: 2 << 10, ..small() };
    let db = Arc::new(Db::open(tmp.path(), opts).expect("open"));
    let stop = Arc::new(AtomicBool::new(false));
    const ENTITIES: u64 = 48;
    const WRITES: i64 = 150;
    let entity = |e: u64| format!("hot-{e}").into_bytes();
    let newest = AsOf::at(EventTime(i64::MAX));
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let db = db.clone();
            std::thread::spawn(move || {
                for i in 1..=WRITES {
                    for e in (w..ENTITIES).step_by(2) {
                        let mut b = WriteBatch::new();
                        b.put(&entity(e), FeatureId(0), EventTime(i), Value::Int64(i)).expect("put");
                        if i > 3 {
                            b.put(&entity(e), FeatureId(0), EventTime(i - 3), Value::Int64(-1)).expect("late");
                        }
                        db.write(b, Durability::Async).expect("write");
                        let got = db.multi_get(&[entity(e)], &[FeatureId(0)], newest).expect("read");
                        assert_eq!(got[0].as_ref().and_then(|v| v.value.clone()), Some(Value::Int64(i)), "own write");
                    }
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let db = db.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let all: Vec<Vec<u8>> = (0..ENTITIES).map(entity).collect();
                let mut last = vec![0i64; ENTITIES as usize];
                let mut reads = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let got = db.multi_get(&all, &[FeatureId(0)], newest).expect("multi_get");
                    for (e, v) in got.iter().enumerate() {
                        let v = match v.as_ref().and_then(|v| v.value.clone()) {
                            Some(Value::Int64(v)) => v,
                            None => 0,
                            other => panic!("unexpected {other:?}"),
                        };
                        assert!(v >= last[e], "entity {e} went back from {} to {v}", last[e]);
                        last[e] = v;
                    }
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    stop.store(true, Ordering::Release);
    for r in readers {
        assert!(r.join().expect("reader") > 0);
    }
    let all: Vec<Vec<u8>> = (0..ENTITIES).map(entity).collect();
    for _ in 0..3 {
        let got = db.multi_get(&all, &[FeatureId(0)], newest).expect("multi_get");
        assert!(got.iter().all(|v| v.as_ref().and_then(|v| v.value.clone()) == Some(Value::Int64(WRITES))), "{got:?}");
    }
    let s = db.stats().hot;
    assert!(s.hits > 0 && s.fills > 0 && s.evictions > 0, "the hot tier was exercised: {s:?}");
}

/// Concurrent sync writers share fsyncs: fewer syncs than writes.
#[test]
fn group_commit_shares_fsyncs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let db = Arc::new(Db::open(tmp.path(), Options::default()).expect("open"));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let db = db.clone();
            std::thread::spawn(move || {
                for i in 0..100 {
                    let mut b = WriteBatch::new();
                    b.put(format!("t{t}").as_bytes(), FeatureId(0), EventTime(i), Value::Int64(i)).expect("put");
                    db.write(b, Durability::Sync).expect("write");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("writer");
    }
    let s = db.stats();
    assert_eq!(s.last_seqno, 800);
    assert!(s.wal_syncs < 800, "800 sync writes from 8 threads should share fsyncs, got {}", s.wal_syncs);
}

/// An `Async` write is durable within `async_sync_interval` (checked with a simulated power
/// loss, which keeps only synced bytes).
#[test]
fn async_writes_are_synced_within_the_interval() {
    let fs = MemFs::new();
    let dir = Path::new("/db");
    let opts = Options { async_sync_interval: Duration::from_millis(20), ..Options::default() };
    let db = Db::open_with_fs(Arc::new(fs.clone()), dir, opts.clone()).expect("open");
    let mut b = WriteBatch::new();
    b.put(b"u", FeatureId(0), EventTime(1), Value::Int64(42)).expect("put");
    db.write(b, Durability::Async).expect("write");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lost = {
            let db2 = Db::open_with_fs(Arc::new(fs.synced_image()), dir, Options::default()).expect("open image");
            db2.value_at(b"u", FeatureId(0), AsOf::at(EventTime(1))).expect("read").is_none()
        };
        if !lost {
            break;
        }
        assert!(Instant::now() < deadline, "async write still not synced after 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(db);
}
