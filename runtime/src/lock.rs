//! One instance per directory: a service locks its state directory for its whole life, so a
//! second instance started by mistake on the same directory is refused instead of fighting
//! the first over the same files.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
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
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
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

#[cfg(test)]
mod tests {
    use super::*;

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
