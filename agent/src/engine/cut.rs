//! The agent's part in a replication group's cut (the process server coordinates it:
//! `process-server/src/groups.rs`).
//!
//! A cut is consistent across VMs because every member holds new writes at one common
//! instant: the process server sends Hold to each member, and only once every member said
//! Held does it send Mark. A member marks only if it held without a break from its Held to
//! the Mark; so all holds overlap at the instant the process server decided. A write B made
//! after seeing A's write complete was captured before B's hold, so A's write completed, and
//! was captured, before that instant too: before A's hold, before A's marker.
//!
//! Design constraints:
//! - The hold is the engine itself waiting: nothing is captured while [`Engine::serve_cut`]
//!   runs (live capture's FUSE thread waits for the engine, trace replay is this task).
//! - It is bounded by [`HOLD_MAX_MS`] whatever the process server does: after it the agent
//!   goes on, and a Mark that comes later is refused (the cut is abandoned, never half-made).
//! - A disk that is not consistent on the target (resync under way, dirty regions waiting)
//!   refuses at once, with the reason.

use std::time::{Duration, Instant};

use wire_protocol::{BookmarkKind, Cut, CutPhase, CUT_APP_CONSISTENT};

use super::{now_us, BookmarkRecord, Engine};
use crate::error::Result;
use crate::source::hex;

/// The longest an agent holds new writes for a cut, whatever the process server does. The
/// process server waits 500 ms for its members' answers to each phase
/// (`process_server::groups::CUT_PHASE_TIMEOUT_MS`), so a Mark later than this belongs to
/// a cut it has abandoned. An application's writes never wait longer than this for a cut.
pub const HOLD_MAX_MS: u64 = 2_000;

impl Engine {
    /// Serves every cut message already received (between two writes of a replay).
    pub async fn serve_cuts(&mut self) -> Result<()> {
        while let Some(c) = self.link.try_cut() {
            self.serve_cut(c).await?;
        }
        Ok(())
    }

    /// Takes part in a cut that begins with `hold`: holds new writes (by not returning),
    /// says where the stream stands, and marks the stream when told to. A message that
    /// begins no cut (a Mark or Release of a cut this agent no longer holds) is answered
    /// with a refusal or ignored.
    pub async fn serve_cut(&mut self, hold: Cut) -> Result<()> {
        let started = Instant::now();
        match hold.phase {
            CutPhase::Hold => {}
            CutPhase::Mark => {
                self.refuse(&hold, "this agent no longer holds writes for the cut (its hold limit passed, or it restarted)").await;
                return Ok(());
            }
            _ => return Ok(()),
        }
        // Writes already captured take their LSNs before the hold's position is reported.
        self.flush().await?;
        if let Some(why) = self.not_consistent() {
            self.refuse(&hold, why).await;
            return Ok(());
        }
        let held_lsn = self.next_lsn() - 1;
        self.link
            .send_cut(Cut {
                phase: CutPhase::Held,
                lsn: held_lsn,
                tag: String::new(),
                ..hold.clone()
            })
            .await;
        let deadline = started + Duration::from_millis(HOLD_MAX_MS);
        // Bounded by the deadline.
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(next) = tokio::time::timeout(left, self.link.next_cut()).await else {
                tracing::warn!(
                    cut = hold.cut_id,
                    hold_ms = HOLD_MAX_MS,
                    "the process server did not end the cut in time: writes go on, and the cut is abandoned"
                );
                self.released(&hold, started).await;
                return Ok(());
            };
            if next.cut_id != hold.cut_id {
                // Another cut while this one holds: the process server gave ours up.
                self.refuse(&next, "busy with an earlier cut").await;
                continue;
            }
            match next.phase {
                CutPhase::Release => {
                    self.released(&hold, started).await;
                    return Ok(());
                }
                CutPhase::Mark => return self.mark(&hold, &next, started).await,
                _ => continue,
            }
        }
    }

    /// Why a cut now would not be a consistent point of this disk, if so.
    fn not_consistent(&self) -> Option<&'static str> {
        if self.resyncing {
            Some("a resync of this disk is under way: the target is not consistent until it completes")
        } else if !self.dirty.is_empty() {
            Some("dirty regions from a link outage are still being resent")
        } else if !self.link.is_up() {
            Some("the link to the process server is down")
        } else {
            None
        }
    }

    /// Puts the cut's marker in the stream (at the LSN after the held one: nothing was
    /// captured in between), records it with the disk's digest, and says so.
    async fn mark(&mut self, hold: &Cut, mark: &Cut, started: Instant) -> Result<()> {
        let tag = if mark.tag.is_empty() {
            format!("group-cut-{}", hold.cut_id)
        } else {
            mark.tag.clone()
        };
        if wire_protocol::message::validate_tag(&tag).is_err() {
            self.refuse(hold, "the cut's tag is not a valid bookmark tag")
                .await;
            return Ok(());
        }
        let kind = if mark.flags & CUT_APP_CONSISTENT != 0 {
            BookmarkKind::AppConsistent
        } else {
            BookmarkKind::CrashConsistent
        };
        let digest = hex(&self.source.disk_digest());
        let lsn = match self.group_marker(kind, &tag, hold.cut_id).await {
            Ok(l) => l,
            Err(e) => {
                self.refuse(
                    hold,
                    "the marker could not be queued (link down, buffer full)",
                )
                .await;
                tracing::warn!(cut = hold.cut_id, error = %e, "cut marker not taken");
                return Ok(());
            }
        };
        let hold_us = started.elapsed().as_micros() as u64;
        // The marker is in the stream: writes go on from here.
        self.link
            .send_cut(Cut {
                phase: CutPhase::Marked,
                lsn,
                hold_us,
                flags: mark.flags,
                tag: String::new(),
                ..hold.clone()
            })
            .await;
        self.flush().await?;
        tracing::debug!(cut = hold.cut_id, lsn, hold_us, "group cut marked");
        self.record(&BookmarkRecord {
            lsn,
            tag,
            time_us: now_us(),
            disk_digest: digest,
            group_marker: hold.cut_id,
        })
    }

    /// Says the hold ended without a marker, and how long writes waited.
    async fn released(&mut self, hold: &Cut, started: Instant) {
        self.link
            .send_cut(Cut {
                phase: CutPhase::Released,
                lsn: 0,
                hold_us: started.elapsed().as_micros() as u64,
                tag: String::new(),
                ..hold.clone()
            })
            .await;
    }

    async fn refuse(&mut self, c: &Cut, why: &str) {
        tracing::info!(cut = c.cut_id, reason = why, "cut refused");
        self.link
            .send_cut(Cut {
                phase: CutPhase::Refused,
                lsn: 0,
                hold_us: 0,
                tag: why.into(),
                ..c.clone()
            })
            .await;
    }
}
