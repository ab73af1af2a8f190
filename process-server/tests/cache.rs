//! The cache log: reopen, torn tails, corruption detection, trimming.

use std::fs::OpenOptions;
use std::io::Write as _;

use bytes::{Bytes, BytesMut};
use process_server::cache::DiskCache;
use process_server::Error;
use wire_protocol::{digest, Message, MessageCodec, Write, WriteBatch};

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

fn segments(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "fbc"))
        .collect();
    v.sort();
    v
}

#[test]
fn reopen_keeps_records_and_truncates_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = DiskCache::open(dir.path(), 0).unwrap();
    for lsn in 1..=10 {
        c.append(lsn, lsn, lsn, &frame(lsn, 1000)).unwrap();
    }
    c.sync().unwrap();
    drop(c);
    // A crash mid-append: half a record at the end.
    let seg = segments(dir.path()).pop().unwrap();
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(&frame(11, 1000)[..300]).unwrap();
    drop(f);
    let c = DiskCache::open(dir.path(), 0).unwrap();
    assert_eq!(c.last_lsn(), 10);
    let entries = c.entries_from(4, 100);
    assert_eq!(entries.first().unwrap().first_lsn, 4);
    assert_eq!(entries.len(), 7);
    for e in &entries {
        let f = c.read(e).unwrap();
        let Message::WriteBatch(b) = MessageCodec::default().decode_frame(f).unwrap() else {
            panic!()
        };
        assert_eq!(b.first_lsn, e.first_lsn);
    }
}

#[test]
fn a_flipped_byte_is_detected_and_never_shipped() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = DiskCache::open(dir.path(), 0).unwrap();
    for lsn in 1..=3 {
        c.append(lsn, lsn, lsn, &frame(lsn, 4096)).unwrap();
    }
    c.sync().unwrap();
    let seg = segments(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let e = c.entries_from(2, 1)[0];
    let at = e.pos as usize + 36 + 2000; // inside record 2's block data
    bytes[at] ^= 0x10;
    std::fs::write(&seg, &bytes).unwrap();
    match c.read(&e) {
        Err(Error::CacheCorrupt {
            first_lsn,
            last_lsn,
            ..
        }) => assert_eq!((first_lsn, last_lsn), (2, 2)),
        other => panic!("corruption not detected: {other:?}"),
    }
    assert!(
        c.read(&c.entries_from(3, 1)[0]).is_ok(),
        "other records are unaffected"
    );
}

#[test]
fn trim_deletes_sealed_segments_only_once_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = DiskCache::open(dir.path(), 0).unwrap();
    // 8 MiB records: the 64 MiB segment target seals a segment every 8 records.
    let f = frame(1, 8 << 20);
    for lsn in 1..=20 {
        let mut rec = f.clone();
        rec.truncate(f.len()); // same bytes; the LSNs live in the cache header
        c.append(lsn, lsn, lsn, &rec).unwrap();
    }
    c.sync().unwrap();
    let before = segments(dir.path()).len();
    assert!(before >= 3, "{before} segments");
    c.trim(5).unwrap();
    assert_eq!(
        segments(dir.path()).len(),
        before,
        "segment 1 still holds unacknowledged records"
    );
    c.trim(17).unwrap();
    assert!(segments(dir.path()).len() < before);
    assert_eq!(c.entries_from(0, 100).first().unwrap().first_lsn, 18);
    c.trim(20).unwrap();
    assert_eq!(c.last_lsn(), 20);
    assert_eq!(c.backlog_bytes(), 0);
    assert!(
        segments(dir.path()).is_empty(),
        "every acknowledged segment goes, the active one too"
    );
    drop(c);
    assert_eq!(
        DiskCache::open(dir.path(), 0).unwrap().last_lsn(),
        20,
        "the last LSN is known after a restart all the same"
    );
}

#[test]
fn a_corrupt_header_found_at_open_marks_its_range_lost_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = DiskCache::open(dir.path(), 0).unwrap();
    for lsn in 1..=10 {
        c.append(lsn, lsn, lsn, &frame(lsn, 3000)).unwrap();
    }
    c.sync().unwrap();
    let e4 = c.entries_from(4, 1)[0];
    drop(c);
    // Corrupt record 4's header: its length can no longer be trusted.
    let seg = segments(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[e4.pos as usize + 14] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    let c = DiskCache::open(dir.path(), 0).unwrap();
    assert_eq!(
        c.last_lsn(),
        10,
        "records after the bad header are still there"
    );
    let entries = c.entries_from(1, 100);
    assert_eq!(
        entries
            .iter()
            .map(|e| (e.first_lsn, e.last_lsn, e.lost))
            .collect::<Vec<_>>()[2..5],
        [(3, 3, false), (4, 4, true), (5, 5, false)]
    );
    assert!(
        matches!(
            c.read(&entries[3]),
            Err(Error::CacheCorrupt {
                first_lsn: 4,
                last_lsn: 4,
                ..
            })
        ),
        "the lost range is shipped as corrupt"
    );
    assert!(c.read(&entries[4]).is_ok());
    assert_eq!(
        std::fs::read(&seg).unwrap().len(),
        bytes.len(),
        "nothing acknowledged is truncated"
    );
}

/// Every LSN range the cache holds at open: (first, last, lost).
fn ranges(c: &DiskCache) -> Vec<(u64, u64, bool)> {
    c.entries_from(0, 1 << 20)
        .iter()
        .map(|e| (e.first_lsn, e.last_lsn, e.lost))
        .collect()
}

#[test]
fn a_flipped_byte_in_the_newest_acknowledged_record_header_is_a_lost_range_not_a_torn_tail() {
    // The newest record, acknowledged (synced), then one byte of its header flips at rest.
    for target in ["header", "first sync mark", "second sync mark"] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = DiskCache::open(dir.path(), 0).unwrap();
        for lsn in 1..=5 {
            c.append(lsn, lsn, lsn, &frame(lsn, 2000)).unwrap();
        }
        c.sync().unwrap();
        let last = c.entries_from(5, 1)[0];
        let seg = segments(dir.path()).pop().unwrap();
        let mut bytes = std::fs::read(&seg).unwrap();
        let marks_at = bytes.len() - 72;
        let at = match target {
            "header" => last.pos as usize + 10,
            "first sync mark" => marks_at + 12,
            _ => marks_at + 36 + 12,
        };
        bytes[at] ^= 0x01;
        std::fs::write(&seg, &bytes).unwrap();
        drop(c);
        let c = DiskCache::open(dir.path(), 0).unwrap();
        let r = ranges(&c);
        match target {
            // The record is gone, its LSN is not: it ships as a resync marker.
            "header" => assert_eq!(r.last(), Some(&(5, 5, true)), "{target}: {r:?}"),
            // One copy of the mark is enough: nothing is lost, nothing truncated.
            _ => assert!(r.iter().all(|e| !e.2) && r.len() == 5, "{target}: {r:?}"),
        }
        assert_eq!(c.last_lsn(), 5, "{target}: acknowledged LSNs never vanish");
    }
}

#[test]
fn what_was_never_synced_is_a_torn_tail_and_goes() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = DiskCache::open(dir.path(), 0).unwrap();
    for lsn in 1..=3 {
        c.append(lsn, lsn, lsn, &frame(lsn, 2000)).unwrap();
    }
    c.sync().unwrap();
    // Appended, never synced (never acknowledged), then damaged by the crash.
    c.append(4, 4, 4, &frame(4, 2000)).unwrap();
    let e = c.entries_from(4, 1)[0];
    drop(c);
    let seg = segments(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[e.pos as usize + 5] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();
    let c = DiskCache::open(dir.path(), 0).unwrap();
    assert_eq!(
        ranges(&c),
        vec![(1, 1, false), (2, 2, false), (3, 3, false)]
    );
    assert_eq!(c.last_lsn(), 3);
}

#[test]
fn acknowledged_records_give_their_room_back_and_the_stream_resumes_after_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = DiskCache::open(dir.path(), 0).unwrap();
    for lsn in 1..=40 {
        c.append(lsn, lsn, lsn, &frame(lsn, 64 << 10)).unwrap();
    }
    c.sync().unwrap();
    let before = c.bytes();
    assert!(before > 2 << 20);
    c.trim(40).unwrap();
    c.append(41, 41, 41, &frame(41, 100)).unwrap();
    c.sync().unwrap();
    c.trim(41).unwrap();
    assert!(
        c.bytes() < 1 << 20,
        "the volume gets its room back: {} bytes",
        c.bytes()
    );
    drop(c);
    // After a restart with nothing cached, the stream still resumes after lsn 41.
    let c = DiskCache::open(dir.path(), 0).unwrap();
    assert_eq!(c.last_lsn(), 41);
}

#[test]
fn a_drained_cache_keeps_its_position_and_a_damaged_one_defers_to_the_master_target() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = DiskCache::open(dir.path(), 0).unwrap();
    // Over IDLE_ROTATE_BYTES of records, all acknowledged: every segment goes.
    for lsn in 1..=40 {
        c.append(lsn, lsn, lsn, &frame(lsn, 32 << 10)).unwrap();
    }
    c.sync().unwrap();
    c.trim(40).unwrap();
    drop(c);
    assert!(segments(dir.path())
        .iter()
        .all(|s| std::fs::metadata(s).unwrap().len() == 0));
    assert_eq!(DiskCache::open(dir.path(), 0).unwrap().last_lsn(), 40);
    // A flipped byte in the position: it reads as unknown (0), never as another number.
    let acked = dir.path().join("acked-lsn");
    let mut b = std::fs::read(&acked).unwrap();
    b[0] ^= 0x01;
    std::fs::write(&acked, b).unwrap();
    let mut c = DiskCache::open(dir.path(), 0).unwrap();
    assert!(!c.position_known(), "no agent may be told where to resume");
    // The master target says where the disk stands: nothing was acknowledged meanwhile, so
    // nothing is lost, and the stream continues after it.
    assert_eq!(c.adopt_remote(40).unwrap(), None);
    assert!(c.position_known());
    assert_eq!(c.last_lsn(), 40);
    drop(c);
    assert_eq!(DiskCache::open(dir.path(), 0).unwrap().last_lsn(), 40);
    // A master target ahead of a known position (a cache restored from an older copy that
    // went on taking writes): the writes since are suspect, the disk must be resynced.
    let mut c = DiskCache::open(dir.path(), 0).unwrap();
    c.append(41, 41, 41, &frame(41, 100)).unwrap();
    c.sync().unwrap();
    assert_eq!(c.adopt_remote(60).unwrap(), Some((41, 60)));
    assert_eq!(c.last_lsn(), 60);
}

/// Open descriptors of deleted segment files in `dir` (their blocks stay allocated).
fn deleted_still_open(dir: &std::path::Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .map(|p| p.display().to_string())
        .filter(|p| p.starts_with(&dir.display().to_string()) && p.ends_with("(deleted)"))
        .count()
}

/// The uplink reads with descriptors of its own; a trimmed segment's blocks must go back to
/// the volume all the same (a full volume waits for exactly them: the cache-full fault test
/// hung when they did not).
#[test]
fn a_trimmed_segment_read_by_the_uplink_gives_its_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = DiskCache::open(dir.path(), 0).unwrap();
    for lsn in 1..=3 {
        c.append(lsn, lsn, lsn, &frame(lsn, 512 << 10)).unwrap();
    }
    c.sync().unwrap();
    for e in c.entries_from(1, 10) {
        let reader = c.reader(&e).unwrap();
        assert!(reader.read().is_ok());
    }
    let first = segments(dir.path());
    // All acknowledged, over the idle-rotation size: a new segment, the old one deleted.
    c.trim(3).unwrap();
    c.append(4, 4, 4, &frame(4, 100)).unwrap();
    c.trim(4).unwrap();
    assert!(
        segments(dir.path()).iter().all(|s| !first.contains(s)),
        "the old segment is gone"
    );
    assert_eq!(
        deleted_still_open(dir.path()),
        0,
        "no descriptor keeps its blocks"
    );
}
