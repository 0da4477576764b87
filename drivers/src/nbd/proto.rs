//! The NBD wire protocol (NetworkBlockDevice/nbd `doc/proto.md`, with QEMU's extensions from
//! `docs/interop/nbd.rst`): magics, option and command codes, flags, and the encoding and
//! parsing of the fixed-size parts of messages. No I/O: everything works on byte slices, so the
//! server's and the client's parsers are unit- and fuzz-testable.
//!
//! Every field read from the peer is untrusted: parsers check magics and sizes and return
//! [`ProtoError`] naming what is wrong; lengths that decide an allocation are bounded by the
//! caller with [`MAX_OPTION_LEN`] and [`MAX_PAYLOAD`].

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the magic before each client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic before each option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Magic of an extended request (`NBD_OPT_EXTENDED_HEADERS`).
pub const EXT_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of an extended reply chunk.
pub const EXT_REPLY_MAGIC: u32 = 0x6e8a_278c;
/// Magic of the oldstyle handshake (in place of `IHAVEOPT`).
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flags (server): no 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flags.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option codes.
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERR | 1;
    pub const ERR_POLICY: u32 = ERR | 2;
    pub const ERR_INVALID: u32 = ERR | 3;
    pub const ERR_PLATFORM: u32 = ERR | 4;
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR | 8;
    pub const ERR_TOO_BIG: u32 = ERR | 9;
}

/// `NBD_OPT_INFO`/`GO` information types.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod tflag {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    /// Block status requests may carry a payload choosing the contexts (extended headers).
    pub const BLOCK_STAT_PAYLOAD: u16 = 1 << 12;
}

/// Command types.
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflag {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Extended headers: the length field is the payload's (block status with a filter).
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    pub const FLAG_DONE: u16 = 1 << 0;
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const BLOCK_STATUS_EXT: u16 = 6;
    pub const ERROR: u16 = (1 << 15) | 1;
    pub const ERROR_OFFSET: u16 = (1 << 15) | 2;
}

/// `base:allocation` descriptor flags.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` descriptor flags.
pub const STATE_ZERO: u32 = 1 << 1;

/// Error values on the wire (not the host's errno values).
pub mod err {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// Largest option payload accepted (names are at most 4096 bytes; meta context queries add up).
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Largest read or write payload (QEMU's NBD_MAX_BUFFER_SIZE).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Longest export or context name.
pub const MAX_NAME: usize = 4096;

/// Map a host errno to the protocol's error value.
pub fn errno_to_wire(e: i32) -> u32 {
    match e {
        libc::EPERM | libc::EROFS | libc::EACCES => err::EPERM,
        libc::ENOMEM => err::ENOMEM,
        libc::EINVAL => err::EINVAL,
        libc::ENOSPC | libc::EFBIG | libc::EDQUOT => err::ENOSPC,
        libc::EOVERFLOW => err::EOVERFLOW,
        libc::ENOTSUP => err::ENOTSUP,
        libc::ESHUTDOWN => err::ESHUTDOWN,
        _ => err::EIO,
    }
}

/// Map a protocol error value to a host errno (unknown values read as EINVAL, as the spec asks).
pub fn wire_to_errno(e: u32) -> i32 {
    match e {
        err::EPERM => libc::EPERM,
        err::EIO => libc::EIO,
        err::ENOMEM => libc::ENOMEM,
        err::EINVAL => libc::EINVAL,
        err::ENOSPC => libc::ENOSPC,
        err::EOVERFLOW => libc::EOVERFLOW,
        err::ENOTSUP => libc::ENOTSUP,
        err::ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EINVAL,
    }
}

/// A malformed message from the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtoError(pub String);

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The header of a client option (16 bytes: magic, option, length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub const SIZE: usize = 16;

    /// Parse and check the magic.
    pub fn parse(b: &[u8; 16]) -> Result<OptionHeader, ProtoError> {
        if be64(b, 0) != IHAVEOPT {
            return Err(ProtoError(format!("option magic {:#x} is not IHAVEOPT", be64(b, 0))));
        }
        Ok(OptionHeader { option: be32(b, 8), len: be32(b, 12) })
    }

    /// Encode (client side).
    pub fn encode(&self) -> [u8; 16] {
        let mut o = [0u8; 16];
        o[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        o[8..12].copy_from_slice(&self.option.to_be_bytes());
        o[12..16].copy_from_slice(&self.len.to_be_bytes());
        o
    }
}

/// The header of an option reply (20 bytes) followed by `len` bytes of data.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut o = Vec::with_capacity(20 + data.len());
    o.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    o.extend_from_slice(&option.to_be_bytes());
    o.extend_from_slice(&reply.to_be_bytes());
    o.extend_from_slice(&(data.len() as u32).to_be_bytes());
    o.extend_from_slice(data);
    o
}

/// A parsed option reply header (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub len: u32,
}

impl OptionReplyHeader {
    pub const SIZE: usize = 20;

    /// Parse and check the magic.
    pub fn parse(b: &[u8; 20]) -> Result<OptionReplyHeader, ProtoError> {
        if be64(b, 0) != OPT_REPLY_MAGIC {
            return Err(ProtoError(format!("option reply magic {:#x} is wrong", be64(b, 0))));
        }
        Ok(OptionReplyHeader { option: be32(b, 8), reply: be32(b, 12), len: be32(b, 16) })
    }
}

/// A reader over option data that fails, by name, instead of reading past the end.
pub struct Fields<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    pub fn new(b: &'a [u8]) -> Fields<'a> {
        Fields { b, at: 0 }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ProtoError> {
        if self.b.len() - self.at < n {
            return Err(ProtoError(format!("option data too short for {what}")));
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    pub fn u16(&mut self, what: &str) -> Result<u16, ProtoError> {
        Ok(be16(self.take(2, what)?, 0))
    }

    pub fn u32(&mut self, what: &str) -> Result<u32, ProtoError> {
        Ok(be32(self.take(4, what)?, 0))
    }

    /// A string with a 32-bit length prefix, at most [`MAX_NAME`] bytes, valid UTF-8.
    pub fn string(&mut self, what: &str) -> Result<String, ProtoError> {
        let n = self.u32(what)? as usize;
        if n > MAX_NAME {
            return Err(ProtoError(format!("{what} is {n} bytes, more than {MAX_NAME}")));
        }
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| ProtoError(format!("{what} is not UTF-8")))
    }

    /// Whether every byte was consumed.
    pub fn done(&self) -> bool {
        self.at == self.b.len()
    }
}

/// The data of `NBD_OPT_INFO`/`GO`: the export name and the information types asked for.
pub fn parse_info_request(data: &[u8]) -> Result<(String, Vec<u16>), ProtoError> {
    let mut f = Fields::new(data);
    let name = f.string("export name")?;
    let n = f.u16("information request count")?;
    let mut reqs = Vec::new();
    for _ in 0..n {
        reqs.push(f.u16("information request")?);
    }
    if !f.done() {
        return Err(ProtoError("trailing data in the option".into()));
    }
    Ok((name, reqs))
}

/// The data of `NBD_OPT_LIST_META_CONTEXT`/`SET_META_CONTEXT`: export name and queries.
pub fn parse_meta_request(data: &[u8]) -> Result<(String, Vec<String>), ProtoError> {
    let mut f = Fields::new(data);
    let name = f.string("export name")?;
    let n = f.u32("query count")?;
    if n as usize > data.len() / 4 {
        return Err(ProtoError(format!("{n} queries do not fit the option")));
    }
    let mut qs = Vec::new();
    for _ in 0..n {
        qs.push(f.string("query")?);
    }
    if !f.done() {
        return Err(ProtoError("trailing data in the option".into()));
    }
    Ok((name, qs))
}

/// A transmission request: compact (28 bytes, 32-bit length) or extended (32 bytes, 64-bit
/// length) on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u64,
}

impl Request {
    /// Size of a compact request.
    pub const SIZE: usize = 28;
    /// Size of an extended request.
    pub const EXT_SIZE: usize = 32;

    /// Parse a compact request and check the magic.
    pub fn parse(b: &[u8; 28]) -> Result<Request, ProtoError> {
        if be32(b, 0) != REQUEST_MAGIC {
            return Err(ProtoError(format!("request magic {:#x} is wrong", be32(b, 0))));
        }
        Ok(Request { flags: be16(b, 4), typ: be16(b, 6), cookie: be64(b, 8), offset: be64(b, 16), len: u64::from(be32(b, 24)) })
    }

    /// Parse an extended request and check the magic.
    pub fn parse_ext(b: &[u8; 32]) -> Result<Request, ProtoError> {
        if be32(b, 0) != EXT_REQUEST_MAGIC {
            return Err(ProtoError(format!("extended request magic {:#x} is wrong", be32(b, 0))));
        }
        Ok(Request { flags: be16(b, 4), typ: be16(b, 6), cookie: be64(b, 8), offset: be64(b, 16), len: be64(b, 24) })
    }

    /// Encode (client side) into `o`, compact or extended; returns the bytes used. A compact
    /// request's length must fit in 32 bits (the caller splits larger ones).
    pub fn encode_into(&self, extended: bool, o: &mut [u8; 32]) -> usize {
        o[4..6].copy_from_slice(&self.flags.to_be_bytes());
        o[6..8].copy_from_slice(&self.typ.to_be_bytes());
        o[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        o[16..24].copy_from_slice(&self.offset.to_be_bytes());
        if extended {
            o[0..4].copy_from_slice(&EXT_REQUEST_MAGIC.to_be_bytes());
            o[24..32].copy_from_slice(&self.len.to_be_bytes());
            Self::EXT_SIZE
        } else {
            debug_assert!(self.len <= u64::from(u32::MAX));
            o[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            o[24..28].copy_from_slice(&(self.len as u32).to_be_bytes());
            Self::SIZE
        }
    }

    /// Encode a compact request.
    pub fn encode(&self) -> [u8; 28] {
        let mut o = [0u8; 32];
        self.encode_into(false, &mut o);
        o[..28].try_into().expect("28 bytes")
    }
}

/// A reply header as the client reads it: the first 16 bytes say which kind it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStart {
    /// A whole simple reply: error value and cookie.
    Simple { error: u32, cookie: u64 },
    /// A structured chunk: 4 more header bytes follow.
    Structured,
    /// An extended chunk: 16 more header bytes follow.
    Extended,
}

impl ReplyStart {
    /// Size of the part read first.
    pub const SIZE: usize = 16;

    /// Classify the first 16 bytes of a reply by their magic.
    pub fn parse(b: &[u8; 16]) -> Result<ReplyStart, ProtoError> {
        match be32(b, 0) {
            SIMPLE_REPLY_MAGIC => Ok(ReplyStart::Simple { error: be32(b, 4), cookie: be64(b, 8) }),
            STRUCTURED_REPLY_MAGIC => Ok(ReplyStart::Structured),
            EXT_REPLY_MAGIC => Ok(ReplyStart::Extended),
            m => Err(ProtoError(format!("reply magic {m:#x} is wrong"))),
        }
    }
}

/// A structured or extended reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    /// Payload bytes that follow.
    pub len: u64,
}

impl ChunkHeader {
    /// Size of a structured chunk header.
    pub const SIZE: usize = 20;
    /// Size of an extended chunk header.
    pub const EXT_SIZE: usize = 32;

    /// Parse a whole header (20 or 32 bytes; the magic was checked by [`ReplyStart::parse`]).
    pub fn parse(b: &[u8]) -> Result<ChunkHeader, ProtoError> {
        let (flags, typ, cookie) = (be16(b, 4), be16(b, 6), be64(b, 8));
        let len = match b.len() {
            Self::SIZE => u64::from(be32(b, 16)),
            Self::EXT_SIZE => be64(b, 24),
            n => return Err(ProtoError(format!("chunk header of {n} bytes"))),
        };
        Ok(ChunkHeader { flags, typ, cookie, len })
    }
}

/// The payload of an `ERROR` or `ERROR_OFFSET` chunk: error value and message.
pub fn parse_error_chunk(typ: u16, p: &[u8]) -> Result<(u32, String), ProtoError> {
    if p.len() < 6 {
        return Err(ProtoError(format!("error chunk of {} bytes", p.len())));
    }
    let (error, mlen) = (be32(p, 0), be16(p, 4) as usize);
    let extra = if typ == chunk::ERROR_OFFSET { 8 } else { 0 };
    if p.len() != 6 + mlen + extra {
        return Err(ProtoError(format!("error chunk of {} bytes with a {mlen} byte message", p.len())));
    }
    if error == 0 {
        return Err(ProtoError("error chunk with error value 0".into()));
    }
    Ok((error, String::from_utf8_lossy(&p[6..6 + mlen]).into_owned()))
}

/// The first extent of a `BLOCK_STATUS` (32-bit descriptors) or `BLOCK_STATUS_EXT` (64-bit)
/// chunk: context id, length (> 0) and flags. The payload's size must match its descriptors.
pub fn parse_block_status(typ: u16, p: &[u8]) -> Result<(u32, u64, u64), ProtoError> {
    let bad = || ProtoError(format!("block status chunk of {} bytes", p.len()));
    let (ctx, len, flags) = if typ == chunk::BLOCK_STATUS_EXT {
        if p.len() < 8 + 16 || !(p.len() - 8).is_multiple_of(16) || u64::from(be32(p, 4)) != (p.len() as u64 - 8) / 16 {
            return Err(bad());
        }
        (be32(p, 0), be64(p, 8), be64(p, 16))
    } else {
        if p.len() < 4 + 8 || !(p.len() - 4).is_multiple_of(8) {
            return Err(bad());
        }
        (be32(p, 0), u64::from(be32(p, 4)), u64::from(be32(p, 8)))
    };
    if len == 0 {
        return Err(ProtoError("block status extent of length 0".into()));
    }
    Ok((ctx, len, flags))
}

/// The offset at the start of an `OFFSET_DATA` or `OFFSET_HOLE` payload, and a hole's size.
pub fn parse_offset_chunk(typ: u16, p: &[u8]) -> Result<(u64, u32), ProtoError> {
    match typ {
        chunk::OFFSET_DATA if p.len() >= 8 => Ok((be64(p, 0), 0)),
        chunk::OFFSET_HOLE if p.len() == 12 => Ok((be64(p, 0), be32(p, 8))),
        _ => Err(ProtoError(format!("chunk type {typ} with a {} byte payload", p.len()))),
    }
}

/// A simple reply header (16 bytes).
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut o = [0u8; 16];
    o[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    o[4..8].copy_from_slice(&error.to_be_bytes());
    o[8..16].copy_from_slice(&cookie.to_be_bytes());
    o
}

/// A structured reply chunk header (20 bytes); `len` bytes of payload follow.
pub fn chunk_header(flags: u16, typ: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut o = [0u8; 20];
    o[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    o[4..6].copy_from_slice(&flags.to_be_bytes());
    o[6..8].copy_from_slice(&typ.to_be_bytes());
    o[8..16].copy_from_slice(&cookie.to_be_bytes());
    o[16..20].copy_from_slice(&len.to_be_bytes());
    o
}

/// An extended reply chunk header (32 bytes); `len` bytes of payload follow.
pub fn ext_chunk_header(flags: u16, typ: u16, cookie: u64, offset: u64, len: u64) -> [u8; 32] {
    let mut o = [0u8; 32];
    o[0..4].copy_from_slice(&EXT_REPLY_MAGIC.to_be_bytes());
    o[4..6].copy_from_slice(&flags.to_be_bytes());
    o[6..8].copy_from_slice(&typ.to_be_bytes());
    o[8..16].copy_from_slice(&cookie.to_be_bytes());
    o[16..24].copy_from_slice(&offset.to_be_bytes());
    o[24..32].copy_from_slice(&len.to_be_bytes());
    o
}

/// The payload of an ERROR chunk: error value, message length, message (at most 4096 bytes).
pub fn error_payload(error: u32, msg: &str) -> Vec<u8> {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    let mut o = error.to_be_bytes().to_vec();
    o.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    o.extend_from_slice(msg);
    o
}

/// An ERROR chunk (header and payload) ending the reply to `cookie`.
pub fn error_chunk(cookie: u64, error: u32, msg: &str) -> Vec<u8> {
    let p = error_payload(error, msg);
    let mut o = chunk_header(chunk::FLAG_DONE, chunk::ERROR, cookie, p.len() as u32).to_vec();
    o.extend(p);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_magic_is_named() {
        let r = Request { flags: cflag::FUA, typ: cmd::WRITE, cookie: 7, offset: 1 << 40, len: 4096 };
        assert_eq!(Request::parse(&r.encode()).unwrap(), r);
        let mut b = r.encode();
        b[0] = 0;
        assert!(Request::parse(&b).unwrap_err().0.contains("request magic"));
    }

    #[test]
    fn options_parse_and_fields_stop_at_the_end() {
        let h = OptionHeader { option: opt::GO, len: 10 };
        assert_eq!(OptionHeader::parse(&h.encode()).unwrap(), h);
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&1u16.to_be_bytes());
        let mut f = Fields::new(&d);
        assert_eq!(f.string("name").unwrap(), "abc");
        assert_eq!(f.u16("count").unwrap(), 1);
        assert!(f.done());
        assert!(f.u16("more").unwrap_err().0.contains("too short for more"));
        let huge = (u32::MAX).to_be_bytes();
        assert!(Fields::new(&huge).string("name").unwrap_err().0.contains("more than"));
    }

    #[test]
    fn extended_requests_and_reply_chunks_parse() {
        let r = Request { flags: 0, typ: cmd::READ, cookie: 1, offset: 4096, len: 5 << 32 };
        let mut b = [0u8; 32];
        assert_eq!(r.encode_into(true, &mut b), 32);
        assert_eq!(Request::parse_ext(&b).unwrap(), r);
        let mut h = chunk_header(chunk::FLAG_DONE, chunk::OFFSET_DATA, 9, 20).to_vec();
        assert_eq!(ReplyStart::parse(h[..16].try_into().unwrap()).unwrap(), ReplyStart::Structured);
        let c = ChunkHeader::parse(&h).unwrap();
        assert_eq!((c.flags, c.typ, c.cookie, c.len), (chunk::FLAG_DONE, chunk::OFFSET_DATA, 9, 20));
        h[0] = 0;
        assert!(ReplyStart::parse(h[..16].try_into().unwrap()).is_err());
        assert!(matches!(ReplyStart::parse(&simple_reply(5, 2)).unwrap(), ReplyStart::Simple { error: 5, cookie: 2 }));
    }

    #[test]
    fn chunk_payloads_are_checked() {
        let e = error_chunk(3, err::EIO, "boom");
        assert_eq!(parse_error_chunk(chunk::ERROR, &e[20..]).unwrap(), (err::EIO, "boom".to_string()));
        assert!(parse_error_chunk(chunk::ERROR, &e[20..25]).is_err());
        assert!(parse_error_chunk(chunk::ERROR_OFFSET, &e[20..]).is_err());
        let mut bs = 1u32.to_be_bytes().to_vec();
        bs.extend_from_slice(&4096u32.to_be_bytes());
        bs.extend_from_slice(&STATE_HOLE.to_be_bytes());
        assert_eq!(parse_block_status(chunk::BLOCK_STATUS, &bs).unwrap(), (1, 4096, 1));
        assert!(parse_block_status(chunk::BLOCK_STATUS, &bs[..10]).is_err());
        let mut ext = 1u32.to_be_bytes().to_vec();
        ext.extend_from_slice(&1u32.to_be_bytes());
        ext.extend_from_slice(&(1u64 << 33).to_be_bytes());
        ext.extend_from_slice(&3u64.to_be_bytes());
        assert_eq!(parse_block_status(chunk::BLOCK_STATUS_EXT, &ext).unwrap(), (1, 1 << 33, 3));
        ext[7] = 2;
        assert!(parse_block_status(chunk::BLOCK_STATUS_EXT, &ext).is_err());
        let mut hole = 8u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&512u32.to_be_bytes());
        assert_eq!(parse_offset_chunk(chunk::OFFSET_HOLE, &hole).unwrap(), (8, 512));
        assert!(parse_offset_chunk(chunk::OFFSET_HOLE, &hole[..8]).is_err());
    }

    #[test]
    fn replies_encode() {
        let r = option_reply(opt::GO, rep::ACK, &[]);
        let h = OptionReplyHeader::parse(r[..20].try_into().unwrap()).unwrap();
        assert_eq!((h.option, h.reply, h.len), (opt::GO, rep::ACK, 0));
        assert_eq!(&simple_reply(5, 9)[4..8], &5u32.to_be_bytes());
        let e = error_chunk(3, err::EINVAL, "bad");
        assert_eq!(e.len(), 20 + 6 + 3);
        assert_eq!(errno_to_wire(libc::EROFS), err::EPERM);
        assert_eq!(wire_to_errno(9999), libc::EINVAL);
    }
}
