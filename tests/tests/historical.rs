//! The point-in-time join over gRPC, checked row by row against a reference model of
//! `value_at` on random data with ties; `strict_availability` hides late writes; a pinned
//! `known_at` gives the identical answer after a backfill.

use quiver_e2e::{example_registry, int, key, ts, Clients, Daemon};
use quiver_proto::v1 as pb;

const HOUR_US: i64 = 3_600_000_000;
const USERS: usize = 12;

/// (user, event time, system time, value) of every write.
#[derive(Default)]
struct Model(Vec<(usize, i64, i64, i64)>);

impl Model {
    /// `storage/READS.md`: greatest event time in [t - ttl, t] with system time <= k, then greatest
    /// system time.
    fn value_at(&self, user: usize, t: i64, k: i64) -> Option<(i64, i64)> {
        self.0
            .iter()
            .filter(|r| r.0 == user && r.1 <= t && r.1 >= t - HOUR_US && r.2 <= k)
            .max_by_key(|r| (r.1, r.2))
            .map(|r| (r.1, r.3))
    }
    fn any_older(&self, user: usize, t: i64, k: i64) -> bool {
        self.0.iter().any(|r| r.0 == user && r.1 <= t && r.2 <= k)
    }
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn micros(t: &Option<prost_types::Timestamp>) -> i64 {
    let t = t.as_ref().expect("timestamp");
    t.seconds * 1_000_000 + i64::from(t.nanos / 1000)
}

fn user_name(u: usize) -> String {
    format!("u{u:02}")
}

async fn write(c: &mut Clients, model: &mut Model, rows: Vec<(usize, i64, i64)>) -> i64 {
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
    // Within one request a later row of the same cell replaces an earlier one.
    for (i, &(u, e, v)) in rows.iter().enumerate() {
        if !rows[i + 1..].iter().any(|r| r.0 == u && r.1 == e) {
            model.0.push((u, e, s, v));
        }
    }
    s
}

async fn join(c: &mut Clients, spine: &[(usize, i64)], known_at: Option<i64>, strict: bool) -> Vec<(i32, i64, i64)> {
    let req = pb::GetHistoricalFeaturesRequest {
        entity_type: "user".into(),
        spine: spine
            .iter()
            .map(|&(u, t)| pb::SpineRow { entity: Some(key(&user_name(u))), timestamp: ts(t) })
            .collect(),
        features: vec!["user_stats:clicks".into()],
        known_at: known_at.and_then(ts),
        strict_availability: strict,
        use_defaults: false,
    };
    let mut stream = c.features.get_historical_features(req).await.expect("join").into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await.expect("chunk") {
        assert_eq!(chunk.first_row as usize, out.len(), "chunks arrive in spine order");
        let col = &chunk.columns[0];
        for i in 0..col.statuses.len() {
            out.push((col.statuses[i], col.event_times_us[i], col.int64_values[i]));
        }
    }
    out
}

fn expected(model: &Model, spine: &[(usize, i64)], k: impl Fn(i64) -> i64) -> Vec<(i32, i64, i64)> {
    use pb::FeatureStatus::*;
    spine
        .iter()
        .map(|&(u, t)| match model.value_at(u, t, k(t)) {
            Some((e, v)) => (Present as i32, e, v),
            None if model.any_older(u, t, k(t)) => (Stale as i32, 0, 0),
            None => (NotFound as i32, 0, 0),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_join_matches_the_model() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = Daemon::start(tmp.path(), &[]);
    let mut c = Clients::of(&d).await;
    c.registry.apply_registry(example_registry()).await.expect("apply");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_micros() as i64;
    let base = now - 6 * HOUR_US;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut model = Model::default();
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
    for &(u, e, _, _) in model.0.iter().take(40) {
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
