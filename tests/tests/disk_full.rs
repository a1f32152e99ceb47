//! A real quiverd on a real full disk (a small tmpfs this test mounts; it needs root, as the
//! jepsen namespaces do): writes are refused with RESOURCE_EXHAUSTED naming the disk, reads
//! keep working, the `quiver.v1.Writes` health check says NOT_SERVING, and writes resume by
//! themselves once space is freed. A restart on a full disk opens read-only instead of
//! refusing to start. No acknowledged write is lost.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use quiver_e2e::{example_registry, key, ts, Clients, Daemon};
use quiver_proto::v1 as pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const T0: i64 = 1_767_225_600_000_000;
/// The tmpfs: big enough for an engine, small enough to fill in a second.
const DISK_BYTES: u64 = 24 << 20;
const VALUE_BYTES: usize = 16 << 10;

/// A tmpfs mounted for the test's lifetime.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts one, or says why it cannot (not root: mounting needs it; the engine's disk-full
    /// behaviour is still tested without root in `storage/tests/disk_full.rs`).
    fn mount(at: &Path) -> Option<Tmpfs> {
        let uid = Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        if uid.as_deref().ok() != Some("0") {
            eprintln!("SKIPPED: mounting a tmpfs needs root; run as root to test a real full disk");
            return None;
        }
        std::fs::create_dir_all(at).expect("mount point");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={DISK_BYTES}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("run mount")
            .success();
        assert!(ok, "mounting a tmpfs at {} failed", at.display());
        Some(Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes a file until the disk is full; returns its path.
fn fill(path: &Path) -> PathBuf {
    let mut f = std::fs::File::create(path).expect("filler");
    let chunk = vec![0xa5u8; 64 << 10];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    path.to_path_buf()
}

/// A pseudo-random value (so compression cannot make room).
fn blob(i: u64) -> pb::Value {
    let mut rng = quiver_testkit::Rng::new(i);
    let bytes = (0..VALUE_BYTES).map(|_| rng.next_u64() as u8).collect();
    pb::Value { kind: Some(pb::value::Kind::BytesValue(bytes)) }
}

fn registry() -> pb::ApplyRegistryRequest {
    let mut req = example_registry();
    req.feature_groups.push(pb::FeatureGroup {
        name: "blobs".into(),
        entity_type: "user".into(),
        features: vec![pb::FeatureDef {
            name: "payload".into(),
            r#type: pb::ValueType::Bytes as i32,
            default_value: None,
            description: String::new(),
            ..Default::default()
        }],
        ..Default::default()
    });
    req
}

fn write(i: u64) -> pb::WriteFeaturesRequest {
    pb::WriteFeaturesRequest {
        rows: vec![pb::WriteRow {
            entity: Some(key(&format!("u{}", i % 50))),
            group: "blobs".into(),
            event_time: ts(T0 + i as i64),
            values: [("payload".to_string(), blob(i))].into_iter().collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Each entity's newest acknowledged write must be what an online read serves.
async fn check(c: &mut Clients, acked: &BTreeMap<u64, u64>, what: &str) {
    let entities: Vec<u64> = acked.keys().copied().collect();
    // A few at a time: a 16 MiB server answers at most 512 KiB at once.
    for chunk in entities.chunks(10) {
        let req = pb::GetOnlineFeaturesRequest {
            entity_type: "user".into(),
            entities: chunk.iter().map(|e| key(&format!("u{e}"))).collect(),
            features: vec!["blobs:payload".into()],
            as_of: ts(T0 + 1_000_000),
            ..Default::default()
        };
        let r = c.features.get_online_features(req).await.unwrap_or_else(|e| panic!("{what}: read: {e}")).into_inner();
        let col = &r.columns[0];
        for (n, e) in chunk.iter().enumerate() {
            let Some(pb::value::Kind::BytesValue(want)) = blob(acked[e]).kind else { unreachable!() };
            assert_eq!(col.statuses[n], pb::FeatureStatus::Present as i32, "{what}: u{e}");
            assert_eq!(col.bytes_values[n], want, "{what}: u{e} holds another write than {}", acked[e]);
        }
    }
}

async fn writes_health(d: &Daemon) -> ServingStatus {
    let mut h = tonic_health::pb::health_client::HealthClient::new(d.channel().await);
    let r = h
        .check(tonic_health::pb::HealthCheckRequest { service: "quiver.v1.Writes".into() })
        .await
        .expect("health check");
    r.into_inner().status()
}

async fn eventually_health(d: &Daemon, want: ServingStatus, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while writes_health(d).await != want {
        assert!(Instant::now() < deadline, "{what}: health never became {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_keeps_reads_and_recovers_by_itself() {
    let tmp = tempfile::tempdir().expect("tmp");
    let Some(disk) = Tmpfs::mount(&tmp.path().join("disk")) else { return };
    let data = disk.0.join("data");
    // Room to free later.
    let spare = {
        let p = disk.0.join("spare");
        std::fs::write(&p, vec![0u8; 6 << 20]).expect("spare");
        p
    };
    // A small budget: 2 MiB memtables, so flushes meet the full disk too.
    let args = ["--memory-budget-mb", "16"];
    let d = Daemon::start(&data, &args);
    let mut c = Clients::of(&d).await;
    c.registry.apply_registry(registry()).await.expect("apply");
    assert_eq!(writes_health(&d).await, ServingStatus::Serving);

    // Fill it: every write is acknowledged or refused with RESOURCE_EXHAUSTED naming the disk.
    let mut acked = BTreeMap::new();
    let mut i = 0;
    let refused = loop {
        i += 1;
        assert!(i < 10_000, "the disk never filled");
        match c.features.write_features(write(i)).await {
            Ok(_) => {
                acked.insert(i % 50, i);
            }
            Err(s) => break s,
        }
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("disk full") && refused.message().contains(&*data.to_string_lossy()),
        "{refused:?}"
    );
    assert!(refused.message().contains("resume by themselves"), "{refused:?}");
    // A failed flush frees what it wrote, which can be room enough again: take the last of
    // it, so the disk stays full while the test looks.
    let squeeze = fill(&disk.0.join("squeeze"));
    let mut k = i;
    loop {
        k += 1;
        match c.features.write_features(write(k)).await {
            Ok(_) => {
                acked.insert(k % 50, k);
            }
            Err(s) if s.code() == Code::ResourceExhausted => break,
            Err(s) => panic!("{s:?}"),
        }
        assert!(k < i + 1_000, "the disk never filled again");
    }
    let i = k;
    eventually_health(&d, ServingStatus::NotServing, "full").await;
    let mut h = tonic_health::pb::health_client::HealthClient::new(d.channel().await);
    let all = h.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.expect("health");
    assert_eq!(all.into_inner().status(), ServingStatus::Serving, "the node stays live while reads work");
    assert!(d.scrape().contains("quiver_writes_refused{reason=\"disk_full\"} 1"), "{}", d.scrape());
    check(&mut c, &acked, "full").await;

    // Space is freed: readiness comes back by itself (no client has to try a write first),
    // and writes resume without a restart.
    std::fs::remove_file(&spare).expect("free space");
    std::fs::remove_file(&squeeze).expect("free space");
    eventually_health(&d, ServingStatus::Serving, "space freed, before any write").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut j = i + 2;
    loop {
        match c.features.write_features(write(j)).await {
            Ok(_) => {
                acked.insert(j % 50, j);
                break;
            }
            Err(s) => assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}"),
        }
        assert!(Instant::now() < deadline, "writes did not resume within 30 s of space returning");
        tokio::time::sleep(Duration::from_millis(100)).await;
        j += 1;
    }
    assert_eq!(writes_health(&d).await, ServingStatus::Serving);
    check(&mut c, &acked, "resumed").await;

    // A restart on a full disk opens read-only: reads work, writes are refused, health says so.
    drop(c);
    assert!(d.stop(), "clean stop");
    let filler = fill(&disk.0.join("filler"));
    let d = Daemon::start(&data, &args);
    let mut c = Clients::of(&d).await;
    check(&mut c, &acked, "read-only").await;
    let ro = c.features.write_features(write(j + 1)).await.expect_err("read-only");
    assert_eq!(ro.code(), Code::ResourceExhausted, "{ro:?}");
    assert!(ro.message().contains("restart"), "{ro:?}");
    eventually_health(&d, ServingStatus::NotServing, "read-only").await;
    assert!(d.scrape().contains("quiver_writes_refused{reason=\"read_only\"} 1"));

    // With space and a restart, it takes writes again, with everything acknowledged.
    drop(c);
    assert!(d.stop());
    std::fs::remove_file(&filler).expect("free space");
    let d = Daemon::start(&data, &args);
    let mut c = Clients::of(&d).await;
    c.features.write_features(write(j + 2)).await.expect("write after the restart");
    acked.insert((j + 2) % 50, j + 2);
    check(&mut c, &acked, "restarted with space").await;
    assert_eq!(writes_health(&d).await, ServingStatus::Serving);
    drop(c);
    assert!(d.stop());
}
