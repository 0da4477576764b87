//! `basalt-io`: qemu-io's command line, commands and output.

/// Run basalt-io with `args` (without the program name); returns the exit code.
pub async fn main(_args: Vec<String>) -> i32 {
    1
}
