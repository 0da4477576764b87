//! `basalt-img info`: what an image is, in qemu-img's words.
//!
//! The image is opened read-only (`-U` shares it with writers). Human output and
//! `--output=json` follow qemu-img 10 byte for byte: the node's virtual size, filename, format,
//! host allocation ("disk size" / `actual-size`), the dirty flag where the driver reports one
//! (file-backed images; not null-co), `format-specific` for file protocol nodes, and each child
//! node in turn (`Child node '/file':`). `--backing-chain` lists the image and its backing
//! images, top first (a JSON array even for one image).

use std::sync::Arc;

use basalt_engine::{read_head, BlockResult, ChildRole, DriverKind, Graph, Node, Opts, Perm};
use basalt_formats::qcow2::Qcow2Node;
use serde_json::{json, Map, Value};

use super::common::{self, OutputFormat};
use crate::getopt::opt;
use crate::human::size_to_str;
use crate::image::{self, ImageSpec};

const HELP: &str = "Usage:
Display information about image.  Usage:

  basalt-img info [-f FMT | --image-opts] [-b] [-U] [--object OBJDEF]
        [--output human|json] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILENAME image format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -b, --backing-chain
     display information about backing chaing
  (in case the image is stacked
  -U, --force-share
     open image in shared mode for concurrent access
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  --output human|json
     specify output format name (default human)
  FILENAME
     image file name (or specification with --image-opts)

";

/// Whether the driver answers QEMU's `get_info` (which is what puts `dirty-flag` in the
/// output): file protocols do, null-co does not, raw forwards to its file.
fn has_get_info(node: &Arc<dyn Node>) -> bool {
    if node.driver() == "raw" {
        return node.children().iter().find(|c| c.role == ChildRole::File).is_some_and(|c| has_get_info(&c.node));
    }
    node.is_format() || matches!(node.driver(), "file" | "host_device")
}

/// Whether the image says it was not closed cleanly (qcow2's dirty bit, set by lazy refcounts).
fn is_dirty(node: &Arc<dyn Node>) -> bool {
    node.as_any().downcast_ref::<Qcow2Node>().is_some_and(|q| q.header().incompatible & 1 != 0)
}

/// `format-specific` data, where QEMU reports some.
fn format_specific(node: &Arc<dyn Node>) -> Option<Value> {
    if let Some(v) = node.format_specific() {
        return Some(qdict_reorder(v));
    }
    match node.driver() {
        "file" | "host_device" if !node.is_format() => Some(json!({"type": "file", "data": {}})),
        _ => None,
    }
}

/// The bucket QEMU's `QDict` puts `key` in (`tdb_hash` modulo 512). qemu-img prints a
/// dictionary bucket by bucket, so this decides the order of keys in its JSON.
fn qdict_bucket(key: &str) -> u32 {
    let mut v = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
    for (i, &c) in key.as_bytes().iter().enumerate() {
        v = v.wrapping_add(u32::from(c) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(v).wrapping_add(12345) % 512
}

/// A JSON object with its keys in the order QEMU's `QDict` iterates them, from `fields` in the
/// order QEMU inserts them (QAPI struct order): by bucket, and within a bucket the last
/// inserted first.
pub(crate) fn qdict(fields: Vec<(&str, Value)>) -> Value {
    let mut v: Vec<(usize, &str, Value)> = fields.into_iter().enumerate().map(|(i, (k, v))| (i, k, v)).collect();
    v.sort_by_key(|(i, k, _)| (qdict_bucket(k), std::cmp::Reverse(*i)));
    Value::Object(v.into_iter().map(|(_, k, v)| (k.to_string(), v)).collect::<Map<String, Value>>())
}

/// `v` with every object's keys in QDict order (its current order taken as insertion order).
fn qdict_reorder(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let fields: Vec<(String, Value)> = m.into_iter().map(|(k, v)| (k, qdict_reorder(v))).collect();
            qdict(fields.iter().map(|(k, v)| (k.as_str(), v.clone())).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(qdict_reorder).collect()),
        other => other,
    }
}

/// QEMU's `path_has_protocol`: a `:` before any `/`.
fn has_protocol(path: &str) -> bool {
    path.find([':', '/']).is_some_and(|i| path.as_bytes()[i] == b':')
}

/// The backing file name as QEMU resolves it against the image's own (`full-backing-filename`);
/// `None` when it cannot (a relative name under a `json:` filename).
fn full_backing_filename(node: &Arc<dyn Node>, backing: &str) -> Option<String> {
    if backing.is_empty() {
        return None;
    }
    if has_protocol(backing) || backing.starts_with('/') {
        return Some(backing.to_string());
    }
    // The directory of the protocol node under the format (QEMU's bdrv_dirname).
    let mut base = node.clone();
    while base.is_format() {
        match base.children().into_iter().find(|c| c.role == ChildRole::File) {
            Some(c) => base = c.node,
            None => break,
        }
    }
    let name = base.filename();
    if name.is_empty() || name.starts_with("json:") {
        return None;
    }
    Some(match name.rfind('/') {
        Some(i) => format!("{}{backing}", &name[..=i]),
        None => backing.to_string(),
    })
}

/// What the image records about its backing file: name, full name, format.
fn backing_fields(node: &Arc<dyn Node>) -> Option<(String, Option<String>, Option<String>)> {
    let (name, fmt) = node.backing_info()?;
    if name.is_empty() {
        return None;
    }
    let full = full_backing_filename(node, &name);
    Some((name, full, fmt.filter(|f| !f.is_empty())))
}

/// One node's information as QEMU's `BlockGraphInfo`, in QEMU's key order.
pub fn node_info(node: &Arc<dyn Node>) -> Value {
    let mut f: Vec<(&str, Value)> = vec![("filename", json!(node.filename())), ("format", json!(node.driver()))];
    if has_get_info(node) {
        f.push(("dirty-flag", json!(is_dirty(node))));
    }
    if let Some(a) = node.allocated_size() {
        f.push(("actual-size", json!(a)));
    }
    f.push(("virtual-size", json!(node.size())));
    if let Some(cs) = node.cluster_size() {
        f.push(("cluster-size", json!(cs)));
    }
    if node.encrypted() {
        f.push(("encrypted", json!(true)));
    }
    if let Some((name, full, fmt)) = backing_fields(node) {
        f.push(("backing-filename", json!(name)));
        if let Some(full) = full {
            f.push(("full-backing-filename", json!(full)));
        }
        if let Some(fmt) = fmt {
            f.push(("backing-filename-format", json!(fmt)));
        }
    }
    let snaps = node.snapshots();
    if !snaps.is_empty() {
        f.push(("snapshots", Value::Array(snaps.iter().map(super::snapshot::json).collect())));
    }
    if let Some(fs) = format_specific(node) {
        f.push(("format-specific", fs));
    }
    let children: Vec<Value> = node
        .children()
        .iter()
        .filter(|c| c.role != ChildRole::Backing)
        .map(|c| qdict(vec![("name", json!(c.role.name())), ("info", node_info(&c.node))]))
        .collect();
    f.push(("children", Value::Array(children)));
    qdict(f)
}

/// QEMU's `dump_qobject` for the `Format specific information:` block.
fn dump_qobject(out: &mut String, level: usize, v: &Value) {
    match v {
        Value::Object(m) => {
            for (k, val) in m {
                let composite = matches!(val, Value::Object(_) | Value::Array(_));
                out.push_str(&format!("{}{}:{}", " ".repeat(level * 4), k.replace('-', " "), if composite { '\n' } else { ' ' }));
                dump_qobject(out, level + 1, val);
            }
        }
        Value::Array(a) => {
            for (i, val) in a.iter().enumerate() {
                let composite = matches!(val, Value::Object(_) | Value::Array(_));
                out.push_str(&format!("{}[{i}]:{}", " ".repeat(level * 4), if composite { '\n' } else { ' ' }));
                dump_qobject(out, level + 1, val);
            }
        }
        Value::String(s) => {
            out.push_str(s);
            out.push('\n');
        }
        other => {
            out.push_str(&other.to_string());
            out.push('\n');
        }
    }
}

fn human_node(out: &mut String, node: &Arc<dyn Node>, level: usize, protocol: bool, path: &str) {
    let ind = " ".repeat(level * 4);
    let size = node.size();
    let disk = node.allocated_size().map(size_to_str).unwrap_or_else(|| "unavailable".to_string());
    if protocol {
        out.push_str(&format!("{ind}filename: {}\n", node.filename()));
        out.push_str(&format!("{ind}protocol type: {}\n", node.protocol_type().unwrap_or(node.driver())));
        out.push_str(&format!("{ind}file length: {} ({size} bytes)\n", size_to_str(size)));
    } else {
        out.push_str(&format!("{ind}image: {}\n", node.filename()));
        out.push_str(&format!("{ind}file format: {}\n", node.driver()));
        out.push_str(&format!("{ind}virtual size: {} ({size} bytes)\n", size_to_str(size)));
    }
    out.push_str(&format!("{ind}disk size: {disk}\n"));
    if node.encrypted() {
        out.push_str(&format!("{ind}encrypted: yes\n"));
    }
    if let Some(cs) = node.cluster_size() {
        out.push_str(&format!("{ind}cluster_size: {cs}\n"));
    }
    if has_get_info(node) && is_dirty(node) {
        out.push_str(&format!("{ind}cleanly shut down: no\n"));
    }
    if let Some((name, full, fmt)) = backing_fields(node) {
        out.push_str(&format!("{ind}backing file: {name}"));
        match full {
            None => out.push_str(" (cannot determine actual path)"),
            Some(f) if f != name => out.push_str(&format!(" (actual path: {f})")),
            Some(_) => {}
        }
        out.push('\n');
        if let Some(fmt) = fmt {
            out.push_str(&format!("{ind}backing file format: {fmt}\n"));
        }
    }
    let snaps = node.snapshots();
    if !snaps.is_empty() {
        out.push_str(&format!("{ind}Snapshot list:\n{ind}{}\n", super::snapshot::header_line()));
        for sn in &snaps {
            out.push_str(&format!("{ind}{}\n", super::snapshot::line(sn)));
        }
    }
    if let Some(data) = format_specific(node).as_ref().and_then(|v| v.get("data")) {
        if data.as_object().is_some_and(|m| !m.is_empty()) {
            out.push_str(&format!("{ind}Format specific information:\n"));
            dump_qobject(out, level + 1, data);
        }
    }
    for c in node.children().iter().filter(|c| c.role != ChildRole::Backing) {
        let child_path = format!("{path}/{}", c.role.name());
        out.push_str(&format!("{ind}Child node '{child_path}':\n"));
        human_node(out, &c.node, level + 1, !c.node.is_format(), &child_path);
    }
}

/// The images `info` describes: the one named and, with `--backing-chain`, each backing file
/// in turn, each opened on its own without its backing file (QEMU's `BDRV_O_NO_BACKING`), by the
/// name and format its overlay records. A name seen twice is a loop, refused as qemu-img does.
async fn collect_chain(graph: &Graph, mut spec: ImageSpec, chain: bool) -> Result<Vec<Arc<dyn Node>>, String> {
    spec.read_only = true;
    let mut seen: Vec<String> = Vec::new();
    let mut nodes = Vec::new();
    loop {
        if seen.contains(&spec.filename) {
            return Err(format!("Backing file '{}' creates an infinite loop.", spec.filename));
        }
        seen.push(spec.filename.clone());
        let node = open_info(graph, &spec).await.map_err(|e| e.context(format!("Could not open '{}'", spec.filename)).msg)?;
        let next = backing_fields(&node);
        nodes.push(node);
        let Some((name, full, fmt)) = next.filter(|_| chain) else {
            return Ok(nodes);
        };
        let Some(full) = full else {
            return Err(format!("Could not determine absolute backing filename, but backing filename '{name}' present"));
        };
        spec.filename = full;
        spec.image_opts = false;
        if fmt.is_some() {
            spec.fmt = fmt;
        }
    }
}

/// Open an image as qemu-img's `info` does: read-only, taking no permission of its own
/// (`BDRV_O_NO_IO`: a format still keeps others from writing its file, as QEMU's formats do),
/// and without its backing file. The format is probed first on a throwaway protocol node that
/// takes no locks, so that the format then opens its file with its own permissions.
async fn open_info(graph: &Graph, spec: &ImageSpec) -> BlockResult<Arc<dyn Node>> {
    let mut opts = image::spec_opts(graph, spec)?;
    let (mut flags, _) = image::spec_flags(spec)?;
    flags.perm = Perm::NONE;
    let driver = match opts.get_str("driver") {
        Some(d) => d,
        None => {
            let mut probe_flags = flags.clone();
            probe_flags.shared = Perm::ALL;
            let file_given = opts.contains("file") || opts.has_sub("file");
            let mut fmt_opts = Opts::new();
            let proto = if file_given {
                let mut o = opts.clone();
                let p = graph.open_child(&mut o, ChildRole::File, probe_flags).await?;
                fmt_opts = opts.clone();
                p
            } else {
                let mut proto_opts = opts.clone();
                for k in ["node-name", "read-only"] {
                    if let Some(v) = proto_opts.take_str(k) {
                        fmt_opts.set(k, v);
                    }
                }
                let p = graph.open_protocol(proto_opts.clone(), probe_flags).await?;
                fmt_opts.insert_sub("file", proto_opts);
                p
            };
            let head = read_head(&proto).await;
            let drv = head.and_then(|h| graph.registry().probe(&h, &proto.filename()));
            graph.remove(proto.node_name());
            drop(proto);
            let drv = drv?;
            if drv.kind() != DriverKind::Format {
                return graph.open(opts, flags).await;
            }
            flags.probed = drv.name() == "raw";
            opts = fmt_opts;
            drv.name().to_string()
        }
    };
    let supports_backing =
        graph.registry().get(&driver).is_some_and(|d| d.create_opts().iter().any(|o| o.name == "backing_file"));
    if supports_backing && !opts.contains("backing") && !opts.has_sub("backing") {
        opts.set("backing", "");
    }
    opts.set("driver", driver);
    graph.open(opts, flags).await
}

/// Run the subcommand.
pub async fn main(args: Vec<String>) -> i32 {
    let specs = [
        opt(Some('h'), Some("help"), false),
        opt(Some('f'), Some("format"), true),
        opt(None, Some("image-opts"), false),
        opt(Some('b'), Some("backing-chain"), false),
        opt(Some('U'), Some("force-share"), false),
        opt(None, Some("object"), true),
        opt(None, Some("output"), true),
    ];
    let a = match common::parse_args("info", HELP, &args, &specs) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let ofmt = match common::output_format("info", &a) {
        Ok(f) => f,
        Err(code) => return code,
    };
    if a.operands.len() != 1 {
        return common::usage_error("info", "Expecting one image file name");
    }
    if let Err(code) = common::check_objects(&a) {
        return code;
    }
    let spec = common::spec_from_args(&a, &a.operands[0], "format");
    if spec.image_opts && spec.fmt.is_some() {
        common::error("--image-opts and --format are mutually exclusive");
        return 1;
    }
    let graph = crate::img::common::graph(&a);
    let chain = match collect_chain(&graph, spec, a.has("backing-chain")).await {
        Ok(c) => c,
        Err(e) => {
            common::error(e);
            return 1;
        }
    };
    let mut out = String::new();
    match ofmt {
        OutputFormat::Json => {
            let infos: Vec<Value> = chain.iter().map(node_info).collect();
            let v = if a.has("backing-chain") { Value::Array(infos) } else { infos.into_iter().next().unwrap_or(Value::Null) };
            out.push_str(&crate::qjson::pretty(&v));
            out.push('\n');
        }
        OutputFormat::Human => {
            for (i, n) in chain.iter().enumerate() {
                if i > 0 {
                    out.push('\n');
                }
                human_node(&mut out, n, 0, false, "");
            }
        }
    }
    print!("{out}");
    0
}
