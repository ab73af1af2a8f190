//! The agent's part in a replication group's cut: the tokio shell of the member's rules in
//! [`crate::hold`] (where the argument for the cut's consistency is). The process server
//! coordinates the cut (`process-server/src/groups.rs`).
//!
//! Design constraints:
//! - The hold is the engine itself waiting: nothing is captured while [`Engine::serve_cut`]
//!   runs (live capture's FUSE thread waits for the engine, trace replay is this task).
//! - It is bounded by [`HOLD_MAX_MS`] whatever the process server does: after it the agent
//!   goes on, and a Mark that comes later is refused (the cut is abandoned, never half-made).
//! - A disk that is not consistent on the target (resync under way, dirty regions waiting)
//!   refuses at once, with the reason.
//! - An app-consistent cut freezes the agent's `--freeze-on-group-bookmark` filesystems
//!   first, in a thread, while the engine goes on serving writes (a filesystem on a
//!   captured disk flushes through it); the hold begins once they are frozen, and they are
//!   thawed, from a thread too (a thaw writes the superblock), as soon as the marker is
//!   placed or the cut is given up.

use std::time::{Duration, Instant};

use wire_protocol::{Cut, CutPhase, CUT_APP_CONSISTENT};

use super::{now_us, BookmarkRecord, Engine};
use crate::error::Result;
use crate::freeze::Frozen;
use crate::hold::{self, Holding, Idle, Marker};
use crate::source::hex;

pub use crate::hold::HOLD_MAX_MS;

impl Engine {
    /// Serves every cut message already received, and a freeze that completed (between two
    /// writes of a replay).
    pub async fn serve_cuts(&mut self) -> Result<()> {
        while let Some(c) = self.link.try_cut() {
            self.serve_cut(c).await?;
        }
        let done = self.freezing.as_mut().and_then(|f| f.done.try_recv().ok());
        if let Some(r) = done {
            self.serve_frozen(r).await?;
        }
        Ok(())
    }

    /// Freezes the filesystems of an app-consistent cut in a thread of its own, while this
    /// engine goes on serving writes (a filesystem on a captured disk flushes through it):
    /// the hold begins once they are frozen ([`Engine::serve_frozen`]).
    fn start_freeze(&mut self, hold: Cut) {
        let (tx, done) = tokio::sync::oneshot::channel();
        let (mounts, state_dir) = (self.freeze_on_cut.clone(), self.state_dir.clone());
        std::thread::spawn(move || {
            // Checked now, not at start: a filesystem on the captured disk is mounted after
            // the agent starts serving it.
            let r = crate::freeze::check_targets(&mounts, &state_dir)
                .and_then(|()| Frozen::freeze(&mounts, Duration::from_millis(HOLD_MAX_MS)));
            let _ = tx.send(r.map_err(|e| e.to_string()));
        });
        self.freezing = Some(Freezing {
            hold,
            started: Instant::now(),
            done,
            cancelled: false,
        });
    }

    /// The filesystems of a cut are frozen (or could not be): hold, mark, thaw.
    pub async fn serve_frozen(&mut self, r: FreezeResult) -> Result<()> {
        let Some(f) = self.freezing.take() else {
            return Ok(());
        };
        match r {
            Err(why) => {
                self.refuse(&f.hold, &why).await;
                Ok(())
            }
            // The process server gave the cut up meanwhile: thawed at once.
            Ok(frozen) if f.cancelled => {
                drop(ThawApart(Some(frozen)));
                self.released(&f.hold, f.started).await;
                Ok(())
            }
            Ok(frozen) => {
                // Thawed whatever the hold's outcome, also on an early return.
                let _thaw = ThawApart(Some(frozen));
                self.hold(f.hold, f.started).await
            }
        }
    }

    /// Takes part in a cut that begins with `hold`: holds new writes (by not returning),
    /// says where the stream stands, and marks the stream when told to. A message that
    /// begins no cut (a Mark or Release of a cut this agent no longer holds) is answered
    /// with a refusal or ignored.
    pub async fn serve_cut(&mut self, hold: Cut) -> Result<()> {
        let started = Instant::now();
        if let Some(f) = self
            .freezing
            .as_mut()
            .filter(|f| f.hold.cut_id == hold.cut_id)
        {
            // Released (or anything else) while freezing: give the cut up once frozen.
            f.cancelled = true;
            return Ok(());
        }
        match hold::on_idle(&hold) {
            Idle::Begin if self.freezing.is_some() => {
                self.refuse(&hold, "busy freezing for an earlier cut").await;
                return Ok(());
            }
            Idle::Begin
                if hold.flags & CUT_APP_CONSISTENT != 0 && !self.freeze_on_cut.is_empty() =>
            {
                self.start_freeze(hold);
                return Ok(());
            }
            Idle::Begin => {}
            Idle::Refuse(answer) => {
                self.answer(answer).await;
                return Ok(());
            }
            Idle::Ignore => return Ok(()),
        }
        self.hold(hold, started).await
    }

    /// Holds new writes (by not returning) from `started`, says where the stream stands,
    /// and marks the stream when told to.
    async fn hold(&mut self, hold: Cut, started: Instant) -> Result<()> {
        // Writes already captured take their LSNs before the hold's position is reported.
        self.flush().await?;
        if let Some(why) = self.not_consistent() {
            self.refuse(&hold, why).await;
            return Ok(());
        }
        let held_lsn = self.next_lsn() - 1;
        self.link.send_cut(hold::held(&hold, held_lsn)).await;
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
            let held_ms = started.elapsed().as_millis() as u64;
            match hold::on_holding(&hold, &next, held_ms) {
                Holding::Mark(m) => return self.mark(&hold, &next, m, started).await,
                Holding::RefuseMark(answer) => {
                    self.answer(answer).await;
                    return Ok(());
                }
                Holding::Release => {
                    self.released(&hold, started).await;
                    return Ok(());
                }
                Holding::RefuseOther(answer) => self.answer(answer).await,
                Holding::Wait => {}
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
    async fn mark(&mut self, hold: &Cut, mark: &Cut, m: Marker, started: Instant) -> Result<()> {
        let digest = hex(&self.source.disk_digest()?);
        let lsn = match self
            .group_marker(m.kind, &m.tag, (m.cut_id, m.members))
            .await
        {
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
            .send_cut(hold::marked(hold, mark.flags, lsn, hold_us))
            .await;
        self.flush().await?;
        tracing::debug!(cut = hold.cut_id, lsn, hold_us, "group cut marked");
        self.record(&BookmarkRecord {
            lsn,
            tag: m.tag,
            time_us: now_us(),
            disk_digest: digest,
            group_marker: hold.cut_id,
        })
    }

    /// Says the hold ended without a marker, and how long writes waited.
    async fn released(&mut self, hold: &Cut, started: Instant) {
        let hold_us = started.elapsed().as_micros() as u64;
        self.link.send_cut(hold::released(hold, hold_us)).await;
    }

    async fn refuse(&mut self, c: &Cut, why: &str) {
        self.answer(hold::refused(c, why)).await;
    }

    /// Sends an answer to the process server (a refusal is logged with its reason).
    async fn answer(&mut self, a: Cut) {
        if a.phase == CutPhase::Refused {
            tracing::info!(cut = a.cut_id, reason = %a.tag, "cut refused");
        }
        self.link.send_cut(a).await;
    }
}

/// A freeze's outcome: the frozen filesystems, or why not.
pub type FreezeResult = std::result::Result<Frozen, String>;

/// An app-consistent cut whose filesystems are being frozen.
pub struct Freezing {
    hold: Cut,
    started: Instant,
    done: tokio::sync::oneshot::Receiver<FreezeResult>,
    /// The process server ended the cut meanwhile.
    cancelled: bool,
}

impl Freezing {
    /// Waits for the freeze (cancel-safe).
    pub async fn done(&mut self) -> FreezeResult {
        (&mut self.done)
            .await
            .unwrap_or_else(|_| Err("the freeze thread ended without an answer".into()))
    }
}

/// Thaws in a thread of its own when dropped: a thaw writes the filesystem's superblock,
/// which on a captured disk goes through this engine, so thawing on the engine's own task
/// would wait on itself.
struct ThawApart(Option<Frozen>);

impl Drop for ThawApart {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            std::thread::spawn(move || {
                if let Err(e) = f.thaw() {
                    tracing::error!(error = %e, "thaw after a group cut failed");
                }
            });
        }
    }
}
