//! The SSD tier: how the data blocks of tables come off disk for point reads.
//!
//! Point reads (`Db::get`, `Db::multi_version_at`) read data blocks through one [`SsdTier`]
//! shared by every table of an engine. It holds the block cache and one of two backends,
//! chosen when the engine opens ([`IoBackend`]) and reported in [`crate::Stats`]:
//!
//! - **io_uring**: the blocks a batch lookup needs that are not cached are read in one
//!   submission ([`SsdTier::read_round`]; rounds of at most [`URING_ENTRIES`] reads) and waited
//!   for together, so a lookup of 100 entities costs one trip to the device at queue depth N
//!   instead of N trips at depth 1. Each thread makes its own ring on first use.
//! - **pread**: one `pread` per block, one after the other. Chosen when io_uring is unavailable
//!   (an old kernel, `kernel.io_uring_disabled`, a seccomp filter), when asked for, or when the
//!   file system hands out no file descriptors (the simulated file system of the tests).
//!
//! Both backends read with `O_DIRECT` when `Options::direct_reads` is set and the file system
//! accepts it (tried at open on the directory's `LOCK` file): the block cache is then the only
//! cache of point-read blocks, so memory stays inside the budget instead of being doubled by the
//! page cache, and a cold read costs what the device costs. A direct read covers the block
//! rounded out to [`DIRECT_IO_ALIGN`] on both ends, into a buffer aligned the same way.
//!
//! Scans, joins and compaction read tables sequentially with buffered reads instead
//! (`Table::read_block_seq`), where the kernel's readahead is what they want.
//!
//! Every block, whichever way it was read, is checked before it is used or cached: the crc
//! seeded with its offset, its decompressed size, its structure, and its last key against the
//! index. A read that fails is not kept; the read path reads that block again on its own, so the
//! error (naming the file and offset) reaches the caller exactly as a single read would report it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};

use super::block::Block;
use super::cache::BlockCache;
use super::reader::Table;
use crate::fs::Fs;
use crate::{Error, Result};

/// Alignment of `O_DIRECT` reads: offsets, lengths and buffers. 4096 covers devices with 512 B
/// and 4 KiB logical sectors.
pub const DIRECT_IO_ALIGN: usize = 4096;

/// Entries of each thread's io_uring submission queue: the most reads one submission carries.
/// A round with more reads is submitted in several submissions of this size.
pub const URING_ENTRIES: u32 = 256;

/// Which backend reads data blocks for point reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoBackend {
    /// io_uring when the kernel offers it, else pread.
    #[default]
    Auto,
    /// io_uring; opening fails if the kernel does not offer it.
    IoUring,
    /// pread, one block at a time.
    Pread,
}

impl std::str::FromStr for IoBackend {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(IoBackend::Auto),
            "io_uring" | "io-uring" | "uring" => Ok(IoBackend::IoUring),
            "pread" => Ok(IoBackend::Pread),
            _ => Err(format!("unknown I/O backend {s:?}: expected auto, io_uring or pread")),
        }
    }
}

/// The SSD tier's figures (see [`crate::Stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SsdStats {
    /// The backend in use: `"io_uring"` or `"pread"`.
    pub backend: &'static str,
    /// True if point reads bypass the page cache (`O_DIRECT`).
    pub direct: bool,
    /// Data blocks read from files for point reads since open.
    pub block_reads: u64,
    /// Rounds of reads (one submission, or one pread) since open.
    pub read_rounds: u64,
    /// Bytes read from files for point reads since open (aligned extents included).
    pub bytes_read: u64,
    /// How long a round of reads took lately, in µs (a moving average; 0 before the first):
    /// batch reads under a deadline skip table reads that would end after it.
    pub round_latency_us: u64,
}

/// The engine's SSD tier: the block cache and the backend that fills it.
#[derive(Debug)]
pub struct SsdTier {
    cache: Option<BlockCache>,
    uring: bool,
    direct: bool,
    fds: bool,
    block_reads: AtomicU64,
    read_rounds: AtomicU64,
    bytes_read: AtomicU64,
    /// How long recent rounds of reads took, in µs: a moving average (weight 1/8 for the newest).
    round_latency_us: AtomicU64,
    /// Test-only: each round first sleeps this long, in µs (a slow device).
    #[cfg(feature = "testing")]
    read_delay_us: AtomicU64,
}

/// Data blocks read ahead of a batch lookup, by (table number, block offset). Only blocks that
/// were read and checked are here.
#[derive(Debug, Default)]
pub struct Prefetched {
    blocks: HashMap<(u64, u64), Arc<Block>>,
}

impl Prefetched {
    /// The block at `offset` of table `table`, if it was read ahead.
    pub fn get(&self, table: u64, offset: u64) -> Option<Arc<Block>> {
        self.blocks.get(&(table, offset)).cloned()
    }
}

thread_local! {
    /// This thread's ring, made on first use. `None` after a ring failed; the next round
    /// makes a new one.
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// True if this kernel lets the process make a ring that can read files.
fn uring_available() -> std::result::Result<(), String> {
    let ring = IoUring::new(8).map_err(|e| format!("io_uring_setup failed: {e}"))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(|e| format!("io_uring probe failed: {e}"))?;
    if !probe.is_supported(opcode::Read::CODE) {
        return Err("io_uring has no read operation".into());
    }
    Ok(())
}

/// One read of a round: the aligned extent around a block, into an aligned buffer.
struct Io {
    fd: RawFd,
    /// Aligned file offset the read starts at.
    offset: u64,
    /// Aligned length.
    len: usize,
    /// Holds `len` bytes starting at `at`, which is aligned in memory.
    buf: Vec<u8>,
    at: usize,
    /// Bytes of the block (payload and trailer) start `skip` bytes after `at`, and are `need`
    /// bytes long.
    skip: usize,
    need: usize,
    done: std::io::Result<usize>,
}

impl Io {
    fn new(fd: RawFd, block_offset: u64, need: usize, align: usize) -> Io {
        let offset = block_offset - block_offset % align as u64;
        let skip = (block_offset - offset) as usize;
        let len = (skip + need).div_ceil(align) * align;
        let buf = vec![0u8; len + align];
        let at = buf.as_ptr().align_offset(align).min(align);
        Io { fd, offset, len, buf, at, skip, need, done: Ok(0) }
    }

    fn target(&mut self) -> &mut [u8] {
        &mut self.buf[self.at..self.at + self.len]
    }

    /// Reads with pread, retrying when interrupted.
    fn pread(&mut self, file: &std::fs::File) {
        let offset = self.offset;
        self.done = loop {
            match file.read_at(self.target(), offset) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
    }
}

impl SsdTier {
    /// Opens the tier for the engine in `dir` (whose `LOCK` file exists): picks the backend
    /// and finds out whether the file system takes `O_DIRECT`.
    pub fn open(fs: &dyn Fs, dir: &Path, backend: IoBackend, direct_reads: bool, cache_bytes: usize) -> Result<Self> {
        let probe_path = dir.join("LOCK");
        let mut direct = false;
        let mut fds = false;
        if direct_reads && fs.open_raw(&probe_path, true)?.is_some() {
            (direct, fds) = (true, true);
        } else if fs.open_raw(&probe_path, false)?.is_some() {
            fds = true;
        }
        let uring = match backend {
            IoBackend::Pread => false,
            IoBackend::Auto => fds && uring_available().is_ok(),
            IoBackend::IoUring => {
                if !fds {
                    return Err(Error::InvalidArgument(
                        "options: io_backend io_uring needs a file system with file descriptors".into(),
                    ));
                }
                uring_available()
                    .map_err(|w| Error::InvalidArgument(format!("options: io_backend io_uring is unavailable: {w}")))?;
                true
            }
        };
        if backend == IoBackend::Auto && fds && !uring {
            tracing::info!("io_uring is unavailable; data blocks are read with pread");
        }
        Ok(SsdTier {
            cache: (cache_bytes > 0).then(|| BlockCache::new(cache_bytes)),
            uring,
            direct,
            fds,
            block_reads: AtomicU64::new(0),
            read_rounds: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            round_latency_us: AtomicU64::new(0),
            #[cfg(feature = "testing")]
            read_delay_us: AtomicU64::new(0),
        })
    }

    /// Test-only: every round of reads first sleeps `delay`.
    #[cfg(feature = "testing")]
    pub fn set_read_delay(&self, delay: std::time::Duration) {
        self.read_delay_us.store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// True if tables should open a descriptor of their own for point reads, and whether it
    /// should be `O_DIRECT`.
    pub fn wants_fd(&self) -> Option<bool> {
        self.fds.then_some(self.direct)
    }

    /// True if reads go through io_uring (and a batch's reads are worth planning together).
    pub fn batches_reads(&self) -> bool {
        self.uring
    }

    /// The block cache.
    pub fn cache(&self) -> Option<&BlockCache> {
        self.cache.as_ref()
    }

    /// The tier's figures.
    pub fn stats(&self) -> SsdStats {
        SsdStats {
            backend: if self.uring { "io_uring" } else { "pread" },
            direct: self.direct,
            block_reads: self.block_reads.load(Ordering::Relaxed),
            read_rounds: self.read_rounds.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            round_latency_us: self.round_latency_us.load(Ordering::Relaxed),
        }
    }

    /// How long a round of reads took lately, in µs ([`SsdStats::round_latency_us`]).
    pub fn round_latency_us(&self) -> u64 {
        self.round_latency_us.load(Ordering::Relaxed)
    }

    /// The cached block at `offset` of table `table`.
    pub fn cached(&self, table: u64, offset: u64) -> Option<Arc<Block>> {
        self.cache.as_ref().and_then(|c| c.get(table, offset))
    }

    /// Reads data blocks `(table, block index)` in one round, checks them, adds them to the
    /// cache, and returns each one's result in order.
    pub fn read_round(&self, reads: &[(&Table, usize)]) -> Vec<Result<Arc<Block>>> {
        let align = if self.direct { DIRECT_IO_ALIGN } else { 1 };
        let mut ios = Vec::with_capacity(reads.len());
        for &(table, i) in reads {
            let (offset, need) = table.block_extent(i);
            ios.push(table.raw_file().map(|f| Io::new(std::os::fd::AsRawFd::as_raw_fd(f), offset, need, align)));
        }
        let mut with_fd: Vec<&mut Io> = ios.iter_mut().flatten().collect();
        let started = std::time::Instant::now();
        #[cfg(feature = "testing")]
        {
            let delay = self.read_delay_us.load(Ordering::Relaxed);
            if delay > 0 && !reads.is_empty() {
                std::thread::sleep(std::time::Duration::from_micros(delay));
            }
        }
        if !with_fd.is_empty() {
            self.read_rounds.fetch_add(if self.uring { 1 } else { with_fd.len() as u64 }, Ordering::Relaxed);
            if self.uring {
                if let Err(e) = uring_round(&mut with_fd) {
                    for io in with_fd.iter_mut() {
                        io.done = Err(std::io::Error::new(e.kind(), format!("io_uring: {e}")));
                    }
                }
            } else {
                let files: Vec<&std::fs::File> = reads.iter().filter_map(|(t, _)| t.raw_file()).collect();
                for (io, f) in with_fd.iter_mut().zip(files) {
                    io.pread(f);
                }
            }
        }
        if !reads.is_empty() {
            // Relaxed read-modify-write races between threads lose an update at worst.
            let took = started.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
            let old = self.round_latency_us.load(Ordering::Relaxed);
            let avg = if old == 0 { took } else { old - old / 8 + took / 8 };
            self.round_latency_us.store(avg, Ordering::Relaxed);
        }
        let mut out = Vec::with_capacity(reads.len());
        for (&(table, i), io) in reads.iter().zip(ios) {
            let block = match io {
                None => table.load_block(i),
                Some(mut io) => {
                    if matches!(io.done, Ok(n) if n < io.skip + io.need) {
                        // A short read (not expected from regular files); read again with pread.
                        if let Some(f) = table.raw_file() {
                            io.pread(f);
                        }
                    }
                    match io.done {
                        Ok(n) if n >= io.skip + io.need => {
                            self.bytes_read.fetch_add(io.len as u64, Ordering::Relaxed);
                            table.finish_block(i, io.buf, io.at + io.skip)
                        }
                        Ok(n) => Err(Error::corruption(
                            table.path(),
                            io.offset,
                            format!("short read: {n} of {} bytes", io.skip + io.need),
                        )),
                        Err(e) => Err(Error::io(table.path(), e)),
                    }
                }
            };
            self.block_reads.fetch_add(1, Ordering::Relaxed);
            if let (Ok(b), Some(c)) = (&block, &self.cache) {
                c.insert(table.number(), table.block_handle(i).offset, b.clone());
            }
            out.push(block);
        }
        out
    }

    /// Reads ahead, in one round, every block in `wanted` that is not cached; blocks that fail
    /// are left out (see the module docs).
    pub fn prefetch(&self, wanted: &[(&Table, usize)]) -> Prefetched {
        let mut pre = Prefetched::default();
        let mut seen = std::collections::HashSet::new();
        let mut reads = Vec::new();
        for &(t, i) in wanted {
            let off = t.block_handle(i).offset;
            if seen.insert((t.number(), off)) {
                match self.cached(t.number(), off) {
                    Some(b) => {
                        pre.blocks.insert((t.number(), off), b);
                    }
                    None => reads.push((t, i)),
                }
            }
        }
        for (&(t, i), r) in reads.iter().zip(self.read_round(&reads)) {
            if let Ok(b) = r {
                pre.blocks.insert((t.number(), t.block_handle(i).offset), b);
            }
        }
        pre
    }
}

/// Reads every `Io` through this thread's ring. On success each `Io` has its result in `done`.
/// On an error of the ring itself, the buffers of reads that may still be in flight are leaked
/// (they must outlive any write the kernel may yet make to them) and the ring is dropped.
fn uring_round(ios: &mut [&mut Io]) -> std::io::Result<()> {
    RING.with(|slot| {
        let mut slot = slot.borrow_mut();
        if slot.is_none() {
            *slot = Some(IoUring::new(URING_ENTRIES)?);
        }
        let Some(ring) = slot.as_mut() else { return Err(std::io::Error::other("no ring")) };
        for chunk in ios.chunks_mut(URING_ENTRIES as usize) {
            if let Err(e) = submit_and_reap(ring, chunk) {
                for io in chunk.iter_mut() {
                    std::mem::forget(std::mem::take(&mut io.buf));
                }
                *slot = None;
                return Err(e);
            }
        }
        Ok(())
    })
}

/// Pushes one read per `Io` (at most [`URING_ENTRIES`]), submits them together and waits until
/// every one has completed.
fn submit_and_reap(ring: &mut IoUring, chunk: &mut [&mut Io]) -> std::io::Result<()> {
    {
        let mut sq = ring.submission();
        for (i, io) in chunk.iter_mut().enumerate() {
            let len = u32::try_from(io.len).map_err(|_| std::io::Error::other("read too large"))?;
            let (fd, offset) = (io.fd, io.offset);
            let entry = opcode::Read::new(types::Fd(fd), io.target().as_mut_ptr(), len)
                .offset(offset)
                .build()
                .user_data(i as u64);
            // SAFETY: the entry points into `io.buf`, which stays allocated and unmoved (the
            // `Vec`'s heap buffer does not move with the `Io`) until this function has reaped
            // the entry's completion; if it returns early with an error, the caller leaks every
            // buffer of the chunk and drops the ring, so no write can land in freed memory. The
            // file descriptor belongs to a table the caller holds for the whole round.
            unsafe { sq.push(&entry) }.map_err(|_| std::io::Error::other("submission queue full"))?;
        }
    }
    let mut left = chunk.len();
    while left > 0 {
        match ring.submit_and_wait(left) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // The completion queue is full: reap below, then wait again.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) || e.raw_os_error() == Some(libc::EAGAIN) => {}
            Err(e) => return Err(e),
        }
        for cqe in ring.completion() {
            let Some(io) = usize::try_from(cqe.user_data()).ok().and_then(|i| chunk.get_mut(i)) else {
                return Err(std::io::Error::other("io_uring completion for an unknown read"));
            };
            let r = cqe.result();
            io.done = if r >= 0 { Ok(r as usize) } else { Err(std::io::Error::from_raw_os_error(-r)) };
            left -= 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::RealFs;
    use crate::key;
    use crate::sstable::{Compression, TableWriter};
    use crate::types::{EventTime, FeatureId, SystemTime};

    #[test]
    fn a_direct_read_covers_the_block_with_aligned_offset_length_and_buffer() {
        for (offset, need) in [(0u64, 1usize), (4095, 2), (4096, 4096), (5000, 16 << 10), (123_456_789, 777)] {
            let io = Io::new(0, offset, need, DIRECT_IO_ALIGN);
            assert_eq!(io.offset % DIRECT_IO_ALIGN as u64, 0);
            assert_eq!(io.len % DIRECT_IO_ALIGN, 0);
            assert_eq!(io.buf[io.at..].as_ptr() as usize % DIRECT_IO_ALIGN, 0);
            assert_eq!(io.offset + io.skip as u64, offset);
            assert!(io.skip + io.need <= io.len && io.len < io.skip + io.need + DIRECT_IO_ALIGN);
            assert!(io.at + io.len <= io.buf.len());
        }
        let io = Io::new(0, 5000, 100, 1);
        assert_eq!((io.offset, io.skip, io.len), (5000, 0, 100));
    }

    #[test]
    fn backend_names_parse_and_unknown_ones_are_refused() {
        assert_eq!("auto".parse::<IoBackend>(), Ok(IoBackend::Auto));
        assert_eq!("io_uring".parse::<IoBackend>(), Ok(IoBackend::IoUring));
        assert_eq!("pread".parse::<IoBackend>(), Ok(IoBackend::Pread));
        assert!("mmap".parse::<IoBackend>().is_err());
    }

    /// A round of more reads than a ring holds, through both backends, returns exactly the
    /// blocks a buffered read returns.
    #[test]
    fn rounds_larger_than_the_ring_read_every_block_like_a_buffered_read() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fs: Arc<dyn Fs> = Arc::new(RealFs);
        fs.lock_dir(tmp.path()).map(drop).expect("lock file");
        let mut w = TableWriter::create(fs.clone(), tmp.path(), 1, 64, Compression::Zstd(1)).expect("create");
        for i in 0..3000u32 {
            let k = key::encode(&i.to_be_bytes(), FeatureId(i % 7), EventTime(i64::from(i)), SystemTime(1));
            w.add(&k, &i.to_le_bytes().repeat(3)).expect("add");
        }
        w.finish().expect("finish");
        for backend in [IoBackend::IoUring, IoBackend::Pread] {
            let tier = Arc::new(SsdTier::open(fs.as_ref(), tmp.path(), backend, true, 0).expect("tier"));
            let t = Table::open_in(fs.as_ref(), tmp.path(), 1, Some(tier.clone())).expect("open");
            let n = t.block_count();
            assert!(n > 2 * URING_ENTRIES as usize, "{n} blocks");
            // Every block, in an order that is not the file's.
            let reads: Vec<(&Table, usize)> = (0..n).rev().map(|i| (t.as_ref(), i)).collect();
            let got = tier.read_round(&reads);
            for ((_, i), b) in reads.iter().zip(got) {
                let b = b.expect("block");
                let want = t.load_block(*i).expect("buffered");
                assert_eq!(
                    (b.len(), b.key(0), b.key(b.len() - 1)),
                    (want.len(), want.key(0), want.key(want.len() - 1))
                );
            }
            let s = tier.stats();
            assert_eq!(s.block_reads, n as u64);
            let rounds = if backend == IoBackend::Pread { n as u64 } else { 1 };
            assert_eq!(s.read_rounds, rounds, "{backend:?}");
        }
    }
}
