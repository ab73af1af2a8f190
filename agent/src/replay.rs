//! Replaying a recorded trace through the engine.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use serde::Serialize;

use crate::datagen;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::trace::{Format, TraceReader};

/// How often bookmark requests (`agent bookmark`) are looked at while replaying.
pub const CONTROL_EVERY_MS: u64 = 100;

/// Live writes between two resync chunks when a resync runs during a replay.
pub const RESYNC_EVERY_WRITES: u64 = 64;

/// What to do with a write beyond the disk's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutOfRange {
    /// Map it into the disk (offset modulo the size, kept whole).
    Wrap,
    /// Leave it out.
    Skip,
}

/// How fast to replay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// As fast as possible.
    Fast,
    /// At `factor` times the trace's own speed (1.0 is real time).
    Speed(f64),
}

impl std::str::FromStr for Pace {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Pace, String> {
        match s {
            "fast" => Ok(Pace::Fast),
            "realtime" => Ok(Pace::Speed(1.0)),
            _ => s
                .strip_suffix('x')
                .and_then(|n| n.parse().ok())
                .filter(|f: &f64| *f > 0.0)
                .map(Pace::Speed)
                .ok_or_else(|| format!("{s:?}: use fast, realtime or a speed such as 4x")),
        }
    }
}

/// A replay's settings (the `agent replay` flags).
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayOpts {
    /// The trace file.
    #[arg(long)]
    pub trace: PathBuf,
    /// Its format.
    #[arg(long, value_enum)]
    pub format: Format,
    /// Replay this device only (default: the first seen; "all" merges every device onto the disk).
    #[arg(long)]
    pub device: Option<String>,
    /// Writes beyond the disk's end.
    #[arg(long, value_enum, default_value = "wrap")]
    pub out_of_range: OutOfRange,
    /// fast, realtime, or a speed such as 4x.
    #[arg(long, default_value = "fast")]
    pub pace: Pace,
    /// Seed of the data written.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// How compressible the data is: 0.0 random .. 1.0 zeros (0.5: zstd halves it).
    #[arg(long, default_value_t = 0.5)]
    pub compressibility: f64,
    /// Draw the written data from this file instead (a disk image, an archive of real
    /// files): ratios and speeds of real data, still reproducible with --seed.
    #[arg(long, conflicts_with = "compressibility")]
    pub content: Option<PathBuf>,
    /// App-consistent bookmark every this many seconds of trace time.
    #[arg(long)]
    pub bookmark_every_s: Option<f64>,
    /// Stop after this many writes.
    #[arg(long)]
    pub max_writes: Option<u64>,
    /// Count malformed trace lines instead of stopping at the first.
    #[arg(long)]
    pub skip_bad_lines: bool,
}

impl ReplayOpts {
    /// Checks what can be checked before the disk is registered anywhere.
    pub fn check(&self) -> Result<()> {
        runtime::units::check_range(
            "compressibility",
            self.compressibility,
            0.0,
            1.0,
            self.compressibility,
        )?;
        if let Some(s) = self.bookmark_every_s {
            runtime::units::check_range("bookmark-every-s", s, 0.001, 86_400.0, s)?;
        }
        if let Some(p) = &self.content {
            datagen::Content::from_file(p, self.seed)?;
        }
        crate::trace::check(&self.trace, self.format, self.skip_bad_lines)
    }

    /// Where the written data comes from.
    pub fn content(&self) -> Result<datagen::Content> {
        match &self.content {
            Some(p) => datagen::Content::from_file(p, self.seed),
            None => Ok(datagen::Content::Synthetic {
                seed: self.seed,
                compressibility: self.compressibility,
            }),
        }
    }
}

/// What a replay did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplaySummary {
    /// Writes replayed.
    pub writes: u64,
    /// Bytes replayed.
    pub bytes: u64,
    /// Writes mapped into the disk from beyond its end.
    pub wrapped: u64,
    /// Writes left out (beyond the end with `skip`, or longer than the disk).
    pub skipped: u64,
    /// Writes of other devices.
    pub other_device: u64,
    /// Malformed lines skipped.
    pub bad_lines: u64,
    /// The device replayed.
    pub device: String,
    /// Trace seconds covered.
    pub trace_seconds: f64,
    /// Bookmarks taken.
    pub bookmarks: u64,
    /// SIGTERM or SIGINT stopped the replay before the trace's end (then `--stay` does not
    /// keep the agent: the signal asked it to stop).
    pub stopped_by_signal: bool,
}

/// A flag set when SIGTERM or SIGINT arrives (the replay then stops cleanly: what was
/// captured is drained, the run ends as clean).
fn stop_signal() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use tokio::signal::unix::{signal, SignalKind};
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = std::sync::Arc::clone(&flag);
    if let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            f.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }
    flag
}

/// Waits (flushed) until `due` after `started`, in short steps that answer bookmark
/// requests meanwhile.
async fn wait_until(engine: &mut Engine, started: Instant, due: Duration) -> Result<()> {
    if due <= started.elapsed() {
        return Ok(());
    }
    engine.flush().await?;
    while let Some(wait) = due.checked_sub(started.elapsed()) {
        tokio::select! {
            _ = tokio::time::sleep(wait.min(Duration::from_millis(CONTROL_EVERY_MS))) => {}
            // A replication group's cut is served at once: its members wait for this one.
            w = engine.next_request() => engine.serve_wake(w).await?,
        }
        engine.serve_control().await?;
    }
    Ok(())
}

/// Where a write of `len` bytes at `offset` lands on a disk of `size` bytes: as is, mapped
/// into the disk (kept whole and sector-aligned), or nowhere (counted as skipped).
fn map_into(
    offset: u64,
    len: u64,
    size: u64,
    out_of_range: OutOfRange,
    sum: &mut ReplaySummary,
) -> Option<u64> {
    let end = offset.saturating_add(len);
    if len > size || (end > size && out_of_range == OutOfRange::Skip) {
        sum.skipped += 1;
        return None;
    }
    if end > size {
        sum.wrapped += 1;
        return Some((offset % size).min(size - len) / 512 * 512);
    }
    Some(offset)
}

/// A resync under way advances one chunk every [`RESYNC_EVERY_WRITES`] writes; one the
/// process server asks for begins here.
async fn advance_resync(
    engine: &mut Engine,
    resync: &mut Option<crate::engine::Resync>,
    writes: u64,
) -> Result<()> {
    if resync.is_none() && engine.link.take_resync_requested() {
        *resync = Some(engine.resync_begin(false).await?);
    }
    if let Some(r) = resync.as_mut() {
        if writes.is_multiple_of(RESYNC_EVERY_WRITES) {
            engine.resync_step(r).await?;
        }
        // Done: the target is consistent from here, and bookmarks make points again.
        if r.done() {
            engine.resync_end(resync.take().expect("checked")).await?;
        }
    }
    Ok(())
}

/// Replays `opts.trace` into `engine`, advancing `resync` (if any) between writes; starts a
/// differential resync if the process server asks for one.
/// `on_progress` is called after each write.
pub async fn replay(
    engine: &mut Engine,
    opts: &ReplayOpts,
    resync: &mut Option<crate::engine::Resync>,
    mut on_progress: impl FnMut(&ReplaySummary),
) -> Result<ReplaySummary> {
    let mut reader = TraceReader::open(&opts.trace, opts.format, opts.skip_bad_lines)?;
    let content = opts.content()?;
    let size = engine.source.size_bytes();
    let mut sum = ReplaySummary::default();
    let started = Instant::now();
    let mut next_bookmark_ns = opts.bookmark_every_s.map(|s| (s * 1e9) as u64);
    let mut device: Option<String> = opts.device.clone();
    let mut last_request_check = Instant::now();
    let mut index = 0u64;
    let stop = stop_signal();
    for w in &mut reader {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            tracing::info!("SIGTERM: the replay stops here; what was captured is drained");
            sum.stopped_by_signal = true;
            break;
        }
        let w = w?;
        let dev = device.get_or_insert_with(|| w.device.clone());
        if dev != "all" && *dev != w.device {
            sum.other_device += 1;
            continue;
        }
        if let Some(max) = opts.max_writes {
            if sum.writes >= max {
                break;
            }
        }
        if let (Pace::Speed(f), true) = (opts.pace, w.time_ns > 0) {
            let due = Duration::from_nanos((w.time_ns as f64 / f) as u64);
            wait_until(engine, started, due).await?;
        }
        while let Some(at) = next_bookmark_ns.filter(|&at| w.time_ns >= at) {
            let tag = format!("auto-{}", sum.bookmarks + 1);
            if engine.bookmark(&tag).await?.is_some() {
                sum.bookmarks += 1;
            }
            next_bookmark_ns = Some(at + (opts.bookmark_every_s.unwrap_or(1.0) * 1e9) as u64);
        }
        let Some(offset) = map_into(w.offset, w.len, size, opts.out_of_range, &mut sum) else {
            continue;
        };
        engine.serve_cuts().await?;
        let mut data = BytesMut::zeroed(w.len as usize);
        content.fill(index, &mut data)?;
        index += 1;
        engine.write(offset, data.freeze()).await?;
        sum.writes += 1;
        sum.bytes += w.len;
        sum.trace_seconds = w.time_ns as f64 / 1e9;
        advance_resync(engine, resync, sum.writes).await?;
        if last_request_check.elapsed() > Duration::from_millis(CONTROL_EVERY_MS) {
            engine.serve_control().await?;
            last_request_check = Instant::now();
        }
        on_progress(&sum);
    }
    engine.flush().await?;
    sum.bad_lines = reader.bad_lines;
    sum.device = device.unwrap_or_default();
    if sum.writes == 0 {
        return Err(Error::InvalidParameter {
            param: "trace",
            reason: format!(
                "{} holds no write for device {:?}",
                opts.trace.display(),
                sum.device
            ),
        });
    }
    Ok(sum)
}
