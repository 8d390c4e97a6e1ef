//! The Ingress annotations the L7 hop honours, read into one value per Ingress; every
//! other `nginx.ingress.kubernetes.io/*` annotation is reported as ignored.

use std::collections::BTreeMap;

use std::sync::Arc;

use crate::cluster::ObjectKey;
use crate::quote::quoted;
use crate::routes::{Balance, Route, Upstream};

pub const SSL_REDIRECT: &str = "nginx.ingress.kubernetes.io/ssl-redirect";
pub const FORCE_SSL_REDIRECT: &str = "nginx.ingress.kubernetes.io/force-ssl-redirect";
pub const PROXY_BODY_SIZE: &str = "nginx.ingress.kubernetes.io/proxy-body-size";
pub const LOAD_BALANCE: &str = "xlb.dev/load-balance";
/// The deprecated way to name an Ingress's class (before `spec.ingressClassName`).
pub const INGRESS_CLASS: &str = "kubernetes.io/ingress.class";
pub const IS_DEFAULT_CLASS: &str = "ingressclass.kubernetes.io/is-default-class";

const NGINX_PREFIX: &str = "nginx.ingress.kubernetes.io/";
const HONOURED_NGINX: [&str; 3] = [SSL_REDIRECT, FORCE_SSL_REDIRECT, PROXY_BODY_SIZE];

/// What an Ingress's annotations ask of its routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Redirect plain HTTP for hosts with TLS (default true).
    pub ssl_redirect: bool,
    /// Redirect plain HTTP whether or not the host has TLS.
    pub force_ssl_redirect: bool,
    pub max_body_bytes: Option<u64>,
    pub balance: Balance,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            ssl_redirect: true,
            force_ssl_redirect: false,
            max_body_bytes: None,
            balance: Balance::RoundRobin,
        }
    }
}

impl Settings {
    /// A route of this Ingress; `tls`: its host is in some Ingress's `spec.tls`.
    pub fn route(&self, upstream: Arc<Upstream>, ingress: &ObjectKey, tls: bool) -> Route {
        Route {
            upstream,
            ingress: ingress.clone(),
            ssl_redirect: self.force_ssl_redirect || (tls && self.ssl_redirect),
            balance: self.balance,
            max_body_bytes: self.max_body_bytes,
        }
    }
}

/// A value that could not be read: the annotation and why (its default applies).
pub struct BadValue {
    pub annotation: &'static str,
    pub reason: String,
}

/// Reads the honoured annotations; bad values keep the default and are returned;
/// the names of ignored `nginx.ingress.kubernetes.io/*` annotations are appended to
/// `ignored`.
pub fn read(
    annotations: Option<&BTreeMap<String, String>>,
    ignored: &mut Vec<String>,
) -> (Settings, Vec<BadValue>) {
    let mut settings = Settings::default();
    let mut bad = Vec::new();
    let Some(annotations) = annotations else {
        return (settings, bad);
    };
    let flag = |name: &'static str, value: &str, bad: &mut Vec<BadValue>| match value {
        "true" => Some(true),
        "false" => Some(false),
        other => {
            bad.push(BadValue {
                annotation: name,
                reason: format!("{} is neither \"true\" nor \"false\"", quoted(other)),
            });
            None
        }
    };
    if let Some(v) = annotations.get(SSL_REDIRECT)
        && let Some(on) = flag(SSL_REDIRECT, v, &mut bad)
    {
        settings.ssl_redirect = on;
    }
    if let Some(v) = annotations.get(FORCE_SSL_REDIRECT)
        && let Some(on) = flag(FORCE_SSL_REDIRECT, v, &mut bad)
    {
        settings.force_ssl_redirect = on;
    }
    if let Some(v) = annotations.get(PROXY_BODY_SIZE) {
        match body_size(v) {
            Ok(limit) => settings.max_body_bytes = Some(limit),
            Err(reason) => bad.push(BadValue {
                annotation: PROXY_BODY_SIZE,
                reason,
            }),
        }
    }
    if let Some(v) = annotations.get(LOAD_BALANCE) {
        match v.as_str() {
            "round-robin" => settings.balance = Balance::RoundRobin,
            "least-request" => settings.balance = Balance::LeastRequest,
            other => bad.push(BadValue {
                annotation: LOAD_BALANCE,
                reason: format!(
                    "{} is neither \"round-robin\" nor \"least-request\"",
                    quoted(other)
                ),
            }),
        }
    }
    ignored.extend(
        annotations
            .keys()
            .filter(|k| k.starts_with(NGINX_PREFIX) && !HONOURED_NGINX.contains(&k.as_str()))
            .cloned(),
    );
    (settings, bad)
}

/// nginx's size syntax (`client_max_body_size`): bytes, or a number with `k`, `m` or
/// `g` (either case); `0` turns the limit off, which is `u64::MAX` here (`None` on a
/// route means the proxy's default).
pub fn body_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], c.to_ascii_lowercase()),
        _ => (text, 'b'),
    };
    let scale: u64 = match unit {
        'b' => 1,
        'k' => 1 << 10,
        'm' => 1 << 20,
        'g' => 1 << 30,
        _ => {
            return Err(format!("{}: unit is not k, m or g", quoted(text)));
        }
    };
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{} is not a size (like 8m, 512k, 1024 or 0)", quoted(text)))?;
    if number == 0 {
        return Ok(u64::MAX);
    }
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("{} is too large", quoted(text)))
}
