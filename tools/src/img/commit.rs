//! `basalt-img commit`: write the data of an image, and of the images between it and a base
//! image in its backing chain, into that base, as qemu-img commit does (QEMU's active commit,
//! a mirror job from the top into the base); then empty the top image unless `-d` or `-b`.
//!
//! - Without `-b` the base is the immediate backing file. `-b BASE` names any image of the
//!   chain and is matched as QEMU's `bdrv_find_backing_image` does: a relative name is taken
//!   from the directory of each overlay in turn and compared by real path with that overlay's
//!   backing file (names with a protocol prefix are compared as strings); not found is
//!   "Did not find 'BASE' in the backing chain of 'FILENAME'". `-b` implies `-d`.
//! - What is copied is what QEMU's mirror copies: the base's granularity (its cluster size,
//!   clamped to 4 KiB..64 KiB) chunks that any image above the base allocates (or where an
//!   intermediate image ends before the top does), each read through the whole chain (the
//!   top image's view) and written into the base; whole aligned chunks that read as zeroes
//!   become zero writes, everything else is written as data. Ranges no image above the base
//!   allocates are left alone, so afterwards the base reads as the top did. A base smaller
//!   than the top is grown to the top's size first (zero-filled where its own backing file
//!   would otherwise show through).
//! - `-r RATE` (bytes per second, size suffixes allowed, 0 = unlimited) limits the copy: after
//!   each copied range the job sleeps until `copied / RATE` seconds have passed since it
//!   began; zero writes are not counted, as in QEMU. A bad value is refused with qemu-img's
//!   message before anything is opened.
//! - The images between top and base are opened read-only and the base read-write, once each:
//!   the copy reads the chain through the same nodes it writes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_engine::{Backend, ChildRole, Node, Prealloc, WriteFlags, ZeroFlags};
use basalt_formats::qcow2::Qcow2Node;

use crate::getopt::opt;
use crate::image::{self, ImageSpec};
use crate::img::common::{self, error, usage_error, Chain};

const HELP: &str = "Usage: basalt-img commit [-f FMT] [-t CACHE] [-b BASE] [-r RATE] [-d] [-p] [-q]
        [--object OBJDEF] [--image-opts] FILENAME

Commits the data of FILENAME (and of the images between it and BASE) into BASE, by default
its backing file.
";

/// The most bytes one data copy moves (QEMU's mirror `max_io_bytes`: 16 MiB buffer / 16).
const MAX_IO: u64 = 1 << 20;
/// The longest run of dirty chunks handled in one pass (QEMU's default mirror buffer size).
const MAX_RUN: u64 = 16 << 20;

/// One image of the chain as the probing open found it.
struct Layer {
    filename: String,
    driver: &'static str,
    /// Backing file name and format as recorded in this image.
    backing: Option<(String, Option<String>)>,
}

/// Run the subcommand.
pub async fn main(args: Vec<String>) -> i32 {
    let specs = [
        opt(Some('h'), Some("help"), false),
        opt(Some('f'), Some("format"), true),
        opt(Some('t'), Some("cache"), true),
        opt(Some('b'), Some("base"), true),
        opt(Some('r'), Some("rate-limit"), true),
        opt(Some('d'), Some("drop"), false),
        opt(Some('p'), Some("progress"), false),
        opt(Some('q'), Some("quiet"), false),
        opt(None, Some("object"), true),
        opt(None, Some("image-opts"), false),
    ];
    let a = match common::parse_args("commit", HELP, &args, &specs) {
        Ok(a) => a,
        Err(code) => return code,
    };
    // qemu-img parses the rate while reading its options, before anything else.
    let rate = match a.value("rate-limit").map(|v| common::cvtnum("rate limit", v)) {
        None => 0,
        Some(Ok(r)) => r as u64,
        Some(Err(m)) => {
            error(m);
            return 1;
        }
    };
    if let Err(code) = common::check_objects(&a) {
        return code;
    }
    if a.operands.len() != 1 {
        return usage_error("commit", "Expecting one image file name");
    }
    let filename = &a.operands[0];
    if let Some(c) = a.value("cache") {
        if image::parse_cache(c).is_err() {
            error(format!("Invalid cache option: {c}"));
            return 1;
        }
    }
    let base_arg = a.value("base");
    // -b implies -d, so that the top image stays valid.
    let drop_top = a.has("drop") || base_arg.is_some();

    // Learn the chain: each image's name, driver and recorded backing file.
    let layers = {
        let graph = common::graph(&a);
        let mut probe = common::spec_from_args(&a, filename, "format");
        probe.read_only = true;
        probe.force_share = true;
        let top = match image::open(&graph, &probe).await {
            Ok((n, _)) => n,
            Err(e) => {
                error(e);
                return 1;
            }
        };
        let mut layers = Vec::new();
        let mut cur = Some(top);
        while let Some(n) = cur {
            layers.push(Layer { filename: n.filename(), driver: n.driver(), backing: n.backing_info() });
            cur = backing_child(&n);
        }
        drop(graph);
        layers
    };
    let k = match base_arg {
        Some(b) => match find_backing_image(&layers, b) {
            Some(k) => k,
            None => {
                error(format!("Did not find '{b}' in the backing chain of '{filename}'"));
                return 1;
            }
        },
        None if layers.len() > 1 => 1,
        None => {
            error("Image does not have a backing file");
            return 1;
        }
    };

    let graph = common::graph(&a);
    let cache = a.value("cache").map(str::to_string);
    // The base, read-write, with whatever lies below it; then each image above it, bottom up,
    // on top of the node opened before (by node-name), the top one read-write.
    let (bname, bfmt) = layers[k - 1].backing.clone().expect("an image with a backing child records its name");
    let mut bspec = ImageSpec::new(&basalt_engine::resolve_relative(&layers[k - 1].filename, &bname));
    bspec.fmt = bfmt;
    bspec.cache = cache.clone();
    let (base_node, writethrough) = match image::open(&graph, &bspec).await {
        Ok(n) => n,
        Err(e) => {
            error(e);
            return 1;
        }
    };
    let mut below = base_node.node_name().to_string();
    for i in (1..k).rev() {
        let (name, _) = layers[i - 1].backing.clone().expect("an image with a backing child records its name");
        let mut spec = ImageSpec::new(&basalt_engine::resolve_relative(&layers[i - 1].filename, &name));
        spec.fmt = Some(layers[i].driver.to_string());
        spec.read_only = true;
        spec.cache = cache.clone();
        // As a backing child: others may read, not write or resize.
        spec.unshare = basalt_engine::Perm::WRITE.with(basalt_engine::Perm::RESIZE);
        match open_over(&graph, &spec, &below).await {
            Ok(n) => below = n.node_name().to_string(),
            Err(e) => {
                error(e.context("Could not open backing file"));
                return 1;
            }
        }
    }
    let mut tspec = common::spec_from_args(&a, filename, "format");
    tspec.cache = cache;
    if !tspec.image_opts && tspec.fmt.is_none() {
        tspec.fmt = Some(layers[0].driver.to_string());
    }
    let top = match open_over(&graph, &tspec, &below).await {
        Ok(n) => n,
        Err(e) => {
            error(e.context(format!("Could not open '{filename}'")));
            return 1;
        }
    };

    let r = commit(&top, k, &base_node, writethrough, rate, a.has("progress") && !a.has("quiet")).await;
    if let Err(m) = r {
        error(m);
        let _ = graph.close().await;
        return 1;
    }
    if !drop_top {
        if let Some(q) = top.as_any().downcast_ref::<Qcow2Node>() {
            if let Err(e) = q.make_empty().await {
                error(e);
                let _ = graph.close().await;
                return 1;
            }
        }
    }
    if let Err(e) = graph.close().await {
        error(e);
        return 1;
    }
    if !a.has("quiet") {
        println!("Image committed.");
    }
    0
}

/// A node's backing child, if it has one.
fn backing_child(n: &Arc<dyn Node>) -> Option<Arc<dyn Node>> {
    n.children().into_iter().find(|c| c.role == ChildRole::Backing).map(|c| c.node)
}

/// Open an image of `spec` with the node named `backing` as its backing file.
async fn open_over(graph: &basalt_engine::Graph, spec: &ImageSpec, backing: &str) -> basalt_engine::BlockResult<Arc<dyn Node>> {
    let mut o = image::spec_opts(graph, spec)?;
    o.set("backing", backing.to_string());
    let (flags, _) = image::spec_flags(spec)?;
    graph.open(o, flags).await
}

/// How much guest data one qcow2 L2 table maps (QEMU's block status never answers past its
/// end); None for other formats.
fn l2_table_cover(n: &Arc<dyn Node>) -> Option<u64> {
    n.as_any().downcast_ref::<Qcow2Node>()?;
    let cs = n.cluster_size()?;
    let entry = if extended_l2(n) { 16 } else { 8 };
    Some(cs / entry * cs)
}

/// Whether a qcow2 node has extended L2 entries (subclusters).
fn extended_l2(n: &Arc<dyn Node>) -> bool {
    n.format_specific().and_then(|f| f["data"]["extended-l2"].as_bool()).unwrap_or(false)
}

/// QEMU's `path_has_protocol`: a `:` before any `/`.
fn has_protocol(p: &str) -> bool {
    p.find([':', '/']).is_some_and(|i| p.as_bytes()[i] == b':')
}

/// Index in `layers` of the image `base` names, as QEMU's `bdrv_find_backing_image` finds it:
/// for each overlay in turn, `base` taken relative to that overlay's directory and its
/// recorded backing file are compared by real path; when either has a protocol prefix, the
/// names are compared as given and as resolved against the overlay.
fn find_backing_image(layers: &[Layer], base: &str) -> Option<usize> {
    for (i, l) in layers.iter().enumerate().take(layers.len().saturating_sub(1)) {
        let (stored, _) = l.backing.as_ref()?;
        let stored_full = basalt_engine::resolve_relative(&l.filename, stored);
        if has_protocol(base) || has_protocol(stored) {
            if base == stored || base == stored_full {
                return Some(i + 1);
            }
            continue;
        }
        if base.is_empty() {
            continue;
        }
        let (Ok(want), Ok(have)) =
            (std::fs::canonicalize(basalt_engine::resolve_relative(&l.filename, base)), std::fs::canonicalize(&stored_full))
        else {
            continue;
        };
        if want == have {
            return Some(i + 1);
        }
    }
    None
}

/// Whether the images above the base (`above`, top first) define `off..off+len`, as QEMU's
/// `bdrv_is_allocated_above(top, base_overlay, include_base)` answers: the first layer that
/// allocates the range, or an image below the top that ends before it (its synthesised zeroes
/// count as allocated there). Returns the length that shares the answer.
async fn allocated_above(above: &[Backend], off: u64, len: u64) -> Result<(u64, bool), String> {
    let mut n = len;
    for be in above {
        let size = be.size();
        if off >= size {
            return Ok((n, true));
        }
        let st = be.block_status(off, n.min(size - off)).await.map_err(|e| format!("error while reading image metadata: {e}"))?;
        n = st.len;
        if st.allocated {
            return Ok((n, true));
        }
    }
    Ok((n, false))
}

/// The first range at or after `from` (below `size`) that the images above the base allocate.
async fn next_allocated(above: &[Backend], from: u64, size: u64) -> Result<Option<(u64, u64)>, String> {
    let mut off = from;
    while off < size {
        let (n, alloc) = allocated_above(above, off, size - off).await?;
        if alloc {
            return Ok(Some((off, off + n)));
        }
        off += n;
    }
    Ok(None)
}

/// Copy what the chain above the base defines into the base (the base is `depth` images
/// below `top`), as QEMU's commit job does.
async fn commit(
    top: &Arc<dyn Node>,
    depth: usize,
    base_node: &Arc<dyn Node>,
    writethrough: bool,
    rate: u64,
    progress: bool,
) -> Result<(), String> {
    let size = top.size();
    // Grow the base to the top's size (the format zeroes the new area where a backing file of
    // its own would show through, as QEMU's truncate does).
    let old = base_node.size();
    let grow_err = |e: &dyn std::fmt::Display| {
        format!(
            "Top image {} is larger than base image {}, and resize of base image failed: {e}",
            top.filename(),
            base_node.filename()
        )
    };
    if size > old {
        base_node.truncate(size, Prealloc::Off).await.map_err(|e| grow_err(&e))?;
    }
    let mut base = Backend::new(base_node.clone()).map_err(|e| e.to_string())?;
    base.set_writethrough(writethrough);
    let chain = Chain::new(top.clone())?;
    let mut covers = Vec::new();
    let mut cur = Some(top.clone());
    while let Some(n) = cur {
        covers.push(l2_table_cover(&n));
        cur = backing_child(&n);
    }
    let mut above = Vec::new();
    let mut cur = Some(top.clone());
    for _ in 0..depth {
        let n = cur.expect("the chain reaches the base");
        cur = backing_child(&n);
        above.push(Backend::new(n).map_err(|e| e.to_string())?);
    }
    // QEMU's default bitmap granularity for the target, and the target's subcluster size
    // (zero writes must cover whole subclusters, else the range is copied).
    let g = base_node.cluster_size().map_or(65536, |c| c.clamp(4096, 65536));
    let sc = match base_node.as_any().downcast_ref::<Qcow2Node>() {
        Some(_) => {
            let cs = base_node.cluster_size().unwrap_or(65536);
            if extended_l2(base_node) {
                cs / 32
            } else {
                cs
            }
        }
        None => base_node.cluster_size().unwrap_or(1),
    };
    let mut prog = common::Progress::new(progress, 1.0);
    prog.print(0.0, 0);
    let start = Instant::now();
    let mut copied = 0u64;
    let mut cursor = 0;
    while let Some((a, b)) = next_allocated(&above, cursor, size).await? {
        // A run of dirty chunks: every chunk holding a byte allocated above the base.
        let run_start = a / g * g;
        let mut run_end = b.div_ceil(g) * g;
        while run_end - run_start < MAX_RUN && run_end < size {
            match next_allocated(&above, run_end, size).await? {
                Some((a2, b2)) if a2 < run_end + g => run_end = b2.div_ceil(g) * g,
                _ => break,
            }
        }
        let run_end = run_end.min(run_start + MAX_RUN);
        let mut off = run_start;
        while off < run_end && off < size {
            let st = chain
                .status(off, run_end.min(size) - off)
                .await
                .map_err(|e| format!("error while reading image metadata: {e}"))?;
            // QEMU's qcow2 answers for at most one L2 table at a time, and each layer the
            // query passed through narrows the answer: whether a zero range is long enough
            // to be written as zeroes depends on it.
            let reach = covers.iter().take(st.depth as usize + 1).flatten().map(|c| (off / c + 1) * c - off).min();
            let mut n = reach.map_or(st.len, |r| st.len.min(r));
            if st.data {
                n = n.min(MAX_IO);
            }
            n -= n % g;
            let zero = if n < g {
                n = g;
                false
            } else {
                !st.data && st.zero && off.is_multiple_of(sc) && n.is_multiple_of(sc)
            };
            let n = n.min(size - off);
            if zero {
                base.write_zeroes(off, n, ZeroFlags { may_unmap: true, ..ZeroFlags::default() })
                    .await
                    .res
                    .map_err(|e| format!("error while writing at byte {off}: {e}"))?;
            } else {
                let d = common::read(chain.top(), off, n as usize)
                    .await
                    .map_err(|e| format!("error while reading at byte {off}: {e}"))?;
                let w = base.write(off, d, WriteFlags::default()).await;
                w.res.map_err(|e| format!("error while writing at byte {off}: {e}"))?;
                copied += n;
            }
            off += n;
            prog.advance(off, size);
            if rate > 0 && !zero {
                basalt_reactor::sleep_until(start + Duration::from_secs_f64(copied as f64 / rate as f64)).await;
            }
        }
        cursor = off.max(run_end);
    }
    prog.advance(size, size);
    base.flush().await.res.map_err(|e| format!("error while flushing: {e}"))?;
    if progress {
        prog.end();
    }
    Ok(())
}
