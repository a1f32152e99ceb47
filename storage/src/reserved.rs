//! The reserved keyspace, every prefix of it named here.
//!
//! Entity keys that start with a zero byte are reserved: user keys are encoded with a type tag
//! first ([`crate::encode_entity_key`]), never zero, so no user key can reach this space. The
//! engine and the service keep their own records there, in the engine itself (durable,
//! versioned, and — for the prefixes a node lists in `Options::replicated_prefixes` —
//! replicated like data):
//!
//! | prefix | holds | replicated |
//! | --- | --- | --- |
//! | [`REGISTRY`] | the feature registry: [`REGISTRY_ENTITY_TYPES`], [`REGISTRY_GROUPS`], [`REGISTRY_SERVING`], [`REGISTRY_RETIRED`] | yes (quiverd lists it) |
//! | [`IDEMPOTENCY`] | the stored answer of each idempotent write, by key | no: a retry goes to the node that took the write |
//! | [`REPLICATION_CURSOR`] | per origin region and stream, how far this node applied that log | no: each node's own progress |
//! | [`SERVED_LOG`] | logged online answers, by served-at time (expire after `Options::served_log_retention`) | no: each node logs what it served |
//! | [`MONITOR`] | feature monitoring: [`MONITOR_WATERMARKS`], each group's newest ingested times per region; [`MONITOR_BASELINES`], drift baselines | yes (quiverd lists it) |

/// The first byte of every reserved entity key.
pub const RESERVED_BYTE: u8 = 0;

/// The feature registry (the service's entity types and feature groups).
pub const REGISTRY: &[u8] = b"\x00reg\x00";
/// Registry entity types, by name.
pub const REGISTRY_ENTITY_TYPES: &[u8] = b"\x00reg\x00et\x00";
/// Registry feature groups, by name.
pub const REGISTRY_GROUPS: &[u8] = b"\x00reg\x00fg\x00";
/// Each group's serving-version history, by group name: one cell per change, at event time =
/// when it took effect (the newest event time is the serving version).
pub const REGISTRY_SERVING: &[u8] = b"\x00reg\x00sv\x00";
/// Retired group versions: entity `REGISTRY_RETIRED` + group name, feature = the version,
/// event time 0, value `quiver.v1.GroupRetirement`.
pub const REGISTRY_RETIRED: &[u8] = b"\x00reg\x00rt\x00";
/// Idempotency records, by idempotency key.
pub const IDEMPOTENCY: &[u8] = b"\x00idem\x00";
/// The one entity holding this node's replication cursors (feature = origin region).
pub const REPLICATION_CURSOR: &[u8] = b"\x00repl\x00cursor";

/// Feature monitoring records.
pub const MONITOR: &[u8] = b"\x00mon\x00";
/// Per feature group (entity `MONITOR_WATERMARKS` + group name) and writing region (feature
/// id): the newest event and system times written.
pub const MONITOR_WATERMARKS: &[u8] = b"\x00mon\x00wm\x00";
/// Drift baselines: entity `MONITOR_BASELINES` + group + `0x00` + baseline name, feature 0,
/// event time 0, value the encoded baseline (newest version: the baseline).
pub const MONITOR_BASELINES: &[u8] = b"\x00mon\x00bl\x00";

/// Logged online answers: entity `SERVED_LOG` + served-at time (µs, sign bit flipped, big
/// endian) + a per-node sequence number (big endian), so that time ranges are key ranges.
/// Compaction drops them once older than `Options::served_log_retention` (system time).
pub const SERVED_LOG: &[u8] = b"\x00log\x00";

/// Every top-level reserved prefix.
pub const ALL: [&[u8]; 5] = [REGISTRY, IDEMPOTENCY, REPLICATION_CURSOR, MONITOR, SERVED_LOG];

/// True for an entity key in the reserved space.
pub fn is_reserved(entity: &[u8]) -> bool {
    entity.first() == Some(&RESERVED_BYTE)
}

/// Whether a version of `entity` at `event_time` is below the event horizon `horizon`: the
/// horizon bounds feature values only, never the service's reserved records (written at event
/// time 0). Local writes are refused and replicated versions dropped by this one rule.
pub(crate) fn below_horizon(entity: &[u8], event_time: crate::types::EventTime, horizon: i64) -> bool {
    event_time.0 < horizon && !is_reserved(entity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_reserved_disjoint_and_never_a_user_key() {
        for (i, a) in ALL.iter().enumerate() {
            assert!(is_reserved(a));
            for b in &ALL[i + 1..] {
                assert!(!a.starts_with(b) && !b.starts_with(a), "{a:?} and {b:?} overlap");
            }
        }
        for sub in [REGISTRY_ENTITY_TYPES, REGISTRY_GROUPS, REGISTRY_SERVING, REGISTRY_RETIRED] {
            assert!(sub.starts_with(REGISTRY));
        }
        assert!(MONITOR_WATERMARKS.starts_with(MONITOR));
        let user = crate::encode_entity_key(&[crate::KeyPart::Str("")]);
        assert!(!is_reserved(&user));
        assert!(!is_reserved(&crate::encode_entity_key(&[crate::KeyPart::Int(0)])));
    }
}
