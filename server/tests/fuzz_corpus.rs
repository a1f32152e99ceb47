//! Replays the request fuzz target's seeds and checked-in corpus
//! (`server/fuzz/corpus/requests/`) through its entry point, so every input the fuzzer found
//! interesting stays a regression test (see `src/fuzzing.rs`).

use std::path::Path;

use quiver_server::fuzzing::{requests, seeds};

#[test]
fn seeds_and_corpus_replay() {
    let mut n = 0;
    for seed in seeds() {
        requests(&seed);
        // Every truncation of a seed too (mostly malformed messages).
        for cut in 1..seed.len() {
            requests(&seed[..cut]);
        }
        n += 1;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/requests");
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("read");
        requests(&bytes);
        n += 1;
    }
    assert!(n > 50, "the corpus should hold the fuzzer's finds ({n} inputs)");
}
