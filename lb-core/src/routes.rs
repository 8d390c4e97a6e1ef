//! The routing table the proxy consults per request: host, then path, then the
//! default backend. Built by `model::ingress`; pure data, no I/O.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::cluster::ObjectKey;

pub mod auth;
mod policy;

pub use auth::{BasicAuth, ExternalAuth};
pub use policy::{
    Access, Affinity, Canary, CanaryVerdict, Cors, Limits, PathRegex, Policy, Redirect, Rewrite,
};

/// Where one route sends requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `namespace/service:port`, stable across rebuilds: the key the proxy keeps its
    /// balancing state and connection pools under.
    pub name: String,
    pub target: Target,
    /// HTTP/1.1, or HTTP/2 when the Service port says `appProtocol: kubernetes.io/h2c`
    /// or the Ingress's `backend-protocol` is `GRPC`, `GRPCS` or `H2C`.
    pub protocol: UpstreamProtocol,
    /// TLS to the backend (`backend-protocol: HTTPS` or `GRPCS`); `None`: cleartext.
    pub tls: Option<Arc<UpstreamTls>>,
}

/// How the hop speaks TLS to a backend: ingress-nginx's `proxy-ssl-*` annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// `proxy-ssl-verify: on`: the backend's certificate must chain to `ca` and be
    /// valid for `name`; off (the default, as in ingress-nginx): anything is accepted.
    pub verify: bool,
    /// `ca.crt` of the `proxy-ssl-secret`.
    pub ca: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// `tls.crt` and `tls.key` of the `proxy-ssl-secret`: the client certificate.
    pub client: Option<Arc<crate::model::ingress::KeyPair>>,
    /// `proxy-ssl-name`, else the Service's DNS name (`NAME.NAMESPACE.svc`) or the
    /// ExternalName: the name verified, and sent as SNI when `sni` is set.
    pub name: String,
    /// `proxy-ssl-server-name: on`: send `name` as SNI (off by default, as nginx).
    pub sni: bool,
}

impl UpstreamTls {
    /// A stable digest of the settings: connections made with different settings are
    /// never shared, the same settings across snapshots keep their pooled connections.
    pub fn digest(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        self.verify.hash(&mut h);
        self.sni.hash(&mut h);
        self.name.hash(&mut h);
        for ca in &self.ca {
            ca.as_ref().hash(&mut h);
        }
        if let Some(client) = &self.client {
            for cert in &client.chain {
                cert.as_ref().hash(&mut h);
            }
            client.key.secret_der().hash(&mut h);
        }
        h.finish()
    }
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    /// HTTP/2 from the first byte (prior knowledge): cleartext h2c, or inside TLS
    /// (ALPN `h2`) when the upstream has [`UpstreamTls`].
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
    /// Redirects, rewrites and headers the Ingress's annotations ask for.
    pub policy: Arc<Policy>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    Exact,
    /// Element-wise prefix on `/` (ImplementationSpecific is treated as Prefix).
    Prefix,
    /// ingress-nginx's `use-regex` (or `rewrite-target`): `(?i)^PATH`, tried longest
    /// path first, the first match wins. The translation makes every path of a host
    /// a regex once one Ingress for that host asks, as ingress-nginx does.
    Regex,
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
/// backend, indexed for [`lookup`](Self::lookup).
///
/// Precedence: the most specific host group that exists for the request's host decides
/// (exact host, else the `*.` wildcard one label up, else the host-less rules); then the
/// longest matching path inside that group; then the default backend; else `None`
/// (404). A host group whose paths do not match does NOT fall through to the host-less
/// rules: as in ingress-nginx, where every host is a server of its own and host-less
/// rules live in the catch-all server that a request for a known host never reaches, so
/// routes do not change when someone else adds a host-less Ingress.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    rules: Vec<HostRule>,
    default: Option<Route>,
    exact_hosts: Map<Paths>,
    /// Keyed by the suffix with its dot: `.example.com`.
    wildcard_hosts: Map<Paths>,
    any_host: Option<Paths>,
    /// `ssl-passthrough`: TLS for these exact hosts (lower case) goes to the upstream
    /// untouched, chosen by the ClientHello's SNI.
    passthrough: HashMap<String, Arc<Upstream>>,
}

/// One host group's paths; `(rule, path)` indexes into `RouteTable::rules`.
#[derive(Debug, Clone, Default)]
struct Paths {
    /// Regex paths in ingress-nginx's order (longest path first, then reverse
    /// lexicographic), tried before the others.
    regex: Vec<(PathRegex, (usize, usize))>,
    exact: Map<(usize, usize)>,
    /// Prefix paths by their elements ([`prefix_key`]: without the trailing `/`, `/`
    /// itself is the empty string).
    prefix: Map<Prefixes>,
}

/// The maps a lookup hashes the request's host and path into (see `Cargo.toml`).
type Map<V> = HashMap<String, V, foldhash::fast::RandomState>;

/// The Prefix paths with the same elements: written without and with a trailing `/`
/// (`/foo` and `/foo/`), two routes.
#[derive(Debug, Clone, Copy, Default)]
struct Prefixes {
    bare: Option<(usize, usize)>,
    slashed: Option<(usize, usize)>,
}

impl Prefixes {
    /// Both match the same requests (Kubernetes ignores the trailing `/`); the longest
    /// path that the request's path literally starts with wins: `/foo/` for `/foo/`
    /// and below, `/foo` for `/foo` itself. The other one is the fallback.
    fn pick(&self, request_ends_here: bool) -> Option<(usize, usize)> {
        if request_ends_here {
            self.bare.or(self.slashed)
        } else {
            self.slashed.or(self.bare)
        }
    }
}

/// The longest host name DNS allows is 253 characters; longer Host headers match no
/// named host.
const MAX_HOST: usize = 255;

impl RouteTable {
    /// The table with `ssl-passthrough` hosts (exact, lower case) and their upstreams.
    #[must_use]
    pub fn with_passthrough(mut self, hosts: HashMap<String, Arc<Upstream>>) -> Self {
        self.passthrough = hosts;
        self
    }

    /// The upstream TLS for SNI name `sni` is passed to untouched, if any.
    pub fn passthrough(&self, sni: &str) -> Option<&Arc<Upstream>> {
        if self.passthrough.is_empty() {
            return None;
        }
        self.passthrough.get(&sni.to_ascii_lowercase())
    }

    /// Indexes `rules`. Several rules for the same host are one group; when two path
    /// rules of a group have the same path and kind (a Prefix path's trailing `/`
    /// counts: `/foo` and `/foo/` are two routes), the first one wins; the translation
    /// resolved such conflicts before, so this only keeps lookups deterministic.
    pub fn new(rules: Vec<HostRule>, default: Option<Route>) -> Self {
        let mut exact_hosts: Map<Paths> = Map::default();
        let mut wildcard_hosts: Map<Paths> = Map::default();
        let mut any_host: Option<Paths> = None;
        for (ri, rule) in rules.iter().enumerate() {
            let group = match &rule.host {
                HostPattern::Exact(h) => exact_hosts.entry(h.to_ascii_lowercase()).or_default(),
                HostPattern::Wildcard(suffix) => wildcard_hosts
                    .entry(suffix.to_ascii_lowercase())
                    .or_default(),
                HostPattern::Any => any_host.get_or_insert_with(Paths::default),
            };
            for (pi, path) in rule.paths.iter().enumerate() {
                match path.kind {
                    PathKind::Exact => {
                        group.exact.entry(path.path.clone()).or_insert((ri, pi));
                    }
                    PathKind::Prefix => {
                        let key = prefix_key(&path.path);
                        let entry = group.prefix.entry(key.to_owned()).or_default();
                        let slot = if key.len() < path.path.len() {
                            &mut entry.slashed
                        } else {
                            &mut entry.bare
                        };
                        slot.get_or_insert((ri, pi));
                    }
                    // The translation checked the pattern; a bad one cannot match.
                    PathKind::Regex => {
                        if let Ok(re) = PathRegex::new(&path.path, true) {
                            group.regex.push((re, (ri, pi)));
                        }
                    }
                }
            }
        }
        // ingress-nginx sorts a server's locations by path, descending, then (stably)
        // by length, descending; nginx takes the first regex location that matches.
        let order = |group: &mut Paths| {
            group.regex.sort_by(|(_, (ra, pa)), (_, (rb, pb))| {
                let a = &rules[*ra].paths[*pa].path;
                let b = &rules[*rb].paths[*pb].path;
                b.len().cmp(&a.len()).then_with(|| b.cmp(a))
            });
        };
        exact_hosts.values_mut().for_each(order);
        wildcard_hosts.values_mut().for_each(order);
        if let Some(group) = any_host.as_mut() {
            order(group);
        }
        Self {
            rules,
            default,
            exact_hosts,
            wildcard_hosts,
            any_host,
            passthrough: HashMap::new(),
        }
    }

    /// The route for a request's Host header (any case, may carry `:port`) and path
    /// (a query string is ignored). `None`: 404. Allocates nothing.
    pub fn lookup(&self, host: &str, path: &str) -> Option<&Route> {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        let mut buf = [0u8; MAX_HOST];
        let group = match lower_host(host, &mut buf) {
            Some(host) => self.host_group(host),
            None => self.any_host.as_ref(),
        };
        let Some(group) = group else {
            return self.default.as_ref();
        };
        match group.find(path) {
            Some((ri, pi)) => Some(&self.rules[ri].paths[pi].route),
            None => self.default.as_ref(),
        }
    }

    /// The route for `host` and `path` only when some rule names that host (exactly or
    /// by wildcard): no host-less rule, no default backend. An `auth-url` on a host the
    /// hop serves itself is sent to that route's backend without leaving the hop.
    pub fn lookup_named(&self, host: &str, path: &str) -> Option<&Route> {
        let mut buf = [0u8; MAX_HOST];
        let host = lower_host(host, &mut buf)?;
        let named = self.exact_hosts.contains_key(host)
            || host
                .find('.')
                .is_some_and(|dot| dot > 0 && self.wildcard_hosts.contains_key(&host[dot..]));
        let (ri, pi) = self.host_group(host).filter(|_| named)?.find(path)?;
        Some(&self.rules[ri].paths[pi].route)
    }

    fn host_group(&self, host: &str) -> Option<&Paths> {
        if let Some(group) = self.exact_hosts.get(host) {
            return Some(group);
        }
        if let Some(dot) = host.find('.')
            && dot > 0
            && let Some(group) = self.wildcard_hosts.get(&host[dot..])
        {
            return Some(group);
        }
        self.any_host.as_ref()
    }

    pub fn rules(&self) -> &[HostRule] {
        &self.rules
    }

    pub fn default_route(&self) -> Option<&Route> {
        self.default.as_ref()
    }
}

impl Paths {
    /// As the Kubernetes API's PathType documentation says: the longest matching path
    /// wins, and Exact beats Prefix at equal length. An Exact match is as long as the
    /// request's path, so it beats every Prefix. Then the longest element-wise prefix:
    /// the path itself, then each of its `/` boundaries from the right, the empty key
    /// (`/`) last; at one boundary, `/foo` and `/foo/` are told apart by
    /// [`Prefixes::pick`].
    fn find(&self, path: &str) -> Option<(usize, usize)> {
        if let Some((_, hit)) = self.regex.iter().find(|(re, _)| re.is_match(path)) {
            return Some(*hit);
        }
        if let Some(hit) = self.exact.get(path) {
            return Some(*hit);
        }
        if self.prefix.is_empty() {
            return None;
        }
        if let Some(hit) = self.prefix.get(path).and_then(|p| p.pick(true)) {
            return Some(hit);
        }
        let mut end = path.len();
        while let Some(slash) = path[..end].rfind('/') {
            if let Some(hit) = self.prefix.get(&path[..slash]).and_then(|p| p.pick(false)) {
                return Some(hit);
            }
            end = slash;
        }
        None
    }
}

/// A Prefix path's elements as the index stores them: without trailing slashes, so
/// `/foo/` and `/foo` match the same requests and `/` is the empty string.
pub fn prefix_key(path: &str) -> &str {
    path.trim_end_matches('/')
}

/// The Host header's name, lower-cased into `buf`, without `:port` (an IPv6 literal
/// keeps its brackets) and without a trailing dot. `None` when too long to be a DNS
/// name or empty.
fn lower_host<'b>(host: &str, buf: &'b mut [u8; MAX_HOST]) -> Option<&'b str> {
    let name = if host.starts_with('[') {
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > MAX_HOST {
        return None;
    }
    let out = &mut buf[..name.len()];
    out.copy_from_slice(name.as_bytes());
    out.make_ascii_lowercase();
    // Lower-casing ASCII bytes keeps UTF-8 valid.
    std::str::from_utf8(out).ok()
}

#[cfg(test)]
mod tests;
