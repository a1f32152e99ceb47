//! Group versions end to end over gRPC (README "Group versions"): a changed group is staged and
//! serving is untouched until a promotion; a promotion under concurrent online load never mixes
//! versions inside one response; rollback; a join pinned to `known_at` is the same before and
//! after a promotion; bad requests change nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quiver_e2e::{example_registry, int, key, ts, Clients, Daemon};
use quiver_proto::v1 as pb;
use tonic::Code;

const T0: i64 = 1_767_225_600_000_000;
const USERS: usize = 20;

fn user(i: usize) -> String {
    format!("u{i:02}")
}

/// `clicks = v`, `spend = v` for every user, at T0, into `group` ("user_stats" or "user_stats@2").
async fn write_all(c: &mut Clients, group: &str, v: i64) {
    let rows = (0..USERS)
        .map(|i| pb::WriteRow {
            entity: Some(key(&user(i))),
            group: group.into(),
            event_time: ts(T0),
            values: [
                ("clicks".to_string(), int(v)),
                ("spend".to_string(), pb::Value { kind: Some(pb::value::Kind::Float64Value(v as f64)) }),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        })
        .collect();
    c.features.write_features(pb::WriteFeaturesRequest { rows, ..Default::default() }).await.expect("write");
}

/// One online lookup of both features for every user: the version every value says it came
/// from, or `Err` describing a response that mixes versions.
async fn lookup(c: &mut Clients) -> Result<i64, String> {
    let req = pb::GetOnlineFeaturesRequest {
        entity_type: "user".into(),
        entities: (0..USERS).map(|i| key(&user(i))).collect(),
        features: vec!["user_stats:clicks".into(), "user_stats:spend".into()],
        as_of: ts(T0 + 1),
        ..Default::default()
    };
    let r = c.features.get_online_features(req).await.expect("lookup").into_inner();
    let (clicks, spend) = (&r.columns[0], &r.columns[1]);
    let v = clicks.int64_values[0];
    let same = clicks.int64_values.iter().all(|&x| x == v)
        && spend.float64_values.iter().all(|&x| x == v as f64)
        && clicks.group_version == spend.group_version
        && i64::from(clicks.group_version) == v;
    if same {
        Ok(v)
    } else {
        Err(format!("{r:?}"))
    }
}

async fn join(c: &mut Clients, known_at: Option<i64>) -> Vec<(i32, i64)> {
    let req = pb::GetHistoricalFeaturesRequest {
        entity_type: "user".into(),
        spine: (0..USERS).map(|i| pb::SpineRow { entity: Some(key(&user(i))), timestamp: ts(T0 + 10) }).collect(),
        features: vec!["user_stats:clicks".into(), "user_stats:spend".into()],
        known_at: known_at.and_then(ts),
        ..Default::default()
    };
    let mut stream = c.features.get_historical_features(req).await.expect("join").into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await.expect("chunk") {
        for i in 0..chunk.columns[0].statuses.len() {
            out.push((chunk.columns[0].statuses[i], chunk.columns[0].int64_values[i]));
            out.push((chunk.columns[1].statuses[i], chunk.columns[1].float64_values[i] as i64));
        }
    }
    out
}

fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

async fn promote(c: &mut Clients, version: u32) -> Result<pb::PromoteGroupResponse, tonic::Status> {
    let req = pb::PromoteGroupRequest { group: "user_stats".into(), version, ..Default::default() };
    c.registry.promote_group(req).await.map(|r| r.into_inner())
}

async fn rollback(c: &mut Clients) -> Result<pb::GroupPromotion, tonic::Status> {
    let req = pb::RollbackGroupRequest { group: "user_stats".into(), reason: String::new() };
    c.registry.rollback_group(req).await.map(|r| r.into_inner().promotion.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_versions_promote_atomically_roll_back_and_leave_pinned_joins_alone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = Daemon::start(dir.path(), &[]);
    let mut c = Clients::of(&d).await;
    c.registry.apply_registry(example_registry()).await.expect("apply v1");
    write_all(&mut c, "user_stats", 1).await;

    // New code: v2 is staged with keyspaces of its own. Serving, and writes to the unpinned
    // group, stay on v1.
    let mut v2 = example_registry();
    v2.feature_groups[0].code_hash = "v2".into();
    let changes = c.registry.apply_registry(v2.clone()).await.expect("stage v2").into_inner().changes;
    assert_eq!((changes[1].version, changes[1].serving), (2, false), "{changes:?}");
    write_all(&mut c, "user_stats@2", 2).await;
    assert_eq!(lookup(&mut c).await, Ok(1), "a staged version does not serve");
    let v1_join = join(&mut c, None).await;
    assert!(v1_join.iter().all(|&(s, v)| s == pb::FeatureStatus::Present as i32 && v == 1), "{v1_join:?}");
    // The same apply again is a no-op and still stages nothing new.
    let again = c.registry.apply_registry(v2).await.expect("re-apply").into_inner().changes;
    assert_eq!((again[1].kind(), again[1].serving), (pb::registry_change::Kind::Unchanged, false));

    tokio::time::sleep(Duration::from_millis(20)).await;
    let known_at = now_us();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let pinned_before = join(&mut c, Some(known_at)).await;
    assert_eq!(pinned_before, v1_join);

    // Bad requests are refused with their codes and change nothing.
    assert_eq!(promote(&mut c, 9).await.expect_err("no v9").code(), Code::NotFound);
    assert_eq!(promote(&mut c, 0).await.expect_err("v0").code(), Code::InvalidArgument);
    let nobody = pb::PromoteGroupRequest { group: "nobody".into(), version: 1, ..Default::default() };
    assert_eq!(c.registry.promote_group(nobody).await.expect_err("no group").code(), Code::NotFound);
    assert_eq!(rollback(&mut c).await.expect_err("nothing to roll back").code(), Code::FailedPrecondition);
    let long = pb::PromoteGroupRequest {
        group: "user_stats".into(),
        version: 2,
        reason: "x".repeat(4097),
        ..Default::default()
    };
    assert_eq!(c.registry.promote_group(long).await.expect_err("long reason").code(), Code::InvalidArgument);
    assert_eq!(lookup(&mut c).await, Ok(1));

    // Promotions and rollbacks under concurrent lookups: every response is wholly one version.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (mut c, stop, reads) = (c.clone(), stop.clone(), reads.clone());
        tokio::spawn(async move {
            let mut seen = [0u64; 3];
            while !stop.load(Ordering::Acquire) {
                match lookup(&mut c).await {
                    Ok(v) => seen[v as usize] += 1,
                    Err(mixed) => return Err(mixed),
                }
                reads.fetch_add(1, Ordering::Release);
            }
            Ok(seen)
        })
    };
    for _ in 0..15 {
        let p = promote(&mut c, 2).await.expect("promote");
        assert!(p.changed);
        let r = reads.load(Ordering::Acquire);
        while reads.load(Ordering::Acquire) < r + 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let back = rollback(&mut c).await.expect("rollback");
        assert_eq!((back.from_version, back.to_version), (2, 1));
        let r = reads.load(Ordering::Acquire);
        while reads.load(Ordering::Acquire) < r + 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    stop.store(true, Ordering::Release);
    let seen = reader.await.expect("reader").unwrap_or_else(|mixed| panic!("a response mixed versions: {mixed}"));
    assert!(seen[1] > 0 && seen[2] > 0, "both versions served: {seen:?}");

    // Promoted for good: lookups and unpinned joins read v2; the join pinned before is unchanged.
    let p = promote(&mut c, 2).await.expect("promote");
    assert!(p.changed && p.promotion.as_ref().is_some_and(|p| p.by == "anonymous"));
    assert!(!promote(&mut c, 2).await.expect("again").changed);
    assert_eq!(lookup(&mut c).await, Ok(2));
    assert!(join(&mut c, None).await.iter().all(|&(_, v)| v == 2));
    assert_eq!(join(&mut c, Some(known_at)).await, pinned_before, "a join pinned to known_at does not move");

    let h = c
        .registry
        .list_group_versions(pb::ListGroupVersionsRequest { group: "user_stats".into() })
        .await
        .expect("versions")
        .into_inner();
    assert_eq!(h.serving_version, 2);
    assert_eq!(h.promotions.len(), 1 + 15 * 2 + 1, "created, 15 promote/rollback pairs, the last promotion");
    let states: Vec<_> = h.versions.iter().map(|v| (v.version, v.state(), v.own_features)).collect();
    assert_eq!(states, vec![(1, pb::group_version::State::Inactive, 2), (2, pb::group_version::State::Serving, 2)]);
    let lookups = d.scrape();
    assert!(lookups.contains("PromoteGroup"), "promotions are counted in the RPC metrics");
}
