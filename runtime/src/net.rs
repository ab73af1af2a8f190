//! Connections, both ways, with every step bounded: a guarded listener and a client connect.
//!
//! # Design constraints
//! - Refusing is cheap and nothing can hog: the TLS handshake and the Hello run in the
//!   connection's own task under [`HANDSHAKE_TIMEOUT_MS`] and [`HELLO_TIMEOUT_MS`], before
//!   the connection takes one of the service's limited slots. At most [`MAX_HANDSHAKES`]
//!   handshakes run at once, [`MAX_HANDSHAKES_PER_ADDR`] from one address; past either a
//!   new connection is closed at once. Idle or half-open connections therefore delay no
//!   one: they hold a handshake place for a few seconds, never a connection slot.
//! - Who may connect is decided by the certificate: its identity (see [`crate::tls`]) must
//!   be of a role the service accepts, and the Hello must announce that same role.
//! - A service takes at most `max_connections` peers, and `max_connections_per_identity`
//!   from one identity; past them the peer gets an `Error{Busy}` frame and is closed.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::codec::Framed;
use wire_protocol::handshake::{self, Answer, Refusal};
use wire_protocol::{ErrorCode, ErrorMsg, Hello, Message, MessageCodec, Role};

use crate::error::{Error, Result};
use crate::log::Throttle;
use crate::tls::{peer_identity, Identity, PeerRole};

/// A peer must finish the TLS handshake within this time (a few round trips of the
/// slowest link we expect, with room).
pub const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// ... and send its Hello within this time after it.
pub const HELLO_TIMEOUT_MS: u64 = 5_000;
/// A TCP connect gives up after this time.
pub const CONNECT_TIMEOUT_MS: u64 = 10_000;
/// Handshakes in progress at once, from everyone. Each holds a task and TLS state (tens of
/// KiB): this bounds them to about 200 MiB, and an attacker needs 64 addresses to fill it.
pub const MAX_HANDSHAKES: usize = 4096;
/// Handshakes in progress at once from one address (an IPv6 /64 counts as one): one host
/// cannot take every place. A legitimate host starts a few at a time.
pub const MAX_HANDSHAKES_PER_ADDR: usize = 64;
const _: () = assert!(MAX_HANDSHAKES_PER_ADDR < MAX_HANDSHAKES);

/// The server side of a stream.
pub type ServerStream = tokio_rustls::server::TlsStream<TcpStream>;
/// The client side of a stream.
pub type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

/// What one source counts as: its IPv4 address, or its IPv6 /64 (one host gets a whole /64,
/// so single IPv6 addresses would be no limit at all).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

/// Counts per key, with a maximum; a taken count is given back when its guard drops.
#[derive(Debug)]
struct Keyed<K: Eq + Hash + Clone> {
    counts: Mutex<HashMap<K, usize>>,
    max: usize,
}

#[derive(Debug)]
struct KeyedGuard<K: Eq + Hash + Clone> {
    owner: Arc<Keyed<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> Keyed<K> {
    fn new(max: usize) -> Arc<Self> {
        Arc::new(Keyed {
            counts: Mutex::new(HashMap::new()),
            max,
        })
    }

    fn take(self: &Arc<Self>, key: K) -> Option<KeyedGuard<K>> {
        let mut c = self.counts.lock().expect("poisoned");
        let n = c.entry(key.clone()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(KeyedGuard {
            owner: Arc::clone(self),
            key,
        })
    }
}

impl<K: Eq + Hash + Clone> Drop for KeyedGuard<K> {
    fn drop(&mut self) {
        let mut c = self.owner.counts.lock().expect("poisoned");
        if let Some(n) = c.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.key);
            }
        }
    }
}

/// Connections refused by a listener, by reason (for metrics).
#[derive(Debug, Default)]
pub struct Refusals {
    /// Closed at once: too many handshakes in progress (overall or from the address).
    pub handshake_limit: AtomicU64,
    /// The TLS handshake failed (no certificate, another CA, a server certificate, ...).
    pub tls: AtomicU64,
    /// The handshake or the Hello did not arrive in time.
    pub timeout: AtomicU64,
    /// The certificate's identity or the Hello's role may not connect here.
    pub forbidden: AtomicU64,
    /// The protocol versions do not overlap.
    pub version: AtomicU64,
    /// Every connection slot (or the identity's share) was taken.
    pub busy: AtomicU64,
}

impl Refusals {
    /// `(reason, count)` pairs, for metrics.
    pub fn counts(&self) -> [(&'static str, u64); 6] {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("handshake_limit", l(&self.handshake_limit)),
            ("tls", l(&self.tls)),
            ("timeout", l(&self.timeout)),
            ("forbidden", l(&self.forbidden)),
            ("version", l(&self.version)),
            ("busy", l(&self.busy)),
        ]
    }
}

/// Who may connect to a listener and how many.
#[derive(Debug, Clone)]
pub struct ServerPolicy {
    /// The service, for logs.
    pub service: &'static str,
    /// The role this service announces in its Hello.
    pub our_role: Role,
    /// This service's node id, announced in its Hello.
    pub node_id: String,
    /// The certificate roles that may connect, each with the Hello role it must announce.
    pub allowed: Vec<(PeerRole, Role)>,
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections served at once for one identity.
    pub max_connections_per_identity: usize,
}

/// A connection that passed every check, with its slot.
#[derive(Debug)]
pub struct Peer {
    /// The framed stream (version negotiated, Hellos exchanged).
    pub framed: Framed<ServerStream, MessageCodec>,
    /// The peer's address.
    pub addr: SocketAddr,
    /// Who the certificate says it is.
    pub identity: Identity,
    /// Its Hello.
    pub hello: Hello,
    /// The negotiated protocol version.
    pub version: u16,
}

/// A connection slot: held by the connection's task until its handler returns.
type Slot = (OwnedSemaphorePermit, KeyedGuard<Identity>);

/// The guarded listener's shared state.
#[derive(Debug)]
struct Gate {
    policy: ServerPolicy,
    refusals: Arc<Refusals>,
    handshakes: Arc<Semaphore>,
    per_addr: Arc<Keyed<IpAddr>>,
    slots: Arc<Semaphore>,
    per_identity: Arc<Keyed<Identity>>,
    throttle: Throttle,
}

/// "a" or "an", as the word needs.
pub fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn error_frame(code: ErrorCode, message: String) -> Message {
    Message::Error(ErrorMsg {
        code,
        disk_id: 0,
        message,
        request_id: 0,
    })
}

impl Gate {
    fn refuse(&self, counter: &AtomicU64, peer: SocketAddr, why: &str) {
        self.refuse_as(counter, peer, why, why);
    }

    /// Counts and logs a refusal; its log lines are throttled by `kind`, so words a peer
    /// chooses (a node id's length, a role) cannot make every refusal a line of its own.
    fn refuse_as(&self, counter: &AtomicU64, peer: SocketAddr, kind: &str, why: &str) {
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.throttle.admit(kind) {
            tracing::warn!(service = self.policy.service, %peer, suppressed, "connection refused: {why}");
        }
    }

    /// TLS, then the certificate's identity, which must be of a role this service takes:
    /// the framed stream, the identity and the role its Hello must announce.
    async fn identify(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        acceptor: TlsAcceptor,
    ) -> Option<(Framed<ServerStream, MessageCodec>, Identity, Role)> {
        let _ = tcp.set_nodelay(true);
        keepalive(&tcp);
        let r = &self.refusals;
        let tls = match tokio::time::timeout(
            Duration::from_millis(HANDSHAKE_TIMEOUT_MS),
            acceptor.accept(tcp),
        )
        .await
        {
            Err(_) => {
                self.refuse(&r.timeout, peer, "no TLS handshake in time");
                return None;
            }
            Ok(Err(e)) => {
                self.refuse(&r.tls, peer, &format!("TLS handshake failed: {e}"));
                return None;
            }
            Ok(Ok(s)) => s,
        };
        let identity = peer_identity(tls.get_ref().1);
        let mut framed = Framed::new(tls, MessageCodec::default());
        let identity = match identity {
            Ok(i) => i,
            Err(e) => {
                self.refuse(&r.forbidden, peer, &e.to_string());
                let _ = framed
                    .send(error_frame(ErrorCode::Forbidden, e.to_string()))
                    .await;
                return None;
            }
        };
        let Some(&(_, hello_role)) = self.policy.allowed.iter().find(|a| a.0 == identity.role)
        else {
            let why = format!(
                "{} {} certificate ({identity}) may not connect to the {}",
                article(identity.role.as_str()),
                identity.role,
                self.policy.service
            );
            self.refuse(&r.forbidden, peer, &why);
            let _ = framed.send(error_frame(ErrorCode::Forbidden, why)).await;
            return None;
        };
        Some((framed, identity, hello_role))
    }

    /// TLS, identity, Hello, slot: a [`Peer`] and its slot, or `None` once the refusal is
    /// logged.
    async fn admit(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        acceptor: TlsAcceptor,
    ) -> Option<(Peer, Slot)> {
        let r = &self.refusals;
        let (mut framed, identity, hello_role) = self.identify(tcp, peer, acceptor).await?;
        let first = match tokio::time::timeout(
            Duration::from_millis(HELLO_TIMEOUT_MS),
            framed.next(),
        )
        .await
        {
            Ok(Some(Ok(m))) => m,
            Err(_) => {
                self.refuse(&r.timeout, peer, "no hello in time");
                return None;
            }
            Ok(Some(Err(e))) => {
                self.refuse(&r.tls, peer, &format!("before hello: {e}"));
                return None;
            }
            Ok(None) => return None,
        };
        let (version, hello) = match handshake::accept(first, hello_role, &identity.to_string()) {
            Ok(v) => v,
            Err(refusal) => {
                let (counter, kind) = match refusal {
                    Refusal::Version(_) => (&r.version, "hello: version"),
                    Refusal::Malformed(_) => (&r.forbidden, "hello: malformed"),
                    Refusal::Forbidden(_) => (&r.forbidden, "hello: role"),
                };
                self.refuse_as(counter, peer, kind, refusal.reason());
                let _ = framed.send(refusal.message()).await;
                return None;
            }
        };
        framed.codec_mut().set_version(version);
        let slot = Arc::clone(&self.slots)
            .try_acquire_owned()
            .ok()
            .zip(self.per_identity.take(identity.clone()));
        let Some(slot) = slot else {
            let why = format!(
                "too many connections ({} at most, {} per identity); retry later",
                self.policy.max_connections, self.policy.max_connections_per_identity
            );
            self.refuse(&r.busy, peer, &why);
            let _ = framed.send(error_frame(ErrorCode::Busy, why)).await;
            return None;
        };
        let ours = Message::Hello(handshake::hello(self.policy.our_role, &self.policy.node_id));
        if framed.send(ours).await.is_err() {
            return None;
        }
        Some((
            Peer {
                framed,
                addr: peer,
                identity,
                hello,
                version,
            },
            slot,
        ))
    }
}

/// Accepts connections on `listener` until the process ends; every connection that passes
/// the checks of `policy` is handed to `handler` in its own task. Refusals are counted in
/// `refusals` and logged (rate-limited).
pub fn spawn_server<H, F>(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    policy: ServerPolicy,
    refusals: Arc<Refusals>,
    handler: H,
) where
    H: Fn(Peer) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let gate = Arc::new(Gate {
        handshakes: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
        per_addr: Keyed::new(MAX_HANDSHAKES_PER_ADDR),
        slots: Arc::new(Semaphore::new(policy.max_connections)),
        per_identity: Keyed::new(policy.max_connections_per_identity),
        policy,
        refusals,
        throttle: Throttle::new(Duration::from_secs(5)),
    });
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    if gate.throttle.admit("accept").is_some() {
                        tracing::warn!(service = gate.policy.service, error = %e, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let place = Arc::clone(&gate.handshakes)
                .try_acquire_owned()
                .ok()
                .zip(gate.per_addr.take(source_key(peer.ip())));
            let Some(place) = place else {
                gate.refuse(
                    &gate.refusals.handshake_limit,
                    peer,
                    "too many handshakes in progress",
                );
                continue; // dropped: closed at once
            };
            let (gate, handler, acceptor) =
                (Arc::clone(&gate), Arc::clone(&handler), acceptor.clone());
            tokio::spawn(async move {
                let admitted = gate.admit(tcp, peer, acceptor).await;
                drop(place);
                if let Some((p, slot)) = admitted {
                    tracing::info!(service = gate.policy.service, peer = %p.addr, identity = %p.identity, node = %p.hello.node_id, "peer connected");
                    handler(p).await;
                    drop(slot);
                }
            });
        }
    });
}

/// Seconds a connection may be quiet before the kernel probes its peer. An agent that is
/// alive but idle answers the probes (its kernel does), so its connection stays; one whose
/// machine rebooted or vanished is closed after [`KEEPALIVE_IDLE_S`] +
/// [`KEEPALIVE_RETRIES`] × [`KEEPALIVE_INTERVAL_S`] = 25 s, instead of never (nothing is
/// sent to an idle agent, so TCP alone would keep a half-open connection for ever). The
/// process server lets one connection stream a disk at a time: a restarted agent's new
/// connection waits at most that long for its dead one to go.
pub const KEEPALIVE_IDLE_S: u64 = 10;
/// Seconds between unanswered probes.
pub const KEEPALIVE_INTERVAL_S: u64 = 5;
/// Unanswered probes before the connection is closed.
pub const KEEPALIVE_RETRIES: u32 = 3;

/// Turns TCP keepalive on (see [`KEEPALIVE_IDLE_S`]); a socket that refuses keeps going
/// without it.
fn keepalive(tcp: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(KEEPALIVE_IDLE_S))
        .with_interval(Duration::from_secs(KEEPALIVE_INTERVAL_S))
        .with_retries(KEEPALIVE_RETRIES);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "no TCP keepalive on this connection");
    }
}

/// Where to connect and as whom.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    /// HOST:PORT.
    pub addr: String,
    /// The name the server's certificate must carry.
    pub server_name: String,
    /// Our TLS configuration.
    pub config: Arc<rustls::ClientConfig>,
    /// The role the server's certificate must have.
    pub expect: PeerRole,
    /// Our role in the Hello.
    pub role: Role,
    /// Our node id in the Hello.
    pub node_id: String,
}

/// An established client connection.
#[derive(Debug)]
pub struct Connected {
    /// The framed stream (version negotiated, Hellos exchanged).
    pub framed: Framed<ClientStream, MessageCodec>,
    /// Who the server's certificate says it is.
    pub identity: Identity,
    /// The negotiated protocol version.
    pub version: u16,
}

/// Why a TLS failure happened, in words an operator can act on, and whether it is about
/// the certificates (permanent) or the path (transient).
fn classify(addr: &str, server_name: &str, e: &std::io::Error) -> Error {
    use rustls::{AlertDescription as A, CertificateError as C};
    let tls = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    let (detail, permanent) = match tls {
        Some(rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature)) => (
            "the server's certificate is not signed by our CA (ca.pem): wrong CA file, or another deployment's server".to_owned(),
            true,
        ),
        Some(rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. })) => (
            format!("the server's certificate does not carry the name {server_name:?}: connect by a name it carries (--server-name)"),
            true,
        ),
        Some(rustls::Error::InvalidCertificate(c)) => (
            format!("the server's certificate is not acceptable ({c:?}): check its validity dates and usage"),
            true,
        ),
        Some(rustls::Error::AlertReceived(
            a @ (A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::DecryptError
            | A::AccessDenied
            | A::CertificateRequired),
        )) => (
            format!("the server refused our certificate ({a:?}): is it issued by the deployment's CA, for this role, and still valid?"),
            true,
        ),
        _ => (e.to_string(), false),
    };
    Error::Handshake {
        addr: addr.to_owned(),
        detail,
        permanent,
    }
}

/// TCP, then TLS with the server, whose certificate must be of the role `spec` expects.
async fn tls_to(spec: &ClientSpec) -> Result<(ClientStream, Identity)> {
    let tcp = tokio::time::timeout(
        Duration::from_millis(CONNECT_TIMEOUT_MS),
        TcpStream::connect(&spec.addr),
    )
    .await
    .map_err(|_| Error::Timeout(format!("connect to {}", spec.addr)))?
    .map_err(|e| Error::Io {
        context: format!("connect to {}", spec.addr),
        source: e,
    })?;
    let _ = tcp.set_nodelay(true);
    keepalive(&tcp);
    let name = crate::tls::server_name(&spec.server_name)?;
    let tls = tokio::time::timeout(
        Duration::from_millis(HANDSHAKE_TIMEOUT_MS),
        TlsConnector::from(Arc::clone(&spec.config)).connect(name, tcp),
    )
    .await
    .map_err(|_| Error::Timeout(format!("TLS handshake with {}", spec.addr)))?
    .map_err(|e| classify(&spec.addr, &spec.server_name, &e))?;
    let identity = peer_identity(tls.get_ref().1)?;
    if identity.role != spec.expect {
        return Err(Error::Handshake {
            addr: spec.addr.clone(),
            detail: format!(
                "{} is {identity}, not a {}: check the address",
                spec.addr, spec.expect
            ),
            permanent: true,
        });
    }
    Ok((tls, identity))
}

/// Connects, completes TLS (checking the server's role), exchanges Hellos and negotiates
/// the version, each step under its timeout. An `Error` frame in answer becomes
/// [`Error::Refused`] with its code.
pub async fn connect(spec: &ClientSpec, codec: MessageCodec) -> Result<Connected> {
    let (tls, identity) = tls_to(spec).await?;
    let mut framed = Framed::new(tls, codec);
    framed
        .send(Message::Hello(handshake::hello(spec.role, &spec.node_id)))
        .await
        .map_err(|e| match e {
            wire_protocol::Error::Io(io) => classify(&spec.addr, &spec.server_name, &io),
            e => e.into(),
        })?;
    let reply = tokio::time::timeout(Duration::from_millis(HELLO_TIMEOUT_MS), framed.next())
        .await
        .map_err(|_| Error::Timeout(format!("hello from {}", spec.addr)))?;
    let version = match reply.map(|r| r.map(handshake::answer)) {
        Some(Ok(Answer::Version(v))) => v,
        Some(Ok(Answer::Refused(e))) => {
            return Err(Error::Refused {
                code: e.code,
                message: e.message,
            })
        }
        Some(Ok(Answer::Invalid(detail))) => {
            return Err(Error::Wire(wire_protocol::Error::Invalid {
                field: "handshake",
                detail,
            }))
        }
        Some(Err(wire_protocol::Error::Io(io))) => {
            return Err(classify(&spec.addr, &spec.server_name, &io))
        }
        Some(Err(e)) => return Err(e.into()),
        None => {
            return Err(Error::Io {
                context: format!("hello from {}", spec.addr),
                source: std::io::ErrorKind::UnexpectedEof.into(),
            })
        }
    };
    framed.codec_mut().set_version(version);
    Ok(Connected {
        framed,
        identity,
        version,
    })
}

/// Exponential backoff with full jitter between `min_ms` and `max_ms`, so many clients
/// that lost the same server do not come back in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    min_ms: u64,
    max_ms: u64,
    current_ms: u64,
}

impl Backoff {
    /// A backoff starting at `min_ms`, doubling up to `max_ms`.
    pub fn new(min_ms: u64, max_ms: u64) -> Backoff {
        assert!(
            0 < min_ms && min_ms <= max_ms,
            "a backoff has a positive range"
        );
        Backoff {
            min_ms,
            max_ms,
            current_ms: min_ms,
        }
    }

    /// The next wait: uniformly between half the current step and the step; then doubles it.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.current_ms;
        self.current_ms = (self.current_ms * 2).min(self.max_ms);
        Duration::from_millis(fastrand::u64(step / 2..=step))
    }

    /// Starts again from the shortest wait (after a success).
    pub fn reset(&mut self) {
        self.current_ms = self.min_ms;
    }

    /// The current step, milliseconds.
    pub fn step_ms(&self) -> u64 {
        self.current_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_limits_give_back() {
        let k = Keyed::new(2);
        let a = k.take("x").unwrap();
        let _b = k.take("x").unwrap();
        assert!(k.take("x").is_none());
        assert!(k.take("y").is_some());
        drop(a);
        assert!(k.take("x").is_some());
    }

    #[test]
    fn backoff_is_bounded_and_jittered() {
        let mut b = Backoff::new(100, 1000);
        for _ in 0..20 {
            let d = b.next_delay().as_millis() as u64;
            assert!((50..=1000).contains(&d), "{d}");
        }
        assert_eq!(b.step_ms(), 1000);
        b.reset();
        assert_eq!(b.step_ms(), 100);
    }
}
