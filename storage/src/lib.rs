//! Quiver's storage engine: an LSM tree of bitemporal feature cells.
#![deny(clippy::unwrap_used)]
#![warn(missing_docs)]

pub mod asof;
pub mod batch;
pub mod cell;
pub mod coding;
pub mod error;
pub mod fs;
#[doc(hidden)]
pub mod fuzzing;
pub mod key;
pub mod limits;
pub mod record;
pub mod sstable;
pub mod types;
pub mod wal;

pub use error::{Error, Result};
pub mod compaction;
pub mod db;
pub mod hlc;
mod hot;
pub mod inspect;
pub mod iter;
pub mod manifest;
pub mod memtable;
pub mod options;
pub mod replication;
pub mod reserved;
pub mod version;

pub use batch::WriteBatch;
pub use db::{
    verify_dir, ApplyReport, Db, Expectation, LevelStats, Mismatch, PairCursor, RawVersion, ScanItem, ScanIter,
    ScanRange, ShippedBatch, ShippedOp, Snapshot, SnapshotReader, SnapshotVersion, Stats, VerifyReport, WriteIf,
    WriteReceipt, EXPECTATIONS_MAX, REPLICATION_ENTITY, SHIPPED_VERSIONS_MAX,
};
pub use hlc::{Clock, ManualClock, SystemClock};
pub use hot::HotStats;
pub use options::{Background, Options};
pub use sstable::Compression;
pub use types::{
    encode_entity_key, AsOf, Causality, CellVersion, Durability, EntityKey, EventTime, FeatureId, KeyPart, RegionId,
    SystemTime, Value, ValueType, VersionVector,
};
