//! Quiver's storage engine: an LSM tree of bitemporal feature cells.
//!
//! The public surface: [`Db`] (open, write, `write_if`, reads, scans, replication, operator
//! calls) with its options and results; the data model ([`types`]); the read contract
//! ([`asof`], `storage/READS.md`); encoded cells ([`cell`]); the reserved keyspace
//! ([`reserved`]); the conflict rule of replication ([`replication`]); the slots of a sharded
//! region ([`slot`]); offline inspection of
//! files ([`inspect`]); limits ([`limits`]); and, for tests and tools that need them, the file
//! system seam ([`fs`]) and table reading ([`sstable`]). Everything else (WAL, batches,
//! records, keys, manifest, memtables, compaction) is internal.
#![deny(clippy::unwrap_used)]
#![warn(missing_docs)]

pub mod agg;
pub mod asof;
pub(crate) mod batch;
pub mod cell;
pub(crate) mod coding;
pub(crate) mod error;
pub mod fs;
#[doc(hidden)]
pub mod fuzzing;
pub mod hash;
pub(crate) mod key;
pub mod limits;
pub(crate) mod record;
pub mod sstable;
pub mod tiles;
pub mod types;
pub(crate) mod wal;

pub use error::{Error, Result};
pub(crate) mod compaction;
pub(crate) mod db;
pub(crate) mod hlc;
mod hot;
pub mod inspect;
pub(crate) mod iter;
pub(crate) mod manifest;
pub(crate) mod memtable;
pub(crate) mod options;
pub mod replication;
pub mod reserved;
pub mod slot;
pub(crate) mod stripes;
pub(crate) mod version;

pub use batch::WriteBatch;
pub use db::StreamId;
pub use db::{
    verify_dir, AggQuery, ApplyReport, BatchRead, Db, EntityVersions, Expectation, Gathered, HistoryReader, LevelStats,
    LocalLog, Mismatch, PairCursor, RawVersion, ScanItem, ScanIter, ScanRange, ShippedBatch, ShippedOp, Snapshot,
    SnapshotReader, SnapshotVersion, Stats, VerifyReport, WriteIf, WriteReceipt, WritesRefused, EXPECTATIONS_MAX,
    MOVED_ORIGIN_SEQNO, REPLICATION_ENTITY, SHIPPED_VERSIONS_MAX, SOLE_STREAM, STREAM_MAX,
};
pub use hlc::{Clock, ManualClock, SystemClock};
pub use hot::HotStats;
pub use options::{Background, Options};
pub use sstable::Compression;
pub use types::{
    encode_entity_key, AsOf, Causality, CellVersion, Durability, EntityKey, EventTime, FeatureId, KeyPart, RegionId,
    SystemTime, Value, ValueType, VersionVector,
};
