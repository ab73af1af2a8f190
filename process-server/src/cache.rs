//! The durable cache: an append-only, segmented, checksummed log per disk.
//!
//! # Design constraints
//! - A record is acknowledged to the agent only once fsynced (the connection groups the
//!   fsyncs of everything it read in one burst).
//! - Records are the frames exactly as the agent sent them (they carry their own CRC32Cs),
//!   behind a small header of their own, so a corrupt record is detected and never shipped.
//! - Memory stays bounded whatever the backlog: records stay on disk; memory holds an index
//!   entry of [`INDEX_ENTRY_BYTES`] per record.
//! - Segments are deleted whole once the master target has acknowledged every LSN in them.
//!
//! # Layout
//! `CACHE_DIR/disk-ID/seg-NNNNNNNN.fbc`, each a sequence of:
//! ```text
//! struct CacheRecord {          // big-endian; don't reorder
//!     magic:      [u8; 4],      // b"FBC1"
//!     first_lsn:  u64,
//!     last_lsn:   u64,
//!     first_ts_us: u64,         // capture time of the oldest write, for RPO
//!     frame_len:  u32,          // <= wire_protocol::frame::MAX_FRAME_LEN
//!     header_crc: u32,          // CRC32C of the 32 bytes above
//!     frame:      [u8; frame_len], // a wire frame, with its own CRCs
//! }
//! ```
//! `CACHE_DIR/disk-ID/disk.json` holds the disk's attach request.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use tokio_util::codec::Decoder;
use wire_protocol::frame::{FrameCodec, MAX_FRAME_LEN};

use crate::error::{Error, IoContext, Result};

const MAGIC: [u8; 4] = *b"FBC1";
/// Bytes of a record's header.
pub const RECORD_HEADER_LEN: usize = 36;
/// A segment is sealed once it holds this much.
pub const SEGMENT_TARGET_BYTES: u64 = 64 << 20;
/// Memory per cached record in the index (what bounds memory with a large backlog).
pub const INDEX_ENTRY_BYTES: usize = size_of::<Entry>();

/// Where one record is.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// Segment number.
    pub seg: u32,
    /// Byte position of the record header.
    pub pos: u64,
    /// LSN range.
    pub first_lsn: u64,
    /// LSN range.
    pub last_lsn: u64,
    /// Capture time of its oldest write.
    pub first_ts_us: u64,
    /// Frame bytes.
    pub frame_len: u32,
    /// The records of this LSN range were lost to a corrupt record header found at open:
    /// shipping treats it like a corrupt record (resync marker, the agent resyncs).
    pub lost: bool,
}

/// The cache log of one disk.
#[derive(Debug)]
pub struct DiskCache {
    dir: PathBuf,
    /// Records in LSN order.
    entries: std::collections::VecDeque<Entry>,
    active_seq: u32,
    /// The segment being appended to; opened (created) at the first append into it, so an
    /// idle or retired disk leaves no empty file. Never in append mode: Linux ignores the
    /// offset of a positioned write under O_APPEND, and the index needs the offset honoured.
    active: Option<File>,
    active_len: u64,
    segs: Vec<(u32, u64)>,
    /// LSNs up to this are acknowledged by the master target (and trimmed).
    pub trimmed_lsn: u64,
    /// Record bytes trimmed since open (for the drain rate).
    pub trimmed_bytes: u64,
}

/// Turns every hole in the LSN sequence of `entries` (records hidden by a corrupt header)
/// into a lost entry, and drops records that repeat LSNs already indexed.
fn fill_gaps(entries: std::collections::VecDeque<Entry>) -> std::collections::VecDeque<Entry> {
    let mut out = std::collections::VecDeque::with_capacity(entries.len());
    let mut prev: Option<u64> = None;
    for e in entries {
        match prev {
            Some(p) if e.last_lsn <= p => continue,
            Some(p) if e.first_lsn > p + 1 => {
                out.push_back(Entry {
                    first_lsn: p + 1,
                    last_lsn: e.first_lsn - 1,
                    frame_len: 0,
                    lost: true,
                    ..e
                });
            }
            _ => {}
        }
        prev = Some(e.last_lsn);
        out.push_back(e);
    }
    out
}

fn seg_path(dir: &Path, seq: u32) -> PathBuf {
    dir.join(format!("seg-{seq:08}.fbc"))
}

fn header(
    first_lsn: u64,
    last_lsn: u64,
    first_ts_us: u64,
    frame_len: u32,
) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4..12].copy_from_slice(&first_lsn.to_be_bytes());
    h[12..20].copy_from_slice(&last_lsn.to_be_bytes());
    h[20..28].copy_from_slice(&first_ts_us.to_be_bytes());
    h[28..32].copy_from_slice(&frame_len.to_be_bytes());
    let crc = crc32c::crc32c(&h[..32]);
    h[32..36].copy_from_slice(&crc.to_be_bytes());
    h
}

fn parse_header(h: &[u8; RECORD_HEADER_LEN]) -> Option<(u64, u64, u64, u32)> {
    let be = |r: std::ops::Range<usize>| u64::from_be_bytes(h[r].try_into().expect("8"));
    let crc = u32::from_be_bytes(h[32..36].try_into().expect("4"));
    if h[..4] != MAGIC || crc32c::crc32c(&h[..32]) != crc {
        return None;
    }
    let frame_len = u32::from_be_bytes(h[28..32].try_into().expect("4"));
    if frame_len as usize > MAX_FRAME_LEN {
        return None;
    }
    Some((be(4..12), be(12..20), be(20..28), frame_len))
}

impl DiskCache {
    /// Opens (or creates) a disk's cache, scanning every segment. A torn tail of the last
    /// segment (a crash mid-append, never acknowledged) is truncated.
    pub fn open(dir: &Path, trimmed_lsn: u64) -> Result<DiskCache> {
        fs::create_dir_all(dir).ctx(|| format!("create cache directory {}", dir.display()))?;
        let mut seqs: Vec<u32> = fs::read_dir(dir)
            .ctx(|| format!("list {}", dir.display()))?
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_prefix("seg-")?
                    .strip_suffix(".fbc")?
                    .parse()
                    .ok()
            })
            .collect();
        seqs.sort();
        let mut entries = std::collections::VecDeque::new();
        let mut segs = Vec::new();
        for (i, &seq) in seqs.iter().enumerate() {
            let path = seg_path(dir, seq);
            let data = fs::read(&path).ctx(|| format!("read {}", path.display()))?;
            let len = data.len() as u64;
            let last_segment = i + 1 == seqs.len();
            let header_at = |p: usize| -> Option<(u64, u64, u64, u32)> {
                let h: [u8; RECORD_HEADER_LEN] =
                    data.get(p..p + RECORD_HEADER_LEN)?.try_into().ok()?;
                parse_header(&h).filter(|r| p + RECORD_HEADER_LEN + r.3 as usize <= data.len())
            };
            let mut p = 0usize;
            while p + RECORD_HEADER_LEN <= data.len() {
                if let Some((first_lsn, last_lsn, first_ts_us, frame_len)) = header_at(p) {
                    entries.push_back(Entry {
                        seg: seq,
                        pos: p as u64,
                        first_lsn,
                        last_lsn,
                        first_ts_us,
                        frame_len,
                        lost: false,
                    });
                    p += RECORD_HEADER_LEN + frame_len as usize;
                    continue;
                }
                // A bad header: if a valid record follows, this is corruption, not a torn tail.
                // Skip to it; the LSNs in between become a lost range (see below).
                match (p + 1..data.len().saturating_sub(RECORD_HEADER_LEN - 1))
                    .find(|&q| data[q..q + 4] == MAGIC && header_at(q).is_some())
                {
                    Some(q) => {
                        tracing::error!(segment = %path.display(), offset = p, resumes_at = q, "corrupt cache record header; the records it hides are marked lost and will be resynced from the agent");
                        p = q;
                    }
                    None => break,
                }
            }
            let mut pos = p as u64;
            if pos < len {
                if !last_segment {
                    tracing::error!(segment = %path.display(), offset = pos, "corrupt cache record at the end of a sealed segment; its range is marked lost");
                    pos = len;
                } else {
                    tracing::warn!(segment = %path.display(), offset = pos, "truncating a torn cache tail (never acknowledged)");
                    let w = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .ctx(|| format!("open {}", path.display()))?;
                    w.set_len(pos)
                        .ctx(|| format!("truncate {}", path.display()))?;
                    w.sync_all().ctx(|| format!("fsync {}", path.display()))?;
                }
            }
            segs.push((seq, pos));
        }
        let entries = fill_gaps(entries);
        let active_seq = segs.last().map_or(1, |s| s.0);
        if segs.is_empty() {
            segs.push((1, 0));
        }
        let active_len = segs.last().expect("one").1;
        let mut c = DiskCache {
            dir: dir.into(),
            entries,
            active_seq,
            active: None,
            active_len,
            segs,
            trimmed_lsn,
            trimmed_bytes: 0,
        };
        c.trim(trimmed_lsn)?;
        Ok(c)
    }

    /// The highest LSN cached (or trimmed, if the cache is empty).
    pub fn last_lsn(&self) -> u64 {
        self.entries.back().map_or(self.trimmed_lsn, |e| e.last_lsn)
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.segs.iter().map(|s| s.1).sum()
    }

    /// Bytes of records not yet acknowledged by the master target.
    pub fn backlog_bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| RECORD_HEADER_LEN as u64 + u64::from(e.frame_len))
            .sum()
    }

    /// Capture time of the oldest write not yet acknowledged by the master target.
    pub fn oldest_unacked_ts_us(&self) -> Option<u64> {
        self.entries.front().map(|e| e.first_ts_us)
    }

    /// Appends one frame covering `first_lsn..=last_lsn` (not yet durable: see [`DiskCache::sync`]).
    pub fn append(
        &mut self,
        first_lsn: u64,
        last_lsn: u64,
        first_ts_us: u64,
        frame: &[u8],
    ) -> Result<()> {
        assert!(
            first_lsn == self.last_lsn() + 1 && last_lsn >= first_lsn,
            "callers append in LSN order"
        );
        if self.active_len >= SEGMENT_TARGET_BYTES {
            self.sync()?;
            self.active_seq += 1;
            self.active = None;
            self.active_len = 0;
            self.segs.push((self.active_seq, 0));
        }
        let h = header(first_lsn, last_lsn, first_ts_us, frame.len() as u32);
        let mut rec = Vec::with_capacity(RECORD_HEADER_LEN + frame.len());
        rec.extend_from_slice(&h);
        rec.extend_from_slice(frame);
        let at = self.active_len;
        self.active_file()?
            .write_all_at(&rec, at)
            .ctx(|| format!("append to cache {}", self.dir.display()))?;
        self.entries.push_back(Entry {
            seg: self.active_seq,
            pos: self.active_len,
            first_lsn,
            last_lsn,
            first_ts_us,
            frame_len: frame.len() as u32,
            lost: false,
        });
        self.active_len += rec.len() as u64;
        self.segs.last_mut().expect("one").1 = self.active_len;
        Ok(())
    }

    /// The active segment, opened or created (its directory entry made durable) on first use.
    fn active_file(&mut self) -> Result<&File> {
        if self.active.is_none() {
            let path = seg_path(&self.dir, self.active_seq);
            let created = !path.exists();
            let f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .read(true)
                .open(&path)
                .ctx(|| format!("open {}", path.display()))?;
            if created {
                File::open(&self.dir)
                    .and_then(|d| d.sync_all())
                    .ctx(|| format!("fsync {}", self.dir.display()))?;
            }
            self.active = Some(f);
        }
        Ok(self.active.as_ref().expect("just opened"))
    }

    /// Makes every append durable.
    pub fn sync(&self) -> Result<()> {
        match &self.active {
            Some(f) => f
                .sync_data()
                .ctx(|| format!("fsync cache {}", self.dir.display())),
            None => Ok(()),
        }
    }

    /// Deletes every segment (a retired disk): nothing of the disk's data stays here.
    pub fn remove_all(&mut self) -> Result<()> {
        self.active = None;
        for (seq, _) in self.segs.drain(..) {
            let p = seg_path(&self.dir, seq);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::Io {
                        context: format!("remove {}", p.display()),
                        source: e,
                    })
                }
            }
        }
        self.entries.clear();
        self.active_seq += 1;
        self.active_len = 0;
        self.segs.push((self.active_seq, 0));
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .ctx(|| format!("fsync {}", self.dir.display()))
    }

    /// Forgets records the master target has made durable; deletes segments left empty.
    pub fn trim(&mut self, durable_lsn: u64) -> Result<()> {
        self.trimmed_lsn = self.trimmed_lsn.max(durable_lsn);
        while self
            .entries
            .front()
            .is_some_and(|e| e.last_lsn <= self.trimmed_lsn)
        {
            let e = self.entries.pop_front().expect("checked");
            self.trimmed_bytes += RECORD_HEADER_LEN as u64 + u64::from(e.frame_len);
        }
        let first_needed = self.entries.front().map_or(self.active_seq, |e| e.seg);
        while self.segs.len() > 1 && self.segs[0].0 < first_needed {
            let (seq, _) = self.segs.remove(0);
            let p = seg_path(&self.dir, seq);
            fs::remove_file(&p).ctx(|| format!("remove {}", p.display()))?;
        }
        Ok(())
    }

    /// Index entries of records holding LSNs from `from_lsn` on, at most `max` of them.
    pub fn entries_from(&self, from_lsn: u64, max: usize) -> Vec<Entry> {
        let start = self.entries.partition_point(|e| e.last_lsn < from_lsn);
        self.entries.iter().skip(start).take(max).copied().collect()
    }

    /// Reads and verifies one record's frame.
    pub fn read(&self, e: &Entry) -> Result<wire_protocol::frame::Frame> {
        let path = seg_path(&self.dir, e.seg);
        let corrupt = |detail: String| Error::CacheCorrupt {
            path: path.display().to_string(),
            offset: e.pos,
            detail,
            first_lsn: e.first_lsn,
            last_lsn: e.last_lsn,
        };
        if e.lost {
            return Err(corrupt("records lost to a corrupt record header".into()));
        }
        let f = File::open(&path).ctx(|| format!("open {}", path.display()))?;
        let mut buf = vec![0u8; RECORD_HEADER_LEN + e.frame_len as usize];
        f.read_exact_at(&mut buf, e.pos)
            .ctx(|| format!("read {}", path.display()))?;
        let h: [u8; RECORD_HEADER_LEN] = buf[..RECORD_HEADER_LEN].try_into().expect("len");
        if parse_header(&h)
            .is_none_or(|(a, b, _, l)| (a, b, l) != (e.first_lsn, e.last_lsn, e.frame_len))
        {
            return Err(corrupt("record header changed on disk".into()));
        }
        let mut frame = BytesMut::from(Bytes::from(buf).slice(RECORD_HEADER_LEN..));
        match FrameCodec::default().decode(&mut frame) {
            Ok(Some(f)) if frame.is_empty() => Ok(f),
            Ok(_) => Err(corrupt("record frame is incomplete".into())),
            Err(err) => Err(corrupt(err.to_string())),
        }
    }
}
