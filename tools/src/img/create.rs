//! `basalt-img create`: make a new image, as qemu-img does.
//!
//! `-o` options are checked against the format's creation options followed by the protocol's
//! (raw passes everything but `size` through to the protocol, as QEMU's raw has only `size`),
//! with QemuOpts' typing and messages; `-o help` lists them. The `Formatting '...'` line shows
//! the options that are set, in list order, sizes normalised. Backing files are refused for
//! formats without a `backing_file` option, with qemu-img's wording. The image itself is made
//! by [`Graph::create`].

use basalt_engine::{BlockDriver, CreateOptDesc, Graph, Opts};

use super::common;
use crate::getopt::opt;
use crate::image::ImageSpec;

const HELP: &str = "Usage:
Create and format new image file.  Usage:

  basalt-img create [-f FMT] [-o FMT_OPTS] [-b BACKING_FILENAME [-F BACKING_FMT]]
        [--object OBJDEF] [-u] FILENAME [SIZE[bkKMGTPE]]

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operations
  -f, --format FMT
     specifies format of the new image, default is raw
  -o, --options FMT_OPTS
     format-specific options ('-o list' for list)
  -b, --backing BACKING_FILENAME
     stack new image on top of BACKING_FILENAME
     (for formats which support stacking)
  -F, --backing-format BACKING_FMT
     specify format of BACKING_FILENAME
  -u, --backing-unsafe
     do not fail if BACKING_FMT can not be read
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     image file to create.  It will be overridden if exists
  SIZE
     image size with optional suffix (multiplies in 1024)
     SIZE is required unless BACKING_IMG is specified,
     in which case it will be the same as size of BACKING_IMG

";

/// Defaults QEMU declares (`def_value_str`), which the `Formatting` line prints when unset.
fn default_value(fmt: &str, name: &str) -> Option<&'static str> {
    match (fmt, name) {
        ("qcow2", "cluster_size") => Some("65536"),
        ("qcow2", "extended_l2") => Some("off"),
        ("qcow2", "compression_type") => Some("zlib"),
        ("qcow2", "lazy_refcounts") => Some("off"),
        ("qcow2", "refcount_bits") => Some("16"),
        _ => None,
    }
}

/// A format's own creation options. QEMU's raw declares only `size` and leaves the rest
/// (preallocation...) to the protocol, which decides what help lists and the print order.
fn format_opts(drv: &dyn BlockDriver) -> Vec<CreateOptDesc> {
    let all = drv.create_opts().to_vec();
    match drv.name() {
        "raw" => all.into_iter().filter(|d| d.name == "size").collect(),
        _ => all,
    }
}

/// The format's options followed by the protocol's that it does not already have.
fn merged(fmt: &dyn BlockDriver, proto: Option<&dyn BlockDriver>) -> Vec<CreateOptDesc> {
    let mut v = format_opts(fmt);
    if let Some(p) = proto {
        for d in p.create_opts() {
            if !v.iter().any(|x| x.name == d.name) {
                v.push(*d);
            }
        }
    }
    v
}

/// The protocol a new image's filename selects.
fn protocol_for(graph: &Graph, filename: &str) -> Result<&'static dyn BlockDriver, String> {
    let reg = graph.registry();
    if let Some(p) = reg.protocol_for(filename) {
        return Ok(p);
    }
    if let Some((p, _)) = filename.split_once("://") {
        return Err(format!("Unknown protocol '{p}'"));
    }
    reg.get("file").ok_or_else(|| "Unknown protocol 'file'".to_string())
}

fn type_name(kind: &str) -> &str {
    match kind {
        "bool" => "bool (on/off)",
        "number" | "num" => "num",
        k => k,
    }
}

/// qemu-img's `-o help` listing (sorted by name).
pub(crate) fn print_help(list: &[CreateOptDesc]) {
    let mut l = list.to_vec();
    l.sort_by_key(|d| d.name);
    for d in l {
        let mut s = format!("  {}=<{}>", d.name, type_name(d.kind));
        if s.len() < 24 {
            s.push_str(&" ".repeat(24 - s.len()));
        }
        println!("{s} - {}", d.help);
    }
}

/// QEMU's `is_valid_option_list`: not empty, no leading comma, no unescaped trailing comma.
pub(crate) fn valid_option_list(s: &str) -> bool {
    if s.is_empty() || s.starts_with(',') {
        return false;
    }
    let trailing = s.len() - s.trim_end_matches(',').len();
    trailing & 1 == 0
}

/// Split a QemuOpts list at commas (`,,` is a literal comma).
pub(crate) fn split_list(s: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == ',' {
            if it.peek() == Some(&',') {
                it.next();
                if let Some(p) = parts.last_mut() {
                    p.push(',');
                }
            } else {
                parts.push(String::new());
            }
        } else if let Some(p) = parts.last_mut() {
            p.push(c);
        }
    }
    parts.retain(|p| !p.is_empty());
    parts
}

fn has_help(elems: &[String]) -> bool {
    elems.iter().any(|e| e == "help" || e == "?")
}

/// One set option: the text as given and the value handed to the driver.
struct SetOpt {
    name: &'static str,
    shown: String,
    value: String,
}

/// Check `elems` against `list` as QemuOpts does; later settings win.
/// Whether `v` is one of QEMU's spellings of a boolean.
fn parse_bool_text(v: &str) -> Option<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

fn parse_opts(elems: &[String], list: &[CreateOptDesc]) -> Result<Vec<SetOpt>, String> {
    let mut set: Vec<SetOpt> = Vec::new();
    for e in elems {
        let (k, v) = match e.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match e.strip_prefix("no") {
                Some(k) if list.iter().any(|d| d.name == k) => (k.to_string(), "off".to_string()),
                _ => (e.clone(), "on".to_string()),
            },
        };
        let Some(d) = list.iter().find(|d| d.name == k) else {
            return Err(format!("Invalid parameter '{k}'"));
        };
        let (shown, value) = match d.kind {
            "size" => {
                let n = common::opt_size(d.name, &v)?;
                ((n as i64).to_string(), n.to_string())
            }
            // qcow2 reads the deprecated `encryption` as text: only "on" and "off" mean what
            // they say (QEMU then takes any other value as an encryption format and refuses it).
            "bool" if d.name == "encryption" && parse_bool_text(&v).is_some() => (v.clone(), v.clone()),
            "bool" => match v.as_str() {
                "on" | "yes" | "true" | "y" => (v.clone(), "on".to_string()),
                "off" | "no" | "false" | "n" => (v.clone(), "off".to_string()),
                _ => return Err(format!("Parameter '{}' expects 'on' or 'off'", d.name)),
            },
            "number" | "num" => match common::strtoi64(&v) {
                Ok(n) if n >= 0 => (n.to_string(), n.to_string()),
                _ => return Err(format!("Parameter '{}' expects a number", d.name)),
            },
            _ => (v.clone(), v.clone()),
        };
        set.retain(|s| s.name != d.name);
        set.push(SetOpt { name: d.name, shown, value });
    }
    Ok(set)
}

/// Run the subcommand.
pub async fn main(args: Vec<String>) -> i32 {
    let specs = [
        opt(Some('h'), Some("help"), false),
        opt(Some('q'), Some("quiet"), false),
        opt(Some('f'), Some("format"), true),
        opt(Some('o'), Some("options"), true),
        opt(Some('b'), Some("backing"), true),
        opt(Some('F'), Some("backing-format"), true),
        opt(Some('u'), Some("backing-unsafe"), false),
        opt(None, Some("object"), true),
    ];
    let a = match common::parse_args("create", HELP, &args, &specs) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let mut options = String::new();
    for o in a.values("options") {
        if !valid_option_list(o) {
            common::error(format!("Invalid option list: {o}"));
            return 1;
        }
        if !options.is_empty() {
            options.push(',');
        }
        options.push_str(o);
    }
    let elems = split_list(&options);
    let fmt = a.value("format").unwrap_or("raw").to_string();
    let graph = crate::img::common::graph(&a);
    if has_help(&elems) {
        return option_help(&graph, &fmt, a.operands.first().map(String::as_str));
    }
    if let Err(code) = common::check_objects(&a) {
        return code;
    }
    let Some(filename) = a.operands.first().cloned() else {
        return common::usage_error("create", "Expecting image file name");
    };
    let mut size = None;
    if let Some(s) = a.operands.get(1) {
        match common::cvtnum("image size", s) {
            Ok(n) => size = Some(n as u64),
            Err(e) => {
                common::error(e);
                return 1;
            }
        }
    }
    if let Some(extra) = a.operands.get(2) {
        return common::usage_error("create", format!("Unexpected argument: {extra}"));
    }
    let req = Request {
        filename,
        fmt,
        elems,
        size,
        backing: a.value("backing").map(str::to_string),
        backing_fmt: a.value("backing-format").map(str::to_string),
        backing_unsafe: a.has("backing-unsafe"),
        quiet: a.has("quiet"),
    };
    match img_create(&graph, &req).await {
        Ok(()) => 0,
        Err(e) => {
            common::error(format!("{}: {e}", req.filename));
            1
        }
    }
}

/// `-o help`: the options of the format, and of the protocol when a filename is given.
fn option_help(graph: &Graph, fmt: &str, filename: Option<&str>) -> i32 {
    let Some(drv) = graph.registry().get(fmt) else {
        common::error(format!("Unknown file format '{fmt}'"));
        return 1;
    };
    if drv.create_opts().is_empty() {
        common::error(format!("Format driver '{fmt}' does not support image creation"));
        return 1;
    }
    let proto = match filename.map(|f| protocol_for(graph, f)).transpose() {
        Ok(p) => p,
        Err(e) => {
            common::error(e);
            return 1;
        }
    };
    if let Some(p) = proto {
        if p.create_opts().is_empty() {
            common::error(format!("Protocol driver '{}' does not support image creation", p.name()));
            return 1;
        }
    }
    let list = merged(drv, proto);
    if proto.is_some() {
        println!("Supported options:");
    } else {
        println!("Supported {fmt} options:");
    }
    print_help(&list);
    if proto.is_none() {
        println!("\nThe protocol level may support further options.\nSpecify the target filename to include those options.");
    }
    0
}

struct Request {
    filename: String,
    fmt: String,
    elems: Vec<String>,
    size: Option<u64>,
    backing: Option<String>,
    backing_fmt: Option<String>,
    backing_unsafe: bool,
    quiet: bool,
}

/// qemu's `bdrv_img_create`; errors are reported prefixed with the filename.
async fn img_create(graph: &Graph, r: &Request) -> Result<(), String> {
    let drv = graph.registry().get(&r.fmt).ok_or_else(|| format!("Unknown file format '{}'", r.fmt))?;
    if drv.create_opts().is_empty() {
        return Err(format!("Format driver '{}' does not support image creation", r.fmt));
    }
    let proto = protocol_for(graph, &r.filename)?;
    if proto.create_opts().is_empty() {
        return Err(format!("Protocol driver '{}' does not support image creation", proto.name()));
    }
    let list = merged(drv, Some(proto));
    let mut set = parse_opts(&r.elems, &list)?;
    if let Some(n) = r.size {
        if set.iter().any(|s| s.name == "size") {
            return Err("The image size must be specified only once".to_string());
        }
        set.push(SetOpt { name: "size", shown: (n as i64).to_string(), value: n.to_string() });
    }
    let has = |name: &str| list.iter().any(|d| d.name == name);
    if let Some(b) = &r.backing {
        if !has("backing_file") {
            return Err(format!("Backing file not supported for file format '{}'", r.fmt));
        }
        set.retain(|s| s.name != "backing_file");
        set.push(SetOpt { name: "backing_file", shown: b.clone(), value: b.clone() });
    }
    if let Some(bf) = &r.backing_fmt {
        if !has("backing_fmt") {
            return Err(format!("Backing file format not supported for file format '{}'", r.fmt));
        }
        set.retain(|s| s.name != "backing_fmt");
        set.push(SetOpt { name: "backing_fmt", shown: bf.clone(), value: bf.clone() });
    }
    let backing = set.iter().find(|s| s.name == "backing_file").map(|s| s.value.clone());
    let backing_fmt = set.iter().find(|s| s.name == "backing_fmt").map(|s| s.value.clone());
    if let Some(b) = &backing {
        if *b == r.filename {
            return Err("Error: Trying to create an image with the same filename as the backing file".to_string());
        }
        if b.is_empty() {
            return Err("Expected backing file name, got empty string".to_string());
        }
    }
    match &backing {
        Some(b) if !r.backing_unsafe => {
            // The backing file must open (by its name relative to the new image), and its
            // format must be given; the new image takes its size when none is given.
            let full = full_backing_filename(&r.filename, b)?;
            let node = open_backing(graph, &full, backing_fmt.as_deref())
                .await
                .map_err(|e| format!("{e}\nCould not open backing image."))?;
            if backing_fmt.is_none() {
                return Err(format!("Backing file specified without backing format\nDetected format of {}.", node.driver()));
            }
            if !set.iter().any(|s| s.name == "size") {
                let size = node.size();
                set.push(SetOpt { name: "size", shown: (size as i64).to_string(), value: size.to_string() });
            }
        }
        Some(_) if backing_fmt.is_none() => return Err("Backing file specified without backing format".to_string()),
        _ => {}
    }
    if !set.iter().any(|s| s.name == "size") {
        return Err("Image creation needs a size parameter".to_string());
    }
    let size: u64 = set.iter().find(|s| s.name == "size").and_then(|s| s.value.parse().ok()).unwrap_or(0);
    if !r.quiet {
        let mut line = format!("Formatting '{}', fmt={}", r.filename, r.fmt);
        for d in &list {
            if let Some(s) = set.iter().find(|s| s.name == d.name) {
                line.push_str(&format!(" {}={}", s.name, s.shown));
            } else if let Some(v) = default_value(&r.fmt, d.name) {
                line.push_str(&format!(" {}={v}", d.name));
            }
        }
        println!("{line}");
    }
    let mut opts = Opts::new();
    for s in set.iter().filter(|s| s.name != "size") {
        opts.set(s.name, s.value.clone());
    }
    graph.create(&r.fmt, &r.filename, size, opts).await.map_err(|e| {
        if e.errno == Some(libc::EFBIG) {
            format!("The image size is too large for file format '{}'", r.fmt)
        } else {
            e.msg
        }
    })
}

/// QEMU's `bdrv_get_full_backing_filename_from_filename`: a relative backing file name is
/// taken relative to the directory of the image that names it.
fn full_backing_filename(image: &str, backing: &str) -> Result<String, String> {
    let has_protocol = backing.find([':', '/']).is_some_and(|i| backing.as_bytes()[i] == b':');
    if has_protocol || backing.starts_with('/') {
        return Ok(backing.to_string());
    }
    if image.is_empty() || image.starts_with("json:") {
        return Err(format!("Cannot use relative backing file names for '{image}'"));
    }
    Ok(match image.rfind('/') {
        Some(i) => format!("{}{backing}", &image[..=i]),
        None => backing.to_string(),
    })
}

/// Open the backing file of an image being created: read-only, sharing everything, with its
/// own backing chain, as QEMU checks it.
async fn open_backing(graph: &Graph, name: &str, fmt: Option<&str>) -> Result<std::sync::Arc<dyn basalt_engine::Node>, String> {
    let mut spec = ImageSpec::new(name);
    spec.fmt = fmt.map(str::to_string);
    spec.read_only = true;
    spec.force_share = true;
    // The file driver's error already names the file, as QEMU's does: no second prefix.
    let opts = crate::image::spec_opts(graph, &spec).map_err(|e| e.msg)?;
    let (mut flags, _) = crate::image::spec_flags(&spec).map_err(|e| e.msg)?;
    // As QEMU (BDRV_O_NO_IO): only its size and format are needed, so an encrypted backing
    // file opens without its key.
    flags.perm = basalt_engine::Perm::NONE;
    graph.open(opts, flags).await.map_err(|e| e.msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_lists() {
        assert!(valid_option_list("size=1M"));
        assert!(!valid_option_list(",size=1M"));
        assert!(!valid_option_list("size=1M,"));
        assert!(valid_option_list("a=b,,"));
        assert!(!valid_option_list(""));
        assert_eq!(split_list("a=1,b=x,,y,,c,d=2"), vec!["a=1", "b=x,y,c", "d=2"]);
    }

    #[test]
    fn typed_values() {
        let list = basalt_formats::registry().get("file").map(|d| d.create_opts().to_vec()).unwrap_or_default();
        let e = |v: &[&str]| parse_opts(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &list).err().unwrap_or_default();
        assert_eq!(e(&["bogus=1"]), "Invalid parameter 'bogus'");
        assert_eq!(e(&["nocow=maybe"]), "Parameter 'nocow' expects 'on' or 'off'");
        assert!(e(&["size"]).starts_with("Parameter 'size' expects a non-negative number below 2^64"));
        assert_eq!(e(&["size=16E"]), "Value '16E' is out of range for parameter 'size'");
        assert_eq!(e(&["=1"]), "Invalid parameter ''");
        let ok = parse_opts(&["extent_size_hint=1M".to_string(), "nocow=yes".to_string()], &list).unwrap_or_default();
        assert_eq!(
            ok.iter().map(|s| (s.name, s.shown.as_str(), s.value.as_str())).collect::<Vec<_>>(),
            vec![("extent_size_hint", "1048576", "1048576"), ("nocow", "yes", "on")]
        );
    }
}
