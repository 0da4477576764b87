//! `basalt-img measure`: how large an image would be, as qemu-img measure computes it.
//!
//! For a new image of `--size N`, or for converting an existing one: "required size" is the
//! metadata for the whole virtual disk plus the clusters that hold data (counted at the output
//! format's cluster size, as QEMU counts them), "fully allocated size" the metadata plus every
//! cluster. raw needs exactly its virtual size. `--output=json` gives qemu-img's object; a
//! qcow2 (v3) source measured for a qcow2 target adds "bitmaps size", the clusters its
//! persistent bitmaps would take whole (as QEMU counts them). `-l` measures the source at an
//! internal snapshot. A qcow2 target
//! with `encrypt.format=luks` adds its LUKS header clusters, as QEMU does (computed from the
//! cipher's key size rather than by building a header: the same figure without the seconds of
//! key derivation qemu-img spends on it).

use basalt_engine::{parse_bool, Opts};

use crate::getopt::opt;
use basalt_formats::qcow2::Qcow2Node;

use crate::img::common::{self, error, Chain, OutputFormat};
use crate::qjson;

const HELP: &str = "Usage: basalt-img measure [--output=OFMT] [-O OUTPUT_FMT] [-o OPTIONS] [--size N | [--object OBJDEF]
        [--image-opts] [-f FMT] [-l SNAPSHOT] FILENAME]

Calculates the file size required to create a new image.
";

/// QEMU's `qcow2_refcount_metadata_size`: refcount table and blocks for `clusters` clusters.
fn refcount_metadata(clusters: u64, cs: u64, refcount_order: u32) -> u64 {
    let (blocks, table) = basalt_formats::qcow2::refcount_metadata_clusters(clusters, cs.trailing_zeros(), refcount_order);
    (blocks + table) * cs
}

/// QEMU's `qcow2_calc_prealloc_size` less the data: the metadata of a fully allocated image.
fn qcow2_metadata(size: u64, cs: u64, refcount_order: u32, extended_l2: bool) -> u64 {
    let aligned = size.next_multiple_of(cs);
    let entry = if extended_l2 { 16 } else { 8 };
    let mut meta = cs;
    let nl2e = (aligned / cs).next_multiple_of(cs / entry);
    meta += nl2e * entry;
    let nl1e = (nl2e * entry / cs).next_multiple_of(cs / 8);
    meta += nl1e * 8;
    meta += refcount_metadata((meta + aligned) / cs, cs, refcount_order);
    meta
}

struct Qcow2Params {
    cs: u64,
    refcount_order: u32,
    extended_l2: bool,
    /// Bytes of the LUKS header area (`encrypt.format=luks`), 0 without.
    luks: u64,
}

/// The LUKS header area a qcow2 image created with these `encrypt.*` options gets: checked as
/// QEMU checks them when it measures (the cipher options, the key secret's presence).
fn luks_area(graph: &basalt_engine::Graph, opts: &mut Opts) -> Result<u64, String> {
    let mut sub = opts.take_sub("encrypt");
    if sub.get_str("format").as_deref() != Some("luks") {
        return Ok(0);
    }
    sub.take_str("format");
    let (o, key) = basalt_formats::crypto::take_luks_create_opts(&mut sub).map_err(|e| e.msg)?;
    let key = key.ok_or("Parameter 'encrypt.key-secret' is required for cipher")?;
    if !graph.secrets().contains(&key) {
        return Err(format!("No secret with id '{key}'"));
    }
    let (_, payload_sectors) = basalt_formats::crypto::luks_layout(o.mode.key_len(o.alg) as u32);
    Ok(u64::from(payload_sectors) * basalt_formats::crypto::SECTOR_SIZE as u64)
}

fn qcow2_params(opts: &mut Opts, graph: &basalt_engine::Graph) -> Result<Qcow2Params, String> {
    // Typed as qemu-img types `-o` options, before anything else.
    if opts.get_str("encrypt.iter-time").is_some_and(|v| basalt_engine::parse_number(&v).is_none()) {
        return Err("Parameter 'encrypt.iter-time' expects a number".into());
    }
    let cs = match opts.take_str("cluster_size") {
        None => 65536,
        Some(v) => basalt_engine::parse_size(&v).ok_or_else(|| format!("Parameter 'cluster_size' expects a size, not '{v}'"))?,
    };
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err("Cluster size must be a power of two between 512 and 2048k".into());
    }
    let bits: u32 = match opts.take_str("refcount_bits") {
        None => 16,
        Some(v) => v.parse().map_err(|_| format!("Parameter 'refcount_bits' expects a number, not '{v}'"))?,
    };
    if !bits.is_power_of_two() || bits > 64 {
        return Err("Refcount width must be a power of two and may not exceed 64 bits".into());
    }
    let extended_l2 = opts.take_str("extended_l2").map(|v| parse_bool(&v).unwrap_or(false)).unwrap_or(false);
    let luks = luks_area(graph, opts)?;
    for k in [
        "encryption",
        "compat",
        "preallocation",
        "lazy_refcounts",
        "compression_type",
        "backing_file",
        "backing_fmt",
        "data_file",
        "data_file_raw",
    ] {
        opts.take_str(k);
    }
    if let Some(k) = opts.keys().next() {
        return Err(format!("Invalid parameter '{k}'"));
    }
    Ok(Qcow2Params { cs, refcount_order: bits.trailing_zeros(), extended_l2, luks })
}

/// Run the subcommand.
pub async fn main(args: Vec<String>) -> i32 {
    let specs = [
        opt(Some('h'), Some("help"), false),
        opt(Some('f'), Some("format"), true),
        opt(Some('O'), Some("target-format"), true),
        opt(Some('o'), Some("options"), true),
        opt(Some('l'), Some("snapshot"), true),
        opt(None, Some("size"), true),
        opt(None, Some("output"), true),
        opt(None, Some("image-opts"), false),
        opt(None, Some("object"), true),
        opt(Some('U'), Some("force-share"), false),
    ];
    let a = match common::parse_args("measure", HELP, &args, &specs) {
        Ok(a) => a,
        Err(code) => return code,
    };
    if let Err(code) = common::check_objects(&a) {
        return code;
    }
    let snapshot = match a.value("snapshot").map(common::parse_snapshot) {
        None => None,
        Some(Ok(sel)) => Some(sel),
        Some(Err(m)) => {
            error(m);
            return 1;
        }
    };
    let out = match common::output_format("measure", &a) {
        Ok(o) => o,
        Err(code) => return code,
    };
    let size_arg = a.value("size");
    if size_arg.is_some() && !a.operands.is_empty() {
        error("--size N cannot be used together with a filename.");
        return 1;
    }
    if size_arg.is_none() && a.operands.len() != 1 {
        error("Either --size N or one filename must be specified.");
        return 1;
    }
    if size_arg.is_some() && (a.has("image-opts") || a.value("format").is_some() || a.value("snapshot").is_some()) {
        error("--image-opts, -f, and -l require a filename argument.");
        return 1;
    }
    let fmt = a.value("target-format").unwrap_or("raw").to_string();
    let mut opts = Opts::new();
    for o in a.values("options") {
        match Opts::parse_keyval(o, None) {
            Ok(p) => opts.insert_sub_root(p),
            Err(e) => {
                error(e.msg);
                return 1;
            }
        }
    }
    let qcow2 = match fmt.as_str() {
        "raw" => {
            opts.take_str("preallocation");
            if let Some(k) = opts.keys().next() {
                error(format!("Invalid parameter '{k}'"));
                error(format!("Invalid options for file format '{fmt}'"));
                return 1;
            }
            None
        }
        "qcow2" => match qcow2_params(&mut opts, &common::graph(&a)) {
            Ok(p) => Some(p),
            Err(m) => {
                error(&m);
                if m.starts_with("Invalid parameter") || m.ends_with("expects a number") {
                    error(format!("Invalid options for file format '{fmt}'"));
                }
                return 1;
            }
        },
        other if basalt_formats::registry().get(other).is_some() => {
            error(format!("Block driver '{other}' does not support size measurement"));
            return 1;
        }
        other => {
            error(format!("Unknown file format '{other}'"));
            return 1;
        }
    };

    // The virtual size and, for a source image, the data to copy.
    let (size, data, bitmaps) = match size_arg {
        Some(s) => match common::strtosz(s) {
            Ok(v) => (v, 0, None),
            Err(_) => {
                error(format!("Invalid image size specified: '{s}'."));
                return 1;
            }
        },
        None => {
            let graph = crate::img::common::graph(&a);
            let mut spec = common::spec_from_args(&a, &a.operands[0], "format");
            spec.read_only = true;
            let node = match common::open(&graph, &spec).await {
                Ok(n) => n,
                Err(()) => return 1,
            };
            if let Some(sel) = &snapshot {
                if let Err(m) = common::load_snapshot(&node, sel).await {
                    error(m);
                    return 1;
                }
            }
            // qcow2 version 3 sources have persistent bitmaps (perhaps none); the clusters a
            // qcow2 target needs for them: each bitmap whole, its table, and the directory.
            let bitmaps = node.as_any().downcast_ref::<Qcow2Node>().filter(|q| q.header().version >= 3).map(|q| {
                let cs = qcow2.as_ref().map_or(512, |t| t.cs);
                let mut total = 0u64;
                let mut dir = 0u64;
                for b in q.bitmap_list() {
                    let clusters = node.size().div_ceil(b.granularity).div_ceil(8).div_ceil(cs);
                    total += clusters * cs + (clusters * 8).next_multiple_of(cs);
                    dir += (24 + b.name.len() as u64).next_multiple_of(8);
                }
                total + dir.next_multiple_of(cs)
            });
            let chain = match Chain::new(node) {
                Ok(c) => c,
                Err(e) => {
                    error(e);
                    return 1;
                }
            };
            let size = chain.size();
            let cs = qcow2.as_ref().map_or(512, |q| q.cs);
            let mut data = 0u64;
            let mut off = 0u64;
            while off < size {
                let st = match chain.status(off, size - off).await {
                    Ok(s) => s,
                    Err(e) => {
                        error(format!("error getting block status at offset {off}: {e}"));
                        return 1;
                    }
                };
                let mut n = st.len.max(1);
                if !st.zero && st.data && st.allocated {
                    // As QEMU: extend to the end of the cluster, count from the cluster start.
                    n = (off + n).next_multiple_of(cs) - off;
                    data += off % cs + n;
                }
                off += n;
            }
            (size, data, bitmaps)
        }
    };
    let (required, full) = match &qcow2 {
        None => (size, size),
        Some(q) => {
            let meta = qcow2_metadata(size, q.cs, q.refcount_order, q.extended_l2) + q.luks.next_multiple_of(q.cs);
            (meta + data.min(size.next_multiple_of(q.cs)), meta + size.next_multiple_of(q.cs))
        }
    };
    // Only a qcow2 target says how much its bitmaps take.
    let bitmaps = bitmaps.filter(|_| qcow2.is_some());
    match out {
        OutputFormat::Human => {
            println!("required size: {required}");
            println!("fully allocated size: {full}");
            if let Some(b) = bitmaps {
                println!("bitmaps size: {b}");
            }
        }
        OutputFormat::Json => {
            let mut m = serde_json::Map::new();
            if let Some(b) = bitmaps {
                m.insert("bitmaps".into(), b.into());
            }
            m.insert("required".into(), required.into());
            m.insert("fully-allocated".into(), full.into());
            println!("{}", qjson::pretty(&serde_json::Value::Object(m)));
        }
    }
    0
}
