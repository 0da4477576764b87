//! qcow2 external data files (`data_file`, `data_file_raw`) against QEMU's tools.
//!
//! - Images qemu-img creates with a data file (raw and not) and qemu-io writes read byte-exact
//!   through basalt-io (`read -P`) and compare equal under `basalt-img compare` to their raw
//!   conversion; `info` (human, JSON) and `map --output=json` print what qemu-img prints.
//! - Images basalt-img creates are byte-identical to qemu-img's (qcow2 file and data file);
//!   after the same basalt-io / qemu-io operations they are clean under `qemu-img check`,
//!   identical under `qemu-img compare`, metadata byte-identical, `info`/`map` the same, and a
//!   raw data file compares equal (as raw) to the image's content.
//! - Errors as QEMU words them: `data_file_raw` without `data_file`, compat 0.10, a missing data
//!   file; compressed writes and snapshots are refused.
//! - Encryption (LUKS, AES) with a data file, raw or not, both ways: QEMU-written images
//!   decrypt to qemu-img's bytes in basalt-img and read right in basalt-io; Basalt-created ones
//!   are QEMU's files outside the random LUKS area, before and after the same writes, clean
//!   under `qemu-img check`, read right in qemu-io, with the same `info`/`map` JSON; the
//!   ciphertext sits in the data file at guest offsets (the same sectors as QEMU's hold data,
//!   none of it plaintext).
//! - `preallocation=metadata|falloc|full` with a data file, and `resize` (with and without
//!   `--preallocation`, growing and shrinking, aligned and unaligned sizes) of data-file images:
//!   the qcow2 file byte-identical to qemu-img's, the data file of the same length, allocation
//!   map and preallocation, `map`/`info`/`check` the same.
//!
//! The binaries must be built first (`cargo build -p basalt-tools --bins`); qemu-img and
//! qemu-io must be installed: a missing peer is a failure.

use std::path::Path;
use std::process::{Command, Output};

use basalt_tests::{must, peer, run, stderr, stdout, tool};

fn qemu_img(dir: &Path, args: &[&str]) -> Output {
    run(peer("qemu-img").current_dir(dir).args(args))
}

fn qemu_io(dir: &Path, args: &[&str]) -> Output {
    run(peer("qemu-io").current_dir(dir).args(args))
}

fn basalt_img(dir: &Path, args: &[&str]) -> Output {
    run(Command::new(tool("basalt-img")).current_dir(dir).args(args))
}

fn basalt_io(dir: &Path, args: &[&str]) -> Output {
    run(Command::new(tool("basalt-io")).current_dir(dir).args(args))
}

/// (exit code, stdout, stderr) with the program name normalised.
fn outcome(o: &Output) -> (Option<i32>, String, String) {
    let n = |s: String| s.replace("qemu-img", "basalt-img");
    (o.status.code(), n(stdout(o)), n(stderr(o)))
}

/// The same qemu-img command through both tools on the same files must print the same.
fn same_output(dir: &Path, args: &[&str]) {
    let q = outcome(&qemu_img(dir, args));
    let b = outcome(&basalt_img(dir, args));
    assert_eq!(b, q, "basalt-img {args:?}");
}

/// Guest writes, zero writes (with and without unmap), partial and whole discards.
const OPS: &[&str] = &[
    "write -P 0xaa 0 64k",
    "write -z 128k 64k",
    "write -P 1 1M 4k",
    "write -P 2 70k 3k",
    "write -z 1M 512",
    "write -z -u 2M 64k",
    "write -P 5 3M 128k",
    "discard 3M 64k",
    "write -P 6 5M 200k",
    "write -z 0 64k",
    "discard 1M 512",
    "write -P 7 8388096 512",
];

/// What the image reads as after `OPS`, checked with `read -P`.
const READS: &[&str] = &[
    "read -P 0 0 64k",
    "read -P 0 64k 6k",
    "read -P 2 70k 3k",
    "read -P 0 73k 55k",
    "read -P 0 128k 64k",
    "read -P 0 1M 512",
    "read -P 1 1049088 3584",
    "read -P 0 2M 64k",
    "read -P 0 3M 64k",
    "read -P 5 3211264 64k",
    "read -P 6 5M 200k",
    "read -P 7 8388096 512",
];

fn io_args<'a>(cmds: &[&'a str], img: &'a str) -> Vec<&'a str> {
    let mut v = Vec::new();
    for c in cmds {
        v.push("-c");
        v.push(c);
    }
    v.push(img);
    v
}

fn create_args(raw: bool, img: &str) -> Vec<String> {
    let o = if raw { "data_file=d.raw,data_file_raw=on" } else { "data_file=d.raw" };
    ["create", "-f", "qcow2", "-o", o, img, "8M"].iter().map(|s| s.to_string()).collect()
}

#[test]
fn qemu_made_images_read_exact() {
    for raw in [false, true] {
        let d = tempfile::tempdir().expect("tempdir");
        let dir = d.path();
        let a = create_args(raw, "q.qcow2");
        must(&qemu_img(dir, &a.iter().map(String::as_str).collect::<Vec<_>>()), "qemu-img create");
        must(&qemu_io(dir, &io_args(OPS, "q.qcow2")), "qemu-io");
        let o = basalt_io(dir, &io_args(READS, "q.qcow2"));
        must(&o, "basalt-io read");
        assert!(!stdout(&o).contains("failed"), "raw={raw}: {}", stdout(&o));
        must(&qemu_img(dir, &["convert", "-O", "raw", "q.qcow2", "ref.raw"]), "qemu-img convert");
        let o = basalt_img(dir, &["compare", "-f", "qcow2", "-F", "raw", "q.qcow2", "ref.raw"]);
        must(&o, "basalt-img compare");
        for args in [
            &["info", "q.qcow2"][..],
            &["info", "--output=json", "q.qcow2"],
            &["map", "--output=json", "q.qcow2"],
            &["map", "q.qcow2"],
            &["check", "q.qcow2"],
        ] {
            same_output(dir, args);
        }
    }
}

#[test]
fn basalt_made_images_match_qemu() {
    for raw in [false, true] {
        let q = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let a = create_args(raw, "i.qcow2");
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let qo = outcome(&qemu_img(q.path(), &a));
        let bo = outcome(&basalt_img(b.path(), &a));
        assert_eq!(bo, qo, "create raw={raw}");
        let read = |d: &Path, f: &str| std::fs::read(d.join(f)).expect("read");
        assert!(read(q.path(), "i.qcow2") == read(b.path(), "i.qcow2"), "raw={raw}: created image differs from qemu-img's");
        assert_eq!(std::fs::metadata(b.path().join("d.raw")).expect("data file").len(), 8 << 20, "data file size");
        must(&qemu_io(q.path(), &io_args(OPS, "i.qcow2")), "qemu-io");
        must(&basalt_io(b.path(), &io_args(OPS, "i.qcow2")), "basalt-io");
        let o = qemu_img(b.path(), &["check", "i.qcow2"]);
        must(&o, "qemu-img check");
        assert!(stdout(&o).contains("No errors were found"), "{}", stdout(&o));
        let qi = q.path().join("i.qcow2");
        let o = qemu_img(b.path(), &["compare", qi.to_str().expect("utf-8"), "i.qcow2"]);
        must(&o, "qemu-img compare");
        let o = qemu_io(b.path(), &io_args(READS, "i.qcow2"));
        must(&o, "qemu-io read");
        assert!(!stdout(&o).contains("failed"), "raw={raw}: {}", stdout(&o));
        // Same operations, same metadata (allocation 1:1 in the data file, same L2 entries).
        assert!(read(q.path(), "i.qcow2") == read(b.path(), "i.qcow2"), "raw={raw}: metadata differs from QEMU's");
        for args in [&["info", "--output=json", "i.qcow2"][..], &["info", "i.qcow2"], &["map", "--output=json", "i.qcow2"]] {
            let qo = outcome(&qemu_img(q.path(), args));
            let bo = outcome(&basalt_img(b.path(), args));
            assert_eq!(bo, qo, "basalt-img {args:?} raw={raw}");
        }
        if raw {
            let o = qemu_img(b.path(), &["compare", "-f", "raw", "-F", "qcow2", "d.raw", "i.qcow2"]);
            must(&o, "raw data file compare");
        }
        // The data file too: the same bytes at the same (guest) offsets.
        assert!(read(q.path(), "d.raw") == read(b.path(), "d.raw"), "raw={raw}: data file differs from QEMU's");
    }
}

#[test]
fn errors_and_refusals_as_qemu() {
    let q = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    for args in [
        &["create", "-f", "qcow2", "-o", "data_file_raw=on", "x.qcow2", "1M"][..],
        &["create", "-f", "qcow2", "-o", "data_file=x.raw,compat=0.10", "x.qcow2", "1M"],
    ] {
        let qo = outcome(&qemu_img(q.path(), args));
        let bo = outcome(&basalt_img(b.path(), args));
        assert_eq!(bo, qo, "basalt-img {args:?}");
        assert_ne!(bo.0, Some(0));
    }
    let dir = b.path();
    must(&basalt_img(dir, &["create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "i.qcow2", "1M"]), "create");
    // Refused as QEMU refuses them.
    same_output(dir, &["snapshot", "-c", "s1", "i.qcow2"]);
    let o = basalt_io(dir, &["-c", "write -c 0 64k", "i.qcow2"]);
    assert!(stdout(&o).contains("Operation not supported") || stderr(&o).contains("Operation not supported"), "{o:?}");
    // A missing data file: info still works (it opens none); I/O fails with QEMU's words.
    std::fs::rename(dir.join("d.raw"), dir.join("gone.raw")).expect("rename");
    same_output(dir, &["info", "i.qcow2"]);
    same_output(dir, &["check", "i.qcow2"]);
    same_output(dir, &["map", "--output=json", "i.qcow2"]);
    // The data file given as an option instead.
    let o = basalt_io(
        dir,
        &["-c", "read -P 0 0 64k", "--image-opts", "driver=qcow2,file.filename=i.qcow2,data-file.filename=gone.raw"],
    );
    must(&o, "basalt-io with data-file.filename");
    let q = qemu_io(
        dir,
        &["-c", "read -P 0 0 64k", "--image-opts", "driver=qcow2,file.filename=i.qcow2,data-file.filename=gone.raw"],
    );
    must(&q, "qemu-io with data-file.filename");
}

// Encryption with a data file, and preallocation / resize of data-file images.

const SECRET: &str = "secret,id=sec0,data=abc";

/// Encryption and data-file variants: LUKS and the legacy AES, raw data file or not.
const ENC_VARIANTS: &[&str] = &[
    "encrypt.format=luks,encrypt.iter-time=10,encrypt.key-secret=sec0,data_file=d.raw",
    "encrypt.format=luks,encrypt.iter-time=10,encrypt.key-secret=sec0,data_file=d.raw,data_file_raw=on",
    "encrypt.format=aes,encrypt.key-secret=sec0,data_file=d.raw",
    "encrypt.format=aes,encrypt.key-secret=sec0,data_file=d.raw,data_file_raw=on",
];

const KEYED: &str = "driver=qcow2,file.filename=i.qcow2,encrypt.key-secret=sec0";

fn enc_create(o: &str) -> Vec<&str> {
    vec!["create", "-f", "qcow2", "--object", SECRET, "-o", o, "i.qcow2", "8M"]
}

/// `cmds` through qemu-io or basalt-io on the keyed image; every command must succeed.
fn enc_io(dir: &Path, basalt_side: bool, cmds: &[&str]) {
    let mut args = vec!["--object", SECRET, "--image-opts", KEYED];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let o = if basalt_side { basalt_io(dir, &args) } else { qemu_io(dir, &args) };
    must(&o, &format!("io {cmds:?}"));
    let out = stdout(&o) + &stderr(&o);
    assert!(!out.contains("failed") && !out.contains("error"), "basalt={basalt_side}: {out}");
}

/// The decrypted content, converted to raw by qemu-img or basalt-img.
fn enc_plain(dir: &Path, basalt_side: bool) -> Vec<u8> {
    let out = format!("plain.{basalt_side}.raw");
    let args = ["convert", "--object", SECRET, "--image-opts", KEYED, "-O", "raw", out.as_str()];
    must(&if basalt_side { basalt_img(dir, &args) } else { qemu_img(dir, &args) }, "convert to raw");
    std::fs::read(dir.join(&out)).expect("read converted")
}

/// What `OPS` leave readable in every variant (a raw data file maps every cluster from the
/// start, so never written parts of an encrypted one read as the decryption of zeroes).
const ENC_READS: &[&str] = &[
    "read -P 0 0 64k",
    "read -P 2 70k 3k",
    "read -P 0 128k 64k",
    "read -P 5 3211264 64k",
    "read -P 6 5M 200k",
    "read -P 7 8388096 512",
];

/// The LUKS area (offset, length) from an image's crypto header extension.
fn luks_area(img: &[u8]) -> Option<(usize, usize)> {
    let be32 = |o: usize| u32::from_be_bytes(img[o..o + 4].try_into().expect("4 bytes")) as usize;
    let be64 = |o: usize| u64::from_be_bytes(img[o..o + 8].try_into().expect("8 bytes")) as usize;
    let mut o = be32(100);
    while o + 8 <= 1 << be32(20) {
        let (t, l) = (be32(o), be32(o + 4));
        match t {
            0 => return None,
            0x0537_be77 => return Some((be64(o + 8), be64(o + 16))),
            _ => o += 8 + l.next_multiple_of(8),
        }
    }
    None
}

/// Two encrypted images are the same file but for their (random) LUKS areas.
fn same_but_luks(a: &Path, b: &Path, what: &str) {
    let (x, y) = (std::fs::read(a).expect("read"), std::fs::read(b).expect("read"));
    assert_eq!(x.len(), y.len(), "{what}: file length");
    let area = luks_area(&x);
    assert_eq!(area, luks_area(&y), "{what}: LUKS header place");
    let outside = |i: &usize| area.is_none_or(|(o, l)| *i < o || *i >= o + l);
    if let Some(i) = (0..x.len()).filter(outside).find(|&i| x[i] != y[i]) {
        panic!("{what}: the images differ at {i:#x}, outside the LUKS area {area:?}");
    }
}

/// `info --output=json` without what is random or timed in a LUKS header.
fn info_json(dir: &Path, basalt_side: bool) -> serde_json::Value {
    let args = ["info", "--output=json", "--object", SECRET, "--image-opts", KEYED];
    let o = if basalt_side { basalt_img(dir, &args) } else { qemu_img(dir, &args) };
    must(&o, "info");
    let mut v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("info JSON");
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                for k in ["uuid", "iters", "master-key-iters"] {
                    m.remove(k);
                }
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut v);
    v
}

/// The data file holds ciphertext at guest offsets: where `OPS` wrote pattern 6 (5M, 200k)
/// it is neither the plaintext nor zeroes; without a raw data file, a never written cluster
/// (7M) is still a hole of zeroes.
fn ciphertext_in_place(dir: &Path, raw: bool, what: &str) {
    let d = std::fs::read(dir.join("d.raw")).expect("data file");
    let at = &d[5 << 20..(5 << 20) + 200 * 1024];
    assert!(at.chunks(512).all(|s| s.iter().any(|&b| b != 6) && s.iter().any(|&b| b != 0)), "{what}: plaintext or zeroes at 5M");
    if !raw {
        assert!(d[7 << 20..(7 << 20) + 65536].iter().all(|&b| b == 0), "{what}: data written at 7M");
    }
}

#[test]
fn encrypted_qemu_images_read_in_basalt() {
    for o in ENC_VARIANTS {
        let raw = o.contains("data_file_raw");
        let d = tempfile::tempdir().expect("tempdir");
        let dir = d.path();
        must(&qemu_img(dir, &enc_create(o)), "qemu-img create");
        enc_io(dir, false, OPS);
        enc_io(dir, true, ENC_READS);
        let (q, b) = (enc_plain(dir, false), enc_plain(dir, true));
        assert!(q == b, "{o}: basalt-img decrypts to other bytes than qemu-img");
        for args in [
            &["info", "i.qcow2"][..],
            &["info", "--output=json", "i.qcow2"],
            &["info", "--output=json", "--object", SECRET, "--image-opts", KEYED],
            &["map", "--output=json", "--object", SECRET, "--image-opts", KEYED],
            &["check", "--object", SECRET, "--image-opts", KEYED],
        ] {
            same_output(dir, args);
        }
        ciphertext_in_place(dir, raw, o);
    }
}

#[test]
fn encrypted_basalt_images_match_qemu() {
    for o in ENC_VARIANTS {
        let raw = o.contains("data_file_raw");
        let (q, b) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
        let (qd, bd) = (q.path(), b.path());
        let qo = outcome(&qemu_img(qd, &enc_create(o)));
        let bo = outcome(&basalt_img(bd, &enc_create(o)));
        assert_eq!(bo, qo, "create {o}");
        same_but_luks(&qd.join("i.qcow2"), &bd.join("i.qcow2"), &format!("created {o}"));
        let len = |d: &Path| std::fs::metadata(d.join("d.raw")).expect("data file").len();
        assert_eq!(len(bd), len(qd), "{o}: data file size");
        enc_io(qd, false, OPS);
        enc_io(bd, true, OPS);
        // QEMU reads what Basalt wrote as what it wrote itself.
        enc_io(bd, false, ENC_READS);
        let check = qemu_img(bd, &["check", "--object", SECRET, "--image-opts", KEYED]);
        must(&check, "qemu-img check");
        assert!(stdout(&check).contains("No errors were found"), "{o}: {}", stdout(&check));
        if !raw {
            // Raw data files read never written parts as decrypted zeroes, which depend on
            // the (random) key: only images without one compare whole.
            assert!(enc_plain(bd, false) == enc_plain(qd, false), "{o}: content differs from QEMU's");
        }
        assert!(enc_plain(bd, false) == enc_plain(bd, true), "{o}: basalt-img and qemu-img decrypt differently");
        // Same operations, same metadata, same reports.
        same_but_luks(&qd.join("i.qcow2"), &bd.join("i.qcow2"), &format!("after writes {o}"));
        assert_eq!(info_json(bd, true), info_json(qd, false), "{o}: info --output=json");
        let map = |d: &Path, basalt_side: bool| {
            let args = ["map", "--output=json", "--object", SECRET, "--image-opts", KEYED];
            outcome(&if basalt_side { basalt_img(d, &args) } else { qemu_img(d, &args) })
        };
        assert_eq!(map(bd, true), map(qd, false), "{o}: map");
        // Ciphertext where QEMU puts it: the same sectors hold data (not zeroes) in both.
        let (x, y) = (std::fs::read(qd.join("d.raw")).expect("read"), std::fs::read(bd.join("d.raw")).expect("read"));
        let zeroes = |v: &[u8]| v.chunks(512).map(|s| s.iter().all(|&c| c == 0)).collect::<Vec<_>>();
        assert!(zeroes(&x) == zeroes(&y), "{o}: the data files hold data in other sectors");
        ciphertext_in_place(bd, raw, o);
    }
}

/// Sizes with a cluster-aligned and an unaligned end, as QEMU treats them differently.
const PREALLOC_SIZES: &[&str] = &["4M", "4196k"];

/// (length, allocated bytes, allocation map as raw) of a data file.
fn data_file_state(dir: &Path) -> (u64, u64, String) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir.join("d.raw")).expect("data file");
    let map = qemu_img(dir, &["map", "-f", "raw", "--output=json", "d.raw"]);
    must(&map, "map of the data file");
    (m.len(), m.blocks() * 512, stdout(&map))
}

/// The same data file shape: length, the raw allocation map, and preallocated or not (block
/// counts themselves vary with the file system's extent bookkeeping).
fn same_data_file(q: &Path, b: &Path, what: &str) {
    let ((ql, qa, qm), (bl, ba, bm)) = (data_file_state(q), data_file_state(b));
    assert_eq!((bl, bm), (ql, qm), "{what}: data file length and map");
    assert_eq!(ba >= bl / 2, qa >= ql / 2, "{what}: data file preallocated ({ba} of {bl} bytes vs QEMU's {qa} of {ql})");
}

#[test]
fn preallocation_with_data_file_as_qemu() {
    for size in PREALLOC_SIZES {
        for raw in [false, true] {
            for mode in ["metadata", "falloc", "full"] {
                let o = format!("data_file=d.raw,preallocation={mode}{}", if raw { ",data_file_raw=on" } else { "" });
                let what = format!("{o} {size}");
                let (q, b) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
                let a = ["create", "-f", "qcow2", "-o", o.as_str(), "i.qcow2", size];
                assert_eq!(outcome(&basalt_img(b.path(), &a)), outcome(&qemu_img(q.path(), &a)), "create {what}");
                let read = |d: &Path| std::fs::read(d.join("i.qcow2")).expect("read");
                assert!(read(q.path()) == read(b.path()), "{what}: qcow2 file differs from qemu-img's");
                same_data_file(q.path(), b.path(), &what);
                if size == &"4M" {
                    let (len, alloc, _) = data_file_state(b.path());
                    assert_eq!(alloc >= len, mode != "metadata", "{what}: data file allocation {alloc} of {len}");
                }
                for args in
                    [&["map", "--output=json", "i.qcow2"][..], &["info", "--output=json", "i.qcow2"], &["check", "i.qcow2"]]
                {
                    assert_eq!(outcome(&basalt_img(b.path(), args)), outcome(&qemu_img(q.path(), args)), "{what}: {args:?}");
                }
                let o = qemu_img(b.path(), &["check", "i.qcow2"]);
                assert!(stdout(&o).contains("No errors were found"), "{what}: {}", stdout(&o));
            }
        }
    }
    // Encrypted too: the LUKS header after the preallocated metadata, as QEMU places it.
    let (q, b) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    let o = "encrypt.format=luks,encrypt.iter-time=10,encrypt.key-secret=sec0,data_file=d.raw,preallocation=falloc";
    assert_eq!(outcome(&basalt_img(b.path(), &enc_create(o))), outcome(&qemu_img(q.path(), &enc_create(o))), "create {o}");
    same_but_luks(&q.path().join("i.qcow2"), &b.path().join("i.qcow2"), o);
    same_data_file(q.path(), b.path(), o);
    enc_io(b.path(), true, &["write -P 9 1M 64k"]);
    enc_io(b.path(), false, &["read -P 9 1M 64k"]);
}

#[test]
fn resize_with_data_file_as_qemu() {
    let cases: &[&[&str]] = &[
        &["+4M"],
        &["--preallocation=metadata", "+4M"],
        &["--preallocation=falloc", "+4M"],
        &["--preallocation=full", "+1M"],
        &["--preallocation=falloc", "+100k"],
        &["--preallocation=off", "+100k"],
        &["--shrink", "2100k"],
        &["--preallocation=falloc", "1M"],
    ];
    for size in PREALLOC_SIZES {
        for raw in [false, true] {
            for case in cases {
                let what = format!("{size} raw={raw} resize {case:?}");
                let (q, b) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
                for d in [q.path(), b.path()] {
                    let o = if raw { "data_file=d.raw,data_file_raw=on" } else { "data_file=d.raw" };
                    must(&qemu_img(d, &["create", "-q", "-f", "qcow2", "-o", o, "i.qcow2", size]), "create");
                    must(&qemu_io(d, &["-c", "write -P 1 0 64k", "-c", "write -P 2 3M 64k", "i.qcow2"]), "qemu-io");
                }
                let mut a = vec!["resize"];
                a.extend(&case[..case.len() - 1]);
                a.extend(["i.qcow2", case[case.len() - 1]]);
                assert_eq!(outcome(&basalt_img(b.path(), &a)), outcome(&qemu_img(q.path(), &a)), "{what}");
                let read = |d: &Path| std::fs::read(d.join("i.qcow2")).expect("read");
                assert!(read(q.path()) == read(b.path()), "{what}: qcow2 file differs from qemu-img's");
                same_data_file(q.path(), b.path(), &what);
                for args in
                    [&["map", "--output=json", "i.qcow2"][..], &["info", "--output=json", "i.qcow2"], &["check", "i.qcow2"]]
                {
                    assert_eq!(outcome(&basalt_img(b.path(), args)), outcome(&qemu_img(q.path(), args)), "{what}: {args:?}");
                }
                let qi = q.path().join("i.qcow2");
                must(&qemu_img(b.path(), &["compare", qi.to_str().expect("utf-8"), "i.qcow2"]), &format!("{what}: compare"));
            }
        }
    }
}
