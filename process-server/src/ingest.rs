//! Agent connections: handshake, caching with group-committed fsync, acks, relays.
//!
//! Frames are read with the frame layer so that they can be cached exactly as received;
//! each is also decoded to learn its LSNs and check its content. Everything readable at
//! once (up to [`MAX_GROUP_FRAMES`]) is appended, then each touched cache is fsynced once,
//! then acked ([`session`]). This module holds what a connection asks of the process
//! server: attaches, relays to the master target, refusals.

mod session;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use runtime::net::{spawn_server, Refusals, ServerPolicy};
use runtime::tls::{Identity, PeerRole};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::{Decoder, Encoder};
use wire_protocol::frame::{Frame, FrameCodec};
use wire_protocol::{
    Ack, AckEntry, DiskAttach, ErrorCode, ErrorMsg, Message, MessageCodec, Nack, Role,
};

use crate::error::Result;
use crate::state::{Disk, State, UplinkRequest};

/// At most this many agent connections at once (agents keep one connection per disk; 128
/// disk streams at once leave room). Memory per connection is bounded by one read group
/// ([`MAX_GROUP_BYTES`] plus a frame) and its replies.
pub const MAX_AGENT_CONNECTIONS: usize = 256;
/// At most this many connections of one VM at once: one per disk, and a VM has at most 60
/// disks on a master target.
pub const MAX_CONNECTIONS_PER_VM: usize = 64;
/// At most this many disks of one VM (not retired) on this process server: one VM's agent
/// cannot take every master target's 60 places.
pub const MAX_DISKS_PER_VM: usize = 32;
/// How often an agent is told how far its disks are durable on the master target (only
/// when that changed): what `agent bookmark` waits on.
pub const REMOTE_DURABLE_EVERY_MS: u64 = 100;

/// How long an append waits for room on a full cache volume before it tries again.
pub const FULL_RETRY_MS: u64 = 500;
/// Frames appended before one fsync and one round of acks.
pub const MAX_GROUP_FRAMES: usize = 64;
/// ... or this many payload bytes: with frames of up to 16 MiB, the frame count alone would
/// let one connection hold 1 GiB. This bounds it to 32 MiB plus one frame.
pub const MAX_GROUP_BYTES: usize = 32 << 20;
/// How long a relayed request waits for the master target.
pub const RELAY_TIMEOUT_MS: u64 = 60_000;

/// Reads frames, writes messages.
#[derive(Default)]
struct IngestCodec {
    frames: FrameCodec,
    messages: MessageCodec,
}

impl Decoder for IngestCodec {
    type Item = Frame;
    type Error = wire_protocol::Error;
    fn decode(&mut self, src: &mut BytesMut) -> wire_protocol::Result<Option<Frame>> {
        self.frames.decode(src)
    }
    fn decode_eof(&mut self, src: &mut BytesMut) -> wire_protocol::Result<Option<Frame>> {
        self.frames.decode_eof(src)
    }
}

impl Encoder<Message> for IngestCodec {
    type Error = wire_protocol::Error;
    fn encode(&mut self, m: Message, dst: &mut BytesMut) -> wire_protocol::Result<()> {
        self.messages.encode(&m, dst)
    }
}

/// Agent requests refused past the handshake, for metrics.
#[derive(Debug, Default)]
pub struct RequestRefusals {
    /// Requests for disks of another VM, or operator commands.
    pub forbidden: AtomicU64,
}

/// Accepts agents on `listener` until the process ends: the certificate must be an agent's,
/// and each connection may touch only the disks of the VM its certificate names.
pub fn spawn(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    refusals: Arc<Refusals>,
) {
    let policy = ServerPolicy {
        service: "process server",
        our_role: Role::ProcessServer,
        node_id: "process-server".into(),
        allowed: vec![(PeerRole::Agent, Role::Agent)],
        max_connections: MAX_AGENT_CONNECTIONS,
        max_connections_per_identity: MAX_CONNECTIONS_PER_VM,
    };
    spawn_server(listener, acceptor, policy, refusals, move |peer| {
        let state = Arc::clone(&state);
        async move {
            let (addr, identity) = (peer.addr, peer.identity.clone());
            match session::connection(peer, state).await {
                Ok(()) => tracing::info!(%addr, %identity, "agent disconnected"),
                Err(e) => tracing::warn!(%addr, %identity, error = %e, "agent connection ended"),
            }
        }
    });
}

fn detached(disk_id: u64) -> Message {
    err_msg(
        ErrorCode::Detached,
        disk_id,
        format!("disk {disk_id} was detached for failback: it takes no more writes"),
    )
}

fn err_msg(code: ErrorCode, disk_id: u64, message: String) -> Message {
    Message::Error(ErrorMsg {
        code,
        disk_id,
        message,
        request_id: 0,
    })
}

/// `reply` as the answer to the agent's request `request_id` (the master target's answer
/// carried the uplink's own id).
fn answering(request_id: u64, mut reply: Message) -> Message {
    if matches!(reply, Message::Error(_) | Message::DigestList(_)) {
        reply.set_request_id(request_id);
    }
    reply
}

async fn relay<T>(
    state: &State,
    uplink: usize,
    make: impl FnOnce(oneshot::Sender<Result<T, ErrorMsg>>) -> UplinkRequest,
    disk_id: u64,
) -> Result<T, ErrorMsg> {
    let u = &state.uplinks[uplink];
    let not_ready = || ErrorMsg {
        code: ErrorCode::NotReady,
        disk_id,
        message: format!(
            "the process server is not connected to the master target {}; retry later",
            u.target.addr
        ),
        request_id: 0,
    };
    if !u.connected.load(Ordering::Acquire) {
        return Err(not_ready());
    }
    let (tx, rx) = oneshot::channel();
    u.requests.send(make(tx)).await.map_err(|_| not_ready())?;
    match tokio::time::timeout(Duration::from_millis(RELAY_TIMEOUT_MS), rx).await {
        Ok(Ok(r)) => r,
        _ => Err(not_ready()),
    }
}

/// The master target a disk replicates to (the first, for a disk not known here: its
/// request then gets that master target's own "not attached" answer).
fn route_of(state: &State, disk_id: u64) -> usize {
    state.disk(disk_id).map_or(0, |d| d.route)
}

/// Attaches a new disk on the first master target that takes it: a master target holds at
/// most 60 disks, so a full one sends the disk on to the next. Returns the route and the
/// durable LSN.
async fn attach_new(state: &State, a: &DiskAttach) -> Result<(usize, u64), ErrorMsg> {
    let mut last = None;
    // Every disk of a replication group goes to the master target its first disk went to.
    let routes = match crate::cuts::group_route(state, &a.group_id) {
        Some(r) => r..r + 1,
        None => 0..state.uplinks.len(),
    };
    for i in routes {
        match relay(
            state,
            i,
            |tx| UplinkRequest::Attach(a.clone(), tx),
            a.disk_id,
        )
        .await
        {
            Ok(lsn) => return Ok((i, lsn)),
            Err(e) if e.code == ErrorCode::DiskLimit => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("at least one master target"))
}

/// How far ahead of this process server's clock a record's time may be. Machines kept by
/// NTP agree within seconds; a record from further in the future would become its disk's
/// newest point on the master target, whose retention window counts back from the newest
/// point: one future-dated bookmark would age out every real point of that disk (and with
/// them every group point of its group). Found by the group simulation.
pub const MAX_CLOCK_LEAD_US: u64 = 600_000_000;

/// Whether a record's time (`time_us`) is too far ahead of `now_us` (see
/// [`MAX_CLOCK_LEAD_US`]).
pub fn from_the_future(time_us: u64, now_us: u64) -> bool {
    time_us > now_us.saturating_add(MAX_CLOCK_LEAD_US)
}

/// The refusal of a batch or bookmark whose content the master target would refuse: a
/// write past the disk's end (the agent is broken: permanent), data that does not match its
/// digest (damaged on the way: resend), a tag that is not a tag (permanent), a time more
/// than [`MAX_CLOCK_LEAD_US`] ahead of this process server's clock (permanent: the agent's
/// clock is wrong).
fn refuse_content(msg: &Message, size_bytes: u64) -> Option<Message> {
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let (disk_id, newest_us) = match msg {
        Message::WriteBatch(b) => (
            b.disk_id,
            b.writes.iter().map(|w| w.timestamp_us).max().unwrap_or(0),
        ),
        Message::Bookmark(bm) => (bm.disk_id, bm.time_us),
        _ => (0, 0),
    };
    if from_the_future(newest_us, now_us) {
        return Some(err_msg(
            ErrorCode::OutOfRange,
            disk_id,
            format!(
                "a record timed {} s ahead of the process server's clock (at most {} s): the agent's clock is wrong; set it (NTP) and start the agent again",
                (newest_us - now_us) / 1_000_000,
                MAX_CLOCK_LEAD_US / 1_000_000
            ),
        ));
    }
    match msg {
        Message::WriteBatch(b) => {
            if let Some(w) = b.writes.iter().find(|w| {
                w.offset
                    .checked_add(w.data.len() as u64)
                    .is_none_or(|end| end > size_bytes)
            }) {
                return Some(err_msg(
                    ErrorCode::OutOfRange,
                    b.disk_id,
                    format!(
                        "a write at {}+{} ends past the disk's {size_bytes} bytes",
                        w.offset,
                        w.data.len()
                    ),
                ));
            }
            let bad = b
                .writes
                .iter()
                .position(|w| !wire_protocol::digest_matches(w))?;
            Some(Message::Nack(Nack {
                disk_id: b.disk_id,
                from_lsn: b.first_lsn,
                code: ErrorCode::DigestMismatch,
                reason: format!(
                    "write lsn {} does not match its digest: resend",
                    b.first_lsn + bad as u64
                ),
            }))
        }
        Message::Bookmark(bm) => wire_protocol::message::validate_tag(&bm.tag)
            .err()
            .map(|e| err_msg(ErrorCode::Malformed, bm.disk_id, e.to_string())),
        _ => None,
    }
}

/// An agent's attach: checked against its VM, then (one new disk at a time, so the checks
/// and the registration are one step that concurrent attaches cannot interleave with)
/// registered here and on the master target.
async fn attach(
    state: &State,
    identity: &Identity,
    a: DiskAttach,
    (version, conn, addr): (u16, u64, std::net::SocketAddr),
) -> Message {
    let (id, vm) = (a.disk_id, identity.name.as_str());
    if a.vm_id != vm {
        return forbidden(state, identity, id, "disk attach");
    }
    let invalid = if id == 0 {
        Some("disk id 0 is never a disk".to_owned())
    } else if !a.group_id.is_empty() {
        wire_protocol::message::validate_name("group id", &a.group_id)
            .err()
            .map(|e| e.to_string())
    } else if !matches!(a.sector_size, 512 | 4096) {
        Some(format!("sector size {} (512 or 4096)", a.sector_size))
    } else {
        None
    };
    if let Some(why) = invalid {
        return err_msg(
            ErrorCode::Malformed,
            id,
            format!("disk attach: invalid {why}"),
        );
    }
    let _one_at_a_time = state.attach_lock.lock().await;
    if let Some(why) = state
        .disk(id)
        .filter(|d| owns(vm, d) && d.attach.group_id != a.group_id)
        .map(|d| format!("disk {id} was attached in replication group {:?}, not {:?}: a disk stays in its group (retire it and protect it again to change)", d.attach.group_id, a.group_id))
        .or_else(|| crate::cuts::attach_refusal(state, vm, &a, version))
    {
        state.refused.forbidden.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%identity, disk = id, group = %a.group_id, reason = %why, "attach refused by a replication group rule");
        // Not ready rather than refused for good: the fix is in this process server's
        // configuration, and an agent told "never" would stop capturing (a live disk would
        // fail its VM's I/O); told "not yet", it keeps the VM running and tries again.
        return err_msg(ErrorCode::NotReady, id, format!("not ready for this disk, by a replication group rule: {why}"));
    }
    if let Some(h) = state
        .disk(id)
        .filter(|d| owns(vm, d))
        .and_then(|_| state.held_elsewhere(id, conn))
    {
        let since_s = h.since.elapsed().map_or(0, |d| d.as_secs());
        tracing::warn!(%identity, disk = id, from = %addr, holder = %h.addr, "attach refused: another connection streams this disk");
        return err_msg(
            ErrorCode::NotReady,
            id,
            format!("disk {id} of VM {vm} is being streamed by another agent (connected from {}, for {since_s} s): a disk has one agent, and two would mix two disks' writes on the target. Give each disk its own --disk-id. If that agent is gone, its connection closes within {} s and this attach is taken then", h.addr, runtime::net::KEEPALIVE_IDLE_S + u64::from(runtime::net::KEEPALIVE_RETRIES) * runtime::net::KEEPALIVE_INTERVAL_S),
        );
    }
    let reply = attach_disk(state, identity, &a, vm).await;
    if matches!(reply, Message::Ack(_)) {
        let since = std::time::SystemTime::now();
        state.hold(id, crate::state::Holder { conn, addr, since });
    }
    reply
}

/// The attach of a disk no other connection streams: its durable LSN, or why not.
async fn attach_disk(state: &State, identity: &Identity, a: &DiskAttach, vm: &str) -> Message {
    let id = a.disk_id;
    let durable = |d: &Disk| {
        Message::Ack(Ack {
            entries: vec![AckEntry {
                disk_id: id,
                durable_lsn: d.cache.lock().expect("poisoned").durable_lsn(),
            }],
        })
    };
    match state.disk(id) {
        Some(d) if !owns(vm, &d) => forbidden(state, identity, id, "disk attach"),
        Some(d) if d.is_detached() => detached(id),
        Some(d) if !d.cache.lock().expect("poisoned").position_known() => err_msg(
            ErrorCode::NotReady,
            id,
            format!("disk {id}: this process server's record of where the disk's stream stands is damaged; it waits for the master target to say (when the link is up); retry"),
        ),
        Some(d) if d.attach.disk_uuid == a.disk_uuid && d.attach.size_bytes == a.size_bytes => {
            durable(&d)
        }
        Some(_) => err_msg(
            ErrorCode::DuplicateUuid,
            id,
            format!("disk {id} is attached already with another UUID or size"),
        ),
        None => {
            let have = state.disks_of(vm);
            if have >= MAX_DISKS_PER_VM {
                return err_msg(
                    ErrorCode::DiskLimit,
                    id,
                    format!("VM {vm} has {have} disks here already ({MAX_DISKS_PER_VM} at most); retire detached ones (process-server retire) first"),
                );
            }
            match attach_new(state, a).await {
                Ok((route, lsn)) => match state.add_disk(a.clone(), lsn, route) {
                    Ok(d) => durable(&d),
                    Err(e) => err_msg(ErrorCode::Internal, id, e.to_string()),
                },
                Err(e) => Message::Error(e),
            }
        }
    }
}

/// Whether VM `vm` may touch `disk`: a disk belongs to the VM that attached it.
fn owns(vm: &str, disk: &Disk) -> bool {
    disk.attach.vm_id == vm
}

/// The refusal for a disk the connection's VM may not touch: the same words whether the
/// disk exists or not, so a VM learns nothing of other VMs' disks.
fn forbidden(state: &State, identity: &Identity, disk_id: u64, what: &str) -> Message {
    state.refused.forbidden.fetch_add(1, Ordering::Relaxed);
    if let Some(suppressed) = state.refusal_log.admit(&identity.name) {
        tracing::warn!(%identity, disk = disk_id, request = what, suppressed, "request refused: the disk is not one of this VM's");
    }
    err_msg(
        ErrorCode::Forbidden,
        disk_id,
        format!(
            "disk {disk_id} is not attached for {}: an agent may touch only its own VM's disks",
            identity.name
        ),
    )
}
