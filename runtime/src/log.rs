//! Logging set-up, and rate limits for warnings that can repeat.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Sets up `tracing`: human-readable text by default, JSON lines when `json`. `RUST_LOG`
/// overrides the level (default `info`). Colour only when stderr is a terminal and
/// `NO_COLOR` is unset: under systemd every line would otherwise carry escape codes.
pub fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    // fuser's mount module logs an ERROR when the kernel has already unmounted a disk the
    // agent serves (every clean stop); its real failures come back to the agent as errors.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,fuser::mnt=off"));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let _ = if json {
        b.json().try_init()
    } else {
        b.try_init()
    };
}

/// Reads the `log-format` setting: `text` (default) or `json`. True for JSON.
pub fn parse_log_format(v: Option<&str>) -> crate::Result<bool> {
    match v.unwrap_or("text") {
        "text" => Ok(false),
        "json" => Ok(true),
        f => Err(crate::Error::InvalidParameter {
            param: "log-format",
            reason: format!("{f:?}: use text or json"),
        }),
    }
}

/// Lets one message per key through per interval and counts the rest, so a fault that
/// repeats a thousand times a second logs once a second with how many were suppressed.
#[derive(Debug)]
pub struct Throttle {
    interval: Duration,
    seen: Mutex<HashMap<String, (Instant, u64)>>,
}

/// Keys a throttle remembers at most (bounds its memory when keys come from peers).
pub const MAX_THROTTLE_KEYS: usize = 4096;

impl Throttle {
    /// A throttle letting one message per key through every `interval`.
    pub fn new(interval: Duration) -> Throttle {
        Throttle {
            interval,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(suppressed)` if a message for `key` may be logged now (with the number of
    /// messages suppressed since the last one), `None` if it is to be suppressed.
    pub fn admit(&self, key: &str) -> Option<u64> {
        let now = Instant::now();
        let mut seen = self.seen.lock().expect("poisoned");
        if seen.len() >= MAX_THROTTLE_KEYS && !seen.contains_key(key) {
            seen.retain(|_, (t, _)| now.duration_since(*t) < self.interval);
            // Full of keys seen within the interval: a flood of distinct messages. This one
            // is suppressed, not remembered (the bound holds), and not counted.
            if seen.len() >= MAX_THROTTLE_KEYS {
                return None;
            }
        }
        match seen.get_mut(key) {
            Some((last, suppressed)) if now.duration_since(*last) < self.interval => {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                *last = now;
                Some(std::mem::take(suppressed))
            }
            None => {
                seen.insert(key.to_owned(), (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_distinct_keys_stays_bounded() {
        let t = Throttle::new(Duration::from_secs(60));
        let admitted = (0..MAX_THROTTLE_KEYS + 100)
            .filter(|i| t.admit(&format!("k{i}")).is_some())
            .count();
        assert_eq!(admitted, MAX_THROTTLE_KEYS, "the rest suppressed");
        assert_eq!(t.seen.lock().unwrap().len(), MAX_THROTTLE_KEYS);
        assert_eq!(t.admit("k1"), None, "a remembered key is still throttled");
    }

    #[test]
    fn throttle_counts_what_it_suppresses() {
        let t = Throttle::new(Duration::from_millis(50));
        assert_eq!(t.admit("a"), Some(0));
        assert_eq!(t.admit("a"), None);
        assert_eq!(t.admit("a"), None);
        assert_eq!(t.admit("b"), Some(0));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(t.admit("a"), Some(2));
    }
}
