//! basalt-reactor: per-core run-to-completion reactors, in the manner of SPDK.
//!
//! A reactor owns one thread (normally pinned to one core), one io_uring, one DMA buffer pool,
//! a timer heap, a set of pollers and a tiny executor of `!Send` tasks. Nothing on a reactor's
//! own path takes a lock; other threads reach it only through its [`ReactorHandle`] (messages,
//! wakes, completions from the blocking pool). Asynchronous leaf operations complete through
//! slots ([`SlotFuture`]), so an I/O in steady state allocates nothing.
//!
//! This crate knows nothing of blocks, images or formats.

mod blocking;
mod executor;
mod iobuf;
mod reactor;
mod remote;
mod runtime;
mod slots;
mod timer;
mod uring;
mod window;

pub use blocking::Lane;
pub use executor::JoinHandle;
pub use iobuf::{DmaPool, IoBuf, IOBUF_ALIGN};
pub use reactor::{
    add_poller, blocking, blocking_in, current_handle, current_id, current_pool, current_stats, live_tasks, register_file,
    remove_poller, set_idle_spin, slot_alloc, slot_complete, slot_complete_deferred, slot_put_buf, slot_take_buf, slots_pending,
    spawn_local, unregister_file, uring_fallocate, uring_features, uring_fsync, uring_poll, uring_rw, yield_now, Reactor,
    ReactorConfig, ReactorHandle, ReactorStats, UringMode,
};
pub use remote::RemoteJoin;
pub use runtime::{Runtime, RuntimeConfig};
pub use slots::{SlotFuture, SlotId};
pub use timer::{complete_at, sleep, sleep_until, Sleep};
pub use uring::{UringFd, UringFeatures};
