//! The admin HTTP endpoint (`/metrics`, `/health`, `/status`, and state changes), served by
//! hyper, and a small client for the services' own commands.
//!
//! # Design constraints
//! - A slow or idle client never blocks another: each connection is its own task, the
//!   request head must arrive within [`HEADER_TIMEOUT_MS`], a body within
//!   [`BODY_TIMEOUT_MS`], and a connection lives at most [`CONNECTION_TIMEOUT_MS`].
//!   Connections past [`MAX_ADMIN_CONNECTIONS`] are closed at once, not queued.
//! - State changes are POSTs only, and a POST must carry the [`ADMIN_HEADER`] header and a
//!   `Host` that is an IP address or `localhost`: a web page cannot send the first across
//!   sites (the browser would need a CORS preflight we never answer), and a DNS-rebinding
//!   page cannot forge the second.
//! - Bodies are bounded by [`MAX_BODY_BYTES`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// A request head must arrive within this time (slowloris clients are cut off).
pub const HEADER_TIMEOUT_MS: u64 = 2_000;
/// A request body must arrive within this time.
pub const BODY_TIMEOUT_MS: u64 = 2_000;
/// No admin connection lives longer than this (one request per connection; answers are
/// computed from memory in microseconds), idle or not.
pub const CONNECTION_TIMEOUT_MS: u64 = 5_000;
/// Admin connections served at once; more are closed at once. Each costs a task and a few
/// KiB (about 64 MiB for all), and lives at most [`HEADER_TIMEOUT_MS`] unless it sends a
/// whole request: holding them all needs thousands of descriptors renewed every 2 s.
pub const MAX_ADMIN_CONNECTIONS: usize = 4096;
/// Largest request body (state changes carry a few bytes).
pub const MAX_BODY_BYTES: usize = 64 << 10;
/// The header every state-changing request must carry.
pub const ADMIN_HEADER: &str = "x-failback-admin";

/// An admin request's method: reads are GETs, state changes are POSTs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// A read.
    Get,
    /// A state change.
    Post,
}

/// One admin request.
#[derive(Debug, Clone)]
pub struct AdminRequest {
    /// GET or POST.
    pub method: Method,
    /// The path, without the query.
    pub path: String,
    /// The body (POST).
    pub body: Bytes,
}

/// An admin response.
#[derive(Debug, Clone)]
pub struct AdminResponse {
    /// HTTP status.
    pub status: u16,
    /// `text/plain`, OpenMetrics text or `application/json`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

impl AdminResponse {
    /// A plain-text response.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        AdminResponse {
            status,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: body.into(),
        }
    }

    /// A metrics scrape ([`crate::metrics::Exposition::render`]'s OpenMetrics text).
    pub fn metrics(body: String) -> Self {
        AdminResponse {
            status: 200,
            content_type: crate::metrics::CONTENT_TYPE,
            body,
        }
    }
    /// A JSON response.
    pub fn json(status: u16, body: impl Into<String>) -> Self {
        AdminResponse {
            status,
            content_type: "application/json",
            body: body.into(),
        }
    }
}

fn host_is_local(host: &str) -> bool {
    let h = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, p)| {
            if p.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    h.eq_ignore_ascii_case("localhost") || h.parse::<std::net::IpAddr>().is_ok()
}

async fn answer<H, F>(req: Request<Incoming>, handler: Arc<H>) -> AdminResponse
where
    H: Fn(AdminRequest) -> F + Send + Sync + 'static,
    F: Future<Output = AdminResponse> + Send,
{
    let method = match *req.method() {
        hyper::Method::GET => Method::Get,
        hyper::Method::POST => Method::Post,
        _ => return AdminResponse::text(405, "use GET to read and POST to change state\n"),
    };
    if method == Method::Post {
        let host = req
            .headers()
            .get(hyper::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if !host_is_local(host) || !req.headers().contains_key(ADMIN_HEADER) {
            return AdminResponse::text(
                403,
                format!("state changes need the {ADMIN_HEADER} header and a Host that is an IP address or localhost (use the service's own command)\n"),
            );
        }
    }
    let path = req.uri().path().to_owned();
    let body = match tokio::time::timeout(
        Duration::from_millis(BODY_TIMEOUT_MS),
        Limited::new(req.into_body(), MAX_BODY_BYTES).collect(),
    )
    .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => {
            return AdminResponse::text(413, format!("bodies are at most {MAX_BODY_BYTES} bytes\n"))
        }
        Err(_) => return AdminResponse::text(408, "the body did not arrive in time\n"),
    };
    handler(AdminRequest { method, path, body }).await
}

/// Serves the admin endpoint on `addr` until the process exits. Returns the bound address.
pub async fn serve_admin<H, F>(addr: SocketAddr, handler: H) -> std::io::Result<SocketAddr>
where
    H: Fn(AdminRequest) -> F + Send + Sync + 'static,
    F: Future<Output = AdminResponse> + Send,
{
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let handler = Arc::new(handler);
    let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                // Out of file descriptors, most likely: give the system a moment.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                continue; // dropped: closed at once, never queued
            };
            let handler = Arc::clone(&handler);
            tokio::spawn(async move {
                let _permit = permit;
                let svc = service_fn(move |req| {
                    let handler = Arc::clone(&handler);
                    async move {
                        let r = answer(req, handler).await;
                        let mut resp = Response::new(Full::new(Bytes::from(r.body)));
                        *resp.status_mut() =
                            StatusCode::from_u16(r.status).unwrap_or(StatusCode::OK);
                        resp.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static(r.content_type),
                        );
                        Ok::<_, Infallible>(resp)
                    }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_millis(HEADER_TIMEOUT_MS))
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(sock), svc);
                let _ =
                    tokio::time::timeout(Duration::from_millis(CONNECTION_TIMEOUT_MS), conn).await;
            });
        }
    });
    Ok(bound)
}

/// Sends one request to an admin endpoint (for the services' commands and tests) and
/// returns the status and body. POSTs carry the admin header.
pub async fn admin_request(
    addr: &str,
    method: Method,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut sock =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let head = match method {
        Method::Get => format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"),
        Method::Post => format!(
            "POST {path} HTTP/1.1\r\nhost: {addr}\r\n{ADMIN_HEADER}: 1\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ),
    };
    sock.write_all(head.as_bytes()).await?;
    let mut resp = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        (&mut sock).take(64 << 20).read_to_end(&mut resp),
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

/// A GET of `path` (see [`admin_request`]).
pub async fn admin_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    admin_request(addr, Method::Get, path, "").await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_hosts() {
        for h in [
            "127.0.0.1:9444",
            "localhost",
            "[::1]:9444",
            "10.0.0.5",
            "LOCALHOST:1",
        ] {
            assert!(host_is_local(h), "{h}");
        }
        for h in ["evil.example:9444", "", "127.0.0.1.evil.example"] {
            assert!(!host_is_local(h), "{h}");
        }
    }
}
