//! The `ReplicationService` a node serves to its peers: `Pull` (this region's batches after
//! the peer's cursor, streamed) and `Snapshot` (every replicated cell).

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quiver_proto::v1 as pb;
use quiver_storage::slot::{SlotSet, SLOT_SET_BYTES};
use quiver_storage::{ShippedBatch, SHIPPED_VERSIONS_MAX};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::codec::CompressionEncoding;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use super::puller::{wanted, Replicator};
use super::wire::{now_us, to_wire};
use super::*;
use crate::auth::AuthInterceptor;
use crate::service::storage_status;

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
        if self.replicator.configured.iter().any(|p| p.region == region) {
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

/// The slots a request asks for: `None` (every slot) when empty, else its bitmap.
fn slots_of(bytes: &[u8]) -> Result<Option<SlotSet>, Status> {
    if bytes.is_empty() {
        return Ok(None);
    }
    SlotSet::from_bytes(bytes).map(Some).ok_or_else(|| {
        Status::invalid_argument(format!(
            "slots is {} bytes: it is empty (every slot) or a bitmap of {SLOT_SET_BYTES} bytes",
            bytes.len()
        ))
    })
}

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

    async fn members(&self, req: Request<pb::MembersRequest>) -> Result<Response<pb::MembersResponse>, Status> {
        crate::auth::principal(&req)?.require_region(req.get_ref().region)?;
        self.check_peer(req.get_ref().region)?;
        let r = &self.replicator;
        let (members, removed) = match r.shard.get() {
            None => (vec![pb::Member::default()], Vec::new()),
            Some(cluster) => {
                let me = cluster.config();
                let removed: Vec<pb::Member> = cluster
                    .removed_heads()
                    .into_iter()
                    .map(|(node, head)| pb::Member {
                        stream: super::stream_of(&node),
                        node,
                        address: String::new(),
                        head,
                    })
                    .collect();
                let mut members: Vec<pb::Member> = cluster
                    .status()
                    .nodes
                    .into_iter()
                    .filter(|n| !n.addr.is_empty() && n.node != me.node && n.region == r.region)
                    .filter(|n| !removed.iter().any(|g| g.node == n.node))
                    .map(|n| pb::Member { stream: super::stream_of(&n.node), node: n.node, address: n.addr, head: 0 })
                    .collect();
                // Itself, registered in etcd yet or not (unless removed: it answers until it
                // is stopped).
                if !cluster.is_removed(&me.node) {
                    members.push(pb::Member {
                        node: me.node.clone(),
                        address: me.advertise.clone(),
                        stream: super::stream_of(&me.node),
                        head: 0,
                    });
                }
                (members, removed)
            }
        };
        Ok(Response::new(pb::MembersResponse { region: r.region, members, removed }))
    }

    async fn pull(&self, req: Request<pb::PullRequest>) -> Result<Response<Self::PullStream>, Status> {
        crate::auth::principal(&req)?.require_region(req.get_ref().region)?;
        let req = req.into_inner();
        self.check_peer(req.region)?;
        let slots = slots_of(&req.slots)?;
        let r = self.replicator.clone();
        // A cursor past this node's log is not this log's (the node was restored from an
        // older copy, or the peer is confused): refused, and never taken as an acknowledgement,
        // which would let the log be pruned of batches the peer never had.
        let last = r.db.last_seqno();
        if req.after > last {
            return Err(Status::failed_precondition(format!(
                "cursor {} is past this node's last sequence number {last}: the puller followed another log \
                 (was this node restored from an older copy?); re-bootstrap it from a snapshot",
                req.after
            )));
        }
        if !req.backfill {
            r.acknowledge(req.region, &req.node, req.after);
        }
        let stream = r.own_stream();
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
                    // Every batch ships (the chain stays gapless), with the puller's slots only.
                    Ok(mut b) => {
                        if slots.is_some() {
                            for batch in &mut b {
                                batch.ops.retain(|o| wanted(slots.as_ref(), &o.entity));
                            }
                        }
                        b
                    }
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
                        stream,
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
        crate::auth::principal(&req)?.require_region(req.get_ref().region)?;
        let req = req.into_inner();
        self.check_peer(req.region)?;
        let slots = slots_of(&req.slots)?;
        let r = self.replicator.clone();
        let stream = r.own_stream();
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
            let slots = Arc::new(slots);
            loop {
                let slots = slots.clone();
                let read = r
                    .run(move || {
                        let mut part = Vec::with_capacity(part_max);
                        // A part goes out at least every SNAPSHOT_SCAN_MAX versions read, empty
                        // or not, so a small slot set of a large store never goes silent.
                        let mut scanned = 0;
                        while part.len() < part_max && scanned < SNAPSHOT_SCAN_MAX {
                            scanned += 1;
                            match reader.next() {
                                Some(Ok(v)) if wanted(slots.as_ref().as_ref(), &v.entity) => {
                                    part.push(super::wire::version_to_wire(v))
                                }
                                Some(Ok(_)) => {}
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
                let msg = pb::SnapshotPart {
                    origin: r.region,
                    stream,
                    versions,
                    last,
                    through: if last { through } else { 0 },
                };
                if tx.send(Ok(msg)).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The service with its limits and compression; `auth` decides who may pull (a peer region,
/// for its own stream only).
pub fn service(
    replicator: Arc<Replicator>,
    auth: &Arc<crate::auth::Authenticator>,
) -> InterceptedService<pb::replication_service_server::ReplicationServiceServer<ReplicationApi>, AuthInterceptor> {
    let svc = pb::replication_service_server::ReplicationServiceServer::new(ReplicationApi::new(replicator))
        .accept_compressed(CompressionEncoding::Zstd)
        .send_compressed(CompressionEncoding::Zstd)
        .max_decoding_message_size(REPLICATION_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(REPLICATION_MESSAGE_BYTES_MAX);
    InterceptedService::new(svc, auth.interceptor(Some(crate::auth::Scope::Replication)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_storage::{EventTime, FeatureId, ShippedOp, SystemTime};

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
