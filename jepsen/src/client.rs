//! The workload's gRPC operations against one region's node.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use quiver_proto::v1 as pb;
use quiver_testkit::{micros_to_timestamp as ts, timestamp_to_micros, value_at, Version};
use tonic::transport::Channel;

use crate::history::{Cell, Seen, Vector};

/// The group and feature every operation uses.
pub const GROUP: &str = "jepsen";
/// `GROUP:FEATURE`.
pub const FEATURE_REF: &str = "jepsen:v";
/// Event time of slot 0, µs; slot `s` is `s` ms earlier (backfill corrections).
pub const SLOT0_US: i64 = 1_700_000_000_000_000;
/// Per-operation deadline: past it the operation is indeterminate.
pub const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline of one `MoveSlots` call (a move of the workload's few cells takes well under a
/// second when nothing is wrong).
pub const MOVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The registry of the workload, applied in one region and replicated to the others.
pub fn registry() -> pb::ApplyRegistryRequest {
    pb::ApplyRegistryRequest {
        entity_types: vec![pb::EntityType {
            name: "item".into(),
            join_keys: vec![pb::JoinKey { name: "id".into(), r#type: pb::JoinKeyType::Int64 as i32 }],
            description: "jepsen cells".into(),
        }],
        feature_groups: vec![pb::FeatureGroup {
            name: GROUP.into(),
            entity_type: "item".into(),
            owner: "jepsen".into(),
            features: vec![pb::FeatureDef {
                name: "v".into(),
                r#type: pb::ValueType::Int64 as i32,
                default_value: None,
                description: String::new(),
                ..Default::default()
            }],
            ..Default::default()
        }],
        dry_run: false,
        promote: false,
    }
}

/// The workload's group version 2: a description change, so it shares version 1's data and the
/// workload reads the same cells whichever version serves.
pub fn registry_v2() -> pb::ApplyRegistryRequest {
    let mut r = registry();
    r.feature_groups[0].description = "jepsen v2 (shares v1's data)".into();
    r
}

fn key(entity: u32) -> pb::EntityKey {
    pb::EntityKey { parts: vec![pb::KeyPart { kind: Some(pb::key_part::Kind::Int64Value(i64::from(entity))) }] }
}

/// Microseconds of a timestamp the server returned (0 when missing or out of range).
/// A time the server must have sent; a missing or out-of-range one fails the operation
/// rather than reading as 0 (which the checker could mistake for a real stamp).
fn us(t: &Option<prost_types::Timestamp>, what: &str) -> Result<i64, tonic::Status> {
    t.as_ref()
        .and_then(timestamp_to_micros)
        .ok_or_else(|| tonic::Status::internal(format!("the server answered without a valid {what}")))
}

fn slot_time(slot: u32) -> i64 {
    SLOT0_US - i64::from(slot) * 1000
}

/// A vector from the API.
pub fn vector(v: &Option<pb::VersionVector>) -> Vector {
    let mut out: Vector = v.iter().flat_map(|v| v.entries.iter().map(|e| (e.region, e.counter))).collect();
    out.sort_unstable();
    out
}

fn to_api(v: &Vector) -> pb::VersionVector {
    pb::VersionVector {
        entries: v.iter().map(|&(region, counter)| pb::version_vector::Entry { region, counter }).collect(),
    }
}

/// How a failed call ended: `Err(true)` certainly not applied, `Err(false)` unknown.
pub fn classify(s: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(s.code(), Code::InvalidArgument | Code::Aborted | Code::FailedPrecondition | Code::NotFound)
}

/// What an acknowledged write returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The system time stamped on it.
    pub stamp: u64,
    /// The version vector its cell versions carry (`WriteFeaturesResponse.version`); `None`
    /// from a server that does not return it.
    pub vector: Option<Vector>,
}

/// Adds the clients' bearer token to every call.
#[derive(Debug, Clone)]
pub struct Bearer(tonic::metadata::AsciiMetadataValue);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Authed = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

/// Clients of one node.
#[derive(Debug, Clone)]
pub struct Node {
    features: pb::feature_service_client::FeatureServiceClient<Authed>,
    registry: pb::registry_service_client::RegistryServiceClient<Authed>,
    admin: pb::admin_service_client::AdminServiceClient<Authed>,
    cluster: pb::cluster_service_client::ClusterServiceClient<Authed>,
}

impl Node {
    /// Clients over a lazily connected TLS channel trusting `ca_pem` (it reconnects after a
    /// restart), sending `token`.
    pub fn connect(addr: SocketAddr, ca_pem: &str, token: &str) -> Result<Node, String> {
        let tls =
            tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca_pem));
        let ch = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| e.to_string())?
            .tls_config(tls)
            .map_err(|e| format!("TLS: {e}"))?
            .connect_timeout(Duration::from_millis(500))
            .timeout(OP_TIMEOUT)
            .connect_lazy();
        let bearer = Bearer(format!("Bearer {token}").parse().map_err(|_| "a token is ASCII".to_string())?);
        let authed = |ch: Channel| tonic::service::interceptor::InterceptedService::new(ch, bearer.clone());
        Ok(Node {
            features: pb::feature_service_client::FeatureServiceClient::new(authed(ch.clone())),
            registry: pb::registry_service_client::RegistryServiceClient::new(authed(ch.clone())),
            admin: pb::admin_service_client::AdminServiceClient::new(authed(ch.clone())),
            cluster: pb::cluster_service_client::ClusterServiceClient::new(authed(ch)),
        })
    }

    /// Applies the workload's registry.
    pub async fn apply_registry(&mut self) -> Result<(), tonic::Status> {
        self.registry.apply_registry(registry()).await.map(|_| ())
    }

    /// Stages the group's version 2.
    pub async fn stage_v2(&mut self) -> Result<(), tonic::Status> {
        self.registry.apply_registry(registry_v2()).await.map(|_| ())
    }

    /// Makes `version` serve (forced: the workload measures the switch, not the gate).
    pub async fn promote(&mut self, version: u32) -> Result<(), tonic::Status> {
        let req = pb::PromoteGroupRequest {
            group: GROUP.into(),
            version,
            force: true,
            reason: "jepsen".into(),
            dry_run: false,
        };
        self.registry.promote_group(req).await.map(|_| ())
    }

    /// Rolls the group back.
    pub async fn rollback(&mut self) -> Result<(), tonic::Status> {
        let req = pb::RollbackGroupRequest { group: GROUP.into(), reason: "jepsen".into() };
        self.registry.rollback_group(req).await.map(|_| ())
    }

    /// The group's serving version, how many versions the node knows, and the length of its
    /// serving history.
    pub async fn serving(&mut self) -> Result<(u32, usize, usize), tonic::Status> {
        let r = self.registry.list_group_versions(pb::ListGroupVersionsRequest { group: GROUP.into() }).await?;
        let r = r.into_inner();
        Ok((r.serving_version, r.versions.len(), r.promotions.len()))
    }

    /// Whether the node knows the workload's group yet.
    pub async fn has_registry(&mut self) -> bool {
        self.registry.get_feature_group(pb::GetFeatureGroupRequest { name: GROUP.into(), version: 0 }).await.is_ok()
    }

    /// Writes `value` to `cell` (with `expected` for a CAS), synced; returns its stamp and
    /// vector.
    pub async fn write(&mut self, cell: Cell, value: i64, expected: Option<&Vector>) -> Result<Written, tonic::Status> {
        let mut values = std::collections::HashMap::new();
        values.insert("v".to_string(), pb::Value { kind: Some(pb::value::Kind::Int64Value(value)) });
        let mut expected_versions = std::collections::HashMap::new();
        if let Some(e) = expected {
            expected_versions.insert("v".to_string(), to_api(e));
        }
        let req = pb::WriteFeaturesRequest {
            rows: vec![pb::WriteRow {
                entity: Some(key(cell.entity)),
                group: GROUP.into(),
                event_time: Some(ts(slot_time(cell.slot))),
                values,
                deletes: vec![],
                expected_versions,
            }],
            durability: pb::Durability::Sync as i32,
            idempotency_key: String::new(),
        };
        let r = self.features.write_features(req).await?.into_inner();
        let stamp = us(&r.system_time, "system_time")? as u64;
        let vector = Some(vector(&r.version)).filter(|v| !v.is_empty());
        Ok(Written { stamp, vector })
    }

    /// Writes many cells in one batch (bulk traffic for the lagging-peer fault).
    pub async fn write_bulk(&mut self, entities: std::ops::Range<u32>, value: i64) -> Result<(), tonic::Status> {
        let rows = entities
            .map(|e| {
                let mut values = std::collections::HashMap::new();
                values.insert("v".to_string(), pb::Value { kind: Some(pb::value::Kind::Int64Value(value)) });
                pb::WriteRow {
                    entity: Some(key(e)),
                    group: GROUP.into(),
                    event_time: Some(ts(slot_time(0))),
                    values,
                    ..Default::default()
                }
            })
            .collect();
        let req =
            pb::WriteFeaturesRequest { rows, durability: pb::Durability::Sync as i32, idempotency_key: String::new() };
        self.features.write_features(req).await.map(|_| ())
    }

    /// Every version of `entity`, by slot, newest system time first.
    pub async fn history(&mut self, entity: u32) -> Result<BTreeMap<u32, Vec<Seen>>, tonic::Status> {
        let req = pb::ScanHistoryRequest {
            entity_type: "item".into(),
            entity: Some(key(entity)),
            features: vec![FEATURE_REF.into()],
            group: GROUP.into(),
            ..Default::default()
        };
        let mut stream = self.features.scan_history(req).await?.into_inner();
        let mut out: BTreeMap<u32, Vec<Seen>> = BTreeMap::new();
        while let Some(chunk) = stream.message().await? {
            for v in chunk.versions {
                let t = us(&v.event_time, "event_time")?;
                let slot = ((SLOT0_US - t) / 1000) as u32;
                let value = v.value.as_ref().and_then(|x| match x.kind {
                    Some(pb::value::Kind::Int64Value(i)) => Some(i),
                    _ => None,
                });
                let stamp = us(&v.system_time, "system_time")? as u64;
                out.entry(slot).or_default().push(Seen { value, stamp, vector: vector(&v.version) });
            }
        }
        for versions in out.values_mut() {
            versions.sort_by_key(|v| std::cmp::Reverse(v.stamp));
        }
        Ok(out)
    }

    /// The winner of one cell (`value_at` at the cell's event time with no lookback: its
    /// newest version), if any.
    pub async fn read(&mut self, cell: Cell) -> Result<Option<Seen>, tonic::Status> {
        let req = pb::ScanHistoryRequest {
            entity_type: "item".into(),
            entity: Some(key(cell.entity)),
            features: vec![FEATURE_REF.into()],
            group: GROUP.into(),
            event_time_from: Some(ts(slot_time(cell.slot))),
            event_time_to: Some(ts(slot_time(cell.slot))),
            ..Default::default()
        };
        let mut stream = self.features.scan_history(req).await?.into_inner();
        // Every version as the model holds it; a tombstone is a `Seen` without a value.
        let mut versions: Vec<Version<Seen>> = Vec::new();
        while let Some(chunk) = stream.message().await? {
            for v in chunk.versions {
                let value = v.value.as_ref().and_then(|x| match x.kind {
                    Some(pb::value::Kind::Int64Value(i)) => Some(i),
                    _ => None,
                });
                let stamp = us(&v.system_time, "system_time")? as u64;
                let seen = Seen { value, stamp, vector: vector(&v.version) };
                versions.push(Version {
                    event_time: us(&v.event_time, "event_time")?,
                    system_time: stamp,
                    value: Some(seen),
                });
            }
        }
        let t = slot_time(cell.slot);
        Ok(value_at(&versions, t, u64::MAX, Some(0)).and_then(|w| w.value.clone()))
    }

    /// The node's replication status.
    pub async fn replication(&mut self) -> Result<pb::GetReplicationStatusResponse, tonic::Status> {
        self.admin.get_replication_status(pb::GetReplicationStatusRequest {}).await.map(|r| r.into_inner())
    }

    /// Flushes the node's memtable (so its WAL segments become prunable).
    pub async fn flush(&mut self) -> Result<(), tonic::Status> {
        self.admin.flush(pb::FlushRequest {}).await.map(|_| ())
    }

    /// The node's view of its sharded region: the map and the nodes.
    pub async fn cluster_status(&mut self) -> Result<pb::GetClusterStatusResponse, tonic::Status> {
        self.cluster.get_cluster_status(pb::GetClusterStatusRequest {}).await.map(|r| r.into_inner())
    }

    /// Spreads the slots over the region's registered nodes.
    pub async fn init_slots(&mut self) -> Result<(), tonic::Status> {
        self.cluster.init_slots(pb::InitSlotsRequest {}).await.map(|_| ())
    }

    /// Moves slots `first..=last` to this node (or resumes that move): its progress stream,
    /// ending by `deadline` at the latest ([`MOVE_TIMEOUT`] from now at most).
    pub async fn move_slots(
        &mut self,
        first: u32,
        last: u32,
        to: &str,
        deadline: std::time::Instant,
    ) -> Result<tonic::Streaming<pb::MoveProgress>, tonic::Status> {
        let mut req = tonic::Request::new(pb::MoveSlotsRequest { first, last, to: to.into() });
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        req.set_timeout(left.clamp(Duration::from_millis(100), MOVE_TIMEOUT));
        self.cluster.move_slots(req).await.map(|r| r.into_inner())
    }

    /// Aborts the move of slots `first..=last`.
    pub async fn abort_move(&mut self, first: u32, last: u32) -> Result<(), tonic::Status> {
        self.cluster.abort_move(pb::AbortMoveRequest { first, last }).await.map(|_| ())
    }
}
