//! Opening the engine: reading the manifest, replaying the WAL, removing leftovers.
//!
//! Recovery yields every batch whose WAL record was synced, in sequence order with no gap, and
//! no part of any batch whose record is torn. Steps:
//! 1. `CURRENT` names the manifest; its edits rebuild the file set (a torn last edit is ignored:
//!    it was never acknowledged). Every table the manifest names must exist and open cleanly.
//! 2. WAL segments numbered at or above the manifest's log number are replayed in order into a
//!    memtable. Sequence numbers must continue without a gap from the manifest's last sequence.
//!    Only the newest segment may end in a torn record; it is truncated there and synced.
//! 3. A new manifest is written (a snapshot) and `CURRENT` switched to it; the replayed
//!    memtable is flushed to L0, and files nothing refers to are deleted.
//! 4. On a full disk: if step 3's manifest or new WAL segment finds no space, the engine opens
//!    *read-only* (what was replayed is served from memory, every write is refused with
//!    [`Error::NoSpace`]) rather than refusing to start; the attempt's pieces are removed and
//!    nothing else changes on disk (beyond step 2's cut of a torn tail). If only the flush of
//!    the replayed memtable, or the edit retiring old segments, finds no space, the engine
//!    opens normally and the background work catches up once space is freed.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex, RwLock};

use super::{write::insert_batch, Counters, Inner, ManifestWriter, ReadView, VersionSet, WriterState};
use crate::batch;
use crate::fs::{self, Fs};
use crate::hlc::Hlc;
use crate::limits::LEVELS;
use crate::manifest::{self, FileMeta, VersionEdit, CURRENT};
use crate::memtable::Memtable;
use crate::options::Options;
use crate::record;
use crate::sstable::{self, SsdTier, Table};
use crate::version::{TableHandle, Version};
use crate::wal::{self, Segment};
use crate::{Error, Result};

/// Sanity bound on file and sequence numbers read from disk: far beyond any real use, and far
/// enough from `u64::MAX` that incrementing never overflows.
const COUNTER_MAX: u64 = u64::MAX >> 8;

pub(super) struct Recovered {
    pub(super) levels: [BTreeMap<u64, FileMeta>; LEVELS],
    manifest_number: Option<u64>,
    pub(super) log_number: u64,
    next_file_number: u64,
    pub(super) last_seqno: u64,
    hlc: u64,
    horizon: i64,
    pub(super) knowledge: crate::types::VersionVector,
}

pub(super) fn read_manifest(fs: &dyn Fs, dir: &Path) -> Result<Recovered> {
    let mut r = Recovered {
        levels: Default::default(),
        manifest_number: None,
        log_number: 0,
        next_file_number: 1,
        last_seqno: 0,
        hlc: 0,
        horizon: i64::MIN,
        knowledge: crate::types::VersionVector::new(),
    };
    let current_path = dir.join(CURRENT);
    if !fs.exists(&current_path) {
        return Ok(r);
    }
    let number = manifest::parse_current(&current_path, &fs::read_all(fs.open(&current_path)?.as_ref())?)?;
    let path = dir.join(manifest::manifest_name(number));
    if !fs.exists(&path) {
        return Err(Error::corruption(&path, 0, "manifest named by CURRENT is missing"));
    }
    let bytes = fs::read_all(fs.open(&path)?.as_ref())?;
    let records = record::read_all(&path, number, &bytes, true)?;
    if records.records.is_empty() {
        return Err(Error::corruption(&path, 0, "manifest holds no complete edit"));
    }
    for (offset, payload) in records.records {
        let corrupt = |what: &str| Error::corruption(&path, offset, what);
        let edit = VersionEdit::decode(payload).map_err(corrupt)?;
        for (level, n) in &edit.deleted {
            if r.levels[*level].remove(n).is_none() {
                return Err(corrupt("edit deletes a table that is not in the version"));
            }
        }
        for (level, meta) in edit.added {
            if r.levels.iter().any(|l| l.contains_key(&meta.number)) {
                return Err(corrupt("edit adds a table twice"));
            }
            r.levels[level].insert(meta.number, meta);
        }
        if let Some(v) = edit.log_number {
            r.log_number = v;
        }
        if let Some(v) = edit.next_file_number {
            r.next_file_number = v;
        }
        if let Some(v) = edit.last_seqno {
            r.last_seqno = r.last_seqno.max(v);
        }
        if let Some(v) = edit.hlc_high_water {
            r.hlc = r.hlc.max(v);
        }
        if let Some(v) = edit.event_horizon {
            r.horizon = v;
        }
        if let Some(k) = &edit.knowledge {
            r.knowledge = r.knowledge.merge(k);
        }
    }
    r.manifest_number = Some(number);
    Ok(r)
}

/// Writes a new manifest holding the whole state of `vs` (with `pending` applied) and switches
/// `CURRENT` to it.
pub(super) fn write_new_manifest(
    fs: &dyn Fs,
    dir: &Path,
    vs: &mut VersionSet,
    hlc: &Hlc,
    pending: Option<&VersionEdit>,
) -> Result<()> {
    let number = vs.new_file_number();
    let mut snapshot = VersionEdit {
        format_version: Some(manifest::FORMAT_VERSION),
        log_number: Some(vs.log_number),
        next_file_number: Some(vs.next_file_number),
        last_seqno: Some(vs.last_seqno),
        hlc_high_water: Some(hlc.high_water()),
        event_horizon: Some(vs.event_horizon),
        added: Vec::new(),
        deleted: Vec::new(),
        knowledge: Some(vs.knowledge.clone()),
    };
    let mut levels: Vec<Vec<FileMeta>> =
        vs.current.levels.iter().map(|l| l.iter().map(|t| t.meta.clone()).collect()).collect();
    if let Some(p) = pending {
        for (level, n) in &p.deleted {
            levels[*level].retain(|m| m.number != *n);
        }
        for (level, m) in &p.added {
            levels[*level].push(m.clone());
        }
        snapshot.log_number = p.log_number.or(snapshot.log_number);
        snapshot.last_seqno = Some(vs.last_seqno.max(p.last_seqno.unwrap_or(0)));
        snapshot.event_horizon = p.event_horizon.or(snapshot.event_horizon);
    }
    for (level, metas) in levels.into_iter().enumerate() {
        snapshot.added.extend(metas.into_iter().map(|m| (level, m)));
    }
    let payload = snapshot.encode();
    if payload.len() > crate::limits::RECORD_BYTES_MAX {
        return Err(Error::InvalidArgument(format!(
            "the file set needs a {}-byte manifest snapshot, over the record limit; compact to fewer tables",
            payload.len()
        )));
    }
    let path = dir.join(manifest::manifest_name(number));
    let mut buf = Vec::new();
    record::encode(number, &payload, &mut buf);
    let file = (|| {
        let file = fs.create(&path)?;
        file.append(&buf)?;
        file.sync()?;
        fs.sync_dir(dir)?;
        fs::write_file_atomic(fs, dir, CURRENT, format!("{}\n", manifest::manifest_name(number)).as_bytes())?;
        Ok(file)
    })()
    .inspect_err(|e: &Error| {
        // A full disk stopped it before `CURRENT` changed (the rename needs no space): the old
        // manifest stays in force, and the new one's pieces go.
        if e.is_no_space() {
            for p in [path.clone(), dir.join(format!("{CURRENT}.tmp"))] {
                if fs.exists(&p) {
                    let _ = fs.remove(&p);
                }
            }
        }
    })?;
    let old = vs.manifest.replace(ManifestWriter { file, number, bytes: buf.len() as u64 });
    if let Some(old) = old {
        let _ = fs.remove(&dir.join(manifest::manifest_name(old.number)));
    }
    Ok(())
}

/// Writes a fresh manifest describing exactly `version` into `dir` (a checkpoint) and points
/// `CURRENT` at it. The directory holds no WAL, so the log number is past every file number.
pub(super) fn write_snapshot_manifest(
    fs: &dyn Fs,
    dir: &Path,
    version: &Version,
    (next_file_number, last_seqno, horizon): (u64, u64, i64),
    hlc: u64,
    knowledge: crate::types::VersionVector,
) -> Result<()> {
    let number = next_file_number;
    let snapshot = VersionEdit {
        format_version: Some(manifest::FORMAT_VERSION),
        log_number: Some(number + 1),
        next_file_number: Some(number + 2),
        last_seqno: Some(last_seqno),
        hlc_high_water: Some(hlc),
        event_horizon: Some(horizon),
        added: version
            .levels
            .iter()
            .enumerate()
            .flat_map(|(l, ts)| ts.iter().map(move |t| (l, t.meta.clone())))
            .collect(),
        deleted: Vec::new(),
        // A node bootstrapped from the checkpoint stamps its writes with what this one knew.
        knowledge: Some(knowledge),
    };
    let payload = snapshot.encode();
    if payload.len() > crate::limits::RECORD_BYTES_MAX {
        return Err(Error::InvalidArgument("the file set is too large for one manifest record".into()));
    }
    let file = fs.create(&dir.join(manifest::manifest_name(number)))?;
    let mut buf = Vec::new();
    record::encode(number, &payload, &mut buf);
    file.append(&buf)?;
    file.sync()?;
    fs.sync_dir(dir)?;
    fs::write_file_atomic(fs, dir, CURRENT, format!("{}\n", manifest::manifest_name(number)).as_bytes())
}

fn max_file_number(names: &[String]) -> u64 {
    names
        .iter()
        .filter_map(|n| {
            let base = n.strip_suffix(".tmp").unwrap_or(n);
            wal::parse_segment_name(base)
                .or_else(|| sstable::parse_table_name(base))
                .or_else(|| manifest::parse_manifest_name(base))
        })
        .max()
        .unwrap_or(0)
        .saturating_add(1)
}

pub(super) fn open(fs: Arc<dyn Fs>, dir: &Path, opts: Options) -> Result<Inner> {
    opts.validate()?;
    fs.create_dir_all(dir)?;
    let lock = fs.lock_dir(dir)?;
    let names = fs.list(dir)?;
    let has_data = names.iter().any(|n| wal::parse_segment_name(n).is_some() || sstable::parse_table_name(n).is_some());
    if has_data && !names.iter().any(|n| n == CURRENT) {
        return Err(Error::corruption(dir.join(CURRENT), 0, "CURRENT is missing but the directory holds data files"));
    }
    let rec = read_manifest(fs.as_ref(), dir)?;

    let ssd = Arc::new(SsdTier::open(fs.as_ref(), dir, opts.io_backend, opts.direct_reads, opts.block_cache_bytes)?);
    // Open every table the manifest names.
    let mut version = Version::default();
    for (level, metas) in rec.levels.iter().enumerate() {
        for meta in metas.values() {
            let path = dir.join(sstable::table_name(meta.number));
            if !fs.exists(&path) {
                return Err(Error::corruption(&path, 0, "table named by the manifest is missing"));
            }
            let table = Table::open_in(fs.as_ref(), dir, meta.number, Some(ssd.clone()))?;
            if table.size() != meta.size {
                return Err(Error::corruption(
                    &path,
                    table.size(),
                    format!("table is {} bytes, the manifest says {}", table.size(), meta.size),
                ));
            }
            version.levels[level].push(TableHandle::new(meta.clone(), table, fs.clone()));
        }
    }
    let version = version.apply(&VersionEdit::default(), &[]);
    version.check().map_err(|what| Error::corruption(dir.join(CURRENT), 0, what))?;

    let hlc = Hlc::new(opts.clock.clone(), rec.hlc);

    // Replay the WAL.
    let mut segments: Vec<u64> =
        names.iter().filter_map(|n| wal::parse_segment_name(n)).filter(|&n| n >= rec.log_number).collect();
    segments.sort_unstable();
    let replayed = Arc::new(Memtable::new(segments.last().copied().unwrap_or(0)));
    let mut last_seqno = rec.last_seqno;
    let mut knowledge = rec.knowledge.clone();
    for (i, &number) in segments.iter().enumerate() {
        let path = wal::segment_path(dir, number);
        let file = fs.open(&path)?;
        let bytes = fs::read_all(file.as_ref())?;
        let newest = i + 1 == segments.len();
        let records = record::read_all(&path, number, &bytes, newest)?;
        for (offset, payload) in &records.records {
            let b = batch::decode(payload).map_err(|w| Error::corruption(&path, *offset, w))?;
            if b.seqno <= rec.last_seqno {
                // Already in tables (a flush finished but its WAL was not yet deleted).
                continue;
            }
            if b.seqno != last_seqno + 1 {
                return Err(Error::corruption(
                    &path,
                    *offset,
                    format!("sequence gap: expected batch {}, found {}", last_seqno + 1, b.seqno),
                ));
            }
            insert_batch(&replayed, &b);
            hlc.observe(b.system_time.0);
            knowledge = knowledge.merge(&super::replicate::learned(&b));
            last_seqno = b.seqno;
        }
        if records.valid_len < bytes.len() as u64 {
            tracing::warn!(file = %path.display(), valid = records.valid_len, len = bytes.len(), "truncating torn WAL tail");
            file.truncate(records.valid_len)?;
            file.sync()?;
        }
    }
    replayed.set_last_seqno(last_seqno);
    // Nothing this node wrote before is stamped above the clock's high water (after replay).
    let own_stamp_max = hlc.high_water();

    if rec.next_file_number > COUNTER_MAX || max_file_number(&names) > COUNTER_MAX || last_seqno > COUNTER_MAX {
        return Err(Error::corruption(
            dir.join(CURRENT),
            0,
            "file number or sequence number near the end of its range (damaged manifest or stray file name)",
        ));
    }
    let mut vs = VersionSet {
        current: Arc::new(version),
        manifest: None,
        next_file_number: rec.next_file_number.max(max_file_number(&names)),
        log_number: rec.log_number,
        last_seqno: rec.last_seqno,
        event_horizon: rec.horizon,
        cursor: Default::default(),
        knowledge: knowledge.clone(),
    };
    // The first writes of the open: a new manifest and a new WAL segment. On a full disk the
    // engine opens read-only instead (step 4 of the module doc).
    let mut created = None;
    let started = (|| {
        write_new_manifest(fs.as_ref(), dir, &mut vs, &hlc, None)?;
        let number = vs.new_file_number();
        created = Some(number);
        Segment::create(fs.as_ref(), dir, number)
    })();
    let (seg, read_only) = match started {
        Ok(seg) => (Arc::new(seg), None),
        Err(e) if e.is_no_space() => {
            if let Some(path) = created.map(|n| wal::segment_path(dir, n)) {
                if fs.exists(&path) {
                    let _ = fs.remove(&path);
                }
            }
            // The newest segment stands in for the WAL: nothing is appended to it.
            let Some(&newest) = segments.last() else { return Err(e) };
            let what = format!("the disk was full when the engine opened ({e}): it serves reads only");
            tracing::error!(dir = %dir.display(), "{what}");
            (Arc::new(Segment::open_existing(fs.as_ref(), dir, newest)?), Some(what))
        }
        Err(e) => return Err(e),
    };
    let wal_number = seg.number();
    let mem = Arc::new(Memtable::new(wal_number));
    let imms = if replayed.is_empty() { Vec::new() } else { vec![replayed.clone()] };
    // An engine holding no version yet starts its hot tier complete (see `src/hot.rs`).
    let fresh = read_only.is_none() && replayed.is_empty() && vs.current.levels.iter().all(|l| l.is_empty());
    let view = ReadView { mem, imms, version: vs.current.clone() };
    let horizon = vs.event_horizon;
    let inner = Inner {
        fs: fs.clone(),
        dir: dir.to_path_buf(),
        view: RwLock::new(Arc::new(view)),
        versions: Mutex::new(vs),
        writer: Mutex::new(WriterState { last_seqno, wal: seg.clone() }),
        commit: super::group::GroupQueue::new(),
        current_wal: Mutex::new(seg),
        visible: AtomicU64::new(hlc.high_water()),
        published_seqno: AtomicU64::new(last_seqno),
        hlc,
        horizon: RwLock::new(horizon),
        horizon_now: std::sync::atomic::AtomicI64::new(horizon),
        work: Mutex::new(()),
        work_cv: Condvar::new(),
        bg_error: Mutex::new(None),
        no_space: Default::default(),
        read_only,
        shutdown: std::sync::atomic::AtomicBool::new(false),
        flush_lock: Mutex::new(()),
        compaction_lock: Mutex::new(()),
        counters: Counters::default(),
        _lock: lock,
        ssd,
        hot: crate::hot::HotTier::new(opts.hot_tier_bytes, fresh),
        tiles: crate::tiles::Tiles::new(opts.tile_cache_bytes),
        dropped_features: RwLock::new(Arc::new(Vec::new())),
        knowledge: Mutex::new(knowledge),
        log_needed_after: AtomicU64::new(if opts.replication_log_bytes > 0 { 0 } else { u64::MAX }),
        segment_last_seqno: Mutex::new(std::collections::BTreeMap::new()),
        pruned_log: Mutex::new(Default::default()),
        own_stamp_max: AtomicU64::new(own_stamp_max),
        log_tail: Mutex::new(super::replicate::LogTail::new(last_seqno, opts.replication_tail_bytes)),
        log_covered: AtomicU64::new(last_seqno),
        opts,
    };
    if inner.read_only.is_some() {
        return Ok(inner);
    }
    // Flush what was replayed, then drop the segments it came from. On a full disk the
    // replayed memtable stays in memory, to be flushed by the background work once there is
    // space; its segments stay until then.
    if replayed.is_empty() {
        let mut vs = inner.versions.lock();
        let edit = VersionEdit { log_number: Some(wal_number), ..Default::default() };
        match inner.log_and_apply(&mut vs, edit, &[], |_| {}) {
            // The old segments hold nothing unflushed: replaying them next time skips every
            // batch, and the next flush's edit moves the log number past them.
            Err(e) if e.is_no_space() => tracing::warn!(error = %e, "disk full: old WAL segments kept until a flush"),
            other => other?,
        }
    } else {
        loop {
            match inner.flush_oldest() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) if e.is_no_space() => break,
                Err(e) => return Err(e),
            }
        }
    }
    remove_leftovers(&inner)?;
    Ok(inner)
}

/// Deletes files no version refers to: tables of failed or finished compactions, temp files,
/// flushed WAL segments, old manifests.
fn remove_leftovers(inner: &Inner) -> Result<()> {
    let vs = inner.versions.lock();
    let live: std::collections::HashSet<u64> = vs.current.all_tables().map(|t| t.meta.number).collect();
    let manifest_number = vs.manifest.as_ref().map(|m| m.number);
    let log_number = vs.log_number;
    drop(vs);
    for name in inner.fs.list(&inner.dir)? {
        let stale = name.ends_with(".tmp")
            || sstable::parse_table_name(&name).is_some_and(|n| !live.contains(&n))
            || manifest::parse_manifest_name(&name).is_some_and(|n| Some(n) != manifest_number);
        if stale {
            inner.fs.remove(&inner.dir.join(&name))?;
        }
    }
    for number in inner.prunable_segments(log_number)? {
        inner.fs.remove(&wal::segment_path(&inner.dir, number))?;
    }
    Ok(())
}
