//! A `kubernetes.io/tls` Secret to its certificate chain and private key: `tls.crt` a PEM
//! chain (leaf first), `tls.key` a PEM private key (PKCS#8, PKCS#1 or SEC1). Parsing only:
//! whether the key is usable and belongs to the leaf is checked where the signing key is
//! made (the L7 hop's `tls` module), which needs a crypto provider this crate does not link.

use k8s_openapi::api::core::v1::Secret;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::cluster::{
    CA_CERT_KEY, TLS_CERT_KEY, TLS_PRIVATE_KEY_KEY, TLS_SECRET_TYPE, secret_data,
};
use crate::quote::quoted;

/// Why a Secret gives no certificate: the field and the reason.
#[derive(Debug, Clone)]
pub struct SecretError {
    pub field: String,
    pub reason: String,
}

fn error(field: impl Into<String>, reason: impl Into<String>) -> SecretError {
    SecretError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A certificate chain and its private key, as DER.
#[derive(Debug, PartialEq, Eq)]
pub struct KeyPair {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// The field a key problem is reported on.
pub fn key_field() -> String {
    format!("data[{TLS_PRIVATE_KEY_KEY}]")
}

pub fn key_pair(secret: &Secret) -> Result<KeyPair, SecretError> {
    if secret.type_.as_deref() != Some(TLS_SECRET_TYPE) {
        return Err(error(
            "type",
            format!(
                "{} is not {TLS_SECRET_TYPE}",
                quoted(secret.type_.as_deref().unwrap_or(""))
            ),
        ));
    }
    let cert_field = format!("data[{TLS_CERT_KEY}]");
    let key_field = key_field();
    let crt = secret_data(secret, TLS_CERT_KEY).ok_or_else(|| error(&cert_field, "missing"))?;
    let key =
        secret_data(secret, TLS_PRIVATE_KEY_KEY).ok_or_else(|| error(&key_field, "missing"))?;
    let chain = CertificateDer::pem_slice_iter(&crt.0)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(&cert_field, format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(error(&cert_field, "holds no PEM CERTIFICATE block"));
    }
    let key = PrivateKeyDer::from_pem_slice(&key.0)
        .map_err(|e| error(&key_field, format!("not a PEM private key: {e}")))?;
    Ok(KeyPair { chain, key })
}

/// The PEM certificates in a Secret's `ca.crt`; `Ok(empty)` when it has none.
pub fn ca_certificates(secret: &Secret) -> Result<Vec<CertificateDer<'static>>, SecretError> {
    let field = format!("data[{CA_CERT_KEY}]");
    let Some(pem) = secret_data(secret, CA_CERT_KEY) else {
        return Ok(Vec::new());
    };
    let certs = CertificateDer::pem_slice_iter(&pem.0)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(&field, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(error(&field, "holds no PEM CERTIFICATE block"));
    }
    Ok(certs)
}
