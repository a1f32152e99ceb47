//! The test clock: with `QUIVER_TEST_MANUAL_CLOCK_US` (testing builds), `SetTestClock` gives
//! writes exact system times, so `strict_availability` and `known_at` are checked against exact
//! stamps, bounds included, rather than against the wall clock.

use quiver_e2e::{example_registry, int, join_clicks, key, ts, Clients, Daemon};
use quiver_proto::v1 as pb;
use quiver_testkit::timestamp_to_micros;

const MINUTE_US: i64 = 60_000_000;
/// 2026-01-01T00:00:00Z: the event time of every write here.
const T0: i64 = 1_767_225_600_000_000;

async fn set_clock(c: &mut Clients, us: i64) {
    c.admin.set_test_clock(pb::SetTestClockRequest { now: ts(us) }).await.expect("set the test clock");
}

async fn write(c: &mut Clients, v: i64) -> i64 {
    let req = pb::WriteFeaturesRequest {
        rows: vec![pb::WriteRow {
            entity: Some(key("alice")),
            group: "user_stats".into(),
            event_time: ts(T0),
            values: [("clicks".to_string(), int(v))].into_iter().collect(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let r = c.features.write_features(req).await.expect("write").into_inner();
    timestamp_to_micros(r.system_time.as_ref().expect("stamp")).expect("in range")
}

/// (status, value) of `clicks` for alice at each spine time.
async fn join(c: &mut Clients, times: &[i64], known_at: Option<i64>, strict: bool) -> Vec<(i32, i64)> {
    let spine: Vec<(String, i64)> = times.iter().map(|&t| ("alice".to_string(), t)).collect();
    join_clicks(c, &spine, known_at, strict).await.into_iter().map(|(status, _, value)| (status, value)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_stamps_decide_strict_availability_and_known_at_at_their_bounds() {
    use pb::FeatureStatus::{NotFound, Present};
    let tmp = tempfile::tempdir().expect("tmp");
    let start = T0.to_string();
    let d = Daemon::start_with_env(tmp.path(), "127.0.0.1:0", &[], &[("QUIVER_TEST_MANUAL_CLOCK_US", &start)]);
    let mut c = Clients::of(&d).await;
    c.registry.apply_registry(example_registry()).await.expect("apply");
    // The value of event T0 is written 10 minutes later, and corrected 30 minutes later.
    let (s1, s2) = (T0 + 10 * MINUTE_US, T0 + 30 * MINUTE_US);
    set_clock(&mut c, s1).await;
    assert_eq!(write(&mut c, 1).await, s1, "the write is stamped with the test clock");
    set_clock(&mut c, s2).await;
    assert_eq!(write(&mut c, 2).await, s2);
    let (p, nf) = (Present as i32, NotFound as i32);
    // strict_availability: a row at t sees what was known at t, the bound inclusive.
    let times = [s1 - 1, s1, s2 - 1, s2, T0 + 50 * MINUTE_US];
    assert_eq!(join(&mut c, &times, None, true).await, vec![(nf, 0), (p, 1), (p, 1), (p, 2), (p, 2)]);
    // Without it every row sees the correction.
    assert_eq!(join(&mut c, &times, None, false).await, vec![(p, 2); 5]);
    // A pinned known_at, the bound inclusive.
    let late = [T0 + 50 * MINUTE_US];
    assert_eq!(join(&mut c, &late, Some(s1 - 1), false).await, vec![(nf, 0)]);
    assert_eq!(join(&mut c, &late, Some(s2 - 1), false).await, vec![(p, 1)]);
    assert_eq!(join(&mut c, &late, Some(s2), false).await, vec![(p, 2)]);
    // A node without the test clock refuses to set one.
    let tmp2 = tempfile::tempdir().expect("tmp");
    let plain = Daemon::start(tmp2.path(), &[]);
    let mut c2 = Clients::of(&plain).await;
    let e = c2.admin.set_test_clock(pb::SetTestClockRequest { now: ts(s1) }).await.expect_err("no test clock");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
}
