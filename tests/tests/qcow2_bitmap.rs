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

use basalt_tests::{assert_same_img_outcome, must, peer, run, stderr, stdout, tool};

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

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}

fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

/// Every bitmap of an image as the file holds it: (name, flags, granularity bits, bits).
fn bitmaps(path: &Path) -> Vec<(String, u32, u8, Vec<u8>)> {
    let d = std::fs::read(path).unwrap();
    let cs = 1usize << be32(&d, 20);
    let size = be64(&d, 24);
    let mut o = be32(&d, 100) as usize;
    let mut out = Vec::new();
    loop {
        let (t, l) = (be32(&d, o), be32(&d, o + 4) as usize);
        if t == 0 {
            break;
        }
        if t == 0x2385_2875 {
            let nb = be32(&d, o + 8);
            let mut p = be64(&d, o + 24) as usize;
            for _ in 0..nb {
                let (to, ts, fl, gb) = (be64(&d, p) as usize, be32(&d, p + 8) as usize, be32(&d, p + 12), d[p + 17]);
                let ns = u16::from_be_bytes([d[p + 18], d[p + 19]]) as usize;
                let es = be32(&d, p + 20) as usize;
                let name = String::from_utf8_lossy(&d[p + 24 + es..p + 24 + es + ns]).into_owned();
                let nbytes = (size.div_ceil(1 << gb)).div_ceil(8) as usize;
                let mut bits = Vec::new();
                for i in 0..ts {
                    let e = be64(&d, to + 8 * i) as usize;
                    let off = e & 0x00ff_ffff_ffff_fe00;
                    let chunk = if off != 0 { d[off..off + cs].to_vec() } else { vec![if e & 1 != 0 { 0xff } else { 0 }; cs] };
                    bits.extend_from_slice(&chunk);
                }
                bits.truncate(nbytes);
                out.push((name, fl, gb, bits));
                p += (24 + es + ns).next_multiple_of(8);
            }
        }
        o += 8 + l.next_multiple_of(8);
    }
    out
}

/// Two images have the same bitmaps; a difference is reported by name and first byte.
fn same_bitmaps(a: &Path, b: &Path, what: &str) {
    let (x, y) = (bitmaps(a), bitmaps(b));
    let summary = |v: &[(String, u32, u8, Vec<u8>)]| -> Vec<(String, u32, u8, usize, u32)> {
        v.iter().map(|(n, f, g, bits)| (n.clone(), *f, *g, bits.len(), bits.iter().map(|c| c.count_ones()).sum())).collect()
    };
    assert_eq!(summary(&x), summary(&y), "{what}: bitmaps differ (name, flags, granularity bits, bytes, bits set)");
    for (p, q) in x.iter().zip(&y) {
        let first = p.3.iter().zip(&q.3).position(|(c, d)| c != d);
        assert!(first.is_none(), "{what}: bitmap {} differs first at byte {first:?}", p.0);
    }
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
