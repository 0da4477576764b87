//! The `luks` format against QEMU's tools, both directions, over the cipher matrix.
//!
//! - Images qemu-img creates (every cipher mode, AES key size, IV generator and hash tried
//!   below) and qemu-io writes read back byte-exact through basalt-io (`read -P`), and convert
//!   to the same raw bytes through both tools (so the decrypted garbage of never-written
//!   sectors agrees too); `info` prints what qemu-img prints.
//! - Images basalt-img creates and basalt-io writes read back byte-exact in qemu-io, and
//!   convert to the same raw bytes in both tools.
//! - A wrong passphrase, a missing `key-secret` and a missing secret give QEMU's errors;
//!   malformed headers (truncated files, key slots out of place, huge stripes, bad key size,
//!   LUKS2) fail with an error naming the problem, never a panic or a hang.
//! - Through the engine directly: a write leaves the caller's buffer as it was.
//!
//! `iter-time=10` keeps key derivation fast. The binaries must be built first
//! (`cargo build -p basalt-tools --bins`); qemu-img and qemu-io must be installed.

use std::path::Path;
use std::process::{Command, Output};

use basalt_engine::{Backend, Graph, OpenFlags, Opts, Secrets, WriteFlags};
use basalt_reactor::{IoBuf, Reactor, ReactorConfig};
use basalt_tests::{must, peer, run, stderr, stdout, tool};

const SECRET: &str = "secret,id=sec0,data=abc";

fn qemu_img(dir: &Path, args: &[&str]) -> Output {
    run(peer("qemu-img").current_dir(dir).args(args))
}

fn qemu_io(dir: &Path, args: &[&str]) -> Output {
    run(peer("qemu-io").current_dir(dir).args(args))
}

/// A Basalt tool under `timeout`, so that a hang fails the test instead of stalling it.
fn basalt(dir: &Path, name: &str, args: &[&str]) -> Output {
    run(Command::new("timeout").current_dir(dir).arg("60").arg(tool(name)).args(args))
}

fn image_opts(file: &str) -> String {
    format!("driver=luks,key-secret=sec0,file.filename={file}")
}

/// `-c` arguments for `cmds`.
fn cmd_args(cmds: &[String]) -> Vec<&str> {
    cmds.iter().flat_map(|c| ["-c", c.as_str()]).collect()
}

/// Run `cmds` in qemu-io (`basalt == false`) or basalt-io on the LUKS image `file`; every
/// command must succeed (qemu-io exits 0 even when a pattern check fails, so the output is
/// checked too).
fn io(dir: &Path, basalt_side: bool, file: &str, cmds: &[String]) {
    let opts = image_opts(file);
    let mut args = vec!["--object", SECRET, "--image-opts", opts.as_str()];
    args.extend(cmd_args(cmds));
    let o = if basalt_side { basalt(dir, "basalt-io", &args) } else { qemu_io(dir, &args) };
    let who = if basalt_side { "basalt-io" } else { "qemu-io" };
    must(&o, &format!("{who} {cmds:?} on {file}"));
    let out = stdout(&o) + &stderr(&o);
    assert!(!out.contains("failed") && !out.contains("error"), "{who} {cmds:?} on {file}:\n{out}");
}

/// Patterns at sector-aligned offsets across the image: (pattern, offset, length).
const PATTERNS: &[(u8, u64, u64)] =
    &[(0x11, 0, 65536), (0x22, 1 << 20, 4096), (0x33, (1 << 20) + 8192 + 512, 1536), (0x44, (4 << 20) - 2048, 2048)];

fn writes() -> Vec<String> {
    PATTERNS.iter().map(|(p, o, l)| format!("write -P {p} {o} {l}")).collect()
}

fn reads() -> Vec<String> {
    PATTERNS.iter().map(|(p, o, l)| format!("read -P {p} {o} {l}")).collect()
}

/// Both tools convert the image to raw; the results must be the same bytes.
fn same_plaintext(dir: &Path, file: &str) {
    let opts = image_opts(file);
    let q = format!("{file}.q.raw");
    let b = format!("{file}.b.raw");
    let args = |out: &str| -> Vec<String> {
        ["convert", "--object", SECRET, "--image-opts", opts.as_str(), "-O", "raw", out].map(str::to_string).to_vec()
    };
    let qa = args(&q);
    must(&qemu_img(dir, &qa.iter().map(String::as_str).collect::<Vec<_>>()), "qemu-img convert");
    let ba = args(&b);
    must(&basalt(dir, "basalt-img", &ba.iter().map(String::as_str).collect::<Vec<_>>()), "basalt-img convert");
    let (qd, bd) = (std::fs::read(dir.join(&q)).unwrap(), std::fs::read(dir.join(&b)).unwrap());
    assert_eq!(qd.len(), 4 << 20, "{file}: converted size");
    assert!(qd == bd, "{file}: basalt-img and qemu-img decrypt to different bytes");
    for (p, o, l) in PATTERNS {
        assert!(qd[*o as usize..(*o + *l) as usize].iter().all(|x| x == p), "{file}: pattern {p:#x} at {o}");
    }
}

/// `info` (human and JSON, with and without the key) prints the same in both tools.
fn same_info(dir: &Path, file: &str) {
    let opts = image_opts(file);
    for args in [
        vec!["info", file],
        vec!["info", "--output=json", file],
        vec!["info", "--output=json", "--object", SECRET, "--image-opts", opts.as_str()],
    ] {
        let q = qemu_img(dir, &args);
        let b = basalt(dir, "basalt-img", &args);
        must(&q, "qemu-img info");
        assert_eq!(stdout(&b), stdout(&q), "basalt-img {args:?}\nstderr: {}", stderr(&b));
    }
}

/// The create options tried, beyond `key-secret` and `iter-time`.
const COMBOS: &[&str] = &[
    "",
    "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256",
    "cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=plain64",
    "cipher-alg=aes-128,cipher-mode=xts,ivgen-alg=plain,hash-alg=sha1",
    "cipher-alg=aes-192,cipher-mode=xts,hash-alg=sha512",
    "cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=essiv",
    "cipher-alg=aes-256,cipher-mode=ctr",
    "cipher-alg=aes-128,cipher-mode=ecb,hash-alg=ripemd160",
    "cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha224",
];

fn create_opts(combo: &str) -> String {
    let mut o = "key-secret=sec0,iter-time=10".to_string();
    if !combo.is_empty() {
        o.push(',');
        o.push_str(combo);
    }
    o
}

#[test]
fn qemu_images_read_in_basalt() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (i, combo) in COMBOS.iter().enumerate() {
        let file = format!("q{i}.luks");
        let o = create_opts(combo);
        must(
            &qemu_img(d, &["create", "-q", "-f", "luks", "--object", SECRET, "-o", &o, &file, "4M"]),
            &format!("create {combo}"),
        );
        io(d, false, &file, &writes());
        io(d, true, &file, &reads());
        same_plaintext(d, &file);
        same_info(d, &file);
    }
}

#[test]
fn basalt_images_read_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (i, combo) in COMBOS.iter().enumerate() {
        let file = format!("b{i}.luks");
        let o = create_opts(combo);
        let args = ["create", "-f", "luks", "--object", SECRET, "-o", &o, &file, "4M"];
        let b = basalt(d, "basalt-img", &args);
        must(&b, &format!("basalt-img create {combo}"));
        // The same `Formatting` line as qemu-img's.
        let q = qemu_img(d, &["create", "-f", "luks", "--object", SECRET, "-o", &o, &format!("ref{i}.luks"), "4M"]);
        assert_eq!(stdout(&b).replace(&file, "X"), stdout(&q).replace(&format!("ref{i}.luks"), "X"), "{combo}");
        // QEMU's layout: same size, same key material and payload offsets.
        assert_eq!(
            std::fs::metadata(d.join(&file)).unwrap().len(),
            std::fs::metadata(d.join(format!("ref{i}.luks"))).unwrap().len()
        );
        io(d, true, &file, &writes());
        io(d, false, &file, &reads());
        same_plaintext(d, &file);
        same_info(d, &file);
    }
}

#[test]
fn secrets_in_every_form() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    must(
        &basalt(
            d,
            "basalt-img",
            &["create", "-q", "-f", "luks", "--object", SECRET, "-o", "key-secret=sec0,iter-time=10", "s.luks", "1M"],
        ),
        "create",
    );
    std::fs::write(d.join("pw"), b"abc").unwrap();
    std::fs::write(d.join("pw64"), b"YWJj").unwrap();
    let opts = image_opts("s.luks");
    for obj in
        ["secret,id=sec0,data=YWJj,format=base64", "secret,id=sec0,file=pw", "qom-type=secret,id=sec0,file=pw64,format=base64"]
    {
        let o = basalt(d, "basalt-io", &["--object", obj, "--image-opts", &opts, "-c", "read 0 512"]);
        must(&o, obj);
    }
    // The `open` command of basalt-io sees the command line's secrets.
    let o = basalt(d, "basalt-io", &["--object", SECRET, "-c", &format!("open -o {opts}"), "-c", "read 0 512"]);
    must(&o, "open");
    assert!(stdout(&o).contains("read 512/512 bytes"), "{}{}", stdout(&o), stderr(&o));
}

/// basalt-io and qemu-io agree on the exit code and message (program name normalised).
fn same_failure(d: &Path, args: &[&str]) {
    let q = qemu_io(d, args);
    let b = basalt(d, "basalt-io", args);
    assert_eq!(b.status.code(), q.status.code(), "{args:?}: {}", stderr(&b));
    assert_eq!(stderr(&b).replace("basalt-io", "qemu-io"), stderr(&q), "{args:?}");
}

#[test]
fn key_errors_read_as_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    must(
        &qemu_img(d, &["create", "-q", "-f", "luks", "--object", SECRET, "-o", "key-secret=sec0,iter-time=10", "k.luks", "1M"]),
        "create",
    );
    let opts = image_opts("k.luks");
    same_failure(d, &["--object", "secret,id=sec0,data=abd", "--image-opts", &opts, "-c", "read 0 512"]);
    same_failure(d, &["--image-opts", &opts, "-c", "read 0 512"]);
    same_failure(d, &["-c", "read 0 512", "k.luks"]);
    same_failure(d, &["--object", "secret,id=sec0", "--image-opts", &opts, "-c", "read 0 512"]);
    let o = basalt(d, "basalt-io", &["--object", "secret,id=sec0,data=abd", "--image-opts", &opts, "-c", "read 0 512"]);
    assert!(stderr(&o).contains("Invalid password, cannot unlock any keyslot"), "{}", stderr(&o));
    // Create errors, as qemu-img words them.
    for o in ["iter-time=10", "key-secret=sec0,cipher-mode=foo", "key-secret=nosuch", "key-secret=sec0,detached-header=on"] {
        let q = qemu_img(d, &["create", "-q", "-f", "luks", "--object", SECRET, "-o", o, "e.luks", "1M"]);
        let b = basalt(d, "basalt-img", &["create", "-q", "-f", "luks", "--object", SECRET, "-o", o, "e.luks", "1M"]);
        assert_eq!(b.status.code(), q.status.code(), "{o}");
        assert_eq!(stderr(&b).replace("basalt-img", "qemu-img"), stderr(&q), "{o}");
    }
}

fn put32(img: &mut [u8], off: usize, v: u32) {
    img[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

#[test]
fn malformed_headers_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    must(
        &qemu_img(d, &["create", "-q", "-f", "luks", "--object", SECRET, "-o", "key-secret=sec0,iter-time=10", "m.luks", "1M"]),
        "create",
    );
    let good = std::fs::read(d.join("m.luks")).unwrap();
    type Mutation = (&'static str, &'static dyn Fn(&mut Vec<u8>), &'static str);
    let cases: &[Mutation] = &[
        ("header cut", &|b| b.truncate(300), "truncated"),
        ("key material cut", &|b| b.truncate(100_000), "beyond the end"),
        ("payload past the end", &|b| b.truncate(1_000_000), "beyond the end"),
        ("slot 0 offset huge", &|b| put32(b, 208 + 40, u32::MAX), "key slot 0"),
        ("slot 0 offset in header", &|b| put32(b, 208 + 40, 0), "key slot 0"),
        ("slots overlap", &|b| put32(b, 208 + 48 + 40, 9), "overlap"),
        ("huge stripes", &|b| put32(b, 208 + 44, u32::MAX), "stripes"),
        ("bad key size", &|b| put32(b, 108, 1 << 30), "key-bytes"),
        ("bad slot state", &|b| put32(b, 208 + 48, 0x1234), "state"),
        ("LUKS2", &|b| b[7] = 2, "version 2"),
        ("unknown cipher", &|b| b[8..11].copy_from_slice(b"des"), "not supported"),
        ("unterminated mode", &|b| b[40..72].fill(b'x'), "cipher-mode"),
        ("zero digest iterations", &|b| put32(b, 164, 0), "iterations"),
    ];
    let opts = image_opts("bad.luks");
    for (what, mutate, want) in cases {
        let mut b = good.clone();
        mutate(&mut b);
        std::fs::write(d.join("bad.luks"), &b).unwrap();
        let o = basalt(d, "basalt-io", &["--object", SECRET, "--image-opts", &opts, "-c", "read 0 512"]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{what}: {err}");
        assert!(err.contains(want), "{what}: wanted '{want}' in: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        // Also through probing and info (no key).
        let o = basalt(d, "basalt-img", &["info", "bad.luks"]);
        assert!(!stderr(&o).contains("panicked") && o.status.code().is_some(), "{what}: info");
    }
    // A corrupted key slot (wrong bytes in the key material) is a wrong password, not a crash.
    let mut b = good.clone();
    b[4096..4096 + 512].fill(0);
    std::fs::write(d.join("bad.luks"), &b).unwrap();
    let o = basalt(d, "basalt-io", &["--object", SECRET, "--image-opts", &opts, "-c", "read 0 512"]);
    assert!(stderr(&o).contains("Invalid password"), "{}", stderr(&o));
}

#[test]
fn writes_leave_the_callers_buffer_alone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    must(
        &qemu_img(d, &["create", "-q", "-f", "luks", "--object", SECRET, "-o", "key-secret=sec0,iter-time=10", "w.luks", "1M"]),
        "create",
    );
    let path = d.join("w.luks").to_str().unwrap().to_string();
    let r = Reactor::new(ReactorConfig::default()).unwrap();
    r.block_on(async move {
        let secrets = Secrets::new();
        secrets.add_object(SECRET).unwrap();
        let graph = Graph::with_secrets(basalt_formats::registry(), secrets);
        let mut o = Opts::new();
        o.set("driver", "luks");
        o.set("key-secret", "sec0");
        o.set("file.filename", &path);
        let node = graph.open(o, OpenFlags::read_write()).await.unwrap();
        assert_eq!(node.size(), 1 << 20);
        let be = Backend::new(node).unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 31 + 7) as u8).collect();
        let d = be.write(4096, IoBuf::from_slice(&data), WriteFlags::default()).await;
        assert_eq!(d.res, Ok(8192));
        assert_eq!(&d.buf.unwrap()[..], &data[..], "the caller's buffer was modified");
        // Unaligned: the engine pads to the 512-byte sector.
        let d = be.write(100, IoBuf::from_slice(&data[..300]), WriteFlags::default()).await;
        assert_eq!(d.res, Ok(300));
        assert_eq!(&d.buf.unwrap()[..], &data[..300]);
        let d = be.read(100, IoBuf::new(300)).await;
        assert_eq!(&d.buf.unwrap()[..], &data[..300]);
        let d = be.read(4096, IoBuf::new(8192)).await;
        assert_eq!(&d.buf.unwrap()[..], &data[..]);
        assert!(be.flush().await.res.is_ok());
    });
    // And QEMU reads the same bytes.
    let o = qemu_io(d, &["--object", SECRET, "--image-opts", &image_opts("w.luks"), "-c", "read -v 4096 16"]);
    must(&o, "qemu-io read");
    assert!(stdout(&o).starts_with("00001000:  07 26 45 64 83 a2 c1 e0 ff 1e 3d 5c 7b 9a b9 d8"), "{}", stdout(&o));
}

/// Keys added and removed by basalt-img amend open (or not) in qemu-io and vice versa, the
/// key slots and `info` match qemu-img's after the same amendments, the data reads back.
#[test]
fn amend_keyslots_both_ways() {
    basalt_tests::keyslots::keyslots_both_ways(&basalt_tests::keyslots::LUKS);
}

/// Refused key slot amendments print qemu-img's errors and leave the image as it was.
#[test]
fn amend_keyslot_errors_match_qemu() {
    basalt_tests::keyslots::keyslot_errors(&basalt_tests::keyslots::LUKS);
}
