//! `basalt-img resize`: change an image's virtual size, as qemu-img does.
//!
//! The size is absolute or, with a leading `+` or `-`, relative to the current size; a
//! negative size may be given without `--` after the filename (`resize img -1G`), as qemu-img
//! takes it. Shrinking needs `--shrink` (else qemu-img's error and warning), preallocation is
//! only for growing, and the new size must be positive. The image is opened read-write with
//! the resize permission.

use basalt_engine::Prealloc;

use super::common;
use crate::getopt::{opt, OptSpec};

const HELP: &str = "Usage:
Resize the image to the new size.  Usage:

  basalt-img resize [-f FMT | --image-opts] [--preallocation PREALLOC] [--shrink]
        [--object OBJECTDEF] [-q] FILENAME [+-]SIZE[bkKMGTPE]

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operation
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
   instead of a file name (incompatible with --format)
  --shrink
     allow operation when new size is smaller than original
  --preallocation PREALLOC
     specify preallocation type for the new areas
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     image file (specification) to resize
  [+-]SIZE[bkKMGTPE]
     new image size or amount by which to shrink/grow,
     with optional suffix (1024-based multiplies)

";

const SPECS: [OptSpec; 7] = [
    opt(Some('h'), Some("help"), false),
    opt(Some('q'), Some("quiet"), false),
    opt(Some('f'), Some("format"), true),
    opt(None, Some("image-opts"), false),
    opt(None, Some("shrink"), false),
    opt(None, Some("preallocation"), true),
    opt(None, Some("object"), true),
];

/// Take a negative size (`-1G`) that follows the filename out of `args` before option parsing,
/// so it is not read as options: `(remaining args, the size if found)`.
fn take_negative_size(args: &[String]) -> (Vec<String>, Option<String>) {
    let mut rest = Vec::with_capacity(args.len());
    let mut size = None;
    let mut operands = 0;
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            rest.extend(args[i - 1..].iter().cloned());
            break;
        }
        if let Some(long) = a.strip_prefix("--") {
            rest.push(a.clone());
            let name = long.split_once('=').map_or(long, |(n, _)| n);
            let takes_arg = SPECS.iter().any(|s| s.arg && s.long.is_some_and(|l| l.starts_with(name)));
            if takes_arg && !long.contains('=') && i < args.len() {
                rest.push(args[i].clone());
                i += 1;
            }
            continue;
        }
        let b = a.as_bytes();
        if b.len() > 1 && b[0] == b'-' {
            if b[1].is_ascii_digit() && operands >= 1 && size.is_none() {
                size = Some(a.clone());
                continue;
            }
            rest.push(a.clone());
            // A bundle whose last option takes its value from the next argument.
            for (j, c) in a.chars().enumerate().skip(1) {
                if SPECS.iter().any(|s| s.arg && s.short == Some(c)) {
                    if j + 1 == a.chars().count() && i < args.len() {
                        rest.push(args[i].clone());
                        i += 1;
                    }
                    break;
                }
            }
            continue;
        }
        operands += 1;
        rest.push(a.clone());
    }
    (rest, size)
}

/// Run the subcommand.
pub async fn main(args: Vec<String>) -> i32 {
    let (args, neg_size) = take_negative_size(&args);
    let a = match common::parse_args("resize", HELP, &args, &SPECS) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let prealloc = match a.value("preallocation") {
        None => Prealloc::Off,
        Some(p) => match Prealloc::parse(p) {
            Ok(p) => p,
            Err(_) => {
                common::error(format!("Invalid preallocation mode '{p}'"));
                return 1;
            }
        },
    };
    let mut operands = a.operands.clone();
    if let Some(s) = neg_size {
        operands.push(s);
    }
    if operands.len() < 2 {
        return common::usage_error("resize", "Expecting image file name and size");
    }
    if operands.len() > 2 {
        return common::usage_error("resize", "Extra argument(s) in command line");
    }
    if let Err(code) = common::check_objects(&a) {
        return code;
    }
    let quiet = a.has("quiet");
    let size_arg = &operands[1];
    let (relative, num) = match size_arg.as_bytes().first() {
        Some(b'+') => (1i64, &size_arg[1..]),
        Some(b'-') => (-1i64, &size_arg[1..]),
        _ => (0i64, size_arg.as_str()),
    };
    let n = match common::opt_size("size", num) {
        Ok(n) => n,
        Err(e) => {
            common::error(e);
            return 1;
        }
    };
    let spec = common::resize_spec(common::spec_from_args(&a, &operands[0], "format"));
    let graph = crate::img::common::graph(&a);
    let Ok(node) = common::open(&graph, &spec).await else {
        return 1;
    };
    let current = node.size() as i64;
    // qemu-img's signed 64-bit arithmetic: sizes of 2^63 and more come out negative.
    let total = if relative != 0 { current.wrapping_add((n as i64).wrapping_mul(relative)) } else { n as i64 };
    if total <= 0 {
        common::error("New image size must be positive");
        return 1;
    }
    if total <= current && prealloc != Prealloc::Off {
        common::error("Preallocation can only be used for growing images");
        return 1;
    }
    if total < current && !a.has("shrink") {
        common::error("Use the --shrink option to perform a shrink operation.");
        common::error(
            "warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.",
        );
        return 1;
    }
    let r = node.truncate(total as u64, prealloc).await;
    let r = match (r, graph.close().await) {
        (Ok(()), c) => c,
        (e, _) => e,
    };
    match r {
        Ok(()) => {
            if !quiet {
                println!("Image resized.");
            }
            0
        }
        Err(e) => {
            common::error(e.msg);
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn negative_sizes_after_the_filename() {
        let (rest, size) = take_negative_size(&s(&["-f", "raw", "a.img", "-1M", "-q"]));
        assert_eq!(rest, s(&["-f", "raw", "a.img", "-q"]));
        assert_eq!(size.as_deref(), Some("-1M"));
        let (rest, size) = take_negative_size(&s(&["--shrink", "-1M", "a.img"]));
        assert_eq!(rest, s(&["--shrink", "-1M", "a.img"]));
        assert_eq!(size, None);
        let (rest, size) = take_negative_size(&s(&["-fraw", "--preallocation", "full", "a.img", "+1M"]));
        assert_eq!(rest, s(&["-fraw", "--preallocation", "full", "a.img", "+1M"]));
        assert_eq!(size, None);
    }
}
