//! Fuzz target: qcow2 snapshot table parsing must never panic (see basalt_formats::qcow2::fuzz).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| basalt_formats::qcow2::fuzz::snapshot_table(data));
