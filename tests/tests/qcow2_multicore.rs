//! One qcow2 node served by two reactors at once (each with its own queue, as `basalt-bench
//! --cores=2` and the multi-core convert use it): concurrent allocating writes, copy-on-write
//! of partial clusters, zeroing and discards on both cores, sharing L2 tables and refcount
//! blocks, and both cores allocating the same guest clusters. The image must come out clean
//! under `qemu-img check` and read back, through qemu-img, exactly as a model of the writes.

use std::sync::{Arc, Mutex};

use basalt_engine::{Backend, Graph, Node, OpenFlags, Opts, WriteFlags, ZeroFlags};
use basalt_reactor::{IoBuf, Runtime, RuntimeConfig};
use basalt_tests::{must, peer, run, Rng};

const CS: u64 = 4096;
const SIZE: u64 = 32 << 20;
/// Tasks per reactor, each owning its own guest clusters (so the model is exact) while the
/// clusters of all tasks interleave in the same L2 tables and refcount blocks.
const TASKS: u64 = 4;
const REACTORS: u64 = 2;
/// A task that panicked or hangs fails the test instead of stalling it.
const WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A random operation on clusters owned by `me`, applied to the node and to `model`.
async fn one_op(be: &Backend, r: &mut Rng, me: u64, model: &Mutex<Vec<u8>>) {
    let clusters = SIZE / CS;
    // A cluster of ours, and a run of up to 3 of ours (stride REACTORS * TASKS).
    let stride = REACTORS * TASKS;
    let gc = r.below(clusters / stride) * stride + me;
    let base = gc * CS;
    match r.below(8) {
        0..=2 => {
            // Partial write inside the cluster (copy-on-write of the rest).
            let o = r.below(CS - 1);
            let n = 1 + r.below(CS - o);
            let fill = (r.next() % 250 + 1) as u8;
            let d = be.write(base + o, IoBuf::from_slice(&vec![fill; n as usize]), WriteFlags::default()).await;
            d.res.expect("partial write");
            model.lock().unwrap()[(base + o) as usize..(base + o + n) as usize].fill(fill);
        }
        3 | 4 => {
            // Whole-cluster write.
            let fill = (r.next() % 250 + 1) as u8;
            let d = be.write(base, IoBuf::from_slice(&vec![fill; CS as usize]), WriteFlags::default()).await;
            d.res.expect("cluster write");
            model.lock().unwrap()[base as usize..(base + CS) as usize].fill(fill);
        }
        5 => {
            let unmap = r.below(2) == 0;
            let d = be.write_zeroes(base, CS, ZeroFlags { may_unmap: unmap, ..Default::default() }).await;
            d.res.expect("write_zeroes");
            model.lock().unwrap()[base as usize..(base + CS) as usize].fill(0);
        }
        6 => {
            // Discard reads back as zeroes on a v3 image without a backing file.
            be.discard(base, CS).await.res.expect("discard");
            model.lock().unwrap()[base as usize..(base + CS) as usize].fill(0);
        }
        _ => {
            // Overwrite in place (the fast path once allocated) while others free and reuse
            // clusters around it.
            let o = r.below(CS / 512) * 512;
            let fill = (r.next() % 250 + 1) as u8;
            let d = be.write(base + o, IoBuf::from_slice(&[fill; 512]), WriteFlags::default()).await;
            d.res.expect("sector write");
            model.lock().unwrap()[(base + o) as usize..(base + o + 512) as usize].fill(fill);
        }
    }
}

fn qemu_read_all(path: &str, dir: &std::path::Path) -> Vec<u8> {
    let raw = dir.join("out.raw");
    must(&run(peer("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw", path, raw.to_str().unwrap()])), "qemu-img convert");
    std::fs::read(raw).unwrap()
}

#[test]
fn one_qcow2_node_written_from_two_reactors_stays_consistent() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("mc.qcow2").to_str().unwrap().to_string();
    must(
        &run(peer("qemu-img").args(["create", "-q", "-f", "qcow2", "-o", &format!("cluster_size={CS}"), &p, &SIZE.to_string()])),
        "qemu-img create",
    );
    let rt = Runtime::new(RuntimeConfig::cores(REACTORS as usize, false)).unwrap();
    let p2 = p.clone();
    // Small caches, so tables are evicted and reloaded while the other core changes them.
    let node: Arc<dyn Node> = rt.block_on(0, move || async move {
        let graph = Graph::new(basalt_formats::registry());
        let mut o = Opts::new();
        o.set("driver", "qcow2");
        o.set("file.filename", &p2);
        o.set("l2-cache-size", "16K");
        o.set("refcount-cache-size", "8K");
        graph.open(o, OpenFlags::read_write()).await.unwrap()
    });
    let model = Arc::new(Mutex::new(vec![0u8; SIZE as usize]));

    // Phase 1: both reactors race on the same fresh clusters, each writing its own half of
    // every cluster: both halves must survive (allocations of one cluster are serialised
    // across reactors).
    let shared: Vec<u64> = (0..64).map(|k| k * 37 % (SIZE / CS)).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    for core in 0..REACTORS {
        let (node, tx, shared, model) = (node.clone(), tx.clone(), shared.clone(), model.clone());
        rt.handle(core as usize).spawn(move || async move {
            let be = Backend::new(node).unwrap();
            let half = CS / REACTORS;
            let fill = 0xa0 + core as u8;
            let mut jobs = Vec::new();
            for gc in shared {
                let be = be.clone();
                let off = gc * CS + core * half;
                jobs.push(basalt_reactor::spawn_local(async move {
                    be.write(off, IoBuf::from_slice(&vec![fill; half as usize]), WriteFlags::default()).await.res.is_ok()
                }));
                model.lock().unwrap()[off as usize..(off + half) as usize].fill(fill);
            }
            let mut ok = true;
            for j in jobs {
                ok &= j.await;
            }
            tx.send(ok).unwrap();
        });
    }
    drop(tx);
    for _ in 0..REACTORS {
        assert!(rx.recv_timeout(WAIT).expect("phase 1 finished"), "a racing half-cluster write failed");
    }

    // Phase 2: random operations, TASKS concurrent tasks per reactor on clusters of their own.
    let (tx, rx) = std::sync::mpsc::channel();
    for core in 0..REACTORS {
        let (node, tx, model) = (node.clone(), tx.clone(), model.clone());
        rt.handle(core as usize).spawn(move || async move {
            let be = Backend::new(node).unwrap();
            let mut jobs = Vec::new();
            for t in 0..TASKS {
                let (be, model) = (be.clone(), model.clone());
                let me = core * TASKS + t;
                jobs.push(basalt_reactor::spawn_local(async move {
                    let mut r = Rng(0x9e37_79b9_7f4a_7c15 ^ (me + 1).wrapping_mul(0x1234_5678_9abc_def1));
                    for _ in 0..600 {
                        one_op(&be, &mut r, me, &model).await;
                    }
                }));
            }
            for j in jobs {
                j.await;
            }
            be.flush().await.res.expect("flush");
            tx.send(()).unwrap();
        });
    }
    drop(tx);
    for _ in 0..REACTORS {
        rx.recv_timeout(WAIT).expect("phase 2 finished");
    }
    // Reads from both reactors see the same content as the model.
    for core in 0..REACTORS {
        let (node, model) = (node.clone(), model.clone());
        let ok = rt.block_on(core as usize, move || async move {
            let be = Backend::new(node).unwrap();
            let d = be.read(0, IoBuf::new(SIZE as usize)).await;
            d.res.is_ok() && d.buf.unwrap()[..] == model.lock().unwrap()[..]
        });
        assert!(ok, "reactor {core} reads what was written");
    }
    rt.block_on(0, move || async move { node.close().await.unwrap() });
    drop(rt);

    let c = run(peer("qemu-img").args(["check", &p]));
    assert!(c.status.success(), "qemu-img check: {}{}", basalt_tests::stdout(&c), basalt_tests::stderr(&c));
    let got = qemu_read_all(&p, d.path());
    let want = model.lock().unwrap();
    let first_bad = got.iter().zip(want.iter()).position(|(a, b)| a != b);
    assert!(first_bad.is_none(), "content differs first at byte {first_bad:?}");
}
