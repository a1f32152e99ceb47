//! The [`Replicator`]: one puller task per peer, which pulls the batches that originated
//! there and applies them in chain order, bootstraps from a snapshot when the peer's log no
//! longer reaches back far enough, and reports and takes operator commands.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use quiver_proto::v1 as pb;
use quiver_storage::{Db, Durability, ShippedBatch, SnapshotVersion};
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
    /// The peer's last Pull `after` on this node (its acknowledgement of this node's log).
    pub(super) acknowledged: Option<u64>,
}

/// One peer's puller state, shared with the admin API.
#[derive(Debug)]
pub(super) struct PeerSlot {
    pub(super) peer: Peer,
    pub(super) info: Mutex<PeerInfo>,
    pub(super) paused: AtomicBool,
    pub(super) rebootstrap: AtomicBool,
    pub(super) wake: Notify,
}

/// Replication of one node: its pullers and its `ReplicationService`.
#[derive(Debug)]
pub struct Replicator {
    pub(super) db: Arc<Db>,
    pub(super) registry: Arc<Registry>,
    pub(super) region: u32,
    pub(super) peers: Vec<Arc<PeerSlot>>,
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
            chaos: transport.chaos_seed.and_then(Chaos::from_seed).map(Mutex::new),
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
        let mut chain = Chain::new(after, cursor);
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
            let versions: Vec<SnapshotVersion> =
                part.versions.into_iter().map(super::wire::version_from_wire).collect();
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
    pub(super) fn acknowledge(&self, region: u32, after: u64) {
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
