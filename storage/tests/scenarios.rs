//! Hand-picked scenarios: regressions and behaviours random tests reach only rarely.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quiver_storage::fs::MemFs;
use quiver_storage::{
    AsOf, Background, Db, Durability, Error, EventTime, FeatureId, ManualClock, Options, ScanRange, SystemTime, Value,
    WriteBatch,
};

fn opts(clock: &ManualClock, window: Option<u64>) -> Options {
    Options {
        memtable_bytes: 1 << 20,
        l0_compaction_trigger: 100,
        l0_stop_writes: 200,
        retention_window: window.map(Duration::from_micros),
        background: Background::Inline,
        clock: Arc::new(clock.clone()),
        ..Options::default()
    }
}

fn put(db: &Db, entity: &[u8], f: u32, e: i64, v: Option<i64>) -> SystemTime {
    let mut b = WriteBatch::new();
    match v {
        Some(v) => b.put(entity, FeatureId(f), EventTime(e), Value::Int64(v)).expect("put"),
        None => b.delete(entity, FeatureId(f), EventTime(e)).expect("delete"),
    }
    db.write(b, Durability::Sync).expect("write").system_time
}

fn int(db: &Db, entity: &[u8], f: u32, q: AsOf) -> Option<i64> {
    match db.value_at(entity, FeatureId(f), q).expect("read").and_then(|v| v.value) {
        Some(Value::Int64(i)) => Some(i),
        None => None,
        other => panic!("unexpected value {other:?}"),
    }
}

#[test]
fn settled_tombstone_is_kept_while_an_older_late_write_sits_above_it() {
    let clock = ManualClock::new(1_000);
    let fs = MemFs::new();
    let o = Options { l0_compaction_trigger: 2, ..opts(&clock, Some(10)) };
    let db = Db::open_with_fs(Arc::new(fs.clone()), Path::new("/db"), o.clone()).expect("open");
    put(&db, b"u", 1, 5, Some(1));
    put(&db, b"u", 1, 10, None); // absent from event time 10 on
    db.flush().expect("flush");
    put(&db, b"v", 1, 5, Some(1));
    db.flush().expect("flush");
    put(&db, b"w", 1, 5, Some(1)); // runs the due L0 -> L1 compaction: the tombstone is in L1
    assert_eq!(db.stats().levels[1].tables, 1);
    clock.advance(100);
    put(&db, b"u", 1, 3, Some(7)); // a late write of an older event
    db.flush().expect("flush"); // ... now in L0, above the tombstone
    db.set_event_horizon(EventTime(20)).expect("horizon");
    clock.advance(100);
    db.close().expect("close");
    // Reopen with a tiny L1 target so that L1 -> L2 (the bottom) is due.
    let db = Db::open_with_fs(Arc::new(fs), Path::new("/db"), Options { l1_bytes: 1, ..o }).expect("reopen");
    assert_eq!(int(&db, b"u", 1, AsOf::at(EventTime(25))), None);
    db.compact_pending().expect("compact");
    assert!(db.stats().levels[2..].iter().any(|l| l.tables > 0), "L1 -> L2 ran: {:?}", db.stats());
    assert_eq!(int(&db, b"u", 1, AsOf::at(EventTime(25))), None, "tombstone must still shadow the late write");
    db.compact_all().expect("compact all");
    assert_eq!(int(&db, b"u", 1, AsOf::at(EventTime(25))), None);
}

#[test]
fn retention_drops_superseded_versions_and_keeps_answers() {
    let clock = ManualClock::new(1_000);
    let db = Db::open_with_fs(Arc::new(MemFs::new()), Path::new("/db"), opts(&clock, Some(50))).expect("open");
    for i in 0..10 {
        put(&db, b"u", 1, 100, Some(i)); // ten corrections of one cell
        clock.advance(10);
    }
    clock.advance(1_000);
    let q = AsOf::at(EventTime(100));
    db.compact_all().expect("compact");
    assert_eq!(int(&db, b"u", 1, q), Some(9));
    let s = db.stats();
    assert_eq!(s.entries_dropped, 9, "nine superseded, settled versions go");
    assert_eq!(s.levels.iter().map(|l| l.entries).sum::<u64>(), 1);
}

#[test]
fn no_retention_window_keeps_every_version() {
    let clock = ManualClock::new(1_000);
    let db = Db::open_with_fs(Arc::new(MemFs::new()), Path::new("/db"), opts(&clock, None)).expect("open");
    let mut stamps = Vec::new();
    for i in 0..5 {
        stamps.push(put(&db, b"u", 1, 100, Some(i)));
        clock.advance(1_000_000);
    }
    db.compact_all().expect("compact");
    for (i, s) in stamps.iter().enumerate() {
        let q = AsOf { as_of: EventTime(100), known_at: *s, lookback_us: None };
        assert_eq!(int(&db, b"u", 1, q), Some(i as i64), "as known at {s:?}");
    }
    let all: Vec<_> = db.scan(ScanRange::entity(b"u")).expect("scan").collect::<Result<_, _>>().expect("items");
    assert_eq!(all.len(), 5);
    assert!(all.windows(2).all(|w| w[0].version.system_time > w[1].version.system_time));
}

#[test]
fn lookback_and_known_at_bounds_are_inclusive() {
    let clock = ManualClock::new(1_000);
    let db = Db::open_with_fs(Arc::new(MemFs::new()), Path::new("/db"), opts(&clock, None)).expect("open");
    let s = put(&db, b"u", 1, 100, Some(1));
    let q = |as_of, known_at, lookback| AsOf {
        as_of: EventTime(as_of),
        known_at: SystemTime(known_at),
        lookback_us: lookback,
    };
    assert_eq!(int(&db, b"u", 1, q(100, s.0, Some(0))), Some(1));
    assert_eq!(int(&db, b"u", 1, q(110, s.0, Some(10))), Some(1));
    assert_eq!(int(&db, b"u", 1, q(111, s.0, Some(10))), None);
    assert_eq!(int(&db, b"u", 1, q(99, s.0, None)), None);
    assert_eq!(int(&db, b"u", 1, q(100, s.0 - 1, None)), None);
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let clock = ManualClock::new(1_000);
    let db = Db::open_with_fs(Arc::new(MemFs::new()), Path::new("/db"), opts(&clock, None)).expect("open");
    assert!(matches!(db.write(WriteBatch::new(), Durability::Sync), Err(Error::InvalidArgument(_))));
    db.set_event_horizon(EventTime(50)).expect("horizon");
    let mut b = WriteBatch::new();
    b.put(b"u", FeatureId(1), EventTime(60), Value::Int64(1)).expect("put");
    b.put(b"u", FeatureId(2), EventTime(40), Value::Int64(2)).expect("put");
    let err = db.write(b, Durability::Sync).expect_err("below horizon");
    assert!(err.to_string().contains("horizon"), "{err}");
    assert_eq!(int(&db, b"u", 1, AsOf::at(EventTime(100))), None, "the rejected batch wrote nothing");
    assert!(matches!(db.set_event_horizon(EventTime(10)), Err(Error::InvalidArgument(_))));
    let mut r = ScanRange::all();
    r.event_time_min = EventTime(5);
    r.event_time_max = EventTime(4);
    assert!(matches!(db.scan(r), Err(Error::InvalidArgument(_))));
    assert!(matches!(db.value_at(b"", FeatureId(1), AsOf::at(EventTime(0))), Err(Error::InvalidArgument(_))));
}

#[test]
fn batch_is_all_or_nothing_for_readers_and_shares_one_stamp() {
    let clock = ManualClock::new(1_000);
    let db = Db::open_with_fs(Arc::new(MemFs::new()), Path::new("/db"), opts(&clock, None)).expect("open");
    let mut b = WriteBatch::new();
    for f in 0..50 {
        b.put(b"u", FeatureId(f), EventTime(1), Value::Float32(f as f32)).expect("put");
    }
    let r = db.write(b, Durability::Async).expect("write");
    let all: Vec<_> = db.scan(ScanRange::entity(b"u")).expect("scan").collect::<Result<_, _>>().expect("items");
    assert_eq!(all.len(), 50);
    assert!(all.iter().all(|i| i.version.system_time == r.system_time));
    let got = db
        .multi_get(&[b"u".to_vec()], &(0..50).map(FeatureId).collect::<Vec<_>>(), AsOf::at(EventTime(1)))
        .expect("mg");
    assert!(got.iter().all(Option::is_some));
}

#[test]
fn a_directory_opens_in_one_engine_at_a_time() {
    let tmp = tempfile::tempdir().expect("tmp");
    let db = Db::open(tmp.path(), Options::default()).expect("open");
    assert!(matches!(Db::open(tmp.path(), Options::default()), Err(Error::InUse { .. })));
    db.close().expect("close");
    Db::open(tmp.path(), Options::default()).expect("reopen after close");
}

#[test]
fn a_scan_keeps_its_files_alive_through_compaction() {
    let tmp = tempfile::tempdir().expect("tmp");
    let clock = ManualClock::new(1_000);
    let db = Db::open(tmp.path(), opts(&clock, None)).expect("open");
    for i in 0..20 {
        put(&db, format!("e{i:02}").as_bytes(), 1, 0, Some(i));
        if i % 5 == 4 {
            db.flush().expect("flush");
        }
    }
    let tables = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(tmp.path())
            .expect("dir")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".sst"))
            .collect();
        v.sort();
        v
    };
    let before = tables();
    assert_eq!(before.len(), 4);
    let mut scan = db.scan(ScanRange::all()).expect("scan");
    let first = scan.next().expect("item").expect("ok");
    assert_eq!(first.entity, b"e00");
    db.compact_all().expect("compact");
    let during = tables();
    assert!(before.iter().all(|t| during.contains(t)), "files a reader holds are not deleted");
    let rest: Vec<_> = scan.by_ref().collect::<Result<_, _>>().expect("rest of scan");
    assert_eq!(rest.len(), 19);
    drop(scan);
    let after = tables();
    assert!(before.iter().all(|t| !after.contains(t)), "released files are deleted: {after:?}");
    assert_eq!(after.len(), 1);
}

/// Regression (review): a pair's old value sits alone at the start of a bottom-level table that
/// does not overlap the compaction's key range (a newer tombstone of the same pair sorts
/// *before* it), so the compaction counts as "bottom"; the tombstone must still be kept.
#[test]
fn tombstone_is_kept_while_a_lower_table_holds_the_pair() {
    let clock = ManualClock::new(1_000);
    let o = Options {
        table_bytes: 1, // one pair per table
        l1_bytes: 1,
        level_multiplier: 2,
        l0_compaction_trigger: 1,
        l0_stop_writes: 8,
        ..opts(&clock, Some(10))
    };
    let db = Db::open_with_fs(Arc::new(MemFs::new()), Path::new("/db"), o).expect("open");
    put(&db, b"u", 1, 1, Some(11));
    db.flush().expect("flush");
    db.compact_pending().expect("compact"); // cascades to the last level
    put(&db, b"u", 1, 4, None); // absent from event time 4 on
    clock.advance(100);
    db.set_event_horizon(EventTime(10)).expect("horizon");
    db.flush().expect("flush");
    assert_eq!(int(&db, b"u", 1, AsOf::at(EventTime(20))), None);
    db.compact_pending().expect("compact"); // L0 -> L1: no overlap below, by full keys
    assert_eq!(int(&db, b"u", 1, AsOf::at(EventTime(20))), None, "the tombstone still hides the old value");
    db.compact_all().expect("compact all");
    assert_eq!(int(&db, b"u", 1, AsOf::at(EventTime(20))), None);
}

#[test]
fn options_that_could_stall_or_make_no_sense_are_refused() {
    let clock = ManualClock::new(1_000);
    let base = opts(&clock, None);
    for bad in [
        Options { l0_compaction_trigger: 4, l0_stop_writes: 4, ..base.clone() },
        Options { l0_compaction_trigger: 0, ..base.clone() },
        Options { memtable_bytes: 0, ..base.clone() },
        Options { level_multiplier: 1, ..base.clone() },
        Options { compression: quiver_storage::Compression::Zstd(99), ..base.clone() },
    ] {
        let r = Db::open_with_fs(Arc::new(MemFs::new()), Path::new("/db"), bad);
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    }
}

#[test]
fn checkpoint_is_a_consistent_copy_that_opens_alone_and_verifies_offline() {
    let tmp = tempfile::tempdir().expect("tmp");
    let clock = ManualClock::new(1_000);
    let db = Db::open(tmp.path().join("db"), opts(&clock, None)).expect("open");
    for i in 0..50 {
        put(&db, format!("e{i:02}").as_bytes(), 1, i, Some(i));
        if i == 20 {
            db.flush().expect("flush");
        }
    }
    let cp = tmp.path().join("cp");
    db.checkpoint(&cp).expect("checkpoint");
    put(&db, b"after", 1, 0, Some(1));
    db.compact_all().expect("compact"); // the checkpoint's links keep its tables alive
    assert!(matches!(db.checkpoint(&cp), Err(Error::InvalidArgument(_))), "target must be new");
    let report = quiver_storage::verify_dir(&quiver_storage::fs::RealFs, &cp).expect("offline verify");
    assert_eq!(report.table_entries, 50);
    assert_eq!(report.wal_batches, 0);
    let copy = Db::open(&cp, opts(&clock, None)).expect("checkpoint opens");
    for i in 0..50 {
        assert_eq!(int(&copy, format!("e{i:02}").as_bytes(), 1, AsOf::at(EventTime(100))), Some(i));
    }
    assert_eq!(int(&copy, b"after", 1, AsOf::at(EventTime(100))), None, "later writes are not in it");
    drop(copy);
    // The live directory, once closed, verifies offline too (its WAL included).
    put(&db, b"in-wal", 1, 0, Some(2));
    db.close().expect("close");
    let report = quiver_storage::verify_dir(&quiver_storage::fs::RealFs, &tmp.path().join("db")).expect("verify");
    assert_eq!(report.wal_batches, 1);
    assert!(report.torn_tail.is_none());
}

#[test]
fn a_snapshot_reads_one_moment_through_later_writes_and_compactions() {
    let clock = ManualClock::new(1_000);
    let db = Db::open_with_fs(Arc::new(MemFs::new()), Path::new("/db"), opts(&clock, None)).expect("open");
    put(&db, b"u", 1, 10, Some(1));
    let snap = db.snapshot();
    put(&db, b"u", 1, 10, Some(2));
    put(&db, b"u", 2, 10, Some(3));
    db.compact_all().expect("compact");
    let q = AsOf::at(EventTime(10));
    assert_eq!(snap.value_at(b"u", FeatureId(1), q).expect("read").and_then(|v| v.value), Some(Value::Int64(1)));
    assert!(snap.value_at(b"u", FeatureId(2), q).expect("read").is_none());
    assert_eq!(int(&db, b"u", 1, q), Some(2));
}

#[test]
fn compact_range_applies_retention_to_the_range_and_keeps_every_answer() {
    let clock = ManualClock::new(1_000);
    let db = Db::open_with_fs(Arc::new(MemFs::new()), Path::new("/db"), opts(&clock, Some(50))).expect("open");
    let entities: [&[u8]; 5] = [b"a", b"b", b"c", b"d", b"e"];
    let versions = |db: &Db, e: &[u8]| db.scan(ScanRange::entity(e)).expect("scan").count();
    // Older corrections in one L1 table, newer ones in one L0 table per entity.
    for round in 0..2 {
        for e in entities {
            for i in 0..5 {
                put(&db, e, 1, 100, Some(round * 5 + i));
                clock.advance(1);
            }
            if round == 1 {
                db.flush().expect("flush");
            }
        }
        if round == 0 {
            db.compact_all().expect("compact");
        }
    }
    assert_eq!(db.stats().levels[0].tables, 5);
    clock.advance(1_000); // every version settled
    let q = AsOf::at(EventTime(100));
    assert!(db.compact_range(b"c", Some(b"b")).is_err(), "an empty range is refused");
    assert_eq!(db.stats().entries_dropped, 0, "and changes nothing");
    db.compact_range(b"b", Some(b"d")).expect("compact range");
    for e in entities {
        assert_eq!(int(&db, e, 1, q), Some(9), "answer for {e:?}");
    }
    assert_eq!(versions(&db, b"b"), 1, "b is compacted down to its settled newest version");
    assert_eq!(versions(&db, b"c"), 1);
    // d's newer versions sit in an L0 table outside the range: untouched.
    assert!(versions(&db, b"d") >= 5);
    assert_eq!(db.stats().levels[0].tables, 3, "a, d and e keep their L0 tables");
    db.compact_range(b"d", None).expect("compact to the end");
    assert_eq!(versions(&db, b"d"), 1);
    assert_eq!(versions(&db, b"e"), 1);
    assert!(versions(&db, b"a") >= 5);
    db.verify().expect("verify");
}

/// Opens `dir` on the real file system with no hot tier and no block cache, so every block a
/// read needs comes through `backend`.
fn open_cold(dir: &Path, backend: quiver_storage::sstable::IoBackend) -> Db {
    let opts = Options {
        block_bytes: 256,
        hot_tier_bytes: 0,
        block_cache_bytes: 0,
        io_backend: backend,
        background: Background::Inline,
        ..Options::default()
    };
    Db::open(dir, opts).expect("open")
}

#[test]
fn a_batch_lookup_reads_its_blocks_in_one_io_uring_round_and_one_pread_each_otherwise() {
    use quiver_storage::sstable::IoBackend;
    let tmp = tempfile::tempdir().expect("tempdir");
    let entity = |i: usize| format!("user-{i:04}").into_bytes();
    {
        let db = open_cold(tmp.path(), IoBackend::Auto);
        let mut b = WriteBatch::new();
        for i in 0..400 {
            for f in 0..5u32 {
                b.put(&entity(i), FeatureId(f), EventTime(10), Value::Int64((i * 10) as i64 + i64::from(f)))
                    .expect("put");
            }
        }
        db.write(b, Durability::Sync).expect("write");
        db.compact_all().expect("compact");
        db.close().expect("close");
    }
    let entities: Vec<Vec<u8>> = (0..400).step_by(4).map(entity).collect();
    let features: Vec<FeatureId> = (0..5).map(FeatureId).collect();
    for backend in [IoBackend::IoUring, IoBackend::Pread] {
        let db = open_cold(tmp.path(), backend);
        let before = db.stats().ssd;
        let got = db.multi_get(&entities, &features, AsOf::at(EventTime(i64::MAX))).expect("multi_get");
        let after = db.stats().ssd;
        for (k, v) in got.iter().enumerate() {
            let (i, f) = ((k / 5) * 4, k % 5);
            assert_eq!(
                v.as_ref().and_then(|v| v.value.clone()),
                Some(Value::Int64((i * 10 + f) as i64)),
                "{backend:?}"
            );
        }
        let (reads, rounds) = (after.block_reads - before.block_reads, after.read_rounds - before.read_rounds);
        let direct_ok = {
            use std::os::unix::fs::OpenOptionsExt;
            let mut o = std::fs::OpenOptions::new();
            o.read(true).custom_flags(libc::O_DIRECT).open(tmp.path().join("LOCK")).is_ok()
        };
        assert_eq!(after.direct, direct_ok, "{backend:?}: O_DIRECT is used exactly where the file system takes it");
        assert!(reads >= 20, "{backend:?}: 100 spread entities should need many blocks, read {reads}");
        match backend {
            IoBackend::IoUring => {
                assert_eq!(after.backend, "io_uring");
                assert_eq!(rounds, 1, "io_uring: one round for {reads} blocks");
            }
            _ => {
                assert_eq!(after.backend, "pread");
                assert_eq!(rounds, reads, "pread: one call per block");
            }
        }
        db.close().expect("close");
    }
}

#[test]
fn a_corrupt_block_read_by_either_backend_is_an_error_naming_the_table() {
    use quiver_storage::sstable::IoBackend;
    let tmp = tempfile::tempdir().expect("tempdir");
    {
        let db = open_cold(tmp.path(), IoBackend::Auto);
        let mut b = WriteBatch::new();
        for i in 0..50 {
            b.put(format!("e{i:03}").as_bytes(), FeatureId(1), EventTime(5), Value::Int64(i)).expect("put");
        }
        db.write(b, Durability::Sync).expect("write");
        db.compact_all().expect("compact");
        db.close().expect("close");
    }
    let table = std::fs::read_dir(tmp.path())
        .expect("list")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "sst"))
        .expect("a table");
    let mut bytes = std::fs::read(&table).expect("read table");
    bytes[40] ^= 0x10; // inside the first data block
    std::fs::write(&table, &bytes).expect("write table");
    for backend in [IoBackend::IoUring, IoBackend::Pread] {
        let db = open_cold(tmp.path(), backend);
        let entities: Vec<Vec<u8>> = (0..50).map(|i| format!("e{i:03}").into_bytes()).collect();
        match db.multi_get(&entities, &[FeatureId(1)], AsOf::at(EventTime(i64::MAX))) {
            Err(Error::Corruption { file, .. }) => assert_eq!(file, table, "{backend:?}"),
            other => panic!("{backend:?}: a flipped block bit gave {other:?}"),
        }
        match db.value_at(b"e000", FeatureId(1), AsOf::at(EventTime(i64::MAX))) {
            Err(e) => assert!(e.is_corruption(), "{backend:?}: {e}"),
            Ok(v) => panic!("{backend:?}: a flipped block bit gave {v:?}"),
        }
        db.close().expect("close");
    }
}

#[test]
fn a_charged_multi_read_stops_at_its_budget_and_otherwise_answers_the_same() {
    // From the hot tier (pass 1) and without it (tables and memtables, pass 3).
    for hot_tier_bytes in [64 << 20, 0] {
        charged_multi_read(hot_tier_bytes);
    }
}

fn charged_multi_read(hot_tier_bytes: usize) {
    let clock = ManualClock::new(1_000);
    let o = Options { hot_tier_bytes, ..opts(&clock, None) };
    let db = Db::open_with_fs(Arc::new(MemFs::new()), Path::new("/db"), o).expect("open");
    let big = "x".repeat(20_000);
    let entities: Vec<Vec<u8>> = (0..10u8).map(|i| vec![b'e', i]).collect();
    for (i, e) in entities.iter().enumerate() {
        let mut b = WriteBatch::new();
        for f in 0..3 {
            b.put(e, FeatureId(f), EventTime(10), Value::String(big.clone())).expect("put");
        }
        db.write(b, Durability::Sync).expect("write");
        if i == 4 {
            db.flush().expect("flush"); // half from tables, half from the memtable
        }
    }
    let features = [FeatureId(0), FeatureId(1), FeatureId(2), FeatureId(1)];
    let q = AsOf { as_of: EventTime(100), known_at: SystemTime::MAX, lookback_us: None };
    let plain = db.multi_version_at(&entities, &features, q).expect("read");
    let mut charged = 0usize;
    let same = db
        .multi_version_at_charged(&entities, &features, q, &mut |b| {
            charged += b;
            true
        })
        .expect("read");
    assert_eq!(same, plain);
    assert!(charged >= 40 * 20_000, "every value is charged, repeats included: {charged}");
    let mut calls = 0;
    let mut budget = 100_000usize;
    let over = db.multi_version_at_charged(&entities, &features, q, &mut |b| {
        calls += 1;
        budget = budget.saturating_sub(b);
        budget > 0
    });
    assert!(matches!(over, Err(Error::OverBudget(_))), "{over:?}");
    let most = if hot_tier_bytes == 0 { entities.len() + 2 } else { 2 };
    assert!(calls <= most, "the read stops at the first entity past the budget ({calls} charges)");
}

#[test]
fn a_batch_read_under_a_past_deadline_answers_from_the_hot_tier_and_marks_the_rest_unread() {
    use quiver_storage::sstable::IoBackend;
    let tmp = tempfile::tempdir().expect("tempdir");
    let entity = |i: usize| format!("user-{i:04}").into_bytes();
    {
        let db = open_cold(tmp.path(), IoBackend::Auto);
        let mut b = WriteBatch::new();
        for i in 0..50 {
            for f in 0..3u32 {
                b.put(&entity(i), FeatureId(f), EventTime(10), Value::Int64((i * 10) as i64 + i64::from(f)))
                    .expect("put");
            }
        }
        db.write(b, Durability::Sync).expect("write");
        db.compact_all().expect("compact");
        db.close().expect("close");
    }
    // Reopened with a hot tier: it is not complete (the tables hold what it has not seen).
    let db =
        Db::open(tmp.path(), Options { hot_tier_bytes: 1 << 20, background: Background::Inline, ..Options::default() })
            .expect("open");
    let features: Vec<FeatureId> = (0..3).map(FeatureId).collect();
    let q = AsOf::at(EventTime(i64::MAX));
    // Entity 7 read twice (the tier's doorkeeper fills on a second miss): its pairs are in the
    // hot tier now.
    for _ in 0..2 {
        db.multi_version_at(&[entity(7)], &features, q).expect("warm");
    }
    let entities = vec![entity(7), entity(8), entity(9)];
    let value = |v: &Option<quiver_storage::CellVersion>| v.as_ref().and_then(|v| v.value.clone());
    let past = std::time::Instant::now() - std::time::Duration::from_millis(1);
    let read = db.multi_version_at_within(&entities, &features, q, &mut |_| true, Some(past)).expect("read");
    let expect_unread: Vec<bool> = (0..9).map(|k| k >= 3).collect();
    assert_eq!(read.unread, expect_unread, "the hot tier's pairs are read, the others are not");
    for f in 0..3 {
        assert_eq!(value(&read.versions[f]), Some(Value::Int64(70 + f as i64)));
        assert_eq!(read.versions[3 + f], None);
    }
    // Without a deadline (or with one far off) every pair is read, the same as before.
    let far = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for deadline in [None, Some(far)] {
        let read = db.multi_version_at_within(&entities, &features, q, &mut |_| true, deadline).expect("read");
        assert!(read.unread.is_empty(), "{deadline:?}");
        assert_eq!(read.versions, db.multi_version_at(&entities, &features, q).expect("read"));
        assert_eq!(value(&read.versions[8]), Some(Value::Int64(92)));
    }
    assert!(db.stats().ssd.round_latency_us > 0 || db.stats().ssd.read_rounds == 0);
}

#[test]
fn dropped_features_leave_at_the_next_compaction_and_only_they_do() {
    let clock = ManualClock::new(1_000);
    let db = Db::open_with_fs(Arc::new(MemFs::new()), Path::new("/db"), opts(&clock, None)).expect("open");
    for (f, v) in [(3, 30), (4, 40)] {
        put(&db, b"u", f, 100, Some(v));
        put(&db, b"w", f, 100, Some(v + 1));
    }
    let mut b = WriteBatch::new();
    b.put(b"\x00reg\x00x", FeatureId(3), EventTime(0), Value::Int64(9)).expect("put");
    db.write(b, Durability::Sync).expect("write");
    db.set_dropped_features(&[FeatureId(3)]);
    let q = AsOf::at(EventTime(100));
    assert_eq!(int(&db, b"u", 3, q), Some(30), "nothing leaves before a compaction rewrites it");
    db.compact_all().expect("compact");
    assert_eq!((int(&db, b"u", 3, q), int(&db, b"w", 3, q)), (None, None));
    assert_eq!((int(&db, b"u", 4, q), int(&db, b"w", 4, q)), (Some(40), Some(41)));
    assert_eq!(int(&db, b"\x00reg\x00x", 3, AsOf::at(EventTime(0))), Some(9), "reserved keys stay");
    // An emptied set drops nothing more.
    db.set_dropped_features(&[]);
    put(&db, b"u", 3, 200, Some(31));
    db.compact_all().expect("compact");
    assert_eq!(int(&db, b"u", 3, AsOf::at(EventTime(200))), Some(31));
}
