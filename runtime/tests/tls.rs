//! Mutual TLS with per-identity certificates: real handshakes on loopback through the
//! guarded listener and the client connect.

use std::path::Path;
use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use runtime::net::{connect, spawn_server, ClientSpec, Refusals, ServerPolicy};
use runtime::tls::{self, PeerRole, TlsFiles};
use runtime::Error;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use wire_protocol::{ErrorCode, Message, MessageCodec, Retry, Role};

/// A process-server-like listener that takes agents only and echoes one message.
async fn listener(dir: &Path) -> (String, Arc<Refusals>) {
    let files = TlsFiles::of_role(dir, PeerRole::ProcessServer);
    let acceptor = TlsAcceptor::from(tls::server_config(&files).unwrap());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let refusals = Arc::new(Refusals::default());
    spawn_server(
        l,
        acceptor,
        ServerPolicy {
            service: "test",
            our_role: Role::ProcessServer,
            node_id: "ps".into(),
            allowed: vec![(PeerRole::Agent, Role::Agent)],
            max_connections: 4,
            max_connections_per_identity: 2,
        },
        Arc::clone(&refusals),
        |mut p| async move {
            assert_eq!(p.identity.role, PeerRole::Agent);
            // Echo until the peer goes: the connection holds its slot all that time.
            while let Some(Ok(m)) = p.framed.next().await {
                let _ = p.framed.send(m).await;
            }
        },
    );
    (addr, refusals)
}

fn spec(addr: &str, files: &TlsFiles, role: Role) -> ClientSpec {
    ClientSpec {
        addr: addr.to_owned(),
        server_name: "127.0.0.1".into(),
        config: tls::client_config(files).unwrap(),
        expect: PeerRole::ProcessServer,
        role,
        node_id: "test".into(),
    }
}

#[tokio::test]
async fn identities_decide_who_gets_in() {
    let dir = tempfile::tempdir().unwrap();
    tls::make_test_pki(
        dir.path(),
        &["localhost".into(), "127.0.0.1".into()],
        &["vm1".into()],
    )
    .unwrap();
    let (addr, refusals) = listener(dir.path()).await;

    // An agent's certificate gets through, and its frame echoes back.
    let agent = TlsFiles::of_role(&dir.path().join("agents/vm1"), PeerRole::Agent);
    let mut c = connect(&spec(&addr, &agent, Role::Agent), MessageCodec::default())
        .await
        .unwrap();
    assert_eq!(c.identity.role, PeerRole::ProcessServer);
    let hb = Message::Heartbeat { seq: 9, time_us: 1 };
    c.framed.send(hb.clone()).await.unwrap();
    assert_eq!(c.framed.next().await.unwrap().unwrap(), hb);

    // A master target's certificate is a server certificate: refused as a client by TLS.
    let mt = TlsFiles::of_role(dir.path(), PeerRole::MasterTarget);
    let e = connect(&spec(&addr, &mt, Role::Agent), MessageCodec::default())
        .await
        .unwrap_err();
    assert_eq!(e.retry(), Retry::Permanent, "{e}");

    // An operator's certificate is a client certificate of a role this listener refuses.
    let op = TlsFiles::of_role(dir.path(), PeerRole::Operator);
    match connect(&spec(&addr, &op, Role::Admin), MessageCodec::default()).await {
        Err(Error::Refused { code, message }) => {
            assert_eq!(code, ErrorCode::Forbidden);
            assert!(message.contains("operator/operator"), "{message}");
        }
        other => panic!("an operator got in: {other:?}"),
    }

    // An agent announcing another role in its Hello is refused.
    match connect(
        &spec(&addr, &agent, Role::ProcessServer),
        MessageCodec::default(),
    )
    .await
    {
        Err(Error::Refused { code, .. }) => assert_eq!(code, ErrorCode::Forbidden),
        other => panic!("a role mismatch got in: {other:?}"),
    }

    // A certificate of another deployment's CA is refused, permanently.
    let other = tempfile::tempdir().unwrap();
    tls::make_test_pki(other.path(), &["127.0.0.1".into()], &["vm1".into()]).unwrap();
    let mut stranger = TlsFiles::of_role(&other.path().join("agents/vm1"), PeerRole::Agent);
    stranger.ca = dir.path().join("ca.pem"); // it trusts our server; its own cert is foreign
    let e = connect(
        &spec(&addr, &stranger, Role::Agent),
        MessageCodec::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.retry(), Retry::Permanent, "{e}");
    // ... and a client trusting another CA refuses our server, permanently, saying why.
    let mut wrong_ca = agent.clone();
    wrong_ca.ca = other.path().join("ca.pem");
    let e = connect(
        &spec(&addr, &wrong_ca, Role::Agent),
        MessageCodec::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.retry(), Retry::Permanent, "{e}");
    assert!(e.to_string().contains("not signed by our CA"), "{e}");
    // A server name the certificate does not carry: permanent, and said so.
    let mut s = spec(&addr, &agent, Role::Agent);
    s.server_name = "ps.elsewhere.example".into();
    let e = connect(&s, MessageCodec::default()).await.unwrap_err();
    assert_eq!(e.retry(), Retry::Permanent, "{e}");
    assert!(e.to_string().contains("does not carry the name"), "{e}");

    // Per-identity limit: two connections of vm1 at once, the third is told to retry.
    let a = connect(&spec(&addr, &agent, Role::Agent), MessageCodec::default())
        .await
        .unwrap();
    match connect(&spec(&addr, &agent, Role::Agent), MessageCodec::default()).await {
        Err(Error::Refused { code, .. }) => assert_eq!(code, ErrorCode::Busy),
        other => panic!("a third connection of one identity got in: {other:?}"),
    }
    drop((a, c));
    let counts: std::collections::HashMap<_, _> = refusals.counts().into_iter().collect();
    assert!(
        counts["forbidden"] >= 2 && counts["busy"] >= 1,
        "{counts:?}"
    );
}
