//! Two sharded regions replicating (server/CLUSTER.md §7): one etcd, region 1 of two `quiverd`
//! nodes (cluster `r1`: halves of the slots) and region 2 of three (cluster `r2`: thirds), so
//! their maps differ. Every node pulls its own slots from every node of the other region, one
//! stream per node; writes taken anywhere reach every owner of their slots in the other
//! region, and each region answers every user. Then a run of slots moves in region 2 while
//! region 1 writes to it, and the new owner ends with every version (the move's backfill).
//! A second test removes a node from a region (drained, then pulled no more by the peers).

use std::time::{Duration, Instant};

use quiver_e2e::shard::slot_of_user;
use quiver_e2e::{clicks_row, eventually, example_registry, free_port, key, ts, Clients, Daemon, Etcd};
use quiver_proto::v1 as pb;

const T0: i64 = 1_767_225_600_000_000;

struct Node {
    id: String,
    // Held: the process stops when the node is dropped.
    _daemon: Daemon,
    clients: Clients,
    cluster: pb::cluster_service_client::ClusterServiceClient<tonic::transport::Channel>,
}

async fn status(n: &Node) -> pb::GetClusterStatusResponse {
    let mut c = n.cluster.clone();
    c.get_cluster_status(pb::GetClusterStatusRequest {}).await.expect("status").into_inner()
}

/// The clicks of `users` read through `c` (None where nothing is served).
async fn clicks(c: &Clients, users: &[String]) -> Vec<Option<i64>> {
    let req = pb::GetOnlineFeaturesRequest {
        entity_type: "user".into(),
        entities: users.iter().map(|u| key(u)).collect(),
        features: vec!["user_stats:clicks".into()],
        as_of: ts(T0 + 1),
        ..Default::default()
    };
    let mut f = c.features.clone();
    let Ok(r) = f.get_online_features(req).await else { return vec![None; users.len()] };
    let col = r.into_inner().columns.remove(0);
    col.statuses
        .iter()
        .enumerate()
        .map(|(i, s)| (*s == pb::FeatureStatus::Present as i32).then(|| col.int64_values.get(i).copied().unwrap_or(-1)))
        .collect()
}

/// Once every node of each region (the first `ones` nodes are region 1) is registered, creates
/// both maps, waits for every node to hold its map, and applies the registry in region 1 (to
/// each of its nodes, in the same order) until it reaches region 2.
async fn init_regions(nodes: &[Node], ones: usize) {
    for (seed, size) in [(0, ones), (ones, nodes.len() - ones)] {
        let n = &nodes[seed];
        eventually("every node of a region registered", Duration::from_secs(30), || async {
            status(n).await.nodes.iter().filter(|x| x.live).count() == size
        })
        .await;
        let mut c = n.cluster.clone();
        c.init_slots(pb::InitSlotsRequest {}).await.expect("init");
    }
    for n in nodes {
        eventually("the map", Duration::from_secs(30), || async {
            status(n).await.map.is_some_and(|m| m.revision > 0)
        })
        .await;
    }
    for n in &nodes[..ones] {
        n.clients.registry.clone().apply_registry(example_registry()).await.expect("apply");
    }
    for n in &nodes[ones..] {
        eventually("the registry in region 2", Duration::from_secs(30), || async {
            let mut r = n.clients.registry.clone();
            r.get_feature_group(pb::GetFeatureGroupRequest { name: "user_stats".into(), version: 0 }).await.is_ok()
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sharded_regions_replicate_each_slot_to_its_owners() {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = Etcd::start();
    let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
    let addr = |i: usize| format!("127.0.0.1:{}", ports[i]);
    // a1, b1 in region 1; a2, b2, c2 in region 2; each region's seed for the other is its a node.
    let spec = [
        ("a1", 1, 2, addr(2)),
        ("b1", 1, 2, addr(2)),
        ("a2", 2, 1, addr(0)),
        ("b2", 2, 1, addr(0)),
        ("c2", 2, 1, addr(0)),
    ];
    let mut nodes = Vec::new();
    for (i, (id, region, peer, seed)) in spec.iter().enumerate() {
        let (region, peer, cluster) = (region.to_string(), format!("{peer}={seed}"), format!("r{region}"));
        let args = ["--etcd", &etcd.url, "--node-id", id, "--cluster", &cluster, "--region", &region, "--peer", &peer];
        let daemon = Daemon::start_at(&dir.path().join(id), &addr(i), &args);
        let clients = Clients::of(&daemon).await;
        let cluster = pb::cluster_service_client::ClusterServiceClient::new(daemon.channel().await);
        nodes.push(Node { id: id.to_string(), _daemon: daemon, clients, cluster });
    }
    init_regions(&nodes, 2).await;

    // Users of every shard, written in region 1 through a1 and in region 2 through c2.
    let ones: Vec<String> = (0..40).map(|i| format!("one{i}")).collect();
    let twos: Vec<String> = (0..40).map(|i| format!("two{i}")).collect();
    let write = |c: &Clients, users: &[String], base: i64| {
        let rows = users.iter().enumerate().map(|(i, u)| clicks_row(u, T0, base + i as i64)).collect();
        let mut f = c.features.clone();
        async move { f.write_features(pb::WriteFeaturesRequest { rows, ..Default::default() }).await.expect("write") }
    };
    write(&nodes[0].clients, &ones, 100).await;
    write(&nodes[4].clients, &twos, 500).await;
    let everyone: Vec<String> = ones.iter().chain(&twos).cloned().collect();
    let want: Vec<Option<i64>> = (0..40).map(|i| Some(100 + i)).chain((0..40).map(|i| Some(500 + i))).collect();
    for n in &nodes {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = clicks(&n.clients, &everyone).await;
            if got == want {
                break;
            }
            if Instant::now() > deadline {
                let mut report = String::new();
                for m in &nodes {
                    let mut admin = m.clients.admin.clone();
                    let s =
                        admin.get_replication_status(pb::GetReplicationStatusRequest {}).await.map(|r| r.into_inner());
                    report.push_str(&format!("\n{}: {s:?}", m.id));
                }
                panic!("every user at {}: {got:?}{report}", n.id);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Every node pulls from every node of the other region (those that joined after its
    // first look within MEMBERS_POLL), each under its own stream.
    for n in &nodes {
        let other: &[&str] = if n.id.ends_with('1') { &["a2", "b2", "c2"] } else { &["a1", "b1"] };
        eventually(
            &format!("{} pulling from every node of the other region", n.id),
            Duration::from_secs(30),
            || async {
                let mut admin = n.clients.admin.clone();
                let s = admin.get_replication_status(pb::GetReplicationStatusRequest {}).await.expect("status");
                let s = s.into_inner();
                let mut pulled: Vec<&str> = s.peers.iter().map(|p| p.node.as_str()).collect();
                pulled.sort_unstable();
                let mut streams: Vec<u64> = s.peers.iter().map(|p| p.stream).collect();
                streams.sort_unstable();
                streams.dedup();
                pulled == other && streams.len() == other.len() && s.peers.iter().all(|p| p.stream != 0)
            },
        )
        .await;
    }

    // A conflict: both regions write one user at once; both settle on the same winner.
    let both = vec!["both".to_string()];
    write(&nodes[1].clients, &both, 7).await;
    write(&nodes[2].clients, &both, 8).await;
    eventually("the same winner everywhere", Duration::from_secs(30), || async {
        let mut seen = Vec::new();
        for n in &nodes {
            seen.push(clicks(&n.clients, &both).await[0]);
        }
        matches!(seen[0], Some(7 | 8)) && seen.windows(2).all(|w| w[0] == w[1])
    })
    .await;

    // A move in region 2 while region 1 writes to the moving slots: a2's run goes to c2. Every
    // round writes each user at a new event time, so a version lost in the move shows as a
    // missing one at the new owner (the later rounds would not hide it).
    let map = status(&nodes[2]).await.map.expect("map");
    let run = map.runs.iter().find(|r| r.owner == "a2").expect("a2's run").clone();
    let mut moving: Vec<String> = (0..2000)
        .map(|i| format!("m{i}"))
        .filter(|u| (run.first..=run.last).contains(&slot_of_user(u)))
        .take(13)
        .collect();
    // And one cell written again every round (a backfill meets it many times over).
    let hot = moving.pop().expect("13 users");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (c, users, hot, stop) = (nodes[0].clients.clone(), moving.clone(), hot.clone(), stop.clone());
        tokio::spawn(async move {
            let mut rounds = 0i64;
            // Until told to stop, then one more round.
            loop {
                let last = stop.load(std::sync::atomic::Ordering::Acquire);
                let mut rows: Vec<_> = users.iter().map(|u| clicks_row(u, T0 + rounds * 1_000_000, rounds)).collect();
                rows.push(clicks_row(&hot, T0, rounds));
                let mut f = c.features.clone();
                f.write_features(pb::WriteFeaturesRequest { rows, ..Default::default() }).await.expect("write");
                rounds += 1;
                if last {
                    return rounds;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c2 = nodes[4].cluster.clone();
    let req = pb::MoveSlotsRequest { first: run.first, last: run.last, to: "c2".into() };
    let mut progress = c2.move_slots(req).await.expect("move").into_inner();
    let mut phases = Vec::new();
    while let Some(p) = progress.message().await.expect("progress") {
        if phases.last() != Some(&p.phase) {
            phases.push(p.phase.clone());
        }
        if p.phase == "done" {
            break;
        }
    }
    assert!(
        phases.contains(&"backfill".to_string()) && phases.last().map(String::as_str) == Some("done"),
        "{phases:?}"
    );
    stop.store(true, std::sync::atomic::Ordering::Release);
    let rounds = writer.await.expect("writer");
    assert!(rounds > 20, "writes ran through the move: {rounds} rounds");
    // The new owner holds every round of every user, as region 1 does.
    let history = |c: &Clients, user: &str| {
        let mut f = c.features.clone();
        let req = pb::ScanHistoryRequest {
            entity_type: "user".into(),
            entity: Some(key(user)),
            group: "user_stats".into(),
            ..Default::default()
        };
        async move {
            let mut out = Vec::new();
            if let Ok(r) = f.scan_history(req).await {
                let mut stream = r.into_inner();
                while let Ok(Some(chunk)) = stream.message().await {
                    out.extend(chunk.versions.into_iter().map(|v| (v.event_time, v.value)));
                }
            }
            out.sort_by_key(|(t, v)| (t.as_ref().map(|t| (t.seconds, t.nanos)), format!("{v:?}")));
            out
        }
    };
    for u in &moving {
        let want = history(&nodes[0].clients, u).await;
        assert_eq!(want.len() as i64, rounds, "{u} in region 1");
        eventually(&format!("{u}'s every round at c2"), Duration::from_secs(30), || async {
            history(&nodes[4].clients, u).await == want
        })
        .await;
    }
    // The cell written every round ends on the last round at c2. (Its history there may lack
    // versions the backfill brought after a newer one had arrived: they are dropped, as in a
    // snapshot bootstrap; CLUSTER.md §7.)
    let last = vec![hot.clone()];
    assert_eq!(clicks(&nodes[0].clients, &last).await, [Some(rounds - 1)]);
    eventually("the hot cell's last round at c2", Duration::from_secs(30), || async {
        clicks(&nodes[4].clients, &last).await == [Some(rounds - 1)]
    })
    .await;
    // c2 owns the slots now, and its writes reach region 1.
    assert!(status(&nodes[4])
        .await
        .map
        .is_some_and(|m| m.runs.iter().any(|r| r.owner == "c2" && r.first == run.first)));
    write(&nodes[4].clients, &moving[..1], 9_000).await;
    eventually("c2's write in region 1", Duration::from_secs(30), || async {
        clicks(&nodes[1].clients, &moving[..1]).await[0] == Some(9_000)
    })
    .await;
}

/// Runs the move of `first..=last` to the node behind `c` until it ends: its phases, or the
/// status it failed with.
async fn run_move(
    c: &pb::cluster_service_client::ClusterServiceClient<tonic::transport::Channel>,
    first: u32,
    last: u32,
    to: &str,
) -> Result<Vec<String>, tonic::Status> {
    let mut c = c.clone();
    let mut progress = c.move_slots(pb::MoveSlotsRequest { first, last, to: to.into() }).await?.into_inner();
    let mut phases: Vec<String> = Vec::new();
    while let Some(p) = progress.message().await? {
        if phases.last() != Some(&p.phase) {
            phases.push(p.phase.clone());
        }
        if p.phase == "done" {
            break;
        }
    }
    Ok(phases)
}

/// A node removed from region 2 (CLUSTER.md §7, "Removing a node"): refused while it owns
/// slots, drained once they moved away, then region 1 stops pulling from it, so a move in
/// region 1 after it stopped backfills from region 2's remaining node alone (before removals
/// existed, that backfill waited for the dead node's puller and failed after BACKFILL_WAIT).
/// What the removed node wrote is at its slots' new owners in both regions, and its id never
/// registers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_is_drained_and_pulled_no_more() {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = Etcd::start();
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let addr = |i: usize| format!("127.0.0.1:{}", ports[i]);
    // a1, b1 in region 1; a2, b2 in region 2; each region's seed for the other is its a node
    // (b2, which leaves, is no one's seed).
    let spec = [("a1", 1, 2, addr(2)), ("b1", 1, 2, addr(2)), ("a2", 2, 1, addr(0)), ("b2", 2, 1, addr(0))];
    let start = |i: usize| {
        let (id, region, peer, seed) = &spec[i];
        let (region, peer, cluster) = (region.to_string(), format!("{peer}={seed}"), format!("r{region}"));
        let args = ["--etcd", &etcd.url, "--node-id", id, "--cluster", &cluster, "--region", &region, "--peer", &peer];
        let daemon = Daemon::start_at(&dir.path().join(id), &addr(i), &args);
        async move {
            let clients = Clients::of(&daemon).await;
            let cluster = pb::cluster_service_client::ClusterServiceClient::new(daemon.channel().await);
            Node { id: id.to_string(), _daemon: daemon, clients, cluster }
        }
    };
    let mut nodes = Vec::new();
    for i in 0..spec.len() {
        nodes.push(start(i).await);
    }
    init_regions(&nodes, 2).await;
    // Every node pulls from both nodes of the other region.
    let pulled = |n: &Node| {
        let mut admin = n.clients.admin.clone();
        async move {
            let s = admin.get_replication_status(pb::GetReplicationStatusRequest {}).await.expect("status");
            let mut ids: Vec<String> = s.into_inner().peers.into_iter().map(|p| p.node).collect();
            ids.sort();
            ids
        }
    };
    for n in &nodes {
        let other = if n.id.ends_with('1') { ["a2", "b2"] } else { ["a1", "b1"] };
        eventually(
            &format!("{} pulling from both nodes of the other region", n.id),
            Duration::from_secs(30),
            || async { pulled(n).await == other },
        )
        .await;
    }

    // Users of both of region 2's shards, written through b2: those of b2's slots are in b2's
    // stream alone.
    let users: Vec<String> = (0..40).map(|i| format!("r{i}")).collect();
    let rows = users.iter().enumerate().map(|(i, u)| clicks_row(u, T0, 100 + i as i64)).collect();
    let mut f = nodes[3].clients.features.clone();
    f.write_features(pb::WriteFeaturesRequest { rows, ..Default::default() }).await.expect("write");
    let want: Vec<Option<i64>> = (0..40).map(|i| Some(100 + i)).collect();
    let map2 = status(&nodes[2]).await.map.expect("map");
    let b2_runs: Vec<pb::SlotRun> = map2.runs.iter().filter(|r| r.owner == "b2").cloned().collect();
    assert!(
        users.iter().any(|u| b2_runs.iter().any(|r| (r.first..=r.last).contains(&slot_of_user(u)))),
        "some users are b2's"
    );

    // Refused: sent to another node than the one leaving, or while it owns slots.
    let remove = |n: &Node, node: &str| {
        let mut c = n.cluster.clone();
        let req = pb::RemoveNodeRequest { node: node.into() };
        async move { c.remove_node(req).await.map(|r| r.into_inner()) }
    };
    let e = remove(&nodes[2], "b2").await.expect_err("a2 is not b2");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    let e = remove(&nodes[3], "b2").await.expect_err("b2 owns slots");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("owns 2048 slots"), "{e:?}");

    // b2's slots move to a2; then b2 leaves, drained by both nodes of region 1.
    for r in &b2_runs {
        let phases = run_move(&nodes[2].cluster, r.first, r.last, "a2").await.expect("move to a2");
        assert_eq!(phases.last().map(String::as_str), Some("done"), "{phases:?}");
    }
    // Region 1 keeps writing meanwhile: b2 applies its batches, so its log grows past its own
    // last batch while it drains (only its own batches count).
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    let (stop, rounds) = (std::sync::Arc::new(AtomicBool::new(false)), std::sync::Arc::new(AtomicI64::new(0)));
    let writer = {
        let (c, stop, rounds) = (nodes[0].clients.clone(), stop.clone(), rounds.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let n = rounds.load(Ordering::Acquire);
                let rows = (0..8).map(|i| clicks_row(&format!("busy{i}"), T0 + n, n)).collect();
                let mut f = c.features.clone();
                f.write_features(pb::WriteFeaturesRequest { rows, ..Default::default() }).await.expect("write");
                rounds.fetch_add(1, Ordering::AcqRel);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    eventually("region 1 writing", Duration::from_secs(30), || async { rounds.load(Ordering::Acquire) >= 5 }).await;
    let removed = remove(&nodes[3], "b2").await.expect("b2 leaves");
    stop.store(true, Ordering::Release);
    writer.await.expect("writer");
    assert_eq!(removed.pullers, 2, "{removed:?}");
    assert!(removed.head > 0, "{removed:?}");
    eventually("a2 sees b2 removed", Duration::from_secs(30), || async {
        let s = status(&nodes[2]).await;
        s.removed == ["b2"] && s.nodes.iter().all(|n| n.node != "b2")
    })
    .await;
    // Region 1 stops pulling from b2 (within MEMBERS_POLL), then b2 stops.
    for n in &nodes[..2] {
        eventually(&format!("{} pulling from a2 alone", n.id), Duration::from_secs(30), || async {
            pulled(n).await == ["a2"]
        })
        .await;
    }
    let b2 = nodes.pop().expect("b2");
    drop(b2);

    // A move in region 1 now backfills from a2 alone: a1's run goes to b1, and every user is
    // still answered by every node.
    let map1 = status(&nodes[0]).await.map.expect("map");
    let run = map1.runs.iter().find(|r| r.owner == "a1").expect("a1's run").clone();
    let phases = run_move(&nodes[1].cluster, run.first, run.last, "b1").await.expect("the move in region 1");
    assert!(
        phases.contains(&"backfill".to_string()) && phases.last().map(String::as_str) == Some("done"),
        "{phases:?}"
    );
    for n in &nodes {
        eventually(&format!("every user at {}", n.id), Duration::from_secs(30), || async {
            clicks(&n.clients, &users).await == want
        })
        .await;
    }

    // b2's id never registers again.
    let b2 = start(3).await;
    eventually("b2 refused by etcd", Duration::from_secs(30), || async {
        status(&b2).await.etcd_error.contains("was removed from the region")
    })
    .await;
    assert!(status(&nodes[0]).await.nodes.iter().all(|n| n.node != "b2"));
    assert!(status(&nodes[2]).await.nodes.iter().all(|n| n.node != "b2" || !n.live));
}
