//! Write batches: the unit of atomicity. A batch is applied whole or not at all, after a crash
//! too, and all of its cell versions share one system time, except in a replicated batch
//! (`REPLICATION.md`), whose versions keep the stamps their origin gave them.
//!
//! ```text
//! payload    = seqno u64 | system time u64 | count u32 | [origin u32 | origin seqno u64] | op*
//!              (the origin fields iff bit 31 of count is set: a replicated batch)
//! op         = entity (uvarint len + bytes) | feature u32 | event time i64
//!              | [system time u64 (replicated batches only)] | cell (uvarint len + bytes)
//! ```

use crate::cell;
use crate::coding::{put_bytes, put_uvarint, DecodeError, Reader};
use crate::limits::{BATCH_BYTES_MAX, BATCH_OPS_MAX, ENTITY_KEY_BYTES_MAX, VALUE_BYTES_MAX, VERSION_VECTOR_BYTES_MAX};
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

    /// The batch's size as counted against [`BATCH_BYTES_MAX`].
    pub fn size_bytes(&self) -> usize {
        self.bytes
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
        if probe.len() + VERSION_VECTOR_BYTES_MAX > VALUE_BYTES_MAX {
            return Err(Error::InvalidArgument(format!(
                "value is {} bytes encoded; with room for its version vector ({VERSION_VECTOR_BYTES_MAX} bytes) \
                 it must stay within {VALUE_BYTES_MAX}",
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

    /// Encodes the batch as a WAL payload stamped with `seqno` and `system_time`; writes
    /// without an explicit vector get `local`.
    pub(crate) fn encode(&self, seqno: u64, system_time: SystemTime, local: &VersionVector) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes + 20);
        out.extend_from_slice(&seqno.to_le_bytes());
        out.extend_from_slice(&system_time.0.to_le_bytes());
        out.extend_from_slice(&(self.ops.len() as u32).to_le_bytes());
        let mut cellbuf = Vec::new();
        for op in &self.ops {
            put_bytes(&mut out, &op.entity);
            out.extend_from_slice(&op.feature.0.to_le_bytes());
            out.extend_from_slice(&op.event_time.0.to_le_bytes());
            cellbuf.clear();
            cell::encode(op.value.as_ref(), op.vv.as_ref().unwrap_or(local), &mut cellbuf);
            put_uvarint(&mut out, cellbuf.len() as u64);
            out.extend_from_slice(&cellbuf);
        }
        out
    }

    /// Approximate encoded size.
    pub(crate) fn approximate_bytes(&self) -> usize {
        self.bytes
    }

    /// The smallest event time below the event horizon `horizon` among the batch's cells
    /// ([`crate::reserved::below_horizon`]), if any.
    pub(crate) fn below_horizon(&self, horizon: i64) -> Option<EventTime> {
        self.ops
            .iter()
            .filter(|o| crate::reserved::below_horizon(&o.entity, o.event_time, horizon))
            .map(|o| o.event_time)
            .min()
    }

    /// The cell versions the batch stores: its distinct cells (a later write of a cell in the
    /// batch replaces an earlier one).
    pub fn distinct_cells(&self) -> usize {
        let mut seen = std::collections::HashSet::with_capacity(self.ops.len());
        self.ops.iter().filter(|o| seen.insert((o.entity.as_slice(), o.feature, o.event_time))).count()
    }

    /// Each write's cell, its value (`None`: a tombstone) and its explicit vector (`None`: it
    /// gets the batch's local vector), in batch order.
    pub(crate) fn cells(&self) -> impl Iterator<Item = (CellRef<'_>, Option<&Value>, Option<&VersionVector>)> {
        self.ops.iter().map(|o| ((o.entity.as_slice(), o.feature, o.event_time), o.value.as_ref(), o.vv.as_ref()))
    }
}

/// A cell named by reference: `(entity, feature, event time)`.
pub(crate) type CellRef<'a> = (&'a [u8], FeatureId, EventTime);

/// Bit of the op count that marks a replicated batch.
const REPLICATED_FLAG: u32 = 1 << 31;

/// One write of a decoded WAL batch.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedOp<'a> {
    /// Entity key.
    pub entity: &'a [u8],
    /// Feature.
    pub feature: FeatureId,
    /// Event time.
    pub event_time: EventTime,
    /// System time: the batch's, or for a replicated batch the version's own.
    pub system_time: SystemTime,
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
    /// For a replicated batch: the region it came from and its sequence number there.
    pub origin: Option<(RegionId, u64)>,
    /// Its writes, in order.
    pub ops: Vec<DecodedOp<'a>>,
}

/// One version of a replicated batch, resolved (`REPLICATION.md` §3) and ready to log.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ResolvedOp {
    pub entity: Vec<u8>,
    pub feature: FeatureId,
    pub event_time: EventTime,
    pub system_time: SystemTime,
    pub cell: Vec<u8>,
}

/// Encodes a replicated batch as a WAL payload.
pub(crate) fn encode_replicated(
    seqno: u64,
    system_time: SystemTime,
    origin: (RegionId, u64),
    ops: &[ResolvedOp],
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&seqno.to_le_bytes());
    out.extend_from_slice(&system_time.0.to_le_bytes());
    out.extend_from_slice(&(ops.len() as u32 | REPLICATED_FLAG).to_le_bytes());
    out.extend_from_slice(&origin.0.to_le_bytes());
    out.extend_from_slice(&origin.1.to_le_bytes());
    for op in ops {
        put_bytes(&mut out, &op.entity);
        out.extend_from_slice(&op.feature.0.to_le_bytes());
        out.extend_from_slice(&op.event_time.0.to_le_bytes());
        out.extend_from_slice(&op.system_time.0.to_le_bytes());
        put_uvarint(&mut out, op.cell.len() as u64);
        out.extend_from_slice(&op.cell);
    }
    out
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
    let raw_count = r.u32_le()?;
    let replicated = raw_count & REPLICATED_FLAG != 0;
    let count = (raw_count & !REPLICATED_FLAG) as usize;
    if count > BATCH_OPS_MAX {
        return Err("batch op count over limit");
    }
    let origin = if replicated { Some((r.u32_le()?, r.u64_le()?)) } else { None };
    let mut ops = Vec::with_capacity(count.min(r.remaining() / 16));
    for _ in 0..count {
        let entity = r.len_bytes(ENTITY_KEY_BYTES_MAX)?;
        if entity.is_empty() {
            return Err("empty entity key");
        }
        let feature = FeatureId(r.u32_le()?);
        let event_time = EventTime(r.u64_le()? as i64);
        let op_time = if replicated { SystemTime(r.u64_le()?) } else { system_time };
        if op_time > system_time {
            return Err("replicated version newer than its batch");
        }
        let cell_bytes = r.len_bytes(VALUE_BYTES_MAX)?;
        if check_cells {
            cell::decode(cell_bytes)?;
        }
        ops.push(DecodedOp { entity, feature, event_time, system_time: op_time, cell: cell_bytes });
    }
    if !r.is_empty() {
        return Err("trailing bytes after batch");
    }
    Ok(DecodedBatch { seqno, system_time, origin, ops })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_cells_count_a_rewritten_cell_once() {
        let mut b = WriteBatch::new();
        b.put(b"e", FeatureId(1), EventTime(0), Value::Int64(1)).expect("put");
        b.put(b"e", FeatureId(1), EventTime(0), Value::Int64(2)).expect("put");
        b.delete(b"e", FeatureId(1), EventTime(0)).expect("delete");
        b.put(b"e", FeatureId(1), EventTime(1), Value::Int64(3)).expect("put");
        b.put(b"f", FeatureId(1), EventTime(0), Value::Int64(4)).expect("put");
        assert_eq!((b.len(), b.distinct_cells()), (5, 3));
    }

    #[test]
    fn round_trip_and_limits() {
        let mut b = WriteBatch::new();
        b.put(b"e", FeatureId(1), EventTime(-5), Value::Float64(1.0)).expect("put");
        b.delete(b"e", FeatureId(2), EventTime(7)).expect("delete");
        let enc = b.encode(9, SystemTime(100), &VersionVector::single(3, 100));
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

    #[test]
    fn replicated_batches_round_trip_with_their_own_stamps() {
        let mut cellbuf = Vec::new();
        cell::encode(Some(&Value::Int64(7)), &VersionVector::single(2, 90), &mut cellbuf);
        let op = |entity: &[u8], event: i64, stamp: u64| ResolvedOp {
            entity: entity.to_vec(),
            feature: FeatureId(1),
            event_time: EventTime(event),
            system_time: SystemTime(stamp),
            cell: cellbuf.clone(),
        };
        let ops = vec![op(b"e", 3, 90), op(b"f", -4, 120)];
        let enc = encode_replicated(11, SystemTime(120), (2, 40), &ops);
        let d = decode(&enc).expect("decodes");
        assert_eq!((d.seqno, d.system_time, d.origin), (11, SystemTime(120), Some((2, 40))));
        assert_eq!(d.ops.iter().map(|o| o.system_time).collect::<Vec<_>>(), [SystemTime(90), SystemTime(120)]);
        assert_eq!(d.ops[1].event_time, EventTime(-4));
        for cut in 0..enc.len() {
            assert!(decode(&enc[..cut]).is_err(), "cut {cut}");
        }
        // A version newer than its batch is refused.
        assert!(decode(&encode_replicated(11, SystemTime(100), (2, 40), &ops)).is_err());
        // Local batches decode with no origin and the batch's stamp on every op.
        let mut b = WriteBatch::new();
        b.put(b"e", FeatureId(1), EventTime(0), Value::Bool(true)).expect("put");
        let enc = b.encode(1, SystemTime(5), &VersionVector::single(0, 5));
        let d = decode(&enc).expect("decodes");
        assert_eq!((d.origin, d.ops[0].system_time), (None, SystemTime(5)));
    }
}
