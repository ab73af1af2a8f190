//! Listing recovery points and exporting a disk as it was at one of them.
//!
//! # Design constraints
//! - Listing reads the journals without changing them, so it works while the service runs.
//! - Export never harms a disk: an output that is, or resolves to (through a symbolic or a
//!   hard link), a file of any disk this master target knows is refused; an existing file is
//!   replaced only with `--force`. The image is written to a temporary name beside the
//!   output, fsynced, read back from the device and checked against the digest of what was
//!   meant to be written, and only then renamed into place. A failure leaves the output as
//!   it was.
//! - Export runs with the disk detached (or the service stopped): it takes the disk's lock.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use wire_protocol::digest::{block_digest, disk_digest, DIGEST_BLOCK_BYTES};

use crate::disk::DiskFile;
use crate::error::{Error, IoContext, Result};
use crate::journal::{Journal, Point, PointKind};
use crate::registry::Registry;
use crate::service::Disks;
use crate::vmdk;

/// Bytes copied per read while exporting.
pub const COPY_CHUNK_BYTES: usize = 4 << 20;
/// An export leaves a hole for each page of zeros this large: the filesystems' block.
const SPARSE_PAGE_BYTES: usize = 4096;
const _: () = assert!((COPY_CHUNK_BYTES as u64).is_multiple_of(DIGEST_BLOCK_BYTES));

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
    /// The point whose bookmark carries this tag (`tag:NAME`); refused if several do.
    Tag(String),
}

impl std::str::FromStr for PointSel {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "latest" => Ok(PointSel::Latest),
            "latest-app" => Ok(PointSel::LatestApp),
            _ if s.starts_with("tag:") => {
                let tag = &s["tag:".len()..];
                wire_protocol::message::validate_tag(tag)
                    .map_err(|e| format!("{s:?}: not a tag a bookmark can carry ({e})"))?;
                Ok(PointSel::Tag(tag.to_owned()))
            }
            _ => {
                if let Ok(id) = s.parse() {
                    return Ok(PointSel::Id(id));
                }
                let t = humantime::parse_rfc3339_weak(s).map_err(|_| {
                    format!(
                        "{s:?}: use latest, latest-app, a point id, tag:NAME, or an RFC 3339 time"
                    )
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

impl std::fmt::Display for PointSel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PointSel::Latest => f.write_str("latest"),
            PointSel::LatestApp => f.write_str("latest-app"),
            PointSel::Id(id) => write!(f, "point {id}"),
            PointSel::AtOrBefore(us) => write!(
                f,
                "the newest point at or before {}",
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_micros(*us)
                )
            ),
            PointSel::Tag(tag) => write!(f, "the point tagged {tag:?}"),
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

/// How an export may behave.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExportOpts {
    /// Replace existing output files (never a disk's).
    pub force: bool,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// Give a VMDK export the replicated disk's UUID (it is to replace that disk); without
    /// it the export gets a UUID of its own.
    pub keep_uuid: bool,
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    /// The point.
    pub point: Point,
    /// Undo records applied.
    pub applied: u64,
    /// The disk digest of the image written (as `agent digest` prints it), checked on the
    /// device after fsync.
    pub digest: [u8; 32],
    /// The files written (the image, and the descriptor for a VMDK).
    pub files: Vec<PathBuf>,
}

/// Opens a disk's file and journal, with the service stopped or the disk detached.
fn open(data_dir: &Path, retention_dir: &Path, disk_id: u64) -> Result<(DiskFile, Journal)> {
    let reg = Registry::read(data_dir)?;
    let rec = reg.get(disk_id).ok_or(Error::UnknownDisk(disk_id))?;
    let disk = open_disk(&rec.data_path, disk_id)?;
    let journal = Journal::open(&Disks::journal_dir(retention_dir, disk_id), &disk)?;
    Ok((disk, journal))
}

/// Opens and locks a disk's file for an export: a disk the service serves is refused with
/// what to do.
pub fn open_disk(data_path: &Path, disk_id: u64) -> Result<DiskFile> {
    DiskFile::open(data_path).map_err(|e| match e {
        Error::DiskLocked { .. } => Error::DiskInUse {
            disk_id,
            what: "detach the disk (master-target detach), or stop the service, first".into(),
        },
        e => e,
    })
}

/// Every point of every disk (or of one), oldest first per disk, with its committed LSN.
/// Reads the journals without changing them: works while the service runs.
pub fn list(
    data_dir: &Path,
    retention_dir: &Path,
    disk: Option<u64>,
) -> Result<Vec<(u64, Vec<Point>, u64)>> {
    let reg = Registry::read(data_dir)?;
    let mut out = Vec::new();
    for rec in reg
        .disks
        .iter()
        .filter(|d| disk.is_none_or(|id| id == d.disk_id))
    {
        let dir = Disks::journal_dir(retention_dir, rec.disk_id);
        let (points, committed) = crate::journal::inspect(&dir)?;
        out.push((rec.disk_id, points, committed));
    }
    if let (Some(id), true) = (disk, out.is_empty()) {
        return Err(not_listed(data_dir, id));
    }
    Ok(out)
}

fn not_listed(data_dir: &Path, disk_id: u64) -> Error {
    Error::NoSuchPoint(format!(
        "disk {disk_id} is not in the disk list of the master target at {} (`master-target points` lists its disks)",
        data_dir.display()
    ))
}

/// See `master-target recover-journal`: takes the disk's lock (the service does not hold a
/// disk it refuses to serve) and sets its damaged journal aside.
pub fn recover_journal(
    data_dir: &Path,
    retention_dir: &Path,
    disk_id: u64,
) -> Result<(u64, PathBuf)> {
    let reg = Registry::read(data_dir)?;
    let rec = reg
        .get(disk_id)
        .ok_or_else(|| not_listed(data_dir, disk_id))?;
    let disk = open_when_free(&rec.data_path).map_err(|e| match e {
        Error::DiskLocked { .. } => Error::DiskInUse {
            disk_id,
            what: "the service serves it: its journal is not damaged, or it was recovered already"
                .into(),
        },
        e => e,
    })?;
    let dir = Disks::journal_dir(retention_dir, disk_id);
    match Journal::open(&dir, &disk) {
        Ok(j) => Err(Error::NoSuchPoint(format!(
            "disk {disk_id}'s journal is not damaged (committed lsn {}): nothing to recover",
            j.committed_lsn()
        ))),
        Err(Error::JournalCorrupt { .. }) => crate::journal::recover_damaged(&dir, &disk),
        Err(e) => Err(e),
    }
}

/// How long `recover-journal` waits for a disk's lock: the service locks a damaged disk
/// only while an attach tries (and fails) to open its journal, for well under a second,
/// every few seconds; a disk it serves stays locked.
const RECOVER_LOCK_WAIT_MS: u64 = 5_000;

/// Opens and locks a disk, waiting out an attach attempt that holds it briefly.
fn open_when_free(path: &Path) -> Result<DiskFile> {
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_millis(RECOVER_LOCK_WAIT_MS);
    loop {
        match DiskFile::open(path) {
            Err(Error::DiskLocked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

/// Several points carry `tag`: the agent inside the VM names bookmarks, so a later one of
/// the same name (a script run twice, or a compromised VM covering its tracks) must never be
/// taken silently for the one the operator means.
pub fn ambiguous_tag(tag: &str, points: impl Iterator<Item = (u64, u64)>) -> Error {
    let listed: Vec<String> = points
        .map(|(id, time_us)| {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(time_us);
            format!("{id} ({})", humantime::format_rfc3339_seconds(t))
        })
        .collect();
    Error::NoSuchPoint(format!(
        "{} points carry the tag {tag:?}: {}; name one by its id",
        listed.len(),
        listed.join(", ")
    ))
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
            group_marker: 0,
            group_members: 0,
        }),
        PointSel::LatestApp => points
            .iter()
            .rev()
            .find(|p| p.kind == PointKind::AppConsistent)
            .cloned(),
        PointSel::Id(id) => points.iter().find(|p| p.id == *id).cloned(),
        PointSel::AtOrBefore(t) => points.iter().rev().find(|p| p.time_us <= *t).cloned(),
        PointSel::Tag(tag) => {
            let tagged: Vec<&Point> = points.iter().filter(|p| p.tag == *tag).collect();
            if tagged.len() > 1 {
                return Err(ambiguous_tag(tag, tagged.iter().map(|p| (p.id, p.time_us))));
            }
            tagged.first().map(|p| (*p).clone())
        }
    };
    found.ok_or_else(|| {
        Error::NoSuchPoint(format!(
            "no recovery point matches {sel}; `master-target points` lists them"
        ))
    })
}

/// The device and inode of every file of every disk the master target knows, with the disk.
fn known_files(reg: &Registry) -> HashMap<(u64, u64), (u64, PathBuf)> {
    let mut known = HashMap::new();
    for rec in &reg.disks {
        for p in [&rec.descriptor, &rec.data_path] {
            if let Ok(m) = std::fs::metadata(p) {
                known.insert((m.dev(), m.ino()), (rec.disk_id, p.clone()));
            }
        }
    }
    known
}

/// Refuses an output that is a disk's file, a directory, a device, FIFO or socket, or
/// (without `force`) any existing file. Links are followed: a link to a disk is that disk.
fn check_output(
    out: &Path,
    known: &HashMap<(u64, u64), (u64, PathBuf)>,
    service_dirs: &[&Path],
    force: bool,
) -> Result<()> {
    let refuse = |reason: String| Error::ExportRefused {
        out: out.to_path_buf(),
        reason,
    };
    let parent = vmdk::parent_dir(out);
    let Ok(dir) = std::fs::canonicalize(parent) else {
        return Err(refuse(format!(
            "the directory {} does not exist: create it first",
            parent.display()
        )));
    };
    // The service's own state (its disk list, its journals) is never an export's place.
    for d in service_dirs {
        if std::fs::canonicalize(d).is_ok_and(|d| dir.starts_with(&d)) {
            return Err(refuse(format!(
                "it is inside the master target's own directory {}: choose another place",
                d.display()
            )));
        }
    }
    if let Ok(m) = std::fs::metadata(out) {
        if let Some((id, p)) = known.get(&(m.dev(), m.ino())) {
            let same = std::fs::canonicalize(out).ok() == std::fs::canonicalize(p).ok()
                && std::fs::symlink_metadata(out).is_ok_and(|l| !l.file_type().is_symlink());
            return Err(refuse(format!(
                "it is {} of disk {id}: an export never writes over a disk; choose another output",
                if same {
                    "a file".to_owned()
                } else {
                    format!("(through a link) the file {}", p.display())
                }
            )));
        }
        if m.is_dir() {
            return Err(refuse("it is a directory: name a file".into()));
        }
        // A device, FIFO or socket would be replaced by a file renamed over its node (an
        // export writes an image file beside the output, then renames it): /dev/sdb would
        // become a file in RAM, gone at the next boot, and the disk never written.
        if !m.is_file() {
            return Err(refuse(
                "it is a device, FIFO or socket, not a file: an export writes an image file; name a file on a volume (then copy it to a device with dd or qemu-img if that is the aim)".into(),
            ));
        }
    }
    if std::fs::symlink_metadata(out).is_ok() && !force {
        return Err(refuse(
            "it exists: pass --force to replace it, or choose another output".into(),
        ));
    }
    Ok(())
}

/// Removes a temporary file when dropped unless it was kept (renamed into place).
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn progress_bar(len: u64, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let p = indicatif::ProgressBar::with_draw_target(
        Some(len),
        indicatif::ProgressDrawTarget::stderr(),
    );
    p.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template"),
    );
    p
}

/// Reads `f` from the device (its cached pages dropped first) and returns its block digests.
fn digests_from_device(f: &File, len: u64, bar: &indicatif::ProgressBar) -> Result<Vec<[u8; 32]>> {
    use std::os::fd::AsRawFd;
    // SAFETY: advice on a valid descriptor; a failure only means reads may come from cache.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
    let mut r = std::io::BufReader::with_capacity(COPY_CHUNK_BYTES, f);
    let mut buf = vec![0u8; DIGEST_BLOCK_BYTES as usize];
    let mut out = Vec::with_capacity(len.div_ceil(DIGEST_BLOCK_BYTES) as usize);
    let mut at = 0;
    while at < len {
        let n = DIGEST_BLOCK_BYTES.min(len - at) as usize;
        r.read_exact(&mut buf[..n])
            .ctx(|| "read back the export".into())?;
        out.push(block_digest(&buf[..n]));
        at += n as u64;
        bar.inc(n as u64);
    }
    Ok(out)
}

/// Where an export's data goes: `out` itself (raw), or the flat extent beside the
/// descriptor `out` names (`NAME.vmdk` -> `NAME-flat.vmdk`).
fn data_path(out: &Path, format: Format) -> Result<PathBuf> {
    match format {
        Format::Raw => Ok(out.to_path_buf()),
        Format::Vmdk => {
            if out.extension().is_none_or(|e| e != "vmdk") {
                return Err(Error::ExportRefused {
                    out: out.into(),
                    reason: "a VMDK export names its descriptor: NAME.vmdk".into(),
                });
            }
            let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("export");
            Ok(out.with_file_name(format!("{stem}-flat.vmdk")))
        }
    }
}

/// Copies the whole disk into `dst` (the file at `path`, new and empty), hashing each block
/// as it goes: the digests of what is meant. Blocks of zeros are not written: the file's
/// length is set first, so they read as zeros from holes, and a thin disk exports thin (a
/// 1 TiB disk holding 20 GiB writes 20 GiB, and does not fill the output volume).
fn copy_hashing(
    disk: &DiskFile,
    (dst, path): (&File, &Path),
    bar: &indicatif::ProgressBar,
) -> Result<Vec<[u8; 32]>> {
    let size = disk.size_bytes();
    dst.set_len(size)
        .ctx(|| format!("size {} to {size} bytes", path.display()))?;
    let mut digests = Vec::with_capacity(size.div_ceil(DIGEST_BLOCK_BYTES) as usize);
    let mut buf = vec![0u8; COPY_CHUNK_BYTES];
    let mut at = 0u64;
    while at < size {
        let n = (COPY_CHUNK_BYTES as u64).min(size - at) as usize;
        disk.read_at(&mut buf[..n], at)?;
        digests.extend(
            buf[..n]
                .chunks(DIGEST_BLOCK_BYTES as usize)
                .map(block_digest),
        );
        // Runs of pages holding data, written one run at a time.
        let mut run: Option<usize> = None;
        for (i, page) in buf[..n].chunks(SPARSE_PAGE_BYTES).enumerate() {
            let start = i * SPARSE_PAGE_BYTES;
            match (wire_protocol::is_zeros(page), run) {
                (false, None) => run = Some(start),
                (true, Some(from)) => {
                    write_run(dst, path, &buf[from..start], at + from as u64)?;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(from) = run {
            write_run(dst, path, &buf[from..n], at + from as u64)?;
        }
        at += n as u64;
        bar.set_position(at);
    }
    Ok(digests)
}

fn write_run(dst: &File, path: &Path, data: &[u8], at: u64) -> Result<()> {
    dst.write_all_at(data, at)
        .ctx(|| format!("write {}", path.display()))
}

/// Hashes again the blocks a rewind changed.
fn rehash(
    (dst, path): (&File, &Path),
    size: u64,
    changed: std::collections::BTreeSet<u64>,
    digests: &mut [[u8; 32]],
) -> Result<()> {
    let mut block = vec![0u8; DIGEST_BLOCK_BYTES as usize];
    for b in changed {
        let start = b * DIGEST_BLOCK_BYTES;
        let n = DIGEST_BLOCK_BYTES.min(size - start) as usize;
        dst.read_exact_at(&mut block[..n], start)
            .ctx(|| format!("read {}", path.display()))?;
        digests[b as usize] = block_digest(&block[..n]);
    }
    Ok(())
}

/// The UUID of an exported VMDK: a disk of its own (a second disk with the replicated disk's
/// UUID beside it would make the next reprotect refuse both), unless the export is to
/// replace the disk (`keep`).
fn export_uuid(replicated: &str, lsn: u64, keep: bool) -> [u8; 16] {
    if keep {
        return crate::registry::uuid_bytes(replicated);
    }
    let seed = format!("{replicated}/{lsn}/{:?}", std::time::SystemTime::now());
    *blake3::hash(seed.as_bytes())
        .as_bytes()
        .first_chunk::<16>()
        .expect("32 bytes")
}

/// Refuses an export under directory `dir` (for output `out`) if another user could swap
/// what it writes: `dir` and every directory above it must be owned by root, this user or
/// (under sudo) the operator who ran it, and writable by no one else unless sticky (as `/tmp`, where others cannot rename what
/// is not theirs). An export writes a temporary file (or a group's staging directory)
/// there and renames it into place; a directory others can write would let them put
/// something else there in between, with this process's rights.
pub fn check_private_dir(dir: &Path, out: &Path) -> Result<()> {
    let why = runtime::lock::others_can_change(dir).ctx(|| format!("inspect {}", dir.display()))?;
    match why {
        Some(why) => Err(Error::ExportRefused {
            out: out.into(),
            reason: format!("{why}, who could swap what the export writes: export under a directory only root or you can write"),
        }),
        None => Ok(()),
    }
}

/// Checks an export's output files before anything is written (see [`check_output`]);
/// returns where the data goes (the flat extent, for a VMDK).
pub fn check_outputs(
    data_dir: &Path,
    retention_dir: &Path,
    reg: &Registry,
    out: &Path,
    format: Format,
    force: bool,
) -> Result<PathBuf> {
    let data_out = data_path(out, format)?;
    if let Ok(dir) = std::fs::canonicalize(vmdk::parent_dir(&data_out)) {
        check_private_dir(&dir, out)?;
    }
    let known = known_files(reg);
    let service_dirs = [data_dir, retention_dir];
    check_output(&data_out, &known, &service_dirs, force)?;
    if format == Format::Vmdk {
        check_output(out, &known, &service_dirs, force)?;
    }
    Ok(data_out)
}

/// Writes disk `disk_id` as it was at `sel` into `out` (and, for a VMDK, its flat extent
/// beside it). Returns what was written.
pub fn export(
    data_dir: &Path,
    retention_dir: &Path,
    disk_id: u64,
    sel: &PointSel,
    out: &Path,
    format: Format,
    opts: ExportOpts,
) -> Result<Exported> {
    let reg = Registry::read(data_dir)?;
    let rec = reg
        .get(disk_id)
        .ok_or_else(|| not_listed(data_dir, disk_id))?
        .clone();
    let data_out = check_outputs(data_dir, retention_dir, &reg, out, format, opts.force)?;
    let (disk, journal) = open(data_dir, retention_dir, disk_id)?;
    let point = select(journal.points(), journal.committed_lsn(), sel)?;
    let size = disk.size_bytes();

    let (tmp, dst) = vmdk::temp_beside(&data_out)?;
    let mut guard = TempGuard(Some(tmp.clone()));
    // 1. Copy the disk, hashing each block as it goes: the digest of what is meant.
    let bar = progress_bar(size, opts.progress);
    bar.set_message(format!("export disk {disk_id}"));
    let mut digests = copy_hashing(&disk, (&dst, &tmp), &bar)?;
    // 2. Go back to the point; re-hash the blocks that changed.
    let mut changed = std::collections::BTreeSet::new();
    let applied = journal.rewind(point.lsn, &dst, &mut |offset, len| {
        if len > 0 {
            changed.extend(offset / DIGEST_BLOCK_BYTES..=(offset + len - 1) / DIGEST_BLOCK_BYTES);
        }
    })?;
    rehash((&dst, &tmp), size, changed, &mut digests)?;
    let meant = disk_digest(&digests);
    // 3. Durable, then read back from the device and compared.
    dst.sync_all().ctx(|| format!("fsync {}", tmp.display()))?;
    bar.set_message(format!("verify disk {disk_id}"));
    bar.set_position(0);
    let on_device = disk_digest(&digests_from_device(&dst, size, &bar)?);
    bar.finish_and_clear();
    if on_device != meant {
        return Err(Error::ExportRefused {
            out: out.into(),
            reason: format!(
                "the image read back from {} does not match what was written (digest {} vs {}): the output volume is failing; nothing was replaced",
                tmp.display(),
                wire_protocol::digest::hex(&on_device),
                wire_protocol::digest::hex(&meant)
            ),
        });
    }
    // 4. Into place.
    std::fs::rename(&tmp, &data_out)
        .ctx(|| format!("rename {} to {}", tmp.display(), data_out.display()))?;
    guard.0 = None;
    let mut files = vec![data_out.clone()];
    if format == Format::Vmdk {
        let uuid = export_uuid(&rec.uuid, point.lsn, opts.keep_uuid);
        let flat_name = data_out
            .file_name()
            .and_then(|s| s.to_str())
            .expect("utf-8 name")
            .to_owned();
        vmdk::write_descriptor(out, &flat_name, size, &uuid)?;
        files.insert(0, out.to_path_buf());
    }
    vmdk::sync_dir(vmdk::parent_dir(&data_out))?;
    Ok(Exported {
        point,
        applied,
        digest: on_device,
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(id: u64, tag: &str) -> Point {
        Point {
            id,
            lsn: id * 10,
            time_us: id * 1_000_000,
            kind: PointKind::AppConsistent,
            tag: tag.into(),
            group_marker: 0,
            group_members: 0,
        }
    }

    #[test]
    fn a_tag_names_the_one_point_that_carries_it() {
        let sel: PointSel = "tag:pre-upgrade".parse().unwrap();
        assert_eq!(sel, PointSel::Tag("pre-upgrade".into()));
        let points = [point(1, "pre-upgrade"), point(2, "nightly")];
        assert_eq!(select(&points, 40, &sel).unwrap().id, 1);
        // A second point of the same tag: neither is taken, both are named.
        let twice = [
            point(1, "pre-upgrade"),
            point(2, "nightly"),
            point(3, "pre-upgrade"),
        ];
        let e = select(&twice, 40, &sel).unwrap_err().to_string();
        assert!(
            e.contains("2 points") && e.contains("1 (") && e.contains("3 ("),
            "{e}"
        );
        let none = select(&points, 40, &"tag:weekly".parse().unwrap()).unwrap_err();
        assert!(matches!(none, Error::NoSuchPoint(_)), "{none}");
        assert!(none.to_string().contains("\"weekly\""), "{none}");
        let bad = "tag:".parse::<PointSel>().unwrap_err();
        assert!(bad.contains("not a tag"), "{bad}");
        assert_eq!("7".parse::<PointSel>().unwrap(), PointSel::Id(7));
    }
}
