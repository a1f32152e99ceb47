//! The write-ahead log: numbered segment files of framed records (see [`crate::record`]), one
//! record per write batch (see [`crate::batch`]).
//!
//! Invariants:
//! - Batches are appended in sequence-number order; sequence numbers are dense (+1 per batch).
//! - Every segment but the newest was fsynced before the next one was created, so only the
//!   newest segment can have a torn tail.
//! - A segment's directory entry is made durable before any record in it is acknowledged.
//! - Segments numbered below the manifest's `log_number` hold only flushed batches and may be
//!   deleted.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::fs::{File, Fs};
use crate::record;
use crate::Result;

/// The file name of WAL segment `n`.
pub fn segment_name(n: u64) -> String {
    format!("{n:06}.wal")
}

/// Parses a WAL segment file name.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    name.strip_suffix(".wal")?.parse().ok()
}

/// An open segment being appended to.
#[derive(Debug)]
pub struct Segment {
    file: Arc<dyn File>,
    number: u64,
    written: AtomicU64,
    synced: AtomicU64,
    frame: parking_lot::Mutex<Vec<u8>>,
    /// Held across an fsync, so concurrent syncs (a `Sync` group and the background syncer)
    /// coalesce into one.
    syncing: parking_lot::Mutex<()>,
}

impl Segment {
    /// Creates segment `number` in `dir` and makes its directory entry durable.
    pub fn create(fs: &dyn Fs, dir: &Path, number: u64) -> Result<Segment> {
        let file = fs.create(&dir.join(segment_name(number)))?;
        fs.sync_dir(dir)?;
        Ok(Segment {
            file,
            number,
            written: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            frame: parking_lot::Mutex::new(Vec::new()),
            syncing: parking_lot::Mutex::new(()),
        })
    }

    /// Opens the existing segment `number` without writing to it (an engine opened
    /// read-only): its bytes count as written and synced.
    pub fn open_existing(fs: &dyn Fs, dir: &Path, number: u64) -> Result<Segment> {
        let file = fs.open(&dir.join(segment_name(number)))?;
        let len = file.size()?;
        Ok(Segment {
            file,
            number,
            written: AtomicU64::new(len),
            synced: AtomicU64::new(len),
            frame: parking_lot::Mutex::new(Vec::new()),
            syncing: parking_lot::Mutex::new(()),
        })
    }

    /// Cuts off what a failed append may have left after the last whole one (a full disk
    /// takes part of a write), durably: the segment ends with a whole record again, and no
    /// batch of the failed append can come back after a crash (part of it may already have
    /// reached the disk through writeback or a background sync).
    pub fn rollback(&self) -> Result<()> {
        let _one_at_a_time = self.syncing.lock();
        self.file.truncate(self.written.load(Ordering::Acquire))?;
        self.file.sync()
    }

    /// The segment's file number.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// Appends the framed records of `payloads` with one write.
    pub fn append(&self, payloads: &[&[u8]]) -> Result<()> {
        let mut frame = self.frame.lock();
        frame.clear();
        for p in payloads {
            record::encode(self.number, p, &mut frame);
        }
        self.file.append(&frame)?;
        self.written.fetch_add(frame.len() as u64, Ordering::Release);
        Ok(())
    }

    /// Fsyncs everything appended so far; returns false (and does nothing) if that was
    /// already synced, by this call's turn.
    pub fn sync(&self) -> Result<bool> {
        let _one_at_a_time = self.syncing.lock();
        let target = self.written.load(Ordering::Acquire);
        if self.synced.load(Ordering::Acquire) >= target {
            return Ok(false);
        }
        self.file.sync()?;
        self.synced.fetch_max(target, Ordering::AcqRel);
        Ok(true)
    }

    /// Bytes appended and not yet synced.
    pub fn unsynced_bytes(&self) -> u64 {
        self.written.load(Ordering::Acquire).saturating_sub(self.synced.load(Ordering::Acquire))
    }
}

/// The path of segment `n` in `dir`.
pub fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(segment_name(n))
}
