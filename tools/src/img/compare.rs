//! `basalt-img compare`: whether two images read the same, as qemu-img decides it.
//!
//! The common part is walked by block status: ranges both images report as zero are skipped
//! without reading, ranges both define are read and compared, a range only one image defines
//! must read as zeroes there. The first differing 512-byte block is reported ("Content mismatch
//! at offset N!"). Without `-s` a size difference is a warning and the larger image's extra
//! part must read as zeroes; `-s` refuses different sizes and different block status.
//!
//! Reads are 2 MiB chunks (qemu-img's buffer size), several in flight, while the walk runs
//! ahead; results are still judged strictly in order, so the verdict, the offset reported and
//! the `-p` progress line are those of qemu-img's sequential loop.
//!
//! Exit codes as qemu-img: 0 identical, 1 different, 2 an image could not be opened, 3 block
//! status failed, 4 a read failed.

use std::cell::RefCell;
use std::collections::VecDeque;

use basalt_engine::{Backend, IoStatus};
use basalt_reactor::{spawn_local, IoBuf, JoinHandle};

use super::common::{self, Chain, Progress};
use crate::getopt::opt;

const HELP: &str = "Usage:
Check if two images have the same contents.  Usage:

  basalt-img compare [--image-opts | [-f FMT] [-F FMT]] [-s]
        [-T CACHE] [-U] [--object OBJDEF] FILENAME1 FILENAME2

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operation
  -p, --progress
     show operation progress
  -f, --a-format FMT
     specify FILENAME1 image format explicitly
  -F, --b-format FMT
     specify FILENAME2 image format explicitly
  --image-opts
     indicates that FILENAMEs are complete image specifications
     instead of file names (incompatible with --a-format and --b-format)
  -s, --strict
     strict mode, also check if sizes are equal
  -T, --cache CACHE_MODE
     images caching mode (writeback)
  -U, --force-share
     open images in shared mode for concurrent access
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME1, FILENAME2
     image files (or specifications) to compare

";

/// qemu-img's I/O buffer size: the largest chunk read at once.
const IO_BUF_SIZE: u64 = 2 << 20;
/// Chunks read ahead of the one being judged.
const MAX_IN_FLIGHT: usize = 4;
/// Ranges looked up ahead (including ones that need no reads).
const MAX_QUEUED: usize = 64;

/// How a compare ends early.
struct Stop {
    code: i32,
    /// Printed on stdout unless quiet.
    out: Option<String>,
    /// Printed as an error.
    err: Option<String>,
}

impl Stop {
    fn differ(msg: String) -> Stop {
        Stop { code: 1, out: Some(msg), err: None }
    }
    fn error(code: i32, msg: String) -> Stop {
        Stop { code, out: None, err: Some(msg) }
    }
}

type Reads = JoinHandle<Result<Vec<IoBuf>, (usize, IoStatus)>>;

/// What a looked-up range needs.
enum Work {
    /// Nothing to read.
    Skip,
    /// Read from the given images (indices into the pair) and compare, or check for zeroes when
    /// only one is read.
    Read(Reads),
    /// The walk itself ends here (a strict status mismatch, a block status failure).
    Stop(Stop),
}

struct Item {
    offset: u64,
    chunk: u64,
    work: Work,
}

struct Images {
    chains: [Chain; 2],
    names: [String; 2],
    /// Read buffers (IO_BUF_SIZE each) to reuse, so the walk allocates only at its start.
    free: RefCell<Vec<IoBuf>>,
}

impl Images {
    fn spawn_reads(&self, which: &[usize], off: u64, len: u64) -> Reads {
        let bes: Vec<(usize, Backend, IoBuf)> = which
            .iter()
            .map(|&i| {
                let mut buf = self.free.borrow_mut().pop().unwrap_or_else(|| IoBuf::heap(IO_BUF_SIZE as usize));
                buf.reset(len as usize);
                (i, self.chains[i].top().clone(), buf)
            })
            .collect();
        spawn_local(async move {
            let futs: Vec<_> = bes.into_iter().map(|(i, be, buf)| (i, be.read(off, buf))).collect();
            let mut bufs = Vec::with_capacity(futs.len());
            let mut first_err = None;
            for (i, f) in futs {
                let d = f.await;
                match (d.res, d.buf) {
                    (Ok(_), Some(b)) => bufs.push(b),
                    (Err(e), _) => {
                        first_err.get_or_insert((i, e));
                    }
                    (Ok(_), None) => {
                        first_err.get_or_insert((i, IoStatus::EIO));
                    }
                }
            }
            match first_err {
                Some(e) => Err(e),
                None => Ok(bufs),
            }
        })
    }

    /// Judge a finished item: Ok to go on, or how to stop.
    async fn judge(&self, item: Item) -> Result<(), Stop> {
        let reads = match item.work {
            Work::Skip => return Ok(()),
            Work::Stop(s) => return Err(s),
            Work::Read(r) => r,
        };
        let bufs = reads
            .await
            .map_err(|(i, e)| Stop::error(4, format!("Error while reading offset {} of {}: {e}", item.offset, self.names[i])))?;
        let at = match bufs.as_slice() {
            [a, b] => common::find_difference(a, b),
            [a] => common::find_nonzero(a),
            _ => None,
        };
        self.free.borrow_mut().extend(bufs);
        match at {
            Some(p) => Err(Stop::differ(format!("Content mismatch at offset {}!", item.offset + p as u64))),
            None => Ok(()),
        }
    }
}

/// Run the subcommand.
pub async fn main(args: Vec<String>) -> i32 {
    let specs = [
        opt(Some('h'), Some("help"), false),
        opt(Some('f'), Some("a-format"), true),
        opt(Some('F'), Some("b-format"), true),
        opt(Some('T'), Some("cache"), true),
        opt(Some('p'), Some("progress"), false),
        opt(Some('q'), Some("quiet"), false),
        opt(Some('s'), Some("strict"), false),
        opt(Some('U'), Some("force-share"), false),
        opt(None, Some("object"), true),
        opt(None, Some("image-opts"), false),
    ];
    let a = match common::parse_args("compare", HELP, &args, &specs) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let cache = match common::source_cache(&a) {
        Ok(c) => c,
        // compare reports every failure to get going as "error": 2.
        Err(_) => return 2,
    };
    if a.operands.len() != 2 {
        return common::usage_error("compare", "Expecting two image file names");
    }
    if let Err(code) = common::check_objects(&a) {
        return code;
    }
    let quiet = a.has("quiet");
    let mut progress = Progress::new(a.has("progress") && !quiet, 2.0);
    let code = run(&a, cache, quiet, &mut progress).await;
    progress.end();
    code
}

async fn run(a: &crate::getopt::Args, cache: Option<String>, quiet: bool, progress: &mut Progress) -> i32 {
    let graph = crate::img::common::graph(a);
    let mut chains = Vec::new();
    for (i, key) in ["a-format", "b-format"].iter().enumerate() {
        let mut spec = common::spec_from_args(a, &a.operands[i], key);
        spec.read_only = true;
        spec.cache = cache.clone();
        let Ok(node) = common::open(&graph, &spec).await else {
            return 2;
        };
        match Chain::new(node) {
            Ok(c) => chains.push(c),
            Err(e) => {
                common::error(e);
                return 2;
            }
        }
    }
    let (Some(c2), Some(c1)) = (chains.pop(), chains.pop()) else {
        return 2;
    };
    let imgs = Images { chains: [c1, c2], names: [a.operands[0].clone(), a.operands[1].clone()], free: RefCell::new(Vec::new()) };
    let sizes = [imgs.chains[0].size(), imgs.chains[1].size()];
    let total = sizes[0].min(sizes[1]);
    let progress_base = sizes[0].max(sizes[1]);
    progress.print(0.0, 100);
    let say = |s: &str| {
        if !quiet {
            println!("{s}");
        }
    };
    if a.has("strict") && sizes[0] != sizes[1] {
        say("Strict mode: Image size mismatch!");
        return 1;
    }
    let r = walk(&imgs, 0, total, progress_base, a.has("strict"), progress).await;
    let r = match r {
        Ok(()) if sizes[0] != sizes[1] => {
            say("Warning: Image size mismatch!");
            let over = if sizes[0] > sizes[1] { 0 } else { 1 };
            walk_over(&imgs, over, total, progress_base, progress).await
        }
        r => r,
    };
    match r {
        Ok(()) => {
            say("Images are identical.");
            0
        }
        Err(s) => {
            if let Some(o) = s.out {
                say(&o);
            }
            if let Some(e) = s.err {
                common::error(e);
            }
            s.code
        }
    }
}

/// Judge queued items in order until the queue is short enough; stop at the first failure
/// (after letting the reads still in flight finish).
async fn drain_to(imgs: &Images, q: &mut VecDeque<Item>, keep: usize, progress: &mut Progress, base: u64) -> Result<(), Stop> {
    while q.len() > keep || q.iter().filter(|i| matches!(i.work, Work::Read(_))).count() > MAX_IN_FLIGHT {
        let Some(item) = q.pop_front() else { break };
        let chunk = item.chunk;
        if let Err(s) = imgs.judge(item).await {
            for rest in q.drain(..) {
                if let Work::Read(r) = rest.work {
                    let _ = r.await;
                }
            }
            return Err(s);
        }
        progress.advance(chunk, base);
    }
    Ok(())
}

/// The common part `0..total`.
async fn walk(imgs: &Images, start: u64, total: u64, base: u64, strict: bool, progress: &mut Progress) -> Result<(), Stop> {
    let mut q: VecDeque<Item> = VecDeque::new();
    let mut off = start;
    while off < total {
        let mut st = Vec::with_capacity(2);
        let mut failed = None;
        for i in 0..2 {
            match imgs.chains[i].status(off, imgs.chains[i].size() - off).await {
                Ok(s) => st.push(s),
                Err(_) => {
                    failed = Some(i);
                    break;
                }
            }
        }
        let item = if let Some(i) = failed {
            Item {
                offset: off,
                chunk: 0,
                work: Work::Stop(Stop::error(3, format!("Sector allocation test failed for {}", imgs.names[i]))),
            }
        } else {
            let (s1, s2) = (&st[0], &st[1]);
            let mut chunk = s1.len.min(s2.len);
            if strict && s1.flags() != s2.flags() {
                Item {
                    offset: off,
                    chunk,
                    work: Work::Stop(Stop::differ(format!("Strict mode: Offset {off} block status mismatch!"))),
                }
            } else if s1.zero && s2.zero {
                Item { offset: off, chunk, work: Work::Skip }
            } else if s1.allocated_above() == s2.allocated_above() {
                if s1.allocated_above() {
                    chunk = chunk.min(IO_BUF_SIZE);
                    Item { offset: off, chunk, work: Work::Read(imgs.spawn_reads(&[0, 1], off, chunk)) }
                } else {
                    Item { offset: off, chunk, work: Work::Skip }
                }
            } else {
                chunk = chunk.min(IO_BUF_SIZE);
                let which = if s1.allocated_above() { 0 } else { 1 };
                Item { offset: off, chunk, work: Work::Read(imgs.spawn_reads(&[which], off, chunk)) }
            }
        };
        let stop = matches!(item.work, Work::Stop(_));
        off += item.chunk;
        q.push_back(item);
        if stop {
            break;
        }
        drain_to(imgs, &mut q, MAX_QUEUED, progress, base).await?;
    }
    drain_to(imgs, &mut q, 0, progress, base).await
}

/// The part of the larger image `over` beyond `start`: it must read as zeroes.
async fn walk_over(imgs: &Images, over: usize, start: u64, base: u64, progress: &mut Progress) -> Result<(), Stop> {
    let mut q: VecDeque<Item> = VecDeque::new();
    let mut off = start;
    let end = imgs.chains[over].size();
    while off < end {
        let item = match imgs.chains[over].status(off, end - off).await {
            Err(_) => Item {
                offset: off,
                chunk: 0,
                work: Work::Stop(Stop::error(3, format!("Sector allocation test failed for {}", imgs.names[over]))),
            },
            Ok(s) if s.allocated && !s.zero => {
                let chunk = s.len.min(IO_BUF_SIZE);
                Item { offset: off, chunk, work: Work::Read(imgs.spawn_reads(&[over], off, chunk)) }
            }
            Ok(s) => Item { offset: off, chunk: s.len, work: Work::Skip },
        };
        let stop = matches!(item.work, Work::Stop(_));
        off += item.chunk;
        q.push_back(item);
        if stop {
            break;
        }
        drain_to(imgs, &mut q, MAX_QUEUED, progress, base).await?;
    }
    drain_to(imgs, &mut q, 0, progress, base).await
}
