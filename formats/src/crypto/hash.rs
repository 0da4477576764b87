//! The hash algorithms LUKS and QEMU name (`hash-alg`, `ivgen-hash-alg`): one enum over the
//! RustCrypto digests, with a plain digest, PBKDF2-HMAC and a timing measure of PBKDF2 that
//! chooses iteration counts as cryptsetup and QEMU do.
//!
//! No allocation on any of these paths; output buffers belong to the caller.

use std::time::{Duration, Instant};

use hmac::digest::Digest;

/// A hash algorithm, by QEMU's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashAlg {
    /// MD5 (16 bytes).
    Md5,
    /// SHA-1 (20 bytes).
    Sha1,
    /// SHA-224 (28 bytes).
    Sha224,
    /// SHA-256 (32 bytes).
    Sha256,
    /// SHA-384 (48 bytes).
    Sha384,
    /// SHA-512 (64 bytes).
    Sha512,
    /// RIPEMD-160 (20 bytes).
    Ripemd160,
}

/// Run `$body` with `$h` bound to the digest type of `$alg`.
macro_rules! with_hash {
    ($alg:expr, $h:ident => $body:expr) => {
        match $alg {
            HashAlg::Md5 => {
                type $h = md5::Md5;
                $body
            }
            HashAlg::Sha1 => {
                type $h = sha1::Sha1;
                $body
            }
            HashAlg::Sha224 => {
                type $h = sha2::Sha224;
                $body
            }
            HashAlg::Sha256 => {
                type $h = sha2::Sha256;
                $body
            }
            HashAlg::Sha384 => {
                type $h = sha2::Sha384;
                $body
            }
            HashAlg::Sha512 => {
                type $h = sha2::Sha512;
                $body
            }
            HashAlg::Ripemd160 => {
                type $h = ripemd::Ripemd160;
                $body
            }
        }
    };
}

/// Names as QEMU and cryptsetup write them.
const NAMES: &[(HashAlg, &str)] = &[
    (HashAlg::Md5, "md5"),
    (HashAlg::Sha1, "sha1"),
    (HashAlg::Sha224, "sha224"),
    (HashAlg::Sha256, "sha256"),
    (HashAlg::Sha384, "sha384"),
    (HashAlg::Sha512, "sha512"),
    (HashAlg::Ripemd160, "ripemd160"),
];

impl HashAlg {
    /// The algorithm named `name` (QEMU's and cryptsetup's lower-case names).
    pub fn parse(name: &str) -> Option<HashAlg> {
        NAMES.iter().find(|(_, n)| *n == name).map(|(a, _)| *a)
    }

    /// The name.
    pub fn name(self) -> &'static str {
        NAMES.iter().find(|(a, _)| *a == self).map(|(_, n)| *n).unwrap_or("?")
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        with_hash!(self, H => <H as Digest>::output_size())
    }

    /// The digest of the concatenation of `parts`, written to the first
    /// `min(out.len(), digest_len)` bytes of `out`.
    pub fn digest_into(self, parts: &[&[u8]], out: &mut [u8]) {
        with_hash!(self, H => {
            let mut h = H::new();
            for p in parts {
                h.update(p);
            }
            let d = h.finalize();
            let n = out.len().min(d.len());
            out[..n].copy_from_slice(&d[..n]);
        })
    }

    /// PBKDF2 with HMAC over this hash, filling `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        with_hash!(self, H => pbkdf2::pbkdf2_hmac::<H>(password, salt, iterations.max(1), out))
    }

    /// How many PBKDF2 iterations deriving `out_len` bytes take `iter_time_ms` milliseconds on
    /// this machine (at least 1000, the LUKS minimum; saturating at `u32::MAX`). PBKDF2 is
    /// timed on growing counts until a run is long enough to measure, then scaled.
    pub fn pbkdf2_iterations(self, out_len: usize, iter_time_ms: u64) -> u32 {
        const MIN: u64 = 1000;
        let target = Duration::from_millis(iter_time_ms.clamp(5, 100));
        let mut out = [0u8; 64];
        let out = &mut out[..out_len.clamp(1, 64)];
        let mut n: u32 = 256;
        let elapsed = loop {
            let t = Instant::now();
            self.pbkdf2(b"basalt iteration measure", &[0u8; 32], n, out);
            let e = t.elapsed();
            if e >= target || n >= 1 << 30 {
                break e;
            }
            n = n.saturating_mul(2);
        };
        let per_ms = u128::from(n) * 1_000_000 / elapsed.as_nanos().max(1);
        let iters = (per_ms * u128::from(iter_time_ms)).max(u128::from(MIN));
        u32::try_from(iters).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn pbkdf2_rfc6070_and_sha256() {
        let mut out = [0u8; 20];
        HashAlg::Sha1.pbkdf2(b"password", b"salt", 1, &mut out);
        assert_eq!(hex(&out), "0c60c80f961f0e71f3a9b524af6012062fe037a6");
        HashAlg::Sha1.pbkdf2(b"password", b"salt", 4096, &mut out);
        assert_eq!(hex(&out), "4b007901b765489abead49d926f721d065a429c1");
        let mut out = [0u8; 64];
        HashAlg::Sha256.pbkdf2(b"passwd", b"salt", 1, &mut out);
        assert_eq!(
            hex(&out),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc\
             49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783"
        );
    }

    #[test]
    fn names_lengths_digests() {
        for (a, n) in NAMES {
            assert_eq!(HashAlg::parse(n), Some(*a));
            assert_eq!(a.name(), *n);
        }
        assert_eq!(HashAlg::parse("sm3"), None);
        let lens: Vec<usize> = NAMES.iter().map(|(a, _)| a.digest_len()).collect();
        assert_eq!(lens, [16, 20, 28, 32, 48, 64, 20]);
        let mut d = [0u8; 32];
        HashAlg::Sha256.digest_into(&[b"a", b"bc"], &mut d);
        assert_eq!(hex(&d), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn iteration_measure_has_a_floor() {
        assert!(HashAlg::Sha256.pbkdf2_iterations(32, 0) >= 1000);
        assert!(HashAlg::Sha1.pbkdf2_iterations(20, 10) >= 1000);
    }
}
