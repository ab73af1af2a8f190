//! Properties of the codec: round trips, corruption detection, bounded input handling.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use wire_protocol::frame::{put_frame, Header, FLAG_ZSTD, HEADER_LEN, MAX_PAYLOAD_LEN};
use wire_protocol::message::{types, MAX_BATCH_DATA_LEN};
use wire_protocol::*;

fn arb_string() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 _.:/-]{0,40}"
}

fn arb_write() -> impl Strategy<Value = Write> {
    (
        any::<u64>(),
        0u64..(1 << 40),
        prop::collection::vec(any::<u8>(), 0..2048),
        any::<bool>(),
    )
        .prop_map(|(ts, offset, data, zeros)| {
            let data = if zeros { vec![0u8; data.len()] } else { data };
            Write {
                timestamp_us: ts,
                offset,
                digest: digest(&data),
                data: Bytes::from(data),
            }
        })
}

fn arb_message() -> impl Strategy<Value = Message> {
    let code = prop_oneof![
        Just(ErrorCode::VersionMismatch),
        Just(ErrorCode::DiskLimit),
        Just(ErrorCode::DigestMismatch),
        Just(ErrorCode::LsnGap),
        Just(ErrorCode::CacheFull),
    ];
    prop_oneof![
        (any::<u16>(), any::<u16>(), any::<u32>(), arb_string()).prop_map(|(a, b, c, n)| {
            Message::Hello(Hello {
                proto_min: a,
                proto_max: b,
                role: Role::Agent,
                capabilities: c,
                node_id: n,
            })
        }),
        (
            any::<u64>(),
            arb_string(),
            arb_string(),
            any::<[u8; 16]>(),
            any::<u64>(),
            any::<bool>(),
            arb_string(),
            any::<u64>(),
            arb_string()
        )
            .prop_map(
                |(id, vm, g, uuid, size, alt, t, rid, os)| Message::DiskAttach(DiskAttach {
                    disk_id: id,
                    vm_id: vm,
                    group_id: g,
                    disk_uuid: uuid,
                    size_bytes: size,
                    sector_size: 512,
                    location: if alt {
                        LocationKind::Alternate
                    } else {
                        LocationKind::Original
                    },
                    target: t,
                    request_id: rid,
                    os_type: os,
                })
            ),
        (
            any::<u64>(),
            1u64..(1 << 50),
            prop::collection::vec(arb_write(), 1..12)
        )
            .prop_map(|(d, lsn, writes)| Message::WriteBatch(WriteBatch {
                disk_id: d,
                first_lsn: lsn,
                writes
            })),
        (
            any::<u64>(),
            any::<u64>(),
            0u8..4,
            any::<u64>(),
            any::<u64>(),
            arb_string()
        )
            .prop_map(|(d, lsn, kind, t, g, tag)| Message::Bookmark(Bookmark {
                disk_id: d,
                lsn,
                kind: match kind {
                    0 => BookmarkKind::CrashConsistent,
                    1 => BookmarkKind::AppConsistent,
                    2 => BookmarkKind::ResyncStarted,
                    _ => BookmarkKind::ResyncCompleted,
                },
                time_us: t,
                group_marker: g,
                group_members: 0,
                tag,
            })),
        prop::collection::vec((any::<u64>(), any::<u64>()), 0..20).prop_map(|v| Message::Ack(
            Ack {
                entries: v
                    .into_iter()
                    .map(|(disk_id, durable_lsn)| AckEntry {
                        disk_id,
                        durable_lsn
                    })
                    .collect()
            }
        )),
        (
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
            any::<u64>()
        )
            .prop_map(|(d, bs, fb, n, rid)| {
                Message::DigestRequest(DigestRequest {
                    disk_id: d,
                    block_size: bs,
                    first_block: fb,
                    block_count: n,
                    request_id: rid,
                })
            }),
        (
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            prop::collection::vec(any::<[u8; 32]>(), 0..50),
            any::<u64>()
        )
            .prop_map(|(d, bs, fb, digests, rid)| Message::DigestList(DigestList {
                disk_id: d,
                block_size: bs,
                first_block: fb,
                digests,
                request_id: rid,
            })),
        (any::<u64>(), any::<u64>()).prop_map(|(seq, time_us)| Message::Heartbeat { seq, time_us }),
        (code.clone(), any::<u64>(), arb_string(), any::<u64>()).prop_map(|(code, d, m, rid)| {
            Message::Error(ErrorMsg {
                code,
                disk_id: d,
                message: m,
                request_id: rid,
            })
        }),
        (any::<u64>(), any::<u64>(), code, arb_string()).prop_map(|(d, l, code, r)| Message::Nack(
            Nack {
                disk_id: d,
                from_lsn: l,
                code,
                reason: r
            }
        )),
        any::<u64>().prop_map(|d| Message::Detach { disk_id: d }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(disk_id, lsn)| Message::RemoteDurable { disk_id, lsn }),
        (
            1u8..=7,
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u8>(),
            any::<u64>(),
            arb_string()
        )
            .prop_map(|(p, disk_id, cut_id, lsn, flags, hold_us, tag)| {
                let phase = [
                    CutPhase::Hold,
                    CutPhase::Held,
                    CutPhase::Mark,
                    CutPhase::Release,
                    CutPhase::Marked,
                    CutPhase::Refused,
                    CutPhase::Released,
                ][p as usize - 1];
                Message::Cut(Cut {
                    phase,
                    disk_id,
                    cut_id,
                    lsn,
                    flags,
                    hold_us,
                    tag,
                })
            }),
    ]
}

fn arb_compression() -> impl Strategy<Value = Compression> {
    prop_oneof![
        Just(Compression::None),
        (1i32..6).prop_map(Compression::Zstd)
    ]
}

/// Encodes in the newest version (every field on the wire).
fn encode(msg: &Message, c: Compression) -> BytesMut {
    encode_in(version::PROTOCOL_VERSION_MAX, msg, c)
}

fn encode_in(v: u16, msg: &Message, c: Compression) -> BytesMut {
    let mut out = BytesMut::new();
    let mut codec = MessageCodec::new(c);
    codec.set_version(v);
    codec.encode(msg, &mut out).expect("encodes");
    out
}

/// Decodes everything in `buf`, then EOF; returns messages or the first error.
fn decode_all(mut buf: BytesMut) -> Result<Vec<Message>> {
    let mut codec = MessageCodec::default();
    let mut out = Vec::new();
    for _ in 0..10_000 {
        match codec.decode_eof(&mut buf)? {
            Some(m) => out.push(m),
            None => return Ok(out),
        }
    }
    panic!("decoder did not finish in 10000 steps");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_message_round_trips(msg in arb_message(), c in arb_compression()) {
        let bytes = encode(&msg, c);
        prop_assert_eq!(decode_all(bytes).unwrap(), vec![msg]);
    }

    /// A version-1 peer gets the version-1 layout: everything but the request id, which
    /// reads back as 0; and every version decodes what it encodes.
    #[test]
    fn every_version_round_trips(msg in arb_message(), c in arb_compression()) {
        for v in version::PROTOCOL_VERSION_MIN..=version::PROTOCOL_VERSION_MAX {
            let mut want = msg.clone();
            if v < version::REQUEST_IDS_SINCE {
                want.set_request_id(0);
            }
            if v < version::GROUPS_SINCE {
                match &mut want {
                    Message::DiskAttach(a) => a.os_type.clear(),
                    Message::Bookmark(b) => b.group_members = 0,
                    _ => {}
                }
                if matches!(msg, Message::Cut(_)) {
                    // Never sent to an older peer: encoding it is refused.
                    let mut codec = MessageCodec::new(c);
                    codec.set_version(v);
                    prop_assert!(codec.encode(&msg, &mut BytesMut::new()).is_err());
                    continue;
                }
            }
            prop_assert_eq!(decode_all(encode_in(v, &msg, c)).unwrap(), vec![want]);
        }
    }

    #[test]
    fn split_at_every_byte_decodes_the_same(msg in arb_message(), c in arb_compression()) {
        let bytes = encode(&msg, c).freeze();
        // Feed the frame in two pieces split at every position, as a socket might.
        for cut in 0..=bytes.len() {
            let mut codec = MessageCodec::default();
            let mut buf = BytesMut::from(&bytes[..cut]);
            let first = codec.decode(&mut buf).unwrap();
            if cut < bytes.len() {
                prop_assert!(first.is_none());
                buf.put_slice(&bytes[cut..]);
                prop_assert_eq!(codec.decode(&mut buf).unwrap(), Some(msg.clone()));
            } else {
                prop_assert_eq!(first, Some(msg.clone()));
            }
            prop_assert!(buf.is_empty());
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected(msg in arb_message(), c in arb_compression()) {
        let bytes = encode(&msg, c);
        for bit in 0..bytes.len() * 8 {
            let mut bad = bytes.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode_all(bad).is_err(), "flip of bit {} went undetected", bit);
        }
    }

    #[test]
    fn truncation_is_a_typed_error(msg in arb_message(), c in arb_compression()) {
        let bytes = encode(&msg, c);
        for len in 1..bytes.len() {
            let err = decode_all(BytesMut::from(&bytes[..len])).unwrap_err();
            prop_assert!(matches!(err, Error::UnexpectedEof { .. }), "{:?}", err);
        }
    }

    #[test]
    fn garbage_never_panics(data in prop::collection::vec(any::<u8>(), 0..4096)) {
        let _ = decode_all(BytesMut::from(&data[..]));
    }

    #[test]
    fn garbage_with_a_valid_header_never_panics(
        msg_type in 1u16..12, payload in prop::collection::vec(any::<u8>(), 0..512), zstd in any::<bool>()
    ) {
        // Valid framing around hostile payloads reaches the message parser and the
        // decompressor; both must answer with errors, not panics.
        let mut buf = BytesMut::new();
        let header = Header {
            version: 1,
            msg_type,
            flags: if zstd { FLAG_ZSTD } else { 0 },
            wire_len: payload.len() as u32,
            raw_len: if zstd { 4096 } else { payload.len() as u32 },
        };
        put_frame(header, &payload, &mut buf).unwrap();
        let _ = decode_all(buf);
    }
}

#[test]
fn oversized_declared_length_fails_before_buffering() {
    let mut buf = BytesMut::new();
    let header = Header {
        version: 1,
        msg_type: types::WRITE_BATCH,
        flags: 0,
        wire_len: (MAX_PAYLOAD_LEN + 1) as u32,
        raw_len: (MAX_PAYLOAD_LEN + 1) as u32,
    };
    header.put(&mut buf);
    let mut codec = MessageCodec::default();
    let err = codec.decode(&mut buf).unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err:?}");
    assert!(
        buf.capacity() < 1 << 20,
        "the buffer did not grow toward the declared length"
    );
}

#[test]
fn zip_bomb_is_an_error_not_an_allocation() {
    // 16 MiB of zeros compresses to a few hundred bytes; declare a raw length of 1 KiB.
    let bomb = zstd::bulk::compress(&vec![0u8; MAX_PAYLOAD_LEN], 3).unwrap();
    let mut buf = BytesMut::new();
    let header = Header {
        version: 1,
        msg_type: types::WRITE_BATCH,
        flags: FLAG_ZSTD,
        wire_len: bomb.len() as u32,
        raw_len: 1024,
    };
    put_frame(header, &bomb, &mut buf).unwrap();
    let err = decode_all(buf).unwrap_err();
    assert!(matches!(err, Error::Decompress(_)), "{err:?}");
}

#[test]
fn nonzero_reserved_bytes_are_refused() {
    let mut buf = encode(
        &Message::Heartbeat { seq: 1, time_us: 2 },
        Compression::None,
    );
    buf[10] = 1; // reserved
    let crc = crc32c::crc32c(&buf[..HEADER_LEN - 4]);
    buf[HEADER_LEN - 4..HEADER_LEN].copy_from_slice(&crc.to_be_bytes());
    let err = decode_all(buf).unwrap_err();
    assert!(matches!(err, Error::ReservedNotZero { .. }), "{err:?}");
}

#[test]
fn unknown_types_are_errors_unless_ignorable() {
    for (t, ignorable) in [(200u16, false), (0x8fff, true)] {
        let mut buf = BytesMut::new();
        let header = Header {
            version: 1,
            msg_type: t,
            flags: 0,
            wire_len: 0,
            raw_len: 0,
        };
        put_frame(header, &[], &mut buf).unwrap();
        let r = decode_all(buf);
        if ignorable {
            assert_eq!(r.unwrap(), vec![Message::Ignored { msg_type: t }]);
        } else {
            assert!(matches!(r.unwrap_err(), Error::UnknownMessage(200)));
        }
    }
}

#[test]
fn compression_is_used_only_when_it_pays() {
    // Not zeros: from version 4 those cross as their length, with nothing to compress.
    let repeated = Bytes::from(vec![7u8; 64 << 10]);
    let mut random = vec![0u8; 64 << 10];
    blake3::Hasher::new().finalize_xof().fill(&mut random);
    for (data, expect_compressed) in [(repeated, true), (Bytes::from(random), false)] {
        let msg = Message::WriteBatch(WriteBatch {
            disk_id: 1,
            first_lsn: 1,
            writes: vec![Write {
                timestamp_us: 0,
                offset: 0,
                digest: digest(&data),
                data,
            }],
        });
        let bytes = encode(&msg, Compression::Zstd(3));
        let header = Header::parse(&bytes[..HEADER_LEN]).unwrap();
        assert_eq!(header.flags & FLAG_ZSTD != 0, expect_compressed);
        assert_eq!(decode_all(bytes).unwrap(), vec![msg]);
    }
}

#[test]
fn batch_data_limit_is_enforced_on_encode() {
    let data = Bytes::from(vec![1u8; MAX_BATCH_DATA_LEN / 2 + 1]);
    let w = Write {
        timestamp_us: 0,
        offset: 0,
        digest: digest(&data),
        data,
    };
    let msg = Message::WriteBatch(WriteBatch {
        disk_id: 1,
        first_lsn: 1,
        writes: vec![w.clone(), w],
    });
    // A refused message leaves nothing behind in the buffer (frames before it stay whole).
    let mut out = BytesMut::from(&b"earlier frames"[..]);
    let err = MessageCodec::default().encode(&msg, &mut out).unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err:?}");
    assert_eq!(&out[..], b"earlier frames");
}

#[test]
fn received_block_data_is_zero_copy() {
    let data = Bytes::from(vec![7u8; 4096]);
    let msg = Message::WriteBatch(WriteBatch {
        disk_id: 1,
        first_lsn: 1,
        writes: vec![Write {
            timestamp_us: 0,
            offset: 0,
            digest: digest(&data),
            data,
        }],
    });
    let mut buf = encode(&msg, Compression::None);
    let range = buf.as_ptr_range();
    let Some(Message::WriteBatch(b)) = MessageCodec::default().decode(&mut buf).unwrap() else {
        panic!("not a batch")
    };
    let p = b.writes[0].data.as_ptr();
    assert!(
        range.contains(&p),
        "write data points into the receive buffer"
    );
}

/// Version 1's layouts are frozen (peers of that version are still out there): a digest
/// request is its 24 bytes there, and version 2 appends only the request id.
#[test]
fn version_1_layout_is_frozen_and_version_2_appends_the_request_id() {
    let req = Message::DigestRequest(DigestRequest {
        disk_id: 0x0102_0304_0506_0708,
        block_size: 65536,
        first_block: 9,
        block_count: 16,
        request_id: 0xabcd,
    });
    let mut v1 = BytesMut::new();
    req.encode_payload(1, &mut v1).unwrap();
    let mut want = Vec::new();
    want.extend_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
    want.extend_from_slice(&65536u32.to_be_bytes());
    want.extend_from_slice(&9u64.to_be_bytes());
    want.extend_from_slice(&16u32.to_be_bytes());
    assert_eq!(&v1[..], &want[..]);
    let mut v2 = BytesMut::new();
    req.encode_payload(2, &mut v2).unwrap();
    want.extend_from_slice(&0xabcdu64.to_be_bytes());
    assert_eq!(&v2[..], &want[..]);
    // A version-1 payload read as version 2 is short, and the reverse has trailing bytes.
    assert!(Message::decode_payload(2, types::DIGEST_REQUEST, v1.freeze()).is_err());
    assert!(Message::decode_payload(1, types::DIGEST_REQUEST, v2.freeze()).is_err());
}

/// A batch of one 1 MiB write of zeros and one 4 KiB write of data.
fn zeros_and_data() -> Message {
    let zeros = Bytes::from(vec![0u8; 1 << 20]);
    let data = Bytes::from(vec![7u8; 4096]);
    Message::WriteBatch(WriteBatch {
        disk_id: 1,
        first_lsn: 1,
        writes: vec![
            Write {
                timestamp_us: 1,
                offset: 0,
                digest: digest(&zeros),
                data: zeros,
            },
            Write {
                timestamp_us: 2,
                offset: 1 << 20,
                digest: digest(&data),
                data,
            },
        ],
    })
}

/// From version 4 a write of zeros crosses as its length alone; before, as its bytes. Both
/// decode to the same writes.
#[test]
fn a_write_of_zeros_is_sent_as_its_length_from_version_4() {
    let msg = zeros_and_data();
    let v4 = encode_in(version::ZERO_EXTENTS_SINCE, &msg, Compression::None);
    let v3 = encode_in(version::ZERO_EXTENTS_SINCE - 1, &msg, Compression::None);
    assert!(
        v4.len() < 4096 + 1024,
        "zeros are not on the wire: {}",
        v4.len()
    );
    assert!(
        v3.len() > 1 << 20,
        "an older peer gets the bytes: {}",
        v3.len()
    );
    assert_eq!(decode_all(v4).unwrap(), vec![msg.clone()]);
    assert_eq!(decode_all(v3).unwrap(), vec![msg]);
}

/// The zero-extent bit means nothing before version 4 (there it is a length past the batch
/// limit), and from version 4 zero extents count toward the batch limit like data: a peer
/// cannot make a decoder hand out more zeros than a batch may carry.
#[test]
fn zero_extents_are_bounded_and_refused_before_version_4() {
    let frame = |v: u16, lens: &[u32]| {
        let mut p = BytesMut::new();
        p.put_u64(1);
        p.put_u64(1);
        p.put_u32(lens.len() as u32);
        for &len in lens {
            p.put_u64(0);
            p.put_u64(0);
            p.put_u32(len | message::ZERO_EXTENT);
            p.put_slice(&[0u8; 32]);
        }
        let mut out = BytesMut::new();
        let header = Header {
            version: v,
            msg_type: types::WRITE_BATCH,
            flags: 0,
            wire_len: p.len() as u32,
            raw_len: p.len() as u32,
        };
        put_frame(header, &p, &mut out).unwrap();
        out
    };
    let half = (MAX_BATCH_DATA_LEN / 2) as u32;
    let v4 = version::ZERO_EXTENTS_SINCE;
    let ok = decode_all(frame(v4, &[half, half])).unwrap();
    let Message::WriteBatch(b) = &ok[0] else {
        panic!("{ok:?}")
    };
    assert_eq!(b.data_len(), MAX_BATCH_DATA_LEN);
    assert!(b.writes.iter().all(|w| w.data.iter().all(|&x| x == 0)));
    let over = decode_all(frame(v4, &[half, half, 1])).unwrap_err();
    assert!(matches!(over, Error::TooLarge { .. }), "{over}");
    let old = decode_all(frame(v4 - 1, &[4096])).unwrap_err();
    assert!(matches!(old, Error::TooLarge { .. }), "{old}");
}

/// A decoded zero extent's digest is checked like any write's (without hashing its zeros
/// again each time): the right one matches, a wrong one does not, and data that merely is
/// zeros (not decoded from an extent) is hashed as ever.
#[test]
fn a_zero_extents_digest_is_checked() {
    let msg = zeros_and_data();
    let Message::WriteBatch(mut b) = decode_all(encode_in(
        version::ZERO_EXTENTS_SINCE,
        &msg,
        Compression::None,
    ))
    .unwrap()
    .remove(0) else {
        panic!("a batch")
    };
    for _ in 0..2 {
        assert!(b.writes.iter().all(digest_matches), "right digests");
    }
    b.writes[0].digest[0] ^= 1;
    assert!(!digest_matches(&b.writes[0]), "a wrong digest of zeros");
    let mut own = b.writes[0].clone();
    own.data = Bytes::from(vec![0u8; own.data.len()]);
    assert!(!digest_matches(&own));
    own.digest = digest(&own.data);
    assert!(digest_matches(&own));
    let mut short = b.writes[0].clone();
    short.data = short.data.slice(..4096);
    short.digest = digest(&[0u8; 4096]);
    assert!(digest_matches(&short), "a slice of an extent is zeros too");
}
