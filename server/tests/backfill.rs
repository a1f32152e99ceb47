//! `CopyFeatureHistory` (server/src/backfill.rs) against the read rule: after a copy, every
//! `value_at` of the target version answers what the source answered, corrections and
//! tombstones included; a copy stopped after any batch and resumed at its `next_entity` writes
//! each cell once; refusals change nothing.

use std::sync::Arc;

use quiver_proto::v1 as pb;
use quiver_server::backfill::{copy_history, COPY_BATCH_CELLS};
use quiver_server::features::ServiceError;
use quiver_server::registry::Registry;
use quiver_storage::{AsOf, Db, Durability, EventTime, FeatureId, Options, ScanRange, Value, WriteBatch};

fn group(code: &str) -> pb::FeatureGroup {
    let feature =
        |name: &str, t: pb::ValueType| pb::FeatureDef { name: name.into(), r#type: t as i32, ..Default::default() };
    pb::FeatureGroup {
        name: "user_stats".into(),
        entity_type: "user".into(),
        code_hash: code.into(),
        features: vec![feature("clicks", pb::ValueType::Int64), feature("spend", pb::ValueType::Float64)],
        ..Default::default()
    }
}

fn setup() -> (tempfile::TempDir, Arc<Db>, Registry) {
    let tmp = tempfile::tempdir().expect("tmp");
    let db = Arc::new(Db::open(tmp.path(), Options::default()).expect("db"));
    let reg = Registry::open(db.clone()).expect("registry");
    reg.apply(&pb::ApplyRegistryRequest {
        entity_types: vec![pb::EntityType {
            name: "user".into(),
            join_keys: vec![pb::JoinKey { name: "user_id".into(), r#type: pb::JoinKeyType::String as i32 }],
            description: String::new(),
        }],
        feature_groups: vec![group("a")],
        ..Default::default()
    })
    .expect("v1");
    reg.apply(&pb::ApplyRegistryRequest { feature_groups: vec![group("b")], ..Default::default() }).expect("v2");
    (tmp, db, reg)
}

fn id(reg: &Registry, r: &str) -> FeatureId {
    reg.resolve(r).expect("resolve").id
}

fn entity(i: u32) -> Vec<u8> {
    quiver_storage::encode_entity_key(&[quiver_storage::KeyPart::Str(&format!("u{i:04}"))])
}

/// Versions of `feature` of `entity`, newest first, as (event time, value).
fn history(db: &Db, e: &[u8], feature: FeatureId) -> Vec<(i64, Option<Value>)> {
    let mut r = ScanRange::entity(e);
    r.features = Some((feature, feature));
    db.scan(r).expect("scan").map(|i| i.expect("item")).map(|i| (i.version.event_time.0, i.version.value)).collect()
}

const ENTITIES: u32 = 400;
const EVENTS: i64 = 30;

/// v1's history: per entity and event, clicks and spend; every 7th event corrected by a second
/// write, every 11th clicks deleted later.
fn write_v1(db: &Db, reg: &Registry) {
    let (clicks, spend) = (id(reg, "user_stats@1:clicks"), id(reg, "user_stats@1:spend"));
    for pass in 0..2 {
        let mut b = WriteBatch::new();
        for i in 0..ENTITIES {
            for t in 0..EVENTS {
                let e = EventTime(1_000 + t * 10);
                match pass {
                    0 => {
                        b.put(&entity(i), clicks, e, Value::Int64(i64::from(i) * 100 + t)).expect("put");
                        b.put(&entity(i), spend, e, Value::Float64(f64::from(i) + t as f64 / 8.0)).expect("put");
                    }
                    _ if t % 7 == 0 => b.put(&entity(i), clicks, e, Value::Int64(-t)).expect("correct"),
                    _ if t % 11 == 0 => b.delete(&entity(i), clicks, e).expect("delete"),
                    _ => {}
                }
            }
        }
        db.write(b, Durability::Sync).expect("write");
    }
}

fn assert_same_answers(db: &Db, reg: &Registry, feature: &str) {
    let (from, to) = (id(reg, &format!("user_stats@1:{feature}")), id(reg, &format!("user_stats@2:{feature}")));
    for i in 0..ENTITIES {
        for t in [0, 999, 1_000, 1_005, 1_070, 1_110, 1_290, 5_000] {
            let q = AsOf::at(EventTime(t));
            let a = db.value_at(&entity(i), from, q).expect("read");
            let b = db.value_at(&entity(i), to, q).expect("read");
            assert_eq!(a.map(|v| (v.event_time, v.value)), b.map(|v| (v.event_time, v.value)), "u{i} {feature} at {t}");
        }
        // One version per event time: the winner, never two copies.
        let h = history(db, &entity(i), to);
        let mut times: Vec<i64> = h.iter().map(|v| v.0).collect();
        times.dedup();
        assert_eq!(times.len(), h.len(), "u{i} {feature}: a cell copied twice");
        assert_eq!(h.len() as i64, EVENTS, "u{i} {feature}");
    }
}

#[test]
fn a_copy_answers_as_the_source_and_resumes_after_any_batch() {
    let (_tmp, db, reg) = setup();
    write_v1(&db, &reg);
    let req = |features: Vec<&str>, start: Vec<u8>| pb::CopyFeatureHistoryRequest {
        group: "user_stats".into(),
        from_version: 1,
        to_version: 2,
        features: features.into_iter().map(String::from).collect(),
        start_entity: start,
    };

    // Stop after the first batch, then resume from what it said.
    let mut first = None;
    copy_history(&db, &reg, &req(vec![], vec![]), None, |p| {
        first = Some(p);
        false
    })
    .expect("copy");
    let first = first.expect("a progress message");
    assert_eq!(first.copying, vec!["clicks".to_string(), "spend".to_string()]);
    assert!(!first.done && first.cells_copied >= COPY_BATCH_CELLS as u64, "{first:?}");
    let mut last = None;
    let mut messages = 0;
    copy_history(&db, &reg, &req(vec![], first.next_entity.clone()), None, |p| {
        messages += 1;
        last = Some(p);
        true
    })
    .expect("resume");
    let last = last.expect("progress");
    assert!(last.done && messages > 1, "{last:?}");
    assert_eq!(first.cells_copied + last.cells_copied, u64::from(ENTITIES) * EVENTS as u64 * 2);
    assert_same_answers(&db, &reg, "clicks");
    assert_same_answers(&db, &reg, "spend");
}

#[test]
fn refusals_change_nothing() {
    let (_tmp, db, reg) = setup();
    write_v1(&db, &reg);
    let to = id(&reg, "user_stats@2:clicks");
    let call = |from: u32, to: u32, features: Vec<&str>| {
        let req = pb::CopyFeatureHistoryRequest {
            group: "user_stats".into(),
            from_version: from,
            to_version: to,
            features: features.into_iter().map(String::from).collect(),
            start_entity: vec![],
        };
        copy_history(&db, &reg, &req, None, |_| true)
    };
    assert!(matches!(call(2, 1, vec![]), Err(ServiceError::Refused(_))), "v1 serves");
    assert!(matches!(call(1, 1, vec![]), Err(ServiceError::Invalid(_))));
    assert!(matches!(call(1, 0, vec![]), Err(ServiceError::Invalid(_))));
    assert!(matches!(call(1, 3, vec![]), Err(ServiceError::NotFound(_))));
    assert!(matches!(call(1, 2, vec!["nope"]), Err(ServiceError::NotFound(_))));
    assert!(matches!(call(1, 2, vec!["spend", "spend"]), Err(ServiceError::Invalid(_))));
    assert!(history(&db, &entity(0), to).is_empty(), "nothing was written");

    // A target whose data the serving version shares: v2 serves, v4 keeps v2's ids.
    {
        let tmp = tempfile::tempdir().expect("tmp");
        let db = Arc::new(Db::open(tmp.path(), Options::default()).expect("db"));
        let reg = Registry::open(db.clone()).expect("registry");
        let base = pb::ApplyRegistryRequest {
            entity_types: vec![pb::EntityType {
                name: "user".into(),
                join_keys: vec![pb::JoinKey { name: "user_id".into(), r#type: pb::JoinKeyType::String as i32 }],
                description: String::new(),
            }],
            feature_groups: vec![group("a")],
            ..Default::default()
        };
        reg.apply(&base).expect("v1");
        reg.apply(&pb::ApplyRegistryRequest { feature_groups: vec![group("b")], promote: true, ..Default::default() })
            .expect("v2 serving");
        let mut v3 = group("b");
        v3.description = "shares v2".into();
        reg.apply(&pb::ApplyRegistryRequest { feature_groups: vec![v3], ..Default::default() }).expect("v3");
        write_v1(&db, &reg);
        let req = pb::CopyFeatureHistoryRequest {
            group: "user_stats".into(),
            from_version: 1,
            to_version: 3,
            features: vec![],
            start_entity: vec![],
        };
        let r = copy_history(&db, &reg, &req, None, |_| true);
        assert!(matches!(&r, Err(ServiceError::Refused(m)) if m.contains("serving version v2")), "{r:?}");
        assert!(history(&db, &entity(0), id(&reg, "user_stats@2:clicks")).is_empty(), "nothing was written");
    }

    // A feature whose data the versions share is reported, not copied.
    let mut v3 = group("b");
    v3.description = "metadata only".into();
    reg.apply(&pb::ApplyRegistryRequest { feature_groups: vec![v3], ..Default::default() }).expect("v3");
    let mut out = Vec::new();
    let req = pb::CopyFeatureHistoryRequest {
        group: "user_stats".into(),
        from_version: 2,
        to_version: 3,
        features: vec![],
        start_entity: vec![],
    };
    copy_history(&db, &reg, &req, None, |p| {
        out.push(p);
        true
    })
    .expect("copy");
    assert_eq!(out.len(), 1);
    assert!(out[0].done && out[0].copying.is_empty() && out[0].cells_copied == 0);
    assert_eq!(out[0].already_shared, vec!["clicks".to_string(), "spend".to_string()]);
}
