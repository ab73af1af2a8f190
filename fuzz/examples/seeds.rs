//! Writes seed corpora for the fuzz targets: small, valid inputs of each format (cache and
//! journal segments built by the real writers, the repository's own traces, a descriptor
//! and frames from the real encoders), so mutations start past the checksums and reach the
//! code behind them. `cargo run --example seeds` from `fuzz/`; the corpora go to `corpus/`.

use std::path::Path;

use bytes::{Bytes, BytesMut};
use master_target::apply::{Applier, RetentionPolicy, Verdict};
use master_target::disk::DiskFile;
use master_target::journal::Journal;
use process_server::cache::DiskCache;
use wire_protocol::{digest, Message, MessageCodec, Write, WriteBatch};

fn batch(first_lsn: u64, writes: u64, len: usize) -> WriteBatch {
    WriteBatch {
        disk_id: 1,
        first_lsn,
        writes: (0..writes)
            .map(|i| {
                let data = Bytes::from(vec![(first_lsn + i) as u8; len]);
                Write {
                    timestamp_us: first_lsn + i,
                    offset: ((first_lsn + i) % 64) * 4096,
                    digest: digest(&data),
                    data,
                }
            })
            .collect(),
    }
}

fn frame(b: WriteBatch) -> Vec<u8> {
    let mut out = BytesMut::new();
    MessageCodec::default()
        .encode(&Message::WriteBatch(b), &mut out)
        .expect("encodes");
    out.to_vec()
}

/// `[split] ++ seg1 ++ seg2`, the layout the segment targets read.
fn two_segments(dir: &Path) -> Vec<u8> {
    let mut segs: Vec<_> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file())
        .collect();
    segs.sort();
    let a = segs.first().map(|p| std::fs::read(p).expect("read")).unwrap_or_default();
    let b = segs.get(1).map(|p| std::fs::read(p).expect("read")).unwrap_or_default();
    let total = (a.len() + b.len()).max(1);
    let mut out = vec![(a.len() * 255 / total) as u8];
    out.extend(a);
    out.extend(b);
    out
}

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    std::fs::write(dir.join(name), bytes).expect("seed");
}

fn main() {
    let tmp = tempfile::tempdir().expect("tempdir");

    // Cache: records of a few sizes, synced in two groups (sync marks between them).
    for (n, len) in [(4u64, 64usize), (12, 200)] {
        let dir = tmp.path().join(format!("cache-{n}"));
        std::fs::create_dir_all(&dir).expect("dir");
        let mut c = DiskCache::open(&dir, 0).expect("cache");
        for lsn in 1..=n {
            c.append(lsn, lsn, lsn, &frame(batch(lsn, 1, len))).expect("append");
            if lsn == n / 2 {
                c.sync().expect("sync");
            }
        }
        c.sync().expect("sync");
        drop(c);
        put("cache_segments", &format!("seed-{n}"), &two_segments(&dir));
    }

    // Journal: committed groups of undo records with points, over two small segments.
    for groups in [2u64, 5] {
        let dir = tmp.path().join(format!("journal-{groups}"));
        std::fs::create_dir_all(&dir).expect("dir");
        // One journal over zeros (UndoZeros records), one over data (undo records with it).
        let fill = if groups == 2 { 0u8 } else { 0x5a };
        std::fs::write(dir.join("disk.img"), vec![fill; 1 << 20]).expect("disk");
        let disk = DiskFile::open(&dir.join("disk.img")).expect("disk");
        let journal = Journal::open(&dir.join("journal"), &disk)
            .expect("journal")
            .with_segment_target_bytes(2048);
        let policy = RetentionPolicy {
            crash_point_interval_us: 1,
            window_us: u64::MAX / 2,
            quota_bytes: u64::MAX,
        };
        let mut a = Applier::new(1, disk, journal, policy);
        for g in 0..groups {
            let b = batch(1 + g * 3, 3, 128);
            let Verdict::Accept(items) = a.check_batch(&b, 1 + g * 3) else {
                panic!("a well-formed batch is accepted");
            };
            a.apply(&items).expect("apply");
        }
        drop(a);
        put(
            "journal_segments",
            &format!("seed-{groups}"),
            &two_segments(&dir.join("journal")),
        );
    }

    // Traces: the first lines of each kept trace, under each format's pick byte.
    let traces = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/traces");
    for (pick, file) in [
        (0u8, "tencent-cbs-50k.msr.csv"),
        (2, "tpcc-small.disksim"),
        (3, "cloudphysics-vm.vscsi.csv"),
    ] {
        let text = std::fs::read_to_string(traces.join(file)).expect("trace");
        let head: String = text.lines().take(40).flat_map(|l| [l, "\n"]).collect();
        let mut seed = vec![pick];
        seed.extend_from_slice(head.as_bytes());
        put("trace_formats", file, &seed);
    }
    let blk = "8,0    1        1     0.000000000  1234  Q  WS 2048 + 8 [fio]\n\
               8,0    1        2     0.000100000  1234  C  WS 2048 + 8 [0]\n";
    put("trace_formats", "blkparse", &[&[4u8][..], blk.as_bytes()].concat());
    let disksim = "0.000000 0 2048 8 0\n1.500000 0 4096 16 0\n";
    put("trace_formats", "disksim", &[&[1u8][..], disksim.as_bytes()].concat());

    // A descriptor as the master target writes it.
    let text = master_target::vmdk::descriptor_text("disk-flat.vmdk", 1 << 30, &[7; 16]);
    put("vmdk_descriptor", "created", text.as_bytes());

    // Frames: a batch, with the split byte in front for the decoder target.
    let f = frame(batch(1, 2, 100));
    put("frame_decoder", "batch", &[&[16u8][..], &f].concat());
    put("message_payload", "batch", &[&[0u8, 1, 0, 0][..], &f[16.min(f.len())..]].concat());
}
