//! Fuzz target: what an NBD server reads from a client (option headers and data, request headers) must parse or fail cleanly, never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| basalt_drivers::nbd::fuzz::server_input(data));
