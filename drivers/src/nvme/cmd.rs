//! NVMe commands, completions and identify data, as the NVM Express base specification lays
//! them out: 64-byte submission entries, 16-byte completion entries, the status field, the
//! Identify Controller and Identify Namespace fields the driver uses, and PRP construction.
//! No I/O here: everything works on plain values and byte slices, so it is unit-testable.
//!
//! Identify data comes from the device and is not trusted: sizes are checked, an LBA data size
//! outside 512 B..64 KiB or metadata interleaved with data is refused by name.

/// Admin opcodes.
pub(crate) mod admin {
    pub(crate) const DELETE_SQ: u8 = 0x00;
    pub(crate) const CREATE_SQ: u8 = 0x01;
    pub(crate) const DELETE_CQ: u8 = 0x04;
    pub(crate) const CREATE_CQ: u8 = 0x05;
    pub(crate) const IDENTIFY: u8 = 0x06;
    pub(crate) const SET_FEATURES: u8 = 0x09;
}

/// NVM command set opcodes.
pub(crate) mod io {
    pub(crate) const FLUSH: u8 = 0x00;
    pub(crate) const WRITE: u8 = 0x01;
    pub(crate) const READ: u8 = 0x02;
    pub(crate) const WRITE_ZEROES: u8 = 0x08;
    pub(crate) const DSM: u8 = 0x09;
}

/// Feature identifier: Number of Queues.
pub(crate) const FEAT_NUM_QUEUES: u32 = 0x07;

/// A submission queue entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub(crate) struct Sqe {
    pub(crate) cdw0: u32,
    pub(crate) nsid: u32,
    pub(crate) cdw2: u32,
    pub(crate) cdw3: u32,
    pub(crate) mptr: u64,
    pub(crate) prp1: u64,
    pub(crate) prp2: u64,
    pub(crate) cdw10: u32,
    pub(crate) cdw11: u32,
    pub(crate) cdw12: u32,
    pub(crate) cdw13: u32,
    pub(crate) cdw14: u32,
    pub(crate) cdw15: u32,
}

const _: () = assert!(std::mem::size_of::<Sqe>() == 64);

impl Sqe {
    /// A command with `opcode` and command identifier `cid`.
    pub(crate) fn new(opcode: u8, cid: u16, nsid: u32) -> Sqe {
        Sqe { cdw0: u32::from(opcode) | (u32::from(cid) << 16), nsid, ..Sqe::default() }
    }

    /// Read or write of `nlb` blocks (at least 1) from `slba`.
    pub(crate) fn rw(opcode: u8, cid: u16, nsid: u32, slba: u64, nlb: u32, fua: bool) -> Sqe {
        let mut s = Sqe::new(opcode, cid, nsid);
        s.cdw10 = slba as u32;
        s.cdw11 = (slba >> 32) as u32;
        s.cdw12 = (nlb - 1) | (u32::from(fua) << 30);
        s
    }

    /// Write Zeroes of `nlb` blocks; `deallocate` lets the controller deallocate them.
    pub(crate) fn write_zeroes(cid: u16, nsid: u32, slba: u64, nlb: u32, deallocate: bool, fua: bool) -> Sqe {
        let mut s = Sqe::rw(io::WRITE_ZEROES, cid, nsid, slba, nlb, fua);
        s.cdw12 |= u32::from(deallocate) << 25;
        s
    }

    /// Dataset Management, Deallocate, of `ranges` ranges (1..=256) described in the PRP'd data.
    pub(crate) fn deallocate(cid: u16, nsid: u32, ranges: u32) -> Sqe {
        let mut s = Sqe::new(io::DSM, cid, nsid);
        s.cdw10 = ranges - 1;
        s.cdw11 = 1 << 2;
        s
    }

    /// Set the data pointer: PRP1/PRP2, or with `sgl` one SGL Data Block descriptor (address
    /// in `a`, byte length in `b`'s low 32 bits, descriptor type 0 in its top byte), PSDT 01b.
    pub(crate) fn set_data(&mut self, a: u64, b: u64, sgl: bool) {
        self.prp1 = a;
        self.prp2 = b;
        self.cdw0 = (self.cdw0 & !(3 << 14)) | (u32::from(sgl) << 14);
    }

    /// The command identifier.
    #[cfg(test)]
    pub(crate) fn cid(&self) -> u16 {
        (self.cdw0 >> 16) as u16
    }
}

/// A completion queue entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub(crate) struct Cqe {
    pub(crate) dw0: u32,
    pub(crate) dw1: u32,
    pub(crate) sq_head: u16,
    pub(crate) sq_id: u16,
    pub(crate) cid: u16,
    /// Phase tag (bit 0) and status field (bits 15:1).
    pub(crate) status: u16,
}

const _: () = assert!(std::mem::size_of::<Cqe>() == 16);

impl Cqe {
    /// The phase tag.
    #[cfg(test)]
    pub(crate) fn phase(&self) -> bool {
        self.status & 1 == 1
    }

    /// The status without the phase tag: 0 is success.
    pub(crate) fn status(&self) -> Status {
        Status(self.status >> 1)
    }
}

/// A completion status (status code type and status code, with the DNR/More bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Status(pub(crate) u16);

impl Status {
    /// Status code type.
    pub(crate) fn sct(self) -> u8 {
        ((self.0 >> 8) & 7) as u8
    }

    /// Status code.
    pub(crate) fn sc(self) -> u8 {
        self.0 as u8
    }

    /// Success.
    pub(crate) fn ok(self) -> bool {
        self.sct() == 0 && self.sc() == 0
    }

    /// The errno a failed command maps to (as the Linux driver maps them).
    pub(crate) fn errno(self) -> i32 {
        match (self.sct(), self.sc()) {
            (0, 0) => 0,
            (0, 0x01) | (0, 0x02) | (0, 0x0b) => libc::EOPNOTSUPP, // invalid opcode / field
            (0, 0x80) => libc::EINVAL,                             // LBA out of range
            (0, 0x81) => libc::ENOSPC,                             // capacity exceeded
            (0, 0x82) => libc::ENXIO,                              // namespace not ready
            (1, 0x80) | (1, 0x82) => libc::EINVAL,                 // conflicting attributes, invalid protection
            (2, 0x85) | (2, 0x86) => libc::EIO,                    // media errors
            (1, 0x20) | (0, 0x20) => libc::EROFS,                  // namespace write protected
            _ => libc::EIO,
        }
    }

    /// A readable description for control-plane errors.
    pub(crate) fn describe(self) -> String {
        let what = match (self.sct(), self.sc()) {
            (0, 0x01) => "Invalid Command Opcode",
            (0, 0x02) => "Invalid Field in Command",
            (0, 0x04) => "Data Transfer Error",
            (0, 0x06) => "Internal Error",
            (0, 0x0b) => "Invalid Namespace or Format",
            (0, 0x80) => "LBA Out of Range",
            (1, 0x01) => "Invalid Queue Identifier",
            (1, 0x02) => "Invalid Queue Size",
            (1, 0x0d) => "Feature Identifier Not Saveable",
            _ => "",
        };
        let sep = if what.is_empty() { "" } else { ": " };
        format!("status type {:#x} code {:#04x}{sep}{what}", self.sct(), self.sc())
    }
}

/// What the driver uses of Identify Controller (CNS 01h).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct IdentifyController {
    pub(crate) serial: String,
    pub(crate) model: String,
    pub(crate) firmware: String,
    /// Maximum data transfer size as a power of two in units of the minimum page size; 0 = no limit.
    pub(crate) mdts: u8,
    /// Number of namespaces (the highest valid NSID).
    pub(crate) nn: u32,
    /// Optional NVM command support.
    pub(crate) oncs: u16,
    /// A volatile write cache is present (flush matters).
    pub(crate) vwc: bool,
    /// SGL support bits.
    pub(crate) sgls: u32,
}

impl IdentifyController {
    /// Parse the 4096-byte data structure.
    pub(crate) fn parse(d: &[u8]) -> Result<IdentifyController, String> {
        if d.len() < 4096 {
            return Err(format!("Identify Controller data is {} bytes, not 4096", d.len()));
        }
        let text = |r: std::ops::Range<usize>| String::from_utf8_lossy(&d[r]).trim_end_matches([' ', '\0']).trim().to_string();
        Ok(IdentifyController {
            serial: text(4..24),
            model: text(24..64),
            firmware: text(64..72),
            mdts: d[77],
            nn: u32::from_le_bytes(d[516..520].try_into().expect("4 bytes")),
            oncs: u16::from_le_bytes(d[520..522].try_into().expect("2 bytes")),
            vwc: d[525] & 1 == 1,
            sgls: u32::from_le_bytes(d[536..540].try_into().expect("4 bytes")),
        })
    }

    /// Dataset Management (deallocate) is supported.
    pub(crate) fn dsm(&self) -> bool {
        self.oncs & (1 << 2) != 0
    }

    /// Write Zeroes is supported.
    pub(crate) fn write_zeroes(&self) -> bool {
        self.oncs & (1 << 3) != 0
    }
}

/// What the driver uses of Identify Namespace (CNS 00h).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct IdentifyNamespace {
    /// Size in logical blocks.
    pub(crate) nsze: u64,
    /// Logical block size in bytes.
    pub(crate) block_size: u32,
    /// Deallocated blocks read as zeroes (DLFEAT read behaviour 001b).
    pub(crate) dealloc_reads_zero: bool,
    /// Write Zeroes may deallocate (DLFEAT bit 3).
    pub(crate) write_zeroes_dealloc: bool,
}

impl IdentifyNamespace {
    /// Parse the 4096-byte data structure. `None` for an inactive namespace (all zero).
    pub(crate) fn parse(d: &[u8]) -> Result<Option<IdentifyNamespace>, String> {
        if d.len() < 4096 {
            return Err(format!("Identify Namespace data is {} bytes, not 4096", d.len()));
        }
        let nsze = u64::from_le_bytes(d[0..8].try_into().expect("8 bytes"));
        if nsze == 0 {
            return Ok(None);
        }
        let nlbaf = d[25];
        let flbas = d[26];
        // FLBAS: format index in bits 3:0 (bits 6:5 extend it past 16 formats).
        let idx = usize::from(flbas & 0xf) | (usize::from((flbas >> 5) & 3) << 4);
        if idx > usize::from(nlbaf) || idx >= 64 {
            return Err(format!("Identify Namespace: FLBAS format index {idx} is past NLBAF {nlbaf}"));
        }
        let f = &d[128 + idx * 4..128 + idx * 4 + 4];
        let ms = u16::from_le_bytes([f[0], f[1]]);
        let lbads = f[2];
        if !(9..=16).contains(&lbads) {
            return Err(format!("Identify Namespace: LBA data size 2^{lbads} is not supported"));
        }
        if ms != 0 && flbas & 0x10 != 0 {
            return Err(format!("Identify Namespace: {ms} bytes of metadata interleaved with the data are not supported"));
        }
        if nsze.checked_shl(u32::from(lbads)).is_none_or(|b| b >> lbads != nsze) {
            return Err(format!("Identify Namespace: NSZE {nsze} overflows"));
        }
        let dlfeat = d[33];
        Ok(Some(IdentifyNamespace {
            nsze,
            block_size: 1 << lbads,
            dealloc_reads_zero: dlfeat & 7 == 1,
            write_zeroes_dealloc: dlfeat & 8 != 0,
        }))
    }

    /// Size in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.nsze << self.block_size.trailing_zeros()
    }
}

/// Page size the controller is configured for (CC.MPS = 0).
pub(crate) const PAGE: u64 = 4096;

/// The PRP entries of a transfer whose pages have bus addresses `pages` (the first may carry an
/// offset into its page, the others are page-aligned). Returns PRP1 and PRP2, filling `list`
/// (the PRP list page, whose own bus address is `list_bus`) when more than two pages are used.
/// `list` must hold `pages.len() - 1` entries.
pub(crate) fn build_prps(pages: &[u64], list: &mut [u64], list_bus: u64) -> (u64, u64) {
    match pages.len() {
        0 => (0, 0),
        1 => (pages[0], 0),
        2 => (pages[0], pages[1]),
        n => {
            list[..n - 1].copy_from_slice(&pages[1..]);
            (pages[0], list_bus)
        }
    }
}

/// How many pages `len` bytes starting `page_off` bytes into a page span.
pub(crate) fn pages_spanned(page_off: u64, len: u64) -> u64 {
    (page_off + len).div_ceil(PAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_encode_their_fields() {
        let s = Sqe::rw(io::WRITE, 7, 1, 0x1_2345_6789, 8, true);
        assert_eq!(s.cdw0, 0x0007_0001);
        assert_eq!(s.cid(), 7);
        assert_eq!((s.cdw10, s.cdw11), (0x2345_6789, 1));
        assert_eq!(s.cdw12, 7 | (1 << 30));
        let z = Sqe::write_zeroes(3, 2, 10, 1, true, false);
        assert_eq!(z.cdw0 & 0xff, 0x08);
        assert_eq!(z.cdw12, 1 << 25);
        let mut r = Sqe::rw(io::READ, 9, 1, 0, 1, false);
        r.set_data(0x1000, 8192, true);
        assert_eq!((r.cdw0, r.prp1, r.prp2), (0x0009_4002, 0x1000, 8192));
        let d = Sqe::deallocate(1, 1, 2);
        assert_eq!((d.cdw10, d.cdw11), (1, 4));
    }

    #[test]
    fn status_decodes() {
        let c = Cqe { status: (0x0280 << 1) | 1, ..Cqe::default() };
        assert!(c.phase());
        assert_eq!(c.status().sct(), 2);
        assert_eq!(c.status().sc(), 0x80);
        assert!(!c.status().ok());
        assert_eq!(Status(0x0080).errno(), libc::EINVAL);
        assert_eq!(Status(0x0002).describe(), "status type 0x0 code 0x02: Invalid Field in Command");
        assert!(Status(0x4000).ok(), "the DNR bit alone is not a failure");
    }

    fn ns(nsze: u64, lbads: u8, flbas: u8, ms: u16) -> Vec<u8> {
        let mut d = vec![0u8; 4096];
        d[0..8].copy_from_slice(&nsze.to_le_bytes());
        d[25] = 1;
        d[26] = flbas;
        d[33] = 0x9;
        d[132..134].copy_from_slice(&ms.to_le_bytes());
        d[134] = lbads;
        d[130] = 9;
        d
    }

    #[test]
    fn namespaces_parse_and_refuse_what_is_unsupported() {
        let n = IdentifyNamespace::parse(&ns(1000, 12, 1, 0)).unwrap().unwrap();
        assert_eq!((n.block_size, n.size()), (4096, 4096 * 1000));
        assert!(n.dealloc_reads_zero && n.write_zeroes_dealloc);
        assert_eq!(IdentifyNamespace::parse(&ns(0, 12, 1, 0)).unwrap(), None);
        assert!(IdentifyNamespace::parse(&ns(10, 12, 2, 0)).unwrap_err().contains("past NLBAF"));
        assert!(IdentifyNamespace::parse(&ns(10, 20, 1, 0)).unwrap_err().contains("LBA data size"));
        assert!(IdentifyNamespace::parse(&ns(10, 12, 0x11, 8)).unwrap_err().contains("interleaved"));
        assert!(IdentifyNamespace::parse(&ns(u64::MAX, 12, 1, 0)).unwrap_err().contains("overflows"));
        assert!(IdentifyNamespace::parse(&[0u8; 100]).is_err());
    }

    #[test]
    fn controller_identify_parses() {
        let mut d = vec![0u8; 4096];
        d[4..12].copy_from_slice(b"SER1    ");
        d[24..28].copy_from_slice(b"QEMU");
        d[77] = 7;
        d[516] = 3;
        d[520] = 0x0c;
        d[525] = 1;
        let c = IdentifyController::parse(&d).unwrap();
        assert_eq!((c.serial.as_str(), c.model.as_str(), c.mdts, c.nn), ("SER1", "QEMU", 7, 3));
        assert!(c.dsm() && c.write_zeroes() && c.vwc);
    }

    #[test]
    fn prps_follow_the_page_count() {
        let mut list = [0u64; 4];
        assert_eq!(build_prps(&[0x1200], &mut list, 0x9000), (0x1200, 0));
        assert_eq!(build_prps(&[0x1200, 0x5000], &mut list, 0x9000), (0x1200, 0x5000));
        assert_eq!(build_prps(&[0x1200, 0x5000, 0x7000, 0x3000], &mut list, 0x9000), (0x1200, 0x9000));
        assert_eq!(&list[..3], &[0x5000, 0x7000, 0x3000]);
        assert_eq!(pages_spanned(0, 4096), 1);
        assert_eq!(pages_spanned(512, 4096), 2);
        assert_eq!(pages_spanned(0, 8192 + 1), 3);
    }
}
