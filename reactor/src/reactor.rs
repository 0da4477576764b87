//! One reactor: a run-to-completion loop owned by one thread (normally pinned to one core).
//!
//! Each turn drains cross-core messages and remote wakes, reaps io_uring completions, runs the
//! registered pollers, fires timers, polls ready tasks, then submits the batch of operations
//! those tasks queued. While there is work it busy-polls; after `idle_spin` without work it
//! backs off to a blocking wait on the ring (or on its eventfd when there is no ring), so an
//! idle process does not burn a core. Another thread wakes it by writing its eventfd, which
//! has a read outstanding in the ring.
//!
//! The reactor's state is only touched from its own thread; nothing here needs a lock. The
//! [`Remote`] half is the only part shared with other threads.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;

use crate::executor::{self, Executor, JoinHandle};
use crate::slots::{SlotFuture, SlotId, Slots};
use crate::timer::Timers;
use crate::uring::{self, Ring, UringFd, UringFeatures};
use crate::{DmaPool, IoBuf};

/// How a reactor uses io_uring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UringMode {
    /// Use io_uring when the kernel allows it, else fall back to the thread pool.
    Auto,
    /// Never use io_uring (the thread-pool path, as `aio=threads`).
    Disabled,
}

/// Settings of one reactor.
#[derive(Clone, Debug)]
pub struct ReactorConfig {
    /// io_uring use.
    pub uring: UringMode,
    /// Submission queue entries.
    pub ring_entries: u32,
    /// Ask for a kernel SQ polling thread (falls back silently when refused).
    pub sqpoll: bool,
    /// io_uring features to treat as missing (for tests of the fallbacks): "fallocate",
    /// "fixed_files", "fixed_buffers".
    pub disable: Vec<&'static str>,
    /// Busy-poll this long without work before blocking; `None` busy-polls forever.
    pub idle_spin: Option<Duration>,
    /// Size of the DMA buffer pool; 0 for none.
    pub pool_size: usize,
    /// Try hugepages for the pool.
    pub hugepages: bool,
}

impl Default for ReactorConfig {
    fn default() -> Self {
        ReactorConfig {
            uring: UringMode::Auto,
            ring_entries: 256,
            sqpoll: false,
            disable: Vec::new(),
            idle_spin: Some(Duration::from_micros(200)),
            pool_size: 32 << 20,
            hugepages: true,
        }
    }
}

type Msg = Box<dyn FnOnce() + Send>;

/// The part of a reactor other threads can reach: a message queue, remote wakes and completions
/// from the thread pool, and the eventfd that wakes a sleeping reactor.
pub struct Remote {
    id: u16,
    msgs: SegQueue<Msg>,
    wakes: SegQueue<u64>,
    completions: SegQueue<(u32, i64)>,
    sleeping: AtomicBool,
    stopped: AtomicBool,
    eventfd: OwnedFd,
}

impl Remote {
    fn notify(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writing 8 bytes from a valid u64 to our own eventfd.
            unsafe { libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    fn has_work(&self) -> bool {
        !self.msgs.is_empty() || !self.wakes.is_empty() || !self.completions.is_empty() || self.stopped.load(Ordering::SeqCst)
    }

    pub(crate) fn push_completion(&self, slot: u32, res: i64) {
        self.completions.push((slot, res));
        self.notify();
    }
}

/// A cloneable, `Send` handle to a reactor: send it closures or futures to run.
#[derive(Clone)]
pub struct ReactorHandle {
    remote: Arc<Remote>,
}

impl ReactorHandle {
    /// The reactor's id.
    pub fn id(&self) -> u16 {
        self.remote.id
    }

    /// Run `f` on the reactor (SPDK's `send_msg`).
    pub fn send(&self, f: impl FnOnce() + Send + 'static) {
        self.remote.msgs.push(Box::new(f));
        self.remote.notify();
    }

    /// Spawn the future made by `make` as a task on the reactor.
    pub fn spawn<F, Fut>(&self, make: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        self.send(move || {
            spawn_local(make());
        });
    }

    /// Run the future made by `make` on the reactor and block this thread until it completes.
    /// This is the blocking facade for plain synchronous programs. Must not be called from the
    /// reactor's own thread.
    pub fn block_on<F, Fut, T>(&self, make: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        assert_ne!(current_id(), Some(self.id()), "block_on called from the reactor's own thread");
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.spawn(move || async move {
            let v = make().await;
            let _ = tx.send(v);
        });
        rx.recv().expect("reactor stopped before the task completed")
    }

    /// Ask the reactor to stop after the current turn.
    pub fn stop(&self) {
        self.remote.stopped.store(true, Ordering::SeqCst);
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to the reactor's eventfd.
        unsafe { libc::write(self.remote.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

static NEXT_ID: AtomicU16 = AtomicU16::new(0);
static REGISTRY: Mutex<Vec<Weak<Remote>>> = Mutex::new(Vec::new());

thread_local! {
    static CURRENT: Cell<Option<NonNull<Reactor>>> = const { Cell::new(None) };
}

/// Counters a reactor keeps about itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReactorStats {
    /// Loop iterations.
    pub turns: u64,
    /// Times the reactor blocked waiting for work.
    pub sleeps: u64,
    /// Cross-core messages run.
    pub messages: u64,
}

type Poller = Box<dyn FnMut() -> usize>;

/// A reactor's thread-local state. Create with [`Reactor::new`] on the thread that will run it.
pub struct Reactor {
    id: u16,
    /// `ReactorConfig::idle_spin`, changeable at run time ([`set_idle_spin`]).
    idle_spin: Cell<Option<Duration>>,
    remote: Arc<Remote>,
    pub(crate) exec: Executor,
    pub(crate) slots: Slots,
    pub(crate) timers: Timers,
    ring: Option<Ring>,
    pool: Option<DmaPool>,
    pollers: RefCell<Vec<Option<Poller>>>,
    /// The poller being run (its entry is taken out meanwhile), and whether it asked to be
    /// removed while running.
    poller_running: Cell<Option<usize>>,
    poller_removed: Cell<bool>,
    /// Thread-pool jobs submitted and not yet reported back; they may use parked buffers.
    blocking_in_flight: Cell<usize>,
    deferred: RefCell<Vec<(SlotId, i64)>>,
    /// Target of the ring's read of our eventfd: written by the kernel, never read by us.
    eventfd_buf: Box<std::cell::UnsafeCell<[u8; 8]>>,
    eventfd_armed: Cell<bool>,
    stats: Cell<ReactorStats>,
}

impl Reactor {
    /// Set up a reactor: its ring (if allowed and available) and its DMA pool.
    pub fn new(config: ReactorConfig) -> std::io::Result<Reactor> {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        // SAFETY: plain eventfd creation; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh descriptor we own.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        let remote = Arc::new(Remote {
            id,
            msgs: SegQueue::new(),
            wakes: SegQueue::new(),
            completions: SegQueue::new(),
            sleeping: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            eventfd,
        });
        {
            let mut reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
            let idx = usize::from(id);
            if reg.len() <= idx {
                reg.resize(idx + 1, Weak::new());
            }
            reg[idx] = Arc::downgrade(&remote);
        }
        let mut ring = match config.uring {
            UringMode::Auto => Ring::new(config.ring_entries, config.sqpoll, &config.disable).ok(),
            UringMode::Disabled => None,
        };
        let pool = if config.pool_size > 0 {
            let registered = ring.is_some() && !config.disable.contains(&"fixed_buffers");
            let pool = DmaPool::with_registration(config.pool_size, config.hugepages, registered.then_some(id))?;
            let ok = match ring.as_mut() {
                Some(r) if registered => {
                    let (base, len) = pool.region();
                    r.register_pool(base, len)
                }
                _ => false,
            };
            if registered && !ok {
                // Registration refused: use the pool without fixed buffers.
                Some(DmaPool::with_registration(config.pool_size, config.hugepages, None)?)
            } else {
                Some(pool)
            }
        } else {
            None
        };
        Ok(Reactor {
            id,
            idle_spin: Cell::new(config.idle_spin),
            remote,
            exec: Executor::new(id),
            slots: Slots::new(),
            timers: Timers::new(),
            ring,
            pool,
            pollers: RefCell::new(Vec::new()),
            poller_running: Cell::new(None),
            poller_removed: Cell::new(false),
            blocking_in_flight: Cell::new(0),
            deferred: RefCell::new(Vec::with_capacity(256)),
            eventfd_buf: Box::new(std::cell::UnsafeCell::new([0; 8])),
            eventfd_armed: Cell::new(false),
            stats: Cell::new(ReactorStats::default()),
        })
    }

    /// This reactor's id.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// A `Send` handle for other threads.
    pub fn handle(&self) -> ReactorHandle {
        ReactorHandle { remote: self.remote.clone() }
    }

    /// io_uring features in use, or `None` when running without a ring.
    pub fn uring_features(&self) -> Option<UringFeatures> {
        self.ring.as_ref().map(|r| r.features)
    }

    /// Run until [`ReactorHandle::stop`] is called.
    pub fn run(&self) {
        self.enter(|| self.run_loop(|| false));
        self.exec.clear();
    }

    /// Run `fut` as a task on this reactor until it completes, and return its output.
    pub fn block_on<F: Future + 'static>(&self, fut: F) -> F::Output {
        let (task, handle) = executor::wrap(fut);
        let mut handle = std::pin::pin!(handle);
        self.enter(|| {
            self.exec.spawn(task);
            self.run_loop(|| handle.is_finished());
        });
        let waker = std::task::Waker::noop();
        match handle.as_mut().poll(&mut std::task::Context::from_waker(waker)) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("reactor stopped before block_on's future completed"),
        }
    }

    fn enter<R>(&self, f: impl FnOnce() -> R) -> R {
        let prev = CURRENT.with(|c| c.replace(Some(NonNull::from(self))));
        struct Restore(Option<NonNull<Reactor>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(prev);
        f()
    }

    fn run_loop(&self, mut done: impl FnMut() -> bool) {
        let mut idle_since: Option<Instant> = None;
        loop {
            let work = self.turn();
            if done() || self.remote.stopped.load(Ordering::SeqCst) {
                break;
            }
            if work > 0 {
                idle_since = None;
                continue;
            }
            let Some(spin) = self.idle_spin.get() else { continue };
            let now = Instant::now();
            let since = *idle_since.get_or_insert(now);
            if now.duration_since(since) >= spin {
                self.sleep();
                idle_since = None;
            }
        }
        if let Some(r) = &self.ring {
            r.flush();
        }
    }

    /// One turn of the loop; returns a count of work done.
    pub fn turn(&self) -> usize {
        let mut work = 0;
        let mut st = self.stats.get();
        st.turns += 1;
        // Only the messages queued when the turn starts: one that sends a message to its own
        // reactor must not keep this loop going and starve completions, timers and tasks.
        for _ in 0..self.remote.msgs.len() {
            let Some(m) = self.remote.msgs.pop() else { break };
            m();
            st.messages += 1;
            work += 1;
        }
        while let Some(w) = self.remote.wakes.pop() {
            self.exec.schedule(w);
            work += 1;
        }
        work += self.drain_completions();
        work += self.reap();
        // Deferred completions (completed "on the next turn", as a bottom half).
        let n = self.deferred.borrow().len();
        if n > 0 {
            for i in 0..n {
                let (id, res) = self.deferred.borrow()[i];
                self.slots.complete(id, res);
            }
            self.deferred.borrow_mut().drain(..n);
            work += n;
        }
        let np = self.pollers.borrow().len();
        for i in 0..np {
            let p = self.pollers.borrow_mut()[i].take();
            if let Some(mut p) = p {
                self.poller_running.set(Some(i));
                work += p();
                self.poller_running.set(None);
                let removed = self.poller_removed.replace(false);
                let mut ps = self.pollers.borrow_mut();
                if ps[i].is_none() && !removed {
                    ps[i] = Some(p);
                }
            }
        }
        if !self.timers.is_empty() {
            work += self.timers.fire(Instant::now());
        }
        work += self.exec.run_ready(512);
        if let Some(r) = &self.ring {
            r.flush();
        }
        self.stats.set(st);
        work
    }

    /// Deliver what the thread pool finished.
    fn drain_completions(&self) -> usize {
        let mut n = 0;
        while let Some((slot, res)) = self.remote.completions.pop() {
            self.blocking_in_flight.set(self.blocking_in_flight.get() - 1);
            self.slots.complete(SlotId(slot), res);
            n += 1;
        }
        n
    }

    fn reap(&self) -> usize {
        let Some(ring) = &self.ring else { return 0 };
        ring.reap(|ud, res| match ud {
            uring::EVENTFD_TAG => self.eventfd_armed.set(false),
            uring::CANCEL_TAG => {}
            _ => self.slots.complete(SlotId(ud as u32), i64::from(res)),
        })
    }

    fn sleep(&self) {
        if self.exec.has_ready() {
            return;
        }
        self.remote.sleeping.store(true, Ordering::SeqCst);
        if self.remote.has_work() || !self.deferred.borrow().is_empty() {
            self.remote.sleeping.store(false, Ordering::SeqCst);
            return;
        }
        let timeout = self.timers.next_deadline().map(crate::timer::until);
        let mut st = self.stats.get();
        st.sleeps += 1;
        self.stats.set(st);
        match &self.ring {
            Some(r) => {
                if !self.eventfd_armed.get() {
                    self.eventfd_armed.set(true);
                    r.push(uring::eventfd_read_entry(self.remote.eventfd.as_raw_fd(), self.eventfd_buf.get().cast::<u8>()));
                }
                r.wait(timeout);
            }
            None => {
                let mut pfd = libc::pollfd { fd: self.remote.eventfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                let ms = timeout.map(|t| t.as_millis().min(i32::MAX as u128) as i32 + 1).unwrap_or(-1);
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, ms) };
                let mut v = [0u8; 8];
                // SAFETY: reading 8 bytes into a valid buffer from our non-blocking eventfd.
                unsafe { libc::read(self.remote.eventfd.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
            }
        }
        self.remote.sleeping.store(false, Ordering::SeqCst);
    }

    /// Counters so far.
    pub fn stats(&self) -> ReactorStats {
        self.stats.get()
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        self.exec.clear();
        // No buffer parked in a slot may go away while the kernel or a thread-pool job can still
        // write it. Kernel operations are cancelled (one parked on an idle pipe or socket would
        // never end) and reaped; thread-pool jobs are finite system calls and are waited for.
        let deadline = Instant::now() + Duration::from_secs(10);
        if let Some(r) = &self.ring {
            r.cancel_all();
            while r.in_kernel() > 0 && Instant::now() < deadline {
                r.wait(Some(Duration::from_millis(10)));
                self.enter(|| self.reap());
            }
        }
        while self.blocking_in_flight.get() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
            self.enter(|| self.drain_completions());
        }
        let in_kernel = self.ring.as_ref().map_or(0, |r| r.in_kernel());
        if in_kernel > 0 || self.blocking_in_flight.get() > 0 {
            // Still in use after the deadline: leak the buffers rather than free live memory.
            std::mem::forget(std::mem::replace(&mut self.slots, Slots::new()));
            std::mem::forget(std::mem::replace(&mut self.eventfd_buf, Box::new(std::cell::UnsafeCell::new([0; 8]))));
        }
        // The ring must go before the pool it has registered.
        self.ring = None;
    }
}

pub(crate) fn with_current<R>(f: impl FnOnce(&Reactor) -> R) -> R {
    try_with_current(f).expect("not on a reactor thread")
}

pub(crate) fn try_with_current<R>(f: impl FnOnce(&Reactor) -> R) -> Option<R> {
    let p = CURRENT.with(|c| c.get())?;
    // SAFETY: CURRENT is set only while `Reactor::enter` runs on this thread with a live
    // reference, and cleared when it returns.
    Some(f(unsafe { p.as_ref() }))
}

pub(crate) fn route_wake(w: u64) {
    let (rid, _, _) = executor::unpack(w);
    if try_with_current(|r| {
        if r.id == rid {
            r.exec.schedule(w);
            true
        } else {
            false
        }
    }) == Some(true)
    {
        return;
    }
    let remote = REGISTRY.lock().unwrap_or_else(|e| e.into_inner()).get(usize::from(rid)).and_then(Weak::upgrade);
    if let Some(remote) = remote {
        remote.wakes.push(w);
        remote.notify();
    }
}

/// The DMA buffer pool of the reactor running on this thread, if it has one (a device driver maps
/// it for DMA once, so buffers from it need no bounce).
pub fn current_pool() -> Option<DmaPool> {
    try_with_current(|r| r.pool.clone()).flatten()
}

/// The id of the reactor running on this thread, if any.
pub fn current_id() -> Option<u16> {
    try_with_current(|r| r.id)
}

/// A handle to the reactor running on this thread. Panics off a reactor thread.
pub fn current_handle() -> ReactorHandle {
    with_current(|r| r.handle())
}

/// Spawn a `!Send` task on the current reactor.
pub fn spawn_local<F: Future + 'static>(fut: F) -> JoinHandle<F::Output> {
    let (task, handle) = executor::wrap(fut);
    with_current(|r| r.exec.spawn(task));
    handle
}

/// Take a completion slot on the current reactor, parking `buf` in it.
pub fn slot_alloc(buf: Option<IoBuf>) -> SlotId {
    with_current(|r| r.slots.alloc(buf))
}

/// Complete a slot now.
pub fn slot_complete(id: SlotId, res: i64) {
    with_current(|r| r.slots.complete(id, res));
}

/// Take the buffer parked in a slot in flight (a network driver filling a read in place).
pub fn slot_take_buf(id: SlotId) -> Option<IoBuf> {
    with_current(|r| r.slots.take_buf(id))
}

/// Park a buffer taken with [`slot_take_buf`] in its slot again.
pub fn slot_put_buf(id: SlotId, buf: IoBuf) {
    with_current(|r| r.slots.put_buf(id, buf));
}

/// Complete a slot at the start of the next turn (a bottom half).
pub fn slot_complete_deferred(id: SlotId, res: i64) {
    with_current(|r| r.deferred.borrow_mut().push((id, res)));
}

/// Operations in flight on the current reactor's slots.
pub fn slots_pending() -> usize {
    with_current(|r| r.slots.pending())
}

/// Whether the current reactor has an io_uring, and its features.
pub fn uring_features() -> Option<UringFeatures> {
    try_with_current(|r| r.uring_features()).flatten()
}

/// Register `fd` in the current ring's file table.
pub fn register_file(fd: RawFd) -> Option<u32> {
    try_with_current(|r| r.ring.as_ref().and_then(|ring| ring.register_file(fd))).flatten()
}

/// Drop a registered file from the current ring's table.
pub fn unregister_file(idx: u32) {
    try_with_current(|r| {
        if let Some(ring) = &r.ring {
            ring.unregister_file(idx)
        }
    });
}

/// Read into (`write == false`) or write from `buf`'s window at `off` through the ring.
/// Panics when the current reactor has no ring; check [`uring_features`] first.
pub fn uring_rw(fd: UringFd, write: bool, mut buf: IoBuf, off: u64) -> SlotFuture {
    with_current(|r| {
        let ring = r.ring.as_ref().expect("reactor has no io_uring");
        let fixed = buf.fixed_index(r.id);
        let ptr = buf.as_mut_ptr();
        let len = buf.len() as u32;
        let id = r.slots.alloc(Some(buf));
        ring.push(uring::rw_entry(fd, write, ptr, len, off, fixed, id));
        SlotFuture::new(id)
    })
}

/// fsync (or fdatasync) through the ring.
pub fn uring_fsync(fd: UringFd, datasync: bool) -> SlotFuture {
    uring_op(|id| uring::fsync_entry(fd, datasync, id))
}

/// fallocate through the ring.
pub fn uring_fallocate(fd: UringFd, mode: i32, off: u64, len: u64) -> SlotFuture {
    uring_op(|id| uring::fallocate_entry(fd, mode, off, len, id))
}

/// Wait (one-shot) until `fd` is ready for `events` (`libc::POLLIN`, `POLLOUT`...); the slot
/// completes with the ready mask or a negative errno. Panics when the current reactor has no
/// ring; check [`uring_features`] first.
pub fn uring_poll(fd: RawFd, events: u32) -> SlotFuture {
    uring_op(|id| uring::poll_entry(fd, events, id))
}

/// Push the ring operation `entry` builds for a new slot (one holding no buffer).
fn uring_op(entry: impl FnOnce(SlotId) -> io_uring::squeue::Entry) -> SlotFuture {
    with_current(|r| {
        let ring = r.ring.as_ref().expect("reactor has no io_uring");
        let id = r.slots.alloc(None);
        ring.push(entry(id));
        SlotFuture::new(id)
    })
}

/// Run `job` on the blocking thread pool; the slot completes with its result. `buf` is parked in
/// the slot while the job runs (the job gets its address and length through closure capture).
pub fn blocking(job: impl FnOnce() -> i64 + Send + 'static, buf: Option<IoBuf>) -> SlotFuture {
    blocking_via(job, buf, crate::blocking::submit)
}

/// [`blocking`], run in `lane`: after the jobs submitted to it before, one at a time.
pub fn blocking_in(
    lane: &std::sync::Arc<crate::Lane>,
    job: impl FnOnce() -> i64 + Send + 'static,
    buf: Option<IoBuf>,
) -> SlotFuture {
    blocking_via(job, buf, |j| lane.submit(j))
}

/// Park `buf` in a new slot and hand `job` to `submit`, wrapped to complete the slot.
fn blocking_via(
    job: impl FnOnce() -> i64 + Send + 'static,
    buf: Option<IoBuf>,
    submit: impl FnOnce(Box<dyn FnOnce() + Send>),
) -> SlotFuture {
    with_current(|r| {
        let id = r.slots.alloc(buf);
        r.blocking_in_flight.set(r.blocking_in_flight.get() + 1);
        let remote = r.remote.clone();
        submit(Box::new(move || {
            let res = job();
            remote.push_completion(id.0, res);
        }));
        SlotFuture::new(id)
    })
}

/// Register a poller run once per turn; it returns how much work it did (0 lets the reactor
/// consider itself idle). Returns an id for [`remove_poller`].
pub fn add_poller(p: impl FnMut() -> usize + 'static) -> usize {
    with_current(|r| {
        let mut ps = r.pollers.borrow_mut();
        ps.push(Some(Box::new(p)));
        ps.len() - 1
    })
}

/// Unregister a poller.
pub fn remove_poller(id: usize) {
    with_current(|r| {
        if r.poller_running.get() == Some(id) {
            r.poller_removed.set(true);
        }
        if let Some(p) = r.pollers.borrow_mut().get_mut(id) {
            *p = None;
        }
    });
}

/// Tasks spawned on the current reactor that have not finished.
pub fn live_tasks() -> usize {
    with_current(|r| r.exec.live())
}

/// Change how long the current reactor busy-polls without work before it sleeps (see
/// [`ReactorConfig::idle_spin`]): bulk work whose cores are needed by threads doing the copying
/// sets it to zero.
pub fn set_idle_spin(spin: Option<Duration>) {
    with_current(|r| r.idle_spin.set(spin))
}

/// Counters of the current reactor.
pub fn current_stats() -> ReactorStats {
    with_current(|r| r.stats())
}

/// Yield once to let other tasks and pollers run.
pub async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}
