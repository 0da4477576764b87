//! basalt-storage-daemon: block nodes and NBD exports (qemu-storage-daemon work-alike).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(basalt_tools::daemon::main(args));
}
