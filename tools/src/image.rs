//! Opening images the way qemu-img and qemu-io do from their command-line options: a filename
//! (with `json:` and protocol prefixes), `-f FMT`, `--image-opts`, `-U`/`--force-share`,
//! `-t CACHE`, `-i AIO`, `--object`, read-only or read-write, and the permissions the tool
//! needs (which decide the image locks).

use std::sync::Arc;

use basalt_engine::{AioMode, BlockError, BlockResult, DriverKind, ErrorKind, Graph, Node, OpenFlags, Opts, Perm};

/// How a tool wants an image opened.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    /// The filename operand (or the keyval string with `image_opts`).
    pub filename: String,
    /// `-f`.
    pub fmt: Option<String>,
    /// `--image-opts`.
    pub image_opts: bool,
    /// `-U`.
    pub force_share: bool,
    /// Open read-only.
    pub read_only: bool,
    /// `-t`.
    pub cache: Option<String>,
    /// `-i`.
    pub aio: Option<String>,
    /// Permissions to deny others (beyond what `force_share` grants), e.g. a convert source
    /// denies writers.
    pub unshare: Perm,
    /// Extra permissions needed (resize).
    pub extra_perm: Perm,
}

impl ImageSpec {
    /// A spec for `filename` with defaults (read-write, sharing everything).
    pub fn new(filename: &str) -> ImageSpec {
        ImageSpec {
            filename: filename.to_string(),
            fmt: None,
            image_opts: false,
            force_share: false,
            read_only: false,
            cache: None,
            aio: None,
            unshare: Perm::NONE,
            extra_perm: Perm::NONE,
        }
    }
}

/// The cache mode as QEMU names it: (direct, no_flush, writethrough).
pub fn parse_cache(mode: &str) -> BlockResult<(bool, bool, bool)> {
    Ok(match mode {
        "none" | "off" => (true, false, false),
        "writeback" => (false, false, false),
        "writethrough" => (false, false, true),
        "directsync" => (true, false, true),
        "unsafe" => (false, true, false),
        _ => return Err(BlockError::option(format!("Invalid cache option: {mode}"))),
    })
}

/// AIO mode as QEMU names it.
pub fn parse_aio(mode: &str) -> BlockResult<AioMode> {
    Ok(match mode {
        "threads" => AioMode::Threads,
        "io_uring" => AioMode::IoUring,
        "native" => {
            return Err(BlockError::new(
                ErrorKind::Unsupported,
                "aio=native (Linux AIO) is not supported; use -i io_uring or -i threads",
            ))
        }
        _ => return Err(BlockError::option(format!("Invalid aio option: {mode}"))),
    })
}

/// Build the option tree for a spec.
pub fn spec_opts(graph: &Graph, spec: &ImageSpec) -> BlockResult<Opts> {
    if spec.image_opts {
        if spec.fmt.is_some() {
            return Err(BlockError::option("--image-opts and --format are mutually exclusive"));
        }
        return Opts::parse_keyval(&spec.filename, None);
    }
    let mut opts = Opts::from_filename(&spec.filename)?;
    if let Some(fmt) = &spec.fmt {
        let drv =
            graph.registry().get(fmt).ok_or_else(|| BlockError::new(ErrorKind::NotFound, format!("Unknown driver '{fmt}'")))?;
        if let Some(prev) = opts.get_str("driver") {
            if prev != *fmt {
                return Err(BlockError::option(format!("Cannot use '{fmt}' as format, the image is given as '{prev}'")));
            }
        }
        if drv.kind() == DriverKind::Format && !opts.contains("driver") {
            if let Some(f) = opts.take_str("filename") {
                opts.set("file.filename", f);
            }
        }
        opts.set("driver", fmt.clone());
    }
    Ok(opts)
}

/// Open flags for a spec.
pub fn spec_flags(spec: &ImageSpec) -> BlockResult<(OpenFlags, bool)> {
    let mut flags = if spec.read_only { OpenFlags::read_only() } else { OpenFlags::read_write() };
    flags.perm = flags.perm.with(spec.extra_perm);
    flags.shared = Perm::ALL.without(spec.unshare);
    if spec.force_share {
        if !spec.read_only {
            return Err(BlockError::option("force-share=on can only be used with read-only images"));
        }
        flags.shared = Perm::ALL;
        flags.force_share = true;
    }
    let mut writethrough = false;
    if let Some(c) = &spec.cache {
        let (direct, no_flush, wt) = parse_cache(c)?;
        flags.cache_direct = direct;
        flags.no_flush = no_flush;
        writethrough = wt;
    }
    if let Some(a) = &spec.aio {
        flags.aio = parse_aio(a)?;
    }
    Ok((flags, writethrough))
}

/// Open an image; the error message carries "Could not open 'NAME': " as QEMU's does.
pub async fn open(graph: &Graph, spec: &ImageSpec) -> BlockResult<(Arc<dyn Node>, bool)> {
    let ctx = |e: BlockError| e.context(format!("Could not open '{}'", spec.filename));
    let opts = spec_opts(graph, spec).map_err(ctx)?;
    let (flags, writethrough) = spec_flags(spec).map_err(ctx)?;
    let node = graph.open(opts, flags).await.map_err(ctx)?;
    Ok((node, writethrough))
}
