//! Block encryption shared by the formats that encrypt guest data: the standalone `luks`
//! format and qcow2 (`encrypt.format=luks`, and the legacy `aes`). Pure code, no I/O, but for
//! key slot amendment (below).
//!
//! - [`cipher`]: [`SectorCipher`], encrypting and decrypting whole 512-byte sectors in place,
//!   given the first sector's number (AES-128/192/256 in XTS, CBC, ECB or CTR mode with plain,
//!   plain64 or ESSIV IVs; [`SectorCipher::qcow_aes`] for the legacy qcow scheme).
//! - [`luks`]: the LUKS1 header: parse and validate ([`LuksHeader::parse`]), unlock with a
//!   passphrase ([`LuksHeader::unlock`]), build one for a new image ([`luks_create`]).
//! - [`hash`]: the hashes LUKS names, PBKDF2 and its iteration timing.
//! - [`amend`]: LUKS key slot management (`qemu-img amend`), the one part that does I/O: through
//!   a [`basalt_engine::Queue`] the format hands over, at the LUKS area's offset.
//!
//! Errors are [`CryptoError`], which converts into the engine's `BlockError` with QEMU's
//! wording where QEMU has one ("Invalid password, cannot unlock any keyslot").

pub mod amend;
pub mod cipher;
pub mod hash;
pub mod luks;

pub use amend::{amend_keyslots, LuksAmendOpts, LuksArea, LUKS_AMEND_OPTS};
pub use cipher::{CipherAlg, CipherMode, IvGenAlg, SectorCipher, SECTOR_SIZE};
pub use hash::HashAlg;
pub use luks::{luks_create, luks_layout, LuksCreateOpts, LuksHeader, LuksNew, LuksSlot, LUKS_HEADER_LEN, LUKS_MAGIC};

use basalt_engine::{BlockError, BlockResult, ErrorKind, Opts};

/// What can go wrong in the crypto layer.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// A header field is malformed (the message names it).
    #[error("{0}")]
    InvalidHeader(String),
    /// An algorithm, mode or version Basalt does not implement.
    #[error("{0}")]
    Unsupported(String),
    /// No key slot opened with the passphrase.
    #[error("Invalid password, cannot unlock any keyslot")]
    InvalidPassword,
    /// A buffer that is not a whole number of sectors (a caller's bug).
    #[error("encryption buffer of {0} bytes is not a whole number of 512-byte sectors")]
    Unaligned(usize),
    /// The system's random source failed.
    #[error("Unable to read random bytes: {0}")]
    Random(String),
    /// A computed value out of range (QEMU's `ERANGE` errors, with its strerror).
    #[error("{0}: Numerical result out of range")]
    Range(String),
}

impl From<CryptoError> for BlockError {
    fn from(e: CryptoError) -> BlockError {
        let kind = match &e {
            CryptoError::InvalidHeader(_) => ErrorKind::InvalidFormat,
            CryptoError::Unsupported(_) => ErrorKind::Unsupported,
            CryptoError::InvalidPassword => ErrorKind::PermissionDenied,
            CryptoError::Unaligned(_) => ErrorKind::InvalidOption,
            CryptoError::Random(_) => ErrorKind::Io,
            CryptoError::Range(_) => ErrorKind::OutOfBounds,
        };
        BlockError::new(kind, e.to_string())
    }
}

/// QEMU's cipher algorithm names; those other than AES are refused as unsupported.
const QEMU_CIPHERS: &[&str] = &[
    "aes-128",
    "aes-192",
    "aes-256",
    "des",
    "3des",
    "cast5-128",
    "serpent-128",
    "serpent-192",
    "serpent-256",
    "twofish-128",
    "twofish-192",
    "twofish-256",
    "sm4",
];

/// Take QEMU's LUKS create options (`key-secret`, `cipher-alg`, `cipher-mode`, `ivgen-alg`,
/// `ivgen-hash-alg`, `hash-alg`, `iter-time`; `detached-header` refused as qemu-img refuses it)
/// out of `opts`: the header options and the passphrase's secret id. Shared by the `luks`
/// format and qcow2's `encrypt.*` options, whose values QEMU checks with the same messages.
pub fn take_luks_create_opts(opts: &mut Opts) -> BlockResult<(LuksCreateOpts, Option<String>)> {
    let mut o = LuksCreateOpts::default();
    let key_secret = opts.take_str("key-secret");
    if let Some(v) = opts.take_str("cipher-alg") {
        o.alg = match CipherAlg::parse(&v) {
            Some(a) => a,
            None if QEMU_CIPHERS.contains(&v.as_str()) => {
                return Err(BlockError::new(
                    ErrorKind::Unsupported,
                    format!("Cipher algorithm '{v}' is not supported (only AES)"),
                ))
            }
            None => return Err(not_accepted("cipher-alg", &v)),
        };
    }
    if let Some(v) = opts.take_str("cipher-mode") {
        o.mode = CipherMode::parse(&v).ok_or_else(|| not_accepted("cipher-mode", &v))?;
    }
    if let Some(v) = opts.take_str("ivgen-alg") {
        o.ivgen = IvGenAlg::parse(&v).ok_or_else(|| not_accepted("ivgen-alg", &v))?;
    }
    let hash = |opts: &mut Opts, key: &str| -> BlockResult<Option<HashAlg>> {
        match opts.take_str(key) {
            None => Ok(None),
            Some(v) if v == "sm3" => {
                Err(BlockError::new(ErrorKind::Unsupported, format!("Hash algorithm '{v}' is not supported")))
            }
            Some(v) => HashAlg::parse(&v).map(Some).ok_or_else(|| not_accepted(key, &v)),
        }
    };
    o.ivgen_hash = hash(opts, "ivgen-hash-alg")?;
    if let Some(h) = hash(opts, "hash-alg")? {
        o.hash = h;
    }
    if let Some(v) = opts.take_str("iter-time") {
        o.iter_time_ms = basalt_engine::parse_number(&v)
            .ok_or_else(|| BlockError::option(format!("Parameter 'iter-time' expects a number, not '{v}'")))?;
    }
    if opts.contains("detached-header") {
        // As QEMU 10's qemu-img: listed, but refused when given.
        return Err(BlockError::option("Parameter 'detached-header' is unexpected"));
    }
    Ok((o, key_secret))
}

fn not_accepted(key: &str, v: &str) -> BlockError {
    BlockError::option(format!("Parameter '{key}' does not accept value '{v}'"))
}
