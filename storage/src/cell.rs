//! The encoded value of one cell version, as stored in the WAL, the memtable and SSTables
//! (tables and the hot tier keep it in the stored form of [`compact`], which needs the key's
//! system time to decode: [`decode_stored`]).
//!
//! ```text
//! cell value = flags u8 (bit 0: tombstone; other bits must be 0 in this form)
//!              | vv_len uvarint | vv_len x (region uvarint, counter uvarint)   (regions ascending)
//!              | [if not tombstone] type u8 | payload
//! payload    = bool: u8 0|1 | int64: i64 LE | float32: f32 LE | float64: f64 LE
//!            | string, bytes: len uvarint, bytes (string is UTF-8)
//!            | float32 vector: n uvarint, n x f32 LE | int64 list: n uvarint, n x i64 LE
//!            | string list: n uvarint, n x (len uvarint, UTF-8 bytes)
//! ```
//!
//! Example: int64 42 with version vector {1: 5} is `00 01 01 05 01 2a 00 00 00 00 00 00 00`.
//!
//! Stored form ([`compact`]; `FORMAT.md` §2): when the version vector is `{region: stamp}` and
//! `stamp` is the key's system time, bit 1 of the flags is set and the region alone replaces
//! the vector: `flags u8 | region uvarint | [if not tombstone] type u8 | payload`. The same
//! int64 42 written at system time 5 is stored as `02 01 01 2a 00 00 00 00 00 00 00`.

use crate::coding::{put_bytes, put_uvarint, DecodeError, Reader};
use crate::limits::{LIST_ELEMENTS_MAX, VALUE_BYTES_MAX, VERSION_VECTOR_ENTRIES_MAX};
use crate::types::{Value, ValueType, VersionVector};

const FLAG_TOMBSTONE: u8 = 1;
/// In the stored form only (tables and the hot tier, never the WAL or the wire): the version
/// vector is `{region: system_time}` with `system_time` the key's, and `region` is a uvarint
/// in place of the vector.
const FLAG_OWN_STAMP: u8 = 2;

/// Encodes a cell version's value (`None` = tombstone) and version vector.
pub fn encode(value: Option<&Value>, vv: &VersionVector, out: &mut Vec<u8>) {
    out.push(if value.is_none() { FLAG_TOMBSTONE } else { 0 });
    put_uvarint(out, vv.entries().len() as u64);
    for &(r, c) in vv.entries() {
        put_uvarint(out, u64::from(r));
        put_uvarint(out, c);
    }
    if let Some(v) = value {
        encode_value_part(v, out);
    }
}

/// Encodes a value as a cell's [`value_part`] (type and payload), which
/// [`decode_value_part`] reads.
pub fn encode_value_part(v: &Value, out: &mut Vec<u8>) {
    out.push(v.value_type() as u8);
    match v {
        Value::Bool(b) => out.push(u8::from(*b)),
        Value::Int64(i) => out.extend_from_slice(&i.to_le_bytes()),
        Value::Float32(f) => out.extend_from_slice(&f.to_le_bytes()),
        Value::Float64(f) => out.extend_from_slice(&f.to_le_bytes()),
        Value::String(s) => put_bytes(out, s.as_bytes()),
        Value::Bytes(b) => put_bytes(out, b),
        Value::Float32Vector(v) => {
            put_uvarint(out, v.len() as u64);
            for f in v {
                out.extend_from_slice(&f.to_le_bytes());
            }
        }
        Value::Int64List(v) => {
            put_uvarint(out, v.len() as u64);
            for i in v {
                out.extend_from_slice(&i.to_le_bytes());
            }
        }
        Value::StringList(v) => {
            put_uvarint(out, v.len() as u64);
            for s in v {
                put_bytes(out, s.as_bytes());
            }
        }
    }
}

/// True if the encoded value is a tombstone (checked by the decoder; cheap peek).
pub fn is_tombstone(raw: &[u8]) -> bool {
    raw.first().is_some_and(|f| f & FLAG_TOMBSTONE != 0)
}

fn string(r: &mut Reader<'_>) -> Result<String, DecodeError> {
    let b = r.len_bytes(VALUE_BYTES_MAX)?;
    String::from_utf8(b.to_vec()).map_err(|_| "string is not UTF-8")
}

/// Decodes a cell value; the whole input must be consumed.
pub fn decode(raw: &[u8]) -> Result<(Option<Value>, VersionVector), DecodeError> {
    decode_with(raw, None)
}

/// The value part of a cell as stored (type and payload, after the flags and the version
/// vector), for readers that want the value alone: `None` for a tombstone. Decode it with
/// [`decode_value_part`].
/// Takes either form: the full one and the stored one ([`compact`]).
pub fn value_part(raw: &[u8]) -> Result<Option<&[u8]>, DecodeError> {
    let mut r = Reader::new(raw);
    let flags = r.u8()?;
    if flags & !(FLAG_TOMBSTONE | FLAG_OWN_STAMP) != 0 {
        return Err("unknown cell flags");
    }
    if flags & FLAG_OWN_STAMP != 0 {
        r.uvarint()?;
    } else {
        let n = r.len(VERSION_VECTOR_ENTRIES_MAX)?;
        for _ in 0..n {
            r.uvarint()?;
            r.uvarint()?;
        }
    }
    Ok((flags & FLAG_TOMBSTONE == 0).then(|| &raw[r.pos()..]))
}

/// Decodes a [`value_part`]; the whole input must be consumed.
pub fn decode_value_part(part: &[u8]) -> Result<Value, DecodeError> {
    let mut r = Reader::new(part);
    let value = read_value(0, &mut r)?.ok_or("no value")?;
    if !r.is_empty() {
        return Err("trailing bytes after cell value");
    }
    Ok(value)
}

/// Decodes a cell value, in the [`compact`] form too when `own_stamp` gives the version's
/// system time (the WAL and the wire never hold that form, so [`decode`] refuses it).
fn decode_with(raw: &[u8], own_stamp: Option<u64>) -> Result<(Option<Value>, VersionVector), DecodeError> {
    let mut r = Reader::new(raw);
    let mut flags = r.u8()?;
    let vv = match own_stamp {
        Some(stamp) if flags & FLAG_OWN_STAMP != 0 => {
            flags &= !FLAG_OWN_STAMP;
            let region = u32::try_from(r.uvarint()?).map_err(|_| "region id over u32")?;
            VersionVector::single(region, stamp)
        }
        _ => {
            let n = r.len(VERSION_VECTOR_ENTRIES_MAX)?;
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                let region = u32::try_from(r.uvarint()?).map_err(|_| "region id over u32")?;
                let counter = r.uvarint()?;
                if entries.last().is_some_and(|&(prev, _)| prev >= region) {
                    return Err("version vector not sorted");
                }
                entries.push((region, counter));
            }
            VersionVector::from_entries(entries).map_err(|_| "bad version vector")?
        }
    };
    if flags & !FLAG_TOMBSTONE != 0 {
        return Err("unknown cell flags");
    }
    let value = read_value(flags, &mut r)?;
    if !r.is_empty() {
        return Err("trailing bytes after cell value");
    }
    Ok((value, vv))
}

/// For an encoded cell whose version vector is exactly `{region: system_time}`: its flags,
/// where the region's uvarint lies, and where the value part starts.
fn own_stamp_parts(raw: &[u8], system_time: u64) -> Option<(u8, std::ops::Range<usize>, usize)> {
    let mut r = Reader::new(raw);
    let flags = r.u8().ok()?;
    // Already in the stored form: nothing to elide.
    if flags & FLAG_OWN_STAMP != 0 || r.uvarint().ok()? != 1 {
        return None;
    }
    let region_start = r.pos();
    r.uvarint().ok()?;
    let region = region_start..r.pos();
    (r.uvarint().ok()? == system_time).then(|| (flags, region, r.pos()))
}

/// The stored form (tables and the hot tier; `FORMAT.md` §2) of an encoded cell whose version
/// has system time `system_time`: a version vector `{region: system_time}`, which every local
/// write has when no other region is known, is replaced by the region alone, so a float64
/// takes 11 bytes instead of 20. Other cells, and cells already in that form, are kept as they
/// are.
pub(crate) fn compact(raw: &[u8], system_time: u64, out: &mut Vec<u8>) {
    match own_stamp_parts(raw, system_time) {
        Some((flags, region, value)) => {
            out.push(flags | FLAG_OWN_STAMP);
            out.extend_from_slice(&raw[region]);
            out.extend_from_slice(&raw[value..]);
        }
        None => out.extend_from_slice(raw),
    }
}

/// The length of [`compact`]'s output for the same arguments.
pub(crate) fn compact_len(raw: &[u8], system_time: u64) -> usize {
    own_stamp_parts(raw, system_time).map_or(raw.len(), |(_, region, value)| 1 + region.len() + raw.len() - value)
}

/// Decodes a stored cell (either form: [`compact`]'s or the full one) whose version has
/// system time `system_time` (its key's).
pub fn decode_stored(raw: &[u8], system_time: u64) -> Result<(Option<Value>, VersionVector), DecodeError> {
    decode_with(raw, Some(system_time))
}

/// The value part of a cell (after its version vector).
fn read_value(flags: u8, r: &mut Reader<'_>) -> Result<Option<Value>, DecodeError> {
    let value = if flags & FLAG_TOMBSTONE != 0 {
        None
    } else {
        let t = ValueType::from_tag(r.u8()?).ok_or("unknown value type")?;
        Some(match t {
            ValueType::Bool => match r.u8()? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                _ => return Err("bool is not 0 or 1"),
            },
            ValueType::Int64 => Value::Int64(r.u64_le()? as i64),
            ValueType::Float32 => Value::Float32(f32::from_bits(r.u32_le()?)),
            ValueType::Float64 => Value::Float64(f64::from_bits(r.u64_le()?)),
            ValueType::String => Value::String(string(r)?),
            ValueType::Bytes => Value::Bytes(r.len_bytes(VALUE_BYTES_MAX)?.to_vec()),
            ValueType::Float32Vector => {
                let n = r.len(LIST_ELEMENTS_MAX)?;
                let mut v = Vec::with_capacity(n.min(r.remaining() / 4));
                for _ in 0..n {
                    v.push(f32::from_bits(r.u32_le()?));
                }
                Value::Float32Vector(v)
            }
            ValueType::Int64List => {
                let n = r.len(LIST_ELEMENTS_MAX)?;
                let mut v = Vec::with_capacity(n.min(r.remaining() / 8));
                for _ in 0..n {
                    v.push(r.u64_le()? as i64);
                }
                Value::Int64List(v)
            }
            ValueType::StringList => {
                let n = r.len(LIST_ELEMENTS_MAX)?;
                let mut v = Vec::with_capacity(n.min(r.remaining()));
                for _ in 0..n {
                    v.push(string(r)?);
                }
                Value::StringList(v)
            }
        })
    };
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_encoding() {
        let mut out = Vec::new();
        encode(Some(&Value::Int64(42)), &VersionVector::single(1, 5), &mut out);
        assert_eq!(out, [0x00, 0x01, 0x01, 0x05, 0x01, 0x2a, 0, 0, 0, 0, 0, 0, 0]);
        let mut stored = Vec::new();
        compact(&out, 5, &mut stored);
        assert_eq!(stored, [0x02, 0x01, 0x01, 0x2a, 0, 0, 0, 0, 0, 0, 0]);
        let mut t = Vec::new();
        encode(None, &VersionVector::new(), &mut t);
        assert_eq!(t, [0x01, 0x00]);
        assert!(is_tombstone(&t));
        assert_eq!(value_part(&t), Ok(None));
        assert_eq!(value_part(&out), Ok(Some(&out[4..])));
        assert!(value_part(&[0x04, 0x00]).is_err(), "unknown flags");
    }

    #[test]
    fn compact_form_round_trips_and_elides_only_own_stamps() {
        let cases = [
            (Some(Value::Float64(1.5)), VersionVector::single(3, 77), 77, 11),
            // Region 1 reads like a one-entry vector's length if the flag is missed, and then
            // the type tag (1) and the payload's first byte (77) like region and stamp.
            (Some(Value::Int64(77)), VersionVector::single(1, 77), 77, 11),
            (None, VersionVector::single(1, 9), 9, 2),
            // Another counter, or several regions: kept whole.
            (Some(Value::Int64(4)), VersionVector::single(3, 76), 77, 0),
            (Some(Value::Int64(4)), VersionVector::from_entries(vec![(1, 5), (2, 77)]).expect("vv"), 77, 0),
            (Some(Value::Bool(true)), VersionVector::new(), 77, 0),
        ];
        for (value, vv, stamp, want_len) in cases {
            let mut raw = Vec::new();
            encode(value.as_ref(), &vv, &mut raw);
            let mut c = Vec::new();
            compact(&raw, stamp, &mut c);
            if want_len > 0 {
                assert_eq!(c.len(), want_len, "{value:?} {vv:?}");
                assert!(decode(&c).is_err(), "the WAL and the wire never hold the stored form");
            } else {
                assert_eq!(c, raw);
            }
            assert_eq!(compact_len(&raw, stamp), c.len());
            // Both forms give the same value part, and compacting twice changes nothing (a
            // compaction rewrites tables whose cells are already stored).
            assert_eq!(value_part(&c), value_part(&raw));
            assert_eq!(value_part(&c).expect("value part").is_none(), value.is_none());
            let mut again = Vec::new();
            compact(&c, stamp, &mut again);
            assert_eq!(again, c);
            assert_eq!(decode_stored(&c, stamp), Ok((value.clone(), vv.clone())));
            assert!(decode_stored(&c[..c.len() - 1], stamp).is_err());
        }
    }

    #[test]
    fn round_trip_every_type() {
        let vals = [
            Value::Bool(true),
            Value::Int64(-3),
            Value::Float32(1.5),
            Value::Float64(-2.25),
            Value::String("héllo".into()),
            Value::Bytes(vec![0, 1, 2]),
            Value::Float32Vector(vec![0.5, -0.25]),
            Value::Int64List(vec![1, i64::MIN]),
            Value::StringList(vec!["a".into(), String::new()]),
        ];
        let vv = VersionVector::from_entries(vec![(3, 1), (1, 9)]).expect("vv");
        for v in vals {
            let mut out = Vec::new();
            encode(Some(&v), &vv, &mut out);
            assert_eq!(decode(&out), Ok((Some(v.clone()), vv.clone())));
            let part = value_part(&out).expect("value part").expect("not a tombstone");
            assert_eq!(decode_value_part(part), Ok(v.clone()));
            assert!(decode_value_part(&part[..part.len() - 1]).is_err());
            assert!(decode(&out[..out.len() - 1]).is_err());
            out.push(0);
            assert!(decode(&out).is_err());
        }
    }
}
