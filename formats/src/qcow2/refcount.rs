//! Refcount entries inside a refcount block, for every width from 1 to 64 bits. Sub-byte
//! widths pack entries from the least significant bit of each byte; wider ones are big-endian.
//! Pure functions over the block's bytes.

/// Entries per refcount block.
pub fn entries_per_block(cluster_bits: u32, refcount_order: u32) -> u64 {
    (1u64 << (cluster_bits + 3)) >> refcount_order
}

/// Refcount blocks and refcount table clusters that cover `clusters` clusters plus themselves
/// (QEMU's `qcow2_refcount_metadata_size`, exact: the fixed point where the blocks and table
/// clusters added need no more of either).
pub fn refcount_metadata_clusters(clusters: u64, cluster_bits: u32, refcount_order: u32) -> (u64, u64) {
    let per_block = entries_per_block(cluster_bits, refcount_order);
    let per_table_cluster = (1u64 << cluster_bits) / 8;
    let (mut blocks, mut table, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return (blocks, table);
        }
    }
}

/// The largest refcount representable with this width.
pub fn max_refcount(refcount_order: u32) -> u64 {
    if refcount_order == 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << refcount_order)) - 1
    }
}

/// Refcount of entry `i` of `block`.
pub fn get(block: &[u8], refcount_order: u32, i: u64) -> u64 {
    let bits = 1u32 << refcount_order;
    if bits < 8 {
        let per = 8 / bits as u64;
        let byte = block[(i / per) as usize];
        let shift = (i % per) as u32 * bits;
        u64::from((byte >> shift) & ((1u8 << bits) - 1))
    } else {
        let n = (bits / 8) as usize;
        let at = i as usize * n;
        block[at..at + n].iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }
}

/// Set entry `i` of `block` to `v` (which must fit the width). Returns the byte range that
/// changed, for writing it back.
pub fn set(block: &mut [u8], refcount_order: u32, i: u64, v: u64) -> std::ops::Range<usize> {
    let bits = 1u32 << refcount_order;
    if bits < 8 {
        let per = 8 / bits as u64;
        let at = (i / per) as usize;
        let shift = (i % per) as u32 * bits;
        let mask = ((1u8 << bits) - 1) << shift;
        block[at] = (block[at] & !mask) | (((v as u8) << shift) & mask);
        at..at + 1
    } else {
        let n = (bits / 8) as usize;
        let at = i as usize * n;
        let bytes = v.to_be_bytes();
        block[at..at + n].copy_from_slice(&bytes[8 - n..]);
        at..at + n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips() {
        for order in 0..=6 {
            let mut b = vec![0u8; 512];
            let n = entries_per_block(9, order);
            let max = max_refcount(order);
            for i in 0..n {
                set(&mut b, order, i, (i * 7 + 3) & max);
            }
            for i in 0..n {
                assert_eq!(get(&b, order, i), (i * 7 + 3) & max, "order {order} entry {i}");
            }
        }
        // Bit 0 is the least significant bit for sub-byte widths.
        let mut b = [0u8; 1];
        set(&mut b, 0, 0, 1);
        assert_eq!(b[0], 1);
        set(&mut b, 1, 3, 2);
        assert_eq!(b[0], 0b1000_0001);
        let mut w = [0u8; 4];
        set(&mut w, 4, 1, 0x1234);
        assert_eq!(w, [0, 0, 0x12, 0x34]);
    }
}
