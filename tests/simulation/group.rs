//! Deterministic simulation of a replication group: two VMs with a causal workload, the
//! process server's cuts, the master target's group points.
//!
//! One seed decides everything, in one thread. Two agents capture the writes of one
//! application spread over two VMs: A writes record k (it completes once captured), and B
//! writes a record naming k only after it learned that A's write k completed. What runs is
//! the real code of the cut: the process server's state machine
//! (`process_server::groups::CutCore`), each agent's rules (`agent::hold`) and resend window
//! (`agent::stream::Window`), and the master target's apply core and journal
//! (`master_target::core::DiskCore`, both disks on one simulated volume) with its group rule
//! (`master_target::groups::whole`). Between them, connections delay messages (now and then
//! past the process server's phase timeout and the agent's hold limit), reset and partition;
//! the process server and the master target are killed, the master target's machine loses
//! power (unsynced writes lost or torn), its operations fail with EIO, and an agent is
//! killed in the middle of a hold.
//!
//! The process server here relays each stream to the master target (its durable cache is
//! the single-disk simulation's subject, `main.rs`): when its uplink goes, it closes the
//! agents' connections and they resume from what the master target holds. An agent's kill
//! loses its hold and connection; its stream is resent from its window (the real agent
//! recovers it by a differential resync, during which it refuses cuts; `tests/group_live.rs`
//! runs that with real processes).
//!
//! It checks, after every recovery of the master target and at the end:
//! - **no group point holds B's record without A's** (read from the exported images);
//! - every group point's disks **export exactly** the member's stream at its marker (blake3
//!   of the image), and the marker is that cut's;
//! - nothing the master target acknowledged is lost, and each disk is its stream at the
//!   committed LSN;
//!
//! and at the end that every cut the process server called made is a group point, and that
//! everything is durable within a bounded number of calm steps (no livelock).
//!
//! `SIM_GROUP_SEEDS=N` runs N seeds (default 2,000, about 10 s here), `SIM_GROUP_SEED=S` replays one, with
//! `SIM_TRACE=1` its events.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use master_target::apply::RetentionPolicy;
use master_target::core::{Applied, DiskCore, Work};
use master_target::groups::GroupPoint;
use process_server::groups::{
    CutCore, MarkerBook, MarkerCheck, Outcome, Step, CUT_PHASE_TIMEOUT_MS,
};
use store::{FileSystem, SimFaults, SimFs};
use wire_protocol::{ErrorCode, Message};

use crate::member::{Down, Item, Member, Up, DISK_BYTES, STEP_MS};
use crate::mt::{export, injected, open_core};
use crate::net::Conn;

/// Steps with the application and faults, then at most this many calm ones.
const FAULT_STEPS: u64 = 400;
const CALM_STEPS: u64 = 3_000;
/// Record slots at the start of each disk (512 bytes each); the rest takes other writes.
const SLOTS: u64 = 32;
const SLOT_BYTES: usize = 512;
/// Every disk of the group: A, B.
const DISKS: [u64; 2] = [1, 2];

/// A message's delay in steps: mostly a few, now and then past the phase timeout (50
/// steps) or the hold limit (200 steps).
pub fn delay(rng: &mut fastrand::Rng) -> u64 {
    match rng.u32(..100) {
        0 => rng.u64(30..260),
        _ => rng.u64(..=3),
    }
}

fn journal_dir(disk: u64) -> PathBuf {
    PathBuf::from(format!("/ret/disk-{disk}"))
}

fn disk_path(disk: u64) -> PathBuf {
    PathBuf::from(format!("/ds/vm{disk}-flat.vmdk"))
}

/// The application over both VMs.
#[derive(Default)]
struct App {
    /// A's next record, and the last that completed.
    next_a: u64,
    done_a: u64,
    /// What B's application knows completed on A.
    seen_by_b: u64,
    next_b: u64,
}

/// A record: its number and (B's) the A record it depends on.
fn record(n: u64, depends: u64) -> Vec<u8> {
    let mut r = vec![0xab; SLOT_BYTES];
    r[..8].copy_from_slice(&n.to_be_bytes());
    r[8..16].copy_from_slice(&depends.to_be_bytes());
    r
}

fn slot_value(img: &[u8], slot: u64, field: usize) -> u64 {
    let at = slot as usize * SLOT_BYTES + field * 8;
    u64::from_be_bytes(img[at..at + 8].try_into().expect("8 bytes"))
}

/// The causal rule on one group point's images: the newest A record any B record depends
/// on is in A's image.
fn causal(a: &[u8], b: &[u8]) -> Result<(), String> {
    let needed = (0..SLOTS).map(|s| slot_value(b, s, 1)).max().unwrap_or(0);
    if needed == 0 {
        return Ok(());
    }
    let has = slot_value(a, needed % SLOTS, 0);
    if has < needed {
        return Err(format!(
            "causality broken: B's image holds a record written after A's record {needed} completed, and A's image holds only record {has} in that slot"
        ));
    }
    Ok(())
}

/// The process server's part: the cut in flight and what cuts came to.
#[derive(Default)]
struct Ps {
    up: bool,
    /// The cut in flight and the step its phase began.
    cut: Option<(CutCore, u64)>,
    /// Durable across restarts in the real one (`CACHE_DIR/group-cut-id`).
    next_cut_id: u64,
    next_cut_at: u64,
    /// Which connection of each member is attached (answered with a resume point).
    attached: [Option<u64>; 2],
    /// Cuts made, with each disk's marker LSN.
    made: std::collections::BTreeMap<u64, std::collections::BTreeMap<u64, u64>>,
    abandoned: u64,
    /// The markers asked for and those that came (the real `MarkerBook`; lost with the
    /// process server).
    book: MarkerBook,
}

/// The process server's check of a group marker on its way to the master target
/// (`cuts::check_marker` over the real `MarkerBook`): one not asked for goes on as a plain
/// bookmark.
fn check_marker(book: &mut MarkerBook, msg: Message) -> Message {
    match msg {
        Message::Bookmark(b) if b.group_marker != 0 => {
            match book.check_bookmark(&b) {
                MarkerCheck::Accept => {
                    // This relay has no cache: what it passes on is what a cache would take.
                    book.cached(b.group_marker, b.disk_id, b.lsn);
                    Message::Bookmark(b)
                }
                MarkerCheck::Strip => Message::Bookmark(wire_protocol::Bookmark {
                    group_marker: 0,
                    group_members: 0,
                    ..b
                }),
            }
        }
        other => other,
    }
}

/// What one seed did.
#[derive(Debug, Default, Clone, Copy)]
pub struct GroupTally {
    pub steps: u64,
    pub cuts_made: u64,
    pub cuts_abandoned: u64,
    pub hold_timeouts: u64,
    pub group_points_checked: u64,
    pub kills: u64,
    pub crashes: u64,
    pub resets: u64,
}

impl GroupTally {
    pub fn add(&mut self, t: &GroupTally) {
        self.steps += t.steps;
        self.cuts_made += t.cuts_made;
        self.cuts_abandoned += t.cuts_abandoned;
        self.hold_timeouts += t.hold_timeouts;
        self.group_points_checked += t.group_points_checked;
        self.kills += t.kills;
        self.crashes += t.crashes;
        self.resets += t.resets;
    }
}

/// A deliberately broken variant, for the checker's own tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutant {
    /// The real rules.
    None,
    /// Members place their marker when told to hold, without holding (and the process
    /// server lets every marker through: its marker check would strip these, and the
    /// causality check itself is what this mutant shows failing).
    MarksOnHold,
    /// The process server lets every marker through (no `MarkerBook`), and a member forges.
    TrustsMarkers,
}

pub struct GroupSim {
    rng: fastrand::Rng,
    mutant: Mutant,
    members: [Member; 2],
    app: App,
    ps: Ps,
    /// The master target's volume and its two disks' cores (both or neither).
    fs: SimFs,
    faults: SimFaults,
    cores: Option<[DiskCore; 2]>,
    policy: RetentionPolicy,
    segment_bytes: u64,
    /// The uplink.
    link: Option<Conn<Message, Message>>,
    /// Highest LSN the master target acknowledged, per disk.
    acked: [u64; 2],
    conns: u64,
    cut_until: [u64; 2],
    tally: GroupTally,
    trace: bool,
}

type Check = Result<(), String>;

impl GroupSim {
    pub fn new(seed: u64, mutant: Mutant) -> GroupSim {
        let mut rng = fastrand::Rng::with_seed(seed);
        let fs = SimFs::new(seed ^ 0x6770);
        for d in DISKS {
            fs.put(&disk_path(d), &vec![0u8; DISK_BYTES]);
        }
        fs.create_dir_all(Path::new("/ret")).expect("simulated");
        let mut members = [
            Member::new(DISKS[0], &mut rng),
            Member::new(DISKS[1], &mut rng),
        ];
        for m in &mut members {
            m.marks_on_hold = mutant == Mutant::MarksOnHold;
        }
        // A quarter of the seeds have a hostile member forging markers.
        if rng.u32(..4) == 0 || mutant == Mutant::TrustsMarkers {
            members[rng.usize(..2)].forges = true;
        }
        GroupSim {
            mutant,
            faults: SimFaults {
                eio_per_million: [0, 0, 2_000][rng.usize(..3)],
                capacity_bytes: 1 << 40,
                tear_per_million: 300_000,
            },
            policy: RetentionPolicy {
                crash_point_interval_us: rng.u64(200_000..2_000_000),
                // Nothing ages out: every cut made must be found at the end.
                window_us: 1 << 50,
                quota_bytes: 1 << 40,
            },
            segment_bytes: [8 << 10, 32 << 10, 1 << 20][rng.usize(..3)],
            rng,
            members,
            app: App::default(),
            ps: Ps {
                next_cut_id: 1,
                ..Ps::default()
            },
            fs,
            cores: None,
            link: None,
            acked: [0; 2],
            conns: 0,
            cut_until: [0; 2],
            tally: GroupTally::default(),
            trace: std::env::var("SIM_TRACE").is_ok(),
        }
    }

    fn now(&self) -> u64 {
        self.tally.steps
    }

    fn time_us(&self) -> u64 {
        1_000_000_000 + self.tally.steps * STEP_MS * 1_000
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("[{}] {}", self.tally.steps, what());
        }
    }

    /// The uplink is gone: what was in flight on it is lost, so the process server closes
    /// the agents' connections and they resume from what the master target holds.
    fn link_down(&mut self) {
        self.link = None;
        for m in &mut self.members {
            m.drop_conn();
        }
        self.ps.attached = [None; 2];
    }

    fn mt_down(&mut self) {
        self.cores = None;
        self.link_down();
    }

    fn fault(&mut self) {
        let i = self.rng.usize(..2);
        match self.rng.u32(..200) {
            0..=1 => self.fs.arm_crash(self.rng.u64(1..80)),
            2 => {
                self.log(|| "master target killed".into());
                self.tally.kills += 1;
                self.mt_down();
            }
            3 => {
                self.log(|| "process server killed".into());
                self.tally.kills += 1;
                self.ps.up = false;
                self.ps.cut = None;
                self.ps.book = MarkerBook::default();
                // A made cut whose markers were not yet durable anywhere is resent by the
                // agents to a process server that did not ask for them: they arrive as plain
                // bookmarks, and that cut is no group point. (The real process server keeps
                // what it accepted in its durable cache; this one relays, so it forgets.)
                let acked = self.acked;
                self.ps.made.retain(|_, marks| {
                    marks.iter().all(|(d, l)| {
                        DISKS
                            .iter()
                            .position(|x| x == d)
                            .is_some_and(|i| *l <= acked[i])
                    })
                });
                self.link_down();
            }
            4 => {
                self.log(|| format!("agent {i} killed"));
                self.tally.kills += 1;
                self.members[i].restart();
                self.ps.attached[i] = None;
            }
            5..=7 => {
                self.tally.resets += 1;
                self.members[i].drop_conn();
                self.ps.attached[i] = None;
            }
            8 => {
                self.tally.resets += 1;
                self.link_down();
            }
            9 => {
                self.members[i].drop_conn();
                self.ps.attached[i] = None;
                self.cut_until[i] = self.now() + self.rng.u64(5..100);
            }
            _ => {}
        }
    }

    /// Starts what is down; after the master target's recovery, checks what it holds.
    fn start(&mut self) -> Check {
        self.ps.up = true;
        if self.cores.is_some() {
            return Ok(());
        }
        let mut opened = Vec::new();
        for d in DISKS {
            match open_core(
                &self.fs,
                (&disk_path(d), &journal_dir(d), d),
                self.policy,
                self.segment_bytes,
            )? {
                Some(c) => opened.push(c),
                None => return Ok(()),
            }
        }
        let [a, b]: [DiskCore; 2] = opened.try_into().map_err(|_| "two disks")?;
        self.cores = Some([a, b]);
        self.log(|| format!("master target up at {:?}", self.committed()));
        self.check("after recovery")
    }

    fn committed(&self) -> Option<[u64; 2]> {
        let c = self.cores.as_ref()?;
        Some([
            c[0].applier().committed_lsn(),
            c[1].applier().committed_lsn(),
        ])
    }

    fn connect(&mut self) {
        let now = self.now();
        if self.link.is_none() && self.cores.is_some() && self.ps.up {
            self.conns += 1;
            self.link = Some(Conn::new(self.conns));
        }
        for i in 0..2 {
            if self.members[i].conn.is_none()
                && self.ps.up
                && now >= self.cut_until[i]
                && self.rng.u32(..3) == 0
            {
                self.conns += 1;
                let d = delay(&mut self.rng);
                self.members[i].connect(self.conns, now, d);
            }
        }
    }

    fn agents(&mut self) -> Check {
        let (now, t) = (self.now(), self.time_us());
        for m in &mut self.members {
            m.hear(now, t, &mut self.rng)?;
            m.tick(now, &mut self.rng);
        }
        Ok(())
    }

    /// The application: A writes records, B learns what completed on A and writes records
    /// naming it, both write elsewhere too. A write that must wait is tried again later.
    fn app(&mut self) {
        let (now, t) = (self.now(), self.time_us());
        let rng = &mut self.rng;
        if rng.bool() {
            let k = self.app.next_a + 1;
            if self.members[0].write((k % SLOTS) * SLOT_BYTES as u64, record(k, 0), t, now, rng) {
                self.app.next_a = k;
                self.app.done_a = k;
            }
        }
        if rng.bool() {
            self.app.seen_by_b = self.app.done_a;
        }
        if self.app.seen_by_b > 0 && rng.bool() {
            let j = self.app.next_b + 1;
            let r = record(j, self.app.seen_by_b);
            if self.members[1].write((j % SLOTS) * SLOT_BYTES as u64, r, t, now, rng) {
                self.app.next_b = j;
            }
        }
        for m in &mut self.members {
            if m.forges && rng.u32(..20) == 0 && self.ps.next_cut_id > 1 {
                // A cut already issued (any other is refused outright), with any disk count
                // (the right one too): to make a group point of one disk, to hide a real
                // one, or to stand for its real marker somewhere else in its stream.
                let cut = rng.u64(1..self.ps.next_cut_id);
                let members = rng.u32(1..=3);
                m.forge(cut, members, t, now, rng);
            }
            if rng.u32(..4) == 0 {
                let len = rng.usize(1..=8) * 512;
                let low = SLOTS as usize * SLOT_BYTES / 512;
                let offset = rng.usize(low..=(DISK_BYTES - len) / 512) * 512;
                let data = vec![rng.u8(..); len];
                m.write(offset as u64, data, t, now, rng);
            }
        }
    }

    /// The process server reads its agents' connections: attaches, stream messages on to
    /// the master target, cut answers into the cut in flight.
    fn ps_read(&mut self) -> Check {
        if !self.ps.up {
            return Ok(());
        }
        let now = self.now();
        let committed = self.committed();
        for i in 0..2 {
            for _ in 0..self.rng.usize(1..=6) {
                let Some(c) = self.members[i].conn.as_mut() else {
                    break;
                };
                let id = c.id;
                let Some(m) = c.recv_up(now) else { break };
                match m {
                    Up::Attach => {
                        let answer = match (&self.link, committed) {
                            (Some(_), Some(lsn)) => {
                                self.ps.attached[i] = Some(id);
                                Down::Resume(lsn[i])
                            }
                            _ => Down::NotReady,
                        };
                        let d = delay(&mut self.rng);
                        c.send_down(now, d, answer);
                    }
                    Up::Data(msg) => match self.link.as_mut() {
                        Some(l) => {
                            let msg = if self.mutant != Mutant::None {
                                msg
                            } else {
                                check_marker(&mut self.ps.book, msg)
                            };
                            let d = delay(&mut self.rng);
                            l.send_up(now, d, msg);
                        }
                        None => {
                            self.members[i].drop_conn();
                            break;
                        }
                    },
                    Up::Cut(answer) if answer.disk_id == DISKS[i] => self.on_answer(&answer),
                    Up::Cut(_) => {} // a reply about another disk: ignored
                }
            }
        }
        Ok(())
    }

    /// Offers every message (as the real driver does); returns the first disk whose
    /// connection is gone.
    fn send_cuts(&mut self, cuts: Vec<wire_protocol::Cut>) -> Option<u64> {
        let now = self.now();
        let mut failed = None;
        for c in cuts {
            let i = DISKS
                .iter()
                .position(|&d| d == c.disk_id)
                .expect("a member");
            let d = delay(&mut self.rng);
            let conn = self.members[i]
                .conn
                .as_mut()
                .filter(|k| self.ps.attached[i] == Some(k.id));
            match conn {
                Some(conn) => conn.send_down(now, d, Down::Cut(c)),
                None => failed = failed.or(Some(c.disk_id)),
            }
        }
        failed
    }

    /// The cut in flight is given up: releases to every member that may hold.
    fn give_up(&mut self, id: u64, why: String) {
        if let Some((core, _)) = self.ps.cut.take() {
            let (releases, _) = core.on_timeout();
            self.send_cuts(releases);
            self.ended(id, Outcome::Abandoned(why));
        }
    }

    fn on_answer(&mut self, answer: &wire_protocol::Cut) {
        let Some((core, _)) = self.ps.cut.as_mut() else {
            return;
        };
        match core.on_reply(answer) {
            Step::Wait => {}
            Step::Send(cuts) => {
                let (id, expected) = (core.id(), core.expected());
                self.ps.cut.as_mut().expect("in flight").1 = self.tally.steps;
                self.ps.book.marking(id, expected);
                if let Some(d) = self.send_cuts(cuts) {
                    self.give_up(id, format!("disk {d}'s connection did not take the mark"));
                }
            }
            Step::Done(cuts, outcome) => {
                let id = core.id();
                self.ps.cut = None;
                self.send_cuts(cuts);
                // As the real driver (`cuts::in_streams`): made only if every marker came.
                let outcome = match outcome {
                    Outcome::Made { marks, .. }
                        if self.mutant == Mutant::None
                            && marks
                                .iter()
                                .any(|(d, l)| self.ps.book.placed(id, *d) != Some(*l)) =>
                    {
                        Outcome::Abandoned("a marker did not come in its stream".into())
                    }
                    o => o,
                };
                self.ended(id, outcome);
            }
        }
    }

    fn ended(&mut self, id: u64, outcome: Outcome) {
        self.log(|| format!("cut {id}: {outcome:?}"));
        match outcome {
            Outcome::Made { marks, .. } => {
                self.ps.made.insert(id, marks);
            }
            Outcome::Abandoned(_) => self.ps.abandoned += 1,
        }
    }

    /// The process server's cut timer: the phase's timeout, and the next cut's start.
    fn ps_cuts(&mut self, calm: bool) {
        let now = self.now();
        if !self.ps.up {
            return;
        }
        if let Some((core, since)) = &self.ps.cut {
            if (now - since) * STEP_MS >= CUT_PHASE_TIMEOUT_MS {
                let id = core.id();
                let (releases, outcome) = core.on_timeout();
                self.ps.cut = None;
                self.send_cuts(releases);
                self.ended(id, outcome);
            }
            return;
        }
        let all_attached = (0..2).all(|i| {
            self.ps.attached[i].is_some()
                && self.members[i].conn.as_ref().map(|c| c.id) == self.ps.attached[i]
        });
        if now < self.ps.next_cut_at || !all_attached {
            return;
        }
        let id = self.ps.next_cut_id;
        self.ps.next_cut_id += 1;
        self.ps.next_cut_at = now + if calm { 20 } else { self.rng.u64(5..60) };
        let app = self.rng.u32(..4) == 0;
        let tag = if app {
            format!("bm-{id}")
        } else {
            String::new()
        };
        let (core, holds) = CutCore::new(id, &DISKS, app, &tag);
        self.log(|| format!("cut {id} begins"));
        self.ps.cut = Some((core, now));
        if let Some(d) = self.send_cuts(holds) {
            self.give_up(id, format!("disk {d}'s connection did not take the hold"));
        }
    }

    /// The master target takes what arrived on the uplink and answers.
    fn mt_serve(&mut self) -> Check {
        let now = self.now();
        let (Some(link), Some(_)) = (self.link.as_mut(), self.cores.as_ref()) else {
            return Ok(());
        };
        let mut msgs = Vec::new();
        for _ in 0..self.rng.usize(1..=6) {
            match link.recv_up(now) {
                Some(m) => msgs.push(m),
                None => break,
            }
        }
        let mut answers = Vec::new();
        for m in msgs {
            let (i, work) = match m {
                Message::WriteBatch(b) => (
                    DISKS.iter().position(|&d| d == b.disk_id),
                    Work::Batch(b, 0u64),
                ),
                Message::Bookmark(b) => (
                    DISKS.iter().position(|&d| d == b.disk_id),
                    Work::Bookmark(b, 0u64),
                ),
                other => return Err(format!("the uplink carried {other:?}")),
            };
            let i = i.ok_or("a stream message of no member")?;
            let core = &mut self.cores.as_mut().expect("checked")[i];
            let mut g = core.check(vec![work]);
            core.take_refusals();
            answers.extend(std::mem::take(&mut g.replies).into_iter().map(|(_, m)| m));
            match core.apply(&g) {
                Ok(Applied::Done(_)) => {
                    answers.extend(core.finish(g, |a, b| a == b).into_iter().map(|(_, m)| m))
                }
                Ok(Applied::Full(e)) => return Err(format!("a volume of 1 TiB full: {e}")),
                Err(e) if self.fs.crashed() || injected(&e.to_string()) => {
                    self.log(|| format!("master target stops: {e}"));
                    self.mt_down();
                    return Ok(());
                }
                Err(e) => return Err(format!("apply failed without an injected fault: {e}")),
            }
            if self.fs.crashed() {
                return Ok(());
            }
        }
        let committed = self.committed().expect("up");
        let link = self.link.as_mut().expect("up");
        for a in answers {
            if let Message::Ack(ack) = &a {
                let e = &ack.entries[0];
                let i = DISKS
                    .iter()
                    .position(|&d| d == e.disk_id)
                    .expect("a member");
                if e.durable_lsn > committed[i] {
                    return Err(format!(
                        "acked lsn {} of disk {} beyond its committed {}",
                        e.durable_lsn, e.disk_id, committed[i]
                    ));
                }
                self.acked[i] = self.acked[i].max(e.durable_lsn);
            }
            let d = delay(&mut self.rng);
            link.send_down(now, d, a);
        }
        Ok(())
    }

    /// The process server hears the master target and tells the agents.
    fn ps_hear(&mut self) -> Check {
        let now = self.now();
        while let Some(m) = self.link.as_mut().and_then(|l| l.recv_down(now)) {
            let (disk, down) = match m {
                Message::Ack(a) => (a.entries[0].disk_id, Down::Ack(a.entries[0].durable_lsn)),
                Message::Nack(n) if n.code == ErrorCode::LsnGap => {
                    (n.disk_id, Down::Nack(n.from_lsn))
                }
                other => return Err(format!("the master target answered {other:?}")),
            };
            let i = DISKS
                .iter()
                .position(|&d| d == disk)
                .ok_or("an answer about no member")?;
            let d = delay(&mut self.rng);
            if let Some(c) = self.members[i].conn.as_mut() {
                c.send_down(now, d, down);
            }
        }
        Ok(())
    }

    fn crashes(&mut self) {
        if self.fs.crashed() {
            self.log(|| "master target machine lost power".into());
            self.tally.crashes += 1;
            self.fs.crash();
            self.mt_down();
        }
    }

    fn step(&mut self, faulty: bool) -> Check {
        self.tally.steps += 1;
        if faulty {
            self.fault();
        }
        self.start()?;
        self.crashes();
        self.connect();
        self.agents()?;
        if faulty {
            self.app();
        }
        self.ps_read()?;
        self.ps_cuts(!faulty);
        self.mt_serve()?;
        self.crashes();
        self.ps_hear()?;
        Ok(())
    }

    /// The group points now listed, with each member's point checked.
    fn group_points(&mut self) -> Result<Vec<GroupPoint>, String> {
        let Some(cores) = self.cores.as_ref() else {
            return Ok(Vec::new());
        };
        let per_disk = (0..2)
            .map(|i| {
                (
                    DISKS[i],
                    format!("vm-{i}"),
                    cores[i].applier().journal().points().to_vec(),
                )
            })
            .collect();
        Ok(master_target::groups::whole("g", per_disk))
    }

    /// Nothing acknowledged lost, each disk its stream at its committed LSN, and every
    /// group point exact and causal.
    fn check(&mut self, when: &str) -> Check {
        let Some(committed) = self.committed() else {
            return Ok(());
        };
        for i in 0..2 {
            if committed[i] < self.acked[i] {
                return Err(format!(
                    "{when}: disk {} acknowledged up to lsn {} and holds {}",
                    DISKS[i], self.acked[i], committed[i]
                ));
            }
            let disk = self.fs.contents(&disk_path(DISKS[i])).expect("exists");
            if blake3::hash(&disk) != blake3::hash(&self.members[i].image_at(committed[i])) {
                return Err(format!(
                    "{when}: disk {} is not its stream at lsn {}",
                    DISKS[i], committed[i]
                ));
            }
        }
        let points = self.group_points()?;
        // An export is another process: faults paused while it reads.
        let armed = self.fs.armed();
        self.fs.disarm_crash();
        self.fs.set_faults(SimFaults {
            eio_per_million: 0,
            ..self.faults
        });
        let checked = self.check_points(&points);
        self.fs.set_faults(self.faults);
        if let Some(n) = armed {
            self.fs.arm_crash(n);
        }
        checked.map_err(|e| format!("{when}: {e}"))
    }

    fn check_points(&mut self, points: &[GroupPoint]) -> Check {
        for gp in points {
            let mut images = Vec::new();
            for i in 0..2 {
                let m = gp
                    .members
                    .iter()
                    .find(|m| m.disk == DISKS[i])
                    .ok_or_else(|| format!("group point {} without disk {}", gp.id, DISKS[i]))?;
                let lsn = m.point.lsn;
                match self.members[i].items.get(lsn as usize - 1) {
                    Some(Item::Marker { cut_id }) if *cut_id == gp.id => {}
                    // Forged, but as the real one: the process server took it only at the
                    // place, count, kind and tag asked for (right after the LSN the member
                    // held at, so nothing captured in between): its disk at the cut. The
                    // exact-image and causality checks below judge it like any marker.
                    Some(Item::Forged { cut_id, .. }) if *cut_id == gp.id => {}
                    Some(Item::Forged { cut_id, .. }) => {
                        return Err(format!("group point {}: disk {} point at lsn {lsn} is a marker its agent forged for cut {cut_id}", gp.id, DISKS[i]))
                    }
                    other => return Err(format!("group point {}: disk {} point at lsn {lsn} is {other:?}, not the cut's marker", gp.id, DISKS[i])),
                }
                let disk = self.fs.contents(&disk_path(DISKS[i])).expect("exists");
                let cores = self.cores.as_ref().expect("up");
                let img = export(cores[i].applier().journal(), &disk, lsn)
                    .map_err(|e| format!("group point {} disk {}: {e}", gp.id, DISKS[i]))?;
                if blake3::hash(&img) != blake3::hash(&self.members[i].image_at(lsn)) {
                    return Err(format!("group point {}: disk {} exports something else than its stream at lsn {lsn}", gp.id, DISKS[i]));
                }
                images.push(img);
            }
            causal(&images[0], &images[1]).map_err(|e| format!("group point {}: {e}", gp.id))?;
            self.tally.group_points_checked += 1;
        }
        Ok(())
    }

    pub fn run(&mut self) -> Result<GroupTally, String> {
        self.fs.set_faults(self.faults);
        for _ in 0..FAULT_STEPS {
            self.step(true)?;
        }
        self.fs.set_faults(SimFaults::NONE);
        self.fs.disarm_crash();
        self.faults = SimFaults::NONE;
        let made_before_calm = self.ps.made.len();
        for _ in 0..CALM_STEPS {
            let durable = self
                .committed()
                .is_some_and(|c| (0..2).all(|i| c[i] == self.members[i].last_lsn()));
            if durable && self.ps.cut.is_none() && self.ps.made.len() > made_before_calm {
                break;
            }
            self.step(false)?;
        }
        let last = [self.members[0].last_lsn(), self.members[1].last_lsn()];
        if self.committed() != Some(last) || self.ps.cut.is_some() {
            return Err(format!(
                "livelock: {CALM_STEPS} calm steps and the master target holds {:?} of {last:?}",
                self.committed()
            ));
        }
        // A last power loss: recovery must still hold everything, and list every cut made.
        self.fs.crash();
        self.mt_down();
        self.start()?;
        let listed: BTreeSet<u64> = self.group_points()?.iter().map(|g| g.id).collect();
        if let Some(missing) = self.ps.made.keys().find(|id| !listed.contains(id)) {
            if self.trace {
                for (i, c) in self.cores.as_ref().expect("up").iter().enumerate() {
                    eprintln!(
                        "disk {}: points {:?}",
                        DISKS[i],
                        c.applier().journal().points()
                    );
                }
            }
            return Err(format!(
                "cut {missing} was made (every member marked) but is no group point"
            ));
        }
        self.tally.cuts_made = self.ps.made.len() as u64;
        self.tally.cuts_abandoned = self.ps.abandoned;
        self.tally.hold_timeouts = self.members.iter().map(|m| m.hold_timeouts).sum();
        Ok(self.tally)
    }
}

/// Runs one seed; a panic is a failure of its seed too.
pub fn run_seed(seed: u64, mutant: Mutant) -> Result<GroupTally, String> {
    let ran = std::panic::catch_unwind(|| GroupSim::new(seed, mutant).run());
    let e = match ran {
        Ok(Ok(t)) => return Ok(t),
        Ok(Err(e)) => e,
        Err(p) => format!(
            "panicked: {}",
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default()
        ),
    };
    Err(format!(
        "group seed {seed}: {e}\n  replay: SIM_GROUP_SEED={seed} SIM_TRACE=1 cargo test --release --test simulation group -- --nocapture"
    ))
}
