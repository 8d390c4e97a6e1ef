//! TLS termination: certificates chosen per handshake by SNI from the current snapshot,
//! so a new snapshot (a changed Secret) takes effect on the next handshake without a
//! restart. Choice order: a `spec.tls` host equal to the SNI name, then a wildcard
//! host (`*.example.com`, one label), then certificates whose Ingress lists no hosts by
//! their own SAN names, then the default certificate (also for clients without SNI).

use std::sync::Arc;

use anyhow::{Context as _, Result};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::sync::watch;

use super::{Certificate, Snapshot};

/// The common name of the generated default certificate (the role of ingress-nginx's
/// "Kubernetes Ingress Controller Fake Certificate").
pub const DEFAULT_CERT_CN: &str = "xlb default certificate";

#[derive(Debug)]
pub struct CertResolver {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    default: Arc<CertifiedKey>,
}

impl CertResolver {
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>, default: Arc<CertifiedKey>) -> Self {
        CertResolver { snapshots, default }
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let snapshot = Arc::clone(&self.snapshots.borrow());
        let chosen = hello
            .server_name()
            .and_then(|sni| choose(&snapshot.certificates, &sni.to_ascii_lowercase()));
        Some(chosen.unwrap_or_else(|| Arc::clone(&self.default)))
    }
}

/// The certificate for SNI name `sni` (lower case), if any is meant for it.
pub fn choose(certs: &[Certificate], sni: &str) -> Option<Arc<CertifiedKey>> {
    let listed = |pred: &dyn Fn(&str) -> bool| {
        certs
            .iter()
            .find(|c| c.hosts.iter().any(|h| pred(&h.to_ascii_lowercase())))
            .map(|c| Arc::clone(&c.key))
    };
    listed(&|h| h == sni)
        .or_else(|| {
            listed(&|h| {
                h.strip_prefix('*').is_some_and(|suffix| {
                    suffix.starts_with('.')
                        && sni
                            .strip_suffix(suffix)
                            .is_some_and(|label| !label.is_empty() && !label.contains('.'))
                })
            })
        })
        .or_else(|| {
            let name = ServerName::try_from(sni).ok()?;
            certs
                .iter()
                .filter(|c| c.hosts.is_empty())
                .find(|c| san_matches(&c.key, &name))
                .map(|c| Arc::clone(&c.key))
        })
}

fn san_matches(key: &CertifiedKey, name: &ServerName<'_>) -> bool {
    key.end_entity_cert()
        .ok()
        .and_then(|der| webpki::EndEntityCert::try_from(der).ok())
        .is_some_and(|cert| cert.verify_is_valid_for_subject_name(name).is_ok())
}

/// A self-signed certificate for unknown SNI names, generated at start.
pub fn self_signed_default() -> Result<Arc<CertifiedKey>> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .context("default certificate parameters")?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, DEFAULT_CERT_CN);
    let key = rcgen::KeyPair::generate().context("default certificate key")?;
    let cert = params
        .self_signed(&key)
        .context("self-sign default certificate")?;
    certified_key(cert.der().clone(), &key.serialize_der())
}

/// A rustls certificate from a DER chain head and a PKCS#8 key.
pub fn certified_key(
    cert: rustls_pki_types::CertificateDer<'static>,
    pkcs8: &[u8],
) -> Result<Arc<CertifiedKey>> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.to_vec()));
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&key).context("unsupported private key")?;
    Ok(Arc::new(CertifiedKey::new(vec![cert], signing)))
}

/// Server configuration for the HTTPS listener: ring, TLS 1.2 and 1.3, ALPN h2 then
/// http/1.1.
pub fn server_config(resolver: CertResolver) -> Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::cluster::ObjectKey;

    pub fn cert(names: &[&str], hosts: &[&str]) -> Certificate {
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let c = rcgen::generate_simple_self_signed(names).unwrap();
        Certificate {
            hosts: hosts.iter().map(|s| (*s).to_owned()).collect(),
            secret: ObjectKey {
                namespace: "default".into(),
                name: "tls".into(),
            },
            key: certified_key(c.cert.der().clone(), &c.signing_key.serialize_der()).unwrap(),
        }
    }

    #[test]
    fn exact_then_wildcard_then_san() {
        let exact = cert(&["a.example.com"], &["a.example.com"]);
        let wild = cert(&["*.example.com"], &["*.example.com"]);
        let san = cert(&["b.example.org"], &[]);
        let certs = vec![wild.clone(), exact.clone(), san.clone()];
        let is = |sni: &str, c: &Certificate| {
            choose(&certs, sni).is_some_and(|k| Arc::ptr_eq(&k, &c.key))
        };
        assert!(is("a.example.com", &exact));
        assert!(is("z.example.com", &wild));
        assert!(choose(&certs, "x.z.example.com").is_none());
        assert!(is("b.example.org", &san));
        assert!(choose(&certs, "c.example.org").is_none());
    }
}
