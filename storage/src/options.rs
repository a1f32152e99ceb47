//! Engine options.

use std::sync::Arc;
use std::time::Duration;

use crate::hlc::{Clock, SystemClock};
use crate::sstable::{Compression, IoBackend};
use crate::types::RegionId;

/// How background work (flush, compaction) runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Background {
    /// A flush thread and a compaction thread.
    Threads,
    /// The writer that fills a memtable flushes it and runs any due compactions before it
    /// returns. Deterministic: for tests and tools.
    Inline,
}

/// Options of an engine. [`Options::default`] suits a server; tests shrink the sizes.
#[derive(Debug, Clone)]
pub struct Options {
    /// Memtable size that triggers a switch and a flush.
    pub memtable_bytes: usize,
    /// Most immutable memtables waiting for flush before writers stall (1 to
    /// [`crate::limits::IMMUTABLE_MEMTABLES_MAX`]). Memtables hold at most
    /// `memtable_bytes x (1 + immutable_memtables_max)`.
    pub immutable_memtables_max: usize,
    /// Target uncompressed data block size.
    pub block_bytes: usize,
    /// Bytes of parsed data blocks kept in memory; 0 disables the block cache.
    pub block_cache_bytes: usize,
    /// Bytes of the hot tier (the newest version of recently read or written pairs, see
    /// `src/hot.rs`); 0 disables it.
    pub hot_tier_bytes: usize,
    /// Bytes of the tile cache (partial aggregates of hours and days of pairs' histories, see
    /// `src/tiles.rs`); 0 disables it (aggregates then read raw versions only).
    pub tile_cache_bytes: usize,
    /// Which backend reads data blocks for point reads (`src/sstable/ssd.rs`).
    pub io_backend: IoBackend,
    /// Read data blocks for point reads with `O_DIRECT` where the file system takes it, so the
    /// block cache is their only cache.
    pub direct_reads: bool,
    /// Data block compression (LZ4 by default; see [`Compression`] for the trade).
    pub compression: Compression,
    /// Number of L0 tables that triggers a compaction.
    pub l0_compaction_trigger: usize,
    /// Number of L0 tables at which writes wait for compaction.
    pub l0_stop_writes: usize,
    /// Target size of L1.
    pub l1_bytes: u64,
    /// Size ratio between levels.
    pub level_multiplier: u64,
    /// Target size of one table written by compaction.
    pub table_bytes: u64,
    /// System-time retention window: superseded versions settled longer ago than this may be
    /// dropped by compaction. `None` keeps every version.
    pub retention_window: Option<Duration>,
    /// How long logged online answers ([`crate::reserved::SERVED_LOG`]) are kept, by system
    /// time: compaction drops older ones. `None` keeps them.
    pub served_log_retention: Option<Duration>,
    /// The region this node stamps on its writes' version vectors.
    pub region: RegionId,
    /// Bytes of flushed WAL segments kept for replication peers that have not yet applied
    /// them ([`crate::Db::retain_log_after`]); past it the oldest go, and a peer that needed
    /// them must be bootstrapped. 0 (the default) deletes segments once flushed.
    pub replication_log_bytes: u64,
    /// Reserved entity-key prefixes (first byte zero) whose cells replicate like data (the
    /// server's registry). Every other reserved entity stays local to its node.
    pub replicated_prefixes: Vec<Vec<u8>>,
    /// Bytes of the newest local batches kept in memory for peers that keep up (used when
    /// `replication_log_bytes > 0`); a peer further behind is served from the WAL on disk.
    pub replication_tail_bytes: usize,
    /// How background work runs.
    pub background: Background,
    /// Upper bound on how long an `Async` write stays unsynced.
    pub async_sync_interval: Duration,
    /// The wall clock (tests use [`crate::hlc::ManualClock`]).
    pub clock: Arc<dyn Clock>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            memtable_bytes: 64 << 20,
            immutable_memtables_max: crate::limits::IMMUTABLE_MEMTABLES_MAX,
            block_bytes: 16 << 10,
            block_cache_bytes: 256 << 20,
            hot_tier_bytes: 64 << 20,
            tile_cache_bytes: 16 << 20,
            io_backend: IoBackend::Auto,
            direct_reads: true,
            compression: Compression::Lz4,
            l0_compaction_trigger: 4,
            l0_stop_writes: 20,
            l1_bytes: 256 << 20,
            level_multiplier: 10,
            table_bytes: 32 << 20,
            retention_window: None,
            served_log_retention: None,
            region: 0,
            replication_log_bytes: 0,
            replicated_prefixes: Vec::new(),
            replication_tail_bytes: 32 << 20,
            background: Background::Threads,
            async_sync_interval: Duration::from_millis(100),
            clock: Arc::new(SystemClock),
        }
    }
}

impl Options {
    /// Checks that the options make sense together; [`crate::Db::open`] refuses others.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |what: String| Err(crate::Error::InvalidArgument(format!("options: {what}")));
        if self.memtable_bytes == 0 || self.block_bytes == 0 || self.table_bytes == 0 || self.l1_bytes == 0 {
            return bad("memtable_bytes, block_bytes, table_bytes and l1_bytes must be positive".into());
        }
        if !(1..=crate::limits::IMMUTABLE_MEMTABLES_MAX).contains(&self.immutable_memtables_max) {
            return bad(format!(
                "immutable_memtables_max must be 1 to {}, not {}",
                crate::limits::IMMUTABLE_MEMTABLES_MAX,
                self.immutable_memtables_max
            ));
        }
        if self.l0_compaction_trigger == 0 || self.l0_stop_writes <= self.l0_compaction_trigger {
            return bad(format!(
                "need 0 < l0_compaction_trigger ({}) < l0_stop_writes ({}), or writes could stall forever",
                self.l0_compaction_trigger, self.l0_stop_writes
            ));
        }
        if self.level_multiplier < 2 {
            return bad(format!("level_multiplier must be at least 2, not {}", self.level_multiplier));
        }
        if let Compression::Zstd(level) = self.compression {
            use crate::sstable::{ZSTD_LEVEL_MAX, ZSTD_LEVEL_MIN};
            if !(ZSTD_LEVEL_MIN..=ZSTD_LEVEL_MAX).contains(&level) {
                return bad(format!("zstd level {level} is outside {ZSTD_LEVEL_MIN}..={ZSTD_LEVEL_MAX}"));
            }
        }
        if self.async_sync_interval.is_zero() {
            return bad("async_sync_interval must be positive".into());
        }
        Ok(())
    }
}
