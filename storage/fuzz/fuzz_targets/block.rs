#![no_main]
//! Fuzz target: see `quiver_storage::fuzzing::block`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| quiver_storage::fuzzing::block(data));
