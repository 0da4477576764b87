//! basalt-drivers: protocol (leaf) drivers, one module each.
//!
//! - [`null`]: `null-co` and `null-aio`, devices that store nothing.
//! - [`file`]: `file` (regular files) and `host_device` (block devices), over io_uring with a
//!   thread-pool fallback.
//! - [`nbd`]: the `nbd` client driver, and the NBD wire protocol the server in basalt-tools shares.
//! - [`nvme`]: NVMe namespaces driven from userspace through VFIO, with polled queue pairs.
//!
//! [`drivers`] is the explicit registration list.

pub mod file;
pub mod nbd;
pub mod null;
pub mod nvme;

use basalt_engine::BlockDriver;

pub(crate) use basalt_engine::json_filename;

/// The protocol drivers, for the registry.
pub fn drivers() -> Vec<&'static dyn BlockDriver> {
    vec![&file::FILE, &file::HOST_DEVICE, &null::NULL_CO, &null::NULL_AIO, &nvme::NVME, &nbd::NBD]
}
