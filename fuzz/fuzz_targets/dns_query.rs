#![no_main]
//! libFuzzer entry for [`detour_fuzz::dns_query`]; run with `cargo xtask fuzz`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| detour_fuzz::dns_query(data));
