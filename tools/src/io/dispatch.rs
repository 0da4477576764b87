//! Running one command line: looking the command up, qemu-io's checks before a command runs
//! (an open image, the argument count, the write permission) and the call itself.
//!
//! As in qemu-io, messages about the command line itself (unknown command, bad argument
//! count, no image) go to stderr, while a command's own complaints (bad numbers, bad pattern,
//! "read failed: ...") go to stdout; a refused permission is an error report
//! (`basalt-io: Block node is read-only`).

use super::args::{split, Getopt, Opt};
use super::num::{cvtnum, cvtnum_error};
use super::table::{self, CmdId, CmdInfo};
use super::{aio, control, meta, rw, CmdResult, Fail, Session};

/// A command being run: the name it was called by, its table entry and its arguments.
pub(crate) struct Call<'a> {
    /// The name as typed (an alias stays an alias in messages).
    pub name: &'a str,
    /// The table entry.
    pub info: &'static CmdInfo,
    /// The words after the name.
    pub args: &'a [String],
}

impl Call<'_> {
    /// Print the usage line; the command fails.
    pub(crate) fn usage(&self) -> Fail {
        out!("{}", table::usage(self.info));
        Fail
    }

    /// Options of this command, glibc getopt style, against `spec`.
    pub(crate) fn getopt(&self, spec: &'static str) -> Getopt<'_> {
        Getopt::new(self.args, spec)
    }

    /// A getopt complaint (`NAME: invalid option -- 'x'`) followed by the usage line.
    pub(crate) fn bad_option(&self, msg: &str) -> Fail {
        errln!("{}: {msg}", self.name);
        self.usage()
    }

    /// An option the command's loop does not handle: the same as glibc's `?`.
    pub(crate) fn unexpected(&self, o: Opt) -> Fail {
        match o {
            Opt::Bad(msg) => self.bad_option(&msg),
            Opt::Opt(..) => self.usage(),
        }
    }
}

/// A size argument; a bad one prints qemu-io's parsing error.
pub(crate) fn num(arg: &str) -> Result<u64, Fail> {
    cvtnum(arg).map_err(|e| {
        outln!("{}", cvtnum_error(e, arg));
        Fail
    })
}

/// Run one command line.
pub(crate) async fn run_line(s: &mut Session, line: &str) -> CmdResult {
    let words = split(line);
    let Some((name, args)) = words.split_first() else {
        return Ok(());
    };
    let Some(info) = table::find(name) else {
        errln!("command \"{name}\" not found");
        return Err(Fail);
    };
    if !info.global && s.img.is_none() {
        errln!("no file open, try 'help open'");
        return Err(Fail);
    }
    let n = args.len();
    if n < info.argmin || info.argmax.is_some_and(|max| n > max) {
        match info.argmax {
            None => errln!("bad argument count {n} to {name}, expected at least {} arguments", info.argmin),
            Some(max) if max == info.argmin => errln!("bad argument count {n} to {name}, expected {max} arguments"),
            Some(max) => errln!("bad argument count {n} to {name}, expected between {} and {max} arguments", info.argmin),
        }
        return Err(Fail);
    }
    if info.writes && s.img.as_ref().is_some_and(|i| i.node.read_only()) {
        errln!("basalt-io: Block node is read-only");
        return Err(Fail);
    }
    let call = Call { name, info, args };
    run(s, &call).await
}

async fn run(s: &mut Session, call: &Call<'_>) -> CmdResult {
    match call.info.id {
        CmdId::Abort => std::process::abort(),
        CmdId::Help => control::help(call),
        CmdId::Quit => {
            s.quit = true;
            Ok(())
        }
        CmdId::Sleep => control::sleep(call).await,
        CmdId::Sigraise => control::sigraise(call),
        CmdId::Open => control::open(s, call).await,
        CmdId::Close => {
            s.close().await;
            Ok(())
        }
        CmdId::AioFlush => {
            s.drain().await;
            Ok(())
        }
        _ => {
            let Session { img, aio: inflight, .. } = s;
            let Some(img) = img.as_ref() else {
                return Err(Fail);
            };
            match call.info.id {
                CmdId::Read => rw::read(img, call).await,
                CmdId::Write => rw::write(img, call).await,
                CmdId::Readv => rw::readv(img, call).await,
                CmdId::Writev => rw::writev(img, call).await,
                CmdId::Discard => rw::discard(img, call).await,
                CmdId::AioRead => aio::aio_read(img, inflight, call).await,
                CmdId::AioWrite => aio::aio_write(img, inflight, call).await,
                CmdId::Flush => meta::flush(img).await,
                CmdId::Length => meta::length(img),
                CmdId::Info => meta::info(img),
                CmdId::Map => meta::map(img).await,
                CmdId::Alloc => meta::alloc(img, call).await,
                CmdId::Truncate => meta::truncate(img, call).await,
                _ => Err(Fail),
            }
        }
    }
}
