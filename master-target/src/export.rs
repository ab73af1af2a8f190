//! Listing recovery points and exporting a disk as it was at one of them.
//!
//! Both run with the service stopped: they take the disk's lock (and run the journal's
//! recovery if the service died). If the service is running the lock is held, and the
//! error says to stop it first.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use crate::disk::DiskFile;
use crate::error::{Error, IoContext, Result};
use crate::journal::{Journal, Point, PointKind};
use crate::registry::Registry;
use crate::service::Disks;
use crate::vmdk;

/// Which point to export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PointSel {
    /// The disk as it is (the newest committed state).
    Latest,
    /// The newest app-consistent point.
    LatestApp,
    /// A point by id.
    Id(u64),
    /// The newest point at or before this time (microseconds since the Unix epoch).
    AtOrBefore(u64),
}

impl std::str::FromStr for PointSel {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "latest" => Ok(PointSel::Latest),
            "latest-app" => Ok(PointSel::LatestApp),
            _ => {
                if let Ok(id) = s.parse() {
                    return Ok(PointSel::Id(id));
                }
                let t = humantime::parse_rfc3339_weak(s).map_err(|_| {
                    format!("{s:?}: use latest, latest-app, a point id, or an RFC 3339 time")
                })?;
                let us = t
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_err(|_| format!("{s:?} is before 1970"))?
                    .as_micros() as u64;
                Ok(PointSel::AtOrBefore(us))
            }
        }
    }
}

/// Output format of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A raw image.
    Raw,
    /// A flat VMDK: FILE (descriptor) and FILE's stem + "-flat.vmdk".
    Vmdk,
}

/// Opens a disk's file and journal, with the service stopped.
fn open(data_dir: &Path, retention_dir: &Path, disk_id: u64) -> Result<(DiskFile, Journal)> {
    let reg = Registry::load(data_dir)?;
    let rec = reg.get(disk_id).ok_or(Error::UnknownDisk(disk_id))?;
    let disk = DiskFile::open(&rec.data_path).map_err(|e| match e {
        Error::DiskLocked { path } => Error::DiskLocked { path: PathBuf::from(format!("{} (the master-target service holds it: stop the service, or detach the disk, first)", path.display())) },
        e => e,
    })?;
    let journal = Journal::open(&Disks::journal_dir(retention_dir, disk_id), &disk)?;
    Ok((disk, journal))
}

/// Every point of every disk (or of one), oldest first per disk.
pub fn list(
    data_dir: &Path,
    retention_dir: &Path,
    disk: Option<u64>,
) -> Result<Vec<(u64, Vec<Point>, u64)>> {
    let reg = Registry::load(data_dir)?;
    let mut out = Vec::new();
    for rec in reg
        .disks
        .iter()
        .filter(|d| disk.is_none_or(|id| id == d.disk_id))
    {
        let (_disk, j) = open(data_dir, retention_dir, rec.disk_id)?;
        out.push((rec.disk_id, j.points().to_vec(), j.committed_lsn()));
    }
    if let (Some(id), true) = (disk, out.is_empty()) {
        return Err(Error::UnknownDisk(id));
    }
    Ok(out)
}

/// Picks the point `sel` names.
pub fn select(points: &[Point], committed_lsn: u64, sel: &PointSel) -> Result<Point> {
    let found = match sel {
        PointSel::Latest => Some(Point {
            id: 0,
            lsn: committed_lsn,
            time_us: points.last().map_or(0, |p| p.time_us),
            kind: PointKind::CrashConsistent,
            tag: "latest".into(),
        }),
        PointSel::LatestApp => points
            .iter()
            .rev()
            .find(|p| p.kind == PointKind::AppConsistent)
            .cloned(),
        PointSel::Id(id) => points.iter().find(|p| p.id == *id).cloned(),
        PointSel::AtOrBefore(t) => points.iter().rev().find(|p| p.time_us <= *t).cloned(),
    };
    found.ok_or_else(|| {
        Error::NoSuchPoint(format!(
            "no recovery point matches {sel:?}; `master-target points` lists them"
        ))
    })
}

/// Writes disk `disk_id` as it was at `sel` into `out`. Returns the point and how many
/// undo records were applied.
pub fn export(
    data_dir: &Path,
    retention_dir: &Path,
    disk_id: u64,
    sel: &PointSel,
    out: &Path,
    format: Format,
) -> Result<(Point, u64)> {
    let (disk, journal) = open(data_dir, retention_dir, disk_id)?;
    let point = select(journal.points(), journal.committed_lsn(), sel)?;
    let data_out = match format {
        Format::Raw => out.to_path_buf(),
        Format::Vmdk => {
            let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("export");
            out.with_file_name(format!("{stem}-flat.vmdk"))
        }
    };
    let mut dst = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&data_out)
        .ctx(|| format!("create {}", data_out.display()))?;
    let mut src = File::open(disk.path()).ctx(|| format!("open {}", disk.path().display()))?;
    std::io::copy(&mut src, &mut dst)
        .ctx(|| format!("copy {} to {}", disk.path().display(), data_out.display()))?;
    let applied = journal.rewind(point.lsn, &dst)?;
    dst.sync_all()
        .ctx(|| format!("fsync {}", data_out.display()))?;
    if format == Format::Vmdk {
        let reg = Registry::load(data_dir)?;
        let rec = reg.get(disk_id).ok_or(Error::UnknownDisk(disk_id))?;
        let mut uuid = [0u8; 16];
        for (i, b) in uuid.iter_mut().enumerate() {
            *b = u8::from_str_radix(&rec.uuid[i * 2..i * 2 + 2], 16).unwrap_or(0);
        }
        let flat_name = data_out
            .file_name()
            .and_then(|s| s.to_str())
            .expect("utf-8 name")
            .to_owned();
        vmdk::write_descriptor(out, &flat_name, disk.size_bytes(), &uuid)?;
    }
    Ok((point, applied))
}
