//! `basalt-img map`: which ranges of an image hold data, zeroes or nothing, and where they
//! are stored, as qemu-img prints it.
//!
//! The image is walked with block status from `--start-offset` to the end (or
//! `--max-length`); adjacent ranges with the same flags whose host offsets follow on are merged
//! into one entry. `--output=json` prints one entry per line (`start`, `length`, `depth`,
//! `present`, `zero`, `data`, `compressed`, and `offset` when valid); the human form lists only
//! ranges holding data, with their host offset and file. A range nobody in the backing chain
//! defines (null-co without `read-zeroes`) is reported as not present, with no offset, as
//! qemu-img does.

use std::io::Write;

use super::common::{self, Chain, ChainStatus, OutputFormat};
use crate::getopt::opt;

const HELP: &str = "Usage:
Dump image metadata.  Usage:

  basalt-img map [-f FMT | --image-opts] [--object OBJDEF] [--output human|json]
        [--start-offset OFFSET] [--max-length LENGTH] [-U] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILENAME image format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  --start-offset OFFSET
  --max-length LENGTH
  --output human|json
     specify output format name (default human)
  -U, --force-share
     open image in shared mode for concurrent access
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     image file name (or specification with --image-opts)

";

/// One map entry (QEMU's `MapEntry`).
#[derive(Clone, Debug, Default, PartialEq)]
struct Entry {
    start: u64,
    length: u64,
    depth: u32,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    offset: Option<u64>,
    filename: Option<String>,
}

impl Entry {
    fn from_status(start: u64, st: &ChainStatus) -> Entry {
        // A range nobody defines: QEMU drops every flag, offset included.
        if !st.data && !st.zero {
            return Entry { start, length: st.len, depth: st.depth, ..Entry::default() };
        }
        Entry {
            start,
            length: st.len,
            depth: st.depth,
            present: st.allocated,
            zero: st.zero,
            data: st.data,
            compressed: st.compressed,
            offset: st.offset,
            filename: st.offset.and(st.file.as_ref()).map(|f| f.filename()),
        }
    }

    fn mergeable(&self, next: &Entry) -> bool {
        if self.length == 0 {
            return false;
        }
        if (self.zero, self.data, self.compressed, self.depth, self.present)
            != (next.zero, next.data, next.compressed, next.depth, next.present)
        {
            return false;
        }
        match (self.offset, next.offset) {
            (None, None) => true,
            (Some(a), Some(b)) => a + self.length == b,
            _ => false,
        }
    }

    /// Print as qemu-img's `dump_map_entry`; `Err` for a human map of data without an offset.
    fn dump(&self, out: &mut impl Write, ofmt: OutputFormat, has_next: bool) -> Result<(), String> {
        let w = |r: std::io::Result<()>| r.map_err(|e| e.to_string());
        match ofmt {
            OutputFormat::Human => {
                if self.data && self.offset.is_none() {
                    return Err("File contains external, encrypted or compressed clusters.".to_string());
                }
                if self.data && !self.zero {
                    let hex = |v: u64| if v == 0 { "0".to_string() } else { format!("{v:#x}") };
                    let off = self.offset.unwrap_or(0);
                    let file = self.filename.as_deref().unwrap_or("(null)");
                    w(writeln!(out, "{:<16}{:<16}{:<16}{file}", hex(self.start), hex(self.length), hex(off)))?;
                }
            }
            OutputFormat::Json => {
                w(write!(
                    out,
                    "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                    self.start, self.length, self.depth, self.present, self.zero, self.data, self.compressed
                ))?;
                if let Some(o) = self.offset {
                    w(write!(out, ", \"offset\": {o}"))?;
                }
                w(write!(out, "}}"))?;
                if has_next {
                    w(writeln!(out, ","))?;
                }
            }
        }
        Ok(())
    }
}

/// Run the subcommand.
pub async fn main(args: Vec<String>) -> i32 {
    let specs = [
        opt(Some('h'), Some("help"), false),
        opt(Some('f'), Some("format"), true),
        opt(None, Some("image-opts"), false),
        opt(None, Some("object"), true),
        opt(None, Some("output"), true),
        opt(Some('s'), Some("start-offset"), true),
        opt(Some('l'), Some("max-length"), true),
        opt(Some('U'), Some("force-share"), false),
    ];
    let a = match common::parse_args("map", HELP, &args, &specs) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let mut start = 0u64;
    let mut max_len: Option<u64> = None;
    for o in &a.opts {
        let v = o.value.as_deref().unwrap_or("");
        match o.name.as_str() {
            "start-offset" => match common::cvtnum("start offset", v) {
                Ok(n) => start = n as u64,
                Err(e) => {
                    common::error(e);
                    return 1;
                }
            },
            "max-length" => match common::cvtnum("max length", v) {
                Ok(n) => max_len = Some(n as u64),
                Err(e) => {
                    common::error(e);
                    return 1;
                }
            },
            _ => {}
        }
    }
    let ofmt = match common::output_format("map", &a) {
        Ok(f) => f,
        Err(code) => return code,
    };
    if a.operands.len() != 1 {
        return common::usage_error("map", "Expecting one image file name");
    }
    if let Err(code) = common::check_objects(&a) {
        return code;
    }
    let mut spec = common::spec_from_args(&a, &a.operands[0], "format");
    spec.read_only = true;
    let graph = crate::img::common::graph(&a);
    let Ok(node) = common::open(&graph, &spec).await else {
        return 1;
    };
    let chain = match Chain::new(node) {
        Ok(c) => c,
        Err(e) => {
            common::error(e);
            return 1;
        }
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match run(&chain, start, max_len, ofmt, &mut out).await {
        Ok(()) => {
            if let Err(e) = out.flush() {
                common::error(e);
                return 1;
            }
            0
        }
        Err(e) => {
            let _ = out.flush();
            common::error(e);
            1
        }
    }
}

async fn run(chain: &Chain, start: u64, max_len: Option<u64>, ofmt: OutputFormat, out: &mut impl Write) -> Result<(), String> {
    let w = |r: std::io::Result<()>| r.map_err(|e| e.to_string());
    let mut length = chain.size();
    if let Some(m) = max_len {
        length = length.min(start.saturating_add(m));
    }
    match ofmt {
        OutputFormat::Human => w(writeln!(out, "{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to"))?,
        OutputFormat::Json => w(write!(out, "["))?,
    }
    let mut curr = Entry { start, ..Entry::default() };
    while curr.start + curr.length < length {
        let offset = curr.start + curr.length;
        let st = chain.status(offset, length - offset).await.map_err(|e| format!("Could not read file metadata: {e}"))?;
        let next = Entry::from_status(offset, &st);
        if curr.mergeable(&next) {
            curr.length += next.length;
            continue;
        }
        if curr.length > 0 {
            curr.dump(out, ofmt, true)?;
        }
        curr = next;
    }
    curr.dump(out, ofmt, false)?;
    if ofmt == OutputFormat::Json {
        w(writeln!(out, "]"))?;
    }
    Ok(())
}
