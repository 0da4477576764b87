//! NBD: the wire protocol ([`proto`], shared with Basalt's server in basalt-tools), the socket
//! layer ([`sock`]), TLS ([`tls`]: x509 with rustls, pre-shared keys with OpenSSL, both sides)
//! and the `nbd` protocol driver, a client of any NBD server.
//!
//! The driver: [`target`] turns QEMU's filenames and options into where to connect,
//! [`negotiate`] does the handshake when the node opens (the export's size, flags, block size
//! constraints and block status context are then fixed for the node's life), [`conn`] runs one
//! connection's transmission phase on a reactor. With `tls-creds`, every connection (the
//! first, extra ones, reconnections) starts TLS before anything else. The node's limits are the export's minimum
//! block size (alignment) and maximum block size (largest transfer); the engine pads and splits
//! to them. Writes with FUA on a server without FUA are followed by a flush; trim and write
//! zeroes are split to what a request can carry.
//!
//! Reactors: the first reactor to use the node owns the connection made at open. Where the
//! server advertises multi-conn, other reactors get connections of their own; otherwise (or
//! where the server does not greet another connection within a second, as a server limited
//! to one client does not) their requests are forwarded to the owner as messages, so a flush
//! covers every write (the protocol only promises that per connection without multi-conn).

pub mod conn;
pub mod fuzz;
pub mod negotiate;
pub mod proto;
pub mod sendfile;
pub mod sock;
pub mod target;
pub mod tls;
pub mod tls_check;
pub mod tls_peer;

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak as RcWeak};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use basalt_engine::{
    BlockDriver, BlockError, BlockResult, BlockStatus, DriverKind, ErrorKind, Graph, IoDone, IoFuture, IoStatus, Limits,
    LocalBoxFuture, Node, NodeQueue, OpenFlags, Opts, SlotKind, WriteFlags, ZeroFlags,
};
use basalt_reactor::{IoBuf, ReactorHandle};

use conn::{Conn, Dial, Link};
use negotiate::{Handshake, Negotiated};
use proto::{cflag, cmd, tflag, Request};
use target::NbdTarget;

/// The `nbd` protocol driver.
pub struct NbdDriver;

/// Driver instance for the registry.
pub static NBD: NbdDriver = NbdDriver;

/// How long each read of the handshake at open may take.
const OPEN_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a reactor's own extra connection may take to be greeted before the reactor
/// forwards to the owner instead.
const EXTRA_CONN_TIMEOUT: Duration = Duration::from_secs(1);

static NEXT_UID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This reactor's connections, by node.
    static CONNS: RefCell<Vec<(u64, RcWeak<ConnHandle>)>> = const { RefCell::new(Vec::new()) };
}

fn local_conn(uid: u64) -> Option<Rc<ConnHandle>> {
    CONNS.with(|c| {
        let mut c = c.borrow_mut();
        c.retain(|(_, w)| w.strong_count() > 0);
        c.iter().find(|(u, _)| *u == uid).and_then(|(_, w)| w.upgrade())
    })
}

struct NbdNode {
    name: String,
    uid: u64,
    dial: Arc<Dial>,
    read_only: bool,
    discard: bool,
    /// The connection opened with the node, for the first queue.
    first: Mutex<Option<Link>>,
    /// The reactor that owns the first connection.
    owner: Arc<Mutex<Option<ReactorHandle>>>,
    /// An extra connection failed: forward from now on.
    extra_failed: std::sync::atomic::AtomicBool,
}

/// Connect (retrying for `open-timeout`) and negotiate.
fn connect(t: &NbdTarget, context: &str, tls: Option<&tls::ClientTls>) -> BlockResult<(Link, Negotiated)> {
    let until = Instant::now() + t.open_timeout;
    let fd = loop {
        match t.connect() {
            Ok(fd) => break fd,
            Err(_) if Instant::now() < until => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => return Err(e),
        }
    };
    let mut h = Handshake::new(fd, OPEN_HANDSHAKE_TIMEOUT);
    let n = h.negotiate(&t.want(context, tls))?;
    Ok((h.into_parts(), n))
}

fn open_nbd(graph: &Graph, mut opts: Opts, flags: OpenFlags) -> BlockResult<Arc<dyn Node>> {
    let name = graph.take_node_name(&mut opts)?;
    if let Some(f) = opts.take_str("filename") {
        if opts.has_sub("server.") || opts.contains("host") || opts.contains("path") || opts.contains("export") {
            return Err(BlockError::option("No extra parameters are allowed with an NBD filename"));
        }
        target::parse_filename(&f, &mut opts)?;
    }
    let target = NbdTarget::from_opts(&mut opts)?;
    let mut read_only = opts.take_bool("read-only", flags.read_only)?;
    let auto_ro = opts.take_bool("auto-read-only", false)?;
    let force_share = opts.take_bool("force-share", false)?;
    let _ = opts.take_bool("cache.direct", flags.cache_direct)?;
    let _ = opts.take_bool("cache.no-flush", flags.no_flush)?;
    let discard = opts.take_enum("discard", &["ignore", "off", "unmap", "on"], "unmap")?;
    opts.expect_empty("Block protocol", "nbd")?;
    if force_share && !read_only {
        return Err(BlockError::option("force-share=on can only be used with read-only images"));
    }
    let context = target.context.clone().unwrap_or_else(|| "base:allocation".into());
    let tls = target.client_tls(graph.secrets())?;
    let (link, neg) = connect(&target, &context, tls.as_ref())?;
    if neg.has(tflag::READ_ONLY) && !read_only {
        if !auto_ro {
            // QEMU's driver fails with a bare EACCES here, which its block layer words so.
            return Err(BlockError::errno("Could not open image", libc::EACCES));
        }
        read_only = true;
    }
    let dial = Arc::new(Dial { target: Arc::new(target), context, neg, tls });
    Ok(Arc::new(NbdNode {
        name,
        uid: NEXT_UID.fetch_add(1, Ordering::Relaxed),
        dial,
        read_only,
        discard: discard == "unmap" || discard == "on",
        first: Mutex::new(Some(link)),
        owner: Arc::new(Mutex::new(None)),
        extra_failed: false.into(),
    }))
}

impl BlockDriver for NbdDriver {
    fn name(&self) -> &'static str {
        "nbd"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Protocol
    }
    fn protocol_prefixes(&self) -> &'static [&'static str] {
        &["nbd:", "nbd+tcp:", "nbd+unix:", "nbds:", "nbds+tcp:", "nbds+unix:"]
    }
    fn open<'a>(&'a self, graph: &'a Graph, opts: Opts, flags: OpenFlags) -> LocalBoxFuture<'a, BlockResult<Arc<dyn Node>>> {
        Box::pin(async move { open_nbd(graph, opts, flags) })
    }
}

impl NbdNode {
    fn neg(&self) -> &Negotiated {
        &self.dial.neg
    }

    /// A connection on this reactor: the one made at open (this reactor becomes the owner)
    /// or an extra one.
    fn new_conn(&self, link: Link, owner: bool) -> Rc<ConnHandle> {
        let owner = owner.then(|| self.owner.clone());
        let h = Rc::new(ConnHandle { conn: Conn::start(link, self.dial.clone()), discard: self.discard, owner });
        CONNS.with(|c| c.borrow_mut().push((self.uid, Rc::downgrade(&h))));
        h
    }
}

impl Node for NbdNode {
    fn driver(&self) -> &'static str {
        "nbd"
    }
    fn node_name(&self) -> &str {
        &self.name
    }
    fn filename(&self) -> String {
        self.dial.target.filename()
    }
    fn size(&self) -> u64 {
        self.neg().size
    }
    fn limits(&self) -> Limits {
        let n = self.neg();
        Limits { request_alignment: n.min_block, max_transfer: n.max_block, opt_transfer: n.pref_block }
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn is_format(&self) -> bool {
        false
    }
    fn protocol_type(&self) -> Option<&'static str> {
        Some("nbd")
    }
    fn create_queue(&self) -> BlockResult<Rc<dyn NodeQueue>> {
        if let Some(h) = local_conn(self.uid) {
            return Ok(Rc::new(NbdQueue::Local(h)));
        }
        let mut owner = self.owner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(o) = owner.clone() else {
            let first = self.first.lock().unwrap_or_else(|e| e.into_inner()).take();
            let link = match first {
                Some(link) => link,
                None => self.dial.dial(OPEN_HANDSHAKE_TIMEOUT).map_err(|e| BlockError::new(ErrorKind::Io, e))?,
            };
            *owner = Some(basalt_reactor::current_handle());
            return Ok(Rc::new(NbdQueue::Local(self.new_conn(link, true))));
        };
        drop(owner);
        if self.neg().has(tflag::CAN_MULTI_CONN) && !self.extra_failed.load(Ordering::Relaxed) {
            match self.dial.dial(EXTRA_CONN_TIMEOUT) {
                Ok(link) => return Ok(Rc::new(NbdQueue::Local(self.new_conn(link, false)))),
                Err(_) => self.extra_failed.store(true, Ordering::Relaxed),
            }
        }
        Ok(Rc::new(NbdQueue::Remote { owner: o, uid: self.uid }))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// A reactor's use of a connection; the connection closes when the last queue on the reactor
/// goes.
struct ConnHandle {
    conn: Rc<Conn>,
    discard: bool,
    /// The node's owner, for the owning connection: cleared when it goes.
    owner: Option<Arc<Mutex<Option<ReactorHandle>>>>,
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        self.conn.close();
        if let Some(o) = &self.owner {
            let mut o = o.lock().unwrap_or_else(|e| e.into_inner());
            if o.as_ref().map(|h| h.id()) == basalt_reactor::current_id() {
                *o = None;
            }
        }
    }
}

fn req(typ: u16, flags: u16, offset: u64, len: u64) -> Request {
    Request { flags, typ, cookie: 0, offset, len }
}

impl ConnHandle {
    fn neg(&self) -> &Negotiated {
        self.conn.neg()
    }

    fn read(&self, off: u64, buf: IoBuf) -> IoFuture {
        let len = buf.len() as u64;
        self.conn.submit(req(cmd::READ, 0, off, len), Some(buf), SlotKind::Read(len as u32))
    }

    fn write(self: &Rc<Self>, off: u64, buf: IoBuf, flags: WriteFlags) -> IoFuture {
        let len = buf.len() as u64;
        let native_fua = self.neg().has(tflag::SEND_FUA);
        let f = if flags.fua && native_fua { cflag::FUA } else { 0 };
        let w = self.conn.submit(req(cmd::WRITE, f, off, len), Some(buf), SlotKind::Write(len as u32));
        if !flags.fua || native_fua {
            return w;
        }
        let this = self.clone();
        IoFuture::boxed(async move {
            let d = w.await;
            if d.res.is_err() {
                return d;
            }
            let f = this.flush().await;
            IoDone { buf: d.buf, res: f.res.and(d.res) }
        })
    }

    /// Largest trim or zero request: what a 32-bit length holds, aligned down.
    fn max_effect(&self) -> u64 {
        if self.neg().extended {
            1 << 40
        } else {
            (u64::from(u32::MAX) + 1 - u64::from(self.neg().min_block)) & !(u64::from(self.neg().min_block) - 1)
        }
    }

    /// Send `typ` over `off..off+len` in pieces a request can carry.
    fn ranged(self: &Rc<Self>, typ: u16, flags: u16, off: u64, len: u64) -> IoFuture {
        let max = self.max_effect();
        if len <= max {
            return self.conn.submit(req(typ, flags, off, len), None, SlotKind::Other);
        }
        let this = self.clone();
        IoFuture::boxed(async move {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(max);
                let d = this.conn.submit(req(typ, flags, off + done, n), None, SlotKind::Other).await;
                if let Err(e) = d.res {
                    return IoDone::err(e);
                }
                done += n;
            }
            IoDone::ok(len)
        })
    }

    fn write_zeroes(self: &Rc<Self>, off: u64, len: u64, flags: ZeroFlags) -> IoFuture {
        let n = self.neg();
        if !n.has(tflag::SEND_WRITE_ZEROES) || (flags.no_fallback && !n.has(tflag::SEND_FAST_ZERO)) {
            return IoFuture::err(IoStatus::ENOTSUP);
        }
        let mut f = 0;
        if !flags.may_unmap {
            f |= cflag::NO_HOLE;
        }
        if flags.no_fallback {
            f |= cflag::FAST_ZERO;
        }
        if flags.fua && n.has(tflag::SEND_FUA) {
            f |= cflag::FUA;
        }
        self.ranged(cmd::WRITE_ZEROES, f, off, len)
    }

    fn discard(self: &Rc<Self>, off: u64, len: u64) -> IoFuture {
        if !self.discard || !self.neg().has(tflag::SEND_TRIM) {
            return IoFuture::ok(0);
        }
        self.ranged(cmd::TRIM, 0, off, len)
    }

    /// `NBD_CMD_CACHE` where the server takes it (advisory: nothing otherwise).
    fn prefetch(self: &Rc<Self>, off: u64, len: u64) -> IoFuture {
        if !self.neg().has(tflag::SEND_CACHE) {
            return IoFuture::ok(len);
        }
        self.ranged(cmd::CACHE, 0, off, len)
    }

    fn flush(&self) -> IoFuture {
        if !self.neg().has(tflag::SEND_FLUSH) {
            return IoFuture::ok(0);
        }
        self.conn.submit(req(cmd::FLUSH, 0, 0, 0), None, SlotKind::Other)
    }

    async fn block_status(&self, off: u64, len: u64) -> Result<BlockStatus, IoStatus> {
        let data = |len| {
            let mut st = BlockStatus::data(len);
            st.offset = Some(off);
            st
        };
        if self.neg().context_id.is_none() {
            return Ok(data(len));
        }
        let q = len.min(self.max_effect());
        let out = Rc::new(Cell::new(None));
        self.conn.submit_status(req(cmd::BLOCK_STATUS, cflag::REQ_ONE, off, q), out.clone()).await.res?;
        let (elen, flags) = out.get().ok_or(IoStatus::EIO)?;
        let hole = flags & u64::from(proto::STATE_HOLE) != 0;
        let zero = flags & u64::from(proto::STATE_ZERO) != 0;
        let mut st = data(elen.min(q));
        st.data = !hole;
        st.zero = zero;
        st.allocated = !hole || zero;
        Ok(st)
    }
}

/// A reactor's queue: its own connection, or forwarding to the owning reactor's.
enum NbdQueue {
    Local(Rc<ConnHandle>),
    Remote { owner: ReactorHandle, uid: u64 },
}

/// Run `op` on the owning reactor's connection and bring its result back.
fn forward<F, Fut>(owner: &ReactorHandle, uid: u64, op: F) -> IoFuture
where
    F: FnOnce(Rc<ConnHandle>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = IoDone> + 'static,
{
    let join = owner.run(move || async move {
        match local_conn(uid) {
            Some(h) => op(h).await,
            None => IoDone::err(IoStatus::EIO),
        }
    });
    IoFuture::boxed(async move { join.await.unwrap_or_else(|| IoDone::err(IoStatus::EIO)) })
}

impl NodeQueue for NbdQueue {
    fn read(&self, off: u64, buf: IoBuf) -> IoFuture {
        match self {
            NbdQueue::Local(h) => h.read(off, buf),
            NbdQueue::Remote { owner, uid } => forward(owner, *uid, move |h| h.read(off, buf)),
        }
    }
    fn write(&self, off: u64, buf: IoBuf, flags: WriteFlags) -> IoFuture {
        match self {
            NbdQueue::Local(h) => h.write(off, buf, flags),
            NbdQueue::Remote { owner, uid } => forward(owner, *uid, move |h| h.write(off, buf, flags)),
        }
    }
    fn write_zeroes(&self, off: u64, len: u64, flags: ZeroFlags) -> IoFuture {
        match self {
            NbdQueue::Local(h) => h.write_zeroes(off, len, flags),
            NbdQueue::Remote { owner, uid } => forward(owner, *uid, move |h| h.write_zeroes(off, len, flags)),
        }
    }
    fn discard(&self, off: u64, len: u64) -> IoFuture {
        match self {
            NbdQueue::Local(h) => h.discard(off, len),
            NbdQueue::Remote { owner, uid } => forward(owner, *uid, move |h| h.discard(off, len)),
        }
    }
    fn flush(&self) -> IoFuture {
        match self {
            NbdQueue::Local(h) => h.flush(),
            NbdQueue::Remote { owner, uid } => forward(owner, *uid, move |h| h.flush()),
        }
    }
    fn prefetch(&self, off: u64, len: u64) -> IoFuture {
        match self {
            NbdQueue::Local(h) => h.prefetch(off, len),
            NbdQueue::Remote { owner, uid } => forward(owner, *uid, move |h| h.prefetch(off, len)),
        }
    }
    fn block_status(&self, off: u64, len: u64) -> LocalBoxFuture<'_, Result<BlockStatus, IoStatus>> {
        match self {
            NbdQueue::Local(h) => Box::pin(h.block_status(off, len)),
            NbdQueue::Remote { owner, uid } => {
                let uid = *uid;
                let join = owner.run(move || async move {
                    match local_conn(uid) {
                        Some(h) => h.block_status(off, len).await,
                        None => Err(IoStatus::EIO),
                    }
                });
                Box::pin(async move { join.await.unwrap_or(Err(IoStatus::EIO)) })
            }
        }
    }
}
