//! Persistent dirty bitmaps of an open qcow2 image: loading, recording writes, storing on
//! close, and the operations of `qemu-img bitmap` (add, remove, clear, enable, disable, merge).
//!
//! As QEMU keeps them: a read-write open loads every consistent bitmap into memory and marks
//! it `in_use` on disk before any write, enabled bitmaps record every write, zero write and
//! discard, and a clean close writes each bitmap to fresh clusters, then a new directory, then
//! switches the header to it with `in_use` clear, then frees the old clusters. A crash at any
//! point leaves the bitmaps `in_use` (inconsistent, never wrong) and at worst leaks clusters.
//! Bitmaps left `in_use` by someone else are kept as they are and never updated.
//! Reading a bitmap's data takes memory for every bit; more than 1 GiB of bitmaps is refused.

use std::sync::atomic::{AtomicU64, Ordering};

use basalt_engine::{BlockError, BlockResult, ErrorKind, IoStatus, Queue};
use basalt_reactor::IoBuf;

use crate::qcow2::bitmap::{self, BitmapEntry, BitmapsExt, AUTOCLEAR_BITMAPS, EXT_BITMAPS, FLAG_AUTO, FLAG_IN_USE};
use crate::qcow2::error::bad;
use crate::qcow2::header::{Extension, Qcow2Header};
use crate::qcow2::meta::{be_words as words, MResult, MetaIo, Shared};
use crate::qcow2::Qcow2Node;

/// Most memory the bits of an image's bitmaps may take.
const MAX_LOADED_BYTES: u64 = 1 << 30;

/// What `convert --bitmaps` needs to know of a persistent bitmap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapSummary {
    /// Its name.
    pub name: String,
    /// Bytes one bit covers.
    pub granularity: u64,
    /// It records writes (the `auto` flag).
    pub enabled: bool,
    /// It was left in use by a program that did not store it: its bits cannot be trusted.
    pub inconsistent: bool,
}

/// One bitmap of an open image.
pub(crate) struct Bitmap {
    /// The entry as it is on disk now (table offset, size), with the flags it will be stored
    /// with (never `in_use`) once loaded.
    pub entry: BitmapEntry,
    /// The bits, when loaded (read-write open of a consistent bitmap); `None` for a bitmap
    /// that is only listed, or inconsistent.
    pub bits: Option<Vec<AtomicU64>>,
    /// Bits in use (disk size / granularity).
    pub nbits: u64,
}

impl Bitmap {
    fn set_range(&self, off: u64, len: u64) {
        let Some(words) = &self.bits else { return };
        if len == 0 || self.nbits == 0 {
            return;
        }
        let g = self.entry.granularity_bits;
        let first = off >> g;
        let last = ((off + len - 1) >> g).min(self.nbits - 1);
        let mut i = first;
        while i <= last {
            let w = (i / 64) as usize;
            let lo = i % 64;
            let hi = (last - (i - lo)).min(63);
            let mask = if hi - lo == 63 { u64::MAX } else { ((1u64 << (hi - lo + 1)) - 1) << lo };
            if let Some(a) = words.get(w) {
                a.fetch_or(mask, Ordering::Relaxed);
            }
            i += hi - lo + 1;
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let n = self.nbits.div_ceil(8) as usize;
        let mut v: Vec<u8> = self.bits.iter().flatten().flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes()).collect();
        v.truncate(n);
        v
    }
}

/// The bitmaps of an open image.
#[derive(Default)]
pub(crate) struct Bitmaps {
    pub list: Vec<Bitmap>,
    /// Loaded read-write: `in_use` is set on disk and the bitmaps must be stored on close.
    pub loaded: bool,
    /// Where the directory on disk is, and its length.
    pub directory: (u64, u64),
    /// Bitmaps removed since open, whose clusters are freed when the bitmaps are stored.
    pub removed: Vec<BitmapEntry>,
}

impl Bitmaps {
    /// Record a write (or zero write, or discard) of `len` bytes at `off`.
    pub(crate) fn mark(&self, off: u64, len: u64) {
        for b in &self.list {
            if b.entry.enabled() {
                b.set_range(off, len);
            }
        }
    }
}

impl Shared {
    /// Record a change of `len` bytes at `off` in the enabled bitmaps (nothing to do, and no
    /// lock taken, when none records).
    pub(crate) fn mark_dirty(&self, off: u64, len: u64) {
        if self.tracking.load(Ordering::Relaxed) {
            self.bitmaps.read().unwrap_or_else(|e| e.into_inner()).mark(off, len);
        }
    }
}

async fn read(file: &Queue, off: u64, len: u64, end: u64, what: &str) -> BlockResult<IoBuf> {
    if off.checked_add(len).is_none_or(|e| e > end) {
        return Err(bad(format!("{what} is past the end of the image file")).into());
    }
    let d = file.read(off, IoBuf::new_uninit(len as usize)).await;
    d.res.map_err(|e| BlockError::from(e).context(format!("Could not read {what}")))?;
    Ok(d.buf.expect("read returns its buffer"))
}

/// Read the bitmap directory (and, for a read-write open, every consistent bitmap's bits).
pub(crate) async fn load(file: &Queue, hdr: &Qcow2Header, file_size: u64, read_write: bool) -> BlockResult<Bitmaps> {
    let Some(ext) = hdr.extensions.iter().find(|e| e.kind == EXT_BITMAPS) else { return Ok(Bitmaps::default()) };
    if hdr.autoclear & AUTOCLEAR_BITMAPS == 0 {
        // Written by a program that did not keep the bitmaps: they are not to be trusted.
        return Ok(Bitmaps::default());
    }
    let x = BitmapsExt::parse(&ext.data)?;
    let cs = hdr.cluster_size();
    let end = file_size.next_multiple_of(cs);
    if !x.directory_offset.is_multiple_of(cs) {
        return Err(bad("Invalid bitmap directory offset").into());
    }
    let dir = read(file, x.directory_offset, x.directory_size, end, "bitmap directory").await?;
    let entries = bitmap::parse_directory(&dir, x.nb_bitmaps)?;
    let mut total = 0u64;
    let mut list = Vec::with_capacity(entries.len());
    for e in entries {
        // An inconsistent bitmap is never used: its table may lag behind a resize.
        if !e.in_use() {
            bitmap::check_entry(&e, hdr.size, cs, file_size)?;
        }
        let nbits = bitmap::bits_for(hdr.size, e.granularity_bits);
        let bits = if read_write && !e.in_use() {
            total += nbits.div_ceil(8);
            if total > MAX_LOADED_BYTES {
                return Err(BlockError::new(ErrorKind::Unsupported, "The image's bitmaps need more than 1 GiB of memory"));
            }
            let mut data = vec![0u8; nbits.div_ceil(64) as usize * 8];
            let table = read(file, e.table_offset, u64::from(e.table_size) * 8, end, "bitmap table").await?;
            for (i, te) in words(&table).into_iter().enumerate() {
                let at = i * cs as usize;
                let n = (data.len().saturating_sub(at)).min(cs as usize);
                match bitmap::decode_table_entry(te, cs)? {
                    None => {}
                    Some(None) => data[at..at + n].fill(0xff),
                    Some(Some(off)) => {
                        let c = read(file, off, cs, end, "bitmap data").await?;
                        data[at..at + n].copy_from_slice(&c[..n]);
                    }
                }
            }
            Some(data.chunks_exact(8).map(|c| AtomicU64::new(u64::from_le_bytes(c.try_into().unwrap_or_default()))).collect())
        } else {
            None
        };
        list.push(Bitmap { entry: e, bits, nbits });
    }
    let loaded = list.iter().any(|b| b.bits.is_some());
    if loaded {
        // In use from now on, until a clean close stores them.
        let mut at = x.directory_offset;
        for b in &list {
            let len = {
                let mut v = Vec::new();
                b.entry.serialize(&mut v);
                v.len() as u64
            };
            if b.bits.is_some() {
                let flags = (b.entry.flags | FLAG_IN_USE).to_be_bytes();
                let d = file.write(at + 12, IoBuf::from_slice(&flags), Default::default()).await;
                d.res.map_err(|e| BlockError::from(e).context("Could not update the bitmap directory"))?;
            }
            at += len;
        }
        file.flush().await.res.map_err(BlockError::from)?;
    }
    Ok(Bitmaps { list, loaded, directory: (x.directory_offset, x.directory_size), removed: Vec::new() })
}

fn not_found(name: &str) -> BlockError {
    BlockError::new(ErrorKind::NotFound, format!("Dirty bitmap '{name}' not found"))
}

impl MetaIo<'_> {
    /// Write `data` to fresh clusters; returns where.
    async fn write_new(&self, data: &[u8]) -> MResult<u64> {
        let off = self.alloc_clusters((data.len() as u64).div_ceil(self.s.cs)).await?;
        self.write_bytes("bitmap.write", off, data).await?;
        self.s.zero_from.fetch_max(off + (data.len() as u64).next_multiple_of(self.s.cs), Ordering::Relaxed);
        Ok(off)
    }

    /// Free the clusters of a bitmap as its entry describes them.
    async fn free_bitmap(&self, e: &BitmapEntry) -> MResult<()> {
        let cs = self.s.cs;
        if e.table_size == 0 {
            return Ok(());
        }
        let t = self.read_bytes(e.table_offset, e.table_size as usize * 8).await?;
        for te in words(&t) {
            if let Ok(Some(Some(off))) = bitmap::decode_table_entry(te, cs) {
                self.free_cluster(off).await?;
            }
        }
        for k in 0..(u64::from(e.table_size) * 8).div_ceil(cs) {
            self.free_cluster(e.table_offset + k * cs).await?;
        }
        Ok(())
    }
}

impl Qcow2Node {
    fn bitmaps_mut(&self) -> std::sync::RwLockWriteGuard<'_, Bitmaps> {
        self.s.bitmaps.write().unwrap_or_else(|e| e.into_inner())
    }

    fn bitmaps_ref(&self) -> std::sync::RwLockReadGuard<'_, Bitmaps> {
        self.s.bitmaps.read().unwrap_or_else(|e| e.into_inner())
    }

    fn update_tracking(&self) {
        let on = self.bitmaps_ref().list.iter().any(|b| b.bits.is_some() && b.entry.enabled());
        self.s.tracking.store(on, Ordering::Relaxed);
    }

    /// The bitmaps as `info` lists them (QEMU's `Qcow2BitmapInfo`), flags as on disk.
    pub(crate) fn bitmap_infos(&self) -> Vec<serde_json::Value> {
        let bm = self.bitmaps_ref();
        bm.list
            .iter()
            .map(|b| {
                let mut e = b.entry.clone();
                if bm.loaded && b.bits.is_some() {
                    e.flags |= FLAG_IN_USE;
                }
                e.info_json()
            })
            .collect()
    }

    /// The persistent bitmaps in directory order (what `convert --bitmaps` copies).
    pub fn bitmap_list(&self) -> Vec<BitmapSummary> {
        self.bitmaps_ref()
            .list
            .iter()
            .map(|b| BitmapSummary {
                name: b.entry.name.clone(),
                granularity: b.entry.granularity(),
                enabled: b.entry.enabled(),
                inconsistent: b.entry.in_use(),
            })
            .collect()
    }

    fn rw_bitmaps(&self) -> BlockResult<()> {
        if self.s.read_only {
            return Err(BlockError::new(ErrorKind::PermissionDenied, "Image is read-only"));
        }
        Ok(())
    }

    /// Add a bitmap (`qemu-img bitmap --add`); stored on close.
    pub fn bitmap_add(&self, name: &str, granularity: Option<u64>, enabled: bool) -> BlockResult<()> {
        self.rw_bitmaps()?;
        let g = granularity.unwrap_or(self.s.cs.clamp(4096, 65536));
        if !g.is_power_of_two() || !(512..=1 << bitmap::MAX_GRANULARITY_BITS).contains(&g) {
            return Err(BlockError::option("Granularity must be power of 2 and at least 512"));
        }
        if self.header().version < 3 {
            return Err(BlockError::new(
                ErrorKind::Unsupported,
                format!(
                    "Can't make bitmap '{name}' persistent in '{}': Cannot store dirty bitmaps in qcow2 v2 files",
                    self.s.name
                ),
            ));
        }
        if name.is_empty() || name.len() > bitmap::MAX_NAME {
            return Err(BlockError::option("Bitmap name is too long"));
        }
        let mut bm = self.bitmaps_mut();
        if bm.list.iter().any(|b| b.entry.name == name) {
            return Err(BlockError::option(format!("Bitmap already exists: {name}")));
        }
        if bm.list.len() as u32 >= bitmap::MAX_BITMAPS {
            return Err(BlockError::option("Too many bitmaps"));
        }
        let gb = g.trailing_zeros() as u8;
        let nbits = bitmap::bits_for(self.header().size, gb);
        let total: u64 =
            bm.list.iter().filter(|b| b.bits.is_some()).map(|b| b.nbits.div_ceil(8)).sum::<u64>() + nbits.div_ceil(8);
        if total > MAX_LOADED_BYTES {
            return Err(BlockError::new(ErrorKind::Unsupported, "The image's bitmaps would need more than 1 GiB of memory"));
        }
        let entry = BitmapEntry {
            table_offset: 0,
            table_size: 0,
            flags: if enabled { FLAG_AUTO } else { 0 },
            granularity_bits: gb,
            name: name.to_string(),
            extra: Vec::new(),
        };
        let bits = Some((0..nbits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect());
        bm.list.push(Bitmap { entry, bits, nbits });
        bm.loaded = true;
        drop(bm);
        self.update_tracking();
        Ok(())
    }

    fn with_bitmap(&self, name: &str, f: impl FnOnce(&mut Bitmap) -> BlockResult<()>) -> BlockResult<()> {
        self.rw_bitmaps()?;
        let mut bm = self.bitmaps_mut();
        let b = bm.list.iter_mut().find(|b| b.entry.name == name).ok_or_else(|| not_found(name))?;
        if b.bits.is_none() {
            return Err(BlockError::option(format!(
                "Bitmap '{name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk"
            )));
        }
        f(b)?;
        drop(bm);
        self.update_tracking();
        Ok(())
    }

    /// Remove a bitmap (`--remove`); its clusters are freed when the bitmaps are stored.
    pub fn bitmap_remove(&self, name: &str) -> BlockResult<()> {
        self.rw_bitmaps()?;
        let mut bm = self.bitmaps_mut();
        let i = bm.list.iter().position(|b| b.entry.name == name).ok_or_else(|| not_found(name))?;
        let b = bm.list.remove(i);
        bm.removed.push(b.entry);
        bm.loaded = true;
        drop(bm);
        self.update_tracking();
        Ok(())
    }

    /// Clear every bit (`--clear`).
    pub fn bitmap_clear(&self, name: &str) -> BlockResult<()> {
        self.with_bitmap(name, |b| {
            for w in b.bits.iter().flatten() {
                w.store(0, Ordering::Relaxed);
            }
            Ok(())
        })
    }

    /// Start or stop recording writes (`--enable`, `--disable`).
    pub fn bitmap_set_enabled(&self, name: &str, enabled: bool) -> BlockResult<()> {
        self.with_bitmap(name, |b| {
            b.entry.flags = if enabled { b.entry.flags | FLAG_AUTO } else { b.entry.flags & !FLAG_AUTO };
            Ok(())
        })
    }

    /// The bits of bitmap `name` (for `--merge`), with its granularity: from memory when
    /// loaded, else read from the image.
    pub async fn bitmap_bits(&self, name: &str) -> BlockResult<(u8, Vec<u8>)> {
        let e = {
            let bm = self.bitmaps_ref();
            let b = bm.list.iter().find(|b| b.entry.name == name).ok_or_else(|| not_found(name))?;
            if b.bits.is_some() {
                return Ok((b.entry.granularity_bits, b.bytes()));
            }
            b.entry.clone()
        };
        if e.in_use() {
            return Err(BlockError::option(format!("Bitmap '{name}' is inconsistent and cannot be used")));
        }
        let cs = self.s.cs;
        let file = Queue::new(self.s.file.clone())?;
        let end = self.s.file.size().next_multiple_of(cs);
        let n = bitmap::bits_for(self.header().size, e.granularity_bits).div_ceil(8) as usize;
        let mut data = vec![0u8; n];
        let table = read(&file, e.table_offset, u64::from(e.table_size) * 8, end, "bitmap table").await?;
        for (i, te) in words(&table).into_iter().enumerate() {
            let at = (i * cs as usize).min(n);
            let len = (n - at).min(cs as usize);
            match bitmap::decode_table_entry(te, cs)? {
                None => {}
                Some(None) => data[at..at + len].fill(0xff),
                Some(Some(off)) => {
                    let c = read(&file, off, cs, end, "bitmap data").await?;
                    data[at..at + len].copy_from_slice(&c[..len]);
                }
            }
        }
        Ok((e.granularity_bits, data))
    }

    /// OR the bits of another bitmap (granularity `gb`, over a disk of `size`) into `name`.
    pub fn bitmap_merge(&self, name: &str, gb: u8, src: &[u8], size: u64) -> BlockResult<()> {
        self.with_bitmap(name, |b| {
            let sbits = bitmap::bits_for(size, gb).min(src.len() as u64 * 8);
            for i in 0..sbits {
                if src[(i / 8) as usize] & (1 << (i % 8)) != 0 {
                    b.set_range(i << gb, 1 << gb);
                }
            }
            Ok(())
        })
    }

    /// Resize the loaded bitmaps to a new disk size (bits past the old end start clear).
    pub(crate) fn bitmaps_resize(&self, size: u64) {
        let mut bm = self.bitmaps_mut();
        for b in bm.list.iter_mut() {
            let Some(bits) = &mut b.bits else { continue };
            let n = bitmap::bits_for(size, b.entry.granularity_bits);
            if n < b.nbits {
                // Clear what lies past the new end in the last word.
                let last = n % 64;
                if last != 0 {
                    if let Some(w) = bits.get((n / 64) as usize) {
                        w.fetch_and((1u64 << last) - 1, Ordering::Relaxed);
                    }
                }
            }
            bits.resize_with(n.div_ceil(64) as usize, || AtomicU64::new(0));
            b.nbits = n;
        }
    }

    /// Store the bitmaps (on close): each to fresh clusters, a new directory, the header
    /// switched to it with `in_use` clear, then the old clusters freed.
    pub(crate) async fn bitmaps_store(&self) -> BlockResult<()> {
        if !self.bitmaps_ref().loaded || self.s.read_only {
            return Ok(());
        }
        let file = Queue::new(self.s.file.clone())?;
        let meta = MetaIo { s: &self.s, file: &file };
        let f = |e: IoStatus| BlockError::from(e).context("Could not store the dirty bitmaps");
        let _g = self.s.alloc.lock().await;
        let cs = self.s.cs;
        // What each bitmap is now, taken under the lock; the writes happen without it.
        type Snap = Vec<(BitmapEntry, Option<Vec<u8>>)>;
        let (snap, removed, old_dir): (Snap, Vec<BitmapEntry>, (u64, u64)) = {
            let bm = self.bitmaps_ref();
            (
                bm.list.iter().map(|b| (b.entry.clone(), b.bits.as_ref().map(|_| b.bytes()))).collect(),
                bm.removed.clone(),
                bm.directory,
            )
        };
        let mut new_entries = Vec::with_capacity(snap.len());
        for (e, bytes) in &snap {
            let Some(bytes) = bytes else {
                new_entries.push(e.clone());
                continue;
            };
            let nbits = bytes.len() as u64 * 8;
            let tsize = bitmap::table_size_for(nbits, cs);
            let mut table = vec![0u64; tsize as usize];
            for (i, chunk) in bytes.chunks(cs as usize).enumerate() {
                if basalt_engine::buffer_is_zero(chunk) {
                    continue;
                }
                let mut c = chunk.to_vec();
                c.resize(cs as usize, 0);
                table[i] = meta.write_new(&c).await.map_err(f)?;
            }
            let toff = if tsize > 0 {
                let tb: Vec<u8> = table.iter().flat_map(|v| v.to_be_bytes()).collect();
                meta.write_new(&tb).await.map_err(f)?
            } else {
                0
            };
            new_entries.push(BitmapEntry {
                table_offset: toff,
                table_size: tsize as u32,
                flags: e.flags & !FLAG_IN_USE,
                ..e.clone()
            });
        }
        let mut dir = Vec::new();
        for e in &new_entries {
            e.serialize(&mut dir);
        }
        let dir_off = if dir.is_empty() { 0 } else { meta.write_new(&dir).await.map_err(f)? };
        meta.writeback().await.map_err(f)?;
        file.flush().await.res.map_err(f)?;
        // Switch the header: the extension (or none), and the autoclear bit.
        let mut h = self.header();
        h.extensions.retain(|e| e.kind != EXT_BITMAPS);
        if new_entries.is_empty() {
            h.autoclear &= !AUTOCLEAR_BITMAPS;
        } else {
            let x =
                BitmapsExt { nb_bitmaps: new_entries.len() as u32, directory_size: dir.len() as u64, directory_offset: dir_off };
            h.extensions.push(Extension { kind: EXT_BITMAPS, data: x.serialize() });
            h.autoclear |= AUTOCLEAR_BITMAPS;
        }
        let mut cluster0 = h.serialize().map_err(BlockError::from)?;
        cluster0.resize(cs as usize, 0);
        meta.write_bytes("bitmap.header", 0, &cluster0).await.map_err(f)?;
        file.flush().await.res.map_err(f)?;
        *self.s.hdr.lock().unwrap_or_else(|e| e.into_inner()) = h;
        // Free what the old directory described (stored bitmaps and removed ones).
        for ((old, bytes), _) in snap.iter().zip(&new_entries) {
            if bytes.is_some() {
                meta.free_bitmap(old).await.map_err(f)?;
            }
        }
        for old in &removed {
            meta.free_bitmap(old).await.map_err(f)?;
        }
        if old_dir.1 > 0 {
            for k in 0..old_dir.1.div_ceil(cs) {
                meta.free_cluster(old_dir.0 + k * cs).await.map_err(f)?;
            }
        }
        meta.writeback().await.map_err(f)?;
        file.flush().await.res.map_err(f)?;
        let mut bm = self.bitmaps_mut();
        for (b, e) in bm.list.iter_mut().zip(new_entries) {
            b.entry = e;
        }
        bm.removed.clear();
        bm.directory = (dir_off, dir.len() as u64);
        // Stored and consistent: a later write must mark them in use again first.
        bm.loaded = false;
        drop(bm);
        self.s.tracking.store(false, Ordering::Relaxed);
        Ok(())
    }
}
