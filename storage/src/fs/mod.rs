//! The file-system interface every byte of the engine goes through.
//!
//! [`RealFs`] uses the operating system (`pread`, `write`, `fsync`). [`MemFs`] is a simulated
//! file system for tests: it keeps synced and unsynced bytes apart, counts mutating operations so
//! a test can make the "process" die at any one of them, and produces the image a power loss
//! would leave: synced bytes plus a random prefix of the unsynced tail of each file, and only
//! the directory entries made durable by a directory fsync.

mod mem;
mod real;

pub use mem::MemFs;
pub use real::RealFs;

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::Result;

/// An open file. Reads are positional; writes append at the end.
pub trait File: Send + Sync + Debug {
    /// Fills `buf` from `offset`; fails if the file is shorter.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Appends `data` at the end of the file.
    fn append(&self, data: &[u8]) -> Result<()>;
    /// Makes the file's contents durable (fdatasync).
    fn sync(&self) -> Result<()>;
    /// The file's current length.
    fn size(&self) -> Result<u64>;
    /// Cuts the file to `len` bytes.
    fn truncate(&self, len: u64) -> Result<()>;
    /// The path the file was opened at.
    fn path(&self) -> &Path;
}

/// A file system: one flat directory per engine is all the engine needs.
pub trait Fs: Send + Sync + Debug {
    /// Creates (or truncates) a file for writing and reading.
    fn create(&self, path: &Path) -> Result<Arc<dyn File>>;
    /// Opens an existing file for reading and appending.
    fn open(&self, path: &Path) -> Result<Arc<dyn File>>;
    /// Atomically renames `from` to `to`, replacing `to`.
    fn rename(&self, from: &Path, to: &Path) -> Result<()>;
    /// Removes a file.
    fn remove(&self, path: &Path) -> Result<()>;
    /// Names of the files in `dir`.
    fn list(&self, dir: &Path) -> Result<Vec<String>>;
    /// Creates `dir` and its parents.
    fn create_dir_all(&self, dir: &Path) -> Result<()>;
    /// Makes the directory's entries (creates, renames, removes) durable.
    fn sync_dir(&self, dir: &Path) -> Result<()>;
    /// True if `path` names a file.
    fn exists(&self, path: &Path) -> bool;
    /// Makes a hard link `to` of `from` (for checkpoints).
    fn hard_link(&self, from: &Path, to: &Path) -> Result<()>;
    /// Takes an exclusive lock on `dir` for as long as the returned guard lives; fails with
    /// [`crate::Error::InUse`] if another process (or another open engine) holds it.
    fn lock_dir(&self, dir: &Path) -> Result<Box<dyn std::any::Any + Send + Sync>>;
    /// Opens `path` read-only as an operating-system file, for the SSD tier's reads
    /// (`crate::sstable::ssd`), with `O_DIRECT` if `direct`. `None` if this file system has no
    /// file descriptors or (with `direct`) does not take `O_DIRECT`.
    fn open_raw(&self, _path: &Path, _direct: bool) -> Result<Option<std::fs::File>> {
        Ok(None)
    }
    /// Bytes an unprivileged writer may still write on the file system holding `dir`, if
    /// known: background work checks it before writing a table, and a full disk's refusal of
    /// writes is lifted when space is back.
    fn available_bytes(&self, _dir: &Path) -> Option<u64> {
        None
    }
}

/// Reads a whole file.
pub fn read_all(file: &dyn File) -> Result<Vec<u8>> {
    let len = file.size()?;
    let len = usize::try_from(len).map_err(|_| crate::Error::corruption(file.path(), 0, "file larger than memory"))?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

/// Writes `data` to `path` durably: a temp file, fsync, rename, directory fsync.
pub fn write_file_atomic(fs: &dyn Fs, dir: &Path, name: &str, data: &[u8]) -> Result<()> {
    let tmp: PathBuf = dir.join(format!("{name}.tmp"));
    let f = fs.create(&tmp)?;
    f.append(data)?;
    f.sync()?;
    drop(f);
    fs.rename(&tmp, &dir.join(name))?;
    fs.sync_dir(dir)
}
