//! Regression tests for what an outside review of the simulator's fixes found in the
//! journal (2026-11-30): six more ways a crash, a failed operation or a full datastore lost
//! acknowledged writes, listed points that exported wrong data, refused a healthy journal
//! or dropped kept points. Each failed on the commit before its fix (2ba43ef), replayed on
//! `store::SimFs` with the fault that exposes it.

mod sim_common;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use master_target::apply::{Applier, Item, RetentionPolicy};
use master_target::disk::DiskFile;
use master_target::journal::Journal;
use sim_common::*;
use store::{FileSystem, OpenMode, SimFs};

use master_target::core::{Applied, DiskCore, Work};
use master_target::journal::{encode_undo, recover_damaged_in};
use std::sync::atomic::{AtomicU8, Ordering};
use store::FileHandle;
use wire_protocol::{Bookmark, BookmarkKind, Write, WriteBatch};

fn seg(n: u32) -> std::path::PathBuf {
    Path::new(JOURNAL).join(format!("seg-{n:08}.fbj"))
}

fn export_ok(fs: &SimFs, a: &Applier, src: &Source) -> Vec<String> {
    let disk = fs.contents(Path::new(DISK)).unwrap();
    let mut bad = Vec::new();
    for p in a.journal().points() {
        let out = tempfile::tempfile().unwrap();
        std::os::unix::fs::FileExt::write_all_at(&out, &disk, 0).unwrap();
        match a.journal().rewind(p.lsn, &out, &mut |_, _| {}) {
            Ok(_) => {
                let mut got = vec![0u8; DISK_BYTES];
                std::os::unix::fs::FileExt::read_exact_at(&out, &mut got, 0).unwrap();
                if got != src.image_at(p.lsn) {
                    bad.push(format!("point {} lsn {} exports wrong data", p.id, p.lsn));
                }
            }
            Err(e) => bad.push(format!("point {} lsn {}: {e}", p.id, p.lsn)),
        }
    }
    bad
}

/// R1: on a full volume the oldest segments are dropped (no directory fsync), then the last
/// one is emptied to its checkpoint; a crash brings the dropped segments back, contiguous,
/// and their points are listed though the undo records after them were erased.
#[test]
fn r1_reset_then_crash_resurrects_unbuildable_points() {
    let fs = volume(21);
    let mut src = new_source();
    let mut a = open(&fs, 16 << 10).unwrap();
    while !fs.files().iter().any(|f| f.0 == seg(3)) {
        a.apply(&src.group(1)).unwrap();
    }
    a.apply(&src.group(1)).unwrap();
    a.apply(&src.group(1)).unwrap();
    assert!(!a.journal().points().is_empty());
    // What DiskCore::apply does on ENOSPC: free until nothing more can be freed.
    while a.free_journal_space().unwrap() {}
    assert!(a.journal().points().is_empty());
    a.apply(&src.group(1)).unwrap();
    let acked = a.committed_lsn();
    drop(a);
    fs.crash();
    eprintln!("after crash: {:?}", fs.files());
    let a = open(&fs, 16 << 10).unwrap();
    assert_consistent(&fs, &a, &src, acked);
    let bad = export_ok(&fs, &a, &src);
    assert!(
        bad.is_empty(),
        "{} points listed; {bad:#?}",
        a.journal().points().len()
    );
}

/// R2: a failed rotation left seg-2 (checkpoint only); the very next group's undo records
/// are durable in seg-1 and its writes on the disk when the process dies before the commit
/// (here: the commit append fails and so does the restore's first step). At restart the
/// stray rule does not fire (seg-1's last commit == seg-2's checkpoint), seg-2 is taken as
/// the last segment, and seg-1's uncommitted tail is never rolled back.
#[test]
fn r2_stray_segment_beside_an_uncommitted_group_skips_the_roll_back() {
    let fs = volume(22);
    let mut src = new_source();
    let mut a = open(&fs, 8 << 10).unwrap();
    a.apply(&src.group(1)).unwrap();
    fs.fail_next("fsync dir", JOURNAL, 0);
    fs.fail_next("unlink", "seg-00000002", 0);
    a.apply(&src.group(1)).unwrap(); // commits, then the rotation fails and leaves seg-2
    assert!(fs.files().iter().any(|f| f.0 == seg(2)));
    let acked = a.committed_lsn();
    fs.fail_next("write", JOURNAL, 1); // the commit append
    fs.fail_next("truncate", JOURNAL, 0); // the restore's first step
    assert!(a.apply(&src.group(1)).is_err());
    src.unwind(1);
    drop(a); // the disk stops; the master target restarts (page cache kept)
    let a = open(&fs, 8 << 10).unwrap();
    assert_consistent(&fs, &a, &src, acked);
}

/// R3: a power loss in the middle of one unsynced append (the next group's undo records,
/// before their fsync, so before any disk write) where the device kept every sector of the
/// append but two. SimFs only ever keeps a prefix of a write; real devices and file
/// systems need not.
#[test]
fn r3_a_hole_inside_the_unsynced_tail_is_taken_for_corruption() {
    let fs = volume(23);
    let mut src = new_source();
    let mut a = open(&fs, 1 << 20).unwrap();
    a.apply(&src.group(3)).unwrap();
    let acked = a.committed_lsn();
    drop(a);
    let disk = fs.contents(Path::new(DISK)).unwrap();
    let mut bytes = fs.contents(&seg(1)).unwrap();
    let start = bytes.len();
    for lsn in 4..=6u64 {
        let off = (lsn * 4096 * 3) % DISK_BYTES as u64;
        let old = disk[off as usize..off as usize + 4096].to_vec();
        encode_undo(lsn, lsn * 400_000, off, &old, &mut bytes);
    }
    let hole = start.next_multiple_of(512) + 512;
    bytes[hole..hole + 1024].fill(0);
    fs.put(&seg(1), &bytes);
    let a = open(&fs, 1 << 20).expect("a power loss mid-append leaves a journal that opens");
    assert_consistent(&fs, &a, &src, acked);
}

/// R4: a crash inside recover_damaged after the old journal was renamed away and before the
/// new checkpoint is durable: the next open makes a fresh journal at committed LSN 0.
#[test]
fn r4_a_crash_inside_recover_damaged_keeps_the_committed_lsn() {
    let mut lost = Vec::new();
    for crash_at in 1..80 {
        let fs = volume(24);
        let mut src = new_source();
        let mut a = open(&fs, 1 << 20).unwrap();
        for _ in 0..3 {
            a.apply(&src.group(2)).unwrap();
        }
        let acked = a.committed_lsn();
        drop(a);
        let mut b = fs.contents(&seg(1)).unwrap();
        b[64 + 40 + 100] ^= 1; // a flipped byte at rest in the first undo record
        fs.put(&seg(1), &b);
        assert!(open(&fs, 1 << 20).is_err(), "corrupt");
        let h = fs.open(Path::new(DISK), OpenMode::ReadWrite).unwrap();
        let disk = DiskFile::from_handle(h, Path::new(DISK)).unwrap();
        fs.arm_crash(crash_at);
        let r = recover_damaged_in(&fs, Path::new(JOURNAL), &disk);
        let crashed = fs.crashed();
        fs.disarm_crash();
        fs.crash();
        match open(&fs, 1 << 20) {
            Ok(a) if a.committed_lsn() < acked => lost.push((crash_at, a.committed_lsn(), acked)),
            _ => {}
        }
        if !crashed {
            eprintln!("recover_damaged finished at crash_at {crash_at}: {r:?}");
            break;
        }
    }
    assert!(
        lost.is_empty(),
        "(crash at op, committed after, committed before): {lost:?}"
    );
}

/// A disk whose datastore (thin-provisioned, another volume than the journal's) is full:
/// writes of `full` as first byte fail with ENOSPC.
#[derive(Debug)]
struct ThinDisk {
    inner: Box<dyn FileHandle>,
    full: Arc<AtomicU8>,
}

impl FileHandle for ThinDisk {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let f = self.full.load(Ordering::SeqCst);
        if f != 0 && data.first() == Some(&f) {
            return Err(std::io::Error::from_raw_os_error(28));
        }
        self.inner.write_all_at(data, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, n: u64) -> std::io::Result<()> {
        self.inner.set_len(n)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }
    fn sync_all(&self) -> std::io::Result<()> {
        self.inner.sync_all()
    }
    fn drop_cache(&self) -> std::io::Result<()> {
        self.inner.drop_cache()
    }
}

/// R5: ENOSPC from the disk's datastore is taken for a full retention volume: every journal
/// segment but one is deleted and the last is emptied, with every recovery point.
#[test]
fn r5_enospc_on_the_datastore_wipes_the_retention_journal() {
    let fs = volume(25);
    let mut src = new_source();
    let full = Arc::new(AtomicU8::new(0));
    let h = fs.open(Path::new(DISK), OpenMode::ReadWrite).unwrap();
    let disk = DiskFile::from_handle(
        Box::new(ThinDisk {
            inner: h,
            full: full.clone(),
        }),
        Path::new(DISK),
    )
    .unwrap();
    let j = Journal::open_in(Arc::new(fs.clone()), Path::new(JOURNAL), &disk)
        .unwrap()
        .with_segment_target_bytes(16 << 10);
    let mut a = Applier::new(1, disk, j, POLICY);
    for _ in 0..12 {
        a.apply(&src.group(1)).unwrap();
    }
    let before = a.journal().points().len();
    let segs_before = fs
        .files()
        .iter()
        .filter(|f| f.0.starts_with(JOURNAL))
        .count();
    let mut core = DiskCore::new(a);
    let next_item = src.next();
    let Item::Write {
        lsn,
        timestamp_us,
        offset,
        data,
    } = next_item
    else {
        unreachable!()
    };
    full.store(data[0], Ordering::SeqCst);
    let g = core.check(vec![Work::Batch(
        WriteBatch {
            disk_id: 1,
            first_lsn: lsn,
            writes: vec![Write {
                timestamp_us,
                offset,
                digest: wire_protocol::digest(&data),
                data,
            }],
        },
        0u64,
    )]);
    let r = core.apply(&g).unwrap();
    let after = core.applier().journal().points().len();
    let segs_after = fs
        .files()
        .iter()
        .filter(|f| f.0.starts_with(JOURNAL))
        .count();
    eprintln!(
        "datastore ENOSPC -> {:?}; points {before} -> {after}; journal files {segs_before} -> {segs_after}",
        matches!(r, Applied::Full(_))
    );
    assert_eq!(
        after, before,
        "the retention volume had room: no point should go"
    );
}

/// R6: window pruning drops the segment that holds the record of the oldest point it keeps
/// (its undo records are all at or below that point): the point is listed until the next
/// restart, then gone, inside the window.
#[test]
fn r6_pruning_deletes_the_record_of_a_kept_point() {
    let fs = volume(26);
    let mut src = new_source();
    let policy = RetentionPolicy {
        crash_point_interval_us: 1 << 50,
        window_us: 3_600_000_000,
        quota_bytes: 1 << 30,
    };
    let mut a = open_with(&fs, 4 << 10, policy).unwrap();
    let mut items = src.group(2);
    items.push(Item::Bookmark(Bookmark {
        disk_id: 1,
        lsn: 3,
        kind: BookmarkKind::AppConsistent,
        time_us: 1_000_000,
        group_marker: 0,
        group_members: 0,
        tag: "app-3".into(),
    }));
    src.writes.push((0, Bytes::new())); // lsn 3 is the bookmark
    a.apply(&items).unwrap();
    a.apply(&src.group(2)).unwrap();
    let live: Vec<_> = a
        .journal()
        .points()
        .iter()
        .map(|p| (p.id, p.lsn, p.tag.clone()))
        .collect();
    assert!(export_ok(&fs, &a, &src).is_empty());
    drop(a);
    let a = open_with(&fs, 4 << 10, policy).unwrap();
    let reopened: Vec<_> = a
        .journal()
        .points()
        .iter()
        .map(|p| (p.id, p.lsn, p.tag.clone()))
        .collect();
    assert_eq!(live, reopened, "points inside the window survive a restart");
}
