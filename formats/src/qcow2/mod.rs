//! The qcow2 format: open, read, write, create; backing files, zero clusters, discard,
//! compressed clusters (zlib, zstd), extended L2 entries, every cluster size from 512 bytes to
//! 2 MiB and refcount width from 1 to 64 bits.
//!
//! Layout of the folder: `header` (parse/serialise, no I/O), `entry` (L1/L2 entry decoding),
//! `refcount` (refcount block entries), `compress`, `meta` (cached tables and the ordered,
//! written-through metadata updates), `io` (the data path), `create`, `resize` (growing with
//! data preallocation).
//!
//! Several reactors: every reactor that opens the node gets its own queue; the caches, the
//! allocation lock, the set of guest clusters being allocated and the count of writes in
//! flight (`basalt_engine::InFlightGroup`, drained before a cluster is freed) are shared, so
//! allocations, copy-on-write, zeroing and discards on different cores stay consistent.
//!
//! Lazy refcounts: refcounts are always kept up to date (a valid way to implement them), and a
//! dirty image left by another program is repaired on a read-write open, as QEMU does.
//!
//! Internal snapshots (`snapshot`, `snapshot_ops`): create, revert, delete; writes copy
//! clusters and L2 tables that a snapshot shares.
//!
//! Persistent dirty bitmaps (`bitmap`, `bitmap_ops`): loaded and marked in use on a
//! read-write open, recording writes, stored on [`Node::close`]; other autoclear bits are
//! cleared on a read-write open, as the spec requires of a program that does not keep what
//! they protect.
//!
//! Encryption (`encrypt`): `encrypt.format=luks` and the legacy `aes`, opened, read, written,
//! created and checked as QEMU does (compressed writes into an encrypted image are refused).
//!
//! External data files (`data_file`, `data_file_raw`): data clusters live in the data file at
//! host offset == guest offset (as QEMU always maps them), without refcounts; L2 entries still
//! record the allocation. Compressed writes and internal snapshots are refused, as QEMU refuses
//! them; with `data_file_raw` a zero write zeroes the data file too, so it stays a valid raw
//! image. Encryption works with a data file as QEMU does it: the ciphertext sits in the data
//! file at the guest offset (so LUKS's host-sector IVs are the guest sectors), the LUKS header
//! stays in the qcow2 file; `falloc`/`full` preallocate the data file and map every cluster.
//! A cluster dropped by a discard or an unmapping zero write is discarded in a non-raw data
//! file. Resizing resizes the data file too, and `resize --preallocation` maps the new
//! clusters and grows the data file as QEMU 10 does.
//!
//! Resizing: growing over a backing file longer than the old size zeroes the new area (zero
//! clusters, explicit zeroes for an unaligned head; refused on version 2, which has no zero
//! clusters), as QEMU does, so the backing file's data does not show there;
//! `--preallocation=metadata` maps the new clusters (the head of a newly mapped cluster keeps
//! what it read); `falloc`/`full` without a data file (`resize`) put new refcount structures
//! and the data in one area at the end of the file, as QEMU does.

mod amend;
mod bitmap;
mod bitmap_ops;
mod check;
mod compress;
mod create;
mod encrypt;
mod entry;
mod error;
pub mod fuzz;
mod header;
mod io;
mod lock;
mod meta;
mod refcount;
mod resize;
mod snapshot;
mod snapshot_ops;

use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use basalt_engine::{
    BlockDriver, BlockError, BlockResult, Child, ChildRole, CreateOptDesc, DriverKind, ErrorKind, Graph, Limits, LocalBoxFuture,
    Node, NodeQueue, OpenFlags, Opts, Perm, Prealloc, Queue,
};
use basalt_reactor::IoBuf;

pub use amend::amend_opts;
pub use bitmap_ops::BitmapSummary;
pub use check::{CheckReport, Repair};
pub use compress::CompressionType;
pub use error::Qcow2Error;
pub use header::Qcow2Header;
pub use refcount::refcount_metadata_clusters;

use entry::Layout;
use meta::{Meta, Shared};

/// The `qcow2` format driver.
pub struct Qcow2Driver;

/// Driver instance for the registry.
pub static QCOW2: Qcow2Driver = Qcow2Driver;

/// Deepest backing chain accepted (a loop in a chain ends here with an error).
const MAX_CHAIN: usize = 64;

thread_local! {
    static DEPTH: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl BlockDriver for Qcow2Driver {
    fn name(&self) -> &'static str {
        "qcow2"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }
    fn probe(&self, head: &[u8], _filename: &str) -> u8 {
        if head.len() >= 8
            && head[..4] == [b'Q', b'F', b'I', 0xfb]
            && u32::from_be_bytes([head[4], head[5], head[6], head[7]]) >= 2
        {
            100
        } else {
            0
        }
    }
    fn open<'a>(&'a self, graph: &'a Graph, opts: Opts, flags: OpenFlags) -> LocalBoxFuture<'a, BlockResult<Arc<dyn Node>>> {
        Box::pin(async move {
            let d = DEPTH.with(|d| {
                d.set(d.get() + 1);
                d.get()
            });
            struct Back;
            impl Drop for Back {
                fn drop(&mut self) {
                    DEPTH.with(|d| d.set(d.get() - 1));
                }
            }
            let _back = Back;
            if d > MAX_CHAIN {
                return Err(BlockError::new(ErrorKind::InvalidFormat, "Backing chain is too deep (is there a loop?)"));
            }
            open(graph, opts, flags).await
        })
    }
    fn supports_compression(&self) -> bool {
        true
    }
    fn create_opts(&self) -> &'static [CreateOptDesc] {
        create::CREATE_OPTS
    }
    fn create<'a>(&'a self, graph: &'a Graph, filename: &'a str, size: u64, opts: Opts) -> LocalBoxFuture<'a, BlockResult<()>> {
        Box::pin(create::create(graph, filename, size, opts))
    }
}

/// `graph.open` as a boxed future built in this small frame: opening a backing chain nests
/// opens, and a debug build would otherwise keep a copy of the whole future in every level's
/// stack frame.
#[inline(never)]
fn open_boxed<'a>(graph: &'a Graph, opts: Opts, flags: OpenFlags) -> LocalBoxFuture<'a, BlockResult<Arc<dyn Node>>> {
    Box::pin(graph.open(opts, flags))
}

/// A repairing check as a boxed future built in this small frame (see [`open_boxed`]).
#[inline(never)]
fn check_boxed(node: &Qcow2Node) -> LocalBoxFuture<'_, BlockResult<CheckReport>> {
    Box::pin(node.check(check::Repair::All))
}

fn unsupported(msg: impl Into<String>) -> BlockError {
    BlockError::new(ErrorKind::Unsupported, msg)
}

fn no_data_file() -> BlockError {
    BlockError::new(ErrorKind::PermissionDenied, "The qcow2 image was opened without its external data file and cannot do I/O")
}

async fn open(graph: &Graph, mut opts: Opts, flags: OpenFlags) -> BlockResult<Arc<dyn Node>> {
    let name = graph.take_node_name(&mut opts)?;
    let read_only = opts.take_bool("read-only", flags.read_only)?;
    let mut cflags = flags.clone();
    cflags.read_only = read_only;
    cflags.cache_direct = opts.take_bool("cache.direct", flags.cache_direct)?;
    cflags.no_flush = opts.take_bool("cache.no-flush", flags.no_flush)?;
    cflags.probed = false;
    // The file: we write and resize it; others may neither (unless sharing is forced).
    cflags.perm = if read_only { Perm::CONSISTENT_READ } else { Perm::CONSISTENT_READ.with(Perm::WRITE).with(Perm::RESIZE) };
    let force_share = opts.take_bool("force-share", flags.force_share)?;
    cflags.force_share = force_share;
    cflags.shared = if force_share { Perm::ALL } else { flags.shared.without(Perm::WRITE).without(Perm::RESIZE) };
    let l2_cache = opts.take_size("l2-cache-size", 0)?;
    let rc_cache = opts.take_size("refcount-cache-size", 0)?;
    let cache_size = opts.take_size("cache-size", 0)?;
    // Seconds after which cached tables unused since the last sweep are dropped (0: never).
    let clean_interval = opts.take_u64("cache-clean-interval", 600)?;
    // Refcounts are always kept up to date (and the dirty bit never set), which is a valid
    // implementation of lazy refcounts; the option is accepted either way.
    let _ = opts.take_bool("lazy-refcounts", false)?;
    let pass_discard = opts.take_bool("pass-discard-request", true)?;
    let _ = opts.take_bool("pass-discard-snapshot", true)?;
    let _ = opts.take_bool("pass-discard-other", false)?;
    if opts.take_bool("discard-no-unref", false)? {
        return Err(unsupported("discard-no-unref=on is not supported yet"));
    }
    if let Some(o) = opts.take_str("overlap-check") {
        if o != "none" {
            return Err(unsupported(format!("overlap-check={o} is not implemented (only 'none')")));
        }
    }
    let crypt_opts = encrypt::take_open_opts(&mut opts);
    // The data file child's options, taken before the file child's (`open_child` takes its own
    // role's keys only).
    let data_opt = opts.contains("data-file") || opts.has_sub("data-file");
    let mut data_opts = Opts::new();
    if let Some(r) = opts.take_str("data-file") {
        data_opts.set("data-file", r);
    }
    data_opts.insert_sub("data-file", opts.take_sub("data-file"));
    let fault = opts.take_str("x-fault");
    let fault_after = opts.take_u64("x-fault-after", 1)?;
    if let Some(f) = &fault {
        if !meta::FAULT_POINTS.contains(&f.as_str()) {
            return Err(BlockError::option(format!(
                "Unknown fault injection point '{f}' (one of: {})",
                meta::FAULT_POINTS.join(", ")
            )));
        }
    }
    opts.take_enum("discard", &["ignore", "off", "unmap", "on"], "ignore")?;
    opts.take_enum("detect-zeroes", &["off"], "off")?;
    let backing_opt = if opts.contains("backing") || opts.has_sub("backing") { Some(()) } else { None };
    let mut backing_opts = opts.take_sub("backing");
    let backing_ref = opts.take_str("backing");
    let file = graph.open_child(&mut opts, ChildRole::File, cflags.clone()).await?;
    opts.expect_empty("Block format", "qcow2")?;

    let fq = Queue::new(file.clone())?;
    let fsize = file.size();
    let head_len = fsize.min(4096) as usize;
    if head_len < 72 {
        return Err(Qcow2Error::NotQcow2.into());
    }
    let d = fq.read(0, IoBuf::new_uninit(head_len)).await;
    d.res.map_err(|e| BlockError::from(e).context("Could not read qcow2 header"))?;
    let head = d.buf.expect("read returns its buffer");
    let bits = u32::from_be_bytes([head[20], head[21], head[22], head[23]]);
    let buf = if (9..=21).contains(&bits) && (1u64 << bits) > head_len as u64 && fsize > head_len as u64 {
        let n = fsize.min(1 << bits) as usize;
        let d = fq.read(0, IoBuf::new_uninit(n)).await;
        d.res.map_err(|e| BlockError::from(e).context("Could not read qcow2 header"))?;
        d.buf.expect("read returns its buffer").to_vec()
    } else {
        head.to_vec()
    };
    let hdr = Qcow2Header::parse(&buf, fsize)?;
    // An open that takes no permission does no I/O (qemu-img info): no key is needed.
    let no_io = flags.perm == Perm::NONE;
    let crypt = encrypt::open(graph, &fq, &hdr, fsize, &crypt_opts, no_io).await?;
    let has_data_file = hdr.incompatible & header::INCOMPAT_DATA_FILE != 0;
    let data_raw = has_data_file && hdr.autoclear & header::AUTOCLEAR_DATA_FILE_RAW != 0;
    let data_file = if !has_data_file {
        if data_opt {
            return Err(BlockError::option("'data-file' can only be set for images with an external data file"));
        }
        None
    } else if no_io {
        // `qemu-img info` opens no data file (and works without it), as QEMU.
        None
    } else {
        if !data_opt {
            let name = hdr.data_file.as_deref().ok_or_else(|| BlockError::option("'data-file' is required for this image"))?;
            // As QEMU 10 opens it: the name as stored, not resolved relative to the image
            // (`qemu-img` run from another directory fails to find it likewise).
            data_opts.set("data-file.filename", name.to_string());
        }
        let mut df = cflags.clone();
        df.perm = if read_only { Perm::CONSISTENT_READ } else { Perm::CONSISTENT_READ.with(Perm::WRITE) };
        Some(graph.open_child(&mut data_opts, ChildRole::DataFile, df).await?)
    };
    let dirty = hdr.incompatible & header::INCOMPAT_DIRTY != 0;
    let corrupt = hdr.incompatible & header::INCOMPAT_CORRUPT != 0;
    if !read_only && corrupt {
        return Err(BlockError::new(ErrorKind::Corrupt, "qcow2: Image is corrupt; cannot be opened read/write"));
    }
    let cs = hdr.cluster_size();
    let snapshots = snapshot_ops::load(&fq, &hdr, fsize).await?;
    // Tables.
    let l1_bytes = u64::from(hdr.l1_size) * 8;
    let l1 = if l1_bytes > 0 {
        let d = fq.read(hdr.l1_table_offset, IoBuf::new_uninit(l1_bytes as usize)).await;
        d.res.map_err(|e| BlockError::from(e).context("Could not read L1 table"))?;
        meta::be_words(&d.buf.expect("read returns its buffer"))
    } else {
        Vec::new()
    };
    let rt_bytes = u64::from(hdr.refcount_table_clusters) * cs;
    let reftable = if rt_bytes > 0 {
        let d = fq.read(hdr.refcount_table_offset, IoBuf::new_uninit(rt_bytes as usize)).await;
        d.res.map_err(|e| BlockError::from(e).context("Could not read refcount table"))?;
        meta::be_words(&d.buf.expect("read returns its buffer"))
    } else {
        Vec::new()
    };
    // Cache sizes: QEMU's defaults (enough L2 to cover the disk, up to 32 MiB).
    let layout = Layout { cluster_bits: hdr.cluster_bits, extended_l2: hdr.extended_l2(), data_file: has_data_file };
    let l2_cover = cs * hdr.l2_entries();
    let want_l2 = if l2_cache > 0 {
        l2_cache
    } else if cache_size > 0 {
        cache_size * 4 / 5
    } else {
        (hdr.size.div_ceil(l2_cover) * cs).min(32 << 20)
    };
    let want_rc = if rc_cache > 0 { rc_cache } else { (want_l2 / 4).max(4 * cs) };

    // Backing file.
    let backing =
        if backing_opt.is_some() {
            match backing_ref.as_deref() {
                Some("") | Some("null") => None,
                Some(r) => Some(graph.node(r).ok_or_else(|| {
                    BlockError::new(ErrorKind::NotFound, format!("Cannot find device='{r}' nor node-name='{r}'"))
                })?),
                None => {
                    let mut bf = OpenFlags::read_only();
                    if no_io {
                        bf.perm = Perm::NONE;
                    }
                    bf.cache_direct = cflags.cache_direct;
                    bf.aio = cflags.aio;
                    bf.shared = Perm::ALL.without(Perm::WRITE).without(Perm::RESIZE);
                    if !backing_opts.contains("driver") && !backing_opts.contains("filename") && !backing_opts.has_sub("file") {
                        if let Some(b) = &hdr.backing_file {
                            backing_opts.set("file.filename", basalt_engine::resolve_relative(&file.filename(), b));
                        }
                    }
                    Some(open_boxed(graph, backing_opts, bf).await?)
                }
            }
        } else if let Some(b) = &hdr.backing_file {
            let mut bo = Opts::new();
            let path = basalt_engine::resolve_relative(&file.filename(), b);
            match &hdr.backing_format {
                Some(f) => {
                    bo.set("driver", f.clone());
                    bo.set("file.filename", path);
                }
                None => bo.set("filename", path),
            }
            let mut bf = OpenFlags::read_only();
            if no_io {
                bf.perm = Perm::NONE;
            }
            bf.cache_direct = cflags.cache_direct;
            bf.aio = cflags.aio;
            bf.shared = Perm::ALL.without(Perm::WRITE).without(Perm::RESIZE);
            let node = open_boxed(graph, bo, bf).await.map_err(|e| e.context("Could not open backing file"))?;
            Some(node)
        } else {
            None
        };

    let mut hdr = hdr;
    let bitmaps = bitmap_ops::load(&fq, &hdr, fsize, !read_only).await?;
    // Autoclear bits protect what a program that does not maintain it must drop: we keep the
    // bitmaps (when we loaded them) and a raw external data file (which we keep valid).
    let keep = if bitmaps.list.is_empty() { 0 } else { bitmap::AUTOCLEAR_BITMAPS }
        | if data_raw { header::AUTOCLEAR_DATA_FILE_RAW } else { 0 };
    if !read_only && hdr.autoclear & !keep != 0 {
        hdr.autoclear &= keep;
        if hdr.version >= 3 {
            let d = fq.write(88, IoBuf::from_slice(&hdr.autoclear.to_be_bytes()), Default::default()).await;
            d.res.map_err(|e| BlockError::from(e).context("Could not update qcow2 header"))?;
        }
    }
    let tracking = bitmaps.list.iter().any(|b| b.bits.is_some() && b.entry.enabled());
    let filename = match &crypt_opts.key_secret {
        // As QEMU: the key secret is an option the filename must keep.
        Some(k) => encrypt::json_filename(&file, k)?,
        None => file.filename(),
    };
    let shared = Shared {
        name,
        filename,
        file,
        backing,
        data_file,
        data_raw,
        read_only,
        layout,
        cluster_bits: hdr.cluster_bits,
        cs,
        l2_entries: hdr.l2_entries(),
        words: if hdr.extended_l2() { 2 } else { 1 },
        refcount_order: hdr.refcount_order.into(),
        compression: CompressionType::from_header(hdr.compression_type),
        meta: Mutex::new(Meta::new(l1, reftable, (want_l2 / cs) as usize, (want_rc / cs) as usize)),
        hdr: Mutex::new(hdr),
        alloc: Default::default(),
        corrupt: AtomicBool::new(corrupt),
        inflight: Default::default(),
        allocating: Default::default(),
        pass_discard,
        zero_from: fsize.into(),
        prealloc_end: fsize.next_multiple_of(cs).into(),
        open_size: fsize.next_multiple_of(cs),
        compress_cursor: 0.into(),
        fault: Default::default(),
        snapshots: Mutex::new(snapshots),
        bitmaps: std::sync::RwLock::new(bitmaps),
        clean_interval,
        cleaner: AtomicBool::new(false),
        tracking: AtomicBool::new(tracking),
        meta_prealloc: Default::default(),
        crypt,
    };
    if let Some(f) = fault {
        shared.fault.arm(f, fault_after.min(u64::from(u32::MAX)) as u32);
    }
    let node = Qcow2Node { s: Arc::new(shared) };
    if dirty && !read_only {
        // Left dirty by a program using lazy refcounts: rebuild the refcounts, then clear the
        // bit (QEMU repairs the same way on open).
        let report = check_boxed(&node).await?;
        // What was repaired goes to stderr, as QEMU prints it there on open.
        for m in &report.messages {
            eprintln!("{m}");
        }
        if report.corruptions > 0 {
            return Err(BlockError::new(ErrorKind::Corrupt, "qcow2: Could not repair dirty image: corruptions remain"));
        }
        let inc = {
            let mut h = node.s.hdr.lock().unwrap_or_else(|e| e.into_inner());
            h.incompatible &= !header::INCOMPAT_DIRTY;
            h.incompatible
        };
        let d = fq.write(72, IoBuf::from_slice(&inc.to_be_bytes()), Default::default()).await;
        d.res.map_err(|e| BlockError::from(e).context("Could not update qcow2 header"))?;
        fq.flush().await.res.map_err(BlockError::from)?;
    }
    Ok(Arc::new(node))
}

/// A qcow2 node.
pub struct Qcow2Node {
    s: Arc<Shared>,
}

impl Qcow2Node {
    /// Check the image's reference counts and metadata (`qemu-img check`), repairing as asked.
    /// Must run on a reactor; repairs need a read-write node.
    pub async fn check(&self, repair: Repair) -> BlockResult<CheckReport> {
        if repair != Repair::None && self.s.read_only {
            return Err(BlockError::new(ErrorKind::PermissionDenied, "Cannot repair a read-only image"));
        }
        let file = Queue::new(self.s.file.clone())?;
        let _g = self.s.alloc.lock().await;
        check::check(&self.s, &file, repair).await.map_err(|e| BlockError::from(e).context("Check failed"))
    }

    /// Give back the space zeroed ahead of allocations and never used, so that the file ends
    /// where one QEMU wrote would: after the last byte written (compressed data ends a file
    /// mid-cluster), and never before a cluster in use or the file's size at open. Only what
    /// zeroing ahead added is cut.
    async fn trim_zeroed_ahead(&self) -> BlockResult<()> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.s.prealloc_end.load(Relaxed) <= self.s.open_size {
            return Ok(());
        }
        let cs = self.s.cs;
        let file = Queue::new(self.s.file.clone())?;
        let meta = meta::MetaIo { s: &self.s, file: &file };
        let _g = self.s.alloc.lock().await;
        let f = |e: basalt_engine::IoStatus| BlockError::from(e).context("Could not trim the qcow2 image");
        let mut used = meta.used_end().await.map_err(f)?;
        // The last cluster in use holds compressed data up to the cursor, and nothing after.
        let cursor = self.s.compress_cursor.load(Relaxed);
        if !cursor.is_multiple_of(cs) && cursor.next_multiple_of(cs) == used {
            used = cursor;
        }
        let end = used.max(self.s.zero_from.load(Relaxed));
        if self.s.file.size() > end {
            self.s.file.truncate(end, Prealloc::Off).await?;
        }
        Ok(())
    }

    /// Allocate every cluster of the image (`preallocation=metadata|falloc|full`): for each L2
    /// table's range, the table and then its data clusters, as QEMU lays them out; then the file
    /// is extended to the end of the data, with fallocate (`falloc`) or zeroes (`full`). With an
    /// external data file the clusters map 1:1 into it and the data file is what is extended.
    pub async fn preallocate(&self, mode: Prealloc) -> BlockResult<()> {
        let file = Queue::new(self.s.file.clone())?;
        let meta = meta::MetaIo { s: &self.s, file: &file };
        let _g = self.s.alloc.lock().await;
        self.preallocate_locked(&meta, &file, 0, self.size(), mode).await
    }

    /// Allocate the clusters of guest bytes `from..to` (QEMU's `preallocate_co`), the
    /// allocation lock held: a cluster already allocated (the one holding `from` may be) is
    /// left as it is. The file (or the external data file) is then extended to cover them,
    /// with `mode`'s data preallocation (none for `metadata`).
    async fn preallocate_locked(
        &self,
        meta: &meta::MetaIo<'_>,
        file: &Queue,
        from: u64,
        to: u64,
        mode: Prealloc,
    ) -> BlockResult<()> {
        let fail = |e: basalt_engine::IoStatus| BlockError::from(e).context("Could not preallocate the image");
        let cs = self.s.cs;
        // An external data file maps 1:1 and keeps no refcounts.
        let ext_data = self.s.layout.data_file;
        let total = to.div_ceil(cs);
        let mut gc = from / cs;
        // The head of a newly mapped cluster holding `from`, which QEMU fills with zeroes
        // (its copy on write) in a data file.
        let mut head = 0..0;
        if gc < total && !from.is_multiple_of(cs) {
            if meta.entry(gc).await.map_err(fail)? != (0, 0) {
                gc += 1;
            } else {
                head = gc * cs..from;
            }
        }
        let first = gc;
        let mut end = self.s.file.size();
        let mut head_host = None;
        while gc < total {
            let n = (self.s.l2_entries - gc % self.s.l2_entries).min(total - gc);
            meta.ensure_l2(gc).await.map_err(fail)?;
            let host = if ext_data { gc * cs } else { meta.alloc_clusters(n).await.map_err(fail)? };
            if gc == first {
                head_host = Some(host);
            }
            for k in 0..n {
                meta.set_entry(gc + k, (host + k * cs) | entry::COPIED, 0, false).await.map_err(fail)?;
            }
            if !ext_data {
                end = end.max(host + n * cs);
            }
            gc += n;
        }
        meta.writeback().await.map_err(fail)?;
        self.s.zero_from.fetch_max(end, std::sync::atomic::Ordering::Relaxed);
        let data_mode = if mode == Prealloc::Metadata { Prealloc::Off } else { mode };
        if ext_data {
            // As QEMU 10 does it (seen in its system calls): the partial clusters at both ends
            // of the range get their parts outside it written with zeroes (its copy on write,
            // which extends the data file to a cluster boundary); only then, if the data file
            // is still short of `to` (a cluster-aligned end), is it grown with the data
            // preallocation.
            let data = self.s.data_file.as_ref().ok_or_else(no_data_file)?;
            let tail = if to.is_multiple_of(cs) || first >= total { 0..0 } else { to..to.next_multiple_of(cs) };
            let q = Queue::new(data.clone())?;
            for r in [head, tail].into_iter().filter(|r| !r.is_empty()) {
                let z = IoBuf::from_slice(&vec![0u8; (r.end - r.start) as usize]);
                q.write(r.start, z, Default::default()).await.res.map_err(fail)?;
            }
            q.flush().await.res.map_err(fail)?;
            if to > data.size() {
                data.truncate(to, data_mode).await?;
            }
        } else {
            if let (false, Some(host)) = (head.is_empty(), head_host) {
                // As QEMU's copy on write of the new cluster's head: what it read before (the
                // backing file's data, or zeroes) is written into it.
                let len = (head.end - head.start) as usize;
                let mut buf = IoBuf::new(len);
                if let Some(b) = &self.s.backing {
                    let have = b.size().saturating_sub(head.start).min(len as u64) as usize;
                    if have > 0 {
                        buf.slice(0, have);
                        let d = Queue::new(b.clone())?.read(head.start, buf).await;
                        d.res.map_err(fail)?;
                        buf = d.buf.expect("read returns its buffer");
                        buf.reset(len);
                    }
                }
                if let Some(c) = &self.s.crypt {
                    buf = c.encrypted_copy(head.start, host, &buf).map_err(fail)?;
                }
                file.write(host, buf, Default::default()).await.res.map_err(fail)?;
            }
            if end > self.s.file.size() {
                self.s.file.truncate(end, data_mode).await?;
            }
        }
        file.flush().await.res.map(|_| ()).map_err(BlockError::from)
    }

    /// The data path on the calling reactor.
    fn io_queue(&self) -> BlockResult<Rc<io::Qcow2Queue>> {
        let file = Queue::new(self.s.file.clone())?;
        let backing = match &self.s.backing {
            Some(b) => Some(Queue::new(b.clone())?),
            None => None,
        };
        let data = match (&self.s.data_file, self.s.layout.data_file) {
            (Some(d), _) => Queue::new(d.clone())?,
            (None, false) => file.clone(),
            (None, true) => {
                return Err(BlockError::new(
                    ErrorKind::PermissionDenied,
                    "The qcow2 image was opened without its external data file and cannot do I/O",
                ))
            }
        };
        Ok(Rc::new(io::Qcow2Queue::new(self.s.clone(), file, data, backing)))
    }

    /// After growing from `old` to `new` over a backing file longer than `old`: the new area
    /// must read as zeroes, not as the backing file (QEMU's `BDRV_REQ_ZERO_WRITE` truncate):
    /// zero clusters from the first (sub)cluster boundary to the end, explicit zeroes for the
    /// unaligned head.
    async fn zero_grown(&self, old: u64, new: u64) -> BlockResult<()> {
        let q = self.io_queue()?;
        let fail = |e: basalt_engine::IoStatus| BlockError::from(e).context("Failed to zero out new clusters");
        let zero_start = old.next_multiple_of(self.s.layout.subcluster_size());
        if new > zero_start {
            // The last cluster is zeroed whole: nothing lies past the end of the image.
            let end = new.next_multiple_of(self.s.cs);
            q.clone().zero_range(zero_start, end - zero_start).await.res.map_err(fail)?;
        }
        if zero_start > old {
            let len = zero_start.min(new) - old;
            q.write_range(old, IoBuf::new(len as usize)).await.res.map_err(fail)?;
        }
        // Tables changed by the writes go to the file now, as the rest of the resize did.
        let file = Queue::new(self.s.file.clone())?;
        let meta = meta::MetaIo { s: &self.s, file: &file };
        let _g = self.s.alloc.lock().await;
        meta.writeback().await.map_err(fail)?;
        file.flush().await.res.map(|_| ()).map_err(BlockError::from)
    }

    /// Make every cluster unallocated (reads come from the backing file again), freeing what
    /// they held, as `commit` leaves the top image. Entries are written before refcounts drop.
    pub async fn make_empty(&self) -> BlockResult<()> {
        if self.s.read_only {
            return Err(BlockError::new(ErrorKind::PermissionDenied, "Image is read-only"));
        }
        let file = Queue::new(self.s.file.clone())?;
        let meta = meta::MetaIo { s: &self.s, file: &file };
        let fail = |e: basalt_engine::IoStatus| BlockError::from(e).context("Could not empty the image");
        let _g = self.s.alloc.lock().await;
        meta.unmap(0..self.size().div_ceil(self.s.cs)).await.map_err(fail)?;
        file.flush().await.res.map(|_| ()).map_err(BlockError::from)
    }

    /// Record a new backing file (or none) in the header, as `rebase` does: cluster 0 is
    /// rewritten with the new name and backing-format extension. The open node keeps reading
    /// through the backing file it was opened with.
    pub async fn set_backing(&self, name: Option<&str>, fmt: Option<&str>) -> BlockResult<()> {
        if self.s.read_only {
            return Err(BlockError::new(ErrorKind::PermissionDenied, "Image is read-only"));
        }
        if name.is_some_and(|n| n.len() > 1023) {
            return Err(BlockError::option("Backing file name too long"));
        }
        let _g = self.s.alloc.lock().await;
        let mut h = self.header();
        h.backing_file = name.map(str::to_string);
        h.backing_format = if name.is_some() { fmt.map(str::to_string) } else { None };
        h.backing_file_offset = 0;
        h.backing_file_size = 0;
        let mut cluster0 = h.serialize().map_err(BlockError::from)?;
        cluster0.resize(self.s.cs as usize, 0);
        let file = Queue::new(self.s.file.clone())?;
        let d = file.write(0, IoBuf::from_slice(&cluster0), Default::default()).await;
        d.res.map_err(|e| BlockError::from(e).context("Could not update the qcow2 header"))?;
        file.flush().await.res.map_err(BlockError::from)?;
        *self.s.hdr.lock().unwrap_or_else(|e| e.into_inner()) = h;
        Ok(())
    }

    /// Move the active L1 table to a new place with `need` entries: the new table is written
    /// (and the refcounts of its clusters) before the header points at it, and the old table is
    /// freed after.
    async fn grow_l1(&self, meta: &meta::MetaIo<'_>, file: &Queue, need: u64) -> BlockResult<()> {
        let cs = self.s.cs;
        let fail = |e: basalt_engine::IoStatus| BlockError::from(e).context("Could not grow the L1 table");
        if need * 8 > header::MAX_L1_BYTES {
            return Err(BlockError::new(ErrorKind::OutOfBounds, "Active L1 table too large"));
        }
        let (old_off, old_size) = {
            let h = self.header();
            (h.l1_table_offset, u64::from(h.l1_size))
        };
        let clusters = (need * 8).div_ceil(cs);
        let new_off = meta.alloc_clusters(clusters).await.map_err(fail)?;
        let mut table: Vec<u64> = self.s.lock_meta().l1.clone();
        table.resize(need as usize, 0);
        let mut bytes: Vec<u8> = table.iter().flat_map(|v| v.to_be_bytes()).collect();
        bytes.resize((clusters * cs) as usize, 0);
        let d = file.write(new_off, IoBuf::from_slice(&bytes), Default::default()).await;
        d.res.map_err(fail)?;
        meta.writeback().await.map_err(fail)?;
        file.flush().await.res.map_err(fail)?;
        // l1_size and l1_table_offset are adjacent header fields: one write switches both.
        let mut hf = Vec::with_capacity(12);
        hf.extend_from_slice(&(need as u32).to_be_bytes());
        hf.extend_from_slice(&new_off.to_be_bytes());
        let d = file.write(36, IoBuf::from_slice(&hf), Default::default()).await;
        d.res.map_err(fail)?;
        file.flush().await.res.map_err(fail)?;
        {
            let mut h = self.s.hdr.lock().unwrap_or_else(|e| e.into_inner());
            h.l1_size = need as u32;
            h.l1_table_offset = new_off;
        }
        self.s.lock_meta().l1 = table;
        if old_size > 0 {
            // Freed without a discard, as QEMU frees it (`QCOW2_DISCARD_OTHER`, off by default):
            // the file keeps the old table's bytes.
            for k in 0..(old_size * 8).div_ceil(cs) {
                meta.add_refcount(old_off / cs + k, -1).await.map_err(fail)?;
            }
        }
        meta.writeback().await.map_err(fail)?;
        Ok(())
    }

    /// Tables in the metadata caches now: (L2 tables, refcount blocks).
    pub fn cache_usage(&self) -> (usize, usize) {
        self.s.lock_meta().cached_counts()
    }

    /// A copy of the header as it is now.
    pub fn header(&self) -> Qcow2Header {
        self.s.hdr.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Node for Qcow2Node {
    fn driver(&self) -> &'static str {
        "qcow2"
    }
    fn node_name(&self) -> &str {
        &self.s.name
    }
    fn filename(&self) -> String {
        self.s.filename.clone()
    }
    fn size(&self) -> u64 {
        self.s.hdr.lock().unwrap_or_else(|e| e.into_inner()).size
    }
    fn limits(&self) -> Limits {
        // Encrypted data is ciphered in whole 512-byte sectors (QEMU aligns requests so too).
        let align = if self.s.crypt.is_some() { crate::crypto::SECTOR_SIZE as u32 } else { 1 };
        Limits { request_alignment: align, max_transfer: 0, opt_transfer: self.s.cs as u32 }
    }
    fn read_only(&self) -> bool {
        self.s.read_only
    }
    fn is_format(&self) -> bool {
        true
    }
    fn children(&self) -> Vec<Child> {
        let mut v = vec![Child { role: ChildRole::File, node: self.s.file.clone() }];
        if let Some(b) = &self.s.backing {
            v.push(Child { role: ChildRole::Backing, node: b.clone() });
        }
        if let Some(d) = &self.s.data_file {
            v.push(Child { role: ChildRole::DataFile, node: d.clone() });
        }
        v
    }
    fn allocated_size(&self) -> Option<u64> {
        self.s.file.allocated_size()
    }
    fn host_extent(&self, off: u64, len: u64) -> Option<basalt_engine::HostExtent> {
        // Only on a read-only node: no cluster is freed and used again for other data while
        // its pages are still on their way to a client. Encrypted data is not the guest's.
        if !self.s.read_only || self.s.crypt.is_some() || len == 0 {
            return None;
        }
        let (cs, sc) = (self.s.cs, self.s.layout.subcluster_size());
        let end = off.checked_add(len)?;
        let mut start = None;
        let mut at = off;
        while at < end {
            // From the cached tables only (a copying read loads them for the next time).
            let Some(entry::Mapping::Data { host, .. }) = self.s.mapping_cached(at) else { return None };
            let here = host + at % cs;
            match start {
                None => start = Some(here),
                Some(s) if s + (at - off) != here => return None,
                Some(_) => {}
            }
            at = (at / sc + 1) * sc;
        }
        let data = if self.s.layout.data_file { self.s.data_file.as_ref()? } else { &self.s.file };
        data.host_extent(start?, len)
    }
    fn cluster_size(&self) -> Option<u64> {
        Some(self.s.cs)
    }
    fn encrypted(&self) -> bool {
        self.s.crypt.is_some()
    }
    fn format_specific(&self) -> Option<serde_json::Value> {
        let h = self.header();
        let mut data = serde_json::Map::new();
        data.insert("compat".into(), if h.version >= 3 { "1.1" } else { "0.10" }.into());
        if h.version >= 3 {
            data.insert("compression-type".into(), CompressionType::from_header(h.compression_type).name().into());
            data.insert("lazy-refcounts".into(), (h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0).into());
            let bitmaps = self.bitmap_infos();
            if !bitmaps.is_empty() {
                data.insert("bitmaps".into(), bitmaps.into());
            }
        } else {
            data.insert("compression-type".into(), "zlib".into());
        }
        data.insert("refcount-bits".into(), h.refcount_bits().into());
        if let Some(c) = &self.s.crypt {
            data.insert("encrypt".into(), c.info_json());
        }
        if h.incompatible & header::INCOMPAT_DATA_FILE != 0 {
            if let Some(d) = &h.data_file {
                data.insert("data-file".into(), d.clone().into());
            }
            data.insert("data-file-raw".into(), (h.autoclear & header::AUTOCLEAR_DATA_FILE_RAW != 0).into());
        }
        if h.version >= 3 {
            data.insert("corrupt".into(), (h.incompatible & header::INCOMPAT_CORRUPT != 0).into());
            data.insert("extended-l2".into(), h.extended_l2().into());
        }
        Some(serde_json::json!({ "type": "qcow2", "data": data }))
    }
    fn backing_info(&self) -> Option<(String, Option<String>)> {
        let h = self.header();
        h.backing_file.map(|b| (b, h.backing_format))
    }
    fn create_queue(&self) -> BlockResult<Rc<dyn NodeQueue>> {
        if self.s.crypt.as_ref().is_some_and(|c| !c.has_key()) {
            return Err(BlockError::new(
                ErrorKind::PermissionDenied,
                "The encrypted qcow2 image was opened without its key and cannot do I/O",
            ));
        }
        if self.s.clean_interval > 0 && !self.s.cleaner.swap(true, std::sync::atomic::Ordering::Relaxed) {
            let interval = std::time::Duration::from_secs(self.s.clean_interval);
            let weak = Arc::downgrade(&self.s);
            // The sweeper lives as long as the node: it holds only a weak reference.
            drop(basalt_reactor::spawn_local(async move {
                let mut since = 0;
                loop {
                    basalt_reactor::sleep(interval).await;
                    let Some(s) = weak.upgrade() else { break };
                    since = s.lock_meta().drop_unused(since);
                }
            }));
        }
        Ok(Rc::new(io::Qcow2NodeQueue(self.io_queue()?)))
    }
    fn truncate(&self, size: u64, prealloc: Prealloc) -> LocalBoxFuture<'_, BlockResult<()>> {
        Box::pin(async move {
            if self.s.read_only {
                return Err(BlockError::new(ErrorKind::PermissionDenied, "Image is read-only"));
            }
            let ext_data = self.s.layout.data_file;
            let cur = self.size();
            if prealloc != Prealloc::Off && size < cur {
                return Err(BlockError::option("Preallocation can only be used for growing images"));
            }
            // Growing over a longer backing file: the new area is zeroed with zero clusters,
            // which version 2 lacks (QEMU fails there after changing the size; we fail first).
            // `falloc`/`full` without a data file map the area to clusters the file grows
            // with zeroes instead, as QEMU does, on any version.
            let in_file = matches!(prealloc, Prealloc::Falloc | Prealloc::Full) && !ext_data;
            let over_backing = size > cur && self.s.backing.as_ref().is_some_and(|b| b.size() > cur);
            let zero_grown = over_backing && !in_file;
            if zero_grown && self.header().version < 3 {
                return Err(BlockError::new(ErrorKind::Unsupported, "Failed to zero out new clusters: Operation not supported"));
            }
            let data = match (&self.s.data_file, ext_data) {
                (Some(d), true) => Some(d.clone()),
                (None, true) => return Err(no_data_file()),
                _ => None,
            };
            let h = self.header();
            let file = Queue::new(self.s.file.clone())?;
            let meta = meta::MetaIo { s: &self.s, file: &file };
            let fail = |e: basalt_engine::IoStatus| BlockError::from(e).context("Could not resize the qcow2 image");
            let _g = self.s.alloc.lock().await;
            if size < cur {
                // Drop every cluster wholly past the new end (the entry first, then the refcount).
                let cs = self.s.cs;
                meta.unmap(size.div_ceil(cs)..cur.div_ceil(cs)).await.map_err(fail)?;
            }
            let need = size.div_ceil(self.s.cs * h.l2_entries());
            if need > u64::from(h.l1_size) {
                self.grow_l1(&meta, &file, need).await?;
            }
            // As QEMU's qcow2_co_truncate: a raw data file keeps every cluster mapped, so
            // growing preallocates at least the metadata; with a data file, `off` resizes the
            // data file to the new size and the other modes map the new clusters 1:1 and grow
            // the data file with their data preallocation.
            let prealloc = if self.s.data_raw && size > cur && prealloc == Prealloc::Off { Prealloc::Metadata } else { prealloc };
            match (prealloc, data) {
                (Prealloc::Off, Some(d)) => d.truncate(size, Prealloc::Off).await?,
                (Prealloc::Off, None) => {}
                (mode, None) if in_file => {
                    if size > cur {
                        self.grow_preallocated(&meta, &file, cur, size, mode, over_backing).await?
                    }
                }
                (mode, _) => self.preallocate_locked(&meta, &file, cur, size, mode).await?,
            }
            let d = file.write(24, IoBuf::from_slice(&size.to_be_bytes()), Default::default()).await;
            d.res.map_err(|e| BlockError::from(e).context("Could not update qcow2 header"))?;
            file.flush().await.res.map_err(BlockError::from)?;
            self.s.hdr.lock().unwrap_or_else(|e| e.into_inner()).size = size;
            drop(_g);
            self.bitmaps_resize(size);
            if zero_grown {
                self.zero_grown(cur, size).await?;
            }
            Ok(())
        })
    }
    fn close(&self) -> LocalBoxFuture<'_, BlockResult<()>> {
        Box::pin(async move {
            if self.s.read_only || self.s.fault.tripped.load(std::sync::atomic::Ordering::Relaxed) {
                return Ok(());
            }
            let mut r = self.bitmaps_store().await;
            if r.is_ok() {
                r = self.trim_zeroed_ahead().await;
            }
            // Closed: from now on every write fails, as after a crash.
            self.s.fault.tripped.store(true, std::sync::atomic::Ordering::Relaxed);
            r
        })
    }
    fn snapshots(&self) -> Vec<basalt_engine::SnapshotInfo> {
        self.snapshot_infos()
    }
    fn snapshot_create(&self, name: &str) -> LocalBoxFuture<'_, BlockResult<()>> {
        let name = name.to_string();
        Box::pin(async move { self.snapshot_create_named(&name).await })
    }
    fn snapshot_goto(&self, id_or_name: &str) -> LocalBoxFuture<'_, BlockResult<()>> {
        let name = id_or_name.to_string();
        Box::pin(async move { self.snapshot_goto_named(&name).await })
    }
    fn snapshot_delete(&self, name: &str) -> LocalBoxFuture<'_, BlockResult<()>> {
        let name = name.to_string();
        Box::pin(async move { self.snapshot_delete_named(&name).await })
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
