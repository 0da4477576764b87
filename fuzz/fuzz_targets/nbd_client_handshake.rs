//! Fuzz target: an NBD server's side of the handshake, as the client reads it must parse or fail cleanly, never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| basalt_drivers::nbd::fuzz::client_handshake(data));
