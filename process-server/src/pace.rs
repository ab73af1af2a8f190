//! Pacing the link to a byte rate: a token bucket (no I/O; the caller passes the time).
//!
//! # Design constraints
//! - The link sees a steady flow, not bursts: a frame (up to 16 MiB) leaves in slices of at
//!   most [`PACE_SLICE_MS`] of the rate (and [`PACE_SLICE_MAX_BYTES`]), and the bucket
//!   holds at most two slices, so no burst lasts longer than two slices' time. The second
//!   slice is slack for the timer: a wait overshoots by a millisecond or so, and time a
//!   full bucket cannot keep is rate lost (with one slice, 10 Mbit/s held 0.90 of itself
//!   through a real link: `cargo bench --bench wan`).
//! - A new rate takes effect within [`PACE_RECHECK_MS`]: waits are cut into steps that long.
//! - Time is a number of microseconds the caller owns (tokio's clock in the uplink, a
//!   simulated one in tests), so the rate a limit holds is checked without sleeping.

/// The link is paced in slices of at most this many bytes, so a frame (up to 16 MiB) never
/// leaves as one burst and a new rate applies from the next slice.
pub const PACE_SLICE_MAX_BYTES: usize = 64 << 10;
/// ... and of at most this much time at the current rate.
pub const PACE_SLICE_MS: u64 = 10;
/// Slices are at least this large (one Ethernet payload), however low the rate.
pub const PACE_SLICE_MIN_BYTES: usize = 1500;
/// A wait for tokens is cut into steps this long, re-reading the rate after each: a changed
/// limit (or none) takes effect within this time.
pub const PACE_RECHECK_MS: u64 = 50;
const _: () = assert!(PACE_SLICE_MIN_BYTES <= PACE_SLICE_MAX_BYTES && PACE_RECHECK_MS < 100);

/// Bytes of one slice at `rate_bps` (0: no limit, the rest at once).
pub fn slice_len(rate_bps: u64, remaining: usize) -> usize {
    if rate_bps == 0 {
        return remaining;
    }
    let by_time = (rate_bps.saturating_mul(PACE_SLICE_MS) / 1000) as usize;
    by_time
        .clamp(PACE_SLICE_MIN_BYTES, PACE_SLICE_MAX_BYTES)
        .min(remaining)
}

/// A token bucket holding at most one slice.
#[derive(Debug, Default)]
pub struct TokenBucket {
    tokens: f64,
    last_us: u64,
}

impl TokenBucket {
    /// Asks to send `bytes` at `now_us` under `rate_bps` (0: no limit). Returns 0 when
    /// they may leave now (the tokens are taken), or how many microseconds to wait before
    /// asking again (capped at [`PACE_RECHECK_MS`], so a new rate is read in time).
    pub fn take(&mut self, now_us: u64, rate_bps: u64, bytes: usize) -> u64 {
        let elapsed_s = now_us.saturating_sub(self.last_us) as f64 / 1e6;
        self.last_us = self.last_us.max(now_us);
        if rate_bps == 0 {
            self.tokens = 0.0;
            return 0;
        }
        let rate = rate_bps as f64;
        let slice = rate * PACE_SLICE_MS as f64 / 1000.0;
        let burst = (bytes as f64).max(slice) + slice.max(PACE_SLICE_MIN_BYTES as f64);
        self.tokens = (self.tokens + elapsed_s * rate).min(burst);
        if self.tokens >= bytes as f64 {
            self.tokens -= bytes as f64;
            return 0;
        }
        let need_us = ((bytes as f64 - self.tokens) / rate * 1e6).ceil() as u64;
        need_us.clamp(1, PACE_RECHECK_MS * 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_are_small_and_bounded() {
        assert_eq!(slice_len(0, 16 << 20), 16 << 20);
        assert_eq!(slice_len(1_000, 1 << 20), PACE_SLICE_MIN_BYTES);
        assert_eq!(slice_len(125_000_000, 1 << 20), PACE_SLICE_MAX_BYTES);
        assert_eq!(slice_len(1_000_000, 1 << 20), 10_000);
        assert_eq!(slice_len(1_000_000, 10), 10);
    }

    /// Sends `total` bytes in frames of `frame` at `rate_bps` on a simulated clock where
    /// every wait oversleeps by `late_us` (a real timer does); returns (seconds taken, the
    /// most bytes that left within any 100 ms).
    fn run(rate_bps: u64, total: usize, frame: usize, late_us: u64) -> (f64, usize) {
        let mut b = TokenBucket::default();
        let (mut now_us, mut sent) = (0u64, Vec::new());
        let mut left = total;
        while left > 0 {
            let mut f = frame.min(left);
            left -= f;
            while f > 0 {
                let n = slice_len(rate_bps, f);
                loop {
                    match b.take(now_us, rate_bps, n) {
                        0 => break,
                        w => now_us += w + late_us,
                    }
                }
                sent.push((now_us, n));
                f -= n;
            }
        }
        let mut worst = 0;
        let mut from = 0;
        let mut in_window = 0;
        for &(t, n) in &sent {
            in_window += n;
            while sent[from].0 + 100_000 <= t {
                in_window -= sent[from].1;
                from += 1;
            }
            worst = worst.max(in_window);
        }
        (now_us as f64 / 1e6, worst)
    }

    #[test]
    fn a_limit_holds_within_five_percent_with_no_long_burst() {
        // 512 kbit/s and 10 Mbit/s, 10 s worth of 1 MiB frames (the aims), with a
        // timer exact, and late by 1 or 2 ms.
        for (rate_bps, late_us) in [64_000u64, 1_250_000]
            .into_iter()
            .flat_map(|r| [(r, 0), (r, 1_000), (r, 2_000)])
        {
            let total = (rate_bps * 10) as usize;
            let (secs, worst_100ms) = run(rate_bps, total, 1 << 20, late_us);
            let measured = total as f64 / secs;
            assert!(
                (measured / rate_bps as f64 - 1.0).abs() <= 0.05,
                "{rate_bps} B/s, timer {late_us} us late: measured {measured:.0} B/s"
            );
            // 100 ms of the rate, plus two slices of bucket.
            let allowed = rate_bps as usize / 10 + 2 * slice_len(rate_bps, usize::MAX);
            assert!(
                worst_100ms <= allowed,
                "{rate_bps} B/s: {worst_100ms} bytes within 100 ms (allowed {allowed})"
            );
        }
    }

    #[test]
    fn a_lifted_limit_takes_effect_within_a_recheck() {
        let mut b = TokenBucket::default();
        // 64 KiB at 1 kB/s would be a minute; each wait is at most one recheck.
        let wait = b.take(0, 1_000, 64 << 10);
        assert_eq!(wait, PACE_RECHECK_MS * 1000);
        assert_eq!(b.take(wait, 0, 64 << 10), 0, "no limit: at once");
    }

    #[test]
    fn no_limit_never_waits_and_a_clock_going_back_is_harmless() {
        let mut b = TokenBucket::default();
        assert_eq!(b.take(5, 0, 1 << 30), 0);
        // A full bucket (two 10 ms slices at 1 MB/s), emptied.
        assert_eq!(b.take(1_000_000, 1_000_000, 1), 0);
        assert_eq!(b.take(1_000_000, 1_000_000, 19_999), 0);
        assert!(b.take(10, 1_000_000, 10_000) > 0, "no tokens from the past");
    }
}
