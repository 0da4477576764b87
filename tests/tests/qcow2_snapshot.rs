//! qcow2 internal snapshots against QEMU's tools and a plain model.
//!
//! - Snapshot tables QEMU writes (and hand-edited entries with VM state sizes, VM clocks, no
//!   icount, long names) are listed by `basalt-img snapshot -l` and `info` (human and JSON)
//!   exactly as qemu-img lists them.
//! - Snapshots Basalt creates, applies and deletes leave images clean under `qemu-img check`,
//!   identical under `qemu-img compare` to QEMU doing the same to a copy, and each snapshot
//!   reads back (applied by qemu-img) as the model says; and the other way round.
//! - A seeded random sequence of writes, zero writes, discards, compressed writes, resizes and
//!   snapshot create/apply/delete is checked against an in-memory model (the image compared
//!   with a raw copy of the model by qemu-img) with `qemu-img check` at every step.
//! - Crash safety: a fault at every metadata point of create/apply/delete (and of the
//!   copy-on-write of a shared L2 table) leaves no corruption, and the image reads as before
//!   or after the operation.

use std::path::Path;
use std::process::{Command, Output};

use basalt_engine::{Backend, Graph, OpenFlags, Opts, WriteFlags};
use basalt_reactor::{IoBuf, Reactor, ReactorConfig};
use basalt_tests::{assert_same_img_outcome, must, peer, run, stderr, stdout, tool, Rng};

fn qemu_img(dir: &Path, args: &[&str]) -> Output {
    run(peer("qemu-img").current_dir(dir).env("TZ", "Europe/Berlin").args(args))
}

fn qemu_io(dir: &Path, args: &[&str]) -> Output {
    run(peer("qemu-io").current_dir(dir).args(args))
}

/// Basalt's tools run under `timeout`, so that a hang fails the test instead of stalling it.
fn basalt_img(dir: &Path, args: &[&str]) -> Output {
    run(Command::new("timeout").current_dir(dir).env("TZ", "Europe/Berlin").arg("120").arg(tool("basalt-img")).args(args))
}

fn basalt_io(dir: &Path, args: &[&str]) -> Output {
    run(Command::new("timeout").current_dir(dir).arg("120").arg(tool("basalt-io")).args(args))
}

fn same_output(dir: &Path, args: &[&str]) {
    assert_same_img_outcome(&basalt_img(dir, args), &qemu_img(dir, args), &format!("{args:?}"));
}

fn check_clean(dir: &Path, img: &str) {
    let o = qemu_img(dir, &["check", img]);
    assert!(
        o.status.code() == Some(0) && stdout(&o).contains("No errors were found"),
        "qemu-img check {img} ({:?}):\n{}{}",
        o.status.code(),
        stdout(&o),
        stderr(&o)
    );
}

fn identical(dir: &Path, a: &str, b: &str) {
    let o = qemu_img(dir, &["compare", a, b]);
    assert_eq!(o.status.code(), Some(0), "qemu-img compare {a} {b}: {}{}", stdout(&o), stderr(&o));
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}

fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

#[test]
fn snapshot_lists_match_qemu() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "64M"]), "create");
    must(&qemu_io(dir, &["-c", "write -q -P 1 0 128k", "a.qcow2"]), "write");
    for name in ["s1", "s1", "a-much-longer-snapshot-name", ""] {
        must(&qemu_img(dir, &["snapshot", "-c", name, "a.qcow2"]), "snapshot -c");
    }
    // Edit the entries as a VM's savevm would have left them: VM state, clock, no icount.
    let path = dir.join("a.qcow2");
    let mut b = std::fs::read(&path).unwrap();
    let mut at = be64(&b, 64) as usize;
    let vals = [(1_234_567u64, 3_723_456_789_012u64, u64::MAX), (5 << 30, 360_000_000_000_005, 12_345_678_901), (512, 999, 7)];
    for (vm, clock, icount) in vals {
        let extra = be32(&b, at + 36) as usize;
        let len = (40
            + extra
            + usize::from(u16::from_be_bytes([b[at + 12], b[at + 13]]))
            + usize::from(u16::from_be_bytes([b[at + 14], b[at + 15]])))
        .next_multiple_of(8);
        b[at + 24..at + 32].copy_from_slice(&clock.to_be_bytes());
        b[at + 32..at + 36].copy_from_slice(&u32::try_from(vm).unwrap_or(0).to_be_bytes());
        b[at + 40..at + 48].copy_from_slice(&vm.to_be_bytes());
        b[at + 56..at + 64].copy_from_slice(&icount.to_be_bytes());
        at += len;
    }
    std::fs::write(&path, &b).unwrap();
    for args in [
        &["snapshot", "-l", "a.qcow2"][..],
        &["snapshot", "a.qcow2"],
        &["snapshot", "-U", "-l", "a.qcow2"],
        &["info", "a.qcow2"],
        &["info", "--output=json", "a.qcow2"],
        &["snapshot", "-a", "nope", "a.qcow2"],
        &["snapshot", "-d", "nope", "a.qcow2"],
        &["snapshot", "-d", "2", "a.qcow2"],
        &["snapshot", "-l", "-c", "x", "a.qcow2"],
        &["snapshot", "-c", "x"],
        &["snapshot", "-c", "x", "a.qcow2", "b.qcow2"],
        &["snapshot", "-U", "-c", "x", "a.qcow2"],
    ] {
        same_output(dir, args);
    }
    // One-bit refcounts cannot count a snapshot's references: refused before anything changes
    // (qemu-img fails half-way with EINVAL and leaks clusters).
    must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", "one.qcow2", "1M"]), "create");
    must(&qemu_io(dir, &["-c", "write -q -P 1 0 64k", "one.qcow2"]), "write");
    let o = basalt_img(dir, &["snapshot", "-c", "x", "one.qcow2"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("Reference count overflow: refcount_bits=1"), "{}", stderr(&o));
    check_clean(dir, "one.qcow2");
    // A raw image has no snapshots: nothing listed, creation refused.
    must(&qemu_img(dir, &["create", "-q", "-f", "raw", "r.raw", "1M"]), "create raw");
    same_output(dir, &["snapshot", "-f", "raw", "-l", "r.raw"]);
    same_output(dir, &["snapshot", "-f", "raw", "-c", "x", "r.raw"]);
}

/// Write `pat` at `off` in the model and in the image (through basalt-io or qemu-io).
fn write_both(dir: &Path, img: &str, model: &mut [u8], off: usize, len: usize, pat: u8, basalt: bool) {
    model[off..off + len].fill(pat);
    let cmd = format!("write -q -P {pat} {off} {len}");
    let o = if basalt { basalt_io(dir, &["-c", &cmd, img]) } else { qemu_io(dir, &["-c", &cmd, img]) };
    must(&o, &cmd);
}

/// The image reads as `model` (qemu-img compares it with a raw copy).
fn reads_as(dir: &Path, img: &str, model: &[u8]) {
    std::fs::write(dir.join("model.raw"), model).unwrap();
    let o = qemu_img(dir, &["compare", "-f", "raw", "-F", "qcow2", "model.raw", img]);
    assert_eq!(o.status.code(), Some(0), "{img} does not read as the model: {}{}", stdout(&o), stderr(&o));
}

/// Apply snapshot `name` to a copy of `img` with qemu-img; the copy must read as `model`.
fn snapshot_reads_as(dir: &Path, img: &str, name: &str, model: &[u8]) {
    std::fs::copy(dir.join(img), dir.join("copy.qcow2")).unwrap();
    must(&qemu_img(dir, &["snapshot", "-a", name, "copy.qcow2"]), "qemu-img snapshot -a");
    reads_as(dir, "copy.qcow2", model);
}

#[test]
fn snapshots_interoperate_both_ways() {
    for (opts, basalt_makes) in [
        ("cluster_size=65536", true),
        ("cluster_size=4096,refcount_bits=4", true),
        ("compat=0.10", false),
        ("extended_l2=on", true),
        ("cluster_size=65536", false),
    ] {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let size = 8usize << 20;
        // `b.qcow2` gets the operations from Basalt when `basalt_makes`, else from QEMU; `q.qcow2`
        // always from QEMU. Then the other tool applies and deletes, on both.
        for img in ["b.qcow2", "q.qcow2"] {
            must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "-o", opts, img, "8M"]), "create");
        }
        let mut model = vec![0u8; size];
        let mut states = Vec::new();
        let snap = |img: &str, name: &str, by_basalt: bool| {
            let o = if by_basalt {
                basalt_img(dir, &["snapshot", "-c", name, img])
            } else {
                qemu_img(dir, &["snapshot", "-c", name, img])
            };
            must(&o, "snapshot -c");
        };
        for (k, (off, len)) in [(0usize, 200_000usize), (65_000, 70_000), (3 << 20, 1 << 20), (100, 1)].into_iter().enumerate() {
            let pat = k as u8 + 1;
            let mut m2 = model.clone();
            write_both(dir, "b.qcow2", &mut model, off, len, pat, basalt_makes);
            write_both(dir, "q.qcow2", &mut m2, off, len, pat, false);
            let name = format!("s{k}");
            snap("b.qcow2", &name, basalt_makes);
            snap("q.qcow2", &name, false);
            states.push((name, model.clone()));
        }
        // Overwrite after the last snapshot: shared clusters and L2 tables are copied.
        let mut m2 = model.clone();
        write_both(dir, "b.qcow2", &mut model, 30_000, 3 << 20, 0xee, basalt_makes);
        write_both(dir, "q.qcow2", &mut m2, 30_000, 3 << 20, 0xee, false);
        for img in ["b.qcow2", "q.qcow2"] {
            check_clean(dir, img);
            reads_as(dir, img, &model);
            for (name, m) in &states {
                snapshot_reads_as(dir, img, name, m);
            }
        }
        same_output(dir, &["snapshot", "-U", "-l", "q.qcow2"]);
        // The other tool applies and deletes, on both images alike.
        let other = |args: &[&str]| if basalt_makes { qemu_img(dir, args) } else { basalt_img(dir, args) };
        for img in ["b.qcow2", "q.qcow2"] {
            must(&other(&["snapshot", "-a", "s1", img]), "snapshot -a");
            check_clean(dir, img);
            reads_as(dir, img, &states[1].1);
            must(&other(&["snapshot", "-d", "s0", img]), "snapshot -d");
            must(&other(&["snapshot", "-d", "s2", img]), "snapshot -d");
            check_clean(dir, img);
            reads_as(dir, img, &states[1].1);
            snapshot_reads_as(dir, img, "s3", &states[3].1);
            must(&other(&["snapshot", "-a", "2", img]), "snapshot -a by id");
            reads_as(dir, img, &states[1].1);
        }
        identical(dir, "b.qcow2", "q.qcow2");
        // Writes by Basalt after QEMU's operations (and the other way round) stay clean.
        let mut mb = states[1].1.clone();
        write_both(dir, "b.qcow2", &mut mb, 1 << 20, 2 << 20, 0x55, true);
        check_clean(dir, "b.qcow2");
        reads_as(dir, "b.qcow2", &mb);
        snapshot_reads_as(dir, "b.qcow2", "s1", &states[1].1);
        // Delete everything: what is left is exactly the active image.
        for name in ["s1", "s3"] {
            must(&basalt_img(dir, &["snapshot", "-d", name, "b.qcow2"]), "snapshot -d");
        }
        check_clean(dir, "b.qcow2");
        reads_as(dir, "b.qcow2", &mb);
        let o = basalt_img(dir, &["snapshot", "-l", "b.qcow2"]);
        assert_eq!(stdout(&o), "", "{opts}: snapshots left");
    }
}

/// Random operations against a model: (name, content) per snapshot, the live content.
fn random_with_snapshots(opts: &str, cs: u64, seed: u64, steps: usize) {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let mut size = 4u64 << 20;
    must(&basalt_img(dir, &["create", "-q", "-f", "qcow2", "-o", opts, "i.qcow2", &size.to_string()]), "create");
    let mut model = vec![0u8; size as usize];
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    let mut r = Rng(seed);
    let mut next_name = 0;
    for step in 0..steps {
        let what = r.below(20);
        let desc;
        if what < 12 {
            // A batch of data operations in one basalt-io run.
            let mut args: Vec<String> = Vec::new();
            for _ in 0..6 {
                let len = 1 + r.below(3 * cs);
                let off = r.below(size - len);
                match r.below(8) {
                    0 | 1 => {
                        model[off as usize..(off + len) as usize].fill(0);
                        args.extend(["-c".into(), format!("write -q -z {off} {len}")]);
                    }
                    2 => {
                        // Discard of whole clusters reads back as zeroes (no backing file).
                        let a = off.next_multiple_of(cs);
                        let e = (off + len) / cs * cs;
                        if e > a {
                            model[a as usize..e as usize].fill(0);
                            args.extend(["-c".into(), format!("discard -q {a} {}", e - a)]);
                        }
                    }
                    3 => {
                        // Compressed data only goes to clusters without a host cluster (as in
                        // QEMU): discard the cluster first.
                        let a = off / cs * cs;
                        let n = cs.min(size - a);
                        let pat = 1 + r.below(250) as u8;
                        model[a as usize..(a + n) as usize].fill(pat);
                        args.extend(["-c".into(), format!("discard -q {a} {n}")]);
                        args.extend(["-c".into(), format!("write -q -c -P {pat} {a} {n}")]);
                    }
                    _ => {
                        let pat = 1 + r.below(250) as u8;
                        model[off as usize..(off + len) as usize].fill(pat);
                        args.extend(["-c".into(), format!("write -q -P {pat} {off} {len}")]);
                    }
                }
            }
            args.push("i.qcow2".into());
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            must(&basalt_io(dir, &a), "basalt-io batch");
            desc = format!("io {args:?}");
        } else if what < 15 || snaps.is_empty() {
            let name = format!("n{next_name}");
            next_name += 1;
            must(&basalt_img(dir, &["snapshot", "-c", &name, "i.qcow2"]), "snapshot -c");
            snaps.push((name.clone(), model.clone()));
            desc = format!("create {name}");
        } else if what < 17 {
            let i = r.below(snaps.len() as u64) as usize;
            must(&basalt_img(dir, &["snapshot", "-a", &snaps[i].0, "i.qcow2"]), "snapshot -a");
            model = snaps[i].1.clone();
            size = model.len() as u64;
            desc = format!("apply {}", snaps[i].0);
        } else if what < 19 {
            let i = r.below(snaps.len() as u64) as usize;
            let (name, _) = snaps.remove(i);
            must(&basalt_img(dir, &["snapshot", "-d", &name, "i.qcow2"]), "snapshot -d");
            desc = format!("delete {name}");
        } else {
            let new = (1 + r.below(6)) << 20;
            let o = basalt_img(dir, &["resize", "-q", "--shrink", "i.qcow2", &new.to_string()]);
            must(&o, "resize");
            model.resize(new as usize, 0);
            size = new;
            desc = format!("resize {new}");
        }
        let o = qemu_img(dir, &["check", "i.qcow2"]);
        assert!(
            o.status.code() == Some(0),
            "{opts} seed {seed} step {step} ({desc}): qemu-img check:\n{}{}",
            stdout(&o),
            stderr(&o)
        );
        if step % 4 == 3 || step + 1 == steps {
            reads_as(dir, "i.qcow2", &model);
        }
    }
    for (name, m) in &snaps {
        snapshot_reads_as(dir, "i.qcow2", name, m);
    }
}

#[test]
fn random_sequences_with_snapshots_64k() {
    random_with_snapshots("cluster_size=65536", 65536, 0x5a4e_0001, 60);
}

#[test]
fn random_sequences_with_snapshots_small_clusters() {
    random_with_snapshots("cluster_size=4096,refcount_bits=4", 4096, 0x5a4e_0002, 50);
    random_with_snapshots("cluster_size=16384,extended_l2=on", 16384, 0x5a4e_0003, 30);
}

// ---------------------------------------------------------------------------------------------
// Crash safety.

#[derive(Clone, Copy, Debug)]
enum SnapOp {
    Create,
    Apply,
    Delete,
    /// A write to a cluster whose L2 table a snapshot shares.
    CowWrite,
}

fn open_rw(path: &str, fault: Option<(&str, u32)>) -> Opts {
    let mut o = Opts::new();
    o.set("driver", "qcow2");
    o.set("file.filename", path);
    if let Some((f, n)) = fault {
        o.set("x-fault", f);
        o.set("x-fault-after", n.to_string());
    }
    o
}

/// Run `op` with the fault armed; true when the fault fired.
fn faulty(path: &str, op: SnapOp, fault: (&str, u32)) -> bool {
    let o = open_rw(path, Some(fault));
    let r = Reactor::new(ReactorConfig::default()).unwrap();
    r.block_on(async move {
        let graph = Graph::new(basalt_formats::registry());
        let node = graph.open(o, OpenFlags::read_write()).await.unwrap();
        let res = match op {
            SnapOp::Create => node.snapshot_create("new").await.map(|_| ()),
            SnapOp::Apply => node.snapshot_goto("old").await.map(|_| ()),
            SnapOp::Delete => node.snapshot_delete("old").await.map(|_| ()),
            SnapOp::CowWrite => {
                let be = Backend::new(node.clone()).unwrap();
                let d = be.write(4096, IoBuf::from_slice(&[0x77; 8192]), WriteFlags::default()).await;
                match d.res {
                    Ok(_) => be.flush().await.res.map(|_| ()).map_err(basalt_engine::BlockError::from),
                    Err(e) => Err(e.into()),
                }
            }
        };
        res.is_err()
    })
}

#[test]
fn snapshot_operations_survive_a_crash_at_every_point() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let points = [
        "snapshot.l1",
        "snapshot.table",
        "snapshot.header",
        "l1.write",
        "l1.update",
        "l2.cow",
        "refblock.writeback",
        "l2.writeback",
    ];
    // Base: 1 MiB of data in 4k clusters, snapshot "old", then 1 MiB more written.
    must(&basalt_img(dir, &["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "base.qcow2", "4M"]), "create");
    let mut before = vec![0u8; 4 << 20];
    write_both(dir, "base.qcow2", &mut before, 0, 1 << 20, 0x11, true);
    must(&basalt_img(dir, &["snapshot", "-c", "old", "base.qcow2"]), "snapshot");
    let old = before.clone();
    // Past the first L2 table's range (2 MiB of 4k clusters), so that table stays shared.
    write_both(dir, "base.qcow2", &mut before, 5 << 19, 1 << 20, 0x22, true);
    let mut after_write = before.clone();
    after_write[4096..4096 + 8192].fill(0x77);
    let mut fired_any = std::collections::BTreeSet::new();
    for op in [SnapOp::Create, SnapOp::Apply, SnapOp::Delete, SnapOp::CowWrite] {
        for point in points {
            for n in 1..=3u32 {
                let img = format!("{op:?}-{point}-{n}.qcow2");
                std::fs::copy(dir.join("base.qcow2"), dir.join(&img)).unwrap();
                let path = dir.join(&img).to_str().unwrap().to_string();
                if !faulty(&path, op, (point, n)) {
                    continue;
                }
                fired_any.insert(point);
                let o = qemu_img(dir, &["check", &img]);
                let code = o.status.code().unwrap_or(-1);
                // Refcounts and COPIED flags live in different clusters: a crash between the
                // two updates leaves flags that disagree with a (higher) refcount, which QEMU
                // counts as errors although no data is at risk; any repair fixes them. Nothing
                // else may be wrong.
                let copied_only = code == 2
                    && stderr(&o).lines().filter(|l| l.starts_with("ERROR")).all(|l| l.starts_with("ERROR OFLAG_COPIED"));
                assert!(
                    code == 0 || code == 3 || copied_only,
                    "{op:?} {point}#{n}: qemu-img check exit {code}:\n{}{}",
                    stdout(&o),
                    stderr(&o)
                );
                if copied_only {
                    std::fs::copy(dir.join(&img), dir.join("repair.qcow2")).unwrap();
                    let r = qemu_img(dir, &["check", "-r", "all", "repair.qcow2"]);
                    assert_eq!(r.status.code(), Some(0), "{op:?} {point}#{n}: repair: {}{}", stdout(&r), stderr(&r));
                }
                // The image reads as before the operation or after it (a write that failed may
                // have landed in some of its clusters and not in others).
                let o = qemu_img(dir, &["convert", "-O", "raw", &img, "now.raw"]);
                must(&o, "qemu-img convert");
                let now = std::fs::read(dir.join("now.raw")).unwrap();
                let alt = match op {
                    SnapOp::Apply => &old,
                    SnapOp::CowWrite => &after_write,
                    _ => &before,
                };
                match op {
                    SnapOp::CowWrite => {
                        for (k, c) in now.chunks(4096).enumerate() {
                            let r = k * 4096..k * 4096 + c.len();
                            assert!(
                                c == &before[r.clone()] || c == &alt[r],
                                "{op:?} {point}#{n}: cluster {k} reads as neither state"
                            );
                        }
                    }
                    _ => assert!(now == before || now == *alt, "{op:?} {point}#{n}: the image reads as neither state"),
                }
                let list = stdout(&qemu_img(dir, &["snapshot", "-l", &img]));
                if list.contains(" old ") {
                    snapshot_reads_as(dir, &img, "old", &old);
                } else {
                    assert!(matches!(op, SnapOp::Delete), "{op:?} {point}#{n}: snapshot lost");
                }
            }
        }
    }
    for p in points {
        assert!(fired_any.contains(p), "fault point {p} was never reached by the snapshot operations");
    }
}
