//! Dirty bitmaps exported as `qemu:dirty-bitmap:NAME` meta contexts (`basalt-nbd -B NAME`).
//!
//! The bits are read from the image when the export starts. When the bitmap is enabled and the
//! export writable, writes, zeroes and trims through the export set the bits they cover, as
//! QEMU's bitmap does while the image is open; the image's own copy records them too (the qcow2
//! node marks its enabled bitmaps on every write), so nothing is lost when the server stops.
//! Block status reports runs of equal bits: flag 1 (`NBD_STATE_DIRTY`) for dirty, 0 for clean.

use std::cell::RefCell;

/// One exported bitmap.
pub struct ExportBitmap {
    pub name: String,
    /// log2 of the bytes one bit covers.
    pub granularity_bits: u8,
    /// Bits, least significant first within each byte (qcow2's order).
    pub bits: RefCell<Vec<u8>>,
    /// Writes through the export set bits.
    pub enabled: bool,
}

impl ExportBitmap {
    /// The context name.
    pub fn context(&self) -> String {
        format!("qemu:dirty-bitmap:{}", self.name)
    }

    fn bit(bits: &[u8], i: u64) -> bool {
        bits.get((i / 8) as usize).is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    /// The run of equal bits at `off`, up to `end`: its length and flags.
    pub fn extent(&self, off: u64, end: u64) -> (u64, u32) {
        let g = self.granularity_bits;
        let bits = self.bits.borrow();
        let first = off >> g;
        let last = (end - 1) >> g;
        let v = Self::bit(&bits, first);
        let mut i = first + 1;
        while i <= last {
            // Whole bytes of the same value at once.
            if i.is_multiple_of(8) && i + 8 <= last + 1 {
                let b = bits.get((i / 8) as usize).copied().unwrap_or(0);
                if b == if v { 0xff } else { 0 } {
                    i += 8;
                    continue;
                }
            }
            if Self::bit(&bits, i) != v {
                break;
            }
            i += 1;
        }
        let run_end = (i << g).min(end);
        (run_end - off, u32::from(v))
    }

    /// Record a change of `off..off+len` (an enabled bitmap only).
    pub fn mark(&self, off: u64, len: u64) {
        if !self.enabled || len == 0 {
            return;
        }
        let g = self.granularity_bits;
        let mut bits = self.bits.borrow_mut();
        for i in off >> g..=(off + len - 1) >> g {
            if let Some(b) = bits.get_mut((i / 8) as usize) {
                *b |= 1 << (i % 8);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_follow_the_bits() {
        // 64 KiB granularity, bits 2..4 and 40 dirty.
        let mut bits = vec![0u8; 8];
        bits[0] = 0b0001_1100;
        bits[5] = 1;
        let b = ExportBitmap { name: "b".into(), granularity_bits: 16, bits: RefCell::new(bits), enabled: true };
        let end = 64 << 16;
        assert_eq!(b.extent(0, end), (2 << 16, 0));
        assert_eq!(b.extent(2 << 16, end), (3 << 16, 1));
        assert_eq!(b.extent(5 << 16, end), (35 << 16, 0));
        assert_eq!(b.extent(40 << 16, end), (1 << 16, 1));
        assert_eq!(b.extent((2 << 16) + 100, 3 << 16), ((1 << 16) - 100, 1));
        b.mark(10 << 16, 1);
        assert_eq!(b.extent(10 << 16, end), (1 << 16, 1));
        let off = ExportBitmap { name: "c".into(), granularity_bits: 16, bits: RefCell::new(vec![0; 8]), enabled: false };
        off.mark(0, 1 << 20);
        assert_eq!(off.extent(0, end), (end, 0));
        assert_eq!(b.context(), "qemu:dirty-bitmap:b");
    }
}
