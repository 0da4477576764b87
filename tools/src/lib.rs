//! basalt-tools: the command-line tools, qemu-img and qemu-io work-alikes.
//!
//! `basalt-img` ([`img`]) and `basalt-io` ([`io`]) take the QEMU tools' command lines and print
//! what they print. Shared pieces: option parsing ([`getopt`]), opening images from tool
//! options ([`image`]), QEMU-style JSON ([`qjson`]) and human-readable numbers ([`human`]),
//! and the benchmark loop ([`bench`]) behind `basalt-img bench` and `basalt-bench`.

pub mod bench;
pub mod getopt;
pub mod human;
pub mod image;
pub mod img;
pub mod io;
pub mod qjson;

use basalt_reactor::{Runtime, RuntimeConfig};

/// Start the single reactor a tool runs on and run `main` on it; returns the exit code.
pub fn run_tool<F, Fut>(main: F) -> i32
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = i32> + 'static,
{
    let mut cfg = RuntimeConfig::default();
    if std::env::var_os("BASALT_NO_URING").is_some() {
        cfg.reactor.uring = basalt_reactor::UringMode::Disabled;
    }
    let rt = match Runtime::new(cfg) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("basalt: cannot start the reactor: {e}");
            return 1;
        }
    };
    rt.block_on(0, main)
}
