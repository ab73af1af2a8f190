//! One zstd stream per connection: payloads compressed with the history of the payloads
//! before them (protocol version 5, [`crate::frame::FLAG_ZSTD_STREAM`]).
//!
//! A frame compressed alone finds no match outside itself. A VM disk repeats itself at
//! distances far larger than a batch (the same files, libraries and zeroed structures in
//! many places): on the WAN bench's ext4 image, 1 MiB frames compress 4.76:1 at level 3
//! and 5.01:1 at level 9, one stream with a 32 MiB window and long-distance matching
//! 5.54:1 and 5.94:1. On a link that is the bottleneck that is 10-20% more logical
//! throughput for the same wire bytes.
//!
//! # Wire layout
//! ```text
//! frame with FLAG_ZSTD_STREAM {
//!     payload: {
//!         raw_crc: u32,           // CRC32C of the decoded payload (big-endian)
//!         zstd: [u8; wire_len - 4], // what the sender's compressor emitted for this
//!                                 // payload, flushed (ZSTD_e_flush) so that it decodes
//!                                 // whole now, ending at a block boundary; it may end a
//!                                 // zstd frame and begin the next (the level changed)
//!     },
//!     raw_len: u32,               // in the header: exactly what this chunk decodes to
//! }
//! ```
//! The decoded bytes' own CRC is what catches a history that differs from the sender's: a
//! chunk decoded against other bytes still yields `raw_len` bytes (its back-references
//! point at the wrong ones), and the frame's CRC covers only the compressed bytes.
//! ```text
//! ```
//!
//! # Design constraints
//! - Order is the contract: chunk k decodes only after chunks 0..k of the same connection,
//!   so the receiver decodes every stream chunk as it arrives, whatever it then does with
//!   the message (refuse it, nack it). A new connection starts a new stream on both sides;
//!   nothing is ever resent into an old one.
//! - Bounded: the window is [`STREAM_WINDOW_LOG`] (32 MiB: one decompressor's memory per
//!   connection); a stream asking for a larger one is an error, as is a chunk that decodes
//!   to more or less than its declared `raw_len`.
//! - Only receivers that opt in accept chunks ([`crate::MessageCodec::accept_stream`]): a
//!   process server caches an agent's frames to decode them one by one later, so a chunk
//!   from an agent is refused there, never cached.
//! - The level is fixed within a zstd frame (zstd applies a new level only to a new frame):
//!   a change of level ends the frame and starts the next, which drops the history. So a
//!   lower level (the cores cannot keep up) is taken at once, a higher one only once the
//!   frame has carried [`LEVEL_UP_AFTER_BYTES`]: an adaptive level climbing a step a second
//!   otherwise reset the history every second (a 96 MiB test image of repeats crossed at
//!   2.9:1 instead of 8:1).

use zstd::zstd_safe::zstd_sys::ZSTD_EndDirective as EndDirective;
use zstd::zstd_safe::{self, CCtx, CParameter, DCtx, DParameter, InBuffer, OutBuffer};

use crate::{Error, Result};

/// The stream's window: 2^25 bytes (32 MiB). Matches reach that far back, and a receiver
/// holds that much per connection (the decompressor's window); 2^24 gave 5.44:1 and 2^26
/// 5.61:1 on the bench's image at level 3, against 5.54:1 here.
pub const STREAM_WINDOW_LOG: u32 = 25;

/// Input a zstd frame of the stream carries before a higher level may end it: four
/// windows, so that the history a new frame drops is a small part of what it had served.
pub const LEVEL_UP_AFTER_BYTES: u64 = 4 << STREAM_WINDOW_LOG;

fn zstd_error(what: &str, code: usize) -> Error {
    Error::Decompress(format!("{what}: {}", zstd_safe::get_error_name(code)))
}

/// The sending side: one per connection, used in the order the chunks are sent.
pub struct StreamCompressor {
    cctx: CCtx<'static>,
    /// The level of the zstd frame under way; `None` before the first chunk.
    level: Option<i32>,
    /// Input bytes the frame under way has carried.
    frame_bytes: u64,
}

impl std::fmt::Debug for StreamCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamCompressor")
            .field("level", &self.level)
            .finish()
    }
}

impl Default for StreamCompressor {
    fn default() -> Self {
        StreamCompressor {
            cctx: CCtx::create(),
            level: None,
            frame_bytes: 0,
        }
    }
}

impl StreamCompressor {
    /// The level the frame under way compresses at.
    pub fn level(&self) -> Option<i32> {
        self.level
    }

    /// Appends the chunk `payload` compresses to, at `level` (a higher one once the frame
    /// under way has carried [`LEVEL_UP_AFTER_BYTES`]), to `out`; it decodes whole once the
    /// receiver has every chunk before it. On error the stream is unusable (the connection
    /// must end) and `out` may hold part of a chunk.
    pub fn compress(&mut self, level: i32, payload: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let io = |code: usize| Error::Io(std::io::Error::other(zstd_error("zstd stream", code)));
        // The checksum leads the chunk, ahead of the end of a frame a level change closes.
        out.extend_from_slice(&crc32c::crc32c(payload).to_be_bytes());
        let level = match self.level {
            // Up one step at a time: a stream held at a low level while the adaptive one
            // climbed would otherwise jump to a level one core cannot keep up with.
            Some(now) if level > now && self.frame_bytes < LEVEL_UP_AFTER_BYTES => now,
            Some(now) if level > now => now + 1,
            _ => level,
        };
        if self.level != Some(level) {
            if self.level.is_some() {
                // End the frame under way: its last block goes out ahead of the new frame.
                self.drive(&mut InBuffer::around(&[]), out, END)
                    .map_err(io)?;
            }
            self.cctx
                .reset(zstd_safe::ResetDirective::SessionOnly)
                .map_err(io)?;
            for p in [
                CParameter::CompressionLevel(level),
                CParameter::WindowLog(STREAM_WINDOW_LOG),
                CParameter::EnableLongDistanceMatching(true),
            ] {
                self.cctx.set_parameter(p).map_err(io)?;
            }
            self.level = Some(level);
            self.frame_bytes = 0;
        }
        self.frame_bytes += payload.len() as u64;
        let mut input = InBuffer::around(payload);
        self.drive(&mut input, out, FLUSH).map_err(io)
    }

    /// Feeds `input` with `end` until it is all taken and flushed into `out`.
    fn drive(
        &mut self,
        input: &mut InBuffer<'_>,
        out: &mut Vec<u8>,
        end: EndDirective,
    ) -> std::result::Result<(), usize> {
        loop {
            // Room for what this round may emit: zstd's bound for the input left, at least
            // one block's worth for the flush.
            let left = input.src.len() - input.pos();
            out.reserve(zstd_safe::compress_bound(left).max(CCtx::out_size()));
            // The buffer sets the Vec's length to what zstd wrote when it is dropped.
            let at = out.len();
            let pending =
                self.cctx
                    .compress_stream2(&mut OutBuffer::around_pos(out, at), input, end)?;
            if pending == 0 && input.pos() == input.src.len() {
                return Ok(());
            }
        }
    }
}

/// Flush: everything given so far decodes once this chunk arrives.
const FLUSH: EndDirective = EndDirective::ZSTD_e_flush;
/// End the zstd frame (before a change of level).
const END: EndDirective = EndDirective::ZSTD_e_end;

/// Bytes of a zstd block header: what the decoder asks for next at a block boundary.
const BLOCK_HEADER_BYTES: usize = 3;

/// The receiving side: one per connection, fed every chunk in the order they arrived.
pub struct StreamDecompressor {
    dctx: DCtx<'static>,
}

impl std::fmt::Debug for StreamDecompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDecompressor").finish()
    }
}

impl StreamDecompressor {
    /// A decompressor that refuses windows over [`STREAM_WINDOW_LOG`].
    pub fn new() -> Result<Self> {
        let mut dctx = DCtx::create();
        dctx.set_parameter(DParameter::WindowLogMax(STREAM_WINDOW_LOG))
            .map_err(|c| zstd_error("zstd stream window", c))?;
        Ok(StreamDecompressor { dctx })
    }

    /// Decodes the next chunk, which must yield exactly `raw_len` bytes (at most
    /// [`crate::frame::MAX_PAYLOAD_LEN`], checked by the caller). An error leaves the
    /// stream unusable.
    pub fn decompress(&mut self, chunk: &[u8], raw_len: usize) -> Result<Vec<u8>> {
        let Some((crc, chunk)) = chunk.split_first_chunk::<4>() else {
            return Err(Error::Decompress(
                "a stream chunk shorter than its checksum".into(),
            ));
        };
        // One byte of room past the declared length: a chunk that decodes to more fills it
        // and is caught, rather than leaving bytes behind for the next chunk.
        let mut out = Vec::with_capacity(raw_len + 1);
        let mut input = InBuffer::around(chunk);
        // zstd's hint after the last call: 0 at the end of a zstd frame, the size of a
        // block header at a block boundary; anything else is a chunk cut mid-block, whose
        // rest would be taken from the next chunk.
        let mut hint = BLOCK_HEADER_BYTES;
        while input.pos() < chunk.len() {
            let before = (input.pos(), out.len());
            {
                let mut o = OutBuffer::around_pos(&mut out, before.1);
                hint = self
                    .dctx
                    .decompress_stream(&mut o, &mut input)
                    .map_err(|c| zstd_error("zstd stream chunk", c))?;
            }
            if out.len() > raw_len {
                return Err(Error::Decompress(format!(
                    "a stream chunk decodes to more than the {raw_len} bytes declared"
                )));
            }
            if (input.pos(), out.len()) == before {
                return Err(Error::Decompress(
                    "a stream chunk the decoder makes no progress on".into(),
                ));
            }
        }
        if out.len() != raw_len {
            return Err(Error::Decompress(format!(
                "a stream chunk decodes to {} bytes, {raw_len} declared",
                out.len()
            )));
        }
        if hint != 0 && hint != BLOCK_HEADER_BYTES {
            return Err(Error::Decompress(
                "a stream chunk that ends inside a zstd block".into(),
            ));
        }
        if crc32c::crc32c(&out) != u32::from_be_bytes(*crc) {
            return Err(Error::Decompress(
                "a stream chunk decoded to other bytes than were sent (a history that differs \
                 from the sender's)"
                    .into(),
            ));
        }
        Ok(out)
    }
}
