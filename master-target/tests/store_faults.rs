//! Regression tests for the bugs the deterministic simulator (`tests/simulation/` at the
//! repository root) found in the journal and the apply path, each replayed on purpose on
//! `store::SimFs` with the one fault that exposed it. The seeds that first found them are
//! named beside each test (they no longer fail, and later changes move what a seed does,
//! so the scenario is written out here).

mod sim_common;

use std::path::Path;

use master_target::apply::RetentionPolicy;
use sim_common::*;
use store::SimFaults;

/// Seed 10: a read of the disk failed while a group saved its undo data, and putting the
/// group back wrote that record's zeros over live data.
#[test]
fn a_failed_read_while_saving_undo_data_writes_nothing_back() {
    let fs = volume(1);
    let mut src = new_source();
    let mut a = open(&fs, 1 << 20).unwrap();
    a.apply(&src.group(3)).unwrap();
    fs.fail_next("read", DISK, 1);
    assert!(a.apply(&src.group(3)).is_err());
    src.unwind(3);
    assert_consistent(&fs, &a, &src, 3);
    drop(a);
    let a = open(&fs, 1 << 20).unwrap();
    assert_consistent(&fs, &a, &src, 3);
}

/// Seed 129: a failed stat at open took the newest segment for an empty one and removed
/// it, with every commit in it.
#[test]
fn a_failed_stat_at_open_removes_no_segment() {
    let fs = volume(2);
    let mut src = new_source();
    let mut a = open(&fs, 16 << 10).unwrap();
    // Until the newest of several segments holds commits past its checkpoint.
    while !fs
        .files()
        .last()
        .is_some_and(|f| f.0.ends_with("seg-00000003.fbj") && f.1 > 1024)
    {
        a.apply(&src.group(2)).unwrap();
    }
    let acked = a.committed_lsn();
    drop(a);
    fs.fail_next("stat", "seg-", 0);
    let _ = open(&fs, 16 << 10); // fails or not; it must not remove anything
    fs.crash();
    let a = open(&fs, 16 << 10).unwrap();
    assert_consistent(&fs, &a, &src, acked);
}

/// Seed 77: the first start made the first segment and failed before syncing its
/// directory; the next start did not sync it either, so a power loss took the journal.
#[test]
fn the_first_segment_is_durable_after_a_start_that_failed() {
    let fs = volume(3);
    let mut src = new_source();
    fs.fail_next("fsync dir", JOURNAL, 0);
    assert!(open(&fs, 1 << 20).is_err());
    let mut a = open(&fs, 1 << 20).unwrap();
    a.apply(&src.group(4)).unwrap();
    drop(a);
    fs.crash();
    let a = open(&fs, 1 << 20).unwrap();
    assert_consistent(&fs, &a, &src, 4);
}

/// Seed 54: pruning removed the oldest segments, a crash undid one removal (the directory
/// was not synced), and its points came back though the undo records after them were gone:
/// they exported something else than the source.
#[test]
fn a_segment_pruned_before_a_crash_does_not_bring_its_points_back() {
    let fs = volume(4);
    let mut src = new_source();
    let short = RetentionPolicy {
        window_us: 2_000_000,
        ..POLICY
    };
    let mut a = open_with(&fs, 32 << 10, short).unwrap();
    // Every segment as it was last seen.
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..80 {
        a.apply(&src.group(2)).unwrap();
        for (p, _, _) in fs.files() {
            if p.starts_with(JOURNAL) {
                seen.insert(p.clone(), fs.contents(&p).unwrap());
            }
        }
    }
    let acked = a.committed_lsn();
    let gone: Vec<_> = seen
        .keys()
        .filter(|p| fs.contents(p).is_none())
        .cloned()
        .collect();
    assert!(gone.len() >= 2, "pruning removed segments: {gone:?}");
    drop(a);
    // A crash undid the removal of the oldest, and not of the one after it.
    fs.crash();
    fs.put(&gone[0], &seen[&gone[0]]);
    let a = open(&fs, 32 << 10).unwrap();
    assert_consistent(&fs, &a, &src, acked);
    let disk = fs.contents(Path::new(DISK)).unwrap();
    assert!(!a.journal().points().is_empty());
    for p in a.journal().points() {
        let out = tempfile::tempfile().unwrap();
        std::os::unix::fs::FileExt::write_all_at(&out, &disk, 0).unwrap();
        a.journal().rewind(p.lsn, &out, &mut |_, _| {}).unwrap();
        let mut got = vec![0u8; DISK_BYTES];
        std::os::unix::fs::FileExt::read_exact_at(&out, &mut got, 0).unwrap();
        assert!(
            got == src.image_at(p.lsn),
            "point at lsn {} exports exactly",
            p.lsn
        );
    }
}

/// Seed 938: emptying the last segment on a full volume truncated it first; a crash before
/// the new checkpoint was durable left an empty journal (committed LSN 0).
#[test]
fn emptying_a_full_journal_survives_a_crash_at_each_step() {
    for crash_at in 1..=5 {
        for seed in 0..8 {
            let fs = volume(seed);
            let mut src = new_source();
            let mut a = open(&fs, 1 << 20).unwrap();
            for _ in 0..4 {
                a.apply(&src.group(3)).unwrap();
            }
            let acked = a.committed_lsn();
            fs.set_faults(SimFaults {
                tear_per_million: 500_000,
                ..SimFaults::NONE
            });
            fs.arm_crash(crash_at);
            let _ = a.free_journal_space();
            drop(a);
            fs.crash();
            let a = open(&fs, 1 << 20).unwrap();
            assert_consistent(&fs, &a, &src, acked);
        }
    }
}

/// Seed 480: a commit's fsync failed, putting the disk back failed half-way, and the
/// restart read the commit (still in the page cache) as durable over a half-restored disk.
#[test]
fn a_failed_commit_then_a_failed_restore_leaves_a_consistent_restart() {
    let fs = volume(6);
    let mut src = new_source();
    let mut a = open(&fs, 1 << 20).unwrap();
    a.apply(&src.group(3)).unwrap();
    // The group's second journal fsync is its commit's; the restore's second disk write fails.
    fs.fail_next("fsync", JOURNAL, 1);
    fs.fail_next("write", DISK, 4 + 1);
    assert!(a.apply(&src.group(4)).is_err());
    drop(a);
    let a = open(&fs, 1 << 20).unwrap();
    if a.committed_lsn() == 3 {
        src.unwind(4);
    }
    assert_consistent(&fs, &a, &src, 3);
    drop(a);
    fs.crash();
    let a = open(&fs, 1 << 20).unwrap();
    assert_consistent(&fs, &a, &src, 3);
}

/// Seed 1601: the first checkpoint's fsync failed, Linux marked its page clean, and no
/// later fsync wrote it: after a power loss the journal began with zeros (corrupt). The
/// cure is that recovery reads the device, not the page cache (and `sync` writes again
/// what a failed fsync covered).
#[test]
fn bytes_whose_fsync_failed_are_written_again() {
    let fs = volume(7);
    let mut src = new_source();
    fs.fail_next("fsync", "seg-00000001", 0);
    assert!(open(&fs, 1 << 20).is_err());
    let mut a = open(&fs, 1 << 20).unwrap();
    a.apply(&src.group(3)).unwrap();
    fs.fail_next("fsync", JOURNAL, 1); // a commit's fsync fails: its group is not acked
    assert!(a.apply(&src.group(2)).is_err());
    src.unwind(2);
    drop(a);
    let mut a = open(&fs, 1 << 20).unwrap();
    a.apply(&src.group(2)).unwrap();
    drop(a);
    fs.crash();
    let a = open(&fs, 1 << 20).expect("the journal opens after a power loss");
    assert_consistent(&fs, &a, &src, 5);
}

/// Seed 3862: a rotation made its segment and failed to sync the directory, and removing
/// the segment failed too; commits went on in the old segment, and at the next start the
/// new segment's checkpoint hid them.
#[test]
fn a_segment_left_by_a_failed_rotation_hides_no_commit() {
    let fs = volume(8);
    let mut src = new_source();
    let mut a = open(&fs, 8 << 10).unwrap();
    fs.fail_next("fsync dir", JOURNAL, 0);
    fs.fail_next("unlink", "seg-00000002", 0);
    for _ in 0..4 {
        a.apply(&src.group(1)).unwrap();
    }
    let acked = a.committed_lsn();
    assert!(
        fs.files().iter().any(|f| f.0.ends_with("seg-00000002.fbj")),
        "the failed rotation left its segment"
    );
    drop(a);
    let a = open(&fs, 8 << 10).unwrap();
    assert_consistent(&fs, &a, &src, acked);
}

/// The same, when writing the range again fails too: recovery must read what the device
/// holds (the checkpoint never reached it), not the clean page the failed fsync left.
#[test]
fn recovery_reads_the_device_not_pages_a_failed_fsync_left_clean() {
    let fs = volume(9);
    let mut src = new_source();
    fs.fail_next("fsync", "seg-00000001", 0);
    fs.fail_next("write", "seg-00000001", 1);
    assert!(open(&fs, 1 << 20).is_err());
    let mut a = open(&fs, 1 << 20).unwrap();
    a.apply(&src.group(3)).unwrap();
    drop(a);
    fs.crash();
    let a = open(&fs, 1 << 20).expect("the journal opens after a power loss");
    assert_consistent(&fs, &a, &src, 3);
}

/// A point record of a kind this version does not know (its checksum holds: a newer master
/// target wrote it) is an error that says so, never taken for a crash-consistent point.
#[test]
fn a_point_of_an_unknown_kind_is_an_error() {
    let fs = volume(10);
    let mut src = new_source();
    let mut a = open(&fs, 1 << 20).unwrap();
    while a.journal().points().is_empty() {
        a.apply(&src.group(2)).unwrap();
    }
    drop(a);
    let seg = Path::new(JOURNAL).join("seg-00000001.fbj");
    let mut bytes = fs.contents(&seg).unwrap();
    // Walk the records (16-byte header: magic, kind, reserved, body_len, crc) to the point.
    let mut at = 0;
    while bytes[at + 4] != 3 {
        at += 16 + u32::from_be_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
    }
    let body_len = u32::from_be_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
    bytes[at + 16 + 24] = 9;
    let crc = crc32c::crc32c_append(
        crc32c::crc32c(&bytes[at + 4..at + 12]),
        &bytes[at + 16..at + 16 + body_len],
    );
    bytes[at + 12..at + 16].copy_from_slice(&crc.to_be_bytes());
    fs.put(&seg, &bytes);
    let e = open(&fs, 1 << 20).unwrap_err().to_string();
    assert!(e.contains("unknown kind 9"), "{e}");
}
