//! Internal keys: the byte strings the memtable and SSTables are ordered by.
//!
//! ```text
//! internal key = escape(entity) 0x00 0x01 | feature u32 BE | !(event_time ^ 1<<63) u64 BE | !system_time u64 BE
//! prefix       = everything but the last 16 bytes: one (entity, feature) pair
//! ```
//!
//! `escape` writes `0x00` as `0x00 0xff`, so the terminator `0x00 0x01` sorts below any
//! continuation and entity order is plain byte order of the entity keys. Event time and system
//! time are stored inverted so that byte order is *descending* time: a seek to
//! `(entity, feature, T, SystemTime::MAX)` lands on the newest version at or before `T`.
//!
//! Example: entity `b"u1"`, feature 7, event time 0, system time 1 encodes as
//! `75 31 00 01 | 00 00 00 07 | 7f ff ff ff ff ff ff ff | ff ff ff ff ff ff ff fe`.

use crate::asof::Visibility;
use crate::types::{EventTime, FeatureId, SystemTime};

/// Bytes of the time suffix (event time + system time).
pub const TIME_SUFFIX_BYTES: usize = 16;
/// Bytes of the feature id in a key.
pub const FEATURE_BYTES: usize = 4;

fn push_escaped(out: &mut Vec<u8>, entity: &[u8]) {
    for &b in entity {
        out.push(b);
        if b == 0 {
            out.push(0xff);
        }
    }
    out.extend_from_slice(&[0x00, 0x01]);
}

/// Encodes the escaped entity only: every key of this entity starts with it.
pub fn entity_prefix(entity: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entity.len() + 2);
    push_escaped(&mut out, entity);
    out
}

/// Encodes the `(entity, feature)` prefix.
pub fn prefix(entity: &[u8], feature: FeatureId) -> Vec<u8> {
    let mut out = Vec::with_capacity(entity.len() + 2 + FEATURE_BYTES + TIME_SUFFIX_BYTES);
    push_prefix(&mut out, entity, feature);
    out
}

/// Appends the `(entity, feature)` prefix to `out` (reusing its allocation).
pub fn push_prefix(out: &mut Vec<u8>, entity: &[u8], feature: FeatureId) {
    push_escaped(out, entity);
    out.extend_from_slice(&feature.0.to_be_bytes());
}

fn event_bits(e: EventTime) -> u64 {
    !((e.0 as u64) ^ (1 << 63))
}

/// Appends the time suffix to a prefix.
pub fn push_times(out: &mut Vec<u8>, e: EventTime, s: SystemTime) {
    out.extend_from_slice(&event_bits(e).to_be_bytes());
    out.extend_from_slice(&(!s.0).to_be_bytes());
}

/// Encodes a full internal key.
pub fn encode(entity: &[u8], feature: FeatureId, e: EventTime, s: SystemTime) -> Vec<u8> {
    let mut k = prefix(entity, feature);
    push_times(&mut k, e, s);
    k
}

/// A borrowed, structurally valid internal key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRef<'a> {
    raw: &'a [u8],
}

impl<'a> KeyRef<'a> {
    /// Checks the structure of `raw` (terminator, lengths, escaping); `None` if malformed.
    pub fn parse(raw: &'a [u8]) -> Option<KeyRef<'a>> {
        let n = raw.len();
        if n < 2 + FEATURE_BYTES + TIME_SUFFIX_BYTES {
            return None;
        }
        let ent = &raw[..n - TIME_SUFFIX_BYTES - FEATURE_BYTES];
        // The escaped entity must end with exactly one terminator and have only escaped zeros.
        let mut i = 0;
        while i < ent.len() {
            if ent[i] == 0 {
                match ent.get(i + 1) {
                    Some(0xff) => i += 2,
                    Some(0x01) if i + 2 == ent.len() => return if i == 0 { None } else { Some(KeyRef { raw }) },
                    _ => return None,
                }
            } else {
                i += 1;
            }
        }
        None
    }

    /// `raw` as a key when its start is known to be valid: it begins with `entity_prefix` (an
    /// escaped entity with its terminator, as [`push_prefix`] writes it) and is exactly a
    /// feature id and a time suffix longer. Checks just that, in constant time plus one
    /// comparison, where [`KeyRef::parse`] scans the entity byte by byte.
    pub fn with_entity_prefix(raw: &'a [u8], entity_prefix: &[u8]) -> Option<KeyRef<'a>> {
        (raw.len() == entity_prefix.len() + FEATURE_BYTES + TIME_SUFFIX_BYTES && raw.starts_with(entity_prefix))
            .then_some(KeyRef { raw })
    }

    /// `raw` as a key, unchecked: only for a key already known to be well formed (a table
    /// block's entry, which the block's parse or scan checked before handing it out).
    pub(crate) fn known_valid(raw: &'a [u8]) -> KeyRef<'a> {
        KeyRef { raw }
    }

    /// The `(entity, feature)` prefix.
    pub fn prefix(&self) -> &'a [u8] {
        &self.raw[..self.raw.len() - TIME_SUFFIX_BYTES]
    }

    /// The escaped entity with its terminator.
    pub fn entity_prefix(&self) -> &'a [u8] {
        &self.raw[..self.raw.len() - TIME_SUFFIX_BYTES - FEATURE_BYTES]
    }

    /// The entity key, unescaped.
    pub fn entity(&self) -> Vec<u8> {
        let esc = self.entity_prefix();
        let esc = &esc[..esc.len() - 2];
        let mut out = Vec::with_capacity(esc.len());
        let mut i = 0;
        while i < esc.len() {
            out.push(esc[i]);
            i += if esc[i] == 0 { 2 } else { 1 };
        }
        out
    }

    /// The feature id.
    pub fn feature(&self) -> FeatureId {
        let n = self.raw.len() - TIME_SUFFIX_BYTES;
        let b = &self.raw[n - FEATURE_BYTES..n];
        FeatureId(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// The event time.
    pub fn event_time(&self) -> EventTime {
        event_time_of(self.raw)
    }

    /// The system time.
    pub fn system_time(&self) -> SystemTime {
        system_time_of(self.raw)
    }
}

fn suffix_u64(raw: &[u8], from_end: usize) -> u64 {
    let n = raw.len() - from_end;
    let mut a = [0u8; 8];
    a.copy_from_slice(&raw[n..n + 8]);
    u64::from_be_bytes(a)
}

/// The event time of a key known to be valid.
pub fn event_time_of(raw: &[u8]) -> EventTime {
    EventTime(((!suffix_u64(raw, 16)) ^ (1 << 63)) as i64)
}

/// The system time of a key known to be valid.
pub fn system_time_of(raw: &[u8]) -> SystemTime {
    SystemTime(!suffix_u64(raw, 8))
}

/// The `(entity, feature)` prefix of a key known to be valid.
pub fn prefix_of(raw: &[u8]) -> &[u8] {
    &raw[..raw.len() - TIME_SUFFIX_BYTES]
}

/// One as-of point read of one `(entity, feature)` pair, shared by every source (memtables and
/// tables) so that they agree on what is visible.
#[derive(Debug, Clone, Copy)]
pub struct Probe<'a> {
    /// The pair's prefix.
    pub prefix: &'a [u8],
    /// `(prefix, as_of, SystemTime::MAX)`: where the read starts.
    pub seek: &'a [u8],
    /// Oldest event time inside the lookback window.
    pub event_time_min: EventTime,
    /// Newest system time the read may see.
    pub known_at: SystemTime,
}

impl Probe<'_> {
    /// Judges a key met at or after `seek`, in key order: past the pair, stop; else as
    /// [`crate::asof::judge`] rules.
    pub fn judge(&self, k: &[u8]) -> Visibility {
        if prefix_of(k) != self.prefix {
            return Visibility::Stop;
        }
        crate::asof::judge(event_time_of(k), system_time_of(k), self.event_time_min, self.known_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_encoding() {
        let k = encode(b"u1", FeatureId(7), EventTime(0), SystemTime(1));
        let want: Vec<u8> = [
            &[0x75, 0x31, 0x00, 0x01][..],
            &[0, 0, 0, 7],
            &[0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe],
        ]
        .concat();
        assert_eq!(k, want);
        let r = KeyRef::parse(&k).expect("valid");
        assert_eq!(r.entity(), b"u1");
        assert_eq!(r.feature(), FeatureId(7));
        assert_eq!(r.event_time(), EventTime(0));
        assert_eq!(r.system_time(), SystemTime(1));
    }

    #[test]
    fn order_is_entity_feature_then_times_descending() {
        let k = |ent: &[u8], f, e, s| encode(ent, FeatureId(f), EventTime(e), SystemTime(s));
        assert!(k(b"a", 9, 0, 0) < k(b"a\0", 0, 0, 0));
        assert!(k(b"a\0", 9, 0, 0) < k(b"a\x01", 0, 0, 0));
        assert!(k(b"a", 1, 0, 0) < k(b"a", 2, 0, 0));
        assert!(k(b"a", 1, 5, 0) < k(b"a", 1, 4, 0));
        assert!(k(b"a", 1, 1, 0) < k(b"a", 1, -1, 0));
        assert!(k(b"a", 1, 5, 9) < k(b"a", 1, 5, 8));
        assert!(k(b"a", 1, i64::MAX, u64::MAX) < k(b"a", 1, i64::MIN, 0));
    }

    #[test]
    fn round_trip_with_zero_bytes() {
        let ent = b"\0a\0\0b\0";
        let key = encode(ent, FeatureId(u32::MAX), EventTime(i64::MIN), SystemTime(u64::MAX));
        let r = KeyRef::parse(&key).expect("valid");
        assert_eq!(r.entity(), ent);
        assert_eq!(r.event_time(), EventTime(i64::MIN));
        assert_eq!(r.system_time(), SystemTime(u64::MAX));
        assert!(
            KeyRef::parse(&key[1..]).is_none() || KeyRef::parse(&key[1..]).map(|k| k.entity()) != Some(ent.to_vec())
        );
        assert!(KeyRef::parse(&[0u8; 21]).is_none());
    }
}
