//! Codec throughput: encode+compress and decode+verify (frame CRCs, decompression, and the
//! blake3 digest of every extent, as the master target checks them), for 64 KiB and 1 MiB
//! extents of compressible (~2:1) and random data; and compression into the link's zstd
//! stream (protocol 5). Also prints the framing overhead.
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
    batch_from(extent, compressible, 0)
}

/// A batch whose extents' data is seeded from `seed`, `seed + 1`, ...
fn batch_from(extent: usize, compressible: bool, seed: u64) -> Message {
    let writes = (0..BATCH_BYTES / extent)
        .map(|i| {
            let d = data(extent, compressible, seed + i as u64);
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

/// Batches a stream bench cycles through: 64 MiB of distinct data, twice the stream's
/// window, so no batch is found whole in the history (which would flatter the stream).
const STREAM_BATCHES: u64 = 16;

/// Compressing into the link's zstd stream (protocol 5) at level 2, as a link-bound process
/// server does: one core, batch after batch of distinct data.
fn stream(c: &mut Criterion) {
    use wire_protocol::codec::stream_frames;
    use wire_protocol::stream::StreamCompressor;
    let mut g = c.benchmark_group("codec");
    g.sample_size(10);
    for compressible in [true, false] {
        let mut plain = MessageCodec::default();
        plain.set_version(wire_protocol::version::STREAM_SINCE);
        let frames: Vec<Bytes> = (0..STREAM_BATCHES)
            .map(|i| {
                let msg = batch_from(1 << 20, compressible, i * 1000);
                plain.encode_to_bytes(&msg).unwrap()
            })
            .collect();
        let label = format!("1024KiB-{}", if compressible { "2to1" } else { "random" });
        g.throughput(Throughput::Bytes(BATCH_BYTES as u64));
        let mut s = StreamCompressor::default();
        let mut out = BytesMut::new();
        let mut next = 0;
        g.bench_function(BenchmarkId::new("encode-stream2", &label), |b| {
            b.iter(|| {
                out.clear();
                stream_frames(&mut s, 2, &frames[next % frames.len()], &mut out).unwrap();
                next += 1;
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench, stream);
criterion_main!(benches);
