//! The declarative registry file `quiver apply` reads (TOML):
//!
//! ```toml
//! [[entity_types]]
//! name = "user"
//! description = "a customer"
//! join_keys = [{ name = "user_id", type = "string" }]
//!
//! [[feature_groups]]
//! name = "user_stats"
//! entity_type = "user"
//! owner = "growth@example.com"
//! ttl = "1h"                      # s, m, h, d; "0s" never goes stale
//! freshness_sla = "2h"            # optional: breached when the newest event is older
//! log_sample_rate = 0.1           # optional: log online answers of 10% of entities
//! code_hash = "3f9a1c"            # a changed code hash gives a new version's features their own data
//! min_coverage_ratio = 0.95       # optional: release gate, coverage vs the serving version
//! max_shadow_mismatch_rate = 0.01 # optional: release gate, shadow reads that may differ
//! tags = { team = "growth" }
//! [[feature_groups.features]]
//! name = "clicks_1h"
//! type = "int64"                  # bool int64 float32 float64 string bytes float32_vector int64_list string_list
//! default = 0
//! max_null_rate = 0.05            # optional: share of null online answers allowed
//! max_psi = 0.25                  # optional: drift bound, population stability index (default 0.2)
//! max_ks = 0.15                   # optional: drift bound, KS statistic (default 0.1)
//! [[feature_groups.features]]
//! name = "embedding"
//! type = "float32_vector"
//! dim = 64                        # optional: every written vector has 64 elements
//! [[feature_groups.features]]     # an aggregate: read-only, computed from its source
//! name = "clicks_7d"
//! source = "clicks_1h"            # a written feature of the same group
//! agg = "sum"                     # count sum mean min max last_n count_distinct
//! window = "7d"                   # 1s to 366d; last_n also takes n = 1..1000
//! ```

use std::collections::BTreeMap;

use quiver_proto::v1 as pb;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    entity_types: Vec<EntityType>,
    #[serde(default)]
    feature_groups: Vec<Group>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntityType {
    name: String,
    #[serde(default)]
    description: String,
    join_keys: Vec<JoinKey>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinKey {
    name: String,
    #[serde(rename = "type")]
    ty: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Group {
    name: String,
    entity_type: String,
    #[serde(default)]
    owner: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    freshness_sla: Option<String>,
    #[serde(default)]
    log_sample_rate: Option<f64>,
    #[serde(default)]
    min_coverage_ratio: Option<f64>,
    #[serde(default)]
    max_shadow_mismatch_rate: Option<f64>,
    #[serde(default)]
    source: String,
    #[serde(default)]
    transformation: String,
    #[serde(default)]
    code_hash: String,
    features: Vec<Feature>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Feature {
    name: String,
    /// Required for written features; an aggregate's follows from `agg` and its source.
    #[serde(rename = "type", default)]
    ty: Option<String>,
    /// Aggregates: the feature aggregated, the function, the window, and last_n's n.
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    agg: Option<String>,
    #[serde(default)]
    window: Option<String>,
    #[serde(default)]
    n: u32,
    #[serde(default)]
    default: Option<toml::Value>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    max_null_rate: Option<f64>,
    #[serde(default)]
    max_psi: Option<f64>,
    #[serde(default)]
    max_ks: Option<f64>,
    #[serde(default)]
    dim: u32,
}

/// Parses a value type name.
pub fn value_type(s: &str) -> Result<pb::ValueType, String> {
    Ok(match s {
        "bool" => pb::ValueType::Bool,
        "int64" => pb::ValueType::Int64,
        "float32" => pb::ValueType::Float32,
        "float64" => pb::ValueType::Float64,
        "string" => pb::ValueType::String,
        "bytes" => pb::ValueType::Bytes,
        "float32_vector" => pb::ValueType::Float32Vector,
        "int64_list" => pb::ValueType::Int64List,
        "string_list" => pb::ValueType::StringList,
        other => return Err(format!("unknown type {other:?}")),
    })
}

/// Parses an aggregate function name.
pub fn agg_function(s: &str) -> Result<pb::AggFunction, String> {
    Ok(match s {
        "count" => pb::AggFunction::Count,
        "sum" => pb::AggFunction::Sum,
        "mean" => pb::AggFunction::Mean,
        "min" => pb::AggFunction::Min,
        "max" => pb::AggFunction::Max,
        "last_n" => pb::AggFunction::LastN,
        "count_distinct" => pb::AggFunction::CountDistinct,
        other => return Err(format!("unknown agg {other:?} (count, sum, mean, min, max, last_n, count_distinct)")),
    })
}

/// The aggregation of a feature of the file (`None`: a written feature).
fn aggregation(ft: &Feature) -> Result<Option<pb::Aggregation>, String> {
    let (source, agg, window) = match (&ft.source, &ft.agg, &ft.window) {
        (None, None, None) if ft.n == 0 => return Ok(None),
        (Some(source), Some(agg), Some(window)) => (source, agg, window),
        _ => return Err("an aggregate needs source, agg and window (and n for last_n)".into()),
    };
    Ok(Some(pb::Aggregation {
        source: source.clone(),
        function: agg_function(agg)? as i32,
        window: Some(duration(window).map_err(|e| format!("window: {e}"))?),
        n: ft.n,
    }))
}

/// Parses "90s", "15m", "1h", "7d".
pub fn duration(s: &str) -> Result<prost_types::Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num.parse().map_err(|_| format!("bad duration {s:?} (use e.g. 90s, 15m, 1h, 7d)"))?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("bad duration unit in {s:?} (s, m, h or d)")),
    };
    let secs = n.checked_mul(unit_secs).ok_or_else(|| format!("duration {s:?} is too long"))?;
    Ok(prost_types::Duration { seconds: secs, nanos: 0 })
}

fn toml_value(v: &toml::Value, t: pb::ValueType, what: &str) -> Result<pb::Value, String> {
    use pb::value::Kind;
    let bad = || format!("{what}: default {v} is not a {t:?}");
    let kind = match (t, v) {
        (pb::ValueType::Bool, toml::Value::Boolean(b)) => Kind::BoolValue(*b),
        (pb::ValueType::Int64, toml::Value::Integer(i)) => Kind::Int64Value(*i),
        (pb::ValueType::Float32, toml::Value::Float(f)) => Kind::Float32Value(*f as f32),
        (pb::ValueType::Float32, toml::Value::Integer(i)) => Kind::Float32Value(*i as f32),
        (pb::ValueType::Float64, toml::Value::Float(f)) => Kind::Float64Value(*f),
        (pb::ValueType::Float64, toml::Value::Integer(i)) => Kind::Float64Value(*i as f64),
        (pb::ValueType::String, toml::Value::String(s)) => Kind::StringValue(s.clone()),
        (pb::ValueType::Bytes, toml::Value::String(s)) => Kind::BytesValue(s.as_bytes().to_vec()),
        (pb::ValueType::Float32Vector, toml::Value::Array(a)) => Kind::Float32Vector(pb::Float32List {
            values: a
                .iter()
                .map(|x| x.as_float().or(x.as_integer().map(|i| i as f64)).map(|f| f as f32).ok_or_else(bad))
                .collect::<Result<_, _>>()?,
        }),
        (pb::ValueType::Int64List, toml::Value::Array(a)) => Kind::Int64List(pb::Int64List {
            values: a.iter().map(|x| x.as_integer().ok_or_else(bad)).collect::<Result<_, _>>()?,
        }),
        (pb::ValueType::StringList, toml::Value::Array(a)) => Kind::StringList(pb::StringList {
            values: a.iter().map(|x| x.as_str().map(str::to_string).ok_or_else(bad)).collect::<Result<_, _>>()?,
        }),
        _ => return Err(bad()),
    };
    Ok(pb::Value { kind: Some(kind) })
}

/// Parses a registry file into an apply request.
pub fn parse(text: &str) -> Result<pb::ApplyRegistryRequest, String> {
    let f: File = toml::from_str(text).map_err(|e| e.to_string().trim().replace('\n', " "))?;
    let mut req = pb::ApplyRegistryRequest::default();
    for e in f.entity_types {
        let mut join_keys = Vec::new();
        for k in e.join_keys {
            let t = match k.ty.as_str() {
                "string" => pb::JoinKeyType::String,
                "int64" => pb::JoinKeyType::Int64,
                other => {
                    return Err(format!(
                        "entity type {}: join key {} has type {other:?} (string or int64)",
                        e.name, k.name
                    ))
                }
            };
            join_keys.push(pb::JoinKey { name: k.name, r#type: t as i32 });
        }
        req.entity_types.push(pb::EntityType { name: e.name, join_keys, description: e.description });
    }
    for g in f.feature_groups {
        let mut features = Vec::new();
        for ft in g.features {
            let what = format!("feature {}:{}", g.name, ft.name);
            let aggregation = aggregation(&ft).map_err(|e| format!("{what}: {e}"))?;
            let t = match (&ft.ty, &aggregation) {
                (Some(ty), _) => value_type(ty).map_err(|e| format!("{what}: {e}"))?,
                // The server sets an aggregate's type.
                (None, Some(_)) => pb::ValueType::Unspecified,
                (None, None) => return Err(format!("{what}: needs a type")),
            };
            let default = match (&ft.default, t) {
                (Some(_), pb::ValueType::Unspecified) => {
                    return Err(format!("{what}: give the aggregate's type to give it a default"))
                }
                (Some(v), t) => Some(toml_value(v, t, &what)?),
                (None, _) => None,
            };
            features.push(pb::FeatureDef {
                name: ft.name,
                r#type: t as i32,
                default_value: default,
                description: ft.description,
                max_null_rate: ft.max_null_rate,
                max_psi: ft.max_psi,
                max_ks: ft.max_ks,
                dim: ft.dim,
                aggregation,
            });
        }
        let ttl = match &g.ttl {
            Some(s) => Some(duration(s).map_err(|e| format!("feature group {}: ttl: {e}", g.name))?),
            None => None,
        };
        let freshness_sla = match &g.freshness_sla {
            Some(s) => Some(duration(s).map_err(|e| format!("feature group {}: freshness_sla: {e}", g.name))?),
            None => None,
        };
        req.feature_groups.push(pb::FeatureGroup {
            name: g.name,
            version: 0,
            entity_type: g.entity_type,
            owner: g.owner,
            description: g.description,
            tags: g.tags.into_iter().collect(),
            ttl,
            source: g.source,
            transformation: g.transformation,
            code_hash: g.code_hash,
            features,
            created_at: None,
            freshness_sla,
            log_sample_rate: g.log_sample_rate,
            min_coverage_ratio: g.min_coverage_ratio,
            max_shadow_mismatch_rate: g.max_shadow_mismatch_rate,
        });
    }
    Ok(req)
}

/// The registry the demo applies.
pub const EXAMPLE: &str = r#"
[[entity_types]]
name = "user"
description = "a customer"
join_keys = [{ name = "user_id", type = "string" }]

[[feature_groups]]
name = "user_activity"
entity_type = "user"
owner = "growth@example.com"
description = "hourly activity aggregates"
ttl = "2h"
source = "events.clicks (kafka)"
transformation = "hourly_rollup"
code_hash = "3f9a1c"
tags = { team = "growth", tier = "online" }
freshness_sla = "3h"

[[feature_groups.features]]
name = "clicks_1h"
type = "int64"
default = 0

[[feature_groups.features]]
name = "spend_1h"
type = "float64"
max_null_rate = 0.5
max_psi = 0.3

[[feature_groups.features]]
name = "country"
type = "string"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_parses_and_bad_files_say_why() {
        let req = parse(EXAMPLE).expect("example");
        assert_eq!(req.feature_groups[0].features.len(), 3);
        assert_eq!(req.feature_groups[0].ttl, Some(prost_types::Duration { seconds: 7200, nanos: 0 }));
        assert_eq!(req.feature_groups[0].freshness_sla, Some(prost_types::Duration { seconds: 3 * 3600, nanos: 0 }));
        assert_eq!(req.feature_groups[0].features[1].max_null_rate, Some(0.5));
        assert_eq!(req.feature_groups[0].features[1].max_psi, Some(0.3));
        assert_eq!(req.feature_groups[0].features[1].max_ks, None);
        let vector = EXAMPLE.replace("type = \"string\"\n", "type = \"float32_vector\"\ndim = 8\n");
        assert_eq!(parse(&vector).expect("dim").feature_groups[0].features[2].dim, 8);
        let bad_sla = EXAMPLE.replace("freshness_sla = \"3h\"", "freshness_sla = \"3 hours\"");
        assert!(parse(&bad_sla).expect_err("sla").contains("freshness_sla"));
        assert!(parse("[[entity_types]]\nname = 1").is_err());
        assert!(parse("bogus = 1").expect_err("unknown field").contains("bogus"));
        let bad_type = EXAMPLE.replace("type = \"int64\"", "type = \"int128\"");
        assert!(parse(&bad_type).expect_err("type").contains("int128"));
        let bad_default = EXAMPLE.replace("default = 0", "default = \"zero\"");
        assert!(parse(&bad_default).expect_err("default").contains("default"));
        assert!(duration("5x").is_err() && duration("h").is_err());
        assert!(duration("9223372036854775807d").is_err());
    }

    #[test]
    fn aggregates_parse_without_a_type_and_half_declared_ones_say_why() {
        let with = |lines: &str| format!("{EXAMPLE}\n[[feature_groups.features]]\nname = \"clicks_7d\"\n{lines}\n");
        let req = parse(&with("source = \"clicks_1h\"\nagg = \"last_n\"\nwindow = \"7d\"\nn = 5")).expect("aggregate");
        let f = &req.feature_groups[0].features[3];
        assert_eq!(f.r#type(), pb::ValueType::Unspecified, "the server sets an aggregate's type");
        let a = f.aggregation.as_ref().expect("aggregation");
        assert_eq!((a.source.as_str(), a.function(), a.n), ("clicks_1h", pb::AggFunction::LastN, 5));
        assert_eq!(a.window, Some(prost_types::Duration { seconds: 7 * 86_400, nanos: 0 }));
        assert!(req.feature_groups[0].features[0].aggregation.is_none());
        let typed =
            parse(&with("type = \"int64\"\nsource = \"clicks_1h\"\nagg = \"sum\"\nwindow = \"1h\"\ndefault = 0"));
        assert_eq!(typed.expect("typed").feature_groups[0].features[3].r#type(), pb::ValueType::Int64);
        for (lines, why) in [
            ("source = \"clicks_1h\"\nagg = \"sum\"", "needs source, agg and window"),
            ("agg = \"sum\"\nwindow = \"1h\"", "needs source, agg and window"),
            ("source = \"clicks_1h\"\nagg = \"median\"\nwindow = \"1h\"", "unknown agg \"median\""),
            ("source = \"clicks_1h\"\nagg = \"sum\"\nwindow = \"1 week\"", "window"),
            ("source = \"clicks_1h\"\nagg = \"sum\"\nwindow = \"1h\"\ndefault = 0", "give the aggregate's type"),
            ("n = 3", "needs source, agg and window"),
            ("description = \"x\"", "needs a type"),
        ] {
            let e = parse(&with(lines)).expect_err(lines);
            assert!(e.contains(why) && e.contains("clicks_7d"), "{lines}: {e}");
        }
    }
}
