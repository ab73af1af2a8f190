//! The master target in the simulation: its apply core and journal on a simulated volume.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use master_target::apply::{Applier, RetentionPolicy};
use master_target::core::{Applied, DiskCore, Work};
use master_target::disk::DiskFile;
use master_target::journal::{Journal, PointKind};
use store::{FileSystem, OpenMode, SimFaults, SimFs};
use wire_protocol::Message;

use crate::model::{Item, MemFile, Source, DISK_BYTES, DISK_ID};

pub fn disk_path() -> PathBuf {
    PathBuf::from("/ds/vm1-flat.vmdk")
}

fn journal_dir() -> PathBuf {
    PathBuf::from("/ret/disk-7")
}

/// The on-premises machine.
pub struct Mt {
    pub fs: SimFs,
    pub faults: SimFaults,
    pub core: Option<DiskCore>,
    pub policy: RetentionPolicy,
    pub segment_bytes: u64,
    /// A group waiting for room on a full volume, with the connection it came on.
    pub held: Option<(master_target::core::Group<u64>, u64)>,
}

impl Mt {
    pub fn new(seed: u64, rng: &mut fastrand::Rng) -> Mt {
        let fs = SimFs::new(seed ^ 0x6d74);
        fs.put(&disk_path(), &vec![0u8; DISK_BYTES]);
        fs.create_dir_all(Path::new("/ret")).unwrap();
        Mt {
            fs,
            faults: SimFaults {
                eio_per_million: [0, 0, 2_000, 10_000][rng.usize(..4)],
                capacity_bytes: DISK_BYTES as u64 + rng.u64(96 << 10..2 << 20),
                tear_per_million: 300_000,
            },
            core: None,
            policy: RetentionPolicy {
                crash_point_interval_us: rng.u64(500_000..3_000_000),
                window_us: rng.u64(5_000_000..60_000_000),
                quota_bytes: rng.u64(64 << 10..1 << 20),
            },
            segment_bytes: [8 << 10, 32 << 10, 1 << 20][rng.usize(..3)],
            held: None,
        }
    }

    /// Opens the disk and recovers the journal. `Ok(None)`: an injected fault stopped it
    /// (try again later).
    pub fn start(&mut self) -> Result<Option<u64>, String> {
        let core = open_core(
            &self.fs,
            (&disk_path(), &journal_dir(), DISK_ID),
            self.policy,
            self.segment_bytes,
        )?;
        let lsn = core.as_ref().map(|c| c.applier().committed_lsn());
        self.core = core;
        Ok(lsn)
    }

    pub fn committed(&self) -> Option<u64> {
        self.core.as_ref().map(|c| c.applier().committed_lsn())
    }

    /// Takes requests arriving on connection `conn` and returns the answers (to `conn`).
    /// A group held back by a full volume is tried first.
    pub fn serve(&mut self, works: Vec<Work<u64>>, conn: u64) -> Result<Vec<Message>, String> {
        assert!(
            self.held.is_none() || works.is_empty(),
            "the worker reads nothing more while a group waits for room"
        );
        let core = self.core.as_mut().expect("running");
        let (g, gconn) = match self.held.take() {
            Some(held) => held,
            None => {
                let g = core.check(works);
                core.take_refusals();
                (g, conn)
            }
        };
        let mut g = g;
        let mut out: Vec<Message> = std::mem::take(&mut g.replies)
            .into_iter()
            .map(|(_, m)| m)
            .collect();
        match core.apply(&g) {
            Ok(Applied::Done(_)) => {
                out.extend(core.finish(g, |a, b| a == b).into_iter().map(|(_, m)| m));
            }
            Ok(Applied::Full(_)) => self.held = Some((g, gconn)),
            Err(e) => {
                if !self.fs.crashed() && !injected(&e.to_string()) {
                    return Err(format!("apply failed without an injected fault: {e}"));
                }
                // The disk stops; the operator restarts the master target.
                self.core = None;
            }
        }
        Ok(if gconn == conn { out } else { Vec::new() })
    }

    /// Nothing acknowledged is lost, and the disk is the source at the committed LSN.
    pub fn check_state(&self, src: &mut Source, acked: u64, when: &str) -> Result<(), String> {
        let Some(committed) = self.committed() else {
            return Ok(());
        };
        if committed < acked {
            return Err(format!(
                "{when}: lsn {acked} acknowledged by the master target lost: its journal says {committed}"
            ));
        }
        let disk = self.fs.contents(&disk_path()).expect("disk exists");
        if blake3::hash(&disk) != blake3::hash(&src.image_at(committed)) {
            let want = src.image_at(committed);
            let at = disk
                .iter()
                .zip(&want)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(format!(
                "{when}: disk differs from the source at committed lsn {committed} (first at byte {at})"
            ));
        }
        Ok(())
    }

    /// Every listed point exports to the source at its LSN (faults paused: an export is
    /// another process, and one reading through an injected EIO proves nothing).
    pub fn check_points(&mut self, src: &mut Source) -> Result<u64, String> {
        let Some(core) = self.core.as_ref() else {
            return Ok(0);
        };
        let points = core.applier().journal().points().to_vec();
        let disk = self.fs.contents(&disk_path()).expect("disk exists");
        let armed = self.fs.armed();
        self.fs.disarm_crash();
        self.fs.set_faults(SimFaults {
            eio_per_million: 0,
            ..self.faults
        });
        let result = (|| {
            for p in &points {
                if p.kind == PointKind::AppConsistent {
                    match src.items.get(p.lsn as usize - 1) {
                        Some(Item::Bookmark { tag, .. }) if *tag == p.tag => {}
                        other => {
                            return Err(format!(
                            "point {} (lsn {}, tag {:?}) is not the source's bookmark: {other:?}",
                            p.id, p.lsn, p.tag
                        ))
                        }
                    }
                }
                let journal = self.core.as_ref().expect("running").applier().journal();
                let image = export(journal, &disk, p.lsn)
                    .map_err(|e| format!("point {} (lsn {}) {e}", p.id, p.lsn))?;
                if image != src.image_at(p.lsn) {
                    return Err(format!(
                        "point {} (lsn {}) exports something else than the source at that lsn",
                        p.id, p.lsn
                    ));
                }
            }
            Ok(points.len() as u64)
        })();
        self.fs.set_faults(self.faults);
        if let Some(n) = armed {
            self.fs.arm_crash(n);
        }
        result
    }
}

/// Opens a disk (`disk`: its image, its journal's directory, its id) and recovers its
/// journal, as the master target starts. `Ok(None)`: an injected fault stopped it (try
/// again later).
pub fn open_core(
    fs: &SimFs,
    disk: (&Path, &Path, u64),
    policy: RetentionPolicy,
    segment_bytes: u64,
) -> Result<Option<DiskCore>, String> {
    let (image, journal, disk_id) = disk;
    let shared: Arc<dyn FileSystem> = Arc::new(fs.clone());
    let opened = shared
        .open(image, OpenMode::ReadWrite)
        .map_err(|source| master_target::Error::Io {
            context: "open the disk".into(),
            source,
        })
        .and_then(|h| DiskFile::from_handle(h, image))
        .and_then(|file| {
            let j = Journal::open_in(Arc::clone(&shared), journal, &file)?
                .with_segment_target_bytes(segment_bytes);
            Ok(Applier::new(disk_id, file, j, policy))
        });
    match opened {
        Ok(_) if fs.crashed() => Ok(None),
        Ok(applier) => Ok(Some(DiskCore::new(applier))),
        Err(e) if fs.crashed() || injected(&e.to_string()) => Ok(None),
        Err(e) => Err(format!("master target recovery failed: {e}")),
    }
}

/// The disk `disk` (its current image) as it was at `lsn`, rewound through `journal`, as an
/// export writes it.
pub fn export(journal: &Journal, disk: &[u8], lsn: u64) -> Result<Vec<u8>, String> {
    let out = MemFile(std::sync::Mutex::new(disk.to_vec()));
    journal
        .rewind(lsn, &out, &mut |_, _| {})
        .map_err(|e| format!("does not export: {e}"))?;
    Ok(out.0.into_inner().expect("not poisoned"))
}

/// Whether an error came from a fault the simulator injected.
pub fn injected(e: &str) -> bool {
    e.contains("simulated crash") || e.contains("os error 5") || e.contains("os error 28")
}
