//! Growing a qcow2 image against qemu-img, where the new area must not show a longer backing
//! file (QEMU zeroes it: zero clusters from the first (sub)cluster boundary, explicit zeroes
//! for the unaligned head) and with `--preallocation=metadata` (the new clusters mapped, the
//! head of a newly mapped cluster keeping what it read). Same output, map, info and content as
//! qemu-img's, clean check; the grown area reads as zeroes.

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
