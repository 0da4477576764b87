//! qcow2's own errors, each naming the field or structure at fault, converted into the
//! engine's `BlockError` at the driver boundary.

use basalt_engine::{BlockError, ErrorKind};

/// What can be wrong with a qcow2 image or request.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// Not a qcow2 image at all.
    #[error("Image is not in qcow2 format")]
    NotQcow2,
    /// A header field is out of range.
    #[error("{0}")]
    BadHeader(String),
    /// A feature this build does not implement.
    #[error("{0}")]
    Unsupported(String),
    /// Metadata is inconsistent.
    #[error("{0}")]
    Corrupt(String),
}

impl From<Qcow2Error> for BlockError {
    fn from(e: Qcow2Error) -> BlockError {
        let kind = match &e {
            Qcow2Error::NotQcow2 | Qcow2Error::BadHeader(_) => ErrorKind::InvalidFormat,
            Qcow2Error::Unsupported(_) => ErrorKind::Unsupported,
            Qcow2Error::Corrupt(_) => ErrorKind::Corrupt,
        };
        BlockError::new(kind, e.to_string())
    }
}

/// Shorthand for a header error.
pub fn bad(msg: impl Into<String>) -> Qcow2Error {
    Qcow2Error::BadHeader(msg.into())
}
