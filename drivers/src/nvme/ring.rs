//! One NVMe submission/completion queue pair's rings in DMA memory: entries written at the
//! submission tail, completions found by their phase tag at the completion head, and the two
//! doorbells. Used for the admin queue (behind the controller's mutex) and for each reactor's
//! I/O queue pair (owned by that reactor alone).
//!
//! Ordering: a submission entry is fully written before the tail doorbell that publishes it
//! (release fence), and a completion's fields are read only after its phase tag was seen
//! (acquire fence). Each ring lies inside one page, so it is physically contiguous even without
//! an IOMMU.

use std::sync::atomic::{fence, Ordering};

use super::cmd::{Cqe, Sqe};
use super::vfio::VfioDevice;

/// A queue pair's rings. Not `Sync`: one owner at a time.
pub(crate) struct Ring {
    sq: *mut Sqe,
    cq: *mut Cqe,
    size: u16,
    sq_tail: u16,
    cq_head: u16,
    phase: bool,
    sq_db: usize,
    cq_db: usize,
    tail_rung: u16,
}

// SAFETY: the ring points into DMA memory its owner keeps alive; it moves between threads only
// as a whole (inside the admin mutex).
unsafe impl Send for Ring {}

impl Ring {
    /// Rings of `size` entries at `sq` and `cq` (zero-filled, each within one page) for queue
    /// `qid`, with the controller's doorbell stride `dstrd` (bytes).
    ///
    /// # Safety
    /// `sq` must point to `size` writable submission entries and `cq` to `size` completion
    /// entries, both valid for as long as the ring is used, and not used by anything else.
    pub(crate) unsafe fn new(sq: *mut u8, cq: *mut u8, size: u16, qid: u16, dstrd: usize) -> Ring {
        let q = usize::from(qid);
        Ring {
            sq: sq as *mut Sqe,
            cq: cq as *mut Cqe,
            size,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
            sq_db: 0x1000 + 2 * q * dstrd,
            cq_db: 0x1000 + (2 * q + 1) * dstrd,
            tail_rung: 0,
        }
    }

    /// Write `e` at the submission tail (the caller keeps fewer than `size` commands
    /// outstanding, so the slot is free). Not visible to the device until [`Ring::ring_sq`].
    pub(crate) fn push(&mut self, e: Sqe) {
        // SAFETY: sq_tail < size, inside the ring.
        unsafe { std::ptr::write_volatile(self.sq.add(usize::from(self.sq_tail)), e) };
        self.sq_tail = (self.sq_tail + 1) % self.size;
    }

    /// Whether entries were pushed since the last doorbell.
    pub(crate) fn sq_pending(&self) -> bool {
        self.sq_tail != self.tail_rung
    }

    /// Publish the pushed entries with one doorbell write.
    pub(crate) fn ring_sq(&mut self, dev: &VfioDevice) {
        fence(Ordering::Release);
        dev.write32(self.sq_db, u32::from(self.sq_tail));
        self.tail_rung = self.sq_tail;
    }

    /// The next completion, if the device posted one.
    pub(crate) fn pop(&mut self) -> Option<Cqe> {
        // SAFETY: cq_head < size, inside the ring; the device writes it, hence volatile.
        let p = unsafe { self.cq.add(usize::from(self.cq_head)) };
        // SAFETY: as above; the status word is read first, alone.
        let status = unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*p).status)) };
        if (status & 1 == 1) != self.phase {
            return None;
        }
        fence(Ordering::Acquire);
        // SAFETY: the phase tag says the device finished writing this entry.
        let e = unsafe { std::ptr::read_volatile(p) };
        self.cq_head += 1;
        if self.cq_head == self.size {
            self.cq_head = 0;
            self.phase = !self.phase;
        }
        Some(e)
    }

    /// Tell the device how far completions were consumed.
    pub(crate) fn ring_cq(&self, dev: &VfioDevice) {
        dev.write32(self.cq_db, u32::from(self.cq_head));
    }
}
