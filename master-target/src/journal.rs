//! The retention journal: undo records, commit markers and recovery points of one disk.
//!
//! # Design constraints
//! - The attached disk is always the latest state: failing back to "latest" replays nothing.
//! - Any earlier point inside the window costs one copy of the disk plus the undo records
//!   newer than the point, applied newest first.
//! - Write-ahead: the bytes a write overwrites are durable in the journal before the write
//!   can reach the disk; a batch is acknowledged only after its commit record is durable.
//!   After a crash, undo records after the last commit are rolled back, so nothing
//!   half-applied is ever visible.
//! - Only the tail of the last segment may be torn (a crash mid-append): it is truncated.
//!   A bad record anywhere else is corruption and a hard error (raft-engine's habit).
//!
//! # Layout
//! Segments `seg-NNNNNNNN.fbj` in the disk's retention directory, each a sequence of:
//! ```text
//! struct Record {              // all integers big-endian; don't reorder
//!     magic:    [u8; 4],       // b"FBJ1"
//!     kind:     u8,            // 1 undo, 2 commit, 3 point, 4 undo of zeros
//!     reserved: [u8; 3],       // zero
//!     body_len: u32,           // <= MAX_BODY_LEN
//!     crc:      u32,           // CRC32C of kind, reserved, body_len and body
//!     body:     [u8; body_len],
//! }
//! Undo   { lsn: u64, timestamp_us: u64, offset: u64, old_data: [u8] }  // bytes write `lsn` overwrote
//! UndoZeros { lsn: u64, timestamp_us: u64, offset: u64, len: u64 }  // write `lsn` overwrote
//!                                // `len` zero bytes (a never-written region: a new disk's
//!                                // first replication journals no data); len <= MAX_BATCH_DATA_LEN
//! Commit { lsn: u64, time_us: u64 }     // every item up to lsn is durable on the disk
//! Point  { id: u64, lsn: u64, time_us: u64, kind: u8, tag_len: u16, tag: [u8; tag_len],
//!          group_marker: u64, group_members: u32 }  // optional (present when the marker is
//!                                // non-zero): a replication group's cut id and how many
//!                                // disks it covers; older readers ignore them
//! ```
//! A journal with an UndoZeros record needs a master target that knows kind 4 (an older one
//! refuses it as damaged).
//!
//! Every segment starts with a commit record (a checkpoint of the committed LSN), so the
//! committed LSN is always found in the last segment.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::disk::DiskFile;
use store::{FileHandle, FileSystem, OpenMode, RealFs};

use crate::error::{Error, IoContext, Result};

const MAGIC: [u8; 4] = *b"FBJ1";
const HEADER_LEN: usize = 16;
/// Largest record body: one write's undo data (bounded by the wire's batch data limit) plus
/// its metadata. A larger declared length is corruption, never an allocation.
pub const MAX_BODY_LEN: usize = wire_protocol::message::MAX_BATCH_DATA_LEN + 64;
/// A segment is closed once it holds this much; pruning frees whole segments.
pub const SEGMENT_TARGET_BYTES: u64 = 64 << 20;
const KIND_UNDO: u8 = 1;
const KIND_COMMIT: u8 = 2;
const KIND_POINT: u8 = 3;
const KIND_UNDO_ZEROS: u8 = 4;
const UNDO_META_LEN: usize = 24;
/// An UndoZeros body: the undo metadata and the length of the zeros.
const UNDO_ZEROS_BODY_LEN: usize = UNDO_META_LEN + 8;

/// The kind of a recovery point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PointKind {
    /// Taken by the master target at least every crash-point interval of replicated time.
    CrashConsistent,
    /// From a source bookmark.
    AppConsistent,
    /// Marker (not a point): a resync began; no point is consistent until it completes.
    ResyncStarted,
    /// Marker (not a point): the resync completed.
    ResyncCompleted,
}

impl PointKind {
    fn code(self) -> u8 {
        match self {
            PointKind::CrashConsistent => 0,
            PointKind::AppConsistent => 1,
            PointKind::ResyncStarted => 2,
            PointKind::ResyncCompleted => 3,
        }
    }
    fn from_code(c: u8) -> Option<PointKind> {
        match c {
            0 => Some(PointKind::CrashConsistent),
            1 => Some(PointKind::AppConsistent),
            2 => Some(PointKind::ResyncStarted),
            3 => Some(PointKind::ResyncCompleted),
            _ => None,
        }
    }
    /// Whether this is a recovery point (not a resync marker).
    pub fn is_point(self) -> bool {
        matches!(self, PointKind::CrashConsistent | PointKind::AppConsistent)
    }
}

/// A point to record with a commit: its LSN, time, kind, tag, and group cut (marker id,
/// disks covered; (0, 0) if none).
pub type NewPoint = (u64, u64, PointKind, String, (u64, u32));

/// A recovery point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Point {
    /// Id, unique per disk, increasing.
    pub id: u64,
    /// Every item with an LSN up to this one, and none after, is in the point.
    pub lsn: u64,
    /// Replicated time of the point, microseconds since the Unix epoch.
    pub time_us: u64,
    /// Crash- or app-consistent.
    pub kind: PointKind,
    /// The bookmark's tag ("" for crash-consistent points).
    pub tag: String,
    /// The replication group's cut this point is part of (0: none). A group point is the
    /// set of points of one cut id, one on every disk of the group.
    #[serde(skip_serializing_if = "is_zero")]
    pub group_marker: u64,
    /// How many disks the group's cut covers (with `group_marker`).
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub group_members: u32,
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Debug, Clone)]
struct Segment {
    seq: u32,
    path: PathBuf,
    bytes: u64,
    /// Highest undo LSN in the segment (0: none).
    last_undo_lsn: u64,
    /// Highest LSN of a point recorded in the segment (0: none): pruning keeps a segment
    /// holding the record of a point it keeps.
    last_point_lsn: u64,
}

/// One scanned record's place and metadata.
#[derive(Debug, Clone, Copy)]
struct UndoRef {
    lsn: u64,
    pos: u64,
    body_len: u32,
    /// An UndoZeros record: the old data is zeros, its length in the body.
    zeros: bool,
}

/// Where a journal ended at one moment (see [`Journal::mark`]).
#[derive(Debug, Clone, Copy)]
pub struct JournalMark {
    seq: u32,
    bytes: u64,
    last_undo_lsn: u64,
}

/// The journal of one disk.
#[derive(Debug)]
pub struct Journal {
    fs: Arc<dyn FileSystem>,
    dir: PathBuf,
    segments: Vec<Segment>,
    active: Box<dyn FileHandle>,
    /// Bytes of the active segment known durable (see [`Journal::sync`]).
    synced_bytes: std::cell::Cell<u64>,
    points: Vec<Point>,
    committed_lsn: u64,
    /// Points with an LSN below this can no longer be built (their undo records were dropped).
    horizon_lsn: u64,
    next_point_id: u64,
    /// A resync began and has not completed: no point may be made.
    resyncing: bool,
    /// Rotate the active segment past this many bytes.
    segment_target_bytes: u64,
}

fn seg_path(dir: &Path, seq: u32) -> PathBuf {
    dir.join(format!("seg-{seq:08}.fbj"))
}

fn encode(kind: u8, body: &[u8], out: &mut Vec<u8>) {
    assert!(
        body.len() <= MAX_BODY_LEN,
        "journal bodies are bounded by the batch limit"
    );
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = kind;
    h[8..12].copy_from_slice(&(body.len() as u32).to_be_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[4..12]), body);
    h[12..16].copy_from_slice(&crc.to_be_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(body);
}

/// Appends an undo record for a write at `offset` that overwrites `old`.
pub fn encode_undo(lsn: u64, timestamp_us: u64, offset: u64, old: &[u8], out: &mut Vec<u8>) {
    let data = begin_undo(lsn, timestamp_us, offset, old.len(), out);
    out[data..].copy_from_slice(old);
    finish_undo(out, data - UNDO_META_LEN - HEADER_LEN);
}

/// Appends an undo record's header and metadata and `len` bytes of room for the old data,
/// which the caller fills in place (no intermediate copy). Returns where the data starts;
/// [`finish_undo`] seals the record once it is filled.
pub fn begin_undo(
    lsn: u64,
    timestamp_us: u64,
    offset: u64,
    len: usize,
    out: &mut Vec<u8>,
) -> usize {
    // An UndoZeros record of it must be readable: readers bound its length by this.
    assert!(
        len <= wire_protocol::message::MAX_BATCH_DATA_LEN,
        "a write is bounded by the batch limit"
    );
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = KIND_UNDO;
    h[8..12].copy_from_slice(&((UNDO_META_LEN + len) as u32).to_be_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&lsn.to_be_bytes());
    out.extend_from_slice(&timestamp_us.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    let data = out.len();
    out.resize(data + len, 0);
    data
}

/// Seals the undo record that starts at `start` in `out` (the last one): computes its CRC,
/// after making it an UndoZeros record (no data) if the old data is all zeros.
pub fn finish_undo(out: &mut Vec<u8>, start: usize) {
    let data = start + HEADER_LEN + UNDO_META_LEN;
    if wire_protocol::is_zeros(&out[data..]) {
        let len = (out.len() - data) as u64;
        out.truncate(data);
        out.extend_from_slice(&len.to_be_bytes());
        out[start + 4] = KIND_UNDO_ZEROS;
        out[start + 8..start + 12].copy_from_slice(&(UNDO_ZEROS_BODY_LEN as u32).to_be_bytes());
    }
    let crc = crc32c::crc32c_append(
        crc32c::crc32c(&out[start + 4..start + 12]),
        &out[start + HEADER_LEN..],
    );
    out[start + 12..start + 16].copy_from_slice(&crc.to_be_bytes());
}

/// The undo records of `buf` (whole records, as [`begin_undo`] and [`finish_undo`] wrote
/// them), in order: each write's offset and the bytes it overwrote.
pub fn undo_records(buf: &[u8]) -> Vec<(u64, std::borrow::Cow<'_, [u8]>)> {
    let mut records = Vec::new();
    let mut at = 0;
    while at + HEADER_LEN + UNDO_META_LEN <= buf.len() {
        let kind = buf[at + 4];
        let body_len = u32::from_be_bytes(buf[at + 8..at + 12].try_into().expect("4")) as usize;
        let body = &buf[at + HEADER_LEN..(at + HEADER_LEN + body_len).min(buf.len())];
        let offset = be64(&body[16..]);
        let old = match kind {
            KIND_UNDO_ZEROS => {
                std::borrow::Cow::Owned(vec![0; be64(&body[UNDO_META_LEN..]) as usize])
            }
            _ => std::borrow::Cow::Borrowed(&body[UNDO_META_LEN..]),
        };
        records.push((offset, old));
        at += HEADER_LEN + body_len;
    }
    records
}

/// Bytes of one commit record.
const COMMIT_RECORD_LEN: u64 = HEADER_LEN as u64 + 16;

/// Appends a commit record, twice: a flipped byte in one copy leaves the other, so a
/// committed group is never mistaken for a torn tail (and rolled back) because of it.
fn encode_commit(lsn: u64, time_us: u64, out: &mut Vec<u8>) {
    let mut body = [0u8; 16];
    body[..8].copy_from_slice(&lsn.to_be_bytes());
    body[8..].copy_from_slice(&time_us.to_be_bytes());
    encode(KIND_COMMIT, &body, out);
    encode(KIND_COMMIT, &body, out);
}

/// A copy of a resync's start marker at `lsn` (the committed LSN) and a commit of it: see
/// `Journal::carry_resync`.
fn encode_carried_resync(lsn: u64, time_us: u64, out: &mut Vec<u8>) {
    let marker = Point {
        id: 0,
        lsn,
        time_us,
        kind: PointKind::ResyncStarted,
        tag: "resync under way (carried over)".into(),
        group_marker: 0,
        group_members: 0,
    };
    encode_point(&marker, out);
    encode_commit(lsn, time_us, out);
}

fn encode_point(p: &Point, out: &mut Vec<u8>) {
    let tag = &p.tag.as_bytes()[..p.tag.len().min(u16::MAX as usize)];
    let mut body = Vec::with_capacity(27 + tag.len());
    body.extend_from_slice(&p.id.to_be_bytes());
    body.extend_from_slice(&p.lsn.to_be_bytes());
    body.extend_from_slice(&p.time_us.to_be_bytes());
    body.push(p.kind.code());
    body.extend_from_slice(&(tag.len() as u16).to_be_bytes());
    body.extend_from_slice(tag);
    // Optional trailing field: a reader from before replication groups ignores it.
    if p.group_marker != 0 {
        body.extend_from_slice(&p.group_marker.to_be_bytes());
        body.extend_from_slice(&p.group_members.to_be_bytes());
    }
    encode(KIND_POINT, &body, out);
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// What one pass over a segment found.
#[derive(Debug, Default)]
struct Scan {
    /// Bytes of the segment.
    len: u64,
    /// Damaged regions `[start, end)`: bytes between valid records that are not a valid
    /// record (`end` is the next valid record, or the segment's end).
    bad: Vec<(u64, u64)>,
    undos: Vec<UndoRef>,
    points: Vec<Point>,
    /// (lsn, start, end) of every commit record, in order.
    commits: Vec<(u64, u64, u64)>,
}

impl Scan {
    /// (lsn, end) of the last commit.
    fn last_commit(&self) -> Option<(u64, u64)> {
        self.commits.last().map(|c| (c.0, c.2))
    }

    /// Whether a damaged region is harmless: exactly one commit record long and beside a
    /// valid commit of the same place in the stream (commits are written twice, so one copy
    /// may fail alone).
    fn is_spare_commit(&self, (start, end): (u64, u64)) -> bool {
        end - start == COMMIT_RECORD_LEN && self.commits.iter().any(|c| c.2 == start || c.1 == end)
    }

    /// The first damaged region that is corruption, not a torn tail: one that a valid
    /// record follows (so it was written, and fsynced, before it) and that is not a spare
    /// commit copy. A damaged region at the end with nothing valid after it is a torn tail.
    ///
    /// In the last segment, damage after its last commit is a torn tail too, whatever
    /// follows it: nothing there was committed, and the kernel writes unsynced pages back
    /// in any order, so a crash can keep a later record of an append and not an earlier one.
    fn corruption(&self, last_segment: bool) -> Option<(u64, u64)> {
        let torn_from = match (last_segment, self.last_commit()) {
            (true, Some((_, end))) => end,
            (true, None) => 0,
            (false, _) => u64::MAX,
        };
        self.bad
            .iter()
            .copied()
            .find(|&r| r.0 < torn_from && r.1 < self.len && !self.is_spare_commit(r))
    }
}

/// A valid record found in a segment.
#[derive(Debug)]
enum Found {
    Undo(UndoRef),
    Commit(u64),
    Point(Point),
}

/// Bytes a scan reads ahead at a time: a segment of small records (a first replication's
/// UndoZeros are 48 bytes) costs one read per this many bytes, not two per record.
const READ_AHEAD_BYTES: usize = 1 << 20;

/// Reads a segment through a window of [`READ_AHEAD_BYTES`]; larger reads go straight to
/// the file.
struct ReadAhead<'a> {
    f: &'a dyn FileHandle,
    len: u64,
    /// Where the window starts in the file, and what it holds.
    window: std::cell::RefCell<(u64, Vec<u8>)>,
}

impl<'a> ReadAhead<'a> {
    fn new(f: &'a dyn FileHandle, len: u64) -> Self {
        ReadAhead {
            f,
            len,
            window: std::cell::RefCell::new((0, Vec::new())),
        }
    }

    fn read_exact_at(&self, out: &mut [u8], pos: u64) -> std::io::Result<()> {
        if out.len() > READ_AHEAD_BYTES {
            return self.f.read_exact_at(out, pos);
        }
        let mut w = self.window.borrow_mut();
        let end = pos + out.len() as u64;
        if pos < w.0 || end > w.0 + w.1.len() as u64 {
            let n = (self.len.saturating_sub(pos) as usize).min(READ_AHEAD_BYTES);
            if n < out.len() {
                return self.f.read_exact_at(out, pos);
            }
            w.1.resize(n, 0);
            if let Err(e) = self.f.read_exact_at(&mut w.1, pos) {
                w.1.clear();
                return Err(e);
            }
            w.0 = pos;
        }
        let at = (pos - w.0) as usize;
        out.copy_from_slice(&w.1[at..at + out.len()]);
        Ok(())
    }
}

/// The record at `pos`, if a valid one starts there, with where it ends. `verify_undo`
/// reads and checks undo bodies too (otherwise only their metadata is read; their CRCs are
/// checked when an export reads them).
fn record_at(
    f: &ReadAhead<'_>,
    path: &Path,
    len: u64,
    pos: u64,
    verify_undo: bool,
    body: &mut Vec<u8>,
) -> Result<Option<(Found, u64)>> {
    if len - pos < HEADER_LEN as u64 {
        return Ok(None);
    }
    let mut h = [0u8; HEADER_LEN];
    f.read_exact_at(&mut h, pos)
        .ctx(|| format!("read {}", path.display()))?;
    let kind = h[4];
    let body_len = u32::from_be_bytes(h[8..12].try_into().expect("4")) as usize;
    let crc = u32::from_be_bytes(h[12..16].try_into().expect("4"));
    if h[..4] != MAGIC
        || h[5..8] != [0, 0, 0]
        || !(1..=4).contains(&kind)
        || body_len > MAX_BODY_LEN
        || len - pos - (HEADER_LEN as u64) < body_len as u64
    {
        return Ok(None);
    }
    // Undo bodies of either kind are checked when an export reads them: a flipped byte in
    // an old one costs the points before it, never the disk.
    let skip = (kind == KIND_UNDO || kind == KIND_UNDO_ZEROS) && !verify_undo;
    let read_len = if skip {
        UNDO_META_LEN.min(body_len)
    } else {
        body_len
    };
    body.resize(read_len, 0);
    f.read_exact_at(body, pos + HEADER_LEN as u64)
        .ctx(|| format!("read {}", path.display()))?;
    if !skip && crc32c::crc32c_append(crc32c::crc32c(&h[4..12]), body) != crc {
        return Ok(None);
    }
    let end = pos + (HEADER_LEN + body_len) as u64;
    let found = match kind {
        KIND_UNDO if body_len >= UNDO_META_LEN => Found::Undo(UndoRef {
            lsn: be64(body),
            pos,
            body_len: body_len as u32,
            zeros: false,
        }),
        // Its length is read, checked and bounded with its checksum (`read_undo`).
        KIND_UNDO_ZEROS if body_len == UNDO_ZEROS_BODY_LEN => Found::Undo(UndoRef {
            lsn: be64(body),
            pos,
            body_len: body_len as u32,
            zeros: true,
        }),
        KIND_COMMIT if body_len == 16 => Found::Commit(be64(body)),
        KIND_POINT if body_len >= 27 => {
            let tag_len = u16::from_be_bytes([body[25], body[26]]) as usize;
            let Some(tag) = body.get(27..27 + tag_len) else {
                return Ok(None);
            };
            // The record's checksum holds, so an unknown kind was written that way (by a
            // newer master target): never guess what it means.
            let Some(kind) = PointKind::from_code(body[24]) else {
                return Err(Error::JournalCorrupt {
                    path: path.into(),
                    offset: pos,
                    detail: format!("a point record of unknown kind {} (written by a newer master target?): run the master target version that wrote this journal", body[24]),
                });
            };
            Found::Point(Point {
                id: be64(body),
                lsn: be64(&body[8..]),
                time_us: be64(&body[16..]),
                kind,
                tag: String::from_utf8_lossy(tag).into_owned(),
                group_marker: body.get(27 + tag_len..35 + tag_len).map_or(0, be64),
                group_members: body
                    .get(35 + tag_len..39 + tag_len)
                    .map_or(0, |b| u32::from_be_bytes(b.try_into().expect("4 bytes"))),
            })
        }
        _ => return Ok(None),
    };
    Ok(Some((found, end)))
}

/// Bytes searched at a time for the next valid record after a damaged one.
const SEARCH_CHUNK_BYTES: usize = 1 << 20;

/// The next valid record (fully verified) after `from`, if any.
fn next_valid(
    f: &ReadAhead<'_>,
    path: &Path,
    len: u64,
    from: u64,
    body: &mut Vec<u8>,
) -> Result<Option<(u64, Found, u64)>> {
    let mut chunk = vec![0u8; SEARCH_CHUNK_BYTES + MAGIC.len()];
    let mut at = from;
    while at < len {
        let n = ((len - at) as usize).min(chunk.len());
        f.f.read_exact_at(&mut chunk[..n], at)
            .ctx(|| format!("read {}", path.display()))?;
        let mut i = 0;
        while i + MAGIC.len() <= n {
            if chunk[i..i + MAGIC.len()] == MAGIC {
                let pos = at + i as u64;
                if let Some((found, end)) = record_at(f, path, len, pos, true, body)? {
                    return Ok(Some((pos, found, end)));
                }
            }
            i += 1;
        }
        at += SEARCH_CHUNK_BYTES as u64;
    }
    Ok(None)
}

/// Reads a segment's records, past damaged ones (see [`Scan::bad`]). `verify` checks
/// every undo body's CRC too.
fn scan(fs: &dyn FileSystem, path: &Path, verify: bool) -> Result<Scan> {
    let f = fs
        .open(path, OpenMode::Read)
        .ctx(|| format!("open journal {}", path.display()))?;
    let f = &*f;
    f.drop_cache()
        .ctx(|| format!("drop the cache of {}", path.display()))?;
    let len = f.len().ctx(|| format!("stat {}", path.display()))?;
    let f = &ReadAhead::new(f, len);
    let mut s = Scan {
        len,
        ..Scan::default()
    };
    let mut body = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let (start, found, end) = match record_at(f, path, len, pos, verify, &mut body)? {
            Some((found, end)) => (pos, found, end),
            None => match next_valid(f, path, len, pos + 1, &mut body)? {
                Some((q, found, end)) => {
                    s.bad.push((pos, q));
                    (q, found, end)
                }
                None => {
                    s.bad.push((pos, len));
                    break;
                }
            },
        };
        match found {
            Found::Undo(u) => s.undos.push(u),
            Found::Commit(lsn) => s.commits.push((lsn, start, end)),
            Found::Point(p) => s.points.push(p),
        }
        pos = end;
    }
    Ok(s)
}

/// Checks, at open, the undo records of closed segments whose bodies are not read then.
///
/// Undo records run in LSN order through the journal, and a record's LSN decides which
/// exports read it: a flipped byte in an unread LSN could make every export read a
/// damaged record, or none read one it needs. So a record whose LSN is out of order with
/// a neighbour has its checksum verified at once (a false alarm costs one read); the
/// damaged one is corruption. Memory: the last two records seen.
#[derive(Default)]
struct UndoOrder {
    prev: Option<(PathBuf, UndoRef)>,
    cur: Option<(PathBuf, UndoRef)>,
}

impl UndoOrder {
    /// Feeds the next undo record, in journal order.
    fn feed(&mut self, fs: &dyn FileSystem, path: &Path, next: UndoRef) -> Result<()> {
        if let Some((p, cur)) = &self.cur {
            let before = self.prev.as_ref().is_some_and(|(_, a)| cur.lsn < a.lsn);
            if before || cur.lsn > next.lsn {
                Self::verify(fs, p, *cur)?;
            }
        }
        self.prev = self.cur.replace((path.to_path_buf(), next));
        Ok(())
    }

    /// Checks the last record against the one before it.
    fn finish(self, fs: &dyn FileSystem) -> Result<()> {
        if let (Some((_, a)), Some((p, cur))) = (self.prev, self.cur) {
            if cur.lsn < a.lsn {
                Self::verify(fs, &p, cur)?;
            }
        }
        Ok(())
    }

    fn verify(fs: &dyn FileSystem, path: &Path, r: UndoRef) -> Result<()> {
        let f = open_read(fs, path)?;
        read_undo(&*f, path, r).map(|_| ())
    }
}

fn list_segments(fs: &dyn FileSystem, dir: &Path) -> Result<Vec<(u32, PathBuf)>> {
    let mut v = Vec::new();
    for name in fs.list(dir).ctx(|| format!("list {}", dir.display()))? {
        let Some(seq) = name
            .strip_prefix("seg-")
            .and_then(|n| n.strip_suffix(".fbj")?.parse().ok())
        else {
            continue;
        };
        v.push((seq, dir.join(name)));
    }
    v.sort();
    Ok(v)
}

fn open_read(fs: &dyn FileSystem, path: &Path) -> Result<Box<dyn FileHandle>> {
    fs.open(path, OpenMode::Read)
        .ctx(|| format!("open {}", path.display()))
}

fn sync_dir(fs: &dyn FileSystem, dir: &Path) -> Result<()> {
    fs.sync_dir(dir)
        .ctx(|| format!("fsync directory {}", dir.display()))
}

/// Reads the body of the undo record at `r` and checks its CRC.
fn read_undo(f: &dyn FileHandle, path: &Path, r: UndoRef) -> Result<(u64, Vec<u8>)> {
    let mut buf = vec![0u8; HEADER_LEN + r.body_len as usize];
    f.read_exact_at(&mut buf, r.pos)
        .ctx(|| format!("read {}", path.display()))?;
    let crc = u32::from_be_bytes(buf[12..16].try_into().expect("4"));
    let kind = if r.zeros { KIND_UNDO_ZEROS } else { KIND_UNDO };
    if buf[4] != kind
        || crc32c::crc32c_append(crc32c::crc32c(&buf[4..12]), &buf[HEADER_LEN..]) != crc
    {
        return Err(Error::JournalCorrupt {
            path: path.into(),
            offset: r.pos,
            detail: "undo record checksum mismatch (a flipped byte at rest): the points older than this record cannot be rebuilt; later points and the disk itself are unaffected".into(),
        });
    }
    let body = buf.split_off(HEADER_LEN);
    let offset = be64(&body[16..]);
    if r.zeros {
        let len = be64(&body[UNDO_META_LEN..]);
        // A checksummed length past any write's is a bug's record, never an allocation.
        if len > wire_protocol::message::MAX_BATCH_DATA_LEN as u64 {
            return Err(Error::JournalCorrupt {
                path: path.into(),
                offset: r.pos,
                detail: format!("an undo record of {len} zero bytes, more than any write"),
            });
        }
        return Ok((offset, vec![0; len as usize]));
    }
    Ok((offset, body[UNDO_META_LEN..].to_vec()))
}

/// Sets a damaged journal aside and starts a new one where the old one's last valid commit
/// says the disk is: rolls back on `disk` what was applied after that commit (what can be
/// read of it), renames `dir` to `dir.damaged-SECONDS` (kept for inspection), and writes a
/// fresh journal checkpointed at the commit. Points before it are dropped: they can no
/// longer be rebuilt. Returns the committed LSN and where the old journal went.
pub fn recover_damaged(dir: &Path, disk: &DiskFile) -> Result<(u64, PathBuf)> {
    recover_damaged_in(&RealFs, dir, disk)
}

/// [`recover_damaged`] on any [`FileSystem`].
pub fn recover_damaged_in(
    fs: &dyn FileSystem,
    dir: &Path,
    disk: &DiskFile,
) -> Result<(u64, PathBuf)> {
    let listed = list_segments(fs, dir)?;
    let n = listed.len();
    let mut committed = 0;
    // Whether the newest resync marker that can be read says a resync is under way: the
    // fresh journal says so too, or it would make points of a half-resynced disk.
    let mut resyncing = false;
    disk.drop_cache()?;
    for (i, (_, path)) in listed.iter().enumerate() {
        let last = i + 1 == n;
        let s = scan(fs, path, last)?;
        if let Some(c) = s.last_commit() {
            committed = c.0;
        }
        for p in s.points.iter().filter(|p| !last || p.lsn <= committed) {
            match p.kind {
                PointKind::ResyncStarted => resyncing = true,
                PointKind::ResyncCompleted => resyncing = false,
                _ => {}
            }
        }
        if last {
            let commit_end = s.last_commit().map_or(0, |c| c.1);
            let f = open_read(fs, path)?;
            for r in s.undos.iter().rev().filter(|r| r.pos >= commit_end) {
                match read_undo(&*f, path, *r) {
                    Ok((offset, old)) => disk.write_at(&old, offset)?,
                    Err(e) => {
                        tracing::warn!(error = %e, lsn = r.lsn, "an uncommitted write cannot be rolled back (its undo record is damaged); the process server sends it again")
                    }
                }
            }
            disk.sync()?;
        }
    }
    // The fresh journal is made whole beside the damaged one, then the two are swapped:
    // a crash at any point leaves either the damaged journal (run this again) or a fresh
    // one at the committed LSN, never an empty directory that would start from LSN 0.
    let fresh = recovering_dir(dir);
    if fs.exists(&fresh) {
        for name in fs
            .list(&fresh)
            .ctx(|| format!("list {}", fresh.display()))?
        {
            fs.remove_file(&fresh.join(&name))
                .ctx(|| format!("remove {}", fresh.join(&name).display()))?;
        }
    }
    fs.create_dir_all(&fresh)
        .ctx(|| format!("create {}", fresh.display()))?;
    let path = seg_path(&fresh, 1);
    let f = fs
        .open(&path, OpenMode::CreateNew)
        .ctx(|| format!("create {}", path.display()))?;
    let mut buf = Vec::new();
    encode_commit(committed, 0, &mut buf);
    if resyncing {
        encode_carried_resync(committed, 0, &mut buf);
    }
    f.write_all_at(&buf, 0)
        .and_then(|_| f.sync_all())
        .ctx(|| format!("write {}", path.display()))?;
    sync_dir(fs, &fresh)?;
    let parent = store::parent_dir(dir);
    sync_dir(fs, &parent)?;
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("journal");
    let aside = dir.with_file_name(format!("{name}.damaged-{now_s}"));
    fs.rename(dir, &aside)
        .ctx(|| format!("rename {} to {}", dir.display(), aside.display()))?;
    fs.rename(&fresh, dir)
        .ctx(|| format!("rename {} to {}", fresh.display(), dir.display()))?;
    sync_dir(fs, &parent)?;
    Ok((committed, aside))
}

/// Where [`recover_damaged`] builds the fresh journal before swapping it in.
fn recovering_dir(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("journal");
    dir.with_file_name(format!("{name}.recovering"))
}

/// Finishes a [`recover_damaged`] that a crash stopped between setting the damaged journal
/// aside and moving the fresh one in.
fn finish_recovery(fs: &dyn FileSystem, dir: &Path) -> Result<()> {
    let fresh = recovering_dir(dir);
    if !fs.exists(dir) && fs.exists(&fresh) {
        tracing::warn!(journal = %dir.display(), "finishing a journal recovery that a crash interrupted");
        fs.rename(&fresh, dir)
            .ctx(|| format!("rename {} to {}", fresh.display(), dir.display()))?;
        sync_dir(fs, &store::parent_dir(dir))?;
    }
    Ok(())
}

/// The error for corruption found at byte `at` of segment `path`.
fn corrupt(path: PathBuf, at: u64) -> Error {
    Error::JournalCorrupt {
        path,
        offset: at,
        detail: "a damaged record lies before records written after it: data a commit covered is damaged (a flipped byte at rest), so nothing is rolled back or truncated".into(),
    }
}

/// Points and the committed LSN of a journal, read without changing anything (a running
/// master target may be appending to it: a torn tail of the newest segment is where the
/// listing ends, and only points a commit covers are listed).
pub fn inspect(dir: &Path) -> Result<(Vec<Point>, u64)> {
    inspect_in(&RealFs, dir)
}

/// [`inspect`] on any [`FileSystem`].
pub fn inspect_in(fs: &dyn FileSystem, dir: &Path) -> Result<(Vec<Point>, u64)> {
    let mut listed = list_segments(fs, dir)?;
    let (front, stray) = not_journal(fs, &listed)?;
    listed.drain(..front);
    if stray {
        listed.pop();
    }
    let n = listed.len();
    let mut points = Vec::new();
    let mut committed = 0;
    for (i, (_, path)) in listed.into_iter().enumerate() {
        let s = scan(fs, &path, false)?;
        let last = i + 1 == n;
        if let Some((at, _)) = s.corruption(last) {
            return Err(corrupt(path, at));
        }
        let checkpoint = s.commits.first().map_or(0, |c| c.0);
        if i > 0 && checkpoint > committed {
            points.clear(); // before a discontinuity: not part of the journal (see `load`)
        }
        let commit = s.last_commit().map_or(committed, |c| c.0);
        points.extend(s.points.into_iter().filter(|p| !last || p.lsn <= commit));
        committed = commit;
    }
    points.retain(|p| p.kind.is_point());
    Ok((points, committed))
}

/// Segments of a listing that are not part of the journal: `(front, stray)`.
///
/// - `front`: how many of the oldest sit before a gap in the sequence numbers. Pruning
///   removes the oldest segments, and a crash before the directory is synced can undo a
///   removal; the points of such a segment cannot be rebuilt (the undo records of the
///   segments after it are gone).
/// - `stray`: the last segment holds only its checkpoint, and the one before it has
///   commits past that checkpoint: a rotation failed after creating it, and the commits
///   went on in the old segment. Taken as the last, its checkpoint would hide them.
fn not_journal(fs: &dyn FileSystem, listed: &[(u32, PathBuf)]) -> Result<(usize, bool)> {
    let front = listed
        .windows(2)
        .rposition(|w| w[1].0 != w[0].0 + 1)
        .map_or(0, |gap| gap + 1);
    let [.., (_, prev), (_, last)] = &listed[front..] else {
        return Ok((front, false));
    };
    let tail = scan(fs, last, true)?;
    // A resync marker there is one a rotation carried over (`Journal::carry_resync`):
    // the segment before it says the same.
    if !(tail.undos.is_empty() && tail.points.iter().all(|p| !p.kind.is_point())) {
        return Ok((front, false));
    }
    let checkpoint = tail.last_commit().map_or(0, |c| c.0);
    let before = scan(fs, prev, false)?.last_commit().map_or(0, |c| c.0);
    // Equal: a segment holding nothing but the checkpoint of where the one before it ends
    // carries nothing; taken as the last, it would hide an uncommitted tail before it.
    Ok((front, before >= checkpoint))
}

/// Removes what [`not_journal`] finds.
fn drop_not_journal(fs: &dyn FileSystem, listed: &mut Vec<(u32, PathBuf)>) -> Result<()> {
    let (front, stray) = not_journal(fs, listed)?;
    let mut gone: Vec<PathBuf> = listed.drain(..front).map(|(_, p)| p).collect();
    if stray {
        gone.extend(listed.pop().map(|(_, p)| p));
    }
    for p in &gone {
        tracing::warn!(segment = %p.display(), "removing a journal segment a crash left behind (pruned before it, or made by a failed rotation)");
        fs.remove_file(p)
            .ctx(|| format!("remove {}", p.display()))?;
    }
    if let Some(p) = gone.first() {
        sync_dir(fs, &store::parent_dir(p))?;
    }
    Ok(())
}

/// Reads every segment, refuses corruption, and recovers the last one: rolls back on
/// `disk` what was applied after its last commit and notes where its valid part ends.
fn load(fs: &dyn FileSystem, listed: Vec<(u32, PathBuf)>, disk: &DiskFile) -> Result<Loaded> {
    let mut out = Loaded::default();
    let mut order = UndoOrder::default();
    let n = listed.len();
    for (i, (seq, path)) in listed.into_iter().enumerate() {
        let last = i + 1 == n;
        let s = scan(fs, &path, last)?;
        // Damage a valid record follows was written (and fsynced) before that record:
        // it is corruption of durable data, never a torn tail to truncate.
        if let Some((at, _)) = s.corruption(last) {
            return Err(corrupt(path, at));
        }
        // A segment must begin where the one before it ended: one that begins past it is
        // what a crash brought back after pruning (or emptying) removed what followed it.
        let checkpoint = s.commits.first().map_or(0, |c| c.0);
        if out.segments.last().is_some() && checkpoint > out.committed_lsn {
            let gone: Vec<PathBuf> = out.segments.drain(..).map(|s| s.path).collect();
            out.stale.extend(gone);
            out.points.clear();
            order = UndoOrder::default();
        }
        for u in &s.undos {
            order.feed(fs, &path, *u)?;
        }
        let mut keep_len = s.len;
        // Points past the last segment's last commit are a torn tail's: not kept, and not
        // needing the segment.
        let commit_lsn = s.last_commit().map_or(0, |c| c.0);
        if last {
            keep_len = roll_back_tail(fs, &path, &s, disk)?;
            out.points
                .extend(s.points.iter().filter(|p| p.lsn <= commit_lsn).cloned());
        } else {
            out.points.extend(s.points.iter().cloned());
        }
        if let Some(c) = s.last_commit() {
            out.committed_lsn = c.0;
        }
        let last_undo_lsn = s
            .undos
            .iter()
            .filter(|r| r.pos < keep_len)
            .map(|r| r.lsn)
            .max()
            .unwrap_or(0);
        out.segments.push(Segment {
            seq,
            path,
            bytes: keep_len,
            last_undo_lsn,
            last_point_lsn: s
                .points
                .iter()
                .filter(|p| p.kind.is_point() && (!last || p.lsn <= commit_lsn))
                .map(|p| p.lsn)
                .max()
                .unwrap_or(0),
        });
    }
    order.finish(fs)?;
    Ok(out)
}

/// Rolls back, newest first, what the last segment's undo records after its last commit
/// say was applied, and returns where the segment's committed part ends.
fn roll_back_tail(fs: &dyn FileSystem, path: &Path, s: &Scan, disk: &DiskFile) -> Result<u64> {
    let commit_end = s.last_commit().map_or(0, |c| c.1);
    let f = open_read(fs, path)?;
    let mut rolled = 0;
    for r in s.undos.iter().rev().filter(|r| r.pos >= commit_end) {
        let (offset, old) = read_undo(&*f, path, *r)?;
        disk.write_at(&old, offset)?;
        rolled += 1;
    }
    if rolled > 0 {
        disk.sync()?;
        tracing::warn!(disk = %disk.path().display(), rolled, "rolled back writes that were not committed before a crash");
    }
    if commit_end < s.len {
        tracing::warn!(segment = %path.display(), from = commit_end, bytes = s.len - commit_end, "truncating a torn journal tail (never acknowledged)");
    }
    Ok(commit_end)
}

/// Opens the last segment for appending, cut to its valid length, or creates the first.
fn open_active(
    fs: &dyn FileSystem,
    dir: &Path,
    mut segments: Vec<Segment>,
) -> Result<(Box<dyn FileHandle>, Vec<Segment>)> {
    if let Some(seg) = segments.last() {
        let f = fs
            .open(&seg.path, OpenMode::ReadWrite)
            .ctx(|| format!("open {}", seg.path.display()))?;
        f.set_len(seg.bytes)
            .ctx(|| format!("truncate {}", seg.path.display()))?;
        f.sync_all()
            .ctx(|| format!("fsync {}", seg.path.display()))?;
        return Ok((f, segments));
    }
    let seg = Segment {
        seq: 1,
        path: seg_path(dir, 1),
        bytes: 0,
        last_undo_lsn: 0,
        last_point_lsn: 0,
    };
    let f = fs
        .open(&seg.path, OpenMode::CreateOrOpen)
        .ctx(|| format!("create {}", seg.path.display()))?;
    segments.push(seg);
    Ok((f, segments))
}

/// What the segments of a journal hold, read at open.
#[derive(Default)]
struct Loaded {
    segments: Vec<Segment>,
    /// Segments before a discontinuity (see [`load`]), to remove.
    stale: Vec<PathBuf>,
    points: Vec<Point>,
    committed_lsn: u64,
}

impl Journal {
    /// Opens (or creates) the journal in `dir` and recovers: truncates a torn tail of the last
    /// segment and rolls back on `disk` every undo record after the last commit.
    pub fn open(dir: &Path, disk: &DiskFile) -> Result<Journal> {
        Journal::open_in(Arc::new(RealFs), dir, disk)
    }

    /// [`Journal::open`] on any [`FileSystem`] (the simulator's).
    pub fn open_in(fs: Arc<dyn FileSystem>, dir: &Path, disk: &DiskFile) -> Result<Journal> {
        finish_recovery(&*fs, dir)?;
        fs.create_dir_all(dir)
            .ctx(|| format!("create journal directory {}", dir.display()))?;
        let mut listed = list_segments(&*fs, dir)?;
        // A segment created by a rotation that crashed before its checkpoint is empty.
        while let Some((_, p)) = listed.last() {
            // An error here is an error, never "empty": that segment may hold the newest
            // commits.
            let len = fs
                .open(p, OpenMode::Read)
                .and_then(|f| f.len())
                .ctx(|| format!("stat {}", p.display()))?;
            if len > 0 || listed.len() == 1 {
                break;
            }
            fs.remove_file(p)
                .ctx(|| format!("remove empty segment {}", p.display()))?;
            listed.pop();
        }
        drop_not_journal(&*fs, &mut listed)?;
        // Read what the device holds, not pages a failed fsync left clean (see
        // `FileHandle::drop_cache`): recovery must see what a crash would leave.
        disk.drop_cache()?;
        let mut loaded = load(&*fs, listed, disk)?;
        for p in &loaded.stale {
            tracing::warn!(segment = %p.display(), "removing a journal segment a crash brought back after the segments following it were pruned");
            fs.remove_file(p)
                .ctx(|| format!("remove {}", p.display()))?;
        }
        let next_point_id = loaded.points.iter().map(|p| p.id + 1).max().unwrap_or(1);
        let resyncing = loaded
            .points
            .iter()
            .rev()
            .find(|p| !p.kind.is_point())
            .is_some_and(|p| p.kind == PointKind::ResyncStarted);
        loaded.points.retain(|p| p.kind.is_point());
        let (active, segments) = open_active(&*fs, dir, loaded.segments)?;
        let synced = segments.last().map_or(0, |s| s.bytes);
        let mut j = Journal {
            fs,
            dir: dir.into(),
            segments,
            active,
            synced_bytes: std::cell::Cell::new(synced),
            horizon_lsn: loaded.points.first().map_or(0, |p| p.lsn),
            points: loaded.points,
            committed_lsn: loaded.committed_lsn,
            next_point_id,
            resyncing,
            segment_target_bytes: SEGMENT_TARGET_BYTES,
        };
        if j.segments.last().expect("one segment").bytes == 0 {
            let mut buf = Vec::new();
            encode_commit(j.committed_lsn, 0, &mut buf);
            j.append(&buf)?;
            j.sync()?;
        }
        // Every open makes the segments' names durable: an earlier start may have created
        // the first segment and died (or failed) before its directory was synced, and
        // commits in a segment whose name a crash loses would be acknowledged and gone.
        sync_dir(&*j.fs, dir)?;
        sync_dir(&*j.fs, &store::parent_dir(dir))?;
        Ok(j)
    }

    /// The highest LSN durable on the disk.
    pub fn committed_lsn(&self) -> u64 {
        self.committed_lsn
    }

    /// Rotates segments past `bytes` instead of [`SEGMENT_TARGET_BYTES`] (tests use small
    /// segments to exercise pruning).
    pub fn with_segment_target_bytes(mut self, bytes: u64) -> Journal {
        self.segment_target_bytes = bytes.max(1);
        self
    }

    /// True while a resync is under way (no point may be made).
    pub fn resyncing(&self) -> bool {
        self.resyncing
    }

    /// Recovery points kept, oldest first.
    pub fn points(&self) -> &[Point] {
        &self.points
    }

    /// Bytes the journal occupies.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Appends encoded records to the active segment (not yet durable).
    pub fn append(&mut self, records: &[u8]) -> Result<()> {
        let seg = self.segments.last_mut().expect("always one segment");
        self.active
            .write_all_at(records, seg.bytes)
            .ctx(|| format!("append to {}", seg.path.display()))?;
        seg.bytes += records.len() as u64;
        Ok(())
    }

    /// Notes that undo records up to `lsn` are in the active segment.
    pub fn note_undo(&mut self, lsn: u64) {
        let seg = self.segments.last_mut().expect("always one segment");
        seg.last_undo_lsn = seg.last_undo_lsn.max(lsn);
    }

    /// Makes everything appended durable.
    ///
    /// A failed fsync leaves the unwritten pages marked clean (Linux): a later fsync that
    /// succeeds would not write them, and a reader would see bytes that no crash keeps. So
    /// on failure the unsynced range is read back and written again, which makes it dirty
    /// (best effort: if that fails too, recovery drops the cache before it reads).
    pub fn sync(&self) -> Result<()> {
        let end = self.segments.last().expect("always one segment").bytes;
        match self.active.sync_data() {
            Ok(()) => {
                self.synced_bytes.set(end);
                Ok(())
            }
            Err(e) => {
                let from = self.synced_bytes.get().min(end);
                let mut buf = vec![0u8; (end - from) as usize];
                let _ = self
                    .active
                    .read_exact_at(&mut buf, from)
                    .and_then(|()| self.active.write_all_at(&buf, from));
                Err(e).ctx(|| format!("fsync journal {}", self.dir.display()))
            }
        }
    }

    /// Records that everything up to `lsn` is durable on the disk, with the new `points`, and
    /// makes it durable. Rotates the segment when it is full.
    pub fn commit(&mut self, lsn: u64, time_us: u64, points: Vec<NewPoint>) -> Result<Vec<Point>> {
        let mut buf = Vec::new();
        let mut made = Vec::new();
        let first_id = self.next_point_id;
        for (plsn, ptime, kind, tag, (group_marker, group_members)) in points {
            // Resync markers are not points: they take no id, so point ids run on unbroken.
            let id = if kind.is_point() {
                self.next_point_id += 1;
                self.next_point_id - 1
            } else {
                0
            };
            let p = Point {
                id,
                lsn: plsn,
                time_us: ptime,
                kind,
                tag,
                group_marker,
                group_members,
            };
            encode_point(&p, &mut buf);
            made.push(p);
        }
        encode_commit(lsn, time_us, &mut buf);
        if let Err(e) = self.append(&buf).and_then(|()| self.sync()) {
            self.next_point_id = first_id;
            return Err(e);
        }
        self.committed_lsn = lsn;
        for p in &made {
            match p.kind {
                PointKind::ResyncStarted => self.resyncing = true,
                PointKind::ResyncCompleted => self.resyncing = false,
                _ => {
                    let seg = self.segments.last_mut().expect("always one segment");
                    seg.last_point_lsn = seg.last_point_lsn.max(p.lsn);
                    self.points.push(p.clone());
                }
            }
        }
        made.retain(|p| p.kind.is_point());
        Ok(made)
    }

    /// Starts a new segment if the active one is full (after a commit; a failure here leaves
    /// the commit durable, and the next commit tries again).
    pub fn rotate_if_full(&mut self, time_us: u64) -> Result<()> {
        if self.segments.last().expect("one").bytes >= self.segment_target_bytes {
            self.rotate(time_us)?;
        }
        Ok(())
    }

    /// Where the journal ends now, to go back to if a group fails before its commit.
    pub fn mark(&self) -> JournalMark {
        let seg = self.segments.last().expect("always one segment");
        JournalMark {
            seq: seg.seq,
            bytes: seg.bytes,
            last_undo_lsn: seg.last_undo_lsn,
        }
    }

    /// Drops everything appended since `mark` (a group that failed before its commit).
    pub fn truncate_to(&mut self, mark: JournalMark) -> Result<()> {
        let seg = self.segments.last_mut().expect("always one segment");
        assert_eq!(seg.seq, mark.seq, "no rotation happens inside a group");
        self.active
            .set_len(mark.bytes)
            .ctx(|| format!("truncate {}", seg.path.display()))?;
        seg.bytes = mark.bytes;
        seg.last_undo_lsn = mark.last_undo_lsn;
        self.synced_bytes
            .set(self.synced_bytes.get().min(mark.bytes));
        Ok(())
    }

    /// Frees room on a full volume when a single segment is left: empties it down to a
    /// checkpoint of the committed LSN. Every recovery point goes (the latest state stays:
    /// replication carries on). Returns whether anything was freed.
    ///
    /// Never while a resync is under way: the points from before it are the only consistent
    /// ones until it completes, and its start marker could not be written back after the
    /// truncation without a moment when a crash loses it (and with it, the knowledge that
    /// the disk is half resynced). The disk waits for room instead.
    pub fn reset_for_space(&mut self) -> Result<bool> {
        let checkpoint_len = 2 * COMMIT_RECORD_LEN;
        if self.resyncing || self.segments.len() != 1 || self.segments[0].bytes <= checkpoint_len {
            return Ok(false);
        }
        // Never truncate first: a crash between a truncation and the new checkpoint would
        // leave an empty journal and lose the committed LSN. Every segment starts with a
        // checkpoint of this very length, so overwriting it in place keeps the records after
        // it readable until the truncation is durable (a torn overwrite damages one copy).
        let mut buf = Vec::new();
        encode_commit(self.committed_lsn, 0, &mut buf);
        let seg = &mut self.segments[0];
        self.active
            .write_all_at(&buf, 0)
            .and_then(|()| self.active.sync_data())
            .and_then(|()| self.active.set_len(checkpoint_len))
            .and_then(|()| self.active.sync_all())
            .ctx(|| format!("empty {} down to its checkpoint", seg.path.display()))?;
        seg.bytes = checkpoint_len;
        seg.last_undo_lsn = 0;
        seg.last_point_lsn = 0;
        self.synced_bytes.set(checkpoint_len);
        self.points.clear();
        self.horizon_lsn = self.committed_lsn;
        Ok(true)
    }

    /// Frees room on a full volume: drops the oldest segment (and the points it makes
    /// unbuildable) if there is more than one. Returns whether anything was dropped.
    pub fn drop_oldest_for_space(&mut self) -> Result<bool> {
        if self.segments.len() < 2 {
            return Ok(false);
        }
        self.drop_oldest_segment()?;
        Ok(true)
    }

    /// Starts the next segment. It becomes the active one only once its checkpoint and its
    /// directory entry are durable: commits appended to a segment whose name a crash could
    /// lose would be acknowledged and then gone. On failure the new file is removed (as far
    /// as it can be) and the old segment stays active.
    fn rotate(&mut self, time_us: u64) -> Result<()> {
        let seq = self.segments.last().expect("one").seq + 1;
        let path = seg_path(&self.dir, seq);
        let mut buf = Vec::new();
        encode_commit(self.committed_lsn, time_us, &mut buf);
        self.carry_resync(time_us, &mut buf);
        let f = self
            .fs
            .open(&path, OpenMode::CreateNew)
            .ctx(|| format!("create journal segment {}", path.display()))?;
        let made = f
            .write_all_at(&buf, 0)
            .and_then(|()| f.sync_data())
            .and_then(|()| self.fs.sync_dir(&self.dir))
            .ctx(|| format!("start journal segment {}", path.display()));
        if let Err(e) = made {
            // The file is ours (created above). One left behind is harmless: open drops an
            // empty segment, and one holding only a checkpoint behind the commits of the
            // segment before it.
            let _ = self.fs.remove_file(&path);
            return Err(e);
        }
        self.active = f;
        self.synced_bytes.set(buf.len() as u64);
        self.segments.push(Segment {
            seq,
            path,
            bytes: buf.len() as u64,
            last_undo_lsn: 0,
            last_point_lsn: 0,
        });
        Ok(())
    }

    /// Drops points older than `window_us` before the newest point, then drops whole
    /// segments no kept point needs; then, while over `quota_bytes`, drops the oldest
    /// segments and the points they make unbuildable. Returns true when the quota forced
    /// points inside the window out.
    pub fn prune(&mut self, window_us: u64, quota_bytes: u64) -> Result<bool> {
        if let Some(newest) = self.points.last().map(|p| p.time_us) {
            let cutoff = newest.saturating_sub(window_us);
            self.points.retain(|p| p.time_us >= cutoff);
        }
        let needed_from = self.points.first().map_or(self.committed_lsn, |p| p.lsn);
        while self.segments.len() > 1
            && self.segments[0].last_undo_lsn <= needed_from
            && self.segments[0].last_point_lsn < needed_from
        {
            self.drop_oldest_segment()?;
        }
        let mut forced = false;
        while self.bytes() > quota_bytes && self.segments.len() > 1 {
            forced |= self.drop_oldest_segment()?;
        }
        Ok(forced)
    }

    /// Drops the oldest segment, and the points it takes with it: those it makes
    /// unbuildable (their undo records were in it), and those whose record was in it. The
    /// latter could still be built, but a restart would no longer list them: what is listed
    /// must survive a restart. Returns whether a kept point went.
    fn drop_oldest_segment(&mut self) -> Result<bool> {
        let seg = self.segments.remove(0);
        self.fs
            .remove_file(&seg.path)
            .ctx(|| format!("remove {}", seg.path.display()))?;
        // Durable now, so that no crash brings it back behind what follows it.
        sync_dir(&*self.fs, &self.dir)?;
        self.horizon_lsn = self.horizon_lsn.max(seg.last_undo_lsn);
        let (h, recorded_to) = (self.horizon_lsn, seg.last_point_lsn);
        let before = self.points.len();
        self.points.retain(|p| p.lsn >= h && p.lsn > recorded_to);
        Ok(self.points.len() < before)
    }

    /// Appends, while a resync is under way, a copy of its start marker (at the committed
    /// LSN) and a commit of that LSN to `buf`, which follows a segment's checkpoint: the
    /// marker that began the resync may be in a segment that pruning drops, and a restart
    /// that no longer saw it would make recovery points of a half-resynced disk. The commit
    /// after it keeps it out of the torn tail that a restart cuts off.
    ///
    /// ```text
    /// segment start: Commit{C} Commit{C} [Point{ResyncStarted, lsn C} Commit{C} Commit{C}]
    /// ```
    fn carry_resync(&self, time_us: u64, buf: &mut Vec<u8>) {
        if self.resyncing {
            encode_carried_resync(self.committed_lsn, time_us, buf);
        }
    }

    /// Writes the disk as it was at `point` into `out`, which holds a copy of the disk at
    /// the committed LSN: applies every undo record newer than the point, newest first.
    /// `touched(offset, len)` learns every range written.
    pub fn rewind(
        &self,
        point_lsn: u64,
        out: &dyn FileHandle,
        touched: &mut dyn FnMut(u64, u64),
    ) -> Result<u64> {
        if point_lsn < self.horizon_lsn {
            return Err(Error::NoSuchPoint(format!(
                "lsn {point_lsn} is older than the journal kept (from lsn {})",
                self.horizon_lsn
            )));
        }
        // A checksummed record past the disk's end would be a bug, never a reason to grow
        // the export.
        let size_bytes = out.len().ctx(|| "stat export".to_owned())?;
        let mut applied = 0;
        for seg in self.segments.iter().rev() {
            // A segment without undo records (a fresh one holds only its checkpoint) says
            // nothing about older segments: look further back.
            if seg.last_undo_lsn == 0 {
                continue;
            }
            // Segments are in LSN order: once one is wholly older than the point, all
            // earlier ones are too.
            if seg.last_undo_lsn <= point_lsn {
                break;
            }
            let s = scan(&*self.fs, &seg.path, false)?;
            let f = open_read(&*self.fs, &seg.path)?;
            for r in s
                .undos
                .iter()
                .rev()
                .filter(|r| r.lsn > point_lsn && r.pos < seg.bytes)
            {
                let (offset, old) = read_undo(&*f, &seg.path, *r)?;
                if offset.saturating_add(old.len() as u64) > size_bytes {
                    return Err(Error::JournalCorrupt {
                        path: seg.path.clone(),
                        offset: r.pos,
                        detail: format!(
                            "an undo record at {offset}+{} ends past the disk's {size_bytes} bytes",
                            old.len()
                        ),
                    });
                }
                // What was zeros (a never-written region) goes back to a hole: an export of
                // a point before a disk grew stays as thin as the disk was.
                if r.zeros {
                    out.zero_range(offset, old.len() as u64)
                } else {
                    out.write_all_at(&old, offset)
                }
                .ctx(|| "write export".to_owned())?;
                touched(offset, old.len() as u64);
                applied += 1;
            }
        }
        Ok(applied)
    }
}
