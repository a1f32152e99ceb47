//! Replication between engines (`REPLICATION.md`): three engines, one per region, write
//! concurrently to the same cells and ship their logs to each other in random interleavings,
//! with duplicates, reopens and flushes. After everything is delivered, every engine must hold
//! the same winner of every cell, and that winner must be the rule's: the version with the
//! greatest (system time, region), with the join of every version's vector.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use quiver_storage::fs::MemFs;
use quiver_storage::{
    cell, AsOf, Background, Causality, Db, Durability, Error, EventTime, FeatureId, ManualClock, Options, ShippedBatch,
    SystemTime, Value, VersionVector, WriteBatch,
};

const REGIONS: usize = 3;
const ENTITIES: [&[u8]; 2] = [b"\x01ann", b"\x01bob"];

type Cell = (usize, u32, i64);

#[derive(Debug, Clone)]
enum Op {
    /// Region `r` writes a batch.
    Write {
        r: usize,
        cells: Vec<(Cell, Option<i64>)>,
    },
    /// Region `to` applies the next `n` batches of `from`'s log it has not applied.
    Deliver {
        to: usize,
        from: usize,
        n: usize,
        sync: bool,
        /// Applied as one group (`apply_replicated_batches`) rather than one by one.
        group: bool,
    },
    /// Region `to` receives again a batch of `from` it already applied.
    Redeliver {
        to: usize,
        from: usize,
        pick: prop::sample::Index,
    },
    /// Region `to` applies a snapshot of `from`, in parts of `part` versions (as a peer behind
    /// the retained log is bootstrapped).
    Bootstrap {
        to: usize,
        from: usize,
        part: usize,
    },
    Reopen(usize),
    Flush(usize),
    /// Region `r`'s wall clock moves (the clocks drift apart, and sometimes meet).
    Advance {
        r: usize,
        d: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let cell = (0..ENTITIES.len(), 0u32..2, 0i64..3);
    prop_oneof![
        4 => (0..REGIONS, prop::collection::vec((cell, prop::option::weighted(0.85, 0i64..100)), 1..4))
            .prop_map(|(r, cells)| Op::Write { r, cells }),
        4 => (0..REGIONS, 0..REGIONS, 1usize..5, any::<bool>(), any::<bool>())
            .prop_map(|(to, from, n, sync, group)| Op::Deliver { to, from, n, sync, group }),
        1 => (0..REGIONS, 0..REGIONS, any::<prop::sample::Index>()).prop_map(|(to, from, pick)| Op::Redeliver { to, from, pick }),
        1 => (0..REGIONS, 0..REGIONS, 1usize..5).prop_map(|(to, from, part)| Op::Bootstrap { to, from, part }),
        1 => (0..REGIONS).prop_map(Op::Reopen),
        1 => (0..REGIONS).prop_map(Op::Flush),
        1 => (0..REGIONS, 0u64..3).prop_map(|(r, d)| Op::Advance { r, d }),
    ]
}

struct Region {
    fs: MemFs,
    clock: ManualClock,
    db: Option<Db>,
    /// Every batch this region wrote, as shipped, in order.
    outbox: Vec<ShippedBatch>,
}

fn options(r: usize, clock: &ManualClock, hot: bool) -> Options {
    Options {
        // Region 0 ships from memory, region 1 from the WAL only, region 2 from a tail that
        // holds a few batches.
        replication_tail_bytes: [1 << 20, 0, 300][r % 3],
        region: r as u32,
        memtable_bytes: 2048,
        // Flushed WAL segments stay for the shipper.
        replication_log_bytes: 1 << 30,
        block_bytes: 128,
        hot_tier_bytes: if hot { 1 << 16 } else { 0 },
        l0_compaction_trigger: 2,
        l1_bytes: 4096,
        table_bytes: 2048,
        background: Background::Inline,
        clock: Arc::new(clock.clone()),
        ..Options::default()
    }
}

impl Region {
    fn db(&self) -> &Db {
        self.db.as_ref().expect("open")
    }
    fn open(&mut self, r: usize, hot: bool) {
        self.db = Some(
            Db::open_with_fs(Arc::new(self.fs.clone()), Path::new("/db"), options(r, &self.clock, hot)).expect("open"),
        );
    }
}

/// The cell's winner at one region: (system time, value, vector).
fn winner(db: &Db, (e, f, t): Cell) -> Option<(u64, Option<Value>, VersionVector)> {
    let q = AsOf { as_of: EventTime(t), known_at: SystemTime::MAX, lookback_us: Some(0) };
    db.version_at(ENTITIES[e], FeatureId(f), q).expect("read").map(|v| (v.system_time.0, v.value, v.version_vector))
}

/// A batch's writes, the last of each cell (the one that counts).
fn last_writes(b: &ShippedBatch) -> BTreeMap<Cell, &[u8]> {
    let mut last = BTreeMap::new();
    for op in &b.ops {
        let e = ENTITIES.iter().position(|x| *x == op.entity.as_slice()).expect("entity");
        last.insert((e, op.feature.0, op.event_time.0), op.cell.as_slice());
    }
    last
}

/// Every cell's winner at one region.
fn winners(db: &Db) -> Vec<Option<(u64, Option<Value>, VersionVector)>> {
    all_cells().into_iter().map(|c| winner(db, c)).collect()
}

/// No rollback: every cell's winning vector at `db` only grew since `before`.
fn no_rollback(db: &Db, before: Vec<Option<(u64, Option<Value>, VersionVector)>>) -> Result<(), TestCaseError> {
    for (c, was) in all_cells().into_iter().zip(before) {
        if let (Some(was), Some(now)) = (was, winner(db, c)) {
            prop_assert!(
                matches!(was.2.compare(&now.2), Causality::Before | Causality::Equal),
                "cell {c:?} rolled back from {was:?} to {now:?}"
            );
        }
    }
    Ok(())
}

fn all_cells() -> Vec<Cell> {
    let mut out = Vec::new();
    for e in 0..ENTITIES.len() {
        for f in 0..2 {
            for t in 0..3 {
                out.push((e, f, t));
            }
        }
    }
    out
}

fn run(ops: Vec<Op>, hot: bool) -> Result<(), TestCaseError> {
    let mut regions: Vec<Region> = (0..REGIONS)
        .map(|_| Region { fs: MemFs::new(), clock: ManualClock::new(1_000_000), db: None, outbox: Vec::new() })
        .collect();
    for (r, region) in regions.iter_mut().enumerate() {
        region.open(r, hot);
    }
    let deliver = |regions: &mut Vec<Region>,
                   to: usize,
                   from: usize,
                   n: usize,
                   sync: bool,
                   group: bool|
     -> Result<(), TestCaseError> {
        let cursor = regions[to].db().replication_cursor(from as u32).expect("cursor");
        let next: Vec<ShippedBatch> =
            regions[from].outbox.iter().filter(|b| b.seqno > cursor).take(n).cloned().collect();
        if group {
            // One group, with a batch already applied in it (a redelivery) when there is one.
            let mut batches: Vec<ShippedBatch> =
                regions[from].outbox.iter().filter(|b| b.seqno == cursor).cloned().collect();
            batches.extend(next.iter().cloned());
            // And, interleaved, the next batches of a third region, so one group resolves versions of
            // different origins against each other.
            let other = 3 - to - from;
            let other_cursor = regions[to].db().replication_cursor(other as u32).expect("cursor");
            let others: Vec<ShippedBatch> =
                regions[other].outbox.iter().filter(|b| b.seqno > other_cursor).take(2).cloned().collect();
            for (k, b) in others.iter().enumerate() {
                batches.insert((2 * k + 1).min(batches.len()), b.clone());
            }
            let before = winners(regions[to].db());
            let durability = if sync { Durability::Sync } else { Durability::Async };
            let reports = regions[to].db().apply_replicated_batches(&batches, durability).expect("apply group");
            prop_assert_eq!(reports.len(), batches.len());
            for (b, r) in batches.iter().zip(&reports) {
                if b.origin == from as u32 {
                    prop_assert_eq!(r.already_applied, b.seqno <= cursor);
                } else {
                    prop_assert!(!r.already_applied);
                }
            }
            if let Some(last) = others.last() {
                prop_assert_eq!(regions[to].db().replication_cursor(other as u32).expect("cursor"), last.seqno);
            }
            if let Some(last) = next.last() {
                prop_assert_eq!(regions[to].db().replication_cursor(from as u32).expect("cursor"), last.seqno);
            }
            no_rollback(regions[to].db(), before)?;
            return Ok(());
        }
        for b in next {
            let before = winners(regions[to].db());
            let report = regions[to]
                .db()
                .apply_replicated(&b, if sync { Durability::Sync } else { Durability::Async })
                .expect("apply");
            prop_assert!(!report.already_applied);
            prop_assert_eq!(regions[to].db().replication_cursor(from as u32).expect("cursor"), b.seqno);
            no_rollback(regions[to].db(), before)?;
        }
        Ok(())
    };
    for op in ops {
        match op {
            Op::Write { r, cells } => {
                let mut b = WriteBatch::new();
                for ((e, f, t), v) in cells {
                    match v {
                        Some(v) => b.put(ENTITIES[e], FeatureId(f), EventTime(t), Value::Int64(v)).expect("put"),
                        None => b.delete(ENTITIES[e], FeatureId(f), EventTime(t)).expect("delete"),
                    }
                }
                let region = &mut regions[r];
                region.db().write(b, Durability::Async).expect("write");
                // The shipper reads the log from where it stopped; flushes and reopens since
                // then must not have dropped what it still needs.
                let after = region.outbox.last().map_or(0, |b| b.seqno);
                let shipped = region.db().origin_log(after, usize::MAX).expect("origin log");
                prop_assert_eq!(shipped.len(), 1, "one new local batch");
                prop_assert!(shipped.iter().all(|b| b.origin == r as u32));
                region.outbox.extend(shipped);
            }
            Op::Deliver { to, from, n, sync, group } if to != from => deliver(&mut regions, to, from, n, sync, group)?,
            Op::Deliver { .. } => {}
            Op::Redeliver { to, from, pick } if to != from => {
                let cursor = regions[to].db().replication_cursor(from as u32).expect("cursor");
                let applied: Vec<_> = regions[from].outbox.iter().filter(|b| b.seqno <= cursor).collect();
                if !applied.is_empty() {
                    let b = pick.get(&applied);
                    let before = winners(regions[to].db());
                    let report = regions[to].db().apply_replicated(b, Durability::Async).expect("apply");
                    prop_assert!(report.already_applied, "a batch below the cursor is not applied again");
                    let after: Vec<_> = all_cells().into_iter().map(|c| winner(regions[to].db(), c)).collect();
                    prop_assert_eq!(before, after);
                }
            }
            Op::Redeliver { .. } => {}
            Op::Bootstrap { to, from, part } if to != from => {
                let reader = regions[from].db().replication_snapshot().expect("snapshot");
                let through = reader.through();
                let versions: Vec<_> = reader.collect::<Result<_, _>>().expect("snapshot reads");
                let before = winners(regions[to].db());
                let cursor = regions[to].db().replication_cursor(from as u32).expect("cursor");
                let parts: Vec<&[quiver_storage::SnapshotVersion]> = versions.chunks(part).collect();
                for (i, p) in parts.iter().enumerate() {
                    let last = (i + 1 == parts.len()).then_some(through);
                    regions[to].db().apply_snapshot(from as u32, p, last, Durability::Async).expect("apply part");
                }
                if parts.is_empty() {
                    regions[to].db().apply_snapshot(from as u32, &[], Some(through), Durability::Async).expect("end");
                }
                prop_assert_eq!(regions[to].db().replication_cursor(from as u32).expect("cursor"), cursor.max(through));
                for (c, was) in all_cells().into_iter().zip(before) {
                    let now = winner(regions[to].db(), c);
                    if let Some(was) = was {
                        let now = now.expect("a bootstrap removes nothing");
                        prop_assert!(
                            matches!(was.2.compare(&now.2), Causality::Before | Causality::Equal),
                            "cell {c:?} rolled back from {was:?} to {now:?}"
                        );
                    }
                }
                // Everything `from` held is now held (or superseded) at `to`.
                for c in all_cells() {
                    if let (Some(theirs), Some(ours)) = (winner(regions[from].db(), c), winner(regions[to].db(), c)) {
                        // Superseded, or concurrent and lost (the winner took the merged vector).
                        prop_assert!(
                            matches!(theirs.2.compare(&ours.2), Causality::Before | Causality::Equal),
                            "cell {c:?}: {theirs:?} at {from} but {ours:?} at {to}"
                        );
                    } else {
                        prop_assert!(winner(regions[from].db(), c).is_none(), "cell {c:?} missing at {to}");
                    }
                }
            }
            Op::Bootstrap { .. } => {}
            Op::Reopen(r) => {
                let region = &mut regions[r];
                let cursors: Vec<u64> =
                    (0..REGIONS).map(|o| region.db().replication_cursor(o as u32).expect("cursor")).collect();
                let knowledge = region.db().knowledge();
                region.db.take().expect("open").close().expect("close");
                region.open(r, hot);
                let again: Vec<u64> =
                    (0..REGIONS).map(|o| region.db().replication_cursor(o as u32).expect("cursor")).collect();
                prop_assert_eq!(cursors, again, "cursors survive a reopen");
                prop_assert_eq!(knowledge, region.db().knowledge(), "knowledge survives a reopen");
            }
            Op::Flush(r) => regions[r].db().flush().expect("flush"),
            Op::Advance { r, d } => regions[r].clock.advance(d),
        }
    }
    // Heal: every batch everywhere, in log order.
    for to in 0..REGIONS {
        for from in 0..REGIONS {
            if to != from {
                deliver(&mut regions, to, from, usize::MAX, false, to == 1)?;
            }
        }
    }
    // The rule's answer, from every version written: greatest (system time, region) wins and
    // carries the join of all vectors.
    let mut model: BTreeMap<Cell, (u64, u32, Option<Value>, VersionVector)> = BTreeMap::new();
    for (r, region) in regions.iter().enumerate() {
        for b in &region.outbox {
            for (c, raw) in last_writes(b) {
                let (value, vector) = cell::decode(raw).expect("cell");
                prop_assert!(vector.len() <= REGIONS);
                let entry = model.entry(c).or_insert((0, 0, None, VersionVector::new()));
                let joined = entry.3.merge(&vector);
                if (b.system_time.0, r as u32) > (entry.0, entry.1) {
                    *entry = (b.system_time.0, r as u32, value, joined);
                } else {
                    entry.3 = joined;
                }
            }
        }
    }
    for c in all_cells() {
        let want = model.get(&c).map(|m| (m.0, m.2.clone(), m.3.clone()));
        for (r, region) in regions.iter().enumerate() {
            let got = winner(region.db(), c);
            prop_assert_eq!(&got, &want, "cell {:?} at region {}", c, r);
        }
    }
    // Every version a region wrote is still there at its stamp, unless a version of a greater
    // region issued the same stamp and holds the key (the same on every node).
    for (r, region) in regions.iter().enumerate() {
        for b in &region.outbox {
            for ((e, f, t), raw) in last_writes(b) {
                let (value, _) = cell::decode(raw).expect("cell");
                let q = AsOf { as_of: EventTime(t), known_at: b.system_time, lookback_us: Some(0) };
                let got = region.db().version_at(ENTITIES[e], FeatureId(f), q).expect("read");
                let got = got.filter(|v| v.system_time == b.system_time);
                let ok = got.as_ref().is_some_and(|v| {
                    v.value == value
                        || quiver_storage::replication::origin_or_guess(&v.version_vector, v.system_time) > r as u32
                });
                prop_assert!(
                    ok,
                    "region {} lost its own version of {:?} at {}: {:?}",
                    r,
                    (e, f, t),
                    b.system_time.0,
                    got
                );
            }
        }
    }
    for region in regions.iter_mut() {
        region.db().verify().expect("verify");
        region.db.take().expect("open").close().expect("close");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
    #[test]
    fn three_engines_converge_on_the_rules_winner(ops in prop::collection::vec(op(), 1..50), hot in any::<bool>()) {
        run(ops, hot)?;
    }
}

#[test]
fn bad_shipped_batches_are_refused_and_change_nothing() {
    let fs = MemFs::new();
    let clock = ManualClock::new(1_000_000);
    let db = Db::open_with_fs(Arc::new(fs), Path::new("/db"), options(0, &clock, false)).expect("open");
    let good = quiver_storage::ShippedOp {
        entity: b"\x01ann".to_vec(),
        feature: FeatureId(1),
        event_time: EventTime(5),
        cell: {
            let mut c = Vec::new();
            cell::encode(Some(&Value::Int64(1)), &VersionVector::single(1, 900), &mut c);
            c
        },
    };
    let batch = |origin: u32, ops: Vec<quiver_storage::ShippedOp>| ShippedBatch {
        origin,
        seqno: 3,
        system_time: SystemTime(900),
        ops,
    };
    let bad_cell = quiver_storage::ShippedOp { cell: vec![0xff, 0xff], ..good.clone() };
    let reserved = quiver_storage::ShippedOp { entity: b"\x00reg\x00x".to_vec(), ..good.clone() };
    for (what, b) in [
        ("own region", batch(0, vec![good.clone()])),
        ("sequence number 0", ShippedBatch { seqno: 0, ..batch(1, vec![good.clone()]) }),
        ("cell that does not decode", batch(1, vec![good.clone(), bad_cell])),
        ("reserved entity", batch(1, vec![reserved])),
    ] {
        match db.apply_replicated(&b, Durability::Sync) {
            Err(Error::InvalidArgument(_)) => {}
            other => panic!("{what}: {other:?}"),
        }
    }
    // A stamp a week ahead of this node's clock.
    let ahead =
        ShippedBatch { system_time: SystemTime(1_000_000 + 7 * 86_400_000_000), ..batch(1, vec![good.clone()]) };
    assert!(matches!(db.apply_replicated(&ahead, Durability::Sync), Err(Error::InvalidArgument(_))));
    // More regions in all than a vector may hold (each cell's vector is within the limit).
    let wide = |from: u32| {
        let mut c = Vec::new();
        let entries: Vec<(u32, u64)> = (from..from + 40).map(|r| (r, 5)).chain([(1, 900)]).collect();
        cell::encode(Some(&Value::Int64(1)), &VersionVector::from_entries(entries).expect("vector"), &mut c);
        quiver_storage::ShippedOp { cell: c, ..good.clone() }
    };
    let wide_batch = batch(1, vec![wide(100), quiver_storage::ShippedOp { feature: FeatureId(2), ..wide(200) }]);
    assert!(matches!(db.apply_replicated(&wide_batch, Durability::Sync), Err(Error::InvalidArgument(_))));
    assert_eq!(db.replication_cursor(1).expect("cursor"), 0, "nothing was applied");
    assert_eq!(db.stats().last_seqno, 0);
    let r = db.apply_replicated(&batch(1, vec![good.clone()]), Durability::Sync).expect("apply");
    assert_eq!((r.applied, r.dropped, r.conflicts), (1, 0, 0));
    assert_eq!(db.replication_cursor(1).expect("cursor"), 3);
    // Below this node's horizon: dropped, and the cursor still moves on.
    db.set_event_horizon(EventTime(10)).expect("horizon");
    let low = ShippedBatch { seqno: 4, ..batch(1, vec![good]) };
    let r = db.apply_replicated(&low, Durability::Sync).expect("apply");
    assert_eq!((r.applied, r.dropped), (0, 1));
    assert_eq!(db.replication_cursor(1).expect("cursor"), 4);
}

#[test]
fn a_checkpoint_carries_the_cursors_and_the_knowledge() {
    let fs = MemFs::new();
    let clock = ManualClock::new(1_000_000);
    let db = Db::open_with_fs(Arc::new(fs.clone()), Path::new("/db"), options(0, &clock, false)).expect("open");
    let mut c = Vec::new();
    cell::encode(Some(&Value::Int64(1)), &VersionVector::from_entries(vec![(1, 900), (2, 800)]).expect("v"), &mut c);
    let op = quiver_storage::ShippedOp {
        entity: b"\x01ann".to_vec(),
        feature: FeatureId(1),
        event_time: EventTime(5),
        cell: c,
    };
    db.apply_replicated(
        &ShippedBatch { origin: 1, seqno: 7, system_time: SystemTime(900), ops: vec![op] },
        Durability::Sync,
    )
    .expect("apply");
    let knowledge = db.knowledge();
    assert_eq!(knowledge.entries(), &[(1, 900), (2, 800)]);
    db.checkpoint(Path::new("/copy")).expect("checkpoint");
    let copy = Db::open_with_fs(Arc::new(fs), Path::new("/copy"), options(0, &clock, false)).expect("open copy");
    assert_eq!(copy.knowledge(), knowledge);
    assert_eq!(copy.replication_cursor(1).expect("cursor"), 7);
}

#[test]
fn flushed_log_segments_stay_for_peers_until_applied_or_over_the_bound() {
    let fs = MemFs::new();
    let clock = ManualClock::new(1_000_000);
    let open = |bytes: u64| {
        let opts = Options { replication_log_bytes: bytes, ..options(0, &clock, false) };
        Db::open_with_fs(Arc::new(fs.clone()), Path::new("/db"), opts).expect("open")
    };
    let db = open(1 << 30);
    let mut seqnos = Vec::new();
    for i in 0..6 {
        let mut b = WriteBatch::new();
        b.put(b"\x01ann", FeatureId(1), EventTime(i), Value::Int64(i)).expect("put");
        seqnos.push(db.write(b, Durability::Sync).expect("write").seqno);
        db.flush().expect("flush");
    }
    let all = |db: &Db| db.origin_log(0, usize::MAX).map(|l| l.iter().map(|b| b.seqno).collect::<Vec<_>>());
    assert_eq!(all(&db).expect("log"), seqnos, "every batch is kept across flushes");
    db.close().expect("close");
    let db = open(1 << 30);
    assert_eq!(all(&db).expect("log"), seqnos, "and across a reopen");
    // Peers have applied the first three: their segments may go at the next flush.
    db.retain_log_after(seqnos[2]);
    let mut b = WriteBatch::new();
    b.put(b"\x01ann", FeatureId(1), EventTime(9), Value::Int64(9)).expect("put");
    let last = db.write(b, Durability::Sync).expect("write").seqno;
    db.flush().expect("flush");
    assert!(matches!(all(&db), Err(Error::LogTruncated { .. })), "batch 1 is gone");
    assert!(
        matches!(db.origin_log(0, 1), Err(Error::LogTruncated { .. })),
        "a gap is reported even when the answer would stop early"
    );
    let rest: Vec<u64> = db.origin_log(seqnos[2], usize::MAX).expect("log").iter().map(|b| b.seqno).collect();
    assert_eq!(rest, [&seqnos[3..], &[last]].concat());
    db.close().expect("close");
    // Over the byte bound, the oldest go even though no peer applied them.
    let db = open(1);
    assert!(matches!(db.origin_log(seqnos[2], usize::MAX), Err(Error::LogTruncated { .. })));
    assert!(db.origin_log(last, usize::MAX).expect("nothing newer").is_empty());
}

#[test]
fn reserved_entities_replicate_only_under_the_replicated_prefixes() {
    let clock = ManualClock::new(1_000_000);
    let open = |r: u32, prefixes: Vec<Vec<u8>>| {
        let opts = Options { replicated_prefixes: prefixes, ..options(r as usize, &clock, false) };
        Db::open_with_fs(Arc::new(MemFs::new()), Path::new("/db"), opts).expect("open")
    };
    let registry = b"\x00reg\x00".to_vec();
    let origin = open(0, vec![registry.clone()]);
    let mut b = WriteBatch::new();
    b.put(b"\x00reg\x00group", FeatureId(1), EventTime(0), Value::Int64(1)).expect("put");
    b.put(b"\x00idem\x00key", FeatureId(0), EventTime(0), Value::Int64(2)).expect("put");
    b.put(b"\x01ann", FeatureId(1), EventTime(0), Value::Int64(3)).expect("put");
    origin.write(b, Durability::Sync).expect("write");
    let mut b = WriteBatch::new();
    b.put(b"\x00idem\x00other", FeatureId(0), EventTime(0), Value::Int64(4)).expect("put");
    origin.write(b, Durability::Sync).expect("write");
    let log = origin.origin_log(0, usize::MAX).expect("log");
    assert_eq!(log.len(), 2);
    let shipped: Vec<&[u8]> = log[0].ops.iter().map(|o| o.entity.as_slice()).collect();
    assert_eq!(shipped, [b"\x00reg\x00group".as_slice(), b"\x01ann"], "local reserved entities stay");
    assert!(log[1].ops.is_empty(), "a batch of local cells ships empty, to move the cursor");
    let peer = open(1, vec![registry]);
    for b in &log {
        peer.apply_replicated(b, Durability::Sync).expect("apply");
    }
    assert_eq!(peer.replication_cursor(0).expect("cursor"), log[1].seqno);
    let at0 = AsOf::at(EventTime(0));
    assert!(peer.value_at(b"\x00reg\x00group", FeatureId(1), at0).expect("get").is_some());
    assert!(peer.value_at(b"\x00idem\x00key", FeatureId(0), at0).expect("get").is_none());
    // A peer that does not replicate the prefix refuses the batch whole.
    let other = open(2, vec![]);
    assert!(matches!(other.apply_replicated(&log[0], Durability::Sync), Err(Error::InvalidArgument(_))));
    assert_eq!(other.replication_cursor(0).expect("cursor"), 0);
    // A snapshot holds the replicated cells and none of the local ones.
    let snap = origin.replication_snapshot().expect("snapshot");
    assert_eq!(snap.through(), log[1].seqno);
    let entities: Vec<Vec<u8>> = snap.map(|v| v.expect("version").entity).collect();
    assert_eq!(entities, [b"\x00reg\x00group".to_vec(), b"\x01ann".to_vec()]);
}

#[test]
fn a_gap_of_pruned_replicated_records_is_not_a_truncated_log() {
    let clock = ManualClock::new(1_000_000);
    // No in-memory tail, and a bound that prunes every flushed segment: the log is the disk.
    let opts = Options { replication_log_bytes: 1, replication_tail_bytes: 0, ..options(0, &clock, false) };
    let db = Db::open_with_fs(Arc::new(MemFs::new()), Path::new("/db"), opts).expect("open");
    let local = |i: i64| {
        let mut b = WriteBatch::new();
        b.put(b"\x01ann", FeatureId(1), EventTime(i), Value::Int64(i)).expect("put");
        db.write(b, Durability::Sync).expect("write").seqno
    };
    let shipped = |seqno: u64| {
        let mut c = Vec::new();
        cell::encode(Some(&Value::Int64(1)), &VersionVector::single(1, 900 + seqno), &mut c);
        let op = quiver_storage::ShippedOp {
            entity: b"\x01bob".to_vec(),
            feature: FeatureId(1),
            event_time: EventTime(0),
            cell: c,
        };
        ShippedBatch { origin: 1, seqno, system_time: SystemTime(900 + seqno), ops: vec![op] }
    };
    let first = local(1);
    db.flush().expect("flush");
    db.retain_log_after(first);
    for s in 1..=3 {
        db.apply_replicated(&shipped(s), Durability::Sync).expect("apply");
        db.flush().expect("flush");
    }
    // Everything up to here is pruned; past `first` only replicated records went.
    assert!(db.origin_log(first, usize::MAX).expect("no local batch was lost").is_empty());
    let second = local(2);
    let log: Vec<u64> = db.origin_log(first, usize::MAX).expect("log").iter().map(|b| b.seqno).collect();
    assert_eq!(log, [second]);
    // A peer that never applied `first` has lost it.
    assert!(matches!(db.origin_log(0, usize::MAX), Err(Error::LogTruncated { .. })));
}

/// The event horizon drops a peer's feature values below it, never its replicated reserved
/// records (the registry lives at event time 0), and a local write's reserved records pass it.
#[test]
fn the_event_horizon_applies_to_values_not_to_replicated_registry_records() {
    use quiver_storage::{
        cell, AsOf, Db, Durability, EventTime, FeatureId, Options, ShippedBatch, ShippedOp, SystemTime, Value,
        VersionVector, WriteBatch,
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let registry = quiver_storage::reserved::REGISTRY.to_vec();
    let opts = Options { region: 1, replicated_prefixes: vec![registry.clone()], ..Options::default() };
    let db = Db::open(tmp.path(), opts).expect("open");
    db.set_event_horizon(EventTime(1_000)).expect("horizon");
    let stamp = quiver_testkit::now_us() as u64;
    let mut record = registry.clone();
    record.extend_from_slice(b"fg\x00g");
    let op = |entity: &[u8], event: i64| {
        let mut c = Vec::new();
        cell::encode(Some(&Value::Int64(1)), &VersionVector::single(2, stamp), &mut c);
        ShippedOp { entity: entity.to_vec(), feature: FeatureId(1), event_time: EventTime(event), cell: c }
    };
    let b = ShippedBatch {
        origin: 2,
        seqno: 1,
        system_time: SystemTime(stamp),
        ops: vec![op(&record, 0), op(b"\x01user", 0), op(b"\x01user", 2_000)],
    };
    db.apply_replicated(&b, Durability::Sync).expect("apply");
    let at = |e: &[u8], t| db.value_at(e, FeatureId(1), AsOf::at(EventTime(t))).expect("read");
    assert!(at(&record, 0).is_some(), "the registry record replicated");
    assert!(at(b"\x01user", 2_000).is_some(), "a value above the horizon replicated");
    assert!(at(b"\x01user", 999).is_none(), "a value below the horizon was dropped");
    let mut local = WriteBatch::new();
    local.put(&record, FeatureId(2), EventTime(0), Value::Int64(2)).expect("put");
    local.put(b"\x01user", FeatureId(2), EventTime(5_000), Value::Int64(2)).expect("put");
    db.write(local, Durability::Sync).expect("a local write with a reserved record passes the horizon");
}

/// Two nodes of one origin region number their batches alike (REPLICATION.md §7): a receiver
/// keeps one cursor per stream, so a batch of one stream is never taken for another's, in a
/// group and across a reopen, and stream 0 is the cursor every node kept before streams.
#[test]
fn each_stream_of_a_region_has_its_own_cursor() {
    use quiver_storage::{ShippedOp, SnapshotVersion, SOLE_STREAM, STREAM_MAX};
    let fs = MemFs::new();
    let clock = ManualClock::new(1_000_000);
    let open = || Db::open_with_fs(Arc::new(fs.clone()), Path::new("/db"), options(0, &clock, false)).expect("open");
    let db = open();
    let batch = |seqno: u64, entity: &[u8], value: i64, stamp: u64| {
        let mut c = Vec::new();
        cell::encode(Some(&Value::Int64(value)), &VersionVector::single(1, stamp), &mut c);
        let op = ShippedOp { entity: entity.to_vec(), feature: FeatureId(1), event_time: EventTime(5), cell: c };
        ShippedBatch { origin: 1, seqno, system_time: SystemTime(stamp), ops: vec![op] }
    };
    let (a, b) = (11u64, STREAM_MAX);
    // Stream a's batches 1..=3 as one group; then stream b's batch 2 is new, not "applied".
    let r = db
        .apply_replicated_stream(
            a,
            &[batch(1, b"\x01ann", 1, 900), batch(2, b"\x01ann", 2, 901), batch(3, b"\x01ann", 3, 902)],
            Durability::Sync,
        )
        .expect("stream a");
    assert!(r.iter().all(|r| !r.already_applied && r.applied == 1), "{r:?}");
    let r = db.apply_replicated_stream(b, &[batch(2, b"\x01bob", 7, 950)], Durability::Sync).expect("stream b");
    assert!(!r[0].already_applied && r[0].applied == 1, "{r:?}");
    assert_eq!(db.replication_cursor_of(1, a).expect("a"), 3);
    assert_eq!(db.replication_cursor_of(1, b).expect("b"), 2);
    assert_eq!(db.replication_cursor(1).expect("sole"), 0, "stream 0 is untouched");
    // A redelivery is one to its own stream only; the sole stream keeps its own cursor.
    let r = db.apply_replicated_stream(a, &[batch(2, b"\x01ann", 2, 901)], Durability::Sync).expect("again");
    assert!(r[0].already_applied);
    db.apply_replicated(&batch(1, b"\x01cat", 4, 960), Durability::Sync).expect("sole stream");
    assert_eq!(db.replication_cursor_of(1, SOLE_STREAM).expect("sole"), 1);
    // A snapshot's end raises its own stream's cursor, never another's.
    let mut c = Vec::new();
    cell::encode(Some(&Value::Int64(9)), &VersionVector::single(1, 970), &mut c);
    let v = SnapshotVersion {
        entity: b"\x01dan".to_vec(),
        feature: FeatureId(1),
        event_time: EventTime(5),
        system_time: SystemTime(970),
        cell: c,
    };
    db.apply_snapshot_stream(1, 12, &[v], Some(40), Durability::Sync).expect("snapshot");
    assert_eq!(db.replication_cursor_of(1, 12).expect("12"), 40);
    assert_eq!(db.replication_cursor_of(1, a).expect("a"), 3);
    // Every cursor, and what they taught, outlives a reopen.
    let knowledge = db.knowledge();
    drop(db);
    let db = open();
    let cursors: Vec<u64> =
        [SOLE_STREAM, a, 12, b].iter().map(|&s| db.replication_cursor_of(1, s).expect("c")).collect();
    assert_eq!(cursors, [1, 3, 40, 2]);
    let all: Vec<((u32, u64), u64)> = db.replication_cursors().expect("cursors").into_iter().collect();
    assert_eq!(all, [((1, SOLE_STREAM), 1), ((1, a), 3), ((1, 12), 40), ((1, b), 2)]);
    assert_eq!(db.knowledge(), knowledge);
    assert_eq!(db.replication_cursor_of(1, 13).expect("none"), 0, "a stream never seen");
    let r = db.apply_replicated_stream(b, &[batch(2, b"\x01bob", 7, 950)], Durability::Sync).expect("b again");
    assert!(r[0].already_applied);
    assert!(matches!(db.replication_cursor_of(1, STREAM_MAX + 1), Err(Error::InvalidArgument(_))));
    assert!(matches!(
        db.apply_replicated_stream(STREAM_MAX + 1, &[batch(9, b"\x01ann", 1, 990)], Durability::Sync),
        Err(Error::InvalidArgument(_))
    ));
}
