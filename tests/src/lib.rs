//! Helpers shared by the integration tests: paths of the built tools, scratch directories,
//! and running peer tools (qemu-img, qemu-io), which must exist: a missing peer is a failure.

pub mod keyslots;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Directory holding the workspace's built binaries (target/<profile>).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

/// Path of a workspace binary, built on demand by `cargo build` if missing.
pub fn tool(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} not built: run `cargo build --workspace --bins` (the test command in the README does)", p.display());
    p
}

/// Run a command, returning its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Run a peer tool (qemu-img, qemu-io...) that must be installed.
pub fn peer(name: &str) -> Command {
    let found =
        Command::new("sh").arg("-c").arg(format!("command -v {name}")).output().map(|o| o.status.success()).unwrap_or(false);
    assert!(found, "peer tool {name} is missing: the test setup must install it");
    Command::new(name)
}

/// nbdsh, run with Debian's python3 first on PATH (the one with the nbd module): nbdsh runs
/// the first python3 it finds.
pub fn nbdsh() -> Command {
    let mut c = peer("nbdsh");
    c.env("PATH", format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()));
    c
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The command succeeded (else fail the test with what it printed).
pub fn must(o: &Output, what: &str) {
    assert!(o.status.success(), "{what} failed ({:?}):\nstdout: {}\nstderr: {}", o.status.code(), stdout(o), stderr(o));
}

/// A basalt-img run printed and returned exactly what the same qemu-img run did (the program
/// name in messages aside).
pub fn assert_same_img_outcome(basalt: &Output, qemu: &Output, what: &str) {
    let n = |s: String| s.replace("qemu-img", "basalt-img");
    assert_eq!(
        (basalt.status.code(), n(stdout(basalt)), n(stderr(basalt))),
        (qemu.status.code(), n(stdout(qemu)), n(stderr(qemu))),
        "basalt-img {what} differs from qemu-img"
    );
}

/// A seeded xorshift generator, so randomised tests replay exactly from their seed.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Big-endian u32 at byte `o`.
pub fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}

/// Big-endian u64 at byte `o`.
pub fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

/// Every bitmap of an image as the file holds it: (name, flags, granularity bits, bits).
pub fn bitmaps(path: &Path) -> Vec<(String, u32, u8, Vec<u8>)> {
    let d = std::fs::read(path).unwrap();
    let cs = 1usize << be32(&d, 20);
    let size = be64(&d, 24);
    let mut o = be32(&d, 100) as usize;
    let mut out = Vec::new();
    loop {
        let (t, l) = (be32(&d, o), be32(&d, o + 4) as usize);
        if t == 0 {
            break;
        }
        if t == 0x2385_2875 {
            let nb = be32(&d, o + 8);
            let mut p = be64(&d, o + 24) as usize;
            for _ in 0..nb {
                let (to, ts, fl, gb) = (be64(&d, p) as usize, be32(&d, p + 8) as usize, be32(&d, p + 12), d[p + 17]);
                let ns = u16::from_be_bytes([d[p + 18], d[p + 19]]) as usize;
                let es = be32(&d, p + 20) as usize;
                let name = String::from_utf8_lossy(&d[p + 24 + es..p + 24 + es + ns]).into_owned();
                let nbytes = (size.div_ceil(1 << gb)).div_ceil(8) as usize;
                let mut bits = Vec::new();
                for i in 0..ts {
                    let e = be64(&d, to + 8 * i) as usize;
                    let off = e & 0x00ff_ffff_ffff_fe00;
                    let chunk = if off != 0 { d[off..off + cs].to_vec() } else { vec![if e & 1 != 0 { 0xff } else { 0 }; cs] };
                    bits.extend_from_slice(&chunk);
                }
                bits.truncate(nbytes);
                out.push((name, fl, gb, bits));
                p += (24 + es + ns).next_multiple_of(8);
            }
        }
        o += 8 + l.next_multiple_of(8);
    }
    out
}

/// Two images have the same bitmaps; a difference is reported by name and first byte.
pub fn same_bitmaps(a: &Path, b: &Path, what: &str) {
    let (x, y) = (bitmaps(a), bitmaps(b));
    let summary = |v: &[(String, u32, u8, Vec<u8>)]| -> Vec<(String, u32, u8, usize, u32)> {
        v.iter().map(|(n, f, g, bits)| (n.clone(), *f, *g, bits.len(), bits.iter().map(|c| c.count_ones()).sum())).collect()
    };
    assert_eq!(summary(&x), summary(&y), "{what}: bitmaps differ (name, flags, granularity bits, bytes, bits set)");
    for (p, q) in x.iter().zip(&y) {
        let first = p.3.iter().zip(&q.3).position(|(c, d)| c != d);
        assert!(first.is_none(), "{what}: bitmap {} differs first at byte {first:?}", p.0);
    }
}

/// A server under test (basalt-nbd, qemu-nbd, nbdkit, a storage daemon): killed when dropped,
/// unless [`Listening::stop`] ended it first.
pub struct Listening(Option<Child>);

impl Listening {
    /// The server's process id.
    pub fn id(&self) -> u32 {
        self.0.as_ref().expect("running").id()
    }

    /// The process, for tests that wait for it to end by itself.
    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("running")
    }

    /// End it with SIGTERM, as a user would, and require a clean exit.
    pub fn stop(mut self) {
        let mut child = self.0.take().expect("running");
        // SAFETY: kill(2) with the child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let st = child.wait().unwrap();
        assert!(st.success(), "server exited with {st:?} on SIGTERM");
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Start a server (its stdout discarded) and wait, at most 10 s, for it to create `sock`.
pub fn start_listening(cmd: &mut Command, sock: &Path) -> Listening {
    let child = Listening(Some(cmd.stdout(Stdio::null()).spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "server did not create {}", sock.display());
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// Punch a hole in the file at `off..off+len`, keeping its size (as a file system leaves
/// ranges never written).
pub fn punch_hole(path: &Path, off: u64, len: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).expect("open file");
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate(2) on an open descriptor, with plain integer arguments.
    let r = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), mode, off as i64, len as i64) };
    assert_eq!(r, 0, "fallocate punch {}: {}", path.display(), std::io::Error::last_os_error());
}
