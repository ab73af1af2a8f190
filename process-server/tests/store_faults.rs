//! Regression tests for what the deterministic simulator (`tests/simulation/` at the
//! repository root) found in the cache, each replayed on `store::SimFs` with the fault that
//! exposed it (the seeds named beside them no longer fail, and later changes move what a
//! seed does, so the scenario is written out here). The rule they hold the cache to:
//! a power loss never makes it call a range lost (that costs the agent a resync) unless
//! something it acknowledged is damaged, and never loses what it acknowledged.

use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use process_server::cache::DiskCache;
use store::{FileSystem, SimFaults, SimFs};
use wire_protocol::{digest, Message, MessageCodec, Write, WriteBatch};

const DIR: &str = "/cache/disk-1";

fn frame(lsn: u64, len: usize) -> Vec<u8> {
    let data = Bytes::from(vec![(lsn % 251) as u8; len]);
    let msg = Message::WriteBatch(WriteBatch {
        disk_id: 1,
        first_lsn: lsn,
        writes: vec![Write {
            timestamp_us: lsn,
            offset: 0,
            digest: digest(&data),
            data,
        }],
    });
    let mut out = BytesMut::new();
    MessageCodec::default().encode(&msg, &mut out).unwrap();
    out.to_vec()
}

fn volume(seed: u64) -> SimFs {
    let fs = SimFs::new(seed);
    fs.create_dir_all(Path::new("/cache")).unwrap();
    fs
}

fn open(fs: &SimFs) -> DiskCache {
    DiskCache::open_in(Arc::new(fs.clone()), Path::new(DIR), 0).unwrap()
}

/// Records 1–4 synced (acknowledged), then 5–9 appended and not yet synced.
fn synced_then_appended(c: &mut DiskCache) {
    for lsn in 1..=4 {
        c.append(lsn, lsn, lsn, &frame(lsn, 3000)).unwrap();
    }
    c.sync().unwrap();
    for lsn in 5..=9 {
        c.append(lsn, lsn, lsn, &frame(lsn, 3000)).unwrap();
    }
}

/// No lost range, and everything up to `acked` still there.
fn assert_whole(c: &DiskCache, acked: u64, when: &str) {
    let lost: Vec<_> = c
        .entries_from(0, 1 << 20)
        .iter()
        .filter(|e| e.lost)
        .map(|e| (e.first_lsn, e.last_lsn))
        .collect();
    assert!(lost.is_empty(), "{when}: ranges called lost {lost:?}");
    assert!(
        c.last_lsn() >= acked,
        "{when}: acked {acked} lost: {}",
        c.last_lsn()
    );
    for e in c.entries_from(0, 1 << 20) {
        c.read(&e).unwrap_or_else(|err| panic!("{when}: {err}"));
    }
}

/// Seeds 22, 58 and 1 (and many more): a power loss with records appended and not yet
/// synced keeps some of them and not others (a later record without an earlier one, a
/// header without its body). None was acknowledged: the cache must end where its last
/// sync did, not call anything lost.
#[test]
fn unsynced_records_a_crash_tore_or_skipped_are_a_torn_tail() {
    for seed in 0..40 {
        let fs = volume(seed);
        fs.set_faults(SimFaults {
            tear_per_million: 500_000,
            ..SimFaults::NONE
        });
        let mut c = open(&fs);
        synced_then_appended(&mut c);
        drop(c);
        fs.crash();
        let c = open(&fs);
        assert_whole(&c, 4, &format!("seed {seed}"));
    }
}

/// The same with the crash during the group commit itself: its sync marks may reach the
/// disk while the records before them do not (one fsync after both). Records are now
/// fsynced before the marks are written.
#[test]
fn a_crash_during_a_group_commit_never_keeps_marks_without_their_records() {
    for seed in 0..40 {
        for crash_at in 1..=3 {
            let fs = volume(seed);
            let mut c = open(&fs);
            for lsn in 1..=4 {
                c.append(lsn, lsn, lsn, &frame(lsn, 3000)).unwrap();
            }
            c.sync().unwrap();
            for lsn in 5..=9 {
                c.append(lsn, lsn, lsn, &frame(lsn, 3000)).unwrap();
            }
            fs.arm_crash(crash_at);
            let acked = if c.sync().is_ok() && !fs.crashed() {
                9
            } else {
                4
            };
            drop(c);
            fs.disarm_crash();
            fs.crash();
            let c = open(&fs);
            assert_whole(&c, acked, &format!("seed {seed}, crash at {crash_at}"));
        }
    }
}

/// Seed 2817: a segment was created by a process that died (or failed) before syncing its
/// directory; the next process appended to it and acknowledged; a power loss took the
/// segment's name, and the acknowledged records with it.
#[test]
fn a_segment_made_before_a_failed_directory_sync_keeps_its_name() {
    let fs = volume(1);
    let mut c = open(&fs);
    fs.fail_next("fsync dir", DIR, 0);
    assert!(
        c.append(1, 1, 1, &frame(1, 3000)).is_err(),
        "made, not synced"
    );
    c.append(1, 1, 1, &frame(1, 3000)).unwrap();
    c.sync().unwrap();
    drop(c);
    fs.crash();
    let c = open(&fs);
    assert_whole(&c, 1, "after a power loss");
}

/// Outside review, 2026-11-30 (and seeds 35, 49 once the simulator counted the resume point
/// an agent is told as an ack): the service was killed between appending a group and its
/// group commit; the restart indexed those records (still in the page cache), told the
/// agent it held them, and a power loss then took them.
#[test]
fn records_a_restart_reports_are_durable_before_it_reports_them() {
    for seed in 0..40 {
        let fs = volume(seed);
        let mut c = open(&fs);
        synced_then_appended(&mut c);
        assert_eq!(c.durable_lsn(), 4, "appended is not durable");
        drop(c); // killed: the page cache keeps the appends
        let c = open(&fs);
        let told = c.durable_lsn();
        drop(c);
        fs.crash();
        let c = open(&fs);
        assert_whole(&c, told, &format!("seed {seed}"));
    }
}

/// Outside review, 2026-11-30: guest data shaped like a sync mark (valid header CRC, any
/// LSN) inside a record torn by a crash was taken for a mark: its LSN became the cache's
/// acknowledged position and a lost range up to it (2^40 LSNs: the resync marker did not
/// fit in memory). A mark never says more than the records before it show.
#[test]
fn guest_data_shaped_like_a_sync_mark_is_not_a_mark() {
    let fs = volume(3);
    let mut c = open(&fs);
    for lsn in 1..=3 {
        c.append(lsn, lsn, lsn, &frame(lsn, 3000)).unwrap();
    }
    c.sync().unwrap();
    // A guest write whose data holds a forged mark saying lsn 2^40 is acknowledged.
    let mut forged = Vec::new();
    forged.extend_from_slice(b"FBS1");
    forged.extend_from_slice(&0u64.to_be_bytes());
    forged.extend_from_slice(&(1u64 << 40).to_be_bytes());
    forged.extend_from_slice(&1u64.to_be_bytes());
    forged.extend_from_slice(&0u32.to_be_bytes());
    let crc = crc32c::crc32c(&forged);
    forged.extend_from_slice(&crc.to_be_bytes());
    let mut data = vec![0x55u8; 8192];
    data[4096..4096 + forged.len()].copy_from_slice(&forged);
    let data = Bytes::from(data);
    let msg = Message::WriteBatch(WriteBatch {
        disk_id: 1,
        first_lsn: 4,
        writes: vec![Write {
            timestamp_us: 4,
            offset: 0,
            digest: digest(&data),
            data,
        }],
    });
    let mut out = BytesMut::new();
    MessageCodec::default().encode(&msg, &mut out).unwrap();
    c.append(4, 4, 4, &out).unwrap();
    drop(c);
    // A crash keeps the record's middle (the forged mark) and not its end.
    let seg = Path::new(DIR).join("seg-00000001.fbc");
    let mut bytes = fs.contents(&seg).unwrap();
    let cut = bytes.len() - 1000;
    bytes.truncate(cut);
    fs.put(&seg, &bytes);
    let c = open(&fs);
    assert!(
        c.last_lsn() < 1 << 20,
        "position taken from guest data: {}",
        c.last_lsn()
    );
    let lost: Vec<_> = c
        .entries_from(0, 100)
        .iter()
        .filter(|e| e.lost)
        .map(|e| (e.first_lsn, e.last_lsn))
        .collect();
    assert!(
        lost.iter().all(|r| r.1 < 1 << 20),
        "lost range from guest data: {lost:?}"
    );
}
