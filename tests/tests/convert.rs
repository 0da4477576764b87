//! `basalt-img convert` against qemu-img as the oracle: the same sources give images that
//! `qemu-img compare` finds identical and `qemu-img map` finds equally sparse, over the option
//! matrix (-S, -W, -m, -n, --target-image-opts, -t/-T, several sources, -p), and errors match.

use std::path::Path;
use std::process::Command;

use basalt_tests::{peer, run, stderr, stdout, tool};

fn img() -> Command {
    Command::new(tool("basalt-img"))
}

/// A 16 MiB raw image with data, explicit zeroes, holes and an unaligned tail of data.
fn source(dir: &Path) -> String {
    let p = dir.join("src.raw");
    let ps = p.to_str().unwrap().to_string();
    assert!(run(peer("qemu-img").args(["create", "-f", "raw", &ps, "16M"])).status.success());
    let o = run(peer("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x11 0 64k",
        "-c",
        "write -P 0 1M 1M",
        "-c",
        "write -P 0x22 3M 5000",
        "-c",
        "write -P 0x33 8M 2M",
        "-c",
        "write -P 0x44 16773120 4096",
        &ps,
    ]));
    assert!(o.status.success(), "{}", stderr(&o));
    ps
}

fn map_json(path: &str) -> String {
    let o = run(peer("qemu-img").args(["map", "--output=json", "-f", "raw", path]));
    assert!(o.status.success(), "{}", stderr(&o));
    stdout(&o)
}

fn compare(a: &str, b: &str) {
    let o = run(peer("qemu-img").args(["compare", "-f", "raw", "-F", "raw", a, b]));
    assert!(o.status.success(), "{} vs {}: {}{}", a, b, stdout(&o), stderr(&o));
}

#[test]
fn convert_matches_qemu_img_over_the_option_matrix() {
    let d = tempfile::tempdir().unwrap();
    let src = source(d.path());
    let cases: &[&[&str]] = &[
        &[],
        &["-S", "0"],
        &["-S", "64k"],
        &["-W"],
        &["-m", "1"],
        &["-m", "16", "-W"],
        &["-t", "none", "-T", "none"],
        &["-t", "writeback"],
    ];
    for (i, extra) in cases.iter().enumerate() {
        let ours = d.path().join(format!("b{i}.raw"));
        let theirs = d.path().join(format!("q{i}.raw"));
        let (o, t) = (ours.to_str().unwrap(), theirs.to_str().unwrap());
        let r = run(img().args(["convert", "-f", "raw", "-O", "raw"]).args(*extra).args([&src, o]));
        assert!(r.status.success(), "{extra:?}: {}", stderr(&r));
        assert_eq!(stdout(&r), "", "convert prints nothing without -p");
        let r = run(peer("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).args(*extra).args([&src, t]));
        assert!(r.status.success(), "{}", stderr(&r));
        compare(o, &src);
        compare(o, t);
        assert_eq!(map_json(o), map_json(t), "allocation differs from qemu-img's for {extra:?}");
    }
}

#[test]
fn convert_into_existing_targets_and_several_sources() {
    let d = tempfile::tempdir().unwrap();
    let src = source(d.path());
    // -n into a target full of garbage: zero ranges must be written as zeroes.
    let tgt = d.path().join("t.raw");
    std::fs::write(&tgt, vec![0xffu8; 16 << 20]).unwrap();
    let t = tgt.to_str().unwrap();
    let r = run(img().args(["convert", "-n", "-f", "raw", "-O", "raw", &src, t]));
    assert!(r.status.success(), "{}", stderr(&r));
    compare(t, &src);
    // --target-image-opts.
    std::fs::write(&tgt, vec![0xffu8; 16 << 20]).unwrap();
    let r =
        run(img().args(["convert", "-n", "--target-image-opts", "-f", "raw", &src, &format!("driver=raw,file.filename={t}")]));
    assert!(r.status.success(), "{}", stderr(&r));
    compare(t, &src);
    // Two sources are concatenated.
    let cat = d.path().join("cat.raw");
    let c = cat.to_str().unwrap();
    let r = run(img().args(["convert", "-f", "raw", "-O", "raw", &src, &src, c]));
    assert!(r.status.success(), "{}", stderr(&r));
    let q = d.path().join("qcat.raw");
    let r = run(peer("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &src, &src, q.to_str().unwrap()]));
    assert!(r.status.success());
    compare(c, q.to_str().unwrap());
    // null-co as a source.
    let n = d.path().join("n.raw");
    let r = run(img().args([
        "convert",
        "--image-opts",
        "driver=raw,file.driver=null-co,file.size=1M,file.read-zeroes=on",
        n.to_str().unwrap(),
    ]));
    assert!(r.status.success(), "{}", stderr(&r));
    assert_eq!(std::fs::metadata(&n).unwrap().len(), 1 << 20);
}

#[test]
fn convert_progress_and_errors_as_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let src = source(d.path());
    let o = d.path().join("p.raw");
    let r = run(img().args(["convert", "-p", "-f", "raw", "-O", "raw", &src, o.to_str().unwrap()]));
    let out = stdout(&r);
    assert!(out.starts_with("    (0.00/100%)\r"), "{out:?}");
    assert!(out.ends_with("    (100.00/100%)\r\n"), "{out:?}");

    let small = d.path().join("small.raw");
    std::fs::write(&small, vec![0u8; 65536]).unwrap();
    let s = small.to_str().unwrap();
    let missing = d.path().join("missing.raw");
    let m = missing.to_str().unwrap();
    let cases: Vec<Vec<String>> = vec![
        vec!["-n".into(), "-f".into(), "raw".into(), "-O".into(), "raw".into(), src.clone(), s.into()],
        vec!["-c".into(), "-f".into(), "raw".into(), "-O".into(), "raw".into(), src.clone(), o.to_str().unwrap().into()],
        vec!["-B".into(), "x".into(), "-f".into(), "raw".into(), src.clone(), o.to_str().unwrap().into()],
        vec!["-m".into(), "20".into(), "-f".into(), "raw".into(), src.clone(), o.to_str().unwrap().into()],
        vec!["-f".into(), "raw".into(), src.clone()],
        vec!["--target-image-opts".into(), "-f".into(), "raw".into(), src.clone(), "driver=raw".into()],
        vec!["-f".into(), "raw".into(), m.into(), o.to_str().unwrap().into()],
        vec!["-S".into(), "100".into(), "-f".into(), "raw".into(), src.clone(), o.to_str().unwrap().into()],
    ];
    for c in cases {
        let ours = run(img().arg("convert").args(&c));
        let theirs = run(peer("qemu-img").arg("convert").args(&c));
        assert_eq!(ours.status.code(), theirs.status.code(), "{c:?}");
        assert_eq!(stderr(&ours), stderr(&theirs).replace("qemu-img", "basalt-img"), "{c:?}");
    }
}
