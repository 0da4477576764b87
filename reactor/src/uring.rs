//! The reactor's io_uring: setup with feature probing and fallbacks, batched submission,
//! completion reaping into slots, registered files and the fixed buffer of the DMA pool.
//!
//! Submission is batched: operations pushed while tasks run are handed to the kernel once per
//! reactor turn (or earlier when the submission queue fills), one `io_uring_enter` per batch.
//! With SQPOLL the kernel thread picks them up without a syscall at all.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring, Probe};

use crate::slots::SlotId;

/// User data of the reactor's own eventfd read; never a slot id (slot ids are 32-bit).
pub(crate) const EVENTFD_TAG: u64 = u64::MAX;
/// User data of the cancel-everything request made at shutdown; never a slot id either.
pub(crate) const CANCEL_TAG: u64 = u64::MAX - 1;

/// What the ring of a reactor can do, found by probing at start.
#[derive(Clone, Copy, Debug, Default)]
pub struct UringFeatures {
    /// Whether SQPOLL is in use.
    pub sqpoll: bool,
    /// Whether files can be registered (fixed files).
    pub fixed_files: bool,
    /// Whether the DMA pool is registered as a fixed buffer.
    pub fixed_buffers: bool,
    /// `IORING_OP_FALLOCATE` (discard, write zeroes).
    pub fallocate: bool,
    /// `IORING_OP_READ`/`WRITE` (plain, non-vectored reads and writes).
    pub read_write: bool,
}

pub(crate) struct Ring {
    ring: RefCell<IoUring>,
    unsubmitted: Cell<u32>,
    in_kernel: Cell<usize>,
    pub(crate) features: UringFeatures,
    file_free: RefCell<Vec<u32>>,
}

const FILE_TABLE: u32 = 1024;

impl Ring {
    pub(crate) fn new(entries: u32, sqpoll: bool, disabled_ops: &[&str]) -> io::Result<Ring> {
        let mut features = UringFeatures::default();
        let ring = if sqpoll {
            match IoUring::builder().setup_sqpoll(2000).build(entries) {
                Ok(r) => {
                    features.sqpoll = true;
                    r
                }
                Err(_) => IoUring::new(entries)?,
            }
        } else {
            IoUring::builder().setup_coop_taskrun().build(entries).or_else(|_| IoUring::new(entries))?
        };
        let mut probe = Probe::new();
        let probed = ring.submitter().register_probe(&mut probe).is_ok();
        let has = |code: u8, name: &str| probed && probe.is_supported(code) && !disabled_ops.contains(&name);
        features.fallocate = has(opcode::Fallocate::CODE, "fallocate");
        features.read_write = has(opcode::Read::CODE, "read") && has(opcode::Write::CODE, "write");
        if !features.read_write {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "io_uring lacks READ/WRITE"));
        }
        let mut file_free = Vec::new();
        if !disabled_ops.contains(&"fixed_files") && ring.submitter().register_files_sparse(FILE_TABLE).is_ok() {
            features.fixed_files = true;
            file_free = (0..FILE_TABLE).rev().collect();
        }
        Ok(Ring {
            ring: RefCell::new(ring),
            unsubmitted: Cell::new(0),
            in_kernel: Cell::new(0),
            features,
            file_free: RefCell::new(file_free),
        })
    }

    /// Register `[base, base+len)` as fixed buffer 0.
    pub(crate) fn register_pool(&mut self, base: *mut u8, len: usize) -> bool {
        let iov = libc::iovec { iov_base: base.cast(), iov_len: len };
        // SAFETY: the region is a live mapping owned by the reactor's pool, which outlives the
        // ring (the reactor drops the ring first).
        let ok = unsafe { self.ring.borrow().submitter().register_buffers(&[iov]) }.is_ok();
        self.features.fixed_buffers = ok;
        ok
    }

    pub(crate) fn register_file(&self, fd: RawFd) -> Option<u32> {
        if !self.features.fixed_files {
            return None;
        }
        let idx = self.file_free.borrow_mut().pop()?;
        match self.ring.borrow().submitter().register_files_update(idx, &[fd]) {
            Ok(_) => Some(idx),
            Err(_) => {
                self.file_free.borrow_mut().push(idx);
                None
            }
        }
    }

    pub(crate) fn unregister_file(&self, idx: u32) {
        if self.ring.borrow().submitter().register_files_update(idx, &[-1]).is_ok() {
            self.file_free.borrow_mut().push(idx);
        }
    }

    pub(crate) fn in_kernel(&self) -> usize {
        self.in_kernel.get()
    }

    /// Queue one SQE; submits the batch first if the queue is full.
    pub(crate) fn push(&self, sqe: squeue::Entry) {
        let mut ring = self.ring.borrow_mut();
        loop {
            // SAFETY: every buffer an SQE points to is owned by a slot (or the reactor's eventfd
            // buffer) until its CQE is reaped.
            let pushed = unsafe { ring.submission().push(&sqe) }.is_ok();
            if pushed {
                break;
            }
            // Queue full: hand the batch to the kernel and retry.
            let _ = ring.submit();
            self.unsubmitted.set(0);
        }
        self.unsubmitted.set(self.unsubmitted.get() + 1);
        self.in_kernel.set(self.in_kernel.get() + 1);
    }

    /// Submit what was queued this turn. Also enters the kernel when the CQ has overflowed:
    /// completions it held back reach the CQ only on an enter, and a busy-polling reactor
    /// makes no other.
    pub(crate) fn flush(&self) {
        let mut ring = self.ring.borrow_mut();
        if self.unsubmitted.get() > 0 || ring.submission().cq_overflow() {
            // `submit` adds GETEVENTS when the overflow flag is set, which flushes the backlog.
            let _ = ring.submit();
            self.unsubmitted.set(0);
        }
    }

    /// Ask the kernel to cancel every request in flight (at shutdown: a read parked on an idle
    /// pipe or socket would otherwise never complete). Requests already running complete as
    /// usual; either way each still posts its CQE.
    pub(crate) fn cancel_all(&self) {
        self.push(opcode::AsyncCancel2::new(types::CancelBuilder::any()).build().user_data(CANCEL_TAG));
        self.flush();
    }

    /// Reap completions; `on` gets (user_data, result). Returns how many were reaped.
    pub(crate) fn reap(&self, mut on: impl FnMut(u64, i32)) -> usize {
        let mut n = 0;
        loop {
            let cqe = {
                let mut ring = self.ring.borrow_mut();
                let c = ring.completion().next();
                c
            };
            let Some(cqe) = cqe else { break };
            n += 1;
            self.in_kernel.set(self.in_kernel.get() - 1);
            on(cqe.user_data(), cqe.result());
        }
        n
    }

    /// Submit and block until at least one completion or the timeout.
    pub(crate) fn wait(&self, timeout: Option<Duration>) {
        let ring = self.ring.borrow();
        self.unsubmitted.set(0);
        match timeout {
            Some(t) => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                if ring.submitter().submit_with_args(1, &args).is_err() {
                    // Kernels without EXT_ARG: fall back to a short plain wait.
                    let _ = ring.submit();
                }
            }
            None => {
                let _ = ring.submit_and_wait(1);
            }
        }
    }
}

/// A file as the ring addresses it: a plain descriptor or an index in the registered table.
#[derive(Clone, Copy, Debug)]
pub enum UringFd {
    /// A plain file descriptor.
    Raw(RawFd),
    /// An index in the ring's registered file table.
    Fixed(u32),
}

macro_rules! with_fd {
    ($fd:expr, $f:ident => $e:expr) => {
        match $fd {
            UringFd::Raw(raw) => {
                let $f = types::Fd(raw);
                $e
            }
            UringFd::Fixed(i) => {
                let $f = types::Fixed(i);
                $e
            }
        }
    };
}

/// Build the SQE for a read (`write == false`) or write of `len` bytes at `ptr`.
pub(crate) fn rw_entry(
    fd: UringFd,
    write: bool,
    ptr: *mut u8,
    len: u32,
    off: u64,
    fixed: Option<u16>,
    id: SlotId,
) -> squeue::Entry {
    let e = with_fd!(fd, f => match (write, fixed) {
        (false, None) => opcode::Read::new(f, ptr, len).offset(off).build(),
        (true, None) => opcode::Write::new(f, ptr, len).offset(off).build(),
        (false, Some(i)) => opcode::ReadFixed::new(f, ptr, len, i).offset(off).build(),
        (true, Some(i)) => opcode::WriteFixed::new(f, ptr, len, i).offset(off).build(),
    });
    e.user_data(u64::from(id.raw()))
}

pub(crate) fn fsync_entry(fd: UringFd, datasync: bool, id: SlotId) -> squeue::Entry {
    let flags = if datasync { types::FsyncFlags::DATASYNC } else { types::FsyncFlags::empty() };
    with_fd!(fd, f => opcode::Fsync::new(f).flags(flags).build()).user_data(u64::from(id.raw()))
}

pub(crate) fn fallocate_entry(fd: UringFd, mode: i32, off: u64, len: u64, id: SlotId) -> squeue::Entry {
    with_fd!(fd, f => opcode::Fallocate::new(f, len).offset(off).mode(mode).build()).user_data(u64::from(id.raw()))
}

pub(crate) fn poll_entry(fd: RawFd, events: u32, id: SlotId) -> squeue::Entry {
    opcode::PollAdd::new(types::Fd(fd), events).build().user_data(u64::from(id.raw()))
}

pub(crate) fn eventfd_read_entry(fd: RawFd, buf: *mut u8) -> squeue::Entry {
    opcode::Read::new(types::Fd(fd), buf, 8).build().user_data(EVENTFD_TAG)
}
