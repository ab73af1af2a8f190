//! The master target's disks: attach rules, one apply worker per disk, detach.
//!
//! Each attached disk has a worker thread that owns its [`Applier`] and drains a bounded
//! queue, applying everything queued at once as one group (group commit: one set of
//! fsyncs per group, however many batches it holds). Acks go back on each sender's
//! outbound queue once the group's commit is durable.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;
use wire_protocol::{Bookmark, DigestRequest, DiskAttach, LocationKind, Message, WriteBatch};

use crate::apply::{Applier, RetentionPolicy};
use crate::config::Config;
use crate::core::{Applied, DiskCore, Group};
use crate::datastore::Datastores;
use crate::disk::DiskFile;
use crate::error::{Error, IoContext, Result};
use crate::journal::Journal;
use crate::registry::{uuid_hex, DiskRecord, Registry};
use crate::uring::IoBackend;
use crate::vmdk::{self, DiskImage};

/// At most this many disks per master target (the product's documented limit).
pub const MAX_DISKS: usize = 60;
/// The smallest disk attached: smaller ones are mistakes (or an attempt to fill the 60
/// places cheaply).
pub const MIN_DISK_BYTES: u64 = 1 << 20;
/// The largest disk attached: a VMDK's limit on VMFS (62 TiB).
pub const MAX_DISK_BYTES: u64 = 62 << 40;
/// Batches queued per disk before senders wait: with 8 MiB batches, 16 bound a disk's queue
/// to 128 MiB, and 60 disks to 7.5 GiB in the worst case.
pub const DISK_QUEUE_DEPTH: usize = 16;
/// A group stops growing at this many bytes of block data (bounds the undo buffer).
pub const MAX_GROUP_BYTES: usize = 64 << 20;

/// Journal segments are an eighth of the quota (pruning frees whole segments, so a quota
/// holds at any size), between 1 MiB and 64 MiB.
pub fn segment_target_bytes(quota_bytes: u64) -> u64 {
    (quota_bytes / 8).clamp(1 << 20, crate::journal::SEGMENT_TARGET_BYTES)
}

/// A group's block data is at most a quarter of the quota (its undo records land in the
/// journal at once), and at most [`MAX_GROUP_BYTES`]; never less than one batch.
pub fn group_max_bytes(quota_bytes: u64) -> usize {
    ((quota_bytes / 4) as usize).clamp(wire_protocol::message::MAX_BATCH_DATA_LEN, MAX_GROUP_BYTES)
}
/// Most blocks one digest request may ask for (one digest list's worth).
pub const MAX_DIGEST_BLOCKS: u32 = wire_protocol::message::MAX_DIGESTS_PER_LIST as u32;
/// The smallest block a digest may cover: a digest of a few bytes would give those bytes
/// away (a table of 256 digests reads a disk byte by byte), and tiny blocks multiply the
/// digest cache.
pub const MIN_DIGEST_BLOCK_BYTES: u32 = 4096;
/// The largest block a digest may cover (resync uses 64 KiB).
pub const MAX_DIGEST_BLOCK_BYTES: u32 = 1 << 20;
/// The most disk one digest request may hash: resync asks for 128 MiB at a time; more would
/// let one request keep both cores busy for minutes.
pub const MAX_DIGEST_REQUEST_BYTES: u64 = 1 << 30;

/// Repeated warnings of one kind and disk are logged once a second, with a count of the rest.
static LOG_THROTTLE: std::sync::LazyLock<runtime::log::Throttle> =
    std::sync::LazyLock::new(|| runtime::log::Throttle::new(std::time::Duration::from_secs(1)));

/// What an operator does about a disk that could not be served.
/// What an attach must hold before anything is looked up: a disk id, a VM id that is a
/// name, a size a VMDK can have.
fn check_attach(req: &DiskAttach) -> Result<()> {
    if req.disk_id == 0 {
        return Err(Error::InvalidParameter {
            param: "disk_id",
            reason: "0 is not a disk id".into(),
        });
    }
    wire_protocol::message::validate_name("vm id", &req.vm_id).map_err(|e| {
        Error::InvalidParameter {
            param: "vm_id",
            reason: e.to_string(),
        }
    })?;
    if !(MIN_DISK_BYTES..=MAX_DISK_BYTES).contains(&req.size_bytes) {
        return Err(Error::InvalidParameter {
            param: "size_bytes",
            reason: format!(
                "{} bytes is outside the range {MIN_DISK_BYTES} to {MAX_DISK_BYTES} (a VMDK's limit)",
                req.size_bytes
            ),
        });
    }
    Ok(())
}

/// The rules of a replication group that this master target sees (the process server
/// checks membership): every disk of a group comes through one process server (it
/// coordinates the group's cuts) and every VM of it has the same OS type.
fn check_group(by: &str, req: &DiskAttach, disks: &[DiskRecord]) -> Result<()> {
    if req.group_id.is_empty() {
        return Ok(());
    }
    for (param, v) in [("group_id", &req.group_id), ("os_type", &req.os_type)] {
        wire_protocol::message::validate_name(param, v).map_err(|e| Error::InvalidParameter {
            param,
            reason: e.to_string(),
        })?;
    }
    let others = disks
        .iter()
        .filter(|d| d.attached && d.group_id == req.group_id && d.disk_id != req.disk_id);
    for d in others {
        if d.process_server != by {
            return Err(Error::Forbidden(format!("disk {}: replication group {} is replicated through process server {}: every disk of a group goes through one process server", req.disk_id, req.group_id, d.process_server)));
        }
        if d.os_type != req.os_type {
            return Err(Error::Forbidden(format!("disk {}: replication group {} is of {} VMs, and VM {} is {}: every VM of a group has the same OS type", req.disk_id, req.group_id, d.os_type, req.vm_id, req.os_type)));
        }
    }
    Ok(())
}

fn restart_advice(disk_id: u64, e: &Error) -> String {
    match e {
        Error::JournalCorrupt { .. } => format!("disk {disk_id} is not served: its retention journal is damaged where data was committed; the other disks carry on. Run `master-target recover-journal --disk {disk_id}` (it keeps the damaged journal aside, keeps the disk as of its last commit, and drops the points before it), then the process server re-attaches it"),
        _ => format!("disk {disk_id} is not served; the other disks carry on. Fix the cause and the process server's next attach serves it"),
    }
}

/// Where replies to a sender go.
pub type Reply = mpsc::Sender<Message>;

type Work = crate::core::Work<Reply>;

struct DiskHandle {
    tx: mpsc::Sender<Work>,
    /// The identity name of the process server that attached the disk: only it may write.
    owner: String,
    committed: Arc<AtomicU64>,
    stats: Arc<Mutex<DiskStats>>,
    /// The disk's apply thread: detach joins it, so the disk's lock is gone (and nothing
    /// more is applied) before detach reports the disk's final LSN.
    worker: std::thread::JoinHandle<()>,
}

/// Per-disk figures for metrics and status.
#[derive(Debug, Clone, Default)]
pub struct DiskStats {
    /// Highest durable LSN.
    pub committed_lsn: u64,
    /// Block bytes applied since start.
    pub bytes_applied: u64,
    /// Writes whose bytes the disk already held, since start.
    pub writes_unchanged: u64,
    /// Writes over what their group had saved already (not journaled), since start.
    pub writes_covered: u64,
    /// Groups applied since start.
    pub groups: u64,
    /// Sum of group apply times, microseconds.
    pub apply_us_total: u64,
    /// Journal bytes.
    pub journal_bytes: u64,
    /// Recovery points kept.
    pub points: u64,
    /// Seconds between the oldest and newest point kept.
    pub window_kept_s: u64,
    /// Whether the quota is forcing points out.
    pub quota_limited: bool,
}

/// The master target's disks and their workers.
pub struct Disks {
    /// Held for the service's life: one master target per data directory.
    _lock: runtime::lock::DirLock,
    cfg: Config,
    datastores: Datastores,
    registry: Mutex<Registry>,
    handles: Mutex<HashMap<u64, DiskHandle>>,
    /// Tells every connection of a detach, so the process server stops shipping the disk
    /// (and tells its agent) at once, not at its next reconnection.
    detached_tx: tokio::sync::broadcast::Sender<u64>,
}

/// Detaches a connection may not have heard of yet before it lags (it then learns of the
/// rest from its next attach or write, which are refused as detached).
pub const DETACH_NOTICE_DEPTH: usize = 64;

impl Disks {
    /// Hears of every detach from now on.
    pub fn detach_notices(&self) -> tokio::sync::broadcast::Receiver<u64> {
        self.detached_tx.subscribe()
    }

    /// The process server that replicates `disk_id` (attached or detached), if known.
    pub fn replicated_by(&self, disk_id: u64) -> Option<String> {
        let reg = self.registry.lock().expect("poisoned");
        reg.get(disk_id).map(|r| r.process_server.clone())
    }

    /// Loads the disk list and re-attaches every disk that was attached (recovering each
    /// journal: torn tails truncated, uncommitted writes rolled back).
    pub fn open(cfg: Config) -> Result<Arc<Disks>> {
        let lock = runtime::lock::DirLock::acquire(&cfg.data_dir, "master target")?;
        let registry = Registry::load(&cfg.data_dir)?;
        let datastores = Datastores::open(&cfg.datastore_dirs)?;
        let disks = Arc::new(Disks {
            _lock: lock,
            cfg,
            datastores,
            registry: Mutex::new(registry),
            handles: Mutex::new(HashMap::new()),
            detached_tx: tokio::sync::broadcast::channel(DETACH_NOTICE_DEPTH).0,
        });
        let attached: Vec<DiskRecord> = disks
            .registry
            .lock()
            .expect("poisoned")
            .disks
            .iter()
            .filter(|d| d.attached)
            .cloned()
            .collect();
        for rec in attached {
            // One disk that cannot be served (a damaged journal, a missing file) does not keep
            // the others from being served: it is refused until the cause is fixed.
            match disks.restart(&rec) {
                Ok(committed) => {
                    tracing::info!(disk = rec.disk_id, committed_lsn = committed, path = %rec.data_path.display(), "disk re-attached after restart")
                }
                Err(e) => {
                    tracing::error!(disk = rec.disk_id, error = %e, "{}", restart_advice(rec.disk_id, &e))
                }
            }
        }
        Ok(disks)
    }

    fn policy(&self) -> RetentionPolicy {
        RetentionPolicy {
            crash_point_interval_us: self.cfg.crash_point_interval_ms * 1000,
            window_us: self.cfg.retention_hours * 3600 * 1_000_000,
            quota_bytes: self.cfg.journal_quota_bytes,
        }
    }

    /// The journal directory of a disk.
    pub fn journal_dir(retention_dir: &Path, disk_id: u64) -> PathBuf {
        retention_dir.join(format!("disk-{disk_id}"))
    }

    /// The datastores of this master target.
    pub fn datastores(&self) -> &Datastores {
        &self.datastores
    }

    /// Attaches a disk for the process server `by` (or confirms one it attached already).
    /// Returns its committed LSN.
    pub fn attach(&self, by: &str, req: &DiskAttach) -> Result<u64> {
        check_attach(req)?;
        let mut reg = self.registry.lock().expect("poisoned");
        let uuid = uuid_hex(&req.disk_uuid);
        if let Some(answer) = self.attached_already(by, req, &uuid, &reg) {
            return answer;
        }
        check_group(by, req, &reg.disks)?;
        let attached: Vec<&DiskRecord> = reg.disks.iter().filter(|d| d.attached).collect();
        if attached.len() >= MAX_DISKS {
            return Err(Error::DiskLimit {
                max: MAX_DISKS,
                disk_id: req.disk_id,
            });
        }
        let dup = |u: &str| {
            attached
                .iter()
                .find(|d| d.uuid == u && d.disk_id != req.disk_id)
                .map(|d| d.disk_id)
        };
        if let Some(other) = dup(&uuid) {
            return Err(Error::DuplicateUuid {
                disk_id: req.disk_id,
                uuid: vmdk::format_uuid(&req.disk_uuid),
                other,
            });
        }
        let (image, file) = self.open_target(req, &reg)?;
        if let Some(u) = image.uuid.map(|u| uuid_hex(&u)) {
            if let Some(other) = dup(&u) {
                return Err(Error::DuplicateUuid {
                    disk_id: req.disk_id,
                    uuid: u,
                    other,
                });
            }
        }
        let actual = file.metadata().map(|m| m.len()).unwrap_or(0);
        if image.size_bytes != req.size_bytes || actual < req.size_bytes {
            return Err(Error::SizeMismatch {
                disk_id: req.disk_id,
                path: image.descriptor.clone(),
                expected: req.size_bytes,
                actual: image.size_bytes.min(actual),
            });
        }
        let disk = DiskFile::lock(file, &image.data_path)?;
        let rec = DiskRecord {
            disk_id: req.disk_id,
            vm_id: req.vm_id.clone(),
            group_id: req.group_id.clone(),
            uuid,
            size_bytes: req.size_bytes,
            descriptor: image.descriptor,
            data_path: image.data_path,
            attached: true,
            process_server: by.to_owned(),
            detached_lsn: 0,
            os_type: req.os_type.clone(),
        };
        let committed = self.start(&rec, disk)?;
        reg.put(rec)?;
        tracing::info!(disk = req.disk_id, vm = %req.vm_id, process_server = by, committed_lsn = committed, "disk attached");
        Ok(committed)
    }

    /// The answer to an attach of a disk this master target knows already: served now (the
    /// same process server, VM, UUID and size: its committed LSN), registered but not served
    /// since the last start (served again), detached, or someone else's. `None`: a new disk.
    fn attached_already(
        &self,
        by: &str,
        req: &DiskAttach,
        uuid: &str,
        reg: &Registry,
    ) -> Option<Result<u64>> {
        let same = |rec: &DiskRecord| rec.uuid == uuid && rec.size_bytes == req.size_bytes;
        let other = |rec: &DiskRecord| Error::DuplicateUuid {
            disk_id: req.disk_id,
            uuid: uuid.to_owned(),
            other: rec.disk_id,
        };
        let forbidden = |why: &str| Error::Forbidden(format!("disk {} {why}", req.disk_id));
        if let Some(h) = self.handles.lock().expect("poisoned").get(&req.disk_id) {
            let rec = reg.get(req.disk_id).expect("attached disks are registered");
            return Some(if h.owner != by {
                Err(forbidden("is replicated by another process server"))
            } else if rec.vm_id != req.vm_id {
                Err(forbidden("belongs to another VM"))
            } else if !same(rec) {
                Err(other(rec))
            } else {
                Ok(h.committed.load(Ordering::Acquire))
            });
        }
        let rec = reg.get(req.disk_id)?;
        // Whose it is first: another VM or process server learns nothing of its state.
        Some(if rec.process_server != by || rec.vm_id != req.vm_id {
            Err(forbidden("belongs to another VM or process server"))
        } else if !rec.attached {
            Err(Error::Detached {
                disk_id: rec.disk_id,
                lsn: rec.detached_lsn,
            })
        } else if !same(rec) {
            Err(other(rec))
        } else {
            // Attached, but not served since the last start (its journal or file failed):
            // try again, for the process server that attached it.
            self.restart(rec).inspect_err(|e| {
                tracing::error!(disk = rec.disk_id, error = %e, "{}", restart_advice(rec.disk_id, e));
            })
        })
    }

    /// Opens the disk an attach names: the original's file (never another disk id's), or a
    /// new VMDK in a datastore; either only if the retention volume can take its journal.
    fn open_target(&self, req: &DiskAttach, reg: &Registry) -> Result<(DiskImage, std::fs::File)> {
        match req.location {
            LocationKind::Original => {
                let (image, file) = self.datastores.open_original(&req.target, &req.vm_id)?;
                // A file another disk id was attached to (now, or before it was detached) is
                // that disk's: never a second disk's, whatever path reaches it.
                let id = crate::datastore::identity_of(&file)
                    .ctx(|| format!("stat {}", image.data_path.display()))?;
                for rec in &reg.disks {
                    let known = std::fs::metadata(&rec.data_path).map(|m| (m.dev(), m.ino()));
                    if known.is_ok_and(|k| k == id) {
                        return Err(Error::Forbidden(format!(
                            "the target is the disk of another disk id on this master target ({}): a disk file belongs to one disk id",
                            if rec.attached { "attached" } else { "detached for failback" }
                        )));
                    }
                }
                self.check_retention(&image.data_path)?;
                Ok((image, file))
            }
            LocationKind::Alternate => {
                // Judge the retention volume before anything is created.
                let dir = match req.target.as_str() {
                    "" => self.datastores.dirs()[0].clone(),
                    t => self.datastores.path_of(&self.datastores.locate(t)?),
                };
                self.check_retention(&dir)?;
                let name = format!("{}-disk{}", req.vm_id, req.disk_id);
                self.datastores.create(
                    &req.target,
                    &req.vm_id,
                    &name,
                    req.size_bytes,
                    &req.disk_uuid,
                )
            }
        }
    }

    fn check_retention(&self, disk_place: &Path) -> Result<()> {
        let vol = crate::retention::check(
            &self.cfg.retention_dir,
            &[("the disk", disk_place)],
            self.cfg.allow_shared_retention_volume,
        )?;
        if vol.free_bytes == 0 {
            return Err(Error::RetentionVolume {
                path: self.cfg.retention_dir.clone(),
                reason: "it has no free space: a new disk is not attached until there is room (lower journal-quota, or grow the volume)".into(),
            });
        }
        Ok(())
    }

    /// Opens, locks and recovers a disk of the disk list and starts its worker.
    fn restart(&self, rec: &DiskRecord) -> Result<u64> {
        let (_, file) = self.datastores.reopen(&rec.descriptor)?;
        self.start(rec, DiskFile::lock(file, &rec.data_path)?)
    }

    /// Recovers a locked disk's journal and starts its worker.
    fn start(&self, rec: &DiskRecord, disk: DiskFile) -> Result<u64> {
        let quota = self.cfg.journal_quota_bytes;
        // Segments small enough that pruning frees room in steps, on the quota and on the
        // volume that holds the journals.
        let volume = crate::retention::volume_bytes(&self.cfg.retention_dir).unwrap_or(u64::MAX);
        let mut journal = Journal::open(
            &Self::journal_dir(&self.cfg.retention_dir, rec.disk_id),
            &disk,
        )?
        .with_segment_target_bytes(segment_target_bytes(quota.min(volume / 2)));
        // A smaller quota than last time (or a full volume) takes effect now, not at the
        // next write.
        if journal.prune(self.policy().window_us, quota)? {
            tracing::warn!(
                disk = rec.disk_id,
                quota_bytes = quota,
                "journal pruned to its quota at start: the oldest points are gone"
            );
        }
        let (io, why) = IoBackend::new(self.cfg.io_backend).map_err(|e| Error::Io {
            context: "io-backend = uring: the kernel refuses io_uring; use auto or syscall".into(),
            source: e,
        })?;
        tracing::info!(disk = rec.disk_id, backend = io.name(), why = %why, "apply I/O backend chosen");
        let applier = Applier::new(rec.disk_id, disk, journal, self.policy()).with_io(io);
        let group_bytes = group_max_bytes(quota);
        let committed = applier.committed_lsn();
        let (tx, rx) = mpsc::channel(DISK_QUEUE_DEPTH);
        let committed_cell = Arc::new(AtomicU64::new(committed));
        let stats = Arc::new(Mutex::new(DiskStats::default()));
        let (c, s) = (Arc::clone(&committed_cell), Arc::clone(&stats));
        let worker = std::thread::Builder::new()
            .name(format!("apply-{}", rec.disk_id))
            .spawn(move || worker(applier, rx, c, s, group_bytes))
            .map_err(|e| Error::Io {
                context: "spawn apply worker".into(),
                source: e,
            })?;
        self.handles.lock().expect("poisoned").insert(
            rec.disk_id,
            DiskHandle {
                tx,
                owner: rec.process_server.clone(),
                committed: committed_cell,
                stats,
                worker,
            },
        );
        Ok(committed)
    }

    /// Detaches a disk: its worker finishes what is queued, then its lock is released so
    /// the on-premises VM can boot from it. Its journal stays for exports.
    pub fn detach(&self, disk_id: u64) -> Result<u64> {
        let mut reg = self.registry.lock().expect("poisoned");
        let Some(h) = self.handles.lock().expect("poisoned").remove(&disk_id) else {
            return Err(match reg.get(disk_id) {
                Some(rec) if !rec.attached => Error::Detached {
                    disk_id,
                    lsn: rec.detached_lsn,
                },
                _ => Error::UnknownDisk(disk_id),
            });
        };
        let committed = h.committed.clone();
        // Dropping the sender ends the worker once its queue is drained (a group held back
        // by a full volume is given up, unacknowledged); it drops the disk file (and its
        // lock) on the way out.
        drop(h.tx);
        if h.worker.join().is_err() {
            return Err(Error::Io {
                context: format!("detach disk {disk_id}"),
                source: std::io::Error::other("its apply thread panicked (see the log); restart the master target, whose journal recovery puts the disk right"),
            });
        }
        if let Some(mut rec) = reg.get(disk_id).cloned() {
            rec.attached = false;
            rec.detached_lsn = committed.load(Ordering::Acquire);
            reg.put(rec)?;
        }
        tracing::info!(disk = disk_id, "disk detached; its lock is released");
        let _ = self.detached_tx.send(disk_id);
        Ok(committed.load(Ordering::Acquire))
    }

    /// Queues a batch from process server `by` for its disk's worker (waits while the
    /// queue is full).
    pub async fn submit_batch(&self, b: WriteBatch, by: &str, reply: Reply) -> Result<()> {
        let tx = self.sender(b.disk_id, by)?;
        tx.send(Work::Batch(b, reply))
            .await
            .map_err(|_| Error::UnknownDisk(0))
    }

    /// Queues a bookmark.
    pub async fn submit_bookmark(&self, b: Bookmark, by: &str, reply: Reply) -> Result<()> {
        let tx = self.sender(b.disk_id, by)?;
        tx.send(Work::Bookmark(b, reply))
            .await
            .map_err(|_| Error::UnknownDisk(0))
    }

    /// Queues a digest request.
    pub async fn submit_digests(&self, r: DigestRequest, by: &str, reply: Reply) -> Result<()> {
        if !r.block_size.is_power_of_two()
            || !(MIN_DIGEST_BLOCK_BYTES..=MAX_DIGEST_BLOCK_BYTES).contains(&r.block_size)
            || r.block_count > MAX_DIGEST_BLOCKS
            || u64::from(r.block_size) * u64::from(r.block_count) > MAX_DIGEST_REQUEST_BYTES
        {
            return Err(Error::InvalidParameter {
                param: "digest request",
                reason: format!(
                    "block size {} (a power of two from {MIN_DIGEST_BLOCK_BYTES} to {MAX_DIGEST_BLOCK_BYTES}) and count {} (at most {MAX_DIGEST_BLOCKS}, and {MAX_DIGEST_REQUEST_BYTES} bytes in all)",
                    r.block_size, r.block_count
                ),
            });
        }
        let tx = self.sender(r.disk_id, by)?;
        tx.send(Work::Digests(r, reply))
            .await
            .map_err(|_| Error::UnknownDisk(0))
    }

    /// The queue of `disk_id`, if process server `by` may write it.
    fn sender(&self, disk_id: u64, by: &str) -> Result<mpsc::Sender<Work>> {
        if let Some(h) = self.handles.lock().expect("poisoned").get(&disk_id) {
            if h.owner != by {
                return Err(Error::Forbidden(format!(
                    "disk {disk_id} is replicated by another process server"
                )));
            }
            return Ok(h.tx.clone());
        }
        Err(match self.registry.lock().expect("poisoned").get(disk_id) {
            Some(rec) if rec.process_server != by => Error::Forbidden(format!(
                "disk {disk_id} is replicated by another process server"
            )),
            Some(rec) if !rec.attached => Error::Detached {
                disk_id,
                lsn: rec.detached_lsn,
            },
            _ => Error::UnknownDisk(disk_id),
        })
    }

    /// Figures of every attached disk.
    pub fn stats(&self) -> Vec<(u64, DiskStats)> {
        let mut v: Vec<_> = self
            .handles
            .lock()
            .expect("poisoned")
            .iter()
            .map(|(id, h)| (*id, h.stats.lock().expect("poisoned").clone()))
            .collect();
        v.sort_by_key(|(id, _)| *id);
        v
    }
}

fn send(reply: &Reply, msg: Message) {
    // A sender that went away will resend after it reconnects; nothing to do here.
    let _ = reply.blocking_send(msg);
}

fn worker(
    applier: Applier,
    mut rx: mpsc::Receiver<Work>,
    committed: Arc<AtomicU64>,
    stats: Arc<Mutex<DiskStats>>,
    group_bytes: usize,
) {
    let mut core = DiskCore::new(applier);
    publish(core.applier(), &stats, 0);
    while let Some(first) = rx.blocking_recv() {
        let works = gather(first, &mut rx, group_bytes);
        let mut g = core.check(works);
        log_refusals(&mut core);
        let started = Instant::now();
        for (r, msg) in std::mem::take(&mut g.replies) {
            send(&r, msg);
        }
        if let Err(e) = apply_until_room(&mut core, &g, &rx) {
            if rx.is_closed() && crate::core::out_of_space(&e) {
                tracing::warn!(disk = core.applier().disk_id(), "detached while a full volume held a group back: it was not applied nor acknowledged, and is sent again after the next attach");
                break;
            }
            tracing::error!(disk = core.applier().disk_id(), error = %e, "apply failed; the disk stops taking writes until the master target restarts");
            for (r, msg) in DiskCore::fail(g, &e) {
                send(&r, msg);
            }
            break;
        }
        committed.store(core.applier().committed_lsn(), Ordering::Release);
        publish(core.applier(), &stats, started.elapsed().as_micros() as u64);
        for (r, msg) in core.finish(g, Reply::same_channel) {
            send(&r, msg);
        }
    }
    // The disk (and its lock) goes before the stats, which detach watches.
    drop(core);
    drop(stats);
}

/// `first` and whatever else is queued, up to `group_bytes` of block data: one group.
fn gather(first: Work, rx: &mut mpsc::Receiver<Work>, group_bytes: usize) -> Vec<Work> {
    let mut works = vec![first];
    let mut bytes = 0usize;
    while bytes < group_bytes {
        match rx.try_recv() {
            Ok(w) => {
                if let Work::Batch(b, _) = &w {
                    bytes += b.data_len();
                }
                works.push(w);
            }
            Err(_) => break,
        }
    }
    works
}

/// Logs the core's refusals, at most once a second per kind and disk.
fn log_refusals(core: &mut DiskCore) {
    for r in core.take_refusals() {
        let (kind, d) = if r.resend {
            ("resend", r.disk_id)
        } else {
            ("refused", r.disk_id)
        };
        if let Some(suppressed) = LOG_THROTTLE.admit(&format!("{kind} {d}")) {
            if r.resend {
                tracing::warn!(disk = d, error = %r.error, suppressed, "asking for a resend");
            } else {
                tracing::error!(disk = d, error = %r.error, suppressed, "batch refused");
            }
        }
    }
}

/// The longest wait between attempts to apply a group while a volume is full.
const FULL_RETRY_MAX_MS: u64 = 10_000;

/// Applies a group; while a volume is full and nothing more can be pruned, waits and
/// retries: a full volume holds writes back, it never loses or refuses them.
/// A detach (every sender gone) gives the held group up, unacknowledged: the process
/// server sends it again after the next attach.
fn apply_until_room(
    core: &mut DiskCore,
    g: &Group<Reply>,
    rx: &mpsc::Receiver<Work>,
) -> Result<()> {
    let mut wait_ms = 250;
    loop {
        match core.apply(g)? {
            Applied::Done(_) => return Ok(()),
            Applied::Full(e) if rx.is_closed() => return Err(e),
            Applied::Full(e) => {
                let disk_id = core.applier().disk_id();
                if let Some(suppressed) = LOG_THROTTLE.admit(&format!("full {disk_id}")) {
                    tracing::warn!(disk = disk_id, error = %e, suppressed, "a volume is full and nothing more can be pruned: holding this disk's writes (nothing acknowledged is lost) until there is room");
                }
                std::thread::sleep(std::time::Duration::from_millis(wait_ms));
                wait_ms = (wait_ms * 2).min(FULL_RETRY_MAX_MS);
            }
        }
    }
}

fn publish(applier: &Applier, stats: &Mutex<DiskStats>, apply_us: u64) {
    let j = applier.journal();
    let pts = j.points();
    let mut s = stats.lock().expect("poisoned");
    s.committed_lsn = applier.committed_lsn();
    s.bytes_applied = applier.stats.bytes_applied;
    s.writes_unchanged = applier.stats.writes_unchanged;
    s.writes_covered = applier.stats.writes_covered;
    s.groups = applier.stats.groups;
    s.apply_us_total += apply_us;
    s.journal_bytes = j.bytes();
    s.points = pts.len() as u64;
    s.window_kept_s = pts
        .first()
        .zip(pts.last())
        .map_or(0, |(a, b)| (b.time_us - a.time_us) / 1_000_000);
    s.quota_limited = applier.stats.quota_limited;
}
