//! Background work: flushing immutable memtables and compacting levels.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{Inner, Work};
use crate::cell;
use crate::compaction::{self, Decision, PickerOptions, Plan, Retention, RetentionFilter};
use crate::iter::MergingIter;
use crate::key;
use crate::manifest::{FileMeta, VersionEdit};
use crate::sstable::{Table, TableWriter};
use crate::version::TableHandle;
use crate::wal;
use crate::Result;

/// A background thread's job.
#[derive(Debug, Clone, Copy)]
pub(super) enum Job {
    Flush,
    Compact,
    SyncWal,
}

/// The loop of a background thread. A panic in a job stops the engine (writes fail with
/// `PreviousError`) instead of leaving writers stalled behind work that will never finish.
pub(super) fn run(inner: &Inner, job: Job) {
    while !inner.shutdown.load(Ordering::Acquire) && inner.bg_error.lock().is_none() {
        let did = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match job {
            Job::Flush => inner.flush_oldest(),
            Job::Compact => inner.compact_once(),
            Job::SyncWal => {
                inner.probe_wal_space();
                let wal = inner.current_wal.lock().clone();
                if wal.unsynced_bytes() > 0 && wal.sync()? {
                    inner.counters.wal_syncs.fetch_add(1, Ordering::Relaxed);
                }
                Ok(false)
            }
        }))
        .unwrap_or_else(|_| Err(crate::Error::PreviousError(format!("internal: background {job:?} job panicked"))));
        match did {
            Ok(true) => continue,
            Ok(false) => {
                let mut g = inner.work.lock();
                if !inner.shutdown.load(Ordering::Acquire) {
                    let wait = match job {
                        Job::Flush => Duration::from_millis(500),
                        Job::Compact => Duration::from_millis(500),
                        Job::SyncWal => inner.opts.async_sync_interval,
                    };
                    inner.work_cv.wait_for(&mut g, wait);
                }
            }
            // A full disk: the job left nothing behind and waits for space, then retries.
            Err(e) if e.is_no_space() => {
                let until = std::time::Instant::now() + super::NO_SPACE_RETRY_INTERVAL;
                let mut g = inner.work.lock();
                while !inner.shutdown.load(Ordering::Acquire) && std::time::Instant::now() < until {
                    inner.work_cv.wait_until(&mut g, until);
                }
            }
            Err(e) => inner.fail(&e),
        }
    }
}

impl Inner {
    fn picker_options(&self) -> PickerOptions {
        PickerOptions {
            l0_trigger: self.opts.l0_compaction_trigger,
            l1_bytes: self.opts.l1_bytes,
            level_multiplier: self.opts.level_multiplier,
        }
    }

    /// With [`crate::Background::Inline`]: flush a full memtable and run due compactions.
    pub(super) fn run_inline_work(&self) -> Result<()> {
        {
            let mut w = self.writer.lock();
            if self.view.read().mem.approximate_bytes() >= self.opts.memtable_bytes {
                self.switch_memtable(&mut w)?;
            }
        }
        while self.flush_oldest()? {}
        while self.compact_once()? {}
        Ok(())
    }

    /// Flushes the oldest immutable memtable into an L0 table. False if there was none.
    pub(super) fn flush_oldest(&self) -> Result<bool> {
        let _g = self.flush_lock.lock();
        self.check_ok()?;
        let Some(imm) = self.view.read().imms.last().cloned() else {
            self.background_has_space(Work::Flush);
            return Ok(false);
        };
        let mut created = None;
        let result = (|| -> Result<()> {
            // On a visibly full disk, wait without writing a byte.
            if let Some(e) = self.lacks_room_for(imm.approximate_bytes() as u64) {
                return Err(e);
            }
            let number = self.versions.lock().new_file_number();
            created = Some(number);
            let mut tw =
                TableWriter::create(self.fs.clone(), &self.dir, number, self.opts.block_bytes, self.opts.compression)?;
            imm.for_each(|k, v| tw.add(k, v))?;
            let mut edit = VersionEdit {
                log_number: Some(imm.wal_number() + 1),
                last_seqno: Some(imm.last_seqno()),
                ..Default::default()
            };
            let mut opened = Vec::new();
            if let Some(info) = tw.finish()? {
                let meta = FileMeta::from(info);
                let table = Table::open_in(self.fs.as_ref(), &self.dir, meta.number, Some(self.ssd.clone()))?;
                edit.added.push((0, meta.clone()));
                opened.push(TableHandle::new(meta, table, self.fs.clone()));
            }
            let mut vs = self.versions.lock();
            self.log_and_apply(&mut vs, edit, &opened, |view| {
                view.imms.retain(|m| !Arc::ptr_eq(m, &imm));
            })?;
            drop(vs);
            self.prune_wal(imm.wal_number() + 1);
            Ok(())
        })();
        match result {
            Ok(()) => {
                self.counters.flushes.fetch_add(1, Ordering::Relaxed);
                self.background_has_space(Work::Flush);
                self.notify_work();
                Ok(true)
            }
            // A full disk: the memtable stays immutable and in memory, its table goes, and
            // the flush is retried (see `run`).
            Err(e) if e.is_no_space() => {
                self.discard_tables(created.as_slice());
                self.background_full(Work::Flush, &e);
                Err(e)
            }
            Err(e) => {
                self.fail(&e);
                Err(e)
            }
        }
    }

    /// Deletes flushed WAL segments (numbered below `log_number`) that no replication peer
    /// needs (see `src/db/replicate.rs`).
    pub(super) fn prune_wal(&self, log_number: u64) {
        match self.prunable_segments(log_number) {
            Ok(doomed) => {
                for number in doomed {
                    if let Err(e) = self.fs.remove(&wal::segment_path(&self.dir, number)) {
                        tracing::warn!(segment = number, error = %e, "could not delete flushed WAL segment");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not list flushed WAL segments"),
        }
    }

    /// Runs one compaction if a level is over its target. False if none was due.
    pub(super) fn compact_once(&self) -> Result<bool> {
        let _g = self.compaction_lock.lock();
        self.check_ok()?;
        let plan = {
            let vs = self.versions.lock();
            compaction::pick(&vs.current, &self.picker_options(), &vs.cursor)
        };
        match plan {
            None => {
                self.background_has_space(Work::Compaction);
                Ok(false)
            }
            Some(p) => self.run_compaction(&p).map(|()| true),
        }
    }

    /// Merges every table into the bottom level.
    pub(super) fn compact_full(&self) -> Result<()> {
        let _g = self.compaction_lock.lock();
        self.check_ok()?;
        let plan = compaction::pick_full(&self.versions.lock().current);
        match plan {
            Some(p) => self.run_compaction(&p),
            None => Ok(()),
        }
    }

    /// Moves every table overlapping the internal-key range `[lo, hi]` down, level by level,
    /// into the deepest level (see [`compaction::pick_range`]). `hi = None`: no upper bound.
    pub(super) fn compact_range(&self, lo: &[u8], hi: Option<&[u8]>) -> Result<()> {
        let _g = self.compaction_lock.lock();
        self.check_ok()?;
        let (deepest, last) = {
            let vs = self.versions.lock();
            let last = vs.current.all_tables().map(|t| t.meta.largest.clone()).max();
            (compaction::deepest_level(&vs.current), last)
        };
        let Some(hi) = hi.map(<[u8]>::to_vec).or(last) else { return Ok(()) };
        for level in 0..deepest {
            let plan = compaction::pick_range(&self.versions.lock().current, level, deepest, lo, &hi);
            if let Some(p) = plan {
                self.run_compaction(&p)?;
            }
        }
        Ok(())
    }

    fn run_compaction(&self, plan: &Plan) -> Result<()> {
        let mut created = Vec::new();
        let result = self.run_compaction_inner(plan, &mut created);
        match &result {
            Ok(()) => self.background_has_space(Work::Compaction),
            // A full disk: the inputs stay in force and the outputs go.
            Err(e) if e.is_no_space() => {
                self.discard_tables(&created);
                self.background_full(Work::Compaction, e);
            }
            Err(e) => self.fail(e),
        }
        result
    }

    /// Whether any source but the tables numbered `inputs` (a compaction's) holds a version of
    /// the pair `prefix`, in the current view.
    fn held_outside(&self, inputs: &[u64], prefix: &[u8]) -> Result<bool> {
        let view = self.view.read().clone();
        if view.mem.has_prefix(prefix) || view.imms.iter().any(|m| m.has_prefix(prefix)) {
            return Ok(true);
        }
        for t in view.version.all_tables().filter(|t| !inputs.contains(&t.meta.number)) {
            if key::prefix_of(&t.meta.smallest) <= prefix
                && prefix <= key::prefix_of(&t.meta.largest)
                && t.table.may_contain_prefix(prefix)
            {
                let mut it = t.table.iter_filling(false);
                it.seek(prefix)?;
                if it.valid() && it.key().starts_with(prefix) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    fn run_compaction_inner(&self, plan: &Plan, created: &mut Vec<u64>) -> Result<()> {
        // Its outputs need room before its inputs go: on a disk that visibly lacks it, wait
        // without writing (a compaction that fills the disk would make writes fail meanwhile).
        if let Some(e) = self.lacks_room_for(plan.all_inputs().map(|t| t.meta.size).sum()) {
            return Err(e);
        }
        // The horizon as the manifest has it: `set_event_horizon` updates it while holding the
        // horizon write lock, so every accepted write below it is already in a memtable, and
        // reading it here never waits behind a stalled writer.
        let horizon = self.versions.lock().event_horizon;
        let cutoff = self
            .opts
            .retention_window
            .map(|w| self.opts.clock.now_us().saturating_sub(u64::try_from(w.as_micros()).unwrap_or(u64::MAX)));
        let log_cutoff = self
            .opts
            .served_log_retention
            .map(|w| self.opts.clock.now_us().saturating_sub(u64::try_from(w.as_micros()).unwrap_or(u64::MAX)));
        let retention = Retention { cutoff, horizon, bottom: plan.bottom, log_cutoff };
        // Every source outside the compaction, for the tombstone rule: the memtables and every
        // table that is not an input, at any level. A lower table can hold the pair even when it
        // does not overlap the inputs' key range (a pair's newer versions sort first), so "no
        // overlap below" is not enough. The sources are those of the view current at each
        // question: they hold at least what the view at the start held (a memtable flushed
        // since is a table now; only compactions, which this one excludes, remove tables), and
        // no memtable flushed meanwhile is kept in memory for the compaction's whole run.
        let input_numbers: Vec<u64> = plan.all_inputs().map(|t| t.meta.number).collect();
        let held_elsewhere = |prefix: &[u8]| self.held_outside(&input_numbers, prefix);

        let mut merge = MergingIter::new(crate::iter::table_runs(plan.all_inputs().cloned()));
        merge.seek(&[])?;
        let dropped = self.dropped_features.read().clone();
        let mut filter = RetentionFilter::new(retention).with_dropped_features(dropped);
        let mut outputs: Vec<Arc<TableHandle>> = Vec::new();
        let mut added: Vec<FileMeta> = Vec::new();
        let mut writer: Option<TableWriter> = None;
        let mut dropped = 0u64;
        let finish = |w: TableWriter, added: &mut Vec<FileMeta>, outputs: &mut Vec<Arc<TableHandle>>| -> Result<()> {
            if let Some(info) = w.finish()? {
                let meta = FileMeta::from(info);
                let table = Table::open_in(self.fs.as_ref(), &self.dir, meta.number, Some(self.ssd.clone()))?;
                outputs.push(TableHandle::new(meta.clone(), table, self.fs.clone()));
                added.push(meta);
            }
            Ok(())
        };
        while merge.valid() {
            let (k, v) = (merge.key(), merge.value());
            let keep = match filter.decide(k, cell::is_tombstone(v)) {
                Decision::Keep => true,
                Decision::Drop => false,
                Decision::TombstoneCandidate => held_elsewhere(key::prefix_of(k))?,
            };
            if keep {
                if let Some(w) = &writer {
                    let full =
                        w.size_estimate() >= self.opts.table_bytes || w.pairs() >= crate::limits::TABLE_PAIRS_MAX;
                    if full && w.at_prefix_boundary(k) {
                        if let Some(w) = writer.take() {
                            finish(w, &mut added, &mut outputs)?;
                        }
                    }
                }
                if writer.is_none() {
                    let number = self.versions.lock().new_file_number();
                    created.push(number);
                    writer = Some(TableWriter::create(
                        self.fs.clone(),
                        &self.dir,
                        number,
                        self.opts.block_bytes,
                        self.opts.compression,
                    )?);
                }
                if let Some(w) = &mut writer {
                    w.add(k, v)?;
                }
            } else {
                dropped += 1;
            }
            merge.step()?;
        }
        if let Some(w) = writer.take() {
            finish(w, &mut added, &mut outputs)?;
        }

        let mut vs = self.versions.lock();
        let mut edit = VersionEdit::default();
        for (level, tables) in vs.current.levels.iter().enumerate() {
            for t in tables {
                if input_numbers.contains(&t.meta.number) {
                    edit.deleted.push((level, t.meta.number));
                }
            }
        }
        edit.added = added.into_iter().map(|m| (plan.output_level, m)).collect();
        let (_, hi) = plan.key_range();
        if plan.level > 0 {
            vs.cursor[plan.level] = hi;
        }
        self.log_and_apply(&mut vs, edit, &outputs, |_| {})?;
        drop(vs);
        for t in plan.all_inputs() {
            t.mark_obsolete();
        }
        self.counters.compactions.fetch_add(1, Ordering::Relaxed);
        self.counters.entries_dropped.fetch_add(dropped, Ordering::Relaxed);
        self.notify_work();
        Ok(())
    }
}
