//! Growing a qcow2 image against qemu-img, where the new area must not show a longer backing
//! file (QEMU zeroes it: zero clusters from the first (sub)cluster boundary, explicit zeroes
//! for the unaligned head) and with `--preallocation=metadata` (the new clusters mapped, the
//! head of a newly mapped cluster keeping what it read). Same output, map, info and content as
//! qemu-img's, clean check; the grown area reads as zeroes.
//!
//! `--preallocation=falloc|full` without a data file: QEMU puts a new refcount table (and the
//! refcount blocks it needs) after the last cluster in use, the data clusters of the grown
//! range after it (from the cluster holding the old end, whose head is copied over), and new
//! L2 tables first-fit. The file Basalt leaves is the same byte for byte, with the same holes
//! and (within the file system's own extent blocks) the same allocated size; same outcome,
//! clean check. An encrypted image gets the same layout, its new area reading as zeroes.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};

use basalt_tests::{assert_same_img_outcome, must, peer, run, stdout, tool};

fn qemu_img(dir: &Path, args: &[&str]) -> Output {
    run(peer("qemu-img").current_dir(dir).args(args))
}

fn qemu_io(dir: &Path, args: &[&str]) -> Output {
    run(peer("qemu-io").current_dir(dir).args(args))
}

fn map(dir: &Path, img: &str) -> String {
    let o = qemu_img(dir, &["map", "--output=json", img]);
    must(&o, "map");
    stdout(&o)
}

/// `info --output=json` without what depends on the file's name and the host's allocation.
fn info(dir: &Path, img: &str) -> serde_json::Value {
    let o = qemu_img(dir, &["info", "--output=json", img]);
    must(&o, "info");
    let mut v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    for k in ["filename", "actual-size"] {
        v.as_object_mut().unwrap().remove(k);
    }
    v["children"] = serde_json::Value::Null;
    v
}

#[test]
fn growing_over_a_longer_backing_file_matches_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "back.qcow2", "8M"]), "create");
    must(&qemu_io(dir, &["-c", "write -P 7 0 8M", "back.qcow2"]), "write");
    // (old size, new size, backing, creation options, resize options)
    let cases: &[(&str, &str, bool, &str, &[&str])] = &[
        ("1M", "5M", true, "", &[]),
        ("1000k", "5M", true, "", &[]),
        ("1000k", "20M", true, "", &[]),
        ("1000k", "5M", true, "extended_l2=on", &[]),
        ("1M", "5M", true, "compat=0.10", &[]),
        ("1M", "5M", true, "", &["--preallocation=metadata"]),
        ("1000k", "5M", true, "", &["--preallocation=metadata"]),
        ("1000k", "5M", true, "extended_l2=on", &["--preallocation=metadata"]),
        ("4100k", "9000k", false, "", &["--preallocation=metadata"]),
        ("4M", "8M", false, "cluster_size=4k", &["--preallocation=metadata"]),
    ];
    for (old, new, backing, opts, resize) in cases {
        let what = format!("{old} -> {new}, backing {backing}, {opts} {resize:?}");
        for img in ["b.qcow2", "q.qcow2"] {
            let _ = std::fs::remove_file(dir.join(img));
            let mut args = vec!["create", "-q", "-f", "qcow2"];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            if *backing {
                args.extend(["-b", "back.qcow2", "-F", "qcow2"]);
            }
            args.extend([img, old]);
            must(&qemu_img(dir, &args), "create");
            must(&qemu_io(dir, &["-c", "write -P 1 0 64k", img]), "write");
        }
        let mut args = vec!["resize"];
        args.extend_from_slice(resize);
        let ours = run(Command::new(tool("basalt-img")).current_dir(dir).args(&args).args(["b.qcow2", new]));
        let theirs = qemu_img(dir, &[&args[..], &["q.qcow2", new]].concat());
        assert_same_img_outcome(&ours, &theirs, &what);
        if !theirs.status.success() {
            // (qemu-img fails on version 2 images after changing the size; Basalt fails first.)
            continue;
        }
        must(&qemu_img(dir, &["check", "b.qcow2"]), &what);
        must(&qemu_img(dir, &["compare", "b.qcow2", "q.qcow2"]), &what);
        assert_eq!(map(dir, "b.qcow2"), map(dir, "q.qcow2"), "{what}: allocation differs");
        assert_eq!(info(dir, "b.qcow2"), info(dir, "q.qcow2"), "{what}: info differs");
        // The old content stays; the grown area reads as zeroes, whatever the backing file holds.
        let o = qemu_io(dir, &["-r", "-c", "read -P 1 0 64k", "-c", &format!("read -P 0 {old} 1M"), "b.qcow2"]);
        must(&o, &what);
        assert!(!stdout(&o).contains("failed"), "{what}: {}", stdout(&o));
    }
}

/// Run `cmd` (qemu-io commands; `img ...` for a qemu-img command) on `img`.
fn setup(dir: &Path, img: &str, cmd: &str) {
    let o = match cmd.strip_prefix("img ") {
        Some(c) => qemu_img(dir, &[c.split(' ').collect::<Vec<_>>(), vec![img]].concat()),
        None => qemu_io(dir, &["-c", cmd, img]),
    };
    must(&o, cmd);
    assert!(!stdout(&o).contains("failed"), "{cmd}: {}", stdout(&o));
}

#[test]
fn growing_with_falloc_or_full_matches_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "back.qcow2", "8M"]), "create");
    must(&qemu_io(dir, &["-c", "write -P 7 0 8M", "back.qcow2"]), "write");
    const DATA: &[&str] = &["write -P 1 0 64k"];
    // Something in the cluster holding the old end (1036k): copied into its new cluster.
    const TAIL: &[&str] = &["write -P 1 0 64k", "write -P 2 1024k 12k"];
    // (old size, new size, backing, creation options, set-up commands)
    let cases: &[(&str, &str, bool, &str, &[&str])] = &[
        ("1M", "5M", false, "", DATA),
        ("1M", "5M", false, "cluster_size=4k", DATA),
        ("1M", "5M", false, "compat=0.10", DATA),
        ("1036k", "3M", false, "", &["write -P 1 0 64k"]),
        ("1036k", "3M", false, "", TAIL),
        // The L1 table grows (the old one freed, not discarded); new L2 tables fill the holes.
        ("1036k", "3M", false, "cluster_size=4k", TAIL),
        // The L1 table grows to 5 clusters; 288 new L2 tables, 73 new refcount blocks, a 2-cluster
        // refcount table.
        ("1M", "10M", false, "cluster_size=512", &["write -P 1 0 64k", "write -P 3 700k 100k"]),
        ("1036k", "3M", false, "cluster_size=512,refcount_bits=1", TAIL),
        ("1036k", "9M", false, "cluster_size=4k,refcount_bits=64", TAIL),
        ("1036k", "3M", false, "", &["write -c -P 1 0 64k", "write -c -P 2 1024k 12k"]),
        ("1036k", "3M", false, "", &["write -P 2 1024k 12k", "write -z 1024k 12k"]),
        ("1036k", "3M", false, "extended_l2=on", &["write -P 1 0 64k", "write -P 2 1024k 6k"]),
        ("1036k", "3M", false, "", &["write -P 1 0 64k", "write -P 2 1024k 12k", "img snapshot -c s1", "write -P 3 0 4k"]),
        // Over a longer backing file: the head comes from it, the rest reads as zeroes, also
        // on version 2 (no zero clusters needed); subclusters are marked allocated.
        ("1036k", "3M", true, "", DATA),
        ("1036k", "3M", true, "compat=0.10", DATA),
        ("1036k", "3M", true, "extended_l2=on", &["write -P 1 0 64k", "write -P 2 1024k 6k"]),
        ("9M", "12M", true, "", DATA),
    ];
    for mode in ["falloc", "full"] {
        for (old, new, backing, opts, cmds) in cases {
            let what = format!("{old} -> {new} {mode}, backing {backing}, {opts} {cmds:?}");
            let mut args = vec!["create", "-q", "-f", "qcow2"];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            if *backing {
                args.extend(["-b", "back.qcow2", "-F", "qcow2"]);
            }
            let _ = std::fs::remove_file(dir.join("o.qcow2"));
            args.extend(["o.qcow2", old]);
            must(&qemu_img(dir, &args), "create");
            for c in *cmds {
                setup(dir, "o.qcow2", c);
            }
            must(&qemu_img(dir, &["convert", "-O", "raw", "o.qcow2", "o.raw"]), "convert");
            for img in ["b.qcow2", "q.qcow2"] {
                std::fs::copy(dir.join("o.qcow2"), dir.join(img)).unwrap();
            }
            let pre = format!("--preallocation={mode}");
            let ours = run(Command::new(tool("basalt-img")).current_dir(dir).args(["resize", &pre, "b.qcow2", new]));
            let theirs = qemu_img(dir, &["resize", &pre, "q.qcow2", new]);
            assert_same_img_outcome(&ours, &theirs, &what);
            must(&theirs, &what);
            must(&qemu_img(dir, &["check", "b.qcow2"]), &what);
            must(&qemu_img(dir, &["compare", "b.qcow2", "q.qcow2"]), &what);
            assert_eq!(map(dir, "b.qcow2"), map(dir, "q.qcow2"), "{what}: allocation differs");
            let (b, q) = (std::fs::read(dir.join("b.qcow2")).unwrap(), std::fs::read(dir.join("q.qcow2")).unwrap());
            assert_eq!(b.len(), q.len(), "{what}: file length differs");
            assert!(b == q, "{what}: files differ from byte {}", b.iter().zip(&q).position(|(x, y)| x != y).unwrap_or(0));
            // Holes in the file as the file system reports them, and the space allocated (which
            // also counts ext4's extent blocks, a few KiB that depend on where the blocks fell).
            let raw_map = |img| stdout(&qemu_img(dir, &["map", "-f", "raw", "--output=json", img]));
            assert_eq!(raw_map("b.qcow2"), raw_map("q.qcow2"), "{what}: holes differ");
            let blocks = |img: &str| std::fs::metadata(dir.join(img)).unwrap().blocks() as i64 * 512;
            let (bb, qb) = (blocks("b.qcow2"), blocks("q.qcow2"));
            assert!((bb - qb).abs() <= 64 << 10, "{what}: {bb} bytes allocated, qemu-img {qb}");
            assert!(bb >= b.len() as i64 - (256 << 10), "{what}: only {bb} of {} bytes allocated", b.len());
            // The old content stays; the grown area reads as zeroes.
            must(&qemu_img(dir, &["convert", "-O", "raw", "b.qcow2", "b.raw"]), "convert");
            let (was, is) = (std::fs::read(dir.join("o.raw")).unwrap(), std::fs::read(dir.join("b.raw")).unwrap());
            assert!(is[..was.len()] == was[..], "{what}: old content changed");
            assert!(is[was.len()..].iter().all(|&x| x == 0), "{what}: grown area not zero");
        }
    }
    // Errors as qemu-img's: preallocation only grows.
    must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "o.qcow2", "1036k"]), "create");
    for args in [
        &["--preallocation=falloc", "x.qcow2", "1036k"][..],
        &["--preallocation=full", "x.qcow2", "+0"],
        &["--preallocation=falloc", "x.qcow2", "1M"],
        &["--preallocation=full", "--shrink", "x.qcow2", "1M"],
        &["--preallocation=falloc", "--shrink", "x.qcow2", "--", "-4k"],
    ] {
        let what = format!("resize {args:?}");
        std::fs::copy(dir.join("o.qcow2"), dir.join("x.qcow2")).unwrap();
        let ours = run(Command::new(tool("basalt-img")).current_dir(dir).arg("resize").args(args));
        std::fs::copy(dir.join("o.qcow2"), dir.join("x.qcow2")).unwrap();
        let theirs = qemu_img(dir, &[&["resize"], args].concat());
        assert_same_img_outcome(&ours, &theirs, &what);
        assert!(!theirs.status.success(), "{what}");
    }
}

/// Freed clusters at the end of the file (a discard not passed down to it): the refcount area
/// and the data start over them. When the file reaches past the data, qemu-img's preallocation
/// refuses to shrink the file (after moving the refcount table); otherwise the layout is the
/// same, but Basalt zeroes what they held where QEMU leaves it showing in the new area.
#[test]
fn growing_over_freed_clusters_at_the_end_of_the_file() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    for (freed, grow, fails) in [("0 4M", "+64k", true), ("3M 1M", "+3M", false)] {
        let what = format!("discard {freed}, grow {grow}");
        must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "o.qcow2", "4M"]), "create");
        setup(dir, "o.qcow2", "write -P 1 0 4M");
        let o = qemu_io(
            dir,
            &["--image-opts", "-c", &format!("discard {freed}"), "driver=qcow2,file.filename=o.qcow2,pass-discard-request=off"],
        );
        must(&o, &what);
        for img in ["b.qcow2", "q.qcow2"] {
            std::fs::copy(dir.join("o.qcow2"), dir.join(img)).unwrap();
        }
        let ours =
            run(Command::new(tool("basalt-img")).current_dir(dir).args(["resize", "--preallocation=full", "b.qcow2", grow]));
        let theirs = qemu_img(dir, &["resize", "--preallocation=full", "q.qcow2", grow]);
        assert_same_img_outcome(&ours, &theirs, &what);
        assert_eq!(theirs.status.success(), !fails, "{what}");
        must(&qemu_img(dir, &["check", "b.qcow2"]), &what);
        assert_eq!(map(dir, "b.qcow2"), map(dir, "q.qcow2"), "{what}: allocation differs");
        let (b, q) = (std::fs::read(dir.join("b.qcow2")).unwrap(), std::fs::read(dir.join("q.qcow2")).unwrap());
        assert_eq!(b.len(), q.len(), "{what}: file length differs");
        if fails {
            assert!(b == q, "{what}: files differ");
        } else {
            let o = qemu_io(dir, &["-r", "-c", "read -P 1 0 3M", "-c", "read -P 0 4M 3M", "b.qcow2"]);
            assert!(!stdout(&o).contains("failed"), "{what}: {}", stdout(&o));
        }
    }
}

/// An encrypted image grows with QEMU's layout, but its new clusters are written with
/// encrypted zeroes: the file's zeroes that QEMU leaves there decrypt to noise.
#[test]
fn growing_an_encrypted_image_with_falloc_reads_zeroes() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let secret = "secret,id=sec0,data=abc";
    let opts = |f: &str| format!("driver=qcow2,file.filename={f},encrypt.key-secret=sec0");
    let create = ["create", "-q", "-f", "qcow2", "--object", secret, "-o"];
    must(
        &qemu_img(
            dir,
            &[&create[..], &["encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", "o.qcow2", "1036k"]].concat(),
        ),
        "create",
    );
    let io = |f: &str, cmd: &str| {
        let o = qemu_io(dir, &["--object", secret, "--image-opts", "-c", cmd, &opts(f)]);
        must(&o, cmd);
        assert!(!stdout(&o).contains("failed"), "{cmd} on {f}: {}", stdout(&o));
    };
    io("o.qcow2", "write -P 2 1024k 12k");
    // Copies, so that both have the same key (and the same ciphertext where both wrote it).
    for img in ["b.qcow2", "q.qcow2"] {
        std::fs::copy(dir.join("o.qcow2"), dir.join(img)).unwrap();
    }
    let args =
        |f: &str| ["resize", "--object", secret, "--image-opts", "--preallocation=falloc", &opts(f), "3M"].map(String::from);
    let ours = run(Command::new(tool("basalt-img")).current_dir(dir).args(args("b.qcow2")));
    let theirs = run(peer("qemu-img").current_dir(dir).args(args("q.qcow2")));
    assert_same_img_outcome(&ours, &theirs, "encrypted resize");
    must(&theirs, "encrypted resize");
    must(&qemu_img(dir, &["check", "--object", secret, "--image-opts", &opts("b.qcow2")]), "check");
    io("b.qcow2", "read -P 2 1024k 12k");
    io("b.qcow2", "read -P 0 1036k 2000k");
    // Same file up to the new clusters' data after the copied head (the last 2 MiB - 12 KiB).
    let (b, q) = (std::fs::read(dir.join("b.qcow2")).unwrap(), std::fs::read(dir.join("q.qcow2")).unwrap());
    assert_eq!(b.len(), q.len(), "file length differs");
    let data = b.len() - (2048 - 12) * 1024;
    assert!(b[..data] == q[..data], "metadata differs from byte {:?}", b.iter().zip(&q).position(|(x, y)| x != y));
}
