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
