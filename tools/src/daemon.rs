//! basalt-storage-daemon: qemu-storage-daemon's command line for block nodes and NBD exports.
//!
//! Options, taken in order as qemu-storage-daemon takes them:
//! - `--blockdev OPTS`: a node, in keyval (`driver=qcow2,node-name=n,file.driver=file,...`) or
//!   JSON form; later nodes may name earlier ones (`file=NODE`).
//! - `--nbd-server addr.type=inet,addr.host=H,addr.port=P` or `addr.type=unix,addr.path=P`,
//!   `max-connections=N` (0, the default, for no limit), `tls-creds=ID` (a `tls-creds-x509`
//!   or `tls-creds-psk` object defined before it: clients must start TLS), `tls-authz=ID` (an
//!   `authz-*` object defined before it, which the clients' certificate names or PSK usernames
//!   must pass; an unknown one is an error at start).
//! - `--export type=nbd,id=ID,node-name=NODE[,name=NAME][,description=TEXT][,writable=on|off]
//!   [,allocation-depth=on|off][,bitmaps.0=NAME...][,iothread=ID][,fixed-iothread=on|off]`:
//!   the export's name is the node-name unless given; writable exports pass trims to the node
//!   (whose `discard` option decides). With `iothread`, the export's requests are served on
//!   that iothread's reactor (`crate::nbd::iothread`); `fixed-iothread` is accepted and always
//!   holds, since any reactor may serve any node.
//! - `--object` (secrets, TLS credentials, authorization, `iothread,id=ID[,poll-max-ns=N]`),
//!   `--pidfile=PATH`.
//!
//! It serves until SIGTERM, SIGINT or SIGHUP, then flushes every export and closes every node.
//! `--daemonize`: the parent exits 0 once the child has set everything up and serves (pid file
//! written), or 1 when the child could not (after the child has said why on stderr); the
//! child then works from `/` with stdio on /dev/null, as qemu-storage-daemon.
//!
//! `--chardev` and `--monitor` (QMP) are reserved for the control channel, and export types
//! other than `nbd` are refused by name until they work.

use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;

use basalt_engine::{Authz, Graph, OpenFlags, Opts};

use crate::nbd::iothread::IoThreads;
use crate::nbd::{self, server};
use basalt_drivers::nbd::tls::ServerTls;

const USAGE: &str = "Usage: basalt-storage-daemon [options]
Block nodes and NBD exports, as qemu-storage-daemon.
  --blockdev [driver=]<driver>[,node-name=<N>][,<options>...]
                         configure a block node (keyval or JSON)
  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>[,tls-creds=<id>]
               [,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>[,tls-creds=<id>][,tls-authz=<id>]
               [,max-connections=<n>]
                         start an NBD server for exports
  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,description=<text>][,writable=on|off][,allocation-depth=on|off]
           [,bitmaps.0=<name>...][,iothread=<id>][,fixed-iothread=on|off]
                         export a block node over NBD
  --object secret,id=<id>,data=<data>|file=<file>
                         define a secret
  --object tls-creds-x509,id=<id>,dir=<dir>,endpoint=server[,verify-peer=on|off]
  --object tls-creds-psk,id=<id>,dir=<dir>,endpoint=server
                         define TLS credentials
  --object authz-simple,id=<id>,identity=<name>
  --object authz-list,id=<id>[,policy=allow|deny],rules.0.match=<pattern>,
           rules.0.policy=allow|deny[,rules.0.format=exact|glob]...
  --object authz-listfile,id=<id>,filename=<file>[,refresh=on|off]
                         define an authorization object (for tls-authz)
  --object iothread,id=<id>[,poll-max-ns=<ns>]
                         define an I/O thread (a reactor) for exports
  --daemonize            daemonize the process, and have the parent exit once startup
                         is complete
  --pidfile <path>       write the process ID to a file after startup
  -h, --help             this help
  -V, --version          version";

/// What the command line asked for, in order.
enum Item {
    Blockdev(String),
    NbdServer(String),
    Export(String),
    Object(String),
}

fn fail(msg: impl std::fmt::Display) -> i32 {
    eprintln!("basalt-storage-daemon: {msg}");
    1
}

/// The command line: what to set up, in order, the pid file, and `--daemonize`.
struct Cmdline {
    items: Vec<Item>,
    pidfile: Option<String>,
    daemonize: bool,
}

fn parse(args: &[String]) -> Result<Cmdline, String> {
    let mut items = Vec::new();
    let mut pidfile = None;
    let mut daemonize = false;
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        let (name, inline) = match a.strip_prefix("--") {
            Some(l) => match l.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (l.to_string(), None),
            },
            None if a == "-h" => ("help".into(), None),
            None if a == "-V" => ("version".into(), None),
            None => return Err(format!("Unexpected argument '{a}'")),
        };
        let mut value = || -> Result<String, String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => {
                    let v = args.get(i).cloned().ok_or_else(|| format!("option '--{name}' requires an argument"))?;
                    i += 1;
                    Ok(v)
                }
            }
        };
        match name.as_str() {
            "blockdev" => items.push(Item::Blockdev(value()?)),
            "nbd-server" => items.push(Item::NbdServer(value()?)),
            "export" => items.push(Item::Export(value()?)),
            "object" => items.push(Item::Object(value()?)),
            "pidfile" => pidfile = Some(value()?),
            "chardev" | "monitor" => {
                return Err(format!("--{name} is not supported yet (the control channel is still to come)"));
            }
            "daemonize" => daemonize = true,
            "trace" => return Err("--trace is not supported".into()),
            "help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "version" => {
                println!("basalt-storage-daemon {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            other => return Err(format!("unrecognized option '--{other}'")),
        }
    }
    Ok(Cmdline { items, pidfile, daemonize })
}

/// Keyval or JSON options.
fn options(s: &str, implied: Option<&str>) -> Result<Opts, String> {
    if s.trim_start().starts_with('{') {
        Opts::parse_json(s).map_err(|e| e.msg)
    } else {
        Opts::parse_keyval(s, implied).map_err(|e| e.msg)
    }
}

fn take_bool(o: &mut Opts, key: &str) -> Result<bool, String> {
    o.take_bool(key, false).map_err(|e| e.msg)
}

/// What `--nbd-server` set up.
struct NbdServer {
    fd: OwnedFd,
    /// The connection limit.
    max: usize,
    /// The Unix socket's path, removed at exit.
    path: Option<String>,
    tls: Option<ServerTls>,
    authz: Option<Arc<Authz>>,
}

/// The listening socket of `--nbd-server`, its connection limit and TLS.
fn nbd_server(graph: &Graph, def: &str) -> Result<NbdServer, String> {
    let mut o = options(def, None)?;
    let authz = match o.take_str("tls-authz") {
        Some(id) => Some(graph.secrets().authz(&id).map_err(|e| e.msg)?),
        None => None,
    };
    let tls = match o.take_str("tls-creds") {
        Some(id) => Some(graph.secrets().tls_creds(&id).and_then(|c| ServerTls::new(&c)).map_err(|e| e.msg)?),
        None => None,
    };
    if authz.is_some() && tls.is_none() {
        return Err("tls-authz is not permitted without tls-creds".into());
    }
    let max = o.take_u64("max-connections", 0).map_err(|e| e.msg)?;
    let typ = o.take_str("addr.type").ok_or("Parameter 'addr.type' is missing")?;
    let (fd, path): (OwnedFd, Option<String>) = match typ.as_str() {
        "unix" => {
            let path = o.take_str("addr.path").ok_or("Parameter 'addr.path' is missing")?;
            let l = std::os::unix::net::UnixListener::bind(&path).map_err(|e| format!("Failed to bind socket to {path}: {e}"))?;
            (l.into(), Some(absolute(&path)))
        }
        "inet" => {
            let host = o.take_str("addr.host").ok_or("Parameter 'addr.host' is missing")?;
            let port = o.take_str("addr.port").ok_or("Parameter 'addr.port' is missing")?;
            let p: u16 = port.parse().map_err(|_| format!("Port '{port}' is not a number"))?;
            let l = std::net::TcpListener::bind((host.as_str(), p))
                .map_err(|e| format!("Failed to bind socket to {host}:{port}: {e}"))?;
            (l.into(), None)
        }
        t => return Err(format!("Parameter 'addr.type' does not accept value '{t}'")),
    };
    if let Some(k) = o.keys().next() {
        return Err(format!("Invalid parameter '{k}'"));
    }
    Ok(NbdServer { fd, max: if max == 0 { usize::MAX } else { max as usize }, path, tls, authz })
}

/// An `--export type=nbd`.
async fn export(
    graph: &Graph,
    def: &str,
    server: Option<&NbdServer>,
    iothreads: &mut IoThreads,
) -> Result<Rc<server::Export>, String> {
    let mut o = options(def, Some("type"))?;
    match o.take_str("type").as_deref() {
        Some("nbd") => {}
        Some(t) => return Err(format!("Export type '{t}' is not supported")),
        None => return Err("Parameter 'type' is missing".into()),
    }
    let _id = o.take_str("id").ok_or("Parameter 'id' is missing")?;
    let node_name = o.take_str("node-name").ok_or("Parameter 'node-name' is missing")?;
    // As QEMU: the node is looked up first (by node name only), then the server.
    let node = graph.node(&node_name).ok_or_else(|| format!("Cannot find device='' nor node-name='{node_name}'"))?;
    let max_connections = server.ok_or("NBD server not running")?.max;
    let name = o.take_str("name").unwrap_or_else(|| node_name.clone());
    let description = o.take_str("description");
    let writable = take_bool(&mut o, "writable")?;
    let allocation_depth = take_bool(&mut o, "allocation-depth")?;
    let _ = take_bool(&mut o, "writethrough")?;
    let _ = take_bool(&mut o, "fixed-iothread")?;
    let iothread = o.take_str("iothread");
    let mut names = Vec::new();
    while let Some(b) = o.take_str(&format!("bitmaps.{}", names.len())) {
        names.push(b);
    }
    if let Some(k) = o.keys().next() {
        return Err(format!("Invalid parameter '{k}'"));
    }
    let home = match iothread {
        Some(id) => {
            let t = graph.secrets().iothread(&id).map_err(|e| e.msg)?;
            Some(iothreads.handle(&id, t)?)
        }
        None => None,
    };
    let mut bitmaps = Vec::new();
    for b in &names {
        bitmaps.push(nbd::export_bitmap(&node, b).await?);
    }
    if writable && node.read_only() {
        return Err(format!("Block node '{node_name}' is read-only"));
    }
    let spec = server::ExportSpec {
        node,
        name,
        description,
        read_only: !writable,
        discard: true,
        // In QEMU a node's option (`--blockdev ...,detect-zeroes=`), not the export's.
        detect_zeroes: server::DetectZeroes::Off,
        allocation_depth,
        // QEMU's multi-conn=auto: on unless the server takes a single client.
        multi_conn: max_connections != 1,
        home,
    };
    // This reactor's view negotiates; an iothread's view serves the requests.
    if let Some(h) = &spec.home {
        iothreads.place(h, spec.clone(), names).await?;
    }
    spec.export(bitmaps)
}

/// The tool's entry point.
pub fn main(args: Vec<String>) -> i32 {
    let Cmdline { items, pidfile, daemonize } = match parse(&args) {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    // With --daemonize the parent exits once the child has set everything up (0), or when the
    // child gave up (1; the child has said why on the same stderr).
    let mut ready = None;
    if daemonize {
        match nbd::fork_background() {
            Err(e) => return fail(e),
            Ok(nbd::Forked::Child(pipe)) => ready = Some(pipe),
            Ok(nbd::Forked::Parent(msg)) => return if msg.starts_with("ok") { 0 } else { 1 },
        }
    }
    nbd::block_stop_signals();
    crate::run_tool_with_pool(crate::SERVER_POOL, move || run(items, pidfile, ready))
}

/// `path` made absolute (a daemon changes to `/` and still removes its files at exit).
fn absolute(path: &str) -> String {
    match std::path::absolute(path) {
        Ok(p) => p.to_string_lossy().into_owned(),
        Err(_) => path.to_string(),
    }
}

async fn run(items: Vec<Item>, pidfile: Option<String>, ready: Option<std::fs::File>) -> i32 {
    let pidfile = pidfile.map(|p| absolute(&p));
    let graph = Graph::new(basalt_formats::registry());
    let mut server: Option<NbdServer> = None;
    let mut exports = Vec::new();
    let mut iothreads = IoThreads::default();
    let mut code = 0;
    for item in &items {
        let r = match item {
            Item::Blockdev(def) => match options(def, Some("driver")) {
                Ok(o) => graph.open(o, OpenFlags::read_write()).await.map(|_| ()).map_err(|e| e.msg),
                Err(e) => Err(e),
            },
            Item::NbdServer(_) if server.is_some() => Err("Only one --nbd-server is allowed".to_string()),
            Item::NbdServer(def) => nbd_server(&graph, def).map(|s| server = Some(s)),
            Item::Export(def) => export(&graph, def, server.as_ref(), &mut iothreads).await.map(|e| exports.push(e)),
            Item::Object(def) => graph.add_object(def).map_err(|e| e.msg),
        };
        if let Err(e) = r {
            // Named by the option that failed, as qemu-storage-daemon names it.
            let (opt, def) = match item {
                Item::Blockdev(d) => ("blockdev", d),
                Item::NbdServer(d) => ("nbd-server", d),
                Item::Export(d) => ("export", d),
                Item::Object(d) => ("object", d),
            };
            code = fail(format!("--{opt} {def}: {e}"));
            break;
        }
    }
    let socket_path = server.as_ref().and_then(|s| s.path.clone());
    if code == 0 {
        if let Some(p) = &pidfile {
            if let Err(e) = std::fs::write(p, format!("{}\n", std::process::id())) {
                code = fail(format!("Cannot write pid file to '{p}': {e}"));
            }
        }
    }
    if code == 0 {
        let stop = nbd::stop_on_signals();
        if let Some(s) = &server {
            let offer = Rc::new(server::Offer { exports: exports.clone(), tls: s.tls.clone(), authz: s.authz.clone() });
            nbd::spawn_accept_loop(s.fd.as_raw_fd(), offer, None, s.max, true, stop.clone(), "basalt-storage-daemon");
        }
        if let Some(p) = ready {
            // As qemu-storage-daemon: out of the way of unmounts, stdio to /dev/null.
            let _ = std::env::set_current_dir("/");
            nbd::detach(p);
        }
        stop.wait().await;
        if let Some(s) = &server {
            // SAFETY: shutdown(2) on the listening descriptor, still open (`server` owns it
            // until the end); it wakes the accept waiting in the blocking pool.
            unsafe { libc::shutdown(s.fd.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
    // The iothreads' connections end before the nodes are flushed and closed.
    iothreads.stop().await;
    if code == 0 {
        for e in &exports {
            if let Err(err) = e.queue.flush().await.res {
                code = fail(format!("flushing export '{}': {err}", e.name));
            }
        }
    }
    drop(exports);
    if let Err(e) = graph.close().await {
        code = fail(format!("closing the nodes: {}", e.msg));
    }
    if let Some(p) = socket_path {
        let _ = std::fs::remove_file(p);
    }
    let _ = pidfile.map(std::fs::remove_file);
    code
}
