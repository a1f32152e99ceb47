//! End to end over gRPC against a real quiverd: registry, online statuses, writes with
//! idempotency and compare-and-swap, bad input (codes, messages, nothing changed), restarts.

use prost::Message;
use quiver_e2e::{clicks_row, example_registry, int, key, ts, Clients, Daemon};
use quiver_proto::v1 as pb;
use tonic::Code;

const HOUR_US: i64 = 3_600_000_000;
const T0: i64 = 1_767_225_600_000_000;

fn row(user: &str, at: i64, clicks: i64) -> pb::WriteRow {
    clicks_row(user, at, clicks)
}

fn online_req(users: &[&str], as_of: i64) -> pb::GetOnlineFeaturesRequest {
    pb::GetOnlineFeaturesRequest {
        entity_type: "user".into(),
        entities: users.iter().map(|u| key(u)).collect(),
        features: vec!["user_stats:clicks".into(), "user_stats:spend".into()],
        as_of: ts(as_of),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_online_writes_and_restart() {
    use pb::FeatureStatus::*;
    let tmp = tempfile::tempdir().expect("tmp");
    let d = Daemon::start(tmp.path(), &[]);
    let mut c = Clients::of(&d).await;

    // Registry: create, then the same apply is a no-op.
    let changes = c.registry.apply_registry(example_registry()).await.expect("apply").into_inner().changes;
    assert!(changes.iter().all(|c| c.kind() == pb::registry_change::Kind::Created));
    let again = c.registry.apply_registry(example_registry()).await.expect("re-apply").into_inner().changes;
    assert!(again.iter().all(|c| c.kind() == pb::registry_change::Kind::Unchanged));

    // Writes and online statuses.
    let w = c
        .features
        .write_features(pb::WriteFeaturesRequest {
            rows: vec![row("alice", T0, 5), row("bob", T0 - 3 * HOUR_US, 9)],
            ..Default::default()
        })
        .await
        .expect("write")
        .into_inner();
    assert_eq!(w.values_written, 2);
    let r = c
        .features
        .get_online_features(online_req(&["alice", "bob", "carol"], T0 + 1))
        .await
        .expect("online")
        .into_inner();
    assert_eq!(r.columns[0].statuses, vec![Present as i32, Stale as i32, NotFound as i32]);
    assert_eq!(r.columns[0].int64_values, vec![5, 0, 0]);
    assert_eq!(r.columns[1].statuses, vec![Defaulted as i32; 3]);

    // Idempotent retry.
    let req = pb::WriteFeaturesRequest {
        rows: vec![row("dave", T0, 1)],
        idempotency_key: "batch-1".into(),
        ..Default::default()
    };
    let first = c.features.write_features(req.clone()).await.expect("first").into_inner();
    let retry = c.features.write_features(req).await.expect("retry").into_inner();
    assert!(retry.deduplicated && !first.deduplicated && retry.system_time == first.system_time);

    // Compare-and-swap conflict: ABORTED with the current version in the details.
    let mut cas = row("alice", T0, 6);
    cas.expected_versions.insert("clicks".into(), pb::VersionVector::default());
    let err = c
        .features
        .write_features(pb::WriteFeaturesRequest { rows: vec![cas], ..Default::default() })
        .await
        .expect_err("cas");
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    let conflict = pb::CasConflict::decode(err.details()).expect("details");
    assert_eq!(conflict.cells.len(), 1);
    let current = conflict.cells[0].current.clone().expect("current");
    // The same conflict in a write stream keeps its details, and says which message failed.
    let mut stale = row("alice", T0, 6);
    stale.expected_versions.insert("clicks".into(), pb::VersionVector::default());
    let msg = pb::WriteFeaturesRequest { rows: vec![stale], ..Default::default() };
    let err = c.features.write_features_stream(tokio_stream::iter(vec![msg])).await.expect_err("cas in a stream");
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(err.message().starts_with("stream message 0"), "{}", err.message());
    let in_stream = pb::CasConflict::decode(err.details()).expect("details survive the stream");
    assert_eq!(in_stream.cells[0].current.as_ref(), Some(&current));
    let mut cas = row("alice", T0, 6);
    cas.expected_versions.insert("clicks".into(), current);
    c.features
        .write_features(pb::WriteFeaturesRequest { rows: vec![cas], ..Default::default() })
        .await
        .expect("cas with current version");

    // Graceful restart keeps everything acknowledged.
    drop(c);
    assert!(d.stop(), "quiverd exits cleanly on SIGTERM");
    let d = Daemon::start(tmp.path(), &[]);
    let mut c = Clients::of(&d).await;
    let r = c.features.get_online_features(online_req(&["alice", "dave"], T0 + 1)).await.expect("online").into_inner();
    assert_eq!(r.columns[0].int64_values, vec![6, 1]);

    // SIGKILL right after an acknowledged (sync) write: still there after restart.
    c.features
        .write_features(pb::WriteFeaturesRequest { rows: vec![row("erin", T0, 42)], ..Default::default() })
        .await
        .expect("write");
    drop(c);
    d.kill();
    // A start quiverd refuses (before it touches the directory): its stderr.
    let refused = |flags: &[&str]| {
        let bad = std::process::Command::new(quiver_e2e::quiverd_path())
            .args(["--data-dir"])
            .arg(tmp.path())
            .args(["--listen", "127.0.0.1:0"])
            .args(flags)
            .output()
            .expect("run quiverd");
        assert!(!bad.status.success(), "{flags:?}");
        String::from_utf8_lossy(&bad.stderr).into_owned()
    };
    // A backend name quiverd does not know is refused.
    let err = refused(&["--io-backend", "mmap"]);
    assert!(err.contains("unknown I/O backend \"mmap\""), "{err}");
    // So is a table compression level zstd does not have.
    let err = refused(&["--table-compression", "zstd:30"]);
    assert!(err.contains("table compression \"zstd:30\": zstd level 30 is outside -7 to 22"), "{err}");
    // Restart with the pread backend and zstd for new tables: the same data, read the other
    // way, and the LZ4 tables written so far rewritten as zstd by a full compaction.
    let d = Daemon::start(tmp.path(), &["--io-backend", "pread", "--table-compression", "zstd:3"]);
    let mut c = Clients::of(&d).await;
    let r = c.features.get_online_features(online_req(&["erin"], T0 + 1)).await.expect("online").into_inner();
    assert_eq!(r.columns[0].int64_values, vec![42]);
    c.admin.compact(pb::CompactRequest { full: true, ..Default::default() }).await.expect("compact");
    let r = c
        .features
        .get_online_features(online_req(&["alice", "dave", "erin"], T0 + 1))
        .await
        .expect("online")
        .into_inner();
    assert_eq!(r.columns[0].int64_values, vec![6, 1, 42]);
    c.admin.verify(pb::VerifyRequest {}).await.expect("verify");
    let stats = c.admin.get_stats(pb::GetStatsRequest {}).await.expect("stats").into_inner();
    assert_eq!(stats.io_backend, "pread");
    // The second miss of a pair fills the hot tier (the first is only remembered); the same
    // lookup then hits it.
    for _ in 0..2 {
        let r = c.features.get_online_features(online_req(&["erin"], T0 + 1)).await.expect("online").into_inner();
        assert_eq!(r.columns[0].int64_values, vec![42]);
    }
    let stats = c.admin.get_stats(pb::GetStatsRequest {}).await.expect("stats").into_inner();
    assert!(stats.last_sequence > 0);
    assert!(stats.hot_tier_fills > 0 && stats.hot_tier_hits > 0 && stats.hot_tier_entries > 0, "{stats:?}");
    c.admin.verify(pb::VerifyRequest {}).await.expect("verify");
    // Prometheus metrics: per-method counts and latency, values written, engine figures.
    c.features
        .write_features(pb::WriteFeaturesRequest { rows: vec![row("frank", T0, 1)], ..Default::default() })
        .await
        .expect("write");
    let page = d.scrape();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    for needle in [
        "quiver_grpc_requests_total{code=\"Ok\",method=\"GetOnlineFeatures\"} 4",
        "quiver_grpc_requests_total{code=\"Ok\",method=\"WriteFeatures\"} 1",
        "quiver_grpc_request_seconds_bucket{method=\"Verify\"",
        "quiver_values_written_total 1",
        "quiver_engine_wal_syncs",
        "quiver_engine_hot_tier_hits",
    ] {
        assert!(page.contains(needle), "{needle} missing from metrics:\n{page}");
    }
    assert!(d.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_specific_codes_and_changes_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = Daemon::start(tmp.path(), &[]);
    let mut c = Clients::of(&d).await;
    c.registry.apply_registry(example_registry()).await.expect("apply");
    let before = c.admin.get_stats(pb::GetStatsRequest {}).await.expect("stats").into_inner().last_sequence;

    let write = |rows: Vec<pb::WriteRow>| pb::WriteFeaturesRequest { rows, ..Default::default() };
    let mut wrong_type = row("alice", T0, 1);
    wrong_type.values.insert("clicks".into(), pb::Value { kind: Some(pb::value::Kind::StringValue("x".into())) });
    let mut unknown_feature = row("alice", T0, 1);
    unknown_feature.values.insert("nope".into(), int(1));
    let mut unknown_group = row("alice", T0, 1);
    unknown_group.group = "nope".into();
    let mut bad_time = row("alice", T0, 1);
    bad_time.event_time = Some(prost_types::Timestamp { seconds: 1, nanos: 5 });
    // Year 10000 and year 0: outside protobuf's timestamp range.
    let mut after_9999 = row("alice", T0, 1);
    after_9999.event_time = Some(prost_types::Timestamp { seconds: 253_402_300_800, nanos: 0 });
    let mut before_0001 = row("alice", T0, 1);
    before_0001.event_time = Some(prost_types::Timestamp { seconds: -62_135_596_801, nanos: 0 });
    let cases = vec![
        (write(vec![]), Code::InvalidArgument, "no rows"),
        (write(vec![wrong_type]), Code::InvalidArgument, "expected a Int64"),
        (write(vec![unknown_feature]), Code::NotFound, "no feature"),
        (write(vec![unknown_group]), Code::NotFound, "no feature group"),
        (write(vec![bad_time]), Code::InvalidArgument, "microseconds"),
        (write(vec![after_9999]), Code::InvalidArgument, "9999-12-31"),
        (write(vec![before_0001]), Code::InvalidArgument, "0001-01-01"),
        (write(vec![row("alice", T0, 1); 10_001]), Code::ResourceExhausted, "limit"),
    ];
    for (req, code, needle) in cases {
        let err = c.features.write_features(req).await.expect_err(needle);
        assert_eq!(err.code(), code, "{needle}: {err:?}");
        assert!(err.message().contains(needle), "{needle} not in {:?}", err.message());
    }
    let err = c
        .registry
        .apply_registry(pb::ApplyRegistryRequest {
            feature_groups: vec![pb::FeatureGroup {
                entity_type: "ghost".into(),
                ..example_registry().feature_groups[0].clone()
            }],
            ..Default::default()
        })
        .await
        .expect_err("unknown entity type");
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut online = online_req(&["alice"], T0);
    online.features = vec!["user_stats:nope".into()];
    assert_eq!(c.features.get_online_features(online).await.expect_err("unknown").code(), Code::NotFound);
    let after = c.admin.get_stats(pb::GetStatsRequest {}).await.expect("stats").into_inner().last_sequence;
    assert_eq!(before, after, "rejected requests wrote nothing");

    // Standard health checking is on.
    let mut health = tonic_health::pb::health_client::HealthClient::new(d.channel().await);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest { service: "quiver.v1.FeatureService".into() })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(h.status(), tonic_health::pb::health_check_response::ServingStatus::Serving);
    assert!(d.stop());
}

/// Sends `bytes` as the request message of `method`, bypassing the client's encoder.
async fn raw_call(channel: tonic::transport::Channel, method: &'static str, bytes: Vec<u8>) -> tonic::Status {
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

    #[derive(Default)]
    struct Raw;
    struct RawEnc;
    struct RawDec;
    impl Encoder for RawEnc {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
            use bytes::BufMut;
            buf.put_slice(&item);
            Ok(())
        }
    }
    impl Decoder for RawDec {
        type Item = ();
        type Error = tonic::Status;
        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
            use bytes::Buf;
            buf.advance(buf.remaining());
            Ok(Some(()))
        }
    }
    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = ();
        type Encoder = RawEnc;
        type Decoder = RawDec;
        fn encoder(&mut self) -> RawEnc {
            RawEnc
        }
        fn decoder(&mut self) -> RawDec {
            RawDec
        }
    }
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    grpc.unary(tonic::Request::new(bytes), path, Raw).await.expect_err("the server refuses the bytes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_by_the_book() {
    let tmp = tempfile::tempdir().expect("tmp");
    // 64 MiB of memory: requests may hold 8 MiB.
    let d = Daemon::start(tmp.path(), &["--memory-budget-mb", "64"]);
    let mut c = Clients::of(&d).await;
    c.registry.apply_registry(example_registry()).await.expect("apply");
    let before = c.admin.get_stats(pb::GetStatsRequest {}).await.expect("stats").into_inner().last_sequence;

    // Malformed protobuf: field 1 (rows) claims 127 bytes and 1 follows.
    let s = raw_call(d.channel().await, "/quiver.v1.FeatureService/WriteFeatures", vec![0x0a, 0x7f, 0x01]).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("malformed WriteFeaturesRequest"), "{s:?}");
    let s = raw_call(d.channel().await, "/quiver.v1.RegistryService/ApplyRegistry", vec![0xff; 9]).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");

    // A message over the server's memory for requests: RESOURCE_EXHAUSTED before it is buffered.
    let s = raw_call(d.channel().await, "/quiver.v1.FeatureService/WriteFeatures", vec![0; 9 << 20]).await;
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("memory for requests"), "{s:?}");

    // An unknown enum value, and a CAS vector naming a region that cannot exist.
    let durability_99 =
        pb::WriteFeaturesRequest { rows: vec![row("alice", T0, 1)], durability: 99, ..Default::default() };
    let mut region_64 = row("alice", T0, 1);
    region_64.expected_versions.insert(
        "clicks".into(),
        pb::VersionVector { entries: vec![pb::version_vector::Entry { region: 64, counter: 1 }] },
    );
    for (req, needle) in [
        (durability_99, "durability 99"),
        (pb::WriteFeaturesRequest { rows: vec![region_64], ..Default::default() }, "region 64"),
    ] {
        let e = c.features.write_features(req).await.expect_err(needle);
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(needle), "{needle} not in {e:?}");
    }

    // A non-normalised Duration.
    let mut group = example_registry().feature_groups[0].clone();
    group.ttl = Some(prost_types::Duration { seconds: 1, nanos: 1_000_000_000 });
    let e = c
        .registry
        .apply_registry(pb::ApplyRegistryRequest { feature_groups: vec![group], ..Default::default() })
        .await
        .expect_err("nanos of a second");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("normalised"), "{e:?}");
    let after = c.admin.get_stats(pb::GetStatsRequest {}).await.expect("stats").into_inner().last_sequence;
    assert_eq!(after, before, "refused requests wrote nothing");

    // An idempotency key reused for a different request is refused, naming the key; the same
    // request retried (its map encoded in another order) is answered with the first result.
    let mut two = row("erin", T0, 1);
    two.values.insert("spend".into(), pb::Value { kind: Some(pb::value::Kind::Float64Value(2.5)) });
    let req = pb::WriteFeaturesRequest { rows: vec![two], idempotency_key: "order-17".into(), ..Default::default() };
    let first = c.features.write_features(req.clone()).await.expect("first").into_inner();
    let retry = c.features.write_features(req.clone()).await.expect("retry").into_inner();
    assert!(retry.deduplicated && retry.values_written == first.values_written && first.values_written == 2);
    let mut other = req.clone();
    other.rows[0].values.insert("clicks".into(), int(2));
    let e = c.features.write_features(other).await.expect_err("same key, other body");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("\"order-17\""), "{e:?}");
    // Deletes and maps in another order are the same request.
    let mut gone = row("gina", T0, 1);
    gone.values.clear();
    gone.deletes = vec!["clicks".into(), "spend".into()];
    let del = pb::WriteFeaturesRequest { rows: vec![gone], idempotency_key: "order-18".into(), ..Default::default() };
    c.features.write_features(del.clone()).await.expect("deletes");
    let mut reordered = del.clone();
    reordered.rows[0].deletes.reverse();
    assert!(c.features.write_features(reordered).await.expect("same request").into_inner().deduplicated);
    let mut sync = req.clone();
    sync.durability = pb::Durability::Async as i32;
    let e = c.features.write_features(sync).await.expect_err("same key, other durability");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // values_written counts stored versions: a cell written twice in one request is one.
    let mut delete_too = row("frank", T0, 3);
    delete_too.deletes.push("clicks".into());
    let w = c
        .features
        .write_features(pb::WriteFeaturesRequest {
            rows: vec![row("frank", T0, 1), row("frank", T0, 2), delete_too, row("frank", T0 + 1, 4)],
            ..Default::default()
        })
        .await
        .expect("write")
        .into_inner();
    assert_eq!(w.values_written, 2, "one cell at T0 and one at T0 + 1");
    let r = c.features.get_online_features(online_req(&["frank"], T0)).await.expect("online").into_inner();
    assert_eq!(r.columns[0].statuses, vec![pb::FeatureStatus::NotFound as i32], "the last write of the cell wins");
    assert!(d.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_has_at_most_group_versions_max_versions() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = Daemon::start(tmp.path(), &[]);
    let mut c = Clients::of(&d).await;
    c.registry.apply_registry(example_registry()).await.expect("apply");
    let apply = |n: u32| {
        let mut g = example_registry().feature_groups[0].clone();
        g.description = format!("edit {n}");
        pb::ApplyRegistryRequest { feature_groups: vec![g], promote: true, ..Default::default() }
    };
    // Version 1 exists; every changed apply makes one more, up to 1,000.
    for n in 2..=1000 {
        c.registry.apply_registry(apply(n)).await.expect("within the limit");
    }
    let e = c.registry.apply_registry(apply(1001)).await.expect_err("version 1,001");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("1000 versions"), "{e:?}");
    let g = c
        .registry
        .get_feature_group(pb::GetFeatureGroupRequest { name: "user_stats".into(), version: 0 })
        .await
        .expect("group")
        .into_inner();
    assert_eq!(g.version, 1000, "the refused apply changed nothing");
    assert!(d.stop());
}
