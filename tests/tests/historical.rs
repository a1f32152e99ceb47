//! The point-in-time join over gRPC, checked row by row against a reference model of
//! `value_at` on random data with ties; `strict_availability` hides late writes; a pinned
//! `known_at` gives the identical answer after a backfill.

use quiver_e2e::{example_registry, int, join_clicks, key, ts, Clients, Daemon};
use quiver_proto::v1 as pb;
use quiver_testkit::{now_us, timestamp_to_micros, Model, Rng};

const HOUR_US: i64 = 3_600_000_000;
const USERS: usize = 12;

/// Every write: per user, (event time, system time, value).
type Writes = Model<usize, i64>;

fn micros(t: &Option<prost_types::Timestamp>) -> i64 {
    timestamp_to_micros(t.as_ref().expect("timestamp")).expect("a timestamp in range")
}

fn stamp(us: i64) -> u64 {
    u64::try_from(us).expect("a system time after 1970")
}

fn user_name(u: usize) -> String {
    format!("u{u:02}")
}

async fn write(c: &mut Clients, model: &mut Writes, rows: Vec<(usize, i64, i64)>) -> i64 {
    let req = pb::WriteFeaturesRequest {
        rows: rows
            .iter()
            .map(|&(u, e, v)| pb::WriteRow {
                entity: Some(key(&user_name(u))),
                group: "user_stats".into(),
                event_time: ts(e),
                values: [("clicks".to_string(), int(v))].into_iter().collect(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let s = micros(&c.features.write_features(req).await.expect("write").into_inner().system_time);
    // Within one request a later row of the same cell replaces an earlier one (so in the model).
    model.apply(stamp(s), rows.iter().map(|&(u, e, v)| (u, e, Some(v))));
    s
}

async fn join(c: &mut Clients, spine: &[(usize, i64)], known_at: Option<i64>, strict: bool) -> Vec<(i32, i64, i64)> {
    let named: Vec<(String, i64)> = spine.iter().map(|&(u, t)| (user_name(u), t)).collect();
    join_clicks(c, &named, known_at, strict).await
}

/// Per spine row: `value_at(t, k(t), TTL)` is PRESENT; else STALE if any version is older
/// (`value_at` without lookback); else NOT_FOUND. The test writes no tombstones.
fn expected(model: &Writes, spine: &[(usize, i64)], k: impl Fn(i64) -> i64) -> Vec<(i32, i64, i64)> {
    use pb::FeatureStatus::*;
    spine
        .iter()
        .map(|&(u, t)| {
            let k = stamp(k(t));
            match model.version_at(&u, t, k, Some(HOUR_US as u64)) {
                Some(w) => (Present as i32, w.event_time, w.value.expect("no tombstones")),
                None if model.version_at(&u, t, k, None).is_some() => (Stale as i32, 0, 0),
                None => (NotFound as i32, 0, 0),
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_join_matches_the_model() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = Daemon::start(tmp.path(), &[]);
    let mut c = Clients::of(&d).await;
    c.registry.apply_registry(example_registry()).await.expect("apply");
    let base = now_us() - 6 * HOUR_US;
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let mut model = Writes::new();
    let mut written: Vec<(usize, i64)> = Vec::new();
    // Events on a coarse grid so that ties (same event time, several versions) are common.
    for _ in 0..30 {
        let rows: Vec<(usize, i64, i64)> = (0..8)
            .map(|_| {
                (
                    rng.below(USERS as u64) as usize,
                    base + rng.below(24) as i64 * 15 * 60_000_000,
                    rng.below(1000) as i64,
                )
            })
            .collect();
        written.extend(rows.iter().map(|&(u, e, _)| (u, e)));
        write(&mut c, &mut model, rows).await;
    }
    let pinned = micros(
        &c.features
            .write_features(pb::WriteFeaturesRequest {
                rows: vec![pb::WriteRow {
                    entity: Some(key("marker")),
                    group: "user_stats".into(),
                    event_time: ts(base),
                    values: [("clicks".to_string(), int(0))].into_iter().collect(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .expect("marker")
            .into_inner()
            .system_time,
    );

    // The spine: random rows, rows exactly on event times and TTL edges, duplicates kept.
    let mut spine: Vec<(usize, i64)> =
        (0..400).map(|_| (rng.below(USERS as u64) as usize, base + rng.below(8 * 3600) as i64 * 1_000_000)).collect();
    for &(u, e) in written.iter().take(40) {
        spine.extend([(u, e), (u, e + HOUR_US), (u, e + HOUR_US + 1), (u, e - 1)]);
    }
    spine.push(spine[0]);
    spine.push(spine[0]);

    let plain = join(&mut c, &spine, None, false).await;
    assert_eq!(plain.len(), spine.len(), "one output row per spine row");
    assert_eq!(plain, expected(&model, &spine, |_| i64::MAX));
    let before_backfill = join(&mut c, &spine, Some(pinned), false).await;
    assert_eq!(before_backfill, expected(&model, &spine, |_| pinned));

    // A backfill: late corrections of past events for every user.
    let late_event = pinned - 10 * 60_000_000;
    let rows: Vec<(usize, i64, i64)> = (0..USERS).map(|u| (u, late_event, 10_000 + u as i64)).collect();
    write(&mut c, &mut model, rows).await;
    let after = join(&mut c, &spine, None, false).await;
    assert_eq!(after, expected(&model, &spine, |_| i64::MAX));
    assert_ne!(after, plain, "the backfill is visible to an unpinned join");
    assert_eq!(join(&mut c, &spine, Some(pinned), false).await, before_backfill, "a pinned known_at is reproducible");

    // strict_availability: a row only sees what was known at its own timestamp. Rows stamped
    // just before the backfill landed must not see it.
    let strict_spine: Vec<(usize, i64)> = (0..USERS).map(|u| (u, pinned + 1)).collect();
    let strict = join(&mut c, &strict_spine, None, true).await;
    assert_eq!(strict, expected(&model, &strict_spine, |t| t));
    assert!(strict.iter().all(|r| r.2 < 10_000), "late data leaked into a strict join");
    let lenient = join(&mut c, &strict_spine, None, false).await;
    assert!(lenient.iter().all(|r| r.2 >= 10_000), "without strictness the late data is served: {lenient:?}");
    assert!(d.stop());
}
