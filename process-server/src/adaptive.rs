//! Choosing the zstd level from where the shipper waits (no I/O, no clock).
//!
//! Each period the shipper reports three fractions of it: the time it waited downstream
//! (window full, bandwidth limiter, socket), the time it waited on compression with every
//! compression job running, and how busy compression kept the cores.
//!
//! # Design constraints
//! - Downstream-bound (the link, or a master target applying slower than the link carries:
//!   from here the two look alike) with compression using under [`BUSY_CLIMB_MAX`] of the
//!   cores: one step up per period, turning idle cores into fewer wire bytes. The busy cap
//!   leaves the cores to ingest, TLS and the other disks: climbing on a full window alone
//!   took a loopback drain to level 4 and slowed it.
//! - Compression as the bottleneck (waited on for over [`CPU_BOUND`] while downstream had
//!   room), or over [`BUSY_MAX`] of the cores: one step down.
//! - No see-saw: the level that proved too slow is a ceiling for [`CEILING_HOLD_PERIODS`];
//!   then it is tried again (the load, the content or the link may have changed). The
//!   level it starts at is a guess, not a level it climbed into: a step down from it sets
//!   no ceiling (the first seconds of a resync, its processes starting on shared cores,
//!   would otherwise hold a whole run at the level below).
//! - The link's zstd stream (protocol 5, [`StreamChoice`]) is one core's work: taken while
//!   the link is full, its level stepped down first when it holds the link back, and left
//!   only at the lowest level. While it compresses all period long, jobs that wait with the
//!   window full are waiting their turn for it: that wait is compression's, not the link's.
//!   Short of that, in the stream (and only there) a full window's wait is the link's: it
//!   keeps a short wait on a full pool from stepping down, and counts toward a climb when
//!   the link itself was waited on for over [`STREAM_CLIMB_LINK_MIN`]: the stream has a
//!   core's room, and its history makes each level worth more than batch by batch.
//!   In the stream the level climbs (on any wait) only while the stream is under
//!   [`STREAM_CLIMB_BUSY_MAX`] busy, so that the next level still leaves it room. The level
//!   follows the stream's own, which climbs more slowly (a zstd frame's level is fixed), so
//!   a step down always lowers what is compressed.

/// Waiting downstream more than this fraction of a period makes it the bottleneck.
pub const LINK_BOUND: f64 = 0.5;
/// Waiting on a saturated compression pool more than this fraction of a period: the level
/// is too high for the cores.
pub const CPU_BOUND: f64 = 0.1;
/// Compression may climb while it keeps less than this fraction of the cores busy.
pub const BUSY_CLIMB_MAX: f64 = 0.35;
/// Compression keeping more than this fraction of the cores busy steps down.
pub const BUSY_MAX: f64 = 0.6;
/// Periods a level that proved too slow stays out of reach (periods are about 1 s).
pub const CEILING_HOLD_PERIODS: u32 = 30;
/// The link's zstd stream compressing more than this share of a period (wall time, one
/// job at a time holds it; averaged over two periods, since a job adds its hold as it ends
/// and one period may read over 1) is the bottleneck: it cannot go faster on one core.
pub const STREAM_SATURATED: f64 = 0.9;
/// In the stream, the full window's wait counts toward a climb only where the link itself
/// was waited on for more than this share of the period: a master target applying slowly
/// fills the window too, and a higher level does nothing for it.
pub const STREAM_CLIMB_LINK_MIN: f64 = 0.25;
/// In the stream, the level climbs only while the stream compresses for less than this
/// share of the period: a step up costs it up to 1.4× (level 4 to 5 on the WAN bench's
/// image: 116 to 84 MB/s on one core), so from under half busy the next level stays near
/// 0.7, short of [`STREAM_SATURATED`] by the margin the noise of shared cores needs. A
/// climb to the edge saturated the stream, stepped it down (a new zstd frame, its history
/// lost) and held that level off for [`CEILING_HOLD_PERIODS`]: the bench's 100 Mbit/s bulk
/// went 1.10-1.13x the pipe so, 1.17x at a level held at 4.
pub const STREAM_CLIMB_BUSY_MAX: f64 = 0.5;
/// Periods (about 1 s each) the link's zstd stream is left after it held the link back,
/// so that on a link one core nearly fills it does not go on and off every second.
pub const STREAM_OFF_PERIODS: u32 = 10;
/// Level range of the automatic mode: past 9, zstd's cost grows much faster than its gain.
pub const AUTO_MIN: i32 = 1;
/// See [`AUTO_MIN`].
pub const AUTO_MAX: i32 = 9;

/// The controller.
#[derive(Debug, Clone, Copy)]
pub struct AdaptiveLevel {
    level: i32,
    min: i32,
    max: i32,
    /// A level that proved too slow, and for how many more periods it stays out of reach.
    ceiling: Option<(i32, u32)>,
    /// Still at the level it started at, which is a guess, not a level climbed into: a
    /// step down from it sets no ceiling. A bulk resync's first seconds (the agent, the
    /// cache and the first jobs starting on the same cores) stepped the start level 3 down
    /// once, and its ceiling then held the whole 18 s run at 2. Only that one step is
    /// spared: a burst over two periods (3 to 2 to 1) still makes 2 a ceiling.
    at_start: bool,
}

impl AdaptiveLevel {
    /// Starts at `start`, kept within `min..=max`.
    pub fn new(start: i32, min: i32, max: i32) -> Self {
        assert!(min <= max, "a level range");
        AdaptiveLevel {
            level: start.clamp(min, max),
            min,
            max,
            ceiling: None,
            at_start: true,
        }
    }

    /// The current level.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Brings the level down to `level` if it is above: the level the link's zstd stream
    /// really compresses at, which climbs more slowly than this one asks.
    pub fn follow(&mut self, level: i32) {
        let followed = self.level.min(level.clamp(self.min, self.max));
        self.at_start &= followed == self.level;
        self.level = followed;
    }

    /// Whether a step down would lower the level, once it followed `stream` (the level
    /// of the link's zstd stream, if it is in use).
    pub fn can_step_down_from(&self, stream: Option<i32>) -> bool {
        stream.map_or(self.level, |s| self.level.min(s)) > self.min
    }

    /// Takes one period's waits and compression's busy share of the cores (fractions) and
    /// returns the next level.
    pub fn update(&mut self, link_wait: f64, cpu_wait: f64, busy: f64) -> i32 {
        let before = self.level;
        self.ceiling = match self.ceiling {
            Some((_, 0)) | None => None,
            Some((c, n)) => Some((c, n - 1)),
        };
        if (cpu_wait > CPU_BOUND && link_wait < LINK_BOUND) || busy > BUSY_MAX {
            if self.level > self.min && !self.at_start {
                self.ceiling = Some((self.level, CEILING_HOLD_PERIODS));
            }
            self.level = (self.level - 1).max(self.min);
        } else if link_wait > LINK_BOUND && busy < BUSY_CLIMB_MAX {
            let next = (self.level + 1).min(self.max);
            if self.ceiling.is_none_or(|(c, _)| next < c) {
                self.level = next;
            }
        }
        self.at_start &= self.level == before;
        self.level
    }
}

/// One period's waits of the shipper, as fractions of the period (measured by the uplink).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Period {
    /// Sending (socket full, bandwidth limit), or idle with the window full.
    pub link: f64,
    /// On the front job with every compression job running.
    pub cpu: f64,
    /// On the front job with the window full, so that no other job could start.
    pub window: f64,
    /// Compression's share of the cores, averaged over periods.
    pub busy: f64,
    /// The share of the period the link's zstd stream spent compressing (wall time).
    pub stream_busy: f64,
}

/// What the link's zstd stream did in a period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamStep {
    /// As it was.
    Kept,
    /// Taken: the link is full.
    Taken,
    /// Left: it held the link back at the lowest level.
    Left,
}

/// One period's decisions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// The next level, when it was adapted this period (adaptive mode, stream not left).
    pub level: Option<i32>,
    /// What the stream did.
    pub stream: StreamStep,
    /// The period waited mostly on the link (or the master target).
    pub downstream_bound: bool,
    /// The compression waits the period was judged by (the window's wait counts in
    /// while the stream was saturated).
    pub cpu_wait: f64,
    /// The stream's busy share the period was judged by (averaged over two periods).
    pub stream_busy: f64,
}

/// Whether batches compress into the link's zstd stream, from period to period.
#[derive(Debug, Clone, Copy)]
pub struct StreamChoice {
    streaming: bool,
    /// Periods before the stream may be taken again after it held the link back.
    off_periods: u32,
    /// The link's version has streams (5 or later).
    can_stream: bool,
    /// The last period's [`Period::stream_busy`], if it was in the stream.
    last_stream_busy: Option<f64>,
}

impl StreamChoice {
    /// A session's choice: `streaming` as the link's last session ended.
    pub fn new(can_stream: bool, streaming: bool) -> Self {
        StreamChoice {
            streaming: can_stream && streaming,
            off_periods: 0,
            can_stream,
            last_stream_busy: None,
        }
    }

    /// Whether batches compress into the stream.
    pub fn streaming(&self) -> bool {
        self.streaming
    }

    /// Takes a period's waits, the adaptive level (`None` where the level is configured)
    /// and the stream's own level (`None` before its first chunk), and decides.
    pub fn period(
        &mut self,
        p: Period,
        adaptive: Option<&mut AdaptiveLevel>,
        stream_level: Option<i32>,
    ) -> Decision {
        let was_streaming = self.streaming;
        // Averaged over two periods: a job adds its hold of the stream as it ends, so one
        // period may read over 1 and the next near 0 (one long chunk ending late must not
        // step a fine level down and hold it there for CEILING_HOLD_PERIODS).
        let prior = self.last_stream_busy.take();
        let stream_busy = (prior.unwrap_or(0.0) + p.stream_busy) / 2.0;
        self.last_stream_busy = was_streaming.then_some(p.stream_busy);
        // A climb asks the other way round: with no period in the stream before this one
        // (a session's first, or the first after taking it), this one alone, lest an
        // average with nothing read a stream compressing all period as half busy.
        let climb_busy = prior.map_or(p.stream_busy, |_| stream_busy);
        let saturated = was_streaming && stream_busy > STREAM_SATURATED;
        // A full window is the link holding all it may, unless the stream compressed all
        // period: then the jobs waited with the window full were waiting their turn.
        let (link, cpu) = if saturated {
            (p.link, p.cpu + p.window)
        } else {
            (p.link + p.window, p.cpu)
        };
        let full_link = link > LINK_BOUND;
        let cpu_bound = cpu > CPU_BOUND && !full_link;
        self.off_periods = self.off_periods.saturating_sub(1);
        // In the stream, the level compressed at is the stream's own where it is lower.
        let followed = match (was_streaming, stream_level) {
            (true, Some(s)) => Some(s),
            _ => None,
        };
        let can_step_down = adaptive
            .as_deref()
            .is_some_and(|a| a.can_step_down_from(followed));
        let stream = if self.streaming && cpu_bound && !can_step_down {
            (self.streaming, self.off_periods) = (false, STREAM_OFF_PERIODS);
            StreamStep::Left
        } else if !self.streaming && full_link && self.off_periods == 0 && self.can_stream {
            self.streaming = true;
            StreamStep::Taken
        } else {
            StreamStep::Kept
        };
        let level_link = if saturated {
            // Both at their limit: neither climb nor, on the link's account, step down.
            p.link.min(LINK_BOUND)
        } else if was_streaming && climb_busy >= STREAM_CLIMB_BUSY_MAX {
            // Room for this level, not for the next one.
            link.min(LINK_BOUND)
        } else if was_streaming && p.link > STREAM_CLIMB_LINK_MIN {
            // In the stream, with room for the next level, the full window's wait is the
            // link's for the level too.
            link
        } else if was_streaming {
            // The same, save the climb: a wait on a full pool with the window full too is
            // no reason to step down while the stream has room.
            link.min(LINK_BOUND)
        } else {
            p.link
        };
        // Leaving the stream answers this period's wait on compression: batches go at the
        // level of their own, on every core.
        let level = match adaptive {
            Some(a) if stream != StreamStep::Left => {
                if let Some(s) = followed {
                    a.follow(s);
                }
                Some(a.update(level_link, cpu, p.busy))
            }
            _ => None,
        };
        Decision {
            level,
            stream,
            downstream_bound: p.link > LINK_BOUND,
            cpu_wait: cpu,
            stream_busy,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn climbs_while_link_bound_and_steps_down_when_cpu_bound() {
        let mut a = AdaptiveLevel::new(3, AUTO_MIN, AUTO_MAX);
        for _ in 0..20 {
            a.update(0.9, 0.0, 0.1);
        }
        assert_eq!(a.level(), AUTO_MAX, "capped");
        a.update(0.9, 0.0, 0.7);
        assert_eq!(a.level(), AUTO_MAX - 1, "too busy wins over link-bound");
        for _ in 0..20 {
            a.update(0.0, 0.6, 0.5);
        }
        assert_eq!(a.level(), AUTO_MIN);
        assert_eq!(a.update(0.1, 0.0, 0.1), AUTO_MIN, "neither bound: stay");
        assert_eq!(
            a.update(0.9, 0.0, 0.4),
            AUTO_MIN,
            "link-bound, but compression already busy enough: stay"
        );
        let mut fresh = AdaptiveLevel::new(AUTO_MIN, AUTO_MIN, AUTO_MAX);
        assert_eq!(
            fresh.update(0.6, 0.3, 0.1),
            AUTO_MIN + 1,
            "waits on a saturated pool while downstream is the bottleneck are latency: climb"
        );
    }

    #[test]
    fn a_level_that_idled_the_link_is_not_retried_at_once_but_later() {
        let mut a = AdaptiveLevel::new(1, AUTO_MIN, AUTO_MAX);
        // Levels up to 4 keep compression under the climbing cap; 5 takes most cores.
        let busy = |level: i32| if level >= 5 { 0.7 } else { 0.1 };
        let mut levels = Vec::new();
        for _ in 0..CEILING_HOLD_PERIODS + 10 {
            let l = a.level();
            levels.push(a.update(0.9, 0.0, busy(l)));
        }
        assert_eq!(&levels[..5], &[2, 3, 4, 5, 4], "climbs, then steps back");
        // The step down (period 5) sets the hold: 5 stays out of reach for the next
        // CEILING_HOLD_PERIODS periods, and the one after tries it again.
        let hold = CEILING_HOLD_PERIODS as usize;
        let held = &levels[5..5 + hold];
        assert!(
            held.iter().all(|&l| l == 4),
            "no see-saw while the ceiling holds: {held:?}"
        );
        assert_eq!(
            levels[5 + hold],
            5,
            "tried again once the hold ends: {levels:?}"
        );
    }

    #[test]
    fn a_step_down_from_the_start_level_sets_no_ceiling_but_one_from_a_climb_does() {
        let mut a = AdaptiveLevel::new(3, AUTO_MIN, AUTO_MAX);
        assert_eq!(a.update(0.2, 0.2, 0.1), 2, "the start's burst: down a step");
        assert_eq!(
            a.update(0.9, 0.0, 0.1),
            3,
            "and back at once: 3 was a guess"
        );
        assert_eq!(
            a.update(0.2, 0.2, 0.1),
            2,
            "3 proved too slow after a climb"
        );
        let held: Vec<i32> = (0..5).map(|_| a.update(0.9, 0.0, 0.1)).collect();
        assert_eq!(held, vec![2; 5], "now it is a ceiling");
        // Brought down by the stream, the start level is left too.
        let mut a = AdaptiveLevel::new(3, AUTO_MIN, AUTO_MAX);
        a.follow(2);
        assert_eq!(a.update(0.2, 0.2, 0.1), 1);
        assert_eq!(a.update(0.9, 0.0, 0.1), 1, "2 is held off");
    }

    /// A period's waits, with compression well under the climbing cap.
    fn period(link: f64, cpu: f64, window: f64, stream_busy: f64) -> Period {
        Period {
            link,
            cpu,
            window,
            busy: 0.1,
            stream_busy,
        }
    }

    #[test]
    fn the_stream_is_taken_when_the_link_is_full_and_only_where_the_link_has_it() {
        let full = period(0.3, 0.0, 0.4, 0.2);
        let mut old = StreamChoice::new(false, true);
        assert!(!old.streaming(), "a version-4 link never streams");
        assert_eq!(old.period(full, None, None).stream, StreamStep::Kept);
        let mut s = StreamChoice::new(true, false);
        let quiet = period(0.2, 0.0, 0.2, 0.1);
        assert_eq!(s.period(quiet, None, None).stream, StreamStep::Kept);
        assert_eq!(
            s.period(full, None, None).stream,
            StreamStep::Taken,
            "the link and the full window waited on for most of the period"
        );
        assert!(s.streaming());
        assert!(
            StreamChoice::new(true, true).streaming(),
            "a new session carries on as the last one ended"
        );
    }

    #[test]
    fn a_saturated_stream_counts_the_full_window_as_compressions_wait() {
        // Jobs wait their turn for the stream with the window full, the link mostly idle:
        // before, that read as a full link and the stream stayed on at its level.
        let turn_waits = period(0.1, 0.0, 0.8, 0.97);
        let mut a = AdaptiveLevel::new(3, AUTO_MIN, AUTO_MAX);
        let mut s = StreamChoice::new(true, true);
        let first = s.period(turn_waits, Some(&mut a), Some(3));
        assert_eq!(
            (first.level, first.cpu_wait),
            (Some(3), 0.0),
            "one period is not enough (a hold counts when it ends): {first:?}"
        );
        let d = s.period(turn_waits, Some(&mut a), Some(3));
        assert_eq!(d.level, Some(2), "stepped down: {d:?}");
        assert_eq!(
            d.stream,
            StreamStep::Kept,
            "the stream at level 2 still beats batches"
        );
        assert!(
            (d.cpu_wait - 0.8).abs() < 1e-9,
            "the window's wait is compression's: {d:?}"
        );
        // The same waits with the stream idle most of the period: the link is the limit,
        // and the stream has room for a higher level.
        let mut s = StreamChoice::new(true, true);
        let mut a = AdaptiveLevel::new(3, AUTO_MIN, AUTO_MAX);
        let roomy = period(0.3, 0.0, 0.6, 0.4);
        assert_eq!(s.period(roomy, Some(&mut a), Some(3)).level, Some(4));
        let d = s.period(roomy, Some(&mut a), Some(4));
        assert_eq!((d.level, d.stream), (Some(5), StreamStep::Kept), "{d:?}");
    }

    #[test]
    fn the_stream_is_left_only_at_the_lowest_level_and_not_taken_again_at_once() {
        let turn_waits = period(0.1, 0.0, 0.8, 0.97);
        let mut a = AdaptiveLevel::new(AUTO_MIN + 1, AUTO_MIN, AUTO_MAX);
        let mut s = StreamChoice::new(true, true);
        s.period(turn_waits, Some(&mut a), Some(AUTO_MIN + 1));
        let d = s.period(turn_waits, Some(&mut a), Some(AUTO_MIN + 1));
        assert_eq!((d.stream, d.level), (StreamStep::Kept, Some(AUTO_MIN)));
        let d = s.period(turn_waits, Some(&mut a), Some(AUTO_MIN));
        assert_eq!((d.stream, d.level), (StreamStep::Left, None), "{d:?}");
        assert!(!s.streaming());
        // A full link right after: the stream stays off for STREAM_OFF_PERIODS periods.
        let full = period(0.9, 0.0, 0.0, 0.0);
        let steps: Vec<StreamStep> = (0..STREAM_OFF_PERIODS)
            .map(|_| s.period(full, Some(&mut a), None).stream)
            .collect();
        let off = STREAM_OFF_PERIODS as usize - 1;
        assert_eq!(steps[..off], vec![StreamStep::Kept; off]);
        assert_eq!(steps[off], StreamStep::Taken, "{steps:?}");
        // A configured level cannot step down: a stream that holds the link back goes.
        let mut fixed = StreamChoice::new(true, true);
        let d = fixed.period(period(0.0, 0.5, 0.0, 0.95), None, Some(3));
        assert_eq!((d.stream, d.level), (StreamStep::Left, None));
    }

    #[test]
    fn leaving_the_stream_keeps_the_level_batches_had() {
        // Taken again at level 3 after batches climbed there, the stream still goes on at
        // the lowest level it was left at (it climbs a step per frame), and compression
        // holds the link back: it is left, and batches go on at 3 on every core.
        let mut a = AdaptiveLevel::new(3, AUTO_MIN, AUTO_MAX);
        let mut s = StreamChoice::new(true, true);
        let d = s.period(period(0.1, 0.5, 0.0, 0.5), Some(&mut a), Some(AUTO_MIN));
        assert_eq!((d.stream, d.level), (StreamStep::Left, None), "{d:?}");
        assert_eq!(a.level(), 3);
    }

    #[test]
    fn in_the_stream_the_level_climbs_on_the_full_windows_wait_while_the_stream_has_room() {
        // The link and the window share the period: the link is all the stream waits on.
        let shared = period(0.4, 0.0, 0.55, 0.3);
        let mut a = AdaptiveLevel::new(3, AUTO_MIN, AUTO_MAX);
        let mut s = StreamChoice::new(true, true);
        assert_eq!(s.period(shared, Some(&mut a), Some(3)).level, Some(4));
        let mut batches = StreamChoice::new(false, false);
        let mut a = AdaptiveLevel::new(3, AUTO_MIN, AUTO_MAX);
        assert_eq!(
            batches.period(shared, Some(&mut a), None).level,
            Some(3),
            "out of the stream a full window alone does not climb"
        );
        // The window full with the link hardly waited on: the master target's pace.
        let mut s = StreamChoice::new(true, true);
        let mut a = AdaptiveLevel::new(3, AUTO_MIN, AUTO_MAX);
        let slow_target = period(0.1, 0.0, 0.85, 0.3);
        assert_eq!(s.period(slow_target, Some(&mut a), Some(3)).level, Some(3));
        // Nor is a short wait on a full pool then a reason to step down (a drain's trace:
        // link 0.24, window 0.62, pool 0.11 stepped 4 to 3 and held 4 off for 30 s).
        let pool_and_window = period(0.24, 0.11, 0.62, 0.74);
        assert_eq!(
            s.period(pool_and_window, Some(&mut a), Some(3)).level,
            Some(3)
        );
        // Saturated with the link full too: both at their limit, the level stays.
        let both = period(0.6, 0.0, 0.0, 0.95);
        let mut s = StreamChoice::new(true, true);
        let mut a = AdaptiveLevel::new(4, AUTO_MIN, AUTO_MAX);
        s.period(both, Some(&mut a), Some(4));
        let d = s.period(both, Some(&mut a), Some(4));
        assert_eq!(d.level, Some(4), "{d:?}");
    }

    #[test]
    fn in_the_stream_the_level_climbs_only_while_the_next_one_leaves_room() {
        // The link full, the stream busy over half of each period: it stays where it is.
        let mut a = AdaptiveLevel::new(4, AUTO_MIN, AUTO_MAX);
        let mut s = StreamChoice::new(true, true);
        let busy = period(0.9, 0.0, 0.0, 0.6);
        let levels: Vec<_> = (0..5)
            .map(|_| {
                let stream_level = a.level();
                s.period(busy, Some(&mut a), Some(stream_level)).level
            })
            .collect();
        // The session's first period too: an average with no period before it would read
        // 0.3 and climb.
        assert_eq!(levels, vec![Some(4); 5]);
        // Under half busy it climbs a step a period.
        let mut a = AdaptiveLevel::new(4, AUTO_MIN, AUTO_MAX);
        let mut s = StreamChoice::new(true, true);
        let roomy = period(0.9, 0.0, 0.0, 0.45);
        s.period(roomy, Some(&mut a), Some(4));
        assert_eq!(s.period(roomy, Some(&mut a), Some(5)).level, Some(6));
        // Nor in the first period after the stream is taken (the one before had none).
        let mut a = AdaptiveLevel::new(4, AUTO_MIN, AUTO_MAX);
        let mut s = StreamChoice::new(true, false);
        assert_eq!(s.period(busy, Some(&mut a), None).stream, StreamStep::Taken);
        let d = s.period(period(0.9, 0.0, 0.0, 0.8), Some(&mut a), Some(5));
        assert_eq!(d.level, Some(5), "{d:?}");
        let d = s.period(period(0.9, 0.0, 0.0, 0.8), Some(&mut a), Some(5));
        assert_eq!(d.level, Some(5), "{d:?}");
        // Out of the stream the stream's busy share is not asked.
        let mut off = StreamChoice::new(true, false);
        let mut a = AdaptiveLevel::new(4, AUTO_MIN, AUTO_MAX);
        assert_eq!(off.period(busy, Some(&mut a), None).level, Some(5));
    }

    #[test]
    fn the_level_follows_the_streams_own_so_a_step_down_lowers_it() {
        // The adaptive level climbed to 6 a step a second; the stream, a step per frame,
        // is at 3. Compression holds the link back: the next level is 2, not 5.
        let mut a = AdaptiveLevel::new(6, AUTO_MIN, AUTO_MAX);
        let mut s = StreamChoice::new(true, true);
        let d = s.period(period(0.1, 0.5, 0.0, 0.5), Some(&mut a), Some(3));
        assert_eq!(d.level, Some(2), "{d:?}");
        // Link-bound, it asks one step above the stream, not above its own last ask.
        let mut a = AdaptiveLevel::new(6, AUTO_MIN, AUTO_MAX);
        let d = s.period(period(0.9, 0.0, 0.0, 0.3), Some(&mut a), Some(3));
        assert_eq!(d.level, Some(4), "{d:?}");
        // Out of the stream the level is its own.
        let mut off = StreamChoice::new(true, false);
        let mut a = AdaptiveLevel::new(6, AUTO_MIN, AUTO_MAX);
        let d = off.period(period(0.1, 0.5, 0.0, 0.0), Some(&mut a), Some(3));
        assert_eq!(d.level, Some(5), "{d:?}");
    }
}
