//! Growing an image without an external data file with `falloc` or `full` preallocation,
//! laid out as QEMU 10's `qcow2_co_truncate` lays it out, so that both programs leave the
//! same file:
//!
//! 1. a refcount area at the end of what is in use (the last cluster with a nonzero
//!    refcount): new refcount blocks for every range up to the end of the data to come (and
//!    its L2 tables, over-estimated by one), then a new refcount table, always (the old one is
//!    freed);
//! 2. the data clusters of the grown range right after it, from the cluster holding the old
//!    end (allocated or not) to the new end, and the file grown over them with the data
//!    preallocation;
//! 3. the L2 entries pointing at them, one L2 table at a time, tables allocated first-fit as
//!    any table is; the head of the first cluster (guest bytes up to the old end) is copied
//!    into its new cluster and the cluster it had is freed.
//!
//! The new area reads as zeroes, also over a longer backing file: the file grows with zeroes
//! there, and with extended L2 entries the subclusters are then marked allocated. In an
//! encrypted image the new clusters are written with encrypted zeroes (QEMU leaves them as
//! the file's zeroes, which decrypt to noise); the layout is the same.
//!
//! Invariant kept throughout: a refcount reaches the disk before anything points at its
//! cluster, and a cluster is freed only after what pointed at it is gone from the disk.

use basalt_engine::{BlockError, BlockResult, ErrorKind, IoStatus, Prealloc, Queue};
use basalt_reactor::IoBuf;

use super::{entry, header, meta, refcount, Qcow2Node};

/// Extended L2 bitmap with every subcluster allocated and none reading as zeroes.
const ALL_ALLOCATED: u64 = 0xffff_ffff;

/// How many refcount blocks cover `clusters` clusters plus the refcount blocks and table
/// themselves.
fn refcount_blocks_for(clusters: u64, cluster_bits: u32, refcount_order: u32) -> u64 {
    refcount::refcount_metadata_clusters(clusters, cluster_bits, refcount_order).0
}

impl Qcow2Node {
    /// Grow from `old` to `new` guest bytes with `falloc` or `full` preallocation (no external
    /// data file), the allocation lock held and the L1 table already large enough.
    /// `zero_write`: a longer backing file must not show through the new area.
    pub(super) async fn grow_preallocated(
        &self,
        meta: &meta::MetaIo<'_>,
        file: &Queue,
        old: u64,
        new: u64,
        mode: Prealloc,
        zero_write: bool,
    ) -> BlockResult<()> {
        let cs = self.s.cs;
        let first = old / cs;
        let n_data = new.div_ceil(cs) - first;
        // As QEMU: enough L2 tables for the range, plus one for a partial table at either end.
        let n_l2 = n_data.div_ceil(self.s.l2_entries) + 1;
        let start = self.last_used_cluster(meta).await? + 1;
        let data = self.refcount_area(meta, start, n_data + n_l2, n_data).await?;
        let end = (data + n_data) * cs;
        let size = self.s.file.size();
        if end < size {
            // The file reaches past the data (freed clusters at its end): QEMU's file
            // preallocation refuses to shrink it, and the data clusters are freed again.
            let fail = |e: IoStatus| BlockError::from(e).context("Failed to resize underlying file");
            for c in data..data + n_data {
                meta.add_refcount(c, -1).await.map_err(fail)?;
            }
            meta.writeback_refblocks().await.map_err(fail)?;
            file.flush().await.res.map_err(fail)?;
            return Err(BlockError::new(
                ErrorKind::Unsupported,
                "Failed to resize underlying file: Cannot use preallocation for shrinking files",
            ));
        }
        if data * cs < size {
            // Freed clusters at the end of the file become data: they must read as zeroes
            // (QEMU leaves what they held).
            let z = basalt_engine::ZeroFlags { may_unmap: false, no_fallback: false, fua: false };
            let d = file.write_zeroes(data * cs, size - data * cs, z).await;
            d.res.map_err(|e| BlockError::from(e).context("Failed to resize underlying file"))?;
        }
        if end > size {
            self.s.file.truncate(end, mode).await.map_err(|e| e.context("Failed to resize underlying file"))?;
        }
        self.s.zero_from.fetch_max(end, std::sync::atomic::Ordering::Relaxed);
        self.link_grown(meta, file, old, data, n_data, zero_write).await?;
        file.flush().await.res.map(|_| ()).map_err(BlockError::from)
    }

    /// Point the `n` guest clusters from the one holding `old` at host clusters from `data`
    /// on, one L2 table at a time; the guest bytes of the first one before `old` are copied
    /// over first.
    async fn link_grown(
        &self,
        meta: &meta::MetaIo<'_>,
        file: &Queue,
        old: u64,
        data: u64,
        n: u64,
        zero_write: bool,
    ) -> BlockResult<()> {
        let cs = self.s.cs;
        let first = old / cs;
        let fail = |e: IoStatus| BlockError::from(e).context("Failed to update L2 tables");
        let head = (old % cs) as usize;
        if head > 0 {
            // QEMU's copy on write of the cluster's start: what the guest reads there now.
            let d = self.io_queue()?.read_range(first * cs, IoBuf::new(head)).await;
            d.res.map_err(fail)?;
            let mut buf = d.buf.expect("read returns its buffer");
            if let Some(c) = &self.s.crypt {
                buf = c.encrypted_copy(first * cs, data * cs, &buf).map_err(fail)?;
            }
            file.write(data * cs, buf, Default::default()).await.res.map_err(fail)?;
        }
        if let Some(c) = &self.s.crypt {
            // The file's zeroes would decrypt to noise: write encrypted zeroes instead.
            let zeroes = vec![0u8; cs as usize];
            for k in 0..n {
                let skip = if k == 0 { head } else { 0 };
                let mut buf = c.encrypted_copy((first + k) * cs, (data + k) * cs, &zeroes).map_err(fail)?;
                buf.slice(skip, cs as usize - skip);
                file.write((data + k) * cs + skip as u64, buf, Default::default()).await.res.map_err(fail)?;
            }
        }
        let w = self.s.words;
        let mut gc = first;
        while gc < first + n {
            let run = (self.s.l2_entries - gc % self.s.l2_entries).min(first + n - gc);
            // The first entry through `set_entry`, which gives the range a table of its own
            // (a new one, or a copy of one a snapshot shares); the rest in that table at once.
            meta.ensure_l2(gc).await.map_err(fail)?;
            let (e, b) = meta.entry(gc).await.map_err(fail)?;
            let host = |k: u64| ((data + k - first) * cs) | entry::COPIED;
            // With zeroes to show over a backing file every subcluster is allocated; otherwise
            // QEMU leaves the bitmap as it was (a new table's reads as zeroes).
            let bitmap = |b: u64| if w == 2 && zero_write { ALL_ALLOCATED } else { b };
            meta.set_entry(gc, host(gc), bitmap(b), false).await.map_err(fail)?;
            let l1e = self.s.lock_meta().l1[self.s.split(gc).0];
            let off = l1e & entry::OFFSET_MASK;
            let mut table = meta.l2_table(off).await.map_err(fail)?;
            let mut replaced = vec![e];
            for k in gc + 1..gc + run {
                let i = self.s.split(k).1 * w;
                replaced.push(table[i]);
                table[i] = host(k);
                if w == 2 {
                    table[i + 1] = bitmap(table[i + 1]);
                }
            }
            meta.put_l2_table(off, table).await.map_err(fail)?;
            replaced.retain(|e| e & (entry::OFFSET_MASK | entry::COMPRESSED) != 0);
            if !replaced.is_empty() {
                meta.writeback().await.map_err(fail)?;
                file.flush().await.res.map_err(fail)?;
                for e in replaced {
                    self.release(meta, e).await.map_err(fail)?;
                }
            }
            gc += run;
        }
        meta.writeback().await.map_err(fail)
    }

    /// Drop the references of a replaced L2 entry without discarding what becomes free (QEMU
    /// frees it with `QCOW2_DISCARD_NEVER`).
    async fn release(&self, meta: &meta::MetaIo<'_>, e: u64) -> Result<(), IoStatus> {
        let cs = self.s.cs;
        let clusters = match self.s.layout.decode(e, 0, 0) {
            Ok(entry::Mapping::Compressed { host, len }) => host / cs..(host + len - 1) / cs + 1,
            _ if e & entry::COMPRESSED == 0 => {
                let c = (e & entry::OFFSET_MASK) / cs;
                c..c + 1
            }
            _ => return Ok(()),
        };
        for c in clusters {
            meta.add_refcount(c, -1).await?;
        }
        Ok(())
    }

    /// The last cluster of the file with a nonzero refcount.
    async fn last_used_cluster(&self, meta: &meta::MetaIo<'_>) -> BlockResult<u64> {
        let fail = |e: IoStatus| BlockError::from(e).context("Failed to inquire current file length");
        let mut c = self.s.file.size().div_ceil(self.s.cs);
        while c > 0 {
            c -= 1;
            if meta.refcount(c).await.map_err(fail)? > 0 {
                return Ok(c);
            }
        }
        Err(BlockError::new(ErrorKind::Corrupt, "There are no references in the refcount table"))
    }

    /// QEMU's `qcow2_refcount_area`: make the refcount structures cover `additional` clusters
    /// from cluster `start` on (nothing at or after `start` is in use): new refcount blocks
    /// from `start` for the ranges that have none, then a new refcount table after them, all
    /// with refcount 1, and so are the `used` clusters right after them (the data clusters,
    /// QEMU's `qcow2_alloc_clusters_at`); the header is switched to the new table and the old
    /// one freed. Returns the first cluster after the area.
    async fn refcount_area(&self, meta: &meta::MetaIo<'_>, start: u64, additional: u64, used: u64) -> BlockResult<u64> {
        let fail = |e: IoStatus| BlockError::from(e).context("Failed to resize refcount structures");
        let cs = self.s.cs;
        let order = self.s.rc_order();
        let per = refcount::entries_per_block(self.s.cluster_bits, order);
        let blocks = refcount_blocks_for(start + additional, self.s.cluster_bits, order);
        let table_len = blocks.next_multiple_of(cs / 8);
        if table_len * 8 > header::MAX_REFTABLE_BYTES {
            return Err(BlockError::new(ErrorKind::OutOfBounds, "Failed to resize refcount structures: File too large"));
        }
        // Cached refcount changes go to disk first: the blocks are read back through the new table.
        meta.writeback().await.map_err(fail)?;
        let mut table = self.s.lock_meta().reftable.clone();
        table.resize(table_len as usize, 0);
        let first_block = start / per;
        let missing = (first_block..blocks).filter(|&i| table[i as usize] == 0).count() as u64;
        let table_at = start + missing;
        let end = table_at + table_len * 8 / cs;
        let mut fresh = Vec::new();
        let mut next = start;
        for i in first_block..blocks {
            if table[i as usize] == 0 {
                table[i as usize] = next * cs;
                fresh.push((i, vec![0u8; cs as usize]));
                next += 1;
            }
        }
        // Refcount 1 for the area and the clusters after it, in the new blocks or in those
        // that already cover them (before the blocks are written: one write each).
        let mut c = start;
        while c < end + used {
            let upto = (c / per + 1) * per;
            let upto = upto.min(end + used);
            match fresh.binary_search_by_key(&(c / per), |(i, _)| *i) {
                Ok(at) => (c..upto).for_each(|c| {
                    refcount::set(&mut fresh[at].1, order, c % per, 1);
                }),
                Err(_) => {
                    for c in c..upto {
                        meta.add_refcount(c, 1).await.map_err(fail)?;
                    }
                }
            }
            c = upto;
        }
        meta.writeback_refblocks().await.map_err(fail)?;
        for (i, b) in &fresh {
            meta.write_bytes("reftable.grow.blocks", table[*i as usize], b).await.map_err(fail)?;
        }
        let bytes: Vec<u8> = table.iter().flat_map(|v| v.to_be_bytes()).collect();
        meta.write_bytes("reftable.grow.table", table_at * cs, &bytes).await.map_err(fail)?;
        meta.file.flush().await.res.map_err(fail)?;
        let (old_off, old_clusters) = {
            let h = self.s.hdr.lock().unwrap_or_else(|e| e.into_inner());
            (h.refcount_table_offset, u64::from(h.refcount_table_clusters))
        };
        // Offset and size of the table are adjacent header fields: one write switches both.
        let mut hf = Vec::with_capacity(12);
        hf.extend_from_slice(&(table_at * cs).to_be_bytes());
        hf.extend_from_slice(&((table_len * 8 / cs) as u32).to_be_bytes());
        meta.write_bytes("reftable.grow.header", 48, &hf).await.map_err(fail)?;
        meta.file.flush().await.res.map_err(fail)?;
        {
            let mut h = self.s.hdr.lock().unwrap_or_else(|e| e.into_inner());
            h.refcount_table_offset = table_at * cs;
            h.refcount_table_clusters = (table_len * 8 / cs) as u32;
        }
        self.s.lock_meta().reset_refcounts(table);
        // Freed without a discard, as QEMU frees it (`QCOW2_DISCARD_OTHER`, off by default).
        for k in 0..old_clusters {
            meta.add_refcount(old_off / cs + k, -1).await.map_err(fail)?;
        }
        meta.writeback_refblocks().await.map_err(fail)?;
        Ok(end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_blocks_cover_themselves() {
        // 64 KiB clusters, 16-bit refcounts: one block covers 32768 clusters.
        assert_eq!(refcount_blocks_for(6, 16, 4), 1);
        assert_eq!(refcount_blocks_for(32766, 16, 4), 1);
        // The block and the table cluster no longer fit in the first block's range.
        assert_eq!(refcount_blocks_for(32767, 16, 4), 2);
        // 512-byte clusters, 16-bit refcounts: 256 per block, 64 blocks per table cluster.
        for clusters in [1u64, 250, 254, 255, 256, 10_000, 100_000] {
            let b = refcount_blocks_for(clusters, 9, 4);
            let t = b.div_ceil(64);
            assert!(b * 256 >= clusters + b + t, "{clusters}: {b} blocks do not cover");
            assert!((b - 1) * 256 < clusters + b - 1 + (b - 1).div_ceil(64), "{clusters}: {b} blocks are too many");
        }
    }
}
