//! Zero-copy sends: a read reply's data goes from the page cache to a plain socket with
//! sendfile(2), which hands the kernel references to the cached pages instead of copying them
//! into a buffer and again into the socket. The server's side of NBD uses it for large reads of
//! an export whose bytes lie verbatim in a host file ([`basalt_engine::HostExtent`]).
//!
//! sendfile runs on the reactor, so it must not wait:
//! - not for the socket: for the length of the call the socket is made non-blocking, and when
//!   it has no room the wait goes through the ring (a poll). The ring's own reads and writes on
//!   the socket may see EAGAIN meanwhile; [`super::sock`] then polls and retries.
//! - not for the disk: a step is sent this way only when cachestat(2) says every page of it is
//!   in the page cache. Otherwise (or on a kernel without cachestat) the step is read through
//!   the ring and written, as a copying server does.
//!
//! Bytes the file no longer holds (it shrank while being served) go as zeroes, so the reply
//! keeps the length its header announced and the stream stays in step. A read error of the
//! file, once the header has gone, can no longer be told to the client as an error reply: it
//! ends the connection (the copying path, which reads before it sends, answers EIO instead).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use basalt_engine::HostExtent;
use basalt_reactor::IoBuf;

use super::sock::Sock;

/// What one step carries at most.
const STEP: u64 = 1 << 20;
/// cachestat(2)'s number, the same on every architecture (the generic syscall table).
const SYS_CACHESTAT: libc::c_long = 451;

/// cachestat(2)'s range and answer.
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Set when the kernel has no cachestat: every step is then copied.
static NO_CACHESTAT: AtomicBool = AtomicBool::new(false);

/// Whether every page of `off..off+len` of `fd` is in the page cache.
fn cached(fd: RawFd, off: u64, len: u64) -> bool {
    if NO_CACHESTAT.load(Ordering::Relaxed) || len == 0 {
        return false;
    }
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let pages = (off + len).div_ceil(page) - off / page;
    let range = CachestatRange { off, len };
    let mut st = Cachestat::default();
    // SAFETY: cachestat reads the range and writes the answer, both locals of the declared
    // layout; `fd` is open (the caller holds it).
    let r = unsafe {
        libc::syscall(SYS_CACHESTAT, fd as libc::c_uint, &range as *const CachestatRange, &mut st as *mut Cachestat, 0u32)
    };
    if r != 0 {
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
            NO_CACHESTAT.store(true, Ordering::Relaxed);
        }
        return false;
    }
    st.nr_cache >= pages
}

/// Set or clear O_NONBLOCK on `fd`.
fn set_nonblocking(fd: RawFd, on: bool) -> std::io::Result<()> {
    // SAFETY: fcntl on an open descriptor.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if fl < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let want = if on { fl | libc::O_NONBLOCK } else { fl & !libc::O_NONBLOCK };
    // SAFETY: as above.
    if want != fl && unsafe { libc::fcntl(fd, libc::F_SETFL, want) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// One sendfile(2) on `out` that waits for nothing; returns the count or a negative errno.
fn sendfile_now(out: RawFd, file: RawFd, off: u64, len: usize) -> std::io::Result<i64> {
    set_nonblocking(out, true)?;
    let mut o = off as libc::off_t;
    // SAFETY: sendfile between two open descriptors; `o` is a local the call updates.
    let r = unsafe { libc::sendfile(out, file, &mut o, len) };
    let r = if r < 0 { -i64::from(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)) } else { r as i64 };
    set_nonblocking(out, false)?;
    Ok(r)
}

/// Send `len` bytes of `ext`'s file, from its offset, on `sock` (a plain socket on a reactor
/// with a ring: [`Sock::can_send_file`]). An error means the socket failed and the stream is
/// no longer in step.
pub async fn send_file(sock: &Sock, ext: &HostExtent, len: u64) -> std::io::Result<()> {
    let out = sock.as_raw_fd();
    let file = ext.file.as_raw_fd();
    let mut done = 0u64;
    while done < len {
        let step = (len - done).min(STEP);
        let off = ext.offset + done;
        let res = if cached(file, off, step) {
            sendfile_now(out, file, off, step as usize)?
        } else {
            copy_step(sock, ext, off, step as usize).await?
        };
        match res {
            n if n > 0 => done += n as u64,
            0 => {
                // The file ended before the extent did: the rest reads as zeroes.
                return send_zeroes(sock, len - done).await;
            }
            e if e == -i64::from(libc::EAGAIN) || e == -i64::from(libc::EINTR) => {
                // No room: wait for it through the ring.
                let (r, _) = basalt_reactor::uring_poll(out, libc::POLLOUT as u32).await;
                if r < 0 {
                    return Err(std::io::Error::from_raw_os_error((-r) as i32));
                }
            }
            e => return Err(std::io::Error::from_raw_os_error((-e) as i32)),
        }
    }
    Ok(())
}

/// Read up to `step` bytes of the file at `off` through the ring and send them; returns the
/// count sent (0 at the file's end) or a negative errno from the read.
async fn copy_step(sock: &Sock, ext: &HostExtent, off: u64, step: usize) -> std::io::Result<i64> {
    let fd = basalt_reactor::UringFd::Raw(ext.file.as_raw_fd());
    let (n, buf) = basalt_reactor::uring_rw(fd, false, IoBuf::new_uninit(step), off).await;
    let mut buf = buf.expect("a read returns its buffer");
    if n <= 0 {
        return Ok(n);
    }
    buf.reset(n as usize);
    sock.write_all(buf).await?;
    Ok(n)
}

async fn send_zeroes(sock: &Sock, mut left: u64) -> std::io::Result<()> {
    let chunk = left.min(STEP) as usize;
    let mut z = IoBuf::new(chunk);
    while left > 0 {
        let n = left.min(chunk as u64) as usize;
        z.reset(n);
        z = sock.write_all(z).await?;
        left -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    fn temp_file(data: &[u8]) -> std::fs::File {
        let p = std::env::temp_dir().join(format!("basalt-sendfile-{}-{:?}", std::process::id(), std::thread::current().id()));
        let mut f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
        f
    }

    /// Send `len` bytes of `file` from `off` through a socket pair on a reactor; the peer
    /// starts reading after `delay`. Returns what it read.
    fn send_through_socket(file: Arc<std::fs::File>, off: u64, len: u64, delay: std::time::Duration) -> Vec<u8> {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        // A small send buffer, so a large send waits for room (and polls for it).
        let small: libc::c_int = 16 << 10;
        // SAFETY: setsockopt on an open socket with an int of the size given.
        unsafe {
            libc::setsockopt(
                ours.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&small as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        let reader = std::thread::spawn(move || {
            std::thread::sleep(delay);
            let mut got = vec![0u8; len as usize];
            theirs.read_exact(&mut got).unwrap();
            got
        });
        let rt = basalt_reactor::Runtime::single().unwrap();
        // SAFETY: the descriptor is moved out of `ours`, which no longer owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(ours)) };
        rt.block_on(0, move || async move {
            let sock = Sock::new(fd);
            assert!(sock.can_send_file(), "the test reactor has a ring");
            let ext = HostExtent { file, offset: off };
            send_file(&sock, &ext, len).await.unwrap();
        });
        reader.join().unwrap()
    }

    #[test]
    fn cached_and_uncached_data_arrive_whole() {
        let data = pattern((3 << 20) + 1000);
        let file = Arc::new(temp_file(&data));
        let fd = file.as_raw_fd();
        let (off, len) = (5000u64, (2 << 20) + 777u64);
        // Just written: in the page cache, so sendfile sends it.
        assert!(cached(fd, off, len), "written pages are cached");
        let got = send_through_socket(file.clone(), off, len, std::time::Duration::from_millis(100));
        assert!(got == data[off as usize..(off + len) as usize], "cached data differs");
        // Dropped from the cache (the pages are clean): copied through the ring instead.
        // SAFETY: fadvise on an open descriptor.
        unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert!(!cached(fd, off, len), "the pages were dropped");
        let got = send_through_socket(file.clone(), off, len, std::time::Duration::ZERO);
        assert!(got == data[off as usize..(off + len) as usize], "uncached data differs");
    }

    #[test]
    fn a_file_that_shrank_sends_zeroes_for_the_rest() {
        let data = pattern(1 << 20);
        let file = Arc::new(temp_file(&data));
        file.set_len(300_000).unwrap();
        let got = send_through_socket(file, 100_000, 600_000, std::time::Duration::ZERO);
        assert_eq!(got.len(), 600_000);
        assert!(got[..200_000] == data[100_000..300_000], "the bytes the file still holds");
        assert!(got[200_000..].iter().all(|&b| b == 0), "zeroes past the file's end");
    }
}
