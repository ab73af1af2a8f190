//! The agent's link to the process server.
//!
//! Every batch and bookmark stays in a bounded buffer until the process server acknowledges
//! it (it is then durable in its cache). When the link drops, the agent reconnects with
//! backoff, re-attaches, learns the highest LSN the process server holds and resends the
//! rest. When the buffer is full and the link is down, [`Link::send`] says so and the
//! caller falls back to tracking dirty regions.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use runtime::net::{connect, ClientSpec, ClientStream, Connected};
use runtime::tls::{PeerRole, TlsFiles};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use wire_protocol::{Compression, Cut, DiskAttach, ErrorCode, Message, MessageCodec, Role};

use crate::error::{Error, Result};
use crate::stream::Window;

/// Where the process server is and how to prove who we are.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// HOST:PORT.
    pub addr: String,
    /// The name its certificate carries.
    pub server_name: String,
    /// Our TLS files.
    pub tls: TlsFiles,
}

type Sink = SplitSink<Framed<ClientStream, MessageCodec>, Message>;

/// How long the process server may take to answer an attach (it asks the master target,
/// which may create a disk).
pub const ATTACH_TIMEOUT_MS: u64 = 90_000;

/// Longest wait between reconnection attempts.
const MAX_BACKOFF_MS: u64 = 2_000;
/// The first wait after a failed attempt or a dropped link. The wait doubles with each
/// failure and starts over only when the process server acknowledges something new: a
/// process server that takes the attach and then closes (its cache failing every append)
/// is retried at a bounded rate, not in a tight loop of TLS handshakes and resends.
const MIN_BACKOFF_MS: u64 = 100;

/// Cut messages queued for the engine. The process server has one cut of a disk in flight
/// at a time (two messages to the agent: hold, then mark or release); more are a peer's
/// mistake and are dropped (its cut times out and is abandoned).
const CUT_QUEUE: usize = 8;

/// The link.
pub struct Link {
    spec: ClientSpec,
    attach: DiskAttach,
    compression: Compression,
    sink: Option<Sink>,
    events: Option<mpsc::Receiver<Message>>,
    /// What the process server has not acknowledged yet (see [`crate::stream`]).
    window: Window,
    /// Highest LSN durable on the master target, as the process server last said.
    pub remote_durable_lsn: u64,
    next_attempt: Instant,
    backoff_ms: u64,
    /// Messages other than acks, for callers waiting on replies.
    replies: VecDeque<Message>,
    /// The protocol version of the current (or last) connection: from version 2 requests
    /// carry ids and replies are matched by them.
    version: u16,
    /// The id of the last request sent (ids are unique on the link, never 0).
    last_request_id: u64,
    /// Connections made so far: a request sent on an earlier one is never answered.
    generation: u64,
    /// The first request id of this connection.
    first_id: u64,
    /// The process server lost data of this disk and asked for a resync.
    resync_requested: bool,
    /// A refusal retrying cannot fix, met while reconnecting in the background: the engine
    /// stops with it.
    fatal: Option<Error>,
    /// Cut messages from the process server, for the engine (kept apart from the other
    /// events so that waiting for one is cancel-safe in a `select!`).
    cuts: mpsc::Receiver<Cut>,
    cuts_tx: mpsc::Sender<Cut>,
}

/// What became of a send.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    /// Buffered (and sent if the link is up).
    Queued,
    /// The buffer is full and the link is down: nothing was taken.
    Overflow,
}

impl Link {
    /// A link for one disk; not yet connected. Fails at once if the TLS files are missing
    /// or unusable.
    pub fn new(
        ep: Endpoint,
        attach: DiskAttach,
        compression: Compression,
        max_unacked_bytes: usize,
    ) -> Result<Link> {
        let spec = ClientSpec {
            config: runtime::tls::client_config(&ep.tls)?,
            addr: ep.addr,
            server_name: ep.server_name,
            expect: PeerRole::ProcessServer,
            role: Role::Agent,
            node_id: attach.vm_id.clone(),
        };
        let (cuts_tx, cuts) = mpsc::channel(CUT_QUEUE);
        Ok(Link {
            cuts,
            cuts_tx,
            spec,
            attach,
            compression,
            sink: None,
            events: None,
            window: Window::new(max_unacked_bytes),
            remote_durable_lsn: 0,
            next_attempt: Instant::now(),
            backoff_ms: MIN_BACKOFF_MS,
            replies: VecDeque::new(),
            version: wire_protocol::version::PROTOCOL_VERSION_MIN,
            last_request_id: 0,
            generation: 0,
            first_id: 1,
            resync_requested: false,
            fatal: None,
        })
    }

    /// Whether request `id` was sent on an earlier connection (it is never answered).
    pub fn stale(&self, id: u64) -> bool {
        id < self.first_id
    }

    /// Which connection this is (a request sent on an earlier one is never answered).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// True while connected.
    pub fn is_up(&self) -> bool {
        self.sink.is_some()
    }

    /// Bytes waiting for an ack.
    pub fn unacked_bytes(&self) -> usize {
        self.window.bytes()
    }

    /// The highest LSN the process server holds durably.
    pub fn acked_lsn(&self) -> u64 {
        self.window.acked_lsn()
    }

    /// Whether a message of `bytes` would be taken now without waiting.
    pub fn has_room(&self, bytes: usize) -> bool {
        self.window.has_room(bytes)
    }

    /// Connects and attaches. Returns the highest LSN the process server holds for the disk.
    /// Refusals that retrying will not fix (too many disks, duplicate UUID, ...) are errors;
    /// `NotReady` (no master target yet) is an error the caller may retry.
    pub async fn connect(&mut self) -> Result<u64> {
        self.sink = None;
        self.events = None;
        let Connected {
            mut framed,
            version,
            ..
        } = connect(&self.spec, MessageCodec::new(self.compression)).await?;
        self.version = version;
        self.generation += 1;
        self.first_id = self.last_request_id + 1;
        // Answers to requests of an earlier connection never come: the requests are asked
        // again on this one.
        self.replies.clear();
        let mut attach = self.attach.clone();
        attach.request_id = self.next_request_id();
        framed.send(Message::DiskAttach(attach)).await?;
        let answer =
            tokio::time::timeout(Duration::from_millis(ATTACH_TIMEOUT_MS), framed.next()).await;
        let resume = self.resume_point(answer)?;
        let (sink, mut stream) = framed.split();
        let (tx, rx) = mpsc::channel(1024);
        let cuts = self.cuts_tx.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = stream.next().await {
                if let Message::Cut(c) = m {
                    // Full: a peer sending more than one cut at a time; its cut lapses.
                    let _ = cuts.try_send(c);
                    continue;
                }
                if tx.send(m).await.is_err() {
                    break;
                }
            }
        });
        self.sink = Some(sink);
        self.events = Some(rx);
        // Resend what the process server does not hold.
        let r = self.window.resume(resume);
        if r.lost {
            // Its stream expects lsn resume+1, which this agent no longer holds: going on
            // would be refused as a gap forever. Stop; the next start finds the run unclean
            // and resyncs the disk (differential) from a stream that starts at `resume`.
            let e = Error::Refused(format!(
                "the process server resumes disk {} at lsn {resume}, but it had acknowledged up to lsn {}: it lost acknowledged writes (its cache was replaced or damaged); the agent stops, and its next start resyncs the disk (differential)",
                self.attach.disk_id,
                self.window.acked_lsn()
            ));
            tracing::error!(error = %e, "stream lost on the process server");
            self.fatal = Some(e);
            return Ok(resume);
        }
        for m in r.resend {
            self.write(m).await;
        }
        tracing::info!(
            disk = self.attach.disk_id,
            resume_after_lsn = resume,
            "linked to the process server"
        );
        Ok(resume)
    }

    /// Where the stream resumes, from the process server's answer to the attach: the
    /// highest LSN it holds of the disk, or why not.
    fn resume_point(
        &self,
        answer: std::result::Result<
            Option<wire_protocol::Result<Message>>,
            tokio::time::error::Elapsed,
        >,
    ) -> Result<u64> {
        match answer {
            Ok(Some(Ok(Message::Ack(a)))) => Ok(a.entries.first().map_or(0, |e| e.durable_lsn)),
            Ok(Some(Ok(Message::Error(e)))) => Err(Error::Peer {
                code: e.code,
                message: format!(
                    "attach of disk {} refused: {}",
                    self.attach.disk_id, e.message
                ),
            }),
            Ok(Some(Ok(m))) => Err(Error::Refused(format!(
                "attach: unexpected answer {}",
                m.name()
            ))),
            Ok(Some(Err(e))) => Err(e.into()),
            Ok(None) => Err(Error::Refused(
                "the process server closed the link while attaching".into(),
            )),
            Err(_) => Err(Error::Refused("no answer to the attach in time".into())),
        }
    }

    /// Tries to reconnect if the link is down and the backoff allows. Returns whether up.
    pub async fn ensure_up(&mut self) -> bool {
        if self.is_up() {
            return true;
        }
        if Instant::now() < self.next_attempt {
            return false;
        }
        match self.connect().await {
            Ok(_) => true,
            Err(e) if e.retry() == wire_protocol::Retry::Permanent => {
                tracing::error!(error = %e, "the process server refused this disk for good");
                self.fatal = Some(e);
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_ms = self.backoff_ms, "process server unreachable");
                self.next_attempt = Instant::now() + Duration::from_millis(self.backoff_ms);
                self.backoff_ms = (self.backoff_ms * 2).min(MAX_BACKOFF_MS);
                false
            }
        }
    }

    async fn write(&mut self, m: Message) {
        if let Some(sink) = &mut self.sink {
            if let Err(e) = sink.send(m).await {
                tracing::warn!(error = %e, "link to the process server dropped");
                self.dropped();
            }
        }
    }

    async fn handle(&mut self, m: Message) {
        match m {
            Message::Ack(a) => {
                let id = self.attach.disk_id;
                for e in a.entries.iter().filter(|e| e.disk_id == id) {
                    if e.durable_lsn > self.window.acked_lsn() {
                        // Progress: the next drop is retried quickly again.
                        self.backoff_ms = MIN_BACKOFF_MS;
                    }
                    self.window.on_ack(e.durable_lsn);
                }
            }
            Message::Nack(n) => {
                tracing::warn!(from_lsn = n.from_lsn, reason = %n.reason, "process server asks for a resend");
                for m in self.window.from(n.from_lsn) {
                    self.write(m).await;
                }
            }
            Message::RemoteDurable { disk_id, lsn } if disk_id == self.attach.disk_id => {
                self.remote_durable_lsn = self.remote_durable_lsn.max(lsn);
            }
            Message::RemoteDurable { .. } | Message::Ignored { .. } => {}
            Message::Error(ref e) if e.code == ErrorCode::ResyncRequired => {
                tracing::warn!(error = %e.message, "the process server asks for a resync of this disk");
                self.resync_requested = true;
            }
            Message::Error(ref e) if e.code == ErrorCode::CacheFull => {
                tracing::warn!(error = %e.message, "process server cache full; waiting")
            }
            Message::Error(e) if e.code.retry() == wire_protocol::Retry::Permanent => {
                tracing::error!(code = ?e.code, error = %e.message, "the process server refused this disk's stream for good");
                self.fatal = Some(Error::Peer {
                    code: e.code,
                    message: e.message,
                });
            }
            // An error that answers no request (version 2: id 0) is news, never an answer.
            Message::Error(e)
                if e.request_id == 0
                    && self.version >= wire_protocol::version::REQUEST_IDS_SINCE =>
            {
                tracing::warn!(code = ?e.code, error = %e.message, "the process server reports an error");
            }
            other => self.replies.push_back(other),
        }
    }

    /// Handles every event already received, without waiting; makes the link again (when
    /// the backoff allows) if it is down while anything waits for an ack, so an agent with
    /// no new writes does not hold its window forever after the process server closed (and
    /// always for a replication group's member).
    pub async fn poll(&mut self) {
        while let Some(m) = self.try_event() {
            self.handle(m).await;
        }
        // A replication group's member reconnects even when idle: the group's cuts wait
        // for every member.
        if !self.is_up() && (!self.window.is_empty() || !self.attach.group_id.is_empty()) {
            self.ensure_up().await;
        }
    }

    /// An event already received, if any.
    fn try_event(&mut self) -> Option<Message> {
        match self.events.as_mut()?.try_recv() {
            Ok(m) => Some(m),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => {
                self.dropped();
                None
            }
        }
    }

    /// The link dropped: the next attempt waits out the backoff, which grows until the
    /// process server acknowledges something new.
    fn dropped(&mut self) {
        self.sink = None;
        self.events = None;
        // The first drop since the last progress is retried at once (a process server
        // restarting); drops again and again wait, longer each time.
        if self.backoff_ms > MIN_BACKOFF_MS {
            self.next_attempt = Instant::now() + Duration::from_millis(self.backoff_ms);
        }
        self.backoff_ms = (self.backoff_ms * 2).min(MAX_BACKOFF_MS);
    }

    /// Waits up to `max` for one event; returns false if the link is down.
    async fn wait_event(&mut self, max: Duration) -> bool {
        let Some(rx) = &mut self.events else {
            return false;
        };
        match tokio::time::timeout(max, rx.recv()).await {
            Ok(Some(m)) => {
                self.handle(m).await;
                true
            }
            Ok(None) => {
                self.dropped();
                false
            }
            Err(_) => true,
        }
    }

    /// Buffers and sends `m` (covering LSNs `first..=last`, `bytes` of data). Waits while
    /// the buffer is full and the link is up.
    pub async fn send(&mut self, m: Message, first: u64, last: u64, bytes: usize) -> Sent {
        self.poll().await;
        while !self.window.has_room(bytes) {
            if !self.ensure_up().await {
                return Sent::Overflow;
            }
            self.wait_event(Duration::from_millis(200)).await;
        }
        self.window.push(m.clone(), first, last, bytes);
        if self.ensure_up().await {
            self.write(m).await;
        }
        Sent::Queued
    }

    /// Waits until everything sent is acknowledged, for at most `max`. Returns whether it was.
    pub async fn drain(&mut self, max: Duration) -> bool {
        let deadline = Instant::now() + max;
        while !self.window.is_empty() && Instant::now() < deadline && self.fatal.is_none() {
            if !self.ensure_up().await {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            self.wait_event(Duration::from_millis(200)).await;
        }
        self.window.is_empty()
    }

    /// The next cut message from the process server (cancel-safe).
    pub async fn next_cut(&mut self) -> Cut {
        match self.cuts.recv().await {
            Some(c) => c,
            // The link holds a sender itself, so the channel never closes.
            None => std::future::pending().await,
        }
    }

    /// A cut message already received, if any.
    pub fn try_cut(&mut self) -> Option<Cut> {
        self.cuts.try_recv().ok()
    }

    /// Answers a cut step (not part of the LSN stream: lost with the link, and then the
    /// process server abandons the cut).
    pub async fn send_cut(&mut self, c: Cut) {
        if self.version >= wire_protocol::version::GROUPS_SINCE {
            self.write(Message::Cut(c)).await;
        }
    }

    /// A refusal met while reconnecting that retrying cannot fix, if any.
    pub fn take_fatal(&mut self) -> Option<Error> {
        self.fatal.take()
    }

    /// Drops replies to requests of a link that is gone (they are asked again).
    pub fn forget_replies(&mut self) {
        self.replies.clear();
    }

    /// Whether the process server asked for a resync since the last call.
    pub fn take_resync_requested(&mut self) -> bool {
        std::mem::take(&mut self.resync_requested)
    }

    /// Closes the link cleanly (TLS close_notify).
    pub async fn close(&mut self) {
        if let Some(mut sink) = self.sink.take() {
            let _ = sink.close().await;
        }
        self.events = None;
    }

    fn next_request_id(&mut self) -> u64 {
        self.last_request_id += 1;
        self.last_request_id
    }

    /// Sends a request that is not part of the LSN stream and waits for its reply.
    pub async fn request(&mut self, m: Message, max: Duration) -> Result<Message> {
        let id = self.send_request(m, max).await?;
        self.reply(id, max).await
    }

    /// Sends a request that is not part of the LSN stream, numbered with a new request id,
    /// which it returns; [`Link::reply`] with that id waits for its answer (so a caller may
    /// keep requests ahead).
    pub async fn send_request(&mut self, mut m: Message, max: Duration) -> Result<u64> {
        let deadline = Instant::now() + max;
        while !self.ensure_up().await {
            if Instant::now() > deadline {
                return Err(Error::Refused("the process server is unreachable".into()));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let id = self.next_request_id();
        m.set_request_id(id);
        self.write(m).await;
        Ok(id)
    }

    /// The answer to request `id`. A version-1 process server sends no ids: its answers
    /// come in the order the requests were sent.
    pub async fn reply(&mut self, id: u64, max: Duration) -> Result<Message> {
        let deadline = Instant::now() + max;
        while Instant::now() < deadline {
            if self.stale(id) {
                return Err(Error::Refused(
                    "the link dropped while waiting for a reply; retry".into(),
                ));
            }
            if let Some(r) = self.take_reply(id) {
                return Ok(r);
            }
            if let Some(e) = self.fatal.take() {
                return Err(e);
            }
            if !self.wait_event(Duration::from_millis(200)).await {
                return Err(Error::Refused(
                    "the link dropped while waiting for a reply; retry".into(),
                ));
            }
        }
        Err(Error::Refused("no reply in time".into()))
    }

    fn take_reply(&mut self, id: u64) -> Option<Message> {
        if self.version < wire_protocol::version::REQUEST_IDS_SINCE {
            return self.replies.pop_front();
        }
        // Answers to requests older than this one were given up on (ids only grow).
        self.replies.retain(|m| m.request_id() >= id);
        let at = self.replies.iter().position(|m| m.request_id() == id)?;
        self.replies.remove(at)
    }
}
