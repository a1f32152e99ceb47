//! Replays the checked-in fuzz corpora (`storage/fuzz/corpus/<target>/`) through the fuzz
//! targets' entry points, so every input the fuzzers found interesting stays a regression test.

use std::path::Path;

fn replay(target: &str, f: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("entry").path();
        let bytes = std::fs::read(&path).expect("read");
        f(&bytes);
        // Every truncation of a seed must be handled too.
        if bytes.len() < 4096 {
            for cut in 0..bytes.len() {
                f(&bytes[..cut]);
            }
        }
        n += 1;
    }
    assert!(n > 0, "no corpus for {target}");
}

#[test]
fn block_corpus() {
    replay("block", quiver_storage::fuzzing::block);
}

#[test]
fn sstable_corpus() {
    replay("sstable", quiver_storage::fuzzing::table);
}

#[test]
fn wal_corpus() {
    replay("wal", quiver_storage::fuzzing::wal);
}

#[test]
fn manifest_corpus() {
    replay("manifest", quiver_storage::fuzzing::manifest);
}
