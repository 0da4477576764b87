//! The copy engine behind `basalt-img convert`: several workers copy chunks of the sources into
//! the target, skipping holes the source reports through block status and, within data,
//! granules that are all zero (`-S`), so the target stays sparse.
//!
//! Each worker claims the next chunk (up to the buffer size, never across two sources), asks
//! the source what it holds, reads only the data parts into its buffer, and writes the runs of
//! data and zeroes it finds. Zero runs are skipped when the target is known to read as zeroes,
//! else written with `write_zeroes` (unmap allowed). Without `-W` the writes happen in order:
//! a worker waits for every earlier chunk to be written before writing its own.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use basalt_engine::{Backend, IoStatus, WriteFlags, ZeroFlags};
use basalt_reactor::{spawn_local, IoBuf};

/// How to copy.
#[derive(Clone, Debug)]
pub struct CopyOpts {
    /// Parallel workers (`-m`).
    pub workers: usize,
    /// Writes may complete out of order (`-W`).
    pub out_of_order: bool,
    /// Zero-detection granule in bytes (`-S`); 0 writes everything.
    pub sparse_size: u64,
    /// The target already reads as zeroes.
    pub target_zero: bool,
    /// Keep going on read errors, writing zeroes (`--salvage`).
    pub salvage: bool,
    /// Bytes per second at most (`-r`), 0 for no limit.
    pub rate: u64,
    /// Bytes per chunk.
    pub chunk: u64,
    /// Write data compressed, in clusters of this size (`-c`).
    pub compress: Option<u64>,
}

/// Why a copy failed: the byte and the error, as qemu-img reports them.
#[derive(Debug)]
pub enum CopyError {
    /// Reading the source at this offset.
    Read(u64, IoStatus),
    /// Writing the target at this offset.
    Write(u64, IoStatus),
}

impl std::fmt::Display for CopyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CopyError::Read(o, e) => write!(f, "error while reading at byte {o}: {e}"),
            CopyError::Write(o, e) => write!(f, "error while writing at byte {o}: {e}"),
        }
    }
}

struct Shared {
    sources: Vec<Backend>,
    bases: Vec<u64>,
    total: u64,
    target: Backend,
    o: CopyOpts,
    next_claim: Cell<u64>,
    next_seq: Cell<u64>,
    written_seq: Cell<u64>,
    waiters: RefCell<Vec<Waker>>,
    done_bytes: Cell<u64>,
    error: RefCell<Option<CopyError>>,
    start: Instant,
    progress: Box<dyn Fn(u64, u64)>,
}

/// Copy the concatenation of `sources` into `target` from offset 0. `progress(done, total)` is
/// called as chunks complete.
pub async fn copy(sources: Vec<Backend>, target: Backend, o: CopyOpts, progress: Box<dyn Fn(u64, u64)>) -> Result<(), CopyError> {
    let mut bases = Vec::with_capacity(sources.len());
    let mut total = 0;
    for s in &sources {
        bases.push(total);
        total += s.size();
    }
    let workers = o.workers.max(1);
    let sh = Rc::new(Shared {
        sources,
        bases,
        total,
        target,
        o,
        next_claim: Cell::new(0),
        next_seq: Cell::new(0),
        written_seq: Cell::new(0),
        waiters: RefCell::new(Vec::new()),
        done_bytes: Cell::new(0),
        error: RefCell::new(None),
        start: Instant::now(),
        progress,
    });
    (sh.progress)(0, total);
    let handles: Vec<_> = (0..workers).map(|_| spawn_local(worker(sh.clone()))).collect();
    for h in handles {
        h.await;
    }
    let err = sh.error.borrow_mut().take();
    match err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

impl Shared {
    /// Claim the next chunk: (sequence, source index, offset in source, length).
    fn claim(&self) -> Option<(u64, usize, u64, u64)> {
        if self.error.borrow().is_some() {
            return None;
        }
        let at = self.next_claim.get();
        if at >= self.total {
            return None;
        }
        let idx = self.bases.iter().rposition(|b| *b <= at).unwrap_or(0);
        let src_end = self.bases[idx] + self.sources[idx].size();
        let len = self.o.chunk.min(src_end - at);
        if len == 0 {
            // An empty source: skip it.
            self.next_claim.set(src_end.max(at + 1).min(self.total));
            return self.claim();
        }
        self.next_claim.set(at + len);
        let seq = self.next_seq.get();
        self.next_seq.set(seq + 1);
        Some((seq, idx, at - self.bases[idx], len))
    }

    async fn wait_turn(&self, seq: u64) {
        std::future::poll_fn(|cx| {
            if self.written_seq.get() == seq || self.error.borrow().is_some() {
                Poll::Ready(())
            } else {
                self.waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    fn finish_turn(&self) {
        self.written_seq.set(self.written_seq.get() + 1);
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    fn fail(&self, e: CopyError) {
        let mut err = self.error.borrow_mut();
        if err.is_none() {
            *err = Some(e);
        }
        drop(err);
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }
}

async fn worker(sh: Rc<Shared>) {
    let mut buf = Some(IoBuf::new(sh.o.chunk as usize));
    // Per-granule "is zero" marks for the current chunk.
    let mut zero = Vec::new();
    while let Some((seq, idx, off, len)) = sh.claim() {
        let global = sh.bases[idx] + off;
        let src = &sh.sources[idx];
        let mut b = buf.take().expect("worker buffer");
        b.reset(len as usize);
        // What the source holds: (start, length, is a hole), relative to the chunk.
        let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
        let mut at = 0;
        let mut failed = false;
        while at < len {
            let (n, is_zero) = match src.block_status(off + at, len - at).await {
                Ok(st) => (st.len.min(len - at), st.zero && !st.data),
                Err(_) => (len - at, false),
            };
            pieces.push((at, n, is_zero));
            if is_zero {
                b[at as usize..(at + n) as usize].fill(0);
            } else {
                b.set_window(at as usize, n as usize);
                let d = src.read(off + at, b).await;
                b = d.buf.expect("read returns its buffer");
                b.reset(len as usize);
                if let Err(e) = d.res {
                    if sh.o.salvage {
                        eprintln!("basalt-img: warning: error while reading offset {}: {e}", global + at);
                        b[at as usize..(at + n) as usize].fill(0);
                    } else {
                        sh.fail(CopyError::Read(global + at, e));
                        failed = true;
                        break;
                    }
                }
            }
            at += n;
        }
        if failed {
            break;
        }
        // Runs of data (true) and zeroes (false), as qemu-img decides them.
        zero.clear();
        for (p, n, hole) in pieces.iter().copied() {
            if sh.o.sparse_size == 0 {
                zero.push((p, p + n, false));
            } else if hole {
                zero.push((p, p + n, true));
            } else {
                sparse_runs(&b[p as usize..(p + n) as usize], global + p, sh.o.sparse_size, |s, e, z| {
                    zero.push((p + s, p + e, z))
                });
            }
        }
        if !sh.o.out_of_order {
            sh.wait_turn(seq).await;
            if sh.error.borrow().is_some() {
                break;
            }
        }
        let mut i = 0;
        let mut compressed_upto = 0u64;
        while i < zero.len() {
            let (s, _, z) = zero[i];
            let mut j = i;
            while j + 1 < zero.len() && zero[j + 1].2 == z {
                j += 1;
            }
            let e = zero[j].1;
            if z {
                if !sh.o.target_zero {
                    let d = sh.target.write_zeroes(global + s, e - s, ZeroFlags { may_unmap: true, ..Default::default() }).await;
                    if let Err(err) = d.res {
                        sh.fail(CopyError::Write(global + s, err));
                        failed = true;
                        break;
                    }
                }
            } else if let Some(cs) = sh.o.compress {
                // Whole clusters around the data run, compressed (zero clusters stay unwritten
                // on a fresh target).
                let cs_start = s / cs * cs;
                let cs_end = e.next_multiple_of(cs).min(len);
                let mut c = cs_start.max(compressed_upto);
                while c < cs_end {
                    // Skip zero clusters on a fresh target; write each run of the others in one
                    // request, so the format compresses its clusters in parallel.
                    let zero_at = |x: u64| {
                        sh.o.target_zero && basalt_engine::buffer_is_zero(&b[x as usize..(x + cs.min(len - x)) as usize])
                    };
                    if zero_at(c) {
                        c += cs.min(len - c);
                        continue;
                    }
                    let mut e2 = c;
                    while e2 < cs_end && !zero_at(e2) {
                        e2 += cs.min(len - e2);
                    }
                    b.set_window(c as usize, (e2 - c) as usize);
                    let d = sh.target.write_compressed(global + c, b).await;
                    b = d.buf.expect("write returns its buffer");
                    b.reset(len as usize);
                    if let Err(err) = d.res {
                        sh.fail(CopyError::Write(global + c, err));
                        failed = true;
                        break;
                    }
                    c = e2;
                }
                compressed_upto = cs_end;
                if failed {
                    break;
                }
            } else {
                b.set_window(s as usize, (e - s) as usize);
                let d = sh.target.write(global + s, b, WriteFlags::default()).await;
                b = d.buf.expect("write returns its buffer");
                b.reset(len as usize);
                if let Err(err) = d.res {
                    sh.fail(CopyError::Write(global + s, err));
                    failed = true;
                    break;
                }
            }
            i = j + 1;
        }
        buf = Some(b);
        if !sh.o.out_of_order {
            sh.finish_turn();
        }
        if failed {
            break;
        }
        let done = sh.done_bytes.get() + len;
        sh.done_bytes.set(done);
        (sh.progress)(done, sh.total);
        if sh.o.rate > 0 {
            let due = sh.start + Duration::from_secs_f64(done as f64 / sh.o.rate as f64);
            basalt_reactor::sleep_until(due).await;
        }
    }
}

const SECTOR: u64 = 512;
/// Data runs end on 4 KiB boundaries where they can, as qemu-img aligns them.
const ALIGN_SECTORS: u64 = 8;

/// qemu-img's `is_allocated_sectors`: the length in sectors of the run at the start of `buf`
/// (`n` sectors, starting at absolute sector `sector`) and whether it is data.
fn run_at(buf: &[u8], n: u64, sector: u64) -> (u64, bool) {
    let sec = |i: u64| {
        let s = (i * SECTOR) as usize;
        &buf[s..(s + SECTOR as usize).min(buf.len())]
    };
    let zero = basalt_engine::buffer_is_zero(sec(0));
    let mut i = 1;
    while i < n && basalt_engine::buffer_is_zero(sec(i)) == zero {
        i += 1;
    }
    if i == n {
        return (i, !zero);
    }
    let mut zero = zero;
    let tail = (sector + i) & (ALIGN_SECTORS - 1);
    if tail != 0 {
        if zero && i <= tail {
            zero = false;
        }
        if !zero {
            i = (i + ALIGN_SECTORS - tail).min(n);
        } else {
            i -= tail;
        }
    }
    (i, !zero)
}

/// Split a data range into runs as qemu-img's `is_allocated_sectors_min` does: a run of zero
/// sectors is skipped only when it is at least `min` bytes long (or starts the range); shorter
/// zero runs inside data are written as data. `emit(start, end, is_zero)` gets byte offsets
/// relative to `buf`.
fn sparse_runs(buf: &[u8], global: u64, min: u64, mut emit: impl FnMut(u64, u64, bool)) {
    let len = buf.len() as u64;
    let total = len.div_ceil(SECTOR);
    let mut s = 0u64;
    while s < total {
        let n = total - s;
        let min_s = (min / SECTOR).min(n).max(1);
        let at = |x: u64| &buf[(x * SECTOR) as usize..];
        let (first, data) = run_at(at(s), n, global / SECTOR + s);
        let mut used = first;
        if data {
            let mut checked = first;
            while checked < n {
                let (r, d) = run_at(at(s + checked), n - checked, global / SECTOR + s + checked);
                checked += r;
                if d {
                    used = checked;
                } else if r >= min_s {
                    break;
                }
            }
        }
        let end = ((s + used) * SECTOR).min(len);
        emit(s * SECTOR, end, !data);
        s += used;
    }
}
