//! The demo (filled in below).

/// Demo options.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {}

/// Runs the demo.
pub fn run(_args: DemoArgs) -> i32 {
    1
}
