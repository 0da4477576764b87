//! A tiny single-threaded executor: tasks are `!Send` futures owned by one reactor.
//!
//! Tasks live in a slab; a waker is a packed `(reactor id, generation, slot)` word, so making,
//! cloning and firing a waker never allocates. A waker fired on its own reactor's thread queues
//! the task directly; fired from another thread it is routed through that reactor's remote queue.
//! A stale waker (its task finished and the slot was reused) is recognised by the generation and
//! ignored.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};

type LocalTask = Pin<Box<dyn Future<Output = ()>>>;

struct TaskSlot {
    fut: Option<LocalTask>,
    gen: u16,
    alive: bool,
    queued: bool,
}

pub(crate) struct Executor {
    reactor: u16,
    tasks: RefCell<Vec<TaskSlot>>,
    free: RefCell<Vec<u32>>,
    ready: RefCell<VecDeque<u32>>,
    live: Cell<usize>,
}

pub(crate) fn pack(reactor: u16, gen: u16, slot: u32) -> u64 {
    (u64::from(reactor) << 48) | (u64::from(gen) << 32) | u64::from(slot)
}

pub(crate) fn unpack(w: u64) -> (u16, u16, u32) {
    ((w >> 48) as u16, (w >> 32) as u16, w as u32)
}

impl Executor {
    pub(crate) fn new(reactor: u16) -> Executor {
        Executor {
            reactor,
            tasks: RefCell::new(Vec::with_capacity(256)),
            free: RefCell::new(Vec::with_capacity(256)),
            ready: RefCell::new(VecDeque::with_capacity(256)),
            live: Cell::new(0),
        }
    }

    /// Number of tasks not yet finished.
    pub(crate) fn live(&self) -> usize {
        self.live.get()
    }

    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.borrow().is_empty()
    }

    pub(crate) fn spawn(&self, fut: LocalTask) {
        let mut tasks = self.tasks.borrow_mut();
        let slot = match self.free.borrow_mut().pop() {
            Some(s) => {
                let t = &mut tasks[s as usize];
                t.fut = Some(fut);
                t.alive = true;
                t.queued = true;
                s
            }
            None => {
                tasks.push(TaskSlot { fut: Some(fut), gen: 0, alive: true, queued: true });
                (tasks.len() - 1) as u32
            }
        };
        self.live.set(self.live.get() + 1);
        self.ready.borrow_mut().push_back(slot);
    }

    /// Queue the task named by a packed waker word, if it is still the same task.
    pub(crate) fn schedule(&self, w: u64) {
        let (_, gen, slot) = unpack(w);
        let mut tasks = self.tasks.borrow_mut();
        if let Some(t) = tasks.get_mut(slot as usize) {
            if t.alive && t.gen == gen && !t.queued {
                t.queued = true;
                self.ready.borrow_mut().push_back(slot);
            }
        }
    }

    /// Poll up to `budget` of the tasks ready when called; returns how many were polled. Tasks
    /// woken meanwhile (a `yield_now`, a task waking another) wait for the next turn, so that
    /// a yield lets the reactor reap completions and run pollers before the task runs again.
    pub(crate) fn run_ready(&self, budget: usize) -> usize {
        let mut n = 0;
        let mut entries = self.ready.borrow().len().min(budget);
        while entries > 0 {
            entries -= 1;
            let Some(slot) = self.ready.borrow_mut().pop_front() else { break };
            let (fut, gen) = {
                let mut tasks = self.tasks.borrow_mut();
                let t = &mut tasks[slot as usize];
                t.queued = false;
                (t.fut.take(), t.gen)
            };
            let Some(mut fut) = fut else { continue };
            n += 1;
            let waker = make_waker(pack(self.reactor, gen, slot));
            let mut cx = Context::from_waker(&waker);
            let done = fut.as_mut().poll(&mut cx).is_ready();
            let mut tasks = self.tasks.borrow_mut();
            let t = &mut tasks[slot as usize];
            if done {
                t.alive = false;
                t.queued = false;
                t.gen = t.gen.wrapping_add(1);
                self.free.borrow_mut().push(slot);
                self.live.set(self.live.get() - 1);
                drop(tasks);
                drop(fut);
            } else {
                t.fut = Some(fut);
            }
        }
        n
    }

    /// Drop every task (at reactor shutdown).
    pub(crate) fn clear(&self) {
        let futs: Vec<_> = self.tasks.borrow_mut().iter_mut().filter_map(|t| t.fut.take()).collect();
        drop(futs);
    }
}

static VTABLE: RawWakerVTable = RawWakerVTable::new(clone_raw, wake_raw, wake_raw, drop_raw);

pub(crate) fn make_waker(w: u64) -> Waker {
    // SAFETY: the data word is a plain integer; the vtable functions never dereference it.
    unsafe { Waker::from_raw(RawWaker::new(w as usize as *const (), &VTABLE)) }
}

fn clone_raw(p: *const ()) -> RawWaker {
    RawWaker::new(p, &VTABLE)
}

fn wake_raw(p: *const ()) {
    crate::reactor::route_wake(p as usize as u64);
}

fn drop_raw(_: *const ()) {}

/// Shared state between a spawned task and its [`JoinHandle`].
struct JoinState<T> {
    result: Option<T>,
    waker: Option<Waker>,
}

/// Awaits the output of a task spawned with [`crate::spawn_local`].
pub struct JoinHandle<T> {
    state: Rc<RefCell<JoinState<T>>>,
}

impl<T> JoinHandle<T> {
    /// Whether the task has finished.
    pub fn is_finished(&self) -> bool {
        self.state.borrow().result.is_some()
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut s = self.state.borrow_mut();
        match s.result.take() {
            Some(v) => Poll::Ready(v),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

pub(crate) fn wrap<F: Future + 'static>(fut: F) -> (LocalTask, JoinHandle<F::Output>) {
    let state = Rc::new(RefCell::new(JoinState { result: None, waker: None }));
    let s2 = state.clone();
    let task = Box::pin(async move {
        let v = fut.await;
        let mut s = s2.borrow_mut();
        s.result = Some(v);
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    });
    (task, JoinHandle { state })
}
