//! Opens and reads tables. The index and the filter are read and checked once at open and kept
//! in memory. Point reads get data blocks through the engine's SSD tier ([`super::ssd`]: the
//! block cache, then io_uring or pread, `O_DIRECT` where the file system takes it); sequential
//! reads (iterators) use buffered reads through the [`crate::fs::File`] trait.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::block::{Block, BlockIter, Bounds, EntryAt, ScanIter};
use super::bloom::{self, Bloom};
use super::ssd::{Prefetched, SsdTier};
use super::{
    block_crc, table_name, BlockHandle, Footer, BLOCK_TRAILER_BYTES, COMPRESSION_LZ4, COMPRESSION_NONE,
    COMPRESSION_ZSTD, FOOTER_BYTES,
};
use crate::coding::Reader;
use crate::fs::{File, Fs};
use crate::key;
use crate::limits::{BLOCK_BYTES_MAX, META_BLOCK_BYTES_MAX};
use crate::{Error, Result};

thread_local! {
    /// One zstd decompression context per thread: creating one per block costs more than the
    /// decompression itself.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// The block format bytes of a compressed payload (compression byte `ctype`, not 0), at most
/// `max` of them; the error says what is wrong with it.
fn decompress(ctype: u8, payload: &[u8], max: usize) -> std::result::Result<Vec<u8>, &'static str> {
    match ctype {
        COMPRESSION_ZSTD => {
            // Allocate exactly the frame's content size (the writer always records it).
            let n = match zstd::zstd_safe::get_frame_content_size(payload) {
                Ok(Some(n)) if n <= max as u64 => n as usize,
                _ => return Err("zstd block has no or an oversized content size"),
            };
            let mut out = Vec::with_capacity(n);
            let got = DECOMPRESSOR.with(|d| {
                let mut d = d.borrow_mut();
                if d.is_none() {
                    *d = zstd::bulk::Decompressor::new().ok();
                }
                d.as_mut().map(|d| d.decompress_to_buffer(payload, &mut out))
            });
            match got {
                Some(Ok(len)) if len == n => Ok(out),
                Some(_) => Err("zstd block does not decompress"),
                None => Err("zstd decompressor unavailable"),
            }
        }
        COMPRESSION_LZ4 => {
            let mut r = Reader::new(payload);
            let n = match r.uvarint() {
                Ok(n) if n <= max as u64 => n as usize,
                _ => return Err("lz4 block has no or an oversized content size"),
            };
            // The output is allocated at the content size and never grows past it.
            match lz4_flex::block::decompress(&payload[r.pos()..], n) {
                Ok(out) if out.len() == n => Ok(out),
                _ => Err("lz4 block does not decompress to its content size"),
            }
        }
        _ => Err("unknown block compression"),
    }
}

/// An open table.
#[derive(Debug)]
pub struct Table {
    file: Arc<dyn File>,
    path: PathBuf,
    number: u64,
    size: u64,
    index: Vec<(Vec<u8>, BlockHandle)>,
    filter: Bloom,
    tier: Option<Arc<SsdTier>>,
    /// This table's own descriptor for the SSD tier's reads (`O_DIRECT` if the tier says so).
    raw: Option<std::fs::File>,
    /// Bytes the index and filter hold in memory (fixed once the table is open).
    memory_bytes: u64,
}

impl Table {
    /// Opens table `number` in `dir`, checking its footer, index and filter.
    pub fn open(fs: &dyn Fs, dir: &Path, number: u64) -> Result<Arc<Table>> {
        Self::open_in(fs, dir, number, None)
    }

    /// Opens table `number`, reading data blocks for point reads through `tier`.
    pub fn open_in(fs: &dyn Fs, dir: &Path, number: u64, tier: Option<Arc<SsdTier>>) -> Result<Arc<Table>> {
        let path = dir.join(table_name(number));
        let file = fs.open(&path)?;
        let raw = match tier.as_ref().and_then(|t| t.wants_fd()) {
            Some(direct) => fs.open_raw(&path, direct)?,
            None => None,
        };
        Self::from_file(file, path, number, tier, raw)
    }

    /// Opens a table from an open file (and, for the SSD tier, a descriptor of its own).
    pub fn from_file(
        file: Arc<dyn File>,
        path: PathBuf,
        number: u64,
        tier: Option<Arc<SsdTier>>,
        raw: Option<std::fs::File>,
    ) -> Result<Arc<Table>> {
        let size = file.size()?;
        let corrupt = |offset: u64, what: &str| Error::corruption(&path, offset, what);
        if size < FOOTER_BYTES as u64 {
            return Err(corrupt(0, "file shorter than a table footer"));
        }
        let mut fb = [0u8; FOOTER_BYTES];
        let footer_at = size - FOOTER_BYTES as u64;
        file.read_exact_at(&mut fb, footer_at)?;
        let footer = Footer::decode(&fb).map_err(|w| corrupt(footer_at, w))?;
        let end_of =
            |h: BlockHandle| h.offset.checked_add(h.len).and_then(|e| e.checked_add(BLOCK_TRAILER_BYTES as u64));
        if end_of(footer.filter) != Some(footer.index.offset) || end_of(footer.index) != Some(footer_at) {
            return Err(corrupt(footer_at, "footer block handles do not tile the file"));
        }
        let mut t = Table {
            file,
            path: path.clone(),
            number,
            size,
            index: Vec::new(),
            filter: Bloom::parse(vec![0, 1]).map_err(|w| corrupt(0, w))?,
            tier,
            raw,
            memory_bytes: 0,
        };
        let filter_raw = t.read_block_raw(footer.filter, META_BLOCK_BYTES_MAX)?;
        t.filter = Bloom::parse(filter_raw).map_err(|w| corrupt(footer.filter.offset, w))?;
        let index_block =
            Block::parse_sized(t.read_block_raw(footer.index, META_BLOCK_BYTES_MAX)?, META_BLOCK_BYTES_MAX)
                .map_err(|w| corrupt(footer.index.offset, w))?;
        let mut next_offset = 0u64;
        for i in 0..index_block.len() {
            let mut r = Reader::new(index_block.value(i));
            let h = (|| -> std::result::Result<BlockHandle, &'static str> {
                let h = BlockHandle { offset: r.uvarint()?, len: r.uvarint()? };
                if !r.is_empty() {
                    return Err("trailing bytes in block handle");
                }
                Ok(h)
            })()
            .map_err(|w| corrupt(footer.index.offset, w))?;
            if h.offset != next_offset || h.len > BLOCK_BYTES_MAX as u64 {
                return Err(corrupt(footer.index.offset, "index handle out of place"));
            }
            next_offset = end_of(h).ok_or_else(|| corrupt(footer.index.offset, "index handle overflows"))?;
            t.index.push((index_block.key(i).to_vec(), h));
        }
        if next_offset != footer.filter.offset || t.index.is_empty() {
            return Err(corrupt(footer.index.offset, "index does not cover the data blocks"));
        }
        t.index.shrink_to_fit();
        let entry = std::mem::size_of::<(Vec<u8>, BlockHandle)>();
        let index: usize = t.index.iter().map(|(k, _)| k.capacity() + entry).sum();
        t.memory_bytes = (index + t.filter.memory_bytes()) as u64;
        Ok(Arc::new(t))
    }

    /// File number.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// Bytes this open table holds in memory: its index (keys and handles) and its filter.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }

    /// File size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of data blocks.
    pub fn block_count(&self) -> usize {
        self.index.len()
    }

    /// Handle of data block `i`.
    pub fn block_handle(&self, i: usize) -> BlockHandle {
        self.index[i].1
    }

    /// The descriptor the SSD tier reads this table's data blocks through, if it has one.
    pub fn raw_file(&self) -> Option<&std::fs::File> {
        self.raw.as_ref()
    }

    /// Where data block `i` is: its offset, and its length with the trailer.
    pub fn block_extent(&self, i: usize) -> (u64, usize) {
        let h = self.index[i].1;
        (h.offset, h.len as usize + BLOCK_TRAILER_BYTES)
    }

    fn read_block_raw(&self, h: BlockHandle, max: usize) -> Result<Vec<u8>> {
        let total = usize::try_from(h.len)
            .ok()
            .filter(|&l| l <= max)
            .ok_or_else(|| Error::corruption(&self.path, h.offset, "block too large"))?;
        let mut buf = vec![0u8; total + BLOCK_TRAILER_BYTES];
        self.file.read_exact_at(&mut buf, h.offset)?;
        self.check_block(h, buf, 0, max)
    }

    /// Checks and decompresses the block `h` whose bytes (payload and trailer) are in `buf`
    /// from `at`; returns the payload.
    fn check_block(&self, h: BlockHandle, mut buf: Vec<u8>, at: usize, max: usize) -> Result<Vec<u8>> {
        let corrupt = |what: &str| Error::corruption(&self.path, h.offset, what);
        let total = usize::try_from(h.len).ok().filter(|&l| l <= max).ok_or_else(|| corrupt("block too large"))?;
        let Some(bytes) = buf.get(at..at + total + BLOCK_TRAILER_BYTES) else {
            return Err(corrupt("block extends past the bytes read"));
        };
        let (payload, trailer) = bytes.split_at(total);
        let ctype = trailer[0];
        let crc = u32::from_le_bytes([trailer[1], trailer[2], trailer[3], trailer[4]]);
        if block_crc(h.offset, payload, ctype) != crc {
            return Err(corrupt("block checksum mismatch"));
        }
        if ctype == COMPRESSION_NONE {
            buf.truncate(at + total);
            buf.drain(..at);
            return Ok(buf);
        }
        decompress(ctype, payload, max).map_err(corrupt)
    }

    /// Data block `i` for a point read: read ahead, cached, or read through the SSD tier.
    pub fn read_block(&self, i: usize, pre: Option<&Prefetched>) -> Result<Arc<Block>> {
        let h = self.index[i].1;
        if let Some(b) = pre.and_then(|p| p.get(self.number, h.offset)) {
            return Ok(b);
        }
        let Some(tier) = &self.tier else { return self.load_block(i) };
        if let Some(b) = tier.cached(self.number, h.offset) {
            return Ok(b);
        }
        tier.read_round(&[(self, i)]).pop().unwrap_or_else(|| self.load_block(i))
    }

    /// Data block `i` for a sequential read: cached, or read with a buffered read (and then
    /// cached if `fill_cache`; without it, the cache's hits and misses are not counted either).
    pub fn read_block_seq(&self, i: usize, fill_cache: bool) -> Result<Arc<Block>> {
        let h = self.index[i].1;
        let cache = self.tier.as_ref().and_then(|t| t.cache());
        let cached =
            cache.and_then(|c| if fill_cache { c.get(self.number, h.offset) } else { c.peek(self.number, h.offset) });
        if let Some(b) = cached {
            return Ok(b);
        }
        let h = self.index[i].1;
        let b = self.parse_block(i, self.read_block_raw(h, BLOCK_BYTES_MAX)?, fill_cache)?;
        if let Some(c) = cache.filter(|_| fill_cache) {
            c.insert(self.number, h.offset, b.clone());
        }
        Ok(b)
    }

    /// The keys the index allows data block `i`.
    fn bounds(&self, i: usize) -> Bounds<'_> {
        Bounds { after: i.checked_sub(1).map(|p| self.index[p].0.as_slice()), last: &self.index[i].0 }
    }

    /// A corruption found in data block `i`.
    fn block_corrupt(&self, i: usize, what: &'static str) -> Error {
        Error::corruption(&self.path, self.index.get(i).map_or(0, |(_, h)| h.offset), what)
    }

    /// Reads, checks and parses data block `i` with a buffered read, bypassing the cache.
    pub fn load_block(&self, i: usize) -> Result<Arc<Block>> {
        let h = self.index[i].1;
        self.parse_block(i, self.read_block_raw(h, BLOCK_BYTES_MAX)?, true)
    }

    /// Checks and parses data block `i` from bytes the SSD tier read: payload and trailer in
    /// `buf` from `at`.
    pub(crate) fn finish_block(&self, i: usize, buf: Vec<u8>, at: usize) -> Result<Arc<Block>> {
        let h = self.index[i].1;
        self.parse_block(i, self.check_block(h, buf, at, BLOCK_BYTES_MAX)?, true)
    }

    /// Checks and parses data block `i`; `kept` if it may be cached (trimmed, see
    /// [`Block::parse`]).
    fn parse_block(&self, i: usize, payload: Vec<u8>, kept: bool) -> Result<Arc<Block>> {
        let h = self.index[i].1;
        let parsed = if kept { Block::parse(payload) } else { Block::parse_transient(payload) };
        let block = parsed
            .and_then(|b| b.check_bounds(self.bounds(i)).map(|()| b))
            .map_err(|w| Error::corruption(&self.path, h.offset, w))?;
        Ok(Arc::new(block))
    }

    /// False if no key with this `(entity, feature)` prefix is in the table.
    pub fn may_contain_prefix(&self, prefix: &[u8]) -> bool {
        self.filter.may_contain(bloom::hash(prefix))
    }

    /// Index of the first block whose last key is >= `target` (`block_count()` if none).
    pub fn block_for(&self, target: &[u8]) -> usize {
        self.index.partition_point(|(last, _)| last.as_slice() < target)
    }

    /// An iterator over the table; the blocks it reads are added to the block cache.
    pub fn iter(self: &Arc<Self>) -> TableIter {
        self.iter_filling(true)
    }

    /// An iterator over the table that adds the blocks it reads to the block cache only if
    /// `fill_cache` (compactions read each block once: caching them would only evict blocks
    /// readers want, and hold memory for nothing).
    pub fn iter_filling(self: &Arc<Self>, fill_cache: bool) -> TableIter {
        TableIter { table: self.clone(), block_idx: self.index.len(), cur: None, fill_cache }
    }

    /// The newest version visible to the as-of read `probe` (see [`key::Probe`]): the first
    /// visible key at or after its seek key, possibly in a later block. Blocks in `pre` are
    /// used without reading them.
    pub fn get_best(&self, probe: &key::Probe<'_>, pre: Option<&Prefetched>) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        if !self.may_contain_prefix(probe.prefix) {
            return Ok(None);
        }
        let mut bi = self.block_for(probe.seek);
        let mut first = true;
        while bi < self.index.len() {
            let mut it = BlockIter::new(self.read_block(bi, pre)?);
            if first {
                it.seek(probe.seek);
                first = false;
            }
            while it.valid() {
                match probe.judge(it.key()) {
                    crate::asof::Visibility::Stop => return Ok(None),
                    crate::asof::Visibility::Take => return Ok(Some((it.key().to_vec(), it.value().to_vec()))),
                    crate::asof::Visibility::Skip => it.next(),
                }
            }
            bi += 1;
        }
        Ok(None)
    }

    /// [`Table::get_best`] for many probes at once, in one forward pass: `probes` must be in
    /// ascending order of their seek keys (the pairs of one entity, by feature). For each probe
    /// that finds a version, calls `found(probe index, key, value)`. Moving from one probe to
    /// the next is a seek within the current block when the next seek key is in it, so a
    /// 50-feature lookup of an entity costs one index search, one block fetch and one bloom
    /// check per block the entity spans, not per feature.
    pub fn get_best_many(
        &self,
        probes: &[key::Probe<'_>],
        pre: Option<&Prefetched>,
        mut found: impl FnMut(usize, &[u8], &[u8]),
    ) -> Result<()> {
        let mut cur: Option<(usize, BlockIter)> = None;
        for (i, probe) in probes.iter().enumerate() {
            // The bloom filter only saves block reads: when the probe starts in the block at
            // hand, seeking in it is cheaper than the filter's cache misses.
            let in_current = cur.as_ref().is_some_and(|(bi, _)| probe.seek <= self.index[*bi].0.as_slice());
            if !in_current && !self.may_contain_prefix(probe.prefix) {
                continue;
            }
            let (mut bi, mut it) = match cur.take() {
                Some((bi, mut it)) if probe.seek <= self.index[bi].0.as_slice() => {
                    it.seek_forward(probe.seek);
                    (bi, it)
                }
                prev => {
                    let from = prev.map_or(0, |(bi, _)| bi);
                    let bi = from + self.index[from..].partition_point(|(last, _)| last.as_slice() < probe.seek);
                    if bi >= self.index.len() {
                        // Every later probe seeks further still.
                        return Ok(());
                    }
                    let mut it = BlockIter::new(self.read_block(bi, pre)?);
                    it.seek(probe.seek);
                    (bi, it)
                }
            };
            loop {
                if !it.valid() {
                    bi += 1;
                    if bi >= self.index.len() {
                        return Ok(());
                    }
                    it = BlockIter::new(self.read_block(bi, pre)?);
                    continue;
                }
                match probe.judge(it.key()) {
                    crate::asof::Visibility::Stop => break,
                    crate::asof::Visibility::Take => {
                        found(i, it.key(), it.value());
                        break;
                    }
                    crate::asof::Visibility::Skip => it.next(),
                }
            }
            cur = Some((bi, it));
        }
        Ok(())
    }

    /// The blocks `get_best_many` starts its probes in, for read-ahead: from the block of the
    /// first probe's seek key that the bloom filter admits to the block of the last one's.
    pub fn blocks_for_many(&self, probes: &[key::Probe<'_>]) -> std::ops::Range<usize> {
        let admits = |p: &&key::Probe<'_>| self.may_contain_prefix(p.prefix);
        let Some(first) = probes.iter().find(admits) else { return 0..0 };
        let last = probes.iter().rev().find(admits).unwrap_or(first);
        let lo = self.block_for(first.seek);
        let hi = (self.block_for(last.seek) + 1).min(self.index.len());
        lo..hi.max(lo)
    }

    /// Reads every block and checks every checksum and ordering; returns the entry count.
    pub fn verify(&self) -> Result<u64> {
        let mut n = 0u64;
        let mut prev: Option<Vec<u8>> = None;
        for i in 0..self.index.len() {
            let b = self.load_block(i)?;
            if let Some(p) = &prev {
                if b.key(0) <= p.as_slice() {
                    return Err(Error::corruption(
                        &self.path,
                        self.index[i].1.offset,
                        "keys not increasing across blocks",
                    ));
                }
            }
            prev = Some(b.key(b.len() - 1).to_vec());
            n += b.len() as u64;
        }
        Ok(n)
    }
}

/// A cursor over a table's entries in key order.
///
/// A cursor that does not fill the block cache reads the blocks it walks into from the start
/// with a [`ScanIter`] (unless the cache has them parsed already): each entry is decoded and
/// checked, against the block's bounds in the index too, as it is reached. A seek into a block
/// parses it whole.
#[derive(Debug, Clone)]
pub struct TableIter {
    table: Arc<Table>,
    block_idx: usize,
    cur: Option<Cursor>,
    fill_cache: bool,
}

/// A [`TableIter`]'s position in its current block.
#[derive(Debug, Clone)]
enum Cursor {
    Parsed(BlockIter),
    Scan(ScanIter),
}

impl Cursor {
    fn valid(&self) -> bool {
        match self {
            Cursor::Parsed(it) => it.valid(),
            Cursor::Scan(it) => it.valid(),
        }
    }
    fn key(&self) -> &[u8] {
        match self {
            Cursor::Parsed(it) => it.key(),
            Cursor::Scan(it) => it.key(),
        }
    }
    fn value(&self) -> &[u8] {
        match self {
            Cursor::Parsed(it) => it.value(),
            Cursor::Scan(it) => it.value(),
        }
    }
}

impl TableIter {
    /// Positions the cursor at the first entry of block `block_idx` or a later one. A scan
    /// (`from_start`, a cursor that does not fill the cache) decodes as it goes; otherwise the
    /// block is parsed whole.
    fn load(&mut self, from_start: bool) -> Result<()> {
        self.cur = None;
        while self.block_idx < self.table.index.len() {
            let i = self.block_idx;
            let cached = || {
                self.table.tier.as_ref().and_then(|t| t.cache()?.peek(self.table.number, self.table.index[i].1.offset))
            };
            let cur = match (from_start && !self.fill_cache).then(cached) {
                Some(None) => {
                    let raw = self.table.read_block_raw(self.table.index[i].1, BLOCK_BYTES_MAX)?;
                    let it = ScanIter::new(raw, Some(self.table.bounds(i)));
                    Cursor::Scan(it.map_err(|w| self.table.block_corrupt(i, w))?)
                }
                Some(Some(b)) => Cursor::Parsed(BlockIter::new(b)),
                None => Cursor::Parsed(BlockIter::new(self.table.read_block_seq(i, self.fill_cache)?)),
            };
            if cur.valid() {
                self.cur = Some(cur);
                return Ok(());
            }
            self.block_idx += 1;
        }
        Ok(())
    }

    /// Leaves the current block, which the cursor has walked to its end, for the next one.
    fn next_block(&mut self) -> Result<()> {
        self.block_idx += 1;
        self.load(true)
    }

    /// Moves to the first entry.
    pub fn seek_to_first(&mut self) -> Result<()> {
        self.block_idx = 0;
        self.load(true)
    }

    /// Moves to the first entry with key >= `target`. A seek forward inside the block under
    /// the cursor reuses it (forward seeks of a sort-merge read land there most of the time).
    pub fn seek(&mut self, target: &[u8]) -> Result<()> {
        let block = self.table.block_for(target);
        let here = block == self.block_idx;
        let (table, block_idx) = (&self.table, self.block_idx);
        match &mut self.cur {
            Some(c) if here && c.valid() && c.key() <= target => match c {
                // (A scan's forward seek decodes and checks every entry it passes.)
                Cursor::Parsed(it) => it.seek_forward(target),
                Cursor::Scan(it) => it.seek_forward(target).map_err(|w| table.block_corrupt(block_idx, w))?,
            },
            Some(Cursor::Parsed(it)) if here => it.seek(target),
            _ => {
                self.block_idx = block;
                self.load(false)?;
                if let Some(Cursor::Parsed(it)) = &mut self.cur {
                    it.seek(target);
                }
            }
        }
        if self.cur.as_ref().is_some_and(|c| !c.valid()) {
            self.next_block()?;
        }
        Ok(())
    }

    /// True while positioned at an entry.
    pub fn valid(&self) -> bool {
        self.cur.as_ref().is_some_and(Cursor::valid)
    }

    /// Current key (only while valid).
    pub fn key(&self) -> &[u8] {
        self.cur.as_ref().map_or(&[], Cursor::key)
    }

    /// Current value (only while valid).
    pub fn value(&self) -> &[u8] {
        self.cur.as_ref().map_or(&[], Cursor::value)
    }

    /// Calls `f` with each entry from the current one on, in order, until it returns false
    /// (the cursor stays at that entry; returns true) or the table runs out (returns false).
    /// One call walks many entries without a cursor step each.
    pub fn visit(&mut self, f: &mut impl FnMut(&[u8], &[u8], Option<EntryAt<'_>>) -> bool) -> Result<bool> {
        while let Some(c) = &mut self.cur {
            let (table, block_idx) = (&self.table, self.block_idx);
            let stopped = match c {
                Cursor::Parsed(it) => !it.visit(f),
                Cursor::Scan(it) => !it.visit(f).map_err(|w| table.block_corrupt(block_idx, w))?,
            };
            if stopped {
                return Ok(true);
            }
            self.next_block()?;
        }
        Ok(false)
    }

    /// Advances to the next entry.
    pub fn step(&mut self) -> Result<()> {
        if let Some(c) = &mut self.cur {
            let (table, block_idx) = (&self.table, self.block_idx);
            match c {
                Cursor::Parsed(it) => it.next(),
                Cursor::Scan(it) => it.advance().map_err(|w| table.block_corrupt(block_idx, w))?,
            }
            if !self.valid() {
                self.next_block()?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sstable::{Compression, ZSTD_LEVEL_DEFAULT};

    /// Bytes LZ4 shrinks.
    fn compressible() -> Vec<u8> {
        (0..4000u32).flat_map(|i| (i / 7).to_be_bytes()).collect()
    }

    /// `content size uvarint | LZ4 block`: `block` after a declared content size of `n`.
    fn lz4_payload(n: u64, block: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        crate::coding::put_uvarint(&mut p, n);
        p.extend_from_slice(block);
        p
    }

    #[test]
    fn an_lz4_payload_is_its_content_size_then_a_plain_lz4_block() {
        // Literal bytes: content size 12, then one LZ4 sequence of 12 literals (token 0xC0).
        let mut literal = vec![0x0c, 0xc0];
        literal.extend_from_slice(b"abcabcabcabc");
        assert_eq!(decompress(COMPRESSION_LZ4, &literal, 1 << 16).as_deref(), Ok(&b"abcabcabcabc"[..]));
        let raw = compressible();
        let p = lz4_payload(raw.len() as u64, &lz4_flex::block::compress(&raw));
        assert!(p.len() < raw.len() / 2, "compressible input shrinks");
        assert_eq!(decompress(COMPRESSION_LZ4, &p, 1 << 16), Ok(raw));
    }

    #[test]
    fn an_lz4_payload_that_disagrees_with_its_content_size_is_refused() {
        let raw = compressible();
        let block = lz4_flex::block::compress(&raw);
        let with_size = |n: u64| lz4_payload(n, &block);
        let n = raw.len() as u64;
        let (short, oversized) =
            ("lz4 block does not decompress to its content size", "lz4 block has no or an oversized content size");
        for (p, max, what) in [
            (with_size(n - 1), 1 << 16, short),
            (with_size(n + 1), 1 << 16, short),
            (with_size(0), 1 << 16, short),
            // The right size, but more than a block may hold.
            (with_size(n), raw.len() - 1, oversized),
            (Vec::new(), 1 << 16, oversized),
            (vec![0x80], 1 << 16, oversized),
        ] {
            assert_eq!(decompress(COMPRESSION_LZ4, &p, max), Err(what), "{p:x?}");
        }
        // Every truncation of the block is refused, never answered short or long.
        let full = with_size(n);
        for len in 0..full.len() {
            assert!(decompress(COMPRESSION_LZ4, &full[..len], 1 << 16).is_err(), "truncated to {len}");
        }
        assert_eq!(decompress(7, &full, 1 << 16), Err("unknown block compression"));
    }

    #[test]
    fn compression_settings_parse_and_print_back() {
        for (s, c) in [
            ("lz4", Compression::Lz4),
            ("none", Compression::None),
            ("zstd", Compression::Zstd(ZSTD_LEVEL_DEFAULT)),
            ("zstd:-7", Compression::Zstd(-7)),
            ("zstd:22", Compression::Zstd(22)),
        ] {
            assert_eq!(s.parse::<Compression>(), Ok(c));
            assert_eq!(c.to_string().parse::<Compression>(), Ok(c));
        }
        for bad in ["", "LZ4", "snappy", "zstd:", "zstd:x", "zstd:1.5"] {
            let e = bad.parse::<Compression>().expect_err(bad);
            assert_eq!(
                e,
                format!("unknown table compression {bad:?}: expected lz4, zstd, zstd:LEVEL (-7 to 22) or none")
            );
        }
        for (bad, level) in [("zstd:23", 23), ("zstd:-8", -8)] {
            let e = bad.parse::<Compression>().expect_err(bad);
            assert_eq!(e, format!("table compression {bad:?}: zstd level {level} is outside -7 to 22"));
        }
    }

    /// A table of `n` entities x 3 features x 4 times in 4 KiB blocks, in `fs` as table 1 of
    /// `/t` (bytes returned), and its keys.
    fn small_table(fs: &crate::fs::MemFs, n: u32) -> (Vec<u8>, Vec<Vec<u8>>) {
        use crate::types::{EventTime, FeatureId, SystemTime};
        let dir = Path::new("/t");
        let fs: Arc<dyn Fs> = Arc::new(fs.clone());
        let mut w = super::super::TableWriter::create(fs.clone(), dir, 1, 4096, Compression::Lz4).expect("create");
        let mut keys = Vec::new();
        for e in 0..n {
            for f in 0..3 {
                for t in (0..4).rev() {
                    let k = key::encode(format!("entity-{e:05}").as_bytes(), FeatureId(f), EventTime(t), SystemTime(1));
                    w.add(&k, format!("value {e} {f} {t}").as_bytes()).expect("add");
                    keys.push(k);
                }
            }
        }
        w.finish().expect("finish").expect("non-empty");
        let bytes = crate::fs::read_all(fs.open(&dir.join(table_name(1))).expect("open").as_ref()).expect("read");
        (bytes, keys)
    }

    /// Seeks `scan` and `parse` to `target` and checks that they read the same `steps` entries.
    fn assert_same_from(scan: &mut TableIter, parse: &mut TableIter, target: &[u8], steps: usize) {
        scan.seek(target).expect("seek");
        parse.seek(target).expect("seek");
        for _ in 0..steps {
            assert_eq!((scan.valid(), scan.key(), scan.value()), (parse.valid(), parse.key(), parse.value()));
            scan.step().expect("step");
            parse.step().expect("step");
        }
    }

    #[test]
    fn a_scanning_cursor_reads_and_seeks_as_a_parsing_one() {
        let fs = crate::fs::MemFs::new();
        let (_, keys) = small_table(&fs, 300);
        let t = Table::open(&fs, Path::new("/t"), 1).expect("open");
        assert!(t.block_count() > 10, "{} blocks", t.block_count());
        let (mut scan, mut parse) = (t.iter_filling(false), t.iter());
        scan.seek_to_first().expect("seek");
        parse.seek_to_first().expect("seek");
        assert!(matches!(scan.cur, Some(Cursor::Scan(_))) && matches!(parse.cur, Some(Cursor::Parsed(_))));
        let (all, parsed) = crate::fuzzing::walk(&mut parse, usize::MAX);
        assert!(parsed);
        assert_eq!(all.len(), keys.len());
        assert_eq!(crate::fuzzing::walk(&mut scan, usize::MAX), (all.clone(), true));
        // Visits hand out the same entries, stopping and resuming anywhere.
        scan.seek_to_first().expect("seek");
        let mut visited = Vec::new();
        while scan.valid() {
            let mut left = 7;
            scan.visit(&mut |k, v, _| {
                left -= 1;
                if left == 0 {
                    return false;
                }
                visited.push((k.to_vec(), v.to_vec()));
                true
            })
            .expect("visit");
            if scan.valid() {
                visited.push((scan.key().to_vec(), scan.value().to_vec()));
                scan.step().expect("step");
            }
        }
        assert_eq!(visited, all);
        // Seeks forward (within a scanned block and past it) and backward, then a few steps.
        let targets = [1000usize, 1001, 1003, 1100, 2000, 5, 3599, 3599, 0].map(|i| keys[i].clone());
        for (j, target) in targets.iter().enumerate() {
            let probe = if j % 2 == 0 { target.clone() } else { [target.as_slice(), b"\x00"].concat() };
            assert_same_from(&mut scan, &mut parse, &probe, 30);
        }
        scan.seek(b"\xff").expect("seek");
        assert!(!scan.valid());
    }

    /// `t` with its index entries replaced by `index` (its blocks and their checksums intact).
    fn with_index(t: &Table, index: Vec<(Vec<u8>, BlockHandle)>) -> Arc<Table> {
        Arc::new(Table {
            file: t.file.clone(),
            path: t.path.clone(),
            number: t.number,
            size: t.size,
            index,
            filter: t.filter.clone(),
            tier: None,
            raw: None,
            memory_bytes: t.memory_bytes,
        })
    }

    #[test]
    fn a_scanning_cursor_seeks_from_a_scanned_block_as_a_parsing_one() {
        let fs = crate::fs::MemFs::new();
        let (_, keys) = small_table(&fs, 300);
        let t = Table::open(&fs, Path::new("/t"), 1).expect("open");
        let pos = |k: &[u8]| keys.partition_point(|x| x.as_slice() < k);
        for b in 1..t.block_count() - 2 {
            // Into block b from its start (a scan), then: forward inside it, back inside it,
            // forward into the block after next, and past the end.
            let (first, last) = (pos(&t.index[b - 1].0) + 1, pos(&t.index[b].0));
            let next_next = pos(&t.index[b + 1].0) + 2;
            for target in [first + 1, last, first, first + (last - first) / 2, next_next, keys.len()] {
                let (mut scan, mut parse) = (t.iter_filling(false), t.iter());
                for it in [&mut scan, &mut parse] {
                    it.seek(&t.index[b - 1].0).expect("seek");
                    it.step().expect("step into block b");
                    assert_eq!(it.key(), keys[first].as_slice());
                    it.seek(&keys[first + 2]).expect("forward inside block b");
                }
                assert!(matches!(scan.cur, Some(Cursor::Scan(_))), "block {b} is scanned");
                let target = keys.get(target).map_or(b"\xff".to_vec(), Clone::clone);
                assert_same_from(&mut scan, &mut parse, &target, 3);
            }
        }
    }

    #[test]
    fn a_scanning_cursor_refuses_blocks_outside_their_index_bounds() {
        let fs = crate::fs::MemFs::new();
        let (_, keys) = small_table(&fs, 300);
        let t = Table::open(&fs, Path::new("/t"), 1).expect("open");
        let pos = |k: &[u8]| keys.partition_point(|x| x.as_slice() < k);
        let b = t.block_count() / 2;
        let last = pos(&t.index[b].0);
        // Block b's index entry lowered to its second-to-last key, then raised past its last
        // key (below block b + 1's first): every block still checks, only the bounds are off.
        let raised = [keys[last].as_slice(), b"\x00"].concat();
        for (entry, what, readable) in [
            (keys[last - 1].clone(), "block key after its index entry", last - 1),
            (raised, "block's last key differs from its index entry", last),
        ] {
            let mut index = t.index.clone();
            index[b].0 = entry.clone();
            let bad = with_index(&t, index);
            let mut scan = bad.iter_filling(false);
            scan.seek_to_first().expect("seek");
            let mut read = 0;
            let err = loop {
                assert!(scan.valid(), "the bad bounds went unnoticed");
                if let Err(e) = scan.step() {
                    break e;
                }
                read += 1;
            };
            assert!(err.to_string().contains(what), "{err}");
            assert!(matches!(err, Error::Corruption { .. }));
            // The keys up to the bound were handed out (`read` steps from key 0), nothing past it.
            assert_eq!(read, readable);
            assert!(!scan.valid());
            assert!(scan.step().is_err(), "the error stays");
            // A parsing cursor refuses the block too.
            let mut parse = bad.iter();
            assert!(parse.seek(&entry).is_err());
        }
        // Block b's place in the index pointing at block b - 1's bytes (their checksum holds:
        // it is seeded with the block's offset): its first key is not after block b - 1's.
        let mut index = t.index.clone();
        index[b].1 = index[b - 1].1;
        let bad = with_index(&t, index);
        let mut scan = bad.iter_filling(false);
        scan.seek(&t.index[b - 1].0).expect("block b - 1 is intact");
        let err = scan.step().expect_err("block b is refused");
        assert!(err.to_string().contains("block's first key is not after the previous block"), "{err}");
    }
}
