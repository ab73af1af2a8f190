//! The tokio shell of replication groups (the rules and the cut's state machine are in
//! [`crate::groups`]): which connection serves each group disk, one task per group that
//! cuts at the configured interval and on demand, the attach rules, and the figures.
//!
//! Design constraints:
//! - A cut's messages go on the member connections' own outbound queues (`try_send`: a
//!   connection too busy to take one is a member that does not answer, and the cut is
//!   abandoned, never waited for without bound).
//! - Cut ids never repeat, across restarts too: the last one issued is kept durably in
//!   `CACHE_DIR/group-cut-id` before it is used, and a new one is at least the wall clock
//!   in microseconds. The master target joins a group point's disks by it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use wire_protocol::{Cut, CutPhase, Message};

use crate::groups::{
    CutCore, GroupDef, MarkerBook, MarkerCheck, Outcome, Step, CUT_PHASE_TIMEOUT_MS, PAUSE_SAMPLES,
};
use crate::state::{now_us, State};

/// The file holding the last cut id issued.
const CUT_ID_FILE: &str = "group-cut-id";
/// Replies queued for the cut in flight (a group's members answer twice each).
const REPLY_QUEUE: usize = 256;
/// On-demand bookmarks queued per group.
const DEMAND_QUEUE: usize = 16;
/// How often an on-demand bookmark checks whether its markers are durable on the master
/// target.
const DURABLE_POLL_MS: u64 = 50;

/// An on-demand (app-consistent) group bookmark.
struct Demand {
    tag: String,
    reply: oneshot::Sender<(u64, Outcome)>,
}

/// A group's figures.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct GroupStatus {
    /// The group.
    pub group: String,
    /// Its VMs.
    pub vms: Vec<String>,
    /// Its disks attached here.
    pub disks: Vec<u64>,
    /// Of those, served by a connected agent that takes part in cuts.
    pub connected: Vec<u64>,
    /// The group's RPO, milliseconds: the age of its last group point (made here), or its
    /// disks' own RPO if older.
    pub rpo_ms: u64,
    /// Cuts made (every disk marked).
    pub cuts_made: u64,
    /// Cuts abandoned (begun, and a member refused or did not answer in time).
    pub cuts_abandoned: u64,
    /// Cuts not begun: a member VM had no disk attached, or its agent was not connected.
    #[serde(default)]
    pub cuts_skipped: u64,
    /// The last cut made, 0 if none.
    pub last_cut_id: u64,
    /// When it was made, microseconds since the epoch (0: never).
    pub last_cut_time_us: u64,
    /// Why the last cut abandoned or skipped was ("" if none yet).
    pub last_abandoned: String,
    /// Write pause per member and cut, made or abandoned (how long its writes were held),
    /// p50, microseconds.
    pub pause_p50_us: u64,
    /// p99 of the same.
    pub pause_p99_us: u64,
    /// Largest of the same.
    pub pause_max_us: u64,
}

#[derive(Default)]
struct Stats {
    made: u64,
    abandoned: u64,
    /// Cuts not begun: a member not attached or not connected (no write was held).
    skipped: u64,
    last_cut_id: u64,
    last_cut_time_us: u64,
    last_abandoned: String,
    pauses_us: VecDeque<u64>,
}

/// Cuts whose members' late answers (a release's hold) are still heard.
const RECENT_CUTS: usize = 2 * crate::groups::MAX_GROUPS;
/// A hold counted in the figures is at most this long: an agent holds at most 2 s
/// (`agent::hold::HOLD_MAX_MS`), and a longer claim is a broken or hostile agent's.
const MAX_PAUSE_US: u64 = 2_500_000;

/// A cut made lately: its members, and whose hold was counted.
struct Recent {
    cut_id: u64,
    group: String,
    disks: Vec<u64>,
    counted: HashSet<u64>,
}

/// The groups of this process server.
pub struct Groups {
    /// When this process server started: a group with no point since is that old.
    since_us: u64,
    recent: Mutex<VecDeque<Recent>>,
    defs: Vec<GroupDef>,
    /// Disk id → (connection id, the connection's outbound queue), for disks attached by
    /// agents that speak cuts.
    routes: Mutex<HashMap<u64, (u64, mpsc::Sender<Message>)>>,
    /// Cut in flight → where its replies go.
    inflight: Mutex<HashMap<u64, mpsc::Sender<Cut>>>,
    stats: Mutex<HashMap<String, Stats>>,
    demands: HashMap<String, mpsc::Sender<Demand>>,
    demand_rx: Mutex<HashMap<String, mpsc::Receiver<Demand>>>,
    /// The last cut id issued.
    last_cut_id: Mutex<u64>,
    /// The markers asked for, and those that came in the disks' streams.
    markers: Mutex<MarkerBook>,
}

impl Groups {
    /// The configured groups; nothing runs until [`spawn`].
    pub fn new(defs: Vec<GroupDef>, last_cut_id: u64) -> Groups {
        let mut demands = HashMap::new();
        let mut rxs = HashMap::new();
        for g in &defs {
            let (tx, rx) = mpsc::channel(DEMAND_QUEUE);
            demands.insert(g.id.clone(), tx);
            rxs.insert(g.id.clone(), rx);
        }
        Groups {
            since_us: now_us(),
            recent: Mutex::default(),
            stats: Mutex::new(
                defs.iter()
                    .map(|g| (g.id.clone(), Stats::default()))
                    .collect(),
            ),
            defs,
            routes: Mutex::default(),
            inflight: Mutex::default(),
            demands,
            demand_rx: Mutex::new(rxs),
            last_cut_id: Mutex::new(last_cut_id),
            markers: Mutex::default(),
        }
    }

    /// The group `id`, if configured.
    pub fn def(&self, id: &str) -> Option<&GroupDef> {
        self.defs.iter().find(|g| g.id == id)
    }

    /// The group VM `vm` belongs to, if any.
    pub fn group_of_vm(&self, vm: &str) -> Option<&GroupDef> {
        self.defs.iter().find(|g| g.vms.iter().any(|v| v == vm))
    }

    /// Connection `conn` serves group disk `disk_id` from now on.
    pub fn route(&self, disk_id: u64, conn: u64, out: mpsc::Sender<Message>) {
        self.routes
            .lock()
            .expect("poisoned")
            .insert(disk_id, (conn, out));
    }

    /// Connection `conn` closed: its disks have no route until their agents attach again.
    pub fn unroute(&self, conn: u64) {
        self.routes
            .lock()
            .expect("poisoned")
            .retain(|_, (c, _)| *c != conn);
    }

    /// An agent's answer to a cut step (of a disk of group `group`). Every hold's length
    /// is counted, also of a cut abandoned or already over (an agent that was released
    /// says how long it held).
    pub fn reply(&self, group: &str, c: Cut) {
        {
            let mut recent = self.recent.lock().expect("poisoned");
            // Only a member of one of the group's recent cuts is heard, and its hold counted
            // once (an agent cannot flood another cut's queue or skew the figures).
            let Some(r) = recent
                .iter_mut()
                .find(|r| r.cut_id == c.cut_id && r.group == group && r.disks.contains(&c.disk_id))
            else {
                return;
            };
            if matches!(c.phase, CutPhase::Marked | CutPhase::Released)
                && r.counted.insert(c.disk_id)
            {
                if let Some(s) = self.stats.lock().expect("poisoned").get_mut(group) {
                    if s.pauses_us.len() == PAUSE_SAMPLES {
                        s.pauses_us.pop_front();
                    }
                    s.pauses_us.push_back(c.hold_us.min(MAX_PAUSE_US));
                }
            }
        }
        if let Some(tx) = self.inflight.lock().expect("poisoned").get(&c.cut_id) {
            let _ = tx.try_send(c);
        }
    }

    /// Remembers a cut's members (for [`Groups::reply`]).
    fn begin(&self, cut_id: u64, group: &str, disks: &[u64]) {
        let mut recent = self.recent.lock().expect("poisoned");
        if recent.len() == RECENT_CUTS {
            recent.pop_front();
        }
        recent.push_back(Recent {
            cut_id,
            group: group.into(),
            disks: disks.to_vec(),
            counted: HashSet::new(),
        });
    }

    fn connected(&self, disk_id: u64) -> bool {
        self.routes
            .lock()
            .expect("poisoned")
            .get(&disk_id)
            .is_some_and(|(_, tx)| !tx.is_closed())
    }

    fn send(&self, c: Cut) -> bool {
        let routes = self.routes.lock().expect("poisoned");
        routes
            .get(&c.disk_id)
            .is_some_and(|(_, tx)| tx.try_send(Message::Cut(c)).is_ok())
    }
}

/// The last cut id issued, as far as it can be known: what `group-cut-id` says, and at
/// least the clock (a cut id is at least the wall clock in microseconds when issued, so
/// every id issued before now is below it: ids never repeat, and a marker from before a
/// lost or damaged file is still known as issued).
pub fn load_last_cut_id(fs: &dyn store::FileSystem, cache_dir: &std::path::Path) -> u64 {
    let path = cache_dir.join(CUT_ID_FILE);
    let kept = match store::read_all(fs, &path) {
        Ok(b) => match String::from_utf8_lossy(&b).trim().parse::<u64>() {
            Ok(v) => v,
            Err(_) => {
                tracing::warn!(path = %path.display(), "the last group cut id could not be read; new cut ids continue from the clock");
                0
            }
        },
        Err(_) => 0,
    };
    kept.max(now_us())
}

/// A new cut id, durable before it is used.
fn next_cut_id(state: &State) -> std::io::Result<u64> {
    let mut last = state.groups.last_cut_id.lock().expect("poisoned");
    let id = (*last + 1).max(now_us());
    let path = state.cfg.cache_dir.join(CUT_ID_FILE);
    store::write_durable(state.fs(), &path, id.to_string().as_bytes())?;
    *last = id;
    Ok(id)
}

/// Whether an attach of `a` by VM `vm` (speaking protocol `version`) breaks a group rule;
/// the refusal says which and what to do. Called under the attach lock.
pub fn attach_refusal(
    state: &State,
    vm: &str,
    a: &wire_protocol::DiskAttach,
    version: u16,
) -> Option<String> {
    let groups = &state.groups;
    let member_of = groups.group_of_vm(vm);
    if a.group_id.is_empty() {
        return member_of.map(|g| format!("VM {vm} is a member of replication group {}: a group is reprotected as a whole; start its agent with --group {}", g.id, g.id));
    }
    let Some(g) = groups.def(&a.group_id) else {
        return Some(format!("replication group {} is not configured on this process server (process-server --group {}=VM,VM,...)", a.group_id, a.group_id));
    };
    if member_of.map(|m| &m.id) != Some(&g.id) {
        return Some(format!(
            "VM {vm} is not a member of replication group {} (process-server --group)",
            g.id
        ));
    }
    if version < wire_protocol::version::GROUPS_SINCE {
        return Some(format!("replication groups need an agent that speaks protocol version {}; this one speaks {version}: upgrade the agent", wire_protocol::version::GROUPS_SINCE));
    }
    if let Err(e) = wire_protocol::message::validate_name("os type", &a.os_type) {
        return Some(format!("{e}: every VM of a group reports its OS type"));
    }
    // The group's OS: as configured, else as its first disk said. Other VMs' names stay
    // out of the answer.
    let os = g.os.clone().or_else(|| {
        state
            .all()
            .iter()
            .find(|d| d.attach.group_id == g.id && d.attach.disk_id != a.disk_id)
            .map(|d| d.attach.os_type.clone())
    });
    match os {
        Some(os) if os != a.os_type => Some(format!(
            "replication group {} is of {os} VMs, and VM {vm} says it is {}: every VM of a group has the same OS type",
            g.id, a.os_type
        )),
        _ => None,
    }
}

/// What ingest does with a stream record that may carry a group marker.
pub enum Marker {
    /// Not a marker, or one asked for: cached as received.
    Keep,
    /// A marker not asked for: cached as this plain bookmark instead (the same LSN, kind,
    /// time and tag, no group), so it can neither make a group point nor hide one.
    Strip(Message),
    /// No agent of a group sends this: refused with this reply.
    Refuse(Message),
}

/// Checks a group marker in disk `disk`'s stream. Only markers this process server asked
/// for reach the master target as markers, which is why it can trust them: a marker on a
/// disk of no group, for a cut not issued yet, or covering no disk or more than a master
/// target holds is refused; one for another cut, another disk count, place (not right after
/// the LSN the disk said it held at), kind or tag, a second one, or one from before a
/// restart is stripped to a plain bookmark.
pub fn check_marker(state: &State, disk: &crate::state::Disk, msg: &Message) -> Marker {
    let Message::Bookmark(b) = msg else {
        return Marker::Keep;
    };
    if b.group_marker == 0 {
        return Marker::Keep;
    }
    let issued = *state.groups.last_cut_id.lock().expect("poisoned");
    let why = if disk.attach.group_id.is_empty() {
        "a group marker on a disk of no replication group"
    } else if b.group_marker > issued {
        "a group marker for a cut this process server has not made"
    } else if b.group_members == 0 || b.group_members as usize > MAX_CUT_DISKS {
        "a group marker covering no disk, or more than a master target holds"
    } else {
        let check = state
            .groups
            .markers
            .lock()
            .expect("poisoned")
            .check_bookmark(b);
        if check == MarkerCheck::Accept {
            return Marker::Keep;
        }
        if let Some(suppressed) = state.refusal_log.admit("marker stripped") {
            tracing::warn!(disk = b.disk_id, cut = b.group_marker, lsn = b.lsn, suppressed, "a group marker this process server did not ask for (another cut, disk count, place, kind or tag, a second one, or one from before a restart): kept as a plain bookmark, never part of a group point");
        }
        return Marker::Strip(Message::Bookmark(wire_protocol::Bookmark {
            group_marker: 0,
            group_members: 0,
            ..b.clone()
        }));
    };
    Marker::Refuse(Message::Error(wire_protocol::ErrorMsg {
        code: wire_protocol::ErrorCode::Malformed,
        disk_id: b.disk_id,
        message: format!("bookmark at lsn {}: {why}", b.lsn),
        request_id: 0,
    }))
}

/// The cache took a new record `msg` as it was (after [`check_marker`] kept it): if it is
/// a group marker, its cut counts it as placed ([`in_streams`]). A resend the cache already
/// held places nothing: a member cannot point its cut at a record that is not its marker.
pub fn marker_cached(state: &State, msg: &Message) {
    if let Message::Bookmark(b) = msg {
        if b.group_marker != 0 {
            state
                .groups
                .markers
                .lock()
                .expect("poisoned")
                .cached(b.group_marker, b.disk_id, b.lsn);
        }
    }
}

/// Most disks one cut can cover: every disk of a master target.
const MAX_CUT_DISKS: usize = 60;

/// The master target a new disk of group `group` must go to: the one its other disks
/// replicate to (every VM of a group has the same master target), if it has any yet.
pub fn group_route(state: &State, group: &str) -> Option<usize> {
    if group.is_empty() {
        return None;
    }
    state
        .all()
        .iter()
        .find(|d| d.attach.group_id == group)
        .map(|d| d.route)
}

/// Starts one task per group.
pub fn spawn(state: &Arc<State>) {
    let rxs = std::mem::take(&mut *state.groups.demand_rx.lock().expect("poisoned"));
    for (id, rx) in rxs {
        tokio::spawn(group_task(Arc::clone(state), id, rx));
    }
}

async fn group_task(state: Arc<State>, id: String, mut demands: mpsc::Receiver<Demand>) {
    let every = Duration::from_millis(state.cfg.group_cut_interval_ms);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_reason = String::new();
    loop {
        let (app, tag, reply) = tokio::select! {
            _ = tick.tick() => (false, String::new(), None),
            d = demands.recv() => match d {
                Some(d) => (true, d.tag, Some(d.reply)),
                None => return,
            },
        };
        let (cut_id, outcome) = cut(&state, &id, app, &tag).await;
        match &outcome {
            Outcome::Made { max_hold_us, .. } => {
                last_reason.clear();
                tracing::debug!(group = %id, cut = cut_id, max_hold_us, "group cut made");
            }
            // Said once per reason: an interval cut of a group whose VM is down fails
            // the same way every interval.
            // Not begun (a member not attached or not connected): skipped, no cut id.
            Outcome::Abandoned(why) if cut_id == 0 && (*why != last_reason || reply.is_some()) => {
                tracing::warn!(group = %id, reason = %why, "group cut skipped: no group point this time");
                last_reason.clone_from(why);
            }
            Outcome::Abandoned(why) if *why != last_reason || reply.is_some() => {
                tracing::warn!(group = %id, cut = cut_id, reason = %why, "group cut abandoned: no group point this time");
                last_reason.clone_from(why);
            }
            Outcome::Abandoned(_) => {}
        }
        if let Some(r) = reply {
            let _ = r.send((cut_id, outcome));
        }
    }
}

/// The disks of group `id` attached here (not detached or retired), and why a cut cannot
/// run now if so.
fn members(state: &State, g: &GroupDef) -> (Vec<u64>, Option<String>) {
    let disks: Vec<_> = state
        .all()
        .into_iter()
        .filter(|d| d.attach.group_id == g.id && !d.is_detached())
        .collect();
    let ids: Vec<u64> = disks.iter().map(|d| d.attach.disk_id).collect();
    if ids.is_empty() && state.all().iter().any(|d| d.attach.group_id == g.id) {
        return (ids, Some("every disk of the group is detached (failed back): remove the group from this process server's configuration".into()));
    }
    if let Some(vm) = g
        .vms
        .iter()
        .find(|v| !disks.iter().any(|d| &d.attach.vm_id == *v))
    {
        return (
            ids,
            Some(format!(
                "VM {vm} has no disk attached (not yet, or detached): a group point covers every VM of the group"
            )),
        );
    }
    if let Some(d) = ids.iter().copied().find(|d| !state.groups.connected(*d)) {
        return (ids, Some(format!("disk {d}'s agent is not connected")));
    }
    (ids, None)
}

/// Runs one cut of group `id`; returns its id (0 if none was issued) and how it ended.
async fn cut(state: &State, id: &str, app: bool, tag: &str) -> (u64, Outcome) {
    let g = state.groups.def(id).expect("a configured group").clone();
    let (disks, unready) = members(state, &g);
    if let Some(why) = unready {
        // Not begun, so nothing was held: counted apart from abandoned cuts (the group's
        // RPO keeps growing, and says it).
        let mut all = state.groups.stats.lock().expect("poisoned");
        let s = all.entry(id.to_owned()).or_default();
        s.skipped += 1;
        s.last_abandoned.clone_from(&why);
        return (0, Outcome::Abandoned(why));
    }
    let cut_id = match next_cut_id(state) {
        Ok(c) => c,
        Err(e) => {
            let why = format!(
                "the cut id could not be kept durably in {}: {e}",
                state.cfg.cache_dir.display()
            );
            return (0, record(state, id, 0, Outcome::Abandoned(why)));
        }
    };
    state.groups.begin(cut_id, id, &disks);
    let (tx, mut rx) = mpsc::channel(REPLY_QUEUE);
    state
        .groups
        .inflight
        .lock()
        .expect("poisoned")
        .insert(cut_id, tx);
    let (mut core, holds) = CutCore::new(cut_id, &disks, app, tag);
    let outcome = drive(state, &mut core, holds, &mut rx).await;
    state
        .groups
        .inflight
        .lock()
        .expect("poisoned")
        .remove(&cut_id);
    (cut_id, record(state, id, cut_id, outcome))
}

/// Sends a phase's messages and collects the answers, each phase bounded in time.
async fn drive(
    state: &State,
    core: &mut CutCore,
    first: Vec<Cut>,
    rx: &mut mpsc::Receiver<Cut>,
) -> Outcome {
    // Every message is offered (a member whose connection fails must not keep the others
    // holding to their own limit); the first disk that did not take one is returned.
    let send_all = |msgs: Vec<Cut>| -> Option<u64> {
        msgs.into_iter()
            .filter_map(|m| (!state.groups.send(m.clone())).then_some(m.disk_id))
            .fold(None, |first, d| first.or(Some(d)))
    };
    if let Some(d) = send_all(first) {
        let (rel, _) = core.on_timeout();
        send_all(rel);
        return Outcome::Abandoned(format!("disk {d}'s connection did not take the hold"));
    }
    let mut deadline = Instant::now() + Duration::from_millis(CUT_PHASE_TIMEOUT_MS);
    // Bounded: two phases, each ends at its deadline.
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let step = match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(c)) => core.on_reply(&c),
            Ok(None) | Err(_) => {
                let (rel, o) = core.on_timeout();
                send_all(rel);
                return o;
            }
        };
        match step {
            Step::Wait => {}
            Step::Send(marks) => {
                // From now on each disk's marker is expected, exactly.
                state
                    .groups
                    .markers
                    .lock()
                    .expect("poisoned")
                    .marking(core.id(), core.expected());
                if let Some(d) = send_all(marks) {
                    let (rel, _) = core.on_timeout();
                    send_all(rel);
                    return Outcome::Abandoned(format!(
                        "disk {d}'s connection did not take the mark"
                    ));
                }
                deadline = Instant::now() + Duration::from_millis(CUT_PHASE_TIMEOUT_MS);
            }
            Step::Done(rel, o) => {
                send_all(rel);
                return in_streams(state, core.id(), o);
            }
        }
    }
}

/// A cut every member says it marked is made only if each marker came in its disk's
/// stream where the member said (a member that answers Marked without a marker, or with
/// a stripped one, would have the process server report a group point the master target
/// never lists).
fn in_streams(state: &State, cut_id: u64, o: Outcome) -> Outcome {
    let Outcome::Made { marks, .. } = &o else {
        return o;
    };
    let book = state.groups.markers.lock().expect("poisoned");
    match marks
        .iter()
        .find(|(d, lsn)| book.placed(cut_id, **d) != Some(**lsn))
    {
        Some((d, lsn)) => Outcome::Abandoned(format!(
            "disk {d} said it marked at lsn {lsn}, but that marker did not come in its stream"
        )),
        None => o,
    }
}

fn record(state: &State, id: &str, cut_id: u64, o: Outcome) -> Outcome {
    let mut all = state.groups.stats.lock().expect("poisoned");
    let s = all.entry(id.to_owned()).or_default();
    match &o {
        Outcome::Made { .. } => {
            s.made += 1;
            s.last_cut_id = cut_id;
            s.last_cut_time_us = now_us();
        }
        Outcome::Abandoned(why) => {
            s.abandoned += 1;
            s.last_abandoned.clone_from(why);
        }
    }
    o
}

/// Every group's figures (the RPO from the disks' own).
pub fn status(state: &State, disks: &[crate::metrics::DiskStatus]) -> Vec<GroupStatus> {
    let stats = state.groups.stats.lock().expect("poisoned");
    state
        .groups
        .defs
        .iter()
        .map(|g| {
            let ids: Vec<u64> = state
                .all()
                .iter()
                .filter(|d| d.attach.group_id == g.id && !d.is_detached())
                .map(|d| d.attach.disk_id)
                .collect();
            let s = stats.get(&g.id);
            let pauses: Vec<u64> = s
                .map(|s| s.pauses_us.iter().copied().collect())
                .unwrap_or_default();
            GroupStatus {
                group: g.id.clone(),
                vms: g.vms.clone(),
                connected: ids
                    .iter()
                    .copied()
                    .filter(|d| state.groups.connected(*d))
                    .collect(),
                // The older of: the group's last point (made here; none yet: since this
                // process server started), and its disks' own RPO.
                rpo_ms: disks
                    .iter()
                    .filter(|d| ids.contains(&d.disk_id))
                    .map(|d| d.rpo_ms)
                    .max()
                    .unwrap_or(0)
                    .max(
                        now_us().saturating_sub(
                            s.map_or(0, |s| s.last_cut_time_us)
                                .max(state.groups.since_us),
                        ) / 1000,
                    ),
                disks: ids,
                cuts_made: s.map_or(0, |s| s.made),
                cuts_abandoned: s.map_or(0, |s| s.abandoned),
                cuts_skipped: s.map_or(0, |s| s.skipped),
                last_cut_id: s.map_or(0, |s| s.last_cut_id),
                last_cut_time_us: s.map_or(0, |s| s.last_cut_time_us),
                last_abandoned: s.map(|s| s.last_abandoned.clone()).unwrap_or_default(),
                pause_p50_us: crate::groups::percentile(&pauses, 50.0),
                pause_p99_us: crate::groups::percentile(&pauses, 99.0),
                pause_max_us: pauses.iter().copied().max().unwrap_or(0),
            }
        })
        .collect()
}

/// What an on-demand group bookmark became.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct BookmarkResult {
    /// The cut's id (the group point's id on the master target).
    pub cut_id: u64,
    /// Each disk's marker LSN.
    pub marks: BTreeMap<u64, u64>,
    /// Every marker is durable on the master target (the group point exists there).
    pub durable: bool,
}

/// Takes an app-consistent group bookmark now and waits (up to `wait`) until every
/// disk's marker is durable on the master target.
pub async fn bookmark(
    state: &State,
    group: &str,
    tag: &str,
    wait: Duration,
) -> Result<BookmarkResult, String> {
    let Some(tx) = state.groups.demands.get(group) else {
        return Err(format!(
            "replication group {group} is not configured on this process server"
        ));
    };
    wire_protocol::message::validate_tag(tag).map_err(|e| e.to_string())?;
    let (reply, rx) = oneshot::channel();
    tx.try_send(Demand {
        tag: tag.into(),
        reply,
    })
    .map_err(|_| format!("group {group} has {DEMAND_QUEUE} bookmarks queued already; retry"))?;
    let (cut_id, outcome) = rx
        .await
        .map_err(|_| "the process server is stopping".to_owned())?;
    let marks = match outcome {
        Outcome::Made { marks, .. } => marks,
        Outcome::Abandoned(why) => return Err(format!("the group bookmark was abandoned: {why}")),
    };
    let deadline = Instant::now() + wait;
    // Bounded by the deadline.
    let durable = loop {
        let done = marks.iter().all(|(d, lsn)| {
            state.disk(*d).is_some_and(|d| {
                d.counters
                    .mt_durable_lsn
                    .load(std::sync::atomic::Ordering::Acquire)
                    >= *lsn
            })
        });
        if done || Instant::now() >= deadline {
            break done;
        }
        tokio::time::sleep(Duration::from_millis(DURABLE_POLL_MS)).await;
    };
    Ok(BookmarkResult {
        cut_id,
        marks,
        durable,
    })
}
