//! The rules of the retention volume.
//!
//! The retention directory must be on a volume of its own: not the volume of a replicated
//! disk, not the cache volume, not FAT/FAT32, writable, with free space. A setting for
//! demos and tests (`allow-shared-retention-volume`) lets it share a filesystem; the
//! service then logs a warning at start.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::{Error, IoContext, Result};

/// `f_type` of FAT/FAT32 (vfat, msdos) filesystems.
const MSDOS_SUPER_MAGIC: i64 = 0x4d44;

/// What the check learned of the volume.
#[derive(Debug, Clone, Copy)]
pub struct VolumeInfo {
    /// Bytes free for us.
    pub free_bytes: u64,
    /// Total bytes.
    pub total_bytes: u64,
}

fn statfs(path: &Path) -> Result<libc::statfs> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::InvalidParameter {
        param: "retention-dir",
        reason: "contains a NUL byte".into(),
    })?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a writable statfs.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(Error::Io {
            context: format!("statfs {}", path.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(st)
}

/// Checks `dir` as a retention volume. `others` are paths that must not share its
/// filesystem (the data/cache directory, attached disks), each with what it is.
pub fn check(dir: &Path, others: &[(&str, &Path)], allow_shared: bool) -> Result<VolumeInfo> {
    let refuse = |reason: String| Error::RetentionVolume {
        path: dir.into(),
        reason,
    };
    fs::create_dir_all(dir).map_err(|e| {
        refuse(format!(
            "cannot create it ({e}); create the volume and mount it there"
        ))
    })?;
    let st = statfs(dir)?;
    if st.f_type as i64 == MSDOS_SUPER_MAGIC {
        return Err(refuse(
            "it is a FAT/FAT32 volume; use ext4, xfs or NTFS".into(),
        ));
    }
    let probe = dir.join(".failback-write-probe");
    match fs::write(&probe, b"probe").and_then(|_| fs::remove_file(&probe)) {
        Ok(()) => {}
        // Full is not unwritable: the journals are pruned to make room (see VolumeInfo).
        Err(e) if is_out_of_space(&e) => {
            let _ = fs::remove_file(&probe);
        }
        Err(e) => {
            return Err(refuse(format!(
                "it is not writable ({e}); check the mount and permissions"
            )))
        }
    }
    let dev = fs::metadata(dir)
        .ctx(|| format!("stat {}", dir.display()))?
        .dev();
    for (what, other) in others {
        // A directory that does not exist yet will be made on its nearest existing ancestor's
        // filesystem: judge it by that.
        let Some(m) = other.ancestors().find_map(|a| fs::metadata(a).ok()) else {
            continue;
        };
        if m.dev() == dev {
            if allow_shared {
                tracing::warn!(retention = %dir.display(), other = %other.display(), what, "retention directory shares a filesystem with {what}: allowed for demos and tests only");
            } else {
                return Err(refuse(format!("it is on the same filesystem as {what} {}; give the retention journal a volume of its own (or set allow-shared-retention-volume for a demo)", other.display())));
            }
        }
    }
    let bsize = st.f_bsize as u64;
    let info = VolumeInfo {
        free_bytes: st.f_bavail as u64 * bsize,
        total_bytes: st.f_blocks as u64 * bsize,
    };
    Ok(info)
}

/// Bytes of the volume holding `dir`, if it can be read.
pub fn volume_bytes(dir: &Path) -> Option<u64> {
    let st = statfs(dir).ok()?;
    Some(st.f_blocks as u64 * st.f_bsize as u64)
}

/// Whether an I/O error means a volume (or a quota) is full.
pub fn is_out_of_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}
