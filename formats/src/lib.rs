//! basalt-formats: image formats, one folder each, each behind a cargo feature, and the
//! registry through which a program learns every driver it can use.
//!
//! `raw`, `qcow2` and `luks` are here so far (`crypto` holds the encryption they share).
//! Formats Basalt recognises but cannot open yet are refused by the engine's probe table with a
//! clear error, never mistaken for raw.

#[cfg(feature = "crypto")]
pub mod crypto;
#[cfg(feature = "luks")]
pub mod luks;
#[cfg(feature = "qcow2")]
pub mod qcow2;
#[cfg(feature = "raw")]
pub mod raw;

use basalt_engine::{BlockDriver, Registry};

/// Every driver: protocols first, then formats. Registration is this explicit list.
pub fn registry() -> Registry {
    let mut d: Vec<&'static dyn BlockDriver> = basalt_drivers::drivers();
    #[cfg(feature = "raw")]
    d.push(&raw::RAW);
    #[cfg(feature = "qcow2")]
    d.push(&qcow2::QCOW2);
    #[cfg(feature = "luks")]
    d.push(&luks::LUKS);
    Registry::new(d)
}
