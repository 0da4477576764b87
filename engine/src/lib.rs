//! basalt-engine: the block graph on top of the reactors.
//!
//! Nodes ([`Node`] for the control plane, [`NodeQueue`] per reactor for the data plane), child
//! roles, permissions and image locking, the typed option tree ([`Opts`]) behind every way a
//! user names an image, format probing, and [`Queue`], which pads and splits requests so that
//! each node only sees the alignment and transfer sizes it declared. [`Backend`] is the
//! user-facing handle with bounds and permission checks. [`Secrets`] holds QEMU `secret`
//! objects that drivers look up by id.

mod authz;
mod backend;
mod error;
mod graph;
mod inflight;
mod io;
pub mod lock;
mod node;
mod options;
pub mod probe;
mod queue;
pub mod secret;
mod tls_creds;
mod zero;

#[doc(hidden)]
pub mod fuzzing;
pub use authz::Authz;
pub use backend::Backend;
pub use error::{strerror, BlockError, BlockResult, ErrorKind, IoStatus};
pub use graph::{
    read_head, resolve_relative, take_prealloc, AioMode, BlockDriver, CreateOptDesc, DriverKind, Graph, OpenFlags, Registry,
};
pub use inflight::{InFlight, InFlightGroup, InFlightGuard};
pub use io::{IoDone, IoFuture, SlotKind};
pub use node::{
    BlockStatus, Child, ChildRole, HostExtent, Limits, LocalBoxFuture, Node, NodeQueue, Perm, Prealloc, SnapshotInfo, WriteFlags,
    ZeroFlags,
};
pub use options::{json_filename, json_filename_of, parse_bool, parse_number, parse_size, OptValue, Opts};
pub use queue::Queue;
pub use secret::{IoThread, Secrets};
pub use tls_creds::{TlsCreds, TlsCredsKind, TlsEndpoint};
pub use zero::buffer_is_zero;
