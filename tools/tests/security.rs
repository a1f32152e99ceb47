//! Who may do what, end to end: tokens made with `quiver auth`, a real quiverd reading them,
//! scopes and group limits over gRPC and on the command line, revocation on SIGHUP, replication
//! tokens bound to their region, and the refusal to serve a network address unauthenticated.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use quiver_e2e::{example_registry, key, Clients, Daemon, Token};
use quiver_proto::v1 as pb;
use tonic::Code;

fn quiver(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_quiver")).args(args).output().expect("run quiver");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `quiver auth create` and the token it printed.
fn create_token(file: &Path, name: &str, extra: &[&str]) -> String {
    let mut args = vec!["auth", "create", "--file", file.to_str().expect("utf-8"), "--name", name];
    args.extend_from_slice(extra);
    let (ok, out, err) = quiver(&args);
    assert!(ok, "auth create {name}: {err}");
    let token = out.trim().to_string();
    assert!(token.starts_with("qvt_") && token.len() == 4 + 64, "{token:?}");
    token
}

fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_micros() as i64
}

fn code<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// The example registry plus a second group, `fraud_scores`, on the same entity type.
fn two_groups() -> pb::ApplyRegistryRequest {
    let mut req = example_registry();
    let mut fraud = req.feature_groups[0].clone();
    fraud.name = "fraud_scores".into();
    req.feature_groups.push(fraud);
    req
}

fn online(feature: &str) -> pb::GetOnlineFeaturesRequest {
    pb::GetOnlineFeaturesRequest {
        entity_type: "user".into(),
        entities: vec![key("u1")],
        features: vec![feature.into()],
        as_of: None,
        ..Default::default()
    }
}

fn write(group: &str) -> pb::WriteFeaturesRequest {
    let mut values = std::collections::HashMap::new();
    values.insert("clicks".to_string(), quiver_e2e::int(7));
    pb::WriteFeaturesRequest {
        rows: vec![pb::WriteRow {
            entity: Some(key("u1")),
            group: group.into(),
            // Now: within the group's 1 h TTL for the online reads below.
            event_time: quiver_e2e::ts(now_us()),
            values,
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_scopes_groups_and_revocation() {
    let tmp = tempfile::tempdir().expect("tmp");
    let tokens = tmp.path().join("tokens.toml");
    let admin = create_token(&tokens, "ops", &["--scope", "admin", "--scope", "registry", "--scope", "write"]);
    let fraud_reader = create_token(&tokens, "fraud-reader", &["--scope", "read", "--group", "fraud_"]);
    let fraud_registry = create_token(&tokens, "fraud-registry", &["--scope", "registry", "--group", "fraud_"]);
    let text = std::fs::read_to_string(&tokens).expect("token file");
    assert!(!text.contains(&admin) && !text.contains(&fraud_reader), "the file holds hashes, never tokens");

    let (ok, out, _) = quiver(&["auth", "list", "--file", tokens.to_str().expect("utf-8"), "--json"]);
    assert!(ok);
    let listed: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(listed[1]["name"], "fraud-reader");
    assert_eq!(listed[1]["groups"][0], "fraud_");
    assert!(!out.contains("qvt_"), "list never shows secrets");

    let d = Daemon::start(&tmp.path().join("data"), &["--auth-tokens", tokens.to_str().expect("utf-8")]);

    // No token, a malformed one, an unknown one: UNAUTHENTICATED, on every authenticated service.
    let mut anon = Clients::of(&d).await;
    assert_eq!(code(anon.features.get_online_features(online("user_stats:clicks")).await), Code::Unauthenticated);
    assert_eq!(code(anon.registry.list_feature_groups(pb::ListFeatureGroupsRequest {}).await), Code::Unauthenticated);
    assert_eq!(code(anon.admin.get_stats(pb::GetStatsRequest {}).await), Code::Unauthenticated);
    let flipped = format!("{}{}", &admin[..admin.len() - 1], if admin.ends_with('0') { '1' } else { '0' });
    for bad in ["not-a-token", "qvt_0123", &flipped] {
        let mut c = Clients::with_token(&d, bad).await;
        assert_eq!(
            code(c.registry.list_feature_groups(pb::ListFeatureGroupsRequest {}).await),
            Code::Unauthenticated,
            "{bad}"
        );
    }
    // Health checks and metrics need no token.
    let mut health = tonic_health::pb::health_client::HealthClient::new(d.channel().await);
    let h = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.expect("health");
    assert_eq!(h.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    assert!(d.scrape().contains("quiver_"), "metrics are served without a token");

    let mut ops = Clients::with_token(&d, &admin).await;
    ops.registry.apply_registry(two_groups()).await.expect("apply with the registry scope");
    ops.features.write_features(write("user_stats")).await.expect("write");
    ops.features.write_features(write("fraud_scores")).await.expect("write");
    ops.admin.get_stats(pb::GetStatsRequest {}).await.expect("admin");
    // The ops token has no read scope.
    assert_eq!(code(ops.features.get_online_features(online("user_stats:clicks")).await), Code::PermissionDenied);

    // A reader limited to fraud_: reads those groups only, sees only them, does nothing else.
    let mut reader = Clients::with_token(&d, &fraud_reader).await;
    let got = reader.features.get_online_features(online("fraud_scores:clicks")).await.expect("read fraud_");
    assert_eq!(got.into_inner().columns[0].int64_values, vec![7]);
    assert_eq!(code(reader.features.get_online_features(online("user_stats:clicks")).await), Code::PermissionDenied);
    let mixed = pb::GetOnlineFeaturesRequest {
        features: vec!["fraud_scores:clicks".into(), "user_stats@1:clicks".into()],
        ..online("fraud_scores:clicks")
    };
    assert_eq!(code(reader.features.get_online_features(mixed).await), Code::PermissionDenied);
    assert_eq!(code(reader.features.write_features(write("fraud_scores")).await), Code::PermissionDenied);
    assert_eq!(code(reader.admin.get_stats(pb::GetStatsRequest {}).await), Code::PermissionDenied);
    assert_eq!(code(reader.registry.apply_registry(two_groups()).await), Code::PermissionDenied);
    let listed = reader.registry.list_feature_groups(pb::ListFeatureGroupsRequest {}).await.expect("list");
    let names: Vec<String> = listed.into_inner().feature_groups.into_iter().map(|g| g.name).collect();
    assert_eq!(names, vec!["fraud_scores".to_string()]);
    let hidden = pb::GetFeatureGroupRequest { name: "user_stats".into(), version: 0 };
    assert_eq!(code(reader.registry.get_feature_group(hidden).await), Code::PermissionDenied);
    // Baselines: stored with the admin scope only; a reader sees and measures its groups' only.
    let baseline = |group: &str| quiver_e2e::int64_baseline(group, "clicks", vec![7.0]);
    assert_eq!(code(reader.monitor.put_baseline(baseline("fraud_scores")).await), Code::PermissionDenied);
    ops.monitor.put_baseline(baseline("fraud_scores")).await.expect("admin puts a baseline");
    ops.monitor.put_baseline(baseline("user_stats")).await.expect("admin puts a baseline");
    let listed = reader.monitor.list_baselines(pb::ListBaselinesRequest::default()).await.expect("list");
    let groups: Vec<String> = listed.into_inner().baselines.into_iter().map(|b| b.group).collect();
    assert_eq!(groups, vec!["fraud_scores".to_string()]);
    let drift = |group: &str| pb::MeasureDriftRequest { group: group.into(), ..Default::default() };
    reader.monitor.measure_drift(drift("fraud_scores")).await.expect("measure its group");
    assert_eq!(code(reader.monitor.measure_drift(drift("user_stats")).await), Code::PermissionDenied);
    reader.registry.get_entity_type(pb::GetEntityTypeRequest { name: "user".into() }).await.expect("entity types");
    let spine = pb::GetHistoricalFeaturesRequest {
        entity_type: "user".into(),
        spine: vec![pb::SpineRow { entity: Some(key("u1")), timestamp: quiver_e2e::ts(2_000_000) }],
        features: vec!["user_stats:clicks".into()],
        ..Default::default()
    };
    assert_eq!(code(reader.features.get_historical_features(spine).await), Code::PermissionDenied);

    // A registry token limited to fraud_ may change fraud_ groups, and send the shared entity
    // type only unchanged.
    let mut fraud_reg = Clients::with_token(&d, &fraud_registry).await;
    let mut only_fraud = two_groups();
    only_fraud.feature_groups.remove(0);
    only_fraud.feature_groups[0].description = "scores v2".into();
    fraud_reg.registry.apply_registry(only_fraud.clone()).await.expect("apply fraud_ with the same entity type");
    only_fraud.entity_types[0].description = "changed".into();
    assert_eq!(code(fraud_reg.registry.apply_registry(only_fraud).await), Code::PermissionDenied);
    assert_eq!(code(fraud_reg.registry.apply_registry(two_groups()).await), Code::PermissionDenied);
    // Promotions and rollbacks need the registry scope for the group; the history is a read.
    let promote = |group: &str, version| pb::PromoteGroupRequest { group: group.into(), version, ..Default::default() };
    assert_eq!(code(reader.registry.promote_group(promote("fraud_scores", 2)).await), Code::PermissionDenied);
    assert_eq!(code(fraud_reg.registry.promote_group(promote("user_stats", 1)).await), Code::PermissionDenied);
    let back = |group: &str| pb::RollbackGroupRequest { group: group.into(), reason: String::new() };
    assert_eq!(code(reader.registry.rollback_group(back("fraud_scores")).await), Code::PermissionDenied);
    let p = fraud_reg.registry.promote_group(promote("fraud_scores", 2)).await.expect("promote its group");
    assert_eq!(p.into_inner().promotion.map(|p| p.by), Some("fraud-registry".to_string()), "the token's name is kept");
    let versions = |group: &str| pb::ListGroupVersionsRequest { group: group.into() };
    reader.registry.list_group_versions(versions("fraud_scores")).await.expect("history of its group");
    assert_eq!(code(reader.registry.list_group_versions(versions("user_stats")).await), Code::PermissionDenied);

    // The command line sends --token; without it the server says why it refused.
    let addr = d.addr.clone();
    let get = ["get", "--addr", &addr, "--entity-type", "user", "--entity", "u1", "--feature", "fraud_scores:clicks"];
    let (ok, out, err) = quiver(&[&get[..], &["--token", &fraud_reader]].concat());
    assert!(ok, "{err}");
    assert!(out.contains('7'), "{out}");
    let (ok, _, err) = quiver(&get);
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    let token_file = tmp.path().join("reader.token");
    std::fs::write(&token_file, format!("{fraud_reader}\n")).expect("write");
    let (ok, _, err) = quiver(&[&get[..], &["--token-file", token_file.to_str().expect("utf-8")]].concat());
    assert!(ok, "{err}");

    // Revoked, then SIGHUP: refused from then on; the other tokens keep working.
    let (ok, _, err) = quiver(&["auth", "revoke", "--file", tokens.to_str().expect("utf-8"), "--name", "fraud-reader"]);
    assert!(ok, "{err}");
    let pid = d.pid().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().expect("kill").success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = code(reader.features.get_online_features(online("fraud_scores:clicks")).await);
        if c == Code::Unauthenticated {
            break;
        }
        assert_eq!(c, Code::Ok);
        assert!(Instant::now() < deadline, "a revoked token still works 10 s after SIGHUP");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ops.admin.get_stats(pb::GetStatsRequest {}).await.expect("other tokens still work");
    // A broken file on SIGHUP keeps the tokens in force (and the daemon running).
    std::fs::write(&tokens, "[[token]]\nname = 7\n").expect("write");
    assert!(Command::new("kill").args(["-HUP", &pid]).status().expect("kill").success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    ops.admin.get_stats(pb::GetStatsRequest {}).await.expect("tokens in force survive a bad reload");
    assert!(d.stop(), "clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_tokens_pull_only_their_own_region() {
    let tmp = tempfile::tempdir().expect("tmp");
    let tokens = tmp.path().join("tokens.toml");
    let region2 = create_token(&tokens, "region-2", &["--scope", "replication", "--region", "2"]);
    let region3 = create_token(&tokens, "region-3", &["--scope", "replication", "--region", "3"]);
    let admin = create_token(&tokens, "ops", &["--scope", "admin"]);
    let (ok, _, err) =
        quiver(&["auth", "create", "--file", tokens.to_str().expect("utf-8"), "--name", "x", "--scope", "replication"]);
    assert!(!ok && err.contains("needs the region"), "{err}");
    // Region 1 with peers 2 and 3 (not running: only their pulls from region 1 matter here).
    let d = Daemon::start(
        &tmp.path().join("data"),
        &[
            "--auth-tokens",
            tokens.to_str().expect("utf-8"),
            "--region",
            "1",
            "--peer",
            "2=127.0.0.1:9",
            "--peer",
            "3=127.0.0.1:9",
        ],
    );
    let pull = |region| pb::PullRequest { region, after: 0, window_ms: 1, ..Default::default() };
    let client = |token: &str| {
        let token = Token::new(token);
        let d = &d;
        async move { pb::replication_service_client::ReplicationServiceClient::with_interceptor(d.channel().await, token) }
    };
    let mut as2 = client(&region2).await;
    let mut stream = as2.pull(pull(2)).await.expect("region 2 pulls its own stream").into_inner();
    while stream.message().await.expect("message").is_some() {}
    assert_eq!(code(as2.pull(pull(3)).await), Code::PermissionDenied, "region 2's token cannot pull as region 3");
    let snap = pb::SnapshotRequest { region: 3, ..Default::default() };
    assert_eq!(code(as2.snapshot(snap).await), Code::PermissionDenied);
    let mut as3 = client(&region3).await;
    as3.pull(pull(3)).await.expect("region 3 pulls its own stream");
    let mut ops = client(&admin).await;
    assert_eq!(code(ops.pull(pull(2)).await), Code::PermissionDenied, "admin is not replication");
    let mut anon = pb::replication_service_client::ReplicationServiceClient::new(d.channel().await);
    assert_eq!(code(anon.pull(pull(2)).await), Code::Unauthenticated);
    drop(d);
}

#[test]
fn a_network_address_without_authentication_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = Command::new(quiver_e2e::quiverd_path())
        .args(["--data-dir", tmp.path().to_str().expect("utf-8"), "--listen", "0.0.0.0:0", "--metrics-listen", "off"])
        .output()
        .expect("run quiverd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without authentication") && err.contains("--auth none"), "{err}");
    let out = Command::new(quiver_e2e::quiverd_path())
        .args(["--data-dir", tmp.path().to_str().expect("utf-8"), "--auth", "tokens"])
        .output()
        .expect("run quiverd");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a token file"));
    assert!(!tmp.path().join("CURRENT").exists(), "a refused start creates nothing");
}

/// The test CA (`quiver_testkit::pki`), with certificates written as path strings.
struct Pki(quiver_testkit::pki::Pki);

impl Pki {
    fn new(name: &str) -> Pki {
        Pki(quiver_testkit::pki::Pki::new(name).expect("test CA"))
    }

    /// A certificate for 127.0.0.1, naming `region` if given: (cert PEM, key PEM).
    fn leaf(&self, region: Option<u32>) -> (String, String) {
        self.0.leaf(region, &[]).expect("certificate")
    }

    fn write(&self, dir: &Path, name: &str, region: Option<u32>) -> (String, String) {
        let f = self.0.write(dir, name, region, &[]).expect("write certificate");
        (f.cert.to_str().expect("utf-8").to_string(), f.key.to_str().expect("utf-8").to_string())
    }
}

/// A TLS channel to `d` trusting `ca`, presenting `identity` if given.
async fn tls_channel(
    d: &Daemon,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let mut tls = tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca));
    if let Some((cert, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    tonic::transport::Channel::from_shared(d.addr.replace("http://", "https://"))
        .expect("uri")
        .tls_config(tls)?
        .connect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_for_clients_and_mutual_tls_between_regions() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let pki = Pki::new("quiver test CA");
    let ca_pem = pki.0.ca_pem();
    let ca_file = dir.join("ca.crt");
    std::fs::write(&ca_file, &ca_pem).expect("write");
    let ca = ca_file.to_str().expect("utf-8");
    let (c1, k1) = pki.write(dir, "r1", Some(1));
    let (c2, k2) = pki.write(dir, "r2", Some(2));
    // Each region's token file: one token for the test's client (no peer tokens: the peers'
    // certificates name their regions).
    let (t1, t2) = (dir.join("t1.toml"), dir.join("t2.toml"));
    let scopes = ["--scope", "read", "--scope", "write", "--scope", "registry", "--scope", "admin"];
    let user1 = create_token(&t1, "user", &scopes);
    let user2 = create_token(&t2, "user", &scopes);

    let (p1, p2) = (quiver_e2e::free_port(), quiver_e2e::free_port());
    let (a1, a2) = (format!("127.0.0.1:{p1}"), format!("127.0.0.1:{p2}"));
    let start = |data: &str, listen: &str, cert: &str, key: &str, tokens: &Path, region: &str, peers: &[String]| {
        let mut args = vec![
            "--tls-cert".to_string(),
            cert.into(),
            "--tls-key".into(),
            key.into(),
            "--tls-ca".into(),
            ca.into(),
            "--auth-tokens".into(),
            tokens.to_str().expect("utf-8").into(),
            "--region".into(),
            region.into(),
        ];
        for p in peers {
            args.extend(["--peer".to_string(), p.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start_at(&dir.join(data), listen, &args)
    };
    // Region 1's peers: 2 (running) and 3 (never started: only who may pull as it matters).
    let r1 = start("d1", &a1, &c1, &k1, &t1, "1", &[format!("2={a2}"), "3=127.0.0.1:9".to_string()]);
    let r2 = start("d2", &a2, &c2, &k2, &t2, "2", &[format!("1={a1}")]);

    // Clients over TLS with a token: written in region 1, replicated to region 2 over mutual TLS.
    let mut u1 = Clients::over(tls_channel(&r1, &ca_pem, None).await.expect("TLS to r1"), Token::new(&user1));
    let mut u2 = Clients::over(tls_channel(&r2, &ca_pem, None).await.expect("TLS to r2"), Token::new(&user2));
    u1.registry.apply_registry(two_groups()).await.expect("apply");
    u1.features.write_features(write("user_stats")).await.expect("write");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = u2.features.get_online_features(online("user_stats:clicks")).await {
            if r.into_inner().columns[0].int64_values == vec![7] {
                break;
            }
        }
        assert!(Instant::now() < deadline, "region 2 never received region 1's write over mutual TLS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Region 1 pulls from region 2 over mutual TLS too. Region 2 started after region 1, so
    // region 1's first attempts may have been refused: wait for a retry to catch up.
    loop {
        let status = u1.admin.get_replication_status(pb::GetReplicationStatusRequest {}).await.expect("status");
        let peer2 = status.into_inner().peers.into_iter().find(|p| p.region == 2).expect("peer 2");
        if peer2.caught_up && peer2.last_contact_us > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "region 1 never caught up with region 2 over mutual TLS: {peer2:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Plaintext to a TLS port fails; so does a certificate from another CA.
    let mut plain = Clients::over(r1.channel_lazy(), Token::new(&user1));
    assert_ne!(code(plain.admin.get_stats(pb::GetStatsRequest {}).await), Code::Ok);
    let rogue = Pki::new("rogue CA").leaf(Some(2));
    match tls_channel(&r1, &ca_pem, Some(&rogue)).await {
        Err(_) => {}
        Ok(ch) => {
            let mut c = pb::replication_service_client::ReplicationServiceClient::new(ch);
            assert_ne!(
                code(c.pull(pb::PullRequest { region: 2, after: 0, window_ms: 1, ..Default::default() }).await),
                Code::Ok
            );
        }
    }

    // A client with region 2's certificate and no token: replicates as region 2 only.
    let as2 = pki.leaf(Some(2));
    let ch = tls_channel(&r1, &ca_pem, Some(&as2)).await.expect("mutual TLS");
    let mut repl = pb::replication_service_client::ReplicationServiceClient::new(ch.clone());
    let mut s = repl
        .pull(pb::PullRequest { region: 2, after: 0, window_ms: 1, ..Default::default() })
        .await
        .expect("own stream")
        .into_inner();
    while s.message().await.expect("message").is_some() {}
    assert_eq!(
        code(repl.pull(pb::PullRequest { region: 3, after: 0, window_ms: 1, ..Default::default() }).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(repl.snapshot(pb::SnapshotRequest { region: 3, ..Default::default() }).await),
        Code::PermissionDenied
    );
    let mut admin = pb::admin_service_client::AdminServiceClient::new(ch);
    assert_eq!(code(admin.get_stats(pb::GetStatsRequest {}).await), Code::PermissionDenied, "a peer is not an admin");
    // A certificate without a region identifies nobody: it needs a token.
    let nobody = pki.leaf(None);
    let ch = tls_channel(&r1, &ca_pem, Some(&nobody)).await.expect("TLS");
    let mut repl = pb::replication_service_client::ReplicationServiceClient::new(ch);
    assert_eq!(
        code(repl.pull(pb::PullRequest { region: 2, after: 0, window_ms: 1, ..Default::default() }).await),
        Code::Unauthenticated
    );

    // The command line over TLS.
    let https = r1.addr.replace("http://", "https://");
    let get = ["get", "--addr", &https, "--entity-type", "user", "--entity", "u1", "--feature", "user_stats:clicks"];
    let (ok, out, err) = quiver(&[&get[..], &["--ca-cert", ca, "--token", &user1]].concat());
    assert!(ok && out.contains('7'), "{out} {err}");
    let (ok, _, err) = quiver(&[&get[..], &["--token", &user1]].concat());
    assert!(!ok && err.contains("--ca-cert"), "{err}");
    assert!(r1.stop() && r2.stop(), "clean stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_stay_under_the_checkpoint_root() {
    let tmp = tempfile::tempdir().expect("tmp");
    let base = std::fs::canonicalize(tmp.path()).expect("canonical");
    let d = Daemon::start(&base.join("plain"), &[]);
    let mut c = Clients::of(&d).await;
    let req = |p: &str| pb::CheckpointRequest { path: p.to_string() };
    assert_eq!(code(c.admin.checkpoint(req("x")).await), Code::FailedPrecondition, "no root: no checkpoints");
    drop(d);

    let root = base.join("ck");
    let outside = base.join("outside");
    std::fs::create_dir_all(&outside).expect("mkdir");
    let d = Daemon::start(&base.join("data"), &["--checkpoint-root", root.to_str().expect("utf-8")]);
    let mut c = Clients::of(&d).await;
    c.registry.apply_registry(two_groups()).await.expect("apply");
    c.features.write_features(write("user_stats")).await.expect("write");
    std::os::unix::fs::symlink(&outside, root.join("link")).expect("symlink");
    let data = base.join("data").to_string_lossy().into_owned();
    let outside_abs = outside.join("x").to_string_lossy().into_owned();
    for bad in ["", "../outside/x", "daily/../../outside", "link/x", &outside_abs, &data] {
        assert_eq!(code(c.admin.checkpoint(req(bad)).await), Code::InvalidArgument, "{bad:?}");
    }
    assert_eq!(std::fs::read_dir(&outside).expect("dir").count(), 0, "nothing was written outside the root");
    c.admin.checkpoint(req("daily/2026-11-26")).await.expect("checkpoint under the root");
    let (ok, out, err) = quiver(&["verify", root.join("daily/2026-11-26").to_str().expect("utf-8")]);
    assert!(ok, "the checkpoint verifies: {out} {err}");
    assert_eq!(code(c.admin.checkpoint(req("daily/2026-11-26")).await), Code::InvalidArgument, "not empty");
    let (ok, _, err) = quiver(&["admin", "--addr", &d.addr, "checkpoint", "../x"]);
    assert!(!ok && err.contains("InvalidArgument") && err.contains(".."), "{err}");
    assert!(d.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_have_request_and_value_rate_limits() {
    use tonic_types::StatusExt;
    let tmp = tempfile::tempdir().expect("tmp");
    let tokens = tmp.path().join("tokens.toml");
    let ops = create_token(&tokens, "ops", &["--scope", "registry", "--scope", "write"]);
    // One call per second; one value per second (a bigger call runs once, then owes the rest).
    let slow = create_token(&tokens, "slow", &["--scope", "read", "--requests-per-second", "1"]);
    let frugal = create_token(&tokens, "frugal", &["--scope", "read", "--values-per-second", "1"]);
    let (ok, _, err) = quiver(&[
        "auth",
        "create",
        "--file",
        tokens.to_str().expect("utf-8"),
        "--name",
        "zero",
        "--scope",
        "read",
        "--values-per-second",
        "0",
    ]);
    assert!(!ok && err.contains("values_per_second is 1 to"), "{err}");
    let (ok, out, _) = quiver(&["auth", "list", "--file", tokens.to_str().expect("utf-8"), "--json"]);
    assert!(ok);
    let listed: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(listed[1]["requests_per_second"], 1);
    assert_eq!(listed[2]["values_per_second"], 1);

    let d = Daemon::start(&tmp.path().join("data"), &["--auth-tokens", tokens.to_str().expect("utf-8")]);
    let mut o = Clients::with_token(&d, &ops).await;
    o.registry.apply_registry(two_groups()).await.expect("apply");
    o.features.write_features(write("user_stats")).await.expect("write");

    // Requests: a burst of ten admits about one per elapsed second; the rest are
    // RESOURCE_EXHAUSTED with retry advice.
    let mut c = Clients::with_token(&d, &slow).await;
    let started = Instant::now();
    let mut admitted = 0;
    let mut refused = None;
    for _ in 0..10 {
        match c.features.get_online_features(online("user_stats:clicks")).await {
            Ok(_) => admitted += 1,
            Err(s) => refused = Some(s),
        }
    }
    let bound = 1 + started.elapsed().as_secs() + 1;
    assert!(admitted >= 1 && admitted <= bound, "{admitted} admitted, at most {bound} expected");
    let s = refused.expect("some calls refused");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("\"slow\"") && s.message().contains("1 requests per second"), "{s:?}");
    let wait = s.get_details_retry_info().and_then(|r| r.retry_delay).expect("retry advice");
    assert!(wait <= Duration::from_secs(1), "{wait:?}");

    // Values: 300 cells run once (the bucket was full), then the token owes 299 s of values.
    let mut f = Clients::with_token(&d, &frugal).await;
    let big = pb::GetOnlineFeaturesRequest {
        entities: (0..300).map(|i| key(&format!("u{i}"))).collect(),
        ..online("user_stats:clicks")
    };
    f.features.get_online_features(big).await.expect("the first call runs");
    let s = f.features.get_online_features(online("user_stats:clicks")).await.expect_err("in debt");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    let wait = s.get_details_retry_info().and_then(|r| r.retry_delay).expect("retry advice");
    assert!(wait > Duration::from_secs(250), "{wait:?}");
    // A SIGHUP that leaves the token's limits alone keeps its debt.
    let pid = d.pid().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().expect("kill").success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = f.features.get_online_features(online("user_stats:clicks")).await;
    assert_eq!(code(again), Code::ResourceExhausted, "the debt survives a reload");
    // Other tokens are not affected.
    o.features.write_features(write("user_stats")).await.expect("ops is unlimited");
    let limited = d.metric("quiver_requests_rate_limited_total");
    assert!(limited >= 3, "{limited}");
    assert!(d.stop());
}
