//! Image locks exclude Basalt and QEMU's tools from each other in both directions, using the
//! same OFD lock bytes: a writer held by one side refuses the other side's convert source
//! (which denies writers), and a convert source held by one side refuses the other's writer.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_engine::{ErrorKind, Graph, Node, OpenFlags, Opts, Perm};
use basalt_reactor::Reactor;
use basalt_tests::{peer, stderr};

fn raw(path: &str) -> Opts {
    let mut o = Opts::new();
    o.set("driver", "raw");
    o.set("file.filename", path);
    o
}

fn open(r: &Reactor, path: &str, flags: OpenFlags) -> Result<Arc<dyn Node>, basalt_engine::BlockError> {
    let o = raw(path);
    r.block_on(async move { Graph::new(basalt_formats::registry()).open(o, flags).await })
}

fn convert_source_flags() -> OpenFlags {
    let mut f = OpenFlags::read_only();
    f.shared = Perm::ALL.without(Perm::WRITE);
    f
}

fn image(dir: &tempfile::TempDir) -> String {
    let p = dir.path().join("l.raw");
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    p.to_str().unwrap().to_string()
}

/// qemu-io holding `path` open (read-write unless `ro`) until killed.
fn qemu_io_holder(path: &str, ro: bool) -> Child {
    let mut c = peer("qemu-io");
    if ro {
        c.arg("-r");
    }
    c.args(["-f", "raw", "-c", "sleep 30000", path]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
}

fn wait_locked(path: &str, byte: &str) {
    // Wait until /proc/locks shows a lock covering `byte` on some file (the holder started).
    let ino = std::fs::metadata(path).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
        if locks.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 8 && f[5].ends_with(&format!(":{ino}")) && f[6] <= byte && (f[7] == "EOF" || f[7] >= byte)
        }) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("holder never took lock byte {byte}");
}

#[test]
fn qemu_writer_refuses_basalt_convert_source_and_vice_versa() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(&dir);
    let r = Reactor::new(Default::default()).unwrap();

    let mut holder = qemu_io_holder(&p, false);
    wait_locked(&p, "101");
    let e = open(&r, &p, convert_source_flags()).err().expect("must be refused while qemu-io writes");
    assert_eq!(e.kind, ErrorKind::Locked);
    assert_eq!(e.msg, format!("Failed to get shared \"write\" lock\nIs another process using the image [{p}]?"));
    // Read-only users that share writes, and -U (force-share), still get in.
    assert!(open(&r, &p, OpenFlags::read_only()).is_ok());
    let mut fs = OpenFlags::read_only();
    fs.shared = Perm::ALL;
    assert!(open(&r, &p, fs).is_ok());
    // locking=off bypasses the check.
    let mut o = raw(&p);
    o.set("file.locking", "off");
    assert!(r.block_on(async move { Graph::new(basalt_formats::registry()).open(o, convert_source_flags()).await }).is_ok());
    holder.kill().unwrap();
    holder.wait().unwrap();

    // Now Basalt holds the image as a convert source: qemu-io's writer is refused.
    let node = open(&r, &p, convert_source_flags()).unwrap();
    let out = peer("qemu-io").args(["-f", "raw", "-c", "write 0 512", &p]).output().unwrap();
    assert!(stderr(&out).contains("Failed to get \"write\" lock"), "{}", stderr(&out));
    // qemu-io read-only is fine.
    let out = peer("qemu-io").args(["-r", "-f", "raw", "-c", "read 0 512", &p]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    drop(node);
    let out = peer("qemu-io").args(["-f", "raw", "-c", "write 0 512", &p]).output().unwrap();
    assert!(out.status.success(), "released on close: {}", stderr(&out));
}

#[test]
fn basalt_writer_refuses_qemu_img_convert_source() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(&dir);
    let r = Reactor::new(Default::default()).unwrap();
    let node = open(&r, &p, OpenFlags::read_write()).unwrap();
    let target = dir.path().join("out.raw");
    let out = peer("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &p, target.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("Failed to get shared \"write\" lock"), "{}", stderr(&out));
    // With -U qemu-img may read it.
    let out = peer("qemu-img").args(["convert", "-U", "-f", "raw", "-O", "raw", &p, target.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    drop(node);
    let out = peer("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &p, target.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn basalt_img_convert_is_refused_while_qemu_io_writes() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(&dir);
    let mut holder = qemu_io_holder(&p, false);
    wait_locked(&p, "101");
    let target = dir.path().join("o.raw");
    let out = Command::new(basalt_tests::tool("basalt-img"))
        .args(["convert", "-f", "raw", "-O", "raw", &p, target.to_str().unwrap()])
        .output()
        .unwrap();
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!(
            "basalt-img: Could not open '{p}': Failed to get shared \"write\" lock\nIs another process using the image [{p}]?\n"
        )
    );
}
