//! Internal snapshots of an open qcow2 image: load the table, create, revert to (goto) and
//! delete snapshots, as `qemu-img snapshot -c/-a/-d` do.
//!
//! A snapshot is a copy of the active L1 table; everything it reaches (L2 tables, data and
//! compressed clusters) gains a reference, and writes then copy shared clusters and shared L2
//! tables before changing them (entries without the COPIED flag). Ordering keeps the image
//! consistent after a crash at any point: references are added (and on disk) before anything
//! points at them through a new table, a snapshot leaves the table before its references are
//! dropped, and the old snapshot table is freed only after the header points at the new one.
//! A crash leaks clusters at worst, which `check -r` repairs.
//!
//! The caller quiesces I/O on the node first (QEMU drains the node the same way).

use std::time::{SystemTime, UNIX_EPOCH};

use basalt_engine::{BlockError, BlockResult, ErrorKind, IoStatus, Queue, SnapshotInfo};
use basalt_reactor::IoBuf;

use crate::qcow2::entry::{self, COMPRESSED, COPIED, OFFSET_MASK};
use crate::qcow2::error::{bad, Qcow2Error};
use crate::qcow2::header::{Qcow2Header, MAX_L1_BYTES};
use crate::qcow2::meta::{MResult, MetaIo};
use crate::qcow2::snapshot::{self, Qcow2Snapshot, SnapshotTable, MAX_TABLE_BYTES};
use crate::qcow2::Qcow2Node;

/// Read and check the snapshot table the header describes.
pub(crate) async fn load(file: &Queue, hdr: &Qcow2Header, file_size: u64) -> BlockResult<SnapshotTable> {
    let n = hdr.nb_snapshots;
    if n == 0 {
        return Ok(SnapshotTable::default());
    }
    let cs = hdr.cluster_size();
    let end = file_size.next_multiple_of(cs);
    let read = |off: u64, len: u64| async move {
        if off.checked_add(len).is_none_or(|e| e > end) {
            return Err(BlockError::from(bad("Snapshot table offset invalid")));
        }
        let d = file.read(off, IoBuf::new_uninit(len as usize)).await;
        d.res.map_err(|e| BlockError::from(e).context("Could not read the snapshot table"))?;
        Ok(d.buf.expect("read returns its buffer").to_vec())
    };
    let mut list = Vec::with_capacity(n.min(1024) as usize);
    let mut off = hdr.snapshots_offset;
    let mut total = 0u64;
    for i in 0..n {
        let head = read(off, 40).await?;
        let len = snapshot::entry_len(&head, i)? as u64;
        total += len;
        if total > MAX_TABLE_BYTES {
            return Err(bad("Snapshot table is too big").into());
        }
        let b = read(off, len).await?;
        let (sn, _) = Qcow2Snapshot::parse(&b, i)?;
        list.push(sn);
        off += len;
    }
    Ok(SnapshotTable { list, bytes: total })
}

/// What `info` and `snapshot -l` show of a snapshot.
pub(crate) fn info(sn: &Qcow2Snapshot) -> SnapshotInfo {
    SnapshotInfo {
        id: sn.id.clone(),
        name: sn.name.clone(),
        vm_state_size: sn.vm_state_size,
        date_sec: sn.date_sec,
        date_nsec: sn.date_nsec,
        vm_clock_nsec: sn.vm_clock_nsec,
        icount: sn.icount,
    }
}

fn overflow(order: u32) -> BlockError {
    BlockError::new(
        ErrorKind::Unsupported,
        format!("Reference count overflow: refcount_bits={} cannot count one more reference to a cluster", 1u32 << order),
    )
}

fn fail(what: &'static str) -> impl Fn(IoStatus) -> BlockError {
    move |e| BlockError::from(e).context(what)
}

impl MetaIo<'_> {
    /// Add `addend` (+1 or -1) to the refcount of everything the L1 table `l1` reaches: each
    /// L2 table and, through each reference to a table, the clusters its entries point at.
    async fn update_refcounts(&self, l1: &[u64], addend: i64) -> MResult<()> {
        let cs = self.s.cs;
        let w = self.s.words;
        for (i, &l1e) in l1.iter().enumerate() {
            let off = match entry::l1_l2_offset(l1e, self.s.cluster_bits) {
                Ok(Some(o)) => o,
                Ok(None) => continue,
                Err(m) => return Err(self.corrupt(format!("{m} (L1 index: {i:#x})")).await),
            };
            let t = self.l2_table(off).await?;
            for k in (0..t.len()).step_by(w) {
                let e = t[k];
                if e & COMPRESSED != 0 {
                    if let Ok(entry::Mapping::Compressed { host, len }) = self.s.layout.decode(e, 0, 0) {
                        for c in host / cs..=(host + len - 1) / cs {
                            self.change(c, addend).await?;
                        }
                    }
                } else if e & OFFSET_MASK != 0 {
                    self.change((e & OFFSET_MASK) / cs, addend).await?;
                }
            }
            self.change(off / cs, addend).await?;
        }
        Ok(())
    }

    async fn change(&self, c: u64, addend: i64) -> MResult<()> {
        if addend < 0 {
            self.free_cluster(c * self.s.cs).await
        } else {
            self.add_refcount(c, addend).await.map(|_| ())
        }
    }

    /// Whether every cluster the L1 table `l1` reaches can count one more reference (narrow
    /// refcounts cannot count many snapshots). Compressed data shared by several entries
    /// gains one reference per entry.
    async fn refs_fit(&self, l1: &[u64]) -> MResult<bool> {
        let cs = self.s.cs;
        let w = self.s.words;
        let max = crate::qcow2::refcount::max_refcount(self.s.rc_order());
        let mut packed: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
        for &l1e in l1 {
            let Ok(Some(off)) = entry::l1_l2_offset(l1e, self.s.cluster_bits) else { continue };
            if self.refcount(off / cs).await? >= max {
                return Ok(false);
            }
            let t = self.l2_table(off).await?;
            for k in (0..t.len()).step_by(w) {
                let e = t[k];
                if e & COMPRESSED != 0 {
                    if let Ok(entry::Mapping::Compressed { host, len }) = self.s.layout.decode(e, 0, 0) {
                        for c in host / cs..=(host + len - 1) / cs {
                            *packed.entry(c).or_default() += 1;
                        }
                    }
                } else if e & OFFSET_MASK != 0 && self.refcount((e & OFFSET_MASK) / cs).await? >= max {
                    return Ok(false);
                }
            }
        }
        for (c, n) in packed {
            if self.refcount(c).await?.saturating_add(n) > max {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Make the COPIED flags of the active tables say whether the refcount is exactly one.
    /// Refcounts must be on disk before a flag is set (the caller writes them back first).
    async fn fix_copied(&self) -> MResult<()> {
        let cs = self.s.cs;
        let w = self.s.words;
        let l1 = self.s.lock_meta().l1.clone();
        for (i, &l1e) in l1.iter().enumerate() {
            let off = match entry::l1_l2_offset(l1e, self.s.cluster_bits) {
                Ok(Some(o)) => o,
                Ok(None) => continue,
                Err(m) => return Err(self.corrupt(format!("{m} (L1 index: {i:#x})")).await),
            };
            let mut t = self.l2_table(off).await?;
            let mut changed = false;
            for k in (0..t.len()).step_by(w) {
                let e = t[k];
                if e & COMPRESSED != 0 || e & OFFSET_MASK == 0 {
                    continue;
                }
                let want = if self.refcount((e & OFFSET_MASK) / cs).await? == 1 { e | COPIED } else { e & !COPIED };
                if want != e {
                    t[k] = want;
                    changed = true;
                }
            }
            if changed {
                self.put_l2_table(off, t).await?;
            }
            let want = if self.refcount(off / cs).await? == 1 { l1e | COPIED } else { l1e & !COPIED };
            if want != l1e {
                self.set_l1_entry(i, want).await?;
            }
        }
        Ok(())
    }

    /// Write `list` as the new snapshot table: to fresh clusters, then the header switched to
    /// it, then the old table freed.
    async fn write_table(&self, list: &[Qcow2Snapshot]) -> MResult<()> {
        let cs = self.s.cs;
        let bytes = snapshot::serialize_table(list).map_err(|_| IoStatus(libc::EFBIG))?;
        let off = if bytes.is_empty() {
            0
        } else {
            let off = self.alloc_clusters((bytes.len() as u64).div_ceil(cs)).await?;
            self.write_bytes("snapshot.table", off, &bytes).await?;
            off
        };
        self.writeback().await?;
        self.file.flush().await.res?;
        // nb_snapshots and snapshots_offset are adjacent: one write switches both.
        let mut hf = Vec::with_capacity(12);
        hf.extend_from_slice(&(list.len() as u32).to_be_bytes());
        hf.extend_from_slice(&off.to_be_bytes());
        self.write_bytes("snapshot.header", 60, &hf).await?;
        self.file.flush().await.res?;
        let (old_off, old_n) = {
            let mut h = self.s.hdr.lock().unwrap_or_else(|e| e.into_inner());
            let old = (h.snapshots_offset, h.nb_snapshots);
            h.nb_snapshots = list.len() as u32;
            h.snapshots_offset = off;
            old
        };
        let old_len = std::mem::replace(
            &mut *self.s.snapshots.lock().unwrap_or_else(|e| e.into_inner()),
            SnapshotTable { list: list.to_vec(), bytes: bytes.len() as u64 },
        )
        .bytes;
        if old_n > 0 && old_off != 0 {
            for k in 0..old_len.div_ceil(cs) {
                self.free_cluster(old_off + k * cs).await?;
            }
        }
        Ok(())
    }

    /// Read a snapshot's L1 table.
    pub(crate) async fn read_l1(&self, sn: &Qcow2Snapshot) -> MResult<Vec<u64>> {
        if sn.l1_size == 0 {
            return Ok(Vec::new());
        }
        let b = self.read_bytes(sn.l1_table_offset, sn.l1_size as usize * 8).await?;
        Ok(crate::qcow2::meta::be_words(&b))
    }
}

impl Qcow2Node {
    fn snapshot_list(&self) -> Vec<Qcow2Snapshot> {
        self.s.snapshots.lock().unwrap_or_else(|e| e.into_inner()).list.clone()
    }

    fn writable(&self) -> BlockResult<()> {
        if self.s.read_only {
            return Err(BlockError::new(ErrorKind::PermissionDenied, "Image is read-only"));
        }
        Ok(())
    }

    /// Take a snapshot named `name` of the current state.
    pub async fn snapshot_create_named(&self, name: &str) -> BlockResult<()> {
        self.writable()?;
        if self.s.layout.data_file {
            // As QEMU: a snapshot cannot keep the data file's clusters.
            return Err(BlockError::new(ErrorKind::Unsupported, "Operation not supported"));
        }
        let file = Queue::new(self.s.file.clone())?;
        let meta = MetaIo { s: &self.s, file: &file };
        let f = fail("Could not create the snapshot");
        let _g = self.s.alloc.lock().await;
        let mut list = self.snapshot_list();
        if list.len() as u32 >= snapshot::MAX_SNAPSHOTS {
            return Err(BlockError::from(Qcow2Error::Unsupported("Too many snapshots".into())));
        }
        meta.writeback().await.map_err(&f)?;
        let active = self.s.lock_meta().l1.clone();
        if !meta.refs_fit(&active).await.map_err(&f)? {
            return Err(overflow(self.s.rc_order()));
        }
        let (l1_size, disk_size) = {
            let h = self.s.hdr.lock().unwrap_or_else(|e| e.into_inner());
            (h.l1_size, h.size)
        };
        let l1 = self.s.lock_meta().l1.clone();
        // The copy of the L1 table, then the references it adds.
        let l1_off = if l1_size > 0 {
            let bytes: Vec<u8> = l1.iter().flat_map(|v| v.to_be_bytes()).collect();
            let off = meta.alloc_clusters((bytes.len() as u64).div_ceil(self.s.cs)).await.map_err(&f)?;
            meta.write_bytes("snapshot.l1", off, &bytes).await.map_err(&f)?;
            off
        } else {
            0
        };
        meta.update_refcounts(&l1, 1).await.map_err(&f)?;
        meta.writeback().await.map_err(&f)?;
        file.flush().await.res.map_err(&f)?;
        meta.fix_copied().await.map_err(&f)?;
        meta.writeback().await.map_err(&f)?;
        file.flush().await.res.map_err(&f)?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        list.push(Qcow2Snapshot {
            l1_table_offset: l1_off,
            l1_size,
            id: snapshot::next_id(&list),
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            // Microsecond resolution, as QEMU records it.
            date_nsec: now.subsec_micros() * 1000,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(disk_size),
            icount: Some(0),
            unknown_extra: Vec::new(),
        });
        meta.write_table(&list).await.map_err(&f)?;
        meta.writeback().await.map_err(&f)?;
        file.flush().await.res.map_err(&f)?;
        Ok(())
    }

    /// Revert the image to the snapshot with ID, or else name, `id_or_name`.
    pub async fn snapshot_goto_named(&self, id_or_name: &str) -> BlockResult<()> {
        self.writable()?;
        let list = self.snapshot_list();
        let Some(sn) = list.iter().find(|s| s.id == id_or_name).or_else(|| list.iter().find(|s| s.name == id_or_name)).cloned()
        else {
            return Err(BlockError::new(ErrorKind::NotFound, "Failed to load snapshot: No such file or directory"));
        };
        snapshot::check_l1(&sn, self.s.cs, self.s.file.size()).map_err(BlockError::from)?;
        let file = Queue::new(self.s.file.clone())?;
        let meta = MetaIo { s: &self.s, file: &file };
        let f = fail("Could not apply the snapshot");
        let _g = self.s.alloc.lock().await;
        meta.writeback().await.map_err(&f)?;
        let new_size = sn.disk_size.unwrap_or_else(|| self.s.hdr.lock().unwrap_or_else(|e| e.into_inner()).size);
        let need = new_size.div_ceil(self.s.cs * self.s.l2_entries).max(u64::from(sn.l1_size));
        if need * 8 > MAX_L1_BYTES {
            return Err(bad("Snapshot L1 table too large").into());
        }
        if need > u64::from(self.header().l1_size) {
            self.grow_l1(&meta, &file, need).await?;
        }
        let sn_l1 = meta.read_l1(&sn).await.map_err(&f)?;
        if !meta.refs_fit(&sn_l1).await.map_err(&f)? {
            return Err(overflow(self.s.rc_order()));
        }
        // References for what the snapshot reaches, before the active table points at it.
        meta.update_refcounts(&sn_l1, 1).await.map_err(&f)?;
        meta.writeback().await.map_err(&f)?;
        file.flush().await.res.map_err(&f)?;
        let (l1_off, l1_size) = {
            let h = self.s.hdr.lock().unwrap_or_else(|e| e.into_inner());
            (h.l1_table_offset, h.l1_size as usize)
        };
        // COPIED flags are set again below, where the refcount is one.
        let mut table: Vec<u64> = sn_l1.iter().map(|e| e & !COPIED).collect();
        table.resize(l1_size, 0);
        let bytes: Vec<u8> = table.iter().flat_map(|v| v.to_be_bytes()).collect();
        meta.write_bytes("l1.write", l1_off, &bytes).await.map_err(&f)?;
        let size_bytes = new_size.to_be_bytes();
        meta.write_bytes("snapshot.header", 24, &size_bytes).await.map_err(&f)?;
        file.flush().await.res.map_err(&f)?;
        let old = {
            let mut m = self.s.lock_meta();
            m.l2_seq += 1;
            std::mem::replace(&mut m.l1, table)
        };
        self.s.hdr.lock().unwrap_or_else(|e| e.into_inner()).size = new_size;
        // Bitmaps follow the disk size (their tables must match it when stored).
        self.bitmaps_resize(new_size);
        // Then the references the old active table held go.
        meta.update_refcounts(&old, -1).await.map_err(&f)?;
        meta.writeback().await.map_err(&f)?;
        file.flush().await.res.map_err(&f)?;
        meta.fix_copied().await.map_err(&f)?;
        meta.writeback().await.map_err(&f)?;
        file.flush().await.res.map_err(&f)?;
        Ok(())
    }

    /// Make reads of this read-only node see the snapshot chosen by `id` and/or `name` (both
    /// must match where both are given), as QEMU's `bdrv_snapshot_load_tmp` does for
    /// `convert -l` and `measure -l`: the snapshot's L1 table replaces the active one in memory;
    /// nothing on disk changes and the virtual size stays the image's (clusters past the
    /// snapshot's table read as unallocated). The caller loads before any I/O on the node.
    pub async fn snapshot_load_tmp(&self, id: Option<&str>, name: Option<&str>) -> BlockResult<()> {
        if !self.s.read_only {
            return Err(BlockError::new(ErrorKind::PermissionDenied, "Snapshots can only be loaded into read-only images"));
        }
        let list = self.snapshot_list();
        let found =
            list.iter().find(|s| id.is_none_or(|i| s.id == i) && name.is_none_or(|n| s.name == n) && (id, name) != (None, None));
        let Some(sn) = found.cloned() else {
            return Err(BlockError::new(ErrorKind::NotFound, "Can't find snapshot"));
        };
        snapshot::check_l1(&sn, self.s.cs, self.s.file.size()).map_err(BlockError::from)?;
        let file = Queue::new(self.s.file.clone())?;
        let meta = MetaIo { s: &self.s, file: &file };
        let table = meta.read_l1(&sn).await.map_err(|e| BlockError::from(e).context("Could not read the snapshot L1 table"))?;
        let mut m = self.s.lock_meta();
        m.l2_seq += 1;
        m.l1 = table;
        Ok(())
    }

    /// [`Qcow2Node::snapshot_load_tmp`] by ID, or else by name (`convert -l NAME`).
    pub async fn snapshot_load_tmp_by_id_or_name(&self, id_or_name: &str) -> BlockResult<()> {
        let by_id = self.snapshot_list().iter().any(|s| s.id == id_or_name);
        if by_id {
            self.snapshot_load_tmp(Some(id_or_name), None).await
        } else {
            self.snapshot_load_tmp(None, Some(id_or_name)).await
        }
    }

    /// Delete the first snapshot named `name`.
    pub async fn snapshot_delete_named(&self, name: &str) -> BlockResult<()> {
        self.writable()?;
        let mut list = self.snapshot_list();
        let Some(i) = list.iter().position(|s| s.name == name) else {
            return Err(BlockError::new(ErrorKind::NotFound, "snapshot not found"));
        };
        let sn = list.remove(i);
        snapshot::check_l1(&sn, self.s.cs, self.s.file.size()).map_err(BlockError::from)?;
        let file = Queue::new(self.s.file.clone())?;
        let meta = MetaIo { s: &self.s, file: &file };
        let f = fail("Could not delete the snapshot");
        let _g = self.s.alloc.lock().await;
        meta.writeback().await.map_err(&f)?;
        let sn_l1 = meta.read_l1(&sn).await.map_err(&f)?;
        // Out of the table first: a crash after this leaks, never dangles.
        meta.write_table(&list).await.map_err(&f)?;
        meta.update_refcounts(&sn_l1, -1).await.map_err(&f)?;
        for k in 0..(u64::from(sn.l1_size) * 8).div_ceil(self.s.cs) {
            meta.free_cluster(sn.l1_table_offset + k * self.s.cs).await.map_err(&f)?;
        }
        meta.writeback().await.map_err(&f)?;
        file.flush().await.res.map_err(&f)?;
        meta.fix_copied().await.map_err(&f)?;
        meta.writeback().await.map_err(&f)?;
        file.flush().await.res.map_err(&f)?;
        Ok(())
    }

    /// The snapshots, as `info` lists them.
    pub(crate) fn snapshot_infos(&self) -> Vec<SnapshotInfo> {
        self.snapshot_list().iter().map(info).collect()
    }
}
