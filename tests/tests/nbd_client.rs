//! Basalt's `nbd` client driver against real servers: qemu-nbd (extended headers, structured
//! replies, base:allocation) and nbdkit 1.32 (compact headers; memory, file, sparse-random,
//! the error filter, oldstyle). QEMU's tools over the same URIs are the oracle: the same
//! commands leave the same data, `info` and `map` print the same, errors read the same.
//! `NBD_CMD_CACHE` is seen arriving at nbdkit (its log filter) when basalt-nbd serves a node
//! that is an NBD client and gets a cache request.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use basalt_tests::{assert_same_img_outcome, must, peer, run, start_listening, stderr, stdout, tool, Listening};

fn serve(cmd: &mut Command, sock: &Path) -> Listening {
    start_listening(cmd.stderr(Stdio::null()), sock)
}

fn qemu_nbd(sock: &Path, args: &[&str], img: &Path) -> Listening {
    serve(peer("qemu-nbd").args(["-t", "-k"]).arg(sock).args(args).arg(img), sock)
}

fn nbdkit(sock: &Path, args: &[&str]) -> Listening {
    serve(peer("nbdkit").args(["-f", "-U"]).arg(sock).args(args), sock)
}

fn unix(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

fn basalt(name: &str, args: &[&str]) -> Output {
    run(Command::new(tool(name)).args(args))
}

/// qemu-io / basalt-io output without timings.
fn io_lines(o: &Output) -> String {
    let t = stdout(o) + &stderr(o);
    t.lines().filter(|l| !l.contains("ops/sec")).collect::<Vec<_>>().join("\n")
}

fn io(prog: &str, target: &str, cmds: &[&str]) -> Output {
    let mut c = if prog == "qemu-io" { peer("qemu-io") } else { Command::new(tool("basalt-io")) };
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    run(c.arg(target))
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Two copies of a qcow2 image served by qemu-nbd; the same writes through Basalt's client
/// and through qemu-io's leave identical images; info, map, compare and convert over NBD
/// agree with qemu-img's.
#[test]
fn client_against_qemu_nbd_matches_qemu() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (a, b) = (d.join("a.qcow2"), d.join("b.qcow2"));
    must(&run(peer("qemu-img").args(["create", "-q", "-f", "qcow2", path(&a), "64M"])), "create");
    must(&run(peer("qemu-io").args(["-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 5M 64k", path(&a)])), "fill");
    std::fs::copy(&a, &b).unwrap();
    let (sa, sb) = (d.join("a.sock"), d.join("b.sock"));
    let qa = qemu_nbd(&sa, &["-f", "qcow2", "-x", "disk", "--discard=unmap"], &a);
    let qb = qemu_nbd(&sb, &["-f", "qcow2", "-x", "disk", "--discard=unmap"], &b);
    let (ua, ub) = (unix(&sa, "disk"), unix(&sb, "disk"));
    let cmds = [
        "read -P 0x11 0 1M",
        "write -P 0x33 2M 128k",
        "write -P 0x44 3000001 77777",
        "write -z 5M 4k",
        "write -P 0x55 9M 2M",
        "discard 9M 1M",
        "aio_write -P 0x66 20M 64k",
        "aio_write -P 0x67 20M+64k 64k",
        "aio_flush",
        "read -P 0x33 2M 128k",
        "read -P 0 5M 4k",
        "read -P 0x22 5M+4k 60k",
        "flush",
    ];
    for c in cmds {
        let c = c.replace("20M+64k", "21037056").replace("5M+4k", "5246976");
        let bo = io("basalt-io", &ub, &[&c]);
        let qo = io("qemu-io", &ua, &[&c]);
        assert_eq!(io_lines(&bo), io_lines(&qo), "{c}");
        assert!(bo.status.success(), "{c}: {}", io_lines(&bo));
    }
    for (what, args) in [
        ("info", vec!["info"]),
        ("info json", vec!["info", "--output=json"]),
        ("map", vec!["map", "--output=json", "-f", "raw"]),
        ("map human", vec!["map", "-f", "raw"]),
    ] {
        let mut ba: Vec<&str> = args.clone();
        ba.push(&ub);
        let bo = basalt("basalt-img", &ba);
        let qo = run(peer("qemu-img").args(&ba));
        assert_same_img_outcome(&bo, &qo, what);
    }
    let cmp = basalt("basalt-img", &["compare", "-f", "raw", "-F", "raw", &ua, &ub]);
    assert_eq!(stdout(&cmp), "Images are identical.\n", "{}", stderr(&cmp));
    // Convert out of NBD and back into another export.
    let out = d.join("out.qcow2");
    must(&basalt("basalt-img", &["convert", "-f", "raw", "-O", "qcow2", &ub, path(&out)]), "convert from NBD");
    must(&run(peer("qemu-img").args(["compare", "-f", "qcow2", "-F", "raw", path(&out), &ua])), "compare the copy");
    let t = d.join("t.raw");
    must(&run(peer("qemu-img").args(["create", "-q", "-f", "raw", path(&t), "64M"])), "create target");
    let st = d.join("t.sock");
    let qt = qemu_nbd(&st, &["-f", "raw"], &t);
    must(&basalt("basalt-img", &["convert", "-n", "-f", "qcow2", "-O", "raw", path(&out), &unix(&st, "")]), "convert into NBD");
    drop(qt);
    drop((qa, qb));
    must(&run(peer("qemu-img").args(["compare", "-f", "qcow2", "-F", "qcow2", path(&a), path(&b)])), "same images");
    must(&run(peer("qemu-img").args(["check", "-f", "qcow2", path(&b)])), "check");
    must(&run(peer("qemu-img").args(["compare", "-f", "raw", "-F", "qcow2", path(&t), path(&b)])), "converted target");
}

/// nbdkit's plugins, with compact headers: data written reads back through qemu-io, maps and
/// copies match qemu-img's, injected errors come back as qemu-io reports them.
#[test]
fn client_against_nbdkit() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();

    // memory: writes, zeroes and trims, then qemu-io reads what Basalt wrote.
    let sm = d.join("m.sock");
    let _m = nbdkit(&sm, &["memory", "64M"]);
    let um = unix(&sm, "");
    let o = io("basalt-io", &um, &["write -P 0x44 1M 1M", "write -z 1536k 64k", "write -P 0x45 7M 4k", "discard 7M 4k"]);
    must(&o, "basalt-io on nbdkit memory");
    let q = io("qemu-io", &um, &["read -P 0x44 1M 512k", "read -P 0 1536k 64k", "read -P 0x44 1600k 448k"]);
    must(&q, "qemu-io reads back");
    assert!(!io_lines(&q).contains("Pattern verification failed"), "{}", io_lines(&q));
    for args in [["map", "--output=json"], ["info", "--output=json"]] {
        let a = [args[0], args[1], "-f", "raw", &um];
        assert_same_img_outcome(&basalt("basalt-img", &a), &run(peer("qemu-img").args(a)), args[0]);
    }

    // sparse-random: a 1 GiB image of random data and holes, copied and mapped.
    let sr = d.join("r.sock");
    let _r = nbdkit(&sr, &["sparse-random", "1G", "seed=42"]);
    let ur = unix(&sr, "");
    let (c1, c2) = (d.join("c1.raw"), d.join("c2.raw"));
    must(&basalt("basalt-img", &["convert", "-f", "raw", "-O", "raw", &ur, path(&c1)]), "convert sparse-random");
    must(&run(peer("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &ur, path(&c2)])), "qemu-img convert");
    assert!(std::fs::read(&c1).unwrap() == std::fs::read(&c2).unwrap(), "copies differ");
    let a = ["map", "--output=json", "-f", "raw", &ur];
    assert_same_img_outcome(&basalt("basalt-img", &a), &run(peer("qemu-img").args(a)), "map of sparse-random");

    // file: the data lands in the file nbdkit serves.
    let f = d.join("f.raw");
    std::fs::write(&f, vec![0u8; 4 << 20]).unwrap();
    let sf = d.join("f.sock");
    let fk = nbdkit(&sf, &["file", path(&f)]);
    must(&io("basalt-io", &unix(&sf, ""), &["write -P 0x71 4095 8193", "flush"]), "write through nbdkit file");
    drop(fk);
    let q = run(peer("qemu-io").args(["-f", "raw", "-c", "read -P 0x71 4095 8193", "-c", "read -P 0 0 4095", path(&f)]));
    assert!(!io_lines(&q).contains("failed"), "{}", io_lines(&q));

    // The error filter: every read fails with EIO; writes go on.
    let se = d.join("e.sock");
    let _e = nbdkit(&se, &["--filter=error", "memory", "4M", "error-pread=EIO", "error-pread-rate=100%"]);
    let ue = unix(&se, "");
    let cmds = ["write -P 1 0 64k", "read 0 4k", "write -P 2 64k 4k"];
    let (bo, qo) = (io("basalt-io", &ue, &cmds), io("qemu-io", &ue, &cmds));
    assert_eq!(io_lines(&bo), io_lines(&qo), "error filter");
    assert!(io_lines(&bo).contains("read failed: Input/output error"), "{}", io_lines(&bo));

    // Oldstyle negotiation.
    let so = d.join("o.sock");
    let _o = nbdkit(&so, &["--oldstyle", "--filter=noextents", "sparse-random", "1M", "seed=3"]);
    let uo = format!("nbd:unix:{}", so.display());
    let cmds = ["read 0 64k", "read 512k 512k"];
    let (bo, qo) = (io("basalt-io", &uo, &cmds), io("qemu-io", &uo, &cmds));
    must(&bo, "reads over oldstyle");
    assert_eq!(io_lines(&bo), io_lines(&qo), "oldstyle");
    let a = ["map", "--output=json", "-f", "raw", &uo];
    assert_same_img_outcome(&basalt("basalt-img", &a), &run(peer("qemu-img").args(a)), "oldstyle map");
}

/// The ways of naming an NBD export, and the errors for wrong ones, as qemu-img has them.
#[test]
fn syntaxes_options_and_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let img = d.join("x.raw");
    must(&run(peer("qemu-img").args(["create", "-q", "-f", "raw", path(&img), "16M"])), "create");
    let s = d.join("x.sock");
    let _q = qemu_nbd(&s, &["-f", "raw", "-x", "exp", "-r"], &img);
    let sock = s.display().to_string();
    let names = [
        unix(&s, "exp"),
        format!("nbd:unix:{sock}:exportname=exp"),
        format!("json:{{\"driver\":\"raw\",\"file\":{{\"driver\":\"nbd\",\"server\":{{\"type\":\"unix\",\"path\":\"{sock}\"}},\"export\":\"exp\"}}}}"),
        unix(&s, "nope"),
        format!("nbd+unix:///exp?socket={sock}.none"),
        "nbd://127.0.0.1:1/exp".to_string(),
    ];
    for n in &names {
        let a = ["info", "-U", n.as_str()];
        assert_same_img_outcome(&basalt("basalt-img", &a), &run(peer("qemu-img").args(a)), n);
    }
    // (qemu-img adds a GLib warning of its own here.)
    let o = basalt("basalt-img", &["info", "nbd+unix:///exp"]);
    assert_eq!(stderr(&o), "basalt-img: Could not open 'nbd+unix:///exp': No valid URL specified\n");
    let opts = format!("driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={sock},file.export=exp");
    let o = basalt("basalt-io", &["--image-opts", "-r", "-c", "read -P 0 0 64k", &opts]);
    must(&o, "--image-opts");
    // A read-only export refuses a read-write open as QEMU does.
    let a = ["-f", "raw", "-c", "read 0 4k", &names[0]];
    let (bo, qo) = (basalt("basalt-io", &a), run(peer("qemu-io").args(a)));
    assert_eq!(bo.status.code(), qo.status.code(), "{} / {}", io_lines(&bo), io_lines(&qo));
    assert_eq!(io_lines(&bo).replace("basalt-io", "qemu-io"), io_lines(&qo));

    // TCP, and open-timeout waiting for a server that starts late.
    let port = 10000 + (std::process::id() % 20000) as u16;
    let late = std::thread::spawn({
        let img = img.clone();
        move || {
            std::thread::sleep(Duration::from_millis(1500));
            peer("qemu-nbd").args(["-t", "-f", "raw", "-p", &port.to_string(), "-b", "127.0.0.1"]).arg(&img).spawn().unwrap()
        }
    });
    let t = format!("driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,file.server.port={port},file.open-timeout=20");
    let o = basalt("basalt-io", &["--image-opts", "-c", "write -P 3 0 4k", "-c", "read -P 3 0 4k", &t]);
    let mut child = late.join().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    must(&o, "open-timeout");
    assert!(!io_lines(&o).contains("failed"), "{}", io_lines(&o));
}

/// A server that goes away and comes back within reconnect-delay: requests wait and go on.
#[test]
fn reconnect_delay_survives_a_server_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let img = d.join("r.raw");
    must(&run(peer("qemu-img").args(["create", "-q", "-f", "raw", path(&img), "8M"])), "create");
    let s = d.join("r.sock");
    let first = qemu_nbd(&s, &["-f", "raw"], &img);
    let restart = std::thread::spawn({
        let (s, img) = (s.clone(), img.clone());
        move || {
            std::thread::sleep(Duration::from_millis(700));
            drop(first);
            let _ = std::fs::remove_file(&s);
            std::thread::sleep(Duration::from_millis(1000));
            qemu_nbd(&s, &["-f", "raw"], &img)
        }
    });
    // (qemu-img adds a GLib warning of its own here.)
    let o = basalt("basalt-img", &["info", "nbd+unix:///exp"]);
    assert_eq!(stderr(&o), "basalt-img: Could not open 'nbd+unix:///exp': No valid URL specified\n");
    let opts =
        format!("driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={},file.reconnect-delay=15", s.display());
    let o = basalt(
        "basalt-io",
        &[
            "--image-opts",
            "-c",
            "write -P 5 0 64k",
            "-c",
            "sleep 2500",
            "-c",
            "write -P 6 64k 64k",
            "-c",
            "read -P 5 0 64k",
            &opts,
        ],
    );
    let second = restart.join().unwrap();
    must(&o, "requests across a reconnection");
    assert!(!io_lines(&o).contains("failed"), "{}", io_lines(&o));
    drop(second);
    let q = run(peer("qemu-io").args(["-f", "raw", "-c", "read -P 5 0 64k", "-c", "read -P 6 64k 64k", path(&img)]));
    assert!(!io_lines(&q).contains("failed"), "{}", io_lines(&q));
}

/// Basalt's client and server together (extended headers both ways): what Basalt's tools see
/// through them is what QEMU's tools see through basalt-nbd.
#[test]
fn client_against_basalt_nbd() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let img = d.join("s.qcow2");
    must(&run(peer("qemu-img").args(["create", "-q", "-f", "qcow2", path(&img), "32M"])), "create");
    must(&run(peer("qemu-io").args(["-c", "write -P 7 1M 3M", "-c", "write -z 8M 1M", path(&img)])), "fill");
    let s = d.join("s.sock");
    let _b = serve(Command::new(tool("basalt-nbd")).args(["-t", "-f", "qcow2", "-x", "e", "-k"]).arg(&s).arg(&img), &s);
    let u = unix(&s, "e");
    let o = io("basalt-io", &u, &["write -P 9 20M 1M", "read -P 7 1M 3M", "read -P 9 20M 1M", "read -P 0 8M 1M"]);
    must(&o, "basalt-io through basalt-nbd");
    assert!(!io_lines(&o).contains("failed"), "{}", io_lines(&o));
    for args in [["map", "--output=json"], ["info", "--output=json"]] {
        let a = [args[0], args[1], "-f", "raw", &u];
        assert_same_img_outcome(&basalt("basalt-img", &a), &run(peer("qemu-img").args(a)), args[0]);
    }
}

/// basalt-nbd in front of nbdkit (file plugin, log filter): a client's `NBD_CMD_CACHE` is passed
/// down and sent on by the `nbd` driver, and reaches nbdkit with the same range; reads go
/// through the same way. (qemu-nbd in the same
/// place answers the request itself; nothing reaches nbdkit.)
#[test]
fn cache_requests_reach_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let f = d.join("f.raw");
    std::fs::write(&f, vec![0x5au8; 8 << 20]).unwrap();
    let (ks, log) = (d.join("k.sock"), d.join("k.log"));
    let _k = nbdkit(&ks, &["--filter=log", "file", path(&f), &format!("logfile={}", log.display())]);
    let bs = d.join("b.sock");
    let opts = format!("driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={}", ks.display());
    let _b = serve(Command::new(tool("basalt-nbd")).args(["-t", "-k", path(&bs), "--image-opts", &opts]), &bs);
    let script = "assert h.can_cache()\nh.cache(65536, 4096)\nh.cache(3 << 20, 1 << 20)\nprint(h.pread(512, 4096)[:2].hex())\n";
    let o = run(basalt_tests::nbdsh().args(["-u", &format!("nbd+unix:///?socket={}", bs.display()), "-c", script]));
    must(&o, "nbdsh cache");
    assert_eq!(stdout(&o).trim(), "5a5a");
    let text = std::fs::read_to_string(&log).unwrap();
    let caches: Vec<String> = text
        .lines()
        .filter(|l| l.contains(" Cache id="))
        .map(|l| {
            l.split_whitespace().filter(|w| w.starts_with("offset=") || w.starts_with("count=")).collect::<Vec<_>>().join(" ")
        })
        .collect();
    assert_eq!(caches, ["offset=0x1000 count=0x10000", "offset=0x100000 count=0x300000"], "{text}");
}
