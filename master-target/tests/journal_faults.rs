//! At-rest corruption of the retention journal: a flipped byte in each kind of record,
//! in the newest and in the oldest segment. What a commit covered is never rolled back or
//! truncated because of it: the journal refuses to open, and `recover_damaged` keeps the
//! disk as of its last commit.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use master_target::apply::{Applier, RetentionPolicy, Verdict};
use master_target::disk::DiskFile;
use master_target::journal::{recover_damaged, Journal};
use master_target::Error;
use wire_protocol::{Write, WriteBatch};

const DISK_BYTES: u64 = 1 << 20;

fn policy() -> RetentionPolicy {
    RetentionPolicy {
        crash_point_interval_us: 1,
        window_us: u64::MAX / 2,
        quota_bytes: u64::MAX,
    }
}

fn open(dir: &Path) -> Result<Applier, Error> {
    open_rotating(dir, 64 << 10)
}

/// Opens with segments of `segment_bytes`.
fn open_rotating(dir: &Path, segment_bytes: u64) -> Result<Applier, Error> {
    let disk = DiskFile::open(&dir.join("disk.img"))?;
    let journal =
        Journal::open(&dir.join("journal"), &disk)?.with_segment_target_bytes(segment_bytes);
    Ok(Applier::new(1, disk, journal, policy()))
}

/// A journal of `groups` committed groups (8 writes of 4 KiB each, a crash point after
/// each), over several segments, on a disk of bytes `fill` (0: a new disk, whose undo
/// records are UndoZeros records, kind 4; otherwise undo records with data, kind 1).
fn build(dir: &Path, groups: u64, fill: u8) -> u64 {
    std::fs::write(dir.join("disk.img"), vec![fill; DISK_BYTES as usize]).unwrap();
    // Undo records of zeros are small: smaller segments keep their count alike.
    let mut a = open_rotating(dir, if fill == 0 { 2 << 10 } else { 64 << 10 }).unwrap();
    let mut lsn = 1;
    for g in 0..groups {
        let writes = (0..8)
            .map(|i| {
                // Never the disk's fill (0 or 0x5a): a write of what the disk holds is not
                // journaled, and every write here must leave an undo record.
                let data = Bytes::from(vec![1 + ((g * 8 + i) % 0x50) as u8; 4096]);
                Write {
                    timestamp_us: g * 10 + 1,
                    offset: ((g * 8 + i) % 256) * 4096,
                    digest: wire_protocol::digest(&data),
                    data,
                }
            })
            .collect();
        let b = WriteBatch {
            disk_id: 1,
            first_lsn: lsn,
            writes,
        };
        let Verdict::Accept(items) = a.check_batch(&b, lsn) else {
            panic!("accepted")
        };
        a.apply(&items).unwrap();
        lsn += 8;
    }
    lsn - 1
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("journal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// The byte positions of each record of `kind` (1 undo, 2 commit, 3 point, 4 undo of
/// zeros) in a segment.
fn records(seg: &Path, kind: u8) -> Vec<usize> {
    let b = std::fs::read(seg).unwrap();
    let mut out = Vec::new();
    let mut p = 0;
    while p + 16 <= b.len() {
        let len = u32::from_be_bytes(b[p + 8..p + 12].try_into().unwrap()) as usize;
        if b[p + 4] == kind {
            out.push(p);
        }
        p += 16 + len;
    }
    out
}

fn flip(seg: &Path, at: usize) {
    let mut b = std::fs::read(seg).unwrap();
    b[at] ^= 0x04;
    std::fs::write(seg, b).unwrap();
}

#[test]
fn a_flipped_byte_in_committed_records_is_corruption_never_a_rollback() {
    // (segment: newest or oldest, record kind, which one of them, byte offset within it)
    let cases = [
        ("newest", 1u8, "last", 40usize), // the body of the newest undo record
        ("newest", 1, "last", 9),         // its header (length)
        ("newest", 1, "first", 40),
        ("newest", 3, "last", 20), // a point record
        ("oldest", 1, "first", 9), // an undo record's header in a sealed segment
        ("oldest", 3, "first", 20),
        ("oldest", 2, "last", 20), // a commit inside a sealed segment: its twin remains
        ("newest", 4, "last", 40), // an undo of zeros: its length
        ("newest", 4, "first", 9),
        ("oldest", 4, "first", 9), // its header, in a sealed segment
    ];
    for (which_seg, kind, which, off) in cases {
        let dir = tempfile::tempdir().unwrap();
        // 13 groups: the newest segment holds the last one (segments rotate every two).
        let committed = build(dir.path(), 13, if kind == 4 { 0 } else { 0x5a });
        let disk_before = std::fs::read(dir.path().join("disk.img")).unwrap();
        let segs = segments(dir.path());
        assert!(segs.len() >= 3, "{segs:?}");
        let seg = if which_seg == "newest" {
            segs.last().unwrap().clone()
        } else {
            segs[0].clone()
        };
        let recs = records(&seg, kind);
        let at = if which == "last" {
            *recs.last().unwrap()
        } else {
            recs[0]
        } + off;
        flip(&seg, at);
        let what = format!("{which_seg} segment, kind {kind}, {which} record, byte {off}");
        match open(dir.path()) {
            // A commit's twin keeps the journal whole.
            Ok(a) if kind == 2 => assert_eq!(a.committed_lsn(), committed, "{what}"),
            Ok(a) => panic!(
                "{what}: opened at lsn {} (committed {committed})",
                a.committed_lsn()
            ),
            Err(e) => assert!(matches!(e, Error::JournalCorrupt { .. }), "{what}: {e}"),
        }
        // Nothing was rolled back: the disk is as committed.
        assert_eq!(
            std::fs::read(dir.path().join("disk.img")).unwrap(),
            disk_before,
            "{what}"
        );
        if kind == 2 {
            continue;
        }
        // The defined recovery: the journal aside, the disk as of its last commit.
        let disk = DiskFile::open(&dir.path().join("disk.img")).unwrap();
        let (lsn, aside) = recover_damaged(&dir.path().join("journal"), &disk).unwrap();
        drop(disk);
        assert_eq!(lsn, committed, "{what}");
        assert!(aside.exists());
        let a = open(dir.path()).unwrap();
        assert_eq!(a.committed_lsn(), committed, "{what}");
        assert!(
            a.journal().points().is_empty(),
            "{what}: earlier points are gone"
        );
        assert_eq!(
            std::fs::read(dir.path().join("disk.img")).unwrap(),
            disk_before,
            "{what}"
        );
    }
}

#[test]
fn a_flipped_undo_body_in_a_sealed_segment_fails_the_export_never_a_wrong_image() {
    // (disk fill, record kind, byte flipped: data; the zeros' offset; their length)
    for (fill, kind, at) in [(0x5a, 1u8, 100), (0, 4, 36), (0, 4, 44)] {
        let what = format!("kind {kind}, byte {at}");
        let dir = tempfile::tempdir().unwrap();
        let committed = build(dir.path(), 13, fill);
        let seg = segments(dir.path())[0].clone();
        // Sealed segments' undo bodies are checked when an export reads them, not at open.
        // A record of the second group: the oldest point (after the first group) needs it.
        flip(&seg, records(&seg, kind)[10] + at);
        exports_fail(dir.path(), committed, &what);
    }
}

/// The journal opens at `committed`, and exporting its oldest point fails as corrupt.
fn exports_fail(dir: &Path, committed: u64, what: &str) {
    let a = open(dir).unwrap();
    assert_eq!(a.committed_lsn(), committed, "{what}");
    let oldest = a.journal().points().first().unwrap().clone();
    let out = std::fs::File::create(dir.join("out.img")).unwrap();
    // The export's size: the rewind checks every record against it.
    out.set_len(DISK_BYTES).unwrap();
    let e = a
        .journal()
        .rewind(oldest.lsn, &out, &mut |_, _| {})
        .unwrap_err();
    assert!(matches!(e, Error::JournalCorrupt { .. }), "{what}: {e}");
}

#[test]
fn a_flipped_byte_in_the_newest_commit_keeps_its_twin_and_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let committed = build(dir.path(), 5, 0x5a);
    let seg = segments(dir.path()).pop().unwrap();
    let commits = records(&seg, 2);
    // Either copy of the newest commit.
    for nth in [commits.len() - 2, commits.len() - 1] {
        let d2 = tempfile::tempdir().unwrap();
        std::fs::copy(dir.path().join("disk.img"), d2.path().join("disk.img")).unwrap();
        std::fs::create_dir_all(d2.path().join("journal")).unwrap();
        for s in segments(dir.path()) {
            std::fs::copy(&s, d2.path().join("journal").join(s.file_name().unwrap())).unwrap();
        }
        let s2 = segments(d2.path()).pop().unwrap();
        flip(&s2, commits[nth] + 20);
        let a = open(d2.path()).unwrap();
        assert_eq!(
            a.committed_lsn(),
            committed,
            "copy {nth}: the group stays committed"
        );
    }
}

/// A damaged journal set aside during a resync: the fresh one still says a resync is under
/// way (no point of the half-resynced disk), and says nothing of one that completed.
#[test]
fn recovery_of_a_damaged_journal_keeps_a_resync_under_way() {
    use master_target::journal::{encode_undo, PointKind};
    for completed in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("disk.img"), vec![0x5a; DISK_BYTES as usize]).unwrap();
        let disk = DiskFile::open(&dir.path().join("disk.img")).unwrap();
        let jdir = dir.path().join("journal");
        let mut j = Journal::open(&jdir, &disk).unwrap();
        let marker = |lsn: u64, kind| (lsn, lsn * 10, kind, "r".to_string(), (0, 0));
        j.commit(1, 10, vec![marker(1, PointKind::ResyncStarted)])
            .unwrap();
        let mut undo = Vec::new();
        encode_undo(2, 20, 0, &[0x5a; 4096], &mut undo);
        j.append(&undo).unwrap();
        j.commit(2, 20, Vec::new()).unwrap();
        if completed {
            j.commit(3, 30, vec![marker(3, PointKind::ResyncCompleted)])
                .unwrap();
        }
        drop(j);
        let seg = segments(dir.path()).pop().unwrap();
        flip(&seg, records(&seg, 1)[0] + 30);
        assert!(matches!(
            Journal::open(&jdir, &disk),
            Err(Error::JournalCorrupt { .. })
        ));
        recover_damaged(&jdir, &disk).unwrap();
        let j = Journal::open(&jdir, &disk).unwrap();
        assert_eq!(j.resyncing(), !completed, "completed: {completed}");
        assert_eq!(j.committed_lsn(), if completed { 3 } else { 2 });
    }
}
