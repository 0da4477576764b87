//! `basalt-img info`: what an image is, in qemu-img's words.
//!
//! The image is opened read-only (`-U` shares it with writers). Human output and
//! `--output=json` follow qemu-img 10 byte for byte: the node's virtual size, filename, format,
//! host allocation ("disk size" / `actual-size`), the dirty flag where the driver reports one
//! (file-backed images; not null-co), `format-specific` for file protocol nodes, and each child
//! node in turn (`Child node '/file':`). `--backing-chain` lists the image and its backing
//! images, top first (a JSON array even for one image).

use std::sync::Arc;

use basalt_engine::{ChildRole, Graph, Node};
use serde_json::{json, Map, Value};

use super::common::{self, OutputFormat};
use crate::getopt::opt;
use crate::human::size_to_str;

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

/// `format-specific` data, where QEMU reports some.
fn format_specific(node: &Arc<dyn Node>) -> Option<Value> {
    match node.driver() {
        "file" | "host_device" if !node.is_format() => Some(json!({"type": "file", "data": {}})),
        _ => None,
    }
}

/// One node's information as QEMU's `BlockGraphInfo`, in QEMU's key order.
pub fn node_info(node: &Arc<dyn Node>) -> Value {
    let mut m = Map::new();
    let children: Vec<Value> = node
        .children()
        .iter()
        .filter(|c| c.role != ChildRole::Backing)
        .map(|c| json!({"name": c.role.name(), "info": node_info(&c.node)}))
        .collect();
    m.insert("children".into(), Value::Array(children));
    m.insert("virtual-size".into(), json!(node.size()));
    m.insert("filename".into(), json!(node.filename()));
    m.insert("format".into(), json!(node.driver()));
    if let Some(a) = node.allocated_size() {
        m.insert("actual-size".into(), json!(a));
    }
    if let Some(fs) = format_specific(node) {
        m.insert("format-specific".into(), fs);
    }
    if has_get_info(node) {
        m.insert("dirty-flag".into(), json!(false));
    }
    Value::Object(m)
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
    if let Some(b) = backing(node) {
        out.push_str(&format!("{ind}backing file: {}\n", b.filename()));
    }
    for c in node.children().iter().filter(|c| c.role != ChildRole::Backing) {
        let child_path = format!("{path}/{}", c.role.name());
        out.push_str(&format!("{ind}Child node '{child_path}':\n"));
        human_node(out, &c.node, level + 1, !c.node.is_format(), &child_path);
    }
}

fn backing(node: &Arc<dyn Node>) -> Option<Arc<dyn Node>> {
    node.children().into_iter().find(|c| c.role == ChildRole::Backing).map(|c| c.node)
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
    let mut spec = common::spec_from_args(&a, &a.operands[0], "format");
    spec.read_only = true;
    let graph = Graph::new(basalt_formats::registry());
    let Ok(node) = common::open_no_io(&graph, &spec).await else {
        return 1;
    };
    let mut chain = vec![node.clone()];
    if a.has("backing-chain") {
        while let Some(b) = backing(chain.last().unwrap_or(&node)) {
            chain.push(b);
        }
    }
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
