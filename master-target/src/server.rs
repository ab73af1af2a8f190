//! The network shell: mutual-TLS listener, handshake, and per-connection dispatch.

use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::Framed;
use wire_protocol::version::{negotiate, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use wire_protocol::{
    Ack, AckEntry, ErrorCode, ErrorMsg, Hello, Message, MessageCodec, Role, CAP_ZSTD,
};

use crate::error::Result;
use crate::service::Disks;

/// At most this many process servers (connections) at once; more wait in the kernel's
/// accept queue. Each connection's memory is bounded by its codec's frame limit and its
/// outbound queue.
pub const MAX_CONNECTIONS: usize = 64;
/// Messages queued toward one connection before the disk workers wait for it.
pub const OUTBOUND_QUEUE_DEPTH: usize = 256;
/// A peer must finish its TLS handshake and Hello within this time.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

/// Accepts connections until the process ends.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    disks: Arc<Disks>,
    node_id: String,
) -> Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = Arc::clone(&slots)
            .acquire_owned()
            .await
            .expect("never closed");
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let (acceptor, disks, node_id) = (acceptor.clone(), Arc::clone(&disks), node_id.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = connection(tcp, acceptor, disks, node_id).await {
                tracing::warn!(%peer, error = %e, "connection ended");
            }
        });
    }
}

async fn connection(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    disks: Arc<Disks>,
    node_id: String,
) -> Result<()> {
    let _ = tcp.set_nodelay(true);
    let timeout = std::time::Duration::from_millis(HANDSHAKE_TIMEOUT_MS);
    let tls = tokio::time::timeout(timeout, acceptor.accept(tcp))
        .await
        .map_err(|_| io_err("TLS handshake timed out"))?
        .map_err(|e| crate::error::Error::Io {
            context: "TLS handshake (is the client certificate signed by our CA?)".into(),
            source: e,
        })?;
    let mut framed = Framed::new(tls, MessageCodec::default());
    let hello = match tokio::time::timeout(timeout, framed.next()).await {
        Ok(Some(Ok(Message::Hello(h)))) => h,
        Ok(Some(Ok(m))) => return Err(io_err(&format!("expected hello, got {}", m.name()))),
        Ok(Some(Err(e))) => return Err(e.into()),
        _ => return Err(io_err("no hello")),
    };
    match negotiate(
        (PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX),
        (hello.proto_min, hello.proto_max),
    ) {
        Ok(v) => framed.codec_mut().set_version(v),
        Err(e) => {
            let _ = framed
                .send(Message::Error(ErrorMsg {
                    code: ErrorCode::VersionMismatch,
                    disk_id: 0,
                    message: e.to_string(),
                }))
                .await;
            return Err(e.into());
        }
    }
    framed
        .send(Message::Hello(Hello {
            proto_min: PROTOCOL_VERSION_MIN,
            proto_max: PROTOCOL_VERSION_MAX,
            role: Role::MasterTarget,
            capabilities: CAP_ZSTD,
            node_id,
        }))
        .await?;
    tracing::info!(peer = %hello.node_id, "process server connected");

    let (mut sink, mut stream) = framed.split();
    let (out, mut out_rx) = mpsc::channel::<Message>(OUTBOUND_QUEUE_DEPTH);
    let writer = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            if sink.send(m).await.is_err() {
                break;
            }
        }
    });
    while let Some(msg) = stream.next().await {
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                // The stream is not trustworthy after a framing error: tell the peer, close.
                let _ = out
                    .send(Message::Error(ErrorMsg {
                        code: ErrorCode::Malformed,
                        disk_id: 0,
                        message: e.to_string(),
                    }))
                    .await;
                drop(out);
                let _ = writer.await;
                return Err(e.into());
            }
        };
        let reply_err = |disk_id: u64, e: crate::error::Error| {
            Message::Error(ErrorMsg {
                code: e.code(),
                disk_id,
                message: e.to_string(),
            })
        };
        match msg {
            Message::DiskAttach(a) => {
                let d = Arc::clone(&disks);
                let id = a.disk_id;
                let r = tokio::task::spawn_blocking(move || d.attach(&a))
                    .await
                    .expect("attach does not panic");
                let m = match r {
                    Ok(lsn) => Message::Ack(Ack {
                        entries: vec![AckEntry {
                            disk_id: id,
                            durable_lsn: lsn,
                        }],
                    }),
                    Err(e) => {
                        tracing::warn!(disk = id, error = %e, "attach refused");
                        reply_err(id, e)
                    }
                };
                let _ = out.send(m).await;
            }
            Message::WriteBatch(b) => {
                let id = b.disk_id;
                if let Err(e) = disks.submit_batch(b, out.clone()).await {
                    let _ = out.send(reply_err(id, e)).await;
                }
            }
            Message::Bookmark(b) => {
                let id = b.disk_id;
                if let Err(e) = disks.submit_bookmark(b, out.clone()).await {
                    let _ = out.send(reply_err(id, e)).await;
                }
            }
            Message::DigestRequest(r) => {
                let id = r.disk_id;
                if let Err(e) = disks.submit_digests(r, out.clone()).await {
                    let _ = out.send(reply_err(id, e)).await;
                }
            }
            Message::Detach { disk_id } => {
                let d = Arc::clone(&disks);
                let m = match tokio::task::spawn_blocking(move || d.detach(disk_id))
                    .await
                    .expect("detach does not panic")
                {
                    Ok(lsn) => Message::Ack(Ack {
                        entries: vec![AckEntry {
                            disk_id,
                            durable_lsn: lsn,
                        }],
                    }),
                    Err(e) => reply_err(disk_id, e),
                };
                let _ = out.send(m).await;
            }
            Message::Heartbeat { seq, time_us } => {
                let _ = out.send(Message::Heartbeat { seq, time_us }).await;
            }
            Message::Ignored { .. } => {}
            other => {
                let _ = out
                    .send(Message::Error(ErrorMsg {
                        code: ErrorCode::Malformed,
                        disk_id: 0,
                        message: format!("a master target does not take {} messages", other.name()),
                    }))
                    .await;
            }
        }
    }
    drop(out);
    let _ = writer.await;
    Ok(())
}

fn io_err(msg: &str) -> crate::error::Error {
    crate::error::Error::Io {
        context: msg.to_owned(),
        source: std::io::Error::other(msg.to_owned()),
    }
}
