//! Fuzz entry points for the qcow2 parsers: the header and its extensions (the encryption
//! header extension checked too), L1/L2 entries, refcount blocks, the snapshot table, the
//! bitmap directory and bitmap tables, and compressed cluster data. Each takes arbitrary bytes
//! and must return (an error is fine) without panicking, hanging or allocating more than the
//! input bounds.
//!
//! They are driven by the cargo-fuzz targets in `fuzz/` (nightly, `cargo fuzz run NAME`) and,
//! on every test run, by a seeded mutation loop over valid seeds below.

use crate::qcow2::bitmap::{self, BitmapsExt};
use crate::qcow2::compress::{self, CompressionType};
use crate::qcow2::entry::{self, Layout};
use crate::qcow2::header::Qcow2Header;
use crate::qcow2::refcount;
use crate::qcow2::snapshot::{self, Qcow2Snapshot};

fn be64(d: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&d[i..i + 8]);
    u64::from_be_bytes(a)
}

/// The header, its extensions and the backing file name (the first cluster).
pub fn header(data: &[u8]) {
    // The file size comes from the input too, so bounds checks see every kind of value.
    let fsize = data.get(..8).map_or(0, |b| be64(b, 0) >> 8);
    if let Ok(h) = Qcow2Header::parse(data, fsize) {
        // What parses must serialise (or refuse cleanly) and read back the same.
        if let Ok(b) = h.serialize() {
            let _ = Qcow2Header::parse(&b, fsize);
        }
        let _ = h.cluster_size();
        let _ = h.l2_entries();
        // The encryption header extension (FDE): checked against the header and file size.
        let _ = crate::qcow2::encrypt::parse_fde(&h, fsize);
    }
}

/// L1 and L2 entries under every layout: 8 bytes of entry, 8 of bitmap, then table words.
pub fn table_entries(data: &[u8]) {
    for cluster_bits in [9u32, 12, 16, 21] {
        for extended_l2 in [false, true] {
            let layout = Layout { cluster_bits, extended_l2, data_file: false };
            for w in data.chunks_exact(16) {
                let (e, b) = (be64(w, 0), be64(w, 8));
                let _ = entry::l1_l2_offset(e, cluster_bits);
                for sc in [0u32, 1, 31] {
                    let _ = layout.decode(e, b, sc);
                }
            }
        }
    }
}

/// A refcount block read with every refcount width.
pub fn refcount_block(data: &[u8]) {
    let mut block = data.to_vec();
    for order in 0..=6u32 {
        let n = (block.len() as u64 * 8) >> order;
        for i in 0..n.min(4096) {
            let v = refcount::get(&block, order, i);
            refcount::set(&mut block, order, i, v);
        }
        let _ = refcount::max_refcount(order);
    }
}

/// A snapshot table of up to 64 entries.
pub fn snapshot_table(data: &[u8]) {
    let mut at = 0;
    for i in 0..64 {
        let Some(rest) = data.get(at..) else { break };
        match Qcow2Snapshot::parse(rest, i) {
            Ok((sn, len)) => {
                let _ = snapshot::check_l1(&sn, 65536, 1 << 30);
                let mut out = Vec::new();
                let _ = sn.serialize(&mut out);
                at += len;
            }
            Err(_) => break,
        }
    }
}

/// The bitmaps extension (24 bytes), then a bitmap directory, then bitmap table entries.
pub fn bitmap_directory(data: &[u8]) {
    let Some(ext) = data.get(..24) else { return };
    let n = BitmapsExt::parse(ext).map_or(1, |x| x.nb_bitmaps.min(256));
    if let Ok(list) = bitmap::parse_directory(&data[24..], n) {
        for e in &list {
            let _ = bitmap::check_entry(e, 1 << 30, 65536, 1 << 30);
            let mut out = Vec::new();
            e.serialize(&mut out);
            let _ = e.info_json();
        }
    }
    for w in data[24..].chunks_exact(8) {
        let _ = bitmap::decode_table_entry(be64(w, 0), 65536);
    }
}

/// Compressed cluster data, inflated into clusters of 512 bytes to 64 KiB.
pub fn compressed_cluster(data: &[u8]) {
    for t in [CompressionType::Zlib, CompressionType::Zstd] {
        for cs in [512usize, 65536] {
            let mut out = vec![0u8; cs];
            let _ = compress::decompress(t, data, &mut out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mutate(seed: &[u8], rounds: usize, target: fn(&[u8])) {
        basalt_engine::fuzzing::mutate(seed, rounds, target)
    }

    fn header_seed() -> Vec<u8> {
        // The sample header with snapshots and a bitmaps extension too.
        let mut h = crate::qcow2::header::tests::sample();
        h.nb_snapshots = 1;
        h.snapshots_offset = 0x40000;
        h.autoclear = 1;
        h.extensions.push(crate::qcow2::header::Extension {
            kind: bitmap::EXT_BITMAPS,
            data: BitmapsExt { nb_bitmaps: 1, directory_size: 32, directory_offset: 0x50000 }.serialize(),
        });
        h.serialize().expect("seed serialises")
    }

    #[test]
    fn header_survives_mutation() {
        mutate(&header_seed(), 20_000, header);
    }

    #[test]
    fn encrypted_header_survives_mutation() {
        // crypt_method 2 with its full disk encryption header extension.
        let mut h = Qcow2Header::parse(&header_seed(), 1 << 40).expect("seed parses");
        h.crypt_method = crate::qcow2::encrypt::CRYPT_LUKS;
        let mut fde = 0x60000u64.to_be_bytes().to_vec();
        fde.extend_from_slice(&2_068_480u64.to_be_bytes());
        h.extensions.insert(0, crate::qcow2::header::Extension { kind: crate::qcow2::encrypt::EXT_CRYPTO, data: fde });
        let b = h.serialize().expect("seed serialises");
        assert!(crate::qcow2::encrypt::parse_fde(&Qcow2Header::parse(&b, 1 << 40).unwrap(), 1 << 40).unwrap().is_some());
        mutate(&b, 10_000, header);
    }

    #[test]
    fn tables_and_refcounts_survive_mutation() {
        let seed: Vec<u8> = [0x8000_0000_0005_0000u64, 0xffff_ffff, 0x4000_0000_0001_2345, 1, 0x0005_0000, 0]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        mutate(&seed, 5_000, table_entries);
        mutate(&seed, 2_000, refcount_block);
    }

    #[test]
    fn snapshot_table_survives_mutation() {
        let sn = Qcow2Snapshot {
            l1_table_offset: 0x70000,
            l1_size: 1,
            id: "1".into(),
            name: "s1".into(),
            date_sec: 1,
            date_nsec: 2,
            vm_clock_nsec: 3,
            vm_state_size: 4,
            disk_size: Some(1 << 20),
            icount: None,
            unknown_extra: vec![],
        };
        let seed = snapshot::serialize_table(&[sn.clone(), sn]).expect("seed");
        mutate(&seed, 20_000, snapshot_table);
    }

    #[test]
    fn bitmap_directory_survives_mutation() {
        let e = bitmap::BitmapEntry {
            table_offset: 0xd0000,
            table_size: 1,
            flags: bitmap::FLAG_AUTO,
            granularity_bits: 16,
            name: "b1".into(),
            extra: vec![],
        };
        let mut seed = BitmapsExt { nb_bitmaps: 2, directory_size: 64, directory_offset: 0xf0000 }.serialize();
        e.serialize(&mut seed);
        e.serialize(&mut seed);
        seed.extend_from_slice(&0xc0000u64.to_be_bytes());
        mutate(&seed, 20_000, bitmap_directory);
    }

    #[test]
    fn compressed_data_survives_mutation() {
        let cluster: Vec<u8> = (0..65536u32).map(|i| (i / 700) as u8).collect();
        for t in [CompressionType::Zlib, CompressionType::Zstd] {
            let c = compress::compress(t, &cluster).expect("compresses");
            mutate(&c, 300, compressed_cluster);
        }
    }
}
