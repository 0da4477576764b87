//! Compressed clusters: raw deflate (zlib without header, as QEMU writes it) and zstd.
//! Decompression stops once a cluster of output is produced (the compressed data may be
//! followed by the sector's padding or another cluster's data) and fails cleanly on corrupt
//! input or input that produces less than a cluster.
//!
//! Each thread keeps its (de)compression contexts and resets them between clusters: creating
//! a zstd context per cluster (hundreds of KiB of tables to allocate and fault in) cost more
//! than compressing a 64 KiB cluster of incompressible data. A reset context produces the
//! same bytes as a fresh one.

use std::cell::RefCell;

use crate::qcow2::error::Qcow2Error;

thread_local! {
    static DEFLATE: RefCell<Option<flate2::Compress>> = const { RefCell::new(None) };
    static INFLATE: RefCell<Option<flate2::Decompress>> = const { RefCell::new(None) };
    static ZSTD_C: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static ZSTD_D: RefCell<Option<zstd::stream::raw::Decoder<'static>>> = const { RefCell::new(None) };
}

/// Compression types of the header field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate.
    Zlib,
    /// Zstandard.
    Zstd,
}

impl CompressionType {
    /// From the header byte.
    pub fn from_header(v: u8) -> CompressionType {
        if v == 1 {
            CompressionType::Zstd
        } else {
            CompressionType::Zlib
        }
    }

    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

fn corrupt(what: &str) -> Qcow2Error {
    Qcow2Error::Corrupt(format!("Failed to decompress cluster: {what}"))
}

/// Decompress `input` into exactly `out.len()` bytes.
pub fn decompress(t: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), Qcow2Error> {
    match t {
        CompressionType::Zlib => INFLATE.with_borrow_mut(|slot| {
            let d = slot.get_or_insert_with(|| flate2::Decompress::new(false));
            d.reset(false);
            match d.decompress(input, out, flate2::FlushDecompress::Finish) {
                Ok(_) if d.total_out() as usize == out.len() => Ok(()),
                Ok(_) => Err(corrupt("short output")),
                Err(e) => Err(corrupt(&e.to_string())),
            }
        }),
        CompressionType::Zstd => ZSTD_D.with_borrow_mut(|slot| {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let d = match slot {
                Some(d) => d,
                None => slot.insert(Decoder::new().map_err(|e| corrupt(&e.to_string()))?),
            };
            d.reinit().map_err(|e| corrupt(&e.to_string()))?;
            let mut inb = InBuffer::around(input);
            let mut outb = OutBuffer::around(out);
            loop {
                let before = (inb.pos(), outb.pos());
                let hint = d.run(&mut inb, &mut outb).map_err(|e| corrupt(&e.to_string()))?;
                if outb.pos() == outb.capacity() {
                    return Ok(());
                }
                if hint == 0 || (inb.pos(), outb.pos()) == before {
                    return Err(corrupt("short output"));
                }
            }
        }),
    }
}

/// Compress a cluster; `None` when the result would not be smaller than the input (the
/// cluster is then written uncompressed, as QEMU does). The output buffer is one byte short
/// of the input, so data that does not shrink fails early instead of being compressed whole.
pub fn compress(t: CompressionType, input: &[u8]) -> Option<Vec<u8>> {
    let limit = input.len().checked_sub(1)?;
    let mut out = Vec::with_capacity(limit);
    match t {
        CompressionType::Zlib => DEFLATE.with_borrow_mut(|slot| {
            let c = slot.get_or_insert_with(|| flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12));
            c.reset();
            match c.compress_vec(input, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => Some(()),
                _ => None,
            }
        })?,
        CompressionType::Zstd => ZSTD_C.with_borrow_mut(|slot| {
            let c = match slot {
                Some(c) => c,
                None => slot.insert(zstd::bulk::Compressor::new(0).ok()?),
            };
            c.compress_to_buffer(input, &mut out).ok().map(|_| ())
        })?,
    };
    (out.len() <= limit).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let mut data = vec![0u8; 65536];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 100) as u8;
        }
        for t in [CompressionType::Zlib, CompressionType::Zstd] {
            let mut c = compress(t, &data).unwrap();
            c.extend_from_slice(&[0xaa; 700]); // trailing bytes of the last sector
            let mut out = vec![0u8; 65536];
            decompress(t, &c, &mut out).unwrap();
            assert_eq!(out, data);
            assert!(decompress(t, &c[..c.len() / 3], &mut out).is_err());
            assert!(decompress(t, &[0xff; 100], &mut out).is_err());
        }
        let random: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        assert!(
            compress(CompressionType::Zlib, &random).is_none() || compress(CompressionType::Zlib, &random).unwrap().len() < 4096
        );
    }
}
