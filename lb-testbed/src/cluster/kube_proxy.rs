//! kube-proxy's iptables mode on every node of the [`Cluster`]: the rules its proxier
//! (pkg/proxy/iptables) writes for the cluster's Services, rendered per node and per
//! family (`iptables-restore` for IPv4, `ip6tables-restore` for IPv6) and applied inside
//! the node's namespace.
//!
//! The shape, for a service port `ns/svc:port` (kube-proxy 1.28 and later, with
//! `--cluster-cidr` set to the pod CIDRs, as every distribution sets it):
//! - nat: `PREROUTING`/`OUTPUT -> KUBE-SERVICES`; per ClusterIP a jump to `KUBE-SVC-<h>`,
//!   which masquerades traffic not from a pod (`! -s CLUSTER_CIDR -j KUBE-MARK-MASQ`) and
//!   picks an endpoint (`-m statistic --mode random --probability 1/(n-i)`) whose
//!   `KUBE-SEP-<h>` chain DNATs (and marks hairpin traffic). Per LB IP a jump from
//!   `KUBE-SERVICES`, per NodePort one from `KUBE-NODEPORTS` (reached for local
//!   destinations, the last rule of `KUBE-SERVICES`), both to `KUBE-EXT-<h>`:
//!   - `externalTrafficPolicy: Cluster`: mark for masquerade, then `KUBE-SVC`;
//!   - `Local`: pod and node-local sources go to `KUBE-SVC` (node-local ones
//!     masqueraded), everything else to `KUBE-SVL-<h>`, which picks among this node's
//!     endpoints only and never masquerades. With no local endpoint, no `KUBE-EXT` jump
//!     exists and the filter table's `KUBE-EXTERNAL-SERVICES` drops the traffic.
//! - nat, on the way out: `KUBE-POSTROUTING` masquerades marked packets
//!   (`MASQUERADE --random-fully`).
//! - filter: the base-chain jumps, `KUBE-FORWARD` (drop conntrack INVALID, accept marked
//!   and established traffic), `KUBE-SERVICES` rejecting Services without endpoints.
//!
//! Chain names hash the service-port name as kube-proxy does (its hash is SHA-256; any
//! stable hash gives the same rule shape): [`chain_hash`].

use std::fmt::Write as _;
use std::net::SocketAddr;

use anyhow::Context;

use super::scenarios::{NodeProgram, PodSees};
use super::{CLUSTER_CIDR_V4, CLUSTER_CIDR_V6, Cluster, ClusterService, Endpoint, TrafficPolicy};

/// kube-proxy's masquerade mark.
pub const MASQ_MARK: &str = "0x4000";

/// kube-proxy's chain-name hash: 16 characters of base32 of a hash of `name`. Two
/// FNV-1a passes with different bases give the 80 bits.
pub fn chain_hash(name: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let fnv = |basis: u64| {
        name.bytes().fold(basis, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    };
    let (hi, lo) = (fnv(0xcbf2_9ce4_8422_2325), fnv(0x8422_2325_cbf2_9ce4));
    let bits = (u128::from(hi) << 64) | u128::from(lo);
    (0..16)
        .map(|i| char::from(ALPHABET[((bits >> (123 - 5 * i)) & 31) as usize]))
        .collect()
}

fn chain(prefix: &str, svc: &ClusterService) -> String {
    format!(
        "{prefix}-{}",
        chain_hash(&format!("{}{}", svc.port_name_full(), svc.protocol.name()))
    )
}

fn sep_chain(svc: &ClusterService, endpoint: &SocketAddr) -> String {
    format!(
        "KUBE-SEP-{}",
        chain_hash(&format!(
            "{}{}{endpoint}",
            svc.port_name_full(),
            svc.protocol.name()
        ))
    )
}

/// `iptables-restore` (`v6`: `ip6tables-restore`) input: kube-proxy's filter and nat
/// tables on node `node_name` for `services`.
pub fn rules(services: &[ClusterService], node_name: &str, v6: bool) -> String {
    let cluster_cidr = if v6 { CLUSTER_CIDR_V6 } else { CLUSTER_CIDR_V4 };
    let mut filter = filter_head();
    filter.push_str(&kube_forward_rules());
    let (chains, nat) = nat_top_level(true);
    let mut t = Tables {
        filter,
        chains,
        nat,
    };
    for svc in services {
        service_rules(svc, node_name, v6, cluster_cidr, &mut t);
    }
    let Tables {
        filter,
        chains,
        mut nat,
    } = t;
    nat.push_str(NODEPORTS_RULE);
    format!("{filter}COMMIT\n{chains}{nat}COMMIT\n")
}

/// The filter table's header, base chains, kube-proxy's chains and the jumps from the
/// base chains to them (without `KUBE-FORWARD`'s rules and `COMMIT`). Shared with the
/// single-LB benchmark's rules (lb-bench), which render the same kube-proxy.
pub fn filter_head() -> String {
    let mut filter = String::from(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n:KUBE-NODEPORTS - [0:0]\n\
         :KUBE-PROXY-FIREWALL - [0:0]\n:KUBE-SERVICES - [0:0]\n",
    );
    let new = "-m conntrack --ctstate NEW";
    for (chain, matches, comment, target) in [
        (
            "INPUT",
            new,
            "kubernetes load balancer firewall",
            "KUBE-PROXY-FIREWALL",
        ),
        (
            "INPUT",
            "",
            "kubernetes health check service ports",
            "KUBE-NODEPORTS",
        ),
        (
            "INPUT",
            new,
            "kubernetes externally-visible service portals",
            "KUBE-EXTERNAL-SERVICES",
        ),
        (
            "FORWARD",
            new,
            "kubernetes load balancer firewall",
            "KUBE-PROXY-FIREWALL",
        ),
        ("FORWARD", "", "kubernetes forwarding rules", "KUBE-FORWARD"),
        (
            "FORWARD",
            new,
            "kubernetes service portals",
            "KUBE-SERVICES",
        ),
        (
            "FORWARD",
            new,
            "kubernetes externally-visible service portals",
            "KUBE-EXTERNAL-SERVICES",
        ),
        (
            "OUTPUT",
            new,
            "kubernetes load balancer firewall",
            "KUBE-PROXY-FIREWALL",
        ),
        ("OUTPUT", new, "kubernetes service portals", "KUBE-SERVICES"),
    ] {
        let matches = if matches.is_empty() {
            String::new()
        } else {
            format!("{matches} ")
        };
        let _ = writeln!(
            filter,
            "-A {chain} {matches}-m comment --comment \"{comment}\" -j {target}"
        );
    }
    filter
}

/// The rules of the filter table's `KUBE-FORWARD`: drop conntrack INVALID, accept
/// marked and established traffic.
pub fn kube_forward_rules() -> String {
    format!(
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
    )
}

/// The nat table's header, the top-level chains kube-proxy rewrites on every sync and
/// their fixed rules (the masquerade mark and `KUBE-POSTROUTING`), as (chain
/// declarations, rules); with `builtin`, the base chains and their jumps too (a full
/// restore; a partial one leaves them alone).
pub fn nat_top_level(builtin: bool) -> (String, String) {
    let mut chains = String::from("*nat\n");
    let mut rules = String::new();
    if builtin {
        chains.push_str(
            ":PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
             :POSTROUTING ACCEPT [0:0]\n",
        );
        rules.push_str(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
        );
    }
    chains.push_str(
        ":KUBE-MARK-MASQ - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n\
         :KUBE-SERVICES - [0:0]\n",
    );
    let _ = write!(
        rules,
        "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}\n\
         -A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n"
    );
    (chains, rules)
}

/// The last rule of `KUBE-SERVICES`: local destinations on to `KUBE-NODEPORTS`.
pub const NODEPORTS_RULE: &str = "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";

/// The `-m statistic` match of the jump to endpoint `i` of `n` (with a trailing
/// space): probability 1/(n-i) among those left, so each gets 1/n; none for the last,
/// whose jump is unconditional.
pub fn statistic(i: usize, n: usize) -> String {
    if i + 1 < n {
        #[expect(clippy::cast_precision_loss, reason = "a few endpoints")]
        let p = 1.0 / (n - i) as f64;
        format!("-m statistic --mode random --probability {p:.10} ")
    } else {
        String::new()
    }
}

/// The three parts of the restore input that Services add to.
struct Tables {
    filter: String,
    /// The nat table's chain declarations.
    chains: String,
    /// The nat table's rules.
    nat: String,
}

/// One Service's rules on node `node_name`, for one family.
fn service_rules(
    svc: &ClusterService,
    node_name: &str,
    v6: bool,
    cluster_cidr: &str,
    t: &mut Tables,
) {
    let Some(cluster_ip) = svc.cluster_ip(v6) else {
        return;
    };
    let lb_ips: Vec<SocketAddr> = svc.load_balancer_ip(v6).into_iter().collect();
    let endpoints: Vec<&Endpoint> = svc.endpoints_of(v6).collect();
    let local: Vec<&Endpoint> = endpoints
        .iter()
        .copied()
        .filter(|e| e.node == node_name)
        .collect();
    let p = svc.protocol.name();
    let proto = format!("-m {p} -p {p}");
    let name = svc.port_name_full();
    if endpoints.is_empty() {
        let _ = writeln!(
            t.filter,
            "-A KUBE-SERVICES -m comment --comment \"{name} has no endpoints\" {proto} -d {} --dport {} -j REJECT",
            cluster_ip.ip(),
            cluster_ip.port()
        );
        return;
    }
    let svc_chain = chain("KUBE-SVC", svc);
    let _ = writeln!(t.chains, ":{svc_chain} - [0:0]");
    let _ = writeln!(
        t.nat,
        "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" {proto} -d {} --dport {} -j {svc_chain}",
        cluster_ip.ip(),
        cluster_ip.port()
    );
    let _ = writeln!(
        t.nat,
        "-A {svc_chain} -m comment --comment \"{name} cluster IP\" {proto} -d {} --dport {} ! -s {cluster_cidr} -j KUBE-MARK-MASQ",
        cluster_ip.ip(),
        cluster_ip.port()
    );
    pick_endpoint(svc, &svc_chain, &endpoints, &mut t.nat);
    for e in &endpoints {
        let target = SocketAddr::new(e.address, svc.target_port);
        let sep = sep_chain(svc, &target);
        let _ = writeln!(t.chains, ":{sep} - [0:0]");
        let _ = writeln!(
            t.nat,
            "-A {sep} -m comment --comment {name} -s {} -j KUBE-MARK-MASQ",
            e.address
        );
        let _ = writeln!(
            t.nat,
            "-A {sep} -m comment --comment {name} {proto} -j DNAT --to-destination {target}"
        );
    }
    if svc.externally_accessible() {
        let external = External {
            svc_chain: &svc_chain,
            lb_ips: &lb_ips,
            local: &local,
            proto: &proto,
            cluster_cidr,
        };
        external_rules(svc, &external, t);
    }
}

/// What [`external_rules`] needs of a Service beyond the Service itself.
struct External<'a> {
    svc_chain: &'a str,
    lb_ips: &'a [SocketAddr],
    /// This node's endpoints.
    local: &'a [&'a Endpoint],
    /// `-m tcp -p tcp`.
    proto: &'a str,
    cluster_cidr: &'a str,
}

/// The rules of a Service's LB IPs and NodePort: its `KUBE-EXT` chain and, for
/// `Local`, its `KUBE-SVL` chain, or the drop rules when this node has no endpoint.
fn external_rules(svc: &ClusterService, x: &External<'_>, t: &mut Tables) {
    let name = svc.port_name_full();
    let (proto, svc_chain, cluster_cidr) = (x.proto, x.svc_chain, x.cluster_cidr);
    let local_policy = svc.external_traffic_policy == TrafficPolicy::Local;
    if local_policy && x.local.is_empty() {
        for lb in x.lb_ips {
            let _ = writeln!(
                t.filter,
                "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{name} has no local endpoints\" {proto} -d {} --dport {} -j DROP",
                lb.ip(),
                lb.port()
            );
        }
        if let Some(node_port) = svc.node_port {
            let _ = writeln!(
                t.filter,
                "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{name} has no local endpoints\" -m addrtype --dst-type LOCAL {proto} --dport {node_port} -j DROP"
            );
        }
        return;
    }
    let ext = chain("KUBE-EXT", svc);
    let _ = writeln!(t.chains, ":{ext} - [0:0]");
    if local_policy {
        let svl = chain("KUBE-SVL", svc);
        let _ = writeln!(t.chains, ":{svl} - [0:0]");
        let _ = write!(
            t.nat,
            "-A {ext} -s {cluster_cidr} -m comment --comment \"pod traffic for {name} external destinations\" -j {svc_chain}\n\
             -A {ext} -m comment --comment \"masquerade LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ\n\
             -A {ext} -m comment --comment \"route LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {svc_chain}\n\
             -A {ext} -j {svl}\n"
        );
        pick_endpoint(svc, &svl, x.local, &mut t.nat);
    } else {
        let _ = write!(
            t.nat,
            "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ\n\
             -A {ext} -j {svc_chain}\n"
        );
    }
    for lb in x.lb_ips {
        let _ = writeln!(
            t.nat,
            "-A KUBE-SERVICES -m comment --comment \"{name} loadbalancer IP\" {proto} -d {} --dport {} -j {ext}",
            lb.ip(),
            lb.port()
        );
    }
    if let Some(node_port) = svc.node_port {
        let _ = writeln!(
            t.nat,
            "-A KUBE-NODEPORTS -m comment --comment {name} {proto} --dport {node_port} -j {ext}"
        );
    }
}

/// `chain`'s rules choosing one of `endpoints` at random: endpoint i of n with
/// probability 1/(n-i) among those left, the last unconditionally.
fn pick_endpoint(svc: &ClusterService, chain: &str, endpoints: &[&Endpoint], nat: &mut String) {
    let n = endpoints.len();
    let name = svc.port_name_full();
    for (i, e) in endpoints.iter().enumerate() {
        let target = SocketAddr::new(e.address, svc.target_port);
        let statistic = statistic(i, n);
        let _ = writeln!(
            nat,
            "-A {chain} -m comment --comment \"{name} -> {target}\" {statistic}-j {}",
            sep_chain(svc, &target)
        );
    }
}

/// kube-proxy's iptables mode as the [`NodeProgram`] of the scenarios: programs
/// [`rules`] on every node, both families.
#[derive(Debug, Default)]
pub struct KubeProxyIptables;

impl<'c> NodeProgram<'c> for KubeProxyIptables {
    fn name(&self) -> String {
        "kube-proxy iptables".to_owned()
    }

    fn program(&mut self, cluster: &'c Cluster, services: &[ClusterService]) -> anyhow::Result<()> {
        for svc in services {
            svc.validate()?;
        }
        for node in &cluster.nodes {
            for (v6, tool) in [(false, "iptables-restore"), (true, "ip6tables-restore")] {
                let text = rules(services, &node.name, v6);
                let file = std::env::temp_dir().join(format!(
                    "xlb-kube-proxy-{}-{}-{}.rules",
                    node.ns.name(),
                    node.name,
                    if v6 { 6 } else { 4 }
                ));
                std::fs::write(&file, &text)
                    .with_context(|| format!("write {}", file.display()))?;
                let applied = node.ns.exec(tool, &[&file.display().to_string()]);
                let _ = std::fs::remove_file(&file);
                applied.with_context(|| format!("{tool} on {}", node.name))?;
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
    use crate::cluster::service::fixture::web as svc;

    fn declared_chains_are_complete(rules: &str) {
        for line in rules.lines().filter(|l| l.starts_with("-A ")) {
            let chain = line.split(' ').nth(1).unwrap();
            assert!(
                rules.contains(&format!(":{chain} ")),
                "{chain} undeclared:\n{rules}"
            );
        }
    }

    #[test]
    fn cluster_policy_masquerades_external_traffic() {
        let s = svc(
            TrafficPolicy::Cluster,
            &[("192.0.2.10", "node-0"), ("192.0.2.42", "node-1")],
        );
        let r = rules(std::slice::from_ref(&s), "node-0", false);
        let ext = chain("KUBE-EXT", &s);
        assert!(
            r.contains(&format!("-d 203.0.113.100 --dport 80 -j {ext}")),
            "{r}"
        );
        assert!(r.contains(&format!("-A KUBE-NODEPORTS -m comment --comment shop/web:http -m tcp -p tcp --dport 30080 -j {ext}")));
        assert!(r.contains(&format!("-A {ext} -m comment --comment \"masquerade traffic for shop/web:http external destinations\" -j KUBE-MARK-MASQ")));
        assert!(r.contains("! -s 192.0.2.0/24 -j KUBE-MARK-MASQ"));
        assert!(r.contains("--probability 0.5000000000 "));
        assert!(r.contains("-j DNAT --to-destination 192.0.2.42:8080"));
        assert!(!r.contains("2001:db8"), "IPv4 rules only: {r}");
        declared_chains_are_complete(&r);
    }

    #[test]
    fn local_policy_uses_local_endpoints_or_drops() {
        let s = svc(
            TrafficPolicy::Local,
            &[("192.0.2.10", "node-0"), ("2001:db8:a:1::10", "node-1")],
        );
        let on_0 = rules(std::slice::from_ref(&s), "node-0", false);
        let svl = chain("KUBE-SVL", &s);
        assert!(
            on_0.contains(&format!(
                "-A {svl} -m comment --comment \"shop/web:http -> 192.0.2.10:8080\" -j KUBE-SEP-"
            )),
            "{on_0}"
        );
        assert!(
            !on_0.contains(
                "KUBE-EXTERNAL-SERVICES -m comment --comment \"shop/web:http has no local"
            )
        );
        declared_chains_are_complete(&on_0);
        // node-0 has no IPv6 endpoint: external IPv6 traffic is dropped there.
        let v6_on_0 = rules(std::slice::from_ref(&s), "node-0", true);
        assert!(!v6_on_0.contains("KUBE-SVL"), "{v6_on_0}");
        assert!(
            v6_on_0.contains("-m addrtype --dst-type LOCAL -m tcp -p tcp --dport 30080 -j DROP"),
            "{v6_on_0}"
        );
        assert!(v6_on_0.contains("-j DNAT --to-destination [2001:db8:a:1::10]:8080"));
        assert!(v6_on_0.contains("! -s 2001:db8:a::/48"));
        declared_chains_are_complete(&v6_on_0);
    }
}
