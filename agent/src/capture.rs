//! Live capture: the source disk served as one file through FUSE, a user-space block
//! "filter driver". The user puts a loop device and a filesystem on the file; every write
//! to it enters the engine (applied to the source image, given its LSN, batched) before the
//! write returns to the kernel.
//!
//! # Design constraints
//! - **Crash-consistent stream.** One thread serves the FUSE connection and waits for the
//!   engine to take each write before it answers the kernel, so the stream's LSN order is
//!   the order in which writes completed, and nothing a filesystem saw complete is missing
//!   from the stream or the source image.
//! - **Flush and fsync reach the stream in order**: they send the pending batch and make
//!   the source image durable before they return.
//! - **Reads come from the source image**, which holds every completed write.
//! - **The disk keeps its size**: a truncate or an append past the end is refused, so a
//!   stray `>` or `truncate` cannot change what the target holds.
//! - The engine runs on the tokio runtime; this file knows only the channel to it.
//!
//! ```text
//! MOUNT_DIR/            directory, 0700, owner: the agent's user
//! └── NAME              regular file, 0600, size = the disk's size
//! ```

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request,
};
use tokio::sync::{mpsc, oneshot};

/// The root directory's inode (FUSE's).
const ROOT_INO: u64 = fuser::FUSE_ROOT_ID;
/// The disk file's inode.
const DISK_INO: u64 = 2;
/// How long the kernel may cache names and attributes: nothing here changes them.
const ATTR_TTL: Duration = Duration::from_secs(60);
/// The largest write the kernel sends in one request: a loop device's 1 MiB requests
/// arrive whole (fewer round trips), and a batch still holds several.
pub const MAX_WRITE_BYTES: u32 = 1 << 20;
/// The largest read served at once (the kernel asks for no more than `max_read`, which
/// fuser leaves at its default; this bounds the buffer whatever it asks).
const MAX_READ_BYTES: u32 = 16 << 20;

/// A request to the engine. Each carries the channel its answer comes back on: an errno
/// for the kernel, or success.
#[derive(Debug)]
pub enum Op {
    /// A write to capture: applied to the source image and queued in the stream.
    Write {
        /// Byte offset in the disk (inside it: checked here).
        offset: u64,
        /// The data.
        data: Bytes,
        /// Answered once the write is in the engine.
        done: oneshot::Sender<Result<(), i32>>,
    },
    /// An fsync or flush: the pending batch is sent and the source image made durable.
    Sync {
        /// Answered once both are done.
        done: oneshot::Sender<Result<(), i32>>,
    },
}

/// The FUSE file system: one directory with one file, the disk.
#[derive(Debug)]
pub struct CaptureFs {
    name: String,
    size_bytes: u64,
    /// The source image, for reads (writes go through the engine).
    reader: File,
    to_engine: mpsc::Sender<Op>,
    started: SystemTime,
    uid: u32,
    gid: u32,
    /// Open handles on the disk, for the agent to say what keeps it from stopping.
    opened: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl CaptureFs {
    /// The file system for a disk of `size_bytes`, named `name`, read from `reader`.
    pub fn new(
        name: &str,
        size_bytes: u64,
        reader: File,
        to_engine: mpsc::Sender<Op>,
        opened: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Self {
        // SAFETY: getuid and getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        CaptureFs {
            name: name.to_owned(),
            size_bytes,
            reader,
            to_engine,
            started: SystemTime::now(),
            uid,
            gid,
            opened,
        }
    }

    fn attr(&self, ino: u64) -> FileAttr {
        let (kind, perm, size, nlink) = if ino == ROOT_INO {
            (FileType::Directory, 0o700, 0, 2)
        } else {
            (FileType::RegularFile, 0o600, self.size_bytes, 1)
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Sends `op` to the engine and waits for its answer (an errno on failure: EIO when the
    /// engine is gone, as a disk that went away).
    fn ask(&self, op: impl FnOnce(oneshot::Sender<Result<(), i32>>) -> Op) -> Result<(), i32> {
        let (done, answer) = oneshot::channel();
        if self.to_engine.blocking_send(op(done)).is_err() {
            return Err(libc::EIO);
        }
        answer.blocking_recv().unwrap_or(Err(libc::EIO))
    }
}

impl Filesystem for CaptureFs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), i32> {
        // A kernel that allows less keeps its own limit: writes just arrive smaller.
        let _ = config.set_max_write(MAX_WRITE_BYTES);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        if parent == ROOT_INO && name == OsStr::new(&self.name) {
            reply.entry(&ATTR_TTL, &self.attr(DISK_INO), 0);
        } else {
            reply.error(libc::ENOENT);
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match ino {
            ROOT_INO | DISK_INO => reply.attr(&ATTR_TTL, &self.attr(ino)),
            _ => reply.error(libc::ENOENT),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        // A replicated disk keeps its size (an O_TRUNC open lands here too).
        let now = self.attr(ino);
        if size.is_some_and(|s| s != now.size) {
            tracing::warn!(
                requested = size,
                "refused a change of the protected disk's size"
            );
            return reply.error(libc::EPERM);
        }
        // Its owner and mode are the agent's (only it may open the disk): a chmod or chown
        // that would change them is refused, not taken and silently dropped. Times are
        // not the disk's content: a touch succeeds and changes nothing.
        let mode_changes = mode.is_some_and(|m| m & 0o7777 != u32::from(now.perm));
        if mode_changes || uid.is_some_and(|u| u != now.uid) || gid.is_some_and(|g| g != now.gid) {
            tracing::warn!(
                mode = mode.map(|m| format!("{:o}", m & 0o7777)),
                uid,
                gid,
                "refused a change of the protected disk's owner or mode"
            );
            return reply.error(libc::EPERM);
        }
        reply.attr(&ATTR_TTL, &now);
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        if ino == DISK_INO {
            self.opened
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            reply.opened(0, 0);
        } else {
            reply.error(libc::EISDIR);
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyData,
    ) {
        let start = (offset.max(0) as u64).min(self.size_bytes);
        let end = (start + u64::from(size.min(MAX_READ_BYTES))).min(self.size_bytes);
        let mut buf = vec![0u8; (end - start) as usize];
        match self.reader.read_exact_at(&mut buf, start) {
            Ok(()) => reply.data(&buf),
            Err(e) => {
                tracing::error!(error = %e, offset = start, "reading the source image failed");
                reply.error(e.raw_os_error().unwrap_or(libc::EIO));
            }
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyWrite,
    ) {
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(libc::EINVAL);
        };
        if offset.saturating_add(data.len() as u64) > self.size_bytes {
            // The disk does not grow: past its end is as past a block device's end.
            return reply.error(libc::EFBIG);
        }
        let data = Bytes::copy_from_slice(data);
        let len = data.len() as u32;
        match self.ask(|done| Op::Write { offset, data, done }) {
            Ok(()) => reply.written(len),
            Err(errno) => reply.error(errno),
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock: u64, reply: ReplyEmpty) {
        self.sync(reply);
    }

    fn fsync(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _data: bool, reply: ReplyEmpty) {
        self.sync(reply);
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT_INO {
            return reply.error(libc::ENOTDIR);
        }
        let entries = [
            (ROOT_INO, FileType::Directory, "."),
            (ROOT_INO, FileType::Directory, ".."),
            (DISK_INO, FileType::RegularFile, self.name.as_str()),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(*ino, i as i64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _flags: i32,
        _lock: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.opened
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        reply.ok();
    }

    fn getxattr(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        // A disk image has no extended attributes; ENOSYS tells the kernel to stop asking.
        reply.error(libc::ENOSYS);
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        _parent: u64,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        // One file, the disk: the directory takes no other (refused quietly, each of these).
        reply.error(libc::EPERM);
    }

    fn mknod(
        &mut self,
        _req: &Request<'_>,
        _parent: u64,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(libc::EPERM);
    }

    fn mkdir(
        &mut self,
        _req: &Request<'_>,
        _parent: u64,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(libc::EPERM);
    }

    fn unlink(&mut self, _req: &Request<'_>, _parent: u64, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(libc::EPERM);
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        _parent: u64,
        _name: &OsStr,
        _newparent: u64,
        _newname: &OsStr,
        _flags: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(libc::EPERM);
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _offset: i64,
        _length: i64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        // Discards would change content outside the stream: a loop device that is told
        // "not supported" stops sending them.
        reply.error(libc::EOPNOTSUPP);
    }
}

impl CaptureFs {
    fn sync(&self, reply: ReplyEmpty) {
        match self.ask(|done| Op::Sync { done }) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }
}
