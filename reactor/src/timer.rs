//! Timers of one reactor: a binary heap of deadlines that either wake a task or complete a slot
//! (a null device's simulated latency). The heap keeps its capacity, so arming a timer in steady
//! state does not allocate.

use std::cell::{Cell, RefCell};
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::slots::SlotId;

pub(crate) enum Action {
    Wake(Waker),
    Complete(SlotId, i64),
}

struct Entry {
    at: Instant,
    seq: u64,
    action: Action,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at && self.seq == o.seq
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

pub(crate) struct Timers {
    heap: RefCell<BinaryHeap<Reverse<Entry>>>,
    seq: Cell<u64>,
}

impl Timers {
    pub(crate) fn new() -> Timers {
        Timers { heap: RefCell::new(BinaryHeap::with_capacity(256)), seq: Cell::new(0) }
    }

    pub(crate) fn arm(&self, at: Instant, action: Action) {
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        self.heap.borrow_mut().push(Reverse(Entry { at, seq, action }));
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.heap.borrow().peek().map(|e| e.0.at)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.heap.borrow().is_empty()
    }

    /// Fire every expired timer; returns how many fired.
    pub(crate) fn fire(&self, now: Instant) -> usize {
        let mut n = 0;
        loop {
            let entry = {
                let mut h = self.heap.borrow_mut();
                match h.peek() {
                    Some(e) if e.0.at <= now => h.pop().map(|e| e.0),
                    _ => None,
                }
            };
            let Some(e) = entry else { break };
            n += 1;
            match e.action {
                Action::Wake(w) => w.wake(),
                Action::Complete(id, res) => crate::reactor::with_current(|r| r.slots.complete(id, res)),
            }
        }
        n
    }
}

/// A future that completes at a deadline; see [`crate::sleep`].
pub struct Sleep {
    at: Instant,
    armed: bool,
}

/// Sleep for `d` on the current reactor.
pub fn sleep(d: Duration) -> Sleep {
    Sleep { at: Instant::now() + d, armed: false }
}

/// Sleep until `at` on the current reactor.
pub fn sleep_until(at: Instant) -> Sleep {
    Sleep { at, armed: false }
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.at {
            return Poll::Ready(());
        }
        if !self.armed {
            self.armed = true;
            let at = self.at;
            crate::reactor::with_current(|r| r.timers.arm(at, Action::Wake(cx.waker().clone())));
        }
        Poll::Pending
    }
}

/// Complete slot `id` with `res` at `at` (used by drivers that simulate latency).
pub fn complete_at(at: Instant, id: SlotId, res: i64) {
    crate::reactor::with_current(|r| r.timers.arm(at, Action::Complete(id, res)));
}

/// Duration until `at`, zero when past.
pub(crate) fn until(at: Instant) -> Duration {
    at.saturating_duration_since(Instant::now())
}
