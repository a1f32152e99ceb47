//! The request-validation fuzz target (`server/fuzz/`, cargo-fuzz): arbitrary bytes are decoded
//! as one of the API's request messages and served by the same code quiverd runs (features and
//! registry, on an engine over the simulated file system). Nothing may panic, and:
//! - a request refused with an error changes nothing (the engine's sequence number and the
//!   registry's generation stay where they were);
//! - an answer has the shape the request asked for (a column per feature, a status per entity;
//!   a join's rows in spine order, each exactly once);
//! - a write's `values_written` is at most the values and deletes it sent.
//!
//! The first byte picks the message ([`Kind`]); the rest is its protobuf encoding. The
//! checked-in corpus (`server/fuzz/corpus/requests/`) replays through [`requests`] as an ordinary
//! test (`server/tests/fuzz_corpus.rs`), with [`seeds`].

use std::path::Path;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use prost::Message;
use quiver_proto::v1 as pb;
use quiver_storage::fs::MemFs;
use quiver_storage::{Db, Durability, ManualClock, Options};

use crate::features::Features;
use crate::registry::Registry;

/// The message a fuzz input holds (its first byte, modulo the count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `WriteFeaturesRequest`.
    Write = 0,
    /// `GetOnlineFeaturesRequest`.
    Online = 1,
    /// `GetHistoricalFeaturesRequest`.
    Historical = 2,
    /// `ScanHistoryRequest`.
    Scan = 3,
    /// `ApplyRegistryRequest`.
    Apply = 4,
}

const KINDS: [Kind; 5] = [Kind::Write, Kind::Online, Kind::Historical, Kind::Scan, Kind::Apply];

/// The wall clock the fixture's engine runs on (2026-01-01).
const NOW_US: i64 = 1_767_225_600_000_000;

struct Fixture {
    db: Arc<Db>,
    features: Features,
}

/// One engine for every input of a run (opening one per input would make the fuzzer slow);
/// each input's checks compare the state before and after it.
fn fixture() -> &'static Mutex<Fixture> {
    static FIXTURE: OnceLock<Mutex<Fixture>> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let opts = Options {
            memtable_bytes: 256 << 10,
            clock: Arc::new(ManualClock::new(NOW_US as u64)),
            ..Options::default()
        };
        let fs = Arc::new(MemFs::new());
        let db = Arc::new(Db::open_with_fs(fs, Path::new("/fuzz"), opts).expect("open the fixture engine"));
        let registry = Arc::new(Registry::open(db.clone()).expect("open the registry"));
        registry.apply(&registry_request()).expect("apply the fixture registry");
        let features = Features::new(registry, Durability::Async).with_join_spill_bytes(1 << 20);
        Mutex::new(Fixture { db, features })
    })
}

/// The fixture's registry: `user` (a string key) and `merchant_user` (string, int64);
/// `user_stats` (int64, float64 with a default, string, float32 vector; 1 h TTL) and `pair`.
pub fn registry_request() -> pb::ApplyRegistryRequest {
    let f = |name: &str, t: pb::ValueType| pb::FeatureDef {
        name: name.into(),
        r#type: t as i32,
        default_value: None,
        description: String::new(),
        ..Default::default()
    };
    let key = |name: &str, t: pb::JoinKeyType| pb::JoinKey { name: name.into(), r#type: t as i32 };
    pb::ApplyRegistryRequest {
        entity_types: vec![
            pb::EntityType {
                name: "user".into(),
                join_keys: vec![key("user_id", pb::JoinKeyType::String)],
                description: String::new(),
            },
            pb::EntityType {
                name: "merchant_user".into(),
                join_keys: vec![key("merchant", pb::JoinKeyType::String), key("user", pb::JoinKeyType::Int64)],
                description: String::new(),
            },
        ],
        feature_groups: vec![
            pb::FeatureGroup {
                name: "user_stats".into(),
                entity_type: "user".into(),
                ttl: Some(prost_types::Duration { seconds: 3600, nanos: 0 }),
                features: vec![
                    f("clicks", pb::ValueType::Int64),
                    pb::FeatureDef {
                        default_value: Some(pb::Value { kind: Some(pb::value::Kind::Float64Value(-1.0)) }),
                        ..f("spend", pb::ValueType::Float64)
                    },
                    f("country", pb::ValueType::String),
                    f("embedding", pb::ValueType::Float32Vector),
                ],
                ..Default::default()
            },
            pb::FeatureGroup {
                name: "pair".into(),
                entity_type: "merchant_user".into(),
                features: vec![f("count", pb::ValueType::Int64)],
                ..Default::default()
            },
        ],
        dry_run: false,
        promote: false,
    }
}

/// Valid requests of every kind, encoded as fuzz inputs: the corpus's starting points.
pub fn seeds() -> Vec<Vec<u8>> {
    let user = |id: &str| pb::EntityKey {
        parts: vec![pb::KeyPart { kind: Some(pb::key_part::Kind::StringValue(id.into())) }],
    };
    let ts = |us: i64| Some(crate::convert::timestamp(us));
    let value = |k: pb::value::Kind| pb::Value { kind: Some(k) };
    let row = pb::WriteRow {
        entity: Some(user("alice")),
        group: "user_stats".into(),
        event_time: ts(NOW_US - 1_000_000),
        values: [
            ("clicks".to_string(), value(pb::value::Kind::Int64Value(7))),
            ("spend".to_string(), value(pb::value::Kind::Float64Value(2.5))),
            ("country".to_string(), value(pb::value::Kind::StringValue("de".into()))),
        ]
        .into_iter()
        .collect(),
        deletes: vec!["embedding".into()],
        expected_versions: Default::default(),
    };
    let mut cas = row.clone();
    cas.expected_versions.insert("clicks".into(), pb::VersionVector::default());
    let write = pb::WriteFeaturesRequest { rows: vec![row, cas], durability: 0, idempotency_key: "k-1".into() };
    let online = pb::GetOnlineFeaturesRequest {
        entity_type: "user".into(),
        entities: vec![user("alice"), user("bob")],
        features: vec!["user_stats:clicks".into(), "user_stats@1:spend".into(), "user_stats:country".into()],
        as_of: ts(NOW_US),
        default_missing: true,
        default_unavailable: false,
    };
    let historical = pb::GetHistoricalFeaturesRequest {
        entity_type: "user".into(),
        spine: vec![
            pb::SpineRow { entity: Some(user("alice")), timestamp: ts(NOW_US) },
            pb::SpineRow { entity: Some(user("bob")), timestamp: ts(NOW_US - 5_000_000) },
        ],
        features: vec!["user_stats:clicks".into(), "user_stats:spend".into()],
        known_at: None,
        strict_availability: true,
        use_defaults: true,
    };
    let scan = pb::ScanHistoryRequest {
        entity_type: "user".into(),
        entity: Some(user("alice")),
        group: "user_stats".into(),
        limit: 10,
        ..Default::default()
    };
    let mut apply = registry_request();
    apply.feature_groups[1].description = "changed".into();
    apply.dry_run = true;
    let framed = |kind: Kind, bytes: Vec<u8>| [vec![kind as u8], bytes].concat();
    vec![
        framed(Kind::Write, write.encode_to_vec()),
        framed(Kind::Online, online.encode_to_vec()),
        framed(Kind::Historical, historical.encode_to_vec()),
        framed(Kind::Scan, scan.encode_to_vec()),
        framed(Kind::Apply, apply.encode_to_vec()),
    ]
}

/// The fuzz target: decode, serve, check (see the module doc).
pub fn requests(data: &[u8]) {
    let Some((&first, body)) = data.split_first() else { return };
    let kind = KINDS[usize::from(first) % KINDS.len()];
    let fx = fixture().lock();
    let before = (fx.db.last_seqno(), fx.features.registry().generation());
    let unchanged = |what: &str| {
        let after = (fx.db.last_seqno(), fx.features.registry().generation());
        assert_eq!(before, after, "a refused {what} changed the store");
    };
    match kind {
        Kind::Write => {
            let Ok(req) = pb::WriteFeaturesRequest::decode(body) else { return };
            match fx.features.write(&req) {
                Ok(resp) => {
                    let sent: usize = req.rows.iter().map(|r| r.values.len() + r.deletes.len()).sum();
                    assert!(resp.values_written as usize <= sent, "{} written of {sent} sent", resp.values_written);
                }
                Err(_) => unchanged("write"),
            }
        }
        Kind::Online => {
            let Ok(req) = pb::GetOnlineFeaturesRequest::decode(body) else { return };
            if let Ok(resp) = fx.features.get_online_charged(&req, NOW_US, 1 << 20, &mut |_| true, None, None) {
                assert_eq!(resp.columns.len(), req.features.len(), "a column per feature");
                for c in &resp.columns {
                    assert_eq!(c.statuses.len(), req.entities.len(), "a status per entity");
                }
            }
            unchanged("online read");
        }
        Kind::Historical => {
            let Ok(req) = pb::GetHistoricalFeaturesRequest::decode(body) else { return };
            let mut next_row = 0u64;
            let served = fx.features.historical(&req, |chunk| {
                assert_eq!(chunk.first_row, next_row, "join rows come in spine order, each once");
                let rows = chunk.columns.first().map_or(0, |c| c.statuses.len());
                assert!(chunk.columns.iter().all(|c| c.statuses.len() == rows), "columns of one length");
                next_row += rows as u64;
                true
            });
            if served.is_ok() && !req.features.is_empty() {
                assert_eq!(next_row, req.spine.len() as u64, "every spine row answered");
            }
            unchanged("join");
        }
        Kind::Scan => {
            let Ok(req) = pb::ScanHistoryRequest::decode(body) else { return };
            let mut n = 0u64;
            let _ = fx.features.scan_history(&req, |chunk| {
                n += chunk.versions.len() as u64;
                true
            });
            if req.limit > 0 {
                assert!(n <= req.limit, "{n} versions over the limit of {}", req.limit);
            }
            unchanged("scan");
        }
        Kind::Apply => {
            let Ok(req) = pb::ApplyRegistryRequest::decode(body) else { return };
            if fx.features.registry().apply(&req).is_err() || req.dry_run {
                unchanged("registry apply");
            }
        }
    }
}
