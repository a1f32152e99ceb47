//! Conversions between the API's types and the engine's, with the checks the API promises:
//! entity keys against their entity type, values against their feature's type, timestamps to
//! whole microseconds.

use quiver_proto::v1 as pb;
use quiver_storage::{encode_entity_key, EventTime, KeyPart, SystemTime, Value};

/// A request the server refuses before touching anything (`INVALID_ARGUMENT`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

type Result<T> = std::result::Result<T, Invalid>;

/// Encodes an entity key after checking it against its entity type's join keys.
pub fn entity_key(et: &pb::EntityType, key: &pb::EntityKey) -> Result<Vec<u8>> {
    if key.parts.len() != et.join_keys.len() {
        return Err(Invalid(format!(
            "entity key has {} parts, entity type {} has {} join keys",
            key.parts.len(),
            et.name,
            et.join_keys.len()
        )));
    }
    let mut parts = Vec::with_capacity(key.parts.len());
    for (p, jk) in key.parts.iter().zip(&et.join_keys) {
        use pb::key_part::Kind;
        let part = match (p.kind.as_ref(), jk.r#type()) {
            (Some(Kind::StringValue(s)), pb::JoinKeyType::String) => KeyPart::Str(s),
            (Some(Kind::Int64Value(i)), pb::JoinKeyType::Int64) => KeyPart::Int(*i),
            _ => return Err(Invalid(format!("join key {}.{} needs a {:?} value", et.name, jk.name, jk.r#type()))),
        };
        parts.push(part);
    }
    let encoded = encode_entity_key(&parts);
    quiver_storage::types::check_entity_key(&encoded).map_err(|e| Invalid(e.to_string()))?;
    Ok(encoded)
}

/// Earliest timestamp protobuf defines: 0001-01-01T00:00:00Z, in seconds since the epoch.
pub const TIMESTAMP_SECONDS_MIN: i64 = -62_135_596_800;
/// Latest timestamp protobuf defines: 9999-12-31T23:59:59Z, in seconds since the epoch.
pub const TIMESTAMP_SECONDS_MAX: i64 = 253_402_300_799;

/// Microseconds since the epoch of a timestamp; refuses sub-microsecond precision and times
/// outside protobuf's range (0001-01-01 to 9999-12-31).
pub fn micros(ts: &prost_types::Timestamp, what: &str) -> Result<i64> {
    if ts.nanos < 0 || ts.nanos >= 1_000_000_000 || ts.nanos % 1000 != 0 {
        return Err(Invalid(format!("{what}: nanos must be whole microseconds in 0..1e9, got {}", ts.nanos)));
    }
    if !(TIMESTAMP_SECONDS_MIN..=TIMESTAMP_SECONDS_MAX).contains(&ts.seconds) {
        return Err(Invalid(format!(
            "{what}: {} seconds since the epoch is outside protobuf's timestamp range (0001-01-01 to 9999-12-31)",
            ts.seconds
        )));
    }
    ts.seconds
        .checked_mul(1_000_000)
        .and_then(|s| s.checked_add(i64::from(ts.nanos / 1000)))
        .ok_or_else(|| Invalid(format!("{what}: timestamp out of range")))
}

/// An event time from a timestamp.
pub fn event_time(ts: Option<&prost_types::Timestamp>, what: &str) -> Result<EventTime> {
    let ts = ts.ok_or_else(|| Invalid(format!("{what} is required")))?;
    Ok(EventTime(micros(ts, what)?))
}

/// A system time bound from a timestamp (negative times clamp to 0: nothing is before it).
pub fn system_time(ts: &prost_types::Timestamp, what: &str) -> Result<SystemTime> {
    Ok(SystemTime(micros(ts, what)?.max(0) as u64))
}

/// A timestamp from microseconds.
pub fn timestamp(us: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: us.div_euclid(1_000_000), nanos: (us.rem_euclid(1_000_000) * 1000) as i32 }
}

/// An engine value from an API value of the expected type.
pub fn to_engine(v: &pb::Value, expected: pb::ValueType, what: &str) -> Result<Value> {
    use pb::value::Kind;
    let got = crate::registry::value_type_of(v);
    if got != Some(expected) {
        return Err(Invalid(format!("{what}: expected a {expected:?} value, got {got:?}")));
    }
    Ok(match v.kind.as_ref() {
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::Int64Value(i)) => Value::Int64(*i),
        Some(Kind::Float32Value(f)) => Value::Float32(*f),
        Some(Kind::Float64Value(f)) => Value::Float64(*f),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::BytesValue(b)) => Value::Bytes(b.clone()),
        Some(Kind::Float32Vector(l)) => Value::Float32Vector(l.values.clone()),
        Some(Kind::Int64List(l)) => Value::Int64List(l.values.clone()),
        Some(Kind::StringList(l)) => Value::StringList(l.values.clone()),
        None => return Err(Invalid(format!("{what}: value is empty"))),
    })
}

/// The engine's value type of an API value type (`None`: unspecified).
pub fn engine_type(t: pb::ValueType) -> Option<quiver_storage::ValueType> {
    use quiver_storage::ValueType as E;
    Some(match t {
        pb::ValueType::Unspecified => return None,
        pb::ValueType::Bool => E::Bool,
        pb::ValueType::Int64 => E::Int64,
        pb::ValueType::Float32 => E::Float32,
        pb::ValueType::Float64 => E::Float64,
        pb::ValueType::String => E::String,
        pb::ValueType::Bytes => E::Bytes,
        pb::ValueType::Float32Vector => E::Float32Vector,
        pb::ValueType::Int64List => E::Int64List,
        pb::ValueType::StringList => E::StringList,
    })
}

/// The API value type of an engine value type.
pub fn api_type(t: quiver_storage::ValueType) -> pb::ValueType {
    use quiver_storage::ValueType as E;
    match t {
        E::Bool => pb::ValueType::Bool,
        E::Int64 => pb::ValueType::Int64,
        E::Float32 => pb::ValueType::Float32,
        E::Float64 => pb::ValueType::Float64,
        E::String => pb::ValueType::String,
        E::Bytes => pb::ValueType::Bytes,
        E::Float32Vector => pb::ValueType::Float32Vector,
        E::Int64List => pb::ValueType::Int64List,
        E::StringList => pb::ValueType::StringList,
    }
}

/// An API value from an engine value.
pub fn to_api(v: &Value) -> pb::Value {
    use pb::value::Kind;
    let kind = match v {
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Int64(i) => Kind::Int64Value(*i),
        Value::Float32(f) => Kind::Float32Value(*f),
        Value::Float64(f) => Kind::Float64Value(*f),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Bytes(b) => Kind::BytesValue(b.clone()),
        Value::Float32Vector(l) => Kind::Float32Vector(pb::Float32List { values: l.clone() }),
        Value::Int64List(l) => Kind::Int64List(pb::Int64List { values: l.clone() }),
        Value::StringList(l) => Kind::StringList(pb::StringList { values: l.clone() }),
    };
    pb::Value { kind: Some(kind) }
}

/// A version vector on the API.
pub fn vector_to_proto(vv: &quiver_storage::VersionVector) -> pb::VersionVector {
    pb::VersionVector {
        entries: vv.entries().iter().map(|&(region, counter)| pb::version_vector::Entry { region, counter }).collect(),
    }
}

/// The value row `i` of an answer column serves (`None` for statuses that serve none).
pub fn column_value(col: &pb::FeatureColumn, i: usize) -> Option<pb::Value> {
    use pb::value::Kind;
    let served = matches!(
        pb::FeatureStatus::try_from(col.statuses.get(i).copied().unwrap_or(0)),
        Ok(pb::FeatureStatus::Present | pb::FeatureStatus::Defaulted)
    );
    if !served {
        return None;
    }
    let kind = match col.r#type() {
        pb::ValueType::Bool => Kind::BoolValue(*col.bool_values.get(i)?),
        pb::ValueType::Int64 => Kind::Int64Value(*col.int64_values.get(i)?),
        pb::ValueType::Float32 => Kind::Float32Value(*col.float32_values.get(i)?),
        pb::ValueType::Float64 => Kind::Float64Value(*col.float64_values.get(i)?),
        pb::ValueType::String => Kind::StringValue(col.string_values.get(i)?.clone()),
        pb::ValueType::Bytes => Kind::BytesValue(col.bytes_values.get(i)?.clone()),
        pb::ValueType::Float32Vector => Kind::Float32Vector(col.float32_vector_values.get(i)?.clone()),
        pb::ValueType::Int64List => Kind::Int64List(col.int64_list_values.get(i)?.clone()),
        pb::ValueType::StringList => Kind::StringList(col.string_list_values.get(i)?.clone()),
        pb::ValueType::Unspecified => return None,
    };
    Some(pb::Value { kind: Some(kind) })
}

/// Appends one row's value (or the type's zero value when `v` is `None`) to a column.
pub fn push_value(col: &mut pb::FeatureColumn, t: pb::ValueType, v: Option<&Value>) {
    match (t, v) {
        (pb::ValueType::Bool, Some(Value::Bool(b))) => col.bool_values.push(*b),
        (pb::ValueType::Bool, _) => col.bool_values.push(false),
        (pb::ValueType::Int64, Some(Value::Int64(i))) => col.int64_values.push(*i),
        (pb::ValueType::Int64, _) => col.int64_values.push(0),
        (pb::ValueType::Float32, Some(Value::Float32(x))) => col.float32_values.push(*x),
        (pb::ValueType::Float32, _) => col.float32_values.push(0.0),
        (pb::ValueType::Float64, Some(Value::Float64(x))) => col.float64_values.push(*x),
        (pb::ValueType::Float64, _) => col.float64_values.push(0.0),
        (pb::ValueType::String, Some(Value::String(s))) => col.string_values.push(s.clone()),
        (pb::ValueType::String, _) => col.string_values.push(String::new()),
        (pb::ValueType::Bytes, Some(Value::Bytes(b))) => col.bytes_values.push(b.clone()),
        (pb::ValueType::Bytes, _) => col.bytes_values.push(Vec::new()),
        (pb::ValueType::Float32Vector, Some(Value::Float32Vector(l))) => {
            col.float32_vector_values.push(pb::Float32List { values: l.clone() })
        }
        (pb::ValueType::Float32Vector, _) => col.float32_vector_values.push(pb::Float32List::default()),
        (pb::ValueType::Int64List, Some(Value::Int64List(l))) => {
            col.int64_list_values.push(pb::Int64List { values: l.clone() })
        }
        (pb::ValueType::Int64List, _) => col.int64_list_values.push(pb::Int64List::default()),
        (pb::ValueType::StringList, Some(Value::StringList(l))) => {
            col.string_list_values.push(pb::StringList { values: l.clone() })
        }
        (pb::ValueType::StringList, _) => col.string_list_values.push(pb::StringList::default()),
        (pb::ValueType::Unspecified, _) => {}
    }
}

/// A value as people read it: the web UI's JSON (int64 as text: JSON numbers lose digits past
/// 2^53) and the CLI's reports. Strings quoted, bytes in hex.
pub fn value_text(v: &pb::Value) -> String {
    use pb::value::Kind;
    let list = |items: Vec<String>| format!("[{}]", items.join(", "));
    match &v.kind {
        None => "null".into(),
        Some(Kind::BoolValue(b)) => b.to_string(),
        Some(Kind::Int64Value(i)) => i.to_string(),
        Some(Kind::Float32Value(x)) => x.to_string(),
        Some(Kind::Float64Value(x)) => x.to_string(),
        Some(Kind::StringValue(s)) => format!("{s:?}"),
        Some(Kind::BytesValue(b)) => format!("0x{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>()),
        Some(Kind::Float32Vector(l)) => list(l.values.iter().map(f32::to_string).collect()),
        Some(Kind::Int64List(l)) => list(l.values.iter().map(i64::to_string).collect()),
        Some(Kind::StringList(l)) => list(l.values.iter().map(|s| format!("{s:?}")).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_and_reject_sub_microseconds() {
        for us in [0i64, 1, -1, 1_767_225_600_123_456, -1_000_001] {
            assert_eq!(micros(&timestamp(us), "t"), Ok(us));
        }
        assert!(micros(&prost_types::Timestamp { seconds: 1, nanos: 1 }, "t").is_err());
        assert!(micros(&prost_types::Timestamp { seconds: 1, nanos: -1000 }, "t").is_err());
        assert!(micros(&prost_types::Timestamp { seconds: i64::MAX, nanos: 0 }, "t").is_err());
        // Protobuf's range, inclusive at both ends.
        let at = |seconds, nanos| micros(&prost_types::Timestamp { seconds, nanos }, "t");
        assert!(at(TIMESTAMP_SECONDS_MIN, 0).is_ok());
        assert!(at(TIMESTAMP_SECONDS_MAX, 999_999_000).is_ok());
        assert!(at(TIMESTAMP_SECONDS_MIN - 1, 999_999_000).is_err());
        assert!(at(TIMESTAMP_SECONDS_MAX + 1, 0).is_err());
    }

    #[test]
    fn entity_keys_are_checked_against_their_type() {
        let et = pb::EntityType {
            name: "pair".into(),
            join_keys: vec![
                pb::JoinKey { name: "user_id".into(), r#type: pb::JoinKeyType::String as i32 },
                pb::JoinKey { name: "merchant_id".into(), r#type: pb::JoinKeyType::Int64 as i32 },
            ],
            description: String::new(),
        };
        let s = |v: &str| pb::KeyPart { kind: Some(pb::key_part::Kind::StringValue(v.into())) };
        let i = |v: i64| pb::KeyPart { kind: Some(pb::key_part::Kind::Int64Value(v)) };
        let k = entity_key(&et, &pb::EntityKey { parts: vec![s("u1"), i(7)] }).expect("valid");
        assert_eq!(k, encode_entity_key(&[KeyPart::Str("u1"), KeyPart::Int(7)]));
        assert!(entity_key(&et, &pb::EntityKey { parts: vec![s("u1")] }).is_err());
        assert!(entity_key(&et, &pb::EntityKey { parts: vec![i(7), s("u1")] }).is_err());
        assert!(entity_key(&et, &pb::EntityKey { parts: vec![s(&"x".repeat(2000)), i(1)] }).is_err());
    }

    #[test]
    fn values_round_trip_and_types_are_enforced() {
        let v = pb::Value { kind: Some(pb::value::Kind::Float32Vector(pb::Float32List { values: vec![0.5, 1.0] })) };
        let e = to_engine(&v, pb::ValueType::Float32Vector, "f").expect("valid");
        assert_eq!(to_api(&e), v);
        assert!(to_engine(&v, pb::ValueType::Float64, "f").is_err());
        assert!(to_engine(&pb::Value { kind: None }, pb::ValueType::Float64, "f").is_err());
    }
}
