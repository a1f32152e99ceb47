//! Feature service logic: online statuses, writes, idempotency, compare-and-swap, bad input.

use std::sync::Arc;

use quiver_proto::v1 as pb;
use quiver_server::features::{Features, ServiceError};
use quiver_server::registry::Registry;
use quiver_storage::{Db, Options};

const HOUR_US: i64 = 3_600_000_000;
const T0: i64 = 1_767_225_600_000_000;

fn ts(us: i64) -> Option<prost_types::Timestamp> {
    Some(quiver_testkit::micros_to_timestamp(us))
}

fn key(id: &str) -> pb::EntityKey {
    pb::EntityKey { parts: vec![pb::KeyPart { kind: Some(pb::key_part::Kind::StringValue(id.into())) }] }
}

fn int(v: i64) -> pb::Value {
    pb::Value { kind: Some(pb::value::Kind::Int64Value(v)) }
}

fn f64v(v: f64) -> pb::Value {
    pb::Value { kind: Some(pb::value::Kind::Float64Value(v)) }
}

fn setup() -> (tempfile::TempDir, Features, Arc<Db>) {
    let tmp = tempfile::tempdir().expect("tmp");
    let db = Arc::new(Db::open(tmp.path(), Options::default()).expect("db"));
    let reg = Arc::new(Registry::open(db.clone()).expect("registry"));
    let feature = |name: &str, t: pb::ValueType, default: Option<pb::Value>| pb::FeatureDef {
        name: name.into(),
        r#type: t as i32,
        default_value: default,
        description: String::new(),
        ..Default::default()
    };
    reg.apply(&pb::ApplyRegistryRequest {
        entity_types: vec![pb::EntityType {
            name: "user".into(),
            join_keys: vec![pb::JoinKey { name: "user_id".into(), r#type: pb::JoinKeyType::String as i32 }],
            description: String::new(),
        }],
        feature_groups: vec![pb::FeatureGroup {
            name: "user_stats".into(),
            entity_type: "user".into(),
            ttl: Some(prost_types::Duration { seconds: 3600, nanos: 0 }),
            features: vec![
                feature("clicks", pb::ValueType::Int64, None),
                feature("spend", pb::ValueType::Float64, Some(f64v(-1.0))),
            ],
            ..Default::default()
        }],
        dry_run: false,
        promote: false,
    })
    .expect("apply");
    (tmp, Features::new(reg, quiver_storage::Durability::Sync), db)
}

fn row(user: &str, at: i64, values: Vec<(&str, pb::Value)>) -> pb::WriteRow {
    pb::WriteRow {
        entity: Some(key(user)),
        group: "user_stats".into(),
        event_time: ts(at),
        values: values.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        ..Default::default()
    }
}

fn write(f: &Features, rows: Vec<pb::WriteRow>) -> Result<pb::WriteFeaturesResponse, ServiceError> {
    f.write(&pb::WriteFeaturesRequest { rows, ..Default::default() })
}

fn online(f: &Features, users: &[&str], as_of: i64) -> pb::GetOnlineFeaturesResponse {
    f.get_online(
        &pb::GetOnlineFeaturesRequest {
            entity_type: "user".into(),
            entities: users.iter().map(|u| key(u)).collect(),
            features: vec!["user_stats:clicks".into(), "user_stats:spend".into()],
            as_of: ts(as_of),
            ..Default::default()
        },
        0,
    )
    .expect("online")
}

#[test]
fn online_statuses_present_not_found_stale_defaulted() {
    use pb::FeatureStatus::*;
    let (_tmp, f, _db) = setup();
    write(
        &f,
        vec![
            row("alice", T0, vec![("clicks", int(5)), ("spend", f64v(2.5))]),
            row("bob", T0 - 3 * HOUR_US, vec![("clicks", int(9))]),
        ],
    )
    .expect("write");
    let r = online(&f, &["alice", "bob", "carol"], T0 + 10);
    let (clicks, spend) = (&r.columns[0], &r.columns[1]);
    assert_eq!(clicks.statuses, vec![Present as i32, Stale as i32, NotFound as i32]);
    assert_eq!(clicks.int64_values, vec![5, 0, 0]);
    assert_eq!(clicks.event_times_us, vec![T0, 0, 0]);
    assert_eq!(spend.statuses, vec![Present as i32, Defaulted as i32, Defaulted as i32]);
    assert_eq!(spend.float64_values, vec![2.5, -1.0, -1.0]);
    // The TTL bound is inclusive: exactly one hour after the event is still present.
    let r = online(&f, &["alice"], T0 + HOUR_US);
    assert_eq!(r.columns[0].statuses, vec![Present as i32]);
    let r = online(&f, &["alice"], T0 + HOUR_US + 1);
    assert_eq!(r.columns[0].statuses, vec![Stale as i32]);
    // Before the event, nothing is visible (no leakage from the future).
    let r = online(&f, &["alice"], T0 - 1);
    assert_eq!(r.columns[0].statuses, vec![NotFound as i32]);
}

#[test]
fn idempotent_retry_applies_once() {
    let (_tmp, f, db) = setup();
    let req = pb::WriteFeaturesRequest {
        rows: vec![row("alice", T0, vec![("clicks", int(1))])],
        idempotency_key: "load-2026-01-01-part-7".into(),
        ..Default::default()
    };
    let first = f.write(&req).expect("first");
    let seq = db.stats().last_seqno;
    let again = f.write(&req).expect("retry");
    assert!(again.deduplicated && !first.deduplicated);
    assert_eq!((again.values_written, again.system_time), (first.values_written, first.system_time));
    assert_eq!(db.stats().last_seqno, seq, "the retry wrote nothing");
}

#[test]
fn compare_and_swap_aborts_with_the_current_version() {
    let (_tmp, f, _db) = setup();
    let cas = |expected: pb::VersionVector, v: i64| {
        let mut r = row("alice", T0, vec![("clicks", int(v))]);
        r.expected_versions.insert("clicks".into(), expected);
        write(&f, vec![r])
    };
    cas(pb::VersionVector::default(), 1).expect("absent cell: empty expectation matches");
    let current = match cas(pb::VersionVector::default(), 2) {
        Err(ServiceError::Aborted { current, .. }) => current,
        other => panic!("expected ABORTED, got {other:?}"),
    };
    assert_eq!(current.len(), 1);
    assert_eq!(current[0].0, "user_stats:clicks");
    cas(current[0].1.clone(), 3).expect("matching version");
    let r = online(&f, &["alice"], T0);
    assert_eq!(r.columns[0].int64_values, vec![3]);
}

#[test]
fn bad_writes_fail_clearly_and_change_nothing() {
    let (_tmp, f, db) = setup();
    let seq = db.stats().last_seqno;
    let mut wrong_parts = row("alice", T0, vec![("clicks", int(1))]);
    wrong_parts.entity = Some(pb::EntityKey { parts: vec![] });
    let mut sub_us = row("alice", T0, vec![("clicks", int(1))]);
    sub_us.event_time = Some(prost_types::Timestamp { seconds: 1, nanos: 1 });
    let mut unknown_group = row("alice", T0, vec![("clicks", int(1))]);
    unknown_group.group = "nope".into();
    let cases: Vec<(Vec<pb::WriteRow>, &str)> = vec![
        (vec![], "invalid"),
        (vec![row("alice", T0, vec![("clicks", f64v(1.0))])], "invalid"),
        (vec![row("alice", T0, vec![("nope", int(1))])], "not found"),
        (vec![unknown_group], "not found"),
        (vec![wrong_parts], "invalid"),
        (vec![sub_us], "invalid"),
        (vec![row("alice", T0, vec![])], "invalid"),
        // A valid row followed by a bad one: the whole request is refused.
        (vec![row("alice", T0, vec![("clicks", int(1))]), row("bob", T0, vec![("clicks", f64v(1.0))])], "invalid"),
        (vec![row("alice", T0, vec![("clicks", int(1))]); quiver_server::features::WRITE_ROWS_MAX + 1], "too large"),
    ];
    for (rows, want) in cases {
        let n = rows.len();
        let got = match write(&f, rows) {
            Err(ServiceError::Invalid(_)) => "invalid",
            Err(ServiceError::NotFound(_)) => "not found",
            Err(ServiceError::TooLarge(_)) => "too large",
            other => panic!("{n} rows: unexpected {other:?}"),
        };
        assert_eq!(got, want);
    }
    assert_eq!(db.stats().last_seqno, seq, "nothing was written");
    let err = f
        .get_online(
            &pb::GetOnlineFeaturesRequest {
                entity_type: "user".into(),
                entities: vec![key("alice")],
                features: vec!["user_stats:nope".into()],
                as_of: None,
                ..Default::default()
            },
            T0,
        )
        .expect_err("unknown feature");
    assert!(matches!(err, ServiceError::NotFound(_)), "{err:?}");
}

/// Lookups resolve their feature lists through a cache; an apply must be seen by the very next
/// lookup (here: a new version with another default, promoted as it is applied, served for a
/// missing value).
#[test]
fn a_new_group_version_is_served_by_the_next_lookup() {
    let tmp = tempfile::tempdir().expect("tmp");
    let db = Arc::new(Db::open(tmp.path(), Options::default()).expect("db"));
    let reg = Arc::new(Registry::open(db.clone()).expect("registry"));
    let group = |default: f64| pb::ApplyRegistryRequest {
        entity_types: vec![pb::EntityType {
            name: "user".into(),
            join_keys: vec![pb::JoinKey { name: "user_id".into(), r#type: pb::JoinKeyType::String as i32 }],
            description: String::new(),
        }],
        feature_groups: vec![pb::FeatureGroup {
            name: "user_stats".into(),
            entity_type: "user".into(),
            features: vec![pb::FeatureDef {
                name: "spend".into(),
                r#type: pb::ValueType::Float64 as i32,
                default_value: Some(f64v(default)),
                description: String::new(),
                ..Default::default()
            }],
            ..Default::default()
        }],
        dry_run: false,
        promote: true,
    };
    reg.apply(&group(-1.0)).expect("apply v1");
    let f = Features::new(reg.clone(), quiver_storage::Durability::Sync);
    let lookup = || {
        f.get_online(
            &pb::GetOnlineFeaturesRequest {
                entity_type: "user".into(),
                entities: vec![key("nobody")],
                features: vec!["user_stats:spend".into()],
                as_of: ts(T0),
                ..Default::default()
            },
            0,
        )
        .expect("online")
    };
    for _ in 0..2 {
        let r = lookup();
        assert_eq!((r.columns[0].group_version, r.columns[0].float64_values.clone()), (1, vec![-1.0]));
    }
    reg.apply(&group(-2.0)).expect("apply v2");
    let r = lookup();
    assert_eq!((r.columns[0].group_version, r.columns[0].float64_values.clone()), (2, vec![-2.0]));
}

/// The sort-merge join (spine sorted by entity, answers kept in that order and streamed in
/// spine order) answers every spine row as the online path answers a lookup at the row's
/// time, whether its answers are fixed-size records in memory (numbers within the memory
/// share) or an encoded log in memory or spilled to a temporary file past a bound.
#[test]
fn the_join_agrees_with_point_reads_across_window_boundaries() {
    let (_tmp, f, db) = setup();
    // Short keys, and long ones whose first 16 bytes are equal (the join sorts by those and
    // compares whole keys only to break their ties).
    let users = ["ann", "ben", "cat", "dan", "eve", "customer-0000000000002", "customer-0000000000001", "customer-000"];
    let mut rng = quiver_testkit::Rng::new(0x2545_f491);
    let mut next = |n: u64| rng.below(n);
    for round in 0..6 {
        let mut rows = Vec::new();
        for u in users {
            if next(3) > 0 {
                let at = T0 + next(6) as i64 * HOUR_US / 2;
                rows.push(row(
                    u,
                    at,
                    vec![("clicks", int(round * 10 + next(9) as i64)), ("spend", f64v(next(100) as f64))],
                ));
            }
        }
        if !rows.is_empty() {
            write(&f, rows).expect("write");
        }
        if round == 3 {
            db.flush().expect("flush");
        }
    }
    // Over two chunks of HISTORICAL_CHUNK_ROWS, so parallel chunk building must keep the order,
    // and long enough to be checked and sorted in parts by several threads.
    let rows =
        (2 * quiver_server::features::HISTORICAL_CHUNK_ROWS).max(quiver_server::features::SPINE_ROWS_PER_PART_MIN) + 40;
    let spine: Vec<(usize, i64)> =
        (0..rows).map(|_| (next(users.len() as u64) as usize, T0 - HOUR_US + next(9) as i64 * HOUR_US / 2)).collect();
    let req = pb::GetHistoricalFeaturesRequest {
        entity_type: "user".into(),
        spine: spine.iter().map(|&(u, t)| pb::SpineRow { entity: Some(key(users[u])), timestamp: ts(t) }).collect(),
        features: vec!["user_stats:clicks".into(), "user_stats:spend".into()],
        use_defaults: true,
        ..Default::default()
    };
    // The spine repeats a few (user, time) pairs: each is read once.
    let mut reads = std::collections::HashMap::new();
    let want: Vec<(Vec<i32>, Vec<i64>, Vec<f64>)> = spine
        .iter()
        .map(|&(u, t)| {
            reads
                .entry((u, t))
                .or_insert_with(|| {
                    let r = online(&f, &[users[u]], t);
                    (
                        r.columns.iter().map(|c| c.statuses[0]).collect(),
                        r.columns[0].int64_values.clone(),
                        r.columns[1].float64_values.clone(),
                    )
                })
                .clone()
        })
        .collect();
    for (spill, threads) in [(1, 1), (7, 2), (64, 3), (1 << 20, 1), (1 << 20, 4), (64 << 20, 1)] {
        let f = Features::new(f.registry().clone(), quiver_storage::Durability::Sync)
            .with_join_spill_bytes(spill)
            .with_join_threads(threads);
        let mut got: Vec<(Vec<i32>, Vec<i64>, Vec<f64>)> = Vec::new();
        f.historical(&req, |chunk| {
            assert_eq!(chunk.first_row as usize, got.len(), "chunks in spine order");
            for i in 0..chunk.columns[0].statuses.len() {
                got.push((
                    chunk.columns.iter().map(|c| c.statuses[i]).collect(),
                    vec![chunk.columns[0].int64_values[i]],
                    vec![chunk.columns[1].float64_values[i]],
                ));
            }
            true
        })
        .expect("join");
        assert_eq!(got, want, "answers spilling past {spill} bytes, read by {threads} threads");
        // A client that goes away after the first chunk stops the join, and nothing hangs.
        let mut chunks = 0;
        f.historical(&req, |_| {
            chunks += 1;
            false
        })
        .expect("join stopped early");
        assert_eq!(chunks, 1);
        // Bad rows: the first is reported, whichever part of the spine it is checked in.
        for bad in [[rows - 3, rows - 2], [5, rows - 2]] {
            let mut r = req.clone();
            for &i in &bad {
                r.spine[i].entity = None;
            }
            match f.historical(&r, |_| panic!("nothing streams before the spine is checked")) {
                Err(ServiceError::Invalid(m)) => {
                    assert!(m.starts_with(&format!("spine row {}: entity is required", bad[0])), "{m}")
                }
                other => panic!("bad spine rows {bad:?}: {other:?}"),
            }
        }
    }
}

/// The one user cell of the engine: (entity, feature, event time, its current version).
fn only_user_cell(db: &Db) -> (Vec<u8>, quiver_storage::FeatureId, quiver_storage::CellVersion) {
    db.scan(quiver_storage::ScanRange::all())
        .expect("scan")
        .map(|item| item.expect("item"))
        .find(|item| !quiver_storage::reserved::is_reserved(&item.entity))
        .map(|item| (item.entity, item.feature, item.version))
        .expect("a user cell")
}

/// Runs `action` once, in the first write after the service prepared it and before the engine
/// commits it; the flag tells whether it ran.
fn before_next_commit(f: &Features, action: impl FnOnce() + Send + 'static) -> Arc<std::sync::atomic::AtomicBool> {
    let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let action = parking_lot::Mutex::new(Some(Box::new(action) as Box<dyn FnOnce() + Send>));
    let flag = ran.clone();
    f.set_before_commit(Some(quiver_server::features::TestHook(Box::new(move || {
        // Taken out of the lock first: the action may write through the service itself.
        let once = action.lock().take();
        if let Some(a) = once {
            a();
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }))));
    ran
}

/// Issue 11's lost update: a peer's version of the cell lands between the service's
/// preparation of a compare-and-swap and its commit. The CAS expected the version before it,
/// so it must fail, and the peer's version must stay the current one.
#[test]
fn a_replicated_version_landing_before_the_commit_fails_the_cas() {
    use std::sync::atomic::Ordering;
    let (_tmp, f, db) = setup();
    let cas = |f: &Features, expected: pb::VersionVector, v: i64| {
        let mut r = row("alice", T0, vec![("clicks", int(v))]);
        r.expected_versions.insert("clicks".into(), expected);
        write(f, vec![r])
    };
    cas(&f, pb::VersionVector::default(), 1).expect("first CAS on an absent cell");
    let (entity, feature, v0) = only_user_cell(&db);
    let expected = quiver_server::convert::vector_to_proto(&v0.version_vector);
    // Region 2 wrote over v0 (its vector includes v0's) and ships it.
    let peer_stamp = v0.system_time.0 + 1_000;
    let peer_vector = v0.version_vector.merge(&quiver_storage::VersionVector::single(2, peer_stamp));
    let mut peer_cell = Vec::new();
    quiver_storage::cell::encode(Some(&quiver_storage::Value::Int64(99)), &peer_vector, &mut peer_cell);
    let shipped = quiver_storage::ShippedBatch {
        origin: 2,
        seqno: 1,
        system_time: quiver_storage::SystemTime(peer_stamp),
        ops: vec![quiver_storage::ShippedOp { entity, feature, event_time: v0.event_time, cell: peer_cell }],
    };
    let peer = db.clone();
    let applied = before_next_commit(&f, move || {
        let r = peer.apply_replicated(&shipped, quiver_storage::Durability::Sync).expect("apply");
        assert_eq!(r.applied, 1, "the peer's version dominates v0: {r:?}");
    });
    let outcome = cas(&f, expected, 3);
    f.set_before_commit(None);
    assert!(applied.load(Ordering::SeqCst), "the hook ran");
    match outcome {
        Err(ServiceError::Aborted { current, .. }) => {
            assert_eq!(current.len(), 1);
            assert_eq!(current[0].1, quiver_server::convert::vector_to_proto(&peer_vector));
        }
        other => panic!("the CAS expected v0 but the peer's version was current: want ABORTED, got {other:?}"),
    }
    let r = online(&f, &["alice"], T0);
    assert_eq!(r.columns[0].int64_values, vec![99], "the peer's version stays current");
}

/// Two requests with one idempotency key race past the record look-up: the engine writes the
/// record only while it is absent, so exactly one applies and the other replays its answer. The
/// key sent with another request is refused.
#[test]
fn racing_requests_with_one_idempotency_key_apply_once() {
    let (_tmp, f, db) = setup();
    let f = Arc::new(f);
    let req = |v: i64| pb::WriteFeaturesRequest {
        rows: vec![row("alice", T0, vec![("clicks", int(v))])],
        idempotency_key: "batch-42".into(),
        ..Default::default()
    };
    let inner = Arc::new(parking_lot::Mutex::new(None));
    {
        let (f2, inner) = (Arc::downgrade(&f), inner.clone());
        // The first request, prepared, waits here while the second runs whole.
        before_next_commit(&f, move || {
            if let Some(f) = f2.upgrade() {
                *inner.lock() = Some(f.write(&req(2)));
            }
        });
    }
    let outer = f.write(&req(2)).expect("first request");
    f.set_before_commit(None);
    let inner = inner.lock().take().expect("the hook ran").expect("second request");
    assert!(!inner.deduplicated, "the request that committed first applied");
    assert!(outer.deduplicated, "the other replays its answer");
    assert_eq!((outer.system_time, outer.version.clone()), (inner.system_time, inner.version.clone()));
    assert!(outer.version.is_some_and(|v| !v.entries.is_empty()), "the write's vector is returned");
    let r = online(&f, &["alice"], T0);
    assert_eq!(r.columns[0].int64_values, vec![2]);
    let seq = db.stats().last_seqno;
    assert!(f.write(&req(2)).expect("retry").deduplicated);
    match f.write(&req(3)) {
        Err(ServiceError::Refused(m)) => assert!(m.contains("\"batch-42\""), "{m}"),
        other => panic!("the key with another request: want FAILED_PRECONDITION, got {other:?}"),
    }
    assert_eq!(db.stats().last_seqno, seq, "neither the retry nor the refused request wrote");
}

/// The event horizon applies to feature values, not to the service's own records (kept at
/// event time 0): idempotent writes and registry changes go on after it moves.
#[test]
fn idempotent_writes_and_registry_changes_work_past_the_event_horizon() {
    let (_tmp, f, db) = setup();
    db.set_event_horizon(quiver_storage::EventTime(T0 - HOUR_US)).expect("horizon");
    let req = pb::WriteFeaturesRequest {
        rows: vec![row("alice", T0, vec![("clicks", int(1))])],
        idempotency_key: "after-the-horizon".into(),
        ..Default::default()
    };
    let first = f.write(&req).expect("an idempotent write above the horizon");
    assert!(f.write(&req).expect("retry").deduplicated);
    assert_eq!(f.write(&req).expect("retry").system_time, first.system_time);
    let below = pb::WriteFeaturesRequest {
        rows: vec![row("alice", T0 - 2 * HOUR_US, vec![("clicks", int(1))])],
        idempotency_key: "below".into(),
        ..Default::default()
    };
    assert!(matches!(f.write(&below), Err(ServiceError::Storage(_))), "values below the horizon are still refused");
    let apply = pb::ApplyRegistryRequest {
        feature_groups: vec![pb::FeatureGroup {
            name: "user_more".into(),
            entity_type: "user".into(),
            features: vec![pb::FeatureDef {
                name: "visits".into(),
                r#type: pb::ValueType::Int64 as i32,
                default_value: None,
                description: String::new(),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    f.registry().apply(&apply).expect("a registry change past the horizon");
    assert!(f.registry().resolve("user_more:visits").is_ok());
}

/// A retry whose first request committed between the retry's record look-up and its own
/// commit gets the first answer, even when what the retry is checked against changed since.
#[test]
fn a_retry_racing_its_first_request_gets_the_first_answer_whatever_changed() {
    let (_tmp, f, db) = setup();
    let f = Arc::new(f);
    let req = pb::WriteFeaturesRequest {
        rows: vec![row("alice", T0, vec![("clicks", int(7))])],
        idempotency_key: "raced".into(),
        ..Default::default()
    };
    let first = Arc::new(parking_lot::Mutex::new(None));
    {
        let (weak, first, req, db) = (Arc::downgrade(&f), first.clone(), req.clone(), db.clone());
        before_next_commit(&f, move || {
            if let Some(f) = weak.upgrade() {
                *first.lock() = Some(f.write(&req).expect("the first request"));
            }
            // Then the horizon passes the retry's values.
            db.set_event_horizon(quiver_storage::EventTime(T0 + 1)).expect("horizon");
        });
    }
    let retry = f.write(&req).expect("the retry gets the first answer, not an error");
    f.set_before_commit(None);
    let first = first.lock().take().expect("the hook ran");
    assert!(retry.deduplicated);
    assert_eq!((retry.system_time, retry.version), (first.system_time, first.version));
}

#[test]
fn a_join_reserves_answer_memory_by_its_size_within_the_share() {
    use quiver_server::features::{JOIN_ANSWER_BYTES_MIN, JOIN_ANSWER_BYTES_PER_CELL};
    let (_tmp, f, _db) = setup();
    let f = f.with_join_spill_bytes(32 << 20);
    assert_eq!(f.join_answer_bytes(2, 1), JOIN_ANSWER_BYTES_MIN, "a tiny join reserves the floor");
    assert_eq!(f.join_answer_bytes(10_000, 3), 10_000 * 3 * JOIN_ANSWER_BYTES_PER_CELL);
    assert_eq!(f.join_answer_bytes(1_000_000, 10), 32 << 20, "a large one the whole share");
    assert_eq!(f.join_answer_bytes(usize::MAX, usize::MAX), 32 << 20, "no overflow");
    // A share below the floor bounds it too (tests spill with tiny shares).
    assert_eq!(f.with_join_spill_bytes(7).join_answer_bytes(2, 1), 7);
}
