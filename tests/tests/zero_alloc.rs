//! Steady-state I/O allocates nothing: a counting allocator counts heap allocations made on
//! the reactor thread while the benchmark loop runs, and a run of 100 000 requests must make
//! exactly as many allocations as a run of 1 000 (the per-run setup), for null-co and for
//! raw over a file through io_uring, reads and writes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use basalt_engine::{Backend, Graph, OpenFlags, Opts};
use basalt_reactor::{Reactor, ReactorConfig};
use basalt_tools::bench::{self, BenchJob, Pattern};

struct Counting;

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: delegates to the system allocator; the bookkeeping touches only const-initialised
// thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if ON.with(Cell::get) {
            COUNT.with(|c| c.set(c.get() + 1));
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if ON.with(Cell::get) {
            COUNT.with(|c| c.set(c.get() + 1));
        }
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn count_allocs(opts: Opts, count: u64, write_pct: u8) -> u64 {
    count_allocs_wt(opts, count, write_pct, false)
}

fn count_allocs_wt(opts: Opts, count: u64, write_pct: u8, writethrough: bool) -> u64 {
    let r = Reactor::new(ReactorConfig { idle_spin: None, ..ReactorConfig::default() }).unwrap();
    r.block_on(async move {
        let graph = Graph::new(basalt_formats::registry());
        let node = graph.open(opts, OpenFlags::read_write()).await.unwrap();
        let mut be = Backend::new(node).unwrap();
        be.set_writethrough(writethrough);
        let job = BenchJob {
            count,
            depth: 16,
            bufsize: 4096,
            pattern: Pattern::Random,
            write_pct,
            latency: true,
            ..BenchJob::default()
        };
        // Warm up: slabs, queues and pools grow to their steady size.
        let warm = bench::run(be.clone(), BenchJob { count: 2000, ..job.clone() }).await;
        assert!(warm.error.is_none());
        ON.with(|c| c.set(true));
        COUNT.with(|c| c.set(0));
        let res = bench::run(be, job).await;
        ON.with(|c| c.set(false));
        assert!(res.error.is_none(), "{:?}", res.error);
        assert_eq!(res.reads + res.writes, count);
        COUNT.with(Cell::get)
    })
}

fn check(opts: Opts, write_pct: u8) {
    let small = count_allocs(opts.clone(), 1_000, write_pct);
    let large = count_allocs(opts, 100_000, write_pct);
    assert_eq!(small, large, "allocations grew with the number of requests: {small} for 1k, {large} for 100k");
}

#[test]
fn null_co_reads_and_writes_allocate_nothing() {
    let mut o = Opts::new();
    o.set("driver", "raw");
    o.set("file.driver", "null-co");
    check(o.clone(), 0);
    check(o, 100);
}

#[test]
fn raw_over_file_reads_and_writes_allocate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("z.raw");
    std::fs::write(&path, vec![1u8; 16 << 20]).unwrap();
    let mut o = Opts::new();
    o.set("driver", "raw");
    o.set("file.filename", path.to_str().unwrap());
    check(o.clone(), 0);
    check(o, 50);
}

#[test]
fn the_counter_sees_per_request_allocations() {
    // Writethrough writes take a boxed slow path (write, then flush): the counter must see
    // allocations grow with the request count, or the tests above prove nothing.
    let mut o = Opts::new();
    o.set("driver", "raw");
    o.set("file.driver", "null-co");
    let small = count_allocs_wt(o.clone(), 1_000, 100, true);
    let large = count_allocs_wt(o, 100_000, 100, true);
    assert!(large >= small + 99_000, "{small} vs {large}");
}
