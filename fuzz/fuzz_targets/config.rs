#![no_main]
//! libFuzzer entry for [`detour_fuzz::config`]; run with `cargo xtask fuzz`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| detour_fuzz::config(data));
