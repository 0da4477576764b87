//! `null-co` and `null-aio`: devices that store nothing, for benchmarking the stack above them.
//!
//! As in QEMU: `size` (default 1 GiB), `read-zeroes` (default off: reads leave the buffer as
//! it was), `latency-ns` (each request completes after that delay). `null-co` completes
//! requests at once; `null-aio` completes them on the reactor's next turn, like a device
//! interrupt. Neither allocates per request.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_engine::{
    BlockDriver, BlockResult, BlockStatus, DriverKind, Graph, IoFuture, Limits, LocalBoxFuture, Node, NodeQueue, OpenFlags, Opts,
    SlotKind, WriteFlags, ZeroFlags,
};
use basalt_reactor::{slot_alloc, IoBuf, SlotFuture};

use crate::json_filename;

/// The `null-co` driver.
pub struct NullCo;
/// The `null-aio` driver.
pub struct NullAio;

/// Driver instances for the registry.
pub static NULL_CO: NullCo = NullCo;
/// Driver instances for the registry.
pub static NULL_AIO: NullAio = NullAio;

struct NullNode {
    driver: &'static str,
    name: String,
    filename: String,
    size: u64,
    read_zeroes: bool,
    latency: Duration,
    aio: bool,
    read_only: bool,
}

fn open_null(driver: &'static str, aio: bool, graph: &Graph, mut opts: Opts, flags: OpenFlags) -> BlockResult<Arc<dyn Node>> {
    let name = graph.take_node_name(&mut opts)?;
    let read_only = opts.take_bool("read-only", flags.read_only)? || flags.read_only;
    let _ = opts.take_bool("force-share", false)?;
    let _ = opts.take_bool("auto-read-only", false)?;
    let _ = opts.take_bool("cache.direct", false)?;
    let _ = opts.take_bool("cache.no-flush", false)?;
    opts.take_enum("discard", &["ignore", "off", "unmap", "on"], "ignore")?;
    // Like QEMU, the filename keeps only the options that change what is read (size and
    // read-zeroes), not the latency.
    let mut shown = opts.clone();
    shown.take_str("filename");
    shown.take_str("latency-ns");
    let filename = opts.take_str("filename");
    let size = opts.take_size("size", 1 << 30)?;
    let read_zeroes = opts.take_bool("read-zeroes", false)?;
    let latency = Duration::from_nanos(opts.take_u64("latency-ns", 0)?);
    if let Some(f) = &filename {
        let prefix = format!("{driver}://");
        if !f.is_empty() && f != &prefix {
            return Err(basalt_engine::BlockError::option(format!("The only allowed filename for this driver is '{prefix}'")));
        }
    }
    opts.expect_empty("Block protocol", driver)?;
    let filename = if shown.is_empty() {
        format!("{driver}://")
    } else {
        shown.set("driver", driver);
        json_filename(&shown)
    };
    Ok(Arc::new(NullNode { driver, name, filename, size, read_zeroes, latency, aio, read_only }))
}

impl BlockDriver for NullCo {
    fn name(&self) -> &'static str {
        "null-co"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Protocol
    }
    fn protocol_prefixes(&self) -> &'static [&'static str] {
        &["null-co://"]
    }
    fn open<'a>(&'a self, graph: &'a Graph, opts: Opts, flags: OpenFlags) -> LocalBoxFuture<'a, BlockResult<Arc<dyn Node>>> {
        Box::pin(async move { open_null("null-co", false, graph, opts, flags) })
    }
}

impl BlockDriver for NullAio {
    fn name(&self) -> &'static str {
        "null-aio"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Protocol
    }
    fn protocol_prefixes(&self) -> &'static [&'static str] {
        &["null-aio://"]
    }
    fn open<'a>(&'a self, graph: &'a Graph, opts: Opts, flags: OpenFlags) -> LocalBoxFuture<'a, BlockResult<Arc<dyn Node>>> {
        Box::pin(async move { open_null("null-aio", true, graph, opts, flags) })
    }
}

impl Node for NullNode {
    fn driver(&self) -> &'static str {
        self.driver
    }
    fn node_name(&self) -> &str {
        &self.name
    }
    fn filename(&self) -> String {
        self.filename.clone()
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn limits(&self) -> Limits {
        Limits::default()
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn is_format(&self) -> bool {
        false
    }
    fn allocated_size(&self) -> Option<u64> {
        Some(0)
    }
    fn create_queue(&self) -> BlockResult<Rc<dyn NodeQueue>> {
        Ok(Rc::new(NullQueue { read_zeroes: self.read_zeroes, latency: self.latency, aio: self.aio }))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

struct NullQueue {
    read_zeroes: bool,
    latency: Duration,
    aio: bool,
}

impl NullQueue {
    fn complete(&self, buf: Option<IoBuf>, n: u64) -> IoFuture {
        if self.latency.is_zero() && !self.aio {
            return IoFuture::Ready(Some(basalt_engine::IoDone { buf, res: Ok(n) }));
        }
        let id = slot_alloc(buf);
        if self.latency.is_zero() {
            basalt_reactor::slot_complete_deferred(id, n as i64);
        } else {
            basalt_reactor::complete_at(Instant::now() + self.latency, id, n as i64);
        }
        IoFuture::Slot(SlotFuture::new(id), SlotKind::Other)
    }
}

impl NodeQueue for NullQueue {
    fn read(&self, _off: u64, mut buf: IoBuf) -> IoFuture {
        if self.read_zeroes {
            buf.as_mut_slice().fill(0);
        }
        let n = buf.len() as u64;
        self.complete(Some(buf), n)
    }
    fn write(&self, _off: u64, buf: IoBuf, _flags: WriteFlags) -> IoFuture {
        let n = buf.len() as u64;
        self.complete(Some(buf), n)
    }
    fn write_zeroes(&self, _off: u64, len: u64, _flags: ZeroFlags) -> IoFuture {
        self.complete(None, len)
    }
    fn discard(&self, _off: u64, len: u64) -> IoFuture {
        self.complete(None, len)
    }
    fn flush(&self) -> IoFuture {
        self.complete(None, 0)
    }
    fn block_status(&self, off: u64, len: u64) -> LocalBoxFuture<'_, Result<BlockStatus, basalt_engine::IoStatus>> {
        let zero = self.read_zeroes;
        Box::pin(async move {
            Ok(BlockStatus { len, data: false, zero, allocated: true, offset: Some(off), file: None, compressed: false })
        })
    }
}
