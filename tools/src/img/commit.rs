//! `basalt-img commit`: write an image's own data into its backing file, as qemu-img commit
//! does, then empty the image (unless `-d`) so reads come from the backing file again.
//!
//! Data clusters are copied, zero clusters become zeroes in the backing file, unallocated
//! ranges are left alone. `-b BASE` may name the image's backing file; committing further down
//! a chain is refused with a clear error.

use basalt_engine::{Backend, Opts, WriteFlags, ZeroFlags};
use basalt_formats::qcow2::Qcow2Node;

use crate::getopt::opt;
use crate::image::{self, ImageSpec};
use crate::img::common::{self, error, usage_error};

const HELP: &str = "Usage: basalt-img commit [-f FMT] [-t CACHE] [-b BASE] [-r RATE] [-d] [-p] [-q]
        [--object OBJDEF] [--image-opts] FILENAME

Commits the data of FILENAME into its backing file.
";

/// Run the subcommand.
pub async fn main(args: Vec<String>) -> i32 {
    let specs = [
        opt(Some('h'), Some("help"), false),
        opt(Some('f'), Some("format"), true),
        opt(Some('t'), Some("cache"), true),
        opt(Some('b'), Some("base"), true),
        opt(Some('r'), Some("rate-limit"), true),
        opt(Some('d'), Some("drop"), false),
        opt(Some('p'), Some("progress"), false),
        opt(Some('q'), Some("quiet"), false),
        opt(None, Some("object"), true),
        opt(None, Some("image-opts"), false),
    ];
    let a = match common::parse_args("commit", HELP, &args, &specs) {
        Ok(a) => a,
        Err(code) => return code,
    };
    if let Err(code) = common::check_objects(&a) {
        return code;
    }
    if a.operands.len() != 1 {
        return usage_error("commit", "Expecting one image file name");
    }
    if a.value("rate-limit").is_some() {
        error("Rate limiting (-r) is not supported by this build of basalt-img commit");
        return 1;
    }
    let filename = &a.operands[0];
    let graph = crate::img::common::graph(&a);
    // Learn what the image is and what it is backed by.
    let mut probe = common::spec_from_args(&a, filename, "format");
    probe.read_only = true;
    probe.force_share = true;
    let (driver, backing) = match image::open(&graph, &probe).await {
        Ok((n, _)) => {
            let b = n.backing_info();
            (n.driver(), b)
        }
        Err(e) => {
            error(e);
            return 1;
        }
    };
    let Some((bname, bfmt)) = backing else {
        error("Image does not have a backing file");
        return 1;
    };
    let bpath = basalt_engine::resolve_relative(filename, &bname);
    if let Some(base) = a.value("base") {
        if base != bname && base != bpath {
            error(format!("Did not find '{base}' in the backing chain of '{filename}'"));
            return 1;
        }
    }
    drop(graph);
    let graph = crate::img::common::graph(&a);
    // The backing file read-write, and the image without it (its own clusters only).
    let mut bspec = ImageSpec::new(&bpath);
    bspec.fmt = bfmt;
    bspec.cache = Some(a.value("cache").unwrap_or("unsafe").to_string());
    let (base, _) = match image::open(&graph, &bspec).await {
        Ok(n) => n,
        Err(e) => {
            error(e);
            return 1;
        }
    };
    let mut o = if a.has("image-opts") {
        match Opts::parse_keyval(filename, None) {
            Ok(o) => o,
            Err(e) => {
                error(e);
                return 1;
            }
        }
    } else {
        let mut o = Opts::new();
        o.set("driver", driver);
        o.set("file.filename", filename.clone());
        o
    };
    o.set("backing", "null");
    let (flags, _) = match image::spec_flags(&ImageSpec::new(filename)) {
        Ok(f) => f,
        Err(e) => {
            error(e);
            return 1;
        }
    };
    let top = match graph.open(o, flags).await {
        Ok(n) => n,
        Err(e) => {
            error(e.context(format!("Could not open '{filename}'")));
            return 1;
        }
    };
    let (tb, bb) = match (Backend::new(top.clone()), Backend::new(base)) {
        (Ok(t), Ok(b)) => (t, b),
        (Err(e), _) | (_, Err(e)) => {
            error(e);
            return 1;
        }
    };
    let progress = a.has("progress") && !a.has("quiet");
    if let Err(m) = copy_down(&tb, &bb, progress).await {
        error(m);
        return 1;
    }
    if !a.has("drop") {
        if let Some(q) = top.as_any().downcast_ref::<Qcow2Node>() {
            if let Err(e) = q.make_empty().await {
                error(e);
                return 1;
            }
        }
    }
    if let Err(e) = graph.close().await {
        error(e);
        return 1;
    }
    if !a.has("quiet") {
        println!("Image committed.");
    }
    0
}

/// Copy what the top image defines into the base: data as data, zero clusters as zeroes.
async fn copy_down(top: &Backend, base: &Backend, progress: bool) -> Result<(), String> {
    let size = top.size().min(base.size());
    let mut prog = common::Progress::new(progress, 1.0);
    prog.print(0.0, 0);
    let mut off = 0;
    while off < size {
        let st = top
            .block_status(off, (size - off).min(1 << 20))
            .await
            .map_err(|e| format!("error while reading image metadata: {e}"))?;
        let n = st.len;
        if st.allocated && st.zero && !st.data {
            base.write_zeroes(off, n, ZeroFlags { may_unmap: true, ..ZeroFlags::default() })
                .await
                .res
                .map_err(|e| format!("error while writing at byte {off}: {e}"))?;
        } else if st.allocated {
            let d = top.read(off, basalt_reactor::IoBuf::new(n as usize)).await;
            d.res.map_err(|e| format!("error while reading at byte {off}: {e}"))?;
            let w = base.write(off, d.buf.expect("read returns its buffer"), WriteFlags::default()).await;
            w.res.map_err(|e| format!("error while writing at byte {off}: {e}"))?;
        }
        off += n;
        prog.advance(off, size);
    }
    base.flush().await.res.map_err(|e| format!("error while flushing: {e}"))?;
    if progress {
        prog.end();
    }
    Ok(())
}
