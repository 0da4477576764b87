//! `nvme`: an NVMe namespace driven from userspace through VFIO, as QEMU's `nvme` block driver
//! and SPDK's NVMe driver do: no kernel in the data path.
//!
//! Filenames `nvme://DOMAIN:BUS:DEV.FN/NAMESPACE` (namespace 1 when left out) or the options
//! `device=0000:06:0d.0,namespace=N`; `x-sgl=off` (PRP lists even where SGLs would do); the
//! generic `read-only`, `auto-read-only`, `force-share`, `cache.direct`, `cache.no-flush`,
//! `discard`, `node-name`. The controller must be bound to vfio-pci; both IOMMU modes work
//! (see [`vfio`]). One process owns a controller at a time, as with QEMU: a second user gets
//! "in use". Without an IOMMU, all memory given to the device must be on hugepages: opening
//! refuses otherwise, by name.
//!
//! Pieces: [`vfio`] (container, group, BAR, DMA mappings), [`cmd`] (entries, status, identify,
//! PRPs; pure), [`ring`] (a queue pair's rings and doorbells), [`ctrl`] (bring-up, admin queue,
//! teardown), [`queue`] (a reactor's I/O queue pair: the data plane). The node declares the
//! namespace's logical block size as its request alignment and the controller's maximum
//! transfer (MDTS, at most 2 MiB) as its max transfer; the engine pads and splits to those.

mod cmd;
mod ctrl;
mod queue;
mod ring;
mod vfio;

use std::rc::Rc;
use std::sync::Arc;

use basalt_engine::{
    BlockDriver, BlockError, BlockResult, DriverKind, ErrorKind, Graph, Limits, LocalBoxFuture, Node, NodeQueue, OpenFlags, Opts,
    ZeroFlags,
};

use ctrl::Controller;

/// The `nvme` protocol driver.
pub struct NvmeDriver;

/// Driver instance for the registry.
pub static NVME: NvmeDriver = NvmeDriver;

const PREFIX: &str = "nvme://";

/// QEMU's options for creating on an existing device (`bdrv_create_opts_simple`).
const CREATE_OPTS: &[basalt_engine::CreateOptDesc] = &[
    basalt_engine::CreateOptDesc { name: "size", kind: "size", help: "Virtual disk size" },
    basalt_engine::CreateOptDesc { name: "preallocation", kind: "str", help: "Preallocation mode (allowed values: off)" },
];

/// What a queue needs to know of its namespace.
#[derive(Clone, Copy)]
pub(crate) struct NsInfo {
    pub(crate) nsid: u32,
    pub(crate) block_size: u32,
    pub(crate) write_zeroes_dealloc: bool,
    /// Discard requests are passed down (`discard=unmap`).
    pub(crate) discard: bool,
    /// SGLs may be used where the controller offers them (`x-sgl`, default on; off forces
    /// PRP lists, for tests).
    pub(crate) sgl: bool,
}

struct NvmeNode {
    name: String,
    bdf: String,
    ns: NsInfo,
    size: u64,
    read_only: bool,
    no_flush: bool,
    ctrl: Arc<Controller>,
}

/// Split `nvme://DEVICE[/NAMESPACE]` as QEMU does.
fn parse_filename(f: &str) -> BlockResult<(String, Option<String>)> {
    let rest = f.strip_prefix(PREFIX).ok_or_else(|| BlockError::option("File name must start with 'nvme://'"))?;
    Ok(match rest.split_once('/') {
        Some((d, ns)) if !ns.is_empty() => (d.to_string(), Some(ns.to_string())),
        Some((d, _)) => (d.to_string(), None),
        None => (rest.to_string(), None),
    })
}

fn open_nvme(graph: &Graph, mut opts: Opts, flags: OpenFlags) -> BlockResult<Arc<dyn Node>> {
    let name = graph.take_node_name(&mut opts)?;
    let (mut device, mut namespace) = (opts.take_str("device"), opts.take_str("namespace"));
    if let Some(f) = opts.take_str("filename") {
        if device.is_some() || namespace.is_some() {
            return Err(BlockError::option("The 'nvme' driver takes either a filename or device/namespace options, not both"));
        }
        let (d, n) = parse_filename(&f)?;
        device = Some(d);
        namespace = n;
    }
    let device = device.ok_or_else(|| BlockError::option("Parameter 'device' is required"))?;
    let nsid = match namespace {
        None => 1,
        Some(n) => n
            .parse::<u32>()
            .ok()
            .filter(|v| *v > 0)
            .ok_or_else(|| BlockError::option(format!("Invalid namespace '{n}', positive number expected")))?,
    };
    let read_only = opts.take_bool("read-only", flags.read_only)?;
    let _ = opts.take_bool("auto-read-only", false)?;
    let force_share = opts.take_bool("force-share", false)?;
    // Always direct: there is no cache between Basalt and the device.
    let _ = opts.take_bool("cache.direct", flags.cache_direct)?;
    let no_flush = opts.take_bool("cache.no-flush", flags.no_flush)?;
    let discard = opts.take_enum("discard", &["ignore", "off", "unmap", "on"], "unmap")?;
    let sgl = opts.take_bool("x-sgl", true)?;
    if let Some(v) = opts.take_str("aio-max-batch") {
        basalt_engine::parse_number(&v).ok_or_else(|| BlockError::option("Parameter 'aio-max-batch' expects a number"))?;
    }
    opts.expect_empty("Block protocol", "nvme")?;
    if force_share && !read_only {
        return Err(BlockError::option("force-share=on can only be used with read-only images"));
    }
    let bdf = vfio::normalise_bdf(&device)
        .ok_or_else(|| BlockError::option(format!("Invalid PCI address '{device}' (expected DOMAIN:BUS:DEV.FN)")))?;
    let ctrl = Controller::open(&bdf)?;
    let id = ctrl.namespace(nsid)?;
    let ns = NsInfo {
        nsid,
        block_size: id.block_size,
        write_zeroes_dealloc: id.write_zeroes_dealloc,
        discard: discard == "unmap" || discard == "on",
        sgl,
    };
    Ok(Arc::new(NvmeNode { name, bdf, ns, size: id.size(), read_only, no_flush, ctrl }))
}

impl BlockDriver for NvmeDriver {
    fn name(&self) -> &'static str {
        "nvme"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Protocol
    }
    fn protocol_prefixes(&self) -> &'static [&'static str] {
        &[PREFIX]
    }
    fn open<'a>(&'a self, graph: &'a Graph, opts: Opts, flags: OpenFlags) -> LocalBoxFuture<'a, BlockResult<Arc<dyn Node>>> {
        Box::pin(async move { open_nvme(graph, opts, flags) })
    }
    fn create_opts(&self) -> &'static [basalt_engine::CreateOptDesc] {
        CREATE_OPTS
    }
    /// As QEMU's simple create for devices: the namespace must be large enough; its first
    /// block is zeroed so nothing probes it as a format it no longer holds.
    fn create<'a>(&'a self, graph: &'a Graph, filename: &'a str, size: u64, opts: Opts) -> LocalBoxFuture<'a, BlockResult<()>> {
        Box::pin(async move {
            let mut opts = opts;
            let prealloc = opts.take_str("preallocation");
            if prealloc.as_deref().is_some_and(|p| p != "off") {
                return Err(BlockError::new(
                    ErrorKind::Unsupported,
                    format!("Unsupported preallocation mode '{}'", prealloc.unwrap_or_default()),
                ));
            }
            opts.expect_empty("Block protocol", "nvme")?;
            let mut o = Opts::new();
            o.set("filename", filename);
            let node = open_nvme(graph, o, OpenFlags::read_write())?;
            if size > node.size() {
                return Err(BlockError::new(
                    ErrorKind::OutOfBounds,
                    format!("Image size {size} is larger than the device's {} bytes", node.size()),
                ));
            }
            let q = basalt_engine::Queue::new(node.clone())?;
            let bs = node.limits().request_alignment;
            let r = q.write_zeroes(0, u64::from(bs.max(512)), ZeroFlags::default()).await.res;
            r.map_err(|e| BlockError::new(ErrorKind::Io, format!("Could not zero the first sector of '{filename}': {e}")))?;
            q.flush().await.res.map_err(|e| BlockError::new(ErrorKind::Io, format!("Could not flush '{filename}': {e}")))?;
            Ok(())
        })
    }
}

impl Node for NvmeNode {
    fn driver(&self) -> &'static str {
        "nvme"
    }
    fn node_name(&self) -> &str {
        &self.name
    }
    fn filename(&self) -> String {
        format!("{PREFIX}{}/{}", self.bdf, self.ns.nsid)
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn limits(&self) -> Limits {
        Limits { request_alignment: self.ns.block_size, max_transfer: self.ctrl.max_transfer, opt_transfer: 0 }
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn is_format(&self) -> bool {
        false
    }
    fn protocol_type(&self) -> Option<&'static str> {
        Some("nvme")
    }
    fn create_queue(&self) -> BlockResult<Rc<dyn NodeQueue>> {
        Ok(Rc::new(NoFlush { q: queue::NvmeQueue::new(self.ctrl.clone(), self.ns)?, no_flush: self.no_flush }))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The queue with `cache.no-flush` applied.
struct NoFlush {
    q: queue::NvmeQueue,
    no_flush: bool,
}

impl NodeQueue for NoFlush {
    fn read(&self, off: u64, buf: basalt_reactor::IoBuf) -> basalt_engine::IoFuture {
        self.q.read(off, buf)
    }
    fn write(&self, off: u64, buf: basalt_reactor::IoBuf, flags: basalt_engine::WriteFlags) -> basalt_engine::IoFuture {
        self.q.write(off, buf, flags)
    }
    fn write_zeroes(&self, off: u64, len: u64, flags: ZeroFlags) -> basalt_engine::IoFuture {
        self.q.write_zeroes(off, len, flags)
    }
    fn discard(&self, off: u64, len: u64) -> basalt_engine::IoFuture {
        self.q.discard(off, len)
    }
    fn flush(&self) -> basalt_engine::IoFuture {
        if self.no_flush {
            return basalt_engine::IoFuture::ok(0);
        }
        self.q.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filenames_split_as_qemu_does() {
        assert_eq!(parse_filename("nvme://0000:06:0d.0/2").unwrap(), ("0000:06:0d.0".into(), Some("2".into())));
        assert_eq!(parse_filename("nvme://0000:06:0d.0").unwrap(), ("0000:06:0d.0".into(), None));
        assert_eq!(parse_filename("nvme://0000:06:0d.0/").unwrap(), ("0000:06:0d.0".into(), None));
        assert!(parse_filename("nvm://x").is_err());
    }
}
