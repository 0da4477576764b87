//! basalt-nbd: serve an image over NBD, taking qemu-nbd's command line.
//!
//! `basalt-nbd [OPTIONS] FILE`: `-p/--port`, `-b/--bind`, `-k/--socket`, `-x/--export-name`,
//! `-D/--description`, `-f/--format`, `-r/--read-only`, `-t/--persistent`, `-e/--shared`,
//! `-A/--allocation-depth`, `-n/--nocache`, `--cache`, `--aio`, `--discard`,
//! `--detect-zeroes=off|on|unmap`, `--image-opts`, `--object`, `--fork`, `--pid-file`, `-v`. As qemu-nbd:
//! without `-t` the server exits when its last client has gone; `-e N` admits N clients at once
//! (1 by default) and turns the others away; SIGTERM/SIGINT end it cleanly (the image is
//! flushed and closed). `-L` lists another server's exports as qemu-nbd does (with `-k`, or
//! `-b`/`-p`, `localhost` by default); `-B NAME` (repeatable) exports a qcow2 dirty bitmap
//! ([`bitmap`]). `--tls-creds=ID` (a `tls-creds-x509` object given with `--object`) makes
//! clients start TLS before anything else; with `-L` it makes the listing go over TLS
//! (checking the server's certificate against `--tls-hostname`, else the host).
//! `--tls-authz=ID` (an `authz-simple`/`authz-list`/`authz-listfile` object) then decides
//! which clients may go on after the handshake, by their certificate's name or PSK username
//! (an unknown ID is an error at start, where QEMU refuses every client instead). Options not
//! implemented yet (`-c`, `-d`, `-s`, `-l`, `-T`, `-o`, `-P`) are refused by name.
//! `--detect-zeroes=on|unmap` makes a write of zeroes a zero write, as QEMU's block layer
//! does for the exported node (`unmap` only with `--discard=unmap`, as qemu-nbd requires).
//!
//! Connections are served by [`server`] on the tool's reactor, socket I/O through
//! `basalt_drivers::nbd::sock`. `--reactors=N` (Basalt's own option) spreads them over N
//! reactor threads, each connection on one of them in turn ([`spread`]); `-B` cannot be
//! combined with it yet (an exported bitmap records every connection's writes in one place).

pub mod bitmap;
pub(crate) mod iothread;
pub mod list;
pub mod replies;
pub mod server;
pub mod spread;

use std::cell::Cell;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};

use basalt_drivers::nbd::tls::ServerTls;
use basalt_engine::Perm;

use crate::image::{self, ImageSpec};

const USAGE: &str = "Usage: basalt-nbd [OPTIONS] FILE
Serve FILE (an image in any format Basalt reads) over NBD, as qemu-nbd does.
  -p, --port=PORT           port to listen on (default 10809)
  -b, --bind=IFACE          interface to bind to (default 0.0.0.0)
  -k, --socket=PATH         listen on a Unix socket instead
  -x, --export-name=NAME    export name (default \"\")
  -D, --description=TEXT    export description
  -f, --format=FORMAT       image format (probed if left out)
  -r, --read-only           export read-only
  -t, --persistent          keep serving after the last client has gone
  -e, --shared=NUM          clients allowed at once (default 1, 0 for no limit)
  -A, --allocation-depth    offer the qemu:allocation-depth metadata context
  -B, --bitmap=NAME         offer the qcow2 dirty bitmap NAME as qemu:dirty-bitmap:NAME
  -n, --nocache             same as --cache=none
      --cache=MODE          none, writeback, writethrough, directsync, unsafe
      --aio=MODE            threads or io_uring
      --discard=MODE        ignore or unmap
      --detect-zeroes=MODE  off, on (writes of zeroes become zero writes) or unmap
                            (and may free the space, with --discard=unmap)
      --image-opts          FILE is a set of image options
      --object=OBJ          define an object (secret, tls-creds-x509, tls-creds-psk,
                            authz-simple, authz-list, authz-listfile)
      --tls-creds=ID        require TLS, with the credentials object ID
      --tls-hostname=NAME   with --list: the name the server's certificate must carry
      --tls-authz=ID        with --tls-creds: the authorization object clients must pass
      --reactors=N          serve connections on N reactor threads, each connection on
                            one of them in turn (default 1; Basalt's own option)
      --fork                run in the background once the server is listening
      --pid-file=PATH       write the server's pid there
  -L, --list                list the exports of the server at -k or -b/-p
  -v, --verbose             accepted
  -h, --help                this help
  -V, --version             version";

/// The most reactors `--reactors` takes.
const MAX_REACTORS: usize = 256;

struct Config {
    port: u16,
    bind: String,
    socket: Option<String>,
    name: String,
    description: Option<String>,
    fmt: Option<String>,
    read_only: bool,
    persistent: bool,
    shared: usize,
    allocation_depth: bool,
    cache: Option<String>,
    aio: Option<String>,
    discard: bool,
    image_opts: bool,
    objects: Vec<String>,
    fork: bool,
    pid_file: Option<String>,
    list: bool,
    bind_given: bool,
    bitmaps: Vec<String>,
    tls_creds: Option<String>,
    tls_hostname: Option<String>,
    tls_authz: Option<String>,
    reactors: usize,
    detect_zeroes: server::DetectZeroes,
    file: String,
}

fn fail(msg: impl std::fmt::Display) -> i32 {
    eprintln!("basalt-nbd: {msg}");
    1
}

/// Split `--name=value`, `--name value`, `-xvalue` and `-x value`; returns the options in order.
fn parse(args: &[String]) -> Result<Config, String> {
    const WITH_ARG: &[(&str, char)] = &[
        ("port", 'p'),
        ("bind", 'b'),
        ("socket", 'k'),
        ("export-name", 'x'),
        ("description", 'D'),
        ("format", 'f'),
        ("shared", 'e'),
        ("cache", '\0'),
        ("aio", '\0'),
        ("discard", '\0'),
        ("detect-zeroes", '\0'),
        ("object", '\0'),
        ("pid-file", '\0'),
        ("connect", 'c'),
        ("snapshot", '\0'),
        ("load-snapshot", 'l'),
        ("bitmap", 'B'),
        ("tls-creds", '\0'),
        ("tls-hostname", '\0'),
        ("tls-authz", '\0'),
        ("trace", 'T'),
        ("offset", 'o'),
        ("partition", 'P'),
        ("handshake-limit", '\0'),
        ("reactors", '\0'),
    ];
    const FLAGS: &[(&str, char)] = &[
        ("read-only", 'r'),
        ("persistent", 't'),
        ("allocation-depth", 'A'),
        ("nocache", 'n'),
        ("image-opts", '\0'),
        ("fork", '\0'),
        ("verbose", 'v'),
        ("help", 'h'),
        ("version", 'V'),
        ("disconnect", 'd'),
        ("list", 'L'),
    ];
    let mut c = Config {
        port: 10809,
        bind: "0.0.0.0".into(),
        socket: None,
        name: String::new(),
        description: None,
        fmt: None,
        read_only: false,
        persistent: false,
        shared: 1,
        allocation_depth: false,
        cache: None,
        aio: None,
        discard: false,
        image_opts: false,
        objects: Vec::new(),
        fork: false,
        pid_file: None,
        list: false,
        bind_given: false,
        bitmaps: Vec::new(),
        tls_creds: None,
        tls_hostname: None,
        tls_authz: None,
        reactors: 1,
        detect_zeroes: server::DetectZeroes::Off,
        file: String::new(),
    };
    let mut files = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        let (name, inline): (String, Option<String>) = if let Some(l) = a.strip_prefix("--") {
            match l.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (l.to_string(), None),
            }
        } else if a.len() > 1 && a.starts_with('-') {
            let ch = a.chars().nth(1).expect("two chars");
            let long = WITH_ARG.iter().chain(FLAGS).find(|(_, s)| *s == ch).map(|(l, _)| l.to_string());
            let long = long.ok_or_else(|| format!("invalid option -- '{ch}'"))?;
            let rest = &a[2..];
            (long, (!rest.is_empty()).then(|| rest.to_string()))
        } else {
            files.push(a.clone());
            continue;
        };
        let takes = WITH_ARG.iter().any(|(l, _)| *l == name);
        if !takes && !FLAGS.iter().any(|(l, _)| *l == name) {
            return Err(format!("unrecognized option '--{name}'"));
        }
        let val = if takes {
            match inline {
                Some(v) => v,
                None => {
                    let v = args.get(i).cloned().ok_or_else(|| format!("option '--{name}' requires an argument"))?;
                    i += 1;
                    v
                }
            }
        } else {
            String::new()
        };
        match name.as_str() {
            "port" => c.port = val.parse().map_err(|_| format!("Invalid port '{val}'"))?,
            "bind" => {
                c.bind = val;
                c.bind_given = true;
            }
            "socket" => c.socket = Some(val),
            "export-name" => c.name = val,
            "description" => c.description = Some(val),
            "format" => c.fmt = Some(val),
            "shared" => {
                let n: i64 = val.parse().map_err(|_| format!("Invalid shared device number '{val}'"))?;
                if n < 0 {
                    return Err(format!("Invalid shared device number '{val}'"));
                }
                c.shared = if n == 0 { usize::MAX } else { n as usize };
            }
            "cache" => c.cache = Some(val),
            "aio" => c.aio = Some(val),
            "discard" => match val.as_str() {
                "ignore" | "off" => c.discard = false,
                "unmap" | "on" => c.discard = true,
                _ => return Err(format!("Invalid discard mode `{val}'")),
            },
            "detect-zeroes" => {
                c.detect_zeroes = match val.as_str() {
                    "off" => server::DetectZeroes::Off,
                    "on" => server::DetectZeroes::On,
                    "unmap" => server::DetectZeroes::Unmap,
                    _ => return Err(format!("Failed to parse detect_zeroes mode: invalid parameter value: {val}")),
                }
            }
            "object" => c.objects.push(val),
            "pid-file" => c.pid_file = Some(val),
            "read-only" => c.read_only = true,
            "persistent" => c.persistent = true,
            "allocation-depth" => c.allocation_depth = true,
            "nocache" => c.cache = Some("none".into()),
            "image-opts" => c.image_opts = true,
            "fork" => c.fork = true,
            "list" => c.list = true,
            "bitmap" => c.bitmaps.push(val),
            "tls-creds" => c.tls_creds = Some(val),
            "tls-hostname" => c.tls_hostname = Some(val),
            "tls-authz" => c.tls_authz = Some(val),
            "reactors" => {
                c.reactors = match val.parse::<usize>() {
                    Ok(n @ 1..=MAX_REACTORS) => n,
                    _ => return Err(format!("Invalid reactor count '{val}' (1 to {MAX_REACTORS})")),
                }
            }
            "verbose" => {}
            "help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "version" => {
                println!("basalt-nbd {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            other => return Err(format!("option --{other} is not supported yet")),
        }
    }
    match files.len() {
        0 if c.list => {}
        _ if c.list => return Err("Too many arguments".into()),
        1 => c.file = files.remove(0),
        0 => return Err("Not enough arguments".into()),
        _ => return Err("Too many arguments".into()),
    }
    Ok(c)
}

/// Options that do not go together (reported, as qemu-nbd does, without the `--help` hint
/// that a malformed command line gets).
fn check(c: &Config) -> Result<(), String> {
    if c.socket.is_some() && c.port != 10809 {
        return Err("--socket and --port are incompatible".into());
    }
    if c.tls_hostname.is_some() && c.tls_creds.is_none() {
        return Err("--tls-hostname is not permitted without --tls-creds".into());
    }
    if c.tls_hostname.is_some() && !c.list {
        return Err("--tls-hostname is only permitted with --list".into());
    }
    if c.tls_authz.is_some() && c.tls_creds.is_none() {
        return Err("--tls-authz is not permitted without --tls-creds".into());
    }
    if c.tls_authz.is_some() && c.list {
        return Err("TLS authorization is incompatible with export list".into());
    }
    if c.detect_zeroes == server::DetectZeroes::Unmap && !c.discard {
        return Err("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap".into());
    }
    if c.reactors > 1 && !c.bitmaps.is_empty() {
        // An exported bitmap records the writes of every connection in one place.
        return Err("--bitmap cannot be used with more than one reactor yet".into());
    }
    Ok(())
}

/// The listening socket.
fn listen(c: &Config) -> Result<OwnedFd, String> {
    if let Some(path) = &c.socket {
        let l = std::os::unix::net::UnixListener::bind(path).map_err(|e| format!("Failed to bind socket to {path}: {e}"))?;
        // SAFETY: taking ownership of the listener's descriptor, which it gives up.
        return Ok(unsafe { OwnedFd::from_raw_fd(l.into_raw_fd()) });
    }
    let l = std::net::TcpListener::bind((c.bind.as_str(), c.port))
        .map_err(|e| format!("Failed to bind socket to {}:{}: {e}", c.bind, c.port))?;
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(l.into_raw_fd()) })
}

/// The tool's entry point: parse, listen, optionally daemonize, then serve on a reactor.
pub fn main(args: Vec<String>) -> i32 {
    let c = match parse(&args) {
        Ok(c) => c,
        Err(e) => return fail(format!("{e}\nTry 'basalt-nbd --help' for more information.")),
    };
    if let Err(e) = check(&c) {
        return fail(e);
    }
    if c.list {
        let server = match &c.socket {
            Some(path) => basalt_drivers::nbd::target::NbdServer::Unix { path: path.clone() },
            None => basalt_drivers::nbd::target::NbdServer::Inet {
                host: if c.bind_given { c.bind.clone() } else { "localhost".into() },
                port: c.port.to_string(),
            },
        };
        let target = basalt_drivers::nbd::target::NbdTarget {
            server,
            export: None,
            context: None,
            reconnect_delay: Default::default(),
            open_timeout: Default::default(),
            tls_creds: c.tls_creds.clone(),
            tls_hostname: c.tls_hostname.clone(),
        };
        let secrets = basalt_engine::Secrets::new();
        for def in &c.objects {
            if let Err(e) = secrets.add_object(def) {
                return fail(e.msg);
            }
        }
        return match list::list(&target, &secrets) {
            Ok(text) => {
                print!("{text}");
                0
            }
            Err(e) => fail(e),
        };
    }
    let listener = match listen(&c) {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    // With --fork, the parent waits on a pipe until the child serves (or says why it cannot).
    let mut ready_pipe: Option<std::fs::File> = None;
    if c.fork {
        match fork_background() {
            Err(e) => return fail(e),
            Ok(Forked::Child(pipe)) => ready_pipe = Some(pipe),
            Ok(Forked::Parent(msg)) => {
                return match msg.strip_prefix("ok") {
                    Some(_) => 0,
                    None if msg.is_empty() => fail("the server ended before it was ready"),
                    None => {
                        eprint!("{msg}");
                        1
                    }
                };
            }
        }
    }
    block_stop_signals();
    let lfd = listener.into_raw_fd();
    crate::run_tool_with_pool(crate::SERVER_POOL, move || serve_main(c, lfd, ready_pipe))
}

/// The two sides of [`fork_background`].
pub(crate) enum Forked {
    /// The child, with the pipe to say "ok" on once it serves ([`detach`]), or to write why it
    /// cannot.
    Child(std::fs::File),
    /// The parent, with what the child wrote before it closed the pipe.
    Parent(String),
}

/// Fork into the background (qemu-nbd's `--fork`, qemu-storage-daemon's `--daemonize`): the
/// child starts a new session; the parent waits until the child closes the pipe. Call it
/// before any thread starts.
pub(crate) fn fork_background() -> Result<Forked, String> {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) into a two-element array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: no other thread exists yet (the reactors start after this), so the child may go
    // on running Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid > 0 {
        // SAFETY: the pipe's ends were just made; each side keeps one.
        let mut r = unsafe { std::fs::File::from_raw_fd(fds[0]) };
        // SAFETY: as above.
        unsafe { libc::close(fds[1]) };
        let mut msg = String::new();
        let _ = std::io::Read::read_to_string(&mut r, &mut msg);
        return Ok(Forked::Parent(msg));
    }
    // SAFETY: as above.
    unsafe { libc::close(fds[0]) };
    // SAFETY: setsid has no preconditions.
    unsafe { libc::setsid() };
    // SAFETY: the child's own end.
    Ok(Forked::Child(unsafe { std::fs::File::from_raw_fd(fds[1]) }))
}

/// The forked child serves: tell the parent (which exits 0), and send stdio nowhere from now
/// on.
pub(crate) fn detach(mut ready: std::fs::File) {
    let _ = ready.write_all(b"ok");
    drop(ready);
    if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

/// SIGTERM, SIGINT and SIGHUP are taken by a thread with sigwait (blocked here, before any
/// thread starts, so every thread inherits the mask).
pub(crate) fn block_stop_signals() {
    // SAFETY: building a signal set and setting this thread's mask; plain libc calls.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn wait_stop_signal() {
    // SAFETY: as in `block_stop_signals`; sigwait on a valid set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
}

/// A stop flag fired by SIGTERM, SIGINT or SIGHUP (blocked with [`block_stop_signals`] before
/// any thread started), for the current reactor.
pub(crate) fn stop_on_signals() -> Rc<Stop> {
    let stop = Rc::new(Stop::default());
    let stop_flag = StopHandle(basalt_reactor::current_handle());
    std::thread::spawn(move || {
        wait_stop_signal();
        stop_flag.fire();
    });
    STOP.with(|s| *s.borrow_mut() = Some(stop.clone()));
    stop
}

/// A flag a task can wait on.
#[derive(Default)]
pub(crate) struct Stop {
    set: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Stop {
    fn fire(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    pub(crate) async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.set.get() {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

async fn serve_main(c: Config, lfd: RawFd, mut ready: Option<std::fs::File>) -> i32 {
    // SAFETY: `lfd` is the listener's descriptor, owned from here on.
    let listener = unsafe { OwnedFd::from_raw_fd(lfd) };
    // The Unix socket's file goes when the server does, however it ends.
    struct SocketFile(Option<String>);
    impl Drop for SocketFile {
        fn drop(&mut self) {
            if let Some(p) = &self.0 {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    let _socket_file = SocketFile(c.socket.clone());
    let mut report = |msg: String| -> i32 {
        match ready.take() {
            Some(mut p) => {
                let _ = writeln!(p, "basalt-nbd: {msg}");
            }
            None => eprintln!("basalt-nbd: {msg}"),
        }
        1
    };
    let graph = basalt_engine::Graph::new(basalt_formats::registry());
    for def in &c.objects {
        if let Err(e) = graph.add_object(def) {
            return report(e.msg);
        }
    }
    let tls = match &c.tls_creds {
        Some(id) => match graph.secrets().tls_creds(id).and_then(|creds| ServerTls::new(&creds)) {
            Ok(t) => Some(t),
            Err(e) => return report(e.msg),
        },
        None => None,
    };
    let authz = match &c.tls_authz {
        Some(id) => match graph.secrets().authz(id) {
            Ok(a) => Some(a),
            Err(e) => return report(e.msg),
        },
        None => None,
    };
    let mut spec = ImageSpec::new(&c.file);
    spec.fmt = c.fmt.clone();
    spec.image_opts = c.image_opts;
    spec.read_only = c.read_only;
    spec.cache = c.cache.clone();
    spec.aio = c.aio.clone();
    // As qemu-nbd: writers may share the image only with a shared export.
    spec.unshare = Perm::NONE;
    let node = match image::open(&graph, &spec).await {
        Ok((n, _)) => n,
        Err(e) => {
            // The driver's message already names the file; qemu-nbd says it once.
            let once = format!("Could not open '{}': ", c.file);
            let msg = e.msg.strip_prefix(&once).filter(|m| m.starts_with(&once)).unwrap_or(&e.msg);
            return report(format!("Failed to blk_new_open '{}': {msg}", c.file));
        }
    };
    let mut bitmaps = Vec::new();
    for name in &c.bitmaps {
        match export_bitmap(&node, name).await {
            Ok(b) => bitmaps.push(b),
            Err(e) => return report(e),
        }
    }
    let spec = server::ExportSpec {
        node: node.clone(),
        name: c.name.clone(),
        description: c.description.clone(),
        read_only: c.read_only,
        discard: c.discard,
        detect_zeroes: c.detect_zeroes,
        allocation_depth: c.allocation_depth,
        multi_conn: c.shared > 1,
        home: None,
    };
    let exp = match spec.export(bitmaps) {
        Ok(e) => e,
        Err(e) => return report(e),
    };
    let spread = if c.reactors > 1 {
        match spread::Spread::start(c.reactors - 1, &spec, tls.clone(), authz.clone()).await {
            Ok(s) => Some(Rc::new(s)),
            Err(e) => return report(e),
        }
    } else {
        None
    };
    if let Some(p) = &c.pid_file {
        if let Err(e) = std::fs::write(p, format!("{}\n", std::process::id())) {
            return report(format!("Cannot write pid file to '{p}': {e}"));
        }
    }
    if let Some(p) = ready.take() {
        detach(p);
    }
    let stop = stop_on_signals();
    let served = exp.clone();
    let lraw = listener.as_raw_fd();
    let offer = Rc::new(server::Offer { exports: vec![exp], tls, authz });
    spawn_accept_loop(lraw, offer, spread.clone(), c.shared, c.persistent, stop.clone(), "basalt-nbd");
    stop.wait().await;
    // Wake the accept waiting in the blocking pool (it returns EINVAL), so nothing is left
    // in flight when the reactor stops.
    // SAFETY: shutdown(2) on the listening descriptor, still open (the accept loop owns it).
    unsafe { libc::shutdown(lraw, libc::SHUT_RDWR) };
    // The other reactors' connections end before the image is flushed and closed.
    if let Some(s) = spread {
        s.stop().await;
    }
    let mut code = 0;
    // Whatever the clients did not flush is made durable (metadata caches included) before
    // the image is closed, as qemu-nbd's exit does.
    if let Err(e) = served.queue.flush().await.res {
        eprintln!("basalt-nbd: flushing the image: {e}");
        code = 1;
    }
    if let Err(e) = node.close().await {
        eprintln!("basalt-nbd: closing the image: {}", e.msg);
        code = 1;
    }
    code
}

/// Accept connections on the listening socket `lraw` and serve each (up to `shared` at once,
/// others turned away) until `stop` fires; without `persistent`, the last client's leaving
/// fires it. Accept errors are reported with `who` and fire it too.
pub(crate) fn spawn_accept_loop(
    lraw: RawFd,
    offer: Rc<server::Offer>,
    spread: Option<Rc<spread::Spread>>,
    shared: usize,
    persistent: bool,
    stop: Rc<Stop>,
    who: &'static str,
) {
    // Clients being served, on every reactor.
    let active = Arc::new(AtomicUsize::new(0));
    let home = basalt_reactor::current_handle();
    let st = stop;
    basalt_reactor::spawn_local(async move {
        loop {
            // accept(2) waits in the blocking pool; the reactor stays free for the clients.
            let (res, _) = basalt_reactor::blocking(
                move || {
                    // SAFETY: accept4 on the listening descriptor, which outlives the loop.
                    let r = unsafe { libc::accept4(lraw, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
                    if r < 0 {
                        -i64::from(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
                    } else {
                        i64::from(r)
                    }
                },
                None,
            )
            .await;
            if res < 0 {
                if -res == i64::from(libc::EINTR) || -res == i64::from(libc::ECONNABORTED) {
                    continue;
                }
                if st.set.get() {
                    // The listener was shut down to end this loop.
                    return;
                }
                eprintln!("{who}: accept: {}", std::io::Error::from_raw_os_error((-res) as i32));
                st.fire();
                return;
            }
            // SAFETY: accept returned a new descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(res as RawFd) };
            if active.load(Ordering::Relaxed) >= shared {
                // Turned away, as qemu-nbd does past --shared.
                drop(fd);
                continue;
            }
            active.fetch_add(1, Ordering::Relaxed);
            if let Some(h) = spread.as_ref().and_then(|s| s.pick()) {
                let (active, home) = (active.clone(), StopHandle(home.clone()));
                spread::serve_on(h, fd, who, move || {
                    if active.fetch_sub(1, Ordering::Relaxed) == 1 && !persistent {
                        home.fire();
                    }
                });
                continue;
            }
            let (active, st) = (active.clone(), st.clone());
            spawn_serve(fd, offer.clone(), who, move || {
                if active.fetch_sub(1, Ordering::Relaxed) == 1 && !persistent {
                    st.fire();
                }
            });
        }
    });
}

/// Serve the client on `fd` with `offer` on the current reactor; `done` runs once it has
/// ended. Client errors are reported with `who`.
pub(crate) fn spawn_serve(fd: OwnedFd, offer: Rc<server::Offer>, who: &'static str, done: impl FnOnce() + 'static) {
    basalt_reactor::spawn_local(async move {
        let sock = Rc::new(basalt_drivers::nbd::sock::Sock::new(fd));
        if let Err(e) = server::serve(sock, offer).await {
            eprintln!("{who}: client: {e}");
        }
        done();
    });
}

/// Bitmap `name` of the exported image, as qemu-nbd's `-B` finds it.
pub(crate) async fn export_bitmap(
    node: &std::sync::Arc<dyn basalt_engine::Node>,
    name: &str,
) -> Result<bitmap::ExportBitmap, String> {
    let not_found = || format!("Bitmap '{name}' is not found");
    let q = node.as_any().downcast_ref::<basalt_formats::qcow2::Qcow2Node>().ok_or_else(not_found)?;
    let summary = q.bitmap_list().into_iter().find(|b| b.name == name).ok_or_else(not_found)?;
    if summary.inconsistent {
        return Err(format!("Bitmap '{name}' is inconsistent and cannot be used"));
    }
    let (granularity_bits, bits) = q.bitmap_bits(name).await.map_err(|e| e.msg)?;
    Ok(bitmap::ExportBitmap {
        name: name.to_string(),
        granularity_bits,
        bits: std::cell::RefCell::new(bits),
        enabled: summary.enabled,
    })
}

thread_local! {
    static STOP: std::cell::RefCell<Option<Rc<Stop>>> = const { std::cell::RefCell::new(None) };
}

/// Fires the reactor's stop flag from another thread.
struct StopHandle(basalt_reactor::ReactorHandle);

impl StopHandle {
    fn fire(&self) {
        self.0.send(|| {
            STOP.with(|s| {
                if let Some(s) = s.borrow().as_ref() {
                    s.fire();
                }
            })
        });
    }
}
