//! `agent protect`: the source disk served through FUSE ([`crate::capture`]) and every
//! write streamed, until the file system is unmounted or the agent is told to stop.
//!
//! # Design constraints
//! - The engine stays on one task; the FUSE thread reaches it through a bounded channel
//!   and waits for each answer, so capture order is completion order.
//! - Between writes, every [`CONTROL_EVERY_MS`]: bookmark requests, the link, the pending
//!   batch, and one step of a resync under way.
//! - SIGTERM or SIGINT detaches the mount (lazily): whoever holds the disk open (a loop
//!   device) keeps it until they close it, and the agent drains and ends once they have.
//! - A mount left by a killed agent (its connection gone) is cleared at the next start;
//!   any other mount at the mount point is an error, never hidden.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::capture::{CaptureFs, Op};
use crate::engine::{Engine, Resync};
use crate::error::{Error, IoContext, Result};
use crate::replay::CONTROL_EVERY_MS;

/// Requests waiting for the engine: the FUSE thread waits for each answer, so one is
/// enough; a few let a flush queue behind a write without a context switch each.
const OPS_QUEUE: usize = 4;
/// The file system's name in the mount table (`fuse.failback`): how a stale mount of ours
/// is told from someone else's.
const FS_NAME: &str = "failback";

/// What a protect run did.
#[derive(Debug, Default, Serialize)]
pub struct ProtectSummary {
    /// Writes captured.
    pub writes: u64,
    /// Bytes captured.
    pub bytes: u64,
    /// Flushes and fsyncs.
    pub syncs: u64,
    /// Seconds the disk was served.
    pub seconds: f64,
}

/// Serves `engine`'s source disk as `mount_dir/name` until it is unmounted (or SIGTERM),
/// then finishes the resync under way, if any. The caller drains.
pub async fn protect(
    engine: &mut Engine,
    mount_dir: &Path,
    name: &str,
    mut resync: Option<Resync>,
) -> Result<ProtectSummary> {
    check_mount_dir(mount_dir)?;
    // Absolute and resolved: the kernel names a loop device's backing file so, and the
    // stop compares with it.
    let mount_dir =
        &std::fs::canonicalize(mount_dir).ctx(|| format!("resolve {}", mount_dir.display()))?;
    let (tx, mut rx) = mpsc::channel(OPS_QUEUE);
    let opened = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let fs = CaptureFs::new(
        name,
        engine.source.size_bytes(),
        engine.source.reader()?,
        tx,
        std::sync::Arc::clone(&opened),
    );
    let options = [
        fuser::MountOption::FSName(FS_NAME.into()),
        fuser::MountOption::Subtype(FS_NAME.into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoExec,
    ];
    let mut session = fuser::Session::new(fs, mount_dir, &options).ctx(|| {
        format!(
            "mount the disk through FUSE on {} (as root, with /dev/fuse)",
            mount_dir.display()
        )
    })?;
    let served = std::thread::Builder::new()
        .name("fuse".into())
        .spawn(move || session.run())
        .ctx(|| "start the FUSE thread".into())?;
    tracing::info!(disk = %mount_dir.join(name).display(), "protecting: every write to this file is captured (losetup -f --show it, then make or mount its filesystem)");
    let stop = stop_signals()?;
    let started = Instant::now();
    let mut sum = ProtectSummary::default();
    let mut tick = tokio::time::interval(Duration::from_millis(CONTROL_EVERY_MS));
    let mut holders: Option<Vec<String>> = None;
    loop {
        tokio::select! {
            op = rx.recv() => match op {
                Some(op) => handle(engine, op, &mut sum).await?,
                None => break,
            },
            // A bookmark request, or a replication group's cut: while a cut holds, writes
            // wait (the FUSE thread waits for the engine) until it is marked or released.
            w = engine.next_request() => engine.serve_wake(w).await?,
            _ = tick.tick() => between_writes(engine, &mut resync).await?,
            () = stop.notified() => match &holders {
                // The loop devices on the disk are named before the detach hides its path.
                None => holders = Some(detach(&mount_dir.join(name))),
                Some(h) => still_held(h, opened.load(std::sync::atomic::Ordering::Relaxed)),
            },
        }
    }
    sum.seconds = started.elapsed().as_secs_f64();
    match served.join() {
        Ok(Ok(())) => {}
        // Stopping, the disk already unmounted by this agent: the kernel ends the connection
        // with ENODEV (fuser ends its loop), but once in a CI run on kernel 6.18, after the
        // lazy unmount and the loop device's detach, with ECONNABORTED (no deterministic
        // way to provoke it was found: a fusectl abort here gives ENODEV). Every write the
        // kernel was answered for is in the engine either way: drain and end, rather than
        // fail and leave a differential resync of the whole disk for the next start.
        Ok(Err(e)) if holders.is_some() && e.raw_os_error() == Some(libc::ECONNABORTED) => {
            tracing::info!(
                "the disk's FUSE connection was aborted after the stop; draining what was captured"
            );
        }
        Ok(Err(e)) => {
            return Err(Error::Io {
                context: "serve FUSE".into(),
                source: e,
            })
        }
        Err(_) => panic!("the FUSE thread panicked"),
    }
    finish_resync(engine, resync).await?;
    Ok(sum)
}

/// One request from the kernel, answered once the engine holds it.
async fn handle(engine: &mut Engine, op: Op, sum: &mut ProtectSummary) -> Result<()> {
    match op {
        Op::Write { offset, data, done } => {
            sum.writes += 1;
            sum.bytes += data.len() as u64;
            let r = engine.capture(offset, data.clone()).await;
            let captured = r.is_ok();
            answer(done, r)?;
            // Hashed once the kernel has its answer: the FUSE thread takes the next request
            // meanwhile. Nothing else of the engine runs in between (a bookmark reads the
            // digests), since this task is the engine's only user.
            if captured {
                engine.source.rehash(offset, &data)?;
            }
            Ok(())
        }
        Op::Sync { done } => {
            sum.syncs += 1;
            let r = match engine.flush().await {
                Ok(()) => engine.source.sync(),
                Err(e) => Err(e),
            };
            answer(done, r)
        }
    }
}

/// Tells the kernel how a request ended. A failure of the engine ends the run too: the
/// disk answers EIO from then on, as one whose controller died.
fn answer(done: tokio::sync::oneshot::Sender<Result<(), i32>>, r: Result<()>) -> Result<()> {
    let _ = done.send(r.as_ref().map(|_| ()).map_err(|_| libc::EIO));
    r
}

/// The work between writes: bookmark requests, the link, the pending batch, a resync step.
async fn between_writes(engine: &mut Engine, resync: &mut Option<Resync>) -> Result<()> {
    engine.serve_control().await?;
    engine.link.poll().await;
    engine.flush().await?;
    if resync.is_none() && engine.link.take_resync_requested() {
        *resync = Some(engine.resync_begin(false).await?);
    }
    if let Some(r) = resync.as_mut() {
        engine.resync_step(r).await?;
        if r.done() {
            engine.resync_end(resync.take().expect("checked")).await?;
            tracing::info!(
                "resync done: the target is consistent; bookmarks make recovery points again"
            );
        }
    }
    Ok(())
}

/// Completes a resync still under way when the disk was unmounted.
async fn finish_resync(engine: &mut Engine, resync: Option<Resync>) -> Result<()> {
    if let Some(mut r) = resync {
        while !r.done() {
            engine.resync_step(&mut r).await?;
        }
        engine.resync_end(r).await?;
    }
    Ok(())
}

/// A notification on every SIGTERM or SIGINT.
fn stop_signals() -> Result<std::sync::Arc<tokio::sync::Notify>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ctx(|| "catch SIGTERM".into())?;
    let mut int = signal(SignalKind::interrupt()).ctx(|| "catch SIGINT".into())?;
    let stop = std::sync::Arc::new(tokio::sync::Notify::new());
    let s = std::sync::Arc::clone(&stop);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            s.notify_one();
        }
    });
    Ok(stop)
}

/// Detaches the mount of `disk` lazily: new opens fail from now on, and the run ends once
/// whoever holds the disk open closes it. Returns the loop devices on it.
fn detach(disk: &Path) -> Vec<String> {
    let held = loop_devices_on(disk);
    let mount_dir = disk.parent().unwrap_or(disk);
    tracing::info!(mount_dir = %mount_dir.display(), loop_devices = ?held, "stopping: the disk is unmounted; the agent drains and ends once it is closed (umount the filesystem on its loop device, then losetup -d it)");
    if let Err(e) = umount_lazy(mount_dir) {
        tracing::warn!(error = %e, "unmounting the disk failed; unmount it by hand (umount -l)");
    }
    held
}

/// Says, on a repeated SIGTERM, what still keeps the agent from stopping.
fn still_held(loop_devices: &[String], open_handles: u64) {
    tracing::warn!(open_handles, loop_devices = ?loop_devices, "still stopping: the disk is in use; unmount the filesystem on its loop device and losetup -d it, and the agent drains and ends (a SIGKILL now means a differential resync of the whole disk at the next start)");
}

/// The loop devices whose backing file is `disk` (from /sys/block/loop*/loop/backing_file).
fn loop_devices_on(disk: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut found: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter(|e| {
            std::fs::read_to_string(e.path().join("loop/backing_file"))
                .is_ok_and(|b| Path::new(b.trim()) == disk)
        })
        .map(|e| format!("/dev/{}", e.file_name().to_string_lossy()))
        .collect();
    found.sort();
    found
}

fn umount_lazy(dir: &Path) -> std::io::Result<()> {
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: a valid NUL-terminated path; umount2 reads it only.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The mount point must be an empty directory with nothing mounted on it, except a mount
/// of ours whose agent died (cleared here, so a restart after a crash needs no hand work).
pub fn check_mount_dir(dir: &Path) -> Result<()> {
    let bad = |reason: String| Error::InvalidParameter {
        param: "mount-dir",
        reason,
    };
    // A directory another user can change could be swapped for a link to theirs (or to
    // /etc) between this check and the mount, which would then hide what that holds.
    if let Ok(Some(why)) = runtime::lock::others_can_change(dir) {
        return Err(bad(format!(
            "{why}: they could swap it for another directory before the disk is mounted on it; use a mount directory only root or you can write (e.g. under /run/failback)"
        )));
    }
    let mounted = mounted_here(dir)?;
    if let Some((fstype, source)) = &mounted {
        let ours = source == FS_NAME && (fstype == "fuse" || *fstype == format!("fuse.{FS_NAME}"));
        if !ours {
            return Err(bad(format!(
                "{} already has a {fstype} file system ({source}) mounted on it: choose an empty directory",
                dir.display()
            )));
        }
        match statfs(dir) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
                tracing::warn!(mount_dir = %dir.display(), "clearing the mount a stopped agent left (a loop device still on it returns errors until it is detached)");
                umount_lazy(dir).ctx(|| format!("unmount the stale mount on {}", dir.display()))?;
            }
            _ => return Err(bad(format!("{} is served by another running agent (a failback mount that answers): stop it first", dir.display()))),
        }
    }
    match std::fs::read_dir(dir).map(|mut d| d.next().is_none()) {
        Ok(true) => Ok(()),
        // A mount hides what the directory holds: a mistyped path must not hide a
        // database's files from its application.
        Ok(false) => Err(bad(format!(
            "{} is not empty: the disk is served on an empty directory (mounting over files would hide them)",
            dir.display()
        ))),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
            Err(bad(format!("{} is not a directory", dir.display())))
        }
        Err(e) => Err(bad(format!(
            "{}: {e} (create the directory first)",
            dir.display()
        ))),
    }
}

/// Refuses paths inside the mount directory: the mount would hide them from the agent
/// itself (the source would be served from under its own mount).
pub fn check_outside(mount_dir: &Path, paths: &[(&'static str, &Path)]) -> Result<()> {
    let dir = std::path::absolute(mount_dir).ctx(|| format!("resolve {}", mount_dir.display()))?;
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    for (param, p) in paths {
        let abs = std::path::absolute(p).ctx(|| format!("resolve {}", p.display()))?;
        // The deepest existing ancestor resolves symlinks; the rest is appended as given.
        let resolved = abs
            .ancestors()
            .find_map(|a| {
                std::fs::canonicalize(a)
                    .ok()
                    .map(|c| c.join(abs.strip_prefix(a).unwrap_or(Path::new(""))))
            })
            .unwrap_or(abs);
        if resolved.starts_with(&dir) {
            return Err(Error::InvalidParameter {
                param,
                reason: format!(
                    "{} is inside --mount-dir {}, which the disk is mounted over: keep it outside",
                    p.display(),
                    mount_dir.display()
                ),
            });
        }
    }
    Ok(())
}

/// statfs(2) of `dir`: unlike a stat, never answered from the kernel's cache, so a FUSE
/// mount whose agent died says ENOTCONN.
fn statfs(dir: &Path) -> std::io::Result<()> {
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: an all-zero statfs is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a statfs the call fills.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The type and source of the file system mounted on `dir`, if any (the last mount there
/// wins).
fn mounted_here(dir: &Path) -> Result<Option<(String, String)>> {
    let want: PathBuf = match std::fs::canonicalize(dir) {
        Ok(p) => p,
        // A dead FUSE mount cannot be resolved: compare the path as given, made absolute.
        Err(_) => std::path::absolute(dir).ctx(|| format!("resolve {}", dir.display()))?,
    };
    let table = std::fs::read_to_string("/proc/self/mountinfo")
        .ctx(|| "read /proc/self/mountinfo".into())?;
    Ok(table
        .lines()
        .rev()
        .filter_map(parse_mountinfo)
        .find(|(p, _, _)| Path::new(p) == want)
        .map(|(_, t, s)| (t, s)))
}

/// One mountinfo line: (mount point, file system type, source). The mount point is field
/// 5, with spaces and the like written as octal escapes; the type and the source follow
/// the " - " separator.
fn parse_mountinfo(line: &str) -> Option<(String, String, String)> {
    let (head, tail) = line.split_once(" - ")?;
    let point = head.split(' ').nth(4)?;
    let mut t = tail.split(' ');
    let fstype = t.next()?.to_owned();
    let source = unescape_octal(t.next()?);
    Some((unescape_octal(point), fstype, source))
}

fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let code = (b[i] == b'\\' && i + 3 < b.len())
            .then(|| std::str::from_utf8(&b[i + 1..i + 4]).ok())
            .flatten()
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match code {
            Some(c) => {
                out.push(c);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_give_their_mount_point_and_type() {
        let l = "36 35 0:40 / /mnt/my\\040disk rw,nosuid shared:1 - fuse.failback failback rw,user_id=0";
        assert_eq!(
            parse_mountinfo(l),
            Some((
                "/mnt/my disk".into(),
                "fuse.failback".into(),
                "failback".into()
            ))
        );
        let l = "22 1 8:1 / / rw - ext4 /dev/sda1 rw";
        assert_eq!(
            parse_mountinfo(l),
            Some(("/".into(), "ext4".into(), "/dev/sda1".into()))
        );
        assert_eq!(parse_mountinfo("garbage"), None);
        assert_eq!(unescape_octal("a\\134b\\04"), "a\\b\\04");
    }
}
