//! Sector ciphers: a block algorithm (AES-128/192/256), a chaining mode (XTS, CBC, ECB, CTR) and
//! an IV generator (plain, plain64, ESSIV over a hash), encrypting and decrypting buffers in
//! place in 512-byte sectors numbered from a given starting sector — what LUKS and qcow2
//! encryption (QEMU's `encrypt.format=luks` and the legacy `aes`) apply to guest data.
//!
//! Guarantees: no allocation and no panic per call (a buffer that is not a whole number of
//! sectors is an error); each sector's IV depends only on its number, so any range of sectors
//! can be processed alone. The AES keys are expanded once, when the cipher is built.

use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockCipher, BlockDecrypt, BlockEncrypt, BlockSizeUser, KeyInit};
use aes::{Aes128, Aes192, Aes256};
use cbc::cipher::block_padding::NoPadding;
use cbc::cipher::{BlockDecryptMut, BlockEncryptMut, InnerIvInit, StreamCipher};
use xts_mode::Xts128;

use super::hash::HashAlg;
use super::CryptoError;

/// Bytes per encryption sector (the IV's unit), for LUKS1 and qcow2 alike.
pub const SECTOR_SIZE: usize = 512;

/// The block algorithm, by QEMU's `cipher-alg` name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CipherAlg {
    /// AES with a 128-bit key.
    Aes128,
    /// AES with a 192-bit key.
    Aes192,
    /// AES with a 256-bit key.
    Aes256,
}

impl CipherAlg {
    /// From QEMU's name (`aes-128`, `aes-192`, `aes-256`).
    pub fn parse(name: &str) -> Option<CipherAlg> {
        match name {
            "aes-128" => Some(CipherAlg::Aes128),
            "aes-192" => Some(CipherAlg::Aes192),
            "aes-256" => Some(CipherAlg::Aes256),
            _ => None,
        }
    }

    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            CipherAlg::Aes128 => "aes-128",
            CipherAlg::Aes192 => "aes-192",
            CipherAlg::Aes256 => "aes-256",
        }
    }

    /// Key length of one AES key in bytes.
    pub fn key_len(self) -> usize {
        match self {
            CipherAlg::Aes128 => 16,
            CipherAlg::Aes192 => 24,
            CipherAlg::Aes256 => 32,
        }
    }

    /// The AES variant whose key is `len` bytes.
    pub fn for_key_len(len: usize) -> Option<CipherAlg> {
        match len {
            16 => Some(CipherAlg::Aes128),
            24 => Some(CipherAlg::Aes192),
            32 => Some(CipherAlg::Aes256),
            _ => None,
        }
    }
}

/// The chaining mode, by QEMU's `cipher-mode` name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CipherMode {
    /// Electronic codebook (no IV).
    Ecb,
    /// Cipher-block chaining.
    Cbc,
    /// Counter mode (the IV is a 128-bit big-endian counter).
    Ctr,
    /// XTS (two keys; the IV is the tweak).
    Xts,
}

impl CipherMode {
    /// From QEMU's name.
    pub fn parse(name: &str) -> Option<CipherMode> {
        match name {
            "ecb" => Some(CipherMode::Ecb),
            "cbc" => Some(CipherMode::Cbc),
            "ctr" => Some(CipherMode::Ctr),
            "xts" => Some(CipherMode::Xts),
            _ => None,
        }
    }

    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Ecb => "ecb",
            CipherMode::Cbc => "cbc",
            CipherMode::Ctr => "ctr",
            CipherMode::Xts => "xts",
        }
    }

    /// Master key length for `alg` in this mode (XTS takes two keys).
    pub fn key_len(self, alg: CipherAlg) -> usize {
        match self {
            CipherMode::Xts => 2 * alg.key_len(),
            _ => alg.key_len(),
        }
    }
}

/// The IV generator, by QEMU's `ivgen-alg` name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IvGenAlg {
    /// The sector number, 32-bit little-endian (wraps at 2 TiB).
    Plain,
    /// The sector number, 64-bit little-endian.
    Plain64,
    /// The 64-bit little-endian sector number encrypted with a key hashed from the master key.
    Essiv,
}

impl IvGenAlg {
    /// From QEMU's name.
    pub fn parse(name: &str) -> Option<IvGenAlg> {
        match name {
            "plain" => Some(IvGenAlg::Plain),
            "plain64" => Some(IvGenAlg::Plain64),
            "essiv" => Some(IvGenAlg::Essiv),
            _ => None,
        }
    }

    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            IvGenAlg::Plain => "plain",
            IvGenAlg::Plain64 => "plain64",
            IvGenAlg::Essiv => "essiv",
        }
    }
}

/// An expanded AES key of any size.
#[derive(Clone)]
enum AesKey {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

/// Run `$body` with `$c` bound to the AES key inside `$key`, whatever its size.
macro_rules! with_aes {
    ($key:expr, $c:ident => $body:expr) => {
        match $key {
            AesKey::A128($c) => $body,
            AesKey::A192($c) => $body,
            AesKey::A256($c) => $body,
        }
    };
}

impl AesKey {
    fn new(key: &[u8]) -> Option<AesKey> {
        Some(match key.len() {
            16 => AesKey::A128(Aes128::new_from_slice(key).ok()?),
            24 => AesKey::A192(Aes192::new_from_slice(key).ok()?),
            32 => AesKey::A256(Aes256::new_from_slice(key).ok()?),
            _ => return None,
        })
    }

    fn encrypt_block(&self, block: &mut [u8; 16]) {
        with_aes!(self, c => c.encrypt_block(GenericArray::from_mut_slice(block)))
    }
}

/// XTS over an AES of any size. One per image: the size difference is not worth a box.
#[allow(clippy::large_enum_variant)]
enum XtsKey {
    A128(Xts128<Aes128>),
    A192(Xts128<Aes192>),
    A256(Xts128<Aes256>),
}

enum Engine {
    Ecb(AesKey),
    Cbc(AesKey),
    Ctr(AesKey),
    Xts(Box<XtsKey>),
}

#[allow(clippy::large_enum_variant)]
enum IvGen {
    Plain,
    Plain64,
    Essiv(AesKey),
}

/// A sector cipher: encrypts and decrypts whole 512-byte sectors in place.
pub struct SectorCipher {
    alg: CipherAlg,
    mode: CipherMode,
    ivgen_alg: IvGenAlg,
    ivgen_hash: Option<HashAlg>,
    engine: Engine,
    ivgen: IvGen,
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        f.debug_struct("SectorCipher")
            .field("alg", &self.alg)
            .field("mode", &self.mode)
            .field("ivgen", &self.ivgen_alg)
            .field("ivgen_hash", &self.ivgen_hash)
            .finish()
    }
}

impl SectorCipher {
    /// A cipher for `alg` in `mode` with IVs from `ivgen` (ESSIV needs `ivgen_hash`), keyed with
    /// `key` (for XTS, both keys: `2 * alg.key_len()` bytes).
    pub fn new(
        alg: CipherAlg,
        mode: CipherMode,
        ivgen_alg: IvGenAlg,
        ivgen_hash: Option<HashAlg>,
        key: &[u8],
    ) -> Result<SectorCipher, CryptoError> {
        let want = mode.key_len(alg);
        if key.len() != want {
            return Err(CryptoError::Unsupported(format!(
                "Cipher {}-{} needs a {want}-byte key, not {} bytes",
                alg.name(),
                mode.name(),
                key.len()
            )));
        }
        let bad_key = || CryptoError::Unsupported(format!("Invalid key for cipher {}", alg.name()));
        let engine = match mode {
            CipherMode::Ecb => Engine::Ecb(AesKey::new(key).ok_or_else(bad_key)?),
            CipherMode::Cbc => Engine::Cbc(AesKey::new(key).ok_or_else(bad_key)?),
            CipherMode::Ctr => Engine::Ctr(AesKey::new(key).ok_or_else(bad_key)?),
            CipherMode::Xts => {
                let (k1, k2) = key.split_at(key.len() / 2);
                let x = match (AesKey::new(k1).ok_or_else(bad_key)?, AesKey::new(k2).ok_or_else(bad_key)?) {
                    (AesKey::A128(a), AesKey::A128(b)) => XtsKey::A128(Xts128::new(a, b)),
                    (AesKey::A192(a), AesKey::A192(b)) => XtsKey::A192(Xts128::new(a, b)),
                    (AesKey::A256(a), AesKey::A256(b)) => XtsKey::A256(Xts128::new(a, b)),
                    _ => return Err(bad_key()),
                };
                Engine::Xts(Box::new(x))
            }
        };
        let ivgen = match ivgen_alg {
            IvGenAlg::Plain => IvGen::Plain,
            IvGenAlg::Plain64 => IvGen::Plain64,
            IvGenAlg::Essiv => {
                let h = ivgen_hash.ok_or_else(|| CryptoError::Unsupported("ESSIV needs an IV generator hash".into()))?;
                // The ESSIV key is the hash of the whole master key; its length picks the AES.
                let mut salt = [0u8; 64];
                let n = h.digest_len();
                h.digest_into(&[key], &mut salt);
                let k = AesKey::new(&salt[..n])
                    .ok_or_else(|| CryptoError::Unsupported(format!("No AES cipher with key size {n} available")));
                salt.fill(0);
                IvGen::Essiv(k?)
            }
        };
        Ok(SectorCipher { alg, mode, ivgen_alg, ivgen_hash: ivgen_hash.filter(|_| ivgen_alg == IvGenAlg::Essiv), engine, ivgen })
    }

    /// The legacy qcow/qcow2 `aes` encryption: AES-128-CBC, plain64 IVs, the key being the
    /// password's first 16 bytes, zero padded when shorter.
    pub fn qcow_aes(password: &[u8]) -> SectorCipher {
        let mut key = [0u8; 16];
        let n = password.len().min(16);
        key[..n].copy_from_slice(&password[..n]);
        let c = SectorCipher {
            alg: CipherAlg::Aes128,
            mode: CipherMode::Cbc,
            ivgen_alg: IvGenAlg::Plain64,
            ivgen_hash: None,
            engine: Engine::Cbc(AesKey::A128(Aes128::new(&key.into()))),
            ivgen: IvGen::Plain64,
        };
        key.fill(0);
        c
    }

    /// The algorithm.
    pub fn alg(&self) -> CipherAlg {
        self.alg
    }

    /// The chaining mode.
    pub fn mode(&self) -> CipherMode {
        self.mode
    }

    /// The IV generator and, for ESSIV, its hash.
    pub fn ivgen(&self) -> (IvGenAlg, Option<HashAlg>) {
        (self.ivgen_alg, self.ivgen_hash)
    }

    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match &self.ivgen {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv(k) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                k.encrypt_block(&mut iv);
            }
        }
        iv
    }

    fn check(buf: &[u8]) -> Result<(), CryptoError> {
        if !buf.len().is_multiple_of(SECTOR_SIZE) {
            return Err(CryptoError::Unaligned(buf.len()));
        }
        Ok(())
    }

    /// Encrypt `buf` (whole sectors) in place; its first sector is number `sector`.
    pub fn encrypt(&self, sector: u64, buf: &mut [u8]) -> Result<(), CryptoError> {
        Self::check(buf)?;
        for (i, s) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
            let iv = self.iv(sector.wrapping_add(i as u64));
            match &self.engine {
                Engine::Ecb(k) => with_aes!(k, c => ecb(c, s, true)),
                Engine::Cbc(k) => with_aes!(k, c => cbc_encrypt(c, &iv, s)),
                Engine::Ctr(k) => with_aes!(k, c => ctr_apply(c, &iv, s)),
                Engine::Xts(x) => match &**x {
                    XtsKey::A128(x) => x.encrypt_sector(s, iv),
                    XtsKey::A192(x) => x.encrypt_sector(s, iv),
                    XtsKey::A256(x) => x.encrypt_sector(s, iv),
                },
            }
        }
        Ok(())
    }

    /// Decrypt `buf` (whole sectors) in place; its first sector is number `sector`.
    pub fn decrypt(&self, sector: u64, buf: &mut [u8]) -> Result<(), CryptoError> {
        Self::check(buf)?;
        for (i, s) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
            let iv = self.iv(sector.wrapping_add(i as u64));
            match &self.engine {
                Engine::Ecb(k) => with_aes!(k, c => ecb(c, s, false)),
                Engine::Cbc(k) => with_aes!(k, c => cbc_decrypt(c, &iv, s)),
                Engine::Ctr(k) => with_aes!(k, c => ctr_apply(c, &iv, s)),
                Engine::Xts(x) => match &**x {
                    XtsKey::A128(x) => x.decrypt_sector(s, iv),
                    XtsKey::A192(x) => x.decrypt_sector(s, iv),
                    XtsKey::A256(x) => x.decrypt_sector(s, iv),
                },
            }
        }
        Ok(())
    }
}

/// The block-cipher bounds the modes need.
trait Block16: BlockCipher + BlockEncrypt + BlockDecrypt + BlockSizeUser<BlockSize = aes::cipher::consts::U16> + Clone {}
impl<T: BlockCipher + BlockEncrypt + BlockDecrypt + BlockSizeUser<BlockSize = aes::cipher::consts::U16> + Clone> Block16 for T {}

fn ecb<C: Block16>(c: &C, s: &mut [u8], enc: bool) {
    for b in s.chunks_exact_mut(16) {
        let b = GenericArray::from_mut_slice(b);
        if enc {
            c.encrypt_block(b);
        } else {
            c.decrypt_block(b);
        }
    }
}

fn cbc_encrypt<C: Block16>(c: &C, iv: &[u8; 16], s: &mut [u8]) {
    let len = s.len();
    // Cannot fail: the length is a whole number of blocks and no padding is asked for.
    let _ = cbc::Encryptor::<C>::inner_iv_init(c.clone(), iv.into()).encrypt_padded_mut::<NoPadding>(s, len);
}

fn cbc_decrypt<C: Block16>(c: &C, iv: &[u8; 16], s: &mut [u8]) {
    // Cannot fail: the length is a whole number of blocks and no padding is asked for.
    let _ = cbc::Decryptor::<C>::inner_iv_init(c.clone(), iv.into()).decrypt_padded_mut::<NoPadding>(s);
}

fn ctr_apply<C: Block16>(c: &C, iv: &[u8; 16], s: &mut [u8]) {
    let core = ctr::CtrCore::<C, ctr::flavors::Ctr128BE>::inner_iv_init(c.clone(), iv.into());
    ctr::cipher::StreamCipherCoreWrapper::from_core(core).apply_keystream(s);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xor16(a: &mut [u8], b: &[u8; 16]) {
        for (x, y) in a.iter_mut().zip(b) {
            *x ^= y;
        }
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn xts(key: &str) -> SectorCipher {
        let k = unhex(key);
        let alg = CipherAlg::for_key_len(k.len() / 2).unwrap();
        SectorCipher::new(alg, CipherMode::Xts, IvGenAlg::Plain64, None, &k).unwrap()
    }

    /// IEEE 1619-2007 XTS-AES vectors 1, 2 (first 32 bytes of a sector: XTS blocks are
    /// independent) and 4 (a whole 512-byte data unit).
    #[test]
    fn xts_ieee1619() {
        let mut buf = vec![0u8; 512];
        xts(&"00".repeat(32)).encrypt(0, &mut buf).unwrap();
        assert_eq!(buf[..32], unhex("917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e"));

        let mut buf = vec![0x44u8; 512];
        xts(&format!("{}{}", "11".repeat(16), "22".repeat(16))).encrypt(0x3333333333, &mut buf).unwrap();
        assert_eq!(buf[..32], unhex("c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0"));

        let c = xts("2718281828459045235360287471352631415926535897932384626433832795");
        let plain: Vec<u8> = (0..512).map(|i| i as u8).collect();
        let mut buf = plain.clone();
        c.encrypt(0, &mut buf).unwrap();
        let want = concat!(
            "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89cc78cf7f5e543445f8333d8fa7f560000",
            "05279fa5d8b5e4ad40e736ddb4d35412328063fd2aab53e5ea1e0a9f332500a5df9487d07a5c92cc512c8866c7e860ce",
            "93fdf166a24912b422976146ae20ce846bb7dc9ba94a767aaef20c0d61ad02655ea92dc4c4e41a8952c651d33174be51",
            "a10c421110e6d81588ede82103a252d8a750e8768defffed9122810aaeb99f9172af82b604dc4b8e51bcb08235a6f434",
            "1332e4ca60482a4ba1a03b3e65008fc5da76b70bf1690db4eae29c5f1badd03c5ccf2a55d705ddcd86d449511ceb7ec3",
            "0bf12b1fa35b913f9f747a8afd1b130e94bff94effd01a91735ca1726acd0b197c4e5b03393697e126826fb6bbde8ecc",
            "1e08298516e2c9ed03ff3c1b7860f6de76d4cecd94c8119855ef5297ca67e9f3e7ff72b1e99785ca0a7e7720c5b36dc6",
            "d72cac9574c8cbbc2f801e23e56fd344b07f22154beba0f08ce8891e643ed995c94d9a69c9f1b5f499027a78572aeebd",
            "74d20cc39881c213ee770b1010e4bea718846977ae119f7a023ab58cca0ad752afe656bb3c17256a9f6e9bf19fdd5a38",
            "fc82bbe872c5539edb609ef4f79c203ebb140f2e583cb2ad15b4aa5b655016a8449277dbd477ef2c8d6c017db738b18d",
            "eb4a427d1923ce3ff262735779a418f20a282df920147beabe421ee5319d0568",
        );
        assert_eq!(buf, unhex(want));
        c.decrypt(0, &mut buf).unwrap();
        assert_eq!(buf, plain);
    }

    /// Ciphertext QEMU 10 wrote to a qcow2 image with `encrypt.format=aes`: sector 0 of 0x5a
    /// bytes with the password `abc`, and sector 1 of 0x5a bytes with the password
    /// `0123456789abcdefXYZ` (truncated to 16 bytes). First 32 bytes of each (CBC: the prefix of
    /// the ciphertext depends only on the prefix of the plaintext).
    #[test]
    fn qcow_aes_matches_qemu() {
        let mut buf = vec![0x5au8; 512];
        SectorCipher::qcow_aes(b"abc").encrypt(0, &mut buf).unwrap();
        assert_eq!(buf[..32], unhex("32c4466c137502b4cd25f63c700396b34015e9ff4c8afbb3a95f1170e26e58fe"));
        let c = SectorCipher::qcow_aes(b"0123456789abcdefXYZ");
        let mut buf = vec![0x5au8; 1024];
        c.encrypt(0, &mut buf).unwrap();
        assert_eq!(buf[512..544], unhex("3c9261506c8f09589244478b27cf896b724e0b68a532e869677116b87298a95e"));
        c.decrypt(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0x5a));
    }

    #[test]
    fn every_combination_round_trips_and_differs_by_sector() {
        let plain: Vec<u8> = (0..2048u32).map(|i| (i * 7 + 3) as u8).collect();
        for alg in [CipherAlg::Aes128, CipherAlg::Aes192, CipherAlg::Aes256] {
            for mode in [CipherMode::Ecb, CipherMode::Cbc, CipherMode::Ctr, CipherMode::Xts] {
                for (iv, h) in [(IvGenAlg::Plain, None), (IvGenAlg::Plain64, None), (IvGenAlg::Essiv, Some(HashAlg::Sha256))] {
                    let key: Vec<u8> = (0..mode.key_len(alg)).map(|i| i as u8 ^ 0x5c).collect();
                    let c = SectorCipher::new(alg, mode, iv, h, &key).unwrap();
                    let mut a = plain.clone();
                    c.encrypt(7, &mut a).unwrap();
                    assert_ne!(a, plain);
                    // Sector by sector gives the same as all at once.
                    let mut b = plain.clone();
                    for (i, s) in b.chunks_exact_mut(512).enumerate() {
                        c.encrypt(7 + i as u64, s).unwrap();
                    }
                    assert_eq!(a, b);
                    if mode != CipherMode::Ecb {
                        let mut d = plain[..512].to_vec();
                        c.encrypt(8, &mut d).unwrap();
                        assert_ne!(d, a[..512], "{alg:?} {mode:?} {iv:?}: IV must depend on the sector");
                    }
                    c.decrypt(7, &mut a).unwrap();
                    assert_eq!(a, plain, "{alg:?} {mode:?} {iv:?}");
                }
            }
        }
    }

    #[test]
    fn cbc_essiv_matches_the_definition() {
        // CBC-ESSIV:sha256 with AES-128: IV = AES-256(sha256(key), le64(sector)).
        let key = [0x42u8; 16];
        let c = SectorCipher::new(CipherAlg::Aes128, CipherMode::Cbc, IvGenAlg::Essiv, Some(HashAlg::Sha256), &key).unwrap();
        let mut salt = [0u8; 32];
        HashAlg::Sha256.digest_into(&[&key], &mut salt);
        let mut iv = [0u8; 16];
        iv[..8].copy_from_slice(&5u64.to_le_bytes());
        Aes256::new(&salt.into()).encrypt_block(GenericArray::from_mut_slice(&mut iv));
        let mut want = [0u8; 16];
        want.copy_from_slice(&[1u8; 16]);
        xor16(&mut want, &iv);
        Aes128::new(&key.into()).encrypt_block(GenericArray::from_mut_slice(&mut want));
        let mut buf = vec![1u8; 512];
        c.encrypt(5, &mut buf).unwrap();
        assert_eq!(buf[..16], want);
    }

    #[test]
    fn errors() {
        let c = SectorCipher::qcow_aes(b"x");
        assert!(matches!(c.encrypt(0, &mut [0u8; 100]), Err(CryptoError::Unaligned(100))));
        let e = SectorCipher::new(CipherAlg::Aes128, CipherMode::Xts, IvGenAlg::Plain64, None, &[0u8; 16]).unwrap_err();
        assert!(e.to_string().contains("32-byte key"));
        let e =
            SectorCipher::new(CipherAlg::Aes128, CipherMode::Cbc, IvGenAlg::Essiv, Some(HashAlg::Sha1), &[0u8; 16]).unwrap_err();
        assert_eq!(e.to_string(), "No AES cipher with key size 20 available");
    }
}
