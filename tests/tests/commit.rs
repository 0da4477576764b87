//! `basalt-img commit` against qemu-img commit on qcow2 backing chains: `-b BASE` naming the
//! bottom, a middle or the immediate backing image of 3- and 4-deep chains (data, zero
//! clusters, partial clusters, different cluster sizes and image sizes, so the base grows),
//! and plain commit. Both tools run on identical copies; afterwards every image reads the same
//! as qemu-img's (`qemu-img compare`), has the same allocation (`qemu-img map` flags; host
//! offsets may differ), is clean under `qemu-img check`, the base reads as the top did before
//! and the top still does (`-b` implies `-d`). `-b` naming no image of the chain and bad `-r`
//! values (and a bad `-t`) fail with qemu-img's messages; `-r` really limits the copy.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use basalt_tests::{assert_same_img_outcome, peer, run, stderr, stdout, tool};

fn sh(dir: &Path, cmd: &mut Command) -> Output {
    let o = run(cmd.current_dir(dir));
    assert!(o.status.success(), "{cmd:?}: {}{}", stdout(&o), stderr(&o));
    o
}

/// One image of a chain: qcow2 creation options, size, qemu-io commands.
struct Layer {
    opts: &'static str,
    size: &'static str,
    io: &'static [&'static str],
}

/// Create `l0.qcow2` (bottom) .. `lN.qcow2` (top) in `dir`, each backed by the one before.
fn build(dir: &Path, layers: &[Layer]) {
    std::fs::create_dir_all(dir).unwrap();
    for (i, l) in layers.iter().enumerate() {
        let name = format!("l{i}.qcow2");
        let mut c = peer("qemu-img");
        c.args(["create", "-q", "-f", "qcow2", "-o", l.opts]);
        if i > 0 {
            c.args(["-b", &format!("l{}.qcow2", i - 1), "-F", "qcow2"]);
        }
        sh(dir, c.args([&name, l.size]));
        let mut io = peer("qemu-io");
        for cmd in l.io {
            io.args(["-c", cmd]);
        }
        sh(dir, io.arg(&name));
    }
}

/// `qemu-img map --output=json` without host offsets, adjacent extents of equal status merged.
fn map(dir: &Path, img: &str) -> Vec<serde_json::Value> {
    let o = sh(dir, peer("qemu-img").args(["map", "--output=json", img]));
    let v: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    let mut out: Vec<serde_json::Value> = Vec::new();
    for mut e in v {
        e.as_object_mut().unwrap().remove("offset");
        if let Some(last) = out.last_mut() {
            let same = ["depth", "present", "zero", "data", "compressed"].iter().all(|k| last[k] == e[k]);
            let end = last["start"].as_u64().unwrap() + last["length"].as_u64().unwrap();
            if same && end == e["start"].as_u64().unwrap() {
                last["length"] = (last["length"].as_u64().unwrap() + e["length"].as_u64().unwrap()).into();
                continue;
            }
        }
        out.push(e);
    }
    out
}

fn compare(a: &Path, b: &Path) -> Output {
    run(peer("qemu-img").args(["compare"]).arg(a).arg(b))
}

fn check_clean(dir: &Path, img: &str) {
    let c = sh(dir, peer("qemu-img").args(["check", img]));
    assert!(stdout(&c).contains("No errors were found"), "{img}: {}", stdout(&c));
}

/// 3 deep: 64k base with data everywhere, a 4k-cluster middle, a top with partial clusters.
const THREE: &[Layer] = &[
    Layer { opts: "cluster_size=65536", size: "4M", io: &["write -P 1 0 4M"] },
    Layer {
        opts: "cluster_size=4096",
        size: "4M",
        io: &["write -P 2 64k 200k", "write -z 512k 300k", "write -P 5 1536k 7", "write -z 3000k 5k"],
    },
    Layer {
        opts: "cluster_size=65536",
        size: "4M",
        io: &["write -P 3 4k 1k", "write -z 1M 128k", "write -P 4 600k 70k", "write -P 6 3146240 1000", "write -z 2M 64k"],
    },
];

/// 4 deep, every layer another cluster size: a small 2M-cluster base with subclusters, a
/// 512-byte-cluster layer (its block status answers 32 KiB at a time), images larger than the
/// ones below them, zeroes over data and past a lower image's end.
const FOUR: &[Layer] = &[
    Layer { opts: "cluster_size=2M,extended_l2=on", size: "3M", io: &["write -P 1 0 3M"] },
    Layer { opts: "cluster_size=512", size: "2M", io: &["write -P 2 64k 200k", "write -z 512k 300k", "write -P 5 1536k 7"] },
    Layer {
        opts: "cluster_size=1M",
        size: "5M",
        io: &["write -P 3 3000k 100k", "write -z 700k 64k", "write -P 6 4k 1k", "write -z 1100k 1000k"],
    },
    Layer {
        opts: "cluster_size=65536",
        size: "5M",
        io: &["write -P 4 4500k 300k", "write -z 0 4k", "write -P 8 1200k 64k", "write -z 2600k 700k", "write -P 9 131000 3000"],
    },
];

/// Commit `layers` with `args` (plus the top) by both tools and compare everything.
fn commit_both(root: &Path, layers: &[Layer], args: &[&str], base: usize) {
    let (o, q, orig) = (root.join("o"), root.join("q"), root.join("orig"));
    for d in [&o, &q, &orig] {
        let _ = std::fs::remove_dir_all(d);
        build(d, layers);
    }
    let top = format!("l{}.qcow2", layers.len() - 1);
    let base_img = format!("l{base}.qcow2");
    // The test means something: the base does not read as the top yet.
    assert_eq!(compare(&orig.join(&base_img), &orig.join(&top)).status.code(), Some(1), "{args:?}: base already reads as top");
    let ours = run(Command::new(tool("basalt-img")).current_dir(&o).arg("commit").args(args).arg(&top));
    let theirs = run(peer("qemu-img").current_dir(&q).arg("commit").args(args).arg(&top));
    assert_same_img_outcome(&ours, &theirs, &format!("commit {args:?}"));
    assert!(ours.status.success(), "{args:?}: {}", stderr(&ours));
    for i in 0..layers.len() {
        let img = format!("l{i}.qcow2");
        let c = compare(&o.join(&img), &q.join(&img));
        assert!(c.status.success(), "{args:?}: {img} differs from qemu-img's: {}{}", stdout(&c), stderr(&c));
        assert_eq!(map(&o, &img), map(&q, &img), "{args:?}: {img} is allocated differently from qemu-img's");
        check_clean(&o, &img);
    }
    // The data moved: the base reads as the top did.
    let c = compare(&o.join(&base_img), &orig.join(&top));
    assert!(c.status.success(), "{args:?}: {base_img} does not read as the top did: {}", stdout(&c));
    // With -b the top is kept (and still reads the same); without, it is emptied.
    let c = compare(&o.join(&top), &orig.join(&top));
    assert!(c.status.success(), "{args:?}: the top's view changed: {}", stdout(&c));
    let top_map = map(&o, &top);
    let top_owns = top_map.iter().any(|e| e["depth"] == 0 && e["present"] == true);
    assert_eq!(top_owns, args.contains(&"-b"), "{args:?}: top map {top_map:?}");
}

#[test]
fn commit_to_base_in_three_deep_chain() {
    let d = tempfile::tempdir().unwrap();
    commit_both(d.path(), THREE, &["-b", "l0.qcow2"], 0);
    commit_both(d.path(), THREE, &["-b", "l1.qcow2"], 1);
    commit_both(d.path(), THREE, &[], 1);
}

#[test]
fn commit_to_base_in_four_deep_chain() {
    let d = tempfile::tempdir().unwrap();
    commit_both(d.path(), FOUR, &["-b", "l0.qcow2"], 0);
    commit_both(d.path(), FOUR, &["-b", "./l1.qcow2"], 1);
    commit_both(d.path(), FOUR, &["-q", "-b", "l2.qcow2"], 2);
    commit_both(d.path(), FOUR, &[], 2);
}

#[test]
fn commit_base_not_in_chain_fails_as_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    build(&dir.join("c"), THREE);
    // Run from the parent: relative names are taken from each image's directory, not ours.
    for args in [
        &["-b", "nothere.qcow2", "c/l2.qcow2"][..],
        &["-b", "c/l0.qcow2", "c/l2.qcow2"],
        &["-b", "l2.qcow2", "c/l2.qcow2"],
        &["-b", "", "c/l2.qcow2"],
        &["-b", "file:l0.qcow2", "c/l2.qcow2"],
        &["-b", "l0.qcow2", "c/l0.qcow2"],
        &["c/l0.qcow2"],
        &["-t", "foo", "-b", "l0.qcow2", "c/l2.qcow2"],
    ] {
        let ours = run(Command::new(tool("basalt-img")).current_dir(dir).arg("commit").args(args));
        let theirs = run(peer("qemu-img").current_dir(dir).arg("commit").args(args));
        assert_same_img_outcome(&ours, &theirs, &format!("commit {args:?}"));
        assert_eq!(ours.status.code(), Some(1), "{args:?}");
    }
    let theirs = run(peer("qemu-img").current_dir(dir).args(["commit", "-b", "x", "c/l2.qcow2"]));
    assert_eq!(stderr(&theirs), "qemu-img: Did not find 'x' in the backing chain of 'c/l2.qcow2'\n");
    // Nothing was written by the failed runs.
    let c = compare(&dir.join("c/l0.qcow2"), &dir.join("c/l2.qcow2"));
    assert_eq!(c.status.code(), Some(1));
}

#[test]
fn commit_rate_limit() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let layers = &[
        Layer { opts: "cluster_size=65536", size: "1M", io: &["write -P 1 0 1M"] },
        Layer { opts: "cluster_size=65536", size: "1M", io: &["write -P 2 0 64k"] },
        Layer { opts: "cluster_size=65536", size: "1M", io: &["write -P 3 512k 64k", "write -z 768k 128k"] },
    ];
    for sub in ["o", "q", "bad"] {
        build(&dir.join(sub), layers);
    }
    // 128 KiB of data at 128 KiB/s: about a second (zero writes are not counted).
    let t = Instant::now();
    let ours = run(Command::new(tool("basalt-img"))
        .current_dir(dir.join("o"))
        .args(["commit", "-r", "128k", "-b", "l0.qcow2", "l2.qcow2"]));
    let took = t.elapsed();
    let theirs = run(peer("qemu-img").current_dir(dir.join("q")).args(["commit", "-r", "128k", "-b", "l0.qcow2", "l2.qcow2"]));
    assert_same_img_outcome(&ours, &theirs, "commit -r 128k");
    assert!(ours.status.success());
    assert!(took >= Duration::from_millis(900), "-r 128k copied 128 KiB in {took:?}");
    assert!(took < Duration::from_secs(20), "-r 128k took {took:?}");
    for i in 0..3 {
        let img = format!("l{i}.qcow2");
        let c = compare(&dir.join("o").join(&img), &dir.join("q").join(&img));
        assert!(c.status.success(), "{img}: {}", stdout(&c));
    }
    assert!(compare(&dir.join("o/l0.qcow2"), &dir.join("bad/l2.qcow2")).status.success(), "the data did not move");
    // 0 means unlimited.
    let o = run(Command::new(tool("basalt-img")).current_dir(dir.join("o")).args(["commit", "-r", "0", "l2.qcow2"]));
    assert!(o.status.success(), "{}", stderr(&o));
    // Bad values: refused before anything is opened, as qemu-img.
    for r in ["foo", "-1", "1.5", "", "1.5b", "9223372036854775808", "18446744073709551616"] {
        let args = ["commit", "-r", r, "l2.qcow2"];
        let ours = run(Command::new(tool("basalt-img")).current_dir(dir.join("bad")).args(args));
        let theirs = run(peer("qemu-img").current_dir(dir.join("bad")).args(args));
        assert_same_img_outcome(&ours, &theirs, &format!("commit -r '{r}'"));
        assert_eq!(ours.status.code(), Some(1), "-r '{r}'");
    }
    let theirs = run(peer("qemu-img").current_dir(dir.join("bad")).args(["commit", "-r", "foo", "l2.qcow2"]));
    assert_eq!(stderr(&theirs), "qemu-img: Invalid rate limit specified: 'foo'.\n");
    let theirs = run(peer("qemu-img").current_dir(dir.join("bad")).args(["commit", "-r", "-1", "l2.qcow2"]));
    assert_eq!(stderr(&theirs), "qemu-img: Invalid rate limit specified. Must be between 0 and 9223372036854775807.\n");
    assert_eq!(compare(&dir.join("bad/l0.qcow2"), &dir.join("bad/l2.qcow2")).status.code(), Some(1));
}
