//! TLS to backends (`backend-protocol: HTTPS` or `GRPCS`, with ingress-nginx's
//! `proxy-ssl-*` settings): one rustls client configuration per distinct
//! [`UpstreamTls`] and HTTP version, built on first use and kept across snapshots, so
//! a rebuilt route table reuses both the configuration and its session cache.
//!
//! `proxy-ssl-verify: off` (the default, as in ingress-nginx) accepts any certificate,
//! but the handshake's signatures are still checked, so the connection is encrypted to
//! whoever holds the presented key; `on` checks the chain against the Secret's
//! `ca.crt` and the name (`proxy-ssl-name`, else the Service's DNS name).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, WebPkiServerVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::routes::{UpstreamProtocol, UpstreamTls};

/// Distinct configurations kept; beyond this the cache starts over (it only grows
/// when Secrets or annotations change).
const MAX_CONFIGS: usize = 1024;

/// The client configurations in use, by settings and HTTP version.
#[derive(Debug, Default)]
pub struct Connectors {
    configs: Mutex<HashMap<(u64, UpstreamProtocol), Arc<ClientConfig>>>,
}

impl Connectors {
    /// The configuration for `tls` speaking `protocol` (ALPN `h2` or `http/1.1`).
    pub fn config(
        &self,
        tls: &UpstreamTls,
        protocol: UpstreamProtocol,
    ) -> Result<Arc<ClientConfig>, rustls::Error> {
        let key = (tls.digest(), protocol);
        let mut configs = self.configs.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(config) = configs.get(&key) {
            return Ok(Arc::clone(config));
        }
        let config = Arc::new(client_config(tls, protocol)?);
        if configs.len() >= MAX_CONFIGS {
            configs.clear();
        }
        configs.insert(key, Arc::clone(&config));
        Ok(config)
    }
}

/// The server name a backend connection verifies (and sends as SNI when asked).
pub fn server_name(tls: &UpstreamTls) -> Result<ServerName<'static>, rustls::Error> {
    ServerName::try_from(tls.name.clone()).map_err(|_| {
        rustls::Error::General(format!("{:?} is not a DNS name or IP address", tls.name))
    })
}

/// A rustls client configuration for `tls`: ring, TLS 1.2 and 1.3.
pub fn client_config(
    tls: &UpstreamTls,
    protocol: UpstreamProtocol,
) -> Result<ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = if tls.verify {
        let mut roots = RootCertStore::empty();
        for ca in &tls.ca {
            roots.add(ca.clone())?;
        }
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()
            .map_err(|e| rustls::Error::General(format!("backend CA: {e}")))?
    } else {
        Arc::new(SignaturesOnly::new(Arc::clone(&provider)))
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match &tls.client {
        Some(pair) => builder.with_client_auth_cert(pair.chain.clone(), pair.key.clone_key())?,
        None => builder.with_no_client_auth(),
    };
    config.enable_sni = tls.sni;
    config.alpn_protocols = match protocol {
        UpstreamProtocol::Http1 => vec![b"http/1.1".to_vec()],
        UpstreamProtocol::H2c => vec![b"h2".to_vec()],
    };
    Ok(config)
}

/// `proxy-ssl-verify: off`: any certificate is accepted (nginx's default), the
/// handshake signatures are verified. The proxy tests' clients use it too.
#[derive(Debug)]
pub(crate) struct SignaturesOnly(Arc<CryptoProvider>);

impl SignaturesOnly {
    pub(crate) fn new(provider: Arc<CryptoProvider>) -> SignaturesOnly {
        SignaturesOnly(provider)
    }
}

impl ServerCertVerifier for SignaturesOnly {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
