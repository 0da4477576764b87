//! The reply side of one NBD connection in the transmission phase: request tasks queue their
//! whole replies, and one writer task sends what has queued in as few socket writes as it can.
//!
//! Small replies (up to [`COPY_MAX`] bytes a part: status replies, 4 KiB reads with their
//! header in front) are copied into one batch buffer, so a burst of replies finished in the
//! same reactor turn leaves in one write instead of one write, and one turn, each. A larger
//! part goes out from its own buffer, uncopied, and a read's data that lies in a host file
//! goes from the page cache ([`Replies::send_file`]). The parts of one reply stay together
//! and replies leave in the order they were queued.
//!
//! [`Replies::send`] returns once the reply is on the socket (or the socket has failed), so a
//! request holds its place among the connection's requests in flight until then, and those
//! bound the memory queued replies can hold (a client that stops reading replies stalls its
//! own connection, nothing else). After a failed write every queued and later reply is
//! dropped and [`Replies::broken`] says so.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::task::{Poll, Waker};

use basalt_drivers::nbd::sendfile;
use basalt_drivers::nbd::sock::Sock;
use basalt_engine::HostExtent;
use basalt_reactor::IoBuf;

/// The largest part copied into a batch; larger ones are written from their own buffer.
const COPY_MAX: usize = 16 << 10;
/// The batch buffer: what one write carries at most when it gathers small parts.
const BATCH: usize = 256 << 10;

/// A queued piece of a reply.
enum Part {
    Buf(IoBuf),
    /// `len` bytes of a host file, sent without copying.
    File(HostExtent, u64),
}

/// One connection's queued replies and their writer.
pub struct Replies {
    sock: Rc<Sock>,
    queue: RefCell<VecDeque<Part>>,
    /// Parts queued since the start, and parts written (each a running count).
    queued: Cell<u64>,
    written: Cell<u64>,
    broken: Cell<bool>,
    closing: Cell<bool>,
    writer: RefCell<Option<Waker>>,
    senders: RefCell<Vec<Waker>>,
}

impl Replies {
    /// Start the writer for `sock` on the current reactor.
    pub fn start(sock: Rc<Sock>) -> Rc<Replies> {
        let r = Rc::new(Replies {
            sock,
            queue: RefCell::new(VecDeque::new()),
            queued: Cell::new(0),
            written: Cell::new(0),
            broken: Cell::new(false),
            closing: Cell::new(false),
            writer: RefCell::new(None),
            senders: RefCell::new(Vec::new()),
        });
        basalt_reactor::spawn_local(r.clone().run());
        r
    }

    /// Whether a write failed (the client is gone or stopped reading).
    pub fn broken(&self) -> bool {
        self.broken.get()
    }

    /// Queue a reply made of `parts` and wait until it is written (or the socket fails).
    pub async fn send(&self, parts: Vec<IoBuf>) {
        self.enqueue(parts.into_iter().filter(|p| !p.is_empty()).map(Part::Buf).collect()).await
    }

    /// Queue a reply made of `head` and then `len` bytes of `ext`'s file (sent from the page
    /// cache: the socket must be able to, [`Sock::can_send_file`]), and wait until it is
    /// written.
    pub async fn send_file(&self, head: IoBuf, ext: HostExtent, len: u64) {
        self.enqueue(vec![Part::Buf(head), Part::File(ext, len)]).await
    }

    async fn enqueue(&self, parts: Vec<Part>) {
        if self.broken.get() {
            return;
        }
        {
            let mut q = self.queue.borrow_mut();
            for p in parts {
                q.push_back(p);
                self.queued.set(self.queued.get() + 1);
            }
        }
        let mine = self.queued.get();
        self.wake_writer();
        std::future::poll_fn(|cx| {
            if self.written.get() >= mine || self.broken.get() {
                Poll::Ready(())
            } else {
                self.senders.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Let the writer end once the queue is empty (no more replies will come).
    pub fn close(&self) {
        self.closing.set(true);
        self.wake_writer();
    }

    fn wake_writer(&self) {
        if let Some(w) = self.writer.borrow_mut().take() {
            w.wake();
        }
    }

    fn wake_senders(&self) {
        for w in self.senders.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// The writer task.
    async fn run(self: Rc<Self>) {
        let mut batch = Some(IoBuf::new_uninit(BATCH));
        loop {
            std::future::poll_fn(|cx| {
                if !self.queue.borrow().is_empty() || self.closing.get() {
                    Poll::Ready(())
                } else {
                    *self.writer.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                }
            })
            .await;
            let big = match self.queue.borrow().front() {
                None => return,
                Some(Part::Buf(p)) => p.len() > COPY_MAX,
                Some(Part::File(..)) => true,
            };
            let (res, parts) = if big {
                let part = self.queue.borrow_mut().pop_front().expect("a queued part");
                let res = match part {
                    Part::Buf(b) => self.sock.write_all(b).await.map(drop),
                    Part::File(ext, len) => sendfile::send_file(&self.sock, &ext, len).await,
                };
                (res, 1)
            } else {
                let mut b = batch.take().expect("the batch buffer is back");
                let (mut used, mut parts) = (0, 0);
                b.reset(BATCH);
                {
                    let mut q = self.queue.borrow_mut();
                    while let Some(Part::Buf(p)) = q.front() {
                        if p.len() > COPY_MAX || used + p.len() > BATCH {
                            break;
                        }
                        b.as_mut_slice()[used..used + p.len()].copy_from_slice(p.as_slice());
                        used += p.len();
                        parts += 1;
                        q.pop_front();
                    }
                }
                b.reset(used);
                match self.sock.write_all(b).await {
                    Ok(b) => {
                        batch = Some(b);
                        (Ok(()), parts)
                    }
                    Err(e) => (Err(e), parts),
                }
            };
            match res {
                Ok(()) => self.written.set(self.written.get() + parts),
                Err(_) => {
                    self.broken.set(true);
                    self.queue.borrow_mut().clear();
                    self.wake_senders();
                    return;
                }
            }
            self.wake_senders();
        }
    }
}
