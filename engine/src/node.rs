//! The node traits of the block graph.
//!
//! A node has two halves. The control-plane half ([`Node`]) is `Send + Sync`, shared by every
//! core and every parent: identity, size, limits, children, info, truncate. The data-plane half
//! ([`NodeQueue`]) is created on a reactor for that reactor alone (`!Send`): leaf drivers map
//! it onto their io_uring files or device queue pairs, formats and filters onto their children's
//! queues. Data-plane calls return an [`IoFuture`](crate::IoFuture), which is a ready value or
//! a leaf slot on the fast path and a boxed future only on slow paths.

use std::any::Any;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;

use crate::error::{BlockError, BlockResult, ErrorKind, IoStatus};
use crate::io::IoFuture;
use basalt_reactor::IoBuf;

/// A boxed, `!Send` future, for slow paths and control-plane calls.
pub type LocalBoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// QEMU's permission bits, in QEMU's bit order (the lock byte offsets depend on it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Perm(pub u8);

impl Perm {
    /// Reads see consistent data.
    pub const CONSISTENT_READ: Perm = Perm(1);
    /// Writes that change data.
    pub const WRITE: Perm = Perm(2);
    /// Writes that do not change what a reader sees.
    pub const WRITE_UNCHANGED: Perm = Perm(4);
    /// Changing the size.
    pub const RESIZE: Perm = Perm(8);
    /// No permission.
    pub const NONE: Perm = Perm(0);
    /// All permissions.
    pub const ALL: Perm = Perm(15);

    /// Names in bit order, as QEMU prints them in lock errors.
    pub const NAMES: [&'static str; 4] = ["consistent read", "write", "write unchanged", "resize"];

    /// Union.
    pub fn with(self, o: Perm) -> Perm {
        Perm(self.0 | o.0)
    }

    /// Difference.
    pub fn without(self, o: Perm) -> Perm {
        Perm(self.0 & !o.0)
    }

    /// Whether all of `o` is in `self`.
    pub fn has(self, o: Perm) -> bool {
        self.0 & o.0 == o.0
    }
}

/// The role of a child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildRole {
    /// The file a format or filter stores its data in.
    File,
    /// The backing image of a format.
    Backing,
    /// An external data file.
    DataFile,
}

impl ChildRole {
    /// The option key and QEMU's child name.
    pub fn name(self) -> &'static str {
        match self {
            ChildRole::File => "file",
            ChildRole::Backing => "backing",
            ChildRole::DataFile => "data-file",
        }
    }
}

/// A parent's edge to a child node.
#[derive(Clone)]
pub struct Child {
    /// What the child is for.
    pub role: ChildRole,
    /// The child.
    pub node: Arc<dyn Node>,
}

/// What a node accepts on its data path. The engine pads and splits requests so that a node
/// only sees what it declared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Offsets and lengths must be multiples of this (a power of two).
    pub request_alignment: u32,
    /// Largest read or write in bytes (a multiple of the alignment); 0 means no limit.
    pub max_transfer: u32,
    /// Preferred transfer size, 0 if none.
    pub opt_transfer: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { request_alignment: 1, max_transfer: 0, opt_transfer: 0 }
    }
}

/// Whether a write must be durable when it completes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access.
    pub fua: bool,
}

/// How to write zeroes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Deallocating is allowed (the range may become a hole).
    pub may_unmap: bool,
    /// Fail with ENOTSUP rather than fall back to writing zero buffers (NBD's fast zero).
    pub no_fallback: bool,
    /// Force unit access.
    pub fua: bool,
}

/// What a range of a node holds, as QEMU's block status reports it.
#[derive(Clone)]
pub struct BlockStatus {
    /// Bytes from the queried offset that share this status (> 0).
    pub len: u64,
    /// The range holds data (not a hole).
    pub data: bool,
    /// The range reads as zeroes.
    pub zero: bool,
    /// This node (or a node it passes through to, for filters/raw) defines the content;
    /// false means it comes from a backing image.
    pub allocated: bool,
    /// Offset of the range in `file`, when the data is stored there contiguously.
    pub offset: Option<u64>,
    /// The node holding the data at `offset`.
    pub file: Option<Arc<dyn Node>>,
    /// The data is compressed.
    pub compressed: bool,
}

impl BlockStatus {
    /// Plain data, allocated here.
    pub fn data(len: u64) -> BlockStatus {
        BlockStatus { len, data: true, zero: false, allocated: true, offset: None, file: None, compressed: false }
    }
}

/// Preallocation modes, as QEMU's `preallocation` option.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Prealloc {
    /// Nothing allocated.
    #[default]
    Off,
    /// Only metadata (formats).
    Metadata,
    /// fallocate().
    Falloc,
    /// Write zeroes.
    Full,
}

impl Prealloc {
    /// Parse QEMU's names.
    pub fn parse(s: &str) -> BlockResult<Prealloc> {
        Ok(match s {
            "off" => Prealloc::Off,
            "metadata" => Prealloc::Metadata,
            "falloc" => Prealloc::Falloc,
            "full" => Prealloc::Full,
            _ => return Err(BlockError::option(format!("Parameter 'preallocation' does not accept value '{s}'"))),
        })
    }

    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            Prealloc::Off => "off",
            Prealloc::Metadata => "metadata",
            Prealloc::Falloc => "falloc",
            Prealloc::Full => "full",
        }
    }
}

/// The control-plane half of a node.
pub trait Node: Send + Sync + Any {
    /// The driver's name (`raw`, `file`, `null-co`...).
    fn driver(&self) -> &'static str;
    /// The node-name.
    fn node_name(&self) -> &str;
    /// The filename QEMU would report (`json:{...}` when there is no plain one).
    fn filename(&self) -> String;
    /// Current size in bytes.
    fn size(&self) -> u64;
    /// Data-path limits.
    fn limits(&self) -> Limits;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Whether this is a format (or filter) node rather than a protocol leaf.
    fn is_format(&self) -> bool;
    /// Children, in order.
    fn children(&self) -> Vec<Child> {
        Vec::new()
    }
    /// Create this node's data-plane queue on the current reactor.
    fn create_queue(&self) -> BlockResult<Rc<dyn NodeQueue>>;
    /// Change the size.
    fn truncate(&self, _size: u64, _prealloc: Prealloc) -> LocalBoxFuture<'_, BlockResult<()>> {
        Box::pin(async { Err(BlockError::new(ErrorKind::Unsupported, "Image format driver does not support resize")) })
    }
    /// Bytes allocated on the host ("disk size"), when known.
    fn allocated_size(&self) -> Option<u64> {
        None
    }
    /// For protocol nodes: the protocol type name shown by `qemu-img info` for child nodes.
    fn protocol_type(&self) -> Option<&'static str> {
        None
    }
    /// The format's cluster size, for `info`.
    fn cluster_size(&self) -> Option<u64> {
        None
    }
    /// Whether guest data is encrypted (`qemu-img info`'s `encrypted`).
    fn encrypted(&self) -> bool {
        false
    }
    /// QEMU's `format-specific` info object (`{"type": ..., "data": {...}}`), when the format
    /// has one.
    fn format_specific(&self) -> Option<serde_json::Value> {
        None
    }
    /// The backing file name and format recorded in the image, if any.
    fn backing_info(&self) -> Option<(String, Option<String>)> {
        None
    }
    /// Whether a file that was only probed as this format must not have sector 0 rewritten
    /// into another format (raw only).
    fn probed(&self) -> bool {
        false
    }
    /// Persist what the driver keeps in memory while the node is open (qcow2's dirty bitmaps)
    /// before it goes away. Called once, when its user is done with it; writes after it fail.
    fn close(&self) -> LocalBoxFuture<'_, BlockResult<()>> {
        Box::pin(async { Ok(()) })
    }
    /// Internal snapshots, in table order (formats without them have none).
    fn snapshots(&self) -> Vec<SnapshotInfo> {
        Vec::new()
    }
    /// Take an internal snapshot of the current state named `name` (`qemu-img snapshot -c`).
    /// The caller has quiesced I/O on the node, as QEMU drains before a snapshot.
    fn snapshot_create(&self, _name: &str) -> LocalBoxFuture<'_, BlockResult<()>> {
        Box::pin(async { Err(BlockError::new(ErrorKind::Unsupported, "Operation not supported")) })
    }
    /// Revert to the snapshot with this ID, or else this name (`qemu-img snapshot -a`).
    fn snapshot_goto(&self, _id_or_name: &str) -> LocalBoxFuture<'_, BlockResult<()>> {
        Box::pin(async { Err(BlockError::new(ErrorKind::Unsupported, "Operation not supported")) })
    }
    /// Delete the first snapshot with this name (`qemu-img snapshot -d`).
    fn snapshot_delete(&self, _name: &str) -> LocalBoxFuture<'_, BlockResult<()>> {
        Box::pin(async { Err(BlockError::new(ErrorKind::Unsupported, "Operation not supported")) })
    }
    /// Where the `len` bytes at `off` lie verbatim in one host file, for a server that sends
    /// them from the page cache without copying them (basalt-nbd's zero-copy reads); `None`
    /// (the default) where they are transformed, spread out, could move while being sent, or
    /// are not all in the file. Cheap and synchronous: it never reads metadata.
    fn host_extent(&self, _off: u64, _len: u64) -> Option<HostExtent> {
        None
    }
    /// Downcasting, for drivers that need to recognise their own nodes.
    fn as_any(&self) -> &dyn Any;
}

/// A run of a node's bytes stored verbatim in a host file ([`Node::host_extent`]).
#[derive(Clone)]
pub struct HostExtent {
    /// The open file; holding it keeps the descriptor open, even past the node's close.
    pub file: Arc<dyn AsRawFd + Send + Sync>,
    /// Where the bytes start in the file.
    pub offset: u64,
}

/// An internal snapshot as `qemu-img snapshot -l` and `info` list it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Unique ID.
    pub id: String,
    /// Name (may be empty, may repeat).
    pub name: String,
    /// Size of the saved VM state.
    pub vm_state_size: u64,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Nanoseconds part of the creation time.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction count, when recorded.
    pub icount: Option<u64>,
}

/// The data-plane half of a node on one reactor. Offsets and lengths honour the node's
/// [`Limits`] and lie within its size; the engine's [`crate::Queue`] sees to that.
pub trait NodeQueue {
    /// Read into `buf`'s window from `off`.
    fn read(&self, off: u64, buf: IoBuf) -> IoFuture;
    /// Write `buf`'s window at `off`.
    fn write(&self, off: u64, buf: IoBuf, flags: WriteFlags) -> IoFuture;
    /// Make `len` bytes at `off` read as zeroes. ENOTSUP when the node cannot do it efficiently
    /// (the engine then writes zero buffers unless `no_fallback`).
    fn write_zeroes(&self, _off: u64, _len: u64, _flags: ZeroFlags) -> IoFuture {
        IoFuture::err(IoStatus::ENOTSUP)
    }
    /// Write a whole cluster (`off` cluster-aligned, `buf` one cluster, or the image's last
    /// partial cluster) compressed. ENOTSUP for nodes without compression.
    fn write_compressed(&self, _off: u64, buf: IoBuf) -> IoFuture {
        IoFuture::done(buf, Err(IoStatus::ENOTSUP))
    }
    /// Tell the node the range is no longer needed (advisory).
    fn discard(&self, _off: u64, _len: u64) -> IoFuture {
        IoFuture::ok(0)
    }
    /// Make completed writes durable.
    fn flush(&self) -> IoFuture;
    /// Bring `off..off+len` closer ahead of reads to come (NBD's `NBD_CMD_CACHE`, which a
    /// server passes down and a client sends on): advisory, and nothing by default.
    fn prefetch(&self, _off: u64, len: u64) -> IoFuture {
        IoFuture::ok(len)
    }
    /// What `off..off+len` holds (the answer may cover less than `len`).
    fn block_status(&self, _off: u64, len: u64) -> LocalBoxFuture<'_, Result<BlockStatus, IoStatus>> {
        Box::pin(async move { Ok(BlockStatus::data(len)) })
    }
}
