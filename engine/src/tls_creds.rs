//! QEMU's TLS credentials objects, as given on a command line:
//! `--object tls-creds-x509,id=ID,dir=DIR,endpoint=client|server[,verify-peer=on|off][,sanity-check=on|off]` and
//! `--object tls-creds-psk,id=ID,dir=DIR,endpoint=client|server[,username=NAME]`.
//!
//! This module only parses and holds the definitions; the files in `dir` (QEMU's names:
//! `ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`, `client-key.pem`,
//! `keys.psk`) are read by the NBD driver when a connection is set up, so an object defined
//! but never used costs nothing (QEMU reads them when the object is made), and `sanity-check`
//! is applied there too (`basalt_drivers::nbd::tls_check`). Guarantees: unknown parameters, a bad endpoint
//! and a missing `dir` are refused with QEMU's wording; parameters that only mean something
//! to GnuTLS (`priority`), encrypted keys (`passwordid`) and anonymous credentials
//! (`tls-creds-anon`, which offer no authentication) are refused by name rather than ignored.

use std::path::PathBuf;

use crate::error::{BlockError, BlockResult, ErrorKind};
use crate::options::Opts;

/// What the credentials authenticate with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsCredsKind {
    /// X.509 certificates.
    X509,
    /// A pre-shared key per user name.
    Psk,
}

/// Which side of the connection uses the credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsEndpoint {
    Client,
    Server,
}

/// One `tls-creds-*` object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsCreds {
    pub id: String,
    pub kind: TlsCredsKind,
    /// The directory holding the credential files.
    pub dir: PathBuf,
    pub endpoint: TlsEndpoint,
    /// X.509: check the peer's certificate (a server then requires one from its clients).
    pub verify_peer: bool,
    /// PSK, client side: the identity sent (QEMU's default is `qemu`).
    pub username: String,
    /// X.509: check the certificates before using them (`sanity-check`, on by default).
    pub sanity_check: bool,
}

impl TlsCreds {
    /// Parse an object definition whose `qom-type` is `ty` (already taken from `o`).
    pub(crate) fn parse(ty: &str, id: String, o: &mut Opts) -> BlockResult<TlsCreds> {
        let kind = match ty {
            "tls-creds-x509" => TlsCredsKind::X509,
            "tls-creds-psk" => TlsCredsKind::Psk,
            "tls-creds-anon" => {
                return Err(BlockError::new(
                    ErrorKind::Unsupported,
                    format!("TLS credentials '{id}': anonymous credentials (tls-creds-anon) are not supported; use tls-creds-x509 or tls-creds-psk"),
                ))
            }
            _ => return Err(BlockError::option(format!("Parameter 'qom-type' does not accept value '{ty}'"))),
        };
        let endpoint = match o.take_enum("endpoint", &["client", "server"], "client")?.as_str() {
            "server" => TlsEndpoint::Server,
            _ => TlsEndpoint::Client,
        };
        let verify_peer = o.take_bool("verify-peer", true)?;
        let sanity_check = o.take_bool("sanity-check", true)?;
        let _ = o.take_bool("loaded", true)?;
        let username = o.take_str("username");
        let dir = o.take_str("dir");
        for (key, why) in [
            ("priority", "GnuTLS priority strings are not supported"),
            ("passwordid", "encrypted private keys are not supported"),
        ] {
            if o.take_str(key).is_some() {
                return Err(BlockError::new(ErrorKind::Unsupported, format!("TLS credentials '{id}': '{key}': {why}")));
            }
        }
        if let Some(k) = o.keys().next() {
            return Err(BlockError::option(format!("Parameter '{k}' is unexpected")));
        }
        if username.is_some() && kind != TlsCredsKind::Psk {
            return Err(BlockError::option("Parameter 'username' is unexpected"));
        }
        let dir = dir.ok_or_else(|| BlockError::option("Missing 'dir' property value"))?;
        Ok(TlsCreds {
            id,
            kind,
            dir: PathBuf::from(dir),
            endpoint,
            verify_peer,
            username: username.unwrap_or_else(|| "qemu".to_string()),
            sanity_check,
        })
    }

    /// The error for credentials used on the wrong side (QEMU's wording).
    pub fn check_endpoint(&self, want: TlsEndpoint) -> BlockResult<()> {
        if self.endpoint == want {
            return Ok(());
        }
        let which = match want {
            TlsEndpoint::Client => "client",
            TlsEndpoint::Server => "server",
        };
        Err(BlockError::option(format!("Expecting TLS credentials with a {which} endpoint")))
    }
}
