//! qcow2 encryption (`encrypt.format=luks` and the legacy `aes`) against QEMU's tools, both
//! directions.
//!
//! - Images qemu-img creates (LUKS over a few cipher combinations and cluster sizes, v2 and v3;
//!   AES through `encrypt.format=aes` and the deprecated `encryption=on`) and qemu-io writes
//!   (whole clusters, runs, partial clusters, writes across cluster boundaries, unaligned
//!   writes, zero writes, discards) convert to exactly the bytes a plain model holds through
//!   basalt-img, and `info` (with and without the key), `check` and `map` print what qemu-img
//!   prints.
//! - Images basalt-img creates have QEMU's layout byte for byte outside the random LUKS area
//!   (header, FDE extension, refcount structures, L1, file length) and its `Formatting` line;
//!   after basalt-io does the same writes they read as the model in QEMU, are clean under
//!   `qemu-img check`, identical under `qemu-img compare` to the QEMU-written image, and map the
//!   same.
//! - Backing chains: an encrypted overlay over a plain backing file, a plain overlay over an
//!   encrypted one, both encrypted; copy-on-write from the backing file through both tools.
//! - Errors identical to QEMU's: missing key (qemu-io, qemu-img check/map/convert), wrong
//!   password, missing secret, format mismatches, unexpected options, create option errors,
//!   `convert -c` with encryption. Malformed FDE extensions fail with an error naming the field.
//! - Through the engine: writes leave the caller's buffer as it was.
//!
//! `iter-time=10` keeps key derivation fast. The binaries must be built first
//! (`cargo build -p basalt-tools --bins`); qemu-img and qemu-io must be installed.

use std::path::Path;
use std::process::{Command, Output};

use basalt_engine::{Backend, Graph, OpenFlags, Opts, Secrets, WriteFlags};
use basalt_reactor::{IoBuf, Reactor, ReactorConfig};
use basalt_tests::{must, peer, run, stderr, stdout, tool};

const SECRET: &str = "secret,id=sec0,data=abc";
const SIZE: u64 = 4 << 20;

fn qemu_img(dir: &Path, args: &[&str]) -> Output {
    run(peer("qemu-img").current_dir(dir).args(args))
}

fn qemu_io(dir: &Path, args: &[&str]) -> Output {
    run(peer("qemu-io").current_dir(dir).args(args))
}

/// A Basalt tool under `timeout`, so that a hang fails the test instead of stalling it.
fn basalt(dir: &Path, name: &str, args: &[&str]) -> Output {
    run(Command::new("timeout").current_dir(dir).arg("60").arg(tool(name)).args(args))
}

fn image_opts(file: &str) -> String {
    format!("driver=qcow2,file.filename={file},encrypt.key-secret=sec0")
}

/// One guest operation: a pattern write, a zero write or a discard.
#[derive(Clone, Copy)]
enum Op {
    Write(u8, u64, u64),
    Zero(u64, u64),
    Discard(u64, u64),
}

/// Whole clusters, a run, partial clusters, across a boundary, an overwrite of allocated data,
/// unaligned bytes (padded by the block layer), zeroing whole and partial clusters, discards
/// of whole clusters, the last cluster. Offsets assume 64 KiB clusters but hold for any size.
const OPS: &[Op] = &[
    Op::Write(0x11, 0, 65536),
    Op::Write(0x22, 65536, 131072),
    Op::Write(0x33, 200_704, 8192),
    Op::Write(0x44, 258_048, 12288),
    Op::Write(0x55, 0, 512),
    Op::Write(0x66, 1_049_000, 70000),
    Op::Zero(65536, 65536),
    Op::Zero(327_680, 4096),
    Op::Write(0x77, 2_097_152, 262_144),
    Op::Discard(2_162_688, 65536),
    Op::Zero(2_293_760, 8192),
    Op::Write(0x88, SIZE - 65536, 65536),
];

fn commands(ops: &[Op]) -> Vec<String> {
    ops.iter()
        .map(|op| match *op {
            Op::Write(p, o, l) => format!("write -P {p} {o} {l}"),
            Op::Zero(o, l) => format!("write -z {o} {l}"),
            Op::Discard(o, l) => format!("discard {o} {l}"),
        })
        .collect()
}

/// The guest content after `ops` on `base` (discards are whole clusters without a backing
/// file, so they read as zeroes).
fn model(base: &[u8], ops: &[Op]) -> Vec<u8> {
    let mut m = base.to_vec();
    for op in ops {
        let (v, o, l) = match *op {
            Op::Write(p, o, l) => (p, o, l),
            Op::Zero(o, l) | Op::Discard(o, l) => (0, o, l),
        };
        m[o as usize..(o + l) as usize].fill(v);
    }
    m
}

/// Run `cmds` in qemu-io or basalt-io on the encrypted image described by `opts`; every
/// command must succeed (qemu-io exits 0 even when a command fails, so its output is checked).
fn io_opts(dir: &Path, basalt_side: bool, opts: &str, cmds: &[String]) {
    let mut args = vec!["--object", SECRET, "--image-opts", opts];
    for c in cmds {
        args.extend(["-c", c.as_str()]);
    }
    let o = if basalt_side { basalt(dir, "basalt-io", &args) } else { qemu_io(dir, &args) };
    let who = if basalt_side { "basalt-io" } else { "qemu-io" };
    must(&o, &format!("{who} {cmds:?} on {opts}"));
    let out = stdout(&o) + &stderr(&o);
    assert!(!out.contains("failed") && !out.contains("error"), "{who} {cmds:?} on {opts}:\n{out}");
}

fn io(dir: &Path, basalt_side: bool, file: &str, cmds: &[String]) {
    io_opts(dir, basalt_side, &image_opts(file), cmds);
}

/// The image converted to raw by `tool` ("qemu-img" or "basalt-img").
fn plaintext(dir: &Path, basalt_side: bool, opts: &str, out: &str) -> Vec<u8> {
    let args = ["convert", "--object", SECRET, "--image-opts", opts, "-O", "raw", out];
    let o = if basalt_side { basalt(dir, "basalt-img", &args) } else { qemu_img(dir, &args) };
    must(&o, &format!("convert {opts}"));
    std::fs::read(dir.join(out)).unwrap()
}

/// Both tools decrypt the image to `want`.
fn reads_as(dir: &Path, file: &str, want: &[u8]) {
    let opts = image_opts(file);
    for basalt_side in [false, true] {
        let got = plaintext(dir, basalt_side, &opts, &format!("{file}.{basalt_side}.raw"));
        assert_eq!(got.len(), want.len(), "{file}: converted size");
        if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
            panic!(
                "{file}: {} reads {:#x} at {i}, the model {:#x}",
                if basalt_side { "basalt" } else { "qemu" },
                got[i],
                want[i]
            );
        }
    }
}

/// stdout, stderr and the exit code of both tools agree (program names normalised).
fn same_output(dir: &Path, img: bool, args: &[&str]) {
    let (q, b) = if img {
        (qemu_img(dir, args), basalt(dir, "basalt-img", args))
    } else {
        (qemu_io(dir, args), basalt(dir, "basalt-io", args))
    };
    // Timings of successful qemu-io commands differ: only their presence is compared.
    let norm = |s: String| {
        s.replace("basalt-img", "qemu-img")
            .replace("basalt-io", "qemu-io")
            .lines()
            .map(|l| if l.contains(" ops; ") { "<timing>\n".to_string() } else { format!("{l}\n") })
            .collect::<String>()
    };
    assert_eq!(b.status.code(), q.status.code(), "{args:?}: exit code; basalt stderr: {}", stderr(&b));
    assert_eq!(norm(stdout(&b)), norm(stdout(&q)), "{args:?}: stdout");
    assert_eq!(norm(stderr(&b)), norm(stderr(&q)), "{args:?}: stderr");
}

/// `info` (human and JSON, with and without the key), `check` and `map` print the same.
fn same_reports(dir: &Path, file: &str) {
    let opts = image_opts(file);
    for args in [
        vec!["info", file],
        vec!["info", "--output=json", file],
        vec!["info", "--object", SECRET, "--image-opts", opts.as_str()],
        vec!["info", "--output=json", "--object", SECRET, "--image-opts", opts.as_str()],
        vec!["check", "--object", SECRET, "--image-opts", opts.as_str()],
        vec!["check", "--output=json", "--object", SECRET, "--image-opts", opts.as_str()],
        vec!["map", "--output=json", "--object", SECRET, "--image-opts", opts.as_str()],
    ] {
        same_output(dir, true, &args);
    }
}

/// Encryption options tried (beyond the key secret), and a cluster size.
const LUKS_COMBOS: &[(&str, &str)] = &[
    ("encrypt.format=luks,encrypt.iter-time=10", "64k"),
    (
        "encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1",
        "4k",
    ),
    ("encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.ivgen-alg=plain", "512"),
    ("encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-mode=ctr,compat=0.10", "64k"),
];

const AES_COMBOS: &[(&str, &str)] = &[("encrypt.format=aes", "64k"), ("encryption=on", "4k")];

fn create_args<'a>(combo: &'a str, cs: &str, file: &'a str, o: &'a mut String) -> Vec<&'a str> {
    *o = format!("{combo},encrypt.key-secret=sec0,cluster_size={cs}");
    vec!["create", "-f", "qcow2", "--object", SECRET, "-o", o.as_str(), file, "4M"]
}

/// The FDE extension's (offset, length) in an image file, if any.
fn fde(img: &[u8]) -> Option<(usize, usize)> {
    let be32 = |o: usize| u32::from_be_bytes(img[o..o + 4].try_into().unwrap()) as usize;
    let be64 = |o: usize| u64::from_be_bytes(img[o..o + 8].try_into().unwrap()) as usize;
    let cs = 1usize << be32(20);
    let mut o = if be32(4) >= 3 { be32(100) } else { 72 };
    while o + 8 <= cs {
        let (t, l) = (be32(o), be32(o + 4));
        if t == 0 {
            return None;
        }
        if t == 0x0537_be77 {
            return Some((be64(o + 8), be64(o + 16)));
        }
        o += 8 + l.next_multiple_of(8);
    }
    None
}

/// Both images have the same layout: equal bytes everywhere but in the LUKS header area
/// (random salts, keys and UUID), which lies at the same place with the same length.
fn same_layout(dir: &Path, a: &str, b: &str) {
    let (x, y) = (std::fs::read(dir.join(a)).unwrap(), std::fs::read(dir.join(b)).unwrap());
    assert_eq!(x.len(), y.len(), "{a} and {b}: file length");
    let area = fde(&x);
    assert_eq!(area, fde(&y), "{a} and {b}: FDE extension");
    let mut diff = (0..x.len()).filter(|&i| x[i] != y[i]);
    if let Some(i) = diff.find(|&i| area.is_none_or(|(o, l)| i < o || i >= o + l)) {
        panic!("{a} and {b} differ at {i:#x} (outside the LUKS area {area:?})");
    }
}

#[test]
fn qemu_images_read_in_basalt() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let want = model(&vec![0u8; SIZE as usize], OPS);
    for (i, (combo, cs)) in LUKS_COMBOS.iter().chain(AES_COMBOS).enumerate() {
        let file = format!("q{i}.qcow2");
        let mut o = String::new();
        must(&qemu_img(d, &create_args(combo, cs, &file, &mut o)), &format!("qemu-img create {combo}"));
        io(d, false, &file, &commands(OPS));
        reads_as(d, &file, &want);
        same_reports(d, &file);
        // And basalt-io reads the patterns itself.
        let reads: Vec<String> = OPS
            .iter()
            .filter_map(|op| match *op {
                Op::Write(0x88, o, l) | Op::Write(0x11, o, l) if o != 0 => Some(format!("read -P 0x88 {o} {l}")),
                Op::Zero(o, l) => Some(format!("read -P 0 {o} {l}")),
                _ => None,
            })
            .collect();
        io(d, true, &file, &reads);
    }
}

#[test]
fn basalt_images_read_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let want = model(&vec![0u8; SIZE as usize], OPS);
    for (i, (combo, cs)) in LUKS_COMBOS.iter().chain(AES_COMBOS).enumerate() {
        let (bf, qf) = (format!("b{i}.qcow2"), format!("r{i}.qcow2"));
        let mut o = String::new();
        let b = basalt(d, "basalt-img", &create_args(combo, cs, &bf, &mut o));
        must(&b, &format!("basalt-img create {combo}"));
        let q = qemu_img(d, &create_args(combo, cs, &qf, &mut o));
        must(&q, &format!("qemu-img create {combo}"));
        assert_eq!(stdout(&b).replace(&bf, "X"), stdout(&q).replace(&qf, "X"), "Formatting line for {combo}");
        same_layout(d, &bf, &qf);
        io(d, true, &bf, &commands(OPS));
        io(d, false, &qf, &commands(OPS));
        reads_as(d, &bf, &want);
        same_reports(d, &bf);
        let check = qemu_img(d, &["check", "--object", SECRET, "--image-opts", &image_opts(&bf)]);
        must(&check, &format!("qemu-img check {bf}"));
        assert!(stdout(&check).contains("No errors were found"), "{}", stdout(&check));
        let cmp = qemu_img(d, &["compare", "--object", SECRET, "--image-opts", &image_opts(&bf), &image_opts(&qf)]);
        must(&cmp, &format!("qemu-img compare {bf} {qf}"));
        // The same clusters allocated the same way.
        let map = |f: &str| stdout(&qemu_img(d, &["map", "--output=json", "--object", SECRET, "--image-opts", &image_opts(f)]));
        assert_eq!(map(&bf), map(&qf), "{combo}: map");
        let end = |f: &str| {
            let o = qemu_img(d, &["check", "--output=json", "--object", SECRET, "--image-opts", &image_opts(f)]);
            let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
            (v["image-end-offset"].clone(), v["allocated-clusters"].clone())
        };
        // With 512-byte clusters, new data needs new refcount blocks, which Basalt's allocator
        // places differently from QEMU's for plain images too: the end offset differs there.
        if *cs != "512" {
            assert_eq!(end(&bf), end(&qf), "{combo}: check figures");
        }
    }
}

#[test]
fn layouts_match_qemu_across_cluster_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Small clusters put the LUKS area across many refcount blocks, which QEMU's allocator
    // places after it; large images move it past a long L1 table; preallocation puts it after
    // the data; a backing file adds a header extension before it.
    let cases: &[(&str, &str)] = &[
        ("cluster_size=512", "1M"),
        ("cluster_size=1024", "1M"),
        ("cluster_size=4096", "100G"),
        ("cluster_size=2M", "1G"),
        ("preallocation=metadata", "4M"),
        ("cluster_size=4096,preallocation=falloc", "1M"),
        ("backing_file=base.raw,backing_fmt=raw", "4M"),
        ("refcount_bits=1,cluster_size=4096", "64M"),
    ];
    must(&qemu_img(d, &["create", "-q", "-f", "raw", "base.raw", "4M"]), "base");
    for (i, (extra, size)) in cases.iter().enumerate() {
        let o = format!("encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,{extra}");
        let (bf, qf) = (format!("lb{i}.qcow2"), format!("lq{i}.qcow2"));
        must(&basalt(d, "basalt-img", &["create", "-q", "-f", "qcow2", "--object", SECRET, "-o", &o, &bf, size]), &o);
        must(&qemu_img(d, &["create", "-q", "-f", "qcow2", "--object", SECRET, "-o", &o, &qf, size]), &o);
        if extra.contains("falloc") {
            // qemu-img moves the refcount table when it preallocates with falloc; Basalt does
            // not (for plain images too): only the LUKS area's place is compared.
            let (x, y) = (std::fs::read(d.join(&bf)).unwrap(), std::fs::read(d.join(&qf)).unwrap());
            assert_eq!(fde(&x), fde(&y), "{extra}: FDE extension");
            assert_eq!(x.len(), y.len(), "{extra}: file length");
        } else {
            same_layout(d, &bf, &qf);
        }
        let check = qemu_img(d, &["check", "--object", SECRET, "--image-opts", &image_opts(&bf)]);
        must(&check, &format!("qemu-img check {extra}"));
        same_output(d, true, &["check", "--object", SECRET, "--image-opts", &image_opts(&bf)]);
    }
}

#[test]
fn backing_chains() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base: Vec<u8> = (0..SIZE).map(|i| (i / 4096 % 251) as u8 + 1).collect();
    std::fs::write(d.join("base.raw"), &base).unwrap();
    let enc = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10";
    // An encrypted base for the plain and the encrypted overlays.
    must(
        &qemu_img(d, &["convert", "--object", SECRET, "-f", "raw", "-O", "qcow2", "-o", enc, "base.raw", "ebase.qcow2"]),
        "encrypted base",
    );
    let ops = &[Op::Write(0x91, 1000 * 512, 3 * 512), Op::Write(0x92, 65536 + 4096, 70000), Op::Zero(262_144, 8192)];
    let want = model(&base, ops);
    // (overlay create options, backing, backing format, open options beyond file.filename)
    let chains: &[(&str, &str, &str, &str)] = &[
        (enc, "base.raw", "raw", "encrypt.key-secret=sec0"),
        ("", "ebase.qcow2", "qcow2", "backing.encrypt.key-secret=sec0"),
        (enc, "ebase.qcow2", "qcow2", "encrypt.key-secret=sec0,backing.encrypt.key-secret=sec0"),
    ];
    for (i, (o, backing, fmt, open)) in chains.iter().enumerate() {
        let mut copts = format!("backing_file={backing},backing_fmt={fmt}");
        if !o.is_empty() {
            copts = format!("{o},{copts}");
        }
        for basalt_side in [false, true] {
            let f = format!("top{i}{}.qcow2", if basalt_side { "b" } else { "q" });
            let args = ["create", "-q", "-f", "qcow2", "--object", SECRET, "-o", &copts, &f, "4M"];
            must(&if basalt_side { basalt(d, "basalt-img", &args) } else { qemu_img(d, &args) }, &copts);
            let opts = format!("driver=qcow2,file.filename={f},{open}");
            io_opts(d, basalt_side, &opts, &commands(ops));
            for reader in [false, true] {
                let got = plaintext(d, reader, &opts, &format!("{f}.{reader}.raw"));
                assert!(got == want, "{f} read by {} differs from the model", if reader { "basalt" } else { "qemu" });
            }
        }
        let (q, b) = (
            format!("driver=qcow2,file.filename=top{i}q.qcow2,{open}"),
            format!("driver=qcow2,file.filename=top{i}b.qcow2,{open}"),
        );
        must(&qemu_img(d, &["compare", "--object", SECRET, "--image-opts", &q, &b]), "compare overlays");
    }
    // Without the backing file's key: QEMU's message.
    same_output(d, false, &["-c", "read 0 512", "top1q.qcow2"]);
}

/// Both tools fail the same way on `args` (exit code, stdout and stderr).
fn same_failure(d: &Path, img: bool, args: &[&str]) {
    same_output(d, img, args);
}

#[test]
fn key_and_option_errors_read_as_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let l = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10";
    must(&qemu_img(d, &["create", "-q", "-f", "qcow2", "--object", SECRET, "-o", l, "l.qcow2", "1M"]), "luks");
    must(
        &qemu_img(
            d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "--object",
                SECRET,
                "-o",
                "encrypt.format=aes,encrypt.key-secret=sec0",
                "a.qcow2",
                "1M",
            ],
        ),
        "aes",
    );
    must(&qemu_img(d, &["create", "-q", "-f", "qcow2", "p.qcow2", "1M"]), "plain");
    let wrong = "secret,id=sec0,data=abd";
    for f in ["l.qcow2", "a.qcow2"] {
        let opts = image_opts(f);
        let plain = format!("driver=qcow2,file.filename={f}");
        same_failure(d, false, &["-c", "read 0 512", f]);
        same_failure(d, false, &["--image-opts", "-c", "read 0 512", &plain]);
        same_failure(
            d,
            false,
            &["--object", SECRET, "--image-opts", "-c", "read 0 512", &format!("{plain},encrypt.key-secret=sec1")],
        );
        for extra in ["encrypt.format=aes", "encrypt.format=luks", "encrypt.format=qcow", "encrypt.cipher-alg=aes-128"] {
            same_failure(d, false, &["--object", SECRET, "--image-opts", "-c", "read 0 512", &format!("{opts},{extra}")]);
        }
        for cmd in [vec!["check", f], vec!["map", f], vec!["convert", "-O", "raw", f, "o.raw"], vec!["compare", f, f]] {
            same_failure(d, true, &cmd);
        }
        // info needs no key, and takes a wrong one without unlocking (QEMU does no I/O).
        same_output(d, true, &["info", "--object", wrong, "--image-opts", &opts]);
    }
    same_failure(d, false, &["--object", wrong, "--image-opts", "-c", "read 0 512", &image_opts("l.qcow2")]);
    let o = basalt(d, "basalt-io", &["--object", wrong, "--image-opts", "-c", "read 0 512", &image_opts("l.qcow2")]);
    assert!(stderr(&o).contains("Invalid password, cannot unlock any keyslot"), "{}", stderr(&o));
    // A plain image: encrypt.key-secret is ignored, encrypt.format refused.
    same_output(
        d,
        false,
        &["--object", SECRET, "--image-opts", "-c", "read 0 512", "driver=qcow2,file.filename=p.qcow2,encrypt.key-secret=sec0"],
    );
    same_failure(
        d,
        false,
        &["--object", SECRET, "--image-opts", "-c", "read 0 512", "driver=qcow2,file.filename=p.qcow2,encrypt.format=luks"],
    );
    // Create errors: the same messages, and no file left behind.
    for o in [
        "encryption=on,encrypt.format=luks",
        "encryption=on,encrypt.format=aes",
        "encryption=yes",
        "encryption=on",
        "encrypt.format=foo",
        "encrypt.key-secret=sec0",
        "encrypt.cipher-alg=aes-128",
        "encrypt.format=aes",
        "encrypt.format=luks",
        "encrypt.format=aes,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "encrypt.format=aes,encrypt.key-secret=nosuch",
        "encrypt.format=luks,encrypt.key-secret=nosuch",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=foo",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.hash-alg=foo",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.detached-header=on",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=abc",
    ] {
        same_failure(d, true, &["create", "-f", "qcow2", "--object", SECRET, "-o", o, "e.qcow2", "1M"]);
        assert!(!d.join("e.qcow2").exists(), "{o}: a file was left behind");
    }
    // Compression and encryption together, as qemu-img refuses them.
    std::fs::write(d.join("s.raw"), vec![7u8; 1 << 20]).unwrap();
    same_failure(d, true, &["convert", "-c", "--object", SECRET, "-O", "qcow2", "-o", l, "s.raw", "c.qcow2"]);
    // Basalt refuses compressed writes into an encrypted image (QEMU would store them
    // unencrypted).
    let o = basalt(d, "basalt-io", &["--object", SECRET, "--image-opts", "-c", "write -c 0 64k", &image_opts("l.qcow2")]);
    let out = stdout(&o) + &stderr(&o);
    assert!(out.contains("write failed: Operation not supported"), "{out}");
}

#[test]
fn convert_to_and_from_encrypted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data: Vec<u8> = (0..(3u64 << 20)).map(|i| if i / 65536 % 3 == 1 { 0 } else { (i % 253) as u8 }).collect();
    std::fs::write(d.join("src.raw"), &data).unwrap();
    let l = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10";
    for (f, basalt_side) in [("b.qcow2", true), ("q.qcow2", false)] {
        let args = ["convert", "--object", SECRET, "-f", "raw", "-O", "qcow2", "-o", l, "src.raw", f];
        must(&if basalt_side { basalt(d, "basalt-img", &args) } else { qemu_img(d, &args) }, &format!("convert to {f}"));
        reads_as(d, f, &data);
    }
    let map = |f: &str| stdout(&qemu_img(d, &["map", "--output=json", "--object", SECRET, "--image-opts", &image_opts(f)]));
    assert_eq!(map("b.qcow2"), map("q.qcow2"), "zero clusters are skipped the same way");
    must(
        &qemu_img(d, &["compare", "--object", SECRET, "--image-opts", &image_opts("b.qcow2"), &image_opts("q.qcow2")]),
        "compare",
    );
    // Encrypted to encrypted (LUKS to AES) and back to raw, through basalt-img alone.
    let args = ["convert", "--object", SECRET, "--image-opts", &image_opts("b.qcow2"), "-O", "qcow2", "-o"];
    let mut a = args.to_vec();
    a.extend(["encrypt.format=aes,encrypt.key-secret=sec0", "c.qcow2"]);
    must(&basalt(d, "basalt-img", &a), "convert luks to aes");
    reads_as(d, "c.qcow2", &data);
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

#[test]
fn malformed_extensions_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let l = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10";
    must(&qemu_img(d, &["create", "-q", "-f", "qcow2", "--object", SECRET, "-o", l, "m.qcow2", "1M"]), "create");
    let good = std::fs::read(d.join("m.qcow2")).unwrap();
    let (off, _) = fde(&good).expect("an FDE extension");
    // The extension is the first one after the 112-byte v3 header: type, length, data.
    assert_eq!(&good[112..116], &0x0537_be77u32.to_be_bytes());
    type Mutation = (&'static str, Box<dyn Fn(&mut Vec<u8>)>, &'static str);
    let cases: Vec<Mutation> = vec![
        (
            "unaligned offset",
            Box::new(move |b| put(b, 120, &(off as u64 + 512).to_be_bytes())),
            "is not a multiple of cluster size",
        ),
        ("offset past the end", Box::new(|b| put(b, 120, &(1u64 << 40).to_be_bytes())), "past the end of the image file"),
        ("offset zero", Box::new(|b| put(b, 120, &0u64.to_be_bytes())), "qcow2 header"),
        ("length huge", Box::new(|b| put(b, 128, &(u64::MAX - 4096).to_be_bytes())), "past the end of the image file"),
        ("length zero", Box::new(|b| put(b, 128, &0u64.to_be_bytes())), "outside of extension header"),
        ("length short of the key material", Box::new(|b| put(b, 128, &4096u64.to_be_bytes())), "key material"),
        (
            "extension size 8",
            Box::new(|b| put(b, 116, &8u32.to_be_bytes())),
            "CRYPTO header extension size 8, but expected size 16",
        ),
        (
            "extension missing",
            Box::new(|b| put(b, 112, &0x1234_5678u32.to_be_bytes())),
            "Missing CRYPTO header for crypt method 2",
        ),
        ("method 1 with the extension", Box::new(|b| put(b, 32, &1u32.to_be_bytes())), "only expected with LUKS"),
        ("method 3", Box::new(|b| put(b, 32, &3u32.to_be_bytes())), "Unsupported encryption method 3"),
        ("not LUKS", Box::new(move |b| b[off..off + 6].fill(b'X')), "Volume is not in LUKS format"),
        ("stripes huge", Box::new(move |b| put(b, off + 208 + 44, &u32::MAX.to_be_bytes())), "stripes"),
    ];
    for (what, mutate, want) in &cases {
        let mut b = good.clone();
        mutate(&mut b);
        std::fs::write(d.join("bad.qcow2"), &b).unwrap();
        let o = basalt(d, "basalt-io", &["--object", SECRET, "--image-opts", "-c", "read 0 512", &image_opts("bad.qcow2")]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{what}: {err}");
        assert!(err.contains(want), "{what}: wanted '{want}' in: {err}");
        let o = basalt(d, "basalt-img", &["info", "bad.qcow2"]);
        assert!(!stderr(&o).contains("panicked") && o.status.code().is_some(), "{what}: info");
    }
    // Key material far into a huge (sparse) area is refused before anything that large is read.
    let mut b = good.clone();
    let area = 80u64 << 20;
    put(&mut b, 128, &area.to_be_bytes());
    put(&mut b, off + 104, &((area / 512) as u32).to_be_bytes());
    put(&mut b, off + 208 + 40, &((70u32 << 20) / 512).to_be_bytes());
    std::fs::write(d.join("far.qcow2"), &b).unwrap();
    std::fs::OpenOptions::new().write(true).open(d.join("far.qcow2")).unwrap().set_len(off as u64 + area).unwrap();
    let o = basalt(d, "basalt-io", &["--object", SECRET, "--image-opts", "-c", "read 0 512", &image_opts("far.qcow2")]);
    assert!(stderr(&o).contains("is not supported"), "{}", stderr(&o));
}

#[test]
fn writes_leave_the_callers_buffer_alone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let l = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10";
    must(&qemu_img(d, &["create", "-q", "-f", "qcow2", "--object", SECRET, "-o", l, "w.qcow2", "1M"]), "create");
    let path = d.join("w.qcow2").to_str().unwrap().to_string();
    let r = Reactor::new(ReactorConfig::default()).unwrap();
    r.block_on(async move {
        let secrets = Secrets::new();
        secrets.add_object(SECRET).unwrap();
        let graph = Graph::with_secrets(basalt_formats::registry(), secrets);
        let mut o = Opts::new();
        o.set("driver", "qcow2");
        o.set("encrypt.key-secret", "sec0");
        o.set("file.filename", &path);
        let node = graph.open(o, OpenFlags::read_write()).await.unwrap();
        assert!(node.encrypted());
        let be = Backend::new(node).unwrap();
        let data: Vec<u8> = (0..(3 * 65536u32)).map(|i| (i * 31 + 7) as u8).collect();
        // A run of new clusters, a partial new cluster, then overwrites of allocated ones.
        for (off, len) in [(0u64, 131_072usize), (200_704, 4096), (4096, 8192), (196_608, 65536)] {
            let d = be.write(off, IoBuf::from_slice(&data[..len]), WriteFlags::default()).await;
            assert_eq!(d.res, Ok(len as u64));
            assert_eq!(&d.buf.unwrap()[..], &data[..len], "the caller's buffer was modified ({off}, {len})");
        }
        // Unaligned: padded to the 512-byte sector.
        let d = be.write(100, IoBuf::from_slice(&data[..300]), WriteFlags::default()).await;
        assert_eq!(d.res, Ok(300));
        assert_eq!(&d.buf.unwrap()[..], &data[..300]);
        let d = be.read(100, IoBuf::new(300)).await;
        assert_eq!(&d.buf.unwrap()[..], &data[..300]);
        let d = be.read(196_608, IoBuf::new(65536)).await;
        assert_eq!(&d.buf.unwrap()[..], &data[..65536]);
        assert!(be.flush().await.res.is_ok());
    });
    // QEMU reads the same bytes, and nothing of the plaintext is in the file.
    let o = qemu_io(d, &["--object", SECRET, "--image-opts", "-c", "read -v 4096 16", &image_opts("w.qcow2")]);
    must(&o, "qemu-io read");
    assert!(stdout(&o).starts_with("00001000:  07 26 45 64 83 a2 c1 e0 ff 1e 3d 5c 7b 9a b9 d8"), "{}", stdout(&o));
    let file = std::fs::read(d.join("w.qcow2")).unwrap();
    let probe: Vec<u8> = (0..64u32).map(|i| (i * 31 + 7) as u8).collect();
    assert!(!file.windows(64).any(|w| w == probe.as_slice()), "plaintext found in the image file");
}

#[test]
fn measure_counts_the_luks_header() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for o in [
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,cluster_size=512",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-alg=aes-192,cluster_size=2M",
        "encrypt.format=aes,encrypt.key-secret=sec0",
        "encryption=on",
        "encrypt.format=luks",
        "encrypt.format=luks,encrypt.key-secret=nosuch",
        "encrypt.format=luks,encrypt.cipher-alg=foo",
        "encrypt.format=luks,encrypt.iter-time=abc",
    ] {
        same_output(d, true, &["measure", "--object", SECRET, "-O", "qcow2", "-o", o, "--size", "1G"]);
    }
    let o = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10";
    same_output(d, true, &["measure", "--object", SECRET, "--output=json", "-O", "qcow2", "-o", o, "--size", "1G"]);
}
