//! Writes one table: to `NNNNNN.sst.tmp`, fsync, rename to `NNNNNN.sst`, fsync the directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::block::BlockBuilder;
use super::{
    block_crc, bloom, table_name, BlockHandle, Compression, Footer, COMPRESSION_LZ4, COMPRESSION_NONE,
    COMPRESSION_ZSTD, FORMAT_VERSION, FORMAT_VERSION_WITHOUT_LZ4,
};
use crate::coding::put_uvarint;
use crate::fs::{File, Fs};
use crate::key;
use crate::limits::{BLOCK_RESTART_INTERVAL, BLOOM_BITS_PER_KEY, META_BLOCK_BYTES_MAX};
use crate::types::SystemTime;
use crate::{Error, Result};

/// What a finished table holds (recorded in the manifest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    /// File number.
    pub number: u64,
    /// File size in bytes.
    pub size: u64,
    /// Smallest key.
    pub smallest: Vec<u8>,
    /// Largest key.
    pub largest: Vec<u8>,
    /// Number of entries.
    pub entries: u64,
    /// Smallest system time of any entry.
    pub system_time_min: SystemTime,
    /// Greatest system time of any entry.
    pub system_time_max: SystemTime,
}

/// Builds a table from entries added in key order.
#[derive(Debug)]
pub struct TableWriter {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    file: Arc<dyn File>,
    tmp: PathBuf,
    number: u64,
    offset: u64,
    block_size: usize,
    compression: Compression,
    data: BlockBuilder,
    index: BlockBuilder,
    prefix_hashes: Vec<u64>,
    last_prefix: Vec<u8>,
    smallest: Vec<u8>,
    entries: u64,
    system_time_min: u64,
    system_time_max: u64,
    scratch: Vec<u8>,
    /// Whether a block was stored LZ4-compressed (the table is then of [`FORMAT_VERSION`] 3).
    wrote_lz4: bool,
    /// The cell being added, in the stored form.
    cell: Vec<u8>,
    compressor: Option<Zstd>,
}

/// A reused zstd compression context (creating one per block costs more than compressing).
struct Zstd(zstd::bulk::Compressor<'static>);

impl Zstd {
    /// A context at `level` with literal compression off (see `FORMAT.md`, "Tables"): a data
    /// block's literals are mostly values and time stamps, which Huffman coding shrinks by a
    /// few percent while halving the speed at which every read decompresses the block.
    fn new(level: i32) -> std::io::Result<Zstd> {
        use zstd::zstd_safe::{CParameter, ParamSwitch};
        let mut c = zstd::bulk::Compressor::new(level)?;
        c.set_parameter(CParameter::LiteralCompressionMode(ParamSwitch::Disable))?;
        Ok(Zstd(c))
    }
}

impl std::fmt::Debug for Zstd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Zstd")
    }
}

impl TableWriter {
    /// Starts table `number` in `dir`.
    pub fn create(
        fs: Arc<dyn Fs>,
        dir: &Path,
        number: u64,
        block_size: usize,
        compression: Compression,
    ) -> Result<Self> {
        let tmp = dir.join(format!("{}.tmp", table_name(number)));
        let file = fs.create(&tmp)?;
        Ok(TableWriter {
            fs,
            dir: dir.to_path_buf(),
            file,
            tmp,
            number,
            offset: 0,
            block_size: block_size.max(64),
            compression,
            data: BlockBuilder::new(BLOCK_RESTART_INTERVAL),
            index: BlockBuilder::new(1),
            prefix_hashes: Vec::new(),
            last_prefix: Vec::new(),
            smallest: Vec::new(),
            entries: 0,
            system_time_min: u64::MAX,
            system_time_max: 0,
            scratch: Vec::new(),
            wrote_lz4: false,
            cell: Vec::new(),
            compressor: match compression {
                Compression::Zstd(level) => Some(Zstd::new(level).map_err(|e| Error::io(dir, e))?),
                Compression::None | Compression::Lz4 => None,
            },
        })
    }

    /// Entries added so far.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// `(entity, feature)` pairs added so far.
    pub fn pairs(&self) -> usize {
        self.prefix_hashes.len()
    }

    /// Bytes written so far plus the pending block.
    pub fn size_estimate(&self) -> u64 {
        self.offset + self.data.size_estimate() as u64
    }

    /// The table's file number.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// True if the next added key would start a new `(entity, feature)` prefix.
    pub fn at_prefix_boundary(&self, next_key: &[u8]) -> bool {
        key::prefix_of(next_key) != self.last_prefix.as_slice()
    }

    /// Adds an entry; keys must be valid internal keys, strictly increasing.
    pub fn add(&mut self, k: &[u8], value: &[u8]) -> Result<()> {
        let prefix = key::prefix_of(k);
        if self.entries == 0 {
            self.smallest = k.to_vec();
        }
        if self.entries == 0 || prefix != self.last_prefix.as_slice() {
            self.prefix_hashes.push(bloom::hash(prefix));
            self.last_prefix.clear();
            self.last_prefix.extend_from_slice(prefix);
        }
        let s = key::system_time_of(k).0;
        self.system_time_min = self.system_time_min.min(s);
        self.system_time_max = self.system_time_max.max(s);
        // The stored form: an own stamp is the key's system time, so it is not repeated.
        self.cell.clear();
        crate::cell::compact(value, s, &mut self.cell);
        self.data.add(k, &self.cell);
        self.entries += 1;
        if self.data.size_estimate() >= self.block_size {
            self.finish_data_block()?;
        }
        Ok(())
    }

    /// Appends `raw` as a block (payload, compression byte, crc), compressed as the table's
    /// setting says, built in place in the reused scratch buffer.
    fn write_block(&mut self, raw: &[u8]) -> Result<BlockHandle> {
        let out = &mut self.scratch;
        out.clear();
        let mut ctype = match (self.compression, &mut self.compressor) {
            (Compression::Lz4, _) => {
                put_uvarint(out, raw.len() as u64);
                let at = out.len();
                out.resize(at + lz4_flex::block::get_maximum_output_size(raw.len()), 0);
                let n = lz4_flex::block::compress_into(raw, &mut out[at..])
                    .map_err(|e| Error::io(&self.tmp, std::io::Error::other(e)))?;
                out.truncate(at + n);
                COMPRESSION_LZ4
            }
            (Compression::Zstd(_), Some(c)) => {
                out.extend_from_slice(&c.0.compress(raw).map_err(|e| Error::io(&self.tmp, e))?);
                COMPRESSION_ZSTD
            }
            (Compression::None, _) | (Compression::Zstd(_), None) => COMPRESSION_NONE,
        };
        // A block that compression saves less than a ninth of (its compressed form plus an
        // eighth is not below the raw size) is stored as it is.
        if ctype == COMPRESSION_NONE || out.len() + out.len() / 8 >= raw.len() {
            out.clear();
            out.extend_from_slice(raw);
            ctype = COMPRESSION_NONE;
        }
        self.wrote_lz4 |= ctype == COMPRESSION_LZ4;
        let handle = BlockHandle { offset: self.offset, len: out.len() as u64 };
        let crc = block_crc(handle.offset, out, ctype);
        out.push(ctype);
        out.extend_from_slice(&crc.to_le_bytes());
        self.file.append(out)?;
        self.offset += out.len() as u64;
        Ok(handle)
    }

    fn finish_data_block(&mut self) -> Result<()> {
        if self.data.is_empty() {
            return Ok(());
        }
        let last = self.data.last_key().to_vec();
        let raw = self.data.finish();
        let h = self.write_block(&raw)?;
        let mut v = Vec::with_capacity(16);
        put_uvarint(&mut v, h.offset);
        put_uvarint(&mut v, h.len);
        self.index.add(&last, &v);
        Ok(())
    }

    /// Finishes the table and makes it durable under its final name. Returns `None` (and
    /// removes the temp file) if no entry was added.
    pub fn finish(mut self) -> Result<Option<TableInfo>> {
        if self.entries == 0 {
            drop(self.file);
            self.fs.remove(&self.tmp)?;
            return Ok(None);
        }
        let largest = self.data.last_key().to_vec();
        let largest = if largest.is_empty() { self.index.last_key().to_vec() } else { largest };
        self.finish_data_block()?;
        let filter_raw = bloom::build(&self.prefix_hashes, BLOOM_BITS_PER_KEY);
        if filter_raw.len() > META_BLOCK_BYTES_MAX || self.index.size_estimate() > META_BLOCK_BYTES_MAX {
            return Err(Error::InvalidArgument(format!(
                "table {} would need a filter or index block over {META_BLOCK_BYTES_MAX} bytes; lower the memtable or table size",
                self.number
            )));
        }
        let saved = self.compression;
        self.compression = Compression::None;
        let filter = self.write_block(&filter_raw)?;
        let index_raw = self.index.finish();
        let index = self.write_block(&index_raw)?;
        self.compression = saved;
        let version = if self.wrote_lz4 { FORMAT_VERSION } else { FORMAT_VERSION_WITHOUT_LZ4 };
        let footer = Footer { filter, index, version }.encode();
        self.file.append(&footer)?;
        self.offset += footer.len() as u64;
        self.file.sync()?;
        let path = self.dir.join(table_name(self.number));
        self.fs.rename(&self.tmp, &path)?;
        self.fs.sync_dir(&self.dir)?;
        Ok(Some(TableInfo {
            number: self.number,
            size: self.offset,
            smallest: std::mem::take(&mut self.smallest),
            largest,
            entries: self.entries,
            system_time_min: SystemTime(self.system_time_min),
            system_time_max: SystemTime(self.system_time_max),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::MemFs;
    use crate::key;
    use crate::limits::BLOCK_BYTES_MAX;
    use crate::sstable::Table;
    use crate::types::{EventTime, FeatureId};

    /// A table with more prefixes than a data block could hold filter bits for (a full
    /// production memtable): its filter block is larger than a data block and must read back.
    #[test]
    fn large_filter_and_index_blocks_read_back() {
        let fs = Arc::new(MemFs::new());
        let dir = Path::new("/t");
        let n = (BLOCK_BYTES_MAX * 8 / BLOOM_BITS_PER_KEY) as u32 + 10_000;
        let mut w = TableWriter::create(fs.clone(), dir, 1, 4096, crate::sstable::Compression::None).expect("create");
        for i in 0..n {
            let k = key::encode(&i.to_be_bytes(), FeatureId(0), EventTime(0), SystemTime(1));
            w.add(&k, b"v").expect("add");
        }
        let info = w.finish().expect("finish").expect("non-empty");
        assert_eq!(info.entries, u64::from(n));
        let t = Table::open(fs.as_ref(), dir, 1).expect("open");
        assert_eq!(t.verify().expect("verify"), u64::from(n));
        let p = key::prefix(&(n - 1).to_be_bytes(), FeatureId(0));
        assert!(t.may_contain_prefix(&p));
    }
}
