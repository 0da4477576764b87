//! `basalt-img convert`: copy one or more images (concatenated) into a new or existing one,
//! with qemu-img's options: `-f -O -o -n -S -W -m -p -q -t -T -c -C -B -l -r -U --image-opts
//! --target-image-opts --target-is-zero --salvage --object`.
//!
//! The target is created with the output format's driver unless `-n`; it is opened with cache
//! mode `unsafe` by default (as qemu-img), sources with `writeback` and with writers excluded.
//! Options this build cannot honour (`-c` on raw, `-B` on raw, `-l`, `-C`, `--bitmaps`) are
//! refused with qemu-img's message.

use std::io::Write;

use basalt_engine::{parse_number, parse_size, Backend, Opts, Perm};

use crate::getopt::{self, opt};
use crate::image::{self, ImageSpec};
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
    if a.operands.len() < 2 {
        return Err("Must specify image file name".into());
    }
    let out_fmt = a.value("O").unwrap_or("raw").to_string();
    let skip_create = a.has("n");
    let target_opts = a.has("target-image-opts");
    if target_opts && !skip_create {
        return Err("--target-image-opts requires use of -n flag".into());
    }
    if a.has("C") {
        return Err("Copy offloading (-C) is not supported by this build of basalt-img".into());
    }
    let graph = crate::img::common::graph(a);
    let drv = graph.registry().get(&out_fmt).ok_or_else(|| format!("Unknown file format '{out_fmt}'"))?;
    if a.has("c") && !drv.supports_compression() {
        return Err("Compression not supported for this file format".into());
    }
    if a.value("B").is_some() {
        if drv.create_opts().iter().any(|o| o.name == "backing_file") {
            return Err("-B (a backing file for the target) is not supported by this build of basalt-img convert".into());
        }
        return Err(format!("Backing file not supported for file format '{out_fmt}'"));
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
    // What qemu-img answers for sources without snapshots or bitmaps; qcow2 sources have
    // them, and this build cannot copy from them yet.
    let plain = |d: &str| d != "qcow2";
    if let Some(d) = a.value("l").and(sources.iter().map(|b| b.node().driver()).next()) {
        if plain(d) {
            return Err(format!(
                "Failed to load snapshot: Block format '{d}' used by device '' does not support temporarily loading internal snapshots"
            ));
        }
        return Err("Converting from an internal snapshot (-l) is not supported by this build of basalt-img convert".into());
    }
    if a.has("bitmaps") {
        if sources.iter().all(|b| plain(b.node().driver())) {
            return Err("Source lacks bitmap support".into());
        }
        return Err("Copying bitmaps (--bitmaps) is not supported by this build of basalt-img convert".into());
    }
    let total: u64 = sources.iter().map(Backend::size).sum();

    let mut create_opts = Opts::new();
    for o in a.values("o") {
        let parsed = Opts::parse_keyval(o, None).map_err(|e| e.to_string())?;
        create_opts.insert_sub_root(parsed);
    }
    if a.has("c")
        && (create_opts.get_str("encryption").is_some_and(|v| basalt_engine::parse_bool(&v) == Some(true))
            || create_opts.contains("encrypt.format"))
    {
        return Err("Compression and encryption not supported at the same time".into());
    }
    let prealloc = create_opts.get_str("preallocation");
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
    let mut target = Backend::new(tnode).map_err(|e| e.to_string())?;
    target.set_writethrough(writethrough);
    if target.size() < total {
        return Err("output file is smaller than input file".into());
    }
    let target_zero = if skip_create {
        a.has("target-is-zero")
    } else {
        prealloc.as_deref() != Some("off_nozero") && target_reads_zero(&target)
    };

    let progress: copy::Progress = if a.has("p") && !a.has("q") { progress_printer() } else { Box::new(|_, _| {}) };
    let compress = if a.has("c") { target.node().cluster_size() } else { None };
    let opts = CopyOpts {
        workers,
        reactors: crate::cores(),
        out_of_order: a.has("W"),
        sparse_size,
        target_zero,
        salvage: a.has("salvage"),
        rate,
        chunk: 2 << 20,
        compress,
    };
    let sources = sources.iter().map(|b| b.node().clone()).collect();
    copy::copy(sources, target.clone(), opts, progress).await.map_err(|e| e.to_string())?;
    let f = target.flush().await;
    if let Err(e) = f.res {
        return Err(format!("error while flushing: {e}"));
    }
    graph.close().await.map_err(|e| e.to_string())
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
