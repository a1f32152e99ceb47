//! Corruption: flipped, zeroed and truncated bytes in tables, WAL and manifest, and swapped
//! blocks. The engine must report `Error::Corruption` naming the file (and offset), or recover
//! exactly as documented (a torn WAL tail) — never panic, never serve a wrong value.

mod support;

use std::path::{Path, PathBuf};

use quiver_storage::sstable::Table;
use quiver_storage::{
    AsOf, Background, Compression, Db, Durability, Error, EventTime, FeatureId, Options, SystemTime, Value, WriteBatch,
};
use support::Model;

const ENTITIES: usize = 12;
const FEATURES: u32 = 3;

fn options() -> Options {
    Options {
        memtable_bytes: 64 << 20,
        block_bytes: 256,
        compression: Compression::None,
        background: Background::Inline,
        ..Options::default()
    }
}

fn write_batches(db: &Db, model: &mut Model, n: usize) {
    for i in 0..n {
        let mut b = WriteBatch::new();
        let mut ops = Vec::new();
        for f in 0..FEATURES {
            let entity = format!("entity-{:02}", (i * 5 + f as usize) % ENTITIES).into_bytes();
            let v = Value::Int64((i * 10 + f as usize) as i64);
            b.put(&entity, FeatureId(f), EventTime(i as i64), v.clone()).expect("put");
            ops.push((entity, FeatureId(f), EventTime(i as i64), Some(v)));
        }
        let r = db.write(b, Durability::Sync).expect("write");
        model.apply(r.system_time, &ops);
    }
}

fn files_with(dir: &Path, pred: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(&pred))
        .collect();
    v.sort();
    v
}

/// Every read either fails with corruption or matches the model.
fn reads_are_right_or_corrupt(db: &Db, model: &Model) -> usize {
    let mut errors = 0;
    for e in 0..ENTITIES {
        let entity = format!("entity-{e:02}").into_bytes();
        for f in 0..FEATURES {
            for t in [0i64, 5, 50] {
                let q = AsOf::at(EventTime(t));
                match db.value_at(&entity, FeatureId(f), q) {
                    Ok(v) => assert_eq!(
                        v.and_then(|v| v.value),
                        model.value_at(&entity, FeatureId(f), q),
                        "wrong value served"
                    ),
                    Err(Error::Corruption { .. }) => errors += 1,
                    Err(other) => panic!("unexpected error {other}"),
                }
            }
        }
    }
    errors
}

fn expect_corruption_in(r: Result<(), Error>, file: &Path, what: &str) {
    match r {
        Err(Error::Corruption { file: f, .. }) => assert_eq!(f, file, "{what}: corruption names the wrong file"),
        Err(other) => panic!("{what}: expected corruption, got {other}"),
        Ok(()) => panic!("{what}: corruption went unnoticed"),
    }
}

fn with_table() -> (tempfile::TempDir, PathBuf, Model) {
    with_table_compressed(Compression::None)
}

/// A directory with one table whose data blocks are compressed with `compression`.
fn with_table_compressed(compression: Compression) -> (tempfile::TempDir, PathBuf, Model) {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("db");
    let db = Db::open(&dir, Options { compression, ..options() }).expect("open");
    let mut model = Model::default();
    write_batches(&db, &mut model, 40);
    db.compact_all().expect("compact");
    db.close().expect("close");
    (tmp, dir, model)
}

#[test]
fn table_bit_flips_are_caught_everywhere() {
    bit_flips_are_caught_everywhere(Compression::None);
}

/// The same with LZ4 blocks (the default): no flip decompresses into a wrong answer.
#[test]
fn lz4_table_bit_flips_are_caught_everywhere() {
    bit_flips_are_caught_everywhere(Compression::Lz4);
}

fn bit_flips_are_caught_everywhere(compression: Compression) {
    let (_tmp, dir, model) = with_table_compressed(compression);
    let tables = files_with(&dir, |n| n.ends_with(".sst"));
    assert_eq!(tables.len(), 1);
    let path = &tables[0];
    let good = std::fs::read(path).expect("read");
    // The codec's bytes are there to flip: count the data blocks stored with it.
    let number = quiver_storage::sstable::parse_table_name(path.file_name().and_then(|n| n.to_str()).expect("name"))
        .expect("number");
    let table = Table::open(&quiver_storage::fs::RealFs, &dir, number).expect("table");
    let codec = |i| {
        let h = table.block_handle(i);
        good[(h.offset + h.len) as usize]
    };
    let compressed = (0..table.block_count()).filter(|&i| codec(i) != 0).count();
    match compression {
        Compression::None => assert_eq!(compressed, 0),
        _ => assert!(compressed * 2 > table.block_count(), "{compressed} of {} blocks compressed", table.block_count()),
    }
    for pos in 0..good.len() {
        let mut bad = good.clone();
        bad[pos] ^= 1 << (pos % 8);
        std::fs::write(path, &bad).expect("write");
        let what = format!("flip at byte {pos} of {}", good.len());
        match Db::open(&dir, options()) {
            Err(e) => expect_corruption_in(Err(e), path, &what),
            Ok(db) => {
                reads_are_right_or_corrupt(&db, &model);
                expect_corruption_in(db.verify(), path, &what);
            }
        }
    }
    std::fs::write(path, &good).expect("restore");
    let db = Db::open(&dir, options()).expect("open");
    db.verify().expect("the restored table verifies");
    assert_eq!(reads_are_right_or_corrupt(&db, &model), 0);
}

#[test]
fn table_zeroed_ranges_truncation_and_swapped_blocks_are_caught() {
    let (_tmp, dir, model) = with_table();
    let path = files_with(&dir, |n| n.ends_with(".sst")).remove(0);
    let good = std::fs::read(&path).expect("read");
    for start in (0..good.len()).step_by(37) {
        let mut bad = good.clone();
        let end = (start + 64).min(bad.len());
        if bad[start..end].iter().all(|&b| b == 0) {
            continue;
        }
        bad[start..end].fill(0);
        std::fs::write(&path, &bad).expect("write");
        let what = format!("zeroed {start}..{end}");
        match Db::open(&dir, options()) {
            Err(e) => expect_corruption_in(Err(e), &path, &what),
            Ok(db) => {
                reads_are_right_or_corrupt(&db, &model);
                expect_corruption_in(db.verify(), &path, &what);
            }
        }
    }
    for len in (0..good.len()).step_by(23) {
        std::fs::write(&path, &good[..len]).expect("write");
        expect_corruption_in(Db::open(&dir, options()).map(drop), &path, &format!("truncated to {len}"));
    }
    // Swap two data blocks of the same length: every byte is intact, only the place is wrong.
    std::fs::write(&path, &good).expect("restore");
    let number = quiver_storage::sstable::parse_table_name(path.file_name().and_then(|n| n.to_str()).expect("name"))
        .expect("number");
    let table = Table::open(&quiver_storage::fs::RealFs, &dir, number).expect("table");
    let handles: Vec<_> = (0..table.block_count()).map(|i| table.block_handle(i)).collect();
    let (a, b) = handles
        .iter()
        .enumerate()
        .find_map(|(i, a)| handles[i + 1..].iter().find(|b| b.len == a.len).map(|b| (*a, *b)))
        .expect("two blocks of equal length");
    let mut swapped = good.clone();
    let n = a.len as usize + quiver_storage::sstable::BLOCK_TRAILER_BYTES;
    let (ao, bo) = (a.offset as usize, b.offset as usize);
    let block_a = good[ao..ao + n].to_vec();
    swapped[ao..ao + n].copy_from_slice(&good[bo..bo + n]);
    swapped[bo..bo + n].copy_from_slice(&block_a);
    std::fs::write(&path, &swapped).expect("write");
    let db = Db::open(&dir, options()).expect("index and footer are intact");
    assert!(reads_are_right_or_corrupt(&db, &model) > 0, "reads of the swapped blocks must fail");
    expect_corruption_in(db.verify(), &path, "swapped blocks");
}

fn with_wal() -> (tempfile::TempDir, PathBuf, Model) {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("db");
    let db = Db::open(&dir, options()).expect("open");
    let mut model = Model::default();
    write_batches(&db, &mut model, 20);
    db.close().expect("close");
    (tmp, dir, model)
}

/// A copy of a database directory, so that a test can open (and so change) it freely.
fn copy_dir(dir: &Path) -> (tempfile::TempDir, PathBuf) {
    let copy = tempfile::tempdir().expect("tmp");
    let cdir = copy.path().join("db");
    std::fs::create_dir_all(&cdir).expect("mkdir");
    for f in std::fs::read_dir(dir).expect("dir") {
        let f = f.expect("entry").path();
        std::fs::copy(&f, cdir.join(f.file_name().expect("name"))).expect("copy");
    }
    (copy, cdir)
}

fn wal_segment(dir: &Path) -> PathBuf {
    files_with(dir, |n| n.ends_with(".wal"))
        .into_iter()
        .find(|p| std::fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false))
        .expect("a non-empty WAL segment")
}

#[test]
fn wal_flips_are_corruption_with_file_and_offset() {
    let (_tmp, dir, _model) = with_wal();
    let path = wal_segment(&dir);
    let good = std::fs::read(&path).expect("read");
    // Record boundaries: header is crc(4) len(4) type(1).
    let mut starts = Vec::new();
    let mut off = 0;
    while off < good.len() {
        starts.push(off);
        let len = u32::from_le_bytes([good[off + 4], good[off + 5], good[off + 6], good[off + 7]]) as usize;
        off += 9 + len;
    }
    assert_eq!(starts.len(), 20);
    for pos in 0..good.len() {
        let mut bad = good.clone();
        bad[pos] ^= 0x10;
        let (_copy, cdir) = copy_dir(&dir);
        let path = cdir.join(path.file_name().expect("name"));
        std::fs::write(&path, &bad).expect("write");
        let record = starts.iter().rev().find(|&&s| s <= pos).copied().expect("record");
        match Db::open(&cdir, options()) {
            Err(Error::Corruption { file, offset, .. }) => {
                assert_eq!(file, path, "flip at {pos}");
                assert_eq!(offset, record as u64, "flip at {pos} is reported at its record");
            }
            Err(e) => panic!("flip at {pos}: unexpected error {e}"),
            Ok(_) => panic!("flip at {pos} went unnoticed"),
        }
    }
}

#[test]
fn wal_truncation_recovers_a_prefix_of_batches() {
    let (_tmp, dir, model) = with_wal();
    let path = wal_segment(&dir);
    let good = std::fs::read(&path).expect("read");
    let stamps: Vec<_> = {
        let mut s: Vec<_> = model.rows().map(|r| r.3).collect();
        s.sort();
        s.dedup();
        s
    };
    for len in (0..good.len()).step_by(11) {
        let (_copy, cdir) = copy_dir(&dir);
        let cpath = cdir.join(path.file_name().expect("name"));
        std::fs::write(&cpath, &good[..len]).expect("truncate");
        let db = Db::open(&cdir, options()).unwrap_or_else(|e| panic!("truncated to {len}: {e}"));
        // Whatever survived is a prefix of the batches: find how many and compare with the model.
        let present = stamps
            .iter()
            .take_while(|s| {
                let (entity, feature, event_time, _, _) = model.rows().find(|r| r.3 == **s).expect("row");
                let q = AsOf { known_at: **s, lookback_us: Some(0), ..AsOf::at(event_time) };
                db.value_at(&entity, feature, q).expect("read").is_some()
            })
            .count();
        let mut m = model.clone();
        m.0.retain(|_, v| stamps[..present].contains(&SystemTime(v.system_time)));
        assert_eq!(reads_are_right_or_corrupt(&db, &m), 0, "truncated to {len}: recovered state is not a prefix");
    }
}

#[test]
fn manifest_and_current_flips_are_corruption() {
    let (_tmp, dir, _model) = with_table();
    let manifest = files_with(&dir, |n| n.starts_with("MANIFEST-")).remove(0);
    let good = std::fs::read(&manifest).expect("read");
    for pos in 0..good.len() {
        let mut bad = good.clone();
        bad[pos] ^= 0x04;
        let (_copy, cdir) = copy_dir(&dir);
        let cmanifest = cdir.join(manifest.file_name().expect("name"));
        std::fs::write(&cmanifest, &bad).expect("write");
        let what = format!("manifest flip at {pos}");
        expect_corruption_in(Db::open(&cdir, options()).map(drop), &cmanifest, &what);
    }
    std::fs::write(&manifest, &good).expect("restore");
    let current = dir.join("CURRENT");
    let good_current = std::fs::read(&current).expect("read");
    std::fs::write(&current, b"MANIFEST-9x9\n").expect("write");
    expect_corruption_in(Db::open(&dir, options()).map(drop), &current, "bad CURRENT");
    std::fs::remove_file(&current).expect("rm");
    expect_corruption_in(Db::open(&dir, options()).map(drop), &current, "missing CURRENT");
    std::fs::write(&current, good_current).expect("restore");
    Db::open(&dir, options()).expect("restored directory opens").verify().expect("verifies");
}
