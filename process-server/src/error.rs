//! The one error type of the process server.

use std::io;

/// Result with the process server's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong; each message says what to do.
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
    /// A cache record failed its checksum: its range must be resynced from the agent.
    #[error("cache {path} is corrupt at byte {offset}: {detail}; the range it covered (lsn {first_lsn}..={last_lsn}) is marked for resync")]
    CacheCorrupt {
        /// The segment.
        path: String,
        /// Where.
        offset: u64,
        /// What.
        detail: String,
        /// First LSN covered, if known.
        first_lsn: u64,
        /// Last LSN covered, if known.
        last_lsn: u64,
    },
    /// The cache volume is full.
    #[error("cache full: {used_bytes} of {limit_bytes} bytes used; writes wait until the master target drains it")]
    CacheFull {
        /// Bytes used.
        used_bytes: u64,
        /// The limit.
        limit_bytes: u64,
    },
    /// The master target broke off or refused the link.
    #[error("master target: {0}")]
    MasterTarget(String),
    /// A command could not do what was asked (the text says what and what to do).
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
    /// Whether this is a full volume (or quota): room cures it, retrying later succeeds.
    pub fn is_out_of_space(&self) -> bool {
        matches!(self, Error::Io { source, .. } if matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)))
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
