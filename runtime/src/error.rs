//! The one error type of the runtime crate.

use std::io;

use wire_protocol::{ErrorCode, Retry};

/// Result with the runtime's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong while securing, accepting or making a connection, or serving the
/// admin endpoint. [`Error::retry`] says whether trying again can help.
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
    /// A certificate, key or TLS setting is unusable (ours or the peer's).
    #[error("tls: {0}")]
    Tls(String),
    /// The TLS handshake failed.
    #[error("TLS handshake with {addr}: {detail}")]
    Handshake {
        /// The peer.
        addr: String,
        /// What happened, and what to check.
        detail: String,
        /// True when the certificates themselves are wrong (another CA, a name that does
        /// not match, a refused certificate): retrying cannot help.
        permanent: bool,
    },
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    CertGen(#[from] rcgen::Error),
    /// The peer broke the protocol.
    #[error(transparent)]
    Wire(#[from] wire_protocol::Error),
    /// The peer answered with an error frame.
    #[error("{message}")]
    Refused {
        /// Its stable code.
        code: ErrorCode,
        /// Its text.
        message: String,
    },
    /// A step did not finish in its time.
    #[error("{0} timed out")]
    Timeout(String),
    /// A setting is unusable.
    #[error("invalid {param}: {reason}")]
    InvalidParameter {
        /// Which setting (as the flag or key is spelled).
        param: &'static str,
        /// Why, with the accepted range.
        reason: String,
    },
}

impl Error {
    /// Whether retrying may succeed.
    pub fn retry(&self) -> Retry {
        match self {
            Error::Io { .. } | Error::Timeout(_) | Error::Wire(_) => Retry::Transient,
            Error::Handshake { permanent, .. } => {
                if *permanent {
                    Retry::Permanent
                } else {
                    Retry::Transient
                }
            }
            Error::Refused { code, .. } => code.retry(),
            Error::Tls(_) | Error::CertGen(_) | Error::InvalidParameter { .. } => Retry::Permanent,
        }
    }
}

impl From<rustls::Error> for Error {
    fn from(e: rustls::Error) -> Self {
        Error::Tls(e.to_string())
    }
}

impl From<io::Error> for Error {
    fn from(source: io::Error) -> Self {
        Error::Io {
            context: "file".into(),
            source,
        }
    }
}

/// Attaches a context to an I/O error (every crate has the same helper for its own error).
pub trait IoContext<T> {
    /// Wraps the error with what was being done.
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
