//! The frame layer.
//!
//! # Layout (all integers big-endian; don't reorder fields: frozen since version 1)
//! ```text
//! struct Frame {
//!     magic:        [u8; 4],   // b"FBK1"
//!     version:      u16,       // protocol version the payload is encoded in
//!     msg_type:     u16,       // MessageType; numbers are fixed forever, never reused
//!     flags:        u16,       // bit 0: payload is one zstd frame; bit 1 (version >= 5):
//!                              // payload continues the connection's zstd stream; at most
//!                              // one of the two; other bits must be zero
//!     reserved:     u16,       // must be zero
//!     wire_len:     u32,       // payload bytes that follow the header (<= MAX_PAYLOAD_LEN)
//!     raw_len:      u32,       // payload bytes after decompression (== wire_len if raw)
//!     header_crc:   u32,       // CRC32C of the 20 bytes above
//!     payload:      [u8; wire_len],
//!     payload_crc:  u32,       // CRC32C of payload
//! }
//! ```
//! The header has its own checksum so that a corrupted length is an error at once, rather
//! than a decoder waiting for bytes that will never come. Both lengths are checked against
//! [`MAX_PAYLOAD_LEN`] before the receive buffer is allowed to grow.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::version::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use crate::{Error, Result};

/// Frame magic: "FBK1".
pub const MAGIC: [u8; 4] = *b"FBK1";
/// Bytes of the fixed header, its CRC included.
pub const HEADER_LEN: usize = 24;
/// Bytes after the payload (its CRC32C).
pub const TRAILER_LEN: usize = 4;
/// The largest payload, raw or compressed, a frame may declare.
///
/// 16 MiB: a write batch carries at most [`crate::message::MAX_BATCH_DATA_LEN`] (8 MiB) of
/// block data plus metadata, and a digest list at most 512 Ki digests. Bounding both lengths
/// bounds the memory one connection can make us hold to two payloads (wire and raw).
pub const MAX_PAYLOAD_LEN: usize = 16 << 20;
/// The largest frame on the wire.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_PAYLOAD_LEN + TRAILER_LEN;
/// Flag bit: the payload is one zstd frame of `raw_len` bytes.
pub const FLAG_ZSTD: u16 = 1;
/// Flag bit (version >= [`crate::version::STREAM_SINCE`]): the payload is the next chunk of
/// the sender's zstd stream on this connection and decodes to `raw_len` bytes only after
/// every earlier such chunk, in order (`crate::stream`). A receiver accepts it only where it
/// said it would (a master target, from a process server).
pub const FLAG_ZSTD_STREAM: u16 = 2;
const KNOWN_FLAGS: u16 = FLAG_ZSTD | FLAG_ZSTD_STREAM;
const _: () = assert!(crate::message::MAX_BATCH_DATA_LEN + (1 << 20) <= MAX_PAYLOAD_LEN);

/// The fixed header of a frame, decoded and verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version of the payload encoding.
    pub version: u16,
    /// Message type number.
    pub msg_type: u16,
    /// Flag bits (see [`FLAG_ZSTD`] and [`FLAG_ZSTD_STREAM`]).
    pub flags: u16,
    /// Payload bytes on the wire.
    pub wire_len: u32,
    /// Payload bytes after decompression.
    pub raw_len: u32,
}

impl Header {
    /// Writes the header, with its CRC, into `dst`.
    pub fn put(&self, dst: &mut BytesMut) {
        let start = dst.len();
        dst.put_slice(&MAGIC);
        dst.put_u16(self.version);
        dst.put_u16(self.msg_type);
        dst.put_u16(self.flags);
        dst.put_u16(0);
        dst.put_u32(self.wire_len);
        dst.put_u32(self.raw_len);
        let crc = crc32c::crc32c(&dst[start..]);
        dst.put_u32(crc);
    }

    /// Parses and verifies a header from exactly [`HEADER_LEN`] bytes.
    pub fn parse(src: &[u8]) -> Result<Header> {
        assert_eq!(src.len(), HEADER_LEN, "caller passes exactly one header");
        let found: [u8; 4] = src[..4].try_into().expect("4 bytes");
        if found != MAGIC {
            return Err(Error::BadMagic { found });
        }
        let mut b = &src[4..];
        let version = b.get_u16();
        let msg_type = b.get_u16();
        let flags = b.get_u16();
        let reserved = b.get_u16();
        let wire_len = b.get_u32();
        let raw_len = b.get_u32();
        let actual = b.get_u32();
        let calculated = crc32c::crc32c(&src[..HEADER_LEN - 4]);
        if calculated != actual {
            return Err(Error::HeaderCorrupted { calculated, actual });
        }
        if reserved != 0 {
            return Err(Error::ReservedNotZero {
                field: "reserved",
                value: reserved.into(),
            });
        }
        if flags & !KNOWN_FLAGS != 0 {
            return Err(Error::UnknownFlags(flags));
        }
        if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION_MAX).contains(&version) {
            return Err(Error::UnsupportedVersion {
                found: version,
                min: PROTOCOL_VERSION_MIN,
                max: PROTOCOL_VERSION_MAX,
            });
        }
        for (what, len) in [
            ("frame payload", wire_len),
            ("decompressed payload", raw_len),
        ] {
            if len as usize > MAX_PAYLOAD_LEN {
                return Err(Error::TooLarge {
                    what,
                    len: len.into(),
                    max: MAX_PAYLOAD_LEN as u64,
                });
            }
        }
        if flags & FLAG_ZSTD != 0 && flags & FLAG_ZSTD_STREAM != 0 {
            return Err(Error::Invalid {
                field: "flags",
                detail: "a payload is either one zstd frame or a chunk of the stream, not both"
                    .into(),
            });
        }
        if flags & FLAG_ZSTD_STREAM != 0 && version < crate::version::STREAM_SINCE {
            return Err(Error::Invalid {
                field: "flags",
                detail: format!("a stream chunk in a version {version} frame"),
            });
        }
        if flags & (FLAG_ZSTD | FLAG_ZSTD_STREAM) == 0 && raw_len != wire_len {
            return Err(Error::Invalid {
                field: "raw_len",
                detail: format!("{raw_len} differs from wire_len {wire_len} in a raw frame"),
            });
        }
        Ok(Header {
            version,
            msg_type,
            flags,
            wire_len,
            raw_len,
        })
    }
}

/// A verified frame: header and payload as it crossed the wire (possibly compressed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The header.
    pub header: Header,
    /// The payload bytes exactly as carried (compressed when `FLAG_ZSTD` is set).
    pub payload: Bytes,
    /// The whole frame as received (header, payload, CRC); `payload` is a slice of it, so
    /// a process server stores and forwards these bytes without framing them again.
    pub raw: Bytes,
}

/// Tokio-util codec of whole frames; checks both CRCs, never decompresses.
///
/// The process server uses it to cache frames exactly as they arrived; [`crate::MessageCodec`]
/// builds on it to yield messages.
#[derive(Debug, Default)]
pub struct FrameCodec {
    /// The header of the frame being received, once its 24 bytes have been verified.
    pending: Option<Header>,
}

impl FrameCodec {
    /// The next whole frame at the front of `src`, checked (header and CRC), taken out of
    /// it; `None` until one has arrived whole. An error leaves the stream unusable.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>> {
        let header = match self.pending {
            Some(h) => h,
            None => {
                if src.len() < HEADER_LEN {
                    return Ok(None);
                }
                let h = Header::parse(&src[..HEADER_LEN])?;
                self.pending = Some(h);
                h
            }
        };
        let total = HEADER_LEN + header.wire_len as usize + TRAILER_LEN;
        if src.len() < total {
            // The length was checked against MAX_PAYLOAD_LEN in Header::parse, so this reserve
            // is bounded by MAX_FRAME_LEN.
            src.reserve(total - src.len());
            return Ok(None);
        }
        self.pending = None;
        let raw = src.split_to(total).freeze();
        let payload_end = HEADER_LEN + header.wire_len as usize;
        let payload = raw.slice(HEADER_LEN..payload_end);
        let actual = (&raw[payload_end..]).get_u32();
        let calculated = crc32c::crc32c(&payload);
        if calculated != actual {
            return Err(Error::PayloadCorrupted { calculated, actual });
        }
        Ok(Some(Frame {
            header,
            payload,
            raw,
        }))
    }

    /// As [`FrameCodec::decode`] at the end of the stream: bytes left over are a torn frame.
    pub fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>> {
        match self.decode(src)? {
            Some(f) => Ok(Some(f)),
            None if src.is_empty() => Ok(None),
            None => Err(Error::UnexpectedEof {
                buffered: src.len(),
            }),
        }
    }

    /// Appends `frame` to `dst` as it was received (header, payload, CRC).
    pub fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<()> {
        put_frame(frame.header, &frame.payload, dst)
    }
}

/// Appends one frame (header, payload, CRC) to `dst`.
pub fn put_frame(header: Header, payload: &[u8], dst: &mut BytesMut) -> Result<()> {
    if payload.len() > MAX_PAYLOAD_LEN || header.raw_len as usize > MAX_PAYLOAD_LEN {
        return Err(Error::TooLarge {
            what: "outgoing payload",
            len: payload.len().max(header.raw_len as usize) as u64,
            max: MAX_PAYLOAD_LEN as u64,
        });
    }
    debug_assert_eq!(header.wire_len as usize, payload.len());
    dst.reserve(HEADER_LEN + payload.len() + TRAILER_LEN);
    header.put(dst);
    dst.put_slice(payload);
    dst.put_u32(crc32c::crc32c(payload));
    Ok(())
}
