//! Fuzz target `manifests`: see `harness/` (`ferry_fuzz::manifests::run`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_fuzz::manifests::run(data));
