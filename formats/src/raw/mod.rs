//! The `raw` format: the guest sees its `file` child as it is, optionally a window of it
//! (`offset`, `size`).
//!
//! Its data path adds the offset and hands the child's own future back, so it costs nothing
//! per request. A file that was only *probed* as raw refuses a write to its first sector that
//! would make it probe as another format (QEMU's protection against a guest turning a raw
//! image into, say, a qcow2 header pointing at host files); `format=raw` given explicitly lifts
//! that.

use std::rc::Rc;
use std::sync::Arc;

use basalt_engine::{
    BlockDriver, BlockError, BlockResult, BlockStatus, Child, ChildRole, CreateOptDesc, DriverKind, ErrorKind, Graph, HostExtent,
    IoDone, IoFuture, IoStatus, Limits, LocalBoxFuture, Node, NodeQueue, OpenFlags, Opts, Prealloc, Queue, WriteFlags, ZeroFlags,
};
use basalt_reactor::IoBuf;

/// The `raw` format driver.
pub struct RawDriver;

/// Driver instance for the registry.
pub static RAW: RawDriver = RawDriver;

struct RawNode {
    name: String,
    file: Arc<dyn Node>,
    offset: u64,
    /// Fixed size when the `size` option was given.
    fixed_size: Option<u64>,
    read_only: bool,
    probed: bool,
    filename: String,
}

const CREATE_OPTS: &[CreateOptDesc] = &[
    CreateOptDesc { name: "size", kind: "size", help: "Virtual disk size" },
    CreateOptDesc { name: "preallocation", kind: "str", help: "Preallocation mode (allowed values: off, falloc, full)" },
];

impl BlockDriver for RawDriver {
    fn name(&self) -> &'static str {
        "raw"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }
    fn probe(&self, _head: &[u8], _filename: &str) -> u8 {
        1
    }
    fn open<'a>(
        &'a self,
        graph: &'a Graph,
        mut opts: Opts,
        mut flags: OpenFlags,
    ) -> LocalBoxFuture<'a, BlockResult<Arc<dyn Node>>> {
        Box::pin(async move {
            let name = graph.take_node_name(&mut opts)?;
            flags.read_only = opts.take_bool("read-only", flags.read_only)?;
            flags.cache_direct = opts.take_bool("cache.direct", flags.cache_direct)?;
            flags.no_flush = opts.take_bool("cache.no-flush", flags.no_flush)?;
            // The window options as given, for a `json:` filename.
            let shown_window: Vec<(&str, String)> =
                ["offset", "size"].into_iter().filter_map(|k| opts.get_str(k).map(|v| (k, v))).collect();
            let offset = opts.take_size("offset", 0)?;
            let size = match opts.contains("size") {
                true => Some(opts.take_size("size", 0)?),
                false => None,
            };
            let probed = flags.probed;
            let mut child_flags = flags.clone();
            child_flags.probed = false;
            let file = graph.open_child(&mut opts, ChildRole::File, child_flags).await?;
            opts.expect_empty("Block format", "raw")?;
            let child_size = file.size();
            let align = u64::from(file.limits().request_alignment.max(1));
            if offset % align != 0 {
                return Err(BlockError::option(format!(
                    "offset ({offset}) must be a multiple of the file's request alignment ({align})"
                )));
            }
            if offset > child_size {
                return Err(BlockError::new(
                    ErrorKind::OutOfBounds,
                    format!("Offset ({offset}) cannot be greater than the size of the containing file ({child_size})"),
                ));
            }
            if let Some(s) = size {
                if offset.checked_add(s).is_none_or(|e| e > child_size) {
                    return Err(BlockError::new(
                        ErrorKind::OutOfBounds,
                        format!("The sum of offset ({offset}) and size ({s}) has to be smaller or equal to the  actual size of the containing file ({child_size})"),
                    ));
                }
                if s % align != 0 {
                    return Err(BlockError::option(format!(
                        "size ({s}) must be a multiple of the file's request alignment ({align})"
                    )));
                }
            }
            // As QEMU: the file's own name when the raw node adds nothing to it, else a `json:`
            // filename describing both (also when the file itself needs one).
            let child_fn = file.filename();
            let filename = if offset == 0 && size.is_none() && !child_fn.starts_with("json:") {
                child_fn
            } else {
                let mut f = Opts::new();
                f.set("driver", "raw");
                for (k, v) in &shown_window {
                    f.set(k, v.clone());
                }
                match child_fn.strip_prefix("json:") {
                    Some(j) => f.insert_sub("file", Opts::parse_json(j)?),
                    None => {
                        f.set("file.driver", file.driver());
                        f.set("file.filename", child_fn);
                    }
                }
                basalt_engine::json_filename(&f)
            };
            let read_only = flags.read_only || file.read_only();
            Ok(Arc::new(RawNode { name, file, offset, fixed_size: size, read_only, probed, filename }) as Arc<dyn Node>)
        })
    }
    fn create_opts(&self) -> &'static [CreateOptDesc] {
        CREATE_OPTS
    }
    fn create<'a>(&'a self, graph: &'a Graph, filename: &'a str, size: u64, opts: Opts) -> LocalBoxFuture<'a, BlockResult<()>> {
        Box::pin(async move {
            let proto = graph.registry().protocol_for(filename).or_else(|| graph.registry().get("file"));
            let proto = proto.ok_or_else(|| BlockError::new(ErrorKind::NotFound, "Unknown protocol"))?;
            proto.create(graph, filename, size, opts).await
        })
    }
}

impl Node for RawNode {
    fn driver(&self) -> &'static str {
        "raw"
    }
    fn node_name(&self) -> &str {
        &self.name
    }
    fn filename(&self) -> String {
        self.filename.clone()
    }
    fn size(&self) -> u64 {
        self.fixed_size.unwrap_or_else(|| self.file.size().saturating_sub(self.offset))
    }
    fn limits(&self) -> Limits {
        self.file.limits()
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn is_format(&self) -> bool {
        true
    }
    fn children(&self) -> Vec<Child> {
        vec![Child { role: ChildRole::File, node: self.file.clone() }]
    }
    fn probed(&self) -> bool {
        self.probed
    }
    fn allocated_size(&self) -> Option<u64> {
        self.file.allocated_size()
    }
    fn create_queue(&self) -> BlockResult<Rc<dyn NodeQueue>> {
        Ok(Rc::new(RawQueue { file: Queue::new(self.file.clone())?, offset: self.offset, probed: self.probed }))
    }
    fn truncate(&self, size: u64, prealloc: Prealloc) -> LocalBoxFuture<'_, BlockResult<()>> {
        Box::pin(async move {
            if self.fixed_size.is_some() || self.offset != 0 {
                return Err(BlockError::new(ErrorKind::Unsupported, "Cannot resize fixed-size raw disks"));
            }
            self.file.truncate(size, prealloc).await
        })
    }
    fn host_extent(&self, off: u64, len: u64) -> Option<HostExtent> {
        if off.checked_add(len)? > self.size() {
            return None;
        }
        self.file.host_extent(self.offset.checked_add(off)?, len)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

struct RawQueue {
    file: Queue,
    offset: u64,
    probed: bool,
}

/// Whether writing `sector0` as the first 512 bytes would make the image probe as a format
/// other than raw.
fn changes_format(sector0: &[u8]) -> bool {
    let mut head = [0u8; basalt_engine::probe::PROBE_LEN];
    head[..sector0.len()].copy_from_slice(sector0);
    basalt_engine::probe::best_known(&head, "").is_some()
        || crate::registry().all().iter().any(|d| d.kind() == DriverKind::Format && d.name() != "raw" && d.probe(&head, "") > 1)
}

impl RawQueue {
    /// The slow path of a write touching sector 0 of a probed image.
    fn guarded_write(&self, off: u64, buf: IoBuf, flags: WriteFlags) -> IoFuture {
        let file = self.file.clone();
        let base = self.offset;
        IoFuture::boxed(async move {
            let mut sector = [0u8; 512];
            let len = buf.len();
            let in_sector = (512 - off as usize).min(len);
            if off != 0 || len < 512 {
                let d = file.read(base, IoBuf::new_uninit(512)).await;
                if let Err(e) = d.res {
                    return IoDone { buf: Some(buf), res: Err(e) };
                }
                sector.copy_from_slice(&d.buf.expect("read returns its buffer")[..512]);
            }
            sector[off as usize..off as usize + in_sector].copy_from_slice(&buf[..in_sector]);
            if changes_format(&sector) {
                return IoDone { buf: Some(buf), res: Err(IoStatus::EPERM) };
            }
            file.write(base + off, buf, flags).await
        })
    }
}

impl NodeQueue for RawQueue {
    fn read(&self, off: u64, buf: IoBuf) -> IoFuture {
        self.file.read(self.offset + off, buf)
    }
    fn write(&self, off: u64, buf: IoBuf, flags: WriteFlags) -> IoFuture {
        if self.probed && off < 512 && !buf.is_empty() {
            return self.guarded_write(off, buf, flags);
        }
        self.file.write(self.offset + off, buf, flags)
    }
    fn write_zeroes(&self, off: u64, len: u64, flags: ZeroFlags) -> IoFuture {
        // Zeroes never turn sector 0 into another format's header.
        self.file.write_zeroes(self.offset + off, len, flags)
    }
    fn discard(&self, off: u64, len: u64) -> IoFuture {
        self.file.discard(self.offset + off, len)
    }
    fn prefetch(&self, off: u64, len: u64) -> IoFuture {
        self.file.prefetch(self.offset + off, len)
    }
    fn flush(&self) -> IoFuture {
        self.file.flush()
    }
    fn block_status(&self, off: u64, len: u64) -> LocalBoxFuture<'_, Result<BlockStatus, IoStatus>> {
        Box::pin(async move {
            let mut st = self.file.block_status(self.offset + off, len).await?;
            st.allocated = true;
            if st.file.is_none() {
                st.file = Some(self.file.node().clone());
            }
            Ok(st)
        })
    }
}
