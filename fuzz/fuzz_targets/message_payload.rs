//! Arbitrary payloads behind valid frame headers and CRCs, raw or flagged as zstd: the
//! message parser and the bounded decompressor must answer with messages or typed errors.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use wire_protocol::frame::{put_frame, Header, FLAG_ZSTD};
use wire_protocol::MessageCodec;

fuzz_target!(|data: &[u8]| {
    let Some((head, payload)) = data.split_at_checked(4) else { return };
    let msg_type = u16::from_be_bytes([head[0], head[1] & 0x0f]) % 16;
    let zstd = head[2] & 1 == 1;
    let raw_len = if zstd { u32::from(head[3]) * 256 } else { payload.len() as u32 };
    let header = Header { version: 1, msg_type, flags: if zstd { FLAG_ZSTD } else { 0 }, wire_len: payload.len() as u32, raw_len };
    let mut buf = BytesMut::new();
    if put_frame(header, payload, &mut buf).is_err() {
        return;
    }
    let _ = MessageCodec::default().decode(&mut buf);
});
