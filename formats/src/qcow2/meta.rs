//! The metadata of an open qcow2 image: the active L1 table, a cache of L2 tables, the
//! refcount table and a cache of refcount blocks, and the operations that change them.
//!
//! Ordering keeps the image consistent after a crash: a cluster's refcount reaches the disk
//! before any L2 entry pointing to it, an L2 table before the L1 entry pointing to it, and when
//! a cluster is freed or replaced, the L2 entry that stopped pointing to it before its refcount
//! drops. Allocation only changes the caches (refcount blocks and L2 tables become dirty); a
//! write-back — on flush, when the dirty tables fill the caches, and before any structural
//! change — writes dirty refcount blocks, flushes, then writes dirty L2 tables. Entries that
//! stop pointing at a cluster are written through at once. A crash can leak clusters (which
//! `check -r` repairs) but never leave an entry pointing at a free cluster. Dirty tables are
//! never evicted. Changes happen under the node's allocation lock; cached lookups take only a
//! short mutex, never held across I/O.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use basalt_engine::{IoStatus, Node, Queue, WriteFlags};
use basalt_reactor::IoBuf;

use crate::qcow2::compress::CompressionType;
use crate::qcow2::entry::{self, Layout, COPIED};
use crate::qcow2::header::{Qcow2Header, INCOMPAT_CORRUPT};
use crate::qcow2::lock::AsyncLock;
use crate::qcow2::refcount;

/// The control-plane state of a qcow2 node, shared by its queues.
pub(crate) struct Shared {
    pub name: String,
    pub filename: String,
    pub file: Arc<dyn Node>,
    pub backing: Option<Arc<dyn Node>>,
    /// The external data file (`None` without one, or when opened for no I/O): data clusters
    /// live there at host offset == guest offset and have no refcounts.
    pub data_file: Option<Arc<dyn Node>>,
    /// `data_file_raw`: the data file must stay valid as a raw image (zero writes zero it too).
    pub data_raw: bool,
    pub read_only: bool,
    pub layout: Layout,
    pub cluster_bits: u32,
    pub cs: u64,
    pub l2_entries: u64,
    /// 64-bit words per L2 entry (1, or 2 with extended L2).
    pub words: usize,
    /// log2 of the refcount width (changes only by `amend`, under the allocation lock).
    pub refcount_order: std::sync::atomic::AtomicU32,
    pub compression: CompressionType,
    pub hdr: Mutex<Qcow2Header>,
    pub meta: Mutex<Meta>,
    pub alloc: AsyncLock,
    pub corrupt: AtomicBool,
    /// Writes in flight on every reactor's queue (a cluster is freed only after the writes that
    /// may still target it have landed).
    pub inflight: Arc<basalt_engine::InFlightGroup>,
    /// Guest clusters whose allocating write is in flight (on any reactor), with the requests
    /// waiting for it. Changed under the allocation lock.
    pub allocating: Mutex<HashMap<u64, Vec<std::task::Waker>>>,
    /// Pass discards of freed clusters down to the file (`pass-discard-request`).
    pub pass_discard: bool,
    /// From here on the file is known to read zeroes (never written by us since open).
    pub zero_from: std::sync::atomic::AtomicU64,
    /// The file has been zeroed ahead (fallocate) up to here.
    pub prealloc_end: std::sync::atomic::AtomicU64,
    /// File size when opened (rounded up to clusters).
    pub open_size: u64,
    /// Named fault-injection points (tests of crash safety).
    pub fault: Fault,
    /// Where the next compressed cluster's data may go (just after the previous one's, in a
    /// host cluster we still hold a reference to); 0 for none.
    pub compress_cursor: std::sync::atomic::AtomicU64,
    /// `cache-clean-interval` in seconds (0: cached tables are kept).
    pub clean_interval: u64,
    /// Whether the cache sweeper was started.
    pub cleaner: AtomicBool,
    /// The internal snapshot table.
    pub snapshots: Mutex<crate::qcow2::snapshot::SnapshotTable>,
    /// Encryption (`None` for a plain image).
    pub crypt: Option<crate::qcow2::encrypt::Qcow2Crypt>,
    /// Persistent dirty bitmaps.
    pub bitmaps: std::sync::RwLock<crate::qcow2::bitmap_ops::Bitmaps>,
    /// Whether any loaded bitmap records writes (checked before taking the bitmaps' lock).
    pub tracking: AtomicBool,
    /// Whether the image looks metadata-preallocated (0: not asked yet, 1: no, 2: yes); decided
    /// on the first block status query, as QEMU decides it once per open.
    pub meta_prealloc: std::sync::atomic::AtomicU8,
}

/// Fault injection: every metadata write and every data write of an allocation passes a named
/// point; with `x-fault=POINT` (and `x-fault-after=N`, default 1) the Nth pass of POINT fails,
/// and from then on every write of the node fails, as if the process died there. Points:
/// `data.write`, `data.zero-ahead`, `compressed.write`, `l2.alloc`, `l2.entry`, `l1.update`,
/// `refblock.alloc`, `reftable.update`, `refblock.writeback`, `l2.writeback`,
/// `reftable.grow.blocks`, `reftable.grow.table`, `reftable.grow.header`, `l2.cow`,
/// `snapshot.l1`, `snapshot.table`, `snapshot.header`, `l1.write`, `bitmap.write`,
/// `bitmap.header`, `rebuild.blocks`, `rebuild.table`, `rebuild.header` (check's rebuild).
#[derive(Default)]
pub(crate) struct Fault {
    armed: Mutex<Option<(String, u32)>>,
    pub tripped: AtomicBool,
}

/// Every point name, for validating the option.
pub(crate) const FAULT_POINTS: &[&str] = &[
    "data.write",
    "data.zero-ahead",
    "compressed.write",
    "l2.alloc",
    "l2.entry",
    "l1.update",
    "refblock.alloc",
    "reftable.update",
    "refblock.writeback",
    "l2.writeback",
    "reftable.grow.blocks",
    "reftable.grow.table",
    "reftable.grow.header",
    "l2.cow",
    "snapshot.l1",
    "snapshot.table",
    "snapshot.header",
    "l1.write",
    "bitmap.write",
    "bitmap.header",
];

impl Fault {
    pub(crate) fn arm(&self, point: String, after: u32) {
        *self.armed.lock().unwrap_or_else(|e| e.into_inner()) = Some((point, after.max(1)));
    }

    /// Pass a point: Err once the fault fired (now or before).
    pub(crate) fn hit(&self, point: &str) -> Result<(), IoStatus> {
        if self.tripped.load(Ordering::Relaxed) {
            return Err(IoStatus::EIO);
        }
        let mut a = self.armed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((p, n)) = a.as_mut() {
            if p == point {
                *n -= 1;
                if *n == 0 {
                    self.tripped.store(true, Ordering::Relaxed);
                    return Err(IoStatus::EIO);
                }
            }
        }
        Ok(())
    }
}

/// Dirty tables allowed before a write-back is forced, whatever the cache size.
const DIRTY_MIN: usize = 32;

/// A cached table: its content, when it was last used, and whether it differs from disk.
pub(crate) struct Cached2<T> {
    data: T,
    used: u64,
    dirty: bool,
}

/// Cached tables.
pub(crate) struct Meta {
    pub l1: Vec<u64>,
    l2: HashMap<u64, Cached2<Vec<u64>>>,
    l2_capacity: usize,
    /// Bumped on every L2 change, so a table loaded concurrently with a change is not cached.
    pub l2_seq: u64,
    pub reftable: Vec<u64>,
    refblocks: HashMap<u64, Cached2<Vec<u8>>>,
    refblock_capacity: usize,
    tick: u64,
    /// First cluster index that may be free.
    pub free_hint: u64,
}

impl Meta {
    pub(crate) fn new(l1: Vec<u64>, reftable: Vec<u64>, l2_capacity: usize, refblock_capacity: usize) -> Meta {
        Meta {
            l1,
            l2: HashMap::new(),
            l2_capacity: l2_capacity.max(2),
            l2_seq: 0,
            reftable,
            refblocks: HashMap::new(),
            refblock_capacity: refblock_capacity.max(2),
            tick: 0,
            free_hint: 0,
        }
    }

    /// Words of a cached L2 table.
    pub(crate) fn l2(&mut self, off: u64) -> Option<&mut Vec<u64>> {
        self.tick += 1;
        let t = self.tick;
        self.l2.get_mut(&off).map(|e| {
            e.used = t;
            &mut e.data
        })
    }

    fn mark_l2_dirty(&mut self, off: u64) {
        if let Some(e) = self.l2.get_mut(&off) {
            e.dirty = true;
        }
    }

    fn insert_l2(&mut self, off: u64, words: Vec<u64>) {
        evict(&mut self.l2, self.l2_capacity);
        self.tick += 1;
        self.l2.insert(off, Cached2 { data: words, used: self.tick, dirty: false });
    }

    fn refblock(&mut self, off: u64) -> Option<&mut Vec<u8>> {
        self.tick += 1;
        let t = self.tick;
        self.refblocks.get_mut(&off).map(|e| {
            e.used = t;
            &mut e.data
        })
    }

    fn mark_refblock_dirty(&mut self, off: u64) {
        if let Some(e) = self.refblocks.get_mut(&off) {
            e.dirty = true;
        }
    }

    fn insert_refblock(&mut self, off: u64, block: Vec<u8>) {
        evict(&mut self.refblocks, self.refblock_capacity);
        self.tick += 1;
        self.refblocks.insert(off, Cached2 { data: block, used: self.tick, dirty: false });
    }

    /// Drop every clean cached table not used since tick `since` (`cache-clean-interval`);
    /// returns the tick to pass next time.
    pub(crate) fn drop_unused(&mut self, since: u64) -> u64 {
        self.l2.retain(|_, e| e.dirty || e.used >= since);
        self.refblocks.retain(|_, e| e.dirty || e.used >= since);
        self.l2_seq += 1;
        self.tick += 1;
        self.tick
    }

    /// Use a new refcount table (after `amend` rebuilt the refcount structures): every cached
    /// refcount block is dropped.
    pub(crate) fn reset_refcounts(&mut self, reftable: Vec<u64>) {
        self.reftable = reftable;
        self.refblocks.clear();
        self.free_hint = 0;
    }

    /// Tables cached: (L2 tables, refcount blocks).
    pub(crate) fn cached_counts(&self) -> (usize, usize) {
        (self.l2.len(), self.refblocks.len())
    }

    /// Tables changed in memory and not yet written: (refcount blocks, L2 tables).
    pub(crate) fn dirty_count(&self) -> (usize, usize) {
        (self.refblocks.values().filter(|e| e.dirty).count(), self.l2.values().filter(|e| e.dirty).count())
    }
}

/// Drop the least recently used clean entry when the cache is full. Dirty entries are never
/// dropped (the cache may grow past its size until they are written back).
fn evict<T>(m: &mut HashMap<u64, Cached2<T>>, capacity: usize) {
    if m.len() >= capacity {
        if let Some(k) = m.iter().filter(|(_, v)| !v.dirty).min_by_key(|(_, v)| v.used).map(|(k, _)| *k) {
            m.remove(&k);
        }
    }
}

/// Errors inside metadata operations: an I/O status, after the image was marked corrupt when
/// the cause was bad metadata.
pub(crate) type MResult<T> = Result<T, IoStatus>;

impl Shared {
    /// The L2 entry of guest cluster `gc` if its table is cached (no I/O).
    pub(crate) fn cached(&self, gc: u64) -> Cached {
        let (l1i, l2i) = self.split(gc);
        let mut m = self.lock_meta();
        let Some(&l1e) = m.l1.get(l1i) else { return Cached::Entry(0, 0) };
        let off = match entry::l1_l2_offset(l1e, self.cluster_bits) {
            Ok(Some(off)) => off,
            Ok(None) => return Cached::Entry(0, 0),
            Err(m) => return Cached::Bad(format!("{m} (L1 index: {l1i:#x})")),
        };
        let w = self.words;
        match m.l2(off) {
            Some(t) => Cached::Entry(t[l2i * w], if w == 2 { t[l2i * w + 1] } else { 0 }),
            None => Cached::Load(off),
        }
    }

    /// The mapping of the (sub)cluster holding guest byte `off`, if its table is cached.
    pub(crate) fn mapping_cached(&self, off: u64) -> Option<entry::Mapping> {
        match self.cached(off / self.cs) {
            Cached::Entry(e, b) => self.layout.decode(e, b, ((off % self.cs) / self.layout.subcluster_size()) as u32).ok(),
            _ => None,
        }
    }

    pub(crate) fn lock_meta(&self) -> std::sync::MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The guest clusters being allocated (see [`Shared::allocating`]).
    pub(crate) fn allocating(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Vec<std::task::Waker>>> {
        self.allocating.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// log2 of the refcount width.
    pub(crate) fn rc_order(&self) -> u32 {
        self.refcount_order.load(Ordering::Relaxed)
    }

    /// Guest cluster -> (L1 index, L2 index).
    pub(crate) fn split(&self, gc: u64) -> (usize, usize) {
        ((gc / self.l2_entries) as usize, (gc % self.l2_entries) as usize)
    }
}

/// What a lookup found without I/O.
pub(crate) enum Cached {
    /// The entry and its bitmap (0 without extended L2).
    Entry(u64, u64),
    /// The L2 table at this offset must be loaded first.
    Load(u64),
    /// The L1 entry is corrupt (the message names it).
    Bad(String),
}

/// Metadata operations, run on the reactor that owns the node with its file queue.
pub(crate) struct MetaIo<'a> {
    pub s: &'a Shared,
    pub file: &'a Queue,
}

/// Big-endian 64-bit words of a table read from the image.
pub(crate) fn be_words(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8).map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect()
}

impl MetaIo<'_> {
    /// Report corrupt metadata: mark the image corrupt (on disk too, unless read-only) and fail.
    pub(crate) async fn corrupt(&self, what: String) -> IoStatus {
        if !self.s.corrupt.swap(true, Ordering::SeqCst) {
            eprintln!("qcow2: Marking image as corrupt: {what}; further corruption events will be suppressed");
            if !self.s.read_only {
                let inc = {
                    let mut h = self.s.hdr.lock().unwrap_or_else(|e| e.into_inner());
                    h.incompatible |= INCOMPAT_CORRUPT;
                    h.incompatible
                };
                if h_version(self.s) >= 3 {
                    let _ = self.write_bytes("header.corrupt", 72, &inc.to_be_bytes()).await;
                    let _ = self.file.flush().await;
                }
            }
        }
        IoStatus::EIO
    }

    pub(crate) async fn read_bytes(&self, off: u64, len: usize) -> MResult<IoBuf> {
        let d = self.file.read(off, IoBuf::new_uninit(len)).await;
        d.res?;
        Ok(d.buf.expect("read returns its buffer"))
    }

    pub(crate) async fn write_bytes(&self, point: &'static str, off: u64, data: &[u8]) -> MResult<()> {
        self.s.fault.hit(point)?;
        self.file.write(off, IoBuf::from_slice(data), WriteFlags::default()).await.res.map(|_| ())
    }

    /// The L2 entry of guest cluster `gc`, loading its table when needed.
    pub(crate) async fn entry(&self, gc: u64) -> MResult<(u64, u64)> {
        loop {
            match self.s.cached(gc) {
                Cached::Entry(e, b) => return Ok((e, b)),
                Cached::Load(off) => self.load_l2(off, self.s.split(gc).0).await?,
                Cached::Bad(m) => return Err(self.corrupt(m).await),
            }
        }
    }

    async fn load_l2(&self, off: u64, l1i: usize) -> MResult<()> {
        if off.checked_add(self.s.cs).is_none_or(|e| e > self.s.file.size().next_multiple_of(self.s.cs)) || off == 0 {
            return Err(self
                .corrupt(format!("L2 table offset {off:#x} is past the end of the image file (L1 index: {l1i:#x})"))
                .await);
        }
        let seq = self.s.lock_meta().l2_seq;
        let b = self.read_bytes(off, self.s.cs as usize).await?;
        let words = be_words(&b);
        let mut m = self.s.lock_meta();
        if m.l2_seq == seq && m.l2(off).is_none() {
            m.insert_l2(off, words);
        }
        Ok(())
    }

    /// Set the entry of guest cluster `gc`, allocating its L2 table if needed. Allocation lock
    /// held by the caller. With `through`, the entry is written now (needed before a cluster
    /// it stops pointing at may be freed); otherwise the table is left dirty for write-back,
    /// which writes refcount blocks before L2 tables.
    pub(crate) async fn set_entry(&self, gc: u64, e: u64, bitmap: u64, through: bool) -> MResult<()> {
        let (l1i, l2i) = self.s.split(gc);
        let l1e = *self.s.lock_meta().l1.get(l1i).ok_or(IoStatus::EINVAL)?;
        let off = match entry::l1_l2_offset(l1e, self.s.cluster_bits) {
            Ok(Some(off)) if l1e & COPIED != 0 => off,
            Ok(Some(shared)) => self.cow_l2(l1i, shared).await?,
            Ok(None) => self.new_l2(l1i).await?,
            Err(m) => return Err(self.corrupt(m).await),
        };
        self.entry(gc).await?; // make sure the table is cached
        let w = self.s.words;
        if through {
            // What the entry now points at must have its refcount on disk first.
            self.writeback_refblocks().await?;
            let mut bytes = Vec::with_capacity(16);
            bytes.extend_from_slice(&e.to_be_bytes());
            if w == 2 {
                bytes.extend_from_slice(&bitmap.to_be_bytes());
            }
            self.write_bytes("l2.entry", off + (l2i * w * 8) as u64, &bytes).await?;
        }
        // A clean table may have been evicted meanwhile (by a load on another reactor, or the
        // cache sweeper): it is then reloaded, as it is on disk (with the entry written
        // through, if it was).
        loop {
            {
                let mut m = self.s.lock_meta();
                if let Some(t) = m.l2(off) {
                    t[l2i * w] = e;
                    if w == 2 {
                        t[l2i * w + 1] = bitmap;
                    }
                    m.l2_seq += 1;
                    if !through {
                        m.mark_l2_dirty(off);
                    }
                    break;
                }
            }
            self.load_l2(off, l1i).await?;
        }
        self.writeback_if_large().await
    }

    /// Make sure guest cluster `gc` has an L2 table (allocating it before any data cluster, as
    /// QEMU orders them).
    pub(crate) async fn ensure_l2(&self, gc: u64) -> MResult<()> {
        let (l1i, _) = self.s.split(gc);
        let l1e = *self.s.lock_meta().l1.get(l1i).ok_or(IoStatus::EINVAL)?;
        match entry::l1_l2_offset(l1e, self.s.cluster_bits) {
            Ok(None) => self.new_l2(l1i).await.map(|_| ()),
            Ok(Some(_)) => Ok(()),
            Err(m) => Err(self.corrupt(m).await),
        }
    }

    /// A copy of the L2 table at `off`, loaded into the cache when needed.
    pub(crate) async fn l2_table(&self, off: u64) -> MResult<Vec<u64>> {
        loop {
            if let Some(t) = self.s.lock_meta().l2(off) {
                return Ok(t.clone());
            }
            self.load_l2(off, 0).await?;
        }
    }

    /// Replace the L2 table at `off` in the cache (written back later, after the refcounts).
    pub(crate) async fn put_l2_table(&self, off: u64, words: Vec<u64>) -> MResult<()> {
        {
            let mut m = self.s.lock_meta();
            m.l2_seq += 1;
            match m.l2(off) {
                Some(t) => *t = words,
                None => m.insert_l2(off, words),
            }
            m.mark_l2_dirty(off);
        }
        self.writeback_if_large().await
    }

    /// Write entry `l1i` of the active L1 table (through to disk) and cache it.
    pub(crate) async fn set_l1_entry(&self, l1i: usize, e: u64) -> MResult<()> {
        let l1_off = self.s.hdr.lock().unwrap_or_else(|e| e.into_inner()).l1_table_offset;
        self.write_bytes("l1.update", l1_off + l1i as u64 * 8, &e.to_be_bytes()).await?;
        let mut m = self.s.lock_meta();
        if let Some(x) = m.l1.get_mut(l1i) {
            *x = e;
        }
        m.l2_seq += 1;
        Ok(())
    }

    /// Give L1 index `l1i` its own copy of the L2 table at `old`, which a snapshot shares: the
    /// copy is written and its refcount reaches the disk before the L1 entry points at it, and
    /// the old table's refcount drops after. The data clusters keep their refcounts: each is
    /// still referenced once through each table.
    async fn cow_l2(&self, l1i: usize, old: u64) -> MResult<u64> {
        let words = self.l2_table(old).await?;
        let off = self.alloc_clusters(1).await?;
        let bytes: Vec<u8> = words.iter().flat_map(|v| v.to_be_bytes()).collect();
        self.write_bytes("l2.cow", off, &bytes).await?;
        self.s.zero_from.fetch_max(off + self.s.cs, Ordering::Relaxed);
        self.writeback().await?;
        self.file.flush().await.res?;
        self.set_l1_entry(l1i, off | COPIED).await?;
        self.s.lock_meta().insert_l2(off, words);
        self.free_cluster(old).await?;
        Ok(off)
    }

    /// Allocate a zeroed L2 table for L1 index `l1i` and point the L1 entry at it.
    async fn new_l2(&self, l1i: usize) -> MResult<u64> {
        let off = self.alloc_clusters(1).await?;
        self.write_bytes("l2.alloc", off, &vec![0u8; self.s.cs as usize]).await?;
        self.s.zero_from.fetch_max(off + self.s.cs, Ordering::Relaxed);
        // The table's refcount must be on disk before the L1 entry points at it.
        self.writeback().await?;
        let l1_off = self.s.hdr.lock().unwrap_or_else(|e| e.into_inner()).l1_table_offset;
        let e = off | COPIED;
        self.write_bytes("l1.update", l1_off + l1i as u64 * 8, &e.to_be_bytes()).await?;
        let mut m = self.s.lock_meta();
        m.l1[l1i] = e;
        m.l2_seq += 1;
        let words = vec![0u64; (self.s.cs / 8) as usize];
        m.insert_l2(off, words);
        Ok(off)
    }

    fn per_block(&self) -> u64 {
        refcount::entries_per_block(self.s.cluster_bits, self.s.rc_order())
    }

    /// The refcount block covering cluster index `c`, loaded; `None` when not allocated.
    async fn refblock_of(&self, c: u64) -> MResult<Option<u64>> {
        let ti = (c / self.per_block()) as usize;
        let off = match self.s.lock_meta().reftable.get(ti) {
            None | Some(0) => return Ok(None),
            Some(&e) => e & entry::OFFSET_MASK,
        };
        if off % self.s.cs != 0 || off == 0 {
            return Err(self.corrupt(format!("Refblock offset {off:#x} unaligned (reftable index {ti:#x})")).await);
        }
        if self.s.lock_meta().refblock(off).is_none() {
            if off + self.s.cs > self.s.file.size().next_multiple_of(self.s.cs) {
                return Err(self.corrupt(format!("Refblock at {off:#x} is past the end of the image file")).await);
            }
            let b = self.read_bytes(off, self.s.cs as usize).await?;
            self.s.lock_meta().insert_refblock(off, b.to_vec());
        }
        Ok(Some(off))
    }

    /// Whether the image looks preallocated with `preallocation=metadata`: its refcounts claim
    /// clearly more clusters than the file holds on disk (at least a ninth more, and 2 more).
    /// QEMU's block status then asks the file where allocated clusters really hold data; for
    /// any other image it reports allocated clusters as data, whatever the file holds. A file
    /// that cannot say what it holds on disk (not a local file) is never taken for one.
    pub(crate) async fn looks_metadata_preallocated(&self) -> MResult<bool> {
        let Some(on_disk) = self.s.file.allocated_size() else { return Ok(false) };
        let real = on_disk / self.s.cs;
        let threshold = (real * 10 / 9).max(real + 2);
        let end = self.s.file.size().div_ceil(self.s.cs);
        let (mut c, mut counted) = (0, 0);
        while c < end && counted < threshold {
            // A whole refcount block's range is skipped at once where it has none.
            if self.refblock_of(c).await?.is_none() {
                c = (c / self.per_block() + 1) * self.per_block();
                continue;
            }
            counted += u64::from(self.refcount(c).await? != 0);
            c += 1;
        }
        Ok(counted >= threshold)
    }

    /// The end of the last cluster in use (by the refcounts), in bytes.
    pub(crate) async fn used_end(&self) -> MResult<u64> {
        let per = self.per_block();
        let blocks = self.s.lock_meta().reftable.len() as u64;
        for b in (0..blocks).rev() {
            if self.s.lock_meta().reftable.get(b as usize).is_none_or(|e| *e == 0) {
                continue;
            }
            for c in (b * per..(b + 1) * per).rev() {
                if self.refcount(c).await? != 0 {
                    return Ok((c + 1) * self.s.cs);
                }
            }
        }
        Ok(0)
    }

    /// Refcount of cluster index `c`.
    pub(crate) async fn refcount(&self, c: u64) -> MResult<u64> {
        // A clean block may be evicted between its load and its use (by the cache sweeper on
        // another reactor): it is loaded again.
        loop {
            match self.refblock_of(c).await? {
                None => return Ok(0),
                Some(off) => {
                    let i = c % self.per_block();
                    let mut m = self.s.lock_meta();
                    if let Some(b) = m.refblock(off) {
                        return Ok(refcount::get(b, self.s.rc_order(), i));
                    }
                }
            }
        }
    }

    /// Set the refcount of cluster index `c` (its refcount block must exist).
    async fn set_refcount(&self, c: u64, v: u64) -> MResult<()> {
        loop {
            let off = match self.refblock_of(c).await? {
                Some(o) => o,
                None => self.new_refblock(c).await?,
            };
            let i = c % self.per_block();
            let mut m = self.s.lock_meta();
            if let Some(b) = m.refblock(off) {
                refcount::set(b, self.s.rc_order(), i, v);
                m.mark_refblock_dirty(off);
                return Ok(());
            }
        }
    }

    /// Set a refcount to what `check` computed (repair).
    pub(crate) async fn set_refcount_for_repair(&self, c: u64, v: u64) -> MResult<()> {
        self.set_refcount(c, v).await
    }

    /// Add `delta` to the refcount of cluster index `c`; returns the new value.
    pub(crate) async fn add_refcount(&self, c: u64, delta: i64) -> MResult<u64> {
        let old = self.refcount(c).await?;
        let new = old.checked_add_signed(delta).filter(|v| *v <= refcount::max_refcount(self.s.rc_order()));
        let Some(new) = new else {
            return Err(self.corrupt(format!("Refcount of cluster {c:#x} would go from {old} by {delta}")).await);
        };
        self.set_refcount(c, new).await?;
        if new == 0 {
            let mut m = self.s.lock_meta();
            m.free_hint = m.free_hint.min(c);
            // Never pack compressed data into a cluster that was freed (and may be reused).
            let cur = self.s.compress_cursor.load(Ordering::Relaxed);
            if cur != 0 && cur.saturating_sub(1) / self.s.cs == c {
                self.s.compress_cursor.store(0, Ordering::Relaxed);
            }
        }
        Ok(new)
    }

    /// Make a refcount block for the range containing cluster `c`, placed in that range (at the
    /// first cluster of it that is past everything in use) so that it describes itself.
    async fn new_refblock(&self, c: u64) -> MResult<u64> {
        let per = self.per_block();
        let ti = (c / per) as usize;
        if ti >= self.s.lock_meta().reftable.len() {
            Box::pin(self.grow_reftable(ti + 1)).await?;
            if let Some(off) = self.refblock_of(c).await? {
                return Ok(off);
            }
        }
        // Every cluster of this range has refcount 0 (no block yet), so all are free: take the
        // first one that is not `c` (the caller restarts its search afterwards).
        let mut b = (ti as u64 * per).max(1);
        if b == c {
            b += 1;
        }
        if b >= (ti as u64 + 1) * per {
            return Err(IoStatus::ENOSPC);
        }
        let off = b * self.s.cs;
        let mut block = vec![0u8; self.s.cs as usize];
        refcount::set(&mut block, self.s.rc_order(), b % per, 1);
        self.write_bytes("refblock.alloc", off, &block).await?;
        self.s.zero_from.fetch_max(off + self.s.cs, Ordering::Relaxed);
        let rt_off = self.s.hdr.lock().unwrap_or_else(|e| e.into_inner()).refcount_table_offset;
        self.write_bytes("reftable.update", rt_off + ti as u64 * 8, &off.to_be_bytes()).await?;
        let mut m = self.s.lock_meta();
        m.reftable[ti] = off;
        m.insert_refblock(off, block);
        Ok(off)
    }

    /// Grow the refcount table to at least `need` entries: a new table after the end of the
    /// file, refcount blocks for its own clusters where missing, then the header switched to it
    /// and the old table freed.
    async fn grow_reftable(&self, need: usize) -> MResult<()> {
        let cs = self.s.cs;
        let per = self.per_block();
        let (old_off, old_len) = {
            let h = self.s.hdr.lock().unwrap_or_else(|e| e.into_inner());
            (h.refcount_table_offset, u64::from(h.refcount_table_clusters) * cs / 8)
        };
        // Changes still in the cache go to disk first: the new table points at the same blocks.
        Box::pin(self.writeback()).await?;
        let old = self.s.lock_meta().reftable.clone();
        let start = self.s.file.size().div_ceil(cs);
        // Entries: enough for `need`, and for the new table and new blocks themselves.
        let mut entries = (need as u64).max(old_len * 2).max(1);
        let (table_clusters, blocks) = loop {
            let tc = (entries * 8).div_ceil(cs);
            // Blocks needed for [start, start + tc + nb): those ranges whose entry is 0.
            let mut nb = 0;
            loop {
                let end = start + tc + nb;
                let missing =
                    (start / per..end.div_ceil(per)).filter(|i| old.get(*i as usize).copied().unwrap_or(0) == 0).count() as u64;
                if missing == nb {
                    break;
                }
                nb = missing;
            }
            let covered = (start + tc + nb).div_ceil(per);
            if covered <= entries && need as u64 <= entries {
                break (tc, nb);
            }
            entries = entries.max(covered).max(need as u64) * 3 / 2 + 1;
        };
        if table_clusters * cs > crate::qcow2::header::MAX_REFTABLE_BYTES {
            return Err(IoStatus::ENOSPC);
        }
        // Layout: table at [start, start+tc), new blocks after it.
        let mut table = vec![0u64; (table_clusters * cs / 8) as usize];
        table[..old.len()].copy_from_slice(&old);
        let mut new_blocks: HashMap<u64, Vec<u8>> = HashMap::new();
        let mut next_block = start + table_clusters;
        for i in (start / per)..(start + table_clusters + blocks).div_ceil(per) {
            if table[i as usize] == 0 {
                table[i as usize] = next_block * cs;
                new_blocks.insert(i, vec![0u8; cs as usize]);
                next_block += 1;
            }
        }
        // Refcounts of the table and of the new blocks.
        for c in start..next_block {
            let bi = c / per;
            if let Some(b) = new_blocks.get_mut(&bi) {
                refcount::set(b, self.s.rc_order(), c % per, 1);
            } else {
                // The range's block already exists: set it there (it is in the old table).
                Box::pin(self.set_refcount(c, 1)).await?;
            }
        }
        Box::pin(self.writeback()).await?;
        for (i, b) in &new_blocks {
            self.write_bytes("reftable.grow.blocks", table[*i as usize], b).await?;
        }
        let bytes: Vec<u8> = table.iter().flat_map(|v| v.to_be_bytes()).collect();
        self.write_bytes("reftable.grow.table", start * cs, &bytes).await?;
        self.s.zero_from.fetch_max(next_block * cs, Ordering::Relaxed);
        self.file.flush().await.res?;
        // Switch the header to the new table (offset and size are adjacent fields).
        let mut hf = Vec::with_capacity(12);
        hf.extend_from_slice(&(start * cs).to_be_bytes());
        hf.extend_from_slice(&(table_clusters as u32).to_be_bytes());
        self.write_bytes("reftable.grow.header", 48, &hf).await?;
        {
            let mut h = self.s.hdr.lock().unwrap_or_else(|e| e.into_inner());
            h.refcount_table_offset = start * cs;
            h.refcount_table_clusters = table_clusters as u32;
        }
        {
            let mut m = self.s.lock_meta();
            m.reftable = table;
            for (i, b) in new_blocks {
                let off = m.reftable[i as usize];
                m.insert_refblock(off, b);
            }
        }
        // Free the old table.
        let old_clusters = old_len * 8 / cs;
        for k in 0..old_clusters {
            Box::pin(self.add_refcount(old_off / cs + k, -1)).await?;
        }
        Ok(())
    }

    /// Allocate `n` contiguous free clusters with refcount 1; returns the host offset.
    ///
    /// Every candidate gets its refcount block first (a new block takes the first cluster past
    /// the end of the file in its range, possibly a candidate), then the search restarts, so a
    /// block and an allocation never share a cluster.
    pub(crate) async fn alloc_clusters(&self, n: u64) -> MResult<u64> {
        let limit = 1u64 << (56 - self.s.cluster_bits);
        let mut c = self.s.lock_meta().free_hint;
        'search: loop {
            if c + n > limit {
                return Err(IoStatus::ENOSPC);
            }
            for k in 0..n {
                if self.refblock_of(c + k).await?.is_none() {
                    self.new_refblock(c + k).await?;
                    continue 'search;
                }
                if c + k == 0 || self.refcount(c + k).await? != 0 {
                    c += k + 1;
                    continue 'search;
                }
            }
            break;
        }
        for k in 0..n {
            self.set_refcount(c + k, 1).await?;
        }
        // Everything from the old hint up to `c` was found in use: start after this next time.
        self.s.lock_meta().free_hint = c + n;
        Ok(c * self.s.cs)
    }

    /// Drop the references an L2 entry held: its host cluster, or every host cluster its
    /// compressed data touches. Call after the entry that replaced it is on disk.
    pub(crate) async fn free_target(&self, e: u64) -> MResult<()> {
        let cs = self.s.cs;
        if self.s.layout.data_file {
            // Data clusters in an external data file have no refcounts (and none is compressed).
            return Ok(());
        }
        if e & entry::COMPRESSED != 0 {
            if let Ok(entry::Mapping::Compressed { host, len }) = self.s.layout.decode(e, 0, 0) {
                for c in host / cs..=(host + len - 1) / cs {
                    self.free_cluster(c * cs).await?;
                }
            }
        } else if e & entry::OFFSET_MASK != 0 {
            self.free_cluster(e & entry::OFFSET_MASK).await?;
        }
        Ok(())
    }

    /// Make guest clusters `range` unallocated, freeing what they held (entries written first).
    pub(crate) async fn unmap(&self, range: std::ops::Range<u64>) -> MResult<()> {
        for gc in range {
            let (e, b) = self.entry(gc).await?;
            if e == 0 && b == 0 {
                continue;
            }
            self.set_entry(gc, 0, 0, true).await?;
            self.free_target(e).await?;
        }
        self.writeback().await
    }

    /// Drop one reference to the cluster at host offset `host`; when it becomes free, tell the
    /// file (discard) so the space is returned.
    pub(crate) async fn free_cluster(&self, host: u64) -> MResult<()> {
        let c = host / self.s.cs;
        if self.add_refcount(c, -1).await? == 0 && self.s.pass_discard {
            let _ = self.file.discard(host, self.s.cs).await;
        }
        Ok(())
    }
}

impl MetaIo<'_> {
    /// Write every dirty refcount block, then (after a flush, so they are ordered on stable
    /// storage) every dirty L2 table. Allocation lock held by the caller.
    pub(crate) async fn writeback(&self) -> MResult<()> {
        let wrote_blocks = self.writeback_refblocks().await?;
        let tables: Vec<(u64, Vec<u64>)> = {
            let m = self.s.lock_meta();
            m.l2.iter().filter(|(_, e)| e.dirty).map(|(k, e)| (*k, e.data.clone())).collect()
        };
        if tables.is_empty() {
            return Ok(());
        }
        if wrote_blocks {
            self.file.flush().await.res?;
        }
        for (off, t) in &tables {
            let bytes: Vec<u8> = t.iter().flat_map(|v| v.to_be_bytes()).collect();
            self.write_bytes("l2.writeback", *off, &bytes).await?;
            let mut m = self.s.lock_meta();
            if let Some(e) = m.l2.get_mut(off) {
                if e.data == *t {
                    e.dirty = false;
                }
            }
        }
        Ok(())
    }

    /// Write every dirty refcount block; returns whether there were any.
    pub(crate) async fn writeback_refblocks(&self) -> MResult<bool> {
        let blocks: Vec<(u64, Vec<u8>)> = {
            let m = self.s.lock_meta();
            m.refblocks.iter().filter(|(_, e)| e.dirty).map(|(k, e)| (*k, e.data.clone())).collect()
        };
        for (off, b) in &blocks {
            self.write_bytes("refblock.writeback", *off, b).await?;
            let mut m = self.s.lock_meta();
            if let Some(e) = m.refblocks.get_mut(off) {
                if e.data == *b {
                    e.dirty = false;
                }
            }
        }
        Ok(!blocks.is_empty())
    }

    /// Write back when the dirty tables outgrow the caches.
    async fn writeback_if_large(&self) -> MResult<()> {
        let (rb, l2) = self.s.lock_meta().dirty_count();
        let (rc, lc) = {
            let m = self.s.lock_meta();
            (m.refblock_capacity, m.l2_capacity)
        };
        // Dirty tables stay cached (beyond the cache size if need be) up to a bound.
        if rb >= rc.max(DIRTY_MIN) || l2 >= lc.max(DIRTY_MIN) {
            Box::pin(self.writeback()).await?;
        }
        Ok(())
    }
}

fn h_version(s: &Shared) -> u32 {
    s.hdr.lock().unwrap_or_else(|e| e.into_inner()).version
}
