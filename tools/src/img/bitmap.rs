//! `basalt-img bitmap`: change the persistent dirty bitmaps of an image as qemu-img bitmap
//! does: `--add [-g SIZE] [--disable]`, `--remove`, `--clear`, `--enable`, `--disable`,
//! `--merge SOURCE [-b FILE [-F FMT]]`, applied in the order given, then stored when the image
//! is closed.

use basalt_engine::Node;
use basalt_formats::qcow2::Qcow2Node;

use super::common;
use crate::getopt::opt;
use crate::image::ImageSpec;

const HELP: &str = "Usage:
Perform modifications of the persistent bitmap in the image.  Usage:

  basalt-img bitmap ( --merge SOURCE | --add | --remove | --clear |
                --enable | --disable ).. [-f FMT | --image-opts]
        [ -b SRC_FILENAME [-F SOURCE_FMT]] [-g SIZE[KMGTPE]] [--object OBJDEF]
        FILENAME BITMAP

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  --add
     creates BITMAP, enables to record future edits
   -g, --granularity SIZE[KMGTPE]
     sets non-default bitmap granularity for --add to this size
  --remove
     removes BITMAP
  --clear
     clears BITMAP
  --enable, --disable
     starts and stops recording future edits to BITMAP
  --merge SRC_FILENAME
     merges contents of SRC_FILENAME bitmap into BITMAP
   -b, --source-file SRC_FILENAME
     select alternative source file for --merge
   -F, --source-format SRC_FMT
     specify format of SRC_FILENAME explicitly
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     name of the image file to operate on
  BITMAP
     name of the bitmap to add, remove, clear, enable, disable or merge to

";

const ACTIONS: &[&str] = &["add", "remove", "clear", "enable", "disable", "merge"];

/// Run the subcommand.
pub async fn main(args: Vec<String>) -> i32 {
    let specs = [
        opt(Some('h'), Some("help"), false),
        opt(Some('f'), Some("format"), true),
        opt(None, Some("image-opts"), false),
        opt(None, Some("object"), true),
        opt(Some('g'), Some("granularity"), true),
        opt(Some('b'), Some("source-file"), true),
        opt(Some('F'), Some("source-format"), true),
        opt(None, Some("add"), false),
        opt(None, Some("remove"), false),
        opt(None, Some("clear"), false),
        opt(None, Some("enable"), false),
        opt(None, Some("disable"), false),
        opt(None, Some("merge"), true),
    ];
    let a = match common::parse_args("bitmap", HELP, &args, &specs) {
        Ok(a) => a,
        Err(code) => return code,
    };
    if let Err(code) = common::check_objects(&a) {
        return code;
    }
    let actions: Vec<(String, Option<String>)> =
        a.opts.iter().filter(|p| ACTIONS.contains(&p.name.as_str())).map(|p| (p.name.clone(), p.value.clone())).collect();
    if actions.is_empty() {
        common::error("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
        return 1;
    }
    let add = actions.iter().any(|(n, _)| n == "add");
    let merge = actions.iter().any(|(n, _)| n == "merge");
    let granularity = match a.value("granularity") {
        Some(_) if !add => {
            common::error("granularity only supported with --add");
            return 1;
        }
        Some(g) => match common::cvtnum("granularity", g) {
            Ok(v) => Some(v as u64),
            Err(_) => {
                common::error(format!("Invalid granularity specified: '{g}'."));
                return 1;
            }
        },
        None => None,
    };
    if a.value("source-file").is_some() && !merge {
        common::error("Merge bitmap source file only supported with --merge");
        return 1;
    }
    if a.value("source-format").is_some() && a.value("source-file").is_none() {
        common::error("--source-format (-F) requires --source-file (-b)");
        return 1;
    }
    if a.operands.len() != 2 {
        common::error("Expecting filename and bitmap name");
        return 1;
    }
    let (filename, name) = (&a.operands[0], a.operands[1].as_str());
    let mut spec = common::spec_from_args(&a, filename, "format");
    spec.read_only = false;
    let graph = common::graph(&a);
    let Ok(node) = common::open(&graph, &spec).await else {
        return 1;
    };
    let mut code = 0;
    for (act, value) in &actions {
        if let Err(m) = apply(&graph, &node, act, value.as_deref(), name, granularity, &a).await {
            common::error(format!("Operation {act} on bitmap {name} failed: {m}"));
            code = 1;
            break;
        }
    }
    if let Err(e) = graph.close().await {
        common::error(e);
        code = 1;
    }
    code
}

async fn apply(
    graph: &basalt_engine::Graph,
    node: &std::sync::Arc<dyn Node>,
    act: &str,
    value: Option<&str>,
    name: &str,
    granularity: Option<u64>,
    a: &crate::getopt::Args,
) -> Result<(), String> {
    let Some(q) = node.as_any().downcast_ref::<Qcow2Node>() else {
        return Err(format!("Can't store persistent bitmaps to {}: Operation not supported", node.node_name()));
    };
    let r = match act {
        // `--disable` after `--add` is its own step, as in qemu-img.
        "add" => q.bitmap_add(name, granularity, true),
        "remove" => q.bitmap_remove(name),
        "clear" => q.bitmap_clear(name),
        "enable" => q.bitmap_set_enabled(name, true),
        "disable" => q.bitmap_set_enabled(name, false),
        _ => {
            let src = value.unwrap_or_default();
            let (gb, bits, size) = match a.value("source-file") {
                None => {
                    let (g, b) = q.bitmap_bits(src).await.map_err(|e| e.msg)?;
                    (g, b, node.size())
                }
                Some(f) => {
                    let mut s = ImageSpec::new(f);
                    s.fmt = a.value("source-format").map(str::to_string);
                    s.read_only = true;
                    let other = graph.open(
                        crate::image::spec_opts(graph, &s).map_err(|e| e.msg)?,
                        crate::image::spec_flags(&s).map_err(|e| e.msg)?.0,
                    );
                    let other = other.await.map_err(|e| e.msg)?;
                    let Some(oq) = other.as_any().downcast_ref::<Qcow2Node>() else {
                        return Err(format!("Dirty bitmap '{src}' not found"));
                    };
                    let (g, b) = oq.bitmap_bits(src).await.map_err(|e| e.msg)?;
                    (g, b, other.size())
                }
            };
            q.bitmap_merge(name, gb, &bits, size)
        }
    };
    r.map_err(|e| e.msg)
}
