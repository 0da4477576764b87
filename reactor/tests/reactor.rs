//! Integration tests of basalt-reactor: cross-core messages, timers, idle back-off, many
//! in-flight io_uring requests, the fallbacks when io_uring (or some of its features) is missing,
//! futures dropped over in-flight operations, shutdown, pollers, join handles and yields.
//!
//! Work runs on reactors started by a [`Runtime`] and results come back over channels with a
//! deadline, so a lost wake-up fails a test instead of hanging it. Assertions about what happened
//! on a reactor are made on the test thread from returned values where that is practical.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use basalt_reactor::{
    add_poller, blocking, blocking_in, complete_at, current_handle, current_id, current_stats, live_tasks, register_file,
    remove_poller, sleep, sleep_until, slot_alloc, slot_complete, slot_complete_deferred, slots_pending, spawn_local,
    unregister_file, uring_fallocate, uring_features, uring_fsync, uring_rw, yield_now, IoBuf, Lane, Reactor, ReactorConfig,
    ReactorHandle, Runtime, RuntimeConfig, SlotFuture, UringFd, UringMode, IOBUF_ALIGN,
};

/// How long the test thread waits for a reactor before calling it a hang.
const DEADLINE: Duration = Duration::from_secs(10);
/// Block size of the many-in-flight tests.
const BS: usize = 4096;
/// Requests in flight in the many-in-flight tests.
const N: usize = 1024;

/// Default settings with a smaller pool, so that tests start reactors quickly.
fn small() -> ReactorConfig {
    ReactorConfig { pool_size: 8 << 20, ..ReactorConfig::default() }
}

/// One unpinned reactor with `reactor` settings.
fn runtime(reactor: ReactorConfig) -> Runtime {
    Runtime::new(RuntimeConfig { cores: Vec::new(), pin: false, reactor, name: None }).expect("start a reactor")
}

/// Run the future made by `make` as a task on reactor `i` and wait (with a deadline) for its
/// output. A panic on the reactor shows up here as a disconnected channel.
fn run_on<T, Fut>(rt: &Runtime, i: usize, make: impl FnOnce() -> Fut + Send + 'static) -> T
where
    T: Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    let (tx, rx) = mpsc::channel();
    rt.handle(i).spawn(move || async move {
        let _ = tx.send(make().await);
    });
    rx.recv_timeout(DEADLINE).expect("task on the reactor did not finish: lost wake-up, hang or panic on the reactor")
}

/// CPU time consumed so far by the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid, exclusive pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A pipe as (read end, write end); the write end is non-blocking.
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into a valid array of two ints.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(r.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    (r, w)
}

/// Write `data` to a descriptor with plain write(2).
fn write_fd(fd: RawFd, data: &[u8]) -> isize {
    // SAFETY: data is a valid slice for the duration of the call.
    unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) }
}

/// Read from a non-blocking descriptor with plain read(2); `Err(errno)` on failure.
fn read_fd(fd: RawFd, buf: &mut [u8]) -> Result<usize, i32> {
    // SAFETY: buf is a valid, exclusive slice for the duration of the call.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(n as usize)
    }
}

/// Contents of block `i` in the many-in-flight tests: the index up front, then bytes that
/// differ from block to block and within a block.
fn block(i: usize) -> Vec<u8> {
    let mut b: Vec<u8> = (0..BS).map(|j| (i.wrapping_mul(131) ^ j.wrapping_mul(7) ^ (j >> 8)) as u8).collect();
    b[..8].copy_from_slice(&(i as u64).to_le_bytes());
    b
}

/// A one-shot value that any thread can set and whose setting wakes the awaiting task.
struct Oneshot<T> {
    value: Option<T>,
    waker: Option<Waker>,
}

fn oneshot<T>() -> Arc<Mutex<Oneshot<T>>> {
    Arc::new(Mutex::new(Oneshot { value: None, waker: None }))
}

fn oneshot_set<T>(o: &Mutex<Oneshot<T>>, v: T) {
    let waker = {
        let mut s = o.lock().unwrap();
        s.value = Some(v);
        s.waker.take()
    };
    if let Some(w) = waker {
        w.wake();
    }
}

async fn oneshot_get<T>(o: &Mutex<Oneshot<T>>) -> T {
    std::future::poll_fn(|cx| {
        let mut s = o.lock().unwrap();
        match s.value.take() {
            Some(v) => Poll::Ready(v),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    })
    .await
}

/// pwrite(2) on the blocking pool; returns the byte count or `-errno`.
async fn pwrite_blocking(fd: RawFd, data: &[u8], off: u64, delay: Duration) -> (i64, Option<IoBuf>) {
    let buf = IoBuf::from_slice(data);
    let (addr, len) = (buf.as_ptr() as usize, buf.len());
    blocking(
        move || {
            std::thread::sleep(delay);
            // SAFETY: the buffer is parked in the slot until this job's completion is delivered,
            // so [addr, addr+len) stays valid and unaliased while the job runs.
            let n = unsafe { libc::pwrite(fd, addr as *const libc::c_void, len, off as libc::off_t) };
            if n < 0 {
                -i64::from(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
            } else {
                n as i64
            }
        },
        Some(buf),
    )
    .await
}

/// pread(2) of `len` bytes on the blocking pool; returns the byte count or `-errno`.
async fn pread_blocking(fd: RawFd, len: usize, off: u64) -> (i64, Option<IoBuf>) {
    let mut buf = IoBuf::new(len);
    let addr = buf.as_mut_ptr() as usize;
    blocking(
        move || {
            // SAFETY: as in pwrite_blocking; the job is the only user of the parked buffer.
            let n = unsafe { libc::pread(fd, addr as *mut libc::c_void, len, off as libc::off_t) };
            if n < 0 {
                -i64::from(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
            } else {
                n as i64
            }
        },
        Some(buf),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// 1. Cross-core messages and the blocking facade
// ---------------------------------------------------------------------------------------------

const HOPS: u32 = 10_000;

struct PingPong {
    handles: [ReactorHandle; 2],
    /// Messages run on each reactor.
    seen: [AtomicU32; 2],
    /// Messages that ran on a thread other than their addressee's.
    misrouted: AtomicU32,
    done: mpsc::Sender<u32>,
}

/// Hop `n` runs on reactor `n % 2` and sends hop `n + 1` to the other one.
fn hop(p: Arc<PingPong>, n: u32) {
    let side = (n % 2) as usize;
    if current_id() != Some(p.handles[side].id()) {
        p.misrouted.fetch_add(1, Ordering::Relaxed);
    }
    p.seen[side].fetch_add(1, Ordering::Relaxed);
    if n == HOPS {
        let _ = p.done.send(n);
        return;
    }
    let next = p.handles[1 - side].clone();
    next.send(move || hop(p, n + 1));
}

#[test]
fn cross_core_messages_ping_pong() {
    let rt = Runtime::new(RuntimeConfig { reactor: small(), ..RuntimeConfig::cores(2, false) }).unwrap();
    assert_eq!(rt.len(), 2);
    assert_eq!(current_id(), None, "the test thread is no reactor");
    let ids = [rt.handle(0).id(), rt.handle(1).id()];
    assert_ne!(ids[0], ids[1]);
    assert_eq!(rt.block_on(0, || async { current_id() }), Some(ids[0]));
    assert_eq!(rt.block_on(1, || async { current_id() }), Some(ids[1]));
    assert_eq!(rt.block_on(1, || async { 6 * 7 }), 42);
    let before = [0, 1].map(|i| rt.block_on(i, || async { current_stats().messages }));

    let (tx, rx) = mpsc::channel();
    let p = Arc::new(PingPong {
        handles: [rt.handle(0).clone(), rt.handle(1).clone()],
        seen: [AtomicU32::new(0), AtomicU32::new(0)],
        misrouted: AtomicU32::new(0),
        done: tx,
    });
    let p2 = p.clone();
    rt.handle(0).send(move || hop(p2, 0));
    let last = rx.recv_timeout(DEADLINE).expect("ping-pong did not finish");
    assert_eq!(last, HOPS);
    assert_eq!(p.misrouted.load(Ordering::Relaxed), 0, "a message ran on the wrong reactor");
    assert_eq!(p.seen[0].load(Ordering::Relaxed), HOPS / 2 + 1);
    assert_eq!(p.seen[1].load(Ordering::Relaxed), HOPS / 2);

    let after = [0, 1].map(|i| rt.block_on(i, || async { current_stats().messages }));
    assert!(after[0] - before[0] > u64::from(HOPS / 2), "reactor 0 counted {} messages", after[0] - before[0]);
    assert!(after[1] - before[1] >= u64::from(HOPS / 2), "reactor 1 counted {} messages", after[1] - before[1]);
}

/// Hops a self-reposting message may make before the test calls it a livelock: far more than
/// a reactor makes in the test's short sleep (a hop takes well under a microsecond, so a fast
/// machine made 200k of them within 20 ms and a smaller limit failed for no fault).
const REPOST_LIMIT: u32 = 20_000_000;

/// A message that sends itself to its own reactor again until `stop` is set (or the limit).
fn repost(h: ReactorHandle, stop: Arc<AtomicU32>, hops: Arc<AtomicU32>) {
    let n = hops.fetch_add(1, Ordering::Relaxed) + 1;
    if stop.load(Ordering::Relaxed) == 0 && n < REPOST_LIMIT {
        let h2 = h.clone();
        h.send(move || repost(h2, stop, hops));
    }
}

#[test]
fn a_message_reposting_itself_does_not_starve_the_reactor() {
    let rt = runtime(small());
    let (hops, stop_seen_after) = run_on(&rt, 0, || async {
        let stop = Arc::new(AtomicU32::new(0));
        let hops = Arc::new(AtomicU32::new(0));
        let (s2, h2) = (stop.clone(), hops.clone());
        let me = current_handle();
        me.clone().send(move || repost(me, s2, h2));
        // Timers, tasks and I/O must still get turns while the chain runs.
        sleep(Duration::from_millis(2)).await;
        stop.store(1, Ordering::Relaxed);
        let at_stop = hops.load(Ordering::Relaxed);
        // Let the chain notice the flag.
        sleep(Duration::from_millis(5)).await;
        (hops.load(Ordering::Relaxed), at_stop)
    });
    assert!(stop_seen_after > 0, "the chain should have run while the task slept");
    assert!(hops < REPOST_LIMIT, "a self-reposting message ran {hops} times in a row, starving timers and tasks");
    assert!(hops <= stop_seen_after + 1, "the chain stops one hop after the flag: {stop_seen_after} -> {hops}");
}

#[test]
fn wakers_fired_from_other_reactors_and_threads() {
    let rt = Runtime::new(RuntimeConfig { reactor: small(), ..RuntimeConfig::cores(2, false) }).unwrap();
    let ids = [rt.handle(0).id(), rt.handle(1).id()];
    let other = rt.handle(1).clone();
    let got = run_on(&rt, 0, move || async move {
        // Completed by a message on reactor 1: the waker is fired on another reactor's thread.
        let o = oneshot();
        let o2 = o.clone();
        other.send(move || oneshot_set(&o2, current_id()));
        let from_reactor = oneshot_get(&o).await;
        let here_after_first = current_id();

        // Completed by a plain thread after the reactor has gone to sleep.
        let o = oneshot();
        let o2 = o.clone();
        let sleeps = current_stats().sleeps;
        let t0 = Instant::now();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            oneshot_set(&o2, 99u32);
        });
        let from_thread = oneshot_get(&o).await;
        (from_reactor, here_after_first, from_thread, t0.elapsed(), current_stats().sleeps - sleeps, current_id())
    });
    let (from_reactor, here_after_first, from_thread, waited, slept, here) = got;
    assert_eq!(from_reactor, Some(ids[1]), "the value was made on reactor 1");
    assert_eq!(here_after_first, Some(ids[0]), "the task resumed on its own reactor");
    assert_eq!(from_thread, 99);
    assert!(waited >= Duration::from_millis(30));
    assert!(slept > 0, "reactor 0 should have slept while waiting for the thread");
    assert_eq!(here, Some(ids[0]));
}

#[test]
fn reactor_block_on_runs_on_the_calling_thread() {
    let r = Reactor::new(small()).unwrap();
    let id = r.id();
    let (who, sum) = r.block_on(async move {
        let h = spawn_local(async { (1..=10u32).sum::<u32>() });
        (current_id(), h.await)
    });
    assert_eq!(who, Some(id));
    assert_eq!(sum, 55);
    assert_eq!(current_id(), None, "block_on leaves the thread as it found it");
}

// ---------------------------------------------------------------------------------------------
// 2. Timers
// ---------------------------------------------------------------------------------------------

#[test]
fn sleeps_are_honoured_and_fire_in_deadline_order() {
    let rt = runtime(small());
    let results = run_on(&rt, 0, || async {
        let order = Rc::new(RefCell::new(Vec::new()));
        let start = Instant::now();
        let mut joins = Vec::new();
        for ms in [40u64, 10, 30, 0, 20, 5] {
            let order = order.clone();
            joins.push(spawn_local(async move {
                let t = Instant::now();
                sleep(Duration::from_millis(ms)).await;
                let el = t.elapsed();
                order.borrow_mut().push(ms);
                (ms, el)
            }));
        }
        // sleep_until with one base instant orders exactly by deadline.
        for ms in [15u64, 12] {
            let order = order.clone();
            joins.push(spawn_local(async move {
                sleep_until(start + Duration::from_millis(ms)).await;
                order.borrow_mut().push(ms);
                (ms, start.elapsed())
            }));
        }
        let mut elapsed = Vec::new();
        for j in joins {
            elapsed.push(j.await);
        }
        let order = order.borrow().clone();
        (order, elapsed)
    });
    let (order, elapsed) = results;
    assert_eq!(order, vec![0, 5, 10, 12, 15, 20, 30, 40]);
    for (ms, el) in elapsed {
        assert!(el >= Duration::from_millis(ms), "sleep of {ms} ms woke after {el:?}");
    }
}

#[test]
fn complete_at_completes_a_slot_no_earlier_than_its_deadline() {
    let rt = runtime(small());
    let out = run_on(&rt, 0, || async {
        let at = Instant::now() + Duration::from_millis(25);
        let id = slot_alloc(Some(IoBuf::from_slice(b"parked")));
        complete_at(at, id, 7);
        assert_eq!(slots_pending(), 1);
        let (res, buf) = SlotFuture::new(id).await;
        let now = Instant::now();
        let buf = buf.map(|b| b.as_slice().to_vec());

        // Immediate and deferred completions, through the same slot machinery.
        let a = slot_alloc(None);
        slot_complete(a, 1);
        let b = slot_alloc(None);
        slot_complete_deferred(b, 2);
        let pending_deferred = slots_pending();
        let ra = SlotFuture::new(a).await.0;
        let rb = SlotFuture::new(b).await.0;
        (res, now >= at, buf, pending_deferred, ra, rb, slots_pending())
    });
    let (res, on_time, buf, pending_deferred, ra, rb, pending) = out;
    assert_eq!(res, 7);
    assert!(on_time, "complete_at fired before its deadline");
    assert_eq!(buf.as_deref(), Some(&b"parked"[..]), "the parked buffer comes back with the completion");
    assert_eq!(pending_deferred, 1, "a deferred completion lands on the next turn");
    assert_eq!((ra, rb), (1, 2));
    assert_eq!(pending, 0);
}

// ---------------------------------------------------------------------------------------------
// 3. Idle back-off
// ---------------------------------------------------------------------------------------------

#[test]
fn idle_reactor_sleeps_uses_little_cpu_and_wakes_promptly() {
    let config = ReactorConfig::default();
    assert_eq!(config.idle_spin, Some(Duration::from_micros(200)));
    let rt = runtime(config);
    let h = rt.handle(0).clone();

    let (cpu0, st0) = rt.block_on(0, || async { (thread_cpu(), current_stats()) });
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    let (cpu1, st1) = rt.block_on(0, || async { (thread_cpu(), current_stats()) });
    let wall = t0.elapsed();
    let cpu = cpu1 - cpu0;
    assert!(st1.sleeps > st0.sleeps, "an idle reactor should block: {st0:?} -> {st1:?}");
    assert!(cpu * 10 < wall * 3, "idle reactor used {cpu:?} of CPU in {wall:?}");

    // A message sent while the reactor sleeps wakes it at once.
    let mut latencies = Vec::new();
    let mut last_sleeps = st1.sleeps;
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(30));
        let (tx, rx) = mpsc::channel();
        let sent = Instant::now();
        h.send(move || {
            let _ = tx.send((Instant::now(), current_stats().sleeps));
        });
        let (arrived, sleeps) = rx.recv_timeout(DEADLINE).expect("message to a sleeping reactor was not run");
        assert!(sleeps > last_sleeps, "the reactor was expected to be asleep when the message came");
        last_sleeps = sleeps;
        latencies.push(arrived.duration_since(sent));
    }
    let best = latencies.iter().min().unwrap();
    let worst = latencies.iter().max().unwrap();
    assert!(*best < Duration::from_millis(100), "wake-up latencies {latencies:?}");
    assert!(*worst < Duration::from_secs(1), "wake-up latencies {latencies:?}");
}

#[test]
fn busy_polling_reactor_never_sleeps() {
    let rt = runtime(ReactorConfig { idle_spin: None, ..small() });
    let st0 = rt.block_on(0, || async { current_stats() });
    std::thread::sleep(Duration::from_millis(50));
    let st1 = rt.block_on(0, || async { current_stats() });
    assert_eq!(st1.sleeps, 0);
    assert!(st1.turns > st0.turns + 100, "a busy-polling reactor keeps turning: {st0:?} -> {st1:?}");
}

#[test]
fn idle_reactor_with_a_timer_wakes_for_it() {
    let rt = runtime(small());
    let (slept, late, sleeps) = run_on(&rt, 0, || async {
        let s0 = current_stats().sleeps;
        let t = Instant::now();
        sleep(Duration::from_millis(60)).await;
        let el = t.elapsed();
        (el, el.saturating_sub(Duration::from_millis(60)), current_stats().sleeps - s0)
    });
    assert!(slept >= Duration::from_millis(60));
    assert!(late < Duration::from_millis(500), "timer fired {late:?} late");
    assert!(sleeps > 0, "the reactor should block until the timer instead of spinning");
}

// ---------------------------------------------------------------------------------------------
// 4. Many in-flight requests
// ---------------------------------------------------------------------------------------------

/// Write then read back N blocks with N spawned tasks of one request each.
fn many_in_flight_with_tasks(config: ReactorConfig) {
    let file = tempfile::tempfile().unwrap();
    let fd = file.as_raw_fd();
    let rt = runtime(config);
    let (write_res, read_ok, peak, pending, live) = run_on(&rt, 0, move || async move {
        assert!(uring_features().is_some(), "this test needs io_uring");
        let peak = Rc::new(Cell::new(0usize));
        let writes: Vec<_> = (0..N)
            .map(|i| {
                let peak = peak.clone();
                spawn_local(async move {
                    let fut = uring_rw(UringFd::Raw(fd), true, IoBuf::from_slice(&block(i)), (i * BS) as u64);
                    peak.set(peak.get().max(slots_pending()));
                    let (res, buf) = fut.await;
                    assert_eq!(buf.map(|b| b.len()), Some(BS), "the buffer comes back with the completion");
                    res
                })
            })
            .collect();
        let mut write_res = Vec::with_capacity(N);
        for w in writes {
            write_res.push(w.await);
        }
        let reads: Vec<_> = (0..N)
            .map(|i| {
                spawn_local(async move {
                    let (res, buf) = uring_rw(UringFd::Raw(fd), false, IoBuf::new(BS), (i * BS) as u64).await;
                    res == BS as i64 && buf.is_some_and(|b| b.as_slice() == block(i).as_slice())
                })
            })
            .collect();
        let mut read_ok = Vec::with_capacity(N);
        for r in reads {
            read_ok.push(r.await);
        }
        (write_res, read_ok, peak.get(), slots_pending(), live_tasks())
    });
    assert!(write_res.iter().all(|&r| r == BS as i64), "write results: {:?}", &write_res[..8]);
    let bad: Vec<_> = read_ok.iter().enumerate().filter(|(_, ok)| !**ok).map(|(i, _)| i).collect();
    assert!(bad.is_empty(), "blocks read back wrong: {bad:?}");
    assert!(peak >= 256, "requests should overlap; peak in flight {peak}");
    assert_eq!(pending, 0, "every slot is returned");
    assert_eq!(live, 1, "only the test's own task is left");
    // And the file really holds the pattern, read without the reactor.
    let mut buf = vec![0u8; BS];
    for i in [0, 1, N / 2, N - 1] {
        file.read_exact_at(&mut buf, (i * BS) as u64).unwrap();
        assert_eq!(buf, block(i), "block {i} on disk");
    }
}

/// N requests issued by one task before any is awaited: all N are in flight at once, beyond the
/// sizes of the submission and completion queues.
fn many_in_flight_one_task(config: ReactorConfig) {
    let file = tempfile::tempfile().unwrap();
    let fd = file.as_raw_fd();
    let rt = runtime(config);
    let (in_flight, writes, reads, pending) = run_on(&rt, 0, move || async move {
        let futs: Vec<_> =
            (0..N).map(|i| uring_rw(UringFd::Raw(fd), true, IoBuf::from_slice(&block(i)), (i * BS) as u64)).collect();
        let in_flight = slots_pending();
        let mut writes = 0;
        for f in futs {
            writes += usize::from(f.await.0 == BS as i64);
        }
        let futs: Vec<_> = (0..N).map(|i| uring_rw(UringFd::Raw(fd), false, IoBuf::new(BS), (i * BS) as u64)).collect();
        let mut reads = 0;
        for (i, f) in futs.into_iter().enumerate() {
            let (res, buf) = f.await;
            reads += usize::from(res == BS as i64 && buf.is_some_and(|b| b.as_slice() == block(i).as_slice()));
        }
        (in_flight, writes, reads, slots_pending())
    });
    assert_eq!(in_flight, N);
    assert_eq!(writes, N, "writes that completed in full");
    assert_eq!(reads, N, "reads that returned the right data");
    assert_eq!(pending, 0);
}

#[test]
fn many_in_flight_requests() {
    many_in_flight_with_tasks(small());
    many_in_flight_one_task(small());
}

#[test]
fn many_in_flight_requests_busy_polling() {
    // Without idle back-off the reactor never enters the kernel to wait, so everything it needs
    // (including completions the kernel had to hold back) must arrive while it polls.
    let config = ReactorConfig { idle_spin: None, ..small() };
    many_in_flight_one_task(config);
}

#[test]
fn blocking_job_result_wakes_the_task() {
    let rt = runtime(small());
    let (res, buf, on, sleeps) = run_on(&rt, 0, || async {
        let s0 = current_stats().sleeps;
        let (res, buf) = blocking(
            || {
                std::thread::sleep(Duration::from_millis(30));
                42
            },
            None,
        )
        .await;
        (res, buf.is_none(), current_id(), current_stats().sleeps - s0)
    });
    assert_eq!(res, 42);
    assert!(buf);
    assert_eq!(on, Some(rt.handle(0).id()));
    assert!(sleeps > 0, "the reactor should sleep while the job runs and be woken by its completion");
}

#[test]
fn lane_jobs_run_one_at_a_time_in_order_beside_other_jobs() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let rt = runtime(small());
    let (order, most, other_done_first) = run_on(&rt, 0, || async {
        let lane = Arc::new(Lane::new());
        let order = Arc::new(Mutex::new(Vec::new()));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut jobs = Vec::new();
        for i in 0..6i64 {
            let (order, running, most) = (order.clone(), running.clone(), most.clone());
            jobs.push(blocking_in(
                &lane,
                move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                    order.lock().unwrap().push(i);
                    running.fetch_sub(1, Ordering::SeqCst);
                    i
                },
                None,
            ));
        }
        // A job outside the lane is not held up behind it: the pool has other threads.
        let other = blocking(|| 7, None).await.0;
        let other_done_first = order.lock().unwrap().len() < 6;
        for (i, j) in jobs.into_iter().enumerate() {
            assert_eq!(j.await.0, i as i64);
        }
        assert_eq!(other, 7);
        let order = order.lock().unwrap().clone();
        (order, most.load(Ordering::SeqCst), other_done_first)
    });
    assert_eq!(order, vec![0, 1, 2, 3, 4, 5], "lane jobs run in submission order");
    assert_eq!(most, 1, "lane jobs never overlap");
    assert!(other_done_first, "a job outside the lane finished before the lane's 120 ms of jobs");
}

// ---------------------------------------------------------------------------------------------
// 5. io_uring missing, or some of its features
// ---------------------------------------------------------------------------------------------

#[test]
fn without_io_uring_blocking_jobs_do_the_io() {
    let file = tempfile::tempfile().unwrap();
    let fd = file.as_raw_fd();
    let rt = runtime(ReactorConfig { uring: UringMode::Disabled, ..small() });
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 13 % 251) as u8).collect();
    let expect = data.clone();
    let out = run_on(&rt, 0, move || async move {
        let features = uring_features();
        let s0 = current_stats().sleeps;
        let t0 = Instant::now();
        // The job sleeps first, so the reactor goes to sleep and must be woken by the completion.
        let (wrote, wbuf) = pwrite_blocking(fd, &data, 4096, Duration::from_millis(40)).await;
        let waited = t0.elapsed();
        let slept = current_stats().sleeps - s0;
        let (read, rbuf) = pread_blocking(fd, data.len(), 4096).await;
        let same = rbuf.is_some_and(|b| b.as_slice() == data.as_slice());
        (features.is_none(), wrote, wbuf.is_some(), waited, slept, read, same, slots_pending())
    });
    let (no_ring, wrote, wbuf, waited, slept, read, same, pending) = out;
    assert!(no_ring, "UringMode::Disabled must run without a ring");
    assert_eq!(wrote, 8192);
    assert!(wbuf, "the written buffer comes back");
    assert!(waited >= Duration::from_millis(40));
    assert!(waited < Duration::from_secs(2), "completion took {waited:?} to wake the reactor");
    assert!(slept > 0, "the reactor should have slept while the job ran");
    assert_eq!(read, 8192);
    assert!(same, "pread returned what pwrite wrote");
    assert_eq!(pending, 0);
    let mut check = vec![0u8; 8192];
    file.read_exact_at(&mut check, 4096).unwrap();
    assert_eq!(check, expect);
}

#[test]
fn disabled_features_fall_back() {
    let file = tempfile::tempfile().unwrap();
    let fd = file.as_raw_fd();
    let rt = runtime(ReactorConfig { disable: vec!["fixed_files", "fixed_buffers", "fallocate"], ..small() });
    let out = run_on(&rt, 0, move || async move {
        let f = uring_features().expect("a ring");
        let registered = register_file(fd);
        let buf = IoBuf::from_slice(&block(3));
        let fixed = buf.fixed_index(current_id().unwrap());
        let (w, _) = uring_rw(UringFd::Raw(fd), true, buf, 8192).await;
        let (r, back) = uring_rw(UringFd::Raw(fd), false, IoBuf::new(BS), 8192).await;
        let same = back.is_some_and(|b| b.as_slice() == block(3).as_slice());
        (f, registered, fixed, w, r, same)
    });
    let (f, registered, fixed, w, r, same) = out;
    assert!(f.read_write);
    assert!(!f.fixed_files && !f.fixed_buffers && !f.fallocate, "{f:?}");
    assert_eq!(registered, None, "no file table without fixed files");
    assert_eq!(fixed, None, "pool buffers are not fixed buffers when those are disabled");
    assert_eq!((w, r), (BS as i64, BS as i64));
    assert!(same);
}

#[test]
fn fixed_files_and_fixed_buffers() {
    let file = tempfile::tempfile().unwrap();
    let fd = file.as_raw_fd();
    let rt = runtime(small());
    let out = run_on(&rt, 0, move || async move {
        let f = uring_features().expect("a ring");
        let me = current_id().unwrap();
        let idx = register_file(fd).expect("register_file with fixed files available");
        // A pool buffer (fixed buffer 0 when registered) through a registered file.
        let buf = IoBuf::from_slice(&block(7));
        let pool_fixed = buf.fixed_index(me);
        let (w1, _) = uring_rw(UringFd::Fixed(idx), true, buf, 0).await;
        let (r1, back1) = uring_rw(UringFd::Fixed(idx), false, IoBuf::new(BS), 0).await;
        let ok1 = back1.is_some_and(|b| b.as_slice() == block(7).as_slice());
        // A heap buffer is never a fixed buffer, and works as well.
        let heap = IoBuf::heap(BS);
        let heap_fixed = heap.fixed_index(me);
        let (r2, back2) = uring_rw(UringFd::Fixed(idx), false, heap, 0).await;
        let ok2 = back2.is_some_and(|b| b.as_slice() == block(7).as_slice());
        // A window inside a larger pool buffer.
        let mut big = IoBuf::new(4 * BS);
        big.slice(BS, BS);
        let (r3, back3) = uring_rw(UringFd::Raw(fd), false, big, 0).await;
        let ok3 = back3.is_some_and(|mut b| {
            let window_ok = b.as_slice() == block(7).as_slice();
            b.reset(4 * BS);
            window_ok && b[..BS].iter().all(|&x| x == 0) && b[2 * BS..].iter().all(|&x| x == 0)
        });
        // fallocate and fsync through the ring.
        let (fa, _) = uring_fallocate(UringFd::Fixed(idx), 0, 0, 1 << 20).await;
        let (fs, _) = uring_fsync(UringFd::Fixed(idx), true).await;
        unregister_file(idx);
        let again = register_file(fd);
        if let Some(i) = again {
            unregister_file(i);
        }
        (f, pool_fixed, heap_fixed, [w1, r1, r2, r3], [ok1, ok2, ok3], fa, fs, again.is_some(), slots_pending())
    });
    let (f, pool_fixed, heap_fixed, rw, oks, fa, fs, again, pending) = out;
    assert!(f.fixed_files && f.fallocate && f.read_write, "{f:?}");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // Without CAP_IPC_LOCK the registration may be refused by RLIMIT_MEMLOCK; as root it is not.
        assert!(f.fixed_buffers, "{f:?}");
    }
    assert_eq!(pool_fixed, f.fixed_buffers.then_some(0), "pool buffers are fixed buffer 0 when registered");
    assert_eq!(heap_fixed, None);
    assert_eq!(rw, [BS as i64; 4]);
    assert_eq!(oks, [true; 3]);
    assert_eq!((fa, fs), (0, 0));
    assert_eq!(file.metadata().unwrap().len(), 1 << 20, "fallocate extended the file");
    assert!(again, "an unregistered slot can be registered again");
    assert_eq!(pending, 0);
}

// ---------------------------------------------------------------------------------------------
// 6. Dropped futures over in-flight operations
// ---------------------------------------------------------------------------------------------

#[test]
fn dropped_read_keeps_its_buffer_until_completion() {
    let (rp, wp) = pipe();
    let (rfd, wfd) = (rp.as_raw_fd(), wp.as_raw_fd());
    let rt = runtime(small());
    let out = run_on(&rt, 0, move || async move {
        let buf = IoBuf::new(BS);
        let addr = buf.as_ptr() as usize;
        let fut = uring_rw(UringFd::Raw(rfd), false, buf, 0);
        // Let the read reach the kernel and park there (the pipe is empty).
        sleep(Duration::from_millis(10)).await;
        drop(fut);
        let pending_after_drop = slots_pending();
        // The orphaned buffer must not be handed out again while the kernel may write it.
        let other = IoBuf::new(BS);
        let reused_early = other.as_ptr() as usize == addr;
        // Now give the read its data, from another thread.
        let wrote = std::thread::spawn(move || write_fd(wfd, b"late data")).join().unwrap();
        let t = Instant::now();
        while slots_pending() > 0 && t.elapsed() < Duration::from_secs(5) {
            sleep(Duration::from_millis(1)).await;
        }
        let pending_after = slots_pending();
        let other_clean = other.iter().all(|&b| b == 0);
        drop(other);
        // The orphan's chunk is back in the pool only now.
        let reused_later = IoBuf::new(BS).as_ptr() as usize == addr;
        // The reactor is still fine: a new read of the same pipe works.
        write_fd(wfd, b"next");
        let (n, b) = uring_rw(UringFd::Raw(rfd), false, IoBuf::new(BS), 0).await;
        let next = b.map(|b| b[..n.max(0) as usize].to_vec());
        (pending_after_drop, reused_early, wrote, pending_after, other_clean, reused_later, n, next)
    });
    let (pending_after_drop, reused_early, wrote, pending_after, other_clean, reused_later, n, next) = out;
    assert_eq!(pending_after_drop, 1, "a dropped in-flight read stays pending");
    assert_eq!(wrote, 9);
    assert!(!reused_early, "the buffer of an in-flight read was freed early");
    assert_eq!(pending_after, 0, "the orphaned read completed and released its slot");
    assert!(other_clean, "the kernel wrote into a buffer that was not the read's");
    assert!(reused_later, "the orphan's buffer goes back to the pool after completion");
    let mut rest = [0u8; 16];
    assert_eq!(read_fd(rfd, &mut rest), Err(libc::EAGAIN), "the orphaned read consumed the pipe's data");
    assert_eq!(n, 4);
    assert_eq!(next.as_deref(), Some(&b"next"[..]));
}

#[test]
fn dropped_blocking_job_keeps_its_buffer_until_completion() {
    let rt = runtime(small());
    let out = run_on(&rt, 0, || async {
        let mut buf = IoBuf::new(BS);
        let addr = buf.as_mut_ptr() as usize;
        let fut = blocking(
            move || {
                std::thread::sleep(Duration::from_millis(30));
                // SAFETY: the buffer is parked in the slot until this job's completion is
                // delivered, even when the future awaiting it was dropped.
                unsafe { std::ptr::write_bytes(addr as *mut u8, 0xAB, BS) };
                1
            },
            Some(buf),
        );
        drop(fut);
        let other = IoBuf::new(BS);
        let reused_early = other.as_ptr() as usize == addr;
        let t = Instant::now();
        while slots_pending() > 0 && t.elapsed() < Duration::from_secs(5) {
            sleep(Duration::from_millis(1)).await;
        }
        (reused_early, other.iter().all(|&b| b == 0), slots_pending())
    });
    assert_eq!(out, (false, true, 0));
}

#[test]
fn shutdown_with_an_abandoned_read_is_prompt() {
    let (rp, wp) = pipe();
    let rfd = rp.as_raw_fd();
    let rt = runtime(small());
    let pending = run_on(&rt, 0, move || async move {
        let fut = uring_rw(UringFd::Raw(rfd), false, IoBuf::new(BS), 0);
        sleep(Duration::from_millis(10)).await;
        drop(fut);
        // A second one still owned by a task when the reactor stops.
        spawn_local(async move {
            let _ = uring_rw(UringFd::Raw(rfd), false, IoBuf::new(BS), 0).await;
        });
        yield_now().await;
        slots_pending()
    });
    assert_eq!(pending, 2);
    let t = Instant::now();
    drop(rt);
    let took = t.elapsed();
    assert!(took < Duration::from_secs(3), "stopping a reactor with reads parked on an idle pipe took {took:?}");
    // Nothing of the cancelled reads is left to take data from the pipe.
    assert_eq!(write_fd(wp.as_raw_fd(), b"x"), 1);
    let mut b = [0u8; 4];
    assert_eq!(read_fd(rfd, &mut b), Ok(1));
}

#[test]
fn shutdown_waits_for_blocking_jobs_that_use_a_buffer() {
    let rt = runtime(small());
    let (started_tx, started_rx) = mpsc::channel();
    let finished = Arc::new(AtomicU32::new(0));
    let f2 = finished.clone();
    rt.handle(0).spawn(move || async move {
        // A pool buffer: freeing it early would hand it back to a pool that is then unmapped.
        let mut buf = IoBuf::new(BS);
        let addr = buf.as_mut_ptr() as usize;
        let _ = blocking(
            move || {
                let _ = started_tx.send(());
                std::thread::sleep(Duration::from_millis(100));
                // SAFETY: the buffer is parked in the slot until this job's completion is
                // delivered, and a reactor being dropped waits for that.
                unsafe { std::ptr::write_bytes(addr as *mut u8, 0xCD, BS) };
                f2.store(1, Ordering::SeqCst);
                0
            },
            Some(buf),
        )
        .await;
    });
    started_rx.recv_timeout(DEADLINE).expect("blocking job did not start");
    drop(rt);
    assert_eq!(finished.load(Ordering::SeqCst), 1, "the reactor went away while a job still used its buffer");
}

// ---------------------------------------------------------------------------------------------
// 7. Executor: join handles, yields, pollers
// ---------------------------------------------------------------------------------------------

#[test]
fn join_handles_return_outputs_and_yield_lets_others_run() {
    let rt = runtime(small());
    let out = run_on(&rt, 0, || async {
        let a = spawn_local(async { String::from("from a") });
        let b = spawn_local(async {
            yield_now().await;
            vec![1u8, 2, 3]
        });
        let flag = Rc::new(Cell::new(false));
        let f2 = flag.clone();
        let setter = spawn_local(async move { f2.set(true) });
        let before_yield = flag.get();
        let finished_before = setter.is_finished();
        yield_now().await;
        let after_yield = flag.get();
        let finished_after = setter.is_finished();
        setter.await;
        // Yields interleave two tasks turn by turn.
        let trace = Rc::new(RefCell::new(Vec::new()));
        let mut joins = Vec::new();
        for name in ['x', 'y'] {
            let trace = trace.clone();
            joins.push(spawn_local(async move {
                for i in 0..3 {
                    trace.borrow_mut().push(format!("{name}{i}"));
                    yield_now().await;
                }
                name
            }));
        }
        let mut names = String::new();
        for j in joins {
            names.push(j.await);
        }
        let live_before = live_tasks();
        let trace = trace.borrow().join(",");
        (a.await, b.await, before_yield, finished_before, after_yield, finished_after, trace, names, live_before)
    });
    let (a, b, before_yield, finished_before, after_yield, finished_after, trace, names, live) = out;
    assert_eq!(a, "from a");
    assert_eq!(b, vec![1, 2, 3]);
    assert!(!before_yield && !finished_before, "a spawned task does not run before the spawner yields");
    assert!(after_yield && finished_after, "yield_now lets the other task run");
    assert_eq!(trace, "x0,y0,x1,y1,x2,y2");
    assert_eq!(names, "xy");
    assert_eq!(live, 1, "finished tasks are not counted, even before their handles are awaited");
}

#[test]
fn pollers_run_each_turn_and_can_remove_themselves() {
    let rt = runtime(small());
    let out = run_on(&rt, 0, || async {
        // A poller that removes itself on its third run.
        let runs = Rc::new(Cell::new(0u32));
        let me = Rc::new(Cell::new(None));
        let (r2, m2) = (runs.clone(), me.clone());
        let id = add_poller(move || {
            r2.set(r2.get() + 1);
            if r2.get() == 3 {
                remove_poller(m2.get().expect("id set"));
            }
            0
        });
        me.set(Some(id));
        // A poller removed from a task.
        let other = Rc::new(Cell::new(0u32));
        let o2 = other.clone();
        let id2 = add_poller(move || {
            o2.set(o2.get() + 1);
            0
        });
        let mut runs_per_yield = Vec::new();
        for _ in 0..10 {
            let before = other.get();
            yield_now().await;
            runs_per_yield.push(other.get() - before);
        }
        remove_poller(id2);
        let other_at_removal = other.get();
        for _ in 0..10 {
            yield_now().await;
        }
        sleep(Duration::from_millis(5)).await;
        (runs.get(), runs_per_yield, other_at_removal, other.get())
    });
    let (runs, runs_per_yield, other_at_removal, other_end) = out;
    assert_eq!(runs, 3, "a poller that removed itself kept running");
    assert_eq!(runs_per_yield, [1; 10], "each yield_now lets the pollers run once");
    assert_eq!(other_at_removal, 10);
    assert_eq!(other_end, other_at_removal, "a removed poller kept running");
}

#[test]
fn spawn_from_another_thread_and_current_handle() {
    let rt = runtime(small());
    let id = rt.handle(0).id();
    let (tx, rx) = mpsc::channel();
    rt.handle(0).spawn(move || async move {
        let h = current_handle();
        // Buffers from the reactor's pool are aligned whatever their size.
        let aligned = [1, 100, 4096, 5000, 1 << 20].iter().all(|&n| IoBuf::new(n).as_ptr() as usize & (IOBUF_ALIGN - 1) == 0);
        let _ = tx.send((current_id(), h.id(), aligned));
    });
    let (cur, hid, aligned) = rx.recv_timeout(DEADLINE).unwrap();
    assert_eq!(cur, Some(id));
    assert_eq!(hid, id);
    assert!(aligned);
}

#[test]
fn a_future_run_on_another_reactor_is_awaited_here() {
    let two = || {
        Runtime::new(RuntimeConfig { cores: vec![0, 1], pin: false, reactor: small(), name: None }).expect("start two reactors")
    };
    let rt = two();
    let other = rt.handle(1).clone();
    let (on, v) = run_on(&rt, 0, move || async move {
        // The other reactor sleeps (so this one really waits for a cross-thread wake).
        let j = other.run(|| async {
            sleep(Duration::from_millis(20)).await;
            (current_id(), 42u32)
        });
        j.await.expect("the remote future ran to completion")
    });
    assert_eq!(on, Some(rt.handle(1).id()), "it ran on the other reactor");
    assert_eq!(v, 42);

    // A reactor that stops with the task unfinished: the join ends with None, not a hang.
    let rt2 = two();
    let doomed = rt2.handle(1).clone();
    let stopper = rt2.handle(1).clone();
    let got = run_on(&rt2, 0, move || async move {
        let j = doomed.run(|| async {
            sleep(Duration::from_secs(3600)).await;
            1u32
        });
        sleep(Duration::from_millis(20)).await;
        stopper.stop();
        j.await
    });
    assert_eq!(got, None);
}
