//! Commands about the image rather than its bytes: `length`, `info`, `map`, `alloc`, `flush`,
//! `truncate`.
//!
//! "Allocated" is qemu-io's notion (`bdrv_is_allocated`): the top node defines the content of
//! the range, as data or as zeroes. Raw over a file is allocated everywhere, holes included;
//! a null-co device without `read-zeroes` is allocated nowhere. Lengths are the node's size.

use basalt_engine::{Node, Prealloc};

use super::args::Opt;
use super::dispatch::{num, Call};
use super::num::{cvtnum, cvtnum_error, NumError};
use super::open::Image;
use super::stats::cvtstr;
use super::{CmdResult, Fail};

/// Whether `off` is allocated, and for how many bytes (at most `bytes`) that holds; 0 bytes at
/// or past the end of the image.
async fn is_allocated(img: &Image, off: u64, bytes: u64) -> Result<(bool, u64), basalt_engine::IoStatus> {
    let size = img.be.size();
    if off >= size || bytes == 0 {
        return Ok((false, 0));
    }
    let st = img.be.block_status(off, bytes.min(size - off)).await?;
    Ok((st.allocated && (st.data || st.zero), st.len))
}

/// `length`.
pub(crate) fn length(img: &Image) -> CmdResult {
    outln!("{}", cvtstr(img.be.size() as f64));
    Ok(())
}

/// Cluster size and VM state offset as QEMU's `bdrv_get_info` reports them, where the driver
/// answers it (raw passes the question to its file; file answers zeroes).
fn get_info(node: &dyn Node) -> Option<(u64, u64)> {
    match node.driver() {
        "file" | "host_device" => Some((0, 0)),
        "raw" => node.children().first().and_then(|c| get_info(c.node.as_ref())),
        _ => None,
    }
}

/// `info`. A protocol node's name is printed twice: qemu-io prints a driver's format name and
/// then its protocol name, and protocol drivers have both.
pub(crate) fn info(img: &Image) -> CmdResult {
    let node = img.node.as_ref();
    outln!("format name: {}", node.driver());
    if !node.is_format() {
        outln!("format name: {}", node.driver());
    }
    let (cluster, vmstate) = get_info(node).ok_or(Fail)?;
    outln!("cluster size: {}", cvtstr(cluster as f64));
    outln!("vm state offset: {}", cvtstr(vmstate as f64));
    Ok(())
}

/// `map`: runs of equal allocation status, merged.
pub(crate) async fn map(img: &Image) -> CmdResult {
    let mut offset = 0u64;
    let mut bytes = img.be.size();
    let fail = |e: basalt_engine::IoStatus| {
        errln!("basalt-io: Failed to get allocation status: {e}");
        Fail
    };
    while bytes > 0 {
        let (first, mut num) = is_allocated(img, offset, bytes).await.map_err(fail)?;
        while num < bytes {
            let (a, n) = is_allocated(img, offset + num, bytes - num).await.map_err(fail)?;
            if a != first || n == 0 {
                break;
            }
            num += n;
        }
        if num == 0 {
            errln!("basalt-io: Unexpected end of image");
            return Err(Fail);
        }
        let what = if first { "    allocated" } else { "not allocated" };
        outln!("{} (0x{num:x}) bytes {what} at offset {} (0x{offset:x})", cvtstr(num as f64), cvtstr(offset as f64));
        offset += num;
        bytes -= num;
    }
    Ok(())
}

/// `alloc offset [count]`.
pub(crate) async fn alloc(img: &Image, call: &Call<'_>) -> CmdResult {
    let start = num(&call.args[0])?;
    let mut count = match call.args.get(1) {
        Some(a) => num(a)?,
        None => 512,
    };
    let (mut offset, mut remaining, mut sum) = (start, count, 0u64);
    while remaining > 0 {
        let (allocated, n) = is_allocated(img, offset, remaining).await.map_err(|e| {
            outln!("is_allocated failed: {e}");
            Fail
        })?;
        offset += n;
        remaining -= n;
        if allocated {
            sum += n;
        }
        if n == 0 {
            count -= remaining;
            remaining = 0;
        }
    }
    outln!("{sum}/{count} bytes allocated at offset {}", cvtstr(start as f64));
    Ok(())
}

/// `flush`: failures only show in the exit code, as in qemu-io.
pub(crate) async fn flush(img: &Image) -> CmdResult {
    img.be.flush().await.res.map(|_| ()).map_err(|_| Fail)
}

/// `truncate [-m prealloc_mode] off`.
pub(crate) async fn truncate(img: &Image, call: &Call<'_>) -> CmdResult {
    let mut prealloc = Prealloc::Off;
    let mut had_opts = false;
    let mut g = call.getopt("m:");
    for o in g.by_ref() {
        match o {
            Opt::Opt('m', v) => {
                had_opts = true;
                let v = v.unwrap_or_default();
                prealloc = Prealloc::parse(&v).map_err(|_| {
                    errln!("basalt-io: Invalid preallocation mode '{v}'");
                    Fail
                })?;
            }
            o => return Err(call.unexpected(o)),
        }
    }
    // qemu-io names argv[1] in a parsing error, which after glibc's permutation is the first
    // option when there is one.
    let argv1 = if had_opts { call.args.iter().find(|a| a.starts_with('-') && *a != "--") } else { call.args.first() };
    let argv1 = argv1.map_or("", String::as_str);
    let size = match g.operands().first().map(|a| cvtnum(a)) {
        Some(Ok(v)) => v,
        Some(Err(e)) => {
            outln!("{}", cvtnum_error(e, argv1));
            return Err(Fail);
        }
        None => {
            outln!("{}", cvtnum_error(NumError::Invalid, argv1));
            return Err(Fail);
        }
    };
    img.node.truncate(size, prealloc).await.map_err(|e| {
        errln!("basalt-io: {e}");
        Fail
    })
}
