//! Fuzz entry points for NBD's parsers of peer input: what a server reads from a client
//! (option headers, `INFO`/`GO` and meta context option data, compact and extended request
//! headers) and what a client reads from a server (the whole handshake, driven from bytes, and
//! reply headers and chunk payloads). Each takes arbitrary bytes and must return (an error is
//! fine) without panicking, hanging or allocating more than the input bounds.
//!
//! Driven by the cargo-fuzz targets in `fuzz/` (nightly) and, on every test run, by a seeded
//! mutation loop over valid transcripts below.

use std::io::{Read, Write};

use super::negotiate::{Handshake, Want};
use super::proto::{self, ChunkHeader, OptionHeader, ReplyStart, Request};

/// A server's view: an option header and its data, then request headers.
pub fn server_input(data: &[u8]) {
    if let Some(h) = data.get(..16) {
        let _ = OptionHeader::parse(h.try_into().expect("16 bytes"));
    }
    let rest = data.get(16..).unwrap_or_default();
    let _ = proto::parse_info_request(rest);
    let _ = proto::parse_meta_request(rest);
    let mut f = proto::Fields::new(rest);
    let _ = f.string("name");
    for w in data.chunks_exact(Request::SIZE) {
        let _ = Request::parse(w.try_into().expect("28 bytes"));
    }
    for w in data.chunks_exact(Request::EXT_SIZE) {
        let _ = Request::parse_ext(w.try_into().expect("32 bytes"));
    }
}

/// A server speaking `data`; what the client writes is dropped.
struct Script<'a>(&'a [u8]);

impl Read for Script<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Script<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A client's handshake against a server that says `data`: negotiate, and list exports.
pub fn client_handshake(data: &[u8]) {
    let want = Want { export: "disk", context: "base:allocation", context_required: false, tls: None };
    let _ = Handshake::over(Script(data)).negotiate(&want);
    let _ = Handshake::over(Script(data)).list(None);
}

/// A client's view of replies: reply starts, chunk headers of both sizes, chunk payloads of
/// every type.
pub fn client_replies(data: &[u8]) {
    if let Some(h) = data.get(..16) {
        let _ = ReplyStart::parse(h.try_into().expect("16 bytes"));
    }
    for n in [ChunkHeader::SIZE, ChunkHeader::EXT_SIZE] {
        if let Some(h) = data.get(..n) {
            let _ = ChunkHeader::parse(h);
        }
    }
    let p = data.get(2..).unwrap_or_default();
    let typ = data.get(..2).map_or(0, |t| u16::from_be_bytes([t[0], t[1]]));
    let _ = proto::parse_error_chunk(typ, p);
    let _ = proto::parse_block_status(typ, p);
    let _ = proto::parse_offset_chunk(typ, p);
    for t in [proto::chunk::BLOCK_STATUS, proto::chunk::BLOCK_STATUS_EXT] {
        let _ = proto::parse_block_status(t, p);
    }
    for t in [proto::chunk::ERROR, proto::chunk::ERROR_OFFSET, proto::chunk::OFFSET_DATA, proto::chunk::OFFSET_HOLE] {
        let _ = proto::parse_error_chunk(t, p);
        let _ = proto::parse_offset_chunk(t, p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto::{info, opt, rep};
    use basalt_engine::fuzzing::mutate;

    /// What a server says in a fixed newstyle handshake with extended headers, a meta context
    /// and GO with block sizes; then a LIST.
    fn server_transcript() -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
        t.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        t.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
        t.extend(proto::option_reply(opt::EXTENDED_HEADERS, rep::ACK, &[]));
        let mut m = 1u32.to_be_bytes().to_vec();
        m.extend_from_slice(b"base:allocation");
        t.extend(proto::option_reply(opt::SET_META_CONTEXT, rep::META_CONTEXT, &m));
        t.extend(proto::option_reply(opt::SET_META_CONTEXT, rep::ACK, &[]));
        let mut e = info::EXPORT.to_be_bytes().to_vec();
        e.extend_from_slice(&(1u64 << 30).to_be_bytes());
        e.extend_from_slice(&0x1edu16.to_be_bytes());
        t.extend(proto::option_reply(opt::GO, rep::INFO, &e));
        let mut b = info::BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [512u32, 4096, 1 << 25] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        t.extend(proto::option_reply(opt::GO, rep::INFO, &b));
        t.extend(proto::option_reply(opt::GO, rep::ACK, &[]));
        t
    }

    #[test]
    fn the_seed_handshake_negotiates() {
        let t = server_transcript();
        let want = Want { export: "disk", context: "base:allocation", context_required: true, tls: None };
        let n = Handshake::over(Script(&t)).negotiate(&want).unwrap();
        assert!(n.extended && n.structured);
        assert_eq!((n.size, n.context_id, n.min_block, n.max_block), (1 << 30, Some(1), 512, 1 << 25));
        // Cut anywhere, it fails cleanly.
        for cut in [0, 7, 17, 30, t.len() - 1] {
            assert!(Handshake::over(Script(&t[..cut])).negotiate(&want).is_err());
        }
    }

    #[test]
    fn client_handshake_survives_mutation() {
        mutate(&server_transcript(), 20_000, client_handshake);
    }

    #[test]
    fn client_replies_survive_mutation() {
        let mut seed = proto::chunk_header(proto::chunk::FLAG_DONE, proto::chunk::BLOCK_STATUS, 7, 12).to_vec();
        seed.extend_from_slice(&1u32.to_be_bytes());
        seed.extend_from_slice(&4096u32.to_be_bytes());
        seed.extend_from_slice(&3u32.to_be_bytes());
        mutate(&seed, 20_000, client_replies);
        mutate(&proto::error_chunk(1, proto::err::EIO, "no"), 5_000, client_replies);
    }

    #[test]
    fn server_input_survives_mutation() {
        let mut seed = OptionHeader { option: opt::GO, len: 10 }.encode().to_vec();
        seed.extend_from_slice(&4u32.to_be_bytes());
        seed.extend_from_slice(b"disk");
        seed.extend_from_slice(&1u16.to_be_bytes());
        seed.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        mutate(&seed, 20_000, server_input);
        let mut m = 4u32.to_be_bytes().to_vec();
        m.extend_from_slice(b"disk");
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&15u32.to_be_bytes());
        m.extend_from_slice(b"base:allocation");
        let mut seed = OptionHeader { option: opt::SET_META_CONTEXT, len: m.len() as u32 }.encode().to_vec();
        seed.extend(m);
        mutate(&seed, 20_000, server_input);
        let r = Request { flags: 1, typ: 1, cookie: 2, offset: 3, len: 4 };
        let mut b = [0u8; 32];
        r.encode_into(true, &mut b);
        mutate(&b, 5_000, server_input);
    }
}
