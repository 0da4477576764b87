//! basalt-io: run I/O commands against a disk image (qemu-io work-alike).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = basalt_tools::run_tool(move || basalt_tools::io::main(args));
    std::process::exit(code);
}
