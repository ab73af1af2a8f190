//! Sizes and rates as operators write them, and range checks that name the setting.

use crate::error::{Error, Result};

/// Parses a byte size such as `16GiB`, `512 MiB`, `10G`, `4096` (binary units for both
/// `G` and `GiB`; `GB` is decimal).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as 16GiB or 512MiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        u => {
            return Err(format!(
                "unknown size unit {u:?} in {s:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ))
        }
    };
    let v = n * mult as f64;
    if !v.is_finite() || v >= u64::MAX as f64 {
        return Err(format!("{s:?} is too large"));
    }
    Ok(v as u64)
}

/// Parses a link rate such as `200Mbit`, `1gbit`, `50MB/s` into bytes per second.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a rate such as 200Mbit or 50MB/s"))?;
    let bps: f64 = match unit.trim() {
        "kbit" => 1e3 / 8.0,
        "mbit" => 1e6 / 8.0,
        "gbit" => 1e9 / 8.0,
        "b/s" | "bps" => 1.0,
        "kb/s" => 1e3,
        "mb/s" => 1e6,
        "gb/s" => 1e9,
        u => {
            return Err(format!(
                "unknown rate unit {u:?} in {s:?} (use kbit, mbit, gbit, KB/s, MB/s, GB/s)"
            ))
        }
    };
    let v = n * bps;
    if !v.is_finite() || v >= u64::MAX as f64 {
        return Err(format!("{s:?} is too large"));
    }
    Ok(v as u64)
}

/// Human bytes: `1.5 GiB`, `512 KiB`, `17 B`.
pub fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Human rate: `12.3 MB/s` (decimal, as links are sold).
pub fn fmt_rate(bps: f64) -> String {
    match bps {
        r if r >= 1e9 => format!("{:.2} GB/s", r / 1e9),
        r if r >= 1e6 => format!("{:.1} MB/s", r / 1e6),
        r if r >= 1e3 => format!("{:.1} kB/s", r / 1e3),
        r => format!("{r:.0} B/s"),
    }
}

/// Human duration from seconds: `850 ms`, `42 s`, `3m20s`, `2h05m`.
pub fn fmt_secs(s: f64) -> String {
    match s {
        s if s < 1.0 => format!("{:.0} ms", s * 1e3),
        s if s < 120.0 => format!("{s:.0} s"),
        s if s < 7200.0 => format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64),
        s => format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        ),
    }
}

/// Checks that `value` of setting `param` lies in `min..=max`, with an error that names the
/// setting and the range.
pub fn check_range<T: PartialOrd + std::fmt::Display>(
    param: &'static str,
    value: T,
    min: T,
    max: T,
    shown: impl std::fmt::Display,
) -> Result<T> {
    if value < min || value > max {
        return Err(Error::InvalidParameter {
            param,
            reason: format!("{shown} is outside the range {min} to {max}"),
        });
    }
    Ok(value)
}

/// Parses a size for `param` and checks it lies in `min..=max` bytes.
pub fn bytes_in(param: &'static str, s: &str, min: u64, max: u64) -> Result<u64> {
    let v = parse_bytes(s).map_err(|reason| Error::InvalidParameter { param, reason })?;
    if v < min || v > max {
        let reason = if max == u64::MAX {
            format!("{s} is below the smallest value, {}", fmt_bytes(min))
        } else {
            format!(
                "{s} is outside the range {} to {}",
                fmt_bytes(min),
                fmt_bytes(max)
            )
        };
        return Err(Error::InvalidParameter { param, reason });
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_rates() {
        assert_eq!(parse_bytes("16GiB").unwrap(), 16 << 30);
        assert_eq!(parse_bytes("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("10GB").unwrap(), 10_000_000_000);
        assert!(parse_bytes("10 parsecs").is_err());
        assert!(parse_bytes("99999999999TiB").is_err());
        assert_eq!(parse_rate("200Mbit").unwrap(), 25_000_000);
        assert_eq!(parse_rate("1gbit").unwrap(), 125_000_000);
        assert!(parse_rate("fast").is_err());
    }

    #[test]
    fn ranges_name_the_setting() {
        let e = bytes_in("cache-limit", "1KiB", 64 << 20, u64::MAX).unwrap_err();
        let t = e.to_string();
        assert!(
            t.contains("cache-limit") && t.contains("smallest value, 64.0 MiB"),
            "{t}"
        );
        assert!(check_range("window", 5u64, 1, 10, 5).is_ok());
        assert_eq!(fmt_bytes(1536), "1.5 KiB");
        assert_eq!(fmt_secs(200.0), "3m20s");
    }
}
