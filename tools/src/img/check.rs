//! `basalt-img check`: consistency checks of an image's metadata.
//!
//! qcow2 images are checked by the driver (reference counts rebuilt from the metadata, leaks and
//! errors found and, with `-r`, repaired) and the result printed as qemu-img prints it: the
//! driver's findings on stderr, then "No errors were found on the image." or the counts of
//! errors and leaks, the cluster statistics and the image end offset (or QEMU's JSON object);
//! after a repair the image is checked again and the repairs are reported. Exit codes are
//! qemu-img's: 0 clean, 1 check failed, 2 corruptions, 3 leaks only. Raw keeps no metadata to
//! check, so it answers as qemu-img does for such formats: "This image format does not support
//! checks", exit code 63, in human and JSON output alike. Everything before that — option
//! checking (`-r leaks|all`, `-T`, `--output`), opening read-only or, with `-r`, read-write (so
//! `-U -r` is refused), the probing warning — behaves as qemu-img.

use std::sync::Arc;

use basalt_engine::{BlockError, ErrorKind, Node};
use basalt_formats::qcow2::{CheckReport, Qcow2Node, Repair};
use serde_json::{json, Value};

use super::common::{self, OutputFormat};
use super::info::qdict;
use crate::getopt::opt;

const HELP: &str = "Usage:
Check basic image integrity.  Usage:

  basalt-img check [-f FMT | --image-opts] [-T CACHE_MODE] [-r] [-u]
        [--output human|json] [--object OBJDEF] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operations
  -f, --format FMT
     specifies format of the image explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -T, --cache CACHE_MODE
     image cache mode (writeback)
  -U, --force-share
     open image in shared mode for concurrent access
  --output human|json
     output format
  -r, --repair leaks|all
     repair particular aspect of the image
     (image will be open in read-write mode, incompatible with --force-share)
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     the image file (or image specification) to operate on

";

/// qemu-img's exit code for "this format has no checks".
pub const EXIT_NOT_SUPPORTED: i32 = 63;

/// Run the subcommand.
pub async fn main(args: Vec<String>) -> i32 {
    let specs = [
        opt(Some('h'), Some("help"), false),
        opt(Some('q'), Some("quiet"), false),
        opt(Some('f'), Some("format"), true),
        opt(None, Some("image-opts"), false),
        opt(Some('T'), Some("cache"), true),
        opt(Some('U'), Some("force-share"), false),
        opt(None, Some("output"), true),
        opt(Some('r'), Some("repair"), true),
        opt(None, Some("object"), true),
    ];
    let a = match common::parse_args("check", HELP, &args, &specs) {
        Ok(a) => a,
        Err(code) => return code,
    };
    if let Some(r) = a.value("repair") {
        if r != "leaks" && r != "all" {
            return common::usage_error("check", format!("--repair (-r) expects 'leaks' or 'all' not '{r}'"));
        }
    }
    let ofmt = match common::output_format("check", &a) {
        Ok(f) => f,
        Err(code) => return code,
    };
    let cache = match common::source_cache(&a) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if a.operands.len() != 1 {
        return common::usage_error("check", "Expecting one image file name");
    }
    if let Err(code) = common::check_objects(&a) {
        return code;
    }
    let mut spec = common::spec_from_args(&a, &a.operands[0], "format");
    spec.read_only = !a.has("repair");
    spec.cache = cache;
    let graph = crate::img::common::graph(&a);
    let Ok(node) = common::open(&graph, &spec).await else {
        return 1;
    };
    let repair = match a.value("repair") {
        Some("leaks") => Repair::Leaks,
        Some(_) => Repair::All,
        None => Repair::None,
    };
    let how = How { filename: a.operands[0].clone(), ofmt, quiet: a.has("quiet") };
    let code = run(&node, repair, &how).await;
    if let Err(e) = graph.close().await {
        common::error(e);
        return code.max(1);
    }
    code
}

struct How {
    filename: String,
    ofmt: OutputFormat,
    quiet: bool,
}

/// One check through the driver; `Err(code)` after printing why it could not be done.
async fn check_once(node: &Arc<dyn Node>, repair: Repair) -> Result<CheckReport, i32> {
    let Some(q) = node.as_any().downcast_ref::<Qcow2Node>() else {
        common::error("This image format does not support checks");
        return Err(EXIT_NOT_SUPPORTED);
    };
    match q.check(repair).await {
        Ok(r) => {
            for m in &r.messages {
                eprintln!("{m}");
            }
            match r.failed {
                Some(e) => {
                    common::error(format!("Check failed: {}", BlockError::from(e).msg));
                    Err(1)
                }
                None => Ok(r),
            }
        }
        Err(e) if e.kind == ErrorKind::Unsupported => {
            common::error(e.msg);
            Err(EXIT_NOT_SUPPORTED)
        }
        Err(e) => {
            common::error(e.msg);
            Err(1)
        }
    }
}

/// qemu-img's `img_check` after opening: check, repair and check again, print, pick the code.
async fn run(node: &Arc<dyn Node>, repair: Repair, how: &How) -> i32 {
    let mut r = match check_once(node, repair).await {
        Ok(r) => r,
        Err(code) => return code,
    };
    if r.corruptions_fixed > 0 || r.leaks_fixed > 0 {
        let (leaks_fixed, corruptions_fixed) = (r.leaks_fixed, r.corruptions_fixed);
        if how.ofmt == OutputFormat::Human && !how.quiet {
            print!(
                "The following inconsistencies were found and repaired:\n\n    {leaks_fixed} leaked clusters\n    \
                 {corruptions_fixed} corruptions\n\nDouble checking the fixed image now...\n"
            );
        }
        r = match check_once(node, Repair::None).await {
            Ok(r) => r,
            Err(code) => return code,
        };
        r.leaks_fixed = leaks_fixed;
        r.corruptions_fixed = corruptions_fixed;
    }
    if !how.quiet {
        match how.ofmt {
            OutputFormat::Human => print!("{}", human(&r)),
            OutputFormat::Json => println!("{}", crate::qjson::pretty(&to_json(&r, &how.filename, node.driver()))),
        }
    }
    if r.check_errors > 0 {
        common::error("Check failed");
        return 1;
    }
    if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    }
}

/// qemu-img's `dump_human_image_check`.
fn human(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors > 0 {
            s.push_str(&format!("\n{} internal errors have occurred during the check.\n", r.check_errors));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let (alloc, total) = (r.allocated_clusters as f64, r.total_clusters as f64);
        s.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            alloc * 100.0 / total,
            r.fragmented_clusters as f64 * 100.0 / alloc,
            r.compressed_clusters as f64 * 100.0 / alloc
        ));
    }
    if r.image_end_offset != 0 {
        s.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    s
}

/// QEMU's `ImageCheck` object: optional counters only when non-zero, in QDict order.
fn to_json(r: &CheckReport, filename: &str, format: &str) -> Value {
    let mut f: Vec<(&str, Value)> =
        vec![("filename", json!(filename)), ("format", json!(format)), ("check-errors", json!(r.check_errors))];
    for (k, v) in [
        ("image-end-offset", r.image_end_offset),
        ("corruptions", r.corruptions),
        ("leaks", r.leaks),
        ("corruptions-fixed", r.corruptions_fixed),
        ("leaks-fixed", r.leaks_fixed),
        ("total-clusters", r.total_clusters),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
    ] {
        if v != 0 {
            f.push((k, json!(v)));
        }
    }
    qdict(f)
}
