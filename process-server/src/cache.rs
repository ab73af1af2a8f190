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
//! and, at every group commit, after the records are fsynced and before anything is
//! acknowledged, two copies of a sync mark (a flipped byte in one leaves the other), fsynced
//! in turn:
//! ```text
//! struct SyncMark {             // big-endian; don't reorder
//!     magic:      [u8; 4],      // b"FBS1"
//!     zero:       u64,
//!     acked_lsn:  u64,          // every record up to this LSN is durable: acknowledged
//!     time_us:    u64,
//!     zero_len:   u32,
//!     header_crc: u32,
//! }
//! ```
//! At open, damage before the last valid mark was fsynced before it: it is corruption, and
//! the LSNs it hides (up to the last mark's `acked_lsn`) are a lost range, shipped as a
//! resync marker with the agent told. Everything after the last valid mark of the last
//! segment was never acknowledged: the segment ends at the first record there whose header
//! or frame fails its checksum (a torn tail), whatever follows it, because the kernel
//! writes unsynced pages back in any order and a later record may have reached the disk
//! without an earlier one. The cache reads the device, not pages a failed fsync left clean
//! (`FileHandle::drop_cache`), and every open syncs the directory, so no segment holding
//! acknowledged records can lose its name to a crash.
//!
//! `CACHE_DIR/disk-ID/disk.json` holds the disk's attach request; `acked-lsn` how far the
//! master target acknowledged the disk when segments were last deleted, as one line
//! `LSN CRC` (the LSN in 20 decimal digits, CRC32C of them in hex). It is written and
//! fsynced (in place, so a full volume cannot refuse it) *before* any segment is deleted,
//! so a crash between the two never leaves the disk's position known to neither. A damaged or missing `acked-lsn` with no
//! segment left leaves the position unknown (an ERROR): no agent is told where to resume
//! until the master target says ([`DiskCache::adopt_remote`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::BytesMut;
use store::{FileHandle, FileSystem, OpenMode, RealFs};
use wire_protocol::frame::{FrameCodec, MAX_FRAME_LEN};

use crate::error::{Error, IoContext, Result};

const MAGIC: [u8; 4] = *b"FBC1";
const SYNC_MAGIC: [u8; 4] = *b"FBS1";
/// The fewest cache bytes one LSN takes (a write's offset, capture time and digest alone
/// are 48 bytes): bounds how many LSNs damaged bytes can hide, so a mark-shaped run of
/// guest data cannot claim an arbitrary position.
const MIN_BYTES_PER_LSN: usize = 32;
/// Bytes of a record's header.
pub const RECORD_HEADER_LEN: usize = 36;
/// The file that keeps how far the master target acknowledged the disk.
const ACKED_FILE: &str = "acked-lsn";
/// An active segment whose records are all acknowledged is replaced (and deleted) once it
/// holds this much: its space goes back to the volume without waiting for it to fill.
pub const IDLE_ROTATE_BYTES: u64 = 1 << 20;
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
    fs: Arc<dyn FileSystem>,
    dir: PathBuf,
    /// Records in LSN order.
    entries: std::collections::VecDeque<Entry>,
    active_seq: u32,
    /// The segment being appended to; opened (created) at the first append into it, so an
    /// idle or retired disk leaves no empty file. Never in append mode: Linux ignores the
    /// offset of a positioned write under O_APPEND, and the index needs the offset honoured.
    active: Option<Box<dyn FileHandle>>,
    active_len: u64,
    segs: Vec<(u32, u64)>,
    /// LSNs up to this are acknowledged by the master target (and trimmed).
    pub trimmed_lsn: u64,
    /// (last LSN, active segment, its length) at the last successful sync.
    synced: (u64, u32, u64),
    /// Record bytes trimmed since open (for the drain rate).
    pub trimmed_bytes: u64,
    /// Whether this cache knows where the disk's stream stands: false when its only record
    /// of it (`acked-lsn`, with no segment left to say more) is missing or damaged. Then no
    /// agent may be told where to resume until the master target has said (see
    /// [`DiskCache::adopt_remote`]).
    position_known: bool,
    /// Read descriptors of segments, opened once each and shared with [`RecordReader`]s.
    readers: std::collections::HashMap<u32, Arc<dyn FileHandle>>,
}

/// One record, read without the cache's lock (the reader side of a writer/reader split,
/// like vector's disk buffer): the uplink reads with its own descriptor of the segment
/// while ingest appends to the same cache.
#[derive(Debug)]
pub struct RecordReader {
    file: Arc<dyn FileHandle>,
    path: PathBuf,
    entry: Entry,
}

impl RecordReader {
    /// Reads and verifies the record's frame.
    pub fn read(&self) -> Result<wire_protocol::frame::Frame> {
        read_record(&*self.file, &self.path, &self.entry)
    }
}

/// Reads record `e` from `f` (the segment at `path`): its header must be the one indexed,
/// its frame whole. One read into one buffer; the frame is a slice of it.
fn read_record(f: &dyn FileHandle, path: &Path, e: &Entry) -> Result<wire_protocol::frame::Frame> {
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
    let mut buf = BytesMut::zeroed(RECORD_HEADER_LEN + e.frame_len as usize);
    f.read_exact_at(&mut buf, e.pos)
        .ctx(|| format!("read {}", path.display()))?;
    let mut frame = buf.split_off(RECORD_HEADER_LEN);
    let h: [u8; RECORD_HEADER_LEN] = buf[..].try_into().expect("len");
    if parse_header(&h)
        .is_none_or(|(a, b, _, l)| (a, b, l) != (e.first_lsn, e.last_lsn, e.frame_len))
    {
        return Err(corrupt("record header changed on disk".into()));
    }
    match FrameCodec::default().decode(&mut frame) {
        Ok(Some(f)) if frame.is_empty() => Ok(f),
        Ok(_) => Err(corrupt("record frame is incomplete".into())),
        Err(err) => Err(corrupt(err.to_string())),
    }
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

/// The `acked-lsn` line of `lsn` (see the module docs).
fn acked_line(lsn: u64) -> String {
    // Fixed width (20 digits hold any u64): rewritten in place, the file never grows.
    let text = format!("{lsn:020}");
    format!("{text} {:08x}\n", crc32c::crc32c(text.as_bytes()))
}

/// The LSN in a disk's `acked-lsn`: `None` if there is none or it fails its checksum (the
/// master target's position then decides: see [`DiskCache::adopt_remote`]).
fn read_acked(fs: &dyn FileSystem, dir: &Path) -> Option<u64> {
    let bytes = read_all(fs, &dir.join(ACKED_FILE)).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (lsn, crc) = text.trim_end_matches('\n').split_once(' ')?;
    let ok = u32::from_str_radix(crc, 16).ok()? == crc32c::crc32c(lsn.as_bytes());
    ok.then(|| lsn.parse().ok()).flatten()
}

/// A whole file as the device holds it (the clean cache dropped first: pages a failed
/// fsync left clean read back as if written, and never will be).
fn read_all(fs: &dyn FileSystem, path: &Path) -> std::io::Result<Vec<u8>> {
    let f = fs.open(path, OpenMode::Read)?;
    f.drop_cache()?;
    let mut data = vec![0u8; f.len()? as usize];
    f.read_exact_at(&mut data, 0)?;
    Ok(data)
}

fn sync_dir(fs: &dyn FileSystem, dir: &Path) -> Result<()> {
    fs.sync_dir(dir).ctx(|| format!("fsync {}", dir.display()))
}

fn seg_path(dir: &Path, seq: u32) -> PathBuf {
    dir.join(format!("seg-{seq:08}.fbc"))
}

fn header(
    magic: [u8; 4],
    first_lsn: u64,
    last_lsn: u64,
    first_ts_us: u64,
    frame_len: u32,
) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[..4].copy_from_slice(&magic);
    h[4..12].copy_from_slice(&first_lsn.to_be_bytes());
    h[12..20].copy_from_slice(&last_lsn.to_be_bytes());
    h[20..28].copy_from_slice(&first_ts_us.to_be_bytes());
    h[28..32].copy_from_slice(&frame_len.to_be_bytes());
    let crc = crc32c::crc32c(&h[..32]);
    h[32..36].copy_from_slice(&crc.to_be_bytes());
    h
}

/// A header's fields: (first LSN, last LSN, first timestamp, frame length).
type Fields = (u64, u64, u64, u32);

/// A frame record's header: (first LSN, last LSN, first timestamp, frame length).
fn parse_header(h: &[u8; RECORD_HEADER_LEN]) -> Option<Fields> {
    parse_any(h).filter(|r| r.0 == MAGIC).map(|r| r.1)
}

/// A valid header of either kind, with its magic.
fn parse_any(h: &[u8; RECORD_HEADER_LEN]) -> Option<([u8; 4], Fields)> {
    let be = |r: std::ops::Range<usize>| u64::from_be_bytes(h[r].try_into().expect("8"));
    let crc = u32::from_be_bytes(h[32..36].try_into().expect("4"));
    let magic: [u8; 4] = h[..4].try_into().expect("4");
    if (magic != MAGIC && magic != SYNC_MAGIC) || crc32c::crc32c(&h[..32]) != crc {
        return None;
    }
    let frame_len = u32::from_be_bytes(h[28..32].try_into().expect("4"));
    if frame_len as usize > MAX_FRAME_LEN || (magic == SYNC_MAGIC && frame_len != 0) {
        return None;
    }
    Some((magic, (be(4..12), be(12..20), be(20..28), frame_len)))
}

/// Whether `bytes` are exactly one frame whose checksums hold.
fn frame_whole(bytes: &[u8]) -> bool {
    let mut buf = BytesMut::from(bytes);
    matches!(FrameCodec::default().decode(&mut buf), Ok(Some(_)) if buf.is_empty())
}

/// The numbers of the segments in `dir` (made if missing), oldest first.
fn segment_numbers(fs: &dyn FileSystem, dir: &Path) -> Result<Vec<u32>> {
    fs.create_dir_all(dir)
        .ctx(|| format!("create cache directory {}", dir.display()))?;
    let mut seqs: Vec<u32> = fs
        .list(dir)
        .ctx(|| format!("list {}", dir.display()))?
        .iter()
        .filter_map(|n| n.strip_prefix("seg-")?.strip_suffix(".fbc")?.parse().ok())
        .collect();
    seqs.sort();
    Ok(seqs)
}

/// Where a segment read at open ends, its good part ending at `good` of `len` bytes: a
/// sealed segment keeps its damaged end (its range is lost), the last segment's torn tail
/// (never acknowledged) is cut off.
fn end_segment(fs: &dyn FileSystem, path: &Path, good: u64, len: u64, last: bool) -> Result<u64> {
    if good == len {
        return Ok(len);
    }
    if !last {
        tracing::error!(segment = %path.display(), offset = good, "corrupt cache record at the end of a sealed segment; its range is marked lost");
        return Ok(len);
    }
    tracing::warn!(segment = %path.display(), offset = good, "truncating a torn cache tail (never acknowledged)");
    let w = fs
        .open(path, OpenMode::ReadWrite)
        .ctx(|| format!("open {}", path.display()))?;
    w.set_len(good)
        .ctx(|| format!("truncate {}", path.display()))?;
    w.sync_all().ctx(|| format!("fsync {}", path.display()))?;
    Ok(good)
}

/// What the segments read so far at open say.
struct Scan {
    /// Records indexed, in file order.
    entries: std::collections::VecDeque<Entry>,
    /// The highest LSN a sync mark says was made durable (acknowledged).
    acked_through: u64,
    /// The highest LSN a record (or the disk's known position) shows: a real mark never
    /// says more, so one that does is guest data shaped like a mark, and is ignored.
    seen: u64,
    /// Bytes skipped as damage: the LSNs they hid may be counted by a mark after them.
    skipped: usize,
}

/// A valid header at `p` of `data` whose record fits in `data`, with its magic.
fn header_at(data: &[u8], p: usize) -> Option<([u8; 4], Fields)> {
    let h: [u8; RECORD_HEADER_LEN] = data.get(p..p + RECORD_HEADER_LEN)?.try_into().ok()?;
    parse_any(&h).filter(|r| p + RECORD_HEADER_LEN + r.1 .3 as usize <= data.len())
}

/// Where the last valid sync mark of `data` ends (0: none).
fn last_mark_end(data: &[u8]) -> usize {
    (0..data.len().saturating_sub(RECORD_HEADER_LEN - 1))
        .rev()
        .find(|&q| {
            data[q..q + 4] == SYNC_MAGIC && header_at(data, q).is_some_and(|h| h.0 == SYNC_MAGIC)
        })
        .map_or(0, |q| q + RECORD_HEADER_LEN)
}

impl Scan {
    /// Nothing read yet; the disk's position known so far is `seen`.
    fn new(seen: u64) -> Scan {
        Scan {
            entries: std::collections::VecDeque::new(),
            acked_through: 0,
            seen,
            skipped: 0,
        }
    }

    /// Indexes segment `seq`'s records; returns where its good part ends.
    fn segment(&mut self, seq: u32, data: &[u8], last_segment: bool, path: &Path) -> usize {
        let mut p = 0usize;
        // Where the last valid sync mark of the last segment ends: nothing after it was
        // acknowledged (a sealed segment was synced whole before the next one began).
        let marked_to = if last_segment {
            last_mark_end(data)
        } else {
            usize::MAX
        };
        while p + RECORD_HEADER_LEN <= data.len() {
            if let Some((magic, (first_lsn, last_lsn, first_ts_us, frame_len))) = header_at(data, p)
            {
                if magic == SYNC_MAGIC {
                    if last_lsn <= self.seen + (self.skipped / MIN_BYTES_PER_LSN) as u64 {
                        self.acked_through = self.acked_through.max(last_lsn);
                    }
                    p += RECORD_HEADER_LEN;
                    continue;
                }
                // Past the last mark nothing was acknowledged, and a record whose header
                // reached the disk may have lost its body: check the frame too, and end the
                // segment (a torn tail) at the first that fails.
                let body = p + RECORD_HEADER_LEN..p + RECORD_HEADER_LEN + frame_len as usize;
                if p >= marked_to && !frame_whole(&data[body]) {
                    break;
                }
                self.seen = self.seen.max(last_lsn);
                self.entries.push_back(Entry {
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
            // A bad header after the last sync mark of the last segment is a torn tail,
            // whatever follows it: the kernel writes unsynced pages back in any order, so a
            // later record may have reached the disk and an earlier one not, and none of
            // them was acknowledged.
            if p >= marked_to {
                break;
            }
            // Elsewhere, if a valid record follows, this is corruption, not a torn tail.
            // Skip to it; the LSNs in between become a lost range (see `fill_gaps`).
            match (p + 1..data.len().saturating_sub(RECORD_HEADER_LEN - 1)).find(|&q| {
                (data[q..q + 4] == MAGIC || data[q..q + 4] == SYNC_MAGIC)
                    && header_at(data, q).is_some()
            }) {
                Some(q) => {
                    tracing::error!(segment = %path.display(), offset = p, resumes_at = q, "corrupt cache record header; the records it hides are marked lost and will be resynced from the agent");
                    self.skipped += q - p;
                    p = q;
                }
                None => break,
            }
        }
        p
    }
}

impl DiskCache {
    /// Opens (or creates) a disk's cache, scanning every segment. A torn tail of the last
    /// segment (a crash mid-append, never acknowledged) is truncated.
    pub fn open(dir: &Path, trimmed_lsn: u64) -> Result<DiskCache> {
        DiskCache::open_in(Arc::new(RealFs), dir, trimmed_lsn)
    }

    /// [`DiskCache::open`] on any [`FileSystem`] (the simulator's).
    pub fn open_in(fs: Arc<dyn FileSystem>, dir: &Path, trimmed_lsn: u64) -> Result<DiskCache> {
        let seqs = segment_numbers(&*fs, dir)?;
        let acked_file = read_acked(&*fs, dir);
        let mut scan = Scan::new(acked_file.unwrap_or(0).max(trimmed_lsn));
        let mut segs = Vec::new();
        for (i, &seq) in seqs.iter().enumerate() {
            let path = seg_path(dir, seq);
            let data = read_all(&*fs, &path).ctx(|| format!("read {}", path.display()))?;
            let len = data.len() as u64;
            let last_segment = i + 1 == seqs.len();
            let good = scan.segment(seq, &data, last_segment, &path) as u64;
            segs.push((seq, end_segment(&*fs, &path, good, len, last_segment)?));
        }
        let Scan {
            entries,
            acked_through,
            ..
        } = scan;
        let mut entries = fill_gaps(entries);
        // Damage at the end of what was acknowledged (the last records before the last sync
        // mark) hides LSNs no record follows: they are lost too.
        let have = entries.back().map_or(0, |e| e.last_lsn);
        if acked_through > have && acked_through > trimmed_lsn {
            let seq = segs.last().map_or(1, |s| s.0);
            tracing::error!(dir = %dir.display(), first_lsn = have.max(trimmed_lsn) + 1, last_lsn = acked_through, "acknowledged cache records are damaged; their LSNs are marked lost and will be resynced from the agent");
            entries.push_back(Entry {
                seg: seq,
                pos: 0,
                first_lsn: have.max(trimmed_lsn) + 1,
                last_lsn: acked_through,
                first_ts_us: 0,
                frame_len: 0,
                lost: true,
            });
        }
        let active_seq = segs.last().map_or(1, |s| s.0);
        if segs.is_empty() {
            segs.push((1, 0));
        }
        let active_len = segs.last().expect("one").1;
        let acked = acked_file;
        let position_known =
            acked.is_some() || !entries.is_empty() || acked_through > 0 || trimmed_lsn > 0;
        let acked = acked.unwrap_or(0);
        let trimmed_lsn = trimmed_lsn.max(acked);
        let mut c = DiskCache {
            fs,
            dir: dir.into(),
            entries,
            active_seq,
            active: None,
            active_len,
            synced: (0, active_seq, active_len),
            segs,
            trimmed_lsn,
            trimmed_bytes: 0,
            position_known,
            readers: std::collections::HashMap::new(),
        };
        // Records after the last mark that a kill (not a crash) left in the page cache are
        // indexed: make them durable before anyone is told the cache holds them.
        if c.active_len > 0 {
            let path = seg_path(dir, c.active_seq);
            c.fs.open(&path, OpenMode::ReadWrite)
                .and_then(|f| f.sync_data())
                .ctx(|| format!("fsync {}", path.display()))?;
        }
        c.trim(trimmed_lsn)?;
        c.synced = (c.last_lsn(), c.active_seq, c.active_len);
        // The names of every segment read are durable from here (see `active_file`).
        sync_dir(&*c.fs, dir)?;
        Ok(c)
    }

    /// Whether the cache knows where the disk's stream stands (see the field's docs).
    pub fn position_known(&self) -> bool {
        self.position_known
    }

    /// Records a new disk's starting position durably, so that a missing `acked-lsn` always
    /// means damage.
    pub fn confirm_position(&mut self) -> Result<()> {
        self.position_known = true;
        self.persist_acked()
    }

    /// The highest LSN known durable here: what an agent may be told the cache holds, and
    /// how far the uplink may ship (records appended by a group whose sync has not yet
    /// succeeded may still be cut back).
    pub fn durable_lsn(&self) -> u64 {
        self.synced.0.max(self.trimmed_lsn)
    }

    /// The highest LSN cached (or trimmed, if the cache is empty).
    pub fn last_lsn(&self) -> u64 {
        self.entries.back().map_or(self.trimmed_lsn, |e| e.last_lsn)
    }

    /// Marks the record holding `lsn` lost: it ships as a resync marker from now on.
    pub fn mark_lost(&mut self, lsn: u64) {
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| e.first_lsn <= lsn && lsn <= e.last_lsn)
        {
            e.lost = true;
        }
    }

    /// Notes that the master target holds the disk only up to `remote_lsn`. If that is below
    /// what this cache let go of, the LSNs in between are lost: an index entry marks them
    /// (shipped as a resync marker). Returns the lost range, if any.
    pub fn remote_behind(&mut self, remote_lsn: u64) -> Option<(u64, u64)> {
        if remote_lsn >= self.trimmed_lsn {
            return None;
        }
        let (first, last) = (remote_lsn + 1, self.trimmed_lsn);
        let seg = self.segs.first().map_or(self.active_seq, |s| s.0);
        self.entries.push_front(Entry {
            seg,
            pos: 0,
            first_lsn: first,
            last_lsn: last,
            first_ts_us: 0,
            frame_len: 0,
            lost: true,
        });
        self.trimmed_lsn = remote_lsn;
        Some((first, last))
    }

    /// The first LSN still cached (not yet acknowledged by the master target), if any.
    pub fn oldest_lsn(&self) -> Option<u64> {
        self.entries.front().map(|e| e.first_lsn)
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
        // Lost ranges carry no capture time (0): RPO counts from the oldest write that has
        // one, never from the epoch.
        self.entries.iter().map(|e| e.first_ts_us).find(|&t| t > 0)
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
        let h = header(MAGIC, first_lsn, last_lsn, first_ts_us, frame.len() as u32);
        let at = self.active_len;
        // The frame goes to the file as received: its header and CRCs are the agent's, no
        // copy is made to put the record's header before it.
        let f = self.active_file()?;
        let written = f
            .write_all_at(&h, at)
            .and_then(|()| f.write_all_at(frame, at + RECORD_HEADER_LEN as u64));
        if let Err(e) = written {
            // Nothing of a failed append counts: drop what part of it reached the file.
            let _ = self.active_file()?.set_len(at);
            return Err(Error::Io {
                context: format!("append to cache {}", self.dir.display()),
                source: e,
            });
        }
        self.entries.push_back(Entry {
            seg: self.active_seq,
            pos: self.active_len,
            first_lsn,
            last_lsn,
            first_ts_us,
            frame_len: frame.len() as u32,
            lost: false,
        });
        self.active_len += (RECORD_HEADER_LEN + frame.len()) as u64;
        self.segs.last_mut().expect("one").1 = self.active_len;
        Ok(())
    }

    /// The active segment, opened or created on first use, its directory entry made
    /// durable each time: an earlier process (or an earlier try of this one) may have
    /// created it and died, or failed, before its directory was synced, and records
    /// acknowledged in a segment whose name a crash forgets are lost.
    fn active_file(&mut self) -> Result<&dyn FileHandle> {
        if self.active.is_none() {
            let path = seg_path(&self.dir, self.active_seq);
            let f = self
                .fs
                .open(&path, OpenMode::CreateOrOpen)
                .ctx(|| format!("open {}", path.display()))?;
            sync_dir(&*self.fs, &self.dir)?;
            self.active = Some(f);
        }
        Ok(&**self.active.as_ref().expect("just opened"))
    }

    /// Makes every append durable, with a sync mark (twice) saying so. On failure the
    /// appends since the last sync are dropped (the file cut back, the index too): nothing
    /// is acknowledged that might not read back, and the agent sends it again.
    pub fn sync(&mut self) -> Result<()> {
        let (synced_lsn, seq, len) = self.synced;
        if (self.last_lsn(), self.active_seq, self.active_len) == self.synced {
            return Ok(());
        }
        let acked = self.last_lsn();
        let mut marks = Vec::with_capacity(2 * RECORD_HEADER_LEN);
        for _ in 0..2 {
            marks.extend_from_slice(&header(SYNC_MAGIC, 0, acked, crate::state::now_us(), 0));
        }
        let at = self.active_len;
        let context = format!("fsync cache {}", self.dir.display());
        // Records first, then the marks: a mark that reaches the disk thus always follows
        // records that did, so damage before a valid mark is damage at rest (a lost range),
        // never records a crash kept the mark of and not the data (the kernel writes
        // unsynced pages back in any order). The second fsync writes one page.
        let done = self.active_file().and_then(|f| {
            f.sync_data()
                .and_then(|()| f.write_all_at(&marks, at))
                .and_then(|()| f.sync_data())
                .map_err(|e| Error::Io { context, source: e })
        });
        match done {
            Ok(()) => {
                self.active_len += marks.len() as u64;
                self.segs.last_mut().expect("one").1 = self.active_len;
                self.synced = (self.last_lsn(), self.active_seq, self.active_len);
                Ok(())
            }
            Err(e) if seq == self.active_seq => {
                while self
                    .entries
                    .back()
                    .is_some_and(|en| en.last_lsn > synced_lsn)
                {
                    self.entries.pop_back();
                }
                self.active_len = len;
                self.segs.last_mut().expect("one").1 = len;
                if let Some(f) = &self.active {
                    let _ = f.set_len(len);
                }
                Err(e)
            }
            // A rotation happened since (its sync succeeded): only this segment's part is
            // dropped.
            Err(e) => {
                self.entries.retain(|en| en.seg != self.active_seq);
                self.active_len = 0;
                self.segs.last_mut().expect("one").1 = 0;
                if let Some(f) = &self.active {
                    let _ = f.set_len(0);
                }
                Err(e)
            }
        }
    }

    /// Lets go of the read descriptors of segments no longer in the cache: a deleted file
    /// keeps its blocks while a descriptor of it is open, and a full volume waits for
    /// exactly those blocks.
    fn forget_readers(&mut self) {
        let oldest = self.segs.first().map_or(self.active_seq, |s| s.0);
        self.readers.retain(|seq, _| *seq >= oldest);
    }

    /// Deletes every segment (a retired disk): nothing of the disk's data stays here.
    pub fn remove_all(&mut self) -> Result<()> {
        self.active = None;
        self.readers.clear();
        for (seq, _) in self.segs.drain(..) {
            let p = seg_path(&self.dir, seq);
            match self.fs.remove_file(&p) {
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
        sync_dir(&*self.fs, &self.dir)
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
        // Everything acknowledged and the active segment of some size: start a new one, so
        // what the acknowledged records take on the volume is given back now.
        if self.entries.is_empty() && self.active_len >= IDLE_ROTATE_BYTES {
            self.active = None;
            self.active_seq += 1;
            self.active_len = 0;
            self.segs.push((self.active_seq, 0));
        }
        let first_needed = self.entries.front().map_or(self.active_seq, |e| e.seg);
        // How far the master target acknowledged the disk is durable before the records
        // that said so go: a crash in between must not leave a stale (or no) position.
        if self.segs.len() > 1 && self.segs[0].0 < first_needed {
            self.persist_acked()?;
        }
        while self.segs.len() > 1 && self.segs[0].0 < first_needed {
            let (seq, _) = self.segs.remove(0);
            self.forget_readers();
            let p = seg_path(&self.dir, seq);
            match self.fs.remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::Io {
                        context: format!("remove {}", p.display()),
                        source: e,
                    })
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The master target holds the disk up to `remote_lsn`, beyond the last LSN this cache
    /// knows of: the cache's record of its position was damaged (or restored from an older
    /// copy), and writes it acknowledged after its last LSN carried LSNs the master target
    /// already had, so it would drop them as duplicates. Drops every cached record (all at
    /// or below `remote_lsn`), continues the stream after `remote_lsn`, and returns the
    /// range whose writes may be missing on the master target (the disk must be resynced).
    pub fn adopt_remote(&mut self, remote_lsn: u64) -> Result<Option<(u64, u64)>> {
        if !self.position_known {
            // Nothing was acknowledged while the position was unknown: nothing is lost.
            self.trimmed_lsn = self.trimmed_lsn.max(remote_lsn);
            self.position_known = true;
            return self.persist_acked().map(|()| None);
        }
        let last = self.last_lsn();
        if remote_lsn <= last {
            return Ok(None);
        }
        let first_suspect = self.entries.front().map_or(last + 1, |e| e.first_lsn);
        self.trimmed_lsn = remote_lsn;
        self.trim(remote_lsn)?;
        self.persist_acked()?;
        Ok(Some((first_suspect.min(last + 1), remote_lsn)))
    }

    /// Keeps how far the master target acknowledged the disk in `acked-lsn`, whenever
    /// segments (the records that said so) are deleted: after a restart with an empty cache
    /// the disk's stream still resumes after it, never from 1.
    ///
    /// Rewritten in place at a fixed width, not through a new file and a rename: this runs
    /// before segments are deleted, often on a full volume, and an overwrite needs no new
    /// block (a new file would fail with ENOSPC and no segment could ever go). A write torn
    /// by a crash fails the checksum: the position is then unknown and taken from the
    /// master target, never guessed.
    fn persist_acked(&self) -> Result<()> {
        let path = self.dir.join(ACKED_FILE);
        let created = !self.fs.exists(&path);
        let line = acked_line(self.trimmed_lsn);
        self.fs
            .open(&path, OpenMode::CreateOrOpen)
            .and_then(|f| {
                f.write_all_at(line.as_bytes(), 0)?;
                f.set_len(line.len() as u64)?;
                f.sync_all()
            })
            .and_then(|()| match created {
                true => self.fs.sync_dir(&self.dir),
                false => Ok(()),
            })
            .ctx(|| format!("write {}", path.display()))
    }

    /// Index entries of records holding LSNs from `from_lsn` on, at most `max` of them.
    pub fn entries_from(&self, from_lsn: u64, max: usize) -> Vec<Entry> {
        let start = self.entries.partition_point(|e| e.last_lsn < from_lsn);
        self.entries.iter().skip(start).take(max).copied().collect()
    }

    /// Reads and verifies one record's frame (with a descriptor of its own; the uplink
    /// uses [`DiskCache::reader`]).
    pub fn read(&self, e: &Entry) -> Result<wire_protocol::frame::Frame> {
        let path = seg_path(&self.dir, e.seg);
        let f = self
            .fs
            .open(&path, OpenMode::Read)
            .ctx(|| format!("open {}", path.display()))?;
        read_record(&*f, &path, e)
    }

    /// What reads record `e` once the cache's lock is released: a shared descriptor of its
    /// segment, opened at the first record read from it (descriptors of deleted segments
    /// are let go here).
    pub fn reader(&mut self, e: &Entry) -> Result<RecordReader> {
        let path = seg_path(&self.dir, e.seg);
        let file = match self.readers.get(&e.seg) {
            Some(f) => Arc::clone(f),
            None => {
                let f: Arc<dyn FileHandle> = Arc::from(
                    self.fs
                        .open(&path, OpenMode::Read)
                        .ctx(|| format!("open {}", path.display()))?,
                );
                self.readers.insert(e.seg, Arc::clone(&f));
                f
            }
        };
        Ok(RecordReader {
            file,
            path,
            entry: *e,
        })
    }
}
