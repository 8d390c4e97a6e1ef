//! The Ingress annotations the L7 hop honours, read into one value per Ingress. The
//! prefix is ingress-nginx's `--annotations-prefix` (default
//! `nginx.ingress.kubernetes.io`); what each name under it means to xlb is in
//! [`catalogue`](super::catalogue). A bad value keeps ingress-nginx's default and is a
//! problem naming the Ingress and the annotation.

mod auth;

use std::collections::BTreeMap;

use std::sync::Arc;

use super::catalogue::{self, Support};
use crate::cluster::ObjectKey;
use crate::quote::quoted;
use ipnet::IpNet;

use crate::routes::{
    Access, Affinity, Balance, Canary, Cors, Limits, PathRegex, Policy, Redirect, Rewrite, Route,
    Upstream, UpstreamProtocol,
};

pub use auth::{AUTH_SECRET, BasicAuthRef};

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
pub const ENABLE_CORS: &str = "enable-cors";
pub const CORS_ALLOW_ORIGIN: &str = "cors-allow-origin";
pub const CORS_ALLOW_METHODS: &str = "cors-allow-methods";
pub const CORS_ALLOW_HEADERS: &str = "cors-allow-headers";
pub const CORS_EXPOSE_HEADERS: &str = "cors-expose-headers";
pub const CORS_ALLOW_CREDENTIALS: &str = "cors-allow-credentials";
pub const CORS_MAX_AGE: &str = "cors-max-age";
pub const ALLOWLIST_SOURCE_RANGE: &str = "allowlist-source-range";
/// The older name of [`ALLOWLIST_SOURCE_RANGE`]; the newer one wins when both are set.
pub const WHITELIST_SOURCE_RANGE: &str = "whitelist-source-range";
pub const DENYLIST_SOURCE_RANGE: &str = "denylist-source-range";
pub const PROXY_CONNECT_TIMEOUT: &str = "proxy-connect-timeout";
pub const PROXY_READ_TIMEOUT: &str = "proxy-read-timeout";
pub const PROXY_SEND_TIMEOUT: &str = "proxy-send-timeout";
pub const AFFINITY: &str = "affinity";
pub const AFFINITY_MODE: &str = "affinity-mode";
pub const SESSION_COOKIE_NAME: &str = "session-cookie-name";
pub const SESSION_COOKIE_PATH: &str = "session-cookie-path";
pub const SESSION_COOKIE_MAX_AGE: &str = "session-cookie-max-age";
pub const SESSION_COOKIE_EXPIRES: &str = "session-cookie-expires";
pub const SESSION_COOKIE_SAMESITE: &str = "session-cookie-samesite";
pub const LIMIT_RPS: &str = "limit-rps";
pub const LIMIT_RPM: &str = "limit-rpm";
pub const LIMIT_CONNECTIONS: &str = "limit-connections";
pub const LIMIT_BURST_MULTIPLIER: &str = "limit-burst-multiplier";
pub const CANARY: &str = "canary";
pub const CANARY_BY_HEADER: &str = "canary-by-header";
pub const CANARY_BY_HEADER_VALUE: &str = "canary-by-header-value";
pub const CANARY_BY_HEADER_PATTERN: &str = "canary-by-header-pattern";
pub const CANARY_BY_COOKIE: &str = "canary-by-cookie";
pub const CANARY_WEIGHT: &str = "canary-weight";
pub const CANARY_WEIGHT_TOTAL: &str = "canary-weight-total";
pub const BACKEND_PROTOCOL: &str = "backend-protocol";
pub const SSL_PASSTHROUGH: &str = "ssl-passthrough";
pub const PROXY_SSL_VERIFY: &str = "proxy-ssl-verify";
pub const PROXY_SSL_SECRET: &str = "proxy-ssl-secret";
pub const PROXY_SSL_NAME: &str = "proxy-ssl-name";
pub const PROXY_SSL_SERVER_NAME: &str = "proxy-ssl-server-name";

// ingress-nginx's CORS defaults.
const CORS_METHODS: &str = "GET, PUT, POST, DELETE, PATCH, OPTIONS";
const CORS_HEADERS: &str = "DNT,Keep-Alive,User-Agent,X-Requested-With,If-Modified-Since,\
    Cache-Control,Content-Type,Range,Authorization";
const CORS_MAX_AGE_DEFAULT: u32 = 1_728_000;

/// xlb's own annotation (not under the prefix).
pub const LOAD_BALANCE: &str = "xlb.dev/load-balance";
/// The deprecated way to name an Ingress's class (before `spec.ingressClassName`).
pub const INGRESS_CLASS: &str = "kubernetes.io/ingress.class";
pub const IS_DEFAULT_CLASS: &str = "ingressclass.kubernetes.io/is-default-class";

/// What an Ingress's annotations ask of its routes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "each is one independent true/false annotation"
)]
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
    /// `canary: "true"`: the Ingress's routes are canaries of another Ingress's.
    pub canary: Option<CanaryRules>,
    /// `backend-protocol` and `proxy-ssl-*`.
    pub backend: Backend,
    /// `ssl-passthrough: "true"`: TLS for the Ingress's hosts goes to the backend of
    /// their `/` path untouched (when the agent runs with
    /// `--l7-enable-ssl-passthrough`).
    pub ssl_passthrough: bool,
    /// `auth-type: basic`: the Secret the translator reads the users from.
    pub basic_auth: Option<BasicAuthRef>,
}

/// How the hop speaks to the Ingress's backends: `backend-protocol` and the
/// `proxy-ssl-*` settings (the Secret is read by the translation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backend {
    /// `None`: not set, the Service port's `appProtocol` decides.
    pub protocol: Option<BackendProtocol>,
    /// `proxy-ssl-verify: on`.
    pub verify: bool,
    /// `proxy-ssl-secret`, as written (`namespace/name`).
    pub secret: Option<String>,
    /// `proxy-ssl-name`.
    pub name: Option<String>,
    /// `proxy-ssl-server-name: on`.
    pub sni: bool,
}

/// The `backend-protocol` values xlb serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendProtocol {
    Http,
    Https,
    /// gRPC: HTTP/2 without TLS.
    Grpc,
    /// gRPC over TLS: HTTP/2 inside TLS.
    Grpcs,
    /// HTTP/2 without TLS.
    H2c,
}

impl BackendProtocol {
    /// The HTTP version and whether TLS wraps it.
    pub fn upstream(self) -> (UpstreamProtocol, bool) {
        match self {
            BackendProtocol::Http => (UpstreamProtocol::Http1, false),
            BackendProtocol::Https => (UpstreamProtocol::Http1, true),
            BackendProtocol::Grpc | BackendProtocol::H2c => (UpstreamProtocol::H2c, false),
            BackendProtocol::Grpcs => (UpstreamProtocol::H2c, true),
        }
    }
}

const REFUSED_PROTOCOL: &str = "xlb speaks HTTP, HTTPS, GRPC, GRPCS or H2C to backends: \
    FCGI and AJP backends would get requests they cannot read, and AUTO_HTTP (the \
    client's scheme per request) is not built; the Ingress is not served until the value \
    is changed";

/// The agent's defaults for what an Ingress's annotations leave unset: ingress-nginx's
/// ConfigMap keys of the same names (body size and timeouts are the proxy's own
/// defaults, which a route without the annotation uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    /// `ssl-redirect` (`--l7-ssl-redirect`, default true).
    pub ssl_redirect: bool,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults { ssl_redirect: true }
    }
}

/// A canary Ingress's rules (its backend is per path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanaryRules {
    pub by_header: Option<String>,
    pub header_value: Option<String>,
    pub header_pattern: Option<PathRegex>,
    pub by_cookie: Option<String>,
    pub weight: u32,
    pub weight_total: u32,
}

impl CanaryRules {
    pub fn canary(&self, upstream: Arc<Upstream>, ingress: &ObjectKey) -> Canary {
        Canary {
            upstream,
            ingress: ingress.clone(),
            by_header: self.by_header.clone(),
            header_value: self.header_value.clone(),
            header_pattern: self.header_pattern.clone(),
            by_cookie: self.by_cookie.clone(),
            weight: self.weight,
            weight_total: self.weight_total,
        }
    }
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
            canary: None,
            backend: Backend::default(),
            ssl_passthrough: false,
            basic_auth: None,
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
                affinity: self.policy.affinity.clone().map(|mut a| {
                    if a.path.is_empty() {
                        a.path = match path {
                            Some(p) if !self.regex_for(p) => p.to_owned(),
                            _ => "/".to_owned(),
                        };
                    }
                    a
                }),
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

    /// A whole number of seconds above 0 (ingress-nginx's timeout annotations; nginx
    /// would also take `5s`, which is read too).
    fn seconds(&mut self, name: &str) -> Option<std::time::Duration> {
        let value = self.get(name)?;
        let digits = value.trim().strip_suffix('s').unwrap_or(value.trim());
        match digits.parse::<u64>() {
            Ok(n) if n > 0 => Some(std::time::Duration::from_secs(n)),
            _ => {
                let reason = format!(
                    "{} is not a whole number of seconds above 0: the agent's default applies",
                    quoted(value)
                );
                self.bad(name, reason);
                None
            }
        }
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

    /// nginx's `on`/`off` (the `proxy-ssl-*` switches).
    fn on_off(&mut self, name: &str) -> Option<bool> {
        match self.get(name)?.trim() {
            "on" => Some(true),
            "off" => Some(false),
            other => {
                let reason = format!(
                    "{} is neither \"on\" nor \"off\": off applies",
                    quoted(other)
                );
                self.bad(name, reason);
                None
            }
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

/// Reads an Ingress's annotations under `prefix`; what they leave unset is `defaults`
/// (then ingress-nginx's); bad values keep the default and are returned.
pub fn read(
    annotations: Option<&BTreeMap<String, String>>,
    prefix: &str,
    defaults: &Defaults,
) -> Read {
    let mut read = Read::default();
    read.settings.ssl_redirect = defaults.ssl_redirect;
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
    if src.get(TEMPORAL_REDIRECT).is_some()
        && let Some(location) = src.url(TEMPORAL_REDIRECT)
    {
        let code = src.redirect_code(TEMPORAL_REDIRECT_CODE, 302);
        policy.redirect = Some(Redirect { code, location });
    }
    if policy.redirect.is_none()
        && src.get(PERMANENT_REDIRECT).is_some()
        && let Some(location) = src.url(PERMANENT_REDIRECT)
    {
        let code = src.redirect_code(PERMANENT_REDIRECT_CODE, 301);
        policy.redirect = Some(Redirect { code, location });
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
    if src.flag(ENABLE_CORS) == Some(true) {
        settings.policy.cors = Some(cors(&mut src));
    }
    settings.policy.access = access(&mut src);
    settings.policy.affinity = affinity(&mut src);
    settings.policy.limits = limits(&mut src);
    settings.policy.connect_timeout = src.seconds(PROXY_CONNECT_TIMEOUT);
    settings.policy.read_timeout = src.seconds(PROXY_READ_TIMEOUT);
    settings.policy.send_timeout = src.seconds(PROXY_SEND_TIMEOUT);
    if src.flag(CANARY) == Some(true) {
        settings.canary = Some(canary(&mut src));
    }
    settings.ssl_passthrough = src.flag(SSL_PASSTHROUGH) == Some(true);
    let (backend, refused) = backend(&mut src);
    settings.backend = backend;
    read.refused.extend(refused);
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
    auth::read(&mut src, &mut read);
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

/// The `cors-*` annotations with ingress-nginx's defaults; a bad value keeps the
/// default (a bad origin is left out).
fn cors(src: &mut Source<'_>) -> Cors {
    let list = |src: &mut Source<'_>, name: &str, default: &str, extra: &[u8]| {
        let Some(value) = src.get(name) else {
            return default.to_owned();
        };
        let ok = value.split(',').map(str::trim).all(|item| {
            !item.is_empty()
                && item.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || extra.contains(&b)
                })
        });
        if ok {
            value.trim().to_owned()
        } else {
            let reason = format!("{} is not a comma-separated list of names", quoted(value));
            src.bad(name, reason);
            default.to_owned()
        }
    };
    let allow_methods = list(src, CORS_ALLOW_METHODS, CORS_METHODS, b"");
    let allow_headers = list(src, CORS_ALLOW_HEADERS, CORS_HEADERS, b"");
    let expose_headers = list(src, CORS_EXPOSE_HEADERS, "", b"*");
    let mut allow_origin = Vec::new();
    if let Some(value) = src.get(CORS_ALLOW_ORIGIN) {
        for origin in value.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            if valid_origin(origin) {
                allow_origin.push(origin.to_ascii_lowercase());
            } else {
                let reason = format!(
                    "{} is not * or an origin like https://a.example or https://*.example.com: \
                     left out",
                    quoted(origin)
                );
                src.bad(CORS_ALLOW_ORIGIN, reason);
            }
        }
    }
    if allow_origin.is_empty() {
        allow_origin.push("*".to_owned());
    }
    let allow_credentials = src.flag(CORS_ALLOW_CREDENTIALS).unwrap_or(true);
    let max_age = match src.get(CORS_MAX_AGE) {
        None => CORS_MAX_AGE_DEFAULT,
        Some(v) => v.trim().parse().unwrap_or_else(|_| {
            let reason = format!("{} is not a number of seconds", quoted(v));
            src.bad(CORS_MAX_AGE, reason);
            CORS_MAX_AGE_DEFAULT
        }),
    };
    Cors {
        allow_origin,
        allow_methods,
        allow_headers,
        expose_headers,
        allow_credentials,
        max_age,
    }
}

/// `affinity: cookie` with the `session-cookie-*` settings and ingress-nginx's
/// defaults; the path is filled in per rule by [`Settings::route`] when not set.
fn affinity(src: &mut Source<'_>) -> Option<Affinity> {
    match src.get(AFFINITY)? {
        "cookie" => {}
        other => {
            let reason = format!("{} is not \"cookie\": no affinity", quoted(other));
            src.bad(AFFINITY, reason);
            return None;
        }
    }
    let cookie_name = match src.get(SESSION_COOKIE_NAME).map(str::trim) {
        None => "INGRESSCOOKIE".to_owned(),
        Some(name) if header_name(name) => name.to_owned(),
        Some(name) => {
            let reason = format!(
                "{} is not a cookie name: INGRESSCOOKIE applies",
                quoted(name)
            );
            src.bad(SESSION_COOKIE_NAME, reason);
            "INGRESSCOOKIE".to_owned()
        }
    };
    let path = if src.get(SESSION_COOKIE_PATH).is_some() {
        src.path(SESSION_COOKIE_PATH).unwrap_or_default()
    } else {
        String::new()
    };
    let samesite = match src.get(SESSION_COOKIE_SAMESITE).map(str::trim) {
        None => None,
        Some(v @ ("None" | "Lax" | "Strict")) => Some(v.to_owned()),
        Some(other) => {
            let reason = format!("{} is not None, Lax or Strict: left out", quoted(other));
            src.bad(SESSION_COOKIE_SAMESITE, reason);
            None
        }
    };
    let persistent = match src.get(AFFINITY_MODE).map(str::trim) {
        None | Some("balanced") => false,
        Some("persistent") => true,
        Some(other) => {
            let reason = format!(
                "{} is neither balanced nor persistent: balanced applies",
                quoted(other)
            );
            src.bad(AFFINITY_MODE, reason);
            false
        }
    };
    Some(Affinity {
        cookie_name,
        path,
        max_age: src.seconds(SESSION_COOKIE_MAX_AGE).map(|d| d.as_secs()),
        expires: src.seconds(SESSION_COOKIE_EXPIRES).map(|d| d.as_secs()),
        samesite,
        persistent,
    })
}

/// The `limit-*` annotations: whole numbers above 0 (a bad one is left out);
/// `limit-burst-multiplier` defaults to 5.
fn limits(src: &mut Source<'_>) -> Option<Limits> {
    let count = |src: &mut Source<'_>, name: &str| {
        let value = src.get(name)?;
        match value.trim().parse::<u32>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                let reason = format!(
                    "{} is not a whole number above 0: no such limit",
                    quoted(value)
                );
                src.bad(name, reason);
                None
            }
        }
    };
    let rps = count(src, LIMIT_RPS);
    let rpm = count(src, LIMIT_RPM);
    let connections = count(src, LIMIT_CONNECTIONS);
    let burst_multiplier = if src.get(LIMIT_BURST_MULTIPLIER).is_some() {
        count(src, LIMIT_BURST_MULTIPLIER).unwrap_or(5)
    } else {
        5
    };
    (rps.is_some() || rpm.is_some() || connections.is_some()).then_some(Limits {
        rps,
        rpm,
        connections,
        burst_multiplier,
    })
}

/// `backend-protocol` (case-insensitive, as ingress-nginx; an unknown value keeps
/// HTTP) and the `proxy-ssl-*` switches; a protocol xlb cannot speak is refused.
fn backend(src: &mut Source<'_>) -> (Backend, Option<(String, &'static str)>) {
    let mut refused = None;
    let protocol = match src
        .get(BACKEND_PROTOCOL)
        .map(|v| v.trim().to_ascii_uppercase())
    {
        None => None,
        Some(v) => match v.as_str() {
            "HTTP" => Some(BackendProtocol::Http),
            "HTTPS" => Some(BackendProtocol::Https),
            "GRPC" => Some(BackendProtocol::Grpc),
            "GRPCS" => Some(BackendProtocol::Grpcs),
            "H2C" => Some(BackendProtocol::H2c),
            "AUTO_HTTP" | "FCGI" | "AJP" => {
                refused = Some((src.full(BACKEND_PROTOCOL), REFUSED_PROTOCOL));
                None
            }
            _ => {
                let reason = format!(
                    "{} is not HTTP, HTTPS, GRPC, GRPCS or H2C: HTTP applies",
                    quoted(&v)
                );
                src.bad(BACKEND_PROTOCOL, reason);
                Some(BackendProtocol::Http)
            }
        },
    };
    let name = match src.get(PROXY_SSL_NAME) {
        None => None,
        Some(_) => src.text(PROXY_SSL_NAME).filter(|name| {
            let ok = rustls_pki_types::ServerName::try_from(name.as_str()).is_ok();
            if !ok {
                let reason = format!("{} is not a DNS name or IP address", quoted(name));
                src.bad(PROXY_SSL_NAME, reason);
            }
            ok
        }),
    };
    let backend = Backend {
        protocol,
        verify: src.on_off(PROXY_SSL_VERIFY).unwrap_or(false),
        secret: src.get(PROXY_SSL_SECRET).map(|v| v.trim().to_owned()),
        name,
        sni: src.on_off(PROXY_SSL_SERVER_NAME).unwrap_or(false),
    };
    (backend, refused)
}

/// The `canary-*` rules; a bad value is left out (weight: 0).
fn canary(src: &mut Source<'_>) -> CanaryRules {
    let number = |src: &mut Source<'_>, name: &str, default: u32| match src.get(name) {
        None => default,
        Some(v) => v.trim().parse().unwrap_or_else(|_| {
            let reason = format!("{} is not a whole number: {default} applies", quoted(v));
            src.bad(name, reason);
            default
        }),
    };
    let mut weight_total = number(src, CANARY_WEIGHT_TOTAL, 100);
    if weight_total == 0 {
        src.bad(CANARY_WEIGHT_TOTAL, "is 0: 100 applies".to_owned());
        weight_total = 100;
    }
    let mut weight = number(src, CANARY_WEIGHT, 0);
    if weight > weight_total {
        let reason =
            format!("{weight} is above the total {weight_total}: every request goes to the canary");
        src.bad(CANARY_WEIGHT, reason);
        weight = weight_total;
    }
    let by_header = src
        .get(CANARY_BY_HEADER)
        .map(|v| v.trim().to_owned())
        .filter(|v| header_name(v));
    if by_header.is_none() && src.get(CANARY_BY_HEADER).is_some() {
        src.bad(CANARY_BY_HEADER, "is not a header name".to_owned());
    }
    let header_pattern = match src.get(CANARY_BY_HEADER_PATTERN) {
        None => None,
        Some(p) => match PathRegex::plain(p) {
            Ok(re) => Some(re),
            Err(why) => {
                src.bad(
                    CANARY_BY_HEADER_PATTERN,
                    format!("{} is not a regular expression: {why}", quoted(p)),
                );
                None
            }
        },
    };
    CanaryRules {
        by_header,
        header_value: src.get(CANARY_BY_HEADER_VALUE).map(str::to_owned),
        header_pattern,
        by_cookie: src
            .get(CANARY_BY_COOKIE)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty()),
        weight,
        weight_total,
    }
}

/// An HTTP field name (RFC 9110 token).
fn header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// `*`, or `http(s)://host[:port]` where the host may start with `*.`.
fn valid_origin(origin: &str) -> bool {
    if origin == "*" {
        return true;
    }
    let lower = origin.to_ascii_lowercase();
    let Some(rest) = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"))
    else {
        return false;
    };
    let rest = rest.strip_prefix("*.").unwrap_or(rest);
    let (host, port) = rest.split_once(':').unwrap_or((rest, "0"));
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && port.parse::<u16>().is_ok()
}

/// The source ranges. A list with a bad entry fails closed: the routes refuse every
/// client until it is fixed (ingress-nginx denies such a location too).
fn access(src: &mut Source<'_>) -> Option<Access> {
    let ranges = |src: &mut Source<'_>, name: &str| -> Result<Vec<IpNet>, ()> {
        let Some(value) = src.get(name) else {
            return Ok(Vec::new());
        };
        let mut nets = Vec::new();
        for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let net = item
                .parse::<IpNet>()
                .or_else(|_| item.parse::<std::net::IpAddr>().map(IpNet::from));
            let Ok(net) = net else {
                let reason = format!(
                    "{} is not an address or CIDR range: every client is refused (403) \
                     until this is fixed",
                    quoted(item)
                );
                src.bad(name, reason);
                return Err(());
            };
            nets.push(net.trunc());
        }
        Ok(nets)
    };
    let allow_name = if src.get(ALLOWLIST_SOURCE_RANGE).is_some() {
        ALLOWLIST_SOURCE_RANGE
    } else {
        WHITELIST_SOURCE_RANGE
    };
    let everyone = || {
        Some(Access {
            allow: Vec::new(),
            // 0.0.0.0/0 and ::/0.
            deny: vec![
                IpNet::V4(ipnet::Ipv4Net::default()),
                IpNet::V6(ipnet::Ipv6Net::default()),
            ],
        })
    };
    let Ok(allow) = ranges(src, allow_name) else {
        return everyone();
    };
    let Ok(deny) = ranges(src, DENYLIST_SOURCE_RANGE) else {
        return everyone();
    };
    (!allow.is_empty() || !deny.is_empty()).then_some(Access { allow, deny })
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
