//! `basalt-img convert`.

/// Run the subcommand.
pub async fn main(_args: Vec<String>) -> i32 {
    1
}
