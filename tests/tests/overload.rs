//! Overload against a real quiverd: requests whose answers would be huge are refused before
//! they allocate, a flood of concurrent ones is shed with retry advice, and the daemon's peak
//! RSS stays within its memory budget throughout.

use quiver_e2e::{example_registry, key, ts, Clients, Daemon};
use quiver_proto::v1 as pb;
use tonic::Code;

/// quiverd's memory budget in this test: requests in flight may hold 1/8 of it (32 MiB).
const BUDGET_MB: u64 = 256;
const VALUE_BYTES: usize = 20_000;
const ENTITIES: usize = 100;

fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_micros() as i64
}

/// Peak resident memory of a process, in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

fn lookup(entities: usize, repeats: usize) -> pb::GetOnlineFeaturesRequest {
    pb::GetOnlineFeaturesRequest {
        entity_type: "user".into(),
        entities: (0..entities).map(|i| key(&format!("u{i}"))).collect(),
        features: vec!["blobs:blob".to_string(); repeats],
        as_of: None,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_answers_are_refused_and_a_flood_is_shed_within_the_memory_budget() {
    let tmp = tempfile::tempdir().expect("tmp");
    let budget = BUDGET_MB.to_string();
    let d = Daemon::start(tmp.path(), &["--max-concurrent-requests", "8", "--memory-budget-mb", &budget]);
    let mut c = Clients::of(&d).await;
    let mut reg = example_registry();
    let mut blobs = reg.feature_groups[0].clone();
    blobs.name = "blobs".into();
    blobs.features = vec![pb::FeatureDef {
        name: "blob".into(),
        r#type: pb::ValueType::String as i32,
        default_value: None,
        description: String::new(),
        ..Default::default()
    }];
    reg.feature_groups = vec![blobs];
    c.registry.apply_registry(reg).await.expect("apply");
    let blob = "x".repeat(VALUE_BYTES);
    let rows = (0..ENTITIES)
        .map(|i| pb::WriteRow {
            entity: Some(key(&format!("u{i}"))),
            group: "blobs".into(),
            event_time: ts(now_us()),
            values: [("blob".to_string(), pb::Value { kind: Some(pb::value::Kind::StringValue(blob.clone())) })]
                .into_iter()
                .collect(),
            ..Default::default()
        })
        .collect();
    c.features.write_features(pb::WriteFeaturesRequest { rows, ..Default::default() }).await.expect("write");
    let before_kib = peak_rss_kib(d.pid());

    // 100 entities x 150 repeats of a 20 KB feature: a 300 MB answer from a 20 KB request.
    let huge = c.features.get_online_features(lookup(ENTITIES, 150)).await.expect_err("too large");
    assert_eq!(huge.code(), Code::ResourceExhausted);
    assert!(huge.message().contains("ONLINE_ANSWER_BYTES_MAX"), "{}", huge.message());
    // One that fits is served whole.
    let ok = c.features.get_online_features(lookup(20, 2)).await.expect("fits").into_inner();
    assert_eq!(ok.columns[1].string_values[19].len(), VALUE_BYTES);
    assert_eq!(ok.columns[0], ok.columns[1], "a feature named twice answers the same in both columns");

    // 32 clients, each sending the huge request and ones of about 4 MB, at once.
    let mut tasks = Vec::new();
    for t in 0..32 {
        let mut c = Clients::of(&d).await;
        tasks.push(tokio::spawn(async move {
            let (mut served, mut shed, mut too_large) = (0, 0, 0);
            for i in 0..10 {
                let huge = (t + i) % 3 == 0;
                let req = if huge { lookup(ENTITIES, 150) } else { lookup(ENTITIES, 1) };
                match c.features.get_online_features(req).await {
                    Ok(_) if huge => panic!("a 300 MB answer was served"),
                    Ok(r) => {
                        assert_eq!(r.into_inner().columns[0].string_values.len(), ENTITIES);
                        served += 1;
                    }
                    Err(s) if s.message().contains("ONLINE_ANSWER_BYTES_MAX") => too_large += 1,
                    Err(s) => {
                        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                        shed += 1;
                    }
                }
            }
            (served, shed, too_large)
        }));
    }
    let (mut served, mut shed, mut too_large) = (0, 0, 0);
    for t in tasks {
        let (a, b, c) = t.await.expect("client task");
        served += a;
        shed += b;
        too_large += c;
    }
    eprintln!("served {served}, shed {shed}, too large {too_large}, peak RSS {} KiB", peak_rss_kib(d.pid()));
    assert!(too_large > 0, "huge requests that are not shed first are refused as too large");
    assert!(served > 0 && shed > 0, "served {served}, shed {shed}");
    let peak_kib = peak_rss_kib(d.pid());
    assert!(
        peak_kib < BUDGET_MB * 1024,
        "quiverd's peak RSS {peak_kib} KiB passed its {BUDGET_MB} MiB budget (it was {before_kib} KiB before the flood)"
    );
    let shed_metric = d.metric("quiver_requests_shed_total");
    assert!(shed_metric >= shed as u64, "metrics count {shed_metric} shed, the clients saw {shed}");
    assert_eq!(d.metric("quiver_request_bytes_in_flight"), 0, "every reservation was returned");
    let after = c.features.get_online_features(lookup(20, 2)).await.expect("served after the flood");
    assert_eq!(after.into_inner().columns[0].string_values.len(), 20);
    assert!(d.stop());
}
