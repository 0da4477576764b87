//! The qcow2 internal snapshot table: parsing with every field bounds-checked, and
//! serialisation. No I/O: it works on the bytes of the table and is unit- and fuzz-testable.
//!
//! An entry is a 40-byte header (L1 table offset and size, ID and name lengths, date, VM clock,
//! VM state size, extra data size), the extra data (VM state size as 64 bits, the disk size
//! when the snapshot was taken, the instruction count; anything past what we know is kept and
//! written back), the ID string, the name, and padding to 8 bytes.

use crate::qcow2::error::{bad, Qcow2Error};

/// Most snapshots QEMU accepts in one image.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Largest snapshot table QEMU accepts (64 MiB).
pub const MAX_TABLE_BYTES: u64 = 64 << 20;
/// Largest extra data of one entry QEMU accepts.
pub const MAX_EXTRA: u32 = 1024;
/// Extra data we write: vm_state_size_large, disk_size, icount.
const EXTRA_LEN: usize = 24;

/// One internal snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qcow2Snapshot {
    /// Offset of the snapshot's L1 table (0 when it has none).
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique ID ("1", "2", ...).
    pub id: String,
    /// Name (may repeat, may be empty).
    pub name: String,
    /// Wall-clock time of creation.
    pub date_sec: u32,
    /// Nanoseconds part of the date.
    pub date_nsec: u32,
    /// Guest clock at creation, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state (0 for a disk-only snapshot).
    pub vm_state_size: u64,
    /// Virtual disk size when the snapshot was taken (from the extra data).
    pub disk_size: Option<u64>,
    /// Instruction count (record/replay), `None` when absent or -1.
    pub icount: Option<u64>,
    /// Extra data past the fields we know, kept as it was.
    pub unknown_extra: Vec<u8>,
}

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

/// Length of the entry whose first 40 bytes are `head` (padding included).
pub fn entry_len(head: &[u8], index: u32) -> Result<usize, Qcow2Error> {
    if head.len() < 40 {
        return Err(bad("Snapshot table is truncated"));
    }
    let extra = be32(head, 36);
    if extra > MAX_EXTRA {
        return Err(bad(format!("Too much extra metadata in snapshot table entry {index}")));
    }
    let len = 40 + extra as usize + usize::from(be16(head, 12)) + usize::from(be16(head, 14));
    Ok(len.next_multiple_of(8))
}

impl Qcow2Snapshot {
    /// Parse one entry from the start of `b` (which holds at least [`entry_len`] bytes).
    pub fn parse(b: &[u8], index: u32) -> Result<(Qcow2Snapshot, usize), Qcow2Error> {
        let len = entry_len(b, index)?;
        if b.len() < len {
            return Err(bad("Snapshot table is truncated"));
        }
        let extra = be32(b, 36) as usize;
        let id_len = usize::from(be16(b, 12));
        let name_len = usize::from(be16(b, 14));
        let x = &b[40..40 + extra];
        let vm32 = u64::from(be32(b, 32));
        let vm_state_size = if x.len() >= 8 { be64(x, 0) } else { vm32 };
        let disk_size = (x.len() >= 16).then(|| be64(x, 8));
        let icount = if x.len() >= 24 { Some(be64(x, 16)).filter(|v| *v != u64::MAX) } else { None };
        let unknown_extra = if x.len() > EXTRA_LEN { x[EXTRA_LEN..].to_vec() } else { Vec::new() };
        let at = 40 + extra;
        let text = |r: std::ops::Range<usize>| String::from_utf8_lossy(&b[r]).into_owned();
        let sn = Qcow2Snapshot {
            l1_table_offset: be64(b, 0),
            l1_size: be32(b, 8),
            id: text(at..at + id_len),
            name: text(at + id_len..at + id_len + name_len),
            date_sec: be32(b, 16),
            date_nsec: be32(b, 20),
            vm_clock_nsec: be64(b, 24),
            vm_state_size,
            disk_size,
            icount,
            unknown_extra,
        };
        Ok((sn, len))
    }

    /// The entry's bytes, padded to 8.
    pub fn serialize(&self, out: &mut Vec<u8>) -> Result<(), Qcow2Error> {
        if self.id.len() > usize::from(u16::MAX) || self.name.len() > usize::from(u16::MAX) {
            return Err(bad("Snapshot name too long"));
        }
        let extra = EXTRA_LEN + self.unknown_extra.len();
        if extra > MAX_EXTRA as usize {
            return Err(bad("Too much extra metadata in snapshot table entry"));
        }
        let start = out.len();
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&(self.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.date_sec.to_be_bytes());
        out.extend_from_slice(&self.date_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        // The 32-bit field holds the size when it fits, 0 otherwise (the 64-bit one is exact).
        out.extend_from_slice(&u32::try_from(self.vm_state_size).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&(extra as u32).to_be_bytes());
        out.extend_from_slice(&self.vm_state_size.to_be_bytes());
        out.extend_from_slice(&self.disk_size.unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&self.icount.unwrap_or(u64::MAX).to_be_bytes());
        out.extend_from_slice(&self.unknown_extra);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(self.name.as_bytes());
        let len = (out.len() - start).next_multiple_of(8);
        out.resize(start + len, 0);
        Ok(())
    }
}

/// The snapshot table of an open image: its entries and its length on disk.
#[derive(Clone, Debug, Default)]
pub struct SnapshotTable {
    /// Entries in table order.
    pub list: Vec<Qcow2Snapshot>,
    /// Bytes the table takes in the file.
    pub bytes: u64,
}

/// Serialise a whole table.
pub fn serialize_table(list: &[Qcow2Snapshot]) -> Result<Vec<u8>, Qcow2Error> {
    let mut out = Vec::new();
    for sn in list {
        sn.serialize(&mut out)?;
    }
    if out.len() as u64 > MAX_TABLE_BYTES {
        return Err(bad("Snapshot table too large"));
    }
    Ok(out)
}

/// The ID a new snapshot gets: one more than the largest numeric ID in use.
pub fn next_id(list: &[Qcow2Snapshot]) -> String {
    let max = list.iter().filter_map(|s| s.id.parse::<u64>().ok()).max().unwrap_or(0);
    (max + 1).to_string()
}

/// Check a snapshot's L1 table against the file: aligned, within the file, not too large.
pub fn check_l1(sn: &Qcow2Snapshot, cluster_size: u64, file_size: u64) -> Result<(), Qcow2Error> {
    let bytes = u64::from(sn.l1_size) * 8;
    if bytes > crate::qcow2::header::MAX_L1_BYTES {
        return Err(bad(format!("Snapshot L1 table too large (snapshot '{}')", sn.id)));
    }
    if bytes > 0
        && (!sn.l1_table_offset.is_multiple_of(cluster_size)
            || sn.l1_table_offset == 0
            || sn.l1_table_offset.checked_add(bytes).is_none_or(|e| e > file_size.next_multiple_of(cluster_size)))
    {
        return Err(bad(format!("Snapshot L1 table offset invalid (snapshot '{}')", sn.id)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str, name: &str) -> Qcow2Snapshot {
        Qcow2Snapshot {
            l1_table_offset: 0x70000,
            l1_size: 1,
            id: id.into(),
            name: name.into(),
            date_sec: 1_795_420_317,
            date_nsec: 291_753_000,
            vm_clock_nsec: 3_723_456_789_012,
            vm_state_size: 5 << 30,
            disk_size: Some(64 << 20),
            icount: None,
            unknown_extra: Vec::new(),
        }
    }

    #[test]
    fn round_trip() {
        let list = vec![sample("1", "s1"), sample("2", ""), sample("10", "a longer name")];
        let b = serialize_table(&list).unwrap();
        let mut at = 0;
        for (i, want) in list.iter().enumerate() {
            let (sn, len) = Qcow2Snapshot::parse(&b[at..], i as u32).unwrap();
            assert_eq!(&sn, want);
            assert_eq!(len % 8, 0);
            at += len;
        }
        assert_eq!(at, b.len());
        assert_eq!(next_id(&list), "11");
    }

    #[test]
    fn layout_matches_qemu() {
        // An entry as qemu-img 10 writes it: 24 bytes of extra data, id "1", name "s1".
        let mut b = Vec::new();
        let mut sn = sample("1", "s1");
        sn.vm_clock_nsec = 0;
        sn.vm_state_size = 0;
        sn.icount = Some(0);
        sn.serialize(&mut b).unwrap();
        assert_eq!(b.len(), 72);
        assert_eq!(&b[36..40], &[0, 0, 0, 24]);
        assert_eq!(&b[64..67], b"1s1");
    }

    #[test]
    fn hostile_entries() {
        let mut b = Vec::new();
        sample("1", "x").serialize(&mut b).unwrap();
        // Truncated.
        assert!(Qcow2Snapshot::parse(&b[..30], 0).is_err());
        assert!(Qcow2Snapshot::parse(&b[..b.len() - 8], 0).is_err());
        // Extra data too large.
        let mut c = b.clone();
        c[36..40].copy_from_slice(&2000u32.to_be_bytes());
        assert!(entry_len(&c, 3).unwrap_err().to_string().contains("entry 3"));
        // Short extra data: no disk size, 32-bit VM state size.
        let mut d = b.clone();
        d[36..40].copy_from_slice(&0u32.to_be_bytes());
        d[32..36].copy_from_slice(&7u32.to_be_bytes());
        let (sn, _) = Qcow2Snapshot::parse(&d, 0).unwrap();
        assert_eq!((sn.vm_state_size, sn.disk_size, sn.icount), (7, None, None));
        // L1 tables that lie.
        let mut s = sample("1", "x");
        s.l1_size = u32::MAX;
        assert!(check_l1(&s, 65536, 1 << 20).is_err());
        s.l1_size = 1;
        s.l1_table_offset = 0x70001;
        assert!(check_l1(&s, 65536, 1 << 20).is_err());
        s.l1_table_offset = 1 << 20;
        assert!(check_l1(&s, 65536, 1 << 20).is_err());
        s.l1_table_offset = 0x70000;
        assert!(check_l1(&s, 65536, 1 << 20).is_ok());
    }
}
