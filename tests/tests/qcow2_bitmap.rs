//! Persistent dirty bitmaps in qcow2 against QEMU's tools.
//!
//! - The same `bitmap` commands and writes done by Basalt and by QEMU to two images leave the
//!   same bitmaps (flags, granularity, every bit) and the same `info` listing; images stay
//!   clean under `qemu-img check` and `basalt-img check` prints what qemu-img prints.
//! - Bitmaps QEMU made record Basalt's writes, and bitmaps Basalt made record QEMU's.
//! - A bitmap left in use (inconsistent) is kept as it is and never updated.
//! - A failure while storing the bitmaps leaves them in use (never wrong) and the image
//!   without corruption.
//! - `basalt-img bitmap` errors are qemu-img's.

use std::path::Path;
use std::process::{Command, Output};

use basalt_tests::{assert_same_img_outcome, be32, be64, bitmaps, must, peer, run, same_bitmaps, stderr, stdout, tool};

fn qemu_img(dir: &Path, args: &[&str]) -> Output {
    run(peer("qemu-img").current_dir(dir).args(args))
}

fn qemu_io(dir: &Path, args: &[&str]) -> Output {
    run(peer("qemu-io").current_dir(dir).args(args))
}

fn basalt_img(dir: &Path, args: &[&str]) -> Output {
    run(Command::new("timeout").current_dir(dir).arg("120").arg(tool("basalt-img")).args(args))
}

fn basalt_io(dir: &Path, args: &[&str]) -> Output {
    run(Command::new("timeout").current_dir(dir).arg("120").arg(tool("basalt-io")).args(args))
}

fn same_output(dir: &Path, args: &[&str]) {
    assert_same_img_outcome(&basalt_img(dir, args), &qemu_img(dir, args), &format!("{args:?}"));
}

fn check_clean(dir: &Path, img: &str) {
    let o = qemu_img(dir, &["check", img]);
    assert!(o.status.code() == Some(0), "qemu-img check {img}:\n{}{}", stdout(&o), stderr(&o));
    same_output(dir, &["check", img]);
}

/// The format-specific part of `qemu-img info --output=json` (sizes differ with layout).
fn info_specific(dir: &Path, img: &str) -> String {
    let o = qemu_img(dir, &["info", "--output=json", img]);
    must(&o, "info");
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    v["format-specific"].to_string()
}

/// Run the same steps on `b.qcow2` (Basalt) and `q.qcow2` (QEMU).
fn both(dir: &Path, img_cmds: &[&[&str]], io_cmds: &[&str]) {
    for (t, img) in [("b", "b.qcow2"), ("q", "q.qcow2")] {
        for c in img_cmds {
            let mut args: Vec<&str> = c.to_vec();
            args.insert(args.len() - 1, img);
            let o = if t == "b" { basalt_img(dir, &args) } else { qemu_img(dir, &args) };
            must(&o, &format!("{t} {args:?}"));
        }
        if !io_cmds.is_empty() {
            let mut args: Vec<&str> = io_cmds.iter().flat_map(|c| ["-c", c]).collect();
            args.push(img);
            let o = if t == "b" { basalt_io(dir, &args) } else { qemu_io(dir, &args) };
            must(&o, &format!("{t} io"));
        }
    }
    same_bitmaps(&dir.join("b.qcow2"), &dir.join("q.qcow2"), &format!("after {img_cmds:?} {io_cmds:?}"));
    assert_eq!(info_specific(dir, "b.qcow2"), info_specific(dir, "q.qcow2"));
    check_clean(dir, "b.qcow2");
}

#[test]
fn bitmap_commands_and_writes_match_qemu() {
    for (opts, cs) in [("cluster_size=65536", "64k"), ("cluster_size=4096", "4k"), ("cluster_size=2M,extended_l2=on", "2M")] {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        for img in ["b.qcow2", "q.qcow2"] {
            must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "-o", opts, img, "100M"]), "create");
        }
        both(dir, &[&["bitmap", "--add", "b1"], &["bitmap", "--add", "-g", "512", "--disable", "fine"]], &[]);
        both(dir, &[], &["write -P 1 0 100k", "write -P 2 1M 4k", "write -z 5M 64k", "discard 7M 3M", "write -P 3 99M 1M"]);
        both(dir, &[&["bitmap", "--add", "-g", "1M", "coarse"], &["bitmap", "--enable", "fine"]], &["write -P 4 3000 10"]);
        both(dir, &[&["bitmap", "--merge", "b1", "coarse"], &["bitmap", "--disable", "b1"]], &["write -P 5 50M 64k"]);
        both(dir, &[&["bitmap", "--clear", "fine"], &["bitmap", "--add", "--remove", "tmp"]], &["write -P 6 60M 1"]);
        both(dir, &[&["bitmap", "--remove", "b1"]], &[&format!("write -c -P 7 80M {cs}")]);
        // Resizing resizes the bitmaps.
        both(dir, &[&["resize", "150M"]], &["write -P 8 140M 64k"]);
        both(dir, &[&["resize", "--shrink", "90M"]], &["write -P 9 89M 64k"]);
        same_output(dir, &["info", "b.qcow2"]);
        // Basalt records writes in bitmaps QEMU made and the other way round.
        std::fs::copy(dir.join("q.qcow2"), dir.join("x.qcow2")).unwrap();
        std::fs::copy(dir.join("b.qcow2"), dir.join("y.qcow2")).unwrap();
        must(&basalt_io(dir, &["-c", "write -P 10 20M 3M", "x.qcow2"]), "basalt-io");
        must(&qemu_io(dir, &["-c", "write -P 10 20M 3M", "y.qcow2"]), "qemu-io");
        same_bitmaps(&dir.join("x.qcow2"), &dir.join("y.qcow2"), "cross writes");
        check_clean(dir, "x.qcow2");
    }
}

#[test]
fn bitmap_errors_match_qemu() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "64M"]), "create");
    must(&qemu_img(dir, &["bitmap", "--add", "a.qcow2", "b1"]), "add");
    for args in [
        &["bitmap", "--add", "a.qcow2", "b1"][..],
        &["bitmap", "--remove", "a.qcow2", "nope"],
        &["bitmap", "--clear", "a.qcow2", "nope"],
        &["bitmap", "--enable", "a.qcow2", "nope"],
        &["bitmap", "--merge", "nope", "a.qcow2", "b1"],
        &["bitmap", "a.qcow2", "b1"],
        &["bitmap", "--add", "-g", "1000", "a.qcow2", "x"],
        &["bitmap", "--add", "-g", "256", "a.qcow2", "x"],
        &["bitmap", "--add", "-g", "64z", "a.qcow2", "x"],
        &["bitmap", "--clear", "-g", "64k", "a.qcow2", "b1"],
        &["bitmap", "--clear", "-b", "x", "a.qcow2", "b1"],
        &["bitmap", "--add", "a.qcow2"],
        &["bitmap", "--add", "a.qcow2", "b1", "extra"],
        &["info", "a.qcow2"],
        &["info", "--output=json", "a.qcow2"],
    ] {
        same_output(dir, args);
    }
}

#[test]
fn inconsistent_bitmaps_are_left_alone() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "64M"]), "create");
    must(&qemu_img(dir, &["bitmap", "--add", "a.qcow2", "b1"]), "add");
    must(&qemu_img(dir, &["bitmap", "--add", "a.qcow2", "b2"]), "add");
    must(&qemu_io(dir, &["-c", "write -P 1 0 64k", "a.qcow2"]), "write");
    // Mark b1 in use, as a program that died while holding it leaves it.
    let path = dir.join("a.qcow2");
    let mut b = std::fs::read(&path).unwrap();
    let mut o = be32(&b, 100) as usize;
    while be32(&b, o) != 0x2385_2875 {
        o += 8 + (be32(&b, o + 4) as usize).next_multiple_of(8);
    }
    let dir_off = be64(&b, o + 24) as usize;
    b[dir_off + 12..dir_off + 16].copy_from_slice(&3u32.to_be_bytes());
    std::fs::write(&path, &b).unwrap();
    let before = bitmaps(&path);
    must(&basalt_io(dir, &["-c", "write -P 2 10M 64k", "a.qcow2"]), "basalt-io");
    let after = bitmaps(&path);
    assert_eq!(after[0], before[0], "an inconsistent bitmap was changed");
    assert_ne!(after[1].3, before[1].3, "a consistent bitmap did not record the write");
    same_output(dir, &["info", "a.qcow2"]);
    check_clean(dir, "a.qcow2");
    let o = basalt_img(dir, &["bitmap", "--clear", "a.qcow2", "b1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("inconsistent"), "{}", stderr(&o));
    must(&basalt_img(dir, &["bitmap", "--remove", "a.qcow2", "b1"]), "remove");
    check_clean(dir, "a.qcow2");
    assert_eq!(bitmaps(&path).len(), 1);
}

#[test]
fn a_failed_store_leaves_bitmaps_in_use() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    for point in ["bitmap.write", "bitmap.header", "refblock.writeback"] {
        must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "a.qcow2", "64M"]), "create");
        must(&qemu_img(dir, &["bitmap", "--add", "a.qcow2", "b1"]), "add");
        let spec = format!("driver=qcow2,file.filename=a.qcow2,x-fault={point}");
        // The fault fires in the write (refblock.writeback) or while storing at close.
        basalt_io(dir, &["--image-opts", "-c", "write -P 2 10M 64k", &spec]);
        let bm = bitmaps(&dir.join("a.qcow2"));
        assert_eq!(bm.len(), 1);
        assert_eq!(bm[0].1 & 1, 1, "{point}: bitmap not left in use after a failed store");
        let c = qemu_img(dir, &["check", "a.qcow2"]);
        let code = c.status.code().unwrap_or(-1);
        assert!(code == 0 || code == 3, "{point}: qemu-img check exit {code}:\n{}{}", stdout(&c), stderr(&c));
        std::fs::remove_file(dir.join("a.qcow2")).unwrap();
    }
}
