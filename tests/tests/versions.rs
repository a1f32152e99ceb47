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

/// A forced promotion (v2's values differ from v1's on purpose, which the release gate would
/// refuse: here only the switch is under test).
async fn promote(c: &mut Clients, version: u32) -> Result<pb::PromoteGroupResponse, tonic::Status> {
    let req = pb::PromoteGroupRequest { group: "user_stats".into(), version, force: true, ..Default::default() };
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

/// `clicks` and `spend` of `users` into `group` at T0 (`None` leaves a feature out of a row).
async fn write_values(
    c: &mut Clients,
    group: &str,
    users: std::ops::Range<usize>,
    v: impl Fn(usize) -> (Option<i64>, Option<f64>),
) {
    let rows = users
        .map(|i| {
            let (clicks, spend) = v(i);
            let mut values = std::collections::HashMap::new();
            if let Some(x) = clicks {
                values.insert("clicks".to_string(), int(x));
            }
            if let Some(x) = spend {
                values.insert("spend".to_string(), pb::Value { kind: Some(pb::value::Kind::Float64Value(x)) });
            }
            pb::WriteRow {
                entity: Some(key(&user(i))),
                group: group.into(),
                event_time: ts(T0),
                values,
                ..Default::default()
            }
        })
        .collect();
    c.features.write_features(pb::WriteFeaturesRequest { rows, ..Default::default() }).await.expect("write");
}

fn stage_code(code: &str) -> pb::ApplyRegistryRequest {
    let mut r = example_registry();
    r.feature_groups[0].code_hash = code.into();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_reads_measure_an_injected_difference_and_the_gate_refuses_bad_versions() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = Daemon::start(dir.path(), &["--shadow", "user_stats@2", "--shadow-sample-rate", "1"]);
    let mut c = Clients::of(&d).await;
    c.registry.apply_registry(example_registry()).await.expect("v1");
    const N: usize = 50;
    write_values(&mut c, "user_stats", 0..N, |i| (Some(i as i64), Some(i as f64))).await;
    // v2: the same values but clicks + 5 for the first 10 users, and spend for 20 users only.
    c.registry.apply_registry(stage_code("v2")).await.expect("v2");
    write_values(&mut c, "user_stats@2", 0..N, |i| {
        (Some(i as i64 + if i < 10 { 5 } else { 0 }), (i < 20).then_some(i as f64))
    })
    .await;

    let lookup = pb::GetOnlineFeaturesRequest {
        entity_type: "user".into(),
        entities: (0..N).map(|i| key(&user(i))).collect(),
        features: vec!["user_stats:clicks".into(), "user_stats:spend".into()],
        as_of: ts(T0 + 1),
        ..Default::default()
    };
    for _ in 0..20 {
        let r = c.features.get_online_features(lookup.clone()).await.expect("lookup").into_inner();
        assert_eq!(r.columns[0].int64_values, (0..N as i64).collect::<Vec<_>>(), "shadow reads never change answers");
        assert_eq!(r.columns[0].group_version, 1);
    }
    let shadow = loop {
        let h = c.monitor.get_feature_health(pb::GetFeatureHealthRequest { group: "user_stats".into() }).await;
        let s = h.expect("health").into_inner().groups.remove(0).shadow.expect("shadowed");
        if s.features.iter().map(|f| f.compared).sum::<u64>() == 2 * 20 * N as u64 {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!((shadow.staged_version, shadow.lookups, shadow.dropped), (2, 20, 0));
    let clicks = &shadow.features[0];
    assert_eq!((clicks.feature.as_str(), clicks.compared, clicks.mismatched), ("clicks", 1000, 200));
    assert_eq!(clicks.abs_diff_quantiles, vec![0.0, 5.0, 5.0]);
    let spend = &shadow.features[1];
    assert_eq!((spend.feature.as_str(), spend.mismatched), ("spend", 600), "30 of 50 users have no staged spend");
    assert!(d
        .scrape()
        .contains(r#"quiver_shadow_values_total{feature="clicks",group="user_stats",result="mismatch"} 200"#));

    // The gate refuses v2: coverage of spend, and the shadow mismatches of clicks.
    let promote = |version: u32, dry_run: bool| pb::PromoteGroupRequest {
        group: "user_stats".into(),
        version,
        dry_run,
        ..Default::default()
    };
    let dry = c.registry.promote_group(promote(2, true)).await.expect("dry run").into_inner();
    let report = dry.gate.expect("report");
    assert!(!report.passed && dry.promotion.is_none() && !dry.changed);
    assert_eq!(report.entities, N as u64);
    let by_name = |r: &pb::GateReport, f: &str| r.features.iter().find(|x| x.feature == f).cloned().expect("feature");
    let spend_gate = by_name(&report, "spend");
    assert_eq!((spend_gate.coverage_serving, spend_gate.coverage_candidate), (1.0, 0.4));
    assert!(spend_gate.failures.iter().any(|f| f.contains("coverage 40.00%")), "{spend_gate:?}");
    let clicks_gate = by_name(&report, "clicks");
    assert_eq!(clicks_gate.shadow_mismatch_rate, Some(0.2));
    assert!(clicks_gate.failures.iter().any(|f| f.contains("shadow reads differed")), "{clicks_gate:?}");
    let refused = c.registry.promote_group(promote(2, false)).await.expect_err("refused");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("spend: coverage"), "{}", refused.message());
    let detailed = <pb::GateReport as prost::Message>::decode(refused.details()).expect("report in details");
    assert_eq!(detailed.features.len(), 2);
    assert_eq!(lookup_version(&mut c).await, 1, "a refused promotion changes nothing");

    // v3: clicks scaled by 1,000 — drift against the serving version.
    c.registry.apply_registry(stage_code("v3")).await.expect("v3");
    write_values(&mut c, "user_stats@3", 0..N, |i| (Some(i as i64 * 1000 + 7), Some(i as f64))).await;
    let refused = c.registry.promote_group(promote(3, false)).await.expect_err("refused");
    assert!(refused.message().contains("clicks: drift against the serving version"), "{}", refused.message());

    // v4: both features copied from v1 inside the engine — it passes and serves.
    c.registry.apply_registry(stage_code("v4")).await.expect("v4");
    let copy = pb::CopyFeatureHistoryRequest {
        group: "user_stats".into(),
        from_version: 1,
        to_version: 4,
        ..Default::default()
    };
    let mut s = c.features.copy_feature_history(copy).await.expect("copy").into_inner();
    let mut last = None;
    while let Some(p) = s.message().await.expect("progress") {
        last = Some(p);
    }
    let last = last.expect("progress");
    assert!(last.done && last.cells_copied == 2 * N as u64, "{last:?}");
    let ok = c.registry.promote_group(promote(4, false)).await.expect("the gate passes").into_inner();
    assert!(ok.changed && ok.gate.is_some_and(|g| g.passed));
    assert_eq!(lookup_version(&mut c).await, 4);
    // A forced promotion skips the gate and says so in the history.
    let forced = pb::PromoteGroupRequest { force: true, ..promote(3, false) };
    let p = c.registry.promote_group(forced).await.expect("forced").into_inner();
    assert!(p.gate.is_none() && p.promotion.is_some_and(|p| p.forced));
}

async fn lookup_version(c: &mut Clients) -> u32 {
    let req = pb::GetOnlineFeaturesRequest {
        entity_type: "user".into(),
        entities: vec![key(&user(0))],
        features: vec!["user_stats:clicks".into()],
        as_of: ts(T0 + 1),
        ..Default::default()
    };
    c.features.get_online_features(req).await.expect("lookup").into_inner().columns[0].group_version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_version_takes_no_writes_never_serves_and_its_own_data_is_compacted_away() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = Daemon::start(dir.path(), &[]);
    let mut c = Clients::of(&d).await;
    c.registry.apply_registry(example_registry()).await.expect("v1");
    write_all(&mut c, "user_stats", 1).await;
    c.registry.apply_registry(stage_code("v2")).await.expect("v2");
    write_all(&mut c, "user_stats@2", 2).await;
    let read = |c: &Clients, group: &'static str| {
        let mut f = c.features.clone();
        async move {
            let req = pb::GetOnlineFeaturesRequest {
                entity_type: "user".into(),
                entities: vec![key(&user(0))],
                features: vec![format!("{group}:clicks")],
                as_of: ts(T0 + 1),
                ..Default::default()
            };
            let col = f.get_online_features(req).await.expect("lookup").into_inner().columns.remove(0);
            (col.statuses[0], col.int64_values[0])
        }
    };
    let present = pb::FeatureStatus::Present as i32;
    assert_eq!(read(&c, "user_stats@2").await, (present, 2));

    let retire = |version: u32, hours: i64| pb::RetireGroupVersionRequest {
        group: "user_stats".into(),
        version,
        retention: Some(prost_types::Duration { seconds: hours * 3600, nanos: 0 }),
        reason: "superseded".into(),
    };
    let serving = c.registry.retire_group_version(retire(1, 0)).await.expect_err("v1 serves");
    assert_eq!(serving.code(), Code::FailedPrecondition);
    let r = c.registry.retire_group_version(retire(2, 0)).await.expect("retire").into_inner();
    assert!(r.changed && r.retirement.is_some_and(|r| r.by == "anonymous"));

    // Read-only, never served again.
    let row = pb::WriteRow {
        entity: Some(key(&user(0))),
        group: "user_stats@2".into(),
        event_time: ts(T0 + 5),
        values: [("clicks".to_string(), int(3))].into_iter().collect(),
        ..Default::default()
    };
    let refused = c.features.write_features(pb::WriteFeaturesRequest { rows: vec![row], ..Default::default() }).await;
    assert_eq!(refused.expect_err("retired").code(), Code::FailedPrecondition);
    let promote = pb::PromoteGroupRequest { group: "user_stats".into(), version: 2, force: true, ..Default::default() };
    assert_eq!(c.registry.promote_group(promote).await.expect_err("retired").code(), Code::FailedPrecondition);

    // Its retention (0 h) has passed: a full compaction drops its data, and only its data.
    c.admin.compact(pb::CompactRequest { full: true, ..Default::default() }).await.expect("compact");
    assert_eq!(read(&c, "user_stats@2").await.0, pb::FeatureStatus::NotFound as i32);
    assert_eq!(read(&c, "user_stats").await, (present, 1));
    let v = c
        .registry
        .list_group_versions(pb::ListGroupVersionsRequest { group: "user_stats".into() })
        .await
        .expect("versions")
        .into_inner();
    assert_eq!(v.versions[1].state(), pb::group_version::State::Retired);
}

/// A lookup with `default_missing` is shadowed the same way: a missing value defaulted on both
/// sides is a match, not a mismatch (a bug the review found).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_reads_make_their_answers_as_the_lookup_did() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = Daemon::start(dir.path(), &["--shadow", "user_stats@2", "--shadow-sample-rate", "1"]);
    let mut c = Clients::of(&d).await;
    c.registry.apply_registry(example_registry()).await.expect("v1");
    write_values(&mut c, "user_stats", 0..5, |i| (Some(i as i64), Some(i as f64))).await;
    c.registry.apply_registry(stage_code("v2")).await.expect("v2");
    write_values(&mut c, "user_stats@2", 0..5, |i| (Some(i as i64), Some(i as f64))).await;
    let lookup = pb::GetOnlineFeaturesRequest {
        entity_type: "user".into(),
        entities: (0..10).map(|i| key(&user(i))).collect(), // users 5..10 have no value
        features: vec!["user_stats:clicks".into(), "user_stats:spend".into()],
        as_of: ts(T0 + 1),
        default_missing: true,
        ..Default::default()
    };
    let r = c.features.get_online_features(lookup).await.expect("lookup").into_inner();
    assert_eq!(r.columns[0].statuses[9], pb::FeatureStatus::Defaulted as i32);
    let shadow = loop {
        let h = c.monitor.get_feature_health(pb::GetFeatureHealthRequest { group: "user_stats".into() }).await;
        let s = h.expect("health").into_inner().groups.remove(0).shadow.expect("shadowed");
        if s.features.iter().map(|f| f.compared).sum::<u64>() == 20 {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(shadow.features.iter().all(|f| f.mismatched == 0), "{shadow:?}");
}
