//! Exporting a whole replication group at one group point into one directory.
//!
//! # Design constraints
//! - **Whole or not at all, and never a mix.** Every disk is written and verified (as a
//!   single disk's export does) into a staging directory beside the output directory, with
//!   a manifest naming the group point; the staging directory then takes the output's place
//!   in one rename (an exchange, with `--force`, for an earlier group export there). A
//!   failure, a SIGKILL or a power loss leaves the output directory as it was.
//! - **Never the operator's other files.** The output directory is new, empty, or an
//!   earlier group export (it holds [`MANIFEST`]) that `--force` replaces whole; any other
//!   directory is refused, `--force` or not.
//! - **No other user can swap what is written.** The staging directory has a random name
//!   and mode 0700, and the output's parent and every directory above it must be writable
//!   only by root or this user (or sticky, as `/tmp`) ([`crate::export::check_private_dir`]).
//! - A staging directory a killed export left is removed by the next export to the same
//!   output (its process is gone).
//!
//! ```text
//! OUT/                      the group point, after the rename
//!   group-point.json        { group, id, time_us, kind, tag, members: [{ vm, disk, lsn,
//!                             files, digest }] }
//!   VM-disk-ID.img          each disk (or VM-disk-ID.vmdk + VM-disk-ID-flat.vmdk)
//! PARENT/.OUT.failback-partial-PID-RANDOM/   while it is written (mode 0700)
//! ```

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::export::{ExportOpts, Exported, Format, PointSel};
use crate::groups::{list, member_path, select, GroupPoint};
use crate::registry::Registry;

/// The file in a group export's directory that says which group point it holds.
pub const MANIFEST: &str = "group-point.json";
/// What a staging directory's name holds after `.OUT`.
const PARTIAL: &str = ".failback-partial-";

/// What is at the output path now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Nothing, or an empty directory: the staging directory is renamed onto it.
    New,
    /// An earlier group export, replaced whole (`--force`).
    Replace,
}

/// Writes every disk of `group` as it was at one group point into directory `out_dir`
/// (see the module's constraints). Returns the group point and each disk's export, its
/// files named at their final place.
pub fn export(
    data_dir: &Path,
    retention_dir: &Path,
    group: &str,
    sel: &PointSel,
    out_dir: &Path,
    format: Format,
    opts: ExportOpts,
) -> Result<(GroupPoint, Vec<Exported>)> {
    let point = select(group, &list(data_dir, retention_dir, group)?, sel)?;
    let (parent, name) = split(out_dir)?;
    let target = target(out_dir, opts.force, group)?;
    crate::export::check_private_dir(&parent, out_dir)?;
    remove_stale(&parent, &name);
    let staging = parent.join(format!(
        ".{}{PARTIAL}{}-{:016x}",
        name.to_string_lossy(),
        std::process::id(),
        random()
    ));
    std::fs::create_dir(&staging).ctx(|| format!("create {}", staging.display()))?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o700))
        .ctx(|| format!("chmod 0700 {}", staging.display()))?;
    let written = precheck(data_dir, retention_dir, &point, (&staging, format))
        .and_then(|()| stage(data_dir, retention_dir, &point, (&staging, format), opts))
        .map_err(|e| full_volume(e, out_dir))
        .and_then(|done| place(&point, done, (&staging, out_dir), target));
    if written.is_err() || target == Target::Replace {
        // The failed attempt, or (after the exchange) the earlier export.
        let _ = std::fs::remove_dir_all(&staging);
    }
    Ok((point, written?))
}

/// The output's parent directory and its name.
fn split(out_dir: &Path) -> Result<(PathBuf, std::ffi::OsString)> {
    let refused = |reason: &str| Error::ExportRefused {
        out: out_dir.into(),
        reason: reason.into(),
    };
    let name = out_dir
        .file_name()
        .ok_or_else(|| refused("name the directory the group's disks go to (not / or ..)"))?;
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(refused(&format!(
            "its parent directory {} does not exist: the group's directory is created in an existing one",
            parent.display()
        )));
    }
    Ok((parent, name.to_owned()))
}

/// What is at `out_dir`, and whether it may be replaced: only an earlier export of `group`
/// that holds nothing but what its manifest names.
fn target(out_dir: &Path, force: bool, group: &str) -> Result<Target> {
    let refused = |reason: String| Error::ExportRefused {
        out: out_dir.into(),
        reason,
    };
    let meta = match std::fs::symlink_metadata(out_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Target::New),
        r => r.ctx(|| format!("inspect {}", out_dir.display()))?,
    };
    if meta.file_type().is_symlink() {
        return Err(refused(
            "it is a symbolic link: name the directory itself".into(),
        ));
    }
    if !meta.is_dir() {
        return Err(refused("it is a file: with --group, --out names the directory the group's disks go to (created if it does not exist)".into()));
    }
    // The staging directory is made beside OUT, on its parent's filesystem: a filesystem
    // mounted at OUT would have the whole group written to the wrong volume, then not
    // renamed.
    let parent = std::fs::metadata(crate::vmdk::parent_dir(out_dir))
        .ctx(|| format!("inspect the parent of {}", out_dir.display()))?;
    if std::os::unix::fs::MetadataExt::dev(&meta) != std::os::unix::fs::MetadataExt::dev(&parent) {
        return Err(refused(format!(
            "it is a mount point: name a directory inside it (e.g. {})",
            out_dir.join("group").display()
        )));
    }
    let mut entries = std::fs::read_dir(out_dir).ctx(|| format!("list {}", out_dir.display()))?;
    if entries.next().is_none() {
        return Ok(Target::New);
    }
    if let Err(why) = earlier_export(out_dir, group) {
        return Err(refused(format!(
            "{why}: name a new or empty directory; this one is never replaced, --force or not"
        )));
    }
    if !force {
        return Err(refused(
            "it holds an earlier group export: --force replaces it whole".into(),
        ));
    }
    Ok(Target::Replace)
}

/// Everything that can be checked is, before the first disk is written: every disk free
/// (not served), every output allowed.
fn precheck(
    data_dir: &Path,
    retention_dir: &Path,
    point: &GroupPoint,
    (staging, format): (&Path, Format),
) -> Result<()> {
    let reg = Registry::read(data_dir)?;
    for m in &point.members {
        let rec = reg.get(m.disk).ok_or(Error::UnknownDisk(m.disk))?;
        drop(crate::export::open_disk(&rec.data_path, m.disk)?);
        let out = member_path(staging, m, format);
        crate::export::check_outputs(data_dir, retention_dir, &reg, &out, format, false)?;
    }
    Ok(())
}

/// Whether `dir` is an earlier export of `group` and nothing else: its manifest names the
/// group, and every entry is the manifest or a file it names.
fn earlier_export(dir: &Path, group: &str) -> std::result::Result<(), String> {
    let text = std::fs::read_to_string(dir.join(MANIFEST)).map_err(|_| {
        format!("it holds files that are not a group export (no readable {MANIFEST})")
    })?;
    let m: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("its {MANIFEST} is not a group export's ({e})"))?;
    if m["group"].as_str() != Some(group) {
        return Err(format!(
            "it holds an export of group {}, not {group}",
            m["group"]
        ));
    }
    let named: std::collections::BTreeSet<&str> = m["members"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|x| x["files"].as_array().into_iter().flatten())
        .filter_map(|f| f.as_str())
        .chain([MANIFEST])
        .collect();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("it cannot be listed ({e})"))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let plain = e.file_type().is_ok_and(|t| t.is_file());
        if !plain || !named.contains(name.as_str()) {
            return Err(format!(
                "it holds {name:?}, which the group export there did not write"
            ));
        }
    }
    Ok(())
}

/// Exports every member of `point` into the staging directory.
fn stage(
    data_dir: &Path,
    retention_dir: &Path,
    point: &GroupPoint,
    (staging, format): (&Path, Format),
    opts: ExportOpts,
) -> Result<Vec<Exported>> {
    point
        .members
        .iter()
        .map(|m| {
            let opts = ExportOpts {
                force: false,
                ..opts
            };
            crate::export::export(
                data_dir,
                retention_dir,
                m.disk,
                &PointSel::Id(m.point.id),
                &member_path(staging, m, format),
                format,
                opts,
            )
        })
        .collect()
}

/// Writes the manifest and puts the staging directory in the output's place.
fn place(
    point: &GroupPoint,
    mut done: Vec<Exported>,
    (staging, out_dir): (&Path, &Path),
    target: Target,
) -> Result<Vec<Exported>> {
    for e in &mut done {
        for f in &mut e.files {
            *f = out_dir.join(f.file_name().expect("a file"));
        }
    }
    let manifest = serde_json::json!({
        "group": point.group,
        "id": point.id,
        "time_us": point.time_us,
        "kind": point.kind,
        "tag": point.tag,
        "members": point.members.iter().zip(&done).map(|(m, e)| serde_json::json!({
            "vm": m.vm,
            "disk": m.disk,
            "lsn": m.point.lsn,
            "files": e.files.iter().map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned())).collect::<Vec<_>>(),
            "digest": wire_protocol::digest::hex(&e.digest),
        })).collect::<Vec<_>>(),
    });
    let path = staging.join(MANIFEST);
    store::write_durable(&store::RealFs, &path, format!("{manifest:#}\n").as_bytes())
        .ctx(|| format!("write {}", path.display()))?;
    crate::vmdk::sync_dir(staging)?;
    match target {
        Target::New => std::fs::rename(staging, out_dir)
            .ctx(|| format!("rename {} to {}", staging.display(), out_dir.display()))?,
        Target::Replace => exchange(staging, out_dir)?,
    }
    crate::vmdk::sync_dir(crate::vmdk::parent_dir(out_dir))?;
    Ok(done)
}

/// Swaps two directories in one step (`renameat2(RENAME_EXCHANGE)`): no instant shows
/// neither, or half of each.
fn exchange(a: &Path, b: &Path) -> Result<()> {
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).expect("no NUL in a path");
    let (ca, cb) = (c(a), c(b));
    // SAFETY: both are valid NUL-terminated paths; AT_FDCWD resolves them from the working
    // directory, as std's own calls do.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .ctx(|| format!("exchange {} with {}", a.display(), b.display()));
    }
    Ok(())
}

/// Removes staging directories of exports to `name` whose process is gone.
fn remove_stale(parent: &Path, name: &std::ffi::OsStr) {
    let prefix = format!(".{}{PARTIAL}", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = n
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!(path = %e.path().display(), "removing what an interrupted group export left");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A full volume says what a group export needs.
fn full_volume(e: Error, out_dir: &Path) -> Error {
    if crate::core::out_of_space(&e) {
        Error::ExportRefused {
            out: out_dir.into(),
            reason: format!("its volume is full ({e}); nothing there was replaced: a group export writes every disk of the group beside the output before it replaces anything, so the volume needs room for the whole group besides what it holds. Free space there, or export to another volume"),
        }
    } else {
        e
    }
}

/// 64 random bits for a staging directory's name.
fn random() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: the buffer is valid for its length; getrandom writes at most that many bytes.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n == 8 {
        u64::from_le_bytes(b)
    } else {
        // Never reached on Linux for 8 bytes; the pid and the clock still make it unique.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    }
}
