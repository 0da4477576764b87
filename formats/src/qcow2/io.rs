//! The data path of a qcow2 node on its reactor.
//!
//! A read or an in-place overwrite that falls in one cluster whose L2 table is cached is
//! mapped synchronously and handed to the file's queue: the caller gets the file's own
//! `IoFuture`, so the fast path allocates nothing. Everything else — table loads, reads from
//! the backing file, compressed clusters, allocating writes (copy-on-write of the rest of the
//! cluster), zeroing and discarding — runs as a boxed slow path; changes to metadata are
//! serialised by the node's allocation lock.
//!
//! Subclusters (extended L2), as QEMU handles them: an allocating write copies on write only
//! within the subclusters it touches and marks just those allocated (the others keep reading
//! from the backing file or as zeroes); zeroing sets subcluster zero bits; an overwrite of an
//! allocated subcluster goes in place like any allocated cluster.
//!
//! Encrypted images take the slow path always: data is decrypted after it is read, and
//! encrypted into our own cluster buffer or a bounce copy before it is written (the caller's
//! buffer is never modified, and no plaintext reaches the file). Compressed clusters are read
//! as stored (QEMU does not encrypt them) and none are written.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;

use basalt_engine::{BlockStatus, InFlight, IoDone, IoFuture, IoStatus, LocalBoxFuture, NodeQueue, Queue, WriteFlags, ZeroFlags};
use basalt_reactor::IoBuf;

use crate::qcow2::compress;
use crate::qcow2::entry::{Mapping, COPIED, ZERO};
use crate::qcow2::meta::{MResult, MetaIo, Shared};

/// A qcow2 node's queue on one reactor.
pub(crate) struct Qcow2Queue {
    s: Arc<Shared>,
    file: Queue,
    /// Where data clusters live: the external data file, or `file` itself.
    data: Queue,
    backing: Option<Queue>,
    /// This queue's writes in flight, counted before their mapping is looked up.
    writes: InFlight,
}

/// One piece of a request: guest offset, length, offset into the request's buffer.
#[derive(Clone, Copy)]
struct Piece {
    off: u64,
    len: u64,
    at: usize,
}

impl Qcow2Queue {
    pub(crate) fn new(s: Arc<Shared>, file: Queue, data: Queue, backing: Option<Queue>) -> Qcow2Queue {
        let writes = s.inflight.register();
        Qcow2Queue { s, file, data, backing, writes }
    }

    fn meta(&self) -> MetaIo<'_> {
        MetaIo { s: &self.s, file: &self.file }
    }

    fn pieces(&self, off: u64, len: u64) -> impl Iterator<Item = Piece> {
        let sc = self.s.layout.subcluster_size();
        let mut at = 0u64;
        std::iter::from_fn(move || {
            if at >= len {
                return None;
            }
            let o = off + at;
            let n = (sc - o % sc).min(len - at);
            let p = Piece { off: o, len: n, at: at as usize };
            at += n;
            Some(p)
        })
    }

    fn decode(&self, off: u64, e: u64, bitmap: u64) -> Result<Mapping, String> {
        let sc = ((off % self.s.cs) / self.s.layout.subcluster_size()) as u32;
        self.s.layout.decode(e, bitmap, sc)
    }

    /// The mapping of the (sub)cluster at `off`.
    async fn mapping(&self, off: u64) -> MResult<Mapping> {
        let (e, b) = self.meta().entry(off >> self.s.cluster_bits).await?;
        match self.decode(off, e, b) {
            Ok(m) => Ok(m),
            Err(msg) => Err(self.meta().corrupt(msg).await),
        }
    }

    /// Read one piece into `buf[p.at..p.at+p.len]`.
    async fn read_piece(&self, p: Piece, buf: IoBuf) -> (IoBuf, MResult<()>) {
        match self.mapping(p.off).await {
            Ok(m) => self.read_mapped(p, m, buf).await,
            Err(e) => (buf, Err(e)),
        }
    }

    /// Read one piece whose mapping is `m`.
    async fn read_mapped(&self, p: Piece, m: Mapping, mut buf: IoBuf) -> (IoBuf, MResult<()>) {
        let (ws, wl) = (buf.window_start(), buf.len());
        let dst = p.at..p.at + p.len as usize;
        let r = match m {
            Mapping::Zero { .. } => {
                buf[dst].fill(0);
                Ok(())
            }
            Mapping::Unallocated => match &self.backing {
                None => {
                    buf[dst].fill(0);
                    Ok(())
                }
                Some(b) => {
                    let bsize = b.node().size();
                    let have = bsize.saturating_sub(p.off).min(p.len) as usize;
                    buf[p.at + have..p.at + p.len as usize].fill(0);
                    if have > 0 {
                        buf.slice(p.at, have);
                        let d = b.read(p.off, buf).await;
                        buf = d.buf.expect("read returns its buffer");
                        buf.set_window(ws, wl);
                        d.res.map(|_| ())
                    } else {
                        Ok(())
                    }
                }
            },
            Mapping::Data { host, .. } => {
                let at = host + p.off % self.s.cs;
                buf.slice(p.at, p.len as usize);
                let d = self.data.read(at, buf).await;
                buf = d.buf.expect("read returns its buffer");
                buf.set_window(ws, wl);
                match (d.res, &self.s.crypt) {
                    (Ok(_), Some(c)) => c.decrypt(p.off, at, &mut buf[dst]),
                    (r, _) => r.map(|_| ()),
                }
            }
            Mapping::Compressed { host, len } => match self.read_compressed(host, len).await {
                Ok(cluster) => {
                    let o = (p.off % self.s.cs) as usize;
                    buf[dst].copy_from_slice(&cluster[o..o + p.len as usize]);
                    Ok(())
                }
                Err(e) => Err(e),
            },
        };
        (buf, r)
    }

    /// Read and decompress a compressed cluster.
    async fn read_compressed(&self, host: u64, len: u64) -> MResult<Vec<u8>> {
        let cs = self.s.cs;
        if len > 2 * cs + 512 || host >= 1 << 56 {
            return Err(self.meta().corrupt(format!("Compressed cluster at {host:#x} has an impossible length {len}")).await);
        }
        let raw = self.meta().read_bytes(host, len as usize).await?;
        let mut out = vec![0u8; cs as usize];
        match compress::decompress(self.s.compression, &raw, &mut out) {
            Ok(()) => Ok(out),
            Err(e) => {
                eprintln!("qcow2: {e} (host offset {host:#x})");
                Err(IoStatus::EIO)
            }
        }
    }

    async fn read_slow(self: Rc<Self>, off: u64, mut buf: IoBuf) -> IoDone {
        let len = buf.len() as u64;
        let (ws, wl) = (buf.window_start(), buf.len());
        let cs = self.s.cs;
        let pieces: Vec<Piece> = self.pieces(off, len).collect();
        let mut i = 0;
        while i < pieces.len() {
            let p = pieces[i];
            let m = match self.mapping(p.off).await {
                Ok(m) => m,
                Err(e) => return IoDone { buf: Some(buf), res: Err(e) },
            };
            let r = match m {
                // Pieces whose data lies contiguously in the file are read in one request.
                Mapping::Data { host, .. } if self.s.crypt.is_none() => {
                    let start = host + p.off % cs;
                    let mut n = 1;
                    let mut run = p.len;
                    while i + n < pieces.len() && run < (16 << 20) {
                        let q = pieces[i + n];
                        match self.mapping(q.off).await {
                            Ok(Mapping::Data { host: h, .. }) if h + q.off % cs == start + run => {
                                run += q.len;
                                n += 1;
                            }
                            _ => break,
                        }
                    }
                    buf.slice(p.at, run as usize);
                    let d = self.data.read(start, buf).await;
                    buf = d.buf.expect("read returns its buffer");
                    buf.set_window(ws, wl);
                    i += n - 1;
                    d.res.map(|_| ())
                }
                _ => {
                    let (b, r) = self.read_mapped(p, m, buf).await;
                    buf = b;
                    r
                }
            };
            if let Err(e) = r {
                return IoDone { buf: Some(buf), res: Err(e) };
            }
            i += 1;
        }
        IoDone { buf: Some(buf), res: Ok(len) }
    }

    /// The whole content of the cluster containing `off` as the guest sees it now.
    async fn cluster_content(&self, off: u64) -> MResult<IoBuf> {
        let cs = self.s.cs;
        let base = off / cs * cs;
        let mut buf = IoBuf::new(cs as usize);
        for p in self.pieces(base, cs) {
            let (b, r) = self.read_piece(p, buf).await;
            buf = b;
            r?;
        }
        Ok(buf)
    }

    /// Write one piece that needs allocation (or a change of mapping): build the whole new
    /// cluster, write it to a fresh (or reusable) host cluster, point the L2 entry at it, then
    /// drop the reference to what it replaced.
    async fn write_alloc(&self, off: u64, data: &[u8]) -> MResult<()> {
        let cs = self.s.cs;
        let gc = off / cs;
        let meta = self.meta();
        let g = self.lock_cluster(gc).await;
        let m = self.mapping(off).await?;
        // Someone may have allocated it while we waited.
        if let (Mapping::Data { host, copied: true }, false) = (m, self.s.layout.extended_l2) {
            // Counted before the lock goes: nobody can change the mapping until then.
            let counted = self.writes.enter();
            drop(g);
            let at = host + off % cs;
            let b = match &self.s.crypt {
                Some(c) => c.encrypted_copy(off, at, data)?,
                None => IoBuf::from_slice(data),
            };
            let d = self.data.write(at, b, WriteFlags::default()).with_guard(counted).await;
            return d.res.map(|_| ());
        }
        let mut cluster = self.cluster_content(off).await?;
        let o = (off % cs) as usize;
        cluster[o..o + data.len()].copy_from_slice(data);
        let (e, old_bitmap) = meta.entry(gc).await?;
        // What the entry points at now: a host cluster we may own alone (reused in place), one
        // shared with others (copied away from), or compressed data.
        let compressed = e & crate::qcow2::entry::COMPRESSED != 0;
        let old_host = if compressed { 0 } else { e & crate::qcow2::entry::OFFSET_MASK };
        let ext_data = self.s.layout.data_file;
        // With an external data file the host cluster is the guest cluster's own (1:1, no
        // refcount): always written in place.
        let reuse = if ext_data { Some(gc * cs) } else { (old_host != 0 && e & COPIED != 0).then_some(old_host) };
        meta.ensure_l2(gc).await?;
        let host = match reuse {
            Some(h) => h,
            None => meta.alloc_clusters(1).await?,
        };
        // When the rest of a new cluster is zero, write only the new data, over zeroes: past
        // the file's end (or where the file is known to read zeroes) space is zeroed ahead
        // with fallocate (in a growing window), and a cluster freed and now used again is
        // zeroed in place, so the cluster is allocated in the file as QEMU's zeroing fallocate
        // leaves it, at a fraction of the system calls.
        let end = o + data.len();
        // What is written of the new cluster content, and the subcluster bitmap of the entry.
        let (lo, hi, bitmap) = self.subcluster_span(o, end, e, old_bitmap, reuse.is_some());
        // Encrypted zeroes are not zero bytes: an encrypted cluster is always written whole.
        let new_cluster = reuse.is_none() && self.s.crypt.is_none() && !ext_data;
        let fresh = new_cluster && host >= self.s.zero_from.load(Ordering::Relaxed);
        let zero_cow =
            new_cluster && basalt_engine::buffer_is_zero(&cluster[lo..o]) && basalt_engine::buffer_is_zero(&cluster[end..hi]);
        let z = ZeroFlags { may_unmap: false, no_fallback: true, fua: false };
        let mut zeroed = false;
        if zero_cow && fresh {
            let pre = self.s.prealloc_end.load(Ordering::Relaxed).max(host);
            zeroed = host + cs <= pre || {
                // The window doubles with what was allocated since open, from one cluster up to
                // 8 MiB, so small images stay small and large copies rarely stop for it.
                let grown = pre.saturating_sub(self.s.open_size);
                let ahead = grown.clamp(cs, (8 << 20).max(cs));
                let upto = host + ahead;
                let ok =
                    self.s.fault.hit("data.zero-ahead").is_ok() && self.file.write_zeroes(pre, upto - pre, z).await.res.is_ok();
                if ok {
                    self.s.prealloc_end.store(upto, Ordering::Relaxed);
                }
                ok
            };
        } else if zero_cow {
            zeroed = self.s.fault.hit("data.zero-ahead").is_ok() && self.file.write_zeroes(host, cs, z).await.res.is_ok();
        }
        self.s.zero_from.fetch_max(host + cs, Ordering::Relaxed);
        if let Some(c) = &self.s.crypt {
            // `cluster` is our own buffer: encrypt it in place.
            if let Err(e) = c.encrypt(gc * cs, host, &mut cluster) {
                if reuse.is_none() {
                    let _ = meta.free_cluster(host).await;
                }
                return Err(e);
            }
        }
        // Write the data without holding the lock, so allocations of other clusters proceed.
        self.s.allocating().insert(gc, Vec::new());
        drop(g);
        let d = if let Err(e) = self.s.fault.hit("data.write") {
            basalt_engine::IoDone { buf: None, res: Err(e) }
        } else if zeroed {
            cluster.slice(o, data.len());
            self.data.write(host + o as u64, cluster, WriteFlags::default()).await
        } else {
            cluster.slice(lo, hi - lo);
            self.data.write(host + lo as u64, cluster, WriteFlags::default()).await
        };
        let _g = self.s.alloc.lock().await;
        let r = match d.res {
            Ok(_) => self.commit_alloc(gc, e, host, reuse.is_some(), bitmap).await,
            Err(err) => {
                if reuse.is_none() {
                    let _ = meta.free_cluster(host).await;
                }
                Err(err)
            }
        };
        let waiters = self.s.allocating().remove(&gc);
        if let Some(waiters) = waiters {
            for w in waiters {
                w.wake();
            }
        }
        r
    }

    /// For a write of bytes `o..end` of a cluster whose entry is `e` (extended L2 `bitmap`):
    /// the part of the new cluster content to write and the new bitmap. Without subclusters,
    /// the whole cluster. With them, only the subclusters written, plus, when the data moves
    /// to a new host cluster, those the old one holds (all of a compressed one); the others
    /// keep reading from the backing file or as zeroes, as QEMU leaves them.
    fn subcluster_span(&self, o: usize, end: usize, e: u64, bitmap: u64, reused: bool) -> (usize, usize, u64) {
        let cs = self.s.cs as usize;
        if !self.s.layout.extended_l2 {
            return (0, cs, 0);
        }
        let sc = self.s.layout.subcluster_size() as usize;
        let (first, last) = (o / sc, (end - 1) / sc);
        let touched = (u32::MAX >> (31 - (last - first))) << first;
        let old_alloc = bitmap as u32;
        let old_zero = (bitmap >> 32) as u32;
        let compressed = e & crate::qcow2::entry::COMPRESSED != 0;
        let host_old = !compressed && e & crate::qcow2::entry::OFFSET_MASK != 0;
        let write = match (compressed, reused) {
            (true, _) => u32::MAX,
            (false, true) => touched,
            (false, false) if host_old => touched | old_alloc,
            (false, false) => touched,
        };
        let alloc = write | if reused { old_alloc } else { 0 };
        let zero = old_zero & !alloc;
        let lo = write.trailing_zeros() as usize * sc;
        let hi = ((32 - write.leading_zeros()) as usize * sc).min(cs);
        (lo, hi, u64::from(alloc) | u64::from(zero) << 32)
    }

    /// Point guest cluster `gc` at its new `host` cluster (with the extended L2 `bitmap`) and
    /// drop what it replaced.
    async fn commit_alloc(&self, gc: u64, e: u64, host: u64, reused: bool, bitmap: u64) -> MResult<()> {
        let meta = self.meta();
        // Replacing a cluster: the entry must be on disk before the old cluster's refcount drops.
        let replaces = e & (crate::qcow2::entry::COMPRESSED | crate::qcow2::entry::OFFSET_MASK) != 0;
        meta.set_entry(gc, host | COPIED, bitmap, !reused && replaces).await?;
        if !reused {
            meta.free_target(e).await?;
        }
        Ok(())
    }

    /// The allocation lock, once no allocating write of guest cluster `gc` is in flight (one
    /// change of a cluster's mapping at a time, on every reactor).
    async fn lock_cluster(&self, gc: u64) -> crate::qcow2::lock::AsyncLockGuard<'_> {
        loop {
            self.wait_allocation(gc).await;
            let g = self.s.alloc.lock().await;
            if !self.s.allocating().contains_key(&gc) {
                return g;
            }
        }
    }

    async fn wait_allocation(&self, gc: u64) {
        std::future::poll_fn(|cx| {
            let mut a = self.s.allocating();
            match a.get_mut(&gc) {
                None => Poll::Ready(()),
                Some(w) => {
                    w.push(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await
    }

    async fn write_slow(self: Rc<Self>, off: u64, mut buf: IoBuf, flags: WriteFlags) -> IoDone {
        let len = buf.len() as u64;
        let (ws, wl) = (buf.window_start(), buf.len());
        let pieces: Vec<Piece> = self.pieces(off, len).collect();
        let mut i = 0;
        while i < pieces.len() {
            let p = pieces[i];
            // Counted before the lookup: a concurrent discard must not free the cluster under
            // an in-place write (dropped before anything takes the allocation lock).
            let counted = self.writes.enter();
            let m = match self.mapping(p.off).await {
                Ok(m) => m,
                Err(e) => return IoDone { buf: Some(buf), res: Err(e) },
            };
            let r = match m {
                Mapping::Data { host, copied: true } => {
                    let at = host + p.off % self.s.cs;
                    match &self.s.crypt {
                        // Encrypted from a copy: the caller's buffer stays as it was.
                        Some(c) => match c.encrypted_copy(p.off, at, &buf[p.at..p.at + p.len as usize]) {
                            Ok(b) => self.data.write(at, b, flags).with_guard(counted).await.res.map(|_| ()),
                            Err(e) => Err(e),
                        },
                        None => {
                            // Straight from the caller's buffer.
                            buf.set_window(ws + p.at, p.len as usize);
                            let d = self.data.write(at, buf, flags).with_guard(counted).await;
                            buf = d.buf.expect("write returns its buffer");
                            buf.set_window(ws, wl);
                            d.res.map(|_| ())
                        }
                    }
                }
                Mapping::Unallocated | Mapping::Zero { host: None } if self.whole_at(&pieces, i) > 0 => {
                    drop(counted);
                    // A run of whole new clusters: allocated together, written in one request.
                    let per = self.whole_at(&pieces, i);
                    let mut n = 1;
                    while n < 512 {
                        let j = i + n * per;
                        if j >= pieces.len() || self.whole_at(&pieces, j) == 0 || !self.same_l2(p.off, pieces[j].off) {
                            break;
                        }
                        match self.mapping(pieces[j].off).await {
                            Ok(Mapping::Unallocated | Mapping::Zero { host: None }) => n += 1,
                            _ => break,
                        }
                    }
                    let last = pieces[i + n * per - 1];
                    buf.set_window(ws + p.at, last.at + last.len as usize - p.at);
                    let (b, r) = self.write_alloc_run(p.off, buf, n as u64).await;
                    buf = b;
                    buf.set_window(ws, wl);
                    i += n * per - 1;
                    r
                }
                _ => {
                    drop(counted);
                    // With subclusters, the rest of the write into this cluster goes with it:
                    // one new cluster content and one entry update.
                    let mut n = 1;
                    while self.s.layout.extended_l2 && i + n < pieces.len() && pieces[i + n].off / self.s.cs == p.off / self.s.cs
                    {
                        n += 1;
                    }
                    let end = pieces[i + n - 1].at + pieces[i + n - 1].len as usize;
                    i += n - 1;
                    self.write_alloc(p.off, &buf[p.at..end]).await
                }
            };
            if let Err(e) = r {
                return IoDone { buf: Some(buf), res: Err(e) };
            }
            i += 1;
        }
        if flags.fua {
            if let Err(e) = self.data.flush().await.res {
                return IoDone { buf: Some(buf), res: Err(e) };
            }
        }
        IoDone { buf: Some(buf), res: Ok(len) }
    }

    /// How many pieces from `pieces[i]` make up one whole cluster of the write (so nothing of
    /// its old content survives): 1, or a cluster's subclusters with extended L2 entries; 0
    /// when the write does not cover the cluster there.
    fn whole_at(&self, pieces: &[Piece], i: usize) -> usize {
        let cs = self.s.cs;
        let per = (cs / self.s.layout.subcluster_size()) as usize;
        let p = pieces[i];
        match pieces.get(i + per - 1) {
            Some(last) if p.off.is_multiple_of(cs) && last.off + last.len == p.off + cs => per,
            _ => 0,
        }
    }

    fn same_l2(&self, a: u64, b: u64) -> bool {
        (a >> self.s.cluster_bits) / self.s.l2_entries == (b >> self.s.cluster_bits) / self.s.l2_entries
    }

    /// Allocate `n` contiguous clusters for whole-cluster data at `off` (all unallocated or
    /// plain zero, within one L2 table) and write them in one request. Falls back to cluster by
    /// cluster when the mappings changed meanwhile.
    async fn write_alloc_run(&self, off: u64, data: IoBuf, n: u64) -> (IoBuf, MResult<()>) {
        let cs = self.s.cs;
        let gc0 = off / cs;
        let meta = self.meta();
        for k in 0..n {
            self.wait_allocation(gc0 + k).await;
        }
        let g = self.s.alloc.lock().await;
        let mut ok = true;
        for k in 0..n {
            let busy = self.s.allocating().contains_key(&(gc0 + k));
            let (e, _) = match meta.entry(gc0 + k).await {
                Ok(v) => v,
                Err(e) => return (data, Err(e)),
            };
            // No host cluster at all (with subclusters, the first one's mapping does not say).
            let hostless = e & (crate::qcow2::entry::OFFSET_MASK | crate::qcow2::entry::COMPRESSED) == 0;
            let free =
                hostless && matches!(self.s.layout.decode(e, 0, 0), Ok(Mapping::Unallocated | Mapping::Zero { host: None }));
            if busy || !free {
                ok = false;
                break;
            }
        }
        if !ok {
            drop(g);
            for k in 0..n {
                let at = (k * cs) as usize;
                if let Err(e) = self.write_alloc(off + k * cs, &data[at..at + cs as usize]).await {
                    return (data, Err(e));
                }
            }
            return (data, Ok(()));
        }
        if let Err(e) = meta.ensure_l2(gc0).await {
            return (data, Err(e));
        }
        let ext_data = self.s.layout.data_file;
        let host = if ext_data {
            gc0 * cs
        } else {
            match meta.alloc_clusters(n).await {
                Ok(h) => h,
                Err(e) => return (data, Err(e)),
            }
        };
        if let Err(e) = self.s.fault.hit("data.write") {
            return (data, Err(e));
        }
        self.s.zero_from.fetch_max(host + n * cs, Ordering::Relaxed);
        let bounce = match &self.s.crypt {
            // Encrypted into a bounce buffer: the caller's buffer stays as it was.
            Some(c) => match c.encrypted_copy(off, host, &data) {
                Ok(b) => Some(b),
                Err(e) => {
                    for k in 0..n {
                        let _ = meta.free_cluster(host + k * cs).await;
                    }
                    return (data, Err(e));
                }
            },
            None => None,
        };
        for k in 0..n {
            self.s.allocating().insert(gc0 + k, Vec::new());
        }
        drop(g);
        let (res, data) = match bounce {
            Some(b) => (self.data.write(host, b, WriteFlags::default()).await.res, data),
            None => {
                let d = self.data.write(host, data, WriteFlags::default()).await;
                (d.res, d.buf.expect("write returns its buffer"))
            }
        };
        let _g = self.s.alloc.lock().await;
        let mut r = Ok(());
        match res {
            Ok(_) => {
                // With subclusters, every one of them allocated.
                let bitmap = if self.s.layout.extended_l2 { 0xffff_ffff } else { 0 };
                for k in 0..n {
                    if let Err(e) = meta.set_entry(gc0 + k, (host + k * cs) | COPIED, bitmap, false).await {
                        r = Err(e);
                        break;
                    }
                }
            }
            Err(e) => {
                for k in 0..n {
                    if !ext_data {
                        let _ = meta.free_cluster(host + k * cs).await;
                    }
                }
                r = Err(e);
            }
        }
        for k in 0..n {
            let waiters = self.s.allocating().remove(&(gc0 + k));
            if let Some(waiters) = waiters {
                for w in waiters {
                    w.wake();
                }
            }
        }
        (data, r)
    }

    /// Zero or discard whole clusters by changing their entries; partial clusters are written
    /// as zeroes through the write path.
    /// Zero `off..off+len` (no unmapping), outside the engine's bounds checks: for the node
    /// itself, after it has grown.
    pub(crate) async fn zero_range(self: Rc<Self>, off: u64, len: u64) -> IoDone {
        self.zero_or_discard(off, len, false, false).await
    }

    /// Read `buf.len()` guest bytes at `off` through the data path, for the node itself.
    pub(crate) async fn read_range(self: Rc<Self>, off: u64, buf: IoBuf) -> IoDone {
        self.read_slow(off, buf).await
    }

    /// Write `buf` at `off` through the data path, for the node itself.
    pub(crate) async fn write_range(self: Rc<Self>, off: u64, buf: IoBuf) -> IoDone {
        self.write_slow(off, buf, WriteFlags::default()).await
    }

    async fn zero_or_discard(self: Rc<Self>, off: u64, len: u64, discard: bool, unmap: bool) -> IoDone {
        let cs = self.s.cs;
        // As QEMU: a raw data file is zeroed first, then the entries (for a discard, the
        // whole clusters it drops), so it keeps reading as the guest's content.
        let raw_zero = |at: u64, n: u64| {
            let z = ZeroFlags { may_unmap: unmap, no_fallback: false, fua: false };
            self.data.write_zeroes(at, n, z)
        };
        if self.s.data_raw && !discard {
            if let Err(e) = raw_zero(off, len).await.res {
                return IoDone::err(e);
            }
        }
        let v3 = self.s.hdr.lock().unwrap_or_else(|e| e.into_inner()).version >= 3;
        let mut at = off;
        let end = off + len;
        while at < end {
            let cend = ((at / cs) + 1) * cs;
            let n = cend.min(end) - at;
            let whole = at.is_multiple_of(cs) && n == cs;
            if whole && discard && self.s.data_raw {
                if let Err(e) = raw_zero(at, n).await.res {
                    return IoDone::err(e);
                }
            }
            let r = if whole {
                self.zero_cluster(at / cs, discard, unmap, v3).await
            } else if discard {
                Ok(()) // partial discards are advisory
            } else if self.s.layout.extended_l2 {
                self.zero_in_cluster(at, n).await
            } else if self.reads_as_zero(at, n).await {
                // The rest of the cluster reads as zeroes already: as QEMU, make it a zero
                // cluster (v3) rather than allocate it; v2 needs nothing.
                if v3 && !self.s.layout.extended_l2 {
                    self.zero_cluster(at / cs, false, unmap, v3).await
                } else {
                    Ok(())
                }
            } else {
                let z = vec![0u8; n as usize];
                self.write_alloc(at, &z).await
            };
            if let Err(e) = r {
                return IoDone::err(e);
            }
            at += n;
        }
        IoDone::ok(len)
    }

    /// Whether the cluster containing a partial zero write of `off..off+len` reads as zeroes
    /// around it without looking at data (QEMU's check before it makes the whole cluster a
    /// zero cluster): a zero cluster, or an unallocated one whose head and tail read as zeroes
    /// through the backing chain (or that has no backing file).
    async fn reads_as_zero(&self, off: u64, len: u64) -> bool {
        if self.s.layout.extended_l2 {
            return false;
        }
        match self.mapping(off).await {
            Ok(Mapping::Zero { .. }) => true,
            Ok(Mapping::Unallocated) => match &self.backing {
                None => true,
                Some(b) => {
                    let start = off - off % self.s.cs;
                    let end = start + self.s.cs;
                    chain_reads_zero(b, start, off - start, 0).await && chain_reads_zero(b, off + len, end - off - len, 0).await
                }
            },
            _ => false,
        }
    }

    /// Zero `off..off+len`, part of one cluster of an image with subclusters, as QEMU does:
    /// whole subclusters get their zero bit (their allocation kept in the host cluster), a
    /// partial subcluster becomes a zero subcluster when the rest of it reads as zeroes
    /// already, and is written with zeroes otherwise (and in compressed clusters).
    async fn zero_in_cluster(&self, off: u64, len: u64) -> MResult<()> {
        let sc = self.s.layout.subcluster_size();
        let end = off + len;
        let mut at = off;
        while at < end {
            let s0 = at - at % sc;
            let mut n = (s0 + sc).min(end) - at;
            let zero_whole = if at == s0 && n == sc {
                // As many whole subclusters as follow.
                n = (end - at) / sc * sc;
                true
            } else {
                match self.mapping(at).await? {
                    Mapping::Zero { .. } => true,
                    Mapping::Unallocated => match &self.backing {
                        None => true,
                        Some(b) => {
                            chain_reads_zero(b, s0, at - s0, 0).await && chain_reads_zero(b, at + n, s0 + sc - at - n, 0).await
                        }
                    },
                    _ => false,
                }
            };
            let zeroed = zero_whole && self.zero_subclusters(at - at % sc, n.next_multiple_of(sc)).await?;
            if !zeroed {
                let z = vec![0u8; n as usize];
                self.write_alloc(at, &z).await?;
            }
            at += n;
        }
        Ok(())
    }

    /// Set the zero bits (and clear the allocation bits) of the whole subclusters in
    /// `off..off+len` of one cluster. False when the cluster is compressed (subclusters of a
    /// compressed cluster cannot be zeroed alone).
    async fn zero_subclusters(&self, off: u64, len: u64) -> MResult<bool> {
        let gc = off / self.s.cs;
        let _g = self.lock_cluster(gc).await;
        let meta = self.meta();
        let (e, bitmap) = meta.entry(gc).await?;
        if e & crate::qcow2::entry::COMPRESSED != 0 {
            return Ok(false);
        }
        let sc = self.s.layout.subcluster_size();
        let first = (off % self.s.cs) / sc;
        let count = len / sc;
        let range = ((u64::from(u32::MAX) >> (32 - count)) << first) & 0xffff_ffff;
        let new = (bitmap | range << 32) & !range;
        if new != bitmap {
            meta.ensure_l2(gc).await?;
            meta.set_entry(gc, e, new, false).await?;
        }
        Ok(true)
    }

    async fn zero_cluster(&self, gc: u64, discard: bool, unmap: bool, v3: bool) -> MResult<()> {
        let _g = self.lock_cluster(gc).await;
        let meta = self.meta();
        let (e, _) = meta.entry(gc).await?;
        let ext = self.s.layout.extended_l2;
        // In an external data file, offset 0 with COPIED is a host cluster too.
        let has_host = |e: u64| {
            e & crate::qcow2::entry::COMPRESSED == 0
                && (e & crate::qcow2::entry::OFFSET_MASK != 0 || (self.s.layout.data_file && e & COPIED != 0))
        };
        let has_backing = self.backing.is_some();
        // As QEMU: a discard (v3) without a backing file leaves a cluster with nothing
        // allocated as it is (unallocated, or zero), and makes any other one read as zeroes.
        let allocated = has_host(e) || e & crate::qcow2::entry::COMPRESSED != 0;
        if discard && v3 && !has_backing && !allocated {
            return Ok(());
        }
        // The new entry: zero flag (v3) or unallocated; keep the allocation when not unmapping.
        let keep = !discard && !unmap && has_host(e) && e & COPIED != 0;
        let (new, bitmap) = if ext {
            if keep {
                (e & !ZERO, 0xffff_ffff_0000_0000)
            } else {
                (0, 0xffff_ffff_0000_0000)
            }
        } else if discard && !v3 && has_backing {
            // Unallocating would expose the backing file's data: QEMU leaves the cluster as it is.
            return Ok(());
        } else if discard && !v3 {
            (0, 0)
        } else if !v3 {
            // v2 has no zero flag: without a backing file unallocated reads as zero.
            if has_backing {
                return Err(IoStatus::ENOTSUP);
            }
            (0, 0)
        } else if keep {
            ((e & !ZERO) | ZERO, 0)
        } else {
            (ZERO, 0)
        };
        if new == e && !ext {
            return Ok(());
        }
        // The allocation is kept only where the new entry still points at it (a v2 image has no
        // zero flag: its cluster is unallocated and freed, as QEMU does).
        let keep = keep && has_host(new);
        meta.set_entry(gc, new, bitmap, !keep).await?;
        if !keep {
            // In-flight writes (on any reactor) may still target the old cluster: let them
            // land first.
            self.s.inflight.drain().await;
            meta.free_target(e).await?;
            // As QEMU: a data cluster dropped from a (non-raw) external data file is
            // discarded there, as a freed cluster is in the image file.
            if self.s.layout.data_file && !self.s.data_raw && has_host(e) && self.s.pass_discard {
                let cs = self.s.cs;
                let _ = self.data.discard(gc * cs, cs).await;
            }
        }
        Ok(())
    }

    /// Compress and write whole clusters. Compressed data is packed after the previous
    /// compressed cluster's data when it fits in the same host cluster (whose refcount then
    /// counts both), as QEMU packs it; data that does not shrink is written normally.
    async fn write_compressed(self: Rc<Self>, off: u64, buf: IoBuf) -> IoDone {
        let cs = self.s.cs;
        let size = self.s.hdr.lock().unwrap_or_else(|e| e.into_inner()).size;
        let len = buf.len() as u64;
        if !off.is_multiple_of(cs) || !len.is_multiple_of(cs) && off + len != size {
            return IoDone { buf: Some(buf), res: Err(IoStatus::EINVAL) };
        }
        // Compress every cluster of the request on the blocking pool at once (the reactor stays
        // free and the clusters compress on several cores), then write them in order. The jobs
        // read the clusters in place; only a short last cluster is copied (zero-padded).
        let buf = Arc::new(buf);
        let mut jobs = Vec::with_capacity(len.div_ceil(cs) as usize);
        let mut at = 0u64;
        while at < len {
            let n = cs.min(len - at);
            let src = Source { buf: buf.clone(), at: at as usize, len: n as usize, cluster: cs as usize };
            jobs.push((at, n, basalt_reactor::spawn_local(compress_off_reactor(self.s.compression, src))));
            at += n;
        }
        let mut res = Ok(len);
        for (at, n, job) in jobs {
            // Every job is awaited, after a failure too, so that none still reads the buffer.
            let c = job.await;
            if res.is_err() {
                continue;
            }
            let r = match c {
                None => self.write_alloc(off + at, &buf[at as usize..(at + n) as usize]).await,
                Some(c) => self.write_compressed_cluster((off + at) / cs, &c).await,
            };
            if let Err(e) = r {
                res = Err(e);
            }
        }
        // The jobs dropped their references before they completed.
        IoDone { buf: Arc::into_inner(buf), res }
    }

    async fn write_compressed_cluster(&self, gc: u64, data: &[u8]) -> MResult<()> {
        let cs = self.s.cs;
        let _g = self.lock_cluster(gc).await;
        let meta = self.meta();
        let (e, _) = meta.entry(gc).await?;
        // As QEMU: compressed data only goes to clusters without a host cluster.
        if e & (crate::qcow2::entry::COMPRESSED | crate::qcow2::entry::OFFSET_MASK) != 0 {
            return Err(IoStatus::EIO);
        }
        meta.ensure_l2(gc).await?;
        let len = data.len() as u64;
        // Continue in the host cluster of the previous compressed write when it fits and its
        // refcount can count one more user.
        let cursor = self.s.compress_cursor.load(Ordering::Relaxed);
        let room = cursor != 0
            && !cursor.is_multiple_of(cs)
            && cursor % cs + len <= cs
            && meta.refcount(cursor / cs).await? < crate::qcow2::refcount::max_refcount(self.s.rc_order());
        let host = match cursor {
            p if room => {
                meta.add_refcount(p / cs, 1).await?;
                p
            }
            _ => meta.alloc_clusters(len.div_ceil(cs)).await?,
        };
        self.s.fault.hit("compressed.write")?;
        let d = self.file.write(host, IoBuf::from_slice(data), WriteFlags::default()).await;
        d.res?;
        // A new host cluster past what was ever written, but zeroed ahead, keeps no space past
        // the compressed data (later compressed clusters may still fill it), as one never
        // zeroed would not.
        let (tail, cluster_end) = ((host + len).next_multiple_of(4096), (host + len).next_multiple_of(cs));
        let fresh = host >= self.s.zero_from.load(Ordering::Relaxed);
        if !room && fresh && tail < cluster_end && tail < self.s.prealloc_end.load(Ordering::Relaxed) {
            let _ = self.file.discard(tail, cluster_end - tail).await;
        }
        self.s.zero_from.fetch_max(host + len, Ordering::Relaxed);
        self.s.compress_cursor.store(host + len, Ordering::Relaxed);
        let entry = self.s.layout.compressed_entry(host, len);
        // The entry had no host cluster (checked above): nothing is replaced or freed.
        meta.set_entry(gc, entry, 0, false).await?;
        Ok(())
    }

    /// The status of the (sub)cluster at `off` with mapping `m`. With extended L2 entries, an
    /// unallocated or zero subcluster of a cluster that has a host cluster still reports where
    /// it would be, as QEMU does.
    async fn status_at(&self, m: Mapping, off: u64) -> Result<BlockStatus, IoStatus> {
        let cs = self.s.cs;
        let mut st = status_of(m, off % cs, self.data.node().clone());
        if self.s.layout.extended_l2 && st.offset.is_none() && matches!(m, Mapping::Unallocated | Mapping::Zero { .. }) {
            let (e, _) = self.meta().entry(off / cs).await?;
            let host = e & crate::qcow2::entry::OFFSET_MASK;
            let present = host != 0 || (self.s.layout.data_file && e & COPIED != 0);
            if e & crate::qcow2::entry::COMPRESSED == 0 && present {
                st.offset = Some(host + off % cs);
                st.file = Some(self.data.node().clone());
            }
        }
        if self.s.crypt.is_some() {
            // As QEMU: where encrypted data lies is not reported (it is not the guest's data).
            st.offset = None;
            st.file = None;
        }
        Ok(st)
    }

    /// Whether the image looks metadata-preallocated, decided once per open. Refcounts that
    /// cannot be read say no (the block status itself does not fail for them).
    async fn metadata_preallocated(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        match self.s.meta_prealloc.load(Relaxed) {
            0 => {
                let yes = self.meta().looks_metadata_preallocated().await.unwrap_or(false);
                self.s.meta_prealloc.store(if yes { 2 } else { 1 }, Relaxed);
                yes
            }
            v => v == 2,
        }
    }

    async fn status(&self, off: u64, len: u64) -> Result<BlockStatus, IoStatus> {
        let first = self.mapping(off).await?;
        let mut st = self.status_at(first, off).await?;
        let mut span = (self.s.layout.subcluster_size() - off % self.s.layout.subcluster_size()).min(len);
        // Extend over following (sub)clusters with the same status (and contiguous offsets).
        while span < len && span < (64 << 20) {
            let next = self.mapping(off + span).await?;
            let ns = self.status_at(next, off + span).await?;
            let contiguous = match (st.offset, ns.offset) {
                (Some(a), Some(b)) => a + span == b,
                (None, None) => true,
                _ => false,
            };
            if ns.data != st.data
                || ns.zero != st.zero
                || ns.allocated != st.allocated
                || ns.compressed != st.compressed
                || !contiguous
            {
                break;
            }
            span += self.s.layout.subcluster_size().min(len - span);
        }
        st.len = span.min(len);
        // In a metadata-preallocated image, data clusters may still read as zeroes in the file
        // (a hole, or an unwritten extent): the file is asked, as QEMU's block layer asks it
        // there, and "zero" (still "data") is reported where it is. In any other image an
        // allocated cluster is plain data, as QEMU reports it. QEMU does not look into an
        // external data file so.
        if let (true, Some(host), false) = (st.data && !st.compressed, st.offset, self.s.layout.data_file) {
            if self.metadata_preallocated().await {
                if let Ok(fs) = self.file.block_status(host, st.len).await {
                    st.len = fs.len.clamp(1, st.len);
                    if fs.zero && !fs.data {
                        st.zero = true;
                    }
                }
            }
        }
        Ok(st)
    }
}

/// Whether `off..off+len` of a backing image reads as zeroes by block status alone (QEMU's
/// `bdrv_co_is_zero_fast`): zeroes it reports, ranges past its end, and ranges no image of the
/// chain below defines. `depth` bounds the walk down the chain.
fn chain_reads_zero(q: &Queue, off: u64, len: u64, depth: usize) -> LocalBoxFuture<'_, bool> {
    Box::pin(async move {
        let end = (off + len).min(q.node().size());
        let mut at = off;
        while at < end {
            let Ok(st) = q.block_status(at, end - at).await else { return false };
            let n = st.len.clamp(1, end - at);
            if st.data && !st.zero {
                return false;
            }
            if !st.zero && !st.allocated {
                let below = q.node().children().into_iter().find(|c| c.role == basalt_engine::ChildRole::Backing);
                if let Some(c) = below {
                    let Ok(bq) = Queue::new(c.node) else { return false };
                    if depth >= crate::qcow2::MAX_CHAIN || !chain_reads_zero(&bq, at, n, depth + 1).await {
                        return false;
                    }
                }
            } else if !st.zero {
                return false;
            }
            at += n;
        }
        true
    })
}

/// One cluster of a compressed write, read in place by a compression job.
struct Source {
    buf: Arc<IoBuf>,
    at: usize,
    len: usize,
    /// The cluster size: a shorter last cluster is compressed zero-padded to it.
    cluster: usize,
}

/// Compress a cluster on the blocking thread pool.
async fn compress_off_reactor(t: compress::CompressionType, src: Source) -> Option<Vec<u8>> {
    let out = std::sync::Arc::new(std::sync::Mutex::new(None));
    let o2 = out.clone();
    let _ = basalt_reactor::blocking(
        move || {
            let data = &src.buf[src.at..src.at + src.len];
            let c = if src.len == src.cluster {
                compress::compress(t, data)
            } else {
                let mut padded = vec![0u8; src.cluster];
                padded[..src.len].copy_from_slice(data);
                compress::compress(t, &padded)
            };
            // The buffer is given back before the result is published.
            drop(src);
            *o2.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
            0
        },
        None,
    )
    .await;
    let r = out.lock().unwrap_or_else(|e| e.into_inner()).take().flatten();
    r
}

fn status_of(m: Mapping, in_cluster: u64, file: Arc<dyn basalt_engine::Node>) -> BlockStatus {
    match m {
        Mapping::Unallocated => {
            BlockStatus { len: 0, data: false, zero: false, allocated: false, offset: None, file: None, compressed: false }
        }
        // A preallocated zero cluster reports where it is, as QEMU does.
        Mapping::Zero { host } => BlockStatus {
            len: 0,
            data: false,
            zero: true,
            allocated: true,
            offset: host.map(|h| h + in_cluster),
            file: host.map(|_| file),
            compressed: false,
        },
        Mapping::Data { host, .. } => BlockStatus {
            len: 0,
            data: true,
            zero: false,
            allocated: true,
            offset: Some(host + in_cluster),
            file: Some(file),
            compressed: false,
        },
        Mapping::Compressed { .. } => {
            BlockStatus { len: 0, data: true, zero: false, allocated: true, offset: None, file: None, compressed: true }
        }
    }
}

/// The per-reactor queue handed to the engine: a shared handle, so slow paths can own it.
pub(crate) struct Qcow2NodeQueue(pub(crate) Rc<Qcow2Queue>);

impl NodeQueue for Qcow2NodeQueue {
    fn read(&self, off: u64, buf: IoBuf) -> IoFuture {
        let q = &self.0;
        let cs = q.s.cs;
        let len = buf.len() as u64;
        if len > 0 && off % cs + len <= cs && q.s.crypt.is_none() {
            if let Some(Mapping::Data { host, .. }) = q.s.mapping_cached(off) {
                if !q.s.layout.extended_l2 || off % q.s.layout.subcluster_size() + len <= q.s.layout.subcluster_size() {
                    return q.data.read(host + off % cs, buf);
                }
            }
        }
        IoFuture::boxed(q.clone().read_slow(off, buf))
    }

    fn write(&self, off: u64, buf: IoBuf, flags: WriteFlags) -> IoFuture {
        let q = &self.0;
        if q.s.read_only || q.s.corrupt.load(std::sync::atomic::Ordering::Relaxed) {
            return IoFuture::done(buf, Err(IoStatus::EPERM));
        }
        if q.s.fault.tripped.load(Ordering::Relaxed) {
            return IoFuture::done(buf, Err(IoStatus::EIO));
        }
        let cs = q.s.cs;
        let len = buf.len() as u64;
        q.s.mark_dirty(off, len);
        let unit = q.s.layout.subcluster_size();
        if len > 0 && off % unit + len <= unit && !flags.fua && q.s.crypt.is_none() {
            // Counted before the lookup (see `InFlight`).
            let counted = q.writes.enter();
            if let Some(Mapping::Data { host, copied: true }) = q.s.mapping_cached(off) {
                return q.data.write(host + off % cs, buf, flags).with_guard(counted);
            }
        }
        IoFuture::boxed(q.clone().write_slow(off, buf, flags))
    }

    fn write_zeroes(&self, off: u64, len: u64, flags: ZeroFlags) -> IoFuture {
        let q = &self.0;
        if q.s.read_only {
            return IoFuture::err(IoStatus::EPERM);
        }
        q.s.mark_dirty(off, len);
        IoFuture::boxed(q.clone().zero_or_discard(off, len, false, flags.may_unmap))
    }

    fn discard(&self, off: u64, len: u64) -> IoFuture {
        let q = &self.0;
        if q.s.read_only {
            return IoFuture::err(IoStatus::EPERM);
        }
        q.s.mark_dirty(off, len);
        IoFuture::boxed(q.clone().zero_or_discard(off, len, true, true))
    }

    fn write_compressed(&self, off: u64, buf: IoBuf) -> IoFuture {
        let q = &self.0;
        if q.s.read_only || q.s.corrupt.load(Ordering::Relaxed) {
            return IoFuture::done(buf, Err(IoStatus::EPERM));
        }
        if q.s.crypt.is_some() || q.s.layout.data_file {
            // QEMU would store the compressed data unencrypted: refused rather than leaked. With
            // an external data file, QEMU refuses compressed writes too.
            return IoFuture::done(buf, Err(IoStatus::ENOTSUP));
        }
        q.s.mark_dirty(off, buf.len() as u64);
        IoFuture::boxed(q.clone().write_compressed(off, buf))
    }

    fn flush(&self) -> IoFuture {
        let q = self.0.clone();
        if q.s.fault.tripped.load(Ordering::Relaxed) {
            return IoFuture::err(IoStatus::EIO);
        }
        if q.s.lock_meta().dirty_count() == (0, 0) && !q.s.layout.data_file {
            return q.file.flush();
        }
        IoFuture::boxed(async move {
            // Data first: metadata on stable storage must not point at data that is not.
            if q.s.layout.data_file {
                let d = q.data.flush().await;
                if d.res.is_err() {
                    return d;
                }
            }
            let r = {
                let _g = q.s.alloc.lock().await;
                q.meta().writeback().await
            };
            match r {
                Ok(()) => q.file.flush().await,
                Err(e) => IoDone::err(e),
            }
        })
    }

    fn block_status(&self, off: u64, len: u64) -> LocalBoxFuture<'_, Result<BlockStatus, IoStatus>> {
        Box::pin(self.0.status(off, len))
    }
}
