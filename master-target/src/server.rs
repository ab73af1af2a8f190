//! The network shell: the guarded mutual-TLS listener, and per-connection dispatch with
//! authorization.
//!
//! # Who may do what
//! | identity | may send |
//! |---|---|
//! | process server | disk attach, write batches, bookmarks, digest requests, heartbeats: for the disks it attached |
//! | operator | detach, heartbeats |
//!
//! Anything else is refused with `Error{Forbidden}`, logged with the identity and counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use runtime::net::{spawn_server, Peer, Refusals, ServerPolicy};
use runtime::tls::{Identity, PeerRole};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use wire_protocol::{Ack, AckEntry, ErrorCode, ErrorMsg, Message, Role};

use crate::error::Error;
use crate::service::Disks;

/// At most this many peers (process servers and operators) at once. Each connection's
/// memory is bounded by its codec's frame limit and its outbound queue.
pub const MAX_CONNECTIONS: usize = 64;
/// At most this many connections of one identity at once (a process server needs one).
pub const MAX_CONNECTIONS_PER_IDENTITY: usize = 8;
/// Messages queued toward one connection before the disk workers wait for it.
pub const OUTBOUND_QUEUE_DEPTH: usize = 256;
/// A peer that sends nothing for this long is gone (a cut no TCP reset reported): its
/// connection is closed. Process servers send heartbeats at least every 150 s (a quarter of
/// the longest `link-timeout-s`, 600 s), and operators' commands are short.
pub const PEER_IDLE_TIMEOUT_S: u64 = 300;

/// The live connection of each process server. A process server keeps one link, so a newer
/// connection from it means the older one is dead (cut somewhere the TCP stack has not yet
/// noticed): the older is closed at once, freeing its slot and the disk workers that were
/// waiting to send it acknowledgements.
#[derive(Default)]
struct Newest {
    by_name: std::sync::Mutex<std::collections::HashMap<String, (u64, CancellationToken)>>,
    next: AtomicU64,
}

impl Newest {
    /// Registers a connection of `name`, closing the one it replaces.
    fn register(&self, name: &str) -> (u64, CancellationToken) {
        let generation = self.next.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        let old = self
            .by_name
            .lock()
            .expect("the registry lock is never poisoned")
            .insert(name.to_string(), (generation, token.clone()));
        if let Some((_, old)) = old {
            old.cancel();
        }
        (generation, token)
    }

    fn unregister(&self, name: &str, generation: u64) {
        let mut m = self
            .by_name
            .lock()
            .expect("the registry lock is never poisoned");
        if m.get(name).is_some_and(|(g, _)| *g == generation) {
            m.remove(name);
        }
    }
}

/// Refusals are logged once a second per identity and kind, with a count of the rest: a
/// peer cannot fill the disk with log lines.
static REFUSAL_LOG: std::sync::LazyLock<runtime::log::Throttle> =
    std::sync::LazyLock::new(|| runtime::log::Throttle::new(std::time::Duration::from_secs(1)));

/// Requests refused past the handshake, for metrics.
#[derive(Debug, Default)]
pub struct RequestRefusals {
    /// Requests the identity may not make.
    pub forbidden: AtomicU64,
}

/// Accepts peers on `listener` until the process ends.
pub fn spawn(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    disks: Arc<Disks>,
    node_id: String,
    refusals: Arc<Refusals>,
    requests: Arc<RequestRefusals>,
) {
    let policy = ServerPolicy {
        service: "master target",
        our_role: Role::MasterTarget,
        node_id,
        allowed: vec![
            (PeerRole::ProcessServer, Role::ProcessServer),
            (PeerRole::Operator, Role::Admin),
        ],
        max_connections: MAX_CONNECTIONS,
        max_connections_per_identity: MAX_CONNECTIONS_PER_IDENTITY,
    };
    let newest = Arc::new(Newest::default());
    spawn_server(listener, acceptor, policy, refusals, move |peer| {
        let (disks, requests) = (Arc::clone(&disks), Arc::clone(&requests));
        let newest = Arc::clone(&newest);
        async move {
            let (addr, identity) = (peer.addr, peer.identity.clone());
            let (generation, superseded) = match identity.role {
                PeerRole::ProcessServer => newest.register(&identity.name),
                _ => (0, CancellationToken::new()),
            };
            // Dropping the connection future (superseded) drops its reply task too.
            let r = tokio::select! {
                r = connection(peer, disks, requests) => r,
                () = superseded.cancelled() => Err(Error::Io {
                    context: "a newer connection from the same process server".into(),
                    source: std::io::Error::other("superseded: the older link is dead"),
                }),
            };
            if identity.role == PeerRole::ProcessServer {
                newest.unregister(&identity.name, generation);
            }
            match r {
                Ok(()) => tracing::info!(%addr, %identity, "peer disconnected"),
                Err(e) => tracing::warn!(%addr, %identity, error = %e, "connection ended"),
            }
        }
    });
}

fn error_msg(code: ErrorCode, disk_id: u64, message: String) -> Message {
    Message::Error(ErrorMsg {
        code,
        disk_id,
        message,
        request_id: 0,
    })
}

fn reply_err(identity: &Identity, requests: &RequestRefusals, disk_id: u64, e: Error) -> Message {
    if e.code() == ErrorCode::Forbidden {
        requests.forbidden.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = REFUSAL_LOG.admit(&format!("forbidden {identity}")) {
            tracing::warn!(%identity, disk = disk_id, error = %e, suppressed, "request refused");
        }
    }
    error_msg(e.code(), disk_id, e.wire_message(disk_id))
}

/// Whether `identity` may send `msg`.
fn allowed(identity: &Identity, msg: &Message) -> bool {
    match identity.role {
        PeerRole::ProcessServer => matches!(
            msg,
            Message::DiskAttach(_)
                | Message::WriteBatch(_)
                | Message::Bookmark(_)
                | Message::DigestRequest(_)
                | Message::Heartbeat { .. }
                | Message::Ignored { .. }
        ),
        PeerRole::Operator => matches!(msg, Message::Detach { .. } | Message::Heartbeat { .. }),
        _ => false,
    }
}

fn disk_of(msg: &Message) -> u64 {
    match msg {
        Message::DiskAttach(a) => a.disk_id,
        Message::WriteBatch(b) => b.disk_id,
        Message::Bookmark(b) => b.disk_id,
        Message::DigestRequest(r) => r.disk_id,
        Message::Detach { disk_id } => *disk_id,
        _ => 0,
    }
}

/// The answer to one message of a peer (`None`: none now; a batch, a bookmark or a digest
/// request is answered by its disk's worker through `out`).
async fn answer(
    identity: &Identity,
    disks: &Arc<Disks>,
    requests: &RequestRefusals,
    out: &mpsc::Sender<Message>,
    msg: Message,
) -> Option<Message> {
    let id = disk_of(&msg);
    let by = &identity.name;
    if !allowed(identity, &msg) {
        let e = Error::Forbidden(format!(
            "{} {} may not send {} messages to a master target",
            runtime::net::article(identity.role.as_str()),
            identity.role,
            msg.name()
        ));
        return Some(reply_err(identity, requests, id, e));
    }
    let refused = |e| reply_err(identity, requests, id, e);
    match msg {
        Message::DiskAttach(a) => {
            let (d, by) = (Arc::clone(disks), by.clone());
            let r = tokio::task::spawn_blocking(move || d.attach(&by, &a))
                .await
                .expect("attach does not panic");
            Some(match r {
                Ok(lsn) => ack_of(id, lsn),
                Err(e) => {
                    if let Some(suppressed) = REFUSAL_LOG.admit(&format!("attach {identity}")) {
                        tracing::warn!(disk = id, %identity, error = %e, suppressed, "attach refused");
                    }
                    refused(e)
                }
            })
        }
        Message::WriteBatch(b) => disks
            .submit_batch(b, by, out.clone())
            .await
            .err()
            .map(refused),
        Message::Bookmark(b) => disks
            .submit_bookmark(b, by, out.clone())
            .await
            .err()
            .map(refused),
        Message::DigestRequest(r) => disks
            .submit_digests(r, by, out.clone())
            .await
            .err()
            .map(refused),
        Message::Detach { disk_id } => {
            let d = Arc::clone(disks);
            let r = tokio::task::spawn_blocking(move || d.detach(disk_id))
                .await
                .expect("detach does not panic");
            Some(match r {
                Ok(lsn) => {
                    tracing::info!(disk = disk_id, %identity, lsn, "detached by the operator");
                    ack_of(disk_id, lsn)
                }
                Err(e) => refused(e),
            })
        }
        Message::Heartbeat { seq, time_us } => Some(Message::Heartbeat { seq, time_us }),
        _ => None,
    }
}

fn ack_of(disk_id: u64, durable_lsn: u64) -> Message {
    Message::Ack(Ack {
        entries: vec![AckEntry {
            disk_id,
            durable_lsn,
        }],
    })
}

async fn connection(
    peer: Peer,
    disks: Arc<Disks>,
    requests: Arc<RequestRefusals>,
) -> crate::error::Result<()> {
    let identity = peer.identity;
    let mut framed = peer.framed;
    // A process server may compress its batches as one zstd stream (protocol 5): every
    // frame of this connection is decoded here, in order, which a stream needs.
    if identity.role == PeerRole::ProcessServer {
        framed.codec_mut().accept_stream();
    }
    let (mut sink, mut stream) = framed.split();
    let (out, mut out_rx) = mpsc::channel::<Message>(OUTBOUND_QUEUE_DEPTH);
    let mut detaches = disks.detach_notices();
    let mut writer = AbortOnDropHandle::new(tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            sink.send(m).await?;
        }
        Ok::<(), wire_protocol::Error>(())
    }));
    let idle = std::time::Duration::from_secs(PEER_IDLE_TIMEOUT_S);
    loop {
        let msg = tokio::select! {
            m = stream.next() => m,
            () = tokio::time::sleep(idle) => {
                return Err(Error::Io {
                    context: format!("nothing heard from {identity} in {PEER_IDLE_TIMEOUT_S} s"),
                    source: std::io::Error::from(std::io::ErrorKind::TimedOut),
                });
            }
            // A process server hears at once of each detach of a disk it replicates.
            d = detaches.recv(), if identity.role == PeerRole::ProcessServer => {
                // Only the process server that replicates the disk hears: another may hold a
                // disk of the same id for another master target.
                if let Ok(disk_id) = d.map_err(drop).and_then(|id| match disks.replicated_by(id) {
                    Some(by) if by == identity.name => Ok(id),
                    _ => Err(()),
                }) {
                    let e = Error::Detached { disk_id, lsn: 0 };
                    let _ = out.send(error_msg(e.code(), disk_id, format!("disk {disk_id} was detached for failback: ship nothing more of it"))).await;
                }
                continue;
            }
            // A writer that stops takes the connection down, loudly: nothing may be left
            // half-working with acks silently lost.
            w = &mut writer => {
                return Err(match w {
                    Ok(Err(e)) => e.into(),
                    other => Error::Io {
                        context: "the reply task stopped".into(),
                        source: std::io::Error::other(format!("{other:?}")),
                    },
                });
            }
        };
        let Some(msg) = msg else { break };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                // The stream is not trustworthy after a framing error: tell the peer, close.
                let _ = out
                    .send(error_msg(ErrorCode::Malformed, 0, e.to_string()))
                    .await;
                drop(out);
                let _ = writer.await;
                return Err(e.into());
            }
        };
        // An error answering a request carries its id (version 2), so a peer with several
        // requests in flight knows which one failed.
        let request_id = msg.request_id();
        let reply = answer(&identity, &disks, &requests, &out, msg).await;
        if let Some(mut r) = reply {
            if matches!(r, Message::Error(_)) {
                r.set_request_id(request_id);
            }
            if out.send(r).await.is_err() {
                break;
            }
        }
    }
    drop(out);
    let _ = writer.await;
    Ok(())
}
