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

use lb_core::cluster::{Kind, ObjectKey, TLS_CERT_KEY};
use lb_core::model::ingress::{CertificateSource, KeyPair, key_field};
use lb_core::model::kubernetes::Problem;

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

/// Signing keys for the certificates an Ingress translation named. A key that is not
/// usable or does not belong to its certificate is a problem on its Secret (reported once
/// per Secret) and the hosts it was for get the default certificate.
pub fn load(sources: &[CertificateSource]) -> (Vec<Certificate>, Vec<Problem>) {
    let mut keys: std::collections::BTreeMap<&ObjectKey, Option<Arc<CertifiedKey>>> =
        std::collections::BTreeMap::new();
    let mut problems = Vec::new();
    let mut certificates = Vec::new();
    for source in sources {
        let key = keys.entry(&source.secret).or_insert_with(|| {
            signing_key(&source.pair)
                .map_err(|reason| {
                    problems.push(Problem {
                        kind: Kind::Secret,
                        object: source.secret.clone(),
                        field: key_field(),
                        reason,
                    });
                })
                .ok()
        });
        if let Some(key) = key {
            certificates.push(Certificate {
                hosts: source.hosts.clone(),
                secret: source.secret.clone(),
                key: Arc::clone(key),
            });
        }
    }
    (certificates, problems)
}

/// A rustls certified key from a parsed Secret, checked to belong to the leaf, so a
/// mismatched pair is reported instead of failing handshakes.
pub fn signing_key(pair: &KeyPair) -> Result<Arc<CertifiedKey>, String> {
    let signer = rustls::crypto::ring::sign::any_supported_type(&pair.key)
        .map_err(|e| format!("unusable private key: {e}"))?;
    let certified = CertifiedKey::new(pair.chain.clone(), signer);
    certified
        .keys_match()
        .map_err(|e| format!("does not belong to the certificate in {TLS_CERT_KEY}: {e}"))?;
    Ok(Arc::new(certified))
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
    use lb_core::cluster::ObjectKey;

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

    fn fixture_secrets() -> Vec<k8s_openapi::api::core::v1::Secret> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../lb-core/tests/fixtures/kubernetes/tls-secrets.yaml");
        let text = std::fs::read_to_string(&path).expect("tls-secrets.yaml");
        // `kubectl get -o yaml` prints `kind: List`, which k8s-openapi's typed list refuses.
        let list: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
        list["items"]
            .as_sequence()
            .expect("a kubectl List")
            .iter()
            .map(|item| serde_yaml::from_value(item.clone()).expect("a Secret"))
            .collect()
    }

    fn source(secret: &str, pair: KeyPair) -> CertificateSource {
        CertificateSource {
            hosts: vec!["shop.example.com".into()],
            secret: ObjectKey::new("shop", secret),
            pair: Arc::new(pair),
        }
    }

    /// SEC1 and PKCS#1 keys (as openssl writes them by default or with -traditional)
    /// make signing keys like PKCS#8 ones; a certificate with the other Secret's key is
    /// refused, once per Secret, as a problem on its `tls.key`.
    #[test]
    fn sec1_and_pkcs1_keys_load_and_a_swapped_key_is_refused() {
        let secrets = fixture_secrets();
        assert_eq!(secrets.len(), 2);
        let pairs: Vec<KeyPair> = secrets
            .iter()
            .map(|s| lb_core::model::ingress::key_pair(s).expect("parses"))
            .collect();
        for pair in &pairs {
            assert_eq!(signing_key(pair).expect("usable").cert.len(), 1);
        }
        let swapped = KeyPair {
            chain: pairs[0].chain.clone(),
            key: pairs[1].key.clone_key(),
        };
        let e = signing_key(&swapped).expect_err("an RSA key for an EC certificate");
        assert!(e.starts_with("does not belong"), "{e}");

        // Two spec.tls entries naming the same bad Secret: one problem.
        let bad = source("shop-tls", swapped);
        let good = source(
            "sec1-tls",
            KeyPair {
                chain: pairs[0].chain.clone(),
                key: pairs[0].key.clone_key(),
            },
        );
        let (certs, problems) = load(&[bad.clone(), good, bad]);
        assert_eq!(certs.len(), 1);
        assert_eq!(certs[0].secret.to_string(), "shop/sec1-tls");
        let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(
            problems[0].starts_with(
                "Secret shop/shop-tls: data[tls.key]: does not belong to the certificate in tls.crt"
            ),
            "{problems:#?}"
        );
    }

    #[test]
    fn a_key_that_is_pem_but_no_key_is_unusable() {
        let pem = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        let key = {
            use rustls_pki_types::pem::PemObject as _;
            rustls_pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes()).expect("PEM")
        };
        let cert = rcgen::generate_simple_self_signed(vec!["a.test".to_owned()]).unwrap();
        let pair = KeyPair {
            chain: vec![cert.cert.der().clone()],
            key,
        };
        let e = signing_key(&pair).expect_err("not a key");
        assert!(e.starts_with("unusable private key"), "{e}");
    }
}
