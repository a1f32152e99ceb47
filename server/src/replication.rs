//! Replication between regions: the server's half (`storage/REPLICATION.md` is the engine's).
//!
//! # Shape
//! Every node serves `ReplicationService` and runs one *puller* task per configured peer. A
//! puller asks its peer for the batches that originated there, after its cursor (the origin
//! sequence number it has applied through, a cell the engine writes atomically with each
//! applied batch), applies each with [`Db::apply_replicated`], and calls again when the
//! stream's window ends; each call's `after` acknowledges what it applied, so the origin can
//! release its log ([`Db::retain_log_after`] with the least acknowledgement of all peers).
//! A peer whose `after` the origin's log no longer reaches gets `OUT_OF_RANGE`; the puller
//! then applies the origin's snapshot ([`Db::apply_snapshot`]) and continues from the log.
//!
//! Applied batches are logged `Async`: the cursor is in the same WAL record as the data, so
//! a crash loses both together and the batches are pulled again. Only batches durable at
//! their origin are shipped.
//!
//! # Faults
//! Every error (connect, stream, apply) is recorded as the peer's `last_error`, and the
//! puller retries with exponential backoff from [`RETRY_BACKOFF_MIN`] to [`RETRY_BACKOFF_MAX`].
//! Redelivered, reordered or duplicated batches change nothing (the cursor and the vector
//! compare-and-swap make applying idempotent); a batch above a gap is never asked for,
//! because pulls always start from the durable cursor.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use quiver_proto::v1 as pb;
use quiver_storage::{
    Db, Durability, EventTime, FeatureId, ShippedBatch, ShippedOp, SnapshotVersion, SystemTime, SHIPPED_VERSIONS_MAX,
};
use tokio::sync::Notify;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

use crate::registry::{Registry, FEATURE_ID_STRIDE, PREFIX as REGISTRY_PREFIX};
use crate::service::{blocking, storage_status};

/// Largest region id (feature ids are strided by region, see [`FEATURE_ID_STRIDE`]).
pub const REGION_ID_MAX: u32 = FEATURE_ID_STRIDE - 1;
/// Most peers of one node (every region takes one entry of every version vector).
pub const PEERS_MAX: usize = 15;
/// How long a Pull stream stays open when the puller does not say.
pub const PULL_WINDOW_DEFAULT: Duration = Duration::from_secs(2);
/// Longest Pull window a node grants.
pub const PULL_WINDOW_MAX: Duration = Duration::from_secs(30);
/// Most batches one Pull message carries.
pub const PULL_BATCHES_PER_MESSAGE_MAX: usize = 1024;
/// A Pull message is cut once its batches exceed this many bytes of cells.
pub const PULL_MESSAGE_BYTES_TARGET: usize = 4 << 20;
/// How often an idle Pull stream checks for new batches.
pub const PULL_IDLE_POLL: Duration = Duration::from_millis(2);
/// An idle Pull stream sends an empty message this often (the puller's liveness and lag).
pub const PULL_HEARTBEAT: Duration = Duration::from_millis(250);
/// Versions per Snapshot part.
pub const SNAPSHOT_PART_VERSIONS: usize = 4096;
/// Retry backoff after an error, doubling from the first to the second.
pub const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// See [`RETRY_BACKOFF_MIN`].
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a puller waits to connect to its peer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A Pull stream silent for this long (no heartbeat) is abandoned and reopened.
pub const PULL_SILENCE_MAX: Duration = Duration::from_secs(5);
/// Largest replication message accepted.
pub const REPLICATION_MESSAGE_BYTES_MAX: usize = 64 << 20;

/// Opens a channel to a peer's address (a test's simulated network, for instance).
pub type Connect = Arc<
    dyn Fn(String) -> Pin<Box<dyn std::future::Future<Output = Result<tonic::transport::Channel, String>> + Send>>
        + Send
        + Sync,
>;

/// How a replicator reaches its peers and runs engine calls. The default is TCP and tokio's
/// blocking pool; a deterministic simulation swaps in its network and runs engine calls
/// inline (its engine lives in memory).
#[derive(Clone, Default)]
pub struct Transport {
    /// Opens channels to peers (`None`: TCP).
    pub connect: Option<Connect>,
    /// Run engine calls on the calling task instead of the blocking pool.
    pub inline_engine: bool,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("connect", &self.connect.as_ref().map(|_| "custom"))
            .field("inline_engine", &self.inline_engine)
            .finish()
    }
}

/// One peer: its region and its gRPC address (`host:port` or `http://host:port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its region.
    pub region: u32,
    /// Where its `ReplicationService` listens.
    pub address: String,
}

impl std::str::FromStr for Peer {
    type Err = String;

    /// `REGION=ADDRESS`, for example `2=10.0.0.7:50051`.
    fn from_str(s: &str) -> Result<Peer, String> {
        let (r, a) = s.split_once('=').ok_or_else(|| format!("peer {s:?} is not REGION=HOST:PORT"))?;
        let region = r.trim().parse::<u32>().map_err(|_| format!("peer {s:?}: region {r:?} is not a number"))?;
        let address = a.trim();
        if address.is_empty() {
            return Err(format!("peer {s:?} has no address"));
        }
        let address = if address.contains("://") { address.to_string() } else { format!("http://{address}") };
        Ok(Peer { region, address })
    }
}

/// This node's place in a cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterConfig {
    /// This node's region.
    pub region: u32,
    /// Its peers (none: a single-region node).
    pub peers: Vec<Peer>,
}

impl ClusterConfig {
    /// Checks region ids and peers.
    pub fn check(&self) -> Result<(), String> {
        if self.region > REGION_ID_MAX {
            return Err(format!("region must be 0 to {REGION_ID_MAX}, not {}", self.region));
        }
        if self.peers.len() > PEERS_MAX {
            return Err(format!("at most {PEERS_MAX} peers"));
        }
        for (i, p) in self.peers.iter().enumerate() {
            if p.region > REGION_ID_MAX {
                return Err(format!("peer region must be 0 to {REGION_ID_MAX}, not {}", p.region));
            }
            if p.region == self.region {
                return Err(format!("peer {} has this node's own region", p.address));
            }
            if self.peers[..i].iter().any(|o| o.region == p.region) {
                return Err(format!("region {} is given twice as a peer", p.region));
            }
        }
        Ok(())
    }
}

/// What one puller reports.
#[derive(Debug, Default, Clone)]
struct PeerInfo {
    state: i32,
    cursor: u64,
    lag_seqnos: u64,
    lag_seconds: f64,
    caught_up: bool,
    last_error: String,
    last_contact_us: i64,
    batches_applied: u64,
    bootstraps: u64,
    /// The peer's last Pull `after` on this node (its acknowledgement of this node's log).
    acknowledged: Option<u64>,
}

/// One peer's puller state, shared with the admin API.
#[derive(Debug)]
struct PeerSlot {
    peer: Peer,
    info: Mutex<PeerInfo>,
    paused: AtomicBool,
    rebootstrap: AtomicBool,
    wake: Notify,
}

/// Replication of one node: its pullers and its `ReplicationService`.
#[derive(Debug)]
pub struct Replicator {
    db: Arc<Db>,
    registry: Arc<Registry>,
    region: u32,
    peers: Vec<Arc<PeerSlot>>,
    shutdown: AtomicBool,
    stop: Notify,
    /// Test-only message faults ([`CHAOS_ENV`]).
    chaos: Option<Mutex<Chaos>>,
    transport: Transport,
}

/// Test-only: when this environment variable holds a seed, pullers disorder what they receive
/// (shuffle and duplicate batches within a message, delay messages, and re-ask for batches
/// already applied), to check that applying stays exact under reordering and redelivery.
pub const CHAOS_ENV: &str = "QUIVER_TEST_REPLICATION_CHAOS";

/// A small deterministic generator for [`CHAOS_ENV`] (xorshift64*).
#[derive(Debug)]
struct Chaos(u64);

impl Chaos {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    /// Shuffles and duplicates.
    fn disorder<T: Clone>(&mut self, items: &mut Vec<T>) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
        if !items.is_empty() && self.below(4) == 0 {
            let i = self.below(items.len() as u64) as usize;
            let dup = items[i].clone();
            items.push(dup);
        }
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

fn to_wire(b: ShippedBatch, prev_seqno: u64) -> pb::ShippedBatch {
    pb::ShippedBatch {
        seqno: b.seqno,
        prev_seqno,
        system_time_us: b.system_time.0,
        ops: b
            .ops
            .into_iter()
            .map(|o| pb::ShippedOp {
                entity: o.entity,
                feature: o.feature.0,
                event_time_us: o.event_time.0,
                cell: o.cell,
            })
            .collect(),
    }
}

fn from_wire(origin: u32, b: pb::ShippedBatch) -> (u64, ShippedBatch) {
    (
        b.prev_seqno,
        ShippedBatch {
            origin,
            seqno: b.seqno,
            system_time: SystemTime(b.system_time_us),
            ops: b
                .ops
                .into_iter()
                .map(|o| ShippedOp {
                    entity: o.entity,
                    feature: FeatureId(o.feature),
                    event_time: EventTime(o.event_time_us),
                    cell: o.cell,
                })
                .collect(),
        },
    )
}

fn touches_registry<'a>(mut entities: impl Iterator<Item = &'a [u8]>) -> bool {
    entities.any(|e| e.starts_with(REGISTRY_PREFIX))
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
        let peers = cluster
            .peers
            .iter()
            .map(|p| {
                Arc::new(PeerSlot {
                    peer: p.clone(),
                    info: Mutex::new(PeerInfo { state: pb::PeerState::Connecting as i32, ..PeerInfo::default() }),
                    paused: AtomicBool::new(false),
                    rebootstrap: AtomicBool::new(false),
                    wake: Notify::new(),
                })
            })
            .collect();
        Arc::new(Replicator {
            db,
            registry,
            region: cluster.region,
            peers,
            shutdown: AtomicBool::new(false),
            stop: Notify::new(),
            chaos: std::env::var(CHAOS_ENV)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .map(|seed| Mutex::new(Chaos(seed | 1))),
            transport,
        })
    }

    /// Starts one puller per peer; they run until [`Replicator::shutdown`].
    pub fn start(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        self.peers
            .iter()
            .map(|slot| {
                let me = self.clone();
                let slot = slot.clone();
                tokio::spawn(async move { me.run_puller(slot).await })
            })
            .collect()
    }

    /// Stops the pullers (they finish the batch they are applying).
    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::Release);
        self.stop.notify_waiters();
        for p in &self.peers {
            p.wake.notify_waiters();
        }
    }

    /// Runs an engine call: on the blocking pool, or inline (see [`Transport`]).
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        if self.transport.inline_engine {
            f()
        } else {
            blocking(f).await
        }
    }

    fn stopping(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    fn slot(&self, region: u32) -> Result<&Arc<PeerSlot>, Status> {
        self.peers
            .iter()
            .find(|p| p.peer.region == region)
            .ok_or_else(|| Status::not_found(format!("region {region} is not a peer of this node")))
    }

    /// Sleeps `d`, or less if stopping or woken.
    async fn pause_for(&self, slot: &PeerSlot, d: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.stop.notified() => {}
            _ = slot.wake.notified() => {}
        }
    }

    async fn run_puller(self: Arc<Self>, slot: Arc<PeerSlot>) {
        let mut backoff = RETRY_BACKOFF_MIN;
        let mut need_snapshot = false;
        while !self.stopping() {
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
    ) -> Result<pb::replication_service_client::ReplicationServiceClient<tonic::transport::Channel>, Status> {
        if let Some(connect) = &self.transport.connect {
            let channel = connect(slot.peer.address.clone())
                .await
                .map_err(|e| Status::unavailable(format!("connecting to {}: {e}", slot.peer.address)))?;
            return Ok(pb::replication_service_client::ReplicationServiceClient::new(channel)
                .accept_compressed(CompressionEncoding::Zstd)
                .send_compressed(CompressionEncoding::Zstd)
                .max_decoding_message_size(REPLICATION_MESSAGE_BYTES_MAX));
        }
        let endpoint = tonic::transport::Endpoint::from_shared(slot.peer.address.clone())
            .map_err(|e| Status::invalid_argument(format!("peer address {}: {e}", slot.peer.address)))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
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
        Ok(pb::replication_service_client::ReplicationServiceClient::new(channel)
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
        let origin = slot.peer.region;
        let db = self.db.clone();
        let mut cursor = self.run(move || db.replication_cursor(origin).map_err(|e| storage_status(&e))).await?;
        slot.info.lock().cursor = cursor;
        let mut after = cursor;
        if let Some(chaos) = &self.chaos {
            // Test-only: ask again for batches already applied (redelivery).
            after = after.saturating_sub(chaos.lock().below(8));
        }
        let req = pb::PullRequest { region: self.region, after, window_ms: PULL_WINDOW_DEFAULT.as_millis() as u32 };
        // Every wait on the peer is bounded: a connection a partition cut silently must not
        // hold the puller forever.
        let mut stream = tokio::time::timeout(PULL_SILENCE_MAX, client.pull(req))
            .await
            .map_err(|_| Status::deadline_exceeded("the peer did not answer the pull"))??
            .into_inner();
        slot.info.lock().state = pb::PeerState::Streaming as i32;
        // The last batch of the stream's chain applied or skipped, and batches that arrived
        // before their predecessor, by predecessor.
        let mut tip = after;
        let mut waiting: BTreeMap<u64, ShippedBatch> = BTreeMap::new();
        loop {
            if self.stopping() || slot.paused.load(Ordering::Acquire) || slot.rebootstrap.load(Ordering::Acquire) {
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
            if msg.origin != origin {
                return Err(Status::failed_precondition(format!(
                    "{} answers as region {}, configured as region {origin}",
                    slot.peer.address, msg.origin
                )));
            }
            let mut arrived: Vec<(u64, ShippedBatch)> = msg.batches.into_iter().map(|b| from_wire(origin, b)).collect();
            let mut redelivered = Vec::new();
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
            for (prev, b) in arrived {
                if b.seqno <= tip {
                    redelivered.push(b);
                } else if waiting.len() < PULL_BATCHES_PER_MESSAGE_MAX * 4 {
                    waiting.insert(prev, b);
                }
            }
            let mut ready = Vec::new();
            while let Some(b) = waiting.remove(&tip) {
                tip = b.seqno;
                if b.seqno > cursor {
                    cursor = b.seqno;
                    ready.push(b);
                } else {
                    redelivered.push(b);
                }
            }
            waiting.retain(|_, b| b.seqno > tip);
            let n = ready.len() as u64;
            let last = ready.last().map(|b| (b.seqno, b.system_time.0));
            let registry_changed = ready.iter().any(|b| touches_registry(b.ops.iter().map(|o| o.entity.as_slice())));
            let test_redelivery = self.chaos.is_some() && !redelivered.is_empty();
            if !ready.is_empty() || test_redelivery {
                let db = self.db.clone();
                self.run(move || {
                    // Test-only: a redelivered batch must change nothing.
                    for b in &redelivered {
                        let r = db.apply_replicated(b, Durability::Sync).map_err(|e| storage_status(&e))?;
                        if !r.already_applied {
                            return Err(Status::internal(format!("redelivered batch {} was applied again", b.seqno)));
                        }
                    }
                    // One group: one sync, and nothing visible before all of it is durable.
                    if !ready.is_empty() {
                        db.apply_replicated_batches(&ready, Durability::Sync).map_err(|e| storage_status(&e))?;
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
            info.caught_up = msg.caught_up && waiting.is_empty();
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
        let mut client = self.client(slot).await?;
        let origin = slot.peer.region;
        slot.info.lock().state = pb::PeerState::Bootstrapping as i32;
        let mut stream =
            tokio::time::timeout(PULL_SILENCE_MAX, client.snapshot(pb::SnapshotRequest { region: self.region }))
                .await
                .map_err(|_| Status::deadline_exceeded("the peer did not answer the snapshot request"))??
                .into_inner();
        let mut finished = false;
        while let Some(part) = tokio::time::timeout(PULL_SILENCE_MAX * 4, stream.message())
            .await
            .map_err(|_| Status::deadline_exceeded("the peer's snapshot went silent"))??
        {
            if self.stopping() {
                return Ok(());
            }
            if part.origin != origin {
                return Err(Status::failed_precondition(format!(
                    "{} answers as region {}, configured as region {origin}",
                    slot.peer.address, part.origin
                )));
            }
            let versions: Vec<SnapshotVersion> = part
                .versions
                .into_iter()
                .map(|v| SnapshotVersion {
                    entity: v.entity,
                    feature: FeatureId(v.feature),
                    event_time: EventTime(v.event_time_us),
                    system_time: SystemTime(v.system_time_us),
                    cell: v.cell,
                })
                .collect();
            let through = part.last.then_some(part.through);
            let db = self.db.clone();
            self.run(move || {
                db.apply_snapshot(origin, &versions, through, Durability::Async).map_err(|e| storage_status(&e))
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

    /// Records a peer's acknowledgement and releases the log every peer has applied.
    fn acknowledge(&self, region: u32, after: u64) {
        let mut least: Option<u64> = None;
        for p in &self.peers {
            let mut info = p.info.lock();
            if p.peer.region == region {
                info.acknowledged = Some(after);
            }
            // Until every peer has acknowledged once, keep everything (within the bound).
            let Some(a) = info.acknowledged else { return };
            least = Some(least.map_or(a, |l: u64| l.min(a)));
        }
        if let Some(l) = least {
            self.db.retain_log_after(l);
        }
    }

    fn status_of(&self, slot: &PeerSlot) -> pb::PeerStatus {
        let info = slot.info.lock().clone();
        let state = if slot.paused.load(Ordering::Acquire) { pb::PeerState::Paused as i32 } else { info.state };
        pb::PeerStatus {
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
            peer_acknowledged: info.acknowledged.unwrap_or(0),
        }
    }

    /// Every peer's status.
    pub fn status(&self) -> pb::GetReplicationStatusResponse {
        let stats = self.db.stats();
        pb::GetReplicationStatusResponse {
            region: self.region,
            peers: self.peers.iter().map(|p| self.status_of(p)).collect(),
            knowledge: Some(crate::convert::vector_to_proto(&self.db.knowledge())),
            conflicts: stats.replication_conflicts,
            last_seqno: stats.last_seqno,
        }
    }

    /// Pauses pulling from `region`.
    pub fn pause(&self, region: u32) -> Result<pb::PeerStatus, Status> {
        let slot = self.slot(region)?;
        slot.paused.store(true, Ordering::Release);
        slot.wake.notify_waiters();
        Ok(self.status_of(slot))
    }

    /// Resumes pulling from `region`.
    pub fn resume(&self, region: u32) -> Result<pb::PeerStatus, Status> {
        let slot = self.slot(region)?;
        slot.paused.store(false, Ordering::Release);
        slot.wake.notify_waiters();
        Ok(self.status_of(slot))
    }

    /// Makes the puller of `region` apply its snapshot again, then continue from its log.
    pub fn rebootstrap(&self, region: u32) -> Result<pb::PeerStatus, Status> {
        let slot = self.slot(region)?;
        slot.rebootstrap.store(true, Ordering::Release);
        slot.wake.notify_waiters();
        Ok(self.status_of(slot))
    }

    /// Per-peer figures for the metrics: (peer region, lag seconds, lag seqnos, batches
    /// applied, bootstraps, 1 if streaming).
    pub fn peer_figures(&self) -> Vec<(u32, f64, u64, u64, u64, bool)> {
        self.peers
            .iter()
            .map(|p| {
                let i = p.info.lock();
                let up = i.state == pb::PeerState::Streaming as i32 && i.last_error.is_empty();
                (p.peer.region, i.lag_seconds, i.lag_seqnos, i.batches_applied, i.bootstraps, up)
            })
            .collect()
    }
}

/// The `ReplicationService` a node serves to its peers.
#[derive(Debug, Clone)]
pub struct ReplicationApi {
    replicator: Arc<Replicator>,
}

impl ReplicationApi {
    /// The service of `replicator`'s node.
    pub fn new(replicator: Arc<Replicator>) -> ReplicationApi {
        ReplicationApi { replicator }
    }

    fn check_peer(&self, region: u32) -> Result<(), Status> {
        if self.replicator.peers.iter().any(|p| p.peer.region == region) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "region {region} is not a configured peer of region {}",
                self.replicator.region
            )))
        }
    }
}

type StreamOf<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Splits batches into messages of about [`PULL_MESSAGE_BYTES_TARGET`].
fn messages(batches: Vec<ShippedBatch>) -> Vec<Vec<ShippedBatch>> {
    let mut out = vec![Vec::new()];
    let mut bytes = 0;
    for b in batches {
        let size: usize = b.ops.iter().map(|o| o.entity.len() + o.cell.len() + 16).sum();
        if bytes + size > PULL_MESSAGE_BYTES_TARGET && out.last().is_some_and(|m| !m.is_empty()) {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        if let Some(m) = out.last_mut() {
            m.push(b);
        }
    }
    out
}

#[tonic::async_trait]
impl pb::replication_service_server::ReplicationService for ReplicationApi {
    type PullStream = StreamOf<pb::PullResponse>;
    type SnapshotStream = StreamOf<pb::SnapshotPart>;

    async fn pull(&self, req: Request<pb::PullRequest>) -> Result<Response<Self::PullStream>, Status> {
        let req = req.into_inner();
        self.check_peer(req.region)?;
        let r = self.replicator.clone();
        r.acknowledge(req.region, req.after);
        let window = match req.window_ms {
            0 => PULL_WINDOW_DEFAULT,
            ms => Duration::from_millis(u64::from(ms)).min(PULL_WINDOW_MAX),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let deadline = Instant::now() + window;
            let mut after = req.after;
            let mut last_sent = Instant::now() - PULL_HEARTBEAT;
            while Instant::now() < deadline && !r.stopping() && !tx.is_closed() {
                let db = r.db.clone();
                let head = db.last_seqno();
                let read = r
                    .run(move || db.origin_log(after, PULL_BATCHES_PER_MESSAGE_MAX).map_err(|e| storage_status(&e)))
                    .await;
                let batches = match read {
                    Ok(b) => b,
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                };
                let caught_up = batches.len() < PULL_BATCHES_PER_MESSAGE_MAX;
                if batches.is_empty() && last_sent.elapsed() < PULL_HEARTBEAT {
                    // Idle: wait for a new batch (or the next heartbeat).
                    let r2 = r.clone();
                    let wait_until = (last_sent + PULL_HEARTBEAT).min(deadline);
                    while Instant::now() < wait_until && r2.db.last_seqno() == head && !r2.stopping() && !tx.is_closed()
                    {
                        tokio::time::sleep(PULL_IDLE_POLL).await;
                    }
                    continue;
                }
                let parts = messages(batches);
                let count = parts.len();
                for (i, part) in parts.into_iter().enumerate() {
                    let wire = part
                        .into_iter()
                        .map(|b| {
                            let prev = after;
                            after = b.seqno;
                            to_wire(b, prev)
                        })
                        .collect();
                    let msg = pb::PullResponse {
                        origin: r.region,
                        batches: wire,
                        caught_up: caught_up && i + 1 == count,
                        head_seqno: head,
                        origin_time_us: now_us(),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return; // the puller went away
                    }
                }
                last_sent = Instant::now();
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn snapshot(&self, req: Request<pb::SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        let req = req.into_inner();
        self.check_peer(req.region)?;
        let r = self.replicator.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            let db = r.db.clone();
            let reader = match r.run(move || db.replication_snapshot().map_err(|e| storage_status(&e))).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            let through = reader.through();
            let part_max = SNAPSHOT_PART_VERSIONS.min(SHIPPED_VERSIONS_MAX);
            let mut reader = reader.peekable();
            loop {
                let read = r
                    .run(move || {
                        let mut part = Vec::with_capacity(part_max);
                        while part.len() < part_max {
                            match reader.next() {
                                Some(Ok(v)) => part.push(pb::SnapshotVersion {
                                    entity: v.entity,
                                    feature: v.feature.0,
                                    event_time_us: v.event_time.0,
                                    system_time_us: v.system_time.0,
                                    cell: v.cell,
                                }),
                                Some(Err(e)) => return Err(storage_status(&e)),
                                None => break,
                            }
                        }
                        let last = reader.peek().is_none();
                        Ok((reader, part, last))
                    })
                    .await;
                let (rest, versions, last) = match read {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                reader = rest;
                let msg =
                    pb::SnapshotPart { origin: r.region, versions, last, through: if last { through } else { 0 } };
                if tx.send(Ok(msg)).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The service with its limits and compression.
pub fn service(
    replicator: Arc<Replicator>,
) -> pb::replication_service_server::ReplicationServiceServer<ReplicationApi> {
    pb::replication_service_server::ReplicationServiceServer::new(ReplicationApi::new(replicator))
        .accept_compressed(CompressionEncoding::Zstd)
        .send_compressed(CompressionEncoding::Zstd)
        .max_decoding_message_size(REPLICATION_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(REPLICATION_MESSAGE_BYTES_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_and_are_checked() {
        let p: Peer = "2=127.0.0.1:5000".parse().expect("peer");
        assert_eq!(p, Peer { region: 2, address: "http://127.0.0.1:5000".into() });
        for bad in ["2", "x=host:1", "2="] {
            assert!(bad.parse::<Peer>().is_err(), "{bad}");
        }
        let ok = |region, peers: Vec<Peer>| ClusterConfig { region, peers }.check();
        assert!(ok(1, vec![p.clone()]).is_ok());
        assert!(ok(2, vec![p.clone()]).is_err(), "own region");
        assert!(ok(1, vec![p.clone(), p.clone()]).is_err(), "twice");
        assert!(ok(REGION_ID_MAX + 1, vec![]).is_err(), "region too large");
    }

    #[test]
    fn messages_are_cut_by_bytes() {
        let op = ShippedOp {
            entity: vec![1; 100],
            feature: FeatureId(1),
            event_time: EventTime(0),
            cell: vec![0; PULL_MESSAGE_BYTES_TARGET / 3],
        };
        let b = |s| ShippedBatch { origin: 1, seqno: s, system_time: SystemTime(s), ops: vec![op.clone()] };
        let m = messages((1..=7).map(b).collect());
        let sizes: Vec<usize> = m.iter().map(Vec::len).collect();
        assert_eq!(sizes, [2, 2, 2, 1]);
        assert_eq!(m.concat().iter().map(|b| b.seqno).collect::<Vec<_>>(), (1..=7).collect::<Vec<_>>());
        assert_eq!(messages(vec![]).len(), 1, "an empty message is still sent (a heartbeat)");
    }
}
