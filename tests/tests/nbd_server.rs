//! basalt-nbd against real NBD clients (qemu-io and qemu-img over `nbd+unix://`), side by side
//! (and nbdsh, nbdinfo, nbdcopy, fio) with qemu-nbd serving a copy of the same image: the same commands give the same output and
//! leave the same data; the image is clean and complete after the server is stopped with
//! SIGTERM; a read-only export refuses writes as qemu-nbd's does; without `-t` the server ends
//! with its client.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use basalt_tests::{must, peer, run, start_listening, stderr, stdout, tool};

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

/// qemu-io output without its timing lines.
fn io_out(o: &std::process::Output) -> String {
    stdout(o).lines().filter(|l| !l.contains("ops/sec")).collect::<Vec<_>>().join("\n")
}

#[test]
fn basalt_nbd_serves_as_qemu_nbd_does() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (q_img, b_img) = (d.join("q.qcow2"), d.join("b.qcow2"));
    must(&run(peer("qemu-img").args(["create", "-q", "-f", "qcow2", q_img.to_str().unwrap(), "64M"])), "create");
    must(&run(peer("qemu-io").args(["-c", "write -P 0x11 1M 64k", "-c", "write -z 3M 64k", q_img.to_str().unwrap()])), "io");
    std::fs::copy(&q_img, &b_img).unwrap();
    let (q_sock, b_sock) = (d.join("q.sock"), d.join("b.sock"));
    let q = start_listening(peer("qemu-nbd").args(["-t", "-f", "qcow2", "-k"]).arg(&q_sock).arg(&q_img), &q_sock);
    let b = start_listening(Command::new(tool("basalt-nbd")).args(["-t", "-f", "qcow2", "-k"]).arg(&b_sock).arg(&b_img), &b_sock);

    let cmds = [
        "read -P 0x11 1M 64k",
        "write -P 0x22 5M 128k",
        "write -P 0x33 6000000 3333",
        "write -z 7M 1M",
        "write -P 0x44 9M 64k",
        "discard 9M 64k",
        "flush",
        "read -P 0x22 5M 128k",
        "read -P 0x33 6000000 3333",
        "read -P 0 7M 1M",
        "read -P 0 0 1M",
        "aio_write -P 0x55 10M 4k",
        "aio_write -P 0x66 10M+4k 4k",
        "aio_flush",
        "read -P 0x55 10M 4k",
        "length",
    ];
    for c in cmds {
        let c = c.replace("10M+4k", "10489856");
        let qo = run(peer("qemu-io").args(["-f", "raw", "-c", &c, &uri(&q_sock)]));
        let bo = run(peer("qemu-io").args(["-f", "raw", "-c", &c, &uri(&b_sock)]));
        assert_eq!(io_out(&bo), io_out(&qo), "{c}: output differs");
        assert_eq!(bo.status.code(), qo.status.code(), "{c}: exit code differs");
        assert!(bo.status.success(), "{c}: {}", io_out(&bo));
    }
    // Both exports read the same, as qemu-img compare sees them over NBD.
    must(&run(peer("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &uri(&q_sock), &uri(&b_sock)])), "compare over NBD");
    let info = run(peer("qemu-img").args(["info", "--output=json", &uri(&b_sock)]));
    must(&info, "info over NBD");
    assert!(stdout(&info).contains("\"virtual-size\": 67108864"), "{}", stdout(&info));
    q.stop();
    b.stop();
    // SIGTERM closed the image cleanly: no leaks or errors, the same content as qemu-nbd's.
    must(&run(peer("qemu-img").args(["check", "-f", "qcow2", b_img.to_str().unwrap()])), "check after SIGTERM");
    must(&run(peer("qemu-img").args(["compare", "-f", "qcow2", "-F", "qcow2"]).arg(&q_img).arg(&b_img)), "compare images");
}

#[test]
fn allocation_maps_match_qemu_nbd_on_raw_files() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let img = d.join("r.raw");
    must(&run(peer("qemu-img").args(["create", "-q", "-f", "raw", img.to_str().unwrap(), "8M"])), "create");
    must(
        &run(peer("qemu-io").args(["-f", "raw", "-c", "write -P 1 1M 256k", "-c", "write -P 2 5M 1M", img.to_str().unwrap()])),
        "io",
    );
    let (q_sock, b_sock) = (d.join("q.sock"), d.join("b.sock"));
    let q = start_listening(peer("qemu-nbd").args(["-t", "-r", "-A", "-f", "raw", "-k"]).arg(&q_sock).arg(&img), &q_sock);
    let b = start_listening(
        Command::new(tool("basalt-nbd")).args(["-t", "-r", "-A", "-f", "raw", "-k"]).arg(&b_sock).arg(&img),
        &b_sock,
    );
    let map = |s: &Path| {
        let o = run(peer("qemu-img").args(["map", "--output=json", "-f", "raw", &uri(s)]));
        must(&o, "map over NBD");
        stdout(&o)
    };
    assert_eq!(map(&b_sock), map(&q_sock), "base:allocation differs");
    // A read-only export refuses writes with the same error.
    let w = |s: &Path| run(peer("qemu-io").args(["-f", "raw", "-c", "write 0 4k", &uri(s)]));
    let (qw, bw) = (w(&q_sock), w(&b_sock));
    let msg = |o: &std::process::Output, s: &Path| basalt_tests::stderr(o).replace(s.to_str().unwrap(), "SOCK");
    assert_eq!(msg(&bw, &b_sock), msg(&qw, &q_sock), "read-only refusal differs");
    assert_eq!(bw.status.code(), qw.status.code());
    q.stop();
    b.stop();
}

#[test]
fn without_persistent_the_server_ends_with_its_client() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("x.raw");
    must(&run(peer("qemu-img").args(["create", "-q", "-f", "raw", img.to_str().unwrap(), "1M"])), "create");
    let sock = tmp.path().join("x.sock");
    let mut server = start_listening(Command::new(tool("basalt-nbd")).args(["-f", "raw", "-k"]).arg(&sock).arg(&img), &sock);
    let b = server.child();
    must(&run(peer("qemu-io").args(["-f", "raw", "-c", "write -P 7 0 4k", &uri(&sock)])), "io");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = b.try_wait().unwrap() {
            assert!(st.success(), "server ended with {st:?}");
            break;
        }
        assert!(Instant::now() < deadline, "basalt-nbd kept running after its only client left");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!sock.exists(), "the socket file is removed on exit");
    must(&run(peer("qemu-io").args(["-f", "raw", "-c", "read -P 7 0 4k", img.to_str().unwrap()])), "data written through NBD");
}

#[test]
fn fork_pid_file_and_open_errors_as_qemu_nbd() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // An image that cannot be opened: the same message, the same exit code, no socket left.
    let missing = d.join("missing.raw");
    let q = run(peer("qemu-nbd").args(["-f", "raw", "-k"]).arg(d.join("q.sock")).arg(&missing));
    let b = run(Command::new(tool("basalt-nbd")).args(["-f", "raw", "-k"]).arg(d.join("b.sock")).arg(&missing));
    assert_eq!(basalt_tests::stderr(&b).replace("basalt-nbd", "qemu-nbd"), basalt_tests::stderr(&q));
    assert_eq!(b.status.code(), q.status.code());
    assert!(!d.join("b.sock").exists());
    // --fork returns once the server listens; --pid-file names the server, which goes away
    // with its client.
    let img = d.join("f.raw");
    must(&run(peer("qemu-img").args(["create", "-q", "-f", "raw", img.to_str().unwrap(), "1M"])), "create");
    let (sock, pid_file) = (d.join("f.sock"), d.join("f.pid"));
    let o = run(Command::new(tool("basalt-nbd"))
        .args(["--fork", "-f", "raw", "-k"])
        .arg(&sock)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg(&img));
    must(&o, "basalt-nbd --fork");
    assert!(sock.exists(), "the socket exists when --fork returns");
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    must(&run(peer("qemu-io").args(["-f", "raw", "-c", "write -P 9 0 4k", &uri(&sock)])), "io");
    let deadline = Instant::now() + Duration::from_secs(10);
    // SAFETY: kill(2) with signal 0 only asks whether the process exists.
    while unsafe { libc::kill(pid, 0) } == 0 {
        assert!(Instant::now() < deadline, "the forked server kept running after its client left");
        std::thread::sleep(Duration::from_millis(20));
    }
    must(&run(peer("qemu-io").args(["-f", "raw", "-c", "read -P 9 0 4k", img.to_str().unwrap()])), "data");
}

/// libnbd's tools against basalt-nbd: nbdinfo (plain, `--list`, `--map`) and nbdcopy both ways.
#[test]
fn nbdinfo_and_nbdcopy_work_with_basalt_nbd() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let img = d.join("n.qcow2");
    must(&run(peer("qemu-img").args(["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "16M"])), "create");
    must(&run(peer("qemu-io").args(["-c", "write -P 1 1M 64k", img.to_str().unwrap()])), "io");
    let sock = d.join("n.sock");
    let b = start_listening(
        Command::new(tool("basalt-nbd")).args(["-t", "-f", "qcow2", "-x", "exp", "-D", "an export", "-k"]).arg(&sock).arg(&img),
        &sock,
    );
    let u = format!("nbd+unix:///exp?socket={}", sock.display());
    let o = run(peer("nbdinfo").arg(&u));
    must(&o, "nbdinfo");
    for want in ["export=\"exp\":", "description: an export", "export-size: 16777216", "base:allocation", "can_flush: true"] {
        assert!(stdout(&o).contains(want), "nbdinfo lacks {want:?}:\n{}", stdout(&o));
    }
    let o = run(peer("nbdinfo").arg("--list").arg(format!("nbd+unix:///?socket={}", sock.display())));
    must(&o, "nbdinfo --list");
    assert!(stdout(&o).contains("export=\"exp\":"), "{}", stdout(&o));
    let o = run(peer("nbdinfo").arg("--map").arg(&u));
    must(&o, "nbdinfo --map");
    let map: Vec<Vec<String>> = stdout(&o).lines().map(|l| l.split_whitespace().map(str::to_string).collect()).collect();
    let want: Vec<Vec<String>> =
        [["0", "1048576", "3", "hole,zero"], ["1048576", "65536", "0", "data"], ["1114112", "15663104", "3", "hole,zero"]]
            .iter()
            .map(|r| r.iter().map(|s| s.to_string()).collect())
            .collect();
    assert_eq!(map, want, "nbdinfo --map");
    // nbdcopy out, then a new image in, then out again: byte for byte.
    let (out, inp, back) = (d.join("out.raw"), d.join("in.raw"), d.join("back.raw"));
    must(&run(peer("nbdcopy").arg(&u).arg(&out)), "nbdcopy from basalt-nbd");
    must(
        &run(peer("qemu-io").args(["-f", "raw", "-c", "read -P 1 1M 64k", "-c", "read -P 0 0 1M", out.to_str().unwrap()])),
        "copy",
    );
    must(&run(peer("qemu-img").args(["create", "-q", "-f", "raw", inp.to_str().unwrap(), "16M"])), "create");
    must(&run(peer("qemu-io").args(["-f", "raw", "-c", "write -P 7 2M 1M", inp.to_str().unwrap()])), "io");
    must(&run(peer("nbdcopy").arg(&inp).arg(&u)), "nbdcopy to basalt-nbd");
    must(&run(peer("nbdcopy").arg(&u).arg(&back)), "nbdcopy from basalt-nbd");
    assert_eq!(std::fs::read(&inp).unwrap(), std::fs::read(&back).unwrap(), "nbdcopy round trip");
    b.stop();
    must(&run(peer("qemu-img").args(["check", "-f", "qcow2", img.to_str().unwrap()])), "check");
}

/// The script nbdsh runs against both servers: every command, flags, block status, structured
/// reads of holes and errors, printing what it sees.
const NBDSH_SCRIPT: &str = r#"
import nbd
MiB = 1 << 20
print("size", h.get_size())
print("flags", h.can_flush(), h.can_fua(), h.can_trim(), h.can_zero(), h.can_fast_zero(), h.can_cache(), h.is_read_only())
print("structured", h.get_structured_replies_negotiated(), h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
h.pwrite(b"\x5a" * 65536, 1 * MiB)
h.pwrite(b"\x5b" * 512, 1 * MiB + 65536, nbd.CMD_FLAG_FUA)
h.flush()
assert h.pread(65536, 1 * MiB) == b"\x5a" * 65536
assert h.pread(512, 1 * MiB + 65536) == b"\x5b" * 512
h.pwrite(b"\x11" * (2 * MiB), 4 * MiB)
h.zero(MiB, 4 * MiB)
h.zero(65536, 5 * MiB, nbd.CMD_FLAG_NO_HOLE)
h.trim(MiB, 5 * MiB + 65536 * 2)
h.flush()
print("zeroed", h.pread(MiB, 4 * MiB) == bytes(MiB))
h.cache(MiB, 0)
for off in (0, 1 * MiB, 4 * MiB, 5 * MiB, 6 * MiB):
    ext = []
    h.block_status(2 * MiB, off, lambda ctx, o, entries, err: ext.append((ctx, o, list(entries))))
    print("status", off, ext)
chunks = []
def chunk(buf, offset, status, err):
    chunks.append((offset, len(buf), status, buf == bytes(len(buf))))
    return 0
h.pread_structured(3 * MiB, 0, chunk)
print("read chunks cover", sum(c[1] for c in chunks), "all zero where holes", all(c[3] for c in chunks if c[2] == nbd.READ_HOLE))
for what, f in (("read past end", lambda: h.pread(4096, h.get_size())),
                ("write past end", lambda: h.pwrite(b"x" * 4096, h.get_size() - 1024)),
                ("zero past end", lambda: h.zero(4096, h.get_size()))):
    try:
        f()
        print(what, "succeeded")
    except nbd.Error as e:
        print(what, "failed", e.errno)
h.shutdown()
print("done")
"#;

fn nbdsh(uri: &str) -> std::process::Output {
    run(basalt_tests::nbdsh().args(["--base-allocation", "-u", uri, "-c", NBDSH_SCRIPT]))
}

fn fio(uri: &str, rw: &str, bs: &str, depth: &str) -> std::process::Output {
    run(peer("fio").args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        &format!("--rw={rw}"),
        &format!("--bs={bs}"),
        &format!("--iodepth={depth}"),
        "--size=32M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--randrepeat=1",
        "--verify_state_save=0",
    ]))
}

/// nbdsh scripts and fio's nbd engine against basalt-nbd, with qemu-nbd serving a copy of the
/// same image as the reference: nbdsh prints the same, fio's verify passes on both.
#[test]
fn nbdsh_and_fio_against_basalt_nbd() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (q_img, b_img) = (d.join("q.raw"), d.join("b.raw"));
    // Both made by qemu-img (a copy might not keep the holes).
    for i in [&q_img, &b_img] {
        must(&run(peer("qemu-img").args(["create", "-q", "-f", "raw", i.to_str().unwrap(), "64M"])), "create");
    }
    let (q_sock, b_sock) = (d.join("q.sock"), d.join("b.sock"));
    let args = ["-t", "-f", "raw", "--discard=unmap", "-k"];
    let q = start_listening(peer("qemu-nbd").args(args).arg(&q_sock).arg(&q_img), &q_sock);
    let b = start_listening(Command::new(tool("basalt-nbd")).args(args).arg(&b_sock).arg(&b_img), &b_sock);
    let (qo, bo) = (nbdsh(&uri(&q_sock)), nbdsh(&uri(&b_sock)));
    must(&qo, "nbdsh against qemu-nbd");
    must(&bo, "nbdsh against basalt-nbd");
    assert!(stdout(&bo).ends_with("done\n"), "{}", stdout(&bo));
    assert_eq!(stdout(&bo), stdout(&qo), "nbdsh sees basalt-nbd differently");
    for (rw, bs, depth) in [("randwrite", "4k", "32"), ("write", "1M", "4")] {
        let o = fio(&uri(&b_sock), rw, bs, depth);
        must(&o, &format!("fio {rw} {bs} against basalt-nbd"));
        // The verify phase reads everything back.
        assert!(stdout(&o).contains("read: IOPS="), "{}", stdout(&o));
    }
    q.stop();
    b.stop();
}

/// `basalt-nbd -L` prints what `qemu-nbd -L` prints, against basalt-nbd (with a description
/// and allocation depth) and against qemu-nbd (extended headers, block sizes).
#[test]
fn list_mode_prints_as_qemu_nbd() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let img = d.join("l.raw");
    must(&run(peer("qemu-img").args(["create", "-q", "-f", "raw", img.to_str().unwrap(), "8M"])), "create");
    let (b_sock, q_sock) = (d.join("b.sock"), d.join("q.sock"));
    let b = start_listening(
        Command::new(tool("basalt-nbd"))
            .args(["-t", "-r", "-A", "-x", "disk", "-D", "a test disk", "-f", "raw", "-k"])
            .arg(&b_sock)
            .arg(&img),
        &b_sock,
    );
    let q = start_listening(peer("qemu-nbd").args(["-t", "-r", "-f", "raw", "-x", "q", "-k"]).arg(&q_sock).arg(&img), &q_sock);
    for s in [&b_sock, &q_sock] {
        let bo = run(Command::new(tool("basalt-nbd")).arg("-L").arg("-k").arg(s));
        let qo = run(peer("qemu-nbd").arg("-L").arg("-k").arg(s));
        must(&bo, "basalt-nbd -L");
        assert_eq!(stdout(&bo), stdout(&qo), "listing of {}", s.display());
        assert!(stdout(&bo).contains("export: '"), "{}", stdout(&bo));
        // Both servers negotiate extended headers.
        assert!(stdout(&bo).contains("transaction size: 64-bit"), "{}", stdout(&bo));
    }
    b.stop();
    q.stop();
}

/// `-B`: qcow2 dirty bitmaps exported as `qemu:dirty-bitmap:NAME`, as qemu-nbd exports them
/// (listing, nbdinfo's map, qemu-img's and basalt-img's `x-dirty-bitmap` maps); on a writable
/// export an enabled bitmap records the writes made through it, and keeps them in the image.
#[test]
fn dirty_bitmaps_export_as_qemu_nbd() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (q_img, b_img) = (d.join("q.qcow2"), d.join("b.qcow2"));
    let qi = |args: &[&str]| must(&run(peer("qemu-img").args(args)), &args.join(" "));
    qi(&["create", "-q", "-f", "qcow2", q_img.to_str().unwrap(), "16M"]);
    qi(&["bitmap", "--add", q_img.to_str().unwrap(), "b0"]);
    must(&run(peer("qemu-io").args(["-c", "write -P 1 1M 64k", "-c", "write -P 2 5M 300k", q_img.to_str().unwrap()])), "io");
    qi(&["bitmap", "--add", "-g", "128k", q_img.to_str().unwrap(), "b1"]);
    qi(&["bitmap", "--disable", q_img.to_str().unwrap(), "b1"]);
    std::fs::copy(&q_img, &b_img).unwrap();
    let (q_sock, b_sock) = (d.join("q.sock"), d.join("b.sock"));
    let ro = ["-t", "-r", "-f", "qcow2", "-B", "b0", "-B", "b1", "-k"];
    let q = start_listening(peer("qemu-nbd").args(ro).arg(&q_sock).arg(&q_img), &q_sock);
    let b = start_listening(Command::new(tool("basalt-nbd")).args(ro).arg(&b_sock).arg(&b_img), &b_sock);
    let bitmap_map = |prog: &str, s: &Path, bm: &str| {
        let opts = format!("driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{bm}", s.display());
        let mut c = if prog == "qemu-img" { peer("qemu-img") } else { Command::new(tool("basalt-img")) };
        let o = run(c.args(["map", "--output=json", "--image-opts", &opts]));
        must(&o, "map with x-dirty-bitmap");
        stdout(&o)
    };
    for bm in ["b0", "b1"] {
        let ctx = format!("--map=qemu:dirty-bitmap:{bm}");
        let (qo, bo) = (run(peer("nbdinfo").args([&ctx, &uri(&q_sock)])), run(peer("nbdinfo").args([&ctx, &uri(&b_sock)])));
        must(&bo, "nbdinfo --map on basalt-nbd");
        assert_eq!(stdout(&bo), stdout(&qo), "nbdinfo {ctx}");
        assert_eq!(bitmap_map("qemu-img", &b_sock, bm), bitmap_map("qemu-img", &q_sock, bm), "{bm} through QEMU's client");
        assert_eq!(bitmap_map("basalt-img", &q_sock, bm), bitmap_map("qemu-img", &q_sock, bm), "{bm} through Basalt's client");
    }
    assert!(stdout(&run(peer("nbdinfo").args(["--map=qemu:dirty-bitmap:b0", &uri(&b_sock)]))).contains("dirty"));
    let (lq, lb) =
        (run(peer("qemu-nbd").arg("-L").arg("-k").arg(&q_sock)), run(peer("qemu-nbd").arg("-L").arg("-k").arg(&b_sock)));
    // The contexts are listed alike (qemu-nbd also offers block-status-payload, which basalt-nbd does not yet).
    let contexts =
        |o: &std::process::Output| stdout(o).lines().skip_while(|l| !l.contains("meta contexts")).collect::<Vec<_>>().join("\n");
    assert_eq!(contexts(&lb), contexts(&lq));
    let missing =
        run(Command::new(tool("basalt-nbd")).args(["-r", "-f", "qcow2", "-B", "nope", "-k"]).arg(d.join("x.sock")).arg(&b_img));
    assert_eq!(stderr(&missing), "basalt-nbd: Bitmap 'nope' is not found\n");
    q.stop();
    b.stop();

    // Writable, with the enabled b0: a write through the export shows as dirty at once and
    // stays in the image's bitmap.
    let rw = ["-t", "-f", "qcow2", "-B", "b0", "-k"];
    let q = start_listening(peer("qemu-nbd").args(rw).arg(&q_sock).arg(&q_img), &q_sock);
    let b = start_listening(Command::new(tool("basalt-nbd")).args(rw).arg(&b_sock).arg(&b_img), &b_sock);
    for s in [&q_sock, &b_sock] {
        must(&run(peer("qemu-io").args(["-f", "raw", "-c", "write -P 3 10M 4k", &uri(s)])), "write through the export");
    }
    let map = |s: &Path| stdout(&run(peer("nbdinfo").args(["--map=qemu:dirty-bitmap:b0", &uri(s)])));
    assert_eq!(map(&b_sock), map(&q_sock), "after a write");
    assert!(map(&b_sock).contains("10485760"), "{}", map(&b_sock));
    q.stop();
    b.stop();
    let q = start_listening(peer("qemu-nbd").args(ro).arg(&q_sock).arg(&q_img), &q_sock);
    let b = start_listening(peer("qemu-nbd").args(ro).arg(&b_sock).arg(&b_img), &b_sock);
    assert_eq!(map(&b_sock), map(&q_sock), "stored in the image");
    q.stop();
    b.stop();
}

/// Large reads of a raw image go from the page cache to the socket without a copy: the data
/// arrives exact whether it is cached or not, through several connections at once (nbdcopy's
/// multi-conn), with writes arriving on the same connection meanwhile (fio's verify), and
/// from a file that shrank under the server (the rest reads as zeroes, as from qemu-nbd).
#[test]
fn zero_copy_reads_stay_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let img = d.join("z.raw");
    let mut rng = basalt_tests::Rng(0x5eed_2c0f);
    let data: Vec<u8> = (0..48 << 20).map(|_| rng.next() as u8).collect();
    std::fs::write(&img, &data).unwrap();
    let sock = d.join("z.sock");
    let b =
        start_listening(Command::new(tool("basalt-nbd")).args(["-t", "-e", "4", "-f", "raw", "-k"]).arg(&sock).arg(&img), &sock);
    let drop_cache = |p: &Path| {
        let py = "import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)";
        must(&run(peer("python3").args(["-c", py]).arg(p)), "drop the image from the page cache");
    };
    // Cold, then warm (the first copy brought it into the cache): byte for byte both times.
    drop_cache(&img);
    for pass in ["uncached", "cached"] {
        let out = d.join(format!("{pass}.raw"));
        let o = run(peer("nbdcopy").args(["--connections=4", "--request-size=1048576"]).arg(uri(&sock)).arg(&out));
        must(&o, &format!("nbdcopy ({pass})"));
        assert!(std::fs::read(&out).unwrap() == data, "nbdcopy ({pass}) brought back other bytes");
        std::fs::remove_file(&out).unwrap();
    }
    // Writes and large reads interleaved on each connection, checked by fio.
    let o = run(peer("fio").args([
        "--name=zc",
        "--ioengine=nbd",
        &format!("--uri={}", uri(&sock)),
        "--rw=randrw",
        "--bsrange=64k-1m",
        "--iodepth=16",
        "--numjobs=2",
        "--size=16M",
        "--offset_increment=16M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--randrepeat=1",
        "--verify_state_save=0",
    ]));
    must(&o, "fio randrw 64k-1m with verify");
    b.stop();

    // A file cut short under the server: qemu-nbd on a copy is the reference.
    let (q_img, b_img) = (d.join("q.raw"), d.join("b.raw"));
    std::fs::write(&q_img, &data[..8 << 20]).unwrap();
    std::fs::write(&b_img, &data[..8 << 20]).unwrap();
    let (q_sock, b_sock) = (d.join("q.sock"), d.join("b.sock"));
    let args = ["-t", "-f", "raw", "-k"];
    let q = start_listening(peer("qemu-nbd").args(args).arg(&q_sock).arg(&q_img), &q_sock);
    let b = start_listening(Command::new(tool("basalt-nbd")).args(args).arg(&b_sock).arg(&b_img), &b_sock);
    // Both have opened their image (basalt-nbd listens before it opens) and see 8 MiB.
    for s in [&q_sock, &b_sock] {
        let o = run(peer("nbdinfo").arg("--size").arg(uri(s)));
        must(&o, "nbdinfo --size");
        assert_eq!(stdout(&o).trim(), (8 << 20).to_string());
    }
    for i in [&q_img, &b_img] {
        std::fs::OpenOptions::new().write(true).open(i).unwrap().set_len((5 << 20) + 1000).unwrap();
    }
    let script = r#"
import hashlib
MiB = 1 << 20
for off, n in ((4 * MiB, 2 * MiB), (5 * MiB, 3 * MiB), (0, 4 * MiB)):
    b = h.pread(n, off)
    print(off, n, hashlib.sha256(b).hexdigest(), b[-1000:] == bytes(1000))
h.shutdown()
"#;
    let sh = |s: &Path| run(basalt_tests::nbdsh().args(["-u", &uri(s), "-c", script]));
    let (qo, bo) = (sh(&q_sock), sh(&b_sock));
    must(&qo, "nbdsh against qemu-nbd");
    must(&bo, "nbdsh against basalt-nbd");
    assert_eq!(stdout(&bo).lines().count(), 3, "{}", stdout(&bo));
    assert_eq!(stdout(&bo), stdout(&qo), "a shrunk file reads differently");
    q.stop();
    b.stop();
}

/// CPU ticks (user + system) of each reactor thread of process `pid`.
fn reactor_ticks(pid: u32) -> Vec<u64> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        if !comm.starts_with("basalt-reactor") {
            continue;
        }
        let stat = std::fs::read_to_string(t.join("stat")).unwrap_or_default();
        // The fields after the command name (which ends with the last ')').
        let f: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
        v.push(
            f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0),
        );
    }
    v
}

/// `--reactors=2`: connections are served on both reactors (each with its own queue on the
/// same qcow2 node), and what four connections write at once reads back through four more,
/// passes fio's verify, and leaves an image `qemu-img check` finds clean and `qemu-img
/// compare` finds identical to the source. Without `-t` the server ends once its last
/// client, wherever served, has gone. Bad counts and `--bitmap` with it are refused.
#[test]
fn connections_spread_over_reactors() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (img, src) = (d.join("m.qcow2"), d.join("src.raw"));
    must(&run(peer("qemu-img").args(["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "96M"])), "create");
    let mut rng = basalt_tests::Rng(0x2eac_7025);
    let mut data: Vec<u8> = (0..96 << 20).map(|_| rng.next() as u8).collect();
    data[(8 << 20)..(24 << 20)].fill(0);
    std::fs::write(&src, &data).unwrap();
    let sock = d.join("m.sock");
    let b = start_listening(
        Command::new(tool("basalt-nbd")).args(["--reactors=2", "-t", "-e", "4", "-f", "qcow2", "-k"]).arg(&sock).arg(&img),
        &sock,
    );
    let before = reactor_ticks(b.id());
    must(&run(peer("nbdcopy").args(["--connections=4"]).arg(&src).arg(uri(&sock))), "nbdcopy into basalt-nbd");
    let back = d.join("back.raw");
    must(&run(peer("nbdcopy").args(["--connections=4"]).arg(uri(&sock)).arg(&back)), "nbdcopy out of basalt-nbd");
    assert!(std::fs::read(&back).unwrap() == data, "four connections read back other bytes");
    let after = reactor_ticks(b.id());
    let busy = after.iter().enumerate().filter(|(i, t)| **t > before.get(*i).copied().unwrap_or(0)).count();
    assert!(busy >= 2, "connections were served on {busy} reactor(s): ticks {before:?} -> {after:?}");
    let o = run(peer("fio").args([
        "--name=spread",
        "--ioengine=nbd",
        &format!("--uri={}", uri(&sock)),
        "--rw=randrw",
        "--bsrange=4k-256k",
        "--iodepth=16",
        "--numjobs=2",
        "--size=8M",
        "--offset=32M",
        "--offset_increment=8M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--randrepeat=1",
        "--verify_state_save=0",
    ]));
    must(&o, "fio randrw with verify on two connections");
    // The bytes fio wrote, put back into the source so that compare knows them.
    must(&run(peer("nbdcopy").args(["--connections=4"]).arg(uri(&sock)).arg(&back)), "nbdcopy out of basalt-nbd after fio");
    b.stop();
    must(&run(peer("qemu-img").args(["check", "-f", "qcow2", img.to_str().unwrap()])), "qemu-img check");
    let o = run(peer("qemu-img").args(["compare", "-f", "qcow2", "-F", "raw", img.to_str().unwrap(), back.to_str().unwrap()]));
    must(&o, "qemu-img compare");
    assert!(stdout(&o).contains("Images are identical"), "{}", stdout(&o));
    let fio_region = std::fs::read(&back).unwrap();
    assert!(fio_region[..32 << 20] == data[..32 << 20] && fio_region[48 << 20..] == data[48 << 20..], "fio's writes strayed");

    // Not persistent: the server ends after its last client, served on the other reactor.
    let raw = d.join("r.raw");
    std::fs::write(&raw, &data[..8 << 20]).unwrap();
    let sock2 = d.join("r.sock");
    let mut s = start_listening(
        Command::new(tool("basalt-nbd")).args(["--reactors=2", "-e", "2", "-f", "raw", "-k"]).arg(&sock2).arg(&raw),
        &sock2,
    );
    must(&run(peer("nbdcopy").args(["--connections=2"]).arg(uri(&sock2)).arg("null:")), "nbdcopy from a non-persistent server");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = s.child().try_wait().unwrap() {
            assert!(st.success(), "server ended with {st:?}");
            break;
        }
        assert!(Instant::now() < deadline, "basalt-nbd kept running after its clients left");
        std::thread::sleep(Duration::from_millis(20));
    }

    for (args, want) in [
        (vec!["--reactors=0"], "Invalid reactor count '0' (1 to 256)"),
        (vec!["--reactors=x"], "Invalid reactor count 'x' (1 to 256)"),
        (vec!["--reactors=2", "-B", "b0"], "--bitmap cannot be used with more than one reactor yet"),
    ] {
        let o = run(Command::new(tool("basalt-nbd")).args(&args).arg(&img));
        assert!(!o.status.success(), "{args:?} was accepted");
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
}

/// `qemu-img map --output=json` of a qcow2 image, without host offsets (where each server's
/// allocator put the clusters).
fn qcow2_map(img: &Path) -> Vec<serde_json::Value> {
    let o = run(peer("qemu-img").args(["map", "--output=json", "-f", "qcow2", img.to_str().unwrap()]));
    must(&o, "qemu-img map");
    let mut v: Vec<serde_json::Value> = serde_json::from_str(&stdout(&o)).unwrap();
    for e in &mut v {
        e.as_object_mut().unwrap().remove("offset");
    }
    v
}

/// `--detect-zeroes=off|on|unmap`: the same writes through basalt-nbd and qemu-nbd (zeroes
/// over data, over nothing, across a data cluster's edge, and data) leave qcow2 images that
/// map the same, and `on` maps differently from `off` (zero clusters instead of data); bad
/// uses are refused with qemu-nbd's words.
#[test]
fn detect_zeroes_matches_qemu_nbd() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let script = r#"
z = bytes(65536)
h.pwrite(z, 0)
h.pwrite(bytes(131072), 4 << 20)
h.pwrite(bytes(98304), (1 << 20) - 32768)
h.pwrite(b"\x07" * 65536, 6 << 20)
h.pwrite(z, (6 << 20) + 65536, nbd.CMD_FLAG_FUA)
h.flush()
assert h.pread(65536, 0) == z
print("done")
"#;
    let mut maps = Vec::new();
    for (mode, extra) in [("off", None), ("on", None), ("unmap", Some("--discard=unmap"))] {
        let mut pair = Vec::new();
        for server in ["qemu-nbd", "basalt-nbd"] {
            let img = d.join(format!("{server}-{mode}.qcow2"));
            let i = img.to_str().unwrap();
            must(&run(peer("qemu-img").args(["create", "-q", "-f", "qcow2", i, "8M"])), "create");
            must(&run(peer("qemu-io").args(["-f", "qcow2", "-c", "write -P 5 0 2M", i])), "data");
            let sock = d.join(format!("{server}-{mode}.sock"));
            let mut cmd = if server == "qemu-nbd" { peer("qemu-nbd") } else { Command::new(tool("basalt-nbd")) };
            // qemu-nbd takes `--detect-zeroes=unmap` only after `--discard=unmap`.
            cmd.args(["-t", "-f", "qcow2"]).args(extra).arg(format!("--detect-zeroes={mode}")).arg("-k").arg(&sock).arg(&img);
            let s = start_listening(&mut cmd, &sock);
            let o = run(basalt_tests::nbdsh().args(["-u", &uri(&sock), "-c", script]));
            must(&o, &format!("nbdsh against {server} with --detect-zeroes={mode}"));
            assert_eq!(stdout(&o), "done\n");
            s.stop();
            pair.push(qcow2_map(&img));
        }
        assert_eq!(pair[1], pair[0], "--detect-zeroes={mode}: basalt-nbd's image maps differently");
        maps.push(pair.remove(0));
    }
    assert_ne!(maps[1], maps[0], "--detect-zeroes=on changed nothing");
    // Bad uses: the same words as qemu-nbd's.
    let img = d.join("qemu-nbd-off.qcow2");
    for args in [vec!["--detect-zeroes=bogus"], vec!["--detect-zeroes=unmap"]] {
        let sock = d.join("never.sock");
        let q = run(peer("qemu-nbd").args(&args).args(["-f", "qcow2", "-k"]).arg(&sock).arg(&img));
        let b = run(Command::new(tool("basalt-nbd")).args(&args).args(["-f", "qcow2", "-k"]).arg(&sock).arg(&img));
        assert!(!q.status.success() && !b.status.success(), "{args:?} was accepted");
        let msg = |o: &std::process::Output| stderr(o).lines().next().unwrap_or("").split_once(": ").map(|(_, m)| m.to_string());
        assert_eq!(msg(&b), msg(&q), "{args:?}");
    }
}

/// Partly written qcow2 clusters: the same writes through qemu-nbd and basalt-nbd, then the
/// unwritten tails of the clusters made holes in each file. Both servers report the same
/// `base:allocation` and `qemu:allocation-depth` maps (`nbdinfo --map`, and `qemu-img map`
/// over NBD): an allocated cluster is data even where its file range is a hole, as QEMU reports
/// it outside metadata-preallocated images.
#[test]
fn partly_written_qcow2_clusters_map_as_with_qemu_nbd() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let script = "h.pwrite(b'\\x01' * 4096, 0)\nh.pwrite(b'\\x02' * 4096, 1048576 + 8192)\nh.pwrite(b'\\x03' * 2097152, 4194304)\nh.flush()";
    let mut maps = Vec::new();
    for server in ["qemu-nbd", "basalt-nbd"] {
        let img = d.join(format!("{server}.qcow2"));
        must(&run(peer("qemu-img").args(["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"])), "create");
        let cmd = |extra: &[&str]| {
            let mut c = if server == "qemu-nbd" { peer("qemu-nbd") } else { Command::new(tool("basalt-nbd")) };
            c.args(["-t", "-A", "-f", "qcow2"]).args(extra).arg("-k").arg(d.join("s.sock")).arg(&img);
            c
        };
        let s = start_listening(&mut cmd(&[]), &d.join("s.sock"));
        must(&run(basalt_tests::nbdsh().args(["-u", &uri(&d.join("s.sock")), "-c", script])), "nbdsh writes");
        s.stop();
        for (guest, keep) in [(0u64, 4096u64), (1 << 20, 12288)] {
            let o = run(peer("qemu-img").args(["map", "--output=json", "-f", "qcow2", img.to_str().unwrap()]));
            let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
            let e = v.as_array().unwrap().iter().find(|e| e["start"].as_u64() == Some(guest)).expect("cluster extent");
            let host = e["offset"].as_u64().expect("host offset");
            basalt_tests::punch_hole(&img, host + keep, 65536 - keep);
        }
        let s = start_listening(&mut cmd(&["-r"]), &d.join("s.sock"));
        let u = uri(&d.join("s.sock"));
        let mut got = Vec::new();
        for ctx in ["base:allocation", "qemu:allocation-depth"] {
            let o = run(peer("nbdinfo").arg(format!("--map={ctx}")).arg(&u));
            must(&o, "nbdinfo --map");
            got.push(stdout(&o));
        }
        let o = run(peer("qemu-img").args(["map", "--output=json", "-f", "raw", &u]));
        must(&o, "qemu-img map over NBD");
        got.push(stdout(&o));
        s.stop();
        maps.push(got);
    }
    assert_eq!(maps[1], maps[0], "basalt-nbd's maps differ from qemu-nbd's");
    // The clusters over holes are plain data (flags 0): no extent is data reading as zeroes
    // (flags 2).
    let flags = |m: &str| m.lines().filter_map(|l| l.split_whitespace().nth(2).map(String::from)).collect::<Vec<_>>();
    assert!(flags(&maps[0][0]).contains(&"0".to_string()) && !flags(&maps[0][0]).contains(&"2".to_string()), "{}", maps[0][0]);
}

/// Zero-copy reads of qcow2: a read-only node says where allocated, uncompressed clusters lie
/// in its file (from its cached tables), so basalt-nbd sends them from the page cache; a
/// read-write node, compressed and unallocated clusters, and runs that are not contiguous in
/// the file say nothing, and are copied. Through `basalt-nbd -r`, nbdcopy with 4 connections
/// brings the image back byte for byte, cold and warm.
#[test]
fn zero_copy_reads_of_read_only_qcow2() {
    use basalt_engine::{Graph, Node, OpenFlags, Opts, Queue};
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let img = d.join("z.qcow2");
    let p = img.to_str().unwrap().to_string();
    must(&run(peer("qemu-img").args(["create", "-q", "-f", "qcow2", &p, "8M"])), "create");
    let io = [
        "write -P 1 0 1M",
        "write -c -P 2 1M 64k",
        // Allocated out of guest order: 4M..4M+192k is not one run in the file.
        "write -P 3 4M 64k",
        "write -P 4 4325376 64k",
        "write -P 5 4259840 64k",
    ];
    let mut args = vec!["-f".to_string(), "qcow2".to_string()];
    for c in io {
        args.extend(["-c".to_string(), c.to_string()]);
    }
    args.push(p.clone());
    must(&run(peer("qemu-io").args(&args)), "qemu-io");
    let o = run(peer("qemu-img").args(["map", "--output=json", &p]));
    let map: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let host_of = |guest: u64| {
        let e = map.as_array().unwrap().iter().find(|e| e["start"].as_u64() == Some(guest)).expect("extent");
        e["offset"].as_u64()
    };
    let (h0, h4) = (host_of(0).unwrap(), host_of(4 << 20).unwrap());
    let r = basalt_reactor::Reactor::new(basalt_reactor::ReactorConfig::default()).unwrap();
    let p2 = p.clone();
    let (ro, rw) = r.block_on(async move {
        let open = |read_only: bool| {
            let graph = Graph::new(basalt_formats::registry());
            let mut o = Opts::new();
            o.set("driver", "qcow2");
            o.set("file.filename", &p2);
            async move { graph.open(o, if read_only { OpenFlags::read_only() } else { OpenFlags::read_write() }).await.unwrap() }
        };
        let node = open(true).await;
        let ext = |n: &std::sync::Arc<dyn Node>, off: u64, len: u64| n.host_extent(off, len).map(|e| e.offset);
        let cold = ext(&node, 0, 1 << 20);
        // A read loads the tables.
        let q = Queue::new(node.clone()).unwrap();
        q.read(0, basalt_reactor::IoBuf::new(5 << 20)).await.res.unwrap();
        let ro = vec![
            cold,
            ext(&node, 0, 1 << 20),
            ext(&node, 4096, 65536),
            ext(&node, 1 << 20, 65536),
            ext(&node, 2 << 20, 65536),
            ext(&node, 4 << 20, 65536),
            ext(&node, 4 << 20, 196608),
        ];
        drop(q);
        node.close().await.unwrap();
        drop(node);
        let node = open(false).await;
        let q = Queue::new(node.clone()).unwrap();
        q.read(0, basalt_reactor::IoBuf::new(1 << 20)).await.res.unwrap();
        let rw = ext(&node, 0, 1 << 20);
        drop(q);
        node.close().await.unwrap();
        (ro, rw)
    });
    assert_eq!(ro, vec![None, Some(h0), Some(h0 + 4096), None, None, Some(h4), None], "read-only node");
    assert_eq!(rw, None, "a read-write node never offers its file");

    let raw = d.join("z.raw");
    must(&run(peer("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw", &p]).arg(&raw)), "reference");
    let want = std::fs::read(&raw).unwrap();
    let sock = d.join("z.sock");
    let b = start_listening(
        Command::new(tool("basalt-nbd")).args(["-r", "-t", "-e", "4", "-f", "qcow2", "-k"]).arg(&sock).arg(&img),
        &sock,
    );
    for pass in ["cold", "warm"] {
        let out = d.join(format!("{pass}.raw"));
        must(&run(peer("nbdcopy").args(["--connections=4", "--request-size=1048576"]).arg(uri(&sock)).arg(&out)), "nbdcopy");
        assert!(std::fs::read(&out).unwrap() == want, "nbdcopy ({pass}) brought back other bytes");
        std::fs::remove_file(&out).unwrap();
    }
    b.stop();
}
