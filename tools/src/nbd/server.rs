//! One NBD client connection served on a reactor: fixed newstyle negotiation, then the
//! transmission phase with many requests in flight.
//!
//! Negotiation: `NBD_OPT_EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO` (export, name,
//! description and block size information), `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and
//! `SET_META_CONTEXT` (`base:allocation`, and `qemu:allocation-depth` when enabled),
//! `EXTENDED_HEADERS` (32-byte requests with 64-bit lengths, every reply an extended chunk,
//! 64-bit block status extents, and block status requests whose payload picks some of the
//! negotiated contexts: `NBD_FLAG_BLOCK_STAT_PAYLOAD`). `STARTTLS` when the listener has TLS
//! credentials, as qemu-nbd: until TLS is on, every option but `STARTTLS` and `ABORT` gets `ERR_TLS_REQD`
//! (`EXPORT_NAME`, which has no error reply, drops the connection), and a failed handshake
//! drops it too. Without credentials `STARTTLS` gets the protocol's "policy" error.
//!
//! Transmission: the reader takes one request at a time (a write's payload with it) and starts
//! a task for it; up to [`MAX_IN_FLIGHT`] run at once. Each reply is queued whole to the
//! connection's writer ([`Replies`]). A read of at least [`ZERO_COPY_MIN`] bytes whose data
//! lies verbatim in a host file (a raw image, or allocated clusters of a read-only qcow2
//! image, in the page cache: [`basalt_engine::Node::host_extent`]) goes from the page cache
//! to a plain socket without being copied. Requests out of bounds, on a read-only export, or unknown get the
//! protocol's error and the connection goes on; a malformed header, a payload over
//! [`proto::MAX_PAYLOAD`] or a socket error ends this connection only.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use basalt_drivers::nbd::proto::{self, cflag, chunk, cmd, info, opt, rep, tflag, OptionHeader, Request};
use basalt_engine::{Authz, IoStatus, Queue, WriteFlags, ZeroFlags};
use basalt_reactor::{IoBuf, ReactorHandle};

use crate::img::common::Chain;
use basalt_drivers::nbd::sock::{RecvBuf, Sock};
use basalt_drivers::nbd::tls::{PeerKind, ServerTls};

use super::bitmap::ExportBitmap;
use super::replies::Replies;

/// Requests of one connection running at once.
pub const MAX_IN_FLIGHT: usize = 64;
/// Read and write payload bytes one connection may hold at once (a client that sends reads
/// and never reads the replies holds at most this much of the server's memory; one request
/// of any allowed size always proceeds). Kept small enough that the data of the reads in
/// flight stays in the CPU's caches between the read that fills it and the send that copies it
/// into the socket: with 64 MiB, 64 reads of 256 KiB (nbdcopy's pattern) were all filled
/// before the first was sent, and every send copied cold memory. A few MiB keep the socket
/// busy (it takes far less at once).
const MAX_BYTES_IN_FLIGHT: u64 = 4 << 20;
/// The receive buffer of a connection.
const RECV_BUF: usize = 64 << 10;
/// Reads at least this large go from the page cache without copying where the export's
/// bytes lie in a host file and the socket is plain ([`Replies::send_file`]); smaller ones
/// are cheaper copied and batched.
const ZERO_COPY_MIN: u64 = 64 << 10;
/// Room before a read's data for its reply header (a page, so the data stays aligned).
const HEAD_ROOM: usize = 4096;
/// Extents in one block status reply.
const MAX_EXTENTS: usize = 1024;
/// The largest block status payload taken (an effect length and context ids).
const MAX_STATUS_PAYLOAD: u64 = 64 << 10;
/// Context ids.
const CTX_BASE: u32 = 1;
const CTX_DEPTH: u32 = 2;
/// The first dirty bitmap's context id; the others follow.
const CTX_BITMAP: u32 = 3;

/// `--detect-zeroes`: what a write whose data is all zeroes becomes, as in QEMU's block layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DetectZeroes {
    /// A write like any other.
    Off,
    /// A zero write (the format records zeroes, as qcow2's zero clusters, where it can).
    On,
    /// A zero write that may free the space, where trims are passed down (`--discard=unmap`).
    Unmap,
}

/// What is served, as one reactor sees it.
pub struct Export {
    pub name: String,
    pub description: Option<String>,
    pub queue: Queue,
    pub chain: Chain,
    pub size: u64,
    pub read_only: bool,
    /// Trim requests are passed down (`--discard=unmap`).
    pub discard: bool,
    /// What writes of zeroes become (`--detect-zeroes`).
    pub detect_zeroes: DetectZeroes,
    /// `qemu:allocation-depth` is offered (`-A`).
    pub allocation_depth: bool,
    /// Several clients may connect (`-e` > 1): advertise multi-conn.
    pub multi_conn: bool,
    /// Dirty bitmaps offered as `qemu:dirty-bitmap:NAME` (`-B`).
    pub bitmaps: Vec<ExportBitmap>,
    /// The reactor that serves the export's transmissions (an `iothread`), when not the one
    /// that negotiated the connection.
    pub home: Option<ReactorHandle>,
}

/// What a reactor needs to build its own view of an export (all of it can cross threads).
#[derive(Clone)]
pub struct ExportSpec {
    pub node: Arc<dyn basalt_engine::Node>,
    pub name: String,
    pub description: Option<String>,
    pub read_only: bool,
    pub discard: bool,
    pub detect_zeroes: DetectZeroes,
    pub allocation_depth: bool,
    pub multi_conn: bool,
    /// The reactor that serves the export's transmissions, when another one negotiates
    /// (see [`Export::home`]). That reactor's own view has none.
    pub home: Option<ReactorHandle>,
}

impl ExportSpec {
    /// The export as the current reactor serves it: its own queue and chain on the node.
    pub fn export(&self, bitmaps: Vec<ExportBitmap>) -> Result<Rc<Export>, String> {
        let queue = Queue::new(self.node.clone()).map_err(|e| e.msg)?;
        let chain = Chain::new(self.node.clone())?;
        Ok(Rc::new(Export {
            name: self.name.clone(),
            description: self.description.clone(),
            queue,
            chain,
            size: self.node.size(),
            read_only: self.read_only || self.node.read_only(),
            discard: self.discard,
            detect_zeroes: self.detect_zeroes,
            allocation_depth: self.allocation_depth,
            multi_conn: self.multi_conn,
            bitmaps,
            home: self.home.clone(),
        }))
    }
}

impl Export {
    fn tflags(&self, neg: &Negotiated) -> u16 {
        let structured = neg.structured;
        let mut f = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::SEND_FUA | tflag::SEND_CACHE;
        if neg.extended {
            f |= tflag::BLOCK_STAT_PAYLOAD;
        }
        if self.read_only {
            f |= tflag::READ_ONLY;
        } else {
            f |= tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES | tflag::SEND_FAST_ZERO;
        }
        if structured {
            f |= tflag::SEND_DF;
        }
        if self.multi_conn {
            f |= tflag::CAN_MULTI_CONN;
        }
        f
    }

    /// The meta contexts this export offers, with their ids (bitmaps last given first, in
    /// the order qemu-nbd lists them).
    fn contexts(&self) -> Vec<(u32, String)> {
        let mut v = vec![(CTX_BASE, "base:allocation".to_string())];
        if self.allocation_depth {
            v.push((CTX_DEPTH, "qemu:allocation-depth".to_string()));
        }
        for (i, b) in self.bitmaps.iter().enumerate().rev() {
            v.push((CTX_BITMAP + i as u32, b.context()));
        }
        v
    }

    /// The bitmap behind context `id`, if it is one.
    fn bitmap(&self, id: u32) -> Option<&ExportBitmap> {
        id.checked_sub(CTX_BITMAP).and_then(|i| self.bitmaps.get(i as usize))
    }

    /// A change to `off..off+len` went through: enabled bitmaps record it.
    fn changed(&self, off: u64, len: u64) {
        for b in &self.bitmaps {
            b.mark(off, len);
        }
    }
}

/// A connection's failure, reported on the server's stderr by the caller.
pub type ConnResult = Result<(), String>;

fn ioe(e: std::io::Error) -> String {
    e.to_string()
}

/// What one listener offers: its exports, looked up by name, and TLS when it requires it
/// (with the authorization object that clients' identities are checked against, if any).
pub struct Offer {
    pub exports: Vec<Rc<Export>>,
    pub tls: Option<ServerTls>,
    pub authz: Option<Arc<Authz>>,
}

/// After the TLS handshake: whether the client's identity passes `authz`. As QEMU, a client
/// that showed no identity (x509 without `verify-peer`) is not checked; unlike QEMU, which
/// leaves PSK clients unchecked, a PSK username is checked too (an authorization object given
/// with PSK credentials then means what it says).
fn authorize(sock: &Sock, authz: Option<&Authz>) -> ConnResult {
    let (Some(authz), Some((kind, who))) = (authz, sock.tls_peer()) else { return Ok(()) };
    let kind = match kind {
        PeerKind::X509 => "x509",
        PeerKind::Psk => "PSK",
    };
    let Some(who) = who else {
        return Err(format!("TLS {kind} authz check: the client certificate's name cannot be read"));
    };
    if authz.allows(&who) {
        return Ok(());
    }
    Err(format!("TLS {kind} authz check for {who} is denied"))
}

fn find<'a>(exports: &'a [Rc<Export>], name: &str) -> Option<&'a Rc<Export>> {
    exports.iter().find(|e| e.name == name)
}

/// Serve one connection to the end.
pub async fn serve(sock: Rc<Sock>, offer: Rc<Offer>) -> ConnResult {
    let Some((neg, exp)) = negotiate(&sock, &offer).await? else { return Ok(()) };
    let Some(home) = exp.home.clone() else { return transmission(sock, exp, neg).await };
    // The export is served on another reactor (its iothread): the connection moves there,
    // TLS session included, and this task waits for it to end (so that the accepting side
    // counts it until then). That reactor serves it with its own view of the export.
    let parts = Rc::try_unwrap(sock).map_err(|_| "the connection is still in use".to_string())?.into_parts();
    let name = exp.name.clone();
    drop(exp);
    home.run(move || async move {
        let exp = super::spread::local_offer()
            .and_then(|o| find(&o.exports, &name).cloned())
            .ok_or_else(|| format!("export '{name}': its iothread is stopping"))?;
        transmission(Rc::new(Sock::from_parts(parts)), exp, neg).await
    })
    .await
    // The iothread stopped under it: the server is shutting down, which ends every connection.
    .unwrap_or(Ok(()))
}

/// What negotiation settled.
#[derive(Default, Clone)]
struct Negotiated {
    structured: bool,
    /// Extended headers (which imply structured replies).
    extended: bool,
    contexts: Vec<u32>,
    /// The export the contexts were chosen for (they do not carry over to another).
    contexts_for: String,
}

async fn reply(sock: &Sock, option: u32, typ: u32, data: &[u8]) -> ConnResult {
    sock.write_bytes(&proto::option_reply(option, typ, data)).await.map_err(ioe)
}

async fn reply_err(sock: &Sock, option: u32, typ: u32, msg: &str) -> ConnResult {
    reply(sock, option, typ, msg.as_bytes()).await
}

/// Fixed newstyle negotiation; `None` when the client ended it without entering transmission.
async fn negotiate(sock: &Sock, offer: &Offer) -> Result<Option<(Negotiated, Rc<Export>)>, String> {
    let exports = &offer.exports[..];
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    sock.write_bytes(&hello).await.map_err(ioe)?;
    let cf = sock.read_bytes(4).await.map_err(ioe)?;
    let cflags = u32::from_be_bytes(cf[..4].try_into().expect("4 bytes"));
    if cflags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        return Err(format!("unknown client flags {cflags:#x}"));
    }
    let no_zeroes = cflags & proto::FLAG_C_NO_ZEROES != 0;
    let mut neg = Negotiated::default();
    loop {
        let h = sock.read_bytes(OptionHeader::SIZE).await.map_err(ioe)?;
        let h = OptionHeader::parse(h[..16].try_into().expect("16 bytes")).map_err(|e| e.0)?;
        if h.len > proto::MAX_OPTION_LEN {
            // Too big to take in: drain it if it is not absurd, and say so.
            if h.len > 16 << 20 {
                return Err(format!("option {} of {} bytes", h.option, h.len));
            }
            sock.read_bytes(h.len as usize).await.map_err(ioe)?;
            reply_err(sock, h.option, rep::ERR_TOO_BIG, "option too long").await?;
            continue;
        }
        let data = sock.read_bytes(h.len as usize).await.map_err(ioe)?;
        let data = data.as_slice();
        if offer.tls.is_some() && !sock.is_tls() && !matches!(h.option, opt::STARTTLS | opt::ABORT) {
            let msg = format!("Option {:#x} not permitted before TLS", h.option);
            if h.option == opt::EXPORT_NAME {
                return Err(msg);
            }
            reply_err(sock, h.option, rep::ERR_TLS_REQD, &msg).await?;
            continue;
        }
        match h.option {
            opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(data);
                let Some(exp) = find(exports, &name) else {
                    return Err(format!("client asked for export '{name}', which does not exist"));
                };
                if neg.contexts_for != name {
                    neg.contexts.clear();
                }
                let mut o = Vec::with_capacity(134);
                o.extend_from_slice(&exp.size.to_be_bytes());
                o.extend_from_slice(&exp.tflags(&neg).to_be_bytes());
                if !no_zeroes {
                    o.extend_from_slice(&[0u8; 124]);
                }
                sock.write_bytes(&o).await.map_err(ioe)?;
                return Ok(Some((neg, exp.clone())));
            }
            opt::ABORT => {
                let _ = reply(sock, h.option, rep::ACK, &[]).await;
                return Ok(None);
            }
            opt::LIST => {
                if !data.is_empty() {
                    reply_err(sock, h.option, rep::ERR_INVALID, "NBD_OPT_LIST takes no data").await?;
                    continue;
                }
                for exp in exports {
                    let mut d = Vec::new();
                    d.extend_from_slice(&(exp.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(exp.name.as_bytes());
                    if let Some(desc) = &exp.description {
                        d.extend_from_slice(desc.as_bytes());
                    }
                    reply(sock, h.option, rep::SERVER, &d).await?;
                }
                reply(sock, h.option, rep::ACK, &[]).await?;
            }
            opt::INFO | opt::GO => {
                if let Some(exp) = info_or_go(sock, exports, h.option, data, &neg).await? {
                    if h.option == opt::GO {
                        if neg.contexts_for != exp.name {
                            neg.contexts.clear();
                        }
                        return Ok(Some((neg, exp)));
                    }
                }
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply_err(sock, h.option, rep::ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data").await?;
                } else if neg.extended {
                    reply_err(sock, h.option, rep::ERR_INVALID, "extended headers already negotiated").await?;
                } else if neg.structured {
                    reply_err(sock, h.option, rep::ERR_INVALID, "structured replies already negotiated").await?;
                } else {
                    neg.structured = true;
                    reply(sock, h.option, rep::ACK, &[]).await?;
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => meta_context(sock, exports, h.option, data, &mut neg).await?,
            opt::STARTTLS => match &offer.tls {
                None => reply_err(sock, h.option, rep::ERR_POLICY, "TLS not configured").await?,
                Some(_) if sock.is_tls() => reply_err(sock, h.option, rep::ERR_INVALID, "TLS already enabled").await?,
                Some(_) if !data.is_empty() => {
                    reply_err(sock, h.option, rep::ERR_INVALID, "OPT_STARTTLS should not have length").await?
                }
                Some(tls) => {
                    reply(sock, h.option, rep::ACK, &[]).await?;
                    sock.start_tls_server(tls).await.map_err(|e| format!("TLS handshake failed: {e}"))?;
                    authorize(sock, offer.authz.as_deref())?;
                }
            },
            opt::EXTENDED_HEADERS => {
                if !data.is_empty() {
                    reply_err(sock, h.option, rep::ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data").await?;
                } else if neg.extended {
                    reply_err(sock, h.option, rep::ERR_INVALID, "extended headers already negotiated").await?;
                } else {
                    (neg.extended, neg.structured) = (true, true);
                    reply(sock, h.option, rep::ACK, &[]).await?;
                }
            }
            o => reply_err(sock, o, rep::ERR_UNSUP, &format!("option {o} is not supported")).await?,
        }
    }
}

/// `NBD_OPT_INFO`/`GO`; returns the export when it was found and acknowledged.
async fn info_or_go(
    sock: &Sock,
    exports: &[Rc<Export>],
    option: u32,
    data: &[u8],
    neg: &Negotiated,
) -> Result<Option<Rc<Export>>, String> {
    let (name, reqs) = match proto::parse_info_request(data) {
        Ok(v) => v,
        Err(e) => {
            reply_err(sock, option, rep::ERR_INVALID, &e.0).await?;
            return Ok(None);
        }
    };
    let Some(exp) = find(exports, &name) else {
        reply_err(sock, option, rep::ERR_UNKNOWN, &format!("export '{name}' not present")).await?;
        return Ok(None);
    };
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&info::EXPORT.to_be_bytes());
    d.extend_from_slice(&exp.size.to_be_bytes());
    d.extend_from_slice(&exp.tflags(neg).to_be_bytes());
    reply(sock, option, rep::INFO, &d).await?;
    if reqs.contains(&info::NAME) {
        let mut d = info::NAME.to_be_bytes().to_vec();
        d.extend_from_slice(exp.name.as_bytes());
        reply(sock, option, rep::INFO, &d).await?;
    }
    if let Some(desc) = exp.description.as_ref().filter(|_| reqs.contains(&info::DESCRIPTION)) {
        let mut d = info::DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(desc.as_bytes());
        reply(sock, option, rep::INFO, &d).await?;
    }
    if reqs.contains(&info::BLOCK_SIZE) {
        // Any alignment works (the engine pads), 4 KiB preferred, 32 MiB at most.
        let mut d = info::BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [1u32, 4096, proto::MAX_PAYLOAD] {
            d.extend_from_slice(&v.to_be_bytes());
        }
        reply(sock, option, rep::INFO, &d).await?;
    }
    reply(sock, option, rep::ACK, &[]).await?;
    Ok(Some(exp.clone()))
}

async fn meta_context(sock: &Sock, exports: &[Rc<Export>], option: u32, data: &[u8], neg: &mut Negotiated) -> ConnResult {
    if !neg.structured {
        return reply_err(sock, option, rep::ERR_INVALID, "structured replies have not been negotiated").await;
    }
    let (name, queries) = match proto::parse_meta_request(data) {
        Ok(v) => v,
        Err(e) => return reply_err(sock, option, rep::ERR_INVALID, &e.0).await,
    };
    let Some(exp) = find(exports, &name) else {
        return reply_err(sock, option, rep::ERR_UNKNOWN, &format!("export '{name}' not present")).await;
    };
    let offered = exp.contexts();
    let list = option == opt::LIST_META_CONTEXT;
    let mut chosen = Vec::new();
    for (id, ctx) in &offered {
        let wanted = if queries.is_empty() {
            list
        } else {
            queries.iter().any(|q| q == ctx || (list && q.ends_with(':') && ctx.starts_with(q.as_str())))
        };
        if wanted {
            chosen.push((*id, ctx.clone()));
        }
    }
    for (id, ctx) in &chosen {
        let mut d = if list { 0u32 } else { *id }.to_be_bytes().to_vec();
        d.extend_from_slice(ctx.as_bytes());
        reply(sock, option, rep::META_CONTEXT, &d).await?;
    }
    if !list {
        neg.contexts = chosen.iter().map(|(id, _)| *id).collect();
        neg.contexts_for = name;
    }
    reply(sock, option, rep::ACK, &[]).await
}

struct Conn {
    replies: Rc<Replies>,
    exp: Rc<Export>,
    neg: Negotiated,
    /// The socket takes zero-copy sends.
    zero_copy: bool,
    in_flight: Cell<usize>,
    /// Payload bytes of the requests in flight.
    bytes: Cell<u64>,
    waiters: RefCell<VecDeque<Waker>>,
}

impl Conn {
    fn done_one(&self, bytes: u64) {
        self.in_flight.set(self.in_flight.get() - 1);
        self.bytes.set(self.bytes.get() - bytes);
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Wait until fewer than `n` requests and at most `MAX_BYTES_IN_FLIGHT - bytes` payload
    /// bytes are in flight (or nothing is).
    async fn wait_below(&self, n: usize, bytes: u64) {
        std::future::poll_fn(|cx| {
            let fits = self.bytes.get() + bytes <= MAX_BYTES_IN_FLIGHT || self.in_flight.get() == 0;
            if self.in_flight.get() < n && fits {
                Poll::Ready(())
            } else {
                self.waiters.borrow_mut().push_back(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Write a reply made of `parts` whole (queued behind the replies before it).
    async fn send(&self, parts: Vec<IoBuf>) {
        self.replies.send(parts).await
    }

    /// A chunk header in the negotiated style (structured or extended).
    fn chunk(&self, flags: u16, typ: u16, req: &Request, len: u64) -> Vec<u8> {
        if self.neg.extended {
            proto::ext_chunk_header(flags, typ, req.cookie, req.offset, len).to_vec()
        } else {
            proto::chunk_header(flags, typ, req.cookie, len as u32).to_vec()
        }
    }

    /// Reply to `req` with an error (or success when `error` is 0) and no data.
    async fn status(&self, req: &Request, error: u32, msg: &str) {
        let b = if !self.neg.structured {
            proto::simple_reply(error, req.cookie).to_vec()
        } else if error != 0 {
            let p = proto::error_payload(error, msg);
            let mut o = self.chunk(chunk::FLAG_DONE, chunk::ERROR, req, p.len() as u64);
            o.extend(p);
            o
        } else {
            self.chunk(chunk::FLAG_DONE, chunk::NONE, req, 0)
        };
        self.send(vec![IoBuf::from_slice(&b)]).await;
    }
}

fn wire(e: IoStatus) -> u32 {
    proto::errno_to_wire(e.errno())
}

async fn transmission(sock: Rc<Sock>, exp: Rc<Export>, neg: Negotiated) -> ConnResult {
    let conn = Rc::new(Conn {
        replies: Replies::start(sock.clone()),
        exp,
        neg,
        zero_copy: sock.can_send_file(),
        in_flight: Cell::new(0),
        bytes: Cell::new(0),
        waiters: RefCell::new(VecDeque::new()),
    });
    // Requests are read in bursts: one read takes all the headers (and small payloads) that
    // have arrived.
    let mut rx = RecvBuf::new(RECV_BUF);
    let result = loop {
        conn.wait_below(MAX_IN_FLIGHT, 0).await;
        if conn.replies.broken() {
            break Err("the client stopped reading replies".to_string());
        }
        let size = if conn.neg.extended { Request::EXT_SIZE } else { Request::SIZE };
        match rx.fill(&sock, size).await {
            Ok(true) => {}
            Ok(false) => break Ok(()),
            Err(e) => break Err(e.to_string()),
        }
        let parsed = if conn.neg.extended {
            Request::parse_ext(rx.peek(size).try_into().expect("32 bytes"))
        } else {
            Request::parse(rx.peek(size).try_into().expect("28 bytes"))
        };
        rx.consume(size);
        let req = match parsed {
            Ok(r) => r,
            Err(e) => break Err(e.0),
        };
        if req.typ == cmd::DISC {
            break Ok(());
        }
        let cost = if matches!(req.typ, cmd::READ | cmd::WRITE) { req.len.min(u64::from(proto::MAX_PAYLOAD)) } else { 0 };
        conn.wait_below(MAX_IN_FLIGHT, cost).await;
        let mut payload = None;
        let mut req = req;
        let mut filter = None;
        if req.typ != cmd::WRITE && req.flags & cflag::PAYLOAD_LEN != 0 && conn.neg.extended {
            // A payload on another command: read it (keeping the stream in step), then judge it.
            if req.len > MAX_STATUS_PAYLOAD {
                break Err(format!("payload of {} bytes on command {}", req.len, req.typ));
            }
            let body = match rx.read_into(&sock, IoBuf::new_uninit(req.len as usize)).await {
                (Ok(()), b) => b,
                (Err(e), _) => break Err(e.to_string()),
            };
            filter = Some(if req.typ == cmd::BLOCK_STATUS {
                status_filter(body.as_slice(), &conn.neg.contexts).map(|(effect, ids)| {
                    req.len = effect;
                    ids
                })
            } else {
                Err(format!("command {} takes no payload", req.typ))
            });
        }
        if req.typ == cmd::WRITE {
            if req.len > u64::from(proto::MAX_PAYLOAD) {
                break Err(format!("write of {} bytes is over the {} byte limit", req.len, proto::MAX_PAYLOAD));
            }
            match rx.read_into(&sock, IoBuf::new_uninit(req.len as usize)).await {
                (Ok(()), b) => payload = Some(b),
                (Err(e), _) => break Err(e.to_string()),
            }
        }
        conn.in_flight.set(conn.in_flight.get() + 1);
        conn.bytes.set(conn.bytes.get() + cost);
        let c = conn.clone();
        basalt_reactor::spawn_local(async move {
            match filter {
                Some(Err(e)) => c.status(&req, proto::err::EINVAL, &e).await,
                Some(Ok(ids)) => block_status(&c, &req, &ids).await,
                None => handle(&c, req, payload).await,
            }
            c.done_one(cost);
        });
    };
    // Every request taken in gets its reply before the connection closes.
    conn.wait_below(1, 0).await;
    conn.replies.close();
    result
}

async fn handle(c: &Conn, req: Request, payload: Option<IoBuf>) {
    let exp = &c.exp;
    let end = req.offset.checked_add(req.len);
    let in_bounds = end.is_some_and(|e| e <= exp.size);
    let writes = matches!(req.typ, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && exp.read_only {
        return c.status(&req, proto::err::EPERM, "export is read-only").await;
    }
    let q = &exp.queue;
    let fua = req.flags & cflag::FUA != 0;
    match req.typ {
        cmd::READ | cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES | cmd::CACHE | cmd::BLOCK_STATUS if !in_bounds => {
            let e = if writes { proto::err::ENOSPC } else { proto::err::EINVAL };
            c.status(&req, e, "request past the end of the export").await
        }
        cmd::READ => {
            if req.len > u64::from(proto::MAX_PAYLOAD) {
                return c.status(&req, proto::err::EINVAL, "read too large").await;
            }
            let head = || {
                if c.neg.structured {
                    let mut h = c.chunk(chunk::FLAG_DONE, chunk::OFFSET_DATA, &req, 8 + req.len);
                    h.extend_from_slice(&req.offset.to_be_bytes());
                    h
                } else {
                    proto::simple_reply(0, req.cookie).to_vec()
                }
            };
            if c.zero_copy && req.len >= ZERO_COPY_MIN {
                if let Some(ext) = q.node().host_extent(req.offset, req.len) {
                    return c.replies.send_file(IoBuf::from_slice(&head()), ext, req.len).await;
                }
            }
            // The reply header goes in front of the data in the same buffer (the data stays
            // page-aligned), so header and data leave in one socket write.
            let mut buf = IoBuf::new_uninit(HEAD_ROOM + req.len as usize);
            buf.set_window(HEAD_ROOM, req.len as usize);
            let d = q.read(req.offset, buf).await;
            match (d.res, d.buf) {
                (Ok(_), Some(mut data)) => {
                    let head = head();
                    if data.window_start() == HEAD_ROOM {
                        data.set_window(HEAD_ROOM - head.len(), head.len() + req.len as usize);
                        data.as_mut_slice()[..head.len()].copy_from_slice(&head);
                        c.send(vec![data]).await
                    } else {
                        c.send(vec![IoBuf::from_slice(&head), data]).await
                    }
                }
                (Err(e), _) => c.status(&req, wire(e), &format!("read failed: {e}")).await,
                (Ok(_), None) => c.status(&req, proto::err::EIO, "read lost its buffer").await,
            }
        }
        cmd::WRITE => {
            let buf = payload.expect("a write carries its payload");
            let r = if exp.detect_zeroes != DetectZeroes::Off && basalt_engine::buffer_is_zero(buf.as_slice()) {
                let may_unmap = exp.detect_zeroes == DetectZeroes::Unmap && exp.discard;
                q.write_zeroes(req.offset, req.len, ZeroFlags { may_unmap, no_fallback: false, fua }).await.res
            } else {
                q.write(req.offset, buf, WriteFlags { fua }).await.res
            };
            if r.is_ok() {
                exp.changed(req.offset, req.len);
            }
            finish(c, &req, r.map(|_| ())).await
        }
        cmd::FLUSH => finish(c, &req, q.flush().await.res.map(|_| ())).await,
        cmd::TRIM => {
            let mut r = if exp.discard { q.discard(req.offset, req.len).await.res.map(|_| ()) } else { Ok(()) };
            if r.is_ok() && exp.discard {
                exp.changed(req.offset, req.len);
            }
            if r.is_ok() && fua {
                r = q.flush().await.res.map(|_| ());
            }
            finish(c, &req, r).await
        }
        cmd::WRITE_ZEROES => {
            let fast = req.flags & cflag::FAST_ZERO != 0;
            let flags = ZeroFlags { may_unmap: req.flags & cflag::NO_HOLE == 0 && exp.discard, no_fallback: fast, fua };
            let r = q.write_zeroes(req.offset, req.len, flags).await.res.map(|_| ());
            if r.is_ok() {
                exp.changed(req.offset, req.len);
            }
            finish(c, &req, r).await
        }
        // Passed down (a node that can, such as an NBD client, prefetches; others do nothing).
        cmd::CACHE => finish(c, &req, q.prefetch(req.offset, req.len).await.res.map(|_| ())).await,
        cmd::BLOCK_STATUS => block_status(c, &req, &c.neg.contexts).await,
        t => c.status(&req, proto::err::EINVAL, &format!("unknown command {t}")).await,
    }
}

async fn finish(c: &Conn, req: &Request, r: Result<(), IoStatus>) {
    match r {
        Ok(()) => c.status(req, 0, "").await,
        Err(e) => c.status(req, wire(e), &e.to_string()).await,
    }
}

/// A block status payload (`NBD_CMD_FLAG_PAYLOAD_LEN`): the effect length and the contexts
/// wanted, each one negotiated (repeats are answered once).
fn status_filter(body: &[u8], negotiated: &[u32]) -> Result<(u64, Vec<u32>), String> {
    if body.len() < 12 || !(body.len() - 8).is_multiple_of(4) {
        return Err(format!("block status payload of {} bytes", body.len()));
    }
    let effect = u64::from_be_bytes(body[..8].try_into().expect("8 bytes"));
    let mut ids = Vec::new();
    for id in body[8..].chunks(4).map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes"))) {
        if !negotiated.contains(&id) {
            return Err(format!("metadata context {id} was not negotiated"));
        }
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    Ok((effect, ids))
}

/// Block status for the contexts `ids` (all negotiated ones, or a payload's choice).
async fn block_status(c: &Conn, req: &Request, ids: &[u32]) {
    if !c.neg.structured || c.neg.contexts.is_empty() {
        return c.status(req, proto::err::EINVAL, "no metadata context was negotiated").await;
    }
    if req.len == 0 {
        return c.status(req, proto::err::EINVAL, "empty block status request").await;
    }
    if req.offset.checked_add(req.len).is_none_or(|e| e > c.exp.size) {
        return c.status(req, proto::err::EINVAL, "request past the end of the export").await;
    }
    let one = req.flags & cflag::REQ_ONE != 0;
    let max = if one { 1 } else { MAX_EXTENTS };
    let mut chunks = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        // Extent lengths: 32 bits with compact headers, 64 with extended ones.
        let cap = if c.neg.extended { u64::MAX } else { u64::from(u32::MAX) };
        let mut ext: Vec<(u64, u32)> = Vec::new();
        let (mut off, end) = (req.offset, req.offset + req.len);
        while off < end {
            let (len, flags) = match c.exp.bitmap(*id) {
                Some(bm) => bm.extent(off, end),
                None => {
                    let st = match c.exp.chain.status(off, end - off).await {
                        Ok(s) => s,
                        Err(e) => return c.status(req, wire(e), &format!("block status failed: {e}")).await,
                    };
                    let flags = match *id {
                        CTX_BASE => (if st.data { 0 } else { proto::STATE_HOLE }) | if st.zero { proto::STATE_ZERO } else { 0 },
                        _ if st.allocated => st.depth + 1,
                        // Zeroes past the end of a short backing image count as allocated
                        // there (QEMU's rule), one layer below the one that answered.
                        _ if st.beyond_backing => st.depth + 2,
                        _ => 0,
                    };
                    (st.len.min(end - off), flags)
                }
            };
            let len = len.clamp(1, cap);
            let n = ext.len();
            match ext.last_mut() {
                Some(l) if l.1 == flags && l.0.checked_add(len).is_some_and(|t| t <= cap) => l.0 += len,
                _ if n == max => break,
                _ => ext.push((len, flags)),
            }
            off += len;
        }
        let flags = if i + 1 == ids.len() { chunk::FLAG_DONE } else { 0 };
        let mut p = if c.neg.extended {
            let mut p = c.chunk(flags, chunk::BLOCK_STATUS_EXT, req, 8 + 16 * ext.len() as u64);
            p.extend_from_slice(&id.to_be_bytes());
            p.extend_from_slice(&(ext.len() as u32).to_be_bytes());
            p
        } else {
            let mut p = c.chunk(flags, chunk::BLOCK_STATUS, req, 4 + 8 * ext.len() as u64);
            p.extend_from_slice(&id.to_be_bytes());
            p
        };
        for (l, f) in ext {
            if c.neg.extended {
                p.extend_from_slice(&l.to_be_bytes());
                p.extend_from_slice(&u64::from(f).to_be_bytes());
            } else {
                p.extend_from_slice(&(l as u32).to_be_bytes());
                p.extend_from_slice(&f.to_be_bytes());
            }
        }
        chunks.push(IoBuf::from_slice(&p));
    }
    c.send(chunks).await
}
