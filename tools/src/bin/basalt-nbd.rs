//! basalt-nbd: serve an image over NBD (qemu-nbd work-alike).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(basalt_tools::nbd::main(args));
}
