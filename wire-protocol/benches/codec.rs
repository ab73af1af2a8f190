//! Codec throughput: encode+compress and decode+verify (frame CRCs, decompression, and the
//! blake3 digest of every extent, as the master target checks them), for 64 KiB and 1 MiB
//! extents of compressible (~2:1) and random data. Also prints the framing overhead.
//!
//! Run: `cargo bench -p wire-protocol --bench codec`

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wire_protocol::{digest, Compression, Message, MessageCodec, Write, WriteBatch};

/// Batches carry up to this much data, as the process server ships them.
const BATCH_BYTES: usize = 4 << 20;

/// Random bytes, with the second half of every 4 KiB block zeroed when `compressible`
/// (zstd then halves it).
fn data(len: usize, compressible: bool, seed: u64) -> Bytes {
    let mut v = vec![0u8; len];
    let mut xof = blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof();
    xof.fill(&mut v);
    if compressible {
        for block in v.chunks_mut(4096) {
            let half = block.len() / 2;
            block[half..].fill(0);
        }
    }
    Bytes::from(v)
}

fn batch(extent: usize, compressible: bool) -> Message {
    let writes = (0..BATCH_BYTES / extent)
        .map(|i| {
            let d = data(extent, compressible, i as u64);
            Write {
                timestamp_us: i as u64,
                offset: (i * extent) as u64,
                digest: digest(&d),
                data: d,
            }
        })
        .collect();
    Message::WriteBatch(WriteBatch {
        disk_id: 1,
        first_lsn: 1,
        writes,
    })
}

fn verify(msg: &Message) {
    let Message::WriteBatch(b) = msg else {
        panic!("not a batch")
    };
    for w in &b.writes {
        assert_eq!(digest(&w.data), w.digest, "extent digest");
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    g.sample_size(20);
    for extent in [64 << 10, 1 << 20] {
        for compressible in [true, false] {
            let msg = batch(extent, compressible);
            let label = format!(
                "{}KiB-{}",
                extent >> 10,
                if compressible { "2to1" } else { "random" }
            );
            g.throughput(Throughput::Bytes(BATCH_BYTES as u64));
            for (mode, comp) in [("raw", Compression::None), ("zstd1", Compression::Zstd(1))] {
                let mut enc = MessageCodec::new(comp);
                let mut out = BytesMut::new();
                g.bench_function(BenchmarkId::new(format!("encode-{mode}"), &label), |b| {
                    b.iter(|| {
                        out.clear();
                        enc.encode(&msg, &mut out).unwrap();
                    })
                });
                let frame = out.clone().freeze();
                let mut dec = MessageCodec::default();
                g.bench_function(
                    BenchmarkId::new(format!("decode-verify-{mode}"), &label),
                    |b| {
                        b.iter(|| {
                            let mut buf = BytesMut::from(&frame[..]);
                            let m = dec.decode(&mut buf).unwrap().unwrap();
                            verify(&m);
                        })
                    },
                );
                if mode == "raw" {
                    let overhead = frame.len() as f64 / BATCH_BYTES as f64 - 1.0;
                    println!(
                        "framing overhead {label}: {:.4}% of data bytes",
                        overhead * 100.0
                    );
                } else {
                    println!(
                        "zstd-1 ratio {label}: {:.2}:1",
                        BATCH_BYTES as f64 / frame.len() as f64
                    );
                }
            }
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
