//! Fuzz target: NBD reply headers and chunk payloads, as the client reads them must parse or fail cleanly, never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| basalt_drivers::nbd::fuzz::client_replies(data));
