//! The client side of the NBD handshake, on a blocking socket (it runs when a node opens or
//! a connection is re-established, off the data path): oldstyle, or fixed newstyle with
//! `NBD_OPT_STARTTLS` first when TLS credentials are given (everything after it runs over the
//! TLS session, which the transmission phase takes over), then
//! `NBD_OPT_EXTENDED_HEADERS` (falling back to `STRUCTURED_REPLY`), `SET_META_CONTEXT` for the
//! block status context, and `GO` with block size information (falling back to
//! `EXPORT_NAME` where the server has no `GO`). Also `NBD_OPT_LIST` and `INFO` for listing.
//!
//! Every reply is checked: magics, the option it answers, lengths (at most
//! [`proto::MAX_OPTION_LEN`] each, so a hostile server cannot make us allocate more), and the
//! block size constraints the spec allows. Errors name what the server did wrong, or repeat
//! QEMU's wording for the errors users know ("Requested export not available").

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use basalt_engine::{BlockError, BlockResult, ErrorKind};

use super::proto::{self, info, opt, rep, Fields, OptionHeader, OptionReplyHeader};
use super::tls::{ClientTls, Session, TlsStream};

/// What the handshake settled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub tflags: u16,
    /// Block size constraints (1, 4096, 32 MiB when the server gives none).
    pub min_block: u32,
    pub pref_block: u32,
    pub max_block: u32,
    /// Structured replies are on.
    pub structured: bool,
    /// Extended headers are on (which implies structured replies).
    pub extended: bool,
    /// The id of the block status context, when the server has it.
    pub context_id: Option<u32>,
    /// The export's description, when the server sent one.
    pub description: Option<String>,
}

impl Negotiated {
    /// Whether a transmission flag is set.
    pub fn has(&self, f: u16) -> bool {
        self.tflags & f != 0
    }
}

/// One export as a listing shows it.
#[derive(Clone, Debug)]
pub struct ExportDetails {
    pub name: String,
    pub description: String,
    /// Size, flags and block sizes (0 when the server sent none).
    pub info: Negotiated,
    pub contexts: Vec<String>,
}

/// What to ask for.
pub struct Want<'a> {
    pub export: &'a str,
    /// The block status context (`base:allocation` or `x-dirty-bitmap`'s).
    pub context: &'a str,
    /// Whether not finding `context` is an error (it was asked for by name).
    pub context_required: bool,
    /// Start TLS with these credentials before anything else.
    pub tls: Option<&'a ClientTls>,
}

/// The handshake's stream: plain, or TLS after `STARTTLS`.
enum Stream<S> {
    Plain(S),
    Tls(Box<TlsStream<S>>),
    /// Only while switching.
    Gone,
}

impl<S: Read + Write> Read for Stream<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
            Stream::Gone => Err(std::io::Error::from(std::io::ErrorKind::NotConnected)),
        }
    }
}

impl<S: Read + Write> Write for Stream<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(t) => t.write(buf),
            Stream::Gone => Err(std::io::Error::from(std::io::ErrorKind::NotConnected)),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(t) => t.flush(),
            Stream::Gone => Ok(()),
        }
    }
}

fn proto_err(msg: impl Into<String>) -> BlockError {
    BlockError::new(ErrorKind::Io, msg.into())
}

fn io_err(what: &str, e: std::io::Error) -> BlockError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        return proto_err(format!("Server closed the connection while {what}"));
    }
    BlockError::new(ErrorKind::Io, format!("Failed while {what}: {e}"))
}

/// The handshake over a blocking stream: a socket with a receive timeout, or any reader and
/// writer (the fuzz target drives it from bytes).
pub struct Handshake<S: Read + Write = std::fs::File> {
    s: Stream<S>,
    /// The server leaves out the 124 zero bytes after `EXPORT_NAME`.
    no_zeroes: bool,
}

impl<S: Read + Write> Handshake<S> {
    /// Negotiate over any stream.
    pub fn over(s: S) -> Handshake<S> {
        Handshake { s: Stream::Plain(s), no_zeroes: false }
    }
}

impl Handshake {
    /// Take a connected socket; reads time out after `timeout` (a server that stops answering
    /// mid-handshake fails the open rather than hanging it).
    pub fn new(fd: OwnedFd, timeout: Duration) -> Handshake {
        set_receive_timeout(&fd, timeout);
        Handshake { s: Stream::Plain(std::fs::File::from(fd)), no_zeroes: false }
    }

    /// The socket back, with the timeout cleared for the transmission phase, and its TLS
    /// session when TLS was started.
    pub fn into_parts(self) -> (OwnedFd, Option<Session>) {
        let (file, session) = match self.s {
            Stream::Plain(f) => (f, None),
            Stream::Tls(t) => (t.inner, Some(t.session)),
            Stream::Gone => unreachable!("the stream is only gone while switching"),
        };
        let fd = OwnedFd::from(file);
        set_receive_timeout(&fd, Duration::ZERO);
        (fd, session)
    }
}

impl<S: Read + Write> Handshake<S> {
    fn read<const N: usize>(&mut self, what: &str) -> BlockResult<[u8; N]> {
        let mut b = [0u8; N];
        self.s.read_exact(&mut b).map_err(|e| io_err(what, e))?;
        Ok(b)
    }

    fn read_vec(&mut self, n: usize, what: &str) -> BlockResult<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).map_err(|e| io_err(what, e))?;
        Ok(b)
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> BlockResult<()> {
        let mut m = OptionHeader { option, len: data.len() as u32 }.encode().to_vec();
        m.extend_from_slice(data);
        self.s.write_all(&m).map_err(|e| io_err("sending an option", e))
    }

    /// One option reply: header and data.
    fn reply(&mut self, option: u32) -> BlockResult<(u32, Vec<u8>)> {
        let h = OptionReplyHeader::parse(&self.read::<20>("reading an option reply")?).map_err(|e| proto_err(e.0))?;
        if h.option != option {
            return Err(proto_err(format!("Unexpected option reply: {} in reply to option {option}", h.option)));
        }
        if h.len > proto::MAX_OPTION_LEN {
            return Err(proto_err(format!("Option reply of {} bytes is too long", h.len)));
        }
        let data = self.read_vec(h.len as usize, "reading an option reply")?;
        Ok((h.reply, data))
    }

    /// The greeting up to the client flags. Returns whether the server is fixed newstyle, or
    /// the whole result for an oldstyle server.
    fn greeting(&mut self, export: &str) -> BlockResult<Result<bool, Negotiated>> {
        let magic = u64::from_be_bytes(self.read::<8>("reading the server's greeting")?);
        if magic != proto::NBDMAGIC {
            return Err(proto_err(format!("Bad initial magic received: {magic:#x}")));
        }
        let magic = u64::from_be_bytes(self.read::<8>("reading the server's greeting")?);
        if magic == proto::OLDSTYLE_MAGIC {
            let b = self.read::<{ 8 + 4 + 124 }>("reading the oldstyle greeting")?;
            if !export.is_empty() {
                return Err(proto_err("Server does not support non-empty export names"));
            }
            let size = u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
            let tflags = u32::from_be_bytes(b[8..12].try_into().expect("4 bytes")) as u16;
            return Ok(Err(Negotiated { size, tflags, ..defaults() }));
        }
        if magic != proto::IHAVEOPT {
            return Err(proto_err(format!("Bad server magic received: {magic:#x}")));
        }
        let gflags = u16::from_be_bytes(self.read::<2>("reading the server's flags")?);
        let fixed = gflags & proto::FLAG_FIXED_NEWSTYLE != 0;
        let mut cflags = 0;
        if fixed {
            cflags |= proto::FLAG_C_FIXED_NEWSTYLE;
        }
        if gflags & proto::FLAG_NO_ZEROES != 0 {
            cflags |= proto::FLAG_C_NO_ZEROES;
        }
        self.s.write_all(&cflags.to_be_bytes()).map_err(|e| io_err("sending the client flags", e))?;
        self.no_zeroes = gflags & proto::FLAG_NO_ZEROES != 0;
        Ok(Ok(fixed))
    }

    /// `NBD_OPT_STARTTLS` and the TLS handshake; the rest of the negotiation runs over TLS.
    fn start_tls(&mut self, tls: &ClientTls) -> BlockResult<()> {
        self.send_option(opt::STARTTLS, &[])?;
        let (r, data) = self.reply(opt::STARTTLS)?;
        if r != rep::ACK {
            self.abort();
            if r & (1 << 31) != 0 {
                return Err(option_error(r, opt::STARTTLS, &data));
            }
            return Err(proto_err(format!("Server rejected request to start TLS {r:x}")));
        }
        let Stream::Plain(inner) = std::mem::replace(&mut self.s, Stream::Gone) else {
            return Err(proto_err("TLS is already on"));
        };
        let mut t = TlsStream { session: tls.session()?, inner };
        let res = t.session.handshake_blocking(&mut t.inner);
        self.s = Stream::Tls(Box::new(t));
        res.map_err(|e| BlockError::new(ErrorKind::Io, format!("TLS handshake failed: {e}")))
    }

    /// The greeting, then TLS when asked for (it needs a fixed newstyle server).
    fn greeting_tls(&mut self, export: &str, tls: Option<&ClientTls>) -> BlockResult<Result<bool, Negotiated>> {
        let g = self.greeting(export)?;
        if let Some(tls) = tls {
            if !matches!(g, Ok(true)) {
                return Err(proto_err("Server does not support STARTTLS"));
            }
            self.start_tls(tls)?;
        }
        Ok(g)
    }

    /// The greeting before listing, which needs a fixed newstyle server.
    fn listing_greeting(&mut self, tls: Option<&ClientTls>) -> BlockResult<()> {
        match self.greeting_tls("", tls)? {
            Ok(true) => Ok(()),
            Err(_) | Ok(false) => Err(proto_err("Server does not support export lists")),
        }
    }

    /// Negotiate an export for the transmission phase.
    pub fn negotiate(&mut self, want: &Want) -> BlockResult<Negotiated> {
        let fixed = match self.greeting_tls(want.export, want.tls)? {
            Err(old) => return Ok(old),
            Ok(fixed) => fixed,
        };
        let mut n = defaults();
        if fixed {
            n.extended = self.simple_option(opt::EXTENDED_HEADERS)?;
            n.structured = n.extended || self.simple_option(opt::STRUCTURED_REPLY)?;
            if n.structured {
                n.context_id = self.set_meta_context(want.export, want.context)?;
                if n.context_id.is_none() && want.context_required {
                    // QEMU's driver fails with a bare EINVAL here, which its block layer words so.
                    return Err(BlockError::errno("Could not open image", libc::EINVAL));
                }
            }
            if self.go(want.export, &mut n)? {
                return Ok(n);
            }
        }
        self.export_name(want.export, &mut n)?;
        Ok(n)
    }

    /// An option without data answered by ACK (true) or an error (false).
    fn simple_option(&mut self, option: u32) -> BlockResult<bool> {
        self.send_option(option, &[])?;
        let (r, _) = self.reply(option)?;
        match r {
            rep::ACK => Ok(true),
            r if r & (1 << 31) != 0 => Ok(false),
            r => Err(proto_err(format!("Unexpected reply {r:#x} to option {option}"))),
        }
    }

    fn set_meta_context(&mut self, export: &str, context: &str) -> BlockResult<Option<u32>> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(context.len() as u32).to_be_bytes());
        d.extend_from_slice(context.as_bytes());
        self.send_option(opt::SET_META_CONTEXT, &d)?;
        let mut id = None;
        loop {
            let (r, data) = self.reply(opt::SET_META_CONTEXT)?;
            match r {
                rep::META_CONTEXT => {
                    if data.len() < 4 {
                        return Err(proto_err("Meta context reply is too short"));
                    }
                    let name = &data[4..];
                    if name != context.as_bytes() || id.is_some() {
                        return Err(proto_err(format!(
                            "Server replied with an unexpected meta context '{}'",
                            String::from_utf8_lossy(name)
                        )));
                    }
                    id = Some(u32::from_be_bytes(data[..4].try_into().expect("4 bytes")));
                }
                rep::ACK => return Ok(id),
                r if r & (1 << 31) != 0 => return Ok(None),
                r => return Err(proto_err(format!("Unexpected reply {r:#x} to NBD_OPT_SET_META_CONTEXT"))),
            }
        }
    }

    /// `NBD_OPT_GO`; false when the server does not know it (use `EXPORT_NAME`).
    fn go(&mut self, export: &str, n: &mut Negotiated) -> BlockResult<bool> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        self.send_option(opt::GO, &d)?;
        let mut have_export = false;
        loop {
            let (r, data) = self.reply(opt::GO)?;
            match r {
                rep::INFO => parse_info(&data, n, &mut have_export)?,
                rep::ACK if have_export => return Ok(true),
                rep::ACK => return Err(proto_err("Server did not send the export's size")),
                rep::ERR_UNSUP => return Ok(false),
                r if r & (1 << 31) != 0 => return Err(option_error(r, opt::GO, &data)),
                r => return Err(proto_err(format!("Unexpected reply {r:#x} to NBD_OPT_GO"))),
            }
        }
    }

    fn export_name(&mut self, export: &str, n: &mut Negotiated) -> BlockResult<()> {
        self.send_option(opt::EXPORT_NAME, export.as_bytes())?;
        let b = self.read::<10>("reading the export's size").map_err(|_| proto_err("Requested export not available"))?;
        n.size = u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
        n.tflags = u16::from_be_bytes([b[8], b[9]]);
        if !self.no_zeroes {
            self.read::<124>("reading the export's padding")?;
        }
        check_size(n.size)
    }

    /// `NBD_OPT_LIST`: the exports' names and descriptions. Ends the handshake with `ABORT`.
    pub fn list(&mut self, tls: Option<&ClientTls>) -> BlockResult<Vec<(String, String)>> {
        self.listing_greeting(tls)?;
        let out = self.list_names()?;
        self.abort();
        Ok(out)
    }

    /// What `qemu-nbd -L` shows: every export with its information and meta contexts
    /// (`LIST`, then `INFO` and `LIST_META_CONTEXT` for each); ends with `ABORT`. Returns
    /// whether extended headers were negotiated, and the exports.
    pub fn list_details(&mut self, tls: Option<&ClientTls>) -> BlockResult<(bool, Vec<ExportDetails>)> {
        self.listing_greeting(tls)?;
        let extended = self.simple_option(opt::EXTENDED_HEADERS)?;
        let structured = extended || self.simple_option(opt::STRUCTURED_REPLY)?;
        let names = self.list_names()?;
        let mut out = Vec::with_capacity(names.len());
        for (name, description) in names {
            let mut d = Vec::new();
            d.extend_from_slice(&(name.len() as u32).to_be_bytes());
            d.extend_from_slice(name.as_bytes());
            d.extend_from_slice(&2u16.to_be_bytes());
            d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
            d.extend_from_slice(&info::DESCRIPTION.to_be_bytes());
            self.send_option(opt::INFO, &d)?;
            let mut n = Negotiated { min_block: 0, pref_block: 0, max_block: 0, ..Negotiated::default() };
            let mut have_export = false;
            loop {
                let (r, data) = self.reply(opt::INFO)?;
                match r {
                    rep::INFO => parse_info(&data, &mut n, &mut have_export)?,
                    rep::ACK => break,
                    r => return Err(option_error(r, opt::INFO, &data)),
                }
            }
            let mut contexts = Vec::new();
            if structured {
                let mut d = Vec::new();
                d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                d.extend_from_slice(name.as_bytes());
                d.extend_from_slice(&0u32.to_be_bytes());
                self.send_option(opt::LIST_META_CONTEXT, &d)?;
                loop {
                    let (r, data) = self.reply(opt::LIST_META_CONTEXT)?;
                    match r {
                        rep::META_CONTEXT if data.len() >= 4 => contexts.push(String::from_utf8_lossy(&data[4..]).into_owned()),
                        rep::ACK => break,
                        r if r & (1 << 31) != 0 => break,
                        r => return Err(proto_err(format!("Unexpected reply {r:#x} to NBD_OPT_LIST_META_CONTEXT"))),
                    }
                    if contexts.len() > 4096 {
                        return Err(proto_err("Server listed too many meta contexts"));
                    }
                }
            }
            let description = n.description.clone().unwrap_or(description);
            out.push(ExportDetails { name, description, info: n, contexts });
        }
        self.abort();
        Ok((extended, out))
    }

    fn list_names(&mut self) -> BlockResult<Vec<(String, String)>> {
        self.send_option(opt::LIST, &[])?;
        let mut out = Vec::new();
        loop {
            let (r, data) = self.reply(opt::LIST)?;
            match r {
                rep::SERVER => {
                    let mut f = Fields::new(&data);
                    let name = f.string("export name").map_err(|e| proto_err(e.0))?;
                    let desc = String::from_utf8_lossy(&data[4 + name.len()..]).into_owned();
                    out.push((name, desc));
                    if out.len() > 65536 {
                        return Err(proto_err("Server listed too many exports"));
                    }
                }
                rep::ACK => return Ok(out),
                r => return Err(option_error(r, opt::LIST, &data)),
            }
        }
    }

    /// Politely end a handshake that will not enter transmission.
    pub fn abort(&mut self) {
        let _ = self.send_option(opt::ABORT, &[]);
    }
}

/// SO_RCVTIMEO (zero: none).
fn set_receive_timeout(fd: &OwnedFd, timeout: Duration) {
    let tv = libc::timeval { tv_sec: timeout.as_secs() as libc::time_t, tv_usec: 0 };
    // SAFETY: setting SO_RCVTIMEO on a socket we own from a valid timeval.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
}

fn defaults() -> Negotiated {
    Negotiated { min_block: 1, pref_block: 4096, max_block: proto::MAX_PAYLOAD, ..Negotiated::default() }
}

fn check_size(size: u64) -> BlockResult<()> {
    if size > i64::MAX as u64 {
        return Err(proto_err(format!("Export size {size} is too large")));
    }
    Ok(())
}

fn parse_info(data: &[u8], n: &mut Negotiated, have_export: &mut bool) -> BlockResult<()> {
    let mut f = Fields::new(data);
    let typ = f.u16("information type").map_err(|e| proto_err(e.0))?;
    let e = |e: proto::ProtoError| proto_err(e.0);
    match typ {
        info::EXPORT => {
            if data.len() != 12 {
                return Err(proto_err(format!("Export information of {} bytes", data.len())));
            }
            n.size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
            n.tflags = u16::from_be_bytes([data[10], data[11]]);
            check_size(n.size)?;
            *have_export = true;
        }
        info::BLOCK_SIZE => {
            if data.len() != 14 {
                return Err(proto_err(format!("Block size information of {} bytes", data.len())));
            }
            let (min, pref, max) = (f.u32("minimum").map_err(e)?, f.u32("preferred").map_err(e)?, f.u32("maximum").map_err(e)?);
            if !min.is_power_of_two() || min > 64 << 10 {
                return Err(proto_err(format!("server minimum block size {min} is not a power of two up to 64 KiB")));
            }
            if !pref.is_power_of_two() || pref < min {
                return Err(proto_err(format!("server preferred block size {pref} is not valid")));
            }
            if max < pref || !max.is_multiple_of(min) {
                return Err(proto_err(format!("server maximum block size {max} is not a multiple of minimum block size {min}")));
            }
            (n.min_block, n.pref_block, n.max_block) = (min, pref, max.min(proto::MAX_PAYLOAD));
        }
        info::DESCRIPTION => n.description = Some(String::from_utf8_lossy(&data[2..]).into_owned()),
        _ => {}
    }
    Ok(())
}

/// An option's name as QEMU prints it.
fn opt_name(option: u32) -> &'static str {
    match option {
        opt::EXPORT_NAME => "export name",
        opt::ABORT => "abort",
        opt::LIST => "list",
        opt::STARTTLS => "starttls",
        opt::INFO => "info",
        opt::GO => "go",
        opt::STRUCTURED_REPLY => "structured reply",
        opt::LIST_META_CONTEXT => "list meta context",
        opt::SET_META_CONTEXT => "set meta context",
        opt::EXTENDED_HEADERS => "extended headers",
        _ => "<unknown>",
    }
}

/// QEMU's wording for an option's error reply, with its hint and the server's message after.
fn option_error(r: u32, option: u32, data: &[u8]) -> BlockError {
    let name = opt_name(option);
    let mut what = match r {
        rep::ERR_UNSUP => format!("Unsupported option {option} ({name})"),
        rep::ERR_POLICY => format!("Denied by server for option {option} ({name})"),
        rep::ERR_INVALID => format!("Invalid parameters for option {option} ({name})"),
        rep::ERR_PLATFORM => format!("Server lacks support for option {option} ({name})"),
        rep::ERR_TLS_REQD => {
            format!("TLS negotiation required before option {option} ({name})\nDid you forget a valid tls-creds?")
        }
        rep::ERR_UNKNOWN => "Requested export not available".to_string(),
        rep::ERR_SHUTDOWN => "Server shutting down before option was sent".to_string(),
        rep::ERR_BLOCK_SIZE_REQD => "Server requires INFO/GO with block size support".to_string(),
        rep::ERR_TOO_BIG => format!("Option {option} ({name}) was too large for the server"),
        _ => format!("Unknown error code {r:#x} from server for option {option} ({name})"),
    };
    let msg = String::from_utf8_lossy(data);
    let kind = if r == rep::ERR_UNKNOWN { ErrorKind::NotFound } else { ErrorKind::Io };
    if !msg.is_empty() {
        what += &format!("\nserver reported: {msg}");
    }
    BlockError::new(kind, what)
}
