//! Arbitrary bytes as a trace file in each format (the first byte picks it): the sniffing
//! check and the reader must answer with writes or typed errors, never panic, and every
//! write they yield must be within the documented bounds.
#![no_main]

use agent::trace::{check, Format, TraceReader, MAX_WRITE_BYTES};
use libfuzzer_sys::fuzz_target;

const FORMATS: [Format; 5] = [
    Format::Msr,
    Format::Disksim,
    Format::DisksimNs,
    Format::Vscsi,
    Format::Blkparse,
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, text)) = data.split_first() else { return };
    let format = FORMATS[usize::from(pick) % FORMATS.len()];
    let skip_bad = pick & 0x80 != 0;
    let path = failback_fuzz::scratch().join("trace");
    std::fs::write(&path, text).unwrap();
    let _ = check(&path, format, skip_bad);
    let Ok(reader) = TraceReader::open(&path, format, skip_bad) else { return };
    // Bounded: a line is at least one byte.
    for w in reader.take(text.len() + 1) {
        if let Ok(w) = w {
            assert!(w.len <= MAX_WRITE_BYTES, "{w:?}");
        }
    }
});
