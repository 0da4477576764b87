//! basalt-bench: a fio/bdevperf-style benchmark of the whole Basalt stack.
//!
//! With no arguments it runs the built-in default job: 4 KiB random reads, then random writes,
//! at queue depth 32 for 2 seconds each on a temporary 256 MiB raw image (through the raw
//! format, the file driver and io_uring), then the same random reads on `null-co` as a
//! baseline for the stack's own cost, and prints a fio-style summary for each.
//!
//! Options (fio's names): `--filename=PATH` (or `json:`/`null-co://`), `--format=FMT`,
//! `--image-opts`, `--rw=randread|randwrite|randrw|read|write`, `--rwmixread=PCT`,
//! `--bs=SIZE`, `--iodepth=N`, `--runtime=SECS`, `--number_ios=N`, `--direct=0|1`,
//! `--cores=N` (one reactor per core, each with its own queue on the same node),
//! `--sqthread_poll=1` (io_uring SQPOLL), `--busy_poll=1` (never back
//! off to a blocking wait).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use basalt_engine::{parse_size, Backend, Graph};
use basalt_reactor::{Runtime, RuntimeConfig};
use basalt_tools::bench::{self, BenchJob, BenchResult, Histogram, Pattern};
use basalt_tools::image::{self, ImageSpec};

#[derive(Clone)]
struct Job {
    name: String,
    filename: String,
    format: Option<String>,
    image_opts: bool,
    rw: String,
    rwmixread: u8,
    bs: usize,
    iodepth: usize,
    runtime: Duration,
    number_ios: u64,
    direct: bool,
    cores: usize,
    sqpoll: bool,
    busy_poll: bool,
}

impl Default for Job {
    fn default() -> Job {
        Job {
            name: "job".into(),
            filename: String::new(),
            format: None,
            image_opts: false,
            rw: "randread".into(),
            rwmixread: 50,
            bs: 4096,
            iodepth: 32,
            runtime: Duration::from_secs(2),
            number_ios: 0,
            direct: false,
            cores: 1,
            sqpoll: false,
            busy_poll: false,
        }
    }
}

fn parse_args(args: &[String]) -> Result<Job> {
    let mut j = Job::default();
    for a in args {
        let Some(a) = a.strip_prefix("--") else { bail!("unexpected argument '{a}'") };
        let (k, v) = a.split_once('=').unwrap_or((a, ""));
        let num = |v: &str| parse_size(v).with_context(|| format!("invalid value '{v}' for --{k}"));
        match k {
            "name" => j.name = v.into(),
            "filename" => j.filename = v.into(),
            "format" => j.format = Some(v.into()),
            "image-opts" => j.image_opts = true,
            "rw" | "readwrite" => {
                if !["randread", "randwrite", "randrw", "read", "write", "rw"].contains(&v) {
                    bail!("invalid --rw '{v}'");
                }
                j.rw = v.into()
            }
            "rwmixread" => j.rwmixread = num(v)?.min(100) as u8,
            "bs" => j.bs = num(v)? as usize,
            "iodepth" => j.iodepth = num(v)?.max(1) as usize,
            "runtime" => j.runtime = Duration::from_secs_f64(v.trim_end_matches('s').parse().context("invalid --runtime")?),
            "number_ios" => j.number_ios = num(v)?,
            "direct" => j.direct = v == "1",
            "cores" | "numjobs" => j.cores = num(v)?.max(1) as usize,
            "sqthread_poll" => j.sqpoll = v == "1",
            "busy_poll" => j.busy_poll = v == "1",
            _ => bail!("unknown option --{k}"),
        }
    }
    if j.filename.is_empty() {
        bail!("--filename is required when options are given");
    }
    Ok(j)
}

fn run_job(rt: &Runtime, j: &Job) -> Result<Vec<BenchResult>> {
    let (write_pct, pattern) = match j.rw.as_str() {
        "randread" => (0, Pattern::Random),
        "randwrite" => (100, Pattern::Random),
        "randrw" => (100 - j.rwmixread, Pattern::Random),
        "read" => (0, Pattern::Sequential { step: j.bs as u64 }),
        "write" => (100, Pattern::Sequential { step: j.bs as u64 }),
        _ => (100 - j.rwmixread, Pattern::Sequential { step: j.bs as u64 }),
    };
    let mut spec = ImageSpec::new(&j.filename);
    spec.fmt = j.format.clone();
    spec.image_opts = j.image_opts;
    spec.read_only = write_pct == 0;
    spec.cache = Some(if j.direct { "none" } else { "writeback" }.into());
    let graph_spec = spec.clone();
    // Open once on reactor 0; every reactor then makes its own queue on the same node.
    let node = rt
        .block_on(0, move || async move {
            let graph = Graph::new(basalt_formats::registry());
            image::open(&graph, &graph_spec).await.map(|(n, _)| n).map_err(|e| e.to_string())
        })
        .map_err(anyhow::Error::msg)?;
    let mut handles = Vec::new();
    let (tx, rx) = std::sync::mpsc::channel();
    for core in 0..rt.len() {
        let node = node.clone();
        let job = BenchJob {
            count: j.number_ios,
            runtime: if j.number_ios == 0 { Some(j.runtime) } else { None },
            depth: j.iodepth,
            bufsize: j.bs,
            offset: 0,
            pattern,
            write_pct,
            fill: 0xa5,
            flush_interval: 0,
            drain: true,
            latency: true,
            seed: 0x1234_5678_9abc_def1 ^ (core as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        };
        let tx = tx.clone();
        rt.handle(core).spawn(move || async move {
            let r = match Backend::new(node) {
                Ok(be) => Ok(bench::run(be, job).await),
                Err(e) => Err(e.to_string()),
            };
            let _ = tx.send(r);
        });
        handles.push(core);
    }
    drop(tx);
    let mut out = Vec::new();
    for r in rx {
        out.push(r.map_err(anyhow::Error::msg)?);
    }
    if let Some((off, e)) = out.iter().find_map(|r| r.error) {
        bail!("I/O error at offset {off}: {e}");
    }
    Ok(out)
}

fn cpu_times() -> (f64, f64) {
    // SAFETY: rusage is plain old data and getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    (t(ru.ru_utime), t(ru.ru_stime))
}

fn unit(bytes_per_s: f64) -> String {
    let mib = bytes_per_s / (1024.0 * 1024.0);
    let mb = bytes_per_s / 1e6;
    if mib >= 1024.0 {
        format!("{:.2}GiB/s ({:.0}MB/s)", mib / 1024.0, mb)
    } else {
        format!("{mib:.1}MiB/s ({mb:.1}MB/s)")
    }
}

fn iops_str(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn print_dir(dir: &str, ops: u64, h: &Histogram, bs: usize, secs: f64) {
    if ops == 0 {
        return;
    }
    let iops = ops as f64 / secs;
    println!(
        "  {dir}: IOPS={}, BW={}({:.1}MiB/{:.0}msec)",
        iops_str(iops),
        unit(iops * bs as f64),
        ops as f64 * bs as f64 / 1048576.0,
        secs * 1000.0
    );
    let us = |ns: f64| ns / 1000.0;
    println!(
        "    clat (usec): min={:.2}, max={:.2}, avg={:.2}, stdev={:.2}",
        us(h.min as f64),
        us(h.max as f64),
        us(h.mean()),
        us(h.stdev())
    );
    println!("    clat percentiles (usec):");
    let ps = [1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99];
    for row in ps.chunks(4) {
        let cells: Vec<String> = row.iter().map(|p| format!("{p:>6.2}th=[{:>8.2}]", us(h.percentile(*p) as f64))).collect();
        println!("     | {}", cells.join(", "));
    }
}

fn report(j: &Job, results: &[BenchResult], cpu: (f64, f64)) {
    let secs = results.iter().map(|r| r.elapsed.as_secs_f64()).fold(0.0, f64::max);
    let mut rl = Histogram::default();
    let mut wl = Histogram::default();
    let (mut reads, mut writes) = (0, 0);
    for r in results {
        rl.merge(&r.read_lat);
        wl.merge(&r.write_lat);
        reads += r.reads;
        writes += r.writes;
    }
    println!("{}: (rw={}, bs={}, iodepth={}, cores={}) {}", j.name, j.rw, j.bs, j.iodepth, j.cores, j.filename);
    if j.sqpoll {
        println!("  sqpoll requested (falls back to normal submission when the kernel refuses it)");
    }
    print_dir("read", reads, &rl, j.bs, secs);
    print_dir("write", writes, &wl, j.bs, secs);
    let total = (reads + writes).max(1) as f64;
    println!(
        "  cpu: usr={:.2}%, sys={:.2}%, {:.0} ns CPU per I/O",
        cpu.0 / secs * 100.0,
        cpu.1 / secs * 100.0,
        (cpu.0 + cpu.1) * 1e9 / total
    );
}

fn run_and_report(j: &Job) -> Result<()> {
    let mut cfg = RuntimeConfig::cores(j.cores, true);
    cfg.reactor.idle_spin = if j.busy_poll { None } else { Some(Duration::from_micros(200)) };
    cfg.reactor.sqpoll = j.sqpoll;
    let rt = Runtime::new(cfg).context("starting reactors")?;
    let before = cpu_times();
    let results = run_job(&rt, j)?;
    let after = cpu_times();
    report(j, &results, (after.0 - before.0, after.1 - before.1));
    println!();
    Ok(())
}

fn default_jobs() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("basalt-bench").tempdir().context("creating a temporary directory")?;
    let path = dir.path().join("bench.raw");
    let size = 256u64 << 20;
    // Fully write the image so reads hit real data in the page cache.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&path).context("creating the temporary image")?;
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..(size >> 20) {
            f.write_all(&chunk)?;
        }
    }
    let filename = path.to_string_lossy().into_owned();
    println!("basalt-bench default job: 4 KiB random I/O at queue depth 32, 2 s per job, one reactor");
    println!("image: {filename} (raw, 256 MiB, page cache, io_uring)\n");
    let base = Job { name: "randread-raw-file".into(), filename: filename.clone(), format: Some("raw".into()), ..Job::default() };
    run_and_report(&base)?;
    run_and_report(&Job { name: "randwrite-raw-file".into(), rw: "randwrite".into(), ..base.clone() })?;
    run_and_report(&Job { name: "randread-null-co".into(), filename: "null-co://".into(), ..base.clone() })?;
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = if args.is_empty() {
        default_jobs()
    } else if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "usage: basalt-bench [--filename=F] [--format=FMT] [--image-opts] [--rw=randread|randwrite|randrw|read|write|rw]"
        );
        println!("                    [--rwmixread=PCT] [--bs=SIZE] [--iodepth=N] [--runtime=SECS] [--number_ios=N]");
        println!("                    [--direct=0|1] [--cores=N] [--sqthread_poll=0|1] [--busy_poll=0|1] [--name=NAME]");
        println!("With no arguments: the built-in default job.");
        Ok(())
    } else {
        parse_args(&args).and_then(|j| run_and_report(&j))
    };
    if let Err(e) = r {
        eprintln!("basalt-bench: {e:#}");
        std::process::exit(1);
    }
}
