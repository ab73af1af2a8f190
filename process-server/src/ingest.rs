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

use crate::error::{Error, Result};
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
/// What became of a record offered to the cache.
enum Append {
    /// Appended.
    New,
    /// Held already (a resend): acknowledged again.
    Held,
    /// Not taken: the reply says why.
    Refused(Message),
    /// The volume is full: wait for room and offer it again.
    Full,
}

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

/// The refusal of a batch or bookmark whose content the master target would refuse: a
/// write past the disk's end (the agent is broken: permanent), data that does not match its
/// digest (damaged on the way: resend), a tag that is not a tag (permanent).
fn refuse_content(msg: &Message, size_bytes: u64) -> Option<Message> {
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
                .position(|w| wire_protocol::digest(&w.data) != w.digest)?;
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
async fn attach(state: &State, identity: &Identity, a: DiskAttach) -> Message {
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
    let durable = |d: &Disk| {
        Message::Ack(Ack {
            entries: vec![AckEntry {
                disk_id: id,
                durable_lsn: d.cache.lock().expect("poisoned").durable_lsn(),
            }],
        })
    };
    let _one_at_a_time = state.attach_lock.lock().await;
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
            match attach_new(state, &a).await {
                Ok((route, lsn)) => match state.add_disk(a, lsn, route) {
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
    // Each attached disk's stream epoch at its attach: a disk whose stream restarted since
    // (DiskCache::adopt_remote) closes the connection, so the agent attaches again.
    let mut epochs: HashMap<u64, u64> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(REMOTE_DURABLE_EVERY_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            f = framed.next() => match f {
                Some(f) => f,
                None => return Ok(()),
            },
            _ = tick.tick() => {
                // A loss found while the agent is quiet (the uplink reading a damaged
                // record) reaches it here, not only with its next message.
                let mut any = false;
                for r in resync_notices(&state, &attached, &mut told) {
                    framed.feed(r).await?;
                    any = true;
                }
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
                if epochs
                    .get(&disk_id)
                    .is_some_and(|e| *e != disk.stream_epoch.load(Ordering::Acquire))
                {
                    tracing::warn!(disk = disk_id, vm = %vm, "the disk's stream restarts after the master target's position: closing the agent's connection so it attaches again");
                    return Err(Error::Refused(format!(
                        "disk {disk_id}: the stream restarts; attach again"
                    )));
                }
                // What can be checked here is, before anything is acknowledged: a write the
                // master target would refuse must never be acknowledged to the agent.
                if let Some(r) = refuse_content(&msg, disk.attach.size_bytes) {
                    replies.push(r);
                    continue;
                }
                let mut bytes = BytesMut::with_capacity(payload.len() + 32);
                put_frame(header, &payload, &mut bytes)?;
                // A full cache (over its limit, or the volume itself full) holds the agent
                // back: nothing is acknowledged until the record is written; nothing fails.
                let appended = loop {
                    if state.cache_bytes() >= state.cache_limit_bytes {
                        commit_touched(&state, &touched);
                    }
                    wait_for_space(&state).await;
                    let r = {
                        let mut cache = disk.cache.lock().expect("poisoned");
                        let next = cache.last_lsn() + 1;
                        if !cache.position_known() {
                            Append::Refused(err_msg(
                                ErrorCode::NotReady,
                                disk_id,
                                format!("disk {disk_id}: waiting for the master target to say where the disk's stream stands; retry"),
                            ))
                        } else if last < next {
                            Append::Held // a resend of what we hold: ack again
                        } else if first != next {
                            Append::Refused(Message::Nack(Nack {
                                disk_id,
                                from_lsn: next,
                                code: ErrorCode::LsnGap,
                                reason: format!("expected lsn {next}"),
                            }))
                        } else {
                            match cache.append(first, last, ts, &bytes) {
                                Ok(()) => Append::New,
                                Err(e) if e.is_out_of_space() => {
                                    if let Some(suppressed) = state.refusal_log.admit("volume full")
                                    {
                                        tracing::warn!(disk = disk_id, error = %e, suppressed, "the cache volume is full: holding agents' writes unacknowledged until the master target drains it");
                                    }
                                    Append::Full
                                }
                                Err(e) => {
                                    tracing::error!(disk = disk_id, error = %e, "cache append failed; not acknowledged");
                                    Append::Refused(err_msg(
                                        ErrorCode::Internal,
                                        disk_id,
                                        e.to_string(),
                                    ))
                                }
                            }
                        }
                    };
                    match r {
                        // Full: wait for room (a trim), then try again.
                        Append::Full => {
                            commit_touched(&state, &touched);
                            let _ = tokio::time::timeout(
                                Duration::from_millis(FULL_RETRY_MS),
                                state.space.notified(),
                            )
                            .await;
                        }
                        r => break r,
                    }
                };
                match appended {
                    Append::Held => {
                        touched.entry(disk_id).or_insert(0);
                        continue;
                    }
                    Append::Refused(reply) => {
                        replies.push(reply);
                        continue;
                    }
                    Append::New | Append::Full => {}
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
                    let (id, request_id) = (a.disk_id, a.request_id);
                    // Read before the attach answers with where to resume: a restart in
                    // between then closes this connection rather than go unnoticed.
                    let epoch = state
                        .disk(id)
                        .map_or(0, |d| d.stream_epoch.load(Ordering::Acquire));
                    let reply = attach(&state, &identity, a).await;
                    // Only a disk this VM may touch joins the connection's set (it is told of
                    // that disk's durability and resync needs, nothing of others').
                    if matches!(reply, Message::Ack(_)) {
                        attached.insert(id);
                        epochs.insert(id, epoch);
                    }
                    replies.push(answering(request_id, reply));
                }
                Message::DigestRequest(r) => {
                    if !state.disk(r.disk_id).is_some_and(|d| owns(&vm, &d)) {
                        let refusal = forbidden(&state, &identity, r.disk_id, "digest request");
                        replies.push(answering(r.request_id, refusal));
                        continue;
                    }
                    replies.push(answering(
                        r.request_id,
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
                    ));
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
        replies.extend(resync_notices(&state, &attached, &mut told));
        // Group commit: one fsync per touched disk, then the acks.
        let mut entries = Vec::new();
        for (disk_id, _) in touched {
            let disk = state.disk(disk_id).expect("touched disks exist");
            let mut cache = disk.cache.lock().expect("poisoned");
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

/// A disk whose data was lost here (a corrupt cache record) is resynced by its agent: the
/// messages that tell a connection so, once per disk it attached.
fn resync_notices(
    state: &State,
    attached: &std::collections::HashSet<u64>,
    told: &mut std::collections::HashSet<u64>,
) -> Vec<Message> {
    let mut out = Vec::new();
    for id in attached {
        if !told.contains(id)
            && state
                .disk(*id)
                .is_some_and(|d| d.resync_required.load(Ordering::Acquire))
        {
            told.insert(*id);
            out.push(err_msg(ErrorCode::ResyncRequired, *id, format!("data of disk {id} was lost in the process server's cache (a corrupt record): resync the disk (agent resync --mode differential)")));
        }
    }
    out
}

/// Waits while the cache is over its limit: agents slow down, nothing is dropped.
/// Makes durable what this burst appended so far, before it waits for room: the uplink
/// ships only durable records, and only their shipping (and trimming) makes room. A
/// failure is answered at the burst's own group commit.
fn commit_touched(state: &State, touched: &HashMap<u64, u64>) {
    for disk_id in touched.keys() {
        if let Some(d) = state.disk(*disk_id) {
            let _ = d.cache.lock().expect("poisoned").sync();
        }
    }
    state.work.notify_one();
}

async fn wait_for_space(state: &State) {
    let mut warned = false;
    loop {
        let used = state.cache_bytes();
        if used < state.cache_limit_bytes {
            if warned {
                if let Some(suppressed) = state.refusal_log.admit("cache room") {
                    tracing::info!(
                        used_bytes = used,
                        suppressed,
                        "cache has room again; acknowledging resumes"
                    );
                }
            }
            return;
        }
        if !warned {
            if let Some(suppressed) = state.refusal_log.admit("cache full") {
                tracing::warn!(used_bytes = used, limit_bytes = state.cache_limit_bytes, suppressed, "cache full: holding agents' writes unacknowledged until the master target drains it");
            }
            warned = true;
        }
        let _ = tokio::time::timeout(Duration::from_millis(500), state.space.notified()).await;
    }
}
