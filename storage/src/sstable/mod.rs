//! Sorted string tables: the immutable files of the LSM tree.
//!
//! ```text
//! table   = data block* | filter block | index block | footer
//! block on disk = payload | compression u8 (0 none, 1 zstd, 2 lz4) | crc u32 LE
//! crc     = CRC-32 of (payload, compression byte), started from seed(offset of the block)
//! index   = a block whose entries map the last key of each data block to its handle
//! handle  = offset uvarint | payload length uvarint
//! footer  = filter offset u64 | filter len u64 | index offset u64 | index len u64
//!         | format version u32 | crc u32 (CRC-32 of the 36 bytes before it) | magic u64   (48 bytes, LE)
//! ```
//!
//! The block checksum is seeded with the block's offset so that a block copied or swapped to
//! another place in the file fails its check. Payloads of compressed blocks decompress to the
//! block format of [`block`]: a zstd payload is one frame that records its content size; an LZ4
//! payload is `content size uvarint | LZ4 block` (the block format, no frame).

pub mod block;
pub mod bloom;
pub mod cache;
pub mod reader;
pub mod ssd;
pub mod writer;

pub use cache::BlockCache;
pub use reader::{Table, TableIter};
pub use ssd::{IoBackend, Prefetched, SsdStats, SsdTier};
pub use writer::{TableInfo, TableWriter};

/// Magic number at the very end of every table: "QUIVSST1".
pub const MAGIC: u64 = u64::from_le_bytes(*b"QUIVSST1");
/// Format version this code writes. Version 2: cells may be in the stored form (own stamps
/// elided, see [`crate::cell::compact`]); version 1 tables never hold it and read the same.
/// Version 3: blocks may be LZ4-compressed (compression byte 2); otherwise as version 2. A
/// table is written as version 3 only if one of its blocks is LZ4, so an older reader refuses
/// it by its version rather than calling a block corrupt, and tables written with zstd or none
/// stay readable by the binaries before LZ4.
pub const FORMAT_VERSION: u32 = 3;
/// The version of a table without LZ4 blocks.
pub const FORMAT_VERSION_WITHOUT_LZ4: u32 = 2;
/// Oldest format version this code reads.
pub const FORMAT_VERSION_READ_MIN: u32 = 1;

const FILTER_OFFSET_AT: usize = 0;
const FILTER_LEN_AT: usize = FILTER_OFFSET_AT + 8;
const INDEX_OFFSET_AT: usize = FILTER_LEN_AT + 8;
const INDEX_LEN_AT: usize = INDEX_OFFSET_AT + 8;
const VERSION_AT: usize = INDEX_LEN_AT + 8;
const CRC_AT: usize = VERSION_AT + 4;
const MAGIC_AT: usize = CRC_AT + 4;
/// Bytes of the footer.
pub const FOOTER_BYTES: usize = MAGIC_AT + 8;
const _: () = assert!(FOOTER_BYTES == 48);

/// Bytes after each block payload: compression byte and crc.
pub const BLOCK_TRAILER_BYTES: usize = 5;

/// Data block compression. Each block names its own, so a table (and a data directory)
/// written under one setting reads the same under another.
///
/// On the join benchmark's tables (16 KiB blocks of float64 versions) zstd level 1 shrinks a
/// block 5.6x and LZ4 2.7x; LZ4 decompresses them 2.4x as fast (`lz4 -b1` against
/// `zstd -b1 --no-compress-literals`, 3,050 against 1,270 MB/s). Every read that misses the
/// block cache decompresses a block, and a point-in-time join decompresses every block it
/// scans, so the default is LZ4: CPU over disk, the default Cassandra, ScyllaDB and ClickHouse
/// chose too. zstd is for deployments bound by disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Blocks stored as they are.
    None,
    /// zstd at the given level ([`ZSTD_LEVEL_MIN`]..=[`ZSTD_LEVEL_MAX`]).
    Zstd(i32),
    /// LZ4 (the block format, after the content size).
    Lz4,
}

/// Lowest zstd level [`Compression::Zstd`] takes (zstd's fastest).
pub const ZSTD_LEVEL_MIN: i32 = -7;
/// Highest zstd level [`Compression::Zstd`] takes.
pub const ZSTD_LEVEL_MAX: i32 = 22;
/// The level `zstd` without one means.
pub const ZSTD_LEVEL_DEFAULT: i32 = 1;

impl std::str::FromStr for Compression {
    type Err = String;
    /// `lz4`, `zstd` (level [`ZSTD_LEVEL_DEFAULT`]), `zstd:LEVEL` or `none`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || {
            format!("unknown table compression {s:?}: expected lz4, zstd, zstd:LEVEL ({ZSTD_LEVEL_MIN} to {ZSTD_LEVEL_MAX}) or none")
        };
        match s {
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd(ZSTD_LEVEL_DEFAULT)),
            "none" => Ok(Compression::None),
            _ => {
                let level: i32 = s.strip_prefix("zstd:").and_then(|l| l.parse().ok()).ok_or_else(bad)?;
                if (ZSTD_LEVEL_MIN..=ZSTD_LEVEL_MAX).contains(&level) {
                    Ok(Compression::Zstd(level))
                } else {
                    Err(format!(
                        "table compression {s:?}: zstd level {level} is outside {ZSTD_LEVEL_MIN} to {ZSTD_LEVEL_MAX}"
                    ))
                }
            }
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Lz4 => f.write_str("lz4"),
            Compression::Zstd(level) => write!(f, "zstd:{level}"),
        }
    }
}

const COMPRESSION_NONE: u8 = 0;
const COMPRESSION_ZSTD: u8 = 1;
const COMPRESSION_LZ4: u8 = 2;

fn block_crc(offset: u64, payload: &[u8], compression: u8) -> u32 {
    let seed = (offset as u32) ^ ((offset >> 32) as u32) ^ 0x5353_5431;
    let mut h = crc32fast::Hasher::new_with_initial(seed);
    h.update(payload);
    h.update(&[compression]);
    h.finalize()
}

/// Where a block is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHandle {
    /// Offset of the payload.
    pub offset: u64,
    /// Length of the payload (without trailer).
    pub len: u64,
}

/// The decoded footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    /// The filter block.
    pub filter: BlockHandle,
    /// The index block.
    pub index: BlockHandle,
    /// Format version.
    pub version: u32,
}

impl Footer {
    /// Encodes the footer.
    pub fn encode(&self) -> [u8; FOOTER_BYTES] {
        let mut out = [0u8; FOOTER_BYTES];
        out[FILTER_OFFSET_AT..FILTER_LEN_AT].copy_from_slice(&self.filter.offset.to_le_bytes());
        out[FILTER_LEN_AT..INDEX_OFFSET_AT].copy_from_slice(&self.filter.len.to_le_bytes());
        out[INDEX_OFFSET_AT..INDEX_LEN_AT].copy_from_slice(&self.index.offset.to_le_bytes());
        out[INDEX_LEN_AT..VERSION_AT].copy_from_slice(&self.index.len.to_le_bytes());
        out[VERSION_AT..CRC_AT].copy_from_slice(&self.version.to_le_bytes());
        let crc = crc32fast::hash(&out[..CRC_AT]);
        out[CRC_AT..MAGIC_AT].copy_from_slice(&crc.to_le_bytes());
        out[MAGIC_AT..].copy_from_slice(&MAGIC.to_le_bytes());
        out
    }

    /// Decodes and checks a footer.
    pub fn decode(b: &[u8; FOOTER_BYTES]) -> Result<Footer, &'static str> {
        let u64_at = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        if u64_at(MAGIC_AT) != MAGIC {
            return Err("bad magic number (not a Quiver table)");
        }
        if u32_at(CRC_AT) != crc32fast::hash(&b[..CRC_AT]) {
            return Err("footer checksum mismatch");
        }
        let version = u32_at(VERSION_AT);
        if !(FORMAT_VERSION_READ_MIN..=FORMAT_VERSION).contains(&version) {
            return Err("unsupported table format version");
        }
        Ok(Footer {
            filter: BlockHandle { offset: u64_at(FILTER_OFFSET_AT), len: u64_at(FILTER_LEN_AT) },
            index: BlockHandle { offset: u64_at(INDEX_OFFSET_AT), len: u64_at(INDEX_LEN_AT) },
            version,
        })
    }
}

/// The file name of table `n`.
pub fn table_name(n: u64) -> String {
    format!("{n:06}.sst")
}

/// Parses a table file name.
pub fn parse_table_name(name: &str) -> Option<u64> {
    name.strip_suffix(".sst")?.parse().ok()
}
