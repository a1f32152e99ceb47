//! A full disk, on the simulated file system (`MemFs::set_capacity`): writes are refused with
//! `Error::NoSpace` and change nothing, reads keep working, writes resume by themselves once
//! space is freed (the failed WAL step, flush or compaction is retried), and an engine opened
//! on a full disk opens read-only instead of refusing to start. No acknowledged write is lost
//! and no refused write appears, at any capacity.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quiver_storage::fs::MemFs;
use quiver_storage::{
    AsOf, Background, Db, Durability, EventTime, FeatureId, ManualClock, Options, Value, WriteBatch, WritesRefused,
};

fn options(background: Background) -> Options {
    Options {
        memtable_bytes: 2048,
        block_bytes: 256,
        l0_compaction_trigger: 2,
        l1_bytes: 8192,
        level_multiplier: 2,
        table_bytes: 4096,
        background,
        clock: Arc::new(ManualClock::new(1_000_000)),
        ..Options::default()
    }
}

fn dir() -> &'static Path {
    Path::new("/db")
}

/// Cell `(entity i % 13, feature i % 3, event time 0)` gets the unique value `i`.
fn batch(i: u64) -> WriteBatch {
    let mut b = WriteBatch::new();
    let entity = format!("entity-{:02}", i % 13);
    b.put(entity.as_bytes(), FeatureId((i % 3) as u32), EventTime(0), Value::Int64(i as i64)).expect("valid");
    b
}

/// The cell `batch(i)` writes.
fn cell(i: u64) -> (String, u32) {
    (format!("entity-{:02}", i % 13), (i % 3) as u32)
}

/// Every cell's last acknowledged value must be what the engine serves; a refused write's value
/// must never appear.
fn check(db: &Db, acked: &BTreeMap<(String, u32), u64>, what: &str) {
    for ((entity, feature), &want) in acked {
        let got = db
            .value_at(entity.as_bytes(), FeatureId(*feature), AsOf::at(EventTime(0)))
            .unwrap_or_else(|e| panic!("{what}: read of {entity}/{feature} failed: {e}"))
            .and_then(|v| v.value);
        assert_eq!(got, Some(Value::Int64(want as i64)), "{what}: {entity}/{feature}");
    }
}

#[test]
fn writes_are_refused_and_change_nothing_at_every_capacity_then_resume() {
    let mut full_at = std::collections::BTreeSet::new();
    for capacity in (1_500..40_000).step_by(1_237) {
        let what = format!("capacity {capacity}");
        let fs = MemFs::new();
        fs.set_capacity(Some(capacity));
        let db = match Db::open_with_fs(Arc::new(fs.clone()), dir(), options(Background::Inline)) {
            Ok(db) => db,
            // Too small to hold even an empty engine: that is a clear error, not a hang.
            Err(e) => {
                assert!(e.is_no_space(), "{what}: {e}");
                continue;
            }
        };
        let mut acked = BTreeMap::new();
        let mut i = 0;
        let refused = loop {
            i += 1;
            assert!(i < 100_000, "{what}: the disk never filled");
            match db.write(batch(i), Durability::Sync) {
                Ok(_) => {
                    acked.insert(cell(i), i);
                }
                Err(e) => break e,
            }
        };
        assert!(refused.is_no_space(), "{what}: {refused}");
        full_at.insert(i);
        assert!(matches!(db.writes_refused(), Some(WritesRefused::DiskFull(_))), "{what}: {:?}", db.writes_refused());
        check(&db, &acked, &format!("{what}, full"));
        // Still full: refused again, still nothing changes.
        assert!(db.write(batch(i + 1), Durability::Sync).is_err_and(|e| e.is_no_space()), "{what}");
        check(&db, &acked, &format!("{what}, refused twice"));

        // Space is freed: the next write goes through, by itself.
        fs.set_capacity(None);
        for j in i + 2..i + 60 {
            db.write(batch(j), Durability::Sync)
                .unwrap_or_else(|e| panic!("{what}: write {j} after space returned: {e}"));
            acked.insert(cell(j), j);
        }
        db.flush().unwrap_or_else(|e| panic!("{what}: flush after space returned: {e}"));
        assert_eq!(db.writes_refused(), None, "{what}");
        check(&db, &acked, &format!("{what}, resumed"));
        db.verify().unwrap_or_else(|e| panic!("{what}: verify: {e}"));
        drop(db);
        let db = Db::open_with_fs(Arc::new(fs.clone()), dir(), options(Background::Inline))
            .unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
        check(&db, &acked, &format!("{what}, reopened"));
        db.verify().unwrap_or_else(|e| panic!("{what}: verify after reopen: {e}"));
    }
    assert!(full_at.len() > 10, "the sweep should fill the disk at many points: {full_at:?}");
}

#[test]
fn background_work_waits_for_space_and_writers_are_refused_not_stalled() {
    let fs = MemFs::new();
    let db = Db::open_with_fs(Arc::new(fs.clone()), dir(), options(Background::Threads)).expect("open");
    let mut acked = BTreeMap::new();
    for i in 1..200 {
        db.write(batch(i), Durability::Sync).expect("write");
        acked.insert(cell(i), i);
    }
    // Room for the WAL but not for much else: flushes fail, the memtables fill, and writers
    // are refused rather than left waiting for flushes that cannot happen.
    fs.set_capacity(Some(fs.used_bytes() + (64 << 10)));
    let started = Instant::now();
    let mut i = 200;
    let refused = loop {
        i += 1;
        match db.write(batch(i), Durability::Sync) {
            Ok(_) => {
                acked.insert(cell(i), i);
            }
            Err(e) => break e,
        }
        assert!(started.elapsed() < Duration::from_secs(60), "writes were never refused");
    };
    assert!(refused.is_no_space(), "{refused}");
    assert!(db.writes_refused().is_some());
    check(&db, &acked, "full");

    // Space returns: the background flush is retried and writes resume without a reopen.
    fs.set_capacity(None);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut j = i + 1;
    loop {
        match db.write(batch(j), Durability::Sync) {
            Ok(_) => {
                acked.insert(cell(j), j);
                break;
            }
            Err(e) => assert!(e.is_no_space(), "{e}"),
        }
        assert!(Instant::now() < deadline, "writes did not resume within 30 s of space returning");
        std::thread::sleep(Duration::from_millis(50));
        j += 1;
    }
    while db.writes_refused().is_some() {
        assert!(Instant::now() < deadline, "still refused: {:?}", db.writes_refused());
        std::thread::sleep(Duration::from_millis(50));
    }
    db.flush().expect("flush");
    check(&db, &acked, "resumed");
    db.verify().expect("verify");
}

#[test]
fn an_engine_opened_on_a_full_disk_serves_reads_and_refuses_writes() {
    let fs = MemFs::new();
    let mut acked = BTreeMap::new();
    {
        // Writes left in the WAL (a large memtable: nothing is flushed).
        let db = Db::open_with_fs(
            Arc::new(fs.clone()),
            dir(),
            Options { memtable_bytes: 1 << 20, ..options(Background::Inline) },
        )
        .expect("open");
        for i in 1..100 {
            db.write(batch(i), Durability::Sync).expect("write");
            acked.insert(cell(i), i);
        }
    }
    // Every amount of free space from none up: the engine opens, read-only or not, and serves
    // every acknowledged write.
    let mut read_only = 0;
    for free in [0, 1, 16, 100, 300, 700, 1_500, 4_000, 20_000] {
        let what = format!("{free} bytes free");
        let img = fs.synced_image();
        img.set_capacity(Some(img.used_bytes() + free));
        let db = Db::open_with_fs(Arc::new(img.clone()), dir(), options(Background::Inline))
            .unwrap_or_else(|e| panic!("{what}: open: {e}"));
        check(&db, &acked, &what);
        if let Some(WritesRefused::ReadOnly(_)) = db.writes_refused() {
            read_only += 1;
            let e = db.write(batch(1_000), Durability::Sync).expect_err("read-only");
            assert!(matches!(e, quiver_storage::Error::NoSpace { read_only: true, .. }), "{what}: {e}");
            check(&db, &acked, &format!("{what}, refused"));
            // Nothing on disk changed: with space, the engine opens and takes writes again.
            drop(db);
            img.set_capacity(None);
            let db = Db::open_with_fs(Arc::new(img.clone()), dir(), options(Background::Inline))
                .unwrap_or_else(|e| panic!("{what}: reopen with space: {e}"));
            assert_eq!(db.writes_refused(), None, "{what}");
            db.write(batch(1_001), Durability::Sync).expect("write with space");
            check(&db, &BTreeMap::from([(cell(1_001), 1_001)]), &what);
        }
    }
    assert!(read_only >= 2, "small amounts of free space should open read-only ({read_only} did)");
}
