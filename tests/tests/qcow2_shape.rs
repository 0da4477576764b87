//! Changing a qcow2 image's shape against qemu-img: `rebase` (safe onto another backing file,
//! unsafe `-u`, detaching `-b ''`) and `resize` (growing past the L1 table, shrinking with
//! `--shrink` over data and compressed clusters) leave images identical to qemu-img's results
//! (content and `info` apart from the file name), clean under `qemu-img check`; errors read the
//! same.

use std::path::Path;
use std::process::Command;

use basalt_tests::{peer, run, stderr, stdout, tool};

fn sh(dir: &Path, cmd: &mut Command) -> std::process::Output {
    let o = run(cmd.current_dir(dir));
    assert!(o.status.success(), "{cmd:?}: {}{}", stdout(&o), stderr(&o));
    o
}

fn setup(dir: &Path) {
    for f in ["a.qcow2", "b.qcow2", "o.qcow2", "q.qcow2"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    sh(dir, peer("qemu-img").args(["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]));
    sh(dir, peer("qemu-io").args(["-c", "write -P 1 0 4M", "a.qcow2"]));
    sh(dir, peer("qemu-img").args(["create", "-q", "-f", "qcow2", "b.qcow2", "3M"]));
    sh(dir, peer("qemu-io").args(["-c", "write -P 2 1M 1M", "b.qcow2"]));
    sh(dir, peer("qemu-img").args(["create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "o.qcow2"]));
    sh(dir, peer("qemu-io").args(["-c", "write -P 3 0 64k", "-c", "write -P 4 3149824 8192", "o.qcow2"]));
    std::fs::copy(dir.join("o.qcow2"), dir.join("q.qcow2")).unwrap();
}

fn info(dir: &Path, img: &str) -> String {
    stdout(&sh(dir, peer("qemu-img").args(["info", img])))
        .lines()
        .filter(|l| {
            !l.starts_with("image:") && !l.contains("filename:") && !l.contains("disk size") && !l.contains("file length")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn rebase_matches_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    for args in [
        &["-b", "b.qcow2", "-F", "qcow2"][..],
        &["-u", "-b", "b.qcow2", "-F", "qcow2"],
        &["-b", ""],
        &["-p", "-b", "b.qcow2", "-F", "qcow2"],
    ] {
        setup(dir);
        let ours = run(Command::new(tool("basalt-img")).current_dir(dir).arg("rebase").args(args).arg("o.qcow2"));
        let theirs = run(peer("qemu-img").current_dir(dir).arg("rebase").args(args).arg("q.qcow2"));
        assert_eq!(ours.status.code(), theirs.status.code(), "{args:?}: {}", stderr(&ours));
        sh(dir, peer("qemu-img").args(["compare", "o.qcow2", "q.qcow2"]));
        let c = sh(dir, peer("qemu-img").args(["check", "o.qcow2"]));
        assert!(stdout(&c).contains("No errors were found"), "{}", stdout(&c));
        assert_eq!(info(dir, "o.qcow2"), info(dir, "q.qcow2"), "{args:?}");
    }
    setup(dir);
    for args in [&["-b", "nothere.qcow2", "-F", "qcow2"][..], &["-u", "-b", "b.qcow2"], &[]] {
        let ours = run(Command::new(tool("basalt-img")).current_dir(dir).arg("rebase").args(args).arg("o.qcow2"));
        let theirs = run(peer("qemu-img").current_dir(dir).arg("rebase").args(args).arg("q.qcow2"));
        assert_eq!(ours.status.code(), theirs.status.code(), "{args:?}");
        assert_eq!(stderr(&ours), stderr(&theirs).replace("qemu-img", "basalt-img"), "{args:?}");
    }
}

#[test]
fn resize_matches_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    for op in [&["+10G"][..], &["--shrink", "32M"], &["32M"], &["+1M"], &["-1M"]] {
        for f in ["o.qcow2", "q.qcow2"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        sh(dir, peer("qemu-img").args(["create", "-q", "-f", "qcow2", "o.qcow2", "64M"]));
        sh(
            dir,
            peer("qemu-io").args(["-c", "write -P 5 0 1M", "-c", "write -P 6 40M 2M", "-c", "write -c -P 7 50M 64k", "o.qcow2"]),
        );
        std::fs::copy(dir.join("o.qcow2"), dir.join("q.qcow2")).unwrap();
        let ours = run(Command::new(tool("basalt-img")).current_dir(dir).arg("resize").arg("o.qcow2").args(op));
        let theirs = run(peer("qemu-img").current_dir(dir).arg("resize").arg("q.qcow2").args(op));
        assert_eq!(ours.status.code(), theirs.status.code(), "{op:?}: {}", stderr(&ours));
        assert_eq!(stdout(&ours), stdout(&theirs), "{op:?}");
        assert_eq!(stderr(&ours), stderr(&theirs).replace("qemu-img", "basalt-img"), "{op:?}");
        sh(dir, peer("qemu-img").args(["compare", "o.qcow2", "q.qcow2"]));
        let c = sh(dir, peer("qemu-img").args(["check", "o.qcow2"]));
        assert!(stdout(&c).contains("No errors were found"), "{op:?}: {}", stdout(&c));
        assert_eq!(info(dir, "o.qcow2"), info(dir, "q.qcow2"), "{op:?}");
    }
    // After growing past the L1 table, the new space is usable and the image stays clean.
    let _ = std::fs::remove_file(dir.join("o.qcow2"));
    sh(dir, peer("qemu-img").args(["create", "-q", "-f", "qcow2", "o.qcow2", "64M"]));
    sh(dir, Command::new(tool("basalt-img")).args(["resize", "o.qcow2", "+10G"]));
    let o = sh(dir, Command::new(tool("basalt-io")).args(["-c", "write -P 8 5G 1M", "-c", "read -P 8 5G 1M", "o.qcow2"]));
    assert!(!stdout(&o).contains("failed") && stdout(&o).contains("read 1048576/1048576"), "{}", stdout(&o));
    let c = sh(dir, peer("qemu-img").args(["check", "o.qcow2"]));
    assert!(stdout(&c).contains("No errors were found"), "{}", stdout(&c));
}

#[test]
fn commit_matches_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    for drop in [false, true] {
        for f in ["b1.qcow2", "t1.qcow2", "b2.qcow2", "t2.qcow2"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        for (b, t) in [("b1.qcow2", "t1.qcow2"), ("b2.qcow2", "t2.qcow2")] {
            sh(dir, peer("qemu-img").args(["create", "-q", "-f", "qcow2", b, "4M"]));
            sh(dir, peer("qemu-io").args(["-c", "write -P 1 0 4M", b]));
            sh(dir, peer("qemu-img").args(["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t]));
            sh(
                dir,
                peer("qemu-io").args([
                    "-c",
                    "write -P 3 0 64k",
                    "-c",
                    "write -z 1M 64k",
                    "-c",
                    "write -c -P 4 2M 64k",
                    "-c",
                    "write -P 5 3146240 1000",
                    t,
                ]),
            );
        }
        let mut ours = Command::new(tool("basalt-img"));
        ours.current_dir(dir).arg("commit");
        let mut theirs = peer("qemu-img");
        theirs.current_dir(dir).arg("commit");
        if drop {
            ours.arg("-d");
            theirs.arg("-d");
        }
        let o = run(ours.arg("t1.qcow2"));
        let q = run(theirs.arg("t2.qcow2"));
        assert_eq!((o.status.code(), stdout(&o)), (q.status.code(), stdout(&q)), "{}", stderr(&o));
        for (x, y) in [("b1.qcow2", "b2.qcow2"), ("t1.qcow2", "t2.qcow2")] {
            sh(dir, peer("qemu-img").args(["compare", x, y]));
            let c = sh(dir, peer("qemu-img").args(["check", x]));
            assert!(stdout(&c).contains("No errors were found"), "{}", stdout(&c));
            let (mx, my) = (
                sh(dir, peer("qemu-img").args(["map", "--output=json", x])),
                sh(dir, peer("qemu-img").args(["map", "--output=json", y])),
            );
            assert_eq!(stdout(&mx), stdout(&my), "drop={drop}: {x} and {y} map differently");
        }
    }
    for args in [&["-b", "x", "t1.qcow2"][..], &["b1.qcow2"]] {
        let o = run(Command::new(tool("basalt-img")).current_dir(dir).arg("commit").args(args));
        let q = run(peer("qemu-img").current_dir(dir).arg("commit").args(args));
        assert_eq!(o.status.code(), q.status.code(), "{args:?}");
        assert_eq!(stderr(&o), stderr(&q).replace("qemu-img", "basalt-img"), "{args:?}");
    }
}

#[test]
fn preallocation_matches_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    for (opts, size) in [
        ("preallocation=metadata", "3M"),
        ("preallocation=falloc", "3M"),
        ("preallocation=full", "3M"),
        ("preallocation=falloc,cluster_size=1M", "1100M"),
        ("preallocation=metadata", "1100M"),
        ("preallocation=metadata,extended_l2=on", "3M"),
        ("preallocation=metadata,compat=0.10", "3M"),
    ] {
        for f in ["o.qcow2", "q.qcow2"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        sh(dir, Command::new(tool("basalt-img")).args(["create", "-q", "-f", "qcow2", "-o", opts, "o.qcow2", size]));
        sh(dir, peer("qemu-img").args(["create", "-q", "-f", "qcow2", "-o", opts, "q.qcow2", size]));
        sh(dir, peer("qemu-img").args(["compare", "o.qcow2", "q.qcow2"]));
        let c = sh(dir, peer("qemu-img").args(["check", "o.qcow2"]));
        assert!(stdout(&c).contains("No errors were found"), "{opts}: {}", stdout(&c));
        let (mo, mq) = (
            sh(dir, peer("qemu-img").args(["map", "--output=json", "o.qcow2"])),
            sh(dir, peer("qemu-img").args(["map", "--output=json", "q.qcow2"])),
        );
        assert_eq!(stdout(&mo), stdout(&mq), "{opts}");
        let (lo, lq) = (std::fs::metadata(dir.join("o.qcow2")).unwrap(), std::fs::metadata(dir.join("q.qcow2")).unwrap());
        assert_eq!(lo.len(), lq.len(), "{opts}: file lengths");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(lo.blocks() > lo.len() / 512 / 2, lq.blocks() > lq.len() / 512 / 2, "{opts}: allocation on disk");
    }
}
