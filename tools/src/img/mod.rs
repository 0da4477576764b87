//! `basalt-img`: qemu-img's command line and output.
//!
//! Each subcommand is a module; [`main`] dispatches on the first operand. Exit codes follow
//! qemu-img: 0 success, 1 error; `compare` 0 identical / 1 different / 2 error; `check` its
//! documented codes.

pub mod amend;
pub mod bench;
pub mod bitmap;
pub mod check;
pub mod commit;
pub mod common;
pub mod compare;
pub mod convert;
pub mod copy;
pub mod create;
pub mod dd;
pub mod info;
pub mod map;
pub mod measure;
pub mod rebase;
pub mod resize;
pub mod snapshot;

/// Print an error as qemu-img does (`basalt-img: MESSAGE`).
pub fn error(msg: impl std::fmt::Display) {
    eprintln!("basalt-img: {msg}");
}

const HELP: &str = "basalt-img: a qemu-img work-alike
usage: basalt-img [standard options] command [command options]

Command syntax:
  amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename
  bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [-n] [--no-drain] [-o offset] [--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename
  bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b source_file [-F source_fmt]] [-g granularity] [--object objectdef] [--image-opts | -f fmt] filename bitmap
  check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename
  compare [--object objectdef] [--image-opts] [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2
  convert [--object objectdef] [--image-opts] [--target-image-opts] [-U] [-C] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] [-o options] [-S sparse_size] [-m num_coroutines] [-W] filename [filename2 [...]] output_filename
  create [--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]
  dd [--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output
  info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename
  map [--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename
  resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size
  snapshot [--object objectdef] [--image-opts] [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename
";

/// Run basalt-img with `args` (without the program name); returns the exit code.
pub async fn main(args: Vec<String>) -> i32 {
    let Some(cmd) = args.first() else {
        error("Not enough arguments\nTry 'basalt-img --help' for more information");
        return 1;
    };
    let rest = args[1..].to_vec();
    match cmd.as_str() {
        "-h" | "--help" => {
            print!("{HELP}");
            0
        }
        "-V" | "--version" => {
            println!("basalt-img version {}", env!("CARGO_PKG_VERSION"));
            0
        }
        "amend" => amend::main(rest).await,
        "bench" => bench::main(rest).await,
        "bitmap" => bitmap::main(rest).await,
        "check" => check::main(rest).await,
        "commit" => commit::main(rest).await,
        "compare" => compare::main(rest).await,
        "convert" => convert::main(rest).await,
        "create" => create::main(rest).await,
        "dd" => dd::main(rest).await,
        "info" => info::main(rest).await,
        "map" => map::main(rest).await,
        "measure" => measure::main(rest).await,
        "rebase" => rebase::main(rest).await,
        "resize" => resize::main(rest).await,
        "snapshot" => snapshot::main(rest).await,
        _ => {
            error(format!("Command not found: {cmd}"));
            1
        }
    }
}
