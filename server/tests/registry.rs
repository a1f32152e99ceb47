//! Registry: create, no-op re-apply, versioning, dry runs, refusals, persistence, references.

use std::sync::Arc;

use quiver_proto::v1 as pb;
use quiver_server::registry::{Registry, RegistryError};
use quiver_storage::{Db, Options};

fn user() -> pb::EntityType {
    pb::EntityType {
        name: "user".into(),
        join_keys: vec![pb::JoinKey { name: "user_id".into(), r#type: pb::JoinKeyType::String as i32 }],
        description: "a customer".into(),
    }
}

fn feature(name: &str, t: pb::ValueType) -> pb::FeatureDef {
    pb::FeatureDef { name: name.into(), r#type: t as i32, ..Default::default() }
}

fn stats() -> pb::FeatureGroup {
    pb::FeatureGroup {
        name: "user_stats".into(),
        entity_type: "user".into(),
        owner: "growth@example.com".into(),
        ttl: Some(prost_types::Duration { seconds: 3600, nanos: 0 }),
        features: vec![feature("clicks_1h", pb::ValueType::Int64), feature("spend_1h", pb::ValueType::Float64)],
        ..Default::default()
    }
}

/// Applies with `promote` (a new version serves at once), as most tests here want.
fn apply(
    r: &Registry,
    e: Vec<pb::EntityType>,
    g: Vec<pb::FeatureGroup>,
    dry_run: bool,
) -> Result<Vec<pb::RegistryChange>, RegistryError> {
    r.apply(&pb::ApplyRegistryRequest { entity_types: e, feature_groups: g, dry_run, promote: true })
}

/// Applies without `promote`: a new version of an existing group is staged.
fn stage(r: &Registry, g: pb::FeatureGroup) -> Vec<pb::RegistryChange> {
    r.apply_as(&pb::ApplyRegistryRequest { feature_groups: vec![g], ..Default::default() }, "alice").expect("stage")
}

fn kinds(c: &[pb::RegistryChange]) -> Vec<(pb::registry_change::Kind, String, u32)> {
    c.iter().map(|c| (c.kind(), c.object.clone(), c.version)).collect()
}

fn open(dir: &std::path::Path) -> Registry {
    Registry::open(Arc::new(Db::open(dir, Options::default()).expect("db"))).expect("registry")
}

#[test]
fn apply_creates_then_is_a_no_op_then_versions_on_change() {
    use pb::registry_change::Kind;
    let tmp = tempfile::tempdir().expect("tmp");
    let r = open(tmp.path());
    let c = apply(&r, vec![user()], vec![stats()], false).expect("apply");
    assert_eq!(
        kinds(&c),
        vec![(Kind::Created, "entity_type:user".into(), 1), (Kind::Created, "feature_group:user_stats".into(), 1)]
    );
    let c = apply(&r, vec![user()], vec![stats()], false).expect("re-apply");
    assert_eq!(
        kinds(&c),
        vec![(Kind::Unchanged, "entity_type:user".into(), 1), (Kind::Unchanged, "feature_group:user_stats".into(), 1)]
    );

    let v1_clicks = r.resolve("user_stats:clicks_1h").expect("resolve");
    let v1_spend = r.resolve("user_stats:spend_1h").expect("resolve");
    assert_eq!(v1_clicks.version, 1);
    let mut changed = stats();
    changed.features[0].r#type = pb::ValueType::Float64 as i32; // a type change
    changed.features.push(feature("sessions_1h", pb::ValueType::Int64));
    changed.ttl = Some(prost_types::Duration { seconds: 7200, nanos: 0 });
    let c = apply(&r, vec![], vec![changed], false).expect("apply v2");
    assert_eq!(kinds(&c), vec![(Kind::NewVersion, "feature_group:user_stats".into(), 2)]);
    let details = c[0].details.join("\n");
    assert!(
        details.contains("~ ttl")
            && details.contains("+ feature sessions_1h")
            && details.contains("~ feature clicks_1h"),
        "{details}"
    );

    // The serving version moved; the old one stays addressable and keeps its own keyspace.
    let v2_clicks = r.resolve("user_stats:clicks_1h").expect("resolve");
    assert_eq!((v2_clicks.version, v2_clicks.value_type), (2, pb::ValueType::Float64));
    assert_ne!(v2_clicks.id, v1_clicks.id, "a retyped feature gets a new keyspace");
    assert_eq!(
        r.resolve("user_stats:spend_1h").expect("resolve").id,
        v1_spend.id,
        "an unchanged feature keeps its data"
    );
    assert_eq!(r.resolve("user_stats@1:clicks_1h").expect("pinned"), v1_clicks);
    assert_eq!(r.group("user_stats", 0).expect("serving").version, 2);
    assert!(r.stored_in_engine("user_stats", 2).expect("read"));
    // A zero TTL is the same definition as none; tag order does not matter.
    let mut zero = stats();
    zero.ttl = None;
    apply(&r, vec![], vec![zero.clone()], false).expect("v3");
    zero.ttl = Some(prost_types::Duration { seconds: 0, nanos: 0 });
    let c = apply(&r, vec![], vec![zero], false).expect("same as v3");
    assert_eq!(kinds(&c), vec![(Kind::Unchanged, "feature_group:user_stats".into(), 3)]);
}

#[test]
fn dry_run_and_refusals_change_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let r = open(tmp.path());
    let c = apply(&r, vec![user()], vec![stats()], true).expect("plan");
    assert_eq!(c.len(), 2);
    assert!(r.entity_types().is_empty() && r.groups().is_empty(), "a dry run writes nothing");
    assert!(!r.stored_in_engine("user_stats", 1).expect("read"));

    apply(&r, vec![user()], vec![stats()], false).expect("apply");
    let mut other = user();
    other.join_keys[0].r#type = pb::JoinKeyType::Int64 as i32;
    // An incompatible entity type edit, in the same apply as a valid group change: nothing lands.
    let mut changed = stats();
    changed.owner = "someone-else".into();
    assert!(matches!(apply(&r, vec![other], vec![changed.clone()], false), Err(RegistryError::Refused(_))));
    assert_eq!(r.group("user_stats", 0).expect("group").version, 1);

    let bad_cases: Vec<(Vec<pb::EntityType>, Vec<pb::FeatureGroup>)> = vec![
        (vec![pb::EntityType { name: "Bad-Name".into(), ..user() }], vec![]),
        (vec![pb::EntityType { join_keys: vec![], ..user() }], vec![]),
        (vec![], vec![pb::FeatureGroup { entity_type: "nobody".into(), ..stats() }]),
        (vec![], vec![pb::FeatureGroup { features: vec![], ..stats() }]),
        (vec![], vec![pb::FeatureGroup { features: vec![feature("x", pb::ValueType::Unspecified)], ..stats() }]),
        (
            vec![],
            vec![pb::FeatureGroup {
                features: vec![feature("x", pb::ValueType::Int64), feature("x", pb::ValueType::Int64)],
                ..stats()
            }],
        ),
        (
            vec![],
            vec![pb::FeatureGroup {
                features: vec![pb::FeatureDef {
                    default_value: Some(pb::Value { kind: Some(pb::value::Kind::StringValue("no".into())) }),
                    ..feature("x", pb::ValueType::Int64)
                }],
                ..stats()
            }],
        ),
        (vec![], vec![pb::FeatureGroup { ttl: Some(prost_types::Duration { seconds: -1, nanos: 0 }), ..stats() }]),
        (
            vec![],
            vec![pb::FeatureGroup { freshness_sla: Some(prost_types::Duration { seconds: -1, nanos: 0 }), ..stats() }],
        ),
        (
            vec![],
            vec![pb::FeatureGroup {
                freshness_sla: Some(prost_types::Duration { seconds: 1, nanos: 1_000_000_000 }),
                ..stats()
            }],
        ),
    ];
    let bad_cases: Vec<(Vec<pb::EntityType>, Vec<pb::FeatureGroup>)> = bad_cases
        .into_iter()
        .chain([-0.5, 1.5, f64::NAN].map(|r| (vec![], vec![pb::FeatureGroup { log_sample_rate: Some(r), ..stats() }])))
        .collect();
    let with = |f: pb::FeatureDef| vec![pb::FeatureGroup { features: vec![f], ..stats() }];
    let vector = || feature("embedding", pb::ValueType::Float32Vector);
    let mut bad_features = vec![
        // dim is for vectors only, and bounded.
        with(pb::FeatureDef { dim: 3, ..feature("x", pb::ValueType::Int64List) }),
        with(pb::FeatureDef { dim: quiver_server::registry::VECTOR_DIM_MAX + 1, ..vector() }),
        // The default must have the dim.
        with(pb::FeatureDef {
            dim: 3,
            default_value: Some(pb::Value {
                kind: Some(pb::value::Kind::Float32Vector(pb::Float32List { values: vec![0.0; 2] })),
            }),
            ..vector()
        }),
    ];
    for rate in [-0.1, 1.5, f64::NAN, f64::INFINITY] {
        bad_features.push(with(pb::FeatureDef { max_null_rate: Some(rate), ..feature("x", pb::ValueType::Int64) }));
        bad_features.push(with(pb::FeatureDef { max_ks: Some(rate), ..feature("x", pb::ValueType::Int64) }));
    }
    for psi in [-0.1, f64::NAN, f64::INFINITY] {
        bad_features.push(with(pb::FeatureDef { max_psi: Some(psi), ..feature("x", pb::ValueType::Int64) }));
    }
    let bad_cases = bad_cases.into_iter().chain(bad_features.into_iter().map(|g| (vec![], g)));
    for (e, g) in bad_cases {
        let what = format!("{e:?} {g:?}");
        assert!(matches!(apply(&r, e, g, false), Err(RegistryError::Invalid(_))), "{what}");
    }
    assert_eq!(r.groups().len(), 1);
    assert_eq!(r.group("user_stats", 0).expect("group").version, 1);
    for bad in ["user_stats", "user_stats:", "user_stats@0:clicks_1h", "user_stats@x:clicks_1h"] {
        assert!(matches!(r.resolve(bad), Err(RegistryError::Invalid(_) | RegistryError::NotFound(_))), "{bad}");
    }
    assert!(matches!(r.resolve("user_stats:nope"), Err(RegistryError::NotFound(_))));
    assert!(matches!(r.resolve("nope:clicks_1h"), Err(RegistryError::NotFound(_))));
    assert!(matches!(r.resolve("user_stats@9:clicks_1h"), Err(RegistryError::NotFound(_))));
}

#[test]
fn monitoring_fields_version_the_group_and_a_new_dim_is_a_new_feature() {
    use pb::registry_change::Kind;
    let tmp = tempfile::tempdir().expect("tmp");
    let r = open(tmp.path());
    let mut g = stats();
    g.features.push(pb::FeatureDef { dim: 4, ..feature("embedding", pb::ValueType::Float32Vector) });
    apply(&r, vec![user()], vec![g.clone()], false).expect("apply");
    let first = r.resolve("user_stats:embedding").expect("resolve");
    assert_eq!(first.dim, 4);
    // A zero SLA is no SLA: the same definition.
    let zero = pb::FeatureGroup { freshness_sla: Some(prost_types::Duration::default()), ..g.clone() };
    assert_eq!(kinds(&apply(&r, vec![], vec![zero], false).expect("apply"))[0].0, Kind::Unchanged);
    // An SLA and a null-rate bound are metadata: a new version, the same ids.
    g.freshness_sla = Some(prost_types::Duration { seconds: 7200, nanos: 0 });
    g.features[0].max_null_rate = Some(0.25);
    g.features[0].max_psi = Some(0.3);
    let c = apply(&r, vec![], vec![g.clone()], false).expect("apply");
    assert_eq!(kinds(&c)[0], (Kind::NewVersion, "feature_group:user_stats".into(), 2));
    let details = c[0].details.join("\n");
    assert!(details.contains("freshness_sla") && details.contains("max_null_rate"), "{details}");
    assert!(details.contains("max_psi None -> Some(0.3)"), "{details}");
    assert_eq!(r.resolve("user_stats:embedding").expect("resolve").id, first.id);
    assert_eq!(r.group("user_stats", 0).expect("group").features[0].max_null_rate, Some(0.25));
    // A new length is a new keyspace: vectors of the old length are never served as the new.
    g.features[2].dim = 8;
    let c = apply(&r, vec![], vec![g], false).expect("apply");
    assert!(c[0].details.join("\n").contains("dim 4 -> 8"), "{:?}", c[0].details);
    let resized = r.resolve("user_stats:embedding").expect("resolve");
    assert_ne!(resized.id, first.id);
    assert_eq!(r.resolve("user_stats@2:embedding").expect("resolve").id, first.id);
}

#[test]
fn registry_survives_a_restart_and_keeps_allocating_fresh_ids() {
    let tmp = tempfile::tempdir().expect("tmp");
    let first = {
        let r = open(tmp.path());
        apply(&r, vec![user()], vec![stats()], false).expect("apply");
        r.resolve("user_stats:spend_1h").expect("resolve")
    };
    let r = open(tmp.path());
    assert_eq!(r.resolve("user_stats:spend_1h").expect("resolve after restart"), first);
    assert_eq!(r.entity_type("user").expect("entity type"), user());
    let mut changed = stats();
    changed.description = "v2".into();
    changed.features.push(pb::FeatureDef {
        name: "sessions".into(),
        r#type: pb::ValueType::Int64 as i32,
        ..Default::default()
    });
    apply(&r, vec![], vec![changed], false).expect("apply");
    let second = r.resolve("user_stats:spend_1h").expect("resolve");
    assert_eq!((second.version, second.id), (2, first.id), "an unchanged feature keeps its id in a new version");
    let clicks = r.resolve("user_stats:clicks_1h").expect("resolve");
    let sessions = r.resolve("user_stats:sessions").expect("resolve");
    assert!(sessions.id.0 > first.id.0.max(clicks.id.0), "ids are never reused after a restart");
}

#[test]
fn in_a_cluster_each_region_allocates_feature_ids_from_its_own_residue_class() {
    use quiver_server::registry::FEATURE_ID_STRIDE;
    let tmp = tempfile::tempdir().expect("tmp");
    // A directory a single-region node already used (ids 1, 2), copied to two regions that
    // then add features concurrently (before either has seen the other's apply).
    let base = tmp.path().join("base");
    {
        let r = open(&base);
        apply(&r, vec![user()], vec![stats()], false).expect("apply");
    }
    let mut ids = Vec::new();
    for region in [5u32, 6] {
        let dir = tmp.path().join(format!("r{region}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        for f in std::fs::read_dir(&base).expect("ls") {
            let f = f.expect("entry").path();
            std::fs::copy(&f, dir.join(f.file_name().expect("name"))).expect("copy");
        }
        let db = Arc::new(Db::open(&dir, Options { region, ..Options::default() }).expect("db"));
        let r = Registry::open_in_cluster(db, Some(region)).expect("registry");
        let mut changed = stats();
        changed.features.push(feature("sessions", pb::ValueType::Int64));
        changed.features.push(feature("orders", pb::ValueType::Int64));
        apply(&r, vec![], vec![changed], false).expect("apply");
        let sessions = r.resolve("user_stats:sessions").expect("resolve").id.0;
        let orders = r.resolve("user_stats:orders").expect("resolve").id.0;
        let old = r.resolve("user_stats:clicks_1h").expect("resolve").id.0;
        assert_eq!((sessions % FEATURE_ID_STRIDE, orders % FEATURE_ID_STRIDE), (region, region));
        assert!(sessions > old && orders > sessions, "fresh and increasing: {old} {sessions} {orders}");
        ids.extend([sessions, orders]);
    }
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "two regions handed out the same id: {ids:?}");
}

fn states(r: &Registry, group: &str) -> Vec<(u32, pb::group_version::State)> {
    r.versions(group).expect("versions").versions.iter().map(|v| (v.version, v.state())).collect()
}

#[test]
fn a_staged_version_serves_only_once_promoted_and_rollback_walks_back_the_promotions() {
    use pb::group_promotion::Kind as P;
    use pb::group_version::State as S;
    let tmp = tempfile::tempdir().expect("tmp");
    let r = open(tmp.path());
    apply(&r, vec![user()], vec![stats()], false).expect("v1");
    let v1 = r.resolve("user_stats:clicks_1h").expect("resolve");

    // New code: v2 is staged, every feature in its own keyspace; serving is untouched.
    let mut v2_def = stats();
    v2_def.code_hash = "b2".into();
    let c = stage(&r, v2_def.clone());
    assert_eq!((c[0].kind(), c[0].version, c[0].serving), (pb::registry_change::Kind::NewVersion, 2, false));
    assert!(c[0].details.iter().any(|d| d.contains("0 of 2 features share data with v1")), "{:?}", c[0].details);
    let generation = r.generation();
    assert_eq!(r.resolve("user_stats:clicks_1h").expect("resolve"), v1);
    assert_eq!(r.group("user_stats", 0).expect("serving").version, 1);
    assert_eq!(r.groups()[0].version, 1);
    let staged = r.resolve("user_stats@2:clicks_1h").expect("pinned");
    assert_ne!(staged.id, v1.id, "a group whose code changed gets fresh keyspaces");
    assert_eq!(r.resolve_group("user_stats").expect("group")[0].version, 1, "writes to the group go to v1");
    assert_eq!(states(&r, "user_stats"), vec![(1, S::Serving), (2, S::Staged)]);

    // Promote: one write, the generation moves (resolution caches drop), v2 serves.
    let (p, changed) = r.promote("user_stats", 2, false, "backfilled", "bob").expect("promote");
    assert!(changed && r.generation() > generation);
    assert_eq!((p.kind(), p.from_version, p.to_version, p.by.as_str()), (P::Promoted, 1, 2, "bob"));
    assert_eq!(r.resolve("user_stats:clicks_1h").expect("resolve"), staged);
    let (_, changed) = r.promote("user_stats", 2, false, "", "bob").expect("again");
    assert!(!changed, "promoting the serving version writes nothing");
    assert!(matches!(r.promote("user_stats", 9, false, "", "bob"), Err(RegistryError::NotFound(_))));

    // v3 changes only the TTL: staged, sharing v2's data; promote, then roll back twice.
    let mut v3_def = v2_def.clone();
    v3_def.ttl = Some(prost_types::Duration { seconds: 60, nanos: 0 });
    let c = stage(&r, v3_def);
    assert!(c[0].details.iter().any(|d| d.contains("2 of 2 features share data with v2")), "{:?}", c[0].details);
    assert_eq!(r.resolve("user_stats@3:clicks_1h").expect("pinned").id, staged.id);
    r.promote("user_stats", 3, true, "", "bob").expect("promote v3");
    let back = r.rollback("user_stats", "bad ttl", "carol").expect("rollback");
    assert_eq!((back.kind(), back.from_version, back.to_version), (P::RolledBack, 3, 2));
    assert_eq!(r.rollback("user_stats", "", "carol").expect("rollback").to_version, 1);
    assert!(
        matches!(r.rollback("user_stats", "", "carol"), Err(RegistryError::Refused(_))),
        "v1 was never promoted over another"
    );
    assert_eq!(states(&r, "user_stats"), vec![(1, S::Serving), (2, S::Inactive), (3, S::Inactive)]);

    // The history survives a restart, oldest first, with who, why and `force`.
    drop(r);
    let r = open(tmp.path());
    let v = r.versions("user_stats").expect("versions");
    assert_eq!(v.serving_version, 1);
    let h: Vec<_> =
        v.promotions.iter().map(|p| (p.kind(), p.from_version, p.to_version, p.by.as_str(), p.forced)).collect();
    assert_eq!(
        h,
        vec![
            (P::Created, 0, 1, "local", false),
            (P::Promoted, 1, 2, "bob", false),
            (P::Promoted, 2, 3, "bob", true),
            (P::RolledBack, 3, 2, "carol", false),
            (P::RolledBack, 2, 1, "carol", false),
        ]
    );
    assert_eq!(v.promotions[3].reason, "bad ttl");
    assert_eq!(r.resolve("user_stats:clicks_1h").expect("resolve"), v1);
    assert_eq!(v.versions[2].shared_features, 2);
    assert_eq!(v.versions[1].own_features, 2);
}

#[test]
fn unpinned_references_resolve_to_the_version_serving_as_of_known_at() {
    use quiver_storage::SystemTime;
    let tmp = tempfile::tempdir().expect("tmp");
    let db = Arc::new(Db::open(tmp.path(), Options::default()).expect("db"));
    let r = Registry::open(db.clone()).expect("registry");
    let before_group = db.system_time_now();
    apply(&r, vec![user()], vec![stats()], false).expect("v1");
    let mut v2 = stats();
    v2.code_hash = "b2".into();
    stage(&r, v2);
    let staged = db.system_time_now();
    r.promote("user_stats", 2, false, "", "bob").expect("promote");
    let promoted = db.system_time_now();
    r.rollback("user_stats", "", "bob").expect("rollback");
    let at = |k: SystemTime| r.resolve_at("user_stats:clicks_1h", k).expect("resolve").version;
    assert_eq!(at(before_group), 1, "a group not yet registered resolves to its first version");
    assert_eq!(at(staged), 1);
    assert_eq!(at(promoted), 2);
    assert_eq!(at(SystemTime::MAX), 1);
    assert_eq!(r.resolve_at("user_stats@2:clicks_1h", staged).expect("pinned").version, 2, "a pin wins");
}

#[test]
fn a_group_registered_before_serving_pointers_keeps_serving_its_newest_version_when_one_is_staged() {
    use prost::Message;
    use quiver_storage::{Durability, EventTime, FeatureId, Value, WriteBatch};
    let tmp = tempfile::tempdir().expect("tmp");
    let db = Arc::new(Db::open(tmp.path(), Options::default()).expect("db"));
    // Version cells written the way registries before serving pointers wrote them.
    let r = Registry::open(db.clone()).expect("registry");
    apply(&r, vec![user()], vec![], false).expect("entity type");
    drop(r);
    let mut key = quiver_storage::reserved::REGISTRY_GROUPS.to_vec();
    key.extend_from_slice(b"user_stats");
    for (v, ids) in [(1u32, vec![1u32, 2]), (2, vec![1, 3])] {
        let def = pb::FeatureGroup { version: v, ..stats() };
        let stored = quiver_server::registry::StoredGroup { def: Some(def), feature_ids: ids };
        let mut b = WriteBatch::new();
        b.put(&key, FeatureId(v), EventTime(0), Value::Bytes(stored.encode_to_vec())).expect("put");
        db.write(b, Durability::Sync).expect("write");
    }
    let between = db.system_time_now();
    let r = Registry::open(db.clone()).expect("registry");
    assert_eq!(r.group("user_stats", 0).expect("serving").version, 2, "no pointer: the newest version serves");
    let mut v3 = stats();
    v3.description = "v3".into();
    stage(&r, v3);
    assert_eq!(r.group("user_stats", 0).expect("serving").version, 2, "staging wrote the serving version down");
    let h = r.versions("user_stats").expect("versions").promotions;
    assert_eq!((h.len(), h[0].kind(), h[0].to_version), (1, pb::group_promotion::Kind::Pinned, 2));
    assert_eq!(r.resolve_at("user_stats:spend_1h", between).expect("resolve").version, 2);
    let r = Registry::open(db).expect("reopen");
    assert_eq!(r.group("user_stats", 0).expect("serving").version, 2);
}

#[test]
fn retirement_is_for_good_and_frees_only_ids_no_other_version_uses() {
    use std::time::Duration;
    let tmp = tempfile::tempdir().expect("tmp");
    let r = open(tmp.path());
    apply(&r, vec![user()], vec![stats()], false).expect("v1");
    let mut v2 = stats();
    v2.code_hash = "b2".into(); // own ids
    stage(&r, v2.clone());
    let mut v3 = v2.clone();
    v3.description = "v3".into(); // shares v2's ids
    stage(&r, v3);
    let v1_ids: Vec<_> = r.resolve_group("user_stats@1").expect("v1").iter().map(|f| f.id).collect();
    let v2_ids: Vec<_> = r.resolve_group("user_stats@2").expect("v2").iter().map(|f| f.id).collect();

    assert!(
        matches!(r.retire("user_stats", 1, Duration::ZERO, "", "ops"), Err(RegistryError::Refused(_))),
        "v1 serves"
    );
    assert!(matches!(r.retire("user_stats", 9, Duration::ZERO, "", "ops"), Err(RegistryError::NotFound(_))));
    let (ret, changed) = r.retire("user_stats", 2, Duration::from_secs(3600), "superseded", "ops").expect("retire v2");
    assert!(changed && ret.by == "ops" && ret.reason == "superseded");
    assert!(!r.retire("user_stats", 2, Duration::ZERO, "", "ops").expect("again").1, "the first retirement stands");
    assert!(r.is_retired("user_stats", 2) && !r.is_retired("user_stats", 3));
    assert!(matches!(r.promote("user_stats", 2, true, "", "ops"), Err(RegistryError::Refused(_))));
    let state = |v: usize| r.versions("user_stats").expect("versions").versions[v].state();
    assert_eq!(state(1), pb::group_version::State::Retired);

    let at = |ret: &pb::GroupRetirement| {
        quiver_server::convert::micros(ret.drop_after.as_ref().expect("t"), "t").expect("us")
    };
    let after = at(&ret) + 1;
    // v3 still uses v2's ids: nothing is dropped, before or after v2's retention.
    assert!(r.dropped_feature_ids(after).is_empty());
    let (ret3, _) = r.retire("user_stats", 3, Duration::ZERO, "", "ops").expect("retire v3");
    assert!(r.dropped_feature_ids(at(&ret) - 1).is_empty(), "v2 is within its retention");
    let mut dropped = r.dropped_feature_ids(after.max(at(&ret3) + 1));
    dropped.sort();
    assert_eq!(dropped, v2_ids);
    assert!(v1_ids.iter().all(|id| !dropped.contains(id)), "the serving version's data is never dropped");

    // An apply cannot promote a retired version; a new version keeps no id of a retired one.
    let mut again = v2.clone();
    again.description = "v3".into();
    let promote_retired =
        r.apply(&pb::ApplyRegistryRequest { feature_groups: vec![again], promote: true, ..Default::default() });
    assert!(matches!(promote_retired, Err(RegistryError::Refused(_))), "{promote_retired:?}");
    let mut v4 = v2.clone();
    v4.description = "v4".into();
    stage(&r, v4);
    let v4_ids: Vec<_> = r.resolve_group("user_stats@4").expect("v4").iter().map(|f| f.id).collect();
    assert!(v4_ids.iter().all(|id| !v2_ids.contains(id)), "v4 does not inherit the retired v2/v3 keyspaces");

    // The retirement survives a restart.
    drop(r);
    let r = open(tmp.path());
    assert!(r.is_retired("user_stats", 2) && r.is_retired("user_stats", 3));
}

#[test]
fn the_serving_version_is_never_dropped_even_if_a_replicated_retirement_names_it() {
    use prost::Message;
    use quiver_storage::{Durability, EventTime, FeatureId, Value, WriteBatch};
    let tmp = tempfile::tempdir().expect("tmp");
    let db = Arc::new(Db::open(tmp.path(), Options::default()).expect("db"));
    let r = Registry::open(db.clone()).expect("registry");
    apply(&r, vec![user()], vec![stats()], false).expect("v1");
    drop(r);
    // As if another region retired v1 while this one promoted it: both cells arrive.
    let mut key = quiver_storage::reserved::REGISTRY_RETIRED.to_vec();
    key.extend_from_slice(b"user_stats");
    let ret =
        pb::GroupRetirement { version: 1, drop_after: Some(prost_types::Timestamp::default()), ..Default::default() };
    let mut b = WriteBatch::new();
    b.put(&key, FeatureId(1), EventTime(0), Value::Bytes(ret.encode_to_vec())).expect("put");
    db.write(b, Durability::Sync).expect("write");
    let r = Registry::open(db).expect("reopen");
    assert!(r.is_retired("user_stats", 1));
    assert_eq!(r.group("user_stats", 0).expect("serving").version, 1);
    assert!(r.dropped_feature_ids(i64::MAX).is_empty(), "the serving version's data stays");
}
