//! Feature monitoring end to end against a real quiverd: a freshness SLA breached and met, in
//! `GetFeatureHealth` and in the metrics; null rates per feature against `max_null_rate`;
//! vectors held to their `dim`; watermarks kept across a restart.

use quiver_e2e::{example_registry, int, key, ts, Clients, Daemon};
use quiver_proto::v1 as pb;
use quiver_testkit::now_us;
use tonic::Code;

const MINUTE_US: i64 = 60_000_000;
const HOUR_US: i64 = 60 * MINUTE_US;

/// The example registry with a 1 h freshness SLA on `user_stats`, at most half of the clicks
/// answers null, and `embeddings:vec`, a float32 vector of 3.
fn registry() -> pb::ApplyRegistryRequest {
    let mut req = example_registry();
    let g = &mut req.feature_groups[0];
    g.freshness_sla = Some(prost_types::Duration { seconds: 3600, nanos: 0 });
    g.features[0].max_null_rate = Some(0.5);
    req.feature_groups.push(pb::FeatureGroup {
        name: "embeddings".into(),
        entity_type: "user".into(),
        features: vec![pb::FeatureDef {
            name: "vec".into(),
            r#type: pb::ValueType::Float32Vector as i32,
            dim: 3,
            ..Default::default()
        }],
        ..Default::default()
    });
    req
}

fn clicks(user: &str, at: i64) -> pb::WriteFeaturesRequest {
    pb::WriteFeaturesRequest {
        rows: vec![pb::WriteRow {
            entity: Some(key(user)),
            group: "user_stats".into(),
            event_time: ts(at),
            values: [("clicks".to_string(), int(1))].into_iter().collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn health(c: &mut Clients, group: &str) -> pb::GroupHealth {
    let r = c.monitor.get_feature_health(pb::GetFeatureHealthRequest { group: group.into() }).await;
    let mut groups = r.expect("health").into_inner().groups;
    assert_eq!(groups.len(), 1);
    groups.remove(0)
}

/// The value of the series `name` whose labels include every one of `labels` (`k="v"`).
fn series(page: &str, name: &str, labels: &[&str]) -> Option<f64> {
    page.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let (labelset, value) = rest.strip_prefix('{')?.split_once("} ")?;
        labels.iter().all(|want| labelset.split(',').any(|have| have == *want)).then(|| value.trim().parse().ok())?
    })
}

fn seconds(d: &Option<prost_types::Duration>) -> f64 {
    d.as_ref().map_or(f64::NAN, |d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshness_slas_null_rates_dims_and_a_restart() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = Daemon::start(tmp.path(), &[]);
    let mut c = Clients::of(&d).await;
    c.registry.apply_registry(registry()).await.expect("apply");

    // Never written: an SLA without data is breached, and freshness is unknown.
    let h = health(&mut c, "user_stats").await;
    assert!(h.sla_breached && h.freshness.is_none() && h.newest_event_time.is_none(), "{h:?}");
    assert_eq!(seconds(&h.freshness_sla), 3600.0);
    let page = d.scrape();
    assert_eq!(series(&page, "quiver_feature_group_sla_breached", &["group=\"user_stats\""]), Some(1.0), "{page}");
    // A group without an SLA never breaches one.
    assert!(!health(&mut c, "embeddings").await.sla_breached);

    // Only an old event: breached, about two hours stale.
    let old = now_us() - 2 * HOUR_US;
    c.features.write_features(clicks("alice", old)).await.expect("write");
    let h = health(&mut c, "user_stats").await;
    assert!(h.sla_breached, "{h:?}");
    assert_eq!(h.newest_event_time, ts(old));
    assert!((7200.0..7260.0).contains(&seconds(&h.freshness)), "{h:?}");
    let page = d.scrape();
    let freshness = series(&page, "quiver_feature_group_freshness_seconds", &["group=\"user_stats\""]);
    assert!(freshness.is_some_and(|f| (7200.0..7260.0).contains(&f)), "{page}");

    // A fresh event: within the SLA.
    let recent = now_us() - MINUTE_US;
    c.features.write_features(clicks("bob", recent)).await.expect("write");
    let h = health(&mut c, "user_stats").await;
    assert!(!h.sla_breached && h.values_written == 2, "{h:?}");
    assert!((60.0..120.0).contains(&seconds(&h.freshness)), "{h:?}");
    let page = d.scrape();
    assert_eq!(series(&page, "quiver_feature_group_sla_breached", &["group=\"user_stats\""]), Some(0.0));
    let delays = series(&page, "quiver_feature_group_ingestion_delay_seconds_count", &["group=\"user_stats\""]);
    assert_eq!(delays, Some(2.0), "{page}");
    // One row two hours late, one a minute late.
    let within_5m =
        series(&page, "quiver_feature_group_ingestion_delay_seconds_bucket", &["group=\"user_stats\"", "le=\"300\""]);
    assert_eq!(within_5m, Some(1.0), "{page}");

    // Null rates: 200 lookups, bob present, alice stale (1 h TTL), 198 never written.
    let lookup = |users: Vec<String>| pb::GetOnlineFeaturesRequest {
        entity_type: "user".into(),
        entities: users.iter().map(|u| key(u)).collect(),
        features: vec!["user_stats:clicks".into(), "user_stats:spend".into()],
        as_of: None,
        ..Default::default()
    };
    let mut users: Vec<String> = (0..198).map(|i| format!("nobody-{i}")).collect();
    users.extend(["alice".to_string(), "bob".to_string()]);
    c.features.get_online_features(lookup(users)).await.expect("lookup");
    let h = health(&mut c, "user_stats").await;
    let (clicks_h, spend_h) = (&h.features[0], &h.features[1]);
    assert_eq!((clicks_h.present, clicks_h.stale, clicks_h.not_found, clicks_h.defaulted), (1, 1, 198, 0));
    assert_eq!(clicks_h.null_rate, Some(199.0 / 200.0));
    assert!(clicks_h.null_rate_breached, "{clicks_h:?}");
    // spend has a default: every answer is DEFAULTED, a null, but it has no bound.
    assert_eq!((spend_h.defaulted, spend_h.null_rate, spend_h.null_rate_breached), (200, Some(1.0), false));
    let page = d.scrape();
    let not_found = ["group=\"user_stats\"", "feature=\"clicks\"", "status=\"not_found\""];
    assert_eq!(series(&page, "quiver_served_values_total", &not_found), Some(198.0), "{page}");
    let breached = ["group=\"user_stats\"", "feature=\"clicks\""];
    assert_eq!(series(&page, "quiver_feature_null_rate_breached", &breached), Some(1.0));
    assert_eq!(series(&page, "quiver_feature_max_null_rate", &breached), Some(0.5));
    // 400 more answers for bob bring clicks' null rate to 199 / 600, under its bound.
    c.features.get_online_features(lookup(vec!["bob".to_string(); 400])).await.expect("lookup");
    let h = health(&mut c, "user_stats").await;
    assert_eq!(h.features[0].null_rate, Some(199.0 / 600.0));
    assert!(!h.features[0].null_rate_breached);

    // Vectors are held to their dim: a wrong length is refused and writes nothing.
    let vector = |values: Vec<f32>| pb::WriteFeaturesRequest {
        rows: vec![pb::WriteRow {
            entity: Some(key("alice")),
            group: "embeddings".into(),
            event_time: ts(recent),
            values: [(
                "vec".to_string(),
                pb::Value { kind: Some(pb::value::Kind::Float32Vector(pb::Float32List { values })) },
            )]
            .into_iter()
            .collect(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let e = c.features.write_features(vector(vec![1.0, 2.0])).await.expect_err("a vector of 2");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("dim 3"), "{}", e.message());
    assert!(health(&mut c, "embeddings").await.newest_event_time.is_none(), "a refused write is not ingested");
    let get_vec = pb::GetOnlineFeaturesRequest {
        entity_type: "user".into(),
        entities: vec![key("alice")],
        features: vec!["embeddings:vec".into()],
        as_of: None,
        ..Default::default()
    };
    let r = c.features.get_online_features(get_vec.clone()).await.expect("lookup").into_inner();
    assert_eq!(r.columns[0].statuses, vec![pb::FeatureStatus::NotFound as i32]);
    c.features.write_features(vector(vec![1.0, 2.0, 3.0])).await.expect("a vector of 3");
    let r = c.features.get_online_features(get_vec).await.expect("lookup").into_inner();
    assert_eq!(r.columns[0].float32_vector_values[0].values, vec![1.0, 2.0, 3.0]);

    // An unknown group is NOT_FOUND.
    let e = c.monitor.get_feature_health(pb::GetFeatureHealthRequest { group: "nope".into() }).await;
    assert_eq!(e.expect_err("unknown group").code(), Code::NotFound);

    // After a restart the node still knows how fresh its groups are (the watermarks are
    // stored at the stop); counts since start begin again.
    assert!(d.stop(), "clean stop");
    let d = Daemon::start(tmp.path(), &[]);
    let mut c = Clients::of(&d).await;
    let h = health(&mut c, "user_stats").await;
    assert_eq!(h.newest_event_time, ts(recent), "{h:?}");
    assert!(!h.sla_breached && h.values_written == 0, "{h:?}");
    assert_eq!(health(&mut c, "embeddings").await.newest_event_time, ts(recent));
}

/// The repository's `monitoring/` directory.
fn monitoring_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitoring")
}

fn promtool(args: &[&str]) -> String {
    let out = std::process::Command::new("promtool").args(args).current_dir(monitoring_dir()).output();
    let out = out.unwrap_or_else(|e| {
        panic!("promtool: {e} (install the Debian package `prometheus`, as .ci/run does, to check the alert rules)")
    });
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// Every `quiver_*` name in `text`, histogram series reduced to their family.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("quiver_") {
        let before = rest[..i].chars().next_back();
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            let name = &tail[..end];
            let family = ["_bucket", "_count", "_sum"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
            out.insert(family.to_string());
        }
        rest = &tail[end..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_pass_promtool_and_rules_and_dashboard_name_only_exported_metrics() {
    let out = promtool(&["check", "rules", "quiver-alerts.yml"]);
    assert!(out.contains("SUCCESS: 7 rules found"), "{out}");
    promtool(&["test", "rules", "quiver-alerts.test.yml"]);

    // A node with a peer (unreachable: its replication series exist all the same), a group with
    // an SLA and bounds, one write and one lookup: every series the rules and the dashboard use
    // is on its page.
    let tmp = tempfile::tempdir().expect("tmp");
    let d = Daemon::start_with_env(
        tmp.path(),
        "127.0.0.1:0",
        &["--region", "1", "--peer", "2=127.0.0.1:9"],
        &[("QUIVER_TEST_DRIFT_INTERVAL_MS", "100")],
    );
    let mut c = Clients::of(&d).await;
    c.registry.apply_registry(registry()).await.expect("apply");
    // A baseline, so that the written value is sketched and the drift series exist.
    c.monitor.put_baseline(quiver_e2e::int64_baseline("user_stats", "clicks", vec![1.0])).await.expect("baseline");
    c.features.write_features(clicks("alice", now_us())).await.expect("write");
    let lookup = pb::GetOnlineFeaturesRequest {
        entity_type: "user".into(),
        entities: vec![key("alice")],
        features: vec!["user_stats:clicks".into()],
        as_of: None,
        ..Default::default()
    };
    c.features.get_online_features(lookup).await.expect("lookup");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut page = d.scrape();
    while !page.contains("quiver_feature_drift_breached{") {
        assert!(std::time::Instant::now() < deadline, "drift never measured:\n{page}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        page = d.scrape();
    }
    let exported: std::collections::BTreeSet<String> =
        page.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next().map(str::to_string)).collect();
    for file in ["quiver-alerts.yml", "grafana-dashboard.json"] {
        let text = std::fs::read_to_string(monitoring_dir().join(file)).expect("read");
        let used = metric_names(&text);
        assert!(used.len() >= 6, "{file} uses {used:?}");
        let missing: Vec<&String> = used.difference(&exported).collect();
        assert!(missing.is_empty(), "{file} uses metrics quiverd does not export: {missing:?}\n{page}");
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(monitoring_dir().join("grafana-dashboard.json")).expect("read"))
            .expect("the dashboard is JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() > 10));
}

/// An online lookup of clicks and spend for `users` (spend has a registered default, -1).
fn lookup(users: &[&str], default_missing: bool, default_unavailable: bool) -> pb::GetOnlineFeaturesRequest {
    pb::GetOnlineFeaturesRequest {
        entity_type: "user".into(),
        entities: users.iter().map(|u| key(u)).collect(),
        features: vec!["user_stats:clicks".into(), "user_stats:spend".into()],
        as_of: None,
        default_missing,
        default_unavailable,
    }
}

/// Per feature column: (statuses, int64 or float64 values as f64).
fn answers(r: &pb::GetOnlineFeaturesResponse) -> Vec<(Vec<pb::FeatureStatus>, Vec<f64>)> {
    r.columns
        .iter()
        .map(|c| {
            let statuses = c.statuses.iter().map(|&s| pb::FeatureStatus::try_from(s).expect("status")).collect();
            let values = if c.int64_values.is_empty() {
                c.float64_values.clone()
            } else {
                c.int64_values.iter().map(|&v| v as f64).collect()
            };
            (statuses, values)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_returns_hot_answers_in_time_and_the_rest_unavailable_or_defaulted() {
    use pb::FeatureStatus::*;
    let tmp = tempfile::tempdir().expect("tmp");
    // Every round of SSD reads takes a second.
    let env = [("QUIVER_TEST_SSD_READ_DELAY_MS", "1000")];
    {
        let d = Daemon::start_with_env(tmp.path(), "127.0.0.1:0", &[], &env);
        let mut c = Clients::of(&d).await;
        c.registry.apply_registry(example_registry()).await.expect("apply");
        let now = now_us();
        for user in ["hot", "cold"] {
            c.features.write_features(clicks(user, now)).await.expect("write");
        }
        // Fillers that sort between the registry, `cold` and `hot`, so that each of them sits in
        // a data block of its own (none read by the registry's load at start).
        for prefix in ["b", "d"] {
            let mut req = clicks("x", now);
            req.rows = (0..400).map(|i| clicks(&format!("{prefix}-filler-{i:04}"), now).rows.remove(0)).collect();
            c.features.write_features(req).await.expect("write fillers");
        }
        c.admin.flush(pb::FlushRequest {}).await.expect("flush to a table");
        assert!(d.stop(), "clean stop");
    }
    // Restarted, the hot tier holds nothing: what it has not been asked for is on the SSD.
    let d = Daemon::start_with_env(tmp.path(), "127.0.0.1:0", &[], &env);
    let mut c = Clients::of(&d).await;
    // Asked twice (the tier fills on a second miss), `hot` is in the hot tier; each ask waits
    // for the slow SSD.
    for _ in 0..2 {
        let r = c.features.get_online_features(lookup(&["hot"], false, false)).await.expect("lookup");
        assert_eq!(answers(r.get_ref())[0].0, vec![Present]);
    }

    // With a 300 ms deadline: `hot` is answered from memory, `cold` is not read, and the
    // answer comes well before the SSD's second.
    let timed = |req: pb::GetOnlineFeaturesRequest| {
        let mut r = tonic::Request::new(req);
        r.set_timeout(std::time::Duration::from_millis(300));
        r
    };
    let started = std::time::Instant::now();
    let r = c.features.get_online_features(timed(lookup(&["hot", "cold"], false, false))).await.expect("lookup");
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_millis(900), "answered in {took:?}, not before the deadline");
    let a = answers(r.get_ref());
    assert_eq!(a[0], (vec![Present, Unavailable], vec![1.0, 0.0]), "clicks");
    assert_eq!(a[1], (vec![Defaulted, Unavailable], vec![-1.0, 0.0]), "spend: hot has its default");

    // Asked for defaults on timeout: a complete vector (the registered default, else zero).
    let r = c.features.get_online_features(timed(lookup(&["hot", "cold"], false, true))).await.expect("lookup");
    let a = answers(r.get_ref());
    assert_eq!(a[0], (vec![Present, Defaulted], vec![1.0, 0.0]), "clicks");
    assert_eq!(a[1], (vec![Defaulted, Defaulted], vec![-1.0, -1.0]), "spend");

    // Counted: two requests cut short, four unavailable answers (two of them served as
    // defaults, which count as defaulted).
    let page = d.scrape();
    assert_eq!(d.metric("quiver_online_requests_cut_short_total"), 2, "{page}");
    let unavailable = ["group=\"user_stats\"", "feature=\"clicks\"", "status=\"unavailable\""];
    assert_eq!(series(&page, "quiver_served_values_total", &unavailable), Some(1.0), "{page}");
    assert_eq!(health(&mut c, "user_stats").await.features[1].unavailable, 1);

    // Without a deadline everything is read (slowly); default_missing completes the vector of
    // a user never written: clicks' zero value, spend's default.
    let r = c.features.get_online_features(lookup(&["cold", "nobody"], true, false)).await.expect("lookup");
    let a = answers(r.get_ref());
    assert_eq!(a[0], (vec![Present, Defaulted], vec![1.0, 0.0]), "clicks");
    assert_eq!(a[1], (vec![Defaulted, Defaulted], vec![-1.0, -1.0]), "spend");
    // A malformed deadline is refused, not ignored.
    let mut bad = tonic::Request::new(lookup(&["hot"], false, false));
    bad.metadata_mut().insert("grpc-timeout", "soon".parse().expect("ascii"));
    assert_eq!(c.features.get_online_features(bad).await.expect_err("bad timeout").code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_logging_keeps_a_stable_tenth_of_entities_as_served() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = Daemon::start(tmp.path(), &["--log-sample-rate", "0.1"]);
    let mut c = Clients::of(&d).await;
    c.registry.apply_registry(example_registry()).await.expect("apply");
    let start = now_us();
    let users: Vec<String> = (0..2000).map(|i| format!("u-{i}")).collect();
    let mut write = clicks("x", start);
    write.rows = users.iter().map(|u| clicks(u, start).rows.remove(0)).collect();
    c.features.write_features(write).await.expect("write");
    let ask = |id: &str| {
        let mut r = tonic::Request::new(lookup(&users.iter().map(String::as_str).collect::<Vec<_>>(), false, false));
        r.metadata_mut().insert("x-request-id", id.parse().expect("ascii"));
        r
    };
    c.features.get_online_features(ask("req-a")).await.expect("lookup");
    c.features.get_online_features(ask("req-b")).await.expect("lookup");
    // A request id too long is refused before anything is read.
    let e = c.features.get_online_features(ask(&"x".repeat(200))).await.expect_err("long id");
    assert_eq!(e.code(), Code::InvalidArgument);

    // The log is written behind the answers: wait for both requests' answers.
    let scan = |c: &Clients| {
        let mut m = c.monitor.clone();
        async move {
            let req = pb::ScanServedLogRequest { from: ts(start), to: ts(now_us() + 60_000_000) };
            let mut s = m.scan_served_log(req).await.expect("scan").into_inner();
            let mut out = Vec::new();
            while let Some(chunk) = s.message().await.expect("chunk") {
                out.extend(chunk.answers);
            }
            out
        }
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let logged = loop {
        let logged = scan(&c).await;
        let written = d.metric("quiver_served_log_answers_total");
        if written as usize == logged.len() && logged.iter().any(|a| a.request_id == "req-b") {
            break logged;
        }
        assert!(std::time::Instant::now() < deadline, "the log did not catch up: {} answers", logged.len());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let entities = |id: &str| -> Vec<pb::EntityKey> {
        logged.iter().filter(|a| a.request_id == id).filter_map(|a| a.entity.clone()).collect()
    };
    let (a, b) = (entities("req-a"), entities("req-b"));
    // About a tenth (2000 x 0.1 = 200; sd 13), and the same entities both times.
    assert!((140..=260).contains(&a.len()), "{} of 2000 entities logged", a.len());
    assert_eq!(a, b, "sampling is stable per entity");
    assert_eq!(logged.len(), a.len() + b.len());
    for answer in &logged {
        assert_eq!(answer.entity_type, "user");
        let served = answer.served_at.as_ref().and_then(quiver_testkit::timestamp_to_micros);
        assert!(served.is_some_and(|s| s >= start), "{answer:?}");
        assert_eq!(answer.features.len(), 2);
        let (clicks_f, spend_f) = (&answer.features[0], &answer.features[1]);
        assert_eq!(
            (clicks_f.feature_ref.as_str(), clicks_f.status),
            ("user_stats:clicks", pb::FeatureStatus::Present as i32)
        );
        assert_eq!((clicks_f.value.clone(), clicks_f.event_time_us), (Some(int(1)), start));
        assert_eq!(spend_f.status, pb::FeatureStatus::Defaulted as i32);
    }
    // A scan range must be a range.
    let bad = pb::ScanServedLogRequest { from: ts(start), to: ts(start) };
    assert_eq!(c.monitor.scan_served_log(bad).await.expect_err("empty range").code(), Code::InvalidArgument);

    // The group's own rate overrides the server's: 0 logs nothing more.
    let mut reg = example_registry();
    reg.feature_groups[0].log_sample_rate = Some(0.0);
    reg.promote = true;
    c.registry.apply_registry(reg).await.expect("apply");
    c.features.get_online_features(ask("req-c")).await.expect("lookup");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(scan(&c).await.iter().all(|a| a.request_id != "req-c"));
}
