//! Operator requests to a running master target over mutual TLS (`master-target detach`).

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::codec::Framed;
use wire_protocol::tls::TlsFiles;
use wire_protocol::version::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use wire_protocol::{Hello, Message, MessageCodec, Role};

use crate::error::{Error, Result};

/// Detaches `disk_id` from the master target at `addr`: it finishes what is queued, then
/// releases the disk's lock so the on-premises VM can boot from it. Returns the disk's
/// durable LSN.
pub async fn detach(addr: &str, server_name: &str, tls: &TlsFiles, disk_id: u64) -> Result<u64> {
    let io = |c: &str, e: std::io::Error| Error::Io {
        context: format!("{c} {addr}"),
        source: e,
    };
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .map_err(|_| io("connect to", std::io::ErrorKind::TimedOut.into()))?
        .map_err(|e| io("connect to", e))?;
    let stream = TlsConnector::from(wire_protocol::tls::client_config(tls)?)
        .connect(wire_protocol::tls::server_name(server_name)?, tcp)
        .await
        .map_err(|e| io("TLS handshake with", e))?;
    let mut f = Framed::new(stream, MessageCodec::default());
    f.send(Message::Hello(Hello {
        proto_min: PROTOCOL_VERSION_MIN,
        proto_max: PROTOCOL_VERSION_MAX,
        role: Role::Admin,
        capabilities: 0,
        node_id: "operator".into(),
    }))
    .await?;
    match f.next().await {
        Some(Ok(Message::Hello(_))) => {}
        other => {
            return Err(Error::NoSuchPoint(format!(
                "handshake with the master target failed: {other:?}"
            )))
        }
    }
    f.send(Message::Detach { disk_id }).await?;
    match tokio::time::timeout(Duration::from_secs(60), f.next()).await {
        Ok(Some(Ok(Message::Ack(a)))) => Ok(a.entries.first().map_or(0, |e| e.durable_lsn)),
        Ok(Some(Ok(Message::Error(e)))) => {
            Err(Error::NoSuchPoint(format!("detach refused: {}", e.message)))
        }
        other => Err(Error::NoSuchPoint(format!(
            "detach: unexpected answer {other:?}"
        ))),
    }
}
