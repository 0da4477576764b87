//! basalt-img: create, convert, inspect and benchmark disk images (qemu-img work-alike).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = basalt_tools::run_tool(move || basalt_tools::img::main(args));
    std::process::exit(code);
}
