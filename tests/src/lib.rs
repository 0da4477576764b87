//! Helpers shared by the integration tests: paths of the built tools, scratch directories,
//! and running peer tools (qemu-img, qemu-io), which must exist: a missing peer is a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
