//! Moving slots end to end (server/CLUSTER.md §5): a real etcd and three `quiverd` nodes. Half
//! of n0's slots move to n2 while two clients keep writing through n1 (which forwards), each
//! write with its own idempotency key and retried until acknowledged, as a production client
//! does. Afterwards every acknowledged write is present exactly once at the new owner, the
//! moved history is the old owner's version for version (same system times), the old owner
//! refuses the slots naming the new one at the next epoch, and a write taken by the new owner
//! wins. Then: a move whose target is killed mid-way stays in the map and resumes when asked
//! again; a move is aborted cleanly; and with etcd gone, moves are refused while serving goes
//! on.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use quiver_e2e::shard::{slot_of_user, Node};
use quiver_e2e::{clicks_row, example_registry, key, ts, Etcd};
use quiver_proto::v1 as pb;
use tonic::Code;

const T0: i64 = 1_767_225_600_000_000;
/// Event times of the concurrent writes start here (one per write: each is one version).
const LIVE_T0: i64 = T0 + 1_000_000_000;

fn now_us() -> i64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970");
    i64::try_from(d.as_micros()).expect("fits")
}

/// `msg` marked as already forwarded: the node answers it itself or refuses it.
fn hop<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("quiver-forwarded", tonic::metadata::MetadataValue::from_static("1"));
    r
}

/// Every version of `user`'s clicks at node `n` itself: (event µs, system µs, value).
async fn history(n: &Node, user: &str) -> Vec<(i64, i64, Option<i64>)> {
    let req = pb::ScanHistoryRequest {
        entity_type: "user".into(),
        entity: Some(key(user)),
        group: "user_stats".into(),
        ..Default::default()
    };
    let mut c = n.clients.features.clone();
    let mut stream =
        c.scan_history(hop(req)).await.unwrap_or_else(|e| panic!("{} scans {user}: {e:?}", n.id)).into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await.expect("a chunk") {
        for v in chunk.versions {
            let us =
                |t: Option<prost_types::Timestamp>| t.map_or(0, |t| t.seconds * 1_000_000 + i64::from(t.nanos) / 1000);
            let value = v.value.and_then(|v| match v.kind {
                Some(pb::value::Kind::Int64Value(x)) => Some(x),
                _ => None,
            });
            out.push((us(v.event_time), us(v.system_time), value));
        }
    }
    out
}

/// Runs a move to `to` through node `target`, to its end; the phases it reported.
async fn run_move(target: &Node, first: u32, last: u32) -> Result<Vec<String>, tonic::Status> {
    let mut c = target.cluster.clone();
    let req = pb::MoveSlotsRequest { first, last, to: target.id.clone() };
    let mut stream = c.move_slots(req).await?.into_inner();
    let mut phases: Vec<String> = Vec::new();
    while let Some(p) = stream.message().await? {
        if phases.last() != Some(&p.phase) {
            phases.push(p.phase.clone());
        }
        if p.phase == "done" {
            assert!(p.switched_revision > 0, "{p:?}");
            return Ok(phases);
        }
    }
    panic!("the move's stream ended before it was done: {phases:?}");
}

/// The run of the map holding `slot`: (owner, epoch).
fn owner(map: &pb::SlotMap, slot: u32) -> (String, u64) {
    let r = map.runs.iter().find(|r| (r.first..=r.last).contains(&slot)).expect("every slot has a run");
    (r.owner.clone(), r.epoch)
}

/// A client writing through `n` until `stop`: one row per write, each at its own event time
/// with its own idempotency key, resent while refused for a moving or moved slot (or an
/// unreachable owner); what was acknowledged, as (user, event µs, value).
async fn writer(
    mut c: pb::feature_service_client::FeatureServiceClient<quiver_e2e::TokenChannel>,
    who: u64,
    users: Vec<String>,
    next: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
) -> Vec<(String, i64, i64)> {
    let mut acked = Vec::new();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let seq = next.fetch_add(1, Ordering::Relaxed);
        let user = users[i % users.len()].clone();
        i += 1;
        let event = LIVE_T0 + seq as i64;
        let req = pb::WriteFeaturesRequest {
            rows: vec![clicks_row(&user, event, seq as i64)],
            idempotency_key: format!("w{who}-{seq}"),
            ..Default::default()
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match c.write_features(req.clone()).await {
                Ok(_) => break,
                Err(s) if matches!(s.code(), Code::Unavailable | Code::FailedPrecondition) => {
                    refused.fetch_add(1, Ordering::Relaxed);
                    assert!(Instant::now() < deadline, "a write refused for 30 s: {s:?}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(s) => panic!("write {seq} of {user}: {s:?}"),
            }
        }
        acked.push((user, event, seq as i64));
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_move_under_writes_resume_after_a_kill_abort_and_wait_for_etcd() {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = Etcd::start();
    let mut nodes = Vec::new();
    // Every online answer is logged, for MeasureSkew.
    for id in ["n0", "n1", "n2"] {
        nodes.push(Node::start(dir.path(), id, &etcd, id, &["--log-sample-rate", "1"]).await);
    }
    for n in &mut nodes {
        n.clients.registry.apply_registry(example_registry()).await.expect("registry");
    }
    for n in &nodes {
        n.wait_for("three live nodes", |s| s.etcd_connected && s.nodes.iter().filter(|x| x.live).count() == 3).await;
    }
    let map = nodes[0].cluster.init_slots(pb::InitSlotsRequest {}).await.expect("init").into_inner().map;
    let map = map.expect("a map");
    assert_eq!(owner(&map, 0), ("n0".into(), 1));
    // Half of n0's run (0..=1365) moves to n2.
    let (first, last) = (0u32, 682u32);
    let users: Vec<String> = (0..400).map(|i| format!("u{i}")).collect();
    let moving: Vec<String> = users.iter().filter(|u| slot_of_user(u) <= last).cloned().collect();
    let staying: Vec<String> = users.iter().filter(|u| (683..=1365).contains(&slot_of_user(u))).cloned().collect();
    assert!(moving.len() >= 30 && staying.len() >= 30, "{} moving, {} staying", moving.len(), staying.len());
    for n in &nodes {
        n.wait_for("the map", |s| s.map.as_ref().is_some_and(|m| m.revision == map.revision)).await;
    }

    // History before the move, at n0: two versions of one event time (the first superseded),
    // and a deleted later one.
    let mut n0 = nodes[0].clients.features.clone();
    for (i, u) in moving.iter().enumerate() {
        for v in [1, 2] {
            n0.write_features(pb::WriteFeaturesRequest { rows: vec![clicks_row(u, T0, v)], ..Default::default() })
                .await
                .expect("write at the owner");
        }
        if i % 3 == 0 {
            let mut del = clicks_row(u, T0 + 1, 0);
            del.values.clear();
            del.deletes = vec!["clicks".into()];
            n0.write_features(pb::WriteFeaturesRequest { rows: vec![del], ..Default::default() })
                .await
                .expect("delete");
        }
    }
    // An idempotent write before the move, to be resent after it.
    let keyed = pb::WriteFeaturesRequest {
        rows: vec![clicks_row(&moving[1], T0 + 2, 42)],
        idempotency_key: "before-the-move".into(),
        ..Default::default()
    };
    n0.write_features(keyed.clone()).await.expect("an idempotent write");
    let mut before = BTreeMap::new();
    for u in &moving {
        before.insert(u.clone(), history(&nodes[0], u).await);
    }
    assert!(before.values().all(|h| h.len() >= 2), "{before:?}");

    // Answers n0 serves now are logged there: five of users that move, five that stay.
    let logged_from = now_us();
    for batch in [&moving[..5], &staying[..5]] {
        let lookup = pb::GetOnlineFeaturesRequest {
            entity_type: "user".into(),
            entities: batch.iter().map(|u| key(u)).collect(),
            features: vec!["user_stats:clicks".into()],
            as_of: ts(T0),
            ..Default::default()
        };
        n0.get_online_features(hop(lookup)).await.expect("n0 serves its users");
    }

    // Two clients write through n1 (to moving users and staying ones) during the move.
    let (stop, next, refused) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mixed: Vec<String> = moving.iter().chain(staying.iter().take(10)).cloned().collect();
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let c = nodes[1].clients.features.clone();
            tokio::spawn(writer(c, w, mixed.clone(), next.clone(), stop.clone(), refused.clone()))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let phases = run_move(&nodes[2], first, last).await.expect("the move");
    assert_eq!(phases.first().map(String::as_str), Some("copy"), "{phases:?}");
    assert_eq!(phases.last().map(String::as_str), Some("done"), "{phases:?}");
    for p in ["catch-up", "fence", "switch"] {
        assert!(phases.iter().any(|x| x == p), "{p} in {phases:?}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.expect("a writer"));
    }
    assert!(acked.len() >= 20, "the clients kept writing: {} writes", acked.len());

    // Every node sees the switch: the moved slots are n2's at epoch 2, the rest of n0's run
    // stays at epoch 1, and no move is left.
    for n in &nodes {
        n.wait_for("the switch", |s| {
            s.map.as_ref().is_some_and(|m| m.moves.is_empty() && owner(m, first) == ("n2".into(), 2))
        })
        .await;
    }
    let map = nodes[0].status().await.map.expect("a map");
    assert_eq!(owner(&map, last), ("n2".into(), 2));
    assert_eq!(owner(&map, last + 1), ("n0".into(), 1));
    let refusal = n0
        .write_features(hop(pb::WriteFeaturesRequest {
            rows: vec![clicks_row(&moving[0], T0, 9)],
            ..Default::default()
        }))
        .await
        .expect_err("n0 no longer owns it");
    assert_eq!(refusal.code(), Code::FailedPrecondition, "{refusal:?}");
    let d = pb::SlotNotOwned::decode(refusal.details()).expect("details");
    assert_eq!((d.owner.as_str(), d.epoch), ("n2", 2), "{d:?}");

    // Resent after the switch, the idempotent write is answered by the new owner from the
    // record that moved with it, not applied again.
    let again = nodes[1].clients.features.write_features(keyed).await.expect("the retry").into_inner();
    assert!(again.deduplicated, "{again:?}");

    // The moved history is n0's, version for version (same system times); every acknowledged
    // write is present once, at its owner, and nothing else was written.
    let mut by_user: BTreeMap<&str, Vec<(i64, i64)>> = BTreeMap::new();
    for (u, e, v) in &acked {
        by_user.entry(u.as_str()).or_default().push((*e, *v));
    }
    for u in &mixed {
        let at = if slot_of_user(u) <= last { &nodes[2] } else { &nodes[0] };
        let h = history(at, u).await;
        let old: Vec<_> = h.iter().filter(|x| x.0 < LIVE_T0).cloned().collect();
        if let Some(b) = before.get(u) {
            assert_eq!(&old, b, "{u}: the history moved as it was");
        }
        let mut live: Vec<(i64, i64)> =
            h.iter().filter(|x| x.0 >= LIVE_T0).map(|x| (x.0, x.2.expect("a value"))).collect();
        live.sort();
        let mut want = by_user.remove(u.as_str()).unwrap_or_default();
        want.sort();
        assert_eq!(live, want, "{u} at {}: every acknowledged write once, nothing more", at.id);
    }
    assert!(by_user.is_empty(), "{by_user:?}");
    let m = nodes[2].daemon.scrape();
    assert!(m.contains("quiver_moves_total{outcome=\"switched\"} 1"), "{m}");
    assert!(nodes[2].daemon.metric("quiver_move_versions_total{phase=\"copy\"}") > 0, "{m}");

    // n0 measures skew over what it logged, leaving out the answers of the users that moved
    // away (it no longer holds them to replay).
    let skew = pb::MeasureSkewRequest { from: ts(logged_from), to: ts(now_us() + 1_000_000), ..Default::default() };
    let r = nodes[0].clients.monitor.measure_skew(skew).await.expect("skew at the old owner").into_inner();
    assert_eq!(r.answers, 5, "only the staying users' answers: {r:?}");
    assert!(r.features.iter().all(|f| f.mismatched == 0), "{r:?}");

    // The new owner's write wins over every moved version (its clock went past their stamps).
    let u = &moving[0];
    nodes[1]
        .clients
        .features
        .write_features(pb::WriteFeaturesRequest { rows: vec![clicks_row(u, T0, 77)], ..Default::default() })
        .await
        .expect("write at the new owner");
    let h = history(&nodes[2], u).await;
    let newest = h.iter().filter(|x| x.0 == T0).max_by_key(|x| x.1).expect("versions at T0");
    assert_eq!(newest.2, Some(77), "{h:?}");
    assert!(before[u].iter().all(|b| b.1 < newest.1), "stamped above every moved version: {h:?} vs {:?}", before[u]);
    eprintln!(
        "moved {} users under {} acknowledged writes ({} refusals retried)",
        moving.len(),
        acked.len(),
        refused.load(Ordering::Relaxed)
    );

    // The target killed (SIGKILL) mid-move: the move stays in the map (unless it finished
    // first); the restarted node resumes it when asked again, and the slots end at n1 with
    // their history.
    let (first2, last2) = (683u32, 1000u32);
    let users2: Vec<String> = staying.iter().filter(|u| slot_of_user(u) <= last2).cloned().collect();
    assert!(!users2.is_empty());
    let mut before2 = BTreeMap::new();
    for u in &users2 {
        before2.insert(u.clone(), history(&nodes[0], u).await);
    }
    {
        let mut c = nodes[1].cluster.clone();
        let req = pb::MoveSlotsRequest { first: first2, last: last2, to: "n1".into() };
        let mut stream = c.move_slots(req).await.expect("a move").into_inner();
        let p = stream.message().await.expect("progress").expect("a message");
        assert!(!p.phase.is_empty(), "{p:?}");
    }
    nodes.remove(1).daemon.kill();
    let map = nodes[0].status().await.map.expect("a map");
    let left = map.moves.iter().any(|m| m.first == first2 && m.last == last2 && m.to == "n1");
    assert!(left || owner(&map, first2).0 == "n1", "the move is in the map, or it finished before the kill: {map:?}");
    // Restarted on its data directory, it takes over its dead predecessor's registration at
    // once, rather than serving nothing until that process's lease (10 s, renewed every 2.5 s)
    // expires: registered again well within the lease's last renewal (5 s of its 7.5 to 10 s).
    let n1 = Node::start(dir.path(), "n1", &etcd, "n1", &[]).await;
    quiver_e2e::eventually("registered again before the dead process's lease expires", Duration::from_secs(5), || {
        let n1 = &n1;
        async move { n1.status().await.etcd_connected }
    })
    .await;
    let phases = run_move(&n1, first2, last2).await.expect("the move resumes");
    assert_eq!(phases.last().map(String::as_str), Some("done"), "{phases:?}");
    n1.wait_for("the switch", |s| s.map.as_ref().is_some_and(|m| m.moves.is_empty() && owner(m, first2).0 == "n1"))
        .await;
    for u in &users2 {
        assert_eq!(&history(&n1, u).await, &before2[u], "{u}: moved as it was");
    }
    nodes.insert(1, n1);

    // The source down: a move of its slots stops at the copy, naming it, and stays in the
    // map; another is aborted while it is down. Back up, the source serves and takes writes
    // (the first move is only copying), and the first move resumes to its switch.
    let (first3, last3) = (1001u32, 1200u32);
    let (first4, last4) = (1201u32, 1365u32);
    let users3: Vec<String> = staying.iter().filter(|u| (first3..=last3).contains(&slot_of_user(u))).cloned().collect();
    let users4: Vec<String> = staying.iter().filter(|u| (first4..=last4).contains(&slot_of_user(u))).cloned().collect();
    assert!(!users3.is_empty() && !users4.is_empty());
    let n0 = nodes.remove(0);
    assert!(n0.daemon.stop(), "n0 stops cleanly");
    // nodes: [n1, n2] while n0 is down.
    for (f, l) in [(first3, last3), (first4, last4)] {
        let s = run_move(&nodes[0], f, l).await.expect_err("the source is down");
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        assert!(s.message().contains("n0"), "names the source: {s:?}");
    }
    let mut c = nodes[0].cluster.clone();
    let s = c.abort_move(pb::AbortMoveRequest { first: first3, last: last4 }).await.expect_err("not a move's slots");
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    let map = c.abort_move(pb::AbortMoveRequest { first: first4, last: last4 }).await.expect("abort").into_inner().map;
    let map = map.expect("a map");
    assert_eq!(map.moves.len(), 1, "{map:?}");
    assert_eq!((map.moves[0].first, map.moves[0].state), (first3, pb::MoveState::Copying as i32));
    let n0 = Node::start(dir.path(), "n0", &etcd, "n0", &[]).await;
    n0.wait_for("registered again", |s| s.etcd_connected && s.map.as_ref().is_some_and(|m| m.moves.len() == 1)).await;
    let mut w = n0.clients.features.clone();
    for u in [&users3[0], &users4[0]] {
        w.write_features(hop(pb::WriteFeaturesRequest { rows: vec![clicks_row(u, T0 + 5, 5)], ..Default::default() }))
            .await
            .unwrap_or_else(|e| panic!("n0 takes writes to {u}: {e:?}"));
    }
    nodes.insert(0, n0);
    let phases = run_move(&nodes[1], first3, last3).await.expect("the move resumes");
    assert_eq!(phases.last().map(String::as_str), Some("done"), "{phases:?}");
    nodes[1].wait_for("the switch", |s| s.map.as_ref().is_some_and(|m| owner(m, first3).0 == "n1")).await;
    assert!(history(&nodes[1], &users3[0]).await.iter().any(|h| h.0 == T0 + 5 && h.2 == Some(5)));

    // Requests that cannot be moves are refused.
    let bad =
        nodes[2].cluster.clone().move_slots(pb::MoveSlotsRequest { first: 1300, last: 1400, to: "n2".into() }).await;
    let s = match bad {
        Err(s) => s,
        Ok(r) => r.into_inner().message().await.expect_err("refused"),
    };
    assert_eq!(s.code(), Code::FailedPrecondition, "two owners: {s:?}");
    assert!(s.message().contains("owners"), "{s:?}");
    let wrong =
        nodes[0].cluster.clone().move_slots(pb::MoveSlotsRequest { first: first4, last: last4, to: "n2".into() }).await;
    let s = match wrong {
        Err(s) => s,
        Ok(r) => r.into_inner().message().await.expect_err("refused"),
    };
    assert_eq!(s.code(), Code::FailedPrecondition, "sent to a node that is not the target: {s:?}");
    let s = nodes[2].cluster.clone().move_slots(pb::MoveSlotsRequest { first: 5, last: 4096, to: "n2".into() }).await;
    let s = match s {
        Err(s) => s,
        Ok(r) => r.into_inner().message().await.expect_err("refused"),
    };
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let mut n0c = nodes[0].cluster.clone();

    // With etcd gone, no move starts or ends, and the nodes keep serving.
    etcd.kill();
    for n in &nodes {
        n.wait_for("etcd lost", |s| !s.etcd_connected).await;
    }
    let s = match nodes[2]
        .cluster
        .clone()
        .move_slots(pb::MoveSlotsRequest { first: first4, last: last4, to: "n2".into() })
        .await
    {
        Err(s) => s,
        Ok(r) => r.into_inner().message().await.expect_err("no etcd"),
    };
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    let s = n0c.abort_move(pb::AbortMoveRequest { first: first4, last: last4 }).await.expect_err("no etcd");
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    for (u, at, want) in [(&moving[0], T0, 77), (&users3[0], T0 + 5, 5)] {
        let lookup = pb::GetOnlineFeaturesRequest {
            entity_type: "user".into(),
            entities: vec![key(u)],
            features: vec!["user_stats:clicks".into()],
            as_of: ts(at),
            ..Default::default()
        };
        let r = nodes[0].clients.features.get_online_features(lookup).await.expect("served from the last map");
        assert_eq!(r.into_inner().columns[0].int64_values, [want], "{u}");
    }
}
