//! Shipped batches to and from their protobuf form.

use quiver_proto::v1 as pb;
use quiver_storage::{EventTime, FeatureId, ShippedBatch, ShippedOp, SnapshotVersion, SystemTime};

use crate::registry::PREFIX as REGISTRY_PREFIX;

pub(super) use crate::service::now_us;

pub(super) fn to_wire(b: ShippedBatch, prev_seqno: u64) -> pb::ShippedBatch {
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

pub(super) fn from_wire(origin: u32, b: pb::ShippedBatch) -> (u64, ShippedBatch) {
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

/// A snapshot (or moved) version in its protobuf form.
pub(crate) fn version_to_wire(v: SnapshotVersion) -> pb::SnapshotVersion {
    pb::SnapshotVersion {
        entity: v.entity,
        feature: v.feature.0,
        event_time_us: v.event_time.0,
        system_time_us: v.system_time.0,
        cell: v.cell,
    }
}

/// A snapshot (or moved) version from its protobuf form.
pub(crate) fn version_from_wire(v: pb::SnapshotVersion) -> SnapshotVersion {
    SnapshotVersion {
        entity: v.entity,
        feature: FeatureId(v.feature),
        event_time: EventTime(v.event_time_us),
        system_time: SystemTime(v.system_time_us),
        cell: v.cell,
    }
}

pub(super) fn touches_registry<'a>(mut entities: impl Iterator<Item = &'a [u8]>) -> bool {
    entities.any(|e| e.starts_with(REGISTRY_PREFIX))
}
