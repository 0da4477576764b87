//! A connected socket read and written from a reactor task: through the reactor's io_uring
//! (plain reads and writes on the descriptor), or through its blocking thread pool when the
//! reactor has no ring. Short reads and writes are continued; end of stream mid-message is an
//! error. Buffers are owned [`IoBuf`]s, parked in the reactor's slot until the operation ends.
//!
//! After `NBD_OPT_STARTTLS` a socket carries a TLS [`Session`]: every read and write then goes
//! through it (plaintext in the caller's buffers, ciphertext in the socket's own), with the
//! same interface. One task reads and one writes at a time, as without TLS; a record the
//! reading side makes rustls queue (a key update's answer) goes out with the next write.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use basalt_reactor::{IoBuf, UringFd};

use super::tls::{ServerTls, Session, SEAL_STEP};

/// Ciphertext read from the socket at once.
const TLS_RX: usize = 64 << 10;
/// Ciphertext written to the socket at once.
const TLS_TX: usize = SEAL_STEP + (16 << 10);

/// A TLS session and its ciphertext buffers (each out while an operation uses it).
struct TlsState {
    session: Session,
    rx: Option<IoBuf>,
    tx: Option<IoBuf>,
}

/// A socket taken apart to move to another reactor ([`Sock::into_parts`]): the descriptor and
/// its TLS session with whatever the session holds (ciphertext read ahead, plaintext not yet
/// taken).
pub struct SockParts {
    fd: OwnedFd,
    tls: Option<TlsState>,
}

/// A connected stream socket.
pub struct Sock {
    fd: OwnedFd,
    uring: bool,
    tls: RefCell<Option<TlsState>>,
}

fn tls_errno(e: &std::io::Error) -> i64 {
    -i64::from(e.raw_os_error().unwrap_or(libc::EPROTO))
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
        Sock { fd, uring: basalt_reactor::uring_features().is_some(), tls: RefCell::new(None) }
    }

    /// Take the socket apart between operations (none in flight: they borrow it), to carry it
    /// to another reactor.
    pub fn into_parts(self) -> SockParts {
        SockParts { fd: self.fd, tls: self.tls.into_inner() }
    }

    /// Put a socket back together on the reactor that goes on with it.
    pub fn from_parts(p: SockParts) -> Sock {
        let s = Sock::new(p.fd);
        *s.tls.borrow_mut() = p.tls;
        s
    }

    /// Whether [`super::sendfile::send_file`] may send on this socket: plain (no TLS), on a
    /// reactor with a ring.
    pub fn can_send_file(&self) -> bool {
        self.uring && !self.is_tls()
    }

    /// Wrap a socket whose TLS handshake is done (`session` may hold data already received).
    pub fn new_tls(fd: OwnedFd, session: Session) -> Sock {
        let s = Sock::new(fd);
        *s.tls.borrow_mut() = Some(TlsState { session, rx: None, tx: None });
        s
    }

    /// Who the TLS peer proved to be ([`Session::peer_identity`]); `None` without TLS.
    pub fn tls_peer(&self) -> Option<(super::tls::PeerKind, Option<String>)> {
        self.tls.borrow().as_ref().and_then(|t| t.session.peer_identity())
    }

    /// Whether TLS is on.
    pub fn is_tls(&self) -> bool {
        self.tls.borrow().is_some()
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn with_tls<R>(&self, f: impl FnOnce(&mut TlsState) -> R) -> R {
        f(self.tls.borrow_mut().as_mut().expect("a TLS session"))
    }

    /// The server's side of `NBD_OPT_STARTTLS` (after its ACK): the TLS handshake, after which
    /// everything goes through the session. An error names what failed; the connection is
    /// then to be dropped.
    pub async fn start_tls_server(&self, tls: &ServerTls) -> std::io::Result<()> {
        let session = tls.session()?;
        *self.tls.borrow_mut() = Some(TlsState { session, rx: None, tx: None });
        loop {
            self.flush_tls().await?;
            if !self.with_tls(|t| t.session.handshaking()) {
                return Ok(());
            }
            match self.read_tls().await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the peer closed during the TLS handshake",
                    ))
                }
                Err(e) => {
                    // Tell the peer why (an alert), as far as the socket takes it.
                    let _ = self.flush_tls().await;
                    return Err(e);
                }
            }
        }
    }

    /// Send the ciphertext the session has queued.
    async fn flush_tls(&self) -> std::io::Result<()> {
        let mut out = self.with_tls(|t| t.tx.take()).unwrap_or_else(|| IoBuf::new_uninit(TLS_TX));
        let res = loop {
            out.reset(TLS_TX);
            let n = match self.with_tls(|t| t.session.take_output(out.as_mut_slice())) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) => break Err(e),
            };
            out.reset(n);
            let (r, b) = self.raw_send(out).await;
            out = b;
            if let Err(e) = r {
                break Err(e);
            }
        };
        self.with_tls(|t| t.tx = Some(out));
        res
    }

    /// Read what ciphertext has arrived into the session (an end of stream is passed on);
    /// false at the end of the stream.
    async fn read_tls(&self) -> std::io::Result<bool> {
        let mut rx = self.with_tls(|t| t.rx.take()).unwrap_or_else(|| IoBuf::new_uninit(TLS_RX));
        rx.reset(TLS_RX);
        let (r, mut rx) = loop {
            let (r, b) = self.raw_once(false, rx).await;
            if r == -i64::from(libc::EINTR) {
                rx = b;
                continue;
            }
            break (r, b);
        };
        let res = if r < 0 {
            Err(io_err(r))
        } else {
            rx.reset(r as usize);
            self.with_tls(|t| t.session.feed(rx.as_slice())).map(|()| r > 0)
        };
        self.with_tls(|t| t.rx = Some(rx));
        res
    }

    /// Write all of `buf` without waiting, if the socket takes it (a goodbye on close: what
    /// does not fit is not sent). Under TLS the session's `close_notify` follows.
    pub fn send_now(&self, data: &[u8]) {
        let mut cipher;
        let bytes = if self.is_tls() {
            cipher = vec![0u8; data.len() + 1024];
            let n = self.with_tls(|t| {
                t.session.seal(data)?;
                t.session.close();
                t.session.take_output(&mut cipher)
            });
            let Ok(n) = n else { return };
            cipher.truncate(n);
            &cipher[..]
        } else {
            data
        };
        // SAFETY: a non-blocking send of a local buffer on the socket `self` keeps open.
        unsafe { libc::send(self.raw(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    }

    /// One read or write of `buf`'s window (through TLS when it is on); returns the count (0
    /// = end of stream).
    pub(crate) async fn once(&self, write: bool, buf: IoBuf) -> (i64, IoBuf) {
        if !self.is_tls() {
            return self.raw_once(write, buf).await;
        }
        if write {
            self.tls_write(buf).await
        } else {
            self.tls_read(buf).await
        }
    }

    /// Encrypt and send all of `buf`'s window.
    async fn tls_write(&self, buf: IoBuf) -> (i64, IoBuf) {
        let data = buf.as_slice();
        let mut done = 0;
        while done < data.len() {
            let step = (data.len() - done).min(SEAL_STEP);
            if let Err(e) = self.with_tls(|t| t.session.seal(&data[done..done + step])) {
                return (tls_errno(&e), buf);
            }
            if let Err(e) = self.flush_tls().await {
                return (tls_errno(&e), buf);
            }
            done += step;
        }
        (done as i64, buf)
    }

    /// Plaintext into `buf`'s window: what the session has, else after reading more.
    async fn tls_read(&self, mut buf: IoBuf) -> (i64, IoBuf) {
        loop {
            match self.with_tls(|t| t.session.open(buf.as_mut_slice())) {
                Ok(Some(n)) => return (n as i64, buf),
                Ok(None) => {}
                Err(e) => return (tls_errno(&e), buf),
            }
            match self.read_tls().await {
                Ok(true) => {}
                // The end of the stream: whatever the session makes of it, nothing more comes.
                Ok(false) => match self.with_tls(|t| t.session.open(buf.as_mut_slice())) {
                    Ok(Some(n)) => return (n as i64, buf),
                    Ok(None) => return (0, buf),
                    Err(e) => return (tls_errno(&e), buf),
                },
                Err(e) => return (tls_errno(&e), buf),
            }
        }
    }

    /// Send all of `buf`'s window on the socket itself (ciphertext).
    async fn raw_send(&self, buf: IoBuf) -> (std::io::Result<()>, IoBuf) {
        let len = buf.len();
        let (r, buf) = transfer(buf, |b| self.raw_once(true, b)).await;
        (all_sent(r, len), buf)
    }

    /// One read or write of `buf`'s window on the socket itself; returns the count (0 = end
    /// of stream).
    async fn raw_once(&self, write: bool, buf: IoBuf) -> (i64, IoBuf) {
        let (res, buf) = if self.uring {
            let mut buf = buf;
            loop {
                let (res, b) = basalt_reactor::uring_rw(UringFd::Raw(self.raw()), write, buf, 0).await;
                let b = b.expect("socket I/O returns its buffer");
                if res != -i64::from(libc::EAGAIN) {
                    break (res, Some(b));
                }
                // The ring polls a socket that is not ready; EAGAIN only comes while a
                // zero-copy send has made it non-blocking (`super::sendfile`): wait, go on.
                let ev = if write { libc::POLLOUT } else { libc::POLLIN };
                let (r, _) = basalt_reactor::uring_poll(self.raw(), ev as u32).await;
                if r < 0 {
                    break (r, Some(b));
                }
                buf = b;
            }
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

    /// Fill `buf`'s window, handing the buffer back whatever happens: `Ok(true)` when full,
    /// `Ok(false)` when the stream ended before the first byte, an error when it ended (or
    /// failed) in the middle.
    pub async fn fill(&self, buf: IoBuf) -> (std::io::Result<bool>, IoBuf) {
        let len = buf.len();
        let (r, buf) = transfer(buf, |b| self.once(false, b)).await;
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
        let (r, buf) = transfer(buf, |b| self.once(true, b)).await;
        (all_sent(r, len), buf)
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

/// Move all of `buf`'s window with `step` (one read or write, returning the count or a
/// negative errno), continuing short transfers; stops early only where the stream ends (a
/// step that moves nothing), and says how far it got. The buffer comes back in every case.
/// (A function of the step, not a method calling one, so the TLS layer's own sends, which
/// run inside a step, can use it too.)
async fn transfer<F, Fut>(mut buf: IoBuf, mut step: F) -> (std::io::Result<usize>, IoBuf)
where
    F: FnMut(IoBuf) -> Fut,
    Fut: std::future::Future<Output = (i64, IoBuf)>,
{
    let (start, len) = (buf.window_start(), buf.len());
    let mut done = 0;
    let mut res = Ok(());
    while done < len {
        buf.set_window(start + done, len - done);
        let (r, b) = step(buf).await;
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

/// A send's outcome: all `len` bytes went, or why not.
fn all_sent(r: std::io::Result<usize>, len: usize) -> std::io::Result<()> {
    match r {
        Ok(d) if d == len => Ok(()),
        Ok(_) => Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "socket accepts no more data")),
        Err(e) => Err(e),
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
