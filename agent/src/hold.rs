//! A group member's rules for a cut, without I/O or clocks: what an agent answers to each
//! cut message and when it marks. The engine ([`crate::engine`]'s `cut.rs`) is their tokio
//! shell, and the deterministic simulator (`tests/simulation/group.rs`) drives the same
//! rules against the process server's `CutCore` and the master target's apply core.
//!
//! ```text
//!  idle    ── Hold ──────────────▶ holding (nothing captured; answer Held(last LSN))
//!  idle    ── Mark ──────────────▶ idle (Refused: no hold to mark from)
//!  holding ── Mark, same cut ────▶ place the marker at held LSN + 1, answer Marked → idle
//!  holding ── Release, same cut ─▶ answer Released → idle
//!  holding ── another cut's msg ─▶ answer Refused to it, keep holding
//!  holding ── HOLD_MAX_MS passed ▶ answer Released → idle (a later Mark is refused)
//! ```
//!
//! Why this makes a consistent cut: a member marks only if it held without a break from its
//! Held to the Mark, and the process server sends Mark only once every member said Held.
//! So every member that marks was holding at the instant the process server decided, and
//! the markers together are one instant of the whole group.

use wire_protocol::{BookmarkKind, Cut, CutPhase, CUT_APP_CONSISTENT};

/// The longest an agent holds new writes for a cut, whatever the process server does. The
/// process server waits 500 ms for its members' answers to each phase
/// (`process_server::groups::CUT_PHASE_TIMEOUT_MS`), so a Mark later than this belongs to
/// a cut it has abandoned. An application's writes never wait longer than this for a cut.
pub const HOLD_MAX_MS: u64 = 2_000;

/// What a member not holding does with a cut message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Idle {
    /// Begin holding (first flushing what was captured, then answering [`held`]).
    Begin,
    /// Answer this refusal.
    Refuse(Cut),
    /// Nothing to answer (a Release of a cut already over).
    Ignore,
}

/// The answer of a member that holds no cut to `c`.
pub fn on_idle(c: &Cut) -> Idle {
    match c.phase {
        CutPhase::Hold => Idle::Begin,
        CutPhase::Mark => Idle::Refuse(refused(
            c,
            "this agent no longer holds writes for the cut (its hold limit passed, or it restarted)",
        )),
        _ => Idle::Ignore,
    }
}

/// What a holding member does with the next cut message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holding {
    /// Place this marker in the stream, at the LSN after the held one, then answer
    /// [`marked`]: the hold is over.
    Mark(Marker),
    /// The mark cannot be taken: answer this refusal; the hold is over.
    RefuseMark(Cut),
    /// Answer [`released`]: the hold is over.
    Release,
    /// Answer this refusal to another cut's message and keep holding.
    RefuseOther(Cut),
    /// Keep holding.
    Wait,
}

/// The marker a Mark asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    /// The bookmark's kind (app-consistent when the group's applications were quiesced).
    pub kind: BookmarkKind,
    /// The bookmark's tag (the cut's, or `group-cut-ID`).
    pub tag: String,
    /// The cut: the bookmark's `group_marker`.
    pub cut_id: u64,
    /// How many disks the cut covers: the bookmark's `group_members`.
    pub members: u32,
}

/// The answer of a member holding for `hold` to `next`, `held_ms` after the hold began.
pub fn on_holding(hold: &Cut, next: &Cut, held_ms: u64) -> Holding {
    if next.cut_id != hold.cut_id {
        // Another cut while this one holds: the process server gave ours up.
        return Holding::RefuseOther(refused(next, "busy with an earlier cut"));
    }
    match next.phase {
        CutPhase::Release => Holding::Release,
        // The hold limit passed (the shell's timer should have ended it already).
        CutPhase::Mark if held_ms > HOLD_MAX_MS => Holding::RefuseMark(refused(
            hold,
            "this agent no longer holds writes for the cut (its hold limit passed, or it restarted)",
        )),
        CutPhase::Mark => match marker(hold, next) {
            Ok(m) => Holding::Mark(m),
            Err(why) => Holding::RefuseMark(refused(hold, why)),
        },
        _ => Holding::Wait,
    }
}

/// The marker `mark` asks for, or why it cannot be placed.
fn marker(hold: &Cut, mark: &Cut) -> Result<Marker, &'static str> {
    let tag = if mark.tag.is_empty() {
        format!("group-cut-{}", hold.cut_id)
    } else {
        mark.tag.clone()
    };
    if wire_protocol::message::validate_tag(&tag).is_err() {
        return Err("the cut's tag is not a valid bookmark tag");
    }
    // A Mark names how many disks the cut covers; the marker carries it to the master
    // target, which lists the group point only once that many disks hold it.
    let members = u32::try_from(mark.lsn).map_err(|_| "the mark's disk count is out of range")?;
    if members == 0 {
        return Err("the mark's disk count is zero");
    }
    let kind = if mark.flags & CUT_APP_CONSISTENT != 0 {
        BookmarkKind::AppConsistent
    } else {
        BookmarkKind::CrashConsistent
    };
    Ok(Marker {
        kind,
        tag,
        cut_id: hold.cut_id,
        members,
    })
}

/// The answer that begins a hold: the stream's last captured LSN.
pub fn held(hold: &Cut, last_lsn: u64) -> Cut {
    answer(hold, CutPhase::Held, last_lsn, 0, "")
}

/// The answer once the marker is in the stream at `lsn`, after holding `hold_us`.
pub fn marked(hold: &Cut, mark_flags: u8, lsn: u64, hold_us: u64) -> Cut {
    Cut {
        flags: mark_flags,
        ..answer(hold, CutPhase::Marked, lsn, hold_us, "")
    }
}

/// The answer when a hold ends without a marker, after `hold_us`.
pub fn released(hold: &Cut, hold_us: u64) -> Cut {
    answer(hold, CutPhase::Released, 0, hold_us, "")
}

/// A refusal of `c`, with why.
pub fn refused(c: &Cut, why: &str) -> Cut {
    answer(c, CutPhase::Refused, 0, 0, why)
}

fn answer(c: &Cut, phase: CutPhase, lsn: u64, hold_us: u64, tag: &str) -> Cut {
    Cut {
        phase,
        lsn,
        hold_us,
        tag: tag.into(),
        ..c.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(phase: CutPhase, cut_id: u64, lsn: u64) -> Cut {
        Cut {
            phase,
            disk_id: 7,
            cut_id,
            lsn,
            flags: 0,
            hold_us: 0,
            tag: String::new(),
        }
    }

    #[test]
    fn a_mark_is_taken_only_while_holding_its_own_cut_in_time() {
        let hold = cut(CutPhase::Hold, 5, 0);
        assert_eq!(on_idle(&hold), Idle::Begin);
        assert!(
            matches!(on_idle(&cut(CutPhase::Mark, 5, 2)), Idle::Refuse(r) if r.phase == CutPhase::Refused)
        );
        assert_eq!(on_idle(&cut(CutPhase::Release, 5, 0)), Idle::Ignore);
        let m = on_holding(&hold, &cut(CutPhase::Mark, 5, 2), 10);
        assert_eq!(
            m,
            Holding::Mark(Marker {
                kind: BookmarkKind::CrashConsistent,
                tag: "group-cut-5".into(),
                cut_id: 5,
                members: 2
            })
        );
        assert!(matches!(
            on_holding(&hold, &cut(CutPhase::Mark, 5, 2), HOLD_MAX_MS + 1),
            Holding::RefuseMark(_)
        ));
        assert!(matches!(
            on_holding(&hold, &cut(CutPhase::Mark, 6, 2), 10),
            Holding::RefuseOther(r) if r.cut_id == 6
        ));
        assert_eq!(
            on_holding(&hold, &cut(CutPhase::Release, 5, 0), 10),
            Holding::Release
        );
        for bad in [0, u64::from(u32::MAX) + 1] {
            assert!(matches!(
                on_holding(&hold, &cut(CutPhase::Mark, 5, bad), 10),
                Holding::RefuseMark(_)
            ));
        }
    }
}
