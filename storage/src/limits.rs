//! Every limit of the engine in one place, with compile-time checks of how they relate.
//!
//! Limits bound what one write, one key or one file may hold. Input beyond them is rejected with
//! [`crate::Error::InvalidArgument`] before anything is written.

/// Longest entity key, in bytes, before escaping.
pub const ENTITY_KEY_BYTES_MAX: usize = 1024;
/// Largest encoded value of one cell version (value, version vector and header).
pub const VALUE_BYTES_MAX: usize = 1 << 20;
/// Most operations in one write batch.
pub const BATCH_OPS_MAX: usize = 100_000;
/// Largest encoded write batch (one WAL record payload).
pub const BATCH_BYTES_MAX: usize = 64 << 20;
/// Largest record payload the shared record framing accepts (WAL and manifest).
pub const RECORD_BYTES_MAX: usize = BATCH_BYTES_MAX + 4096;
/// Most regions in one version vector.
pub const VERSION_VECTOR_ENTRIES_MAX: usize = 64;
/// Most bytes a version vector takes in a cell: a count and, per entry, a region and a counter
/// (uvarints of at most 5 and 10 bytes). A write's value must leave room for it, since the
/// vector it is stamped with (what the node knows of every region) is only known at commit.
pub const VERSION_VECTOR_BYTES_MAX: usize = 1 + VERSION_VECTOR_ENTRIES_MAX * 15;
/// Most elements of a list or vector value.
pub const LIST_ELEMENTS_MAX: usize = 65_536;
/// Largest data block before compression (a single oversized entry may exceed the configured
/// block size, never this).
pub const BLOCK_BYTES_MAX: usize = VALUE_BYTES_MAX + 2 * ENTITY_KEY_BYTES_MAX + 4096;
/// Largest filter or index block of one table. These grow with the table (10 bits per
/// `(entity, feature)` pair; one entry per data block), so they have their own, larger bound.
pub const META_BLOCK_BYTES_MAX: usize = 128 << 20;
/// Number of levels of the LSM tree, L0 included.
pub const LEVELS: usize = 7;
/// Most immutable memtables waiting for flush before writers stall (the default and the
/// largest `Options::immutable_memtables_max`).
pub const IMMUTABLE_MEMTABLES_MAX: usize = 4;
/// Most `(entity, feature)` pairs in one table written by compaction: its writer keeps an
/// 8-byte hash per pair for the filter until the table is finished, so this bounds that memory
/// (16 MiB) whatever the table's byte size (one version per pair packs about 5 million pairs
/// into a 32 MiB table).
pub const TABLE_PAIRS_MAX: usize = 1 << 21;
/// Bloom filter bits per (entity, feature) prefix.
pub const BLOOM_BITS_PER_KEY: usize = 10;
/// Entries between restart points in a data block.
pub const BLOCK_RESTART_INTERVAL: usize = 16;
/// Manifest size after which it is rewritten as one snapshot.
pub const MANIFEST_BYTES_REWRITE: u64 = 4 << 20;

const _: () = assert!(RECORD_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(BLOCK_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(BLOCK_BYTES_MAX <= META_BLOCK_BYTES_MAX);
const _: () = assert!(VALUE_BYTES_MAX < BATCH_BYTES_MAX);
const _: () = assert!(LEVELS >= 2);
