//! Deterministic simulation of replication: agent → process server → master target.
//!
//! One seed decides everything, in one thread: the stream a VM writes (writes and
//! app-consistent bookmarks), what the agent sends and resends, when either machine loses
//! power (at any file operation: unsynced writes lost or torn, unsynced names forgotten),
//! when either service is killed (its page cache kept), when operations fail with EIO, when
//! volumes are full, and how the simulated connections (agent → process server → master
//! target) delay, reset and partition. What runs is the real code, on `store::SimFs`: the
//! agent's resend window (`agent::stream::Window`), the process server's cache
//! (`process_server::cache::DiskCache`) and uplink shipping state
//! (`process_server::shipper::Shipper`), and the master target's apply core and journal
//! (`master_target::core::DiskCore`); the rules of the services' tokio shells (resume
//! points, group commit, closing after a cache failure, attach, trim) are replayed here,
//! step by step. It checks:
//! - at every step, **nothing acknowledged is lost**: what the process server acknowledged to the agent is
//!   in its cache or durable on the master target after any crash; what the master target
//!   acknowledged (or reported at attach) is in its journal after any crash; no range is
//!   ever found lost (nothing at rest is damaged here, so a lost range is lost data);
//! - after every recovery of the master target and at the end, **the disk equals the source
//!   at the committed LSN** (blake3 of the whole image), and **every recovery point exports
//!   exactly**, an app-consistent point carrying its bookmark's tag;
//! - **no livelock**: once faults stop, the whole stream is durable on-premises within a
//!   bounded number of steps.
//!
//! A replication group's cuts run in a simulation of their own (`group.rs`: two VMs with a
//! causal workload, the real cut rules of both sides and the master target's group points).
//!
//! `SIM_SEEDS=N` runs N seeds (default 2,000, about a minute here) from `SIM_FIRST_SEED`
//! (default 0), `SIM_SEED=S` replays one seed alone and `SIM_TRACE=1` prints its events (with
//! `-- --nocapture`). A failure, a panic included, prints its seed and the command.

mod agent_side;
mod group;
mod member;
mod model;
mod mt;
mod net;
mod ps;

use master_target::core::Work;
use process_server::shipper::{Nacked, Shipper};
use wire_protocol::{ErrorCode, Message};

use agent_side::{Agent, ToAgent, ToPs};
use model::{span, Source, Tally, DISK_ID};
use mt::Mt;
use net::Conn;
use ps::{Ingest, Ps};

/// Steps with faults, then at most this many without, for everything to be durable.
const FAULT_STEPS: u32 = 300;
const CALM_STEPS: u32 = 3_000;
/// The longest a message takes on a connection, in steps.
const MAX_DELAY_STEPS: u64 = 3;

struct Sim {
    rng: fastrand::Rng,
    src: Source,
    mt: Mt,
    ps: Ps,
    agent: Agent,
    /// Highest LSN the process server acknowledged to the agent (when it said so).
    agent_acked: u64,
    /// Highest LSN the master target acknowledged (or reported at attach).
    mt_acked: u64,
    /// The uplink's connection to the master target, while attached.
    link: Option<Conn<Message, Message>>,
    /// The uplink's shipping state (the process server's real `Shipper`).
    shipper: Shipper,
    /// The uplink's in-flight window.
    window_bytes: u64,
    conns: u64,
    /// The agent connection the process server closed (it reads no more of it).
    closed_conn: Option<u64>,
    /// Partitions: no connection is made before these steps.
    agent_cut_until: u64,
    link_cut_until: u64,
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
        let agent = Agent::new(&mut rng);
        let window_bytes = rng.u64(4 << 10..256 << 10);
        Sim {
            rng,
            src,
            mt,
            ps,
            agent,
            agent_acked: 0,
            mt_acked: 0,
            link: None,
            shipper: Shipper::default(),
            window_bytes,
            conns: 0,
            closed_conn: None,
            agent_cut_until: 0,
            link_cut_until: 0,
            tally: Tally::default(),
            trace: std::env::var("SIM_TRACE").is_ok(),
        }
    }

    fn now(&self) -> u64 {
        self.tally.steps
    }

    fn delay(&mut self) -> u64 {
        self.rng.u64(..=MAX_DELAY_STEPS)
    }

    fn kill_ps(&mut self) {
        self.ps.cache = None;
        self.link = None;
        self.agent.drop_conn();
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
                self.kill_ps();
            }
            6..=7 => {
                trace!(self, "link reset");
                self.tally.resets += 1;
                self.link = None;
            }
            8 => {
                trace!(self, "agent connection reset");
                self.tally.resets += 1;
                self.agent.drop_conn();
            }
            9 => {
                // The agent's network is cut off: nothing connects for a while.
                let steps = self.rng.u64(5..60);
                trace!(self, "agent partitioned for {steps} steps");
                self.tally.partitions += 1;
                self.agent.drop_conn();
                self.agent_cut_until = self.now() + steps;
            }
            10 => {
                let steps = self.rng.u64(5..60);
                trace!(self, "link partitioned for {steps} steps");
                self.tally.partitions += 1;
                self.link = None;
                self.link_cut_until = self.now() + steps;
            }
            _ => {}
        }
    }

    /// Starts what is down and checks what recovery found.
    fn start(&mut self) -> Check {
        if self.trace && self.ps.cache.is_none() {
            let files = self.ps.fs.files();
            trace!(self, "process server starting: files {files:?}");
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
        if self.ps.cache.is_none() || self.link.is_some() || self.now() < self.link_cut_until {
            return Ok(());
        }
        // The process server deletes its cache up to what the master target reports.
        self.mt_acked = self.mt_acked.max(lsn);
        if self.ps.attached(lsn)? {
            self.conns += 1;
            self.link = Some(Conn::new(self.conns));
            self.shipper = Shipper::default();
            self.shipper.attached(DISK_ID, lsn);
            trace!(self, "attached at lsn {lsn}");
        }
        Ok(())
    }

    /// The agent connects when it has no connection, hears the process server, and
    /// captures more of the stream while its window has room.
    fn agent(&mut self) -> Check {
        let now = self.now();
        if self.agent.conn.is_none()
            && self.ps.cache.is_some()
            && now >= self.agent_cut_until
            && self.agent.wants_link(&self.src)
            && self.rng.u32(..3) == 0
        {
            self.conns += 1;
            let delay = self.delay();
            self.agent.connect(self.conns, now, delay);
        }
        self.agent.hear(now, &mut self.rng)?;
        let n = self.rng.usize(1..=3);
        self.agent.capture(&self.src, n, now, &mut self.rng);
        Ok(())
    }

    /// The process server reads what arrived from the agent and acknowledges what it
    /// synced (its ingest session's rules, over the real cache).
    fn ingest(&mut self, faulty: bool) {
        if self.ps.cache.is_none() {
            return;
        }
        let now = self.now();
        let mut sent = false;
        let mut failed = false;
        let mut answers = Vec::new();
        for _ in 0..self.rng.usize(1..=6) {
            let Some(c) = self.agent.conn.as_mut() else {
                return;
            };
            if self.closed_conn == Some(c.id) {
                return; // closed by the process server: it reads no more of it
            }
            let Some(m) = c.recv_up(now) else { break };
            let msg = match m {
                ToPs::Attach => {
                    answers.push(match self.ps.resume_lsn() {
                        Some(l) => {
                            // The agent drops what it holds up to the resume point: an ack.
                            self.agent_acked = self.agent_acked.max(l);
                            ToAgent::Resume(l)
                        }
                        None => ToAgent::NotReady,
                    });
                    continue;
                }
                ToPs::Data(msg) => msg,
            };
            match self.ps.ingest(&msg) {
                Ingest::Appended | Ingest::Held => sent = true,
                Ingest::Gap(n) => answers.push(ToAgent::Nack(n)),
                Ingest::NotReady => answers.push(ToAgent::Error),
                Ingest::Failed => {
                    answers.push(ToAgent::Error);
                    failed = true;
                }
                Ingest::Full => {
                    // The agent waits; what this burst appended is made durable first
                    // (only durable records ship, and only shipping makes room).
                    c.unread_up(now, ToPs::Data(msg));
                    sent = true;
                    break;
                }
            }
        }
        if sent && faulty && self.rng.u32(..25) == 0 {
            // Killed between the appends and their group commit (page cache kept).
            trace!(self, "process server killed before its group commit");
            self.tally.kills += 1;
            self.kill_ps();
            return;
        }
        if sent {
            match self.ps.sync() {
                Some(lsn) if !self.ps.fs.crashed() => {
                    trace!(self, "process server acks lsn {lsn} to the agent");
                    self.agent_acked = self.agent_acked.max(lsn);
                    answers.insert(0, ToAgent::Ack(lsn));
                }
                _ => {
                    answers.push(ToAgent::Error);
                    failed = true;
                }
            }
        }
        if failed {
            // The process server sends its answers, then closes the connection (ingest
            // session's `Outcome::Fail`): the agent attaches again and resends.
            trace!(self, "the cache failed: the agent's connection closes");
            answers.push(ToAgent::Closed);
            self.closed_conn = self.agent.conn.as_ref().map(|c| c.id);
        }
        for a in answers {
            let delay = self.delay();
            if let Some(c) = self.agent.conn.as_mut() {
                c.send_down(now, delay, a);
            }
        }
    }

    /// The uplink ships from its cursor while its window has room.
    fn ship(&mut self) -> Check {
        if self.ps.cache.is_none() || self.link.is_none() {
            return Ok(());
        }
        let now = self.now();
        for _ in 0..self.rng.usize(1..=3) {
            let Some(cursor) = self.shipper.cursor(DISK_ID) else {
                break;
            };
            if self.shipper.in_flight_bytes() >= self.window_bytes {
                break;
            }
            let n = self.rng.usize(1..=4);
            let read = self.ps.read_from(cursor, n)?;
            if read.is_empty() {
                break;
            }
            // Half the time records that follow on leave merged, as a link-bound uplink
            // sends them (`process_server::merge`), unless a refusal asks for one at a time.
            let merge = self.rng.bool() && !self.shipper.one_by_one(DISK_ID, cursor);
            for (m, records) in runs(read, merge) {
                trace!(
                    self,
                    "uplink ships lsn {}..={} ({} records)",
                    span(&m).0,
                    span(&m).1,
                    records.len()
                );
                self.shipper.shipped_run(DISK_ID, &records);
                let delay = self.delay();
                self.link.as_mut().expect("checked").send_up(now, delay, m);
            }
        }
        Ok(())
    }

    /// The master target takes what arrived on the link and answers.
    fn serve(&mut self) -> Check {
        let (Some(link), Some(_)) = (self.link.as_mut(), self.mt.core.as_ref()) else {
            return Ok(());
        };
        let now = self.tally.steps;
        let conn = link.id;
        let mut works = Vec::new();
        // A group held for room is retried before anything more is read: the worker blocks
        // on it and reads its queue no further (service.rs `apply_until_room`).
        let take = if self.mt.held.is_some() {
            0
        } else {
            self.rng.usize(1..=4)
        };
        for _ in 0..take {
            let Some(m) = link.recv_up(now) else { break };
            works.push(match m {
                Message::WriteBatch(b) => Work::Batch(b, conn),
                Message::Bookmark(b) => Work::Bookmark(b, conn),
                other => return Err(format!("the cache held {other:?}")),
            });
        }
        if works.is_empty() && self.mt.held.is_none() {
            return Ok(());
        }
        trace!(
            self,
            "master target takes {} messages (a held group: {})",
            works.len(),
            self.mt.held.is_some()
        );
        let answers = self.mt.serve(works, conn)?;
        trace!(self, "master target answers {answers:?}");
        if self.mt.fs.crashed() || self.mt.core.is_none() {
            self.link = None;
            return Ok(());
        }
        let committed = self.mt.committed().unwrap_or(0);
        for a in answers {
            if let Message::Ack(ack) = &a {
                let lsn = ack.entries[0].durable_lsn;
                if lsn > committed {
                    return Err(format!("acked lsn {lsn} beyond the committed {committed}"));
                }
                trace!(self, "master target acks lsn {lsn}");
                self.mt_acked = self.mt_acked.max(lsn);
            }
            let delay = self.delay();
            self.link.as_mut().expect("up").send_down(now, delay, a);
        }
        Ok(())
    }

    /// The uplink hears the master target's answers.
    fn hear_mt(&mut self) -> Check {
        let now = self.now();
        while self.ps.cache.is_some() {
            let Some(m) = self.link.as_mut().and_then(|l| l.recv_down(now)) else {
                break;
            };
            match m {
                Message::Ack(a) => {
                    let lsn = a.entries[0].durable_lsn;
                    self.shipper.on_ack(DISK_ID, lsn);
                    if !self.ps.durable(lsn) {
                        self.link = None; // the uplink's error ends the session
                    }
                }
                Message::Nack(n) => {
                    let refused = n.code != ErrorCode::LsnGap;
                    let nacked = self.shipper.on_nack(DISK_ID, n.from_lsn, refused);
                    trace!(self, "master target nacks from lsn {} ({:?}): {nacked:?}, cursor {:?}, in flight {} bytes", n.from_lsn, n.code, self.shipper.cursor(DISK_ID), self.shipper.in_flight_bytes());
                    if nacked == Nacked::Lost {
                        return Err(format!(
                            "the master target refused lsn {} again and again: {}",
                            n.from_lsn, n.reason
                        ));
                    }
                }
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
            self.kill_ps();
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
        self.agent()?;
        self.ingest(faulty);
        self.crashes();
        self.ship()?;
        self.crashes();
        self.serve()?;
        self.crashes();
        self.hear_mt()?;
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
                "livelock: {CALM_STEPS} steps without faults and the master target holds {:?} of {last} (the agent was acked {}, holds {} bytes unacknowledged, captured up to {})",
                self.mt.committed(),
                self.agent_acked,
                self.agent.window.bytes(),
                self.agent.next - 1
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
    // A panic (a broken invariant in the code under test) is a failure of its seed too.
    let ran = std::panic::catch_unwind(|| {
        let mut sim = Sim::new(seed);
        sim.run().map(|()| sim.tally)
    });
    let e = match ran {
        Ok(Ok(t)) => return Ok(t),
        Ok(Err(e)) => e,
        Err(p) => {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            format!("panicked: {what}")
        }
    };
    Err(format!(
        "seed {seed}: {e}\n  replay: SIM_SEED={seed} SIM_TRACE=1 cargo test --release --test simulation -- --nocapture"
    ))
}

/// A number from the environment, or `default`; anything else is a mistake said at once.
fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("{name}={s:?} is not a number")),
        Err(_) => default,
    }
}

/// Seeds that found bugs, replayed on every run (each with what it found).
const FOUND: &[(u64, &str)] = &[
    (304, "an agent with nothing more to send waited forever for the ack of a record the cache failed to sync (the connection now closes: ingest `Outcome::Fail`)"),
    (341, "the same with the agent's buffer full"),
    (2214, "the same, a failed append with 70 KiB in the agent's buffer"),
    (60208, "the simulator's own: its master target dropped messages that arrived while a group waited for room (the real worker reads nothing then), and the uplink waited for their acks for ever"),
    (81396, "the same"),
];

#[test]
fn found_seeds_stay_fixed() {
    if std::env::var("SIM_SEED").is_ok() {
        return; // a replay of one seed traces that seed alone
    }
    for (seed, what) in FOUND {
        if let Err(e) = run_seed(*seed) {
            panic!("{e}\n  this seed once found: {what}");
        }
    }
}

#[test]
fn seeds() {
    if std::env::var("SIM_SEED").is_ok() {
        let seed = env_number("SIM_SEED", 0);
        let t = run_seed(seed).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("seed {seed}: {t:?}");
        return;
    }
    let n = env_number("SIM_SEEDS", 2_000);
    let first = env_number("SIM_FIRST_SEED", 0);
    let mut sum = Tally::default();
    let mut failures = Vec::new();
    for seed in first..first + n {
        match run_seed(seed) {
            Ok(t) => sum.add(&t),
            Err(e) => failures.push(e),
        }
    }
    eprintln!(
        "{n} seeds from {first}: {} steps, {:.1} simulated hours, {} power losses, {} kills, {} EIO, {} ENOSPC, {} torn and {} lost unsynced writes, {} connection resets, {} partitions, {} LSNs acknowledged on-premises, {} point exports checked; {} failed",
        sum.steps,
        sum.sim_us as f64 / 3.6e9,
        sum.crashes,
        sum.kills,
        sum.eio,
        sum.enospc,
        sum.torn,
        sum.lost_unsynced,
        sum.resets,
        sum.partitions,
        sum.acked_lsn,
        sum.points_checked,
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn group_seeds() {
    if std::env::var("SIM_SEED").is_ok() {
        return;
    }
    if std::env::var("SIM_GROUP_SEED").is_ok() {
        let seed = env_number("SIM_GROUP_SEED", 0);
        let t = group::run_seed(seed, group::Mutant::None).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("group seed {seed}: {t:?}");
        return;
    }
    let n = env_number("SIM_GROUP_SEEDS", 2_000);
    let first = env_number("SIM_FIRST_SEED", 0);
    let mut sum = group::GroupTally::default();
    let mut failures = Vec::new();
    for seed in first..first + n {
        match group::run_seed(seed, group::Mutant::None) {
            Ok(t) => sum.add(&t),
            Err(e) => failures.push(e),
        }
    }
    eprintln!(
        "{n} group seeds from {first}: {} steps, {} cuts made, {} abandoned, {} holds ended by the agent's limit, {} group points exported and checked, {} kills, {} power losses, {} connection resets; {} failed",
        sum.steps,
        sum.cuts_made,
        sum.cuts_abandoned,
        sum.hold_timeouts,
        sum.group_points_checked,
        sum.kills,
        sum.crashes,
        sum.resets,
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // A run that made no cut, or checked no group point, would prove nothing.
    assert!(sum.cuts_made > 0 && sum.group_points_checked > 0 && sum.cuts_abandoned > 0);
}

/// Runs seeds of a broken variant until one fails; the failure must say `looked_for`.
fn mutant_is_caught(mutant: group::Mutant, looked_for: &str) {
    if std::env::var("SIM_SEED").is_ok() || std::env::var("SIM_GROUP_SEED").is_ok() {
        return;
    }
    for seed in 0..300 {
        if let Err(e) = group::run_seed(seed, mutant) {
            assert!(
                e.contains(looked_for),
                "{mutant:?}: another failure than the one looked for: {e}"
            );
            eprintln!("found at seed {seed}: {e}");
            return;
        }
    }
    panic!("300 seeds of {mutant:?} and no failure saying {looked_for:?}");
}

/// The checker can fail: members that place their marker when told to hold (without the
/// common instant every member holds at) make group points that break causality, and the
/// group simulation says so.
#[test]
fn group_check_catches_members_that_mark_without_holding() {
    mutant_is_caught(group::Mutant::MarksOnHold, "causality broken");
}

/// The checker can fail: a process server that lets every marker through (no
/// `MarkerBook`) with a member forging markers lists group points that are not the cut's,
/// and the group simulation says so.
#[test]
fn group_check_catches_a_process_server_that_trusts_every_marker() {
    mutant_is_caught(group::Mutant::TrustsMarkers, "group point");
}

/// The records read, as the uplink ships them: merged where they follow on (if `merge`),
/// each message with its records' (last LSN, cached bytes).
fn runs(read: Vec<(Message, u64)>, merge: bool) -> Vec<(Message, Vec<(u64, u64)>)> {
    let mut out: Vec<(Message, Vec<(u64, u64)>)> = Vec::new();
    for (m, bytes) in read {
        let record = (span(&m).1, bytes);
        if let (true, Some((Message::WriteBatch(prev), records)), Message::WriteBatch(next)) =
            (merge, out.last_mut(), &m)
        {
            if process_server::merge::follows(prev, next) {
                let Message::WriteBatch(next) = m else {
                    unreachable!("matched above")
                };
                process_server::merge::append(prev, next);
                records.push(record);
                continue;
            }
        }
        out.push((m, vec![record]));
    }
    out
}
