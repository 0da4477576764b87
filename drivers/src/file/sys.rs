//! Thin, checked wrappers over the system calls the file and host_device drivers make outside
//! io_uring: open, size, O_DIRECT alignment, fallocate, lseek for holes, block-device ioctls.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt64(r: i64) -> io::Result<i64> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// open(2) with O_CLOEXEC.
pub(crate) fn open(path: &str, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let c = CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: c is a valid NUL-terminated path.
    let fd = cvt(unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, libc::c_uint::from(mode)) })?;
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: stat is plain old data.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and pointer.
    cvt(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

pub(crate) fn is_block_device(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFBLK
}

/// Size of a block device.
pub(crate) fn blkgetsize64(fd: RawFd) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes a u64 through the pointer.
    cvt(unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut size) })?;
    Ok(size)
}

/// Logical block size of a block device.
pub(crate) fn blksszget(fd: RawFd) -> io::Result<u32> {
    let mut sz: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes an int through the pointer.
    cvt(unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut sz) })?;
    Ok(sz.max(1) as u32)
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// BLKDISCARD or BLKZEROOUT on `off..off+len`.
pub(crate) fn blk_range_ioctl(fd: RawFd, zeroout: bool, off: u64, len: u64) -> io::Result<()> {
    let range = [off, len];
    let req = if zeroout { BLKZEROOUT } else { BLKDISCARD };
    // SAFETY: both ioctls read a [u64; 2] range through the pointer.
    cvt(unsafe { libc::ioctl(fd, req as _, range.as_ptr()) })?;
    Ok(())
}

/// The O_DIRECT offset alignment: statx's DIOALIGN when the kernel reports it, otherwise the
/// smallest of 512/4096 that a direct read accepts.
pub(crate) fn dio_alignment(fd: RawFd, blockdev: bool) -> u32 {
    if blockdev {
        if let Ok(s) = blksszget(fd) {
            return s;
        }
    }
    // SAFETY: statx is plain old data.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: valid fd, empty path with AT_EMPTY_PATH, valid statx pointer.
    let r = unsafe { libc::statx(fd, empty.as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx) };
    if r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align > 0 {
        return stx.stx_dio_offset_align.max(stx.stx_dio_mem_align);
    }
    let buf = basalt_reactor::IoBuf::heap(4096);
    for a in [512u32, 4096] {
        // SAFETY: reading at most `a` bytes into a 4096-byte aligned buffer we own.
        let r = unsafe { libc::pread(fd, buf.as_ptr() as *mut libc::c_void, a as usize, 0) };
        if r >= 0 {
            return a;
        }
    }
    4096
}

pub(crate) fn fallocate(fd: RawFd, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    cvt(unsafe { libc::fallocate(fd, mode, off as i64, len as i64) })?;
    Ok(())
}

pub(crate) fn ftruncate(fd: RawFd, size: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    cvt(unsafe { libc::ftruncate(fd, size as i64) })?;
    Ok(())
}

/// Write all of `data` at `off` (short writes continued; a write that moves nothing is an
/// error, not a loop).
pub(crate) fn pwrite_all(fd: RawFd, data: &[u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < data.len() {
        // SAFETY: writing from a valid slice.
        let n = unsafe { libc::pwrite(fd, data[done..].as_ptr().cast(), data.len() - done, (off + done as u64) as i64) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "the file takes no more data"));
        }
        done += n as usize;
    }
    Ok(())
}

/// Where data starts at or after `off` (`SEEK_DATA`), `None` past the last data.
pub(crate) fn seek_data(fd: RawFd, off: u64) -> io::Result<Option<u64>> {
    // SAFETY: plain syscall on a valid fd.
    match cvt64(unsafe { libc::lseek(fd, off as i64, libc::SEEK_DATA) }) {
        Ok(v) => Ok(Some(v as u64)),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Where the hole at or after `off` starts (`SEEK_HOLE`).
pub(crate) fn seek_hole(fd: RawFd, off: u64) -> io::Result<u64> {
    // SAFETY: plain syscall on a valid fd.
    cvt64(unsafe { libc::lseek(fd, off as i64, libc::SEEK_HOLE) }).map(|v| v as u64)
}

/// Size of what `fd` is: file length or block device size.
pub(crate) fn size_of(fd: &OwnedFd) -> io::Result<u64> {
    let st = fstat(fd.as_raw_fd())?;
    if is_block_device(&st) {
        blkgetsize64(fd.as_raw_fd())
    } else {
        Ok(st.st_size as u64)
    }
}
