//! Compare-and-swap inside the engine (`Db::write_if`): its rule, its atomicity against other
//! local writes in the same commit group, and against replicated applies (issue 11's lost
//! update).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use quiver_storage::{
    cell, AsOf, Causality, CellVersion, Db, Durability, EventTime, Expectation, FeatureId, Options, ScanRange,
    ShippedBatch, ShippedOp, SystemTime, Value, VersionVector, WriteBatch, WriteIf, EXPECTATIONS_MAX,
};

const E: &[u8] = b"\x01counter";
const F: FeatureId = FeatureId(1);
const T: EventTime = EventTime(100);

fn open(dir: &std::path::Path) -> Db {
    Db::open(dir, Options { region: 1, ..Options::default() }).expect("open")
}

fn put(value: i64) -> WriteBatch {
    let mut b = WriteBatch::new();
    b.put(E, F, T, Value::Int64(value)).expect("put");
    b
}

fn expect(version: Option<VersionVector>) -> Expectation {
    Expectation { entity: E.to_vec(), feature: F, event_time: T, version }
}

/// The cell's current version at exactly `T` (tombstones included).
fn current(db: &Db) -> Option<CellVersion> {
    db.version_at(E, F, AsOf { as_of: T, known_at: SystemTime::MAX, lookback_us: Some(0) }).expect("read")
}

#[test]
fn write_if_checks_every_expectation_and_refuses_whole() {
    let tmp = tempfile::tempdir().expect("tmp");
    let db = open(tmp.path());
    // Absent cell: `None` holds.
    let first = match db.write_if(put(1), vec![expect(None)], Durability::Sync).expect("write_if") {
        WriteIf::Committed(r) => r,
        other => panic!("absent cell, None expected: {other:?}"),
    };
    assert_eq!(first.version_vector, VersionVector::single(1, first.system_time.0));
    assert_eq!(current(&db).map(|c| c.version_vector), Some(first.version_vector.clone()));
    // Present cell: `None` fails, with the current version.
    let seqno = db.last_seqno();
    match db.write_if(put(2), vec![expect(None)], Durability::Sync).expect("write_if") {
        WriteIf::Refused(m) => {
            assert_eq!(m.len(), 1);
            assert_eq!(m[0].index, 0);
            let c = m[0].current.as_ref().expect("current");
            assert_eq!(
                (c.value.clone(), c.version_vector.clone()),
                (Some(Value::Int64(1)), first.version_vector.clone())
            );
        }
        other => panic!("present cell, None expected: {other:?}"),
    }
    assert_eq!(db.last_seqno(), seqno, "a refused write writes nothing");
    // A stale vector fails; the current one holds.
    let stale = VersionVector::single(1, first.system_time.0 - 1);
    assert!(matches!(db.write_if(put(2), vec![expect(Some(stale))], Durability::Sync), Ok(WriteIf::Refused(_))));
    let second = match db.write_if(put(2), vec![expect(Some(first.version_vector.clone()))], Durability::Sync) {
        Ok(WriteIf::Committed(r)) => r,
        other => panic!("current vector expected: {other:?}"),
    };
    // Several expectations: each failed one is listed, by index; nothing is written.
    let other_cell = Expectation { entity: b"\x01other".to_vec(), feature: F, event_time: T, version: None };
    let seqno = db.last_seqno();
    match db.write_if(
        put(3),
        vec![other_cell.clone(), expect(Some(first.version_vector.clone())), other_cell],
        Durability::Sync,
    ) {
        Ok(WriteIf::Refused(m)) => assert_eq!(m.iter().map(|m| m.index).collect::<Vec<_>>(), [1]),
        other => panic!("one stale expectation: {other:?}"),
    }
    assert_eq!(db.last_seqno(), seqno);
    assert_eq!(current(&db).and_then(|c| c.value), Some(Value::Int64(2)));
    // A tombstone holds no value: `None` holds again, and its vector does not.
    let mut del = WriteBatch::new();
    del.delete(E, F, T).expect("delete");
    let deleted = match db.write_if(del, vec![expect(Some(second.version_vector))], Durability::Sync) {
        Ok(WriteIf::Committed(r)) => r,
        other => panic!("delete: {other:?}"),
    };
    match db.write_if(put(4), vec![expect(Some(deleted.version_vector))], Durability::Sync) {
        Ok(WriteIf::Refused(m)) => assert_eq!(m[0].current, None, "a tombstone is no current value"),
        other => panic!("tombstone: {other:?}"),
    }
    assert!(matches!(db.write_if(put(4), vec![expect(None)], Durability::Sync), Ok(WriteIf::Committed(_))));
    // Bad input is refused before anything happens.
    let bad_key = Expectation { entity: Vec::new(), feature: F, event_time: T, version: None };
    assert!(db.write_if(put(5), vec![bad_key], Durability::Sync).is_err());
    let too_many = vec![expect(None); EXPECTATIONS_MAX + 1];
    assert!(db.write_if(put(5), too_many, Durability::Sync).is_err());
    // An expectation survives a restart: what is checked is what is stored.
    let before = current(&db).map(|c| c.version_vector);
    drop(db);
    let db = open(tmp.path());
    assert!(matches!(db.write_if(put(6), vec![expect(before)], Durability::Sync), Ok(WriteIf::Committed(_))));
}

/// Threads increment one counter by compare-and-swap; batches of one commit group see each
/// other's writes. No increment is lost, and no two succeed over the same version.
#[test]
fn concurrent_cas_increments_lose_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let db = Arc::new(open(tmp.path()));
    let wins = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let (db, wins) = (db.clone(), wins.clone());
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                for i in 0..150 {
                    let cur = current(&db);
                    let n = match cur.as_ref().and_then(|c| c.value.clone()) {
                        Some(Value::Int64(n)) => n,
                        _ => 0,
                    };
                    let d = if (i + t) % 2 == 0 { Durability::Sync } else { Durability::Async };
                    if let WriteIf::Committed(_) =
                        db.write_if(put(n + 1), vec![expect(cur.map(|c| c.version_vector))], d).expect("write_if")
                    {
                        wins.fetch_add(1, Ordering::Relaxed);
                        mine.push(n + 1);
                    }
                }
                mine
            })
        })
        .collect();
    let mut all: Vec<i64> = handles.into_iter().flat_map(|h| h.join().expect("thread")).collect();
    let won = wins.load(Ordering::Relaxed) as i64;
    assert!(won >= 150, "at least one thread's worth of increments succeeds: {won}");
    assert_eq!(current(&db).and_then(|c| c.value), Some(Value::Int64(won)), "no increment lost");
    all.sort_unstable();
    assert_eq!(all, (1..=won).collect::<Vec<_>>(), "each value written by exactly one successful CAS");
}

/// A peer's replicated versions of a cell race local compare-and-swaps of it. Every
/// successful CAS must have been applied over exactly the version it expected: every version
/// the node held at the commit has a vector at or below the CAS's own vector, so each such
/// version (other than the CAS's) must be at or below the expected one.
#[test]
fn replicated_applies_never_slip_between_a_cas_check_and_its_commit() {
    let tmp = tempfile::tempdir().expect("tmp");
    let db = Arc::new(open(tmp.path()));
    let stop = Arc::new(AtomicBool::new(false));
    let peer = {
        let (db, stop) = (db.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut stamp = 0u64;
            let mut seqno = 0u64;
            while !stop.load(Ordering::Acquire) && seqno < 2_000 {
                seqno += 1;
                // Half the peer's versions saw the current one (they dominate it), half did
                // not (they are concurrent with it). A peer's stamp is above everything it saw.
                let seen = if seqno.is_multiple_of(2) {
                    current(&db).map(|c| c.version_vector).unwrap_or_default()
                } else {
                    VersionVector::new()
                };
                let now = quiver_testkit::now_us() as u64;
                let seen_max = seen.entries().iter().map(|e| e.1).max().unwrap_or(0);
                stamp = stamp.max(now).max(seen_max) + 1;
                let vector = seen.merge(&VersionVector::single(2, stamp));
                let mut c = Vec::new();
                cell::encode(Some(&Value::Int64(-(seqno as i64))), &vector, &mut c);
                let b = ShippedBatch {
                    origin: 2,
                    seqno,
                    system_time: SystemTime(stamp),
                    ops: vec![ShippedOp { entity: E.to_vec(), feature: F, event_time: T, cell: c }],
                };
                db.apply_replicated(&b, Durability::Async).expect("apply");
            }
        })
    };
    let mut won = Vec::new();
    let mut refused = 0;
    for i in 0..400i64 {
        let expected = current(&db).map(|c| c.version_vector);
        match db.write_if(put(i + 1), vec![expect(expected.clone())], Durability::Async).expect("write_if") {
            WriteIf::Committed(r) => won.push((expected.unwrap_or_default(), r)),
            WriteIf::Refused(_) => refused += 1,
        }
    }
    stop.store(true, Ordering::Release);
    peer.join().expect("peer");
    assert!(!won.is_empty(), "some CAS succeeded ({refused} refused)");
    let versions: Vec<CellVersion> = db
        .scan(ScanRange::entity(E))
        .expect("scan")
        .map(|i| i.expect("item").version)
        .filter(|v| v.event_time == T)
        .collect();
    let at_or_below =
        |a: &VersionVector, b: &VersionVector| matches!(a.compare(b), Causality::Before | Causality::Equal);
    for (expected, r) in &won {
        for x in &versions {
            if x.system_time == r.system_time {
                continue;
            }
            if at_or_below(&x.version_vector, &r.version_vector) {
                assert!(
                    at_or_below(&x.version_vector, expected),
                    "the CAS at {:?} expected {expected:?} but {x:?} was already there",
                    r.system_time
                );
            }
        }
    }
}
