//! Coalescing overwrites inside one batch.
//!
//! A write wholly covered by a later write of the same batch never needs to cross the link:
//! its data is replaced by nothing (an empty write at the same offset, with the digest of
//! the empty string), which keeps every LSN in place. A batch never spans a bookmark (those
//! are messages of their own with their own LSNs) and the master target only makes points at
//! batch boundaries, so every recovery point is still built exactly.

use bytes::Bytes;
use wire_protocol::{Write, WriteBatch};

/// Empties every write of `b` covered by one later write; returns the bytes saved.
pub fn coalesce(b: &mut WriteBatch) -> u64 {
    let mut saved = 0;
    let n = b.writes.len();
    // Newest first: the union of later writes is tracked as a list of disjoint ranges.
    let mut covered: Vec<(u64, u64)> = Vec::new();
    for i in (0..n).rev() {
        let w = &b.writes[i];
        let (s, e) = (w.offset, w.offset + w.data.len() as u64);
        if !w.data.is_empty() && covered.iter().any(|&(cs, ce)| cs <= s && e <= ce) {
            saved += w.data.len() as u64;
            b.writes[i] = Write {
                timestamp_us: w.timestamp_us,
                offset: w.offset,
                digest: wire_protocol::digest(&[]),
                data: Bytes::new(),
            };
            continue;
        }
        if !w.data.is_empty() && covered.len() < MAX_TRACKED_RANGES {
            covered.push((s, e));
        }
    }
    saved
}

/// Ranges tracked per batch: bounds the quadratic scan on batches of many tiny writes.
const MAX_TRACKED_RANGES: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn apply(disk: &mut [u8], b: &WriteBatch) {
        for w in &b.writes {
            disk[w.offset as usize..w.offset as usize + w.data.len()].copy_from_slice(&w.data);
        }
    }

    proptest! {
        #[test]
        fn coalesced_batch_leaves_the_same_disk(writes in prop::collection::vec((0u64..60, 1usize..8, any::<u8>()), 1..40)) {
            let writes: Vec<Write> = writes.into_iter().map(|(o, l, v)| {
                let data = Bytes::from(vec![v; l]);
                Write { timestamp_us: 0, offset: o, digest: wire_protocol::digest(&data), data }
            }).collect();
            let b = WriteBatch { disk_id: 1, first_lsn: 1, writes };
            let mut c = b.clone();
            coalesce(&mut c);
            prop_assert_eq!(c.writes.len(), b.writes.len(), "every LSN stays");
            let (mut d1, mut d2) = (vec![0u8; 80], vec![0u8; 80]);
            apply(&mut d1, &b);
            apply(&mut d2, &c);
            prop_assert_eq!(d1, d2);
            for w in &c.writes {
                prop_assert_eq!(wire_protocol::digest(&w.data), w.digest);
            }
        }
    }
}
