//! Write batches: the unit of atomicity. A batch is applied whole or not at all, after a crash
//! too, and all of its cell versions share one system time.

use crate::cell;
use crate::coding::{put_bytes, put_uvarint, DecodeError, Reader};
use crate::limits::{BATCH_BYTES_MAX, BATCH_OPS_MAX, ENTITY_KEY_BYTES_MAX, VALUE_BYTES_MAX};
use crate::types::{check_entity_key, EventTime, FeatureId, RegionId, SystemTime, Value, VersionVector};
use crate::{Error, Result};

#[derive(Debug, Clone)]
struct Op {
    entity: Vec<u8>,
    feature: FeatureId,
    event_time: EventTime,
    value: Option<Value>,
    vv: Option<VersionVector>,
}

/// An atomic group of cell writes. Within one batch, a later write of the same
/// `(entity, feature, event_time)` replaces an earlier one.
#[derive(Debug, Clone, Default)]
pub struct WriteBatch {
    ops: Vec<Op>,
    bytes: usize,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of writes in the batch.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// True if the batch holds no writes.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Writes `value` to the cell `(entity, feature, event_time)`. Its version vector will be
    /// `{local region: system time}`.
    pub fn put(&mut self, entity: &[u8], feature: FeatureId, event_time: EventTime, value: Value) -> Result<()> {
        self.push(entity, feature, event_time, Some(value), None)
    }

    /// Writes `value` with an explicit version vector (replication, compare-and-swap).
    pub fn put_with_version(
        &mut self,
        entity: &[u8],
        feature: FeatureId,
        event_time: EventTime,
        value: Value,
        vv: VersionVector,
    ) -> Result<()> {
        self.push(entity, feature, event_time, Some(value), Some(vv))
    }

    /// Writes a tombstone: the feature is absent from `event_time` on (until a later event).
    pub fn delete(&mut self, entity: &[u8], feature: FeatureId, event_time: EventTime) -> Result<()> {
        self.push(entity, feature, event_time, None, None)
    }

    fn push(
        &mut self,
        entity: &[u8],
        feature: FeatureId,
        event_time: EventTime,
        value: Option<Value>,
        vv: Option<VersionVector>,
    ) -> Result<()> {
        check_entity_key(entity)?;
        if let Some(v) = &value {
            v.check()?;
        }
        if self.ops.len() >= BATCH_OPS_MAX {
            return Err(Error::InvalidArgument(format!("batch has more than {BATCH_OPS_MAX} writes")));
        }
        let mut probe = Vec::new();
        cell::encode(value.as_ref(), vv.as_ref().unwrap_or(&VersionVector::single(0, 0)), &mut probe);
        if probe.len() > VALUE_BYTES_MAX {
            return Err(Error::InvalidArgument(format!(
                "value is {} bytes encoded, more than the limit of {VALUE_BYTES_MAX}",
                probe.len()
            )));
        }
        let op_bytes = probe.len() + entity.len() + 40;
        if self.bytes + op_bytes > BATCH_BYTES_MAX {
            return Err(Error::InvalidArgument(format!("batch is larger than {BATCH_BYTES_MAX} bytes")));
        }
        self.bytes += op_bytes;
        self.ops.push(Op { entity: entity.to_vec(), feature, event_time, value, vv });
        Ok(())
    }

    /// Encodes the batch as a WAL payload stamped with `seqno` and `system_time`.
    pub(crate) fn encode(&self, seqno: u64, system_time: SystemTime, region: RegionId) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes + 20);
        out.extend_from_slice(&seqno.to_le_bytes());
        out.extend_from_slice(&system_time.0.to_le_bytes());
        out.extend_from_slice(&(self.ops.len() as u32).to_le_bytes());
        let local = VersionVector::single(region, system_time.0);
        let mut cellbuf = Vec::new();
        for op in &self.ops {
            put_bytes(&mut out, &op.entity);
            out.extend_from_slice(&op.feature.0.to_le_bytes());
            out.extend_from_slice(&op.event_time.0.to_le_bytes());
            cellbuf.clear();
            cell::encode(op.value.as_ref(), op.vv.as_ref().unwrap_or(&local), &mut cellbuf);
            put_uvarint(&mut out, cellbuf.len() as u64);
            out.extend_from_slice(&cellbuf);
        }
        out
    }

    /// Approximate encoded size.
    pub(crate) fn approximate_bytes(&self) -> usize {
        self.bytes
    }

    /// The smallest event time in the batch.
    pub(crate) fn event_time_min(&self) -> Option<EventTime> {
        self.ops.iter().map(|o| o.event_time).min()
    }
}

/// One write of a decoded WAL batch.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedOp<'a> {
    /// Entity key.
    pub entity: &'a [u8],
    /// Feature.
    pub feature: FeatureId,
    /// Event time.
    pub event_time: EventTime,
    /// Encoded cell value (see [`crate::cell`]).
    pub cell: &'a [u8],
}

/// A decoded WAL batch.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedBatch<'a> {
    /// The batch's sequence number.
    pub seqno: u64,
    /// The batch's system time.
    pub system_time: SystemTime,
    /// Its writes, in order.
    pub ops: Vec<DecodedOp<'a>>,
}

/// Decodes a WAL payload, checking every field.
pub fn decode(payload: &[u8]) -> Result<DecodedBatch<'_>, DecodeError> {
    decode_inner(payload, true)
}

/// Decodes a payload this process just encoded (cell values are not re-checked).
pub(crate) fn decode_trusted(payload: &[u8]) -> Result<DecodedBatch<'_>, DecodeError> {
    decode_inner(payload, false)
}

fn decode_inner(payload: &[u8], check_cells: bool) -> Result<DecodedBatch<'_>, DecodeError> {
    let mut r = Reader::new(payload);
    let seqno = r.u64_le()?;
    let system_time = SystemTime(r.u64_le()?);
    let count = r.u32_le()? as usize;
    if count > BATCH_OPS_MAX {
        return Err("batch op count over limit");
    }
    let mut ops = Vec::with_capacity(count.min(r.remaining() / 16));
    for _ in 0..count {
        let entity = r.len_bytes(ENTITY_KEY_BYTES_MAX)?;
        if entity.is_empty() {
            return Err("empty entity key");
        }
        let feature = FeatureId(r.u32_le()?);
        let event_time = EventTime(r.u64_le()? as i64);
        let cell_bytes = r.len_bytes(VALUE_BYTES_MAX)?;
        if check_cells {
            cell::decode(cell_bytes)?;
        }
        ops.push(DecodedOp { entity, feature, event_time, cell: cell_bytes });
    }
    if !r.is_empty() {
        return Err("trailing bytes after batch");
    }
    Ok(DecodedBatch { seqno, system_time, ops })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_limits() {
        let mut b = WriteBatch::new();
        b.put(b"e", FeatureId(1), EventTime(-5), Value::Float64(1.0)).expect("put");
        b.delete(b"e", FeatureId(2), EventTime(7)).expect("delete");
        let enc = b.encode(9, SystemTime(100), 3);
        let d = decode(&enc).expect("decodes");
        assert_eq!(d.seqno, 9);
        assert_eq!(d.system_time, SystemTime(100));
        assert_eq!(d.ops.len(), 2);
        assert_eq!(cell::decode(d.ops[0].cell).expect("cell").1, VersionVector::single(3, 100));
        assert!(cell::is_tombstone(d.ops[1].cell));
        for cut in 0..enc.len() {
            assert!(decode(&enc[..cut]).is_err());
        }
        assert!(b.put(b"", FeatureId(1), EventTime(0), Value::Bool(true)).is_err());
        assert!(b.put(&[1u8; ENTITY_KEY_BYTES_MAX + 1], FeatureId(1), EventTime(0), Value::Bool(true)).is_err());
        assert!(b.put(b"e", FeatureId(1), EventTime(0), Value::Bytes(vec![0; VALUE_BYTES_MAX])).is_err());
        assert_eq!(b.len(), 2, "rejected writes leave the batch unchanged");
    }
}
