//! Moving entities between the nodes of one region (`server/CLUSTER.md` §5): the whole history
//! of chosen entities as stored, the node's log of local batches, and applying both verbatim
//! on another node.
//!
//! Unlike replication between regions (`REPLICATION.md`), a moved version is not dropped for
//! being older than what its cell holds: it keeps its key (so its system time) and its cell
//! (so its vector), and a version whose exact key the node holds already is skipped, so
//! applying the same versions again changes nothing. This is right because a moved entity has
//! one writer in its region at a time (its slot's owner, with a fence between two owners): the
//! node that receives it took no write of it meanwhile.
//!
//! Peer regions' versions are another matter when the region replicates (`server/CLUSTER.md`
//! §7): the target's pullers apply them for the moving slots while the move runs, so one may
//! reach the target before a moved version it is concurrent with, the other way round from
//! the source (which wrote its version first, and resolved the peer's against it). So a moved
//! version concurrent with its cell's winner here is resolved as a replicated one is
//! (`REPLICATION.md` §4): the greater `(system time, region)` wins and takes the merged
//! vector, the other is kept as it is. The target then ends with the source's winner and
//! vector, in either order. (A superseded version that was the target's winner for a while,
//! before a newer moved one, may keep a merged vector the source's never had.)
//!
//! Moved versions are logged as a replicated record whose origin is the node's own region and
//! whose origin sequence number is [`MOVED_ORIGIN_SEQNO`]: at replay the stamps come back per
//! op and the vectors join the knowledge vector, exactly as at apply; no cursor moves, and the
//! node's log for peers (`origin_log`) leaves them out as it does every replicated batch.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use super::replicate::{ShippedBatch, ShippedOp, SnapshotVersion, SHIPPED_VERSIONS_MAX};
use super::Inner;
use crate::batch::{self, ResolvedOp};
use crate::cell;
use crate::key;
use crate::replication::origin_or_guess;
use crate::types::{check_entity_key, AsOf, Causality, CellVersion, Durability, SystemTime, VersionVector};
use crate::{Error, Result};

/// The origin sequence number of a logged batch of moved versions (no peer's log has 0).
pub const MOVED_ORIGIN_SEQNO: u64 = 0;

/// Which entities a [`HistoryReader`] keeps (by entity key).
pub type EntityFilter = Box<dyn Fn(&[u8]) -> bool + Send>;

/// Every version (tombstones and superseded versions included) of the user entities a filter
/// keeps, and of the idempotency records it keeps, from one read view, in key order. Other
/// reserved entities are never read.
pub struct HistoryReader {
    scan: super::read::ScanIter,
    through: u64,
    keep: EntityFilter,
}

impl std::fmt::Debug for HistoryReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HistoryReader").field("through", &self.through).finish()
    }
}

impl HistoryReader {
    /// The sequence number of this node's log the view holds every batch through: what came
    /// after it is in [`crate::Db::local_log`] after it.
    pub fn through(&self) -> u64 {
        self.through
    }
}

impl Iterator for HistoryReader {
    type Item = Result<SnapshotVersion>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let item = match self.scan.next()? {
                Ok(i) => i,
                Err(e) => return Some(Err(e)),
            };
            let idempotency = item.entity.starts_with(crate::reserved::IDEMPOTENCY);
            if (crate::reserved::is_reserved(&item.entity) && !idempotency) || !(self.keep)(&item.entity) {
                continue;
            }
            let mut cell_bytes = Vec::new();
            cell::encode(item.version.value.as_ref(), &item.version.version_vector, &mut cell_bytes);
            return Some(Ok(SnapshotVersion {
                entity: item.entity,
                feature: item.feature,
                event_time: item.version.event_time,
                system_time: item.version.system_time,
                cell: cell_bytes,
            }));
        }
    }
}

/// This node's local batches after a sequence number, and how far they reach.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalLog {
    /// The batches, in sequence order, every op kept (reserved entities too).
    pub batches: Vec<ShippedBatch>,
    /// Every local batch at or below this sequence number and above the one asked after is in
    /// `batches`: the next call continues after it.
    pub through: u64,
    /// The node's last sequence number when the call began (for lag).
    pub head: u64,
}

impl Inner {
    /// See [`HistoryReader`].
    pub(super) fn history(&self, keep: EntityFilter) -> Result<HistoryReader> {
        let through = self.published_seqno.load(Ordering::Acquire);
        let scan = self.scan(super::read::ScanRange::all())?;
        // Only durable batches leave the node (as in `origin_log`).
        let wal = self.current_wal.lock().clone();
        wal.sync()?;
        Ok(HistoryReader { scan, through, keep })
    }

    /// See [`LocalLog`]: at most `max` batches.
    pub(super) fn local_log(&self, after: u64, max: usize) -> Result<LocalLog> {
        if self.opts.replication_log_bytes == 0 {
            // The tail in memory is not kept and flushed segments go at once: an empty answer
            // would be a lie.
            return Err(Error::InvalidArgument("this node keeps no log (Options::replication_log_bytes is 0)".into()));
        }
        // Not `published_seqno`: a batch is published before it reaches the tail in memory,
        // and one read through must be in the answer.
        let head = self.log_covered.load(Ordering::Acquire);
        let all = |b: &batch::DecodedBatch<'_>| ShippedBatch {
            origin: self.opts.region,
            seqno: b.seqno,
            system_time: b.system_time,
            ops: b
                .ops
                .iter()
                .map(|op| ShippedOp {
                    entity: op.entity.to_vec(),
                    feature: op.feature,
                    event_time: op.event_time,
                    cell: op.cell.to_vec(),
                })
                .collect(),
        };
        let batches = self.log_after(after, max, &all)?;
        // Fewer than `max`: everything local up to the head (and past it, if more came) is here.
        let last = batches.last().map_or(after, |b| b.seqno);
        let through = if batches.len() >= max { last } else { last.max(head).max(after) };
        Ok(LocalLog { batches, through, head })
    }

    /// Applies moved versions verbatim (see the module doc): each is inserted at its own key
    /// unless that key holds a version already; the clock moves past their stamps and their
    /// vectors join the knowledge vector. User entities and idempotency records only. Returns
    /// how many were inserted.
    pub(super) fn apply_moved(&self, versions: &[SnapshotVersion], durability: Durability) -> Result<u64> {
        if versions.len() > SHIPPED_VERSIONS_MAX {
            return Err(Error::InvalidArgument(format!("at most {SHIPPED_VERSIONS_MAX} moved versions at once")));
        }
        let mut would_know = self.knowledge.lock().clone();
        let region = self.opts.region;
        // Whether any moved vector names another region than this one.
        let mut others = false;
        // Each version's value and vector, decoded once (resolution below takes them).
        let mut decoded = Vec::with_capacity(versions.len());
        for v in versions {
            check_entity_key(&v.entity)?;
            if crate::reserved::is_reserved(&v.entity) && !v.entity.starts_with(crate::reserved::IDEMPOTENCY) {
                return Err(Error::InvalidArgument("a moved version writes a reserved entity".into()));
            }
            let ahead_max = self.hlc.wall_us().saturating_add(super::replicate::REPLICATED_STAMP_AHEAD_MAX_US);
            if v.system_time.0 > ahead_max || v.system_time == SystemTime(0) {
                return Err(Error::InvalidArgument(format!(
                    "a moved version is stamped {} µs: zero, or more than a day ahead of this node's clock",
                    v.system_time.0
                )));
            }
            let (value, vector) = cell::decode(&v.cell)
                .map_err(|w| Error::InvalidArgument(format!("a moved cell does not decode: {w}")))?;
            others |= vector.entries().iter().any(|&(r, _)| r != region);
            would_know = would_know.merge(&vector);
            decoded.push((value, vector));
        }
        if would_know.len() > crate::limits::VERSION_VECTOR_ENTRIES_MAX {
            return Err(Error::InvalidArgument(format!(
                "moved versions name more than {} regions in all",
                crate::limits::VERSION_VECTOR_ENTRIES_MAX
            )));
        }
        // One version per key: a later one replaces an earlier one, as within a logged batch
        // (a batch that wrote a cell twice logs both ops; the last counts).
        let mut last = BTreeMap::new();
        for (i, v) in versions.iter().enumerate() {
            last.insert((v.entity.as_slice(), v.feature, v.event_time, v.system_time), i);
        }
        // The versions held already are found before the writer lock is taken, so the copy
        // does not hold up this node's own writes: no write of this node makes a moved user
        // key (it does not own them until the move switches).
        let before = self.view.read().clone();
        let mut candidates = Vec::with_capacity(last.len());
        for &i in last.values() {
            let v = &versions[i];
            if !crate::reserved::is_reserved(&v.entity) {
                let prefix = key::prefix(&v.entity, v.feature);
                let exact = AsOf { as_of: v.event_time, known_at: v.system_time, lookback_us: Some(0) };
                let held = self.get_in_view(&before, &prefix, exact, v.system_time, None)?;
                if held.is_some_and(|h| h.system_time == v.system_time && h.event_time == v.event_time) {
                    continue;
                }
            }
            candidates.push(i);
        }
        drop(before);
        let horizon = self.horizon.read();
        self.check_ok()?;
        let mut w = self.writer.lock();
        self.make_room(&mut w)?;
        let view = self.view.read().clone();
        let mut ops = Vec::new();
        // Each cell's winner as this call leaves it, once it has planned a version of it.
        let mut winners: std::collections::HashMap<
            (Vec<u8>, crate::types::FeatureId, crate::types::EventTime),
            CellVersion,
        > = std::collections::HashMap::new();
        // Every version this node holds has a vector at or below `bound` (what it applied,
        // moved versions included, and its own latest stamp; then what this call plans): a
        // moved version above it dominates its cell, which need not be read (as in
        // `replicate.rs`).
        let own = VersionVector::single(region, self.own_stamp_max.load(Ordering::Acquire));
        let mut bound = self.knowledge.lock().merge(&own);
        // Nothing held and nothing moved names another region (a region that does not
        // replicate): every vector is comparable with every other, nothing is concurrent, and
        // no cell need be read. (The knowledge cannot change while the writer lock is held.)
        let alone = !others && bound.entries().iter().all(|&(r, _)| r == region);
        for i in candidates {
            let v = &versions[i];
            if crate::reserved::below_horizon(&v.entity, v.event_time, *horizon) {
                continue;
            }
            // An idempotency record is the answer of a write whose key this node may have used
            // itself (a write split over shards sends one key to each): its own record stays.
            if crate::reserved::is_reserved(&v.entity)
                && self.cell_in_view(&view, &v.entity, v.feature, v.event_time)?.is_some()
            {
                continue;
            }
            let mut cell_bytes = v.cell.clone();
            if !crate::reserved::is_reserved(&v.entity) && !alone {
                let (value, vector) = std::mem::take(&mut decoded[i]);
                let id = (v.entity.clone(), v.feature, v.event_time);
                let current = match winners.get(&id) {
                    Some(c) => Some(c.clone()),
                    None if bound.compare(&vector) == Causality::Before => None,
                    None => self.cell_in_view(&view, &v.entity, v.feature, v.event_time)?,
                };
                // Its key is the winner's now (this version, merged, from a call that ran
                // meanwhile; or another region's at the same stamp): it stays.
                if current.as_ref().is_some_and(|c| c.system_time == v.system_time) {
                    continue;
                }
                bound = bound.merge(&vector);
                let merged_from = vector.clone();
                let mine =
                    CellVersion { event_time: v.event_time, system_time: v.system_time, value, version_vector: vector };
                match resolve_moved(current, mine) {
                    Moved::Winner(w) => {
                        if w.version_vector != merged_from {
                            cell_bytes.clear();
                            cell::encode(w.value.as_ref(), &w.version_vector, &mut cell_bytes);
                        }
                        winners.insert(id, w);
                    }
                    Moved::History => {}
                    Moved::Loser(w) => {
                        // The winner keeps its key and takes the merged vector.
                        let mut buf = Vec::new();
                        cell::encode(w.value.as_ref(), &w.version_vector, &mut buf);
                        ops.push(ResolvedOp {
                            entity: v.entity.clone(),
                            feature: v.feature,
                            event_time: v.event_time,
                            system_time: w.system_time,
                            cell: buf,
                        });
                        winners.insert(id, w);
                    }
                }
            }
            ops.push(ResolvedOp {
                entity: v.entity.clone(),
                feature: v.feature,
                event_time: v.event_time,
                system_time: v.system_time,
                cell: cell_bytes,
            });
        }
        let Some(newest) = ops.iter().map(|o| o.system_time.0).max() else { return Ok(0) };
        self.hlc.observe(newest);
        let stamp = SystemTime(self.hlc.stamp());
        let seqno = w.last_seqno + 1;
        let payload = batch::encode_replicated(seqno, stamp, (self.opts.region, MOVED_ORIGIN_SEQNO), &ops);
        if payload.len() > crate::limits::RECORD_BYTES_MAX - 64 {
            return Err(Error::InvalidArgument("moved versions too large to log at once".into()));
        }
        if let Err(w) = batch::decode(&payload) {
            return Err(Error::InvalidArgument(format!("moved versions do not log as a valid record: {w}")));
        }
        let inserted = ops.len() as u64;
        self.publish(&mut w, &view.mem, vec![payload], durability == Durability::Sync)?;
        drop(w);
        drop(horizon);
        Ok(inserted)
    }
}

/// How a moved version applies to its cell, whose winner here is the first argument.
#[derive(Debug)]
enum Moved {
    /// It wins: it goes in with this version (its vector merged with a concurrent winner's).
    Winner(CellVersion),
    /// It is older history (the winner covers it): it goes in as it is.
    History,
    /// It loses to a concurrent winner: it goes in as it is, and the winner takes this
    /// version (its merged vector).
    Loser(CellVersion),
}

/// See [`Moved`]: the rule of `REPLICATION.md` §4, except that an older version is kept.
fn resolve_moved(current: Option<CellVersion>, mine: CellVersion) -> Moved {
    let Some(mut c) = current else { return Moved::Winner(mine) };
    match mine.version_vector.compare(&c.version_vector) {
        Causality::After => Moved::Winner(mine),
        Causality::Before | Causality::Equal => Moved::History,
        Causality::Concurrent => {
            let merged = mine.version_vector.merge(&c.version_vector);
            let rank = |v: &CellVersion| (v.system_time, origin_or_guess(&v.version_vector, v.system_time));
            if rank(&mine) > rank(&c) {
                Moved::Winner(CellVersion { version_vector: merged, ..mine })
            } else {
                c.version_vector = merged;
                Moved::Loser(c)
            }
        }
    }
}
