//! The `auth-*` annotations. Any bad value denies the route (every request answered
//! 503, as ingress-nginx's denied location) rather than serving it unauthenticated.

use std::sync::Arc;

use super::{Read, Source};
use crate::quote::quoted;
use crate::routes::auth::{self, ExternalAuth};

pub const AUTH_URL: &str = "auth-url";
pub const AUTH_METHOD: &str = "auth-method";
pub const AUTH_SIGNIN: &str = "auth-signin";
pub const AUTH_SIGNIN_REDIRECT_PARAM: &str = "auth-signin-redirect-param";
pub const AUTH_RESPONSE_HEADERS: &str = "auth-response-headers";
pub const AUTH_REQUEST_REDIRECT: &str = "auth-request-redirect";
pub const AUTH_ALWAYS_SET_COOKIE: &str = "auth-always-set-cookie";
pub const AUTH_TYPE: &str = "auth-type";
pub const AUTH_SECRET: &str = "auth-secret";
pub const AUTH_SECRET_TYPE: &str = "auth-secret-type";
pub const AUTH_REALM: &str = "auth-realm";

/// The methods ingress-nginx accepts in `auth-method`.
const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE",
];

/// Where `auth-secret` points and how to read it; the translator looks the Secret up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasicAuthRef {
    /// `auth-secret`: `name` (the Ingress's namespace) or `namespace/name`.
    pub secret: String,
    /// `auth-secret-type: auth-map` (keys are users, values hashes); else the `auth`
    /// key holds an htpasswd file.
    pub auth_map: bool,
    /// `auth-realm`.
    pub realm: String,
}

/// Reads `auth-url` and its settings into the policy, and `auth-type: basic` into
/// [`super::Settings::basic_auth`]; a bad value denies the route and is a problem.
pub(super) fn read(src: &mut Source<'_>, read: &mut Read) {
    if src.get(AUTH_URL).is_some() {
        match external(src) {
            Ok(ext) => read.settings.policy.external_auth = Some(Arc::new(ext)),
            Err((name, reason)) => deny(src, read, name, &reason),
        }
    }
    match src.get(AUTH_TYPE).map(str::trim) {
        None => {}
        Some("basic") => match basic(src) {
            Ok(basic) => read.settings.basic_auth = Some(basic),
            Err((name, reason)) => deny(src, read, name, &reason),
        },
        Some(other) => {
            let reason = format!(
                "{} is not \"basic\" (xlb has no digest authentication)",
                quoted(other)
            );
            deny(src, read, AUTH_TYPE, &reason);
        }
    }
}

fn deny(src: &mut Source<'_>, read: &mut Read, name: &str, reason: &str) {
    let why = format!("{reason}: every request to its routes is answered 503 until this is fixed");
    read.settings.policy.denied = Some(format!("{}: {reason}", src.full(name)));
    src.bad(name, why);
}

type Bad = (&'static str, String);

fn external(src: &mut Source<'_>) -> Result<ExternalAuth, Bad> {
    let url = checked_url(src, AUTH_URL)?;
    let method = match src.get(AUTH_METHOD).map(str::trim) {
        None => None,
        Some(m) if METHODS.contains(&m) => Some(m.to_owned()),
        Some(m) => {
            return Err((
                AUTH_METHOD,
                format!("{} is not an HTTP method like GET or POST", quoted(m)),
            ));
        }
    };
    let param = match src.get(AUTH_SIGNIN_REDIRECT_PARAM).map(str::trim) {
        None => "rd".to_owned(),
        Some(p)
            if !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b)) =>
        {
            p.to_owned()
        }
        Some(p) => {
            return Err((
                AUTH_SIGNIN_REDIRECT_PARAM,
                format!("{} is not a query parameter name", quoted(p)),
            ));
        }
    };
    let signin = match src.get(AUTH_SIGNIN) {
        None => None,
        Some(_) => Some(auth::signin_url(&checked_url(src, AUTH_SIGNIN)?, &param)),
    };
    let mut response_headers = Vec::new();
    if let Some(list) = src.get(AUTH_RESPONSE_HEADERS) {
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
            {
                return Err((
                    AUTH_RESPONSE_HEADERS,
                    format!("{} is not a header name", quoted(name)),
                ));
            }
            response_headers.push(name.to_ascii_lowercase());
        }
    }
    let request_redirect = match src.get(AUTH_REQUEST_REDIRECT) {
        None => None,
        Some(v) if v.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) => {
            Some(v.trim().to_owned())
        }
        Some(v) => {
            return Err((
                AUTH_REQUEST_REDIRECT,
                format!("{} is not a valid header value", quoted(v)),
            ));
        }
    };
    let always_set_cookie = match src.get(AUTH_ALWAYS_SET_COOKIE) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err((
                AUTH_ALWAYS_SET_COOKIE,
                format!("{} is neither \"true\" nor \"false\"", quoted(other)),
            ));
        }
    };
    Ok(ExternalAuth {
        url,
        method,
        signin,
        response_headers,
        request_redirect,
        always_set_cookie,
    })
}

/// An `http://` or `https://` URL with a host, whose `$` variables are ones the proxy
/// fills in.
fn checked_url(src: &Source<'_>, name: &'static str) -> Result<String, Bad> {
    let value = src.get(name).unwrap_or_default().trim();
    let lower = value.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"));
    let host = rest.map_or("", |r| r.split(['/', '?', '#']).next().unwrap_or(""));
    if host.is_empty() || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err((
            name,
            format!("{} is not an http:// or https:// URL", quoted(value)),
        ));
    }
    if let Some(var) = auth::unknown_variable(value) {
        return Err((
            name,
            format!(
                "{} uses {var}, which xlb does not fill in (it knows ${})",
                quoted(value),
                auth::VARIABLES.join(", $")
            ),
        ));
    }
    Ok(value.to_owned())
}

fn basic(src: &mut Source<'_>) -> Result<BasicAuthRef, Bad> {
    let secret = src.get(AUTH_SECRET).map(str::trim).unwrap_or_default();
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
    };
    let ok = match secret.split_once('/') {
        Some((ns, name)) => valid_name(ns) && valid_name(name),
        None => valid_name(secret),
    };
    if !ok {
        return Err((
            AUTH_SECRET,
            format!(
                "{} does not name a Secret (name or namespace/name)",
                quoted(secret)
            ),
        ));
    }
    let auth_map = match src.get(AUTH_SECRET_TYPE).map(str::trim) {
        None | Some("auth-file") => false,
        Some("auth-map") => true,
        Some(other) => {
            return Err((
                AUTH_SECRET_TYPE,
                format!("{} is neither auth-file nor auth-map", quoted(other)),
            ));
        }
    };
    let realm = src.get(AUTH_REALM).unwrap_or_default().to_owned();
    if realm.contains('"') || !realm.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        return Err((
            AUTH_REALM,
            format!("{} cannot be quoted in a header", quoted(&realm)),
        ));
    }
    Ok(BasicAuthRef {
        secret: secret.to_owned(),
        auth_map,
        realm,
    })
}
