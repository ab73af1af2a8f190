//! Deterministic simulation of replication: agent → process server → master target.
//!
//! One seed decides everything, in one thread: the stream a VM writes (writes and
//! app-consistent bookmarks), what the agent sends and resends, when either machine loses
//! power (at any file operation: unsynced writes lost or torn, unsynced names forgotten),
//! when either service is killed (its page cache kept), when operations fail with EIO, when
//! volumes are full, and when the agent's connection or the link between the process server
//! and the master target resets. What runs is the real code on `store::SimFs`: the process
//! server's cache (`process_server::cache::DiskCache`) and the master target's apply core
//! and journal (`master_target::core::DiskCore`); the rules of the services' network shells
//! (resume points, group commit, attach, trim) are replayed here, step by step. At every
//! step it checks:
//! - **nothing acknowledged is lost**: what the process server acknowledged to the agent is
//!   in its cache or durable on the master target after any crash; what the master target
//!   acknowledged (or reported at attach) is in its journal after any crash; no range is
//!   ever found lost (nothing at rest is damaged here, so a lost range is lost data);
//! - **the disk equals the source at the committed LSN** (blake3 of the whole image);
//! - **every recovery point exports exactly**, and an app-consistent point carries its
//!   bookmark's tag;
//! - **no livelock**: once faults stop, the whole stream is durable on-premises within a
//!   bounded number of steps.
//!
//! `SIM_SEEDS=N` runs N seeds (default 2,000, about a minute here) from `SIM_FIRST_SEED`
//! (default 0), `SIM_SEED=S` replays one seed and `SIM_TRACE=1` prints its events. A failure prints its seed and the command.

mod model;
mod mt;
mod ps;

use master_target::core::Work;
use wire_protocol::Message;

use model::{span, Source, Tally};
use mt::Mt;
use ps::{Ingest, Ps};

/// Steps with faults, then at most this many without, for everything to be durable.
const FAULT_STEPS: u32 = 300;
const CALM_STEPS: u32 = 3_000;

struct Sim {
    seed: u64,
    rng: fastrand::Rng,
    src: Source,
    mt: Mt,
    ps: Ps,
    /// Highest LSN the process server acknowledged to the agent.
    agent_acked: u64,
    /// Next LSN the agent sends; `None` while it has no connection that told it where.
    agent_from: Option<u64>,
    /// Highest LSN the master target acknowledged (or reported at attach).
    mt_acked: u64,
    /// The link's connection number while attached.
    link: Option<u64>,
    conns: u64,
    /// Next LSN the uplink ships.
    cursor: u64,
    tally: Tally,
    trace: bool,
}

type Check = Result<(), String>;

macro_rules! trace {
    ($sim:expr, $($arg:tt)*) => {
        if $sim.trace {
            eprintln!("[{}] {}", $sim.tally.steps, format!($($arg)*));
        }
    };
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = fastrand::Rng::with_seed(seed);
        let src = Source::generate(&mut rng);
        let mt = Mt::new(seed, &mut rng);
        let ps = Ps::new(seed, &mut rng);
        Sim {
            seed,
            rng,
            src,
            mt,
            ps,
            agent_acked: 0,
            agent_from: None,
            mt_acked: 0,
            link: None,
            conns: 0,
            cursor: 1,
            tally: Tally::default(),
            trace: std::env::var("SIM_TRACE").is_ok(),
        }
    }

    /// Maybe a fault, before the step's work.
    fn fault(&mut self) {
        match self.rng.u32(..100) {
            0..=1 => {
                let n = self.rng.u64(1..60);
                trace!(self, "master target crash armed in {n} ops");
                self.mt.fs.arm_crash(n);
            }
            2..=3 => {
                let n = self.rng.u64(1..60);
                trace!(self, "process server crash armed in {n} ops");
                self.ps.fs.arm_crash(n);
            }
            4 => {
                trace!(self, "master target killed");
                self.tally.kills += 1;
                self.mt.core = None;
                self.mt.held = None;
                self.link = None;
            }
            5 => {
                trace!(self, "process server killed");
                self.tally.kills += 1;
                self.ps.cache = None;
                self.link = None;
                self.agent_from = None;
            }
            6..=7 => {
                trace!(self, "link reset");
                self.tally.resets += 1;
                self.link = None;
            }
            8 => {
                trace!(self, "agent connection reset");
                self.tally.resets += 1;
                self.agent_from = None;
            }
            _ => {}
        }
    }

    /// Starts what is down and checks what recovery found.
    fn start(&mut self) -> Check {
        if self.trace && self.ps.cache.is_none() {
            let files = self.ps.fs.files();
            let acked = self
                .ps
                .fs
                .contents(std::path::Path::new("/cache/disk-7/acked-lsn"))
                .map(|b| String::from_utf8_lossy(&b).into_owned());
            trace!(
                self,
                "process server starting: files {files:?}, acked-lsn {acked:?}"
            );
        }
        if self.ps.cache.is_none() && self.ps.start()? {
            let resume = self.ps.resume_lsn();
            trace!(self, "process server up, resume {resume:?}");
            match resume {
                Some(l) if l < self.agent_acked => {
                    return Err(format!(
                        "lsn {} acknowledged to the agent lost: the cache resumes at {l}",
                        self.agent_acked
                    ))
                }
                None if self.mt_acked < self.agent_acked => {
                    return Err(format!(
                        "the cache lost its position with lsn {}..={} acknowledged and not yet on-premises",
                        self.mt_acked + 1,
                        self.agent_acked
                    ))
                }
                _ => {}
            }
        }
        if self.mt.core.is_none() {
            if let Some(lsn) = self.mt.start()? {
                trace!(self, "master target up at lsn {lsn}");
                self.mt
                    .check_state(&mut self.src, self.mt_acked, "after recovery")?;
                self.tally.points_checked += self.mt.check_points(&mut self.src)?;
            }
        }
        Ok(())
    }

    /// The process server (re)connects to the master target and attaches the disk.
    fn attach(&mut self) -> Check {
        let Some(lsn) = self.mt.committed() else {
            return Ok(());
        };
        if self.ps.cache.is_none() || self.link.is_some() {
            return Ok(());
        }
        // The process server deletes its cache up to what the master target reports.
        self.mt_acked = self.mt_acked.max(lsn);
        if self.ps.attached(lsn)? {
            self.conns += 1;
            self.link = Some(self.conns);
            self.cursor = lsn + 1;
            trace!(self, "attached at lsn {lsn}");
        }
        Ok(())
    }

    /// The agent sends what it has, and the process server acknowledges what it synced.
    fn ingest(&mut self, faulty: bool) {
        if self.ps.cache.is_none() {
            return;
        }
        let from = match self.agent_from {
            Some(f) => f,
            None => match self.ps.resume_lsn() {
                Some(l) => {
                    // The agent drops what it holds up to the resume point: an ack.
                    self.agent_acked = self.agent_acked.max(l);
                    l + 1
                }
                None => return, // NotReady until the master target says
            },
        };
        // Now and then a stale resend, as after a lost ack.
        let mut next = if self.rng.u32(..30) == 0 {
            from.saturating_sub(self.rng.u64(..4)).max(1)
        } else {
            from
        };
        let mut sent = false;
        for _ in 0..self.rng.usize(1..=3) {
            let Some(msg) = self.src.message(next, self.rng.usize(1..=8)) else {
                break;
            };
            match self.ps.ingest(&msg) {
                Ingest::Appended | Ingest::Held => next = span(&msg).1 + 1,
                Ingest::Gap(n) => next = n,
                Ingest::NotReady | Ingest::Failed => break,
            }
            sent = true;
        }
        self.agent_from = Some(next);
        if !sent {
            return;
        }
        if faulty && self.rng.u32(..25) == 0 {
            // Killed between the appends and their group commit (page cache kept).
            trace!(self, "process server killed before its group commit");
            self.tally.kills += 1;
            self.ps.cache = None;
            self.link = None;
            self.agent_from = None;
            return;
        }
        match self.ps.sync() {
            Some(lsn) if !self.ps.fs.crashed() => {
                trace!(self, "process server acked lsn {lsn} to the agent");
                self.agent_acked = self.agent_acked.max(lsn);
            }
            // Not acknowledged: the agent sends again after what was.
            _ => self.agent_from = None,
        }
    }

    /// The uplink ships from its cursor and hears the master target's answers.
    fn ship(&mut self) -> Check {
        let (Some(conn), Some(_)) = (self.link, self.mt.core.as_ref()) else {
            return Ok(());
        };
        if self.ps.cache.is_none() {
            return Ok(());
        }
        let msgs = self.ps.read_from(self.cursor, self.rng.usize(1..=4))?;
        let mut works = Vec::new();
        for m in msgs {
            self.cursor = span(&m).1 + 1;
            works.push(match m {
                Message::WriteBatch(b) => Work::Batch(b, conn),
                Message::Bookmark(b) => Work::Bookmark(b, conn),
                other => return Err(format!("the cache held {other:?}")),
            });
        }
        if works.is_empty() && self.mt.held.is_none() {
            return Ok(());
        }
        let answers = self.mt.serve(works, conn)?;
        if self.mt.fs.crashed() || self.mt.core.is_none() {
            self.link = None;
            return Ok(());
        }
        for a in answers {
            match a {
                Message::Ack(a) => {
                    let lsn = a.entries[0].durable_lsn;
                    let committed = self.mt.committed().unwrap_or(0);
                    if lsn > committed {
                        return Err(format!("acked lsn {lsn} beyond the committed {committed}"));
                    }
                    trace!(self, "master target acked lsn {lsn}");
                    self.mt_acked = self.mt_acked.max(lsn);
                    if !self.ps.durable(lsn) {
                        self.link = None; // the uplink's error ends the session
                    }
                }
                Message::Nack(n) => self.cursor = n.from_lsn,
                Message::Error(_) => self.link = None,
                other => return Err(format!("unexpected answer {other:?}")),
            }
        }
        Ok(())
    }

    /// Power losses that were armed and happened.
    fn crashes(&mut self) {
        if self.mt.fs.crashed() {
            trace!(self, "master target machine lost power");
            self.mt.fs.crash();
            self.mt.core = None;
            self.mt.held = None;
            self.link = None;
        }
        if self.ps.fs.crashed() {
            trace!(self, "process server machine lost power");
            self.ps.fs.crash();
            self.ps.cache = None;
            self.link = None;
            self.agent_from = None;
        }
    }

    fn step(&mut self, faulty: bool) -> Check {
        self.tally.steps += 1;
        self.tally.sim_us += self.rng.u64(100..20_000);
        if faulty {
            self.fault();
        }
        self.start()?;
        self.crashes();
        self.attach()?;
        self.ingest(faulty);
        self.crashes();
        self.ship()?;
        self.crashes();
        if let Some(c) = self.mt.committed() {
            if c < self.mt_acked {
                return Err(format!(
                    "master target at {c} below its ack {}",
                    self.mt_acked
                ));
            }
        }
        Ok(())
    }

    fn calm(&mut self) {
        self.mt.faults = store::SimFaults::NONE;
        self.ps.faults = store::SimFaults::NONE;
        for fs in [&self.mt.fs, &self.ps.fs] {
            fs.set_faults(store::SimFaults::NONE);
            fs.disarm_crash();
        }
    }

    fn run(&mut self) -> Check {
        self.mt.fs.set_faults(self.mt.faults);
        self.ps.fs.set_faults(self.ps.faults);
        for _ in 0..FAULT_STEPS {
            self.step(true)?;
        }
        self.calm();
        let last = self.src.last_lsn();
        for _ in 0..CALM_STEPS {
            if self.mt.committed() == Some(last) {
                break;
            }
            self.step(false)?;
        }
        if self.mt.committed() != Some(last) {
            return Err(format!(
                "livelock: {CALM_STEPS} steps without faults and the master target holds {:?} of {last} (the agent was acked {})",
                self.mt.committed(),
                self.agent_acked
            ));
        }
        // A last power loss on both sides: recovery must still hold everything.
        self.mt.fs.crash();
        self.ps.fs.crash();
        self.mt.core = None;
        self.ps.cache = None;
        self.start()?;
        if self.mt.core.is_none() || self.ps.cache.is_none() {
            return Err("the services do not start without faults".into());
        }
        self.mt.check_state(&mut self.src, last, "at the end")?;
        self.tally.points_checked += self.mt.check_points(&mut self.src)?;
        self.tally.acked_lsn = self.mt_acked;
        self.tally.add_fs(self.mt.fs.stats());
        self.tally.add_fs(self.ps.fs.stats());
        Ok(())
    }
}

fn run_seed(seed: u64) -> Result<Tally, String> {
    let mut sim = Sim::new(seed);
    sim.run().map(|()| sim.tally).map_err(|e| {
        format!(
            "seed {}: {e}\n  replay: SIM_SEED={} SIM_TRACE=1 cargo test --release --test simulation -- --nocapture",
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
    let first: u64 = std::env::var("SIM_FIRST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut sum = Tally::default();
    let mut failures = Vec::new();
    for seed in first..first + n {
        match run_seed(seed) {
            Ok(t) => sum.add(&t),
            Err(e) => failures.push(e),
        }
    }
    eprintln!(
        "{n} seeds: {} steps, {:.1} simulated hours, {} power losses, {} kills, {} EIO, {} ENOSPC, {} torn and {} lost unsynced writes, {} connection resets, {} LSNs acknowledged on-premises, {} point exports checked; {} failed",
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
