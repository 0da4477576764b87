//! The userspace NVMe driver on emulated controllers: a Linux guest under qemu-system-x86_64
//! (TCG) with two NVMe controllers bound to vfio-pci runs `tests/vfio/nvme-guest.sh` with
//! static builds of basalt-io, basalt-img and basalt-bench, once behind an emulated IOMMU
//! (type1) and once without one (noiommu). The controllers' drives are files here: the host
//! writes patterns before boot that the guest must read, and checks after the guest exits what
//! the guest wrote, at the right LBAs, with qemu-io and qemu-img as the oracle.
//!
//! Needs `scripts/vfio-guest/setup` (qemu-system-x86, guest kernel, noiommu vfio module) and the
//! guest binaries (`cargo build --profile guest --target x86_64-unknown-linux-gnu`, static);
//! `scripts/test` does both. Missing either is a failure, not a skip.

use std::path::{Path, PathBuf};
use std::process::Command;

use basalt_tests::{must, peer, run, stderr, stdout};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn guest_bins() -> Vec<PathBuf> {
    let dir = root().join("target/x86_64-unknown-linux-gnu/guest");
    ["basalt-io", "basalt-img", "basalt-bench"]
        .iter()
        .map(|b| {
            let p = dir.join(b);
            assert!(
                p.exists(),
                "{} is missing: build the static guest binaries with RUSTFLAGS='-C target-feature=+crt-static' cargo build \
                 --profile guest --target x86_64-unknown-linux-gnu -p basalt-tools -p basalt-bench --bins (scripts/test does)",
                p.display()
            );
            p
        })
        .collect()
}

fn qemu_io(args: &[&str]) {
    must(&run(peer("qemu-io").args(args)), &format!("qemu-io {args:?}"));
}

/// Every check the guest script makes; each must report "ok".
const CHECKS: &[&str] = &[
    "host-pattern-a",
    "host-pattern-b",
    "write-a",
    "read-a",
    "prp-lists",
    "write-b",
    "info-a",
    "img-bench-write",
    "img-bench-read",
    "make-src",
    "fill-src",
    "convert-2q",
    "bench-2q",
    "one-queue-pair",
    "qcow2-create",
    "qcow2-write",
    "qcow2-check",
    "qcow2-info",
    "no-device",
    "bad-address",
    "no-namespace",
    "bad-namespace",
    "in-use",
    "controller-gone",
    "not-vfio",
];

/// One boot; `hugepages` reserved in the guest (the reactors' buffer pools use them).
fn guest_run(mode: &str, hugepages: u32) {
    let bins = guest_bins();
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.img");
    let b = tmp.path().join("b.img");
    let (a_s, b_s) = (a.to_str().unwrap(), b.to_str().unwrap());
    must(&run(peer("qemu-img").args(["create", "-q", "-f", "raw", a_s, "128M"])), "create");
    must(&run(peer("qemu-img").args(["create", "-q", "-f", "raw", b_s, "64M"])), "create");
    qemu_io(&["-f", "raw", "-c", "write -P 0x5a 120M 512k", a_s]);
    qemu_io(&["-f", "raw", "-c", "write -P 0xa5 12k 4k", b_s]);

    let mut cmd = Command::new(root().join("scripts/vfio-guest/run"));
    cmd.args(["--mode", mode, "--smp", "2", "--hugepages", &hugepages.to_string(), "--script"])
        .arg(root().join("tests/vfio/nvme-guest.sh"));
    cmd.arg("--nvme").arg(format!("{a_s},max_ioqpairs=2,mdts=2,drive.discard=unmap"));
    cmd.arg("--nvme").arg(format!("{b_s},max_ioqpairs=1,logical_block_size=4096,physical_block_size=4096"));
    for bin in &bins {
        cmd.arg("--bin").arg(bin);
    }
    let log = tmp.path().join("console.log");
    cmd.arg("--log").arg(&log);
    let o = run(&mut cmd);
    let out = stdout(&o);
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    let tail: String = console.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    let lines: Vec<&str> = out.lines().collect();
    let extra: &[&str] = if mode == "noiommu" { &["noiommu-needs-hugepages"] } else { &[] };
    for c in CHECKS.iter().chain(extra) {
        let ok = lines.iter().any(|l| *l == format!("ok {c}") || l.starts_with(&format!("ok {c}:")));
        assert!(ok, "{mode}: guest check {c} did not pass.\nguest output:\n{out}\nstderr: {}\nconsole tail:\n{tail}", stderr(&o));
    }
    assert!(
        o.status.success(),
        "{mode}: guest run failed ({:?}):\n{out}\n{}\nconsole tail:\n{tail}",
        o.status.code(),
        stderr(&o)
    );

    // What the guest wrote is where it belongs in the drives.
    qemu_io(&[
        "-f",
        "raw",
        "-c",
        "read -P 1 0 32M",
        "-c",
        "read -P 2 32M 32M",
        "-c",
        "read -P 3 64M 32M",
        "-c",
        "read -P 0x11 100M 1M",
        "-c",
        "read -P 0 101M 1M",
        "-c",
        "read -P 0 102400000 512",
        "-c",
        "read -P 0x22 102400512 20480",
        "-c",
        "read -P 0 102420992 512",
        "-c",
        "read -P 0 103809030 1",
        "-c",
        "read -P 0x33 103809031 70001",
        "-c",
        "read -P 0 103879032 1",
        "-c",
        "read -P 0x44 104M 12k",
        "-c",
        "read -P 0 105M 2M",
        "-c",
        "read -P 0x88 110M 1M",
        "-c",
        "read -P 0x5a 120M 512k",
        a_s,
    ]);
    qemu_io(&["-f", "raw", "-c", "read -P 0 40M 64k", "-c", "read -P 0x66 42008576 960k", "-c", "read -P 0x77 41M 4k", b_s]);
    let o = run(peer("qemu-img").args(["check", "-f", "qcow2", b_s]));
    must(&o, "qemu-img check of the qcow2 image the guest made on namespace B");
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "read -P 0x44 0 1M",
        "-c",
        "read -P 0 1M 64k",
        "-c",
        "read -P 0x66 2M 64k",
        "-c",
        "read -P 0x55 20M 64k",
        "-c",
        "read -P 0 21M 11M",
        b_s,
    ]);
}

#[test]
fn nvme_behind_an_iommu() {
    // Behind the IOMMU a buffer is one run of IOVAs: transfers of more than two pages use an SGL
    // descriptor (QEMU's controller offers them); the buffer pools are on ordinary pages.
    guest_run("iommu", 0);
}

#[test]
fn nvme_without_an_iommu() {
    // Without an IOMMU the device gets physical addresses, which only hugepages keep in place:
    // the driver refuses to work without them (checked in the guest), so the boot reserves some.
    guest_run("noiommu", 64);
}
