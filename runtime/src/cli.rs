//! The tail every service's command line shares.

use std::future::Future;

/// Runs a command's future on a fresh tokio runtime and turns its outcome into an exit code,
/// printing `NAME: error: ...` on failure.
pub fn block_on_cli<F, E>(name: &str, fut: F) -> i32
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: error: start runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{name}: error: {e}");
            1
        }
    }
}

/// Waits for SIGTERM or SIGINT (a service's clean stop).
pub async fn wait_for_shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
