//! Mutual TLS with generated certificates: a real handshake on loopback.

use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::codec::Framed;
use wire_protocol::tls::{self, TlsFiles};
use wire_protocol::{Message, MessageCodec};

#[tokio::test]
async fn mutual_tls_carries_frames_and_refuses_strangers() {
    let dir = tempfile::tempdir().unwrap();
    tls::generate(dir.path(), &["localhost".into(), "127.0.0.1".into()]).unwrap();
    assert!(
        tls::generate(dir.path(), &[]).is_err(),
        "existing files are never overwritten"
    );
    let server = tls::server_config(&TlsFiles::server_in(dir.path())).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server);
    let srv = tokio::spawn(async move {
        let mut results = Vec::new();
        for _ in 0..2 {
            let (tcp, _) = listener.accept().await.unwrap();
            match acceptor.accept(tcp).await {
                Ok(tls) => {
                    let mut f = Framed::new(tls, MessageCodec::default());
                    let m = f.next().await.unwrap().unwrap();
                    f.send(m).await.unwrap();
                    results.push(true);
                }
                Err(_) => results.push(false),
            }
        }
        results
    });

    // A client with a certificate from the CA gets through and its frame echoes back.
    let client = tls::client_config(&TlsFiles::client_in(dir.path())).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls_stream = TlsConnector::from(client)
        .connect(tls::server_name("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    let mut f = Framed::new(tls_stream, MessageCodec::default());
    let hb = Message::Heartbeat { seq: 9, time_us: 1 };
    f.send(hb.clone()).await.unwrap();
    assert_eq!(f.next().await.unwrap().unwrap(), hb);
    drop(f);

    // A client from another CA is refused by the server.
    let other = tempfile::tempdir().unwrap();
    tls::generate(other.path(), &["localhost".into()]).unwrap();
    let mut stranger = TlsFiles::client_in(other.path());
    stranger.ca = dir.path().join("ca.pem"); // trusts our server, but its cert is foreign
    let client = tls::client_config(&stranger).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    if let Ok(s) = TlsConnector::from(Arc::clone(&client))
        .connect(tls::server_name("127.0.0.1").unwrap(), tcp)
        .await
    {
        // TLS 1.3 clients learn of the refusal on their first read.
        let mut f = Framed::new(s, MessageCodec::default());
        let _ = f.send(Message::Heartbeat { seq: 1, time_us: 1 }).await;
        assert!(
            !matches!(f.next().await, Some(Ok(_))),
            "a stranger got an answer"
        );
    }
    assert_eq!(srv.await.unwrap(), vec![true, false]);
}
