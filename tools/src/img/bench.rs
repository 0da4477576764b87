//! `basalt-img bench`: qemu-img bench's flags and output, over the shared benchmark loop.
//!
//! `-c count -d depth -f fmt --flush-interval=N -i aio -n --no-drain -o offset --pattern=N -q
//! -s size -S step -t cache -w -U --image-opts`. Requests go sequentially from the start offset
//! by the step, `depth` at a time; the run is timed from the first request to the last
//! completion and reported as "Run completed in N seconds.", as qemu-img does.

use basalt_engine::{parse_number, parse_size, Backend};

use crate::bench::{self, BenchJob, Pattern};
use crate::getopt::{self, opt};
use crate::image::{self, ImageSpec};
use crate::img::error;

/// Run the subcommand.
pub async fn main(args: Vec<String>) -> i32 {
    let specs = [
        opt(Some('h'), Some("help"), false),
        opt(Some('c'), Some("count"), true),
        opt(Some('d'), Some("depth"), true),
        opt(Some('f'), Some("format"), true),
        opt(None, Some("flush-interval"), true),
        opt(Some('i'), Some("aio"), true),
        opt(Some('n'), Some("nocache"), false),
        opt(None, Some("no-drain"), false),
        opt(Some('o'), Some("offset"), true),
        opt(None, Some("pattern"), true),
        opt(Some('q'), Some("quiet"), false),
        opt(Some('s'), Some("buffer-size"), true),
        opt(Some('S'), Some("step-size"), true),
        opt(Some('t'), Some("cache"), true),
        opt(Some('w'), Some("write"), false),
        opt(Some('U'), Some("force-share"), false),
        opt(None, Some("image-opts"), false),
        opt(None, Some("object"), true),
    ];
    let a = match getopt::parse(&args, &specs) {
        Ok(a) => a,
        Err(e) => {
            error(format!("{e}\nTry 'basalt-img bench --help' for more info"));
            return 1;
        }
    };
    if let Err(code) = crate::img::common::check_objects(&a) {
        return code;
    }
    let mut job = BenchJob::default();
    macro_rules! num {
        ($name:expr, $what:expr, $parse:expr) => {
            match a.value($name) {
                None => None,
                Some(v) => match $parse(v) {
                    Some(n) => Some(n),
                    None => {
                        error(format!("Invalid {} specified: '{v}'.", $what));
                        return 1;
                    }
                },
            }
        };
    }
    let pos = |v: &str| parse_number(v).filter(|n| *n > 0);
    if let Some(c) = num!("count", "request count", pos) {
        job.count = c;
    }
    if let Some(d) = num!("depth", "queue depth", |v: &str| pos(v).filter(|n| *n <= 65536)) {
        job.depth = d as usize;
    }
    if let Some(s) = num!("buffer-size", "buffer size", |v: &str| parse_size(v).filter(|n| *n > 0 && *n <= i32::MAX as u64)) {
        job.bufsize = s as usize;
    }
    let step = num!("step-size", "step size", parse_size);
    if let Some(o) = num!("offset", "offset", parse_size) {
        job.offset = o;
    }
    if let Some(p) = num!("pattern", "pattern byte", |v: &str| parse_number(v).filter(|n| *n <= 0xff)) {
        job.fill = p as u8;
    }
    let flush_interval = num!("flush-interval", "flush interval", parse_number).unwrap_or(0);
    let write = a.has("write");
    if flush_interval > 0 && !write {
        error("--flush-interval is only available in write tests");
        return 1;
    }
    if a.has("no-drain") && flush_interval == 0 {
        error("--no-drain is only meaningful with --flush-interval");
        return 1;
    }
    job.flush_interval = flush_interval;
    job.drain = !a.has("no-drain");
    job.write_pct = if write { 100 } else { 0 };
    job.pattern = Pattern::Sequential { step: step.unwrap_or(job.bufsize as u64) };
    let Some(filename) = a.operands.last().filter(|_| a.operands.len() == 1) else {
        error("Expecting one image file name\nTry 'basalt-img bench --help' for more info");
        return 1;
    };
    let mut spec = ImageSpec::new(filename);
    spec.fmt = a.value("format").map(str::to_string);
    spec.image_opts = a.has("image-opts");
    spec.force_share = a.has("force-share");
    spec.read_only = !write;
    spec.cache = Some(if a.has("nocache") { "none".into() } else { a.value("cache").unwrap_or("writeback").to_string() });
    spec.aio = a.value("aio").map(str::to_string);
    let graph = crate::img::common::graph(&a);
    let (node, writethrough) = match image::open(&graph, &spec).await {
        Ok(n) => n,
        Err(e) => {
            error(e);
            return 1;
        }
    };
    let mut be = match Backend::new(node) {
        Ok(b) => b,
        Err(e) => {
            error(e);
            return 1;
        }
    };
    be.set_writethrough(writethrough);
    println!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
        job.count,
        if write { "write" } else { "read" },
        job.bufsize,
        job.depth,
        job.offset,
        step.unwrap_or(job.bufsize as u64)
    );
    if flush_interval > 0 {
        println!("Sending flush every {flush_interval} requests");
    }
    let r = bench::run(be, job).await;
    let closed = graph.close().await;
    if let Some((_, e)) = r.error {
        error(format!("Failed request: {e}"));
        return 1;
    }
    if let Err(e) = closed {
        error(e);
        return 1;
    }
    println!("Run completed in {:.3} seconds.", r.elapsed.as_secs_f64());
    0
}
