//! Fuzz target `dns_udp`: see `harness/` (`ferry_fuzz::dns::udp`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_fuzz::dns::udp(data));
