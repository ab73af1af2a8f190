//! An attached disk's data file, held under an exclusive lock while attached.
//!
//! The on-premises VM is powered off during reprotect, so nothing but the master target
//! may write its disks: the lock makes that a fact rather than a hope.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use store::FileHandle;

use crate::error::{Error, IoContext, Result};

/// How long a lock held elsewhere is waited for before [`Error::DiskLocked`]. A ring's
/// teardown (and a write's last file reference, put by an io-wq worker after its completion
/// is visible) runs in kernel workers after `close`; on a loaded 2-core machine that was
/// seen to outlast an immediate reopen. A second is far beyond it and still a prompt answer
/// when the disk really is in use.
pub const LOCK_RELEASE_WAIT_MS: u64 = 1_000;
/// Poll interval while waiting for the lock.
const LOCK_POLL_MS: u64 = 10;

/// A disk's flat extent (or raw image), open for reading and writing, exclusively locked.
#[derive(Debug)]
pub struct DiskFile {
    file: Box<dyn FileHandle>,
    path: PathBuf,
    size_bytes: u64,
}

impl DiskFile {
    /// Opens and exclusively locks `path`. Fails with [`Error::DiskLocked`] if another
    /// process (or another attachment) holds it.
    pub fn open(path: &Path) -> Result<DiskFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .ctx(|| format!("open disk {}", path.display()))?;
        DiskFile::lock(file, path)
    }

    /// Takes a file opened for reading and writing (by [`crate::datastore`], confined to a
    /// datastore) and locks it exclusively; `path` names it in messages.
    ///
    /// A lock held by someone else is waited for up to [`LOCK_RELEASE_WAIT_MS`] first: a
    /// disk this process (or one that just exited) closed can stay locked for a moment
    /// after the close, because io_uring drops its file references from a kernel worker.
    pub fn lock(file: File, path: &Path) -> Result<DiskFile> {
        let deadline = Instant::now() + Duration::from_millis(LOCK_RELEASE_WAIT_MS);
        // Bounded by the deadline.
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(LOCK_POLL_MS));
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(Error::DiskLocked { path: path.into() })
                }
                Err(TryLockError::Error(e)) => {
                    return Err(Error::Io {
                        context: format!("lock {}", path.display()),
                        source: e,
                    })
                }
            }
        }
        let size_bytes = file
            .metadata()
            .ctx(|| format!("stat {}", path.display()))?
            .len();
        Ok(DiskFile {
            file: Box::new(file),
            path: path.into(),
            size_bytes,
        })
    }

    /// Wraps a file of another [`store::FileSystem`] (the simulator's), which has no lock:
    /// there, nothing else runs.
    pub fn from_handle(file: Box<dyn FileHandle>, path: &Path) -> Result<DiskFile> {
        let size_bytes = file.len().ctx(|| format!("stat {}", path.display()))?;
        Ok(DiskFile {
            file,
            path: path.into(),
            size_bytes,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .ctx(|| format!("read {} at {offset}", self.path.display()))
    }

    /// [`DiskFile::read_at`] for old bytes about to be overwritten: a range the filesystem
    /// holds no data for (never written on a thin disk) is zeros without a read (see
    /// `store::FileHandle::read_exact_at_sparse`).
    pub fn read_at_sparse(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file
            .read_exact_at_sparse(buf, offset)
            .ctx(|| format!("read {} at {offset}", self.path.display()))
    }

    /// Writes all of `data` at `offset` (into the page cache; see [`DiskFile::sync`]).
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        // Callers check ranges against the wire; this check also covers what comes from a
        // file (a journal's undo record): nothing ever grows the disk.
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > self.size_bytes)
        {
            return Err(Error::Io {
                context: format!("write {} at {offset}", self.path.display()),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "{} bytes at {offset} end past the disk's {} bytes",
                        data.len(),
                        self.size_bytes
                    ),
                ),
            });
        }
        self.file
            .write_all_at(data, offset)
            .ctx(|| format!("write {} at {offset}", self.path.display()))
    }

    /// Drops the disk's clean cached pages, so reads come from the device (see
    /// [`store::FileHandle::drop_cache`]).
    pub fn drop_cache(&self) -> Result<()> {
        self.file
            .drop_cache()
            .ctx(|| format!("drop the cache of {}", self.path.display()))
    }

    /// Makes every write so far durable.
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .ctx(|| format!("fsync {}", self.path.display()))
    }

    /// A read-only mapping of the whole disk, for hashing without copies (`None` for a
    /// simulated disk, which callers read instead). The caller must
    /// not write the disk while the mapping is in use (the apply worker, the only writer,
    /// hashes between its groups).
    pub fn map(&self) -> Result<Option<memmap2::Mmap>> {
        let Some(file) = self.file.std_file() else {
            return Ok(None);
        };
        // SAFETY: the file is locked exclusively by us, so no other process changes it, and
        // the callers do not write it while the mapping lives (see above).
        unsafe { memmap2::Mmap::map(file) }
            .map(Some)
            .ctx(|| format!("map {}", self.path.display()))
    }

    /// The underlying real file, if it is one (for io_uring).
    pub fn file(&self) -> Option<&File> {
        self.file.std_file()
    }
}
