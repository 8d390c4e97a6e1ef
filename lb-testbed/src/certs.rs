//! A certificate authority for TLS tests: leaf certificates for given host names,
//! signed by one CA whose certificate clients trust (curl `--cacert`, rustls roots),
//! so a test that completes a verified handshake knows which certificate was served.

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

pub struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

/// A leaf certificate and its private key, PEM encoded (as a kubernetes.io/tls Secret
/// holds them in `tls.crt` and `tls.key`).
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> anyhow::Result<TestCa> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().context("CA key")?;
        let pem = params.self_signed(&key).context("CA certificate")?.pem();
        Ok(TestCa { params, key, pem })
    }

    /// The CA certificate clients trust.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A leaf certificate valid for `hosts` (DNS names, `*.example.com` allowed).
    pub fn issue(&self, hosts: &[&str]) -> anyhow::Result<IssuedCert> {
        let mut params =
            CertificateParams::new(hosts.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>())?;
        params.distinguished_name.push(
            DnType::CommonName,
            hosts.first().copied().unwrap_or("xlb test"),
        );
        let key = KeyPair::generate().context("leaf key")?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).context("signing")?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}
