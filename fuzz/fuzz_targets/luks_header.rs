//! Fuzz target: a LUKS1 header from arbitrary bytes must parse or fail cleanly, never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(h) = basalt_formats::crypto::LuksHeader::parse(data) {
        let _ = h.check_area(data.len() as u64, true);
        let _ = h.unlock_area_len();
    }
});
