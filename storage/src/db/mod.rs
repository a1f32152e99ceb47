//! The engine: ties the WAL, memtables, tables, manifest and compaction together.
//!
//! # Concurrency
//! - Writers queue their batches; the writer at the head of the queue becomes the *leader*,
//!   takes every queued batch, stamps each with the next sequence number and system time,
//!   appends them to the WAL with one write, fsyncs once if any of them asked for `Sync`
//!   (group commit), inserts them into the memtable and publishes them. Followers wait.
//! - A conditional batch ([`Db::write_if`]) is checked by the leader, under the writer lock,
//!   against the published state and the group's earlier batches, just before it is stamped:
//!   replicated applies take the same lock, so nothing lands between a check and its commit.
//!   A batch whose expectations fail takes no sequence number; the rest of its group commits.
//! - Local writes and replicated applies share one commit path (`Inner::publish`): log, sync
//!   once if asked, insert, publish. It asserts its invariants in debug builds: sequence
//!   numbers dense, batch stamps rising above the visible stamp, the published sequence number
//!   rising.
//! - A batch becomes visible to readers only when it is published: reads cap their `known_at`
//!   at the *visible* system time, the stamp of the last published batch, so a reader never
//!   sees part of a batch, and never a batch that is not yet durable as it asked.
//! - Readers take a [`ReadView`] (an `Arc` of the memtable, the immutable memtables and the
//!   current [`Version`]) and never block on writers, flushes or compactions.
//!
//! Lock order: `horizon` (read, held by a writer for its whole write) → `commit` / `writer` →
//! `versions` → `view`; `flush_lock` → `versions`; `compaction_lock` → `versions`; `knowledge` is
//! taken last and alone (it never waits for another lock while held). `commit` is
//! never held while another lock is taken. Background jobs and `stats` never take `horizon` or
//! `writer`: a writer stalled for a flush or compaction holds both, so a job that waited on
//! them (behind a queued `set_event_horizon`) would deadlock. Compaction reads the horizon from
//! the version set instead, which `set_event_horizon` updates while holding `horizon` for
//! writing.

mod group;
mod jobs;
mod moved;
mod offline;
mod read;
mod recovery;
mod replicate;
mod window;
mod write;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex, RwLock};

pub use moved::{EntityFilter, HistoryReader, LocalLog, MOVED_ORIGIN_SEQNO};
pub use offline::{verify_dir, VerifyReport};
pub use read::{BatchRead, EntityVersions, Gathered, PairCursor, RawVersion, ScanItem, ScanIter, ScanRange};
pub use replicate::{
    ApplyReport, ShippedBatch, ShippedOp, SnapshotReader, SnapshotVersion, StreamId, REPLICATION_ENTITY,
    SHIPPED_VERSIONS_MAX, SOLE_STREAM, STREAM_MAX,
};
pub use window::AggQuery;
pub use write::{Expectation, Mismatch, WriteIf, WriteReceipt, EXPECTATIONS_MAX};

use crate::fs::{Fs, RealFs};
use crate::hlc::Hlc;
use crate::limits::LEVELS;
use crate::manifest::VersionEdit;
use crate::memtable::Memtable;
use crate::options::{Background, Options};
use crate::types::{AsOf, CellVersion, Durability, EntityKey, EventTime, FeatureId, SystemTime};
use crate::version::{TableHandle, Version};
use crate::wal::Segment;
use crate::{Error, Result, WriteBatch};

/// What readers read: the memtables and the file set at one moment.
#[derive(Debug, Clone)]
pub(crate) struct ReadView {
    pub(crate) mem: Arc<Memtable>,
    /// Newest first.
    pub(crate) imms: Vec<Arc<Memtable>>,
    pub(crate) version: Arc<Version>,
}

#[derive(Debug)]
struct ManifestWriter {
    file: Arc<dyn crate::fs::File>,
    number: u64,
    bytes: u64,
}

#[derive(Debug)]
pub(crate) struct VersionSet {
    current: Arc<Version>,
    manifest: Option<ManifestWriter>,
    next_file_number: u64,
    log_number: u64,
    last_seqno: u64,
    event_horizon: i64,
    cursor: [Vec<u8>; LEVELS],
    /// The knowledge vector as of the last edit (`REPLICATION.md` §2).
    knowledge: crate::types::VersionVector,
}

impl VersionSet {
    fn new_file_number(&mut self) -> u64 {
        let n = self.next_file_number;
        self.next_file_number += 1;
        n
    }
}

#[derive(Debug)]
struct WriterState {
    last_seqno: u64,
    wal: Arc<Segment>,
}

#[derive(Debug)]
struct Pending {
    batch: WriteBatch,
    expect: Vec<write::Expectation>,
    durability: Durability,
}

#[derive(Debug, Default)]
struct Counters {
    flushes: AtomicU64,
    compactions: AtomicU64,
    entries_dropped: AtomicU64,
    write_groups: AtomicU64,
    wal_syncs: AtomicU64,
    replication_conflicts: AtomicU64,
}

#[derive(Debug)]
pub(crate) struct Inner {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    opts: Options,
    view: RwLock<Arc<ReadView>>,
    versions: Mutex<VersionSet>,
    writer: Mutex<WriterState>,
    commit: group::GroupQueue<Pending, Result<WriteIf>>,
    current_wal: Mutex<Arc<Segment>>,
    visible: AtomicU64,
    /// Sequence number of the last published batch (for stats, without the writer lock).
    published_seqno: AtomicU64,
    hlc: Hlc,
    horizon: RwLock<i64>,
    /// The horizon as last set, for readers that must not queue behind writers on `horizon`
    /// (aggregate reads: `db/window.rs`).
    horizon_now: std::sync::atomic::AtomicI64,
    work: Mutex<()>,
    work_cv: Condvar,
    bg_error: Mutex<Option<String>>,
    /// Disk-full conditions, each cleared by the next success of the step that hit it.
    no_space: NoSpace,
    /// Set when the engine opened on a full disk: it serves reads and refuses every write.
    read_only: Option<String>,
    shutdown: AtomicBool,
    flush_lock: Mutex<()>,
    compaction_lock: Mutex<()>,
    counters: Counters,
    _lock: Box<dyn std::any::Any + Send + Sync>,
    ssd: Arc<crate::sstable::SsdTier>,
    /// What this node knows of other regions' writes: the join of the vectors of every batch
    /// it applied (`REPLICATION.md` §2). Local batches are stamped with it.
    knowledge: Mutex<crate::types::VersionVector>,
    /// Peers have applied this region's log through this sequence number (`u64::MAX` when no
    /// segment is kept for peers).
    log_needed_after: AtomicU64,
    /// Last sequence number of each flushed WAL segment kept for peers, learned lazily.
    segment_last_seqno: Mutex<std::collections::BTreeMap<u64, replicate::SegmentSummary>>,
    /// At least the greatest stamp of every version this node wrote itself: the clock's high
    /// water at open, then each local commit's stamp.
    own_stamp_max: AtomicU64,
    /// The greatest sequence number, and local batch's, of the segments pruned since open.
    pruned_log: Mutex<replicate::SegmentSummary>,
    /// The newest local batches, in memory, so peers that keep up are served without reading
    /// the WAL back (only when `replication_log_bytes > 0`).
    log_tail: Mutex<replicate::LogTail>,
    /// Every batch at or below it is published and, if local, in `log_tail` (when the tail is
    /// kept): what `local_log` may report as read through. `published_seqno` moves first.
    log_covered: AtomicU64,
    hot: Option<crate::hot::HotTier>,
    /// Partial aggregates of hours and days (`src/tiles.rs`); `None` when disabled.
    tiles: Option<crate::tiles::Tiles>,
    /// Feature ids whose versions compaction drops (rule 5 of `crate::compaction`), sorted.
    dropped_features: RwLock<Arc<Vec<u32>>>,
}

/// Where the disk was found full, and what the error said (see [`Error::NoSpace`]).
#[derive(Debug, Default)]
struct NoSpace {
    /// A WAL step found the disk full (an append, or a new segment): cleared by the next logged
    /// write, or once the disk has room again (checked by the WAL syncer).
    wal: Mutex<Option<WalFull>>,
    wal_set: AtomicBool,
    /// A flush, or a compaction: each cleared by the next run of its kind that finishes or
    /// finds nothing to do. While either is set, a writer that would wait for background
    /// work is refused instead.
    flush: Mutex<Option<String>>,
    compaction: Mutex<Option<String>>,
}

/// A WAL step that found the disk full.
#[derive(Debug, Clone)]
struct WalFull {
    what: String,
    /// Bytes it needed.
    needed: u64,
}

/// Free space, beyond what a refused WAL step needed, at which the refusal is lifted without
/// waiting for a write to succeed (and beyond a table's estimated size, at which background
/// work tries to write it).
pub const NO_SPACE_RESUME_MARGIN: u64 = 1 << 20;

/// The kinds of background work that can find the disk full.
#[derive(Debug, Clone, Copy)]
pub(super) enum Work {
    Flush,
    Compaction,
}

/// How long background work waits before it retries a step that found the disk full.
pub const NO_SPACE_RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// An open engine. Cheap to share behind an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct Db {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

/// Why an engine refuses writes (see [`Db::writes_refused`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WritesRefused {
    /// An I/O or internal error stopped writes until the engine is reopened.
    Stopped(String),
    /// Opened on a full disk: read-only until reopened with space to spare.
    ReadOnly(String),
    /// The disk is full; writes resume by themselves once space is freed.
    DiskFull(String),
}

impl WritesRefused {
    /// Every reason's short name (`stopped`, `read_only`, `disk_full`), for metrics labels.
    pub const REASONS: [&'static str; 3] = ["stopped", "read_only", "disk_full"];

    /// This reason's short name (one of [`WritesRefused::REASONS`]).
    pub fn reason(&self) -> &'static str {
        match self {
            WritesRefused::Stopped(_) => "stopped",
            WritesRefused::ReadOnly(_) => "read_only",
            WritesRefused::DiskFull(_) => "disk_full",
        }
    }
}

impl std::fmt::Display for WritesRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WritesRefused::Stopped(e) => write!(f, "stopped after an error: {e}"),
            WritesRefused::ReadOnly(e) => write!(f, "read-only: {e}"),
            WritesRefused::DiskFull(e) => write!(f, "disk full: {e}"),
        }
    }
}

/// A consistent read view of the engine (see [`Db::snapshot`]).
#[derive(Debug, Clone)]
pub struct Snapshot {
    inner: Arc<Inner>,
    view: Arc<ReadView>,
    visible: SystemTime,
}

impl Snapshot {
    /// `value_at` in this view (`None`: absent).
    pub fn value_at(&self, entity: &[u8], feature: FeatureId, q: AsOf) -> Result<Option<CellVersion>> {
        Ok(crate::asof::present(self.version_at(entity, feature, q)?))
    }

    /// The winning version in this view, tombstones included.
    pub fn version_at(&self, entity: &[u8], feature: FeatureId, q: AsOf) -> Result<Option<CellVersion>> {
        self.inner.get(&self.view, entity, feature, q, q.known_at.min(self.visible))
    }

    /// A cursor for sort-merge reads of this view, limited to versions known at `known_at`.
    pub fn pair_cursor(&self, known_at: SystemTime) -> PairCursor {
        PairCursor::new(self.view.clone(), known_at.min(self.visible))
    }
}

/// Figures about one level.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LevelStats {
    /// Tables in the level.
    pub tables: usize,
    /// Bytes of those tables.
    pub bytes: u64,
    /// Entries in those tables.
    pub entries: u64,
}

/// Engine figures.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Per level, L0 first.
    pub levels: Vec<LevelStats>,
    /// Bytes in the active memtable.
    pub memtable_bytes: usize,
    /// Immutable memtables waiting for flush.
    pub immutable_memtables: usize,
    /// Bytes in the immutable memtables.
    pub immutable_memtable_bytes: usize,
    /// Bytes the open tables hold in memory (their indexes and filters).
    pub table_memory_bytes: u64,
    /// Last sequence number written.
    pub last_seqno: u64,
    /// Greatest system time issued.
    pub system_time_high_water: u64,
    /// The event-time horizon.
    pub event_horizon: i64,
    /// Flushes done since open.
    pub flushes: u64,
    /// Compactions done since open.
    pub compactions: u64,
    /// Entries retention dropped since open.
    pub entries_dropped: u64,
    /// Write groups committed since open.
    pub write_groups: u64,
    /// WAL fsyncs since open.
    pub wal_syncs: u64,
    /// Block cache hits.
    pub block_cache_hits: u64,
    /// Block cache misses.
    pub block_cache_misses: u64,
    /// Bytes held by the block cache.
    pub block_cache_bytes: u64,
    /// Bytes the block cache may hold now: its share less the open tables' indexes and
    /// filters (see `sstable::cache`).
    pub block_cache_capacity: u64,
    /// The SSD tier's backend and counters.
    pub ssd: crate::sstable::SsdStats,
    /// Replicated versions found concurrent with their cell's winner since open.
    pub replication_conflicts: u64,
    /// The hot tier's counters (all zero when it is disabled).
    pub hot: crate::hot::HotStats,
    /// The tile cache's counters (all zero when it is disabled).
    pub tiles: crate::tiles::TileStats,
}

impl Db {
    /// Opens (or creates) the engine in directory `dir` on the local file system.
    pub fn open(dir: impl AsRef<Path>, opts: Options) -> Result<Db> {
        Self::open_with_fs(Arc::new(RealFs), dir.as_ref(), opts)
    }

    /// Opens the engine on a given file system (tests use [`crate::fs::MemFs`]).
    pub fn open_with_fs(fs: Arc<dyn Fs>, dir: &Path, opts: Options) -> Result<Db> {
        let inner = Arc::new(recovery::open(fs, dir, opts)?);
        inner.charge_table_memory(&inner.versions.lock().current);
        let mut threads = Vec::new();
        if inner.opts.background == Background::Threads {
            for job in [jobs::Job::Flush, jobs::Job::Compact, jobs::Job::SyncWal] {
                let i = inner.clone();
                let name = format!("quiver-{job:?}").to_lowercase();
                let h = std::thread::Builder::new()
                    .name(name)
                    .spawn(move || jobs::run(&i, job))
                    .map_err(|e| Error::io(dir, e))?;
                threads.push(h);
            }
        }
        Ok(Db { inner, threads })
    }

    /// Writes a batch atomically. Returns once the batch is visible to reads and as durable as
    /// `durability` asks. A rejected batch changes nothing.
    pub fn write(&self, batch: WriteBatch, durability: Durability) -> Result<WriteReceipt> {
        match self.inner.write(batch, Vec::new(), durability)? {
            WriteIf::Committed(r) => Ok(r),
            WriteIf::Refused(_) => {
                Err(Error::PreviousError("internal: a write without expectations was refused".into()))
            }
        }
    }

    /// Compare-and-swap: writes `batch` atomically only if every expectation holds, checked
    /// under the writer lock in the same step as the commit, so no other commit (local write,
    /// replicated apply, snapshot apply) lands between the check and the write. Returns
    /// [`WriteIf::Refused`] with every failed expectation, and writes nothing, otherwise. Within
    /// one region, conditional writes are linearizable.
    pub fn write_if(&self, batch: WriteBatch, expect: Vec<Expectation>, durability: Durability) -> Result<WriteIf> {
        self.inner.write(batch, expect, durability)
    }

    /// The value of `(entity, feature)` as `storage/READS.md` defines `value_at`
    /// ([`crate::asof`]): `None` if absent (no version in the window, or a tombstone wins).
    pub fn value_at(&self, entity: &[u8], feature: FeatureId, q: AsOf) -> Result<Option<CellVersion>> {
        Ok(crate::asof::present(self.version_at(entity, feature, q)?))
    }

    /// The winning version of `value_at`, tombstones included.
    pub fn version_at(&self, entity: &[u8], feature: FeatureId, q: AsOf) -> Result<Option<CellVersion>> {
        let (view, known_at) = self.inner.read_view(q.known_at);
        self.inner.get(&view, entity, feature, q, known_at)
    }

    /// `value_at` for every entity x feature pair, in one consistent view. The result is row
    /// major: `out[e * features.len() + f]`.
    pub fn multi_get(
        &self,
        entities: &[EntityKey],
        features: &[FeatureId],
        q: AsOf,
    ) -> Result<Vec<Option<CellVersion>>> {
        let out = self.multi_version_at(entities, features, q)?;
        Ok(out.into_iter().map(crate::asof::present).collect())
    }

    /// Like [`Db::multi_get`], but returns the winning version itself, tombstones included
    /// (`value: None`): the online path tells "deleted" from "never written" and reads the
    /// event time for staleness. This is the batch path that fills the hot tier.
    pub fn multi_version_at(
        &self,
        entities: &[EntityKey],
        features: &[FeatureId],
        q: AsOf,
    ) -> Result<Vec<Option<CellVersion>>> {
        self.multi_version_at_charged(entities, features, q, &mut |_| true)
    }

    /// [`Db::multi_version_at`], charging the answer's memory as it grows: after each entity's
    /// values are read, `charge` is called with the bytes they hold (each answer's fixed size
    /// plus its value's heap bytes); when it returns false the read stops with
    /// [`Error::OverBudget`]. A caller bounds the memory of many concurrent reads with it (one
    /// entity's row past the budget at most).
    pub fn multi_version_at_charged(
        &self,
        entities: &[EntityKey],
        features: &[FeatureId],
        q: AsOf,
        charge: &mut dyn FnMut(usize) -> bool,
    ) -> Result<Vec<Option<CellVersion>>> {
        let read = self.inner.multi_get(entities, features, q, charge, None)?;
        Ok(read.versions)
    }

    /// [`Db::multi_version_at_charged`] under a deadline: the hot tier always answers, but
    /// pairs it misses are read from tables only while the read is expected to end before
    /// `deadline`, judged by the SSD tier's recent read latency
    /// ([`crate::sstable::SsdStats::round_latency_us`]) before each entity. Pairs not read are
    /// marked in [`BatchRead::unread`]. One round of block reads already started is not cut
    /// short, so a device slower than its recent latency can still pass the deadline by one
    /// round.
    pub fn multi_version_at_within(
        &self,
        entities: &[EntityKey],
        features: &[FeatureId],
        q: AsOf,
        charge: &mut dyn FnMut(usize) -> bool,
        deadline: Option<std::time::Instant>,
    ) -> Result<BatchRead> {
        self.inner.multi_get(entities, features, q, charge, deadline)
    }

    /// Sets the feature ids whose versions compactions from now on drop (rule 5 of
    /// `crate::compaction`): ids no reader can reach any more. Replaces the previous set; not
    /// persisted (the service sets it again after a restart).
    pub fn set_dropped_features(&self, features: &[FeatureId]) {
        let mut ids: Vec<u32> = features.iter().map(|f| f.0).collect();
        ids.sort_unstable();
        ids.dedup();
        let ids = Arc::new(ids);
        // The hot tier stops answering them first: from now on their reads go to the files.
        if let Some(hot) = &self.inner.hot {
            hot.set_dropped(&ids);
        }
        // Nor do tiles (see `src/tiles.rs`).
        if let Some(tiles) = &self.inner.tiles {
            tiles.set_dropped(&ids);
        }
        *self.inner.dropped_features.write() = ids;
    }

    /// A system time no earlier than any version a read that ended before this call could
    /// see (the clock's high-water mark, or the wall clock if later): replaying such a read
    /// with this as `known_at` sees what it saw.
    pub fn system_time_now(&self) -> SystemTime {
        SystemTime(self.inner.hlc.high_water().max(self.inner.hlc.wall_us()))
    }

    /// Test-only: every round of data-block reads from files first sleeps `delay` (a slow
    /// device), so tests can show what a deadline does.
    #[cfg(feature = "testing")]
    pub fn set_ssd_read_delay(&self, delay: std::time::Duration) {
        self.inner.ssd.set_read_delay(delay);
    }

    /// The batches this region wrote with sequence numbers above `after` (at most `max`), as
    /// replication ships them. [`Error::LogTruncated`] if the log no longer holds them all.
    pub fn origin_log(&self, after: u64, max: usize) -> Result<Vec<ShippedBatch>> {
        self.inner.origin_log(after, max)
    }

    /// Applies a batch another region wrote (`REPLICATION.md` §3), with its cursor, as one
    /// atomic write. A batch at or below the cursor for its origin changes nothing.
    pub fn apply_replicated(&self, batch: &ShippedBatch, durability: Durability) -> Result<ApplyReport> {
        let r = self.inner.apply_replicated(batch, durability)?;
        if self.inner.opts.background == Background::Inline && !r.already_applied {
            if let Err(e) = self.inner.run_inline_work() {
                tracing::error!(error = %e, "inline background work failed");
            }
        }
        Ok(r)
    }

    /// Applies several batches shipped by their origins, in order, as one group: like
    /// [`Db::apply_replicated`] on each, with one WAL sync for all, and all published together
    /// (with `Sync`, none is visible before all are durable). Any bad batch refuses the whole
    /// group, with nothing written.
    pub fn apply_replicated_batches(
        &self,
        batches: &[ShippedBatch],
        durability: Durability,
    ) -> Result<Vec<ApplyReport>> {
        self.apply_replicated_stream(SOLE_STREAM, batches, durability)
    }

    /// [`Db::apply_replicated_batches`] of batches from `stream` of their origin region (one
    /// node of a sharded region, `REPLICATION.md` §7): the cursor is that stream's.
    pub fn apply_replicated_stream(
        &self,
        stream: StreamId,
        batches: &[ShippedBatch],
        durability: Durability,
    ) -> Result<Vec<ApplyReport>> {
        let r = self.inner.apply_replicated_group(stream, batches, durability)?;
        if self.inner.opts.background == Background::Inline && r.iter().any(|r| !r.already_applied) {
            if let Err(e) = self.inner.run_inline_work() {
                tracing::error!(error = %e, "inline background work failed");
            }
        }
        Ok(r)
    }

    /// A consistent snapshot of every cell this node replicates (each cell's current
    /// version), to bootstrap a peer that is behind the retained log; the peer applies it
    /// with [`Db::apply_snapshot`] and continues from the log after
    /// [`SnapshotReader::through`].
    pub fn replication_snapshot(&self) -> Result<SnapshotReader> {
        self.inner.replication_snapshot()
    }

    /// Applies part of a peer's snapshot (`REPLICATION.md` §5): every version is resolved as a
    /// replicated one is; `through` (on the last part) raises the cursor for `origin` to the
    /// snapshot's sequence number, never lowering it.
    pub fn apply_snapshot(
        &self,
        origin: crate::types::RegionId,
        versions: &[SnapshotVersion],
        through: Option<u64>,
        durability: Durability,
    ) -> Result<ApplyReport> {
        self.apply_snapshot_stream(origin, SOLE_STREAM, versions, through, durability)
    }

    /// [`Db::apply_snapshot`] of a snapshot of `stream`'s node: `through` raises that stream's
    /// cursor.
    pub fn apply_snapshot_stream(
        &self,
        origin: crate::types::RegionId,
        stream: StreamId,
        versions: &[SnapshotVersion],
        through: Option<u64>,
        durability: Durability,
    ) -> Result<ApplyReport> {
        let r = self.inner.apply_snapshot(origin, stream, versions, through, durability)?;
        if self.inner.opts.background == Background::Inline {
            if let Err(e) = self.inner.run_inline_work() {
                tracing::error!(error = %e, "inline background work failed");
            }
        }
        Ok(r)
    }

    /// Every version (full history, tombstones included) of the user entities `keep` accepts,
    /// from one read view, for moving them to another node of this region
    /// (`server/CLUSTER.md` §5); [`HistoryReader::through`] says where [`Db::local_log`]
    /// continues.
    pub fn history(&self, keep: EntityFilter) -> Result<HistoryReader> {
        self.inner.history(keep)
    }

    /// The sequence number [`Db::local_log`] can read through now: every batch at or below it
    /// is published and, if local, readable from the log.
    pub fn log_head(&self) -> u64 {
        self.inner.log_covered.load(Ordering::Acquire)
    }

    /// This node's local batches after `after` (at most `max`), every op kept, and how far they
    /// reach. [`Error::LogTruncated`] if the log no longer holds them all.
    pub fn local_log(&self, after: u64, max: usize) -> Result<LocalLog> {
        self.inner.local_log(after, max)
    }

    /// Applies versions moved from another node of this region verbatim: same keys, same
    /// cells; a key held already is skipped. User entities and idempotency records only; at
    /// most [`SHIPPED_VERSIONS_MAX`]. Returns how many were inserted.
    pub fn apply_moved(&self, versions: &[SnapshotVersion], durability: Durability) -> Result<u64> {
        let n = self.inner.apply_moved(versions, durability)?;
        if self.inner.opts.background == Background::Inline && n > 0 {
            if let Err(e) = self.inner.run_inline_work() {
                tracing::error!(error = %e, "inline background work failed");
            }
        }
        Ok(n)
    }

    /// The origin sequence number this node has applied `origin`'s log through (0: none).
    pub fn replication_cursor(&self, origin: crate::types::RegionId) -> Result<u64> {
        self.inner.replication_cursor(origin, SOLE_STREAM)
    }

    /// Every cursor this node keeps: (origin region, stream) -> the origin sequence number
    /// it has applied that stream through.
    pub fn replication_cursors(&self) -> Result<std::collections::BTreeMap<(crate::types::RegionId, StreamId), u64>> {
        self.inner.replication_cursors()
    }

    /// The origin sequence number this node has applied `origin`'s `stream` through (0: none).
    pub fn replication_cursor_of(&self, origin: crate::types::RegionId, stream: StreamId) -> Result<u64> {
        self.inner.replication_cursor(origin, stream)
    }

    /// Tells the engine that every replication peer has applied this region's batches through
    /// `seqno`: flushed WAL segments holding nothing newer may go. Until it is first called, every
    /// flushed segment is kept (up to `Options::replication_log_bytes`).
    pub fn retain_log_after(&self, seqno: u64) {
        self.inner.log_needed_after.store(seqno, Ordering::Release);
    }

    /// The sequence number of the last published batch (local or replicated): cheap, for
    /// waiting on new writes.
    pub fn last_seqno(&self) -> u64 {
        self.inner.published_seqno.load(Ordering::Acquire)
    }

    /// What this node knows of other regions' writes (see `REPLICATION.md` §2).
    pub fn knowledge(&self) -> crate::types::VersionVector {
        self.inner.knowledge.lock().clone()
    }

    /// A consistent read view: every read through it sees the same set of batches, whatever is
    /// written, flushed or compacted meanwhile (the view holds its files alive).
    pub fn snapshot(&self) -> Snapshot {
        let (view, visible) = self.inner.read_view(SystemTime::MAX);
        Snapshot { inner: self.inner.clone(), view, visible }
    }

    /// `aggregate_at` (`storage/READS.md`): `agg` over the versions of `(entity, feature)` in
    /// the window `w`, from one consistent view, the feature's values being of type `source`.
    /// It reads every version in the window (the brute-force answer; a numeric aggregate over
    /// another type, or a value of another type, is `InvalidArgument`).
    pub fn aggregate_at(
        &self,
        entity: &[u8],
        feature: FeatureId,
        source: crate::types::ValueType,
        agg: crate::agg::Agg,
        w: crate::agg::AggWindow,
    ) -> Result<crate::agg::AggValue> {
        // Refused before reading anything.
        window::check_query(&AggQuery { feature, source, agg, width_us: w.width_us })?;
        let mut range = ScanRange::entity(entity);
        range.features = Some((feature, feature));
        range.event_time_min = w.event_time_min();
        range.event_time_max = w.as_of;
        range.system_time_max = w.known_at;
        let mut versions = Vec::new();
        for item in self.scan(range)? {
            versions.push(item?.version);
        }
        Ok(crate::agg::aggregate_sorted(&versions, agg, source, w)?)
    }

    /// `aggregate_at` (`storage/READS.md`) of every query for every entity, at `as_of`, from
    /// one view read at `known_at`, folded from hour and day tiles where they answer
    /// (`src/tiles.rs`, `db/window.rs`) and from raw versions elsewhere: identical to
    /// [`Db::aggregate_at`] per entity and query. `keep_going` is asked before each entity;
    /// once it says no, that entity and the rest are left unread (`None`). The raw versions
    /// the read holds at its peak are offered to `charge` (false refuses the read with
    /// [`Error::OverBudget`]).
    pub fn aggregates_at(
        &self,
        entities: &[Vec<u8>],
        queries: &[AggQuery],
        as_of: EventTime,
        known_at: SystemTime,
        mut keep_going: impl FnMut() -> bool,
        charge: &mut dyn FnMut(usize) -> bool,
    ) -> Result<Vec<Option<Vec<crate::agg::AggAnswer>>>> {
        for q in queries {
            window::check_query(q)?;
        }
        for e in entities {
            crate::types::check_entity_key(e)?;
        }
        let tiles = self.inner.tiles.as_ref();
        // Tickets before the view (see `src/tiles.rs`).
        let tickets: Vec<_> = tiles.map(|t| entities.iter().map(|e| t.ticket(e)).collect()).unwrap_or_default();
        let (view, known_at) = self.inner.read_view(known_at);
        let mut scratch = Vec::new();
        // Each step's raw versions are dropped before the next: the peak is charged.
        let mut peak = 0usize;
        let mut charge_peak = |bytes: usize| {
            let more = bytes.saturating_sub(peak);
            peak = peak.max(bytes);
            more == 0 || charge(more)
        };
        let mut out = Vec::with_capacity(entities.len());
        for (i, e) in entities.iter().enumerate() {
            if !keep_going() {
                break;
            }
            let mut answers = Vec::with_capacity(queries.len());
            for q in queries {
                let t = tiles.zip(tickets.get(i).copied());
                answers.push(self.inner.window_answer(
                    &view,
                    known_at,
                    e,
                    q,
                    as_of,
                    t,
                    &mut scratch,
                    &mut charge_peak,
                )?);
            }
            out.push(Some(answers));
        }
        out.resize(entities.len(), None);
        Ok(out)
    }

    /// Every version in `range`, in key order (entity, feature, event time descending, system
    /// time descending), streamed from one consistent view.
    pub fn scan(&self, range: ScanRange) -> Result<ScanIter> {
        self.inner.scan(range)
    }

    /// Flushes every memtable to L0 and waits for it.
    pub fn flush(&self) -> Result<()> {
        self.inner.flush_all()
    }

    /// Flushes, then merges all tables into the bottom level, applying retention everywhere.
    pub fn compact_all(&self) -> Result<()> {
        self.inner.flush_all()?;
        self.inner.compact_full()
    }

    /// Flushes, then compacts the entities `start <= entity < end` (encoded entity keys;
    /// `end = None`: to the last entity) into the deepest level, applying retention there.
    /// Tables are whole units, so data of neighbouring entities in the same tables is
    /// rewritten too. Refused if `end <= start`.
    pub fn compact_range(&self, start: &[u8], end: Option<&[u8]>) -> Result<()> {
        if end.is_some_and(|e| e <= start) {
            return Err(Error::InvalidArgument("compact range: end must be after start".into()));
        }
        let lo = crate::key::entity_prefix(start);
        // Every key of an entity before `end` sorts before `end`'s prefix.
        let hi = end.map(crate::key::entity_prefix);
        self.inner.flush_all()?;
        self.inner.compact_range(&lo, hi.as_deref())
    }

    /// Runs compactions until no level is over its target.
    pub fn compact_pending(&self) -> Result<()> {
        while self.inner.compact_once()? {}
        Ok(())
    }

    /// Moves the event-time horizon forward (persisted). Writes with an event time below it are
    /// refused from now on, and compaction may forget history below it (see
    /// [`crate::compaction`]).
    pub fn set_event_horizon(&self, t: EventTime) -> Result<()> {
        self.inner.set_event_horizon(t)
    }

    /// Why writes are refused now, if they are: the engine stopped after an error (until it is
    /// reopened), it opened read-only on a full disk (until it is reopened), or the disk is full
    /// (until space is freed: the engine retries by itself). Reads work in every case.
    pub fn writes_refused(&self) -> Option<WritesRefused> {
        let i = &self.inner;
        if let Some(e) = i.bg_error.lock().as_ref() {
            return Some(WritesRefused::Stopped(e.clone()));
        }
        if let Some(e) = &i.read_only {
            return Some(WritesRefused::ReadOnly(e.clone()));
        }
        if let Some(w) = i.no_space.wal.lock().as_ref() {
            return Some(WritesRefused::DiskFull(w.what.clone()));
        }
        let view = i.view.read().clone();
        i.stalled_for_space(&view).map(|e| WritesRefused::DiskFull(e.to_string()))
    }

    /// Whether flushes, and compactions, are waiting for disk space (the last run of each
    /// found the disk full). Writes go on meanwhile until memtables or level 0 fill up; then
    /// they are refused ([`Db::writes_refused`]).
    pub fn background_waiting_for_space(&self) -> (bool, bool) {
        let n = &self.inner.no_space;
        (n.flush.lock().is_some(), n.compaction.lock().is_some())
    }

    /// Engine figures.
    pub fn stats(&self) -> Stats {
        self.inner.stats()
    }

    /// Reads every table and checks every checksum and ordering; then folds every tile held
    /// again from the raw versions of its range and checks it answers the same
    /// (`src/tiles.rs`).
    pub fn verify(&self) -> Result<()> {
        self.inner.verify()?;
        self.inner.verify_tiles()?;
        Ok(())
    }

    /// Writes a consistent copy of the engine into the new or empty directory `target` by hard
    /// links (same file system), containing every batch acknowledged before the call. The copy
    /// opens as an engine of its own.
    pub fn checkpoint(&self, target: &Path) -> Result<()> {
        self.inner.checkpoint(target)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Stops background work and syncs the WAL. Dropping the engine does the same but cannot
    /// report an error.
    pub fn close(mut self) -> Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> Result<()> {
        self.inner.shutdown.store(true, Ordering::Release);
        {
            let _g = self.inner.work.lock();
            self.inner.work_cv.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let wal = self.inner.current_wal.lock().clone();
        if self.inner.bg_error.lock().is_none() {
            wal.sync()?;
        }
        Ok(())
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %e, "closing the engine");
        }
    }
}

impl Inner {
    fn check_ok(&self) -> Result<()> {
        if let Some(e) = self.bg_error.lock().as_ref() {
            return Err(Error::PreviousError(e.clone()));
        }
        if let Some(what) = &self.read_only {
            return Err(Error::NoSpace { path: self.dir.clone(), what: what.clone(), read_only: true });
        }
        if self.shutdown.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// Records an error that leaves the engine's state uncertain; writes are refused from now on.
    fn fail(&self, e: &Error) {
        let mut g = self.bg_error.lock();
        if g.is_none() {
            tracing::error!(error = %e, "engine stops accepting writes");
            *g = Some(e.to_string());
        }
        drop(g);
        let _w = self.work.lock();
        self.work_cv.notify_all();
    }

    /// Records that a WAL step needing `needed` bytes found the disk full (the step left
    /// nothing behind).
    fn wal_full(&self, e: &Error, needed: u64) {
        let mut g = self.no_space.wal.lock();
        if g.is_none() {
            tracing::warn!(error = %e, "disk full: writes are refused until space is freed");
        }
        *g = Some(WalFull { what: e.to_string(), needed });
        self.no_space.wal_set.store(true, Ordering::Release);
    }

    /// Lifts a WAL refusal once the disk has room for the refused step and a margin (so
    /// readiness recovers without a client having to try a write first).
    pub(super) fn probe_wal_space(&self) {
        if !self.no_space.wal_set.load(Ordering::Acquire) {
            return;
        }
        let Some(available) = self.fs.available_bytes(&self.dir) else { return };
        let mut g = self.no_space.wal.lock();
        if g.as_ref().is_some_and(|w| available >= w.needed.saturating_add(NO_SPACE_RESUME_MARGIN)) {
            *g = None;
            self.no_space.wal_set.store(false, Ordering::Release);
            tracing::info!(available, "disk space is back: writes are taken again");
        }
    }

    /// NoSpace without writing a byte, if the disk visibly lacks room for `estimate` bytes of
    /// tables (and the margin); `None` when it has room or cannot tell.
    pub(super) fn lacks_room_for(&self, estimate: u64) -> Option<Error> {
        let available = self.fs.available_bytes(&self.dir)?;
        (available < estimate.saturating_add(NO_SPACE_RESUME_MARGIN)).then(|| Error::NoSpace {
            path: self.dir.clone(),
            what: format!("needs about {estimate} bytes for new tables, {available} available"),
            read_only: false,
        })
    }

    /// A write was logged: the WAL has space again.
    fn wal_has_space(&self) {
        if self.no_space.wal_set.load(Ordering::Acquire) {
            self.no_space.wal_set.store(false, Ordering::Release);
            if self.no_space.wal.lock().take().is_some() {
                tracing::info!("disk space is back: writes are logged again");
            }
        }
    }

    fn work_slot(&self, work: Work) -> &Mutex<Option<String>> {
        match work {
            Work::Flush => &self.no_space.flush,
            Work::Compaction => &self.no_space.compaction,
        }
    }

    /// Records that a flush or compaction found the disk full (it left nothing behind).
    pub(super) fn background_full(&self, work: Work, e: &Error) {
        let mut g = self.work_slot(work).lock();
        if g.is_none() {
            tracing::warn!(error = %e, ?work, "disk full: background work waits for space");
        }
        *g = Some(e.to_string());
    }

    /// A flush or compaction finished, or found nothing to do: it no longer waits for space.
    pub(super) fn background_has_space(&self, work: Work) {
        if self.work_slot(work).lock().take().is_some() {
            tracing::info!(?work, "disk space is back: background work runs again");
        }
    }

    /// NoSpace if writers would wait for background work that waits for space: too many
    /// immutable memtables while flushes find the disk full, or too many level-0 tables while
    /// compactions do.
    pub(super) fn stalled_for_space(&self, view: &ReadView) -> Option<Error> {
        let what = if view.imms.len() >= self.opts.immutable_memtables_max {
            self.no_space.flush.lock().clone()
        } else {
            None
        };
        let what = what.or_else(|| {
            if view.version.levels[0].len() >= self.opts.l0_stop_writes {
                self.no_space.compaction.lock().clone()
            } else {
                None
            }
        })?;
        Some(Error::NoSpace {
            path: self.dir.clone(),
            what: format!("{what}; writes resume once background work finds space again"),
            read_only: false,
        })
    }

    /// Removes the files of tables a failed flush or compaction made (finished or not).
    fn discard_tables(&self, numbers: &[u64]) {
        for &n in numbers {
            let name = crate::sstable::table_name(n);
            for path in [self.dir.join(&name), self.dir.join(format!("{name}.tmp"))] {
                if self.fs.exists(&path) {
                    if let Err(e) = self.fs.remove(&path) {
                        tracing::warn!(path = %path.display(), error = %e, "could not remove a discarded table; it is removed at next open");
                    }
                }
            }
        }
    }

    fn notify_work(&self) {
        let _g = self.work.lock();
        self.work_cv.notify_all();
    }

    /// Appends `edit` to the manifest, then installs the new version (and applies `change` to
    /// the read view in the same step).
    fn log_and_apply(
        &self,
        vs: &mut VersionSet,
        mut edit: VersionEdit,
        opened: &[Arc<TableHandle>],
        change: impl FnOnce(&mut ReadView),
    ) -> Result<()> {
        edit.next_file_number = Some(vs.next_file_number);
        edit.hlc_high_water = Some(self.hlc.high_water());
        // What the node knows now covers at least what the tables and the WAL hold.
        let knowledge = self.knowledge.lock().clone();
        if !knowledge.is_empty() {
            vs.knowledge = knowledge.clone();
            edit.knowledge = Some(knowledge);
        }
        let next = vs.current.apply(&edit, opened);
        if let Err(what) = next.check() {
            let e = Error::PreviousError(format!("internal invariant broken by a version edit: {what}"));
            self.fail(&e);
            return Err(e);
        }
        if let Err(e) = self.append_edit(vs, &edit) {
            // A full disk left the manifest as it was (see `append_edit`): nothing changed.
            if !e.is_no_space() {
                self.fail(&e);
            }
            return Err(e);
        }
        if let Some(n) = edit.log_number {
            vs.log_number = n;
        }
        if let Some(n) = edit.last_seqno {
            vs.last_seqno = vs.last_seqno.max(n);
        }
        if let Some(h) = edit.event_horizon {
            vs.event_horizon = h;
        }
        vs.current = Arc::new(next);
        self.charge_table_memory(&vs.current);
        let mut view = self.view.write();
        let mut nv = ReadView::clone(&view);
        nv.version = vs.current.clone();
        change(&mut nv);
        *view = Arc::new(nv);
        Ok(())
    }

    /// Charges the indexes and filters of `version`'s tables to the block cache's share.
    fn charge_table_memory(&self, version: &Version) {
        if let Some(cache) = self.ssd.cache() {
            cache.reserve(version.all_tables().map(|t| t.table.memory_bytes()).sum());
        }
    }

    fn append_edit(&self, vs: &mut VersionSet, edit: &VersionEdit) -> Result<()> {
        let needs_rewrite = vs.manifest.as_ref().is_none_or(|m| m.bytes >= crate::limits::MANIFEST_BYTES_REWRITE);
        if needs_rewrite {
            // The snapshot written by the rewrite must include this edit: apply it first.
            return recovery::write_new_manifest(self.fs.as_ref(), &self.dir, vs, &self.hlc, Some(edit));
        }
        let m = vs.manifest.as_mut().ok_or(Error::Closed)?;
        let payload = edit.encode();
        if payload.len() > crate::limits::RECORD_BYTES_MAX {
            return Err(Error::InvalidArgument(format!(
                "a {}-byte version edit is over the record limit",
                payload.len()
            )));
        }
        let mut buf = Vec::new();
        crate::record::encode(m.number, &payload, &mut buf);
        if let Err(e) = m.file.append(&buf) {
            // Cut off whatever part of the edit reached the file; if that fails too, the
            // manifest's tail is unknown and the error is fatal.
            if e.is_no_space() {
                m.file.truncate(m.bytes).map_err(|t| Error::PreviousError(format!("{e}; then {t}")))?;
            }
            return Err(e);
        }
        m.file.sync()?;
        m.bytes += buf.len() as u64;
        Ok(())
    }

    fn set_event_horizon(&self, t: EventTime) -> Result<()> {
        self.check_ok()?;
        let mut h = self.horizon.write();
        if t.0 < *h {
            return Err(Error::InvalidArgument(format!(
                "event horizon can only move forward (now {}, asked {})",
                *h, t.0
            )));
        }
        let mut vs = self.versions.lock();
        self.log_and_apply(&mut vs, VersionEdit { event_horizon: Some(t.0), ..Default::default() }, &[], |_| {})?;
        *h = t.0;
        self.horizon_now.store(t.0, Ordering::Release);
        Ok(())
    }

    fn stats(&self) -> Stats {
        // Never takes the writer or horizon locks: stats must answer during a write stall.
        let view = self.view.read().clone();
        let event_horizon = self.versions.lock().event_horizon;
        let levels = view
            .version
            .levels
            .iter()
            .map(|l| LevelStats {
                tables: l.len(),
                bytes: l.iter().map(|t| t.meta.size).sum(),
                entries: l.iter().map(|t| t.meta.entries).sum(),
            })
            .collect();
        let c = &self.counters;
        let (block_cache_hits, block_cache_misses, block_cache_bytes) =
            self.ssd.cache().map_or((0, 0, 0), |b| b.figures());
        Stats {
            ssd: self.ssd.stats(),
            replication_conflicts: c.replication_conflicts.load(Ordering::Relaxed),
            hot: self.hot.as_ref().map(|h| h.stats()).unwrap_or_default(),
            tiles: self.tiles.as_ref().map(|t| t.stats()).unwrap_or_default(),
            block_cache_hits,
            block_cache_misses,
            block_cache_bytes,
            block_cache_capacity: self.ssd.cache().map_or(0, |c| c.capacity()),
            levels,
            memtable_bytes: view.mem.approximate_bytes(),
            immutable_memtables: view.imms.len(),
            immutable_memtable_bytes: view.imms.iter().map(|m| m.approximate_bytes()).sum(),
            table_memory_bytes: view.version.all_tables().map(|t| t.table.memory_bytes()).sum(),
            last_seqno: self.published_seqno.load(Ordering::Acquire),
            system_time_high_water: self.hlc.high_water(),
            event_horizon,
            flushes: c.flushes.load(Ordering::Relaxed),
            compactions: c.compactions.load(Ordering::Relaxed),
            entries_dropped: c.entries_dropped.load(Ordering::Relaxed),
            write_groups: c.write_groups.load(Ordering::Relaxed),
            wal_syncs: c.wal_syncs.load(Ordering::Relaxed),
        }
    }

    fn verify(&self) -> Result<()> {
        let view = self.view.read().clone();
        for t in view.version.all_tables() {
            let n = t.table.verify()?;
            if n != t.meta.entries {
                return Err(Error::corruption(
                    t.table.path(),
                    0,
                    format!("table holds {n} entries, the manifest says {}", t.meta.entries),
                ));
            }
        }
        Ok(())
    }
}
