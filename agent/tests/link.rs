//! The agent's link against a process server that closes the connection after a failed
//! cache append (what the real one does since the simulator found an agent waiting forever
//! for an ack): an agent with nothing more to write reconnects and resends on its own, and
//! one whose process server fails every time retries at a bounded, growing interval.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::link::{Endpoint, Link, Sent};
use futures::{SinkExt, StreamExt};
use runtime::net::{spawn_server, Peer, Refusals, ServerPolicy};
use runtime::tls::{PeerRole, TlsFiles};
use wire_protocol::{
    Ack, AckEntry, Compression, DiskAttach, ErrorCode, ErrorMsg, LocationKind, Message, Role,
    Write, WriteBatch,
};

const DISK: u64 = 1;

/// A process server that acknowledges attaches at LSN 0 and fails the first batch of the
/// first `failing` connections (an error, then a close); it acknowledges batches after.
async fn fake_process_server(dir: &std::path::Path, failing: u64) -> (String, Arc<AtomicU64>) {
    let files = TlsFiles::of_role(dir, PeerRole::ProcessServer);
    let acceptor = tokio_rustls::TlsAcceptor::from(runtime::tls::server_config(&files).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let attaches = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&attaches);
    let policy = ServerPolicy {
        service: "fake-process-server",
        our_role: Role::ProcessServer,
        node_id: "fake".into(),
        allowed: vec![(PeerRole::Agent, Role::Agent)],
        max_connections: 8,
        max_connections_per_identity: 8,
    };
    spawn_server(
        listener,
        acceptor,
        policy,
        Arc::new(Refusals::default()),
        move |peer: Peer| {
            let counted = Arc::clone(&counted);
            async move {
                let mut framed = peer.framed;
                let mut nth = 0;
                // Bounded: the agent sends an attach and a few batches per connection.
                for _ in 0..16 {
                    let Some(Ok(m)) = framed.next().await else {
                        return;
                    };
                    let answer = match m {
                        Message::DiskAttach(_) => {
                            nth = counted.fetch_add(1, Ordering::SeqCst) + 1;
                            ack(0)
                        }
                        Message::WriteBatch(b) if nth <= failing => {
                            let _ = framed
                                .send(Message::Error(ErrorMsg {
                                    code: ErrorCode::Internal,
                                    disk_id: b.disk_id,
                                    message: "simulated EIO".into(),
                                    request_id: 0,
                                }))
                                .await;
                            return; // closed, as ingest's Outcome::Fail does
                        }
                        Message::WriteBatch(b) => ack(b.last_lsn()),
                        _ => continue,
                    };
                    if framed.send(answer).await.is_err() {
                        return;
                    }
                }
            }
        },
    );
    (addr, attaches)
}

fn ack(lsn: u64) -> Message {
    Message::Ack(Ack {
        entries: vec![AckEntry {
            disk_id: DISK,
            durable_lsn: lsn,
        }],
    })
}

fn link(dir: &std::path::Path, addr: String) -> Link {
    let ep = Endpoint {
        addr,
        server_name: "127.0.0.1".into(),
        tls: TlsFiles::of_role(&dir.join("agents").join("vm1"), PeerRole::Agent),
    };
    let attach = DiskAttach {
        disk_id: DISK,
        vm_id: "vm1".into(),
        group_id: String::new(),
        disk_uuid: [7; 16],
        size_bytes: 1 << 20,
        sector_size: 512,
        location: LocationKind::Alternate,
        target: String::new(),
        request_id: 0,
        os_type: String::new(),
    };
    Link::new(ep, attach, Compression::None, 1 << 20).unwrap()
}

fn batch() -> Message {
    let data = bytes::Bytes::from(vec![0x5a; 4096]);
    Message::WriteBatch(WriteBatch {
        disk_id: DISK,
        first_lsn: 1,
        writes: vec![Write {
            timestamp_us: 1,
            offset: 0,
            digest: wire_protocol::digest(&data),
            data,
        }],
    })
}

/// Polls the link as an idle agent does (serve_control every 100 ms) for up to `max`.
async fn idle(l: &mut Link, max: Duration) {
    let start = Instant::now();
    while start.elapsed() < max && l.unacked_bytes() > 0 {
        l.poll().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pki() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    runtime::tls::make_test_pki(dir.path(), &["127.0.0.1".into()], &["vm1".into()]).unwrap();
    dir
}

#[tokio::test]
async fn an_idle_agent_resends_after_the_process_server_closed_on_a_cache_failure() {
    let dir = pki();
    let (addr, attaches) = fake_process_server(dir.path(), 1).await;
    let mut l = link(dir.path(), addr);
    assert_eq!(l.connect().await.unwrap(), 0);
    assert_eq!(l.send(batch(), 1, 1, 4096).await, Sent::Queued);
    // No more writes: only the link's own polling can bring the batch home.
    idle(&mut l, Duration::from_secs(10)).await;
    assert_eq!(l.unacked_bytes(), 0, "the batch was never acknowledged");
    assert_eq!(l.acked_lsn(), 1);
    assert_eq!(attaches.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_process_server_failing_every_time_is_retried_at_a_bounded_rate() {
    let dir = pki();
    let (addr, attaches) = fake_process_server(dir.path(), u64::MAX).await;
    let mut l = link(dir.path(), addr);
    l.connect().await.unwrap();
    l.send(batch(), 1, 1, 4096).await;
    idle(&mut l, Duration::from_secs(4)).await;
    let n = attaches.load(Ordering::SeqCst);
    // Waits of 0, 200, 400, 800, 1600 and 2000 ms between attempts: about 6 in 4 s.
    // Without the backoff this is hundreds; without the reconnect in poll it is 1.
    assert!((2..=10).contains(&n), "{n} attaches in 4 s");
    assert!(l.unacked_bytes() > 0, "nothing was acknowledged");
}
