//! The copy engine behind `basalt-img convert`: several workers copy chunks of the sources into
//! the target, skipping holes the source reports through block status and, within data,
//! granules that are all zero (`-S`), so the target stays sparse.
//!
//! Each worker claims the next chunk (up to the buffer size, never across two sources), asks
//! the source what it holds, reads only the data parts into its buffer, and writes the runs of
//! data and zeroes it finds. Data the source keeps verbatim in a buffered host file (a raw
//! image, the allocated clusters of a read-only qcow2) is not read at all: its pages are
//! mapped into the worker's file window (`IoBuf::file_window`), scanned for zeroes there and
//! written to the target from the page cache, one copy where a read and a write make two.
//! Zero runs are skipped when the target is known to read as zeroes, else written with
//! `write_zeroes` (unmap allowed). Without `-W` the writes are issued in
//! order: a worker waits until every earlier chunk's writes have been issued (handed to the
//! target, which allocates in that order) before issuing its own, so the target is laid out as
//! qemu-img lays it out while the last write of a chunk overlaps the next chunk's.
//!
//! Workers are spread over one reactor per core (helper reactors started for the copy, each
//! with its own queues on the same nodes); claiming, ordering, errors and progress are shared
//! through atomics and short mutexes. A source's block status is asked of its whole backing
//! chain, so unallocated ranges without data below are not read at all.

use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use basalt_engine::{Backend, IoStatus, Node, WriteFlags, ZeroFlags};
use basalt_reactor::{spawn_local, IoBuf};

use crate::img::common::{Chain, TopStatus};

/// How to copy.
#[derive(Clone, Debug)]
pub struct CopyOpts {
    /// Parallel workers (`-m`).
    pub workers: usize,
    /// Reactors (threads, one per core) the workers are spread over; the calling reactor is
    /// one of them. Nodes that cannot be used from another reactor keep the copy on this one.
    pub reactors: usize,
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
    /// The target has a backing file (`-B`): only what the top image of each source defines
    /// is written, and zeroes are written out (the backing file may hold data there).
    pub target_backing: bool,
    /// Size of the new target's backing file, when known: past it, unallocated target ranges
    /// read as zeroes already.
    pub backing_size: Option<u64>,
}

/// Why a copy failed: the byte and the error, as qemu-img reports them.
#[derive(Debug, Clone, Copy)]
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

/// Copies at least this large use more than one reactor.
const HELPERS_FROM: u64 = 64 << 20;

/// Progress callback: (bytes done, total).
pub type Progress = Box<dyn Fn(u64, u64) + Send + Sync>;

/// The state every worker shares, on whichever reactor it runs.
struct Shared {
    sizes: Vec<u64>,
    bases: Vec<u64>,
    total: u64,
    o: CopyOpts,
    /// (next offset to claim, next sequence number).
    claim: Mutex<(u64, u64)>,
    /// Chunks written so far in order (without `-W`).
    written_seq: AtomicU64,
    /// Workers waiting for their turn: (sequence number, waker).
    waiters: Mutex<Vec<(u64, Waker)>>,
    done_bytes: AtomicU64,
    error: Mutex<Option<CopyError>>,
    start: Instant,
    progress: Progress,
}

/// What a worker uses on its reactor: queues on the sources (and their backing chains, whose
/// block status says where they read as zeroes) and on the target.
#[derive(Clone)]
struct Io {
    sources: Rc<Vec<Chain>>,
    target: Backend,
}

/// Copy the concatenation of `sources` into `target` from offset 0. `progress(done, total)` is
/// called as chunks complete.
pub async fn copy(sources: Vec<Arc<dyn Node>>, target: Backend, o: CopyOpts, progress: Progress) -> Result<(), CopyError> {
    let mut bases = Vec::with_capacity(sources.len());
    let mut total = 0;
    for s in &sources {
        bases.push(total);
        total += s.size();
    }
    let workers = o.workers.max(1);
    let reactors = o.reactors.clamp(1, workers);
    let sh = Arc::new(Shared {
        sizes: sources.iter().map(|n| n.size()).collect(),
        bases,
        total,
        o,
        claim: Mutex::new((0, 0)),
        written_seq: AtomicU64::new(0),
        waiters: Mutex::new(Vec::new()),
        done_bytes: AtomicU64::new(0),
        error: Mutex::new(None),
        start: Instant::now(),
        progress,
    });
    (sh.progress)(0, total);
    // A bulk copy: idle reactors sleep at once, leaving the cores to the threads that copy
    // (the blocking pool, the kernel's io_uring workers, compression).
    basalt_reactor::set_idle_spin(Some(Duration::ZERO));
    // Helper reactors, each running its share of the workers with its own queues.
    // Small copies are not worth starting threads for.
    let helpers = if reactors > 1 && total >= HELPERS_FROM { crate::helper_reactors(reactors - 1) } else { None };
    let mut remote = Vec::new();
    if let Some(rt) = &helpers {
        let tgt = (target.node().clone(), target.writethrough());
        for r in 0..rt.len() {
            let n = (r + 1..workers).step_by(reactors).count();
            let (sh, src_nodes, tgt) = (sh.clone(), sources.clone(), tgt.clone());
            remote.push(rt.handle(r).run(move || async move {
                let Ok(io) = queues(&src_nodes, tgt) else { return };
                run_workers(sh, io, n).await
            }));
        }
    }
    // Worker `i` runs on reactor `i % reactors`; this one is reactor 0.
    let local = (0..workers).step_by(reactors).count();
    let chains = match sources.iter().map(|n| Chain::new(n.clone())).collect::<Result<Vec<_>, _>>() {
        Ok(c) => c,
        Err(_) => return Err(CopyError::Read(0, IoStatus::EIO)),
    };
    run_workers(sh.clone(), Io { sources: Rc::new(chains), target }, local).await;
    for j in remote {
        j.await;
    }
    drop(helpers);
    let err = sh.error.lock().unwrap_or_else(|e| e.into_inner()).take();
    match err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Queues on `sources` and the target on the calling reactor.
fn queues(sources: &[Arc<dyn Node>], (target, writethrough): (Arc<dyn Node>, bool)) -> Result<Io, String> {
    let sources = sources.iter().map(|n| Chain::new(n.clone())).collect::<Result<Vec<_>, _>>()?;
    let mut target = Backend::new(target).map_err(|e| e.msg)?;
    target.set_writethrough(writethrough);
    Ok(Io { sources: Rc::new(sources), target })
}

async fn run_workers(sh: Arc<Shared>, io: Io, n: usize) {
    let handles: Vec<_> = (0..n).map(|_| spawn_local(worker(sh.clone(), io.clone()))).collect();
    for h in handles {
        h.await;
    }
}

impl Shared {
    fn failed(&self) -> bool {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// Claim the next chunk: (sequence, source index, offset in source, length).
    fn claim(&self) -> Option<(u64, usize, u64, u64)> {
        if self.failed() {
            return None;
        }
        let mut c = self.claim.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let at = c.0;
            if at >= self.total {
                return None;
            }
            let idx = self.bases.iter().rposition(|b| *b <= at).unwrap_or(0);
            let src_end = self.bases[idx] + self.sizes[idx];
            let len = self.o.chunk.min(src_end - at);
            if len == 0 {
                // An empty source: skip it.
                c.0 = src_end.max(at + 1).min(self.total);
                continue;
            }
            c.0 = at + len;
            let seq = c.1;
            c.1 += 1;
            return Some((seq, idx, at - self.bases[idx], len));
        }
    }

    async fn wait_turn(&self, seq: u64) {
        std::future::poll_fn(|cx| {
            let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            if self.written_seq.load(Ordering::SeqCst) == seq || self.failed() {
                Poll::Ready(())
            } else {
                match w.iter_mut().find(|(s, _)| *s == seq) {
                    Some(e) => e.1 = cx.waker().clone(),
                    None => w.push((seq, cx.waker().clone())),
                }
                Poll::Pending
            }
        })
        .await
    }

    fn wake_all(&self) {
        let ws = std::mem::take(&mut *self.waiters.lock().unwrap_or_else(|e| e.into_inner()));
        for (_, w) in ws {
            w.wake();
        }
    }

    /// Pass the turn on, waking only the worker whose turn it now is.
    fn finish_turn(&self) {
        let next = {
            let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            let seq = self.written_seq.fetch_add(1, Ordering::SeqCst) + 1;
            w.iter().position(|(s, _)| *s == seq).map(|i| w.swap_remove(i).1)
        };
        if let Some(w) = next {
            w.wake();
        }
    }

    fn fail(&self, e: CopyError) {
        {
            let mut err = self.error.lock().unwrap_or_else(|e| e.into_inner());
            if err.is_none() {
                *err = Some(e);
            }
        }
        self.wake_all();
    }
}

/// What a range of a chunk becomes in the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Written from the buffer.
    Data,
    /// Written from the worker's file window, where the source file's pages are mapped.
    Mapped,
    /// Written as zeroes (skipped when the target already reads as zeroes).
    Zero,
    /// Left alone: unallocated in a source whose target has a backing file (qemu-img's
    /// `BLK_BACKING_FILE`), or zeroes past the end of the target's new backing file.
    Skip,
}

/// A range of the current chunk: (start, end, what it is), relative to the chunk.
type Run = (u64, u64, Kind);

/// Where a chunk lies: at `off` of its source, at `global` of the copy (and of the target),
/// `len` bytes.
#[derive(Clone, Copy)]
struct Chunk {
    off: u64,
    global: u64,
    len: u64,
}

async fn worker(sh: Arc<Shared>, io: Io) {
    let mut buf = Some(IoBuf::new(sh.o.chunk as usize));
    // Compressed copies read into the buffer: compressing costs far more than the read.
    let mut window = if sh.o.compress.is_none() { IoBuf::file_window(sh.o.chunk as usize) } else { None };
    let mut runs: Vec<Run> = Vec::new();
    while let Some((seq, idx, off, len)) = sh.claim() {
        let global = sh.bases[idx] + off;
        let mut b = buf.take().expect("worker buffer");
        b.reset(len as usize);
        let c = Chunk { off, global, len };
        let r = fill(&sh, &io.sources[idx], c, b, window.as_mut(), &mut runs).await;
        let Ok(mut b) = r else { break };
        if !sh.o.out_of_order {
            sh.wait_turn(seq).await;
            if sh.failed() {
                break;
            }
        }
        let mut turn = !sh.o.out_of_order;
        let r = write_runs(&sh, &io.target, c, b, &mut window, &runs, &mut turn).await;
        let failed = r.is_err();
        b = match r {
            Ok(b) | Err(Some(b)) => b,
            Err(None) => IoBuf::new(sh.o.chunk as usize),
        };
        buf = Some(b);
        if turn {
            sh.finish_turn();
        }
        if failed {
            break;
        }
        let done = sh.done_bytes.fetch_add(len, Ordering::SeqCst) + len;
        (sh.progress)(done, sh.total);
        if sh.o.rate > 0 {
            let due = sh.start + Duration::from_secs_f64(done as f64 / sh.o.rate as f64);
            basalt_reactor::sleep_until(due).await;
        }
    }
}

/// Read what the chunk `off..off+len` of a source (at `global` in the copy) holds into `b`
/// and decide, as qemu-img does, which runs are data, zeroes, or left alone. On a read error
/// (without `--salvage`) the copy is failed and `Err` returned.
///
/// Data the source keeps verbatim in a buffered host file, page-aligned (raw images, and
/// allocated clusters of a read-only qcow2), is not read but mapped into `window` at its
/// place in the chunk: zeroes are looked for and the target is written straight from the
/// source's page cache, one copy instead of two. Should a mapped page fail to read (the file
/// was cut short, or the disk failed), the chunk is read again the ordinary way, which
/// reports the error as a read would.
async fn fill(
    sh: &Shared,
    chain: &Chain,
    c: Chunk,
    mut b: IoBuf,
    mut window: Option<&mut IoBuf>,
    runs: &mut Vec<Run>,
) -> Result<IoBuf, ()> {
    let Chunk { off, global, len } = c;
    let src = chain.top();
    // What the source holds, relative to the chunk.
    let mut pieces: Vec<Run> = Vec::new();
    let mut at = 0;
    while at < len {
        let mut want = len - at;
        let pos = global + at;
        if let Some(end) = sh.o.backing_size.filter(|e| *e > pos) {
            // Zeroes are handled differently past the end of the target's backing file.
            want = want.min(end - pos);
        }
        let (n, kind) = if sh.o.target_backing {
            match chain.top_status(off + at, want).await {
                Ok((n, TopStatus::Data)) => (n, Kind::Data),
                Ok((n, TopStatus::Zero)) if sh.o.backing_size.is_some_and(|e| pos >= e) => (n, Kind::Skip),
                Ok((n, TopStatus::Zero)) => (n, Kind::Zero),
                Ok((n, TopStatus::Backing)) => (n, Kind::Skip),
                Err(_) => (want, Kind::Data),
            }
        } else {
            match chain.status(off + at, want).await {
                Ok(st) if st.zero && !st.data => (st.len, Kind::Zero),
                Ok(st) => (st.len, Kind::Data),
                Err(_) => (want, Kind::Data),
            }
        };
        let n = n.clamp(1, want);
        pieces.push((at, at + n, kind));
        at += n;
    }
    // Compressed targets are written in whole clusters: a cluster with anything to write is
    // read in full (qemu-img's "an unallocated area shorter than a cluster is data").
    if let Some(cs) = sh.o.compress {
        let mut cl = Vec::new();
        let mut c = 0;
        while c < len {
            let e = (c + cs).min(len);
            let inside = pieces.iter().filter(|p| p.0 < e && p.1 > c);
            let kind = if inside.clone().all(|p| p.2 == Kind::Skip) {
                Kind::Skip
            } else if inside.clone().all(|p| p.2 == Kind::Zero) && sh.o.sparse_size > 0 {
                // (`-S 0` writes zeroes out as data, compressed too.)
                Kind::Zero
            } else {
                Kind::Data
            };
            cl.push((c, e, kind));
            c = e;
        }
        let mut full = Vec::new();
        for &(c, e, kind) in &cl {
            for p in pieces.iter().filter(|p| p.0 < e && p.1 > c) {
                // In a cluster that is written, what the backing chain holds is read too.
                let k = match (kind, p.2) {
                    (Kind::Data, Kind::Skip) => Kind::Data,
                    (Kind::Data, k) => k,
                    (k, _) => k,
                };
                full.push((p.0.max(c), p.1.min(e), k));
            }
        }
        pieces = full;
    }
    loop {
        b = read_pieces(sh, src, c, b, window.as_deref_mut(), &mut pieces).await?;
        classify(sh, c, &b, window.as_deref(), &pieces, runs);
        match window.as_deref() {
            Some(w) if w.take_map_fault() => {
                // Read it all the ordinary way: what it returns (or the error) is the truth.
                window = None;
                for p in pieces.iter_mut().filter(|p| p.2 == Kind::Mapped) {
                    p.2 = Kind::Data;
                }
            }
            _ => return Ok(b),
        }
    }
}

/// Read the data pieces of a chunk into `b`, or map them into `window` where the source keeps
/// them in a host file (those become [`Kind::Mapped`]); zero-fill holes whose bytes are used.
async fn read_pieces(
    sh: &Shared,
    src: &Backend,
    c: Chunk,
    mut b: IoBuf,
    mut window: Option<&mut IoBuf>,
    pieces: &mut [Run],
) -> Result<IoBuf, ()> {
    let Chunk { off, global, len } = c;
    for p in pieces.iter_mut() {
        let (s, e, kind) = *p;
        if kind == Kind::Data {
            if let Some(w) = window.as_deref_mut() {
                if map_piece(src, w, off + s, s, e - s) {
                    p.2 = Kind::Mapped;
                    continue;
                }
            }
        }
        match kind {
            Kind::Skip if sh.o.compress.is_none() => {}
            Kind::Mapped => {}
            Kind::Zero | Kind::Skip => {
                // A hole's bytes are used only when compressing (whole clusters around data)
                // or writing everything (`-S 0`).
                if sh.o.compress.is_some() || sh.o.sparse_size == 0 {
                    b[s as usize..e as usize].fill(0);
                }
            }
            Kind::Data => {
                b.set_window(s as usize, (e - s) as usize);
                let d = src.read(off + s, b).await;
                b = d.buf.expect("read returns its buffer");
                b.reset(len as usize);
                if let Err(err) = d.res {
                    if sh.o.salvage {
                        eprintln!("basalt-img: warning: error while reading offset {}: {err}", global + s);
                        b[s as usize..e as usize].fill(0);
                    } else {
                        sh.fail(CopyError::Read(global + s, err));
                        return Err(());
                    }
                }
            }
        }
    }
    Ok(b)
}

/// Map `len` bytes of the source from `off` at `at` of `window`, if the source keeps them in a
/// host file at a page-aligned offset; whether it did.
fn map_piece(src: &Backend, window: &mut IoBuf, off: u64, at: u64, len: u64) -> bool {
    const PAGE: u64 = 4096;
    if !at.is_multiple_of(PAGE) {
        return false;
    }
    let Some(ext) = src.node().host_extent(off, len) else { return false };
    ext.offset.is_multiple_of(PAGE) && window.map_file(at as usize, ext.file.as_raw_fd(), ext.offset, len as usize).is_ok()
}

/// Decide, as qemu-img does, which runs of a read chunk are data, zeroes, or left alone.
fn classify(sh: &Shared, c: Chunk, b: &IoBuf, window: Option<&IoBuf>, pieces: &[Run], runs: &mut Vec<Run>) {
    let Chunk { global, len, .. } = c;
    runs.clear();
    if let Some(cs) = sh.o.compress {
        // Per cluster: left alone, zeroes, or data (all-zero data is zeroes, as qemu-img).
        let mut c = 0;
        while c < len {
            let e = (c + cs).min(len);
            let inside = || pieces.iter().filter(|p| p.0 < e && p.1 > c);
            let kind = if inside().all(|p| p.2 == Kind::Skip) {
                Kind::Skip
            } else if sh.o.sparse_size > 0
                && (inside().all(|p| p.2 == Kind::Zero) || basalt_engine::buffer_is_zero(&b[c as usize..e as usize]))
            {
                Kind::Zero
            } else {
                Kind::Data
            };
            runs.push((c, e, kind));
            c = e;
        }
    } else {
        for &(p, e, kind) in pieces {
            match kind {
                Kind::Data | Kind::Mapped if sh.o.sparse_size > 0 => {
                    let bytes = match (kind, window) {
                        (Kind::Mapped, Some(w)) => &w[p as usize..e as usize],
                        _ => &b[p as usize..e as usize],
                    };
                    sparse_runs(bytes, global + p, sh.o.sparse_size, |s, t, z| {
                        runs.push((p + s, p + t, if z { Kind::Zero } else { kind }))
                    })
                }
                // `-S 0`: zeroes are written out as data.
                Kind::Zero if sh.o.sparse_size == 0 => runs.push((p, e, Kind::Data)),
                k => runs.push((p, e, k)),
            }
        }
    }
    if sh.o.target_zero {
        for r in runs.iter_mut().filter(|r| r.2 == Kind::Zero) {
            r.2 = Kind::Skip;
        }
    }
}

/// Write the runs of a chunk at `global` of the target: data from `b` (compressed when asked,
/// one request per run of clusters so the format compresses them in parallel) or from the
/// file `window`, zeroes with `write_zeroes` (unmap allowed). On error the copy is failed; the
/// buffer comes back when the target handed it back (a window not handed back is gone).
/// Without `-W`, `turn` is set while this chunk holds the turn: it is passed on (and cleared)
/// as soon as the chunk's last request has been issued, so the next chunk's writes are issued
/// after all of this one's, in order, while the last one is still in flight (a compressed
/// chunk passes it once written).
async fn write_runs(
    sh: &Shared,
    target: &Backend,
    c: Chunk,
    mut b: IoBuf,
    window: &mut Option<IoBuf>,
    runs: &[Run],
    turn: &mut bool,
) -> Result<IoBuf, Option<IoBuf>> {
    let Chunk { global, len, .. } = c;
    let last = runs.iter().rposition(|r| r.2 != Kind::Skip);
    if last.is_none() && *turn {
        *turn = false;
        sh.finish_turn();
    }
    let mut i = 0;
    while i < runs.len() {
        let (s, _, kind) = runs[i];
        // Data runs go out as one request; zero runs one by one as qemu-img writes them (a
        // partial-cluster zero write may allocate where a merged one would not).
        let merge = matches!(kind, Kind::Data | Kind::Mapped | Kind::Skip) || sh.o.compress.is_some();
        let mut j = i;
        while merge && j + 1 < runs.len() && runs[j + 1].2 == kind {
            j += 1;
        }
        let e = runs[j].1;
        let is_last = Some(j) == last;
        i = j + 1;
        let at = global + s;
        // The last request passes the turn on once it is issued. A compressed write is placed
        // only once its clusters are compressed, so it keeps the turn until it completes: the
        // next chunk's clusters then land after this one's, as qemu-img lays them out.
        let pass = is_last && *turn && sh.o.compress.is_none();
        if pass {
            *turn = false;
        }
        let hook = || {
            if pass {
                sh.finish_turn();
            }
        };
        let res = match kind {
            Kind::Skip => continue,
            Kind::Zero => {
                let z = ZeroFlags { may_unmap: true, ..Default::default() };
                after_issue(target.write_zeroes(at, e - s, z), hook).await.res
            }
            Kind::Data => {
                b.set_window(s as usize, (e - s) as usize);
                let d = if sh.o.compress.is_some() {
                    after_issue(target.write_compressed(at, b), hook).await
                } else {
                    after_issue(target.write(at, b, WriteFlags::default()), hook).await
                };
                let Some(back) = d.buf else {
                    sh.fail(CopyError::Write(at, d.res.err().unwrap_or(IoStatus::EIO)));
                    return Err(None);
                };
                b = back;
                b.reset(len as usize);
                d.res
            }
            Kind::Mapped => {
                let mut w = window.take().expect("a mapped run has its window");
                w.set_window(s as usize, (e - s) as usize);
                let d = after_issue(target.write(at, w, WriteFlags::default()), hook).await;
                let Some(mut back) = d.buf else {
                    sh.fail(CopyError::Write(at, d.res.err().unwrap_or(IoStatus::EIO)));
                    return Err(Some(b));
                };
                back.reset(len as usize);
                *window = Some(back);
                // The kernel's copy out of a mapped page that cannot be read fails with EFAULT:
                // a read error of the source.
                if d.res.is_err_and(|e| e.0 == libc::EFAULT) {
                    sh.fail(CopyError::Read(at, IoStatus::EIO));
                    return Err(Some(b));
                }
                d.res
            }
        };
        if let Err(err) = res {
            sh.fail(CopyError::Write(at, err));
            return Err(Some(b));
        }
    }
    Ok(b)
}

/// Await `fut`, calling `then` right after its first poll: by then a request has been handed
/// to its node (a format allocates for an in-order write before its data goes out).
async fn after_issue<F: std::future::Future>(fut: F, then: impl FnOnce()) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut then = Some(then);
    std::future::poll_fn(|cx| {
        let r = fut.as_mut().poll(cx);
        if let Some(t) = then.take() {
            t();
        }
        r
    })
    .await
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
