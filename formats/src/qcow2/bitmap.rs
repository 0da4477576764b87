//! Persistent dirty bitmaps of a qcow2 image: the bitmaps header extension, the bitmap
//! directory and bitmap tables, parsed with every field checked and serialised. No I/O.
//!
//! A bitmap has one bit per `granularity` bytes of the virtual disk, stored in data clusters
//! that its bitmap table lists (an entry of 0 is a cluster of zero bits, 1 one of set bits).
//! Bit `i` of byte `j` of the data is granule `8 * j + i`. A bitmap marked `in_use` was not
//! stored by a clean close: it is inconsistent and is never updated or trusted.

use crate::qcow2::error::{bad, Qcow2Error};

/// The bitmaps extension's type.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// The autoclear bit that says the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Flag: the bitmap is being modified (or was, when a program died).
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Flag: the bitmap records writes (enabled).
pub const FLAG_AUTO: u32 = 1 << 1;
/// Flag: extra data may be ignored by programs that do not know it.
pub const FLAG_EXTRA_COMPATIBLE: u32 = 1 << 2;
const KNOWN_FLAGS: u32 = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_COMPATIBLE;

/// Most bitmaps QEMU keeps in one image.
pub const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory QEMU accepts.
pub const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
/// Longest bitmap name.
pub const MAX_NAME: usize = 1023;
/// Granularity bounds (log2): 512 bytes to 2 GiB.
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// See [`MIN_GRANULARITY_BITS`].
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Largest bitmap table (entries) QEMU accepts.
pub const MAX_TABLE_ENTRIES: u32 = 0x800_0000;

/// The bitmaps header extension.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Bytes of the directory.
    pub directory_size: u64,
    /// Where the directory is.
    pub directory_offset: u64,
}

impl BitmapsExt {
    /// Parse the extension's payload.
    pub fn parse(b: &[u8]) -> Result<BitmapsExt, Qcow2Error> {
        if b.len() < 24 {
            return Err(bad("Invalid bitmaps extension: too short"));
        }
        let e = BitmapsExt {
            nb_bitmaps: u32::from_be_bytes(b[0..4].try_into().unwrap_or_default()),
            directory_size: u64::from_be_bytes(b[8..16].try_into().unwrap_or_default()),
            directory_offset: u64::from_be_bytes(b[16..24].try_into().unwrap_or_default()),
        };
        if b[4..8] != [0; 4] {
            return Err(bad("Invalid bitmaps extension: reserved field is not zero"));
        }
        if e.nb_bitmaps == 0 || e.nb_bitmaps > MAX_BITMAPS {
            return Err(bad(format!("Invalid bitmaps extension: {} bitmaps", e.nb_bitmaps)));
        }
        if e.directory_size > MAX_DIRECTORY_BYTES || e.directory_size < 24 * u64::from(e.nb_bitmaps) {
            return Err(bad("Invalid bitmaps extension: bad bitmap directory size"));
        }
        Ok(e)
    }

    /// The extension's payload.
    pub fn serialize(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(24);
        v.extend_from_slice(&self.nb_bitmaps.to_be_bytes());
        v.extend_from_slice(&[0; 4]);
        v.extend_from_slice(&self.directory_size.to_be_bytes());
        v.extend_from_slice(&self.directory_offset.to_be_bytes());
        v
    }
}

/// One bitmap directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapEntry {
    /// Where the bitmap table is.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// log2 of the bytes one bit covers.
    pub granularity_bits: u8,
    /// Name.
    pub name: String,
    /// Extra data, kept as it was.
    pub extra: Vec<u8>,
}

impl BitmapEntry {
    /// Bytes one bit covers.
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    /// Whether the bitmap records writes.
    pub fn enabled(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }

    /// Whether the bitmap is inconsistent (left in use).
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }

    /// Parse one entry at the start of `b`; returns it and its padded length.
    pub fn parse(b: &[u8]) -> Result<(BitmapEntry, usize), Qcow2Error> {
        if b.len() < 24 {
            return Err(bad("Bitmap directory is truncated"));
        }
        let name_len = usize::from(u16::from_be_bytes([b[18], b[19]]));
        let extra_len = u32::from_be_bytes(b[20..24].try_into().unwrap_or_default()) as usize;
        if extra_len > 1024 {
            return Err(bad("Bitmap extra data is too large"));
        }
        let len = (24 + extra_len + name_len).next_multiple_of(8);
        if b.len() < len {
            return Err(bad("Bitmap directory is truncated"));
        }
        let e = BitmapEntry {
            table_offset: u64::from_be_bytes(b[0..8].try_into().unwrap_or_default()),
            table_size: u32::from_be_bytes(b[8..12].try_into().unwrap_or_default()),
            flags: u32::from_be_bytes(b[12..16].try_into().unwrap_or_default()),
            granularity_bits: b[17],
            name: String::from_utf8_lossy(&b[24 + extra_len..24 + extra_len + name_len]).into_owned(),
            extra: b[24..24 + extra_len].to_vec(),
        };
        if b[16] != 1 {
            return Err(bad(format!("Bitmap '{}' has unknown type {}", e.name, b[16])));
        }
        if name_len == 0 || name_len > MAX_NAME {
            return Err(bad("Bitmap name length is invalid"));
        }
        if e.flags & !KNOWN_FLAGS != 0 {
            return Err(bad(format!("Bitmap '{}' has unknown flags {:#x}", e.name, e.flags & !KNOWN_FLAGS)));
        }
        if !e.extra.is_empty() && e.flags & FLAG_EXTRA_COMPATIBLE == 0 {
            return Err(bad(format!("Bitmap '{}' has extra data this program does not understand", e.name)));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&e.granularity_bits) {
            return Err(bad(format!("Bitmap '{}' has an invalid granularity (2^{})", e.name, e.granularity_bits)));
        }
        if e.table_size > MAX_TABLE_ENTRIES {
            return Err(bad(format!("Bitmap '{}' has a bitmap table that is too large", e.name)));
        }
        Ok((e, len))
    }

    /// Append the entry (padded to 8 bytes) to `out`.
    pub fn serialize(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.table_offset.to_be_bytes());
        out.extend_from_slice(&self.table_size.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.push(1);
        out.push(self.granularity_bits);
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(self.name.as_bytes());
        let len = (out.len() - start).next_multiple_of(8);
        out.resize(start + len, 0);
    }

    /// QEMU's `Qcow2BitmapInfo` for `info`.
    pub fn info_json(&self) -> serde_json::Value {
        let mut flags = Vec::new();
        if self.in_use() {
            flags.push("in-use");
        }
        if self.enabled() {
            flags.push("auto");
        }
        serde_json::json!({ "flags": flags, "name": self.name, "granularity": self.granularity() })
    }
}

/// Parse a whole directory of `n` entries.
pub fn parse_directory(b: &[u8], n: u32) -> Result<Vec<BitmapEntry>, Qcow2Error> {
    let mut at = 0;
    let mut v = Vec::with_capacity(n.min(1024) as usize);
    for _ in 0..n {
        let (e, len) = BitmapEntry::parse(&b[at.min(b.len())..])?;
        if v.iter().any(|x: &BitmapEntry| x.name == e.name) {
            return Err(bad(format!("Duplicate bitmap name '{}'", e.name)));
        }
        v.push(e);
        at += len;
    }
    Ok(v)
}

/// Bits a bitmap of `granularity_bits` has over a disk of `size` bytes.
pub fn bits_for(size: u64, granularity_bits: u8) -> u64 {
    size.div_ceil(1 << granularity_bits)
}

/// Entries the bitmap table needs for `bits` bits in clusters of `cs` bytes.
pub fn table_size_for(bits: u64, cs: u64) -> u64 {
    bits.div_ceil(8).div_ceil(cs)
}

/// Check an entry against the image: its table where it may be and of the size the disk needs.
pub fn check_entry(e: &BitmapEntry, disk_size: u64, cs: u64, file_size: u64) -> Result<(), Qcow2Error> {
    let want = table_size_for(bits_for(disk_size, e.granularity_bits), cs);
    if u64::from(e.table_size) != want {
        return Err(bad(format!("Bitmap '{}' has a bitmap table of the wrong size", e.name)));
    }
    let bytes = u64::from(e.table_size) * 8;
    if !e.table_offset.is_multiple_of(cs)
        || (bytes > 0 && e.table_offset == 0)
        || e.table_offset.checked_add(bytes).is_none_or(|end| end > file_size.next_multiple_of(cs))
    {
        return Err(bad(format!("Bitmap '{}' has an invalid bitmap table offset", e.name)));
    }
    Ok(())
}

/// A bitmap table entry: `Ok(None)` for a cluster of all-zero bits, `Ok(Some(None))` for all
/// ones, `Ok(Some(Some(off)))` for data at `off`.
pub fn decode_table_entry(e: u64, cs: u64) -> Result<Option<Option<u64>>, Qcow2Error> {
    let off = e & 0x00ff_ffff_ffff_fe00;
    if e & !0x00ff_ffff_ffff_fe01 != 0 || !off.is_multiple_of(cs) {
        return Err(bad(format!("Invalid bitmap table entry {e:#x}")));
    }
    Ok(match (off, e & 1) {
        (0, 0) => None,
        (0, _) => Some(None),
        (o, _) => Some(Some(o)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> BitmapEntry {
        BitmapEntry {
            table_offset: 0xd0000,
            table_size: 1,
            flags: FLAG_AUTO,
            granularity_bits: 16,
            name: name.into(),
            extra: vec![],
        }
    }

    #[test]
    fn round_trip_and_layout() {
        let mut b = Vec::new();
        entry("b1").serialize(&mut b);
        entry("second").serialize(&mut b);
        // As qemu-img writes it: 24-byte header, name, padding.
        assert_eq!(&b[..24], &[0, 0, 0, 0, 0, 0x0d, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 1, 16, 0, 2, 0, 0, 0, 0]);
        assert_eq!(b.len(), 32 + 32);
        let v = parse_directory(&b, 2).unwrap();
        assert_eq!(v, vec![entry("b1"), entry("second")]);
        let x = BitmapsExt { nb_bitmaps: 2, directory_size: 64, directory_offset: 0xf0000 };
        assert_eq!(BitmapsExt::parse(&x.serialize()).unwrap(), x);
    }

    #[test]
    fn hostile_entries() {
        let mut b = Vec::new();
        entry("b1").serialize(&mut b);
        assert!(parse_directory(&b[..20], 1).is_err());
        assert!(parse_directory(&b, 2).is_err());
        let mut t = b.clone();
        t[16] = 2;
        assert!(parse_directory(&t, 1).is_err());
        let mut g = b.clone();
        g[17] = 40;
        assert!(parse_directory(&g, 1).is_err());
        let mut f = b.clone();
        f[15] = 0x10;
        assert!(parse_directory(&f, 1).is_err());
        let mut dup = b.clone();
        dup.extend_from_slice(&b);
        assert!(parse_directory(&dup, 2).unwrap_err().to_string().contains("Duplicate"));
        assert!(BitmapsExt::parse(&[0; 10]).is_err());
        let huge = BitmapsExt { nb_bitmaps: 1, directory_size: 1 << 40, directory_offset: 0 };
        assert!(BitmapsExt::parse(&huge.serialize()).is_err());
        // Table size must match the disk.
        let e = entry("b1");
        assert!(check_entry(&e, 64 << 20, 65536, 1 << 20).is_ok());
        assert!(check_entry(&e, 1 << 50, 65536, 1 << 20).is_err());
        assert!(decode_table_entry(0x8000_0000_0000_0000, 65536).is_err());
        assert_eq!(decode_table_entry(1, 65536).unwrap(), Some(None));
        assert_eq!(decode_table_entry(0xc0000, 65536).unwrap(), Some(Some(0xc0000)));
    }
}
