//! Simulated power loss at every I/O step (SQLite-style crash-point enumeration).
//!
//! A deterministic workload (inline flushes and compactions, small memtables, mixed sync and
//! async batches) runs on the simulated file system, which kills the "process" at step k. The
//! disk image a power loss would leave (synced bytes, a random prefix of unsynced ones, only
//! durable directory entries) is reopened and checked:
//! - it opens, and every table the manifest references exists and verifies;
//! - the batches present are a prefix 0..m of the log, each complete (no partial batch);
//! - every batch acknowledged in `Sync` mode is in that prefix.
//!
//! For a sample of crash points the recovery itself is then crashed at each of its own steps,
//! and the result reopened and checked again.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use quiver_storage::fs::MemFs;
use quiver_storage::{
    Background, Db, Durability, EventTime, FeatureId, ManualClock, Options, ScanRange, Value, WriteBatch,
};

const BATCHES: usize = 40;
const OPS_PER_BATCH: usize = 3;

fn options() -> Options {
    Options {
        memtable_bytes: 1500,
        block_bytes: 128,
        l0_compaction_trigger: 2,
        l1_bytes: 4096,
        level_multiplier: 2,
        table_bytes: 2048,
        background: Background::Inline,
        clock: Arc::new(ManualClock::new(1_000_000)),
        ..Options::default()
    }
}

fn dir() -> &'static Path {
    Path::new("/db")
}

/// Runs the workload until the first error. Returns the batches acknowledged as synced.
fn workload(fs: &MemFs) -> Vec<usize> {
    let mut acked = Vec::new();
    let Ok(db) = Db::open_with_fs(Arc::new(fs.clone()), dir(), options()) else { return acked };
    for i in 0..BATCHES {
        let mut b = WriteBatch::new();
        for j in 0..OPS_PER_BATCH {
            let entity = format!("entity-{}", (i + j) % 7);
            let value = Value::Int64((i * 100 + j) as i64);
            b.put(entity.as_bytes(), FeatureId(j as u32), EventTime((i % 5) as i64), value).expect("valid batch");
        }
        let sync = i % 3 != 0;
        match db.write(b, if sync { Durability::Sync } else { Durability::Async }) {
            Ok(_) if sync => acked.push(i),
            Ok(_) => {}
            Err(_) => return acked,
        }
        let extra = match i {
            11 | 23 => db.flush(),
            30 => db.compact_all(),
            _ => Ok(()),
        };
        if extra.is_err() {
            return acked;
        }
    }
    acked
}

/// Opens an image and checks the recovery properties. Returns the number of batches present.
fn check(img: &MemFs, acked: &[usize], what: &str) -> usize {
    let db = Db::open_with_fs(Arc::new(img.clone()), dir(), options())
        .unwrap_or_else(|e| panic!("{what}: recovery failed: {e}"));
    db.verify().unwrap_or_else(|e| panic!("{what}: verify failed: {e}"));
    let mut batches: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for item in db.scan(ScanRange::all()).expect("scan") {
        let item = item.unwrap_or_else(|e| panic!("{what}: scan failed: {e}"));
        let Some(Value::Int64(v)) = item.version.value else { panic!("{what}: unexpected value") };
        batches.entry(v as usize / 100).or_default().push(v as usize % 100);
    }
    let present: Vec<usize> = batches.keys().copied().collect();
    assert_eq!(
        present,
        (0..present.len()).collect::<Vec<_>>(),
        "{what}: batches present are not a prefix: {present:?}"
    );
    for (b, ops) in &batches {
        assert_eq!(ops.len(), OPS_PER_BATCH, "{what}: batch {b} is partial: {ops:?}");
    }
    if let Some(&last) = acked.last() {
        assert!(present.len() > last, "{what}: acknowledged batch {last} lost; present {present:?}");
    }
    present.len()
}

#[test]
fn crash_at_every_step_recovers_a_complete_prefix() {
    let full = MemFs::new();
    let acked_all = workload(&full);
    assert_eq!(acked_all.len(), (0..BATCHES).filter(|i| i % 3 != 0).count(), "clean run acknowledges everything");
    let steps = full.steps();
    assert!(steps > 200, "workload too small to be interesting: {steps} steps");
    assert_eq!(check(&full.crash_image(0), &acked_all, "clean run"), BATCHES);

    let mut recovered_sizes = std::collections::BTreeSet::new();
    for k in 1..=steps {
        let fs = MemFs::new();
        fs.set_crash_at(Some(k));
        let acked = workload(&fs);
        assert!(fs.crashed(), "step {k} of {steps} was never reached");
        for seed in 0..2 {
            let img = fs.crash_image(k * 31 + seed);
            let n = check(&img, &acked, &format!("crash at step {k}, seed {seed}"));
            recovered_sizes.insert(n);
            if k % 17 == 0 && seed == 0 {
                crash_during_recovery(&img, &acked, k);
            }
        }
    }
    assert!(recovered_sizes.len() > 10, "crash points should cover many prefixes: {recovered_sizes:?}");
}

/// Crashes the recovery of `img` at each of its steps and checks the image that leaves.
fn crash_during_recovery(img: &MemFs, acked: &[usize], k: u64) {
    let probe = img.crash_image(0);
    drop(Db::open_with_fs(Arc::new(probe.clone()), dir(), options()).expect("open"));
    let open_steps = probe.steps();
    for j in 1..=open_steps {
        let fs = img.crash_image(0);
        fs.set_crash_at(Some(j));
        let _ = Db::open_with_fs(Arc::new(fs.clone()), dir(), options());
        check(&fs.crash_image(j), acked, &format!("crash at step {k}, then at recovery step {j}"));
    }
}
