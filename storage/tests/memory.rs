//! The engine's memory figures against the heap it really holds: a counting allocator (this
//! test binary's global allocator) sees every live byte, so the figures a server budgets with
//! (`Stats`: memtables, hot tier, block cache, tables' indexes and filters) can be checked to
//! explain them.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use quiver_storage::{AsOf, Background, Db, Durability, EventTime, FeatureId, Options, Stats, Value, WriteBatch};

/// Counts the bytes of live allocations (by layout size) and passes them to the system
/// allocator.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to `System` with the caller's arguments unchanged; the counter
// only observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded as is (the caller upholds `alloc`'s contract).
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded as is (`ptr` came from `System` with this layout).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is (the caller upholds `realloc`'s contract).
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const ENTITIES: u64 = 20_000;
const FEATURES: u32 = 20;
const MIB: usize = 1 << 20;

fn entity(i: u64) -> Vec<u8> {
    format!("user-{i:08}").into_bytes()
}

fn load(db: &Db) {
    for chunk in 0..ENTITIES / 100 {
        let mut b = WriteBatch::new();
        for e in chunk * 100..(chunk + 1) * 100 {
            for f in 0..FEATURES {
                b.put(
                    &entity(e),
                    FeatureId(f),
                    EventTime(1_000_000 + e as i64),
                    Value::Float64(e as f64 + f64::from(f)),
                )
                .expect("put");
            }
        }
        db.write(b, Durability::Async).expect("write");
    }
}

fn counted(s: &Stats) -> usize {
    s.hot.bytes as usize
        + s.block_cache_bytes as usize
        + s.memtable_bytes
        + s.immutable_memtable_bytes
        + s.table_memory_bytes as usize
}

fn options() -> Options {
    Options {
        memtable_bytes: 4 * MIB,
        immutable_memtables_max: 1,
        // No hot tier: point reads go to tables, through the block cache.
        hot_tier_bytes: 0,
        block_cache_bytes: 64 * MIB,
        table_bytes: 2 << 20,
        direct_reads: false,
        background: Background::Inline,
        ..Options::default()
    }
}

/// One test, so no other test's allocations run while the heap is measured.
#[test]
fn the_engine_figures_explain_its_heap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let before = LIVE.load(Ordering::SeqCst);
    let db = Db::open(dir.path(), options()).expect("open");
    load(&db);
    db.flush().expect("flush");
    db.compact_all().expect("compact");
    let s = db.stats();
    assert!(s.flushes >= 2 && s.compactions >= 1, "the load must flush and compact: {s:?}");

    // The tables' indexes and filters are charged to the block cache's share.
    assert!(s.table_memory_bytes > 0);
    // (The cache splits its capacity among shards, so it may round by a few bytes.)
    let rest = 64 * MIB as u64 - s.table_memory_bytes;
    assert!(s.block_cache_capacity.abs_diff(rest) < 1024, "blocks may hold {rest} bytes: {s:?}");

    // Compactions read every block once: they do not fill the block cache.
    assert_eq!(s.block_cache_bytes, 0, "flushes and compactions left blocks in the cache: {s:?}");
    let live = LIVE.load(Ordering::SeqCst).saturating_sub(before);
    // (Figures above the heap are conservative: only a heap above the figures fails.)
    let idle = live.saturating_sub(counted(&s));
    assert!(idle < 2 * MIB, "{live} bytes live, the figures say {}: {s:?}", counted(&s));

    // Point reads fill the cache; what it says it holds is what its blocks hold.
    for e in (0..ENTITIES).step_by(7) {
        let v = db.value_at(&entity(e), FeatureId(3), AsOf::at(EventTime(i64::MAX))).expect("read");
        assert_eq!(v.and_then(|v| v.value), Some(Value::Float64(e as f64 + 3.0)));
    }
    let s = db.stats();
    assert!(s.block_cache_bytes > 4 * MIB as u64, "the reads must fill the cache: {s:?}");
    let live = LIVE.load(Ordering::SeqCst).saturating_sub(before);
    let unexplained = live.saturating_sub(counted(&s) + idle);
    assert!(
        unexplained * 20 < s.block_cache_bytes as usize,
        "the block cache says it holds {} bytes, but {unexplained} more are live",
        s.block_cache_bytes
    );
    drop(db);
}
