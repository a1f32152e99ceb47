//! Replication end to end: two real `quiverd` regions peering over gRPC. The registry and data
//! cross; operators pause, resume and re-bootstrap a peer; bad cluster configurations and
//! requests from strangers are refused. (Faults are `jepsen/`'s job.)

use std::time::Duration;

use quiver_e2e::{clicks_row, eventually, example_registry, free_port, key, ts, Clients, Daemon};
use quiver_proto::v1 as pb;
use tonic::Code;

const T0: i64 = 1_767_225_600_000_000;

fn row(user: &str, clicks: i64) -> pb::WriteRow {
    clicks_row(user, T0, clicks)
}

/// The clicks `user` holds in a region (None: nothing yet).
async fn clicks(c: &mut Clients, user: &str) -> Option<i64> {
    let req = pb::GetOnlineFeaturesRequest {
        entity_type: "user".into(),
        entities: vec![key(user)],
        features: vec!["user_stats:clicks".into()],
        as_of: ts(T0 + 1),
        ..Default::default()
    };
    let r = c.features.get_online_features(req).await.ok()?.into_inner();
    let col = r.columns.first()?;
    (col.statuses.first() == Some(&(pb::FeatureStatus::Present as i32))).then(|| col.int64_values[0])
}

async fn peer_status(c: &mut Clients, region: u32) -> pb::PeerStatus {
    let s = c.admin.get_replication_status(pb::GetReplicationStatusRequest {}).await.expect("status").into_inner();
    s.peers.into_iter().find(|p| p.region == region).expect("peer listed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_regions_replicate_and_operators_pause_resume_and_rebootstrap() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (p1, p2) = (free_port(), free_port());
    let a1 = format!("127.0.0.1:{p1}");
    let a2 = format!("127.0.0.1:{p2}");
    let peer_of_1 = format!("2={a2}");
    let peer_of_2 = format!("1={a1}");
    // Watermarks are stored every 50 ms (not every minute) so that region 2 sees them soon.
    let env = [("QUIVER_TEST_WATERMARK_INTERVAL_MS", "50")];
    let r1 = Daemon::start_with_env(&dir.path().join("r1"), &a1, &["--region", "1", "--peer", &peer_of_1], &env);
    let r2 = Daemon::start_with_env(&dir.path().join("r2"), &a2, &["--region", "2", "--peer", &peer_of_2], &env);
    let mut c1 = Clients::of(&r1).await;
    let mut c2 = Clients::of(&r2).await;

    // The registry applied in region 1 appears in region 2.
    c1.registry.apply_registry(example_registry()).await.expect("apply");
    eventually("the registry in region 2", Duration::from_secs(10), || {
        let mut r = c2.registry.clone();
        async move {
            r.get_feature_group(pb::GetFeatureGroupRequest { name: "user_stats".into(), version: 0 }).await.is_ok()
        }
    })
    .await;

    // Writes cross both ways.
    let write = |c: &Clients, user: &'static str, v: i64| {
        let mut f = c.features.clone();
        async move {
            f.write_features(pb::WriteFeaturesRequest { rows: vec![row(user, v)], ..Default::default() })
                .await
                .expect("write")
        }
    };
    write(&c1, "alice", 1).await;
    write(&c2, "bob", 2).await;
    eventually("alice in region 2", Duration::from_secs(10), || {
        let mut c = c2.clone();
        async move { clicks(&mut c, "alice").await == Some(1) }
    })
    .await;
    eventually("bob in region 1", Duration::from_secs(10), || {
        let mut c = c1.clone();
        async move { clicks(&mut c, "bob").await == Some(2) }
    })
    .await;
    // Region 1's freshness watermark crosses with its data: region 2 knows how fresh the group
    // is although it never took a write this new itself.
    let mut newer = row("carol", 4);
    newer.event_time = ts(T0 + 5_000_000);
    c1.features
        .write_features(pb::WriteFeaturesRequest { rows: vec![newer], ..Default::default() })
        .await
        .expect("write");
    eventually("region 1's watermark in region 2", Duration::from_secs(10), || {
        let mut m = c2.monitor.clone();
        async move {
            let r = m.get_feature_health(pb::GetFeatureHealthRequest { group: "user_stats".into() }).await;
            let g = r.expect("health").into_inner().groups.remove(0);
            g.newest_event_time == ts(T0 + 5_000_000) && g.values_written == 1
        }
    })
    .await;
    // A version staged and promoted in region 1 serves in region 2; a rollback in region 2
    // serves in region 1: the serving version is one replicated registry cell per change.
    let serving = |c: &Clients| {
        let mut r = c.registry.clone();
        async move {
            let g = r.get_feature_group(pb::GetFeatureGroupRequest { name: "user_stats".into(), version: 0 }).await;
            g.map(|g| g.into_inner().version).unwrap_or(0)
        }
    };
    let mut v2 = example_registry();
    v2.feature_groups[0].description = "v2".into();
    let staged = c1.registry.apply_registry(v2).await.expect("stage v2").into_inner();
    assert!(!staged.changes[1].serving, "{staged:?}");
    c1.registry
        .promote_group(pb::PromoteGroupRequest { group: "user_stats".into(), version: 2, ..Default::default() })
        .await
        .expect("promote in region 1");
    eventually("the promotion in region 2", Duration::from_secs(10), || {
        let f = serving(&c2);
        async move { f.await == 2 }
    })
    .await;
    c2.registry
        .rollback_group(pb::RollbackGroupRequest { group: "user_stats".into(), reason: "from region 2".into() })
        .await
        .expect("rollback in region 2");
    eventually("the rollback in region 1", Duration::from_secs(10), || {
        let f = serving(&c1);
        async move { f.await == 1 }
    })
    .await;
    let h = c1
        .registry
        .list_group_versions(pb::ListGroupVersionsRequest { group: "user_stats".into() })
        .await
        .expect("versions")
        .into_inner();
    assert_eq!(h.promotions.last().map(|p| (p.to_version, p.reason.as_str())), Some((1, "from region 2")));

    let st = peer_status(&mut c2, 1).await;
    assert_eq!(st.state, pb::PeerState::Streaming as i32, "{st:?}");
    assert!(st.cursor > 0 && st.batches_applied >= 2 && st.last_error.is_empty(), "{st:?}");
    let metrics = r2.scrape();
    assert!(metrics.contains("quiver_replication_lag_seconds{peer=\"1\"}"), "{metrics}");
    assert!(metrics.contains("quiver_replication_peer_streaming{peer=\"1\"} 1"), "{metrics}");

    // Paused: region 2 stops pulling region 1; resumed: it catches up.
    let paused = c2.admin.pause_replication(pb::PeerRequest { region: 1 }).await.expect("pause").into_inner();
    assert_eq!(paused.peer.expect("peer").state, pb::PeerState::Paused as i32);
    tokio::time::sleep(Duration::from_millis(300)).await;
    write(&c1, "alice", 3).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(clicks(&mut c2, "alice").await, Some(1), "nothing is pulled while paused");
    c2.admin.resume_replication(pb::PeerRequest { region: 1 }).await.expect("resume");
    eventually("alice's update in region 2", Duration::from_secs(10), || {
        let mut c = c2.clone();
        async move { clicks(&mut c, "alice").await == Some(3) }
    })
    .await;

    // A forced re-bootstrap applies region 1's snapshot and continues from its log.
    c2.admin.rebootstrap_replication(pb::PeerRequest { region: 1 }).await.expect("rebootstrap");
    eventually("the bootstrap", Duration::from_secs(10), || {
        let mut a = c2.admin.clone();
        async move {
            let s = a.get_replication_status(pb::GetReplicationStatusRequest {}).await.expect("status").into_inner();
            s.peers.iter().any(|p| p.region == 1 && p.bootstraps == 1 && p.state == pb::PeerState::Streaming as i32)
        }
    })
    .await;
    write(&c1, "carol", 4).await;
    eventually("carol in region 2 after the bootstrap", Duration::from_secs(10), || {
        let mut c = c2.clone();
        async move { clicks(&mut c, "carol").await == Some(4) }
    })
    .await;
    assert_eq!(clicks(&mut c2, "alice").await, Some(3));

    // Unknown peers and strangers.
    let e = c2.admin.pause_replication(pb::PeerRequest { region: 9 }).await.expect_err("unknown peer");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let mut repl = pb::replication_service_client::ReplicationServiceClient::new(r1.channel().await);
    let e = match repl.pull(pb::PullRequest { region: 7, after: 0, window_ms: 10, ..Default::default() }).await {
        Ok(mut s) => s.get_mut().message().await.expect_err("a stranger's pull"),
        Err(e) => e,
    };
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = match repl.snapshot(pb::SnapshotRequest { region: 7, ..Default::default() }).await {
        Ok(mut s) => s.get_mut().message().await.expect_err("a stranger's snapshot"),
        Err(e) => e,
    };
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = repl.members(pb::MembersRequest { region: 7 }).await.expect_err("a stranger's members");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // An unsharded region is one member: the node asked, stream 0.
    let m = repl.members(pb::MembersRequest { region: 2 }).await.expect("members").into_inner();
    assert_eq!((m.region, m.members), (1, vec![pb::Member::default()]));
    // A slot set is empty or 512 bytes.
    let bad = pb::PullRequest { region: 2, after: 0, window_ms: 10, slots: vec![0xff; 511], ..Default::default() };
    let e = match repl.pull(bad).await {
        Ok(mut s) => s.get_mut().message().await.expect_err("a short slot set"),
        Err(e) => e,
    };
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("512 bytes"), "{e:?}");
    // A cursor past region 1's log is refused and not taken as region 2's acknowledgement.
    let last = c1.admin.get_stats(pb::GetStatsRequest {}).await.expect("stats").into_inner().last_sequence;
    let e = match repl
        .pull(pb::PullRequest { region: 2, after: last + 1_000_000, window_ms: 10, ..Default::default() })
        .await
    {
        Ok(mut s) => s.get_mut().message().await.expect_err("a cursor from the future"),
        Err(e) => e,
    };
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("past this node's last sequence number"), "{e:?}");
    let acked = peer_status(&mut c1, 2).await.peer_acknowledged;
    let last = c1.admin.get_stats(pb::GetStatsRequest {}).await.expect("stats").into_inner().last_sequence;
    assert!(acked <= last, "acknowledged {acked} is past the log's end {last}");
    // A single-region node reports no peers.
    let single = Daemon::start(&dir.path().join("single"), &[]);
    let mut cs = Clients::of(&single).await;
    let s = cs.admin.get_replication_status(pb::GetReplicationStatusRequest {}).await.expect("status").into_inner();
    assert!(s.peers.is_empty());
    assert!(r1.stop() && r2.stop());
}

#[test]
fn quiverd_refuses_bad_cluster_configurations() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (args, says) in [
        (vec!["--region", "1", "--peer", "1=127.0.0.1:1"], "own region"),
        (vec!["--region", "1", "--peer", "2"], "REGION=HOST:PORT"),
        (vec!["--region", "64"], "region must be 0 to 63"),
        (vec!["--region", "1", "--peer", "2=127.0.0.1:1", "--peer", "2=127.0.0.1:2"], "twice"),
        (vec!["--join-threads", "0"], "join threads must be 1 to 8"),
        (vec!["--join-threads", "9"], "join threads must be 1 to 8"),
    ] {
        let out = std::process::Command::new(quiver_e2e::quiverd_path())
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
            .args(&args)
            .output()
            .expect("run quiverd");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
