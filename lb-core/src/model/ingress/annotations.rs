//! The Ingress annotations the L7 hop honours, read into one value per Ingress. The
//! prefix is ingress-nginx's `--annotations-prefix` (default
//! `nginx.ingress.kubernetes.io`); what each name under it means to xlb is in
//! [`catalogue`](super::catalogue). A bad value keeps ingress-nginx's default and is a
//! problem naming the Ingress and the annotation.

use std::collections::BTreeMap;

use std::sync::Arc;

use super::catalogue::{self, Support};
use crate::cluster::ObjectKey;
use crate::quote::quoted;
use crate::routes::{Balance, PathRegex, Policy, Redirect, Rewrite, Route, Upstream};

/// ingress-nginx's default `--annotations-prefix`.
pub const DEFAULT_PREFIX: &str = "nginx.ingress.kubernetes.io";

// Names after the prefix.
pub const SSL_REDIRECT: &str = "ssl-redirect";
pub const FORCE_SSL_REDIRECT: &str = "force-ssl-redirect";
pub const PROXY_BODY_SIZE: &str = "proxy-body-size";
pub const REWRITE_TARGET: &str = "rewrite-target";
pub const USE_REGEX: &str = "use-regex";
pub const APP_ROOT: &str = "app-root";
pub const PERMANENT_REDIRECT: &str = "permanent-redirect";
pub const PERMANENT_REDIRECT_CODE: &str = "permanent-redirect-code";
pub const TEMPORAL_REDIRECT: &str = "temporal-redirect";
pub const TEMPORAL_REDIRECT_CODE: &str = "temporal-redirect-code";
pub const X_FORWARDED_PREFIX: &str = "x-forwarded-prefix";
pub const UPSTREAM_VHOST: &str = "upstream-vhost";

/// xlb's own annotation (not under the prefix).
pub const LOAD_BALANCE: &str = "xlb.dev/load-balance";
/// The deprecated way to name an Ingress's class (before `spec.ingressClassName`).
pub const INGRESS_CLASS: &str = "kubernetes.io/ingress.class";
pub const IS_DEFAULT_CLASS: &str = "ingressclass.kubernetes.io/is-default-class";

/// What an Ingress's annotations ask of its routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Redirect plain HTTP for hosts with TLS (default true).
    pub ssl_redirect: bool,
    /// Redirect plain HTTP whether or not the host has TLS.
    pub force_ssl_redirect: bool,
    pub max_body_bytes: Option<u64>,
    pub balance: Balance,
    /// `use-regex: "true"`.
    pub use_regex: bool,
    /// `rewrite-target`, with `$1`..`$9` for the path's captures.
    pub rewrite_target: Option<String>,
    /// Redirects and headers (the rewrite is per path, see [`Settings::route`]).
    pub policy: Policy,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            ssl_redirect: true,
            force_ssl_redirect: false,
            max_body_bytes: None,
            balance: Balance::RoundRobin,
            use_regex: false,
            rewrite_target: None,
            policy: Policy::default(),
        }
    }
}

impl Settings {
    /// Whether the rule `path` makes its host's paths regular expressions: `use-regex`,
    /// or a `rewrite-target` other than the path itself (ingress-nginx's
    /// `needsRewrite`).
    pub fn regex_for(&self, path: &str) -> bool {
        self.use_regex || self.rewrite_for(path).is_some()
    }

    fn rewrite_for(&self, path: &str) -> Option<&str> {
        self.rewrite_target
            .as_deref()
            .filter(|t| !t.is_empty() && *t != path)
    }

    /// A route of this Ingress for the rule `path` (`None`: the default backend);
    /// `tls`: its host is in some Ingress's `spec.tls`.
    pub fn route(
        &self,
        upstream: Arc<Upstream>,
        ingress: &ObjectKey,
        tls: bool,
        path: Option<&str>,
    ) -> Route {
        let rewrite = path.and_then(|p| {
            let target = self.rewrite_for(p)?;
            let pattern = PathRegex::new(p, false).ok()?;
            Some(Rewrite {
                pattern,
                target: target.to_owned(),
            })
        });
        Route {
            upstream,
            ingress: ingress.clone(),
            ssl_redirect: self.force_ssl_redirect || (tls && self.ssl_redirect),
            balance: self.balance,
            max_body_bytes: self.max_body_bytes,
            policy: Arc::new(Policy {
                rewrite,
                ..self.policy.clone()
            }),
        }
    }
}

/// A value that could not be read: the annotation (full name) and why (its default
/// applies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadValue {
    pub annotation: String,
    pub reason: String,
}

/// One Ingress's annotations, read.
#[derive(Debug, Default)]
pub struct Read {
    pub settings: Settings,
    pub bad: Vec<BadValue>,
    /// Annotations under the prefix that are not read and change behaviour (full name,
    /// why).
    pub ignored: Vec<(String, &'static str)>,
    /// Annotations that keep the Ingress from being served (full name, why).
    pub refused: Vec<(String, &'static str)>,
}

/// The annotations of one Ingress and the prefix they are read under.
struct Source<'a> {
    map: &'a BTreeMap<String, String>,
    prefix: &'a str,
    bad: Vec<BadValue>,
}

impl<'a> Source<'a> {
    fn full(&self, name: &str) -> String {
        format!("{}/{name}", self.prefix)
    }

    fn get(&self, name: &str) -> Option<&'a str> {
        self.map.get(&self.full(name)).map(String::as_str)
    }

    fn bad(&mut self, name: &str, reason: String) {
        let annotation = if name.contains('/') {
            name.to_owned()
        } else {
            self.full(name)
        };
        self.bad.push(BadValue { annotation, reason });
    }

    /// A non-empty string value.
    fn text(&mut self, name: &str) -> Option<String> {
        let value = self.get(name)?.trim();
        if value.is_empty() {
            self.bad(name, "is empty".to_owned());
            return None;
        }
        Some(value.to_owned())
    }

    /// An absolute `http://` or `https://` URL (ingress-nginx's redirect check).
    fn url(&mut self, name: &str) -> Option<String> {
        let value = self.text(name)?;
        let lower = value.to_ascii_lowercase();
        let rest = lower
            .strip_prefix("https://")
            .or_else(|| lower.strip_prefix("http://"));
        let printable = value.bytes().all(|b| b.is_ascii_graphic());
        if rest.is_some_and(|r| !r.is_empty()) && printable {
            Some(value)
        } else {
            let reason = format!("{} is not an http:// or https:// URL", quoted(&value));
            self.bad(name, reason);
            None
        }
    }

    /// A redirect status 300..=308, else `default` (as ingress-nginx).
    fn redirect_code(&mut self, name: &str, default: u16) -> u16 {
        let Some(value) = self.get(name) else {
            return default;
        };
        match value.trim().parse::<u16>() {
            Ok(code) if (300..=308).contains(&code) => code,
            _ => {
                let reason = format!(
                    "{} is not a redirect status (300 to 308): {default} applies",
                    quoted(value)
                );
                self.bad(name, reason);
                default
            }
        }
    }

    /// A path starting with `/`.
    fn path(&mut self, name: &str) -> Option<String> {
        let value = self.text(name)?;
        if value.starts_with('/') && value.bytes().all(|b| b.is_ascii_graphic()) {
            Some(value)
        } else {
            let reason = format!("{} is not a path starting with /", quoted(&value));
            self.bad(name, reason);
            None
        }
    }

    /// A value usable as an HTTP header value (visible ASCII and spaces).
    fn header_value(&mut self, name: &str) -> Option<String> {
        let value = self.text(name)?;
        if value.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
            Some(value)
        } else {
            let reason = format!("{} is not a valid header value", quoted(&value));
            self.bad(name, reason);
            None
        }
    }

    /// `true`/`false` (ingress-nginx reads booleans with Go's strconv.ParseBool, but
    /// its documentation only shows these two).
    fn flag(&mut self, name: &str) -> Option<bool> {
        match self.get(name)? {
            "true" => Some(true),
            "false" => Some(false),
            other => {
                let reason = format!("{} is neither \"true\" nor \"false\"", quoted(other));
                self.bad(name, reason);
                None
            }
        }
    }
}

/// Reads an Ingress's annotations under `prefix`; bad values keep the default and are
/// returned.
pub fn read(annotations: Option<&BTreeMap<String, String>>, prefix: &str) -> Read {
    let mut read = Read::default();
    let Some(map) = annotations else {
        return read;
    };
    let mut src = Source {
        map,
        prefix,
        bad: Vec::new(),
    };
    let settings = &mut read.settings;
    if let Some(on) = src.flag(SSL_REDIRECT) {
        settings.ssl_redirect = on;
    }
    if let Some(on) = src.flag(FORCE_SSL_REDIRECT) {
        settings.force_ssl_redirect = on;
    }
    if let Some(v) = src.get(PROXY_BODY_SIZE) {
        match body_size(v) {
            Ok(limit) => settings.max_body_bytes = Some(limit),
            Err(reason) => src.bad(PROXY_BODY_SIZE, reason),
        }
    }
    if let Some(on) = src.flag(USE_REGEX) {
        settings.use_regex = on;
    }
    if src.get(REWRITE_TARGET).is_some() {
        settings.rewrite_target = src.header_value(REWRITE_TARGET);
    }
    let policy = &mut settings.policy;
    // A temporal redirect wins over a permanent one, as in ingress-nginx.
    if src.get(TEMPORAL_REDIRECT).is_some() {
        if let Some(location) = src.url(TEMPORAL_REDIRECT) {
            let code = src.redirect_code(TEMPORAL_REDIRECT_CODE, 302);
            policy.redirect = Some(Redirect { code, location });
        }
    }
    if policy.redirect.is_none() && src.get(PERMANENT_REDIRECT).is_some() {
        if let Some(location) = src.url(PERMANENT_REDIRECT) {
            let code = src.redirect_code(PERMANENT_REDIRECT_CODE, 301);
            policy.redirect = Some(Redirect { code, location });
        }
    }
    if src.get(APP_ROOT).is_some() {
        policy.app_root = src.path(APP_ROOT);
    }
    if src.get(X_FORWARDED_PREFIX).is_some() {
        policy.forwarded_prefix = src.header_value(X_FORWARDED_PREFIX);
    }
    if src.get(UPSTREAM_VHOST).is_some() {
        policy.upstream_vhost = src.header_value(UPSTREAM_VHOST);
    }
    if let Some(v) = map.get(LOAD_BALANCE) {
        match v.as_str() {
            "round-robin" => settings.balance = Balance::RoundRobin,
            "least-request" => settings.balance = Balance::LeastRequest,
            other => src.bad(
                LOAD_BALANCE,
                format!(
                    "{} is neither \"round-robin\" nor \"least-request\"",
                    quoted(other)
                ),
            ),
        }
    }
    let under = format!("{prefix}/");
    for full in map.keys() {
        let Some(name) = full.strip_prefix(&under) else {
            continue;
        };
        match catalogue::support(name) {
            Support::Honoured | Support::Same(_) => {}
            Support::Differs(why) => read.ignored.push((full.clone(), why)),
            Support::Refused(why) => read.refused.push((full.clone(), why)),
        }
    }
    read.bad = src.bad;
    read
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
