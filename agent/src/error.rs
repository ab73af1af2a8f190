//! The one error type of the agent.

use std::io;
use std::path::PathBuf;

/// Result with the agent's [`Error`].
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
    /// A trace line could not be read.
    #[error("{}:{line}: {reason} (use --skip-bad-lines to skip such lines)", file.display())]
    TraceLine {
        /// The trace file.
        file: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        reason: String,
    },
    /// The process server (or master target behind it) refused a request with a code.
    #[error("{message}")]
    Peer {
        /// Its stable code: [`ErrorCode::retry`] says whether to try again.
        code: wire_protocol::ErrorCode,
        /// What it said.
        message: String,
    },
    /// Something did not happen in time or as it must; retrying may help.
    #[error("{0}")]
    Refused(String),
    /// Setting up or using the connection failed.
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
    /// Whether retrying can help: decided by types and codes, never by an error's text.
    pub fn retry(&self) -> wire_protocol::Retry {
        use wire_protocol::Retry;
        match self {
            Error::Peer { code, .. } => code.retry(),
            Error::Runtime(e) => e.retry(),
            Error::Io { .. } | Error::Wire(_) | Error::Refused(_) => Retry::Transient,
            Error::TraceLine { .. } | Error::InvalidParameter { .. } => Retry::Permanent,
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
