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
    /// The process server (or master target behind it) refused something.
    #[error("{0}")]
    Refused(String),
    /// A configuration value is unusable.
    #[error("invalid {param}: {reason}")]
    InvalidParameter {
        /// Which setting.
        param: &'static str,
        /// Why.
        reason: String,
    },
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
