//! The one error type of the wire protocol.

use std::io;

/// Result with the wire protocol's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while framing, parsing or securing a connection.
///
/// Every variant but [`Error::Io`] means the peer sent bytes we must not
/// trust: the connection is dead after it (tokio-util's decoder contract).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket or a PEM file failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The first four bytes of a frame are not our magic: the peer does not speak this protocol.
    #[error("bad frame magic {found:02x?}: the peer does not speak the failback protocol")]
    BadMagic {
        /// The four bytes received.
        found: [u8; 4],
    },
    /// The frame header's CRC32C does not match its contents.
    #[error(
        "frame header corrupted: crc32c calculated {calculated:#010x}, carried {actual:#010x}"
    )]
    HeaderCorrupted {
        /// CRC computed over the received header.
        calculated: u32,
        /// CRC carried in the header.
        actual: u32,
    },
    /// The payload's CRC32C does not match the payload.
    #[error(
        "frame payload corrupted: crc32c calculated {calculated:#010x}, carried {actual:#010x}"
    )]
    PayloadCorrupted {
        /// CRC computed over the received payload.
        calculated: u32,
        /// CRC carried after the payload.
        actual: u32,
    },
    /// A header field that must be zero is not.
    #[error("reserved header bits are not zero ({field}: {value:#x})")]
    ReservedNotZero {
        /// Which field.
        field: &'static str,
        /// The value found.
        value: u32,
    },
    /// A declared length exceeds a limit.
    #[error("{what} of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// The declared length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The frame uses a protocol version we do not speak.
    #[error("frame protocol version {found} is outside the supported range {min}..={max}")]
    UnsupportedVersion {
        /// The frame's version.
        found: u16,
        /// Our minimum.
        min: u16,
        /// Our maximum.
        max: u16,
    },
    /// Version ranges of two peers do not overlap.
    #[error("protocol versions do not overlap: we speak {ours_min}..={ours_max}, the peer speaks {theirs_min}..={theirs_max}; upgrade the older side")]
    VersionMismatch {
        /// Our minimum.
        ours_min: u16,
        /// Our maximum.
        ours_max: u16,
        /// The peer's minimum.
        theirs_min: u16,
        /// The peer's maximum.
        theirs_max: u16,
    },
    /// A message type we do not know and may not ignore.
    #[error("unknown message type {0}")]
    UnknownMessage(u16),
    /// A flag bit we do not know.
    #[error("unknown frame flags {0:#06x}")]
    UnknownFlags(u16),
    /// The payload ends before the message does.
    #[error("{0} payload truncated")]
    Truncated(&'static str),
    /// The payload has bytes left over after the message.
    #[error("{message}: {extra} trailing bytes after the message")]
    TrailingBytes {
        /// The message type.
        message: &'static str,
        /// Bytes left.
        extra: usize,
    },
    /// A field holds a value outside its domain.
    #[error("invalid {field}: {detail}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// Decompression failed or did not yield exactly the declared size.
    #[error("decompression failed: {0}")]
    Decompress(String),
    /// The connection ended in the middle of a frame.
    #[error("connection closed in the middle of a frame ({buffered} bytes buffered)")]
    UnexpectedEof {
        /// Bytes of the partial frame.
        buffered: usize,
    },
}
