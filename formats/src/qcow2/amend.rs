//! `amend` for qcow2: change an image's options in place, as `qemu-img amend` does:
//! `compat` (0.10 <-> 1.1), `lazy_refcounts`, `refcount_bits`, `size`, the LUKS key slots of
//! an `encrypt.format=luks` image (`encrypt.state`, `encrypt.keyslot`, `encrypt.old-secret`,
//! `encrypt.new-secret`, `encrypt.iter-time`, through [`crate::crypto::amend`]), the external
//! data file's name (`data_file`; empty removes it from the header, as QEMU does) and clearing
//! `data_file_raw`. As in QEMU 10, `backing_file`/`backing_fmt` are accepted only when they
//! name what the image already has ("Cannot amend the backing file": `rebase` changes it), and
//! `data_file_raw=on` only on an image that has it. Options only creation can set
//! (`cluster_size`, ...) are refused with qemu-img's message. Steps run in QEMU's order
//! (upgrade, key slots, refcount width, data file header fields, backing check, lazy
//! refcounts, size, downgrade), so a refusal found late leaves what QEMU's leaves.
//!
//! Crash safety: every new structure (zeroed clusters, new refcount table and blocks) is
//! written and flushed before the header, rewritten in one write of cluster 0, switches to
//! it; what the old header used becomes free space at worst (leaks, which `check -r`
//! repairs). Downgrading to 0.10 first turns zero clusters into what version 2 can express:
//! unallocated (no backing file) or zeroed data clusters.

use std::sync::atomic::Ordering;

use basalt_engine::{BlockError, BlockResult, CreateOptDesc, ErrorKind, IoStatus, Opts, Prealloc, Queue, Secrets};

use crate::crypto::{amend_keyslots, LuksAmendOpts, LuksArea};

use crate::qcow2::check;
use crate::qcow2::encrypt::CryptMethod;
use crate::qcow2::entry::{self, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use crate::qcow2::header::{
    self, Extension, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, EXT_DATA_FILE, INCOMPAT_COMPRESSION,
};
use crate::qcow2::meta::{MResult, MetaIo};
use crate::qcow2::refcount;
use crate::qcow2::Qcow2Node;

/// Creation options `amend` also takes (`qemu-img amend -o help` lists them).
const AMENDABLE: &[&str] = &[
    "backing_file",
    "backing_fmt",
    "compat",
    "data_file",
    "data_file_raw",
    "encrypt.iter-time",
    "lazy_refcounts",
    "refcount_bits",
    "size",
];

/// Options only `amend` has: LUKS key slot management.
const AMEND_ONLY: &[CreateOptDesc] = &[
    CreateOptDesc { name: "encrypt.keyslot", kind: "num", help: "Select a single keyslot to modify explicitly" },
    CreateOptDesc {
        name: "encrypt.new-secret",
        kind: "str",
        help: "New secret to set in the matching keyslots. Empty string to erase",
    },
    CreateOptDesc { name: "encrypt.old-secret", kind: "str", help: "Select all keyslots that match this password" },
    CreateOptDesc { name: "encrypt.state", kind: "str", help: "Select new state of affected keyslots (active/inactive)" },
];

/// The options of `qemu-img amend` for qcow2: the amendable creation options and the key
/// slot options.
pub fn amend_opts() -> Vec<CreateOptDesc> {
    let mut v: Vec<CreateOptDesc> =
        crate::qcow2::create::CREATE_OPTS.iter().filter(|d| AMENDABLE.contains(&d.name)).cloned().collect();
    v.extend_from_slice(AMEND_ONLY);
    v
}

/// What `amend` asked for.
#[derive(Debug, Default)]
struct Want {
    version: Option<u32>,
    lazy: Option<bool>,
    refcount_order: Option<u32>,
    /// `refcount_bits` as given (checked after the options before it, as QEMU does).
    refcount_bits_given: Option<u32>,
    size: Option<u64>,
    backing: Option<String>,
    backing_fmt: Option<String>,
    /// `data_file`: the new name ("" removes it).
    data_file: Option<String>,
    /// `data_file_raw`.
    data_file_raw: Option<bool>,
    /// `encrypt.*` key slot options.
    keyslots: LuksAmendOpts,
    /// Some `encrypt.*` option was given.
    encrypt_given: bool,
}

fn opt_err(msg: impl Into<String>) -> BlockError {
    BlockError::option(msg)
}

/// Take the options: values checked as QEMU's option parser checks them (unknown names,
/// numbers, booleans), then the checks `qcow2_amend_options` makes against the image, in its
/// order (encryption, compat, data file, data_file_raw, refcount width).
fn parse(opts: &mut Opts, h: &header::Qcow2Header, crypt: Option<CryptMethod>) -> BlockResult<Want> {
    let mut w = Want::default();
    let mut enc = opts.take_sub("encrypt");
    w.encrypt_given = !enc.is_empty();
    w.keyslots = LuksAmendOpts::take(&mut enc, "encrypt.")?;
    // Other encrypt.* options are creation options (or unknown): refused below by name.
    for k in enc.keys().map(str::to_string).collect::<Vec<_>>() {
        if let Some(v) = enc.take_str(&k) {
            opts.set(&format!("encrypt.{k}"), v);
        }
    }
    let compat = opts.take_str("compat");
    if let Some(v) = opts.take_str("lazy_refcounts") {
        w.lazy = Some(basalt_engine::parse_bool(&v).ok_or_else(|| opt_err("Parameter 'lazy_refcounts' expects 'on' or 'off'"))?);
    }
    if let Some(v) = opts.take_str("refcount_bits") {
        let bits: u32 = v.parse().map_err(|_| opt_err(format!("Parameter 'refcount_bits' expects a number, not '{v}'")))?;
        w.refcount_bits_given = Some(bits);
    }
    if let Some(v) = opts.take_str("size") {
        w.size =
            Some(basalt_engine::parse_size(&v).ok_or_else(|| opt_err(format!("Parameter 'size' expects a size, not '{v}'")))?);
    }
    w.backing = opts.take_str("backing_file");
    w.backing_fmt = opts.take_str("backing_fmt");
    w.data_file = opts.take_str("data_file");
    if let Some(v) = opts.take_str("data_file_raw") {
        w.data_file_raw =
            Some(basalt_engine::parse_bool(&v).ok_or_else(|| opt_err("Parameter 'data_file_raw' expects 'on' or 'off'"))?);
    }
    if let Some(k) = opts.keys().next() {
        let k = k.to_string();
        let creation = crate::qcow2::create::CREATE_OPTS.iter().any(|d| d.name == k);
        return Err(if creation {
            opt_err(format!("Invalid parameter '{k}'\nThis option is only supported for image creation"))
        } else {
            opt_err(format!("Invalid parameter '{k}'"))
        });
    }
    // What qcow2_amend_options checks against the image, in its order.
    if w.encrypt_given {
        match crypt {
            None => return Err(opt_err("Can't amend encryption options - encryption not present")),
            Some(CryptMethod::Aes) => {
                return Err(BlockError::new(ErrorKind::Unsupported, "Only LUKS encryption options can be amended"))
            }
            Some(CryptMethod::Luks) => {}
        }
    }
    if let Some(v) = compat {
        w.version = Some(match v.as_str() {
            "0.10" | "v2" => 2,
            "1.1" | "v3" => 3,
            _ => return Err(opt_err(format!("Unknown compatibility level {v}"))),
        });
    }
    let has_data_file = h.incompatible & header::INCOMPAT_DATA_FILE != 0;
    let data_file_raw = has_data_file && h.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0;
    if w.data_file.is_some() && !has_data_file {
        return Err(opt_err("data-file can only be set for images that use an external data file"));
    }
    if w.data_file_raw == Some(true) && !data_file_raw {
        return Err(opt_err("data-file-raw cannot be set on existing images"));
    }
    if let Some(bits) = w.refcount_bits_given {
        if !bits.is_power_of_two() || bits > 64 {
            return Err(opt_err("Refcount width must be a power of two and may not exceed 64 bits"));
        }
        w.refcount_order = Some(bits.trailing_zeros());
    }
    Ok(w)
}

impl MetaIo<'_> {
    /// Turn every zero cluster of every L2 table (active and snapshots') into what version 2
    /// expresses: preallocated zero clusters are zeroed and become data; others become
    /// unallocated, or, over a backing file, a new zeroed cluster (counted once for every L1
    /// entry that shares its table).
    async fn expand_zero_clusters(&self, l1_tables: &[Vec<u64>], has_backing: bool) -> MResult<()> {
        let cs = self.s.cs;
        let zeros = vec![0u8; cs as usize];
        let mut done = std::collections::HashSet::new();
        for l1 in l1_tables {
            for &l1e in l1 {
                let Ok(Some(off)) = entry::l1_l2_offset(l1e, self.s.cluster_bits) else { continue };
                if !done.insert(off) {
                    continue;
                }
                let table_refs = self.refcount(off / cs).await?;
                let mut t = self.l2_table(off).await?;
                let mut changed = false;
                // Downgrades refuse extended L2 entries: one word per entry here.
                for k in (0..t.len()).step_by(self.s.words) {
                    let e = t[k];
                    if e & ZERO == 0 || e & COMPRESSED != 0 {
                        continue;
                    }
                    let host = e & OFFSET_MASK;
                    t[k] = if host != 0 {
                        self.write_bytes("data.write", host, &zeros).await?;
                        e & !ZERO
                    } else if has_backing {
                        let c = self.alloc_clusters(1).await?;
                        self.write_bytes("data.write", c, &zeros).await?;
                        if table_refs > 1 {
                            self.add_refcount(c / cs, table_refs as i64 - 1).await?;
                        }
                        c | if table_refs == 1 { COPIED } else { 0 }
                    } else {
                        0
                    };
                    changed = true;
                }
                if changed {
                    self.put_l2_table(off, t).await?;
                }
            }
        }
        self.writeback().await?;
        self.file.flush().await.res.map(|_| ())
    }
}

impl Qcow2Node {
    /// Change the image's options (`qemu-img amend -o ...`); `secrets` resolves the key slot
    /// options' secret ids, `force` is `--force` (LUKS key slot refusals QEMU lets it override).
    pub async fn amend(&self, mut opts: Opts, secrets: &Secrets, force: bool) -> BlockResult<()> {
        if self.s.read_only {
            return Err(BlockError::new(ErrorKind::PermissionDenied, "Image is read-only"));
        }
        let h = self.header();
        let w = parse(&mut opts, &h, self.s.crypt.as_ref().map(|c| c.method))?;
        let version = w.version.unwrap_or(h.version);
        let order = w.refcount_order.unwrap_or(h.refcount_order);
        let lazy = w.lazy.unwrap_or(h.compatible & COMPAT_LAZY_REFCOUNTS != 0);
        if version < 3 {
            if order != 4 {
                return Err(opt_err("compat=0.10 requires refcount_bits=16"));
            }
            if w.lazy == Some(true) {
                return Err(opt_err(
                    "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
                ));
            }
            if h.version >= 3 {
                let bad = h.incompatible & !(header::INCOMPAT_DIRTY | INCOMPAT_COMPRESSION);
                if bad != 0 {
                    return Err(opt_err(format!("Cannot downgrade an image with incompatible features {bad:#x} set")));
                }
                let size = w.size.unwrap_or(h.size);
                let snaps = self.s.snapshots.lock().unwrap_or_else(|e| e.into_inner()).list.clone();
                if snaps.iter().any(|sn| sn.disk_size.is_some_and(|d| d != size)) {
                    // Version 2 snapshots cannot record a disk size other than the image's.
                    return Err(opt_err("Internal snapshots prevent downgrade of image"));
                }
                if h.compression_type != 0 {
                    return Err(BlockError::new(
                        ErrorKind::Unsupported,
                        "Cannot downgrade an image compressed with zstd: version 2 images only know zlib",
                    ));
                }
            }
        }
        // Version 2 knows only 16-bit refcounts: widths change in version 3 (after an upgrade,
        // before a downgrade).
        if version >= h.version {
            self.change_version(version, lazy).await?;
        }
        if w.encrypt_given {
            self.amend_keyslots(&w.keyslots, secrets, force).await?;
        }
        if order != h.refcount_order {
            self.change_refcount_order(order).await?;
        }
        if w.data_file.is_some() || w.data_file_raw.is_some() {
            self.amend_data_file(w.data_file.as_deref(), w.data_file_raw).await?;
        }
        if (w.backing.is_some() || w.backing_fmt.is_some()) && (w.backing != h.backing_file || w.backing_fmt != h.backing_format)
        {
            // QEMU 10 changes the backing file only through `rebase`.
            return Err(opt_err("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead."));
        }
        if let Some(size) = w.size {
            if size != basalt_engine::Node::size(self) {
                basalt_engine::Node::truncate(self, size, Prealloc::Off).await?;
            }
        }
        if version < h.version {
            self.change_version(version, lazy).await?;
        }
        Ok(())
    }

    /// Add or erase LUKS key slots in the image's encryption header area.
    async fn amend_keyslots(&self, o: &LuksAmendOpts, secrets: &Secrets, force: bool) -> BlockResult<()> {
        let c = self.s.crypt.as_ref().ok_or_else(|| opt_err("Can't amend encryption options - encryption not present"))?;
        let (Some(luks), Some((off, len))) = (&c.luks, c.fde) else {
            return Err(BlockError::new(ErrorKind::Unsupported, "Only LUKS encryption options can be amended"));
        };
        let mk = c.master_key.as_ref().ok_or_else(|| opt_err("Parameter 'encrypt.key-secret' is required for cipher"))?;
        let queue = Queue::new(self.s.file.clone())?;
        let area = LuksArea { queue: &queue, base: off, len };
        let mut h = luks.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let r = amend_keyslots(&mut h, mk, &area, o, secrets, force).await;
        // What reached the disk (an erase that failed after deactivating its slot included).
        *luks.lock().unwrap_or_else(|e| e.into_inner()) = h;
        r
    }

    /// Rename the external data file in the header (`""` removes the name, so that opening
    /// needs a `data-file` option, as QEMU does) and set or clear `data_file_raw` (`parse`
    /// allowed setting it only where it is set). The open data file itself is not changed.
    async fn amend_data_file(&self, name: Option<&str>, raw: Option<bool>) -> BlockResult<()> {
        let file = Queue::new(self.s.file.clone())?;
        let meta = MetaIo { s: &self.s, file: &file };
        let _g = self.s.alloc.lock().await;
        let mut h = self.header();
        match raw {
            Some(true) => h.autoclear |= AUTOCLEAR_DATA_FILE_RAW,
            Some(false) => h.autoclear &= !AUTOCLEAR_DATA_FILE_RAW,
            None => {}
        }
        if let Some(n) = name {
            let pos = h.extensions.iter().position(|e| e.kind == EXT_DATA_FILE);
            match (n.is_empty(), pos) {
                (true, Some(i)) => {
                    h.extensions.remove(i);
                }
                (true, None) => {}
                (false, Some(i)) => h.extensions[i].data = n.as_bytes().to_vec(),
                // QEMU writes the data file name first of the extensions after the backing format.
                (false, None) => h.extensions.insert(0, Extension { kind: EXT_DATA_FILE, data: n.as_bytes().to_vec() }),
            }
            h.data_file = (!n.is_empty()).then(|| n.to_string());
        }
        self.write_header(&meta, h).await
    }

    async fn change_version(&self, version: u32, lazy: bool) -> BlockResult<()> {
        let h = self.header();
        if version == h.version && lazy == (h.compatible & COMPAT_LAZY_REFCOUNTS != 0) {
            return Ok(());
        }
        let file = Queue::new(self.s.file.clone())?;
        let meta = MetaIo { s: &self.s, file: &file };
        let f = |e: IoStatus| BlockError::from(e).context("Could not amend the image");
        if version < h.version {
            // Bitmaps cannot be kept in version 2: removed (and their clusters freed).
            let names: Vec<String> =
                self.s.bitmaps.read().unwrap_or_else(|e| e.into_inner()).list.iter().map(|b| b.entry.name.clone()).collect();
            for n in names {
                self.bitmap_remove(&n)?;
            }
            self.bitmaps_store().await?;
            let _g = self.s.alloc.lock().await;
            let mut tables = vec![self.s.lock_meta().l1.clone()];
            let snaps = self.s.snapshots.lock().unwrap_or_else(|e| e.into_inner()).list.clone();
            for sn in &snaps {
                tables.push(meta.read_l1(sn).await.map_err(f)?);
            }
            meta.expand_zero_clusters(&tables, self.s.backing.is_some()).await.map_err(f)?;
        }
        let _g = self.s.alloc.lock().await;
        meta.writeback().await.map_err(f)?;
        let mut h = self.header();
        if version < 3 {
            h.version = 2;
            h.incompatible = 0;
            h.compatible = 0;
            h.autoclear = 0;
            h.compression_type = 0;
            h.header_length = 72;
        } else {
            if h.version < 3 {
                h.version = 3;
                h.refcount_order = 4;
                h.header_length = 112;
            }
            h.compatible = if lazy { h.compatible | COMPAT_LAZY_REFCOUNTS } else { h.compatible & !COMPAT_LAZY_REFCOUNTS };
        }
        self.write_header(&meta, h).await
    }

    async fn write_header(&self, meta: &MetaIo<'_>, h: header::Qcow2Header) -> BlockResult<()> {
        let f = |e: IoStatus| BlockError::from(e).context("Could not update the qcow2 header");
        let mut cluster0 = h.serialize().map_err(BlockError::from)?;
        cluster0.resize(self.s.cs as usize, 0);
        meta.write_bytes("amend.header", 0, &cluster0).await.map_err(f)?;
        meta.file.flush().await.res.map_err(f)?;
        *self.s.hdr.lock().unwrap_or_else(|e| e.into_inner()) = h;
        Ok(())
    }

    /// Rebuild the refcount structures with entries of `1 << order` bits: counted from the
    /// metadata, written after the end of the file, then the header switched to them. The old
    /// table and blocks become free space.
    async fn change_refcount_order(&self, order: u32) -> BlockResult<()> {
        let file = Queue::new(self.s.file.clone())?;
        let meta = MetaIo { s: &self.s, file: &file };
        let f = |e: IoStatus| BlockError::from(e).context("Could not change the refcount width");
        let _g = self.s.alloc.lock().await;
        meta.writeback().await.map_err(f)?;
        file.flush().await.res.map_err(f)?;
        let (refs, report) = check::references(&self.s, &file).await.map_err(f)?;
        if report.corruptions > 0 {
            return Err(BlockError::new(ErrorKind::Corrupt, "The image is corrupt: run 'check -r all' first"));
        }
        let cs = self.s.cs;
        let max = refcount::max_refcount(order);
        if let Some((c, r)) = refs.iter().enumerate().find(|(_, r)| u64::from(**r) > max) {
            return Err(BlockError::new(
                ErrorKind::Unsupported,
                format!(
                    "Cannot decrease refcount entry width to {} bits: Cluster at offset {:#x} has a refcount of {r}",
                    1u32 << order,
                    c as u64 * cs
                ),
            ));
        }
        let used = refs.iter().rposition(|r| *r > 0).map_or(1, |i| i as u64 + 1);
        let start = used.max(self.s.file.size().div_ceil(cs));
        let per = refcount::entries_per_block(self.s.cluster_bits, order);
        // The new blocks and table go at `start`; they describe themselves too.
        let (mut blocks, mut table_clusters) = (0u64, 0u64);
        loop {
            let total = start + blocks + table_clusters;
            let nb = total.div_ceil(per);
            let tc = (nb * 8).div_ceil(cs);
            if nb == blocks && tc == table_clusters {
                break;
            }
            (blocks, table_clusters) = (nb, tc);
        }
        if table_clusters * cs > header::MAX_REFTABLE_BYTES {
            return Err(BlockError::new(ErrorKind::OutOfBounds, "Reference count table too large"));
        }
        let total = start + blocks + table_clusters;
        let mut table = vec![0u64; (table_clusters * cs / 8) as usize];
        let mut block = vec![0u8; cs as usize];
        for b in 0..blocks {
            block.fill(0);
            for i in 0..per {
                let c = b * per + i;
                if c >= total {
                    break;
                }
                let v = if c >= start { 1 } else { u64::from(refs.get(c as usize).copied().unwrap_or(0)) };
                refcount::set(&mut block, order, i, v);
            }
            let off = (start + b) * cs;
            meta.write_bytes("refblock.alloc", off, &block).await.map_err(f)?;
            table[b as usize] = off;
        }
        let tb: Vec<u8> = table.iter().flat_map(|v| v.to_be_bytes()).collect();
        let toff = (start + blocks) * cs;
        meta.write_bytes("reftable.update", toff, &tb).await.map_err(f)?;
        file.flush().await.res.map_err(f)?;
        let mut h = self.header();
        h.refcount_order = order;
        h.refcount_table_offset = toff;
        h.refcount_table_clusters = table_clusters as u32;
        self.write_header(&meta, h).await?;
        self.s.refcount_order.store(order, Ordering::Relaxed);
        self.s.lock_meta().reset_refcounts(table);
        Ok(())
    }
}
