//! basalt-storage-daemon against qemu-storage-daemon: the same `--blockdev`, `--nbd-server` and
//! `--export` arguments on copies of the same images give exports that list the same, read and
//! write the same through qemu-io, map the same, and leave images that are clean and identical
//! after SIGTERM. Set-up errors read as qemu-storage-daemon's, and `--daemonize` returns as it
//! does.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use basalt_tests::{must, peer, run, start_listening, stderr, stdout, tool};

/// The daemons' arguments; with `iothreads`, the exports are served on two iothreads.
fn args(d: &Path, tag: &str, iothreads: bool) -> Vec<String> {
    let p = |n: &str| d.join(format!("{tag}-{n}")).display().to_string();
    let (on0, on1) = if iothreads { (",iothread=io0", ",iothread=io1,fixed-iothread=on") } else { ("", "") };
    let mut a: Vec<String> = Vec::new();
    if iothreads {
        a.extend(["--object".into(), "iothread,id=io0".into(), "--object".into(), "iothread,id=io1,poll-max-ns=0".into()]);
    }
    a.extend([
        "--blockdev".into(),
        format!("driver=file,node-name=f,filename={}", p("disk.qcow2")),
        "--blockdev".into(),
        "driver=qcow2,node-name=q,file=f".into(),
        "--blockdev".into(),
        format!("{{\"driver\":\"raw\",\"node-name\":\"r\",\"file\":{{\"driver\":\"file\",\"filename\":\"{}\"}}}}", p("base.raw")),
        "--nbd-server".into(),
        format!("addr.type=unix,addr.path={}", p("sock")),
        "--export".into(),
        format!("type=nbd,id=e0,node-name=q,name=disk,writable=on,description=the disk{on0}"),
        "--export".into(),
        format!("type=nbd,id=e1,node-name=r{on1}"),
    ]);
    a
}

#[test]
fn exports_match_qemu_storage_daemon() {
    exports_match(false);
}

/// The same, with the exports on iothreads; and the iothread, not the thread that accepted
/// the connection, serves the requests.
#[test]
fn exports_on_iothreads_match_qemu_storage_daemon() {
    exports_match(true);
}

/// The name and CPU time (user + system, in ticks) of each of `pid`'s threads, by thread id.
fn thread_cpu(pid: u32) -> Vec<(u32, String, u64)> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap();
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap();
        // The name is between the first '(' and the last ')'; utime and stime are the 12th
        // and 13th fields after it.
        let name = stat[stat.find('(').unwrap() + 1..stat.rfind(')').unwrap()].to_string();
        let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let tid = t.file_name().to_str().unwrap().parse().unwrap();
        v.push((tid, name, f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()));
    }
    v
}

fn exports_match(iothreads: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for tag in ["q", "b"] {
        let img = d.join(format!("{tag}-disk.qcow2"));
        must(&run(peer("qemu-img").args(["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "32M"])), "create");
        must(&run(peer("qemu-io").args(["-c", "write -P 0x11 1M 64k", img.to_str().unwrap()])), "fill");
        std::fs::write(d.join(format!("{tag}-base.raw")), vec![0x5a; 1 << 20]).unwrap();
    }
    let (qs, bs) = (d.join("q-sock"), d.join("b-sock"));
    let q = start_listening(peer("qemu-storage-daemon").args(args(d, "q", iothreads)), &qs);
    let pid = d.join("b.pid");
    let b = start_listening(
        Command::new(tool("basalt-storage-daemon")).args(args(d, "b", iothreads)).arg("--pidfile").arg(&pid),
        &bs,
    );
    // The pid file is written once every option has been carried out (just after the socket).
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&pid).map_or(true, |p| !p.ends_with('\n')) {
        assert!(Instant::now() < deadline, "no pid file");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(std::fs::read_to_string(&pid).unwrap().trim(), b.id().to_string(), "pid file");
    let uri = |s: &Path, e: &str| format!("nbd+unix:///{e}?socket={}", s.display());

    // Both exports, listed alike.
    let list = |s: &Path| {
        let o = run(peer("nbdinfo").args(["--list", "--json", &uri(s, "")]));
        must(&o, "nbdinfo --list");
        stdout(&o).replace(&s.display().to_string(), "SOCK")
    };
    assert_eq!(list(&bs), list(&qs));

    for c in
        ["read -P 0x11 1M 64k", "write -P 0x22 4M 128k", "write -z 5M 64k", "discard 6M 64k", "read -P 0x22 4M 128k", "flush"]
    {
        let qo = run(peer("qemu-io").args(["-f", "raw", "-c", c, &uri(&qs, "disk")]));
        let bo = run(peer("qemu-io").args(["-f", "raw", "-c", c, &uri(&bs, "disk")]));
        let strip =
            |o: &std::process::Output| stdout(o).lines().filter(|l| !l.contains("ops/sec")).collect::<Vec<_>>().join("\n");
        assert_eq!(strip(&bo), strip(&qo), "{c}");
        assert!(bo.status.success(), "{c}");
    }
    // The read-only export refuses writes as QEMU's does.
    let w = |s: &Path| run(peer("qemu-io").args(["-f", "raw", "-c", "write 0 4k", &uri(s, "r")]));
    let (bw, qw) = (w(&bs), w(&qs));
    assert_eq!(bw.status.code(), qw.status.code());
    assert!(!bw.status.success());
    let map = |s: &Path, e: &str| stdout(&run(peer("qemu-img").args(["map", "--output=json", "-f", "raw", &uri(s, e)])));
    assert_eq!(map(&bs, "disk"), map(&qs, "disk"));
    assert_eq!(map(&bs, "r"), map(&qs, "r"));
    if iothreads {
        // 20000 requests: the thread that accepted the connection (the process's first) only
        // negotiated it; an iothread's reactor served them.
        // The same writes go to qemu-storage-daemon's image, for the comparison below.
        let bench =
            |s: &Path| run(peer("qemu-img").args(["bench", "-w", "-c", "20000", "-d", "16", "-f", "raw", &uri(s, "disk")]));
        must(&bench(&qs), "bench");
        let before = thread_cpu(b.id());
        must(&bench(&bs), "bench");
        let after = thread_cpu(b.id());
        let used = |tid: u32| {
            let at = |v: &[(u32, String, u64)]| v.iter().find(|t| t.0 == tid).map_or(0, |t| t.2);
            at(&after) - at(&before)
        };
        let (busiest, name) = after.iter().map(|t| (used(t.0), t.1.clone())).max().unwrap();
        // The export "disk" is on io0; the accepting reactor's thread is a basalt-reactor.
        assert_eq!(name, "IO io0", "the busiest thread ({busiest} ticks)");
        let others: u64 = after.iter().filter(|t| t.1 != "IO io0").map(|t| used(t.0)).sum();
        assert!(busiest > 5 && others * 4 < busiest, "io0 {busiest} ticks, the other threads {others}");
    }
    q.stop();
    b.stop();
    assert!(!bs.exists(), "socket left behind");
    let (qi, bi) = (d.join("q-disk.qcow2"), d.join("b-disk.qcow2"));
    must(&run(peer("qemu-img").args(["check", "-f", "qcow2", bi.to_str().unwrap()])), "check");
    must(
        &run(peer("qemu-img").args(["compare", "-f", "qcow2", "-F", "qcow2", qi.to_str().unwrap(), bi.to_str().unwrap()])),
        "compare",
    );
}

#[test]
fn refusals_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let s = tmp.path().join("s");
    for (a, want) in [
        (vec!["--export", "type=nbd,id=e,node-name=x"], "Cannot find device='' nor node-name='x'"),
        (vec!["--monitor", "stdio"], "--monitor is not supported yet"),
        (
            vec!["--nbd-server", &format!("addr.type=unix,addr.path={}", s.display()), "--export", "type=nbd,id=e,node-name=x"],
            "Cannot find device='' nor node-name='x'",
        ),
        (
            vec![
                "--nbd-server",
                &format!("addr.type=unix,addr.path={}", s.display()),
                "--export",
                "type=vhost-user-blk,id=e,node-name=x",
            ],
            "Export type 'vhost-user-blk' is not supported",
        ),
        (vec!["--nbd-server", "addr.type=inet,addr.host=127.0.0.1,addr.port=1,tls-creds=t"], "No TLS credentials with id 't'"),
        (vec!["--nbd-server", "addr.type=inet,addr.host=127.0.0.1,addr.port=1,tls-authz=a"], "Cannot find QAuthZ object ID a"),
        (
            vec![
                "--object",
                "authz-simple,id=a,identity=x",
                "--nbd-server",
                "addr.type=inet,addr.host=127.0.0.1,addr.port=1,tls-authz=a",
            ],
            "tls-authz is not permitted without tls-creds",
        ),
    ] {
        let o = run(Command::new(tool("basalt-storage-daemon")).args(&a));
        assert!(!o.status.success(), "{a:?}");
        assert!(String::from_utf8_lossy(&o.stderr).contains(want), "{a:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
}

/// Errors in setting up read as qemu-storage-daemon's, word for word: named by the option that
/// failed.
#[test]
fn setup_errors_match_qemu_storage_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let img = d.join("d.raw");
    must(&run(peer("qemu-img").args(["create", "-q", "-f", "raw", img.to_str().unwrap(), "1M"])), "create");
    let file = format!("driver=file,node-name=f,filename={}", img.display());
    // The node, a server, and `export`.
    let served = |export: &str| -> Vec<String> {
        ["--blockdev", &file, "--nbd-server", "addr.type=unix,addr.path=SOCK", "--export", export].map(String::from).to_vec()
    };
    for (i, a) in [
        vec!["--export".to_string(), "type=nbd,id=e,node-name=x".into()],
        vec!["--blockdev".into(), file.clone(), "--export".into(), "type=nbd,id=e,node-name=f".into()],
        vec!["--object".into(), "secret,id=s".into()],
        vec!["--nbd-server".into(), "addr.type=unix".into()],
        vec!["--blockdev".into(), "driver=file,node-name=f,filename=/nonexistent/x".into()],
        served("type=nbd,id=e,node-name=g"),
        served("type=nbd,id=e,node-name=f,iothread=nope"),
        vec!["--object".into(), "iothread,id=a".into(), "--object".into(), "iothread,id=a".into()],
        vec!["--object".into(), "secret,id=a,data=x".into(), "--object".into(), "iothread,id=a".into()],
        vec!["--object".into(), "iothread,id=a,poll-max-ns=-1".into()],
        vec!["--object".into(), "iothread,id=a,poll-max-ns=100,bogus=1".into()],
        vec!["--object".into(), "iothread".into()],
    ]
    .into_iter()
    .enumerate()
    {
        let with_sock = |tag: &str| -> Vec<String> {
            a.iter().map(|x| x.replace("SOCK", &d.join(format!("{tag}{i}.sock")).display().to_string())).collect()
        };
        let b = run(Command::new(tool("basalt-storage-daemon")).args(with_sock("b")));
        let q = run(peer("qemu-storage-daemon").args(with_sock("q")));
        assert!(!b.status.success() && !q.status.success(), "{a:?}");
        assert_eq!(stderr(&b).replace("basalt-storage-daemon", "qemu-storage-daemon"), stderr(&q), "{a:?}");
    }
}

/// `--daemonize`: the command returns 0 once the export serves (pid file written, the pid the
/// daemon's), or 1 with the reason when setting up fails; as qemu-storage-daemon.
#[test]
fn daemonize_returns_once_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let img = d.join("d.raw");
    must(&run(peer("qemu-img").args(["create", "-q", "-f", "raw", img.to_str().unwrap(), "1M"])), "create");
    for prog in ["basalt", "qemu"] {
        let cmd = || if prog == "basalt" { Command::new(tool("basalt-storage-daemon")) } else { peer("qemu-storage-daemon") };
        let (sock, pid) = (d.join(format!("{prog}.sock")), d.join(format!("{prog}.pid")));
        // Relative paths: they name files in the starting directory, though the daemon moves to /.
        let o = run(cmd().current_dir(d).args([
            "--daemonize",
            "--blockdev",
            &format!("driver=file,node-name=f,filename={}", img.display()),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={prog}.sock"),
            "--export",
            "type=nbd,id=e,node-name=f,writable=on",
            "--pidfile",
            &format!("{prog}.pid"),
        ]));
        must(&o, &format!("{prog}: --daemonize"));
        assert!(sock.exists(), "{prog}: the socket is there when the command returns");
        let p: i32 = std::fs::read_to_string(&pid).unwrap().trim().parse().unwrap();
        let uri = format!("nbd+unix:///f?socket={}", sock.display());
        must(&run(peer("qemu-io").args(["-f", "raw", "-c", &format!("write -P 0x{:x} 0 4k", p % 200 + 1), &uri])), "write");
        assert_eq!(std::fs::read_link(format!("/proc/{p}/cwd")).unwrap(), Path::new("/"), "{prog}: the daemon works from /");
        // SAFETY: kill(2) with the daemon's pid.
        unsafe { libc::kill(p, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{p}")).exists()
            && std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| !s.contains(") Z "))
        {
            assert!(Instant::now() < deadline, "{prog}: the daemon did not end on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!pid.exists(), "{prog}: the pid file is removed at exit");
        must(
            &run(peer("qemu-io").args(["-f", "raw", "-c", &format!("read -P 0x{:x} 0 4k", p % 200 + 1), img.to_str().unwrap()])),
            "data",
        );

        let o = run(cmd().args(["--daemonize", "--blockdev", "driver=file,node-name=f,filename=/nonexistent/x"]));
        assert_eq!(o.status.code(), Some(1), "{prog}: failed set-up");
        assert!(stderr(&o).contains("Could not open '/nonexistent/x'"), "{prog}: {}", stderr(&o));
    }
}
