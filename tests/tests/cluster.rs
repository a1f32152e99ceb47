//! A sharded region end to end (server/CLUSTER.md §1–§4): a real etcd and three `quiverd`
//! nodes. The slot map is created once; each entity is stored by its slot's owner alone. A
//! forwarding node (the default) sends what it does not own to the owner and merges the
//! answers in request order; a forwarded request is never forwarded again, and a node started
//! with `--no-forward` refuses instead, naming the owner and its address, which corrects a
//! client that sent to the wrong node. With etcd gone the nodes keep serving from their last
//! map and refuse changes.

use std::collections::BTreeMap;

use prost::Message;
use quiver_e2e::shard::{slot_of_user, Node};
use quiver_e2e::{clicks_row, example_registry, int, key, ts, Daemon, Etcd};
use quiver_proto::v1 as pb;
use tonic::Code;

const T0: i64 = 1_767_225_600_000_000;
const SLOTS: u32 = 4096;

fn row(user: &str, clicks: i64) -> pb::WriteRow {
    clicks_row(user, T0, clicks)
}

fn write(users: &[&str]) -> pb::WriteFeaturesRequest {
    pb::WriteFeaturesRequest {
        rows: users.iter().enumerate().map(|(i, u)| row(u, i as i64 + 100)).collect(),
        ..Default::default()
    }
}

fn lookup(users: &[&str]) -> pb::GetOnlineFeaturesRequest {
    pb::GetOnlineFeaturesRequest {
        entity_type: "user".into(),
        entities: users.iter().map(|u| key(u)).collect(),
        features: vec!["user_stats:clicks".into()],
        as_of: ts(T0 + 1),
        ..Default::default()
    }
}

/// `msg` marked as already forwarded once: the node must answer it itself or refuse it.
fn hop<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("quiver-forwarded", tonic::metadata::MetadataValue::from_static("1"));
    r
}

/// The `SlotNotOwned` details of a refusal (panics unless it is one).
fn not_owned(s: &tonic::Status) -> pb::SlotNotOwned {
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    pb::SlotNotOwned::decode(s.details()).unwrap_or_else(|e| panic!("details of {s:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_shards_serve_their_slots_forward_or_name_the_owner_of_the_rest() {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = Etcd::start();
    let mut nodes = Vec::new();
    // n0 refuses what it does not own; n1 and n2 forward it.
    for (id, extra) in [("n0", &["--no-forward"][..]), ("n1", &[]), ("n2", &[])] {
        nodes.push(Node::start(dir.path(), id, &etcd, id, extra).await);
    }
    for n in &mut nodes {
        n.clients.registry.apply_registry(example_registry()).await.expect("registry");
    }

    // Before the map exists, a sharded node serves no entity.
    let s = nodes[0].clients.features.get_online_features(lookup(&["u1"])).await.expect_err("no map");
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert!(s.message().contains("not initialised"), "{s:?}");

    // Every node registers; the map is created once, over all three.
    for n in &nodes {
        n.wait_for("three live nodes", |s| {
            s.sharded && s.etcd_connected && s.nodes.iter().filter(|x| x.live).count() == 3
        })
        .await;
    }
    let map = nodes[1].cluster.init_slots(pb::InitSlotsRequest {}).await.expect("init").into_inner().map;
    let map = map.expect("a map");
    let again = nodes[2].cluster.init_slots(pb::InitSlotsRequest {}).await.expect_err("exists");
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");
    let owners: Vec<&str> = map.runs.iter().map(|r| r.owner.as_str()).collect();
    assert_eq!(owners, ["n0", "n1", "n2"]);
    assert_eq!(map.runs.iter().map(|r| r.last - r.first + 1).collect::<Vec<_>>(), [1366, 1365, 1365]);
    assert!(map.runs.iter().all(|r| r.epoch == 1));
    let revision = map.revision;
    for n in &nodes {
        n.wait_for("the map's revision", |s| s.map.as_ref().is_some_and(|m| m.revision == revision)).await;
    }
    let status = nodes[0].status().await;
    let slots: BTreeMap<String, (u32, String)> =
        status.nodes.iter().map(|n| (n.node.clone(), (n.slots, n.addr.clone()))).collect();
    assert_eq!(slots.values().map(|s| s.0).sum::<u32>(), SLOTS);
    let owner_of = |slot: u32| {
        let run = map.runs.iter().find(|r| (r.first..=r.last).contains(&slot)).expect("every slot has a run");
        run.owner.clone()
    };

    // Each user is written at its owner alone; the others refuse a request already forwarded
    // (one hop at most), naming the owner.
    let users: Vec<String> = (0..60).map(|i| format!("u{i}")).collect();
    let mut by_owner: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for u in &users {
        let slot = slot_of_user(u);
        let owner = owner_of(slot);
        for n in &mut nodes {
            let r = n.clients.features.write_features(hop(write(&[u.as_str()]))).await;
            if n.id == owner {
                r.unwrap_or_else(|e| panic!("{u} at its owner {owner}: {e:?}"));
            } else {
                let d = not_owned(&r.expect_err("not the owner"));
                let want = pb::SlotNotOwned {
                    slot,
                    owner: owner.clone(),
                    owner_addr: slots[&owner].1.clone(),
                    epoch: 1,
                    map_revision: revision,
                };
                assert_eq!(d, want, "{u} at {}", n.id);
            }
        }
        by_owner.entry(owner).or_default().push(u.as_str());
    }
    assert_eq!(by_owner.len(), 3, "60 users land on every node: {by_owner:?}");

    // A batch of one owner's users reads back there. A batch spanning shards is refused whole
    // by n0 and when already forwarded; n1 and n2 answer it, every user's value in request
    // order. A join spanning shards is refused by n0 and when already forwarded; n1 and n2 split
    // it by owner and merge the rows back into spine order;
    // a history scan is forwarded whole.
    let everyone: Vec<&str> = users.iter().rev().map(String::as_str).collect();
    for n in &mut nodes {
        let mine = &by_owner[&n.id];
        let r = n.clients.features.get_online_features(lookup(mine)).await.expect("own users").into_inner();
        let col = &r.columns[0];
        assert!(col.statuses.iter().all(|s| *s == pb::FeatureStatus::Present as i32), "{col:?}");
        assert_eq!(col.int64_values, vec![100; mine.len()]);
        let other = by_owner.iter().find(|(o, _)| **o != n.id).map(|(_, u)| u[0]).expect("another owner");
        let mixed: Vec<&str> = mine.iter().copied().chain([other]).collect();
        let s = n.clients.features.get_online_features(hop(lookup(&mixed))).await.expect_err("forwarded already");
        assert_eq!(not_owned(&s).slot, slot_of_user(other));
        let r = n.clients.features.get_online_features(lookup(&everyone)).await;
        if n.id == "n0" {
            assert!(not_owned(&r.expect_err("n0 does not forward")).slot < SLOTS);
        } else {
            let col = r.unwrap_or_else(|e| panic!("{} forwards: {e:?}", n.id)).into_inner().columns.remove(0);
            assert_eq!(col.int64_values, vec![100; everyone.len()], "{}", n.id);
            assert_eq!(col.event_times_us, vec![T0; everyone.len()], "{}", n.id);
            assert_eq!(col.feature_ref, "user_stats:clicks");
        }
        let spine = vec![
            pb::SpineRow { entity: Some(key(mine[0])), timestamp: ts(T0 + 1) },
            pb::SpineRow { entity: Some(key(other)), timestamp: ts(T0 + 1) },
        ];
        let join = pb::GetHistoricalFeaturesRequest {
            entity_type: "user".into(),
            features: vec!["user_stats:clicks".into()],
            spine,
            ..Default::default()
        };
        let first_error =
            |r: Result<tonic::Response<tonic::Streaming<pb::GetHistoricalFeaturesResponse>>, tonic::Status>| async {
                match r {
                    Err(s) => s,
                    Ok(resp) => resp.into_inner().message().await.expect_err("refused before any answer"),
                }
            };
        let s = first_error(n.clients.features.get_historical_features(hop(join.clone())).await).await;
        assert_eq!(not_owned(&s).owner, owner_of(slot_of_user(other)), "a join forwarded once is not forwarded again");
        let r = n.clients.features.get_historical_features(join).await;
        if n.id == "n0" {
            assert_eq!(not_owned(&first_error(r).await).owner, owner_of(slot_of_user(other)));
        } else {
            // Split by owner and merged back into spine order.
            let mut stream = r.unwrap_or_else(|e| panic!("{} forwards the join: {e:?}", n.id)).into_inner();
            let chunk = stream.message().await.expect("a chunk").expect("one chunk");
            assert_eq!(chunk.first_row, 0);
            assert_eq!(chunk.columns[0].int64_values, [100, 100], "{}: {chunk:?}", n.id);
            assert!(stream.message().await.expect("the end").is_none());
        }
        let scan = pb::ScanHistoryRequest {
            entity_type: "user".into(),
            entity: Some(key(other)),
            group: "user_stats".into(),
            ..Default::default()
        };
        let r = n.clients.features.scan_history(scan).await;
        let first = match r {
            Err(s) => Err(s),
            Ok(resp) => resp.into_inner().message().await,
        };
        if n.id == "n0" {
            not_owned(&first.expect_err("n0 does not forward"));
        } else {
            let chunk = first.unwrap_or_else(|e| panic!("{} forwards the scan: {e:?}", n.id)).expect("a chunk");
            let values: Vec<i64> = chunk
                .versions
                .iter()
                .filter_map(|v| v.value.as_ref())
                .map(|v| match v.kind {
                    Some(pb::value::Kind::Int64Value(x)) => x,
                    _ => panic!("not an int: {v:?}"),
                })
                .collect();
            assert_eq!(values, [100], "{}: {chunk:?}", n.id);
        }
    }
    // A join of 5,000 spine rows over every shard comes back in spine order, in chunks of
    // 4,096 rows (HISTORICAL_CHUNK_ROWS), as one node would answer it: each user has a value
    // of its own at T0 + 10 (later than every lookup below reads).
    let own: Vec<pb::WriteRow> =
        users.iter().enumerate().map(|(i, u)| clicks_row(u, T0 + 10, 1000 + i as i64)).collect();
    let r =
        nodes[1].clients.features.write_features(pb::WriteFeaturesRequest { rows: own, ..Default::default() }).await;
    r.expect("a write over every shard");
    let spine: Vec<pb::SpineRow> = (0..5000)
        .map(|i| pb::SpineRow { entity: Some(key(everyone[i % everyone.len()])), timestamp: ts(T0 + 20) })
        .collect();
    let mut missing = spine.clone();
    missing.push(pb::SpineRow { entity: Some(key("nobody")), timestamp: ts(T0 + 1) });
    for n in &mut nodes[1..] {
        let join = pb::GetHistoricalFeaturesRequest {
            entity_type: "user".into(),
            features: vec!["user_stats:clicks".into()],
            spine: missing.clone(),
            ..Default::default()
        };
        let mut stream = n.clients.features.get_historical_features(join).await.expect("a join").into_inner();
        let mut rows = Vec::new();
        while let Some(chunk) = stream.message().await.expect("a chunk") {
            assert_eq!(chunk.first_row as usize, rows.len(), "{}", n.id);
            let col = &chunk.columns[0];
            rows.extend(
                col.statuses.iter().zip(&col.int64_values).zip(&col.event_times_us).map(|((s, v), t)| (*s, *v, *t)),
            );
        }
        assert_eq!(rows.len(), 5001, "{}", n.id);
        let want: Vec<(i32, i64, i64)> = (0..5000)
            .map(|i| {
                let u = everyone[i % everyone.len()];
                let k = users.iter().position(|x| x == u).expect("a user") as i64;
                (pb::FeatureStatus::Present as i32, 1000 + k, T0 + 10)
            })
            .collect();
        assert_eq!(rows[..5000], want[..], "{}: rows in spine order", n.id);
        assert_ne!(rows[5000].0, pb::FeatureStatus::Present as i32, "{}: nobody has no value", n.id);
    }
    let forwarded = nodes[1].daemon.scrape();
    assert!(forwarded.contains("quiver_forwarded_total{method=\"GetOnlineFeatures\"}"), "{forwarded}");

    // A write spanning shards: n0 refuses it whole (its own user keeps the value it had); n1
    // and n2 apply each shard's part at its owner.
    for (k, n) in nodes.iter_mut().enumerate() {
        let mine = by_owner[&n.id][0];
        let other = by_owner.iter().find(|(o, _)| **o != n.id).map(|(_, u)| u[0]).expect("another owner");
        let mut spanning = write(&[mine, other]);
        spanning.rows.iter_mut().for_each(|r| {
            r.values.insert("clicks".into(), int(500 + k as i64));
        });
        let r = n.clients.features.write_features(spanning).await;
        let want = if n.id == "n0" {
            assert_eq!(not_owned(&r.expect_err("spans shards")).slot, slot_of_user(other));
            100
        } else {
            let r = r.unwrap_or_else(|e| panic!("{} forwards: {e:?}", n.id)).into_inner();
            assert_eq!(r.values_written, 2, "{r:?}");
            assert!(r.version.is_none(), "one vector for two shards: {r:?}");
            500 + k as i64
        };
        let r = n.clients.features.get_online_features(lookup(&[mine, other])).await;
        if n.id != "n0" {
            assert_eq!(r.expect("forwarded lookup").into_inner().columns[0].int64_values, [want, want], "{}", n.id);
        }
        let r = n.clients.features.get_online_features(lookup(&[mine])).await.expect("own user").into_inner();
        assert_eq!(r.columns[0].int64_values, [want], "{}", n.id);
    }
    // The whole write is checked before it is split: a row another shard would refuse refuses
    // it whole, with nothing written anywhere; so does a lookup over the limits.
    let mine = by_owner["n1"][1];
    let other = by_owner["n2"][1];
    let mut bad = write(&[mine, other]);
    bad.rows[0].values.insert("clicks".into(), int(777));
    bad.rows[1].values.insert("no_such_feature".into(), int(1));
    let s = nodes[1].clients.features.write_features(bad).await.expect_err("a bad row");
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    assert!(s.message().contains("no_such_feature"), "{s:?}");
    let r = nodes[1].clients.features.get_online_features(lookup(&[mine, other])).await.expect("both").into_inner();
    assert_eq!(r.columns[0].int64_values, [100, 100], "nothing of a refused write is applied");
    let many: Vec<String> = (0..10_001).map(|i| format!("m{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let s = nodes[1].clients.features.get_online_features(lookup(&many)).await.expect_err("over the limit");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");

    // A split write with an idempotency key is applied once: its retry is replayed by every
    // shard (each keeps the record of its own part).
    let (mine, other) = (by_owner["n1"][3], by_owner["n2"][3]);
    let mut keyed = write(&[mine, other]);
    keyed.idempotency_key = "span-1".into();
    let first = nodes[1].clients.features.write_features(keyed.clone()).await.expect("keyed").into_inner();
    assert!(!first.deduplicated && first.values_written == 2, "{first:?}");
    let again = nodes[1].clients.features.write_features(keyed).await.expect("retried").into_inner();
    assert!(again.deduplicated && again.values_written == 2, "{again:?}");

    // The routing client reads the map from n0 (which forwards nothing) and sends each user to
    // its owner: a lookup of everyone answers as a forwarding node does, and a write of
    // everyone lands at each owner.
    let router = quiver_tools::route::Router::connect(&nodes[0].daemon.addr, Default::default(), None)
        .await
        .expect("the router reads the map");
    assert_eq!(router.revision(), revision);
    let want = nodes[1].clients.features.get_online_features(lookup(&everyone)).await.expect("forwarded");
    let got = router.get_online_features(lookup(&everyone)).await.expect("routed");
    assert_eq!(got, want.into_inner());
    let mut all = write(&everyone);
    all.rows.iter_mut().for_each(|r| {
        r.values.insert("clicks".into(), int(900));
    });
    assert_eq!(router.write_features(all).await.expect("routed write").values_written, everyone.len() as u64);
    for n in &mut nodes {
        let mine = by_owner[&n.id].clone();
        let r = n.clients.features.get_online_features(hop(lookup(&mine))).await.expect("its own").into_inner();
        assert_eq!(r.columns[0].int64_values, vec![900; mine.len()], "{}", n.id);
    }

    // A second process with a live node's id is not registered and serves nothing.
    let dup = Node::start(dir.path(), "dup", &etcd, "n1", &[]).await;
    dup.wait_for("the duplicate id to be refused", |s| s.etcd_error.contains("registered by another live process"))
        .await;
    let mut dup_clients = dup.clients.clone();
    dup_clients.registry.apply_registry(example_registry()).await.expect("registry");
    let s = dup_clients.features.get_online_features(lookup(&by_owner["n1"])).await.expect_err("not registered");
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert_eq!(
        nodes[0].status().await.nodes.iter().find(|x| x.node == "n1").map(|x| x.addr.clone()),
        Some(slots["n1"].1.clone())
    );
    drop(dup);

    // A client that guessed wrong is corrected by n0's refusal: it resends to the named owner.
    let stray = by_owner["n2"][0];
    let s = nodes[0].clients.features.write_features(write(&[stray])).await.expect_err("n2's user");
    let d = not_owned(&s);
    let owner = nodes.iter_mut().find(|n| n.daemon.addr == format!("http://{}", d.owner_addr));
    let owner = owner.expect("the refusal names a node's address");
    assert_eq!(owner.id, "n2");
    owner.clients.features.write_features(write(&[stray])).await.expect("written at the owner");

    // Without etcd the nodes keep serving (and forwarding) from their last map; changes are
    // refused.
    etcd.kill();
    for n in &nodes {
        n.wait_for("etcd to be gone", |s| !s.etcd_connected).await;
    }
    for n in &mut nodes {
        let mine = by_owner[&n.id].clone();
        n.clients.features.write_features(write(&mine)).await.expect("owners still take writes");
        let r = n.clients.features.get_online_features(lookup(&mine)).await.expect("and answer").into_inner();
        assert_eq!(r.columns[0].int64_values.len(), mine.len());
        let other = by_owner.iter().find(|(o, _)| **o != n.id).map(|(_, u)| u[0]).expect("another owner");
        let s = n.clients.features.get_online_features(hop(lookup(&[other]))).await.expect_err("not its slot");
        assert_eq!(not_owned(&s).map_revision, revision);
        if n.id != "n0" {
            let r = n.clients.features.get_online_features(lookup(&everyone)).await.expect("forwarded");
            assert_eq!(r.into_inner().columns[0].int64_values.len(), everyone.len());
        }
    }
    let s = nodes[0].cluster.init_slots(pb::InitSlotsRequest {}).await.expect_err("no etcd");
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");

    // An owner that cannot be reached fails its part of a write; the others are applied, and
    // the error says which, without inviting a resend for a moved slot.
    let n2 = nodes.pop().expect("three nodes");
    n2.daemon.kill();
    let (mine, other) = (by_owner["n1"][2], by_owner["n2"][2]);
    let mut spanning = write(&[mine, other]);
    spanning.rows[0].values.insert("clicks".into(), int(555));
    let s = nodes[1].clients.features.write_features(spanning).await.expect_err("n2 is down");
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    let m = s.message();
    assert!(m.contains("not applied on node n2 (its part holds rows 1 of the request)"), "{s:?}");
    assert!(m.contains("shards that applied their rows: n1 (1 rows)"), "{s:?}");
    let r = nodes[1].clients.features.get_online_features(lookup(&[mine])).await.expect("n1's").into_inner();
    assert_eq!(r.columns[0].int64_values, [555]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_shard_settings_are_refused_and_unsharded_nodes_say_so() {
    let dir = tempfile::tempdir().expect("temp dir");
    let quiverd = quiver_e2e::quiverd_path();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&quiverd)
            .arg("--data-dir")
            .arg(dir.path().join("bad"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .output()
            .expect("runs");
        assert!(!out.status.success(), "{args:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(run(&["--etcd", "http://127.0.0.1:1"]).contains("--node-id"));
    assert!(run(&["--node-id", "a"]).contains("--etcd"));
    assert!(run(&["--no-forward"]).contains("--etcd"));
    assert!(run(&["--etcd", "http://127.0.0.1:1", "--node-id", "a/b"]).contains("not allowed"));
    assert!(run(&["--etcd", "http://127.0.0.1:1", "--node-id", "a", "--cluster", ""]).contains("1 to 64"));

    let plain = Daemon::start(&dir.path().join("plain"), &[]);
    let mut c = pb::cluster_service_client::ClusterServiceClient::new(plain.channel().await);
    let s = c.get_cluster_status(pb::GetClusterStatusRequest {}).await.expect("status").into_inner();
    assert!(!s.sharded);
    let e = c.init_slots(pb::InitSlotsRequest {}).await.expect_err("not sharded");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
}
