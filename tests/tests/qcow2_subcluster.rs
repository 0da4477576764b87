//! Subclusters (`extended_l2=on`) against qemu-io: partial writes allocate only the
//! subclusters they touch (the rest of the cluster keeps reading from the backing file, or as
//! zeroes), zero writes set subcluster zero bits instead of writing zeroes, and a partial
//! subcluster is zeroed whole where the rest of it reads as zeroes already. The same commands
//! through basalt-io and qemu-io leave the same content and the same `qemu-img map`.

use std::path::Path;
use std::process::Command;

use basalt_tests::{must, peer, run, stdout, tool};

fn map(dir: &Path, img: &str) -> String {
    let o = run(peer("qemu-img").current_dir(dir).args(["map", "--output=json", img]));
    must(&o, "map");
    stdout(&o)
}

#[test]
fn subcluster_writes_and_zeroes_match_qemu_io() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    must(&run(peer("qemu-img").current_dir(dir).args(["create", "-q", "-f", "qcow2", "base.qcow2", "1M"])), "create");
    must(&run(peer("qemu-io").current_dir(dir).args(["-c", "write -P 1 0 1M", "base.qcow2"])), "write");
    let base_cmds = [
        "write -P 2 100k 4k",
        "write -P 3 1000 10k",
        "write -z 500k 64k",
        "write -P 4 520k 1k",
        "write -z 700k 1k",
        "write -z 800k 3k",
        "write -z -u 128k 64k",
        "write -z 96k 8k",
        "COMPRESSED",
        "write -z 196k 2k",
        "write -P 6 300k 2k",
        "write -z 4000 100k",
    ];
    for (backing, cluster) in [(true, "64k"), (false, "32k"), (true, "32k"), (false, "2M")] {
        let what = format!("backing {backing}, cluster_size {cluster}");
        // A compressed write covers a whole cluster (or runs to the end of the image).
        let compressed = match cluster {
            // (qemu-io fails a compressed write over an allocated cluster of this size.)
            "2M" => "flush".to_string(),
            c => format!("write -c -P 5 256k {c}"),
        };
        let cmds: Vec<&str> = base_cmds.iter().map(|c| if *c == "COMPRESSED" { compressed.as_str() } else { c }).collect();
        for (name, tool_cmd) in [("q.qcow2", peer("qemu-io")), ("b.qcow2", Command::new(tool("basalt-io")))] {
            let _ = std::fs::remove_file(dir.join(name));
            let mut create = peer("qemu-img");
            create.current_dir(dir).args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("extended_l2=on,cluster_size={cluster}"),
            ]);
            if backing {
                create.args(["-b", "base.qcow2", "-F", "qcow2"]);
            }
            must(&run(create.args([name, "1M"])), "create");
            let mut c = tool_cmd;
            c.current_dir(dir);
            for x in &cmds {
                c.args(["-c", *x]);
            }
            let o = run(c.arg(name));
            must(&o, &what);
            assert!(!stdout(&o).contains("failed"), "{what}: {}", stdout(&o));
        }
        must(&run(peer("qemu-img").current_dir(dir).args(["compare", "q.qcow2", "b.qcow2"])), &what);
        must(&run(peer("qemu-img").current_dir(dir).args(["check", "b.qcow2"])), &what);
        let m = map(dir, "b.qcow2");
        assert_eq!(m, map(dir, "q.qcow2"), "{what}: allocation differs");
        // Zero subclusters are in the map (the test would pass on plain zero writes otherwise).
        assert!(m.contains("\"zero\": true, \"data\": false, \"compressed\": false, \"offset\""), "{what}: {m}");
    }
}
