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

/// For commands that only print (tables, lists): a closed stdout (`| head`) ends the
/// process quietly, as it does for any Unix tool, instead of a panic on the broken pipe.
/// Never for a command that talks on sockets: there the write's error is handled.
pub fn quiet_on_broken_pipe() {
    // SAFETY: setting a signal's disposition to its default is always sound.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Tells systemd the service is ready (a `Type=notify` unit), when run under it. Outside
/// systemd (no `NOTIFY_SOCKET`) it does nothing.
pub fn notify_ready() {
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "could not tell systemd the service is ready");
    }
}

/// Tells systemd the service is stopping.
pub fn notify_stopping() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}

/// Catches SIGTERM and SIGINT from now on (a service's clean stop), and returns what waits
/// for the first of them. Install it before telling anyone the service is ready, so a stop
/// that follows at once is still a clean one.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let signals =
        signal(SignalKind::terminate()).and_then(|t| Ok((t, signal(SignalKind::interrupt())?)));
    async move {
        let Ok((mut term, mut int)) = signals else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}
