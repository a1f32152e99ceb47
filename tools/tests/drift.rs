//! Drift end to end: a baseline captured from a training file with `quiver baseline capture`,
//! served values logged by a real quiverd, and the PSI, Jensen–Shannon and KS figures of
//! `quiver drift` checked against numpy and scipy (`drift_check.py`, run with
//! `$QUIVER_TEST_PYTHON`, else `python3`; .ci/run makes a venv with both).

use std::collections::BTreeMap;
use std::process::Command;

use quiver_e2e::{key, ts, Clients, Daemon};
use quiver_proto::v1 as pb;
use serde_json::{json, Value as Json};

fn quiver(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_quiver")).args(args).output().expect("run quiver");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const REGISTRY: &str = r#"
[[entity_types]]
name = "user"
join_keys = [{ name = "user_id", type = "string" }]

[[feature_groups]]
name = "g"
entity_type = "user"
ttl = "1d"
[[feature_groups.features]]
name = "x"
type = "float64"
[[feature_groups.features]]
name = "c"
type = "string"
max_psi = 50.0
[[feature_groups.features]]
name = "v"
type = "float32_vector"
dim = 2
[[feature_groups.features]]
name = "n"
type = "int64"
[[feature_groups.features]]
name = "blob"
type = "bytes"
"#;

/// One training row or served answer: x, c, v (as its two elements), n; `None` is null.
type Row = (Option<f64>, Option<String>, Option<[f32; 2]>, Option<i64>);

fn training(i: u64) -> Row {
    let x = (!i.is_multiple_of(25)).then(|| ((i * 37) % 97) as f64 / 8.0);
    let c = match i % 10 {
        0..=4 => "a",
        5..=7 => "b",
        _ => "c",
    };
    (x, Some(c.to_string()), Some([(i % 5) as f32, (i % 7) as f32]), None)
}

/// What user `i` is served (users 250.. are never written: every feature NOT_FOUND).
fn current(i: u64) -> Row {
    if i >= 250 {
        return (None, None, None, None);
    }
    let c = match i % 10 {
        0..=1 => "a",
        2..=5 => "b",
        6..=8 => "c",
        _ => "d",
    };
    let x = ((i * 53) % 97) as f64 / 8.0 + 3.0;
    (Some(x), Some(c.to_string()), Some([(i % 6 + 1) as f32, (i % 4) as f32]), i.is_multiple_of(2).then_some(i as i64))
}

fn norm(v: [f32; 2]) -> f64 {
    (f64::from(v[0]) * f64::from(v[0]) + f64::from(v[1]) * f64::from(v[1])).sqrt()
}

/// Per feature, the values of `rows` as drift sees them (vectors by their norm).
fn columns(rows: &[Row]) -> BTreeMap<&'static str, Vec<Json>> {
    let mut out = BTreeMap::new();
    out.insert("x", rows.iter().map(|r| json!(r.0)).collect());
    out.insert("c", rows.iter().map(|r| json!(r.1)).collect());
    out.insert("v", rows.iter().map(|r| json!(r.2.map(norm))).collect());
    out.insert("n", rows.iter().map(|r| json!(r.3.map(|n| n as f64))).collect());
    out
}

fn python() -> String {
    std::env::var("QUIVER_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// The statistics drift_check.py computes for `request`.
fn independent(request: &Json) -> Json {
    use std::io::Write;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/drift_check.py");
    let mut child = Command::new(python())
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e} (set QUIVER_TEST_PYTHON to a Python with numpy and scipy)", python()));
    child.stdin.take().expect("stdin").write_all(request.to_string().as_bytes()).expect("write request");
    let out = child.wait_with_output().expect("drift_check.py");
    assert!(
        out.status.success(),
        "drift_check.py failed (it needs numpy and scipy: .ci/run installs them in a venv and sets QUIVER_TEST_PYTHON):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from drift_check.py")
}

fn close(a: &Json, b: &Json, what: &str) {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => assert!((x - y).abs() <= 1e-9 * (1.0 + y.abs()), "{what}: quiver {x}, independent {y}"),
        _ => assert_eq!(a.is_null(), b.is_null(), "{what}: quiver {a}, independent {b}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_against_a_captured_baseline_matches_scipy() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = Daemon::start_with_env(
        &tmp.path().join("data"),
        "127.0.0.1:0",
        &["--log-sample-rate", "1"],
        &[("QUIVER_TEST_DRIFT_INTERVAL_MS", "200")],
    );
    let addr = d.addr.clone();
    let file = tmp.path().join("registry.toml");
    std::fs::write(&file, REGISTRY).expect("registry file");
    let (code, _, err) = quiver(&["--addr", &addr, "apply", file.to_str().expect("path")]);
    assert_eq!(code, Some(0), "{err}");

    // The training file, as `quiver join` would write it (columns named by feature).
    let train: Vec<Row> = (0..500).map(training).collect();
    let mut csv = String::from("user_id,event_time,x,c,v,n\n");
    for (i, r) in train.iter().enumerate() {
        let x = r.0.map_or(String::new(), |x| x.to_string());
        let v = r.2.map_or(String::new(), |v| format!("\"{},{}\"", v[0], v[1]));
        csv += &format!("u{i},1000,{x},{},{v},\n", r.1.as_deref().unwrap_or(""));
    }
    let csv_path = tmp.path().join("training.csv");
    std::fs::write(&csv_path, csv).expect("csv");
    let csv_arg = csv_path.to_str().expect("path");
    let (code, out, err) =
        quiver(&["--addr", &addr, "baseline", "capture", "--from", csv_arg, "--name", "v1", "--group", "g"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("baseline v1 of g: 4 features from"), "{out}");
    assert!(out.contains("    n: 500 rows, 500 null"), "{out}");

    // Bad input is refused, names the problem, and stores nothing.
    let (code, _, err) =
        quiver(&["--addr", &addr, "baseline", "capture", "--from", csv_arg, "--name", "Bad!", "--group", "g"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("InvalidArgument") && err.contains("baseline name"), "{err}");
    let (code, _, err) =
        quiver(&["--addr", &addr, "baseline", "capture", "--from", csv_arg, "--name", "v2", "--group", "nope"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("NotFound"), "{err}");
    let bad_csv = tmp.path().join("bad.csv");
    std::fs::write(&bad_csv, "user_id,x\nu1,1.5\nu2,lots\n").expect("csv");
    let (code, _, err) = quiver(&[
        "--addr",
        &addr,
        "baseline",
        "capture",
        "--from",
        bad_csv.to_str().expect("path"),
        "--name",
        "v2",
        "--group",
        "g",
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("bad.csv: line 3, column x"), "{err}");
    let (code, _, err) = quiver(&["--addr", &addr, "drift", "--group", "g", "--baseline", "v2"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("NotFound") && err.contains("no baseline \"v2\""), "{err}");
    let mut c = Clients::of(&d).await;
    let refused = c
        .monitor
        .put_baseline(pb::PutBaselineRequest {
            baseline: Some(pb::Baseline {
                group: "g".into(),
                name: "v3".into(),
                features: vec![pb::FeatureBaseline {
                    feature: "x".into(),
                    r#type: pb::ValueType::Float64 as i32,
                    rows: 1,
                    nulls: 0,
                    summary: Some(pb::feature_baseline::Summary::Numeric(pb::NumericSummary {
                        edges: vec![2.0, 1.0],
                        counts: vec![0, 1, 0],
                        sample: vec![1.5],
                    })),
                }],
                ..Default::default()
            }),
        })
        .await
        .expect_err("edges out of order");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");

    // Serve: 250 users written, 50 never (NOT_FOUND), every answer logged.
    let cur: Vec<Row> = (0..300).map(current).collect();
    let now = quiver_testkit::now_us();
    let rows = cur
        .iter()
        .enumerate()
        .filter(|(_, r)| r.0.is_some())
        .map(|(i, r)| {
            let mut values = BTreeMap::new();
            let val = |k| pb::Value { kind: Some(k) };
            use pb::value::Kind;
            values.insert("x".to_string(), val(Kind::Float64Value(r.0.expect("x"))));
            values.insert("c".to_string(), val(Kind::StringValue(r.1.clone().expect("c"))));
            let v = r.2.expect("v").to_vec();
            values.insert("v".to_string(), val(Kind::Float32Vector(pb::Float32List { values: v })));
            if let Some(n) = r.3 {
                values.insert("n".to_string(), val(Kind::Int64Value(n)));
            }
            pb::WriteRow {
                entity: Some(key(&format!("u{i}"))),
                group: "g".into(),
                event_time: ts(now - 1_000_000),
                values: values.into_iter().collect(),
                ..Default::default()
            }
        })
        .collect();
    c.features.write_features(pb::WriteFeaturesRequest { rows, ..Default::default() }).await.expect("write");
    let lookup = pb::GetOnlineFeaturesRequest {
        entity_type: "user".into(),
        entities: (0..300).map(|i| key(&format!("u{i}"))).collect(),
        features: ["g:x", "g:c", "g:v", "g:n"].map(String::from).to_vec(),
        ..Default::default()
    };
    c.features.get_online_features(lookup).await.expect("lookup");

    // The log is written off the serving path: wait until every answer is in it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let measured = loop {
        let (code, out, err) = quiver(&["--addr", &addr, "--json", "drift", "--group", "g"]);
        assert!(code == Some(0) || code == Some(2), "{err}");
        let m: Json = serde_json::from_str(out.trim()).expect("JSON");
        if m["answers"] == 300 {
            assert_eq!(code, Some(2), "x moved: a breach exits 2\n{m}");
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "the log never held 300 answers: {m}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(measured["baseline"], "v1");

    // The same figures, independently: numpy for the shares and PSI, scipy for JS and KS.
    let (code, out, err) = quiver(&["--addr", &addr, "--json", "baseline", "list", "--group", "g"]);
    assert_eq!(code, Some(0), "{err}");
    let listed: Json = serde_json::from_str(out.trim()).expect("JSON");
    let stored = &listed["baselines"][0];
    assert_eq!((&stored["name"], &stored["source"]), (&json!("v1"), &json!("training.csv")), "{listed}");
    let (base_cols, cur_cols) = (columns(&train), columns(&cur));
    let features: Vec<Json> = stored["features"]
        .as_array()
        .expect("features")
        .iter()
        .map(|f| {
            let name = f["feature"].as_str().expect("name");
            let numeric = !f["edges"].is_null();
            json!({
                "feature": name,
                "kind": if numeric { "numeric" } else { "categorical" },
                "edges": f["edges"],
                "categories": f["categories"],
                "baseline": base_cols[name],
                "current": cur_cols[name],
            })
        })
        .collect();
    assert_eq!(features.len(), 4, "blob (bytes) has no baseline: {listed}");
    let check = |measured: &Json, features: Vec<Json>| {
        let want = independent(&json!({ "features": features }));
        assert_eq!(measured["features"].as_array().map(Vec::len), Some(4), "{measured}");
        for f in measured["features"].as_array().expect("features") {
            let name = f["feature"].as_str().expect("name");
            let w = &want[name];
            assert_eq!(w["edges_ok"], true, "{name}: stored edges or categories differ from the deciles: {listed}");
            for stat in ["psi", "js", "ks"] {
                close(&f[stat], &w[stat], &format!("{} {name} {stat}", measured["source"]));
            }
            let psi_over = f["psi"].as_f64().is_some_and(|p| p > f["max_psi"].as_f64().expect("max_psi"));
            let ks_over = f["ks"].as_f64().is_some_and(|k| k > f["max_ks"].as_f64().expect("max_ks"));
            assert_eq!(f["breached"], json!(psi_over || ks_over), "{f}");
        }
    };
    check(&measured, features.clone());

    // The written values, sketched on the write path: only what was written (n for half the
    // users), no nulls.
    let (code, out, err) = quiver(&["--addr", &addr, "--json", "drift", "--group", "g", "--ingested"]);
    assert_eq!(code, Some(2), "{out}{err}");
    let ingested: Json = serde_json::from_str(out.trim()).expect("JSON");
    assert_eq!(ingested["source"], "ingested", "{ingested}");
    let written: Vec<Row> = cur.iter().filter(|r| r.0.is_some()).cloned().collect();
    let written_cols = columns(&written);
    let ingested_features: Vec<Json> = features
        .iter()
        .map(|f| {
            let name = f["feature"].as_str().expect("name");
            let values: Vec<Json> = written_cols[name].iter().filter(|v| !v.is_null()).cloned().collect();
            // Written values are compared over values only: the baseline's nulls are left out.
            let base: Vec<Json> =
                f["baseline"].as_array().expect("baseline").iter().filter(|v| !v.is_null()).cloned().collect();
            let mut f = f.clone();
            f["current"] = json!(values);
            f["baseline"] = json!(base);
            f
        })
        .collect();
    check(&ingested, ingested_features);
    let n = ingested["features"].as_array().expect("features").iter().find(|f| f["feature"] == "n").cloned();
    assert_eq!(n.map(|n| (n["values"].clone(), n["nulls"].clone())), Some((json!(125), json!(0))), "{ingested}");
    // x is 4% null in training: compared over values, its written values drift by their shift
    // alone (an unchanged x would not breach for want of nulls).
    let x = ingested["features"].as_array().expect("features").iter().find(|f| f["feature"] == "x").cloned();
    assert_eq!(x.map(|x| x["breached"].clone()), Some(json!(true)), "{ingested}");
    let (code, _, err) = quiver(&["--addr", &addr, "drift", "--group", "g", "--ingested", "--baseline", "old"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("NotFound") && err.contains("no baseline \"old\""), "{err}");
    let by_name = |n: &str| {
        measured["features"].as_array().expect("features").iter().find(|f| f["feature"] == n).cloned().expect(n)
    };
    // The all-null baseline has no KS; the shifted x breaches; c's bound is the registry's.
    assert!(by_name("n")["ks"].is_null() && by_name("n")["psi"].as_f64().expect("psi") > 0.0);
    assert_eq!((by_name("x")["values"].clone(), by_name("x")["nulls"].clone()), (json!(250), json!(50)));
    assert_eq!(by_name("x")["breached"], true);
    assert_eq!(by_name("c")["max_psi"], 50.0);

    // The gauges and `quiver monitor` carry the last measurement (every 200 ms here).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let x_psi = by_name("x")["psi"].as_f64().expect("psi");
    loop {
        let page = d.scrape();
        let gauge = page.lines().find(|l| {
            l.starts_with("quiver_feature_drift{")
                && l.contains("feature=\"x\"")
                && l.contains("stat=\"psi\"")
                && l.contains("source=\"served\"")
        });
        if let Some(v) = gauge.and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse::<f64>().ok()) {
            if (v - x_psi).abs() < 1e-9 {
                assert!(page.lines().any(|l| l.starts_with("quiver_feature_drift_breached{")
                    && l.contains("feature=\"x\"")
                    && l.contains("source=\"served\"")
                    && l.ends_with(" 1")));
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no drift gauge for x at {x_psi}:\n{page}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (code, out, _) = quiver(&["--addr", &addr, "monitor", "--group", "g"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("drift against baseline v1 (300 logged answers in the last hour):"), "{out}");
    assert!(out.lines().any(|l| l.trim_start().starts_with("x: psi ") && l.ends_with("BREACHED")), "{out}");
    assert!(out.contains("drift of the values written here in the last hour, against baseline v1:"), "{out}");
    let page = d.scrape();
    assert!(
        page.lines().any(|l| l.starts_with("quiver_feature_drift{")
            && l.contains("source=\"ingested\"")
            && l.contains("feature=\"x\"")),
        "{page}"
    );
}
