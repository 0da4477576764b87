//! basalt-tools: the command-line tools, qemu-img and qemu-io work-alikes.
//!
//! `basalt-img` ([`img`]), `basalt-io` ([`io`]) and `basalt-nbd` ([`nbd`]) take the QEMU tools' command lines and print
//! what they print. Shared pieces: option parsing ([`getopt`]), opening images from tool
//! options ([`image`]), QEMU-style JSON ([`qjson`]) and human-readable numbers ([`human`]),
//! and the benchmark loop ([`bench`]) behind `basalt-img bench` and `basalt-bench`.

pub mod bench;
pub mod daemon;
pub mod getopt;
pub mod human;
pub mod image;
pub mod img;
pub mod io;
pub mod nbd;
pub mod qjson;

use basalt_reactor::{Runtime, RuntimeConfig};

/// The settings of a tool's reactors (`BASALT_NO_URING` set: no io_uring).
/// Pinned buffer pool of each tool reactor.
const TOOL_POOL: usize = 8 << 20;

/// Pinned buffer pool of a server's reactor (basalt-nbd): room for the payloads of a few
/// connections' requests in flight, so large reads and writes do not go to the heap (where each
/// one costs page faults and an unmap).
pub const SERVER_POOL: usize = 128 << 20;

fn tool_config() -> RuntimeConfig {
    let mut cfg = RuntimeConfig::default();
    // A tool's requests are few and mostly through the page cache: a small pinned pool (filled
    // and locked at start, which costs about 0.4 ms per MiB) keeps short commands quick;
    // larger buffers come from the heap.
    cfg.reactor.pool_size = TOOL_POOL;
    // Tools share their cores with their clients and peers (an NBD client on the same
    // machine, the kernel's io_uring workers): poll as long as QEMU's event loop does by
    // default (`poll-max-ns` 32 us), then sleep.
    cfg.reactor.idle_spin = Some(TOOL_IDLE_SPIN);
    if std::env::var_os("BASALT_NO_URING").is_some() {
        cfg.reactor.uring = basalt_reactor::UringMode::Disabled;
    }
    cfg
}

/// How long a tool's reactor busy-polls without work before sleeping.
pub const TOOL_IDLE_SPIN: std::time::Duration = std::time::Duration::from_micros(32);

/// Start the single reactor a tool runs on and run `main` on it; returns the exit code.
pub fn run_tool<F, Fut>(main: F) -> i32
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = i32> + 'static,
{
    run_tool_with_pool(TOOL_POOL, main)
}

/// Keep freed heap memory instead of giving it back to the kernel at every free: with glibc's
/// default (the heap's top trimmed once 128 KiB of it is free), a server whose requests free
/// a few hundred KiB at a time (TLS records: rustls allocates each one) shrank and regrew its
/// heap per request, and the page faults of regrowing it cost a quarter of basalt-nbd's CPU
/// under TLS (400k faults per 3 GiB served). The mmap threshold is pinned at the ceiling
/// glibc's own adjustment would reach (setting either disables that adjustment), so buffers
/// up to 32 MiB come from the heap and at most 32 MiB of free heap is kept.
fn tune_malloc() {
    // SAFETY: mallopt only sets two of the allocator's parameters, under the allocator's own
    // lock; no memory is touched.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
}

/// [`run_tool`] with a buffer pool of `pool` bytes.
pub fn run_tool_with_pool<F, Fut>(pool: usize, main: F) -> i32
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = i32> + 'static,
{
    tune_malloc();
    let mut cfg = tool_config();
    cfg.reactor.pool_size = pool;
    let rt = match Runtime::new(cfg) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("basalt: cannot start the reactor: {e}");
            return 1;
        }
    };
    rt.block_on(0, main)
}

/// `n` more reactors (unpinned threads, a tool's settings) for work a tool spreads over
/// several cores; `None` when they cannot be started (the work then stays on one reactor).
pub fn helper_reactors(n: usize) -> Option<Runtime> {
    let mut cfg = tool_config();
    // Bulk work: idle reactors sleep at once, leaving the cores to the threads that copy.
    cfg.reactor.idle_spin = Some(std::time::Duration::ZERO);
    unpinned(n, cfg).ok()
}

/// `n` more reactors with a server's settings (its buffer pool, the tools' short idle spin),
/// for a server that spreads its connections over several reactors; an error says why they
/// could not start.
pub fn server_reactors(n: usize) -> std::io::Result<Runtime> {
    let mut cfg = tool_config();
    cfg.reactor.pool_size = SERVER_POOL;
    unpinned(n, cfg)
}

/// One reactor with a server's settings for the `iothread` object `id`, polling for
/// `poll_max_ns` (the tools' default, QEMU's, when `None`) before it sleeps. Its thread is
/// named `IO ID`, as QEMU names an iothread's.
pub fn iothread_reactor(id: &str, poll_max_ns: Option<u64>) -> std::io::Result<Runtime> {
    let mut cfg = tool_config();
    cfg.name = Some(format!("IO {id}"));
    cfg.reactor.pool_size = SERVER_POOL;
    if let Some(ns) = poll_max_ns {
        cfg.reactor.idle_spin = Some(std::time::Duration::from_nanos(ns));
    }
    unpinned(1, cfg)
}

/// Start `n` reactors with `cfg`'s settings on threads the system places.
fn unpinned(n: usize, mut cfg: RuntimeConfig) -> std::io::Result<Runtime> {
    cfg.cores = (0..n).collect();
    cfg.pin = false;
    Runtime::new(cfg)
}

/// Cores this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map(usize::from).unwrap_or(1)
}
