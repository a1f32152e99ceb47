//! `quiver backfill` end to end against a real quiverd: a load into a staged version killed
//! with SIGKILL mid-way and resumed leaves every value exactly once; a copy of an unchanged
//! feature from the serving version; refusals (the serving version, shared features, another
//! file's progress).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use quiver_e2e::{key, Clients, Daemon};
use quiver_proto::v1 as pb;

fn quiver(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_quiver")).args(args).output().expect("run quiver");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const REGISTRY: &str = r#"
[[entity_types]]
name = "user"
join_keys = [{ name = "user_id", type = "string" }]

[[feature_groups]]
name = "user_stats"
entity_type = "user"
code_hash = "CODE"
[[feature_groups.features]]
name = "clicks"
type = "int64"
[[feature_groups.features]]
name = "spend"
type = "float64"
"#;

const USERS: usize = 400;
const EVENTS: i64 = 100;
const T0: i64 = 1_767_225_600_000_000;

fn apply(addr: &str, dir: &std::path::Path, code: &str) -> String {
    let file = dir.join(format!("registry-{code}.toml"));
    std::fs::write(&file, REGISTRY.replace("CODE", code)).expect("write registry");
    let (ok, out, err) = quiver(&["--addr", addr, "apply", file.to_str().expect("path")]);
    assert!(ok, "{err}");
    out
}

/// Every version of `user`'s features in `group@v`, as (feature ref, event µs, value).
async fn history(c: &mut Clients, user: &str, group: &str) -> Vec<(String, i64, Option<pb::Value>)> {
    let req = pb::ScanHistoryRequest {
        entity_type: "user".into(),
        entity: Some(key(user)),
        group: group.into(),
        ..Default::default()
    };
    let mut s = c.features.scan_history(req).await.expect("scan").into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = s.message().await.expect("chunk") {
        for v in chunk.versions {
            let t = v.event_time.map(|t| t.seconds * 1_000_000 + i64::from(t.nanos / 1000)).unwrap_or(0);
            out.push((v.feature_ref, t, v.value));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backfill_resumes_with_every_value_once_and_a_copy_fills_unchanged_features() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = Daemon::start(&tmp.path().join("data"), &[]);
    let addr = d.addr.clone();
    apply(&addr, tmp.path(), "a");
    // v1's spend, served, to be copied.
    let mut c = Clients::of(&d).await;
    let rows: Vec<pb::WriteRow> = (0..20)
        .map(|u| pb::WriteRow {
            entity: Some(key(&format!("u{u:04}"))),
            group: "user_stats".into(),
            event_time: quiver_e2e::ts(T0),
            values: [("spend".to_string(), pb::Value { kind: Some(pb::value::Kind::Float64Value(u as f64 / 4.0)) })]
                .into_iter()
                .collect(),
            ..Default::default()
        })
        .collect();
    c.features.write_features(pb::WriteFeaturesRequest { rows, ..Default::default() }).await.expect("write v1");
    let out = apply(&addr, tmp.path(), "b");
    assert!(out.contains("(v2) staged"), "{out}");

    // The recomputed clicks for v2, as CSV.
    let csv = tmp.path().join("clicks.csv");
    let mut body = String::from("user_id,event_time,clicks\n");
    for u in 0..USERS {
        for e in 0..EVENTS {
            body.push_str(&format!("u{u:04},{},{}\n", T0 + e * 1_000_000, u as i64 * 1_000 + e));
        }
    }
    std::fs::write(&csv, body).expect("write csv");
    let progress = tmp.path().join("progress.json");
    let args = [
        "--addr",
        &addr,
        "backfill",
        "--group",
        "user_stats@2",
        "--from",
        csv.to_str().expect("path"),
        "--batch-rows",
        "200",
        "--progress-file",
        progress.to_str().expect("path"),
    ];

    // SIGKILL once some batches are recorded and before the end.
    let total = (USERS as u64) * EVENTS as u64;
    let mut child = Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(60);
    let killed_at = loop {
        let done: u64 = std::fs::read_to_string(&progress)
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["rows_done"].as_u64())
            .unwrap_or(0);
        if done >= 2_000 {
            child.kill().expect("SIGKILL");
            let _ = child.wait();
            break done;
        }
        assert!(Instant::now() < deadline, "the backfill made no progress");
        assert!(child.try_wait().expect("wait").is_none(), "the backfill ended before it could be killed");
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(killed_at < total, "killed mid-way");
    // A crash between a batch's commit and its record: rewind the record by three batches. The
    // resumed run sends them again with the same idempotency keys; the server answers them
    // from their records instead of writing them twice.
    let mut saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&progress).expect("read progress")).expect("json");
    let rows_done = saved["rows_done"].as_u64().expect("rows_done");
    saved["rows_done"] = serde_json::json!(rows_done - 600);
    std::fs::write(&progress, saved.to_string()).expect("rewind");

    let (ok, out, err) = quiver(&args);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("(resumed after {} rows)", rows_done - 600)), "{out}");
    let already: u64 = out
        .split("; ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(already >= 3, "the rewound batches were answered from their records: {out}");
    let (ok, out, _) = quiver(&args);
    assert!(ok && out.contains("already complete"), "{out}");

    // Every (user, event) exactly once in v2, with the file's value; v1 untouched.
    for u in (0..USERS).step_by(7) {
        let user = format!("u{u:04}");
        let h = history(&mut c, &user, "user_stats@2").await;
        let clicks: Vec<_> = h.iter().filter(|v| v.0 == "user_stats@2:clicks").collect();
        assert_eq!(clicks.len(), EVENTS as usize, "{user}: a value missing or written twice");
        for (i, v) in clicks.iter().enumerate() {
            let e = EVENTS - 1 - i as i64; // newest first
            assert_eq!(v.1, T0 + e * 1_000_000);
            assert_eq!(
                v.2.as_ref().and_then(|x| x.kind.clone()),
                Some(pb::value::Kind::Int64Value(u as i64 * 1_000 + e))
            );
        }
        assert!(history(&mut c, &user, "user_stats@1").await.iter().all(|v| v.0 != "user_stats@1:clicks"));
    }

    // spend did not change: copy it from v1 inside the engine.
    let (ok, out, err) = quiver(&[
        "--addr",
        &addr,
        "backfill",
        "--group",
        "user_stats@2",
        "--copy-from",
        "1",
        "--feature",
        "spend",
        "--progress-file",
        tmp.path().join("copy.json").to_str().expect("path"),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("copied 20 cells of 20 entities (spend) from v1"), "{out}");
    for u in 0..20 {
        let h = history(&mut c, &format!("u{u:04}"), "user_stats@2").await;
        let spend: Vec<_> = h.iter().filter(|v| v.0 == "user_stats@2:spend").collect();
        assert_eq!(spend.len(), 1);
        assert_eq!(
            spend[0].2.as_ref().and_then(|x| x.kind.clone()),
            Some(pb::value::Kind::Float64Value(u as f64 / 4.0))
        );
    }

    // Refusals: the serving version; a progress file of another job; a column the serving
    // version shares (v3 only edits metadata, so its clicks is v2's... once v2 serves).
    let (ok, _, err) = quiver(&["--addr", &addr, "backfill", "--group", "user_stats@1", "--copy-from", "2"]);
    assert!(!ok && err.contains("is the serving version"), "{err}");
    let other = tmp.path().join("other.csv");
    std::fs::write(&other, "user_id,event_time,clicks\nu1,1,1\n").expect("write");
    let mut a = args.to_vec();
    a[6] = other.to_str().expect("path");
    let (ok, _, err) = quiver(&a);
    assert!(!ok && err.contains("is for another backfill"), "{err}");
    let (ok, _, err) = quiver(&["--addr", &addr, "promote", "user_stats@2"]);
    assert!(ok, "{err}");
    let v3 = tmp.path().join("registry-v3.toml");
    std::fs::write(
        &v3,
        REGISTRY.replace("CODE", "b").replace("name = \"spend\"", "name = \"spend\"\ndescription = \"v3\""),
    )
    .expect("write");
    let (ok, out, err) = quiver(&["--addr", &addr, "apply", v3.to_str().expect("path")]);
    assert!(ok && out.contains("(v3) staged"), "{out}{err}");
    let (ok, _, err) = quiver(&[
        "--addr",
        &addr,
        "backfill",
        "--group",
        "user_stats@3",
        "--from",
        other.to_str().expect("path"),
        "--progress-file",
        tmp.path().join("v3.json").to_str().expect("path"),
    ]);
    assert!(!ok && err.contains("shares its data with the serving version"), "{err}");
    let (ok, _, err) = quiver(&["--addr", &addr, "backfill", "--group", "user_stats", "--copy-from", "1"]);
    assert!(!ok && err.contains("must name a version"), "{err}");
}
