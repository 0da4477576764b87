//! One reactor's I/O queue pair on an NVMe namespace: the data plane.
//!
//! Each reactor that uses the namespace gets its own submission/completion queue pair, created
//! through the admin queue when the reactor creates its queue and deleted when the last user
//! drops it. The pair is polled by a reactor poller: it rings the submission doorbell once for
//! everything submitted since the last turn (doorbell batching), reaps completions, rings the
//! completion doorbell once, and keeps the reactor spinning while commands are outstanding.
//!
//! Fast path (no allocation): a read or write whose buffer lies in memory mapped for DMA (the
//! reactor's buffer pool, mapped once per controller) takes a free command identifier, gets its
//! data pointer (a PRP list page per identifier, preallocated) and completes through a reactor slot that
//! holds the buffer until the device is done. Where a transfer would need a PRP list, the
//! controller takes SGLs and the buffer is one run of bus addresses (always behind an IOMMU,
//! within a hugepage without one), the data pointer is a single SGL descriptor instead. Anything else (a buffer from the heap or another
//! reactor's pool, a full queue, write zeroes and discard that may need several commands) takes
//! the slow path: a boxed future that waits for an identifier and bounces data through the
//! queue's own mapped buffer pool.
//!
//! A command outstanding longer than the timeout, or a controller reporting fatal status, stops
//! the controller (no more DMA) and fails every outstanding and later request with EIO.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use basalt_engine::{BlockResult, IoDone, IoFuture, IoStatus, SlotKind, WriteFlags, ZeroFlags};
use basalt_reactor::{slot_alloc, slot_complete, DmaPool, IoBuf, SlotFuture, SlotId};

use super::cmd::{build_prps, io, pages_spanned, Sqe, PAGE};
use super::ctrl::Controller;
use super::ring::Ring;
use super::vfio::{DmaAlloc, DmaRegion};
use super::NsInfo;

/// Entries per I/O queue: one page of submission entries, so the ring is physically contiguous
/// without an IOMMU too.
const QUEUE_ENTRIES: u16 = 64;
/// A command outstanding longer than this fails the controller.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Polls between timeout checks while commands are outstanding.
const CHECK_EVERY: u32 = 4096;
/// The bounce pool of each queue.
const BOUNCE_POOL: usize = 4 << 20;
/// Most blocks one Write Zeroes command covers (NLB is 16 bits).
const MAX_ZERO_BLOCKS: u64 = 1 << 16;
/// Ranges in one Dataset Management command (one page of 16-byte ranges).
const MAX_DSM_RANGES: u64 = 256;

#[derive(Clone, Copy)]
struct Cmd {
    slot: Option<SlotId>,
    /// The result on success (bytes transferred).
    ok: i64,
}

pub(crate) struct QueueInner {
    ctrl: Arc<Controller>,
    ns: NsInfo,
    qid: u16,
    ring: RefCell<Ring>,
    /// Queue memory: SQ page, CQ page, then one PRP list page per command identifier.
    mem: Arc<DmaAlloc>,
    mem_region: DmaRegion,
    /// Where buffers may come from without a bounce.
    regions: Vec<DmaRegion>,
    bounce: DmaPool,
    cmds: RefCell<Vec<Cmd>>,
    free: RefCell<Vec<u16>>,
    outstanding: Cell<usize>,
    waiters: RefCell<VecDeque<Waker>>,
    polls: Cell<u32>,
    /// The controller takes SGLs for I/O commands.
    sgl: bool,
    last_progress: Cell<Instant>,
    dead: Cell<bool>,
}

/// The `NodeQueue` handed to the engine. The poller holds the queue pair weakly: the pair lives
/// while the engine's queue or a slow-path request uses it, and its poller goes with it.
pub(crate) struct NvmeQueue {
    inner: Rc<QueueInner>,
}

impl NvmeQueue {
    /// Create this reactor's queue pair.
    pub(crate) fn new(ctrl: Arc<Controller>, ns: NsInfo) -> BlockResult<NvmeQueue> {
        let size = QUEUE_ENTRIES.min(ctrl.mqes.min(u32::from(u16::MAX)) as u16);
        let page = PAGE as usize;
        // Without an IOMMU only hugepages may be given to the device (see `vfio`): a reactor
        // pool on ordinary pages is not mapped (its buffers are bounced).
        let noiommu = ctrl.dev.noiommu();
        let mem = Arc::new(DmaAlloc::new((2 + usize::from(size)) * page, noiommu)?);
        let mem_region = ctrl.map(Box::new(mem.clone()))?;
        let mut regions = vec![mem_region.clone()];
        if let Some(pool) = basalt_reactor::current_pool().filter(|p| p.hugepages() || !noiommu) {
            regions.push(ctrl.map(Box::new(pool))?);
        }
        let bounce = DmaPool::new(BOUNCE_POOL, true).map_err(|e| basalt_engine::BlockError::io("NVMe bounce buffers", &e))?;
        if noiommu && !bounce.hugepages() {
            return Err(basalt_engine::BlockError::new(basalt_engine::ErrorKind::Io, super::vfio::NOIOMMU_HUGEPAGES));
        }
        regions.push(ctrl.map(Box::new(bounce.clone()))?);
        let sgl = ctrl.id.sgls & 3 != 0 && ns.sgl;
        let qid = ctrl.take_qid()?;
        let base = mem.ptr() as usize;
        if let Err(e) = ctrl.create_io_queues(qid, size, mem_region.bus(base), mem_region.bus(base + page)) {
            ctrl.put_qid(qid);
            return Err(e);
        }
        // SAFETY: the first two pages of `mem`, zeroed, used by this ring alone while `mem` lives.
        let ring = unsafe { Ring::new(mem.ptr(), mem.ptr().add(page), size, qid, ctrl.dstrd) };
        let inner = Rc::new(QueueInner {
            ctrl,
            ns,
            qid,
            ring: RefCell::new(ring),
            mem,
            mem_region,
            regions,
            bounce,
            cmds: RefCell::new(vec![Cmd { slot: None, ok: 0 }; usize::from(size)]),
            // One entry stays empty (a full ring looks empty), so size - 1 commands at most.
            free: RefCell::new((0..size - 1).rev().collect()),
            outstanding: Cell::new(0),
            waiters: RefCell::new(VecDeque::new()),
            polls: Cell::new(0),
            sgl,
            last_progress: Cell::new(Instant::now()),
            dead: Cell::new(false),
        });
        let weak = Rc::downgrade(&inner);
        let id = Rc::new(Cell::new(usize::MAX));
        let my_id = id.clone();
        id.set(basalt_reactor::add_poller(move || match weak.upgrade() {
            Some(q) => q.poll(),
            None => {
                basalt_reactor::remove_poller(my_id.get());
                0
            }
        }));
        Ok(NvmeQueue { inner })
    }
}

impl Drop for QueueInner {
    fn drop(&mut self) {
        // Deleting the submission queue makes the controller abort what it still holds; after
        // that it no longer touches the buffers, which are handed back with ECANCELED.
        let deleted = !self.ctrl.failed() && self.ctrl.delete_io_queues(self.qid).is_ok();
        // Slots belong to the reactor; when it is being torn down itself, they go with it.
        let on_reactor = basalt_reactor::current_id().is_some();
        for c in self.cmds.get_mut().iter_mut() {
            if let Some(s) = c.slot.take().filter(|_| on_reactor) {
                slot_complete(s, -i64::from(libc::ECANCELED));
            }
        }
        if deleted {
            self.ctrl.put_qid(self.qid);
            // The controller no longer reaches the rings, PRP lists and bounce buffers.
            self.ctrl.dev.unmap(self.mem.ptr() as usize);
            self.ctrl.dev.unmap(self.bounce.region().0 as usize);
        }
    }
}

impl QueueInner {
    fn block_shift(&self) -> u32 {
        self.ns.block_size.trailing_zeros()
    }

    /// The DMA region holding `addr..addr+len`, if any.
    fn region_of(&self, addr: usize, len: usize) -> Option<&DmaRegion> {
        self.regions.iter().find(|r| r.contains(addr, len))
    }

    fn take_cid(&self) -> Option<u16> {
        if self.dead.get() {
            return None;
        }
        self.free.borrow_mut().pop()
    }

    /// The data pointer of a read or write of `addr..addr+len` in `region`: one SGL descriptor
    /// where PRPs would need a list, the controller takes SGLs and the range is one run of bus
    /// addresses (no list to build or fetch), else PRPs (`sgl` false).
    fn data_ptr(&self, cid: u16, region: &DmaRegion, addr: usize, len: usize) -> (u64, u64, bool) {
        let pages = pages_spanned((addr as u64) % PAGE, len as u64);
        if self.sgl && pages > 2 && region.bus_contiguous(addr, len) {
            return (region.bus(addr), len as u64, true);
        }
        let (a, b) = self.prps(cid, region, addr, len);
        (a, b, false)
    }

    /// PRP1/PRP2 for `addr..addr+len` in `region`, using command `cid`'s list page.
    fn prps(&self, cid: u16, region: &DmaRegion, addr: usize, len: usize) -> (u64, u64) {
        let page = PAGE as usize;
        let first = addr / page * page;
        let n = pages_spanned((addr - first) as u64, len as u64) as usize;
        let mut pages = [0u64; 2];
        if n <= 2 {
            pages[0] = region.bus(addr);
            if n == 2 {
                pages[1] = region.bus(first + page);
            }
            let mut none = [0u64; 0];
            return build_prps(&pages[..n], &mut none, 0);
        }
        let list_addr = self.mem.ptr() as usize + (2 + usize::from(cid)) * page;
        // SAFETY: command `cid`'s own list page, not in use by the device (the command is not
        // submitted yet); n - 1 <= 512 entries because transfers are at most MAX_TRANSFER.
        let list = unsafe { std::slice::from_raw_parts_mut(list_addr as *mut u64, page / 8) };
        for (i, e) in list.iter_mut().enumerate().take(n - 1) {
            *e = region.bus(first + (i + 1) * page);
        }
        (region.bus(addr), self.mem_region.bus(list_addr))
    }

    /// Queue `sqe` (its CID already set) for the next doorbell; the slot completes with `ok`.
    fn issue(&self, cid: u16, sqe: Sqe, slot: SlotId, ok: i64) {
        self.cmds.borrow_mut()[usize::from(cid)] = Cmd { slot: Some(slot), ok };
        if self.outstanding.replace(self.outstanding.get() + 1) == 0 {
            self.last_progress.set(Instant::now());
        }
        self.ring.borrow_mut().push(sqe);
    }

    /// Submit a read or write of `buf` at `off` if it can go now without a bounce.
    fn try_rw(&self, opcode: u8, off: u64, buf: IoBuf, fua: bool) -> Result<IoFuture, IoBuf> {
        let (addr, len) = (buf.as_ptr() as usize, buf.len());
        let Some(region) = self.region_of(addr, len) else { return Err(buf) };
        let Some(cid) = self.take_cid() else { return Err(buf) };
        let (a, b, sgl) = self.data_ptr(cid, region, addr, len);
        let shift = self.block_shift();
        let mut sqe = Sqe::rw(opcode, cid, self.ns.nsid, off >> shift, (len >> shift) as u32, fua);
        sqe.set_data(a, b, sgl);
        let slot = slot_alloc(Some(buf));
        self.issue(cid, sqe, slot, len as i64);
        Ok(IoFuture::Slot(SlotFuture::new(slot), SlotKind::Other))
    }

    /// Wait until a command identifier is free (or the queue died).
    async fn cid(&self) -> Result<u16, IoStatus> {
        std::future::poll_fn(|cx| {
            if self.dead.get() {
                return Poll::Ready(Err(IoStatus::EIO));
            }
            match self.take_cid() {
                Some(c) => Poll::Ready(Ok(c)),
                None => {
                    self.waiters.borrow_mut().push_back(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// A bounce buffer of `len` bytes, waiting for one to be given back if the pool is empty.
    async fn bounce_buf(&self, len: usize) -> Result<IoBuf, IoStatus> {
        std::future::poll_fn(|cx| {
            if self.dead.get() {
                return Poll::Ready(Err(IoStatus::EIO));
            }
            match self.bounce.take(len) {
                Some(b) => Poll::Ready(Ok(b)),
                None => {
                    self.waiters.borrow_mut().push_back(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await
    }

    fn wake_waiters(&self) {
        let ws: Vec<Waker> = self.waiters.borrow_mut().drain(..).collect();
        for w in ws {
            w.wake();
        }
    }

    /// Submit a command built by `make(cid, data pointer)` over `buf` (mapped memory) and
    /// wait. `sgl` allows an SGL data pointer (reads and writes).
    async fn run(
        &self,
        buf: Option<IoBuf>,
        ok: i64,
        sgl: bool,
        make: impl FnOnce(u16, (u64, u64, bool)) -> Sqe,
    ) -> (i64, Option<IoBuf>) {
        let cid = match self.cid().await {
            Ok(c) => c,
            Err(e) => return (-i64::from(e.errno()), buf),
        };
        let dptr = match &buf {
            Some(b) => {
                let (addr, len) = (b.as_ptr() as usize, b.len());
                let r = self.region_of(addr, len).expect("run's buffer is mapped");
                if sgl {
                    self.data_ptr(cid, r, addr, len)
                } else {
                    let (a, b) = self.prps(cid, r, addr, len);
                    (a, b, false)
                }
            }
            None => (0, 0, false),
        };
        let sqe = make(cid, dptr);
        let slot = slot_alloc(buf);
        self.issue(cid, sqe, slot, ok);
        SlotFuture::new(slot).await
    }

    /// The slow path of reads and writes: wait for room, bounce when the buffer is not mapped.
    async fn rw_slow(self: Rc<Self>, opcode: u8, off: u64, mut buf: IoBuf, fua: bool) -> IoDone {
        let len = buf.len();
        let shift = self.block_shift();
        let nsid = self.ns.nsid;
        let sqe = move |cid, (a, b, sgl): (u64, u64, bool)| {
            let mut s = Sqe::rw(opcode, cid, nsid, off >> shift, (len >> shift) as u32, fua);
            s.set_data(a, b, sgl);
            s
        };
        if self.region_of(buf.as_ptr() as usize, len).is_some() {
            let (res, b) = self.run(Some(buf), len as i64, true, sqe).await;
            return done(res, b);
        }
        let mut b = match self.bounce_buf(len).await {
            Ok(b) => b,
            Err(e) => return IoDone { buf: Some(buf), res: Err(e) },
        };
        if opcode == io::WRITE {
            b.as_mut_slice().copy_from_slice(&buf);
        }
        let (res, b) = self.run(Some(b), len as i64, true, sqe).await;
        if res >= 0 && opcode == io::READ {
            if let Some(b) = &b {
                buf.as_mut_slice().copy_from_slice(b);
            }
        }
        drop(b);
        self.wake_waiters();
        done(res, Some(buf))
    }

    async fn write_zeroes_slow(self: Rc<Self>, off: u64, len: u64, flags: ZeroFlags) -> IoDone {
        let shift = self.block_shift();
        let (mut lba, end) = (off >> shift, (off + len) >> shift);
        let deallocate = flags.may_unmap && self.ns.write_zeroes_dealloc;
        let nsid = self.ns.nsid;
        while lba < end {
            let n = (end - lba).min(MAX_ZERO_BLOCKS);
            let (res, _) =
                self.run(None, 0, false, |cid, _| Sqe::write_zeroes(cid, nsid, lba, n as u32, deallocate, flags.fua)).await;
            if res < 0 {
                return IoDone::err(IoStatus::from_neg(res));
            }
            lba += n;
        }
        IoDone::ok(len)
    }

    async fn discard_slow(self: Rc<Self>, off: u64, len: u64) -> IoDone {
        let shift = self.block_shift();
        let (mut lba, end) = (off >> shift, (off + len) >> shift);
        let nsid = self.ns.nsid;
        while lba < end {
            let mut b = match self.bounce_buf(PAGE as usize).await {
                Ok(b) => b,
                Err(e) => return IoDone::err(e),
            };
            let mut ranges = 0u32;
            for r in b.as_mut_slice().chunks_exact_mut(16).take(MAX_DSM_RANGES as usize) {
                if lba >= end {
                    break;
                }
                let n = (end - lba).min(u64::from(u32::MAX));
                r[0..4].fill(0);
                r[4..8].copy_from_slice(&(n as u32).to_le_bytes());
                r[8..16].copy_from_slice(&lba.to_le_bytes());
                lba += n;
                ranges += 1;
            }
            b.reset(16 * ranges as usize);
            let (res, b) = self
                .run(Some(b), 0, false, |cid, (a, b, _)| {
                    let mut s = Sqe::deallocate(cid, nsid, ranges);
                    s.set_data(a, b, false);
                    s
                })
                .await;
            drop(b);
            self.wake_waiters();
            if res < 0 {
                return IoDone::err(IoStatus::from_neg(res));
            }
        }
        IoDone::ok(len)
    }

    /// The poller: doorbells, completions, timeouts. Returns the work done (non-zero while
    /// commands are outstanding, so the reactor keeps polling for them).
    fn poll(&self) -> usize {
        if self.dead.get() {
            return 0;
        }
        let dev = &self.ctrl.dev;
        let mut ring = self.ring.borrow_mut();
        if ring.sq_pending() {
            ring.ring_sq(dev);
        }
        let mut n = 0;
        while let Some(c) = ring.pop() {
            n += 1;
            let cid = usize::from(c.cid);
            let cmd = self.cmds.borrow_mut().get_mut(cid).map(|c| std::mem::replace(c, Cmd { slot: None, ok: 0 }));
            let Some(Cmd { slot: Some(slot), ok }) = cmd else { continue };
            let st = c.status();
            slot_complete(slot, if st.ok() { ok } else { -i64::from(st.errno()) });
            self.free.borrow_mut().push(c.cid);
            self.outstanding.set(self.outstanding.get() - 1);
        }
        if n > 0 {
            ring.ring_cq(dev);
            drop(ring);
            self.last_progress.set(Instant::now());
            if !self.waiters.borrow().is_empty() {
                self.wake_waiters();
            }
            return n;
        }
        drop(ring);
        if self.outstanding.get() == 0 {
            return 0;
        }
        let p = self.polls.get().wrapping_add(1);
        self.polls.set(p);
        if p.is_multiple_of(CHECK_EVERY) {
            let why = match self.ctrl.fatal() {
                Some(f) => Some(f.to_string()),
                None if self.last_progress.get().elapsed() > IO_TIMEOUT => {
                    Some(format!("a command timed out after {IO_TIMEOUT:?}"))
                }
                None => None,
            };
            if let Some(why) = why {
                eprintln!("NVMe {}: {why}: stopping the controller, failing its I/O", self.ctrl.bdf);
                self.die();
                return 1;
            }
        }
        1
    }

    /// Stop the controller and fail everything outstanding.
    fn die(&self) {
        self.ctrl.fail();
        self.dead.set(true);
        let slots: Vec<SlotId> = self.cmds.borrow_mut().iter_mut().filter_map(|c| c.slot.take()).collect();
        for s in slots {
            slot_complete(s, -i64::from(libc::EIO));
        }
        self.outstanding.set(0);
        self.wake_waiters();
    }

    fn check(&self) -> Result<(), IoStatus> {
        if self.dead.get() || self.ctrl.failed() {
            if !self.dead.get() {
                self.die();
            }
            return Err(IoStatus::EIO);
        }
        Ok(())
    }
}

fn done(res: i64, buf: Option<IoBuf>) -> IoDone {
    IoDone { buf, res: if res < 0 { Err(IoStatus::from_neg(res)) } else { Ok(res as u64) } }
}

impl basalt_engine::NodeQueue for NvmeQueue {
    fn read(&self, off: u64, buf: IoBuf) -> IoFuture {
        if let Err(e) = self.inner.check() {
            return IoFuture::done(buf, Err(e));
        }
        match self.inner.try_rw(io::READ, off, buf, false) {
            Ok(f) => f,
            Err(buf) => IoFuture::boxed(self.inner.clone().rw_slow(io::READ, off, buf, false)),
        }
    }

    fn write(&self, off: u64, buf: IoBuf, flags: WriteFlags) -> IoFuture {
        if let Err(e) = self.inner.check() {
            return IoFuture::done(buf, Err(e));
        }
        match self.inner.try_rw(io::WRITE, off, buf, flags.fua) {
            Ok(f) => f,
            Err(buf) => IoFuture::boxed(self.inner.clone().rw_slow(io::WRITE, off, buf, flags.fua)),
        }
    }

    fn write_zeroes(&self, off: u64, len: u64, flags: ZeroFlags) -> IoFuture {
        if let Err(e) = self.inner.check() {
            return IoFuture::err(e);
        }
        if !self.inner.ctrl.id.write_zeroes() {
            return IoFuture::err(IoStatus::ENOTSUP);
        }
        IoFuture::boxed(self.inner.clone().write_zeroes_slow(off, len, flags))
    }

    fn discard(&self, off: u64, len: u64) -> IoFuture {
        if let Err(e) = self.inner.check() {
            return IoFuture::err(e);
        }
        if !self.inner.ctrl.id.dsm() || !self.inner.ns.discard {
            return IoFuture::err(IoStatus::ENOTSUP);
        }
        IoFuture::boxed(self.inner.clone().discard_slow(off, len))
    }

    fn flush(&self) -> IoFuture {
        if let Err(e) = self.inner.check() {
            return IoFuture::err(e);
        }
        if !self.inner.ctrl.id.vwc {
            return IoFuture::ok(0);
        }
        let q = &self.inner;
        let nsid = q.ns.nsid;
        match q.take_cid() {
            Some(cid) => {
                let slot = slot_alloc(None);
                q.issue(cid, Sqe::new(io::FLUSH, cid, nsid), slot, 0);
                IoFuture::Slot(SlotFuture::new(slot), SlotKind::Other)
            }
            None => {
                let q = q.clone();
                IoFuture::boxed(async move {
                    let (res, _) = q.run(None, 0, false, |cid, _| Sqe::new(io::FLUSH, cid, nsid)).await;
                    done(res, None)
                })
            }
        }
    }
}
