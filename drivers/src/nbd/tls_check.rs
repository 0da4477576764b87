//! `tls-creds-x509`'s `sanity-check` (on by default, as in QEMU): before credentials are used,
//! the certificates in the directory are checked the way QEMU checks them, with QEMU's
//! messages, so a mistake in them is reported when the server or client starts rather than
//! as a failed handshake later:
//! - the endpoint's own certificate (`server-cert.pem`, or `client-cert.pem` where a client
//!   has one) and every CA certificate in `ca-cert.pem`: within their validity period; basic
//!   constraints that make a CA certificate a CA and the endpoint's own not one; a critical key
//!   usage that allows certificate signing (a CA) or digital signature and key encipherment
//!   (the endpoint's own);
//! - the endpoint's own certificate: a critical extended key usage that allows its role (TLS
//!   server or client), and a chain to one of the CA certificates.
//!
//! The certificates are read with OpenSSL (the `openssl` crate, already used for PSK); the
//! extension flags come from its `X509_get_*` calls, which the safe crate does not wrap.

use std::path::Path;

use basalt_engine::{BlockError, BlockResult, ErrorKind, TlsEndpoint};
use foreign_types::ForeignTypeRef;
use openssl::asn1::Asn1Time;
use openssl::stack::Stack;
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::verify::X509VerifyFlags;
use openssl::x509::{X509Ref, X509StoreContext, X509VerifyResult, X509};

// The bits of OpenSSL's extension flags, key usage and extended key usage (x509v3.h).
const EXFLAG_BCONS: u32 = 0x1;
const EXFLAG_CA: u32 = 0x10;
const EXFLAG_KUSAGE: u32 = 0x2;
const EXFLAG_XKUSAGE: u32 = 0x4;
const KU_DIGITAL_SIGNATURE: u32 = 0x80;
const KU_KEY_ENCIPHERMENT: u32 = 0x20;
const KU_KEY_CERT_SIGN: u32 = 0x04;
const XKU_SSL_SERVER: u32 = 0x1;
const XKU_SSL_CLIENT: u32 = 0x2;
const XKU_ANYEKU: u32 = 0x100;

fn bad(msg: String) -> BlockError {
    BlockError::new(ErrorKind::InvalidOption, msg)
}

/// Check the x509 credentials in `dir` for `endpoint` (files that are not there are left to
/// the loader, which names them).
pub fn sanity_check(dir: &Path, endpoint: TlsEndpoint) -> BlockResult<()> {
    let server = endpoint == TlsEndpoint::Server;
    let ca_file = dir.join("ca-cert.pem");
    let own_file = dir.join(if server { "server-cert.pem" } else { "client-cert.pem" });
    let role = if server { "server" } else { "client" };
    let own = match std::fs::read(&own_file) {
        Ok(pem) => Some(
            X509::from_pem(&pem).map_err(|e| bad(format!("Unable to import {role} certificate {}: {e}", own_file.display())))?,
        ),
        Err(_) => None,
    };
    let cas = match std::fs::read(&ca_file) {
        Ok(pem) => {
            X509::stack_from_pem(&pem).map_err(|_| bad(format!("Unable to import CA certificate list {}", ca_file.display())))?
        }
        Err(_) => Vec::new(),
    };
    if let Some(c) = &own {
        check_cert(c, &own_file, server, false)?;
    }
    for c in &cas {
        check_cert(c, &ca_file, server, true)?;
    }
    if let (Some(c), false) = (&own, cas.is_empty()) {
        check_pair(c, &own_file, &cas, &ca_file, server)?;
    }
    Ok(())
}

/// One certificate's times, basic constraints, key usage and (not a CA) key purpose.
fn check_cert(cert: &X509Ref, file: &Path, server: bool, ca: bool) -> BlockResult<()> {
    let f = file.display();
    let who = if ca {
        "CA"
    } else if server {
        "server"
    } else {
        "client"
    };
    let now = Asn1Time::days_from_now(0).map_err(|e| bad(format!("cannot get current time: {e}")))?;
    if cert.not_after() < now {
        return Err(bad(format!("The {who} certificate {f} has expired")));
    }
    if cert.not_before() > now {
        return Err(bad(format!("The {who} certificate {f} is not yet active")));
    }
    let role = if server { "server" } else { "client" };
    let flags = extension_flags(cert);
    if flags & EXFLAG_BCONS != 0 {
        if flags & EXFLAG_CA != 0 && !ca {
            return Err(bad(format!("The certificate {f} basic constraints show a CA, but we need one for a {role}")));
        }
        if flags & EXFLAG_CA == 0 && ca {
            return Err(bad(format!("The certificate {f} basic constraints do not show a CA")));
        }
    } else if ca {
        return Err(bad(format!("The certificate {f} is missing basic constraints for a CA")));
    }
    if flags & EXFLAG_KUSAGE != 0 && critical(cert, openssl_sys::NID_key_usage) {
        let usage = key_usage(cert);
        if ca && usage & KU_KEY_CERT_SIGN == 0 {
            return Err(bad(format!("Certificate {f} usage does not permit certificate signing")));
        }
        if !ca && usage & KU_DIGITAL_SIGNATURE == 0 {
            return Err(bad(format!("Certificate {f} usage does not permit digital signature")));
        }
        if !ca && usage & KU_KEY_ENCIPHERMENT == 0 {
            return Err(bad(format!("Certificate {f} usage does not permit key encipherment")));
        }
    }
    if !ca && flags & EXFLAG_XKUSAGE != 0 && critical(cert, openssl_sys::NID_ext_key_usage) {
        let purposes = extended_key_usage(cert);
        let wanted = if server { XKU_SSL_SERVER } else { XKU_SSL_CLIENT };
        if purposes & (wanted | XKU_ANYEKU) == 0 {
            return Err(bad(format!("Certificate {f} purpose does not allow use with a TLS {role}")));
        }
    }
    Ok(())
}

/// The endpoint's own certificate chains to one of the CA certificates.
fn check_pair(cert: &X509Ref, file: &Path, cas: &[X509], ca_file: &Path, server: bool) -> BlockResult<()> {
    let role = if server { "server" } else { "client" };
    let cannot =
        || bad(format!("Unable to verify {role} certificate {} against CA certificate {}", file.display(), ca_file.display()));
    let mut store = X509StoreBuilder::new().map_err(|_| cannot())?;
    for c in cas {
        store.add_cert(c.clone()).map_err(|_| cannot())?;
    }
    // The times were checked above, certificate by certificate.
    store.set_flags(X509VerifyFlags::NO_CHECK_TIME).map_err(|_| cannot())?;
    let store = store.build();
    let chain = Stack::new().map_err(|_| cannot())?;
    let mut ctx = X509StoreContext::new().map_err(|_| cannot())?;
    let result = ctx.init(&store, cert, &chain, |c| c.verify_cert().map(|_| c.error())).map_err(|_| cannot())?;
    if result == X509VerifyResult::OK {
        return Ok(());
    }
    let reason = match result.as_raw() {
        openssl_sys::X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT
        | openssl_sys::X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        | openssl_sys::X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN
        | openssl_sys::X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT => "The certificate hasn't got a known issuer",
        openssl_sys::X509_V_ERR_CERT_REVOKED => "The certificate has been revoked",
        _ => "The certificate is not trusted",
    };
    Err(bad(format!("Our own certificate {} failed validation against {}: {reason}", file.display(), ca_file.display())))
}

fn extension_flags(cert: &X509Ref) -> u32 {
    // SAFETY: `cert` is a live certificate; the call only reads (and caches) its extensions.
    unsafe { openssl_sys::X509_get_extension_flags(cert.as_ptr()) as u32 }
}

fn key_usage(cert: &X509Ref) -> u32 {
    // SAFETY: as above.
    unsafe { openssl_sys::X509_get_key_usage(cert.as_ptr()) as u32 }
}

fn extended_key_usage(cert: &X509Ref) -> u32 {
    // SAFETY: as above.
    unsafe { openssl_sys::X509_get_extended_key_usage(cert.as_ptr()) as u32 }
}

/// Whether the certificate's extension `nid` is marked critical.
fn critical(cert: &X509Ref, nid: libc::c_int) -> bool {
    // SAFETY: lookups on a live certificate; the extension pointer is checked and only read
    // while the certificate lives.
    unsafe {
        let i = openssl_sys::X509_get_ext_by_NID(cert.as_ptr(), nid, -1);
        if i < 0 {
            return false;
        }
        let ext = openssl_sys::X509_get_ext(cert.as_ptr(), i);
        !ext.is_null() && openssl_sys::X509_EXTENSION_get_critical(ext) > 0
    }
}
