//! The decisions of one disk's apply worker, free of threads, channels and clocks.
//!
//! The worker (in [`crate::service`]) gathers what is queued for a disk into one group and
//! hands it here; the simulator (`tests/simulation.rs`) drives the same core directly.
//!
//! # Calling order
//! 1. [`DiskCore::check`] decides every request of a group against the stream position:
//!    accepted items, duplicates (acked again), gaps and refusals (answered at once).
//! 2. [`DiskCore::apply`] applies the accepted items once: on a full volume it frees
//!    journal room and tries again, and if nothing more can be freed it returns
//!    [`Applied::Full`] for the caller to wait and call again (a full volume holds writes
//!    back; it never loses or refuses them).
//! 3. [`DiskCore::finish`] answers: one ack of the new durable LSN to every sender whose
//!    request was accepted or duplicate, then the digest lists asked for.
//!
//! Any other failure of `apply` leaves nothing of the group acknowledged; the disk stops
//! taking writes until the master target restarts (its journal recovery rolls back
//! whatever of the group reached the disk).

use wire_protocol::{
    Ack, AckEntry, Bookmark, DigestList, DigestRequest, ErrorCode, ErrorMsg, Message, Nack,
    WriteBatch,
};

use crate::apply::{Applier, Item, Verdict};
use crate::error::{Error, Result};
use crate::journal::Point;

/// One request for a disk, with `R`, where its answer goes.
#[derive(Debug)]
pub enum Work<R> {
    /// A batch of writes.
    Batch(WriteBatch, R),
    /// A bookmark.
    Bookmark(Bookmark, R),
    /// A resync's digest request (answered after the group).
    Digests(DigestRequest, R),
}

impl<R> Work<R> {
    /// The disk the request names.
    pub fn disk_id(&self) -> u64 {
        match self {
            Work::Batch(b, _) => b.disk_id,
            Work::Bookmark(b, _) => b.disk_id,
            Work::Digests(r, _) => r.disk_id,
        }
    }
}

/// A group of requests, checked.
#[derive(Debug)]
pub struct Group<R> {
    disk_id: u64,
    /// Accepted items, in LSN order.
    pub items: Vec<Item>,
    /// Senders owed the group's ack.
    pub acks: Vec<R>,
    /// Digest requests, answered once the group is applied.
    digests: Vec<(DigestRequest, R)>,
    /// Answers due at once (gaps and refusals).
    pub replies: Vec<(R, Message)>,
}

/// What one [`DiskCore::apply`] did.
#[derive(Debug)]
pub enum Applied {
    /// The group is durable; these points were made.
    Done(Vec<Point>),
    /// A volume is full and no journal room is left to free: call again later.
    Full(Error),
}

/// What a refusal tells the operator and the sender, and whether it is logged as a
/// transient resend (a digest that did not match) or an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The disk.
    pub disk_id: u64,
    /// The error, as logged.
    pub error: String,
    /// True for a digest mismatch (a resend cures it).
    pub resend: bool,
}

/// The apply state of one disk.
#[derive(Debug)]
pub struct DiskCore {
    applier: Applier,
    /// The next LSN the stream needs (committed plus accepted but not yet applied).
    next_lsn: u64,
    /// Refusals since the caller last took them (for its logs).
    refusals: Vec<Refusal>,
}

/// Whether an error is a full volume (or quota), which room can cure.
pub fn out_of_space(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if crate::retention::is_out_of_space(source))
}

impl DiskCore {
    /// Wraps a recovered applier.
    pub fn new(applier: Applier) -> DiskCore {
        let next_lsn = applier.committed_lsn() + 1;
        DiskCore {
            applier,
            next_lsn,
            refusals: Vec::new(),
        }
    }

    /// The applier (for figures).
    pub fn applier(&self) -> &Applier {
        &self.applier
    }

    /// Takes the refusals noted since the last call.
    pub fn take_refusals(&mut self) -> Vec<Refusal> {
        std::mem::take(&mut self.refusals)
    }

    /// Decides every request of a group (step 1).
    pub fn check<R>(&mut self, works: Vec<Work<R>>) -> Group<R> {
        let disk_id = works.first().map_or(0, Work::disk_id);
        let mut g = Group {
            disk_id,
            items: Vec::new(),
            acks: Vec::new(),
            digests: Vec::new(),
            replies: Vec::new(),
        };
        for w in works {
            let (verdict, reply) = match w {
                Work::Batch(b, r) => (self.applier.check_batch(&b, self.next_lsn), r),
                Work::Bookmark(b, r) => (self.applier.check_bookmark(&b, self.next_lsn), r),
                Work::Digests(req, r) => {
                    g.digests.push((req, r));
                    continue;
                }
            };
            match verdict {
                Verdict::Accept(it) => {
                    self.next_lsn += it.len() as u64;
                    g.items.extend(it);
                    g.acks.push(reply);
                }
                Verdict::Duplicate => g.acks.push(reply),
                Verdict::Gap { expected } => g.replies.push((
                    reply,
                    Message::Nack(Nack {
                        disk_id,
                        from_lsn: expected,
                        code: ErrorCode::LsnGap,
                        reason: format!("expected lsn {expected}"),
                    }),
                )),
                Verdict::Refuse(e) => {
                    let msg = self.refuse(disk_id, e);
                    g.replies.push((reply, msg));
                }
            }
        }
        g
    }

    /// The answer to a refused request. A refusal names the LSN refused, so the process
    /// server can count the refusals of one record (and give it up as lost), never loop.
    fn refuse(&mut self, disk_id: u64, e: Error) -> Message {
        let resend = matches!(e, Error::DigestMismatch { .. });
        let (code, reason) = if resend {
            (ErrorCode::DigestMismatch, e.to_string())
        } else {
            (e.code(), e.wire_message(disk_id))
        };
        self.refusals.push(Refusal {
            disk_id,
            error: e.to_string(),
            resend,
        });
        Message::Nack(Nack {
            disk_id,
            from_lsn: self.next_lsn,
            code,
            reason,
        })
    }

    /// Applies a checked group's items (step 2). On a full volume, frees the oldest
    /// journal segment and tries again while there is one to free.
    pub fn apply<R>(&mut self, g: &Group<R>) -> Result<Applied> {
        loop {
            match self.applier.apply(&g.items) {
                Ok(points) => {
                    self.next_lsn = self.applier.committed_lsn() + 1;
                    return Ok(Applied::Done(points));
                }
                Err(e) if out_of_space(&e) => {
                    if !self.applier.datastore_full() && self.applier.free_journal_space()? {
                        tracing::warn!(disk = g.disk_id, error = %e, "a volume is full: dropped the oldest journal segment (its points) to make room");
                        continue;
                    }
                    return Ok(Applied::Full(e));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The answers once a group is applied (step 3): the ack (to each sender once, by
    /// `same`) and the digest lists.
    pub fn finish<R>(&mut self, g: Group<R>, same: impl Fn(&R, &R) -> bool) -> Vec<(R, Message)> {
        let disk_id = g.disk_id;
        let ack = Message::Ack(Ack {
            entries: vec![AckEntry {
                disk_id,
                durable_lsn: self.applier.committed_lsn(),
            }],
        });
        let mut out: Vec<(R, Message)> = Vec::new();
        for r in g.acks {
            if !out.iter().any(|(s, _)| same(s, &r)) {
                out.push((r, ack.clone()));
            }
        }
        for (req, r) in g.digests {
            let msg =
                match self
                    .applier
                    .block_digests(req.block_size, req.first_block, req.block_count)
                {
                    Ok(digests) => Message::DigestList(DigestList {
                        disk_id,
                        block_size: req.block_size,
                        first_block: req.first_block,
                        digests,
                        request_id: req.request_id,
                    }),
                    Err(e) => Message::Error(ErrorMsg {
                        code: ErrorCode::Internal,
                        disk_id,
                        message: format!("digests: {e}"),
                        request_id: req.request_id,
                    }),
                };
            out.push((r, msg));
        }
        out
    }

    /// The answers when `apply` failed for good: every sender owed an ack learns why.
    pub fn fail<R>(g: Group<R>, e: &Error) -> Vec<(R, Message)> {
        let disk_id = g.disk_id;
        g.acks
            .into_iter()
            .map(|r| {
                (
                    r,
                    Message::Error(ErrorMsg {
                        code: ErrorCode::Internal,
                        disk_id,
                        message: format!(
                            "apply failed: {e}; restart the master target after fixing the cause"
                        ),
                        request_id: 0,
                    }),
                )
            })
            .collect()
    }
}
