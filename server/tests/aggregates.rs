//! Aggregate features (README "Windowed aggregations"): declared in the registry, read-only,
//! and answered the same way by online lookups and by every row of a point-in-time join,
//! checked against a naive model over every version written (`quiver_testkit::model`), with
//! late writes, corrections, deletes, `known_at`, strict availability and the window's edges.

use std::collections::HashMap;
use std::sync::Arc;

use quiver_proto::v1 as pb;
use quiver_server::features::{Features, ServiceError};
use quiver_server::registry::{Registry, RegistryError};
use quiver_storage::{Db, Options, Value};
use quiver_testkit::model::{window_values, Version};

const MINUTE_US: i64 = 60_000_000;
const WINDOW_US: i64 = 120 * MINUTE_US;

fn ts(us: i64) -> Option<prost_types::Timestamp> {
    Some(quiver_testkit::micros_to_timestamp(us))
}

fn key(id: &str) -> pb::EntityKey {
    pb::EntityKey { parts: vec![pb::KeyPart { kind: Some(pb::key_part::Kind::StringValue(id.into())) }] }
}

fn written(name: &str, t: pb::ValueType) -> pb::FeatureDef {
    pb::FeatureDef { name: name.into(), r#type: t as i32, ..Default::default() }
}

fn aggregate(name: &str, source: &str, function: pb::AggFunction, window_s: i64, n: u32) -> pb::FeatureDef {
    pb::FeatureDef {
        name: name.into(),
        aggregation: Some(pb::Aggregation {
            source: source.into(),
            function: function as i32,
            window: Some(prost_types::Duration { seconds: window_s, nanos: 0 }),
            n,
        }),
        ..Default::default()
    }
}

fn group(features: Vec<pb::FeatureDef>) -> pb::ApplyRegistryRequest {
    pb::ApplyRegistryRequest {
        entity_types: vec![pb::EntityType {
            name: "user".into(),
            join_keys: vec![pb::JoinKey { name: "user_id".into(), r#type: pb::JoinKeyType::String as i32 }],
            description: String::new(),
        }],
        feature_groups: vec![pb::FeatureGroup {
            name: "events".into(),
            entity_type: "user".into(),
            ttl: Some(prost_types::Duration { seconds: 3600, nanos: 0 }),
            features,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The written features and one aggregate of each function over them (2 h windows).
fn registry() -> pb::ApplyRegistryRequest {
    use pb::AggFunction as F;
    let w = WINDOW_US / 1_000_000;
    let mut mean = aggregate("price_mean", "price", F::Mean, w, 0);
    mean.default_value = Some(pb::Value { kind: Some(pb::value::Kind::Float64Value(-1.0)) });
    group(vec![
        written("clicks", pb::ValueType::Int64),
        written("price", pb::ValueType::Float64),
        written("tag", pb::ValueType::String),
        aggregate("clicks_count", "clicks", F::Count, w, 0),
        aggregate("clicks_sum", "clicks", F::Sum, w, 0),
        aggregate("clicks_min", "clicks", F::Min, w, 0),
        aggregate("clicks_max", "clicks", F::Max, w, 0),
        mean,
        aggregate("price_sum", "price", F::Sum, w, 0),
        aggregate("tag_last3", "tag", F::LastN, w, 3),
        aggregate("tag_distinct", "tag", F::CountDistinct, w, 0),
    ])
}

const AGGREGATES: [&str; 8] =
    ["clicks_count", "clicks_sum", "clicks_min", "clicks_max", "price_mean", "price_sum", "tag_last3", "tag_distinct"];

fn setup() -> (tempfile::TempDir, Features, Arc<Db>) {
    let tmp = tempfile::tempdir().expect("tmp");
    let db = Arc::new(Db::open(tmp.path(), Options::default()).expect("db"));
    let reg = Arc::new(Registry::open(db.clone()).expect("registry"));
    reg.apply(&registry()).expect("apply");
    (tmp, Features::new(reg, quiver_storage::Durability::Sync), db)
}

/// Every version written, per (user, source feature).
type Written = HashMap<(usize, &'static str), Vec<Version<Value>>>;

/// What the model says one aggregate answers: (status, event time, value).
fn expected(w: &Written, user: usize, aggregate: &str, as_of: i64, known_at: u64) -> (i32, i64, Option<Value>) {
    let source = match aggregate {
        a if a.starts_with("clicks") => "clicks",
        a if a.starts_with("price") => "price",
        _ => "tag",
    };
    let versions = w.get(&(user, source)).map(Vec::as_slice).unwrap_or_default();
    let values = window_values(versions, as_of, WINDOW_US as u64, known_at);
    let newest = values.last().map_or(0, |(e, _)| *e);
    let ints: Vec<i64> =
        values.iter().filter_map(|(_, v)| if let Value::Int64(i) = v { Some(*i) } else { None }).collect();
    let floats: Vec<f64> =
        values.iter().filter_map(|(_, v)| if let Value::Float64(x) = v { Some(*x) } else { None }).collect();
    let strings: Vec<String> =
        values.iter().filter_map(|(_, v)| if let Value::String(s) = v { Some(s.clone()) } else { None }).collect();
    let present = |v: Value| (pb::FeatureStatus::Present as i32, newest, Some(v));
    let absent = (pb::FeatureStatus::NotFound as i32, 0, None);
    match aggregate {
        "clicks_count" => present(Value::Int64(values.len() as i64)),
        // Small values: the plain sums are exact.
        "clicks_sum" => present(Value::Int64(ints.iter().sum())),
        "clicks_min" => ints.iter().min().map_or(absent.clone(), |&m| present(Value::Int64(m))),
        "clicks_max" => ints.iter().max().map_or(absent.clone(), |&m| present(Value::Int64(m))),
        "price_mean" if floats.is_empty() => (pb::FeatureStatus::Defaulted as i32, 0, Some(Value::Float64(-1.0))),
        "price_mean" => present(Value::Float64(floats.iter().sum::<f64>() / floats.len() as f64)),
        "price_sum" => present(Value::Float64(floats.iter().sum())),
        "tag_last3" => present(Value::StringList(strings[strings.len().saturating_sub(3)..].to_vec())),
        "tag_distinct" => {
            let distinct: std::collections::BTreeSet<&String> = strings.iter().collect();
            present(Value::Int64(distinct.len() as i64))
        }
        other => panic!("no aggregate {other}"),
    }
}

/// One column's answer for row `i` as (status, event time, value).
fn answer(col: &pb::FeatureColumn, i: usize) -> (i32, i64, Option<Value>) {
    let v = quiver_server::convert::column_value(col, i).map(|v| {
        let t = quiver_server::registry::value_type_of(&v).expect("typed");
        quiver_server::convert::to_engine(&v, t, "answer").expect("value")
    });
    let status = col.statuses[i];
    let present = status == pb::FeatureStatus::Present as i32 || status == pb::FeatureStatus::Defaulted as i32;
    (status, col.event_times_us[i], if present { v } else { None })
}

/// HyperLogLog is an estimate: at a few distinct values it is within one of the count.
fn agree(name: &str, got: &(i32, i64, Option<Value>), want: &(i32, i64, Option<Value>)) -> bool {
    match (name, got, want) {
        ("tag_distinct", (s1, e1, Some(Value::Int64(a))), (s2, e2, Some(Value::Int64(b)))) => {
            s1 == s2 && e1 == e2 && (a - b).abs() <= 1
        }
        _ => got == want,
    }
}

#[test]
fn aggregates_online_and_in_joins_match_the_model_through_late_writes_corrections_and_deletes() {
    let (_tmp, f, db) = setup();
    let users = ["ann", "ben", "cat"];
    // Event times on a 10-minute grid around the wall clock, so strict availability (known_at
    // capped at the row's time) sees some writes and not others.
    let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_micros() as i64;
    let base = wall - 4 * 60 * MINUTE_US;
    let mut rng = quiver_testkit::Rng::new(0x05ee_da66);
    let mut w: Written = HashMap::new();
    let mut receipts: Vec<u64> = Vec::new();
    for round in 0..40 {
        let mut rows = Vec::new();
        let mut pending: Vec<(usize, &'static str, i64, Option<Value>)> = Vec::new();
        for _ in 0..1 + rng.below(4) {
            let u = rng.below(users.len() as u64) as usize;
            // Later rounds write old event times too (late data) and hit written ones again
            // (corrections); a quarter of the cells are deletes.
            let e = base + rng.below(36) as i64 * 10 * MINUTE_US;
            let mut r = pb::WriteRow {
                entity: Some(key(users[u])),
                group: "events".into(),
                event_time: ts(e),
                ..Default::default()
            };
            for source in ["clicks", "price", "tag"] {
                if pending.iter().any(|p| p.0 == u && p.1 == source && p.2 == e) || rng.below(3) == 0 {
                    continue;
                }
                let value = match (source, rng.below(4)) {
                    (_, 0) => None,
                    ("clicks", _) => Some(Value::Int64(rng.below(200) as i64 - 100)),
                    ("price", _) => Some(Value::Float64(rng.below(1000) as f64 / 4.0)),
                    _ => Some(Value::String(format!("t{}", rng.below(6)))),
                };
                match &value {
                    Some(v) => {
                        r.values.insert(source.into(), quiver_server::convert::to_api(v));
                    }
                    None => r.deletes.push(source.into()),
                }
                pending.push((u, source, e, value));
            }
            if !r.values.is_empty() || !r.deletes.is_empty() {
                rows.push(r);
            }
        }
        if rows.is_empty() {
            continue;
        }
        let got = f.write(&pb::WriteFeaturesRequest { rows, ..Default::default() }).expect("write");
        let system_time = quiver_server::convert::micros(got.system_time.as_ref().expect("stamp"), "st").expect("st");
        receipts.push(system_time as u64);
        for (u, source, e, value) in pending {
            w.entry((u, source)).or_default().push(Version { event_time: e, system_time: system_time as u64, value });
        }
        if round % 13 == 12 {
            db.flush().expect("flush");
        }
    }
    let refs: Vec<String> = AGGREGATES.iter().map(|a| format!("events:{a}")).collect();
    // The times read: the grid, each event time +-1 us (the window's two edges), and beyond.
    let mut times: Vec<i64> = Vec::new();
    for k in -2..52 {
        let t = base + k * 10 * MINUTE_US;
        times.extend([t - 1, t, t + 1]);
    }

    // Online: everything known, at each time.
    for &t in &times {
        let r = f
            .get_online(
                &pb::GetOnlineFeaturesRequest {
                    entity_type: "user".into(),
                    entities: users.iter().map(|u| key(u)).collect(),
                    features: refs.clone(),
                    as_of: ts(t),
                    ..Default::default()
                },
                wall,
            )
            .expect("online");
        for (j, name) in AGGREGATES.iter().enumerate() {
            assert_eq!(r.columns[j].r#type, registry_type(name) as i32, "{name}");
            for (u, user) in users.iter().enumerate() {
                let (got, want) = (answer(&r.columns[j], u), expected(&w, u, name, t, u64::MAX));
                assert!(agree(name, &got, &want), "online {name} of {user} at {t}: {got:?}, want {want:?}");
            }
        }
    }

    // Joins: a spine over every user and time, pinned to past receipts or not, strict or not;
    // with every aggregate, and with only those of fixed-width types (whose answers a join
    // keeps as fixed-size records, where a list among them sends all to the encoded log).
    let fixed: Vec<&str> = AGGREGATES.iter().copied().filter(|a| !a.starts_with("tag_")).collect();
    let spine: Vec<(usize, i64)> = times.iter().flat_map(|&t| (0..users.len()).map(move |u| (u, t))).collect();
    let mut pins: Vec<Option<u64>> = vec![None];
    pins.extend(receipts.iter().step_by(7).map(|&r| Some(r)));
    for (names, known_at, strict) in [&AGGREGATES[..], &fixed[..]]
        .into_iter()
        .flat_map(|names| pins.iter().flat_map(move |&k| [false, true].map(|s| (names, k, s))))
    {
        let req = pb::GetHistoricalFeaturesRequest {
            entity_type: "user".into(),
            spine: spine.iter().map(|&(u, t)| pb::SpineRow { entity: Some(key(users[u])), timestamp: ts(t) }).collect(),
            features: names.iter().map(|a| format!("events:{a}")).collect(),
            known_at: known_at.and_then(|k| ts(k as i64)),
            strict_availability: strict,
            use_defaults: true,
        };
        let mut rows = 0;
        f.historical(&req, |chunk| {
            for i in 0..chunk.columns[0].statuses.len() {
                let (u, t) = spine[chunk.first_row as usize + i];
                let k = known_at.unwrap_or(u64::MAX);
                let k = if strict { k.min(t.max(0) as u64) } else { k };
                for (j, name) in names.iter().enumerate() {
                    let (got, want) = (answer(&chunk.columns[j], i), expected(&w, u, name, t, k));
                    assert!(
                        agree(name, &got, &want),
                        "join {name} of {} at {t}, known_at {known_at:?}, strict {strict}: {got:?}, want {want:?}",
                        users[u]
                    );
                }
                rows += 1;
            }
            true
        })
        .expect("join");
        assert_eq!(rows, spine.len());
    }
}

fn registry_type(name: &str) -> pb::ValueType {
    match name {
        "price_mean" | "price_sum" => pb::ValueType::Float64,
        "tag_last3" => pb::ValueType::StringList,
        _ => pb::ValueType::Int64,
    }
}

#[test]
fn the_window_holds_its_end_and_not_its_start_to_the_microsecond() {
    let (_tmp, f, _db) = setup();
    let e = 1_800_000_000_000_000;
    let r = pb::WriteRow {
        entity: Some(key("ann")),
        group: "events".into(),
        event_time: ts(e),
        values: [("clicks".to_string(), pb::Value { kind: Some(pb::value::Kind::Int64Value(5)) })].into(),
        ..Default::default()
    };
    f.write(&pb::WriteFeaturesRequest { rows: vec![r], ..Default::default() }).expect("write");
    let count = |t: i64| {
        let req = pb::GetOnlineFeaturesRequest {
            entity_type: "user".into(),
            entities: vec![key("ann")],
            features: vec!["events:clicks_count".into(), "events:clicks_min".into()],
            as_of: ts(t),
            ..Default::default()
        };
        let r = f.get_online(&req, e).expect("online");
        (r.columns[0].int64_values[0], r.columns[1].statuses[0])
    };
    let (present, not_found) = (pb::FeatureStatus::Present as i32, pb::FeatureStatus::NotFound as i32);
    assert_eq!(count(e - 1), (0, not_found), "before the event");
    assert_eq!(count(e), (1, present), "the window's end is inclusive");
    assert_eq!(count(e + WINDOW_US - 1), (1, present), "the last microsecond of the window");
    assert_eq!(count(e + WINDOW_US), (0, not_found), "the window's start is exclusive");
}

#[test]
fn an_int64_sum_past_int64_answers_overflow_and_aggregates_take_no_writes() {
    let (_tmp, f, db) = setup();
    let e = 1_800_000_000_000_000;
    let write = |at: i64, name: &str, v: i64| {
        let r = pb::WriteRow {
            entity: Some(key("ann")),
            group: "events".into(),
            event_time: ts(at),
            values: [(name.to_string(), pb::Value { kind: Some(pb::value::Kind::Int64Value(v)) })].into(),
            ..Default::default()
        };
        f.write(&pb::WriteFeaturesRequest { rows: vec![r], ..Default::default() })
    };
    write(e, "clicks", i64::MAX).expect("write");
    write(e + 1, "clicks", 1).expect("write");
    let sum = |t: i64| {
        let req = pb::GetOnlineFeaturesRequest {
            entity_type: "user".into(),
            entities: vec![key("ann")],
            features: vec!["events:clicks_sum".into()],
            as_of: ts(t),
            ..Default::default()
        };
        let r = f.get_online(&req, e).expect("online");
        (r.columns[0].statuses[0], r.columns[0].int64_values[0])
    };
    assert_eq!(sum(e), (pb::FeatureStatus::Present as i32, i64::MAX));
    assert_eq!(sum(e + 1), (pb::FeatureStatus::Overflow as i32, 0));
    // A value that brings it back into range answers again: the sum is exact (i128) inside.
    write(e + 2, "clicks", -5).expect("write");
    assert_eq!(sum(e + 2), (pb::FeatureStatus::Present as i32, i64::MAX - 4));

    let before = db.stats().last_seqno;
    match write(e, "clicks_sum", 1) {
        Err(ServiceError::Invalid(m)) => {
            assert!(m.contains("aggregate of clicks") && m.contains("write clicks"), "{m}")
        }
        other => panic!("a write to an aggregate: {other:?}"),
    }
    assert_eq!(db.stats().last_seqno, before, "a refused write changes nothing");
}

#[test]
fn bad_aggregate_definitions_are_refused_with_the_reason() {
    use pb::AggFunction as F;
    let tmp = tempfile::tempdir().expect("tmp");
    let db = Arc::new(Db::open(tmp.path(), Options::default()).expect("db"));
    let reg = Registry::open(db).expect("registry");
    let base = || vec![written("clicks", pb::ValueType::Int64), written("tag", pb::ValueType::String)];
    let with = |f: pb::FeatureDef| {
        let mut features = base();
        features.push(f);
        group(features)
    };
    let cases: Vec<(pb::FeatureDef, &str)> = vec![
        (aggregate("a", "nope", F::Sum, 60, 0), "not another feature"),
        (aggregate("a", "a", F::Sum, 60, 0), "not another feature"),
        (aggregate("a", "clicks", F::Unspecified, 60, 0), "needs a function"),
        (aggregate("a", "tag", F::Sum, 60, 0), "int64, float32 or float64"),
        (aggregate("a", "tag", F::Mean, 60, 0), "int64, float32 or float64"),
        (aggregate("a", "clicks", F::Sum, 0, 0), "whole seconds"),
        (aggregate("a", "clicks", F::Sum, 366 * 86_400 + 1, 0), "whole seconds"),
        (aggregate("a", "clicks", F::LastN, 60, 0), "last_n keeps 1 to 1000"),
        (aggregate("a", "clicks", F::LastN, 60, 1001), "last_n keeps 1 to 1000"),
        (aggregate("a", "clicks", F::Count, 60, 3), "n is for last_n"),
        (
            pb::FeatureDef { r#type: pb::ValueType::Float64 as i32, ..aggregate("a", "clicks", F::Sum, 60, 0) },
            "answers Int64",
        ),
        (pb::FeatureDef { dim: 2, ..aggregate("a", "clicks", F::Count, 60, 0) }, "no dim"),
    ];
    for (f, why) in cases {
        match reg.apply(&with(f.clone())) {
            Err(RegistryError::Invalid(m)) => assert!(m.contains(why), "{f:?}: {m}"),
            other => panic!("{f:?}: {other:?}"),
        }
    }
    let mut half_window = aggregate("a", "clicks", F::Sum, 60, 0);
    half_window.aggregation.as_mut().and_then(|a| a.window.as_mut()).expect("window").nanos = 500_000_000;
    assert!(matches!(reg.apply(&with(half_window)), Err(RegistryError::Invalid(_))));
    // An aggregate of an aggregate.
    let mut features = base();
    features.push(aggregate("a", "clicks", F::Sum, 60, 0));
    features.push(aggregate("b", "a", F::Sum, 60, 0));
    match reg.apply(&group(features)) {
        Err(RegistryError::Invalid(m)) => assert!(m.contains("is an aggregate"), "{m}"),
        other => panic!("an aggregate of an aggregate: {other:?}"),
    }
    assert!(reg.groups().is_empty(), "nothing was applied");

    // A good one gets its type from its function and source, and applying it again is a no-op.
    let good = with(aggregate("a", "tag", F::LastN, 60, 5));
    reg.apply(&good).expect("apply");
    let again = reg.apply(&good).expect("apply again");
    assert_eq!(again.iter().filter(|c| c.kind() == pb::registry_change::Kind::Unchanged).count(), 2);
    let a = reg.resolve("events:a").expect("resolve");
    assert_eq!(a.value_type, pb::ValueType::StringList);
    assert_eq!(a.id, reg.resolve("events:tag").expect("tag").id, "an aggregate reads its source's data");
}

/// Aggregates have no data of their own: a scan naming one is refused with its source, and a
/// release gate checks each written feature against its own definition even when aggregates
/// sit between them (a bug the review found: the gate paired written features with the
/// definitions of the group's features in order, aggregates included).
#[test]
fn scans_refuse_aggregates_and_gates_check_written_features_by_their_own_definitions() {
    use pb::AggFunction as F;
    let (_tmp, f, db) = setup();
    let scan = pb::ScanHistoryRequest {
        entity_type: "user".into(),
        entity: Some(key("ann")),
        features: vec!["events:clicks".into(), "events:clicks_sum".into()],
        ..Default::default()
    };
    match f.scan_history(&scan, |_| true) {
        Err(ServiceError::Invalid(m)) => assert!(m.contains("aggregate of clicks") && m.contains("scan clicks"), "{m}"),
        other => panic!("a scan naming an aggregate: {other:?}"),
    }

    let reg = f.registry();
    let with_bound = |rate: f64| {
        let mut price = written("price", pb::ValueType::Float64);
        price.max_null_rate = Some(rate);
        let mut g = group(vec![
            written("clicks", pb::ValueType::Int64),
            aggregate("clicks_sum", "clicks", F::Sum, 60, 0),
            price,
        ]);
        g.feature_groups[0].name = "gated".into();
        g
    };
    reg.apply(&with_bound(0.5)).expect("v1");
    let mut v2 = with_bound(0.25);
    v2.feature_groups[0].code_hash = "v2".into();
    reg.apply(&v2).expect("v2");
    let report = quiver_server::gate::check(&db, reg, "gated", 2, |_| None).expect("gate");
    let checked: Vec<(&str, Option<f64>)> =
        report.features.iter().map(|g| (g.feature.as_str(), g.max_null_rate)).collect();
    assert_eq!(checked, [("clicks", None), ("price", Some(0.25))]);
}
