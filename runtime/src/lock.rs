//! One instance per directory: a service locks its state directory for its whole life, so a
//! second instance started by mistake on the same directory is refused instead of fighting
//! the first over the same files.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The lock file's name inside the locked directory.
pub const LOCK_FILE: &str = ".failback.lock";

/// An exclusive lock on a directory, held until dropped (or the process ends).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    path: PathBuf,
}

impl DirLock {
    /// Locks `dir` (creating it if absent) for `service`, writing our PID into the lock file.
    /// Fails, naming the directory and the holder's PID, if another process holds it.
    pub fn acquire(dir: &Path, service: &str) -> Result<DirLock> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io {
            context: format!("create {}", dir.display()),
            source: e,
        })?;
        let changeable = others_can_change(dir).map_err(|e| Error::Io {
            context: format!("inspect {}", dir.display()),
            source: e,
        })?;
        if let Some(why) = changeable {
            return Err(Error::InvalidParameter {
                param: "directory",
                reason: format!("{} holds this {service}'s state, but {why}: they could plant links that turn its writes onto other files, or stand in for its sockets. Use a directory only root or you can write (e.g. under /var/lib/failback)", dir.display()),
            });
        }
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| Error::Io {
                context: format!("open {}", path.display()),
                source: e,
            })?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let holder = match pid.trim() {
                    "" => "another process".to_owned(),
                    p => format!("process {p}"),
                };
                return Err(Error::InvalidParameter {
                    param: "directory",
                    reason: format!(
                        "{} is in use by {holder} (another {service}?): one {service} per directory; stop the other one first",
                        dir.display()
                    ),
                });
            }
            Err(TryLockError::Error(e)) => {
                return Err(Error::Io {
                    context: format!("lock {}", path.display()),
                    source: e,
                })
            }
        }
        let write_pid = |f: &mut File| -> std::io::Result<()> {
            f.set_len(0)?;
            f.rewind()?;
            writeln!(f, "{}", std::process::id())
        };
        write_pid(&mut file).map_err(|e| Error::Io {
            context: format!("write {}", path.display()),
            source: e,
        })?;
        Ok(DirLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Why another user could change `dir` or what it holds, if one could: the first of `dir`
/// (resolved) and its ancestors owned by a user other than root, this process's user and
/// the operator who ran sudo (`SUDO_UID`: their home is theirs to trust), or writable by
/// group or others without the sticky bit. `None` when only those users can.
pub fn others_can_change(dir: &Path) -> std::io::Result<Option<String>> {
    let canonical = std::fs::canonicalize(dir)?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let operator = std::env::var("SUDO_UID")
        .ok()
        .and_then(|u| u.parse::<u32>().ok());
    for d in canonical.ancestors() {
        let m = std::fs::metadata(d)?;
        let (uid, mode) = (m.uid(), m.mode());
        let others_write = mode & 0o022 != 0 && mode & 0o1000 == 0;
        if (uid != 0 && uid != me && Some(uid) != operator) || others_write {
            return Ok(Some(format!(
                "{} can be changed by another user (owner uid {uid}, mode {:o})",
                d.display(),
                mode & 0o7777
            )));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_others_can_write_is_refused_for_state() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        // Inside a world-writable directory, and that directory itself: both changeable.
        let inner = open.join("state");
        for d in [&open, &inner] {
            let e = DirLock::acquire(d, "agent").unwrap_err().to_string();
            assert!(e.contains("can be changed by another user"), "{e}");
        }
        assert!(!inner.join(LOCK_FILE).exists(), "nothing written there");
        // Sticky (as /tmp): others cannot swap what is ours.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(others_can_change(&open).unwrap().is_none());
        DirLock::acquire(&inner, "agent").unwrap();
    }

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let d = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(d.path(), "test service").unwrap();
        let e = DirLock::acquire(d.path(), "test service")
            .unwrap_err()
            .to_string();
        assert!(e.contains(&std::process::id().to_string()), "{e}");
        assert!(e.contains(&d.path().display().to_string()), "{e}");
        drop(first);
        DirLock::acquire(d.path(), "test service").unwrap();
    }
}
