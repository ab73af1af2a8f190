//! Agent connections: handshake, caching with group-committed fsync, acks, relays.
//!
//! Frames are read with the frame layer so that they can be cached exactly as received;
//! each is also decoded to learn its LSNs. Everything readable at once (up to
//! [`MAX_GROUP_FRAMES`]) is appended, then each touched cache is fsynced once, then acked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::{FutureExt, SinkExt, StreamExt};
use runtime::net::{spawn_server, Peer, Refusals, ServerPolicy};
use runtime::tls::{Identity, PeerRole};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::{Decoder, Encoder, Framed, FramedParts};
use wire_protocol::frame::{put_frame, Frame, FrameCodec};
use wire_protocol::{
    Ack, AckEntry, BookmarkKind, DiskAttach, ErrorCode, ErrorMsg, Message, MessageCodec, Nack, Role,
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
            match connection(peer, state).await {
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
    })
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
    for i in 0..state.uplinks.len() {
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

/// Whether VM `vm` may touch `disk`: a disk belongs to the VM that attached it.
fn owns(vm: &str, disk: &Disk) -> bool {
    disk.attach.vm_id == vm
}

/// The refusal for a disk the connection's VM may not touch: the same words whether the
/// disk exists or not, so a VM learns nothing of other VMs' disks.
fn forbidden(state: &State, identity: &Identity, disk_id: u64, what: &str) -> Message {
    state.refused.forbidden.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(%identity, disk = disk_id, request = what, "request refused: the disk is not one of this VM's");
    err_msg(
        ErrorCode::Forbidden,
        disk_id,
        format!(
            "disk {disk_id} is not attached for {}: an agent may touch only its own VM's disks",
            identity.name
        ),
    )
}

async fn connection(peer: Peer, state: Arc<State>) -> Result<()> {
    let identity = peer.identity;
    let vm = identity.name.clone();
    // From here on the connection reads raw frames (cached as received) and writes messages.
    let parts = peer.framed.into_parts();
    let mut new_parts = FramedParts::new::<Message>(parts.io, IngestCodec::default());
    new_parts.read_buf = parts.read_buf;
    new_parts.write_buf = parts.write_buf;
    let mut framed = Framed::from_parts(new_parts);
    framed.codec_mut().messages.set_version(peer.version);
    let mut decoder = MessageCodec::default();

    // Disks this connection attached, and those it was told to resync.
    let (mut attached, mut told) = (
        std::collections::HashSet::new(),
        std::collections::HashSet::new(),
    );
    // How far each attached disk is durable on the master target, as last told the agent.
    let mut told_durable: HashMap<u64, u64> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(REMOTE_DURABLE_EVERY_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            f = framed.next() => match f {
                Some(f) => f,
                None => return Ok(()),
            },
            _ = tick.tick() => {
                let mut any = false;
                for id in &attached {
                    let Some(d) = state.disk(*id) else { continue };
                    let lsn = d.counters.mt_durable_lsn.load(Ordering::Acquire);
                    if told_durable.insert(*id, lsn) != Some(lsn) {
                        framed.feed(Message::RemoteDurable { disk_id: *id, lsn }).await?;
                        any = true;
                    }
                }
                if any {
                    framed.flush().await?;
                }
                continue;
            }
        };
        let mut frames = vec![first];
        let mut group_bytes = 0;
        while frames.len() < MAX_GROUP_FRAMES && group_bytes < MAX_GROUP_BYTES {
            match framed.next().now_or_never() {
                Some(Some(f)) => {
                    group_bytes += f.as_ref().map_or(0, |f| f.payload.len());
                    frames.push(f);
                }
                _ => break,
            }
        }
        let mut touched: HashMap<u64, u64> = HashMap::new();
        let mut replies = Vec::new();
        for f in frames {
            let frame = match f {
                Ok(f) => f,
                Err(e) => {
                    let _ = framed
                        .send(err_msg(ErrorCode::Malformed, 0, e.to_string()))
                        .await;
                    return Err(e.into());
                }
            };
            let header = frame.header;
            let payload = frame.payload.clone();
            let msg = match decoder.decode_frame(frame) {
                Ok(m) => m,
                Err(e) => {
                    let _ = framed
                        .send(err_msg(ErrorCode::Malformed, 0, e.to_string()))
                        .await;
                    return Err(e.into());
                }
            };
            let span = match &msg {
                Message::WriteBatch(b) => Some((
                    b.disk_id,
                    b.first_lsn,
                    b.last_lsn(),
                    b.writes.first().map_or(0, |w| w.timestamp_us),
                    b.data_len() as u64,
                )),
                Message::Bookmark(b) => Some((b.disk_id, b.lsn, b.lsn, b.time_us, 0)),
                _ => None,
            };
            let completes_resync =
                matches!(&msg, Message::Bookmark(b) if b.kind == BookmarkKind::ResyncCompleted);
            let starts_resync =
                matches!(&msg, Message::Bookmark(b) if b.kind == BookmarkKind::ResyncStarted);
            if let Some((disk_id, first, last, ts, data_len)) = span {
                let Some(disk) = state.disk(disk_id).filter(|d| owns(&vm, d)) else {
                    replies.push(forbidden(&state, &identity, disk_id, msg.name()));
                    continue;
                };
                if disk.is_detached() {
                    replies.push(detached(disk_id));
                    continue;
                }
                wait_for_space(&state).await;
                let mut cache = disk.cache.lock().expect("poisoned");
                let next = cache.last_lsn() + 1;
                if last < next {
                    touched.entry(disk_id).or_insert(0);
                    continue; // a resend of what we hold: ack again
                }
                if first != next {
                    replies.push(Message::Nack(Nack {
                        disk_id,
                        from_lsn: next,
                        code: ErrorCode::LsnGap,
                        reason: format!("expected lsn {next}"),
                    }));
                    continue;
                }
                let mut bytes = BytesMut::with_capacity(payload.len() + 32);
                put_frame(header, &payload, &mut bytes)?;
                if let Err(e) = cache.append(first, last, ts, &bytes) {
                    tracing::error!(disk = disk_id, error = %e, "cache append failed; not acknowledged");
                    replies.push(err_msg(ErrorCode::Internal, disk_id, e.to_string()));
                    continue;
                }
                disk.counters
                    .ingest_bytes
                    .fetch_add(data_len, Ordering::Relaxed);
                touched.insert(disk_id, last);
                if completes_resync {
                    disk.resync_done();
                    disk.resyncing.store(false, Ordering::Release);
                    told.remove(&disk_id);
                }
                if starts_resync {
                    disk.resyncing.store(true, Ordering::Release);
                }
                continue;
            }
            match msg {
                Message::DiskAttach(a) => {
                    let id = a.disk_id;
                    if a.vm_id != vm {
                        replies.push(forbidden(&state, &identity, id, "disk attach"));
                        continue;
                    }
                    if let Err(e) = wire_protocol::message::validate_name("vm id", &a.vm_id) {
                        replies.push(err_msg(ErrorCode::Malformed, id, e.to_string()));
                        continue;
                    }
                    let reply = match state.disk(id) {
                        Some(d) if !owns(&vm, &d) => {
                            forbidden(&state, &identity, id, "disk attach")
                        }
                        Some(d) if d.is_detached() => detached(id),
                        Some(d)
                            if d.attach.disk_uuid == a.disk_uuid
                                && d.attach.size_bytes == a.size_bytes =>
                        {
                            Message::Ack(Ack {
                                entries: vec![AckEntry {
                                    disk_id: id,
                                    durable_lsn: d.cache.lock().expect("poisoned").last_lsn(),
                                }],
                            })
                        }
                        Some(_) => err_msg(
                            ErrorCode::DuplicateUuid,
                            id,
                            format!("disk {id} is attached already with another UUID or size"),
                        ),
                        None if state.disks_of(&vm) >= MAX_DISKS_PER_VM => err_msg(
                            ErrorCode::DiskLimit,
                            id,
                            format!("VM {vm} has {MAX_DISKS_PER_VM} disks here already (the most one VM may have); retire detached ones (process-server retire) first"),
                        ),
                        None => match attach_new(&state, &a).await {
                            Ok((route, lsn)) => match state.add_disk(a, lsn, route) {
                                Ok(d) => Message::Ack(Ack {
                                    entries: vec![AckEntry {
                                        disk_id: id,
                                        durable_lsn: d.cache.lock().expect("poisoned").last_lsn(),
                                    }],
                                }),
                                Err(e) => err_msg(ErrorCode::Internal, id, e.to_string()),
                            },
                            Err(e) => Message::Error(e),
                        },
                    };
                    // Only a disk this VM may touch joins the connection's set (it is told of
                    // that disk's durability and resync needs, nothing of others').
                    if matches!(reply, Message::Ack(_)) {
                        attached.insert(id);
                    }
                    replies.push(reply);
                }
                Message::DigestRequest(r) => {
                    if !state.disk(r.disk_id).is_some_and(|d| owns(&vm, &d)) {
                        replies.push(forbidden(&state, &identity, r.disk_id, "digest request"));
                        continue;
                    }
                    replies.push(
                        match relay(
                            &state,
                            route_of(&state, r.disk_id),
                            |tx| UplinkRequest::Digests(r, tx),
                            r.disk_id,
                        )
                        .await
                        {
                            Ok(l) => Message::DigestList(l),
                            Err(e) => Message::Error(e),
                        },
                    );
                }
                Message::Detach { disk_id } => {
                    state.refused.forbidden.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%identity, disk = disk_id, "an agent asked for a detach: refused");
                    replies.push(err_msg(
                        ErrorCode::Forbidden,
                        disk_id,
                        "detach is an operator command: run master-target detach with an operator's certificate".into(),
                    ));
                }
                Message::Heartbeat { seq, time_us } => {
                    replies.push(Message::Heartbeat { seq, time_us })
                }
                Message::Ignored { .. } => {}
                other => replies.push(err_msg(
                    ErrorCode::Malformed,
                    0,
                    format!(
                        "a process server does not take {} messages from agents",
                        other.name()
                    ),
                )),
            }
        }
        // A disk whose data was lost here (a corrupt cache record) is resynced by its agent:
        // tell each connection that attached it, once.
        for id in &attached {
            if !told.contains(id)
                && state
                    .disk(*id)
                    .is_some_and(|d| d.resync_required.load(Ordering::Acquire))
            {
                told.insert(*id);
                replies.push(err_msg(ErrorCode::ResyncRequired, *id, format!("data of disk {id} was lost in the process server's cache (a corrupt record): resync the disk (agent resync --mode differential)")));
            }
        }
        // Group commit: one fsync per touched disk, then the acks.
        let mut entries = Vec::new();
        for (disk_id, _) in touched {
            let disk = state.disk(disk_id).expect("touched disks exist");
            let cache = disk.cache.lock().expect("poisoned");
            match cache.sync() {
                Ok(()) => entries.push(AckEntry {
                    disk_id,
                    durable_lsn: cache.last_lsn(),
                }),
                Err(e) => {
                    tracing::error!(disk = disk_id, error = %e, "cache fsync failed; not acknowledged");
                    replies.push(err_msg(ErrorCode::Internal, disk_id, e.to_string()));
                }
            }
        }
        if !entries.is_empty() {
            state.work.notify_one();
            framed.feed(Message::Ack(Ack { entries })).await?;
        }
        for r in replies {
            framed.feed(r).await?;
        }
        framed.flush().await?;
    }
}

/// Waits while the cache is over its limit: agents slow down, nothing is dropped.
async fn wait_for_space(state: &State) {
    let mut warned = false;
    loop {
        let used = state.cache_bytes();
        if used < state.cache_limit_bytes {
            if warned {
                tracing::info!(
                    used_bytes = used,
                    "cache has room again; acknowledging resumes"
                );
            }
            return;
        }
        if !warned {
            tracing::warn!(used_bytes = used, limit_bytes = state.cache_limit_bytes, "cache full: holding agents' writes unacknowledged until the master target drains it");
            warned = true;
        }
        let _ = tokio::time::timeout(Duration::from_millis(500), state.space.notified()).await;
    }
}
