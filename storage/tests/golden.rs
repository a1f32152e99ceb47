//! Golden files: a fixed workload must produce byte-identical WAL, table and manifest files to
//! the ones checked in under `testdata/golden/`, and those files must open and read back. A
//! format change fails here until the files are regenerated on purpose
//! (`QUIVER_BLESS=1 cargo test -p quiver-storage --test golden`) and FORMAT.md is updated.
//! The files of older format versions stay under `testdata/golden/v<N>/` and must still read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use quiver_storage::fs::{Fs, MemFs};
use quiver_storage::{
    AsOf, Background, Compression, Db, Durability, EventTime, FeatureId, ManualClock, Options, Value, VersionVector,
    WriteBatch,
};

fn options() -> Options {
    Options {
        block_bytes: 128,
        // LZ4 (the default), so the golden table holds the codec's bytes. The encoder is the
        // `lz4_flex` crate's: upgrading it may change them (and needs a bless), not the format.
        compression: Compression::Lz4,
        background: Background::Inline,
        region: 3,
        clock: Arc::new(ManualClock::new(1_700_000_000_000_000)),
        ..Options::default()
    }
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden")
}

/// Runs the fixed workload and returns the files it leaves, by role.
fn produce() -> BTreeMap<String, Vec<u8>> {
    let fs = MemFs::new();
    let dir = Path::new("/db");
    let db = Db::open_with_fs(Arc::new(fs.clone()), dir, options()).expect("open");
    let mut b = WriteBatch::new();
    b.put(b"user:1", FeatureId(1), EventTime(100), Value::Float32(0.5)).expect("put");
    b.put(b"user:1", FeatureId(2), EventTime(100), Value::String("gold".into())).expect("put");
    db.write(b, Durability::Sync).expect("write");
    let mut b = WriteBatch::new();
    b.put_with_version(
        b"user:2",
        FeatureId(1),
        EventTime(-7),
        Value::Int64List(vec![1, -1]),
        VersionVector::from_entries(vec![(1, 9), (3, 4)]).expect("vv"),
    )
    .expect("put");
    b.delete(b"user:1", FeatureId(2), EventTime(200)).expect("delete");
    db.write(b, Durability::Sync).expect("write");
    let mut out = BTreeMap::new();
    let file = |pred: &dyn Fn(&str) -> bool| -> Vec<u8> {
        let names = fs.list(dir).expect("list");
        let name =
            names.iter().filter(|n| pred(n)).find(|n| fs.file_bytes(&dir.join(n)).is_some_and(|b| !b.is_empty()));
        fs.file_bytes(&dir.join(name.expect("file present"))).expect("bytes")
    };
    out.insert("wal".to_string(), file(&|n| n.ends_with(".wal")));
    db.flush().expect("flush");
    out.insert("sst".to_string(), file(&|n| n.ends_with(".sst")));
    out.insert("manifest".to_string(), file(&|n| n.starts_with("MANIFEST-")));
    out.insert("current".to_string(), file(&|n| n == "CURRENT"));
    db.close().expect("close");
    out
}

#[test]
fn formats_match_the_checked_in_bytes() {
    let got = produce();
    let dir = golden_dir();
    if std::env::var_os("QUIVER_BLESS").is_some() {
        std::fs::create_dir_all(&dir).expect("mkdir");
        for (name, bytes) in &got {
            std::fs::write(dir.join(name), bytes).expect("write golden");
        }
    }
    for (name, bytes) in &got {
        let want = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("golden file {name}: {e}"));
        assert!(want == *bytes, "{name} differs from testdata/golden/{name}: the on-disk format changed");
    }
}

#[test]
fn checked_in_files_open_and_read_back() {
    read_back(&golden_dir());
}

/// Tables of format version 1 (cells in the full form only, `testdata/golden/v1/`, the files
/// this workload left before version 2) still open and read the same.
#[test]
fn version_1_files_open_and_read_back() {
    read_back(&golden_dir().join("v1"));
}

/// Tables of format version 2 (zstd or uncompressed blocks only, `testdata/golden/v2/`, the
/// files this workload left before version 3) still open and read the same.
#[test]
fn version_2_files_open_and_read_back() {
    read_back(&golden_dir().join("v2"));
}

/// Opens a directory rebuilt from the golden files in `golden` and checks what it reads.
fn read_back(golden: &Path) {
    let fs = MemFs::new();
    let dir = Path::new("/db");
    // Rebuild a directory from the golden table, manifest and CURRENT (the WAL was flushed).
    let current = std::fs::read(golden.join("current")).expect("current");
    let manifest_name = String::from_utf8(current.clone()).expect("utf8").trim().to_string();
    let manifest = std::fs::read(golden.join("manifest")).expect("manifest");
    let sst = std::fs::read(golden.join("sst")).expect("sst");
    let table_name = {
        // The manifest's add-table field names the table; the workload's is the first table.
        let staging = produce_names();
        staging.into_iter().find(|n| n.ends_with(".sst")).expect("table name")
    };
    for (name, bytes) in [("CURRENT", current), (manifest_name.as_str(), manifest), (table_name.as_str(), sst)] {
        let f = fs.create(&dir.join(name)).expect("create");
        f.append(&bytes).expect("append");
        f.sync().expect("sync");
    }
    fs.sync_dir(dir).expect("sync dir");
    let db = Db::open_with_fs(Arc::new(fs), dir, options()).expect("golden directory opens");
    db.verify().expect("golden table verifies");
    let v = db.value_at(b"user:1", FeatureId(1), AsOf::at(EventTime(150))).expect("read").expect("present");
    assert_eq!(v.value, Some(Value::Float32(0.5)));
    assert_eq!(v.version_vector, VersionVector::single(3, v.system_time.0));
    assert!(db.value_at(b"user:1", FeatureId(2), AsOf::at(EventTime(250))).expect("read").is_none(), "tombstone");
    let v = db.value_at(b"user:2", FeatureId(1), AsOf::at(EventTime(0))).expect("read").expect("present");
    assert_eq!(v.value, Some(Value::Int64List(vec![1, -1])));
    assert_eq!(v.version_vector.entries(), &[(1, 9), (3, 4)]);
}

/// File names the workload leaves (numbers are deterministic).
fn produce_names() -> Vec<String> {
    let fs = MemFs::new();
    let dir = Path::new("/db");
    let db = Db::open_with_fs(Arc::new(fs.clone()), dir, options()).expect("open");
    let mut b = WriteBatch::new();
    b.put(b"x", FeatureId(1), EventTime(0), Value::Bool(true)).expect("put");
    db.write(b, Durability::Sync).expect("write");
    db.flush().expect("flush");
    let names = fs.list(dir).expect("list");
    db.close().expect("close");
    names
}
