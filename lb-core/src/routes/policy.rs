//! What a route does to a request besides forwarding it, from its Ingress's
//! ingress-nginx annotations: redirects, `app-root`, `rewrite-target`, the upstream
//! `Host`, `X-Forwarded-Prefix`. Pure: the proxy asks, these answer.

use std::fmt;
use std::net::IpAddr;

use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use regex::Regex;

use super::Upstream;
use super::auth::{BasicAuth, ExternalAuth};
use crate::cluster::ObjectKey;

/// The per-route behaviour the annotations ask for; [`Default`]: none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// `permanent-redirect` / `temporal-redirect`: every request is answered with this.
    pub redirect: Option<Redirect>,
    /// `app-root`: a request for `/` is answered 302 to this path.
    pub app_root: Option<String>,
    /// `rewrite-target`: the path the backend sees.
    pub rewrite: Option<Rewrite>,
    /// `upstream-vhost`: the `Host` the backend sees.
    pub upstream_vhost: Option<String>,
    /// `x-forwarded-prefix`: sent as `X-Forwarded-Prefix`.
    pub forwarded_prefix: Option<String>,
    /// `enable-cors` and its `cors-*` settings.
    pub cors: Option<Cors>,
    /// `allowlist-source-range` (or `whitelist-`) and `denylist-source-range`.
    pub access: Option<Access>,
    /// The canary Ingress for the same host and path, if any.
    pub canary: Option<Arc<Canary>>,
    /// `affinity: cookie` and its `session-cookie-*` settings.
    pub affinity: Option<Affinity>,
    /// `limit-rps`, `limit-rpm`, `limit-connections`, `limit-burst-multiplier`.
    pub limits: Option<Limits>,
    /// `proxy-connect-timeout`: connecting to one endpoint.
    pub connect_timeout: Option<Duration>,
    /// `proxy-read-timeout`: from choosing a backend to its response head (the
    /// proxy's request timeout for this route).
    pub read_timeout: Option<Duration>,
    /// `proxy-send-timeout`: the longest a write to the backend may stay pending
    /// (nginx's `proxy_send_timeout`: between two successive writes, not the whole
    /// request).
    pub send_timeout: Option<Duration>,
    /// `auth-url` and its `auth-*` settings (nginx's `auth_request`).
    pub external_auth: Option<Arc<ExternalAuth>>,
    /// `auth-type: basic` with the users of its `auth-secret`.
    pub basic_auth: Option<Arc<BasicAuth>>,
    /// Why every request to the route is answered 503: an authentication annotation
    /// it needs is broken or its Secret is missing (ingress-nginx's denied location),
    /// so it is never served unauthenticated.
    pub denied: Option<String>,
}

/// An ingress-nginx canary: another Ingress (`canary: "true"`) for the same host and
/// path whose backend takes some of the requests. Rules by precedence: header, then
/// cookie, then weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canary {
    pub upstream: Arc<Upstream>,
    /// The canary Ingress.
    pub ingress: ObjectKey,
    /// `canary-by-header`: `always` sends to the canary, `never` does not, any other
    /// value goes on to the next rule, unless `value` or `pattern` is set.
    pub by_header: Option<String>,
    /// `canary-by-header-value`: this exact value sends to the canary.
    pub header_value: Option<String>,
    /// `canary-by-header-pattern` (used when no `header_value`): a matching value sends
    /// to the canary.
    pub header_pattern: Option<PathRegex>,
    /// `canary-by-cookie`: `always` / `never`, other values go on to the weight.
    pub by_cookie: Option<String>,
    /// `canary-weight` out of `canary-weight-total` (default 100).
    pub weight: u32,
    pub weight_total: u32,
}

/// ingress-nginx's cookie affinity: a request carrying the cookie goes to the endpoint
/// it names while that endpoint is usable; otherwise the balancer picks and the answer
/// sets the cookie. The value is a hash of the upstream and endpoint, not the address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Affinity {
    /// `session-cookie-name` (default `INGRESSCOOKIE`).
    pub cookie_name: String,
    /// `session-cookie-path` (default: the rule's path, `/` for regex paths).
    pub path: String,
    /// `session-cookie-max-age`, seconds.
    pub max_age: Option<u64>,
    /// `session-cookie-expires`, seconds from when the cookie is set.
    pub expires: Option<u64>,
    /// `session-cookie-samesite`: `None`, `Lax` or `Strict`.
    pub samesite: Option<String>,
    /// `affinity-mode: persistent` (else `balanced`).
    pub persistent: bool,
}

impl Affinity {
    /// The cookie value naming `endpoint` of `upstream` (FNV-1a, stable across
    /// restarts and agents, so a rolling restart keeps sessions).
    pub fn token(upstream: &str, endpoint: std::net::SocketAddr) -> String {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in upstream
            .bytes()
            .chain([0])
            .chain(endpoint.to_string().bytes())
        {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{hash:016x}")
    }
}

/// ingress-nginx's per-client limits (per client address, per Ingress).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub rps: Option<u32>,
    pub rpm: Option<u32>,
    /// Requests in flight at once.
    pub connections: Option<u32>,
    /// The burst is the rate times this (default 5).
    pub burst_multiplier: u32,
}

/// What the header and cookie rules say for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CanaryVerdict {
    Canary,
    Main,
    /// Neither rule decided: the weight does.
    ByWeight,
}

impl Canary {
    /// `header`: the value of `by_header` in the request; `cookie`: the value of the
    /// `by_cookie` cookie.
    pub fn verdict(&self, header: Option<&str>, cookie: Option<&str>) -> CanaryVerdict {
        if let Some(value) = header {
            if let Some(wanted) = &self.header_value {
                if value == wanted {
                    return CanaryVerdict::Canary;
                }
            } else if let Some(pattern) = &self.header_pattern {
                if pattern.is_match(value) {
                    return CanaryVerdict::Canary;
                }
            } else if value == "always" {
                return CanaryVerdict::Canary;
            } else if value == "never" {
                return CanaryVerdict::Main;
            }
        }
        match cookie {
            Some("always") => CanaryVerdict::Canary,
            Some("never") => CanaryVerdict::Main,
            _ => CanaryVerdict::ByWeight,
        }
    }
}

/// ingress-nginx's CORS: for a request whose `Origin` is allowed, the
/// `Access-Control-*` headers are added to the answer, and a preflight (`OPTIONS`) is
/// answered 204 by the hop itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cors {
    /// `cors-allow-origin` (default `*`): `*`, or origins such as `https://a.example`
    /// and `https://*.example.com` (one label), compared case-insensitively.
    pub allow_origin: Vec<String>,
    pub allow_methods: String,
    pub allow_headers: String,
    pub expose_headers: String,
    pub allow_credentials: bool,
    pub max_age: u32,
}

impl Cors {
    /// The `Access-Control-Allow-Origin` value for a request's `Origin`, or `None` when
    /// that origin is not allowed (no CORS headers then).
    pub fn allowed_origin<'o>(&self, origin: &'o str) -> Option<&'o str> {
        if self.allow_origin.iter().any(|a| a == "*") {
            return Some("*");
        }
        let lower = origin.to_ascii_lowercase();
        self.allow_origin
            .iter()
            .any(|allowed| origin_matches(allowed, &lower))
            .then_some(origin)
    }
}

/// `allowed` (lower case) against an origin (lower case): equal, or `scheme://*.rest`
/// matching exactly one label in place of the `*`.
fn origin_matches(allowed: &str, origin: &str) -> bool {
    if allowed == origin {
        return true;
    }
    let Some((scheme, rest)) = allowed.split_once("://*.") else {
        return false;
    };
    let Some(host) = origin
        .strip_prefix(scheme)
        .and_then(|o| o.strip_prefix("://"))
    else {
        return false;
    };
    host.split_once('.')
        .is_some_and(|(label, tail)| !label.is_empty() && tail == rest)
}

/// Source ranges, checked against the client's socket address (IPv4-mapped IPv6 as
/// IPv4): a client outside a non-empty allowlist, or inside the denylist, gets 403.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
}

impl Access {
    pub fn permits(&self, client: IpAddr) -> bool {
        let client = client.to_canonical();
        let inside = |nets: &[IpNet]| nets.iter().any(|n| n.contains(&client));
        (self.allow.is_empty() || inside(&self.allow)) && !inside(&self.deny)
    }
}

/// A fixed redirect: status and `Location`, as nginx's `return CODE URL` (the request's
/// path is not appended).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub code: u16,
    pub location: String,
}

/// A regular expression as ingress-nginx writes it into nginx: case-insensitive.
#[derive(Clone)]
pub struct PathRegex(Regex);

impl PathRegex {
    /// `(?i)` + `pattern`; `anchored` adds `^` (a location match; a rewrite is not
    /// anchored). The error says why the pattern is not a regular expression (Rust's
    /// `regex` syntax: no look-around or back-references, unlike nginx's PCRE).
    pub fn new(pattern: &str, anchored: bool) -> Result<Self, String> {
        let anchor = if anchored { "^" } else { "" };
        regex::RegexBuilder::new(&format!("(?i){anchor}{pattern}"))
            .size_limit(1 << 20)
            .build()
            .map(PathRegex)
            .map_err(|e| match e {
                regex::Error::Syntax(text) => text.lines().last().unwrap_or("").to_owned(),
                other => other.to_string(),
            })
    }

    /// `pattern` as written: case-sensitive, not anchored (a canary header pattern, as
    /// ingress-nginx's Lua matches it).
    pub fn plain(pattern: &str) -> Result<Self, String> {
        regex::RegexBuilder::new(pattern)
            .size_limit(1 << 20)
            .build()
            .map(PathRegex)
            .map_err(|e| match e {
                regex::Error::Syntax(text) => text.lines().last().unwrap_or("").to_owned(),
                other => other.to_string(),
            })
    }

    pub fn is_match(&self, path: &str) -> bool {
        self.0.is_match(path)
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl PartialEq for PathRegex {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Eq for PathRegex {}

impl fmt::Debug for PathRegex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}/", self.0.as_str())
    }
}

/// nginx's `rewrite "(?i)PATH" TARGET break;` as ingress-nginx renders
/// `rewrite-target`: when the route's path (a regular expression, not anchored)
/// matches the request's path, the whole path is replaced by the target with `$1`..`$9`
/// set to the captures (an absent group is empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    pub pattern: PathRegex,
    pub target: String,
}

impl Rewrite {
    /// The backend's path and query for a request's `path` and `query`: `None` when the
    /// pattern does not match (the request goes unchanged). As nginx, the request's
    /// query is kept, after the target's own when the target has one.
    pub fn apply(&self, path: &str, query: Option<&str>) -> Option<String> {
        let caps = self.pattern.0.captures(path)?;
        let mut out = String::with_capacity(self.target.len() + path.len());
        let mut chars = self.target.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '$'
                && let Some(digit) = chars.peek().and_then(|d| d.to_digit(10))
            {
                chars.next();
                let group = usize::try_from(digit).unwrap_or(0);
                out.push_str(caps.get(group).map_or("", |m| m.as_str()));
            } else {
                out.push(c);
            }
        }
        if !out.starts_with('/') {
            out.insert(0, '/');
        }
        match query.filter(|q| !q.is_empty()) {
            Some(q) if out.contains('?') => {
                out.push('&');
                out.push_str(q);
            }
            Some(q) => {
                out.push('?');
                out.push_str(q);
            }
            None => {}
        }
        Some(out)
    }
}
