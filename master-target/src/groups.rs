//! Group points: recovery points of a whole replication group at one instant.
//!
//! The process server cuts a group's streams together (`process-server/src/groups.rs`);
//! each disk's marker becomes an ordinary point of that disk, carrying the cut's id as its
//! `group_marker` and how many disks the cut covers as its `group_members`. A group point
//! is a cut id whose marker **every** disk of the cut holds (as many of the group's disks
//! as `group_members` says): each of those points exists only once its disk durably applied
//! up to it, so a group point exists only when all of them do, and a cut abandoned half-way
//! (a marker on some disks, not on all) is never one. A disk that joins the group later
//! changes no earlier group point. Only a disk's first marker of a cut counts. Nothing else
//! is stored: the journals are the record, so group points survive restarts and are pruned
//! with their disks' points.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::export::{Format, PointSel};
use crate::journal::{Point, PointKind};
use crate::registry::Registry;
use crate::service::Disks;

/// One disk's part of a group point.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    /// The disk.
    pub disk: u64,
    /// Its VM.
    pub vm: String,
    /// The disk's own point (its id, LSN, time).
    pub point: Point,
}

/// A recovery point of a whole group.
#[derive(Debug, Clone, Serialize)]
pub struct GroupPoint {
    /// The group.
    pub group: String,
    /// The cut's id: the group point's id.
    pub id: u64,
    /// When the process server cut: the cut's id, microseconds since the epoch.
    pub time_us: u64,
    /// App-consistent if every disk's point is.
    pub kind: PointKind,
    /// The bookmark's tag.
    pub tag: String,
    /// Every disk of the group.
    pub members: Vec<Member>,
}

/// Every group point of `group`, oldest first. Reads the journals without changing them:
/// works while the service runs.
pub fn list(data_dir: &Path, retention_dir: &Path, group: &str) -> Result<Vec<GroupPoint>> {
    let reg = Registry::read(data_dir)?;
    let disks: Vec<_> = reg.disks.iter().filter(|d| d.group_id == group).collect();
    if disks.is_empty() || group.is_empty() {
        return Err(Error::NoSuchPoint(format!(
            "no disk of replication group {group:?} is in the disk list of the master target at {}",
            data_dir.display()
        )));
    }
    let mut per_disk = Vec::new();
    for d in &disks {
        let dir = Disks::journal_dir(retention_dir, d.disk_id);
        let (points, _) = crate::journal::inspect(&dir)?;
        per_disk.push((d.disk_id, d.vm_id.clone(), points));
    }
    Ok(whole(group, per_disk))
}

/// The group points among the disks' points (each disk: id, VM, its points oldest first),
/// oldest first.
pub fn whole(group: &str, per_disk: Vec<(u64, String, Vec<Point>)>) -> Vec<GroupPoint> {
    // Cut id → each disk's first point of it (a later marker with the same cut id, which
    // only a compromised agent would place, changes nothing).
    let mut cuts: BTreeMap<u64, Vec<Member>> = BTreeMap::new();
    for (disk, vm, points) in per_disk {
        for p in points.into_iter().filter(|p| p.group_marker != 0) {
            let members = cuts.entry(p.group_marker).or_default();
            if !members.iter().any(|m| m.disk == disk) {
                members.push(Member {
                    disk,
                    vm: vm.clone(),
                    point: p,
                });
            }
        }
    }
    // Whole: as many disks hold the cut's marker as the cut covered, and they agree on how
    // many that is. Membership travels with the markers, so a disk that joins the group
    // (or leaves it) later changes no earlier group point.
    let mut out: Vec<GroupPoint> = cuts
        .into_iter()
        .filter(|(_, m)| {
            let n = m[0].point.group_members;
            n > 0 && m.len() == n as usize && m.iter().all(|x| x.point.group_members == n)
        })
        .map(|(id, members)| GroupPoint {
            group: group.into(),
            id,
            // The cut's time: its id is the process server's clock when it cut (the
            // members' own times are theirs to say, and a member could say any).
            time_us: id,
            kind: if members
                .iter()
                .all(|m| m.point.kind == PointKind::AppConsistent)
            {
                PointKind::AppConsistent
            } else {
                PointKind::CrashConsistent
            },
            tag: members[0].point.tag.clone(),
            members,
        })
        .collect();
    out.sort_by_key(|g| g.id);
    out
}

/// Which group point: `latest`, `latest-app`, a group point's id, a time or a tag.
pub fn select(group: &str, points: &[GroupPoint], sel: &PointSel) -> Result<GroupPoint> {
    let found = match sel {
        PointSel::Latest => points.last(),
        PointSel::LatestApp => points
            .iter()
            .rev()
            .find(|p| p.kind == PointKind::AppConsistent),
        PointSel::Id(id) => points.iter().find(|p| p.id == *id),
        PointSel::AtOrBefore(t) => points.iter().rev().find(|p| p.time_us <= *t),
        PointSel::Tag(tag) => {
            let tagged: Vec<&GroupPoint> = points.iter().filter(|p| p.tag == *tag).collect();
            if tagged.len() > 1 {
                return Err(crate::export::ambiguous_tag(
                    tag,
                    tagged.iter().map(|p| (p.id, p.time_us)),
                ));
            }
            tagged.first().copied()
        }
    };
    found.cloned().ok_or_else(|| {
        Error::NoSuchPoint(format!(
            "no group point of group {group} matches {sel}; `master-target points --group {group}` lists them"
        ))
    })
}

/// Where a member disk's export goes.
pub fn member_path(out_dir: &Path, m: &Member, format: Format) -> PathBuf {
    let ext = if format == Format::Vmdk {
        "vmdk"
    } else {
        "img"
    };
    out_dir.join(format!("{}-disk-{}.{ext}", m.vm, m.disk))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(id: u64, lsn: u64, cut: u64, members: u32) -> Point {
        Point {
            id,
            lsn,
            time_us: lsn,
            kind: PointKind::CrashConsistent,
            tag: String::new(),
            group_marker: cut,
            group_members: members,
        }
    }

    fn ids(v: &[GroupPoint]) -> Vec<u64> {
        v.iter().map(|g| g.id).collect()
    }

    #[test]
    fn a_group_point_needs_every_disk_of_its_cut_and_no_more() {
        let a = vec![
            point(1, 10, 100, 2),
            point(2, 20, 200, 2),
            point(3, 30, 300, 3),
        ];
        let b = vec![point(1, 11, 100, 2), point(2, 25, 300, 3)];
        // Disk 3 joined the group after cuts 100 and 200: they stay whole.
        let c = vec![point(1, 5, 300, 3)];
        let g = whole(
            "g",
            vec![(1, "a".into(), a), (2, "b".into(), b), (3, "c".into(), c)],
        );
        // Cut 200 reached disk 1 only: never a group point.
        assert_eq!(ids(&g), vec![100, 300]);
        assert_eq!(g[1].members.len(), 3);
    }

    #[test]
    fn a_forged_later_marker_or_a_disagreeing_count_hides_nothing_and_completes_nothing() {
        // Disk 2 (a compromised agent) places cut 100's marker again later: its first
        // counts, and the group point stays.
        let a = vec![point(1, 10, 100, 2), point(2, 40, 400, 2)];
        let b = vec![
            point(1, 11, 100, 2),
            point(2, 50, 100, 2),
            point(3, 60, 400, 1),
        ];
        let g = whole("g", vec![(1, "a".into(), a), (2, "b".into(), b)]);
        assert_eq!(ids(&g), vec![100]);
        assert_eq!(g[0].members[1].point.lsn, 11);
    }
}
