//! The qcow2 header and its extensions: parsing with every field bounds-checked, and
//! serialisation. No I/O: it works on the bytes of cluster 0 and is unit- and fuzz-testable.
//!
//! Unknown header extensions are kept and written back unchanged; unknown incompatible
//! feature bits refuse the image (naming the features from its feature name table), unknown
//! compatible bits are ignored, unknown autoclear bits are cleared on the first write.

use crate::qcow2::error::{bad, Qcow2Error};

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Extension: end of the list.
pub const EXT_END: u32 = 0;
/// Extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature: the image was not closed cleanly (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: the image is corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: compression type field is valid.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: extended L2 entries.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Autoclear feature: the external data file is valid as a raw image.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

const KNOWN_INCOMPAT: u64 = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// Largest L1 table QEMU accepts (32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU accepts (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;

/// A header extension kept as bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extension {
    /// Type.
    pub kind: u32,
    /// Payload (without padding).
    pub data: Vec<u8>,
}

/// A parsed qcow2 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qcow2Header {
    /// 2 or 3.
    pub version: u32,
    /// Where the backing file name is, 0 for none.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Virtual disk size.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: u32,
    /// Header length in bytes (72 for version 2).
    pub header_length: u32,
    /// 0 zlib, 1 zstd.
    pub compression_type: u8,
    /// Extensions other than backing format and feature table, kept in order.
    pub extensions: Vec<Extension>,
    /// Backing file name.
    pub backing_file: Option<String>,
    /// Backing format (extension).
    pub backing_format: Option<String>,
    /// External data file name (extension).
    pub data_file: Option<String>,
    /// Names of features from the image's feature name table: (type, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

impl Qcow2Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Whether extended L2 entries are used.
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// L2 entries per table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// Parse cluster 0 (at least the first `min(cluster, file)` bytes). `file_size` bounds
    /// every offset.
    pub fn parse(buf: &[u8], file_size: u64) -> Result<Qcow2Header, Qcow2Error> {
        if buf.len() < 72 || be32(buf, 0) != MAGIC {
            return Err(Qcow2Error::NotQcow2);
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Qcow2Error::Unsupported(format!("Unsupported qcow2 version {version}")));
        }
        let cluster_bits = be32(buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(bad(format!("Unsupported cluster size: 2^{cluster_bits}")));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Qcow2Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 72,
            compression_type: 0,
            extensions: Vec::new(),
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
        };
        if version == 3 {
            if buf.len() < 104 {
                return Err(bad("qcow2 header exceeds cluster size"));
            }
            h.incompatible = be64(buf, 72);
            h.compatible = be64(buf, 80);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104 {
                return Err(bad("qcow2 header too short"));
            }
            if u64::from(h.header_length) > cluster_size || h.header_length as usize > buf.len() {
                return Err(bad("qcow2 header exceeds cluster size"));
            }
            if h.header_length > 104 {
                h.compression_type = buf[104];
            }
        }
        if h.refcount_order > 6 {
            return Err(bad("Reference count entry width too large; may not exceed 64 bits"));
        }
        // Extensions follow the header, up to the end of cluster 0 (or the backing file name).
        let ext_end = if h.backing_file_offset != 0 { h.backing_file_offset.min(cluster_size) } else { cluster_size } as usize;
        let ext_end = ext_end.min(buf.len());
        let mut o = h.header_length as usize;
        while o + 8 <= ext_end {
            let kind = be32(buf, o);
            let len = be32(buf, o + 4) as usize;
            o += 8;
            if kind == EXT_END {
                break;
            }
            if len > ext_end - o {
                return Err(bad("Invalid header extension: length exceeds the header cluster"));
            }
            let data = buf[o..o + len].to_vec();
            o += len.next_multiple_of(8);
            match kind {
                EXT_BACKING_FORMAT => h.backing_format = Some(String::from_utf8_lossy(&data).into_owned()),
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let name = e[2..].split(|&c| c == 0).next().unwrap_or_default();
                        h.feature_names.push((e[0], e[1], String::from_utf8_lossy(name).into_owned()));
                    }
                }
                EXT_DATA_FILE => {
                    h.data_file = Some(String::from_utf8_lossy(&data).into_owned());
                    h.extensions.push(Extension { kind, data });
                }
                _ => h.extensions.push(Extension { kind, data }),
            }
        }
        if h.backing_file_offset != 0 {
            let len = u64::from(h.backing_file_size);
            if len > 1023 || h.backing_file_offset.checked_add(len).is_none_or(|e| e > cluster_size || e > buf.len() as u64) {
                return Err(bad("Backing file name too long"));
            }
            let s = h.backing_file_offset as usize;
            h.backing_file = Some(String::from_utf8_lossy(&buf[s..s + len as usize]).into_owned());
        }
        h.validate(file_size)?;
        Ok(h)
    }

    fn validate(&self, file_size: u64) -> Result<(), Qcow2Error> {
        let cs = self.cluster_size();
        let unknown = self.incompatible & !KNOWN_INCOMPAT;
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| {
                    self.feature_names
                        .iter()
                        .find(|(t, bit, _)| *t == 0 && u64::from(*bit) == b)
                        .map(|(_, _, n)| n.clone())
                        .unwrap_or_else(|| format!("Unknown incompatible feature: {:x}", 1u64 << b))
                })
                .collect();
            return Err(Qcow2Error::Unsupported(format!("Unsupported qcow2 feature(s): {}", names.join(", "))));
        }
        if self.compression_type > 1 {
            return Err(bad(format!("Unknown compression type {}", self.compression_type)));
        }
        if self.compression_type != 0 && self.incompatible & INCOMPAT_COMPRESSION == 0 {
            return Err(bad("Compression type incompatible feature bit must be set for non-zlib compression"));
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(bad("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"));
        }
        let aligned = |o: u64| o.is_multiple_of(cs);
        if !aligned(self.l1_table_offset) {
            return Err(bad("Invalid L1 table offset"));
        }
        if !aligned(self.refcount_table_offset) {
            return Err(bad("Invalid reference count table offset"));
        }
        if u64::from(self.refcount_table_clusters) * cs > MAX_REFTABLE_BYTES {
            return Err(bad("Reference count table too large"));
        }
        if u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            return Err(bad("Active L1 table too large"));
        }
        // The L1 table must cover the virtual size.
        let l2_cover = cs * self.l2_entries();
        let need = self.size.div_ceil(l2_cover);
        if need > u64::from(self.l1_size) {
            return Err(bad("L1 table is too small"));
        }
        if self.size > (1u64 << 62) {
            return Err(bad("Image size is too large"));
        }
        let within = |off: u64, len: u64| off.checked_add(len).is_some_and(|e| e <= file_size.next_multiple_of(cs));
        if self.l1_size > 0 && !within(self.l1_table_offset, u64::from(self.l1_size) * 8) {
            return Err(bad("Active L1 table offset invalid (past the end of the image file)"));
        }
        if !within(self.refcount_table_offset, u64::from(self.refcount_table_clusters) * cs) {
            return Err(bad("Reference count table offset invalid (past the end of the image file)"));
        }
        if self.nb_snapshots > 65536 {
            return Err(bad("Too many snapshots"));
        }
        if self.nb_snapshots > 0 && !aligned(self.snapshots_offset) {
            return Err(bad("Invalid snapshot table offset"));
        }
        Ok(())
    }

    /// Serialise the header, its extensions and the backing file name into one cluster.
    pub fn serialize(&self) -> Result<Vec<u8>, Qcow2Error> {
        let cs = self.cluster_size() as usize;
        let mut b = Vec::with_capacity(cs);
        let put32 = |b: &mut Vec<u8>, v: u32| b.extend_from_slice(&v.to_be_bytes());
        let put64 = |b: &mut Vec<u8>, v: u64| b.extend_from_slice(&v.to_be_bytes());
        put32(&mut b, MAGIC);
        put32(&mut b, self.version);
        put64(&mut b, 0); // backing file offset, patched below
        put32(&mut b, 0);
        put32(&mut b, self.cluster_bits);
        put64(&mut b, self.size);
        put32(&mut b, self.crypt_method);
        put32(&mut b, self.l1_size);
        put64(&mut b, self.l1_table_offset);
        put64(&mut b, self.refcount_table_offset);
        put32(&mut b, self.refcount_table_clusters);
        put32(&mut b, self.nb_snapshots);
        put64(&mut b, self.snapshots_offset);
        if self.version >= 3 {
            put64(&mut b, self.incompatible);
            put64(&mut b, self.compatible);
            put64(&mut b, self.autoclear);
            put32(&mut b, self.refcount_order);
            put32(&mut b, 112);
            b.push(self.compression_type);
            b.resize(112, 0);
        }
        let ext = |b: &mut Vec<u8>, kind: u32, data: &[u8]| {
            put32(b, kind);
            put32(b, data.len() as u32);
            b.extend_from_slice(data);
            b.resize(b.len().next_multiple_of(8), 0);
        };
        if let Some(f) = &self.backing_format {
            ext(&mut b, EXT_BACKING_FORMAT, f.as_bytes());
        }
        for e in &self.extensions {
            ext(&mut b, e.kind, &e.data);
        }
        // QEMU leaves the feature name table out of small clusters (it might not fit).
        if self.version >= 3 && cs > 4096 {
            ext(&mut b, EXT_FEATURE_TABLE, &feature_table());
        }
        ext(&mut b, EXT_END, &[]);
        if let Some(bf) = &self.backing_file {
            let off = b.len() as u64;
            b[8..16].copy_from_slice(&off.to_be_bytes());
            b[16..20].copy_from_slice(&(bf.len() as u32).to_be_bytes());
            b.extend_from_slice(bf.as_bytes());
        }
        if b.len() > cs {
            return Err(bad("Header, extensions and backing file name do not fit in the first cluster"));
        }
        Ok(b)
    }
}

/// QEMU's feature name table: 48-byte entries of (type, bit, name).
fn feature_table() -> Vec<u8> {
    const F: &[(u8, u8, &str)] = &[
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut v = Vec::with_capacity(F.len() * 48);
    for (t, bit, name) in F {
        let mut e = [0u8; 48];
        e[0] = *t;
        e[1] = *bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        v.extend_from_slice(&e);
    }
    v
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid version 3 header with an unknown extension and a backing file (also the seed
    /// of the header fuzz loop).
    pub(crate) fn sample() -> Qcow2Header {
        Qcow2Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 112,
            compression_type: 0,
            extensions: vec![Extension { kind: 0x1234_5678, data: vec![1, 2, 3] }],
            backing_file: Some("base.img".into()),
            backing_format: Some("raw".into()),
            data_file: None,
            feature_names: Vec::new(),
        }
    }

    #[test]
    fn round_trip_keeps_unknown_extensions() {
        let h = sample();
        let b = h.serialize().unwrap();
        let mut p = Qcow2Header::parse(&b, 1 << 20).unwrap();
        assert_eq!(p.feature_names.len(), 8, "64 KiB clusters carry the feature name table");
        p.feature_names.clear();
        let mut want = h.clone();
        want.backing_file_offset = p.backing_file_offset;
        want.backing_file_size = 8;
        assert_eq!(p, want);
    }

    #[test]
    fn hostile_headers_are_refused_with_the_field_named() {
        let good = sample().serialize().unwrap();
        let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();
        let mut b = good.clone();
        b[20..24].copy_from_slice(&30u32.to_be_bytes());
        cases.push((b, "cluster size"));
        let mut b = good.clone();
        b[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
        cases.push((b, "L1 table too large"));
        let mut b = good.clone();
        b[40..48].copy_from_slice(&0x12345u64.to_be_bytes());
        cases.push((b, "L1 table offset"));
        let mut b = good.clone();
        b[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes());
        cases.push((b, "Unsupported qcow2 feature"));
        let mut b = good.clone();
        b[16..20].copy_from_slice(&5000u32.to_be_bytes());
        cases.push((b, "Backing file name too long"));
        let mut b = good.clone();
        b[96..100].copy_from_slice(&7u32.to_be_bytes());
        cases.push((b, "Reference count entry width"));
        let mut b = good.clone();
        b[24..32].copy_from_slice(&(1u64 << 40).to_be_bytes());
        cases.push((b, "L1 table is too small"));
        let mut b = good.clone();
        b[100..104].copy_from_slice(&0xffffu32.to_be_bytes());
        cases.push((b, "exceeds cluster size"));
        for (b, want) in cases {
            let e = Qcow2Header::parse(&b, 1 << 20).unwrap_err().to_string();
            assert!(e.contains(want), "{e} should mention {want}");
        }
        assert!(matches!(Qcow2Header::parse(&good[..50], 1 << 20), Err(Qcow2Error::NotQcow2)));
        // Truncated mid-extension: still an error, never a panic.
        for n in 0..good.len() {
            let _ = Qcow2Header::parse(&good[..n], 1 << 20);
        }
    }
}
