//! Mutual TLS with one certificate per identity: configurations, the identity a peer's
//! certificate proves, and issuing certificates from the deployment's CA.
//!
//! # Identities
//! Every certificate names exactly one identity as a SAN URI, `failback://ROLE/NAME`, and
//! says what it may do with its extended key usages:
//!
//! | role | URI | EKU | held by |
//! |---|---|---|---|
//! | agent | `failback://agent/VM` | clientAuth | the agent of VM `VM` (all its disks) |
//! | process-server | `failback://process-server/NAME` | serverAuth, clientAuth | a process server (it serves agents and is a client of master targets) |
//! | master-target | `failback://master-target/NAME` | serverAuth | a master target |
//! | operator | `failback://operator/NAME` | clientAuth | an operator's tools (detach) |
//!
//! A server certificate of a master target is refused as a client certificate by the TLS
//! layer itself (no clientAuth). Past the handshake each service checks the role, and the
//! process server checks every disk an agent names against the VM in its certificate.
//!
//! # Files
//! ```text
//! CA_DIR/ca.pem  CA_DIR/ca.key      the deployment's CA (keep ca.key offline)
//! OUT/ca.pem                        a copy of the CA certificate, for the host's trust
//! OUT/ROLE.pem   OUT/ROLE.key       one identity (agent.pem, process-server.pem, ...)
//! ```
//! TLS 1.3 only, with the ring provider (it builds faster here and is no slower).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::error::{Error, Result};

/// The scheme of identity URIs in certificates.
pub const IDENTITY_SCHEME: &str = "failback://";
/// Days a CA certificate is valid by default (rotate the CA well before).
pub const CA_VALIDITY_DAYS: u32 = 3650;
/// Days an identity certificate is valid by default (rotate yearly; see SECURITY.md).
pub const LEAF_VALIDITY_DAYS: u32 = 397;

/// What an identity may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerRole {
    /// The agent of one VM.
    Agent,
    /// A process server.
    ProcessServer,
    /// A master target.
    MasterTarget,
    /// An operator.
    Operator,
}

impl PeerRole {
    /// Every role, in the order of the table above.
    pub const ALL: [PeerRole; 4] = [
        PeerRole::Agent,
        PeerRole::ProcessServer,
        PeerRole::MasterTarget,
        PeerRole::Operator,
    ];

    /// The role's name in URIs, file names and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerRole::Agent => "agent",
            PeerRole::ProcessServer => "process-server",
            PeerRole::MasterTarget => "master-target",
            PeerRole::Operator => "operator",
        }
    }

    /// The role named `s`.
    pub fn parse(s: &str) -> Option<PeerRole> {
        PeerRole::ALL.into_iter().find(|r| r.as_str() == s)
    }

    fn serves(self) -> bool {
        matches!(self, PeerRole::ProcessServer | PeerRole::MasterTarget)
    }

    fn connects(self) -> bool {
        !matches!(self, PeerRole::MasterTarget)
    }
}

impl std::fmt::Display for PeerRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The role.
    pub role: PeerRole,
    /// The VM (for agents) or the host's name.
    pub name: String,
}

impl Identity {
    /// The certificate's identity URI.
    pub fn uri(&self) -> String {
        format!("{IDENTITY_SCHEME}{}/{}", self.role, self.name)
    }

    /// Parses `failback://ROLE/NAME`.
    pub fn from_uri(uri: &str) -> Option<Identity> {
        let (role, name) = uri.strip_prefix(IDENTITY_SCHEME)?.split_once('/')?;
        wire_protocol::message::validate_name("identity name", name).ok()?;
        Some(Identity {
            role: PeerRole::parse(role)?,
            name: name.to_owned(),
        })
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.role, self.name)
    }
}

/// The identity in a peer's leaf certificate (DER): exactly one `failback://` SAN URI.
pub fn identity_of(cert: &[u8]) -> Result<Identity> {
    let no_identity = |why: &str| {
        Error::Tls(format!(
            "the certificate {why}; issue one per identity with `failback certs --role ...`"
        ))
    };
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|_| no_identity("cannot be parsed"))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|_| no_identity("has a malformed subject alternative name"))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|g| match g {
            x509_parser::extensions::GeneralName::URI(u) if u.starts_with(IDENTITY_SCHEME) => {
                Some(*u)
            }
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => Identity::from_uri(one)
            .ok_or_else(|| no_identity(&format!("names an invalid identity {one:?}"))),
        [] => Err(no_identity(
            "names no failback identity (an old shared certificate?)",
        )),
        _ => Err(no_identity("names more than one failback identity")),
    }
}

/// The identity a PEM certificate file names (this endpoint's own, to check it before use).
pub fn identity_of_file(path: &Path) -> Result<Identity> {
    identity_of(
        read_certs(path)?
            .first()
            .expect("read_certs never returns none"),
    )
    .map_err(|e| Error::Tls(format!("{}: {e}", path.display())))
}

/// The identity of the peer of an established TLS connection.
pub fn peer_identity(conn: &rustls::CommonState) -> Result<Identity> {
    let certs = conn
        .peer_certificates()
        .ok_or_else(|| Error::Tls("the peer presented no certificate".into()))?;
    identity_of(certs.first().expect("rustls never reports an empty chain"))
}

/// Paths of the PEM files one endpoint needs.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that signs every peer's certificate.
    pub ca: PathBuf,
    /// This endpoint's certificate.
    pub cert: PathBuf,
    /// This endpoint's private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files of `role` in a directory laid out by [`issue`]: `ca.pem`, `ROLE.pem`,
    /// `ROLE.key`.
    pub fn of_role(dir: &Path, role: PeerRole) -> Self {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{role}.pem")),
            key: dir.join(format!("{role}.key")),
        }
    }

    /// Checks that the three files exist and load, naming the one that does not.
    pub fn check(&self) -> Result<()> {
        roots(&self.ca)?;
        read_certs(&self.cert)?;
        read_key(&self.key)?;
        Ok(())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let open_err = |e: &dyn std::fmt::Display| {
        Error::Tls(format!(
            "{}: {e} (certificates are made with `failback certs`; check the directory named)",
            path.display()
        ))
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| open_err(&e))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| open_err(&e))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{}: no certificate in the file",
            path.display()
        )));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        Error::Tls(format!(
            "{}: no usable private key ({e}); is this the .key file?",
            path.display()
        ))
    })
}

fn roots(ca: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in read_certs(ca)? {
        roots.add(c)?;
    }
    Ok(roots)
}

/// A server config that requires a client certificate signed by `files.ca` (with the
/// clientAuth usage, so server certificates are refused as clients).
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&files.ca)?), provider())
            .build()
            .map_err(|e| Error::Tls(e.to_string()))?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_certs(&files.cert)?, read_key(&files.key)?)?;
    Ok(Arc::new(cfg))
}

/// A client config that presents `files.cert` and trusts servers signed by `files.ca`.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(&files.ca)?)
        .with_client_auth_cert(read_certs(&files.cert)?, read_key(&files.key)?)?;
    Ok(Arc::new(cfg))
}

/// The name a client expects in the server's certificate.
pub fn server_name(name: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(name.to_owned())
        .map_err(|e| Error::Tls(format!("server name {name:?}: {e}")))
}

fn refuse_existing(files: &[PathBuf]) -> Result<()> {
    match files.iter().find(|f| f.exists()) {
        Some(f) => Err(Error::Tls(format!(
            "{} exists already; choose another directory or remove the old files first",
            f.display()
        ))),
        None => Ok(()),
    }
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // A day of slack before now: clocks across sites are rarely exact.
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

/// Makes the deployment's CA in `dir` (`ca.pem`, `ca.key`). Existing files are never
/// overwritten: a deployment's CA is not replaced by accident.
pub fn make_ca(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    refuse_existing(&[cert_path.clone(), key_path.clone()])?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    // A name of its own: two deployments' CAs never look alike to a verifier.
    params.distinguished_name.push(
        DnType::CommonName,
        format!("failback CA {:016x}", fastrand::u64(..)),
    );
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, CA_VALIDITY_DAYS);
    let ca = params.self_signed(&key)?;
    write_private(&key_path, &key.serialize_pem())?;
    write_public(&cert_path, &ca.pem())?;
    Ok(())
}

/// What to issue.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// The identity.
    pub identity: Identity,
    /// DNS names or IP addresses a server is reached by (servers only).
    pub server_names: Vec<String>,
    /// Days of validity.
    pub days: u32,
}

/// Issues a certificate for one identity, signed by the CA in `ca_dir`, into `out`
/// (`ROLE.pem`, `ROLE.key`, and `ca.pem` unless `out` is the CA's directory). Returns the
/// paths written. Existing identity files are never overwritten.
pub fn issue(ca_dir: &Path, req: &IssueRequest, out: &Path) -> Result<Vec<PathBuf>> {
    let role = req.identity.role;
    wire_protocol::message::validate_name("identity name", &req.identity.name)
        .map_err(|e| Error::Tls(e.to_string()))?;
    if !role.serves() && !req.server_names.is_empty() {
        return Err(Error::Tls(format!(
            "{role} certificates are client certificates: they take no server names"
        )));
    }
    if role.serves() && req.server_names.is_empty() {
        return Err(Error::Tls(format!(
            "a {role} certificate needs the names (DNS or IP) its peers reach it by: give --dns"
        )));
    }
    let ca_pem = fs::read_to_string(ca_dir.join("ca.pem")).map_err(|e| {
        Error::Tls(format!(
            "{}: {e} (make the CA first: failback certs --out {})",
            ca_dir.join("ca.pem").display(),
            ca_dir.display()
        ))
    })?;
    let ca_key_pem = fs::read_to_string(ca_dir.join("ca.key")).map_err(|e| {
        Error::Tls(format!(
            "{}: {e} (issuing needs the CA's key)",
            ca_dir.join("ca.key").display()
        ))
    })?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    let ca = CertificateParams::from_ca_cert_pem(&ca_pem)?.self_signed(&ca_key)?;

    fs::create_dir_all(out)?;
    let files = TlsFiles::of_role(out, role);
    let copy_ca = fs::canonicalize(out).ok() != fs::canonicalize(ca_dir).ok();
    let mut written = vec![files.cert.clone(), files.key.clone()];
    if copy_ca {
        written.push(files.ca.clone());
    }
    refuse_existing(&written)?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(req.server_names.clone())?;
    let uri = req.identity.uri();
    params.subject_alt_names.push(SanType::URI(
        uri.clone()
            .try_into()
            .map_err(|_| Error::Tls(format!("{uri:?} is not an IA5 string")))?,
    ));
    params.distinguished_name.push(DnType::CommonName, &uri);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = Vec::new();
    if role.serves() {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    if role.connects() {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ClientAuth);
    }
    validity(&mut params, req.days);
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    write_private(&files.key, &key.serialize_pem())?;
    write_public(&files.cert, &cert.pem())?;
    if copy_ca {
        write_public(&files.ca, &ca_pem)?;
    }
    Ok(written)
}

/// Writes a key file readable by its owner only.
fn write_private(path: &Path, contents: &str) -> Result<()> {
    write_new(path, contents, 0o600)
}

fn write_public(path: &Path, contents: &str) -> Result<()> {
    write_new(path, contents, 0o644)
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::Tls(format!("create {}: {e}", path.display())))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// Makes a CA and one identity of every role into `dir` (agents in `dir/agents/VM/` for
/// each of `vms`): the layout the demo and the tests use.
pub fn make_test_pki(dir: &Path, server_names: &[String], vms: &[String]) -> Result<()> {
    make_ca(dir)?;
    let names = server_names.to_vec();
    for (role, names) in [
        (PeerRole::ProcessServer, names.clone()),
        (PeerRole::MasterTarget, names),
        (PeerRole::Operator, Vec::new()),
    ] {
        issue(
            dir,
            &IssueRequest {
                identity: Identity {
                    role,
                    name: role.as_str().to_owned(),
                },
                server_names: names,
                days: LEAF_VALIDITY_DAYS,
            },
            dir,
        )?;
    }
    for vm in vms {
        issue_agent(dir, vm)?;
    }
    Ok(())
}

/// Issues an agent certificate for `vm` into `ca_dir/agents/VM/` (tests and the demo).
pub fn issue_agent(ca_dir: &Path, vm: &str) -> Result<PathBuf> {
    let out = ca_dir.join("agents").join(vm);
    issue(
        ca_dir,
        &IssueRequest {
            identity: Identity {
                role: PeerRole::Agent,
                name: vm.to_owned(),
            },
            server_names: Vec::new(),
            days: LEAF_VALIDITY_DAYS,
        },
        &out,
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip_and_refuse_bad_names() {
        let id = Identity {
            role: PeerRole::Agent,
            name: "vm-01".into(),
        };
        assert_eq!(Identity::from_uri(&id.uri()), Some(id));
        for bad in [
            "failback://agent/../x",
            "failback://agent/a/b",
            "failback://agent/",
            "failback://king/vm1",
            "https://agent/vm1",
        ] {
            assert_eq!(Identity::from_uri(bad), None, "{bad}");
        }
    }

    #[test]
    fn issued_certificates_carry_their_identity() {
        let dir = tempfile::tempdir().unwrap();
        make_test_pki(dir.path(), &["localhost".into()], &["vm1".into()]).unwrap();
        let pem = |p: PathBuf| read_certs(&p).unwrap().remove(0);
        let agent = pem(dir.path().join("agents/vm1/agent.pem"));
        assert_eq!(
            identity_of(&agent).unwrap(),
            Identity {
                role: PeerRole::Agent,
                name: "vm1".into()
            }
        );
        let mt = pem(dir.path().join("master-target.pem"));
        assert_eq!(identity_of(&mt).unwrap().role, PeerRole::MasterTarget);
        assert!(dir.path().join("agents/vm1/ca.pem").exists());
        assert!(
            issue_agent(dir.path(), "vm1").is_err(),
            "identity files are never overwritten"
        );
        assert!(make_ca(dir.path()).is_err(), "a CA is never replaced");
    }
}
