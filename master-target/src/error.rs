//! The one error type of the master target.

use std::io;
use std::path::PathBuf;

use wire_protocol::ErrorCode;

/// Result with the master target's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong; each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The OS error.
        source: io::Error,
    },
    /// The wire protocol failed.
    #[error(transparent)]
    Wire(#[from] wire_protocol::Error),
    /// The master target has its maximum number of disks.
    #[error(
        "at most {max} disks per master target: deploy another master target for disk {disk_id}"
    )]
    DiskLimit {
        /// The limit.
        max: usize,
        /// The disk refused.
        disk_id: u64,
    },
    /// A disk with the same UUID is attached already.
    #[error("disk {disk_id} has UUID {uuid}, the same as attached disk {other}: VMs cloned from one template need new disk UUIDs (set a new ddb.uuid) before reprotect")]
    DuplicateUuid {
        /// The disk refused.
        disk_id: u64,
        /// The UUID.
        uuid: String,
        /// The disk attached already.
        other: u64,
    },
    /// The disk cannot be written consistently (sparse, snapshot, delta).
    #[error("{path}: {reason}")]
    UnsupportedDisk {
        /// The descriptor or image.
        path: PathBuf,
        /// Why, and what to do.
        reason: String,
    },
    /// Another process holds the disk file.
    #[error("{path} is locked by another process: power off the on-premises VM (or stop whatever holds the disk) and retry")]
    DiskLocked {
        /// The locked file.
        path: PathBuf,
    },
    /// The disk's size does not match the source's.
    #[error("disk {disk_id}: target {path} holds {actual} bytes but the source disk has {expected}: choose the matching disk, or recover to an alternate location")]
    SizeMismatch {
        /// The disk.
        disk_id: u64,
        /// The target file.
        path: PathBuf,
        /// Source size.
        expected: u64,
        /// Target size.
        actual: u64,
    },
    /// A write falls outside the disk.
    #[error("disk {disk_id}: write at {offset}+{len} ends past the disk's {size} bytes")]
    OutOfRange {
        /// The disk.
        disk_id: u64,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// A write's data does not match its digest.
    #[error("disk {disk_id}: write lsn {lsn} does not match its digest; asking for a resend")]
    DigestMismatch {
        /// The disk.
        disk_id: u64,
        /// The write.
        lsn: u64,
    },
    /// No such disk.
    #[error("disk {0} is not attached to this master target")]
    UnknownDisk(u64),
    /// The retention volume does not qualify.
    #[error("retention directory {path} refused: {reason}")]
    RetentionVolume {
        /// The directory.
        path: PathBuf,
        /// Why, and what to do.
        reason: String,
    },
    /// A journal is damaged where it cannot be repaired.
    #[error("journal {path} is corrupt at byte {offset}: {detail}")]
    JournalCorrupt {
        /// The segment.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// What.
        detail: String,
    },
    /// A target path from the wire is refused (outside the datastores, not a descriptor,
    /// a link out, an existing file).
    #[error("target {target:?} refused: {reason}")]
    TargetRefused {
        /// The path as named.
        target: String,
        /// Why.
        reason: String,
    },
    /// The peer's identity may not make this request.
    #[error("{0}")]
    Forbidden(String),
    /// The disk was detached for failback and is never attached or written again.
    #[error("disk {disk_id} was detached for failback at lsn {lsn}; it is not attached again (give a new disk id to replicate into a new disk)")]
    Detached {
        /// The disk.
        disk_id: u64,
        /// Its last durable LSN.
        lsn: u64,
    },
    /// An export would write where it must not, or could not be verified.
    #[error("export to {out} refused: {reason}")]
    ExportRefused {
        /// The output named.
        out: PathBuf,
        /// Why, and what to do.
        reason: String,
    },
    /// A disk the running service holds (attached), for a command that needs it free.
    #[error("disk {disk_id} is in use by the running master target: {what}")]
    DiskInUse {
        /// The disk.
        disk_id: u64,
        /// What to do.
        what: String,
    },
    /// No recovery point matches.
    #[error("{0}")]
    NoSuchPoint(String),
    /// A running master target refused an operator's request, or did not answer.
    #[error("{0}")]
    Refused(String),
    /// Setting up or using a connection failed.
    #[error(transparent)]
    Runtime(#[from] runtime::Error),
    /// A configuration value is unusable.
    #[error("invalid {param}: {reason}")]
    InvalidParameter {
        /// Which setting.
        param: &'static str,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// The wire error code a peer sees for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::DiskLimit { .. } => ErrorCode::DiskLimit,
            Error::DuplicateUuid { .. } => ErrorCode::DuplicateUuid,
            Error::UnsupportedDisk { .. } => ErrorCode::UnsupportedDisk,
            Error::DiskLocked { .. } => ErrorCode::DiskLocked,
            Error::SizeMismatch { .. } => ErrorCode::SizeMismatch,
            Error::OutOfRange { .. } => ErrorCode::OutOfRange,
            Error::DigestMismatch { .. } => ErrorCode::DigestMismatch,
            Error::UnknownDisk(_) => ErrorCode::UnknownDisk,
            Error::Wire(_) => ErrorCode::Malformed,
            Error::TargetRefused { .. } => ErrorCode::UnsupportedDisk,
            Error::Forbidden(_) => ErrorCode::Forbidden,
            Error::Detached { .. } => ErrorCode::Detached,
            Error::InvalidParameter { .. } => ErrorCode::Malformed,
            _ => ErrorCode::Internal,
        }
    }

    /// The text a peer sees: what it needs to act, never a file's size or an OS error
    /// about a path it did not name (those go to this service's log).
    pub fn wire_message(&self, disk_id: u64) -> String {
        match self {
            Error::SizeMismatch { expected, .. } => format!("disk {disk_id}: the target disk's size does not match the source disk's {expected} bytes: choose the matching disk, or recover to an alternate location"),
            Error::Io { .. } | Error::JournalCorrupt { .. } | Error::RetentionVolume { .. } => format!("disk {disk_id}: the master target failed an operation on its storage; its log says more"),
            Error::DiskLocked { .. } => format!("disk {disk_id}: the target disk is locked by another process: power off the on-premises VM (or stop whatever holds the disk) and retry"),
            Error::DuplicateUuid { .. } => format!("disk {disk_id}: its UUID is the same as another attached disk's: VMs cloned from one template need new disk UUIDs (set a new ddb.uuid) before reprotect"),
            e => e.to_string(),
        }
    }
}

/// Attaches a context to an I/O error.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}
