//! One zstd stream per connection (version 5): chunks decode in order to exactly what was
//! sent, carry the history of the chunks before them, and anything out of contract (a
//! receiver that takes none, a missing chunk, a wrong length, a window too large, an old
//! version) is an error, never other bytes.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use wire_protocol::codec::stream_frames;
use wire_protocol::frame::{put_frame, Header, FLAG_ZSTD, FLAG_ZSTD_STREAM, HEADER_LEN};
use wire_protocol::stream::{StreamCompressor, STREAM_WINDOW_LOG};
use wire_protocol::*;

/// A batch of one write of `data` at `offset`.
fn batch(lsn: u64, offset: u64, data: Vec<u8>) -> Message {
    Message::WriteBatch(WriteBatch {
        disk_id: 7,
        first_lsn: lsn,
        writes: vec![Write {
            timestamp_us: lsn,
            offset,
            digest: digest(&data),
            data: Bytes::from(data),
        }],
    })
}

/// Bytes that compress poorly alone (a xorshift sequence from `seed`).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `msgs` encoded uncompressed in version 5, then rewritten as stream chunks at `levels`
/// (one level per message, cycled): the bytes a process server puts on the link.
fn streamed(msgs: &[Message], levels: &[i32]) -> BytesMut {
    let mut plain = MessageCodec::default();
    plain.set_version(version::STREAM_SINCE);
    let mut stream = StreamCompressor::default();
    let mut wire = BytesMut::new();
    for (i, m) in msgs.iter().enumerate() {
        let mut frame = BytesMut::new();
        plain.encode(m, &mut frame).unwrap();
        stream_frames(&mut stream, levels[i % levels.len()], &frame, &mut wire).unwrap();
    }
    wire
}

fn receiver() -> MessageCodec {
    let mut c = MessageCodec::default();
    c.accept_stream();
    c
}

fn decode_all(codec: &mut MessageCodec, mut wire: BytesMut) -> Result<Vec<Message>> {
    let mut out = Vec::new();
    while let Some(m) = codec.decode(&mut wire)? {
        out.push(m);
    }
    assert!(wire.is_empty(), "every frame decoded");
    Ok(out)
}

#[test]
fn chunks_decode_in_order_to_what_was_sent_and_share_history() {
    let block = noise(1, 256 << 10);
    let msgs = vec![
        batch(1, 0, block.clone()),
        // A control message between chunks passes as it is (too short to compress).
        Message::Heartbeat { seq: 1, time_us: 2 },
        // The same bytes again, one chunk later: the stream finds them in its history.
        batch(2, 1 << 20, block.clone()),
        batch(3, 2 << 20, noise(2, 64 << 10)),
    ];
    let wire = streamed(&msgs, &[3]);
    let got = decode_all(&mut receiver(), wire.clone()).unwrap();
    assert_eq!(got, msgs);
    // Frame by frame: the repeat cost a few hundred bytes, not another 256 KiB.
    let mut frames = frame::FrameCodec::default();
    let mut w = wire;
    let mut sizes = Vec::new();
    while let Some(f) = frames.decode(&mut w).unwrap() {
        sizes.push((f.header.flags, f.header.wire_len));
    }
    assert_eq!(sizes[0].0, FLAG_ZSTD_STREAM);
    assert_eq!(sizes[1].0, 0, "the heartbeat is not a chunk");
    assert!(sizes[0].1 > 250 << 10, "noise does not compress: {sizes:?}");
    assert!(
        sizes[2].1 < 4 << 10,
        "the repeat is found in the history: {sizes:?}"
    );
}

#[test]
fn a_change_of_level_starts_a_new_zstd_frame_the_receiver_follows() {
    let msgs: Vec<Message> = (0..6)
        .map(|i| batch(i + 1, i << 20, [noise(i, 3000), vec![b'a'; 5000]].concat()))
        .collect();
    // Down at once (9, 3, 1); up held (the frame has not carried enough).
    let got = decode_all(&mut receiver(), streamed(&msgs, &[9, 9, 3, 1, 1, 19])).unwrap();
    assert_eq!(got, msgs);
}

#[test]
fn a_higher_level_waits_for_the_frame_to_have_served_a_lower_one_is_taken_at_once() {
    let block = noise(5, 512 << 10);
    let big = vec![7u8; stream::LEVEL_UP_AFTER_BYTES as usize];
    let mut s = StreamCompressor::default();
    let mut chunks = Vec::new();
    let mut put = |s: &mut StreamCompressor, level: i32, data: &[u8]| {
        let mut out = Vec::new();
        s.compress(level, data, &mut out).unwrap();
        chunks.push((out, data.to_vec()));
        (s.level(), chunks.last().unwrap().0.len())
    };
    put(&mut s, 3, &block);
    // Up: held at 3, so the history stays and the repeat costs next to nothing.
    let (level, len) = put(&mut s, 9, &block);
    assert_eq!(level, Some(3));
    assert!(len < 4 << 10, "{len}");
    // Down: at once.
    assert_eq!(put(&mut s, 1, &block).0, Some(1));
    // Up again once the frame has carried enough, one step at a time.
    put(&mut s, 1, &big);
    assert_eq!(put(&mut s, 9, &block).0, Some(2));
    // And every chunk decodes, in order, to what went in.
    let mut d = stream::StreamDecompressor::new().unwrap();
    for (chunk, raw) in chunks {
        assert_eq!(d.decompress(&chunk, raw.len()).unwrap(), raw);
    }
}

#[test]
fn a_receiver_that_takes_no_stream_refuses_a_chunk() {
    let wire = streamed(&[batch(1, 0, vec![b'x'; 4096])], &[3]);
    let err = decode_all(&mut MessageCodec::default(), wire).unwrap_err();
    assert!(
        matches!(&err, Error::Invalid { field: "flags", .. }),
        "{err}"
    );
}

#[test]
fn a_missing_chunk_is_an_error_not_other_bytes() {
    let msgs: Vec<Message> = (0..3)
        .map(|i| batch(i + 1, 0, [noise(9, 2048), noise(i + 10, 2048)].concat()))
        .collect();
    let mut wire = streamed(&msgs, &[3]);
    // Drop the first frame: the second chunk has no stream to continue.
    let mut frames = frame::FrameCodec::default();
    frames.decode(&mut wire).unwrap().unwrap();
    let err = decode_all(&mut receiver(), wire).unwrap_err();
    assert!(matches!(err, Error::Decompress(_)), "{err}");
}

#[test]
fn a_middle_chunk_missing_is_caught_by_the_decoded_bytes_checksum() {
    // The third batch repeats the first's second half. Without the second chunk (noise,
    // which zstd stores as is), its reference lands as far back, in the first half: it
    // decodes to its declared length, but to other bytes.
    let (a, b, c) = (noise(3, 8192), noise(4, 8192), noise(5, 8192));
    let msgs = vec![
        batch(1, 0, [a.clone(), b.clone()].concat()),
        batch(2, 0, c),
        batch(3, 0, b),
    ];
    let mut wire = streamed(&msgs, &[3]);
    let mut frames = frame::FrameCodec::default();
    let first = frames.decode(&mut wire).unwrap().unwrap();
    frames.decode(&mut wire).unwrap().unwrap(); // the second chunk is lost
    let mut rest = BytesMut::from(&first.raw[..]);
    rest.extend_from_slice(&wire);
    let mut r = receiver();
    let err = decode_all(&mut r, rest).unwrap_err();
    assert!(
        matches!(&err, Error::Decompress(m) if m.contains("other bytes")),
        "{err}"
    );
}

/// Rewrites the first frame of `wire` with `raw_len` declared instead.
fn with_raw_len(wire: &BytesMut, delta: i64) -> BytesMut {
    let h = Header::parse(&wire[..HEADER_LEN]).unwrap();
    let payload = &wire[HEADER_LEN..HEADER_LEN + h.wire_len as usize];
    let mut out = BytesMut::new();
    let header = Header {
        raw_len: (i64::from(h.raw_len) + delta) as u32,
        ..h
    };
    put_frame(header, payload, &mut out).unwrap();
    out
}

#[test]
fn a_chunk_that_decodes_to_other_than_its_declared_length_is_refused() {
    let wire = streamed(&[batch(1, 0, vec![b'y'; 8192])], &[3]);
    for delta in [-1, 1, -4000] {
        let err = decode_all(&mut receiver(), with_raw_len(&wire, delta)).unwrap_err();
        assert!(matches!(err, Error::Decompress(_)), "{delta}: {err}");
    }
}

#[test]
fn a_stream_asking_for_a_larger_window_is_refused() {
    use zstd::zstd_safe::{CCtx, CParameter, InBuffer, OutBuffer};
    let payload = {
        let mut plain = MessageCodec::default();
        plain.set_version(version::STREAM_SINCE);
        let f = plain
            .encode_to_bytes(&batch(1, 0, vec![b'z'; 4096]))
            .unwrap();
        f[HEADER_LEN..f.len() - 4].to_vec()
    };
    let mut cctx = CCtx::create();
    cctx.set_parameter(CParameter::WindowLog(STREAM_WINDOW_LOG + 2))
        .unwrap();
    let mut chunk = Vec::with_capacity(1 << 16);
    chunk.extend_from_slice(&crc32c::crc32c(&payload).to_be_bytes());
    let mut input = InBuffer::around(&payload);
    cctx.compress_stream2(
        &mut OutBuffer::around_pos(&mut chunk, 4),
        &mut input,
        zstd::zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_flush,
    )
    .unwrap();
    assert!(!chunk.is_empty());
    let mut wire = BytesMut::new();
    let header = Header {
        version: version::STREAM_SINCE,
        msg_type: message::types::WRITE_BATCH,
        flags: FLAG_ZSTD_STREAM,
        wire_len: chunk.len() as u32,
        raw_len: payload.len() as u32,
    };
    put_frame(header, &chunk, &mut wire).unwrap();
    let err = decode_all(&mut receiver(), wire).unwrap_err();
    assert!(
        matches!(&err, Error::Decompress(m) if m.contains("memory") || m.contains("window")),
        "{err}"
    );
}

#[test]
fn stream_flags_in_an_old_version_or_with_the_frame_flag_are_refused() {
    for (version, flags) in [
        (version::STREAM_SINCE - 1, FLAG_ZSTD_STREAM),
        (version::STREAM_SINCE, FLAG_ZSTD_STREAM | FLAG_ZSTD),
    ] {
        let mut wire = BytesMut::new();
        let header = Header {
            version,
            msg_type: message::types::WRITE_BATCH,
            flags,
            wire_len: 4,
            raw_len: 100,
        };
        put_frame(header, &[0; 4], &mut wire).unwrap();
        let err = Header::parse(&wire[..HEADER_LEN]).unwrap_err();
        assert!(
            matches!(err, Error::Invalid { field: "flags", .. }),
            "{err}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Any sequence of batches (noise, repeats of earlier ones, zeros) at any levels
    /// decodes to itself.
    #[test]
    fn any_sequence_round_trips(
        parts in prop::collection::vec((0u8..3, 1usize..20_000, any::<u64>()), 1..12),
        levels in prop::collection::vec(1i32..12, 1..4),
    ) {
        let mut earlier: Vec<Vec<u8>> = Vec::new();
        let msgs: Vec<Message> = parts
            .iter()
            .enumerate()
            .map(|(i, &(kind, len, seed))| {
                let data = match kind {
                    0 => noise(seed, len),
                    1 if !earlier.is_empty() => earlier[seed as usize % earlier.len()].clone(),
                    _ => vec![(seed % 7) as u8; len],
                };
                earlier.push(data.clone());
                batch(i as u64 + 1, (i as u64) << 20, data)
            })
            .collect();
        let got = decode_all(&mut receiver(), streamed(&msgs, &levels)).unwrap();
        prop_assert_eq!(got, msgs);
    }
}
