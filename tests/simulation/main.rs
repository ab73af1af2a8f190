//! Deterministic simulation of the master target's apply core under a hostile disk.
//!
//! One seed decides everything: the stream a process server sends (batches, bookmarks,
//! resends after a reset, gaps), when the machine crashes (at any file operation, with
//! unsynced writes lost or torn), when the process is killed (page cache kept), when
//! operations fail with EIO and when the volume is full. At every step it checks:
//! - **an acknowledged write is never lost**: after any crash the journal's committed LSN
//!   is at least the highest LSN ever acknowledged;
//! - **the disk equals the source at its committed LSN** (blake3 of the whole image);
//! - **every recovery point exports exactly**: rewinding a copy of the disk to each point
//!   gives the source at the point's LSN, and an app-consistent point carries the tag of
//!   the bookmark at that LSN;
//! - **no livelock**: once faults stop, everything sent is acknowledged within a bounded
//!   number of steps.
//!
//! `SIM_SEEDS=N` runs seeds 0..N (default: about a minute's worth on the CI machine),
//! `SIM_SEED=S` replays one seed. A failure prints its seed and the replay command.
//! What the simulator drives is `master_target::core::DiskCore` with the journal and the
//! disk on `store::SimFs`: the same code the service runs, with the real file system.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use master_target::apply::{Applier, RetentionPolicy};
use master_target::core::{Applied, DiskCore, Work};
use master_target::disk::DiskFile;
use master_target::journal::{Journal, PointKind};
use store::{FileHandle, FileSystem, OpenMode, SimFaults, SimFs};
use wire_protocol::{Bookmark, BookmarkKind, Message, Write, WriteBatch};

const DISK_BYTES: usize = 128 << 10;
const DISK_ID: u64 = 7;
/// Steps with faults, then at most this many more without, for everything to be acked.
const FAULT_STEPS: u32 = 250;
const CALM_STEPS: u32 = 2_000;

fn disk_path() -> PathBuf {
    PathBuf::from("/ds/vm1-flat.vmdk")
}
fn journal_dir() -> PathBuf {
    PathBuf::from("/ret/disk-7")
}

/// One item of the source's stream (LSN = index + 1).
#[derive(Debug, Clone)]
enum Item {
    Write {
        offset: u64,
        data: Bytes,
        time_us: u64,
    },
    Bookmark {
        tag: String,
        time_us: u64,
    },
}

/// The source: the stream and the disk image at any LSN.
struct Source {
    items: Vec<Item>,
    /// (lsn, image) of the last image asked for, to move forward from.
    cached: (u64, Vec<u8>),
}

impl Source {
    fn image_at(&mut self, lsn: u64) -> Vec<u8> {
        if lsn < self.cached.0 {
            self.cached = (0, vec![0; DISK_BYTES]);
        }
        let (from, img) = &mut self.cached;
        for item in &self.items[*from as usize..lsn as usize] {
            if let Item::Write { offset, data, .. } = item {
                img[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            }
        }
        *from = lsn;
        img.clone()
    }
}

/// An export target in memory.
#[derive(Debug)]
struct MemFile(std::sync::Mutex<Vec<u8>>);

impl FileHandle for MemFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let d = self.0.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_all_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let mut d = self.0.lock().unwrap();
        d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.0.lock().unwrap().len() as u64)
    }
    fn set_len(&self, _: u64) -> std::io::Result<()> {
        unreachable!("exports never resize")
    }
    fn sync_data(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn sync_all(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn drop_cache(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a run did, summed over seeds for the report.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    steps: u64,
    sim_us: u64,
    crashes: u64,
    kills: u64,
    eio: u64,
    enospc: u64,
    torn: u64,
    lost_unsynced: u64,
    resets: u64,
    acked_lsn: u64,
    points_checked: u64,
}

struct Sim {
    seed: u64,
    rng: fastrand::Rng,
    fs: SimFs,
    faults: SimFaults,
    core: Option<DiskCore>,
    src: Source,
    /// Highest LSN acknowledged to the sender.
    acked: u64,
    /// Next LSN the sender sends on its connection.
    send_from: u64,
    /// The connection's number: answers to an older one are lost with it.
    conn: u64,
    /// A group waiting for room on a full volume.
    held: Option<master_target::core::Group<u64>>,
    now_us: u64,
    policy: RetentionPolicy,
    segment_bytes: u64,
    tally: Tally,
    /// `SIM_TRACE=1`: print every event (with `SIM_SEED`, to see how a seed fails).
    trace: bool,
}

macro_rules! trace {
    ($sim:expr, $($arg:tt)*) => {
        if $sim.trace {
            eprintln!("[{} ops {}] {}", $sim.tally.steps, $sim.fs.stats().ops, format!($($arg)*));
        }
    };
}

type Check = Result<(), String>;

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = fastrand::Rng::with_seed(seed);
        let fs = SimFs::new(seed ^ 0x5eed);
        fs.put(&disk_path(), &vec![0u8; DISK_BYTES]);
        fs.create_dir_all(Path::new("/ret")).unwrap();
        let faults = SimFaults {
            eio_per_million: [0, 0, 2_000, 10_000][rng.usize(..4)],
            capacity_bytes: DISK_BYTES as u64 + rng.u64(96 << 10..2 << 20),
            tear_per_million: 300_000,
        };
        let mut src = Source {
            items: Vec::new(),
            cached: (0, vec![0; DISK_BYTES]),
        };
        let mut t = 1_000_000_000u64;
        for i in 0..rng.usize(150..500) {
            t += rng.u64(..200_000);
            if rng.u32(..12) == 0 {
                src.items.push(Item::Bookmark {
                    tag: format!("app-{i}"),
                    time_us: t,
                });
            } else {
                let len = rng.usize(1..=16) * 512;
                let offset = rng.usize(..=(DISK_BYTES - len) / 512) * 512;
                let fill = rng.u8(..);
                let mut data = vec![fill; len];
                data[0] = rng.u8(..);
                src.items.push(Item::Write {
                    offset: offset as u64,
                    data: Bytes::from(data),
                    time_us: t,
                });
            }
        }
        let policy = RetentionPolicy {
            crash_point_interval_us: rng.u64(500_000..3_000_000),
            window_us: rng.u64(5_000_000..60_000_000),
            quota_bytes: rng.u64(64 << 10..1 << 20),
        };
        Sim {
            seed,
            rng,
            fs,
            faults,
            core: None,
            src,
            acked: 0,
            send_from: 1,
            conn: 0,
            held: None,
            now_us: 0,
            policy,
            segment_bytes: [8 << 10, 32 << 10, 1 << 20][(seed % 3) as usize],
            tally: Tally::default(),
            trace: std::env::var("SIM_TRACE").is_ok(),
        }
    }

    fn last_lsn(&self) -> u64 {
        self.src.items.len() as u64
    }

    /// Starts the master target's disk: opens it, recovers the journal, and checks what
    /// recovery found against the source.
    fn start(&mut self) -> Check {
        if self.trace {
            for (p, len, _) in self.fs.files() {
                if let Some(c) = self.fs.contents(&p).filter(|_| p.starts_with("/ret")) {
                    eprintln!(
                        "  {} len {len} head {:02x?}",
                        p.display(),
                        &c[..c.len().min(20)]
                    );
                }
            }
        }
        let fs: Arc<dyn FileSystem> = Arc::new(self.fs.clone());
        let opened = fs
            .open(&disk_path(), OpenMode::ReadWrite)
            .map_err(|source| master_target::Error::Io {
                context: "open the disk".into(),
                source,
            })
            .and_then(|h| DiskFile::from_handle(h, &disk_path()))
            .and_then(|disk| {
                let j = Journal::open_in(Arc::clone(&fs), &journal_dir(), &disk)?
                    .with_segment_target_bytes(self.segment_bytes);
                Ok(Applier::new(DISK_ID, disk, j, self.policy))
            });
        trace!(
            self,
            "start: {:?}",
            opened.as_ref().map(|a| a.committed_lsn())
        );
        match opened {
            Ok(applier) => {
                if self.fs.crashed() {
                    return Ok(()); // dead before it could serve: the next step restarts it
                }
                // The process server takes the committed LSN at attach as durable (it
                // deletes its cache up to there): for the sender it is an ack.
                self.acked = self.acked.max(applier.committed_lsn());
                self.core = Some(DiskCore::new(applier));
                self.conn += 1;
                self.send_from = self.acked + 1;
                self.check_state("after recovery")?;
                self.check_points()
            }
            Err(e) if self.fs.crashed() || is_injected(&e) => Ok(()),
            Err(e) => Err(format!("recovery failed: {e}")),
        }
    }

    /// The committed state: nothing acknowledged lost, disk = source at the committed LSN.
    fn check_state(&mut self, when: &str) -> Check {
        let core = self.core.as_ref().expect("running");
        let committed = core.applier().committed_lsn();
        if committed < self.acked {
            return Err(format!(
                "{when}: acknowledged lsn {} lost: the journal says {committed}",
                self.acked
            ));
        }
        let disk = self.fs.contents(&disk_path()).expect("disk exists");
        let want = self.src.image_at(committed);
        if blake3::hash(&disk) != blake3::hash(&want) {
            let at = disk
                .iter()
                .zip(&want)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            if self.trace {
                for l in 0..=committed {
                    if self.src.image_at(l) == disk {
                        eprintln!("the disk is the source at lsn {l}");
                    }
                }
            }
            return Err(format!(
                "{when}: disk differs from the source at committed lsn {committed} (first at byte {at})"
            ));
        }
        Ok(())
    }

    /// Every listed point exports to the source at its LSN (with faults paused: an export
    /// reading through an injected EIO proves nothing).
    fn check_points(&mut self) -> Check {
        let core = self.core.as_ref().expect("running");
        let points = core.applier().journal().points().to_vec();
        let disk = self.fs.contents(&disk_path()).expect("disk exists");
        self.fs.set_faults(SimFaults {
            eio_per_million: 0,
            ..self.faults
        });
        // An export is another process: the service's armed crash waits for the service.
        let armed = self.fs.armed();
        self.fs.disarm_crash();
        for p in points {
            if p.kind == PointKind::AppConsistent {
                match self.src.items.get(p.lsn as usize - 1) {
                    Some(Item::Bookmark { tag, .. }) if *tag == p.tag => {}
                    other => {
                        return Err(format!(
                            "point {} (lsn {}, tag {:?}) is not the source's bookmark: {other:?}",
                            p.id, p.lsn, p.tag
                        ))
                    }
                }
            }
            let out = MemFile(std::sync::Mutex::new(disk.clone()));
            let core = self.core.as_ref().expect("running");
            if let Err(e) = core.applier().journal().rewind(p.lsn, &out, &mut |_, _| {}) {
                return Err(format!(
                    "point {} (lsn {}) does not export: {e}",
                    p.id, p.lsn
                ));
            }
            let got = out.0.into_inner().unwrap();
            if got != self.src.image_at(p.lsn) {
                return Err(format!(
                    "point {} (lsn {}) exports something else than the source at that lsn",
                    p.id, p.lsn
                ));
            }
            self.tally.points_checked += 1;
        }
        self.fs.set_faults(self.faults);
        if let Some(n) = armed {
            self.fs.arm_crash(n);
        }
        Ok(())
    }

    /// The requests the sender puts on its connection this step.
    fn requests(&mut self) -> Vec<Work<u64>> {
        let mut works = Vec::new();
        for _ in 0..self.rng.usize(1..=4) {
            if self.send_from > self.last_lsn() {
                break;
            }
            // Now and then a request from the wrong place: a stale resend or a gap.
            let from = match self.rng.u32(..40) {
                0 => self.acked.saturating_sub(self.rng.u64(..5)).max(1),
                1 => self.send_from + self.rng.u64(1..4),
                _ => self.send_from,
            };
            let Some(item) = self.src.items.get(from as usize - 1).cloned() else {
                break;
            };
            let w = match item {
                Item::Bookmark { tag, time_us } => Work::Bookmark(
                    Bookmark {
                        disk_id: DISK_ID,
                        lsn: from,
                        kind: BookmarkKind::AppConsistent,
                        time_us,
                        group_marker: 0,
                        tag,
                    },
                    self.conn,
                ),
                Item::Write { .. } => {
                    let mut writes = Vec::new();
                    let mut lsn = from;
                    while writes.len() < self.rng.usize(1..=8) {
                        match self.src.items.get(lsn as usize - 1) {
                            Some(Item::Write {
                                offset,
                                data,
                                time_us,
                            }) => writes.push(Write {
                                timestamp_us: *time_us,
                                offset: *offset,
                                digest: wire_protocol::digest(data),
                                data: data.clone(),
                            }),
                            _ => break,
                        }
                        lsn += 1;
                    }
                    Work::Batch(
                        WriteBatch {
                            disk_id: DISK_ID,
                            first_lsn: from,
                            writes,
                        },
                        self.conn,
                    )
                }
            };
            let end = match &w {
                Work::Batch(b, _) => b.last_lsn() + 1,
                _ => from + 1,
            };
            self.send_from = self.send_from.max(end);
            works.push(w);
        }
        works
    }

    /// The sender hears an answer on connection `conn`.
    fn hear(&mut self, conn: u64, msg: Message) -> Check {
        if conn != self.conn {
            return Ok(()); // that connection is gone, and its answers with it
        }
        match msg {
            Message::Ack(a) => {
                let lsn = a.entries[0].durable_lsn;
                trace!(self, "ack {lsn}");
                let committed = self.core.as_ref().map(|c| c.applier().committed_lsn());
                if committed.is_some_and(|c| lsn > c) {
                    return Err(format!(
                        "acked lsn {lsn} beyond the committed {committed:?}"
                    ));
                }
                self.acked = self.acked.max(lsn);
                self.tally.acked_lsn = self.acked;
            }
            Message::Nack(n) => self.send_from = n.from_lsn,
            Message::Error(_) => {}
            other => return Err(format!("unexpected answer {other:?}")),
        }
        Ok(())
    }

    /// One step: maybe a fault, then the sender sends and the master target serves.
    fn step(&mut self, faulty: bool) -> Check {
        self.tally.steps += 1;
        self.now_us += self.rng.u64(100..20_000);
        if faulty {
            match self.rng.u32(..100) {
                0..=2 => {
                    let n = self.rng.u64(1..60);
                    trace!(self, "crash armed in {n} ops");
                    self.fs.arm_crash(n)
                }
                3 => {
                    trace!(self, "kill");
                    self.tally.kills += 1;
                    self.core = None; // SIGKILL: the page cache stays
                    self.held = None;
                }
                4..=5 => {
                    self.tally.resets += 1;
                    self.conn += 1;
                    self.send_from = self.acked + 1;
                }
                _ => {}
            }
        }
        if self.core.is_none() {
            self.start()?;
        } else {
            self.serve()?;
        }
        if self.fs.crashed() {
            trace!(self, "crash");
            self.fs.crash();
            self.core = None;
            self.held = None;
        }
        Ok(())
    }

    /// The master target takes what the sender sent, applies it and answers.
    fn serve(&mut self) -> Check {
        let g = match self.held.take() {
            Some(g) => g,
            None => {
                let works = self.requests();
                if works.is_empty() {
                    return Ok(());
                }
                let conn = self.conn;
                let core = self.core.as_mut().expect("running");
                let mut g = core.check(works);
                core.take_refusals();
                for (_, msg) in std::mem::take(&mut g.replies) {
                    self.hear(conn, msg)?;
                }
                g
            }
        };
        let core = self.core.as_mut().expect("running");
        let r = core.apply(&g);
        trace!(
            self,
            "apply lsn {:?}..{:?}: {:?} (enospc so far {}, segments {:?})",
            g.items.first().map(|i| i.lsn()),
            g.items.last().map(|i| i.lsn()),
            r.as_ref().map(|a| matches!(a, Applied::Done(_))),
            self.fs.stats().enospc,
            self.fs.files()
        );
        let core = self.core.as_mut().expect("running");
        match r {
            Ok(Applied::Done(_)) => {
                let answers = core.finish(g, |a, b| a == b);
                for (conn, msg) in answers {
                    self.hear(conn, msg)?;
                }
                if !self.fs.crashed() {
                    self.check_state("after a group")?;
                }
            }
            Ok(Applied::Full(_)) => self.held = Some(g),
            Err(e) => {
                // The disk stops; the operator restarts the master target.
                for (conn, msg) in DiskCore::fail(g, &e) {
                    self.hear(conn, msg)?;
                }
                if !self.fs.crashed() && !is_injected(&e) && !master_target::core::out_of_space(&e)
                {
                    return Err(format!("apply failed without an injected fault: {e}"));
                }
                self.core = None;
            }
        }
        Ok(())
    }

    fn run(&mut self) -> Check {
        self.fs.set_faults(self.faults);
        for _ in 0..FAULT_STEPS {
            self.step(true)?;
        }
        self.faults = SimFaults::NONE;
        self.fs.set_faults(SimFaults::NONE);
        self.fs.disarm_crash();
        for _ in 0..CALM_STEPS {
            if self.acked == self.last_lsn() {
                break;
            }
            self.step(false)?;
        }
        if self.acked != self.last_lsn() {
            return Err(format!(
                "livelock: {CALM_STEPS} steps without faults and only lsn {} of {} acknowledged",
                self.acked,
                self.last_lsn()
            ));
        }
        // A last restart: what recovery finds must still hold everything acknowledged.
        trace!(self, "final crash; files before: {:?}", self.fs.files());
        self.fs.crash();
        trace!(self, "files after: {:?}", self.fs.files());
        self.core = None;
        self.start()?;
        if self.core.is_none() {
            return Err("the master target does not start without faults".into());
        }
        self.check_state("at the end")?;
        self.check_points()?;
        let st = self.fs.stats();
        self.tally.crashes = st.crashes;
        self.tally.eio = st.eio;
        self.tally.enospc = st.enospc;
        self.tally.torn = st.writes_torn;
        self.tally.lost_unsynced = st.writes_lost;
        self.tally.sim_us = self.now_us;
        Ok(())
    }
}

fn is_injected(e: &master_target::Error) -> bool {
    let s = format!("{e:?} {e}");
    s.contains("simulated crash") || s.contains("code: 5,") || s.contains("os error 5")
}

fn run_seed(seed: u64) -> Result<Tally, String> {
    let mut sim = Sim::new(seed);
    sim.run().map(|()| sim.tally).map_err(|e| {
        format!(
            "seed {}: {e}\n  replay: SIM_SEED={} cargo test --release --test simulation -- --nocapture",
            sim.seed, sim.seed
        )
    })
}

#[test]
fn seeds() {
    if let Ok(s) = std::env::var("SIM_SEED") {
        let seed: u64 = s.parse().expect("SIM_SEED is a number");
        let t = run_seed(seed).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("seed {seed}: {t:?}");
        return;
    }
    let n: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000);
    let mut sum = Tally::default();
    let mut failures = Vec::new();
    for seed in 0..n {
        match run_seed(seed) {
            Ok(t) => {
                sum.steps += t.steps;
                sum.sim_us += t.sim_us;
                sum.crashes += t.crashes;
                sum.kills += t.kills;
                sum.eio += t.eio;
                sum.enospc += t.enospc;
                sum.torn += t.torn;
                sum.lost_unsynced += t.lost_unsynced;
                sum.resets += t.resets;
                sum.acked_lsn += t.acked_lsn;
                sum.points_checked += t.points_checked;
            }
            Err(e) => failures.push(e),
        }
    }
    eprintln!(
        "{n} seeds: {} steps, {:.1} simulated hours, {} crashes, {} kills, {} EIO, {} ENOSPC, {} torn and {} lost unsynced writes, {} connection resets, {} items acknowledged, {} point exports checked; {} failed",
        sum.steps,
        sum.sim_us as f64 / 3.6e9,
        sum.crashes,
        sum.kills,
        sum.eio,
        sum.enospc,
        sum.torn,
        sum.lost_unsynced,
        sum.resets,
        sum.acked_lsn,
        sum.points_checked,
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
