//! Pieces shared by the `basalt-img` subcommands, so that each prints what qemu-img prints:
//! usage errors and per-command help, the common options (`-f`, `--image-opts`, `-U`,
//! `--object`, `-q`, `-T`, `--output`), QEMU's number parsers (`qemu_strtosz`, `cvtnum`,
//! `qemu_strtoi64`) with qemu-img's messages, opening an image (with the warning qemu-img
//! prints for a probed raw image opened read-write), QEMU's `-p` progress line, and block
//! status as qemu-img sees it at the top of a backing chain.
//!
//! Every error path prints its message and yields an exit code; nothing here panics on user
//! input.

use std::fmt::Display;
use std::io::Write;
use std::sync::Arc;

use basalt_engine::{Backend, ChildRole, Graph, IoStatus, Node, Perm};

use crate::getopt::{self, Args, OptSpec};
use crate::image::{self, ImageSpec};

/// The program name in messages.
pub const PROG: &str = "basalt-img";

/// Print `basalt-img: MSG` to stderr.
pub fn error(msg: impl Display) {
    eprintln!("{PROG}: {msg}");
}

/// Print a warning as qemu-img's `warn_report` does.
pub fn warn(msg: impl Display) {
    eprintln!("{PROG}: warning: {msg}");
}

/// Print a usage error with qemu-img's hint line; returns exit code 1.
pub fn usage_error(cmd: &str, msg: impl Display) -> i32 {
    eprintln!("{PROG}: {msg}\nTry '{PROG} {cmd} --help' for more info");
    1
}

/// Parse a subcommand's options. `Err(code)` when the caller must exit with `code`: after a
/// getopt error (printed as `basalt-img CMD: invalid option -- 'z'`) or after printing `help`
/// for `-h`/`--help`.
pub fn parse_args(cmd: &str, help: &str, args: &[String], specs: &[OptSpec]) -> Result<Args, i32> {
    match getopt::parse(args, specs) {
        Err(e) => {
            eprintln!("{PROG} {cmd}: {e}\nTry '{PROG} {cmd} --help' for more info");
            Err(1)
        }
        Ok(a) if a.has("help") => {
            print!("{help}");
            Err(0)
        }
        Ok(a) => Ok(a),
    }
}

/// `--output`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// For people (the default).
    Human,
    /// QEMU's JSON.
    Json,
}

/// The `--output` option, or a usage error.
pub fn output_format(cmd: &str, args: &Args) -> Result<OutputFormat, i32> {
    match args.value("output") {
        None | Some("human") => Ok(OutputFormat::Human),
        Some("json") => Ok(OutputFormat::Json),
        Some(o) => Err(usage_error(cmd, format!("--output expects 'human' or 'json' not '{o}'"))),
    }
}

/// Validate `--object` definitions as qemu-img does at start-up: `secret` objects are parsed,
/// read and decoded now (so a bad one fails before anything is opened); other types are refused.
pub fn check_objects(args: &Args) -> Result<(), i32> {
    let secrets = basalt_engine::Secrets::new();
    for def in args.values("object") {
        if let Err(e) = secrets.add_object(def) {
            error(e.msg);
            return Err(1);
        }
    }
    Ok(())
}

/// A graph for a subcommand, holding the secrets of its `--object` options (checked by
/// [`check_objects`] first; a secret file that vanished since is missed, and reported by the
/// driver that looks it up).
pub fn graph(args: &Args) -> Graph {
    let graph = Graph::new(basalt_formats::registry());
    for def in args.values("object") {
        let _ = graph.add_object(def);
    }
    graph
}

/// `-T`: a source cache mode, checked as qemu-img checks it.
pub fn source_cache(args: &Args) -> Result<Option<String>, i32> {
    match args.value("cache") {
        None => Ok(None),
        Some(c) if image::parse_cache(c).is_ok() => Ok(Some(c.to_string())),
        Some(c) => {
            error(format!("Invalid source cache option: {c}"));
            Err(1)
        }
    }
}

/// The common image options of a subcommand: `-f`, `--image-opts`, `-U`.
pub fn spec_from_args(args: &Args, filename: &str, fmt_key: &str) -> ImageSpec {
    let mut spec = ImageSpec::new(filename);
    spec.fmt = args.value(fmt_key).map(str::to_string);
    spec.image_opts = args.has("image-opts");
    spec.force_share = args.has("force-share");
    spec
}

/// Open an image for a subcommand; the error is printed (as `basalt-img: Could not open ...`)
/// and `Err(())` returned. A raw image that was only probed and is opened read-write gets
/// qemu-img's warning, even with `-q`.
pub async fn open(graph: &Graph, spec: &ImageSpec) -> Result<Arc<dyn Node>, ()> {
    open_as(graph, spec, false).await
}

/// [`open`] for a user that does no I/O (`info`, QEMU's `BDRV_O_NO_IO`): it takes no
/// permissions, so an image whose holder denies reads can still be described.
pub async fn open_no_io(graph: &Graph, spec: &ImageSpec) -> Result<Arc<dyn Node>, ()> {
    open_as(graph, spec, true).await
}

async fn open_as(graph: &Graph, spec: &ImageSpec, no_io: bool) -> Result<Arc<dyn Node>, ()> {
    if spec.image_opts && spec.fmt.is_some() {
        error("--image-opts and --format are mutually exclusive");
        return Err(());
    }
    let opened = if no_io {
        let ctx = |e: basalt_engine::BlockError| e.context(format!("Could not open '{}'", spec.filename));
        match (image::spec_opts(graph, spec), image::spec_flags(spec)) {
            (Ok(opts), Ok((mut flags, _))) => {
                flags.perm = Perm::NONE;
                graph.open(opts, flags).await.map_err(ctx)
            }
            (Err(e), _) | (_, Err(e)) => Err(ctx(e)),
        }
    } else {
        image::open(graph, spec).await.map(|(n, _)| n)
    };
    match opened {
        Ok(node) => {
            if node.probed() && !node.read_only() {
                let name = node.children().first().map(|c| c.node.filename()).unwrap_or_else(|| spec.filename.clone());
                eprintln!(
                    "WARNING: Image format was not specified for '{name}' and probing guessed raw.\n         \
                     Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
                     Specify the 'raw' format explicitly to remove the restrictions."
                );
            }
            Ok(node)
        }
        Err(e) => {
            error(e.msg);
            Err(())
        }
    }
}

/// An image opened read-write with the resize permission.
pub fn resize_spec(mut spec: ImageSpec) -> ImageSpec {
    spec.read_only = false;
    spec.extra_perm = spec.extra_perm.with(Perm::RESIZE);
    spec
}

/// Why a number did not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NumError {
    /// Not a number of the accepted form.
    Invalid,
    /// Out of range (negative, or too large).
    Range,
}

fn suffix_mul(c: u8) -> Option<u64> {
    Some(match c {
        b'b' | b'B' => 1,
        b'k' | b'K' => 1 << 10,
        b'm' | b'M' => 1 << 20,
        b'g' | b'G' => 1 << 30,
        b't' | b'T' => 1 << 40,
        b'p' | b'P' => 1 << 50,
        b'e' | b'E' => 1 << 60,
        _ => return None,
    })
}

/// QEMU's `qemu_strtosz`: a decimal number with an optional fraction and an optional binary
/// suffix (`b k M G T P E`, either case), or a hexadecimal number without either. Leading
/// white space and `+` are allowed, nothing may follow; a fraction needs a suffix other than
/// `b`; the result is rounded to the nearest byte and must fit in 64 bits.
pub fn strtosz(s: &str) -> Result<u64, NumError> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']).as_bytes();
    let (neg, t) = match t.first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let digits = t.iter().take_while(|c| c.is_ascii_digit()).count();
    if neg && digits > 0 {
        return Err(NumError::Range);
    }
    if neg {
        return Err(NumError::Invalid);
    }
    // Hexadecimal: 0x..., no fraction, no suffix.
    if digits > 0 && t[..digits].iter().all(|&c| c == b'0') && matches!(t.get(digits), Some(b'x' | b'X')) {
        if digits != 1 {
            return Err(NumError::Invalid);
        }
        let h = &t[2..];
        if h.is_empty() || !h.iter().all(u8::is_ascii_hexdigit) {
            return Err(NumError::Invalid);
        }
        let hs = std::str::from_utf8(h).map_err(|_| NumError::Invalid)?;
        return u64::from_str_radix(hs, 16).map_err(|_| NumError::Range);
    }
    let int_s = std::str::from_utf8(&t[..digits]).map_err(|_| NumError::Invalid)?;
    let mut rest = &t[digits..];
    let mut fraction: Option<f64> = None;
    if rest.first() == Some(&b'.') {
        let fd = rest[1..].iter().take_while(|c| c.is_ascii_digit()).count();
        let fs = std::str::from_utf8(&rest[1..1 + fd]).map_err(|_| NumError::Invalid)?;
        fraction = Some(if fd == 0 { 0.0 } else { format!("0.{fs}").parse::<f64>().map_err(|_| NumError::Invalid)? });
        rest = &rest[1 + fd..];
    } else if digits == 0 {
        return Err(NumError::Invalid);
    }
    if digits == 0 && fraction.is_none() {
        return Err(NumError::Invalid);
    }
    let val: u64 = if digits == 0 { 0 } else { int_s.parse().map_err(|_| NumError::Range)? };
    let mul = match rest {
        [] => 1,
        [c] => suffix_mul(*c).ok_or(NumError::Invalid)?,
        _ => return Err(NumError::Invalid),
    };
    let frac = fraction.unwrap_or(0.0);
    if mul == 1 {
        if frac != 0.0 {
            return Err(NumError::Invalid);
        }
        return Ok(val);
    }
    // 64.64 fixed point, as QEMU computes it: exact, rounding half up.
    let (val, valf): (u128, u128) =
        if frac >= 1.0 { (u128::from(val) + 1, 0) } else { (u128::from(val), (frac * 18446744073709551616.0) as u128) };
    let m = u128::from(mul);
    let fp = valf * m;
    let total = val * m + (fp >> 64) + ((fp >> 63) & 1);
    u64::try_from(total).map_err(|_| NumError::Range)
}

/// QEMU's `qemu_strtoi64` with base 0: optional white space and sign, `0x` hex, leading-0
/// octal or decimal, nothing after.
pub fn strtoi64(s: &str) -> Result<i64, NumError> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, body) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (16, h)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if body.is_empty() || !body.chars().all(|c| c.is_digit(radix)) {
        return Err(NumError::Invalid);
    }
    let v = u128::from_str_radix(body, radix).map_err(|_| NumError::Range)?;
    let v = i128::try_from(v).map_err(|_| NumError::Range)?;
    let v = if neg { -v } else { v };
    i64::try_from(v).map_err(|_| NumError::Range)
}

/// qemu-img's `cvtnum_full`: a size (with suffixes) in `min..=max`, or its error message.
pub fn cvtnum_full(name: &str, s: &str, min: i64, max: i64) -> Result<i64, String> {
    let range = || format!("Invalid {name} specified. Must be between {min} and {max}.");
    match strtosz(s) {
        Err(NumError::Invalid) => Err(format!("Invalid {name} specified: '{s}'.")),
        Err(NumError::Range) => Err(range()),
        Ok(v) => match i64::try_from(v) {
            Ok(v) if (min..=max).contains(&v) => Ok(v),
            _ => Err(range()),
        },
    }
}

/// qemu-img's `cvtnum`: a size between 0 and `i64::MAX`.
pub fn cvtnum(name: &str, s: &str) -> Result<i64, String> {
    cvtnum_full(name, s, 0, i64::MAX)
}

/// A `size`-typed option value as QemuOpts parses it, or its error message.
pub fn opt_size(key: &str, v: &str) -> Result<u64, String> {
    match strtosz(v) {
        Ok(n) => Ok(n),
        Err(NumError::Range) => Err(format!("Value '{v}' is out of range for parameter '{key}'")),
        Err(NumError::Invalid) => Err(format!(
            "Parameter '{key}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
        )),
    }
}

/// QEMU's `-p` progress line: `    (12.34/100%)\r` on stdout whenever progress moved by more
/// than `min_skip` percent, with QEMU's single-precision arithmetic so the same steps print.
pub struct Progress {
    enabled: bool,
    current: f32,
    last_print: f32,
    min_skip: f32,
}

impl Progress {
    /// A progress line, printing only when `enabled`.
    pub fn new(enabled: bool, min_skip: f32) -> Progress {
        Progress { enabled, current: 0.0, last_print: 0.0, min_skip }
    }

    /// Advance by `delta` percent of `max` (QEMU's `qemu_progress_print`).
    pub fn print(&mut self, delta: f32, max: i32) {
        let mut current = if max == 0 { delta } else { self.current + delta / 100.0 * max as f32 };
        if current > 100.0 {
            current = 100.0;
        }
        self.current = current;
        if current > self.last_print + self.min_skip
            || current < self.last_print - self.min_skip
            || current == 0.0
            || current == 100.0
        {
            self.last_print = current;
            if self.enabled {
                print!("    ({current:3.2}/100%)\r");
                let _ = std::io::stdout().flush();
            }
        }
    }

    /// Advance by `done` bytes out of `total` (`((float) done / total) * 100`).
    pub fn advance(&mut self, done: u64, total: u64) {
        if total > 0 {
            self.print((done as f32 / total as f32) * 100.0, 100);
        }
    }

    /// End the line (QEMU's `qemu_progress_end`).
    pub fn end(&self) {
        if self.enabled {
            println!();
        }
    }
}

/// Block status of a range as qemu-img sees it: the top node's answer, or, where the top does
/// not define the content, the first image down the backing chain that does.
#[derive(Clone)]
pub struct ChainStatus {
    /// Bytes that share this status (> 0).
    pub len: u64,
    /// Reads come from stored data.
    pub data: bool,
    /// Reads return zeroes.
    pub zero: bool,
    /// Some image in the chain defines the content (QEMU's BDRV_BLOCK_ALLOCATED).
    pub allocated: bool,
    /// Host offset in `file`, when valid.
    pub offset: Option<u64>,
    /// The node holding the data at `offset`.
    pub file: Option<Arc<dyn Node>>,
    /// Compressed data.
    pub compressed: bool,
    /// How far down the chain the answer came from (0 = the top).
    pub depth: u32,
    /// The range reaches the end of the top image.
    pub eof: bool,
    /// Zeroes because a backing image ends before the range: QEMU's `block_status_above`
    /// (what compare asks) counts these as allocated, `map` does not.
    pub beyond_backing: bool,
}

impl ChainStatus {
    /// Allocated as QEMU's `bdrv_block_status_above` says (what compare asks): zeroes past the
    /// end of a backing image count as allocated there.
    pub fn allocated_above(&self) -> bool {
        self.allocated || self.beyond_backing
    }

    /// The status bits that `compare -s` compares.
    pub fn flags(&self) -> (bool, bool, bool, bool, bool, bool) {
        (self.data, self.zero, self.allocated_above(), self.offset.is_some(), self.compressed, self.eof)
    }
}

/// What the top image of a chain alone says of a range ([`Chain::top_status`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopStatus {
    /// The top stores data there.
    Data,
    /// The range reads as zeroes.
    Zero,
    /// The top defines nothing: the content comes from the backing chain.
    Backing,
}

/// Backends for an image and its backing chain, top first.
pub struct Chain {
    layers: Vec<Layer>,
}

struct Layer {
    be: Backend,
    /// The driver takes backing files (QEMU's `supports_backing`): where it defines nothing
    /// and has no backing image below, or the backing image is shorter, it reads as zeroes.
    supports_backing: bool,
}

/// Whether a node's driver takes backing files (it has a `backing_file` creation option).
pub fn supports_backing(node: &Arc<dyn Node>) -> bool {
    node.is_format()
        && basalt_formats::registry().get(node.driver()).is_some_and(|d| d.create_opts().iter().any(|o| o.name == "backing_file"))
}

impl Chain {
    /// The chain below `node` (each backing child in turn).
    pub fn new(node: Arc<dyn Node>) -> Result<Chain, String> {
        let mut layers = Vec::new();
        let mut cur = Some(node);
        while let Some(n) = cur {
            cur = n.children().into_iter().find(|c| c.role == ChildRole::Backing).map(|c| c.node);
            let supports_backing = supports_backing(&n);
            layers.push(Layer { be: Backend::new(n).map_err(|e| e.msg)?, supports_backing });
        }
        Ok(Chain { layers })
    }

    /// The top image's backend.
    pub fn top(&self) -> &Backend {
        &self.layers[0].be
    }

    /// Size of the top image.
    pub fn size(&self) -> u64 {
        self.top().size()
    }

    /// Status of `off..off+len` of the top image alone, as QEMU's `bdrv_block_status` answers
    /// it (what convert asks when the target has a backing file): zeroes where the top says so,
    /// or where a format that takes backing files defines nothing and has no backing image or
    /// the backing image ends before `off`; data where it stores data; else the content comes
    /// from the backing chain. Returns the length that shares the answer.
    pub async fn top_status(&self, off: u64, len: u64) -> Result<(u64, TopStatus), IoStatus> {
        let layer = &self.layers[0];
        let st = layer.be.block_status(off, len).await?;
        let kind = if st.zero {
            TopStatus::Zero
        } else if st.data {
            TopStatus::Data
        } else if !layer.supports_backing {
            // What a format without backing files does not define reads as its protocol
            // says; only formats with backing files leave content to another image.
            TopStatus::Data
        } else if self.layers.get(1).is_none_or(|b| off >= b.be.size()) {
            TopStatus::Zero
        } else {
            TopStatus::Backing
        };
        Ok((st.len, kind))
    }

    /// Status of `off..off+len` of the top image, looking down the chain where the top does
    /// not define the content, as qemu-img's map does (`get_block_status`): the first layer
    /// that reports data or zeroes answers; a layer of a format that takes backing files
    /// reads as zeroes (not allocated) where it has no backing image or the backing image
    /// ends before `off`, and then answers at its own depth.
    pub async fn status(&self, off: u64, len: u64) -> Result<ChainStatus, IoStatus> {
        let size = self.size();
        let mut len = len;
        let mut depth = 0;
        let mut zero = false;
        let mut beyond_backing = false;
        // Where the answering layer stores the range even though it defines nothing there
        // (an unallocated subcluster of an allocated cluster): QEMU reports that offset.
        let mut stored: (Option<u64>, Option<Arc<dyn Node>>) = (None, None);
        for (i, layer) in self.layers.iter().enumerate() {
            let be = &layer.be;
            depth = i as u32;
            if off >= be.size() {
                // Only a backing image can be short; its overlay answered already.
                break;
            }
            let st = be.block_status(off, len.min(be.size() - off)).await?;
            len = st.len;
            // A protocol node stores its data itself.
            let file = st.file.clone().or_else(|| st.offset.map(|_| be.node().clone()));
            if st.data || st.zero {
                return Ok(ChainStatus {
                    len,
                    data: st.data,
                    zero: st.zero,
                    allocated: st.allocated,
                    offset: st.offset,
                    file,
                    compressed: st.compressed,
                    depth,
                    eof: off + len >= size,
                    beyond_backing: false,
                });
            }
            if layer.supports_backing {
                let below = self.layers.get(i + 1);
                if below.is_none_or(|b| off >= b.be.size()) {
                    zero = true;
                    beyond_backing = below.is_some();
                    stored = (st.offset, file.filter(|_| st.offset.is_some()));
                    break;
                }
            }
        }
        Ok(ChainStatus {
            len,
            data: false,
            zero,
            allocated: false,
            offset: stored.0,
            file: stored.1,
            compressed: false,
            depth,
            eof: off + len >= size,
            beyond_backing,
        })
    }
}

/// Read `len` bytes at `off` into a new buffer.
pub async fn read(be: &Backend, off: u64, len: usize) -> Result<basalt_reactor::IoBuf, IoStatus> {
    let d = be.read(off, basalt_reactor::IoBuf::new_uninit(len)).await;
    d.res?;
    d.buf.ok_or(IoStatus::EIO)
}

/// Offset (a multiple of 512 from the start) of the first 512-byte block holding a non-zero
/// byte, as qemu-img's `find_nonzero`.
pub fn find_nonzero(buf: &[u8]) -> Option<usize> {
    buf.chunks(512).position(|c| c.iter().any(|&b| b != 0)).map(|i| i * 512)
}

/// Offset (a multiple of 512) of the first 512-byte block where `a` and `b` differ.
pub fn find_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        return None;
    }
    a.chunks(512).zip(b.chunks(512)).position(|(x, y)| x != y).map(|i| i * 512)
}

/// Which internal snapshot `-l` names: `snapshot.id=ID,snapshot.name=NAME` (either or both),
/// or an ID or name on its own.
pub enum SnapshotSel {
    /// `snapshot.id=ID,snapshot.name=NAME`: what is given must match.
    IdAndName(Option<String>, Option<String>),
    /// An ID, or else a name.
    IdOrName(String),
}

/// Parse `-l`'s value, with qemu-img's messages.
pub fn parse_snapshot(v: &str) -> Result<SnapshotSel, String> {
    if !v.starts_with("snapshot.") {
        return Ok(SnapshotSel::IdOrName(v.to_string()));
    }
    let fail = |m: String| format!("{m}\n{}: Failed in parsing snapshot param '{v}'", PROG);
    let (mut id, mut name) = (None, None);
    for part in v.split(',') {
        let (k, val) = part.split_once('=').ok_or_else(|| fail(format!("Invalid parameter '{part}'")))?;
        match k {
            "snapshot.id" => id = Some(val.to_string()),
            "snapshot.name" => name = Some(val.to_string()),
            _ => return Err(fail(format!("Invalid parameter '{k}'"))),
        }
    }
    Ok(SnapshotSel::IdAndName(id, name))
}

/// Make a read-only image read as the snapshot `-l` names (`bdrv_snapshot_load_tmp`), with
/// qemu-img's messages.
pub async fn load_snapshot(node: &Arc<dyn Node>, sel: &SnapshotSel) -> Result<(), String> {
    let Some(q) = node.as_any().downcast_ref::<basalt_formats::qcow2::Qcow2Node>() else {
        return Err(format!(
            "Failed to load snapshot: Block format '{}' used by device '' does not support temporarily loading internal snapshots",
            node.driver()
        ));
    };
    let r = match sel {
        SnapshotSel::IdAndName(id, name) => q.snapshot_load_tmp(id.as_deref(), name.as_deref()).await,
        SnapshotSel::IdOrName(v) => q.snapshot_load_tmp_by_id_or_name(v).await,
    };
    r.map_err(|e| format!("Failed to load snapshot: {}", e.msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strtosz_as_qemu() {
        let ok = |s: &str| strtosz(s).unwrap();
        assert_eq!(ok("1M"), 1 << 20);
        assert_eq!(ok("1m"), 1 << 20);
        assert_eq!(ok("1.k"), 1024);
        assert_eq!(ok(".5k"), 512);
        assert_eq!(ok("1.0"), 1);
        assert_eq!(ok("08"), 8);
        assert_eq!(ok("1.0001k"), 1024);
        assert_eq!(ok("0x100"), 256);
        assert_eq!(ok(" +1k"), 1024);
        assert_eq!(ok("1B"), 1);
        assert_eq!(ok("0.99E"), 1141392289560778496);
        assert_eq!(ok("7.99E"), 9211842821808707328);
        assert_eq!(ok("1.9999999999999999999k"), 2048);
        assert_eq!(ok("1.1G"), 1181116006);
        assert_eq!(ok("0.333T"), 366137372049);
        for bad in ["1.5b", "0x10k", "0x1.8k", "1M ", "1 M", "1kB", "1e3k", "0.5", "0x", "", "k", "1X", "1.5"] {
            assert_eq!(strtosz(bad), Err(NumError::Invalid), "{bad}");
        }
        for big in ["16E", "-1", "99999999999999999999"] {
            assert_eq!(strtosz(big), Err(NumError::Range), "{big}");
        }
        assert_eq!(strtosz("8E"), Ok(1 << 63));
    }

    #[test]
    fn strtoi64_base0() {
        assert_eq!(strtoi64("010"), Ok(8));
        assert_eq!(strtoi64("0x2"), Ok(2));
        assert_eq!(strtoi64(" 2"), Ok(2));
        assert_eq!(strtoi64("-1"), Ok(-1));
        assert_eq!(strtoi64("1k"), Err(NumError::Invalid));
        assert_eq!(strtoi64("99999999999999999999"), Err(NumError::Range));
    }

    #[test]
    fn cvtnum_messages() {
        assert_eq!(cvtnum("image size", "1X").unwrap_err(), "Invalid image size specified: '1X'.");
        assert_eq!(
            cvtnum("image size", "8E").unwrap_err(),
            "Invalid image size specified. Must be between 0 and 9223372036854775807."
        );
        assert_eq!(
            cvtnum_full("bs", "0", 1, i32::MAX.into()).unwrap_err(),
            "Invalid bs specified. Must be between 1 and 2147483647."
        );
    }

    #[test]
    fn buffers() {
        let mut a = vec![0u8; 2048];
        assert_eq!(find_nonzero(&a), None);
        a[1500] = 1;
        assert_eq!(find_nonzero(&a), Some(1024));
        let b = vec![0u8; 2048];
        assert_eq!(find_difference(&a, &b), Some(1024));
        assert_eq!(find_difference(&b, &b), None);
    }
}
