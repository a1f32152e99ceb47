//! Skew: the served-feature log replayed through the point-in-time join agrees with what was
//! served (one read rule), across TTLs, defaults, tombstones, late writes, pinned versions and
//! explicit as_of; and a perturbed logged value is reported, with its example.

use std::sync::Arc;
use std::time::Duration;

use quiver_e2e::{example_registry, int, key, ts};
use quiver_proto::v1 as pb;
use quiver_server::features::Features;
use quiver_server::registry::Registry;
use quiver_server::servedlog::ServedLog;
use quiver_storage::{Db, Durability, Options};
use quiver_testkit::now_us;

const MINUTE_US: i64 = 60_000_000;

/// The tests' example registry (`user_stats`: clicks, spend with default -1) with a TTL of `ttl_s`.
fn registry(ttl_s: i64) -> pb::ApplyRegistryRequest {
    let mut req = example_registry();
    req.feature_groups[0].ttl = Some(prost_types::Duration { seconds: ttl_s, nanos: 0 });
    req
}

fn write(f: &Features, user: &str, at: i64, clicks: Option<i64>) {
    let mut row =
        pb::WriteRow { entity: Some(key(user)), group: "user_stats".into(), event_time: ts(at), ..Default::default() };
    match clicks {
        Some(v) => {
            row.values.insert("clicks".into(), int(v));
        }
        None => row.deletes.push("clicks".into()),
    }
    f.write(&pb::WriteFeaturesRequest { rows: vec![row], ..Default::default() }).expect("write");
}

fn lookup(f: &Features, users: &[String], as_of: Option<i64>, default_missing: bool) {
    let req = pb::GetOnlineFeaturesRequest {
        entity_type: "user".into(),
        entities: users.iter().map(|u| key(u)).collect(),
        features: vec!["user_stats:clicks".into(), "user_stats:spend".into()],
        as_of: as_of.and_then(ts),
        default_missing,
        default_unavailable: false,
    };
    f.get_online(&req, now_us()).expect("lookup");
}

fn measure(f: &Features, log: &ServedLog, from: i64) -> pb::MeasureSkewResponse {
    assert!(log.wait_written(Duration::from_secs(10)), "the log did not catch up");
    let req =
        pb::MeasureSkewRequest { from: ts(from), to: ts(now_us() + MINUTE_US), group: String::new(), examples: 3 };
    quiver_server::skew::measure(f, log, &req, |_| true).expect("measure")
}

#[test]
fn the_logged_answers_replay_to_what_was_served_and_a_perturbed_one_is_caught() {
    let tmp = tempfile::tempdir().expect("tmp");
    let db = Arc::new(Db::open(tmp.path(), Options::default()).expect("db"));
    let reg = Arc::new(Registry::open(db.clone()).expect("registry"));
    reg.apply(&registry(3600)).expect("apply");
    let log = Arc::new(ServedLog::start(db.clone(), 0, 1.0).expect("log"));
    let f = Features::new(reg.clone(), Durability::Sync).with_served_log(log.clone());
    let start = now_us();
    let users: Vec<String> = (0..40).map(|i| format!("u{i}")).collect();
    let t = start - 3 * 60 * MINUTE_US;
    for (i, u) in users.iter().enumerate() {
        // Present, stale (older than the TTL), never written, and deleted values.
        match i % 4 {
            0 => write(&f, u, start - 10 * MINUTE_US, Some(i as i64)),
            1 => write(&f, u, t, Some(i as i64)),
            2 => {}
            _ => {
                write(&f, u, start - 20 * MINUTE_US, Some(i as i64));
                write(&f, u, start - 5 * MINUTE_US, None);
            }
        }
    }
    lookup(&f, &users, None, false);
    // A late write (an older event time, written after the lookup) must not change the replay.
    write(&f, "u2", start - 30 * MINUTE_US, Some(99));
    lookup(&f, &users, None, true);
    // A correction at the same event time, then a lookup as of the past.
    write(&f, "u0", start - 10 * MINUTE_US, Some(1000));
    lookup(&f, &users, Some(start - 15 * MINUTE_US), false);
    // A new group version (TTL one minute), serving at once: pinned replays still use the
    // version that answered.
    reg.apply(&pb::ApplyRegistryRequest { promote: true, ..registry(60) }).expect("apply v2");
    lookup(&f, &users, None, false);

    let r = measure(&f, &log, start - MINUTE_US);
    assert_eq!(r.answers, 4 * users.len() as u64);
    assert_eq!(r.features.len(), 2);
    for s in &r.features {
        assert_eq!((s.compared, s.equal, s.mismatched, s.missing), (160, 160, 0, 0), "{s:?}");
    }

    // A logged value that is not what the store holds is reported, with the replayed value.
    let mut logged = Vec::new();
    log.scan(start - MINUTE_US, now_us() + MINUTE_US, &mut |chunk| {
        logged.extend(chunk);
        true
    })
    .expect("scan");
    let mut perturbed = logged.iter().find(|a| a.entity == Some(key("u4"))).expect("u4 logged").clone();
    perturbed.request_id = "perturbed".into();
    perturbed.features[0].value = Some(int(12345));
    let served_us = perturbed.served_at.as_ref().and_then(quiver_testkit::timestamp_to_micros).expect("served_at");
    log.offer(&perturbed, served_us);
    let r = measure(&f, &log, start - MINUTE_US);
    let clicks = r.features.iter().find(|s| s.feature_ref == "user_stats:clicks").expect("clicks");
    assert_eq!((clicks.compared, clicks.mismatched), (161, 1), "{clicks:?}");
    let ex = &clicks.examples[0];
    assert_eq!(ex.request_id, "perturbed");
    assert_eq!(ex.served.as_ref().and_then(|s| s.value.clone()), Some(int(12345)));
    assert_eq!(ex.replayed.as_ref().and_then(|s| s.value.clone()), Some(int(4)));
    let spend = r.features.iter().find(|s| s.feature_ref == "user_stats:spend").expect("spend");
    assert_eq!((spend.compared, spend.mismatched), (161, 0));

    // Bad ranges and example counts are refused.
    for bad in [
        pb::MeasureSkewRequest { from: ts(start), to: ts(start), ..Default::default() },
        pb::MeasureSkewRequest { from: None, to: ts(start), ..Default::default() },
        pb::MeasureSkewRequest { from: ts(start), to: ts(start + 1), examples: 101, ..Default::default() },
    ] {
        assert!(matches!(
            quiver_server::skew::measure(&f, &log, &bad, |_| true),
            Err(quiver_server::features::ServiceError::Invalid(_))
        ));
    }
}
