//! kube-proxy's nftables mode on every node of the [`Cluster`]: the table its proxier
//! (pkg/proxy/nftables) writes for the cluster's Services, per node and family (`ip
//! kube-proxy`, `ip6 kube-proxy`), applied with `nft -f` inside the node's namespace.
//!
//! The shape (kube-proxy 1.31 and later, `--cluster-cidr` set, `nodePortAddresses` the
//! node's IPs):
//! - base chains at kube-proxy's hooks and priorities: `nat-prerouting` and `nat-output`
//!   jump to `services`, `nat-postrouting` to `masquerading`; the filter chains send new
//!   connections through the `*-check` chains (no-endpoint drops and rejects, firewall);
//! - `services` looks up `daddr . l4proto . dport` in the verdict map `service-ips`
//!   (ClusterIPs to `service-<h>-…`, LB IPs to `external-<h>-…`) and, for the node's
//!   addresses (`nodeport-ips`), `l4proto . dport` in `service-nodeports`;
//! - `service-…` masquerades traffic to the ClusterIP from outside the cluster CIDR and
//!   picks an endpoint chain with `numgen random mod n vmap`; `endpoint-…` marks hairpin
//!   traffic and DNATs;
//! - `external-…`: `Cluster` marks for masquerade and goes to `service-…`; `Local` sends
//!   pod and node-local sources to `service-…` (node-local ones masqueraded) and the rest
//!   to `local-…`, which picks among this node's endpoints; with no local endpoint the LB
//!   IP and NodePort are in the `no-endpoint-*` maps with `drop`;
//! - `masquerading` masquerades marked packets (`fully-random`).
//!
//! Chain names follow kube-proxy's (`service-<8 hash chars>-<ns>/<name>/<proto>/<port
//! name>`), with [`chain_hash`] for its SHA-256.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use anyhow::Context;

use super::kube_proxy::{MASQ_MARK, chain_hash};
use super::scenarios::{NodeProgram, PodSees};
use super::{CLUSTER_CIDR_V4, CLUSTER_CIDR_V6, Cluster, ClusterService, Endpoint, TrafficPolicy};

/// Names and keywords of one family's table.
struct Family {
    /// `ip kube-proxy` or `ip6 kube-proxy`.
    table: &'static str,
    /// `ip` or `ip6` (address matches).
    addr: &'static str,
    /// `ipv4_addr` or `ipv6_addr`.
    addr_type: &'static str,
    cluster_cidr: &'static str,
}

fn family(v6: bool) -> Family {
    if v6 {
        Family {
            table: "ip6 kube-proxy",
            addr: "ip6",
            addr_type: "ipv6_addr",
            cluster_cidr: CLUSTER_CIDR_V6,
        }
    } else {
        Family {
            table: "ip kube-proxy",
            addr: "ip",
            addr_type: "ipv4_addr",
            cluster_cidr: CLUSTER_CIDR_V4,
        }
    }
}

/// `<ns>/<name>/<proto>/<port name>`, the tail of kube-proxy's chain names.
fn base_name(svc: &ClusterService) -> String {
    format!(
        "{}/{}/{}/{}",
        svc.namespace,
        svc.name,
        svc.protocol.name(),
        svc.port_name
    )
}

fn chain(prefix: &str, svc: &ClusterService) -> String {
    let base = base_name(svc);
    format!(
        "{prefix}-{}-{base}",
        &chain_hash(&format!("{prefix}{base}"))[..8]
    )
}

/// `endpoint-<hash>-<base>__<ip>/<port>`; an IPv6 address's colons become dots, as
/// kube-proxy writes them (nft names cannot hold a colon).
fn endpoint_chain(svc: &ClusterService, endpoint: &SocketAddr) -> String {
    let ip = endpoint.ip().to_string().replace(':', ".");
    let tail = format!("{}__{ip}/{}", base_name(svc), endpoint.port());
    format!("endpoint-{}-{tail}", &chain_hash(&tail)[..8])
}

/// `nft -f` input: kube-proxy's table for node `node` (index, for its addresses) and
/// family `v6`, replacing any table of that name.
pub fn rules(services: &[ClusterService], node: usize, node_name: &str, v6: bool) -> String {
    let f = family(v6);
    let t = f.table;
    let node_ip = if v6 {
        IpAddr::V6(Cluster::node_v6(node))
    } else {
        IpAddr::V4(Cluster::node_v4(node))
    };
    let mut out = format!("add table {t}\ndelete table {t}\n");
    out.push_str(&base(v6, None, node_ip));
    for svc in services {
        service(&mut out, &f, svc, node_name, v6);
    }
    out
}

/// kube-proxy's table of family `v6` without any Service: its sets and maps, base
/// chains and base rules. With `service_cidr` (the ClusterIP range), traffic to an
/// unallocated ClusterIP is dropped, as kube-proxy does when it knows the range;
/// `node_ip` accepts NodePort traffic. Shared with the single-LB benchmark's rules
/// (lb-bench), which render the same kube-proxy.
pub fn base(v6: bool, service_cidr: Option<&str>, node_ip: IpAddr) -> String {
    let f = family(v6);
    let t = f.table;
    let key = format!("{} . inet_proto . inet_service", f.addr_type);
    let mut out = format!(
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}\n\
         add set {t} cluster-ips {{ type {addr_type} ; comment \"Active ClusterIPs\" ; }}\n\
         add set {t} nodeport-ips {{ type {addr_type} ; comment \"IPs that accept NodePort traffic\" ; }}\n\
         add map {t} firewall-ips {{ type {key} : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}\n\
         add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}\n\
         add map {t} no-endpoint-services {{ type {key} : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}\n\
         add map {t} service-ips {{ type {key} : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
         add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}\n",
        addr_type = f.addr_type
    );
    for (chain, hook) in [
        ("cluster-ips-check", ""),
        (
            "filter-prerouting-pre-dnat",
            "type filter hook prerouting priority -110 ;",
        ),
        (
            "filter-output-pre-dnat",
            "type filter hook output priority -110 ;",
        ),
        ("filter-forward", "type filter hook forward priority 0 ;"),
        ("filter-input", "type filter hook input priority 0 ;"),
        ("filter-output", "type filter hook output priority 0 ;"),
        ("firewall-check", ""),
        ("mark-for-masquerade", ""),
        ("masquerading", ""),
        ("nat-output", "type nat hook output priority -100 ;"),
        (
            "nat-postrouting",
            "type nat hook postrouting priority 100 ;",
        ),
        ("nat-prerouting", "type nat hook prerouting priority -100 ;"),
        ("nodeport-endpoints-check", ""),
        (
            "reject-chain",
            "comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ;",
        ),
        ("services", ""),
        ("service-endpoints-check", ""),
    ] {
        if hook.is_empty() {
            let _ = writeln!(out, "add chain {t} {chain}");
        } else {
            let _ = writeln!(out, "add chain {t} {chain} {{ {hook} }}");
        }
    }
    let a = f.addr;
    let mut rules = vec![
        format!(
            "cluster-ips-check {a} daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
        ),
        "filter-prerouting-pre-dnat ct state new jump firewall-check".to_owned(),
        "filter-output-pre-dnat ct state new jump firewall-check".to_owned(),
        "filter-forward ct state new jump service-endpoints-check".to_owned(),
        "filter-forward ct state new jump cluster-ips-check".to_owned(),
        "filter-input ct state new jump nodeport-endpoints-check".to_owned(),
        "filter-input ct state new jump service-endpoints-check".to_owned(),
        "filter-output ct state new jump service-endpoints-check".to_owned(),
        "filter-output ct state new jump cluster-ips-check".to_owned(),
        format!("firewall-check {a} daddr . meta l4proto . th dport vmap @firewall-ips"),
        format!("mark-for-masquerade mark set mark or {MASQ_MARK}"),
        format!("masquerading mark and {MASQ_MARK} == 0 return"),
        format!("masquerading mark set mark xor {MASQ_MARK}"),
        "masquerading masquerade fully-random".to_owned(),
        "nat-output jump services".to_owned(),
        "nat-postrouting jump masquerading".to_owned(),
        "nat-prerouting jump services".to_owned(),
        format!(
            "nodeport-endpoints-check {a} daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"
        ),
        "reject-chain reject".to_owned(),
        format!("services {a} daddr . meta l4proto . th dport vmap @service-ips"),
        format!("services {a} daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"),
        format!(
            "service-endpoints-check {a} daddr . meta l4proto . th dport vmap @no-endpoint-services"
        ),
    ];
    if let Some(cidr) = service_cidr {
        rules.insert(
            1,
            format!("cluster-ips-check {a} daddr {{ {cidr} }} drop comment \"Drop traffic to unallocated ClusterIPs\""),
        );
    }
    for rule in rules {
        let _ = writeln!(out, "add rule {t} {rule}");
    }
    let _ = writeln!(out, "add element {t} nodeport-ips {{ {node_ip} }}");
    out
}

/// One Service's chains and map elements.
fn service(out: &mut String, f: &Family, svc: &ClusterService, node_name: &str, v6: bool) {
    let Some(cluster_ip) = svc.cluster_ip(v6) else {
        return;
    };
    let (t, a) = (f.table, f.addr);
    let p = svc.protocol.name();
    let endpoints: Vec<&Endpoint> = svc.endpoints_of(v6).collect();
    let _ = writeln!(out, "add element {t} cluster-ips {{ {} }}", cluster_ip.ip());
    let key = |addr: &SocketAddr| format!("{} . {p} . {}", addr.ip(), addr.port());
    if endpoints.is_empty() {
        let _ = writeln!(
            out,
            "add element {t} no-endpoint-services {{ {} comment \"{} has no endpoints\" : goto reject-chain }}",
            key(&cluster_ip),
            svc.port_name_full()
        );
        return;
    }
    let svc_chain = chain("service", svc);
    // Chains before the rules that jump to them.
    endpoint_chains(out, f, svc, &endpoints);
    let _ = writeln!(out, "add chain {t} {svc_chain}");
    let _ = writeln!(
        out,
        "add rule {t} {svc_chain} {a} daddr {} {p} dport {} {a} saddr != {} jump mark-for-masquerade",
        cluster_ip.ip(),
        cluster_ip.port(),
        f.cluster_cidr
    );
    numgen(out, t, svc, &svc_chain, &endpoints);
    let _ = writeln!(
        out,
        "add element {t} service-ips {{ {} : goto {svc_chain} }}",
        key(&cluster_ip)
    );
    if !svc.externally_accessible() {
        return;
    }
    let lb_ips: Vec<SocketAddr> = svc.load_balancer_ip(v6).into_iter().collect();
    let local: Vec<&Endpoint> = endpoints
        .iter()
        .copied()
        .filter(|e| e.node == node_name)
        .collect();
    let local_policy = svc.external_traffic_policy == TrafficPolicy::Local;
    if local_policy && local.is_empty() {
        let comment = format!("{} has no local endpoints", svc.port_name_full());
        for lb in &lb_ips {
            let _ = writeln!(
                out,
                "add element {t} no-endpoint-services {{ {} comment \"{comment}\" : drop }}",
                key(lb)
            );
        }
        if let Some(node_port) = svc.node_port {
            let _ = writeln!(
                out,
                "add element {t} no-endpoint-nodeports {{ {p} . {node_port} comment \"{comment}\" : drop }}"
            );
        }
        return;
    }
    let ext = chain("external", svc);
    if local_policy {
        let local_chain = chain("local", svc);
        let _ = writeln!(out, "add chain {t} {local_chain}");
        numgen(out, t, svc, &local_chain, &local);
        let _ = write!(
            out,
            "add chain {t} {ext}\n\
             add rule {t} {ext} {a} saddr {cidr} goto {svc_chain} comment \"short-circuit pod traffic\"\n\
             add rule {t} {ext} fib saddr type local jump mark-for-masquerade comment \"masquerade local traffic\"\n\
             add rule {t} {ext} fib saddr type local goto {svc_chain} comment \"short-circuit local traffic\"\n\
             add rule {t} {ext} goto {local_chain}\n",
            cidr = f.cluster_cidr
        );
    } else {
        let _ = write!(
            out,
            "add chain {t} {ext}\n\
             add rule {t} {ext} jump mark-for-masquerade\n\
             add rule {t} {ext} goto {svc_chain}\n"
        );
    }
    for lb in &lb_ips {
        let _ = writeln!(
            out,
            "add element {t} service-ips {{ {} : goto {ext} }}",
            key(lb)
        );
    }
    if let Some(node_port) = svc.node_port {
        let _ = writeln!(
            out,
            "add element {t} service-nodeports {{ {p} . {node_port} : goto {ext} }}"
        );
    }
}

/// The chain of each endpoint: mark hairpin traffic, DNAT.
fn endpoint_chains(out: &mut String, f: &Family, svc: &ClusterService, endpoints: &[&Endpoint]) {
    let (t, a, p) = (f.table, f.addr, svc.protocol.name());
    for e in endpoints {
        let target = SocketAddr::new(e.address, svc.target_port);
        let ep = endpoint_chain(svc, &target);
        let _ = writeln!(out, "add chain {t} {ep}");
        let _ = writeln!(
            out,
            "add rule {t} {ep} {a} saddr {} jump mark-for-masquerade",
            e.address
        );
        let _ = writeln!(out, "add rule {t} {ep} meta l4proto {p} dnat to {target}");
    }
}

/// `chain`'s rule choosing one of `endpoints`' chains at random.
fn numgen(out: &mut String, t: &str, svc: &ClusterService, chain: &str, endpoints: &[&Endpoint]) {
    let vmap: Vec<String> = endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let target = SocketAddr::new(e.address, svc.target_port);
            format!("{i} : goto {}", endpoint_chain(svc, &target))
        })
        .collect();
    let _ = writeln!(
        out,
        "add rule {t} {chain} numgen random mod {} vmap {{ {} }}",
        endpoints.len(),
        vmap.join(" , ")
    );
}

/// kube-proxy's nftables mode as the [`NodeProgram`] of the scenarios: programs
/// [`rules`] on every node, both families.
#[derive(Debug, Default)]
pub struct KubeProxyNftables;

impl<'c> NodeProgram<'c> for KubeProxyNftables {
    fn name(&self) -> String {
        "kube-proxy nftables".to_owned()
    }

    fn program(&mut self, cluster: &'c Cluster, services: &[ClusterService]) -> anyhow::Result<()> {
        for svc in services {
            svc.validate()?;
        }
        for node in &cluster.nodes {
            for v6 in [false, true] {
                let text = rules(services, node.index, &node.name, v6);
                let file = std::env::temp_dir().join(format!(
                    "xlb-kube-proxy-nft-{}-{}.rules",
                    node.ns.name(),
                    if v6 { 6 } else { 4 }
                ));
                std::fs::write(&file, &text)
                    .with_context(|| format!("write {}", file.display()))?;
                let applied = node.ns.exec("nft", &["-f", &file.display().to_string()]);
                let _ = std::fs::remove_file(&file);
                applied.with_context(|| format!("nft on {}", node.name))?;
            }
        }
        Ok(())
    }

    fn pod_sees(&self, policy: TrafficPolicy) -> PodSees {
        match policy {
            TrafficPolicy::Cluster => PodSees::Node,
            TrafficPolicy::Local => PodSees::Client,
        }
    }

    fn flows_survive_moving(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::service::fixture;

    /// Two endpoints on node-0 (one per family) and one IPv4 endpoint on node-1.
    fn svc(policy: TrafficPolicy) -> ClusterService {
        fixture::web(
            policy,
            &[
                ("192.0.2.10", "node-0"),
                ("2001:db8:a::10", "node-0"),
                ("192.0.2.42", "node-1"),
            ],
        )
    }

    #[test]
    fn cluster_policy_goes_through_an_external_chain_that_masquerades() {
        let s = svc(TrafficPolicy::Cluster);
        let r = rules(std::slice::from_ref(&s), 0, "node-0", false);
        let ext = chain("external", &s);
        assert!(
            r.contains(&format!(
                "add element ip kube-proxy service-ips {{ 203.0.113.100 . tcp . 80 : goto {ext} }}"
            )),
            "{r}"
        );
        assert!(r.contains(&format!(
            "add element ip kube-proxy service-nodeports {{ tcp . 30080 : goto {ext} }}"
        )));
        assert!(r.contains(&format!(
            "add rule ip kube-proxy {ext} jump mark-for-masquerade"
        )));
        assert!(r.contains("numgen random mod 2 vmap"));
        assert!(r.contains("ip saddr != 192.0.2.0/24 jump mark-for-masquerade"));
        assert!(r.contains("add element ip kube-proxy nodeport-ips { 198.51.100.66 }"));
        assert!(!r.contains("2001:db8"), "IPv4 table only: {r}");
    }

    #[test]
    fn local_policy_drops_where_no_endpoint_runs() {
        let s = svc(TrafficPolicy::Local);
        let on_0 = rules(std::slice::from_ref(&s), 0, "node-0", true);
        let local = chain("local", &s);
        assert!(
            on_0.contains(&format!(
                "add rule ip6 kube-proxy {local} numgen random mod 1 vmap"
            )),
            "{on_0}"
        );
        assert!(on_0.contains("dnat to [2001:db8:a::10]:8080"));
        assert!(on_0.contains("__2001.db8.a..10/8080"), "{on_0}");
        let on_1 = rules(std::slice::from_ref(&s), 1, "node-1", true);
        assert!(on_1.contains("no-endpoint-services { 2001:db8:f::100 . tcp . 80 comment \"shop/web:http has no local endpoints\" : drop }"), "{on_1}");
        assert!(on_1.contains("no-endpoint-nodeports { tcp . 30080 comment"));
        assert!(!on_1.contains(&local));
    }
}
