//! Group points: recovery points of a whole replication group at one instant.
//!
//! The process server cuts a group's streams together (`process-server/src/groups.rs`);
//! each disk's marker becomes an ordinary point of that disk, carrying the cut's id as its
//! `group_marker`. A group point is a cut id present among the points of **every** disk of
//! the group: each of those points exists only once its disk durably applied up to it, so a
//! group point exists only when all of them do, and a cut that was abandoned half-way (a
//! marker on some disks, not on all) is never one. Nothing else is stored: the journals are
//! the record, so group points survive restarts and are pruned with their disks' points.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::export::{ExportOpts, Exported, Format, PointSel};
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
    /// The latest of its disks' point times, microseconds since the epoch.
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
    // Cut id → each disk's point of it.
    let mut cuts: BTreeMap<u64, Vec<Member>> = BTreeMap::new();
    for d in &disks {
        let dir = Disks::journal_dir(retention_dir, d.disk_id);
        let (points, _) = crate::journal::inspect(&dir)?;
        for p in points.into_iter().filter(|p| p.group_marker != 0) {
            cuts.entry(p.group_marker).or_default().push(Member {
                disk: d.disk_id,
                vm: d.vm_id.clone(),
                point: p,
            });
        }
    }
    let mut out: Vec<GroupPoint> = cuts
        .into_iter()
        .filter(|(_, m)| {
            disks
                .iter()
                .all(|d| m.iter().filter(|x| x.disk == d.disk_id).count() == 1)
        })
        .map(|(id, members)| GroupPoint {
            group: group.into(),
            id,
            time_us: members.iter().map(|m| m.point.time_us).max().unwrap_or(0),
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
    out.sort_by_key(|g| (g.time_us, g.id));
    Ok(out)
}

/// Which group point: `latest`, `latest-app` or a group point's id.
pub fn select(points: &[GroupPoint], sel: &PointSel) -> Result<GroupPoint> {
    let found = match sel {
        PointSel::Latest => points.last(),
        PointSel::LatestApp => points
            .iter()
            .rev()
            .find(|p| p.kind == PointKind::AppConsistent),
        PointSel::Id(id) => points.iter().find(|p| p.id == *id),
        PointSel::AtOrBefore(t) => points.iter().rev().find(|p| p.time_us <= *t),
    };
    found.cloned().ok_or_else(|| {
        Error::NoSuchPoint(format!(
            "no group point matches {sel}; `master-target points --group G` lists them"
        ))
    })
}

/// Writes every disk of `group` as it was at one group point into `out_dir`, one file per
/// disk named `VM-disk-ID.img` (or `.vmdk` with its flat extent). Every disk's lock is
/// checked before the first is written, so a group is exported whole or not at all.
pub fn export(
    data_dir: &Path,
    retention_dir: &Path,
    group: &str,
    sel: &PointSel,
    out_dir: &Path,
    format: Format,
    opts: ExportOpts,
) -> Result<(GroupPoint, Vec<Exported>)> {
    let point = select(&list(data_dir, retention_dir, group)?, sel)?;
    if !out_dir.is_dir() {
        return Err(Error::ExportRefused {
            out: out_dir.into(),
            reason: "it is not a directory: with --group, --out names the directory the group's disks go to".into(),
        });
    }
    let reg = Registry::read(data_dir)?;
    for m in &point.members {
        let rec = reg.get(m.disk).ok_or(Error::UnknownDisk(m.disk))?;
        // Fails now, before anything is written, if a disk is still served.
        drop(crate::export::open_disk(&rec.data_path, m.disk)?);
    }
    let mut done = Vec::new();
    for m in &point.members {
        let out = member_path(out_dir, m, format);
        let e = crate::export::export(
            data_dir,
            retention_dir,
            m.disk,
            &PointSel::Id(m.point.id),
            &out,
            format,
            opts,
        )?;
        done.push(e);
    }
    Ok((point, done))
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
