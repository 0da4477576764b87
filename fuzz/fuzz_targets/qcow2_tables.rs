//! Fuzz target: qcow2 table entries parsing must never panic (see basalt_formats::qcow2::fuzz).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| basalt_formats::qcow2::fuzz::table_entries(data));
