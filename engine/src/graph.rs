//! The block graph: the driver registry, node-names, and opening a tree of nodes from an
//! option tree.
//!
//! Opening follows QEMU's rules. With `driver` given, that driver opens the node and its
//! children (a format opens its `file` child through [`Graph::open_child`]). Without it, the
//! protocol comes from the filename's prefix (`file` when there is none), the format is probed
//! from the first 2 KiB, and a file only probed as raw is marked so that a write turning
//! sector 0 into another format's header is refused. A child given as a string names an
//! existing node (a node shared by several parents).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;

use basalt_reactor::IoBuf;

use crate::error::{BlockError, BlockResult, ErrorKind};
use crate::node::{ChildRole, LocalBoxFuture, Node, Perm, Prealloc};
use crate::options::Opts;
use crate::probe;
use crate::queue::Queue;
use crate::secret::Secrets;

/// Whether a driver is a protocol (leaf) or a format/filter (has a `file` child).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverKind {
    /// A leaf: file, host_device, null-co, nvme, nbd...
    Protocol,
    /// A format or filter over a child.
    Format,
}

/// Host cache and AIO settings, inherited by children (QEMU's `cache.*` and `aio`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AioMode {
    /// io_uring when the reactor has a ring, else threads.
    #[default]
    Auto,
    /// io_uring.
    IoUring,
    /// The blocking thread pool.
    Threads,
}

/// How a node is opened.
#[derive(Clone, Debug)]
pub struct OpenFlags {
    /// Refuse writes.
    pub read_only: bool,
    /// Permissions the opener uses.
    pub perm: Perm,
    /// Permissions the opener lets others use.
    pub shared: Perm,
    /// O_DIRECT (`cache.direct`).
    pub cache_direct: bool,
    /// Ignore flushes (`cache.no-flush`, qemu-img's `-t unsafe`).
    pub no_flush: bool,
    /// AIO backend for file-like leaves.
    pub aio: AioMode,
    /// The node was only probed as its format (set by the graph for raw).
    pub probed: bool,
    /// `-U` / `force-share=on`: formats must not restrict what others may do to their files.
    pub force_share: bool,
}

impl OpenFlags {
    /// Read-write, sharing everything, as qemu-io opens an image.
    pub fn read_write() -> OpenFlags {
        OpenFlags {
            read_only: false,
            perm: Perm::CONSISTENT_READ.with(Perm::WRITE),
            shared: Perm::ALL,
            cache_direct: false,
            no_flush: false,
            aio: AioMode::Auto,
            probed: false,
            force_share: false,
        }
    }

    /// Read-only, sharing everything.
    pub fn read_only() -> OpenFlags {
        OpenFlags { read_only: true, perm: Perm::CONSISTENT_READ, ..OpenFlags::read_write() }
    }
}

/// A `-o` option a driver accepts at creation, for help and validation.
#[derive(Clone, Copy, Debug)]
pub struct CreateOptDesc {
    /// Name.
    pub name: &'static str,
    /// Type shown in help (`size`, `str`, `bool`).
    pub kind: &'static str,
    /// Help text.
    pub help: &'static str,
}

/// A block driver: a protocol or a format, registered in an explicit list.
pub trait BlockDriver: Sync {
    /// QEMU's driver name.
    fn name(&self) -> &'static str;
    /// Protocol or format.
    fn kind(&self) -> DriverKind;
    /// Filename prefixes this protocol claims (`null-co://`, `file:`).
    fn protocol_prefixes(&self) -> &'static [&'static str] {
        &[]
    }
    /// Probe score 0-100 for a format, given the first bytes and the filename.
    fn probe(&self, _head: &[u8], _filename: &str) -> u8 {
        0
    }
    /// Open a node from `opts` (which the driver consumes; leftovers are an error).
    fn open<'a>(&'a self, graph: &'a Graph, opts: Opts, flags: OpenFlags) -> LocalBoxFuture<'a, BlockResult<Arc<dyn Node>>>;
    /// Whether the format can write compressed clusters (`convert -c`, `write -c`).
    fn supports_compression(&self) -> bool {
        false
    }
    /// `-o` options for create.
    fn create_opts(&self) -> &'static [CreateOptDesc] {
        &[]
    }
    /// Create an image of `size` bytes at `filename` with creation options `opts`.
    fn create<'a>(
        &'a self,
        _graph: &'a Graph,
        _filename: &'a str,
        _size: u64,
        _opts: Opts,
    ) -> LocalBoxFuture<'a, BlockResult<()>> {
        let name = self.name();
        Box::pin(async move {
            Err(BlockError::new(ErrorKind::Unsupported, format!("Driver '{name}' does not support image creation")))
        })
    }
}

/// The drivers a program knows, in registration order.
#[derive(Clone, Default)]
pub struct Registry {
    drivers: Vec<&'static dyn BlockDriver>,
}

impl Registry {
    /// A registry of `drivers`.
    pub fn new(drivers: Vec<&'static dyn BlockDriver>) -> Registry {
        Registry { drivers }
    }

    /// Look a driver up by name.
    pub fn get(&self, name: &str) -> Option<&'static dyn BlockDriver> {
        self.drivers.iter().copied().find(|d| d.name() == name)
    }

    /// All drivers.
    pub fn all(&self) -> &[&'static dyn BlockDriver] {
        &self.drivers
    }

    /// The protocol a filename's prefix selects, if any.
    pub fn protocol_for(&self, filename: &str) -> Option<&'static dyn BlockDriver> {
        self.drivers.iter().copied().find(|d| d.protocol_prefixes().iter().any(|p| filename.starts_with(p)))
    }

    /// The best format for a header: Ok(driver) or, when the best match is a format Basalt
    /// recognises but cannot open, an error naming it.
    pub fn probe(&self, head: &[u8], filename: &str) -> BlockResult<&'static dyn BlockDriver> {
        let best = self
            .drivers
            .iter()
            .copied()
            .filter(|d| d.kind() == DriverKind::Format)
            .map(|d| (d, d.probe(head, filename)))
            .max_by_key(|(_, s)| *s)
            .filter(|(_, s)| *s > 0);
        let known = probe::best_known(head, filename).filter(|(n, _)| self.get(n).is_none());
        match (best, known) {
            (Some((d, s)), Some((_, ks))) if s >= ks => Ok(d),
            (_, Some((name, _))) => Err(BlockError::new(
                ErrorKind::Unsupported,
                format!("Image is in the '{name}' format, which Basalt cannot open yet"),
            )),
            (Some((d, _)), None) => Ok(d),
            (None, None) => Err(BlockError::new(ErrorKind::InvalidFormat, "Could not determine image format")),
        }
    }
}

/// A block graph being built or used on one reactor: the registry, the node-names in use and
/// the secrets its drivers may look up (`key-secret`).
pub struct Graph {
    registry: Registry,
    names: RefCell<HashMap<String, Arc<dyn Node>>>,
    auto: Cell<u64>,
    secrets: Secrets,
}

impl Graph {
    /// An empty graph over `registry`, with no secrets.
    pub fn new(registry: Registry) -> Graph {
        Graph::with_secrets(registry, Secrets::new())
    }

    /// An empty graph over `registry` that shares `secrets` (a handle: secrets added to it
    /// later are seen too).
    pub fn with_secrets(registry: Registry, secrets: Secrets) -> Graph {
        Graph { registry, names: RefCell::new(HashMap::new()), auto: Cell::new(0), secrets }
    }

    /// The secrets drivers look up by id.
    pub fn secrets(&self) -> &Secrets {
        &self.secrets
    }

    /// Add a user-creatable object from its `--object` definition (`secret`, `tls-creds-*`).
    pub fn add_object(&self, def: &str) -> BlockResult<()> {
        self.secrets.add_object(def)
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// A node by node-name.
    pub fn node(&self, name: &str) -> Option<Arc<dyn Node>> {
        self.names.borrow().get(name).cloned()
    }

    /// Take the `node-name` option or make one up (`#blockN`, as QEMU does).
    pub fn take_node_name(&self, opts: &mut Opts) -> BlockResult<String> {
        match opts.take_str("node-name") {
            Some(n) => {
                if n.is_empty() || n.starts_with('#') || !n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                    return Err(BlockError::option(format!("Invalid node-name: '{n}'")));
                }
                if self.names.borrow().contains_key(&n) {
                    return Err(BlockError::option(format!("Duplicate nodes with node-name='{n}'")));
                }
                Ok(n)
            }
            None => {
                let i = self.auto.get();
                self.auto.set(i + 1);
                Ok(format!("#block{i:03}"))
            }
        }
    }

    fn register(&self, node: &Arc<dyn Node>) {
        self.names.borrow_mut().insert(node.node_name().to_string(), node.clone());
    }

    /// Close every node of the graph (see [`Node::close`]), parents before their children, and
    /// forget them. The first error is returned after every node was closed.
    pub async fn close(&self) -> BlockResult<()> {
        let mut nodes: Vec<Arc<dyn Node>> = self.names.borrow_mut().drain().map(|(_, n)| n).collect();
        let mut first = Ok(());
        while !nodes.is_empty() {
            // A node no remaining node has as a child goes next.
            let is_child = |n: &Arc<dyn Node>, all: &[Arc<dyn Node>]| {
                all.iter().any(|p| p.children().iter().any(|c| Arc::ptr_eq(&c.node, n)))
            };
            let i = (0..nodes.len()).find(|&i| !is_child(&nodes[i], &nodes)).unwrap_or(0);
            let n = nodes.remove(i);
            if let Err(e) = n.close().await {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    /// Forget a node-name (when its node is closed).
    pub fn remove(&self, name: &str) {
        self.names.borrow_mut().remove(name);
    }

    /// Open an image: the top of a tree, with format probing when no driver is named.
    pub async fn open(&self, mut opts: Opts, flags: OpenFlags) -> BlockResult<Arc<dyn Node>> {
        let Some(driver) = opts.get_str("driver") else {
            return self.open_probed(opts, flags).await;
        };
        let drv = self.registry.get(&driver).ok_or_else(|| unknown_driver(&driver))?;
        opts.take_str("driver");
        let node = drv.open(self, opts, flags).await?;
        self.register(&node);
        Ok(node)
    }

    async fn open_probed(&self, mut opts: Opts, mut flags: OpenFlags) -> BlockResult<Arc<dyn Node>> {
        // The protocol node is either given as a `file` child (json:{"file": {...}}) or made
        // from the top-level filename and protocol options. It is opened once to read the
        // header; a format other than raw then opens it again itself, so that the file is
        // locked with the permissions that format takes (as QEMU reopens it).
        let (proto, mut fmt_opts, proto_opts) = if opts.contains("file") || opts.has_sub("file") {
            let sub = (!opts.contains("file")).then(|| {
                let mut copy = opts.clone();
                copy.take_sub("file")
            });
            let proto = self.open_child(&mut opts, ChildRole::File, flags.clone()).await?;
            (proto, opts, sub)
        } else {
            if !opts.contains("filename") {
                return Err(BlockError::option("A block device must be specified for \"file\""));
            }
            // Options meant for the format (node-name and the like) stay with it; the rest go
            // to the protocol.
            let mut fmt_opts = Opts::new();
            for k in ["node-name", "read-only"] {
                if let Some(v) = opts.take_str(k) {
                    fmt_opts.set(k, v);
                }
            }
            let copy = opts.clone();
            (self.open_protocol(opts, flags.clone()).await?, fmt_opts, Some(copy))
        };
        let head = read_head(&proto).await?;
        let drv = self.registry.probe(&head, &proto.filename())?;
        flags.probed = drv.name() == "raw";
        match proto_opts {
            Some(p) if drv.name() != "raw" => {
                self.remove(proto.node_name());
                drop(proto);
                fmt_opts.insert_sub("file", p);
            }
            _ => fmt_opts.set("file", proto.node_name()),
        }
        let node = drv.open(self, fmt_opts, flags).await?;
        self.register(&node);
        Ok(node)
    }

    /// Open a protocol node from options that may lack `driver` (the prefix decides).
    pub async fn open_protocol(&self, mut opts: Opts, flags: OpenFlags) -> BlockResult<Arc<dyn Node>> {
        let drv = match opts.take_str("driver") {
            Some(d) => self.registry.get(&d).ok_or_else(|| unknown_driver(&d))?,
            None => {
                let f = opts
                    .get_str("filename")
                    .ok_or_else(|| BlockError::option("A block device must be specified for \"file\""))?;
                match self.registry.protocol_for(&f) {
                    Some(d) => d,
                    None if f.contains("://")
                        || (f.contains(':') && !f.starts_with('/') && !f.starts_with('.') && known_scheme(&f)) =>
                    {
                        let proto = f.split(':').next().unwrap_or("");
                        return Err(BlockError::new(ErrorKind::Unsupported, format!("Unknown protocol '{proto}'")));
                    }
                    None => self.registry.get("file").ok_or_else(|| unknown_driver("file"))?,
                }
            }
        };
        let node = drv.open(self, opts, flags).await?;
        self.register(&node);
        Ok(node)
    }

    /// Open the child of `role` from a parent's options: `<role>` naming an existing node, or a
    /// `<role>.` subtree.
    pub async fn open_child(&self, opts: &mut Opts, role: ChildRole, flags: OpenFlags) -> BlockResult<Arc<dyn Node>> {
        let key = role.name();
        if let Some(r) = opts.take_str(key) {
            if opts.has_sub(key) {
                return Err(BlockError::option(format!(
                    "Cannot reference an existing block device with additional options or a new filename ('{key}')"
                )));
            }
            if let Some(n) = self.node(&r) {
                if !flags.read_only && n.read_only() {
                    return Err(BlockError::new(ErrorKind::PermissionDenied, format!("Block node '{r}' is read-only")));
                }
                return Ok(n);
            }
            // A string child is a reference, never a filename (as in QEMU).
            return Err(BlockError::new(ErrorKind::NotFound, format!("Cannot find device='{r}' nor node-name='{r}'")));
        }
        let sub = opts.take_sub(key);
        if sub.is_empty() {
            return Err(BlockError::option(format!("A block device must be specified for \"{key}\"")));
        }
        if sub.contains("driver") {
            let drv_name = sub.get_str("driver").unwrap_or_default();
            if self.registry.get(&drv_name).is_some_and(|d| d.kind() == DriverKind::Format) {
                return Box::pin(self.open(sub, flags)).await;
            }
        }
        self.open_protocol(sub, flags).await
    }

    /// Create an image with `driver` (qemu-img create).
    pub async fn create(&self, driver: &str, filename: &str, size: u64, opts: Opts) -> BlockResult<()> {
        let drv = self
            .registry
            .get(driver)
            .ok_or_else(|| BlockError::new(ErrorKind::NotFound, format!("Unknown file format '{driver}'")))?;
        drv.create(self, filename, size, opts).await
    }
}

fn known_scheme(f: &str) -> bool {
    ["nbd:", "nvme:", "http:", "https:", "ssh:", "iscsi:", "gluster:", "rbd:"].iter().any(|p| f.starts_with(p))
}

fn unknown_driver(name: &str) -> BlockError {
    BlockError::new(ErrorKind::NotFound, format!("Unknown driver '{name}'"))
}

/// Read the first [`probe::PROBE_LEN`] bytes of a node (zeroes past its end).
pub async fn read_head(node: &Arc<dyn Node>) -> BlockResult<Vec<u8>> {
    let size = node.size();
    let n = (probe::PROBE_LEN as u64).min(size) as usize;
    let mut head = vec![0u8; probe::PROBE_LEN];
    if n == 0 {
        return Ok(head);
    }
    let q = Queue::new(node.clone())?;
    let d = q.read(0, IoBuf::new_uninit(n)).await;
    d.res.map_err(|e| BlockError::from(e).context("Could not read image for determining its format"))?;
    head[..n].copy_from_slice(&d.buf.expect("read returns its buffer")[..n]);
    Ok(head)
}

/// A file name given relative to the image that names it (a backing file), as QEMU resolves
/// it: absolute names, URLs and `json:` names stay as they are; others are taken from the
/// image's directory.
pub fn resolve_relative(image: &str, name: &str) -> String {
    if name.starts_with('/') || name.contains("://") || name.starts_with("json:") {
        return name.to_string();
    }
    match image.rfind('/') {
        Some(i) => format!("{}/{}", &image[..i], name),
        None => name.to_string(),
    }
}

/// Parse a `preallocation` create option (with QEMU's create-time wording for a bad value).
pub fn take_prealloc(opts: &mut Opts) -> BlockResult<Prealloc> {
    match opts.take_str("preallocation") {
        None => Ok(Prealloc::Off),
        Some(s) => Prealloc::parse(&s).map_err(|_| BlockError::option(format!("invalid parameter value: {s}"))),
    }
}
