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

/// The `user` entity type, as registry files in these tests declare it.
const USER: &str = r#"
[[entity_types]]
name = "user"
join_keys = [{ name = "user_id", type = "string" }]
"#;

/// Writes `USER` and `groups` as a registry file in `dir` and applies it.
fn apply_registry(addr: &str, dir: &std::path::Path, groups: &str) {
    let file = dir.join("registry.toml");
    std::fs::write(&file, format!("{USER}{groups}")).expect("write file");
    let (ok, _, err) = quiver(&["--addr", addr, "apply", file.to_str().expect("path")]);
    assert!(ok, "{err}");
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
    // A reader that stops reading (`| head`) ends the dump quietly: no panic, success. The
    // pipe's read end is closed before quiver can have written, so its first write fails.
    let mut child = Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args(["sst", "dump", sst[0].to_str().expect("path")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run quiver");
    drop(child.stdout.take());
    let done = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success() && err.is_empty(), "{:?}: {err}", done.status);
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

/// Parquet in and out: `ingest` of a typed Parquet file (timestamps, narrow integers, lists,
/// nulls), refusal of a bad file with nothing written, and `join` of Parquet and CSV spines
/// checked row by row against the as-of rule computed here.
#[test]
fn parquet_ingest_and_join_agree_with_the_as_of_rule() {
    use std::sync::Arc;

    use arrow_array::builder::{Float32Builder, ListBuilder, StringBuilder};
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, Int64Type, TimestampMicrosecondType};
    use arrow_array::{Array, TimestampMillisecondArray, TimestampSecondArray};
    use arrow_array::{ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::arrow::ArrowWriter;

    const HOUR_US: i64 = 3_600_000_000;
    const T0_MS: i64 = 1_700_000_000_000;
    let write_parquet = |path: &std::path::Path, cols: Vec<(&str, ArrayRef)>| {
        let batch = RecordBatch::try_from_iter(cols).expect("batch");
        let mut w =
            ArrowWriter::try_new(std::fs::File::create(path).expect("create"), batch.schema(), None).expect("writer");
        w.write(&batch).expect("write");
        w.close().expect("close");
    };

    let tmp = tempfile::tempdir().expect("tmp");
    let d = Daemon::start(&tmp.path().join("data"), &[]);
    let addr = d.addr.clone();
    let reg = tmp.path().join("registry.toml");
    std::fs::write(
        &reg,
        r#"
[[entity_types]]
name = "user"
join_keys = [{ name = "user_id", type = "string" }]

[[feature_groups]]
name = "stats"
entity_type = "user"
ttl = "1h"
features = [
  { name = "clicks", type = "int64" },
  { name = "spend", type = "float64" },
  { name = "tags", type = "string_list" },
  { name = "emb", type = "float32_vector" },
]
"#,
    )
    .expect("registry");
    let (ok, _, err) = quiver(&["--addr", &addr, "apply", reg.to_str().expect("path")]);
    assert!(ok, "{err}");

    // 50 users x 3 events, half an hour apart; user i's clicks at event j = 10 i + j, with the
    // clicks of event 1 null (nothing written for that feature then).
    let (users, events) = (50usize, 3usize);
    let mut ids = Vec::new();
    let mut times = Vec::new();
    let mut clicks = Vec::new();
    let mut spend = Vec::new();
    let mut tags = ListBuilder::new(StringBuilder::new());
    let mut emb = ListBuilder::new(Float32Builder::new());
    for i in 0..users {
        for j in 0..events {
            ids.push(format!("u{i}"));
            times.push(T0_MS + j as i64 * 1_800_000);
            clicks.push((j != 1).then_some((10 * i + j) as i32));
            spend.push(i as f64 + j as f64 / 10.0);
            tags.values().append_value(format!("t{j}"));
            tags.append(true);
            emb.values().append_value(j as f32);
            emb.values().append_value(0.5);
            emb.append(true);
        }
    }
    let load = tmp.path().join("load.parquet");
    write_parquet(
        &load,
        vec![
            ("user_id", Arc::new(StringArray::from(ids)) as ArrayRef),
            ("event_time", Arc::new(TimestampMillisecondArray::from(times).with_timezone("UTC"))),
            ("clicks", Arc::new(Int32Array::from(clicks))),
            ("spend", Arc::new(Float64Array::from(spend))),
            ("tags", Arc::new(tags.finish())),
            ("emb", Arc::new(emb.finish())),
        ],
    );
    let (ok, out, err) = quiver(&["--addr", &addr, "ingest", load.to_str().expect("path"), "--group", "stats"]);
    assert!(ok && out.contains("ingested 150 rows, 550 values"), "{out}{err}");

    // A file with a bad cell in its last row writes nothing.
    let bad = tmp.path().join("bad.parquet");
    write_parquet(
        &bad,
        vec![
            ("user_id", Arc::new(StringArray::from(vec!["fresh", "fresh2"])) as ArrayRef),
            ("event_time", Arc::new(Int64Array::from(vec![1, 2]))),
            ("spend", Arc::new(StringArray::from(vec!["1.5", "lots"]))),
        ],
    );
    let (ok, _, err) = quiver(&["--addr", &addr, "ingest", bad.to_str().expect("path"), "--group", "stats"]);
    assert!(!ok && err.contains("row 2") && err.contains("spend") && err.trim().lines().count() == 1, "{err}");
    let (ok, out, _) =
        quiver(&["--addr", &addr, "get", "--entity-type", "user", "--entity", "fresh", "--feature", "stats:spend"]);
    assert!(ok && out.contains("(not_found)"), "nothing of the bad file was written: {out}");

    // The spine: every user (and one unknown) at times before, between and after the events,
    // 12 rounds over with the times a microsecond later each round: 4,284 rows, so that the
    // answer comes in several Flight batches (4,096 rows each), in an order not the entities'.
    let offsets_us = [-1, 0, HOUR_US / 2 - 1, HOUR_US / 2 + 1, HOUR_US + 5, 2 * HOUR_US, 4 * HOUR_US];
    let mut spine_ids = Vec::new();
    let mut spine_ts = Vec::new();
    for round in 0..12 {
        for i in 0..=users {
            for off in offsets_us {
                spine_ids.push(format!("u{i}"));
                spine_ts.push(T0_MS * 1000 + off + round);
            }
        }
    }
    // What the join must answer: the newest event at or before t, within the 1 h TTL.
    let expect = |user: &str, t: i64, feature: &str| -> Option<f64> {
        let i: usize = user[1..].parse().ok().filter(|&i| i < users)?;
        let j = (0..events)
            .rev()
            .find(|&j| T0_MS * 1000 + j as i64 * HOUR_US / 2 <= t && (feature != "clicks" || j != 1))?;
        let at = T0_MS * 1000 + j as i64 * HOUR_US / 2;
        (t - at <= HOUR_US).then(|| if feature == "clicks" { (10 * i + j) as f64 } else { i as f64 + j as f64 / 10.0 })
    };
    let spine_pq = tmp.path().join("spine.parquet");
    write_parquet(
        &spine_pq,
        vec![
            ("ts", Arc::new(Int64Array::from(spine_ts.clone())) as ArrayRef),
            ("user_id", Arc::new(StringArray::from(spine_ids.clone()))),
        ],
    );
    let spine_csv = tmp.path().join("spine.csv");
    let mut text = String::from("user_id,ts\n");
    for (u, t) in spine_ids.iter().zip(&spine_ts) {
        text.push_str(&format!("{u},{t}\n"));
    }
    std::fs::write(&spine_csv, text).expect("csv");

    for spine in [&spine_pq, &spine_csv] {
        let out_path = tmp.path().join("out.parquet");
        let (ok, out, err) = quiver(&[
            "--addr",
            &addr,
            "--json",
            "join",
            spine.to_str().expect("path"),
            "-o",
            out_path.to_str().expect("path"),
            "--time-column",
            "ts",
            "--feature",
            "stats:clicks",
            "--feature",
            "stats:spend",
            "--feature",
            "stats:emb",
        ]);
        assert!(ok, "{err}");
        let summary: serde_json::Value = serde_json::from_str(out.trim()).expect("json summary");
        assert_eq!(summary["rows"], spine_ids.len());

        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&out_path).expect("open"))
            .expect("parquet")
            .build()
            .expect("reader");
        let mut row = 0;
        let mut filled = 0;
        for batch in reader {
            let batch = batch.expect("batch");
            let names: Vec<&str> = batch.schema_ref().fields().iter().map(|f| f.name().as_str()).collect();
            assert_eq!(names, ["user_id", "event_time", "clicks", "spend", "emb"]);
            let ids = batch.column(0).as_string::<i32>();
            let ts = batch.column(1).as_primitive::<TimestampMicrosecondType>();
            let clicks = batch.column(2).as_primitive::<Int64Type>();
            let spend = batch.column(3).as_primitive::<Float64Type>();
            let emb = batch.column(4).as_list::<i32>();
            for k in 0..batch.num_rows() {
                assert_eq!(ids.value(k), spine_ids[row], "spine order");
                assert_eq!(ts.value(k), spine_ts[row]);
                let got_clicks = (!clicks.is_null(k)).then(|| clicks.value(k) as f64);
                assert_eq!(got_clicks, expect(&spine_ids[row], spine_ts[row], "clicks"), "clicks of row {row}");
                let got_spend = (!spend.is_null(k)).then(|| spend.value(k));
                assert_eq!(got_spend, expect(&spine_ids[row], spine_ts[row], "spend"), "spend of row {row}");
                assert_eq!(emb.is_null(k), got_spend.is_none(), "emb is written with spend");
                filled += usize::from(got_clicks.is_some());
                row += 1;
            }
        }
        assert_eq!(row, spine_ids.len());
        assert_eq!(summary["filled"]["clicks"], filled);
        assert!(filled > users, "the spine hits values: {filled}");
    }

    // zstd unless told otherwise; `--compression snappy` writes the same rows with snappy.
    let codec = |path: &std::path::Path| {
        let b = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).expect("open")).expect("parquet");
        let rows = b.metadata().file_metadata().num_rows();
        (b.metadata().row_group(0).column(2).compression(), rows)
    };
    let out_path = tmp.path().join("out.parquet");
    assert!(matches!(codec(&out_path), (parquet::basic::Compression::ZSTD(_), n) if n as usize == spine_ids.len()));
    let snappy = tmp.path().join("snappy.parquet");
    let (ok, _, err) = quiver(&[
        "--addr",
        &addr,
        "join",
        spine_pq.to_str().expect("path"),
        "-o",
        snappy.to_str().expect("path"),
        "--time-column",
        "ts",
        "--feature",
        "stats:clicks",
        "--compression",
        "snappy",
    ]);
    assert!(ok, "{err}");
    assert_eq!(codec(&snappy), (parquet::basic::Compression::SNAPPY, spine_ids.len() as i64));
    let (ok, _, err) = quiver(&[
        "--addr",
        &addr,
        "join",
        spine_csv.to_str().expect("path"),
        "-o",
        tmp.path().join("x.parquet").to_str().expect("path"),
        "--feature",
        "stats:clicks",
    ]);
    assert!(!ok && err.contains("no event_time column") && err.trim().lines().count() == 1, "{err}");
    // A join expected to fail, and its error.
    let join_err = |spine: &std::path::Path| {
        let (ok, _, err) = quiver(&[
            "--addr",
            &addr,
            "join",
            spine.to_str().expect("path"),
            "-o",
            tmp.path().join("x.parquet").to_str().expect("path"),
            "--time-column",
            "ts",
            "--feature",
            "stats:clicks",
        ]);
        assert!(!ok);
        err
    };
    // A time the API cannot carry is its row's error, before anything is sent.
    let far = tmp.path().join("far.csv");
    std::fs::write(&far, "user_id,ts\nu1,5\nu2,400000000000000000\n").expect("csv");
    let err = join_err(&far);
    assert!(err.contains("far.csv") && err.contains("9999-12-31") && err.contains("ts"), "{err}");
    // A Parquet spine's columns are checked row by row as well: a missing key, and a time
    // (here in seconds) the API cannot carry, each at its row.
    let no_key = tmp.path().join("no_key.parquet");
    write_parquet(
        &no_key,
        vec![
            ("user_id", Arc::new(StringArray::from(vec![Some("u1"), Some("u2"), None])) as ArrayRef),
            ("ts", Arc::new(Int64Array::from(vec![5, 6, 7]))),
        ],
    );
    let err = join_err(&no_key);
    assert!(err.contains("no_key.parquet: row 3: user_id: a join key is missing"), "{err}");
    let far_pq = tmp.path().join("far.parquet");
    write_parquet(
        &far_pq,
        vec![
            ("user_id", Arc::new(StringArray::from(vec!["u1", "u2"])) as ArrayRef),
            ("ts", Arc::new(TimestampSecondArray::from(vec![5, 400_000_000_000]))),
        ],
    );
    let err = join_err(&far_pq);
    assert!(err.contains("far.parquet: row 2") && err.contains("9999-12-31") && err.contains("ts"), "{err}");
    // A failed join leaves nothing at its output path, and no temporary file beside it.
    assert!(!tmp.path().join("x.parquet").exists());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".quiver-join-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(d.stop());
}

#[test]
fn monitor_reports_freshness_and_exits_2_on_a_breach() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = Daemon::start(&tmp.path().join("data"), &[]);
    let addr = d.addr.clone();
    apply_registry(
        &addr,
        tmp.path(),
        r#"
[[feature_groups]]
name = "user_stats"
entity_type = "user"
freshness_sla = "1h"
[[feature_groups.features]]
name = "clicks"
type = "int64"
max_null_rate = 0.1
"#,
    );
    let monitor = |json: bool| {
        let mut args = vec!["--addr", &addr, "monitor"];
        if json {
            args.push("--json");
        }
        let out = Command::new(env!("CARGO_BIN_EXE_quiver")).args(&args).output().expect("run quiver");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let two_hours_ago = (quiver_testkit::now_us() - 7_200_000_000).to_string();
    let (ok, _, err) = quiver(&[
        "--addr",
        &addr,
        "put",
        "--group",
        "user_stats",
        "--entity",
        "alice",
        "--event-time-us",
        &two_hours_ago,
        "clicks=1",
    ]);
    assert!(ok, "{err}");
    let (code, out) = monitor(false);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("user_stats v1: BREACHED: freshness 2h 0m (SLA 1h 0m)"), "{out}");
    let (code, out) = monitor(true);
    assert_eq!(code, Some(2), "{out}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(report["groups"][0]["sla_breached"], true, "{report}");
    assert_eq!(report["groups"][0]["freshness_sla_seconds"], 3600.0, "{report}");

    let (ok, _, err) = quiver(&["--addr", &addr, "put", "--group", "user_stats", "--entity", "bob", "clicks=2"]);
    assert!(ok, "{err}");
    let (code, out) = monitor(false);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("user_stats v1: ok: freshness ") && out.contains("s (SLA 1h 0m); 2 values written here"),
        "{out}"
    );
    assert!(out.contains("clicks: null rate - (max 10.0%) of 0 answers in the last 15m 0s"), "{out}");
    assert!(out.contains("served-feature log: 0 answers written, 0 dropped since the server started"), "{out}");
    // Errors are one line and exit 1, not 2.
    let out = Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args(["--addr", &addr, "monitor", "--group", "nope"])
        .output()
        .expect("run quiver");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NotFound"), "{out:?}");
}

#[test]
fn logs_export_writes_the_served_answers_as_parquet() {
    use arrow_array::{Array, Int64Array, StringArray};
    let tmp = tempfile::tempdir().expect("tmp");
    let d = Daemon::start(&tmp.path().join("data"), &["--log-sample-rate", "1"]);
    let addr = d.addr.clone();
    apply_registry(
        &addr,
        tmp.path(),
        r#"
[[feature_groups]]
name = "user_stats"
entity_type = "user"
ttl = "1h"
[[feature_groups.features]]
name = "clicks"
type = "int64"
[[feature_groups.features]]
name = "country"
type = "string"
"#,
    );
    let (ok, _, err) = quiver(&["--addr", &addr, "put", "--group", "user_stats", "--entity", "alice", "clicks=7"]);
    assert!(ok, "{err}");
    let get = ["--addr", &addr, "get", "--entity-type", "user", "--entity", "alice", "--entity", "bob"];
    let (ok, out, err) =
        quiver(&[&get[..], &["--feature", "user_stats:clicks", "--feature", "user_stats:country"]].concat());
    assert!(ok, "{err}");
    assert!(out.contains("alice: user_stats:clicks=7  user_stats:country=(not_found)"), "{out}");
    let (ok, out, err) = quiver(&[&get[..], &["--feature", "user_stats:clicks", "--default-missing"]].concat());
    assert!(ok && out.contains("bob: user_stats:clicks=0 (default)"), "{out}{err}");

    let parquet = tmp.path().join("served.parquet");
    let out_path = parquet.to_str().expect("path");
    // The log is written behind the answers: retry until all three answers are there.
    let mut last = String::new();
    for _ in 0..100 {
        let (ok, out, err) =
            quiver(&["--addr", &addr, "logs", "export", "--from", "0", "--to", "2100-01-01T00:00:00Z", "-o", out_path]);
        assert!(ok, "{err}");
        last = out;
        if last.contains("exported 4 logged answers (2 features)") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(last.contains("exported 4 logged answers (2 features)"), "{last}");
    let f = std::fs::File::open(&parquet).expect("open");
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f).expect("parquet").build();
    let batch = reader.expect("reader").next().expect("a batch").expect("batch");
    let names: Vec<String> = batch.schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(
        names,
        [
            "request_id",
            "served_at",
            "as_of",
            "user_id",
            "clicks",
            "clicks__status",
            "clicks__event_time",
            "country",
            "country__status",
            "country__event_time"
        ]
    );
    let col = |name: &str| batch.column(batch.schema().index_of(name).expect("column")).clone();
    let users = col("user_id");
    let users = users.as_any().downcast_ref::<StringArray>().expect("strings");
    let clicks = col("clicks");
    let clicks = clicks.as_any().downcast_ref::<Int64Array>().expect("ints");
    let status = col("clicks__status");
    let status = status.as_any().downcast_ref::<StringArray>().expect("strings");
    let rows: Vec<(String, Option<i64>, String)> = (0..batch.num_rows())
        .map(|i| {
            let c = (!clicks.is_null(i)).then(|| clicks.value(i));
            (users.value(i).to_string(), c, status.value(i).to_string())
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("alice".to_string(), Some(7), "present".to_string()),
            ("bob".to_string(), None, "not_found".to_string()),
            ("alice".to_string(), Some(7), "present".to_string()),
            ("bob".to_string(), Some(0), "defaulted".to_string()),
        ]
    );
    // The second lookup asked for clicks only: its country cells are null, with no status.
    let country = col("country__status");
    let country = country.as_any().downcast_ref::<StringArray>().expect("strings");
    assert!(!country.is_null(0) && country.is_null(2), "{country:?}");
    // Replayed through the join, every served value is what the store gives (exit 0).
    let out = Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args(["--addr", &addr, "skew", "--from", "0", "--to", "2100-01-01T00:00:00Z"])
        .output()
        .expect("run quiver");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("4 logged answers replayed"), "{text}");
    assert!(text.contains("user_stats:clicks: 4 compared, 4 equal, 0 mismatched, 0 missing"), "{text}");
    assert!(text.contains("user_stats:country: 2 compared, 2 equal, 0 mismatched, 0 missing"), "{text}");
    // The measurement is kept: in `quiver monitor` and the counters.
    let (ok, out, err) = quiver(&["--addr", &addr, "--json", "monitor", "--group", "user_stats"]);
    assert!(ok, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
    let skew = &report["groups"][0]["skew"]["features"];
    assert_eq!(skew[0]["feature"], "user_stats:clicks", "{report}");
    assert_eq!(
        (&skew[0]["compared"], &skew[0]["mismatched"]),
        (&serde_json::json!(4), &serde_json::json!(0)),
        "{report}"
    );
    let page = d.scrape();
    assert!(
        page.lines().any(|l| l.starts_with("quiver_skew_values_total{")
            && l.contains("feature=\"clicks\"")
            && l.contains("result=\"equal\"")
            && l.ends_with(" 4")),
        "{page}"
    );
    let (ok, _, err) = quiver(&["--addr", &addr, "logs", "export", "--from", "soon", "--to", "0", "-o", out_path]);
    assert!(!ok && err.contains("--from \"soon\" is neither RFC 3339"), "{err}");
}

#[test]
fn skew_compares_a_training_set_with_quivers_join_of_its_spine() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = Daemon::start(&tmp.path().join("data"), &[]);
    let addr = d.addr.clone();
    apply_registry(
        &addr,
        tmp.path(),
        r#"
[[feature_groups]]
name = "user_stats"
entity_type = "user"
[[feature_groups.features]]
name = "clicks"
type = "int64"
[[feature_groups.features]]
name = "ratio"
type = "float32"
[[feature_groups.features]]
name = "country"
type = "string"
"#,
    );
    for (user, at, value) in [
        ("alice", "1000", "clicks=1"),
        ("alice", "2000", "clicks=2"),
        ("alice", "1000", "country=fr"),
        ("bob", "1500", "ratio=0.1"),
    ] {
        let (ok, _, err) =
            quiver(&["--addr", &addr, "put", "--group", "user_stats", "--entity", user, "--event-time-us", at, value]);
        assert!(ok, "{err}");
    }
    let features =
        ["--feature", "user_stats:clicks", "--feature", "user_stats:ratio", "--feature", "user_stats:country"];
    // A training set Quiver wrote itself agrees with Quiver.
    let spine = tmp.path().join("spine.csv");
    std::fs::write(&spine, "user_id,event_time\nalice,1500\nalice,2500\nbob,1600\ncarol,1000\n").expect("spine");
    let train = tmp.path().join("train.parquet");
    let (ok, _, err) = quiver(
        &[
            &["--addr", &addr, "join", spine.to_str().expect("path"), "-o", train.to_str().expect("path")][..],
            &features,
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    let skew = |file: &std::path::Path, json: bool| {
        let mut args = vec!["--addr", &addr];
        if json {
            args.push("--json");
        }
        args.extend(["skew", "--training-set", file.to_str().expect("path")]);
        args.extend(features);
        let out = Command::new(env!("CARGO_BIN_EXE_quiver")).args(&args).output().expect("run quiver");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = skew(&train, false);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("4 rows compared"), "{out}");
    assert!(
        out.contains("user_stats:clicks: 4 equal, 0 differ, 0 only in the training set, 0 only in Quiver"),
        "{out}"
    );

    // One built elsewhere, with a leaked future value and a value Quiver never had: both reported.
    // (0.1 written as float64 text compares at the feature's float32 precision: equal.)
    let elsewhere = tmp.path().join("elsewhere.csv");
    std::fs::write(
        &elsewhere,
        "user_id,event_time,clicks,ratio,country\nalice,1500,2,,fr\nalice,2500,2,,fr\nbob,1600,,0.1,\ncarol,1000,5,,\n",
    )
    .expect("csv");
    let (code, out, err) = skew(&elsewhere, false);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        out.contains("user_stats:clicks: 2 equal, 1 differ, 1 only in the training set, 0 only in Quiver"),
        "{out}"
    );
    assert!(out.contains("    line 2 (alice,1500): training 2, quiver 1"), "{out}");
    assert!(out.contains("    line 5 (carol,1000): training 5, quiver null"), "{out}");
    assert!(out.contains("user_stats:ratio: 4 equal"), "{out}");
    assert!(out.contains("user_stats:country: 4 equal"), "{out}");
    let (code, out, _) = skew(&elsewhere, true);
    assert_eq!(code, Some(2));
    let report: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
    assert_eq!(report["features"][0]["differ"], 1, "{report}");
    assert_eq!(report["features"][0]["examples"][0]["quiver"], "1", "{report}");

    // A training set without a feature's column, or a bad cell, is an error (exit 1).
    std::fs::write(&elsewhere, "user_id,event_time,clicks\nalice,1500,1\n").expect("csv");
    let (code, _, err) = skew(&elsewhere, false);
    assert_eq!(code, Some(1));
    assert!(err.contains("no column \"ratio\""), "{err}");
    std::fs::write(&elsewhere, "user_id,event_time,clicks,ratio,country\nalice,1500,many,,\n").expect("csv");
    let (code, _, err) = skew(&elsewhere, false);
    assert_eq!(code, Some(1));
    assert!(err.contains("line 2, column clicks"), "{err}");
    let (ok, _, err) = quiver(&["--addr", &addr, "skew", "--training-set", "x.csv"]);
    assert!(!ok && err.contains("--feature"), "{err}");
}

#[test]
fn apply_stages_a_changed_group_and_promote_rollback_and_versions_manage_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = Daemon::start(&tmp.path().join("data"), &[]);
    let addr = d.addr.clone();
    let group = |code: &str| {
        format!(
            "\n[[feature_groups]]\nname = \"user_stats\"\nentity_type = \"user\"\ncode_hash = \"{code}\"\n\
             [[feature_groups.features]]\nname = \"clicks\"\ntype = \"int64\"\n"
        )
    };
    apply_registry(&addr, tmp.path(), &group("a1"));
    let file = tmp.path().join("registry.toml");
    std::fs::write(&file, format!("{USER}{}", group("b2"))).expect("write file");
    let f = file.to_str().expect("path");
    let (ok, out, err) = quiver(&["--addr", &addr, "apply", f]);
    assert!(ok, "{err}");
    assert!(out.contains("new version feature_group:user_stats (v2) staged"), "{out}");
    assert!(out.contains("staged (quiver promote to serve it): 0 of 1 features share data with v1"), "{out}");
    let put = |group: &str, v: &str| {
        let (ok, _, err) =
            quiver(&["--addr", &addr, "put", "--group", group, "--entity", "alice", &format!("clicks={v}")]);
        assert!(ok, "{err}");
    };
    put("user_stats", "1");
    put("user_stats@2", "2");
    let get = || {
        let (ok, out, err) = quiver(&[
            "--addr",
            &addr,
            "get",
            "--entity-type",
            "user",
            "--entity",
            "alice",
            "--feature",
            "user_stats:clicks",
        ]);
        assert!(ok, "{err}");
        out
    };
    assert!(get().contains("clicks=1"), "the staged version does not serve");

    let (ok, out, err) = quiver(&["--addr", &addr, "versions", "user_stats"]);
    assert!(ok, "{err}");
    assert!(out.contains("user_stats: v1 serves") && out.contains("staged"), "{out}");
    // v2's clicks (2) differ from v1's (1): the release gate refuses, with its report, exit 2.
    for extra in [&["--dry-run"][..], &[][..]] {
        let mut a = vec!["--addr", addr.as_str(), "promote", "user_stats@2"];
        a.extend(extra);
        let out = Command::new(env!("CARGO_BIN_EXE_quiver")).args(&a).output().expect("run quiver");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(2), "{a:?}: {stdout}");
        assert!(stdout.contains("release gate user_stats@2 against serving v1: REFUSED (1 entities)"), "{stdout}");
        assert!(stdout.contains("FAIL drift against the serving version"), "{stdout}");
    }
    assert!(get().contains("clicks=1"), "a refused promotion changes nothing");
    let (ok, out, err) = quiver(&["--addr", &addr, "promote", "user_stats@2", "--force", "--reason", "backfilled"]);
    assert!(ok, "{err}");
    assert!(out.contains("(forced)"), "{out}");
    assert!(out.contains("promoted user_stats v1 -> v2 by anonymous") && out.contains(": backfilled"), "{out}");
    assert!(get().contains("clicks=2"));
    let (ok, out, _) = quiver(&["--addr", &addr, "promote", "user_stats@2"]);
    assert!(ok && out.contains("already serves"), "{out}");
    let (ok, out, err) = quiver(&["--addr", &addr, "rollback", "user_stats"]);
    assert!(ok && out.contains("rolled back user_stats v2 -> v1"), "{out}{err}");
    assert!(get().contains("clicks=1"));
    let (ok, out, err) = quiver(&["--addr", &addr, "--json", "versions", "user_stats"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v["serving"], 1);
    let kinds: Vec<&str> =
        v["history"].as_array().expect("history").iter().filter_map(|h| h["kind"].as_str()).collect();
    assert_eq!(kinds, ["created", "promoted", "rolled back"]);
    assert_eq!(v["versions"][1]["state"], "inactive");

    for (args, needle) in [
        (vec!["promote", "user_stats"], "is not group@N"),
        (vec!["promote", "user_stats@0"], "is not group@N"),
        (vec!["promote", "user_stats@7"], "NotFound"),
        (vec!["rollback", "user_stats"], "nothing to roll back to"),
        (vec!["versions", "ghost"], "NotFound"),
        (vec!["retire", "user_stats@1"], "is the serving version"),
        (vec!["retire", "user_stats"], "is not group@N"),
    ] {
        let mut a = vec!["--addr", addr.as_str()];
        a.extend(args);
        let (ok, out, err) = quiver(&a);
        assert!(!ok && out.is_empty(), "{a:?} should fail: {out}");
        assert!(err.starts_with("quiver: ") && err.trim().lines().count() == 1 && err.contains(needle), "{a:?}: {err}");
    }
    assert!(get().contains("clicks=1"), "refused commands changed nothing");
    let (ok, out, err) = quiver(&["--addr", &addr, "retire", "user_stats@2", "--retention-hours", "1"]);
    assert!(ok && out.contains("retired user_stats@2"), "{out}{err}");
    let (ok, out, _) = quiver(&["--addr", &addr, "versions", "user_stats"]);
    assert!(ok && out.contains("retired") && out.contains("retired by anonymous"), "{out}");
}
