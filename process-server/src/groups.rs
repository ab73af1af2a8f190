//! Replication groups: the rules of membership and the state machine of one
//! group-consistent cut. No I/O and no clocks here (the tokio shell is [`crate::cuts`]).
//!
//! A cut runs in two phases over every disk of the group (one connection per disk):
//!
//! ```text
//!  process server                         each member agent
//!  Hold(cut)            ───────────────▶  flush, stop capturing
//!                       ◀───────────────  Held(last LSN)  |  Refused(why)
//!  all Held: Mark(cut, tag) ────────────▶  marker bookmark (group_marker = cut), go on
//!                       ◀───────────────  Marked(marker LSN, hold_us)
//!  any Refused / timeout: Release ──────▶  go on, no marker
//! ```
//!
//! Mark goes out only once every member holds, so all holds overlap at that instant and
//! the markers form a consistent cut (the argument is in `agent/src/hold.rs`). An
//! agent holds at most `agent::hold::HOLD_MAX_MS` and refuses a Mark after it: such a
//! cut is abandoned. The master target lists a group point only when every disk of the
//! group durably holds the cut's marker, so an abandoned cut (some markers placed, not all)
//! is never a group point: a cut is made whole or not at all.
//!
//! Design constraints:
//! - Every wait is bounded by the shell ([`CUT_PHASE_TIMEOUT_MS`] per phase).
//! - Replies are taken only from the disk they name and for the cut in flight; anything
//!   else is ignored (a peer cannot complete another disk's part).

use std::collections::BTreeMap;

use wire_protocol::{Cut, CutPhase, CUT_APP_CONSISTENT};

/// How long the process server waits for every member's answer to one phase. The agent
/// holds writes for at most 2 s (`agent::hold::HOLD_MAX_MS`), well past this plus a
/// round trip, so a Mark sent in time finds every member still holding.
pub const CUT_PHASE_TIMEOUT_MS: u64 = 500;
/// Most VMs in one group (the master target serves 60 disks; a group of more VMs than a
/// cut can hold briefly together is a design mistake).
pub const MAX_GROUP_VMS: usize = 32;
/// Most groups on one process server.
pub const MAX_GROUPS: usize = 256;
/// Pause samples kept per group for its percentiles.
pub const PAUSE_SAMPLES: usize = 1024;

/// A group as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDef {
    /// Its id (the agents' `--group`).
    pub id: String,
    /// Its member VMs.
    pub vms: Vec<String>,
    /// The OS type every member must report (None: whatever its first disk reported).
    pub os: Option<String>,
}

/// Parses `ID[:OS]=VM,VM,...` (the `group` setting).
pub fn parse_group(spec: &str) -> Result<GroupDef, String> {
    let (head, vms) = spec.split_once('=').ok_or_else(|| {
        format!("{spec:?}: write a group as ID[:OS]=VM,VM,... (e.g. erp:linux=vm-db,vm-app)")
    })?;
    let (id, os) = match head.split_once(':') {
        Some((id, os)) => (id.trim(), Some(os.trim().to_owned())),
        None => (head.trim(), None),
    };
    wire_protocol::message::validate_name("group id", id).map_err(|e| e.to_string())?;
    if let Some(os) = &os {
        wire_protocol::message::validate_name("os type", os)
            .map_err(|e| format!("group {id}: {e}"))?;
    }
    let vms: Vec<String> = vms.split(',').map(|v| v.trim().to_owned()).collect();
    for v in &vms {
        wire_protocol::message::validate_name("vm id", v)
            .map_err(|e| format!("group {id}: {e}"))?;
    }
    if vms.len() > MAX_GROUP_VMS {
        return Err(format!(
            "group {id} has {} VMs ({MAX_GROUP_VMS} at most)",
            vms.len()
        ));
    }
    let mut sorted = vms.clone();
    sorted.sort();
    sorted.dedup();
    if sorted.len() != vms.len() {
        return Err(format!("group {id} names a VM twice"));
    }
    Ok(GroupDef {
        id: id.into(),
        vms,
        os,
    })
}

/// Checks groups against each other: unique ids, a VM in one group at most.
pub fn check_groups(groups: &[GroupDef]) -> Result<(), String> {
    if groups.len() > MAX_GROUPS {
        return Err(format!("{} groups ({MAX_GROUPS} at most)", groups.len()));
    }
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (i, g) in groups.iter().enumerate() {
        if groups[..i].iter().any(|o| o.id == g.id) {
            return Err(format!("group {} is configured twice", g.id));
        }
        for v in &g.vms {
            if let Some(other) = seen.insert(v, &g.id) {
                return Err(format!(
                    "VM {v} is in groups {other} and {}: a VM belongs to one group",
                    g.id
                ));
            }
        }
    }
    Ok(())
}

/// Where one member of a cut stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Member {
    /// Asked to hold (or to mark), no answer yet.
    Waiting,
    /// Holding since its stream's LSN.
    Held(u64),
    /// Marked at this LSN after holding writes this long.
    Marked { lsn: u64, hold_us: u64 },
}

/// How a cut ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every disk's marker is in its stream.
    Made {
        /// Each disk's marker LSN.
        marks: BTreeMap<u64, u64>,
        /// The longest any member held writes, microseconds.
        max_hold_us: u64,
        /// Every member's hold, microseconds.
        holds_us: Vec<u64>,
    },
    /// Not a group point; why, for the operator.
    Abandoned(String),
}

/// What the shell does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Wait for more answers.
    Wait,
    /// Send these, then wait.
    Send(Vec<Cut>),
    /// Send these (releases, if any), and the cut is over.
    Done(Vec<Cut>, Outcome),
}

/// One cut in flight.
#[derive(Debug)]
pub struct CutCore {
    cut_id: u64,
    flags: u8,
    tag: String,
    members: BTreeMap<u64, Member>,
    marking: bool,
}

impl CutCore {
    /// A cut over `disks`; returns it and the Hold messages to send. `app`: the group's
    /// applications are quiesced (an on-demand bookmark): the markers are app-consistent.
    pub fn new(cut_id: u64, disks: &[u64], app: bool, tag: &str) -> (CutCore, Vec<Cut>) {
        let core = CutCore {
            cut_id,
            flags: if app { CUT_APP_CONSISTENT } else { 0 },
            tag: tag.into(),
            members: disks.iter().map(|&d| (d, Member::Waiting)).collect(),
            marking: false,
        };
        let holds = core.to_all(CutPhase::Hold, "");
        (core, holds)
    }

    /// The cut's id.
    pub fn id(&self) -> u64 {
        self.cut_id
    }

    /// The marker each disk is asked for once every member held: right after its held LSN,
    /// with the cut's disk count, kind and tag (the agent's default tag when the cut has
    /// none, as `agent::hold` places it).
    pub fn expected(&self) -> BTreeMap<u64, Expected> {
        let tag = if self.tag.is_empty() {
            format!("group-cut-{}", self.cut_id)
        } else {
            self.tag.clone()
        };
        self.members
            .iter()
            .filter_map(|(&d, m)| match m {
                Member::Held(l) => Some((
                    d,
                    Expected {
                        lsn: l + 1,
                        members: self.members.len() as u32,
                        app: self.flags & CUT_APP_CONSISTENT != 0,
                        tag: tag.clone(),
                    },
                )),
                _ => None,
            })
            .collect()
    }

    fn msg(&self, disk_id: u64, phase: CutPhase, tag: &str) -> Cut {
        Cut {
            phase,
            disk_id,
            cut_id: self.cut_id,
            lsn: 0,
            flags: self.flags,
            hold_us: 0,
            tag: tag.into(),
        }
    }

    fn to_all(&self, phase: CutPhase, tag: &str) -> Vec<Cut> {
        self.members
            .keys()
            .map(|&d| self.msg(d, phase, tag))
            .collect()
    }

    /// Releases for every member that may be holding (all but those that marked).
    fn releases(&self) -> Vec<Cut> {
        self.members
            .iter()
            .filter(|(_, m)| !matches!(m, Member::Marked { .. }))
            .map(|(&d, _)| self.msg(d, CutPhase::Release, ""))
            .collect()
    }

    /// An answer from an agent about disk `c.disk_id`.
    pub fn on_reply(&mut self, c: &Cut) -> Step {
        if c.cut_id != self.cut_id {
            return Step::Wait;
        }
        let Some(m) = self.members.get(&c.disk_id).cloned() else {
            return Step::Wait;
        };
        match (c.phase, m, self.marking) {
            (CutPhase::Refused, _, _) => {
                let why = format!("disk {} refused: {}", c.disk_id, c.tag);
                Step::Done(self.releases(), Outcome::Abandoned(why))
            }
            (CutPhase::Held, Member::Waiting, false) => {
                self.members.insert(c.disk_id, Member::Held(c.lsn));
                if self.members.values().all(|m| matches!(m, Member::Held(_))) {
                    self.marking = true;
                    let mut marks = self.to_all(CutPhase::Mark, &self.tag.clone());
                    // A Mark names how many disks the cut covers.
                    for m in &mut marks {
                        m.lsn = self.members.len() as u64;
                    }
                    Step::Send(marks)
                } else {
                    Step::Wait
                }
            }
            (CutPhase::Marked, Member::Held(held), true) => {
                if c.lsn != held + 1 {
                    // Something was captured during the hold: not a cut.
                    let why = format!(
                        "disk {} placed its marker at lsn {} after holding at lsn {held}",
                        c.disk_id, c.lsn
                    );
                    return Step::Done(self.releases(), Outcome::Abandoned(why));
                }
                self.members.insert(
                    c.disk_id,
                    Member::Marked {
                        lsn: c.lsn,
                        hold_us: c.hold_us,
                    },
                );
                self.finished()
                    .map_or(Step::Wait, |o| Step::Done(Vec::new(), o))
            }
            _ => Step::Wait,
        }
    }

    fn finished(&self) -> Option<Outcome> {
        let mut marks = BTreeMap::new();
        let mut holds_us = Vec::new();
        for (&d, m) in &self.members {
            let Member::Marked { lsn, hold_us } = m else {
                return None;
            };
            marks.insert(d, *lsn);
            holds_us.push(*hold_us);
        }
        Some(Outcome::Made {
            marks,
            max_hold_us: holds_us.iter().copied().max().unwrap_or(0),
            holds_us,
        })
    }

    /// The phase's time is up: releases for whoever may hold, and why it was abandoned.
    pub fn on_timeout(&self) -> (Vec<Cut>, Outcome) {
        let silent: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| {
                if self.marking {
                    !matches!(m, Member::Marked { .. })
                } else {
                    matches!(m, Member::Waiting)
                }
            })
            .map(|(d, _)| d.to_string())
            .collect();
        let why = if self.marking {
            // Every member held when the marks went out, so any marker placed is part of a
            // consistent cut: the group point exists if all arrive, and is never half-made.
            format!("every disk held and was told to mark, but disk(s) {} did not confirm within {CUT_PHASE_TIMEOUT_MS} ms: the group point exists only if their markers reach the master target (master-target points --group)", silent.join(", "))
        } else {
            format!(
                "no answer to the hold within {CUT_PHASE_TIMEOUT_MS} ms from disk(s) {}",
                silent.join(", ")
            )
        };
        (self.releases(), Outcome::Abandoned(why))
    }
}

/// Cuts whose markers a [`MarkerBook`] remembers: two per group, so that every group's cut
/// in flight is kept however many groups cut at once; a marker for an older cut arrives
/// only after a long outage, and is kept as a plain bookmark.
pub const MARKER_BOOK_CUTS: usize = 2 * MAX_GROUPS;

/// What the process server does with a group marker in a disk's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkerCheck {
    /// Exactly the marker this process server asked this disk for: cached as it is.
    Accept,
    /// A marker it did not ask for (another cut, count, place, kind or tag, a second one,
    /// or one from before a restart): cached as a plain bookmark, so it can neither make a
    /// group point nor hide one.
    Strip,
}

/// The marker a Mark asks one disk for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// Right after the LSN the disk said it held at.
    pub lsn: u64,
    /// How many disks the cut covers.
    pub members: u32,
    /// App-consistent or not, as the Mark said.
    pub app: bool,
    /// The bookmark's tag (the Mark's, or `group-cut-ID`).
    pub tag: String,
}

/// One cut's markers: what each disk was asked for, and where each came into the cache.
#[derive(Debug)]
struct CutMarkers {
    cut_id: u64,
    expected: BTreeMap<u64, Expected>,
    cached: BTreeMap<u64, u64>,
}

/// The markers the process server asked for, and those its cache took: the master target
/// trusts a group marker because only these reach it. No I/O; bounded to
/// [`MARKER_BOOK_CUTS`] cuts.
#[derive(Debug, Default)]
pub struct MarkerBook {
    cuts: std::collections::VecDeque<CutMarkers>,
}

impl MarkerBook {
    /// The Marks of cut `cut_id` go out: from now on each disk's marker, exactly as
    /// described, is expected.
    pub fn marking(&mut self, cut_id: u64, expected: BTreeMap<u64, Expected>) {
        if self.cuts.len() == MARKER_BOOK_CUTS {
            self.cuts.pop_front();
        }
        self.cuts.push_back(CutMarkers {
            cut_id,
            expected,
            cached: BTreeMap::new(),
        });
    }

    /// Whether a marker (disk `disk`, cut `cut_id`, covering `members`, at `lsn`, `app` or
    /// not, with `tag`) is the one asked for and not cached yet.
    pub fn check(
        &self,
        disk: u64,
        cut_id: u64,
        members: u32,
        lsn: u64,
        app: bool,
        tag: &str,
    ) -> MarkerCheck {
        let Some(c) = self.cuts.iter().find(|c| c.cut_id == cut_id) else {
            return MarkerCheck::Strip;
        };
        let asked = c
            .expected
            .get(&disk)
            .is_some_and(|e| e.lsn == lsn && e.members == members && e.app == app && e.tag == tag);
        // Once cached, the same marker again is a resend the cache answers as held.
        if asked && c.cached.get(&disk).is_none_or(|&l| l == lsn) {
            MarkerCheck::Accept
        } else {
            MarkerCheck::Strip
        }
    }

    /// [`MarkerBook::check`] of a bookmark's group marker.
    pub fn check_bookmark(&self, b: &wire_protocol::Bookmark) -> MarkerCheck {
        let app = b.kind == wire_protocol::BookmarkKind::AppConsistent;
        self.check(
            b.disk_id,
            b.group_marker,
            b.group_members,
            b.lsn,
            app,
            &b.tag,
        )
    }

    /// The cache took disk `disk`'s marker of cut `cut_id` at `lsn` (a new record, not a
    /// resend of one it holds).
    pub fn cached(&mut self, cut_id: u64, disk: u64, lsn: u64) {
        if let Some(c) = self.cuts.iter_mut().find(|c| c.cut_id == cut_id) {
            c.cached.entry(disk).or_insert(lsn);
        }
    }

    /// Where disk `disk`'s marker of cut `cut_id` went into the cache, if it did.
    pub fn placed(&self, cut_id: u64, disk: u64) -> Option<u64> {
        self.cuts
            .iter()
            .find(|c| c.cut_id == cut_id)?
            .cached
            .get(&disk)
            .copied()
    }
}

/// The p-th percentile (0..=100) of `samples` (nearest rank; 0 when empty).
pub fn percentile(samples: &[u64], p: f64) -> u64 {
    if samples.is_empty() {
        return 0;
    }
    let mut s = samples.to_vec();
    s.sort_unstable();
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_markers_asked_for_pass() {
        let mut b = MarkerBook::default();
        let want = |lsn| Expected {
            lsn,
            members: 2,
            app: true,
            tag: "t".into(),
        };
        // Before the Marks went out, nothing is expected.
        assert_eq!(b.check(1, 10, 2, 50, true, "t"), MarkerCheck::Strip);
        b.marking(10, [(1, want(50)), (2, want(7))].into());
        let wrong = [
            ((3, 10, 2, 50, true, "t"), "a disk of no cut"),
            ((1, 10, 3, 50, true, "t"), "another count"),
            ((1, 11, 2, 50, true, "t"), "another cut"),
            ((1, 10, 2, 49, true, "t"), "another place"),
            ((1, 10, 2, 50, false, "t"), "another kind"),
            ((1, 10, 2, 50, true, "x"), "another tag"),
        ];
        for ((disk, cut, members, lsn, app, tag), what) in wrong {
            assert_eq!(
                b.check(disk, cut, members, lsn, app, tag),
                MarkerCheck::Strip,
                "{what}"
            );
        }
        assert_eq!(b.check(1, 10, 2, 50, true, "t"), MarkerCheck::Accept);
        // Not cached (a resend of what the cache holds): not placed.
        assert_eq!(b.placed(10, 1), None);
        b.cached(10, 1, 50);
        assert_eq!(
            b.check(1, 10, 2, 50, true, "t"),
            MarkerCheck::Accept,
            "a resend"
        );
        assert_eq!((b.placed(10, 1), b.placed(10, 2)), (Some(50), None));
        // Bounded: the oldest cut is forgotten, its late markers stripped.
        for c in 100..100 + MARKER_BOOK_CUTS as u64 {
            b.marking(c, [(2, want(1))].into());
        }
        assert_eq!(b.check(2, 10, 2, 7, true, "t"), MarkerCheck::Strip);
    }

    fn reply(phase: CutPhase, disk: u64, lsn: u64) -> Cut {
        Cut {
            phase,
            disk_id: disk,
            cut_id: 7,
            lsn,
            flags: 0,
            hold_us: 100,
            tag: String::new(),
        }
    }

    #[test]
    fn mark_goes_out_only_once_every_member_holds() {
        let (mut c, holds) = CutCore::new(7, &[1, 2], false, "t");
        assert_eq!(holds.len(), 2);
        assert_eq!(c.on_reply(&reply(CutPhase::Held, 1, 10)), Step::Wait);
        // A reply for another cut or disk changes nothing.
        assert_eq!(
            c.on_reply(&Cut {
                cut_id: 8,
                ..reply(CutPhase::Held, 2, 5)
            }),
            Step::Wait
        );
        assert_eq!(c.on_reply(&reply(CutPhase::Held, 3, 5)), Step::Wait);
        let Step::Send(marks) = c.on_reply(&reply(CutPhase::Held, 2, 20)) else {
            panic!("all held: mark")
        };
        assert!(marks
            .iter()
            .all(|m| m.phase == CutPhase::Mark && m.tag == "t"));
        assert_eq!(c.on_reply(&reply(CutPhase::Marked, 1, 11)), Step::Wait);
        let Step::Done(rel, Outcome::Made { marks, .. }) =
            c.on_reply(&reply(CutPhase::Marked, 2, 21))
        else {
            panic!("made")
        };
        assert!(rel.is_empty());
        assert_eq!(marks, BTreeMap::from([(1, 11), (2, 21)]));
    }

    #[test]
    fn a_refusal_or_silence_abandons_and_releases_the_holders() {
        let (mut c, _) = CutCore::new(7, &[1, 2, 3], false, "");
        c.on_reply(&reply(CutPhase::Held, 1, 10));
        let Step::Done(rel, Outcome::Abandoned(why)) = c.on_reply(&Cut {
            tag: "resyncing".into(),
            ..reply(CutPhase::Refused, 2, 0)
        }) else {
            panic!("abandoned")
        };
        assert!(why.contains("disk 2") && why.contains("resyncing"), "{why}");
        assert_eq!(rel.len(), 3);
        assert!(rel.iter().all(|r| r.phase == CutPhase::Release));

        let (mut c, _) = CutCore::new(7, &[1, 2], false, "");
        c.on_reply(&reply(CutPhase::Held, 1, 10));
        let (rel, Outcome::Abandoned(why)) = c.on_timeout() else {
            panic!("abandoned")
        };
        assert!(
            why.contains("hold") && why.contains('2') && !why.contains("1,"),
            "{why}"
        );
        assert_eq!(rel.len(), 2);
    }

    #[test]
    fn a_marker_not_right_after_the_hold_is_not_a_cut() {
        let (mut c, _) = CutCore::new(7, &[1], false, "");
        assert!(matches!(
            c.on_reply(&reply(CutPhase::Held, 1, 10)),
            Step::Send(_)
        ));
        assert!(matches!(
            c.on_reply(&reply(CutPhase::Marked, 1, 12)),
            Step::Done(_, Outcome::Abandoned(_))
        ));
    }

    #[test]
    fn groups_are_parsed_and_checked() {
        let g = parse_group("erp=vm-db, vm-app").unwrap();
        assert_eq!(g.vms, vec!["vm-db", "vm-app"]);
        assert_eq!(
            parse_group("erp:linux=vm").unwrap().os.as_deref(),
            Some("linux")
        );
        assert!(parse_group("erp:li nux=vm").is_err());
        assert!(parse_group("erp").is_err());
        assert!(parse_group("e/rp=vm").is_err());
        assert!(parse_group("erp=vm,vm").is_err());
        let h = parse_group("crm=vm-db").unwrap();
        assert!(check_groups(&[g.clone(), h])
            .unwrap_err()
            .contains("one group"));
        assert!(check_groups(&[g.clone(), g]).is_err());
        assert_eq!(percentile(&[5, 1, 3, 2, 4], 50.0), 3);
        assert_eq!(percentile(&[5, 1, 3, 2, 4], 99.0), 5);
    }
}
