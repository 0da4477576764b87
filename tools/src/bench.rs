//! The benchmark loop shared by `basalt-img bench` and `basalt-bench`.
//!
//! `depth` tasks on one reactor each keep one request in flight through a [`Backend`], so the
//! whole stack (backend checks, engine queue, format, protocol, io_uring) is exercised exactly
//! as a user's I/O would be. Offsets are either sequential with a step (qemu-img bench's
//! pattern, wrapping at the end of the image) or uniformly random and aligned to the block
//! size (fio's `randread`/`randwrite`). Each task reuses one buffer from the reactor's pool
//! and latencies go into a fixed histogram, so the loop allocates nothing per I/O.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use basalt_engine::{Backend, IoStatus, WriteFlags};
use basalt_reactor::{spawn_local, yield_now, IoBuf};

/// How offsets advance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Start at `offset`, advance by `step`, wrap to `offset`... as qemu-img bench.
    Sequential {
        /// Step between requests.
        step: u64,
    },
    /// Uniformly random, aligned to the request size.
    Random,
}

/// One benchmark job.
#[derive(Clone, Debug)]
pub struct BenchJob {
    /// Number of requests (0 = run for `runtime`).
    pub count: u64,
    /// Run at most this long.
    pub runtime: Option<Duration>,
    /// Requests in flight.
    pub depth: usize,
    /// Bytes per request.
    pub bufsize: usize,
    /// Start offset.
    pub offset: u64,
    /// Offset pattern.
    pub pattern: Pattern,
    /// Percentage of writes (0 = all reads, 100 = all writes).
    pub write_pct: u8,
    /// Byte written by writes.
    pub fill: u8,
    /// Flush every this many requests (0 = never).
    pub flush_interval: u64,
    /// Wait for in-flight requests before a flush.
    pub drain: bool,
    /// Record per-request latency.
    pub latency: bool,
    /// Seed of the offset generator.
    pub seed: u64,
}

impl Default for BenchJob {
    fn default() -> Self {
        BenchJob {
            count: 75000,
            runtime: None,
            depth: 64,
            bufsize: 4096,
            offset: 0,
            pattern: Pattern::Sequential { step: 4096 },
            write_pct: 0,
            fill: 0,
            flush_interval: 0,
            drain: true,
            latency: false,
            seed: 0x9e37_79b9_7f4a_7c15,
        }
    }
}

/// Latency histogram: 64 power-of-two ranges each split into 16 linear buckets (ns).
pub struct Histogram {
    buckets: Vec<u64>,
    /// Samples.
    pub count: u64,
    /// Sum of samples (ns).
    pub sum: u128,
    /// Sum of squares (ns^2), for the standard deviation.
    pub sum_sq: u128,
    /// Smallest sample (ns).
    pub min: u64,
    /// Largest sample (ns).
    pub max: u64,
}

const SUB: usize = 16;

impl Default for Histogram {
    fn default() -> Self {
        Histogram { buckets: vec![0; 64 * SUB], count: 0, sum: 0, sum_sq: 0, min: u64::MAX, max: 0 }
    }
}

impl Histogram {
    fn index(v: u64) -> usize {
        if v < SUB as u64 {
            return v as usize;
        }
        let hi = 63 - v.leading_zeros() as usize;
        let shift = hi - 4;
        let sub = ((v >> shift) as usize) & (SUB - 1);
        (hi - 3) * SUB + sub
    }

    fn value(i: usize) -> u64 {
        if i < SUB {
            return i as u64;
        }
        let hi = i / SUB + 3;
        let sub = (i % SUB) as u64;
        ((SUB as u64) | sub) << (hi - 4)
    }

    /// Record one sample.
    pub fn record(&mut self, ns: u64) {
        self.buckets[Self::index(ns)] += 1;
        self.count += 1;
        self.sum += u128::from(ns);
        self.sum_sq += u128::from(ns) * u128::from(ns);
        self.min = self.min.min(ns);
        self.max = self.max.max(ns);
    }

    /// Merge another histogram in.
    pub fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a += b;
        }
        self.count += o.count;
        self.sum += o.sum;
        self.sum_sq += o.sum_sq;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
    }

    /// The value below which `p` percent of samples fall (ns).
    pub fn percentile(&self, p: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let target = ((p / 100.0) * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= target {
                return Self::value(i).clamp(self.min, self.max);
            }
        }
        self.max
    }

    /// Mean (ns).
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// Standard deviation (ns).
    pub fn stdev(&self) -> f64 {
        if self.count < 2 {
            return 0.0;
        }
        let m = self.mean();
        ((self.sum_sq as f64 / self.count as f64) - m * m).max(0.0).sqrt()
    }
}

/// What a job measured.
pub struct BenchResult {
    /// Completed reads.
    pub reads: u64,
    /// Completed writes.
    pub writes: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Read latencies.
    pub read_lat: Histogram,
    /// Write latencies.
    pub write_lat: Histogram,
    /// First error seen, if any.
    pub error: Option<(u64, IoStatus)>,
}

struct State {
    issued: Cell<u64>,
    next_off: Cell<u64>,
    in_flight: Cell<usize>,
    flushing: Cell<bool>,
    stop: Cell<bool>,
    rng: Cell<u64>,
    reads: Cell<u64>,
    writes: Cell<u64>,
    error: Cell<Option<(u64, IoStatus)>>,
    read_lat: RefCell<Histogram>,
    write_lat: RefCell<Histogram>,
}

fn xorshift(s: &Cell<u64>) -> u64 {
    let mut x = s.get();
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    s.set(x);
    x
}

/// Run `job` against `be` on the current reactor.
pub async fn run(be: Backend, job: BenchJob) -> BenchResult {
    let size = be.size();
    let bs = job.bufsize as u64;
    let st = Rc::new(State {
        issued: Cell::new(0),
        next_off: Cell::new(job.offset),
        in_flight: Cell::new(0),
        flushing: Cell::new(false),
        stop: Cell::new(false),
        rng: Cell::new(job.seed | 1),
        reads: Cell::new(0),
        writes: Cell::new(0),
        error: Cell::new(None),
        read_lat: RefCell::new(Histogram::default()),
        write_lat: RefCell::new(Histogram::default()),
    });
    let start = Instant::now();
    let deadline = job.runtime.map(|d| start + d);
    let mut handles = Vec::with_capacity(job.depth);
    for _ in 0..job.depth.max(1) {
        let be = be.clone();
        let st = st.clone();
        let job = job.clone();
        handles.push(spawn_local(async move {
            let mut buf = IoBuf::new(job.bufsize);
            buf.as_mut_slice().fill(job.fill);
            let slots = size.checked_sub(bs).map(|s| s / bs + 1).unwrap_or(0);
            let mut checked = 0u32;
            loop {
                while st.flushing.get() {
                    yield_now().await;
                }
                if st.stop.get() || (job.count > 0 && st.issued.get() >= job.count) {
                    break;
                }
                if let Some(d) = deadline {
                    checked = checked.wrapping_add(1);
                    if checked.is_multiple_of(64) && Instant::now() >= d {
                        st.stop.set(true);
                        break;
                    }
                }
                let n = st.issued.get();
                st.issued.set(n + 1);
                let off = match job.pattern {
                    Pattern::Sequential { step } => {
                        let off = st.next_off.get();
                        let mut next = off + step;
                        if next + bs > size {
                            next = job.offset.min(size.saturating_sub(bs));
                            if next + bs > size {
                                next = 0;
                            }
                        }
                        st.next_off.set(next);
                        off
                    }
                    Pattern::Random => {
                        if slots == 0 {
                            0
                        } else {
                            (xorshift(&st.rng) % slots) * bs
                        }
                    }
                };
                let write = match job.write_pct {
                    0 => false,
                    100 => true,
                    p => (xorshift(&st.rng) % 100) < u64::from(p),
                };
                st.in_flight.set(st.in_flight.get() + 1);
                let t0 = job.latency.then(Instant::now);
                let d = if write { be.write(off, buf, WriteFlags::default()).await } else { be.read(off, buf).await };
                st.in_flight.set(st.in_flight.get() - 1);
                buf = match d.buf {
                    Some(b) => b,
                    None => IoBuf::new(job.bufsize),
                };
                if let Err(e) = d.res {
                    if st.error.get().is_none() {
                        st.error.set(Some((off, e)));
                    }
                    st.stop.set(true);
                    break;
                }
                if let Some(t0) = t0 {
                    let ns = t0.elapsed().as_nanos() as u64;
                    if write {
                        st.write_lat.borrow_mut().record(ns);
                    } else {
                        st.read_lat.borrow_mut().record(ns);
                    }
                }
                if write {
                    st.writes.set(st.writes.get() + 1);
                } else {
                    st.reads.set(st.reads.get() + 1);
                }
                if job.flush_interval > 0 && (n + 1).is_multiple_of(job.flush_interval) {
                    st.flushing.set(true);
                    if job.drain {
                        while st.in_flight.get() > 0 {
                            yield_now().await;
                        }
                    }
                    let f = be.flush().await;
                    st.flushing.set(false);
                    if let Err(e) = f.res {
                        st.error.set(Some((off, e)));
                        st.stop.set(true);
                        break;
                    }
                }
            }
        }));
    }
    for h in handles {
        h.await;
    }
    let elapsed = start.elapsed();
    // Close as qemu-img bench does: flush (untimed), so formats write back their metadata.
    if let Err(e) = be.flush().await.res {
        if st.error.get().is_none() {
            st.error.set(Some((0, e)));
        }
    }
    let read_lat = st.read_lat.take();
    let write_lat = st.write_lat.take();
    BenchResult { reads: st.reads.get(), writes: st.writes.get(), elapsed, read_lat, write_lat, error: st.error.get() }
}
