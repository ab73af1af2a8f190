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
//!   then it is tried again (the load, the content or the link may have changed).

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
        }
    }

    /// The current level.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Takes one period's waits and compression's busy share of the cores (fractions) and
    /// returns the next level.
    pub fn update(&mut self, link_wait: f64, cpu_wait: f64, busy: f64) -> i32 {
        self.ceiling = match self.ceiling {
            Some((_, 0)) | None => None,
            Some((c, n)) => Some((c, n - 1)),
        };
        if (cpu_wait > CPU_BOUND && link_wait < LINK_BOUND) || busy > BUSY_MAX {
            if self.level > self.min {
                self.ceiling = Some((self.level, CEILING_HOLD_PERIODS));
            }
            self.level = (self.level - 1).max(self.min);
        } else if link_wait > LINK_BOUND && busy < BUSY_CLIMB_MAX {
            let next = (self.level + 1).min(self.max);
            if self.ceiling.is_none_or(|(c, _)| next < c) {
                self.level = next;
            }
        }
        self.level
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
}
