//! `basalt-img rebase` against `qemu-img rebase`: safe rebase onto another backing file, unsafe
//! (`-u`) rebase, and detaching (`-b ''`) leave images identical to qemu-img's results (content
//! and `info` apart from the file name), clean under `qemu-img check`; errors read the same.

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
        .filter(|l| !l.starts_with("image:") && !l.contains("filename:") && !l.contains("disk size"))
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
