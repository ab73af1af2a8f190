//! Version negotiation against the real services: a peer whose protocol range does not
//! overlap gets an error frame naming both ranges, then the connection closes.

use std::path::Path;
use std::time::Duration;

use failback::harness::Cluster;
use futures::{SinkExt, StreamExt};
use runtime::tls::{self, PeerRole, TlsFiles};
use tokio_rustls::TlsConnector;
use tokio_util::codec::Framed;
use wire_protocol::{ErrorCode, Hello, Message, MessageCodec, Role};

/// Connects with the files of `role` (an agent's to the process server, the process
/// server's to the master target) and sends a Hello with `range`.
async fn hello(addr: &str, files: &TlsFiles, role: Role, range: (u16, u16)) -> Vec<Message> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let cfg = tls::client_config(files).unwrap();
    let stream = TlsConnector::from(cfg)
        .connect(tls::server_name("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    let mut f = Framed::new(stream, MessageCodec::default());
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
            e.message.contains("1..=1") && e.message.contains("7..=9"),
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
                proto_max: 5,
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
