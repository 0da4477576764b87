//! qcow2 `check` against qemu-img check: clean images report no errors and the same cluster
//! statistics; leaked clusters and refcount errors made by editing an image are found, and
//! repairing them (`-r leaks`, `-r all`) leaves an image qemu-img finds clean.

use std::process::Command;

use basalt_engine::{Graph, OpenFlags, Opts};
use basalt_formats::qcow2::{CheckReport, Qcow2Node, Repair};
use basalt_reactor::{Reactor, ReactorConfig};
use basalt_tests::{peer, run, stderr, stdout};

fn check(path: &str, repair: Repair) -> CheckReport {
    let p = path.to_string();
    let r = Reactor::new(ReactorConfig::default()).unwrap();
    r.block_on(async move {
        let graph = Graph::new(basalt_formats::registry());
        let mut o = Opts::new();
        o.set("driver", "qcow2");
        o.set("file.filename", &p);
        let flags = if repair == Repair::None { OpenFlags::read_only() } else { OpenFlags::read_write() };
        let node = graph.open(o, flags).await.unwrap();
        let q = node.as_any().downcast_ref::<Qcow2Node>().expect("a qcow2 node");
        q.check(repair).await.unwrap()
    })
}

fn qemu_check(path: &str) -> (i32, String) {
    let o = run(peer("qemu-img").args(["check", "-f", "qcow2", path]));
    (o.status.code().unwrap_or(-1), stdout(&o) + &stderr(&o))
}

fn image(dir: &tempfile::TempDir, name: &str, opts: &str) -> String {
    let p = dir.path().join(name).to_str().unwrap().to_string();
    assert!(run(peer("qemu-img").args(["create", "-q", "-f", "qcow2", "-o", opts, &p, "64M"])).status.success());
    let o = run(peer("qemu-io").args([
        "-f",
        "qcow2",
        "-c",
        "write -P 1 0 1M",
        "-c",
        "write -P 2 5M 64k",
        "-c",
        "write -c -P 3 8M 64k",
        "-c",
        "write -z 9M 64k",
        "-c",
        "write -P 4 40M 4k",
        "-c",
        "discard 5M 64k",
        &p,
    ]));
    assert!(o.status.success(), "{}", stderr(&o));
    p
}

fn be64_at(path: &str, off: u64) -> u64 {
    let d = std::fs::read(path).unwrap();
    u64::from_be_bytes(d[off as usize..off as usize + 8].try_into().unwrap())
}

fn poke(path: &str, off: u64, bytes: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(bytes).unwrap();
}

#[test]
fn clean_images_match_qemu_img_statistics() {
    let d = tempfile::tempdir().unwrap();
    for (i, o) in ["cluster_size=65536", "cluster_size=4096,refcount_bits=8", "compat=0.10", "extended_l2=on"].iter().enumerate()
    {
        let p = image(&d, &format!("c{i}.qcow2"), o);
        let r = check(&p, Repair::None);
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{o}: {:?}", r.messages);
        let (code, out) = qemu_check(&p);
        assert_eq!(code, 0, "{out}");
        let line = format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            r.allocated_clusters as f64 * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / r.allocated_clusters.max(1) as f64,
            r.compressed_clusters as f64 * 100.0 / r.allocated_clusters.max(1) as f64
        );
        assert!(out.contains(&line), "{o}: ours '{line}' vs qemu-img:\n{out}");
        assert!(out.contains(&format!("Image end offset: {}", r.image_end_offset)), "{o}: {} vs\n{out}", r.image_end_offset);
    }
}

#[test]
fn leaks_and_refcount_errors_are_found_and_repaired() {
    let d = tempfile::tempdir().unwrap();
    let p = image(&d, "l.qcow2", "cluster_size=65536");
    // Leak: drop the L2 entry of guest cluster 0 (data stays referenced by its refcount only).
    let l1 = be64_at(&p, 40);
    let l2 = be64_at(&p, l1) & 0x00ff_ffff_ffff_fe00;
    poke(&p, l2, &[0u8; 8]);
    let r = check(&p, Repair::None);
    assert_eq!(r.leaks, 1, "{:?}", r.messages);
    assert_eq!(r.corruptions, 0);
    assert!(r.messages.iter().any(|m| m.starts_with("Leaked cluster")), "{:?}", r.messages);
    let (code, _) = qemu_check(&p);
    assert_eq!(code, 3, "qemu-img sees the same leak");
    let r = check(&p, Repair::Leaks);
    assert_eq!(r.leaks_fixed, 1);
    let (code, out) = qemu_check(&p);
    assert_eq!(code, 0, "{out}");

    // Refcount error: zero the refcount of the L2 table's cluster (still referenced by L1).
    let rt = be64_at(&p, 48);
    let rb = be64_at(&p, rt);
    poke(&p, rb + (l2 / 65536) * 2, &[0, 0]);
    // Two errors, as qemu-img counts them: the refcount, and the L1 entry's COPIED flag that
    // no longer matches it.
    let r = check(&p, Repair::None);
    assert_eq!(r.corruptions, 2, "{:?}", r.messages);
    let (code, _) = qemu_check(&p);
    assert_eq!(code, 2, "qemu-img sees the corruption");
    // A cluster in use with a refcount of 0 calls for new refcount structures: -r leaks stops
    // there (as qemu-img: the check fails), -r all rebuilds them.
    let r = check(&p, Repair::Leaks);
    assert_eq!((r.corruptions, r.corruptions_fixed, r.check_errors), (1, 0, 1), "{:?}", r.messages);
    assert_eq!(r.failed, Some(basalt_engine::IoStatus::EIO));
    assert_eq!(r.messages.last().map(String::as_str), Some("ERROR need to rebuild refcount structures"));
    let r = check(&p, Repair::All);
    assert_eq!(r.corruptions_fixed, 1, "{:?}", r.messages);
    assert!(r.messages.iter().any(|m| m == "Rebuilding refcount structure"), "{:?}", r.messages);
    let (code, out) = qemu_check(&p);
    assert_eq!(code, 0, "{out}");
    // The data survived.
    let o = run(Command::new(basalt_tests::tool("basalt-io")).args(["-f", "qcow2", "-c", "read -P 4 40M 4k", &p]));
    assert!(o.status.success() && !stdout(&o).contains("Pattern verification failed"), "{}", stdout(&o));
}

#[test]
fn dirty_lazy_refcount_images_are_repaired_on_open() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("lz.qcow2").to_str().unwrap().to_string();
    assert!(run(peer("qemu-img").args(["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", &p, "64M"])).status.success());
    // qemu-io aborts without closing: the image stays dirty with refcounts not written.
    let _ = run(peer("qemu-io").args(["-c", "write -P 9 0 1M", "-c", "write -P 7 5M 64k", "-c", "abort", &p]));
    let info = stdout(&run(peer("qemu-img").args(["info", &p])));
    assert!(info.contains("cleanly shut down: no"), "{info}");
    let (code, _) = qemu_check(&p);
    assert_ne!(code, 0, "the aborted image needs repair");
    // Opening it read-write repairs it as QEMU does (the same messages on stderr, the same
    // file byte for byte); the data is there.
    let q = format!("{p}.q");
    std::fs::copy(&p, &q).unwrap();
    let qo = run(peer("qemu-io").args(["-c", "read -P 9 0 1M", &q]));
    let o = run(Command::new(basalt_tests::tool("basalt-io")).args(["-c", "read -P 9 0 1M", "-c", "read -P 7 5M 64k", &p]));
    assert!(o.status.success() && !stdout(&o).contains("verification failed"), "{}", stdout(&o));
    assert_eq!(basalt_tests::stderr(&o), basalt_tests::stderr(&qo), "repair messages on open");
    assert!(basalt_tests::stderr(&o).contains("Rebuilding refcount structure"));
    assert!(std::fs::read(&p).unwrap() == std::fs::read(&q).unwrap(), "the repaired files differ");
    let (code, out) = qemu_check(&p);
    assert_eq!(code, 0, "{out}");
    let info = stdout(&run(peer("qemu-img").args(["info", &p])));
    assert!(!info.contains("cleanly shut down: no"), "{info}");
    assert!(info.contains("lazy refcounts: true"), "{info}");
}
