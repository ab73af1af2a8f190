//! The agent's engine: captures writes into batches with LSNs, takes bookmarks with disk
//! digests, falls back to a dirty-region bitmap in long outages, and resyncs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use store::{FileSystem, OpenMode, RealFs};
use wire_protocol::{Bookmark, BookmarkKind, DigestRequest, Message};

use crate::control;
use crate::error::{Error, IoContext, Result};
use crate::link::{Link, Sent};
use crate::source::{hex, SourceDisk, DIGEST_BLOCK_BYTES};
use crate::stream::{Batcher, Dirty};
use tokio::sync::mpsc;
use wire_protocol::message::MAX_BATCH_DATA_LEN;

pub use crate::stream::{BATCH_BYTES, BATCH_WRITES};

mod cut;
pub use cut::HOLD_MAX_MS;
pub use cut::{FreezeResult, Freezing};
const _: () = assert!(
    DIGEST_BLOCK_BYTES as usize <= MAX_BATCH_DATA_LEN,
    "a resync block fits a batch"
);
/// Blocks per digest request and resync step (128 MiB of disk at 64 KiB blocks): the unit
/// of resumption, and how much resync work sits between live writes.
pub const RESYNC_CHUNK_BLOCKS: u32 = 2048;

/// A bookmark taken on request, waiting to be durable on the master target.
#[derive(Debug)]
struct Wait {
    reply: control::BookmarkReply,
    deadline: Instant,
    to: tokio::sync::oneshot::Sender<control::BookmarkReply>,
    /// A frozen filesystem's bookmark: taken before this monotonic instant or not at all.
    take_before_mono_ms: u64,
    /// Where the early answer goes, once taken.
    taken: Option<tokio::sync::oneshot::Sender<control::BookmarkReply>>,
}

/// The file present in the state directory while an agent runs (removed on a clean end).
pub const RUNNING_MARKER: &str = "running";
/// The state directory's record of an interrupted resync: the next block to resync.
const RESYNC_PROGRESS: &str = "resync-progress";
/// The state directory's record of the source image's path (see [`crate::freeze`]).
pub const SOURCE_PATH: &str = "source-path";
/// The state directory's bookmark records, one JSON line each.
const BOOKMARKS: &str = "bookmarks.jsonl";
/// The line added to the marker once a run captures writes: a crash after it may have lost
/// writes the process server never got.
const CAPTURING: &str = "capturing";

/// The first wait between attempts to reach the process server at start.
pub const START_BACKOFF_MIN_MS: u64 = 250;
/// The longest wait between attempts to reach the process server at start.
pub const START_BACKOFF_MAX_MS: u64 = 5_000;
/// Attempts logged at INFO before they are logged at WARN.
pub const QUIET_ATTEMPTS: u32 = 3;

/// Times a resync asks again for digests lost to a dropped link before it gives up (each
/// attempt waits for the link to come back, within the request's own time limit).
const MAX_REQUEST_RETRIES: u32 = 10;

/// Where a resync stands.
#[derive(Debug)]
pub struct Resync {
    full: bool,
    /// The next block to resync.
    pub next_block: u64,
    /// Blocks of the disk.
    pub blocks: u64,
    progress_path: PathBuf,
    /// The first block, request id and link generation of the digest request sent ahead
    /// (the master target hashes the next chunk while this one is compared and sent).
    prefetched: Option<(u64, u64, u64)>,
}

impl Resync {
    /// Every chunk resynced.
    pub fn done(&self) -> bool {
        self.next_block >= self.blocks
    }
}

/// A bookmark the agent took, with the source disk's digest at that instant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BookmarkRecord {
    /// The bookmark's LSN.
    pub lsn: u64,
    /// Its tag.
    pub tag: String,
    /// Its time, microseconds since the Unix epoch.
    pub time_us: u64,
    /// The source disk digest (see [`crate::source`]), hex.
    pub disk_digest: String,
    /// The replication group's cut this bookmark marks (0: none; absent in records from
    /// before replication groups).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub group_marker: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// What woke [`Engine::next_request`].
pub enum Wake {
    /// A request from `agent bookmark`: [`Engine::accept_control`], then
    /// [`Engine::serve_control`].
    Control(control::Request),
    /// A cut step: [`Engine::serve_cut`].
    Cut(wire_protocol::Cut),
    /// A group cut's filesystems are frozen: [`Engine::serve_frozen`].
    Frozen(FreezeResult),
}

/// Counters of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunStats {
    /// Writes captured.
    pub writes: u64,
    /// Bytes captured.
    pub bytes: u64,
    /// Bookmarks taken.
    pub bookmarks: u64,
    /// Bookmarks skipped (dirty tracking or resync under way).
    pub bookmarks_skipped: u64,
    /// Times the buffer overflowed into dirty tracking.
    pub overflows: u64,
    /// Blocks resent from dirty tracking.
    pub dirty_blocks_resent: u64,
    /// Resync: bytes compared.
    pub resync_compared_bytes: u64,
    /// Resync: bytes sent.
    pub resync_sent_bytes: u64,
    /// Resync: digest bytes received.
    pub resync_digest_bytes: u64,
}

/// The engine.
pub struct Engine {
    /// The link.
    pub link: Link,
    /// The source disk.
    pub source: SourceDisk,
    disk_id: u64,
    /// Writes waiting for a batch, and LSN numbering.
    batcher: Batcher,
    /// Blocks written while the link was down and the buffer full.
    dirty: Dirty,
    /// Dirty blocks are being resent (the flushes on the way do not start another round).
    resending_dirty: bool,
    /// A resync is under way: the target is not consistent, so bookmarks make no point.
    resyncing: bool,
    state_dir: PathBuf,
    /// Where the state directory's files live (the machine's file system).
    fs: Arc<dyn FileSystem>,
    /// Held for the engine's life: one agent per state directory.
    _lock: runtime::lock::DirLock,
    /// Requests from `agent bookmark`.
    control: mpsc::Receiver<control::Request>,
    /// The previous run crashed after capturing writes: some may never have reached the
    /// process server, so the target needs a differential resync from the first block.
    pub unclean_start: bool,
    /// This run has marked (durably) that it captures writes.
    marked_capturing: bool,
    /// Bookmarks taken on request, waiting to be durable on the master target.
    waits: Vec<Wait>,
    /// Counters.
    pub stats: RunStats,
    /// Filesystems frozen for an app-consistent group cut (`--freeze-on-group-bookmark`).
    pub freeze_on_cut: Vec<PathBuf>,
    /// An app-consistent cut waiting for its freeze.
    freezing: Option<Freezing>,
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl Engine {
    /// Connects (retrying what may pass, with jittered backoff, until `connect_timeout`)
    /// and resumes after the LSN the process server holds. A refusal retrying cannot fix
    /// (another CA, a wrong server name, a disk of another VM, a detached disk, ...) fails
    /// at once.
    pub async fn start(
        mut link: Link,
        source: SourceDisk,
        disk_id: u64,
        state_dir: &Path,
        connect_timeout: Duration,
    ) -> Result<Engine> {
        let lock = runtime::lock::DirLock::acquire(state_dir, "agent")?;
        let control = control::listen(state_dir)?;
        // A marker present for the whole run: found at start, it says the last run crashed.
        let fs: Arc<dyn FileSystem> = Arc::new(RealFs);
        let marker = state_dir.join(RUNNING_MARKER);
        let unclean_start = store::read_all(&*fs, &marker)
            .is_ok_and(|m| String::from_utf8_lossy(&m).lines().any(|l| l == CAPTURING));
        if unclean_start {
            tracing::warn!(state_dir = %state_dir.display(), "the previous run of this agent did not end cleanly after capturing writes: some may not have reached the process server; a differential resync of the whole disk brings the target level");
            // An interrupted resync's progress does not cover writes lost in the crash.
            let progress = state_dir.join(RESYNC_PROGRESS);
            store::remove_durable(&*fs, &progress)
                .ctx(|| format!("remove {}", progress.display()))?;
        }
        store::write_durable(&*fs, &marker, std::process::id().to_string().as_bytes())
            .ctx(|| format!("write {}", marker.display()))?;
        // Where the source image is, for `agent bookmark --freeze` to refuse freezing the
        // filesystem under it (the agent writes there while the bookmark is taken).
        let at = state_dir.join(SOURCE_PATH);
        let path = std::path::absolute(source.path()).unwrap_or_else(|_| source.path().into());
        store::write_durable(&*fs, &at, path.as_os_str().as_encoded_bytes())
            .ctx(|| format!("write {}", at.display()))?;
        let deadline = Instant::now() + connect_timeout;
        let mut backoff = runtime::net::Backoff::new(START_BACKOFF_MIN_MS, START_BACKOFF_MAX_MS);
        let mut attempts = 0u32;
        let resume = loop {
            match link.connect().await {
                Ok(r) => break r,
                Err(e)
                    if Instant::now() < deadline
                        && e.retry() == wire_protocol::Retry::Transient =>
                {
                    attempts += 1;
                    let wait = backoff.next_delay();
                    // A few misses are normal (the agent may start before the process
                    // server); past them the operator should know.
                    if attempts <= QUIET_ATTEMPTS {
                        tracing::info!(error = %e, retry_ms = wait.as_millis() as u64, "waiting for the process server");
                    } else if matches!(e, Error::Peer { .. }) {
                        tracing::warn!(error = %e, attempts, retry_ms = wait.as_millis() as u64, "the process server does not take this disk yet");
                    } else {
                        tracing::warn!(error = %e, attempts, retry_ms = wait.as_millis() as u64, "still cannot reach the process server");
                    }
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e),
            }
        };
        Ok(Engine {
            link,
            batcher: Batcher::new(disk_id, resume),
            dirty: Dirty::new(source.blocks(), DIGEST_BLOCK_BYTES),
            resending_dirty: false,
            fs,
            source,
            disk_id,
            resyncing: false,
            state_dir: state_dir.into(),
            _lock: lock,
            control,
            unclean_start,
            marked_capturing: false,
            waits: Vec::new(),
            stats: RunStats::default(),
            freeze_on_cut: Vec::new(),
            freezing: None,
        })
    }

    /// The next LSN to be assigned.
    pub fn next_lsn(&self) -> u64 {
        self.batcher.next_lsn()
    }

    /// Captures one write: applies it to the source disk and queues it. A write longer
    /// than a batch may carry travels as consecutive pieces, each with its own LSN (a disk
    /// guarantees no more than sector atomicity for a large write either).
    pub async fn write(&mut self, offset: u64, data: Bytes) -> Result<()> {
        self.capture(offset, data.clone()).await?;
        self.source.rehash(offset, &data)
    }

    /// [`Engine::write`] without the digest upkeep: the caller must call
    /// [`SourceDisk::rehash`] on `engine.source` with the same write before anything else
    /// of the engine's (a bookmark reads the digests). Live capture answers the kernel in
    /// between, so the next write is on its way while this one is hashed.
    pub async fn capture(&mut self, offset: u64, data: Bytes) -> Result<()> {
        if !self.marked_capturing {
            // Durable before the first write: a crash from here on is known at the next start.
            let marker = self.state_dir.join(RUNNING_MARKER);
            let text = format!("{}\n{CAPTURING}\n", std::process::id());
            store::write_durable(&*self.fs, &marker, text.as_bytes())
                .ctx(|| format!("write {}", marker.display()))?;
            self.marked_capturing = true;
        }
        self.source.write_data(offset, &data)?;
        self.stats.writes += 1;
        self.stats.bytes += data.len() as u64;
        if !self.dirty.is_empty() && !self.link.is_up() {
            self.dirty.mark(offset, data.len() as u64);
            return Ok(());
        }
        if data.is_empty() {
            return self.queue(offset, data).await;
        }
        let mut at = 0;
        while at < data.len() {
            let end = data.len().min(at + MAX_BATCH_DATA_LEN);
            self.queue(offset + at as u64, data.slice(at..end)).await?;
            at = end;
        }
        Ok(())
    }

    /// Adds one write to the pending batch, sending the batch first if the write would take
    /// it past what a batch may carry, and after if it is full enough.
    async fn queue(&mut self, offset: u64, data: Bytes) -> Result<()> {
        if self.batcher.must_seal_before(data.len()) {
            Box::pin(self.flush()).await?;
        }
        if self.batcher.add(offset, data, now_us()) {
            Box::pin(self.flush()).await?;
        }
        Ok(())
    }

    /// Sends the pending batch.
    pub async fn flush(&mut self) -> Result<()> {
        if let Some(e) = self.link.take_fatal() {
            return Err(e);
        }
        let Some(batch) = self.batcher.seal(self.link.acked_lsn()) else {
            return self.resend_dirty().await;
        };
        let (first, last) = (batch.first_lsn, batch.last_lsn);
        if self.link.send(batch.msg, first, last, batch.bytes).await == Sent::Overflow {
            self.batcher.unseal(first);
            if self.dirty.is_empty() {
                self.stats.overflows += 1;
                tracing::warn!(buffered_bytes = self.link.unacked_bytes(), "link down longer than the buffer holds: tracking dirty regions; they are resynced when the link returns");
            }
            for (o, l) in batch.spans {
                self.dirty.mark(o, l);
            }
        }
        self.resend_dirty().await
    }

    /// Once the link is back, sends the current content of every dirty block.
    async fn resend_dirty(&mut self) -> Result<()> {
        // The flushes inside send_blocks come back here: one loop does the work.
        if self.resending_dirty || self.dirty.is_empty() || !self.link.ensure_up().await {
            return Ok(());
        }
        tracing::info!(
            blocks = self.dirty.len(),
            "link is back: resending dirty regions"
        );
        self.resending_dirty = true;
        let sent = self.resend_dirty_chunks().await;
        self.resending_dirty = false;
        sent
    }

    /// Resends dirty blocks a chunk at a time, so the list in hand stays small (the bitmap
    /// is the bound), while the link stays up.
    async fn resend_dirty_chunks(&mut self) -> Result<()> {
        while !self.dirty.is_empty() && self.link.is_up() {
            let blocks = self.dirty.take(RESYNC_CHUNK_BLOCKS as usize);
            self.send_blocks(&blocks).await?;
            self.stats.dirty_blocks_resent += blocks.len() as u64;
        }
        Ok(())
    }

    /// Sends the current content of `blocks` as writes (in the LSN stream, so later writes
    /// to the same blocks stay ordered after them).
    async fn send_blocks(&mut self, blocks: &[u64]) -> Result<u64> {
        let mut buf = vec![0u8; DIGEST_BLOCK_BYTES as usize];
        let mut sent = 0;
        for &b in blocks {
            let data = Bytes::copy_from_slice(self.source.read_block(b, &mut buf)?);
            sent += data.len() as u64;
            self.queue(b * DIGEST_BLOCK_BYTES, data).await?;
        }
        Box::pin(self.flush()).await?;
        Ok(sent)
    }

    async fn marker(&mut self, kind: BookmarkKind, tag: &str) -> Result<u64> {
        self.group_marker(kind, tag, (0, 0)).await
    }

    /// A bookmark in the stream, with a replication group's cut id and how many disks the
    /// cut covers ((0, 0): none).
    async fn group_marker(
        &mut self,
        kind: BookmarkKind,
        tag: &str,
        (cut_id, members): (u64, u32),
    ) -> Result<u64> {
        self.flush().await?;
        let lsn = self.batcher.take_lsns(self.link.acked_lsn(), 1);
        let time_us = now_us();
        let msg = Message::Bookmark(Bookmark {
            disk_id: self.disk_id,
            lsn,
            kind,
            time_us,
            group_marker: cut_id,
            group_members: members,
            tag: tag.to_owned(),
        });
        match self.link.send(msg, lsn, lsn, 0).await {
            Sent::Queued => Ok(lsn),
            Sent::Overflow => {
                self.batcher.unseal(lsn);
                Err(Error::Refused("link down and buffer full".into()))
            }
        }
    }

    /// Takes an app-consistent bookmark and records the source digest at that instant.
    pub async fn bookmark(&mut self, tag: &str) -> Result<Option<BookmarkRecord>> {
        let Some(rec) = self.bookmark_by(tag, 0).await? else {
            return Ok(None);
        };
        self.record(&rec)?;
        Ok(Some(rec))
    }

    /// [`Engine::bookmark`], not taken at all once the monotonic clock reaches
    /// `take_before_mono_ms` (0: any time): a frozen filesystem is thawed then.
    async fn bookmark_by(
        &mut self,
        tag: &str,
        take_before_mono_ms: u64,
    ) -> Result<Option<BookmarkRecord>> {
        self.flush().await?;
        if self.resyncing {
            self.stats.bookmarks_skipped += 1;
            tracing::warn!(
                tag,
                "bookmark skipped: a resync is under way, the target is not consistent yet"
            );
            return Ok(None);
        }
        if !self.dirty.is_empty() {
            self.stats.bookmarks_skipped += 1;
            tracing::warn!(
                tag,
                "bookmark skipped: dirty regions are waiting for resync"
            );
            return Ok(None);
        }
        let digest = hex(&self.source.disk_digest()?);
        // Checked last, after the slow work: between here and the LSN (taken first thing in
        // `marker`) nothing waits and no write is captured, so a bookmark checked in time
        // is placed in time (a frozen filesystem is thawed at the deadline, not before).
        if take_before_mono_ms > 0 && crate::freeze::mono_ms() >= take_before_mono_ms {
            self.stats.bookmarks_skipped += 1;
            return Ok(None);
        }
        let lsn = match self.marker(BookmarkKind::AppConsistent, tag).await {
            Ok(l) => l,
            Err(_) => {
                self.stats.bookmarks_skipped += 1;
                return Ok(None);
            }
        };
        Ok(Some(BookmarkRecord {
            lsn,
            tag: tag.to_owned(),
            time_us: now_us(),
            disk_digest: digest,
            group_marker: 0,
        }))
    }

    /// Keeps the record of a bookmark taken (appended and synced: it is what an export of
    /// the point is checked against).
    fn record(&mut self, rec: &BookmarkRecord) -> Result<()> {
        let path = self.state_dir.join(BOOKMARKS);
        let line = format!("{}\n", serde_json::to_string(rec).expect("serializable"));
        let append = || -> std::io::Result<()> {
            let f = self.fs.open(&path, OpenMode::CreateOrOpen)?;
            f.write_all_at(line.as_bytes(), f.len()?)?;
            f.sync_data()
        };
        append().ctx(|| format!("append to {}", path.display()))?;
        self.stats.bookmarks += 1;
        Ok(())
    }

    /// Serves `agent bookmark`: takes the bookmarks asked for (once the target is
    /// consistent: after a resync, or once dirty regions are resent), and answers each once
    /// it is durable on the master target or its time is up. Call it often (every 100 ms).
    pub async fn serve_control(&mut self) -> Result<()> {
        while let Ok(r) = self.control.try_recv() {
            self.accept_control(r);
        }
        if self.waits.is_empty() {
            return Ok(());
        }
        self.take_waiting().await?;
        self.flush().await?;
        self.link.poll().await;
        let durable = self.link.remote_durable_lsn;
        let now = Instant::now();
        for w in std::mem::take(&mut self.waits) {
            if w.reply.ok && durable >= w.reply.lsn {
                let _ = w.to.send(w.reply);
            } else if now < w.deadline {
                self.waits.push(w);
            } else if w.reply.ok {
                let _ = w.to.send(control::BookmarkReply::failed(
                    &w.reply.tag,
                    format!(
                        "bookmark at lsn {} is not durable on the master target in time (durable up to lsn {durable}); it stays in the stream and becomes a point when it gets there; check the link (process-server status)",
                        w.reply.lsn
                    ),
                ));
            } else {
                let why = if self.resyncing {
                    "a resync is under way and did not complete in time: the target is not consistent until it does; retry then"
                } else {
                    "dirty regions from a long link outage are still being resent: retry once they are"
                };
                let _ = w.to.send(control::BookmarkReply::failed(&w.reply.tag, why));
            }
        }
        Ok(())
    }

    /// The next request from `agent bookmark` or step of a replication group's cut, for a
    /// loop that waits on other things too (cancel-safe).
    pub async fn next_request(&mut self) -> Wake {
        let freezing = async {
            match self.freezing.as_mut() {
                Some(f) => f.done().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(r) = self.control.recv() => Wake::Control(r),
            c = self.link.next_cut() => Wake::Cut(c),
            r = freezing => Wake::Frozen(r),
        }
    }

    /// Serves what woke [`Engine::next_request`].
    pub async fn serve_wake(&mut self, w: Wake) -> Result<()> {
        match w {
            Wake::Control(r) => {
                self.accept_control(r);
                self.serve_control().await
            }
            Wake::Cut(c) => self.serve_cut(c).await,
            Wake::Frozen(r) => self.serve_frozen(r).await,
        }
    }

    /// Queues a request from `agent bookmark` (a malformed tag is answered at once).
    pub fn accept_control(&mut self, r: control::Request) {
        let tag = r.req.tag.clone();
        if let Err(e) = wire_protocol::message::validate_tag(&tag) {
            let _ = r
                .reply
                .send(control::BookmarkReply::failed("", e.to_string()));
            return;
        }
        self.waits.push(Wait {
            reply: control::BookmarkReply::failed(&tag, ""),
            deadline: Instant::now() + Duration::from_millis(r.req.timeout_ms),
            to: r.reply,
            take_before_mono_ms: r.req.take_before_mono_ms,
            taken: r.taken,
        });
    }

    /// Takes the bookmarks asked for and not yet taken, if the target is consistent now; a
    /// frozen filesystem's only before its deadline (after it, the request fails at once).
    async fn take_waiting(&mut self) -> Result<()> {
        let mut i = 0;
        while i < self.waits.len() {
            let (tag, before) = (
                self.waits[i].reply.tag.clone(),
                self.waits[i].take_before_mono_ms,
            );
            if self.waits[i].reply.ok {
                i += 1;
                continue;
            }
            let rec = if self.resyncing || !self.dirty.is_empty() {
                None
            } else {
                self.bookmark_by(&tag, before).await?
            };
            if let Some(rec) = rec {
                let w = &mut self.waits[i];
                w.reply = control::BookmarkReply {
                    ok: true,
                    taken: false,
                    lsn: rec.lsn,
                    tag: rec.tag.clone(),
                    disk_digest: rec.disk_digest.clone(),
                    error: String::new(),
                };
                // Told at once: a frozen filesystem is thawed now, before anything else here.
                if let Some(t) = w.taken.take() {
                    let _ = t.send(control::BookmarkReply {
                        taken: true,
                        ..w.reply.clone()
                    });
                }
                tracing::info!(tag = %rec.tag, lsn = rec.lsn, "bookmark taken on request");
                self.record(&rec)?;
            } else if before > 0 && crate::freeze::mono_ms() >= before {
                let w = self.waits.remove(i);
                let _ = w.to.send(control::BookmarkReply::failed(&tag, "the freeze window (--freeze-timeout-s) ended before the agent could take the bookmark: nothing was taken; retry (with a longer --freeze-timeout-s if the agent is busy or resyncing)"));
                continue;
            }
            i += 1;
        }
        Ok(())
    }

    /// Keeps the stream open without writes, serving bookmark requests, until SIGTERM or
    /// SIGINT.
    pub async fn serve_until_stopped(&mut self) -> Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).ctx(|| "catch SIGTERM".into())?;
        let mut int = signal(SignalKind::interrupt()).ctx(|| "catch SIGINT".into())?;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                w = self.next_request() => self.serve_wake(w).await?,
                _ = tokio::time::sleep(Duration::from_millis(crate::replay::CONTROL_EVERY_MS)) => {
                    self.serve_control().await?;
                    self.link.poll().await;
                    self.flush().await?;
                }
            }
        }
        tracing::info!("stopping: draining what the process server does not hold yet");
        Ok(())
    }

    /// Begins a resync of the target: `full` sends every block; otherwise only blocks whose
    /// digest differs from the target's. The target has no consistent recovery point until
    /// [`Engine::resync_end`]. An interrupted resync resumes at the chunk where it stopped.
    pub async fn resync_begin(&mut self, full: bool) -> Result<Resync> {
        let progress_path = self.state_dir.join(RESYNC_PROGRESS);
        let next_block: u64 = store::read_all(&*self.fs, &progress_path)
            .ok()
            .and_then(|s| String::from_utf8_lossy(&s).trim().parse().ok())
            .unwrap_or(0);
        if next_block > 0 {
            tracing::info!(next_block, "resuming an interrupted resync");
        }
        self.marker(
            BookmarkKind::ResyncStarted,
            if full {
                "resync-full"
            } else {
                "resync-differential"
            },
        )
        .await?;
        self.resyncing = true;
        Ok(Resync {
            full,
            next_block,
            blocks: self.source.blocks(),
            progress_path,
            prefetched: None,
        })
    }

    /// Resyncs one chunk. Live writes may be captured between steps: resync data travels in
    /// the same LSN stream, read from the source when sent, so the newest data lands last
    /// (and a block the target already holds in its newest form is not sent at all).
    pub async fn resync_step(&mut self, r: &mut Resync) -> Result<()> {
        if r.done() {
            return Ok(());
        }
        let b = r.next_block;
        let count = RESYNC_CHUNK_BLOCKS.min((r.blocks - b) as u32);
        let differing: Vec<u64> = if r.full {
            (b..b + u64::from(count)).collect()
        } else {
            self.flush().await?;
            let theirs = self.target_digests(r, b, count).await?;
            self.stats.resync_digest_bytes += 32 * u64::from(count);
            let ours = &self.source.digests()?[b as usize..(b + u64::from(count)) as usize];
            (0..count as usize)
                .filter(|&i| ours[i] != theirs[i])
                .map(|i| b + i as u64)
                .collect()
        };
        self.stats.resync_compared_bytes += u64::from(count) * DIGEST_BLOCK_BYTES;
        self.stats.resync_sent_bytes += self.send_blocks(&differing).await?;
        // The chunk counts as done only once the process server holds it durably: a resync
        // resumed after a crash must not skip blocks that never arrived.
        if !self.link.drain(Duration::from_secs(600)).await {
            return Err(Error::Refused(
                "the process server did not acknowledge a resync chunk within 10 minutes".into(),
            ));
        }
        r.next_block = b + u64::from(count);
        store::write_durable(
            &*self.fs,
            &r.progress_path,
            r.next_block.to_string().as_bytes(),
        )
        .ctx(|| format!("write {}", r.progress_path.display()))?;
        Ok(())
    }

    /// The target's digests of the `count` blocks from `b`, keeping one request ahead (the
    /// master target hashes the next chunk while this one is compared and sent).
    async fn target_digests(
        &mut self,
        r: &mut Resync,
        b: u64,
        count: u32,
    ) -> Result<Vec<[u8; 32]>> {
        let max = Duration::from_secs(300);
        // A link that drops while a request waits (a process server restarting, or
        // closing the connection so the agent attaches again) loses the requests in
        // flight: ask again on the new link, a bounded number of times.
        let mut drops = 0;
        let reply = loop {
            // A request sent ahead on an earlier connection is never answered: ask again.
            let id = match r.prefetched {
                Some((block, id, generation))
                    if block == b && generation == self.link.generation() =>
                {
                    id
                }
                _ => {
                    self.link
                        .send_request(self.digest_request(r, b), max)
                        .await?
                }
            };
            let next = b + u64::from(count);
            r.prefetched = None;
            if next < r.blocks {
                let id = self
                    .link
                    .send_request(self.digest_request(r, next), max)
                    .await?;
                r.prefetched = Some((next, id, self.link.generation()));
            }
            match self.link.reply(id, max).await {
                Ok(m) => break m,
                Err(e)
                    if drops < MAX_REQUEST_RETRIES
                        && (!self.link.is_up() || self.link.stale(id)) =>
                {
                    drops += 1;
                    tracing::warn!(error = %e, attempt = drops, "the link dropped during a resync request; asking again");
                    r.prefetched = None;
                    self.link.forget_replies();
                }
                Err(e) => return Err(e),
            }
        };
        match reply {
            Message::DigestList(l) if l.first_block == b && l.digests.len() == count as usize => {
                Ok(l.digests)
            }
            Message::Error(e) => Err(Error::Refused(format!(
                "digest request refused: {}",
                e.message
            ))),
            other => Err(Error::Refused(format!(
                "unexpected reply to a digest request: {}",
                other.name()
            ))),
        }
    }

    /// The digest request for the chunk that starts at block `first`.
    fn digest_request(&self, r: &Resync, first: u64) -> Message {
        Message::DigestRequest(DigestRequest {
            disk_id: self.disk_id,
            block_size: DIGEST_BLOCK_BYTES as u32,
            first_block: first,
            block_count: RESYNC_CHUNK_BLOCKS.min((r.blocks - first) as u32),
            request_id: 0,
        })
    }

    /// Ends a resync: the target is consistent from here on.
    pub async fn resync_end(&mut self, r: Resync) -> Result<()> {
        assert!(r.done(), "every chunk is resynced before the end marker");
        self.marker(BookmarkKind::ResyncCompleted, "resync-completed")
            .await?;
        self.resyncing = false;
        let _ = store::remove_durable(&*self.fs, &r.progress_path);
        Ok(())
    }

    /// A whole resync, with a progress bar.
    pub async fn resync(
        &mut self,
        full: bool,
        progress: Option<&indicatif::ProgressBar>,
    ) -> Result<()> {
        let mut r = self.resync_begin(full).await?;
        if let Some(p) = progress {
            p.set_length(r.blocks * DIGEST_BLOCK_BYTES);
        }
        while !r.done() {
            self.resync_step(&mut r).await?;
            if let Some(p) = progress {
                p.set_position(r.next_block * DIGEST_BLOCK_BYTES);
            }
        }
        self.resync_end(r).await
    }

    /// Flushes and waits until the process server holds everything.
    pub async fn drain(&mut self, max: Duration) -> Result<()> {
        self.flush().await?;
        let mut waited = Duration::ZERO;
        while !self.dirty.is_empty() && waited < max {
            tokio::time::sleep(Duration::from_millis(200)).await;
            waited += Duration::from_millis(200);
            self.flush().await?;
        }
        let drained = self.link.drain(max).await;
        if let Some(e) = self.link.take_fatal() {
            return Err(e);
        }
        // Bookmarks asked for are answered before the agent goes (each within its time).
        while !self.waits.is_empty() {
            self.serve_control().await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if drained && self.dirty.is_empty() {
            self.link.close().await;
            // Everything captured is held by the process server: the run ends clean.
            let marker = self.state_dir.join(RUNNING_MARKER);
            store::remove_durable(&*self.fs, &marker)
                .ctx(|| format!("remove {}", marker.display()))?;
            self.marked_capturing = false;
            Ok(())
        } else {
            Err(Error::Refused(format!(
                "the process server did not acknowledge everything within {} s; check it (process-server status)",
                max.as_secs()
            )))
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // The control socket goes with the agent; the lock file stays (it holds nothing).
        let _ = std::fs::remove_file(control::socket_path(&self.state_dir));
    }
}

/// Reads the bookmark records of a state directory. A last line without its newline is
/// a record a crash tore while it was appended (its bookmark was never answered as taken):
/// it is left out.
pub fn read_bookmarks(state_dir: &Path) -> Result<Vec<BookmarkRecord>> {
    let path = state_dir.join(BOOKMARKS);
    let bytes = match store::read_all(&RealFs, &path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::Io {
                context: format!("read {}", path.display()),
                source: e,
            })
        }
    };
    let text = String::from_utf8_lossy(&bytes);
    let whole = text.rfind('\n').map_or("", |end| &text[..end]);
    whole
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).map_err(|e| Error::InvalidParameter {
                param: "bookmarks.jsonl",
                reason: e.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bookmark_record_torn_by_a_crash_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_bookmarks(dir.path()).unwrap().is_empty());
        let rec = BookmarkRecord {
            lsn: 9,
            tag: "t".into(),
            time_us: 1,
            disk_digest: "ab".into(),
            group_marker: 0,
        };
        let line = serde_json::to_string(&rec).unwrap();
        let path = dir.path().join(BOOKMARKS);
        std::fs::write(&path, format!("{line}\n{}", &line[..10])).unwrap();
        assert_eq!(read_bookmarks(dir.path()).unwrap(), vec![rec.clone()]);
        // A whole line that does not parse is damage, and said so.
        std::fs::write(&path, format!("{line}\nnot json\n")).unwrap();
        assert!(read_bookmarks(dir.path()).is_err());
    }
}
