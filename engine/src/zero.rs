//! Fast detection of all-zero buffers (QEMU's `buffer_is_zero`), used to keep images sparse
//! when copying and to detect zero writes. Blocks of 256 bytes are OR-reduced without an early
//! exit inside a block, which the compiler turns into wide vector code, with an early exit
//! between blocks so data is rejected at once.

/// Whether every byte of `b` is zero.
pub fn buffer_is_zero(b: &[u8]) -> bool {
    // Data usually shows in its first bytes: a quick look before the full scan.
    if let Some(head) = b.get(..16) {
        if head.iter().any(|&x| x != 0) {
            return false;
        }
    }
    let mut blocks = b.chunks_exact(256);
    for blk in &mut blocks {
        let mut acc = 0u64;
        for w in blk.chunks_exact(8) {
            acc |= u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::buffer_is_zero;

    #[test]
    fn finds_any_nonzero_byte() {
        let mut v = vec![0u8; 4096 + 77];
        assert!(buffer_is_zero(&v));
        for i in [0, 7, 255, 256, 4095, 4096 + 76] {
            v[i] = 1;
            assert!(!buffer_is_zero(&v), "byte {i}");
            v[i] = 0;
        }
        assert!(buffer_is_zero(&[]));
    }
}
