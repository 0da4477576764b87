//! NBD over TLS (`NBD_OPT_STARTTLS`, x509 credentials), both sides against real peers:
//! basalt-nbd and basalt-storage-daemon serving qemu-io, qemu-img, nbdinfo and nbdcopy
//! (GnuTLS underneath); Basalt's client against qemu-nbd. Certificates are made per test with
//! the openssl tool: a CA, a server certificate for `localhost` and 127.0.0.1 (ECDSA P-256)
//! and a client certificate (RSA 2048), laid out as QEMU's `tls-creds-x509` expects.
//!
//! Beyond data and maps matching: a plain client is refused by a TLS server with QEMU's
//! message; a client with no certificate, an unknown CA or the wrong host name fails its
//! handshake and the server goes on serving others.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use basalt_tests::{must, peer, run, start_listening, stderr, stdout, tool};

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn openssl(d: &Path, args: &[&str]) {
    let o = run(peer("openssl").current_dir(d).args(args));
    must(&o, &format!("openssl {}", args[0]));
}

/// A CA named `ca` in `d/ca-NAME`, with a server directory (`d/NAME-server`) and a client
/// directory (`d/NAME-client`, with or without a client certificate) as QEMU reads them.
struct Pki {
    server: PathBuf,
    client: PathBuf,
    /// A client directory with the CA only (no client certificate).
    anon: PathBuf,
    /// The CA's own directory (its key, for more certificates).
    ca: PathBuf,
}

fn pki(d: &Path, name: &str) -> Pki {
    let dir = |n: &str| {
        let p = d.join(format!("{name}-{n}"));
        std::fs::create_dir_all(&p).unwrap();
        p
    };
    let (ca, server, client, anon) = (dir("ca"), dir("server"), dir("client"), dir("anon"));
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let subj = format!("/CN=Basalt test CA {name}");
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend(["-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2", "-subj", &subj]);
    a.extend(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    openssl(&ca, &a);
    let sign = |csr: &str, out: &Path, ext: &str| {
        std::fs::write(ca.join("ext"), ext).unwrap();
        let o = run(peer("openssl").current_dir(&ca).args([
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext",
            "-out",
            path(out),
        ]));
        must(&o, "openssl x509 -req");
    };
    let mut a = vec!["req"];
    a.extend(ec);
    let server_key = server.join("server-key.pem");
    a.extend(["-keyout", path(&server_key), "-out", "server.csr", "-subj", "/CN=localhost"]);
    openssl(&ca, &a);
    sign(
        "server.csr",
        &server.join("server-cert.pem"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n\
         keyUsage=critical,digitalSignature,keyEncipherment\nbasicConstraints=critical,CA:FALSE\n",
    );
    let client_key = client.join("client-key.pem");
    openssl(
        &ca,
        &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", path(&client_key), "-out", "client.csr", "-subj", "/CN=client"],
    );
    sign(
        "client.csr",
        &client.join("client-cert.pem"),
        "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\nbasicConstraints=critical,CA:FALSE\n",
    );
    for dst in [&server, &client, &anon] {
        std::fs::copy(ca.join("ca-cert.pem"), dst.join("ca-cert.pem")).unwrap();
    }
    Pki { server, client, anon, ca }
}

/// Another client directory of `pki`'s CA, `d/NAME`, whose certificate's subject is `subj`
/// (openssl's `/C=../CN=..` form).
fn issue_client(pki: &Pki, d: &Path, name: &str, subj: &str) -> PathBuf {
    let dir = d.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("client-key.pem");
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend(["-keyout", path(&key), "-out", "extra.csr", "-subj", subj]);
    openssl(&pki.ca, &a);
    std::fs::write(pki.ca.join("ext"), "extendedKeyUsage=clientAuth\nbasicConstraints=critical,CA:FALSE\n").unwrap();
    let cert = dir.join("client-cert.pem");
    let args = ["x509", "-req", "-in", "extra.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-CAcreateserial"];
    must(
        &run(peer("openssl").current_dir(&pki.ca).args(args).args(["-days", "2", "-extfile", "ext", "-out", path(&cert)])),
        "sign",
    );
    std::fs::copy(pki.ca.join("ca-cert.pem"), dir.join("ca-cert.pem")).unwrap();
    dir
}

fn creds(dir: &Path, endpoint: &str) -> String {
    format!("tls-creds-x509,id=tls0,dir={},endpoint={endpoint}", dir.display())
}

fn unix_opts(sock: &Path, export: &str) -> String {
    format!("driver=nbd,server.type=unix,server.path={},export={export},tls-creds=tls0,tls-hostname=localhost", sock.display())
}

/// qemu-io or basalt-io over TLS with the client credentials in `dir`.
fn io(prog: &str, dir: &Path, target: &str, cmds: &[&str]) -> Output {
    let mut c = if prog == "qemu-io" { peer("qemu-io") } else { Command::new(tool("basalt-io")) };
    c.args(["--object", &creds(dir, "client"), "--image-opts"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    run(c.arg(target))
}

fn io_lines(o: &Output) -> String {
    let t = stdout(o) + &stderr(o);
    t.lines().filter(|l| !l.contains("ops/sec")).collect::<Vec<_>>().join("\n")
}

fn nbds_unix(sock: &Path, dir: &Path) -> String {
    format!("nbds+unix:///?socket={}&tls-certificates={}", sock.display(), dir.display())
}

fn make_image(img: &Path) {
    must(&run(peer("qemu-img").args(["create", "-q", "-f", "qcow2", path(img), "64M"])), "create");
    must(
        &run(peer("qemu-io").args(["-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 5M 64k", "-c", "write -z 6M 1M", path(img)])),
        "fill",
    );
}

/// basalt-nbd with `--tls-creds`: QEMU's and libnbd's clients (GnuTLS) read, write, map and
/// copy the export as they do from qemu-nbd with the same credentials; plain clients and
/// clients without a certificate are turned away, and the server goes on.
#[test]
fn basalt_nbd_serves_tls_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let p = pki(d, "a");
    let (bi, qi) = (d.join("b.qcow2"), d.join("q.qcow2"));
    make_image(&bi);
    make_image(&qi);
    let (bs, qs) = (d.join("b.sock"), d.join("q.sock"));
    let server_obj = creds(&p.server, "server");
    let args = ["--object", &server_obj, "--tls-creds", "tls0", "-t", "-e", "4", "-f", "qcow2", "-k"];
    let b = start_listening(Command::new(tool("basalt-nbd")).args(args).arg(&bs).arg(&bi).stderr(Stdio::null()), &bs);
    let q = start_listening(peer("qemu-nbd").args(args).arg(&qs).arg(&qi).stderr(Stdio::null()), &qs);

    // qemu-io over TLS: the same commands print the same against both servers.
    for c in ["read -P 0x11 0 1M", "write -P 0x33 2M 128k", "read -P 0x33 2M 128k", "write -z 5M 4k", "discard 7M 64k", "flush"] {
        let bo = io("qemu-io", &p.client, &unix_opts(&bs, ""), &[c]);
        let qo = io("qemu-io", &p.client, &unix_opts(&qs, ""), &[c]);
        assert_eq!(io_lines(&bo), io_lines(&qo), "{c}");
        must(&bo, c);
    }
    // libnbd: nbdinfo sees TLS, and the same map; nbdcopy copies the same bytes.
    let o = run(peer("nbdinfo").arg(nbds_unix(&bs, &p.client)));
    must(&o, "nbdinfo over TLS");
    assert!(stdout(&o).contains("with TLS"), "{}", stdout(&o));
    let map = |s: &Path| {
        let o = run(peer("nbdinfo").arg("--map").arg(nbds_unix(s, &p.client)));
        must(&o, "nbdinfo --map");
        stdout(&o)
    };
    assert_eq!(map(&bs), map(&qs));
    let (bc, qc) = (d.join("b.raw"), d.join("q.raw"));
    must(&run(peer("nbdcopy").arg(nbds_unix(&bs, &p.client)).arg(&bc)), "nbdcopy from basalt-nbd");
    must(&run(peer("nbdcopy").arg(nbds_unix(&qs, &p.client)).arg(&qc)), "nbdcopy from qemu-nbd");
    assert!(std::fs::read(&bc).unwrap() == std::fs::read(&qc).unwrap(), "nbdcopy copies differ");
    // nbdcopy into the export, over TLS, then read back.
    std::fs::write(d.join("in.raw"), vec![0x7eu8; 64 << 20]).unwrap();
    must(&run(peer("nbdcopy").arg(d.join("in.raw")).arg(nbds_unix(&bs, &p.client))), "nbdcopy to basalt-nbd");
    must(&io("qemu-io", &p.client, &unix_opts(&bs, ""), &["read -P 0x7e 0 64M"]), "read back");

    // A plain client is told TLS is required, in QEMU's words, by both servers.
    let plain = |s: &Path| {
        let o = run(peer("qemu-io").args(["-f", "raw", "-c", "read 0 4k", &format!("nbd+unix:///?socket={}", s.display())]));
        assert!(!o.status.success());
        stderr(&o).replace(&s.display().to_string(), "SOCK")
    };
    let bp = plain(&bs);
    assert!(bp.contains("TLS negotiation required before option 7 (go)"), "{bp}");
    assert_eq!(bp, plain(&qs));
    // A client without a certificate fails its handshake (verify-peer is on by default).
    let o = io("qemu-io", &p.anon, &unix_opts(&bs, ""), &["read 0 4k"]);
    assert!(!o.status.success(), "a client without a certificate was let in");
    // A client trusting another CA refuses the server.
    let other = pki(d, "b");
    let o = io("qemu-io", &other.client, &unix_opts(&bs, ""), &["read 0 4k"]);
    assert!(!o.status.success(), "a server from an unknown CA was accepted");
    // Raw clients: an option before TLS gets ERR_TLS_REQD; garbage after STARTTLS, or a
    // disconnect mid-handshake, ends that connection only.
    for junk in [&b"\x16\x03\x01\xff\xffnot a client hello"[..], &[]] {
        let mut c = raw_client(&bs);
        c.write_all(&option(3)).unwrap();
        assert_eq!(reply_type(&mut c), (1 << 31) + 5, "LIST before TLS");
        c.write_all(&option(5)).unwrap();
        assert_eq!(reply_type(&mut c), 1, "STARTTLS acknowledged");
        c.write_all(junk).unwrap();
        if junk.is_empty() {
            drop(c);
            continue;
        }
        // The server answers with an alert at most, and closes (a hang times out: an error).
        let mut rest = Vec::new();
        assert!(c.read_to_end(&mut rest).is_ok(), "the server kept a connection sending garbage");
    }
    // And the server is still serving.
    must(&io("qemu-io", &p.client, &unix_opts(&bs, ""), &["read -P 0x7e 0 1M"]), "read after refused clients");

    // -L over TLS lists the same as qemu-nbd -L.
    let list = |prog: Command, s: &Path| {
        let mut prog = prog;
        let o = run(prog
            .args(["-L", "--object", &creds(&p.client, "client"), "--tls-creds", "tls0", "--tls-hostname", "localhost", "-k"])
            .arg(s));
        must(&o, "-L over TLS");
        stdout(&o)
    };
    assert_eq!(list(Command::new(tool("basalt-nbd")), &bs), list(peer("qemu-nbd"), &bs));
    assert_eq!(list(Command::new(tool("basalt-nbd")), &qs), list(peer("qemu-nbd"), &qs));
    q.stop();
    b.stop();
    must(&run(peer("qemu-img").args(["check", "-q", path(&bi)])), "check");
}

/// A raw client past the greeting (fixed newstyle, no zeroes); reads time out after 10 s.
fn raw_client(sock: &Path) -> UnixStream {
    let mut c = UnixStream::connect(sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).unwrap();
    c.write_all(&3u32.to_be_bytes()).unwrap();
    c
}

fn option(o: u32) -> Vec<u8> {
    let mut m = b"IHAVEOPT".to_vec();
    m.extend_from_slice(&o.to_be_bytes());
    m.extend_from_slice(&0u32.to_be_bytes());
    m
}

/// An option reply's type (its data read and dropped).
fn reply_type(c: &mut UnixStream) -> u32 {
    let mut h = [0u8; 20];
    c.read_exact(&mut h).unwrap();
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut data = vec![0u8; len as usize];
    c.read_exact(&mut data).unwrap();
    u32::from_be_bytes(h[12..16].try_into().unwrap())
}

/// A TCP port nothing listens on (bound and released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_tcp(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Basalt's client against qemu-nbd over TLS on TCP: the server's certificate is checked
/// against the host connected to (or `tls-hostname`); data, compare and map match qemu-img's
/// over the same URI; the storage daemon serves TLS too.
#[test]
fn client_over_tls_against_qemu_nbd_and_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let p = pki(d, "a");
    let img = d.join("q.qcow2");
    make_image(&img);
    let port = free_port();
    let q = peer("qemu-nbd")
        .args(["--object", &creds(&p.server, "server"), "--tls-creds", "tls0", "-t", "-e", "8", "-f", "qcow2"])
        .args(["-b", "127.0.0.1", "-p", &port.to_string()])
        .arg(&img)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _q = ListeningGuard(q);
    wait_tcp(port);
    let target = |host: &str, extra: &str| format!("driver=nbd,host={host},port={port},tls-creds=tls0{extra}");
    let obj = creds(&p.client, "client");

    // Writes through Basalt's client read back through QEMU's, and the other way.
    must(&io("basalt-io", &p.client, &target("127.0.0.1", ""), &["write -P 0x44 3M 1M", "flush"]), "basalt-io write");
    must(&io("qemu-io", &p.client, &target("localhost", ""), &["read -P 0x44 3M 1M"]), "qemu-io reads it");
    must(&io("qemu-io", &p.client, &target("localhost", ""), &["write -P 0x55 9M 192k"]), "qemu-io write");
    let bo = io("basalt-io", &p.client, &target("localhost", ""), &["read -P 0x55 9M 192k", "read -P 0x11 0 1M"]);
    must(&bo, "basalt-io reads it");
    // compare against the image itself, map and info as qemu-img prints them.
    let cmp = run(Command::new(tool("basalt-img"))
        .args(["compare", "-U", "--object", &obj, "--image-opts", &target("127.0.0.1", "")])
        .arg(format!("driver=qcow2,file.driver=file,file.filename={}", img.display())));
    must(&cmp, "basalt-img compare over TLS");
    assert!(stdout(&cmp).contains("Images are identical"), "{}", stdout(&cmp));
    for sub in [&["map", "--output=json"][..], &["info", "--output=json"][..]] {
        let mut b = Command::new(tool("basalt-img"));
        let mut q = peer("qemu-img");
        for c in [&mut b, &mut q] {
            c.args(sub).args(["--object", &obj, "--image-opts", &target("127.0.0.1", "")]);
        }
        let (bo, qo) = (run(&mut b), run(&mut q));
        must(&bo, sub[0]);
        assert_eq!(stdout(&bo), stdout(&qo), "{}", sub[0]);
    }

    // The server's name is checked: tls-hostname that the certificate does not carry fails.
    let o = io("basalt-io", &p.client, &target("127.0.0.1", ",tls-hostname=elsewhere.example"), &["read 0 4k"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not valid for name"), "{}", stderr(&o));
    // A CA that did not sign the server's certificate.
    let other = pki(d, "b");
    let o = io("basalt-io", &other.client, &target("127.0.0.1", ""), &["read 0 4k"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("TLS handshake failed"), "{}", stderr(&o));
    // No client certificate: the server (verify-peer on) refuses the handshake.
    let o = io("basalt-io", &p.anon, &target("127.0.0.1", ""), &["read 0 4k"]);
    assert!(!o.status.success(), "qemu-nbd let in a client without a certificate");
    // Missing credential files are named.
    let o = io("basalt-io", &d.join("nowhere"), &target("127.0.0.1", ""), &["read 0 4k"]);
    assert!(stderr(&o).contains("Unable to access credentials"), "{}", stderr(&o));
    // Credentials for the wrong side.
    let o = run(Command::new(tool("basalt-io")).args([
        "--object",
        &creds(&p.server, "server"),
        "--image-opts",
        &target("127.0.0.1", ""),
        "-c",
        "read 0 1",
    ]));
    assert!(stderr(&o).contains("Expecting TLS credentials with a client endpoint"), "{}", stderr(&o));

    // basalt-storage-daemon with tls-creds on its NBD server.
    let sock = d.join("daemon.sock");
    let daemon = start_listening(
        Command::new(tool("basalt-storage-daemon"))
            .args(["--object", &creds(&p.server, "server"), "--object", "iothread,id=io0"])
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=f,filename={}", d.join("q.raw").display()))
            .args(["--nbd-server", &format!("addr.type=unix,addr.path={},tls-creds=tls0", sock.display())])
            .args(["--export", "type=nbd,id=e,node-name=f,name=disk,writable=on"])
            // The same node again, served on an iothread: the connection, TLS session
            // included, moves there after the handshake.
            .args(["--export", "type=nbd,id=e2,node-name=f,name=disk-io,writable=on,iothread=io0"]),
        &{
            std::fs::write(d.join("q.raw"), vec![0x66u8; 4 << 20]).unwrap();
            sock.clone()
        },
    );
    must(&io("qemu-io", &p.client, &unix_opts(&sock, "disk"), &["read -P 0x66 0 4M", "write -P 0x67 1M 4k"]), "daemon over TLS");
    must(&io("basalt-io", &p.client, &unix_opts(&sock, "disk"), &["read -P 0x67 1M 4k"]), "basalt client to daemon");
    must(
        &io(
            "qemu-io",
            &p.client,
            &unix_opts(&sock, "disk-io"),
            &["read -P 0x67 1M 4k", "write -P 0x68 2M 1M", "read -P 0x68 2M 1M"],
        ),
        "daemon over TLS, on an iothread",
    );
    must(&io("basalt-io", &p.client, &unix_opts(&sock, "disk-io"), &["read -P 0x68 2M 1M"]), "basalt client to the iothread");
    let o =
        run(peer("nbdinfo").arg(format!("nbds+unix:///disk?socket={}&tls-certificates={}", sock.display(), p.client.display())));
    must(&o, "nbdinfo to the daemon");
    daemon.stop();
}

/// Kills a server started without [`start_listening`] (TCP) when the test ends.
struct ListeningGuard(std::process::Child);

impl Drop for ListeningGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `keys.psk` as QEMU reads it (`user:hexkey` lines), in a directory of its own.
fn psk_dir(d: &Path, name: &str, users: &[&str]) -> PathBuf {
    let dir = d.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut text = String::new();
    for (i, u) in users.iter().enumerate() {
        let key: String = (0..32).map(|j| format!("{:02x}", (i * 37 + j * 11 + name.len()) as u8)).collect();
        text += &format!("{u}:{key}\n");
    }
    std::fs::write(dir.join("keys.psk"), text).unwrap();
    dir
}

fn psk(dir: &Path, endpoint: &str, user: Option<&str>) -> String {
    let u = user.map(|u| format!(",username={u}")).unwrap_or_default();
    format!("tls-creds-psk,id=tls0,dir={},endpoint={endpoint}{u}", dir.display())
}

fn psk_io(prog: &str, obj: &str, target: &str, cmds: &[&str]) -> Output {
    let mut c = if prog == "qemu-io" { peer("qemu-io") } else { Command::new(tool("basalt-io")) };
    c.args(["--object", obj, "--image-opts"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    run(c.arg(target))
}

/// Pre-shared keys (`tls-creds-psk`) both ways: basalt-nbd serving QEMU's client and libnbd
/// (GnuTLS), Basalt's client reading and writing through qemu-nbd; an unknown user, or a key
/// that differs, fails the handshake and the server goes on.
#[test]
fn psk_both_ways() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let keys = psk_dir(d, "keys", &["qemu", "alice"]);
    let (bi, qi) = (d.join("b.qcow2"), d.join("q.qcow2"));
    make_image(&bi);
    make_image(&qi);
    let (bs, qs) = (d.join("b.sock"), d.join("q.sock"));
    let server = psk(&keys, "server", None);
    let args = ["--object", &server, "--tls-creds", "tls0", "-t", "-e", "4", "-f", "qcow2", "-k"];
    let b = start_listening(Command::new(tool("basalt-nbd")).args(args).arg(&bs).arg(&bi).stderr(Stdio::null()), &bs);
    let q = start_listening(peer("qemu-nbd").args(args).arg(&qs).arg(&qi).stderr(Stdio::null()), &qs);
    let opts = |s: &Path| format!("driver=nbd,server.type=unix,server.path={},tls-creds=tls0", s.display());

    // QEMU's client, as the default user and as alice, against basalt-nbd.
    let o = psk_io("qemu-io", &psk(&keys, "client", None), &opts(&bs), &["read -P 0x11 0 1M", "write -P 0x61 2M 64k"]);
    must(&o, "qemu-io with PSK");
    must(&psk_io("qemu-io", &psk(&keys, "client", Some("alice")), &opts(&bs), &["read -P 0x61 2M 64k"]), "as alice");
    // libnbd (the user is the URI's).
    let uri = |s: &Path, user: &str, file: &Path| {
        format!("nbds+unix://{user}@/?socket={}&tls-psk-file={}", s.display(), file.join("keys.psk").display())
    };
    let o = run(peer("nbdinfo").arg(uri(&bs, "alice", &keys)));
    must(&o, "nbdinfo with PSK");
    assert!(stdout(&o).contains("with TLS"), "{}", stdout(&o));
    must(&run(peer("nbdcopy").arg(uri(&bs, "alice", &keys)).arg(d.join("copy.raw"))), "nbdcopy with PSK");
    let cmp = run(peer("qemu-img").args(["compare", "-U", "-f", "raw", "-F", "qcow2", path(&d.join("copy.raw")), path(&bi)]));
    must(&cmp, "the copy matches the image");
    // Unknown user, and a known user with another key: refused.
    let mallory = psk_dir(d, "mallory", &["mallory"]);
    assert!(!run(peer("nbdinfo").arg(uri(&bs, "mallory", &mallory))).status.success(), "unknown user let in");
    let forged = psk_dir(d, "forged", &["qemu"]);
    let o = psk_io("qemu-io", &psk(&forged, "client", None), &opts(&bs), &["read 0 4k"]);
    assert!(!o.status.success(), "a wrong key was let in");
    must(&psk_io("qemu-io", &psk(&keys, "client", None), &opts(&bs), &["read -P 0x11 0 1M"]), "still serving");

    // Basalt's client against qemu-nbd with PSK: writes read back through QEMU's client.
    let bc = psk(&keys, "client", Some("alice"));
    must(&psk_io("basalt-io", &bc, &opts(&qs), &["read -P 0x11 0 1M", "write -P 0x62 3M 1M", "flush"]), "basalt-io with PSK");
    must(&psk_io("qemu-io", &psk(&keys, "client", None), &opts(&qs), &["read -P 0x62 3M 1M"]), "qemu-io reads it");
    let o = psk_io("basalt-io", &psk(&forged, "client", None), &opts(&qs), &["read 0 4k"]);
    assert!(stderr(&o).contains("TLS handshake failed"), "{}", stderr(&o));
    let o = psk_io("basalt-io", &psk(&keys, "client", Some("bob")), &opts(&qs), &["read 0 4k"]);
    assert!(stderr(&o).contains("Username bob not found in PSK file"), "{}", stderr(&o));
    q.stop();
    b.stop();
    must(&run(peer("qemu-img").args(["check", "-q", path(&bi)])), "check");
}

/// `--tls-authz` with QEMU's authorization objects: for each object, the same client
/// certificate is let in or turned away by basalt-nbd exactly as by qemu-nbd given the same
/// objects, and a refusal names the certificate's distinguished name as qemu-nbd does (in
/// certificate order, with `\,` inside a value). Also: PSK usernames are checked, the storage
/// daemon's `tls-authz`, and the command-line errors.
#[test]
fn tls_authz_matches_qemu_nbd() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let p = pki(d, "az");
    let laptop = issue_client(&p, d, "laptop", "/C=GB/ST=London/O=Example Org, Ltd/CN=laptop.example.com");
    let dn = "C=GB,ST=London,O=Example Org\\, Ltd,CN=laptop.example.com";
    let img = d.join("d.qcow2");
    make_image(&img);
    let cases: [(&str, bool); 7] = [
        // The DN in keyval needs its commas doubled.
        ("authz-simple,id=az,identity=C=GB,,ST=London,,O=Example Org\\,, Ltd,,CN=laptop.example.com", true),
        ("authz-simple,id=az,identity=CN=laptop.example.com", false),
        (
            r#"{"qom-type":"authz-list","id":"az","policy":"deny","rules":[{"match":"*CN=laptop.*","policy":"allow","format":"glob"}]}"#,
            true,
        ),
        ("authz-list,id=az,rules.0.match=*CN=laptop.*,rules.0.policy=allow", false),
        ("authz-list,id=az,rules.0.match=*Example Org*,rules.0.policy=deny,rules.0.format=glob,policy=allow", false),
        ("authz-list,id=az,rules.0.match=C=GB?ST=London*,rules.0.policy=allow,rules.0.format=glob", true),
        ("authz-list,id=az,policy=allow", true),
    ];
    for (i, (authz, allowed)) in cases.iter().enumerate() {
        let mut outcome = Vec::new();
        for server in ["basalt-nbd", "qemu-nbd"] {
            let sock = d.join(format!("{server}-{i}.sock"));
            let log = d.join(format!("{server}-{i}.log"));
            let mut c = if server == "qemu-nbd" { peer("qemu-nbd") } else { Command::new(tool("basalt-nbd")) };
            c.args(["--object", &creds(&p.server, "server"), "--object", authz, "--tls-creds", "tls0", "--tls-authz", "az"]);
            c.args(["-t", "-e", "4", "-f", "qcow2", "-k", path(&sock), path(&img)]);
            let g = start_listening(c.stderr(std::fs::File::create(&log).unwrap()), &sock);
            let o = io("qemu-io", &laptop, &unix_opts(&sock, ""), &["read -P 0x11 0 64k"]);
            assert_eq!(o.status.success(), *allowed, "{server} with {authz}: {}", stderr(&o));
            // The server goes on: a client the object lets in (or not) again gets the same.
            let o2 = io("qemu-io", &laptop, &unix_opts(&sock, ""), &["read -P 0x11 0 64k"]);
            assert_eq!(o2.status.success(), *allowed, "{server} second client");
            g.stop();
            let text = std::fs::read_to_string(&log).unwrap();
            let denied =
                text.lines().filter(|l| l.contains("authz check")).map(|l| l[l.find("TLS x509").unwrap()..].to_string()).next();
            if !allowed {
                assert_eq!(
                    denied.as_deref(),
                    Some(format!("TLS x509 authz check for {dn} is denied").as_str()),
                    "{server}: {text}"
                );
            }
            outcome.push((o.status.success(), denied));
        }
        assert_eq!(outcome[0], outcome[1], "basalt-nbd and qemu-nbd differ with {authz}");
    }

    // A PSK client's username is checked (qemu-nbd leaves PSK clients unchecked).
    let keys = psk_dir(d, "keys", &["qemu", "alice"]);
    let sock = d.join("psk.sock");
    let args = ["--object", &psk(&keys, "server", None), "--object", "authz-simple,id=az,identity=alice"];
    let b =
        start_listening(
            Command::new(tool("basalt-nbd"))
                .args(args)
                .args(["--tls-creds", "tls0", "--tls-authz", "az", "-t", "-e", "4"])
                .args(["-f", "qcow2", "-k", path(&sock), path(&img)]),
            &sock,
        );
    let opts = format!("driver=nbd,server.type=unix,server.path={},tls-creds=tls0", sock.display());
    must(&psk_io("qemu-io", &psk(&keys, "client", Some("alice")), &opts, &["read -P 0x11 0 64k"]), "alice is let in");
    assert!(!psk_io("qemu-io", &psk(&keys, "client", None), &opts, &["read 0 4k"]).status.success(), "user qemu let in");
    b.stop();

    // The storage daemon's tls-authz.
    let sock = d.join("qsd.sock");
    let node = format!("driver=qcow2,node-name=n0,file.driver=file,file.filename={}", img.display());
    let srv = format!("addr.type=unix,addr.path={},tls-creds=tls0,tls-authz=az", sock.display());
    let daemon = start_listening(
        Command::new(tool("basalt-storage-daemon"))
            .args(["--object", &creds(&p.server, "server"), "--object", "authz-simple,id=az,identity=CN=client"])
            .args(["--blockdev", &node, "--nbd-server", &srv, "--export", "type=nbd,id=e0,node-name=n0,name=n0,writable=on"])
            .stderr(Stdio::null()),
        &sock,
    );
    must(&io("qemu-io", &p.client, &unix_opts(&sock, "n0"), &["read -P 0x11 0 64k"]), "CN=client is let in");
    assert!(!io("qemu-io", &laptop, &unix_opts(&sock, "n0"), &["read 0 4k"]).status.success(), "the laptop let in");
    daemon.stop();

    // Command-line errors: the same words as qemu-nbd's.
    for args in [
        vec!["--tls-authz", "az", "-f", "raw", "/nonexistent"],
        vec!["--object", &creds(&p.client, "client"), "--tls-creds", "tls0", "--tls-authz", "az", "-L", "-k", "/nonexistent"],
    ] {
        let b = run(Command::new(tool("basalt-nbd")).args(&args));
        let q = run(peer("qemu-nbd").args(&args));
        assert!(!b.status.success() && !q.status.success());
        assert_eq!(stderr(&b).replace("basalt-nbd", "qemu-nbd"), stderr(&q), "{args:?}");
    }
    let o = run(Command::new(tool("basalt-nbd")).args(["--object", &creds(&p.server, "server"), "--tls-creds", "tls0"]).args([
        "--tls-authz",
        "zz",
        "-f",
        "qcow2",
        "-k",
        path(&d.join("x.sock")),
        path(&img),
    ]));
    assert!(stderr(&o).contains("Cannot find QAuthZ object ID zz"), "{}", stderr(&o));
}

/// `sanity-check` (on by default): certificates QEMU refuses before serving, basalt-nbd
/// refuses with the same message (a CA as the server's certificate, a CA certificate that is
/// not marked one, a purpose or usage that does not allow the role, an expired certificate,
/// one from another CA), and the same on a client's side (basalt-io as qemu-io);
/// `sanity-check=off` lets both start.
#[test]
fn sanity_check_matches_qemu() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let ok = pki(d, "ok");
    let other = pki(d, "other");
    // A server directory holding `cert` (signed by `ca` from its copy of the server's request,
    // with extensions `ext`, valid for `days`) and `trust` as its CA certificate.
    let server_dir = |name: &str, ca: &Pki, trust: &Path, ext: &str, days: &str| {
        let dir = d.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(ca.ca.join("ext"), ext).unwrap();
        let args = ["x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-CAcreateserial"];
        let out = dir.join("server-cert.pem");
        must(
            &run(peer("openssl").current_dir(&ca.ca).args(args).args(["-days", days, "-extfile", "ext", "-out", path(&out)])),
            "sign",
        );
        std::fs::copy(ca.server.join("server-key.pem"), dir.join("server-key.pem")).unwrap();
        std::fs::copy(trust, dir.join("ca-cert.pem")).unwrap();
        dir
    };
    let ca_cert = ok.ca.join("ca-cert.pem");
    let leaf = "basicConstraints=critical,CA:FALSE\n";
    let mut cases = vec![
        server_dir("as-ca", &ok, &ca_cert, "basicConstraints=critical,CA:TRUE\n", "2"),
        server_dir("client-purpose", &ok, &ca_cert, &format!("{leaf}extendedKeyUsage=critical,clientAuth\n"), "2"),
        server_dir("sign-only", &ok, &ca_cert, &format!("{leaf}keyUsage=critical,keyCertSign\n"), "2"),
        server_dir("expired", &ok, &ca_cert, leaf, "-1"),
        server_dir("foreign", &other, &ca_cert, leaf, "2"),
    ];
    // A CA certificate without basic constraints (self-signed from a request, no extensions).
    let bare = d.join("bare-ca");
    std::fs::create_dir_all(&bare).unwrap();
    openssl(
        &bare,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "k.pem",
            "-out",
            "c.csr",
            "-subj",
            "/CN=bare",
        ],
    );
    openssl(&bare, &["x509", "-req", "-in", "c.csr", "-signkey", "k.pem", "-days", "2", "-out", "ca-cert.pem"]);
    cases.push(server_dir("bare", &ok, &bare.join("ca-cert.pem"), leaf, "2"));
    // A CA certificate whose basic constraints say it is not one.
    let not_ca = d.join("not-ca");
    std::fs::create_dir_all(&not_ca).unwrap();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend(["-keyout", "k.pem", "-out", "ca-cert.pem", "-days", "2", "-subj", "/CN=not a CA"]);
    a.extend(["-addext", "basicConstraints=critical,CA:FALSE"]);
    openssl(&not_ca, &a);
    cases.push(server_dir("not-ca-dir", &ok, &not_ca.join("ca-cert.pem"), leaf, "2"));
    let img = d.join("s.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let refusal = |prog: &str, dir: &Path, extra: &str| {
        let sock = d.join(format!("{prog}.sock"));
        let mut c = Command::new("timeout");
        c.args([
            "10",
            prog,
            "--object",
            &format!("{}{extra}", creds(dir, "server")),
            "--tls-creds",
            "tls0",
            "-k",
            path(&sock),
            path(&img),
        ]);
        let o = run(&mut c);
        let text = stderr(&o);
        (o.status.code(), text.split_once(": ").map(|(_, m)| m.trim().to_string()).unwrap_or(text))
    };
    let want = [
        "basic constraints show a CA, but we need one for a server",
        "purpose does not allow use with a TLS server",
        "usage does not permit digital signature",
        "has expired",
        "failed validation against",
        "is missing basic constraints for a CA",
        "basic constraints do not show a CA",
    ];
    for (dir, want) in cases.iter().zip(want) {
        let (qc, q) = refusal("qemu-nbd", dir, "");
        let (bc, b) = refusal(path(&tool("basalt-nbd")), dir, "");
        assert_eq!(qc, Some(1), "qemu-nbd with {}: {q}", dir.display());
        assert!(q.contains(want), "qemu-nbd with {}: {q}", dir.display());
        assert_eq!(bc, Some(1), "basalt-nbd with {}: {b}", dir.display());
        assert_eq!(b, q, "basalt-nbd and qemu-nbd refuse {} differently", dir.display());
    }
    // sanity-check=off: both serve with the CA-flagged certificate (until `timeout` ends them).
    for prog in ["qemu-nbd".to_string(), path(&tool("basalt-nbd")).to_string()] {
        let sock = d.join("off.sock");
        let _ = std::fs::remove_file(&sock);
        let obj = format!("{},sanity-check=off", creds(&cases[0], "server"));
        let s = start_listening(
            Command::new(&prog).args(["--object", &obj, "--tls-creds", "tls0", "-t", "-k", path(&sock), path(&img)]),
            &sock,
        );
        // Serving: it greets a client (qemu-nbd ignores a SIGTERM that comes before that).
        drop(raw_client(&sock));
        s.stop();
    }

    // A client certificate whose critical purpose is a server's: qemu-io and basalt-io refuse
    // it alike, before connecting.
    let client = d.join("client-as-server");
    std::fs::create_dir_all(&client).unwrap();
    std::fs::write(ok.ca.join("ext"), format!("{leaf}extendedKeyUsage=critical,serverAuth\n")).unwrap();
    let args = ["x509", "-req", "-in", "client.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-CAcreateserial"];
    let cert = client.join("client-cert.pem");
    must(
        &run(peer("openssl").current_dir(&ok.ca).args(args).args(["-days", "2", "-extfile", "ext", "-out", path(&cert)])),
        "sign",
    );
    std::fs::copy(ok.client.join("client-key.pem"), client.join("client-key.pem")).unwrap();
    std::fs::copy(&ca_cert, client.join("ca-cert.pem")).unwrap();
    let target = unix_opts(&d.join("nobody.sock"), "");
    let (q, b) = (io("qemu-io", &client, &target, &["read 0 512"]), io("basalt-io", &client, &target, &["read 0 512"]));
    let msg = format!("Certificate {} purpose does not allow use with a TLS client", cert.display());
    assert!(!q.status.success() && stderr(&q).contains(&msg), "qemu-io: {}", stderr(&q));
    assert!(!b.status.success() && stderr(&b).contains(&msg), "basalt-io: {}", stderr(&b));
}
