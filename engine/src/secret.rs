//! QEMU's user-creatable objects that drivers look up by id: `secret` objects (passwords and
//! keys given on a command line as `--object secret,id=ID,data=STRING[,format=raw|base64]` or
//! `file=PATH`, for LUKS's `key-secret` and qcow2's `encrypt.key-secret`) and TLS credentials
//! (`tls-creds-x509`, `tls-creds-psk`: [`crate::TlsCreds`], for NBD's `tls-creds`) and
//! authorization objects (`authz-simple`, `authz-list`, `authz-listfile`: [`crate::Authz`], for
//! NBD's `tls-authz`) and I/O threads (`iothread`: [`IoThread`], which a storage daemon's
//! exports run on). A definition is `key=value,...` or, as QEMU also takes it, a JSON object.
//!
//! [`Secrets`] is a cheap handle (`Clone` shares it) that is `Send + Sync`; a [`crate::Graph`]
//! carries one, so a driver finds an object at open or create time through
//! [`crate::Graph::secrets`]. Guarantees: definitions are checked as QEMU checks them, with
//! QEMU's messages (unknown or missing parameters, `data` and `file` both or neither given,
//! invalid base64, an id that is not an identifier, a duplicate id); secret bytes are wiped from
//! memory when the last handle drops. AES-encrypted secrets (`keyid`, `iv`) are refused with a
//! clear error rather than half supported.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use zeroize::Zeroizing;

use crate::authz::{object_opts, Authz};
use crate::error::{BlockError, BlockResult, ErrorKind};
use crate::options::Opts;
use crate::tls_creds::TlsCreds;

/// Largest secret file read (QEMU reads whole files; a passphrase or key is tiny).
const MAX_SECRET_FILE: u64 = 1 << 20;

/// Secret bytes, wiped when dropped.
type SecretBytes = Arc<Zeroizing<Vec<u8>>>;

/// A registry of secrets and TLS credentials by id, shared by every clone of the handle.
#[derive(Clone, Default)]
pub struct Secrets {
    map: Arc<Mutex<HashMap<String, SecretBytes>>>,
    tls: Arc<Mutex<HashMap<String, TlsCreds>>>,
    authz: Arc<Mutex<HashMap<String, Arc<Authz>>>>,
    iothreads: Arc<Mutex<HashMap<String, IoThread>>>,
}

/// An `iothread` object: a reactor of its own for the exports placed on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoThread {
    /// How long the reactor polls before it sleeps when idle (`poll-max-ns`; QEMU's default
    /// when not given).
    pub poll_max_ns: Option<u64>,
}

impl IoThread {
    /// The object's options past `qom-type` and `id`. QEMU's adaptive polling (`poll-grow`,
    /// `poll-shrink`) and its per-thread batch and pool sizes have no counterpart in a reactor
    /// and are refused by name.
    fn parse(o: &mut Opts) -> BlockResult<IoThread> {
        let poll_max_ns = match o.take_str("poll-max-ns") {
            None => None,
            Some(v) => match v.parse::<i64>() {
                Ok(n) if n >= 0 => Some(n as u64),
                _ => return Err(BlockError::option("poll-max-ns value must be in range [0, 9223372036854775807]")),
            },
        };
        if let Some(k) = o.keys().next() {
            return Err(match k {
                "poll-grow" | "poll-shrink" | "aio-max-batch" | "thread-pool-min" | "thread-pool-max" => {
                    BlockError::option(format!("Parameter '{k}' is not supported: a reactor polls for poll-max-ns, then sleeps"))
                }
                _ => BlockError::option(format!("Parameter '{k}' is unexpected")),
            });
        }
        Ok(IoThread { poll_max_ns })
    }
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret bytes: only which ids exist.
        let mut ids: Vec<String> = self.lock().keys().cloned().collect();
        ids.sort();
        f.debug_struct("Secrets").field("ids", &ids).finish()
    }
}

impl Secrets {
    /// An empty registry.
    pub fn new() -> Secrets {
        Secrets::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, SecretBytes>> {
        locked(&self.map)
    }

    /// Whether `id` names an object of any kind.
    fn defined(&self, id: &str) -> bool {
        self.lock().contains_key(id)
            || locked(&self.tls).contains_key(id)
            || locked(&self.authz).contains_key(id)
            || locked(&self.iothreads).contains_key(id)
    }

    /// Add an object from its command-line definition (`secret,id=ID,data=...`,
    /// `tls-creds-x509,id=ID,...`, `authz-simple,id=ID,...`; the first key may also be written
    /// `qom-type=TYPE`; or a JSON object). Objects of other types are refused.
    pub fn add_object(&self, def: &str) -> BlockResult<()> {
        let mut o = object_opts(def)?;
        let ty = o.take_str("qom-type").ok_or_else(|| BlockError::option("Parameter 'qom-type' is missing"))?;
        if !matches!(ty.as_str(), "secret" | "tls-creds-x509" | "tls-creds-psk" | "tls-creds-anon" | "iothread")
            && !Authz::is_type(&ty)
        {
            return Err(BlockError::option(format!("Parameter 'qom-type' does not accept value '{ty}'")));
        }
        let id = o.take_str("id").ok_or_else(|| BlockError::option("Parameter 'id' is missing"))?;
        if !is_identifier(&id) {
            return Err(BlockError::option(
                "Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter.",
            ));
        }
        if ty == "secret" {
            let data = parse_secret(&id, o)?;
            return self.add(&id, data);
        }
        if ty == "iothread" {
            let t = IoThread::parse(&mut o)?;
            self.check_new_id(&id)?;
            locked(&self.iothreads).insert(id, t);
            return Ok(());
        }
        if Authz::is_type(&ty) {
            let a = Authz::parse(&ty, &mut o)?;
            self.check_new_id(&id)?;
            locked(&self.authz).insert(id, Arc::new(a));
            return Ok(());
        }
        let creds = TlsCreds::parse(&ty, id.clone(), &mut o)?;
        self.check_new_id(&id)?;
        locked(&self.tls).insert(id, creds);
        Ok(())
    }

    fn check_new_id(&self, id: &str) -> BlockResult<()> {
        if self.defined(id) {
            return Err(BlockError::option(format!("attempt to add duplicate property '{id}' to object (type 'container')")));
        }
        Ok(())
    }

    /// Add the secret `id` holding `data`.
    pub fn add(&self, id: &str, data: Vec<u8>) -> BlockResult<()> {
        self.check_new_id(id)?;
        self.lock().insert(id.to_string(), Arc::new(Zeroizing::new(data)));
        Ok(())
    }

    /// The TLS credentials `id` (QEMU's wording when there are none, or when `id` is
    /// another kind of object).
    pub fn tls_creds(&self, id: &str) -> BlockResult<TlsCreds> {
        if let Some(c) = locked(&self.tls).get(id) {
            return Ok(c.clone());
        }
        if self.contains(id) {
            return Err(BlockError::option(format!("Object with id '{id}' is not TLS credentials")));
        }
        Err(BlockError::new(ErrorKind::NotFound, format!("No TLS credentials with id '{id}'")))
    }

    /// The authorization object `id` (QEMU's wording when there is none, or when `id` is
    /// another kind of object).
    pub fn authz(&self, id: &str) -> BlockResult<Arc<Authz>> {
        if let Some(a) = locked(&self.authz).get(id) {
            return Ok(a.clone());
        }
        if self.defined(id) {
            return Err(BlockError::option(format!("Object '{id}' is not a QAuthZ subclass")));
        }
        Err(BlockError::new(ErrorKind::NotFound, format!("Cannot find QAuthZ object ID {id}")))
    }

    /// The `iothread` object `id` (QEMU's wording when there is none).
    pub fn iothread(&self, id: &str) -> BlockResult<IoThread> {
        match locked(&self.iothreads).get(id) {
            Some(t) => Ok(*t),
            None => Err(BlockError::new(ErrorKind::NotFound, format!("iothread \"{id}\" not found"))),
        }
    }

    /// The bytes of the secret `id`.
    pub fn get(&self, id: &str) -> BlockResult<Vec<u8>> {
        let s = self.lock().get(id).cloned();
        match s {
            Some(s) => Ok(s.as_slice().to_vec()),
            None => Err(BlockError::new(ErrorKind::NotFound, format!("No secret with id '{id}'"))),
        }
    }

    /// The secret `id` as UTF-8 text (passphrases), with QEMU's error when it is not.
    pub fn get_utf8(&self, id: &str) -> BlockResult<Zeroizing<String>> {
        let bytes = Zeroizing::new(self.get(id)?);
        match std::str::from_utf8(&bytes) {
            Ok(s) => Ok(Zeroizing::new(s.to_string())),
            Err(_) => Err(BlockError::option(format!("Data from secret {id} is not valid UTF-8"))),
        }
    }

    /// Whether `id` is defined.
    pub fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }
}

/// A registry map, locked. A panic while holding a lock cannot leave a map half-updated (every
/// update is one insert), so a poisoned lock is still usable.
fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The bytes of a `secret` object's definition (after its type and id).
fn parse_secret(id: &str, mut o: Opts) -> BlockResult<Vec<u8>> {
    let data = o.take_str("data");
    let file = o.take_str("file");
    let base64 = match o.take_str("format").as_deref() {
        None | Some("raw") => false,
        Some("base64") => true,
        Some(f) => return Err(BlockError::option(format!("Parameter 'format' does not accept value '{f}'"))),
    };
    let keyid = o.take_str("keyid");
    let iv = o.take_str("iv");
    if let Some(k) = o.keys().next() {
        return Err(BlockError::option(format!("Parameter '{k}' is unexpected")));
    }
    if keyid.is_some() || iv.is_some() {
        return Err(BlockError::new(
            ErrorKind::Unsupported,
            format!("Secret '{id}': AES-encrypted secrets (keyid, iv) are not supported"),
        ));
    }
    let raw = Zeroizing::new(match (data, file) {
        (Some(_), Some(_)) => return Err(BlockError::option("'file' and 'data' are mutually exclusive")),
        (None, None) => return Err(BlockError::option("Either 'file' or 'data' must be provided")),
        (Some(d), None) => d.into_bytes(),
        (None, Some(path)) => read_secret_file(&path)?,
    });
    if base64 {
        base64_decode(&raw)
    } else {
        Ok(raw.to_vec())
    }
}

fn read_secret_file(path: &str) -> BlockResult<Vec<u8>> {
    use std::io::Read;
    let fail = |e: std::io::Error| {
        let msg = crate::error::strerror(e.raw_os_error().unwrap_or(libc::EIO));
        BlockError::new(ErrorKind::NotFound, format!("Unable to read {path}: Failed to open file “{path}”: {msg}"))
    };
    let f = std::fs::File::open(path).map_err(fail)?;
    let mut out = Vec::new();
    f.take(MAX_SECRET_FILE + 1).read_to_end(&mut out).map_err(fail)?;
    if out.len() as u64 > MAX_SECRET_FILE {
        return Err(BlockError::option(format!("Unable to read {path}: secret files are limited to {MAX_SECRET_FILE} bytes")));
    }
    Ok(out)
}

/// QOM's identifier rule: a letter, then letters, digits, `-`, `.`, `_`.
fn is_identifier(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic()) && c.all(|ch| ch.is_ascii_alphanumeric() || "-._".contains(ch))
}

/// Base64 as QEMU accepts it: any character outside the alphabet (and `=`) is an error; `=`
/// is skipped wherever it stands and a trailing partial group yields the bytes it completes
/// (QEMU's decoder is as lenient).
fn base64_decode(s: &[u8]) -> BlockResult<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3 + 3);
    let (mut acc, mut n) = (0u32, 0u32);
    for &c in s {
        if c == b'=' {
            continue;
        }
        let v = val(c).ok_or_else(|| BlockError::option("Base64 data contains invalid characters"))?;
        acc = (acc << 6) | v;
        n += 1;
        if n == 4 {
            out.extend_from_slice(&acc.to_be_bytes()[1..]);
            acc = 0;
            n = 0;
        }
    }
    match n {
        2 => out.push((acc >> 4) as u8),
        3 => out.extend_from_slice(&((acc >> 2) as u16).to_be_bytes()),
        _ => {}
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_base64_and_file() {
        let s = Secrets::new();
        s.add_object("secret,id=a,data=abc").unwrap();
        s.add_object("qom-type=secret,id=b,data=YWJjZA==,format=base64").unwrap();
        s.add_object("secret,id=c,data=YWJ,format=base64").unwrap();
        let dir = std::env::temp_dir().join(format!("basalt-secret-{}", std::process::id()));
        std::fs::write(&dir, b"pw\n").unwrap();
        s.add_object(&format!("secret,id=d,file={}", dir.display())).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(s.get("a").unwrap(), b"abc");
        assert_eq!(s.get("b").unwrap(), b"abcd");
        assert_eq!(s.get("c").unwrap(), b"ab");
        assert_eq!(s.get("d").unwrap(), b"pw\n");
        let clone = s.clone();
        clone.add("e", vec![1]).unwrap();
        assert!(s.contains("e"));
        assert!(!format!("{s:?}").contains("abc"));
    }

    #[test]
    fn tls_credentials() {
        use crate::{TlsCredsKind, TlsEndpoint};
        let s = Secrets::new();
        s.add_object("tls-creds-x509,id=x,dir=/etc/pki,endpoint=server,verify-peer=off").unwrap();
        s.add_object("qom-type=tls-creds-psk,id=p,dir=/k,username=alice").unwrap();
        s.add_object("secret,id=sec,data=a").unwrap();
        let x = s.tls_creds("x").unwrap();
        assert_eq!((x.kind, x.endpoint, x.verify_peer), (TlsCredsKind::X509, TlsEndpoint::Server, false));
        assert_eq!(x.dir, std::path::Path::new("/etc/pki"));
        let p = s.tls_creds("p").unwrap();
        assert_eq!(
            (p.kind, p.endpoint, p.verify_peer, p.username.as_str()),
            (TlsCredsKind::Psk, TlsEndpoint::Client, true, "alice")
        );
        assert_eq!(s.tls_creds("nope").unwrap_err().msg, "No TLS credentials with id 'nope'");
        assert_eq!(s.tls_creds("sec").unwrap_err().msg, "Object with id 'sec' is not TLS credentials");
        assert!(s.add_object("secret,id=x,data=b").unwrap_err().msg.contains("duplicate"));
        assert_eq!(x.check_endpoint(TlsEndpoint::Client).unwrap_err().msg, "Expecting TLS credentials with a client endpoint");
    }

    #[test]
    fn iothreads() {
        let s = Secrets::new();
        s.add_object("iothread,id=io0").unwrap();
        s.add_object(r#"{"qom-type": "iothread", "id": "io1", "poll-max-ns": 1000}"#).unwrap();
        assert_eq!(s.iothread("io0").unwrap(), IoThread { poll_max_ns: None });
        assert_eq!(s.iothread("io1").unwrap(), IoThread { poll_max_ns: Some(1000) });
        assert_eq!(s.iothread("io2").unwrap_err().msg, "iothread \"io2\" not found");
        s.add_object("secret,id=sec,data=a").unwrap();
        let dup = "attempt to add duplicate property 'sec' to object (type 'container')";
        assert_eq!(s.add_object("iothread,id=sec").unwrap_err().msg, dup);
        assert!(s.add_object("secret,id=io0,data=a").unwrap_err().msg.contains("duplicate"));
        assert_eq!(s.iothread("sec").unwrap_err().msg, "iothread \"sec\" not found");
    }

    #[test]
    fn errors_read_as_qemu() {
        let s = Secrets::new();
        let e = |def: &str| s.add_object(def).unwrap_err().msg;
        assert_eq!(e("secret,id=s"), "Either 'file' or 'data' must be provided");
        assert_eq!(e("secret,id=s,data=a,file=/x"), "'file' and 'data' are mutually exclusive");
        assert_eq!(e("secret,id=s,data=@@,format=base64"), "Base64 data contains invalid characters");
        assert_eq!(e("secret,id=s,data=a,format=hex"), "Parameter 'format' does not accept value 'hex'");
        assert_eq!(e("secret,data=a"), "Parameter 'id' is missing");
        assert_eq!(e("secret,id=s,data=a,foo=1"), "Parameter 'foo' is unexpected");
        assert_eq!(e("id=s,data=a"), "Parameter 'qom-type' is missing");
        assert_eq!(e("throttle-group,id=s"), "Parameter 'qom-type' does not accept value 'throttle-group'");
        assert_eq!(e("iothread,id=t,poll-max-ns=-1"), "poll-max-ns value must be in range [0, 9223372036854775807]");
        assert_eq!(e("iothread,id=t,bogus=1"), "Parameter 'bogus' is unexpected");
        assert!(e("iothread,id=t,poll-grow=2").contains("'poll-grow' is not supported"));
        assert_eq!(e("iothread"), "Parameter 'id' is missing");
        assert_eq!(e("tls-creds-x509,id=t"), "Missing 'dir' property value");
        assert_eq!(e("tls-creds-x509,id=t,dir=/d,endpoint=middle"), "Parameter 'endpoint' does not accept value 'middle'");
        assert_eq!(e("tls-creds-x509,id=t,dir=/d,username=u"), "Parameter 'username' is unexpected");
        assert!(e("tls-creds-x509,id=t,dir=/d,priority=NORMAL").contains("'priority'"));
        assert!(e("tls-creds-anon,id=t").contains("not supported"));
        assert!(e("secret,id=1s,data=a").starts_with("Parameter 'id' expects an identifier"));
        assert!(e("secret,id=s,file=/nonexistent/x").starts_with("Unable to read /nonexistent/x: "));
        assert!(e("secret,id=s,data=a,keyid=k").contains("not supported"));
        s.add_object("secret,id=s,data=").unwrap();
        assert_eq!(s.get("s").unwrap(), b"");
        assert_eq!(e("secret,id=s,data=b"), "attempt to add duplicate property 's' to object (type 'container')");
        assert_eq!(s.get("t").unwrap_err().msg, "No secret with id 't'");
        s.add("bad", vec![0xff, 0xfe]).unwrap();
        assert_eq!(s.get_utf8("bad").unwrap_err().msg, "Data from secret bad is not valid UTF-8");
    }
}
