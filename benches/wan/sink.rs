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
//!   dropped. Its CPU is that thread's own ([`cpu_s`]), not the bench process's (the relay
//!   runs there too).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::{SinkExt, StreamExt};
use runtime::net::{spawn_server, Refusals, ServerPolicy};
use runtime::tls::{PeerRole, TlsFiles};
use wire_protocol::{Ack, AckEntry, Message, Role};

/// The sink thread's CPU microseconds, updated as it serves (the bench's other threads, the
/// relay's among them, are not the sink's cost).
static CPU_US: AtomicU64 = AtomicU64::new(0);

/// The sink's CPU seconds so far.
pub(crate) fn cpu_s() -> f64 {
    CPU_US.load(Ordering::Relaxed) as f64 / 1e6
}

/// The highest LSN acknowledged per disk, across connections: a process server that
/// reconnects is told what is durable, as a real master target tells it (answering 0 would
/// say everything acknowledged was lost, and send it down its corruption path).
type Durable = Arc<Mutex<HashMap<u64, u64>>>;

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
            let durable = Durable::default();
            spawn_server(
                listener,
                acceptor,
                policy,
                Arc::new(Refusals::default()),
                move |peer| serve(peer, Arc::clone(&durable)),
            );
            bound.send(()).unwrap();
            let _ = stopped.await;
        });
    });
    listening.recv().expect("the sink listens");
    Sink { stop: Some(stop) }
}

/// One process server's link: every batch and bookmark acknowledged once decoded.
async fn serve(peer: runtime::net::Peer, durable: Durable) {
    let (mut tx, mut rx) = peer.framed.split();
    while let Some(Ok(msg)) = rx.next().await {
        let acked = |disk_id: u64, lsn: u64| {
            let mut d = durable.lock().unwrap();
            let e = d.entry(disk_id).or_default();
            *e = (*e).max(lsn);
            ack(disk_id, *e)
        };
        let reply = match msg {
            Message::DiskAttach(a) => acked(a.disk_id, 0),
            Message::WriteBatch(b) => acked(b.disk_id, b.last_lsn()),
            Message::Bookmark(b) => acked(b.disk_id, b.lsn),
            Message::Heartbeat { seq, time_us } => Message::Heartbeat { seq, time_us },
            _ => continue,
        };
        CPU_US.store(thread_cpu_us(), Ordering::Relaxed);
        if tx.send(reply).await.is_err() {
            break;
        }
    }
}

/// This thread's CPU time in microseconds (the sink serves from one thread).
fn thread_cpu_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec; the clock id is a constant the kernel knows.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

fn ack(disk_id: u64, durable_lsn: u64) -> Message {
    Message::Ack(Ack {
        entries: vec![AckEntry {
            disk_id,
            durable_lsn,
        }],
    })
}
