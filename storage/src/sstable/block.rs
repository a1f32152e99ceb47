//! Data and index blocks: sorted entries with prefix-compressed keys and restart points.
//!
//! ```text
//! block   = entry* | restart u32 LE * n | n u32 LE
//! entry   = shared uvarint | unshared uvarint | value_len uvarint | key[shared..] | value
//! ```
//!
//! Every `BLOCK_RESTART_INTERVAL`-th entry is a restart point: it stores its whole key
//! (`shared = 0`) and its offset is listed in the trailer, so a seek binary-searches the
//! restart points and then scans at most one interval.
//!
//! A block is checked whole when it is loaded ([`Block::parse`]): lengths in range, restarts in
//! order and at entries with `shared = 0`, keys strictly increasing and structurally valid.
//! After that, iteration cannot fail.
//!
//! A pass that reads each entry once, in order, from a block that is not cached (a
//! compaction, a join) uses a [`ScanIter`] instead: it checks the block's frame when it is
//! loaded, then decodes one entry at a time into a single key buffer, copying only each key's
//! unshared bytes. Every entry it hands out has passed the checks [`Block::parse`] applies to
//! it, and lies within the bounds the table's index gives the block; the checks of the block as
//! a whole (its last key is its index entry, every restart point was reached) come when the scan
//! reaches its end. An error stays: the scan hands out nothing after it.

use std::sync::Arc;

use crate::coding::{put_uvarint, DecodeError, Reader};
use crate::key::{KeyRef, FEATURE_BYTES, TIME_SUFFIX_BYTES};
use crate::limits::BLOCK_BYTES_MAX;

/// How many times its own size a block's materialised keys may take (prefix compression of
/// long keys with tiny values reaches ~100x; a crafted block must not exhaust memory).
const KEYS_EXPANSION_MAX: usize = 256;

/// Builds one block.
#[derive(Debug, Default)]
pub struct BlockBuilder {
    buf: Vec<u8>,
    restarts: Vec<u32>,
    last_key: Vec<u8>,
    count: usize,
    restart_interval: usize,
}

impl BlockBuilder {
    /// A builder with the given restart interval.
    pub fn new(restart_interval: usize) -> Self {
        BlockBuilder { restart_interval: restart_interval.max(1), ..Default::default() }
    }

    /// Appends an entry; keys must be strictly increasing.
    pub fn add(&mut self, key: &[u8], value: &[u8]) {
        assert!(self.count == 0 || key > self.last_key.as_slice(), "block keys must increase");
        let shared = if self.count.is_multiple_of(self.restart_interval) {
            self.restarts.push(self.buf.len() as u32);
            0
        } else {
            key.iter().zip(&self.last_key).take_while(|(a, b)| a == b).count()
        };
        put_uvarint(&mut self.buf, shared as u64);
        put_uvarint(&mut self.buf, (key.len() - shared) as u64);
        put_uvarint(&mut self.buf, value.len() as u64);
        self.buf.extend_from_slice(&key[shared..]);
        self.buf.extend_from_slice(value);
        self.last_key.clear();
        self.last_key.extend_from_slice(key);
        self.count += 1;
    }

    /// Bytes the finished block would take.
    pub fn size_estimate(&self) -> usize {
        self.buf.len() + 4 * self.restarts.len() + 4
    }

    /// Entries added.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True if no entry was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The last key added.
    pub fn last_key(&self) -> &[u8] {
        &self.last_key
    }

    /// Finishes the block and resets the builder.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.buf);
        if self.restarts.is_empty() {
            self.restarts.push(0);
        }
        for r in &self.restarts {
            out.extend_from_slice(&r.to_le_bytes());
        }
        out.extend_from_slice(&(self.restarts.len() as u32).to_le_bytes());
        self.restarts.clear();
        self.last_key.clear();
        self.count = 0;
        out
    }
}

/// Checks a block's frame: its size, and restart points in order inside its entries, the first
/// at 0. Returns where the entries end (the restart array begins) and the number of restarts.
fn frame(data: &[u8], max: usize) -> Result<(usize, usize), DecodeError> {
    if data.len() > max || data.len() < 4 {
        return Err("block size out of range");
    }
    let n = data.len();
    let nrestarts = u32::from_le_bytes([data[n - 4], data[n - 3], data[n - 2], data[n - 1]]) as usize;
    if nrestarts == 0 || nrestarts > (n - 4) / 4 {
        return Err("bad restart count");
    }
    let entries_end = n - 4 - 4 * nrestarts;
    let mut prev = None;
    for j in 0..nrestarts {
        let x = restart(data, entries_end, j);
        if prev.map_or(x != 0, |p| p >= x) || x > entries_end {
            return Err("restart points out of order");
        }
        prev = Some(x);
    }
    Ok((entries_end, nrestarts))
}

/// Restart point `j` of a block whose entries end at `entries_end` (`j` below the count that
/// [`frame`] returned).
fn restart(data: &[u8], entries_end: usize, j: usize) -> usize {
    let at = entries_end + 4 * j;
    u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize
}

/// Checks an entry's key against the previous key of its block, `prev`: the entry keeps
/// `shared` (at most `prev.len()`) of its bytes and adds `tail`. Returns whether the key is as
/// long as `prev` and shares its entity part (the escaped entity and terminator), which was
/// checked: only its length matters to [`KeyRef::parse`] then, so its byte-by-byte scan of the
/// entity can be skipped.
#[inline]
fn follows(prev: &[u8], shared: usize, tail: &[u8]) -> Result<bool, DecodeError> {
    // The key equals `prev` up to `shared`; it is greater iff its first unshared byte is
    // greater, or it extends `prev`. Only when the writer under-reported the shared prefix is
    // a full comparison needed.
    let greater = match (tail.first(), prev.get(shared)) {
        (Some(_), None) => true,
        (Some(a), Some(b)) if a != b => a > b,
        (None, _) => false,
        _ => tail > &prev[shared..],
    };
    if !greater {
        return Err("block keys not increasing");
    }
    let n = prev.len();
    Ok(shared + tail.len() == n && shared + FEATURE_BYTES + TIME_SUFFIX_BYTES >= n)
}

/// The keys a table's index allows one of its data blocks: after the previous block's last key
/// (none for the first block), up to the block's own last key, which must be its last entry's.
#[derive(Debug, Clone, Copy)]
pub struct Bounds<'a> {
    /// The previous block's index entry (its last key).
    pub after: Option<&'a [u8]>,
    /// This block's index entry: its last key.
    pub last: &'a [u8],
}

/// A block whose first key is not after the previous block's last.
const FIRST_KEY_NOT_AFTER: DecodeError = "block's first key is not after the previous block";
/// A block whose last key is not its index entry.
const LAST_KEY_NOT_INDEXED: DecodeError = "block's last key differs from its index entry";

/// Where a visited table entry lies, for a reader that keeps its value without copying it
/// (it holds `bytes` and takes the range `value`).
#[derive(Debug, Clone, Copy)]
pub struct EntryAt<'a> {
    /// The bytes of the block the entry is in.
    pub bytes: &'a Arc<Vec<u8>>,
    /// The value's range in `bytes`.
    pub value: (u32, u32),
    /// The entry's key is as long as the previous entry's of the same block and shares its
    /// entity part (the escaped entity and terminator), which was checked: a reader that
    /// checked that entry's entity need not compare this one's. False for a block's first.
    pub shares_entity: bool,
}

/// One entry's location inside a block's data.
#[derive(Debug, Clone, Copy)]
struct EntryPos {
    value_start: u32,
    value_end: u32,
    /// The key has the previous entry's entity part and length (see [`EntryAt::shares_entity`]).
    same_entity: bool,
}

/// A loaded, checked block. Keys are materialised once at load (prefix compression undone) so
/// that iterators hand out slices.
#[derive(Debug)]
pub struct Block {
    keys: Vec<u8>,
    /// The block's bytes (values are ranges of them), shared with readers that keep values
    /// (see [`EntryAt`]).
    data: Arc<Vec<u8>>,
    entries: Vec<EntryPos>,
    key_ends: Vec<u32>,
}

impl Block {
    /// Parses and checks a data block, its buffers trimmed to what they hold (for blocks
    /// that may be cached: the cache counts capacities).
    pub fn parse(data: Vec<u8>) -> Result<Block, DecodeError> {
        Self::parse_sized(data, BLOCK_BYTES_MAX)
    }

    /// [`Block::parse`] without trimming the buffers: for a block read once and dropped (a
    /// pass that reads around the cache), where trimming is a reallocation and a copy for
    /// nothing.
    pub fn parse_transient(data: Vec<u8>) -> Result<Block, DecodeError> {
        Self::parse_with(data, BLOCK_BYTES_MAX, false)
    }

    /// Parses and checks a block of at most `max` bytes (index blocks may exceed a data
    /// block), trimmed.
    pub fn parse_sized(data: Vec<u8>, max: usize) -> Result<Block, DecodeError> {
        Self::parse_with(data, max, true)
    }

    fn parse_with(data: Vec<u8>, max: usize, trim: bool) -> Result<Block, DecodeError> {
        let (entries_end, nrestarts) = frame(&data, max)?;
        // Materialised keys are longer than their prefix-compressed form; reserve for that.
        // (Estimates only; an entry takes at least 3 bytes, so `entries_end / 3` bounds the count.)
        let estimate = (nrestarts * crate::limits::BLOCK_RESTART_INTERVAL).min(entries_end / 3 + 1);
        let mut keys: Vec<u8> = Vec::with_capacity(entries_end * 2);
        let mut key_ends = Vec::with_capacity(estimate);
        let mut entries = Vec::with_capacity(estimate);
        let mut r = Reader::new(&data[..entries_end]);
        let mut next_restart = 0;
        let mut prev: Option<(usize, usize)> = None;
        while !r.is_empty() {
            let off = r.pos();
            let next = (next_restart < nrestarts).then(|| restart(&data, entries_end, next_restart));
            let at_restart = next == Some(off);
            if next.is_some_and(|x| x < off) {
                return Err("restart point inside an entry");
            }
            let shared = r.len(max)?;
            let unshared = r.len(max)?;
            let vlen = r.len(max)?;
            if at_restart {
                next_restart += 1;
                if shared != 0 {
                    return Err("restart entry shares a prefix");
                }
            }
            let prev_key = prev.map_or(&[][..], |(ps, pe)| &keys[ps..pe]);
            if shared > prev_key.len() {
                return Err("shared prefix longer than previous key");
            }
            let tail = r.bytes(unshared)?;
            let value_start = r.pos();
            r.bytes(vlen)?;
            let same_entity = if prev.is_some() { follows(prev_key, shared, tail)? } else { false };
            let start = keys.len();
            if let Some((ps, _)) = prev {
                keys.extend_from_within(ps..ps + shared);
            }
            keys.extend_from_slice(tail);
            if keys.len() > KEYS_EXPANSION_MAX * data.len() {
                return Err("block keys expand beyond the limit");
            }
            let end = keys.len();
            if !same_entity && KeyRef::parse(&keys[start..end]).is_none() {
                return Err("malformed key in block");
            }
            entries.push(EntryPos { value_start: value_start as u32, value_end: r.pos() as u32, same_entity });
            key_ends.push(end as u32);
            prev = Some((start, end));
        }
        if next_restart != nrestarts {
            return Err("restart point past the last entry");
        }
        if entries.is_empty() {
            return Err("empty block");
        }
        // The reservations above are estimates; a cached block holds only what it uses.
        if trim {
            keys.shrink_to_fit();
            entries.shrink_to_fit();
            key_ends.shrink_to_fit();
        }
        Ok(Block { keys, data: Arc::new(data), entries, key_ends })
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Memory held by the parsed block (what its buffers reserve, and its header).
    pub fn approximate_bytes(&self) -> usize {
        self.keys.capacity()
            + self.data.capacity()
            + self.entries.capacity() * std::mem::size_of::<EntryPos>()
            + self.key_ends.capacity() * std::mem::size_of::<u32>()
            + std::mem::size_of::<Self>()
    }

    /// True if the block has no entry (never, for a parsed block).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The key of entry `i`.
    pub fn key(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.key_ends[i - 1] as usize };
        &self.keys[start..self.key_ends[i] as usize]
    }

    /// The value of entry `i`.
    pub fn value(&self, i: usize) -> &[u8] {
        let e = self.entries[i];
        &self.data[e.value_start as usize..e.value_end as usize]
    }

    /// Where entry `i` lies, for a reader that keeps its value.
    pub fn entry_at(&self, i: usize) -> EntryAt<'_> {
        let e = self.entries[i];
        EntryAt { bytes: &self.data, value: (e.value_start, e.value_end), shares_entity: e.same_entity }
    }

    /// Checks that the block's keys lie within `bounds`.
    pub fn check_bounds(&self, bounds: Bounds<'_>) -> Result<(), DecodeError> {
        if bounds.after.is_some_and(|after| self.key(0) <= after) {
            return Err(FIRST_KEY_NOT_AFTER);
        }
        if self.key(self.len() - 1) != bounds.last {
            return Err(LAST_KEY_NOT_INDEXED);
        }
        Ok(())
    }

    /// Index of the first entry with key >= `target` (`len()` if none).
    pub fn seek(&self, target: &[u8]) -> usize {
        self.seek_from(0, target)
    }

    /// Index of the first entry at or after `from` with key >= `target` (`len()` if none).
    pub fn seek_from(&self, from: usize, target: &[u8]) -> usize {
        let (mut lo, mut hi) = (from.min(self.len()), self.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.key(mid) < target {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }
}

/// A cursor over a shared block.
#[derive(Debug, Clone)]
pub struct BlockIter {
    block: Arc<Block>,
    i: usize,
}

impl BlockIter {
    /// A cursor at the first entry.
    pub fn new(block: Arc<Block>) -> Self {
        BlockIter { block, i: 0 }
    }
    /// Calls `f` with each entry from the current one on (its key, its value, and where it
    /// lies, for a caller that keeps the value without copying it), until it
    /// returns false (the cursor stays at that entry; returns false) or the block runs out
    /// (returns true).
    #[inline]
    pub fn visit(&mut self, f: &mut impl FnMut(&[u8], &[u8], Option<EntryAt<'_>>) -> bool) -> bool {
        let b = &self.block;
        while self.i < b.len() {
            if !f(b.key(self.i), b.value(self.i), Some(b.entry_at(self.i))) {
                return false;
            }
            self.i += 1;
        }
        true
    }

    /// Moves to the first entry >= `target`.
    pub fn seek(&mut self, target: &[u8]) {
        self.i = self.block.seek(target);
    }
    /// Moves to the first entry >= `target` at or after the current one.
    pub fn seek_forward(&mut self, target: &[u8]) {
        self.i = self.block.seek_from(self.i, target);
    }
    /// True while positioned at an entry.
    pub fn valid(&self) -> bool {
        self.i < self.block.len()
    }
    /// Current key.
    pub fn key(&self) -> &[u8] {
        self.block.key(self.i)
    }
    /// Current value.
    pub fn value(&self) -> &[u8] {
        self.block.value(self.i)
    }
    /// Advances.
    pub fn next(&mut self) {
        self.i += 1;
    }
}

/// A cursor that decodes a block's entries one at a time, in order, checking each as
/// [`Block::parse`] would before handing it out (see the module doc). It holds one key: only
/// each entry's unshared bytes are copied. It moves forward only, and can fail where a
/// [`BlockIter`] cannot; after an error it is not valid, and every later step returns it again.
#[derive(Debug, Clone)]
pub struct ScanIter {
    data: Arc<Vec<u8>>,
    entries_end: usize,
    nrestarts: usize,
    /// The next restart point that an entry must start at, and its index.
    next_restart: usize,
    next_restart_off: usize,
    /// Where the next entry starts.
    pos: usize,
    /// The current (or, once the block ran out, the last) entry.
    key: Vec<u8>,
    value: (u32, u32),
    shares_entity: bool,
    valid: bool,
    /// The bytes of the keys decoded so far (the limit [`Block::parse`] puts on them).
    key_bytes: usize,
    /// The block's last key by the index, and how long a prefix the current key shares with
    /// it: the current key is below it (or equal) at that byte.
    last: Option<Vec<u8>>,
    last_common: usize,
    /// The error the scan stopped at.
    failed: Option<DecodeError>,
}

impl ScanIter {
    /// Checks `data`'s frame and decodes its first entry; with `bounds`, every key is checked
    /// against them.
    pub fn new(data: Vec<u8>, bounds: Option<Bounds<'_>>) -> Result<ScanIter, DecodeError> {
        let (entries_end, nrestarts) = frame(&data, BLOCK_BYTES_MAX)?;
        let mut it = ScanIter {
            entries_end,
            nrestarts,
            next_restart: 0,
            next_restart_off: 0,
            pos: 0,
            key: Vec::with_capacity(64),
            value: (0, 0),
            shares_entity: false,
            valid: true,
            key_bytes: 0,
            last: bounds.map(|b| b.last.to_vec()),
            last_common: 0,
            failed: None,
            data: Arc::new(data),
        };
        it.advance()?;
        if !it.valid {
            return Err("empty block");
        }
        if bounds.and_then(|b| b.after).is_some_and(|after| it.key.as_slice() <= after) {
            return Err(FIRST_KEY_NOT_AFTER);
        }
        Ok(it)
    }

    /// True while positioned at an entry.
    pub fn valid(&self) -> bool {
        self.valid
    }

    /// The current key; once the block ran out, its last key (after an error, the key refused
    /// or a part of it).
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// The current value.
    pub fn value(&self) -> &[u8] {
        &self.data[self.value.0 as usize..self.value.1 as usize]
    }

    /// Decodes the next entry (or runs out at the block's end).
    pub fn advance(&mut self) -> Result<(), DecodeError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let r = self.decode();
        if let Err(e) = r {
            self.valid = false;
            self.failed = Some(e);
        }
        r
    }

    #[inline]
    fn decode(&mut self) -> Result<(), DecodeError> {
        let off = self.pos;
        if off == self.entries_end {
            if self.next_restart != self.nrestarts {
                return Err("restart point past the last entry");
            }
            if self.last.as_ref().is_some_and(|last| *last != self.key) {
                return Err(LAST_KEY_NOT_INDEXED);
            }
            self.valid = false;
            return Ok(());
        }
        let data = &self.data[..self.entries_end];
        let at_restart = self.next_restart < self.nrestarts && self.next_restart_off == off;
        if self.next_restart < self.nrestarts && self.next_restart_off < off {
            return Err("restart point inside an entry");
        }
        // Three one-byte lengths are the common case (short key suffixes, small cells).
        let (shared, unshared, vlen, head) = match &data[off..] {
            [a, b, c, ..] if (a | b | c) < 0x80 => (usize::from(*a), usize::from(*b), usize::from(*c), 3),
            rest => {
                let mut r = Reader::new(rest);
                (r.len(BLOCK_BYTES_MAX)?, r.len(BLOCK_BYTES_MAX)?, r.len(BLOCK_BYTES_MAX)?, r.pos())
            }
        };
        if at_restart {
            self.next_restart += 1;
            if self.next_restart < self.nrestarts {
                self.next_restart_off = restart(&self.data, self.entries_end, self.next_restart);
            }
            if shared != 0 {
                return Err("restart entry shares a prefix");
            }
        }
        if shared > self.key.len() {
            return Err("shared prefix longer than previous key");
        }
        // (Each length is at most BLOCK_BYTES_MAX: no overflow.)
        let value_start = off + head + unshared;
        let end = value_start + vlen;
        if end > data.len() {
            return Err("truncated field");
        }
        let tail = &data[off + head..value_start];
        self.shares_entity = off != 0 && follows(&self.key, shared, tail)?;
        self.key.truncate(shared);
        self.key.extend_from_slice(tail);
        self.key_bytes += self.key.len();
        if self.key_bytes > KEYS_EXPANSION_MAX * self.data.len() {
            return Err("block keys expand beyond the limit");
        }
        if !self.shares_entity && KeyRef::parse(&self.key).is_none() {
            return Err("malformed key in block");
        }
        if let Some(last) = &self.last {
            // The previous key equals `last` up to `last_common` and is below it at that
            // byte; a key that keeps more than that of it is below it too. Otherwise only its
            // bytes from `shared` on need comparing.
            if shared <= self.last_common {
                let rest = &last[shared.min(last.len())..];
                let common = tail.iter().zip(rest).take_while(|(a, b)| a == b).count();
                if tail.get(common).is_some_and(|&a| rest.get(common).is_none_or(|&b| a > b)) {
                    return Err("block key after its index entry");
                }
                self.last_common = shared + common;
            }
        }
        self.pos = end;
        self.value = (value_start as u32, end as u32);
        self.valid = true;
        Ok(())
    }

    /// Moves to the first entry >= `target` at or after the current one.
    pub fn seek_forward(&mut self, target: &[u8]) -> Result<(), DecodeError> {
        while self.valid && self.key.as_slice() < target {
            self.advance()?;
        }
        Ok(())
    }

    /// As [`BlockIter::visit`]; fails on the first entry that does not decode.
    #[inline]
    pub fn visit(
        &mut self,
        f: &mut impl FnMut(&[u8], &[u8], Option<EntryAt<'_>>) -> bool,
    ) -> Result<bool, DecodeError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        while self.valid {
            let at = EntryAt { bytes: &self.data, value: self.value, shares_entity: self.shares_entity };
            if !f(&self.key, &self.data[self.value.0 as usize..self.value.1 as usize], Some(at)) {
                return Ok(false);
            }
            self.advance()?;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::encode;
    use crate::types::{EventTime, FeatureId, SystemTime};

    fn keys(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                encode(format!("entity{:04}", i / 3).as_bytes(), FeatureId(i as u32 % 3), EventTime(5), SystemTime(1))
            })
            .collect()
    }

    /// A block of `entries` (key, value) with restart interval `restart`.
    fn block_of<K: AsRef<[u8]>, V: AsRef<[u8]>>(entries: impl IntoIterator<Item = (K, V)>, restart: usize) -> Vec<u8> {
        let mut b = BlockBuilder::new(restart);
        for (k, v) in entries {
            b.add(k.as_ref(), v.as_ref());
        }
        b.finish()
    }

    #[test]
    fn build_parse_seek() {
        let ks = keys(100);
        let mut b = BlockBuilder::new(16);
        for (i, k) in ks.iter().enumerate() {
            b.add(k, format!("v{i}").as_bytes());
        }
        let blk = Block::parse(b.finish()).expect("parses");
        assert_eq!(blk.len(), 100);
        for (i, k) in ks.iter().enumerate() {
            assert_eq!(blk.key(i), k.as_slice());
            assert_eq!(blk.value(i), format!("v{i}").as_bytes());
            assert_eq!(blk.seek(k), i);
        }
        assert_eq!(blk.seek(b"\xff"), 100);
        assert_eq!(blk.seek(b""), 0);
    }

    #[test]
    fn every_truncation_and_flip_is_rejected_or_consistent() {
        let raw = block_of(keys(40).into_iter().map(|k| (k, b"x")), 4);
        for cut in 0..raw.len() {
            assert!(Block::parse(raw[..cut].to_vec()).is_err(), "cut at {cut}");
        }
        for i in 0..raw.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = raw.clone();
                bad[i] ^= bit;
                if let Ok(blk) = Block::parse(bad) {
                    // A flip that still parses must leave a block whose keys are ordered and
                    // well formed.
                    for j in 0..blk.len() {
                        assert!(KeyRef::parse(blk.key(j)).is_some(), "flip {i}/{bit}: key {j} malformed");
                        assert!(j == 0 || blk.key(j - 1) < blk.key(j));
                    }
                }
            }
        }
    }

    #[test]
    fn a_malformed_key_after_a_valid_one_of_the_same_length_is_rejected() {
        // Same length as the first key, sharing less than its entity part: the entity part
        // must be checked (a stray zero byte is not an escape).
        let good = encode(b"entity01", FeatureId(1), EventTime(5), SystemTime(1));
        let mut bad = good.clone();
        bad[7] = 0x00;
        bad[6] = b'z';
        assert_eq!(bad.len(), good.len());
        assert!(KeyRef::parse(&bad).is_none());
        assert_eq!(Block::parse(block_of([(&good, b"x"), (&bad, b"y")], 16)).err(), Some("malformed key in block"));
        // Sharing the whole entity part and as long: the shortcut applies, and is right.
        let next = encode(b"entity01", FeatureId(2), EventTime(5), SystemTime(1));
        assert!(Block::parse(block_of([(&good, b"x"), (&next, b"y")], 16)).is_ok());
    }

    #[test]
    fn a_transient_parse_is_the_same_block_untrimmed() {
        let raw = block_of(keys(50).into_iter().map(|k| (k, b"v")), 16);
        let (kept, once) = (Block::parse(raw.clone()).expect("parses"), Block::parse_transient(raw).expect("parses"));
        assert_eq!(kept.len(), once.len());
        for i in 0..kept.len() {
            assert_eq!((kept.key(i), kept.value(i)), (once.key(i), once.value(i)));
        }
        assert!(kept.approximate_bytes() < once.approximate_bytes(), "only the kept block is trimmed");
    }

    #[test]
    fn shares_entity_marks_exactly_the_entries_whose_entity_part_is_the_previous_ones() {
        // Entities of the same length next to each other, a longer and a shorter one, and an
        // entity that extends the previous one's bytes; restarts every 4 entries.
        let entities: [&[u8]; 6] = [b"ab", b"ab", b"ac", b"abc", b"abc", b"b"];
        let mut ks: Vec<Vec<u8>> = Vec::new();
        for (i, e) in entities.iter().enumerate() {
            for f in 0..3 {
                ks.push(encode(e, FeatureId(f), EventTime(i as i64), SystemTime(1)));
            }
        }
        ks.sort();
        ks.dedup();
        let b = Block::parse(block_of(ks.iter().map(|k| (k, b"v")), 4)).expect("parses");
        for i in 0..b.len() {
            let entity = |j: usize| crate::key::KeyRef::parse(b.key(j)).expect("key").entity_prefix().to_vec();
            let want = i % 4 != 0 && entity(i) == entity(i - 1);
            assert_eq!(b.entry_at(i).shares_entity, want, "entry {i}");
        }
        assert!(
            (0..b.len()).any(|i| b.entry_at(i).shares_entity) && (1..b.len()).any(|i| !b.entry_at(i).shares_entity)
        );
    }

    /// A block entry as a test sees it: key, value, and whether it shares its entity part.
    type Entry = (Vec<u8>, Vec<u8>, bool);

    /// Every entry a scan of `raw` hands out (key, value, shares_entity), or its first error.
    fn scan_all(raw: Vec<u8>) -> Result<Vec<Entry>, DecodeError> {
        let mut it = ScanIter::new(raw, None)?;
        let mut out = Vec::new();
        it.visit(&mut |k, v, at| {
            out.push((k.to_vec(), v.to_vec(), at.expect("a block entry").shares_entity));
            true
        })?;
        Ok(out)
    }

    /// What a parse of `raw` holds, in the same form.
    fn parse_all(raw: Vec<u8>) -> Result<Vec<Entry>, DecodeError> {
        let b = Arc::new(Block::parse(raw)?);
        let mut out = Vec::new();
        BlockIter::new(b).visit(&mut |k, v, at| {
            let at = at.expect("a block entry");
            assert_eq!(&at.bytes[at.value.0 as usize..at.value.1 as usize], v);
            out.push((k.to_vec(), v.to_vec(), at.shares_entity));
            true
        });
        Ok(out)
    }

    /// Keys of entities of several lengths, some sharing bytes, three features each.
    fn mixed_keys() -> Vec<Vec<u8>> {
        let entities: [&[u8]; 7] = [b"ab", b"ab\x00", b"ac", b"abc", b"abcdefghijklmnopq", b"abcdefghijklmnopr", b"b"];
        let mut ks: Vec<Vec<u8>> = Vec::new();
        for (i, e) in entities.iter().enumerate() {
            for f in 0..3 {
                for t in 0..3 {
                    ks.push(encode(e, FeatureId(f), EventTime(i as i64 * 10 + t), SystemTime(1 + t as u64)));
                }
            }
        }
        ks.sort();
        ks.dedup();
        ks
    }

    #[test]
    fn a_scan_hands_out_exactly_what_a_parse_holds() {
        for restart in [1, 3, 16] {
            for ks in [keys(100), mixed_keys()] {
                let raw = block_of(ks.iter().enumerate().map(|(i, k)| (k, vec![b'v'; i % 5])), restart);
                let scanned = scan_all(raw.clone()).expect("scans");
                assert_eq!(scanned, parse_all(raw).expect("parses"), "restart {restart}");
                assert_eq!(scanned.len(), ks.len());
                // (With a restart at every entry, no entry shares anything.)
                assert_eq!(scanned.iter().any(|e| e.2), restart > 1, "restart {restart}");
            }
        }
    }

    #[test]
    fn a_scan_fails_exactly_where_a_parse_does_on_every_truncation_and_flip() {
        let raw = block_of(mixed_keys().into_iter().map(|k| (k, b"xy")), 4);
        let mut refused = 0;
        for cut in 0..raw.len() {
            let (s, p) = (scan_all(raw[..cut].to_vec()), parse_all(raw[..cut].to_vec()));
            assert!(p.is_err(), "cut at {cut}");
            assert_eq!(s, p, "cut at {cut}");
        }
        for i in 0..raw.len() {
            for bit in [0x01u8, 0x10, 0x80] {
                let mut bad = raw.clone();
                bad[i] ^= bit;
                let (s, p) = (scan_all(bad.clone()), parse_all(bad));
                refused += usize::from(p.is_err());
                assert_eq!(s, p, "flip {i}/{bit:#x}");
            }
        }
        assert!(refused > raw.len(), "most flips are refused ({refused})");
    }

    #[test]
    fn a_scan_seeks_forward_to_the_first_key_at_or_after_the_target() {
        let ks = mixed_keys();
        let raw = block_of(ks.iter().map(|k| (k, b"v")), 4);
        let b = Block::parse(raw.clone()).expect("parses");
        let mut targets: Vec<Vec<u8>> = ks.clone();
        targets.extend(ks.iter().map(|k| [k.as_slice(), b"\x00"].concat()));
        targets.extend([b"".to_vec(), b"\xff".to_vec()]);
        targets.sort();
        // From the start, and continuing from the previous (smaller) target, as a merge does.
        let mut cont = ScanIter::new(raw.clone(), None).expect("scans");
        for t in &targets {
            let mut fresh = ScanIter::new(raw.clone(), None).expect("scans");
            fresh.seek_forward(t).expect("seeks");
            cont.seek_forward(t).expect("seeks");
            let want = b.seek(t);
            for it in [&fresh, &cont] {
                assert_eq!(it.valid(), want < b.len(), "target {t:x?}");
                if it.valid() {
                    assert_eq!((it.key(), it.value()), (b.key(want), b.value(want)));
                }
            }
        }
        assert!(!cont.valid());
        assert_eq!(cont.key(), b.key(b.len() - 1), "a finished scan keeps its last key");
    }

    #[test]
    fn a_scan_hands_out_only_keys_within_its_bounds() {
        let ks = mixed_keys();
        let raw = block_of(ks.iter().map(|k| (k, b"v")), 4);
        let b = Block::parse(raw.clone()).expect("parses");
        let (first, last) = (ks[0].as_slice(), ks[ks.len() - 1].as_slice());
        // What a scan bounded by `bounds` hands out before it stops, and why it stops.
        let scan = |bounds: Bounds<'_>| -> (usize, Result<(), DecodeError>) {
            let mut it = match ScanIter::new(raw.clone(), Some(bounds)) {
                Ok(it) => it,
                Err(e) => return (0, Err(e)),
            };
            let mut n = 0;
            let r = it.visit(&mut |_, _, _| {
                n += 1;
                true
            });
            (n, r.map(drop))
        };
        let (before_first, after_last) = (&first[..first.len() - 1], [last, b"\x00"].concat());
        for after in [None, Some(before_first)] {
            let ok = Bounds { after, last };
            assert_eq!(scan(ok), (ks.len(), Ok(())));
            assert_eq!(b.check_bounds(ok), Ok(()));
        }
        // The first key not after the previous block's last.
        for after in [first, last] {
            let bad = Bounds { after: Some(after), last };
            assert_eq!(scan(bad), (0, Err(FIRST_KEY_NOT_AFTER)));
            assert_eq!(b.check_bounds(bad), Err(FIRST_KEY_NOT_AFTER));
        }
        // An index entry below some keys: the scan hands out the keys up to it and stops at
        // the first key above it, whether the entry is a key of the block, falls between two,
        // or is a proper prefix of a key.
        for k in &ks[..ks.len() - 1] {
            let (between, prefix) = ([k.as_slice(), b"\x00"].concat(), &k[..k.len() - 1]);
            for bound in [k.as_slice(), between.as_slice(), prefix] {
                let bad = Bounds { after: None, last: bound };
                let below = ks.partition_point(|x| x.as_slice() <= bound);
                assert_eq!(scan(bad), (below, Err("block key after its index entry")), "bound {bound:x?}");
                assert_eq!(b.check_bounds(bad), Err(LAST_KEY_NOT_INDEXED));
            }
        }
        // An index entry above every key: all are handed out, then the end is refused.
        let bad = Bounds { after: None, last: &after_last };
        assert_eq!(scan(bad), (ks.len(), Err(LAST_KEY_NOT_INDEXED)));
        assert_eq!(b.check_bounds(bad), Err(LAST_KEY_NOT_INDEXED));
    }

    #[test]
    fn a_scan_that_failed_keeps_failing() {
        // Entry 4 is a restart point; make it claim a shared prefix (its key unchanged).
        let ks = keys(8);
        let mut raw = block_of(ks.iter().map(|k| (k, b"v")), 4);
        let at = restart(&raw, raw.len() - 4 - 4 * 2, 1);
        assert_eq!(raw[at], 0, "a restart entry shares nothing");
        raw[at] = 1;
        let mut it = ScanIter::new(raw, None).expect("the first entries are fine");
        for _ in 0..3 {
            it.advance().expect("entries 1 to 3");
        }
        assert!(it.valid());
        for _ in 0..3 {
            assert_eq!(it.advance(), Err("restart entry shares a prefix"));
            assert!(!it.valid());
        }
        assert_eq!(it.visit(&mut |_, _, _| panic!("nothing after an error")), Err("restart entry shares a prefix"));
    }
}
