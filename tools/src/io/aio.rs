//! Asynchronous commands: `aio_read`, `aio_write` (and `aio_flush`, which is
//! [`Session::drain`](super::Session::drain)).
//!
//! The request is issued when the command runs (its future is created then, so a leaf
//! request is already queued on the reactor's ring) and a task spawned on the reactor awaits
//! it and prints the result when it completes, so several requests are really in flight at
//! once and their reports appear in completion order, interleaved with later commands as in
//! qemu-io. As in qemu-io, a submitted request counts as a successful command whatever its
//! outcome; only a refused command line fails. The time reported runs from submission to
//! completion.

use std::time::Instant;

use basalt_engine::{WriteFlags, ZeroFlags};
use basalt_reactor::{spawn_local, JoinHandle};

use super::args::Opt;
use super::dispatch::{num, Call};
use super::open::Image;
use super::pattern::{self, READ_FILL, WRITE_FILL};
use super::rw::{done_buf, iovec};
use super::stats::report;
use super::{CmdResult, Fail};

/// Keep `h` for `aio_flush`, and let its task run once so that the request is under way
/// before the next command issues its own (qemu-io starts an aio request at once).
async fn track(inflight: &mut Vec<JoinHandle<()>>, h: JoinHandle<()>) {
    inflight.retain(|h| !h.is_finished());
    inflight.push(h);
    basalt_reactor::yield_now().await;
}

fn pattern_opt(v: Option<String>) -> Result<u8, Fail> {
    pattern::parse_pattern(v.as_deref().unwrap_or("")).map_err(|m| {
        outln!("{m}");
        Fail
    })
}

/// `aio_read [-Ciqv] [-P pattern] off len [len..]`.
pub(crate) async fn aio_read(img: &Image, inflight: &mut Vec<JoinHandle<()>>, call: &Call<'_>) -> CmdResult {
    let (mut machine, mut quiet, mut verbose, mut pattern) = (false, false, false, None);
    let mut g = call.getopt("CiP:qrv");
    for o in g.by_ref() {
        match o {
            Opt::Opt('C', _) => machine = true,
            Opt::Opt('P', v) => pattern = Some(pattern_opt(v)?),
            Opt::Opt('i', _) => {
                outln!("injecting invalid read request");
                return Ok(());
            }
            Opt::Opt('q', _) => quiet = true,
            Opt::Opt('r', _) => {}
            Opt::Opt('v', _) => verbose = true,
            o => return Err(call.unexpected(o)),
        }
    }
    let ops = g.operands();
    let Some((off_arg, lens)) = ops.split_first().filter(|(_, l)| !l.is_empty()) else {
        return Err(call.usage());
    };
    let offset = num(off_arg)?;
    let buf = iovec(lens, READ_FILL)?;
    let count = buf.len() as u64;
    let t = Instant::now();
    let fut = img.be.read(offset, buf);
    let h = spawn_local(async move {
        let d = fut.await;
        let elapsed = t.elapsed();
        let buf = match done_buf(d) {
            Ok(b) => b,
            Err(e) => {
                outln!("readv failed: {e}");
                return;
            }
        };
        let mut out = String::new();
        if let Some(p) = pattern {
            if !pattern::matches(&buf, p) {
                out += &pattern::mismatch(offset, count);
            }
        }
        if !quiet {
            if verbose {
                out += &pattern::dump(&buf, offset);
            }
            out += &report("read", elapsed, offset, count, count, 1, machine);
        }
        out!("{out}");
    });
    track(inflight, h).await;
    Ok(())
}

/// `aio_write [-Cfiquz] [-P pattern] off len [len..]`.
pub(crate) async fn aio_write(img: &Image, inflight: &mut Vec<JoinHandle<()>>, call: &Call<'_>) -> CmdResult {
    let (mut machine, mut quiet, mut fua, mut may_unmap, mut zero) = (false, false, false, false, false);
    let mut pattern = WRITE_FILL;
    let mut g = call.getopt("CfiqrP:uz");
    for o in g.by_ref() {
        match o {
            Opt::Opt('C', _) => machine = true,
            Opt::Opt('f', _) => fua = true,
            Opt::Opt('q', _) => quiet = true,
            Opt::Opt('r', _) => {}
            Opt::Opt('u', _) => may_unmap = true,
            Opt::Opt('P', v) => pattern = pattern_opt(v)?,
            Opt::Opt('i', _) => {
                outln!("injecting invalid write request");
                return Ok(());
            }
            Opt::Opt('z', _) => zero = true,
            o => return Err(call.unexpected(o)),
        }
    }
    let ops = g.operands();
    let Some((off_arg, lens)) = ops.split_first().filter(|(_, l)| !l.is_empty()) else {
        return Err(call.usage());
    };
    if zero && lens.len() != 1 {
        outln!("-z supports only a single length parameter");
        return Err(Fail);
    }
    if may_unmap && !zero {
        outln!("-u requires -z to be specified");
        return Err(Fail);
    }
    let offset = num(off_arg)?;
    let t = Instant::now();
    let (fut, count) = if zero {
        let count = num(&lens[0])?;
        (img.be.write_zeroes(offset, count, ZeroFlags { may_unmap, no_fallback: false, fua }), count)
    } else {
        let buf = iovec(lens, pattern)?;
        let count = buf.len() as u64;
        (img.be.write(offset, buf, WriteFlags { fua }), count)
    };
    let h = spawn_local(async move {
        let d = fut.await;
        let elapsed = t.elapsed();
        if let Err(e) = d.res {
            outln!("aio_write failed: {e}");
            return;
        }
        if !quiet {
            out!("{}", report("wrote", elapsed, offset, count, count, 1, machine));
        }
    });
    track(inflight, h).await;
    Ok(())
}
