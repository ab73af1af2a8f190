//! A master target that keeps nothing: it takes the process server's link (the same
//! mutual-TLS listener and handshake as the real one) and acknowledges every batch and
//! bookmark as soon as it has decoded it. With it, the process server is the only service
//! doing a master target's work on this machine's two cores (the agent still shares them in
//! the bulk and churn cases), which is how the aim "one process server sustains 300 MB/s" is
//! measured here.
//!
//! # Design constraints
//! - It does what the link needs and no more: decoding (which decompresses and checks each
//!   frame's checksum) is its only work per byte, so its CPU is reported beside the process
//!   server's.
//! - It runs on its own single-threaded tokio runtime in the bench's process, and stops when
//!   dropped.

use std::path::Path;
use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use runtime::net::{spawn_server, Refusals, ServerPolicy};
use runtime::tls::{PeerRole, TlsFiles};
use wire_protocol::{Ack, AckEntry, Message, Role};

/// A running sink; stops when dropped.
pub(crate) struct Sink {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Listens on `addr` with the master target's certificate from `tls`.
pub(crate) fn start(tls: &Path, addr: &str) -> Sink {
    let files = TlsFiles::of_role(tls, PeerRole::MasterTarget);
    let acceptor = tokio_rustls::TlsAcceptor::from(runtime::tls::server_config(&files).unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (bound, listening) = std::sync::mpsc::channel();
    let addr = addr.to_owned();
    // A current-thread runtime runs its tasks only inside its own `block_on`: the thread
    // that owns it serves until the stop signal.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind(&addr)
                .await
                .unwrap_or_else(|e| panic!("sink: bind {addr}: {e}"));
            let policy = ServerPolicy {
                service: "sink master target",
                our_role: Role::MasterTarget,
                node_id: "sink".into(),
                allowed: vec![(PeerRole::ProcessServer, Role::ProcessServer)],
                max_connections: 4,
                max_connections_per_identity: 4,
            };
            spawn_server(
                listener,
                acceptor,
                policy,
                Arc::new(Refusals::default()),
                serve,
            );
            bound.send(()).unwrap();
            let _ = stopped.await;
        });
    });
    listening.recv().expect("the sink listens");
    Sink { stop: Some(stop) }
}

/// One process server's link: every batch and bookmark acknowledged once decoded.
async fn serve(peer: runtime::net::Peer) {
    let (mut tx, mut rx) = peer.framed.split();
    while let Some(Ok(msg)) = rx.next().await {
        let reply = match msg {
            Message::DiskAttach(a) => ack(a.disk_id, 0),
            Message::WriteBatch(b) => ack(b.disk_id, b.last_lsn()),
            Message::Bookmark(b) => ack(b.disk_id, b.lsn),
            Message::Heartbeat { seq, time_us } => Message::Heartbeat { seq, time_us },
            _ => continue,
        };
        if tx.send(reply).await.is_err() {
            break;
        }
    }
}

fn ack(disk_id: u64, durable_lsn: u64) -> Message {
    Message::Ack(Ack {
        entries: vec![AckEntry {
            disk_id,
            durable_lsn,
        }],
    })
}
