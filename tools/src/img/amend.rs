//! `basalt-img amend`: change format options of an existing image in place, as qemu-img amend
//! does: qcow2 (`-o compat=...,lazy_refcounts=...,refcount_bits=...,size=...,data_file=...,
//! data_file_raw=off,encrypt.state=...`, LUKS key slots with `encrypt.` options) and luks
//! (`-o state=active,new-secret=ID,...`: key slots). `-o help` lists what can be amended (with
//! `-f FMT` without opening the image, as qemu-img); other formats cannot be amended.
//! `--force` lets the LUKS key slot refusals QEMU lets it override through.

use basalt_engine::{CreateOptDesc, Opts};
use basalt_formats::luks::{self, LuksNode};
use basalt_formats::qcow2::{amend_opts, Qcow2Node};

use super::common;
use super::create::{print_help, split_list, valid_option_list};
use crate::getopt::opt;

const HELP: &str = "Usage:
Update format-specific options of the image.  Usage:

  basalt-img amend [-f FMT | --image-opts] [t CACHE] [--force] [-p] [-q]
        [--object OBJDEF -o OPTIONS FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operation
  -p, --progres
     show progress
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
   instead of a file name (incompatible with --format)
  -t, --cache CACHE
     cache mode for FILENAME (writeback)
  --force
     allow certain unsafe operations

";

/// Run the subcommand.
pub async fn main(args: Vec<String>) -> i32 {
    let specs = [
        opt(Some('h'), Some("help"), false),
        opt(Some('q'), Some("quiet"), false),
        opt(Some('p'), Some("progress"), false),
        opt(Some('f'), Some("format"), true),
        opt(None, Some("image-opts"), false),
        opt(Some('t'), Some("cache"), true),
        opt(None, Some("force"), false),
        opt(None, Some("object"), true),
        opt(Some('o'), Some("options"), true),
    ];
    let a = match common::parse_args("amend", HELP, &args, &specs) {
        Ok(a) => a,
        Err(code) => return code,
    };
    if let Err(code) = common::check_objects(&a) {
        return code;
    }
    let lists = a.values("options");
    if lists.is_empty() {
        return common::usage_error("amend", "Must specify options (-o)");
    }
    for l in &lists {
        if !valid_option_list(l) {
            common::error(format!("Invalid option list: {l}"));
            return 1;
        }
    }
    let elems: Vec<String> = lists.iter().flat_map(|l| split_list(l)).collect();
    let help = elems.iter().any(|e| e == "help" || e == "?");
    if let (Some(fmt), true) = (a.value("format").filter(|_| !a.has("image-opts")), help) {
        // As qemu-img: with the format given, the help needs no image.
        return print_amend_help(&common::graph(&a), fmt);
    }
    if help && a.operands.is_empty() {
        common::error("Expecting one image file name");
        return 1;
    }
    if a.operands.len() != 1 {
        return common::usage_error("amend", "Expecting one image file name");
    }
    let filename = &a.operands[0];
    let mut spec = common::spec_from_args(&a, filename, "format");
    spec.read_only = help;
    spec.cache = Some(a.value("cache").unwrap_or("writeback").to_string());
    let graph = common::graph(&a);
    let Ok(node) = common::open(&graph, &spec).await else {
        return 1;
    };
    if help {
        return print_amend_help(&graph, node.driver());
    }
    let mut opts = Opts::new();
    for e in &elems {
        let (k, v) = e.split_once('=').unwrap_or((e.as_str(), "on"));
        opts.set(k, v);
    }
    let force = a.has("force");
    let r = if let Some(q) = node.as_any().downcast_ref::<Qcow2Node>() {
        q.amend(opts, graph.secrets(), force).await
    } else if let Some(l) = node.as_any().downcast_ref::<LuksNode>() {
        l.amend(opts, graph.secrets(), force).await
    } else {
        common::error(format!("Format driver '{}' does not support option amendment", node.driver()));
        return 1;
    };
    let closed = graph.close().await;
    match (r, closed) {
        (Ok(()), Ok(())) => 0,
        (Err(e), _) | (_, Err(e)) => {
            common::error(e.msg);
            1
        }
    }
}

/// The amend options of format `fmt`, as qemu-img's `print_amend_option_help`.
fn print_amend_help(graph: &basalt_engine::Graph, fmt: &str) -> i32 {
    let list: Vec<CreateOptDesc> = match fmt {
        "qcow2" => amend_opts(),
        "luks" => luks::amend_opts(),
        _ if graph.registry().get(fmt).is_none() => {
            common::error(format!("Unknown file format '{fmt}'"));
            return 1;
        }
        _ => {
            common::error(format!("Format driver '{fmt}' does not support option amendment"));
            return 1;
        }
    };
    println!("Amend options for '{fmt}':");
    print_help(&list);
    0
}
