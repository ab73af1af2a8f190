//! Model-based test of the apply path and the retention journal: random write sequences,
//! random bookmarks and random restarts (journal recovery) against an in-memory disk.
//! Every recovery point, exported, equals the model at that point, byte for byte.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use bytes::Bytes;
use master_target::apply::{Applier, RetentionPolicy, Verdict};
use master_target::disk::DiskFile;
use master_target::journal::{encode_undo, Journal, PointKind};
use proptest::prelude::*;
use wire_protocol::{Bookmark, BookmarkKind, Write, WriteBatch};

const DISK_BYTES: u64 = 256 << 10;

#[derive(Debug, Clone)]
enum Op {
    Batch(Vec<(u64, usize, u8)>),
    Bookmark,
    Restart,
    /// A crash after the undo records and the disk writes, before the commit.
    TornApply(Vec<(u64, usize, u8)>),
    /// Writes, a bookmark, more writes: one group, with a point inside it.
    Straddle(Vec<(u64, usize, u8)>, Vec<(u64, usize, u8)>),
}

fn arb_writes() -> impl Strategy<Value = Vec<(u64, usize, u8)>> {
    prop::collection::vec((0..DISK_BYTES / 512, 1usize..32, any::<u8>()), 1..8).prop_map(|v| {
        v.into_iter()
            .map(|(sector, sectors, fill)| {
                (
                    sector * 512,
                    ((sectors * 512) as u64).min(DISK_BYTES - sector * 512) as usize,
                    fill,
                )
            })
            .collect()
    })
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => arb_writes().prop_map(Op::Batch),
        2 => Just(Op::Bookmark),
        1 => Just(Op::Restart),
        1 => arb_writes().prop_map(Op::TornApply),
        2 => (arb_writes(), arb_writes()).prop_map(|(a, b)| Op::Straddle(a, b)),
    ]
}

fn policy() -> RetentionPolicy {
    RetentionPolicy {
        crash_point_interval_us: 3,
        window_us: u64::MAX / 2,
        quota_bytes: u64::MAX,
    }
}

fn open(dir: &Path) -> Applier {
    let disk = DiskFile::open(&dir.join("disk.img")).unwrap();
    // Small segments, so rotation and multi-segment rewinds are exercised.
    let journal = Journal::open(&dir.join("journal"), &disk)
        .unwrap()
        .with_segment_target_bytes(16 << 10);
    // The service's default backend (io_uring where the kernel allows it).
    let (io, _) =
        master_target::uring::IoBackend::new(master_target::uring::IoChoice::Auto).unwrap();
    Applier::new(1, disk, journal, policy()).with_io(io)
}

/// An applier over a fresh sparse disk of `DISK_BYTES` (never written: holes).
fn fresh(dir: &Path) -> Applier {
    File::create(dir.join("disk.img"))
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
    open(dir)
}

fn batch(first_lsn: u64, ts: u64, writes: &[(u64, usize, u8)]) -> WriteBatch {
    WriteBatch {
        disk_id: 1,
        first_lsn,
        writes: writes
            .iter()
            .map(|&(offset, len, fill)| {
                let data = Bytes::from(vec![fill; len]);
                Write {
                    timestamp_us: ts,
                    offset,
                    digest: wire_protocol::digest(&data),
                    data,
                }
            })
            .collect(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn every_point_exports_exactly(ops in prop::collection::vec(arb_op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("disk.img")).unwrap();
        f.set_len(DISK_BYTES).unwrap();
        drop(f);
        let mut model = vec![0u8; DISK_BYTES as usize];
        // The model's disk at each LSN that became a point.
        let mut snapshots: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut a = Some(open(dir.path()));
        let mut ts = 1u64;
        for op in ops {
            let ap = a.as_mut().unwrap();
            let next = ap.committed_lsn() + 1;
            ts += 1;
            match op {
                Op::Batch(w) => {
                    let b = batch(next, ts, &w);
                    let Verdict::Accept(items) = ap.check_batch(&b, next) else { panic!("fresh batch refused") };
                    // Sending it twice changes nothing the second time.
                    prop_assert!(matches!(ap.check_batch(&b, next + w.len() as u64), Verdict::Duplicate));
                    for p in ap.apply(&items).unwrap() {
                        prop_assert_eq!(p.kind, PointKind::CrashConsistent);
                    }
                    for &(o, l, v) in &w {
                        model[o as usize..o as usize + l].fill(v);
                    }
                    let crash_points: Vec<_> = ap.journal().points().iter().filter(|p| p.lsn == ap.committed_lsn()).collect();
                    if !crash_points.is_empty() {
                        snapshots.push((ap.committed_lsn(), model.clone()));
                    }
                }
                Op::Bookmark => {
                    let bm = Bookmark { disk_id: 1, lsn: next, kind: BookmarkKind::AppConsistent, time_us: ts, group_marker: 0, group_members: 0, tag: format!("t{next}") };
                    let Verdict::Accept(items) = ap.check_bookmark(&bm, next) else { panic!("bookmark refused") };
                    let made = ap.apply(&items).unwrap();
                    prop_assert_eq!(made.len(), 1);
                    snapshots.push((next, model.clone()));
                }
                Op::Restart => {
                    drop(a.take());
                    a = Some(open(dir.path()));
                }
                Op::Straddle(w1, w2) => {
                    let accept = |v: Verdict| match v { Verdict::Accept(items) => items, _ => panic!("refused") };
                    let mut items = accept(ap.check_batch(&batch(next, ts, &w1), next));
                    let at = next + w1.len() as u64;
                    let bm = Bookmark { disk_id: 1, lsn: at, kind: BookmarkKind::AppConsistent, time_us: ts, group_marker: 0, group_members: 0, tag: format!("t{at}") };
                    items.extend(accept(ap.check_bookmark(&bm, at)));
                    items.extend(accept(ap.check_batch(&batch(at + 1, ts, &w2), at + 1)));
                    let made = ap.apply(&items).unwrap();
                    prop_assert!(made.iter().any(|p| p.lsn == at && p.kind == PointKind::AppConsistent));
                    for &(o, l, v) in &w1 {
                        model[o as usize..o as usize + l].fill(v);
                    }
                    snapshots.push((at, model.clone()));
                    for &(o, l, v) in &w2 {
                        model[o as usize..o as usize + l].fill(v);
                    }
                    if made.iter().any(|p| p.lsn == ap.committed_lsn()) {
                        snapshots.push((ap.committed_lsn(), model.clone()));
                    }
                }
                Op::TornApply(w) => {
                    // Undo records durable, disk written, then the crash: no commit.
                    let disk = OpenOptions::new().write(true).read(true).open(dir.path().join("disk.img")).unwrap();
                    let mut undo = Vec::new();
                    for (i, &(o, l, v)) in w.iter().enumerate() {
                        let mut old = vec![0u8; l];
                        disk.read_exact_at(&mut old, o).unwrap();
                        encode_undo(next + i as u64, ts, o, &old, &mut undo);
                        disk.write_all_at(&vec![v; l], o).unwrap();
                    }
                    drop(a.take());
                    let seg = std::fs::read_dir(dir.path().join("journal")).unwrap().map(|e| e.unwrap().path()).max().unwrap();
                    let j = OpenOptions::new().append(true).open(seg).unwrap();
                    std::io::Write::write_all(&mut &j, &undo).unwrap();
                    // Half of a further record: a torn tail.
                    std::io::Write::write_all(&mut &j, &undo[..undo.len().min(20)]).unwrap();
                    a = Some(open(dir.path()));
                    let mut now = vec![0u8; DISK_BYTES as usize];
                    disk.read_exact_at(&mut now, 0).unwrap();
                    prop_assert!(now == model, "uncommitted writes are rolled back after a crash");
                }
            }
        }
        let ap = a.unwrap();
        let mut now = vec![0u8; DISK_BYTES as usize];
        ap.disk().read_at(&mut now, 0).unwrap();
        prop_assert!(now == model, "the disk is the latest state");
        for p in ap.journal().points() {
            let (_, want) = snapshots.iter().rev().find(|(l, _)| *l == p.lsn).expect("every point was snapshotted");
            let out = dir.path().join("export.img");
            std::fs::copy(dir.path().join("disk.img"), &out).unwrap();
            let f = OpenOptions::new().read(true).write(true).open(&out).unwrap();
            ap.journal().rewind(p.lsn, &f, &mut |_, _| {}).unwrap();
            let mut got = vec![0u8; DISK_BYTES as usize];
            f.read_exact_at(&mut got, 0).unwrap();
            prop_assert!(&got == want, "point {} (lsn {}) exports exactly", p.id, p.lsn);
        }
    }
}

#[test]
fn bad_digest_and_out_of_range_are_refused_before_any_write() {
    let dir = tempfile::tempdir().unwrap();
    let a = fresh(dir.path());
    let mut b = batch(1, 1, &[(0, 512, 7)]);
    b.writes[0].digest[0] ^= 1;
    assert!(matches!(
        a.check_batch(&b, 1),
        Verdict::Refuse(master_target::Error::DigestMismatch { lsn: 1, .. })
    ));
    let b = batch(1, 1, &[(DISK_BYTES - 512, 1024, 7)]);
    assert!(matches!(
        a.check_batch(&b, 1),
        Verdict::Refuse(master_target::Error::OutOfRange { .. })
    ));
    assert!(matches!(
        a.check_batch(&batch(5, 1, &[(0, 512, 1)]), 1),
        Verdict::Gap { expected: 1 }
    ));
}

#[test]
fn quota_drops_oldest_points_never_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    File::create(dir.path().join("disk.img"))
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
    let disk = DiskFile::open(&dir.path().join("disk.img")).unwrap();
    let journal = Journal::open(&dir.path().join("journal"), &disk)
        .unwrap()
        .with_segment_target_bytes(128 << 10);
    // Each batch over data journals 64 KiB of undo (over the new disk's zeros, almost
    // nothing); a 512 KiB quota keeps only the newest few.
    let mut a = Applier::new(
        1,
        disk,
        journal,
        RetentionPolicy {
            crash_point_interval_us: 1,
            window_us: u64::MAX / 2,
            quota_bytes: 512 << 10,
        },
    );
    let mut model = vec![0u8; DISK_BYTES as usize];
    let mut snapshots = Vec::new();
    for i in 0..40u64 {
        let next = a.committed_lsn() + 1;
        let w = [((i % 4) * 65536, 65536usize, i as u8 + 1)];
        let Verdict::Accept(items) = a.check_batch(&batch(next, i * 10 + 10, &w), next) else {
            panic!()
        };
        a.apply(&items).unwrap();
        model[((i % 4) * 65536) as usize..][..65536].fill(i as u8 + 1);
        snapshots.push((a.committed_lsn(), model.clone()));
    }
    let mut now = vec![0u8; DISK_BYTES as usize];
    a.disk().read_at(&mut now, 0).unwrap();
    assert!(now == model, "the quota never touches replicated data");
    let points = a.journal().points();
    assert!(
        a.journal().bytes() <= 640 << 10,
        "journal {} bytes stays near its quota",
        a.journal().bytes()
    );
    assert!(
        points.len() >= 3 && points.len() < 40,
        "oldest points dropped, newest kept: {}",
        points.len()
    );
    assert!(points[0].lsn > 1);
    for p in points {
        let want = &snapshots.iter().find(|(l, _)| *l == p.lsn).unwrap().1;
        assert!(
            &export(dir.path(), &a, p.lsn) == want,
            "kept point {} exports exactly",
            p.id
        );
    }
}

#[test]
fn resync_digests_are_cached_and_invalidated_by_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = fresh(dir.path());
    let first = a.block_digests(65536, 0, 4).unwrap();
    assert_eq!(a.stats.digests_hashed, 4);
    assert_eq!(
        a.block_digests(65536, 0, 4).unwrap(),
        first,
        "asked again: served from the cache"
    );
    assert_eq!(
        a.stats.digests_hashed, 4,
        "an interrupted resync does not hash again"
    );
    let Verdict::Accept(items) = a.check_batch(&batch(1, 1, &[(2 * 65536 + 512, 512, 9)]), 1)
    else {
        panic!()
    };
    a.apply(&items).unwrap();
    let after = a.block_digests(65536, 0, 4).unwrap();
    assert_eq!(
        a.stats.digests_hashed, 5,
        "only the written block is hashed again"
    );
    let mut block = vec![0u8; 65536];
    block[512..1024].fill(9);
    assert_eq!(after[2], wire_protocol::digest(&block));
    assert_eq!(
        (after[0], after[1], after[3]),
        (first[0], first[1], first[3])
    );
}

/// A new disk's first replication overwrites only zeros: its undo records carry no data
/// (UndoZeros), so the journal stays a sliver of what was applied, and every point still
/// exports exactly, the one before the data as zeros.
#[test]
fn a_new_disks_first_replication_journals_no_data_and_exports_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = fresh(dir.path());
    let (mut lsn, mut model) = (1u64, vec![0u8; DISK_BYTES as usize]);
    let mut snapshots = Vec::new();
    // Eight passes of 16 KiB writes: the first four fill the fresh disk (zeros overwritten),
    // the last four overwrite data.
    for pass in 0..8u64 {
        let writes: Vec<_> = (0..4)
            .map(|i| {
                (
                    (pass % 4) * (64 << 10) + i * (16 << 10),
                    16 << 10,
                    (pass * 4 + i + 1) as u8,
                )
            })
            .collect();
        let Verdict::Accept(items) = a.check_batch(&batch(lsn, lsn * 10, &writes), lsn) else {
            panic!("refused")
        };
        a.apply(&items).unwrap();
        for &(o, l, v) in &writes {
            model[o as usize..o as usize + l].fill(v);
        }
        lsn += writes.len() as u64;
        snapshots.push((a.committed_lsn(), model.clone()));
        if pass == 3 {
            // 256 KiB applied over zeros: records of 40 + 8 bytes, commits and points.
            assert!(
                a.journal().bytes() < 8 << 10,
                "journal of a fresh disk holds no data: {} bytes",
                a.journal().bytes()
            );
        }
    }
    assert!(
        a.journal().bytes() > DISK_BYTES,
        "overwritten data is journaled"
    );
    for p in a.journal().points() {
        let (_, want) = snapshots
            .iter()
            .find(|(l, _)| *l == p.lsn)
            .expect("a snapshot");
        let got = export(dir.path(), &a, p.lsn);
        assert!(&got == want, "point at lsn {} exports exactly", p.lsn);
    }
    // Before any write: every undo record rolled back, zeros again.
    let got = export(dir.path(), &a, 0);
    assert!(
        got.iter().all(|&b| b == 0),
        "before the first write the disk was zeros"
    );
    let out = dir.path().join("export.img");
    let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(out).unwrap()) * 512;
    assert!(
        allocated < DISK_BYTES / 4,
        "what was never written is a hole again: {allocated} bytes allocated"
    );
}

/// The disk as of `lsn`: a copy of it rewound by the journal.
fn export(dir: &Path, a: &Applier, lsn: u64) -> Vec<u8> {
    let out = dir.join("export.img");
    std::fs::copy(dir.join("disk.img"), &out).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&out)
        .unwrap();
    a.journal().rewind(lsn, &f, &mut |_, _| {}).unwrap();
    let mut got = vec![0u8; DISK_BYTES as usize];
    f.read_exact_at(&mut got, 0).unwrap();
    got
}

/// A write of the bytes the disk already holds (a resync's zero blocks onto a fresh thin
/// disk, a block rewritten unchanged) is neither journaled nor written: the thin disk stays
/// unallocated, and the points around it still export exactly.
#[test]
fn writes_of_what_the_disk_holds_are_neither_journaled_nor_written() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let mut a = fresh(dir.path());
    let apply = |a: &mut Applier, lsn: u64, writes: &[(u64, usize, u8)]| {
        let Verdict::Accept(items) = a.check_batch(&batch(lsn, lsn * 10, writes), lsn) else {
            panic!("refused")
        };
        a.apply(&items).unwrap();
    };
    let allocated = || {
        std::fs::metadata(dir.path().join("disk.img"))
            .unwrap()
            .blocks()
    };
    // The whole fresh disk written with zeros, 64 KiB at a time.
    let zeros: Vec<_> = (0..DISK_BYTES / (64 << 10))
        .map(|i| (i * (64 << 10), 64 << 10, 0u8))
        .collect();
    apply(&mut a, 1, &zeros);
    let mut lsn = 1 + zeros.len() as u64;
    assert_eq!(
        allocated(),
        0,
        "zeros onto a thin disk's holes allocate nothing"
    );
    assert_eq!(a.stats.writes_unchanged, zeros.len() as u64);
    assert_eq!(a.stats.bytes_applied, 0);
    let journal_before = a.journal().bytes();
    // Data, then the same data again, then a write that changes half of what it covers.
    apply(&mut a, lsn, &[(0, 32 << 10, 7)]);
    lsn += 1;
    let after_data = a.journal().bytes();
    assert!(
        after_data - journal_before < 1 << 10,
        "over zeros: no undo data"
    );
    apply(&mut a, lsn, &[(0, 32 << 10, 7)]);
    lsn += 1;
    assert!(
        a.journal().bytes() - after_data < 1 << 10,
        "the same bytes again journal nothing but the commit"
    );
    assert_eq!(a.stats.writes_unchanged, zeros.len() as u64 + 1);
    apply(&mut a, lsn, &[(16 << 10, 32 << 10, 7)]);
    assert!(
        a.journal().bytes() - after_data > 32 << 10,
        "a write that changes bytes journals all it overwrites"
    );
    let mut want = vec![0u8; DISK_BYTES as usize];
    want[..48 << 10].fill(7);
    assert!(export(dir.path(), &a, a.committed_lsn()) == want, "latest");
    want[32 << 10..48 << 10].fill(0);
    assert!(
        export(dir.path(), &a, lsn - 1) == want,
        "before the last write"
    );
    assert!(
        export(dir.path(), &a, 0).iter().all(|&b| b == 0),
        "before any write: zeros"
    );
    // Within one group, a write is compared with the disk as the group's earlier writes
    // leave it: putting back the bytes an earlier write changed is a change, and writing
    // what an earlier write wrote is not.
    want[32 << 10..48 << 10].fill(7);
    let far = DISK_BYTES - (64 << 10);
    let unchanged = a.stats.writes_unchanged;
    lsn = a.committed_lsn() + 1;
    apply(&mut a, lsn, &[(far, 4096, 9), (far, 4096, 0)]);
    apply(&mut a, lsn + 2, &[(far, 4096, 5), (far, 4096, 5)]);
    assert_eq!(a.stats.writes_unchanged, unchanged + 1, "only the repeat");
    want[far as usize..far as usize + 4096].fill(5);
    let latest = a.committed_lsn();
    assert!(export(dir.path(), &a, latest) == want, "latest");
    want[far as usize..far as usize + 4096].fill(0);
    assert!(export(dir.path(), &a, lsn + 1) == want, "zeros put back");
    // A restart finds the same journal: committed LSN, points and exports.
    let points = a.journal().points().to_vec();
    drop(a);
    let a = open(dir.path());
    assert_eq!(a.committed_lsn(), latest);
    assert_eq!(a.journal().points(), &points[..]);
    assert!(export(dir.path(), &a, lsn + 1) == want, "after a restart");
}

/// An applier over a disk filled with 0xEE (every write's old bytes go to the journal as
/// data), a segment per group, and a journal quota of `quota_bytes`.
fn one_group_per_segment(dir: &Path, quota_bytes: u64) -> Applier {
    std::fs::write(dir.join("disk.img"), vec![0xEE; DISK_BYTES as usize]).unwrap();
    reopen(dir, quota_bytes)
}

fn reopen(dir: &Path, quota_bytes: u64) -> Applier {
    let disk = DiskFile::open(&dir.join("disk.img")).unwrap();
    let journal = Journal::open(&dir.join("journal"), &disk)
        .unwrap()
        .with_segment_target_bytes(1);
    let policy = RetentionPolicy {
        quota_bytes,
        crash_point_interval_us: 1,
        ..policy()
    };
    Applier::new(1, disk, journal, policy)
}

fn apply_batch(a: &mut Applier, ts: u64, writes: &[(u64, usize, u8)]) {
    let next = a.committed_lsn() + 1;
    let Verdict::Accept(items) = a.check_batch(&batch(next, ts, writes), next) else {
        panic!("batch refused")
    };
    a.apply(&items).unwrap();
}

fn ids_and_lsns(a: &Applier) -> Vec<(u64, u64)> {
    a.journal().points().iter().map(|p| (p.id, p.lsn)).collect()
}

/// The journal quota drops a segment holding the record of a point whose undo records are
/// all in later segments (a group of unchanged writes journals a point and no undo): that
/// point goes with it, so the points listed are the points a restart finds.
#[test]
fn the_points_listed_after_a_quota_drop_are_those_a_restart_finds() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = one_group_per_segment(dir.path(), 256 << 10);
    for i in 0..24u64 {
        // Odd groups write again what the even group before them wrote: no undo.
        let fill = (i / 2) as u8 + 1;
        apply_batch(&mut a, i * 10 + 10, &[((i / 2 % 4) * 65536, 65536, fill)]);
    }
    let listed = ids_and_lsns(&a);
    assert!(
        listed.len() >= 4 && listed.len() < 24,
        "the quota dropped the oldest points and kept some: {listed:?}"
    );
    drop(a);
    let a = reopen(dir.path(), 256 << 10);
    assert_eq!(ids_and_lsns(&a), listed, "a restart lists the same points");
}

/// A resync under way stays under way across a restart after the segment holding its
/// start marker was dropped by the quota: no recovery point is made of a half-resynced
/// disk, until the resync completes.
#[test]
fn a_resync_stays_under_way_when_its_start_markers_segment_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let quota = 256 << 10;
    let mut a = one_group_per_segment(dir.path(), quota);
    apply_batch(&mut a, 10, &[(0, 4096, 1)]);
    let bookmark = |a: &mut Applier, kind, ts| {
        let next = a.committed_lsn() + 1;
        let bm = Bookmark {
            disk_id: 1,
            lsn: next,
            kind,
            time_us: ts,
            group_marker: 0,
            group_members: 0,
            tag: "resync".into(),
        };
        let Verdict::Accept(items) = a.check_bookmark(&bm, next) else {
            panic!("bookmark refused")
        };
        a.apply(&items).unwrap()
    };
    let first_segment = dir.path().join("journal/seg-00000001.fbj");
    bookmark(&mut a, BookmarkKind::ResyncStarted, 20);
    let points_before = ids_and_lsns(&a);
    for i in 0..12u64 {
        apply_batch(
            &mut a,
            30 + i * 10,
            &[((i % 4) * 65536, 65536, i as u8 + 2)],
        );
    }
    assert!(
        !first_segment.exists() && !dir.path().join("journal/seg-00000002.fbj").exists(),
        "the quota dropped the segments of the first group and of the start marker"
    );
    assert!(a.journal().resyncing());
    for _ in 0..2 {
        drop(a);
        a = reopen(dir.path(), quota);
        assert!(
            a.journal().resyncing(),
            "every restart still knows the resync is under way"
        );
    }
    apply_batch(&mut a, 200, &[(4096, 4096, 9)]);
    drop(a);
    let mut a = reopen(dir.path(), quota);
    apply_batch(&mut a, 300, &[(8192, 4096, 9)]);
    let during: Vec<_> = ids_and_lsns(&a)
        .into_iter()
        .filter(|p| !points_before.contains(p))
        .collect();
    assert!(
        during.is_empty(),
        "points made during the resync: {during:?}"
    );
    bookmark(&mut a, BookmarkKind::ResyncCompleted, 400);
    drop(a);
    let mut a = reopen(dir.path(), quota);
    assert!(!a.journal().resyncing(), "the completed resync is over");
    apply_batch(&mut a, 500, &[(12288, 4096, 9)]);
    assert!(
        a.journal()
            .points()
            .last()
            .is_some_and(|p| p.time_us == 500),
        "points are made again once it completed"
    );
}

/// A full volume empties a lone segment down to its checkpoint, dropping every point; not
/// while a resync is under way (its points from before it are the only consistent ones, and
/// its start marker must not be lost): the disk waits for room instead.
#[test]
fn a_full_volume_never_empties_the_journal_of_a_disk_being_resynced() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("disk.img"), vec![0xEE; DISK_BYTES as usize]).unwrap();
    let disk = DiskFile::open(&dir.path().join("disk.img")).unwrap();
    let open = || Journal::open(&dir.path().join("journal"), &disk).unwrap();
    let mut j = open();
    let point = |lsn, kind| (lsn, lsn * 10, kind, "t".to_string(), (0, 0));
    j.commit(1, 10, vec![point(1, PointKind::AppConsistent)])
        .unwrap();
    j.commit(2, 20, vec![point(2, PointKind::ResyncStarted)])
        .unwrap();
    let mut undo = Vec::new();
    encode_undo(3, 30, 0, &[0xEE; 4096], &mut undo);
    j.append(&undo).unwrap();
    j.commit(3, 30, Vec::new()).unwrap();
    let bytes = j.bytes();
    assert!(!j.reset_for_space().unwrap(), "refused during the resync");
    assert_eq!((j.bytes(), j.points().len()), (bytes, 1), "nothing dropped");
    drop(j);
    j = open();
    assert!(j.resyncing());
    j.commit(4, 40, vec![point(4, PointKind::ResyncCompleted)])
        .unwrap();
    assert!(
        j.reset_for_space().unwrap(),
        "once it completed, a reset may empty it"
    );
    assert!(j.points().is_empty() && !j.resyncing());
    drop(j);
    let j = open();
    assert!(!j.resyncing() && j.points().is_empty());
    assert_eq!(j.committed_lsn(), 4);
}

/// Within one group, a write over bytes an earlier write of the group saved needs no undo
/// record of its own, but only until a bookmark: a point may be made there, and the first
/// write after it saves again. Every point exports exactly, before and after a restart.
#[test]
fn a_write_over_what_its_group_saved_is_not_journaled_again_until_a_bookmark() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = one_group_per_segment(dir.path(), u64::MAX);
    apply_batch(&mut a, 10, &[(0, 8192, 1)]);
    let before = a.journal().bytes();
    let accept = |v: Verdict| match v {
        Verdict::Accept(items) => items,
        _ => panic!("refused"),
    };
    let n = a.committed_lsn() + 1;
    let mut items = accept(a.check_batch(&batch(n, 20, &[(0, 4096, 2), (0, 4096, 3)]), n));
    let bm = Bookmark {
        disk_id: 1,
        lsn: n + 2,
        kind: BookmarkKind::AppConsistent,
        time_us: 30,
        group_marker: 0,
        group_members: 0,
        tag: "mid-group".into(),
    };
    items.extend(accept(a.check_bookmark(&bm, n + 2)));
    let after = [(0, 4096, 4), (1024, 1024, 5), (0, 8192, 6)];
    items.extend(accept(a.check_batch(&batch(n + 3, 40, &after), n + 3)));
    a.apply(&items).unwrap();
    // Journaled: the first write before the bookmark, the first after it, and the last
    // (its second half was not saved); written over them: the others.
    assert_eq!(a.stats.writes_covered, 2);
    let journaled = a.journal().bytes() - before;
    assert!(
        (4096 + 4096 + 8192..4096 + 4096 + 8192 + 4096).contains(&journaled),
        "three undo records' data and their records: {journaled} bytes"
    );
    let mut at_bookmark = vec![0xEE; DISK_BYTES as usize];
    at_bookmark[..4096].fill(3);
    at_bookmark[4096..8192].fill(1);
    let mut at_start = vec![0xEE; DISK_BYTES as usize];
    at_start[..8192].fill(1);
    let points: Vec<(u64, u64)> = ids_and_lsns(&a);
    let bookmark_point = points
        .iter()
        .find(|p| p.1 == n + 2)
        .expect("the bookmark's point");
    let first_point = points
        .iter()
        .find(|p| p.1 == n - 1)
        .expect("the first group's point");
    for restart in [false, true] {
        if restart {
            drop(a);
            a = reopen(dir.path(), u64::MAX);
        }
        assert!(export(dir.path(), &a, bookmark_point.1) == at_bookmark);
        assert!(export(dir.path(), &a, first_point.1) == at_start);
        let mut now = vec![0u8; DISK_BYTES as usize];
        a.disk().read_at(&mut now, 0).unwrap();
        assert!(
            now[..8192].iter().all(|&b| b == 6),
            "the newest writes landed"
        );
    }
}
