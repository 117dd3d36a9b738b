//! Fuzz target `dns_tcp`: see `harness/` (`ferry_fuzz::dns::tcp`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_fuzz::dns::tcp(data));
