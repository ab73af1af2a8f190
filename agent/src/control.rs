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
//! For a frozen filesystem (`agent bookmark --freeze`) the request also carries
//! `"take_before_mono_ms"` (the machine's monotonic clock: the agent takes the bookmark
//! before then or not at all) and `"report_taken": true`, and a first line comes as soon
//! as the bookmark is in the stream, so the filesystem is thawed then, not once durable:
//! ```text
//! -> {"tag": "db", "timeout_ms": 60000, "take_before_mono_ms": 81234567, "report_taken": true}
//! <- {"ok": true, "taken": true, "lsn": 20017, "tag": "db", "disk_digest": "ab12...", "error": ""}
//! <- {"ok": true, "lsn": 20017, "tag": "db", "disk_digest": "ab12...", "error": ""}
//! ```
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
    /// Take it before this instant of the monotonic clock, or not at all (0: any time).
    #[serde(default)]
    pub take_before_mono_ms: u64,
    /// Send a first answer as soon as it is taken.
    #[serde(default)]
    pub report_taken: bool,
}

/// The answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BookmarkReply {
    /// Taken and durable on the master target (with `taken`: taken, in the stream).
    pub ok: bool,
    /// The early answer of a `report_taken` request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub taken: bool,
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
    /// Where the early answer goes (a `report_taken` request).
    pub taken: Option<oneshot::Sender<BookmarkReply>>,
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
            let (taken_tx, taken) = oneshot::channel();
            let taken_tx = req.report_taken.then_some(taken_tx);
            let tag = req.tag.clone();
            match tx.try_send(Request {
                req,
                reply,
                taken: taken_tx,
            }) {
                Ok(()) => {
                    // The early answer, if asked for and it comes before the last.
                    if let Ok(t) = taken.await {
                        write_line(&mut wr, &t).await?;
                    }
                    answer
                        .await
                        .unwrap_or_else(|_| BookmarkReply::failed(&tag, "the agent stopped"))
                }
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
    write_line(&mut wr, &reply).await
}

async fn write_line(
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    reply: &BookmarkReply,
) -> std::io::Result<()> {
    let mut out = serde_json::to_string(reply).expect("serializable");
    out.push('\n');
    wr.write_all(out.as_bytes()).await
}

/// Asks the agent running with `state_dir` for a bookmark and waits for the answer.
pub async fn request(state_dir: &Path, tag: &str, timeout: Duration) -> Result<BookmarkReply> {
    let req = BookmarkRequest {
        tag: tag.to_owned(),
        timeout_ms: timeout.as_millis() as u64,
        take_before_mono_ms: 0,
        report_taken: false,
    };
    let mut conn = Client::send(state_dir, &req).await?;
    conn.answer(timeout + Duration::from_secs(10)).await
}

/// A request sent on the socket, its answers read line by line.
pub struct Client {
    lines: tokio::io::Lines<BufReader<tokio::io::Take<tokio::net::unix::OwnedReadHalf>>>,
    path: PathBuf,
    _wr: tokio::net::unix::OwnedWriteHalf,
}

impl Client {
    /// Connects to the agent running with `state_dir` and sends `req`.
    pub async fn send(state_dir: &Path, req: &BookmarkRequest) -> Result<Client> {
        let path = socket_path(state_dir);
        let sock = UnixStream::connect(&path).await.map_err(|e| {
            Error::Refused(format!(
                "no agent is running with the state directory {} ({}: {e}): start the agent (or name its --state-dir) first",
                state_dir.display(),
                path.display()
            ))
        })?;
        let (rd, mut wr) = sock.into_split();
        let mut line = serde_json::to_string(req).expect("serializable");
        line.push('\n');
        wr.write_all(line.as_bytes())
            .await
            .ctx(|| format!("write to {}", path.display()))?;
        // Bounded: at most two answers of a small size each.
        let lines = BufReader::new(rd.take(4 * MAX_REQUEST_BYTES)).lines();
        Ok(Client {
            lines,
            path,
            _wr: wr,
        })
    }

    /// The next answer, within `max`.
    pub async fn answer(&mut self, max: Duration) -> Result<BookmarkReply> {
        let line = tokio::time::timeout(max, self.lines.next_line())
            .await
            .map_err(|_| Error::Refused("the agent did not answer in time".into()))?
            .ctx(|| format!("read from {}", self.path.display()))?
            .ok_or_else(|| {
                Error::Refused("the agent closed the request without an answer".into())
            })?;
        serde_json::from_str(&line).map_err(|e| {
            Error::Refused(format!(
                "the agent's answer could not be read ({e}): {line:?}"
            ))
        })
    }
}
