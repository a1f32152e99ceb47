//! `quiver cluster status`, `init`, `rebalance`, `move` and `remove` against sharded quiverd
//! nodes and a real etcd, and against an unsharded node.

use std::process::Command;
use std::time::{Duration, Instant};

use quiver_e2e::{Daemon, Etcd};

fn quiver(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_quiver")).args(args).output().expect("run quiver");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `quiver --json cluster status` at `addr`, parsed.
fn status(addr: &str) -> serde_json::Value {
    let (ok, out, err) = quiver(&["--addr", addr, "--json", "cluster", "status"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn cluster_init_and_status_on_a_sharded_region() {
    let tmp = tempfile::tempdir().expect("tmp");
    let etcd = Etcd::start();
    // Nodes that refuse what they do not own, so that an answer shows that the CLI sent each
    // user to its owner itself.
    let shard = |id: &str| {
        Daemon::start(&tmp.path().join(id), &["--etcd", &etcd.url, "--node-id", id, "--cluster", "cli", "--no-forward"])
    };
    let (a, b) = (shard("alpha"), shard("beta"));
    let deadline = Instant::now() + Duration::from_secs(30);
    // Both registered, and beta connected (it registers before it reads and watches).
    while status(&a.addr)["nodes"].as_array().map_or(0, Vec::len) < 2 || status(&b.addr)["etcd_connected"] != true {
        assert!(Instant::now() < deadline, "both nodes never registered: {}", status(&a.addr));
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, out, err) = quiver(&["--addr", &b.addr, "cluster", "status"]);
    assert!(ok, "{err}");
    assert!(out.contains("asked node beta; etcd connected; map revision none yet"), "{out}");

    let (ok, out, err) = quiver(&["--addr", &a.addr, "cluster", "init"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("slots 0..=2047 -> alpha (epoch 1)") && out.contains("slots 2048..=4095 -> beta (epoch 1)"),
        "{out}"
    );
    let (ok, _, err) = quiver(&["--addr", &b.addr, "cluster", "init"]);
    assert!(!ok && err.contains("AlreadyExists"), "{err}");

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(&b.addr);
        if s["map_revision"].as_i64().unwrap_or(0) > 0 {
            let slots: Vec<(String, u64, bool)> = s["nodes"]
                .as_array()
                .expect("nodes")
                .iter()
                .map(|n| {
                    (n["node"].as_str().unwrap_or("").to_string(), n["slots"].as_u64().unwrap_or(0), n["live"] == true)
                })
                .collect();
            assert_eq!(slots, [("alpha".to_string(), 2048, true), ("beta".to_string(), 2048, true)]);
            assert_eq!(s["runs"].as_array().map(Vec::len), Some(2));
            break;
        }
        assert!(Instant::now() < deadline, "beta never saw the map: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, out, err) = quiver(&["--addr", &a.addr, "cluster", "status"]);
    assert!(ok, "{err}");
    assert!(out.contains("0..=2047") && out.contains("beta"), "{out}");

    // put and get send each user to its owner (the routing client): every user is written
    // through alpha and read back through beta, whichever owns it.
    let file = tmp.path().join("registry.toml");
    std::fs::write(
        &file,
        "[[entity_types]]\nname = \"user\"\njoin_keys = [{ name = \"user_id\", type = \"string\" }]\n\n\
         [[feature_groups]]\nname = \"g\"\nentity_type = \"user\"\n\
         [[feature_groups.features]]\nname = \"clicks\"\ntype = \"int64\"\n",
    )
    .expect("write file");
    for d in [&a, &b] {
        let (ok, _, err) = quiver(&["--addr", &d.addr, "apply", file.to_str().expect("path")]);
        assert!(ok, "{err}");
    }
    for i in 0..12 {
        let user = format!("u{i}");
        let (ok, out, err) =
            quiver(&["--addr", &a.addr, "put", "--group", "g", "--entity", &user, &format!("clicks={i}")]);
        assert!(ok && out.contains("wrote 1 values") && err.is_empty(), "{user}: {out}{err}");
        let get = ["--addr", &b.addr, "get", "--entity-type", "user", "--entity", &user, "--feature", "g:clicks"];
        let (ok, out, err) = quiver(&get);
        assert!(ok && out.contains(&format!("{user}: g:clicks={i}")), "{user}: {out}{err}");
    }
    // A lookup spanning both shards is answered, in request order.
    let users: Vec<String> = (0..12).flat_map(|i| ["--entity".to_string(), format!("u{i}")]).collect();
    let mut args = vec!["--addr", &a.addr, "get", "--entity-type", "user", "--feature", "g:clicks"];
    args.extend(users.iter().map(String::as_str));
    let (ok, out, err) = quiver(&args);
    assert!(ok, "{err}");
    let want: Vec<String> = (0..12).map(|i| format!("u{i}: g:clicks={i}")).collect();
    assert_eq!(out.lines().collect::<Vec<_>>(), want);

    // A third node joins; rebalance moves a third of the slots to it, one move per donor, and
    // every user still reads back, from whichever node owns it now.
    let c = shard("gamma");
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&a.addr)["nodes"].as_array().map_or(0, |n| n.iter().filter(|n| n["live"] == true).count()) < 3 {
        assert!(Instant::now() < deadline, "gamma never registered: {}", status(&a.addr));
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, _, err) = quiver(&["--addr", &c.addr, "apply", file.to_str().expect("path")]);
    assert!(ok, "{err}");
    let (ok, out, err) = quiver(&["--addr", &a.addr, "cluster", "rebalance", "--dry-run"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().filter(|l| l.starts_with("plan: ") && l.ends_with(" to gamma")).count(), 2, "{out}");
    assert_eq!(status(&a.addr)["nodes"][2]["slots"], 0, "a dry run moves nothing");
    let (ok, out, err) = quiver(&["--addr", &b.addr, "cluster", "rebalance"]);
    assert!(ok, "{err}");
    assert!(out.contains("rebalanced over 3 nodes: 2 moves"), "{out}");
    assert!(out.contains("switched at map revision"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(&c.addr);
        let slots: Vec<u64> =
            s["nodes"].as_array().expect("nodes").iter().map(|n| n["slots"].as_u64().unwrap_or(0)).collect();
        if slots == [1366, 1365, 1365] && s["moves"].as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(Instant::now() < deadline, "gamma never saw the rebalanced map: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut args = vec!["--addr", &c.addr, "get", "--entity-type", "user", "--feature", "g:clicks"];
    args.extend(users.iter().map(String::as_str));
    let (ok, out, err) = quiver(&args);
    assert!(ok, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), want, "every user after the rebalance");
    let (ok, out, err) = quiver(&["--addr", &a.addr, "cluster", "rebalance"]);
    assert!(ok && out.contains("nothing to move"), "{out}{err}");

    // Moves of slots a node owns already end at once; bad ranges and aborts of no move are
    // refused with their codes.
    let (ok, out, err) = quiver(&["--addr", &a.addr, "cluster", "move", "--slots", "0..9", "--to", "alpha"]);
    assert!(ok && out.contains(": done;"), "{out}{err}");
    for bad in ["9..3", "0..4096", "x", "1..y"] {
        let (ok, _, err) = quiver(&["--addr", &a.addr, "cluster", "move", "--slots", bad, "--to", "beta"]);
        assert!(!ok && err.contains("--slots"), "{bad}: {err}");
    }
    let (ok, _, err) = quiver(&["--addr", &a.addr, "cluster", "move", "--slots", "0..9", "--abort"]);
    assert!(!ok && err.contains("NotFound"), "{err}");
    let (ok, _, err) = quiver(&["--addr", &a.addr, "cluster", "move", "--slots", "0..9", "--to", "nobody"]);
    assert!(!ok && err.contains("no node \"nobody\""), "{err}");

    // gamma leaves the region: its slots go to alpha and beta, evened out, and it leaves etcd
    // (no peer region here: nothing to drain). Every user still reads back; its id never
    // registers again.
    let (ok, out, err) = quiver(&["--addr", &a.addr, "cluster", "remove", "gamma", "--dry-run"]);
    assert!(ok, "{err}");
    assert!(out.lines().all(|l| l.starts_with("plan: ") && l.contains(" from gamma to ")), "{out}");
    assert_eq!(status(&a.addr)["nodes"][2]["slots"], 1365, "a dry run moves nothing");
    let (ok, _, err) = quiver(&["--addr", &a.addr, "cluster", "remove", "nobody"]);
    assert!(!ok && err.contains("no node \"nobody\""), "{err}");
    let (ok, out, err) = quiver(&["--addr", &a.addr, "cluster", "remove", "gamma"]);
    assert!(ok, "{err}");
    assert!(out.contains("node gamma removed: 0 peer nodes"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // As alpha's watch of etcd shows it.
        let s = status(&a.addr);
        let slots: Vec<(String, u64)> = s["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| (n["node"].as_str().unwrap_or("").to_string(), n["slots"].as_u64().unwrap_or(0)))
            .collect();
        if s["removed"] == serde_json::json!(["gamma"])
            && slots == [("alpha".to_string(), 2048), ("beta".to_string(), 2048)]
        {
            break;
        }
        assert!(Instant::now() < deadline, "alpha never saw gamma leave: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut args = vec!["--addr", &a.addr, "get", "--entity-type", "user", "--feature", "g:clicks"];
    args.extend(users.iter().map(String::as_str));
    let (ok, out, err) = quiver(&args);
    assert!(ok, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), want, "every user after gamma left");
    let (ok, _, err) = quiver(&["--addr", &a.addr, "cluster", "remove", "gamma"]);
    assert!(!ok && err.contains("removed already"), "{err}");
    drop(c);
    let c = shard("gamma");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(&c.addr);
        if s["etcd_error"].as_str().is_some_and(|e| e.contains("was removed from the region")) {
            break;
        }
        assert!(Instant::now() < deadline, "a removed node id registered again: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, _, err) = quiver(&["--addr", &a.addr, "cluster", "move", "--slots", "0..9", "--to", "gamma"]);
    assert!(!ok && err.contains("no node \"gamma\""), "{err}");

    let plain = Daemon::start(&tmp.path().join("plain"), &[]);
    let (ok, out, err) = quiver(&["--addr", &plain.addr, "cluster", "status"]);
    assert!(ok, "{err}");
    assert!(out.contains("not sharded"), "{out}");
    let (ok, _, err) = quiver(&["--addr", &plain.addr, "cluster", "init"]);
    assert!(!ok && err.contains("FailedPrecondition") && err.contains("not sharded"), "{err}");
}

/// Reads a Parquet file whole, as one batch.
fn read_parquet(path: &std::path::Path) -> arrow_array::RecordBatch {
    let file = std::fs::File::open(path).expect("open");
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .expect("parquet")
        .build()
        .expect("reader");
    let batches: Vec<_> = reader.map(|b| b.expect("batch")).collect();
    let schema = batches.first().map(|b| b.schema()).expect("a batch");
    arrow_select::concat::concat_batches(&schema, &batches).expect("concat")
}

/// `quiver ingest` and `quiver join` through a node of a sharded region that forwards: its
/// writes go to their owners, and its Flight join is split by owner and merged back in spine
/// order. The training set equals an unsharded node's for the same data, row by row.
#[test]
fn a_join_through_a_forwarding_node_equals_the_single_node_join() {
    use arrow_array::cast::AsArray;
    use arrow_array::types::Int64Type;
    use arrow_array::Array;

    let tmp = tempfile::tempdir().expect("tmp");
    let etcd = Etcd::start();
    let shard =
        |id: &str| Daemon::start(&tmp.path().join(id), &["--etcd", &etcd.url, "--node-id", id, "--cluster", "j"]);
    let (a, b) = (shard("a"), shard("b"));
    let single = Daemon::start(&tmp.path().join("single"), &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&a.addr)["nodes"].as_array().map_or(0, Vec::len) < 2 || status(&b.addr)["etcd_connected"] != true {
        assert!(Instant::now() < deadline, "both nodes never registered: {}", status(&a.addr));
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, _, err) = quiver(&["--addr", &a.addr, "cluster", "init"]);
    assert!(ok, "{err}");
    while status(&b.addr)["map_revision"].as_i64().unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "b never saw the map");
        std::thread::sleep(Duration::from_millis(50));
    }
    let registry = tmp.path().join("registry.toml");
    std::fs::write(
        &registry,
        "[[entity_types]]\nname = \"user\"\njoin_keys = [{ name = \"user_id\", type = \"string\" }]\n\n\
         [[feature_groups]]\nname = \"g\"\nentity_type = \"user\"\n\
         [[feature_groups.features]]\nname = \"clicks\"\ntype = \"int64\"\n",
    )
    .expect("write file");
    const T0: i64 = 1_767_225_600_000_000;
    const HOUR: i64 = 3_600_000_000;
    let csv = tmp.path().join("load.csv");
    let mut text = String::from("user_id,event_time,clicks\n");
    for i in 0..300 {
        text.push_str(&format!("u{i},{T0},{i}\n"));
        if i % 3 != 0 {
            text.push_str(&format!("u{i},{},{}\n", T0 + HOUR, 1000 + i));
        }
    }
    std::fs::write(&csv, text).expect("csv");
    for d in [&a, &b, &single] {
        let (ok, _, err) = quiver(&["--addr", &d.addr, "apply", registry.to_str().expect("path")]);
        assert!(ok, "{err}");
    }
    for d in [&a, &single] {
        let (ok, out, err) = quiver(&["--addr", &d.addr, "ingest", csv.to_str().expect("path"), "--group", "g"]);
        assert!(ok && out.contains("ingested 500 rows"), "{out}{err}");
    }
    // Both shards hold some of the users.
    let slots: Vec<u64> =
        status(&b.addr)["nodes"].as_array().expect("nodes").iter().map(|n| n["slots"].as_u64().unwrap_or(0)).collect();
    assert_eq!(slots, [2048, 2048]);

    // A spine of 6,000 rows (two Flight answer chunks): known and unknown users, before,
    // between and after their versions.
    let spine = tmp.path().join("spine.csv");
    let mut text = String::from("user_id,ts\n");
    let mut x: u64 = 7;
    for _ in 0..6000 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let user = (x >> 33) % 320;
        let t = T0 + [-HOUR / 2, HOUR / 2, HOUR * 3 / 2][((x >> 20) % 3) as usize];
        text.push_str(&format!("u{user},{t}\n"));
    }
    std::fs::write(&spine, text).expect("spine");
    let join = |d: &Daemon, out: &str| {
        let out = tmp.path().join(out);
        let (ok, stdout, err) = quiver(&[
            "--addr",
            &d.addr,
            "join",
            spine.to_str().expect("path"),
            "-o",
            out.to_str().expect("path"),
            "--time-column",
            "ts",
            "--feature",
            "g:clicks",
        ]);
        assert!(ok, "{stdout}{err}");
        read_parquet(&out)
    };
    let want = join(&single, "single.parquet");
    let got = join(&b, "sharded.parquet");
    assert_eq!(got.num_rows(), 6000);
    assert_eq!(got, want);
    let clicks = got.column_by_name("clicks").expect("clicks").as_primitive::<Int64Type>();
    assert!(clicks.null_count() > 500 && clicks.null_count() < 5500, "values and gaps: {}", clicks.null_count());
}
