//! TLS for the HTTP endpoint (`telemetry.tls_cert_file`, `telemetry.tls_key_file`) and for its
//! client, `uamt ctl --cacert`: rustls with ring as the only cryptography provider. The PEM files
//! are read through [`uamt::fsutil`] (regular files only, bounded) and every refusal names the
//! file and the key or flag that named it.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::Path;
use std::sync::Arc;

/// The largest PEM file taken (a chain of a few certificates, or a key).
const MAX_PEM_BYTES: u64 = 1 << 20;

/// Why a TLS file was refused.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {why}")]
pub struct TlsError {
    /// The config key or flag that names the file.
    pub key: String,
    /// What is wrong, with the path.
    pub why: String,
}

fn refuse(key: &str, path: &Path, why: impl std::fmt::Display) -> TlsError {
    TlsError { key: key.to_string(), why: format!("{}: {why}", path.display()) }
}

/// The cryptography every config here uses.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of the PEM file `path` (named by `key`), at least one.
fn certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = uamt::fsutil::read_regular(path, MAX_PEM_BYTES)
        .map_err(|e| TlsError { key: key.into(), why: e.to_string() })?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| refuse(key, path, format!("not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(refuse(key, path, "holds no `-----BEGIN CERTIFICATE-----` block"));
    }
    Ok(certs)
}

/// The server's TLS settings from `cert` (chain, PEM) and `key` (private key, PEM), named by
/// `cert_key` and `key_key` in errors: a file that is not PEM, holds no certificate or key, or a
/// key that is not the certificate's, is refused. (actix-web adds the `http/1.1` ALPN protocol.)
pub fn server_config(cert_key: &str, cert: &Path, key_key: &str, key: &Path) -> Result<rustls::ServerConfig, TlsError> {
    let chain = certificates(cert_key, cert)?;
    let pem = uamt::fsutil::read_regular(key, MAX_PEM_BYTES)
        .map_err(|e| TlsError { key: key_key.into(), why: e.to_string() })?;
    let private = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        refuse(key_key, key, format!("no private key (PEM `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY`): {e}"))
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| refuse(cert_key, cert, e))?
        .with_no_client_auth();
    builder.with_single_cert(chain, private).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => refuse(
            key_key,
            key,
            format!("this private key does not belong to the certificate in {cert_key} ({})", cert.display()),
        ),
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
            refuse(cert_key, cert, format!("the certificate cannot be used: {e}"))
        }
        other => refuse(key_key, key, format!("the key cannot be used with {}: {other}", cert.display())),
    })
}

/// A client's TLS settings trusting only the certificates in `cacert` (named by `flag`).
pub fn client_config(flag: &str, cacert: &Path) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certificates(flag, cacert)? {
        roots.add(c).map_err(|e| refuse(flag, cacert, format!("not a usable CA certificate: {e}")))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| refuse(flag, cacert, e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The name a client checks the server's certificate against: the host part of `host` (an IP
/// address or a DNS name).
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_string()).map_err(|e| format!("`{host}` is not a host name or address: {e}"))
}
