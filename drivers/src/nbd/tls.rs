//! TLS for NBD (`NBD_OPT_STARTTLS`), with rustls: client and server configurations built from
//! QEMU's `tls-creds-x509` objects, and [`Session`], the record layer a [`super::sock::Sock`]
//! runs its bytes through once the handshake is done.
//!
//! Credentials are read as QEMU reads them, from the object's `dir`: `ca-cert.pem` (required),
//! `ca-crl.pem` (optional), `server-cert.pem` + `server-key.pem` (server, required),
//! `client-cert.pem` + `client-key.pem` (client, optional; sent when present). Peer checks
//! follow QEMU's: with `verify-peer=on` (the default) a client checks the server's chain
//! against the CA and the server's name against the host it connected to (or
//! `tls-hostname`, which a Unix socket needs: without a name there is nothing to check, and
//! QEMU refuses too), and a server requires a client certificate signed by the CA. With `verify-peer=off` certificates are
//! not checked (the handshake's signatures still are). Only the ring provider is built in, so
//! no C toolchain beyond what `ring` needs is required.
//!
//! `tls-creds-psk` cannot be served by rustls, which has no external pre-shared keys; it is
//! refused by name.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use basalt_engine::{BlockError, BlockResult, ErrorKind, TlsCreds, TlsCredsKind, TlsEndpoint};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Plaintext encrypted per step of a large write (bounds the ciphertext held at once).
pub(crate) const SEAL_STEP: usize = 256 << 10;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn creds_err(msg: String) -> BlockError {
    BlockError::new(ErrorKind::InvalidOption, msg)
}

fn tls_err(what: &str, e: rustls::Error) -> BlockError {
    creds_err(format!("{what}: {e}"))
}

/// A credentials file: its path, and whether it is there (QEMU's wording when a required one
/// is not).
fn cred_file(dir: &Path, name: &str, required: bool) -> BlockResult<Option<std::path::PathBuf>> {
    let p = dir.join(name);
    match std::fs::metadata(&p) {
        Ok(_) => Ok(Some(p)),
        Err(e) if required || e.kind() != std::io::ErrorKind::NotFound => {
            let msg = basalt_engine::strerror(e.raw_os_error().unwrap_or(libc::EIO));
            Err(BlockError::new(ErrorKind::NotFound, format!("Unable to access credentials {}: {msg}", p.display())))
        }
        Err(_) => Ok(None),
    }
}

fn load_certs(path: &Path) -> BlockResult<Vec<CertificateDer<'static>>> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| creds_err(format!("Unable to load certificate {}: {e}", path.display())))?
        .collect();
    let certs = certs.map_err(|e| creds_err(format!("Unable to load certificate {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(creds_err(format!("Unable to load certificate {}: no certificate in the file", path.display())));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> BlockResult<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| creds_err(format!("Unable to load private key {}: {e}", path.display())))
}

fn load_crls(dir: &Path) -> BlockResult<Vec<CertificateRevocationListDer<'static>>> {
    let Some(path) = cred_file(dir, "ca-crl.pem", false)? else {
        return Ok(Vec::new());
    };
    let crls: Result<Vec<_>, _> = CertificateRevocationListDer::pem_file_iter(&path)
        .map_err(|e| creds_err(format!("Unable to load CRL {}: {e}", path.display())))?
        .collect();
    crls.map_err(|e| creds_err(format!("Unable to load CRL {}: {e}", path.display())))
}

fn load_roots(dir: &Path) -> BlockResult<Arc<RootCertStore>> {
    let path = cred_file(dir, "ca-cert.pem", true)?.expect("required file");
    let mut roots = RootCertStore::empty();
    for c in load_certs(&path)? {
        roots.add(c).map_err(|e| tls_err(&format!("Unable to load CA certificate {}", path.display()), e))?;
    }
    Ok(Arc::new(roots))
}

fn x509_only(creds: &TlsCreds) -> BlockResult<()> {
    if creds.kind == TlsCredsKind::Psk {
        return Err(BlockError::new(
            ErrorKind::Unsupported,
            format!(
                "TLS credentials '{}': tls-creds-psk is not supported (rustls has no pre-shared keys); use tls-creds-x509",
                creds.id
            ),
        ));
    }
    Ok(())
}

/// What a client needs to start TLS on a connection.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("name", &self.name).finish()
    }
}

impl ClientTls {
    /// Client credentials; `hostname` is the name the server's certificate must carry
    /// (required unless `verify-peer=off`).
    pub fn new(creds: &TlsCreds, hostname: Option<&str>) -> BlockResult<ClientTls> {
        x509_only(creds)?;
        creds.check_endpoint(TlsEndpoint::Client)?;
        if creds.verify_peer && hostname.is_none() {
            return Err(creds_err("No hostname for certificate validation".into()));
        }
        let dir = creds.dir.as_path();
        let provider = provider();
        let roots = load_roots(dir)?;
        let name = match hostname {
            Some(h) => ServerName::try_from(h.trim_start_matches('[').trim_end_matches(']').to_string())
                .map_err(|_| creds_err(format!("'{h}' is not a valid TLS host name")))?,
            None => ServerName::try_from("localhost").expect("valid name"),
        };
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .with_crls(load_crls(dir)?)
            .build()
            .map_err(|e| creds_err(format!("Unable to set up certificate checks: {e}")))?;
        let verifier = Arc::new(Verifier { inner, provider: provider.clone(), verify: creds.verify_peer });
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err("TLS set-up", e))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let cert = cred_file(dir, "client-cert.pem", false)?;
        let key = cred_file(dir, "client-key.pem", false)?;
        let mut config = match (cert, key) {
            (Some(c), Some(k)) => builder
                .with_client_auth_cert(load_certs(&c)?, load_key(&k)?)
                .map_err(|e| tls_err(&format!("Unable to use client certificate {}", c.display()), e))?,
            _ => builder.with_no_client_auth(),
        };
        config.enable_sni = hostname.is_some_and(|h| h.parse::<std::net::IpAddr>().is_err());
        Ok(ClientTls { config: Arc::new(config), name })
    }

    /// A new client session (the handshake starts with its first flight).
    pub fn session(&self) -> BlockResult<rustls::ClientConnection> {
        rustls::ClientConnection::new(self.config.clone(), self.name.clone()).map_err(|e| tls_err("TLS set-up", e))
    }
}

/// The server certificate check: chain and name, unless `verify-peer=off` (the handshake's
/// signatures are checked either way).
#[derive(Debug)]
struct Verifier {
    inner: Arc<WebPkiServerVerifier>,
    provider: Arc<CryptoProvider>,
    verify: bool,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !self.verify {
            return Ok(ServerCertVerified::assertion());
        }
        self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// What a server needs to offer TLS.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
}

impl ServerTls {
    /// Server credentials.
    pub fn new(creds: &TlsCreds) -> BlockResult<ServerTls> {
        x509_only(creds)?;
        creds.check_endpoint(TlsEndpoint::Server)?;
        let dir = creds.dir.as_path();
        let provider = provider();
        let roots = load_roots(dir)?;
        let cert = cred_file(dir, "server-cert.pem", true)?.expect("required file");
        let key = cred_file(dir, "server-key.pem", true)?.expect("required file");
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_err("TLS set-up", e))?;
        let builder = if creds.verify_peer {
            let v = WebPkiClientVerifier::builder_with_provider(roots, provider)
                .with_crls(load_crls(dir)?)
                .build()
                .map_err(|e| creds_err(format!("Unable to set up certificate checks: {e}")))?;
            builder.with_client_cert_verifier(v)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(load_certs(&cert)?, load_key(&key)?)
            .map_err(|e| tls_err(&format!("Unable to use server certificate {}", cert.display()), e))?;
        // No resumption: every NBD connection is a full handshake, as with QEMU.
        config.send_tls13_tickets = 0;
        Ok(ServerTls { config: Arc::new(config) })
    }

    /// A new server session.
    pub fn session(&self) -> std::io::Result<rustls::ServerConnection> {
        rustls::ServerConnection::new(self.config.clone()).map_err(std::io::Error::other)
    }
}

/// An established (or establishing) TLS session over a socket: ciphertext in, plaintext out
/// and the other way, with no I/O of its own. Ciphertext read but not yet taken in (rustls
/// takes at most a record's plaintext at a time) waits in `rx`.
pub struct Session {
    conn: rustls::Connection,
    rx: Vec<u8>,
    rx_head: usize,
}

impl Session {
    /// Wrap a connection (its output is not limited: the caller drains it after each step).
    pub fn new(conn: impl Into<rustls::Connection>) -> Session {
        let mut conn = conn.into();
        conn.set_buffer_limit(None);
        Session { conn, rx: Vec::new(), rx_head: 0 }
    }

    /// The handshake is still going.
    pub fn handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Ciphertext waiting to be sent.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Encrypt `plain` (queued until [`Session::take_output`]).
    pub fn seal(&mut self, plain: &[u8]) -> std::io::Result<()> {
        self.conn.writer().write_all(plain)
    }

    /// Move queued ciphertext into `out`, up to its free room; returns the count.
    pub fn take_output(&mut self, mut out: &mut [u8]) -> std::io::Result<usize> {
        let room = out.len();
        while self.conn.wants_write() && !out.is_empty() {
            if self.conn.write_tls(&mut out)? == 0 {
                break;
            }
        }
        Ok(room - out.len())
    }

    /// Queue a `close_notify` alert.
    pub fn close(&mut self) {
        self.conn.send_close_notify();
    }

    /// Take in ciphertext read from the socket (an empty slice: the socket reached its end).
    pub fn feed(&mut self, cipher: &[u8]) -> std::io::Result<()> {
        if cipher.is_empty() {
            match self.conn.read_tls(&mut &[][..]) {
                Err(e) if e.kind() != std::io::ErrorKind::Other => return Err(e),
                _ => return self.process(),
            }
        }
        if self.rx_head == self.rx.len() {
            self.rx.clear();
            self.rx_head = 0;
        } else if self.rx_head >= 64 << 10 {
            self.rx.drain(..self.rx_head);
            self.rx_head = 0;
        }
        self.rx.extend_from_slice(cipher);
        self.pump()
    }

    /// Hand buffered ciphertext to rustls until it has plaintext or needs more.
    fn pump(&mut self) -> std::io::Result<()> {
        while self.rx_head < self.rx.len() {
            let mut rest = &self.rx[self.rx_head..];
            let n = match self.conn.read_tls(&mut rest) {
                Ok(n) => n,
                // Backpressure: plaintext must be read first.
                Err(e) if e.kind() == std::io::ErrorKind::Other => return Ok(()),
                Err(e) => return Err(e),
            };
            self.rx_head += n;
            self.process()?;
            if n == 0 {
                break;
            }
        }
        Ok(())
    }

    fn process(&mut self) -> std::io::Result<()> {
        match self.conn.process_new_packets() {
            Ok(_) => Ok(()),
            Err(e) => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("TLS: {e}"))),
        }
    }

    /// Plaintext into `buf`: `Some(n)`, `Some(0)` at the end of the stream, `None` when more
    /// ciphertext is needed.
    pub fn open(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // The peer closed the socket without close_notify: the end all the same (a
                // message cut short is caught by the caller).
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Some(0)),
                Err(e) => return Err(e),
            }
            if self.rx_head == self.rx.len() {
                return Ok(None);
            }
            let before = self.rx_head;
            self.pump()?;
            if self.rx_head == before {
                return Ok(None);
            }
        }
    }

    /// Run the handshake over a blocking stream (the client's negotiation).
    pub fn handshake_blocking<S: Read + Write>(&mut self, s: &mut S) -> std::io::Result<()> {
        let mut buf = vec![0u8; 16 << 10];
        while self.conn.is_handshaking() || self.conn.wants_write() {
            self.flush_blocking(s)?;
            if !self.conn.is_handshaking() {
                break;
            }
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the peer closed during the TLS handshake"));
            }
            if let Err(e) = self.feed(&buf[..n]) {
                let _ = self.flush_blocking(s);
                return Err(e);
            }
        }
        Ok(())
    }

    fn flush_blocking<S: Write>(&mut self, s: &mut S) -> std::io::Result<()> {
        let mut out = vec![0u8; 16 << 10];
        loop {
            let n = self.take_output(&mut out)?;
            if n == 0 {
                return Ok(());
            }
            s.write_all(&out[..n])?;
        }
    }
}

/// A blocking stream carried over a [`Session`] (the client's handshake after STARTTLS).
pub struct TlsStream<S> {
    pub session: Session,
    pub inner: S,
}

impl<S: Read + Write> Read for TlsStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut cipher = [0u8; 4096];
        loop {
            if let Some(n) = self.session.open(buf)? {
                return Ok(n);
            }
            let n = self.inner.read(&mut cipher)?;
            self.session.feed(&cipher[..n])?;
        }
    }
}

impl<S: Read + Write> Write for TlsStream<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.session.seal(buf)?;
        self.session.flush_blocking(&mut self.inner)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.session.flush_blocking(&mut self.inner)?;
        self.inner.flush()
    }
}
