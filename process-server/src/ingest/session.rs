//! One agent connection: read what is readable at once (a group), cache each stream frame
//! as received, answer each request, make the group durable with one fsync per touched
//! disk, then acknowledge.
//!
//! # Design constraints
//! - Nothing is acknowledged before it is fsynced, and nothing is refused that the agent
//!   cannot resend: a full cache holds the agent back (no ack), it never drops a write.
//! - A connection touches only its VM's disks and hears only of them (durability, resync).
//! - A group is bounded ([`MAX_GROUP_FRAMES`], [`MAX_GROUP_BYTES`]): memory per connection
//!   is one group plus its replies.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, SinkExt, StreamExt};
use runtime::net::Peer;
use runtime::tls::Identity;
use tokio_util::codec::{Framed, FramedParts};
use wire_protocol::frame::Frame;
use wire_protocol::{Ack, AckEntry, BookmarkKind, ErrorCode, Message, MessageCodec, Nack};

use super::{
    answering, attach, detached, err_msg, forbidden, owns, refuse_content, relay, route_of,
    IngestCodec, FULL_RETRY_MS, MAX_GROUP_BYTES, MAX_GROUP_FRAMES, REMOTE_DURABLE_EVERY_MS,
};
use crate::error::{Error, Result};
use crate::state::{Disk, State, UplinkRequest};

/// What became of a record offered to the cache.
enum Append {
    /// Appended.
    New,
    /// Held already (a resend): acknowledged again.
    Held,
    /// Not taken: the reply says why.
    Refused(Message),
    /// The cache failed to write it (not for want of room): the reply says why.
    Failed(Message),
    /// The volume is full: wait for room and offer it again.
    Full,
}

/// A stream frame (batch or bookmark) of one disk: what the cache needs to know of it.
struct Record {
    disk_id: u64,
    first_lsn: u64,
    last_lsn: u64,
    first_ts_us: u64,
    data_bytes: u64,
}

impl Record {
    fn of(msg: &Message) -> Option<Record> {
        let (disk_id, first_lsn, last_lsn, first_ts_us, data_bytes) = match msg {
            Message::WriteBatch(b) => (
                b.disk_id,
                b.first_lsn,
                b.last_lsn(),
                b.writes.first().map_or(0, |w| w.timestamp_us),
                b.data_len() as u64,
            ),
            Message::Bookmark(b) => (b.disk_id, b.lsn, b.lsn, b.time_us, 0),
            _ => return None,
        };
        Some(Record {
            disk_id,
            first_lsn,
            last_lsn,
            first_ts_us,
            data_bytes,
        })
    }
}

/// What a group comes to.
enum Outcome {
    /// Send these (acks first) and read on.
    Replies(Vec<Message>),
    /// Send this and close: a frame that does not decode leaves the stream untrustworthy.
    Close(Message, Error),
    /// Send these and close: the cache failed to append or sync, so what the agent sent
    /// after the failure cannot be taken in order. It reconnects, hears where the cache
    /// stands, and sends the rest again. (Without the close an agent with nothing more to
    /// send, or with a full buffer, waits forever for an ack: the simulator found it.)
    Fail(Vec<Message>, Error),
}

/// What one connection knows of its disks.
struct Conn {
    state: Arc<State>,
    identity: Identity,
    /// The peer's address (named to an agent refused a disk this connection streams).
    addr: std::net::SocketAddr,
    /// Disks this connection attached (it hears of these only).
    attached: HashSet<u64>,
    /// Disks it was told to resync.
    told: HashSet<u64>,
    /// How far each attached disk is durable on the master target, as last told the agent.
    told_durable: HashMap<u64, u64>,
    /// Each attached disk's stream epoch at its attach: a disk whose stream restarted since
    /// (DiskCache::adopt_remote) closes the connection, so the agent attaches again.
    epochs: HashMap<u64, u64>,
    decoder: MessageCodec,
    /// The cache failed to take a frame of this group.
    cache_failed: bool,
    /// The protocol version spoken (replication groups need version 3).
    version: u16,
    /// This connection's number (its group disks' route is removed with it).
    id: u64,
    /// Where replication groups' cut steps for this connection's disks are queued.
    cuts: tokio::sync::mpsc::Sender<Message>,
}

/// Cut steps queued for one connection: one cut of a disk is in flight at a time (two
/// messages), so a full queue means a stuck connection, and the cut gives it up.
const CUT_OUT_QUEUE: usize = 16;

/// Numbers connections, for their group disks' routes.
static NEXT_CONN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Removes a connection's group routes and its hold on its disks when it ends, however it
/// ends.
struct Unroute(Arc<State>, u64);

impl Drop for Unroute {
    fn drop(&mut self) {
        self.0.groups.unroute(self.1);
        self.0.release_conn(self.1);
    }
}

pub(super) async fn connection(peer: Peer, state: Arc<State>) -> Result<()> {
    // From here on the connection reads raw frames (cached as received) and writes messages.
    let parts = peer.framed.into_parts();
    let mut new_parts = FramedParts::new::<Message>(parts.io, IngestCodec::default());
    new_parts.read_buf = parts.read_buf;
    new_parts.write_buf = parts.write_buf;
    let mut framed = Framed::from_parts(new_parts);
    framed.codec_mut().messages.set_version(peer.version);
    let (cuts, mut cut_rx) = tokio::sync::mpsc::channel(CUT_OUT_QUEUE);
    let id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    let _unroute = Unroute(Arc::clone(&state), id);
    let mut conn = Conn {
        version: peer.version,
        id,
        addr: peer.addr,
        cuts,
        state,
        identity: peer.identity,
        attached: HashSet::new(),
        told: HashSet::new(),
        told_durable: HashMap::new(),
        epochs: HashMap::new(),
        decoder: MessageCodec::default(),
        cache_failed: false,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(REMOTE_DURABLE_EVERY_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            f = framed.next() => match f {
                Some(f) => f,
                None => return Ok(()),
            },
            Some(m) = cut_rx.recv() => {
                // A replication group's cut step: sent at once, the agent holds writes.
                framed.send(m).await?;
                continue;
            }
            _ = tick.tick() => {
                // A loss found while the agent is quiet (the uplink reading a damaged
                // record) reaches it here, not only with its next message.
                let news = conn.news();
                for m in &news {
                    framed.feed(m.clone()).await?;
                }
                if !news.is_empty() {
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
        match conn.group(frames).await? {
            Outcome::Replies(replies) => {
                for reply in replies {
                    framed.feed(reply).await?;
                }
                framed.flush().await?;
            }
            Outcome::Close(last_word, cause) => {
                let _ = framed.send(last_word).await;
                return Err(cause);
            }
            Outcome::Fail(replies, cause) => {
                for reply in replies {
                    let _ = framed.feed(reply).await;
                }
                let _ = framed.flush().await;
                return Err(cause);
            }
        }
    }
}

impl Conn {
    /// What the agent should hear without asking: resyncs needed, durability moved.
    fn news(&mut self) -> Vec<Message> {
        let mut out = resync_notices(&self.state, &self.attached, &mut self.told);
        for id in &self.attached {
            let Some(d) = self.state.disk(*id) else {
                continue;
            };
            let lsn = d.counters.mt_durable_lsn.load(Ordering::Acquire);
            if self.told_durable.insert(*id, lsn) != Some(lsn) {
                out.push(Message::RemoteDurable { disk_id: *id, lsn });
            }
        }
        out
    }

    /// Handles a group of frames: the replies, acks first, or the last word before a close.
    async fn group(&mut self, frames: Vec<wire_protocol::Result<Frame>>) -> Result<Outcome> {
        let mut touched: HashSet<u64> = HashSet::new();
        let mut replies = Vec::new();
        for f in frames {
            // The frame as received is what the cache keeps (no second framing, no copy).
            let decoded = f.and_then(|frame| {
                let raw = frame.raw.clone();
                self.decoder.decode_frame(frame).map(|m| (m, raw))
            });
            let (msg, raw) = match decoded {
                Ok(d) => d,
                Err(e) => {
                    let last_word = err_msg(ErrorCode::Malformed, 0, e.to_string());
                    return Ok(Outcome::Close(last_word, e.into()));
                }
            };
            match Record::of(&msg) {
                Some(rec) => {
                    if let Some(reply) = self.stream(&msg, rec, &raw, &mut touched).await? {
                        replies.push(reply);
                    }
                }
                None => replies.extend(self.request(msg).await),
            }
        }
        replies.extend(resync_notices(&self.state, &self.attached, &mut self.told));
        let (ack, failures) = group_commit(&self.state, &touched);
        let appends_failed = std::mem::take(&mut self.cache_failed);
        Ok(outcome(ack, replies, failures, appends_failed))
    }

    /// Caches one stream frame of a disk this VM owns; a reply when it is not taken.
    async fn stream(
        &mut self,
        msg: &Message,
        rec: Record,
        raw: &Bytes,
        touched: &mut HashSet<u64>,
    ) -> Result<Option<Message>> {
        let state = Arc::clone(&self.state);
        let disk_id = rec.disk_id;
        let Some(disk) = state.disk(disk_id).filter(|d| owns(&self.identity.name, d)) else {
            return Ok(Some(forbidden(&state, &self.identity, disk_id, msg.name())));
        };
        if disk.is_detached() {
            return Ok(Some(detached(disk_id)));
        }
        if self
            .epochs
            .get(&disk_id)
            .is_some_and(|e| *e != disk.stream_epoch.load(Ordering::Acquire))
        {
            tracing::warn!(disk = disk_id, vm = %self.identity.name, "the disk's stream restarts after the master target's position: closing the agent's connection so it attaches again");
            return Err(Error::Refused(format!(
                "disk {disk_id}: the stream restarts; attach again"
            )));
        }
        // What can be checked here is, before anything is acknowledged: a write the master
        // target would refuse must never be acknowledged to the agent.
        if let Some(r) = refuse_content(msg, disk.attach.size_bytes) {
            return Ok(Some(r));
        }
        let stripped;
        let mut kept = false;
        let raw = match crate::cuts::check_marker(&state, &disk, msg) {
            crate::cuts::Marker::Keep => {
                kept = true;
                raw
            }
            crate::cuts::Marker::Refuse(r) => return Ok(Some(r)),
            crate::cuts::Marker::Strip(plain) => {
                stripped = MessageCodec::new(wire_protocol::Compression::None)
                    .encode_to_bytes(&plain)
                    .map_err(|e| Error::Refused(format!("re-encode a bookmark: {e}")))?;
                &stripped
            }
        };
        match append_when_room(&state, &disk, &rec, raw, touched).await {
            Append::Held => {
                touched.insert(disk_id);
                return Ok(None);
            }
            Append::Refused(reply) => return Ok(Some(reply)),
            Append::Failed(reply) => {
                self.cache_failed = true;
                return Ok(Some(reply));
            }
            Append::New | Append::Full => {}
        }
        if kept {
            crate::cuts::marker_cached(&state, msg);
        }
        disk.counters
            .ingest_bytes
            .fetch_add(rec.data_bytes, Ordering::Relaxed);
        touched.insert(disk_id);
        match msg {
            Message::Bookmark(b) if b.kind == BookmarkKind::ResyncCompleted => {
                disk.resync_done();
                disk.resyncing.store(false, Ordering::Release);
                self.told.remove(&disk_id);
            }
            Message::Bookmark(b) if b.kind == BookmarkKind::ResyncStarted => {
                disk.resyncing.store(true, Ordering::Release);
            }
            _ => {}
        }
        Ok(None)
    }

    /// Answers a message that is not part of a disk's stream.
    async fn request(&mut self, msg: Message) -> Option<Message> {
        let state = Arc::clone(&self.state);
        let identity = &self.identity;
        match msg {
            Message::DiskAttach(a) => {
                let (id, request_id) = (a.disk_id, a.request_id);
                // Read before the attach answers with where to resume: a restart in between
                // then closes this connection rather than go unnoticed.
                let epoch = state
                    .disk(id)
                    .map_or(0, |d| d.stream_epoch.load(Ordering::Acquire));
                let group = !a.group_id.is_empty();
                let reply = attach(&state, identity, a, (self.version, self.id, self.addr)).await;
                // Only a disk this VM may touch joins the connection's set (it is told of
                // that disk's durability and resync needs, nothing of others').
                if matches!(reply, Message::Ack(_)) {
                    self.attached.insert(id);
                    self.epochs.insert(id, epoch);
                    if group {
                        state.groups.route(id, self.id, self.cuts.clone());
                    }
                }
                Some(answering(request_id, reply))
            }
            Message::DigestRequest(r) => {
                if !state
                    .disk(r.disk_id)
                    .is_some_and(|d| owns(&identity.name, &d))
                {
                    let refusal = forbidden(&state, identity, r.disk_id, "digest request");
                    return Some(answering(r.request_id, refusal));
                }
                let route = route_of(&state, r.disk_id);
                let reply =
                    match relay(&state, route, |tx| UplinkRequest::Digests(r, tx), r.disk_id).await
                    {
                        Ok(l) => Message::DigestList(l),
                        Err(e) => Message::Error(e),
                    };
                Some(answering(r.request_id, reply))
            }
            Message::Detach { disk_id } => {
                state.refused.forbidden.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%identity, disk = disk_id, "an agent asked for a detach: refused");
                Some(err_msg(
                    ErrorCode::Forbidden,
                    disk_id,
                    "detach is an operator command: run master-target detach with an operator's certificate".into(),
                ))
            }
            Message::Heartbeat { seq, time_us } => Some(Message::Heartbeat { seq, time_us }),
            Message::Cut(c) => {
                // An answer counts only for a disk this connection attached.
                let Some(d) = state
                    .disk(c.disk_id)
                    .filter(|_| self.attached.contains(&c.disk_id))
                else {
                    return Some(forbidden(&state, identity, c.disk_id, "cut"));
                };
                state.groups.reply(&d.attach.group_id, c);
                None
            }
            Message::Ignored { .. } => None,
            other => Some(err_msg(
                ErrorCode::Malformed,
                0,
                format!(
                    "a process server does not take {} messages from agents",
                    other.name()
                ),
            )),
        }
    }
}

/// Offers a record to its disk's cache until it is taken, held or refused. A full cache
/// (over its limit, or the volume itself full) holds the agent back: nothing is
/// acknowledged until the record is written; nothing fails.
async fn append_when_room(
    state: &State,
    disk: &Disk,
    rec: &Record,
    raw: &Bytes,
    touched: &HashSet<u64>,
) -> Append {
    loop {
        if state.cache_bytes() >= state.cache_limit_bytes {
            commit_touched(state, touched);
        }
        wait_for_space(state).await;
        match try_append(state, disk, rec, raw) {
            // Full: wait for room (a trim), then try again.
            Append::Full => {
                commit_touched(state, touched);
                let _ = tokio::time::timeout(
                    Duration::from_millis(FULL_RETRY_MS),
                    state.space.notified(),
                )
                .await;
            }
            r => return r,
        }
    }
}

/// One offer of a record to its disk's cache.
fn try_append(state: &State, disk: &Disk, rec: &Record, raw: &Bytes) -> Append {
    let disk_id = rec.disk_id;
    let mut cache = disk.cache.lock().expect("poisoned");
    let next = cache.last_lsn() + 1;
    if !cache.position_known() {
        return Append::Refused(err_msg(
            ErrorCode::NotReady,
            disk_id,
            format!("disk {disk_id}: waiting for the master target to say where the disk's stream stands; retry"),
        ));
    }
    if rec.last_lsn < next {
        return Append::Held; // a resend of what we hold: ack again
    }
    if rec.first_lsn != next {
        return Append::Refused(Message::Nack(Nack {
            disk_id,
            from_lsn: next,
            code: ErrorCode::LsnGap,
            reason: format!("expected lsn {next}"),
        }));
    }
    match cache.append(rec.first_lsn, rec.last_lsn, rec.first_ts_us, raw) {
        Ok(()) => Append::New,
        Err(e) if e.is_out_of_space() => {
            if let Some(suppressed) = state.refusal_log.admit("volume full") {
                tracing::warn!(disk = disk_id, error = %e, suppressed, "the cache volume is full: holding agents' writes unacknowledged until the master target drains it");
            }
            Append::Full
        }
        Err(e) => {
            // Throttled: a failing volume fails every append of every reconnection.
            if let Some(suppressed) = state.refusal_log.admit("cache append failed") {
                tracing::error!(disk = disk_id, error = %e, suppressed, "cache append failed; not acknowledged; the agent's connection closes and it resumes at what is durable");
            }
            Append::Failed(err_msg(ErrorCode::Internal, disk_id, e.to_string()))
        }
    }
}

/// What a group's end says: the ack first, then the answers in the order of the requests
/// (a version-1 agent matches answers by order), then what failed to become durable; and
/// the connection closes if the cache failed to append or sync anything of the group.
fn outcome(
    ack: Option<Message>,
    replies: Vec<Message>,
    sync_failures: Vec<Message>,
    appends_failed: bool,
) -> Outcome {
    let failed = appends_failed || !sync_failures.is_empty();
    let replies = ack
        .into_iter()
        .chain(replies)
        .chain(sync_failures)
        .collect();
    if failed {
        return Outcome::Fail(
            replies,
            Error::Refused("the cache failed to append or sync: closing the agent's connection so it resumes at what is durable".into()),
        );
    }
    Outcome::Replies(replies)
}

/// Group commit: one fsync per touched disk; the ack of what is durable, and the errors of
/// what is not.
fn group_commit(state: &State, touched: &HashSet<u64>) -> (Option<Message>, Vec<Message>) {
    let mut entries = Vec::new();
    let mut failures = Vec::new();
    for &disk_id in touched {
        let disk = state.disk(disk_id).expect("touched disks exist");
        let mut cache = disk.cache.lock().expect("poisoned");
        match cache.sync() {
            Ok(()) => entries.push(AckEntry {
                disk_id,
                durable_lsn: cache.last_lsn(),
            }),
            Err(e) => {
                if let Some(suppressed) = state.refusal_log.admit("cache fsync failed") {
                    tracing::error!(disk = disk_id, error = %e, suppressed, "cache fsync failed; not acknowledged; the agent's connection closes and it resumes at what is durable");
                }
                failures.push(err_msg(ErrorCode::Internal, disk_id, e.to_string()));
            }
        }
    }
    if entries.is_empty() {
        return (None, failures);
    }
    state.work.notify_one();
    (Some(Message::Ack(Ack { entries })), failures)
}

/// A disk whose data was lost here (a corrupt cache record) is resynced by its agent: the
/// messages that tell a connection so, once per disk it attached.
fn resync_notices(state: &State, attached: &HashSet<u64>, told: &mut HashSet<u64>) -> Vec<Message> {
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
fn commit_touched(state: &State, touched: &HashSet<u64>) {
    for disk_id in touched {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(lsn: u64) -> Message {
        Message::Ack(Ack {
            entries: vec![AckEntry {
                disk_id: 1,
                durable_lsn: lsn,
            }],
        })
    }

    // Found by the simulator (seeds 304, 341, 669 and 9 more of 3,000, before the fix): an
    // agent whose buffer was full, or that had sent everything, waited forever for an ack
    // of what the cache failed to take, because the connection stayed open.
    #[test]
    fn a_failed_append_or_sync_closes_the_connection_after_the_answers() {
        let err = || err_msg(ErrorCode::Internal, 1, "EIO".into());
        match outcome(Some(ack(5)), vec![err()], Vec::new(), true) {
            Outcome::Fail(replies, _) => {
                assert_eq!(replies.len(), 2);
                assert!(matches!(replies[0], Message::Ack(_)), "the ack first");
            }
            _ => panic!("a failed append must close the connection"),
        }
        assert!(matches!(
            outcome(None, Vec::new(), vec![err()], false),
            Outcome::Fail(..)
        ));
        assert!(matches!(
            outcome(Some(ack(5)), vec![err()], Vec::new(), false),
            Outcome::Replies(r) if r.len() == 2
        ));
    }
}
