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
use crate::journal::{encode_undo, Journal, Point, PointKind};

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
    fn lsn(&self) -> u64 {
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
    /// Set while the quota has forced points inside the window out.
    pub quota_limited: bool,
}

/// The apply state of one attached disk.
#[derive(Debug)]
pub struct Applier {
    disk_id: u64,
    disk: DiskFile,
    journal: Journal,
    policy: RetentionPolicy,
    last_point_time_us: u64,
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
            last_point_time_us,
            stats: ApplyStats::default(),
        }
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
            .position_first(|w| wire_protocol::digest(&w.data) != w.digest);
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
        match b.lsn.cmp(&next_lsn) {
            std::cmp::Ordering::Less => Verdict::Duplicate,
            std::cmp::Ordering::Greater => Verdict::Gap { expected: next_lsn },
            std::cmp::Ordering::Equal => Verdict::Accept(vec![Item::Bookmark(b.clone())]),
        }
    }

    /// Applies accepted items (consecutive LSNs from `committed + 1`) durably. Returns the
    /// recovery points made.
    pub fn apply(&mut self, items: &[Item]) -> Result<Vec<Point>> {
        let Some(last) = items.last() else {
            return Ok(Vec::new());
        };
        assert_eq!(
            items[0].lsn(),
            self.committed_lsn() + 1,
            "items follow the committed LSN"
        );
        let mut undo = Vec::new();
        let mut pending: Vec<(u64, &Bytes)> = Vec::new();
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
                    let mut old = vec![0u8; data.len()];
                    self.disk.read_at(&mut old, *offset)?;
                    overlay(&mut old, *offset, &pending);
                    encode_undo(*lsn, *timestamp_us, *offset, &old, &mut undo);
                    pending.push((*offset, data));
                    max_undo_lsn = *lsn;
                    last_time_us = last_time_us.max(*timestamp_us);
                }
                Item::Bookmark(b) => {
                    let kind = match b.kind {
                        BookmarkKind::AppConsistent => PointKind::AppConsistent,
                        BookmarkKind::CrashConsistent => PointKind::CrashConsistent,
                        BookmarkKind::ResyncStarted => PointKind::ResyncStarted,
                        BookmarkKind::ResyncCompleted => PointKind::ResyncCompleted,
                    };
                    last_time_us = last_time_us.max(b.time_us);
                    let resyncing = points
                        .iter()
                        .rev()
                        .find(|p: &&(u64, u64, PointKind, String)| !p.2.is_point())
                        .map_or(self.journal.resyncing(), |p| {
                            p.2 == PointKind::ResyncStarted
                        });
                    if kind.is_point() && resyncing {
                        tracing::warn!(disk = self.disk_id, tag = %b.tag, "bookmark during a resync is not a consistent point; skipped");
                        continue;
                    }
                    points.push((b.lsn, b.time_us, kind, b.tag.clone()));
                    self.last_point_time_us = b.time_us;
                }
            }
        }
        if !pending.is_empty() {
            // Write-ahead: what the writes overwrite is durable before they can reach the disk.
            self.journal.append(&undo)?;
            self.journal.note_undo(max_undo_lsn);
            self.journal.sync()?;
            for (offset, data) in &pending {
                self.disk.write_at(data, *offset)?;
                self.stats.bytes_applied += data.len() as u64;
            }
            self.disk.sync()?;
            self.stats.writes += pending.len() as u64;
        }
        let resyncing = points
            .iter()
            .rev()
            .find(|p| !p.2.is_point())
            .map_or(self.journal.resyncing(), |p| {
                p.2 == PointKind::ResyncStarted
            });
        if !resyncing
            && last_time_us >= self.last_point_time_us + self.policy.crash_point_interval_us
            && !matches!(last, Item::Bookmark(_))
        {
            points.push((
                last.lsn(),
                last_time_us,
                PointKind::CrashConsistent,
                String::new(),
            ));
            self.last_point_time_us = last_time_us;
        }
        let made = self.journal.commit(last.lsn(), last_time_us, points)?;
        self.stats.groups += 1;
        let forced = self
            .journal
            .prune(self.policy.window_us, self.policy.quota_bytes)?;
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
        Ok(made)
    }

    /// blake3 digests of `count` blocks of `block_size` from `first`, computed in parallel
    /// (the last block of the disk may be short).
    pub fn block_digests(&self, block_size: u32, first: u64, count: u32) -> Result<Vec<[u8; 32]>> {
        block_digests(&self.disk, block_size, first, count)
    }
}

/// blake3 digests of a range of blocks of `disk`, in parallel.
pub fn block_digests(
    disk: &DiskFile,
    block_size: u32,
    first: u64,
    count: u32,
) -> Result<Vec<[u8; 32]>> {
    let bs = u64::from(block_size);
    let size = disk.size_bytes();
    (first..first + u64::from(count))
        .into_par_iter()
        .map(|b| {
            let start = b * bs;
            let len = bs.min(size.saturating_sub(start)) as usize;
            let mut buf = vec![0u8; len];
            disk.read_at(&mut buf, start)?;
            Ok(wire_protocol::digest(&buf))
        })
        .collect()
}

/// Copies into `old` (the disk's bytes at `offset`) the parts of earlier writes of the same
/// group that overlap it: those are not on the disk yet, but will be when this write lands.
fn overlay(old: &mut [u8], offset: u64, pending: &[(u64, &Bytes)]) {
    let end = offset + old.len() as u64;
    for (po, pd) in pending {
        let pend = po + pd.len() as u64;
        let (s, e) = (offset.max(*po), end.min(pend));
        if s < e {
            old[(s - offset) as usize..(e - offset) as usize]
                .copy_from_slice(&pd[(s - po) as usize..(e - po) as usize]);
        }
    }
}
