//! Moving slots between the nodes of a region (`server/CLUSTER.md` §5).
//!
//! The target runs a move, inside the `MoveSlots` call an operator makes to it: it copies the
//! slots' whole history from one view of the source (`CopySlots`), catches up from the
//! source's log (`SlotLog`), fences the move in the map and has the source drain its writes
//! (`FenceSlots`), catches up through the fence, and switches the owner in one etcd
//! transaction. Both sides of it live here: [`Mover`] answers the source's RPCs and drives the
//! target's steps.
//!
//! The target calls the source with the operator's credentials (`authorization` is carried),
//! so a node needs none of its own. A move's progress is kept in memory by its target; the
//! move itself is in the map, so a call that ends (the operator's client stops, the target
//! dies) leaves it there to be resumed by calling again, or aborted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::core::Collector;
use prometheus::{IntCounterVec, IntGauge, Opts};
use quiver_proto::v1 as pb;
use quiver_storage::slot::{slot_of, Slot, SLOTS};
use quiver_storage::{Db, Durability, EventTime, FeatureId, SnapshotVersion, SystemTime, SHIPPED_VERSIONS_MAX};
use tokio::sync::watch;
use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::cluster::{Cluster, Move, MoveState};
use crate::service::storage_status;

/// Most versions in one `CopySlots` part (and one verbatim apply).
pub const MOVE_PART_VERSIONS: usize = if SHIPPED_VERSIONS_MAX < 4096 { SHIPPED_VERSIONS_MAX } else { 4096 };
/// Most of the source's batches one `SlotLog` answer holds.
pub const MOVE_LOG_BATCHES_MAX: usize = 256;
/// The target fences the move once it is within this many batches of the source's last one:
/// what is left to catch up while writes to the slots are refused.
pub const MOVE_CATCHUP_BATCHES: u64 = 64;
/// Copies one move may begin (a copy restarts when the source no longer holds its log after
/// the copy's view) before it fails.
pub const MOVE_COPY_ATTEMPTS: u32 = 3;
/// How long the source waits for its map to show a move fenced before it answers
/// `FenceSlots` with `UNAVAILABLE`.
pub const FENCE_MAP_WAIT: Duration = Duration::from_secs(10);
/// How long the target waits before asking the source's log again when it had nothing new.
pub const MOVE_LOG_POLL: Duration = Duration::from_millis(20);
/// How long the source waits for the writes in flight to commit when it fences; past it the
/// fence fails with `UNAVAILABLE` (and the writes go on).
pub const FENCE_DRAIN_WAIT: Duration = Duration::from_secs(5);
/// How often a running move's progress goes to the operator's stream (and on every phase).
pub const MOVE_PROGRESS_INTERVAL: Duration = Duration::from_millis(500);
/// Largest message between the nodes of a move, each way.
pub const MOVE_MESSAGE_BYTES_MAX: usize = 64 << 20;
/// How long `RemoveNode` waits for every node of every peer region to pull the leaving node's
/// stream to its head before it answers `UNAVAILABLE` (`server/CLUSTER.md` §7).
pub const REMOVE_DRAIN_WAIT: Duration = Duration::from_secs(60);
/// How often `RemoveNode` looks at the peers' acknowledgements while it waits.
const REMOVE_DRAIN_POLL: Duration = Duration::from_millis(200);

/// A move this node runs as its target.
struct Running {
    progress: watch::Sender<pb::MoveProgress>,
    /// Why it stopped, with its code (set before the phase turns "failed").
    failure: Mutex<Option<Status>>,
}

/// Both halves of moving slots on one node.
pub struct Mover {
    cluster: Arc<Cluster>,
    db: Arc<Db>,
    forwarder: Arc<crate::forward::Forwarder>,
    /// Moves this node runs or last ran as target, by their slots.
    running: Mutex<BTreeMap<(Slot, Slot), Arc<Running>>>,
    /// This node's replication: when its region has peers, a move backfills the peers'
    /// versions its pullers filtered out (`server/CLUSTER.md` §7).
    replicator: Option<Arc<crate::replication::Replicator>>,
    versions: IntCounterVec,
    outcomes: IntCounterVec,
    lag: IntGauge,
}

impl std::fmt::Debug for Mover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mover").field("cluster", &self.cluster).finish()
    }
}

/// Checks slots `first..=last` given in a request.
fn slots(first: u32, last: u32) -> Result<(Slot, Slot), Status> {
    if first > last || last >= u32::from(SLOTS) {
        return Err(Status::invalid_argument(format!(
            "slots {first}..={last}: a range of slots 0 to {} with first <= last",
            SLOTS - 1
        )));
    }
    // Both below SLOTS, a u16.
    Ok((first as Slot, last as Slot))
}

impl Mover {
    /// The mover of a sharded node.
    pub fn new(cluster: Arc<Cluster>, db: Arc<Db>, forwarder: Arc<crate::forward::Forwarder>) -> Result<Self, String> {
        let err = |e: prometheus::Error| format!("metrics: {e}");
        Ok(Mover {
            cluster,
            db,
            forwarder,
            running: Mutex::new(BTreeMap::new()),
            replicator: None,
            versions: IntCounterVec::new(
                Opts::new("move_versions_total", "versions this node applied as a move's target, by phase"),
                &["phase"],
            )
            .map_err(err)?,
            outcomes: IntCounterVec::new(
                Opts::new("moves_total", "moves this node ran as target, by outcome (switched, failed)"),
                &["outcome"],
            )
            .map_err(err)?,
            lag: IntGauge::with_opts(Opts::new(
                "move_lag_batches",
                "batches of the source's log a running move has yet to apply",
            ))
            .map_err(err)?,
        })
    }

    /// The mover of a node replicating through `replicator`: with peers, each move backfills
    /// the slots from the peer regions before it switches.
    pub fn with_replicator(mut self, replicator: Arc<crate::replication::Replicator>) -> Self {
        self.replicator = Some(replicator);
        self
    }

    /// Its metrics, for the node's registry.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![Box::new(self.versions.clone()), Box::new(self.outcomes.clone()), Box::new(self.lag.clone())]
    }

    /// The progress of the moves this node runs or last ran as target.
    pub fn progress(&self) -> Vec<pb::MoveProgress> {
        self.running.lock().values().map(|r| r.progress.borrow().clone()).collect()
    }

    // ---- The source's half.

    /// The move of exactly `first..=last` from this node, as its map shows it. The target may
    /// have recorded it a moment ago: a map that does not show it is read again from etcd.
    async fn outgoing(&self, first: u32, last: u32) -> Result<Move, Status> {
        let (first, last) = slots(first, last)?;
        let find = |map: &crate::cluster::SlotMap| {
            map.moves()
                .iter()
                .find(|m| m.first == first && m.last == last && m.from == self.cluster.config().node)
                .cloned()
        };
        if let Some(m) = find(&self.cluster.map()) {
            return Ok(m);
        }
        let (map, _) = self.cluster.read_map().await?;
        find(&map).ok_or_else(|| {
            Status::failed_precondition(format!(
                "this node's map (revision {}) moves no slots {first}..={last} from it",
                map.revision()
            ))
        })
    }

    /// `CopySlots`: every version of the slots from one view, in parts; the last part says
    /// how far the view holds the log.
    pub async fn copy(
        &self,
        req: &pb::CopySlotsRequest,
    ) -> Result<tokio::sync::mpsc::Receiver<Result<pb::CopySlotsPart, Status>>, Status> {
        let mv = self.outgoing(req.first, req.last).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let (first, last) = (mv.first, mv.last);
            // Every idempotency record comes along: they are keyed by the client's key, not by
            // entity, so the ones of writes to these slots cannot be told apart (the target keeps
            // its own record of a key it holds already).
            let keep = move |e: &[u8]| {
                e.starts_with(quiver_storage::reserved::IDEMPOTENCY) || (first..=last).contains(&slot_of(e))
            };
            // The cursors first, so they are at or below what the history's view holds: the
            // target backfills each peer stream after them (§7).
            let read = db.replication_cursors().and_then(|c| Ok((c, db.history(Box::new(keep))?)));
            let (cursors, reader) = match read {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.blocking_send(Err(storage_status(&e)));
                    return;
                }
            };
            let mut cursors: Vec<pb::StreamCursor> = cursors
                .into_iter()
                .map(|((region, stream), cursor)| pb::StreamCursor { region, stream, cursor })
                .collect();
            let through = reader.through();
            let mut reader = reader.peekable();
            loop {
                let mut versions = Vec::with_capacity(MOVE_PART_VERSIONS);
                let mut bytes = 0;
                while versions.len() < MOVE_PART_VERSIONS && bytes < MOVE_MESSAGE_BYTES_MAX / 4 {
                    match reader.next() {
                        Some(Ok(v)) => {
                            bytes += v.entity.len() + v.cell.len() + 24;
                            versions.push(crate::replication::wire::version_to_wire(v));
                        }
                        Some(Err(e)) => {
                            let _ = tx.blocking_send(Err(storage_status(&e)));
                            return;
                        }
                        None => break,
                    }
                }
                let last = reader.peek().is_none();
                let part = pb::CopySlotsPart {
                    versions,
                    last,
                    through: if last { through } else { 0 },
                    cursors: if last { std::mem::take(&mut cursors) } else { Vec::new() },
                };
                if tx.blocking_send(Ok(part)).is_err() || last {
                    return;
                }
            }
        });
        Ok(rx)
    }

    /// `SlotLog`: the source's local batches after `after`, each cut to its versions of the
    /// slots and, when it holds any, its idempotency records; batches with none are left out.
    /// The log is read a few batches at a time and the answer stops at
    /// [`MOVE_LOG_BATCHES_MAX`] batches read or a quarter of [`MOVE_MESSAGE_BYTES_MAX`] kept.
    pub async fn slot_log(&self, req: &pb::SlotLogRequest) -> Result<pb::SlotLogResponse, Status> {
        let mv = self.outgoing(req.first, req.last).await?;
        let (db, after) = (self.db.clone(), req.after);
        tokio::task::spawn_blocking(move || slot_log(&db, &mv, after))
            .await
            .map_err(|e| Status::internal(format!("reading the log: {e}")))?
    }

    /// `FenceSlots`: once this node's map shows the move fenced (read from etcd if the watch
    /// has not brought it yet, waiting up to [`FENCE_MAP_WAIT`]), waits for every write that
    /// checked ownership before it to commit, and answers the last sequence number then.
    pub async fn fence(&self, req: &pb::FenceSlotsRequest) -> Result<pb::FenceSlotsResponse, Status> {
        let (first, last) = slots(req.first, req.last)?;
        let started = tokio::time::Instant::now();
        loop {
            let map = self.cluster.map();
            if map.revision() >= req.map_revision {
                let mv = self.outgoing(req.first, req.last).await?;
                if mv.state == MoveState::Fenced {
                    break;
                }
            }
            if started.elapsed() > FENCE_MAP_WAIT {
                return Err(Status::unavailable(format!(
                    "this node's map (revision {}) does not show the move of slots {first}..={last} fenced after {} s",
                    map.revision(),
                    FENCE_MAP_WAIT.as_secs()
                )));
            }
            // The watch usually brings it first; etcd is asked when it has not.
            if let Err(e) = self.cluster.read_map().await {
                tracing::debug!(error = %e, "reading the map for a fence");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (cluster, db) = (self.cluster.clone(), self.db.clone());
        let fence_seqno =
            // The log's head as `local_log` reports it: every batch through it is readable.
            tokio::task::spawn_blocking(move || cluster.drain_writes(FENCE_DRAIN_WAIT).then(|| db.log_head()))
                .await
                .map_err(|e| Status::internal(format!("fencing: {e}")))?
                .ok_or_else(|| {
                    Status::unavailable(format!(
                        "writes in flight did not finish within {} s of the fence; run the move again",
                        FENCE_DRAIN_WAIT.as_secs()
                    ))
                })?;
        tracing::info!(first, last, fence_seqno, "writes to moving slots fenced");
        Ok(pb::FenceSlotsResponse { fence_seqno })
    }

    // ---- A node leaving the region.

    /// `RemoveNode` (`server/CLUSTER.md` §7, "Removing a node"), on the node leaving: once the
    /// map (read from etcd) gives it no slot and names it in no move, waits until every peer
    /// node has pulled its stream through its head now, then removes it from the region in
    /// one transaction that fails if the map changed meanwhile.
    pub async fn remove(&self, req: &pb::RemoveNodeRequest) -> Result<pb::RemoveNodeResponse, Status> {
        let me = &self.cluster.config().node;
        if req.node != *me {
            return Err(Status::failed_precondition(format!(
                "this is node {me:?}: send RemoveNode to node {:?} itself (quiver cluster remove does)",
                req.node
            )));
        }
        if self.cluster.is_removed(me) {
            return Err(Status::failed_precondition(format!("node {me:?} was removed already: stop its process")));
        }
        let (map, revision) = self.cluster.read_map().await?;
        if !map.is_set() {
            return Err(Status::failed_precondition("the slot map is not initialised (quiver cluster init)"));
        }
        let owned: u32 = map.runs().iter().filter(|r| r.owner == *me).map(|r| u32::from(r.last - r.first) + 1).sum();
        if owned > 0 {
            return Err(Status::failed_precondition(format!(
                "node {me:?} owns {owned} slots: move them to other nodes first (quiver cluster remove does)"
            )));
        }
        if let Some(m) = map.moves().iter().find(|m| m.from == *me || m.to == *me) {
            return Err(Status::failed_precondition(format!(
                "slots {}..={} are moving from {:?} to {:?}: finish or abort that move first",
                m.first, m.last, m.from, m.to
            )));
        }
        // Local batches after `head` are only this node's own writes to reserved cells
        // (registry applies, which every node of the region makes alike).
        // Read through by the log (published and, if local, in the log), so a local batch at
        // or below it is seen by the check.
        let head = self.db.log_head();
        let (mut pullers, mut recorded) = (0, head);
        if let Some(r) = &self.replicator {
            // Peer nodes that joined since the last `Members` poll are waited for too.
            r.refresh_members().await;
            let deadline = tokio::time::Instant::now() + REMOVE_DRAIN_WAIT;
            loop {
                let behind = r.not_pulled_through(head).await;
                if behind.is_empty() {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    let (region, node, acked) = &behind[0];
                    return Err(Status::unavailable(format!(
                        "{} peer nodes have not pulled this node's stream through {head} after {} s (region {region} \
                         node {node:?} is at {}): they must reach this node; call again",
                        behind.len(),
                        REMOVE_DRAIN_WAIT.as_secs(),
                        acked.map_or("nothing acknowledged".to_string(), |a| a.to_string())
                    )));
                }
                tokio::time::sleep(REMOVE_DRAIN_POLL).await;
            }
            pullers = r.puller_count();
            // Recorded: the least acknowledgement, a local batch, which every peer node holds
            // and at or above the last local batch up to `head`. A source's copy cursor at or
            // above it needs nothing of this stream read again (§7).
            recorded = r.least_acknowledgement().unwrap_or(head);
        }
        self.cluster.remove_self(revision, recorded).await?;
        Ok(pb::RemoveNodeResponse { head: recorded, pullers })
    }

    // ---- The target's half.

    /// `MoveSlots`: the progress of the move, every [`MOVE_PROGRESS_INTERVAL`] and at every
    /// phase, until it switches (the last message, phase "done") or stops (the stream ends
    /// with its error).
    pub async fn move_slots(
        self: &Arc<Self>,
        req: &pb::MoveSlotsRequest,
        caller: MetadataMap,
    ) -> Result<tokio::sync::mpsc::Receiver<Result<pb::MoveProgress, Status>>, Status> {
        let (mut progress, running) = self.start(req, caller).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let p = progress.borrow_and_update().clone();
                match p.phase.as_str() {
                    "done" => {
                        let _ = tx.send(Ok(p)).await;
                        return;
                    }
                    "failed" => {
                        let failure = running.as_ref().and_then(|r| r.failure.lock().clone());
                        let _ = tx.send(Err(failure.unwrap_or_else(|| Status::unknown(p.error)))).await;
                        return;
                    }
                    _ => {}
                }
                if tx.send(Ok(p)).await.is_err() {
                    return;
                }
                let _ = tokio::time::timeout(MOVE_PROGRESS_INTERVAL, progress.changed()).await;
            }
        });
        Ok(rx)
    }

    /// Records the move (or finds it recorded) and runs it here, or joins the run under way.
    async fn start(
        self: &Arc<Self>,
        req: &pb::MoveSlotsRequest,
        caller: MetadataMap,
    ) -> Result<(watch::Receiver<pb::MoveProgress>, Option<Arc<Running>>), Status> {
        let (first, last) = slots(req.first, req.last)?;
        let me = self.cluster.config().node.clone();
        if req.to != me {
            return Err(Status::failed_precondition(format!(
                "this is node {me:?}; a move to {:?} is run by that node: send MoveSlots to it",
                req.to
            )));
        }
        if let Some(r) = self.running.lock().get(&(first, last)) {
            if !matches!(r.progress.borrow().phase.as_str(), "done" | "failed") {
                return Ok((r.progress.subscribe(), Some(r.clone())));
            }
        }
        let (map, mv) = self.cluster.begin_move(first, last, &me).await?;
        let Some(mv) = mv else {
            // The slots are this node's already.
            let p = pb::MoveProgress {
                phase: "done".into(),
                switched_revision: map.revision(),
                moving: Some(pb::SlotMove { first: req.first, last: req.last, from: me.clone(), to: me, state: 0 }),
                ..Default::default()
            };
            return Ok((watch::channel(p).1, None));
        };
        let mut running = self.running.lock();
        if let Some(r) = running.get(&(first, last)) {
            if !matches!(r.progress.borrow().phase.as_str(), "done" | "failed") {
                return Ok((r.progress.subscribe(), Some(r.clone())));
            }
        }
        let (tx, rx) =
            watch::channel(pb::MoveProgress { moving: Some(mv.to_pb()), phase: "copy".into(), ..Default::default() });
        let r = Arc::new(Running { progress: tx, failure: Mutex::new(None) });
        running.insert((first, last), r.clone());
        drop(running);
        let this = self.clone();
        let task = r.clone();
        tokio::spawn(async move {
            let r = task;
            let outcome = this.run(mv, &caller, &r.progress).await;
            this.lag.set(0);
            match outcome {
                Ok(revision) => {
                    this.outcomes.with_label_values(&["switched"]).inc();
                    r.progress.send_modify(|p| {
                        p.phase = "done".into();
                        p.switched_revision = revision;
                        p.lag_batches = 0;
                    });
                }
                Err(e) => {
                    this.outcomes.with_label_values(&["failed"]).inc();
                    tracing::warn!(error = %e, "a move stopped; it stays in the map, to resume or abort");
                    *r.failure.lock() = Some(Status::new(e.code(), e.message()));
                    r.progress.send_modify(|p| {
                        p.phase = "failed".into();
                        p.error = format!("{}: {}", crate::ui::code_name(e.code()), e.message());
                    });
                }
            }
        });
        Ok((rx, Some(r)))
    }

    /// The source's client, carrying the caller's credentials.
    fn source(
        &self,
        mv: &Move,
    ) -> Result<pb::cluster_service_client::ClusterServiceClient<tonic::transport::Channel>, Status> {
        let address = self.cluster.address_of(&mv.from).ok_or_else(|| {
            Status::unavailable(format!("the move's source {:?} is not registered now (is it running?)", mv.from))
        })?;
        let channel = self.forwarder.channel(&mv.from, &address)?;
        Ok(pb::cluster_service_client::ClusterServiceClient::new(channel)
            .max_decoding_message_size(MOVE_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MOVE_MESSAGE_BYTES_MAX))
    }

    /// Applies moved versions here, in parts.
    async fn apply(&self, versions: Vec<SnapshotVersion>) -> Result<u64, Status> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let mut n = 0;
            for part in versions.chunks(MOVE_PART_VERSIONS) {
                n += db.apply_moved(part, Durability::Sync).map_err(|e| storage_status(&e))?;
            }
            Ok(n)
        })
        .await
        .map_err(|e| Status::internal(format!("applying moved versions: {e}")))?
    }

    /// Fails if the move left the map (aborted) since it began here.
    fn still_recorded(&self, mv: &Move) -> Result<(), Status> {
        let map = self.cluster.map();
        if map.moves().iter().any(|m| m.first == mv.first && m.last == mv.last && m.from == mv.from && m.to == mv.to) {
            return Ok(());
        }
        Err(Status::aborted(format!(
            "the move of slots {}..={} is no longer in the map (revision {}): aborted",
            mv.first,
            mv.last,
            map.revision()
        )))
    }

    /// Applies the source's log after `cursor` until `done(cursor, head)`; the new cursor.
    /// `Ok(None)`: the source no longer holds that log (copy again).
    async fn catch_up(
        &self,
        mv: &Move,
        caller: &MetadataMap,
        mut cursor: u64,
        progress: &watch::Sender<pb::MoveProgress>,
        done: impl Fn(u64, u64) -> bool,
    ) -> Result<Option<u64>, Status> {
        let mut source = self.source(mv)?;
        loop {
            self.still_recorded(mv)?;
            let req = pb::SlotLogRequest { first: u32::from(mv.first), last: u32::from(mv.last), after: cursor };
            let log = match source.slot_log(crate::forward::carried(caller, req)).await {
                Ok(r) => r.into_inner(),
                Err(s) if s.metadata().get(LOG_TRUNCATED_HEADER).is_some() => return Ok(None),
                Err(s) => return Err(from_source(mv, s)),
            };
            let empty = log.batches.is_empty();
            let versions: Vec<SnapshotVersion> = log.batches.into_iter().flat_map(batch_versions).collect();
            let n = self.apply(versions).await?;
            self.versions.with_label_values(&["catch-up"]).inc_by(n);
            if log.through < cursor {
                return Err(Status::internal(format!(
                    "the source's log went back from {cursor} to {} (was it restored from a backup?)",
                    log.through
                )));
            }
            cursor = log.through;
            let lag = log.head.saturating_sub(cursor);
            self.lag.set(i64::try_from(lag).unwrap_or(i64::MAX));
            progress.send_modify(|p| {
                p.versions_caught_up += n;
                p.source_cursor = cursor;
                p.lag_batches = lag;
            });
            if done(cursor, log.head) {
                return Ok(Some(cursor));
            }
            if empty && cursor >= log.head {
                // Nothing new yet: wait for the source to write.
                tokio::time::sleep(MOVE_LOG_POLL).await;
            }
        }
    }

    /// Runs a move to its switch (§5); the map revision of the switch.
    async fn run(
        &self,
        mut mv: Move,
        caller: &MetadataMap,
        progress: &watch::Sender<pb::MoveProgress>,
    ) -> Result<i64, Status> {
        let phase = |name: &str, mv: &Move| {
            progress.send_modify(|p| {
                p.phase = name.into();
                p.moving = Some(mv.to_pb());
            })
        };
        // A map that holds the move: once every puller asks with it, they pull the moving slots.
        let revision = self.cluster.map().revision();
        if mv.state == MoveState::Fenced {
            // A fenced move run again starts from a copy: the source takes writes meanwhile,
            // and a new fence drains them before the switch.
            self.cluster.set_move_state(&mv, MoveState::Copying).await?;
            mv.state = MoveState::Copying;
        }
        for copy in 1..=MOVE_COPY_ATTEMPTS {
            phase("copy", &mv);
            progress.send_modify(|p| p.copies = copy);
            let req = pb::CopySlotsRequest { first: u32::from(mv.first), last: u32::from(mv.last) };
            let mut parts = self
                .source(&mv)?
                .copy_slots(crate::forward::carried(caller, req))
                .await
                .map_err(|s| from_source(&mv, s))?
                .into_inner();
            let mut through = None;
            let mut cursors = std::collections::BTreeMap::new();
            while let Some(part) = parts.message().await.map_err(|s| from_source(&mv, s))? {
                let versions = part.versions.into_iter().map(crate::replication::wire::version_from_wire).collect();
                let n = self.apply(versions).await?;
                self.versions.with_label_values(&["copy"]).inc_by(n);
                progress.send_modify(|p| p.versions_copied += n);
                if part.last {
                    through = Some(part.through);
                    cursors = part.cursors.iter().map(|c| ((c.region, c.stream), c.cursor)).collect();
                    break;
                }
            }
            let Some(through) = through else {
                return Err(from_source(&mv, Status::unavailable("the copy ended before its last part")));
            };
            progress.send_modify(|p| p.source_cursor = through);
            if let Some(r) = self.replicator.as_ref().filter(|r| r.has_peers()) {
                phase("backfill", &mv);
                let n = r.backfill(mv.first, mv.last, revision, &cursors).await?;
                self.versions.with_label_values(&["backfill"]).inc_by(n);
                progress.send_modify(|p| p.versions_caught_up += n);
            }
            phase("catch-up", &mv);
            // Near the head: the source writes other slots too, so the lag counts their batches.
            let near = |cursor: u64, head: u64| head.saturating_sub(cursor) <= MOVE_CATCHUP_BATCHES;
            let Some(cursor) = self.catch_up(&mv, caller, through, progress, near).await? else { continue };
            phase("fence", &mv);
            let map = self.cluster.set_move_state(&mv, MoveState::Fenced).await?;
            mv.state = MoveState::Fenced;
            let req = pb::FenceSlotsRequest {
                first: u32::from(mv.first),
                last: u32::from(mv.last),
                map_revision: map.revision(),
            };
            let fence = self
                .source(&mv)?
                .fence_slots(crate::forward::carried(caller, req))
                .await
                .map_err(|s| from_source(&mv, s))?
                .into_inner()
                .fence_seqno;
            let through_fence = |c: u64, head: u64| c >= fence || head < fence;
            let Some(cursor) = self.catch_up(&mv, caller, cursor, progress, through_fence).await? else { continue };
            if cursor < fence {
                return Err(Status::unavailable(format!(
                    "the source's log ends before its fence ({cursor} < {fence}): did it restart? Run the move again"
                )));
            }
            phase("switch", &mv);
            let map = self.cluster.switch_move(&mv).await?;
            tracing::info!(first = mv.first, last = mv.last, from = %mv.from, revision = map.revision(), "slots moved here");
            return Ok(map.revision());
        }
        Err(Status::unavailable(format!(
            "the source's log moved past {MOVE_COPY_ATTEMPTS} copies in a row (raise --replication-log-mb on {:?})",
            mv.from
        )))
    }
}

/// Batches of the log read per engine call while answering `SlotLog` (each may be large).
const LOG_READ_BATCHES: usize = 8;
/// The metadata key set on a `SlotLog` refusal whose log no longer reaches back (copy again),
/// so it is not taken for another `OUT_OF_RANGE` (tonic's, for a message too large).
pub const LOG_TRUNCATED_HEADER: &str = "quiver-log-truncated";

/// See [`Mover::slot_log`].
fn slot_log(db: &Db, mv: &Move, after: u64) -> Result<pb::SlotLogResponse, Status> {
    let moving = |e: &[u8]| !quiver_storage::reserved::is_reserved(e) && mv.holds(slot_of(e));
    let (mut batches, mut bytes, mut read) = (Vec::new(), 0usize, 0usize);
    let mut through = after;
    let mut head;
    loop {
        let log = db.local_log(through, LOG_READ_BATCHES).map_err(|e| match e {
            quiver_storage::Error::LogTruncated { oldest } => {
                let mut s = Status::out_of_range(format!(
                    "this node's log no longer reaches back to batch {} (oldest kept: {oldest}); copy again",
                    through + 1
                ));
                s.metadata_mut().insert(LOG_TRUNCATED_HEADER, tonic::metadata::MetadataValue::from_static("1"));
                s
            }
            e => storage_status(&e),
        })?;
        head = log.head;
        read += log.batches.len();
        let mut full = false;
        for b in log.batches {
            if bytes >= MOVE_MESSAGE_BYTES_MAX / 4 {
                // The answer is full: it reaches through the batch before this one.
                through = b.seqno - 1;
                full = true;
                break;
            }
            if !b.ops.iter().any(|op| moving(&op.entity)) {
                continue;
            }
            let ops: Vec<pb::ShippedOp> = b
                .ops
                .into_iter()
                .filter(|op| moving(&op.entity) || op.entity.starts_with(quiver_storage::reserved::IDEMPOTENCY))
                .map(|op| pb::ShippedOp {
                    entity: op.entity,
                    feature: op.feature.0,
                    event_time_us: op.event_time.0,
                    cell: op.cell,
                })
                .collect();
            bytes += ops.iter().map(|o| o.entity.len() + o.cell.len() + 16).sum::<usize>();
            batches.push(pb::ShippedBatch { seqno: b.seqno, prev_seqno: 0, system_time_us: b.system_time.0, ops });
        }
        if full {
            break;
        }
        through = log.through;
        if through >= head || read >= MOVE_LOG_BATCHES_MAX {
            break;
        }
    }
    Ok(pb::SlotLogResponse { batches, through, head })
}

/// A batch of the source's log as moved versions: its ops with the batch's stamp, the last op
/// of each cell only (a batch that writes a cell twice logs both, and the last counts; two
/// versions at one key would otherwise be applied first come, first kept).
pub(crate) fn batch_versions(b: pb::ShippedBatch) -> Vec<SnapshotVersion> {
    let mut last: BTreeMap<(Vec<u8>, u32, i64), usize> = BTreeMap::new();
    for (i, op) in b.ops.iter().enumerate() {
        last.insert((op.entity.clone(), op.feature, op.event_time_us), i);
    }
    let keep: std::collections::BTreeSet<usize> = last.into_values().collect();
    b.ops
        .into_iter()
        .enumerate()
        .filter(|(i, _)| keep.contains(i))
        .map(|(_, op)| SnapshotVersion {
            entity: op.entity,
            feature: FeatureId(op.feature),
            event_time: EventTime(op.event_time_us),
            system_time: SystemTime(b.system_time_us),
            cell: op.cell,
        })
        .collect()
}

/// A failure of the source's half, naming it.
fn from_source(mv: &Move, s: Status) -> Status {
    Status::new(s.code(), format!("the move's source {:?}: {}", mv.from, s.message()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_that_writes_a_cell_twice_moves_its_last_write() {
        let op = |entity: &[u8], event: i64, cell: &[u8]| pb::ShippedOp {
            entity: entity.to_vec(),
            feature: 3,
            event_time_us: event,
            cell: cell.to_vec(),
        };
        let b = pb::ShippedBatch {
            seqno: 9,
            prev_seqno: 0,
            system_time_us: 77,
            ops: vec![
                op(b"\x01a", 1, b"put"),
                op(b"\x01b", 1, b"other"),
                op(b"\x01a", 1, b"delete"),
                op(b"\x01a", 2, b"x"),
            ],
        };
        let got: Vec<(Vec<u8>, i64, Vec<u8>, u64)> =
            batch_versions(b).into_iter().map(|v| (v.entity, v.event_time.0, v.cell, v.system_time.0)).collect();
        assert_eq!(
            got,
            [
                (b"\x01b".to_vec(), 1, b"other".to_vec(), 77),
                (b"\x01a".to_vec(), 1, b"delete".to_vec(), 77),
                (b"\x01a".to_vec(), 2, b"x".to_vec(), 77),
            ]
        );
    }

    #[test]
    fn slot_ranges_are_checked() {
        assert_eq!(slots(0, 4095).map_err(|s| s.code()), Ok((0, 4095)));
        for (a, b) in [(5, 4), (0, 4096), (4096, 4096)] {
            assert_eq!(slots(a, b).map_err(|s| s.code()), Err(tonic::Code::InvalidArgument), "{a}..={b}");
        }
    }
}
