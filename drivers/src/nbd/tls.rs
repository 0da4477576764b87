//! TLS for NBD (`NBD_OPT_STARTTLS`): client and server set-ups built from QEMU's
//! `tls-creds-x509` objects (rustls) and `tls-creds-psk` objects (OpenSSL, see below), and
//! [`Session`], the record layer a [`super::sock::Sock`] runs its bytes through, the same for
//! both.
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
//! Pre-shared keys: rustls has no external PSKs, so `tls-creds-psk` runs on the system's
//! OpenSSL (libssl), through its PSK callbacks (TLS 1.3 external PSK, or the TLS 1.2 PSK
//! suites), over memory buffers so the socket I/O stays ours. The keys come from `keys.psk`
//! in the object's `dir`, one `username:hexkey` per line as QEMU (and GnuTLS's psktool)
//! write it: a client sends its `username` (default `qemu`) with that user's key, a server
//! takes any user the file lists.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use basalt_engine::{BlockError, BlockResult, ErrorKind, TlsCreds, TlsCredsKind, TlsEndpoint};
use openssl::ssl::{ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslStream, SslVerifyMode, SslVersion};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use zeroize::Zeroizing;

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

/// The users and keys of a `keys.psk` file.
fn load_psk(dir: &Path) -> BlockResult<Vec<(String, Zeroizing<Vec<u8>>)>> {
    let path = cred_file(dir, "keys.psk", true)?.expect("required file");
    let text = Zeroizing::new(
        std::fs::read_to_string(&path).map_err(|e| creds_err(format!("Unable to read PSK file {}: {e}", path.display())))?,
    );
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (user, hex) =
            line.split_once(':').ok_or_else(|| creds_err(format!("Malformed line in PSK file {}", path.display())))?;
        let key = decode_hex(hex.trim())
            .ok_or_else(|| creds_err(format!("Unable to decode PSK key of user {user} in {}", path.display())))?;
        out.push((user.to_string(), key));
    }
    Ok(out)
}

fn decode_hex(s: &str) -> Option<Zeroizing<Vec<u8>>> {
    if s.is_empty() || !s.len().is_multiple_of(2) {
        return None;
    }
    let mut out = Zeroizing::new(Vec::with_capacity(s.len() / 2));
    for pair in s.as_bytes().chunks(2) {
        out.push(u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?);
    }
    Some(out)
}

fn ossl_err(e: openssl::error::ErrorStack) -> BlockError {
    creds_err(format!("TLS set-up: {e}"))
}

/// An OpenSSL context for PSK: no certificates, PSK suites for TLS 1.2 next to TLS 1.3.
fn psk_context(client: bool) -> BlockResult<SslContextBuilder> {
    let method = if client { SslMethod::tls_client() } else { SslMethod::tls_server() };
    let mut b = SslContextBuilder::new(method).map_err(ossl_err)?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2)).map_err(ossl_err)?;
    b.set_cipher_list("ECDHE-PSK:DHE-PSK:PSK:!aNULL:!eNULL:!NULL:!3DES:!RC4:!MD5").map_err(ossl_err)?;
    b.set_verify(SslVerifyMode::NONE);
    Ok(b)
}

/// Copy `key` into OpenSSL's PSK buffer; its length.
fn put_key(key: &[u8], out: &mut [u8]) -> Result<usize, openssl::error::ErrorStack> {
    if key.len() > out.len() {
        return Ok(0);
    }
    out[..key.len()].copy_from_slice(key);
    Ok(key.len())
}

#[derive(Clone)]
enum ClientKind {
    X509 { config: Arc<rustls::ClientConfig>, name: ServerName<'static> },
    Psk(SslContext),
}

/// What a client needs to start TLS on a connection.
#[derive(Clone)]
pub struct ClientTls {
    kind: ClientKind,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            ClientKind::X509 { name, .. } => f.debug_struct("ClientTls").field("name", name).finish(),
            ClientKind::Psk(_) => f.write_str("ClientTls(psk)"),
        }
    }
}

impl ClientTls {
    /// Client credentials; `hostname` is the name the server's certificate must carry
    /// (required for x509 unless `verify-peer=off`).
    pub fn new(creds: &TlsCreds, hostname: Option<&str>) -> BlockResult<ClientTls> {
        creds.check_endpoint(TlsEndpoint::Client)?;
        if creds.kind == TlsCredsKind::Psk {
            let keys = load_psk(&creds.dir)?;
            let key = keys.into_iter().find(|(u, _)| *u == creds.username).map(|(_, k)| k).ok_or_else(|| {
                creds_err(format!("Username {} not found in PSK file {}", creds.username, creds.dir.join("keys.psk").display()))
            })?;
            let mut b = psk_context(true)?;
            let user = creds.username.clone().into_bytes();
            b.set_psk_client_callback(move |_, _hint, identity, psk| {
                if user.len() >= identity.len() {
                    return Ok(0);
                }
                identity[..user.len()].copy_from_slice(&user);
                identity[user.len()] = 0;
                put_key(&key, psk)
            });
            return Ok(ClientTls { kind: ClientKind::Psk(b.build()) });
        }
        if creds.verify_peer && hostname.is_none() {
            return Err(creds_err("No hostname for certificate validation".into()));
        }
        let dir = creds.dir.as_path();
        let provider = provider();
        let roots = load_roots(dir)?;
        if creds.sanity_check {
            super::tls_check::sanity_check(dir, TlsEndpoint::Client)?;
        }
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
        Ok(ClientTls { kind: ClientKind::X509 { config: Arc::new(config), name } })
    }

    /// A new client session (its first flight is queued).
    pub fn session(&self) -> BlockResult<Session> {
        match &self.kind {
            ClientKind::X509 { config, name } => rustls::ClientConnection::new(config.clone(), name.clone())
                .map(Session::rustls)
                .map_err(|e| tls_err("TLS set-up", e)),
            ClientKind::Psk(ctx) => Session::openssl(ctx, true).map_err(|e| creds_err(format!("TLS set-up: {e}"))),
        }
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
pub enum ServerTls {
    X509(Arc<rustls::ServerConfig>),
    Psk(SslContext),
}

impl ServerTls {
    /// Server credentials.
    pub fn new(creds: &TlsCreds) -> BlockResult<ServerTls> {
        creds.check_endpoint(TlsEndpoint::Server)?;
        let dir = creds.dir.as_path();
        if creds.kind == TlsCredsKind::Psk {
            let keys = load_psk(dir)?;
            let mut b = psk_context(false)?;
            let user_index = psk_user_index()?;
            b.set_psk_server_callback(move |ssl, identity, psk| {
                let Some(id) = identity else { return Ok(0) };
                match keys.iter().find(|(u, _)| u.as_bytes() == id) {
                    Some((user, key)) => {
                        // Kept for the authorization check (OpenSSL does not report a TLS 1.3
                        // external PSK's identity afterwards).
                        ssl.set_ex_data(user_index, user.clone());
                        put_key(key, psk)
                    }
                    None => Ok(0),
                }
            });
            return Ok(ServerTls::Psk(b.build()));
        }
        let provider = provider();
        let roots = load_roots(dir)?;
        let cert = cred_file(dir, "server-cert.pem", true)?.expect("required file");
        let key = cred_file(dir, "server-key.pem", true)?.expect("required file");
        if creds.sanity_check {
            super::tls_check::sanity_check(dir, TlsEndpoint::Server)?;
        }
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
        Ok(ServerTls::X509(Arc::new(config)))
    }

    /// A new server session.
    pub fn session(&self) -> std::io::Result<Session> {
        match self {
            ServerTls::X509(config) => {
                rustls::ServerConnection::new(config.clone()).map(Session::rustls).map_err(std::io::Error::other)
            }
            ServerTls::Psk(ctx) => Session::openssl(ctx, false),
        }
    }
}

/// Where a PSK server session keeps the username its client proved (one index for the
/// process, made once).
fn psk_user_index() -> BlockResult<openssl::ex_data::Index<Ssl, String>> {
    static INDEX: std::sync::OnceLock<Option<openssl::ex_data::Index<Ssl, String>>> = std::sync::OnceLock::new();
    INDEX.get_or_init(|| Ssl::new_ex_index().ok()).ok_or_else(|| creds_err("OpenSSL has no room for session data".into()))
}

/// How a peer proved who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerKind {
    X509,
    Psk,
}

/// An established (or establishing) TLS session over a socket: ciphertext in, plaintext out
/// and the other way, with no I/O of its own.
pub struct Session(Engine);

enum Engine {
    /// Ciphertext read but not yet taken in (rustls takes at most a record's plaintext at a
    /// time) waits in `rx` from `rx_head`.
    Rustls {
        conn: Box<rustls::Connection>,
        rx: Vec<u8>,
        rx_head: usize,
    },
    OpenSsl {
        stream: Box<SslStream<Pipe>>,
        done: bool,
    },
}

/// OpenSSL's side of the socket: ciphertext fed in, and ciphertext to send.
#[derive(Default)]
struct Pipe {
    input: Vec<u8>,
    head: usize,
    eof: bool,
    output: Vec<u8>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let have = &self.input[self.head..];
        if have.is_empty() {
            return if self.eof { Ok(0) } else { Err(std::io::ErrorKind::WouldBlock.into()) };
        }
        let n = have.len().min(buf.len());
        buf[..n].copy_from_slice(&have[..n]);
        self.head += n;
        if self.head == self.input.len() {
            self.input.clear();
            self.head = 0;
        }
        Ok(n)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn ossl_io(e: openssl::ssl::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

fn would_block(e: &openssl::ssl::Error) -> bool {
    e.code() == ErrorCode::WANT_READ || e.code() == ErrorCode::WANT_WRITE
}

impl Session {
    /// A rustls connection (its output is not limited: the caller drains it after each step).
    fn rustls(conn: impl Into<rustls::Connection>) -> Session {
        let mut conn = conn.into();
        conn.set_buffer_limit(None);
        Session(Engine::Rustls { conn: Box::new(conn), rx: Vec::new(), rx_head: 0 })
    }

    /// An OpenSSL session on `ctx`; a client's first flight is queued.
    fn openssl(ctx: &SslContext, client: bool) -> std::io::Result<Session> {
        let mut ssl = Ssl::new(ctx).map_err(std::io::Error::other)?;
        if client {
            ssl.set_connect_state();
        } else {
            ssl.set_accept_state();
        }
        let stream = SslStream::new(ssl, Pipe::default()).map_err(std::io::Error::other)?;
        let mut s = Session(Engine::OpenSsl { stream: Box::new(stream), done: false });
        s.step()?;
        Ok(s)
    }

    /// Move an OpenSSL handshake on as far as the input allows.
    fn step(&mut self) -> std::io::Result<()> {
        if let Engine::OpenSsl { stream, done } = &mut self.0 {
            if !*done {
                match stream.do_handshake() {
                    Ok(()) => *done = true,
                    Err(e) if would_block(&e) => {}
                    Err(e) => return Err(ossl_io(e)),
                }
            }
        }
        Ok(())
    }

    /// Who the peer proved to be, for an authorization check ([`super::tls_peer`]): the
    /// subject of its x509 certificate, or its PSK username; `None` when it showed neither (a
    /// client not asked for a certificate: `verify-peer=off`). The name is `None` when the
    /// peer showed a certificate whose subject cannot be read (to be refused, not let by).
    pub fn peer_identity(&self) -> Option<(PeerKind, Option<String>)> {
        match &self.0 {
            Engine::Rustls { conn, .. } => {
                let cert = conn.peer_certificates()?.first()?;
                Some((PeerKind::X509, super::tls_peer::subject_dn(cert.as_ref())))
            }
            Engine::OpenSsl { stream, .. } => {
                let user = stream.ssl().ex_data(psk_user_index().ok()?)?;
                Some((PeerKind::Psk, Some(user.clone())))
            }
        }
    }

    /// The handshake is still going.
    pub fn handshaking(&self) -> bool {
        match &self.0 {
            Engine::Rustls { conn, .. } => conn.is_handshaking(),
            Engine::OpenSsl { done, .. } => !done,
        }
    }

    /// Ciphertext waiting to be sent.
    pub fn wants_write(&self) -> bool {
        match &self.0 {
            Engine::Rustls { conn, .. } => conn.wants_write(),
            Engine::OpenSsl { stream, .. } => !stream.get_ref().output.is_empty(),
        }
    }

    /// Encrypt `plain` (queued until [`Session::take_output`]).
    pub fn seal(&mut self, mut plain: &[u8]) -> std::io::Result<()> {
        match &mut self.0 {
            Engine::Rustls { conn, .. } => conn.writer().write_all(plain),
            Engine::OpenSsl { stream, .. } => {
                while !plain.is_empty() {
                    let n = stream.ssl_write(plain).map_err(ossl_io)?;
                    plain = &plain[n..];
                }
                Ok(())
            }
        }
    }

    /// Move queued ciphertext into `out`, up to its free room; returns the count.
    pub fn take_output(&mut self, mut out: &mut [u8]) -> std::io::Result<usize> {
        let room = out.len();
        match &mut self.0 {
            Engine::Rustls { conn, .. } => {
                while conn.wants_write() && !out.is_empty() {
                    if conn.write_tls(&mut out)? == 0 {
                        break;
                    }
                }
            }
            Engine::OpenSsl { stream, .. } => {
                let pending = &mut stream.get_mut().output;
                let n = pending.len().min(out.len());
                out[..n].copy_from_slice(&pending[..n]);
                pending.drain(..n);
                return Ok(n);
            }
        }
        Ok(room - out.len())
    }

    /// Queue a `close_notify` alert.
    pub fn close(&mut self) {
        match &mut self.0 {
            Engine::Rustls { conn, .. } => conn.send_close_notify(),
            Engine::OpenSsl { stream, .. } => {
                let _ = stream.shutdown();
            }
        }
    }

    /// Take in ciphertext read from the socket (an empty slice: the socket reached its end).
    pub fn feed(&mut self, cipher: &[u8]) -> std::io::Result<()> {
        match &mut self.0 {
            Engine::OpenSsl { stream, .. } => {
                let pipe = stream.get_mut();
                if cipher.is_empty() {
                    pipe.eof = true;
                } else {
                    pipe.input.extend_from_slice(cipher);
                }
                return self.step();
            }
            Engine::Rustls { conn, rx, rx_head } => {
                if cipher.is_empty() {
                    match conn.read_tls(&mut &[][..]) {
                        Err(e) if e.kind() != std::io::ErrorKind::Other => return Err(e),
                        _ => return process(conn),
                    }
                }
                if *rx_head == rx.len() {
                    rx.clear();
                    *rx_head = 0;
                } else if *rx_head >= 64 << 10 {
                    rx.drain(..*rx_head);
                    *rx_head = 0;
                }
                rx.extend_from_slice(cipher);
            }
        }
        self.pump()
    }

    /// Hand buffered ciphertext to rustls until it has plaintext or needs more.
    fn pump(&mut self) -> std::io::Result<()> {
        let Engine::Rustls { conn, rx, rx_head } = &mut self.0 else { return Ok(()) };
        while *rx_head < rx.len() {
            let mut rest = &rx[*rx_head..];
            let n = match conn.read_tls(&mut rest) {
                Ok(n) => n,
                // Backpressure: plaintext must be read first.
                Err(e) if e.kind() == std::io::ErrorKind::Other => return Ok(()),
                Err(e) => return Err(e),
            };
            *rx_head += n;
            process(conn)?;
            if n == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Plaintext into `buf`: `Some(n)`, `Some(0)` at the end of the stream, `None` when more
    /// ciphertext is needed.
    pub fn open(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        if let Engine::OpenSsl { stream, done } = &mut self.0 {
            if !*done {
                return Ok(None);
            }
            return match stream.ssl_read(buf) {
                Ok(n) => Ok(Some(n)),
                Err(e) if would_block(&e) => Ok(None),
                // close_notify, or the socket's end without it (a message cut short is caught
                // by the caller).
                Err(e) if e.code() == ErrorCode::ZERO_RETURN || e.code() == ErrorCode::SYSCALL => Ok(Some(0)),
                Err(e) => Err(ossl_io(e)),
            };
        }
        loop {
            let Engine::Rustls { conn, rx, rx_head } = &mut self.0 else { unreachable!("rustls session") };
            match conn.reader().read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // The peer closed the socket without close_notify: the end all the same (a
                // message cut short is caught by the caller).
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Some(0)),
                Err(e) => return Err(e),
            }
            if *rx_head == rx.len() {
                return Ok(None);
            }
            let before = *rx_head;
            self.pump()?;
            let Engine::Rustls { rx_head, .. } = &self.0 else { unreachable!("rustls session") };
            if *rx_head == before {
                return Ok(None);
            }
        }
    }

    /// Run the handshake over a blocking stream (the client's negotiation).
    pub fn handshake_blocking<S: Read + Write>(&mut self, s: &mut S) -> std::io::Result<()> {
        let mut buf = vec![0u8; 16 << 10];
        while self.handshaking() || self.wants_write() {
            self.flush_blocking(s)?;
            if !self.handshaking() {
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

fn process(conn: &mut rustls::Connection) -> std::io::Result<()> {
    match conn.process_new_packets() {
        Ok(_) => Ok(()),
        Err(e) => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("TLS: {e}"))),
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
            if n == 0 {
                return Ok(self.session.open(buf)?.unwrap_or(0));
            }
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
