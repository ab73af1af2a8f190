//! The wire protocol of the failback data plane.
//!
//! Every byte between the agent, the process server and the master target travels in the
//! frames defined here, over mutual TLS 1.3.
//!
//! # Layout
//! - [`frame`]: the frame layer: a fixed header with its own CRC32C, the payload (zstd or
//!   raw) and a CRC32C over the payload, with [`frame::FrameCodec`] to cut a byte stream
//!   into checked frames.
//! - [`message`]: the messages carried in frames, their payload layouts and their stable
//!   type numbers.
//! - [`codec`]: [`MessageCodec`], frames and messages together, with per-batch compression.
//! - [`stream`]: one zstd stream per connection (version 5): payloads compressed with the
//!   history of the ones before them.
//! - [`version`]: protocol version negotiation.
//! - [`handshake`]: the Hello exchange, as pure checks the services' shells call.
//! - [`digest`]: the disk digest (per-block blake3, then blake3 of the block digests).
//! - `tokio_codec` (feature `tokio-codec`): tokio-util's `Decoder` and `Encoder` for the
//!   codecs, for the services' `Framed` sockets. Without it the crate depends on no
//!   runtime (`cargo tree -p wire-protocol -e normal`).
//!
//! TLS, connection handling, the admin endpoint and everything else the services share at
//! run time live in the `runtime` crate: this one stays free of I/O.
//!
//! # Design constraints
//! - Nothing a peer declares makes us allocate beyond a named limit: a frame's declared
//!   lengths are checked against [`frame::MAX_PAYLOAD_LEN`] before any buffer grows, and
//!   decompression is bounded by the declared raw length.
//! - Corruption anywhere in a frame is detected: the header carries its own CRC32C (so a
//!   flipped length is caught before we wait for bytes that will never come) and the payload
//!   carries another.
//! - Block data is zero-copy on receipt: each write's data is a [`bytes::Bytes`] slice of the
//!   received (or decompressed) payload.
//! - This crate does no I/O, keeps no clock and spawns nothing.

pub mod codec;
pub mod digest;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod message;
pub mod stream;
#[cfg(feature = "tokio-codec")]
mod tokio_codec;
pub mod version;

pub use codec::{CodecStats, Compression, MessageCodec};
pub use error::{Error, Result};
pub use message::{
    Ack, AckEntry, Bookmark, BookmarkKind, Cut, CutPhase, DigestList, DigestRequest, DiskAttach,
    ErrorCode, ErrorMsg, Hello, LocationKind, Message, Nack, Retry, Role, Write, WriteBatch,
    CAP_ZSTD, CUT_APP_CONSISTENT,
};

/// The blake3 digest of a block of data, as carried on the wire.
pub fn digest(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

/// Digests of zeros a thread remembers, by length: zero extents come in few lengths (a
/// resync's block size, a capture's write sizes); a peer sending many only refills it.
const ZERO_DIGESTS_MAX: usize = 64;

/// Whether a write's digest is that of its data. A decoded zero extent's (version 4) is
/// compared with the digest of that many zeros, remembered per length: 52 bytes from a
/// peer must not cost 8 MiB of hashing each time.
pub fn digest_matches(w: &Write) -> bool {
    let zeros = message::payload::ZEROS.as_ptr_range();
    let data = w.data.as_ptr_range();
    // Any slice inside the static array is zeros: it is never written.
    if !w.data.is_empty() && zeros.start <= data.start && data.end <= zeros.end {
        return zero_digest(w.data.len()) == w.digest;
    }
    digest(&w.data) == w.digest
}

/// The digest of `len` zeros (at most the batch limit), remembered per thread.
fn zero_digest(len: usize) -> [u8; 32] {
    thread_local! {
        static KNOWN: std::cell::RefCell<std::collections::HashMap<usize, [u8; 32]>> =
            std::cell::RefCell::default();
    }
    KNOWN.with(|k| {
        let mut k = k.borrow_mut();
        if let Some(d) = k.get(&len) {
            return *d;
        }
        if k.len() >= ZERO_DIGESTS_MAX {
            k.clear();
        }
        let d = digest(&message::payload::ZEROS[..len]);
        k.insert(len, d);
        d
    })
}

/// Whether `b` is all zeros: in 64-byte blocks the compiler vectorizes, since this runs over
/// every write sent (a zero extent) and every byte a master target overwrites (an undo of
/// zeros); data that is not zeros is told from its first block.
pub fn is_zeros(b: &[u8]) -> bool {
    let blocks = b.chunks_exact(64);
    let tail = blocks.remainder();
    blocks
        .map(|c| c.iter().fold(0u8, |a, &x| a | x))
        .all(|x| x == 0)
        && tail.iter().all(|&x| x == 0)
}
