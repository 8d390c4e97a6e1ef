//! The routing table the proxy consults per request: host, then path, then the
//! default backend. Built by `model::ingress`; pure data, no I/O.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::source::cluster::ObjectKey;

/// Where one route sends requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `namespace/service:port`, stable across rebuilds: the key the proxy keeps its
    /// balancing state and connection pools under.
    pub name: String,
    pub target: Target,
    /// HTTP/1.1, or HTTP/2 without TLS when the Service port says
    /// `appProtocol: kubernetes.io/h2c`.
    pub protocol: UpstreamProtocol,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Ready endpoints of a Service port (serving-and-terminating when none is ready, as
    /// for L4). Empty: the proxy answers 503.
    Endpoints(Vec<SocketAddr>),
    /// An ExternalName Service: resolved by DNS in the proxy, re-resolved at a bounded
    /// interval.
    Dns { host: String, port: u16 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    H2c,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    #[default]
    RoundRobin,
    /// Power of two choices on in-flight requests.
    LeastRequest,
}

/// What a matched rule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub upstream: Arc<Upstream>,
    /// The Ingress the rule came from (for logs and the conflict rule).
    pub ingress: ObjectKey,
    /// Answer plain HTTP with a 308 to `https://` (host has TLS and the Ingress did not
    /// turn it off, or force-ssl-redirect).
    pub ssl_redirect: bool,
    pub balance: Balance,
    /// Request body limit in bytes (413 above it); `None`: the proxy's default.
    pub max_body_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    Exact,
    /// Element-wise prefix on `/` (ImplementationSpecific is treated as Prefix).
    Prefix,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRule {
    pub path: String,
    pub kind: PathKind,
    pub route: Route,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// Lower case, no port.
    Exact(String),
    /// `*.example.com`, stored as `.example.com`: matches exactly one more label.
    Wildcard(String),
    /// A rule without a host.
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRule {
    pub host: HostPattern,
    pub paths: Vec<PathRule>,
}

/// Host rules (already merged across Ingresses, conflicts resolved) and the default
/// backend.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    rules: Vec<HostRule>,
    default: Option<Route>,
}

impl RouteTable {
    pub fn new(rules: Vec<HostRule>, default: Option<Route>) -> Self {
        Self { rules, default }
    }

    /// The route for a request's Host header (any case, may carry `:port`) and path
    /// (query string already removed or not: it is ignored). `None`: 404.
    ///
    /// PLACEHOLDER until the routing helper lands: first matching rule wins.
    pub fn lookup(&self, host: &str, path: &str) -> Option<&Route> {
        let host = host.split(':').next().unwrap_or("").to_ascii_lowercase();
        let path = path.split('?').next().unwrap_or("");
        for rule in &self.rules {
            let host_ok = match &rule.host {
                HostPattern::Exact(h) => *h == host,
                HostPattern::Wildcard(suffix) => host
                    .strip_suffix(suffix.as_str())
                    .is_some_and(|label| !label.is_empty() && !label.contains('.')),
                HostPattern::Any => true,
            };
            if !host_ok {
                continue;
            }
            for p in &rule.paths {
                let ok = match p.kind {
                    PathKind::Exact => p.path == path,
                    PathKind::Prefix => path.starts_with(&p.path),
                };
                if ok {
                    return Some(&p.route);
                }
            }
        }
        self.default.as_ref()
    }

    pub fn rules(&self) -> &[HostRule] {
        &self.rules
    }

    pub fn default_route(&self) -> Option<&Route> {
        self.default.as_ref()
    }
}
