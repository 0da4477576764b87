//! Opening the image basalt-io works on, from its command line or the `open` command, with
//! qemu-io's defaults and messages.
//!
//! qemu-io opens read-write with `cache=writethrough` unless `-t`/`-n` say otherwise (the
//! backend then flushes after every write) and with discards passed down (`-d ignore` turns
//! them off). Each open image has a graph of its own, so `close` drops every node of it (and
//! its locks). A file that was only probed as raw gets qemu-io's three-line warning on stderr.
//! Errors read `can't open device NAME: MSG`, or `can't open: MSG` with `--image-opts`.

use std::sync::Arc;

use basalt_engine::{Backend, DriverKind, Graph, Node, Opts, Secrets};

use crate::image::{parse_cache, spec_flags, spec_opts, ImageSpec};

/// How to open an image.
#[derive(Clone, Debug, Default)]
pub(crate) struct OpenRequest {
    /// The filename (or the option string with `image_opts`); `None` for `open -o ...` alone.
    pub filename: Option<String>,
    /// `-f`.
    pub fmt: Option<String>,
    /// `--image-opts`.
    pub image_opts: bool,
    /// `-r`.
    pub read_only: bool,
    /// `-U`.
    pub force_share: bool,
    /// `-t` (`-n` is `none`); already validated.
    pub cache: Option<String>,
    /// `-i`; already validated.
    pub aio: Option<String>,
    /// `-d`: whether discards reach the storage (`None`: the driver's default, which passes them).
    pub discard: Option<bool>,
    /// `open -o`: block driver options.
    pub options: Option<String>,
    /// The `--object` secrets drivers may look up.
    pub secrets: Secrets,
}

/// An open image: its graph, root node and backend.
pub(crate) struct Image {
    /// Keeps the node-names (and so the nodes) of this image.
    pub graph: Graph,
    /// The root node.
    pub node: Arc<dyn Node>,
    /// Where requests go.
    pub be: Backend,
}

/// qemu-io's `-d` values: whether discards pass.
pub(crate) fn parse_discard(mode: &str) -> Option<bool> {
    match mode {
        "off" | "ignore" => Some(false),
        "on" | "unmap" => Some(true),
        _ => None,
    }
}

/// The warning for an image whose format was only probed as raw.
pub(crate) fn probe_warning(name: &str) -> String {
    format!(
        "WARNING: Image format was not specified for '{name}' and probing guessed raw.\n         \
         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
         Specify the 'raw' format explicitly to remove the restrictions."
    )
}

/// Open an image; the error is the message to print after `basalt-io: `.
pub(crate) async fn open(req: &OpenRequest) -> Result<Image, String> {
    let fail = |msg: String| match (&req.filename, req.image_opts) {
        (Some(f), false) => format!("can't open device {f}: {msg}"),
        _ => format!("can't open: {msg}"),
    };
    let graph = Graph::with_secrets(basalt_formats::registry(), req.secrets.clone());
    let mut extra = match &req.options {
        Some(o) => Opts::parse_keyval(o, None).map_err(|e| fail(e.msg))?,
        None => Opts::new(),
    };
    let mut spec = ImageSpec::new(req.filename.as_deref().unwrap_or(""));
    spec.image_opts = req.image_opts || req.filename.is_none();
    spec.fmt = req.fmt.clone();
    // `open -o driver=FMT path` names the format of path, as `-f FMT` does.
    if req.filename.is_some() && !spec.image_opts && spec.fmt.is_none() {
        spec.fmt = extra.take_str("driver");
    }
    spec.read_only = req.read_only;
    spec.force_share = req.force_share;
    spec.cache = req.cache.clone();
    spec.aio = req.aio.clone();
    let mut opts = if req.filename.is_none() { Opts::new() } else { spec_opts(&graph, &spec).map_err(|e| fail(e.msg))? };
    for k in extra.keys().map(str::to_string).collect::<Vec<_>>() {
        if let Some(v) = extra.get_str(&k) {
            opts.set(&k, v);
        }
    }
    if req.discard == Some(false) {
        let is_format =
            opts.get_str("driver").and_then(|d| graph.registry().get(&d)).is_some_and(|d| d.kind() == DriverKind::Format);
        let key = if is_format { "file.discard" } else { "discard" };
        if !(opts.contains(key) || is_format && opts.contains("file")) {
            opts.set(key, "ignore");
        }
    }
    let (flags, _) = spec_flags(&spec).map_err(|e| fail(e.msg))?;
    let writethrough = match &req.cache {
        Some(c) => parse_cache(c).map_err(|e| fail(e.msg))?.2,
        None => true,
    };
    let node = graph.open(opts, flags).await.map_err(|e| fail(e.msg))?;
    let mut be = Backend::new(node.clone()).map_err(|e| fail(e.msg))?;
    be.set_writethrough(writethrough);
    if req.fmt.is_none() && !spec.image_opts && node.driver() == "raw" && node.probed() {
        // QEMU names the protocol node's file (`file:x` shows as `x`).
        let shown =
            node.children().first().map(|c| c.node.filename()).unwrap_or_else(|| req.filename.clone().unwrap_or_default());
        errln!("{}", probe_warning(&shown));
    }
    Ok(Image { graph, node, be })
}

impl Image {
    /// Flush and drop the image (qemu-io flushes when it closes an image).
    pub(crate) async fn close(self) {
        let _ = self.be.flush().await;
        drop(self.be);
        drop(self.node);
        if let Err(e) = self.graph.close().await {
            eprintln!("{}", e.msg);
        }
        drop(self.graph);
    }
}
