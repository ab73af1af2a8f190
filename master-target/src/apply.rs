//! Applying a disk's stream: validation against the stream position, then write-ahead apply.
//!
//! # Calling order
//! 1. [`Applier::check_batch`] / [`Applier::check_bookmark`] against `next_lsn` (committed
//!    plus what is accepted but not yet applied): duplicates, gaps, ranges and digests are
//!    decided here, before any byte moves. A batch is accepted whole or not at all.
//! 2. [`Applier::apply`] a group of accepted items: undo records → journal fsync → disk
//!    writes → disk fsync → commit record (with the new points) → journal fsync.
//!    Only then may the caller acknowledge the group's LSNs.

use bytes::Bytes;
use rayon::prelude::*;
use wire_protocol::{Bookmark, BookmarkKind, WriteBatch};

use crate::disk::DiskFile;
use crate::error::{Error, Result};
use crate::extents::Newest;
use crate::journal::{
    begin_undo, finish_undo, undo_records, Journal, JournalMark, Point, PointKind,
};
use crate::uring::IoBackend;

/// One accepted item of a disk's stream.
#[derive(Debug, Clone)]
pub enum Item {
    /// A write with its LSN.
    Write {
        /// LSN.
        lsn: u64,
        /// Capture time.
        timestamp_us: u64,
        /// Byte offset.
        offset: u64,
        /// Data (digest already verified).
        data: Bytes,
    },
    /// A bookmark (its own LSN).
    Bookmark(Bookmark),
}

impl Item {
    /// The item's LSN.
    pub fn lsn(&self) -> u64 {
        match self {
            Item::Write { lsn, .. } => *lsn,
            Item::Bookmark(b) => b.lsn,
        }
    }
}

/// What to do with an incoming batch or bookmark.
#[derive(Debug)]
pub enum Verdict {
    /// Apply these items (a batch partly applied before is trimmed to its new part).
    Accept(Vec<Item>),
    /// Everything in it is applied already: acknowledge again, change nothing.
    Duplicate,
    /// It starts past the next expected LSN: ask for a resend from `expected`.
    Gap {
        /// The next LSN this disk needs.
        expected: u64,
    },
    /// It must not be applied.
    Refuse(Error),
}

/// Retention settings of an applier.
#[derive(Debug, Clone, Copy)]
pub struct RetentionPolicy {
    /// A crash-consistent point at least this often, in replicated time.
    pub crash_point_interval_us: u64,
    /// Points older than this (relative to the newest) are pruned.
    pub window_us: u64,
    /// The journal's size limit.
    pub quota_bytes: u64,
}

/// Counters of an applier, for metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyStats {
    /// Block bytes written to the disk.
    pub bytes_applied: u64,
    /// Groups applied.
    pub groups: u64,
    /// Writes applied.
    pub writes: u64,
    /// Writes of the bytes the disk already held, or that earlier writes of their group
    /// had put there: neither journaled nor written.
    pub writes_unchanged: u64,
    /// Writes wholly over what an earlier write of their group saved since its last
    /// bookmark: written, not journaled.
    pub writes_covered: u64,
    /// Set while the quota has forced points inside the window out.
    pub quota_limited: bool,
    /// Blocks hashed for resync digest requests (cached digests are not counted).
    pub digests_hashed: u64,
}

/// The apply state of one attached disk.
#[derive(Debug)]
pub struct Applier {
    disk_id: u64,
    disk: DiskFile,
    journal: Journal,
    policy: RetentionPolicy,
    io: IoBackend,
    digest_cache: Option<DigestCache>,
    last_point_time_us: u64,
    /// Where the current group's undo records end, once it has started writing the disk
    /// (a failure must put the disk back).
    undo_end: Option<JournalMark>,
    /// See [`Applier::datastore_full`].
    datastore_full: bool,
    /// Counters since start.
    pub stats: ApplyStats,
}

impl Applier {
    /// Wraps a recovered disk and journal.
    pub fn new(disk_id: u64, disk: DiskFile, journal: Journal, policy: RetentionPolicy) -> Self {
        let last_point_time_us = journal.points().last().map_or(0, |p| p.time_us);
        Applier {
            disk_id,
            disk,
            journal,
            policy,
            io: IoBackend::Syscall,
            digest_cache: None,
            last_point_time_us,
            undo_end: None,
            datastore_full: false,
            stats: ApplyStats::default(),
        }
    }

    /// Uses `io` for the disk writes of each group.
    pub fn with_io(mut self, io: IoBackend) -> Self {
        self.io = io;
        self
    }

    /// The disk's id.
    pub fn disk_id(&self) -> u64 {
        self.disk_id
    }

    /// The disk.
    pub fn disk(&self) -> &DiskFile {
        &self.disk
    }

    /// The journal.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The highest durable LSN.
    pub fn committed_lsn(&self) -> u64 {
        self.journal.committed_lsn()
    }

    /// Decides what to do with `b`, given that `next_lsn` is the next LSN the stream needs.
    pub fn check_batch(&self, b: &WriteBatch, next_lsn: u64) -> Verdict {
        if b.last_lsn() < next_lsn {
            return Verdict::Duplicate;
        }
        if b.first_lsn > next_lsn {
            return Verdict::Gap { expected: next_lsn };
        }
        let size = self.disk.size_bytes();
        let skip = (next_lsn - b.first_lsn) as usize;
        let fresh = &b.writes[skip..];
        for w in fresh {
            if w.offset
                .checked_add(w.data.len() as u64)
                .is_none_or(|end| end > size)
            {
                return Verdict::Refuse(Error::OutOfRange {
                    disk_id: self.disk_id,
                    offset: w.offset,
                    len: w.data.len() as u64,
                    size,
                });
            }
        }
        // Digests are the most expensive check: spread them over the cores.
        let bad = fresh
            .par_iter()
            .position_first(|w| !wire_protocol::digest_matches(w));
        if let Some(i) = bad {
            return Verdict::Refuse(Error::DigestMismatch {
                disk_id: self.disk_id,
                lsn: next_lsn + i as u64,
            });
        }
        Verdict::Accept(
            fresh
                .iter()
                .enumerate()
                .map(|(i, w)| Item::Write {
                    lsn: next_lsn + i as u64,
                    timestamp_us: w.timestamp_us,
                    offset: w.offset,
                    data: w.data.clone(),
                })
                .collect(),
        )
    }

    /// Decides what to do with a bookmark.
    pub fn check_bookmark(&self, b: &Bookmark, next_lsn: u64) -> Verdict {
        if let Err(e) = wire_protocol::message::validate_tag(&b.tag) {
            return Verdict::Refuse(e.into());
        }
        match b.lsn.cmp(&next_lsn) {
            std::cmp::Ordering::Less => Verdict::Duplicate,
            std::cmp::Ordering::Greater => Verdict::Gap { expected: next_lsn },
            std::cmp::Ordering::Equal => Verdict::Accept(vec![Item::Bookmark(b.clone())]),
        }
    }

    /// Applies accepted items (consecutive LSNs from `committed + 1`) durably. Returns the
    /// recovery points made. If it fails before the group's commit is durable, the disk and
    /// the journal are put back as they were before the group (from the undo records in
    /// memory), so the same items can be applied again later (a full volume that gets room).
    pub fn apply(&mut self, items: &[Item]) -> Result<Vec<Point>> {
        self.datastore_full = false;
        let mark = self.journal.mark();
        let last_point_time_us = self.last_point_time_us;
        let mut undo = Vec::new();
        match self.apply_group(items, &mut undo) {
            Ok(made) => {
                let time_us = self.last_point_time_us;
                if let Err(e) = self.journal.rotate_if_full(time_us) {
                    tracing::warn!(disk = self.disk_id, error = %e, "journal rotation failed; the next commit tries again");
                }
                self.after_commit();
                Ok(made)
            }
            Err(e) => {
                self.last_point_time_us = last_point_time_us;
                // Before the group's first disk write there is nothing to put back (and an
                // undo record whose read failed holds zeros, not the disk's bytes).
                let undo_end = self.undo_end.take();
                if undo_end.is_none() {
                    undo.clear();
                }
                self.restore(&undo, undo_end, mark).map_err(|r| Error::Io {
                    context: format!(
                        "disk {}: after a failed group ({e}), putting the disk back failed; restart the master target (its journal recovery rolls the group back)",
                        self.disk_id
                    ),
                    source: std::io::Error::other(r.to_string()),
                })?;
                Err(e)
            }
        }
    }

    /// Writes back the old bytes of every undo record in `undo` (newest first) and drops the
    /// journal's tail since `mark`.
    ///
    /// Order matters if this fails half-way: first the journal loses what follows the
    /// group's undo records (a commit whose fsync failed may still be readable, and a
    /// restart must not take it for durable while the disk is half put back); then the
    /// disk is put back; only then do the undo records go. A restart after a failure at any
    /// of these steps finds either the group committed and applied, or its undo records
    /// after the last commit, and rolls it back.
    fn restore(
        &mut self,
        undo: &[u8],
        undo_end: Option<JournalMark>,
        mark: JournalMark,
    ) -> Result<()> {
        if let Some(end) = undo_end {
            self.journal.truncate_to(end)?;
            self.journal.sync()?;
        }
        for (offset, old) in undo_records(undo).into_iter().rev() {
            self.disk.write_at(&old, offset)?;
        }
        self.disk.sync()?;
        if let Some(c) = &mut self.digest_cache {
            c.digests.iter_mut().for_each(|d| *d = None);
        }
        self.journal.truncate_to(mark)
    }

    /// Write-ahead: what the writes overwrite is durable before they can reach the disk;
    /// then the writes, made durable.
    fn write_ahead(
        &mut self,
        undo: &[u8],
        max_undo_lsn: u64,
        pending: &[(u64, &Bytes)],
    ) -> Result<()> {
        self.journal.append(undo)?;
        self.journal.note_undo(max_undo_lsn);
        self.journal.sync()?;
        let writes: Vec<(u64, &[u8])> = pending.iter().map(|(o, d)| (*o, &d[..])).collect();
        self.undo_end = Some(self.journal.mark());
        if let Some(c) = &mut self.digest_cache {
            for (o, d) in &writes {
                c.invalidate(*o, d.len() as u64);
            }
        }
        self.write_and_sync(&writes)?;
        self.stats.bytes_applied += writes.iter().map(|w| w.1.len() as u64).sum::<u64>();
        self.stats.writes += pending.len() as u64;
        Ok(())
    }

    fn apply_group(&mut self, items: &[Item], undo: &mut Vec<u8>) -> Result<Vec<Point>> {
        let Some(last) = items.last() else {
            return Ok(Vec::new());
        };
        assert_eq!(
            items[0].lsn(),
            self.committed_lsn() + 1,
            "items follow the committed LSN"
        );
        // Sized once: every write's old bytes plus its record header and metadata.
        let undo_len: usize = items
            .iter()
            .map(|i| match i {
                Item::Write { data, .. } => data.len() + 40,
                Item::Bookmark(_) => 0,
            })
            .sum();
        undo.reserve(undo_len);
        let mut pending: Vec<(u64, &Bytes)> = Vec::new();
        // The newest pending write over each byte (the disk is written at the group's
        // end, so a write's old bytes are the disk's with these laid over them).
        let mut newest = Newest::default();
        // What the group saved an undo record of since its start or its last bookmark (a
        // point may be made at a bookmark, so what follows it saves again).
        let mut saved = Newest::default();
        let mut max_undo_lsn = 0;
        let mut last_time_us = 0;
        let mut points = Vec::new();
        for item in items {
            match item {
                Item::Write {
                    lsn,
                    timestamp_us,
                    offset,
                    data,
                } => {
                    last_time_us = last_time_us.max(*timestamp_us);
                    let end = *offset + data.len() as u64;
                    if saved.covers(*offset, end) {
                        // Its old bytes are an earlier write's of this group, never a
                        // point's: rolling the group back, or rewinding to any point,
                        // restores them from the earlier write's undo record. They are
                        // all in the group's writes (no read), and may be these bytes.
                        let same = newest.within(*offset, end).all(|(s, e, i)| {
                            let (po, pd) = pending[i];
                            pd[(s - po) as usize..(e - po) as usize]
                                == data[(s - offset) as usize..(e - offset) as usize]
                        });
                        if same {
                            self.stats.writes_unchanged += 1;
                            continue;
                        }
                        newest.insert(*offset, end, pending.len());
                        pending.push((*offset, data));
                        self.stats.writes_covered += 1;
                        continue;
                    }
                    // The old bytes go straight into the journal buffer.
                    let start = undo.len();
                    let at = begin_undo(*lsn, *timestamp_us, *offset, data.len(), undo);
                    self.disk.read_at_sparse(&mut undo[at..], *offset)?;
                    overlay(&mut undo[at..], *offset, &pending, &newest);
                    if undo[at..] == data[..] {
                        // The disk holds these bytes already (zeros onto a thin disk's
                        // never-written blocks, a resync's unchanged blocks): no undo, no
                        // write, so a thin disk stays thin and the journal holds nothing.
                        undo.truncate(start);
                        self.stats.writes_unchanged += 1;
                        continue;
                    }
                    finish_undo(undo, start);
                    newest.insert(*offset, end, pending.len());
                    saved.insert(*offset, end, pending.len());
                    pending.push((*offset, data));
                    max_undo_lsn = *lsn;
                }
                Item::Bookmark(b) => {
                    saved.clear();
                    let kind = point_kind(b.kind);
                    last_time_us = last_time_us.max(b.time_us);
                    if kind.is_point() && resyncing_after(&points, self.journal.resyncing()) {
                        tracing::warn!(disk = self.disk_id, tag = %b.tag, "bookmark during a resync is not a consistent point; skipped");
                        continue;
                    }
                    let group = (b.group_marker, b.group_members);
                    points.push((b.lsn, b.time_us, kind, b.tag.clone(), group));
                    self.last_point_time_us = b.time_us;
                }
            }
        }
        if !pending.is_empty() {
            self.write_ahead(undo, max_undo_lsn, &pending)?;
        }
        if !resyncing_after(&points, self.journal.resyncing())
            && last_time_us >= self.last_point_time_us + self.policy.crash_point_interval_us
            && !matches!(last, Item::Bookmark(_))
        {
            points.push((
                last.lsn(),
                last_time_us,
                PointKind::CrashConsistent,
                String::new(),
                (0, 0),
            ));
            self.last_point_time_us = last_time_us;
        }
        let made = self.journal.commit(last.lsn(), last_time_us, points)?;
        self.undo_end = None;
        Ok(made)
    }

    /// Writes a group's data to the disk and makes it durable: through the chosen backend
    /// on a real disk, through the store's handle on a simulated one.
    fn write_and_sync(&mut self, writes: &[(u64, &[u8])]) -> Result<()> {
        let r = match self.disk.file() {
            None => writes
                .iter()
                .try_for_each(|(offset, data)| self.disk.write_at(data, *offset))
                .and_then(|()| self.disk.sync()),
            Some(file) => self.io.write_all_sync(file, writes).map_err(|e| Error::Io {
                context: format!("write and fsync {}", self.disk.path().display()),
                source: e,
            }),
        };
        // A full datastore (a thin disk) is no reason to drop journal segments.
        self.datastore_full = r.as_ref().is_err_and(crate::core::out_of_space);
        r
    }

    /// Whether the last failed group failed for a full datastore (not the journal's
    /// volume): room in the journal would not help it.
    pub fn datastore_full(&self) -> bool {
        self.datastore_full
    }

    /// Counts the group and prunes the journal (after a durable commit: a failure here is
    /// logged, never taken for a failed group).
    fn after_commit(&mut self) {
        self.stats.groups += 1;
        let forced = match self
            .journal
            .prune(self.policy.window_us, self.policy.quota_bytes)
        {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(disk = self.disk_id, error = %e, "journal pruning failed; the next commit tries again");
                false
            }
        };
        if forced {
            let kept = self
                .journal
                .points()
                .first()
                .zip(self.journal.points().last())
                .map(|(a, b)| (b.time_us - a.time_us) / 1_000_000);
            tracing::warn!(disk = self.disk_id, window_kept_s = kept.unwrap_or(0), "journal quota reached: dropping the oldest recovery points; the retention window actually kept is shorter than configured");
        }
        self.stats.quota_limited = forced
            || (self.stats.quota_limited && self.journal.bytes() > self.policy.quota_bytes / 2);
    }

    /// Frees room in the journal on a full volume (its oldest segment). Returns whether
    /// anything was freed.
    pub fn free_journal_space(&mut self) -> Result<bool> {
        let freed = self.journal.drop_oldest_for_space()?
            || {
                let reset = self.journal.reset_for_space()?;
                if reset {
                    tracing::warn!(disk = self.disk_id, "a volume is full with one journal segment left: every recovery point of the disk is dropped to make room (the latest state stays)");
                } else if self.journal.resyncing() {
                    tracing::warn!(disk = self.disk_id, "a volume is full during a resync with one journal segment left: its recovery points, the only consistent ones until the resync completes, are kept, and the disk waits for room; free space on the retention volume");
                }
                reset
            };
        if freed {
            self.stats.quota_limited = true;
        }
        Ok(freed)
    }

    /// blake3 digests of `count` blocks of `block_size` from `first`, computed in parallel
    /// (the last block of the disk may be short). Digests are cached per block size and
    /// invalidated by writes, so an interrupted resync that asks again hashes only what
    /// changed since.
    pub fn block_digests(
        &mut self,
        block_size: u32,
        first: u64,
        count: u32,
    ) -> Result<Vec<[u8; 32]>> {
        let blocks = self.disk.size_bytes().div_ceil(u64::from(block_size));
        let last = (first + u64::from(count)).min(blocks);
        if blocks > MAX_CACHED_DIGEST_BLOCKS {
            return block_digests(&self.disk, block_size, first, count);
        }
        if self
            .digest_cache
            .as_ref()
            .is_none_or(|c| c.block_size != u64::from(block_size))
        {
            self.digest_cache = Some(DigestCache {
                block_size: u64::from(block_size),
                digests: vec![None; blocks as usize],
            });
        }
        let cache = self.digest_cache.as_mut().expect("just set");
        let missing: Vec<u64> = (first..last)
            .filter(|&b| cache.digests[b as usize].is_none())
            .collect();
        let disk = &self.disk;
        let bs = u64::from(block_size);
        let fresh: Vec<(u64, [u8; 32])> = missing
            .iter()
            .copied()
            .zip(digest_blocks(disk, bs, missing.clone())?)
            .collect();
        self.stats.digests_hashed += fresh.len() as u64;
        for (b, d) in fresh {
            cache.digests[b as usize] = Some(d);
        }
        Ok((first..last)
            .map(|b| cache.digests[b as usize].expect("filled above"))
            .collect())
    }
}

/// Disks with more blocks than this are not cached: 33 bytes a block, so 1 Mi blocks is
/// about 35 MB a disk (a 64 GiB disk at 64 KiB blocks), and 60 disks stay near 2 GB.
pub const MAX_CACHED_DIGEST_BLOCKS: u64 = 1 << 20;

/// Per-block digests at one block size; `None` where a write changed the block.
#[derive(Debug)]
struct DigestCache {
    block_size: u64,
    digests: Vec<Option<[u8; 32]>>,
}

impl DigestCache {
    fn invalidate(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        for b in offset / self.block_size..=(offset + len - 1) / self.block_size {
            if let Some(d) = self.digests.get_mut(b as usize) {
                *d = None;
            }
        }
    }
}

/// blake3 digests of a range of blocks of `disk`, in parallel (blocks past the end are
/// left out; the last block may be short).
pub fn block_digests(
    disk: &DiskFile,
    block_size: u32,
    first: u64,
    count: u32,
) -> Result<Vec<[u8; 32]>> {
    let blocks = disk.size_bytes().div_ceil(u64::from(block_size));
    digest_blocks(
        disk,
        u64::from(block_size),
        (first..(first + u64::from(count)).min(blocks)).collect(),
    )
}

/// blake3 of each of `blocks`, in parallel, hashed straight from a read-only mapping of the
/// disk (no copy, no buffer per block).
fn digest_blocks(disk: &DiskFile, block_size: u64, blocks: Vec<u64>) -> Result<Vec<[u8; 32]>> {
    if blocks.is_empty() {
        return Ok(Vec::new());
    }
    let size = disk.size_bytes();
    let Some(map) = disk.map()? else {
        // A simulated disk: read each block (in order, so the run stays deterministic).
        let mut buf = vec![0u8; block_size as usize];
        return blocks
            .into_iter()
            .map(|b| {
                let start = (b * block_size).min(size);
                let n = (((b + 1) * block_size).min(size) - start) as usize;
                disk.read_at(&mut buf[..n], start)?;
                Ok(wire_protocol::digest(&buf[..n]))
            })
            .collect();
    };
    Ok(blocks
        .into_par_iter()
        .map(|b| {
            let start = (b * block_size).min(size) as usize;
            let end = ((b + 1) * block_size).min(size) as usize;
            wire_protocol::digest(&map[start..end])
        })
        .collect())
}

/// Copies into `old` (the disk's bytes at `offset`) the parts of earlier writes of the same
/// group that overlap it, the newest of each byte (`newest`, indexing `pending`): those are
/// not on the disk yet, but will be when this write lands.
fn overlay(old: &mut [u8], offset: u64, pending: &[(u64, &Bytes)], newest: &Newest) {
    let end = offset + old.len() as u64;
    for (s, e, i) in newest.within(offset, end) {
        let (po, pd) = pending[i];
        old[(s - offset) as usize..(e - offset) as usize]
            .copy_from_slice(&pd[(s - po) as usize..(e - po) as usize]);
    }
}

fn point_kind(kind: BookmarkKind) -> PointKind {
    match kind {
        BookmarkKind::AppConsistent => PointKind::AppConsistent,
        BookmarkKind::CrashConsistent => PointKind::CrashConsistent,
        BookmarkKind::ResyncStarted => PointKind::ResyncStarted,
        BookmarkKind::ResyncCompleted => PointKind::ResyncCompleted,
    }
}

/// Whether a resync is under way after `points` (the newest resync marker among them says;
/// none: as the journal was before them). No consistent point is made during a resync.
fn resyncing_after(points: &[crate::journal::NewPoint], before: bool) -> bool {
    points
        .iter()
        .rev()
        .find(|p| !p.2.is_point())
        .map_or(before, |p| p.2 == PointKind::ResyncStarted)
}
