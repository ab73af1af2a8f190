//! Where the shipper waited each period, measured, and handed to the pure policy
//! ([`crate::adaptive`]) that moves the zstd level and takes or leaves the link's stream.
//!
//! # Design constraints
//! - Only measuring here (clocks, counters jobs add to); every decision is in
//!   `adaptive.rs`, where tests drive it period by period.
//! - A session's first period is not judged: it fills the empty window as fast as the
//!   cores go, whatever the level.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::adaptive::{AdaptiveLevel, Period, StreamChoice, StreamStep};
use crate::state::State;

use super::MERGE_FROM_LEVEL;

/// What the jobs holding the link's zstd stream report: how long it compressed, and at
/// which level its frame under way is.
#[derive(Debug, Default)]
pub(super) struct StreamGauge {
    /// Wall microseconds jobs held the stream, added as each hold ends (one job at a
    /// time holds it).
    pub(super) held_us: AtomicU64,
    /// The level of the stream's zstd frame under way; 0 before its first chunk. It stays
    /// as it was when the stream is left; the policy reads it only while streaming.
    pub(super) level: AtomicI32,
}

/// How long the shipper waited on the link and on compression, and how long compression
/// jobs ran: each second, the adaptive zstd level moves by it.
pub(super) struct Waits<'a> {
    adaptive: &'a mut AdaptiveLevel,
    pub(super) link: Duration,
    pub(super) cpu: Duration,
    /// Waited on a job with the window full (so no other job could start).
    pub(super) window: Duration,
    /// CPU microseconds compression jobs used (they add to it as they end).
    pub(super) busy_us: Arc<AtomicU64>,
    /// The link's zstd stream's own measures.
    pub(super) gauge: Arc<StreamGauge>,
    /// Compression's share of the cores, averaged over periods.
    busy: f64,
    cores: f64,
    since: Instant,
    /// The last period waited mostly downstream (the link, or the master target).
    downstream_bound: bool,
    /// Whether batches compress into the link's zstd stream. Not from the link's first
    /// session: where the cores are the bottleneck (1 Gbit/s here) its first seconds went
    /// at one core's pace. A later session starts as the last one ended.
    stream: StreamChoice,
    /// The session's first period is under way.
    filling: bool,
}

impl<'a> Waits<'a> {
    pub(super) fn new(adaptive: &'a mut AdaptiveLevel, stream: StreamChoice) -> Waits<'a> {
        Waits {
            adaptive,
            link: Duration::ZERO,
            cpu: Duration::ZERO,
            window: Duration::ZERO,
            busy_us: Arc::default(),
            gauge: Arc::default(),
            busy: 0.0,
            cores: std::thread::available_parallelism().map_or(2, |n| n.get()) as f64,
            since: Instant::now(),
            downstream_bound: false,
            stream,
            filling: true,
        }
    }

    /// Whether jobs merge the records that follow on (`merge.rs`): a larger frame
    /// compresses better but pipelines worse (a 1 Gbit/s drain, bound by the cores, fell
    /// from 213-245 to 185 MB/s, and RPO under churn doubled), so only while the link is
    /// the bottleneck and the level has climbed to [`MERGE_FROM_LEVEL`] (the cores have
    /// room to spare).
    pub(super) fn merge(&self, level: i32) -> bool {
        self.downstream_bound && level >= MERGE_FROM_LEVEL
    }

    /// Whether jobs compress into the link's zstd stream (protocol 5): while the link is
    /// full, unless the stream (one core) held it back, at any level. History beats level:
    /// the WAN bench's image goes 5.39:1 at level 2 in one stream (315 MB/s on one core)
    /// against 5.01:1 at level 9 in 1 MiB frames (70 MB/s).
    pub(super) fn stream(&self, level: i32) -> bool {
        self.stream.streaming() && level > 0
    }

    /// Whether the stream is taken, for the link's next session.
    pub(super) fn streaming(&self) -> bool {
        self.stream.streaming()
    }

    /// The level this uplink compresses at: its own while adaptive (each uplink's link
    /// differs; the metric shows the last one adapted), else the configured one.
    pub(super) fn level(&self, state: &State) -> i32 {
        if state.cfg.adaptive_compression {
            self.adaptive.level()
        } else {
            state.compression_level.load(Ordering::Relaxed)
        }
    }

    /// Each period: the level moves (adaptive mode), the stream is taken or left, and the
    /// period's waits are traced with the bytes in flight at its end.
    pub(super) fn adapt(&mut self, state: &State, in_flight_bytes: u64) {
        let p = self.since.elapsed().as_secs_f64();
        if p < 1.0 {
            return;
        }
        let fraction = |d: Duration| d.as_secs_f64() / p;
        let busy_now = self.busy_us.swap(0, Ordering::Relaxed) as f64 / 1e6 / p / self.cores;
        let stream_busy = self.gauge.held_us.swap(0, Ordering::Relaxed) as f64 / 1e6 / p;
        let period = Period {
            link: fraction(std::mem::take(&mut self.link)),
            cpu: fraction(std::mem::take(&mut self.cpu)),
            window: fraction(std::mem::take(&mut self.window)),
            // Averaged over periods: a job's time counts when it ends, and large records at
            // high levels end in bursts (one burst must not step a fine level down for 30 s).
            busy: (self.busy + busy_now) / 2.0,
            stream_busy,
        };
        self.since = Instant::now();
        if std::mem::take(&mut self.filling) {
            // A session's first period fills the empty window as fast as the cores go: it
            // waits on compression whatever the level (a drain's first second stepped the
            // level down and, held there for 30 s by the ceiling, the whole drain ran at
            // level 2 on a link that left the cores idle).
            tracing::trace!(
                link = period.link,
                cpu = period.cpu,
                in_flight_bytes,
                "first period of the session (the window's first fill): level kept"
            );
            return;
        }
        // Averaged in every judged period, whatever the mode (the level is configured, or
        // the stream was left): the average is of the cores, not of a level.
        self.busy = period.busy;
        let stream_level = match self.gauge.level.load(Ordering::Relaxed) {
            0 => None,
            l => Some(l),
        };
        let adaptive = state
            .cfg
            .adaptive_compression
            .then_some(&mut *self.adaptive);
        let d = self.stream.period(period, adaptive, stream_level);
        self.downstream_bound = d.downstream_bound;
        match d.stream {
            StreamStep::Taken => tracing::debug!(
                "the link is the bottleneck: batches compress into the link's zstd stream"
            ),
            StreamStep::Left => tracing::debug!(
                "the link's zstd stream is the bottleneck: batches compress alone, on every core"
            ),
            StreamStep::Kept => {}
        }
        // The trace shows the period as measured, and what it was judged by (`cpu_judged`
        // holds the window's wait while the stream was saturated; `stream_busy_judged` is
        // averaged over two periods).
        tracing::trace!(
            level = d.level,
            link = period.link,
            cpu = period.cpu,
            window = period.window,
            busy = period.busy,
            stream_busy,
            cpu_judged = d.cpu_wait,
            stream_busy_judged = d.stream_busy,
            stream_level,
            in_flight_bytes,
            "compression period"
        );
        let Some(level) = d.level else { return };
        if level != state.compression_level.swap(level, Ordering::Relaxed) {
            tracing::debug!(
                level,
                link = period.link,
                cpu = d.cpu_wait,
                stream_busy = d.stream_busy,
                "compression level adapted"
            );
        }
    }
}
