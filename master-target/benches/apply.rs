//! Journal + apply throughput beside a plain sequential write (pwrite + fdatasync) of the
//! same bytes to the same disk, with 1 MiB batches of 64 KiB writes.
//!
//! Two situations: **overwrite**, a disk already full of data (every write's old bytes go
//! to the journal), and **new disk**, a first replication onto a fresh sparse disk (the old
//! bytes are zeros: undo records without data).
//!
//! Beside them, the floor of any undo journal over data that does not compress: the same
//! bytes written twice (a journal append and the disk write), each made durable, and
//! nothing else.
//!
//! Beside them, groups of 4,096 small writes (4 KiB) scattered over the disk and over a hot
//! 4 MiB region, where most rewrite a block the group already wrote.
//!
//! Run: `cargo bench -p master-target --bench apply`. Prints the ratios at the end.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use master_target::apply::{Applier, RetentionPolicy, Verdict};
use master_target::disk::DiskFile;
use master_target::journal::Journal;
use master_target::uring::{IoBackend, IoChoice};
use wire_protocol::{Write, WriteBatch};

const DISK_BYTES: u64 = 1 << 30;
const BATCH_BYTES: usize = 1 << 20;
const WRITE_BYTES: usize = 64 << 10;

fn data() -> Bytes {
    let mut v = vec![0u8; WRITE_BYTES];
    blake3::Hasher::new().finalize_xof().fill(&mut v);
    Bytes::from(v)
}

struct Plain {
    f: File,
    pos: u64,
}

impl Plain {
    fn batch(&mut self, d: &Bytes) {
        self.group(d, 1);
    }

    fn group(&mut self, d: &Bytes, n: usize) {
        for _ in 0..n * BATCH_BYTES / WRITE_BYTES {
            self.f.write_all_at(d, self.pos).unwrap();
            self.pos = (self.pos + WRITE_BYTES as u64) % DISK_BYTES;
        }
        self.f.sync_data().unwrap();
    }
}

/// The least an undo journal can do per batch when the old bytes do not compress: the
/// batch's size appended to a journal file (the old bytes) and the batch written to the
/// disk, each made durable. Nothing read, hashed or checked: the bound the journal's
/// design can approach, not pass, on this device.
struct Twice {
    journal: File,
    journal_pos: u64,
    disk: Plain,
    /// The journal file was written whole once and is overwritten in place (no block
    /// allocation or size change for fdatasync to make durable), not appended to.
    preallocated: bool,
}

impl Twice {
    fn new(dir: &std::path::Path, preallocated: bool) -> Twice {
        let name = if preallocated { "twice-pre" } else { "twice" };
        // Filled with data first, as the journaled disks are: overwrites, not holes.
        let disk = OpenOptions::new()
            .read(true)
            .write(true)
            .open(filled(dir, &format!("{name}.img")))
            .unwrap();
        let journal = create(&dir.join(format!("{name}-journal")));
        if preallocated {
            let z = vec![0u8; 8 << 20];
            for off in (0..master_target::journal::SEGMENT_TARGET_BYTES).step_by(z.len()) {
                journal.write_all_at(&z, off).unwrap();
            }
            journal.sync_all().unwrap();
        }
        Twice {
            journal,
            journal_pos: 0,
            disk: Plain { f: disk, pos: 0 },
            preallocated,
        }
    }

    fn batch(&mut self, d: &Bytes) {
        for _ in 0..BATCH_BYTES / WRITE_BYTES {
            self.journal.write_all_at(d, self.journal_pos).unwrap();
            self.journal_pos += WRITE_BYTES as u64;
        }
        self.journal.sync_data().unwrap();
        // A journal segment's size (`SEGMENT_TARGET_BYTES`): then a fresh file, as segments are.
        if self.journal_pos >= master_target::journal::SEGMENT_TARGET_BYTES {
            if !self.preallocated {
                self.journal.set_len(0).unwrap();
            }
            self.journal_pos = 0;
        }
        self.disk.batch(d);
    }
}

struct Journaled {
    a: Applier,
    pos: u64,
}

impl Journaled {
    fn batch(&mut self, d: &Bytes) {
        self.group(d, 1);
    }

    /// `n` 1 MiB batches applied as one group, as the service does when batches queue up.
    fn group(&mut self, d: &Bytes, n: usize) {
        let next = self.a.committed_lsn() + 1;
        // Each pass over the disk writes other bytes: the same ones again would find the
        // disk holding them, and an unchanged write is neither journaled nor written.
        let pass = self.pos / DISK_BYTES;
        let d = &{
            let mut v = d.to_vec();
            v[..8]
                .iter_mut()
                .zip(pass.to_le_bytes())
                .for_each(|(b, p)| *b ^= p);
            Bytes::from(v)
        };
        // The sender's digest, made once (the applier verifies every write's).
        let digest = wire_protocol::digest(d);
        let writes = (0..n * BATCH_BYTES / WRITE_BYTES)
            .map(|i| Write {
                timestamp_us: next + i as u64,
                offset: (self.pos + (i * WRITE_BYTES) as u64) % DISK_BYTES,
                digest,
                data: d.clone(),
            })
            .collect();
        // Counted on (not wrapped): the pass is `pos / DISK_BYTES`.
        self.pos += (n * BATCH_BYTES) as u64;
        let Verdict::Accept(items) = self.a.check_batch(
            &WriteBatch {
                disk_id: 1,
                first_lsn: next,
                writes,
            },
            next,
        ) else {
            panic!("refused")
        };
        self.a.apply(&items).unwrap();
    }
}

impl Journaled {
    /// One group of `writes` 4 KiB writes (slices of `d`) at pseudo-random 4 KiB-aligned
    /// offsets within the first `region_bytes` of the disk: small scattered writes, as a
    /// block trace's, that overlap each other more as the region shrinks.
    fn scattered(&mut self, d: &Bytes, writes: usize, region_bytes: u64) {
        const SMALL: usize = 4096;
        let next = self.a.committed_lsn() + 1;
        let blocks = region_bytes / SMALL as u64;
        let mut x = next.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut writes: Vec<Write> = (0..writes)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (i % (d.len() / SMALL)) * SMALL;
                let data = d.slice(at..at + SMALL);
                Write {
                    timestamp_us: next + i as u64,
                    offset: (x % blocks) * SMALL as u64,
                    digest: wire_protocol::digest(&data),
                    data,
                }
            })
            .collect();
        // In batches the wire could carry (8 MiB of data each), applied as one group.
        let mut items = Vec::new();
        let per_batch = wire_protocol::message::MAX_BATCH_DATA_LEN / SMALL;
        while !writes.is_empty() {
            let rest = writes.split_off(writes.len().min(per_batch));
            let first_lsn = next + items.len() as u64;
            let b = WriteBatch {
                disk_id: 1,
                first_lsn,
                writes: std::mem::replace(&mut writes, rest),
            };
            let Verdict::Accept(more) = self.a.check_batch(&b, first_lsn) else {
                panic!("refused")
            };
            items.extend(more);
        }
        self.a.apply(&items).unwrap();
    }
}

/// A new empty file, open for reading and writing.
fn create(p: &std::path::Path) -> File {
    OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(p)
        .unwrap()
}

/// A disk of `DISK_BYTES` full of data. Warmed: the first pass over a fresh file is
/// several times slower here, and overwritten zeros would journal no data.
fn filled(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    let f = create(&p);
    let z = vec![0x5au8; 8 << 20];
    for off in (0..DISK_BYTES).step_by(z.len()) {
        f.write_all_at(&z, off).unwrap();
    }
    f.sync_all().unwrap();
    p
}

fn setup(dir: &std::path::Path) -> (Plain, Journaled, Journaled) {
    let mk = |name: &str| filled(dir, name);
    let plain = Plain {
        f: OpenOptions::new()
            .read(true)
            .write(true)
            .open(mk("plain.img"))
            .unwrap(),
        pos: 0,
    };
    let policy = policy();
    let applier = |name: &str, io: IoChoice| {
        let disk = DiskFile::open(&mk(&format!("{name}.img"))).unwrap();
        let journal = Journal::open(&dir.join(format!("{name}-journal")), &disk).unwrap();
        let (io, why) = IoBackend::new(io).unwrap();
        println!("{name}: {} ({why})", io.name());
        Journaled {
            a: Applier::new(1, disk, journal, policy).with_io(io),
            pos: 0,
        }
    };
    (
        plain,
        applier("syscall", IoChoice::Syscall),
        applier("uring", IoChoice::Auto),
    )
}

/// Plain and journaled applies of `bytes` onto fresh sparse disks (a first replication),
/// interleaved: seconds of each.
fn new_disk(dir: &std::path::Path, d: &Bytes, bytes: u64) -> (Duration, Duration) {
    let fresh = |name: &str| {
        let p = dir.join(name);
        let f = create(&p);
        f.set_len(DISK_BYTES).unwrap();
        (p, f)
    };
    let (_, f) = fresh("new-plain.img");
    let mut plain = Plain { f, pos: 0 };
    let (p, _) = fresh("new-journaled.img");
    let disk = DiskFile::open(&p).unwrap();
    let journal = Journal::open(&dir.join("new-journal"), &disk).unwrap();
    let (io, _) = IoBackend::new(IoChoice::Auto).unwrap();
    let mut journaled = Journaled {
        a: Applier::new(1, disk, journal, policy()).with_io(io),
        pos: 0,
    };
    let (mut tp, mut tj) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..bytes / (16 * BATCH_BYTES as u64) {
        let t = Instant::now();
        for _ in 0..16 {
            plain.batch(d);
        }
        tp += t.elapsed();
        let t = Instant::now();
        for _ in 0..16 {
            journaled.batch(d);
        }
        tj += t.elapsed();
    }
    (tp, tj)
}

fn policy() -> RetentionPolicy {
    RetentionPolicy {
        crash_point_interval_us: 5_000_000,
        window_us: 86_400_000_000,
        quota_bytes: 2 << 30,
    }
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (mut plain, mut journaled, mut uring) = setup(dir.path());
    let d = data();
    let mut g = c.benchmark_group("apply");
    g.throughput(Throughput::Bytes(BATCH_BYTES as u64))
        .sample_size(30)
        .measurement_time(Duration::from_secs(8));
    g.bench_function("plain-write-fdatasync-1MiB", |b| b.iter(|| plain.batch(&d)));
    g.bench_function("journal-apply-syscall-1MiB", |b| {
        b.iter(|| journaled.batch(&d))
    });
    g.bench_function("journal-apply-io_uring-1MiB", |b| {
        b.iter(|| uring.batch(&d))
    });
    g.throughput(Throughput::Bytes(16 * BATCH_BYTES as u64));
    g.bench_function("plain-write-fdatasync-16x1MiB", |b| {
        b.iter(|| plain.group(&d, 16))
    });
    g.bench_function("journal-apply-io_uring-16x1MiB-group", |b| {
        b.iter(|| uring.group(&d, 16))
    });
    // 4,096 writes of 4 KiB in one group: spread over the whole disk (few overlap), and
    // over 4 MiB (most rewrite a block the group wrote already, as a hot region does).
    g.throughput(Throughput::Bytes(4096 * 4096));
    g.bench_function("journal-apply-io_uring-4096x4KiB-scattered-group", |b| {
        b.iter(|| uring.scattered(&d, 4096, DISK_BYTES))
    });
    g.bench_function("journal-apply-io_uring-4096x4KiB-hot-4MiB-group", |b| {
        b.iter(|| uring.scattered(&d, 4096, 4 << 20))
    });
    g.finish();
    // The ratios, measured interleaved so all four see the same disk conditions.
    let mut twice = Twice::new(dir.path(), false);
    let mut twice_pre = Twice::new(dir.path(), true);
    let (mut tp, mut tj, mut tu) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let (mut tt, mut ttp) = (Duration::ZERO, Duration::ZERO);
    // 32 batches of one kind, timed.
    let timed = |mut batch: Box<dyn FnMut() + '_>| {
        let t = Instant::now();
        for _ in 0..32 {
            batch();
        }
        t.elapsed()
    };
    for _ in 0..10 {
        tp += timed(Box::new(|| plain.batch(&d)));
        tt += timed(Box::new(|| twice.batch(&d)));
        ttp += timed(Box::new(|| twice_pre.batch(&d)));
        tj += timed(Box::new(|| journaled.batch(&d)));
        tu += timed(Box::new(|| uring.batch(&d)));
    }
    let mb = (10 * 32 * BATCH_BYTES) as f64 / 1e6;
    let rate = |t: Duration| mb / t.as_secs_f64();
    println!(
        "plain write: {:.0} MB/s; journal+apply (syscall): {:.0} MB/s, ratio {:.2}; journal+apply (io_uring): {:.0} MB/s, ratio {:.2}",
        rate(tp),
        rate(tj),
        tp.as_secs_f64() / tj.as_secs_f64(),
        rate(tu),
        tp.as_secs_f64() / tu.as_secs_f64()
    );
    println!(
        "floor of any undo journal over incompressible data (each batch's bytes appended to a journal file and written to the disk, one fdatasync each, no read, hash or CRC): {:.0} MB/s, ratio {:.2}",
        rate(tt),
        tp.as_secs_f64() / tt.as_secs_f64()
    );
    println!(
        "the same with the journal file written whole once and overwritten in place: {:.0} MB/s, ratio {:.2}",
        rate(ttp),
        tp.as_secs_f64() / ttp.as_secs_f64()
    );
    let new_bytes = 512 << 20;
    let (tp, tj) = new_disk(dir.path(), &d, new_bytes);
    let mb = new_bytes as f64 / 1e6;
    println!(
        "new disk (first replication, 512 MiB onto a fresh sparse file): plain write: {:.0} MB/s; journal+apply (io_uring): {:.0} MB/s, ratio {:.2}",
        mb / tp.as_secs_f64(),
        mb / tj.as_secs_f64(),
        tp.as_secs_f64() / tj.as_secs_f64()
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
