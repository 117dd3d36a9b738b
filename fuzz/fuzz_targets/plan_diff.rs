//! Fuzz target `plan_diff`: see `harness/` (`ferry_fuzz::plan_diff::run`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_fuzz::plan_diff::run(data));
