//! Commands that steer the session rather than do I/O: `help`, `sleep`, `sigraise`, `open`
//! (`quit`, `close`, `abort` and `aio_flush` are one-liners in the dispatcher).

use std::time::Duration;

use super::args::Opt;
use super::dispatch::{num, Call};
use super::num::strtol;
use super::open::{open as open_image, parse_discard, OpenRequest};
use super::table;
use super::{CmdResult, Fail, Session};
use crate::image::parse_cache;

/// `help [command]`.
pub(crate) fn help(call: &Call<'_>) -> CmdResult {
    let Some(name) = call.args.first() else {
        out!("{}", table::help_all());
        return Ok(());
    };
    match table::find(name) {
        Some(c) => {
            out!("{}", table::help_one(name, c));
            Ok(())
        }
        None => {
            outln!("command {name} not found");
            Err(Fail)
        }
    }
}

/// `sleep ms`: the reactor keeps completing aio requests meanwhile.
pub(crate) async fn sleep(call: &Call<'_>) -> CmdResult {
    let arg = &call.args[0];
    match strtol(arg) {
        (ms, true) if ms >= 0 => {
            basalt_reactor::sleep(Duration::from_millis(ms as u64)).await;
            Ok(())
        }
        _ => {
            outln!("{arg} is not a valid number");
            Err(Fail)
        }
    }
}

/// `sigraise signal`.
pub(crate) fn sigraise(call: &Call<'_>) -> CmdResult {
    let sig = num(&call.args[0])?;
    let sig = libc::c_int::try_from(sig).unwrap_or(libc::c_int::MAX);
    // SAFETY: raise() has no memory-safety preconditions; an invalid number fails with EINVAL.
    unsafe { libc::raise(sig) };
    Ok(())
}

/// `open [-rsCnkU] [-t cache] [-d discard] [-o options] [path]`.
pub(crate) async fn open(s: &mut Session, call: &Call<'_>) -> CmdResult {
    let mut req = OpenRequest { secrets: s.secrets.clone(), ..OpenRequest::default() };
    let mut g = call.getopt("snCro:kt:d:Ui:");
    let refuse = |msg: &str| {
        errln!("basalt-io: {msg}");
        Err(Fail)
    };
    for o in g.by_ref() {
        match o {
            Opt::Opt('s', _) => return refuse("snapshot mode (-s) is not supported"),
            Opt::Opt('k', _) => return refuse("aio=native (Linux AIO) is not supported; use -i io_uring or -i threads"),
            Opt::Opt('n', _) => req.cache = Some("none".into()),
            Opt::Opt('C', _) => {}
            Opt::Opt('r', _) => req.read_only = true,
            Opt::Opt('U', _) => req.force_share = true,
            Opt::Opt('o', v) => {
                let v = v.unwrap_or_default();
                req.options = Some(match req.options.take() {
                    Some(prev) => format!("{prev},{v}"),
                    None => v,
                });
            }
            Opt::Opt('t', v) => {
                let v = v.unwrap_or_default();
                if parse_cache(&v).is_err() {
                    return refuse(&format!("Invalid cache option: {v}"));
                }
                req.cache = Some(v);
            }
            Opt::Opt('d', v) => {
                let v = v.unwrap_or_default();
                match parse_discard(&v) {
                    Some(d) => req.discard = Some(d),
                    None => return refuse(&format!("Invalid discard option: {v}")),
                }
            }
            Opt::Opt('i', v) => {
                let v = v.unwrap_or_default();
                if let Err(e) = crate::image::parse_aio(&v) {
                    return refuse(&e.msg);
                }
                req.aio = Some(v);
            }
            o => return Err(call.unexpected(o)),
        }
    }
    let ops = g.operands();
    if ops.len() > 1 {
        return Err(call.usage());
    }
    if s.img.is_some() {
        return refuse("file open already, try 'help close'");
    }
    req.filename = ops.first().cloned();
    match open_image(&req).await {
        Ok(img) => {
            s.img = Some(img);
            Ok(())
        }
        Err(msg) => refuse(&msg),
    }
}
