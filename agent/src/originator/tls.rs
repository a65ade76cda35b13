//! The rustls client configuration of a service that originates TLS: which roots a
//! backend's certificate must chain to, and the server name it must carry.
//!
//! Invariants: every configuration uses rustls' ring provider with its safe default
//! protocol versions (TLS 1.2 and 1.3) and full certificate verification (chain and
//! name); there is no switch that skips it. The node's system roots are read once
//! (`rustls-native-certs`, which honours `SSL_CERT_FILE` and `SSL_CERT_DIR`); a CA
//! file is read each time a service that names it is applied, so a rotated file takes
//! effect at the next reload.

use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

use crate::config::TlsOrigination;

/// The largest CA file read: a bundle of every public root is about 200 KB.
const MAX_CA_FILE_BYTES: u64 = 4 << 20;

/// The client configuration for `tls`: roots from its CA file, or the system's.
pub fn client_config(tls: &TlsOrigination) -> Result<Arc<ClientConfig>> {
    let roots = match &tls.ca_certificates {
        Some(path) => Arc::new(roots_from_file(path)?),
        None => system_roots()?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("rustls refused its own default protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The name a backend at `target` is asked for and checked against: `sni` when the
/// service sets it, else the DNS name the endpoint came from, else its IP address.
pub fn server_name(
    sni: Option<&str>,
    hostname: Option<&str>,
    target: SocketAddr,
) -> ServerName<'static> {
    sni.or(hostname)
        .and_then(|name| ServerName::try_from(name.to_owned()).ok())
        .unwrap_or_else(|| ServerName::IpAddress(target.ip().into()))
}

fn roots_from_file(path: &Path) -> Result<RootCertStore> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("tls.caCertificates {}", path.display()))?;
    let mut pem = Vec::new();
    file.take(MAX_CA_FILE_BYTES + 1)
        .read_to_end(&mut pem)
        .with_context(|| format!("tls.caCertificates {}", path.display()))?;
    if pem.len() as u64 > MAX_CA_FILE_BYTES {
        bail!(
            "tls.caCertificates {}: more than {MAX_CA_FILE_BYTES} bytes",
            path.display()
        );
    }
    let mut roots = RootCertStore::empty();
    for (index, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        let cert = cert.with_context(|| {
            format!(
                "tls.caCertificates {}: certificate {} is not valid PEM",
                path.display(),
                index + 1
            )
        })?;
        roots.add(cert).with_context(|| {
            format!(
                "tls.caCertificates {}: certificate {} is not a usable CA certificate",
                path.display(),
                index + 1
            )
        })?;
    }
    if roots.is_empty() {
        bail!(
            "tls.caCertificates {}: no certificate in it",
            path.display()
        );
    }
    Ok(roots)
}

/// The node's trusted roots, read once.
fn system_roots() -> Result<Arc<RootCertStore>> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
                return Err(format!(
                    "no system root certificate could be read ({}); set tls.caCertificates",
                    if errors.is_empty() {
                        "none found".to_owned()
                    } else {
                        errors.join("; ")
                    }
                ));
            }
            Ok(Arc::new(roots))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_is_sni_then_hostname_then_address() {
        let target: SocketAddr = "10.0.0.7:443".parse().unwrap();
        let name = |sni, host| server_name(sni, host, target).to_str().into_owned();
        assert_eq!(name(Some("db.example"), Some("east.db")), "db.example");
        assert_eq!(name(None, Some("east.db")), "east.db");
        assert_eq!(name(None, None), "10.0.0.7");
    }

    #[test]
    fn a_ca_file_must_hold_certificates() {
        let dir = std::env::temp_dir().join(format!("detour-ca-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let tls = |path: &Path| TlsOrigination {
            sni: None,
            ca_certificates: Some(path.to_path_buf()),
        };
        let error = client_config(&tls(&empty)).unwrap_err().to_string();
        assert!(error.contains("no certificate in it"), "{error}");
        let missing = client_config(&tls(&dir.join("missing.pem")))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("missing.pem"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
