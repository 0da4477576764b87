//! qcow2 against QEMU's tools, both directions.
//!
//! - Images qemu-img makes and qemu-io writes (data at odd offsets, across cluster and L2
//!   boundaries, zero clusters, discards, compressed clusters, backing chains of depth 3) over
//!   the option matrix (compat 0.10/1.1, cluster sizes 512..2M, refcount widths 1..64,
//!   extended L2, zstd) read byte-exact through basalt-io (`read -P` against what QEMU reads)
//!   and `basalt-img compare` answers as `qemu-img compare`; `info` and `map` (human, JSON,
//!   `--backing-chain`) print exactly what qemu-img prints for the same file.
//! - Images basalt-img makes and basalt-io writes are clean under `qemu-img check`, identical
//!   under `qemu-img compare` to the same operations done by QEMU, and map the same (same
//!   allocation order for sequential single-request workloads).
//! - Long seeded random write / write -z / discard sequences applied by both tools agree,
//!   checked every batch; small clusters make the refcount structures grow.
//! - Malformed images fail with a clear error, never a panic or a hang.
//!
//! The binaries must be built first (`cargo build -p basalt-tools --bins`); qemu-img and
//! qemu-io must be installed: a missing peer is a failure.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};

use basalt_tests::{must, peer, punch_hole, run, stderr, stdout, tool, Rng};

// ---------------------------------------------------------------------------------------------
// Running the tools.

fn qemu_img(dir: &Path, args: &[&str]) -> Output {
    run(peer("qemu-img").current_dir(dir).args(args))
}

fn qemu_io(dir: &Path, args: &[String]) -> Output {
    run(peer("qemu-io").current_dir(dir).args(args))
}

fn basalt_img(dir: &Path, args: &[&str]) -> Output {
    run(Command::new(tool("basalt-img")).current_dir(dir).args(args))
}

fn basalt_io(dir: &Path, args: &[String]) -> Output {
    run(Command::new(tool("basalt-io")).current_dir(dir).args(args))
}

/// Run a Basalt tool under `timeout`, so that a hang fails the test instead of stalling it.
fn basalt_timed(dir: &Path, name: &str, args: &[&str]) -> Output {
    run(Command::new("timeout").current_dir(dir).arg("20").arg(tool(name)).args(args))
}

/// What a run printed and returned, with the program name normalised.
#[derive(Debug, PartialEq)]
struct Outcome {
    code: Option<i32>,
    out: String,
    err: String,
}

fn outcome(o: &Output) -> Outcome {
    let n = |s: String| s.replace("qemu-img", "basalt-img");
    Outcome { code: o.status.code(), out: n(stdout(o)), err: n(stderr(o)) }
}

/// Run the same qemu-img command through both tools on the same files; they must agree.
fn same_output(dir: &Path, args: &[&str]) {
    let q = outcome(&qemu_img(dir, args));
    let b = outcome(&basalt_img(dir, args));
    assert_eq!(b, q, "basalt-img {args:?} differs from qemu-img");
}

/// `qemu-img check` finds `img` clean.
fn qemu_check_clean(dir: &Path, img: &str) {
    let o = qemu_img(dir, &["check", img]);
    assert!(
        o.status.code() == Some(0) && stdout(&o).contains("No errors were found on the image."),
        "qemu-img check {img} ({:?}):\n{}{}",
        o.status.code(),
        stdout(&o),
        stderr(&o)
    );
}

/// `qemu-img compare` finds `a` and `b` identical.
fn qemu_identical(dir: &Path, a: &str, b: &str) {
    let o = qemu_img(dir, &["compare", a, b]);
    assert!(o.status.code() == Some(0), "qemu-img compare {a} {b} ({:?}): {}{}", o.status.code(), stdout(&o), stderr(&o));
}

fn json_map(dir: &Path, img: &str) -> String {
    let o = qemu_img(dir, &["map", "--output=json", img]);
    must(&o, &format!("qemu-img map {img}"));
    stdout(&o)
}

// ---------------------------------------------------------------------------------------------
// Workloads.

/// One qemu-io command.
#[derive(Clone, Copy, Debug)]
enum Op {
    Write { off: u64, len: u64, pat: u8 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Compressed { off: u64, len: u64, pat: u8 },
}

impl Op {
    fn cmd(&self) -> String {
        match *self {
            Op::Write { off, len, pat } => format!("write -q -P {pat:#x} {off} {len}"),
            Op::Zero { off, len, unmap } => format!("write -q -z{} {off} {len}", if unmap { " -u" } else { "" }),
            Op::Discard { off, len } => format!("discard -q {off} {len}"),
            Op::Compressed { off, len, pat } => format!("write -q -c -P {pat:#x} {off} {len}"),
        }
    }

    fn range(&self) -> (u64, u64) {
        match *self {
            Op::Write { off, len, .. }
            | Op::Zero { off, len, .. }
            | Op::Discard { off, len }
            | Op::Compressed { off, len, .. } => (off, off + len),
        }
    }
}

/// `-c CMD` arguments for a list of operations.
fn cmd_args(ops: &[Op]) -> Vec<String> {
    ops.iter().flat_map(|o| ["-c".to_string(), o.cmd()]).collect()
}

/// An image configuration: `qemu-img create -o` options and what they make.
#[derive(Clone, Copy, Debug)]
struct Cfg {
    opts: &'static str,
    cs: u64,
    extended_l2: bool,
    size: u64,
}

const MIB: u64 = 1 << 20;

const fn cfg(opts: &'static str, cs: u64, extended_l2: bool, size: u64) -> Cfg {
    Cfg { opts, cs, extended_l2, size }
}

/// The option matrix.
const MATRIX: &[Cfg] = &[
    cfg("", 65536, false, 1100 * MIB),
    cfg("compat=0.10", 65536, false, 1100 * MIB),
    cfg("cluster_size=512,refcount_bits=1", 512, false, 64 * MIB),
    cfg("compat=0.10,cluster_size=512", 512, false, 64 * MIB),
    cfg("cluster_size=4k,refcount_bits=8", 4096, false, 64 * MIB),
    cfg("cluster_size=2M,refcount_bits=64", 2 * MIB, false, 256 * MIB),
    cfg("extended_l2=on", 65536, true, 1100 * MIB),
    cfg("extended_l2=on,cluster_size=16k,refcount_bits=32", 16384, true, 600 * MIB),
    cfg("compression_type=zstd,cluster_size=8k", 8192, false, 64 * MIB),
];

impl Cfg {
    fn create_args<'a>(&'a self, name: &'a str, size: &'a str) -> Vec<&'a str> {
        let mut v = vec!["create", "-q", "-f", "qcow2"];
        if !self.opts.is_empty() {
            v.extend(["-o", self.opts]);
        }
        v.extend([name, size]);
        v
    }

    /// Guest bytes one L2 table maps.
    fn l2_cover(&self) -> u64 {
        self.cs * (self.cs / if self.extended_l2 { 16 } else { 8 })
    }
}

/// A deterministic workload for `c`: data at odd offsets and lengths, across cluster and L2
/// boundaries, zeroes over data (aligned and not, with and without unmap), discards (whole
/// clusters and partial ones), compressed clusters partly overwritten, the image's last bytes.
/// `k` shifts offsets and patterns so that layers of a chain differ.
///
/// With `frees_last`, no unaligned zero write over unallocated clusters, and nothing freed
/// before the last allocation (so allocations never reuse freed clusters); without it, both
/// happen. Basalt and QEMU lay out either the same.
fn workload(c: &Cfg, k: u64, compressed: bool, frees_last: bool) -> Vec<Op> {
    let cs = c.cs;
    let base = k * 3 * cs;
    let p = |i: u64| (0x10 * (k + 1) + i) as u8;
    let mut ops = vec![
        Op::Write { off: base, len: cs / 2 + 3, pat: p(1) },
        Op::Write { off: base + cs - 100, len: 300, pat: p(2) },
        Op::Write { off: base + 2 * cs + 512, len: 2 * cs + 1000, pat: p(3) },
        Op::Zero { off: base + 12 * cs, len: cs, unmap: false },
        Op::Write { off: base + 14 * cs, len: 3 * cs, pat: p(4) },
        Op::Zero { off: base + 14 * cs + 700, len: cs, unmap: true },
        Op::Zero { off: base + 16 * cs, len: cs, unmap: true },
        Op::Write { off: base + 20 * cs, len: 4 * cs, pat: p(5) },
        Op::Discard { off: base + 21 * cs, len: 2 * cs },
        Op::Discard { off: base + 2 * cs + 100, len: cs },
        Op::Write { off: base + 40 * cs + 1, len: 7, pat: p(6) },
        Op::Write { off: c.size - 700, len: 700, pat: p(7) },
    ];
    if !frees_last {
        ops.push(Op::Zero { off: base + 30 * cs + 5, len: 3 * cs + 5, unmap: false });
    }
    if compressed {
        ops.push(Op::Compressed { off: base + 50 * cs, len: 2 * cs, pat: p(8) });
        ops.push(Op::Write { off: base + 50 * cs + 10, len: 20, pat: p(9) });
        ops.push(Op::Compressed { off: base + 60 * cs, len: cs, pat: p(10) });
        ops.push(Op::Discard { off: base + 60 * cs, len: cs });
    }
    let l2 = c.l2_cover();
    if l2 + 4 * cs < c.size - 1000 {
        ops.push(Op::Write { off: l2 - 1000 + k * cs, len: 3000, pat: p(11) });
        ops.push(Op::Zero { off: l2 - cs + k * cs, len: 2 * cs, unmap: true });
        ops.push(Op::Write { off: l2 + 2 * cs + k * cs, len: 2 * cs, pat: p(12) });
    }
    if frees_last {
        // Frees last: a stable partition keeps each group in order.
        let frees = |o: &Op| matches!(o, Op::Discard { .. } | Op::Zero { unmap: true, .. });
        let (mut keep, tail): (Vec<Op>, Vec<Op>) = ops.into_iter().partition(|o| !frees(o));
        keep.extend(tail);
        ops = keep;
    }
    ops
}

/// `read -q -P` commands checking every range touched by `ops` (and a margin around each)
/// against `reference`, a raw file holding what QEMU reads from the image. The ranges between
/// the operations' boundaries each hold one byte value.
fn read_checks(ops: &[Op], reference: &Path, size: u64) -> Vec<String> {
    let f = std::fs::File::open(reference).expect("open reference");
    let mut cuts: BTreeSet<u64> = BTreeSet::new();
    let mut windows = Vec::new();
    for o in ops {
        let (s, e) = o.range();
        cuts.insert(s);
        cuts.insert(e.min(size));
        windows.push((s.saturating_sub(4096), (e + 4096).min(size)));
    }
    for &(s, e) in &windows {
        cuts.insert(s);
        cuts.insert(e);
    }
    let inside = |a: u64, b: u64| windows.iter().any(|&(s, e)| a >= s && b <= e);
    let cuts: Vec<u64> = cuts.into_iter().collect();
    let mut args = Vec::new();
    for w in cuts.windows(2) {
        let (a, b) = (w[0], w[1]);
        if a >= b || !inside(a, b) {
            continue;
        }
        let mut buf = vec![0u8; (b - a) as usize];
        f.read_exact_at(&mut buf, a).expect("read reference");
        let v = buf[0];
        assert!(buf.iter().all(|&x| x == v), "reference {a}..{b} is not one value: the workload generator is wrong");
        args.push("-c".to_string());
        args.push(format!("read -q -P {v:#x} {a} {}", b - a));
    }
    args
}

/// Check an image QEMU wrote: basalt-io reads every touched range as QEMU does, basalt-img
/// compare agrees with qemu-img compare against QEMU's raw copy, info and map print the same.
fn check_qemu_image(dir: &Path, img: &str, ops: &[Op], size: u64, exact_map: bool) {
    let reference = format!("{img}.ref.raw");
    must(&qemu_img(dir, &["convert", "-O", "raw", img, &reference]), "qemu-img convert");
    let mut args = vec!["-r".to_string(), "-f".to_string(), "qcow2".to_string()];
    args.extend(read_checks(ops, &dir.join(&reference), size));
    args.push(img.to_string());
    let q = qemu_io(dir, &args);
    assert!(q.status.success() && stdout(&q).is_empty(), "qemu-io checks of {img}: {}{}", stdout(&q), stderr(&q));
    let b = basalt_io(dir, &args);
    assert!(
        b.status.success() && stdout(&b).is_empty() && stderr(&b).is_empty(),
        "basalt-io reads {img} differently from QEMU:\n{}{}",
        stdout(&b),
        stderr(&b)
    );
    same_output(dir, &["compare", "-f", "qcow2", "-F", "raw", img, &reference]);
    same_output(dir, &["compare", img, &reference]);
    std::fs::remove_file(dir.join(&reference)).expect("remove reference");
    same_info_map(dir, img, exact_map);
}

/// info, map and check of the same file, every output form. `exact_map` is false for images with
/// extended L2 entries, whose JSON map still differs (see
/// `extended_l2_map_offsets_match_qemu`); their human map is compared.
fn same_info_map(dir: &Path, img: &str, exact_map: bool) {
    for args in [
        &["info", img][..],
        &["info", "--output=json", img],
        &["info", "--backing-chain", img],
        &["info", "--backing-chain", "--output=json", img],
        &["info", "-f", "qcow2", "-U", img],
        &["map", img],
        &["check", img],
        &["check", "--output=json", img],
    ] {
        same_output(dir, args);
    }
    if exact_map {
        same_output(dir, &["map", "--output=json", img]);
        same_output(dir, &["map", "--output=json", "-s", "1000", "-l", "5000000", img]);
    }
}

// ---------------------------------------------------------------------------------------------
// (a) + (c): images QEMU makes and writes.

fn qemu_made(cfgs: &[Cfg]) {
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path();
    for (i, c) in cfgs.iter().enumerate() {
        let img = format!("q{i}.qcow2");
        let size = c.size.to_string();
        must(&qemu_img(dir, &c.create_args(&img, &size)), &format!("qemu-img create {c:?}"));
        let ops = workload(c, 0, true, false);
        let mut args = cmd_args(&ops);
        args.push(img.clone());
        must(&qemu_io(dir, &args), &format!("qemu-io on {c:?}"));
        check_qemu_image(dir, &img, &ops, c.size, true);
        std::fs::remove_file(dir.join(&img)).expect("remove");
    }
}

#[test]
fn qemu_made_images_read_as_qemu_reads_them_1() {
    qemu_made(&MATRIX[..5]);
}

#[test]
fn qemu_made_images_read_as_qemu_reads_them_2() {
    qemu_made(&MATRIX[5..]);
}

/// A chain of depth 3 with different configurations per layer: each layer is written, then
/// the top is read through the chain.
#[test]
fn qemu_made_backing_chain_of_three() {
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path();
    let layers = [
        ("base.qcow2", cfg("compat=0.10", 65536, false, 64 * MIB)),
        ("mid.qcow2", cfg("cluster_size=4k", 4096, false, 64 * MIB)),
        ("top.qcow2", cfg("extended_l2=on,cluster_size=32k", 32768, true, 80 * MIB)),
    ];
    let mut all = Vec::new();
    for (k, (name, c)) in layers.iter().enumerate() {
        let size = c.size.to_string();
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", c.opts];
        if k > 0 {
            args.extend(["-b", layers[k - 1].0, "-F", "qcow2"]);
        }
        args.extend([*name, size.as_str()]);
        must(&qemu_img(dir, &args), &format!("create {name}"));
        let ops = workload(c, k as u64, k != 1, false);
        let mut io = cmd_args(&ops);
        io.push(name.to_string());
        must(&qemu_io(dir, &io), &format!("qemu-io {name}"));
        all.extend(ops);
    }
    // The top is larger than its backing files: its tail reads as zeroes nobody stores.
    check_qemu_image(dir, "top.qcow2", &all, 80 * MIB, false);
    let low: Vec<Op> = all.iter().copied().filter(|o| o.range().1 <= 64 * MIB).collect();
    check_qemu_image(dir, "mid.qcow2", &low, 64 * MIB, true);
    // Same checks with the image given by an absolute name and through json: (backing file
    // names are resolved against the overlay's directory).
    let abs = dir.join("mid.qcow2").to_string_lossy().into_owned();
    same_info_map(dir, &abs, true);
    let j = format!("json:{{\"driver\":\"qcow2\",\"file\":{{\"driver\":\"file\",\"filename\":\"{abs}\"}}}}");
    same_output(dir, &["info", "--backing-chain", &j]);
    same_output(dir, &["map", "--output=json", &j]);
    // basalt-img compare between layers answers as qemu-img compare.
    for (a, b) in [("top.qcow2", "mid.qcow2"), ("mid.qcow2", "base.qcow2"), ("base.qcow2", "base.qcow2")] {
        same_output(dir, &["compare", a, b]);
        same_output(dir, &["compare", "-s", a, b]);
    }
}

// ---------------------------------------------------------------------------------------------
// (b): images Basalt makes and writes.

/// `basalt-img create` prints what qemu-img prints and, for cluster sizes above 4 KiB, makes
/// the same bytes.
#[test]
fn create_matches_qemu_img() {
    let q = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    for c in MATRIX {
        let size = c.size.to_string();
        let mut args = c.create_args("n.qcow2", &size);
        args.retain(|a| *a != "-q");
        let qo = outcome(&qemu_img(q.path(), &args));
        let bo = outcome(&basalt_img(b.path(), &args));
        assert_eq!(bo, qo, "basalt-img {args:?}");
        if c.cs > 4096 {
            let (qf, bf) = (std::fs::read(q.path().join("n.qcow2")), std::fs::read(b.path().join("n.qcow2")));
            assert!(qf.expect("qemu image") == bf.expect("basalt image"), "create {c:?}: the images differ");
        }
    }
    // Backing files: size from the backing file, errors as qemu-img's.
    for dir in [q.path(), b.path()] {
        must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "5M"]), "create base");
        std::fs::create_dir(dir.join("sub")).expect("mkdir");
        must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "sub/base.qcow2", "7M"]), "create sub/base");
    }
    for args in [
        "create -f qcow2 -b base.qcow2 -F qcow2 o.qcow2",
        "create -f qcow2 -b base.qcow2 -F qcow2 -o compat=0.10 o.qcow2 9M",
        "create -f qcow2 -b base.qcow2 -F raw o.qcow2",
        "create -f qcow2 -b base.qcow2 -F qcow2 sub/o.qcow2",
        "create -f qcow2 -b base.qcow2 o.qcow2",
        "create -f qcow2 -u -b nothere.qcow2 -F qcow2 o.qcow2 1M",
        "create -f qcow2 -u -b nothere.qcow2 -F qcow2 o.qcow2",
        "create -f qcow2 -u -b nothere.qcow2 o.qcow2 1M",
        "create -f qcow2 -b nothere.qcow2 -F qcow2 o.qcow2 1M",
        "create -f qcow2 -b o.qcow2 -F qcow2 o.qcow2 1M",
        "create -f qcow2 -o backing_file=base.qcow2,backing_fmt=qcow2,cluster_size=8k o.qcow2",
        "create -f qcow2 -o compat=0.10,refcount_bits=8 o.qcow2 1M",
        "create -f qcow2 -o lazy_refcounts=on o.qcow2 1M",
        "create -f qcow2 -o compat=0.10,lazy_refcounts=on o.qcow2 1M",
        "create -f qcow2 -o compat=0.10,extended_l2=on o.qcow2 1M",
        "create -f qcow2 -o extended_l2=on,cluster_size=8k o.qcow2 1M",
        "create -f qcow2 -o cluster_size=1000 o.qcow2 1M",
        "create -f qcow2 -o refcount_bits=0x10,cluster_size=0x2000,lazy_refcounts=no,extended_l2=false o.qcow2 1M",
        "create -f qcow2 -o help",
        "create -f qcow2 -o help o.qcow2",
        "create -f qcow2 -o ? o.qcow2",
    ] {
        let a: Vec<&str> = args.split_whitespace().collect();
        for f in ["o.qcow2", "sub/o.qcow2"] {
            let _ = std::fs::remove_file(q.path().join(f));
            let _ = std::fs::remove_file(b.path().join(f));
        }
        let qo = outcome(&qemu_img(q.path(), &a));
        let bo = outcome(&basalt_img(b.path(), &a));
        assert_eq!(bo, qo, "basalt-img {args}");
        for f in ["o.qcow2", "sub/o.qcow2"] {
            let (qf, bf) = (std::fs::read(q.path().join(f)).ok(), std::fs::read(b.path().join(f)).ok());
            assert!(qf == bf, "basalt-img {args}: {f} differs from qemu-img's");
        }
    }
    // Encryption is tested in qcow2_encrypt.rs, external data files in qcow2_datafile.rs.
}

/// Apply `ops` with basalt-io to `b` and with qemu-io to `q` (same directory).
fn write_both(dir: &Path, b: &str, q: &str, ops: &[Op]) {
    for (img, basalt) in [(b, true), (q, false)] {
        let mut args = vec!["-f".to_string(), "qcow2".to_string()];
        args.extend(cmd_args(ops));
        args.push(img.to_string());
        let o = if basalt { basalt_io(dir, &args) } else { qemu_io(dir, &args) };
        assert!(
            o.status.success() && stdout(&o).is_empty(),
            "{} on {img}: {}{}",
            if basalt { "basalt-io" } else { "qemu-io" },
            stdout(&o),
            stderr(&o)
        );
    }
}

fn basalt_made(cfgs: &[Cfg]) {
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path();
    for (i, c) in cfgs.iter().enumerate() {
        for frees_last in [false, true] {
            let (b, q) = (format!("b{i}.qcow2"), format!("q{i}.qcow2"));
            let size = c.size.to_string();
            must(&basalt_img(dir, &c.create_args(&b, &size)), &format!("basalt-img create {c:?}"));
            must(&qemu_img(dir, &c.create_args(&q, &size)), &format!("qemu-img create {c:?}"));
            // Compressed writes with 1-bit refcounts: see compressed_writes_with_1_bit_refcounts_start_new_host_clusters.
            let compressed = !c.opts.contains("refcount_bits=1");
            write_both(dir, &b, &q, &workload(c, 0, compressed, frees_last));
            qemu_check_clean(dir, &b);
            qemu_identical(dir, &b, &q);
            // The same layout: clusters in the same places, zeroes and holes alike, as qemu-img
            // map reports them (its view of data over file holes depends on how much of the
            // file is allocated, so the files are allocated alike too).
            assert_eq!(
                json_map(dir, &b),
                json_map(dir, &q),
                "{c:?} (frees_last {frees_last}): basalt allocates differently from QEMU"
            );
            same_info_map(dir, &b, true);
            for f in [b, q] {
                std::fs::remove_file(dir.join(f)).expect("remove");
            }
        }
    }
}

#[test]
fn basalt_made_images_are_clean_and_match_qemu_1() {
    basalt_made(&MATRIX[..5]);
}

#[test]
fn basalt_made_images_are_clean_and_match_qemu_2() {
    basalt_made(&MATRIX[5..]);
}

/// Overlays Basalt makes on a chain, written by Basalt (copy-on-write from the backing file).
#[test]
fn basalt_made_backing_chain_of_three() {
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path();
    let layers = [
        ("base", cfg("compat=0.10", 65536, false, 64 * MIB)),
        ("mid", cfg("cluster_size=8k", 8192, false, 64 * MIB)),
        ("top", cfg("extended_l2=on,cluster_size=32k", 32768, true, 80 * MIB)),
    ];
    for (k, (name, c)) in layers.iter().enumerate() {
        let size = c.size.to_string();
        for t in ["b", "q"] {
            let img = format!("{t}{name}.qcow2");
            let back = if k > 0 { format!("{t}{}.qcow2", layers[k - 1].0) } else { String::new() };
            let mut args = vec!["create", "-q", "-f", "qcow2", "-o", c.opts];
            if k > 0 {
                args.extend(["-b", back.as_str(), "-F", "qcow2"]);
            }
            args.extend([img.as_str(), size.as_str()]);
            let o = if t == "b" { basalt_img(dir, &args) } else { qemu_img(dir, &args) };
            must(&o, &format!("create {img}"));
        }
        write_both(dir, &format!("b{name}.qcow2"), &format!("q{name}.qcow2"), &workload(c, k as u64, k != 1, true));
    }
    for (name, c) in layers {
        let (b, q) = (format!("b{name}.qcow2"), format!("q{name}.qcow2"));
        qemu_check_clean(dir, &b);
        qemu_identical(dir, &b, &q);
        if !c.extended_l2 {
            assert_eq!(json_map(dir, &b), json_map(dir, &q), "{name}: maps differ");
        }
        same_info_map(dir, &b, true);
    }
}

// ---------------------------------------------------------------------------------------------
// (d): seeded random sequences.

fn random_op(r: &mut Rng, c: &Cfg) -> Op {
    let cs = c.cs;
    // Mostly small requests around cluster boundaries, some long ones, some aligned.
    let len = match r.below(4) {
        0 => 1 + r.below(600),
        1 => 1 + r.below(4 * cs),
        2 => cs * (1 + r.below(6)),
        _ => 1 + r.below(16 * cs).min(1 << 20),
    };
    let mut off = r.below(c.size - len);
    if r.below(3) == 0 {
        off -= off % cs;
    }
    // No compressed writes: QEMU refuses them over allocated clusters (EIO), which a random
    // sequence cannot avoid.
    match r.below(10) {
        0..=5 => Op::Write { off, len, pat: 1 + r.below(255) as u8 },
        6 | 7 => Op::Zero { off, len, unmap: r.below(2) == 0 },
        _ => Op::Discard { off, len },
    }
}

fn random_sequences(cfg: Cfg, seed: u64, batches: usize, per_batch: usize) {
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path();
    let size = cfg.size.to_string();
    must(&basalt_img(dir, &cfg.create_args("b.qcow2", &size)), "basalt-img create");
    must(&qemu_img(dir, &cfg.create_args("q.qcow2", &size)), "qemu-img create");
    let mut r = Rng(seed);
    for batch in 0..batches {
        let ops: Vec<Op> = (0..per_batch).map(|_| random_op(&mut r, &cfg)).collect();
        write_both(dir, "b.qcow2", "q.qcow2", &ops);
        let o = qemu_img(dir, &["check", "b.qcow2"]);
        assert!(
            o.status.code() == Some(0) && stdout(&o).contains("No errors were found on the image."),
            "{cfg:?} seed {seed} batch {batch}: qemu-img check:\n{}{}\nops: {ops:#?}",
            stdout(&o),
            stderr(&o)
        );
        let o = qemu_img(dir, &["compare", "b.qcow2", "q.qcow2"]);
        assert!(o.status.code() == Some(0), "{cfg:?} seed {seed} batch {batch}: {}{}\nops: {ops:#?}", stdout(&o), stderr(&o));
    }
}

#[test]
fn random_512_byte_clusters_refcount_table_grows() {
    // 64-bit refcounts in 512-byte clusters: a refcount block covers 64 clusters and the
    // one-cluster refcount table 2 MiB of file, so the table must grow.
    random_sequences(cfg("cluster_size=512,refcount_bits=64", 512, false, 6 * MIB), 0x5eed_0001, 6, 60);
}

#[test]
fn random_4k_clusters() {
    random_sequences(cfg("cluster_size=4k", 4096, false, 32 * MIB), 0x5eed_0002, 5, 60);
}

#[test]
fn random_extended_l2_and_v2() {
    random_sequences(cfg("extended_l2=on,cluster_size=16k", 16384, true, 64 * MIB), 0x5eed_0003, 4, 50);
    random_sequences(cfg("compat=0.10,cluster_size=1k", 1024, false, 8 * MIB), 0x5eed_0004, 4, 50);
}

/// `basalt-img check` prints what qemu-img check prints and exits as it does: clean images,
/// leaked clusters, refcount errors, repairs; raw images have no checks (63).
#[test]
fn check_matches_qemu_img() {
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path();
    must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "good.qcow2", "4M"]), "create");
    let io = ["-c", "write -q -P 1 0 128k", "-c", "write -q -c -P 2 1M 64k", "-c", "write -q -z 2M 64k", "good.qcow2"];
    must(&qemu_io(dir, &io.map(String::from)), "qemu-io");
    must(&qemu_img(dir, &["create", "-q", "-f", "raw", "r.raw", "1M"]), "create raw");
    let h = std::fs::read(dir.join("good.qcow2")).expect("read");
    let rb = read_u64(&h, read_u64(&h, 48) as usize);
    // Refcount of the L1 table's cluster (3) raised: a leak. The file grown by two clusters
    // with a refcount on the first: a leak past the end of the used clusters.
    patched(dir, "good.qcow2", "leak.qcow2", &[(rb + 6, vec![0, 2])]);
    let n = (h.len() as u64).div_ceil(65536);
    patched(dir, "good.qcow2", "leak2.qcow2", &[(rb + 2 * n, vec![0, 1]), (n * 65536 + 65535, vec![0])]);
    for args in [
        &["check", "good.qcow2"][..],
        &["check", "--output=json", "good.qcow2"],
        &["check", "-q", "good.qcow2"],
        &["check", "-f", "qcow2", "-U", "good.qcow2"],
        &["check", "r.raw"],
        &["check", "--output=json", "r.raw"],
        &["check", "leak.qcow2"],
        &["check", "--output=json", "leak2.qcow2"],
    ] {
        same_output(dir, args);
    }
    // Repairs: what is printed on stdout and the exit code agree, and both images end clean
    // and identical (the driver's own messages on stderr are worded differently, see
    // known_bug_check_messages).
    for r in ["leaks", "all"] {
        for o in ["human", "json"] {
            for img in ["leak.qcow2", "leak2.qcow2"] {
                patched(dir, img, "q.qcow2", &[]);
                patched(dir, img, "b.qcow2", &[]);
                let out = format!("--output={o}");
                let q = outcome(&qemu_img(dir, &["check", "-r", r, &out, "q.qcow2"]));
                let b = outcome(&basalt_img(dir, &["check", "-r", r, &out, "b.qcow2"]));
                assert_eq!((b.code, b.out.replace("b.qcow2", "q.qcow2")), (q.code, q.out), "check -r {r} {out} {img}");
                qemu_check_clean(dir, "b.qcow2");
                qemu_identical(dir, "b.qcow2", "q.qcow2");
            }
        }
    }
}

/// `basalt-io write -c` writes compressed clusters as qemu-io does, with its errors.
#[test]
fn compressed_writes_match_qemu_io() {
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path();
    for img in ["b.qcow2", "q.qcow2"] {
        must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, "1000k"]), "create");
    }
    for cmd in [
        "write -c 0 4k",
        "write -c -P 3 8k 12k",
        "write -c 512 4k",
        "write -c 16k 1000",
        "write -c 16k 1024",
        "write -c 996k 4k",
        "write -c 998k 2k",
        "write -c 1000k 4k",
        "write -c -z 32k 4k",
        "write -c -f 0 4k",
        "write -c -P 7 20k 4k",
        "write -P 9 20k 1k",
    ] {
        let args: Vec<String> = vec!["-c".into(), cmd.into()];
        let strip = |o: &Output| stdout(o).lines().filter(|l| !l.contains("ops;")).collect::<Vec<_>>().join("\n");
        let q = qemu_io(dir, &[args.clone(), vec!["q.qcow2".into()]].concat());
        let b = basalt_io(dir, &[args, vec!["b.qcow2".into()]].concat());
        assert_eq!((b.status.code(), strip(&b)), (q.status.code(), strip(&q)), "{cmd}");
    }
    qemu_check_clean(dir, "b.qcow2");
    qemu_identical(dir, "b.qcow2", "q.qcow2");
    assert_eq!(json_map(dir, "b.qcow2"), json_map(dir, "q.qcow2"));
    // raw has no compressed writes: qemu-io's answer.
    must(&qemu_img(dir, &["create", "-q", "-f", "raw", "r.raw", "1M"]), "create raw");
    let args: Vec<String> = ["-f", "raw", "-c", "write -c 0 64k", "r.raw"].map(String::from).to_vec();
    let (q, b) = (qemu_io(dir, &args), basalt_io(dir, &args));
    assert_eq!((b.status.code(), stdout(&b)), (q.status.code(), stdout(&q)));
}

// ---------------------------------------------------------------------------------------------
// (e): malformed images.

fn be32(v: u32) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

fn be64(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A corrupted copy of an image: its name, the bytes patched in (offset, bytes), and what the
/// error must mention.
type BadImage = (&'static str, Vec<(u64, Vec<u8>)>, &'static str);

/// The L1 table's offset and the first L2 table's offset of an image's bytes.
fn l1_l2(h: &[u8]) -> (u64, u64) {
    let l1 = read_u64(h, 40);
    (l1, read_u64(h, l1 as usize) & 0x00ff_ffff_ffff_fe00)
}

fn patched(dir: &Path, from: &str, to: &str, edits: &[(u64, Vec<u8>)]) {
    std::fs::copy(dir.join(from), dir.join(to)).expect("copy");
    let f = std::fs::OpenOptions::new().write(true).open(dir.join(to)).expect("open");
    for (off, data) in edits {
        f.write_all_at(data, *off).expect("patch");
    }
}

/// A Basalt command on a bad image fails with an error naming the problem: no panic, no hang.
fn fails_clearly(dir: &Path, name: &str, args: &[&str], needle: &str) {
    let o = basalt_timed(dir, name, args);
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert!(o.status.code() != Some(124), "{name} {args:?} hangs");
    assert!(!all.contains("panicked"), "{name} {args:?} panics: {all}");
    assert!(o.status.code().is_some_and(|c| c != 0), "{name} {args:?} succeeds on a bad image: {all}");
    assert!(all.to_lowercase().contains(&needle.to_lowercase()), "{name} {args:?}: expected '{needle}' in: {all}");
}

#[test]
fn malformed_images_fail_clearly() {
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path();
    must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "good.qcow2", "4M"]), "create");
    // Data that compresses to several sectors, so a compressed length can lie.
    let data: Vec<u8> = {
        let mut r = Rng(7);
        (0..65536).map(|_| b'a' + (r.below(16) as u8)).collect()
    };
    std::fs::write(dir.join("data.bin"), &data).expect("write");
    let io = ["-c", "write -q -P 1 0 128k", "-c", "write -q -c -s data.bin 1M 64k", "good.qcow2"].map(String::from);
    must(&qemu_io(dir, &io), "qemu-io");
    let h = std::fs::read(dir.join("good.qcow2")).expect("read");
    let (l1, l2) = l1_l2(&h);
    let centry_at = l2 + 16 * 8;
    let centry = read_u64(&h, centry_at as usize);
    assert!(centry & (1 << 62) != 0, "cluster 16 is compressed");
    // 64 KiB clusters: 54 bits of offset, 8 bits of additional 512-byte sectors.
    let (x, mask) = (54u32, (1u64 << 54) - 1);
    let nsec = (centry >> x) & 0xff;
    assert!(nsec > 0, "the compressed cluster takes more than one sector");

    let cases: Vec<BadImage> = vec![
        ("huge_l1.qcow2", vec![(36, be32(0x7fff_ffff))], "L1 table too large"),
        ("l1_eof.qcow2", vec![(40, be64(1 << 40))], "L1 table offset"),
        ("l1_unaligned.qcow2", vec![(40, be64(l1 + 8))], "L1 table offset"),
        ("rc_order7.qcow2", vec![(96, be32(7))], "Reference count entry width too large"),
        ("incompat.qcow2", vec![(72, be64(1 << 20))], "Unknown incompatible feature"),
        ("backing_long.qcow2", vec![(8, be64(0x200)), (16, be32(2000))], "Backing file name too long"),
        ("cluster_bits.qcow2", vec![(20, be32(30))], "cluster size"),
        ("version.qcow2", vec![(4, be32(4))], "version 4"),
        ("rt_eof.qcow2", vec![(48, be64(1 << 40))], "Reference count table"),
        ("rt_huge.qcow2", vec![(56, be32(0x7fff_ffff))], "Reference count table too large"),
        ("size_huge.qcow2", vec![(24, be64(1 << 62))], "L1 table"),
    ];
    for (name, edits, needle) in &cases {
        patched(dir, "good.qcow2", name, edits);
        fails_clearly(dir, "basalt-img", &["info", name], needle);
        fails_clearly(dir, "basalt-img", &["map", "--output=json", name], needle);
        fails_clearly(dir, "basalt-io", &["-r", "-c", "read 0 4M", name], needle);
    }

    // Bad L2 and compressed-cluster entries are found when read: the read fails (a bad
    // compressed cluster is named; a bad L2 offset is not yet, see
    // `bad_l2_table_offsets_are_named_and_mark_the_image_corrupt`), read-only and read-write, and convert stops.
    let data_cases: Vec<BadImage> = vec![
        ("l2_unaligned.qcow2", vec![(l1, be64((l2 + 512) | (1 << 63)))], "read failed"),
        ("l2_eof.qcow2", vec![(l1, be64((1 << 40) | (1 << 63)))], "read failed"),
        // The compressed length lies: the stream is cut short.
        ("clen.qcow2", vec![(centry_at, be64(centry & !(0xff << x)))], "decompress"),
        ("coff.qcow2", vec![(centry_at, be64((centry & !mask) | (1 << 39)))], "decompress"),
    ];
    for (name, edits, needle) in &data_cases {
        patched(dir, "good.qcow2", name, edits);
        fails_clearly(dir, "basalt-io", &["-r", "-c", "read 0 4M", name], needle);
        fails_clearly(dir, "basalt-img", &["convert", "-O", "raw", name, "out.raw"], "error");
        fails_clearly(dir, "basalt-io", &["-c", "read 0 4M", name], needle);
    }

    // A backing chain a -> b -> a.
    must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "lb.qcow2", "1M"]), "create lb");
    must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "-b", "lb.qcow2", "-F", "qcow2", "la.qcow2"]), "create la");
    must(&qemu_img(dir, &["rebase", "-u", "-b", "la.qcow2", "-F", "qcow2", "lb.qcow2"]), "rebase lb");
    fails_clearly(
        dir,
        "basalt-img",
        &["info", "--backing-chain", "la.qcow2"],
        "Backing file 'la.qcow2' creates an infinite loop.",
    );
    same_output(dir, &["info", "--backing-chain", "la.qcow2"]);
    same_output(dir, &["info", "la.qcow2"]);
    fails_clearly(dir, "basalt-io", &["-r", "-c", "read 0 4k", "la.qcow2"], "loop");
    fails_clearly(dir, "basalt-img", &["map", "la.qcow2"], "loop");
    fails_clearly(dir, "basalt-img", &["compare", "la.qcow2", "lb.qcow2"], "loop");

    // Not qcow2 at all once the header is cut short.
    std::fs::write(dir.join("short.qcow2"), &h[..50]).expect("write");
    fails_clearly(dir, "basalt-img", &["info", "-f", "qcow2", "short.qcow2"], "qcow2");
}

// ---------------------------------------------------------------------------------------------
/// Allocated clusters whose bytes in the file are holes: QEMU reports them as plain data,
/// except in an image that looks metadata-preallocated (refcounts claiming clearly more
/// clusters than the file holds), where it asks the file and reports zeroes. basalt-img's map
/// and info match for every preallocation mode, for images made by either tool.
#[test]
fn file_holes_under_allocated_clusters_map_as_qemu_maps_them() {
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path();
    let mut maps = Vec::new();
    for prealloc in ["off", "metadata", "falloc", "full"] {
        for maker in ["qemu", "basalt"] {
            let img = format!("{prealloc}-{maker}.qcow2");
            let opt = format!("preallocation={prealloc}");
            let create = ["create", "-q", "-f", "qcow2", "-o", &opt, &img, "8M"];
            // 4 MiB of data keep the holes small next to what the file holds, so that an image
            // without preallocation does not look metadata-preallocated once they are punched.
            let io = [
                "-c",
                "write -q -P 1 0 4k",
                "-c",
                "write -q -P 2 1M 12k",
                "-c",
                "write -q -z 3M 64k",
                "-c",
                "write -q -P 3 4M 4M",
                &img,
            ]
            .map(String::from);
            if maker == "qemu" {
                must(&qemu_img(dir, &create), "qemu-img create");
                must(&qemu_io(dir, &io), "qemu-io");
            } else {
                must(&basalt_img(dir, &create), "basalt-img create");
                must(&basalt_io(dir, &io), "basalt-io");
            }
            // The unwritten tails of both written clusters become holes in the file.
            let map: serde_json::Value = serde_json::from_str(&json_map(dir, &img)).expect("map JSON");
            let host = |guest: u64| {
                let at = |e: &serde_json::Value, k: &str| e[k].as_u64().expect("map field");
                let mut es = map.as_array().expect("map array").iter();
                let e = es.find(|e| at(e, "start") <= guest && guest < at(e, "start") + at(e, "length")).expect("extent");
                at(e, "offset") + guest - at(e, "start")
            };
            punch_hole(&dir.join(&img), host(8192), 65536 - 8192);
            punch_hole(&dir.join(&img), host((1 << 20) + 16384), 65536 - 16384);
            same_output(dir, &["map", "--output=json", &img]);
            same_output(dir, &["map", &img]);
            same_output(dir, &["info", "--output=json", &img]);
            maps.push((prealloc, json_map(dir, &img)));
        }
    }
    // The test tells the cases apart: the holes read as zeroes only where the image looks
    // metadata-preallocated.
    let zero_data = |m: &str| m.contains("\"zero\": true, \"data\": true");
    for (prealloc, m) in &maps {
        assert_eq!(zero_data(m), *prealloc == "metadata", "{prealloc}: {m}");
    }
}

// Known bugs in the qcow2 driver and the engine, reported; run with `--ignored`. Each asserts
// what QEMU does.

/// qcow2 block status leaves out the host offset of unallocated and zero subclusters of an
/// allocated cluster (QEMU reports `BDRV_BLOCK_OFFSET_VALID` for both), so `map --output=json`
/// differs on images with extended L2 entries.
#[test]
fn extended_l2_map_offsets_match_qemu() {
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path();
    must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "x.qcow2", "4M"]), "create");
    let io = ["-c", "write -q -P 1 0 3k", "-c", "write -q -P 2 64k 64k", "-c", "write -q -z 66k 4k", "x.qcow2"].map(String::from);
    must(&qemu_io(dir, &io), "qemu-io");
    same_output(dir, &["map", "--output=json", "x.qcow2"]);
}

/// QEMU writes no feature name table for cluster sizes of 4 KiB and less (it may not fit), so
/// basalt-img's images differ there, and with 512-byte clusters and a backing file the header
/// does not fit at all and creation fails (leaving an empty file behind).
#[test]
fn small_cluster_headers_match_qemu() {
    let q = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    for dir in [q.path(), b.path()] {
        must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]), "create base");
    }
    for opts in ["cluster_size=512", "cluster_size=4k", "cluster_size=512,refcount_bits=1"] {
        for backing in [false, true] {
            let mut args = vec!["create", "-f", "qcow2", "-o", opts];
            if backing {
                args.extend(["-b", "base.qcow2", "-F", "qcow2"]);
            }
            args.extend(["n.qcow2", "1M"]);
            assert_eq!(outcome(&basalt_img(b.path(), &args)), outcome(&qemu_img(q.path(), &args)), "{args:?}");
            let (qf, bf) = (std::fs::read(q.path().join("n.qcow2")).ok(), std::fs::read(b.path().join("n.qcow2")).ok());
            assert!(qf == bf, "{args:?}: the images differ");
        }
    }
}

/// An L2 table offset that is unaligned or past the end of the file is corruption: QEMU names
/// it ("L2 table offset 0x... unaligned (L1 index: 0)") and, read-write, marks the image
/// corrupt, on reads too. Basalt's reads fail with a bare EIO; an unaligned offset is never
/// named nor marked.
#[test]
fn bad_l2_table_offsets_are_named_and_mark_the_image_corrupt() {
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path();
    must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "good.qcow2", "4M"]), "create");
    must(&qemu_io(dir, &["-c", "write -q -P 1 0 128k", "good.qcow2"].map(String::from)), "qemu-io");
    let h = std::fs::read(dir.join("good.qcow2")).expect("read");
    let (l1, l2) = l1_l2(&h);
    for (name, entry) in [("u.qcow2", (l2 + 512) | (1 << 63)), ("e.qcow2", (1 << 40) | (1 << 63))] {
        patched(dir, "good.qcow2", name, &[(l1, be64(entry))]);
        fails_clearly(dir, "basalt-io", &["-r", "-c", "read 0 4k", name], "L2 table offset");
        fails_clearly(dir, "basalt-io", &["-c", "read 0 4k", name], "L2 table offset");
        let info = stdout(&qemu_img(dir, &["info", name]));
        assert!(info.contains("corrupt: true"), "{name} not marked corrupt after a read-write read");
    }
}

/// A qcow2 image whose format was probed opens its file before the format chose permissions,
/// so it does not keep other writers out as QEMU does (and as `-f qcow2` does).
#[test]
fn probed_qcow2_locks_out_writers() {
    use std::io::Write;
    use std::process::Stdio;
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path();
    must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]), "create");
    for fmt in [&["-f", "qcow2"][..], &[]] {
        let mut child = Command::new(tool("basalt-io"))
            .current_dir(dir)
            .arg("-r")
            .args(fmt)
            .arg("a.qcow2")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn basalt-io");
        std::thread::sleep(std::time::Duration::from_millis(500));
        let o = qemu_io(dir, &["-c", "write 0 4k", "a.qcow2"].map(String::from));
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(b"quit\n");
        }
        let _ = child.wait();
        assert!(!o.status.success(), "qemu-io wrote to an image basalt-io {fmt:?} holds open: {}", stdout(&o));
        assert!(stderr(&o).contains("Failed to get \"write\" lock"), "{}", stderr(&o));
    }
}

/// Repairs as qemu-img makes them, on three broken copies of one image: a leaked reference (a
/// refcount of 2 on the L1 table), a cluster in use with a refcount of 0, and a leaked data
/// cluster (its L2 entry cleared). For each, `check`, `check -r leaks` and `check -r all` print
/// the same and exit with the same code, and the repaired files are byte for byte the same as
/// qemu-img's:
/// - a refcount of 0 on a cluster in use is never repaired in place: `-r leaks` stops with
///   "ERROR need to rebuild refcount structures" (check failed, exit 1); `-r all` writes new
///   refcount structures in the first free clusters and frees the old ones;
/// - clusters a repair frees are discarded in the file (they read back as zeroes).
#[test]
fn check_repairs_match_qemu_img_byte_for_byte() {
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path();
    must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "good.qcow2", "4M"]), "create");
    must(&qemu_io(dir, &["-c", "write -q -P 1 0 128k", "good.qcow2"].map(String::from)), "qemu-io");
    let h = std::fs::read(dir.join("good.qcow2")).expect("read");
    let rb = read_u64(&h, read_u64(&h, 48) as usize);
    let l2 = read_u64(&h, read_u64(&h, 40) as usize) & 0x00ff_ffff_ffff_fe00;
    patched(dir, "good.qcow2", "leak.qcow2", &[(rb + 6, vec![0, 2])]);
    patched(dir, "good.qcow2", "err.qcow2", &[(rb + 10, vec![0, 0])]);
    patched(dir, "good.qcow2", "lost.qcow2", &[(l2 + 8, vec![0; 8])]);
    for img in ["leak.qcow2", "err.qcow2", "lost.qcow2"] {
        same_output(dir, &["check", img]);
        for r in ["leaks", "all"] {
            patched(dir, img, "q.qcow2", &[]);
            patched(dir, img, "b.qcow2", &[]);
            let q = outcome(&qemu_img(dir, &["check", "-r", r, "q.qcow2"]));
            let b = outcome(&basalt_img(dir, &["check", "-r", r, "b.qcow2"]));
            assert_eq!(b, q, "check -r {r} {img}");
            let (qf, bf) = (std::fs::read(dir.join("q.qcow2")).unwrap(), std::fs::read(dir.join("b.qcow2")).unwrap());
            assert!(qf == bf, "check -r {r} {img}: the repaired files differ");
            same_output(dir, &["check", "b.qcow2"]);
        }
    }
    // 512-byte clusters: the rebuilt structures span several refcount blocks, placed in the
    // holes a discard left, in their own ranges and past the end of the image.
    must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "small.qcow2", "3M"]), "create");
    let io = ["-c", "write -q -P 1 0 1M", "-c", "write -q -P 2 1500k 100k", "-c", "discard -q 100k 50k", "small.qcow2"];
    must(&qemu_io(dir, &io.map(String::from)), "qemu-io");
    let sh = std::fs::read(dir.join("small.qcow2")).expect("read");
    let srb = read_u64(&sh, read_u64(&sh, 48) as usize);
    patched(dir, "small.qcow2", "q.qcow2", &[(srb + 40, vec![0, 0])]);
    patched(dir, "small.qcow2", "b.qcow2", &[(srb + 40, vec![0, 0])]);
    let q = outcome(&qemu_img(dir, &["check", "-r", "all", "q.qcow2"]));
    let b = outcome(&basalt_img(dir, &["check", "-r", "all", "b.qcow2"]));
    assert_eq!(b, q, "check -r all on 512-byte clusters");
    assert!(q.err.contains("Rebuilding refcount structure"), "{}", q.err);
    let (qf, bf) = (std::fs::read(dir.join("q.qcow2")).unwrap(), std::fs::read(dir.join("b.qcow2")).unwrap());
    assert!(qf == bf, "check -r all on 512-byte clusters: the repaired files differ");
    // The cases are what they claim: the rebuild moved the refcount table.
    patched(dir, "err.qcow2", "b.qcow2", &[]);
    must(&basalt_img(dir, &["check", "-q", "-r", "all", "b.qcow2"]), "rebuild");
    assert_ne!(read_u64(&std::fs::read(dir.join("b.qcow2")).unwrap(), 48), read_u64(&h, 48), "the table moved");
}

/// With 1-bit refcounts a host cluster cannot be shared by two compressed clusters: QEMU then
/// starts a new host cluster; Basalt's second compressed write fails (EIO) and marks the image
/// corrupt ("Refcount of cluster 0x5 would go from 1 by 1").
#[test]
fn compressed_writes_with_1_bit_refcounts_start_new_host_clusters() {
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path();
    for img in ["b.qcow2", "q.qcow2"] {
        must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k,refcount_bits=1", img, "1M"]), "create");
    }
    write_both(
        dir,
        "b.qcow2",
        "q.qcow2",
        &[Op::Compressed { off: 0, len: 4096, pat: 1 }, Op::Compressed { off: 4096, len: 4096, pat: 2 }],
    );
    qemu_check_clean(dir, "b.qcow2");
    qemu_identical(dir, "b.qcow2", "q.qcow2");
}

/// QEMU writes compressed clusters only where nothing is allocated (anything else fails with
/// EIO, "write failed: Input/output error"); Basalt overwrites an allocated or compressed
/// cluster with a compressed one.
#[test]
fn compressed_writes_over_allocated_clusters_fail_as_in_qemu() {
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path();
    for img in ["b.qcow2", "q.qcow2"] {
        must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", img, "1M"]), "create");
    }
    for cmd in ["write -c -P 7 20k 4k", "write -c -P 8 20k 4k", "write -P 1 0 4k", "write -c -P 2 0 4k"] {
        let args: Vec<String> = vec!["-c".into(), cmd.into()];
        let q = qemu_io(dir, &[args.clone(), vec!["q.qcow2".into()]].concat());
        let b = basalt_io(dir, &[args, vec!["b.qcow2".into()]].concat());
        assert_eq!(b.status.code(), q.status.code(), "{cmd}: {}", stdout(&q));
    }
}
