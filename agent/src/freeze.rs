//! Freezing filesystems for app-consistent bookmarks, as `fsfreeze` and VSS do.
//!
//! `agent bookmark --freeze MOUNTPOINT` freezes each filesystem (FIFREEZE: the kernel
//! flushes it to its device and blocks new writes), has the running agent take the
//! bookmark, and thaws (FITHAW). Every write the filesystem made before the freeze has then
//! reached the device, and so the agent's stream, before the bookmark's LSN: the point is
//! consistent for the filesystem and for an application quiesced by a pre-hook.
//!
//! # Design constraints
//! - Always thawed: on success, on error, on timeout, and when the value is dropped
//!   (a panic or an early return), so no filesystem stays frozen behind a failed command.
//! - The freeze is done by the `agent bookmark` process, never by the agent: with live
//!   capture the agent serves the device's writes, and freezing from inside it would wait
//!   on itself.
//! - The pause is bounded: the agent is told the monotonic instant by which the bookmark
//!   must be taken (`--freeze-timeout-s`) and refuses to take it later, so a bookmark is
//!   never placed after the thaw.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

/// `_IOWR('X', 119, int)`: freeze the filesystem of an open directory (linux/fs.h).
const FIFREEZE: libc::c_ulong = 0xC004_5877;
/// `_IOWR('X', 120, int)`: thaw it.
const FITHAW: libc::c_ulong = 0xC004_5878;

/// The longest a filesystem may stay frozen for one bookmark: applications block on
/// writes meanwhile, so minutes would be an outage, not a pause.
pub const MAX_FREEZE_S: u64 = 60;

/// The monotonic clock in milliseconds (the same for every process of the machine, so the
/// agent and `agent bookmark` agree on a deadline; unaffected by clock steps).
pub fn mono_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Checks what is to be frozen before anything is: each path is a mountpoint (FIFREEZE on
/// any directory freezes the whole filesystem it is on: `/var/lib/db` on the root
/// filesystem would freeze `/`), no filesystem is listed twice, and none holds the agent's
/// state directory (the agent writes there while it takes the bookmark: it would wait on
/// the freeze).
pub fn check_targets(mountpoints: &[PathBuf], state_dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let bad = |m: &Path, why: String| Error::InvalidParameter {
        param: "freeze",
        reason: format!("{}: {why}", m.display()),
    };
    let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev());
    let state_dev = dev(state_dir).ok();
    // The running agent's source image: it is written while the bookmark is taken, so its
    // filesystem frozen would wait for ever on the freeze of another (a live disk's loop
    // device flushes through the agent).
    let source = std::fs::read(state_dir.join(crate::engine::SOURCE_PATH))
        .ok()
        .map(|b| PathBuf::from(String::from_utf8_lossy(&b).into_owned()));
    let source_dev = source.as_deref().and_then(|p| dev(p).ok());
    let mut seen = Vec::new();
    for m in mountpoints {
        let d = dev(m).map_err(|e| bad(m, e.to_string()))?;
        let canon = std::fs::canonicalize(m).map_err(|e| bad(m, e.to_string()))?;
        let parent_dev = canon
            .parent()
            .map(dev)
            .transpose()
            .map_err(|e| bad(m, e.to_string()))?;
        if parent_dev == Some(d) {
            return Err(bad(m, "not a mountpoint: freezing it would freeze the whole filesystem it is on; give the directory that filesystem is mounted on (findmnt -T PATH)".into()));
        }
        if seen.contains(&d) {
            return Err(bad(m, "the same filesystem is listed twice".into()));
        }
        if state_dev == Some(d) {
            return Err(bad(m, format!("the agent's state directory {} is on this filesystem, and the agent writes there while it takes the bookmark; keep the state directory elsewhere", state_dir.display())));
        }
        if source_dev == Some(d) {
            return Err(bad(m, format!("the agent's source disk {} is on this filesystem, and the agent writes it while the bookmark is taken; keep the source image elsewhere", source.as_deref().unwrap_or(Path::new("")).display())));
        }
        seen.push(d);
    }
    Ok(())
}

/// Filesystems frozen by this process, thawed by [`Frozen::thaw`] or on drop.
#[derive(Debug)]
pub struct Frozen {
    frozen: Vec<(PathBuf, std::fs::File)>,
}

impl Frozen {
    /// Freezes each mountpoint in order. If one fails, those already frozen are thawed and
    /// the error says which one failed and why.
    pub fn freeze(mountpoints: &[PathBuf]) -> Result<Frozen> {
        let mut f = Frozen { frozen: Vec::new() };
        for m in mountpoints {
            let dir = std::fs::File::open(m).map_err(|e| Error::InvalidParameter {
                param: "freeze",
                reason: format!("{}: {e}", m.display()),
            })?;
            ioctl(&dir, FIFREEZE).map_err(|e| Error::Refused(freeze_error(m, &e)))?;
            f.frozen.push((m.clone(), dir));
        }
        Ok(f)
    }

    /// Thaws everything frozen; the first failure is returned (and every one is tried).
    pub fn thaw(mut self) -> Result<()> {
        self.thaw_all()
    }

    fn thaw_all(&mut self) -> Result<()> {
        let mut first = None;
        // In reverse: the last frozen is thawed first.
        while let Some((m, dir)) = self.frozen.pop() {
            if let Err(e) = ioctl(&dir, FITHAW) {
                let msg = format!(
                    "could not thaw {}: {e}; run `fsfreeze -u {}` now (applications writing there are blocked)",
                    m.display(),
                    m.display()
                );
                tracing::error!("{msg}");
                first.get_or_insert(Error::Refused(msg));
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = self.thaw_all();
    }
}

fn ioctl(dir: &std::fs::File, request: libc::c_ulong) -> std::io::Result<()> {
    let mut arg: libc::c_int = 0;
    // SAFETY: an open descriptor and an int argument, as FIFREEZE and FITHAW take.
    let r = unsafe { libc::ioctl(dir.as_raw_fd(), request as _, &mut arg) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn freeze_error(m: &Path, e: &std::io::Error) -> String {
    let why = match e.raw_os_error() {
        Some(libc::EPERM) => "freezing needs root (CAP_SYS_ADMIN)",
        Some(libc::EBUSY) => {
            "it is frozen already (another backup tool, or an earlier fsfreeze -f)"
        }
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL) => {
            "its filesystem cannot be frozen"
        }
        _ => "",
    };
    format!("could not freeze {}: {e}; {why}", m.display())
}

/// Runs a hook (`sh -c CMD`) within `max`; a non-zero exit or a timeout is an error.
pub fn run_hook(which: &str, cmd: &str, max: Duration) -> Result<()> {
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .spawn()
        .map_err(|e| Error::Refused(format!("{which} hook {cmd:?} could not start: {e}")))?;
    let start = std::time::Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(s)) if s.success() => return Ok(()),
            Ok(Some(s)) => {
                return Err(Error::Refused(format!("{which} hook {cmd:?} failed ({s})")))
            }
            Ok(None) if start.elapsed() > max => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Refused(format!(
                    "{which} hook {cmd:?} did not finish within {} s: killed",
                    max.as_secs()
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(Error::Refused(format!("{which} hook {cmd:?}: {e}"))),
        }
    }
}
