//! Kubernetes Services and EndpointSlices to services the data plane serves, with
//! kube-proxy's semantics. Pure: the same objects always give the same models.
//!
//! One Service port and address family becomes up to four `ServiceModel`s, one per
//! combination of (endpoints: all or this node's only) x (source ranges: none or the
//! Service's `loadBalancerSourceRanges`). Frontends that share a combination share a
//! model: a plain ClusterIP/NodePort/LoadBalancer Service port is one model. Names:
//! `namespace/name:port/proto[/v6][/local][/ranges]`, where `port` is the Service port's
//! name, or its number when unnamed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{BackendModel, Endpoint, Health, ServiceModel, WhenEmpty};
use crate::cluster::{Kind, ObjectKey};
use crate::config::{FrontendSpec, Protocol};
use crate::maglev;
use crate::mode::LbMode;
use crate::quote::quoted;

/// EndpointSlice annotation: Maglev weight (0..=100) of every endpoint in the slice;
/// 0 drains them (established flows stay, no new ones). Default 1.
pub const WEIGHT_ANNOTATION: &str = "xlb.dev/weight";
/// EndpointSlice annotation: weights per endpoint address, overriding
/// `xlb.dev/weight`: `"192.0.2.11=0, 192.0.2.12=50"`.
pub const ENDPOINT_WEIGHTS_ANNOTATION: &str = "xlb.dev/endpoint-weights";
/// Service annotation: Maglev table size (a prime, 2..=131071). Default: the smallest
/// of 1021, 4093, 16381, 65537, 131071 that holds 100 slots per endpoint.
pub const TABLE_SIZE_ANNOTATION: &str = "xlb.dev/maglev-table-size";
/// Service annotation: `snat`, `dsr`, `hybrid` or `dnat`, overriding the agent's `--lb-mode` for the
/// Service's Cluster-policy frontends (`externalTrafficPolicy: Local` never SNATs).
pub const LB_MODE_ANNOTATION: &str = "xlb.dev/lb-mode";
/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// Service label naming another proxy that serves it; kube-proxy, and xlb, leave such
/// Services alone.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
const TABLE_SIZES: [u32; 5] = [1021, 4093, 16_381, 65_537, 131_071];
const MAX_WEIGHT: u32 = 100;

/// This node as the translation needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Endpoints whose `nodeName` equals it are local.
    pub name: Option<String>,
    /// Addresses NodePorts are served on.
    pub addresses: Vec<IpAddr>,
    /// The source addresses of source-NATed flows, at most one per family (see
    /// [`NodeInfo::resolve`]); empty when neither flags nor a Node object give one.
    pub snat_addresses: Vec<IpAddr>,
    /// The agent's `--lb-mode`, for Services without `xlb.dev/lb-mode`.
    pub lb_mode: LbMode,
}

impl NodeInfo {
    /// The node's addresses: `flags` when given, else the Node object's InternalIP and
    /// ExternalIP addresses (kube-proxy's primary node IPs).
    pub fn resolve(name: Option<&str>, flags: &[IpAddr], node: Option<&Node>) -> NodeInfo {
        let addresses = if flags.is_empty() {
            node.and_then(|n| n.status.as_ref())
                .and_then(|s| s.addresses.as_ref())
                .into_iter()
                .flatten()
                .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
                .filter_map(|a| a.address.parse().ok())
                .collect::<BTreeSet<IpAddr>>()
                .into_iter()
                .collect()
        } else {
            flags.to_vec()
        };
        NodeInfo {
            name: name.map(str::to_owned),
            addresses,
            snat_addresses: snat_addresses(flags, node),
            lb_mode: LbMode::default(),
        }
    }
}

/// The SNAT source address of each family: the first flag of the family when any flag
/// is given; else the Node object's first InternalIP of the family, else its first
/// ExternalIP, in the order `status.addresses` lists them (kube-proxy's and Cilium's
/// choice of the node IP: the address the other nodes and the pods reach it by).
fn snat_addresses(flags: &[IpAddr], node: Option<&Node>) -> Vec<IpAddr> {
    let from_node: Vec<(&str, IpAddr)> = node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|a| Some((a.type_.as_str(), a.address.parse().ok()?)))
        .collect();
    [false, true]
        .into_iter()
        .filter_map(|v6| {
            if !flags.is_empty() {
                return flags.iter().copied().find(|a| a.is_ipv6() == v6);
            }
            ["InternalIP", "ExternalIP"].into_iter().find_map(|kind| {
                from_node
                    .iter()
                    .find(|(t, a)| *t == kind && a.is_ipv6() == v6)
                    .map(|(_, a)| *a)
            })
        })
        .collect()
}

/// A field of an object the translation skipped; the rest of the object still applies.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub kind: Kind,
    pub object: ObjectKey,
    pub field: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}: {}",
            self.kind, self.object, self.field, self.reason
        )
    }
}

/// kube-proxy's per-Service health check (`healthCheckNodePort` of a LoadBalancer
/// Service with `externalTrafficPolicy: Local`): load balancers in front send traffic
/// only to nodes that answer 200.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckPort {
    pub port: u16,
    /// Ready endpoints on this node (distinct addresses).
    pub local_endpoints: usize,
}

/// What one Service becomes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Translation {
    pub services: BTreeMap<String, ServiceModel>,
    pub problems: Vec<Problem>,
    pub health_check: Option<HealthCheckPort>,
    /// `spec.externalName` of an ExternalName Service: no L4 frontend; kept for the L7 hop.
    pub external_name: Option<String>,
    /// Things passed over on purpose (headless, SCTP), for the log.
    pub notes: Vec<String>,
}

/// Where a Service address comes from; decides which endpoints and filters apply.
/// (NodePorts are on the node's addresses, added per port.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    ClusterIp,
    ExternalIp,
    LoadBalancer,
}

/// An endpoint after merging all slices.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    endpoint: Endpoint,
    weight: u32,
    ready: bool,
    serving_terminating: bool,
    local: bool,
}

struct Ctx<'a> {
    key: &'a ObjectKey,
    problems: Vec<Problem>,
}

impl<'a> Ctx<'a> {
    fn new(key: &'a ObjectKey) -> Self {
        Ctx {
            key,
            problems: Vec::new(),
        }
    }

    fn problem(&mut self, kind: Kind, object: &ObjectKey, field: String, reason: String) {
        self.problems.push(Problem {
            kind,
            object: object.clone(),
            field,
            reason,
        });
    }

    fn service_problem(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        let key = self.key.clone();
        self.problem(Kind::Service, &key, field.into(), reason.into());
    }
}

/// Translates one Service with the EndpointSlices labelled with its name.
pub fn translate(svc: &Service, slices: &[&EndpointSlice], node: &NodeInfo) -> Translation {
    let key = ObjectKey::of(&svc.metadata);
    let mut ctx = Ctx::new(&key);
    let mut out = Translation::default();
    let Some(spec) = svc.spec.as_ref() else {
        ctx.service_problem("spec", "missing");
        out.problems = ctx.problems;
        return out;
    };
    if let Some(note) = other_proxy(svc, &key) {
        out.notes.push(note);
        return out;
    }
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    if type_ == "ExternalName" {
        out.external_name.clone_from(&spec.external_name);
        out.notes
            .push(format!("Service {key}: ExternalName, no L4 frontend"));
        return out;
    }
    if !matches!(type_, "ClusterIP" | "NodePort" | "LoadBalancer") {
        ctx.service_problem("spec.type", format!("unknown type {}", quoted(type_)));
        out.problems = ctx.problems;
        return out;
    }

    // Addresses by origin.
    let cluster_ips: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    if cluster_ips.is_empty() {
        // Every other frontend hangs off a cluster IP's family.
        ctx.service_problem("spec.clusterIP", "not set: the Service has no frontend");
        out.problems = ctx.problems;
        return out;
    }
    if cluster_ips.contains(&"None") {
        out.notes.push(format!(
            "Service {key}: headless (clusterIP None), no L4 frontend"
        ));
        return out;
    }
    let mut addresses = service_addresses(svc, type_, &cluster_ips, &mut ctx);
    let ranges = source_ranges(spec, &mut addresses, &mut ctx);
    let families: BTreeSet<bool> = addresses
        .iter()
        .filter(|(origin, _)| *origin == Origin::ClusterIp)
        .map(|(_, a)| a.is_ipv6())
        .collect();
    // Traffic policies only narrow the endpoints of their own frontends: external
    // (NodePort, externalIPs, LoadBalancer) and internal (ClusterIP).
    let policy = Policy {
        key: key.clone(),
        addresses,
        etp_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        itp_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        source_ranges: ranges,
        affinity_timeout_s: affinity_timeout(spec),
        table_override: table_size_override(svc, &mut ctx),
        lb_mode: lb_mode(svc, node.lb_mode, &mut ctx),
    };
    let etp_local = policy.etp_local;
    let mut local_ready = BTreeSet::new();
    let mut taken = BTreeSet::new();
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        let Some(spec_port) = port_spec(i, port, type_, &key, &mut ctx, &mut out.notes) else {
            continue;
        };
        let candidates = endpoints_for(port, spec_port.protocol, slices, svc, node, &mut ctx);
        for c in candidates.iter().filter(|c| c.local && c.ready) {
            local_ready.insert(c.endpoint.addr);
        }
        let mut repeated = BTreeSet::new();
        for v6 in [false, true] {
            if !families.contains(&v6) {
                continue;
            }
            for (name, mut model) in family_models(&policy, &spec_port, v6, &candidates, node) {
                // A frontend is served by the first port that has it (the API server
                // refuses two ports with one port number and protocol; manifests may not).
                model.frontends.retain(|f| {
                    taken.insert(*f) || {
                        repeated.insert(*f);
                        false
                    }
                });
                if !model.frontends.is_empty() {
                    out.services.insert(name, model);
                }
            }
        }
        if !repeated.is_empty() {
            let list: Vec<String> = repeated.iter().map(frontend_text).collect();
            ctx.service_problem(
                format!("spec.ports[{i}]"),
                format!("{} already served by an earlier port", list.join(", ")),
            );
        }
    }
    if type_ == "LoadBalancer" && etp_local {
        out.health_check = health_check(spec, local_ready.len(), &mut ctx);
    }
    // Sorted by object and field; a slice's problem found once per Service port is one.
    ctx.problems.sort();
    ctx.problems.dedup();
    out.problems = ctx.problems;
    out
}

/// Every address the Service is reached on, by origin. External addresses of a family
/// the Service has no cluster IP in are skipped: kube-proxy runs one proxier per family.
fn service_addresses(
    svc: &Service,
    type_: &str,
    cluster_ips: &[&str],
    ctx: &mut Ctx<'_>,
) -> Vec<(Origin, IpAddr)> {
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    let mut addresses: Vec<(Origin, IpAddr)> = Vec::new();
    for (i, ip) in cluster_ips.iter().enumerate() {
        match ip.parse::<IpAddr>() {
            Ok(addr) => addresses.push((Origin::ClusterIp, addr)),
            Err(_) => ctx.service_problem(
                format!("spec.clusterIPs[{i}]"),
                format!("{} is not an IP address", quoted(ip)),
            ),
        }
    }
    let families: BTreeSet<bool> = addresses.iter().map(|(_, a)| a.is_ipv6()).collect();
    let family_name = |v6: bool| if v6 { "IPv6" } else { "IPv4" };
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        match ip.parse::<IpAddr>() {
            Ok(addr) if families.contains(&addr.is_ipv6()) => {
                addresses.push((Origin::ExternalIp, addr));
            }
            Ok(addr) => ctx.service_problem(
                format!("spec.externalIPs[{i}]"),
                format!(
                    "{addr} is {}, but the Service has no {} cluster IP",
                    family_name(addr.is_ipv6()),
                    family_name(addr.is_ipv6())
                ),
            ),
            Err(_) => ctx.service_problem(
                format!("spec.externalIPs[{i}]"),
                format!("{} is not an IP address", quoted(ip)),
            ),
        }
    }
    if type_ == "LoadBalancer" {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for (i, entry) in ingress.into_iter().flatten().enumerate() {
            // ipMode Proxy: the cloud load balancer proxies and sends to the node, not
            // to the VIP; kube-proxy does not capture the VIP then (KEP-1860).
            if entry.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            let Some(ip) = entry.ip.as_deref() else {
                continue; // hostname-only ingress: nothing to capture
            };
            match ip.parse::<IpAddr>() {
                Ok(addr) if families.contains(&addr.is_ipv6()) => {
                    addresses.push((Origin::LoadBalancer, addr));
                }
                Ok(addr) => ctx.service_problem(
                    format!("status.loadBalancer.ingress[{i}].ip"),
                    format!(
                        "{addr} is {}, but the Service has no such cluster IP",
                        family_name(addr.is_ipv6())
                    ),
                ),
                Err(_) => ctx.service_problem(
                    format!("status.loadBalancer.ingress[{i}].ip"),
                    format!("{} is not an IP address", quoted(ip)),
                ),
            }
        }
    }

    addresses
}

/// A Service port as the models need it; `None` (with a problem or a note) when it
/// gets no frontend.
fn port_spec(
    i: usize,
    port: &ServicePort,
    type_: &str,
    key: &ObjectKey,
    ctx: &mut Ctx<'_>,
    notes: &mut Vec<String>,
) -> Option<PortSpec> {
    let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        "SCTP" => {
            notes.push(format!(
                "Service {key}: port {} is SCTP, which xlb passes through untouched",
                port.port
            ));
            return None;
        }
        other => {
            ctx.service_problem(
                format!("spec.ports[{i}].protocol"),
                format!("unknown protocol {}", quoted(other)),
            );
            return None;
        }
    };
    let Ok(service_port) = u16::try_from(port.port) else {
        ctx.service_problem(
            format!("spec.ports[{i}].port"),
            format!("{} is not a port number", port.port),
        );
        return None;
    };
    if service_port == 0 {
        ctx.service_problem(format!("spec.ports[{i}].port"), "0 is not a port number");
        return None;
    }
    let node_port = match port.node_port {
        Some(p) if type_ != "ClusterIP" => match u16::try_from(p) {
            Ok(p) if p > 0 => Some(p),
            _ => {
                ctx.service_problem(
                    format!("spec.ports[{i}].nodePort"),
                    format!("{p} is not a port number"),
                );
                None
            }
        },
        _ => None,
    };
    Some(PortSpec {
        name: match port.name.as_deref() {
            Some(name) if !name.is_empty() => name.to_owned(),
            _ => service_port.to_string(),
        },
        protocol,
        number: service_port,
        node_port,
    })
}

/// A note when the Service is labelled for another proxy.
fn other_proxy(svc: &Service, key: &ObjectKey) -> Option<String> {
    let proxy = svc
        .metadata
        .labels
        .as_ref()?
        .get(SERVICE_PROXY_NAME_LABEL)?;
    Some(format!(
        "Service {key}: {SERVICE_PROXY_NAME_LABEL}={proxy}, served by that proxy, not xlb"
    ))
}

/// What every port of a Service shares.
struct Policy {
    key: ObjectKey,
    addresses: Vec<(Origin, IpAddr)>,
    etp_local: bool,
    itp_local: bool,
    source_ranges: Vec<ipnet::IpNet>,
    affinity_timeout_s: Option<u32>,
    table_override: Option<u32>,
    lb_mode: LbMode,
}

/// One Service port.
struct PortSpec {
    /// Its name, or its number when unnamed.
    name: String,
    protocol: Protocol,
    number: u16,
    node_port: Option<u16>,
}

/// The frontends of one Service port in one address family, grouped by (local
/// endpoints only, source ranges).
fn frontend_groups(
    policy: &Policy,
    port: &PortSpec,
    v6: bool,
    node: &NodeInfo,
) -> BTreeMap<(bool, bool), BTreeSet<FrontendSpec>> {
    let ranged = !policy.source_ranges.is_empty();
    let mut groups: BTreeMap<(bool, bool), BTreeSet<FrontendSpec>> = BTreeMap::new();
    let mut add = |group: (bool, bool), address: IpAddr, number: u16, in_cluster: bool| {
        groups.entry(group).or_default().insert(FrontendSpec {
            address,
            port: number,
            protocol: port.protocol,
            in_cluster,
        });
    };
    // An external address of a policy Local Service, reached from inside the cluster
    // (the socket hooks), uses every endpoint: kube-proxy short-circuits pod and node
    // traffic to its cluster-wide chain, whatever internalTrafficPolicy says.
    let external = |add: &mut dyn FnMut((bool, bool), IpAddr, u16, bool),
                    group: (bool, bool),
                    address: IpAddr,
                    number: u16| {
        add(group, address, number, false);
        if policy.etp_local {
            add((false, false), address, number, true);
        }
    };
    for (origin, addr) in policy.addresses.iter().filter(|(_, a)| a.is_ipv6() == v6) {
        match origin {
            Origin::ClusterIp => add((policy.itp_local, false), *addr, port.number, false),
            Origin::ExternalIp => {
                external(&mut add, (policy.etp_local, false), *addr, port.number);
            }
            Origin::LoadBalancer => {
                external(&mut add, (policy.etp_local, ranged), *addr, port.number);
            }
        }
    }
    if let Some(node_port) = port.node_port {
        for addr in node.addresses.iter().filter(|a| a.is_ipv6() == v6) {
            external(&mut add, (policy.etp_local, false), *addr, node_port);
        }
    }
    groups
}

/// The models of one Service port in one address family: frontends grouped by
/// (local endpoints only, source ranges).
fn family_models(
    policy: &Policy,
    port: &PortSpec,
    v6: bool,
    candidates: &[Candidate],
    node: &NodeInfo,
) -> Vec<(String, ServiceModel)> {
    let proto = match port.protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    };
    let base = format!(
        "{}:{}/{proto}{}",
        policy.key,
        port.name,
        if v6 { "/v6" } else { "" }
    );
    let family: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.endpoint.addr.is_ipv6() == v6)
        .collect();
    let cluster = usable(&family, false);
    let local = usable(&family, true);
    let mut groups = frontend_groups(policy, port, v6, node);
    // A load-balancer IP that is also an external IP stays behind the source ranges.
    let ranged: BTreeSet<FrontendSpec> = groups
        .iter()
        .filter(|((_, with_ranges), _)| *with_ranges)
        .flat_map(|(_, f)| f.iter().copied())
        .collect();
    for ((_, with_ranges), frontends) in &mut groups {
        if !*with_ranges {
            frontends.retain(|f| !ranged.contains(f));
        }
    }
    let mut out = Vec::new();
    for ((local_only, with_ranges), frontends) in groups {
        if frontends.is_empty() {
            continue;
        }
        let chosen = if local_only { &local } else { &cluster };
        let mut backends: BTreeMap<Endpoint, BackendModel> = chosen
            .iter()
            .map(|c| {
                (
                    c.endpoint,
                    BackendModel {
                        weight: c.weight,
                        health: Health::Unchecked,
                        local: c.local,
                    },
                )
            })
            .collect();
        let table_size = policy
            .table_override
            .unwrap_or_else(|| auto_table_size(&backends));
        if port.protocol == Protocol::Tcp {
            drain_the_rest(&mut backends, &family, local_only);
        }
        let name = format!(
            "{base}{}{}",
            if local_only { "/local" } else { "" },
            if with_ranges { "/ranges" } else { "" }
        );
        let model = ServiceModel {
            frontends,
            // kube-proxy REJECTs when the Service has no endpoints at all and DROPs
            // traffic that policy Local keeps off a node without local ones.
            when_empty: if cluster.is_empty() {
                WhenEmpty::Reject
            } else {
                WhenEmpty::Drop
            },
            backends,
            affinity_timeout_s: policy.affinity_timeout_s,
            table_size,
            source_ranges: if with_ranges {
                policy.source_ranges.clone()
            } else {
                Vec::new()
            },
            // Local policy keeps the client's address: only local endpoints, never SNAT,
            // never encapsulated.
            snat: !local_only && policy.lb_mode.translation(port.protocol).0,
            dsr: !local_only && policy.lb_mode.translation(port.protocol).1,
        };
        out.push((name, model));
    }
    out
}

/// `TCP 203.0.113.10:80`, for problems.
pub fn frontend_text(f: &FrontendSpec) -> String {
    let proto = match f.protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    };
    let scope = if f.in_cluster { " (in-cluster)" } else { "" };
    format!(
        "{proto} {}{scope}",
        std::net::SocketAddr::new(f.address, f.port)
    )
}

/// `sessionAffinity: ClientIP` and its timeout.
fn affinity_timeout(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Option<u32> {
    (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S)
    })
}

/// kube-proxy's endpoint choice: ready endpoints; when there are none, endpoints that
/// are still serving while terminating (so connections drain gracefully on rollout).
/// `local` restricts both to this node's endpoints first.
fn usable<'a>(family: &[&'a Candidate], local: bool) -> Vec<&'a Candidate> {
    let scope: Vec<&Candidate> = family
        .iter()
        .copied()
        .filter(|c| !local || c.local)
        .collect();
    let ready: Vec<&Candidate> = scope.iter().copied().filter(|c| c.ready).collect();
    if ready.is_empty() {
        scope
            .into_iter()
            .filter(|c| c.serving_terminating)
            .collect()
    } else {
        ready
    }
}

/// The endpoints of the slices that new connections do not get (not ready, or
/// terminating while others are ready), as draining backends (weight 0): a TCP
/// connection already open to one keeps it until it ends, as kube-proxy's conntrack
/// entries keep theirs, so a rolling update drains instead of resetting the
/// connections of the Pods it replaces. (UDP flows move: kube-proxy deletes the
/// conntrack entries of UDP endpoints that stop serving.) `local_only`: this node's.
fn drain_the_rest(
    backends: &mut BTreeMap<Endpoint, BackendModel>,
    family: &[&Candidate],
    local_only: bool,
) {
    for c in family.iter().filter(|c| !local_only || c.local) {
        backends.entry(c.endpoint).or_insert(BackendModel {
            weight: 0,
            health: Health::Unchecked,
            local: c.local,
        });
    }
}

/// The endpoints the L7 hop may send a Service port's requests to: the same slices,
/// port matching and ready-else-serving-and-terminating rule as the L4 translation (per
/// address family), with no node locality. An endpoint drained with weight 0
/// (`xlb.dev/weight`, `xlb.dev/endpoint-weights`) gets no new requests, as it gets no
/// new flows. Problems name the slices.
pub(crate) fn usable_endpoints(
    svc: &Service,
    port: &ServicePort,
    slices: &[&EndpointSlice],
) -> (Vec<std::net::SocketAddr>, Vec<Problem>) {
    let key = ObjectKey::of(&svc.metadata);
    let mut ctx = Ctx::new(&key);
    let node = NodeInfo::default();
    let candidates = endpoints_for(port, Protocol::Tcp, slices, svc, &node, &mut ctx);
    let mut out = Vec::new();
    for v6 in [false, true] {
        let family: Vec<&Candidate> = candidates
            .iter()
            .filter(|c| c.endpoint.addr.is_ipv6() == v6)
            .collect();
        out.extend(
            usable(&family, false)
                .into_iter()
                .filter(|c| c.weight > 0)
                .map(|c| std::net::SocketAddr::new(c.endpoint.addr, c.endpoint.port)),
        );
    }
    (out, ctx.problems)
}

/// Every address the Service is reached on (cluster IPs, external IPs, load-balancer
/// IPs), parsed leniently: an endpoint at one of them would send the Service's traffic
/// back to itself.
fn own_addresses(svc: &Service) -> BTreeSet<IpAddr> {
    let Some(spec) = svc.spec.as_ref() else {
        return BTreeSet::new();
    };
    let lb_ips = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_ref());
    spec.cluster_ip
        .iter()
        .chain(spec.cluster_ips.iter().flatten())
        .chain(spec.external_ips.iter().flatten())
        .chain(lb_ips)
        .filter_map(|text| text.parse().ok())
        .collect()
}

/// The endpoints of every slice that serve `port`, matched by the Service port's name
/// and protocol (the EndpointSlice controller resolved `targetPort`, named or not, per
/// endpoint). An address in several slices counts once (a ready copy wins). Addresses
/// that can never be a backend ([`crate::address::backend_refusal`]) and the Service's
/// own addresses are skipped, each with a problem naming the endpoint.
fn endpoints_for(
    port: &ServicePort,
    protocol: Protocol,
    slices: &[&EndpointSlice],
    svc: &Service,
    node: &NodeInfo,
    ctx: &mut Ctx<'_>,
) -> Vec<Candidate> {
    let want_name = port.name.as_deref().unwrap_or("");
    let want_proto = match protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    };
    let own = own_addresses(svc);
    let mut merged: BTreeMap<Endpoint, Candidate> = BTreeMap::new();
    for slice in slices {
        let slice_key = ObjectKey::new(
            slice.metadata.namespace.as_deref().unwrap_or("default"),
            slice.metadata.name.as_deref().unwrap_or_default(),
        );
        let v6 = match slice.address_type.as_str() {
            "IPv4" => false,
            "IPv6" => true,
            _ => continue, // FQDN: not for a proxy
        };
        let Some((pi, slice_port)) = slice.ports.iter().flatten().enumerate().find(|(_, p)| {
            p.name.as_deref().unwrap_or("") == want_name
                && p.protocol.as_deref().unwrap_or("TCP") == want_proto
        }) else {
            continue;
        };
        let number = match slice_port.port {
            Some(p) => match u16::try_from(p) {
                Ok(p) if p > 0 => p,
                _ => {
                    ctx.problem(
                        Kind::EndpointSlice,
                        &slice_key,
                        format!("ports[{pi}].port"),
                        format!("{p} is not a port number"),
                    );
                    continue;
                }
            },
            // "Unset: ports are not restricted": nothing a port rewrite can use.
            None => continue,
        };
        let weights = slice_weights(slice, &slice_key, ctx);
        for (ei, endpoint) in slice.endpoints.iter().enumerate() {
            let Some(text) = endpoint.addresses.first() else {
                continue;
            };
            let addr = match text.parse::<IpAddr>() {
                Ok(addr) if addr.is_ipv6() == v6 => addr,
                Ok(addr) => {
                    ctx.problem(
                        Kind::EndpointSlice,
                        &slice_key,
                        format!("endpoints[{ei}].addresses[0]"),
                        format!(
                            "{addr} is not {} (addressType {})",
                            slice.address_type, slice.address_type
                        ),
                    );
                    continue;
                }
                Err(_) => {
                    ctx.problem(
                        Kind::EndpointSlice,
                        &slice_key,
                        format!("endpoints[{ei}].addresses[0]"),
                        format!("{} is not an IP address", quoted(text)),
                    );
                    continue;
                }
            };
            if let Some(reason) = refusal(addr, &own, ctx.key) {
                ctx.problem(
                    Kind::EndpointSlice,
                    &slice_key,
                    format!("endpoints[{ei}].addresses[0]"),
                    reason,
                );
                continue;
            }
            let conditions = endpoint.conditions.as_ref();
            // API defaults: ready and serving unset = true, terminating unset = false.
            // `ready` is taken as is: the controller never sets it on a terminating Pod,
            // except for publishNotReadyAddresses Services, whose endpoints all count.
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(true);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            let ep = Endpoint { addr, port: number };
            let candidate = Candidate {
                endpoint: ep,
                weight: weights.get(&addr).unwrap_or(weights.default),
                ready,
                serving_terminating: serving && terminating,
                local: node.name.is_some() && endpoint.node_name.as_deref() == node.name.as_deref(),
            };
            merged
                .entry(ep)
                .and_modify(|c| {
                    if candidate.ready && !c.ready {
                        *c = candidate;
                    }
                })
                .or_insert(candidate);
        }
    }
    merged.into_values().collect()
}

/// Why an endpoint address is no backend: it reaches the node itself or no host, or it
/// is one of the Service's own addresses.
fn refusal(addr: IpAddr, own: &BTreeSet<IpAddr>, service: &ObjectKey) -> Option<String> {
    if let Some(kind) = crate::address::backend_refusal(addr) {
        return Some(format!("{addr} is {kind}"));
    }
    own.contains(&addr)
        .then(|| format!("{addr} is an address of Service {service} itself"))
}

struct Weights {
    default: u32,
    by_addr: BTreeMap<IpAddr, u32>,
}

impl Weights {
    fn get(&self, addr: &IpAddr) -> Option<u32> {
        self.by_addr.get(addr).copied()
    }
}

fn slice_weights(slice: &EndpointSlice, key: &ObjectKey, ctx: &mut Ctx<'_>) -> Weights {
    let mut weights = Weights {
        default: 1,
        by_addr: BTreeMap::new(),
    };
    let Some(annotations) = slice.metadata.annotations.as_ref() else {
        return weights;
    };
    let field = |name: &str| format!("metadata.annotations[{name}]");
    if let Some(text) = annotations.get(WEIGHT_ANNOTATION) {
        match parse_weight(text) {
            Ok(w) => weights.default = w,
            Err(reason) => ctx.problem(Kind::EndpointSlice, key, field(WEIGHT_ANNOTATION), reason),
        }
    }
    if let Some(text) = annotations.get(ENDPOINT_WEIGHTS_ANNOTATION) {
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let parsed = item
                .split_once('=')
                .ok_or_else(|| format!("{} is not ADDRESS=WEIGHT", quoted(item)))
                .and_then(|(a, w)| {
                    let addr = a
                        .trim()
                        .parse::<IpAddr>()
                        .map_err(|_| format!("{} is not an IP address", quoted(a.trim())))?;
                    Ok((addr, parse_weight(w)?))
                });
            match parsed {
                Ok((addr, w)) => {
                    weights.by_addr.insert(addr, w);
                }
                Err(reason) => ctx.problem(
                    Kind::EndpointSlice,
                    key,
                    field(ENDPOINT_WEIGHTS_ANNOTATION),
                    reason,
                ),
            }
        }
    }
    weights
}

fn parse_weight(text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(w) if w <= MAX_WEIGHT => Ok(w),
        _ => Err(format!(
            "must be a weight 0..={MAX_WEIGHT}, got {}",
            quoted(text)
        )),
    }
}

/// kube-proxy's health check for a LoadBalancer Service with policy Local.
fn health_check(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    local_endpoints: usize,
    ctx: &mut Ctx<'_>,
) -> Option<HealthCheckPort> {
    let port = spec.health_check_node_port?;
    match u16::try_from(port) {
        Ok(port) if port > 0 => Some(HealthCheckPort {
            port,
            local_endpoints,
        }),
        _ => {
            ctx.service_problem(
                "spec.healthCheckNodePort",
                format!("{port} is not a port number"),
            );
            None
        }
    }
}

/// `loadBalancerSourceRanges`, without the invalid ones. When some were given but none
/// is valid, the load-balancer addresses are dropped from `addresses`: serving every
/// client would ignore the restriction the user asked for.
fn source_ranges(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    addresses: &mut Vec<(Origin, IpAddr)>,
    ctx: &mut Ctx<'_>,
) -> Vec<ipnet::IpNet> {
    let given = spec
        .load_balancer_source_ranges
        .as_deref()
        .unwrap_or_default();
    let ranges = parse_ranges(given, ctx);
    if !given.is_empty()
        && ranges.is_empty()
        && addresses.iter().any(|(o, _)| *o == Origin::LoadBalancer)
    {
        addresses.retain(|(o, _)| *o != Origin::LoadBalancer);
        ctx.service_problem(
            "status.loadBalancer.ingress",
            "not served: spec.loadBalancerSourceRanges has no valid range",
        );
    }
    ranges
}

fn parse_ranges(ranges: &[String], ctx: &mut Ctx<'_>) -> Vec<ipnet::IpNet> {
    let mut out = Vec::new();
    for (i, text) in ranges.iter().enumerate() {
        match text.trim().parse::<ipnet::IpNet>() {
            Ok(net) => out.push(net.trunc()),
            Err(_) => ctx.service_problem(
                format!("spec.loadBalancerSourceRanges[{i}]"),
                format!("{} is not a CIDR", quoted(text)),
            ),
        }
    }
    out.sort();
    out.dedup();
    out
}

/// `xlb.dev/lb-mode`, else the node's default. A bad value is a problem naming the
/// annotation, and the default applies.
fn lb_mode(svc: &Service, default: LbMode, ctx: &mut Ctx<'_>) -> LbMode {
    let Some(text) = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LB_MODE_ANNOTATION))
    else {
        return default;
    };
    match text.trim().parse() {
        Ok(mode) => mode,
        Err(reason) => {
            ctx.service_problem(
                format!("metadata.annotations[{LB_MODE_ANNOTATION}]"),
                format!("{reason}; using {default}"),
            );
            default
        }
    }
}

fn table_size_override(svc: &Service, ctx: &mut Ctx<'_>) -> Option<u32> {
    let text = svc
        .metadata
        .annotations
        .as_ref()?
        .get(TABLE_SIZE_ANNOTATION)?;
    match text.trim().parse::<u32>() {
        Ok(m) if (2..=maglev::MAX_TABLE_SIZE).contains(&m) && maglev::is_prime(m) => Some(m),
        _ => {
            ctx.service_problem(
                format!("metadata.annotations[{TABLE_SIZE_ANNOTATION}]"),
                format!(
                    "must be a prime 2..={}, got {}; using the default",
                    maglev::MAX_TABLE_SIZE,
                    quoted(text)
                ),
            );
            None
        }
    }
}

/// The smallest size class with at least 100 slots per endpoint (the Maglev paper's
/// `M > 100 N` keeps shares within about 1%), which also fits the weights' turns.
fn auto_table_size(backends: &BTreeMap<Endpoint, BackendModel>) -> u32 {
    let n = u64::try_from(backends.len()).unwrap_or(u64::MAX).max(1);
    let turns: u64 = backends.values().map(|b| u64::from(b.weight)).sum();
    let need = (n * 100).max(turns);
    TABLE_SIZES
        .iter()
        .copied()
        .find(|m| u64::from(*m) >= need)
        .unwrap_or(maglev::MAX_TABLE_SIZE)
}

#[cfg(test)]
mod tests;
