//! The data model (README, "Read semantics"; `storage/READS.md`): cells `(entity, feature, event_time)` and their versions.

use crate::limits::{ENTITY_KEY_BYTES_MAX, LIST_ELEMENTS_MAX, VERSION_VECTOR_ENTRIES_MAX};
use crate::{Error, Result};

/// When a fact became true in the world: microseconds since the Unix epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventTime(pub i64);

/// When this store accepted a write: a hybrid-logical-clock stamp in microseconds since the Unix
/// epoch, strictly increasing per node across restarts (see [`crate::hlc`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SystemTime(pub u64);

impl SystemTime {
    /// The greatest stamp: "no limit" as a `known_at`.
    pub const MAX: SystemTime = SystemTime(u64::MAX);
}

/// A feature's numeric id, assigned by the registry. Features of one entity are stored adjacent,
/// ordered by this id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FeatureId(pub u32);

/// An entity key: the engine treats it as opaque bytes (see [`encode_entity_key`]).
pub type EntityKey = Vec<u8>;

/// The id of a region (replication origin).
pub type RegionId = u32;

/// Checks an entity key against the engine's limits.
pub fn check_entity_key(entity: &[u8]) -> Result<()> {
    if entity.is_empty() {
        return Err(Error::InvalidArgument("entity key is empty".into()));
    }
    if entity.len() > ENTITY_KEY_BYTES_MAX {
        return Err(Error::InvalidArgument(format!(
            "entity key is {} bytes, more than the limit of {ENTITY_KEY_BYTES_MAX}",
            entity.len()
        )));
    }
    Ok(())
}

/// One part of a composite entity key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeyPart<'a> {
    /// A string join-key column.
    Str(&'a str),
    /// An int64 join-key column.
    Int(i64),
}

/// Encodes typed join-key values into entity-key bytes, order-preserving per part and free of
/// collisions: every part carries a type tag; strings escape `0x00` as `0x00 0xff` and end with
/// `0x00 0x01`; integers are 8 big-endian bytes with the sign bit flipped.
pub fn encode_entity_key(parts: &[KeyPart<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        match p {
            KeyPart::Str(s) => {
                out.push(0x01);
                for &b in s.as_bytes() {
                    out.push(b);
                    if b == 0 {
                        out.push(0xff);
                    }
                }
                out.extend_from_slice(&[0x00, 0x01]);
            }
            KeyPart::Int(i) => {
                out.push(0x02);
                out.extend_from_slice(&((*i as u64) ^ (1 << 63)).to_be_bytes());
            }
        }
    }
    out
}

/// The type of a feature value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ValueType {
    /// `bool`
    Bool = 0,
    /// `int64`
    Int64 = 1,
    /// `float32`
    Float32 = 2,
    /// `float64`
    Float64 = 3,
    /// UTF-8 `string`
    String = 4,
    /// opaque `bytes`
    Bytes = 5,
    /// `float32` vector (embedding)
    Float32Vector = 6,
    /// list of `int64`
    Int64List = 7,
    /// list of `string`
    StringList = 8,
}

impl ValueType {
    /// The type with the given on-disk tag.
    pub fn from_tag(tag: u8) -> Option<ValueType> {
        Some(match tag {
            0 => ValueType::Bool,
            1 => ValueType::Int64,
            2 => ValueType::Float32,
            3 => ValueType::Float64,
            4 => ValueType::String,
            5 => ValueType::Bytes,
            6 => ValueType::Float32Vector,
            7 => ValueType::Int64List,
            8 => ValueType::StringList,
            _ => return None,
        })
    }
}

/// A typed feature value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `bool`
    Bool(bool),
    /// `int64`
    Int64(i64),
    /// `float32`
    Float32(f32),
    /// `float64`
    Float64(f64),
    /// UTF-8 string
    String(String),
    /// Opaque bytes
    Bytes(Vec<u8>),
    /// Embedding
    Float32Vector(Vec<f32>),
    /// List of int64
    Int64List(Vec<i64>),
    /// List of strings
    StringList(Vec<String>),
}

impl Value {
    /// The value's type.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::Bool(_) => ValueType::Bool,
            Value::Int64(_) => ValueType::Int64,
            Value::Float32(_) => ValueType::Float32,
            Value::Float64(_) => ValueType::Float64,
            Value::String(_) => ValueType::String,
            Value::Bytes(_) => ValueType::Bytes,
            Value::Float32Vector(_) => ValueType::Float32Vector,
            Value::Int64List(_) => ValueType::Int64List,
            Value::StringList(_) => ValueType::StringList,
        }
    }

    /// Bytes the value holds on the heap (what a read that returns it allocates, about).
    pub fn heap_bytes(&self) -> usize {
        match self {
            Value::Bool(_) | Value::Int64(_) | Value::Float32(_) | Value::Float64(_) => 0,
            Value::String(s) => s.len(),
            Value::Bytes(b) => b.len(),
            Value::Float32Vector(v) => v.len() * 4,
            Value::Int64List(v) => v.len() * 8,
            Value::StringList(v) => v.iter().map(|s| s.len() + std::mem::size_of::<String>()).sum(),
        }
    }

    /// Checks list lengths against [`LIST_ELEMENTS_MAX`].
    pub(crate) fn check(&self) -> Result<()> {
        let n = match self {
            Value::Float32Vector(v) => v.len(),
            Value::Int64List(v) => v.len(),
            Value::StringList(v) => v.len(),
            _ => 0,
        };
        if n > LIST_ELEMENTS_MAX {
            return Err(Error::InvalidArgument(format!(
                "list value has {n} elements, more than the limit of {LIST_ELEMENTS_MAX}"
            )));
        }
        Ok(())
    }
}

/// Entries a version vector holds without a heap allocation (a read of a cached value copies
/// its vector; deployments have a handful of regions).
const VERSION_VECTOR_INLINE: usize = 3;

/// A version vector: region -> counter, sorted by region, at most one entry per region.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct VersionVector(smallvec::SmallVec<[(RegionId, u64); VERSION_VECTOR_INLINE]>);

impl VersionVector {
    /// The empty vector.
    pub fn new() -> Self {
        VersionVector(smallvec::SmallVec::new())
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if the vector has no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A vector with one entry.
    pub fn single(region: RegionId, counter: u64) -> Self {
        VersionVector(smallvec::smallvec![(region, counter)])
    }

    /// Builds a vector from entries; fails on duplicates or too many entries.
    pub fn from_entries(mut entries: Vec<(RegionId, u64)>) -> Result<Self> {
        if entries.len() > VERSION_VECTOR_ENTRIES_MAX {
            return Err(Error::InvalidArgument(format!(
                "version vector has {} entries, more than the limit of {VERSION_VECTOR_ENTRIES_MAX}",
                entries.len()
            )));
        }
        entries.sort_unstable();
        if entries.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(Error::InvalidArgument("version vector names a region twice".into()));
        }
        Ok(VersionVector(entries.into()))
    }

    /// The entries, sorted by region.
    pub fn entries(&self) -> &[(RegionId, u64)] {
        &self.0
    }

    /// The counter of `region` (0 when absent).
    pub fn get(&self, region: RegionId) -> u64 {
        self.0.binary_search_by_key(&region, |e| e.0).map(|i| self.0[i].1).unwrap_or(0)
    }

    /// How `self` relates to `other` in the causal order (absent entries count as 0).
    pub fn compare(&self, other: &VersionVector) -> Causality {
        let (mut less, mut greater) = (false, false);
        let (a, b) = (&self.0, &other.0);
        let (mut i, mut j) = (0, 0);
        while i < a.len() || j < b.len() {
            let (x, y) = match (a.get(i), b.get(j)) {
                (Some(&(ra, ca)), Some(&(rb, cb))) if ra == rb => {
                    i += 1;
                    j += 1;
                    (ca, cb)
                }
                (Some(&(ra, ca)), Some(&(rb, _))) if ra < rb => {
                    i += 1;
                    (ca, 0)
                }
                (Some(_), Some(&(_, cb))) | (None, Some(&(_, cb))) => {
                    j += 1;
                    (0, cb)
                }
                (Some(&(_, ca)), None) => {
                    i += 1;
                    (ca, 0)
                }
                (None, None) => break,
            };
            less |= x < y;
            greater |= x > y;
        }
        match (less, greater) {
            (false, false) => Causality::Equal,
            (true, false) => Causality::Before,
            (false, true) => Causality::After,
            (true, true) => Causality::Concurrent,
        }
    }

    /// The least vector at or above both (entry-wise maximum).
    pub fn merge(&self, other: &VersionVector) -> VersionVector {
        let mut out = smallvec::SmallVec::with_capacity(self.0.len().max(other.0.len()));
        let (a, b) = (&self.0, &other.0);
        let (mut i, mut j) = (0, 0);
        while i < a.len() || j < b.len() {
            match (a.get(i), b.get(j)) {
                (Some(&(ra, ca)), Some(&(rb, cb))) if ra == rb => {
                    out.push((ra, ca.max(cb)));
                    i += 1;
                    j += 1;
                }
                (Some(&e), Some(&(rb, _))) if e.0 < rb => {
                    out.push(e);
                    i += 1;
                }
                (_, Some(&e)) => {
                    out.push(e);
                    j += 1;
                }
                (Some(&e), None) => {
                    out.push(e);
                    i += 1;
                }
                (None, None) => break,
            }
        }
        VersionVector(out)
    }
}

/// The causal order of two version vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Causality {
    /// Identical (absent entries count as 0).
    Equal,
    /// Every entry at or below the other's, one strictly: happened before.
    Before,
    /// Every entry at or above the other's, one strictly: happened after (dominates).
    After,
    /// Neither: concurrent.
    Concurrent,
}

/// One stored version of a cell, as reads return it.
#[derive(Debug, Clone, PartialEq)]
pub struct CellVersion {
    /// The cell's event time.
    pub event_time: EventTime,
    /// When the write was accepted.
    pub system_time: SystemTime,
    /// The value; `None` is a tombstone ("absent from this event time on").
    pub value: Option<Value>,
    /// The version's version vector.
    pub version_vector: VersionVector,
}

/// The parameters of an as-of read (`storage/READS.md`; the rule is in [`crate::asof`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsOf {
    /// Latest event time to consider (inclusive).
    pub as_of: EventTime,
    /// Latest system time to consider (inclusive); [`SystemTime::MAX`] for no limit.
    pub known_at: SystemTime,
    /// How far back from `as_of` to look, in microseconds (inclusive); `None` for no lower bound.
    pub lookback_us: Option<u64>,
}

impl AsOf {
    /// A read at `as_of` with no `known_at` limit and no lookback bound.
    pub fn at(as_of: EventTime) -> Self {
        AsOf { as_of, known_at: SystemTime::MAX, lookback_us: None }
    }
}

/// How durable a write must be before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Acknowledged after the WAL is fsynced (shared with concurrent writers: group commit).
    #[default]
    Sync,
    /// Acknowledged after write(2); fsynced in the background within
    /// [`crate::Options::async_sync_interval`].
    Async,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_key_encoding_is_order_preserving_and_collision_free() {
        let a = encode_entity_key(&[KeyPart::Str("a\0"), KeyPart::Int(1)]);
        let b = encode_entity_key(&[KeyPart::Str("a"), KeyPart::Str("\0")]);
        assert_ne!(a, b);
        assert!(encode_entity_key(&[KeyPart::Int(-5)]) < encode_entity_key(&[KeyPart::Int(3)]));
        assert!(encode_entity_key(&[KeyPart::Str("ab")]) < encode_entity_key(&[KeyPart::Str("b")]));
        assert!(encode_entity_key(&[KeyPart::Str("a")]) < encode_entity_key(&[KeyPart::Str("a\0")]));
    }
}
