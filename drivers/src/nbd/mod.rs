//! NBD: the wire protocol shared by Basalt's NBD server (in basalt-tools) and, later, the `nbd`
//! protocol driver (the client). Only [`proto`] exists so far.

pub mod proto;
