//! Shipped batches to and from their protobuf form.

use quiver_proto::v1 as pb;
use quiver_storage::{EventTime, FeatureId, ShippedBatch, ShippedOp, SystemTime};

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

pub(super) fn touches_registry<'a>(mut entities: impl Iterator<Item = &'a [u8]>) -> bool {
    entities.any(|e| e.starts_with(REGISTRY_PREFIX))
}
