//! [`Queue`]: how anything above a node (a parent node, a backend, a tool) issues requests to
//! it on the current reactor. It pads and splits requests so the node only sees what its
//! [`Limits`] declare.
//!
//! An aligned request within the node's max transfer goes straight through: the node's own
//! `IoFuture` is returned unchanged, no allocation. Unaligned requests are padded with a
//! read-modify-write through a bounce buffer, oversized ones are split into sequential chunks
//! over windows of the caller's buffer; a buffer whose memory is not aligned goes through an
//! aligned bounce buffer. Read-modify-write cycles must not interleave with other
//! writes to the same blocks: once a queue has seen an unaligned write, all its writes pass a
//! gate that gives an RMW cycle exclusive use (QEMU's serialising requests, coarsened).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use basalt_reactor::IoBuf;

use crate::error::{BlockResult, IoStatus};
use crate::io::{IoDone, IoFuture};
use crate::node::{BlockStatus, Limits, LocalBoxFuture, Node, NodeQueue, WriteFlags, ZeroFlags};

/// Largest zero buffer written when a node cannot write zeroes efficiently.
const ZERO_CHUNK: u64 = 1 << 20;

#[derive(Default)]
struct Gate {
    writers: Cell<usize>,
    exclusive: Cell<bool>,
    waiters: RefCell<VecDeque<Waker>>,
}

impl Gate {
    async fn enter(&self, exclusive: bool) {
        std::future::poll_fn(|cx| {
            let free = if exclusive { !self.exclusive.get() && self.writers.get() == 0 } else { !self.exclusive.get() };
            if free {
                if exclusive {
                    self.exclusive.set(true);
                } else {
                    self.writers.set(self.writers.get() + 1);
                }
                Poll::Ready(())
            } else {
                self.waiters.borrow_mut().push_back(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    fn leave(&self, exclusive: bool) {
        if exclusive {
            self.exclusive.set(false);
        } else {
            self.writers.set(self.writers.get() - 1);
        }
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }
}

struct Shared {
    q: Rc<dyn NodeQueue>,
    node: Arc<dyn Node>,
    align: u64,
    max: u64,
    rmw_seen: Cell<bool>,
    gate: Gate,
}

/// A node's data plane on the current reactor, with padding and splitting. Cheap to clone.
#[derive(Clone)]
pub struct Queue {
    s: Rc<Shared>,
}

impl Queue {
    /// Create `node`'s queue on the current reactor.
    pub fn new(node: Arc<dyn Node>) -> BlockResult<Queue> {
        let q = node.create_queue()?;
        let Limits { request_alignment, max_transfer, .. } = node.limits();
        let align = u64::from(request_alignment.max(1));
        let max = if max_transfer == 0 { 1 << 30 } else { u64::from(max_transfer) };
        Ok(Queue { s: Rc::new(Shared { q, node, align, max, rmw_seen: Cell::new(false), gate: Gate::default() }) })
    }

    /// The node this queue serves.
    pub fn node(&self) -> &Arc<dyn Node> {
        &self.s.node
    }

    /// The node's raw queue, for callers that honour its limits themselves.
    pub fn raw(&self) -> &Rc<dyn NodeQueue> {
        &self.s.q
    }

    fn aligned(&self, off: u64, len: u64) -> bool {
        (off | len) & (self.s.align - 1) == 0
    }

    /// Whether the buffer's memory is aligned as the node needs (O_DIRECT and DMA need the
    /// memory aligned too, not only the offsets).
    fn mem_aligned(&self, buf: &IoBuf) -> bool {
        (buf.as_ptr() as u64) & (self.s.align - 1) == 0
    }

    /// Read into `buf`'s window from `off`.
    pub fn read(&self, off: u64, buf: IoBuf) -> IoFuture {
        let len = buf.len() as u64;
        if self.aligned(off, len) && len <= self.s.max && self.mem_aligned(&buf) {
            return self.s.q.read(off, buf);
        }
        let this = self.clone();
        IoFuture::boxed(async move { this.read_slow(off, buf).await })
    }

    /// Write `buf`'s window at `off`.
    pub fn write(&self, off: u64, buf: IoBuf, flags: WriteFlags) -> IoFuture {
        let len = buf.len() as u64;
        if self.aligned(off, len) && len <= self.s.max && !self.s.rmw_seen.get() && self.mem_aligned(&buf) {
            return self.s.q.write(off, buf, flags);
        }
        let this = self.clone();
        IoFuture::boxed(async move { this.write_slow(off, buf, flags).await })
    }

    /// Make `len` bytes at `off` read as zeroes, falling back to writing zero buffers unless
    /// `flags.no_fallback`.
    pub fn write_zeroes(&self, off: u64, len: u64, flags: ZeroFlags) -> IoFuture {
        let this = self.clone();
        IoFuture::boxed(async move { this.write_zeroes_slow(off, len, flags).await })
    }

    /// Discard the aligned part of `off..off+len` (advisory; ENOTSUP is not an error).
    pub fn discard(&self, off: u64, len: u64) -> IoFuture {
        let a = self.s.align;
        let start = off.next_multiple_of(a);
        let end = (off + len) / a * a;
        if end <= start {
            return IoFuture::ok(0);
        }
        let this = self.clone();
        IoFuture::boxed(async move {
            let r = this.s.q.discard(start, end - start).await;
            match r.res {
                Err(e) if e == IoStatus::ENOTSUP => IoDone::ok(len),
                Err(e) => IoDone::err(e),
                Ok(_) => IoDone::ok(len),
            }
        })
    }

    /// Write whole clusters compressed (no padding or splitting: the format checks).
    pub fn write_compressed(&self, off: u64, buf: IoBuf) -> IoFuture {
        self.s.q.write_compressed(off, buf)
    }

    /// Flush.
    pub fn flush(&self) -> IoFuture {
        self.s.q.flush()
    }

    /// Prefetch `off..off+len` (advisory: see [`crate::NodeQueue::prefetch`]).
    pub fn prefetch(&self, off: u64, len: u64) -> IoFuture {
        self.s.q.prefetch(off, len)
    }

    /// Block status of `off..off+len`.
    pub fn block_status(&self, off: u64, len: u64) -> LocalBoxFuture<'_, Result<BlockStatus, IoStatus>> {
        self.s.q.block_status(off, len)
    }

    async fn read_slow(&self, off: u64, mut buf: IoBuf) -> IoDone {
        let len = buf.len() as u64;
        if self.aligned(off, len) && self.mem_aligned(&buf) {
            return self.chunked(off, buf, None).await;
        }
        let a = self.s.align;
        let start = off / a * a;
        let end = (off + len).next_multiple_of(a);
        let bounce = IoBuf::new_uninit((end - start) as usize);
        let d = self.chunked(start, bounce, None).await;
        let bounce = d.buf.expect("read returns its buffer");
        if let Err(e) = d.res {
            return IoDone { buf: Some(buf), res: Err(e) };
        }
        let at = (off - start) as usize;
        buf.as_mut_slice().copy_from_slice(&bounce[at..at + len as usize]);
        IoDone { buf: Some(buf), res: Ok(len) }
    }

    /// Issue an aligned request as sequential chunks of at most `max` bytes over windows of
    /// `buf`. `write` is `None` for reads.
    async fn chunked(&self, off: u64, mut buf: IoBuf, write: Option<WriteFlags>) -> IoDone {
        let (orig_start, orig_len) = (buf.window_start(), buf.len());
        let mut done = 0usize;
        while done < orig_len {
            let n = (orig_len - done).min(self.s.max as usize);
            buf.set_window(orig_start + done, n);
            let at = off + done as u64;
            let d = match write {
                None => self.s.q.read(at, buf).await,
                Some(f) => self.s.q.write(at, buf, f).await,
            };
            buf = d.buf.expect("request returns its buffer");
            if let Err(e) = d.res {
                buf.set_window(orig_start, orig_len);
                return IoDone { buf: Some(buf), res: Err(e) };
            }
            done += n;
        }
        buf.set_window(orig_start, orig_len);
        IoDone { buf: Some(buf), res: Ok(orig_len as u64) }
    }

    async fn write_slow(&self, off: u64, buf: IoBuf, flags: WriteFlags) -> IoDone {
        let len = buf.len() as u64;
        if self.aligned(off, len) && !self.mem_aligned(&buf) {
            // Aligned request from misaligned memory: write from an aligned copy.
            let bounce = IoBuf::from_slice(&buf);
            let d = Box::pin(self.write_slow(off, bounce, flags)).await;
            return IoDone { buf: Some(buf), res: d.res };
        }
        if self.aligned(off, len) {
            let gated = self.s.rmw_seen.get();
            if gated {
                self.s.gate.enter(false).await;
            }
            let d = self.chunked(off, buf, Some(flags)).await;
            if gated {
                self.s.gate.leave(false);
            }
            return d;
        }
        self.s.rmw_seen.set(true);
        self.s.gate.enter(true).await;
        let r = self.rmw(off, Some(&buf), len, flags).await;
        self.s.gate.leave(true);
        IoDone { buf: Some(buf), res: r.map(|_| len) }
    }

    /// Read-modify-write of the aligned blocks around `off..off+len`, putting `data` there (or
    /// zeroes when `None`). The caller holds the gate exclusively.
    async fn rmw(&self, off: u64, data: Option<&IoBuf>, len: u64, flags: WriteFlags) -> Result<(), IoStatus> {
        let a = self.s.align;
        let start = off / a * a;
        let end = (off + len).next_multiple_of(a);
        let mut bounce = IoBuf::new_uninit((end - start) as usize);
        // Read the partial head and tail blocks (one read when they are the same block).
        let head_partial = off != start;
        let tail_partial = off + len != end;
        let mut blocks: [Option<u64>; 2] = [None, None];
        if head_partial {
            blocks[0] = Some(start);
        }
        if tail_partial && (end - a != start || !head_partial) {
            blocks[1] = Some(end - a);
        }
        for b in blocks.into_iter().flatten() {
            let at = (b - start) as usize;
            bounce.set_window(at, a as usize);
            let d = self.chunked(b, bounce, None).await;
            bounce = d.buf.expect("read returns its buffer");
            d.res?;
        }
        bounce.reset((end - start) as usize);
        let at = (off - start) as usize;
        match data {
            Some(d) => bounce[at..at + len as usize].copy_from_slice(d),
            None => bounce[at..at + len as usize].fill(0),
        }
        self.chunked(start, bounce, Some(flags)).await.res.map(|_| ())
    }

    async fn write_zeroes_slow(&self, off: u64, len: u64, flags: ZeroFlags) -> IoDone {
        let a = self.s.align;
        let wf = WriteFlags { fua: flags.fua };
        let mid_start = off.next_multiple_of(a).min(off + len);
        let mid_end = ((off + len) / a * a).max(mid_start);
        let needs_rmw = mid_start != off || mid_end != off + len;
        if needs_rmw {
            if flags.no_fallback {
                return IoDone::err(IoStatus::ENOTSUP);
            }
            self.s.rmw_seen.set(true);
        }
        if self.s.rmw_seen.get() {
            self.s.gate.enter(needs_rmw).await;
        }
        let r = self.zero_parts(off, len, mid_start, mid_end, flags, wf).await;
        if self.s.rmw_seen.get() {
            self.s.gate.leave(needs_rmw);
        }
        match r {
            Ok(()) => IoDone::ok(len),
            Err(e) => IoDone::err(e),
        }
    }

    async fn zero_parts(
        &self,
        off: u64,
        len: u64,
        mid_start: u64,
        mid_end: u64,
        flags: ZeroFlags,
        wf: WriteFlags,
    ) -> Result<(), IoStatus> {
        if mid_start > off {
            self.rmw(off, None, mid_start - off, wf).await?;
        }
        if mid_end > mid_start {
            let r = self.s.q.write_zeroes(mid_start, mid_end - mid_start, flags).await.res;
            match r {
                Ok(_) => {}
                Err(e) if e == IoStatus::ENOTSUP && !flags.no_fallback => {
                    let mut at = mid_start;
                    let chunk = ZERO_CHUNK.min(self.s.max) / a_or(self.s.align) * a_or(self.s.align);
                    let mut zbuf = IoBuf::new(chunk.min(mid_end - mid_start) as usize);
                    while at < mid_end {
                        let n = chunk.min(mid_end - at);
                        zbuf.reset(n as usize);
                        let d = self.s.q.write(at, zbuf, wf).await;
                        zbuf = d.buf.expect("write returns its buffer");
                        d.res?;
                        at += n;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        if off + len > mid_end && mid_end >= mid_start {
            let tail = mid_end.max(off);
            self.rmw(tail, None, off + len - tail, wf).await?;
        }
        Ok(())
    }
}

fn a_or(a: u64) -> u64 {
    a.max(1)
}
