//! Where an `nbd` node connects and what it asks for: QEMU's filename syntaxes and options,
//! parsed into one [`NbdTarget`], and the pseudo-filename QEMU reports for it.
//!
//! Filenames (NetworkBlockDevice/nbd `doc/uri.md`, as QEMU reads them):
//! - `nbd://HOST[:PORT][/EXPORT]` (also `nbd+tcp://`), IPv6 hosts in brackets, port 10809 by
//!   default, no query;
//! - `nbd+unix:///[EXPORT]?socket=PATH` (no host, exactly the one `socket` parameter);
//! - the old `nbd:HOST:PORT[:exportname=EXPORT]` and `nbd:unix:PATH[:exportname=EXPORT]`.
//!
//! Options: `server.type=inet|unix`, `server.host`, `server.port`, `server.path`,
//! `server.numeric`, the legacy flat `host`/`port`/`path`, `export`, `x-dirty-bitmap` (a meta
//! context queried in place of `base:allocation`), `reconnect-delay` and `open-timeout` (in
//! seconds), `tls-creds` (the id of a `tls-creds-x509` object: STARTTLS before anything else)
//! and `tls-hostname` (the name the server's certificate must carry; by default the TCP host;
//! a Unix socket needs one, as in QEMU). `nbds://` URIs (which QEMU does not take either: TLS needs a
//! credentials object) and socket types other than inet and unix are refused by name. Export names are percent-decoded; they and the socket path are capped at
//! the protocol's 4096 bytes.

use std::os::fd::OwnedFd;
use std::time::Duration;

use basalt_engine::{BlockError, BlockResult, ErrorKind, Opts};

use super::negotiate::Want;
use super::proto::MAX_NAME;
use super::tls::ClientTls;

/// NBD's registered port.
pub const DEFAULT_PORT: &str = "10809";

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdServer {
    /// A TCP host and port (a number).
    Inet { host: String, port: String },
    /// A Unix socket path.
    Unix { path: String },
}

/// Everything an `nbd` node needs to connect and negotiate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdTarget {
    pub server: NbdServer,
    /// The export name; `None` is the default export (the empty name on the wire).
    pub export: Option<String>,
    /// The meta context used for block status (`x-dirty-bitmap`), else `base:allocation`.
    pub context: Option<String>,
    /// How long requests wait for a lost connection to come back (0: they fail at once).
    pub reconnect_delay: Duration,
    /// How long opening retries a connection that fails.
    pub open_timeout: Duration,
    /// The id of the TLS credentials object, when TLS is wanted.
    pub tls_creds: Option<String>,
    /// The name the server's certificate is checked against, in place of the host.
    pub tls_hostname: Option<String>,
}

fn bad_uri() -> BlockError {
    BlockError::option("No valid URL specified")
}

fn tls_refused() -> BlockError {
    BlockError::new(
        ErrorKind::Unsupported,
        "nbds:// URIs are not supported: give a tls-creds-x509 object with --object and tls-creds=ID",
    )
}

fn decode(s: &str) -> BlockResult<String> {
    percent_encoding::percent_decode_str(s).decode_utf8().map(|c| c.into_owned()).map_err(|_| bad_uri())
}

/// Turn an `nbd:`/`nbd://`/`nbd+unix://` filename into the options it stands for.
pub fn parse_filename(f: &str, opts: &mut Opts) -> BlockResult<()> {
    if let Some((scheme, rest)) = f.split_once("://") {
        let unix = match scheme {
            "nbd" | "nbd+tcp" => false,
            "nbd+unix" => true,
            "nbds" | "nbds+tcp" | "nbds+unix" => return Err(tls_refused()),
            _ => return Err(bad_uri()),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        if !path.is_empty() {
            opts.set("export", decode(path)?);
        }
        if unix {
            let q = query.ok_or_else(bad_uri)?;
            let sock = q.strip_prefix("socket=").filter(|v| !v.contains('&')).ok_or_else(bad_uri)?;
            if !authority.is_empty() {
                return Err(bad_uri());
            }
            opts.set("server.type", "unix");
            opts.set("server.path", decode(sock)?);
        } else {
            if query.is_some_and(|q| !q.is_empty()) || authority.is_empty() {
                return Err(bad_uri());
            }
            let (host, port) = split_host_port(authority).ok_or_else(bad_uri)?;
            opts.set("server.type", "inet");
            opts.set("server.host", decode(host)?);
            opts.set("server.port", port.unwrap_or(DEFAULT_PORT));
        }
        return Ok(());
    }
    let spec = f.strip_prefix("nbd:").ok_or_else(bad_uri)?;
    let spec = match spec.find(":exportname=") {
        Some(i) => {
            opts.set("export", &spec[i + ":exportname=".len()..]);
            &spec[..i]
        }
        None => spec,
    };
    if let Some(path) = spec.strip_prefix("unix:") {
        opts.set("server.type", "unix");
        opts.set("server.path", path);
    } else {
        let (host, port) = split_host_port(spec).ok_or_else(bad_uri)?;
        opts.set("server.type", "inet");
        opts.set("server.host", host);
        opts.set("server.port", port.unwrap_or(DEFAULT_PORT));
    }
    Ok(())
}

/// `HOST`, `HOST:PORT`, `[V6]` or `[V6]:PORT`.
fn split_host_port(s: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after {
            "" => Some((host, None)),
            a => Some((host, Some(a.strip_prefix(':').filter(|p| !p.is_empty())?))),
        };
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && !h.is_empty() && !p.is_empty() => Some((h, Some(p))),
        Some(_) => None,
        None if !s.is_empty() => Some((s, None)),
        None => None,
    }
}

fn seconds(opts: &mut Opts, key: &str) -> BlockResult<Duration> {
    Ok(Duration::from_secs(opts.take_u64(key, 0)?))
}

impl NbdTarget {
    /// Take the node's options (after its filename, if any, was turned into options).
    pub fn from_opts(opts: &mut Opts) -> BlockResult<NbdTarget> {
        let tls_creds = opts.take_str("tls-creds");
        let tls_hostname = opts.take_str("tls-hostname");
        // The legacy flat options, as QEMU still takes them.
        let (lhost, lport, lpath) = (opts.take_str("host"), opts.take_str("port"), opts.take_str("path"));
        let typ = opts.take_str("server.type");
        let server = if lhost.is_some() || lport.is_some() || lpath.is_some() {
            if typ.is_some() || opts.has_sub("server.") {
                return Err(BlockError::option("Cannot use 'host'/'port'/'path' together with 'server'"));
            }
            match (lpath, lhost) {
                (Some(_), Some(_)) => return Err(BlockError::option("path and host may not be used at the same time")),
                (Some(path), None) => NbdServer::Unix { path },
                (None, Some(host)) => NbdServer::Inet { host, port: lport.unwrap_or_else(|| DEFAULT_PORT.into()) },
                (None, None) => return Err(BlockError::option("one of path and host must be specified")),
            }
        } else {
            match typ.as_deref() {
                Some("inet") => {
                    let host =
                        opts.take_str("server.host").ok_or_else(|| BlockError::option("Parameter 'server.host' is missing"))?;
                    let port =
                        opts.take_str("server.port").ok_or_else(|| BlockError::option("Parameter 'server.port' is missing"))?;
                    opts.take_bool("server.numeric", false)?;
                    NbdServer::Inet { host, port }
                }
                Some("unix") => {
                    let path =
                        opts.take_str("server.path").ok_or_else(|| BlockError::option("Parameter 'server.path' is missing"))?;
                    NbdServer::Unix { path }
                }
                Some(t @ ("fd" | "vsock")) => {
                    return Err(BlockError::new(ErrorKind::Unsupported, format!("NBD server type '{t}' is not supported")))
                }
                Some(t) => return Err(BlockError::option(format!("Parameter 'server.type' does not accept value '{t}'"))),
                None => return Err(BlockError::option("Parameter 'server.type' is missing")),
            }
        };
        match &server {
            NbdServer::Inet { port, .. } if port.parse::<u16>().is_err() => {
                return Err(BlockError::option(format!("Port '{port}' is not a number from 0 to 65535")))
            }
            NbdServer::Unix { path } if path.len() >= 108 => {
                return Err(BlockError::option(format!("UNIX socket path '{path}' is too long")))
            }
            _ => {}
        }
        let export = opts.take_str("export");
        let context = opts.take_str("x-dirty-bitmap");
        for (what, v) in [("Export name", &export), ("Meta context name", &context)] {
            if v.as_ref().is_some_and(|s| s.len() > MAX_NAME) {
                return Err(BlockError::option(format!("{what} is longer than {MAX_NAME} bytes")));
            }
        }
        let reconnect_delay = seconds(opts, "reconnect-delay")?;
        let open_timeout = seconds(opts, "open-timeout")?;
        Ok(NbdTarget { server, export, context, reconnect_delay, open_timeout, tls_creds, tls_hostname })
    }

    /// The filename QEMU reports for the node.
    pub fn filename(&self) -> String {
        match (&self.server, &self.export) {
            (NbdServer::Unix { path }, Some(e)) => format!("nbd+unix:///{e}?socket={path}"),
            (NbdServer::Unix { path }, None) => format!("nbd+unix://?socket={path}"),
            (NbdServer::Inet { host, port }, Some(e)) => format!("nbd://{host}:{port}/{e}"),
            (NbdServer::Inet { host, port }, None) => format!("nbd://{host}:{port}"),
        }
    }

    /// TLS credentials for this target, when it asks for TLS (`secrets` holds the objects);
    /// the server's certificate must name `tls-hostname`, else the TCP host.
    pub fn client_tls(&self, secrets: &basalt_engine::Secrets) -> BlockResult<Option<ClientTls>> {
        let Some(id) = &self.tls_creds else {
            if self.tls_hostname.is_some() {
                return Err(BlockError::option("tls-hostname is only valid with tls-creds"));
            }
            return Ok(None);
        };
        let creds = secrets.tls_creds(id)?;
        let host = match (&self.tls_hostname, &self.server) {
            (Some(h), _) => Some(h.as_str()),
            (None, NbdServer::Inet { host, .. }) => Some(host.as_str()),
            (None, NbdServer::Unix { .. }) => None,
        };
        ClientTls::new(&creds, host).map(Some)
    }

    /// How the server is named in connection errors.
    pub fn server_name(&self) -> String {
        match &self.server {
            NbdServer::Unix { path } => path.clone(),
            NbdServer::Inet { host, port } => format!("{host}:{port}"),
        }
    }

    /// Connect a blocking stream socket to the server (TCP with Nagle off); the error is
    /// worded as QEMU's ("Failed to connect to 'HOST:PORT': Connection refused").
    pub fn connect(&self) -> BlockResult<OwnedFd> {
        let r = match &self.server {
            NbdServer::Unix { path } => std::os::unix::net::UnixStream::connect(path).map(OwnedFd::from),
            NbdServer::Inet { host, port } => port
                .parse::<u16>()
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
                .and_then(|port| std::net::TcpStream::connect((host.as_str(), port)))
                .and_then(|s| s.set_nodelay(true).map(|_| s.into())),
        };
        r.map_err(|e| BlockError::io(format!("Failed to connect to '{}'", self.server_name()), &e))
    }

    /// What to ask the server for: this export, with `context` for block status (required
    /// when it was named with `x-dirty-bitmap`).
    pub fn want<'a>(&'a self, context: &'a str, tls: Option<&'a ClientTls>) -> Want<'a> {
        Want { export: self.export.as_deref().unwrap_or(""), context, context_required: self.context.is_some(), tls }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(f: &str) -> BlockResult<NbdTarget> {
        let mut o = Opts::new();
        parse_filename(f, &mut o)?;
        let t = NbdTarget::from_opts(&mut o)?;
        assert!(o.is_empty());
        Ok(t)
    }

    fn inet(host: &str, port: &str) -> NbdServer {
        NbdServer::Inet { host: host.into(), port: port.into() }
    }

    #[test]
    fn uris_parse_as_qemu_reads_them() {
        let t = target("nbd://localhost/disk").unwrap();
        assert_eq!((t.server.clone(), t.export.as_deref()), (inet("localhost", "10809"), Some("disk")));
        assert_eq!(t.filename(), "nbd://localhost:10809/disk");
        assert_eq!(target("nbd://127.0.0.1:1234").unwrap().export, None);
        assert_eq!(target("nbd://h:1/").unwrap().export, None);
        assert_eq!(target("nbd://[::1]:99/a%20b").unwrap().server, inet("::1", "99"));
        assert_eq!(target("nbd://[::1]:99/a%20b").unwrap().export.as_deref(), Some("a b"));
        let u = target("nbd+unix:///e?socket=/tmp/s").unwrap();
        assert_eq!(u.server, NbdServer::Unix { path: "/tmp/s".into() });
        assert_eq!(u.filename(), "nbd+unix:///e?socket=/tmp/s");
        assert_eq!(target("nbd+unix://?socket=/tmp/s").unwrap().filename(), "nbd+unix://?socket=/tmp/s");
        for bad in ["nbd+unix:///e", "nbd+unix://h/e?socket=/s", "nbd://h/e?socket=/s", "nbd:///e", "nbdx://h", "nbd://h:x:y"] {
            assert!(target(bad).is_err(), "{bad}");
        }
        assert!(target("nbds://h/e").unwrap_err().to_string().contains("tls-creds"));
        assert!(target("nbd://h:99999").is_err());
    }

    #[test]
    fn old_syntax_and_options() {
        let t = target("nbd:localhost:10810:exportname=x:y").unwrap();
        assert_eq!((t.server, t.export.as_deref()), (inet("localhost", "10810"), Some("x:y")));
        let t = target("nbd:unix:/run/s.sock").unwrap();
        assert_eq!((t.server, t.export), (NbdServer::Unix { path: "/run/s.sock".into() }, None));
        let mut o = Opts::parse_keyval("host=h,export=e,reconnect-delay=5,x-dirty-bitmap=qemu:dirty-bitmap:b", None).unwrap();
        let t = NbdTarget::from_opts(&mut o).unwrap();
        assert_eq!((t.server, t.reconnect_delay.as_secs()), (inet("h", "10809"), 5));
        assert_eq!(t.context.as_deref(), Some("qemu:dirty-bitmap:b"));
        let mut o = Opts::parse_keyval("server.type=inet,server.host=h", None).unwrap();
        assert!(NbdTarget::from_opts(&mut o).unwrap_err().to_string().contains("server.port"));
        let mut o = Opts::parse_keyval("server.type=unix,server.path=/s,tls-creds=t", None).unwrap();
        let t = NbdTarget::from_opts(&mut o).unwrap();
        assert_eq!(t.tls_creds.as_deref(), Some("t"));
        let secrets = basalt_engine::Secrets::new();
        assert_eq!(t.client_tls(&secrets).unwrap_err().msg, "No TLS credentials with id 't'");
        secrets.add_object("tls-creds-x509,id=t,dir=/nonexistent,endpoint=server").unwrap();
        assert_eq!(t.client_tls(&secrets).unwrap_err().msg, "Expecting TLS credentials with a client endpoint");
        let mut o = Opts::parse_keyval("host=h,tls-hostname=x", None).unwrap();
        let t = NbdTarget::from_opts(&mut o).unwrap();
        assert!(t.client_tls(&secrets).unwrap_err().msg.contains("only valid with tls-creds"));
    }
}
