//! `basalt-img convert` options that involve qcow2 features, against qemu-img as the oracle:
//! a target with a backing file (`-B`/`-F`, `-o backing_file`), a source read at an internal
//! snapshot (`-l`), and copying persistent bitmaps (`--bitmaps`, `--skip-broken-bitmaps`).
//!
//! Each case runs the same command line in two directories holding identical inputs, one with
//! qemu-img and one with basalt-img, then compares exit codes and messages, the result's
//! content (`qemu-img compare`), its allocation (`qemu-img map --output=json`), `qemu-img
//! check`, and the bitmaps' bits as the files hold them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use basalt_tests::{assert_same_img_outcome, be32, be64, bitmaps, must, peer, run, same_bitmaps, stderr, stdout, tool};

fn qemu_img(dir: &Path, args: &[&str]) -> Output {
    run(peer("qemu-img").current_dir(dir).args(args))
}

fn qemu_io(dir: &Path, args: &[&str]) -> Output {
    run(peer("qemu-io").current_dir(dir).args(args))
}

fn basalt_img(dir: &Path, args: &[&str]) -> Output {
    run(Command::new(tool("basalt-img")).current_dir(dir).args(args))
}

/// Two directories, `q` for qemu-img and `b` for basalt-img, with the same inputs.
struct Pair {
    _tmp: tempfile::TempDir,
    q: PathBuf,
    b: PathBuf,
}

impl Pair {
    /// Inputs are made in `q` by `setup`, then copied to `b`.
    fn new(setup: impl FnOnce(&Path)) -> Pair {
        let tmp = tempfile::tempdir().unwrap();
        let (q, b) = (tmp.path().join("q"), tmp.path().join("b"));
        std::fs::create_dir(&q).unwrap();
        std::fs::create_dir(&b).unwrap();
        setup(&q);
        for e in std::fs::read_dir(&q).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), b.join(e.file_name())).unwrap();
        }
        Pair { _tmp: tmp, q, b }
    }

    /// Run `args` with both tools; both must end alike (code and messages).
    fn both(&self, args: &[&str]) -> bool {
        let q = qemu_img(&self.q, args);
        let b = basalt_img(&self.b, args);
        assert_same_img_outcome(&b, &q, &args.join(" "));
        q.status.success()
    }

    /// The two results named `out` are the same image, allocated alike, and clean.
    fn same_result(&self, out: &str, fmt: &str, what: &str) {
        self.compare(out, fmt, what, true)
    }

    /// As `same_result`, but for copies written out of order (`-W`): which host cluster each
    /// guest cluster lands in depends on which write finishes first, in qemu-img as in Basalt,
    /// so only the host offsets are left out of the comparison.
    fn same_result_any_order(&self, out: &str, fmt: &str, what: &str) {
        self.compare(out, fmt, what, false)
    }

    fn compare(&self, out: &str, fmt: &str, what: &str, offsets: bool) {
        for d in [&self.q, &self.b].into_iter().filter(|_| fmt != "raw") {
            let o = qemu_img(d, &["check", "-f", fmt, out]);
            assert!(o.status.success(), "{what}: check of {}/{out}: {}{}", d.display(), stdout(&o), stderr(&o));
        }
        let (qo, bo) = (self.q.join(out), self.b.join(out));
        let o = run(peer("qemu-img").args(["compare", "-f", fmt, "-F", fmt, qo.to_str().unwrap(), bo.to_str().unwrap()]));
        assert!(o.status.success(), "{what}: content differs: {}{}", stdout(&o), stderr(&o));
        let map = |d: &Path| {
            let o = qemu_img(d, &["map", "--output=json", "-f", fmt, out]);
            must(&o, "map");
            let mut v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
            for e in v.as_array_mut().unwrap().iter_mut().filter(|_| !offsets) {
                e.as_object_mut().unwrap().remove("offset");
            }
            v
        };
        assert_eq!(map(&self.b), map(&self.q), "{what}: allocation differs");
        let backing = |d: &Path| {
            let o = qemu_img(d, &["info", "--output=json", "-f", fmt, out]);
            must(&o, "info");
            let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
            (v["backing-filename"].clone(), v["backing-filename-format"].clone())
        };
        assert_eq!(backing(&self.b), backing(&self.q), "{what}: backing file differs");
    }
}

fn io(dir: &Path, img: &str, cmds: &[&str]) {
    let mut args = Vec::new();
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(img);
    must(&qemu_io(dir, &args), "qemu-io");
}

/// base (4 MiB, 64k clusters) <- mid (4 MiB, 4k clusters) <- top (6 MiB, longer than its
/// backing files): data at every level, zero clusters, data that is all zeroes, partial
/// clusters, and data past the end of the backing files.
fn chain(dir: &Path) {
    must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]), "create");
    io(dir, "base.qcow2", &["write -P 1 0 2M", "write -P 9 3M 1M"]);
    must(
        &qemu_img(dir, &["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2"]),
        "create",
    );
    io(dir, "mid.qcow2", &["write -P 2 512k 8k", "write -z 3M 64k"]);
    must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "6M"]), "create");
    io(
        dir,
        "top.qcow2",
        &[
            "write -P 3 1M 512k",
            "write -z 0 64k",
            "write -P 0 2M 64k",
            "write -P 4 2200k 3k",
            "write -z -u 3200k 128k",
            "write -P 5 4M 64k",
            "write -P 0 5M 128k",
            "write -z 5500k 64k",
        ],
    );
}

#[test]
fn convert_with_a_backing_file_matches_qemu_img() {
    let p = Pair::new(chain);
    let cases: &[&[&str]] = &[
        &["-B", "mid.qcow2", "-F", "qcow2"],
        &["-B", "base.qcow2", "-F", "qcow2"],
        &["-B", "mid.qcow2", "-F", "qcow2", "-S", "0"],
        &["-B", "mid.qcow2", "-F", "qcow2", "-W", "-m", "16"],
        &["-B", "mid.qcow2", "-F", "qcow2", "-c"],
        &["-B", "mid.qcow2", "-F", "qcow2", "-o", "cluster_size=4k"],
        &["-B", "mid.qcow2", "-F", "qcow2", "-o", "cluster_size=128k"],
        &["-B", "mid.qcow2", "-F", "qcow2", "-c", "-o", "cluster_size=4k"],
        &["-o", "backing_file=mid.qcow2,backing_fmt=qcow2"],
    ];
    for (i, c) in cases.iter().enumerate() {
        let out = format!("out{i}.qcow2");
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend_from_slice(c);
        args.extend(["top.qcow2", &out]);
        assert!(p.both(&args), "{c:?} failed");
        if c.contains(&"-W") {
            p.same_result_any_order(&out, "qcow2", &format!("{c:?}"));
        } else {
            p.same_result(&out, "qcow2", &format!("{c:?}"));
        }
        // Through its backing file (the source's own), the copy reads as the source.
        if !c.contains(&"base.qcow2") {
            let o = qemu_img(&p.b, &["compare", &out, "top.qcow2"]);
            assert!(o.status.success(), "{c:?}: basalt-img's copy reads differently from the source: {}", stdout(&o));
        }
    }
    // Into existing images (-n): one with the backing file, one without (whatever the top
    // leaves unallocated stays unallocated there too).
    for d in [&p.q, &p.b] {
        must(&qemu_img(d, &["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "n1.qcow2", "6M"]), "create");
        must(&qemu_img(d, &["create", "-q", "-f", "qcow2", "n2.qcow2", "6M"]), "create");
        io(d, "n2.qcow2", &["write -P 7 0 6M"]);
    }
    for out in ["n1.qcow2", "n2.qcow2"] {
        assert!(p.both(&["convert", "-n", "-O", "qcow2", "-B", "mid.qcow2", "top.qcow2", out]));
        p.same_result(out, "qcow2", out);
    }
    // A raw source: its holes are zeroes written over the backing file.
    for d in [&p.q, &p.b] {
        must(&qemu_img(d, &["create", "-q", "-f", "raw", "src.raw", "4M"]), "create");
        must(&qemu_io(d, &["-f", "raw", "-c", "write -P 6 64k 64k", "src.raw"]), "qemu-io");
    }
    assert!(p.both(&["convert", "-f", "raw", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "src.raw", "raw.qcow2"]));
    p.same_result("raw.qcow2", "qcow2", "raw source");
}

#[test]
fn convert_backing_errors_match_qemu_img() {
    let p = Pair::new(chain);
    let cases: &[&[&str]] = &[
        &["convert", "-O", "qcow2", "-B", "mid.qcow2", "top.qcow2", "e1.qcow2"],
        &["convert", "-O", "qcow2", "-F", "qcow2", "top.qcow2", "e2.qcow2"],
        &["convert", "-O", "raw", "-B", "mid.qcow2", "top.qcow2", "e3.raw"],
        &["convert", "-O", "qcow2", "-B", "mid.qcow2", "-F", "qcow2", "top.qcow2", "top.qcow2", "e4.qcow2"],
        &["convert", "--target-is-zero", "-O", "qcow2", "top.qcow2", "e5.qcow2"],
    ];
    for c in cases {
        assert!(!p.both(c), "{c:?} succeeded");
    }
    // qemu-img prints this error but exits with 0 (nothing is copied); Basalt exits with 1.
    let c = ["convert", "-n", "--target-is-zero", "-O", "qcow2", "-B", "mid.qcow2", "top.qcow2", "base.qcow2"];
    let (q, b) = (qemu_img(&p.q, &c), basalt_img(&p.b, &c));
    assert_eq!(stderr(&b), stderr(&q).replace("qemu-img", "basalt-img"));
    assert_eq!((q.status.code(), b.status.code()), (Some(0), Some(1)));
}

/// An image with two internal snapshots, grown and written in between.
fn snapshots(dir: &Path) {
    must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "s.qcow2", "4M"]), "create");
    io(dir, "s.qcow2", &["write -P 1 0 1M", "write -P 8 3M 64k"]);
    must(&qemu_img(dir, &["snapshot", "-c", "one", "s.qcow2"]), "snapshot");
    io(dir, "s.qcow2", &["write -P 2 512k 1M", "write -z 3M 64k"]);
    must(&qemu_img(dir, &["resize", "-q", "s.qcow2", "8M"]), "resize");
    io(dir, "s.qcow2", &["write -P 3 6M 1M"]);
    must(&qemu_img(dir, &["snapshot", "-c", "two", "s.qcow2"]), "snapshot");
    io(dir, "s.qcow2", &["write -P 4 0 64k"]);
}

#[test]
fn convert_from_a_snapshot_matches_qemu_img() {
    let p = Pair::new(snapshots);
    let ok: &[&str] = &["one", "1", "two", "2", "snapshot.name=one", "snapshot.id=2", "snapshot.id=1,snapshot.name=one"];
    for (i, l) in ok.iter().enumerate() {
        let out = format!("o{i}.qcow2");
        assert!(p.both(&["convert", "-l", l, "-O", "qcow2", "s.qcow2", &out]), "-l {l} failed");
        p.same_result(&out, "qcow2", &format!("-l {l}"));
    }
    // The snapshot really is what was read: "one" has the first pattern where the active
    // image has the later ones.
    must(&qemu_io(&p.b, &["-r", "-c", "read -P 1 0 1M", "-c", "read -P 8 3M 64k", "-c", "read -P 0 4M 4M", "o0.qcow2"]), "read");
    let bad: &[&[&str]] = &[
        &["convert", "-l", "nope", "-O", "qcow2", "s.qcow2", "e.qcow2"],
        &["convert", "-l", "snapshot.id=1,snapshot.name=two", "-O", "qcow2", "s.qcow2", "e.qcow2"],
        &["convert", "-l", "snapshot.foo=2", "-O", "qcow2", "s.qcow2", "e.qcow2"],
        &["convert", "-l", "one", "-O", "raw", "s.qcow2", "s.qcow2", "e.raw"],
    ];
    for c in bad {
        assert!(!p.both(c), "{c:?} succeeded");
    }
    // qemu-img loads a `snapshot.` selection into the first source only.
    assert!(p.both(&["convert", "-l", "snapshot.name=one", "-O", "raw", "s.qcow2", "s.qcow2", "two.raw"]));
    p.same_result("two.raw", "raw", "two sources");
}

/// Mark bitmap number `index` of the directory in use, as a program that died holding it
/// leaves it.
fn mark_in_use(path: &Path, index: usize) {
    let mut b = std::fs::read(path).unwrap();
    let mut o = be32(&b, 100) as usize;
    while be32(&b, o) != 0x2385_2875 {
        o += 8 + (be32(&b, o + 4) as usize).next_multiple_of(8);
    }
    let mut d = be64(&b, o + 24) as usize;
    for _ in 0..index {
        let name = u16::from_be_bytes([b[d + 18], b[d + 19]]) as usize;
        d += (24 + be32(&b, d + 20) as usize + name).next_multiple_of(8);
    }
    let flags = be32(&b, d + 12) | 1;
    b[d + 12..d + 16].copy_from_slice(&flags.to_be_bytes());
    std::fs::write(path, &b).unwrap();
}

fn with_bitmaps(dir: &Path) {
    must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "s.qcow2", "8M"]), "create");
    must(&qemu_img(dir, &["bitmap", "--add", "s.qcow2", "b1"]), "add");
    must(&qemu_img(dir, &["bitmap", "--add", "-g", "128k", "s.qcow2", "b2"]), "add");
    io(dir, "s.qcow2", &["write -P 1 0 1M", "write -P 2 5M 4k"]);
    must(&qemu_img(dir, &["bitmap", "--disable", "s.qcow2", "b2"]), "disable");
    must(&qemu_img(dir, &["bitmap", "--add", "-g", "512", "s.qcow2", "b3"]), "add");
    io(dir, "s.qcow2", &["write -P 3 2M 64k", "write -z 7M 4k"]);
    std::fs::copy(dir.join("s.qcow2"), dir.join("bad.qcow2")).unwrap();
    mark_in_use(&dir.join("bad.qcow2"), 1);
}

#[test]
fn convert_bitmaps_matches_qemu_img() {
    let p = Pair::new(with_bitmaps);
    let src = bitmaps(&p.q.join("s.qcow2"));
    assert_eq!(src.len(), 3);
    assert!(src.iter().all(|b| b.3.iter().any(|x| *x != 0)), "every source bitmap records some writes");
    for (args, out) in [
        (&["convert", "--bitmaps", "-O", "qcow2", "s.qcow2", "o.qcow2"][..], "o.qcow2"),
        (&["convert", "--bitmaps", "-O", "qcow2", "-o", "cluster_size=4k", "s.qcow2", "o4k.qcow2"], "o4k.qcow2"),
        (&["convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", "bad.qcow2", "skip.qcow2"], "skip.qcow2"),
    ] {
        assert!(p.both(args), "{args:?} failed");
        p.same_result(out, "qcow2", out);
        same_bitmaps(&p.q.join(out), &p.b.join(out), out);
        let o = qemu_img(&p.b, &["info", "--output=json", out]);
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        let q = qemu_img(&p.q, &["info", "--output=json", out]);
        let w: serde_json::Value = serde_json::from_str(&stdout(&q)).unwrap();
        assert_eq!(v["format-specific"], w["format-specific"], "{out}: info differs");
    }
    // The copies hold the source's bits.
    let copied = bitmaps(&p.b.join("o.qcow2"));
    assert_eq!(
        copied.iter().map(|b| (&b.0, b.2, &b.3)).collect::<Vec<_>>(),
        src.iter().map(|b| (&b.0, b.2, &b.3)).collect::<Vec<_>>()
    );
    assert_eq!(bitmaps(&p.b.join("skip.qcow2")).len(), 2, "the inconsistent bitmap was skipped");
    // Refusals, and a name the target has already (the target is closed cleanly after it).
    let bad: &[&[&str]] = &[
        &["convert", "--bitmaps", "-O", "qcow2", "bad.qcow2", "e1.qcow2"],
        &["convert", "--skip-broken-bitmaps", "-O", "qcow2", "s.qcow2", "e2.qcow2"],
        &["convert", "--bitmaps", "-O", "raw", "s.qcow2", "e3.raw"],
        &["convert", "--bitmaps", "-O", "qcow2", "s.qcow2", "s.qcow2", "e4.qcow2"],
        &["convert", "--bitmaps", "-O", "qcow2", "-o", "compat=0.10", "s.qcow2", "e5.qcow2"],
        &["convert", "--bitmaps", "-n", "-O", "qcow2", "s.qcow2", "o.qcow2"],
        &["convert", "-f", "raw", "--bitmaps", "-O", "qcow2", "e3.raw", "e6.qcow2"],
    ];
    for c in bad {
        assert!(!p.both(c), "{c:?} succeeded");
    }
    same_bitmaps(&p.q.join("o.qcow2"), &p.b.join("o.qcow2"), "after the refused -n copy");
    for d in [&p.q, &p.b] {
        must(&qemu_img(d, &["check", "o.qcow2"]), "check");
    }
}

/// Compressed copies (`-c`) are laid out as qemu-img lays them out: zero clusters left out,
/// or written compressed with `-S 0`; partial clusters at the end of the image.
#[test]
fn compressed_copies_match_qemu_img() {
    let p = Pair::new(|dir| {
        must(&qemu_img(dir, &["create", "-q", "-f", "raw", "src.raw", "4100k"]), "create");
        let cmds = ["write -P 1 0 64k", "write -P 0 128k 64k", "write -P 2 200k 1k", "write -P 3 4096k 4k"];
        let mut args = vec!["-f", "raw"];
        for c in &cmds {
            args.extend(["-c", c]);
        }
        args.push("src.raw");
        must(&qemu_io(dir, &args), "qemu-io");
    });
    let cases: &[&[&str]] =
        &[&["-c"], &["-c", "-S", "0"], &["-c", "-o", "cluster_size=4k"], &["-c", "-S", "0", "-W", "-m", "16"]];
    for (i, c) in cases.iter().enumerate() {
        let out = format!("c{i}.qcow2");
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(c);
        args.extend(["src.raw", &out]);
        assert!(p.both(&args), "{c:?} failed");
        p.same_result(&out, "qcow2", &format!("{c:?}"));
    }
}

/// A compressed copy of many chunks, mixing clusters that compress with clusters that do not
/// (written uncompressed), is the same file qemu-img writes, byte for byte: the workers
/// compress in parallel, but the clusters are placed in guest order, as qemu-img places them.
#[test]
fn compressed_copies_are_laid_out_as_qemu_img_lays_them_out() {
    let p = Pair::new(|dir| {
        let mut data = vec![0u8; 24 << 20];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for (i, cluster) in data.chunks_mut(64 << 10).enumerate() {
            match i % 4 {
                // Random bytes: too big compressed, written as they are.
                0 | 3 => cluster.iter_mut().for_each(|b| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }),
                1 => cluster.fill(i as u8),
                _ => cluster.iter_mut().enumerate().for_each(|(j, b)| *b = (j / 97 + i) as u8),
            }
        }
        std::fs::write(dir.join("src.raw"), &data).unwrap();
    });
    for c in ["zlib", "zstd"] {
        let out = format!("{c}.qcow2");
        let o = format!("compression_type={c}");
        assert!(p.both(&["convert", "-c", "-o", &o, "-f", "raw", "-O", "qcow2", "src.raw", &out]));
        p.same_result(&out, "qcow2", c);
        let (q, b) = (std::fs::read(p.q.join(&out)).unwrap(), std::fs::read(p.b.join(&out)).unwrap());
        assert!(q == b, "{c}: the files differ");
    }
}

/// qcow2 sources are read in place where their clusters allow it (mapped from the image file,
/// page-aligned) and read into buffers where they do not (512-byte and 2 KiB clusters,
/// compressed clusters, unallocated ones): every mix gives what qemu-img gives, as raw and as
/// qcow2, byte for byte. The clusters are written out of guest order, so a chunk's data lies
/// in several runs of the file.
#[test]
fn sources_read_in_place_copy_as_qemu_img_copies() {
    let sizes = ["512", "2k", "4k", "64k", "2M"];
    let p = Pair::new(|dir| {
        for cs in sizes {
            let img = format!("s{cs}.qcow2");
            must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "-o", &format!("cluster_size={cs}"), &img, "6147k"]), "create");
            // A compressed write covers whole clusters: 2M..4M with 2 MiB clusters.
            let (compressed, at3m) = if cs == "2M" {
                ("write -c -P 7 2M 2M", "write -P 6 4M 4k")
            } else {
                ("write -c -P 7 2M 64k", "write -P 6 3M 4k")
            };
            io(
                dir,
                &img,
                &[
                    "write -P 1 4M 1M",
                    "write -P 2 0 64k",
                    "write -P 0 256k 64k",
                    "write -P 3 1000k 8k",
                    "write -P 4 5M 1M",
                    "write -P 5 6M 3k",
                    at3m,
                    compressed,
                ],
            );
        }
    });
    for cs in sizes {
        let src = format!("s{cs}.qcow2");
        for (fmt, out) in [("raw", format!("o{cs}.raw")), ("qcow2", format!("o{cs}.qcow2"))] {
            assert!(p.both(&["convert", "-f", "qcow2", "-O", fmt, &src, &out]), "{src} -> {fmt}");
            p.same_result(&out, fmt, &format!("{src} -> {fmt}"));
            let (q, b) = (std::fs::read(p.q.join(&out)).unwrap(), std::fs::read(p.b.join(&out)).unwrap());
            assert!(q == b, "{src} -> {fmt}: the files differ");
        }
    }
}
