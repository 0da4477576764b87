//! `basalt-img amend` against `qemu-img amend`: the same amendments to copies of the same
//! image (zero clusters, a backing file, internal snapshots) leave images that read the same
//! (`qemu-img compare`, every snapshot applied too), have the same format-specific `info`,
//! are clean under `qemu-img check`, and map the same; refused amendments print qemu-img's
//! errors.

use std::path::Path;
use std::process::{Command, Output};

use basalt_tests::{assert_same_img_outcome, must, peer, run, stderr, stdout, tool};

fn qemu_img(dir: &Path, args: &[&str]) -> Output {
    run(peer("qemu-img").current_dir(dir).args(args))
}

fn qemu_io(dir: &Path, args: &[&str]) -> Output {
    run(peer("qemu-io").current_dir(dir).args(args))
}

fn basalt_img(dir: &Path, args: &[&str]) -> Output {
    run(Command::new("timeout").current_dir(dir).arg("120").arg(tool("basalt-img")).args(args))
}

fn specific(dir: &Path, img: &str) -> String {
    let o = qemu_img(dir, &["info", "--output=json", "-U", img]);
    must(&o, "info");
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    format!("{} {}", v["virtual-size"], v["format-specific"])
}

fn same_result(dir: &Path, what: &str) {
    let c = qemu_img(dir, &["check", "b.qcow2"]);
    assert_eq!(c.status.code(), Some(0), "{what}: qemu-img check:\n{}{}", stdout(&c), stderr(&c));
    assert_eq!(specific(dir, "b.qcow2"), specific(dir, "q.qcow2"), "{what}: info differs");
    let o = qemu_img(dir, &["compare", "b.qcow2", "q.qcow2"]);
    assert_eq!(o.status.code(), Some(0), "{what}: {}{}", stdout(&o), stderr(&o));
    let map = |img: &str| {
        let o = qemu_img(dir, &["map", "--output=json", img]);
        // Offsets differ with layout; what is data, zero and allocated must not.
        let v: Vec<serde_json::Value> = serde_json::from_str(&stdout(&o)).unwrap();
        v.into_iter().map(|e| (e["start"].clone(), e["length"].clone(), e["data"].clone(), e["zero"].clone())).collect::<Vec<_>>()
    };
    assert_eq!(map("b.qcow2"), map("q.qcow2"), "{what}: maps differ");
    let list = stdout(&qemu_img(dir, &["snapshot", "-l", "q.qcow2"]));
    for name in ["s1"] {
        if list.contains(name) {
            for img in ["b", "q"] {
                std::fs::copy(dir.join(format!("{img}.qcow2")), dir.join(format!("{img}-snap.qcow2"))).unwrap();
                must(&qemu_img(dir, &["snapshot", "-a", name, &format!("{img}-snap.qcow2")]), "snapshot -a");
            }
            let o = qemu_img(dir, &["compare", "b-snap.qcow2", "q-snap.qcow2"]);
            assert_eq!(o.status.code(), Some(0), "{what}: snapshot {name}: {}{}", stdout(&o), stderr(&o));
        }
    }
}

#[test]
fn amend_matches_qemu() {
    for (backing, snapshots) in [(false, false), (true, false), (false, true)] {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]), "create base");
        must(&qemu_io(dir, &["-c", "write -P 9 0 8M", "base.qcow2"]), "fill base");
        let mut create = vec!["create", "-q", "-f", "qcow2"];
        if backing {
            create.extend(["-b", "base.qcow2", "-F", "qcow2"]);
        }
        create.extend(["a.qcow2", "8M"]);
        must(&qemu_img(dir, &create), "create");
        let io = ["write -P 1 0 1M", "write -z 64k 64k", "write -z -u 256k 64k", "write -z 2M 64k", "write -z 5M 128k"];
        let mut args: Vec<&str> = io.iter().flat_map(|c| ["-c", *c]).collect();
        args.push("a.qcow2");
        must(&qemu_io(dir, &args), "write");
        if snapshots {
            must(&qemu_img(dir, &["snapshot", "-c", "s1", "a.qcow2"]), "snapshot");
            must(&qemu_io(dir, &["-c", "write -z 0 128k", "-c", "write -P 3 6M 64k", "a.qcow2"]), "write");
        }
        std::fs::copy(dir.join("a.qcow2"), dir.join("b.qcow2")).unwrap();
        std::fs::copy(dir.join("a.qcow2"), dir.join("q.qcow2")).unwrap();
        for opts in [
            "compat=0.10",
            "compat=1.1",
            "lazy_refcounts=on",
            "refcount_bits=4",
            "refcount_bits=64,lazy_refcounts=off",
            "refcount_bits=16,compat=0.10",
            "compat=1.1,refcount_bits=2",
            "size=16M",
        ] {
            must(&basalt_img(dir, &["amend", "-o", opts, "b.qcow2"]), &format!("basalt-img amend {opts}"));
            must(&qemu_img(dir, &["amend", "-o", opts, "q.qcow2"]), &format!("qemu-img amend {opts}"));
            same_result(dir, &format!("backing {backing} snapshots {snapshots}: {opts}"));
        }
    }
}

#[test]
fn amend_errors_match_qemu() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "x.qcow2", "8M"]), "create");
    must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "-o", "refcount_bits=4", "r.qcow2", "8M"]), "create");
    must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "8M"]), "create");
    must(&qemu_img(dir, &["create", "-q", "-f", "raw", "r.raw", "8M"]), "create");
    // A snapshot taken at another disk size keeps an image from going back to version 2.
    must(&qemu_img(dir, &["create", "-q", "-f", "qcow2", "s.qcow2", "8M"]), "create");
    must(&qemu_img(dir, &["snapshot", "-c", "s1", "s.qcow2"]), "snapshot");
    must(&qemu_img(dir, &["resize", "-q", "s.qcow2", "16M"]), "resize");
    for args in [
        &["amend", "-o", "compat=0.10", "x.qcow2"][..],
        &["amend", "-o", "compat=0.10", "r.qcow2"],
        &["amend", "-o", "lazy_refcounts=on", "v2.qcow2"],
        &["amend", "-o", "cluster_size=4k", "v2.qcow2"],
        &["amend", "-o", "foo=1", "v2.qcow2"],
        &["amend", "v2.qcow2"],
        &["amend", "-o", "help", "v2.qcow2"],
        &["amend", "-f", "raw", "-o", "size=1M", "r.raw"],
        &["amend", "-o", "compat=0.10", "s.qcow2"],
    ] {
        assert_same_img_outcome(&basalt_img(dir, args), &qemu_img(dir, args), &format!("{args:?}"));
    }
}
