//! The LUKS1 on-disk header (cryptsetup's `on-disk-format.pdf`): parsing with every field
//! checked, unlocking a key slot with a passphrase, and building a new header as QEMU lays one
//! out, for the standalone `luks` format and for qcow2's LUKS encryption.
//!
//! A LUKS area is the 592-byte header, then (from sector 8) the key material of the eight key
//! slots, then the payload. Key material offsets are in 512-byte sectors from the start of the
//! area; QEMU aligns each slot's material to 4 KiB. A slot's material is the master key split
//! into 4000 anti-forensic stripes, encrypted with the volume's cipher spec under a key derived
//! from the passphrase with PBKDF2; merging the stripes gives the master key, checked against a
//! PBKDF2 digest of it.
//!
//! Guarantees: parsing never panics and never allocates more than the header's fixed fields;
//! key material is bounded (`key_bytes` at most 64, exactly 4000 stripes, so at most 256000
//! bytes a slot); slots are checked to lie after the header, before the payload and apart from
//! each other. No I/O here: callers read the area and hand it over.

use zeroize::Zeroizing;

use super::cipher::{CipherAlg, CipherMode, IvGenAlg, SectorCipher, SECTOR_SIZE};
use super::hash::HashAlg;
use super::CryptoError;

/// The LUKS magic.
pub const LUKS_MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
/// Bytes of the LUKS1 header proper.
pub const LUKS_HEADER_LEN: usize = 592;
/// Key slots in a LUKS1 header.
pub const LUKS_SLOTS: usize = 8;
/// Anti-forensic stripes per key slot (the only value QEMU and cryptsetup write or accept).
pub const LUKS_STRIPES: u32 = 4000;
/// Length of the master key digest.
pub const LUKS_DIGEST_LEN: usize = 20;
/// Length of the salts.
pub const LUKS_SALT_LEN: usize = 32;
/// Sectors QEMU reserves for the header before the first key material (4 KiB).
const HEADER_SECTORS: u32 = 8;
/// Key material alignment in sectors (4 KiB), as QEMU writes it.
const MATERIAL_ALIGN_SECTORS: u32 = 8;
/// Fewest PBKDF2 iterations QEMU gives a key slot.
const MIN_SLOT_ITERATIONS: u32 = 1000;
const SLOT_ACTIVE: u32 = 0x00ac_71f3;
const SLOT_INACTIVE: u32 = 0x0000_dead;

fn invalid(msg: impl Into<String>) -> CryptoError {
    CryptoError::InvalidHeader(msg.into())
}

/// One key slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LuksSlot {
    /// The slot holds a key.
    pub active: bool,
    /// PBKDF2 iterations for the passphrase.
    pub iterations: u32,
    /// PBKDF2 salt for the passphrase.
    pub salt: [u8; LUKS_SALT_LEN],
    /// Start of the key material, in sectors from the start of the LUKS area.
    pub key_offset_sector: u32,
    /// Anti-forensic stripes.
    pub stripes: u32,
}

/// A parsed (and validated) LUKS1 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LuksHeader {
    /// Cipher name as stored (`aes`).
    pub cipher_name: String,
    /// Cipher mode as stored (`xts-plain64`, `cbc-essiv:sha256`).
    pub cipher_mode: String,
    /// Hash spec as stored (`sha256`).
    pub hash_spec: String,
    /// Start of the payload in sectors from the start of the LUKS area.
    pub payload_offset_sector: u32,
    /// Master key length in bytes.
    pub key_bytes: u32,
    /// PBKDF2 digest of the master key.
    pub mk_digest: [u8; LUKS_DIGEST_LEN],
    /// Salt of that digest.
    pub mk_salt: [u8; LUKS_SALT_LEN],
    /// Iterations of that digest.
    pub mk_iterations: u32,
    /// The volume UUID as stored.
    pub uuid: String,
    /// The eight key slots.
    pub slots: [LuksSlot; LUKS_SLOTS],
    /// The cipher algorithm the name and key size select.
    pub alg: CipherAlg,
    /// The chaining mode.
    pub mode: CipherMode,
    /// The IV generator.
    pub ivgen: IvGenAlg,
    /// The IV generator's hash (ESSIV).
    pub ivgen_hash: Option<HashAlg>,
    /// The hash of PBKDF2 and the anti-forensic diffuser.
    pub hash: HashAlg,
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// A NUL-terminated printable ASCII string in a fixed-size field.
fn cstr(b: &[u8], field: &str) -> Result<String, CryptoError> {
    let end = b.iter().position(|&c| c == 0).ok_or_else(|| invalid(format!("LUKS header field '{field}' is not terminated")))?;
    let s = &b[..end];
    if !s.iter().all(|c| c.is_ascii_graphic()) {
        return Err(invalid(format!("LUKS header field '{field}' is not a printable string")));
    }
    Ok(String::from_utf8_lossy(s).into_owned())
}

fn put_str(b: &mut [u8], s: &str) {
    b[..s.len()].copy_from_slice(s.as_bytes());
}

/// Parse a cipher mode string (`xts-plain64`, `cbc-essiv:sha256`, `ecb`) into the mode, the IV
/// generator and the ESSIV hash. A hash after `plain`/`plain64` is allowed and ignored (QEMU
/// writes `xts-plain64:sha1` when given an IV hash without ESSIV).
fn parse_mode(s: &str) -> Result<(CipherMode, IvGenAlg, Option<HashAlg>), CryptoError> {
    let (mode, iv) = match s.split_once('-') {
        Some((m, iv)) => (m, Some(iv)),
        None => (s, None),
    };
    let mode = CipherMode::parse(mode).ok_or_else(|| CryptoError::Unsupported(format!("Unsupported LUKS cipher mode '{s}'")))?;
    let Some(iv) = iv else {
        if mode == CipherMode::Ecb {
            return Ok((mode, IvGenAlg::Plain64, None));
        }
        return Err(invalid(format!("LUKS cipher mode '{s}' has no IV generator")));
    };
    let (ivname, ivhash) = match iv.split_once(':') {
        Some((a, h)) => (a, Some(h)),
        None => (iv, None),
    };
    let ivgen =
        IvGenAlg::parse(ivname).ok_or_else(|| CryptoError::Unsupported(format!("Unsupported LUKS IV generator '{iv}'")))?;
    let hash = match ivhash {
        Some(h) => Some(HashAlg::parse(h).ok_or_else(|| CryptoError::Unsupported(format!("Unsupported LUKS IV hash '{h}'")))?),
        None => None,
    };
    if ivgen == IvGenAlg::Essiv {
        let h = hash.ok_or_else(|| invalid(format!("LUKS cipher mode '{s}' has no ESSIV hash")))?;
        if CipherAlg::for_key_len(h.digest_len()).is_none() {
            return Err(CryptoError::Unsupported(format!("No AES cipher with key size {} available", h.digest_len())));
        }
        return Ok((mode, ivgen, Some(h)));
    }
    Ok((mode, ivgen, None))
}

/// The mode string QEMU writes.
fn mode_string(mode: CipherMode, ivgen: IvGenAlg, ivgen_hash: Option<HashAlg>) -> String {
    match ivgen_hash {
        Some(h) => format!("{}-{}:{}", mode.name(), ivgen.name(), h.name()),
        None => format!("{}-{}", mode.name(), ivgen.name()),
    }
}

/// Sectors of key material a slot takes for a `key_bytes` master key (unaligned).
fn material_sectors(key_bytes: u32) -> u32 {
    (key_bytes * LUKS_STRIPES).div_ceil(SECTOR_SIZE as u32)
}

impl LuksHeader {
    /// Parse and validate the header at the start of `buf` (at least [`LUKS_HEADER_LEN`]
    /// bytes).
    pub fn parse(buf: &[u8]) -> Result<LuksHeader, CryptoError> {
        if buf.len() < LUKS_HEADER_LEN {
            return Err(invalid(format!("LUKS header is truncated ({} of {LUKS_HEADER_LEN} bytes)", buf.len())));
        }
        if &buf[..6] != LUKS_MAGIC {
            return Err(invalid("Volume is not in LUKS format"));
        }
        let version = u16::from_be_bytes([buf[6], buf[7]]);
        if version != 1 {
            return Err(CryptoError::Unsupported(format!("LUKS version {version} is not supported")));
        }
        let cipher_name = cstr(&buf[8..40], "cipher-name")?;
        let cipher_mode = cstr(&buf[40..72], "cipher-mode")?;
        let hash_spec = cstr(&buf[72..104], "hash-spec")?;
        let payload_offset_sector = be32(buf, 104);
        let key_bytes = be32(buf, 108);
        let mut mk_digest = [0u8; LUKS_DIGEST_LEN];
        mk_digest.copy_from_slice(&buf[112..132]);
        let mut mk_salt = [0u8; LUKS_SALT_LEN];
        mk_salt.copy_from_slice(&buf[132..164]);
        let mk_iterations = be32(buf, 164);
        let uuid = cstr(&buf[168..208], "uuid")?;

        if cipher_name != "aes" {
            return Err(CryptoError::Unsupported(format!("LUKS cipher '{cipher_name}' is not supported (only aes)")));
        }
        let (mode, ivgen, ivgen_hash) = parse_mode(&cipher_mode)?;
        let hash =
            HashAlg::parse(&hash_spec).ok_or_else(|| CryptoError::Unsupported(format!("Unsupported LUKS hash '{hash_spec}'")))?;
        let per_key = if mode == CipherMode::Xts { 2 } else { 1 };
        let alg = key_bytes
            .is_multiple_of(per_key)
            .then(|| CipherAlg::for_key_len((key_bytes / per_key) as usize))
            .flatten()
            .ok_or_else(|| invalid(format!("LUKS key-bytes {key_bytes} is not valid for cipher mode '{cipher_mode}'")))?;
        if mk_iterations == 0 {
            return Err(invalid("LUKS mk-digest-iterations must not be 0"));
        }

        let mut slots: [LuksSlot; LUKS_SLOTS] = std::array::from_fn(|_| LuksSlot {
            active: false,
            iterations: 0,
            salt: [0; LUKS_SALT_LEN],
            key_offset_sector: 0,
            stripes: 0,
        });
        for (i, slot) in slots.iter_mut().enumerate() {
            let b = &buf[208 + i * 48..208 + (i + 1) * 48];
            let state = be32(b, 0);
            slot.active = match state {
                SLOT_ACTIVE => true,
                SLOT_INACTIVE => false,
                s => return Err(invalid(format!("LUKS key slot {i} has an invalid state 0x{s:08x}"))),
            };
            slot.iterations = be32(b, 4);
            slot.salt.copy_from_slice(&b[8..40]);
            slot.key_offset_sector = be32(b, 40);
            slot.stripes = be32(b, 44);
            if slot.stripes != LUKS_STRIPES {
                return Err(invalid(format!("LUKS key slot {i} is corrupted (stripes {} != {LUKS_STRIPES})", slot.stripes)));
            }
            if slot.active && slot.iterations == 0 {
                return Err(invalid(format!("LUKS key slot {i} has 0 iterations")));
            }
            let header_sectors = (LUKS_HEADER_LEN as u32).div_ceil(SECTOR_SIZE as u32);
            if slot.key_offset_sector < header_sectors {
                return Err(invalid(format!("LUKS key slot {i} key-material-offset overlaps the LUKS header")));
            }
            let end = u64::from(slot.key_offset_sector) + u64::from(material_sectors(key_bytes));
            if end > u64::from(payload_offset_sector) {
                return Err(invalid(format!(
                    "LUKS key slot {i} key material (sectors {}..{end}) overlaps the payload (sector {payload_offset_sector})",
                    slot.key_offset_sector
                )));
            }
        }
        let len = u64::from(material_sectors(key_bytes));
        for i in 0..LUKS_SLOTS {
            for j in i + 1..LUKS_SLOTS {
                let (a, b) = (u64::from(slots[i].key_offset_sector), u64::from(slots[j].key_offset_sector));
                if a < b + len && b < a + len {
                    return Err(invalid(format!("LUKS key slots {i} and {j} overlap")));
                }
            }
        }
        Ok(LuksHeader {
            cipher_name,
            cipher_mode,
            hash_spec,
            payload_offset_sector,
            key_bytes,
            mk_digest,
            mk_salt,
            mk_iterations,
            uuid,
            slots,
            alg,
            mode,
            ivgen,
            ivgen_hash,
            hash,
        })
    }

    /// The payload's byte offset from the start of the LUKS area.
    pub fn payload_offset(&self) -> u64 {
        u64::from(self.payload_offset_sector) * SECTOR_SIZE as u64
    }

    /// Bytes of one slot's key material (`key_bytes * stripes`).
    pub fn material_len(&self) -> usize {
        self.key_bytes as usize * LUKS_STRIPES as usize
    }

    /// Where slot `i`'s key material lies in the LUKS area, as a byte offset and a length
    /// rounded up to whole sectors; `None` for an inactive slot.
    pub fn material_range(&self, i: usize) -> Option<(u64, usize)> {
        let s = self.slots.get(i).filter(|s| s.active)?;
        Some((u64::from(s.key_offset_sector) * SECTOR_SIZE as u64, material_sectors(self.key_bytes) as usize * SECTOR_SIZE))
    }

    /// Bytes of the LUKS area that unlocking reads: up to the end of the last active slot's
    /// key material (at least the header).
    pub fn unlock_area_len(&self) -> u64 {
        (0..LUKS_SLOTS)
            .filter_map(|i| self.material_range(i))
            .map(|(o, l)| o + l as u64)
            .max()
            .unwrap_or(LUKS_HEADER_LEN as u64)
            .max(LUKS_HEADER_LEN as u64)
    }

    /// Check that everything the header locates lies within an area of `len` bytes (the file,
    /// or qcow2's encryption header); `payload` also requires the payload offset to.
    pub fn check_area(&self, len: u64, payload: bool) -> Result<(), CryptoError> {
        if payload && self.payload_offset() > len {
            return Err(invalid(format!(
                "LUKS payload-offset {} is beyond the end of the image ({len} bytes)",
                self.payload_offset()
            )));
        }
        for i in 0..LUKS_SLOTS {
            if let Some((o, l)) = self.material_range(i) {
                if o + l as u64 > len {
                    return Err(invalid(format!("LUKS key slot {i} key material is beyond the end of the image ({len} bytes)")));
                }
            }
        }
        Ok(())
    }

    /// A cipher for the payload under `master_key`.
    pub fn sector_cipher(&self, master_key: &[u8]) -> Result<SectorCipher, CryptoError> {
        SectorCipher::new(self.alg, self.mode, self.ivgen, self.ivgen_hash, master_key)
    }

    /// Unlock with `password`, given the LUKS area from its start up to at least
    /// [`LuksHeader::unlock_area_len`]. Tries every active slot in order; the master key of the
    /// first that opens.
    pub fn unlock(&self, password: &[u8], area: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        for i in 0..LUKS_SLOTS {
            let Some((off, len)) = self.material_range(i) else { continue };
            let material = usize::try_from(off)
                .ok()
                .and_then(|o| area.get(o..o.checked_add(len)?))
                .ok_or_else(|| invalid(format!("LUKS key slot {i} key material is beyond the data given")))?;
            if let Some(mk) = self.try_slot(i, password, material)? {
                return Ok(mk);
            }
        }
        Err(CryptoError::InvalidPassword)
    }

    /// Where slot `i`'s key material lies whatever its state: a byte offset from the start of
    /// the area and a length rounded up to whole sectors.
    pub fn slot_range(&self, i: usize) -> (u64, usize) {
        let s = &self.slots[i];
        (u64::from(s.key_offset_sector) * SECTOR_SIZE as u64, material_sectors(self.key_bytes) as usize * SECTOR_SIZE)
    }

    /// Active key slots.
    pub fn active_slots(&self) -> usize {
        self.slots.iter().filter(|s| s.active).count()
    }

    /// Whether `password` opens slot `i`, given its key material (sector-rounded, as
    /// [`LuksHeader::slot_range`]); an inactive slot opens with nothing (QEMU's `load_key`).
    pub fn slot_opens(&self, i: usize, password: &[u8], material: &[u8]) -> Result<bool, CryptoError> {
        if !self.slots[i].active {
            return Ok(false);
        }
        if material.len() < self.material_len() {
            return Err(invalid(format!("LUKS key slot {i} key material is beyond the data given")));
        }
        Ok(self.try_slot(i, password, material)?.is_some())
    }

    /// Give slot `i` a new salt and `iterations` and return its key material for `password`
    /// and `master_key`, sector-rounded as [`LuksHeader::slot_range`], ready to be written
    /// there. The slot's state is left as it is: the caller writes the material first and only
    /// then activates the slot in the header (QEMU's order, so that a crash in between leaves
    /// at worst an inactive slot with new material).
    pub fn prepare_slot(
        &mut self,
        i: usize,
        password: &[u8],
        master_key: &[u8],
        iterations: u32,
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let kb = self.key_bytes as usize;
        if master_key.len() != kb {
            return Err(invalid(format!("LUKS master key is {} bytes, the header says {kb}", master_key.len())));
        }
        let slot = &mut self.slots[i];
        random(&mut slot.salt)?;
        slot.iterations = iterations.max(MIN_SLOT_ITERATIONS);
        slot.stripes = LUKS_STRIPES;
        let mut slot_key = Zeroizing::new(vec![0u8; kb]);
        self.hash.pbkdf2(password, &self.slots[i].salt, self.slots[i].iterations, &mut slot_key);
        let split = af_split(self.hash, master_key, LUKS_STRIPES as usize)?;
        let mut material = Zeroizing::new(vec![0u8; self.slot_range(i).1]);
        material[..split.len()].copy_from_slice(&split);
        self.sector_cipher(&slot_key)?.encrypt(0, &mut material)?;
        Ok(material)
    }

    /// Make slot `i` inactive as QEMU's erase does: zero salt and iterations (the caller
    /// writes the header, then overwrites the key material).
    pub fn clear_slot(&mut self, i: usize) {
        let s = &mut self.slots[i];
        s.active = false;
        s.salt = [0; LUKS_SALT_LEN];
        s.iterations = 0;
    }

    /// Try slot `i` with its key material (sector-rounded, as [`LuksHeader::material_range`]).
    fn try_slot(&self, i: usize, password: &[u8], material: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, CryptoError> {
        let slot = &self.slots[i];
        let kb = self.key_bytes as usize;
        let mut slot_key = Zeroizing::new(vec![0u8; kb]);
        self.hash.pbkdf2(password, &slot.salt, slot.iterations, &mut slot_key);
        let mut split = Zeroizing::new(material.to_vec());
        self.sector_cipher(&slot_key)?.decrypt(0, &mut split)?;
        let mut mk = Zeroizing::new(vec![0u8; kb]);
        af_merge(self.hash, &split[..self.material_len()], kb, LUKS_STRIPES as usize, &mut mk);
        let mut digest = [0u8; LUKS_DIGEST_LEN];
        self.hash.pbkdf2(&mk, &self.mk_salt, self.mk_iterations, &mut digest);
        let diff = digest.iter().zip(&self.mk_digest).fold(0u8, |a, (x, y)| a | (x ^ y));
        Ok((diff == 0).then_some(mk))
    }

    /// The header's 592 bytes.
    pub fn to_bytes(&self) -> [u8; LUKS_HEADER_LEN] {
        let mut b = [0u8; LUKS_HEADER_LEN];
        b[..6].copy_from_slice(LUKS_MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        put_str(&mut b[8..39], &self.cipher_name);
        put_str(&mut b[40..71], &self.cipher_mode);
        put_str(&mut b[72..103], &self.hash_spec);
        b[104..108].copy_from_slice(&self.payload_offset_sector.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_salt);
        b[164..168].copy_from_slice(&self.mk_iterations.to_be_bytes());
        put_str(&mut b[168..207], &self.uuid);
        for (i, s) in self.slots.iter().enumerate() {
            let o = 208 + i * 48;
            b[o..o + 4].copy_from_slice(&if s.active { SLOT_ACTIVE } else { SLOT_INACTIVE }.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[o + 8..o + 40].copy_from_slice(&s.salt);
            b[o + 40..o + 44].copy_from_slice(&s.key_offset_sector.to_be_bytes());
            b[o + 44..o + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }

    /// QEMU's `QCryptoBlockInfoLUKS` as JSON, fields in QAPI order (callers that print in
    /// QDict order reorder them); `detached-header` is false (the header is in the image).
    pub fn info_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("cipher-alg".into(), self.alg.name().into());
        m.insert("cipher-mode".into(), self.mode.name().into());
        m.insert("ivgen-alg".into(), self.ivgen.name().into());
        if let Some(h) = self.ivgen_hash {
            m.insert("ivgen-hash-alg".into(), h.name().into());
        }
        m.insert("hash-alg".into(), self.hash.name().into());
        m.insert("detached-header".into(), false.into());
        m.insert("payload-offset".into(), self.payload_offset().into());
        m.insert("master-key-iters".into(), self.mk_iterations.into());
        m.insert("uuid".into(), self.uuid.clone().into());
        let slots = self
            .slots
            .iter()
            .map(|s| {
                let mut o = serde_json::Map::new();
                o.insert("active".into(), s.active.into());
                if s.active {
                    o.insert("iters".into(), s.iterations.into());
                    o.insert("stripes".into(), s.stripes.into());
                }
                o.insert("key-offset".into(), (u64::from(s.key_offset_sector) * SECTOR_SIZE as u64).into());
                serde_json::Value::Object(o)
            })
            .collect();
        m.insert("slots".into(), serde_json::Value::Array(slots));
        serde_json::Value::Object(m)
    }
}

/// The anti-forensic diffuser: each digest-sized piece `j` of `buf` becomes the hash of
/// (`j` as 32-bit big-endian, the piece), truncated to the piece's length.
fn diffuse(hash: HashAlg, buf: &mut [u8]) {
    let dl = hash.digest_len();
    let mut out = [0u8; 64];
    for (j, piece) in buf.chunks_mut(dl).enumerate() {
        hash.digest_into(&[&(j as u32).to_be_bytes(), piece], &mut out);
        piece.copy_from_slice(&out[..piece.len()]);
    }
}

fn xor_into(d: &mut [u8], s: &[u8]) {
    for (a, b) in d.iter_mut().zip(s) {
        *a ^= b;
    }
}

/// Merge `stripes` stripes of `block` bytes from `split` into `out` (`block` bytes).
pub fn af_merge(hash: HashAlg, split: &[u8], block: usize, stripes: usize, out: &mut [u8]) {
    out.fill(0);
    for (i, s) in split.chunks_exact(block).take(stripes).enumerate() {
        xor_into(out, s);
        if i + 1 < stripes {
            diffuse(hash, out);
        }
    }
}

/// Split `key` into `stripes` stripes (`key.len() * stripes` bytes), all random but the last.
fn af_split(hash: HashAlg, key: &[u8], stripes: usize) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let block = key.len();
    let mut split = Zeroizing::new(vec![0u8; block * stripes]);
    random(&mut split[..block * (stripes - 1)])?;
    let mut d = Zeroizing::new(vec![0u8; block]);
    for s in split.chunks_exact(block).take(stripes - 1) {
        xor_into(&mut d, s);
        diffuse(hash, &mut d);
    }
    let last = &mut split[block * (stripes - 1)..];
    last.copy_from_slice(key);
    xor_into(last, &d);
    Ok(split)
}

fn random(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::fill(buf).map_err(|e| CryptoError::Random(e.to_string()))
}

/// Options of a new LUKS header (QEMU's `luks` create options).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LuksCreateOpts {
    /// `cipher-alg` (default aes-256).
    pub alg: CipherAlg,
    /// `cipher-mode` (default xts).
    pub mode: CipherMode,
    /// `ivgen-alg` (default plain64).
    pub ivgen: IvGenAlg,
    /// `ivgen-hash-alg` (default sha256 with ESSIV).
    pub ivgen_hash: Option<HashAlg>,
    /// `hash-alg` (default sha256).
    pub hash: HashAlg,
    /// `iter-time` in milliseconds (default 2000).
    pub iter_time_ms: u64,
}

impl Default for LuksCreateOpts {
    fn default() -> Self {
        LuksCreateOpts {
            alg: CipherAlg::Aes256,
            mode: CipherMode::Xts,
            ivgen: IvGenAlg::Plain64,
            ivgen_hash: None,
            hash: HashAlg::Sha256,
            iter_time_ms: 2000,
        }
    }
}

/// A new LUKS area: the header, the master key, and the bytes to write at the start of the
/// area (header padded to 4 KiB, then slot 0's key material); the rest up to the payload is
/// zeroes.
#[derive(Debug)]
pub struct LuksNew {
    /// The header.
    pub header: LuksHeader,
    /// The master key.
    pub master_key: Zeroizing<Vec<u8>>,
    /// The bytes from the start of the area to the end of slot 0's key material.
    pub area: Vec<u8>,
}

/// Iterations for a new key slot as QEMU's `store_key` computes them: PBKDF2 iterations a
/// second on this machine, scaled to `iter_time_ms` (a 64-bit value: QEMU wraps a negative
/// `iter-time` to a huge one), at least 1000; QEMU's range errors past `u64`/`u32`.
pub fn slot_iterations(hash: HashAlg, key_bytes: usize, iter_time_ms: u64) -> Result<u32, CryptoError> {
    // Up to a minute the product cannot leave u32 at any plausible hash speed: the timing
    // function scales it directly.
    if iter_time_ms <= 60_000 {
        return Ok(hash.pbkdf2_iterations(key_bytes, iter_time_ms).max(MIN_SLOT_ITERATIONS));
    }
    let per_sec = u64::from(hash.pbkdf2_iterations(key_bytes, 1000));
    if per_sec > u64::MAX / iter_time_ms {
        return Err(CryptoError::Range(format!("PBKDF iterations {per_sec} too large to scale")));
    }
    let iters = per_sec * iter_time_ms / 1000;
    u32::try_from(iters)
        .map(|n| n.max(MIN_SLOT_ITERATIONS))
        .map_err(|_| CryptoError::Range(format!("PBKDF iterations {iters} larger than {}", u32::MAX)))
}

/// QEMU's layout for a `key_bytes` master key: each slot's key material offset (sectors) and
/// the payload offset (sectors).
pub fn luks_layout(key_bytes: u32) -> ([u32; LUKS_SLOTS], u32) {
    let step = material_sectors(key_bytes).next_multiple_of(MATERIAL_ALIGN_SECTORS);
    let offsets = std::array::from_fn(|i| HEADER_SECTORS + i as u32 * step);
    (offsets, HEADER_SECTORS + LUKS_SLOTS as u32 * step)
}

/// Build a new LUKS area with one active key slot (slot 0) opened by `password`, timing
/// PBKDF2 for `opts.iter_time_ms` as QEMU does (the master key digest gets an eighth of the
/// time; both at least 1000 iterations).
pub fn luks_create(opts: &LuksCreateOpts, password: &[u8]) -> Result<LuksNew, CryptoError> {
    let ivgen_hash = match opts.ivgen {
        IvGenAlg::Essiv => Some(opts.ivgen_hash.unwrap_or(HashAlg::Sha256)),
        _ => opts.ivgen_hash,
    };
    let key_bytes = opts.mode.key_len(opts.alg) as u32;
    if !(key_bytes * LUKS_STRIPES).is_multiple_of(SECTOR_SIZE as u32) {
        // QEMU cannot read (or write) key material that ends inside a sector.
        return Err(CryptoError::Unsupported(format!(
            "Cipher {} in {} mode is not supported for LUKS: its key material is not a whole number of sectors",
            opts.alg.name(),
            opts.mode.name()
        )));
    }
    let shown_mode = mode_string(opts.mode, opts.ivgen, ivgen_hash);
    let (mode, ivgen, parsed_hash) = parse_mode(&shown_mode)?;
    let kb = key_bytes as usize;

    let mut master_key = Zeroizing::new(vec![0u8; kb]);
    random(&mut master_key)?;
    // Checks the key against the cipher spec (ESSIV hash size and so on) before any timing.
    SectorCipher::new(opts.alg, mode, ivgen, parsed_hash, &master_key)?;
    let mut mk_salt = [0u8; LUKS_SALT_LEN];
    random(&mut mk_salt)?;
    let mk_iterations = (opts.hash.pbkdf2_iterations(LUKS_DIGEST_LEN, opts.iter_time_ms) / 8).max(1000);
    let mut mk_digest = [0u8; LUKS_DIGEST_LEN];
    opts.hash.pbkdf2(&master_key, &mk_salt, mk_iterations, &mut mk_digest);

    let (offsets, payload_offset_sector) = luks_layout(key_bytes);
    let mut slots: [LuksSlot; LUKS_SLOTS] = std::array::from_fn(|i| LuksSlot {
        active: false,
        iterations: 0,
        salt: [0; LUKS_SALT_LEN],
        key_offset_sector: offsets[i],
        stripes: LUKS_STRIPES,
    });
    let slot = &mut slots[0];
    slot.active = true;
    random(&mut slot.salt)?;
    slot.iterations = opts.hash.pbkdf2_iterations(kb, opts.iter_time_ms);
    let mut slot_key = Zeroizing::new(vec![0u8; kb]);
    opts.hash.pbkdf2(password, &slot.salt, slot.iterations, &mut slot_key);

    let mut uuid = [0u8; 16];
    random(&mut uuid)?;
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    let h: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    let uuid = format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..]);

    let header = LuksHeader {
        cipher_name: "aes".into(),
        cipher_mode: shown_mode,
        hash_spec: opts.hash.name().into(),
        payload_offset_sector,
        key_bytes,
        mk_digest,
        mk_salt,
        mk_iterations,
        uuid,
        slots,
        alg: opts.alg,
        mode,
        ivgen,
        ivgen_hash: parsed_hash,
        hash: opts.hash,
    };
    let split = af_split(opts.hash, &master_key, LUKS_STRIPES as usize)?;
    let mut material = Zeroizing::new(split.to_vec());
    header.sector_cipher(&slot_key)?.encrypt(0, &mut material)?;
    let start = offsets[0] as usize * SECTOR_SIZE;
    let mut area = vec![0u8; start + material.len()];
    area[..LUKS_HEADER_LEN].copy_from_slice(&header.to_bytes());
    area[start..].copy_from_slice(&material);
    Ok(LuksNew { header, master_key, area })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick(mode: CipherMode, alg: CipherAlg, ivgen: IvGenAlg, hash: HashAlg) -> LuksCreateOpts {
        LuksCreateOpts { alg, mode, ivgen, ivgen_hash: None, hash, iter_time_ms: 1 }
    }

    #[test]
    fn layout_matches_qemu() {
        // Observed in images qemu-img 10 creates: aes-256-xts (64-byte key) and aes-128-cbc.
        let (o, p) = luks_layout(64);
        assert_eq!((o[0], o[1], o[7], p), (8, 8 + 504, 8 + 7 * 504, 4040));
        let (o, p) = luks_layout(16);
        assert_eq!((o[1] * 512, p * 512), (69632, 528384));
        let (o, _) = luks_layout(48);
        assert_eq!(o[1] * 512, 196608);
    }

    #[test]
    fn create_parse_unlock_round_trip() {
        for (mode, alg, iv, hash) in [
            (CipherMode::Xts, CipherAlg::Aes256, IvGenAlg::Plain64, HashAlg::Sha256),
            (CipherMode::Cbc, CipherAlg::Aes128, IvGenAlg::Essiv, HashAlg::Sha1),
            (CipherMode::Ctr, CipherAlg::Aes256, IvGenAlg::Plain, HashAlg::Sha512),
            (CipherMode::Ecb, CipherAlg::Aes128, IvGenAlg::Plain64, HashAlg::Ripemd160),
            (CipherMode::Xts, CipherAlg::Aes192, IvGenAlg::Plain64, HashAlg::Md5),
        ] {
            let new = luks_create(&quick(mode, alg, iv, hash), b"secret").unwrap();
            let h = LuksHeader::parse(&new.area).unwrap();
            assert_eq!(h, new.header);
            assert_eq!(h.unlock_area_len(), new.area.len() as u64);
            let mk = h.unlock(b"secret", &new.area).unwrap();
            assert_eq!(*mk, *new.master_key);
            assert!(matches!(h.unlock(b"secreT", &new.area), Err(CryptoError::InvalidPassword)));
            assert!(h.slots[0].iterations >= 1000 && h.mk_iterations >= 1000);
        }
        let e = luks_create(&quick(CipherMode::Cbc, CipherAlg::Aes192, IvGenAlg::Plain64, HashAlg::Sha256), b"x").unwrap_err();
        assert!(e.to_string().contains("not a whole number of sectors"));
    }

    #[test]
    fn af_split_merge() {
        let key: Vec<u8> = (0..32).collect();
        for hash in [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512] {
            let split = af_split(hash, &key, 7).unwrap();
            let mut out = vec![0u8; 32];
            af_merge(hash, &split, 32, 7, &mut out);
            assert_eq!(out, key);
        }
    }

    /// The diffuser by hand for a 40-byte block and SHA-1 (20-byte digest): two pieces, each
    /// hashed after its big-endian index.
    #[test]
    fn diffuse_definition() {
        let mut b: Vec<u8> = (0..40).collect();
        let orig = b.clone();
        diffuse(HashAlg::Sha1, &mut b);
        let mut want = [0u8; 20];
        HashAlg::Sha1.digest_into(&[&[0, 0, 0, 1], &orig[20..]], &mut want);
        assert_eq!(b[20..], want);
    }

    fn valid() -> Vec<u8> {
        luks_create(&quick(CipherMode::Xts, CipherAlg::Aes256, IvGenAlg::Plain64, HashAlg::Sha256), b"pw").unwrap().area
    }

    #[test]
    fn malformed_headers_are_refused_by_field() {
        let v = valid();
        let e = |mutate: &dyn Fn(&mut Vec<u8>)| {
            let mut b = v.clone();
            mutate(&mut b);
            LuksHeader::parse(&b).unwrap_err().to_string()
        };
        assert!(e(&|b| b.truncate(100)).contains("truncated"));
        assert!(e(&|b| b[0] = b'X').contains("not in LUKS format"));
        assert!(e(&|b| b[7] = 2).contains("LUKS version 2"));
        assert!(e(&|b| b[8..40].fill(b'a')).contains("cipher-name"));
        assert!(e(&|b| b[8..12].copy_from_slice(b"twof")).contains("not supported"));
        assert!(e(&|b| b[40..44].copy_from_slice(b"foo-")).contains("cipher mode"));
        assert!(e(&|b| b[72..80].copy_from_slice(b"whirl\0\0\0")).contains("hash"));
        assert!(e(&|b| b[108..112].copy_from_slice(&7u32.to_be_bytes())).contains("key-bytes"));
        assert!(e(&|b| b[164..168].fill(0)).contains("iterations"));
        assert!(e(&|b| b[208..212].fill(0x11)).contains("invalid state"));
        assert!(e(&|b| b[208 + 44..208 + 48].copy_from_slice(&u32::MAX.to_be_bytes())).contains("stripes"));
        assert!(e(&|b| b[208 + 40..208 + 44].copy_from_slice(&0u32.to_be_bytes())).contains("header"));
        assert!(e(&|b| b[208 + 40..208 + 44].copy_from_slice(&u32::MAX.to_be_bytes())).contains("payload"));
        assert!(e(&|b| b[208 + 48 + 40..208 + 48 + 44].copy_from_slice(&9u32.to_be_bytes())).contains("overlap"));
        assert!(e(&|b| b[104..108].copy_from_slice(&100u32.to_be_bytes())).contains("payload"));
        let h = LuksHeader::parse(&v).unwrap();
        assert!(h.check_area(4096, false).unwrap_err().to_string().contains("beyond the end"));
        assert!(h.check_area(h.payload_offset() - 1, true).is_err());
        assert!(h.check_area(h.payload_offset(), true).is_ok());
        assert!(h.unlock(b"pw", &v[..4096]).unwrap_err().to_string().contains("beyond the data"));
    }

    #[test]
    fn mode_strings() {
        assert_eq!(parse_mode("xts-plain64").unwrap(), (CipherMode::Xts, IvGenAlg::Plain64, None));
        assert_eq!(parse_mode("xts-plain64:sha1").unwrap(), (CipherMode::Xts, IvGenAlg::Plain64, None));
        assert_eq!(parse_mode("cbc-essiv:sha256").unwrap(), (CipherMode::Cbc, IvGenAlg::Essiv, Some(HashAlg::Sha256)));
        assert_eq!(parse_mode("ecb").unwrap().0, CipherMode::Ecb);
        assert!(parse_mode("cbc").is_err());
        assert!(parse_mode("cbc-essiv").is_err());
        assert!(parse_mode("cbc-essiv:sha1").unwrap_err().to_string().contains("key size 20"));
        assert!(parse_mode("cbc-lmk").is_err());
    }
}
