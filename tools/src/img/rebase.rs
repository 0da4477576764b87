//! `basalt-img rebase`: change an image's backing file, as qemu-img rebase does.
//!
//! Safe mode (the default) first copies into the image every range it does not allocate
//! itself and whose content differs between the old backing chain and the new backing file,
//! so the guest sees the same data afterwards; `-u` (unsafe) only rewrites the name in the
//! header. `-b ''` detaches the image from any backing file (copying everything it read from
//! it). Formats that cannot record a backing file refuse with qemu-img's message.

use std::sync::Arc;

use basalt_engine::{Backend, Node, WriteFlags};
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
    if a.has("compress") {
        error("Compression of the copied data is not supported by this build of basalt-img rebase");
        return 1;
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
    let Some(q) = node.as_any().downcast_ref::<Qcow2Node>() else {
        error(format!("Could not change the backing file to '{}': Operation not supported", new_backing.unwrap_or_default()));
        return 1;
    };
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
        if let Err(msg) = copy_differences(&be, new_node, a.has("progress") && !a.has("quiet")).await {
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

/// Copy into the image every range it does not allocate whose content (through the old
/// backing chain) differs from the new backing file's (zeroes past its end or without one).
async fn copy_differences(be: &Backend, new: Option<Arc<dyn Node>>, progress: bool) -> Result<(), String> {
    let size = be.size();
    let newq = match new {
        Some(n) => Some(Backend::new(n).map_err(|e| e.to_string())?),
        None => None,
    };
    let chunk = 1u64 << 20;
    let mut prog = common::Progress::new(progress, 1.0);
    prog.print(0.0, 0);
    let mut off = 0;
    while off < size {
        let st = be
            .block_status(off, (size - off).min(chunk))
            .await
            .map_err(|e| format!("error while reading image metadata: {e}"))?;
        let n = st.len;
        if !st.allocated {
            let d = be.read(off, IoBuf::new(n as usize)).await;
            d.res.map_err(|e| format!("error while reading from old backing file: {e}"))?;
            let old = d.buf.expect("read returns its buffer");
            let mut newdata = IoBuf::new(n as usize);
            if let Some(nq) = &newq {
                let have = nq.size().saturating_sub(off).min(n);
                if have > 0 {
                    newdata.slice(0, have as usize);
                    let d = nq.read(off, newdata).await;
                    d.res.map_err(|e| format!("error while reading from new backing file: {e}"))?;
                    newdata = d.buf.expect("read returns its buffer");
                    newdata.reset(n as usize);
                }
            }
            if old[..] != newdata[..] {
                let d = be.write(off, old, WriteFlags::default()).await;
                d.res.map_err(|e| format!("error while writing to COW image: {e}"))?;
            }
        }
        off += n;
        prog.advance(off, size);
    }
    be.flush().await.res.map_err(|e| format!("error while flushing: {e}"))?;
    if progress {
        prog.end();
    }
    Ok(())
}
