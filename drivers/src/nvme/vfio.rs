//! A PCI device opened through VFIO: its container, group and device descriptors, BAR 0 mapped
//! into the process, PCI config space, and DMA mappings of memory the device may read and write.
//!
//! Two IOMMU modes, chosen from the group's device node: `/dev/vfio/N` is a real IOMMU group
//! (type1v2 container; memory is mapped with `VFIO_IOMMU_MAP_DMA` at IOVAs handed out here from
//! 4 GiB up, clear of the MSI window, inside a 39-bit address width), `/dev/vfio/noiommu-N` has no
//! IOMMU (container type `VFIO_NOIOMMU_IOMMU`; the device is given physical addresses read from
//! `/proc/self/pagemap`, as SPDK does, so that memory must stay locked in place: hugepages or
//! mlocked pages). CHECK_EXTENSION cannot tell the modes apart (it answers yes to type1 even
//! for a noiommu group), the node's name can.
//!
//! rust-vmm's `vfio-ioctls` cannot open noiommu groups, so the handful of ioctls is made here on
//! `vfio-bindings`' structures. Every mapping made is undone when the device is dropped, and the
//! memory it covers is kept alive until then (the mapping owns a handle to it).

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use basalt_engine::{BlockError, BlockResult, ErrorKind};
use vfio_bindings::bindings::vfio as vb;

const VFIO_BASE: u64 = 100;
const fn vfio_io(nr: u64) -> u64 {
    ((vb::VFIO_TYPE as u64) << 8) | (VFIO_BASE + nr)
}
const VFIO_GET_API_VERSION: u64 = vfio_io(0);
const VFIO_CHECK_EXTENSION: u64 = vfio_io(1);
const VFIO_SET_IOMMU: u64 = vfio_io(2);
const VFIO_GROUP_GET_STATUS: u64 = vfio_io(3);
const VFIO_GROUP_SET_CONTAINER: u64 = vfio_io(4);
const VFIO_GROUP_GET_DEVICE_FD: u64 = vfio_io(6);
const VFIO_DEVICE_GET_REGION_INFO: u64 = vfio_io(8);
const VFIO_IOMMU_MAP_DMA: u64 = vfio_io(13);
const VFIO_IOMMU_UNMAP_DMA: u64 = vfio_io(14);

/// First IOVA handed out in type1 mode, and the end of the space used.
const IOVA_START: u64 = 1 << 32;
const IOVA_END: u64 = 1 << 39;

const PAGE: usize = 4096;

/// Something the device may do DMA to: a region of memory that stays valid while it is held.
pub(crate) trait DmaMemory: Send + Sync {
    /// Base address and length.
    fn region(&self) -> (*mut u8, usize);
}

impl DmaMemory for basalt_reactor::DmaPool {
    fn region(&self) -> (*mut u8, usize) {
        basalt_reactor::DmaPool::region(self)
    }
}

/// How a mapped region's addresses translate to bus addresses.
#[derive(Clone)]
pub(crate) enum Translation {
    /// Contiguous IOVAs from this base.
    Iova(u64),
    /// One physical address per 4 KiB page (noiommu).
    Phys(std::sync::Arc<[u64]>),
}

/// A mapped region as a queue keeps it for lookups.
#[derive(Clone)]
pub(crate) struct DmaRegion {
    pub(crate) base: usize,
    pub(crate) len: usize,
    pub(crate) tr: Translation,
}

impl DmaRegion {
    /// The bus address of `addr`, which must lie inside the region.
    #[inline]
    pub(crate) fn bus(&self, addr: usize) -> u64 {
        let off = addr - self.base;
        match &self.tr {
            Translation::Iova(b) => b + off as u64,
            Translation::Phys(pages) => pages[off / PAGE] + (off % PAGE) as u64,
        }
    }

    /// Whether `addr..addr+len` (inside the region) is one run of bus addresses.
    pub(crate) fn bus_contiguous(&self, addr: usize, len: usize) -> bool {
        match &self.tr {
            Translation::Iova(_) => true,
            Translation::Phys(pages) => {
                let (first, last) = ((addr - self.base) / PAGE, (addr + len - 1 - self.base) / PAGE);
                (first..last).all(|p| pages[p + 1] == pages[p] + PAGE as u64)
            }
        }
    }

    /// Whether `addr..addr+len` lies inside the region.
    #[inline]
    pub(crate) fn contains(&self, addr: usize, len: usize) -> bool {
        addr >= self.base && addr + len <= self.base + self.len
    }
}

struct Mapping {
    region: DmaRegion,
    _mem: Box<dyn DmaMemory>,
}

/// An opened VFIO PCI device.
pub(crate) struct VfioDevice {
    container: File,
    _group: File,
    device: File,
    noiommu: bool,
    config_offset: u64,
    bar: *mut u8,
    bar_len: usize,
    maps: Mutex<(u64, Vec<Mapping>)>,
}

// SAFETY: the BAR pointer is an MMIO mapping owned by this struct and accessed only with volatile
// reads and writes of whole registers; the descriptors and the mapping list are thread-safe.
unsafe impl Send for VfioDevice {}
// SAFETY: as above; shared access is register access, which the device serialises.
unsafe impl Sync for VfioDevice {}

fn err(kind: ErrorKind, msg: String) -> BlockError {
    BlockError::new(kind, msg)
}

fn ioctl(fd: &File, req: u64, arg: libc::c_ulong) -> std::io::Result<i32> {
    // SAFETY: every caller passes a request number matching the argument (a value, or a pointer
    // to a live, correctly sized and `argsz`-tagged structure).
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Whether `s` is a PCI address `DDDD:BB:DD.F` (domain optional in input; always printed).
pub(crate) fn normalise_bdf(s: &str) -> Option<String> {
    let (dom, rest) = match s.matches(':').count() {
        2 => s.split_once(':')?,
        1 => ("0000", s),
        _ => return None,
    };
    let (bus, df) = rest.split_once(':')?;
    let (dev, func) = df.split_once('.')?;
    let dom = u32::from_str_radix(dom, 16).ok().filter(|v| *v <= 0xffff)?;
    let bus = u32::from_str_radix(bus, 16).ok().filter(|v| *v <= 0xff)?;
    let dev = u32::from_str_radix(dev, 16).ok().filter(|v| *v <= 0x1f)?;
    let func = u32::from_str_radix(func, 16).ok().filter(|v| *v <= 7)?;
    Some(format!("{dom:04x}:{bus:02x}:{dev:02x}.{func:x}"))
}

impl VfioDevice {
    /// Open the device at PCI address `bdf` (normalised), which must be bound to vfio-pci.
    pub(crate) fn open(bdf: &str) -> BlockResult<VfioDevice> {
        let sys = Path::new("/sys/bus/pci/devices").join(bdf);
        if !sys.exists() {
            return Err(err(ErrorKind::NotFound, format!("PCI device {bdf} does not exist")));
        }
        let driver =
            std::fs::read_link(sys.join("driver")).ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        match driver.as_deref() {
            Some("vfio-pci") => {}
            Some(d) => {
                return Err(err(
                    ErrorKind::PermissionDenied,
                    format!("PCI device {bdf} is bound to '{d}', not vfio-pci (bind it to vfio-pci first)"),
                ))
            }
            None => {
                return Err(err(
                    ErrorKind::PermissionDenied,
                    format!("PCI device {bdf} is not bound to vfio-pci (bind it to vfio-pci first)"),
                ))
            }
        }
        let group = std::fs::read_link(sys.join("iommu_group"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .ok_or_else(|| err(ErrorKind::NotFound, format!("PCI device {bdf} has no IOMMU group")))?;
        // A noiommu group's node is named for it; a real one by its number.
        let (path, noiommu) = {
            let plain = format!("/dev/vfio/{group}");
            let noiommu = format!("/dev/vfio/noiommu-{group}");
            if Path::new(&noiommu).exists() {
                (noiommu, true)
            } else {
                (plain, false)
            }
        };
        let open_rw = |p: &str| OpenOptions::new().read(true).write(true).open(p);
        let group_file = open_rw(&path).map_err(|e| {
            let kind = if e.raw_os_error() == Some(libc::EBUSY) { ErrorKind::Busy } else { ErrorKind::Io };
            let why = if e.raw_os_error() == Some(libc::EBUSY) { " (the device is in use by another process)" } else { "" };
            err(kind, format!("Failed to open VFIO group file {path}: {e}{why}"))
        })?;
        let container =
            open_rw("/dev/vfio/vfio").map_err(|e| err(ErrorKind::Io, format!("Failed to open /dev/vfio/vfio: {e}")))?;
        let api = ioctl(&container, VFIO_GET_API_VERSION, 0).map_err(|e| err(ErrorKind::Io, format!("VFIO: {e}")))?;
        if api != vb::VFIO_API_VERSION as i32 {
            return Err(err(ErrorKind::Unsupported, format!("VFIO API version {api} is not supported")));
        }
        let iommu = if noiommu { vb::VFIO_NOIOMMU_IOMMU } else { vb::VFIO_TYPE1v2_IOMMU };
        if ioctl(&container, VFIO_CHECK_EXTENSION, iommu.into()).unwrap_or(0) != 1 {
            let what = if noiommu { "no-IOMMU mode" } else { "the type1v2 IOMMU" };
            return Err(err(ErrorKind::Unsupported, format!("VFIO does not support {what}")));
        }
        let mut status = vb::vfio_group_status { argsz: std::mem::size_of::<vb::vfio_group_status>() as u32, flags: 0 };
        ioctl(&group_file, VFIO_GROUP_GET_STATUS, &mut status as *mut _ as libc::c_ulong)
            .map_err(|e| err(ErrorKind::Io, format!("VFIO group {path}: {e}")))?;
        if status.flags & vb::VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(err(
                ErrorKind::PermissionDenied,
                format!("VFIO group {path} is not viable (bind every device of the group to vfio-pci)"),
            ));
        }
        let cfd = container.as_raw_fd();
        ioctl(&group_file, VFIO_GROUP_SET_CONTAINER, &cfd as *const i32 as libc::c_ulong).map_err(|e| {
            let why = if e.raw_os_error() == Some(libc::EBUSY) { " (the device is in use)" } else { "" };
            err(ErrorKind::Busy, format!("VFIO group {path}: cannot attach a container: {e}{why}"))
        })?;
        ioctl(&container, VFIO_SET_IOMMU, iommu.into()).map_err(|e| err(ErrorKind::Io, format!("VFIO_SET_IOMMU: {e}")))?;
        let name = std::ffi::CString::new(bdf).expect("a PCI address has no NUL");
        let dfd = ioctl(&group_file, VFIO_GROUP_GET_DEVICE_FD, name.as_ptr() as libc::c_ulong).map_err(|e| {
            let why = if e.raw_os_error() == Some(libc::EBUSY) { " (the device is in use)" } else { "" };
            err(ErrorKind::Busy, format!("Failed to get the VFIO device descriptor of {bdf}: {e}{why}"))
        })?;
        // SAFETY: the ioctl returned a new descriptor that nothing else owns.
        let device = File::from(unsafe { OwnedFd::from_raw_fd(dfd) });
        let bar0 = region_info(&device, vb::VFIO_PCI_BAR0_REGION_INDEX)?;
        let config = region_info(&device, vb::VFIO_PCI_CONFIG_REGION_INDEX)?;
        if bar0.flags & vb::VFIO_REGION_INFO_FLAG_MMAP == 0 || bar0.size < 0x2000 {
            return Err(err(
                ErrorKind::Unsupported,
                format!("PCI device {bdf}: BAR 0 cannot be mapped (is it an NVMe controller?)"),
            ));
        }
        let bar_len = bar0.size as usize;
        // SAFETY: mapping the device's BAR region at the offset VFIO gave; the result is checked.
        let bar = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bar_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                device.as_raw_fd(),
                bar0.offset as libc::off_t,
            )
        };
        if bar == libc::MAP_FAILED {
            return Err(err(ErrorKind::Io, format!("PCI device {bdf}: mapping BAR 0: {}", std::io::Error::last_os_error())));
        }
        let dev = VfioDevice {
            container,
            _group: group_file,
            device,
            noiommu,
            config_offset: config.offset,
            bar: bar as *mut u8,
            bar_len,
            maps: Mutex::new((IOVA_START, Vec::new())),
        };
        // Memory space and bus mastering on (the device does DMA), legacy interrupts off (polled).
        let cmd = dev.config_read16(4)?;
        dev.config_write16(4, cmd | 0x2 | 0x4 | 0x400)?;
        Ok(dev)
    }

    fn config_read16(&self, off: u64) -> BlockResult<u16> {
        let mut b = [0u8; 2];
        self.device
            .read_exact_at(&mut b, self.config_offset + off)
            .map_err(|e| err(ErrorKind::Io, format!("reading PCI config space: {e}")))?;
        Ok(u16::from_le_bytes(b))
    }

    fn config_write16(&self, off: u64, v: u16) -> BlockResult<()> {
        self.device
            .write_all_at(&v.to_le_bytes(), self.config_offset + off)
            .map_err(|e| err(ErrorKind::Io, format!("writing PCI config space: {e}")))
    }

    /// Read the 32-bit register at `off` of BAR 0.
    #[inline]
    pub(crate) fn read32(&self, off: usize) -> u32 {
        assert!(off + 4 <= self.bar_len && off.is_multiple_of(4), "register offset inside BAR 0");
        // SAFETY: inside the mapped BAR, aligned; MMIO needs a volatile access.
        unsafe { std::ptr::read_volatile(self.bar.add(off) as *const u32) }
    }

    /// Write the 32-bit register at `off` of BAR 0.
    #[inline]
    pub(crate) fn write32(&self, off: usize, v: u32) {
        assert!(off + 4 <= self.bar_len && off.is_multiple_of(4), "register offset inside BAR 0");
        // SAFETY: inside the mapped BAR, aligned; MMIO needs a volatile access.
        unsafe { std::ptr::write_volatile(self.bar.add(off) as *mut u32, v) }
    }

    /// Read a 64-bit register as two 32-bit halves (low first), which every controller accepts.
    pub(crate) fn read64(&self, off: usize) -> u64 {
        u64::from(self.read32(off)) | (u64::from(self.read32(off + 4)) << 32)
    }

    /// Write a 64-bit register as two 32-bit halves (low first).
    pub(crate) fn write64(&self, off: usize, v: u64) {
        self.write32(off, v as u32);
        self.write32(off + 4, (v >> 32) as u32);
    }

    /// Length of BAR 0.
    pub(crate) fn bar_len(&self) -> usize {
        self.bar_len
    }

    /// Make `mem` reachable by the device (once: a region already mapped is found again) and
    /// return how its addresses translate.
    pub(crate) fn map(&self, mem: Box<dyn DmaMemory>) -> BlockResult<DmaRegion> {
        let (base, len) = mem.region();
        let (base, len) = (base as usize, len);
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = maps.1.iter().find(|m| m.region.base == base && m.region.len == len) {
            return Ok(m.region.clone());
        }
        if !base.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
            return Err(err(ErrorKind::InvalidOption, "DMA memory must be page-aligned".into()));
        }
        let tr = if self.noiommu {
            Translation::Phys(physical_pages(base, len)?.into())
        } else {
            let iova = maps.0;
            if iova + len as u64 > IOVA_END {
                return Err(err(ErrorKind::Io, "VFIO: IOVA space used up".into()));
            }
            let mut m = vb::vfio_iommu_type1_dma_map {
                argsz: std::mem::size_of::<vb::vfio_iommu_type1_dma_map>() as u32,
                flags: vb::VFIO_DMA_MAP_FLAG_READ | vb::VFIO_DMA_MAP_FLAG_WRITE,
                vaddr: base as u64,
                iova,
                size: len as u64,
            };
            ioctl(&self.container, VFIO_IOMMU_MAP_DMA, &mut m as *mut _ as libc::c_ulong)
                .map_err(|e| err(ErrorKind::Io, format!("VFIO_IOMMU_MAP_DMA of {len} bytes: {e}")))?;
            // Keep a guard page between mappings so an overrun faults in the IOMMU.
            maps.0 = iova + len as u64 + PAGE as u64;
            Translation::Iova(iova)
        };
        let region = DmaRegion { base, len, tr };
        maps.1.push(Mapping { region: region.clone(), _mem: mem });
        Ok(region)
    }
}

impl VfioDevice {
    /// Whether the device has no IOMMU (it is given physical addresses).
    pub(crate) fn noiommu(&self) -> bool {
        self.noiommu
    }

    /// Undo the mapping of the region at `base` (the device must no longer use it) and let go
    /// of the memory. IOVAs are not reused: the space (4 GiB to 512 GiB) outlasts any
    /// realistic number of queue creations.
    pub(crate) fn unmap(&self, base: usize) {
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        let Some(i) = maps.1.iter().position(|m| m.region.base == base) else { return };
        let m = maps.1.swap_remove(i);
        drop(maps);
        if let Translation::Iova(iova) = m.region.tr {
            self.unmap_iova(iova, m.region.len);
        }
    }

    fn unmap_iova(&self, iova: u64, len: usize) {
        let mut u = vb::vfio_iommu_type1_dma_unmap {
            argsz: std::mem::size_of::<vb::vfio_iommu_type1_dma_unmap>() as u32,
            flags: 0,
            iova,
            size: len as u64,
            ..Default::default()
        };
        let _ = ioctl(&self.container, VFIO_IOMMU_UNMAP_DMA, &mut u as *mut _ as libc::c_ulong);
    }
}

impl Drop for VfioDevice {
    fn drop(&mut self) {
        let maps = std::mem::take(&mut self.maps.get_mut().unwrap_or_else(|p| p.into_inner()).1);
        for m in &maps {
            if let Translation::Iova(iova) = m.region.tr {
                self.unmap_iova(iova, m.region.len);
            }
        }
        // SAFETY: unmapping the BAR mapped in `open`, which nothing uses any more.
        unsafe { libc::munmap(self.bar as *mut libc::c_void, self.bar_len) };
        // The memory is released only now, after the device can no longer reach it.
        drop(maps);
    }
}

fn region_info(device: &File, index: u32) -> BlockResult<vb::vfio_region_info> {
    let mut r = vb::vfio_region_info { argsz: std::mem::size_of::<vb::vfio_region_info>() as u32, index, ..Default::default() };
    ioctl(device, VFIO_DEVICE_GET_REGION_INFO, &mut r as *mut _ as libc::c_ulong)
        .map_err(|e| err(ErrorKind::Io, format!("VFIO region {index}: {e}")))?;
    Ok(r)
}

/// Physical address of every 4 KiB page of `base..base+len` from /proc/self/pagemap (present
/// pages only: the memory must be populated and locked; reading PFNs needs CAP_SYS_ADMIN).
fn physical_pages(base: usize, len: usize) -> BlockResult<Vec<u64>> {
    let f = File::open("/proc/self/pagemap").map_err(|e| err(ErrorKind::Io, format!("/proc/self/pagemap: {e}")))?;
    let n = len / PAGE;
    let mut raw = vec![0u8; n * 8];
    f.read_exact_at(&mut raw, (base / PAGE * 8) as u64).map_err(|e| err(ErrorKind::Io, format!("/proc/self/pagemap: {e}")))?;
    let mut out = Vec::with_capacity(n);
    for (i, c) in raw.chunks_exact(8).enumerate() {
        let e = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        let pfn = e & ((1 << 55) - 1);
        if e >> 63 == 0 || pfn == 0 {
            return Err(err(
                ErrorKind::Io,
                format!("no physical address for DMA page {i} (memory not locked, or no CAP_SYS_ADMIN to read pagemap)"),
            ));
        }
        out.push(pfn * PAGE as u64);
    }
    Ok(out)
}

/// Memory owned by the driver (queues, PRP lists), populated, locked and zero-filled: on
/// hugepages for a device without an IOMMU (it is given physical addresses, and the kernel may
/// migrate ordinary pages, locked or not, under compaction), else anonymous pages.
pub(crate) struct DmaAlloc {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain memory owned by this value; users synchronise access through the queue's own
// discipline (a queue is used on one reactor; the admin queue is behind a mutex).
unsafe impl Send for DmaAlloc {}
// SAFETY: as above.
unsafe impl Sync for DmaAlloc {}

/// What no-IOMMU mode needs, for errors.
pub(crate) const NOIOMMU_HUGEPAGES: &str = "VFIO no-IOMMU mode gives the device physical addresses, which only hugepages \
     keep in place: reserve hugepages (echo N > /proc/sys/vm/nr_hugepages)";

impl DmaAlloc {
    /// `len` bytes (rounded up to pages, or to 2 MiB on `hugepages`), locked in memory.
    pub(crate) fn new(len: usize, hugepages: bool) -> BlockResult<DmaAlloc> {
        let huge = 2 << 20;
        let len = if hugepages { len.next_multiple_of(huge) } else { len.next_multiple_of(PAGE) };
        let flags = libc::MAP_PRIVATE
            | libc::MAP_ANONYMOUS
            | libc::MAP_POPULATE
            | if hugepages { libc::MAP_HUGETLB | libc::MAP_HUGE_2MB } else { 0 };
        // SAFETY: a fresh private anonymous mapping; the result is checked.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
        if p == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            if hugepages {
                return Err(err(ErrorKind::Io, format!("{NOIOMMU_HUGEPAGES}: {e}")));
            }
            return Err(err(ErrorKind::Io, format!("DMA memory of {len} bytes: {e}")));
        }
        // SAFETY: locking the mapping just made; failure (RLIMIT_MEMLOCK) is reported.
        if unsafe { libc::mlock(p, len) } != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: unmapping what was mapped above.
            unsafe { libc::munmap(p, len) };
            return Err(err(ErrorKind::Io, format!("locking {len} bytes of DMA memory: {e}")));
        }
        Ok(DmaAlloc { ptr: p as *mut u8, len })
    }

    /// Base pointer.
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr
    }
}

impl DmaMemory for std::sync::Arc<DmaAlloc> {
    fn region(&self) -> (*mut u8, usize) {
        (self.ptr, self.len)
    }
}

impl Drop for DmaAlloc {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `new`; the device can no longer reach it (the
        // VFIO mapping holding it was undone first).
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_are_normalised() {
        assert_eq!(normalise_bdf("0000:06:0d.0").as_deref(), Some("0000:06:0d.0"));
        assert_eq!(normalise_bdf("06:0D.0").as_deref(), Some("0000:06:0d.0"));
        assert_eq!(normalise_bdf("1:2:3.4").as_deref(), Some("0001:02:03.4"));
        for bad in ["", "06:0d", "0000:06:20.0", "0000:06:0d.8", "x:06:0d.0", "0:0:0:0.0", "00:100:00.0"] {
            assert_eq!(normalise_bdf(bad), None, "{bad}");
        }
    }

    #[test]
    fn regions_translate_by_page() {
        let r = DmaRegion { base: 0x10000, len: 0x3000, tr: Translation::Phys(vec![0x5000, 0x9000, 0x2000].into()) };
        assert_eq!(r.bus(0x10010), 0x5010);
        assert_eq!(r.bus(0x11000), 0x9000);
        assert_eq!(r.bus(0x12fff), 0x2fff);
        assert!(r.contains(0x11000, 0x2000) && !r.contains(0x11000, 0x2001) && !r.contains(0xf000, 1));
        assert!(r.bus_contiguous(0x10010, 0xff0) && !r.bus_contiguous(0x10010, 0xff1));
        let c = DmaRegion { base: 0x10000, len: 0x3000, tr: Translation::Phys(vec![0x5000, 0x6000, 0x2000].into()) };
        assert!(c.bus_contiguous(0x10800, 0x1000) && !c.bus_contiguous(0x10800, 0x2000));
        let r = DmaRegion { base: 0x10000, len: 0x3000, tr: Translation::Iova(1 << 32) };
        assert_eq!(r.bus(0x12004), (1 << 32) + 0x2004);
    }
}
