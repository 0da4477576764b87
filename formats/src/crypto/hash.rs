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
        let iterations = iterations.max(1);
        match self {
            HashAlg::Sha1 => fast::pbkdf2::<fast::Sha1>(password, salt, iterations, out),
            HashAlg::Sha224 => fast::pbkdf2::<fast::Sha224>(password, salt, iterations, out),
            HashAlg::Sha256 => fast::pbkdf2::<fast::Sha256>(password, salt, iterations, out),
            HashAlg::Sha384 => fast::pbkdf2::<fast::Sha384>(password, salt, iterations, out),
            HashAlg::Sha512 => fast::pbkdf2::<fast::Sha512>(password, salt, iterations, out),
            _ => self.pbkdf2_generic(password, salt, iterations, out),
        }
    }

    /// PBKDF2 through the `pbkdf2` and `hmac` crates (every hash; the reference for the fast
    /// path).
    fn pbkdf2_generic(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        with_hash!(self, H => pbkdf2::pbkdf2_hmac::<H>(password, salt, iterations, out))
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

/// PBKDF2-HMAC for the SHA family straight on the compression functions: with the HMAC inner
/// and outer states computed once, each iteration is two compressions of one fixed-layout
/// block. This is the work a passphrase costs, so it matters that it runs at the hash's speed
/// (and the compression functions, not generic code, are what the dev profile optimises).
mod fast {
    use sha2::digest::generic_array::GenericArray;

    /// One SHA variant: its state, initial value, block and digest sizes, compression.
    pub(super) trait Sha {
        type State: Copy;
        const IV: Self::State;
        /// Block bytes.
        const BLOCK: usize;
        /// Digest bytes.
        const OUT: usize;
        /// Bytes of the message length at the end of the last block.
        const LEN_BYTES: usize;
        fn compress(state: &mut Self::State, block: &[u8]);
        /// The first `OUT` bytes of the big-endian state.
        fn output(state: &Self::State, out: &mut [u8]);
        /// The whole digest of `data` (for a password longer than a block).
        fn digest(data: &[u8], out: &mut [u8]);
    }

    macro_rules! sha32 {
        ($name:ident, $iv:expr, $out:expr, $hash:ty) => {
            pub(super) struct $name;
            impl Sha for $name {
                type State = [u32; 8];
                const IV: [u32; 8] = $iv;
                const BLOCK: usize = 64;
                const OUT: usize = $out;
                const LEN_BYTES: usize = 8;
                fn compress(state: &mut [u32; 8], block: &[u8]) {
                    sha2::compress256(state, std::slice::from_ref(GenericArray::from_slice(block)));
                }
                fn output(state: &[u32; 8], out: &mut [u8]) {
                    for (o, w) in out.chunks_mut(4).zip(state) {
                        o.copy_from_slice(&w.to_be_bytes()[..o.len()]);
                    }
                }
                fn digest(data: &[u8], out: &mut [u8]) {
                    use sha2::Digest;
                    out.copy_from_slice(&<$hash>::digest(data)[..out.len()]);
                }
            }
        };
    }

    macro_rules! sha64 {
        ($name:ident, $iv:expr, $out:expr, $hash:ty) => {
            pub(super) struct $name;
            impl Sha for $name {
                type State = [u64; 8];
                const IV: [u64; 8] = $iv;
                const BLOCK: usize = 128;
                const OUT: usize = $out;
                const LEN_BYTES: usize = 16;
                fn compress(state: &mut [u64; 8], block: &[u8]) {
                    sha2::compress512(state, std::slice::from_ref(GenericArray::from_slice(block)));
                }
                fn output(state: &[u64; 8], out: &mut [u8]) {
                    for (o, w) in out.chunks_mut(8).zip(state) {
                        o.copy_from_slice(&w.to_be_bytes()[..o.len()]);
                    }
                }
                fn digest(data: &[u8], out: &mut [u8]) {
                    use sha2::Digest;
                    out.copy_from_slice(&<$hash>::digest(data)[..out.len()]);
                }
            }
        };
    }

    sha32!(
        Sha256,
        [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19],
        32,
        sha2::Sha256
    );
    sha32!(
        Sha224,
        [0xc1059ed8, 0x367cd507, 0x3070dd17, 0xf70e5939, 0xffc00b31, 0x68581511, 0x64f98fa7, 0xbefa4fa4],
        28,
        sha2::Sha224
    );
    sha64!(
        Sha512,
        [
            0x6a09e667f3bcc908,
            0xbb67ae8584caa73b,
            0x3c6ef372fe94f82b,
            0xa54ff53a5f1d36f1,
            0x510e527fade682d1,
            0x9b05688c2b3e6c1f,
            0x1f83d9abfb41bd6b,
            0x5be0cd19137e2179
        ],
        64,
        sha2::Sha512
    );
    sha64!(
        Sha384,
        [
            0xcbbb9d5dc1059ed8,
            0x629a292a367cd507,
            0x9159015a3070dd17,
            0x152fecd8f70e5939,
            0x67332667ffc00b31,
            0x8eb44a8768581511,
            0xdb0c2e0d64f98fa7,
            0x47b5481dbefa4fa4
        ],
        48,
        sha2::Sha384
    );

    pub(super) struct Sha1;
    impl Sha for Sha1 {
        type State = [u32; 5];
        const IV: [u32; 5] = [0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476, 0xc3d2e1f0];
        const BLOCK: usize = 64;
        const OUT: usize = 20;
        const LEN_BYTES: usize = 8;
        fn compress(state: &mut [u32; 5], block: &[u8]) {
            sha1::compress(state, std::slice::from_ref(GenericArray::from_slice(block)));
        }
        fn output(state: &[u32; 5], out: &mut [u8]) {
            for (o, w) in out.chunks_mut(4).zip(state) {
                o.copy_from_slice(&w.to_be_bytes()[..o.len()]);
            }
        }
        fn digest(data: &[u8], out: &mut [u8]) {
            use sha1::Digest;
            out.copy_from_slice(&sha1::Sha1::digest(data)[..out.len()]);
        }
    }

    /// Run the compression over `data` (whole blocks) from `state`.
    fn absorb<H: Sha>(state: &mut H::State, data: &[u8]) {
        for b in data.chunks_exact(H::BLOCK) {
            H::compress(state, b);
        }
    }

    /// Finish a hash whose state has absorbed `done` bytes (whole blocks) with the `tail`
    /// bytes left (shorter than two blocks' room), into `out` (`OUT` bytes).
    fn finish<H: Sha>(mut state: H::State, done: usize, tail: &[u8], out: &mut [u8]) {
        let mut buf = [0u8; 256];
        let total = done + tail.len();
        let padded = (tail.len() + 1 + H::LEN_BYTES).next_multiple_of(H::BLOCK);
        buf[..tail.len()].copy_from_slice(tail);
        buf[tail.len()] = 0x80;
        buf[padded - 8..padded].copy_from_slice(&((total as u64) * 8).to_be_bytes());
        absorb::<H>(&mut state, &buf[..padded]);
        H::output(&state, out);
    }

    pub(super) fn pbkdf2<H: Sha>(password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        // HMAC key: the password, hashed when longer than a block, zero padded.
        let mut key = [0u8; 128];
        if password.len() > H::BLOCK {
            H::digest(password, &mut key[..H::OUT]);
        } else {
            key[..password.len()].copy_from_slice(password);
        }
        let mut pad = [0u8; 128];
        let (mut istate, mut ostate) = (H::IV, H::IV);
        for (p, k) in pad.iter_mut().zip(&key[..H::BLOCK]) {
            *p = k ^ 0x36;
        }
        H::compress(&mut istate, &pad[..H::BLOCK]);
        for (p, k) in pad.iter_mut().zip(&key[..H::BLOCK]) {
            *p = k ^ 0x5c;
        }
        H::compress(&mut ostate, &pad[..H::BLOCK]);
        key.fill(0);
        pad.fill(0);

        // One block holds a digest as the whole message after the key block: the digest, the
        // 0x80 byte, zeroes, the bit length of key block plus digest.
        let mut block = [0u8; 128];
        block[H::OUT] = 0x80;
        block[H::BLOCK - 8..H::BLOCK].copy_from_slice(&(((H::BLOCK + H::OUT) as u64) * 8).to_be_bytes());
        let block = &mut block[..H::BLOCK];
        let mut u = [0u8; 64];
        let mut t = [0u8; 64];
        for (i, chunk) in out.chunks_mut(H::OUT).enumerate() {
            // U1 = HMAC(salt || INT(i + 1)): the salt has any length, so hash it in full.
            let mut st = istate;
            let mut msg = salt.chunks_exact(H::BLOCK);
            for b in msg.by_ref() {
                H::compress(&mut st, b);
            }
            let rest = msg.remainder();
            let mut tail = [0u8; 132];
            tail[..rest.len()].copy_from_slice(rest);
            tail[rest.len()..rest.len() + 4].copy_from_slice(&(i as u32 + 1).to_be_bytes());
            let done = H::BLOCK + (salt.len() - rest.len());
            finish::<H>(st, done, &tail[..rest.len() + 4], &mut block[..H::OUT]);
            let mut st = ostate;
            H::compress(&mut st, block);
            H::output(&st, &mut u[..H::OUT]);
            t[..H::OUT].copy_from_slice(&u[..H::OUT]);
            for _ in 1..iterations {
                block[..H::OUT].copy_from_slice(&u[..H::OUT]);
                let mut st = istate;
                H::compress(&mut st, block);
                H::output(&st, &mut block[..H::OUT]);
                let mut st = ostate;
                H::compress(&mut st, block);
                H::output(&st, &mut u[..H::OUT]);
                for (a, b) in t.iter_mut().zip(&u[..H::OUT]) {
                    *a ^= b;
                }
            }
            chunk.copy_from_slice(&t[..chunk.len()]);
        }
        u.fill(0);
        t.fill(0);
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

    /// The fast path agrees with the `pbkdf2` crate for every SHA, over password lengths
    /// around the block size, salts of any length, multi-block outputs.
    #[test]
    fn fast_pbkdf2_matches_the_generic_one() {
        for alg in [HashAlg::Sha1, HashAlg::Sha224, HashAlg::Sha256, HashAlg::Sha384, HashAlg::Sha512] {
            for pw_len in [0usize, 3, 63, 64, 65, 127, 128, 129, 300] {
                let pw: Vec<u8> = (0..pw_len).map(|i| (i * 13) as u8).collect();
                for salt_len in [0usize, 32, 55, 60, 64, 120, 200] {
                    let salt: Vec<u8> = (0..salt_len).map(|i| (i * 7 + 1) as u8).collect();
                    for (iters, len) in [(1u32, 20usize), (3, 64), (17, 100)] {
                        let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
                        alg.pbkdf2(&pw, &salt, iters, &mut a);
                        alg.pbkdf2_generic(&pw, &salt, iters, &mut b);
                        assert_eq!(a, b, "{alg:?} pw {pw_len} salt {salt_len} iters {iters} len {len}");
                    }
                }
            }
        }
    }

    #[test]
    fn iteration_measure_has_a_floor() {
        assert!(HashAlg::Sha256.pbkdf2_iterations(32, 0) >= 1000);
        assert!(HashAlg::Sha1.pbkdf2_iterations(20, 10) >= 1000);
    }
}
