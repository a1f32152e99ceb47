//! The engine's half of replication (`REPLICATION.md`): the origin's log of local batches, and
//! applying a peer's batch with a version-vector compare-and-swap per cell.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use super::Inner;
use crate::batch::{self, ResolvedOp};
use crate::cell;
use crate::fs;
use crate::key;
use crate::limits::BATCH_OPS_MAX;
use crate::record;
use crate::replication::{self, Resolution, Stamped};
use crate::types::{
    check_entity_key, AsOf, CellVersion, Durability, EventTime, FeatureId, RegionId, SystemTime, Value, VersionVector,
};
use crate::wal;
use crate::{Error, Result};

/// The reserved entity under which a node keeps, per origin region (the feature id) and
/// stream (the event time), how far it has applied that stream's log: an `Int64` of the
/// origin's sequence number, whose vector is what those batches taught it (`REPLICATION.md`
/// §2). See [`crate::reserved`].
pub const REPLICATION_ENTITY: &[u8] = crate::reserved::REPLICATION_CURSOR;

/// Which log of its origin region a batch comes from (`REPLICATION.md` §7): each node of a
/// sharded region numbers its own batches, so a receiver keeps one cursor per origin node.
/// [`SOLE_STREAM`] is the log of a region of one node. At most [`STREAM_MAX`].
pub type StreamId = u64;
/// The stream of a region of one node: the cursor every node kept before streams.
pub const SOLE_STREAM: StreamId = 0;
/// The greatest stream id (a cursor's event time holds it).
pub const STREAM_MAX: StreamId = i64::MAX as u64;

fn check_stream(stream: StreamId) -> Result<()> {
    if stream > STREAM_MAX {
        return Err(Error::InvalidArgument(format!("stream {stream} is over {STREAM_MAX}")));
    }
    Ok(())
}

/// How far ahead of this node's wall clock a shipped batch's stamp may be (one day): a
/// stamp beyond it is refused rather than dragging this node's clock along.
pub const REPLICATED_STAMP_AHEAD_MAX_US: u64 = 86_400_000_000;

/// One version of a batch as its origin ships it.
#[derive(Debug, Clone, PartialEq)]
pub struct ShippedOp {
    /// Entity key.
    pub entity: Vec<u8>,
    /// Feature.
    pub feature: FeatureId,
    /// Event time.
    pub event_time: EventTime,
    /// The encoded cell: value and version vector (see [`crate::cell`]).
    pub cell: Vec<u8>,
}

/// A batch written in its origin region, as shipped to peers.
#[derive(Debug, Clone, PartialEq)]
pub struct ShippedBatch {
    /// The region it was written in.
    pub origin: RegionId,
    /// Its sequence number there.
    pub seqno: u64,
    /// Its system time there (every version of the batch has it).
    pub system_time: SystemTime,
    /// Its versions.
    pub ops: Vec<ShippedOp>,
}

/// What applying a shipped batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// True if the batch was at or below this node's cursor for its origin (already applied):
    /// nothing was written.
    pub already_applied: bool,
    /// Versions inserted.
    pub applied: u64,
    /// Versions dropped as duplicates or superseded.
    pub dropped: u64,
    /// Versions concurrent with the cell's winner.
    pub conflicts: u64,
}

/// What a logged replicated batch teaches a node: the join of its versions' vectors (the
/// same at apply and at WAL replay). Empty for a local batch.
pub(super) fn learned(b: &batch::DecodedBatch<'_>) -> VersionVector {
    let mut k = VersionVector::new();
    if b.origin.is_some() {
        for op in &b.ops {
            if let Ok((_, v)) = cell::decode(op.cell) {
                k = k.merge(&v);
            }
        }
    }
    k
}

/// A cell: `(entity, feature, event time)`.
type CellId<'a> = (&'a [u8], FeatureId, EventTime);

/// Most versions in one shipped batch or snapshot part: each may become two ops (a kept loser
/// and a rewritten winner), and the cursor takes one more.
pub const SHIPPED_VERSIONS_MAX: usize = (BATCH_OPS_MAX - 1) / 2;

/// One version of a peer's snapshot: a cell's current version, with its own stamp.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotVersion {
    /// Entity key.
    pub entity: Vec<u8>,
    /// Feature.
    pub feature: FeatureId,
    /// Event time.
    pub event_time: EventTime,
    /// The version's system time at its origin.
    pub system_time: SystemTime,
    /// The encoded cell: value and version vector.
    pub cell: Vec<u8>,
}

/// A version being applied, checked and decoded.
struct Incoming {
    value: Option<Value>,
    vector: VersionVector,
    system_time: SystemTime,
    region: RegionId,
}

/// What applying does to the cursor of the batch's origin.
#[derive(Debug, Clone, Copy)]
enum CursorMove {
    /// A log batch: applied only above the cursor, which moves to it.
    Batch(u64),
    /// The end of a snapshot: the cursor moves up to it (never down).
    Raise(u64),
    /// A snapshot part: the cursor stays.
    Keep,
}

/// The newest local batches as logged (payloads), so `origin_log` serves peers that keep up
/// from memory. It holds every local batch with a sequence number at or above `covers_from`.
#[derive(Debug)]
pub(super) struct LogTail {
    batches: std::collections::VecDeque<(u64, Vec<u8>)>,
    bytes: usize,
    bytes_max: usize,
    covers_from: u64,
}

impl LogTail {
    /// An empty tail on a node whose last batch is `last_seqno`.
    pub(super) fn new(last_seqno: u64, bytes_max: usize) -> LogTail {
        LogTail { batches: Default::default(), bytes: 0, bytes_max, covers_from: last_seqno + 1 }
    }

    /// Adds the local batch `seqno` (pushed in increasing order), dropping the oldest past
    /// the bound.
    pub(super) fn push(&mut self, seqno: u64, payload: Vec<u8>) {
        debug_assert!(self.batches.back().is_none_or(|b| b.0 < seqno), "the log tail only grows forward");
        debug_assert!(seqno >= self.covers_from, "the log tail covers every batch from covers_from");
        self.bytes += payload.len();
        self.batches.push_back((seqno, payload));
        while self.bytes > self.bytes_max {
            let Some((s, p)) = self.batches.pop_front() else { break };
            self.bytes -= p.len();
            self.covers_from = s + 1;
        }
    }
}

/// A consistent snapshot of the cells this node replicates, for bootstrapping a peer: each
/// cell's current version (tombstones included), in key order. It holds its read view.
#[derive(Debug)]
pub struct SnapshotReader {
    scan: super::read::ScanIter,
    through: u64,
    replicated_prefixes: Vec<Vec<u8>>,
    last: Option<(Vec<u8>, FeatureId, EventTime)>,
}

impl SnapshotReader {
    /// The sequence number of this node's log the snapshot holds every batch through: a peer
    /// that applied it continues from the log after it.
    pub fn through(&self) -> u64 {
        self.through
    }
}

impl Iterator for SnapshotReader {
    type Item = Result<SnapshotVersion>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let item = match self.scan.next()? {
                Ok(i) => i,
                Err(e) => return Some(Err(e)),
            };
            let local_reserved = crate::reserved::is_reserved(&item.entity)
                && !self.replicated_prefixes.iter().any(|p| item.entity.starts_with(p));
            if local_reserved {
                continue;
            }
            // Versions of one cell come newest first: the first is the cell's winner.
            let id = (item.entity, item.feature, item.version.event_time);
            if self.last.as_ref() == Some(&id) {
                continue;
            }
            let mut cell_bytes = Vec::new();
            cell::encode(item.version.value.as_ref(), &item.version.version_vector, &mut cell_bytes);
            let v = SnapshotVersion {
                entity: id.0.clone(),
                feature: id.1,
                event_time: id.2,
                system_time: item.version.system_time,
                cell: cell_bytes,
            };
            self.last = Some(id);
            return Some(Ok(v));
        }
    }
}

/// What a closed WAL segment holds: its last sequence number and its last local batch's
/// (0: none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct SegmentSummary {
    pub(super) last: u64,
    pub(super) last_local: u64,
}

fn summarize(path: &std::path::Path, records: &record::Records) -> Result<SegmentSummary> {
    let mut s = SegmentSummary::default();
    for (offset, payload) in &records.records {
        let b = batch::decode(payload).map_err(|w| Error::corruption(path, *offset, w))?;
        s.last = b.seqno;
        if b.origin.is_none() {
            s.last_local = b.seqno;
        }
    }
    Ok(s)
}

impl Inner {
    /// A snapshot for a peer (see [`SnapshotReader`]).
    pub(super) fn replication_snapshot(&self) -> Result<SnapshotReader> {
        let through = self.published_seqno.load(Ordering::Acquire);
        let scan = self.scan(super::read::ScanRange::all())?;
        // Only durable batches leave the node (as in `origin_log`).
        let wal = self.current_wal.lock().clone();
        wal.sync()?;
        Ok(SnapshotReader { scan, through, replicated_prefixes: self.opts.replicated_prefixes.clone(), last: None })
    }

    /// A logged local batch as shipped. Reserved entities that are local to this node
    /// (idempotency keys, cursors) stay here; a batch of only those still ships, empty, to
    /// move the peer's cursor.
    fn shipped(&self, b: &batch::DecodedBatch<'_>) -> ShippedBatch {
        ShippedBatch {
            origin: self.opts.region,
            seqno: b.seqno,
            system_time: b.system_time,
            ops: b
                .ops
                .iter()
                .filter(|op| self.replicates(op.entity))
                .map(|op| ShippedOp {
                    entity: op.entity.to_vec(),
                    feature: op.feature,
                    event_time: op.event_time,
                    cell: op.cell.to_vec(),
                })
                .collect(),
        }
    }

    /// The batches this region wrote with sequence numbers above `after`, at most `max`: from
    /// the in-memory tail when it reaches back far enough, else from the WAL segments still on
    /// disk.
    pub(super) fn origin_log(&self, after: u64, max: usize) -> Result<Vec<ShippedBatch>> {
        self.log_after(after, max, &|b| self.shipped(b))
    }

    /// The local batches with sequence numbers above `after`, at most `max`, each as `ship`
    /// makes it (see [`Inner::origin_log`]).
    pub(super) fn log_after(
        &self,
        after: u64,
        max: usize,
        ship: &dyn Fn(&batch::DecodedBatch<'_>) -> ShippedBatch,
    ) -> Result<Vec<ShippedBatch>> {
        // Only durable batches leave the node: one lost in a crash must not be on a peer (the
        // origin would reuse its sequence number). Older segments were synced at their switch.
        // `published` first: everything published by then was appended to this segment or to
        // one synced at its switch.
        let published = self.published_seqno.load(Ordering::Acquire);
        let wal = self.current_wal.lock().clone();
        wal.sync()?;
        {
            let tail = self.log_tail.lock();
            if after + 1 >= tail.covers_from {
                let mut out = Vec::new();
                for (seqno, payload) in &tail.batches {
                    if *seqno <= after || *seqno > published {
                        continue;
                    }
                    if out.len() >= max {
                        break;
                    }
                    let b = batch::decode(payload).map_err(|w| Error::corruption(&self.dir, 0, w))?;
                    out.push(ship(&b));
                }
                return Ok(out);
            }
        }
        let mut segments: Vec<u64> =
            self.fs.list(&self.dir)?.iter().filter_map(|n| wal::parse_segment_name(n)).collect();
        segments.sort_unstable();
        let mut out = Vec::new();
        // The sequence numbers read so far must run without a gap from at most `after + 1`:
        // anything else means the log no longer holds a batch the peer may need.
        let mut prev: Option<u64> = None;
        let truncated = |first: u64| Error::LogTruncated { oldest: first };
        let current = wal.number();
        'segments: for &number in &segments {
            // A closed segment known to hold nothing after `after` is not read again.
            if number < current {
                if let Some(&summary) = self.segment_last_seqno.lock().get(&number) {
                    if summary.last <= after {
                        if summary.last > 0 {
                            prev = Some(summary.last);
                        }
                        continue;
                    }
                }
            }
            let path = wal::segment_path(&self.dir, number);
            let file = match self.fs.open(&path) {
                Ok(f) => f,
                // Deleted since the listing (flushed and released): the gap check below tells
                // whether it held anything the peer needs.
                Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let bytes = fs::read_all(file.as_ref())?;
            // The newest segment may end in a record being written: stop there.
            let records = record::read_all(&path, number, &bytes, true)?;
            if number < current {
                let summary = summarize(&path, &records)?;
                self.segment_last_seqno.lock().insert(number, summary);
            }
            for (offset, payload) in &records.records {
                let b = batch::decode(payload).map_err(|w| Error::corruption(&path, *offset, w))?;
                if b.seqno > published {
                    break 'segments;
                }
                match prev {
                    None if b.seqno > after + 1 && !self.gap_pruned(after, b.seqno) => return Err(truncated(b.seqno)),
                    Some(p) if b.seqno != p + 1 => return Err(truncated(b.seqno)),
                    _ => {}
                }
                prev = Some(b.seqno);
                if b.seqno <= after || b.origin.is_some() {
                    continue;
                }
                if out.len() >= max {
                    return Ok(out);
                }
                out.push(ship(&b));
            }
        }
        if after < published && prev.is_none_or(|p| p < published) && !self.gap_pruned(after, published + 1) {
            return Err(truncated(prev.map_or(published + 1, |p| p + 1)));
        }
        Ok(out)
    }

    /// The flushed WAL segments (numbered below `log_number`) that may be deleted: those whose
    /// batches every peer has applied, and then the oldest while the rest exceed
    /// `Options::replication_log_bytes`.
    pub(super) fn prunable_segments(&self, log_number: u64) -> Result<Vec<u64>> {
        let mut flushed: Vec<u64> = self
            .fs
            .list(&self.dir)?
            .iter()
            .filter_map(|n| wal::parse_segment_name(n))
            .filter(|&n| n < log_number)
            .collect();
        flushed.sort_unstable();
        let needed_after = self.log_needed_after.load(Ordering::Acquire);
        if needed_after == u64::MAX || self.opts.replication_log_bytes == 0 {
            return Ok(flushed);
        }
        let mut known = self.segment_last_seqno.lock();
        known.retain(|n, _| flushed.binary_search(n).is_ok());
        let mut doomed = Vec::new();
        let mut kept = Vec::new();
        for &number in &flushed {
            let path = wal::segment_path(&self.dir, number);
            let file = self.fs.open(&path)?;
            let size = file.size()?;
            let summary = match known.get(&number) {
                Some(&s) => s,
                None => {
                    let bytes = fs::read_all(file.as_ref())?;
                    let records = record::read_all(&path, number, &bytes, true)?;
                    let s = summarize(&path, &records)?;
                    known.insert(number, s);
                    s
                }
            };
            if summary.last <= needed_after {
                doomed.push(number);
            } else {
                kept.push((number, size, summary));
            }
        }
        let mut bytes: u64 = kept.iter().map(|k| k.1).sum();
        for (number, size, _) in &kept {
            if bytes <= self.opts.replication_log_bytes {
                break;
            }
            doomed.push(*number);
            bytes -= size;
        }
        // What goes: so a gap the pruning left is told from one that lost local batches.
        let mut pruned = self.pruned_log.lock();
        for n in &doomed {
            if let Some(s) = known.remove(n) {
                pruned.last = pruned.last.max(s.last);
                pruned.last_local = pruned.last_local.max(s.last_local);
            }
        }
        Ok(doomed)
    }

    /// Whether the sequence numbers from `after + 1` to `first - 1`, missing from the log, were
    /// pruned since this node opened and held no local batch (only replicated ones, which a
    /// peer does not need from this node). After a reopen nothing is known: a gap is a gap.
    fn gap_pruned(&self, after: u64, first: u64) -> bool {
        let pruned = self.pruned_log.lock();
        pruned.last + 1 >= first && pruned.last_local <= after
    }

    /// This node's cursor for `origin`'s `stream` and what those batches taught it, from
    /// `view`.
    fn cursor_in(&self, view: &super::ReadView, origin: RegionId, stream: StreamId) -> Result<(u64, VersionVector)> {
        let prefix = key::prefix(REPLICATION_ENTITY, FeatureId(origin));
        let at = EventTime(stream as i64);
        // The as-of read answers the greatest event time at or below `at`: another stream's
        // cursor when this one has none.
        match self.get_in_view(view, &prefix, AsOf::at(at), SystemTime::MAX, None)?.filter(|v| v.event_time == at) {
            Some(v) => match v.value {
                Some(Value::Int64(n)) => Ok((n as u64, v.version_vector)),
                _ => Err(Error::corruption(&self.dir, 0, "replication cursor cell is not an Int64")),
            },
            None => Ok((0, VersionVector::new())),
        }
    }

    /// This node's cursor for `origin`'s `stream`: the origin sequence number it has applied
    /// through.
    pub(super) fn replication_cursor(&self, origin: RegionId, stream: StreamId) -> Result<u64> {
        check_stream(stream)?;
        let (view, _) = self.read_view(SystemTime::MAX);
        Ok(self.cursor_in(&view, origin, stream)?.0)
    }

    /// Every replication cursor this node keeps: (origin region, stream) -> the origin
    /// sequence number applied through.
    pub(super) fn replication_cursors(&self) -> Result<BTreeMap<(RegionId, StreamId), u64>> {
        let mut out = BTreeMap::new();
        for item in self.scan(super::read::ScanRange::entity(REPLICATION_ENTITY))? {
            let item = item?;
            // Newest first within a cell: the first version of each is the cursor.
            if let (Some(Value::Int64(n)), Ok(stream)) = (&item.version.value, u64::try_from(item.version.event_time.0))
            {
                out.entry((item.feature.0, stream)).or_insert(*n as u64);
            }
        }
        Ok(out)
    }

    /// Whether `entity` replicates: user entities, and reserved ones under
    /// `Options::replicated_prefixes`.
    pub(super) fn replicates(&self, entity: &[u8]) -> bool {
        !crate::reserved::is_reserved(entity) || self.opts.replicated_prefixes.iter().any(|p| entity.starts_with(p))
    }

    /// Checks one shipped version: its entity, its cell, its stamp.
    fn check_shipped(
        &self,
        entity: &[u8],
        cell: &[u8],
        system_time: SystemTime,
    ) -> Result<(Option<Value>, VersionVector)> {
        check_entity_key(entity)?;
        if !self.replicates(entity) {
            return Err(Error::InvalidArgument("a shipped batch writes a reserved entity".into()));
        }
        let ahead_max = self.hlc.wall_us().saturating_add(REPLICATED_STAMP_AHEAD_MAX_US);
        if system_time.0 > ahead_max {
            return Err(Error::InvalidArgument(format!(
                "a shipped version is stamped {} µs, more than {REPLICATED_STAMP_AHEAD_MAX_US} µs ahead of this node's clock",
                system_time.0
            )));
        }
        cell::decode(cell).map_err(|w| Error::InvalidArgument(format!("shipped cell does not decode: {w}")))
    }

    /// Applies a batch shipped by its origin (see `REPLICATION.md` §3): under the writer lock,
    /// each version is resolved against its cell's winner, and the survivors, the rewritten
    /// winners and the new cursor are logged as one WAL record and published together.
    pub(super) fn apply_replicated(&self, b: &ShippedBatch, durability: Durability) -> Result<ApplyReport> {
        let mut r = self.apply_replicated_group(SOLE_STREAM, std::slice::from_ref(b), durability)?;
        Ok(r.pop().unwrap_or_default())
    }

    /// Applies part of a peer's snapshot (its cells' current versions, each with its own stamp
    /// and region read from its vector); the last part raises the cursor for `origin`'s
    /// `stream` to the sequence number the snapshot was taken at. Parts may be redelivered: a
    /// version already held is dropped as a duplicate.
    pub(super) fn apply_snapshot(
        &self,
        origin: RegionId,
        stream: StreamId,
        versions: &[SnapshotVersion],
        through: Option<u64>,
        durability: Durability,
    ) -> Result<ApplyReport> {
        if origin == self.opts.region {
            return Err(Error::InvalidArgument("a snapshot comes from this node's own region".into()));
        }
        check_stream(stream)?;
        if versions.len() > SHIPPED_VERSIONS_MAX {
            return Err(Error::InvalidArgument(format!(
                "a snapshot part holds at most {SHIPPED_VERSIONS_MAX} versions"
            )));
        }
        let mut cells: BTreeMap<CellId<'_>, Incoming> = BTreeMap::new();
        for v in versions {
            let (value, vector) = self.check_shipped(&v.entity, &v.cell, v.system_time)?;
            let region = replication::origin_or_guess(&vector, v.system_time);
            let id = (v.entity.as_slice(), v.feature, v.event_time);
            if cells.contains_key(&id) {
                return Err(Error::InvalidArgument("a snapshot part holds one cell twice".into()));
            }
            cells.insert(id, Incoming { value, vector, system_time: v.system_time, region });
        }
        let cursor = match through {
            Some(s) => CursorMove::Raise(s),
            None => CursorMove::Keep,
        };
        let mut r = self.apply_group(vec![Pending { origin, stream, cursor_move: cursor, cells }], durability)?;
        Ok(r.pop().unwrap_or_default())
    }

    /// Applies several batches shipped by their origins' `stream`, in order, as one group:
    /// each is resolved against the state the ones before it leave, all are logged (one record
    /// each) with one sync, then all are published together.
    pub(super) fn apply_replicated_group(
        &self,
        stream: StreamId,
        batches: &[ShippedBatch],
        durability: Durability,
    ) -> Result<Vec<ApplyReport>> {
        check_stream(stream)?;
        let mut group = Vec::with_capacity(batches.len());
        for b in batches {
            if b.origin == self.opts.region {
                return Err(Error::InvalidArgument(format!("batch {} comes from this node's own region", b.seqno)));
            }
            if b.seqno == 0 {
                return Err(Error::InvalidArgument("a shipped batch has sequence number 0".into()));
            }
            if b.ops.len() > SHIPPED_VERSIONS_MAX {
                return Err(Error::InvalidArgument(format!(
                    "a shipped batch holds at most {SHIPPED_VERSIONS_MAX} versions"
                )));
            }
            // Check everything first; the last write of a cell in the batch is the one that
            // counts.
            let mut cells: BTreeMap<CellId<'_>, Incoming> = BTreeMap::new();
            for op in &b.ops {
                let (value, vector) = self.check_shipped(&op.entity, &op.cell, b.system_time)?;
                // A version written at the origin carries `origin: stamp` (REPLICATION.md §1);
                // one written with an explicit vector may not, and is read as if it did, on
                // every node.
                let vector = vector.merge(&VersionVector::single(b.origin, b.system_time.0));
                let incoming = Incoming { value, vector, system_time: b.system_time, region: b.origin };
                cells.insert((op.entity.as_slice(), op.feature, op.event_time), incoming);
            }
            group.push(Pending { origin: b.origin, stream, cursor_move: CursorMove::Batch(b.seqno), cells });
        }
        self.apply_group(group, durability)
    }

    fn apply_group(&self, mut group: Vec<Pending<'_>>, durability: Durability) -> Result<Vec<ApplyReport>> {
        let mut would_know = self.knowledge.lock().clone();
        for p in &group {
            would_know = p.cells.values().fold(would_know, |k, c| k.merge(&c.vector));
        }
        if would_know.len() > crate::limits::VERSION_VECTOR_ENTRIES_MAX {
            return Err(Error::InvalidArgument(format!(
                "the batch names more than {} regions in all",
                crate::limits::VERSION_VECTOR_ENTRIES_MAX
            )));
        }
        let horizon = self.horizon.read();
        let mut reports = Vec::with_capacity(group.len());
        for p in &mut group {
            // Versions below this node's horizon are dropped (the horizon is a local policy);
            // the cursor still moves past the batch, or the origin's log would stall here.
            let before = p.cells.len();
            p.cells.retain(|k, _| !crate::reserved::below_horizon(k.0, k.2, *horizon));
            reports.push(ApplyReport { dropped: (before - p.cells.len()) as u64, ..Default::default() });
        }
        self.check_ok()?;
        let mut w = self.writer.lock();
        self.make_room(&mut w)?;
        let view = self.view.read().clone();
        // What the group has written so far: versions by key, and cursors by origin and stream.
        let mut overlay = Overlay::default();
        // Every version this node holds has a vector at or below `bound`: `K` (what it
        // applied), its own latest stamp, and what the group has planned so far. A version
        // whose vector is strictly above it dominates whatever its cell holds, and is applied
        // without reading the cell (REPLICATION.md §6).
        let own = VersionVector::single(self.opts.region, self.own_stamp_max.load(Ordering::Acquire));
        let mut bound = self.knowledge.lock().merge(&own);
        let mut payloads = Vec::new();
        let mut conflicts = 0;
        let group_len = group.len();
        for (i, (p, report)) in group.iter().zip(reports.iter_mut()).enumerate() {
            let (cursor, taught) = match overlay.cursors.get(&(p.origin, p.stream)) {
                Some(c) => c.clone(),
                None => self.cursor_in(&view, p.origin, p.stream)?,
            };
            let new_cursor = match p.cursor_move {
                CursorMove::Batch(s) if s <= cursor => {
                    *report = ApplyReport { already_applied: true, ..Default::default() };
                    continue;
                }
                CursorMove::Batch(s) => Some(s),
                CursorMove::Raise(s) => Some(s.max(cursor)),
                CursorMove::Keep => None,
            };
            if p.cells.is_empty() && new_cursor == Some(cursor) {
                continue;
            }
            if let Some(newest) = p.cells.values().map(|c| c.system_time.0).max() {
                self.hlc.observe(newest);
            }
            let mut ops = Vec::new();
            let mut batch_vector = VersionVector::new();
            // The versions of a batch usually share one vector: merge and compare it once.
            let mut last_vector: Option<(&VersionVector, bool)> = None;
            for ((entity, feature, event_time), inc) in &p.cells {
                let dominates = match last_vector {
                    Some((v, d)) if *v == inc.vector => d,
                    _ => {
                        batch_vector = batch_vector.merge(&inc.vector);
                        let d = bound.compare(&inc.vector) == crate::types::Causality::Before;
                        last_vector = Some((&inc.vector, d));
                        d
                    }
                };
                let prefix = key::prefix(entity, *feature);
                let id = (entity.to_vec(), *feature, *event_time);
                if dominates {
                    report.applied += 1;
                    let mut buf = Vec::new();
                    cell::encode(inc.value.as_ref(), &inc.vector, &mut buf);
                    ops.push(ResolvedOp {
                        entity: entity.to_vec(),
                        feature: *feature,
                        event_time: *event_time,
                        system_time: inc.system_time,
                        cell: buf,
                    });
                    continue;
                }
                let current = overlay.newest(&id, self.cell_in_view(&view, entity, *feature, *event_time)?);
                let incoming = Stamped { system_time: inc.system_time, region: inc.region, vector: &inc.vector };
                let current_stamped = current.as_ref().map(|c| Stamped {
                    system_time: c.system_time,
                    region: replication::origin_or_guess(&c.version_vector, c.system_time),
                    vector: &c.version_vector,
                });
                let op = |system_time: SystemTime, value: Option<&Value>, vector: &VersionVector| {
                    let mut buf = Vec::new();
                    cell::encode(value, vector, &mut buf);
                    ResolvedOp {
                        entity: entity.to_vec(),
                        feature: *feature,
                        event_time: *event_time,
                        system_time,
                        cell: buf,
                    }
                };
                match replication::resolve(current_stamped, incoming) {
                    Resolution::Drop => report.dropped += 1,
                    Resolution::Apply => {
                        report.applied += 1;
                        ops.push(op(inc.system_time, inc.value.as_ref(), &inc.vector));
                    }
                    Resolution::Conflict { incoming_wins, merged } => {
                        report.conflicts += 1;
                        let Some(c) = &current else { continue };
                        if incoming_wins {
                            ops.push(op(inc.system_time, inc.value.as_ref(), &merged));
                        } else {
                            // Keep the loser, unless its key (its stamp) is taken by the
                            // winner or by an older version of a greater region (two regions
                            // issued the same stamp: at one key the greater region's version
                            // stays, on every node, whatever the order of arrival), and give
                            // the winner the merged vector at its own key.
                            if inc.system_time != c.system_time {
                                let at = AsOf { as_of: *event_time, known_at: inc.system_time, lookback_us: Some(0) };
                                let taken = match overlay.at(&id, inc.system_time) {
                                    Some(v) => Some(v),
                                    None => self
                                        .get_in_view(&view, &prefix, at, inc.system_time, None)?
                                        .filter(|o| o.system_time == inc.system_time),
                                };
                                let taken_by =
                                    taken.map(|o| replication::origin_or_guess(&o.version_vector, o.system_time));
                                if taken_by.is_none_or(|r| r <= inc.region) {
                                    ops.push(op(inc.system_time, inc.value.as_ref(), &inc.vector));
                                }
                            }
                            ops.push(op(c.system_time, c.value.as_ref(), &merged));
                        }
                    }
                }
            }
            conflicts += report.conflicts;
            let stamp = SystemTime(self.hlc.stamp());
            // The cursor, with what this origin's batches taught, in the same record.
            let origin_seqno = match new_cursor {
                Some(s) => {
                    debug_assert!(s >= cursor, "a replication cursor never lowers ({cursor} -> {s})");
                    let taught = taught.merge(&batch_vector);
                    let mut cursor_cell = Vec::new();
                    cell::encode(Some(&Value::Int64(s as i64)), &taught, &mut cursor_cell);
                    ops.push(ResolvedOp {
                        entity: REPLICATION_ENTITY.to_vec(),
                        feature: FeatureId(p.origin),
                        event_time: EventTime(p.stream as i64),
                        system_time: stamp,
                        cell: cursor_cell,
                    });
                    overlay.cursors.insert((p.origin, p.stream), (s, taught));
                    s
                }
                None => 0,
            };
            if ops.is_empty() {
                continue;
            }
            // Later batches of the group resolve against what this one wrote (the last one
            // has no later batch). Everything written is at or below `bound ⊔ batch_vector`:
            // a rewritten winner's merged vector joins an incoming vector and a held one.
            if i + 1 < group_len {
                for op in &ops {
                    if op.entity.as_slice() != REPLICATION_ENTITY {
                        overlay.put(op);
                    }
                }
            }
            bound = bound.merge(&batch_vector);
            let seqno = w.last_seqno + 1 + payloads.len() as u64;
            let payload = batch::encode_replicated(seqno, stamp, (p.origin, origin_seqno), &ops);
            // Checked whole before it is logged: a record that would not read back must
            // never reach the WAL (it would keep the node from opening).
            if payload.len() > crate::limits::RECORD_BYTES_MAX - 64 {
                return Err(Error::InvalidArgument("a shipped batch is too large to log once resolved".into()));
            }
            if let Err(w) = batch::decode(&payload) {
                return Err(Error::InvalidArgument(format!("a shipped batch does not log as a valid record: {w}")));
            }
            payloads.push(payload);
        }
        if payloads.is_empty() {
            return Ok(reports);
        }
        let sync = durability == Durability::Sync;
        self.publish(&mut w, &view.mem, payloads, sync)?;
        self.counters.replication_conflicts.fetch_add(conflicts, Ordering::Relaxed);
        drop(w);
        drop(horizon);
        Ok(reports)
    }
}

/// One batch of a group being applied.
struct Pending<'a> {
    origin: RegionId,
    stream: StreamId,
    cursor_move: CursorMove,
    cells: BTreeMap<CellId<'a>, Incoming>,
}

/// What a group being applied has written so far (not yet in the memtable).
#[derive(Default)]
struct Overlay {
    /// Versions by cell, then system time.
    versions: BTreeMap<(Vec<u8>, FeatureId, EventTime), BTreeMap<SystemTime, CellVersion>>,
    cursors: BTreeMap<(RegionId, StreamId), (u64, VersionVector)>,
}

impl Overlay {
    fn put(&mut self, op: &ResolvedOp) {
        if let Ok((value, version_vector)) = cell::decode(&op.cell) {
            let v = CellVersion { event_time: op.event_time, system_time: op.system_time, value, version_vector };
            self.versions.entry((op.entity.clone(), op.feature, op.event_time)).or_default().insert(op.system_time, v);
        }
    }

    /// The cell's newest version: the overlay's, or `stored` (the overlay's wins a tie: it is
    /// the rewrite of that key).
    fn newest(&self, id: &(Vec<u8>, FeatureId, EventTime), stored: Option<CellVersion>) -> Option<CellVersion> {
        let mine = self.versions.get(id).and_then(|m| m.values().next_back());
        match (mine, stored) {
            (Some(m), Some(s)) if s.system_time > m.system_time => Some(s),
            (Some(m), _) => Some(m.clone()),
            (None, s) => s,
        }
    }

    /// The overlay's version of the cell at exactly `t`.
    fn at(&self, id: &(Vec<u8>, FeatureId, EventTime), t: SystemTime) -> Option<CellVersion> {
        self.versions.get(id).and_then(|m| m.get(&t)).cloned()
    }
}
