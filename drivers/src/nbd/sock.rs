//! A connected socket read and written from a reactor task: through the reactor's io_uring
//! (plain reads and writes on the descriptor), or through its blocking thread pool when the
//! reactor has no ring. Short reads and writes are continued; end of stream mid-message is an
//! error. Buffers are owned [`IoBuf`]s, parked in the reactor's slot until the operation ends.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use basalt_reactor::{IoBuf, UringFd};

/// A connected stream socket.
pub struct Sock {
    fd: OwnedFd,
    uring: bool,
}

fn io_err(res: i64) -> std::io::Error {
    std::io::Error::from_raw_os_error((-res) as i32)
}

impl AsRawFd for Sock {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Sock {
    /// Wrap a connected socket (blocking mode).
    pub fn new(fd: OwnedFd) -> Sock {
        Sock { fd, uring: basalt_reactor::uring_features().is_some() }
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// One read or write of `buf`'s window; returns the count (0 = end of stream).
    pub(crate) async fn once(&self, write: bool, buf: IoBuf) -> (i64, IoBuf) {
        let (res, buf) = if self.uring {
            basalt_reactor::uring_rw(UringFd::Raw(self.raw()), write, buf, 0).await
        } else {
            let fd = self.raw();
            let (ptr, len) = (buf.as_ptr() as usize, buf.len());
            basalt_reactor::blocking(
                move || {
                    // SAFETY: the buffer is parked in the slot until this job's result is
                    // delivered, so `ptr..ptr+len` stays valid and unused meanwhile; `fd` is
                    // kept open by the awaiting `Sock`.
                    let r = unsafe {
                        if write {
                            libc::write(fd, ptr as *const libc::c_void, len)
                        } else {
                            libc::read(fd, ptr as *mut libc::c_void, len)
                        }
                    };
                    if r < 0 {
                        -i64::from(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
                    } else {
                        r as i64
                    }
                },
                Some(buf),
            )
            .await
        };
        (res, buf.expect("socket I/O returns its buffer"))
    }

    /// Transfer all of `buf`'s window, continuing short reads and writes; stops early only
    /// where the stream ends (a read of 0, a write of 0), and says how far it got. The buffer
    /// comes back in every case.
    async fn transfer(&self, write: bool, mut buf: IoBuf) -> (std::io::Result<usize>, IoBuf) {
        let (start, len) = (buf.window_start(), buf.len());
        let mut done = 0;
        let mut res = Ok(());
        while done < len {
            buf.set_window(start + done, len - done);
            let (r, b) = self.once(write, buf).await;
            buf = b;
            match r {
                r if r < 0 && -r == i64::from(libc::EINTR) => continue,
                r if r < 0 => {
                    res = Err(io_err(r));
                    break;
                }
                0 => break,
                n => done += n as usize,
            }
        }
        buf.set_window(start, len);
        (res.map(|_| done), buf)
    }

    /// Fill `buf`'s window, handing the buffer back whatever happens: `Ok(true)` when full,
    /// `Ok(false)` when the stream ended before the first byte, an error when it ended (or
    /// failed) in the middle.
    pub async fn fill(&self, buf: IoBuf) -> (std::io::Result<bool>, IoBuf) {
        let len = buf.len();
        let (r, buf) = self.transfer(false, buf).await;
        let r = match r {
            Ok(d) if d == len => Ok(true),
            Ok(0) => Ok(false),
            Ok(_) => Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed mid-message")),
            Err(e) => Err(e),
        };
        (r, buf)
    }

    /// Send all of `buf`'s window, handing the buffer back whatever happens.
    pub async fn send(&self, buf: IoBuf) -> (std::io::Result<()>, IoBuf) {
        let len = buf.len();
        let (r, buf) = self.transfer(true, buf).await;
        let r = match r {
            Ok(d) if d == len => Ok(()),
            Ok(_) => Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "socket accepts no more data")),
            Err(e) => Err(e),
        };
        (r, buf)
    }

    /// Fill `buf`'s window. `Ok(None)` when the stream ends before the first byte (a clean
    /// close between messages); an error when it ends in the middle.
    pub async fn read_exact(&self, buf: IoBuf) -> std::io::Result<Option<IoBuf>> {
        match self.fill(buf).await {
            (Ok(true), b) => Ok(Some(b)),
            (Ok(false), _) => Ok(None),
            (Err(e), _) => Err(e),
        }
    }

    /// Read exactly `n` bytes into a new buffer (an error on end of stream).
    pub async fn read_bytes(&self, n: usize) -> std::io::Result<IoBuf> {
        self.read_exact(IoBuf::new_uninit(n))
            .await?
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"))
    }

    /// Write all of `buf`'s window, and hand the buffer back.
    pub async fn write_all(&self, buf: IoBuf) -> std::io::Result<IoBuf> {
        match self.send(buf).await {
            (Ok(()), b) => Ok(b),
            (Err(e), _) => Err(e),
        }
    }

    /// Write `data` (copied into a buffer).
    pub async fn write_bytes(&self, data: &[u8]) -> std::io::Result<()> {
        self.write_all(IoBuf::from_slice(data)).await.map(|_| ())
    }
}

/// A receive buffer over a socket: one read takes whatever has arrived (up to the buffer's
/// size), and messages are handed out of it, so a burst of small requests costs one read
/// rather than one each.
pub struct RecvBuf {
    buf: Option<IoBuf>,
    head: usize,
    tail: usize,
    size: usize,
}

impl RecvBuf {
    /// A buffer of `size` bytes.
    pub fn new(size: usize) -> RecvBuf {
        RecvBuf { buf: Some(IoBuf::new_uninit(size)), head: 0, tail: 0, size }
    }

    /// Bytes buffered and not yet handed out.
    pub fn buffered(&self) -> usize {
        self.tail - self.head
    }

    fn bytes(&self) -> &[u8] {
        self.buf.as_ref().expect("receive buffer present").as_slice()
    }

    /// Make `n` bytes (at most the buffer's size) available. `Ok(false)` when the stream ended
    /// cleanly before the first of them; an error when it ended in the middle.
    pub async fn fill(&mut self, sock: &Sock, n: usize) -> std::io::Result<bool> {
        assert!(n <= self.size, "message larger than the receive buffer");
        if self.buffered() >= n {
            return Ok(true);
        }
        if self.head + n > self.size {
            let (h, t) = (self.head, self.tail);
            let b = self.buf.as_mut().expect("receive buffer present");
            b.as_mut_slice().copy_within(h..t, 0);
            (self.head, self.tail) = (0, t - h);
        }
        while self.buffered() < n {
            let mut b = self.buf.take().ok_or_else(|| std::io::Error::other("receive buffer lost"))?;
            b.set_window(self.tail, self.size - self.tail);
            let (r, mut b) = sock.once(false, b).await;
            b.set_window(0, self.size);
            self.buf = Some(b);
            match r {
                r if r < 0 && -r == i64::from(libc::EINTR) => continue,
                r if r < 0 => return Err(io_err(r)),
                0 if self.buffered() == 0 => return Ok(false),
                0 => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed mid-message")),
                r => self.tail += r as usize,
            }
        }
        Ok(true)
    }

    /// The next `n` buffered bytes (after [`RecvBuf::fill`]).
    pub fn peek(&self, n: usize) -> &[u8] {
        &self.bytes()[self.head..self.head + n]
    }

    /// Hand out `n` bytes.
    pub fn consume(&mut self, n: usize) {
        assert!(n <= self.buffered());
        self.head += n;
        if self.head == self.tail {
            (self.head, self.tail) = (0, 0);
        }
    }

    /// Fill `buf`'s window: what is buffered first, the rest straight from the socket (no
    /// copy for large payloads). The buffer comes back whatever happens.
    pub async fn read_into(&mut self, sock: &Sock, mut buf: IoBuf) -> (std::io::Result<()>, IoBuf) {
        let (start, len) = (buf.window_start(), buf.len());
        let have = self.buffered().min(len);
        buf.as_mut_slice()[..have].copy_from_slice(&self.bytes()[self.head..self.head + have]);
        self.consume(have);
        if have == len {
            return (Ok(()), buf);
        }
        buf.set_window(start + have, len - have);
        let (r, mut buf) = sock.fill(buf).await;
        buf.set_window(start, len);
        let r = match r {
            Ok(true) => Ok(()),
            Ok(false) => Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed mid-message")),
            Err(e) => Err(e),
        };
        (r, buf)
    }
}
