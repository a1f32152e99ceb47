//! The operating system's file system.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{File, Fs};
use crate::{Error, Result};

/// Files on the local file system, read with `pread`.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

#[derive(Debug)]
struct RealFile {
    file: std::fs::File,
    path: PathBuf,
}

impl File for RealFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| Error::io(&self.path, e))
    }
    fn append(&self, data: &[u8]) -> Result<()> {
        (&self.file).write_all(data).map_err(|e| Error::io(&self.path, e))
    }
    fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io_sync(&self.path, e))
    }
    fn size(&self) -> Result<u64> {
        self.file.metadata().map(|m| m.len()).map_err(|e| Error::io(&self.path, e))
    }
    fn truncate(&self, len: u64) -> Result<()> {
        self.file.set_len(len).map_err(|e| Error::io(&self.path, e))
    }
    fn path(&self) -> &Path {
        &self.path
    }
}

impl Fs for RealFs {
    fn create(&self, path: &Path) -> Result<Arc<dyn File>> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        file.set_len(0).map_err(|e| Error::io(path, e))?;
        Ok(Arc::new(RealFile { file, path: path.to_path_buf() }))
    }
    fn open(&self, path: &Path) -> Result<Arc<dyn File>> {
        let file = std::fs::OpenOptions::new().read(true).append(true).open(path).map_err(|e| Error::io(path, e))?;
        Ok(Arc::new(RealFile { file, path: path.to_path_buf() }))
    }
    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        std::fs::rename(from, to).map_err(|e| Error::io(from, e))
    }
    fn remove(&self, path: &Path) -> Result<()> {
        std::fs::remove_file(path).map_err(|e| Error::io(path, e))
    }
    fn list(&self, dir: &Path) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for ent in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let ent = ent.map_err(|e| Error::io(dir, e))?;
            if let Some(name) = ent.file_name().to_str() {
                out.push(name.to_string());
            }
        }
        out.sort();
        Ok(out)
    }
    fn create_dir_all(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
    }
    fn sync_dir(&self, dir: &Path) -> Result<()> {
        let d = std::fs::File::open(dir).map_err(|e| Error::io(dir, e))?;
        d.sync_all().map_err(|e| Error::io_sync(dir, e))
    }
    fn exists(&self, path: &Path) -> bool {
        path.is_file()
    }
    fn hard_link(&self, from: &Path, to: &Path) -> Result<()> {
        std::fs::hard_link(from, to).map_err(|e| Error::io(from, e))
    }
    fn open_raw(&self, path: &Path, direct: bool) -> Result<Option<std::fs::File>> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut o = std::fs::OpenOptions::new();
        o.read(true);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        match o.open(path) {
            Ok(f) => Ok(Some(f)),
            // The file system does not take O_DIRECT (tmpfs before Linux 6.6, some FUSE).
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
            Err(e) => Err(Error::io(path, e)),
        }
    }
    fn available_bytes(&self, dir: &Path) -> Option<u64> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
        // SAFETY: statvfs(3) reads the NUL-terminated path, which outlives the call, and fills
        // the zeroed struct it is given; nothing else is touched.
        let st = unsafe {
            let mut st: libc::statvfs = std::mem::zeroed();
            if libc::statvfs(path.as_ptr(), &mut st) != 0 {
                return None;
            }
            st
        };
        Some(st.f_bavail.saturating_mul(st.f_frsize))
    }

    fn lock_dir(&self, dir: &Path) -> Result<Box<dyn std::any::Any + Send + Sync>> {
        let path = dir.join("LOCK");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(Box::new(file)),
            Err(std::fs::TryLockError::WouldBlock) => Err(Error::InUse { path: dir.to_path_buf() }),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn available_bytes_reads_the_file_system() {
        let dir = tempfile::tempdir().expect("tmp");
        let fs = RealFs;
        let free = fs.available_bytes(dir.path()).expect("statvfs of a directory");
        assert!(free > 0, "{free}");
        assert_eq!(fs.available_bytes(&dir.path().join("missing")), None);
    }
}
