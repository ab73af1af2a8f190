//! What an interrupted demo undoes. A SIGINT or SIGTERM ends a process without running
//! its destructors, so the mounts, loop devices, child processes and working directory a
//! demo made would outlive it: a live demo left an ext4 mounted on a loop device on a
//! disk its agent kept serving, for ever.
//!
//! # Design constraints
//! - **Registered as made.** [`crate::live`] registers every mount and loop device when it
//!   makes it and forgets it when it undoes it; children are found through /proc (every
//!   process whose parent is this one), so nothing has to remember them.
//! - **Undone in an order that works.** Children first get SIGTERM (a frozen bookmark thaws,
//!   the services stop, `agent protect` starts its lazy unmount); then the filesystems are
//!   unmounted and the loop devices detached (the agent's disk is then closed and it ends);
//!   what still runs after [`CHILD_EXIT_WAIT_MS`] gets SIGKILL, and the agent's FUSE mount
//!   is cleared last.
//! - **The main thread does not race the cleanup to the exit**: once interrupted, a demo that
//!   returns waits in [`wait_if_interrupted`] for the handler to end the process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long children get to exit after SIGTERM (the services drain and sync their files)
/// before they are killed.
pub const CHILD_EXIT_WAIT_MS: u64 = 10_000;

/// A mount or loop device this process made and has not undone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// A mounted filesystem (also the agent's FUSE mount directory).
    Mount(PathBuf),
    /// An attached loop device, e.g. /dev/loop3.
    Loop(String),
}

static HELD: Mutex<Vec<Held>> = Mutex::new(Vec::new());
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Registers something made.
pub fn hold(h: Held) {
    HELD.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(h);
}

/// Forgets something undone (its last registration).
pub fn release(h: &Held) {
    let mut held = HELD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(i) = held.iter().rposition(|x| x == h) {
        held.remove(i);
    }
}

/// Whether a SIGINT or SIGTERM arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Once interrupted, waits for the handler to end the process (it exits 130); returns at
/// once otherwise.
pub fn wait_if_interrupted() {
    while interrupted() {
        std::thread::park();
    }
}

/// On SIGINT, SIGTERM or SIGHUP: undo what is held, stop the children, remove `remove`
/// (the demo's temporary directory; none with `--keep`), exit 130. `what` names the
/// program in the messages.
pub fn on_interrupt(what: &'static str, remove: Option<PathBuf>) {
    let set = ctrlc::set_handler(move || {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            return; // a second signal: the first one's cleanup is under way
        }
        eprintln!("{what}: interrupted: stopping its processes, unmounting what it mounted");
        undo(remove.as_deref());
        eprintln!("{what}: interrupted; cleaned up");
        std::process::exit(130);
    });
    if let Err(e) = set {
        eprintln!("{what}: no handler for Ctrl-C ({e}): an interrupted run leaves its mounts");
    }
}

fn undo(remove: Option<&Path>) {
    signal_children(libc::SIGTERM);
    // The ones that stop by themselves (all but a protecting agent whose disk is held).
    wait_children(Duration::from_millis(CHILD_EXIT_WAIT_MS / 4));
    let held: Vec<Held> = std::mem::take(
        &mut *HELD
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    for h in held.iter().rev() {
        undo_one(h);
    }
    wait_children(Duration::from_millis(CHILD_EXIT_WAIT_MS));
    signal_children(libc::SIGKILL);
    // A killed agent's FUSE mount is dead (ENOTCONN) until unmounted.
    for h in &held {
        if let Held::Mount(dir) = h {
            let _ = quiet(Command::new("umount").arg("-l").arg(dir));
        }
    }
    if let Some(dir) = remove {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            eprintln!("could not remove {}: {e}", dir.display());
        }
    }
}

fn undo_one(h: &Held) {
    match h {
        // Lazy: whoever still has a file open keeps it until it closes. (The agent's own
        // mount may be gone already: it unmounts it at SIGTERM.)
        Held::Mount(dir) => {
            let _ = quiet(Command::new("umount").arg("-l").arg(dir));
        }
        Held::Loop(dev) => {
            if !quiet(Command::new("losetup").arg("-d").arg(dev)) {
                eprintln!("could not detach {dev}: see losetup -a");
            }
        }
    }
}

fn quiet(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// This process's children that have not exited (zombies have: their parent reaps them).
fn children() -> Vec<i32> {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // After the command's closing parenthesis: state, then the parent's pid.
        let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
        let (state, ppid) = (rest.next()?, rest.next()?);
        (ppid == me && state != "Z").then_some(pid)
    })
    .collect()
}

fn signal_children(sig: i32) {
    for pid in children() {
        // SAFETY: kill(2) has no memory preconditions; the pid is a child of this process
        // that has not been reaped, so it cannot have been reused.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Waits (bounded) until no child runs.
fn wait_children(max: Duration) {
    let deadline = Instant::now() + max;
    while !children().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}
