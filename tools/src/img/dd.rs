//! `basalt-img dd`: copy an image into a new one, dd-style, as qemu-img dd does.
//!
//! Operands `if=`, `of=`, `bs=` (size suffixes allowed, 1..2^31-1, default 512), `count=`
//! and `skip=` (plain numbers, in blocks). The output is created with `-O` (default raw) at
//! qemu-img's size: the input size, cut to `count` blocks, minus the `skip` blocks — including
//! qemu-img's quirk that `count` limits the input *end*, not the amount copied after `skip`.
//! A `skip` past the end warns and leaves an empty output (exit 0, like dd(1)).
//!
//! The result is the same bytes qemu-img writes (every byte of the range is written, zeroes
//! too), but the copy runs in 1 MiB chunks with several in flight rather than `bs` at a time.

use std::collections::VecDeque;

use basalt_engine::{Backend, IoStatus, Opts, WriteFlags};
use basalt_reactor::{spawn_local, JoinHandle};

use super::common;
use crate::getopt::opt;
use crate::image::ImageSpec;

const HELP: &str = "Usage:
Copy input to output with optional format conversion.  Usage:

  basalt-img dd [-f FMT|--image-opts] [-O OUTPUT_FMT] [-U]
        [bs=BLOCK_SIZE] [count=BLOCKS] if=INPUT of=OUTPUT

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify format for INPUT explicitly
  --image-opts
     indicates that INPUT is a complete image specification
     instead of a file name (incompatible with --format)
  -O, --output-format OUTPUT_FMT
     format of the OUTPUT (default raw)
  -U, --force-share
     open images in shared mode for concurrent access
  bs=BLOCK_SIZE[kKMGTP]
     size of I/O block (default 512)
  count=COUNT
     number of blocks to convert (default whole INPUT)
  if=INPUT
     input file name (or image specification with --image-opts)
  of=OUTPUT
     output file name to create

";

/// Bytes per copy request.
const CHUNK: u64 = 1 << 20;
/// Copy requests in flight.
const DEPTH: usize = 8;

/// The dd operands.
#[derive(Debug, Default, PartialEq)]
struct Operands {
    input: Option<String>,
    output: Option<String>,
    bs: u64,
    count: Option<i64>,
    skip: Option<i64>,
}

fn block_count(name: &str, v: &str) -> Result<i64, String> {
    match common::strtoi64(v) {
        Ok(n) if n >= 0 => Ok(n),
        Err(common::NumError::Invalid) => Err(format!("Invalid {name} specified: '{v}'.")),
        _ => Err(format!("Invalid {name} specified. Must be between 0 and {}.", i64::MAX)),
    }
}

fn parse_operands(ops: &[String]) -> Result<Operands, String> {
    let mut o = Operands { bs: 512, ..Operands::default() };
    for arg in ops {
        let Some((k, v)) = arg.split_once('=') else {
            return Err(format!("unrecognized operand {arg}"));
        };
        match k {
            "bs" => o.bs = common::cvtnum_full("bs", v, 1, i32::MAX.into())? as u64,
            "count" => o.count = Some(block_count("count", v)?),
            "skip" => o.skip = Some(block_count("skip", v)?),
            "if" => o.input = Some(v.to_string()),
            "of" => o.output = Some(v.to_string()),
            _ => return Err(format!("unrecognized operand {k}")),
        }
    }
    Ok(o)
}

/// Run the subcommand.
pub async fn main(args: Vec<String>) -> i32 {
    let specs = [
        opt(Some('h'), Some("help"), false),
        opt(Some('f'), Some("format"), true),
        opt(Some('O'), Some("output-format"), true),
        opt(None, Some("image-opts"), false),
        opt(Some('U'), Some("force-share"), false),
        opt(None, Some("object"), true),
    ];
    let a = match common::parse_args("dd", HELP, &args, &specs) {
        Ok(a) => a,
        Err(code) => return code,
    };
    if let Err(code) = common::check_objects(&a) {
        return code;
    }
    let o = match parse_operands(&a.operands) {
        Ok(o) => o,
        Err(e) => {
            common::error(e);
            return 1;
        }
    };
    let (Some(input), Some(output)) = (o.input.clone(), o.output.clone()) else {
        common::error("Must specify both input and output files");
        return 1;
    };
    let graph = crate::img::common::graph(&a);
    let mut spec = common::spec_from_args(&a, &input, "format");
    spec.read_only = true;
    let Ok(src) = common::open(&graph, &spec).await else {
        return 1;
    };
    let out_fmt = a.value("output-format").unwrap_or("raw").to_string();
    let Some(drv) = graph.registry().get(&out_fmt) else {
        common::error("Unknown file format");
        return 1;
    };
    if drv.create_opts().is_empty() {
        common::error(format!("Format driver '{out_fmt}' does not support image creation"));
        return 1;
    }
    let proto = graph.registry().protocol_for(&output).or_else(|| graph.registry().get("file"));
    if let Some(p) = proto.filter(|p| p.create_opts().is_empty()) {
        common::error(format!("Protocol driver '{}' does not support image creation", p.name()));
        return 1;
    }

    // qemu-img's arithmetic, in signed 64 bits.
    let bsz = o.bs as i64;
    let mut size = src.size() as i64;
    if let Some(c) = o.count {
        if c <= i64::MAX / bsz && c * bsz < size {
            size = c * bsz;
        }
    }
    let skip = o.skip.unwrap_or(0);
    let beyond = o.skip.is_some() && (skip > i64::MAX / bsz || size < bsz * skip);
    let out_size = if beyond { 0 } else { size - bsz * skip };
    if let Err(e) = graph.create(&out_fmt, &output, out_size as u64, Opts::new()).await {
        common::error(format!("{output}: error while creating output image: {}", e.msg));
        return 1;
    }
    let mut ospec = ImageSpec::new(&output);
    ospec.fmt = Some(out_fmt);
    let Ok(dst) = common::open(&graph, &ospec).await else {
        return 1;
    };
    let in_pos = if beyond {
        common::error(format!("{input}: cannot skip to specified offset"));
        size
    } else {
        skip * bsz
    };
    let (src, dst) = match (Backend::new(src), Backend::new(dst)) {
        (Ok(s), Ok(d)) => (s, d),
        (Err(e), _) | (_, Err(e)) => {
            common::error(e.msg);
            return 1;
        }
    };
    let r = copy(&src, &dst, in_pos as u64, size.max(0) as u64).await;
    let r = match (r, graph.close().await) {
        (Ok(()), Err(e)) => Err(e.to_string()),
        (r, _) => r,
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            common::error(e);
            1
        }
    }
}

type Step = JoinHandle<Result<(), String>>;

/// Copy `start..end` of `src` to offset 0 of `dst`.
async fn copy(src: &Backend, dst: &Backend, start: u64, end: u64) -> Result<(), String> {
    let mut q: VecDeque<Step> = VecDeque::new();
    let mut pos = start;
    let mut first_err = None;
    while pos < end || !q.is_empty() {
        if pos < end && q.len() < DEPTH && first_err.is_none() {
            let n = CHUNK.min(end - pos);
            let (s, d, at) = (src.clone(), dst.clone(), pos);
            q.push_back(spawn_local(async move {
                let buf = common::read(&s, at, n as usize)
                    .await
                    .map_err(|e| format!("error while reading from input image file: {e}"))?;
                let w = d.write(at - start, buf, WriteFlags::default()).await;
                w.res.map(|_| ()).map_err(|e: IoStatus| format!("error while writing to output image file: {e}"))
            }));
            pos += n;
            continue;
        }
        let Some(step) = q.pop_front() else { break };
        if let Err(e) = step.await {
            first_err.get_or_insert(e);
        }
        if first_err.is_some() && pos < end {
            pos = end;
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    let f = dst.flush().await;
    f.res.map(|_| ()).map_err(|e| format!("error while writing to output image file: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(v: &[&str]) -> Result<Operands, String> {
        parse_operands(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn operands_as_qemu_img() {
        let o = ops(&["if=a", "of=b", "bs=1.5k", "count=010", "skip=0x2"]).unwrap_or_default();
        assert_eq!(o, Operands { input: Some("a".into()), output: Some("b".into()), bs: 1536, count: Some(8), skip: Some(2) });
        assert_eq!(ops(&["bs"]).unwrap_err(), "unrecognized operand bs");
        assert_eq!(ops(&["foo=1"]).unwrap_err(), "unrecognized operand foo");
        assert_eq!(ops(&["bs=0"]).unwrap_err(), "Invalid bs specified. Must be between 1 and 2147483647.");
        assert_eq!(ops(&["bs=1X"]).unwrap_err(), "Invalid bs specified: '1X'.");
        assert_eq!(ops(&["count=1k"]).unwrap_err(), "Invalid count specified: '1k'.");
        assert_eq!(ops(&["skip=-1"]).unwrap_err(), "Invalid skip specified. Must be between 0 and 9223372036854775807.");
    }
}
