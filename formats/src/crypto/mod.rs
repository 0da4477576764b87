//! Block encryption shared by the formats that encrypt guest data: the standalone `luks`
//! format and qcow2 (`encrypt.format=luks`, and the legacy `aes`). Pure code, no I/O.
//!
//! - [`cipher`]: [`SectorCipher`], encrypting and decrypting whole 512-byte sectors in place,
//!   given the first sector's number (AES-128/192/256 in XTS, CBC, ECB or CTR mode with plain,
//!   plain64 or ESSIV IVs; [`SectorCipher::qcow_aes`] for the legacy qcow scheme).
//! - [`luks`]: the LUKS1 header: parse and validate ([`LuksHeader::parse`]), unlock with a
//!   passphrase ([`LuksHeader::unlock`]), build one for a new image ([`luks_create`]).
//! - [`hash`]: the hashes LUKS names, PBKDF2 and its iteration timing.
//!
//! Errors are [`CryptoError`], which converts into the engine's `BlockError` with QEMU's
//! wording where QEMU has one ("Invalid password, cannot unlock any keyslot").

pub mod cipher;
pub mod hash;
pub mod luks;

pub use cipher::{CipherAlg, CipherMode, IvGenAlg, SectorCipher, SECTOR_SIZE};
pub use hash::HashAlg;
pub use luks::{luks_create, luks_layout, LuksCreateOpts, LuksHeader, LuksNew, LuksSlot, LUKS_HEADER_LEN, LUKS_MAGIC};

use basalt_engine::{BlockError, ErrorKind};

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
}

impl From<CryptoError> for BlockError {
    fn from(e: CryptoError) -> BlockError {
        let kind = match &e {
            CryptoError::InvalidHeader(_) => ErrorKind::InvalidFormat,
            CryptoError::Unsupported(_) => ErrorKind::Unsupported,
            CryptoError::InvalidPassword => ErrorKind::PermissionDenied,
            CryptoError::Unaligned(_) => ErrorKind::InvalidOption,
            CryptoError::Random(_) => ErrorKind::Io,
        };
        BlockError::new(kind, e.to_string())
    }
}
