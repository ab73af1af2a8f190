//! Feeds arbitrary bytes, in arbitrary splits, to the message decoder: it must return
//! messages or typed errors, never panic, and never allocate beyond its limits.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use wire_protocol::MessageCodec;

fuzz_target!(|data: &[u8]| {
    // The first byte picks a split size so the fuzzer also explores partial reads.
    let Some((&split, rest)) = data.split_first() else { return };
    let step = usize::from(split).max(1);
    let mut codec = MessageCodec::default();
    let mut buf = BytesMut::new();
    for chunk in rest.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = codec.decode_eof(&mut buf);
});
