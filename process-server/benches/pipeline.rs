//! The shipping pipeline (read a cached frame, decode, coalesce, compress, frame) in MB/s of
//! logical data, on 1 and 2 cores, for data that compresses about 2:1; and the cache's part
//! of a byte's way through the process server (append the received frames to a real cache
//! file, one fsync per 16, then read each back as the uplink does).
//!
//! Run: `cargo bench -p process-server --bench pipeline`

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rayon::prelude::*;
use wire_protocol::frame::FrameCodec;
use wire_protocol::{Compression, Message, MessageCodec, Write, WriteBatch};

const BATCHES: usize = 16;
const BATCH_BYTES: usize = 1 << 20;
const WRITE_BYTES: usize = 64 << 10;

/// Cached frames as an agent sends them: 1 MiB batches of 64 KiB writes, about 2:1.
fn frames() -> Vec<Bytes> {
    (0..BATCHES)
        .map(|b| {
            let writes = (0..BATCH_BYTES / WRITE_BYTES)
                .map(|i| {
                    let mut v = vec![0u8; WRITE_BYTES];
                    blake3::Hasher::new()
                        .update(&[b as u8, i as u8])
                        .finalize_xof()
                        .fill(&mut v);
                    for piece in v.chunks_mut(4096) {
                        piece[2048..].fill(0);
                    }
                    let data = Bytes::from(v);
                    Write {
                        timestamp_us: 0,
                        offset: ((b * 16 + i) * WRITE_BYTES) as u64,
                        digest: wire_protocol::digest(&data),
                        data,
                    }
                })
                .collect();
            let mut out = BytesMut::new();
            MessageCodec::default()
                .encode(
                    &Message::WriteBatch(WriteBatch {
                        disk_id: 1,
                        first_lsn: 1 + (b * 16) as u64,
                        writes,
                    }),
                    &mut out,
                )
                .unwrap();
            out.freeze()
        })
        .collect()
}

fn ship(frame: &Bytes, level: i32) -> usize {
    let mut buf = BytesMut::from(&frame[..]);
    let f = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
    let mut msg = MessageCodec::default().decode_frame(f).unwrap();
    if let Message::WriteBatch(b) = &mut msg {
        process_server::coalesce::coalesce(b);
    }
    let mut out = BytesMut::new();
    MessageCodec::new(Compression::Zstd(level))
        .encode(&msg, &mut out)
        .unwrap();
    out.len()
}

fn bench(c: &mut Criterion) {
    let frames = frames();
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Bytes((BATCHES * BATCH_BYTES) as u64))
        .sample_size(10);
    for level in [1, 3] {
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            g.bench_function(
                BenchmarkId::new(format!("zstd{level}"), format!("{threads}-cores")),
                |b| {
                    b.iter(|| {
                        pool.install(|| frames.par_iter().map(|f| ship(f, level)).sum::<usize>())
                    })
                },
            );
        }
        let wire: usize = frames.iter().map(|f| ship(f, level)).sum();
        println!(
            "zstd-{level}: {:.2}:1 on the wire",
            (BATCHES * BATCH_BYTES) as f64 / wire as f64
        );
    }
    g.finish();

    let mut g = c.benchmark_group("cache");
    g.throughput(Throughput::Bytes((BATCHES * BATCH_BYTES) as u64))
        .sample_size(10);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut cache = process_server::cache::DiskCache::open(dir.path(), 0).unwrap();
    let mut lsn = 0u64;
    g.bench_function("append-sync-read", |b| {
        b.iter(|| {
            let first = lsn + 1;
            for f in &frames {
                cache.append(lsn + 1, lsn + 16, 1, f).unwrap();
                lsn += 16;
            }
            cache.sync().unwrap();
            let mut read = 0;
            for e in cache.entries_from(first, BATCHES) {
                read += cache.reader(&e).unwrap().read().unwrap().payload.len();
            }
            cache.trim(lsn).unwrap();
            read
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
