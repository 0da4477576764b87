//! An NVMe controller driven from userspace: bring-up and teardown per the NVM Express base
//! specification, the admin queue, and the creation and deletion of I/O queue pairs.
//!
//! Bring-up: disable (CC.EN=0, wait CSTS.RDY=0), admin queue registers, enable with 4 KiB
//! pages and 64/16-byte entries (wait CSTS.RDY=1), Identify Controller, Set Features (Number of
//! Queues). Teardown: every I/O queue pair deleted by its owner, then a normal shutdown
//! notification (CC.SHN, wait CSTS.SHST complete) when the controller is dropped. Every wait is
//! bounded by CAP.TO (ready) or a fixed admin timeout; a controller reporting fatal status
//! (CSTS.CFS) fails with an error saying so. Admin commands run synchronously under a mutex:
//! they are control-plane work (open, queue creation), never on the I/O path.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use basalt_engine::{BlockError, BlockResult, ErrorKind};

use super::cmd::{admin, build_prps, Cqe, IdentifyController, IdentifyNamespace, Sqe, FEAT_NUM_QUEUES, PAGE};
use super::ring::Ring;
use super::vfio::{DmaAlloc, DmaRegion, VfioDevice};

const REG_CAP: usize = 0x00;
const REG_VS: usize = 0x08;
const REG_INTMS: usize = 0x0c;
const REG_CC: usize = 0x14;
const REG_CSTS: usize = 0x1c;
const REG_AQA: usize = 0x24;
const REG_ASQ: usize = 0x28;
const REG_ACQ: usize = 0x30;

const CSTS_RDY: u32 = 1;
const CSTS_CFS: u32 = 2;

const ADMIN_ENTRIES: u16 = 32;
/// How long an admin command may take (emulated controllers under TCG are slow).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);
/// I/O queue pairs asked for (the controller may grant fewer).
const WANT_QUEUES: u32 = 64;
/// Largest transfer the driver issues: one PRP list page (512 entries) covers it.
pub(crate) const MAX_TRANSFER: u32 = 2 << 20;

struct Admin {
    ring: Ring,
    _mem: Arc<DmaAlloc>,
    /// A page for data the admin commands transfer (identify), and its bus address.
    data: *mut u8,
    data_bus: u64,
    next_cid: u16,
}

// SAFETY: `data` points into `_mem`, owned alongside; used only under the admin mutex.
unsafe impl Send for Admin {}

/// A controller that is enabled and answers admin commands.
pub(crate) struct Controller {
    pub(crate) dev: VfioDevice,
    pub(crate) bdf: String,
    /// Doorbell stride in bytes.
    pub(crate) dstrd: usize,
    /// Maximum queue entries the controller supports.
    pub(crate) mqes: u32,
    pub(crate) id: IdentifyController,
    /// Largest transfer in bytes.
    pub(crate) max_transfer: u32,
    ready_timeout: Duration,
    admin: Mutex<Admin>,
    free_qids: Mutex<Vec<u16>>,
    failed: AtomicBool,
}

fn err(msg: String) -> BlockError {
    BlockError::new(ErrorKind::Io, msg)
}

impl Controller {
    /// Open the controller at `bdf` and bring it up.
    pub(crate) fn open(bdf: &str) -> BlockResult<Arc<Controller>> {
        let dev = VfioDevice::open(bdf)?;
        let class = std::fs::read_to_string(format!("/sys/bus/pci/devices/{bdf}/class")).unwrap_or_default();
        if !class.trim().starts_with("0x0108") {
            return Err(BlockError::new(
                ErrorKind::Unsupported,
                format!("PCI device {bdf} is not an NVMe controller (class {})", class.trim()),
            ));
        }
        let cap = dev.read64(REG_CAP);
        let mqes = (cap & 0xffff) as u32 + 1;
        let dstrd = 4usize << ((cap >> 32) & 0xf);
        let ready_timeout = Duration::from_millis(500 * ((cap >> 24) & 0xff).max(1));
        let mpsmin = (cap >> 48) & 0xf;
        if cap >> 37 & 1 == 0 {
            return Err(BlockError::new(ErrorKind::Unsupported, format!("NVMe {bdf}: the NVM command set is not supported")));
        }
        if mpsmin != 0 {
            return Err(BlockError::new(
                ErrorKind::Unsupported,
                format!("NVMe {bdf}: minimum page size {} is not supported", 4096u64 << mpsmin),
            ));
        }
        if 0x1000 + 2 * dstrd > dev.bar_len() {
            return Err(err(format!("NVMe {bdf}: the admin doorbells (stride {dstrd}) lie outside BAR 0")));
        }
        // Admin queue memory: SQ page, CQ page, data page.
        let mem = Arc::new(DmaAlloc::new(3 * PAGE as usize, dev.noiommu())?);
        let region = dev.map(Box::new(mem.clone()))?;
        let base = mem.ptr() as usize;
        let bus = |p: usize| region.bus(p);
        // SAFETY: the pages are inside `mem`, zeroed, used only by this ring.
        let ring = unsafe { Ring::new(mem.ptr(), mem.ptr().add(PAGE as usize), ADMIN_ENTRIES, 0, dstrd) };
        let admin = Admin {
            ring,
            _mem: mem.clone(),
            // SAFETY: the third page of `mem`.
            data: unsafe { mem.ptr().add(2 * PAGE as usize) },
            data_bus: bus(base + 2 * PAGE as usize),
            next_cid: 0,
        };
        let mut c = Controller {
            dev,
            bdf: bdf.to_string(),
            dstrd,
            mqes,
            id: IdentifyController {
                serial: String::new(),
                model: String::new(),
                firmware: String::new(),
                mdts: 0,
                nn: 0,
                oncs: 0,
                vwc: false,
                sgls: 0,
            },
            max_transfer: MAX_TRANSFER,
            ready_timeout,
            admin: Mutex::new(admin),
            free_qids: Mutex::new(Vec::new()),
            failed: AtomicBool::new(false),
        };
        c.enable(bus(base), bus(base + PAGE as usize))?;
        let mut page = vec![0u8; PAGE as usize];
        c.identify(1, 0, &mut page)?;
        c.id = IdentifyController::parse(&page).map_err(|e| err(format!("NVMe {bdf}: {e}")))?;
        if c.id.mdts != 0 {
            let mdts = (PAGE << c.id.mdts.min(20)).min(u64::from(MAX_TRANSFER));
            c.max_transfer = mdts as u32;
        }
        let cqe = c.admin_cmd(
            {
                let mut s = Sqe::new(admin::SET_FEATURES, 0, 0);
                s.cdw10 = FEAT_NUM_QUEUES;
                s.cdw11 = ((WANT_QUEUES - 1) << 16) | (WANT_QUEUES - 1);
                s
            },
            "Set Features (Number of Queues)",
        )?;
        let granted = (cqe.dw0 & 0xffff).min(cqe.dw0 >> 16) + 1;
        let n = granted.min(WANT_QUEUES) as u16;
        // Handed out lowest first; the doorbells of each must lie inside BAR 0.
        let fits = |q: u16| 0x1000 + (2 * usize::from(q) + 2) * dstrd <= c.dev.bar_len();
        *c.free_qids.lock().unwrap_or_else(|p| p.into_inner()) = (1..=n).rev().filter(|q| fits(*q)).collect();
        Ok(Arc::new(c))
    }

    fn csts(&self) -> u32 {
        self.dev.read32(REG_CSTS)
    }

    fn wait_csts(&self, what: &str, done: impl Fn(u32) -> bool) -> BlockResult<()> {
        let deadline = Instant::now() + self.ready_timeout;
        loop {
            let s = self.csts();
            if s == u32::MAX {
                return Err(err(format!("NVMe {}: the controller does not answer (CSTS reads all ones)", self.bdf)));
            }
            if done(s) {
                return Ok(());
            }
            if s & CSTS_CFS != 0 && what != "disable" {
                return Err(err(format!("NVMe {}: controller fatal status (CSTS.CFS) while waiting to {what}", self.bdf)));
            }
            if Instant::now() > deadline {
                return Err(err(format!(
                    "NVMe {}: timed out after {:?} waiting to {what} (CSTS {s:#x})",
                    self.bdf, self.ready_timeout
                )));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn enable(&self, asq: u64, acq: u64) -> BlockResult<()> {
        let vs = self.dev.read32(REG_VS);
        if vs >> 16 == 0 {
            return Err(err(format!("NVMe {}: version register reads {vs:#x}", self.bdf)));
        }
        if self.dev.read32(REG_CC) & 1 != 0 {
            self.dev.write32(REG_CC, 0);
        }
        self.wait_csts("disable", |s| s & CSTS_RDY == 0)?;
        // Polled: mask every interrupt vector.
        self.dev.write32(REG_INTMS, u32::MAX);
        let q = u32::from(ADMIN_ENTRIES - 1);
        self.dev.write32(REG_AQA, (q << 16) | q);
        self.dev.write64(REG_ASQ, asq);
        self.dev.write64(REG_ACQ, acq);
        // EN, NVM command set, 4 KiB pages, round robin, 64-byte SQ and 16-byte CQ entries.
        self.dev.write32(REG_CC, 1 | (6 << 16) | (4 << 20));
        self.wait_csts("enable", |s| s & CSTS_RDY != 0)
    }

    /// Run one admin command to completion; `what` names it in errors.
    pub(crate) fn admin_cmd(&self, sqe: Sqe, what: &str) -> BlockResult<Cqe> {
        self.admin_exec(sqe, what, None)
    }

    /// Run one admin command; with `out`, the command transfers one page from the device
    /// through the admin data page (PRP1 is set here), copied to `out` before the lock is let go.
    fn admin_exec(&self, mut sqe: Sqe, what: &str, out: Option<&mut [u8]>) -> BlockResult<Cqe> {
        self.check_alive()?;
        let mut a = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let cid = a.next_cid;
        a.next_cid = (a.next_cid + 1) % ADMIN_ENTRIES;
        sqe.cdw0 = (sqe.cdw0 & 0xffff) | (u32::from(cid) << 16);
        if out.is_some() {
            let mut none = [0u64; 0];
            (sqe.prp1, sqe.prp2) = build_prps(&[a.data_bus], &mut none, 0);
        }
        a.ring.push(sqe);
        a.ring.ring_sq(&self.dev);
        let deadline = Instant::now() + ADMIN_TIMEOUT;
        loop {
            if let Some(c) = a.ring.pop() {
                a.ring.ring_cq(&self.dev);
                if c.cid != cid {
                    // A late completion of a command that timed out: skip it.
                    continue;
                }
                if !c.status().ok() {
                    return Err(BlockError::new(
                        ErrorKind::Io,
                        format!("NVMe {}: {what} failed: {}", self.bdf, c.status().describe()),
                    ));
                }
                if let Some(out) = out {
                    // SAFETY: the data page is PAGE bytes inside the admin memory, written by
                    // the device before it posted the completion (the acquire in `pop`).
                    let src = unsafe { std::slice::from_raw_parts(a.data as *const u8, PAGE as usize) };
                    out[..PAGE as usize].copy_from_slice(src);
                }
                return Ok(c);
            }
            if Instant::now() > deadline {
                let s = self.csts();
                let fatal = if s & CSTS_CFS != 0 { " (controller fatal status)" } else { "" };
                return Err(err(format!("NVMe {}: {what} timed out after {ADMIN_TIMEOUT:?}{fatal}", self.bdf)));
            }
            std::hint::spin_loop();
        }
    }

    /// Identify with CNS `cns` for namespace `nsid` into `out` (4096 bytes).
    pub(crate) fn identify(&self, cns: u32, nsid: u32, out: &mut [u8]) -> BlockResult<()> {
        let mut s = Sqe::new(admin::IDENTIFY, 0, nsid);
        s.cdw10 = cns;
        let what = if cns == 1 { "Identify Controller".to_string() } else { format!("Identify Namespace {nsid}") };
        self.admin_exec(s, &what, Some(out)).map(|_| ())
    }

    /// Identify namespace `nsid`: an error naming the problem when it does not exist.
    pub(crate) fn namespace(&self, nsid: u32) -> BlockResult<IdentifyNamespace> {
        if nsid == 0 || nsid > self.id.nn {
            return Err(BlockError::new(
                ErrorKind::NotFound,
                format!("NVMe {}: namespace {nsid} does not exist (the controller has at most {})", self.bdf, self.id.nn),
            ));
        }
        let mut page = vec![0u8; PAGE as usize];
        self.identify(0, nsid, &mut page)?;
        IdentifyNamespace::parse(&page).map_err(|e| err(format!("NVMe {}: {e}", self.bdf)))?.ok_or_else(|| {
            BlockError::new(ErrorKind::NotFound, format!("NVMe {}: namespace {nsid} does not exist (it is not active)", self.bdf))
        })
    }

    /// Take a free I/O queue identifier.
    pub(crate) fn take_qid(&self) -> BlockResult<u16> {
        self.free_qids.lock().unwrap_or_else(|p| p.into_inner()).pop().ok_or_else(|| {
            BlockError::new(ErrorKind::Busy, format!("NVMe {}: no I/O queue pair left for another reactor", self.bdf))
        })
    }

    /// Return an I/O queue identifier.
    pub(crate) fn put_qid(&self, qid: u16) {
        self.free_qids.lock().unwrap_or_else(|p| p.into_inner()).push(qid);
    }

    /// Create I/O completion and submission queues `qid` of `size` entries at the given bus
    /// addresses (each physically contiguous).
    pub(crate) fn create_io_queues(&self, qid: u16, size: u16, sq: u64, cq: u64) -> BlockResult<()> {
        let dw10 = (u32::from(size - 1) << 16) | u32::from(qid);
        let mut c = Sqe::new(admin::CREATE_CQ, 0, 0);
        c.prp1 = cq;
        c.cdw10 = dw10;
        c.cdw11 = 1; // physically contiguous, interrupts off
        self.admin_cmd(c, &format!("Create I/O Completion Queue {qid}"))?;
        let mut s = Sqe::new(admin::CREATE_SQ, 0, 0);
        s.prp1 = sq;
        s.cdw10 = dw10;
        s.cdw11 = (u32::from(qid) << 16) | 1;
        if let Err(e) = self.admin_cmd(s, &format!("Create I/O Submission Queue {qid}")) {
            let mut d = Sqe::new(admin::DELETE_CQ, 0, 0);
            d.cdw10 = u32::from(qid);
            let _ = self.admin_cmd(d, "Delete I/O Completion Queue");
            return Err(e);
        }
        Ok(())
    }

    /// Delete I/O queues `qid` (submission first: the controller aborts what it still holds).
    pub(crate) fn delete_io_queues(&self, qid: u16) -> BlockResult<()> {
        let mut s = Sqe::new(admin::DELETE_SQ, 0, 0);
        s.cdw10 = u32::from(qid);
        self.admin_cmd(s, &format!("Delete I/O Submission Queue {qid}"))?;
        let mut c = Sqe::new(admin::DELETE_CQ, 0, 0);
        c.cdw10 = u32::from(qid);
        self.admin_cmd(c, &format!("Delete I/O Completion Queue {qid}"))?;
        Ok(())
    }

    /// Map memory for DMA by this controller.
    pub(crate) fn map(&self, mem: Box<dyn super::vfio::DmaMemory>) -> BlockResult<DmaRegion> {
        self.dev.map(mem)
    }

    /// Why the controller cannot go on, if it cannot: fatal status, or gone from the bus.
    pub(crate) fn fatal(&self) -> Option<&'static str> {
        match self.csts() {
            u32::MAX => Some("the controller stopped answering (CSTS reads all ones)"),
            s if s & CSTS_CFS != 0 => Some("controller fatal status (CSTS.CFS)"),
            _ => None,
        }
    }

    /// Stop the controller after a fatal error or a timeout: disabling it stops its DMA, so
    /// buffers of the commands it held can be given back. Further commands fail.
    pub(crate) fn fail(&self) {
        if !self.failed.swap(true, Ordering::SeqCst) {
            self.dev.write32(REG_CC, 0);
            let _ = self.wait_csts("disable", |s| s & CSTS_RDY == 0);
        }
    }

    /// Whether [`Controller::fail`] was called.
    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    fn check_alive(&self) -> BlockResult<()> {
        if self.failed() {
            return Err(err(format!("NVMe {}: the controller failed and was stopped", self.bdf)));
        }
        Ok(())
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if self.failed() {
            return;
        }
        // Normal shutdown notification, then wait for it to complete (bounded).
        let cc = self.dev.read32(REG_CC);
        self.dev.write32(REG_CC, (cc & !(3 << 14)) | (1 << 14));
        let deadline = Instant::now() + self.ready_timeout.max(Duration::from_secs(5));
        while (self.csts() >> 2) & 3 != 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}
