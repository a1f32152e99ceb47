//! A simulated file system for crash and fault tests.
//!
//! Each file (inode) keeps its current bytes and the bytes of its last `sync`. Each directory
//! keeps its live entries and the entries of its last `sync_dir`. [`MemFs::crash_image`] builds
//! what a power loss would leave: the durable entries only, each file cut to its synced bytes
//! plus a random prefix of what was appended since.
//!
//! Every mutating call is one numbered *step*. [`MemFs::set_crash_at`] makes the process "die"
//! at a step: that call and every later call (reads included) fail with an I/O error, as if
//! nothing after that moment reached the disk.
//!
//! [`MemFs::set_capacity`] makes the disk fill up: an append that does not fit writes what fits
//! and fails with `ENOSPC` (as `write(2)` does), and creating a file on a full disk fails.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{File, Fs};
use crate::{Error, Result};

#[derive(Debug, Default, Clone)]
struct Inode {
    data: Vec<u8>,
    synced: Vec<u8>,
}

#[derive(Debug, Default)]
struct State {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    live: BTreeMap<PathBuf, u64>,
    durable: BTreeMap<PathBuf, u64>,
    steps: u64,
    crash_at: Option<u64>,
    crashed: bool,
    capacity: Option<u64>,
}

impl State {
    fn step(&mut self, what: &str, path: &Path) -> Result<()> {
        self.check_alive(path)?;
        self.steps += 1;
        if self.crash_at.is_some_and(|n| self.steps >= n) {
            self.crashed = true;
            return Err(Error::io(path, std::io::Error::other(format!("simulated crash at {what}"))));
        }
        Ok(())
    }

    fn check_alive(&self, path: &Path) -> Result<()> {
        if self.crashed {
            return Err(Error::io(path, std::io::Error::other("simulated crash: process is dead")));
        }
        Ok(())
    }

    /// Bytes of the files that have a name.
    fn used(&self) -> u64 {
        let live: std::collections::HashSet<u64> = self.live.values().copied().collect();
        live.iter().map(|i| self.inodes.get(i).map_or(0, |n| n.data.len() as u64)).sum()
    }

    /// Bytes left before the disk is full (`u64::MAX` without a capacity).
    fn free(&self) -> u64 {
        self.capacity.map_or(u64::MAX, |c| c.saturating_sub(self.used()))
    }

    fn ino(&self, path: &Path) -> Result<u64> {
        self.live
            .get(path)
            .copied()
            .ok_or_else(|| Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file")))
    }
}

/// The simulated file system. Cloning shares the same state.
#[derive(Debug, Clone, Default)]
pub struct MemFs {
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct MemFile {
    state: Arc<Mutex<State>>,
    ino: u64,
    path: PathBuf,
}

impl File for MemFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let st = self.state.lock();
        st.check_alive(&self.path)?;
        let data = &st.inodes[&self.ino].data;
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= data.len() as u64).ok_or_else(|| {
            Error::io(&self.path, std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past end"))
        })?;
        buf.copy_from_slice(&data[offset as usize..end as usize]);
        Ok(())
    }
    fn append(&self, data: &[u8]) -> Result<()> {
        let mut st = self.state.lock();
        st.step("append", &self.path)?;
        let fits = usize::try_from(st.free()).unwrap_or(usize::MAX).min(data.len());
        if let Some(i) = st.inodes.get_mut(&self.ino) {
            i.data.extend_from_slice(&data[..fits]);
        }
        if fits < data.len() {
            return Err(Error::io(&self.path, no_space()));
        }
        Ok(())
    }
    fn sync(&self) -> Result<()> {
        let mut st = self.state.lock();
        st.step("sync", &self.path)?;
        if let Some(i) = st.inodes.get_mut(&self.ino) {
            i.synced = i.data.clone();
        }
        Ok(())
    }
    fn size(&self) -> Result<u64> {
        let st = self.state.lock();
        st.check_alive(&self.path)?;
        Ok(st.inodes[&self.ino].data.len() as u64)
    }
    fn truncate(&self, len: u64) -> Result<()> {
        let mut st = self.state.lock();
        st.step("truncate", &self.path)?;
        if let Some(i) = st.inodes.get_mut(&self.ino) {
            i.data.truncate(len as usize);
        }
        Ok(())
    }
    fn path(&self) -> &Path {
        &self.path
    }
}

impl MemFs {
    /// An empty file system.
    pub fn new() -> Self {
        Self::default()
    }

    /// Mutating steps taken so far.
    pub fn steps(&self) -> u64 {
        self.state.lock().steps
    }

    /// Makes the process die at mutating step `n` (1-based): that step and all later calls fail.
    pub fn set_crash_at(&self, n: Option<u64>) {
        self.state.lock().crash_at = n;
    }

    /// Limits the bytes all named files may hold (`None`: no limit); see the module doc.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.state.lock().capacity = bytes;
    }

    /// Bytes all named files hold now.
    pub fn used_bytes(&self) -> u64 {
        self.state.lock().used()
    }

    /// True once the simulated process has died.
    pub fn crashed(&self) -> bool {
        self.state.lock().crashed
    }

    /// The file system a power loss now would leave: durable directory entries only, each file
    /// its synced bytes plus a prefix of its unsynced appended bytes chosen by `seed`.
    pub fn crash_image(&self, seed: u64) -> MemFs {
        self.image(Some(seed))
    }

    /// The file system a power loss would leave if no unsynced byte reached the disk.
    pub fn synced_image(&self) -> MemFs {
        self.image(None)
    }

    fn image(&self, seed: Option<u64>) -> MemFs {
        let st = self.state.lock();
        let keep_unsynced = seed.is_some();
        let seed = seed.unwrap_or(0);
        let mut rng = seed ^ 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut inodes = HashMap::new();
        for &ino in st.durable.values() {
            if inodes.contains_key(&ino) {
                continue;
            }
            let i = &st.inodes[&ino];
            let mut data = i.synced.clone();
            if keep_unsynced && i.data.len() > i.synced.len() && i.data.starts_with(&i.synced) {
                let extra = i.data.len() - i.synced.len();
                let keep = (next() % (extra as u64 + 1)) as usize;
                data.extend_from_slice(&i.data[i.synced.len()..i.synced.len() + keep]);
            }
            inodes.insert(ino, Inode { synced: data.clone(), data });
        }
        let next_ino = st.next_ino;
        MemFs {
            state: Arc::new(Mutex::new(State {
                inodes,
                next_ino,
                live: st.durable.clone(),
                durable: st.durable.clone(),
                ..State::default()
            })),
        }
    }

    /// The current bytes of a file (for tests that corrupt files).
    pub fn file_bytes(&self, path: &Path) -> Option<Vec<u8>> {
        let st = self.state.lock();
        st.live.get(path).map(|ino| st.inodes[ino].data.clone())
    }

    /// Replaces a file's bytes, durably (for tests that corrupt files).
    pub fn set_file_bytes(&self, path: &Path, bytes: Vec<u8>) {
        let mut st = self.state.lock();
        if let Some(&ino) = st.live.get(path) {
            st.inodes.insert(ino, Inode { data: bytes.clone(), synced: bytes });
        }
    }
}

/// What `write(2)` says on a full disk.
fn no_space() -> std::io::Error {
    std::io::Error::from_raw_os_error(28)
}

impl Fs for MemFs {
    fn create(&self, path: &Path) -> Result<Arc<dyn File>> {
        let mut st = self.state.lock();
        st.step("create", path)?;
        if st.free() == 0 {
            return Err(Error::io(path, no_space()));
        }
        st.next_ino += 1;
        let ino = st.next_ino;
        st.inodes.insert(ino, Inode::default());
        st.live.insert(path.to_path_buf(), ino);
        Ok(Arc::new(MemFile { state: self.state.clone(), ino, path: path.to_path_buf() }))
    }
    fn open(&self, path: &Path) -> Result<Arc<dyn File>> {
        let st = self.state.lock();
        st.check_alive(path)?;
        let ino = st.ino(path)?;
        Ok(Arc::new(MemFile { state: self.state.clone(), ino, path: path.to_path_buf() }))
    }
    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        let mut st = self.state.lock();
        st.step("rename", from)?;
        let ino = st.ino(from)?;
        st.live.remove(from);
        st.live.insert(to.to_path_buf(), ino);
        Ok(())
    }
    fn remove(&self, path: &Path) -> Result<()> {
        let mut st = self.state.lock();
        st.step("remove", path)?;
        st.ino(path)?;
        st.live.remove(path);
        Ok(())
    }
    fn list(&self, dir: &Path) -> Result<Vec<String>> {
        let st = self.state.lock();
        st.check_alive(dir)?;
        Ok(st
            .live
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string))
            .collect())
    }
    fn create_dir_all(&self, dir: &Path) -> Result<()> {
        self.state.lock().check_alive(dir)
    }
    fn sync_dir(&self, dir: &Path) -> Result<()> {
        let mut st = self.state.lock();
        st.step("sync_dir", dir)?;
        let st = &mut *st;
        st.durable.retain(|p, _| p.parent() != Some(dir));
        for (p, &ino) in &st.live {
            if p.parent() == Some(dir) {
                st.durable.insert(p.clone(), ino);
            }
        }
        Ok(())
    }
    fn exists(&self, path: &Path) -> bool {
        self.state.lock().live.contains_key(path)
    }
    fn available_bytes(&self, _dir: &Path) -> Option<u64> {
        let st = self.state.lock();
        st.capacity.map(|_| st.free())
    }
    fn lock_dir(&self, dir: &Path) -> Result<Box<dyn std::any::Any + Send + Sync>> {
        self.state.lock().check_alive(dir)?;
        Ok(Box::new(()))
    }
    fn hard_link(&self, from: &Path, to: &Path) -> Result<()> {
        let mut st = self.state.lock();
        st.step("hard_link", from)?;
        let ino = st.ino(from)?;
        st.live.insert(to.to_path_buf(), ino);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_keeps_synced_bytes_and_durable_entries_only() {
        let fs = MemFs::new();
        let dir = Path::new("/d");
        let a = fs.create(&dir.join("a")).expect("create");
        a.append(b"hello").expect("append");
        a.sync().expect("sync");
        fs.sync_dir(dir).expect("sync dir");
        a.append(b" world").expect("append");
        let b = fs.create(&dir.join("b")).expect("create");
        b.append(b"lost").expect("append");
        b.sync().expect("sync");
        for seed in 0..20 {
            let img = fs.crash_image(seed);
            let got = img.file_bytes(&dir.join("a")).expect("a survives");
            assert!(got.starts_with(b"hello") && b"hello world".starts_with(&got[..]));
            assert!(img.file_bytes(&dir.join("b")).is_none(), "entry never made durable");
        }
    }

    #[test]
    fn crash_point_stops_all_later_io() {
        let fs = MemFs::new();
        fs.set_crash_at(Some(2));
        let a = fs.create(Path::new("/d/a")).expect("step 1");
        assert!(a.append(b"x").is_err());
        assert!(fs.crashed());
        assert!(a.sync().is_err());
        assert!(fs.list(Path::new("/d")).is_err());
    }
}
