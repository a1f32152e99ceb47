//! The block cache: checked, decompressed, parsed blocks shared between readers, bounded by
//! bytes, with S3-FIFO-style admission (`quick_cache`) so that a one-off scan does not flush it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use quick_cache::sync::Cache;
use quick_cache::Weighter;

use super::block::Block;

#[derive(Debug, Clone, Copy)]
struct BlockWeighter;

impl Weighter<(u64, u64), Arc<Block>> for BlockWeighter {
    fn weight(&self, _key: &(u64, u64), val: &Arc<Block>) -> u64 {
        val.approximate_bytes().max(1) as u64
    }
}

/// A cache of parsed blocks keyed by (table number, block offset).
///
/// Its share of memory also holds the open tables' indexes and filters (which stay in memory
/// while a table is open): [`BlockCache::reserve`] gives blocks what those leave, and at least
/// [`BLOCKS_SHARE_MIN_DIVISOR`]th of the share.
#[derive(Debug)]
pub struct BlockCache {
    cache: Cache<(u64, u64), Arc<Block>, BlockWeighter>,
    /// The whole share, bytes.
    share: u64,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Typical parsed block size, used to size the cache's index.
const BLOCK_BYTES_TYPICAL: usize = 32 << 10;
/// Blocks keep at least this fraction (1/n) of the share, however much tables hold.
pub const BLOCKS_SHARE_MIN_DIVISOR: u64 = 16;

impl BlockCache {
    /// A cache holding about `bytes` of blocks.
    pub fn new(bytes: usize) -> Self {
        BlockCache {
            cache: Cache::with_weighter((bytes / BLOCK_BYTES_TYPICAL).max(16), bytes as u64, BlockWeighter),
            share: bytes as u64,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The cached block, if any.
    pub fn get(&self, table: u64, offset: u64) -> Option<Arc<Block>> {
        let b = self.cache.get(&(table, offset));
        match b {
            Some(_) => self.hits.fetch_add(1, Ordering::Relaxed),
            None => self.misses.fetch_add(1, Ordering::Relaxed),
        };
        b
    }

    /// The cached block, if any, without counting a hit or a miss (for compactions, which
    /// use a cached block but are not the readers the cache is for).
    pub fn peek(&self, table: u64, offset: u64) -> Option<Arc<Block>> {
        self.cache.peek(&(table, offset))
    }

    /// Adds a block.
    pub fn insert(&self, table: u64, offset: u64, block: Arc<Block>) {
        self.cache.insert((table, offset), block);
    }

    /// Sets aside `bytes` of the share for the open tables' indexes and filters: blocks get
    /// the rest (at least a [`BLOCKS_SHARE_MIN_DIVISOR`]th), evicting down to it.
    pub fn reserve(&self, bytes: u64) {
        let floor = (self.share / BLOCKS_SHARE_MIN_DIVISOR).max(1);
        self.cache.set_capacity(self.share.saturating_sub(bytes).max(floor));
    }

    /// Bytes blocks may hold now.
    pub fn capacity(&self) -> u64 {
        self.cache.capacity()
    }

    /// (hits, misses, bytes held).
    pub fn figures(&self) -> (u64, u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed), self.cache.weight())
    }
}
