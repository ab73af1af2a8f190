//! The running agent's control socket: `agent bookmark` reaches the agent through
//! `STATE_DIR/agent.sock` and waits for the answer.
//!
//! # Protocol
//! One request per connection, each a line of JSON:
//! ```text
//! -> {"tag": "final", "timeout_ms": 60000}
//! <- {"ok": true, "lsn": 20017, "tag": "final", "disk_digest": "ab12...", "error": ""}
//! ```
//! The answer comes once the bookmark is durable on the master target (ok), or when it
//! could not be taken or did not get there within `timeout_ms` (not ok, with the reason).
//!
//! # Design constraints
//! - The socket lives in the state directory, which the agent holds locked: a stale socket
//!   left by a crash is replaced at start, never one of a running agent. Its mode is 0600:
//!   only the agent's user may ask.
//! - Bounded: requests of at most [`MAX_REQUEST_BYTES`], at most [`MAX_PENDING`] waiting, each
//!   read under [`READ_TIMEOUT_MS`].

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, IoContext, Result};

/// The socket's name in the state directory.
pub const SOCKET: &str = "agent.sock";
/// Largest request line.
pub const MAX_REQUEST_BYTES: u64 = 4096;
/// Requests waiting for the engine at once; more are refused at once.
pub const MAX_PENDING: usize = 16;
/// A client must send its request within this time.
pub const READ_TIMEOUT_MS: u64 = 5_000;
/// Longest a bookmark may wait to be durable on the master target.
pub const MAX_WAIT_MS: u64 = 3_600_000;

/// Ask for an app-consistent bookmark.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BookmarkRequest {
    /// Its tag.
    pub tag: String,
    /// How long to wait for it to be durable on the master target.
    pub timeout_ms: u64,
}

/// The answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BookmarkReply {
    /// Taken and durable on the master target.
    pub ok: bool,
    /// Its LSN (the recovery point's LSN on the master target).
    pub lsn: u64,
    /// Its tag.
    pub tag: String,
    /// The source disk's digest at the bookmark.
    pub disk_digest: String,
    /// Why not, when not ok.
    pub error: String,
}

impl BookmarkReply {
    /// A refusal.
    pub fn failed(tag: &str, error: impl Into<String>) -> BookmarkReply {
        BookmarkReply {
            tag: tag.to_owned(),
            error: error.into(),
            ..BookmarkReply::default()
        }
    }
}

/// A request on its way to the engine.
#[derive(Debug)]
pub struct Request {
    /// What was asked.
    pub req: BookmarkRequest,
    /// Where the answer goes.
    pub reply: oneshot::Sender<BookmarkReply>,
}

/// The socket of a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

/// Listens on the state directory's socket (the caller holds the directory's lock) and
/// hands each request to the returned queue.
pub fn listen(state_dir: &Path) -> Result<mpsc::Receiver<Request>> {
    let path = socket_path(state_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(Error::Io {
                context: format!("remove the stale {}", path.display()),
                source: e,
            })
        }
    }
    let listener = UnixListener::bind(&path).ctx(|| format!("listen on {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .ctx(|| format!("chmod {}", path.display()))?;
    let (tx, rx) = mpsc::channel(MAX_PENDING);
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = serve(sock, tx).await;
            });
        }
    });
    Ok(rx)
}

async fn serve(sock: UnixStream, tx: mpsc::Sender<Request>) -> std::io::Result<()> {
    let (rd, mut wr) = sock.into_split();
    let mut line = String::new();
    let read = tokio::time::timeout(
        Duration::from_millis(READ_TIMEOUT_MS),
        BufReader::new(rd)
            .take(MAX_REQUEST_BYTES)
            .read_line(&mut line),
    )
    .await;
    let reply = match (read, serde_json::from_str::<BookmarkRequest>(&line)) {
        (Ok(Ok(_)), Ok(mut req)) => {
            req.timeout_ms = req.timeout_ms.min(MAX_WAIT_MS);
            let (reply, answer) = oneshot::channel();
            let tag = req.tag.clone();
            match tx.try_send(Request { req, reply }) {
                Ok(()) => answer
                    .await
                    .unwrap_or_else(|_| BookmarkReply::failed(&tag, "the agent stopped")),
                Err(_) => {
                    BookmarkReply::failed(&tag, "the agent is busy with other requests; retry")
                }
            }
        }
        _ => BookmarkReply::failed(
            "",
            "a request is one line of JSON: {\"tag\": ..., \"timeout_ms\": ...}",
        ),
    };
    let mut out = serde_json::to_string(&reply).expect("serializable");
    out.push('\n');
    wr.write_all(out.as_bytes()).await
}

/// Asks the agent running with `state_dir` for a bookmark and waits for the answer.
pub async fn request(state_dir: &Path, tag: &str, timeout: Duration) -> Result<BookmarkReply> {
    let path = socket_path(state_dir);
    let sock = UnixStream::connect(&path).await.map_err(|e| {
        Error::Refused(format!(
            "no agent is running with the state directory {} ({}: {e}): start the agent (or name its --state-dir) first",
            state_dir.display(),
            path.display()
        ))
    })?;
    let (rd, mut wr) = sock.into_split();
    let mut req = serde_json::to_string(&BookmarkRequest {
        tag: tag.to_owned(),
        timeout_ms: timeout.as_millis() as u64,
    })
    .expect("serializable");
    req.push('\n');
    wr.write_all(req.as_bytes())
        .await
        .ctx(|| format!("write to {}", path.display()))?;
    let mut line = String::new();
    // The agent answers within the timeout; a little more for the way back.
    tokio::time::timeout(
        timeout + Duration::from_secs(10),
        BufReader::new(rd)
            .take(MAX_REQUEST_BYTES)
            .read_line(&mut line),
    )
    .await
    .map_err(|_| Error::Refused("the agent did not answer in time".into()))?
    .ctx(|| format!("read from {}", path.display()))?;
    serde_json::from_str(&line).map_err(|e| {
        Error::Refused(format!(
            "the agent's answer could not be read ({e}): {line:?}"
        ))
    })
}
