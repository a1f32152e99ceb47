//! Shared data sets for Quiver's benchmarks, and the `quiver-bench` load generator ([`load`]).

pub mod load;

use quiver_storage::{Db, Durability, EventTime, FeatureId, Value, WriteBatch};

/// Features per entity in the benchmark data sets (a typical online request).
pub const FEATURES: u32 = 50;

/// The entity key of entity `i`.
pub fn entity(i: u64) -> Vec<u8> {
    format!("user-{i:010}").into_bytes()
}

/// Loads `entities` x [`FEATURES`] float features, `versions` event times each, in batches of
/// one entity's features.
pub fn load(db: &Db, entities: u64, versions: i64) -> quiver_storage::Result<()> {
    for v in 0..versions {
        for e in 0..entities {
            let mut b = WriteBatch::new();
            for f in 0..FEATURES {
                b.put(&entity(e), FeatureId(f), EventTime(v * 1_000_000), Value::Float32((e + u64::from(f)) as f32))?;
            }
            db.write(b, Durability::Async)?;
        }
    }
    Ok(())
}

/// The small deterministic generator the benchmarks draw keys with, so runs are repeatable.
pub use quiver_testkit::Rng;
