//! The two baselines of the single-LB topology: the rules kube-proxy programs for a service in its iptables mode and
//! in its nftables mode, rendered for the benchmark's services and applied inside the
//! load-balancer namespace (`ip netns exec LB iptables-restore FILE` / `nft -f FILE`).
//!
//! The shape follows kube-proxy's proxiers (pkg/proxy/iptables and pkg/proxy/nftables),
//! for one ClusterIP-style VIP per service port. What every kube-proxy ruleset has (the
//! chain-name hash, the filter table, the nat table's fixed chains, the endpoint
//! choice, the nftables table with its sets, maps and base chains) is rendered once, in
//! `lb_testbed::cluster::kube_proxy` and `kube_proxy_nft`, which also render the cluster
//! topology's rules per node (NodePorts, LB IPs, traffic policies); this module adds
//! the per-service-port rules of the single-LB topology, the partial syncs and the
//! counters:
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
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use lb_testbed::Netns;
// kube-proxy's chain-name hash, its fixed chains and rules and its endpoint choice are
// rendered once, in the testbed, for this and the cluster baseline.
use lb_testbed::cluster::kube_proxy::{
    NODEPORTS_RULE, chain_hash, filter_head, kube_forward_rules, nat_top_level, statistic,
};
use lb_testbed::cluster::kube_proxy_nft;

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
    let mut filter = filter_head();
    filter.push_str(&kube_forward_rules());
    filter.push_str("COMMIT\n");
    filter
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
        let statistic = statistic(i, n);
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
    let mut out = kube_proxy_nft::base(false, Some(service_cidr), IpAddr::V4(node_ip));
    for svc in services {
        nft_service(&mut out, svc);
    }
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
