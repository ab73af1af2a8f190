//! Operator requests to a running master target over mutual TLS (`master-target detach`),
//! with an operator's certificate.

use futures::{SinkExt, StreamExt};
use runtime::net::{connect, ClientSpec};
use runtime::tls::{PeerRole, TlsFiles};
use wire_protocol::{Message, MessageCodec, Role};

use crate::error::{Error, Result};

/// How long a detach may take: the disk's worker finishes what is queued first.
pub const DETACH_TIMEOUT_MS: u64 = 120_000;

/// Detaches `disk_id` from the master target at `addr`: it finishes what is queued, then
/// releases the disk's lock so the on-premises VM can boot from it. Returns the disk's
/// durable LSN.
pub async fn detach(addr: &str, server_name: &str, tls: &TlsFiles, disk_id: u64) -> Result<u64> {
    let spec = ClientSpec {
        addr: addr.to_owned(),
        server_name: server_name.to_owned(),
        config: runtime::tls::client_config(tls)?,
        expect: PeerRole::MasterTarget,
        role: Role::Admin,
        node_id: "operator".into(),
    };
    let mut c = connect(&spec, MessageCodec::default()).await?;
    c.framed.send(Message::Detach { disk_id }).await?;
    let answer = tokio::time::timeout(
        std::time::Duration::from_millis(DETACH_TIMEOUT_MS),
        c.framed.next(),
    )
    .await
    .map_err(|_| Error::Refused(format!("no answer to the detach of disk {disk_id} in time")))?;
    match answer {
        Some(Ok(Message::Ack(a))) => Ok(a.entries.first().map_or(0, |e| e.durable_lsn)),
        Some(Ok(Message::Error(e))) => {
            Err(Error::Refused(format!("detach refused: {}", e.message)))
        }
        Some(Ok(m)) => Err(Error::Refused(format!(
            "detach: unexpected answer {}",
            m.name()
        ))),
        Some(Err(e)) => Err(e.into()),
        None => Err(Error::Refused(
            "the master target closed the connection".into(),
        )),
    }
}
