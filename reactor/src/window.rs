//! File windows: buffers whose pages can be a file's own page-cache pages, mapped privately,
//! so that a bulk copy reads its source in place (scans it for zeroes and hands it to the
//! target's write) instead of copying it into a buffer first. A window is an [`crate::IoBuf`]
//! ([`crate::IoBuf::file_window`], [`crate::IoBuf::map_file`]).
//!
//! Guarantees:
//! - The file is never written through a window: pages are mapped `MAP_PRIVATE`, so a write to
//!   the buffer (which `IoBuf` allows) copies the page first and leaves the file alone.
//! - Reading a mapped page that has no data behind it (the file was cut short under the
//!   mapping, or the disk failed to read it) does not kill the process. The kernel reports that
//!   with `SIGBUS`; a handler installed with the first window replaces the page with a page of
//!   zeroes and flags the window ([`crate::IoBuf::take_map_fault`]), so the owner can read that
//!   range the ordinary way and report what that returns. A `SIGBUS` at any other address goes
//!   to the disposition that was there before (by default, the process ends as it would have).
//!   A program embedding Basalt that installs its own `SIGBUS` handler afterwards should pass
//!   faults it does not recognise on to the one it replaced, as this one does.
//!
//! memmap2 cannot place a mapping at a chosen address (`MAP_FIXED`), so this uses libc
//! directly. At most [`SLOTS`] windows exist at once (the handler looks them up in a fixed
//! table, without locks or allocation); past that, [`crate::IoBuf::file_window`] says no and
//! the caller reads as usual.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

/// Windows that may exist at once.
pub(crate) const SLOTS: usize = 64;
const PAGE: usize = 4096;

/// A live window's address range, and whether a page in it could not be read.
struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    fault: AtomicBool,
}

static GUARD: [Slot; SLOTS] =
    [const { Slot { start: AtomicUsize::new(0), end: AtomicUsize::new(0), fault: AtomicBool::new(false) } }; SLOTS];
static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// The `SIGBUS` disposition before ours.
static PREV: OnceLock<libc::sigaction> = OnceLock::new();

/// The handler: a fault inside a window gets a zero page and flags the window; any other is
/// passed to the previous disposition.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in &GUARD {
        let start = s.start.load(Ordering::Acquire);
        if start != 0 && addr >= start && addr < s.end.load(Ordering::Acquire) {
            let page = addr & !(PAGE - 1);
            // SAFETY: the page lies inside a window's reservation, which only its owner uses;
            // replacing it with anonymous memory keeps the range mapped. mmap is a plain system
            // call, safe to make from a signal handler.
            let r = unsafe {
                libc::mmap(
                    page as *mut libc::c_void,
                    PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if r != libc::MAP_FAILED {
                s.fault.store(true, Ordering::Release);
                return;
            }
        }
    }
    match PREV.get() {
        Some(p) if p.sa_sigaction != libc::SIG_DFL && p.sa_sigaction != libc::SIG_IGN => {
            if p.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed with SA_SIGINFO: this signature.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(p.sa_sigaction) };
                f(sig, info, ctx);
            } else {
                // SAFETY: installed without SA_SIGINFO: a one-argument handler.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(p.sa_sigaction) };
                f(sig);
            }
        }
        _ => {
            // Back to the default: returning re-runs the access, which then ends the process
            // with SIGBUS as if no handler had been there.
            // SAFETY: a zeroed sigaction with SIG_DFL is a valid disposition.
            unsafe {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
            }
        }
    }
}

/// Install the handler once; whether it is in place.
fn install() -> bool {
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction filled with our handler, flags and an empty mask; the old
        // disposition is written to a local.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut sa.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &sa, &mut old) == 0 {
                let _ = PREV.set(old);
                INSTALLED.store(true, Ordering::Release);
            }
        }
    });
    INSTALLED.load(Ordering::Acquire)
}

/// A reserved range of address space, registered with the guard; unmapped on drop.
pub(crate) struct Window {
    ptr: usize,
    len: usize,
    slot: usize,
}

impl Window {
    /// Reserve `len` bytes (rounded up to pages); `None` when the guard cannot be installed,
    /// every slot is taken, or the reservation fails.
    pub(crate) fn new(len: usize) -> Option<Window> {
        if !install() {
            return None;
        }
        let len = len.max(1).next_multiple_of(PAGE);
        // SAFETY: a fresh anonymous mapping at an address the kernel chooses.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        let ptr = p as usize;
        let Some(slot) = GUARD.iter().position(|s| s.start.compare_exchange(0, ptr, Ordering::AcqRel, Ordering::Relaxed).is_ok())
        else {
            // SAFETY: the mapping made above, not shared with anyone.
            unsafe { libc::munmap(p, len) };
            return None;
        };
        GUARD[slot].fault.store(false, Ordering::Relaxed);
        GUARD[slot].end.store(ptr + len, Ordering::Release);
        Some(Window { ptr, len, slot })
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr as *mut u8
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Map `len` bytes of `fd` from `off` at `at` of the window, privately. `at` and `off` must
    /// be page-aligned and the range inside the window; the last page may run past `len`.
    pub(crate) fn map(&self, at: usize, fd: RawFd, off: u64, len: usize) -> std::io::Result<()> {
        let span = len.next_multiple_of(PAGE);
        if !at.is_multiple_of(PAGE) || !off.is_multiple_of(PAGE as u64) || at.checked_add(span).is_none_or(|e| e > self.len) {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        let off = libc::off_t::try_from(off).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the target range lies inside our own reservation (checked above), which
        // MAP_FIXED replaces in place; nothing else lives there.
        let r = unsafe {
            libc::mmap(
                (self.ptr + at) as *mut libc::c_void,
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                fd,
                off,
            )
        };
        if r == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether a mapped page could not be read since the last call.
    pub(crate) fn take_fault(&self) -> bool {
        GUARD[self.slot].fault.swap(false, Ordering::AcqRel)
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        GUARD[self.slot].end.store(0, Ordering::Release);
        GUARD[self.slot].start.store(0, Ordering::Release);
        // SAFETY: our own reservation; no buffer refers to it any more (the IoBuf owning this
        // window is being dropped).
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use crate::IoBuf;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_window_reads_the_file_in_place_and_never_writes_it() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8 + 1).collect();
        f.write_all(&data).unwrap();
        let mut w = IoBuf::file_window(4 * 4096).unwrap();
        assert!(w.iter().all(|&b| b == 0), "an unmapped window reads as zeroes");
        // File pages 1..3 at window page 2 (the last page mapped runs past the 5000 bytes).
        w.map_file(2 * 4096, f.as_raw_fd(), 4096, 5000).unwrap();
        assert_eq!(&w[2 * 4096..4 * 4096], &data[4096..3 * 4096]);
        assert!(w[..2 * 4096].iter().all(|&b| b == 0));
        // Writing to the buffer copies the page: the file keeps its bytes.
        w[2 * 4096] = 0;
        let mut back = vec![0u8; data.len()];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, 0).unwrap();
        assert_eq!(back, data);
        assert!(!w.take_map_fault());
        // Misaligned requests and ordinary buffers are refused.
        assert!(w.map_file(100, f.as_raw_fd(), 0, 4096).is_err());
        assert!(w.map_file(0, f.as_raw_fd(), 512, 4096).is_err());
        assert!(w.map_file(4 * 4096, f.as_raw_fd(), 0, 4096).is_err(), "past the window");
        assert!(IoBuf::heap(8192).map_file(0, f.as_raw_fd(), 0, 4096).is_err());
    }

    #[test]
    fn a_page_cut_from_under_a_window_reads_as_zeroes_and_is_reported() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[0xa5; 3 * 4096]).unwrap();
        let mut w = IoBuf::file_window(3 * 4096).unwrap();
        w.map_file(0, f.as_raw_fd(), 0, 3 * 4096).unwrap();
        assert_eq!(w[0], 0xa5);
        f.set_len(4096).unwrap();
        // Page 2 has no file behind it any more: the access would raise SIGBUS.
        let v = std::hint::black_box(&w[2 * 4096..])[10];
        assert_eq!(v, 0, "the lost page reads as zeroes");
        assert!(w.take_map_fault(), "the window reports the lost page");
        assert!(!w.take_map_fault(), "the report is taken once");
        assert_eq!(w[0], 0xa5, "pages still backed keep their bytes");
    }

    #[test]
    fn windows_are_given_back() {
        // More windows over time than the table holds at once: each frees its slot on drop.
        for _ in 0..3 * super::SLOTS {
            let w = IoBuf::file_window(8192).expect("a free slot");
            drop(w);
        }
    }
}
