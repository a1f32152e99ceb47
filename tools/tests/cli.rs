//! The `quiver` command line end to end: the demo's output, registry apply / re-apply / dry
//! run, put and get against a real quiverd, admin commands, offline verify, and one-line errors.

use std::process::Command;

use quiver_e2e::Daemon;

fn quiver(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_quiver")).args(args).output().expect("run quiver");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn demo_runs_and_reports_lookups_and_the_join() {
    let (ok, out, err) = quiver(&["demo", "--users", "300", "--hours", "6"]);
    assert!(ok, "demo failed: {err}");
    for needle in [
        "registry: entity_type:user v1",
        "registry: feature_group:user_activity v1",
        "ingest: 5400 feature values (300 users x 3 features x 6 hours)",
        "online lookup: 100 users x 3 features, 300 values present",
        "user-000000: clicks_1h=",
        "point-in-time join: 10000 spine rows -> 10000 output rows, 10000 with clicks_1h within the 2 h TTL",
        "demo: done",
    ] {
        assert!(out.contains(needle), "{needle:?} missing from demo output:\n{out}");
    }
}

#[test]
fn apply_put_get_admin_and_verify_against_a_real_server() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let d = Daemon::start(&data, &[]);
    let addr = d.addr.clone();
    let file = tmp.path().join("registry.toml");
    std::fs::write(
        &file,
        r#"
[[entity_types]]
name = "user"
join_keys = [{ name = "user_id", type = "string" }]

[[feature_groups]]
name = "user_stats"
entity_type = "user"
ttl = "1h"
[[feature_groups.features]]
name = "clicks"
type = "int64"
[[feature_groups.features]]
name = "tags"
type = "string_list"
"#,
    )
    .expect("write file");
    let f = file.to_str().expect("path");
    let (ok, out, err) = quiver(&["--addr", &addr, "apply", f, "--dry-run"]);
    assert!(ok, "{err}");
    assert!(out.contains("create feature_group:user_stats (v1) [dry run]"), "{out}");
    let (ok, out, _) = quiver(&["--addr", &addr, "apply", f]);
    assert!(ok && out.contains("create entity_type:user (v1)") && out.contains("+ feature clicks: Int64"), "{out}");
    let (ok, out, _) = quiver(&["--addr", &addr, "apply", f]);
    assert!(ok && out.contains("unchanged feature_group:user_stats (v1)"), "{out}");

    let (ok, out, err) =
        quiver(&["--addr", &addr, "put", "--group", "user_stats", "--entity", "alice", "clicks=7", "tags=a,b"]);
    assert!(ok, "{err}");
    assert!(out.contains("wrote 2 values"), "{out}");
    let (ok, out, err) = quiver(&[
        "--addr",
        &addr,
        "get",
        "--entity-type",
        "user",
        "--entity",
        "alice",
        "--entity",
        "bob",
        "--feature",
        "user_stats:clicks",
        "--feature",
        "user_stats:tags",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("alice: user_stats:clicks=7  user_stats:tags=[\"a\", \"b\"]"), "{out}");
    assert!(out.contains("bob: user_stats:clicks=(not_found)"), "{out}");
    let (ok, out, _) = quiver(&[
        "--addr",
        &addr,
        "--json",
        "get",
        "--entity-type",
        "user",
        "--entity",
        "alice",
        "--feature",
        "user_stats:clicks",
    ]);
    assert!(ok && out.trim() == r#"{"entity":"alice","user_stats:clicks":"7"}"#, "{out}");

    for (args, needle) in [
        (vec!["put", "--group", "user_stats", "--entity", "alice", "clicks=seven"], "is not a Int64"),
        (vec!["put", "--group", "user_stats", "--entity", "alice", "nope=1"], "no feature \"nope\""),
        (vec!["get", "--entity-type", "ghost", "--entity", "a", "--feature", "user_stats:clicks"], "NotFound"),
    ] {
        let mut a = vec!["--addr", addr.as_str()];
        a.extend(args);
        let (ok, out, err) = quiver(&a);
        assert!(!ok && out.is_empty(), "{a:?} should fail");
        assert!(err.starts_with("quiver: ") && err.trim().lines().count() == 1 && err.contains(needle), "{a:?}: {err}");
    }
    // CSV bulk load: checked whole before anything is sent; batches are atomic.
    let csv = tmp.path().join("load.csv");
    let mut text = String::from("user_id,event_time,clicks,tags\n");
    for i in 0..2500 {
        text.push_str(&format!("bulk{i},{},{i},\n", 1_000_000 + i));
    }
    std::fs::write(&csv, &text).expect("csv");
    let (ok, out, err) = quiver(&[
        "--addr",
        &addr,
        "ingest",
        csv.to_str().expect("path"),
        "--group",
        "user_stats",
        "--batch-rows",
        "1000",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("ingested 2500 rows, 2500 values in 3 batches"), "{out}");
    let (ok, out, _) = quiver(&[
        "--addr",
        &addr,
        "get",
        "--entity-type",
        "user",
        "--entity",
        "bulk2499",
        "--feature",
        "user_stats:clicks",
    ]);
    assert!(ok && out.contains("bulk2499: user_stats:clicks="), "{out}");
    let bad_csv = tmp.path().join("bad.csv");
    std::fs::write(&bad_csv, "user_id,event_time,clicks\nzed,1,1\nzed2,2,two\n").expect("csv");
    let (ok, _, err) = quiver(&["--addr", &addr, "ingest", bad_csv.to_str().expect("path"), "--group", "user_stats"]);
    assert!(!ok && err.contains("line 3") && err.contains("clicks"), "{err}");
    let (ok, out, _) =
        quiver(&["--addr", &addr, "get", "--entity-type", "user", "--entity", "zed", "--feature", "user_stats:clicks"]);
    assert!(ok && out.contains("(not_found)"), "a rejected file writes nothing: {out}");
    let (ok, out, _) = quiver(&["--addr", &addr, "admin", "flush"]);
    assert!(ok && out.contains("flushed"));
    let (ok, out, _) = quiver(&["--addr", &addr, "admin", "stats"]);
    assert!(ok && out.contains("L0: 1 tables"), "{out}");
    let (ok, out, _) = quiver(&["--addr", &addr, "admin", "verify"]);
    assert!(ok && out.starts_with("ok:"), "{out}");
    let range = ["--addr", &addr, "admin", "compact", "--entity-type", "user", "--from", "bulk0"];
    let (ok, out, err) = quiver(&[&range[..], &["--to", "bulk5"]].concat());
    assert!(ok && out.contains("compacted"), "{out}{err}");
    let (ok, out, _) = quiver(&["--addr", &addr, "admin", "stats"]);
    assert!(ok && out.contains("L0: 0 tables") && out.contains("L1: 1 tables"), "the range moved down: {out}");
    let (ok, _, err) = quiver(&[&range[..], &["--to", "bulk0"]].concat());
    assert!(!ok && err.contains("InvalidArgument") && err.contains("after range.start"), "{err}");
    let (ok, _, err) = quiver(&["--addr", &addr, "admin", "compact", "--entity-type", "ghost", "--from", "x"]);
    assert!(!ok && err.contains("NotFound") && err.lines().count() == 1, "{err}");
    let (ok, out, _) = quiver(&[
        "--addr",
        &addr,
        "get",
        "--entity-type",
        "user",
        "--entity",
        "bulk2499",
        "--feature",
        "user_stats:clicks",
    ]);
    assert!(ok && out.contains("bulk2499: user_stats:clicks="), "data survives the range compaction: {out}");
    let (ok, _, err) = quiver(&[
        "--addr",
        &addr,
        "put",
        "--group",
        "user_stats",
        "--entity",
        "alice",
        "--event-time-us",
        "5",
        "clicks=8",
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) =
        quiver(&["--addr", &addr, "history", "--entity-type", "user", "--entity", "alice", "--group", "user_stats"]);
    assert!(ok, "{err}");
    assert!(out.contains("user_stats@1:clicks event_time_us=5") && out.contains("Int64Value(8)"), "{out}");
    assert!(out.contains("user_stats@1:tags") && out.contains("StringList"), "{out}");
    assert!(d.stop());
    let files = |suffix: &str| -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(&data)
            .expect("dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.to_string_lossy().ends_with(suffix) && std::fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false)
            })
            .collect();
        v.sort();
        v
    };
    let sst = files(".sst");
    let (ok, out, err) = quiver(&["sst", "dump", sst[0].to_str().expect("path")]);
    assert!(ok, "{err}");
    assert!(out.contains("data blocks") && out.contains("Int64(7)") && out.contains("entries"), "{out}");
    let wal = files(".wal");
    let (ok, out, err) = quiver(&["wal", "dump", wal.last().expect("a WAL segment with data").to_str().expect("path")]);
    assert!(ok, "{err}");
    assert!(out.contains("batch seqno=") && out.contains("Int64(8)"), "{out}");
    let (ok, _, err) = quiver(&["sst", "dump", "/nonexistent/000001.sst"]);
    assert!(!ok && err.starts_with("quiver: ") && err.trim().lines().count() == 1, "{err}");
    let (ok, out, err) = quiver(&["verify", data.to_str().expect("path")]);
    assert!(ok, "{err}");
    assert!(out.starts_with("ok: 1 tables"), "{out}");

    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "[[feature_groups]]\nname = \"x\"\nbogus = 1\n").expect("write");
    let (ok, _, err) = quiver(&["--addr", &addr, "apply", bad.to_str().expect("path")]);
    assert!(!ok && err.trim().lines().count() == 1 && err.contains("bad.toml"), "{err}");
    let (ok, _, err) = quiver(&["--addr", "http://127.0.0.1:1", "admin", "stats"]);
    assert!(!ok && err.contains("cannot reach"), "{err}");
    let (ok, _, err) = quiver(&["verify", tmp.path().join("nothing").to_str().expect("path")]);
    assert!(!ok && err.contains("CURRENT"), "{err}");
}
