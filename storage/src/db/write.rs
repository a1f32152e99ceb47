//! The write path: group commit, memtable switches.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;

use super::{Inner, Pending, ReadView, WriterState};
use crate::batch::{self, CellRef};
use crate::key;
use crate::memtable::Memtable;
use crate::options::Background;
use crate::types::{CellVersion, Durability, EventTime, FeatureId, SystemTime, Value, VersionVector};
use crate::wal::Segment;
use crate::{Error, Result, WriteBatch};

/// Most bytes of batches one leader commits in one group.
const GROUP_BYTES_MAX: usize = 4 << 20;

/// Most expectations one conditional write may carry (one per write of a full batch).
pub const EXPECTATIONS_MAX: usize = crate::limits::BATCH_OPS_MAX;

/// What a committed batch was stamped with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteReceipt {
    /// The batch's sequence number.
    pub seqno: u64,
    /// The batch's system time (shared by all its cell versions).
    pub system_time: SystemTime,
    /// The version vector of its writes that carry no explicit vector: what this node knew of
    /// other regions at the commit, joined with `{this region: system_time}`. A later
    /// [`Db::write_if`](super::Db::write_if) of those cells expects it.
    pub version_vector: VersionVector,
}

/// What a conditional write expects of one cell (see [`Db::write_if`](super::Db::write_if)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectation {
    /// Entity key.
    pub entity: Vec<u8>,
    /// Feature.
    pub feature: FeatureId,
    /// Event time: the cell is `(entity, feature, event_time)`, every system time.
    pub event_time: EventTime,
    /// The version vector of the cell's current version (its newest system time), compared
    /// entry for entry; `None`: the cell holds no value (never written, or its current version
    /// is a tombstone).
    pub version: Option<VersionVector>,
}

/// A cell whose current version is not the expected one.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    /// Index of the expectation in the request.
    pub index: usize,
    /// The cell's current version (`None`: it holds no value).
    pub current: Option<CellVersion>,
}

/// What [`Db::write_if`](super::Db::write_if) did.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteIf {
    /// Every expectation held; the batch is committed.
    Committed(WriteReceipt),
    /// At least one expectation failed (every failed one is listed, in request order);
    /// nothing was written.
    Refused(Vec<Mismatch>),
}

/// A copy of an error for each writer of a failed group.
pub(super) fn share(e: &Error) -> Error {
    match e {
        Error::Io { path, source } => {
            Error::Io { path: path.clone(), source: std::io::Error::new(source.kind(), source.to_string()) }
        }
        Error::Corruption { file, offset, what } => {
            Error::Corruption { file: file.clone(), offset: *offset, what: what.clone() }
        }
        Error::InvalidArgument(s) => Error::InvalidArgument(s.clone()),
        Error::OverBudget(s) => Error::OverBudget(s.clone()),
        Error::NoSpace { path, what, read_only } => {
            Error::NoSpace { path: path.clone(), what: what.clone(), read_only: *read_only }
        }
        Error::PreviousError(s) => Error::PreviousError(s.clone()),
        Error::InUse { path } => Error::InUse { path: path.clone() },
        Error::Closed => Error::Closed,
        Error::LogTruncated { oldest } => Error::LogTruncated { oldest: *oldest },
    }
}

/// The newest write of each cell by the batches a group has committed so far (not yet in the
/// memtable), for the expectations of its later batches. A local stamp is newer than every
/// version the node holds, so such a write is its cell's current version.
type GroupWrites<'a> = HashMap<CellRef<'a>, (Option<&'a Value>, SystemTime, VersionVector)>;

impl Inner {
    /// Commits `batch` if every expectation holds, atomically with respect to every other
    /// commit (local writes, replicated applies): the expectations are checked by the group's
    /// leader under the writer lock, against the memtables, the tables and the group's earlier
    /// batches.
    pub(super) fn write(&self, batch: WriteBatch, expect: Vec<Expectation>, durability: Durability) -> Result<WriteIf> {
        if batch.is_empty() {
            return Err(Error::InvalidArgument("write batch is empty".into()));
        }
        if expect.len() > EXPECTATIONS_MAX {
            return Err(Error::InvalidArgument(format!(
                "a write carries {} expectations, more than the limit of {EXPECTATIONS_MAX}",
                expect.len()
            )));
        }
        for e in &expect {
            crate::types::check_entity_key(&e.entity)?;
        }
        // Held until the batch is in the memtable, so that a horizon move waits for it.
        let horizon = self.horizon.read();
        if let Some(below) = batch.below_horizon(*horizon) {
            return Err(Error::InvalidArgument(format!(
                "event time {} is below the event horizon {}",
                below.0, *horizon
            )));
        }
        self.check_ok()?;
        let mine = self.commit.submit(
            Pending { batch, expect, durability },
            |p| p.batch.approximate_bytes(),
            GROUP_BYTES_MAX,
            |group| {
                // A panic here must not leave the queue without a leader's results (every
                // writer would wait forever): it becomes an error for the group and stops the
                // engine.
                let results = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.commit_group(group)))
                    .unwrap_or_else(|_| {
                        let e = Error::PreviousError("internal: the commit path panicked".into());
                        self.fail(&e);
                        Err(e)
                    });
                match results {
                    Ok(outcomes) => outcomes,
                    Err(e) => group.iter().map(|_| Err(share(&e))).collect(),
                }
            },
        );
        drop(horizon);
        if self.opts.background == Background::Inline && matches!(mine, Ok(WriteIf::Committed(_))) {
            // The batch is committed whatever happens here; a failure of the flush or
            // compaction it triggers stops the engine (see `fail`) and shows on the next call.
            let work = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_inline_work()));
            match work {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "inline background work failed"),
                Err(_) => self.fail(&Error::PreviousError("internal: inline background work panicked".into())),
            }
        }
        mine
    }

    /// The leader's step: checks each batch's expectations, stamps those that hold, and
    /// publishes them as one group. A batch whose expectations cannot be read (an I/O error,
    /// corruption) fails alone; the rest of the group goes on.
    fn commit_group(&self, group: &[Pending]) -> Result<Vec<Result<WriteIf>>> {
        self.check_ok()?;
        let mut w = self.writer.lock();
        self.make_room(&mut w)?;
        let view = self.view.read().clone();
        // Only groups with a conditional batch track their writes.
        let mut written: Option<GroupWrites<'_>> = group.iter().any(|p| !p.expect.is_empty()).then(HashMap::new);
        let mut payloads = Vec::with_capacity(group.len());
        let mut outcomes = Vec::with_capacity(group.len());
        // Local writes carry what this node knows of other regions (`REPLICATION.md` §2).
        let knowledge = self.knowledge.lock().clone();
        let mut seqno = w.last_seqno;
        for p in group {
            if let Some(written) = &written {
                match self.check_expectations(&view, written, &p.expect) {
                    Ok(m) if m.is_empty() => {}
                    Ok(m) => {
                        outcomes.push(Ok(WriteIf::Refused(m)));
                        continue;
                    }
                    Err(e) => {
                        outcomes.push(Err(e));
                        continue;
                    }
                }
            }
            seqno += 1;
            let s = SystemTime(self.hlc.stamp());
            let local = knowledge.merge(&VersionVector::single(self.opts.region, s.0));
            payloads.push(p.batch.encode(seqno, s, &local));
            if let Some(written) = &mut written {
                for (cell, value, vv) in p.batch.cells() {
                    written.insert(cell, (value, s, vv.unwrap_or(&local).clone()));
                }
            }
            outcomes.push(Ok(WriteIf::Committed(WriteReceipt { seqno, system_time: s, version_vector: local })));
        }
        // Any `Sync` writer makes the group sync, refused ones too: a refusal may be answered
        // with the state it saw (an idempotent retry replays the first write), which must then
        // be as durable as the refused writer asked.
        let sync = group.iter().any(|p| p.durability == Durability::Sync);
        if payloads.is_empty() {
            if sync {
                if let Err(e) = self.sync_wal(w.wal.as_ref()) {
                    self.fail(&e);
                    return Err(e);
                }
            }
            return Ok(outcomes);
        }
        self.publish(&mut w, &view.mem, payloads, sync)?;
        Ok(outcomes)
    }

    /// The expectations of one batch that do not hold, read under the writer lock: from the
    /// group's earlier writes, else from the view (which holds every published batch).
    fn check_expectations(
        &self,
        view: &ReadView,
        written: &GroupWrites<'_>,
        expect: &[Expectation],
    ) -> Result<Vec<Mismatch>> {
        let mut out = Vec::new();
        for (index, e) in expect.iter().enumerate() {
            let cell = (e.entity.as_slice(), e.feature, e.event_time);
            let current = match written.get(&cell) {
                Some((value, system_time, vv)) => value.map(|v| CellVersion {
                    event_time: e.event_time,
                    system_time: *system_time,
                    value: Some(v.clone()),
                    version_vector: vv.clone(),
                }),
                None => crate::asof::present(self.cell_in_view(view, &e.entity, e.feature, e.event_time)?),
            };
            let holds = match (&current, &e.version) {
                (None, None) => true,
                (Some(c), Some(want)) => c.version_vector == *want,
                _ => false,
            };
            if !holds {
                out.push(Mismatch { index, current });
            }
        }
        Ok(out)
    }

    /// The one commit path, for local writes and replicated applies alike: logs `payloads`
    /// (batches the writer encoded with the sequence numbers after `w.last_seqno`, in order,
    /// each stamped above the last), syncs the WAL once if `sync`, then inserts them into `mem`
    /// and publishes them together. Afterwards readers see all of them or none, and a crash
    /// keeps all of them or a prefix (all, once a sync was asked for).
    pub(super) fn publish(
        &self,
        w: &mut WriterState,
        mem: &Memtable,
        payloads: Vec<Vec<u8>>,
        sync: bool,
    ) -> Result<()> {
        debug_assert!(!payloads.is_empty(), "publish needs a batch");
        let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        if let Err(e) = w.wal.append(&refs) {
            // A full disk: once the partial record is cut off, nothing was logged and the
            // next commit reuses these sequence numbers. Any other failure is fatal.
            if e.is_no_space() {
                match w.wal.rollback() {
                    Ok(()) => {
                        self.wal_full(&e, refs.iter().map(|r| r.len() as u64 + 32).sum());
                        return Err(e);
                    }
                    Err(t) => {
                        let e = Error::PreviousError(format!("{e}; cutting the partial record failed: {t}"));
                        self.fail(&e);
                        return Err(e);
                    }
                }
            }
            self.fail(&e);
            return Err(e);
        }
        if sync {
            if let Err(e) = self.sync_wal(w.wal.as_ref()) {
                self.fail(&e);
                return Err(e);
            }
        }
        self.wal_has_space();
        // From here on the batches are in the log: whatever goes wrong must stop the engine,
        // or the next commit would reuse their sequence numbers.
        let published =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.publish_logged(w, mem, &payloads)));
        let local =
            match published.unwrap_or_else(|_| Err(Error::PreviousError("internal: publishing panicked".into()))) {
                Ok(local) => local,
                Err(e) => {
                    self.fail(&e);
                    return Err(e);
                }
            };
        // Peers that keep up are served this region's batches from memory.
        if self.opts.replication_log_bytes > 0 && local {
            let first = w.last_seqno + 1 - payloads.len() as u64;
            let mut tail = self.log_tail.lock();
            for (i, p) in payloads.into_iter().enumerate() {
                tail.push(first + i as u64, p);
            }
        }
        // Only now may a reader of the log say it read through these batches: they were
        // published before they reached the tail.
        self.log_covered.store(w.last_seqno, Ordering::Release);
        if mem.approximate_bytes() >= self.opts.memtable_bytes {
            self.notify_work();
        }
        Ok(())
    }

    /// Syncs the WAL segment, counting the fsync if one was needed.
    fn sync_wal(&self, wal: &Segment) -> Result<()> {
        if wal.sync()? {
            self.counters.wal_syncs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Publishes logged batches; returns whether they are local (written in this region). A
    /// group is all local (a commit) or all replicated (an apply).
    fn publish_logged(&self, w: &mut WriterState, mem: &Memtable, payloads: &[Vec<u8>]) -> Result<bool> {
        let mut decoded = Vec::with_capacity(payloads.len());
        for p in payloads {
            match batch::decode_trusted(p) {
                Ok(b) => decoded.push(b),
                Err(what) => {
                    return Err(Error::PreviousError(format!(
                        "internal: a batch this engine encoded does not decode: {what}"
                    )))
                }
            }
        }
        let first = w.last_seqno + 1;
        let visible_before = self.visible.load(Ordering::Acquire);
        // Invariants of the log: sequence numbers dense, batch stamps rising.
        for (i, b) in decoded.iter().enumerate() {
            debug_assert_eq!(b.seqno, first + i as u64, "sequence numbers must be dense");
            debug_assert!(b.system_time.0 > visible_before, "a batch's stamp must be above the visible stamp");
            debug_assert!(i == 0 || decoded[i - 1].system_time < b.system_time, "batch stamps must rise");
        }
        let Some((last, newest)) = decoded.last().map(|b| (b.seqno, b.system_time)) else {
            return Err(Error::PreviousError("internal: publish of no batch".into()));
        };
        let local = decoded[0].origin.is_none();
        debug_assert!(decoded.iter().all(|b| b.origin.is_none() == local), "a group is all local or all replicated");
        w.last_seqno = last;
        // The hot tier learns of every version before it is published (see `src/hot.rs`).
        // So do the tiles (see `src/tiles.rs`).
        let (announced, tiles_announced) = announce(self.hot.as_ref(), self.tiles.as_ref(), &decoded);
        for b in &decoded {
            insert_batch(mem, b);
        }
        mem.set_last_seqno(last);
        self.visible.fetch_max(newest.0, Ordering::AcqRel);
        if let Some(hot) = &self.hot {
            for token in announced {
                hot.write_end(token);
            }
        }
        if let Some(tiles) = &self.tiles {
            for token in tiles_announced {
                tiles.write_end(token);
            }
        }
        if local {
            self.own_stamp_max.fetch_max(newest.0, Ordering::AcqRel);
        } else {
            let mut k = self.knowledge.lock();
            for b in &decoded {
                *k = k.merge(&super::replicate::learned(b));
            }
        }
        let previous = self.published_seqno.swap(last, Ordering::AcqRel);
        debug_assert!(previous < first, "the published sequence number must rise");
        self.counters.write_groups.fetch_add(1, Ordering::Relaxed);
        Ok(local)
    }

    /// Switches the memtable if it is full, waiting while too many immutable memtables or L0
    /// tables are queued.
    pub(super) fn make_room(&self, w: &mut WriterState) -> Result<()> {
        loop {
            self.check_ok()?;
            let view = self.view.read().clone();
            if view.mem.approximate_bytes() < self.opts.memtable_bytes {
                return Ok(());
            }
            let stalled = view.imms.len() >= self.opts.immutable_memtables_max
                || view.version.levels[0].len() >= self.opts.l0_stop_writes;
            if stalled {
                // Background work that cannot find space would keep the writer waiting
                // without end.
                if let Some(e) = self.stalled_for_space(&view) {
                    return Err(e);
                }
            }
            if stalled && self.opts.background == Background::Threads {
                let mut g = self.work.lock();
                self.work_cv.notify_all();
                self.work_cv.wait_for(&mut g, Duration::from_millis(50));
                continue;
            }
            return self.switch_memtable(w);
        }
    }

    /// Freezes the active memtable (if not empty) and starts a new one with a new WAL segment.
    pub(super) fn switch_memtable(&self, w: &mut WriterState) -> Result<()> {
        if self.view.read().mem.is_empty() {
            return Ok(());
        }
        let mut created = None;
        let result = (|| -> Result<()> {
            // Every segment but the newest is complete and synced (see crate::wal).
            w.wal.sync()?;
            let number = self.versions.lock().new_file_number();
            created = Some(number);
            let seg = Arc::new(Segment::create(self.fs.as_ref(), &self.dir, number)?);
            let mem = Arc::new(Memtable::new(number));
            {
                let mut view = self.view.write();
                let mut imms = Vec::with_capacity(view.imms.len() + 1);
                imms.push(view.mem.clone());
                imms.extend(view.imms.iter().cloned());
                *view = Arc::new(ReadView { mem, imms, version: view.version.clone() });
            }
            w.wal = seg.clone();
            *self.current_wal.lock() = seg;
            Ok(())
        })();
        match &result {
            // A full disk kept the new segment from being made: the memtable stays active
            // (writes to it are refused while it is full) and the attempt leaves nothing.
            Err(e) if e.is_no_space() => {
                if let Some(path) = created.map(|n| crate::wal::segment_path(&self.dir, n)) {
                    if self.fs.exists(&path) {
                        let _ = self.fs.remove(&path);
                    }
                }
                self.wal_full(e, 0);
            }
            Err(e) => self.fail(e),
            Ok(()) => {}
        }
        self.notify_work();
        result
    }

    /// Freezes the active memtable and flushes every immutable memtable.
    pub(super) fn flush_all(&self) -> Result<()> {
        self.check_ok()?;
        {
            let mut w = self.writer.lock();
            self.switch_memtable(&mut w)?;
        }
        while self.flush_oldest()? {}
        Ok(())
    }
}

/// Announces each run of writes to one entity in the batches to the hot tier
/// ([`crate::hot::HotTier::write_begin`]) and to the tiles ([`crate::tiles::Tiles::write_begin`]),
/// before they are published; returns the tokens of each for the matching `write_end`s.
pub(super) fn announce(
    hot: Option<&crate::hot::HotTier>,
    tiles: Option<&crate::tiles::Tiles>,
    batches: &[batch::DecodedBatch<'_>],
) -> (Vec<crate::stripes::WriteToken>, Vec<crate::stripes::WriteToken>) {
    let (mut to_hot, mut to_tiles) = (Vec::new(), Vec::new());
    for b in batches {
        for run in b.ops.chunk_by(|x, y| x.entity == y.entity) {
            if let Some(hot) = hot {
                let cells = run.iter().map(|op| (op.feature, op.event_time, op.system_time, op.cell));
                to_hot.push(hot.write_begin(run[0].entity, cells));
            }
            if let Some(tiles) = tiles {
                to_tiles.push(tiles.write_begin(run[0].entity, run.iter().map(|op| (op.feature, op.event_time))));
            }
        }
    }
    (to_hot, to_tiles)
}

/// Inserts a decoded batch into a memtable.
pub(super) fn insert_batch(mem: &Memtable, b: &batch::DecodedBatch<'_>) {
    for op in &b.ops {
        mem.insert(key::encode(op.entity, op.feature, op.event_time, op.system_time), op.cell.to_vec());
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    //! The group's own writes as the current state of later conditional batches: driven through
    //! `commit_group` with a hand-built group, so that two conditional batches share one group
    //! every time (through `Db::write_if` that depends on thread timing).

    use super::super::{Db, Pending};
    use super::{Expectation, WriteIf};
    use crate::types::{AsOf, Durability, EventTime, FeatureId, SystemTime, Value, VersionVector};
    use crate::{Options, WriteBatch};

    const E: &[u8] = b"\x01cell";
    const F: FeatureId = FeatureId(1);
    const T: EventTime = EventTime(100);

    fn pending(value: Option<i64>, expect: Option<Option<VersionVector>>) -> Pending {
        let mut batch = WriteBatch::new();
        match value {
            Some(v) => batch.put(E, F, T, Value::Int64(v)).expect("put"),
            None => batch.delete(E, F, T).expect("delete"),
        }
        let expect = expect
            .map(|version| Expectation { entity: E.to_vec(), feature: F, event_time: T, version })
            .into_iter()
            .collect();
        Pending { batch, expect, durability: Durability::Async }
    }

    fn receipt(r: &crate::Result<WriteIf>) -> super::WriteReceipt {
        match r {
            Ok(WriteIf::Committed(r)) => r.clone(),
            other => panic!("expected a commit, got {other:?}"),
        }
    }

    #[test]
    fn later_batches_of_a_group_see_the_earlier_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(dir.path(), Options { region: 1, ..Options::default() }).expect("open");
        // Group 1: "create if absent" twice; the second sees the first's write and is refused,
        // with the first's version as the current one.
        let outcomes =
            db.inner.commit_group(&[pending(Some(1), Some(None)), pending(Some(2), Some(None))]).expect("group");
        let first = receipt(&outcomes[0]);
        match &outcomes[1] {
            Ok(WriteIf::Refused(m)) => {
                assert_eq!(m.len(), 1);
                let current = m[0].current.as_ref().expect("the first batch's write is current");
                assert_eq!(current.value, Some(Value::Int64(1)));
                assert_eq!(current.version_vector, first.version_vector);
                assert_eq!(current.system_time, first.system_time);
            }
            other => panic!("the second create must be refused, got {other:?}"),
        }
        // Group 2: a CAS over the first version commits; a second CAS over the same version is
        // refused (the group's earlier batch replaced it); an unconditional delete commits and
        // the "create if absent" after it sees no value.
        let outcomes = db
            .inner
            .commit_group(&[
                pending(Some(3), Some(Some(first.version_vector.clone()))),
                pending(Some(4), Some(Some(first.version_vector.clone()))),
                pending(None, None),
                pending(Some(5), Some(None)),
            ])
            .expect("group");
        let third = receipt(&outcomes[0]);
        assert_eq!(third.seqno, first.seqno + 1, "the refused batch took no sequence number");
        match &outcomes[1] {
            Ok(WriteIf::Refused(m)) => {
                assert_eq!(m[0].current.as_ref().and_then(|c| c.value.clone()), Some(Value::Int64(3)))
            }
            other => panic!("the second CAS must be refused, got {other:?}"),
        }
        let deleted = receipt(&outcomes[2]);
        let fifth = receipt(&outcomes[3]);
        assert_eq!((deleted.seqno, fifth.seqno), (third.seqno + 1, third.seqno + 2));
        let now = db
            .version_at(E, F, AsOf { as_of: T, known_at: SystemTime::MAX, lookback_us: Some(0) })
            .expect("read")
            .expect("a value");
        assert_eq!(now.value, Some(Value::Int64(5)));
        assert_eq!(now.version_vector, fifth.version_vector);
    }
}
