//! Completion slots: the per-request state of every asynchronous leaf operation.
//!
//! A leaf driver (io_uring, the thread pool, NVMe, NBD, a null device) takes a slot when it
//! submits a request, parks the request's buffer in it, and completes the slot with a result
//! when the hardware or kernel is done. The [`SlotFuture`] awaiting it then gets the result and
//! the buffer back. The slab grows to the highest queue depth seen and is then reused, so
//! steady-state I/O allocates nothing.
//!
//! Cancelling is explicit: dropping a `SlotFuture` before completion orphans the slot, and the
//! buffer stays parked until the completion arrives, so memory the kernel or a device may
//! still write is never freed early.

use std::cell::RefCell;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::IoBuf;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Free,
    Pending,
    Done,
    Orphan,
}

struct Slot {
    state: State,
    res: i64,
    waker: Option<Waker>,
    buf: Option<IoBuf>,
}

pub(crate) struct Slots {
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
    pending: std::cell::Cell<usize>,
}

/// Names one in-flight operation on the current reactor.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SlotId(pub(crate) u32);

impl SlotId {
    /// The raw index, for use as io_uring user data or an NVMe command id.
    pub fn raw(self) -> u32 {
        self.0
    }

    /// Rebuild from [`SlotId::raw`].
    pub fn from_raw(v: u32) -> SlotId {
        SlotId(v)
    }
}

impl Slots {
    pub(crate) fn new() -> Slots {
        Slots { slots: RefCell::new(Vec::with_capacity(1024)), free: RefCell::new(Vec::with_capacity(1024)), pending: 0.into() }
    }

    pub(crate) fn pending(&self) -> usize {
        self.pending.get()
    }

    pub(crate) fn alloc(&self, buf: Option<IoBuf>) -> SlotId {
        let mut slots = self.slots.borrow_mut();
        self.pending.set(self.pending.get() + 1);
        if let Some(i) = self.free.borrow_mut().pop() {
            let s = &mut slots[i as usize];
            s.state = State::Pending;
            s.buf = buf;
            return SlotId(i);
        }
        slots.push(Slot { state: State::Pending, res: 0, waker: None, buf });
        SlotId((slots.len() - 1) as u32)
    }

    pub(crate) fn complete(&self, id: SlotId, res: i64) {
        let mut slots = self.slots.borrow_mut();
        let Some(s) = slots.get_mut(id.0 as usize) else { return };
        match s.state {
            State::Pending => {
                s.state = State::Done;
                s.res = res;
                self.pending.set(self.pending.get() - 1);
                if let Some(w) = s.waker.take() {
                    drop(slots);
                    w.wake();
                }
            }
            State::Orphan => {
                let buf = s.buf.take();
                s.state = State::Free;
                self.pending.set(self.pending.get() - 1);
                self.free.borrow_mut().push(id.0);
                drop(slots);
                drop(buf);
            }
            State::Free | State::Done => {}
        }
    }

    /// Take the buffer parked in a slot in flight, to fill or send it; [`Slots::put_buf`]
    /// parks it again. The driver holds it meanwhile, so it is never freed while in use.
    pub(crate) fn take_buf(&self, id: SlotId) -> Option<IoBuf> {
        let mut slots = self.slots.borrow_mut();
        let s = slots.get_mut(id.0 as usize)?;
        match s.state {
            State::Pending | State::Orphan => s.buf.take(),
            State::Free | State::Done => None,
        }
    }

    /// Park `buf` again in a slot in flight (the buffer is dropped if the slot is not in flight).
    pub(crate) fn put_buf(&self, id: SlotId, buf: IoBuf) {
        let mut slots = self.slots.borrow_mut();
        let stale = match slots.get_mut(id.0 as usize) {
            Some(s) if matches!(s.state, State::Pending | State::Orphan) => s.buf.replace(buf),
            _ => Some(buf),
        };
        drop(slots);
        drop(stale);
    }

    fn poll(&self, id: SlotId, cx: &mut Context<'_>) -> Poll<(i64, Option<IoBuf>)> {
        let mut slots = self.slots.borrow_mut();
        let s = &mut slots[id.0 as usize];
        if s.state == State::Done {
            s.state = State::Free;
            s.waker = None;
            let out = (s.res, s.buf.take());
            self.free.borrow_mut().push(id.0);
            return Poll::Ready(out);
        }
        match &s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => s.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn abandon(&self, id: SlotId) {
        let mut slots = self.slots.borrow_mut();
        let s = &mut slots[id.0 as usize];
        match s.state {
            State::Pending => {
                s.state = State::Orphan;
                s.waker = None;
            }
            State::Done => {
                let buf = s.buf.take();
                s.state = State::Free;
                self.free.borrow_mut().push(id.0);
                drop(slots);
                drop(buf);
            }
            _ => {}
        }
    }
}

/// Resolves to `(result, buffer)` when the slot is completed. Must be awaited on the reactor
/// whose slot it is (it is `!Send`).
pub struct SlotFuture {
    id: Option<SlotId>,
    _not_send: PhantomData<*const ()>,
}

impl SlotFuture {
    /// Await slot `id` of the current reactor.
    pub fn new(id: SlotId) -> SlotFuture {
        SlotFuture { id: Some(id), _not_send: PhantomData }
    }
}

impl Future for SlotFuture {
    type Output = (i64, Option<IoBuf>);
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let id = self.id.expect("SlotFuture polled after completion");
        let r = crate::reactor::with_current(|r| r.slots.poll(id, cx));
        if r.is_ready() {
            self.id = None;
        }
        r
    }
}

impl Drop for SlotFuture {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            crate::reactor::try_with_current(|r| r.slots.abandon(id));
        }
    }
}
