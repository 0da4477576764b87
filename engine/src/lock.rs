//! Image locking with open file description (OFD) locks on the byte offsets QEMU uses, so that
//! Basalt's tools and QEMU's exclude each other in both directions.
//!
//! For each permission bit `i` (QEMU's order: consistent read, write, write unchanged, resize)
//! a holder takes a shared lock on byte `100 + i` when it uses the permission, and on byte
//! `200 + i` when it does not let others use it. Before that it tests for conflicts: a byte
//! `200 + i` locked by someone else forbids us permission `i`; a byte `100 + i` locked by
//! someone else forbids us to deny permission `i` to others. OFD locks belong to the open file
//! description, so two opens in one process exclude each other too, exactly as between
//! processes.

use std::os::fd::RawFd;

use crate::error::{BlockError, ErrorKind};
use crate::node::Perm;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

fn flock(kind: i16, start: i64) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = 1;
    fl
}

/// Whether another open file description holds a lock on `byte` that conflicts with a write lock.
fn locked_by_other(fd: RawFd, byte: i64) -> std::io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK as i16, byte);
    // SAFETY: F_OFD_GETLK with a valid flock pointer.
    if unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as i16)
}

fn set(fd: RawFd, kind: i16, byte: i64) -> std::io::Result<()> {
    let fl = flock(kind, byte);
    // SAFETY: F_OFD_SETLK with a valid flock pointer.
    if unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Check for conflicts, then take the locks for `perm` used and `shared` granted, releasing the
/// bytes we no longer need. `name` is the filename for the error message.
pub fn apply(fd: RawFd, perm: Perm, shared: Perm, name: &str) -> Result<(), BlockError> {
    for i in 0..4u8 {
        let bit = Perm(1 << i);
        let pname = Perm::NAMES[i as usize];
        let check = |byte: i64, msg: String| -> Result<(), BlockError> {
            match locked_by_other(fd, byte) {
                Ok(false) => Ok(()),
                Ok(true) => Err(BlockError::new(ErrorKind::Locked, msg)),
                Err(e) => Err(BlockError::io(format!("Failed to get \"{pname}\" lock"), &e)),
            }
        };
        if perm.has(bit) {
            check(
                SHARED_BASE + i64::from(i),
                format!("Failed to get \"{pname}\" lock\nIs another process using the image [{name}]?"),
            )?;
        }
        if !shared.has(bit) {
            check(
                PERM_BASE + i64::from(i),
                format!("Failed to get shared \"{pname}\" lock\nIs another process using the image [{name}]?"),
            )?;
        }
    }
    for i in 0..4u8 {
        let bit = Perm(1 << i);
        let p = if perm.has(bit) { libc::F_RDLCK } else { libc::F_UNLCK } as i16;
        let s = if shared.has(bit) { libc::F_UNLCK } else { libc::F_RDLCK } as i16;
        set(fd, p, PERM_BASE + i64::from(i)).map_err(|e| BlockError::io("Failed to lock byte", &e))?;
        set(fd, s, SHARED_BASE + i64::from(i)).map_err(|e| BlockError::io("Failed to lock byte", &e))?;
    }
    Ok(())
}

/// Drop every permission and sharing lock `fd`'s open file description holds. Called when the
/// node closes: an io_uring that had the file registered may keep the description alive for a
/// while after that (Linux 6.1 puts unregistered files after up to a second), and its locks
/// must not outlive the node, or the next program to open the image finds it "in use".
pub fn release(fd: RawFd) {
    for byte in (PERM_BASE..PERM_BASE + 4).chain(SHARED_BASE..SHARED_BASE + 4) {
        let _ = set(fd, libc::F_UNLCK as i16, byte);
    }
}

/// Whether OFD locks work on `fd` (for `locking=auto`).
pub fn supported(fd: RawFd) -> bool {
    locked_by_other(fd, PERM_BASE).is_ok()
}
