//! Each simulated cluster's own keys: a CA, the API server's serving certificate, the
//! service-account signing key pair and an admin bearer token.
//!
//! Invariant: nothing is shared between clusters — every call generates fresh keys, so
//! one cluster's CA never verifies another's server and one's token is unknown to the
//! other. The serving certificate names 127.0.0.1 (an IP SAN: clients dial the address)
//! and the in-cluster names of the `kubernetes` Service.

use std::io::Read;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// PEM-encoded material for one cluster.
pub(crate) struct Pki {
    pub ca_cert: String,
    pub serving_cert: String,
    pub serving_key: String,
    pub service_account_key: String,
    pub service_account_pub: String,
    /// The admin's bearer token (group `system:masters`).
    pub admin_token: String,
}

/// Names the serving certificate carries besides 127.0.0.1.
const SERVING_NAMES: &[&str] = &[
    "127.0.0.1",
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
];

/// Generates fresh material for the cluster `name` (the name only goes into subjects).
pub(crate) fn generate(name: &str) -> Result<Pki> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("detour-test {name} CA"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let mut serving_params = CertificateParams::new(
        SERVING_NAMES
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
    )?;
    serving_params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    serving_params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    serving_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_key = KeyPair::generate().context("generating the serving key")?;
    let serving_cert =
        serving_params.signed_by(&serving_key, &Issuer::from_params(&ca_params, &ca_key))?;

    let sa_key = KeyPair::generate().context("generating the service-account key")?;
    Ok(Pki {
        ca_cert: ca_cert.pem(),
        serving_cert: serving_cert.pem(),
        serving_key: serving_key.serialize_pem(),
        service_account_key: sa_key.serialize_pem(),
        service_account_pub: sa_key.public_key_pem(),
        admin_token: random_token()?,
    })
}

/// 128 random bits as 32 hex digits.
fn random_token() -> Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for a token")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cluster_gets_its_own_keys() {
        let (a, b) = (generate("a").unwrap(), generate("b").unwrap());
        assert_ne!(a.ca_cert, b.ca_cert);
        assert_ne!(a.admin_token, b.admin_token);
        assert_ne!(a.service_account_key, b.service_account_key);
        assert_eq!(a.admin_token.len(), 32);
        assert!(a.ca_cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(a.serving_key.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(a
            .service_account_pub
            .starts_with("-----BEGIN PUBLIC KEY-----"));
    }
}
