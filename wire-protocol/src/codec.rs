//! [`MessageCodec`]: messages over frames, with per-batch zstd compression.
//!
//! Compression is per frame: a payload is compressed when it is at least
//! [`MIN_COMPRESS_LEN`] long and the codec has a level, and is sent raw when compression
//! does not save at least 1/[`MIN_SAVING_DIVISOR`] of it. Decompression is bounded by the
//! frame's declared raw length (itself bounded by [`MAX_PAYLOAD_LEN`]), so a zip bomb is
//! an error, not an allocation.

use bytes::{Bytes, BytesMut};

use bytes::BufMut;

use crate::frame::{
    Frame, FrameCodec, Header, FLAG_ZSTD, FLAG_ZSTD_STREAM, HEADER_LEN, MAX_PAYLOAD_LEN,
    TRAILER_LEN,
};
use crate::message::Message;
use crate::stream::{StreamCompressor, StreamDecompressor};
use crate::version::{PROTOCOL_VERSION_MIN, STREAM_SINCE};
use crate::{Error, Result};

/// Payloads shorter than this are never compressed: zstd's frame overhead eats the gain.
pub const MIN_COMPRESS_LEN: usize = 512;
/// Compression must save at least 1/32 of a payload (3%) to be worth the receiver's time.
pub const MIN_SAVING_DIVISOR: usize = 32;

/// How outgoing payloads are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Never compress.
    #[default]
    None,
    /// zstd at this level (1..=19; negative levels are zstd's fast modes).
    Zstd(i32),
}

/// Byte counters of one codec, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CodecStats {
    /// Frames encoded.
    pub frames_out: u64,
    /// Payload bytes before compression, encoded.
    pub raw_bytes_out: u64,
    /// Frame bytes written (headers, payloads, CRCs).
    pub wire_bytes_out: u64,
    /// Frames decoded.
    pub frames_in: u64,
    /// Frame bytes read.
    pub wire_bytes_in: u64,
    /// Payload bytes after decompression, decoded.
    pub raw_bytes_in: u64,
}

/// Frames and messages together: the codec every connection uses.
pub struct MessageCodec {
    frames: FrameCodec,
    compression: Compression,
    version: u16,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    /// Whether stream chunks are taken (see [`MessageCodec::accept_stream`]), and the
    /// connection's stream once the first arrived.
    accept_stream: bool,
    stream_in: Option<StreamDecompressor>,
    /// Counters since the codec was made.
    pub stats: CodecStats,
}

impl std::fmt::Debug for MessageCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageCodec")
            .field("compression", &self.compression)
            .field("version", &self.version)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Default for MessageCodec {
    fn default() -> Self {
        Self::new(Compression::None)
    }
}

impl MessageCodec {
    /// A codec that compresses outgoing payloads as `compression` says.
    pub fn new(compression: Compression) -> Self {
        MessageCodec {
            frames: FrameCodec::default(),
            compression,
            // Until negotiation says otherwise, frames (the Hello, a refusal of one) are in
            // the oldest version we speak: the one a peer of any overlapping range reads.
            version: PROTOCOL_VERSION_MIN,
            compressor: None,
            decompressor: None,
            accept_stream: false,
            stream_in: None,
            stats: CodecStats::default(),
        }
    }

    /// Changes the compression of later frames (the adaptive level uses this).
    pub fn set_compression(&mut self, compression: Compression) {
        if self.compression != compression {
            self.compressor = None;
        }
        self.compression = compression;
    }

    /// Sets the protocol version of outgoing payloads (the negotiated one).
    pub fn set_version(&mut self, version: u16) {
        self.version = version;
    }

    /// The protocol version of outgoing payloads.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Encodes `msg` into a standalone frame (for caches and benches).
    pub fn encode_to_bytes(&mut self, msg: &Message) -> Result<Bytes> {
        let mut out = BytesMut::new();
        self.encode(msg, &mut out)?;
        Ok(out.freeze())
    }

    /// Takes stream chunks ([`FLAG_ZSTD_STREAM`]) from now on: for a connection whose every
    /// frame this codec decodes, in order (a master target's, from a process server). Any
    /// other codec refuses them: a frame decoded alone (one a cache stored) has no stream.
    pub fn accept_stream(&mut self) {
        self.accept_stream = true;
    }

    /// Decodes the message in an already verified frame (for caches that store frames).
    pub fn decode_frame(&mut self, frame: Frame) -> Result<Message> {
        let payload = if frame.header.flags & FLAG_ZSTD_STREAM != 0 {
            if !self.accept_stream {
                return Err(Error::Invalid {
                    field: "flags",
                    detail: "a chunk of a zstd stream where none is taken: only a process \
                             server sends them, to a master target"
                        .into(),
                });
            }
            let d = match &mut self.stream_in {
                Some(d) => d,
                None => self.stream_in.insert(StreamDecompressor::new()?),
            };
            Bytes::from(d.decompress(&frame.payload, frame.header.raw_len as usize)?)
        } else if frame.header.flags & FLAG_ZSTD != 0 {
            let raw_len = frame.header.raw_len as usize;
            debug_assert!(raw_len <= MAX_PAYLOAD_LEN, "checked in Header::parse");
            let d = match &mut self.decompressor {
                Some(d) => d,
                None => self.decompressor.insert(
                    zstd::bulk::Decompressor::new()
                        .map_err(|e| Error::Decompress(e.to_string()))?,
                ),
            };
            // The capacity bounds the output: zstd fails rather than writing past it.
            let out = d
                .decompress(&frame.payload, raw_len)
                .map_err(|e| Error::Decompress(e.to_string()))?;
            if out.len() != raw_len {
                return Err(Error::Decompress(format!(
                    "{} bytes decompressed, {raw_len} declared",
                    out.len()
                )));
            }
            Bytes::from(out)
        } else {
            frame.payload
        };
        self.stats.raw_bytes_in += payload.len() as u64;
        Message::decode_payload(frame.header.version, frame.header.msg_type, payload)
    }
}

impl MessageCodec {
    /// The next whole message at the front of `src`, taken out of it; `None` until its
    /// frame has arrived whole. An error leaves the stream unusable.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>> {
        let before = src.len();
        let Some(frame) = self.frames.decode(src)? else {
            return Ok(None);
        };
        self.stats.frames_in += 1;
        self.stats.wire_bytes_in += (before - src.len()) as u64;
        self.decode_frame(frame).map(Some)
    }

    /// As [`MessageCodec::decode`] at the end of the stream: bytes left over are a torn
    /// frame.
    pub fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Message>> {
        match self.decode(src)? {
            Some(m) => Ok(Some(m)),
            None if src.is_empty() => Ok(None),
            None => Err(Error::UnexpectedEof {
                buffered: src.len(),
            }),
        }
    }

    /// Appends `msg` to `dst` as one frame in this codec's version. The payload is encoded
    /// straight after room left for the header (one copy of the data); a payload worth
    /// compressing is replaced there by its zstd frame. On error nothing is appended.
    pub fn encode(&mut self, msg: &Message, dst: &mut BytesMut) -> Result<()> {
        let start = dst.len();
        let payload_at = start + HEADER_LEN;
        dst.put_bytes(0, HEADER_LEN);
        if let Err(e) = msg.encode_payload(self.version, dst) {
            dst.truncate(start);
            return Err(e);
        }
        let raw_len = dst.len() - payload_at;
        if raw_len > MAX_PAYLOAD_LEN {
            dst.truncate(start);
            return Err(Error::TooLarge {
                what: "outgoing payload",
                len: raw_len as u64,
                max: MAX_PAYLOAD_LEN as u64,
            });
        }
        let mut flags = 0;
        if let Compression::Zstd(level) = self.compression {
            if raw_len >= MIN_COMPRESS_LEN {
                let compressed = match &mut self.compressor {
                    Some(c) => Ok(c),
                    None => zstd::bulk::Compressor::new(level).map(|c| self.compressor.insert(c)),
                }
                .and_then(|c| c.compress(&dst[payload_at..]));
                // Nothing of a message that fails to encode stays in the buffer: the frames
                // before it must go out whole, and nothing after a torn one.
                let out = compressed.map_err(|e| {
                    dst.truncate(start);
                    Error::Io(e)
                })?;
                if out.len() <= raw_len - raw_len / MIN_SAVING_DIVISOR {
                    dst.truncate(payload_at);
                    dst.extend_from_slice(&out);
                    flags = FLAG_ZSTD;
                }
            }
        }
        let header = Header {
            version: self.version,
            msg_type: msg.msg_type(),
            flags,
            wire_len: (dst.len() - payload_at) as u32,
            raw_len: raw_len as u32,
        };
        let mut h = BytesMut::with_capacity(HEADER_LEN);
        header.put(&mut h);
        dst[start..payload_at].copy_from_slice(&h);
        let crc = crc32c::crc32c(&dst[payload_at..]);
        dst.put_u32(crc);
        self.stats.frames_out += 1;
        self.stats.raw_bytes_out += raw_len as u64;
        self.stats.wire_bytes_out += (dst.len() - start) as u64;
        Ok(())
    }
}

/// Rewrites `frames` (whole frames as [`MessageCodec::encode`] made them, uncompressed, in
/// a version with stream chunks) onto `out` with each payload of at least
/// [`MIN_COMPRESS_LEN`] bytes compressed as the next chunk of `stream`, at `level`. Every
/// chunk goes out, even one that saved nothing: the receiver's history must hold what the
/// sender's does. Frames already compressed, or short, pass as they are.
pub fn stream_frames(
    stream: &mut StreamCompressor,
    level: i32,
    frames: &[u8],
    out: &mut BytesMut,
) -> Result<()> {
    let mut rest = frames;
    let mut chunk = Vec::new();
    while !rest.is_empty() {
        if rest.len() < HEADER_LEN {
            return Err(Error::UnexpectedEof {
                buffered: rest.len(),
            });
        }
        let h = Header::parse(&rest[..HEADER_LEN])?;
        let total = HEADER_LEN + h.wire_len as usize + TRAILER_LEN;
        if rest.len() < total {
            return Err(Error::UnexpectedEof {
                buffered: rest.len(),
            });
        }
        let (frame, after) = rest.split_at(total);
        rest = after;
        let payload = &frame[HEADER_LEN..HEADER_LEN + h.wire_len as usize];
        if h.flags != 0 || payload.len() < MIN_COMPRESS_LEN || h.version < STREAM_SINCE {
            out.extend_from_slice(frame);
            continue;
        }
        chunk.clear();
        stream.compress(level, payload, &mut chunk)?;
        let header = Header {
            flags: FLAG_ZSTD_STREAM,
            wire_len: chunk.len() as u32,
            ..h
        };
        crate::frame::put_frame(header, &chunk, out)?;
    }
    Ok(())
}
