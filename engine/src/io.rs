//! Futures of the data path.
//!
//! [`IoFuture`] is what every node's data-plane call returns. It is an enum rather than a boxed
//! future so the fast path allocates nothing: a result known at once (`Ready`), a leaf
//! operation in flight (`Slot`, completed by io_uring, a device queue or a timer), or — only on
//! slow paths — a boxed future. A format whose mapping is cached returns its child's `IoFuture`
//! unchanged: that is the synchronous map fast path of DESIGN.md.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use basalt_reactor::{IoBuf, SlotFuture};

use crate::error::IoStatus;
use crate::inflight::InFlightGuard;
use crate::node::LocalBoxFuture;

/// The outcome of a data-path request: the buffer handed back (for reads and writes) and the
/// byte count or error.
#[derive(Debug)]
pub struct IoDone {
    /// The request's buffer, returned to its owner.
    pub buf: Option<IoBuf>,
    /// Bytes transferred, or the error.
    pub res: Result<u64, IoStatus>,
}

impl IoDone {
    /// Success without a buffer.
    pub fn ok(n: u64) -> IoDone {
        IoDone { buf: None, res: Ok(n) }
    }

    /// Failure without a buffer.
    pub fn err(e: IoStatus) -> IoDone {
        IoDone { buf: None, res: Err(e) }
    }
}

/// How a leaf slot's raw result becomes an [`IoDone`].
#[derive(Clone, Copy, Debug)]
pub enum SlotKind {
    /// A read of this many bytes: a short count means end of file, the rest reads as zeroes.
    Read(u32),
    /// A write of this many bytes: a short count is an error (ENOSPC, as the kernel reports a
    /// full device by a short write).
    Write(u32),
    /// Anything else: 0 or a negative errno.
    Other,
}

/// A data-path future.
pub enum IoFuture {
    /// Already complete.
    Ready(Option<IoDone>),
    /// A leaf operation in flight.
    Slot(SlotFuture, SlotKind),
    /// A leaf operation in flight that a parent counts until it completes (see [`crate::InFlight`]).
    Counted(SlotFuture, SlotKind, InFlightGuard),
    /// A slow path.
    Boxed(LocalBoxFuture<'static, IoDone>),
}

impl IoFuture {
    /// Completed successfully with `n`.
    pub fn ok(n: u64) -> IoFuture {
        IoFuture::Ready(Some(IoDone::ok(n)))
    }

    /// Failed.
    pub fn err(e: IoStatus) -> IoFuture {
        IoFuture::Ready(Some(IoDone::err(e)))
    }

    /// Completed, returning `buf`.
    pub fn done(buf: IoBuf, res: Result<u64, IoStatus>) -> IoFuture {
        IoFuture::Ready(Some(IoDone { buf: Some(buf), res }))
    }

    /// Box a slow path.
    pub fn boxed(f: impl Future<Output = IoDone> + 'static) -> IoFuture {
        IoFuture::Boxed(Box::pin(f))
    }

    /// Keep `guard` (a request counted in an [`crate::InFlight`] before its mapping was looked
    /// up) until this request completes. Allocation-free for leaf operations; a boxed future is
    /// wrapped in another box.
    pub fn with_guard(self, guard: InFlightGuard) -> IoFuture {
        match self {
            IoFuture::Ready(v) => IoFuture::Ready(v),
            IoFuture::Slot(f, k) => IoFuture::Counted(f, k, guard),
            c @ IoFuture::Counted(..) => IoFuture::boxed(async move {
                let d = c.await;
                drop(guard);
                d
            }),
            IoFuture::Boxed(f) => IoFuture::boxed(async move {
                let d = f.await;
                drop(guard);
                d
            }),
        }
    }
}

impl Future for IoFuture {
    type Output = IoDone;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<IoDone> {
        // SAFETY: we never move out of the pinned variants' payloads; SlotFuture is Unpin and
        // the boxed future is pinned in its box.
        let this = unsafe { self.get_unchecked_mut() };
        match this {
            IoFuture::Ready(v) => Poll::Ready(v.take().expect("IoFuture polled after completion")),
            IoFuture::Slot(f, kind) | IoFuture::Counted(f, kind, _) => match Pin::new(f).poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready((res, buf)) => Poll::Ready(finish_slot(res, buf, *kind)),
            },
            IoFuture::Boxed(f) => f.as_mut().poll(cx),
        }
    }
}

fn finish_slot(res: i64, buf: Option<IoBuf>, kind: SlotKind) -> IoDone {
    if res < 0 {
        return IoDone { buf, res: Err(IoStatus::from_neg(res)) };
    }
    match kind {
        SlotKind::Read(want) if (res as u64) < u64::from(want) => {
            let mut buf = buf;
            if let Some(b) = buf.as_mut() {
                b.as_mut_slice()[res as usize..].fill(0);
            }
            IoDone { buf, res: Ok(u64::from(want)) }
        }
        SlotKind::Write(want) if (res as u64) < u64::from(want) => IoDone { buf, res: Err(IoStatus::ENOSPC) },
        _ => IoDone { buf, res: Ok(res as u64) },
    }
}
