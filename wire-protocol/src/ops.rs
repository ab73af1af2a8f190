//! Operational helpers every service shares: size and rate parsing, logging set-up, and the
//! admin HTTP endpoint (`/metrics`, `/health`).
//!
//! The admin endpoint answers GET requests only, one request per connection, with request
//! heads bounded by [`MAX_REQUEST_HEAD_BYTES`]; it is meant for a loopback or management
//! address, scraped by Prometheus.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A request head larger than this is refused: Prometheus sends a few hundred bytes.
pub const MAX_REQUEST_HEAD_BYTES: usize = 8192;
/// At most this many admin connections are served at once.
pub const MAX_ADMIN_CONNECTIONS: usize = 16;

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
    Ok((n * mult as f64) as u64)
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
    Ok((n * bps) as u64)
}

/// Sets up `tracing`: human-readable text by default, JSON lines when `json`. `RUST_LOG`
/// overrides the level (default `info`).
pub fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        b.json().try_init()
    } else {
        b.try_init()
    };
}

/// Serves GET requests on `addr` until the process exits: `handler(path)` returns the HTTP
/// status and the plain-text body (services answer `/metrics`, `/health`, and more).
pub async fn serve_admin<H, F>(addr: SocketAddr, handler: H) -> std::io::Result<SocketAddr>
where
    H: Fn(String) -> F + Send + Sync + 'static,
    F: Future<Output = (u16, String)> + Send,
{
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let handler = Arc::new(handler);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let handler = Arc::clone(&handler);
            tokio::spawn(async move {
                let _permit = permit;
                let mut head = Vec::with_capacity(512);
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n")
                    && head.len() < MAX_REQUEST_HEAD_BYTES
                {
                    match tokio::time::timeout(
                        std::time::Duration::from_secs(5),
                        sock.read(&mut buf),
                    )
                    .await
                    {
                        Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let line = String::from_utf8_lossy(&head);
                let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                let (status, body) = handler(path).await;
                let reason = match status {
                    200 => "OK",
                    404 => "Not Found",
                    503 => "Service Unavailable",
                    _ => "Error",
                };
                let resp = format!("HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(bound)
}

/// Fetches `path` from an admin endpoint (for status commands and tests).
pub async fn admin_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut sock = tokio::net::TcpStream::connect(addr).await?;
    sock.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut resp = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        sock.read_to_end(&mut resp),
    )
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let text = String::from_utf8_lossy(&resp);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

/// Runs a command's future on a fresh tokio runtime and turns its outcome into an exit code,
/// printing `NAME: error: ...` on failure (the tail every service's command line shares).
pub fn block_on_cli<F, E>(name: &str, fut: F) -> i32
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: error: start runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{name}: error: {e}");
            1
        }
    }
}

/// One Prometheus metric family drawn from rows of `T`.
pub struct Series<T> {
    /// Metric name.
    pub name: &'static str,
    /// `counter` or `gauge`.
    pub kind: &'static str,
    /// Help text.
    pub help: &'static str,
    /// The value of a row.
    pub value: fn(&T) -> f64,
}

/// Appends each series in the Prometheus text format, one sample per row with its labels
/// (already formatted, e.g. `disk="1"`).
pub fn render_series<T>(out: &mut String, series: &[Series<T>], rows: &[(String, T)]) {
    use std::fmt::Write;
    for s in series {
        let _ = writeln!(
            out,
            "# HELP {} {}\n# TYPE {} {}",
            s.name, s.help, s.name, s.kind
        );
        for (labels, row) in rows {
            let _ = writeln!(out, "{}{{{labels}}} {}", s.name, (s.value)(row));
        }
    }
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
        assert_eq!(parse_rate("200Mbit").unwrap(), 25_000_000);
        assert_eq!(parse_rate("1gbit").unwrap(), 125_000_000);
        assert!(parse_rate("fast").is_err());
    }
}
