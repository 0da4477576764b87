//! Errors. The control plane uses [`BlockError`]: a small `Copy` kind, a context (path, node,
//! offset, operation) and a message; the data path uses [`IoStatus`], a `Copy` errno that fits
//! an NBD or virtio reply.

use std::fmt;

/// What went wrong, coarsely: what a caller branches on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// An I/O error from the layer below.
    Io,
    /// The image is not of the format it was opened as, or a field is malformed.
    InvalidFormat,
    /// A feature or option that is not supported.
    Unsupported,
    /// Metadata is inconsistent.
    Corrupt,
    /// A request or field points outside what is allowed.
    OutOfBounds,
    /// A file, node or driver does not exist.
    NotFound,
    /// Writing to something read-only, or a permission the graph does not grant.
    PermissionDenied,
    /// Another process holds a conflicting lock.
    Locked,
    /// An option is missing, unknown or malformed.
    InvalidOption,
    /// The node is busy or in use.
    Busy,
}

/// A control-plane error with context.
#[derive(Debug)]
pub struct BlockError {
    /// The coarse kind.
    pub kind: ErrorKind,
    /// The message, as a user should read it (QEMU's wording where QEMU has one).
    pub msg: String,
    /// The errno behind it, when there is one.
    pub errno: Option<i32>,
}

/// Result with a [`BlockError`].
pub type BlockResult<T> = Result<T, BlockError>;

impl BlockError {
    /// A new error.
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> BlockError {
        BlockError { kind, msg: msg.into(), errno: None }
    }

    /// An error from an OS error, with a message prefix (`"Could not open 'x'"`).
    pub fn io(prefix: impl fmt::Display, e: &std::io::Error) -> BlockError {
        let errno = e.raw_os_error();
        let kind = match e.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
            _ => ErrorKind::Io,
        };
        BlockError { kind, msg: format!("{prefix}: {}", strerror(errno.unwrap_or(libc::EIO))), errno }
    }

    /// An error from an errno, with a message prefix.
    pub fn errno(prefix: impl fmt::Display, errno: i32) -> BlockError {
        BlockError::io(prefix, &std::io::Error::from_raw_os_error(errno))
    }

    /// Shorthand for an invalid option.
    pub fn option(msg: impl Into<String>) -> BlockError {
        BlockError::new(ErrorKind::InvalidOption, msg)
    }

    /// Put `prefix: ` before the message.
    pub fn context(mut self, prefix: impl fmt::Display) -> BlockError {
        self.msg = format!("{prefix}: {}", self.msg);
        self
    }
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for BlockError {}

impl From<IoStatus> for BlockError {
    fn from(s: IoStatus) -> BlockError {
        let kind = match s.0 {
            libc::EPERM | libc::EACCES | libc::EROFS => ErrorKind::PermissionDenied,
            libc::ENOTSUP => ErrorKind::Unsupported,
            libc::EINVAL | libc::ERANGE => ErrorKind::OutOfBounds,
            _ => ErrorKind::Io,
        };
        BlockError { kind, msg: strerror(s.0), errno: Some(s.0) }
    }
}

/// The data-path status of a failed request: an errno. `Copy`, 4 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoStatus(pub i32);

impl IoStatus {
    /// EIO.
    pub const EIO: IoStatus = IoStatus(libc::EIO);
    /// EINVAL.
    pub const EINVAL: IoStatus = IoStatus(libc::EINVAL);
    /// EPERM.
    pub const EPERM: IoStatus = IoStatus(libc::EPERM);
    /// ENOTSUP.
    pub const ENOTSUP: IoStatus = IoStatus(libc::ENOTSUP);
    /// ENOSPC.
    pub const ENOSPC: IoStatus = IoStatus(libc::ENOSPC);

    /// The errno value.
    pub fn errno(self) -> i32 {
        self.0
    }

    /// From a kernel-style result (negative errno).
    pub fn from_neg(res: i64) -> IoStatus {
        IoStatus((-res).clamp(1, i64::from(i32::MAX)) as i32)
    }
}

impl fmt::Display for IoStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&strerror(self.0))
    }
}

/// The C library's text for an errno ("No such file or directory").
pub fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno).to_string();
    // std appends " (os error N)"; QEMU prints the bare strerror text.
    match s.rfind(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}
