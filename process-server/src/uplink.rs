//! The link to the master target: connect, re-attach, resume, ship, trim.
//!
//! # Design constraints
//! - Resume is exact: on every (re)connection each disk is attached again and the master
//!   target answers with its highest durable LSN; shipping restarts right after it, and the
//!   master target ignores anything it already holds (same LSN: no change).
//! - The link stays full: up to `window` bytes are in flight, and batches are read,
//!   coalesced and compressed on every core (ordered: a disk's LSNs leave in order).
//! - The cache is trimmed only by the master target's acks, so a write leaves the process
//!   server only once it is durable on-premises.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use runtime::net::{connect, ClientSpec, ClientStream, Connected};
use runtime::tls::PeerRole;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::FramedRead;
use wire_protocol::frame::FLAG_ZSTD;
use wire_protocol::stream::StreamCompressor;
use wire_protocol::version::STREAM_SINCE;
use wire_protocol::{Compression, DigestList, ErrorCode, ErrorMsg, Message, MessageCodec, Role};

use crate::adaptive::{AdaptiveLevel, StreamChoice, AUTO_MAX, AUTO_MIN};
use crate::error::{Error, Result};
use crate::requests::{AttachAnswer, ErrorFor, Requests};
use crate::state::{Disk, State, UplinkRequest};

mod waits;
use waits::{StreamGauge, Waits};

/// Repeated warnings of one kind and disk are logged once a second, with a count of the rest.
static LOG_THROTTLE: std::sync::LazyLock<runtime::log::Throttle> =
    std::sync::LazyLock::new(|| runtime::log::Throttle::new(Duration::from_secs(1)));
static DOWN_LOG: std::sync::LazyLock<runtime::log::Throttle> =
    std::sync::LazyLock::new(|| runtime::log::Throttle::new(Duration::from_secs(DOWN_LOG_EVERY_S)));

use crate::pace::{slice_len, TokenBucket};
pub use crate::shipper::MAX_REFUSALS_PER_LSN;
use crate::shipper::{Nacked, Shipper as Ship};
/// How often a link asks the master target again for disks it refused.
pub const REATTACH_EVERY_MS: u64 = 5_000;
/// Longest wait between reconnection attempts: a link that comes back is used within a
/// second (a 5 s cap cost a drain 2.5 s on average, and RPO as much). An attempt is a TCP
/// connect, and a TLS handshake and Hello where the master target answers; its warning is
/// logged at most every [`DOWN_LOG_EVERY_S`] per kind of error.
pub const MAX_BACKOFF_MS: u64 = 1_000;
/// Characters of a down link's error that key its throttle.
const DOWN_LOG_KEY_CHARS: usize = 120;
/// A down link's warning, once per this many seconds per cause (with how many were
/// suppressed): a new cause is logged at once.
pub const DOWN_LOG_EVERY_S: u64 = 30;
/// Shortest wait between reconnection attempts.
pub const MIN_BACKOFF_MS: u64 = 100;
/// Compressors kept warm per thread (see `prepare`).
const WARM_CODECS: usize = 2;
/// Cached bytes a run of records (one compression job) spans at most, unless its one record
/// is larger: a merged batch's data ([`crate::merge::MERGED_DATA_MAX_BYTES`]) and 1 MiB for
/// its records' framing (8192 writes' headers are 426 KiB). Records the agent compressed
/// may decode to more; the job merges as it reads, so it holds one merged batch at a time.
pub const RUN_CACHED_MAX_BYTES: u64 = crate::merge::MERGED_DATA_MAX_BYTES as u64 + (1 << 20);
/// Merging starts at this zstd level: below it the adaptive level found the cores busy, and
/// merging gains little (1 MiB against 8 MiB frames of the WAN bench's image: 4.40:1 against
/// 4.46:1 at level 1, 4.76:1 against 4.99:1 at 3, 5.01:1 against 5.43:1 at 9).
pub const MERGE_FROM_LEVEL: i32 = 3;
/// Batches being read and compressed at once, per core.
pub const JOBS_PER_CORE: usize = 2;
/// Records taken from one disk before the next disk's turn (fairness across disks); also
/// the most records one merged run holds (so records under 1 MiB merge into less than 8).
pub const RECORDS_PER_TURN: usize = 8;

type AttachTx = oneshot::Sender<Result<u64, ErrorMsg>>;
type DigestTx = oneshot::Sender<Result<DigestList, ErrorMsg>>;
type Pending = Arc<Mutex<Requests<AttachTx, DigestTx>>>;

/// Runs the link forever: connects, ships, and reconnects with backoff when it drops.
pub async fn run(state: Arc<State>, index: usize, mut requests: mpsc::Receiver<UplinkRequest>) {
    let up = &state.uplinks[index];
    // Jittered, so process servers that lost one master target do not return in step.
    let mut backoff = runtime::net::Backoff::new(MIN_BACKOFF_MS, MAX_BACKOFF_MS);
    // The level learnt on this link outlives its sessions (a flapping link would otherwise
    // try a level found too costly again at every reconnect).
    let mut adaptive = AdaptiveLevel::new(
        state.compression_level.load(Ordering::Relaxed),
        AUTO_MIN,
        AUTO_MAX,
    );
    loop {
        match session(&state, index, &mut requests, &mut adaptive).await {
            Ok(()) => tracing::info!("link to the master target closed"),
            Err(e) => {
                // Keyed by the cause's words: its numbers (ports, seconds, lengths) vary,
                // and a peer chooses parts of the text, so the key is cut short (the
                // throttle bounds how many it keeps). The error's kind alone hid a stall's
                // "link-timeout-s" behind an earlier reader error.
                let words: String = e
                    .to_string()
                    .chars()
                    .filter(|c| !c.is_ascii_digit())
                    .take(DOWN_LOG_KEY_CHARS)
                    .collect();
                let cause = format!("{} {words}", up.target.addr);
                if let Some(suppressed) = DOWN_LOG.admit(&cause) {
                    tracing::warn!(error = %e, master_target = %up.target.addr, suppressed, "link to the master target down; retrying")
                }
            }
        }
        // A session that came up proves the path works: start the backoff afresh (a link
        // back from a transient fault is used within 100 ms). One that never did keeps
        // backing off, up to MAX_BACKOFF_MS. (Requiring a session to last 5 s first made
        // the link flap slower after every short fault.)
        if up.connected.swap(false, Ordering::AcqRel) {
            backoff.reset();
        }
        // Requests that arrive while the link is down are answered at once.
        let deadline = tokio::time::Instant::now() + backoff.next_delay();
        while let Ok(Some(r)) = tokio::time::timeout_at(deadline, requests.recv()).await {
            refuse(r);
        }
    }
}

fn refuse(r: UplinkRequest) {
    let e = |id| ErrorMsg {
        code: ErrorCode::NotReady,
        disk_id: id,
        message: "the master target is not reachable; retry later".into(),
        request_id: 0,
    };
    match r {
        UplinkRequest::Attach(a, tx) => drop(tx.send(Err(e(a.disk_id)))),
        UplinkRequest::Digests(d, tx) => drop(tx.send(Err(e(d.disk_id)))),
    }
}

fn io(context: &str, source: std::io::Error) -> Error {
    Error::Io {
        context: context.to_owned(),
        source,
    }
}

type Link = tokio_util::codec::Framed<ClientStream, MessageCodec>;
type Jobs = VecDeque<tokio::task::JoinHandle<Result<Option<Shipped>>>>;

/// The link's zstd stream (protocol 5, `wire_protocol::stream`), handed from one stream
/// job to the next in the order they were made, which is the order they are sent: each
/// job reads, merges and coalesces alongside the others, then waits for the stream,
/// compresses its frames as its next chunks, and hands it on. A session's stream dies with
/// it; the next session's starts afresh, as the master target's does.
struct Baton {
    /// Where the next stream job gets the stream.
    next: oneshot::Receiver<StreamCompressor>,
    /// Where the jobs report how long they held the stream, and its level.
    gauge: Arc<StreamGauge>,
}

impl Baton {
    fn new(gauge: Arc<StreamGauge>) -> Baton {
        let (tx, rx) = oneshot::channel();
        tx.send(StreamCompressor::default())
            .expect("the receiver is here");
        Baton { next: rx, gauge }
    }

    /// The next stream job's turn.
    fn next(&mut self) -> Turn {
        let (pass, rx) = oneshot::channel();
        Turn {
            wait: std::mem::replace(&mut self.next, rx),
            pass,
            gauge: Arc::clone(&self.gauge),
        }
    }
}

/// One stream job's place in the order.
struct Turn {
    wait: oneshot::Receiver<StreamCompressor>,
    pass: oneshot::Sender<StreamCompressor>,
    gauge: Arc<StreamGauge>,
}

impl Turn {
    /// Waits for the stream (on a blocking thread), compresses `s`'s frames as its next
    /// chunks at `level` and hands the stream on; with the CPU microseconds it took. On an
    /// error the stream is dropped: the jobs after this one fail too, and the session, which
    /// sends in order, ends at this one.
    fn compress(self, s: Shipped, level: i32) -> (Result<Shipped>, u64) {
        let Ok(mut stream) = self.wait.blocking_recv() else {
            return (
                Err(Error::MasterTarget(
                    "the link's zstd stream was lost with the batch before this one".into(),
                )),
                0,
            );
        };
        let (t, held) = (thread_cpu_us(), Instant::now());
        let mut out = BytesMut::with_capacity(s.frame.len() / 2);
        let r = wire_protocol::codec::stream_frames(&mut stream, level, &s.frame, &mut out);
        let cpu_us = thread_cpu_us().saturating_sub(t);
        // Wall time: a stream held while its thread waits for a core holds the link back
        // all the same.
        let held_us = u64::try_from(held.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.gauge.held_us.fetch_add(held_us, Ordering::Relaxed);
        self.gauge
            .level
            .store(stream.level().unwrap_or(0), Ordering::Relaxed);
        if let Err(e) = r {
            return (Err(e.into()), cpu_us);
        }
        // The session may have ended meanwhile: then nobody waits for the stream.
        let _ = self.pass.send(stream);
        let streamed = s.frame.len() as u64;
        let frame = out.freeze();
        (
            Ok(Shipped {
                frame,
                streamed,
                ..s
            }),
            cpu_us,
        )
    }
}

/// One session of the link: connect, attach every disk, then ship until the link fails.
async fn session(
    state: &Arc<State>,
    index: usize,
    requests: &mut mpsc::Receiver<UplinkRequest>,
    adaptive: &mut AdaptiveLevel,
) -> Result<()> {
    let up = &state.uplinks[index];
    let spec = ClientSpec {
        addr: up.target.addr.clone(),
        server_name: up.target.name.clone(),
        config: runtime::tls::client_config(&state.cfg.tls_client)?,
        expect: PeerRole::MasterTarget,
        role: Role::ProcessServer,
        node_id: "process-server".into(),
    };
    let Connected {
        mut framed,
        version,
        ..
    } = connect(&spec, MessageCodec::default()).await?;
    let mut ship = Ship::default();
    // One numbering of requests for the whole connection.
    let pending: Pending = Arc::new(Mutex::new(Requests::new(version)));
    attach_all(state, index, &mut framed, &pending, &mut ship).await?;
    up.connected.store(true, Ordering::Release);
    tracing::info!(master_target = %up.target.addr, version, disks = ship.disks().len(), "link to the master target up");
    ship_until_down(
        state,
        index,
        requests,
        framed,
        (version, pending),
        ship,
        adaptive,
    )
    .await
}

/// Attaches every disk that replicates to this master target, one at a time, and learns
/// where the master target stands with each. Anything else the master target says
/// meanwhile (a detach of another disk) is handled as it would be later.
async fn attach_all(
    state: &State,
    index: usize,
    framed: &mut Link,
    pending: &Pending,
    ship: &mut Ship,
) -> Result<()> {
    let disks = state
        .all()
        .into_iter()
        .filter(|d| d.route == index && !d.is_detached());
    let timeout = Duration::from_secs(state.cfg.link_timeout_s);
    for disk in disks {
        let (tx, mut rx) = oneshot::channel();
        let mut a = disk.attach.clone();
        if pending
            .lock()
            .expect("poisoned")
            .start_attach(&mut a, tx)
            .is_err()
        {
            continue;
        }
        framed.send(Message::DiskAttach(a)).await?;
        let ship_now = Mutex::new(std::mem::take(ship));
        // Bounded: a master target that never answers is as dead as one that is silent.
        let deadline = tokio::time::Instant::now() + timeout;
        let answer = loop {
            match tokio::time::timeout_at(deadline, framed.next()).await {
                Ok(Some(Ok(m))) => handle_reply(state, index, &ship_now, pending, m)?,
                Ok(Some(Err(e))) => return Err(e.into()),
                Ok(None) => return Err(Error::MasterTarget("closed while attaching".into())),
                Err(_) => {
                    return Err(Error::MasterTarget(format!(
                        "no answer to the attach of disk {} in {} s (link-timeout-s); reconnecting",
                        disk.attach.disk_id,
                        timeout.as_secs()
                    )))
                }
            }
            if let Ok(answer) = rx.try_recv() {
                break answer;
            }
        };
        *ship = ship_now.into_inner().expect("poisoned");
        match answer {
            Ok(lsn) => attached(state, ship, &disk, lsn)?,
            Err(e) if e.code == ErrorCode::Detached => {
                tracing::warn!(disk = disk.attach.disk_id, error = %e.message, "the master target says the disk was detached for failback: it is not shipped again");
                disk.mark_detached()?;
            }
            Err(e) => {
                tracing::error!(disk = disk.attach.disk_id, error = %e.message, "the master target refused the disk; it is not shipped (the attach is tried again every few seconds)");
                *disk.refused.lock().expect("poisoned") = Some(e.message);
            }
        }
    }
    Ok(())
}

/// Control messages to the master target (requests, heartbeats), each sent whole within
/// the link timeout, in the link's version.
struct Outbox {
    wr: tokio::io::WriteHalf<ClientStream>,
    codec: MessageCodec,
    buf: BytesMut,
    timeout_ms: u64,
}

impl Outbox {
    fn new(wr: tokio::io::WriteHalf<ClientStream>, version: u16, timeout_ms: u64) -> Outbox {
        let mut codec = MessageCodec::default();
        codec.set_version(version);
        Outbox {
            wr,
            codec,
            buf: BytesMut::new(),
            timeout_ms,
        }
    }

    async fn send(&mut self, msg: &Message) -> Result<()> {
        self.buf.clear();
        self.codec.encode(msg, &mut self.buf)?;
        within(self.timeout_ms, self.wr.write_all(&self.buf)).await
    }
}

/// Heartbeats: four per link timeout, so a live link is never taken for a dead one.
struct Beat {
    tick: tokio::time::Interval,
    seq: u64,
}

impl Beat {
    fn new(timeout_ms: u64) -> Beat {
        Beat {
            tick: every(Duration::from_millis(timeout_ms / 4)),
            seq: 0,
        }
    }

    fn next(&mut self) -> Message {
        self.seq += 1;
        Message::Heartbeat {
            seq: self.seq,
            time_us: crate::state::now_us(),
        }
    }
}

/// Reads the master target's answers until the link fails; `heard_ms` is when it last
/// said anything (ms since `began`).
fn spawn_reader(
    (state, index): (&Arc<State>, usize),
    (rd, read_buf): (tokio::io::ReadHalf<ClientStream>, &[u8]),
    ship: &Arc<Mutex<Ship>>,
    pending: &Pending,
    acked: &Arc<tokio::sync::Notify>,
    heard_ms: &Arc<AtomicU64>,
    began: Instant,
) -> tokio::task::JoinHandle<Result<()>> {
    // Bytes the handshake read past the Hello belong to the first answers.
    let mut reader = FramedRead::new(rd, MessageCodec::default());
    reader.read_buffer_mut().extend_from_slice(read_buf);
    let (st, sh, pe, ak, heard) = (
        Arc::clone(state),
        Arc::clone(ship),
        Arc::clone(pending),
        Arc::clone(acked),
        Arc::clone(heard_ms),
    );
    tokio::spawn(async move {
        while let Some(m) = reader.next().await {
            heard.store(began.elapsed().as_millis() as u64, Ordering::Relaxed);
            handle_reply(&st, index, &sh, &pe, m?)?;
            ak.notify_one();
        }
        Err::<(), Error>(Error::MasterTarget(
            "the master target closed the link".into(),
        ))
    })
}

/// Ships until the link fails: fills the pipeline while the window has room, sends what
/// it made in order, relays requests, beats, and attaches refused disks again.
async fn ship_until_down(
    state: &Arc<State>,
    index: usize,
    requests: &mut mpsc::Receiver<UplinkRequest>,
    framed: Link,
    (version, pending): (u16, Pending),
    ship: Ship,
    adaptive: &mut AdaptiveLevel,
) -> Result<()> {
    let parts = framed.into_parts();
    let (rd, wr) = tokio::io::split(parts.io);
    let ship = Arc::new(Mutex::new(ship));
    let acked = Arc::new(tokio::sync::Notify::new());
    // A link that says nothing for link-timeout-s is dead, however TCP sees it.
    let began = Instant::now();
    let heard_ms = Arc::new(AtomicU64::new(0));
    let mut reader_task = spawn_reader(
        (state, index),
        (rd, &parts.read_buf),
        &ship,
        &pending,
        &acked,
        &heard_ms,
        began,
    );
    let mut jobs: Jobs = VecDeque::new();
    let parallel = JOBS_PER_CORE * std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut pacer = Pacer::default();
    let timeout_ms = state.cfg.link_timeout_s * 1000;
    let mut out = Outbox::new(wr, version, timeout_ms);
    // What the link learnt outlives its sessions: a flapping link must not spend each new
    // session's first seconds finding out again that it is the bottleneck.
    let stream = StreamChoice::new(
        version >= STREAM_SINCE,
        state.uplinks[index].streaming.load(Ordering::Relaxed),
    );
    let mut waits = Waits::new(adaptive, stream);
    let mut baton = Baton::new(Arc::clone(&waits.gauge));
    let mut beat = Beat::new(timeout_ms);
    let mut retry = every(Duration::from_millis(REATTACH_EVERY_MS));
    // The disk id the last run was made of: the next turn round the disks starts after it.
    let mut served = 0u64;
    loop {
        let level = waits.level(state);
        fill(
            state,
            (&ship, &waits.busy_us),
            (&mut jobs, &mut baton),
            (parallel, level, waits.merge(level), waits.stream(level)),
            (version, &mut served),
        );
        let in_flight_bytes = ship.lock().expect("poisoned").in_flight_bytes();
        waits.adapt(state, in_flight_bytes);
        state.uplinks[index]
            .streaming
            .store(waits.streaming(), Ordering::Relaxed);
        let window_full = in_flight_bytes >= state.cfg.window_bytes;
        let pool_full = jobs.len() >= parallel;
        let waited_from = Instant::now();
        tokio::select! {
            r = &mut reader_task => return r.map_err(|e| Error::MasterTarget(format!("reader: {e}")))?,
            req = requests.recv() => {
                let Some(req) = req else { return Ok(()) };
                if let Some(msg) = start_request(req, &pending, &ship) {
                    out.send(&msg).await?;
                }
            }
            done = async { jobs.front_mut().expect("checked").await }, if !jobs.is_empty() => {
                jobs.pop_front();
                // Waiting here with every compression job running is waiting on the
                // cores. With fewer (the window let only some start, or there was little
                // to send) it is one job's latency, not a lack of CPU: counted as such, it
                // held a 100 Mbit/s link at level 1.
                if pool_full {
                    waits.cpu += waited_from.elapsed();
                } else if window_full {
                    waits.window += waited_from.elapsed();
                }
                let Some(s) = done.map_err(|e| Error::MasterTarget(format!("compression task: {e}")))?? else { continue };
                let sending = Instant::now();
                send_paced(&mut out.wr, &s.frame, &state.max_bandwidth_bps, &mut pacer, timeout_ms).await?;
                waits.link += sending.elapsed();
                s.count();
                state.uplinks[index].stream_bytes.fetch_add(s.streamed, Ordering::Relaxed);
            }
            _ = state.work.notified(), if jobs.is_empty() => {
                // New work while the window is full (every group commit of ingest): the
                // wait so far was on the link all the same.
                if window_full {
                    waits.link += waited_from.elapsed();
                }
            }
            _ = acked.notified(), if jobs.is_empty() => {
                // Nothing to compress because the window was full: waiting on the link.
                if window_full {
                    waits.link += waited_from.elapsed();
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(200)), if jobs.is_empty() => {
                if window_full {
                    waits.link += waited_from.elapsed();
                }
            }
            _ = beat.tick.tick() => {
                alive(began, &heard_ms, timeout_ms)?;
                out.send(&beat.next()).await?;
            }
            _ = retry.tick() => {
                for msg in reattaches(state, index, &ship, &pending) {
                    out.send(&msg).await?;
                }
            }
        }
    }
}

/// A relayed request, numbered and recorded; `None` when it was answered at once (an
/// attach of that disk is under way).
fn start_request(req: UplinkRequest, pending: &Pending, ship: &Mutex<Ship>) -> Option<Message> {
    let mut p = pending.lock().expect("poisoned");
    // Requesters that gave up (the relay's time limit) wait no more: their entries go, so
    // the map is bounded by the requests still waited for.
    p.retain_waiting(|a| !a.is_closed(), |d| !d.is_closed());
    match req {
        UplinkRequest::Attach(mut a, tx) => {
            // One attach of a disk id in flight: its answer is the disk's ack.
            if let Err(tx) = p.start_attach(&mut a, tx) {
                let _ = tx.send(Err(ErrorMsg {
                    code: ErrorCode::Busy,
                    disk_id: a.disk_id,
                    message: "an attach of this disk is under way; retry".into(),
                    request_id: 0,
                }));
                return None;
            }
            ship.lock().expect("poisoned").attaching(a.disk_id);
            Some(Message::DiskAttach(a))
        }
        UplinkRequest::Digests(mut d, tx) => {
            p.start_digests(&mut d, tx);
            Some(Message::DigestRequest(d))
        }
    }
}

/// Attaches of the disks the master target refused: asked again (a recovered journal, a
/// fixed datastore), one attach of a disk at a time.
fn reattaches(state: &State, index: usize, ship: &Mutex<Ship>, pending: &Pending) -> Vec<Message> {
    let shipping = ship.lock().expect("poisoned").disks();
    let mut p = pending.lock().expect("poisoned");
    state
        .all()
        .into_iter()
        .filter(|d| d.route == index && !d.is_detached() && !shipping.contains(&d.attach.disk_id))
        .filter_map(|disk| {
            let mut a = disk.attach.clone();
            p.start_reattach(&mut a).then_some(Message::DiskAttach(a))
        })
        .collect()
}

/// A write to the master target that must finish within the link timeout: a link that
/// takes nothing for that long is dead (a stalled path holds TCP's buffers full forever).
async fn within(
    timeout_ms: u64,
    write: impl std::future::Future<Output = std::io::Result<()>>,
) -> Result<()> {
    match tokio::time::timeout(Duration::from_millis(timeout_ms), write).await {
        Ok(r) => r.map_err(|e| io("send to the master target", e)),
        Err(_) => Err(Error::MasterTarget(format!(
            "the link took nothing for {} s (link-timeout-s): it is dead; reconnecting",
            timeout_ms / 1000
        ))),
    }
}

/// A timer that skips the ticks it missed.
fn every(period: Duration) -> tokio::time::Interval {
    let mut t = tokio::time::interval(period);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

/// One record made ready for the link.
struct Shipped {
    disk: Arc<Disk>,
    frame: Bytes,
    logical: u64,
    coalesced: u64,
    /// Frame bytes that went into the link's zstd stream (before compression).
    streamed: u64,
}

impl Shipped {
    /// Counts the record as put on the link.
    fn count(&self) {
        let c = &self.disk.counters;
        c.wire_bytes
            .fetch_add(self.frame.len() as u64, Ordering::Relaxed);
        c.logical_bytes_shipped
            .fetch_add(self.logical, Ordering::Relaxed);
        c.coalesced_bytes
            .fetch_add(self.coalesced, Ordering::Relaxed);
    }
}

/// The link is dead once the master target has said nothing for the link timeout (ms since
/// `began` when it last spoke in `heard_ms`), however TCP sees it.
fn alive(began: Instant, heard_ms: &AtomicU64, timeout_ms: u64) -> Result<()> {
    let silent_ms =
        (began.elapsed().as_millis() as u64).saturating_sub(heard_ms.load(Ordering::Relaxed));
    if silent_ms > timeout_ms {
        return Err(Error::MasterTarget(format!(
            "no word from the master target for {} s (link-timeout-s): the link is dead; reconnecting",
            silent_ms / 1000
        )));
    }
    Ok(())
}

fn fill(
    state: &Arc<State>,
    (ship, busy_us): (&Arc<Mutex<Ship>>, &Arc<AtomicU64>),
    (jobs, baton): (&mut Jobs, &mut Baton),
    (parallel, level, merge, stream): (usize, i32, bool, bool),
    (version, served): (u16, &mut u64),
) {
    let stream = stream && version >= STREAM_SINCE;
    let window = state.cfg.window_bytes;
    let mut s = ship.lock().expect("poisoned");
    // Turns round the disks until the pool or the window is full or nothing is left: each
    // disk gets one run of up to RECORDS_PER_TURN records per turn. A turn starts after
    // the disk `served` last (across calls too): a slot frees one at a time, and handed
    // to the lowest disk id each time, it let one disk's backlog (a resync) hold every
    // other disk back until it was all sent.
    loop {
        let started = jobs.len();
        let disks = state.all();
        let first = disks
            .iter()
            .position(|d| d.attach.disk_id > *served)
            .unwrap_or(0);
        let (up_to_served, past_served) = disks.split_at(first);
        for disk in past_served.iter().chain(up_to_served) {
            if jobs.len() >= parallel || s.in_flight_bytes() >= window {
                return;
            }
            let id = disk.attach.disk_id;
            // Nothing ships of a disk whose attach is under way, or that was detached.
            let Some(cursor) = s.cursor(id) else {
                continue;
            };
            if disk.is_detached() {
                continue;
            }
            let entries = {
                let cache = disk.cache.lock().expect("poisoned");
                let durable = cache.durable_lsn();
                // Only what the cache holds durably leaves: a group whose sync fails is cut
                // back, and the master target must never hold LSNs the cache then lost.
                let mut v = cache.entries_from(cursor, RECORDS_PER_TURN);
                v.retain(|e| e.last_lsn <= durable);
                v
            };
            // Link-bound, records that follow on leave as one batch (one zstd frame: a
            // better ratio); else each leaves as it was received or alone; after a refusal,
            // one at a time until the refused one is found.
            let n = if level == 0 || !merge || s.one_by_one(id, cursor) {
                1
            } else {
                // Within the window's room: a run overshoots it no more than one record did.
                run_len(&entries, window.saturating_sub(s.in_flight_bytes()))
            };
            let run: Vec<crate::cache::Entry> = entries.into_iter().take(n).collect();
            if run.is_empty() {
                continue;
            }
            // Count the records' cached size now; the ack releases it.
            let records: Vec<(u64, u64)> = run
                .iter()
                .map(|e| (e.last_lsn, u64::from(e.frame_len)))
                .collect();
            s.shipped_run(id, &records);
            *served = id;
            let (disk, busy_us) = (Arc::clone(disk), Arc::clone(busy_us));
            let turn = stream.then(|| baton.next());
            jobs.push_back(tokio::task::spawn_blocking(move || {
                // CPU time, not wall time: waiting for a core, the cache's lock, a read or
                // the stream's turn is not compression's cost.
                let t = thread_cpu_us();
                let r = prepare(disk, run, level, version, turn.is_some());
                let mut cpu_us = thread_cpu_us().saturating_sub(t);
                let r = match (r, turn) {
                    (Ok(Some(s)), Some(turn)) => {
                        let r = turn.compress(s, level);
                        cpu_us += r.1;
                        r.0.map(Some)
                    }
                    (r, _) => r,
                };
                busy_us.fetch_add(cpu_us, Ordering::Relaxed);
                r
            }));
        }
        if jobs.len() == started {
            return;
        }
    }
}

/// How many of `entries` (a disk's next records) one job reads and merges: those whose
/// LSNs follow on, within [`RUN_CACHED_MAX_BYTES`] and `room` bytes of cache (at least one).
fn run_len(entries: &[crate::cache::Entry], room: u64) -> usize {
    let mut cached = 0u64;
    let mut n = 0;
    for (i, e) in entries.iter().enumerate() {
        cached += u64::from(e.frame_len);
        let follows = i == 0 || entries[i - 1].last_lsn + 1 == e.first_lsn;
        let full = cached > RUN_CACHED_MAX_BYTES.min(room);
        if i > 0 && (!follows || e.lost || entries[i - 1].lost || full) {
            break;
        }
        n += 1;
    }
    n
}

/// CPU time this thread has used, in microseconds (0 if the clock is not there).
fn thread_cpu_us() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the pointer, which points at `t`.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    if r != 0 {
        return 0;
    }
    (t.tv_sec as u64) * 1_000_000 + (t.tv_nsec as u64) / 1_000
}

thread_local! {
    /// A compressor per (level, protocol version), kept warm across records.
    static CODECS: std::cell::RefCell<HashMap<(i32, u16), MessageCodec>> = std::cell::RefCell::new(HashMap::new());
}

/// What stands in for a corrupt record's LSNs `first..=last`: a resync-started marker (so
/// the master target makes no recovery point until the agent's resync completes) and writes
/// of nothing. The LSN order stays whole; the data comes back with the resync.
fn substitute(disk_id: u64, first: u64, last: u64, version: u16) -> Result<Bytes> {
    let mut codec = MessageCodec::default();
    codec.set_version(version);
    let mut out = BytesMut::new();
    let marker = Message::Bookmark(wire_protocol::Bookmark {
        disk_id,
        lsn: first,
        kind: wire_protocol::BookmarkKind::ResyncStarted,
        time_us: crate::state::now_us(),
        group_marker: 0,
        group_members: 0,
        tag: "cache-corruption".into(),
    });
    codec.encode(&marker, &mut out)?;
    let mut lsn = first + 1;
    while lsn <= last {
        let n = (last - lsn + 1).min(wire_protocol::message::MAX_WRITES_PER_BATCH as u64);
        let empty = wire_protocol::Write {
            timestamp_us: 0,
            offset: 0,
            digest: wire_protocol::digest(&[]),
            data: Bytes::new(),
        };
        codec.encode(
            &Message::WriteBatch(wire_protocol::WriteBatch {
                disk_id,
                first_lsn: lsn,
                writes: vec![empty; n as usize],
            }),
            &mut out,
        )?;
        lsn += n;
    }
    Ok(out.freeze())
}

/// Reads a run of a disk's cached records, merges those that follow on, coalesces, and
/// encodes them for the link (in the link's negotiated protocol `version`, whatever version
/// the agent sent them in): one or more frames, in LSN order, uncompressed when they go
/// into the link's `stream`. Merged as read: one merged
/// batch and one record are held decoded at a time, however large the run decodes.
fn prepare(
    disk: Arc<Disk>,
    run: Vec<crate::cache::Entry>,
    level: i32,
    version: u16,
    stream: bool,
) -> Result<Option<Shipped>> {
    let mut done = Prepared {
        out: BytesMut::new(),
        logical: 0,
        coalesced: 0,
        // Frames for the stream are encoded uncompressed: the stream compresses them.
        level: if stream { 0 } else { level },
        version,
    };
    let mut merging: Option<Message> = None;
    for e in &run {
        let (msg, raw) = match read_record(&disk, e, level, version) {
            Ok(m) => m,
            Err(err) => {
                tracing::error!(disk = disk.attach.disk_id, first_lsn = e.first_lsn, last_lsn = e.last_lsn, error = %err, "corrupt cache record: not shipped; its range is replaced by a resync marker and the disk is marked for resync with its agent");
                disk.require_resync(e.first_lsn, e.last_lsn)?;
                done.flush(merging.take(), None)?;
                let stand_in = substitute(disk.attach.disk_id, e.first_lsn, e.last_lsn, version)?;
                done.out.extend_from_slice(&stand_in);
                continue;
            }
        };
        if raw.is_some() {
            // Level 0: records are never merged (runs of one), and one that coalescing
            // leaves as it is leaves as it was received.
            done.flush(merging.take(), None)?;
            done.flush(Some(msg), raw)?;
            continue;
        }
        match (&mut merging, msg) {
            (Some(Message::WriteBatch(m)), Message::WriteBatch(b))
                if crate::merge::follows(m, &b) =>
            {
                crate::merge::append(m, b)
            }
            (_, msg) => {
                done.flush(merging.take(), None)?;
                merging = Some(msg);
            }
        }
    }
    done.flush(merging, None)?;
    Ok(Some(Shipped {
        disk,
        frame: done.out.freeze(),
        logical: done.logical,
        coalesced: done.coalesced,
        streamed: 0,
    }))
}

/// A job's frames so far, and what they carry.
struct Prepared {
    out: BytesMut,
    logical: u64,
    coalesced: u64,
    level: i32,
    version: u16,
}

impl Prepared {
    /// Coalesces and encodes `msg` (if any) onto the output; `raw`, the frame as received,
    /// goes instead when coalescing changed nothing.
    fn flush(&mut self, msg: Option<Message>, raw: Option<Bytes>) -> Result<()> {
        let Some(mut msg) = msg else { return Ok(()) };
        let mut saved = 0;
        if let Message::WriteBatch(b) = &mut msg {
            self.logical += b.data_len() as u64;
            saved = crate::coalesce::coalesce(b);
            self.coalesced += saved;
        }
        match raw.filter(|_| saved == 0) {
            Some(frame) => self.out.extend_from_slice(&frame),
            None => encode(&msg, self.level, self.version, &mut self.out)?,
        }
        Ok(())
    }
}

/// Reads and decodes record `e`; with it, the frame as received when it may leave as it is.
fn read_record(
    disk: &Disk,
    e: &crate::cache::Entry,
    level: i32,
    version: u16,
) -> Result<(Message, Option<Bytes>)> {
    // The record is read with the segment's own descriptor, not under the cache's lock:
    // ingest keeps appending meanwhile.
    let f = disk.cache.lock().expect("poisoned").reader(e)?.read()?;
    let raw = (f.header.version == version && f.header.flags & FLAG_ZSTD == 0 && level == 0)
        .then(|| f.raw.clone());
    let msg = MessageCodec::default().decode_frame(f)?;
    // The record must be what its index entry says: this disk, these LSNs. Anything else
    // (guest data shaped like a record, found after damage) is never shipped.
    if stream_span(&msg) != Some((disk.attach.disk_id, e.first_lsn, e.last_lsn)) {
        return Err(Error::CacheCorrupt {
            path: format!("cache of disk {}", disk.attach.disk_id),
            offset: e.pos,
            detail: "a record whose message is not the one its index entry names".into(),
            first_lsn: e.first_lsn,
            last_lsn: e.last_lsn,
        });
    }
    Ok((msg, raw))
}

/// Encodes `msg` at `level` onto `out`, with a compressor kept warm on this thread.
fn encode(msg: &Message, level: i32, version: u16, out: &mut BytesMut) -> Result<()> {
    let compression = if level == 0 {
        Compression::None
    } else {
        Compression::Zstd(level)
    };
    CODECS.with(|c| {
        let mut c = c.borrow_mut();
        // A few compressors stay warm per thread (two uplinks may use two levels or
        // versions): one per level the adaptive level passed through, on every blocking
        // thread, took 210 MiB at level 9.
        if !c.contains_key(&(level, version)) && c.len() >= WARM_CODECS {
            c.clear();
        }
        let codec = c.entry((level, version)).or_insert_with(|| {
            let mut codec = MessageCodec::new(compression);
            codec.set_version(version);
            codec
        });
        codec.encode(msg, out)
    })?;
    Ok(())
}

/// (disk, first LSN, last LSN) of a stream message; `None` for any other message.
fn stream_span(msg: &Message) -> Option<(u64, u64, u64)> {
    match msg {
        Message::WriteBatch(b) if !b.writes.is_empty() => {
            Some((b.disk_id, b.first_lsn, b.last_lsn()))
        }
        Message::Bookmark(b) => Some((b.disk_id, b.lsn, b.lsn)),
        _ => None,
    }
}

/// The master target took (back) a disk and holds it up to `lsn`: ship from after it. If
/// it holds less than this cache already let go of (its journal was recovered, or restored
/// from a backup), the LSNs in between are lost here too: they ship as a resync marker, and
/// the agent resyncs the disk.
fn attached(state: &State, ship: &mut Ship, disk: &Disk, lsn: u64) -> Result<()> {
    {
        let mut cache = disk.cache.lock().expect("poisoned");
        if let Some((first, last)) = cache.remote_behind(lsn) {
            tracing::error!(disk = disk.attach.disk_id, first_lsn = first, last_lsn = last, "the master target no longer holds lsn {first}..={last}, which this cache let go of when it acknowledged them: they are replaced by a resync marker and the agent resyncs the disk");
        }
        if let Some((first, last)) = cache.adopt_remote(lsn)? {
            // Writes acknowledged here under LSNs the master target already had would be
            // dropped there as duplicates: the disk must be resynced, and the agent's stream
            // restarts after the master target's position.
            tracing::error!(disk = disk.attach.disk_id, first_lsn = first, last_lsn = lsn, "the master target holds this disk up to lsn {lsn}, beyond what this cache knew of (its record was damaged or restored from an older copy): writes acknowledged under lsn {first}..={last} may be missing on-premises; the disk must be resynced (the agent is told; or run `agent resync --mode=differential`), and its stream continues after lsn {lsn}");
            disk.require_resync(first, last)?;
            disk.stream_epoch.fetch_add(1, Ordering::AcqRel);
        }
    }
    on_durable(state, disk, lsn)?;
    *disk.refused.lock().expect("poisoned") = None;
    ship.attached(disk.attach.disk_id, lsn);
    Ok(())
}

fn on_durable(state: &State, disk: &Disk, lsn: u64) -> Result<()> {
    disk.counters
        .mt_durable_lsn
        .fetch_max(lsn, Ordering::AcqRel);
    disk.cache.lock().expect("poisoned").trim(lsn)?;
    state.space.notify_waiters();
    Ok(())
}

/// The master target holds `disk_id` durably up to `lsn`: trim the cache, free the window.
fn on_stream_ack(state: &State, ship: &Mutex<Ship>, disk_id: u64, lsn: u64) -> Result<()> {
    if let Some(disk) = state.disk(disk_id) {
        on_durable(state, &disk, lsn)?;
    }
    ship.lock().expect("poisoned").on_ack(disk_id, lsn);
    Ok(())
}

/// An error that answers no request: a detach, or a failure worth a (throttled) log line.
fn on_unsolicited_error(state: &State, ship: &Mutex<Ship>, e: ErrorMsg) -> Result<()> {
    if e.code == ErrorCode::Detached {
        // An operator detached the disk on the master target: stop shipping it, for good
        // (the mark is durable, so no restart re-attaches it).
        tracing::warn!(
            disk = e.disk_id,
            "the master target detached the disk for failback: shipping it stops"
        );
        ship.lock().expect("poisoned").stop(e.disk_id);
        if let Some(d) = state.disk(e.disk_id) {
            d.mark_detached()?;
        }
    } else if let Some(suppressed) = LOG_THROTTLE.admit(&format!("error {}", e.disk_id)) {
        tracing::error!(disk = e.disk_id, code = ?e.code, error = %e.message, suppressed, "master target error");
    }
    Ok(())
}

/// Whether disk `disk_id` replicates over link `index`: a master target speaks only of
/// its own disks (one that names another's, by mistake or on purpose, must not trim,
/// rewind or detach it).
fn ours(state: &State, index: usize, disk_id: u64) -> bool {
    state.disk(disk_id).is_some_and(|d| d.route == index)
}

fn not_ours(index: usize, disk_id: u64, what: &str) {
    if let Some(suppressed) = LOG_THROTTLE.admit(&format!("not ours {index}")) {
        tracing::warn!(
            disk = disk_id,
            message = what,
            suppressed,
            "the master target speaks of a disk that does not replicate to it: ignored"
        );
    }
}

/// An ack: the answer to an attach of the disk, or how far the master target holds it.
fn on_ack(
    state: &State,
    index: usize,
    ship: &Mutex<Ship>,
    pending: &Pending,
    a: wire_protocol::Ack,
) -> Result<()> {
    for e in a.entries {
        let answer = pending.lock().expect("poisoned").on_ack(e.disk_id);
        match answer {
            Some(AttachAnswer::Reattach) => {
                if let Some(disk) = state.disk(e.disk_id) {
                    tracing::info!(
                        disk = e.disk_id,
                        durable_lsn = e.durable_lsn,
                        "the master target takes the disk again"
                    );
                    attached(
                        state,
                        &mut ship.lock().expect("poisoned"),
                        &disk,
                        e.durable_lsn,
                    )?;
                }
            }
            Some(AttachAnswer::Relayed(tx)) => {
                let _ = tx.send(Ok(e.durable_lsn));
                ship.lock()
                    .expect("poisoned")
                    .attached(e.disk_id, e.durable_lsn);
            }
            None if ours(state, index, e.disk_id) => {
                on_stream_ack(state, ship, e.disk_id, e.durable_lsn)?
            }
            None => not_ours(index, e.disk_id, "ack"),
        }
    }
    Ok(())
}

/// A nack: resend the disk's stream from an LSN (a record refused again and again is lost).
fn on_nack(state: &State, ship: &Mutex<Ship>, n: wire_protocol::Nack) {
    let refused = n.code != ErrorCode::LsnGap;
    let nacked = ship
        .lock()
        .expect("poisoned")
        .on_nack(n.disk_id, n.from_lsn, refused);
    if nacked == Nacked::Lost {
        if let Some(d) = state.disk(n.disk_id) {
            tracing::error!(disk = n.disk_id, lsn = n.from_lsn, reason = %n.reason, "the master target refuses a cached record again and again: it is dropped as lost and the agent resyncs the disk");
            d.cache.lock().expect("poisoned").mark_lost(n.from_lsn);
        }
    }
    if nacked != Nacked::Echo {
        if let Some(suppressed) = LOG_THROTTLE.admit(&format!("nack {}", n.disk_id)) {
            tracing::warn!(disk = n.disk_id, from_lsn = n.from_lsn, reason = %n.reason, suppressed, "master target asks for a resend");
        }
    }
}

/// Handles one message of the master target on link `index`.
fn handle_reply(
    state: &State,
    index: usize,
    ship: &Mutex<Ship>,
    pending: &Pending,
    m: Message,
) -> Result<()> {
    match m {
        Message::Ack(a) => on_ack(state, index, ship, pending, a)?,
        Message::Nack(n) if !ours(state, index, n.disk_id) => not_ours(index, n.disk_id, "nack"),
        Message::Nack(n) => on_nack(state, ship, n),
        Message::DigestList(l) => {
            if let Some(tx) = pending.lock().expect("poisoned").on_digests(&l) {
                let _ = tx.send(Ok(l));
            }
        }
        Message::Error(e) => {
            let to = pending.lock().expect("poisoned").on_error(&e);
            match to {
                ErrorFor::Attach(AttachAnswer::Reattach) => {
                    if let Some(d) = state.disk(e.disk_id) {
                        if e.code == ErrorCode::Detached {
                            d.mark_detached()?;
                        } else {
                            *d.refused.lock().expect("poisoned") = Some(e.message);
                        }
                    }
                }
                ErrorFor::Attach(AttachAnswer::Relayed(tx)) => drop(tx.send(Err(e))),
                ErrorFor::Digests(tx) => drop(tx.send(Err(e))),
                ErrorFor::Unsolicited if e.disk_id != 0 && !ours(state, index, e.disk_id) => {
                    not_ours(index, e.disk_id, "error")
                }
                ErrorFor::Unsolicited => on_unsolicited_error(state, ship, e)?,
            }
        }
        Message::Heartbeat { .. } | Message::Ignored { .. } => {}
        other => tracing::warn!(
            message = other.name(),
            "unexpected message from the master target"
        ),
    }
    Ok(())
}

/// Writes `frame` to `wr`, paced to the rate in `rate_bps` (read before every slice); each
/// slice must leave within `timeout_ms` (the pacing's own waits do not count).
async fn send_paced(
    wr: &mut (impl tokio::io::AsyncWrite + Unpin),
    frame: &[u8],
    rate_bps: &AtomicU64,
    pacer: &mut Pacer,
    timeout_ms: u64,
) -> Result<()> {
    let mut at = 0;
    while at < frame.len() {
        let n = slice_len(rate_bps.load(Ordering::Relaxed), frame.len() - at);
        pacer.wait(rate_bps, n).await;
        within(timeout_ms, wr.write_all(&frame[at..at + n])).await?;
        at += n;
    }
    Ok(())
}

/// A token bucket on tokio's clock (a paused test clock paces too).
#[derive(Debug)]
struct Pacer {
    bucket: TokenBucket,
    epoch: tokio::time::Instant,
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer {
            bucket: TokenBucket::default(),
            epoch: tokio::time::Instant::now(),
        }
    }
}

impl Pacer {
    /// Waits until `bytes` may leave at the rate in `rate_bps`, read again after each wait
    /// (a changed limit, or none, takes effect within [`crate::pace::PACE_RECHECK_MS`]).
    async fn wait(&mut self, rate_bps: &AtomicU64, bytes: usize) {
        loop {
            let now_us = self.epoch.elapsed().as_micros() as u64;
            match self
                .bucket
                .take(now_us, rate_bps.load(Ordering::Relaxed), bytes)
            {
                0 => return,
                wait_us => tokio::time::sleep(Duration::from_micros(wait_us)).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pace::PACE_RECHECK_MS;

    fn entry(first_lsn: u64, last_lsn: u64, frame_len: u32, lost: bool) -> crate::cache::Entry {
        crate::cache::Entry {
            seg: 0,
            pos: 0,
            first_lsn,
            last_lsn,
            first_ts_us: 0,
            frame_len,
            lost,
        }
    }

    #[test]
    fn a_run_is_records_that_follow_on_within_its_byte_bound_and_never_a_lost_one() {
        let mib = 1 << 20;
        let follow: Vec<_> = (0..8)
            .map(|i| entry(1 + 10 * i, 10 + 10 * i, mib, false))
            .collect();
        assert_eq!(
            run_len(&follow, u64::MAX),
            8,
            "8 MiB of records that follow on"
        );
        assert_eq!(run_len(&[], u64::MAX), 0);
        let gap = [entry(1, 10, mib, false), entry(12, 20, mib, false)];
        assert_eq!(run_len(&gap, u64::MAX), 1, "a gap in the LSNs ends the run");
        let lost = [
            entry(1, 10, mib, false),
            entry(11, 20, mib, true),
            entry(21, 30, mib, false),
        ];
        assert_eq!(run_len(&lost, u64::MAX), 1, "a lost record runs alone");
        assert_eq!(run_len(&lost[1..], u64::MAX), 1, "a lost record runs alone");
        let big = [entry(1, 10, 6 * mib, false), entry(11, 20, 4 * mib, false)];
        assert_eq!(run_len(&big, u64::MAX), 1, "past RUN_CACHED_MAX_BYTES");
        let huge = [entry(1, 10, 16 * mib, false)];
        assert_eq!(
            run_len(&huge, u64::MAX),
            1,
            "one record, however large, is a run"
        );
        assert_eq!(
            run_len(&follow, 3 * mib as u64),
            3,
            "within the window's room"
        );
        assert_eq!(run_len(&follow, 0), 1, "a run has one record at least");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lifted_limit_takes_effect_within_a_recheck() {
        let rate = Arc::new(AtomicU64::new(1_000)); // 8 kbit/s
        let mut l = Pacer::default();
        let r = Arc::clone(&rate);
        let t0 = tokio::time::Instant::now();
        let waiter = tokio::spawn(async move {
            // 64 KiB at 1 kB/s would be a minute; the limit is lifted after 200 ms.
            l.wait(&r, 64 << 10).await;
            tokio::time::Instant::now()
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        rate.store(0, Ordering::Relaxed);
        let done = waiter.await.unwrap();
        assert!(
            done - t0 <= Duration::from_millis(200 + PACE_RECHECK_MS),
            "{:?}",
            done - t0
        );
    }
}

#[cfg(test)]
mod routes {
    use super::*;
    use crate::config::{Config, MasterTarget};
    use wire_protocol::{Ack, AckEntry, DiskAttach, LocationKind, Nack};

    fn two_links(dir: &std::path::Path) -> Arc<State> {
        let tls = runtime::tls::TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("c.pem"),
            key: dir.join("c.key"),
        };
        let mt = |n: u16| MasterTarget {
            addr: format!("127.0.0.1:{n}"),
            name: "127.0.0.1".into(),
        };
        let cfg = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            master_targets: vec![mt(1), mt(2)],
            cache_dir: dir.join("cache"),
            cache_limit_bytes: Some(1 << 30),
            tls_server: tls.clone(),
            tls_client: tls,
            compression_level: 0,
            adaptive_compression: false,
            max_bandwidth_bps: 0,
            window_bytes: 1 << 20,
            link_timeout_s: 30,
            rpo_threshold_s: 900,
            log_json: false,
            groups: Vec::new(),
            group_cut_interval_ms: 10_000,
        };
        std::fs::create_dir_all(&cfg.cache_dir).unwrap();
        let links = (0..2).map(|_| mpsc::channel(1).0).collect();
        State::open(cfg, links).unwrap()
    }

    /// A master target speaks only of its own disks: an ack, a nack or a detach of a disk
    /// that replicates to another master target (a compromised one, or the same disk id
    /// elsewhere) trims nothing, rewinds nothing, detaches nothing.
    #[test]
    fn a_master_target_cannot_touch_another_ones_disk() {
        let dir = tempfile::tempdir().unwrap();
        let state = two_links(dir.path());
        let attach = DiskAttach {
            disk_id: 7,
            vm_id: "vm1".into(),
            group_id: String::new(),
            disk_uuid: [7; 16],
            size_bytes: 1 << 20,
            sector_size: 512,
            location: LocationKind::Alternate,
            target: String::new(),
            request_id: 0,
            os_type: String::new(),
        };
        let disk = state.add_disk(attach, 0, 1).unwrap(); // replicates over link 1
        let frame = MessageCodec::default()
            .encode_to_bytes(&Message::Heartbeat { seq: 1, time_us: 1 })
            .unwrap();
        {
            let mut c = disk.cache.lock().unwrap();
            c.append(1, 1, 1, &frame).unwrap();
            c.sync().unwrap();
        }
        let ship = Mutex::new(Ship::default());
        let pending: Pending = Arc::new(Mutex::new(Requests::new(2)));
        let from_link_0 = [
            Message::Ack(Ack {
                entries: vec![AckEntry {
                    disk_id: 7,
                    durable_lsn: 1,
                }],
            }),
            Message::Nack(Nack {
                disk_id: 7,
                from_lsn: 1,
                code: ErrorCode::DigestMismatch,
                reason: "x".into(),
            }),
            Message::Error(ErrorMsg {
                code: ErrorCode::Detached,
                disk_id: 7,
                message: "x".into(),
                request_id: 0,
            }),
        ];
        for m in from_link_0 {
            handle_reply(&state, 0, &ship, &pending, m).unwrap();
        }
        assert!(
            disk.cache.lock().unwrap().backlog_bytes() > 0,
            "not trimmed"
        );
        assert_eq!(disk.counters.mt_durable_lsn.load(Ordering::Acquire), 0);
        assert!(!disk.is_detached());
        assert!(
            ship.lock().unwrap().disks().is_empty(),
            "not shipped over link 0"
        );
        // Its own master target may.
        let ack = Message::Ack(Ack {
            entries: vec![AckEntry {
                disk_id: 7,
                durable_lsn: 1,
            }],
        });
        handle_reply(&state, 1, &ship, &pending, ack).unwrap();
        assert_eq!(disk.counters.mt_durable_lsn.load(Ordering::Acquire), 1);
    }
}
