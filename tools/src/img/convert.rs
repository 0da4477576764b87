//! `basalt-img convert`: copy one or more images (concatenated) into a new or existing one,
//! with qemu-img's options: `-f -O -o -n -S -W -m -p -q -t -T -c -C -B -l -r -U --image-opts
//! --target-image-opts --target-is-zero --salvage --object`.
//!
//! The target is created with the output format's driver unless `-n`; it is opened with cache
//! mode `unsafe` by default (as qemu-img), sources with `writeback` and with writers excluded.
//! With a backing file for the target (`-B`/`-F` or `-o backing_file`) only what each
//! source's top image defines is written (zeroes written out), as qemu-img does; `-l` reads the
//! source at an internal snapshot; `--bitmaps` copies the persistent bitmaps after the data.
//! Copy offloading (`-C`) is refused with a clear error; `-c` or `-B` on formats without
//! them are refused with qemu-img's message.

use std::io::Write;

use std::sync::Arc;

use basalt_engine::{parse_number, parse_size, Backend, ChildRole, Node, Opts, Perm};
use basalt_formats::qcow2::{BitmapSummary, Qcow2Node};

use crate::getopt::{self, opt};
use crate::image::{self, ImageSpec};
use crate::img::common::{parse_snapshot, SnapshotSel};
use crate::img::copy::{self, CopyOpts};
use crate::img::error;

/// Run the subcommand.
pub async fn main(args: Vec<String>) -> i32 {
    let specs = [
        opt(Some('h'), Some("help"), false),
        opt(Some('f'), None, true),
        opt(Some('O'), None, true),
        opt(Some('B'), None, true),
        opt(Some('c'), None, false),
        opt(Some('C'), None, false),
        opt(Some('o'), None, true),
        opt(Some('l'), None, true),
        opt(Some('n'), None, false),
        opt(Some('p'), None, false),
        opt(Some('q'), None, false),
        opt(Some('S'), None, true),
        opt(Some('t'), None, true),
        opt(Some('T'), None, true),
        opt(Some('m'), None, true),
        opt(Some('W'), None, false),
        opt(Some('r'), None, true),
        opt(Some('U'), Some("force-share"), false),
        opt(Some('F'), None, true),
        opt(None, Some("object"), true),
        opt(None, Some("image-opts"), false),
        opt(None, Some("target-image-opts"), false),
        opt(None, Some("target-is-zero"), false),
        opt(None, Some("salvage"), false),
        opt(None, Some("bitmaps"), false),
        opt(None, Some("skip-broken-bitmaps"), false),
    ];
    let a = match getopt::parse(&args, &specs) {
        Ok(a) => a,
        Err(e) => {
            error(format!("{e}\nTry 'basalt-img convert --help' for more info"));
            return 1;
        }
    };
    if let Err(code) = crate::img::common::check_objects(&a) {
        return code;
    }
    match run(&a).await {
        Ok(()) => 0,
        Err(msg) => {
            error(msg);
            1
        }
    }
}

async fn run(a: &getopt::Args) -> Result<(), String> {
    let workers = match a.value("m") {
        None => 8,
        Some(v) => match parse_number(v) {
            Some(n) if (1..=16).contains(&n) => n as usize,
            _ => return Err("Invalid number of coroutines specified. Must be between 1 and 16.".into()),
        },
    };
    let sparse_size = match a.value("S") {
        None => 4096,
        Some(v) => match parse_size(v) {
            Some(n) if n <= 16 << 20 && n % 512 == 0 => n,
            _ => return Err("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).".into()),
        },
    };
    let rate = match a.value("r") {
        None => 0,
        Some(v) => parse_size(v).filter(|n| *n > 0).ok_or_else(|| format!("Invalid rate limit specified: '{v}'."))?,
    };
    if a.has("skip-broken-bitmaps") && !a.has("bitmaps") {
        return Err("Use of --skip-broken-bitmaps requires --bitmaps".into());
    }
    let snapshot = match a.value("l") {
        None => None,
        Some(v) => Some(parse_snapshot(v)?),
    };
    if a.operands.len() < 2 {
        return Err("Must specify image file name".into());
    }
    let out_fmt = a.value("O").unwrap_or("raw").to_string();
    let skip_create = a.has("n");
    let target_opts = a.has("target-image-opts");
    if target_opts && !skip_create {
        return Err("--target-image-opts requires use of -n flag".into());
    }
    if a.has("target-is-zero") && !skip_create {
        return Err("--target-is-zero requires use of -n flag".into());
    }
    if a.has("C") {
        return Err("Copy offloading (-C) is not supported by this build of basalt-img".into());
    }
    let graph = crate::img::common::graph(a);
    let drv = graph.registry().get(&out_fmt).ok_or_else(|| format!("Unknown file format '{out_fmt}'"))?;
    if a.has("c") && !drv.supports_compression() {
        return Err("Compression not supported for this file format".into());
    }
    let out_baseimg = a.value("B");
    let backing_fmt = a.value("F");
    let takes_backing = drv.create_opts().iter().any(|o| o.name == "backing_file");
    if !skip_create && !takes_backing {
        if out_baseimg.is_some() {
            return Err(format!("Backing file not supported for file format '{out_fmt}'"));
        }
        if backing_fmt.is_some() {
            return Err(format!("Backing file format not supported for file format '{out_fmt}'"));
        }
    }
    let (srcs, out) = a.operands.split_at(a.operands.len() - 1);
    let out = &out[0];

    // Sources: read-only, no other writers.
    let mut sources = Vec::new();
    for s in srcs {
        let mut spec = ImageSpec::new(s);
        spec.fmt = a.value("f").map(str::to_string);
        spec.image_opts = a.has("image-opts");
        spec.force_share = a.has("force-share");
        spec.read_only = true;
        spec.cache = Some(a.value("T").unwrap_or("writeback").to_string());
        spec.aio = Some(bulk_aio(spec.cache.as_deref()).into());
        if !spec.force_share {
            spec.unshare = Perm::WRITE;
        }
        let (node, _) = image::open(&graph, &spec).await.map_err(|e| e.to_string())?;
        sources.push(Backend::new(node).map_err(|e| e.to_string())?);
    }
    if let Some(sn) = &snapshot {
        load_snapshot(&sources, sn).await?;
    }
    let total: u64 = sources.iter().map(Backend::size).sum();

    let mut create_opts = Opts::new();
    for o in a.values("o") {
        let parsed = Opts::parse_keyval(o, None).map_err(|e| e.to_string())?;
        create_opts.insert_sub_root(parsed);
    }
    let mut target_has_backing = out_baseimg.is_some();
    if !skip_create {
        if let Some(b) = out_baseimg {
            create_opts.set("backing_file", b.to_string());
        }
        if let Some(f) = backing_fmt {
            create_opts.set("backing_fmt", f.to_string());
        }
        target_has_backing |= create_opts.contains("backing_file");
    }
    if target_has_backing && a.has("target-is-zero") {
        return Err("Cannot use --target-is-zero when the destination image has a backing file".into());
    }
    if target_has_backing && sources.len() > 1 {
        return Err("Having a backing file for the target makes no sense when concatenating multiple input images".into());
    }
    if !skip_create && create_opts.contains("backing_file") && !create_opts.contains("backing_fmt") {
        return Err("Use of backing file requires explicit backing format".into());
    }
    if a.has("c")
        && (create_opts.get_str("encryption").is_some_and(|v| basalt_engine::parse_bool(&v) == Some(true))
            || create_opts.contains("encrypt.format"))
    {
        return Err("Compression and encryption not supported at the same time".into());
    }
    let prealloc = create_opts.get_str("preallocation");
    let bitmaps = if a.has("bitmaps") { Some(check_bitmaps(&sources, a.has("skip-broken-bitmaps"))?) } else { None };
    // As qemu-img: the target is opened with the key secrets it was created with.
    let key_secrets: Vec<(&str, String)> =
        ["key-secret", "encrypt.key-secret"].into_iter().filter_map(|k| create_opts.get_str(k).map(|v| (k, v))).collect();
    if !skip_create {
        let size = match create_opts.take_str("size") {
            Some(s) => parse_size(&s).ok_or_else(|| format!("Invalid size '{s}'"))?,
            None => total,
        };
        graph
            .create(drv.name(), out, size, create_opts)
            .await
            .map_err(|e| format!("{out}: error while converting {out_fmt}: {e}"))?;
    } else if !create_opts.is_empty() {
        return Err("-o cannot be used with -n".into());
    }

    let mut spec = ImageSpec::new(out);
    spec.fmt = if target_opts { None } else { Some(out_fmt.clone()) };
    spec.image_opts = target_opts;
    spec.cache = Some(a.value("t").unwrap_or("unsafe").to_string());
    spec.aio = Some(bulk_aio(spec.cache.as_deref()).into());
    if !target_opts && !key_secrets.is_empty() {
        let mut o = Opts::new();
        o.set("driver", out_fmt.clone());
        o.set("file.filename", out.to_string());
        for (k, v) in &key_secrets {
            o.set(k, v.clone());
        }
        spec.filename = basalt_engine::json_filename(&o);
        spec.fmt = None;
    }
    let (tnode, writethrough) = image::open(&graph, &spec).await.map_err(|e| e.to_string())?;
    // Once the target is open it is closed however the copy ends, as qemu-img does (what it
    // keeps in memory, such as bitmaps, is stored).
    let opts = CopyOpts {
        workers,
        reactors: crate::cores(),
        out_of_order: a.has("W"),
        sparse_size,
        // Set from the opened target below.
        target_zero: false,
        salvage: a.has("salvage"),
        rate,
        chunk: 2 << 20,
        compress: None,
        target_backing: target_has_backing,
        backing_size: None,
    };
    let job = Job { target: tnode, writethrough, sources: &sources, total, prealloc: prealloc.as_deref(), bitmaps };
    let r = copy_into(a, job, opts).await;
    let c = graph.close().await.map_err(|e| e.to_string());
    r.and(c)
}

/// The opened target and what the copy into it needs.
struct Job<'a> {
    target: Arc<dyn Node>,
    writethrough: bool,
    sources: &'a [Backend],
    total: u64,
    prealloc: Option<&'a str>,
    bitmaps: Option<Vec<BitmapSummary>>,
}

/// Copy the sources into the opened target, then the bitmaps.
async fn copy_into(a: &getopt::Args, job: Job<'_>, mut opts: CopyOpts) -> Result<(), String> {
    let Job { target: tnode, writethrough, sources, total, prealloc, bitmaps } = job;
    let skip_create = a.has("n");
    let mut target = Backend::new(tnode).map_err(|e| e.to_string())?;
    target.set_writethrough(writethrough);
    if target.size() < total {
        return Err("output file is smaller than input file".into());
    }
    if bitmaps.is_some() && !supports_bitmaps(&target) {
        return Err(format!("Format driver '{}' does not support bitmaps", target.node().driver()));
    }
    opts.target_zero = if skip_create {
        a.has("target-is-zero")
    } else {
        !opts.target_backing && prealloc != Some("off_nozero") && target_reads_zero(&target)
    };
    // Past the end of a new target's backing file, its unallocated ranges read as zeroes.
    opts.backing_size = match opts.target_backing && !skip_create {
        true => target.node().children().into_iter().find(|c| c.role == ChildRole::Backing).map(|c| c.node.size()),
        false => None,
    };

    let progress: copy::Progress = if a.has("p") && !a.has("q") { progress_printer() } else { Box::new(|_, _| {}) };
    opts.compress = if a.has("c") { target.node().cluster_size() } else { None };
    let nodes = sources.iter().map(|b| b.node().clone()).collect();
    copy::copy(nodes, target.clone(), opts, progress).await.map_err(|e| e.to_string())?;
    let f = target.flush().await;
    if let Err(e) = f.res {
        return Err(format!("error while flushing: {e}"));
    }
    if let Some(list) = bitmaps {
        copy_bitmaps(sources[0].node(), target.node(), &list).await?;
    }
    Ok(())
}

/// How files are driven for a bulk copy: through the page cache, large reads and writes go to
/// the thread pool (as qemu-img's default `aio=threads`): io_uring would copy a read inline on
/// the reactor, stalling it, and hand a buffered write to its kernel workers only after a failed
/// non-blocking try, both slower for megabyte-sized requests. With `O_DIRECT` io_uring is used.
/// An `aio` option given with `--image-opts` still wins.
fn bulk_aio(cache: Option<&str>) -> &'static str {
    match cache {
        Some("none" | "directsync") => "io_uring",
        _ => "threads",
    }
}

/// A freshly created target reads as zeroes when its protocol starts empty (files do).
fn target_reads_zero(target: &Backend) -> bool {
    let mut n = target.node().clone();
    loop {
        let next = n.children().into_iter().next();
        match next {
            Some(c) => n = c.node,
            None => return n.driver() == "file",
        }
    }
}

/// qemu-img's progress lines, "    (12.34/100%)\r", on stdout; an indicatif bar on a terminal.
fn progress_printer() -> copy::Progress {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() {
        let bar = indicatif::ProgressBar::new(100 * 100);
        bar.set_style(
            indicatif::ProgressStyle::with_template("    {bar:40} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        return Box::new(move |done, total| {
            let pct = if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 };
            bar.set_position((pct * 100.0) as u64);
            bar.set_message(format!("({pct:.2}/100%)"));
            if done >= total {
                bar.finish();
            }
        });
    }
    let last = std::sync::Mutex::new(-1.0f64);
    Box::new(move |done, total| {
        let pct = if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 };
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        // Print when it moved by at least 1%, and at the ends, as qemu-img does.
        if pct - *last >= 1.0 || done == 0 || done >= total {
            *last = pct;
            let mut out = std::io::stdout();
            let _ = write!(out, "    ({pct:.2}/100%)\r");
            if done >= total && total > 0 {
                let _ = writeln!(out);
            }
            let _ = out.flush();
        }
    })
}

/// Make the first source read as the snapshot `-l` names.
async fn load_snapshot(sources: &[Backend], sel: &SnapshotSel) -> Result<(), String> {
    if matches!(sel, SnapshotSel::IdOrName(_)) && sources.len() > 1 {
        return Err("No support for concatenating multiple snapshot".into());
    }
    crate::img::common::load_snapshot(sources[0].node(), sel).await
}

/// `--bitmaps`: the single source's persistent bitmaps to copy, checked before the target is
/// created (an inconsistent one fails the copy unless `--skip-broken-bitmaps`).
fn check_bitmaps(sources: &[Backend], skip_broken: bool) -> Result<Vec<BitmapSummary>, String> {
    if sources.len() > 1 {
        return Err("Copying bitmaps only possible with single source".into());
    }
    let Some(q) = sources[0].node().as_any().downcast_ref::<Qcow2Node>().filter(|q| q.header().version >= 3) else {
        return Err("Source lacks bitmap support".into());
    };
    let list = q.bitmap_list();
    if let Some(b) = list.iter().find(|b| b.inconsistent && !skip_broken) {
        return Err(format!(
            "Cannot copy inconsistent bitmap '{}'\nTry --skip-broken-bitmaps, or use '{} bitmap --remove' to delete it",
            b.name,
            crate::img::common::PROG
        ));
    }
    Ok(list)
}

/// Whether the target can store persistent bitmaps (qcow2 version 3).
fn supports_bitmaps(target: &Backend) -> bool {
    target.node().as_any().downcast_ref::<Qcow2Node>().is_some_and(|q| q.header().version >= 3)
}

/// After the data: add each of the source's bitmaps to the target with its granularity and
/// enabled state, then merge the source's bits in (qemu-img's `convert_copy_bitmaps`).
/// Stored when the graph closes.
async fn copy_bitmaps(src: &Arc<dyn Node>, dst: &Arc<dyn Node>, list: &[BitmapSummary]) -> Result<(), String> {
    let (Some(sq), Some(dq)) = (src.as_any().downcast_ref::<Qcow2Node>(), dst.as_any().downcast_ref::<Qcow2Node>()) else {
        return Err("Source lacks bitmap support".into());
    };
    // qemu-img walks the bitmaps last first: a name the target has already is reported as it
    // reports it, before anything is added.
    let have: Vec<String> = dq.bitmap_list().into_iter().map(|b| b.name).collect();
    if let Some(b) = list.iter().rev().find(|b| !b.inconsistent && have.contains(&b.name)) {
        return Err(format!("Failed to create bitmap {}: Bitmap already exists: {}", b.name, b.name));
    }
    for b in list {
        if b.inconsistent {
            crate::img::common::warn(format!("Skipping inconsistent bitmap '{}'", b.name));
            continue;
        }
        dq.bitmap_add(&b.name, Some(b.granularity), b.enabled)
            .map_err(|e| format!("Failed to create bitmap {}: {}", b.name, e.msg))?;
        let populate = async {
            let (gb, bits) = sq.bitmap_bits(&b.name).await?;
            dq.bitmap_merge(&b.name, gb, &bits, src.size())?;
            Ok::<(), basalt_engine::BlockError>(())
        };
        if let Err(e) = populate.await {
            let _ = dq.bitmap_remove(&b.name);
            return Err(format!("Failed to populate bitmap {}: {}", b.name, e.msg));
        }
    }
    Ok(())
}
