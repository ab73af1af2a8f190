//! Every file operation the services' durable state makes, behind one trait.
//!
//! The retention journal and the disks of the master target, the process server's cache
//! and its per-disk state files, and the agent's state directory do their I/O through
//! [`FileSystem`] and [`FileHandle`], like
//! raft-engine's `FileSystem`: [`RealFs`] in production, [`SimFs`] in the deterministic
//! simulator (`tests/simulation.rs`), which crashes at any operation, tears and drops
//! unsynced writes, fills the volume and fails operations with EIO, all from one seed.
//!
//! What stays outside, by design: checks that are about the operating system itself, not
//! about durable state: resolving and confining paths against symlinks and hard links
//! (`canonicalize`, `O_NOFOLLOW`, device and inode numbers) in the master target's
//! datastore and export code, advisory locks on disks and state directories, and the
//! io_uring apply path (which submits to an open `std::fs::File`, itself a
//! [`FileHandle`]).
//!
//! # Design constraints
//! - The trait is as small as the callers need: positional reads and writes, length,
//!   truncation, the two fsyncs, and the namespace operations with an explicit directory
//!   fsync (a new or renamed file is durable only once its directory is synced).
//! - `std::fs::File` is itself a [`FileHandle`], so a caller holding a real file (an export
//!   target, a locked disk) passes it as is.
//! - No clock, no threads, no tokio: the simulator must be able to own everything.

use std::fmt::Debug;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

mod sim;

pub use sim::{SimFaults, SimFs, SimStats};

/// How to open a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Read only; the file must exist.
    Read,
    /// Read and write; the file must exist.
    ReadWrite,
    /// Read and write; the file must not exist (`O_CREAT | O_EXCL`).
    CreateNew,
    /// Read and write; created empty if missing.
    CreateOrOpen,
}

/// An open file: positional I/O, so one handle may serve several readers.
pub trait FileHandle: Debug + Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset` (`UnexpectedEof` past the end).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// [`FileHandle::read_exact_at`], where bytes the filesystem reports as a hole (no
    /// data at all: `SEEK_DATA`) are zeros without a read. Reading a hole of a thin disk
    /// makes the kernel zero page-cache pages for it, and for what it reads ahead: a tenth
    /// of two cores in a 1 Gbit/s resync onto a new disk. Any doubt reads.
    fn read_exact_at_sparse(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
    /// Writes all of `data` at `offset`, growing the file if needed (not yet durable).
    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// The file's length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or zero-extends the file (not yet durable).
    fn set_len(&self, len_bytes: u64) -> io::Result<()>;
    /// Makes `len_bytes` at `offset`, within the file's length, read as zeros (not yet
    /// durable). A real file gives their blocks back where its filesystem can (a hole);
    /// otherwise zeros are written.
    fn zero_range(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        write_zeros(self, offset, len_bytes)
    }
    /// Makes the data written so far durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// Makes data and metadata (the length) durable (`fsync`).
    fn sync_all(&self) -> io::Result<()>;
    /// Drops what the page cache holds of the file and is clean, so that reads come from
    /// the device. After a failed fsync Linux marks the pages it could not write clean
    /// ("fsyncgate"): they read back as if written but never will be. Recovery calls this
    /// before reading, so it sees what a crash would leave, never such pages.
    fn drop_cache(&self) -> io::Result<()>;
    /// The real file, where there is one (for locks, mappings and io_uring).
    fn std_file(&self) -> Option<&File> {
        None
    }
}

/// The namespace: opening, listing, renaming and removing files and directories.
pub trait FileSystem: Debug + Send + Sync {
    /// Opens `path` as `mode` says.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FileHandle>>;
    /// The names of the entries of directory `dir` (files and directories), unsorted.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Removes a file (durable once its directory is synced).
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Renames a file or a directory (durable once both directories are synced).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Creates a directory and its missing parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Makes the entries of `dir` (new, renamed and removed files) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Whether `path` exists.
    fn exists(&self, path: &Path) -> bool;
}

/// Zeros written over `len_bytes` at `offset`, a bounded buffer at a time.
fn write_zeros<H: FileHandle + ?Sized>(h: &H, offset: u64, len_bytes: u64) -> io::Result<()> {
    /// The zeros written at a time.
    const CHUNK_BYTES: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK_BYTES.min(len_bytes) as usize];
    let mut done = 0;
    while done < len_bytes {
        let n = CHUNK_BYTES.min(len_bytes - done);
        h.write_all_at(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

/// Filesystems (`statfs` magic numbers) whose `SEEK_DATA` reports as data everything that
/// reads as data, written or not yet allocated (delayed allocation, unwritten extents with
/// dirty pages): ext4, xfs, btrfs, tmpfs. Any other is read: OpenZFS before 2.1.14 and
/// 2.2.2 reported holes over data written but not yet committed (openzfs/zfs#15526), and
/// NFS and FUSE answer whatever their server says.
const SEEK_DATA_TRUSTED: [u64; 4] = [
    0xEF53,      // ext2/3/4
    0x5846_5342, // xfs
    0x9123_683E, // btrfs
    0x0102_1994, // tmpfs
];

/// Whether `len_bytes` at `offset`, within `f`'s length, hold no data: the next data at or
/// after `offset` (`lseek(SEEK_DATA)`) starts at or past their end. Only on the filesystems
/// of [`SEEK_DATA_TRUSTED`], and only in a file with holes at all: in one whose blocks
/// are all allocated (preallocated, or written through), `SEEK_DATA` could walk every
/// unwritten extent to the end and find nothing. An error says no. The call moves the
/// descriptor's cursor, which positioned I/O ignores.
fn is_hole(f: &File, offset: u64, len_bytes: u64) -> bool {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::io::AsRawFd;
    let (Ok(off), Some(end)) = (i64::try_from(offset), offset.checked_add(len_bytes)) else {
        return false;
    };
    // SAFETY: statfs is plain data; fstatfs writes one through the pointer, which points at it.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the descriptor is this File's.
    if unsafe { libc::fstatfs(f.as_raw_fd(), &mut fs) } != 0
        || !SEEK_DATA_TRUSTED.contains(&(fs.f_type as u64))
    {
        return false;
    }
    let Ok(meta) = f.metadata() else {
        return false;
    };
    // Past the end a read must still fail as one; and a file with no hole has none here.
    if end > meta.len() || meta.blocks().saturating_mul(512) >= meta.len() {
        return false;
    }
    // SAFETY: a plain syscall on a descriptor this File owns; no memory is passed.
    let data = unsafe { libc::lseek(f.as_raw_fd(), off, libc::SEEK_DATA) };
    if data >= 0 {
        return data as u64 >= end;
    }
    // ENXIO: no data from `offset` to the end of the file.
    io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO)
}

impl FileHandle for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    fn read_exact_at_sparse(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if is_hole(self, offset, buf.len() as u64) {
            buf.fill(0);
            return Ok(());
        }
        FileExt::read_exact_at(self, buf, offset)
    }
    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, data, offset)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        File::set_len(self, len_bytes)
    }
    fn zero_range(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        use std::os::unix::io::AsRawFd;
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len_bytes)) else {
            return write_zeros(self, offset, len_bytes);
        };
        // SAFETY: a plain syscall on a descriptor this File owns; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // The filesystem has no holes (vfat, some network filesystems): zeros, written.
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => write_zeros(self, offset, len_bytes),
            _ => Err(e),
        }
    }
    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }
    fn sync_all(&self) -> io::Result<()> {
        File::sync_all(self)
    }
    fn drop_cache(&self) -> io::Result<()> {
        use std::os::unix::io::AsRawFd;
        // SAFETY: a plain syscall on a descriptor this File owns; no memory is passed.
        let rc = unsafe { libc::posix_fadvise(self.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }
    fn std_file(&self) -> Option<&File> {
        Some(self)
    }
}

/// The machine's file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

impl FileSystem for RealFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FileHandle>> {
        let mut o = std::fs::OpenOptions::new();
        match mode {
            OpenMode::Read => o.read(true),
            OpenMode::ReadWrite => o.read(true).write(true),
            OpenMode::CreateNew => o.read(true).write(true).create_new(true),
            OpenMode::CreateOrOpen => o.read(true).write(true).create(true),
        };
        Ok(Box::new(o.open(path)?))
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(dir)? {
            if let Ok(name) = e?.file_name().into_string() {
                v.push(name);
            }
        }
        Ok(v)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
}

/// Replaces `path` with `data` durably and atomically: written beside it, fsynced, renamed
/// over it, and the directory fsynced. After a crash the file holds the old contents or
/// the new, never a mix, and once this returns the new contents survive a power loss.
pub fn write_durable(fs: &dyn FileSystem, path: &Path, data: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    match fs.remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let f = fs.open(&tmp, OpenMode::CreateNew)?;
    f.write_all_at(data, 0)?;
    f.sync_all()?;
    drop(f);
    fs.rename(&tmp, path)?;
    fs.sync_dir(&parent_dir(path))
}

/// The whole of a file.
pub fn read_all(fs: &dyn FileSystem, path: &Path) -> io::Result<Vec<u8>> {
    let f = fs.open(path, OpenMode::Read)?;
    let mut buf = vec![0; f.len()? as usize];
    f.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

/// Removes `path` if it is there, and syncs its directory (a removal is durable only then).
pub fn remove_durable(fs: &dyn FileSystem, path: &Path) -> io::Result<()> {
    match fs.remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(()) => fs.sync_dir(&parent_dir(path)),
    }
}

/// The directory holding `path` (`.` for a bare name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
