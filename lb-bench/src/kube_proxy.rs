//! The two baselines of the single-LB topology: the rules kube-proxy programs for a service in its iptables mode and
//! in its nftables mode, rendered for the benchmark's services and applied inside the
//! load-balancer namespace (`ip netns exec LB iptables-restore FILE` / `nft -f FILE`).
//!
//! The shape follows kube-proxy's proxiers (pkg/proxy/iptables and pkg/proxy/nftables),
//! written out here for one ClusterIP-style VIP per service port (the cluster topology's
//! rules, per node with NodePorts, LB IPs and traffic policies, are in
//! `lb_testbed::cluster::kube_proxy`):
//! - iptables: `PREROUTING -> KUBE-SERVICES -> KUBE-SVC-<hash>`, which picks an endpoint
//!   with `-m statistic --mode random --probability 1/(n-i)` jumps (the last one
//!   unconditional) to `KUBE-SEP-<hash>` chains that `DNAT --to-destination ip:port`; plus
//!   the filter-table jumps (`KUBE-FORWARD` with its conntrack rules, `KUBE-SERVICES`,
//!   `KUBE-EXTERNAL-SERVICES`, `KUBE-PROXY-FIREWALL`, `KUBE-NODEPORTS`) and the
//!   masquerade-mark chains every kube-proxy ruleset has.
//! - nftables: table `ip kube-proxy` with the base chains, sets and verdict maps of
//!   kube-proxy's nftables mode; `services` looks up `ip daddr . meta l4proto . th dport`
//!   in the `service-ips` map, which jumps to a service chain doing
//!   `numgen random mod n vmap { 0 : goto endpoint-..., ... }`, whose endpoint chains
//!   `dnat to ip:port`.
//!
//! As kube-proxy does without `--cluster-cidr` (and without `masqueradeAll`), nothing marks
//! the client's traffic for masquerading: the backends see the client's address, as with
//! xlb, which does not SNAT either. One deviation: the nftables endpoint rules carry a
//! `counter` (kube-proxy's have none) so the benchmark can check that they carried the
//! traffic; nat chains see only a connection's first packet, so its cost is negligible.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use lb_testbed::Netns;
// kube-proxy's chain-name hash and masquerade mark are shared with the cluster
// baseline's rules, which the testbed keeps.
use lb_testbed::cluster::kube_proxy::{MASQ_MARK, chain_hash};

/// One service port as kube-proxy sees it: `namespace/service:port_name`, a VIP:port and
/// its endpoints.
pub struct ServicePort {
    pub namespace: String,
    pub service: String,
    pub port_name: String,
    pub vip: SocketAddrV4,
    pub endpoints: Vec<SocketAddrV4>,
}

impl ServicePort {
    /// kube-proxy's service-port name, e.g. `bench/web:http`.
    pub fn name(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.service, self.port_name)
    }
}

fn svc_chain(svc: &ServicePort) -> String {
    format!("KUBE-SVC-{}", chain_hash(&format!("{}tcp", svc.name())))
}

fn sep_chain(svc: &ServicePort, endpoint: &str) -> String {
    format!(
        "KUBE-SEP-{}",
        chain_hash(&format!("{}tcp{endpoint}", svc.name()))
    )
}

/// `iptables-restore` input: kube-proxy's filter and nat tables for `services`. Without
/// `--noflush` it replaces both tables' contents.
pub fn iptables_rules(services: &[ServicePort]) -> String {
    format!("{}{}", iptables_filter(), iptables_nat(services))
}

/// The filter table: kube-proxy's jumps from the base chains and `KUBE-FORWARD`.
fn iptables_filter() -> String {
    let mut filter = String::from(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n:KUBE-NODEPORTS - [0:0]\n\
         :KUBE-PROXY-FIREWALL - [0:0]\n:KUBE-SERVICES - [0:0]\n",
    );
    let new = "-m conntrack --ctstate NEW";
    for (chain, jumps) in [
        (
            "INPUT",
            &[
                (
                    new,
                    "kubernetes load balancer firewall",
                    "KUBE-PROXY-FIREWALL",
                ),
                (
                    "",
                    "kubernetes health check service ports",
                    "KUBE-NODEPORTS",
                ),
                (
                    new,
                    "kubernetes externally-visible service portals",
                    "KUBE-EXTERNAL-SERVICES",
                ),
            ][..],
        ),
        (
            "FORWARD",
            &[
                (
                    new,
                    "kubernetes load balancer firewall",
                    "KUBE-PROXY-FIREWALL",
                ),
                ("", "kubernetes forwarding rules", "KUBE-FORWARD"),
                (new, "kubernetes service portals", "KUBE-SERVICES"),
                (
                    new,
                    "kubernetes externally-visible service portals",
                    "KUBE-EXTERNAL-SERVICES",
                ),
            ][..],
        ),
        (
            "OUTPUT",
            &[
                (
                    new,
                    "kubernetes load balancer firewall",
                    "KUBE-PROXY-FIREWALL",
                ),
                (new, "kubernetes service portals", "KUBE-SERVICES"),
            ][..],
        ),
    ] {
        for (matches, comment, target) in jumps {
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
    }
    filter.push_str(&kube_forward_rules());
    filter.push_str("COMMIT\n");
    filter
}

/// The rules of the filter table's `KUBE-FORWARD`.
fn kube_forward_rules() -> String {
    format!(
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
    )
}

/// The nat table: the masquerade chains, `KUBE-SERVICES`, and per service port its
/// `KUBE-SVC` chain and one `KUBE-SEP` chain per endpoint.
fn iptables_nat(services: &[ServicePort]) -> String {
    let (mut chains, mut rules) = nat_top_level(true);
    for svc in services {
        kube_services_rule(svc, &mut rules);
        iptables_service(svc, &mut chains, &mut rules);
    }
    rules.push_str(NODEPORTS_RULE);
    format!("{chains}{rules}COMMIT\n")
}

/// The nat table's header, the top-level chains kube-proxy rewrites on every sync and
/// their fixed rules; with `builtin`, the base chains and their jumps too (a full
/// restore; a partial one leaves them alone).
fn nat_top_level(builtin: bool) -> (String, String) {
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

const NODEPORTS_RULE: &str = "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";

/// The service port's jump in `KUBE-SERVICES`.
fn kube_services_rule(svc: &ServicePort, rules: &mut String) {
    let _ = writeln!(
        rules,
        "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m tcp -p tcp -d {} --dport {} -j {}",
        svc.name(),
        svc.vip.ip(),
        svc.vip.port(),
        svc_chain(svc)
    );
}

/// The service port's `KUBE-SVC` chain choosing an endpoint, and its `KUBE-SEP` chains.
fn iptables_service(svc: &ServicePort, chains: &mut String, rules: &mut String) {
    let name = svc.name();
    let svc_chain = svc_chain(svc);
    let _ = writeln!(chains, ":{svc_chain} - [0:0]");
    let n = svc.endpoints.len();
    for (i, address) in svc.endpoints.iter().enumerate() {
        let endpoint = address.to_string();
        let sep = sep_chain(svc, &endpoint);
        let _ = writeln!(chains, ":{sep} - [0:0]");
        // Endpoint i of n is taken with probability 1/(n-i) among what is left, so
        // each gets 1/n; the last jump is unconditional.
        let statistic = if i + 1 < n {
            #[expect(clippy::cast_precision_loss, reason = "a few endpoints")]
            let p = 1.0 / (n - i) as f64;
            format!("-m statistic --mode random --probability {p:.10} ")
        } else {
            String::new()
        };
        let _ = writeln!(
            rules,
            "-A {svc_chain} -m comment --comment \"{name} -> {endpoint}\" {statistic}-j {sep}"
        );
        let _ = writeln!(
            rules,
            "-A {sep} -m comment --comment {name} -s {} -j KUBE-MARK-MASQ",
            address.ip()
        );
        let _ = writeln!(
            rules,
            "-A {sep} -m comment --comment {name} -m tcp -p tcp -j DNAT --to-destination {endpoint}"
        );
    }
}

/// `iptables-restore --noflush` input for a change of `changed`'s endpoints (`gone` are
/// the ones it lost), as kube-proxy's partial sync writes it (the default since
/// Kubernetes 1.27, `MinimizeIPTablesRestore`): the top-level chains rewritten whole,
/// with every service's `KUBE-SERVICES` rule, only the changed service's own chains,
/// and the endpoint chains that went away flushed and deleted (`-X`).
pub fn iptables_partial(
    services: &[ServicePort],
    changed: &ServicePort,
    gone: &[SocketAddrV4],
) -> String {
    let mut out = String::from(
        "*filter\n:KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n\
         :KUBE-NODEPORTS - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n:KUBE-SERVICES - [0:0]\n",
    );
    out.push_str(&kube_forward_rules());
    out.push_str("COMMIT\n");
    let (mut chains, mut rules) = nat_top_level(false);
    for svc in services {
        kube_services_rule(svc, &mut rules);
    }
    rules.push_str(NODEPORTS_RULE);
    iptables_service(changed, &mut chains, &mut rules);
    // A chain is deleted flushed: declared (which empties it) and then `-X`.
    for endpoint in gone {
        let sep = sep_chain(changed, &endpoint.to_string());
        let _ = writeln!(chains, ":{sep} - [0:0]");
        let _ = writeln!(rules, "-X {sep}");
    }
    let _ = writeln!(out, "{chains}{rules}COMMIT");
    out
}

/// `iptables-restore` input that empties the filter and nat tables (flushes every chain
/// and deletes the user-defined ones).
const IPTABLES_EMPTY: &str = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n\
     :OUTPUT ACCEPT [0:0]\nCOMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n\
     :OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n";

/// kube-proxy's nftables table.
const NFT_TABLE: &str = "ip kube-proxy";

/// `nft -f` input: kube-proxy's nftables-mode table for `services`. `service_cidr` is the
/// range the VIPs come from; `node_ip` accepts `NodePort` traffic (none here).
pub fn nft_rules(services: &[ServicePort], service_cidr: &str, node_ip: Ipv4Addr) -> String {
    let mut out = nft_base(service_cidr, node_ip);
    for svc in services {
        nft_service(&mut out, svc);
    }
    out
}

/// The table, its sets and maps, base chains and base rules.
fn nft_base(service_cidr: &str, node_ip: Ipv4Addr) -> String {
    let t = NFT_TABLE;
    let key = "ipv4_addr . inet_proto . inet_service";
    let mut out = format!(
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}\n\
         add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}\n\
         add set {t} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}\n\
         add map {t} firewall-ips {{ type {key} : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}\n\
         add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}\n\
         add map {t} no-endpoint-services {{ type {key} : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}\n\
         add map {t} service-ips {{ type {key} : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
         add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}\n"
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
    for rule in [
        "cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"".to_owned(),
        format!("cluster-ips-check ip daddr {{ {service_cidr} }} drop comment \"Drop traffic to unallocated ClusterIPs\""),
        "filter-prerouting-pre-dnat ct state new jump firewall-check".to_owned(),
        "filter-forward ct state new jump service-endpoints-check".to_owned(),
        "filter-forward ct state new jump cluster-ips-check".to_owned(),
        "filter-input ct state new jump nodeport-endpoints-check".to_owned(),
        "filter-input ct state new jump service-endpoints-check".to_owned(),
        "filter-output ct state new jump service-endpoints-check".to_owned(),
        "filter-output-pre-dnat ct state new jump firewall-check".to_owned(),
        "filter-output ct state new jump cluster-ips-check".to_owned(),
        "firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips".to_owned(),
        format!("mark-for-masquerade mark set mark or {MASQ_MARK}"),
        format!("masquerading mark and {MASQ_MARK} == 0 return"),
        format!("masquerading mark set mark xor {MASQ_MARK}"),
        "masquerading masquerade fully-random".to_owned(),
        "nat-output jump services".to_owned(),
        "nat-postrouting jump masquerading".to_owned(),
        "nat-prerouting jump services".to_owned(),
        "nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports".to_owned(),
        "reject-chain reject".to_owned(),
        "services ip daddr . meta l4proto . th dport vmap @service-ips".to_owned(),
        "services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports".to_owned(),
        "service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services".to_owned(),
    ] {
        let _ = writeln!(out, "add rule {t} {rule}");
    }
    let _ = writeln!(out, "add element {t} nodeport-ips {{ {node_ip} }}");
    out
}

/// kube-proxy's nftables chain names: "service-<hash8>-<namespace>/<name>/tcp/<port
/// name>" and "endpoint-<hash8>-<...>__<ip>/<port>".
fn nft_service_chain(svc: &ServicePort) -> String {
    let base = nft_base_name(svc);
    format!("service-{}-{base}", &chain_hash(&format!("{base}tcp"))[..8])
}

fn nft_endpoint_chain(svc: &ServicePort, endpoint: SocketAddrV4) -> String {
    let suffix = format!(
        "{}__{}/{}",
        nft_base_name(svc),
        endpoint.ip(),
        endpoint.port()
    );
    format!("endpoint-{}-{suffix}", &chain_hash(&suffix)[..8])
}

fn nft_base_name(svc: &ServicePort) -> String {
    format!("{}/{}/tcp/{}", svc.namespace, svc.service, svc.port_name)
}

/// One service port: its service chain choosing an endpoint chain at random, the endpoint
/// chains, and its elements in `cluster-ips` and `service-ips`.
fn nft_service(out: &mut String, svc: &ServicePort) {
    let t = NFT_TABLE;
    let chain = nft_service_chain(svc);
    // Chains before the rules that jump to them.
    let _ = writeln!(out, "add chain {t} {chain}");
    nft_endpoints(out, svc, &svc.endpoints);
    nft_numgen(out, svc, &chain);
    let _ = writeln!(out, "add element {t} cluster-ips {{ {} }}", svc.vip.ip());
    let _ = writeln!(
        out,
        "add element {t} service-ips {{ {} . tcp . {} : goto {chain} }}",
        svc.vip.ip(),
        svc.vip.port()
    );
}

/// Endpoint chains for `endpoints` of `svc`.
fn nft_endpoints(out: &mut String, svc: &ServicePort, endpoints: &[SocketAddrV4]) {
    let t = NFT_TABLE;
    for endpoint in endpoints {
        let endpoint_chain = nft_endpoint_chain(svc, *endpoint);
        let _ = writeln!(out, "add chain {t} {endpoint_chain}");
        let _ = writeln!(
            out,
            "add rule {t} {endpoint_chain} ip saddr {} jump mark-for-masquerade",
            endpoint.ip()
        );
        let _ = writeln!(
            out,
            "add rule {t} {endpoint_chain} meta l4proto tcp counter dnat to {endpoint}"
        );
    }
}

/// The service chain's rule choosing one of its endpoint chains at random.
fn nft_numgen(out: &mut String, svc: &ServicePort, chain: &str) {
    let vmap: Vec<String> = svc
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| format!("{i} : goto {}", nft_endpoint_chain(svc, *e)))
        .collect();
    let _ = writeln!(
        out,
        "add rule {NFT_TABLE} {chain} numgen random mod {} vmap {{ {} }}",
        svc.endpoints.len(),
        vmap.join(" , ")
    );
}

/// `nft -f` input for a change of `changed`'s endpoints (`added` are new, `gone` went
/// away), as kube-proxy's nftables mode sends it in one transaction: the new endpoint
/// chains, the service chain flushed and refilled, the old endpoint chains deleted.
pub fn nft_change(changed: &ServicePort, added: &[SocketAddrV4], gone: &[SocketAddrV4]) -> String {
    let t = NFT_TABLE;
    let mut out = String::new();
    nft_endpoints(&mut out, changed, added);
    let chain = nft_service_chain(changed);
    let _ = writeln!(out, "flush chain {t} {chain}");
    nft_numgen(&mut out, changed, &chain);
    for endpoint in gone {
        let _ = writeln!(
            out,
            "delete chain {t} {}",
            nft_endpoint_chain(changed, *endpoint)
        );
    }
    out
}

/// A file under the temporary directory, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("xlb-bench-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).with_context(|| format!("write {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            tracing::warn!(path = %self.0.display(), error = %e, "cannot remove temporary file");
        }
    }
}

/// Programs kube-proxy's iptables rules in `lb`.
pub fn apply_iptables(lb: &Netns, services: &[ServicePort]) -> Result<()> {
    let file = TempFile::new("iptables.rules", &iptables_rules(services))?;
    lb.exec("iptables-restore", &[file.path()])?;
    Ok(())
}

/// Programs kube-proxy's nftables rules in `lb`.
pub fn apply_nftables(
    lb: &Netns,
    services: &[ServicePort],
    service_cidr: &str,
    node_ip: Ipv4Addr,
) -> Result<()> {
    let file = TempFile::new("nft.rules", &nft_rules(services, service_cidr, node_ip))?;
    lb.exec("nft", &["-f", file.path()])?;
    Ok(())
}

/// Removes every iptables and nftables rule in `lb` (only ever the benchmark's own
/// namespace): empties the iptables filter and nat tables (which also covers the legacy
/// backend), then flushes the whole nftables ruleset, which removes the tables
/// `iptables-nft` created as well as `ip kube-proxy`.
pub fn clear(lb: &Netns) -> Result<()> {
    let file = TempFile::new("iptables.empty", IPTABLES_EMPTY)?;
    lb.exec("iptables-restore", &[file.path()])?;
    lb.exec("nft", &["flush", "ruleset"])?;
    Ok(())
}

/// What netfilter rules `lb` holds: `iptables-save` rule lines and `nft list ruleset`
/// lines (both empty when nothing is programmed).
pub fn rules_present(lb: &Netns) -> Result<(usize, usize)> {
    let save = lb.exec("iptables-save", &[])?;
    let iptables = String::from_utf8_lossy(&save.stdout)
        .lines()
        .filter(|l| l.starts_with("-A "))
        .count();
    let list = lb.exec("nft", &["list", "ruleset"])?;
    let nft = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count();
    Ok((iptables, nft))
}

/// Connections each endpoint's DNAT rule translated (packet counts of the nat rules, which
/// see only a connection's first packet), from `iptables-save -c -t nat`.
pub fn iptables_dnat_counts(lb: &Netns) -> Result<BTreeMap<String, u64>> {
    let out = lb.exec("iptables-save", &["-c", "-t", "nat"])?;
    parse_iptables_counts(&String::from_utf8_lossy(&out.stdout))
}

fn parse_iptables_counts(save: &str) -> Result<BTreeMap<String, u64>> {
    let mut counts = BTreeMap::new();
    for line in save.lines() {
        let Some((_, endpoint)) = line.split_once("-j DNAT --to-destination ") else {
            continue;
        };
        let packets = line
            .strip_prefix('[')
            .and_then(|l| l.split_once(':'))
            .and_then(|(p, _)| p.parse::<u64>().ok())
            .with_context(|| format!("no [packets:bytes] counter on {line:?}"))?;
        *counts.entry(endpoint.trim().to_owned()).or_default() += packets;
    }
    if counts.is_empty() {
        bail!("no DNAT rules in iptables-save output:\n{save}");
    }
    Ok(counts)
}

/// Connections each endpoint's `dnat` rule translated, from its counter in
/// `nft list table ip kube-proxy`.
pub fn nft_dnat_counts(lb: &Netns) -> Result<BTreeMap<String, u64>> {
    let out = lb.exec("nft", &["list", "table", "ip", "kube-proxy"])?;
    parse_nft_counts(&String::from_utf8_lossy(&out.stdout))
}

fn parse_nft_counts(list: &str) -> Result<BTreeMap<String, u64>> {
    let mut counts = BTreeMap::new();
    for line in list.lines() {
        let Some((before, endpoint)) = line.split_once(" dnat to ") else {
            continue;
        };
        let packets = before
            .split_once("counter packets ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|p| p.parse::<u64>().ok())
            .with_context(|| format!("no counter on {line:?}"))?;
        *counts.entry(endpoint.trim().to_owned()).or_default() += packets;
    }
    if counts.is_empty() {
        bail!("no dnat rules in the nft listing:\n{list}");
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services() -> Vec<ServicePort> {
        let b = |i: u8, port| SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 11 + i), port);
        vec![
            ServicePort {
                namespace: "bench".into(),
                service: "web".into(),
                port_name: "http".into(),
                vip: SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 80),
                endpoints: (0..4).map(|i| b(i, 8080)).collect(),
            },
            ServicePort {
                namespace: "bench".into(),
                service: "web".into(),
                port_name: "iperf".into(),
                vip: SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 5201),
                endpoints: vec![b(0, 5201)],
            },
        ]
    }

    #[test]
    fn chain_hashes_are_stable_base32() {
        let h = chain_hash("bench/web:httptcp");
        assert_eq!(h.len(), 16);
        assert!(
            h.bytes()
                .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
        );
        assert_eq!(h, chain_hash("bench/web:httptcp"));
        assert_ne!(h, chain_hash("bench/web:iperftcp"));
    }

    #[test]
    fn iptables_rules_have_kube_proxy_shape() {
        let rules = iptables_rules(&services());
        let svc = svc_chain(&services()[0]);
        assert!(rules.contains(&format!(
            "-A KUBE-SERVICES -m comment --comment \"bench/web:http cluster IP\" -m tcp -p tcp -d 203.0.113.10 --dport 80 -j {svc}"
        )));
        let probabilities: Vec<&str> = rules
            .lines()
            .filter(|l| l.starts_with(&format!("-A {svc} ")))
            .map(|l| {
                l.split("--probability ")
                    .nth(1)
                    .map_or("last", |p| p.split(' ').next().unwrap())
            })
            .collect();
        assert_eq!(
            probabilities,
            ["0.2500000000", "0.3333333333", "0.5000000000", "last"]
        );
        assert_eq!(
            rules.matches("-j DNAT --to-destination 192.0.2.").count(),
            5
        );
        assert!(rules.contains("-j DNAT --to-destination 192.0.2.11:5201"));
        // No rule marks client traffic for masquerading (no --cluster-cidr).
        assert!(!rules.contains("! -s"));
        // Every chain a rule uses is declared.
        for line in rules.lines().filter(|l| l.starts_with("-A ")) {
            let chain = line.split(' ').nth(1).unwrap();
            assert!(rules.contains(&format!(":{chain} ")), "{chain} undeclared");
        }
        assert_eq!(rules.matches("COMMIT").count(), 2);
    }

    #[test]
    fn nft_rules_have_kube_proxy_shape() {
        let rules = nft_rules(
            &services(),
            "203.0.113.0/24",
            Ipv4Addr::new(198, 51, 100, 1),
        );
        assert!(rules.contains(
            "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips"
        ));
        let numgen = rules
            .lines()
            .find(|l| l.contains("numgen random mod 4 vmap"))
            .expect("a 4-way numgen");
        assert_eq!(numgen.matches(": goto endpoint-").count(), 4);
        assert!(rules.contains("numgen random mod 1 vmap { 0 : goto endpoint-"));
        assert!(rules.contains("meta l4proto tcp counter dnat to 192.0.2.14:8080"));
        assert!(rules.contains("203.0.113.10 . tcp . 80 : goto service-"));
        assert!(rules.contains("203.0.113.10 . tcp . 5201 : goto service-"));
        // nft 1.0.6 wants numeric priorities.
        assert!(!rules.contains("dstnat"));
    }

    #[test]
    fn counters_are_parsed() {
        let save = "*nat\n[7:420] -A KUBE-SEP-A -m comment --comment x -m tcp -p tcp -j DNAT --to-destination 192.0.2.11:8080\n\
                    [0:0] -A KUBE-SEP-A -m comment --comment x -s 192.0.2.11/32 -j KUBE-MARK-MASQ\n\
                    [3:180] -A KUBE-SEP-B -m tcp -p tcp -j DNAT --to-destination 192.0.2.12:8080\nCOMMIT\n";
        let c = parse_iptables_counts(save).unwrap();
        assert_eq!(c["192.0.2.11:8080"], 7);
        assert_eq!(c["192.0.2.12:8080"], 3);
        let list = "table ip kube-proxy {\n\tchain endpoint-X {\n\t\tip saddr 192.0.2.11 jump mark-for-masquerade\n\
                    \t\tmeta l4proto tcp counter packets 12 bytes 720 dnat to 192.0.2.11:8080\n\t}\n}\n";
        assert_eq!(parse_nft_counts(list).unwrap()["192.0.2.11:8080"], 12);
        assert!(parse_nft_counts("table ip kube-proxy {}\n").is_err());
    }
}
