//! The agent's stream core: batching with LSNs, the resend window, and the dirty-region
//! tracker. Pure state: no I/O, no clock (timestamps come in), so the same code runs in the
//! agent and in the deterministic simulator (`tests/simulation`).
//!
//! # Design constraints
//! - An LSN is consumed only when its batch enters the window: a batch the window cannot
//!   take (link down, buffer full) is not numbered, its regions go dirty instead, and the
//!   stream stays gap-free.
//! - Everything in the window stays until the process server acknowledges it (durable in
//!   its cache); the window is bounded in bytes (`--buffer`) and one oversized entry is
//!   always admitted into an empty window, so no write can wedge the stream.
//! - The dirty-region tracker is a bitmap of the disk's digest blocks: its memory is fixed
//!   by the disk's size (1 bit per 64 KiB block: 4 MiB for a 2 TiB disk), however long the
//!   outage and whatever the writes.

use std::collections::VecDeque;

use bytes::Bytes;
use wire_protocol::message::{MAX_BATCH_DATA_LEN, MAX_WRITES_PER_BATCH};
use wire_protocol::{Message, Write, WriteBatch};

/// A batch is sent once it holds this much data (1 MiB batches compress best with zstd and
/// keep per-batch overhead far below 0.1%).
pub const BATCH_BYTES: usize = 1 << 20;
/// ... or this many writes.
pub const BATCH_WRITES: usize = 1024;
const _: () = assert!(BATCH_BYTES <= MAX_BATCH_DATA_LEN && BATCH_WRITES <= MAX_WRITES_PER_BATCH);

/// A sealed batch, numbered, ready for the window.
#[derive(Debug)]
pub struct Batch {
    /// The message (a `WriteBatch`).
    pub msg: Message,
    /// Its first LSN.
    pub first_lsn: u64,
    /// Its last LSN.
    pub last_lsn: u64,
    /// Data bytes it carries.
    pub bytes: usize,
    /// (offset, length) of each write: what goes dirty if the window cannot take it.
    pub spans: Vec<(u64, u64)>,
}

/// Collects writes into batches and numbers them.
#[derive(Debug)]
pub struct Batcher {
    disk_id: u64,
    writes: Vec<Write>,
    bytes: usize,
    next_lsn: u64,
}

impl Batcher {
    /// A batcher whose first LSN follows `resume` (what the process server holds).
    pub fn new(disk_id: u64, resume: u64) -> Batcher {
        Batcher {
            disk_id,
            writes: Vec::new(),
            bytes: 0,
            next_lsn: resume + 1,
        }
    }

    /// The next LSN to be assigned.
    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    /// Whether writes wait for a batch.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Whether a write of `len` bytes must wait for the pending batch to be sealed first
    /// (it would take the batch past what one may carry).
    pub fn must_seal_before(&self, len: usize) -> bool {
        !self.writes.is_empty()
            && (self.bytes + len > MAX_BATCH_DATA_LEN || self.writes.len() >= MAX_WRITES_PER_BATCH)
    }

    /// Adds one write (at most a batch's data: callers split larger ones, after sealing
    /// when [`Batcher::must_seal_before`] says so). Returns whether the batch is now full
    /// enough to seal.
    pub fn add(&mut self, offset: u64, data: Bytes, timestamp_us: u64) -> bool {
        assert!(
            data.len() <= MAX_BATCH_DATA_LEN && !self.must_seal_before(data.len()),
            "callers split writes and seal full batches"
        );
        self.bytes += data.len();
        self.writes.push(Write {
            timestamp_us,
            offset,
            digest: wire_protocol::digest(&data),
            data,
        });
        self.bytes >= BATCH_BYTES || self.writes.len() >= BATCH_WRITES
    }

    /// Seals the pending writes into a batch numbered after both this batcher's last LSN
    /// and `acked_lsn` (a process server whose stream restarted past what this agent
    /// numbered acknowledged everything up to it: go on after it, or every write would be
    /// refused as a gap). The LSNs count as used until [`Batcher::unseal`].
    pub fn seal(&mut self, acked_lsn: u64) -> Option<Batch> {
        if self.writes.is_empty() {
            return None;
        }
        let writes = std::mem::take(&mut self.writes);
        let bytes = std::mem::take(&mut self.bytes);
        let first_lsn = self.take_lsns(acked_lsn, writes.len() as u64);
        let spans = writes
            .iter()
            .map(|w| (w.offset, w.data.len() as u64))
            .collect();
        Some(Batch {
            last_lsn: first_lsn + writes.len() as u64 - 1,
            msg: Message::WriteBatch(WriteBatch {
                disk_id: self.disk_id,
                first_lsn,
                writes,
            }),
            first_lsn,
            bytes,
            spans,
        })
    }

    /// Numbers `n` LSNs (a batch, or 1 for a bookmark) after `acked_lsn` at least; returns
    /// the first.
    pub fn take_lsns(&mut self, acked_lsn: u64, n: u64) -> u64 {
        let first = self.next_lsn.max(acked_lsn + 1);
        self.next_lsn = first + n;
        first
    }

    /// A batch (or marker) starting at `first_lsn` that the window refused: its LSNs are
    /// given back, so the stream has no gap.
    pub fn unseal(&mut self, first_lsn: u64) {
        debug_assert!(
            first_lsn < self.next_lsn,
            "only the last numbered is given back"
        );
        self.next_lsn = first_lsn;
    }
}

/// One message the process server has not acknowledged yet.
#[derive(Debug)]
struct Unacked {
    last_lsn: u64,
    msg: Message,
    bytes: usize,
}

/// What a (re)connection resumes.
#[derive(Debug, Default)]
pub struct Resume {
    /// The messages to send again, in LSN order.
    pub resend: Vec<Message>,
    /// The process server holds less than the window starts at: the LSNs in between were
    /// acknowledged before and are lost there; the disk needs a differential resync.
    pub lost: bool,
}

/// The resend window: what was sent and is not yet durable on the process server.
#[derive(Debug)]
pub struct Window {
    unacked: VecDeque<Unacked>,
    bytes: usize,
    max_bytes: usize,
    acked_lsn: u64,
}

impl Window {
    /// An empty window holding at most `max_bytes` of data (see the module's constraints).
    pub fn new(max_bytes: usize) -> Window {
        Window {
            unacked: VecDeque::new(),
            bytes: 0,
            max_bytes,
            acked_lsn: 0,
        }
    }

    /// The highest LSN the process server acknowledged.
    pub fn acked_lsn(&self) -> u64 {
        self.acked_lsn
    }

    /// Data bytes waiting for an ack.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether everything sent is acknowledged.
    pub fn is_empty(&self) -> bool {
        self.unacked.is_empty()
    }

    /// Whether `bytes` more fit (an empty window takes anything).
    pub fn has_room(&self, bytes: usize) -> bool {
        self.unacked.is_empty() || self.bytes + bytes <= self.max_bytes
    }

    /// Keeps `msg` (LSNs `first..=last`, `bytes` of data) until acknowledged. Callers
    /// check [`Window::has_room`] first.
    pub fn push(&mut self, msg: Message, first_lsn: u64, last_lsn: u64, bytes: usize) {
        assert!(self.has_room(bytes), "callers check for room");
        assert!(
            first_lsn <= last_lsn && self.unacked.back().is_none_or(|u| u.last_lsn < first_lsn),
            "the window holds the stream in LSN order"
        );
        self.unacked.push_back(Unacked {
            last_lsn,
            msg,
            bytes,
        });
        self.bytes += bytes;
    }

    /// The process server holds everything up to `lsn` durably.
    pub fn on_ack(&mut self, lsn: u64) {
        self.acked_lsn = self.acked_lsn.max(lsn);
        while self
            .unacked
            .front()
            .is_some_and(|u| u.last_lsn <= self.acked_lsn)
        {
            let u = self.unacked.pop_front().expect("checked");
            self.bytes -= u.bytes;
        }
    }

    /// A (re)connection at which the process server holds up to `resume`: drops what it
    /// holds, and says what to send again and whether anything between is lost.
    pub fn resume(&mut self, resume: u64) -> Resume {
        // It had acknowledged more than it holds now (with or without anything unacked
        // here): those LSNs are gone from both ends.
        let lost = resume < self.acked_lsn;
        self.on_ack(resume);
        Resume {
            resend: self.from(resume + 1),
            lost,
        }
    }

    /// The messages holding LSN `lsn` or later (a nack asks for them again).
    pub fn from(&self, lsn: u64) -> Vec<Message> {
        self.unacked
            .iter()
            .filter(|u| u.last_lsn >= lsn)
            .map(|u| u.msg.clone())
            .collect()
    }
}

/// Blocks written while neither the window nor the link could take their writes: resent
/// from the source's current content once the link is back.
#[derive(Debug)]
pub struct Dirty {
    /// One bit per block of the disk.
    bits: Vec<u64>,
    blocks: u64,
    block_bytes: u64,
    count: u64,
}

impl Dirty {
    /// A clean tracker for a disk of `blocks` blocks of `block_bytes` each.
    pub fn new(blocks: u64, block_bytes: u64) -> Dirty {
        assert!(block_bytes > 0, "blocks have a size");
        Dirty {
            bits: vec![0; blocks.div_ceil(64) as usize],
            blocks,
            block_bytes,
            count: 0,
        }
    }

    /// Whether no block is dirty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Dirty blocks.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Marks the blocks `len` bytes at `offset` touch (bytes past the disk's end are none
    /// of its blocks).
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / self.block_bytes;
        if first >= self.blocks {
            return;
        }
        let last = (offset.saturating_add(len - 1) / self.block_bytes).min(self.blocks - 1);
        for b in first..=last {
            let (w, bit) = ((b / 64) as usize, 1u64 << (b % 64));
            if self.bits[w] & bit == 0 {
                self.bits[w] |= bit;
                self.count += 1;
            }
        }
    }

    /// Up to `max` dirty blocks, the lowest first, marked clean (a caller resends them in
    /// chunks, so the list it holds stays small whatever the disk's size).
    pub fn take(&mut self, max: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(max.min(self.count as usize));
        for (w, word) in self.bits.iter_mut().enumerate() {
            while *word != 0 && out.len() < max {
                let bit = word.trailing_zeros();
                out.push(w as u64 * 64 + u64::from(bit));
                *word &= !(1u64 << bit);
            }
            if out.len() >= max {
                break;
            }
        }
        self.count -= out.len() as u64;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire_protocol::Bookmark;

    fn marker(lsn: u64) -> Message {
        Message::Bookmark(Bookmark {
            disk_id: 1,
            lsn,
            kind: wire_protocol::BookmarkKind::AppConsistent,
            time_us: 0,
            group_marker: 0,
            group_members: 0,
            tag: String::new(),
        })
    }

    #[test]
    fn batches_are_numbered_after_the_ack_and_refused_ones_give_their_lsns_back() {
        let mut b = Batcher::new(1, 10);
        assert!(b.seal(0).is_none());
        b.add(0, Bytes::from_static(b"ab"), 5);
        b.add(4096, Bytes::from_static(b"cd"), 6);
        let batch = b.seal(0).unwrap();
        assert_eq!((batch.first_lsn, batch.last_lsn, batch.bytes), (11, 12, 4));
        assert_eq!(batch.spans, vec![(0, 2), (4096, 2)]);
        b.unseal(batch.first_lsn);
        assert_eq!(b.next_lsn(), 11);
        // The process server restarted its stream past this agent's numbering.
        b.add(0, Bytes::from_static(b"ef"), 7);
        assert_eq!(b.seal(40).unwrap().first_lsn, 41);
        assert_eq!(b.take_lsns(0, 1), 42);
    }

    #[test]
    fn a_full_batch_says_so_and_an_oversized_write_waits_for_a_seal() {
        let mut b = Batcher::new(1, 0);
        assert!(!b.add(0, Bytes::from(vec![0; BATCH_BYTES - 1]), 0));
        assert!(b.add(0, Bytes::from(vec![0; 1]), 0));
        assert!(b.must_seal_before(MAX_BATCH_DATA_LEN));
        b.seal(0).unwrap();
        assert!(!b.must_seal_before(MAX_BATCH_DATA_LEN));
    }

    #[test]
    fn the_window_keeps_until_acked_and_resends_after_the_resume_point() {
        let mut w = Window::new(100);
        assert!(
            w.has_room(1_000),
            "an empty window takes an oversized entry"
        );
        w.push(marker(1), 1, 1, 60);
        assert!(!w.has_room(41));
        w.push(marker(2), 2, 3, 40);
        w.push(marker(4), 4, 4, 0);
        assert_eq!(w.from(3).len(), 2, "a nack at 3 resends 2..=3 and 4");
        let r = w.resume(1);
        assert!(!r.lost);
        assert_eq!(r.resend.len(), 2);
        assert_eq!((w.bytes(), w.acked_lsn()), (40, 1));
        w.on_ack(4);
        assert!(w.is_empty() && w.bytes() == 0);
    }

    #[test]
    fn a_resume_point_before_the_window_is_lost_data() {
        let mut w = Window::new(100);
        w.on_ack(5);
        w.push(marker(6), 6, 6, 1);
        assert!(w.resume(3).lost, "4..=5 were acknowledged and are gone");
        assert!(!w.resume(5).lost);
        let mut empty = Window::new(100);
        empty.on_ack(5);
        assert!(empty.resume(3).lost, "also with nothing unacknowledged");
    }

    #[test]
    fn dirty_blocks_are_a_bounded_bitmap() {
        let mut d = Dirty::new(130, 64);
        assert!(d.is_empty());
        d.mark(60, 10); // blocks 0 and 1
        d.mark(64, 1); // block 1 again
        d.mark(129 * 64, 1_000_000); // the last block; past the end is none
        d.mark(10_000_000, 5); // wholly past the end
        d.mark(7, 0);
        assert_eq!(d.len(), 3);
        assert_eq!(d.take(2), vec![0, 1]);
        assert_eq!(d.len(), 1);
        assert_eq!(d.take(10), vec![129]);
        assert!(d.is_empty() && d.take(10).is_empty());
    }
}
