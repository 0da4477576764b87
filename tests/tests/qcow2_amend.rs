//! `basalt-img amend` against `qemu-img amend`: the same amendments to copies of the same
//! image (zero clusters, a backing file, internal snapshots) leave images that read the same
//! (`qemu-img compare`, every snapshot applied too), have the same format-specific `info`,
//! are clean under `qemu-img check`, and map the same; refused amendments print qemu-img's
//! errors. LUKS key slots (`encrypt.*`) are added and removed as qemu-img does, each tool
//! opening the other's keys (`basalt_tests::keyslots`); the external data file's name and
//! `data_file_raw` change as qemu-img changes them, to the same image bytes.

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
        &["amend", "-o", "compat=2", "v2.qcow2"],
        &["amend", "-o", "backing_file=foo", "v2.qcow2"],
        &["amend", "-o", "encrypt.state=active,encrypt.new-secret=x", "v2.qcow2"],
        &["amend", "-o", "encrypt.iter-time=10", "v2.qcow2"],
        &["amend", "-o", "encrypt.format=luks", "v2.qcow2"],
    ] {
        assert_same_img_outcome(&basalt_img(dir, args), &qemu_img(dir, args), &format!("{args:?}"));
    }
}

/// Keys added and removed by basalt-img amend open (or not) in qemu-io and vice versa, the
/// key slots and `info` match qemu-img's after the same amendments, the data reads back and
/// `qemu-img check` finds the image clean.
#[test]
fn amend_keyslots_both_ways() {
    basalt_tests::keyslots::keyslots_both_ways(&basalt_tests::keyslots::QCOW2);
}

/// Refused key slot amendments print qemu-img's errors and leave the image as it was.
#[test]
fn amend_keyslot_errors_match_qemu() {
    basalt_tests::keyslots::keyslot_errors(&basalt_tests::keyslots::QCOW2);
    // Legacy AES encryption has no key slots.
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let obj = ["--object", "secret,id=sec0,data=abc"];
    let mut create = vec!["create", "-q", "-f", "qcow2"];
    create.extend(obj);
    create.extend(["-o", "encrypt.format=aes,encrypt.key-secret=sec0", "aes.qcow2", "1M"]);
    must(&qemu_img(dir, &create), "create aes");
    let mut args = vec!["amend"];
    args.extend(obj);
    args.extend(["--image-opts", "driver=qcow2,file.filename=aes.qcow2,encrypt.key-secret=sec0", "-o", "encrypt.state=active"]);
    assert_same_img_outcome(&basalt_img(dir, &args), &qemu_img(dir, &args), "aes key slots");
}

/// `data_file` and `data_file_raw` amendments: the same image bytes, outcome and `check` as
/// qemu-img's, in two directories holding copies under the same names; the data reads back
/// through the renamed data file.
#[test]
fn amend_data_file_matches_qemu() {
    let root = tempfile::tempdir().unwrap();
    let (dq, db) = (root.path().join("q"), root.path().join("b"));
    std::fs::create_dir(&dq).unwrap();
    std::fs::create_dir(&db).unwrap();
    must(
        &qemu_img(&dq, &["create", "-q", "-f", "qcow2", "-o", "data_file=img.data,data_file_raw=on", "a.qcow2", "4M"]),
        "create",
    );
    must(&qemu_img(&dq, &["create", "-q", "-f", "qcow2", "p.qcow2", "4M"]), "create plain");
    must(&qemu_io(&dq, &["-c", "write -P 7 0 1M", "-c", "write -P 9 3M 64k", "a.qcow2"]), "write");
    for f in ["a.qcow2", "img.data", "p.qcow2"] {
        std::fs::copy(dq.join(f), db.join(f)).unwrap();
    }
    let opened = |data: &str| format!("driver=qcow2,file.filename=a.qcow2,data-file.filename={data}");
    // (image-opts data file or the image name, options, then rename the data file to)
    type Step<'a> = (Option<&'a str>, &'a str, Option<(&'a str, &'a str)>);
    let steps: &[Step] = &[
        (None, "data_file_raw=on", None),
        (None, "data_file_raw=off", None),
        (None, "data_file_raw=on", None),
        (None, "data_file=img.data,data_file_raw=on", None),
        (None, "data_file=other.data", Some(("img.data", "other.data"))),
        (Some("other.data"), "data_file=", None),
        (None, "data_file=x", None),
        (Some("other.data"), "data_file=third.data,data_file_raw=off", Some(("other.data", "third.data"))),
        (None, "data_file_raw=off", None),
    ];
    for &(data, opts, rename) in steps {
        let img_opts = data.map(opened);
        let mut args = vec!["amend", "-o", opts];
        match &img_opts {
            Some(o) => args.extend(["--image-opts", o.as_str()]),
            None => args.push("a.qcow2"),
        }
        let (b, q) = (basalt_img(&db, &args), qemu_img(&dq, &args));
        assert_same_img_outcome(&b, &q, &format!("{args:?}"));
        assert!(
            std::fs::read(db.join("a.qcow2")).unwrap() == std::fs::read(dq.join("a.qcow2")).unwrap(),
            "{args:?}: the images differ"
        );
        if let Some((from, to)) = rename {
            for d in [&dq, &db] {
                std::fs::rename(d.join(from), d.join(to)).unwrap();
            }
        }
        // Opened by the name the header holds, or (without one) as QEMU refuses it.
        let c = (qemu_img(&db, &["check", "a.qcow2"]), qemu_img(&dq, &["check", "a.qcow2"]));
        assert_eq!((c.0.status.code(), stdout(&c.0), stderr(&c.0)), (c.1.status.code(), stdout(&c.1), stderr(&c.1)), "{opts}");
        let r = qemu_io(&db, &["-c", "read -P 7 0 1M", "-c", "read -P 9 3M 64k", "a.qcow2"]);
        if c.1.status.success() {
            assert!(r.status.success() && !stdout(&r).contains("fail"), "{opts}: {}{}", stdout(&r), stderr(&r));
        } else {
            assert!(stderr(&c.1).contains("'data-file' is required for this image"), "{opts}: {}", stderr(&c.1));
        }
    }
    // A plain image has no data file to name, nor can it become raw.
    for opts in ["data_file=foo", "data_file=", "data_file_raw=on", "data_file_raw=off", "data_file_raw=x"] {
        let args = ["amend", "-o", opts, "p.qcow2"];
        assert_same_img_outcome(&basalt_img(&db, &args), &qemu_img(&dq, &args), opts);
    }
}
