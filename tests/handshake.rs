//! Version negotiation against the real services: a peer whose protocol range does not
//! overlap gets an error frame naming both ranges, then the connection closes; a version-1
//! peer is served in version 1; a version-2 peer's answers carry its request ids, so an
//! error goes to the request it answers.

use std::path::Path;
use std::time::Duration;

use failback::harness::Cluster;
use futures::{SinkExt, StreamExt};
use runtime::tls::{self, PeerRole, TlsFiles};
use tokio::io::AsyncWriteExt;
use tokio_rustls::TlsConnector;
use tokio_util::codec::Framed;
use wire_protocol::frame::FrameCodec;
use wire_protocol::{
    DigestRequest, DiskAttach, ErrorCode, Hello, LocationKind, Message, MessageCodec, Role, Write,
    WriteBatch,
};

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn tls_to(addr: &str, files: &TlsFiles) -> Tls {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let cfg = tls::client_config(files).unwrap();
    TlsConnector::from(cfg)
        .connect(tls::server_name("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap()
}

/// Connects with the files of `role` (an agent's to the process server, the process
/// server's to the master target) and sends a Hello with `range`.
async fn hello(addr: &str, files: &TlsFiles, role: Role, range: (u16, u16)) -> Vec<Message> {
    let mut f = Framed::new(tls_to(addr, files).await, MessageCodec::default());
    f.send(Message::Hello(Hello {
        proto_min: range.0,
        proto_max: range.1,
        role,
        capabilities: 0,
        node_id: "future-peer".into(),
    }))
    .await
    .unwrap();
    let mut got = Vec::new();
    // Bounded: the server answers and closes; stop after the close or 10 messages.
    for _ in 0..10 {
        match tokio::time::timeout(Duration::from_secs(10), f.next())
            .await
            .expect("the server answers or closes")
        {
            Some(Ok(m)) => got.push(m),
            _ => break,
        }
    }
    got
}

#[test]
fn disjoint_versions_get_both_ranges_then_a_close() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(dir.path(), Path::new(env!("CARGO_BIN_EXE_failback"))).unwrap();
    c.start_mt().unwrap();
    c.start_ps().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let agent = TlsFiles::of_role(&c.agent_tls("vm1"), PeerRole::Agent);
    let ps = TlsFiles::of_role(&c.tls, PeerRole::ProcessServer);
    for (addr, files, role) in [
        (c.ps_addr.clone(), agent, Role::Agent),
        (c.mt_addr.clone(), ps, Role::ProcessServer),
    ] {
        let got = rt.block_on(hello(&addr, &files, role, (7, 9)));
        assert_eq!(
            got.len(),
            1,
            "{addr}: one error frame, then the close: {got:?}"
        );
        let Message::Error(e) = &got[0] else {
            panic!("{addr}: expected an error frame, got {got:?}")
        };
        assert_eq!(e.code, ErrorCode::VersionMismatch);
        assert!(
            e.message.contains(&format!(
                "{}..={}",
                wire_protocol::version::PROTOCOL_VERSION_MIN,
                wire_protocol::version::PROTOCOL_VERSION_MAX
            )) && e.message.contains("7..=9"),
            "{addr}: {}",
            e.message
        );
        // An overlapping range is welcomed with the server's own hello.
        let ok = rt.block_on(async {
            let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let cfg = tls::client_config(&files).unwrap();
            let s = TlsConnector::from(cfg)
                .connect(tls::server_name("127.0.0.1").unwrap(), tcp)
                .await
                .unwrap();
            let mut f = Framed::new(s, MessageCodec::default());
            f.send(Message::Hello(Hello {
                proto_min: 1,
                proto_max: wire_protocol::version::PROTOCOL_VERSION_MAX + 1,
                role,
                capabilities: 0,
                node_id: "newer-peer".into(),
            }))
            .await
            .unwrap();
            f.next().await
        });
        assert!(matches!(ok, Some(Ok(Message::Hello(_)))), "{addr}: {ok:?}");
    }
}

/// A raw agent speaking `range`: reads frames (their headers' versions are checked) and
/// writes messages in `version`.
struct RawAgent {
    io: Framed<Tls, FrameCodec>,
    out: MessageCodec,
    messages: MessageCodec,
}

impl RawAgent {
    async fn connect(addr: &str, files: &TlsFiles, range: (u16, u16), version: u16) -> Self {
        let mut a = RawAgent {
            io: Framed::new(tls_to(addr, files).await, FrameCodec::default()),
            out: MessageCodec::default(),
            messages: MessageCodec::default(),
        };
        a.send(Message::Hello(Hello {
            proto_min: range.0,
            proto_max: range.1,
            role: Role::Agent,
            capabilities: 0,
            node_id: "vm1".into(),
        }))
        .await;
        assert!(matches!(a.next(version).await, Message::Hello(_)));
        a.out.set_version(version);
        a
    }

    async fn send(&mut self, m: Message) {
        let bytes = self.out.encode_to_bytes(&m).unwrap();
        self.io.get_mut().write_all(&bytes).await.unwrap();
    }

    /// The next message other than durability news; its frame must be in `version`.
    async fn next(&mut self, version: u16) -> Message {
        for _ in 0..1000 {
            let f = tokio::time::timeout(Duration::from_secs(30), self.io.next())
                .await
                .expect("an answer in time")
                .expect("an answer, not a close")
                .expect("a valid frame");
            assert_eq!(
                f.header.version, version,
                "frame of type {}",
                f.header.msg_type
            );
            match self.messages.decode_frame(f).unwrap() {
                Message::RemoteDurable { .. } => continue,
                m => return m,
            }
        }
        panic!("no answer among 1000 messages")
    }
}

fn attach(request_id: u64) -> Message {
    Message::DiskAttach(DiskAttach {
        disk_id: 1,
        vm_id: "vm1".into(),
        group_id: String::new(),
        disk_uuid: [1; 16],
        size_bytes: 1 << 20,
        sector_size: 512,
        location: LocationKind::Alternate,
        target: String::new(),
        request_id,
        os_type: String::new(),
    })
}

fn digests(block_size: u32, request_id: u64) -> Message {
    Message::DigestRequest(DigestRequest {
        disk_id: 1,
        block_size,
        first_block: 0,
        block_count: 16,
        request_id,
    })
}

/// An agent of version 1 is spoken to in version 1 (every frame it gets), is served, and
/// its answers come in the order of its requests; one of version 2 gets its request ids
/// back, and with two requests of one disk in flight, the refusal of the first and the
/// answer to the second each reach the request they belong to.
#[test]
fn every_frame_is_in_the_negotiated_version_and_answers_carry_request_ids() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(dir.path(), Path::new(env!("CARGO_BIN_EXE_failback"))).unwrap();
    c.start_mt().unwrap();
    c.start_ps().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let files = TlsFiles::of_role(&c.agent_tls("vm1"), PeerRole::Agent);
    rt.block_on(async {
        let mut old = RawAgent::connect(&c.ps_addr, &files, (1, 1), 1).await;
        old.send(attach(0)).await;
        let a = old.next(1).await;
        assert!(matches!(a, Message::Ack(_)), "version-1 attach: {a:?}");
        let data = bytes::Bytes::from(vec![0x5a; 4096]);
        old.send(Message::WriteBatch(WriteBatch {
            disk_id: 1,
            first_lsn: 1,
            writes: vec![Write {
                timestamp_us: 1,
                offset: 0,
                digest: wire_protocol::digest(&data),
                data,
            }],
        }))
        .await;
        let a = old.next(1).await;
        assert!(
            matches!(&a, Message::Ack(k) if k.entries[0].durable_lsn == 1),
            "{a:?}"
        );
        old.send(digests(1, 0)).await; // 1-byte blocks: refused
        old.send(digests(65536, 0)).await;
        let first = old.next(1).await;
        assert!(
            matches!(&first, Message::Error(e) if e.code == ErrorCode::Malformed && e.request_id == 0),
            "{first:?}"
        );
        let second = old.next(1).await;
        assert!(
            matches!(&second, Message::DigestList(l) if l.digests.len() == 16),
            "{second:?}"
        );
        drop(old);

        let mut new = RawAgent::connect(&c.ps_addr, &files, (1, 2), 2).await;
        new.send(attach(7)).await;
        let a = new.next(2).await;
        assert!(matches!(a, Message::Ack(_)), "version-2 attach: {a:?}");
        new.send(digests(1, 41)).await;
        new.send(digests(65536, 42)).await;
        let mut got = [new.next(2).await, new.next(2).await];
        got.sort_by_key(Message::request_id);
        assert!(
            matches!(&got[0], Message::Error(e) if e.code == ErrorCode::Malformed && e.request_id == 41),
            "{:?}",
            got[0]
        );
        assert!(
            matches!(&got[1], Message::DigestList(l) if l.request_id == 42 && l.digests.len() == 16),
            "{:?}",
            got[1]
        );
    });
}
