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
//!   (a panic or an early return), so no filesystem stays frozen behind a failed command;
//!   and by a guard process when the command itself is killed (SIGKILL) while frozen.
//! - Flushed before the freeze, within the freeze window: a flush that does not end (a
//!   stalled agent or process server) freezes nothing, instead of holding the command in
//!   the kernel's FIFREEZE past every timeout.
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

/// Filesystems frozen by this process, thawed by [`Frozen::thaw`] or on drop, and by its
/// [`Guard`] if this process dies first.
#[derive(Debug)]
pub struct Frozen {
    frozen: Vec<(PathBuf, std::fs::File)>,
    guard: Option<Guard>,
}

impl Frozen {
    /// Freezes each mountpoint in order. If one fails, those already frozen are thawed and
    /// the error says which one failed and why. Each filesystem is flushed first, within
    /// `flush_max`: FIFREEZE flushes too, but cannot be interrupted or timed, and a captured
    /// disk's flush waits on its agent (and that on its process server), so a stalled one
    /// would hold the caller in the kernel past any timeout. Flushed in a child process
    /// that is left behind if it hangs, nothing is frozen then.
    pub fn freeze(mountpoints: &[PathBuf], flush_max: Duration) -> Result<Frozen> {
        let mut dirs = Vec::new();
        for m in mountpoints {
            let dir = std::fs::File::open(m).map_err(|e| Error::InvalidParameter {
                param: "freeze",
                reason: format!("{}: {e}", m.display()),
            })?;
            dirs.push((m.clone(), dir));
        }
        flush_first(mountpoints, flush_max)?;
        let fds: Vec<i32> = dirs.iter().map(|(_, d)| d.as_raw_fd()).collect();
        let guard = Guard::start(&fds)
            .map_err(|e| Error::Refused(format!("could not start the thaw guard: {e}")))?;
        let mut f = Frozen {
            frozen: Vec::new(),
            guard: Some(guard),
        };
        for (m, dir) in dirs {
            ioctl(&dir, FIFREEZE).map_err(|e| Error::Refused(freeze_error(&m, &e)))?;
            f.frozen.push((m, dir));
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
        if let Some(g) = self.guard.take() {
            g.stand_down();
        }
        first.map_or(Ok(()), Err)
    }
}

/// `sync -f` of each mountpoint, all within `max`; nothing is frozen if one does not end.
fn flush_first(mountpoints: &[PathBuf], max: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + max;
    for m in mountpoints {
        // Its own output: a flush left hanging must not hold the caller's pipes (a script
        // reading this command's output would wait for it too).
        let mut child = std::process::Command::new("sync")
            .arg("-f")
            .arg(m)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| Error::Refused(format!("could not flush {}: sync: {e}", m.display())))?;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if std::time::Instant::now() > deadline => {
                    let _ = child.kill(); // it ends when its flush does
                    return Err(Error::Refused(format!(
                        "{} could not be flushed within {} s, so nothing was frozen: its disk does not take writes (a captured disk waits on its agent, and the agent on its process server: is one stopped or stalled? agent status, process-server status)",
                        m.display(),
                        max.as_secs()
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(Error::Refused(format!("flush {}: {e}", m.display()))),
            }
        }
    }
    Ok(())
}

/// A child process that thaws the filesystems if this process dies while they may be
/// frozen (SIGKILL, a crash: nothing of ours runs then). It holds the read end of a pipe;
/// this process writes `F` before freezing and `T` once thawed. At end of file (this
/// process closed it, or died and the kernel did), it thaws unless the last byte was `T`.
/// A process stuck in FIFREEZE dies only once the call returns, so the guard's thaw comes
/// after the freeze, never before.
#[derive(Debug)]
struct Guard {
    pid: libc::pid_t,
    pipe: std::fs::File,
}

impl Guard {
    /// Forks the guard; `fds` are the open mountpoint directories it thaws.
    fn start(fds: &[i32]) -> std::io::Result<Guard> {
        let mut ends = [0i32; 2];
        // SAFETY: a valid array of two descriptors to fill. CLOEXEC: hooks run later must
        // not inherit the write end (they would delay the end of file).
        if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (rd, wr) = (ends[0], ends[1]);
        // SAFETY: fork in a threaded process; the child below makes only async-signal-safe
        // system calls (no allocation, no locks) on memory it already has, then _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: see above; `fds` and the buffer are the child's copies.
            unsafe { guard_child(rd, wr, fds) }
        }
        // SAFETY: our copy of the read end, not used here.
        unsafe { libc::close(rd) };
        if pid < 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: the write end we own.
            unsafe { libc::close(wr) };
            return Err(e);
        }
        // SAFETY: `wr` is an open descriptor we own from here on.
        let mut pipe = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(wr) };
        std::io::Write::write_all(&mut pipe, b"F")?;
        Ok(Guard { pid, pipe })
    }

    /// Thawed: the guard has nothing to do; it ends and is reaped.
    fn stand_down(mut self) {
        let _ = std::io::Write::write_all(&mut self.pipe, b"T");
        drop(self.pipe);
        let mut status = 0;
        // SAFETY: our child's pid and a status to fill.
        unsafe { libc::waitpid(self.pid, &mut status, 0) };
    }
}

/// The guard's life (see [`Guard`]).
///
/// # Safety
/// Called only in the child right after fork: async-signal-safe calls only.
unsafe fn guard_child(rd: i32, wr: i32, fds: &[i32]) -> ! {
    // SAFETY (whole body): plain system calls on descriptors this process holds.
    unsafe {
        libc::close(wr);
        // Out of the caller's process group and immune to its terminal's signals: a Ctrl-C
        // of the group must not take the guard with it.
        libc::setsid();
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        let mut last = 0u8;
        let mut buf = [0u8; 16];
        loop {
            let n = libc::read(rd, buf.as_mut_ptr().cast(), buf.len());
            if n > 0 {
                last = buf[n as usize - 1];
            } else if n == 0 || *libc::__errno_location() != libc::EINTR {
                break;
            }
        }
        if last != b'T' {
            for &fd in fds {
                let mut arg: libc::c_int = 0;
                libc::ioctl(fd, FITHAW as _, &mut arg);
            }
        }
        libc::_exit(0)
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
