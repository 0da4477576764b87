//! `basalt-io`: qemu-io's command line, commands and output.
//!
//! `basalt-io [-r] [-f fmt] [-U] [--image-opts] [-t cache] [-n] [-i aio] [-d discard]
//! [--object def] [-c command]... [file]` opens the image (if one is given) and runs each `-c`
//! command in order, or, without `-c`, reads commands from stdin after a `basalt-io> ` prompt
//! (as qemu-io does whether or not stdin is a terminal) until `quit` or end of input. Output is
//! qemu-io's, byte for byte where Basalt does the same thing; messages say `basalt-io:` where
//! qemu-io says `qemu-io:`.
//!
//! Exit status, as qemu-io's: 1 when the image cannot be opened, the command line is bad, or
//! any command failed (a failed command does not stop the next one; `quit` does); 0 otherwise.
//! Outstanding aio requests are completed, and the image flushed, before exit.
//!
//! Modules: [`args`] (splitting, per-command getopt), [`num`] (sizes), [`table`] (commands and
//! their help), [`dispatch`] (checks and calls), [`open`] (opening images), [`rw`] (read,
//! write, readv, writev, discard), [`aio`] (aio_read, aio_write), [`meta`] (length, info, map,
//! alloc, flush, truncate), [`control`] (help, sleep, sigraise, open), [`pattern`] (patterns and
//! hex dumps), [`stats`] (the report lines).

/// `print!` that ignores a closed stdout (`basalt-io ... | head`) instead of panicking.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($t)*);
    }};
}

/// `println!` that ignores a closed stdout.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// `eprintln!` that ignores a closed stderr.
macro_rules! errln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

mod aio;
mod args;
mod control;
mod dispatch;
mod meta;
mod num;
mod open;
mod pattern;
mod rw;
mod stats;
mod table;

use std::io::Write;
use std::sync::{Arc, Mutex};

use basalt_engine::Secrets;
use basalt_reactor::JoinHandle;

use crate::getopt::{self, opt};
use crate::image::{parse_aio, parse_cache};
use open::{Image, OpenRequest};

/// A command failed; what went wrong has been printed.
#[derive(Debug)]
pub(crate) struct Fail;

/// What a command returns.
pub(crate) type CmdResult = Result<(), Fail>;

/// The state commands share: the open image, aio requests in flight, and whether to stop.
pub(crate) struct Session {
    /// The open image, if any.
    pub img: Option<Image>,
    /// Tasks awaiting aio requests.
    pub aio: Vec<JoinHandle<()>>,
    /// `quit` was given.
    pub quit: bool,
    /// The `--object` secrets, for every image opened.
    pub secrets: Secrets,
}

impl Session {
    /// Wait for every aio request in flight (`aio_flush`).
    pub(crate) async fn drain(&mut self) {
        for h in std::mem::take(&mut self.aio) {
            h.await;
        }
    }

    /// Complete outstanding requests, then flush and close the image (`close`).
    pub(crate) async fn close(&mut self) {
        self.drain().await;
        if let Some(img) = self.img.take() {
            img.close().await;
        }
    }
}

const USAGE: &str = "Usage: basalt-io [OPTIONS]... [-c STRING]... [file]
Basalt disk exerciser (a qemu-io work-alike)

  --object OBJECTDEF   define an object such as 'secret' for
                       passwords and/or encryption keys
  --image-opts         treat file as option string
  -c, --cmd STRING     execute command with its arguments
                       from the given string
  -f, --format FMT     specifies the block driver to use
  -r, --read-only      export read-only
  -s, --snapshot       use snapshot file (not supported)
  -n, --nocache        disable host cache, short for -t none
  -C, --copy-on-read   enable copy-on-read (not supported yet)
  -m, --misalign       misalign allocations for O_DIRECT
  -k, --native-aio     use kernel AIO implementation (not supported)
  -i, --aio=MODE       use AIO mode (threads or io_uring)
  -t, --cache=MODE     use the given cache mode for the image
  -d, --discard=MODE   use the given discard mode for the image
  -T, --trace          tracing (not supported)
  -U, --force-share    force shared permissions
  -h, --help           display this help and exit
  -V, --version        output version information and exit

See 'basalt-io -c help' for information on available commands.
";

fn specs() -> Vec<getopt::OptSpec> {
    vec![
        opt(Some('c'), Some("cmd"), true),
        opt(Some('f'), Some("format"), true),
        opt(Some('r'), Some("read-only"), false),
        opt(Some('s'), Some("snapshot"), false),
        opt(Some('n'), Some("nocache"), false),
        opt(Some('C'), Some("copy-on-read"), false),
        opt(Some('m'), Some("misalign"), false),
        opt(Some('k'), Some("native-aio"), false),
        opt(Some('i'), Some("aio"), true),
        opt(Some('t'), Some("cache"), true),
        opt(Some('d'), Some("discard"), true),
        opt(Some('T'), Some("trace"), true),
        opt(Some('U'), Some("force-share"), false),
        opt(Some('h'), Some("help"), false),
        opt(Some('V'), Some("version"), false),
        opt(None, Some("object"), true),
        opt(None, Some("image-opts"), false),
    ]
}

/// `-m`: buffers start 16 bytes past an aligned address, as qemu-io's `MISALIGN_OFFSET`, so the
/// engine's bounce path for misaligned memory is exercised.
static MISALIGN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A request buffer of `len` bytes (contents unspecified), misaligned when `-m` was given.
pub(crate) fn alloc_buf(len: usize) -> basalt_reactor::IoBuf {
    if MISALIGN.load(std::sync::atomic::Ordering::Relaxed) {
        let mut b = basalt_reactor::IoBuf::new_uninit(len + 16);
        b.slice(16, len);
        b
    } else {
        basalt_reactor::IoBuf::new_uninit(len)
    }
}

/// Print an error as qemu-io does (`basalt-io: MESSAGE`).
fn error(msg: impl std::fmt::Display) {
    errln!("basalt-io: {msg}");
}

/// Parse the command line: the open request, the `-c` commands and the `--object` secrets (for
/// later `open` commands too), or the exit code.
fn parse_command_line(args: &[String]) -> Result<(Option<OpenRequest>, Vec<String>, Secrets), i32> {
    let a = getopt::parse(args, &specs()).map_err(|e| {
        error(e);
        out!("{USAGE}");
        1
    })?;
    let mut req = OpenRequest::default();
    let secrets = Secrets::new();
    let mut cmds = Vec::new();
    for o in &a.opts {
        let v = o.value.clone().unwrap_or_default();
        let refuse = |msg: String| {
            error(msg);
            1
        };
        match o.name.as_str() {
            "cmd" => cmds.push(v),
            "format" => req.fmt = Some(v),
            "read-only" => req.read_only = true,
            "force-share" => req.force_share = true,
            "image-opts" => req.image_opts = true,
            "nocache" => req.cache = Some("none".into()),
            "copy-on-read" => {
                return Err(refuse("-C/--copy-on-read needs the copy-on-read filter, which Basalt does not have yet".into()));
            }
            "misalign" => MISALIGN.store(true, std::sync::atomic::Ordering::Relaxed),
            "cache" => {
                if parse_cache(&v).is_err() {
                    return Err(refuse(format!("Invalid cache option: {v}")));
                }
                req.cache = Some(v);
            }
            "aio" => {
                if let Err(e) = parse_aio(&v) {
                    return Err(refuse(e.msg));
                }
                req.aio = Some(v);
            }
            "discard" => match open::parse_discard(&v) {
                Some(d) => req.discard = Some(d),
                None => return Err(refuse(format!("Invalid discard option: {v}"))),
            },
            "object" => secrets.add_object(&v).map_err(|e| refuse(e.msg))?,
            "snapshot" => return Err(refuse("snapshot mode (-s) is not supported".into())),
            "native-aio" => return Err(refuse("aio=native (Linux AIO) is not supported; use -i io_uring or -i threads".into())),
            "trace" => return Err(refuse("tracing (-T) is not supported".into())),
            "help" => {
                out!("{USAGE}");
                return Err(0);
            }
            "version" => {
                outln!("basalt-io version {}", env!("CARGO_PKG_VERSION"));
                return Err(0);
            }
            _ => {
                out!("{USAGE}");
                return Err(1);
            }
        }
    }
    if a.operands.len() > 1 {
        out!("{USAGE}");
        return Err(1);
    }
    if req.image_opts && req.fmt.is_some() {
        error("--image-opts and -f are mutually exclusive");
        return Err(1);
    }
    req.secrets = secrets.clone();
    match a.operands.first() {
        Some(f) => {
            req.filename = Some(f.clone());
            Ok((Some(req), cmds, secrets))
        }
        None => Ok((None, cmds, secrets)),
    }
}

/// Read one line of stdin on the blocking pool, so aio requests keep completing meanwhile.
async fn read_line() -> Option<String> {
    let cell = Arc::new(Mutex::new(String::new()));
    let c2 = cell.clone();
    let job = move || {
        let mut s = String::new();
        match std::io::stdin().read_line(&mut s) {
            Ok(n) => {
                match c2.lock() {
                    Ok(mut g) => *g = s,
                    Err(p) => *p.into_inner() = s,
                }
                n as i64
            }
            Err(_) => -1,
        }
    };
    let (n, _) = basalt_reactor::blocking(job, None).await;
    if n <= 0 {
        return None;
    }
    let line = match cell.lock() {
        Ok(g) => g.clone(),
        Err(p) => p.into_inner().clone(),
    };
    Some(line.trim_end_matches(['\n', '\r']).to_string())
}

/// Run basalt-io with `args` (without the program name); returns the exit code.
pub async fn main(args: Vec<String>) -> i32 {
    let (req, cmds, secrets) = match parse_command_line(&args) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let mut s = Session { img: None, aio: Vec::new(), quit: false, secrets };
    if let Some(req) = req {
        match open::open(&req).await {
            Ok(img) => s.img = Some(img),
            Err(msg) => {
                error(msg);
                return 1;
            }
        }
    }
    let mut failed = false;
    if !cmds.is_empty() {
        for c in &cmds {
            failed |= dispatch::run_line(&mut s, c).await.is_err();
            if s.quit {
                break;
            }
        }
    } else {
        loop {
            out!("basalt-io> ");
            let _ = std::io::stdout().flush();
            let Some(line) = read_line().await else {
                break;
            };
            failed |= dispatch::run_line(&mut s, &line).await.is_err();
            if s.quit {
                break;
            }
        }
    }
    s.close().await;
    let _ = std::io::stdout().flush();
    i32::from(failed)
}
