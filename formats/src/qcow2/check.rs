//! `check` for qcow2: rebuild every cluster's reference count from the metadata (header, L1
//! and L2 tables, refcount table and blocks, snapshot tables, data and compressed clusters),
//! compare it with the stored refcounts, and optionally repair: leaks only (`-r leaks`) or
//! every difference (`-r all`). Also counts allocated, fragmented and compressed clusters and
//! finds the image end offset, as `qemu-img check` reports them.
//!
//! Memory is bounded by the file size (one counter per host cluster, capped at 2^24 clusters
//! more than the file holds); metadata pointing past the end of the file is an error, never an
//! allocation.

use basalt_engine::{IoStatus, Queue};
use basalt_reactor::IoBuf;

use crate::qcow2::entry::{self, Mapping, COPIED, OFFSET_MASK};
use crate::qcow2::meta::{MetaIo, Shared};
use crate::qcow2::refcount;

/// What to repair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    /// Report only.
    None,
    /// Fix leaked clusters.
    Leaks,
    /// Fix leaks and refcount errors.
    All,
}

/// The findings of a check, as qemu-img reports them.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    /// Human-readable lines, in order ("Leaked cluster 5 refcount=1 reference=0", "ERROR ...").
    pub messages: Vec<String>,
    /// Corruptions found (and not fixed).
    pub corruptions: u64,
    /// Leaked clusters found (and not fixed).
    pub leaks: u64,
    /// Corruptions fixed.
    pub corruptions_fixed: u64,
    /// Leaks fixed.
    pub leaks_fixed: u64,
    /// Guest clusters in the image.
    pub total_clusters: u64,
    /// Guest clusters allocated (data or compressed).
    pub allocated_clusters: u64,
    /// Allocated clusters not contiguous with the previous one.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// End of the last used host cluster.
    pub image_end_offset: u64,
    /// The check could not be completed (I/O error).
    pub check_errors: u64,
    /// Why the check stopped early, after the messages so far (`qemu-img`'s "Check failed").
    pub failed: Option<IoStatus>,
}

struct Counts {
    refs: Vec<u32>,
    cs: u64,
    report: CheckReport,
}

impl Counts {
    fn inc(&mut self, off: u64, len: u64, what: &str) {
        if len == 0 {
            return;
        }
        let first = off / self.cs;
        let last = (off + len - 1) / self.cs;
        for c in first..=last {
            match self.refs.get_mut(c as usize) {
                Some(r) => *r = r.saturating_add(1),
                None => {
                    self.report
                        .messages
                        .push(format!("ERROR: {what} at offset {:#x} is past the end of the image file", c * self.cs));
                    self.report.corruptions += 1;
                    return;
                }
            }
        }
    }
}

async fn read(q: &Queue, off: u64, len: usize) -> Result<IoBuf, IoStatus> {
    let d = q.read(off, IoBuf::new_uninit(len)).await;
    d.res?;
    Ok(d.buf.expect("read returns its buffer"))
}

fn be64(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i * 8..i * 8 + 8]);
    u64::from_be_bytes(a)
}

/// The references every cluster of the file has from the image's metadata and data (header,
/// L1 and L2 tables, snapshots, bitmaps, data and compressed clusters), without the refcount
/// structures themselves; findings go to the report. Memory: one counter per cluster of the
/// file.
pub(crate) async fn references(s: &Shared, file: &Queue) -> Result<(Vec<u32>, CheckReport), IoStatus> {
    let c = count_metadata(s, file).await?;
    Ok((c.refs, c.report))
}

/// Check (and repair) the image. The caller holds the allocation lock when repairing.
pub(crate) async fn check(s: &Shared, file: &Queue, repair: Repair) -> Result<CheckReport, IoStatus> {
    let c = count_all(s, file).await?;
    finish(s, file, repair, c).await
}

/// The references of every cluster, the refcount table and blocks included.
async fn count_all(s: &Shared, file: &Queue) -> Result<Counts, IoStatus> {
    let cs = s.cs;
    let hdr = s.hdr.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut c = count_metadata(s, file).await?;
    c.inc(hdr.refcount_table_offset, u64::from(hdr.refcount_table_clusters) * cs, "refcount table");
    let rt = s.lock_meta().reftable.clone();
    for (i, &e) in rt.iter().enumerate() {
        let off = e & OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if !off.is_multiple_of(cs) {
            c.report.messages.push(format!("ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"));
            c.report.corruptions += 1;
            continue;
        }
        c.inc(off, cs, "refcount block");
    }
    Ok(c)
}

async fn count_metadata(s: &Shared, file: &Queue) -> Result<Counts, IoStatus> {
    let cs = s.cs;
    let hdr = s.hdr.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let fsize = s.file.size();
    let nb = fsize.div_ceil(cs);
    if nb > 1 << 32 {
        return Err(IoStatus(libc::EFBIG));
    }
    let mut c = Counts { refs: vec![0; nb as usize], cs, report: CheckReport::default() };
    c.report.total_clusters = hdr.size.div_ceil(cs);
    c.inc(0, cs, "header");
    if let Some((off, len)) = s.crypt.as_ref().and_then(|c| c.fde) {
        c.inc(off, len, "encryption header");
    }
    c.inc(hdr.l1_table_offset, u64::from(hdr.l1_size) * 8, "L1 table");
    let layout = s.layout;
    let words = s.words;

    // Active L1 table and its L2 tables (and snapshots').
    let mut l1_tables = vec![(hdr.l1_table_offset, hdr.l1_size, true)];
    let snaps = s.snapshots.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for sn in &snaps.list {
        if u64::from(sn.l1_size) * 8 > crate::qcow2::header::MAX_L1_BYTES {
            c.report.messages.push(format!("ERROR snapshot L1 table size {} too large", sn.l1_size));
            c.report.corruptions += 1;
            continue;
        }
        c.inc(sn.l1_table_offset, u64::from(sn.l1_size) * 8, "snapshot L1 table");
        if sn.l1_size > 0 && sn.l1_table_offset + u64::from(sn.l1_size) * 8 <= fsize.next_multiple_of(cs) {
            l1_tables.push((sn.l1_table_offset, sn.l1_size, false));
        }
    }
    if !snaps.list.is_empty() {
        c.inc(hdr.snapshots_offset, snaps.bytes, "snapshot table");
    }
    // Persistent bitmaps: the directory, each table and its data clusters (as on disk now:
    // removed bitmaps keep their clusters until the bitmaps are stored).
    let (dir, tables): ((u64, u64), Vec<(u64, u32)>) = {
        let bm = s.bitmaps.read().unwrap_or_else(|e| e.into_inner());
        let t = bm.list.iter().map(|b| &b.entry).chain(bm.removed.iter()).map(|e| (e.table_offset, e.table_size)).collect();
        (bm.directory, t)
    };
    c.inc(dir.0, dir.1, "bitmap directory");
    for (off, n) in tables {
        if n == 0 {
            continue;
        }
        c.inc(off, u64::from(n) * 8, "bitmap table");
        if off + u64::from(n) * 8 > fsize.next_multiple_of(cs) {
            continue;
        }
        let t = read(file, off, n as usize * 8).await?;
        for i in 0..n as usize {
            match crate::qcow2::bitmap::decode_table_entry(be64(&t, i), cs) {
                Ok(Some(Some(data))) => c.inc(data, cs, "bitmap data cluster"),
                Ok(_) => {}
                Err(m) => {
                    c.report.messages.push(format!("ERROR {m}"));
                    c.report.corruptions += 1;
                }
            }
        }
    }
    // Every L2 table, with how many L1 entries reference it (snapshots share tables) and
    // whether the active table is one of them; tables are then read once each.
    let mut l2_refs: Vec<(u64, u32, bool)> = Vec::new();
    let mut l2_index = std::collections::HashMap::new();
    for (l1_off, l1_size, active) in l1_tables {
        if l1_size == 0 {
            continue;
        }
        let l1 = read(file, l1_off, l1_size as usize * 8).await?;
        for i in 0..l1_size as usize {
            let e = be64(&l1, i);
            let l2_off = match entry::l1_l2_offset(e, s.cluster_bits) {
                Ok(Some(o)) => o,
                Ok(None) => continue,
                Err(m) => {
                    c.report.messages.push(format!("ERROR {m}"));
                    c.report.corruptions += 1;
                    continue;
                }
            };
            c.inc(l2_off, cs, "L2 table");
            if l2_off + cs > fsize.next_multiple_of(cs) {
                continue;
            }
            let k = *l2_index.entry(l2_off).or_insert_with(|| {
                l2_refs.push((l2_off, 0, false));
                l2_refs.len() - 1
            });
            l2_refs[k].1 += 1;
            l2_refs[k].2 |= active;
        }
    }
    for (l2_off, refs, active) in l2_refs {
        let l2 = read(file, l2_off, cs as usize).await?;
        // Contiguity is judged within one L2 table, as QEMU judges it.
        let mut last_host: Option<u64> = None;
        for j in 0..(cs / 8 / words as u64) as usize {
            let le = be64(&l2, j * words);
            let bitmap = if words == 2 { be64(&l2, j * words + 1) } else { 0 };
            if le == 0 && bitmap & 0xffff_ffff == 0 {
                continue;
            }
            if le & entry::COMPRESSED != 0 {
                if let Ok(Mapping::Compressed { host, len }) = layout.decode(le, 0, 0) {
                    for _ in 0..refs {
                        c.inc(host, len.min(2 * cs), "compressed cluster");
                    }
                    if active {
                        c.report.allocated_clusters += 1;
                        c.report.compressed_clusters += 1;
                        // Fragmented by nature (QEMU counts them so); the contiguity
                        // chain of standard clusters goes on past them.
                        c.report.fragmented_clusters += 1;
                    }
                }
                continue;
            }
            let host = le & OFFSET_MASK;
            if le & crate::qcow2::entry::L2_RESERVED != 0 || !host.is_multiple_of(cs) {
                c.report.messages.push(format!("ERROR: invalid L2 entry {le:#x} in L2 table at {l2_off:#x}"));
                c.report.corruptions += 1;
                continue;
            }
            // In an external data file, offset 0 with COPIED is a host cluster; data clusters
            // there have no refcounts in this file.
            let ext_data = s.layout.data_file;
            // (A zero entry with offset 0 is a plain zero cluster, as QEMU reads it.)
            if host == 0 && !(ext_data && le & COPIED != 0 && le & entry::ZERO == 0) {
                continue;
            }
            if !ext_data {
                for _ in 0..refs {
                    c.inc(host, cs, "data cluster");
                }
            }
            // Standard and preallocated zero clusters count as allocated, as QEMU counts them.
            if active {
                c.report.allocated_clusters += 1;
                if last_host.is_some_and(|p| p + cs != host) {
                    c.report.fragmented_clusters += 1;
                }
                last_host = Some(host);
            }
        }
    }
    Ok(c)
}

/// Compare with the stored refcounts and repair as asked. A cluster in use whose stored
/// refcount is 0 means the refcount structures cannot be trusted: `-r all` then writes new ones
/// from the counted references (and frees the old ones), `-r leaks` stops there, as qemu-img
/// does ("ERROR need to rebuild refcount structures").
async fn finish(s: &Shared, file: &Queue, repair: Repair, mut c: Counts) -> Result<CheckReport, IoStatus> {
    let cs = s.cs;
    let meta = MetaIo { s, file };
    let (end, rebuild) = compare(s, &meta, &c.refs, repair, &mut c.report, true).await?;
    c.report.image_end_offset = end * cs;
    if rebuild && repair == Repair::Leaks {
        c.report.messages.push("ERROR need to rebuild refcount structures".into());
        c.report.check_errors += 1;
        c.report.failed = Some(IoStatus::EIO);
        meta.writeback().await?;
        file.flush().await.res?;
        return Ok(c.report);
    }
    if rebuild && repair == Repair::All {
        c.report.messages.push("Rebuilding refcount structure".into());
        meta.writeback().await?;
        rebuild_refcounts(s, &meta, std::mem::take(&mut c.refs)).await?;
        // Counted again over the new structures: the old ones are now leaked, and freed.
        let (corruptions, leaks) = (c.report.corruptions, c.report.leaks);
        let again = count_all(s, file).await?;
        c.report.messages.extend(again.report.messages);
        (c.report.corruptions, c.report.leaks) = (again.report.corruptions, again.report.leaks);
        let mut fresh = CheckReport::default();
        let (end, broken) = compare(s, &meta, &again.refs, Repair::Leaks, &mut fresh, false).await?;
        c.report.messages.extend(fresh.messages);
        if broken {
            c.report.messages.push("ERROR rebuilt refcount structure is still broken".into());
        }
        c.report.image_end_offset = end * cs;
        c.report.corruptions_fixed += corruptions.saturating_sub(c.report.corruptions);
        c.report.leaks_fixed += leaks.saturating_sub(c.report.leaks);
        // Leaks the rebuild made and could not free.
        c.report.leaks += fresh.leaks;
    }
    // The COPIED flags of the active tables must say whether the refcount is exactly one.
    // Any repair fixes them (as qemu-img does, even with `-r leaks`).
    check_copied(s, &meta, &mut c.report, repair != Repair::None).await?;
    if repair != Repair::None {
        meta.writeback().await?;
        file.flush().await.res?;
    }
    Ok(c.report)
}

/// Compare the counted references `refs` with the stored refcounts, repairing as `repair`
/// allows; returns the number of clusters up to the last one in use, and whether the
/// structures need a rebuild (a cluster in use with a stored refcount of 0, which is never
/// repaired in place). `announce` prints each difference before its repair. Clusters a
/// repair frees are discarded in the file, as qemu-img discards them.
async fn compare(
    s: &Shared,
    meta: &MetaIo<'_>,
    refs: &[u32],
    repair: Repair,
    report: &mut CheckReport,
    announce: bool,
) -> Result<(u64, bool), IoStatus> {
    let per = refcount::entries_per_block(s.cluster_bits, s.rc_order());
    // Clusters of the file, and those that refcount blocks describe beyond it.
    let last_block = s.lock_meta().reftable.iter().rposition(|e| e & OFFSET_MASK != 0).map_or(0, |i| i as u64 + 1);
    let covered = (last_block * per).max(refs.len() as u64);
    let (mut end, mut rebuild) = (0u64, false);
    // Clusters a repair frees, as runs: their space goes back to the file system.
    let mut freed: Vec<(u64, u64)> = Vec::new();
    for k in 0..covered {
        let computed = u64::from(refs.get(k as usize).copied().unwrap_or(0));
        let stored = meta.refcount(k).await?;
        if computed > 0 || stored > 0 {
            end = k + 1;
        }
        if computed == stored {
            continue;
        }
        let leak = stored > computed;
        rebuild |= stored == 0;
        let fix = match repair {
            _ if stored == 0 => false,
            Repair::All => true,
            Repair::Leaks => leak,
            Repair::None => false,
        };
        let kind = if leak { "Leaked cluster" } else { "ERROR cluster" };
        if announce || !fix {
            report.messages.push(format!("{kind} {k} refcount={stored} reference={computed}"));
        }
        if fix {
            report.messages.push(format!("Repairing cluster {k} refcount={stored} reference={computed}"));
            if computed > refcount::max_refcount(s.rc_order()) {
                report.corruptions += 1;
                continue;
            }
            meta.set_refcount_for_repair(k, computed).await?;
            if computed == 0 {
                match freed.last_mut() {
                    Some((at, n)) if *at + *n == k => *n += 1,
                    _ => freed.push((k, 1)),
                }
            }
            if leak {
                report.leaks_fixed += 1;
            } else {
                report.corruptions_fixed += 1;
            }
        } else if leak {
            report.leaks += 1;
        } else {
            report.corruptions += 1;
        }
    }
    for (at, n) in freed {
        // Best effort, as freeing space always is: the refcounts are what matter.
        let _ = meta.file.discard(at * s.cs, n * s.cs).await;
    }
    Ok((end, rebuild))
}

/// Write new refcount structures holding `refs` (the counted references, the old structures
/// included), and switch the header to them, laid out as qemu-img lays them out:
/// - each range of clusters one refcount block describes, and which has a cluster in use, gets
///   a block in the first free cluster at or after the range's start (so a block written
///   never has to change for a later one), growing the image where none is free;
/// - the table then takes the first free run of clusters in the image, and the blocks of the
///   ranges it lands in are written again; a table that turns out too small (its own blocks
///   grew the image past what it holds) is given back and placed anew.
///
/// The old table and blocks are left counted: the caller frees them as leaks.
async fn rebuild_refcounts(s: &Shared, meta: &MetaIo<'_>, mut refs: Vec<u32>) -> Result<(), IoStatus> {
    let cs = s.cs;
    let mut blocks: Vec<u64> = Vec::new();
    let end = refs.len() as u64;
    write_blocks(s, meta, &mut refs, &mut blocks, 0, end).await?;
    let (mut table, mut table_clusters) = (0u64, 0u64);
    loop {
        let need = (blocks.len() as u64 * 8).div_ceil(cs).max(1);
        if table_clusters >= need {
            break;
        }
        if table_clusters > 0 {
            refs[table as usize..(table + table_clusters) as usize].iter_mut().for_each(|r| *r = r.saturating_sub(1));
        }
        if need * cs > crate::qcow2::header::MAX_REFTABLE_BYTES {
            return Err(IoStatus(libc::EFBIG));
        }
        table = alloc_run(&mut refs, &mut 0, need);
        table_clusters = need;
        write_blocks(s, meta, &mut refs, &mut blocks, table, table + need).await?;
    }
    let mut entries = blocks;
    entries.resize((table_clusters * cs / 8) as usize, 0);
    let bytes: Vec<u8> = entries.iter().flat_map(|v| v.to_be_bytes()).collect();
    meta.write_bytes("rebuild.table", table * cs, &bytes).await?;
    meta.file.flush().await.res?;
    // The header's refcount_table_offset and refcount_table_clusters (bytes 48..60).
    let mut field = (table * cs).to_be_bytes().to_vec();
    field.extend_from_slice(&(table_clusters as u32).to_be_bytes());
    meta.write_bytes("rebuild.header", 48, &field).await?;
    meta.file.flush().await.res?;
    {
        let mut h = s.hdr.lock().unwrap_or_else(|e| e.into_inner());
        h.refcount_table_offset = table * cs;
        h.refcount_table_clusters = table_clusters as u32;
    }
    s.lock_meta().reset_refcounts(entries);
    Ok(())
}

/// Write the refcount blocks of the ranges holding clusters `first..end` that are in use,
/// allocating the missing ones (`blocks`: host offset per range, 0 for none) at the first free
/// cluster at or after their range's start.
async fn write_blocks(
    s: &Shared,
    meta: &MetaIo<'_>,
    refs: &mut Vec<u32>,
    blocks: &mut Vec<u64>,
    first: u64,
    mut end: u64,
) -> Result<(), IoStatus> {
    let (cs, order) = (s.cs, s.rc_order());
    let per = refcount::entries_per_block(s.cluster_bits, order);
    let max = refcount::max_refcount(order);
    let mut free = 0u64;
    let mut c = first;
    let mut block = vec![0u8; cs as usize];
    while c < end {
        if refs.get(c as usize).is_none_or(|r| *r == 0) {
            c += 1;
            continue;
        }
        let (b, start) = ((c / per) as usize, c / per * per);
        if blocks.get(b).is_none_or(|o| *o == 0) {
            free = free.max(start);
            let at = alloc_run(refs, &mut free, 1);
            end = end.max(at + 1);
            if blocks.len() <= b {
                blocks.resize(b + 1, 0);
            }
            blocks[b] = at * cs;
        }
        block.fill(0);
        for (i, r) in refs.iter().skip(start as usize).take(per as usize).enumerate() {
            refcount::set(&mut block, order, i as u64, u64::from(*r).min(max));
        }
        meta.write_bytes("rebuild.blocks", blocks[b], &block).await?;
        c = start + per;
    }
    Ok(())
}

/// Take the first run of `n` free clusters from `*free` on (past the end of `refs` if need
/// be); `*free` moves to the first free cluster seen.
fn alloc_run(refs: &mut Vec<u32>, free: &mut u64, n: u64) -> u64 {
    let (mut i, mut run, mut first_gap) = (*free, 0u64, true);
    while i < refs.len() as u64 && run < n {
        if refs[i as usize] == 0 {
            run += 1;
            if first_gap {
                *free = i;
                first_gap = false;
            }
        } else {
            run = 0;
        }
        i += 1;
    }
    let at = i - run;
    if refs.len() < (at + n) as usize {
        refs.resize((at + n) as usize, 0);
    }
    refs[at as usize..(at + n) as usize].iter_mut().for_each(|r| *r += 1);
    at
}

async fn check_copied(s: &Shared, meta: &MetaIo<'_>, report: &mut CheckReport, fix: bool) -> Result<(), IoStatus> {
    let cs = s.cs;
    let end = s.file.size().next_multiple_of(cs);
    let l1 = s.lock_meta().l1.clone();
    for (i, &l1e) in l1.iter().enumerate() {
        let Ok(Some(l2_off)) = entry::l1_l2_offset(l1e, s.cluster_bits) else { continue };
        if l2_off + cs > end {
            continue;
        }
        let rc = meta.refcount(l2_off / cs).await?;
        if (rc == 1) != (l1e & COPIED != 0) {
            // A refcount of 0 is a refcount error only `-r all` repairs: flags stay as they are.
            if fix && rc != 0 {
                report.messages.push(format!("Repairing OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}"));
                meta.set_l1_entry(i, l1e ^ COPIED).await?;
                report.corruptions_fixed += 1;
            } else {
                report.messages.push(format!("ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}"));
                report.corruptions += 1;
            }
        }
        let mut t = meta.l2_table(l2_off).await?;
        let mut changed = false;
        for k in (0..t.len()).step_by(s.words) {
            let e = t[k];
            let host = e & OFFSET_MASK;
            if s.layout.data_file
                || e & entry::COMPRESSED != 0
                || host == 0
                || !host.is_multiple_of(cs)
                || e & entry::L2_RESERVED != 0
            {
                continue;
            }
            let rc = meta.refcount(host / cs).await?;
            if (rc == 1) == (e & COPIED != 0) {
                continue;
            }
            if fix && rc != 0 {
                report.messages.push(format!("Repairing OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}"));
                t[k] = e ^ COPIED;
                changed = true;
                report.corruptions_fixed += 1;
            } else {
                report.messages.push(format!("ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}"));
                report.corruptions += 1;
            }
        }
        if changed {
            meta.put_l2_table(l2_off, t).await?;
        }
    }
    Ok(())
}
