//! `basalt-img measure` against `qemu-img measure`: for new images of a given size (qcow2 over
//! cluster sizes, refcount widths, extended L2; raw) and for existing raw and qcow2 images with
//! data, zeroes and holes, both tools print the same figures (human and JSON) and the same errors.

use std::path::Path;
use std::process::Command;

use basalt_tests::{peer, run, stderr, stdout, tool};

fn same(dir: &Path, args: &[&str]) {
    let ours = run(Command::new(tool("basalt-img")).current_dir(dir).arg("measure").args(args));
    let theirs = run(peer("qemu-img").current_dir(dir).arg("measure").args(args));
    assert_eq!(ours.status.code(), theirs.status.code(), "{args:?}: {}", stderr(&ours));
    assert_eq!(stdout(&ours), stdout(&theirs), "{args:?}");
    assert_eq!(stderr(&ours), stderr(&theirs).replace("qemu-img", "basalt-img"), "{args:?}");
}

#[test]
fn measure_matches_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    // A raw source with data, explicit zeroes and holes; a qcow2 made from it.
    let raw = dir.join("src.raw");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(&raw).unwrap();
        f.set_len(64 << 20).unwrap();
        for (i, fill) in [(0u64, 0x11u8), (3, 0), (7, 0x22), (20, 0x33), (21, 0x44), (63, 0x55)] {
            f.seek(SeekFrom::Start(i << 20)).unwrap();
            f.write_all(&vec![fill; 700_000]).unwrap();
        }
    }
    assert!(run(peer("qemu-img").current_dir(dir).args(["convert", "-f", "raw", "-O", "qcow2", "src.raw", "src.qcow2"]))
        .status
        .success());
    assert!(run(peer("qemu-io").current_dir(dir).args(["-c", "write -z 20M 1M", "-c", "discard 63M 1M", "src.qcow2"]))
        .status
        .success());
    let cases: &[&[&str]] = &[
        &["-O", "qcow2", "--size", "1G"],
        &["-O", "qcow2", "--size", "10G"],
        &["-O", "qcow2", "--size", "1000"],
        &["-O", "qcow2", "-o", "cluster_size=4k", "--size", "1G"],
        &["-O", "qcow2", "-o", "cluster_size=512,refcount_bits=64", "--size", "100M"],
        &["-O", "qcow2", "-o", "refcount_bits=1,extended_l2=on", "--size", "3G"],
        &["-O", "qcow2", "-o", "cluster_size=2M", "--size", "5G"],
        &["-O", "raw", "--size", "1G"],
        &["--size", "1G"],
        &["--output=json", "-O", "qcow2", "--size", "1G"],
        &["-O", "qcow2", "-f", "raw", "src.raw"],
        &["-O", "qcow2", "-o", "cluster_size=4k", "-f", "raw", "src.raw"],
        &["-O", "raw", "-f", "raw", "src.raw"],
        &["-O", "qcow2", "-f", "qcow2", "src.qcow2"],
        &["--output=json", "-O", "qcow2", "-f", "qcow2", "src.qcow2"],
        &["-O", "qcow2", "--size", "1G", "-o", "cluster_size=3k"],
        &["-O", "qcow2", "--size", "1G", "-o", "bogus=1"],
        &["-O", "qcow2", "--size", "abc"],
        &["-O", "qcow2"],
        &["-O", "qcow2", "--size", "1G", "src.raw"],
    ];
    for c in cases {
        same(dir, c);
    }
}

/// A source at an internal snapshot (`-l`), and a source with persistent bitmaps (their
/// clusters are counted at the target's cluster size).
#[test]
fn measure_snapshots_and_bitmaps_match_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let q = |args: &[&str]| {
        let o = run(peer("qemu-img").current_dir(dir).args(args));
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    };
    let io = |cmd: &str| {
        let o = run(peer("qemu-io").current_dir(dir).args(["-c", cmd, "s.qcow2"]));
        assert!(o.status.success(), "{cmd}: {}", stderr(&o));
    };
    q(&["create", "-q", "-f", "qcow2", "s.qcow2", "64M"]);
    io("write -P 1 0 1M");
    q(&["snapshot", "-c", "small", "s.qcow2"]);
    io("write -P 2 8M 20M");
    q(&["bitmap", "--add", "s.qcow2", "b1"]);
    q(&["bitmap", "--add", "-g", "512", "s.qcow2", "a-much-longer-bitmap-name"]);
    q(&["bitmap", "--add", "-g", "2M", "--disable", "s.qcow2", "b3"]);
    q(&["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "1M"]);
    q(&["create", "-q", "-f", "raw", "r.raw", "1M"]);
    let cases: &[&[&str]] = &[
        &["-O", "qcow2", "s.qcow2"],
        &["-O", "qcow2", "-o", "cluster_size=4k", "s.qcow2"],
        &["-O", "qcow2", "-o", "cluster_size=2M", "--output=json", "s.qcow2"],
        &["-O", "raw", "s.qcow2"],
        &["-O", "qcow2", "v2.qcow2"],
        &["-O", "qcow2", "-l", "small", "s.qcow2"],
        &["-O", "qcow2", "-l", "1", "--output=json", "s.qcow2"],
        &["-O", "qcow2", "-l", "snapshot.name=small", "s.qcow2"],
        &["-O", "qcow2", "-l", "nope", "s.qcow2"],
        &["-O", "qcow2", "-l", "snapshot.foo=1", "s.qcow2"],
        &["-O", "qcow2", "-l", "small", "--size", "1M"],
        &["-O", "qcow2", "-f", "qcow2", "--size", "1M"],
        &["-O", "qcow2", "-l", "small", "r.raw"],
    ];
    for c in cases {
        same(dir, c);
    }
    // The snapshot is what was measured: it holds far less data than the active image.
    let req = |args: &[&str]| {
        let o = run(Command::new(tool("basalt-img")).current_dir(dir).arg("measure").args(args));
        stdout(&o).lines().next().unwrap_or_default().to_string()
    };
    assert_ne!(req(&["-O", "qcow2", "-l", "small", "s.qcow2"]), req(&["-O", "qcow2", "s.qcow2"]));
}
