//! Where shipping to one master target stands: per disk the cursor (next LSN to send),
//! the window of records sent and not yet acknowledged, rewinds on nacks, and refusals
//! counted. Pure state: no I/O, no clock, no locks; the uplink (`crate::uplink`) moves the
//! bytes and the deterministic simulator (`tests/simulation`) drives the same code.
//!
//! # Design constraints
//! - Resume is exact: an attach answer sets the cursor right after what the master target
//!   holds; a nack rewinds to its LSN; everything in flight from there is forgotten (it is
//!   sent again), so the window counts each byte once.
//! - A rewind happens once per (disk, LSN): nacks of batches that were in flight when it
//!   happened are echoes, not news (otherwise each echo rewinds again and the link
//!   livelocks resending the same window).
//! - A record the master target refuses again and again ([`MAX_REFUSALS_PER_LSN`]) is
//!   reported lost, never resent forever.

use std::collections::{HashMap, VecDeque};

/// Refusals of the data at one LSN (not gaps) before the record is dropped as lost: a
/// corruption that the cache's checksum did not catch must not stall the disk forever,
/// while a transient refusal (a full volume there) gets several chances.
pub const MAX_REFUSALS_PER_LSN: u32 = 3;

/// A record sent and not yet acknowledged.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    disk_id: u64,
    last_lsn: u64,
    bytes: u64,
    /// The last LSN of the run this record left in (records merged into one frame).
    run_last_lsn: u64,
}

/// What a nack did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nacked {
    /// The disk's cursor went back to the nack's LSN.
    Rewound,
    /// An echo of a rewind already made: nothing changed.
    Echo,
    /// The record at the nack's LSN was refused [`MAX_REFUSALS_PER_LSN`] times: the caller
    /// marks it lost (it ships as a resync marker), and the cursor went back to it.
    Lost,
}

/// Where shipping stands, for every disk of one link.
#[derive(Debug, Default)]
pub struct Shipper {
    /// Next LSN to send, per disk; 0 while its attach is under way.
    cursor: HashMap<u64, u64>,
    in_flight: VecDeque<InFlight>,
    in_flight_bytes: u64,
    /// The LSN of the last rewind per disk.
    last_rewind: HashMap<u64, u64>,
    /// Refusals of the data at (disk, LSN), counted.
    refusals: HashMap<(u64, u64), u32>,
    /// Per disk, the last LSN shipped when the master target refused some of it: records up
    /// to there are sent again one per batch, unmerged, so that a refusal names the record
    /// refused and only that record can be given up as lost.
    one_by_one_until: HashMap<u64, u64>,
}

impl Shipper {
    /// Disks shipped (or being attached) on this link.
    pub fn disks(&self) -> Vec<u64> {
        self.cursor.keys().copied().collect()
    }

    /// Whether `disk_id` is shipped (or being attached) on this link.
    pub fn ships(&self, disk_id: u64) -> bool {
        self.cursor.contains_key(&disk_id)
    }

    /// The next LSN to send of `disk_id`, if it is attached.
    pub fn cursor(&self, disk_id: u64) -> Option<u64> {
        self.cursor.get(&disk_id).copied().filter(|&c| c > 0)
    }

    /// An attach of `disk_id` is under way: the disk belongs to this link, nothing ships yet.
    pub fn attaching(&mut self, disk_id: u64) {
        self.cursor.entry(disk_id).or_insert(0);
    }

    /// The master target holds `disk_id` up to `lsn`: ship from after it.
    pub fn attached(&mut self, disk_id: u64, lsn: u64) {
        self.cursor.insert(disk_id, lsn + 1);
        self.one_by_one_until.remove(&disk_id);
    }

    /// `disk_id` ships no more (detached for failback).
    pub fn stop(&mut self, disk_id: u64) {
        self.cursor.remove(&disk_id);
        self.forget_in_flight(disk_id, 0);
        self.last_rewind.remove(&disk_id);
        self.refusals.retain(|&(d, _), _| d != disk_id);
        self.one_by_one_until.remove(&disk_id);
    }

    /// Bytes sent and not yet acknowledged.
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight_bytes
    }

    /// A record of `disk_id` up to `last_lsn`, `bytes` long, is on its way.
    pub fn shipped(&mut self, disk_id: u64, last_lsn: u64, bytes: u64) {
        self.shipped_run(disk_id, &[(last_lsn, bytes)]);
    }

    /// Records of `disk_id` (last LSN, bytes), in LSN order, are on their way merged.
    pub fn shipped_run(&mut self, disk_id: u64, records: &[(u64, u64)]) {
        let Some(&(run_last_lsn, _)) = records.last() else {
            return;
        };
        for &(last_lsn, bytes) in records {
            self.in_flight.push_back(InFlight {
                disk_id,
                last_lsn,
                bytes,
                run_last_lsn,
            });
            self.in_flight_bytes += bytes;
        }
        self.cursor.insert(disk_id, run_last_lsn + 1);
    }

    /// Whether `disk_id`'s record at `lsn` must leave alone (not merged with the next): it
    /// was shipped before a refusal.
    pub fn one_by_one(&self, disk_id: u64, lsn: u64) -> bool {
        self.one_by_one_until
            .get(&disk_id)
            .is_some_and(|&u| lsn <= u)
    }

    /// The master target holds `disk_id` durably up to `lsn`.
    pub fn on_ack(&mut self, disk_id: u64, lsn: u64) {
        if self.last_rewind.get(&disk_id).is_some_and(|&r| r <= lsn) {
            self.last_rewind.remove(&disk_id);
        }
        self.refusals.retain(|&(d, l), _| d != disk_id || l > lsn);
        if self
            .one_by_one_until
            .get(&disk_id)
            .is_some_and(|&u| u <= lsn)
        {
            self.one_by_one_until.remove(&disk_id);
        }
        let mut freed = 0;
        self.in_flight.retain(|f| {
            let done = f.disk_id == disk_id && f.last_lsn <= lsn;
            freed += if done { f.bytes } else { 0 };
            !done
        });
        self.in_flight_bytes -= freed;
    }

    /// The master target asks for `disk_id` again from `from_lsn`: `refused` when it
    /// refused the data there (a digest mismatch, a full volume), not when it saw a gap.
    pub fn on_nack(&mut self, disk_id: u64, from_lsn: u64, refused: bool) -> Nacked {
        if !self.ships(disk_id) {
            // A late answer about a disk this link stopped shipping (detached): nothing to
            // rewind, and nothing of its cache to call lost.
            return Nacked::Echo;
        }
        let mut lost = false;
        if refused {
            // The refused frame began at `from_lsn`. If it merged several records, the
            // refused write may be in any of them: they go again one at a time, and the
            // refusal counts against none (the first would be given up as lost sooner).
            let run = self
                .in_flight
                .iter()
                .find(|f| f.disk_id == disk_id && f.last_lsn >= from_lsn)
                .map(|f| (f.last_lsn, f.run_last_lsn));
            let merged = run.is_some_and(|(last, run_last)| last < run_last);
            if let Some((_, run_last)) = run {
                let until = self.one_by_one_until.entry(disk_id).or_insert(0);
                *until = (*until).max(run_last);
            }
            if !merged {
                let count = self.refusals.entry((disk_id, from_lsn)).or_insert(0);
                *count += 1;
                if *count >= MAX_REFUSALS_PER_LSN {
                    self.refusals.remove(&(disk_id, from_lsn));
                    lost = true;
                }
            }
            // A refusal is news each time: the rewind is made again.
            self.last_rewind.remove(&disk_id);
        }
        if self.last_rewind.get(&disk_id) == Some(&from_lsn) {
            return Nacked::Echo;
        }
        self.last_rewind.insert(disk_id, from_lsn);
        if self.cursor.contains_key(&disk_id) {
            self.cursor.insert(disk_id, from_lsn);
        }
        self.forget_in_flight(disk_id, from_lsn);
        if lost {
            Nacked::Lost
        } else {
            Nacked::Rewound
        }
    }

    /// Forgets what of `disk_id` was in flight from `from_lsn` on (it is sent again).
    fn forget_in_flight(&mut self, disk_id: u64, from_lsn: u64) {
        let mut freed = 0;
        self.in_flight.retain(|f| {
            let drop = f.disk_id == disk_id && f.last_lsn >= from_lsn;
            freed += if drop { f.bytes } else { 0 };
            !drop
        });
        self.in_flight_bytes -= freed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ships_from_the_attach_and_frees_the_window_on_acks() {
        let mut s = Shipper::default();
        s.attaching(7);
        assert_eq!(
            s.cursor(7),
            None,
            "nothing ships while the attach is under way"
        );
        s.attached(7, 10);
        assert_eq!(s.cursor(7), Some(11));
        s.shipped(7, 12, 100);
        s.shipped(7, 15, 50);
        s.shipped(8, 3, 1);
        assert_eq!((s.cursor(7), s.in_flight_bytes()), (Some(16), 151));
        s.on_ack(7, 12);
        assert_eq!(s.in_flight_bytes(), 51);
        s.on_ack(7, 15);
        assert_eq!(s.in_flight_bytes(), 1, "another disk's record stays");
    }

    #[test]
    fn a_gap_rewinds_once_and_its_echoes_change_nothing() {
        let mut s = Shipper::default();
        s.attached(7, 0);
        for last in 1..=4 {
            s.shipped(7, last, 10);
        }
        assert_eq!(s.on_nack(7, 2, false), Nacked::Rewound);
        assert_eq!((s.cursor(7), s.in_flight_bytes()), (Some(2), 10));
        s.shipped(7, 2, 10);
        assert_eq!(s.on_nack(7, 2, false), Nacked::Echo);
        assert_eq!((s.cursor(7), s.in_flight_bytes()), (Some(3), 20));
        // Past the rewind point, the same LSN may rewind again.
        s.on_ack(7, 2);
        assert_eq!(s.on_nack(7, 2, false), Nacked::Rewound);
    }

    #[test]
    fn a_record_refused_again_and_again_is_lost() {
        let mut s = Shipper::default();
        s.attached(7, 0);
        for _ in 1..MAX_REFUSALS_PER_LSN {
            s.shipped(7, 1, 10);
            assert_eq!(s.on_nack(7, 1, true), Nacked::Rewound);
        }
        s.shipped(7, 1, 10);
        assert_eq!(s.on_nack(7, 1, true), Nacked::Lost);
        assert_eq!(s.cursor(7), Some(1));
        assert_eq!(
            s.on_nack(7, 1, true),
            Nacked::Rewound,
            "counting starts over"
        );
    }

    #[test]
    fn after_a_refusal_what_was_shipped_goes_again_one_record_at_a_time() {
        let mut s = Shipper::default();
        s.attached(7, 0);
        // Records 1..=4, 5..=8 and 9..=12 left merged in one frame, 13..=16 in the next;
        // the master target refused the first.
        s.shipped_run(7, &[(4, 10), (8, 10), (12, 10)]);
        s.shipped_run(7, &[(16, 10)]);
        assert!(!s.one_by_one(7, 1), "nothing refused yet");
        assert_eq!(s.on_nack(7, 1, true), Nacked::Rewound);
        assert_eq!(s.cursor(7), Some(1));
        assert!(s.one_by_one(7, 1) && s.one_by_one(7, 12));
        assert!(
            !s.one_by_one(7, 13),
            "the next frame was not refused: it merges again"
        );
        assert!(!s.one_by_one(8, 1), "another disk is not concerned");
        // A gap is no refusal: it names no record.
        let mut g = Shipper::default();
        g.attached(7, 0);
        g.shipped(7, 4, 10);
        g.on_nack(7, 1, false);
        assert!(!g.one_by_one(7, 1));
        // The merged refusal counted against no record: 1..=4, refused alone from now
        // on, has all its chances.
        for _ in 1..MAX_REFUSALS_PER_LSN {
            s.shipped(7, 4, 10);
            assert_eq!(s.on_nack(7, 1, true), Nacked::Rewound);
        }
        // Sent again one at a time, a record refused three times is the one lost, not
        // the record the merged frame began with.
        for (last, ack) in [(4, true), (8, false)] {
            s.shipped(7, last, 10);
            if ack {
                s.on_ack(7, last);
            }
        }
        assert!(s.one_by_one(7, 5));
        for _ in 1..MAX_REFUSALS_PER_LSN {
            assert_eq!(s.on_nack(7, 5, true), Nacked::Rewound);
            s.shipped(7, 8, 10);
        }
        assert_eq!(
            s.on_nack(7, 5, true),
            Nacked::Lost,
            "5..=8, refused alone three times"
        );
        // Once the master target holds everything refused, merging resumes.
        s.shipped(7, 8, 10);
        s.on_ack(7, 12);
        assert!(!s.one_by_one(7, 5) && !s.one_by_one(7, 12));
        // A detach or a new attach starts clean.
        s.shipped_run(7, &[(14, 10), (16, 10)]);
        s.on_nack(7, 13, true);
        assert!(s.one_by_one(7, 16));
        s.attached(7, 12);
        assert!(!s.one_by_one(7, 13));
    }

    #[test]
    fn a_stopped_disk_ships_no_more_and_frees_its_window() {
        let mut s = Shipper::default();
        s.attached(7, 0);
        s.shipped(7, 1, 10);
        s.stop(7);
        assert!(!s.ships(7) && s.in_flight_bytes() == 0);
        assert_eq!(s.on_nack(7, 1, true), Nacked::Echo);
        assert!(!s.ships(7), "a late nack does not bring it back");
    }
}
