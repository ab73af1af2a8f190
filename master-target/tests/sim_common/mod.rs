//! What the journal regression tests share: a simulated volume with a disk on it, an
//! applier over it, and the source the disk must equal.
#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use master_target::apply::{Applier, Item, RetentionPolicy};
use master_target::disk::DiskFile;
use master_target::journal::Journal;
use store::{FileSystem, OpenMode, SimFs};

pub const DISK_BYTES: usize = 64 << 10;
pub const DISK: &str = "/ds/d-flat.vmdk";
pub const JOURNAL: &str = "/ret/disk-1";
pub const POLICY: RetentionPolicy = RetentionPolicy {
    crash_point_interval_us: 1_000_000,
    window_us: 3_600_000_000,
    quota_bytes: 1 << 30,
};

pub fn volume(seed: u64) -> SimFs {
    let fs = SimFs::new(seed);
    fs.put(Path::new(DISK), &vec![0xab; DISK_BYTES]);
    fs.create_dir_all(Path::new("/ret")).unwrap();
    fs
}

pub fn open(fs: &SimFs, segment_bytes: u64) -> master_target::Result<Applier> {
    open_with(fs, segment_bytes, POLICY)
}

pub fn open_with(
    fs: &SimFs,
    segment_bytes: u64,
    policy: RetentionPolicy,
) -> master_target::Result<Applier> {
    let h = fs
        .open(Path::new(DISK), OpenMode::ReadWrite)
        .map_err(|source| master_target::Error::Io {
            context: "open".into(),
            source,
        })?;
    let disk = DiskFile::from_handle(h, Path::new(DISK))?;
    let j = Journal::open_in(Arc::new(fs.clone()), Path::new(JOURNAL), &disk)?
        .with_segment_target_bytes(segment_bytes);
    Ok(Applier::new(1, disk, j, policy))
}

/// The source: every write applied so far, to build the expected disk.
pub struct Source {
    pub writes: Vec<(u64, Bytes)>,
}

impl Source {
    /// The next write: 4 KiB of `lsn` at a place that moves with it.
    pub fn next(&mut self) -> Item {
        let lsn = self.writes.len() as u64 + 1;
        let offset = (lsn * 4096 * 3) % DISK_BYTES as u64;
        let data = Bytes::from(vec![lsn as u8; 4096]);
        self.writes.push((offset, data.clone()));
        Item::Write {
            lsn,
            timestamp_us: lsn * 400_000,
            offset,
            data,
        }
    }

    pub fn group(&mut self, n: usize) -> Vec<Item> {
        (0..n).map(|_| self.next()).collect()
    }

    /// Forgets the last `n` writes (a group that failed).
    pub fn unwind(&mut self, n: usize) {
        self.writes.truncate(self.writes.len() - n);
    }

    pub fn image_at(&self, lsn: u64) -> Vec<u8> {
        let mut img = vec![0xab; DISK_BYTES];
        for (o, d) in &self.writes[..lsn as usize] {
            img[*o as usize..*o as usize + d.len()].copy_from_slice(d);
        }
        img
    }
}

pub fn new_source() -> Source {
    Source { writes: Vec::new() }
}

/// The disk equals the source at the committed LSN, which is at least `acked`.
pub fn assert_consistent(fs: &SimFs, a: &Applier, src: &Source, acked: u64) {
    let lsn = a.committed_lsn();
    assert!(
        lsn >= acked,
        "acknowledged lsn {acked} lost: committed {lsn}"
    );
    let disk = fs.contents(Path::new(DISK)).unwrap();
    assert!(
        disk == src.image_at(lsn),
        "disk differs from the source at lsn {lsn}"
    );
}
