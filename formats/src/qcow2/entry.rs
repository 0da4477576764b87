//! L1 and L2 table entries: decoding what a guest cluster (or subcluster) maps to, and
//! building new entries. Pure functions over integers; every host offset decoded from an
//! image is checked against the image file's size by the caller before it is used.

/// Offset bits of L1/L2 standard entries (9..=55).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1/L2: refcount is exactly one.
pub const COPIED: u64 = 1 << 63;
/// L2: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// L2 (standard, no extended L2): reads as zeroes.
pub const ZERO: u64 = 1;
/// Reserved bits of an L1 entry.
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry (bit 0 is the zero flag).
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// What a (sub)cluster reads as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Not allocated here: read the backing file (or zeroes without one).
    Unallocated,
    /// Reads as zeroes; `host` is a preallocation, if any.
    Zero {
        /// Preallocated host cluster, kept on write.
        host: Option<u64>,
    },
    /// Data at this host offset (of the cluster start).
    Data {
        /// Host offset of the cluster.
        host: u64,
        /// Refcount is exactly one: may be overwritten in place.
        copied: bool,
    },
    /// Compressed cluster: `len` bytes from `host` (not aligned).
    Compressed {
        /// Host byte offset.
        host: u64,
        /// Bytes that may hold compressed data.
        len: u64,
    },
}

/// Layout facts needed to decode entries.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// log2 cluster size.
    pub cluster_bits: u32,
    /// Extended L2 entries (32 subclusters).
    pub extended_l2: bool,
    /// Data lives in an external data file: a standard entry with `COPIED` set and offset 0
    /// maps to host offset 0 of the data file (guest offsets map 1:1 there).
    pub data_file: bool,
}

impl Layout {
    /// Bits of the compressed-descriptor host offset field.
    fn compressed_offset_bits(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }

    /// Subcluster size.
    pub fn subcluster_size(&self) -> u64 {
        if self.extended_l2 {
            1 << (self.cluster_bits - 5)
        } else {
            1 << self.cluster_bits
        }
    }

    /// Decode an L2 entry (and its bitmap, for extended L2) for the subcluster `sc` of it.
    pub fn decode(&self, entry: u64, bitmap: u64, sc: u32) -> Result<Mapping, String> {
        if entry & COMPRESSED != 0 {
            let x = self.compressed_offset_bits();
            let host = entry & ((1u64 << x) - 1);
            let sectors = (entry & !COMPRESSED & !COPIED) >> x;
            // The data runs from `host` to the end of the sector, plus the additional sectors.
            let len = (sectors + 1) * 512 - (host & 511);
            return Ok(Mapping::Compressed { host, len });
        }
        if entry & L2_RESERVED != 0 {
            return Err(format!("L2 entry has reserved bits set: {entry:#x}"));
        }
        let host = entry & OFFSET_MASK;
        let copied = entry & COPIED != 0;
        // Offset 0 is a host cluster only in an external data file, marked by `COPIED`.
        let present = host != 0 || (self.data_file && copied);
        if host & ((1u64 << self.cluster_bits) - 1) != 0 {
            return Err(format!("Cluster allocation offset {host:#x} unaligned"));
        }
        if self.extended_l2 {
            if entry & ZERO != 0 {
                return Err(format!("L2 entry has reserved bits set: {entry:#x}"));
            }
            let alloc = bitmap & (1 << sc) != 0;
            let zero = bitmap & (1 << (sc + 32)) != 0;
            if alloc && zero {
                return Err("Subcluster is both allocated and zero".into());
            }
            if alloc && !present {
                return Err("Allocated subcluster in an unallocated cluster".into());
            }
            return Ok(if zero {
                Mapping::Zero { host: (host != 0).then_some(host) }
            } else if alloc {
                Mapping::Data { host, copied }
            } else {
                Mapping::Unallocated
            });
        }
        if entry & ZERO != 0 {
            // As QEMU: a zero entry with offset 0 is a plain zero cluster, data file or not.
            return Ok(Mapping::Zero { host: (host != 0).then_some(host) });
        }
        if !present {
            return Ok(Mapping::Unallocated);
        }
        Ok(Mapping::Data { host, copied })
    }

    /// A compressed descriptor for `len` bytes of compressed data at `host`.
    pub fn compressed_entry(&self, host: u64, len: u64) -> u64 {
        let x = self.compressed_offset_bits();
        let sectors = (host + len - 1) / 512 - host / 512;
        COMPRESSED | (sectors << x) | host
    }
}

/// The host offset of an L1 entry's L2 table, or an error naming the problem.
pub fn l1_l2_offset(entry: u64, cluster_bits: u32) -> Result<Option<u64>, String> {
    if entry & L1_RESERVED != 0 {
        return Err(format!("L1 entry has reserved bits set: {entry:#x}"));
    }
    let off = entry & OFFSET_MASK;
    if off == 0 {
        return Ok(None);
    }
    if off & ((1u64 << cluster_bits) - 1) != 0 {
        return Err(format!("L2 table offset {off:#x} unaligned"));
    }
    Ok(Some(off))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_kind() {
        let l = Layout { cluster_bits: 16, extended_l2: false, data_file: false };
        assert_eq!(l.decode(0, 0, 0), Ok(Mapping::Unallocated));
        assert_eq!(l.decode(COPIED | 0x50000, 0, 0), Ok(Mapping::Data { host: 0x50000, copied: true }));
        assert_eq!(l.decode(ZERO, 0, 0), Ok(Mapping::Zero { host: None }));
        assert_eq!(l.decode(ZERO | 0x50000 | COPIED, 0, 0), Ok(Mapping::Zero { host: Some(0x50000) }));
        assert!(l.decode(0x50001 & !1 | 0x200, 0, 0).is_err(), "unaligned");
        let c = l.compressed_entry(0x12345, 1000);
        assert_eq!(l.decode(c, 0, 0), Ok(Mapping::Compressed { host: 0x12345, len: 1024 + 512 - (0x12345 & 511) }));
        let e = Layout { cluster_bits: 16, extended_l2: true, data_file: false };
        assert_eq!(e.decode(0x50000, 1 << 3, 3), Ok(Mapping::Data { host: 0x50000, copied: false }));
        assert_eq!(e.decode(0x50000, 1 << 3, 4), Ok(Mapping::Unallocated));
        assert_eq!(e.decode(0, 1 << 36, 4), Ok(Mapping::Zero { host: None }));
        assert!(e.decode(0, 1 << 4, 4).is_err());
        assert!(e.decode(0x50000, (1 << 4) | (1 << 36), 4).is_err());
        assert_eq!(l1_l2_offset(COPIED | 0x40000, 16), Ok(Some(0x40000)));
        assert!(l1_l2_offset(0x40200, 16).is_err());
        assert!(l1_l2_offset(1 << 60, 16).is_err());
    }
}
