//! Mutual TLS: rustls configurations from PEM files, and certificate generation.
//!
//! Both ends authenticate: the server requires a client certificate signed by the configured
//! CA, and the client checks the server's certificate against the same CA. TLS 1.3 only,
//! with the ring provider (it builds faster here and is no slower than aws-lc-rs).
//!
//! Files written by [`generate`] (and expected by the services by default):
//! ```text
//! DIR/ca.pem  DIR/ca.key          the deployment's CA (keep ca.key offline)
//! DIR/server.pem  DIR/server.key  for process-server and master-target listeners
//! DIR/client.pem  DIR/client.key  for agents and the process server's link to the master target
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::{Error, Result};

/// Paths of the PEM files one endpoint needs.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that signs every peer's certificate.
    pub ca: PathBuf,
    /// This endpoint's certificate chain.
    pub cert: PathBuf,
    /// This endpoint's private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The server files in a directory made by [`generate`].
    pub fn server_in(dir: &Path) -> Self {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        }
    }
    /// The client files in a directory made by [`generate`].
    pub fn client_in(dir: &Path) -> Self {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("client.pem"),
            key: dir.join("client.key"),
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?;
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

/// A server config that requires a client certificate signed by `files.ca`.
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

/// Generates a CA and a server and a client certificate signed by it into `dir`.
///
/// `server_names` are the DNS names or IP addresses the servers are reached by; the server
/// certificate carries all of them. Keys are ECDSA P-256. Existing files are not overwritten:
/// the call fails instead, so a deployment's CA is never replaced by accident.
pub fn generate(dir: &Path, server_names: &[String]) -> Result<()> {
    fs::create_dir_all(dir)?;
    for f in [
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "client.pem",
        "client.key",
    ] {
        if dir.join(f).exists() {
            return Err(Error::Tls(format!(
                "{} exists already; choose an empty directory or remove the old files first",
                dir.join(f).display()
            )));
        }
    }
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "failback CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key)?;

    let leaf = |cn: &str, names: Vec<String>| -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (server_pem, server_key) = leaf("failback server", server_names.to_vec())?;
    let (client_pem, client_key) = leaf("failback client", vec!["failback-client".into()])?;
    write_private(&dir.join("ca.key"), &ca_key.serialize_pem())?;
    fs::write(dir.join("ca.pem"), ca.pem())?;
    fs::write(dir.join("server.pem"), server_pem)?;
    write_private(&dir.join("server.key"), &server_key)?;
    fs::write(dir.join("client.pem"), client_pem)?;
    write_private(&dir.join("client.key"), &client_key)?;
    Ok(())
}

/// Writes a key file readable by its owner only.
fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}
