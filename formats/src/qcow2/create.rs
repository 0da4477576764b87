//! Creating qcow2 images: the file through its protocol driver, then cluster 0 (header,
//! extensions, backing file name), the refcount table, refcount blocks and the empty L1
//! table, laid out as QEMU lays them out (header, refcount table, refcount block, L1); for
//! `encrypt.format=luks`, the LUKS header clusters after them where QEMU's allocator puts them
//! (after the preallocated data with `preallocation`). With `data_file` the data file is
//! created beside it (its name recorded in a header extension before the LUKS one, as QEMU
//! orders them), sized and preallocated as QEMU does it.

use basalt_engine::{
    parse_bool, parse_size, BlockError, BlockResult, CreateOptDesc, ErrorKind, Graph, OpenFlags, Opts, Perm, Queue,
};
use basalt_reactor::IoBuf;

use crate::qcow2::encrypt;
use crate::qcow2::header::{self, Qcow2Header, INCOMPAT_COMPRESSION, INCOMPAT_EXTL2};
use crate::qcow2::refcount;

/// `-o` options as QEMU 10 declares them (`qcow2_create_opts`): this order is the order of
/// qemu-img's `Formatting` line, as `-o help` lists them.
pub(crate) const CREATE_OPTS: &[CreateOptDesc] = &[
    CreateOptDesc {
        name: "encryption",
        kind: "bool",
        help: "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    },
    CreateOptDesc { name: "encrypt.format", kind: "str", help: "Encrypt the image, format choices: 'aes', 'luks'" },
    CreateOptDesc { name: "encrypt.key-secret", kind: "str", help: "ID of secret providing qcow AES key or LUKS passphrase" },
    CreateOptDesc { name: "encrypt.cipher-alg", kind: "str", help: "Name of encryption cipher algorithm" },
    CreateOptDesc { name: "encrypt.cipher-mode", kind: "str", help: "Name of encryption cipher mode" },
    CreateOptDesc { name: "encrypt.ivgen-alg", kind: "str", help: "Name of IV generator algorithm" },
    CreateOptDesc { name: "encrypt.ivgen-hash-alg", kind: "str", help: "Name of IV generator hash algorithm" },
    CreateOptDesc { name: "encrypt.hash-alg", kind: "str", help: "Name of encryption hash algorithm" },
    CreateOptDesc { name: "encrypt.iter-time", kind: "number", help: "Time to spend in PBKDF in milliseconds" },
    CreateOptDesc { name: "cluster_size", kind: "size", help: "qcow2 cluster size" },
    CreateOptDesc { name: "extended_l2", kind: "bool", help: "Extended L2 tables" },
    CreateOptDesc {
        name: "preallocation",
        kind: "str",
        help: "Preallocation mode (allowed values: off, metadata, falloc, full)",
    },
    CreateOptDesc { name: "compression_type", kind: "str", help: "Compression method used for image cluster compression" },
    CreateOptDesc { name: "size", kind: "size", help: "Virtual disk size" },
    CreateOptDesc { name: "compat", kind: "str", help: "Compatibility level (v2 [0.10] or v3 [1.1])" },
    CreateOptDesc { name: "backing_file", kind: "str", help: "File name of a base image" },
    CreateOptDesc { name: "backing_fmt", kind: "str", help: "Image format of the base image" },
    CreateOptDesc { name: "data_file", kind: "str", help: "File name of an external data file" },
    CreateOptDesc { name: "data_file_raw", kind: "bool", help: "The external data file must stay valid as a raw image" },
    CreateOptDesc { name: "lazy_refcounts", kind: "bool", help: "Postpone refcount updates" },
    CreateOptDesc { name: "refcount_bits", kind: "number", help: "Width of a reference count entry in bits" },
];

fn opt_err(msg: impl Into<String>) -> BlockError {
    BlockError::option(msg)
}

/// Create a qcow2 image of `size` bytes at `filename`.
pub(crate) async fn create(graph: &Graph, filename: &str, size: u64, mut opts: Opts) -> BlockResult<()> {
    let version = match opts.take_str("compat").as_deref() {
        None | Some("1.1") | Some("v3") => 3,
        Some("0.10") | Some("v2") => 2,
        Some(v) => return Err(opt_err(format!("Invalid compatibility level: '{v}'"))),
    };
    let cs = match opts.take_str("cluster_size") {
        None => 65536,
        Some(v) => parse_size(&v).ok_or_else(|| opt_err(format!("Parameter 'cluster_size' expects a size, not '{v}'")))?,
    };
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err(opt_err("Cluster size must be a power of two between 512 and 2048k"));
    }
    let refcount_bits = match opts.take_str("refcount_bits") {
        None => 16,
        Some(v) => v.parse::<u32>().map_err(|_| opt_err(format!("Parameter 'refcount_bits' expects a number, not '{v}'")))?,
    };
    if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
        return Err(opt_err("Refcount width must be a power of two and may not exceed 64 bits"));
    }
    if version < 3 && refcount_bits != 16 {
        return Err(opt_err(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)",
        ));
    }
    let lazy = opts.take_str("lazy_refcounts").map(|v| parse_bool(&v).unwrap_or(false)).unwrap_or(false);
    if lazy && version < 3 {
        return Err(opt_err("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)"));
    }
    let extended_l2 = opts.take_str("extended_l2").map(|v| parse_bool(&v).unwrap_or(false)).unwrap_or(false);
    if extended_l2 {
        if version < 3 {
            return Err(opt_err(
                "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if cs < 16384 {
            return Err(opt_err("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"));
        }
    }
    let compression = match opts.take_str("compression_type").as_deref() {
        None | Some("zlib") => 0u8,
        Some("zstd") => 1,
        Some(v) => return Err(opt_err(format!("Parameter 'compression_type' does not accept value '{v}'"))),
    };
    if compression != 0 && version < 3 {
        return Err(opt_err(
            "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)",
        ));
    }
    let prealloc = match opts.take_str("preallocation") {
        None => basalt_engine::Prealloc::Off,
        Some(p) => basalt_engine::Prealloc::parse(&p)?,
    };
    let crypt = encrypt::parse_create_opts(&mut opts)?;
    let data_file = opts.take_str("data_file");
    let data_raw = opts.take_str("data_file_raw").is_some_and(|v| parse_bool(&v) == Some(true));
    if data_raw && data_file.is_none() {
        return Err(opt_err("data-file-raw requires data-file"));
    }
    let mut prealloc = prealloc;
    if data_file.is_some() {
        if version < 3 {
            return Err(opt_err(
                "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        // As QEMU: a raw data file maps every cluster 1:1 from the start.
        if data_raw && prealloc == basalt_engine::Prealloc::Off {
            prealloc = basalt_engine::Prealloc::Metadata;
        }
    }
    let backing_file = opts.take_str("backing_file");
    let backing_fmt = opts.take_str("backing_fmt");
    if backing_fmt.is_some() && backing_file.is_none() {
        return Err(opt_err("Backing format cannot be used without backing file"));
    }
    // The passphrase and the LUKS header (timed PBKDF2) before anything exists on disk.
    let crypt = match crypt {
        Some(c) => Some(c.build(graph)?),
        None => None,
    };
    // What is left goes to the protocol (nocow, extent_size_hint...).
    let proto = graph.registry().protocol_for(filename).or_else(|| graph.registry().get("file"));
    let proto = proto.ok_or_else(|| BlockError::new(ErrorKind::NotFound, "Unknown protocol"))?;
    proto.create(graph, filename, 0, opts).await?;
    if let Some(df) = &data_file {
        // The data file, raw (named as given, relative to the working directory, as QEMU
        // creates it): of the virtual size, or empty when preallocation below sizes it (and
        // preallocates it for `falloc` and `full`), as QEMU grows it.
        let dproto = graph.registry().protocol_for(df).or_else(|| graph.registry().get("file"));
        let dproto = dproto.ok_or_else(|| BlockError::new(ErrorKind::NotFound, "Unknown protocol"))?;
        let dsize = if prealloc == basalt_engine::Prealloc::Off { size } else { 0 };
        dproto.create(graph, df, dsize, Opts::new()).await?;
    }

    let cluster_bits = cs.trailing_zeros();
    let refcount_order = refcount_bits.trailing_zeros();
    let entry = if extended_l2 { 16 } else { 8 };
    let l2_cover = cs * (cs / entry);
    let l1_size = size.div_ceil(l2_cover);
    if l1_size * 8 > header::MAX_L1_BYTES {
        return Err(BlockError::new(
            ErrorKind::OutOfBounds,
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
        ));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    // Metadata clusters: header, refcount table, refcount blocks, L1 — sized to cover themselves
    // and `extra` clusters after them.
    let per_block = refcount::entries_per_block(cluster_bits, refcount_order);
    let skeleton = |extra: u64| {
        let mut rt = 1u64;
        let mut nb = 1u64;
        loop {
            let total = 1 + rt + nb + l1_clusters + extra;
            let need_nb = total.div_ceil(per_block);
            let need_rt = (need_nb * 8).div_ceil(cs);
            if need_nb == nb && need_rt == rt {
                break (rt, nb);
            }
            nb = need_nb.max(nb);
            rt = need_rt.max(rt);
        }
    };
    // Refcount block cluster per refcount table entry (0: none).
    let table_of = |rt: u64, nb: u64| {
        let mut t = vec![0u64; (rt * cs / 8) as usize];
        for (b, e) in t.iter_mut().take(nb as usize).enumerate() {
            *e = 1 + rt + b as u64;
        }
        t
    };
    let (mut rt_clusters, mut blocks) = skeleton(0);
    let mut table = table_of(rt_clusters, blocks);
    // The LUKS header clusters, unless preallocated data must come first (then they are
    // allocated after it, through the node). QEMU's allocator puts them after the metadata,
    // with the refcount blocks they need after them; where that would need a bigger refcount
    // table, the skeleton is sized to cover them instead.
    let luks_clusters = crypt.as_ref().map_or(0, |c| c.area_len().div_ceil(cs));
    let mut luks_at = None;
    if luks_clusters > 0 && prealloc == basalt_engine::Prealloc::Off {
        let used = 1 + rt_clusters + blocks + l1_clusters;
        match encrypt::qemu_placement(&mut table, used, luks_clusters, per_block) {
            Some((start, _)) => luks_at = Some(start),
            None => {
                (rt_clusters, blocks) = skeleton(luks_clusters);
                table = table_of(rt_clusters, blocks);
                luks_at = Some(1 + rt_clusters + blocks + l1_clusters);
            }
        }
    }
    let rt_off = cs;
    let rb_off = rt_off + rt_clusters * cs;
    let l1_off = rb_off + blocks * cs;
    let total = 1 + rt_clusters + blocks + l1_clusters;

    let mut incompatible = 0;
    if compression != 0 {
        incompatible |= INCOMPAT_COMPRESSION;
    }
    if extended_l2 {
        incompatible |= INCOMPAT_EXTL2;
    }
    if data_file.is_some() {
        incompatible |= header::INCOMPAT_DATA_FILE;
    }
    let static_crypt = crypt.as_ref().filter(|_| prealloc == basalt_engine::Prealloc::Off);
    let hdr = Qcow2Header {
        version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size,
        crypt_method: static_crypt.map_or(0, |c| c.header_value()),
        l1_size: l1_size as u32,
        l1_table_offset: l1_off,
        refcount_table_offset: rt_off,
        refcount_table_clusters: rt_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible,
        // Basalt keeps refcounts up to date even with lazy refcounts (always valid); the bit
        // tells other programs they may postpone them.
        compatible: if lazy { crate::qcow2::header::COMPAT_LAZY_REFCOUNTS } else { 0 },
        autoclear: if data_raw { header::AUTOCLEAR_DATA_FILE_RAW } else { 0 },
        refcount_order,
        header_length: if version >= 3 { 112 } else { 72 },
        compression_type: compression,
        // As QEMU orders them: the data file name, then the LUKS header's place.
        extensions: data_file
            .iter()
            .map(|df| header::Extension { kind: header::EXT_DATA_FILE, data: df.as_bytes().to_vec() })
            .chain(static_crypt.zip(luks_at).map(|(c, at)| c.extension(at * cs)))
            .collect(),
        backing_file,
        backing_format: backing_fmt,
        data_file: data_file.clone(),
        feature_names: Vec::new(),
    };
    let mut cluster0 = hdr.serialize().map_err(BlockError::from)?;
    cluster0.resize(cs as usize, 0);
    let reftable: Vec<u8> = table.iter().flat_map(|c| (c * cs).to_be_bytes()).collect();
    // Every cluster in use: the metadata, the LUKS header clusters and the refcount blocks
    // placed after them; each counted in the block of its range.
    let mut refblocks: std::collections::BTreeMap<usize, Vec<u8>> =
        table.iter().enumerate().filter(|(_, c)| **c != 0).map(|(i, _)| (i, vec![0u8; cs as usize])).collect();
    let luks_range = luks_at.map_or(0..0, |a| a..a + luks_clusters);
    let placed = table.iter().copied().filter(|&c| c >= total && !luks_range.contains(&c));
    for c in (0..total).chain(luks_range.clone()).chain(placed) {
        let blk = refblocks.get_mut(&((c / per_block) as usize)).ok_or_else(|| {
            BlockError::new(ErrorKind::Io, format!("qcow2 create: cluster {c} has no refcount block (layout bug)"))
        })?;
        refcount::set(blk, refcount_order, c % per_block, 1);
    }

    let mut flags = OpenFlags::read_write();
    flags.perm = Perm::CONSISTENT_READ.with(Perm::WRITE).with(Perm::RESIZE);
    let mut fo = Opts::new();
    fo.set("filename", filename);
    let file = graph.open_protocol(fo, flags).await?;
    let q = Queue::new(file.clone())?;
    let write = |off: u64, data: Vec<u8>| {
        let q = q.clone();
        async move { q.write(off, IoBuf::from_slice(&data), Default::default()).await.res }
    };
    let ctx = |e| BlockError::from(e).context(format!("Could not write qcow2 metadata to '{filename}'"));
    write(0, cluster0).await.map_err(ctx)?;
    write(rt_off, reftable).await.map_err(ctx)?;
    for (i, b) in refblocks {
        write(table[i] * cs, b).await.map_err(ctx)?;
    }
    write(l1_off, vec![0u8; (l1_size * 8).max(8) as usize]).await.map_err(ctx)?;
    if let (Some(luks), Some(at)) = (static_crypt.and_then(|c| c.luks.as_ref()), luks_at) {
        // As QEMU: the header clusters are zeroed (allocated) whole, then the header written.
        let z = basalt_engine::ZeroFlags { may_unmap: false, no_fallback: false, fua: false };
        q.write_zeroes(at * cs, luks_clusters * cs, z).await.res.map_err(ctx)?;
        write(at * cs, luks.area.clone()).await.map_err(ctx)?;
    }
    q.flush().await.res.map_err(ctx)?;
    graph.remove(file.node_name());
    drop(q);
    drop(file);
    if prealloc != basalt_engine::Prealloc::Off {
        // Preallocated as a plain image; encryption is set up after it, as QEMU orders it.
        let mut o = Opts::new();
        o.set("driver", "qcow2");
        o.set("file.filename", filename);
        if let Some(df) = &data_file {
            o.set("data-file.filename", df.clone());
        }
        let node = graph.open(o, OpenFlags::read_write()).await?;
        let qn = node
            .as_any()
            .downcast_ref::<crate::qcow2::Qcow2Node>()
            .ok_or_else(|| BlockError::new(ErrorKind::Io, "not a qcow2 node"))?;
        qn.preallocate(prealloc).await?;
        if let Some(c) = &crypt {
            qn.attach_encryption(c).await?;
        }
        graph.remove(node.node_name());
    }
    Ok(())
}
