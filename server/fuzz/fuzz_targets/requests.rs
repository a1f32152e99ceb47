//! Request validation: see `quiver_server::fuzzing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| quiver_server::fuzzing::requests(data));
