//! Choosing the zstd level from where the shipper waits (no I/O, no clock).
//!
//! Each period the shipper reports the fraction of time it waited on the link (bandwidth
//! limiter, socket) and the fraction it waited on compression while the link had room. A
//! full window is neither: it waits on the master target, where fewer wire bytes gain
//! nothing. Link-bound with idle cores: a higher level turns spare CPU into fewer wire bytes.
//! CPU-bound: step down. One step per period, within `min..=max`.

/// Waiting on the link more than this fraction of a period makes it the bottleneck.
pub const LINK_BOUND: f64 = 0.5;
/// Waiting on compression more than this fraction makes the CPU the bottleneck.
pub const CPU_BOUND: f64 = 0.25;
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
}

impl AdaptiveLevel {
    /// Starts at `start`, kept within `min..=max`.
    pub fn new(start: i32, min: i32, max: i32) -> Self {
        assert!(min <= max, "a level range");
        AdaptiveLevel {
            level: start.clamp(min, max),
            min,
            max,
        }
    }

    /// The current level.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Takes one period's waits (fractions of the period) and returns the next level.
    pub fn update(&mut self, link_wait: f64, cpu_wait: f64) -> i32 {
        if cpu_wait > CPU_BOUND {
            self.level = (self.level - 1).max(self.min);
        } else if link_wait > LINK_BOUND && cpu_wait < CPU_BOUND / 2.0 {
            self.level = (self.level + 1).min(self.max);
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
            a.update(0.9, 0.0);
        }
        assert_eq!(a.level(), AUTO_MAX, "capped");
        a.update(0.9, 0.5);
        assert_eq!(a.level(), AUTO_MAX - 1, "CPU-bound wins over link-bound");
        for _ in 0..20 {
            a.update(0.0, 0.6);
        }
        assert_eq!(a.level(), AUTO_MIN);
        assert_eq!(a.update(0.1, 0.05), AUTO_MIN, "neither bound: stay");
    }
}
