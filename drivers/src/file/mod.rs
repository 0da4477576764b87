//! `file` and `host_device`: regular files and block devices, as QEMU's file-posix.
//!
//! Options: `filename`, `aio=io_uring|threads` (default: io_uring where the reactor has a
//! ring, else threads; `native` is refused), `locking=on|off|auto`, `cache.direct` (O_DIRECT,
//! with the alignment the file system or device needs), `cache.no-flush`, `discard`,
//! `read-only`, `force-share`, `auto-read-only`, `node-name`.
//!
//! The control-plane node owns the descriptor and the image locks; each reactor gets its own
//! queue with the descriptor registered in its ring. Reads and writes go through io_uring
//! (fixed files, fixed buffers when the buffer is from the reactor's pool) or, without a ring,
//! the blocking thread pool. Flush is fdatasync, discard punches holes (BLKDISCARD on
//! devices), write_zeroes uses fallocate zero range / punch hole (BLKZEROOUT on devices), and
//! block status asks SEEK_DATA/SEEK_HOLE. A buffered regular file offers its bytes as
//! [`HostExtent`]s, for servers that send them from the page cache without copying.

mod inline;
mod queue;
pub(crate) mod sys;

use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use basalt_engine::{
    lock, AioMode, BlockDriver, BlockError, BlockResult, CreateOptDesc, DriverKind, ErrorKind, Graph, HostExtent, Limits,
    LocalBoxFuture, Node, NodeQueue, OpenFlags, Opts, Perm, Prealloc,
};

/// The `file` protocol driver.
pub struct FileDriver;
/// The `host_device` protocol driver.
pub struct HostDeviceDriver;

/// Driver instance for the registry.
pub static FILE: FileDriver = FileDriver;
/// Driver instance for the registry.
pub static HOST_DEVICE: HostDeviceDriver = HostDeviceDriver;

pub(crate) struct FileShared {
    pub(crate) fd: OwnedFd,
    pub(crate) size: AtomicU64,
    pub(crate) blockdev: bool,
    pub(crate) no_flush: bool,
    pub(crate) aio: AioMode,
    pub(crate) discard: bool,
    pub(crate) path: String,
    /// A regular file opened without O_DIRECT (writes land in the page cache).
    pub(crate) buffered_file: bool,
    /// Where the thread pool runs a buffered file's writes and fallocates: one at a time, in
    /// order, as they hold the inode's lock anyway (see `basalt_reactor::Lane`).
    pub(crate) lane: Arc<basalt_reactor::Lane>,
    /// Large pool writes allocate their range first (see `queue::ALLOCATE_FROM`); cleared when
    /// the filesystem has no fallocate.
    pub(crate) allocate_first: std::sync::atomic::AtomicBool,
}

impl AsRawFd for FileShared {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for FileShared {
    fn drop(&mut self) {
        // The image locks go with the node, even while a ring still holds the file.
        lock::release(self.fd.as_raw_fd());
    }
}

struct FileNode {
    driver: &'static str,
    name: String,
    read_only: bool,
    align: u32,
    shared: Arc<FileShared>,
}

const CREATE_OPTS: &[CreateOptDesc] = &[
    CreateOptDesc { name: "size", kind: "size", help: "Virtual disk size" },
    CreateOptDesc { name: "nocow", kind: "bool", help: "Turn off copy-on-write (valid only on btrfs)" },
    CreateOptDesc { name: "preallocation", kind: "str", help: "Preallocation mode (allowed values: off, falloc, full)" },
    CreateOptDesc { name: "extent_size_hint", kind: "size", help: "Extent size hint for the image file, 0 to disable" },
];

fn open_file(driver: &'static str, graph: &Graph, mut opts: Opts, flags: OpenFlags) -> BlockResult<Arc<dyn Node>> {
    let host_device = driver == "host_device";
    let name = graph.take_node_name(&mut opts)?;
    let raw_name = opts.take_str("filename").ok_or_else(|| BlockError::option("Parameter 'filename' is required"))?;
    let path = if host_device {
        raw_name.strip_prefix("host_device:").unwrap_or(&raw_name)
    } else {
        raw_name.strip_prefix("file:").unwrap_or(&raw_name)
    }
    .to_string();
    if path.is_empty() {
        return Err(BlockError::option(format!("The '{driver}' block driver requires a file name")));
    }
    let mut read_only = opts.take_bool("read-only", flags.read_only)?;
    let auto_ro = opts.take_bool("auto-read-only", false)?;
    let force_share = opts.take_bool("force-share", false)?;
    let direct = opts.take_bool("cache.direct", flags.cache_direct)?;
    let no_flush = opts.take_bool("cache.no-flush", flags.no_flush)?;
    let locking = opts.take_enum("locking", &["on", "off", "auto"], "auto")?;
    let discard = opts.take_enum("discard", &["ignore", "off", "unmap", "on"], "unmap")?;
    let default_aio = match flags.aio {
        AioMode::Auto => "default",
        AioMode::IoUring => "io_uring",
        AioMode::Threads => "threads",
    };
    let aio = match opts.take_enum("aio", &["threads", "native", "io_uring", "default"], default_aio)?.as_str() {
        "threads" => AioMode::Threads,
        "io_uring" => AioMode::IoUring,
        "native" => {
            return Err(BlockError::new(
                ErrorKind::Unsupported,
                "aio=native (Linux AIO) is not supported; use aio=io_uring or aio=threads",
            ))
        }
        _ => AioMode::Auto,
    };
    if let Some(v) = opts.take_str("aio-max-batch") {
        basalt_engine::parse_number(&v).ok_or_else(|| BlockError::option("Parameter 'aio-max-batch' expects a number"))?;
    }
    opts.expect_empty("Block protocol", driver)?;
    if force_share && !read_only {
        return Err(BlockError::option("force-share=on can only be used with read-only images"));
    }

    let base = if direct { libc::O_DIRECT } else { 0 };
    let fd = match sys::open(&path, base | if read_only { libc::O_RDONLY } else { libc::O_RDWR }, 0) {
        Ok(fd) => fd,
        Err(e) if auto_ro && !read_only && matches!(e.raw_os_error(), Some(libc::EACCES | libc::EROFS | libc::EPERM)) => {
            read_only = true;
            sys::open(&path, base | libc::O_RDONLY, 0).map_err(|e| BlockError::io(format!("Could not open '{path}'"), &e))?
        }
        Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
            return Err(BlockError::new(
                ErrorKind::Unsupported,
                format!("Could not open '{path}': filesystem does not support O_DIRECT"),
            ))
        }
        Err(e) => return Err(BlockError::io(format!("Could not open '{path}'"), &e)),
    };
    let st = sys::fstat(fd.as_raw_fd()).map_err(|e| BlockError::io(format!("Could not stat '{path}'"), &e))?;
    let blockdev = sys::is_block_device(&st);
    if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        return Err(BlockError::new(ErrorKind::InvalidFormat, format!("Could not open '{path}': Is a directory")));
    }
    if host_device && !blockdev {
        return Err(BlockError::new(ErrorKind::InvalidFormat, "'host_device' driver expects either a character or block device"));
    }
    if !host_device && blockdev {
        return Err(BlockError::new(
            ErrorKind::InvalidFormat,
            format!("'file' driver requires '{path}' to be a regular file; use driver host_device for a block device"),
        ));
    }
    if locking != "off" {
        let perm = if read_only { flags.perm.without(Perm::WRITE).without(Perm::RESIZE) } else { flags.perm };
        let shared = if force_share { Perm::ALL } else { flags.shared };
        if locking == "on" || lock::supported(fd.as_raw_fd()) {
            lock::apply(fd.as_raw_fd(), perm, shared, &path)?;
        }
    }
    let size = sys::size_of(&fd).map_err(|e| BlockError::io(format!("Could not get the size of '{path}'"), &e))?;
    let align = if direct { sys::dio_alignment(fd.as_raw_fd(), blockdev) } else { 1 };
    let shared = Arc::new(FileShared {
        fd,
        size: AtomicU64::new(size),
        blockdev,
        no_flush,
        aio,
        discard: discard == "unmap" || discard == "on",
        path,
        buffered_file: !direct && !blockdev,
        lane: Arc::new(basalt_reactor::Lane::new()),
        allocate_first: std::sync::atomic::AtomicBool::new(true),
    });
    Ok(Arc::new(FileNode { driver, name, read_only, align, shared }))
}

impl BlockDriver for FileDriver {
    fn name(&self) -> &'static str {
        "file"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Protocol
    }
    fn protocol_prefixes(&self) -> &'static [&'static str] {
        &["file:"]
    }
    fn open<'a>(&'a self, graph: &'a Graph, opts: Opts, flags: OpenFlags) -> LocalBoxFuture<'a, BlockResult<Arc<dyn Node>>> {
        Box::pin(async move { open_file("file", graph, opts, flags) })
    }
    fn create_opts(&self) -> &'static [CreateOptDesc] {
        CREATE_OPTS
    }
    fn create<'a>(
        &'a self,
        _graph: &'a Graph,
        filename: &'a str,
        size: u64,
        mut opts: Opts,
    ) -> LocalBoxFuture<'a, BlockResult<()>> {
        Box::pin(async move {
            let prealloc = basalt_engine::take_prealloc(&mut opts)?;
            let _ = opts.take_bool("nocow", false)?;
            let _ = opts.take_size("extent_size_hint", 0)?;
            opts.expect_empty("Block protocol", "file")?;
            let path = filename.strip_prefix("file:").unwrap_or(filename).to_string();
            // The work is blocking system calls: run them off the reactor.
            run_blocking(move || create_file(&path, size, prealloc)).await
        })
    }
}

impl BlockDriver for HostDeviceDriver {
    fn name(&self) -> &'static str {
        "host_device"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Protocol
    }
    fn protocol_prefixes(&self) -> &'static [&'static str] {
        &["host_device:"]
    }
    fn open<'a>(&'a self, graph: &'a Graph, opts: Opts, flags: OpenFlags) -> LocalBoxFuture<'a, BlockResult<Arc<dyn Node>>> {
        Box::pin(async move { open_file("host_device", graph, opts, flags) })
    }
}

/// Run a blocking closure on the thread pool and await its result.
pub(crate) async fn run_blocking<T: Send + 'static>(f: impl FnOnce() -> BlockResult<T> + Send + 'static) -> BlockResult<T> {
    let cell = Arc::new(std::sync::Mutex::new(None));
    let c2 = cell.clone();
    let _ = basalt_reactor::blocking(
        move || {
            let r = f();
            *c2.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            0
        },
        None,
    )
    .await;
    let r = cell.lock().unwrap_or_else(|e| e.into_inner()).take();
    r.unwrap_or_else(|| Err(BlockError::new(ErrorKind::Io, "blocking job lost")))
}

fn create_file(path: &str, size: u64, prealloc: Prealloc) -> BlockResult<()> {
    let fd = sys::open(path, libc::O_RDWR | libc::O_CREAT, 0o644)
        .map_err(|e| BlockError::io(format!("Could not create '{path}'"), &e))?;
    // Lock as QEMU's file-posix create does: take write and resize, deny only resize, so a
    // reader or writer that shares resizing (qemu-io, a qemu-img reader) does not conflict.
    lock::apply(fd.as_raw_fd(), Perm::WRITE.with(Perm::RESIZE), Perm::ALL.without(Perm::RESIZE), path)?;
    let raw = fd.as_raw_fd();
    sys::ftruncate(raw, 0).map_err(|e| BlockError::io(format!("Could not resize file '{path}'"), &e))?;
    // QEMU rounds the size of a new file up to whole sectors, and reports a failure to size it
    // without the "Could not create" prefix.
    grow(raw, 0, size.checked_next_multiple_of(512).unwrap_or(size), prealloc)
}

/// Grow (or shrink) a regular file from `cur` to `size` with `prealloc`.
pub(crate) fn grow(fd: std::os::fd::RawFd, cur: u64, size: u64, prealloc: Prealloc) -> BlockResult<()> {
    match prealloc {
        Prealloc::Off => {
            sys::ftruncate(fd, size).map_err(|e| BlockError::io("Could not resize file", &e))?;
        }
        Prealloc::Falloc => {
            if size > cur {
                sys::fallocate(fd, 0, cur, size - cur).map_err(|e| BlockError::io("Could not preallocate new data", &e))?;
            } else {
                sys::ftruncate(fd, size).map_err(|e| BlockError::io("Could not resize file", &e))?;
            }
        }
        Prealloc::Full => {
            sys::ftruncate(fd, size).map_err(|e| BlockError::io("Could not resize file", &e))?;
            let zeros = vec![0u8; 1 << 20];
            let mut at = cur;
            while at < size {
                let n = (size - at).min(zeros.len() as u64) as usize;
                sys::pwrite_all(fd, &zeros[..n], at)
                    .map_err(|e| BlockError::io("Could not write zeros for preallocation", &e))?;
                at += n as u64;
            }
        }
        Prealloc::Metadata => {
            return Err(BlockError::new(ErrorKind::Unsupported, "Unsupported preallocation mode: metadata"));
        }
    }
    // Allocate the first block so that O_DIRECT alignment probing works on it, as QEMU does
    // (this also makes `map` output match images QEMU creates).
    if cur == 0 && size > 0 && prealloc != Prealloc::Full {
        let n = size.min(4096) as usize;
        sys::pwrite_all(fd, &vec![0u8; n], 0).map_err(|e| BlockError::io("Could not allocate the first block", &e))?;
    }
    Ok(())
}

impl Node for FileNode {
    fn driver(&self) -> &'static str {
        self.driver
    }
    fn node_name(&self) -> &str {
        &self.name
    }
    fn filename(&self) -> String {
        self.shared.path.clone()
    }
    fn size(&self) -> u64 {
        // As QEMU, a node's length is whole sectors: the tail of a file whose size is not a
        // multiple of 512 reads as zeroes.
        let s = self.shared.size.load(Ordering::Relaxed);
        s.checked_next_multiple_of(512).unwrap_or(s)
    }
    fn limits(&self) -> Limits {
        Limits { request_alignment: self.align, max_transfer: if self.shared.blockdev { 1 << 30 } else { 0 }, opt_transfer: 0 }
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn is_format(&self) -> bool {
        false
    }
    fn protocol_type(&self) -> Option<&'static str> {
        Some(self.driver)
    }
    fn allocated_size(&self) -> Option<u64> {
        sys::fstat(self.shared.fd.as_raw_fd()).ok().map(|st| st.st_blocks as u64 * 512)
    }
    fn create_queue(&self) -> BlockResult<Rc<dyn NodeQueue>> {
        queue::FileQueue::new(self.shared.clone()).map(|q| Rc::new(q) as Rc<dyn NodeQueue>)
    }
    fn host_extent(&self, off: u64, len: u64) -> Option<HostExtent> {
        // Only through the page cache (a regular file without O_DIRECT), and only bytes the
        // file holds (not the zeroes past its end).
        let inside = off.checked_add(len).is_some_and(|e| e <= self.shared.size.load(Ordering::Relaxed));
        (self.shared.buffered_file && inside).then(|| HostExtent { file: self.shared.clone(), offset: off })
    }
    fn truncate(&self, size: u64, prealloc: Prealloc) -> LocalBoxFuture<'_, BlockResult<()>> {
        Box::pin(async move {
            if self.read_only {
                return Err(BlockError::new(ErrorKind::PermissionDenied, "Image is read-only"));
            }
            let cur = self.shared.size.load(Ordering::Relaxed);
            if self.shared.blockdev {
                if size > cur {
                    return Err(BlockError::new(ErrorKind::Unsupported, "Cannot grow device files"));
                }
                return Ok(());
            }
            let s = self.shared.clone();
            run_blocking(move || {
                let fd = s.fd.as_raw_fd();
                if prealloc != Prealloc::Off && size < cur {
                    return Err(BlockError::new(ErrorKind::Unsupported, "Preallocation can only be used when growing"));
                }
                grow(fd, cur, size, prealloc)?;
                s.size.store(size, Ordering::Relaxed);
                Ok(())
            })
            .await
        })
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
