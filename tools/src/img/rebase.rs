//! `basalt-img rebase`: change an image's backing file, as qemu-img rebase does.
//!
//! Safe mode (the default) first copies into the image every range it does not allocate
//! itself and whose content differs between the old backing chain and the new backing file,
//! so the guest sees the same data afterwards; `-u` (unsafe) only rewrites the name in the
//! header. `-b ''` detaches the image from any backing file (copying everything it read from
//! it). Ranges are compared and written in whole (sub)clusters, as qemu-img does, and `-c`
//! writes them compressed. Formats that cannot record a backing file refuse with qemu-img's
//! message.

use std::sync::Arc;

use basalt_engine::{Backend, ChildRole, Node, WriteFlags, ZeroFlags};
use basalt_formats::qcow2::Qcow2Node;
use basalt_reactor::IoBuf;

use crate::getopt::opt;
use crate::image::{self, ImageSpec};
use crate::img::common::{self, error, usage_error};

const HELP: &str = "Usage: basalt-img rebase [-f FMT] [-F BACKING_FMT] [-b BACKING_FILE] [-u] [-p] [-q] [-c]
        [-t CACHE] [-T SRC_CACHE] [--image-opts] [-U] [--object OBJDEF] FILENAME

Changes the backing file of an image.
";

/// Run the subcommand.
pub async fn main(args: Vec<String>) -> i32 {
    let specs = [
        opt(Some('h'), Some("help"), false),
        opt(Some('f'), Some("format"), true),
        opt(Some('F'), Some("backing-format"), true),
        opt(Some('b'), Some("backing"), true),
        opt(Some('u'), Some("backing-unsafe"), false),
        opt(Some('p'), Some("progress"), false),
        opt(Some('q'), Some("quiet"), false),
        opt(Some('c'), Some("compress"), false),
        opt(Some('t'), Some("cache"), true),
        opt(Some('T'), Some("source-cache"), true),
        opt(Some('U'), Some("force-share"), false),
        opt(None, Some("image-opts"), false),
        opt(None, Some("object"), true),
    ];
    let a = match common::parse_args("rebase", HELP, &args, &specs) {
        Ok(a) => a,
        Err(code) => return code,
    };
    if let Err(code) = common::check_objects(&a) {
        return code;
    }
    if a.operands.len() != 1 {
        return usage_error("rebase", "Expecting one image file name");
    }
    let filename = &a.operands[0];
    let unsafe_mode = a.has("backing-unsafe");
    let new_backing = a.value("backing").map(str::to_string);
    let new_fmt = a.value("backing-format").map(str::to_string);
    if new_backing.is_none() && !unsafe_mode {
        return usage_error("rebase", "Must specify backing file (-b) or use unsafe mode (-u)");
    }
    // No -b with -u, or -b '': no backing file any more.
    let new_backing = new_backing.filter(|b| !b.is_empty());
    if unsafe_mode && new_backing.is_some() && new_fmt.is_none() {
        error(format!(
            "Could not change the backing file to '{}': backing format must be specified",
            new_backing.as_deref().unwrap_or_default()
        ));
        return 1;
    }

    let graph = crate::img::common::graph(&a);
    let mut spec = common::spec_from_args(&a, filename, "format");
    spec.cache = Some(a.value("cache").unwrap_or("writeback").to_string());
    let (node, writethrough) = match image::open(&graph, &spec).await {
        Ok(n) => n,
        Err(e) => {
            error(e);
            return 1;
        }
    };
    let compress = a.has("compress");
    if compress && !graph.registry().get(node.driver()).is_some_and(|d| d.supports_compression()) {
        error("Compression not supported for this file format");
        return 1;
    }
    if let Some(f) = new_fmt.as_deref().filter(|f| graph.registry().get(f).is_none()) {
        error(format!("Invalid format name: '{f}'"));
        return 1;
    }
    let Some(q) = node.as_any().downcast_ref::<Qcow2Node>() else {
        error(format!("Could not change the backing file to '{}': Operation not supported", new_backing.unwrap_or_default()));
        return 1;
    };
    // Writes cover whole (sub)clusters, or whole clusters when compressed, so none is
    // partially copied from the old backing file.
    let h = q.header();
    let cs = h.cluster_size();
    let write_align = if compress || !h.extended_l2() { cs } else { cs / 32 };
    if !unsafe_mode {
        // The new backing file, resolved next to the image as QEMU resolves it.
        let new_node = match &new_backing {
            None => None,
            Some(b) => {
                let path = basalt_engine::resolve_relative(&node.filename(), b);
                let mut s = ImageSpec::new(&path);
                s.fmt = new_fmt.clone();
                s.read_only = true;
                s.cache = Some(a.value("source-cache").unwrap_or("writeback").to_string());
                match image::open(&graph, &s).await {
                    Ok((n, _)) => Some(n),
                    Err(e) => {
                        let msg = e.msg.replacen(&format!("Could not open '{path}': "), "", 1);
                        error(format!("Could not open new backing file '{b}': {msg}"));
                        return 1;
                    }
                }
            }
        };
        let mut be = match Backend::new(node.clone()) {
            Ok(b) => b,
            Err(e) => {
                error(e);
                return 1;
            }
        };
        be.set_writethrough(writethrough);
        let old_node = node.children().into_iter().find(|c| c.role == ChildRole::Backing).map(|c| c.node);
        let how = Copy { write_align, compress, progress: a.has("progress") && !a.has("quiet") };
        if let Err(msg) = copy_differences(&be, old_node, new_node, how).await {
            error(msg);
            return 1;
        }
    }
    let fmt = match (&new_backing, &new_fmt) {
        (Some(_), Some(f)) => Some(f.clone()),
        _ => None,
    };
    if let Err(e) = q.set_backing(new_backing.as_deref(), fmt.as_deref()).await {
        error(format!("Could not change the backing file to '{}': {e}", new_backing.unwrap_or_default()));
        return 1;
    }
    if let Err(e) = graph.close().await {
        error(e);
        return 1;
    }
    0
}

/// How `copy_differences` writes.
struct Copy {
    /// Writes start and end on multiples of this (but at the image's end).
    write_align: u64,
    /// Write compressed (`-c`).
    compress: bool,
    /// Print progress.
    progress: bool,
}

/// As qemu-img's safe rebase: for every range the image does not allocate, widened to whole
/// (sub)clusters, compare the old backing chain with the new backing file (zeroes past their
/// ends or without one) in `write_align` pieces, and write the old content of each piece that
/// differs into the image (zeroes where the old backing file had ended).
async fn copy_differences(be: &Backend, old: Option<Arc<dyn Node>>, new: Option<Arc<dyn Node>>, how: Copy) -> Result<(), String> {
    const BUF: u64 = 2 << 20;
    let size = be.size();
    let open = |n: Option<Arc<dyn Node>>| n.map(Backend::new).transpose().map_err(|e| e.to_string());
    let (oldq, newq) = (open(old)?, open(new)?);
    let old_size = oldq.as_ref().map_or(0, Backend::size);
    let new_size = newq.as_ref().map_or(0, Backend::size);
    let align = how.write_align.max(1);
    let mut prog = common::Progress::new(how.progress, 1.0);
    prog.print(0.0, 0);
    let mut off = 0;
    while off < size {
        let st =
            be.block_status(off, (size - off).min(BUF)).await.map_err(|e| format!("error while reading image metadata: {e}"))?;
        if st.allocated {
            off += st.len;
            prog.advance(off, size);
            continue;
        }
        // Widen to whole (sub)clusters: what the image allocates lies on their boundaries.
        let start = off - off % align;
        let end = (off + st.len).next_multiple_of(align).min(size);
        let n = end - start;
        let n_old = old_size.saturating_sub(start).min(n);
        let bold = read_padded(oldq.as_ref(), start, n_old, n)
            .await
            .map_err(|_| "error while reading from old backing file".to_string())?;
        let bnew = read_padded(newq.as_ref(), start, new_size.saturating_sub(start).min(n), n).await;
        let bnew = bnew.map_err(|_| "error while reading from new backing file".to_string())?;
        let mut old_eof = n_old == 0;
        let mut done = 0;
        let mut bold = Some(bold);
        while done < n {
            // A run of pieces that all differ, or all match.
            let piece = |at: u64| {
                let e = (at + align).min(n) as usize;
                let b = bold.as_ref().expect("buffer");
                b[at as usize..e] != bnew[at as usize..e]
            };
            let differs = piece(done);
            let mut len = align.min(n - done);
            while done + len < n && piece(done + len) == differs {
                len += align.min(n - done - len);
            }
            if differs {
                let at = start + done;
                let res = if old_eof {
                    be.write_zeroes(at, len, ZeroFlags::default()).await.res
                } else {
                    let mut b = bold.take().expect("buffer");
                    b.set_window(done as usize, len as usize);
                    let d = if how.compress {
                        be.write_compressed(at, b).await
                    } else {
                        be.write(at, b, WriteFlags::default()).await
                    };
                    let mut b = d.buf.expect("write returns its buffer");
                    b.reset(n as usize);
                    bold = Some(b);
                    d.res
                };
                res.map_err(|e| format!("Error while writing to COW image: {e}"))?;
            }
            done += len;
            if start + done >= old_size {
                old_eof = true;
            }
        }
        off = end;
        prog.advance(off, size);
    }
    be.flush().await.res.map_err(|e| format!("error while flushing: {e}"))?;
    if how.progress {
        prog.end();
    }
    Ok(())
}

/// `n` bytes at `start`: the first `have` read from `q`, the rest zeroes.
async fn read_padded(q: Option<&Backend>, start: u64, have: u64, n: u64) -> Result<IoBuf, basalt_engine::IoStatus> {
    let mut buf = IoBuf::new(n as usize);
    if let (Some(q), true) = (q, have > 0) {
        buf.slice(0, have as usize);
        let d = q.read(start, buf).await;
        d.res?;
        buf = d.buf.expect("read returns its buffer");
        buf.reset(n as usize);
    }
    Ok(buf)
}
