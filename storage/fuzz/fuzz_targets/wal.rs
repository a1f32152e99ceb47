#![no_main]
//! Fuzz target: see `quiver_storage::fuzzing::wal`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| quiver_storage::fuzzing::wal(data));
