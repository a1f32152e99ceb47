//! The [`Replicator`]: one puller task per peer, which pulls the batches that originated
//! there and applies them in chain order, bootstraps from a snapshot when the peer's log no
//! longer reaches back far enough, and reports and takes operator commands.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeMap;
use std::sync::OnceLock;

use parking_lot::{Mutex, RwLock};
use quiver_proto::v1 as pb;
use quiver_storage::slot::{slot_of, SlotSet};
use quiver_storage::{Db, Durability, ShippedBatch, SnapshotVersion};
use quiver_storage::{StreamId, SOLE_STREAM};
use tokio::sync::Notify;
use tonic::codec::CompressionEncoding;
use tonic::Status;

use super::chain::{Accepted, Chain};
use super::chaos::Chaos;
#[cfg(doc)]
use super::chaos::CHAOS_ENV;
use super::config::{ClusterConfig, Peer, Transport};
use super::wire::{from_wire, now_us, touches_registry};
use super::*;
use crate::registry::Registry;
use crate::service::{blocking, storage_status};

/// What one puller reports.
#[derive(Debug, Default, Clone)]
pub(super) struct PeerInfo {
    pub(super) state: i32,
    pub(super) cursor: u64,
    pub(super) lag_seqnos: u64,
    pub(super) lag_seconds: f64,
    pub(super) caught_up: bool,
    pub(super) last_error: String,
    pub(super) last_contact_us: i64,
    pub(super) batches_applied: u64,
    pub(super) bootstraps: u64,
}

/// One puller's state, shared with the admin API: a configured peer, or one node of a sharded
/// peer region (`server/CLUSTER.md` §7).
#[derive(Debug)]
pub(super) struct PeerSlot {
    /// The peer's region, and the address this puller pulls from.
    pub(super) peer: Peer,
    /// The peer node and its stream (`""` and [`SOLE_STREAM`] for a region of one node).
    pub(super) node: String,
    pub(super) stream: StreamId,
    /// A configured peer's first puller: it asks the region's members first, and retires
    /// (leaving one puller per member) if the region is sharded.
    pub(super) seed: bool,
    /// Pulls no more: a seed whose region is sharded, or the puller of a node removed from
    /// its region (drained: `server/CLUSTER.md` §7, "Removing a node").
    pub(super) retired: AtomicBool,
    /// For the puller of a removed node: one past the head its region recorded (every peer
    /// node had pulled its stream through the head); 0 otherwise. A move's backfill still
    /// reads the stream after a copy cursor below the head.
    pub(super) removed_end: std::sync::atomic::AtomicU64,
    pub(super) info: Mutex<PeerInfo>,
    pub(super) paused: AtomicBool,
    pub(super) rebootstrap: AtomicBool,
    pub(super) wake: Notify,
    /// The map revision whose slots this puller's current `Pull` asks for (0: none yet): a
    /// move's backfill waits until every puller asks with the moving slots (§7).
    pub(super) pull_revision: std::sync::atomic::AtomicI64,
}

impl PeerSlot {
    fn new(peer: Peer, node: String, stream: StreamId, seed: bool) -> Arc<PeerSlot> {
        Arc::new(PeerSlot {
            peer,
            node,
            stream,
            seed,
            retired: AtomicBool::new(false),
            removed_end: std::sync::atomic::AtomicU64::new(0),
            info: Mutex::new(PeerInfo { state: pb::PeerState::Connecting as i32, ..PeerInfo::default() }),
            paused: AtomicBool::new(false),
            rebootstrap: AtomicBool::new(false),
            wake: Notify::new(),
            pull_revision: std::sync::atomic::AtomicI64::new(0),
        })
    }
}

/// The next part of `slot`'s snapshot, checked to come from its region and stream.
async fn next_part(
    slot: &PeerSlot,
    parts: &mut tonic::Streaming<pb::SnapshotPart>,
) -> Result<Option<pb::SnapshotPart>, Status> {
    let part = tokio::time::timeout(PULL_SILENCE_MAX * 4, parts.message())
        .await
        .map_err(|_| Status::deadline_exceeded("the peer's snapshot went silent"))??;
    if let Some(p) = &part {
        check_origin(slot, p.origin)?;
        check_stream(slot, p.stream)?;
    }
    Ok(part)
}

/// Refuses an answer from a node of another region than `slot`'s.
fn check_origin(slot: &PeerSlot, origin: u32) -> Result<(), Status> {
    if origin == slot.peer.region {
        return Ok(());
    }
    Err(Status::failed_precondition(format!(
        "{} answers as region {origin}, configured as region {}",
        slot.peer.address, slot.peer.region
    )))
}

/// Refuses an answer from a log other than the one `slot` keeps its cursor for (a peer that
/// was sharded or unsharded since, or an address now serving another node).
fn check_stream(slot: &PeerSlot, stream: StreamId) -> Result<(), Status> {
    if stream == slot.stream {
        return Ok(());
    }
    Err(Status::failed_precondition(format!(
        "{} answers with the log of stream {stream}, this puller follows stream {} ({}); restart this node to \
         learn the peer region's nodes again",
        slot.peer.address,
        slot.stream,
        if slot.node.is_empty() { "an unsharded node" } else { slot.node.as_str() }
    )))
}

/// Whether a puller asking for `slots` (`None`: every slot) wants `entity`: registry and
/// other replicated reserved cells go to every puller.
pub(super) fn wanted(slots: Option<&SlotSet>, entity: &[u8]) -> bool {
    slots.is_none_or(|s| quiver_storage::reserved::is_reserved(entity) || s.contains(slot_of(entity)))
}

/// Replication of one node: its pullers and its `ReplicationService`.
#[derive(Debug)]
pub struct Replicator {
    pub(super) db: Arc<Db>,
    pub(super) registry: Arc<Registry>,
    pub(super) region: u32,
    /// The configured peers (one per region).
    pub(super) configured: Vec<Peer>,
    /// Every puller: one per configured peer, or one per node of a sharded peer region.
    pub(super) peers: RwLock<Vec<Arc<PeerSlot>>>,
    /// Acknowledgements of this node's log by the pullers of its peers: (region, node) ->
    /// their last `after`.
    pub(super) acks: Mutex<BTreeMap<(u32, String), u64>>,
    /// This node's shard, when its region is sharded: its node id and slots go with its pulls.
    pub(super) shard: OnceLock<Arc<crate::cluster::Cluster>>,
    /// The pullers started after `start` (see [`Replicator::take_spawned`]).
    spawned: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    pub(super) shutdown: AtomicBool,
    pub(super) stop: Notify,
    /// Test-only message faults ([`CHAOS_ENV`]).
    pub(super) chaos: Option<Mutex<Chaos>>,
    pub(super) transport: Transport,
}

impl Replicator {
    /// Replication for a node serving `db` (pullers start with [`Replicator::start`]).
    pub fn new(db: Arc<Db>, registry: Arc<Registry>, cluster: &ClusterConfig) -> Arc<Replicator> {
        Self::with_transport(db, registry, cluster, Transport::default())
    }

    /// Like [`Replicator::new`], over `transport`.
    pub fn with_transport(
        db: Arc<Db>,
        registry: Arc<Registry>,
        cluster: &ClusterConfig,
        transport: Transport,
    ) -> Arc<Replicator> {
        let peers = cluster.peers.iter().map(|p| PeerSlot::new(p.clone(), String::new(), SOLE_STREAM, true)).collect();
        Arc::new(Replicator {
            db,
            registry,
            region: cluster.region,
            configured: cluster.peers.clone(),
            peers: RwLock::new(peers),
            acks: Mutex::new(BTreeMap::new()),
            shard: OnceLock::new(),
            spawned: Mutex::new(Vec::new()),
            shutdown: AtomicBool::new(false),
            stop: Notify::new(),
            chaos: transport.chaos_seed.and_then(Chaos::from_seed).map(Mutex::new),
            transport,
        })
    }

    /// Makes this node a shard of a sharded region: its pulls carry its node id and ask for
    /// its slots only, and its `Members` lists its region's nodes (`server/CLUSTER.md` §7).
    /// Set once, before [`Replicator::start`].
    pub fn set_shard(&self, cluster: Arc<crate::cluster::Cluster>) {
        let _ = self.shard.set(cluster);
    }

    /// This node's stream: what its peers keep their cursor of its log under.
    pub(super) fn own_stream(&self) -> StreamId {
        self.shard.get().map_or(SOLE_STREAM, |c| super::stream_of(&c.config().node))
    }

    /// The slots this node pulls, on the wire, and the map revision they are of: empty (every
    /// slot) when it is not sharded, else the bitmap of those it owns under its map now and
    /// those moving to it. `UNAVAILABLE` while a sharded node has no map: what it pulled then
    /// would be filtered by an empty set, and lost to it. (A slot gained by a move is
    /// backfilled, [`Replicator::backfill`].)
    fn wanted_slots(&self) -> Result<(Vec<u8>, i64), Status> {
        let Some(cluster) = self.shard.get() else { return Ok((Vec::new(), 0)) };
        let map = cluster.map();
        if !map.is_set() {
            return Err(Status::unavailable("this node has no slot map yet (quiver cluster init): not pulling"));
        }
        let me = &cluster.config().node;
        let mut set = SlotSet::empty();
        for r in map.runs().iter().filter(|r| &r.owner == me) {
            set.insert_range(r.first, r.last);
        }
        for m in map.moves().iter().filter(|m| &m.to == me) {
            set.insert_range(m.first, m.last);
        }
        Ok((set.as_bytes().to_vec(), map.revision()))
    }

    /// This node's id in its sharded region (empty when it is not sharded).
    fn own_node(&self) -> String {
        self.shard.get().map(|c| c.config().node.clone()).unwrap_or_default()
    }

    /// A `Pull` of the log after `after`, for `slots` (on the wire), as this node.
    fn pull_request(&self, after: u64, slots: Vec<u8>, backfill: bool) -> pb::PullRequest {
        pb::PullRequest {
            region: self.region,
            after,
            window_ms: PULL_WINDOW_DEFAULT.as_millis() as u32,
            slots,
            node: self.own_node(),
            backfill,
        }
    }

    /// `slot`'s node's snapshot of `slots` (on the wire), as a stream of parts.
    async fn snapshot(&self, slot: &PeerSlot, slots: Vec<u8>) -> Result<tonic::Streaming<pb::SnapshotPart>, Status> {
        let mut client = self.client(slot).await?;
        let req = pb::SnapshotRequest { region: self.region, slots };
        Ok(tokio::time::timeout(PULL_SILENCE_MAX, client.snapshot(req))
            .await
            .map_err(|_| Status::deadline_exceeded("the peer did not answer the snapshot request"))??
            .into_inner())
    }

    /// Whether this node replicates with other regions.
    pub fn has_peers(&self) -> bool {
        !self.configured.is_empty()
    }

    /// A move's backfill at its target (`server/CLUSTER.md` §7): every version of slots
    /// `first..=last` that the peer regions wrote after the source's `cursors` (read before
    /// its copy's view) is applied here, cursors untouched, so that what this node's pullers
    /// filtered out before they asked for these slots is not lost. It first waits (at most
    /// [`BACKFILL_WAIT`]) until every puller asks with the map of `revision` or newer (which
    /// holds the move); a stream whose log no longer reaches back is backfilled from that
    /// node's snapshot of the slots. Returns the versions applied.
    pub async fn backfill(
        &self,
        first: quiver_storage::slot::Slot,
        last: quiver_storage::slot::Slot,
        revision: i64,
        cursors: &BTreeMap<(u32, StreamId), u64>,
    ) -> Result<u64, Status> {
        let deadline = tokio::time::Instant::now() + BACKFILL_WAIT;
        loop {
            let behind: Vec<Arc<PeerSlot>> = self
                .slots()
                .into_iter()
                // A seed still asking its region's members pulls nothing yet: behind too.
                .filter(|p| p.pull_revision.load(Ordering::Acquire) < revision)
                .collect();
            let Some(p) = behind.first() else { break };
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::unavailable(format!(
                    "the puller of region {} node {:?} has not pulled with the moving slots yet (its last error: {}); \
                     run the move again",
                    p.peer.region,
                    p.node,
                    p.info.lock().last_error
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut set = SlotSet::empty();
        set.insert_range(first, last);
        let mut applied = 0;
        for slot in self.slots() {
            let after = cursors.get(&(slot.peer.region, slot.stream)).copied().unwrap_or(0);
            applied += match self.backfill_stream(&slot, &set, after).await {
                Err(s) if s.code() == tonic::Code::OutOfRange => self.backfill_snapshot(&slot, &set).await?,
                r => r?,
            };
        }
        // A node removed from its peer region after the source's copy: the source had pulled
        // its stream through the removal's head, but perhaps not through the copy's view, so
        // what lies between is read from the removed node while it still runs (§7).
        let removed: Vec<Arc<PeerSlot>> = self
            .peers
            .read()
            .iter()
            .filter(|p| p.retired.load(Ordering::Acquire) && p.removed_end.load(Ordering::Acquire) > 0)
            .cloned()
            .collect();
        for slot in removed {
            // A source with no cursor for the stream never pulled it: it joined after the
            // removal (every node there before was drained), and what it holds of the stream
            // came by moves whose sources held it through the head.
            let Some(&after) = cursors.get(&(slot.peer.region, slot.stream)) else { continue };
            if after.saturating_add(1) >= slot.removed_end.load(Ordering::Acquire) {
                continue;
            }
            let got = match self.backfill_stream(&slot, &set, after).await {
                Err(s) if s.code() == tonic::Code::OutOfRange => self.backfill_snapshot(&slot, &set).await,
                r => r,
            };
            applied += got.map_err(|e| {
                Status::aborted(format!(
                    "node {:?} of region {} was removed from its region while this move ran, and its stream after \
                     the copy cannot be read ({}); abort the move (quiver cluster move --abort) and run it again: a new \
                     copy holds it",
                    slot.node,
                    slot.peer.region,
                    e.message()
                ))
            })?;
        }
        Ok(applied)
    }

    /// Applies `slot`'s stream after `after`, filtered to `set`, up to its head; cursors kept.
    /// A `Pull` window that ends first is followed by another from where it stopped.
    async fn backfill_stream(&self, slot: &PeerSlot, set: &SlotSet, mut after: u64) -> Result<u64, Status> {
        let mut client = self.client(slot).await?;
        let (origin, stream_id) = (slot.peer.region, slot.stream);
        let mut applied = 0;
        loop {
            // Not how far this node applied the stream: the origin must not prune by it.
            let req = self.pull_request(after, set.as_bytes().to_vec(), true);
            let mut stream = tokio::time::timeout(PULL_SILENCE_MAX, client.pull(req))
                .await
                .map_err(|_| Status::deadline_exceeded("the peer did not answer the backfill's pull"))??
                .into_inner();
            loop {
                if self.stopping() {
                    return Err(Status::unavailable("the server is stopping"));
                }
                let msg = tokio::time::timeout(PULL_SILENCE_MAX, stream.message())
                    .await
                    .map_err(|_| Status::deadline_exceeded("the peer's backfill went silent"))??;
                // The window ended: pull again from the last batch.
                let Some(msg) = msg else { break };
                check_origin(slot, msg.origin)?;
                check_stream(slot, msg.stream)?;
                if let Some(b) = msg.batches.last() {
                    after = after.max(b.seqno);
                }
                // A batch's last write of a cell is the one it stands for (as a move's catch-up).
                let versions: Vec<SnapshotVersion> =
                    msg.batches.into_iter().flat_map(crate::moving::batch_versions).collect();
                applied += self.apply_kept(origin, stream_id, versions).await?;
                if msg.caught_up {
                    return Ok(applied);
                }
            }
        }
    }

    /// Applies `slot`'s node's snapshot of `set`; cursors kept.
    async fn backfill_snapshot(&self, slot: &PeerSlot, set: &SlotSet) -> Result<u64, Status> {
        let mut parts = self.snapshot(slot, set.as_bytes().to_vec()).await?;
        let mut applied = 0;
        while let Some(part) = next_part(slot, &mut parts).await? {
            let versions = part.versions.into_iter().map(super::wire::version_from_wire).collect();
            applied += self.apply_kept(slot.peer.region, slot.stream, versions).await?;
            if part.last {
                return Ok(applied);
            }
        }
        Err(Status::unavailable("the peer's snapshot ended early"))
    }

    /// Applies versions of `origin`'s `stream`, in order, as snapshot parts (each resolved
    /// as a replicated version, no cursor moved): a part holds a cell at most once (the engine
    /// refuses a part that holds one twice), so a cell written again starts a new part.
    async fn apply_kept(&self, origin: u32, stream: StreamId, versions: Vec<SnapshotVersion>) -> Result<u64, Status> {
        let max = SNAPSHOT_PART_VERSIONS.min(quiver_storage::SHIPPED_VERSIONS_MAX);
        let mut parts: Vec<Vec<SnapshotVersion>> = vec![Vec::new()];
        let mut cells = std::collections::HashSet::new();
        for v in versions {
            let cell = (v.entity.clone(), v.feature, v.event_time);
            if parts.last().is_some_and(|p| p.len() >= max) || cells.contains(&cell) {
                parts.push(Vec::new());
                cells.clear();
            }
            cells.insert(cell);
            if let Some(p) = parts.last_mut() {
                p.push(v);
            }
        }
        let mut applied = 0;
        for part in parts.into_iter().filter(|p| !p.is_empty()) {
            let db = self.db.clone();
            let r = self
                .run(move || {
                    db.apply_snapshot_stream(origin, stream, &part, None, Durability::Sync)
                        .map_err(|e| storage_status(&e))
                })
                .await?;
            applied += r.applied + r.conflicts;
        }
        Ok(applied)
    }

    /// The pullers now (retired seeds left out).
    fn slots(&self) -> Vec<Arc<PeerSlot>> {
        self.peers.read().iter().filter(|p| !p.retired.load(Ordering::Acquire)).cloned().collect()
    }

    /// Starts one puller per peer; they run until [`Replicator::shutdown`]. A sharded peer
    /// region's seed puller starts one puller per node of that region in its place.
    pub fn start(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        self.slots().into_iter().map(|slot| self.spawn_puller(slot)).collect()
    }

    fn spawn_puller(self: &Arc<Self>, slot: Arc<PeerSlot>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move { me.run_puller(slot).await })
    }

    /// The pullers started after [`Replicator::start`] (one per node of a sharded peer
    /// region), for a stopping server to wait for after [`Replicator::shutdown`].
    pub fn take_spawned(&self) -> Vec<tokio::task::JoinHandle<()>> {
        std::mem::take(&mut *self.spawned.lock())
    }

    /// Stops the pullers (they finish the batch they are applying).
    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::Release);
        self.stop.notify_waiters();
        for p in self.peers.read().iter() {
            p.wake.notify_waiters();
        }
    }

    /// Runs an engine call: on the blocking pool, or inline (see [`Transport`]).
    pub(super) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        if self.transport.inline_engine {
            f()
        } else {
            blocking(f).await
        }
    }

    pub(super) fn stopping(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    /// The pullers of peer `region` (one, or one per node of a sharded region).
    fn region_slots(&self, region: u32) -> Result<Vec<Arc<PeerSlot>>, Status> {
        let slots: Vec<_> = self.slots().into_iter().filter(|p| p.peer.region == region).collect();
        if slots.is_empty() {
            return Err(Status::not_found(format!("region {region} is not a peer of this node")));
        }
        Ok(slots)
    }

    /// Sleeps `d`, or less if stopping or woken.
    async fn pause_for(&self, slot: &PeerSlot, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.stop.notified() => {}
            _ = slot.wake.notified() => {}
        }
    }

    /// The members of `slot`'s region, asked at its address (and the nodes removed from it):
    /// `None` when that region is not sharded (or its node predates `Members`).
    async fn members(&self, slot: &PeerSlot) -> Result<Option<pb::MembersResponse>, Status> {
        let mut client = self.client(slot).await?;
        let req = pb::MembersRequest { region: self.region };
        let r = tokio::time::timeout(PULL_SILENCE_MAX, client.members(req))
            .await
            .map_err(|_| Status::deadline_exceeded("the peer did not answer Members"))?;
        let r = match r {
            Err(s) if s.code() == tonic::Code::Unimplemented => return Ok(None),
            r => r?.into_inner(),
        };
        if r.region != slot.peer.region {
            return Err(Status::failed_precondition(format!(
                "{} answers as region {}, configured as region {}",
                slot.peer.address, r.region, slot.peer.region
            )));
        }
        let sharded = r.members.iter().any(|m| m.stream != SOLE_STREAM);
        Ok(sharded.then_some(r))
    }

    /// Starts a puller for every member of the answer's region that has none, and retires the
    /// puller of every node removed from it.
    fn adopt(self: &Arc<Self>, region: u32, answer: pb::MembersResponse) {
        let mut fresh = Vec::new();
        {
            let mut peers = self.peers.write();
            for gone in &answer.removed {
                let removed = |p: &&Arc<PeerSlot>| p.peer.region == region && p.stream == gone.stream && !p.seed;
                for p in peers.iter().filter(removed) {
                    p.removed_end.fetch_max(gone.head.saturating_add(1), Ordering::AcqRel);
                    if !p.retired.swap(true, Ordering::AcqRel) {
                        tracing::info!(peer = region, node = %p.node, "the node was removed from its region: pulling from it no more");
                        p.wake.notify_waiters();
                    }
                }
            }
            for m in answer.members {
                if m.stream == SOLE_STREAM || m.address.is_empty() {
                    continue;
                }
                // A removed node (a stale registration): not pulled again.
                if answer.removed.iter().any(|r| r.stream == m.stream) {
                    continue;
                }
                if peers.iter().any(|p| p.peer.region == region && p.stream == m.stream) {
                    continue;
                }
                let address =
                    if m.address.contains("://") { m.address.clone() } else { format!("http://{}", m.address) };
                let slot = PeerSlot::new(Peer { region, address }, m.node, m.stream, false);
                tracing::info!(peer = region, node = %slot.node, address = %slot.peer.address, "pulling from a node of the peer region");
                peers.push(slot.clone());
                fresh.push(slot);
            }
        }
        let handles: Vec<_> = fresh.into_iter().map(|slot| self.spawn_puller(slot)).collect();
        self.spawned.lock().extend(handles);
    }

    /// A seed puller: asks its region's members until it knows them. Returns true when that
    /// region is sharded: the seed then retires, leaving one puller per member, and keeps
    /// asking every [`MEMBERS_POLL`] for nodes that join.
    async fn discover(self: &Arc<Self>, seed: &Arc<PeerSlot>) -> bool {
        let mut backoff = RETRY_BACKOFF_MIN;
        let members = loop {
            if self.stopping() {
                return true;
            }
            match self.members(seed).await {
                Ok(m) => break m,
                Err(s) => {
                    {
                        let mut info = seed.info.lock();
                        info.last_error = format!("{:?}: {}", s.code(), s.message());
                        info.state = pb::PeerState::Connecting as i32;
                    }
                    self.pause_for(seed, backoff).await;
                    backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                }
            }
        };
        let Some(members) = members else { return false };
        let region = seed.peer.region;
        // Its successors first: a backfill never sees the region without a puller.
        self.adopt(region, members);
        seed.retired.store(true, Ordering::Release);
        while !self.stopping() {
            self.pause_for(seed, MEMBERS_POLL).await;
            // Any node of the region answers: the seed first, then the members known.
            let mut asked = vec![seed.clone()];
            asked.extend(self.slots().into_iter().filter(|p| p.peer.region == region));
            for at in asked {
                if let Ok(Some(members)) = self.members(&at).await {
                    self.adopt(region, members);
                    break;
                }
            }
        }
        true
    }

    async fn run_puller(self: Arc<Self>, slot: Arc<PeerSlot>) {
        if slot.seed && self.discover(&slot).await {
            return;
        }
        let mut backoff = RETRY_BACKOFF_MIN;
        let mut need_snapshot = false;
        while !self.stopping() && !slot.retired.load(Ordering::Acquire) {
            if slot.paused.load(Ordering::Acquire) {
                slot.info.lock().state = pb::PeerState::Paused as i32;
                self.pause_for(&slot, Duration::from_secs(1)).await;
                continue;
            }
            if slot.rebootstrap.swap(false, Ordering::AcqRel) {
                need_snapshot = true;
            }
            let result = if need_snapshot { self.bootstrap(&slot).await } else { self.pull(&slot).await };
            match result {
                Ok(()) => {
                    need_snapshot = false;
                    backoff = RETRY_BACKOFF_MIN;
                }
                Err(s) => {
                    if s.code() == tonic::Code::OutOfRange && !need_snapshot {
                        tracing::warn!(peer = slot.peer.region, "behind the peer's retained log: bootstrapping");
                        need_snapshot = true;
                        backoff = RETRY_BACKOFF_MIN;
                    } else {
                        tracing::debug!(peer = slot.peer.region, error = %s, "replication error; retrying");
                        {
                            let mut info = slot.info.lock();
                            info.last_error = format!("{:?}: {}", s.code(), s.message());
                            info.state = pb::PeerState::Connecting as i32;
                            info.caught_up = false;
                        }
                        self.pause_for(&slot, backoff).await;
                        backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                    }
                }
            }
        }
    }

    async fn client(
        &self,
        slot: &PeerSlot,
    ) -> Result<pb::replication_service_client::ReplicationServiceClient<crate::auth::AuthChannel>, Status> {
        let token = self.transport.token.clone();
        if let Some(connect) = &self.transport.connect {
            let channel = connect(slot.peer.address.clone())
                .await
                .map_err(|e| Status::unavailable(format!("connecting to {}: {e}", slot.peer.address)))?;
            return Ok(pb::replication_service_client::ReplicationServiceClient::with_interceptor(channel, token)
                .accept_compressed(CompressionEncoding::Zstd)
                .send_compressed(CompressionEncoding::Zstd)
                .max_decoding_message_size(REPLICATION_MESSAGE_BYTES_MAX));
        }
        // A node with TLS speaks TLS to its peers, whatever scheme their address was given with.
        let address = match (&self.transport.tls, slot.peer.address.strip_prefix("http://")) {
            (Some(_), Some(rest)) => format!("https://{rest}"),
            _ => slot.peer.address.clone(),
        };
        let mut endpoint = tonic::transport::Endpoint::from_shared(address)
            .map_err(|e| Status::invalid_argument(format!("peer address {}: {e}", slot.peer.address)))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        if let Some(tls) = &self.transport.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| Status::invalid_argument(format!("TLS toward {}: {e}", slot.peer.address)))?;
        }
        let channel = endpoint.connect().await.map_err(|e| {
            // The transport error's own text is terse ("transport error"): keep its causes.
            let mut why = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                why.push_str(": ");
                why.push_str(&s.to_string());
                source = s.source();
            }
            Status::unavailable(format!("connecting to {}: {why}", slot.peer.address))
        })?;
        Ok(pb::replication_service_client::ReplicationServiceClient::with_interceptor(channel, token)
            .accept_compressed(CompressionEncoding::Zstd)
            .send_compressed(CompressionEncoding::Zstd)
            .max_decoding_message_size(REPLICATION_MESSAGE_BYTES_MAX))
    }

    /// One Pull stream: applies what it brings until the window ends, an error, a pause or a
    /// re-bootstrap request. Batches are applied strictly in their chain order (each right
    /// after its predecessor), each message's as one group with `Sync`: a replicated version
    /// is visible only once durable, so a crash never rolls a cell back.
    async fn pull(&self, slot: &PeerSlot) -> Result<(), Status> {
        let mut client = self.client(slot).await?;
        let (origin, stream_id) = (slot.peer.region, slot.stream);
        let db = self.db.clone();
        let mut cursor =
            self.run(move || db.replication_cursor_of(origin, stream_id).map_err(|e| storage_status(&e))).await?;
        slot.info.lock().cursor = cursor;
        let mut after = cursor;
        if let Some(chaos) = &self.chaos {
            // Test-only: ask again for batches already applied (redelivery).
            after = after.saturating_sub(chaos.lock().below(8));
        }
        let (wanted, revision) = self.wanted_slots()?;
        let req = self.pull_request(after, wanted, false);
        // Every wait on the peer is bounded: a connection a partition cut silently must not
        // hold the puller forever.
        let mut stream = tokio::time::timeout(PULL_SILENCE_MAX, client.pull(req))
            .await
            .map_err(|_| Status::deadline_exceeded("the peer did not answer the pull"))??
            .into_inner();
        slot.info.lock().state = pb::PeerState::Streaming as i32;
        slot.pull_revision.store(revision, Ordering::Release);
        let mut chain = Chain::new(after, cursor);
        loop {
            if self.stopping()
                || slot.paused.load(Ordering::Acquire)
                || slot.rebootstrap.load(Ordering::Acquire)
                || slot.retired.load(Ordering::Acquire)
            {
                return Ok(());
            }
            let msg = tokio::select! {
                m = tokio::time::timeout(PULL_SILENCE_MAX, stream.message()) => match m {
                    Ok(m) => m?,
                    Err(_) => return Err(Status::deadline_exceeded("the peer's stream went silent")),
                },
                _ = self.stop.notified() => return Ok(()),
                // Paused or asked to re-bootstrap: the loop's top decides.
                _ = slot.wake.notified() => continue,
            };
            let Some(msg) = msg else { return Ok(()) };
            check_origin(slot, msg.origin)?;
            check_stream(slot, msg.stream)?;
            let mut arrived: Vec<(u64, ShippedBatch)> = msg.batches.into_iter().map(|b| from_wire(origin, b)).collect();
            if let Some(chaos) = &self.chaos {
                let pause = {
                    let mut c = chaos.lock();
                    c.disorder(&mut arrived);
                    c.below(20)
                };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            // Follow the stream's chain from `after`; what is at or below the cursor was
            // applied before.
            let Accepted { ready, redelivered } = chain.accept(arrived);
            cursor = chain.cursor();
            let n = ready.len() as u64;
            let last = ready.last().map(|b| (b.seqno, b.system_time.0));
            let registry_changed = ready.iter().any(|b| touches_registry(b.ops.iter().map(|o| o.entity.as_slice())));
            let test_redelivery = self.chaos.is_some() && !redelivered.is_empty();
            if !ready.is_empty() || test_redelivery {
                let db = self.db.clone();
                self.run(move || {
                    // Test-only: a redelivered batch must change nothing.
                    for b in &redelivered {
                        let r = db
                            .apply_replicated_stream(stream_id, std::slice::from_ref(b), Durability::Sync)
                            .map_err(|e| storage_status(&e))?
                            .pop()
                            .unwrap_or_default();
                        if !r.already_applied {
                            return Err(Status::internal(format!("redelivered batch {} was applied again", b.seqno)));
                        }
                    }
                    // One group: one sync, and nothing visible before all of it is durable.
                    if !ready.is_empty() {
                        db.apply_replicated_stream(stream_id, &ready, Durability::Sync)
                            .map_err(|e| storage_status(&e))?;
                    }
                    Ok(())
                })
                .await?;
            }
            if registry_changed {
                let registry = self.registry.clone();
                self.run(move || registry.reload().map_err(|e| Status::internal(e.to_string()))).await?;
            }
            let mut info = slot.info.lock();
            info.cursor = cursor;
            if let Some((_, stamp)) = last {
                info.lag_seconds = ((msg.origin_time_us - stamp as i64).max(0) as f64) / 1e6;
            }
            info.batches_applied += n;
            info.caught_up = msg.caught_up && !chain.has_gap();
            if info.caught_up {
                info.lag_seqnos = 0;
                info.lag_seconds = 0.0;
            } else {
                info.lag_seqnos = msg.head_seqno.saturating_sub(cursor);
            }
            info.last_contact_us = now_us();
            info.last_error.clear();
        }
    }

    /// Applies the peer's snapshot, then lets the puller continue from its log.
    async fn bootstrap(&self, slot: &PeerSlot) -> Result<(), Status> {
        let (origin, stream_id) = (slot.peer.region, slot.stream);
        slot.info.lock().state = pb::PeerState::Bootstrapping as i32;
        let mut stream = self.snapshot(slot, self.wanted_slots()?.0).await?;
        let mut finished = false;
        while let Some(part) = next_part(slot, &mut stream).await? {
            if self.stopping() {
                return Ok(());
            }
            let versions: Vec<SnapshotVersion> =
                part.versions.into_iter().map(super::wire::version_from_wire).collect();
            let through = part.last.then_some(part.through);
            let db = self.db.clone();
            self.run(move || {
                db.apply_snapshot_stream(origin, stream_id, &versions, through, Durability::Async)
                    .map_err(|e| storage_status(&e))
            })
            .await?;
            slot.info.lock().last_contact_us = now_us();
            if part.last {
                finished = true;
                break;
            }
        }
        if !finished {
            return Err(Status::unavailable("the peer's snapshot ended early"));
        }
        let registry = self.registry.clone();
        self.run(move || registry.reload().map_err(|e| Status::internal(e.to_string()))).await?;
        let mut info = slot.info.lock();
        info.bootstraps += 1;
        info.state = pb::PeerState::Streaming as i32;
        tracing::info!(peer = origin, "bootstrapped from the peer's snapshot");
        Ok(())
    }

    /// Records the acknowledgement of a puller of peer `region` (`node`: its node id, empty
    /// when that region is not sharded) and releases the log every puller has applied.
    pub(super) fn acknowledge(&self, region: u32, node: &str, after: u64) {
        // Who must acknowledge: the nodes this node pulls from (pulling goes both ways), or a
        // peer region's one node (`""`) while it is not known to be sharded.
        let expected: Vec<(u32, String)> = self.slots().iter().map(|p| (p.peer.region, p.node.clone())).collect();
        let least = {
            let mut acks = self.acks.lock();
            acks.insert((region, node.to_string()), after);
            // A node no longer pulled from (the seed's "" once its region is known sharded)
            // holds nothing back.
            acks.retain(|k, _| expected.contains(k));
            // Until every one has acknowledged once, keep everything (within the bound).
            if expected.iter().any(|k| !acks.contains_key(k)) {
                return;
            }
            acks.values().copied().min()
        };
        if let Some(l) = least {
            self.db.retain_log_after(l);
        }
    }

    /// The nodes that pull from this node (those it pulls from) and have not pulled its
    /// stream through `head`, each with what it has acknowledged (`None`: nothing yet). A
    /// puller's acknowledgement is the last *local* batch it applied (only those are shipped),
    /// so one below `head` still counts as through it when no local batch lies between. Empty:
    /// every peer node holds this node's stream up to `head` (a removal's drain, §7).
    pub async fn not_pulled_through(&self, head: u64) -> Vec<(u32, String, Option<u64>)> {
        let acked: Vec<(u32, String, Option<u64>)> = {
            let acks = self.acks.lock();
            self.slots()
                .iter()
                .map(|p| (p.peer.region, p.node.clone()))
                .map(|(region, node)| {
                    let a = acks.get(&(region, node.clone())).copied();
                    (region, node, a)
                })
                .collect()
        };
        let mut behind = Vec::new();
        for (region, node, a) in acked {
            let through = match a {
                None => false,
                Some(a) if a >= head => true,
                Some(a) => {
                    let db = self.db.clone();
                    // The next local batch after the acknowledgement (an error, e.g. a log
                    // pruned past it: not through).
                    let next = self.run(move || db.origin_log(a, 1).map_err(|e| storage_status(&e))).await;
                    next.is_ok_and(|b| b.first().is_none_or(|b| b.seqno > head))
                }
            };
            if !through {
                behind.push((region, node, a));
            }
        }
        behind
    }

    /// Asks every sharded peer region for its members now (as the pullers do every
    /// [`MEMBERS_POLL`]) and starts pullers for the nodes that joined: a removal's drain then
    /// waits for them too.
    pub async fn refresh_members(self: &Arc<Self>) {
        let seeds: Vec<Arc<PeerSlot>> = self.peers.read().iter().filter(|p| p.seed).cloned().collect();
        for seed in seeds {
            let region = seed.peer.region;
            let mut asked = vec![seed.clone()];
            asked.extend(self.slots().into_iter().filter(|p| p.peer.region == region && !p.seed));
            for at in asked {
                if let Ok(Some(members)) = self.members(&at).await {
                    self.adopt(region, members);
                    break;
                }
            }
        }
    }

    /// The least acknowledgement of this node's log by the nodes it pulls from (`None`: one has
    /// not acknowledged yet, or there are none). After a drain through a log position, every
    /// local batch up to it is at or below this (acknowledgements are local batches).
    pub fn least_acknowledgement(&self) -> Option<u64> {
        let acks = self.acks.lock();
        let mut least: Option<u64> = None;
        for p in self.slots() {
            let a = acks.get(&(p.peer.region, p.node.clone())).copied()?;
            least = Some(least.map_or(a, |l| l.min(a)));
        }
        least
    }

    /// How many pullers this node runs (retired ones left out).
    pub fn puller_count(&self) -> u32 {
        u32::try_from(self.slots().len()).unwrap_or(u32::MAX)
    }

    /// The least acknowledgement of this node's log by `region`'s pullers.
    fn acknowledged_by(&self, region: u32) -> Option<u64> {
        self.acks.lock().iter().filter(|((r, _), _)| *r == region).map(|(_, a)| *a).min()
    }

    fn status_of(&self, slot: &PeerSlot) -> pb::PeerStatus {
        let info = slot.info.lock().clone();
        let state = if slot.paused.load(Ordering::Acquire) { pb::PeerState::Paused as i32 } else { info.state };
        pb::PeerStatus {
            node: slot.node.clone(),
            stream: slot.stream,
            region: slot.peer.region,
            address: slot.peer.address.clone(),
            state,
            cursor: info.cursor,
            lag_seqnos: info.lag_seqnos,
            lag_seconds: info.lag_seconds,
            caught_up: info.caught_up,
            last_error: info.last_error,
            last_contact_us: info.last_contact_us,
            batches_applied: info.batches_applied,
            bootstraps: info.bootstraps,
            peer_acknowledged: self.acknowledged_by(slot.peer.region).unwrap_or(0),
        }
    }

    /// Every peer's status.
    pub fn status(&self) -> pb::GetReplicationStatusResponse {
        let stats = self.db.stats();
        pb::GetReplicationStatusResponse {
            region: self.region,
            peers: self.slots().iter().map(|p| self.status_of(p)).collect(),
            knowledge: Some(crate::convert::vector_to_proto(&self.db.knowledge())),
            conflicts: stats.replication_conflicts,
            last_seqno: stats.last_seqno,
        }
    }

    /// Sets `flag` on every puller of `region` and wakes them; the first one's status.
    fn command(
        &self,
        region: u32,
        flag: impl Fn(&PeerSlot) -> &AtomicBool,
        value: bool,
    ) -> Result<pb::PeerStatus, Status> {
        let slots = self.region_slots(region)?;
        for slot in &slots {
            flag(slot).store(value, Ordering::Release);
            slot.wake.notify_waiters();
        }
        Ok(self.status_of(&slots[0]))
    }

    /// Pauses pulling from `region` (from each of its nodes).
    pub fn pause(&self, region: u32) -> Result<pb::PeerStatus, Status> {
        self.command(region, |s| &s.paused, true)
    }

    /// Resumes pulling from `region`.
    pub fn resume(&self, region: u32) -> Result<pb::PeerStatus, Status> {
        self.command(region, |s| &s.paused, false)
    }

    /// Makes the pullers of `region` apply their snapshots again, then continue from the log.
    pub fn rebootstrap(&self, region: u32) -> Result<pb::PeerStatus, Status> {
        self.command(region, |s| &s.rebootstrap, true)
    }

    /// Per-peer-region figures for the metrics: (peer region, lag seconds, lag seqnos,
    /// batches applied, bootstraps, 1 if streaming), the worst lag and the sums over a
    /// sharded region's nodes.
    pub fn peer_figures(&self) -> Vec<(u32, f64, u64, u64, u64, bool)> {
        let mut by_region: BTreeMap<u32, (f64, u64, u64, u64, bool)> = BTreeMap::new();
        for p in self.slots() {
            let i = p.info.lock();
            let up = i.state == pb::PeerState::Streaming as i32 && i.last_error.is_empty();
            let e = by_region.entry(p.peer.region).or_insert((0.0, 0, 0, 0, true));
            e.0 = e.0.max(i.lag_seconds);
            e.1 = e.1.max(i.lag_seqnos);
            e.2 += i.batches_applied;
            e.3 += i.bootstraps;
            e.4 &= up;
        }
        by_region.into_iter().map(|(r, (s, n, b, bs, up))| (r, s, n, b, bs, up)).collect()
    }
}
