//! Crash safety of qcow2 metadata: for every named fault-injection point, the Nth write at that
//! point fails and every write after it fails too (the process "dies" there). The image is then
//! reopened: `qemu-img check` must find no corruption (leaked clusters are allowed), and every
//! write acknowledged before a flush that completed must read back.

use basalt_engine::{Backend, Graph, OpenFlags, Opts, WriteFlags, ZeroFlags};
use basalt_reactor::{IoBuf, Reactor, ReactorConfig};
use basalt_tests::{peer, run, stdout};

const REGION: u64 = 3 << 20;

/// One phase: operations inside region `k`, then a flush.
fn phase_ops(k: u64) -> Vec<(u8, u64, u64, u8)> {
    // (kind, offset in region, length, pattern): 0 write, 1 write_zeroes, 2 discard, 3 compressed
    let mut v = Vec::new();
    let mut s = 0x9e37_79b9_u64.wrapping_mul(k + 1);
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    for i in 0..24u64 {
        let off = next() % (REGION - 300_000);
        let len = 1 + next() % 250_000;
        let kind = match i % 8 {
            5 => 1,
            6 => 2,
            7 => 3,
            _ => 0,
        };
        v.push((kind, off, len, (k * 40 + i + 1) as u8));
    }
    v
}

struct Outcome {
    /// Regions whose flush completed, with their expected content.
    durable: Vec<(u64, Vec<u8>)>,
    tripped: bool,
}

fn workload(path: &str, fault: Option<(&str, u32)>, cluster: u64) -> Outcome {
    let p = path.to_string();
    let fault = fault.map(|(a, n)| (a.to_string(), n));
    let r = Reactor::new(ReactorConfig::default()).unwrap();
    r.block_on(async move {
        let graph = Graph::new(basalt_formats::registry());
        let mut o = Opts::new();
        o.set("driver", "qcow2");
        o.set("file.filename", &p);
        if let Some((f, n)) = &fault {
            o.set("x-fault", f.clone());
            o.set("x-fault-after", n.to_string());
        }
        let be = Backend::new(graph.open(o, OpenFlags::read_write()).await.unwrap()).unwrap();
        let mut out = Outcome { durable: Vec::new(), tripped: false };
        // Bulk phase: 7 MiB of sequential writes past the phase regions, so that small clusters
        // outgrow the first refcount table.
        let bulk = 9u64 << 20;
        let mut model = vec![0u8; 7 << 20];
        for (i, chunk) in model.chunks_mut(1 << 10).enumerate() {
            chunk.fill(0x80 | i as u8);
            if be.write(bulk + (i as u64) * (1 << 10), IoBuf::from_slice(chunk), WriteFlags::default()).await.res.is_err() {
                out.tripped = true;
                return out;
            }
        }
        if be.flush().await.res.is_err() {
            out.tripped = true;
            return out;
        }
        out.durable.push((bulk, model));
        for k in 0..3u64 {
            let base = k * REGION;
            let mut model = vec![0u8; REGION as usize];
            for (kind, off, len, pat) in phase_ops(k) {
                let res = match kind {
                    0 => be.write(base + off, IoBuf::from_slice(&vec![pat; len as usize]), WriteFlags::default()).await.res,
                    1 => be.write_zeroes(base + off, len, ZeroFlags { may_unmap: pat % 2 == 0, ..Default::default() }).await.res,
                    2 => be.discard(base + off, len).await.res,
                    _ => {
                        let c0 = (base + off).next_multiple_of(cluster);
                        let data = vec![pat; 2 * cluster as usize];
                        let r = be.write_compressed(c0, IoBuf::from_slice(&data)).await.res;
                        if r.is_ok() {
                            let at = (c0 - base) as usize;
                            model[at..at + data.len()].copy_from_slice(&data);
                        }
                        r
                    }
                };
                if res.is_err() {
                    out.tripped = true;
                    return out;
                }
                let (o, l) = (off as usize, len as usize);
                match kind {
                    0 => model[o..o + l].fill(pat),
                    1 => model[o..o + l].fill(0),
                    // A discard leaves whole clusters reading as zeroes (no backing file).
                    2 => {
                        let a = (base + off).next_multiple_of(cluster) - base;
                        let b = ((base + off + len) / cluster * cluster).saturating_sub(base);
                        if b > a {
                            model[a as usize..b as usize].fill(0);
                        }
                    }
                    _ => {}
                }
            }
            if be.flush().await.res.is_err() {
                out.tripped = true;
                return out;
            }
            out.durable.push((base, model));
        }
        out
    })
}

fn read_back(path: &str, base: u64, len: usize) -> Vec<u8> {
    let p = path.to_string();
    let r = Reactor::new(ReactorConfig::default()).unwrap();
    r.block_on(async move {
        let graph = Graph::new(basalt_formats::registry());
        let mut o = Opts::new();
        o.set("driver", "qcow2");
        o.set("file.filename", &p);
        let be = Backend::new(graph.open(o, OpenFlags::read_only()).await.unwrap()).unwrap();
        let d = be.read(base, IoBuf::new(len)).await;
        assert!(d.res.is_ok());
        d.buf.unwrap().to_vec()
    })
}

fn run_point(point: &str, cluster: u64, size: &str) {
    let d = tempfile::tempdir().unwrap();
    let mut tripped_first = false;
    for n in [1u32, 2, 5] {
        let p = d.path().join(format!("{}-{n}.qcow2", point.replace('.', "_"))).to_str().unwrap().to_string();
        let o = run(std::process::Command::new(basalt_tests::tool("basalt-img")).args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cluster}"),
            &p,
            size,
        ]));
        assert!(o.status.success());
        let out = workload(&p, Some((point, n)), cluster);
        if n == 1 {
            tripped_first = out.tripped;
        }
        let c = run(peer("qemu-img").args(["check", "-f", "qcow2", &p]));
        let code = c.status.code().unwrap_or(-1);
        if !(code == 0 || code == 3) {
            let keep = format!("/tmp/crash-{}", p.rsplit('/').next().unwrap_or("x"));
            let _ = std::fs::copy(&p, &keep);
        }
        assert!(code == 0 || code == 3, "{point}#{n}: qemu-img check exit {code}:\n{}", stdout(&c));
        for (base, model) in &out.durable {
            let got = read_back(&p, *base, model.len());
            let bad = got.iter().zip(model).position(|(a, b)| a != b);
            assert!(bad.is_none(), "{point}#{n}: flushed data lost at {:#x}", base + bad.unwrap_or(0) as u64);
        }
    }
    assert!(tripped_first, "fault point {point} was never reached: the workload does not exercise it");
}

#[test]
fn allocation_points_4k_clusters() {
    for point in [
        "data.write",
        "data.zero-ahead",
        "compressed.write",
        "l2.alloc",
        "l2.entry",
        "l1.update",
        "refblock.writeback",
        "l2.writeback",
    ] {
        run_point(point, 4096, "16M");
    }
}

#[test]
fn refcount_structure_points_512_byte_clusters() {
    for point in ["refblock.alloc", "reftable.update", "reftable.grow.blocks", "reftable.grow.table", "reftable.grow.header"] {
        run_point(point, 512, "16M");
    }
}
