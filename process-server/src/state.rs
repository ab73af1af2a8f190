//! What the process server knows: its disks, each with its cache and counters.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use store::{FileSystem, RealFs};
use tokio::sync::{mpsc, oneshot, Notify};
use wire_protocol::{DigestList, DigestRequest, DiskAttach, ErrorMsg, LocationKind};

use crate::cache::DiskCache;
use crate::config::Config;
use crate::error::{Error, IoContext, Result};

/// Requests relayed to the master target; each gets its answer on the oneshot.
#[derive(Debug)]
pub enum UplinkRequest {
    /// Attach a disk; answered with its durable LSN.
    Attach(DiskAttach, oneshot::Sender<Result<u64, ErrorMsg>>),
    /// Per-block digests of the target disk.
    Digests(DigestRequest, oneshot::Sender<Result<DigestList, ErrorMsg>>),
}

/// Counters of one disk.
#[derive(Debug, Default)]
pub struct DiskCounters {
    /// Block bytes received from the agent.
    pub ingest_bytes: AtomicU64,
    /// Block bytes shipped (before coalescing and compression).
    pub logical_bytes_shipped: AtomicU64,
    /// Bytes the coalescer kept off the link.
    pub coalesced_bytes: AtomicU64,
    /// Frame bytes put on the link.
    pub wire_bytes: AtomicU64,
    /// Highest LSN durable on the master target.
    pub mt_durable_lsn: AtomicU64,
    /// Rates over the last seconds, for status and ETA.
    pub rates: Mutex<Rates>,
}

/// Smoothed per-second rates of one disk (exponentially weighted, 1 s samples).
#[derive(Debug, Default, Clone, Copy)]
pub struct Rates {
    /// Block bytes received per second.
    pub ingest_bps: f64,
    /// Block bytes shipped per second (before coalescing and compression).
    pub logical_bps: f64,
    /// Bytes put on the link per second.
    pub wire_bps: f64,
    /// Backlog bytes drained (acknowledged by the master target) per second.
    pub drain_bps: f64,
    last: Option<(u64, u64, u64, u64)>,
}

impl Rates {
    /// Folds in the counters after `dt_s` seconds (`acked` counts backlog bytes drained).
    pub fn sample(&mut self, ingest: u64, logical: u64, wire: u64, acked: u64, dt_s: f64) {
        const ALPHA: f64 = 0.3;
        if let Some((i, l, w, a)) = self.last {
            let r = |now: u64, before: u64| now.saturating_sub(before) as f64 / dt_s.max(1e-3);
            self.ingest_bps += ALPHA * (r(ingest, i) - self.ingest_bps);
            self.logical_bps += ALPHA * (r(logical, l) - self.logical_bps);
            self.wire_bps += ALPHA * (r(wire, w) - self.wire_bps);
            self.drain_bps += ALPHA * (r(acked, a) - self.drain_bps);
        }
        self.last = Some((ingest, logical, wire, acked));
    }
}

/// One disk.
#[derive(Debug)]
pub struct Disk {
    /// The agent's attach request.
    pub attach: DiskAttach,
    /// Its cache.
    pub cache: Mutex<DiskCache>,
    /// Counters.
    pub counters: DiskCounters,
    /// The cache directory (for the disk's marker files).
    pub cache_dir: std::path::PathBuf,
    /// Where its files live (the machine's file system in the service).
    pub fs: Arc<dyn FileSystem>,
    /// Index of the master target (in the configured list) this disk replicates to.
    pub route: usize,
    /// Set while its RPO is past the threshold.
    pub rpo_alarm: AtomicBool,
    /// Data of the disk was lost here (a corrupt cache record): its agent must resync it.
    /// Persisted as `resync-required` in the disk's cache directory until the agent's
    /// resync completes.
    pub resync_required: AtomicBool,
    /// The disk was detached for failback on the master target: it is never shipped or
    /// attached again. Persisted as `detached` in the disk's cache directory.
    pub detached: AtomicBool,
    /// An operator retired the detached disk: its cache is gone. Persisted as `retired`.
    pub retired: AtomicBool,
    /// The agent's stream is inside a resync (a resync-started marker was cached and its
    /// completion not yet).
    pub resyncing: AtomicBool,
    /// Bumped when the disk's stream restarts at another LSN (see
    /// `DiskCache::adopt_remote`): agent connections attached before it are closed, so the
    /// agent attaches again and learns where to continue.
    pub stream_epoch: AtomicU64,
    /// Why the master target refuses the disk, while it does (nothing of it is shipped; the
    /// attach is tried again every few seconds).
    pub refused: Mutex<Option<String>>,
}

impl Disk {
    fn marker_path(&self, cache_dir: &Path) -> std::path::PathBuf {
        disk_dir(cache_dir, self.attach.disk_id).join("resync-required")
    }

    /// Marks the disk for resync (durably) after the loss of LSNs `first..=last`.
    pub fn require_resync(&self, first: u64, last: u64) -> Result<()> {
        let p = self.marker_path(&self.cache_dir);
        store::write_durable(
            &*self.fs,
            &p,
            format!("lost lsn {first}..={last}\n").as_bytes(),
        )
        .ctx(|| format!("write {}", p.display()))?;
        self.resync_required.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether the disk was detached for failback.
    pub fn is_detached(&self) -> bool {
        self.detached.load(Ordering::Acquire)
    }

    /// Marks the disk detached, durably (a restart must not attach it again).
    pub fn mark_detached(&self) -> Result<()> {
        if self.detached.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let dir = disk_dir(&self.cache_dir, self.attach.disk_id);
        let p = dir.join("detached");
        let lsn = self.counters.mt_durable_lsn.load(Ordering::Acquire);
        tracing::info!(disk = self.attach.disk_id, durable_lsn = lsn, "the disk was detached for failback on the master target: nothing more of it is shipped");
        let text = format!("detached on the master target at lsn {lsn}\n");
        store::write_durable(&*self.fs, &p, text.as_bytes())
            .ctx(|| format!("write {}", p.display()))
    }

    /// Retires a detached disk: deletes its cache, durably marks it retired. Refused while
    /// the disk is still attached on the master target.
    pub fn retire(&self) -> Result<()> {
        if !self.is_detached() {
            return Err(Error::Refused(format!(
                "disk {} is still attached: detach it on the master target first (master-target detach), then retire it here",
                self.attach.disk_id
            )));
        }
        self.cache.lock().expect("poisoned").remove_all()?;
        let dir = disk_dir(&self.cache_dir, self.attach.disk_id);
        let p = dir.join("retired");
        store::write_durable(
            &*self.fs,
            &p,
            b"retired by an operator; its cache was removed\n",
        )
        .ctx(|| format!("write {}", p.display()))?;
        self.retired.store(true, Ordering::Release);
        tracing::info!(disk = self.attach.disk_id, vm = %self.attach.vm_id, "disk retired: its cache is removed and it is never attached again");
        Ok(())
    }

    /// The disk's state, for status and `process-server disks`.
    pub fn state(&self, link_up: bool) -> &'static str {
        if self.retired.load(Ordering::Acquire) {
            "retired"
        } else if self.is_detached() {
            "detached"
        } else if self.resync_required.load(Ordering::Acquire) {
            "resync-required"
        } else if !link_up {
            "link-down"
        } else if self.refused.lock().expect("poisoned").is_some() {
            "refused"
        } else if self.resyncing.load(Ordering::Acquire) {
            "resyncing"
        } else {
            "linked"
        }
    }

    /// Clears the mark once the agent's resync has completed.
    pub fn resync_done(&self) {
        if self.resync_required.swap(false, Ordering::AcqRel) {
            let _ = store::remove_durable(&*self.fs, &self.marker_path(&self.cache_dir));
            tracing::info!(
                disk = self.attach.disk_id,
                "resync completed by the agent; the disk is consistent again"
            );
        }
    }
}

#[derive(Serialize, Deserialize)]
struct DiskMeta {
    disk_id: u64,
    vm_id: String,
    group_id: String,
    disk_uuid: String,
    size_bytes: u64,
    sector_size: u32,
    alternate: bool,
    target: String,
    /// The master target's address (absent in caches from before several were allowed).
    #[serde(default)]
    master_target: String,
    /// The VM's OS type (absent in caches from before replication groups).
    #[serde(default)]
    os_type: String,
}

/// One master target and the link to it.
#[derive(Debug)]
pub struct Uplink {
    /// Where it is.
    pub target: crate::config::MasterTarget,
    /// Requests relayed to it.
    pub requests: mpsc::Sender<UplinkRequest>,
    /// True while connected.
    pub connected: AtomicBool,
    /// Bytes of the frames (before compression) of batches sent through the link's zstd
    /// stream, headers and short frames passed as they were included.
    pub stream_bytes: AtomicU64,
    /// Whether the link's last session compressed into its zstd stream when it ended.
    pub streaming: AtomicBool,
}

/// The agent connection a disk's stream comes from. Two agents streaming one disk (one
/// VM's second disk started with the first one's `--disk-id`) would interleave two
/// different disks' writes under one LSN sequence: the target would become neither, and
/// each agent would see the other's LSNs as gaps and ask for resends for ever. So a disk
/// attached on one open connection is refused (not ready) on any other until that one
/// closes; a dead agent's connection closes within the keepalive time
/// (`runtime::net::KEEPALIVE_IDLE_S`).
#[derive(Debug, Clone)]
pub struct Holder {
    /// The connection's number in this process.
    pub conn: u64,
    /// Where it comes from.
    pub addr: std::net::SocketAddr,
    /// When it attached the disk.
    pub since: std::time::SystemTime,
}

impl State {
    /// The other connection holding `disk_id`, if one does (none for `conn` itself).
    pub fn held_elsewhere(&self, disk_id: u64, conn: u64) -> Option<Holder> {
        let h = self.holders.lock().expect("poisoned");
        h.get(&disk_id).filter(|h| h.conn != conn).cloned()
    }

    /// Records `holder` as the connection streaming `disk_id`.
    pub fn hold(&self, disk_id: u64, holder: Holder) {
        self.holders
            .lock()
            .expect("poisoned")
            .insert(disk_id, holder);
    }

    /// Forgets every disk connection `conn` held (it closed).
    pub fn release_conn(&self, conn: u64) {
        self.holders
            .lock()
            .expect("poisoned")
            .retain(|_, h| h.conn != conn);
    }
}

/// Shared state.
pub struct State {
    /// Configuration.
    pub cfg: Config,
    /// Disks by id.
    pub disks: RwLock<HashMap<u64, Arc<Disk>>>,
    /// The links to the master targets, in the configured order.
    pub uplinks: Vec<Uplink>,
    /// Signalled when new data is cached.
    pub work: Notify,
    /// Signalled when the cache shrinks.
    pub space: Notify,

    /// Current bandwidth limit, bytes per second (0: none).
    pub max_bandwidth_bps: AtomicU64,
    /// The cache limit in bytes.
    pub cache_limit_bytes: u64,
    /// The zstd level new batches are compressed at (adapted unless fixed).
    pub compression_level: std::sync::atomic::AtomicI32,
    /// Agent requests refused past the handshake.
    pub refused: crate::ingest::RequestRefusals,
    /// Refusals are logged once a second per VM, with a count of the rest.
    pub refusal_log: runtime::log::Throttle,
    /// Held while a new disk is attached: one at a time, so concurrent attaches cannot
    /// race a disk id's owner or a VM's quota.
    pub attach_lock: tokio::sync::Mutex<()>,
    /// The connection streaming each disk: one agent per disk (see [`Holder`]).
    pub holders: Mutex<HashMap<u64, Holder>>,
    /// Replication groups: routes to their agents, cuts, figures.
    pub groups: crate::cuts::Groups,
    /// Where the disks' files live (the machine's file system in the service).
    fs: Arc<dyn FileSystem>,
    /// Held for the process's life: one process server per cache directory.
    _lock: runtime::lock::DirLock,
}

fn disk_dir(cache_dir: &Path, disk_id: u64) -> std::path::PathBuf {
    cache_dir.join(format!("disk-{disk_id}"))
}

impl State {
    /// Opens every disk's cache under the cache directory.
    pub fn open(cfg: Config, requests: Vec<mpsc::Sender<UplinkRequest>>) -> Result<Arc<State>> {
        assert_eq!(
            requests.len(),
            cfg.master_targets.len(),
            "one request queue per master target"
        );
        let uplinks: Vec<Uplink> = cfg
            .master_targets
            .iter()
            .cloned()
            .zip(requests)
            .map(|(target, requests)| Uplink {
                target,
                requests,
                connected: AtomicBool::new(false),
                stream_bytes: AtomicU64::new(0),
                streaming: AtomicBool::new(false),
            })
            .collect();
        let lock = runtime::lock::DirLock::acquire(&cfg.cache_dir, "process server")?;
        let fs: Arc<dyn FileSystem> = Arc::new(RealFs);
        let mut disks = HashMap::new();
        let names = fs
            .list(&cfg.cache_dir)
            .ctx(|| format!("list {}", cfg.cache_dir.display()))?;
        for name in names {
            let Some(disk) = open_disk(&cfg, &fs, &cfg.cache_dir.join(name))? else {
                continue;
            };
            disks.insert(disk.attach.disk_id, Arc::new(disk));
        }
        let cfg_level = cfg.compression_level;
        let (cfg_groups, cache_dir) = (cfg.groups.clone(), cfg.cache_dir.clone());
        let volume = volume_bytes(&cfg.cache_dir);
        let cache_limit_bytes = match cfg.cache_limit_bytes {
            Some(b) => {
                if let Some(v) = volume.filter(|v| b > *v) {
                    tracing::warn!(cache_limit_bytes = b, volume_bytes = v, "cache-limit is larger than the cache volume: the volume fills first (writes then wait until it drains)");
                }
                b
            }
            None => volume.map(|t| t / 10 * 9).unwrap_or(u64::MAX),
        };
        Ok(Arc::new(State {
            max_bandwidth_bps: AtomicU64::new(cfg.max_bandwidth_bps),
            cfg,
            disks: RwLock::new(disks),
            uplinks,
            work: Notify::new(),
            space: Notify::new(),
            cache_limit_bytes,
            compression_level: std::sync::atomic::AtomicI32::new(cfg_level),
            refused: Default::default(),
            attach_lock: tokio::sync::Mutex::new(()),
            holders: Mutex::new(HashMap::new()),
            refusal_log: runtime::log::Throttle::new(std::time::Duration::from_secs(1)),
            groups: crate::cuts::Groups::new(
                cfg_groups,
                crate::cuts::load_last_cut_id(&*fs, &cache_dir),
            ),
            fs,
            _lock: lock,
        }))
    }

    /// Where the disks' files live.
    pub fn fs(&self) -> &dyn FileSystem {
        &*self.fs
    }

    /// A disk by id.
    pub fn disk(&self, id: u64) -> Option<Arc<Disk>> {
        self.disks.read().expect("poisoned").get(&id).cloned()
    }

    /// How many disks of VM `vm` are here (retired ones do not count).
    pub fn disks_of(&self, vm: &str) -> usize {
        self.disks
            .read()
            .expect("poisoned")
            .values()
            .filter(|d| d.attach.vm_id == vm && !d.retired.load(Ordering::Acquire))
            .count()
    }

    /// Every disk, by id.
    pub fn all(&self) -> Vec<Arc<Disk>> {
        let mut v: Vec<_> = self
            .disks
            .read()
            .expect("poisoned")
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|d| d.attach.disk_id);
        v
    }

    /// Registers a disk the master target accepted, durably.
    pub fn add_disk(
        &self,
        attach: DiskAttach,
        durable_lsn: u64,
        route: usize,
    ) -> Result<Arc<Disk>> {
        let dir = disk_dir(&self.cfg.cache_dir, attach.disk_id);
        self.fs
            .create_dir_all(&dir)
            .and_then(|()| self.fs.sync_dir(&self.cfg.cache_dir))
            .ctx(|| format!("create {}", dir.display()))?;
        let meta = DiskMeta {
            disk_id: attach.disk_id,
            vm_id: attach.vm_id.clone(),
            group_id: attach.group_id.clone(),
            disk_uuid: attach
                .disk_uuid
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            size_bytes: attach.size_bytes,
            sector_size: attach.sector_size,
            alternate: attach.location == LocationKind::Alternate,
            target: attach.target.clone(),
            master_target: self.cfg.master_targets[route].addr.clone(),
            os_type: attach.os_type.clone(),
        };
        let meta_path = dir.join("disk.json");
        let json = serde_json::to_vec_pretty(&meta).expect("serializable");
        store::write_durable(&*self.fs, &meta_path, &json)
            .ctx(|| format!("write {}", meta_path.display()))?;
        let mut cache = DiskCache::open_in(Arc::clone(&self.fs), &dir, durable_lsn)?;
        cache.confirm_position()?;
        let disk = Arc::new(Disk {
            attach,
            cache: Mutex::new(cache),
            counters: DiskCounters::default(),
            rpo_alarm: AtomicBool::new(false),
            resync_required: AtomicBool::new(false),
            detached: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            resyncing: AtomicBool::new(false),
            stream_epoch: AtomicU64::new(0),
            refused: Mutex::new(None),
            cache_dir: self.cfg.cache_dir.clone(),
            fs: Arc::clone(&self.fs),
            route,
        });
        disk.counters
            .mt_durable_lsn
            .store(durable_lsn, Ordering::Release);
        self.disks
            .write()
            .expect("poisoned")
            .entry(disk.attach.disk_id)
            .or_insert(disk.clone());
        Ok(self.disk(disk.attach.disk_id).expect("just inserted"))
    }

    /// Bytes every cache takes on the volume (acknowledged records too, until their
    /// segment goes): what the cache limit bounds, so the volume never fills under it.
    pub fn cache_bytes(&self) -> u64 {
        self.all()
            .iter()
            .map(|d| d.cache.lock().expect("poisoned").bytes())
            .sum()
    }
}

fn volume_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and a writable statvfs.
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0)
        .then(|| st.f_blocks as u64 * st.f_frsize as u64)
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The disk kept in cache directory `dir` (`None`: not a disk's directory).
fn open_disk(cfg: &Config, fs: &Arc<dyn FileSystem>, dir: &Path) -> Result<Option<Disk>> {
    let meta = dir.join("disk.json");
    let Ok(bytes) = store::read_all(&**fs, &meta) else {
        return Ok(None);
    };
    let m: DiskMeta = serde_json::from_slice(&bytes).map_err(|err| Error::InvalidParameter {
        param: "cache",
        reason: format!("{}: {err}", meta.display()),
    })?;
    let route = if m.master_target.is_empty() {
        0
    } else {
        cfg.master_targets.iter().position(|t| t.addr == m.master_target).ok_or_else(|| Error::InvalidParameter {
                param: "master-target",
                reason: format!("disk {} replicates to {}, which is no longer configured: add it back to master-target", m.disk_id, m.master_target),
            })?
    };
    let attach = m.into_attach();
    let detached_lsn = detached_lsn(&**fs, dir);
    let cache = DiskCache::open_in(Arc::clone(fs), dir, detached_lsn.unwrap_or(0))?;
    if !cache.position_known() {
        tracing::error!(dir = %dir.display(), "this process server has no record of how far the master target acknowledged this disk (acked-lsn missing or damaged, no segment left): its agents wait until the master target says where the disk stands");
    }
    // Everything before the oldest record still cached was acknowledged by the master
    // target (records leave only then): a lower bound until it says more.
    let durable_lsn =
        detached_lsn.unwrap_or_else(|| cache.oldest_lsn().map_or(cache.last_lsn(), |l| l - 1));
    tracing::info!(
        disk = attach.disk_id,
        cached_to_lsn = cache.last_lsn(),
        cache_bytes = cache.bytes(),
        "cache opened"
    );
    let disk = Disk {
        attach,
        cache: Mutex::new(cache),
        counters: DiskCounters::default(),
        rpo_alarm: AtomicBool::new(false),
        resync_required: AtomicBool::new(fs.exists(&dir.join("resync-required"))),
        detached: AtomicBool::new(fs.exists(&dir.join("detached"))),
        retired: AtomicBool::new(fs.exists(&dir.join("retired"))),
        resyncing: AtomicBool::new(false),
        stream_epoch: AtomicU64::new(0),
        refused: Mutex::new(None),
        route,
        cache_dir: cfg.cache_dir.clone(),
        fs: Arc::clone(fs),
    };
    disk.counters
        .mt_durable_lsn
        .store(durable_lsn, Ordering::Release);
    Ok(Some(disk))
}

/// What the master target held when the disk was detached (its `detached` file): all of it
/// is durable there, and nothing is shipped again.
fn detached_lsn(fs: &dyn FileSystem, dir: &Path) -> Option<u64> {
    let text = store::read_all(fs, &dir.join("detached")).ok()?;
    String::from_utf8_lossy(&text)
        .trim()
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

impl DiskMeta {
    /// The attach this disk was registered with.
    fn into_attach(self) -> DiskAttach {
        DiskAttach {
            request_id: 0,
            os_type: self.os_type,
            disk_id: self.disk_id,
            disk_uuid: uuid_from_hex(&self.disk_uuid),
            vm_id: self.vm_id,
            group_id: self.group_id,
            size_bytes: self.size_bytes,
            sector_size: self.sector_size,
            location: if self.alternate {
                LocationKind::Alternate
            } else {
                LocationKind::Original
            },
            target: self.target,
        }
    }
}

/// The 16 bytes of a UUID kept as 32 hex digits (a digit pair that does not parse: 0).
fn uuid_from_hex(hex: &str) -> [u8; 16] {
    let mut uuid = [0u8; 16];
    for (i, b) in uuid.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(i * 2..i * 2 + 2).unwrap_or("00"), 16).unwrap_or(0);
    }
    uuid
}
