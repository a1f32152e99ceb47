//! The write path: group commit, memtable switches.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{Inner, Pending, ReadView, WriterState};
use crate::batch;
use crate::key;
use crate::limits::IMMUTABLE_MEMTABLES_MAX;
use crate::memtable::Memtable;
use crate::options::Background;
use crate::types::{Durability, SystemTime, VersionVector};
use crate::wal::Segment;
use crate::{Error, Result, WriteBatch};

/// Most bytes of batches one leader commits in one group.
const GROUP_BYTES_MAX: usize = 4 << 20;

/// What a committed batch was stamped with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteReceipt {
    /// The batch's sequence number.
    pub seqno: u64,
    /// The batch's system time (shared by all its cell versions).
    pub system_time: SystemTime,
}

/// A copy of an error for each writer of a failed group.
fn share(e: &Error) -> Error {
    match e {
        Error::Io { path, source } => {
            Error::Io { path: path.clone(), source: std::io::Error::new(source.kind(), source.to_string()) }
        }
        Error::Corruption { file, offset, what } => {
            Error::Corruption { file: file.clone(), offset: *offset, what: what.clone() }
        }
        Error::InvalidArgument(s) => Error::InvalidArgument(s.clone()),
        Error::PreviousError(s) => Error::PreviousError(s.clone()),
        Error::InUse { path } => Error::InUse { path: path.clone() },
        Error::Closed => Error::Closed,
        Error::LogTruncated { oldest } => Error::LogTruncated { oldest: *oldest },
    }
}

impl Inner {
    pub(super) fn write(&self, batch: WriteBatch, durability: Durability) -> Result<WriteReceipt> {
        if batch.is_empty() {
            return Err(Error::InvalidArgument("write batch is empty".into()));
        }
        // Held until the batch is in the memtable, so that a horizon move waits for it.
        let horizon = self.horizon.read();
        if let Some(min) = batch.event_time_min() {
            if min.0 < *horizon {
                return Err(Error::InvalidArgument(format!(
                    "event time {} is below the event horizon {}",
                    min.0, *horizon
                )));
            }
        }
        self.check_ok()?;
        let mine = self.commit.submit(
            Pending { batch, durability },
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
                    Ok(receipts) => receipts.into_iter().map(Ok).collect(),
                    Err(e) => group.iter().map(|_| Err(share(&e))).collect(),
                }
            },
        );
        drop(horizon);
        if self.opts.background == Background::Inline && mine.is_ok() {
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

    fn commit_group(&self, group: &[Pending]) -> Result<Vec<WriteReceipt>> {
        self.check_ok()?;
        let mut w = self.writer.lock();
        self.make_room(&mut w)?;
        let mem = self.view.read().mem.clone();
        let mut payloads = Vec::with_capacity(group.len());
        let mut receipts = Vec::with_capacity(group.len());
        // Local writes carry what this node knows of other regions (`REPLICATION.md` §2).
        let knowledge = self.knowledge.lock().clone();
        for p in group {
            let seqno = w.last_seqno + 1;
            let s = SystemTime(self.hlc.stamp());
            let local = knowledge.merge(&VersionVector::single(self.opts.region, s.0));
            payloads.push(p.batch.encode(seqno, s, &local));
            receipts.push(WriteReceipt { seqno, system_time: s });
            w.last_seqno = seqno;
        }
        let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        let durable = (|| -> Result<()> {
            w.wal.append(&refs)?;
            if group.iter().any(|p| p.durability == Durability::Sync) && w.wal.sync()? {
                self.counters.wal_syncs.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })();
        if let Err(e) = durable {
            self.fail(&e);
            return Err(e);
        }
        let mut decoded = Vec::with_capacity(payloads.len());
        for p in &payloads {
            match batch::decode_trusted(p) {
                Ok(b) => decoded.push(b),
                Err(w) => {
                    let e = Error::PreviousError(format!("internal: a batch this engine encoded does not decode: {w}"));
                    self.fail(&e);
                    return Err(e);
                }
            }
        }
        // The hot tier learns of every version before it is published (see `src/hot.rs`).
        let announced = self.hot.as_ref().map(|hot| announce(hot, &decoded)).unwrap_or_default();
        for b in &decoded {
            insert_batch(&mem, b);
        }
        mem.set_last_seqno(w.last_seqno);
        if let Some(r) = receipts.last() {
            self.visible.store(r.system_time.0, Ordering::Release);
        }
        if let Some(hot) = &self.hot {
            for token in announced {
                hot.write_end(token);
            }
        }
        if let Some(r) = receipts.last() {
            self.own_stamp_max.fetch_max(r.system_time.0, Ordering::AcqRel);
        }
        self.published_seqno.store(w.last_seqno, Ordering::Release);
        self.counters.write_groups.fetch_add(1, Ordering::Relaxed);
        if self.opts.replication_log_bytes > 0 {
            drop(decoded);
            let first = w.last_seqno + 1 - payloads.len() as u64;
            let mut tail = self.log_tail.lock();
            for (i, p) in payloads.into_iter().enumerate() {
                tail.push(first + i as u64, p);
            }
        }
        if mem.approximate_bytes() >= self.opts.memtable_bytes {
            self.notify_work();
        }
        Ok(receipts)
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
            let stalled =
                view.imms.len() >= IMMUTABLE_MEMTABLES_MAX || view.version.levels[0].len() >= self.opts.l0_stop_writes;
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
        let result = (|| -> Result<()> {
            // Every segment but the newest is complete and synced (see crate::wal).
            w.wal.sync()?;
            let number = self.versions.lock().new_file_number();
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
        if let Err(e) = &result {
            self.fail(e);
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

/// Calls [`crate::hot::HotTier::write_begin`] once per run of writes to one entity in the
/// batches; returns the tokens for the matching `write_end`s.
pub(super) fn announce(hot: &crate::hot::HotTier, batches: &[batch::DecodedBatch<'_>]) -> Vec<crate::hot::WriteToken> {
    let mut tokens = Vec::new();
    for b in batches {
        for run in b.ops.chunk_by(|x, y| x.entity == y.entity) {
            let cells = run.iter().map(|op| (op.feature, op.event_time, op.system_time, op.cell));
            tokens.push(hot.write_begin(run[0].entity, cells));
        }
    }
    tokens
}

/// Inserts a decoded batch into a memtable.
pub(super) fn insert_batch(mem: &Memtable, b: &batch::DecodedBatch<'_>) {
    for op in &b.ops {
        mem.insert(key::encode(op.entity, op.feature, op.event_time, op.system_time), op.cell.to_vec());
    }
}
