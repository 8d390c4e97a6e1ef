//! Ingresses to the L7 hop's route table and certificates: pure translation from the
//! cluster index (Ingresses of our class, their Services, EndpointSlices and TLS Secrets).
//!
//! Which Ingresses are ours: `spec.ingressClassName` equal to our class name; else the
//! deprecated annotation `kubernetes.io/ingress.class` equal to it; else, with neither,
//! when our IngressClass (named like our class, `spec.controller` [`CONTROLLER`]) carries
//! `ingressclass.kubernetes.io/is-default-class: "true"`.
//!
//! Merging: the rules of all our Ingresses form one table. Hosts are exact (lower-cased),
//! `*.example.com` (one label) or absent (every host); a request uses the most specific
//! host group that exists and does not fall through to the host-less rules when no path
//! of that group matches (see [`RouteTable`]). Ingresses are taken oldest first
//! (`metadata.creationTimestamp`, one without it counts as newest, then namespace/name):
//! when two rules have the same host, path and path type, or two Ingresses set
//! `spec.defaultBackend`, the older one wins, as in ingress-nginx, and the other gets a
//! problem naming its field. ImplementationSpecific paths are Prefix paths; two Prefix
//! paths that differ only by a trailing `/` are two routes (see [`RouteTable`]).
//!
//! Backends: `service.name` in the Ingress's namespace, `service.port.number` or `.name`
//! matched against the Service's ports; endpoints are the L4 translation's usable ones
//! ([`usable_endpoints`]). An ExternalName Service becomes a DNS target on the Ingress's
//! port number. A missing Service or port keeps its routes with no endpoints (the proxy
//! answers 503, rather than some other backend answering) and reports a problem.
//! `appProtocol: kubernetes.io/h2c` on the Service port speaks HTTP/2 without TLS.
//! An Ingress's `backend-protocol` overrides that for its routes (HTTP, HTTPS, GRPC,
//! GRPCS, H2C), with TLS as its `proxy-ssl-*` annotations say; the `proxy-ssl-secret`
//! must be a `kubernetes.io/tls` Secret in the Ingress's namespace (`ca.crt` trusted,
//! `tls.crt`/`tls.key` the client certificate), else the routes answer 503.
//!
//! TLS: each `spec.tls[]` entry's Secret (same namespace) gives a certificate for its
//! hosts; a missing or bad Secret is a problem and the rest applies (the proxy serves
//! its default certificate for those hosts). Hosts listed in any of our Ingresses'
//! `spec.tls` redirect plain HTTP to HTTPS.
//!
//! Annotations (per Ingress, for all its routes) are read under the prefix
//! (`nginx.ingress.kubernetes.io` unless `--annotations-prefix` says otherwise) by
//! [`annotations`]; [`catalogue`] says which are honoured. Those that change behaviour
//! without being honoured are listed in [`IngressTranslation::ignored_annotations`]; an
//! Ingress carrying a refused one (raw nginx snippets) is not served and gets a problem
//! saying why. `xlb.dev/load-balance: round-robin | least-request` is xlb's own.

pub mod annotations;
pub mod catalogue;
mod tls;

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::networking::v1::{Ingress, IngressBackend, IngressRule, IngressTLS};

use crate::cluster::{BASIC_AUTH_KEY, CA_CERT_KEY, Cluster, Kind, ObjectKey};
use crate::model::kubernetes::{Problem, usable_endpoints};
use crate::quote::quoted;
use crate::routes::auth;
use crate::routes::{BasicAuth, RouteTable};
use crate::routes::{
    Canary, HostPattern, HostRule, PathKind, PathRegex, PathRule, Route, Target, Upstream,
    UpstreamProtocol, UpstreamTls, prefix_key,
};

pub use tls::{KeyPair, SecretError, ca_certificates, key_field, key_pair};

pub use annotations::{
    DEFAULT_PREFIX, FORCE_SSL_REDIRECT, INGRESS_CLASS, IS_DEFAULT_CLASS, LOAD_BALANCE,
    PROXY_BODY_SIZE, SSL_REDIRECT, body_size,
};

/// The controller name an IngressClass must carry in `spec.controller` to be ours,
/// unless the operator names another (`--l7-controller-name`).
pub const CONTROLLER: &str = "xlb.dev/ingress-controller";

/// ingress-nginx's controller name, which an operator may ask xlb to answer to so that
/// existing Ingresses and IngressClasses move without edits.
pub const INGRESS_NGINX_CONTROLLER: &str = "k8s.io/ingress-nginx";

/// The Service port `appProtocol` that makes the hop speak HTTP/2 cleartext to it.
pub const H2C_APP_PROTOCOL: &str = "kubernetes.io/h2c";

/// Which Ingresses are ours and how their annotations are read.
#[derive(Debug, Clone)]
pub struct IngressClassConfig {
    /// The IngressClass name (`--l7-ingress-class`, default `xlb`; `nginx` to take over
    /// ingress-nginx's Ingresses).
    pub name: String,
    /// The `spec.controller` our IngressClass must name (`--l7-controller-name`,
    /// default [`CONTROLLER`]; [`INGRESS_NGINX_CONTROLLER`] to take over).
    pub controller: String,
    /// The annotation prefix (`--annotations-prefix`, default [`DEFAULT_PREFIX`]).
    pub annotations_prefix: String,
    /// What applies where an Ingress sets no annotation (ingress-nginx's ConfigMap).
    pub defaults: annotations::Defaults,
}

impl IngressClassConfig {
    /// The class `name` with xlb's controller name and ingress-nginx's prefix.
    pub fn new(name: &str) -> Self {
        IngressClassConfig {
            name: name.to_owned(),
            controller: CONTROLLER.to_owned(),
            annotations_prefix: DEFAULT_PREFIX.to_owned(),
            defaults: annotations::Defaults::default(),
        }
    }
}

#[derive(Debug, Default)]
pub struct IngressTranslation {
    /// Host and path rules, as the proxy serves them.
    pub routes: RouteTable,
    /// Certificates from the `kubernetes.io/tls` Secrets named in `spec.tls`, parsed
    /// but not yet turned into signing keys (that needs a crypto provider: the L7 hop's).
    pub certificates: Vec<CertificateSource>,
    pub problems: Vec<Problem>,
    /// The Ingresses of our class: the ones whose status the agent keeps.
    pub owned: Vec<ObjectKey>,
    /// `nginx.ingress.kubernetes.io/*` annotations of our Ingresses that have no effect.
    pub ignored_annotations: Vec<(ObjectKey, String)>,
}

/// One `spec.tls` entry's certificate: the hosts it is for and its Secret's parsed PEM.
#[derive(Debug, Clone)]
pub struct CertificateSource {
    /// The hosts `spec.tls[].hosts` lists for it (may hold `*.example.com`); empty means
    /// the certificate's own names decide.
    pub hosts: Vec<String>,
    /// The Secret it came from, for logs and problems.
    pub secret: ObjectKey,
    pub pair: Arc<KeyPair>,
}

pub fn translate(cluster: &Cluster, class: &IngressClassConfig) -> IngressTranslation {
    let mut t = Translator {
        cluster,
        problems: Vec::new(),
        upstreams: BTreeMap::new(),
        certs: BTreeMap::new(),
    };
    let default_class = t.is_default_class(class);
    let mut ours: Vec<(&ObjectKey, &Ingress)> = cluster
        .ingresses
        .iter()
        .filter(|(_, i)| is_ours(i, &class.name, default_class))
        .map(|(k, i)| (k, i.as_ref()))
        .collect();
    ours.sort_by_key(|(key, i)| {
        let created = i.metadata.creation_timestamp.as_ref();
        (created.is_none(), created, *key)
    });
    let mut table = Table {
        prefix: &class.annotations_prefix,
        defaults: class.defaults.clone(),
        tls_hosts: ours
            .iter()
            .flat_map(|(_, i)| i.spec.iter().flat_map(|s| s.tls.iter().flatten()))
            .flat_map(|tls| tls.hosts.iter().flatten())
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        ..Table::default()
    };
    let mut owned = Vec::new();
    for (key, ingress) in ours {
        if table.add(&mut t, key, ingress) {
            owned.push(key.clone());
        }
    }
    owned.sort();
    table.attach_canaries(&mut t);
    table.regex_hosts(&mut t);
    IngressTranslation {
        routes: RouteTable::new(
            table.groups.into_values().collect(),
            table.default.map(|(r, _)| r),
        )
        .with_passthrough(
            table
                .passthrough
                .into_iter()
                .map(|(host, (upstream, _))| (host, upstream))
                .collect(),
        ),
        certificates: table.certificates,
        problems: t.problems,
        owned,
        ignored_annotations: table.ignored_annotations,
    }
}

/// The Ingresses of `class` (served or refused), sorted: the ones a migration report
/// looks at.
pub fn of_class(cluster: &Cluster, class: &IngressClassConfig) -> Vec<ObjectKey> {
    let mut t = Translator {
        cluster,
        problems: Vec::new(),
        upstreams: BTreeMap::new(),
        certs: BTreeMap::new(),
    };
    let default_class = t.is_default_class(class);
    cluster
        .ingresses
        .iter()
        .filter(|(_, i)| is_ours(i, &class.name, default_class))
        .map(|(k, _)| k.clone())
        .collect()
}

/// A host group's rank (exact, wildcard, host-less) and host.
type GroupKey = (u8, String);

/// The merged routes, built one Ingress at a time, oldest first.
#[derive(Default)]
struct Table<'p> {
    /// The annotation prefix.
    prefix: &'p str,
    /// The agent's defaults for what annotations leave unset.
    defaults: annotations::Defaults,
    /// Every host in our Ingresses' `spec.tls` (lower case, may be `*.` wildcards).
    tls_hosts: Vec<String>,
    /// Host groups by (rank, host): exact, wildcard, host-less.
    groups: BTreeMap<GroupKey, HostRule>,
    /// Who routes each (group, exact?, path): the Ingress and its field.
    claimed: BTreeMap<(GroupKey, bool, String), (ObjectKey, String)>,
    /// The default backend and the Ingress that set it.
    default: Option<(Route, ObjectKey)>,
    /// Host groups some Ingress asked to treat as regular expressions (`use-regex`,
    /// `rewrite-target`).
    regex: BTreeSet<GroupKey>,
    /// Canary paths, joined to their main routes once every Ingress is in.
    canaries: Vec<PendingCanary>,
    certificates: Vec<CertificateSource>,
    ignored_annotations: Vec<(ObjectKey, String)>,
    /// `ssl-passthrough` hosts: the upstream of their `/` path and the Ingress.
    passthrough: BTreeMap<String, (Arc<Upstream>, ObjectKey)>,
}

impl Table<'_> {
    /// Adds one Ingress's rules; `false` when it is not served at all (a refused
    /// annotation).
    fn add(&mut self, t: &mut Translator<'_>, key: &ObjectKey, ingress: &Ingress) -> bool {
        let read = annotations::read(
            ingress.metadata.annotations.as_ref(),
            self.prefix,
            &self.defaults,
        );
        self.ignored_annotations
            .extend(read.ignored.into_iter().map(|(a, _)| (key.clone(), a)));
        for b in read.bad {
            t.problem(
                key,
                format!("metadata.annotations[{}]", b.annotation),
                b.reason,
            );
        }
        if !read.refused.is_empty() {
            for (annotation, why) in read.refused {
                t.problem(key, format!("metadata.annotations[{annotation}]"), why);
            }
            return false;
        }
        let mut settings = read.settings;
        if let Some(basic) = settings.basic_auth.take() {
            match t.basic_auth(key, &basic) {
                Ok(users) => settings.policy.basic_auth = Some(Arc::new(users)),
                Err((annotation, reason)) => {
                    let field = format!("metadata.annotations[{}/{annotation}]", self.prefix);
                    settings.policy.denied = Some(format!("{field}: {reason}"));
                    t.problem(
                        key,
                        field,
                        format!(
                            "{reason}: every request to its routes is answered 503 until this \
                             is fixed"
                        ),
                    );
                }
            }
        }
        let plan = t.backend_plan(key, self.prefix, &settings.backend);
        let Some(spec) = ingress.spec.as_ref() else {
            return true;
        };
        for (ti, entry) in spec.tls.iter().flatten().enumerate() {
            if let Some(cert) = t.certificate(key, ti, entry) {
                self.certificates.push(cert);
            }
        }
        if let Some(backend) = spec
            .default_backend
            .as_ref()
            .filter(|_| settings.canary.is_none())
        {
            let field = "spec.defaultBackend";
            if let Some((_, owner)) = &self.default {
                t.problem(
                    key,
                    field,
                    format!("Ingress {owner} (older) already sets the default backend"),
                );
            } else if let Some(upstream) = t.upstream(key, field, backend) {
                let upstream = plan.apply(upstream);
                self.default = Some((settings.route(upstream, key, false, None), key.clone()));
            }
        }
        for (ri, rule) in spec.rules.iter().flatten().enumerate() {
            self.add_rule(t, key, (&settings, &plan), ri, rule);
        }
        true
    }

    fn add_rule(
        &mut self,
        t: &mut Translator<'_>,
        key: &ObjectKey,
        (settings, plan): (&annotations::Settings, &BackendPlan),
        ri: usize,
        rule: &IngressRule,
    ) {
        let host = match host_pattern(rule.host.as_deref()) {
            Ok(host) => host,
            Err(reason) => {
                t.problem(key, format!("spec.rules[{ri}].host"), reason);
                return;
            }
        };
        if let Some(rules) = &settings.canary {
            self.add_canary_rule(t, key, (rules, plan), ri, rule, &host);
            return;
        }
        let tls = match &host {
            HostPattern::Any => false,
            HostPattern::Exact(h) => self.tls_hosts.iter().any(|t| covers(t, h)),
            HostPattern::Wildcard(suffix) => self
                .tls_hosts
                .iter()
                .any(|t| t.strip_prefix('*') == Some(suffix.as_str())),
        };
        let group_key = group_key(&host);
        let exact_host = match &host {
            HostPattern::Exact(h) => Some(h.clone()),
            _ => None,
        };
        let mut passthrough_root = None;
        let group = self
            .groups
            .entry(group_key.clone())
            .or_insert_with(|| HostRule {
                host,
                paths: Vec::new(),
            });
        for (pi, path) in rule.http.iter().flat_map(|h| &h.paths).enumerate() {
            let field = format!("spec.rules[{ri}].http.paths[{pi}]");
            let (kind, text) = match path_rule(path.path_type.as_str(), path.path.as_deref()) {
                Ok(p) => p,
                Err((sub, reason)) => {
                    t.problem(key, format!("{field}.{sub}"), reason);
                    continue;
                }
            };
            // `/foo` and `/foo/` are two Prefix routes; `/foo//` is `/foo/`.
            let normal = if kind == PathKind::Prefix && text.ends_with('/') {
                format!("{}/", prefix_key(&text))
            } else {
                text.clone()
            };
            match self
                .claimed
                .entry((group_key.clone(), kind == PathKind::Exact, normal))
            {
                Entry::Occupied(claim) => {
                    let (by, by_field) = claim.get();
                    let who = if by == key {
                        by_field.clone()
                    } else {
                        format!("Ingress {by} (older) {by_field}")
                    };
                    let host = rule.host.as_deref().unwrap_or("every host");
                    t.problem(
                        key,
                        field,
                        format!(
                            "{kind:?} path {} of {host} is already routed by {who}",
                            quoted(&text)
                        ),
                    );
                    continue;
                }
                Entry::Vacant(v) => {
                    v.insert((key.clone(), field.clone()));
                }
            }
            if settings.regex_for(&text) {
                if let Err(why) = PathRegex::new(&text, true) {
                    t.problem(
                        key,
                        format!("{field}.path"),
                        format!("{} is not a regular expression: {why}", quoted(&text)),
                    );
                    continue;
                }
                self.regex.insert(group_key.clone());
            }
            if let Some(upstream) = t.upstream(key, &format!("{field}.backend"), &path.backend) {
                let upstream = plan.apply(upstream);
                if settings.ssl_passthrough && text == "/" {
                    passthrough_root = Some(Arc::clone(&upstream));
                }
                let route = settings.route(upstream, key, tls, Some(&text));
                group.paths.push(PathRule {
                    path: text,
                    kind,
                    route,
                });
            }
        }
        if settings.ssl_passthrough {
            self.add_passthrough(t, key, ri, exact_host, passthrough_root);
        }
    }

    /// ingress-nginx passes TLS for an `ssl-passthrough` Ingress's host to the backend
    /// of its `/` path; the oldest Ingress wins a host.
    fn add_passthrough(
        &mut self,
        t: &mut Translator<'_>,
        key: &ObjectKey,
        ri: usize,
        host: Option<String>,
        root: Option<Arc<Upstream>>,
    ) {
        let field = format!("spec.rules[{ri}]");
        let Some(host) = host else {
            t.problem(
                key,
                format!("{field}.host"),
                "ssl-passthrough needs an exact host (TLS is routed by SNI): not passed through",
            );
            return;
        };
        let Some(root) = root else {
            t.problem(
                key,
                format!("{field}.http.paths"),
                format!("ssl-passthrough: {host} has no path / whose backend takes the TLS: not passed through"),
            );
            return;
        };
        match self.passthrough.entry(host) {
            Entry::Occupied(owner) => {
                let (host, (_, by)) = (owner.key(), owner.get());
                t.problem(
                    key,
                    format!("{field}.host"),
                    format!("ssl-passthrough for {host} is already set by Ingress {by} (older)"),
                );
            }
            Entry::Vacant(v) => {
                v.insert((root, key.clone()));
            }
        }
    }
}

/// A canary Ingress's path, waiting for the main route it joins.
struct PendingCanary {
    group: GroupKey,
    kind: PathKind,
    path: String,
    canary: Canary,
    field: String,
}

impl Table<'_> {
    fn add_canary_rule(
        &mut self,
        t: &mut Translator<'_>,
        key: &ObjectKey,
        (rules, plan): (&annotations::CanaryRules, &BackendPlan),
        ri: usize,
        rule: &IngressRule,
        host: &HostPattern,
    ) {
        for (pi, path) in rule.http.iter().flat_map(|h| &h.paths).enumerate() {
            let field = format!("spec.rules[{ri}].http.paths[{pi}]");
            let (kind, text) = match path_rule(path.path_type.as_str(), path.path.as_deref()) {
                Ok(p) => p,
                Err((sub, reason)) => {
                    t.problem(key, format!("{field}.{sub}"), reason);
                    continue;
                }
            };
            if let Some(upstream) = t.upstream(key, &format!("{field}.backend"), &path.backend) {
                self.canaries.push(PendingCanary {
                    group: group_key(host),
                    kind,
                    path: text,
                    canary: rules.canary(plan.apply(upstream), key),
                    field,
                });
            }
        }
    }

    /// Joins each canary path to the main route of the same host, path and path type
    /// (ingress-nginx's alternative backend); without one it is not served.
    fn attach_canaries(&mut self, t: &mut Translator<'_>) {
        for pending in std::mem::take(&mut self.canaries) {
            let ingress = pending.canary.ingress.clone();
            let main = self.groups.get_mut(&pending.group).and_then(|g| {
                g.paths
                    .iter_mut()
                    .find(|p| p.kind == pending.kind && p.path == pending.path)
            });
            let Some(main) = main else {
                t.problem(
                    &ingress,
                    pending.field,
                    format!(
                        "canary: no other Ingress routes {:?} path {}: not served",
                        pending.kind,
                        quoted(&pending.path)
                    ),
                );
                continue;
            };
            if let Some(other) = &main.route.policy.canary {
                t.problem(
                    &ingress,
                    pending.field,
                    format!(
                        "canary: Ingress {} is already the canary of this path",
                        other.ingress
                    ),
                );
                continue;
            }
            let mut policy = (*main.route.policy).clone();
            policy.canary = Some(Arc::new(pending.canary));
            main.route.policy = Arc::new(policy);
        }
    }

    /// Makes every path of a regex host a regex path, as ingress-nginx enforces regex
    /// locations on all paths of a host once one Ingress for it asks; a path of another
    /// Ingress that is no regular expression is dropped with a problem.
    fn regex_hosts(&mut self, t: &mut Translator<'_>) {
        for group_key in &self.regex {
            let Some(group) = self.groups.get_mut(group_key) else {
                continue;
            };
            group
                .paths
                .retain_mut(|rule| match PathRegex::new(&rule.path, true) {
                    Ok(_) => {
                        rule.kind = PathKind::Regex;
                        true
                    }
                    Err(why) => {
                        t.problem(
                            &rule.route.ingress,
                            "spec.rules[].http.paths[].path",
                            format!(
                                "{} is not a regular expression, and another Ingress for the \
                             host asks for regex paths: {why}",
                                quoted(&rule.path)
                            ),
                        );
                        false
                    }
                });
        }
    }
}

/// One Ingress's `backend-protocol` and `proxy-ssl-*` settings, its Secret read.
enum BackendPlan {
    /// No `backend-protocol`: the Service port's `appProtocol` decides.
    ServicePort,
    Set {
        protocol: UpstreamProtocol,
        /// With TLS: the settings, `name` still `None` when `proxy-ssl-name` is unset.
        tls: Option<(UpstreamTls, bool)>,
    },
    /// The TLS settings cannot be met (bad `proxy-ssl-secret`, verification without a
    /// CA): the routes answer 503, as ingress-nginx denies such a location.
    Denied,
}

impl BackendPlan {
    /// `upstream` spoken to as the plan says.
    fn apply(&self, upstream: Arc<Upstream>) -> Arc<Upstream> {
        match self {
            BackendPlan::ServicePort => upstream,
            BackendPlan::Denied => Arc::new(Upstream {
                target: Target::Endpoints(Vec::new()),
                ..(*upstream).clone()
            }),
            BackendPlan::Set { protocol, tls } => {
                let tls = tls.as_ref().map(|(tls, named)| {
                    let mut tls = tls.clone();
                    if !named {
                        tls.name = default_tls_name(&upstream);
                    }
                    Arc::new(tls)
                });
                Arc::new(Upstream {
                    protocol: *protocol,
                    tls,
                    ..(*upstream).clone()
                })
            }
        }
    }
}

/// The name a backend's certificate is checked against without `proxy-ssl-name`: the
/// Service's cluster DNS name (`NAME.NAMESPACE.svc`), or an ExternalName's host.
fn default_tls_name(upstream: &Upstream) -> String {
    if let Target::Dns { host, .. } = &upstream.target {
        return host.clone();
    }
    let service = upstream
        .name
        .rsplit_once(':')
        .map_or(upstream.name.as_str(), |(s, _)| s);
    match service.split_once('/') {
        Some((namespace, name)) => format!("{name}.{namespace}.svc"),
        None => service.to_owned(),
    }
}

struct Translator<'a> {
    cluster: &'a Cluster,
    problems: Vec<Problem>,
    /// One shared upstream per `namespace/service:port`.
    upstreams: BTreeMap<String, Arc<Upstream>>,
    /// Secrets already read (each reported once).
    certs: BTreeMap<ObjectKey, Option<Arc<KeyPair>>>,
}

impl Translator<'_> {
    fn problem(
        &mut self,
        ingress: &ObjectKey,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) {
        self.problems.push(Problem {
            kind: Kind::Ingress,
            object: ingress.clone(),
            field: field.into(),
            reason: reason.into(),
        });
    }

    /// Reads the `proxy-ssl-secret` the Ingress names (same namespace, as
    /// ingress-nginx without cross-namespace resources) into the backend plan.
    fn backend_plan(
        &mut self,
        ingress: &ObjectKey,
        prefix: &str,
        backend: &annotations::Backend,
    ) -> BackendPlan {
        let Some(protocol) = backend.protocol else {
            return BackendPlan::ServicePort;
        };
        let (protocol, with_tls) = protocol.upstream();
        if !with_tls {
            return BackendPlan::Set {
                protocol,
                tls: None,
            };
        }
        let mut tls = UpstreamTls {
            verify: backend.verify,
            ca: Vec::new(),
            client: None,
            name: backend.name.clone().unwrap_or_default(),
            sni: backend.sni,
        };
        let secret_field = format!(
            "metadata.annotations[{prefix}/{}]",
            annotations::PROXY_SSL_SECRET
        );
        if let Some(written) = &backend.secret {
            let Some(secret_key) = written
                .split_once('/')
                .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
                .map(|(ns, name)| ObjectKey::new(ns, name))
            else {
                self.problem(
                    ingress,
                    secret_field,
                    format!(
                        "{} is not NAMESPACE/NAME: its routes answer 503",
                        quoted(written)
                    ),
                );
                return BackendPlan::Denied;
            };
            if secret_key.namespace != ingress.namespace {
                self.problem(
                    ingress,
                    secret_field,
                    format!(
                        "Secret {secret_key} is in another namespace, which is not allowed: \
                         its routes answer 503"
                    ),
                );
                return BackendPlan::Denied;
            }
            let Some(secret) = self.cluster.secrets.get(&secret_key) else {
                self.problem(
                    ingress,
                    secret_field,
                    format!("Secret {secret_key} not found: its routes answer 503"),
                );
                return BackendPlan::Denied;
            };
            let read = tls::ca_certificates(secret).and_then(|ca| Ok((ca, tls::key_pair(secret)?)));
            match read {
                Ok((ca, pair)) => {
                    tls.ca = ca;
                    tls.client = Some(Arc::new(pair));
                }
                Err(e) => {
                    self.problems.push(Problem {
                        kind: Kind::Secret,
                        object: secret_key,
                        field: e.field,
                        reason: format!(
                            "{} (named by Ingress {ingress} {secret_field}): its routes answer 503",
                            e.reason
                        ),
                    });
                    return BackendPlan::Denied;
                }
            }
        }
        if tls.verify && tls.ca.is_empty() {
            let field = format!(
                "metadata.annotations[{prefix}/{}]",
                annotations::PROXY_SSL_VERIFY
            );
            self.problem(
                ingress,
                field,
                format!(
                    "is on, but no proxy-ssl-secret with {CA_CERT_KEY} says whom to trust: \
                     its routes answer 503"
                ),
            );
            return BackendPlan::Denied;
        }
        BackendPlan::Set {
            protocol,
            tls: Some((tls, backend.name.is_some())),
        }
    }

    /// Our IngressClass says it is the default; a class of our name that names another
    /// controller is reported (its Ingresses are still ours by name).
    fn is_default_class(&mut self, class: &IngressClassConfig) -> bool {
        let Some(ours) = self.cluster.ingress_classes.get(&class.name) else {
            return false;
        };
        let controller = ours.spec.as_ref().and_then(|s| s.controller.as_deref());
        if controller != Some(class.controller.as_str()) {
            self.problems.push(Problem {
                kind: Kind::IngressClass,
                object: ObjectKey::new("", &class.name),
                field: "spec.controller".into(),
                reason: format!(
                    "{} is not {}: not taken as the default class",
                    quoted(controller.unwrap_or("")),
                    class.controller
                ),
            });
            return false;
        }
        ours.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(IS_DEFAULT_CLASS))
            .is_some_and(|v| v == "true")
    }

    fn certificate(
        &mut self,
        ingress: &ObjectKey,
        index: usize,
        entry: &IngressTLS,
    ) -> Option<CertificateSource> {
        let field = format!("spec.tls[{index}].secretName");
        // No secretName: the hosts use the proxy's default certificate.
        let name = entry.secret_name.as_deref().filter(|n| !n.is_empty())?;
        let secret_key = ObjectKey::new(&ingress.namespace, name);
        let pair = if let Some(cached) = self.certs.get(&secret_key) {
            cached.clone()
        } else {
            let read = self.read_secret(ingress, &field, &secret_key);
            self.certs.insert(secret_key.clone(), read.clone());
            read
        }?;
        Some(CertificateSource {
            hosts: entry
                .hosts
                .iter()
                .flatten()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            secret: secret_key,
            pair,
        })
    }

    fn read_secret(
        &mut self,
        ingress: &ObjectKey,
        field: &str,
        secret_key: &ObjectKey,
    ) -> Option<Arc<KeyPair>> {
        let Some(secret) = self.cluster.secrets.get(secret_key) else {
            self.problem(ingress, field, format!("Secret {secret_key} not found"));
            return None;
        };
        match tls::key_pair(secret) {
            Ok(pair) => Some(Arc::new(pair)),
            Err(e) => {
                self.problems.push(Problem {
                    kind: Kind::Secret,
                    object: secret_key.clone(),
                    field: e.field,
                    reason: format!("{} (named by Ingress {ingress} {field})", e.reason),
                });
                None
            }
        }
    }

    /// The users of an `auth-secret` (`name` in the Ingress's namespace, or
    /// `namespace/name`): its `auth` key as an htpasswd file, or with `auth-map` each
    /// key a user and its value the hash. The error names the annotation to blame.
    fn basic_auth(
        &mut self,
        ingress: &ObjectKey,
        basic: &annotations::BasicAuthRef,
    ) -> Result<BasicAuth, (&'static str, String)> {
        let key = match basic.secret.split_once('/') {
            Some((namespace, name)) => ObjectKey::new(namespace, name),
            None => ObjectKey::new(&ingress.namespace, &basic.secret),
        };
        let secret_field = annotations::AUTH_SECRET;
        let Some(secret) = self.cluster.secrets.get(&key) else {
            return Err((secret_field, format!("Secret {key} not found")));
        };
        let data = secret.data.as_ref();
        let users = if basic.auth_map {
            let mut users = BTreeMap::new();
            for (user, hash) in data.into_iter().flatten() {
                let hash = std::str::from_utf8(&hash.0).map_err(|_| {
                    (
                        secret_field,
                        format!("Secret {key}: data[{user}] is not text"),
                    )
                })?;
                auth::check_hash(user, hash)
                    .map_err(|e| (secret_field, format!("Secret {key}: {e}")))?;
                users.insert(user.clone(), hash.to_owned());
            }
            if users.is_empty() {
                return Err((secret_field, format!("Secret {key} holds no user")));
            }
            users
        } else {
            let Some(file) = data.and_then(|d| d.get(BASIC_AUTH_KEY)) else {
                return Err((
                    secret_field,
                    format!("Secret {key} has no data[{BASIC_AUTH_KEY}] (an htpasswd file)"),
                ));
            };
            let text = std::str::from_utf8(&file.0).map_err(|_| {
                (
                    secret_field,
                    format!("Secret {key}: data[{BASIC_AUTH_KEY}] is not text"),
                )
            })?;
            auth::htpasswd(text).map_err(|e| {
                (
                    secret_field,
                    format!("Secret {key}: data[{BASIC_AUTH_KEY}]: {e}"),
                )
            })?
        };
        Ok(BasicAuth {
            realm: basic.realm.clone(),
            users,
        })
    }

    /// The upstream a backend names, or `None` (with a problem) when it cannot be
    /// routed at all.
    fn upstream(
        &mut self,
        ingress: &ObjectKey,
        field: &str,
        backend: &IngressBackend,
    ) -> Option<Arc<Upstream>> {
        if backend.resource.is_some() {
            self.problem(
                ingress,
                format!("{field}.resource"),
                "resource backends are not supported",
            );
            return None;
        }
        let Some(service) = &backend.service else {
            self.problem(ingress, field, "names no service");
            return None;
        };
        let svc_key = ObjectKey::new(&ingress.namespace, &service.name);
        let port = service.port.as_ref();
        let number = port.and_then(|p| p.number);
        let port_name = port
            .and_then(|p| p.name.as_deref())
            .filter(|n| !n.is_empty());
        let written = match (number, port_name) {
            (Some(n), _) => n.to_string(),
            (None, Some(name)) => name.to_owned(),
            (None, None) => {
                self.problem(
                    ingress,
                    format!("{field}.service.port"),
                    "names no port number or name",
                );
                return None;
            }
        };
        let empty = |name: String| Upstream {
            name,
            target: Target::Endpoints(Vec::new()),
            protocol: UpstreamProtocol::Http1,
            tls: None,
        };
        let Some(svc) = self.cluster.services.get(&svc_key) else {
            self.problem(
                ingress,
                format!("{field}.service.name"),
                format!("Service {svc_key} not found: its routes answer 503"),
            );
            return Some(self.shared(empty(format!("{svc_key}:{written}"))));
        };
        let spec = svc.spec.as_ref();
        if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
            let host = spec
                .and_then(|s| s.external_name.as_deref())
                .unwrap_or_default();
            let number = number
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n > 0);
            let Some(number) = number else {
                self.problem(
                    ingress,
                    format!("{field}.service.port"),
                    format!(
                        "Service {svc_key} is ExternalName: name the port by number; routes answer 503"
                    ),
                );
                return Some(self.shared(empty(format!("{svc_key}:{written}"))));
            };
            let protocol = protocol_of(spec_port(svc, |p| p.port == i32::from(number)));
            return Some(self.shared(Upstream {
                name: format!("{svc_key}:{number}"),
                target: Target::Dns {
                    host: host.to_owned(),
                    port: number,
                },
                protocol,
                tls: None,
            }));
        }
        let found = match (number, port_name) {
            (Some(n), _) => spec_port(svc, |p| p.port == n),
            (None, name) => spec_port(svc, |p| p.name.as_deref() == name),
        };
        let Some(svc_port) = found else {
            self.problem(
                ingress,
                format!("{field}.service.port"),
                format!("Service {svc_key} has no TCP port {written}: routes answer 503"),
            );
            return Some(self.shared(empty(format!("{svc_key}:{written}"))));
        };
        let name = format!("{svc_key}:{}", svc_port.port);
        if let Some(shared) = self.upstreams.get(&name) {
            return Some(shared.clone());
        }
        let (endpoints, problems) =
            usable_endpoints(svc, svc_port, &self.cluster.slices_of(&svc_key));
        self.problems.extend(problems);
        Some(self.shared(Upstream {
            name,
            target: Target::Endpoints(endpoints),
            protocol: protocol_of(Some(svc_port)),
            tls: None,
        }))
    }

    fn shared(&mut self, upstream: Upstream) -> Arc<Upstream> {
        self.upstreams
            .entry(upstream.name.clone())
            .or_insert_with(|| Arc::new(upstream))
            .clone()
    }
}

fn spec_port(svc: &Service, pick: impl Fn(&ServicePort) -> bool) -> Option<&ServicePort> {
    svc.spec
        .as_ref()?
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .find(|p| pick(p))
}

fn protocol_of(port: Option<&ServicePort>) -> UpstreamProtocol {
    match port.and_then(|p| p.app_protocol.as_deref()) {
        Some(H2C_APP_PROTOCOL) => UpstreamProtocol::H2c,
        _ => UpstreamProtocol::Http1,
    }
}

fn is_ours(ingress: &Ingress, class: &str, default_class: bool) -> bool {
    if let Some(name) = ingress
        .spec
        .as_ref()
        .and_then(|s| s.ingress_class_name.as_deref())
    {
        return name == class;
    }
    match ingress
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(INGRESS_CLASS))
    {
        Some(name) => name == class,
        None => default_class,
    }
}

/// Whether a `spec.tls` host (exact or `*.` wildcard) covers an exact rule host.
fn covers(tls_host: &str, host: &str) -> bool {
    match tls_host.strip_prefix('*') {
        Some(suffix) => host
            .find('.')
            .is_some_and(|dot| dot > 0 && &host[dot..] == suffix),
        None => tls_host == host,
    }
}

fn host_pattern(host: Option<&str>) -> Result<HostPattern, String> {
    let Some(host) = host.filter(|h| !h.is_empty()) else {
        return Ok(HostPattern::Any);
    };
    let lower = host.to_ascii_lowercase();
    if let Some(suffix) = lower.strip_prefix('*') {
        if suffix.len() > 1 && suffix.starts_with('.') && !suffix.contains('*') {
            return Ok(HostPattern::Wildcard(suffix.to_owned()));
        }
    } else if !lower.contains('*') && !lower.contains(':') {
        return Ok(HostPattern::Exact(lower));
    }
    Err(format!(
        "{} is neither a DNS name nor \"*.\" followed by one",
        quoted(host)
    ))
}

/// Orders host groups exact, wildcard, host-less (for readable dumps; lookup indexes).
fn group_key(host: &HostPattern) -> GroupKey {
    match host {
        HostPattern::Exact(h) => (0, h.clone()),
        HostPattern::Wildcard(s) => (1, s.clone()),
        HostPattern::Any => (2, String::new()),
    }
}

/// The path type and path of one HTTP path, or the sub-field and why not.
fn path_rule(kind: &str, path: Option<&str>) -> Result<(PathKind, String), (&'static str, String)> {
    let kind = match kind {
        "Exact" => PathKind::Exact,
        "Prefix" | "ImplementationSpecific" => PathKind::Prefix,
        other => {
            return Err((
                "pathType",
                format!(
                    "{} is not Exact, Prefix or ImplementationSpecific",
                    quoted(other)
                ),
            ));
        }
    };
    let path = match path.filter(|p| !p.is_empty()) {
        Some(p) if p.starts_with('/') => p.to_owned(),
        Some(p) => {
            return Err(("path", format!("{} does not start with /", quoted(p))));
        }
        None => "/".to_owned(),
    };
    Ok((kind, path))
}

#[cfg(test)]
mod tests;
