//! One NBD connection in the transmission phase, on one reactor: many requests in flight,
//! replies matched by cookie, reconnection.
//!
//! A request takes a reactor completion slot (its cookie is the slot's index), parks its buffer
//! there and goes on the send queue. The writer task sends queued requests, gathering the
//! headers of requests without payload into one socket write. The reader task reads replies
//! in bursts through a receive buffer (one read for every header and small chunk that has
//! arrived): simple replies, or structured/extended chunks (`OFFSET_DATA` goes into the
//! request's buffer, what was not buffered yet read straight into it, `OFFSET_HOLE` zero-fills its part, `BLOCK_STATUS` gives the first extent,
//! `ERROR` the request's error), checking each against the request it answers: a chunk
//! outside the request, a read reply that does not cover the request exactly, an unknown
//! cookie or an oversized payload is a protocol error that ends the connection. Steady-state
//! reads and writes allocate nothing.
//!
//! When the connection is lost (a socket error, the server closing, a protocol error), a task
//! reconnects (a new handshake in the blocking pool, once a second). Requests in flight and
//! new ones wait up to `reconnect-delay` and are sent again on the new connection; after it,
//! they and new requests fail with EIO until a reconnection succeeds (QEMU's behaviour).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use basalt_engine::{IoFuture, IoStatus, SlotKind};
use basalt_reactor::{slot_alloc, slot_complete, slot_put_buf, slot_take_buf, IoBuf, SlotFuture, SlotId};

use super::negotiate::{Handshake, Negotiated};
use super::proto::{self, chunk, cmd, ChunkHeader, ReplyStart, Request};
use super::sock::{RecvBuf, Sock};
use super::target::NbdTarget;
use super::tls::{ClientTls, Session};

/// Largest non-data chunk payload accepted (block status with REQ_ONE, error messages).
const MAX_CHUNK: usize = 64 << 10;
/// Headers gathered into one write.
const BATCH: usize = 4096;
/// How long a reconnection's handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a connection needs to reconnect.
pub(crate) struct Dial {
    pub(crate) target: Arc<NbdTarget>,
    pub(crate) context: String,
    pub(crate) neg: Negotiated,
    pub(crate) tls: Option<ClientTls>,
}

/// A negotiated socket and its TLS session, if TLS is on.
pub(crate) type Link = (OwnedFd, Option<Session>);

impl Dial {
    /// Connect and negotiate, each read of the handshake waiting at most `timeout`; the
    /// export must look as it did when the node opened.
    pub(crate) fn dial(&self, timeout: Duration) -> Result<Link, String> {
        let fd = self.target.connect().map_err(|e| e.msg)?;
        let mut h = Handshake::new(fd, timeout);
        let n = h.negotiate(&self.target.want(&self.context, self.tls.as_ref())).map_err(|e| e.to_string())?;
        if n != self.neg {
            h.abort();
            return Err(format!(
                "The export changed: {} bytes with flags {:#x} where it had {} bytes with flags {:#x}",
                n.size, n.tflags, self.neg.size, self.neg.tflags
            ));
        }
        Ok(h.into_parts())
    }
}

/// Where a block status request's first extent (length, flags) is left.
pub(crate) type StatusOut = Rc<Cell<Option<(u64, u64)>>>;

struct Pending {
    req: Request,
    /// The buffer parked in the slot is the payload to send.
    payload: bool,
    /// Read bytes covered by data and hole chunks.
    got: u64,
    err: Option<i32>,
    /// Where a block status request's first extent goes.
    status: Option<StatusOut>,
    /// A task has the buffer out of the slot (sending or filling it).
    held: bool,
    /// Failed while its buffer was out: completed with EIO when it is parked again.
    zombie: bool,
}

#[derive(Default)]
struct State {
    sock: Option<Rc<Sock>>,
    /// Bumped on each new connection, so a dying task's report of the old one is ignored.
    gen: u64,
    pending: Vec<Option<Pending>>,
    sendq: VecDeque<u32>,
    /// When the connection was lost, while reconnecting.
    lost_at: Option<Instant>,
    /// The reconnect delay ran out: requests fail at once until reconnected.
    failed: bool,
    writer: Option<Waker>,
}

/// A connection and its tasks.
pub(crate) struct Conn {
    dial: Arc<Dial>,
    st: RefCell<State>,
    closing: Cell<bool>,
}

fn shutdown(sock: &Sock) {
    // SAFETY: shutting down a socket the `Sock` keeps open; wakes its readers and writers.
    unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_RDWR) };
}

impl Conn {
    /// Start the transmission phase on a negotiated socket.
    pub(crate) fn start(link: Link, dial: Arc<Dial>) -> Rc<Conn> {
        let c = Rc::new(Conn { dial, st: RefCell::new(State::default()), closing: Cell::new(false) });
        c.install(link);
        basalt_reactor::spawn_local(c.clone().writer());
        c
    }

    /// What the handshake settled.
    pub(crate) fn neg(&self) -> &Negotiated {
        &self.dial.neg
    }

    fn install(self: &Rc<Self>, (fd, session): Link) {
        let sock = Rc::new(match session {
            Some(s) => Sock::new_tls(fd, s),
            None => Sock::new(fd),
        });
        let gen = {
            let mut st = self.st.borrow_mut();
            st.gen += 1;
            st.sock = Some(sock.clone());
            st.lost_at = None;
            st.failed = false;
            // Everything still waiting for a reply goes again, in cookie order.
            let queued: Vec<u32> = st.sendq.drain(..).collect();
            let mut again = Vec::new();
            for (i, p) in st.pending.iter_mut().enumerate() {
                if let Some(p) = p.as_mut().filter(|p| !p.zombie) {
                    (p.got, p.err) = (0, None);
                    if let Some(s) = &p.status {
                        s.set(None);
                    }
                    if !queued.contains(&(i as u32)) {
                        again.push(i as u32);
                    }
                }
            }
            st.sendq.extend(again);
            st.sendq.extend(queued);
            if let Some(w) = st.writer.take() {
                w.wake();
            }
            st.gen
        };
        basalt_reactor::spawn_local(self.clone().reader(sock, gen));
    }

    /// Queue a request; `buf` is read into (READ) or sent (WRITE).
    pub(crate) fn submit(&self, req: Request, buf: Option<IoBuf>, kind: SlotKind) -> IoFuture {
        self.submit_with(req, buf, kind, None)
    }

    /// Queue a block status request; its first extent is left in `out`.
    pub(crate) fn submit_status(&self, req: Request, out: StatusOut) -> IoFuture {
        self.submit_with(req, None, SlotKind::Other, Some(out))
    }

    fn submit_with(&self, mut req: Request, buf: Option<IoBuf>, kind: SlotKind, status: Option<StatusOut>) -> IoFuture {
        let mut st = self.st.borrow_mut();
        if self.closing.get() || st.failed {
            return match buf {
                Some(b) => IoFuture::done(b, Err(IoStatus::EIO)),
                None => IoFuture::err(IoStatus::EIO),
            };
        }
        let payload = req.typ == cmd::WRITE;
        let id = slot_alloc(buf);
        req.cookie = u64::from(id.raw());
        let i = id.raw() as usize;
        if st.pending.len() <= i {
            st.pending.resize_with(i + 1, || None);
        }
        st.pending[i] = Some(Pending { req, payload, got: 0, err: None, status, held: false, zombie: false });
        st.sendq.push_back(id.raw());
        if let Some(w) = st.writer.take() {
            w.wake();
        }
        IoFuture::Slot(SlotFuture::new(id), kind)
    }

    /// Stop: tell the server (`NBD_CMD_DISC`) and end the tasks. Requests still in flight fail.
    pub(crate) fn close(&self) {
        self.closing.set(true);
        let sock = {
            let mut st = self.st.borrow_mut();
            if let Some(w) = st.writer.take() {
                w.wake();
            }
            st.sock.take()
        };
        if let Some(sock) = sock {
            let mut h = [0u8; 32];
            let n =
                Request { flags: 0, typ: cmd::DISC, cookie: 0, offset: 0, len: 0 }.encode_into(self.dial.neg.extended, &mut h);
            // A disconnect request that does not fit is simply not sent.
            sock.send_now(&h[..n]);
            shutdown(&sock);
        }
        self.fail_all();
    }

    /// Fail every request with EIO (those whose buffer a task has out, when it is back).
    fn fail_all(&self) {
        // Dropped while its reactor is torn down: the slots go with the reactor.
        if basalt_reactor::current_id().is_none() {
            return;
        }
        let ids: Vec<usize> = {
            let mut st = self.st.borrow_mut();
            st.sendq.clear();
            let mut ids = Vec::new();
            for (i, slot) in st.pending.iter_mut().enumerate() {
                match slot {
                    Some(p) if p.held => p.zombie = true,
                    Some(_) => {
                        *slot = None;
                        ids.push(i);
                    }
                    None => {}
                }
            }
            ids
        };
        for i in ids {
            slot_complete(SlotId::from_raw(i as u32), -i64::from(libc::EIO));
        }
    }

    /// Take request `id`'s buffer out of its slot.
    fn hold(&self, id: u32) -> Option<IoBuf> {
        let buf = slot_take_buf(SlotId::from_raw(id))?;
        if let Some(Some(p)) = self.st.borrow_mut().pending.get_mut(id as usize) {
            p.held = true;
        }
        Some(buf)
    }

    /// Park request `id`'s buffer again; a request failed meanwhile completes now.
    fn release(&self, id: u32, buf: IoBuf) {
        slot_put_buf(SlotId::from_raw(id), buf);
        let zombie = match self.st.borrow_mut().pending.get_mut(id as usize) {
            Some(Some(p)) => {
                p.held = false;
                p.zombie
            }
            _ => false,
        };
        if zombie {
            self.finish(u64::from(id), Some(libc::EIO));
        }
    }

    /// The connection of generation `gen` is gone.
    fn lost(self: &Rc<Self>, gen: u64) {
        let sock = {
            let mut st = self.st.borrow_mut();
            if st.gen != gen || st.sock.is_none() {
                return;
            }
            st.lost_at = Some(Instant::now());
            st.sock.take()
        };
        if let Some(s) = sock {
            shutdown(&s);
        }
        if self.closing.get() {
            return;
        }
        if self.dial.target.reconnect_delay.is_zero() {
            self.st.borrow_mut().failed = true;
            self.fail_all();
        }
        basalt_reactor::spawn_local(self.clone().reconnect());
    }

    async fn reconnect(self: Rc<Self>) {
        loop {
            if self.closing.get() {
                return;
            }
            let dial = self.dial.clone();
            let got: Arc<std::sync::Mutex<Option<Link>>> = Arc::default();
            let out = got.clone();
            let (res, _) = basalt_reactor::blocking(
                move || match dial.dial(HANDSHAKE_TIMEOUT) {
                    Ok(link) => {
                        *out.lock().unwrap_or_else(|p| p.into_inner()) = Some(link);
                        0
                    }
                    Err(_) => -i64::from(libc::ECONNREFUSED),
                },
                None,
            )
            .await;
            let link = got.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let (0, Some(link)) = (res, link) {
                if self.closing.get() {
                    return;
                }
                self.install(link);
                return;
            }
            let lost_at = self.st.borrow().lost_at.unwrap_or_else(Instant::now);
            let deadline = lost_at + self.dial.target.reconnect_delay;
            if Instant::now() >= deadline && !self.st.borrow().failed {
                self.st.borrow_mut().failed = true;
                self.fail_all();
            }
            let wait = deadline.saturating_duration_since(Instant::now());
            basalt_reactor::sleep(if wait.is_zero() { Duration::from_secs(1) } else { wait.min(Duration::from_secs(1)) }).await;
        }
    }

    /// Send queued requests until closed.
    async fn writer(self: Rc<Self>) {
        let ext = self.dial.neg.extended;
        let mut staging = IoBuf::new_uninit(BATCH);
        loop {
            let ready = std::future::poll_fn(|cx| {
                let mut st = self.st.borrow_mut();
                if self.closing.get() {
                    return Poll::Ready(None);
                }
                match &st.sock {
                    Some(s) if !st.sendq.is_empty() => Poll::Ready(Some((s.clone(), st.gen))),
                    _ => {
                        st.writer = Some(cx.waker().clone());
                        Poll::Pending
                    }
                }
            })
            .await;
            let Some((sock, gen)) = ready else { return };
            let mut used = 0;
            let mut failed = false;
            loop {
                let next = {
                    let mut st = self.st.borrow_mut();
                    if st.gen != gen {
                        break;
                    }
                    let Some(id) = st.sendq.pop_front() else { break };
                    st.pending.get(id as usize).and_then(|p| p.as_ref()).map(|p| (id, p.req, p.payload))
                };
                let Some((id, req, payload)) = next else { continue };
                let mut h = [0u8; 32];
                let n = req.encode_into(ext, &mut h);
                staging.reset(BATCH);
                staging.as_mut_slice()[used..used + n].copy_from_slice(&h[..n]);
                used += n;
                if payload || used + 32 > BATCH {
                    staging.reset(used);
                    used = 0;
                    match sock.write_all(staging).await {
                        Ok(b) => staging = b,
                        Err(_) => {
                            failed = true;
                            staging = IoBuf::new_uninit(BATCH);
                            break;
                        }
                    }
                }
                if payload {
                    let Some(buf) = self.hold(id) else { continue };
                    let (r, b) = sock.send(buf).await;
                    self.release(id, b);
                    if r.is_err() {
                        failed = true;
                        break;
                    }
                }
            }
            if !failed && used > 0 {
                staging.reset(used);
                match sock.write_all(staging).await {
                    Ok(b) => staging = b,
                    Err(_) => {
                        failed = true;
                        staging = IoBuf::new_uninit(BATCH);
                    }
                }
            }
            if failed {
                self.lost(gen);
            }
        }
    }

    /// Read replies on connection `gen` until it ends.
    async fn reader(self: Rc<Self>, sock: Rc<Sock>, gen: u64) {
        // Replies are read in bursts: one read takes every header and small chunk that has
        // arrived; read data goes straight into the requests' buffers.
        let mut rx = RecvBuf::new(MAX_CHUNK + ChunkHeader::EXT_SIZE);
        loop {
            // Why it ended does not matter to the requests: they are sent again or fail.
            if self.read_reply(&sock, &mut rx).await.is_err() {
                self.lost(gen);
                return;
            }
        }
    }

    fn pending_req(&self, cookie: u64) -> Result<Request, String> {
        let st = self.st.borrow();
        match st.pending.get(cookie as usize).and_then(|p| p.as_ref()) {
            Some(p) if cookie <= u64::from(u32::MAX) => Ok(p.req),
            _ => Err(format!("reply for unknown cookie {cookie}")),
        }
    }

    /// Have `n` bytes of the reply stream buffered.
    async fn need(sock: &Sock, rx: &mut RecvBuf, n: usize) -> Result<(), String> {
        match rx.fill(sock, n).await {
            Ok(true) => Ok(()),
            Ok(false) => Err("server closed the connection".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Read `len` bytes into the window `at..` of request `id`'s buffer.
    async fn read_payload(&self, sock: &Sock, rx: &mut RecvBuf, id: u32, at: usize, len: usize) -> Result<(), String> {
        let Some(mut buf) = self.hold(id) else { return Err("request lost its buffer".into()) };
        let (start, whole) = (buf.window_start(), buf.len());
        if at + len > whole {
            self.release(id, buf);
            return Err("reply data past the request's buffer".into());
        }
        buf.set_window(start + at, len);
        let (r, mut b) = rx.read_into(sock, buf).await;
        b.set_window(start, whole);
        self.release(id, b);
        r.map_err(|e| e.to_string())
    }

    /// Read one reply (a simple reply or one chunk) and act on it.
    async fn read_reply(&self, sock: &Sock, rx: &mut RecvBuf) -> Result<(), String> {
        let ext = self.dial.neg.extended;
        Self::need(sock, rx, if ext { ChunkHeader::EXT_SIZE } else { ReplyStart::SIZE }).await?;
        let start = ReplyStart::parse(rx.peek(ReplyStart::SIZE).try_into().expect("16 bytes")).map_err(|e| e.0)?;
        let size = match start {
            ReplyStart::Simple { error, cookie } => {
                if ext {
                    return Err("simple reply on a connection with extended headers".into());
                }
                rx.consume(ReplyStart::SIZE);
                return self.simple_reply(sock, rx, error, cookie).await;
            }
            ReplyStart::Extended if !ext => return Err("extended reply without extended headers".into()),
            ReplyStart::Structured if ext || !self.dial.neg.structured => return Err("unexpected structured reply".into()),
            ReplyStart::Extended => ChunkHeader::EXT_SIZE,
            ReplyStart::Structured => ChunkHeader::SIZE,
        };
        Self::need(sock, rx, size).await?;
        let h = ChunkHeader::parse(rx.peek(size)).map_err(|e| e.0)?;
        rx.consume(size);
        self.chunk(sock, rx, h).await
    }

    async fn simple_reply(&self, sock: &Sock, rx: &mut RecvBuf, error: u32, cookie: u64) -> Result<(), String> {
        let req = self.pending_req(cookie)?;
        if error == 0 && req.typ == cmd::READ {
            if self.dial.neg.structured {
                return Err("simple reply to a read on a connection with structured replies".into());
            }
            self.read_payload(sock, rx, cookie as u32, 0, req.len as usize).await?;
        }
        self.finish(cookie, if error == 0 { None } else { Some(proto::wire_to_errno(error)) });
        Ok(())
    }

    async fn chunk(&self, sock: &Sock, rx: &mut RecvBuf, h: ChunkHeader) -> Result<(), String> {
        let req = self.pending_req(h.cookie)?;
        let id = h.cookie as u32;
        let end = req.offset + req.len;
        match h.typ {
            chunk::OFFSET_DATA => {
                if req.typ != cmd::READ || h.len < 8 || h.len - 8 > req.len {
                    return Err(format!("data chunk of {} bytes for a {} byte request of type {}", h.len, req.len, req.typ));
                }
                Self::need(sock, rx, 8).await?;
                let (off, _) = proto::parse_offset_chunk(chunk::OFFSET_DATA, rx.peek(8)).map_err(|e| e.0)?;
                rx.consume(8);
                let n = h.len - 8;
                if off < req.offset || off.checked_add(n).is_none_or(|e| e > end) {
                    return Err(format!("data chunk at {off}+{n} outside the request at {}+{}", req.offset, req.len));
                }
                self.read_payload(sock, rx, id, (off - req.offset) as usize, n as usize).await?;
                self.cover(h.cookie, n);
            }
            typ => {
                if h.len > MAX_CHUNK as u64 {
                    return Err(format!("chunk of type {typ} with a {} byte payload", h.len));
                }
                let len = h.len as usize;
                Self::need(sock, rx, len).await?;
                let r = self.small_chunk(&req, id, h, rx.peek(len));
                rx.consume(len);
                r?;
            }
        }
        if h.flags & chunk::FLAG_DONE != 0 {
            self.done(h.cookie);
        }
        Ok(())
    }

    /// A chunk other than data, its payload `p` whole.
    fn small_chunk(&self, req: &Request, id: u32, h: ChunkHeader, p: &[u8]) -> Result<(), String> {
        let end = req.offset + req.len;
        match h.typ {
            chunk::NONE if h.len == 0 => {}
            chunk::OFFSET_HOLE if req.typ == cmd::READ => {
                let (off, n) = proto::parse_offset_chunk(h.typ, p).map_err(|e| e.0)?;
                let n = u64::from(n);
                if off < req.offset || off.checked_add(n).is_none_or(|e| e > end) || n == 0 {
                    return Err(format!("hole chunk at {off}+{n} outside the request at {}+{}", req.offset, req.len));
                }
                let Some(mut buf) = self.hold(id) else { return Err("request lost its buffer".into()) };
                let at = (off - req.offset) as usize;
                if at + n as usize <= buf.len() {
                    buf.as_mut_slice()[at..at + n as usize].fill(0);
                }
                self.release(id, buf);
                self.cover(h.cookie, n);
            }
            chunk::BLOCK_STATUS | chunk::BLOCK_STATUS_EXT if req.typ == cmd::BLOCK_STATUS => {
                if (h.typ == chunk::BLOCK_STATUS_EXT) != self.dial.neg.extended {
                    return Err(format!("block status chunk of type {} does not match the header style", h.typ));
                }
                let (ctx, len, flags) = proto::parse_block_status(h.typ, p).map_err(|e| e.0)?;
                if Some(ctx) != self.dial.neg.context_id {
                    return Err(format!("block status for context {ctx}, which was not negotiated"));
                }
                let st = self.st.borrow();
                if let Some(Some(pd)) = st.pending.get(h.cookie as usize) {
                    if let Some(out) = &pd.status {
                        out.set(Some((len, flags)));
                    }
                }
            }
            chunk::ERROR | chunk::ERROR_OFFSET => {
                let (e, _msg) = proto::parse_error_chunk(h.typ, p).map_err(|e| e.0)?;
                self.set_err(h.cookie, proto::wire_to_errno(e));
            }
            t if t & (1 << 15) != 0 => self.set_err(h.cookie, libc::EINVAL),
            t => return Err(format!("unexpected chunk type {t} for a request of type {}", req.typ)),
        }
        Ok(())
    }

    fn cover(&self, cookie: u64, n: u64) {
        if let Some(Some(p)) = self.st.borrow_mut().pending.get_mut(cookie as usize) {
            p.got += n;
        }
    }

    fn set_err(&self, cookie: u64, e: i32) {
        if let Some(Some(p)) = self.st.borrow_mut().pending.get_mut(cookie as usize) {
            p.err.get_or_insert(e);
        }
    }

    /// The last chunk of a structured reply arrived.
    fn done(&self, cookie: u64) {
        let err = {
            let st = self.st.borrow();
            let Some(Some(p)) = st.pending.get(cookie as usize) else { return };
            match p.err {
                Some(e) => Some(e),
                None if p.req.typ == cmd::READ && p.got != p.req.len => Some(libc::EIO),
                None if p.status.as_ref().is_some_and(|s| s.get().is_none()) => Some(libc::EIO),
                None => None,
            }
        };
        self.finish(cookie, err);
    }

    fn finish(&self, cookie: u64, err: Option<i32>) {
        let p = self.st.borrow_mut().pending.get_mut(cookie as usize).and_then(Option::take);
        let Some(p) = p else { return };
        let res = match err {
            Some(e) => -i64::from(e),
            None if matches!(p.req.typ, cmd::READ | cmd::WRITE) => p.req.len as i64,
            None => 0,
        };
        slot_complete(SlotId::from_raw(cookie as u32), res);
    }
}
