//! basalt-img against qemu-img (info, create, map, check, compare, resize, dd).
//!
//! Golden tests run the same command through qemu-img and basalt-img, each in its own scratch
//! directory holding identical images (relative filenames, so nothing needs filtering but the
//! program name), and compare stdout, stderr, the exit code and, where the command writes, the
//! files it leaves (bytes, size, allocated blocks, `qemu-img map`). Interop tests check images
//! one tool makes with the other: basalt-created images compare identical to qemu-img-created
//! ones and have the same map and info; images basalt resizes or copies read as qemu-img's.
//!
//! The binary must be built first (`cargo build -p basalt-tools --bins`); qemu-img must be
//! installed: a missing peer is a failure.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};

use basalt_tests::{peer, run, stderr, stdout, tool};

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

/// Deterministic bytes (xorshift), so both scratch directories get the same images.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write_at(path: &Path, off: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(path).expect("open image");
    f.write_all_at(data, off).expect("write image");
}

fn sparse(path: &Path, size: u64) {
    let f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(path).expect("create image");
    f.set_len(size).expect("size image");
}

/// The images every golden test starts from.
fn setup(dir: &Path) {
    // s.raw: 10 MiB, data in several places with holes between, the last block used.
    let s = dir.join("s.raw");
    sparse(&s, 10 << 20);
    write_at(&s, 1 << 20, b"abc");
    write_at(&s, 40 * 65536, &pattern(3 * 65536, 1));
    write_at(&s, (10 << 20) - 4096, &pattern(4096, 2));
    // s2.raw: s.raw with one byte changed in a hole.
    std::fs::copy(&s, dir.join("s2.raw")).expect("copy");
    write_at(&dir.join("s2.raw"), 5_000_000, b"X");
    // full.raw: s.raw's content, fully allocated.
    std::fs::write(dir.join("full.raw"), std::fs::read(&s).expect("read")).expect("write");
    // Size mismatches: a1 (1 MiB of zeroes), a2 (2 MiB of zeroes), a3 (2 MiB, one byte set past 1 MiB).
    sparse(&dir.join("a1.raw"), 1 << 20);
    sparse(&dir.join("a2.raw"), 2 << 20);
    sparse(&dir.join("a3.raw"), 2 << 20);
    write_at(&dir.join("a3.raw"), 1_500_000, b"X");
    // Not a multiple of 512 (QEMU sees 1024 bytes).
    std::fs::write(dir.join("odd.img"), pattern(1000, 3)).expect("write");
    // Same data, one allocated to the end and one with a trailing hole.
    let d = pattern(4096, 4);
    let mut ea = d.clone();
    ea.extend(vec![0u8; 4096]);
    std::fs::write(dir.join("ea.raw"), ea).expect("write");
    std::fs::write(dir.join("eb.raw"), &d).expect("write");
    std::fs::OpenOptions::new().write(true).open(dir.join("eb.raw")).and_then(|f| f.set_len(8192)).expect("size");
    // r.raw: what qemu-img create makes.
    let o = run(peer("qemu-img").current_dir(dir).args(["create", "-q", "-f", "raw", "r.raw", "1M"]));
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A file left behind, as compared between the two runs.
#[derive(Debug, PartialEq)]
struct FileState {
    name: String,
    len: u64,
    blocks: u64,
    data: Vec<u8>,
    map: String,
}

fn file_state(dir: &Path, name: &str) -> Option<FileState> {
    let p = dir.join(name);
    let meta = std::fs::metadata(&p).ok()?;
    let map = run(peer("qemu-img").current_dir(dir).args(["map", "--output=json", "-f", "raw", name]));
    Some(FileState {
        name: name.to_string(),
        len: meta.len(),
        blocks: meta.blocks(),
        data: std::fs::read(&p).ok()?,
        map: stdout(&map),
    })
}

/// Run `args` through both tools on fresh copies of the images; compare what they print and
/// return, and the state of `files` afterwards.
fn golden(args: &[&str], files: &[&str]) {
    let q = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    setup(q.path());
    setup(b.path());
    let qo = outcome(&run(peer("qemu-img").current_dir(q.path()).args(args)));
    let bo = outcome(&run(Command::new(tool("basalt-img")).current_dir(b.path()).args(args)));
    assert_eq!(bo, qo, "basalt-img {args:?} differs from qemu-img");
    for f in files {
        let (qs, bs) = (file_state(q.path(), f), file_state(b.path(), f));
        assert_eq!(bs.is_some(), qs.is_some(), "{f} after {args:?}: exists for one tool only");
        if let (Some(qs), Some(bs)) = (qs, bs) {
            assert!(
                qs == bs,
                "{f} after {args:?} differs: qemu-img {} bytes/{} blocks, map {}; basalt-img {} bytes/{} blocks, map {}",
                qs.len,
                qs.blocks,
                qs.map,
                bs.len,
                bs.blocks,
                bs.map
            );
        }
    }
}

fn golden_all(cases: &[&str], files: &[&str]) {
    for c in cases {
        let args: Vec<&str> = c.split_whitespace().collect();
        golden(&args, files);
    }
}

#[test]
fn info_matches_qemu_img() {
    golden_all(
        &[
            "info s.raw",
            "info --output=json s.raw",
            "info -f raw --output=json s.raw",
            "info --output json -U odd.img",
            "info odd.img",
            "info null-co://",
            "info --output=json null-co://",
            "info --image-opts driver=raw,file.driver=null-co,file.size=4096",
            "info --output=json --image-opts driver=raw,file.driver=null-co,file.size=4096",
            "info --output=json --image-opts driver=raw,file.driver=null-co,file.read-zeroes=on",
            "info --image-opts driver=raw,offset=512,size=1024,file.filename=s.raw",
            "info --backing-chain s.raw",
            "info --backing-chain --output=json s.raw",
            "info -f file --output=json r.raw",
            "info -f file r.raw",
            "info --help",
        ],
        &[],
    );
}

#[test]
fn map_matches_qemu_img() {
    golden_all(
        &[
            "map s.raw",
            "map --output=json s.raw",
            "map --output=json s2.raw",
            "map --output=json full.raw",
            "map -s 1000 -l 2000000 --output=json s.raw",
            "map -s 1000 -l 2000000 s.raw",
            "map --output json --start-offset 3M --max-length 7M s.raw",
            "map -s 4097 -l 10 --output=json s.raw",
            "map -s 20M --output=json s.raw",
            "map -l 0 --output=json s.raw",
            "map --output=json odd.img",
            "map odd.img",
            "map --output=json eb.raw",
            "map r.raw",
            "map --output=json null-co://",
            "map null-co://",
            "map --output=json --image-opts driver=raw,file.driver=null-co,file.read-zeroes=on",
            "map --image-opts driver=raw,offset=1M,file.filename=s.raw",
            "map -f file --output=json s.raw",
            "map -f file s.raw",
            "map --image-opts driver=file,filename=s.raw",
        ],
        &[],
    );
}

#[test]
fn check_matches_qemu_img() {
    golden_all(
        &[
            "check r.raw",
            "check --output=json r.raw",
            "check -q r.raw",
            "check -r leaks r.raw",
            "check -r all --output=json r.raw",
            "check -r bad r.raw",
            "check -U -r all r.raw",
            "check -T bogus r.raw",
            "check null-co://",
            "check",
        ],
        &[],
    );
}

#[test]
fn compare_matches_qemu_img() {
    golden_all(
        &[
            "compare s.raw s.raw",
            "compare -s s.raw s.raw",
            "compare s.raw s2.raw",
            "compare s2.raw s.raw",
            "compare -q s.raw s2.raw",
            "compare s.raw full.raw",
            "compare -s s.raw full.raw",
            "compare a1.raw a2.raw",
            "compare -s a1.raw a2.raw",
            "compare a1.raw a3.raw",
            "compare a3.raw a1.raw",
            "compare ea.raw eb.raw",
            "compare -s ea.raw eb.raw",
            "compare -p s.raw s.raw",
            "compare -p s.raw s2.raw",
            "compare -p a3.raw a1.raw",
            "compare -f raw -F raw odd.img odd.img",
            "compare null-co:// r.raw",
            "compare -s null-co:// null-co://",
            "compare --image-opts driver=raw,file.driver=null-co,file.size=1M driver=raw,file.filename=a1.raw",
            "compare a1.raw nope.raw",
            "compare -T bogus a1.raw a1.raw",
            "compare a1.raw",
        ],
        &[],
    );
}

#[test]
fn create_matches_qemu_img() {
    golden_all(
        &[
            "create c.raw 1G",
            "create -f raw -o preallocation=full c.raw 1M",
            "create -f raw -o preallocation=falloc c.raw 3M",
            "create -o preallocation=off,nocow=on c.raw 1M",
            "create -o extent_size_hint=1M,preallocation=falloc,nocow=off c.raw 1M",
            "create -o size=1.5k c.raw",
            "create -q c.raw 100",
            "create c.raw 0x100",
            "create c.raw 0",
            "create -o help",
            "create -o help c.raw",
            "create -o preallocation=metadata c.raw 1M",
            "create -o preallocation=xx c.raw 1M",
            "create -o bogus=1 c.raw 1M",
            "create -o size=2M c.raw 3M",
            "create -o ,size=1M c.raw",
            "create c.raw",
            "create c.raw 1M extra",
            "create -b base.raw c.raw 1M",
            "create -F raw c.raw 1M",
            "create -f file c.raw 1M",
            "create -f null-co c.raw 1M",
            "create null-co:// 1M",
        ],
        &["c.raw"],
    );
}

#[test]
fn resize_matches_qemu_img() {
    golden_all(
        &[
            "resize r.raw 2M",
            "resize -f raw r.raw +1M",
            "resize -f raw r.raw -512K",
            "resize -f raw --shrink r.raw -512K",
            "resize -f raw --shrink r.raw -- -512K",
            "resize -f raw --shrink r.raw 1000",
            "resize -f raw r.raw +100",
            "resize -f raw --preallocation=full r.raw 3M",
            "resize -f raw --preallocation=falloc r.raw 3M",
            "resize -f raw --preallocation=metadata r.raw 3M",
            "resize -f raw --preallocation=bogus r.raw 3M",
            "resize -f raw --shrink --preallocation=full r.raw 512K",
            "resize -f raw r.raw 0",
            "resize -f raw r.raw +0",
            "resize -f raw r.raw 9E",
            "resize -f raw r.raw +16E",
            "resize -q r.raw 4M",
            "resize -f raw r.raw -1M -q",
            "resize -f raw r.raw 4M 5M",
            "resize null-co:// 2G",
            "resize r.raw",
        ],
        &["r.raw"],
    );
}

#[test]
fn dd_matches_qemu_img() {
    golden_all(
        &[
            "dd if=s.raw of=o.raw",
            "dd if=s.raw of=o.raw bs=1M count=3",
            "dd if=s.raw of=o.raw bs=1M skip=2 count=3",
            "dd if=s.raw of=o.raw bs=64k skip=39 count=45",
            "dd if=s.raw of=o.raw bs=1000 count=3",
            "dd if=s.raw of=o.raw bs=7 count=11 skip=3",
            "dd if=s.raw of=o.raw skip=20479",
            "dd if=s.raw of=o.raw bs=1M skip=100000",
            "dd if=odd.img of=o.raw",
            "dd -f raw -O raw if=s.raw of=o.raw count=010",
            "dd --image-opts if=driver=raw,file.driver=null-co,file.read-zeroes=on,file.size=5000 of=o.raw",
            "dd if=s.raw of=o.raw osize=1M",
            "dd if=s.raw of=o.raw bs=0",
            "dd if=s.raw of=o.raw count=1k",
            "dd -O foo if=s.raw of=o.raw",
            "dd if=s.raw",
        ],
        &["o.raw"],
    );
}

#[test]
fn golden_errors() {
    golden_all(
        &[
            // Missing file, for each subcommand that opens one.
            "info nope.raw",
            "map nope.raw",
            "check nope.raw",
            "compare nope.raw s.raw",
            "resize nope.raw 1M",
            "dd if=nope.raw of=o.raw",
            // Bad options.
            "info -z s.raw",
            "info --bogus s.raw",
            "map --output=xml s.raw",
            "create -z c.raw 1M",
            "resize -f raw --shrink -1M r.raw",
            // Bad sizes.
            "create c.raw 1X",
            "create c.raw 16E",
            "create -o size=1X c.raw",
            "create -o size=16E c.raw",
            "resize -f raw r.raw 1X",
            "map -s 1X s.raw",
            "dd if=s.raw of=o.raw bs=1X",
            // Unknown formats.
            "info -f foo s.raw",
            "create -f foo c.raw 1M",
            "compare -F foo s.raw s.raw",
            // Usage.
            "info",
            "compare s.raw",
            "info --image-opts -f raw s.raw",
        ],
        &["c.raw", "o.raw", "r.raw"],
    );
}

/// Images basalt-img creates are what qemu-img creates: identical content, the same map and
/// allocation, the same `qemu-img info`.
#[test]
fn create_interop_with_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for prealloc in ["off", "falloc", "full"] {
        for size in ["1M", "100", "5000", "3G"] {
            if prealloc != "off" && size == "3G" {
                continue;
            }
            let o = run(peer("qemu-img")
                .current_dir(d)
                .args(["create", "-q", "-o"])
                .arg(format!("preallocation={prealloc}"))
                .args(["q.raw", size]));
            assert!(o.status.success(), "{}", stderr(&o));
            let o = run(Command::new(tool("basalt-img"))
                .current_dir(d)
                .args(["create", "-q", "-o"])
                .arg(format!("preallocation={prealloc}"))
                .args(["b.raw", size]));
            assert!(o.status.success(), "{}", stderr(&o));
            let o = run(peer("qemu-img").current_dir(d).args(["compare", "-s", "q.raw", "b.raw"]));
            assert_eq!(stdout(&o), "Images are identical.\n", "{prealloc} {size}: {}", stderr(&o));
            let (q, b) = (file_state(d, "q.raw").expect("q.raw"), file_state(d, "b.raw").expect("b.raw"));
            assert_eq!((b.len, b.blocks, &b.map), (q.len, q.blocks, &q.map), "{prealloc} {size}");
            let qi = run(peer("qemu-img").current_dir(d).args(["info", "--output=json", "q.raw"]));
            let bi = run(peer("qemu-img").current_dir(d).args(["info", "--output=json", "b.raw"]));
            assert_eq!(stdout(&bi).replace("b.raw", "q.raw"), stdout(&qi), "{prealloc} {size}");
        }
    }
}

/// qemu-img reads what basalt-img resizes and copies; basalt-img compare agrees with qemu-img
/// compare on both tools' outputs.
#[test]
fn resize_dd_and_compare_both_ways() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    setup(d);
    let basalt = |args: &[&str]| run(Command::new(tool("basalt-img")).current_dir(d).args(args));
    let qemu = |args: &[&str]| run(peer("qemu-img").current_dir(d).args(args));
    // Resize with basalt, check with qemu-img; and the other way round.
    std::fs::copy(d.join("s.raw"), d.join("rb.raw")).expect("copy");
    std::fs::copy(d.join("s.raw"), d.join("rq.raw")).expect("copy");
    assert_eq!(stdout(&basalt(&["resize", "-f", "raw", "rb.raw", "+3M"])), "Image resized.\n");
    assert_eq!(stdout(&qemu(&["resize", "-f", "raw", "rq.raw", "+3M"])), "Image resized.\n");
    let info = qemu(&["info", "--output=json", "-f", "raw", "rb.raw"]);
    assert!(stdout(&info).contains("\"virtual-size\": 13631488,"), "{}", stdout(&info));
    for (a, b) in [("rb.raw", "rq.raw"), ("rq.raw", "rb.raw"), ("s.raw", "rb.raw")] {
        assert_eq!(qemu(&["compare", a, b]).status.code(), basalt(&["compare", a, b]).status.code(), "compare {a} {b}");
    }
    assert_eq!(basalt(&["compare", "-s", "s.raw", "rb.raw"]).status.code(), Some(1));
    assert_eq!(basalt(&["compare", "rb.raw", "rq.raw"]).status.code(), Some(0));
    assert_eq!(stdout(&basalt(&["resize", "-f", "raw", "--shrink", "rb.raw", "-3M"])), "Image resized.\n");
    // (Without -s: the copies' allocation is up to the file system's copy_file_range.)
    assert_eq!(stdout(&qemu(&["compare", "s.raw", "rb.raw"])), "Images are identical.\n");
    assert_eq!(std::fs::metadata(d.join("rb.raw")).expect("stat").len(), 10 << 20);
    // Shrink into the data: qemu-img sees the cut.
    assert_eq!(basalt(&["resize", "-f", "raw", "--shrink", "rb.raw", "2600K"]).status.code(), Some(0));
    assert_eq!(std::fs::metadata(d.join("rb.raw")).expect("stat").len(), 2600 * 1024);
    let o = qemu(&["compare", "s.raw", "rb.raw"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert_eq!(basalt(&["compare", "s.raw", "rb.raw"]).status.code(), Some(1));
    // dd with basalt: qemu-img compare finds the copy identical to the source range.
    assert_eq!(basalt(&["dd", "if=s.raw", "of=ob.raw", "bs=64k", "skip=16"]).status.code(), Some(0));
    assert_eq!(qemu(&["dd", "if=s.raw", "of=oq.raw", "bs=64k", "skip=16"]).status.code(), Some(0));
    assert_eq!(std::fs::read(d.join("ob.raw")).expect("read"), std::fs::read(d.join("oq.raw")).expect("read"));
    let o = qemu(&["compare", "-s", "ob.raw", "oq.raw"]);
    assert_eq!(stdout(&o), "Images are identical.\n");
    let s = std::fs::read(d.join("s.raw")).expect("read");
    assert_eq!(std::fs::read(d.join("ob.raw")).expect("read"), s[16 * 65536..]);
    // Mismatch offsets agree with qemu-img, both orders, across chunk boundaries.
    for off in [0u64, 511, 512, 2 * 1024 * 1024 - 1, 2 * 1024 * 1024 + 4096, 9 * 1024 * 1024 + 17] {
        std::fs::copy(d.join("full.raw"), d.join("m.raw")).expect("copy");
        let cur = std::fs::read(d.join("m.raw")).expect("read")[off as usize];
        write_at(&d.join("m.raw"), off, &[cur ^ 0x5a]);
        for (a, b) in [("s.raw", "m.raw"), ("m.raw", "s.raw")] {
            let (qo, bo) = (outcome(&qemu(&["compare", a, b])), outcome(&basalt(&["compare", a, b])));
            assert_eq!(bo, qo, "mismatch at {off}");
            assert_eq!(bo.code, Some(1));
        }
    }
}

/// Hold an OFD read lock on `bytes` of `path` (QEMU's lock bytes: 100+i "uses permission i",
/// 200+i "denies permission i") while the returned file is open.
fn hold_locks(path: &Path, bytes: &[i64]) -> std::fs::File {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).expect("open for locking");
    for &b in bytes {
        // SAFETY: flock is plain old data; all-zero is a valid value.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_RDLCK as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_start = b;
        fl.l_len = 1;
        // SAFETY: F_OFD_SETLK on an open descriptor with a valid flock pointer.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        assert_eq!(r, 0, "lock byte {b}");
    }
    f
}

/// Lock conflicts with another holder give qemu-img's outcome: info needs no permission, map
/// needs consistent reads, create takes write and resize and denies resize.
#[test]
fn image_locks_as_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    setup(d);
    let cases: &[(&[i64], &[&str], i32)] = &[
        (&[200], &["info", "r.raw"], 0),
        (&[200], &["map", "r.raw"], 1),
        (&[200], &["create", "r.raw", "1M"], 0),
        (&[201], &["create", "r.raw", "1M"], 1),
        (&[201], &["resize", "-f", "raw", "r.raw", "2M"], 1),
        (&[103], &["create", "r.raw", "1M"], 1),
        (&[103], &["compare", "r.raw", "r.raw"], 0),
        (&[100, 101, 102, 103], &["dd", "if=r.raw", "of=o.raw"], 0),
        (&[200, 201, 202, 203], &["info", "--output=json", "r.raw"], 0),
    ];
    for (bytes, args, code) in cases {
        let holder = hold_locks(&d.join("r.raw"), bytes);
        let qo = outcome(&run(peer("qemu-img").current_dir(d).args(*args)));
        let bo = outcome(&run(Command::new(tool("basalt-img")).current_dir(d).args(*args)));
        drop(holder);
        assert_eq!(qo.code, Some(*code), "qemu-img {args:?} with bytes {bytes:?} locked: {}", qo.err);
        assert_eq!(bo, qo, "basalt-img {args:?} with bytes {bytes:?} locked");
    }
}
