//! The synchronous data commands: `read`, `write`, `readv`, `writev`, `discard`.
//!
//! Each parses its options in qemu-io's order and with its messages, issues one request
//! through the backend, times it, and prints the report (unless `-q`). `readv`/`writev` take
//! several lengths; their buffers are laid end to end in one [`IoBuf`], which is what the
//! request sees (the engine has no scatter-gather requests). Compressed writes (`-c`) go to the
//! format's compressed-write path (qcow2); formats without one (raw) fail with ENOTSUP, as in
//! qemu-io. VM state (`-b`) is not supported by any Basalt driver and fails with ENOTSUP.

use std::time::{Duration, Instant};

use basalt_engine::{IoDone, IoStatus, WriteFlags, ZeroFlags};
use basalt_reactor::IoBuf;

use super::args::Opt;
use super::dispatch::{num, Call};
use super::open::Image;
use super::pattern::{self, READ_FILL, WRITE_FILL};
use super::stats::report;
use super::{CmdResult, Fail};

/// qemu-io's `BDRV_REQUEST_MAX_BYTES`: the largest single request.
pub(crate) const MAX_BYTES: u64 = 2147483136;

/// Print `NAME failed: ERROR` for a failed request.
fn failed(what: &str, e: IoStatus) -> Fail {
    outln!("{what} failed: {e}");
    Fail
}

fn pattern_opt(v: Option<String>) -> Result<u8, Fail> {
    pattern::parse_pattern(v.as_deref().unwrap_or("")).map_err(|m| {
        outln!("{m}");
        Fail
    })
}

/// The buffer a request handed back (always there; a missing one is an I/O error).
pub(crate) fn done_buf(d: IoDone) -> Result<IoBuf, IoStatus> {
    d.res?;
    d.buf.ok_or(IoStatus::EIO)
}

/// Refuse a request beyond the end before allocating its buffer (the backend would refuse it
/// with EIO anyway; this spares filling gigabytes for nothing).
fn check_bounds(img: &Image, what: &str, offset: u64, count: u64) -> CmdResult {
    let size = img.be.size();
    if offset > size || count > size - offset {
        return Err(failed(what, IoStatus::EIO));
    }
    Ok(())
}

/// Sector alignment of `-b`/`-c` requests.
fn check_sector_aligned(offset: u64, count: u64) -> CmdResult {
    if !offset.is_multiple_of(512) {
        outln!("{offset} is not a sector-aligned value for 'offset'");
        return Err(Fail);
    }
    if !count.is_multiple_of(512) {
        outln!("{count} is not a sector-aligned value for 'count'");
        return Err(Fail);
    }
    Ok(())
}

/// qemu-io's `create_iovec` checks: the total of several lengths.
fn iovec_len(lens: &[String]) -> Result<u64, Fail> {
    let mut total = 0u64;
    for arg in lens {
        let len = num(arg)?;
        if len > MAX_BYTES {
            outln!("Argument '{arg}' exceeds maximum size {MAX_BYTES}");
            return Err(Fail);
        }
        if total > MAX_BYTES - len {
            outln!("The total number of bytes exceed the maximum size {MAX_BYTES}");
            return Err(Fail);
        }
        total += len;
    }
    Ok(total)
}

fn filled(len: u64, fill: u8) -> IoBuf {
    let mut buf = super::alloc_buf(len as usize);
    buf.fill(fill);
    buf
}

/// qemu-io's `create_iovec`: several lengths, checked, laid end to end in one buffer of `fill`.
pub(crate) fn iovec(lens: &[String], fill: u8) -> Result<IoBuf, Fail> {
    iovec_len(lens).map(|n| filled(n, fill))
}

/// `read [-bCqv] [-P pattern [-s off] [-l len]] off len`.
pub(crate) async fn read(img: &Image, call: &Call<'_>) -> CmdResult {
    let (mut vmstate, mut machine, mut quiet, mut verbose) = (false, false, false, false);
    let (mut pattern, mut pat_off, mut pat_len) = (None, None, None);
    let mut g = call.getopt("bCl:pP:qrs:v");
    for o in g.by_ref() {
        match o {
            Opt::Opt('b', _) => vmstate = true,
            Opt::Opt('C', _) => machine = true,
            Opt::Opt('l', v) => pat_len = Some(num(v.as_deref().unwrap_or(""))?),
            Opt::Opt('p' | 'r', _) => {}
            Opt::Opt('P', v) => pattern = Some(pattern_opt(v)?),
            Opt::Opt('q', _) => quiet = true,
            Opt::Opt('s', v) => pat_off = Some(num(v.as_deref().unwrap_or(""))?),
            Opt::Opt('v', _) => verbose = true,
            o => return Err(call.unexpected(o)),
        }
    }
    let ops = g.operands();
    let [off_arg, count_arg] = ops.as_slice() else {
        return Err(call.usage());
    };
    let offset = num(off_arg)?;
    let count = num(count_arg)?;
    if count > MAX_BYTES {
        outln!("length cannot exceed {MAX_BYTES}, given {count_arg}");
        return Err(Fail);
    }
    if pattern.is_none() && (pat_len.is_some() || pat_off.is_some()) {
        return Err(call.usage());
    }
    let pat_off = pat_off.unwrap_or(0);
    let pat_len = pat_len.map_or(count as i128 - i128::from(pat_off), i128::from);
    if pat_len < 0 || pat_len + i128::from(pat_off) > i128::from(count) {
        outln!("pattern verification range exceeds end of read data");
        return Err(Fail);
    }
    let pat_len = pat_len as u64;
    if vmstate {
        check_sector_aligned(offset, count)?;
    }
    if !vmstate {
        check_bounds(img, "read", offset, count)?;
    }
    let buf = filled(count, READ_FILL);
    let t = Instant::now();
    let d = if vmstate { IoDone { buf: Some(buf), res: Err(IoStatus::ENOTSUP) } } else { img.be.read(offset, buf).await };
    let elapsed = t.elapsed();
    let buf = done_buf(d).map_err(|e| failed("read", e))?;
    let check = pattern.map(|p| (p, pat_off, pat_len));
    finish_read(&buf, offset, count, check, ReadOutput { verbose, quiet, machine }, elapsed)
}

/// How a completed read is shown.
struct ReadOutput {
    verbose: bool,
    quiet: bool,
    machine: bool,
}

/// The common end of `read` and `readv`: check the pattern over `check`'s (byte, offset,
/// length) window, dump the data with `-v`, print the report line.
fn finish_read(
    buf: &[u8],
    offset: u64,
    count: u64,
    check: Option<(u8, u64, u64)>,
    how: ReadOutput,
    elapsed: Duration,
) -> CmdResult {
    let mut ret = Ok(());
    let mut out = String::new();
    if let Some((p, at, len)) = check {
        if !pattern::matches(&buf[at as usize..(at + len) as usize], p) {
            out += &pattern::mismatch(offset + at, len);
            ret = Err(Fail);
        }
    }
    if !how.quiet {
        if how.verbose {
            out += &pattern::dump(buf, offset);
        }
        out += &report("read", elapsed, offset, count, count, 1, how.machine);
    }
    out!("{out}");
    ret
}

/// `write [-bcCfnquz] [-P pattern | -s file] off len`.
pub(crate) async fn write(img: &Image, call: &Call<'_>) -> CmdResult {
    let (mut vmstate, mut compressed, mut machine, mut quiet, mut zero) = (false, false, false, false, false);
    let (mut fua, mut no_fallback, mut may_unmap) = (false, false, false);
    let (mut pattern, mut file) = (None, None);
    let mut g = call.getopt("bcCfnpP:qrs:uz");
    for o in g.by_ref() {
        match o {
            Opt::Opt('b', _) => vmstate = true,
            Opt::Opt('c', _) => compressed = true,
            Opt::Opt('C', _) => machine = true,
            Opt::Opt('f', _) => fua = true,
            Opt::Opt('n', _) => no_fallback = true,
            Opt::Opt('p' | 'r', _) => {}
            Opt::Opt('P', v) => pattern = Some(pattern_opt(v)?),
            Opt::Opt('q', _) => quiet = true,
            Opt::Opt('s', v) => file = v,
            Opt::Opt('u', _) => may_unmap = true,
            Opt::Opt('z', _) => zero = true,
            o => return Err(call.unexpected(o)),
        }
    }
    let ops = g.operands();
    let [off_arg, count_arg] = ops.as_slice() else {
        return Err(call.usage());
    };
    let refuse = |msg: &str| {
        outln!("{msg}");
        Err(Fail)
    };
    if vmstate && zero {
        return refuse("-b and -z cannot be specified at the same time");
    }
    if fua && (vmstate || compressed) {
        return refuse("-f and -b or -c cannot be specified at the same time");
    }
    if no_fallback && !zero {
        return refuse("-n requires -z to be specified");
    }
    if may_unmap && !zero {
        return refuse("-u requires -z to be specified");
    }
    if usize::from(zero) + usize::from(pattern.is_some()) + usize::from(file.is_some()) > 1 {
        return refuse("Only one of -z, -P, and -s can be specified at the same time");
    }
    let offset = num(off_arg)?;
    let count = num(count_arg)?;
    if count > MAX_BYTES && !no_fallback {
        outln!("length cannot exceed {MAX_BYTES} without -n, given {count_arg}");
        return Err(Fail);
    }
    if vmstate || compressed {
        check_sector_aligned(offset, count)?;
    }
    if !vmstate && !compressed && !zero && file.is_none() {
        check_bounds(img, "write", offset, count)?;
    }
    let mut buf = None;
    if !zero {
        let mut b = super::alloc_buf(count as usize);
        match &file {
            Some(f) => pattern::fill_from_file(&mut b, f).map_err(|m| {
                errln!("{m}");
                Fail
            })?,
            None => b.fill(pattern.unwrap_or(WRITE_FILL)),
        }
        buf = Some(b);
    }
    let t = Instant::now();
    let res = match buf {
        _ if vmstate => Err(IoStatus::ENOTSUP),
        Some(b) if compressed => img.be.write_compressed(offset, b).await.res,
        Some(b) => img.be.write(offset, b, WriteFlags { fua }).await.res,
        None => img.be.write_zeroes(offset, count, ZeroFlags { may_unmap, no_fallback, fua }).await.res,
    };
    let elapsed = t.elapsed();
    res.map_err(|e| failed("write", e))?;
    if !quiet {
        out!("{}", report("wrote", elapsed, offset, count, count, 1, machine));
    }
    Ok(())
}

/// `readv [-Cqv] [-P pattern] off len [len..]`.
pub(crate) async fn readv(img: &Image, call: &Call<'_>) -> CmdResult {
    let (mut machine, mut quiet, mut verbose, mut pattern) = (false, false, false, None);
    let mut g = call.getopt("CP:qrv");
    for o in g.by_ref() {
        match o {
            Opt::Opt('C', _) => machine = true,
            Opt::Opt('P', v) => pattern = Some(pattern_opt(v)?),
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
    let count = iovec_len(lens)?;
    check_bounds(img, "readv", offset, count)?;
    let buf = filled(count, READ_FILL);
    let t = Instant::now();
    let d = img.be.read(offset, buf).await;
    let elapsed = t.elapsed();
    let buf = done_buf(d).map_err(|e| failed("readv", e))?;
    finish_read(&buf, offset, count, pattern.map(|p| (p, 0, count)), ReadOutput { verbose, quiet, machine }, elapsed)
}

/// `writev [-Cfq] [-P pattern] off len [len..]`.
pub(crate) async fn writev(img: &Image, call: &Call<'_>) -> CmdResult {
    let (mut machine, mut quiet, mut fua, mut pattern) = (false, false, false, WRITE_FILL);
    let mut g = call.getopt("CfqrP:");
    for o in g.by_ref() {
        match o {
            Opt::Opt('C', _) => machine = true,
            Opt::Opt('f', _) => fua = true,
            Opt::Opt('q', _) => quiet = true,
            Opt::Opt('r', _) => {}
            Opt::Opt('P', v) => pattern = pattern_opt(v)?,
            o => return Err(call.unexpected(o)),
        }
    }
    let ops = g.operands();
    let Some((off_arg, lens)) = ops.split_first().filter(|(_, l)| !l.is_empty()) else {
        return Err(call.usage());
    };
    let offset = num(off_arg)?;
    let count = iovec_len(lens)?;
    check_bounds(img, "writev", offset, count)?;
    let buf = filled(count, pattern);
    let t = Instant::now();
    let d = img.be.write(offset, buf, WriteFlags { fua }).await;
    let elapsed = t.elapsed();
    d.res.map_err(|e| failed("writev", e))?;
    if !quiet {
        out!("{}", report("wrote", elapsed, offset, count, count, 1, machine));
    }
    Ok(())
}

/// `discard [-Cq] off len`.
pub(crate) async fn discard(img: &Image, call: &Call<'_>) -> CmdResult {
    let (mut machine, mut quiet) = (false, false);
    let mut g = call.getopt("Cq");
    for o in g.by_ref() {
        match o {
            Opt::Opt('C', _) => machine = true,
            Opt::Opt('q', _) => quiet = true,
            o => return Err(call.unexpected(o)),
        }
    }
    let ops = g.operands();
    let [off_arg, len_arg] = ops.as_slice() else {
        return Err(call.usage());
    };
    let offset = num(off_arg)?;
    let bytes = num(len_arg)?;
    if bytes > MAX_BYTES {
        outln!("length cannot exceed {MAX_BYTES}, given {len_arg}");
        return Err(Fail);
    }
    let t = Instant::now();
    let d = img.be.discard(offset, bytes).await;
    let elapsed = t.elapsed();
    d.res.map_err(|e| failed("discard", e))?;
    if !quiet {
        out!("{}", report("discard", elapsed, offset, bytes, bytes, 1, machine));
    }
    Ok(())
}
