//! Owned, aligned I/O buffers and the per-core DMA buffer pool they come from.
//!
//! An [`IoBuf`] owns its memory: a request hands it to a driver and gets it back with the
//! completion, so the kernel or a device never writes into memory that was freed under it.
//! Every buffer is aligned to [`IOBUF_ALIGN`] (4 KiB), which satisfies O_DIRECT and NVMe PRPs.
//!
//! A [`DmaPool`] is one pinned region per reactor: hugepage-backed when hugepages are reserved,
//! anonymous memory otherwise. It is registered with that reactor's io_uring as fixed buffer 0,
//! so reads and writes into it use `READ_FIXED`/`WRITE_FIXED`. It hands out power-of-two chunks
//! from 4 KiB to 2 MiB through lock-free free lists (`ArrayQueue`), so a buffer may be dropped on
//! any thread and taking or returning one never allocates. When the pool is exhausted or a
//! request is larger, buffers fall back to aligned heap memory.
//!
//! A buffer has a window (`start..start+len`) inside its capacity, so a request can address a
//! part of a buffer without copying ([`IoBuf::slice`]) and the owner can widen it again.
//!
//! A buffer can also be a file window ([`IoBuf::file_window`], [`crate::window`]), whose pages
//! are mapped from a file, so a copy reads its source in place.

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;

/// Alignment of every buffer: enough for O_DIRECT on 4 KiB-sector devices and NVMe PRPs.
pub const IOBUF_ALIGN: usize = 4096;

const MIN_CLASS_SHIFT: u32 = 12; // 4 KiB
const MAX_CLASS_SHIFT: u32 = 21; // 2 MiB

/// Where a buffer's memory came from.
enum Origin {
    Heap,
    Pool(Arc<PoolShared>),
    /// A file window ([`crate::window`]): unmapped when the buffer goes.
    Window(crate::window::Window),
}

/// An owned, 4 KiB-aligned buffer with a window over its capacity.
pub struct IoBuf {
    ptr: NonNull<u8>,
    cap: usize,
    start: usize,
    len: usize,
    origin: Origin,
}

// SAFETY: an IoBuf exclusively owns its memory (heap, a pool chunk handed out once, or a file
// window's reservation); moving it to another thread moves that ownership. The pool's shared
// state is itself Sync, and a window's guard slot is atomics.
unsafe impl Send for IoBuf {}

// SAFETY: a shared `&IoBuf` only reads (its bytes, window and pointer); every mutation takes
// `&mut self`. So threads may read one buffer at once, e.g. compression jobs each reading one
// cluster of a write in place.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes from this thread's reactor pool, or the heap.
    pub fn new(len: usize) -> IoBuf {
        let mut b = Self::new_uninit(len);
        b.as_mut_slice().fill(0);
        b
    }

    /// A buffer of `len` bytes whose contents are unspecified (but initialised memory).
    pub fn new_uninit(len: usize) -> IoBuf {
        if let Some(b) = crate::reactor::current_pool().and_then(|p| p.take(len)) {
            return b;
        }
        Self::heap(len)
    }

    /// A buffer from aligned heap memory, never from a pool.
    pub fn heap(len: usize) -> IoBuf {
        let cap = len.max(1).next_multiple_of(IOBUF_ALIGN);
        let layout = Layout::from_size_align(cap, IOBUF_ALIGN).expect("buffer layout");
        // SAFETY: layout has non-zero size. Zeroed so that every byte is initialised.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        IoBuf { ptr, cap, start: 0, len, origin: Origin::Heap }
    }

    /// A file window of `len` bytes: zeroes until [`IoBuf::map_file`] puts a file's pages in
    /// it (see [`crate::window`]). `None` when no window can be made; read into an ordinary
    /// buffer then.
    pub fn file_window(len: usize) -> Option<IoBuf> {
        let w = crate::window::Window::new(len)?;
        let ptr = NonNull::new(w.ptr())?;
        Some(IoBuf { ptr, cap: w.len(), start: 0, len, origin: Origin::Window(w) })
    }

    /// Make bytes `at..at+len` of this file window's allocation the file's bytes from `off`,
    /// read in place (mapped privately: writing to them never reaches the file). `at` and `off`
    /// must be multiples of 4096; the last page mapped may reach past `len`, so a range mapped
    /// before inside that page is replaced. Fails on a buffer that is not a file window.
    pub fn map_file(&mut self, at: usize, fd: std::os::fd::RawFd, off: u64, len: usize) -> std::io::Result<()> {
        match &self.origin {
            Origin::Window(w) => w.map(at, fd, off, len),
            _ => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    /// Whether a page of this file window could not be read since the last call (the file
    /// was cut short under it, or the disk failed): that page reads as zeroes, and what it
    /// held must be read the ordinary way. Always false for other buffers.
    pub fn take_map_fault(&self) -> bool {
        match &self.origin {
            Origin::Window(w) => w.take_fault(),
            _ => false,
        }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> IoBuf {
        let mut b = Self::new_uninit(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    /// Length of the window.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Total usable bytes of the allocation.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Start of the window inside the allocation.
    pub fn window_start(&self) -> usize {
        self.start
    }

    /// Narrow or move the window to `start..start+len` of the allocation.
    ///
    /// Panics if the window does not fit: a programming error, not input-dependent.
    pub fn set_window(&mut self, start: usize, len: usize) {
        assert!(start.checked_add(len).is_some_and(|e| e <= self.cap), "IoBuf window out of range");
        self.start = start;
        self.len = len;
    }

    /// Narrow the window relative to the current one.
    pub fn slice(&mut self, at: usize, len: usize) {
        self.set_window(self.start + at, len);
    }

    /// Set the window to the whole allocation's first `len` bytes.
    pub fn reset(&mut self, len: usize) {
        self.set_window(0, len);
    }

    /// Pointer to the window's first byte.
    pub fn as_ptr(&self) -> *const u8 {
        // SAFETY: start <= cap, inside the allocation.
        unsafe { self.ptr.as_ptr().add(self.start) }
    }

    /// Mutable pointer to the window's first byte.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        // SAFETY: start <= cap, inside the allocation.
        unsafe { self.ptr.as_ptr().add(self.start) }
    }

    /// The window as a slice.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the window lies inside an initialised allocation we own.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    /// The window as a mutable slice.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the window lies inside an initialised allocation we own exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr(), self.len) }
    }

    /// The fixed-buffer index of this buffer in the io_uring of reactor `reactor`, if it belongs to
    /// that reactor's registered pool.
    pub fn fixed_index(&self, reactor: u16) -> Option<u16> {
        match &self.origin {
            Origin::Pool(p) if p.registered_in == Some(reactor) => Some(0),
            _ => None,
        }
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf").field("cap", &self.cap).field("start", &self.start).field("len", &self.len).finish()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        match &self.origin {
            Origin::Heap => {
                let layout = Layout::from_size_align(self.cap, IOBUF_ALIGN).expect("buffer layout");
                // SAFETY: allocated in `heap` with exactly this layout.
                unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
            }
            Origin::Pool(p) => p.give_back(self.ptr, self.cap),
            // The window unmaps itself.
            Origin::Window(_) => {}
        }
    }
}

/// The memory behind a pool: hugepage or anonymous mapping.
struct PoolShared {
    map: memmap2::MmapMut,
    bump: AtomicUsize,
    free: Vec<ArrayQueue<usize>>,
    hugepages: bool,
    /// Reactor whose ring has this region registered as fixed buffer 0.
    registered_in: Option<u16>,
}

impl PoolShared {
    fn class_of(len: usize) -> Option<usize> {
        let size = len.max(1).next_power_of_two();
        let shift = size.trailing_zeros().max(MIN_CLASS_SHIFT);
        (shift <= MAX_CLASS_SHIFT).then(|| (shift - MIN_CLASS_SHIFT) as usize)
    }

    fn give_back(&self, ptr: NonNull<u8>, cap: usize) {
        let class = Self::class_of(cap).expect("pool chunk has a class");
        let off = ptr.as_ptr() as usize - self.map.as_ptr() as usize;
        // Capacity is sized so every chunk the region can hold fits; a push cannot fail.
        let _ = self.free[class].push(off);
    }
}

/// A per-core region of pinned memory handing out aligned [`IoBuf`]s.
#[derive(Clone)]
pub struct DmaPool {
    shared: Arc<PoolShared>,
}

impl DmaPool {
    /// Map a pool of `size` bytes. Hugepages are used when `/proc/meminfo` shows free ones and
    /// `try_hugepages` is set. The memory is locked (`mlock`) when the limit allows.
    pub fn new(size: usize, try_hugepages: bool) -> std::io::Result<DmaPool> {
        Self::with_registration(size, try_hugepages, None)
    }

    pub(crate) fn with_registration(size: usize, try_hugepages: bool, reactor: Option<u16>) -> std::io::Result<DmaPool> {
        let size = size.next_multiple_of(1 << MAX_CLASS_SHIFT);
        let mut hugepages = false;
        let mut map = None;
        if try_hugepages && free_hugepages() * (2 << 20) >= size {
            if let Ok(m) = memmap2::MmapOptions::new().len(size).huge(Some(21)).populate().map_anon() {
                map = Some(m);
                hugepages = true;
            }
        }
        let map = match map {
            Some(m) => m,
            None => memmap2::MmapOptions::new().len(size).populate().map_anon()?,
        };
        // Pinning is best effort: RLIMIT_MEMLOCK may forbid it; io_uring registration pins anyway.
        let _ = map.lock();
        let free = (MIN_CLASS_SHIFT..=MAX_CLASS_SHIFT).map(|s| ArrayQueue::new((size >> s).max(1))).collect();
        Ok(DmaPool { shared: Arc::new(PoolShared { map, bump: AtomicUsize::new(0), free, hugepages, registered_in: reactor }) })
    }

    /// Whether the region is hugepage-backed.
    pub fn hugepages(&self) -> bool {
        self.shared.hugepages
    }

    /// Size of the region in bytes.
    pub fn size(&self) -> usize {
        self.shared.map.len()
    }

    /// Base address and length, for registration with io_uring or a VFIO IOMMU.
    pub fn region(&self) -> (*mut u8, usize) {
        (self.shared.map.as_ptr() as *mut u8, self.shared.map.len())
    }

    /// A buffer of `len` bytes (contents unspecified), or `None` if the class is exhausted or too
    /// large for the pool.
    pub fn take(&self, len: usize) -> Option<IoBuf> {
        let class = PoolShared::class_of(len)?;
        let chunk = 1usize << (class as u32 + MIN_CLASS_SHIFT);
        let s = &self.shared;
        let off = match s.free[class].pop() {
            Some(off) => off,
            None => {
                // Carve a new chunk, aligned to its own size, from the untouched part.
                let mut cur = s.bump.load(Ordering::Relaxed);
                loop {
                    let start = cur.next_multiple_of(chunk);
                    let end = start.checked_add(chunk)?;
                    if end > s.map.len() {
                        return None;
                    }
                    match s.bump.compare_exchange_weak(cur, end, Ordering::AcqRel, Ordering::Relaxed) {
                        Ok(_) => break start,
                        Err(now) => cur = now,
                    }
                }
            }
        };
        // SAFETY: off + chunk <= map.len(), inside the mapping, which lives as long as the Arc.
        let ptr = unsafe { NonNull::new_unchecked((s.map.as_ptr() as *mut u8).add(off)) };
        Some(IoBuf { ptr, cap: chunk, start: 0, len, origin: Origin::Pool(self.shared.clone()) })
    }
}

fn free_hugepages() -> usize {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("HugePages_Free:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_buffers_are_aligned_and_windowed() {
        let mut b = IoBuf::heap(5000);
        assert_eq!(b.as_ptr() as usize % IOBUF_ALIGN, 0);
        assert_eq!(b.capacity(), 8192);
        b.as_mut_slice()[4999] = 7;
        b.slice(4096, 904);
        assert_eq!(b[903], 7);
        b.reset(5000);
        assert_eq!(b.len(), 5000);
    }

    #[test]
    fn pool_reuses_chunks_across_threads() {
        let pool = DmaPool::new(4 << 20, false).unwrap();
        let a = pool.take(4096).unwrap();
        let addr = a.as_ptr() as usize;
        std::thread::spawn(move || drop(a)).join().unwrap();
        let b = pool.take(3000).unwrap();
        assert_eq!(b.as_ptr() as usize, addr);
        assert!(pool.take(4 << 20).is_none(), "larger than the largest class");
        let big: Vec<_> = (0..2).map(|_| pool.take(2 << 20)).collect();
        assert!(big[0].is_some());
        // 4 MiB region: one 4 KiB chunk carved, so only one 2 MiB chunk fits after it.
        assert!(big[1].is_none());
    }
}
