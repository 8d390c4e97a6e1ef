//! The cluster scenarios, written once and run against whatever programs the nodes (a
//! [`NodeProgram`]: kube-proxy's iptables rules, xlb agents in some mode). Each scenario
//! runs bounded numbers of real connections from the client and checks who answered
//! and which source address the pod saw; a failure names every connection that went
//! wrong.
//!
//! Use: build a [`Cluster`], start [`PodServers`](super::apps::PodServers) on
//! [`POD_PORT`], take [`standard_services`], program them with the implementation under
//! test, call [`announce`], then any scenario ([`frontends`], [`node_drop`],
//! [`path_mtu`], [`reply_path_mtu`], [`bulk`]):
//!
//! ```text
//! let cluster = Cluster::for_test("snat", PodNetwork::HostGw);
//! let _servers = PodServers::start(&cluster, POD_PORT)?;
//! let services = scenarios::standard_services(&cluster);
//! let mut xlb = XlbAgents::new(Path::new(AGENT), "xlb snat", &["--lb-mode", "snat"],
//!                              PodSees::NodeIfRemote, false);
//! xlb.program(&cluster, &services)?;
//! scenarios::announce(&cluster, &services)?;
//! scenarios::frontends(&cluster, &xlb, &services, Protocol::Tcp, false)?;
//! scenarios::node_drop(&cluster, &xlb, &services, true)?;
//! scenarios::path_mtu(&cluster, &xlb, &services, false, SmallLink::PodLink)?;
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, bail};

use super::apps::{self, Answer, LongLived};
use super::{
    Cluster, ClusterService, Endpoint, Protocol, TrafficPolicy, VIP_RANGE_V4, VIP_RANGE_V6,
};

/// The port every pod server listens on (TCP and UDP).
pub const POD_PORT: u16 = 8080;

/// New connections per frontend case (LB IP, NodePorts, ClusterIPs).
pub const CONNECTIONS: usize = 30;

/// Long-lived connections in [`node_drop`].
pub const LONG_LIVED: usize = 20;

/// The node [`node_drop`] withdraws from the router's multipath route.
pub const DROPPED_NODE: usize = 1;

/// A case stops after this many failed connections (each may take [`TIMEOUT`]), so a
/// broken implementation fails in seconds, not minutes; the rest are reported untried.
const MAX_FAILURES_PER_CASE: usize = 3;

/// Deadline of one connection or exchange.
const TIMEOUT: Duration = Duration::from_secs(2);

/// The smaller MTU of [`path_mtu`]'s pod link (IPv6's minimum, so both families use it).
pub const SMALL_MTU: u32 = 1280;

/// The payload of [`path_mtu`]'s UDP probe: over [`SMALL_MTU`] with headers of either
/// family, under every other link's MTU (VXLAN's 1430 included) even inside DSR's outer
/// header, so it meets the small link first.
const PROBE_BYTES: usize = 1300;

/// The bulk transfer of [`path_mtu`].
const TRANSFER_BYTES: usize = 64 * 1024;

/// Where the pod of [`path_mtu`]'s Services runs: (node, pod).
pub const MTU_POD: (usize, usize) = (1, 1);

/// The source address a pod sees for a flow from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodSees {
    /// One of the receiving node's addresses (the flow was source-NATed there).
    Node,
    /// The client's own address.
    Client,
    /// A pod on another node sees the receiving node's address, a pod on the receiving
    /// node the client's (only flows to remote backends are source-NATed; Cilium's SNAT
    /// mode).
    NodeIfRemote,
}

/// What programs the nodes for the scenarios: kube-proxy's rules, xlb agents.
pub trait NodeProgram<'c> {
    /// For messages: `kube-proxy iptables`, `xlb snat`.
    fn name(&self) -> String;

    /// Programs every node of `cluster` for `services` (replacing what it programmed
    /// before) and returns once they are in effect.
    fn program(&mut self, cluster: &'c Cluster, services: &[ClusterService]) -> anyhow::Result<()>;

    /// The source a pod sees for external traffic (LB IP, NodePort) of a Service with
    /// `policy`. ClusterIP traffic from outside the cluster is checked against
    /// `pod_sees(TrafficPolicy::Cluster)`.
    fn pod_sees(&self, policy: TrafficPolicy) -> PodSees;

    /// Whether an established flow survives the router moving it to another node
    /// (without shared state: only when every node would pick the same backend and the
    /// backend's reply does not depend on the node, as with DSR and Maglev).
    fn flows_survive_moving(&self) -> bool;
}

/// Names of the standard Services.
pub const WEB: &str = "web";
pub const WEB_LOCAL: &str = "web-local";
pub const DNS: &str = "dns";
pub const DNS_LOCAL: &str = "dns-local";
pub const MTU_TCP: &str = "mtu";
pub const MTU_UDP: &str = "mtu-udp";

/// The Kubernetes namespace of the standard Services.
pub const NAMESPACE: &str = "shop";

/// The nodes that run the `Local` Services' endpoints (two pods on the first, one on
/// the last; none on [`DROPPED_NODE`] or the others).
fn local_endpoint_pods(cluster: &Cluster) -> Vec<(usize, usize)> {
    let last = cluster.nodes.len() - 1;
    let mut pods: Vec<(usize, usize)> =
        cluster.nodes[0].pods.iter().map(|p| (0, p.index)).collect();
    if last > 0 {
        pods.push((last, 0));
    }
    pods
}

/// A standard Service: name, protocol, policy, VIP number, NodePort, endpoint pods.
type Spec<'a> = (
    &'a str,
    Protocol,
    TrafficPolicy,
    u8,
    u16,
    &'a [(usize, usize)],
);

/// The standard Services, all dual-stack LoadBalancers with a NodePort, over the pods'
/// [`POD_PORT`]:
///
/// | name        | proto | policy  | ClusterIP (v4/v6)  | LB IP            | NodePort | endpoints              |
/// |-------------|-------|---------|--------------------|------------------|----------|------------------------|
/// | `web`       | TCP   | Cluster | .10 / f::10        | .100 / f::100    | 30080    | every pod              |
/// | `web-local` | TCP   | Local   | .11 / f::11        | .101 / f::101    | 30081    | node 0's, last node's first |
/// | `dns`       | UDP   | Cluster | .12 / f::12        | .102 / f::102    | 30053    | every pod              |
/// | `dns-local` | UDP   | Local   | .13 / f::13        | .103 / f::103    | 30054    | as `web-local`         |
/// | `mtu`       | TCP   | Cluster | .14 / f::14        | .104 / f::104    | 30090    | [`MTU_POD`]            |
/// | `mtu-udp`   | UDP   | Cluster | .15 / f::15        | .105 / f::105    | 30091    | [`MTU_POD`]            |
///
/// (203.0.113.x and 2001:db8:f::x; the Service ports are 80 for TCP and 53 for UDP.)
pub fn standard_services(cluster: &Cluster) -> Vec<ClusterService> {
    let all: Vec<(usize, usize)> = cluster.pods().map(|p| (p.node, p.index)).collect();
    let local = local_endpoint_pods(cluster);
    let mtu = vec![MTU_POD];
    let specs: [Spec<'_>; 6] = [
        (WEB, Protocol::Tcp, TrafficPolicy::Cluster, 0, 30_080, &all),
        (
            WEB_LOCAL,
            Protocol::Tcp,
            TrafficPolicy::Local,
            1,
            30_081,
            &local,
        ),
        (DNS, Protocol::Udp, TrafficPolicy::Cluster, 2, 30_053, &all),
        (
            DNS_LOCAL,
            Protocol::Udp,
            TrafficPolicy::Local,
            3,
            30_054,
            &local,
        ),
        (
            MTU_TCP,
            Protocol::Tcp,
            TrafficPolicy::Cluster,
            4,
            30_090,
            &mtu,
        ),
        (
            MTU_UDP,
            Protocol::Udp,
            TrafficPolicy::Cluster,
            5,
            30_091,
            &mtu,
        ),
    ];
    specs
        .into_iter()
        .map(|(name, protocol, policy, n, node_port, pods)| {
            let endpoints = pods
                .iter()
                .filter(|(i, j)| *i < cluster.nodes.len() && *j < cluster.nodes[*i].pods.len())
                .flat_map(|&(i, j)| {
                    let pod = &cluster.nodes[i].pods[j];
                    [
                        IpAddr::V4(Cluster::pod_v4(i, j)),
                        IpAddr::V6(Cluster::pod_v6(i, j)),
                    ]
                    .map(|address| Endpoint {
                        address,
                        node: cluster.nodes[i].name.clone(),
                        pod: pod.name.clone(),
                    })
                })
                .collect();
            ClusterService {
                namespace: NAMESPACE.to_owned(),
                name: name.to_owned(),
                port_name: match protocol {
                    Protocol::Tcp => "http",
                    Protocol::Udp => "dns",
                }
                .to_owned(),
                protocol,
                port: match protocol {
                    Protocol::Tcp => 80,
                    Protocol::Udp => 53,
                },
                target_port: POD_PORT,
                cluster_ips: vec![vip(false, 10 + n), vip(true, 10 + n)],
                node_port: Some(node_port),
                load_balancer_ips: vec![vip(false, 100 + n), vip(true, 100 + n)],
                external_traffic_policy: policy,
                health_check_node_port: (policy == TrafficPolicy::Local)
                    .then_some(32_000 + node_port % 1000),
                endpoints,
            }
        })
        .collect()
}

/// 203.0.113.`n`, or `2001:db8:f::<n>` with the same digits.
fn vip(v6: bool, n: u8) -> IpAddr {
    if v6 {
        let digits = u16::from(n / 100) << 8 | u16::from(n / 10 % 10) << 4 | u16::from(n % 10);
        IpAddr::V6(std::net::Ipv6Addr::new(
            0x2001, 0xdb8, 0xf, 0, 0, 0, 0, digits,
        ))
    } else {
        IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, n))
    }
}

fn host_prefix(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(ip) => format!("{ip}/32"),
        IpAddr::V6(ip) => format!("{ip}/128"),
    }
}

/// What BGP would tell the router: a `Local` Service's LB IPs only from the nodes that
/// run its endpoints (as MetalLB and Cilium announce them); every other LB IP through
/// the VIP ranges' ECMP over all nodes.
pub fn announce(cluster: &Cluster, services: &[ClusterService]) -> anyhow::Result<()> {
    for svc in services {
        if svc.external_traffic_policy != TrafficPolicy::Local {
            continue;
        }
        let nodes: Vec<usize> = svc
            .endpoint_nodes()
            .iter()
            .filter_map(|name| cluster.nodes.iter().position(|n| n.name == *name))
            .collect();
        for ip in &svc.load_balancer_ips {
            cluster.set_route(&host_prefix(*ip), &nodes)?;
        }
    }
    Ok(())
}

fn find<'s>(services: &'s [ClusterService], name: &str) -> anyhow::Result<&'s ClusterService> {
    services
        .iter()
        .find(|s| s.name == name)
        .with_context(|| format!("no Service {name:?} among the scenarios' services"))
}

fn client_address(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Cluster::client_v6())
    } else {
        IpAddr::V4(Cluster::client_v4())
    }
}

fn node_address(i: usize, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Cluster::node_v6(i))
    } else {
        IpAddr::V4(Cluster::node_v4(i))
    }
}

fn ask(cluster: &Cluster, proto: Protocol, addr: SocketAddr) -> anyhow::Result<Answer> {
    match proto {
        Protocol::Tcp => apps::ask_tcp(&cluster.client, addr, TIMEOUT),
        Protocol::Udp => apps::ask_udp(&cluster.client, addr, TIMEOUT),
    }
}

/// How many connections of a case went to a pod on the receiving node and to a pod on
/// another node.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Spread {
    pub local: usize,
    pub remote: usize,
}

/// Checks one answer: the pod is an endpoint of `svc`, the source it saw is what
/// `sees` says (`receiver`: the node the connection went to, when known). Returns the
/// pod's node.
fn check_answer(
    cluster: &Cluster,
    svc: &ClusterService,
    answer: &Answer,
    sees: PodSees,
    receiver: Option<usize>,
    v6: bool,
) -> anyhow::Result<usize> {
    let endpoint = svc
        .endpoints_of(v6)
        .find(|e| e.pod == answer.pod)
        .with_context(|| format!("{} is not an endpoint of {}", answer.pod, svc.name))?;
    let pod_node = cluster
        .nodes
        .iter()
        .position(|n| n.name == endpoint.node)
        .context("endpoint on an unknown node")?;
    match sees {
        PodSees::Client => anyhow::ensure!(
            answer.peer == client_address(v6),
            "{} saw {}, not the client's {}",
            answer.pod,
            answer.peer,
            client_address(v6)
        ),
        PodSees::NodeIfRemote if answer.peer == client_address(v6) => {
            if let Some(receiver) = receiver {
                anyhow::ensure!(
                    pod_node == receiver,
                    "{} on node-{pod_node} saw the client's {}, but the flow went to \
                     node-{receiver}, which source-NATs for remote pods",
                    answer.pod,
                    answer.peer
                );
            }
        }
        PodSees::Node | PodSees::NodeIfRemote => {
            let node = cluster.node_of_address(answer.peer).with_context(|| {
                format!(
                    "{} saw {}, which is no node's address",
                    answer.pod, answer.peer
                )
            })?;
            if let Some(receiver) = receiver {
                anyhow::ensure!(
                    node == receiver,
                    "{} saw node-{node}'s address {}, but the flow went to node-{receiver}",
                    answer.pod,
                    answer.peer
                );
            }
            anyhow::ensure!(
                sees == PodSees::Node || node != pod_node,
                "{} saw its own node's address {}: a pod on the receiving node keeps the \
                 client's",
                answer.pod,
                answer.peer
            );
        }
    }
    Ok(pod_node)
}

/// Runs `count` exchanges with `addr` and checks each; `receiver` as in
/// [`check_answer`]. A `Local` Service's pods are always on the receiving node.
#[expect(clippy::too_many_arguments, reason = "one case's full description")]
fn case(
    cluster: &Cluster,
    svc: &ClusterService,
    addr: SocketAddr,
    count: usize,
    sees: PodSees,
    receiver: Option<usize>,
    v6: bool,
    failures: &mut Vec<String>,
) -> Spread {
    let mut spread = Spread::default();
    let mut failed = 0;
    for n in 0..count {
        if failed == MAX_FAILURES_PER_CASE {
            failures.push(format!(
                "{} {addr}: stopped after {failed} failures, {} not tried",
                svc.name,
                count - n
            ));
            break;
        }
        let checked = ask(cluster, svc.protocol, addr).and_then(|answer| {
            let pod_node = check_answer(cluster, svc, &answer, sees, receiver, v6)?;
            let on_receiver = match (receiver, sees) {
                (Some(r), _) => pod_node == r,
                (None, PodSees::Node) => cluster.node_of_address(answer.peer) == Some(pod_node),
                (None, PodSees::Client) => svc.external_traffic_policy == TrafficPolicy::Local,
                // A pod sees the client exactly when it is on the receiving node.
                (None, PodSees::NodeIfRemote) => answer.peer == client_address(v6),
            };
            Ok(on_receiver)
        });
        match checked {
            Ok(true) => spread.local += 1,
            Ok(false) => spread.remote += 1,
            Err(e) => {
                failed += 1;
                failures.push(format!("{} {addr} #{n}: {e:#}", svc.name));
            }
        }
    }
    spread
}

/// What [`frontends`] saw, per case.
pub type FrontendReport = BTreeMap<String, Spread>;

/// New connections (`proto` TCP: `web` and `web-local`; UDP: `dns` and `dns-local`)
/// through every kind of frontend, `CONNECTIONS` per case, all of which must succeed:
/// - the LB IP through the router's ECMP (Cluster: the pod sees a node, and both pods on
///   the receiving node and on others answer; Local: the pod sees the client);
/// - the NodePort on every node (Cluster: the pod sees that node; Local: the client, on
///   a node with local endpoints; a node without any drops it, as Kubernetes specifies);
/// - the ClusterIP routed to each node in turn (the pod sees that node, kube-proxy's
///   masquerade of traffic from outside the cluster CIDR).
pub fn frontends(
    cluster: &Cluster,
    program: &dyn NodeProgram<'_>,
    services: &[ClusterService],
    proto: Protocol,
    v6: bool,
) -> anyhow::Result<FrontendReport> {
    let (cluster_name, local_name) = match proto {
        Protocol::Tcp => (WEB, WEB_LOCAL),
        Protocol::Udp => (DNS, DNS_LOCAL),
    };
    let mut report = FrontendReport::new();
    let mut failures = Vec::new();
    let family = if v6 { "v6" } else { "v4" };
    for name in [cluster_name, local_name] {
        let svc = find(services, name)?;
        let sees = program.pod_sees(svc.external_traffic_policy);
        let lb = svc
            .load_balancer_ip(v6)
            .with_context(|| format!("{name} has no {family} LB IP"))?;
        let spread = case(cluster, svc, lb, CONNECTIONS, sees, None, v6, &mut failures);
        report.insert(format!("{name} {family} LB IP"), spread);

        let node_port = svc.node_port.context("no NodePort")?;
        let per_node = CONNECTIONS.div_ceil(cluster.nodes.len());
        let mut total = Spread::default();
        let local_nodes = svc.endpoint_nodes();
        for node in &cluster.nodes {
            let addr = SocketAddr::new(node_address(node.index, v6), node_port);
            let has_local = local_nodes.contains(&node.name.as_str());
            if svc.external_traffic_policy == TrafficPolicy::Local && !has_local {
                // Kubernetes: external traffic to a node without local endpoints is
                // dropped. One attempt shows it.
                if let Ok(answer) = ask(cluster, proto, addr) {
                    failures.push(format!(
                        "{name} {addr}: node {} has no local endpoint but {} answered",
                        node.name, answer.pod
                    ));
                }
                continue;
            }
            let s = case(
                cluster,
                svc,
                addr,
                per_node,
                sees,
                Some(node.index),
                v6,
                &mut failures,
            );
            total.local += s.local;
            total.remote += s.remote;
        }
        report.insert(format!("{name} {family} NodePorts"), total);
        if svc.external_traffic_policy == TrafficPolicy::Cluster {
            // Through the ECMP, the receiving node is known only from the address the
            // pod saw: not when every pod sees the client.
            let lb_ip = (sees != PodSees::Client)
                .then(|| ("LB IP", report[&format!("{name} {family} LB IP")]));
            for (what, spread) in lb_ip.into_iter().chain([("NodePorts", total)]) {
                if spread.local == 0 || spread.remote == 0 {
                    failures.push(format!(
                        "{name} {family} {what}: expected pods on the receiving node and on others to answer, got {spread:?}"
                    ));
                }
            }
        }
    }

    // ClusterIPs routed to one node at a time.
    let svc = find(services, cluster_name)?;
    let cluster_ip = svc.cluster_ip(v6).context("no ClusterIP")?;
    let prefix = host_prefix(cluster_ip.ip());
    let sees = program.pod_sees(TrafficPolicy::Cluster);
    let per_node = CONNECTIONS.div_ceil(cluster.nodes.len());
    let mut total = Spread::default();
    for node in &cluster.nodes {
        cluster.set_route(&prefix, &[node.index])?;
        let s = case(
            cluster,
            svc,
            cluster_ip,
            per_node,
            sees,
            Some(node.index),
            v6,
            &mut failures,
        );
        total.local += s.local;
        total.remote += s.remote;
    }
    cluster.set_route(&prefix, &[])?;
    report.insert(format!("{cluster_name} {family} ClusterIP"), total);

    if failures.is_empty() {
        Ok(report)
    } else {
        bail!(
            "{}: {} of the {proto:?} {family} connections failed:\n{}\n{}",
            program.name(),
            failures.len(),
            failures.join("\n"),
            cluster.describe()
        )
    }
}

/// One long-lived connection of [`node_drop`].
#[derive(Debug, Clone)]
pub struct DroppedFlow {
    pub client_port: u16,
    pub pod: String,
    /// The node the router sent the flow to before and after the drop.
    pub node_before: usize,
    pub node_after: usize,
    pub survived: bool,
    /// Why not, when it did not.
    pub error: Option<String>,
}

/// `LONG_LIVED` connections to `web`'s LB IP, then the router withdraws
/// [`DROPPED_NODE`] from the VIP range's multipath route (restored afterwards), then
/// every connection exchanges data again. Expected: every flow survives when
/// `program.flows_survive_moving()`; otherwise exactly those the router still sends to
/// the same node (Linux's hash-threshold multipath re-divides the hash space, so a
/// withdrawn nexthop's flows move, and so may some of the others).
pub fn node_drop(
    cluster: &Cluster,
    program: &dyn NodeProgram<'_>,
    services: &[ClusterService],
    v6: bool,
) -> anyhow::Result<Vec<DroppedFlow>> {
    let svc = find(services, WEB)?;
    let lb = svc.load_balancer_ip(v6).context("no LB IP")?;
    let range = if v6 { VIP_RANGE_V6 } else { VIP_RANGE_V4 };
    let all = cluster.route(range).context("no VIP range route")?;
    let mut conns = Vec::with_capacity(LONG_LIVED);
    for n in 0..LONG_LIVED {
        conns.push(
            LongLived::open(&cluster.client, lb, TIMEOUT)
                .with_context(|| format!("long-lived connection #{n} to {lb}"))?,
        );
    }
    let paths = cluster.record_paths()?;
    for conn in &mut conns {
        conn.ping()
            .context("a long-lived connection before the drop")?;
    }
    let before_counts = paths.counts()?;
    let mut before = Vec::with_capacity(conns.len());
    for conn in &conns {
        let node = only_node(&before_counts, None, conn.local.port())
            .with_context(|| format!("the path of {} before the drop", conn.local))?;
        let sees = program.pod_sees(TrafficPolicy::Cluster);
        if sees != PodSees::Client {
            check_answer(cluster, svc, &conn.answer, sees, Some(node), v6)?;
        }
        before.push(node);
    }
    let remaining: Vec<usize> = all.iter().copied().filter(|&i| i != DROPPED_NODE).collect();
    cluster.set_route(range, &remaining)?;
    let result = (|| -> anyhow::Result<Vec<DroppedFlow>> {
        // In parallel: a moved flow may only fail after the read timeout.
        let pings: Vec<_> = conns
            .into_iter()
            .map(|mut conn| {
                std::thread::spawn(move || {
                    let result = conn.ping();
                    (conn, result)
                })
            })
            .collect();
        let mut done = Vec::with_capacity(pings.len());
        for ping in pings {
            done.push(ping.join().map_err(|_| anyhow::anyhow!("ping panicked"))?);
        }
        let after_counts = paths.counts()?;
        let mut flows = Vec::with_capacity(done.len());
        for ((conn, result), node_before) in done.into_iter().zip(before) {
            let node_after = node_after(
                &after_counts,
                &before_counts,
                conn.local.port(),
                node_before,
            )
            .with_context(|| format!("the path of {} after the drop", conn.local))?;
            flows.push(DroppedFlow {
                client_port: conn.local.port(),
                pod: conn.answer.pod.clone(),
                node_before,
                node_after,
                survived: result.is_ok(),
                error: result.err().map(|e| format!("{e:#}")),
            });
        }
        Ok(flows)
    })();
    cluster.set_route(range, &all)?;
    let flows = result?;
    let mut wrong = String::new();
    for f in &flows {
        let expected = program.flows_survive_moving() || f.node_before == f.node_after;
        if f.survived != expected {
            let _ = writeln!(
                wrong,
                "port {} to {} via node-{} then node-{}: survived {} (expected {expected}){}",
                f.client_port,
                f.pod,
                f.node_before,
                f.node_after,
                f.survived,
                f.error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            );
        }
        if f.node_before == DROPPED_NODE && f.node_after == DROPPED_NODE {
            let _ = writeln!(
                wrong,
                "port {}: the router still uses node-{DROPPED_NODE}",
                f.client_port
            );
        }
    }
    if wrong.is_empty() {
        Ok(flows)
    } else {
        bail!(
            "{}: after node-{DROPPED_NODE} left the ECMP group:\n{wrong}",
            program.name()
        )
    }
}

/// The node a TCP flow from `port` went to after the route changed (packets counted
/// since `before`, when it went to `node_before`). A moved flow may show packets on
/// both nodes: the client's delayed ACK of the last exchange can leave by the old route
/// after the first count; only its old node can see such a packet, so the other one
/// is where the flow went.
fn node_after(
    counts: &super::PathCounts,
    before: &super::PathCounts,
    port: u16,
    node_before: usize,
) -> anyhow::Result<usize> {
    match only_node(counts, Some(before), port) {
        Ok(node) => Ok(node),
        Err(e) => {
            let key = (Protocol::Tcp, port);
            let (Some(now), Some(then)) = (counts.get(&key), before.get(&key)) else {
                return Err(e);
            };
            let moved: Vec<usize> = (0..now.len())
                .filter(|&i| now[i] > then.get(i).copied().unwrap_or(0))
                .collect();
            match moved[..] {
                [a, b] if a == node_before => Ok(b),
                [a, b] if b == node_before => Ok(a),
                _ => Err(e),
            }
        }
    }
}

/// The one node a TCP flow from `port` went to (packets counted since `since`).
fn only_node(
    counts: &super::PathCounts,
    since: Option<&super::PathCounts>,
    port: u16,
) -> anyhow::Result<usize> {
    let key = (Protocol::Tcp, port);
    let now = counts.get(&key).context("the router saw no packet of it")?;
    let nodes: Vec<usize> = now
        .iter()
        .enumerate()
        .filter(|&(i, n)| *n > since.and_then(|s| s.get(&key)).map_or(0, |b| b[i]))
        .map(|(i, _)| i)
        .collect();
    match nodes[..] {
        [node] => Ok(node),
        _ => bail!("sent to nodes {nodes:?} (packets per node {now:?})"),
    }
}

/// What [`path_mtu`] saw per frontend.
#[derive(Debug, Clone)]
pub struct MtuCase {
    /// The TCP frontend (`mtu`).
    pub tcp: SocketAddr,
    /// The pod that answered the transfer, and the path MTU the client's socket knew
    /// at its end.
    pub transfer: apps::Transfer,
    /// The UDP frontend (`mtu-udp`).
    pub udp: SocketAddr,
    pub probe: apps::MtuProbe,
}

/// `svc`'s LB IP and its NodePort on every node.
fn lb_ip_and_node_ports(
    cluster: &Cluster,
    svc: &ClusterService,
    v6: bool,
) -> anyhow::Result<Vec<SocketAddr>> {
    let mut addrs = vec![svc.load_balancer_ip(v6).context("no LB IP")?];
    let node_port = svc.node_port.context("no NodePort")?;
    addrs.extend((0..cluster.nodes.len()).map(|i| SocketAddr::new(node_address(i, v6), node_port)));
    Ok(addrs)
}

/// Where [`path_mtu`]'s smaller link lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmallLink {
    /// Between [`MTU_POD`] and its node, at [`SMALL_MTU`]: the TCP case gives the node's
    /// route to the pod `mtu lock`, the UDP case the pod's veth itself. Every frontend
    /// (the LB IP, every node's NodePort) meets it; the client learns [`SMALL_MTU`].
    PodLink,
    /// Between the nodes, at [`NODE_LINK_MTU`]: every other node's route to
    /// [`MTU_POD`]'s node's pod CIDRs gets `mtu lock`. Only packets sent on to a pod on
    /// another node meet it, so the frontends are the NodePorts of the other nodes; they
    /// cross it inside an outer header of `overhead` bytes (DSR's encapsulation of the
    /// family tried), so the client learns [`NODE_LINK_MTU`] less that.
    BetweenNodes { overhead: u32 },
}

/// [`SmallLink::BetweenNodes`]' MTU: under the full-size TCP segments and the
/// [`PROBE_BYTES`] datagrams of either family once encapsulated, and at least IPv6's
/// minimum MTU (1280) plus an outer IPv6 header, so what the client learns is usable.
pub const NODE_LINK_MTU: u32 = 1340;

/// Path MTU discovery through the translation, to [`MTU_POD`], with a smaller link
/// where `small` says (and the frontends it names):
/// 1. TCP (`mtu`): a 64 KiB transfer each way must complete, and the client's socket
///    must end with the small path MTU: an ICMP "fragmentation needed" / "packet too
///    big" reached it, translated (or, between the nodes, sent by the receiving node).
///    The pod's own link keeps its MTU, so it advertises the larger MSS.
/// 2. UDP (`mtu-udp`): a [`PROBE_BYTES`] datagram (DF set) must come back as an ICMP
///    error the client's socket sees (`EMSGSIZE`, the small path MTU).
///
/// The routes and MTUs are restored afterwards, and the client's learnt path MTUs
/// flushed (`ip route flush cache`).
pub fn path_mtu(
    cluster: &Cluster,
    program: &dyn NodeProgram<'_>,
    services: &[ClusterService],
    v6: bool,
    small: SmallLink,
) -> anyhow::Result<Vec<MtuCase>> {
    let (node, pod) = MTU_POD;
    let frontends = |name| -> anyhow::Result<Vec<SocketAddr>> {
        let svc = find(services, name)?;
        Ok(match small {
            SmallLink::PodLink => lb_ip_and_node_ports(cluster, svc, v6)?,
            SmallLink::BetweenNodes { .. } => {
                let node_port = svc.node_port.context("no NodePort")?;
                (0..cluster.nodes.len())
                    .filter(|&i| i != node)
                    .map(|i| SocketAddr::new(node_address(i, v6), node_port))
                    .collect()
            }
        })
    };
    let tcp = frontends(MTU_TCP)?;
    let udp = frontends(MTU_UDP)?;
    let (expected, where_) = match small {
        SmallLink::PodLink => (SMALL_MTU, "the pod's link"),
        SmallLink::BetweenNodes { overhead } => (NODE_LINK_MTU - overhead, "between the nodes"),
    };
    let others: Vec<usize> = (0..cluster.nodes.len()).filter(|&i| i != node).collect();
    let narrow = |on: bool| -> anyhow::Result<()> {
        match small {
            SmallLink::PodLink => cluster.set_pod_route_mtu(node, pod, on.then_some(SMALL_MTU)),
            SmallLink::BetweenNodes { .. } => others.iter().try_for_each(|&i| {
                cluster.set_pod_cidr_route_mtu(i, node, on.then_some(NODE_LINK_MTU))
            }),
        }
    };
    let family = if v6 { "-6" } else { "-4" };
    let mut failures = Vec::new();
    let mut transfers = Vec::new();
    narrow(true)?;
    for addr in &tcp {
        match apps::transfer(&cluster.client, *addr, TRANSFER_BYTES, TIMEOUT * 5) {
            Ok(t) if t.path_mtu == expected => transfers.push(t),
            Ok(t) => failures.push(format!(
                "TCP {addr}: the transfer completed with path MTU {}, expected {expected} (no ICMP error reached the client)",
                t.path_mtu
            )),
            Err(e) => failures.push(format!("TCP {addr}: {e:#}")),
        }
    }
    if small == SmallLink::PodLink {
        // The datagrams meet the pod's link itself.
        narrow(false)?;
        cluster.set_pod_mtu(node, pod, SMALL_MTU)?;
    }
    // Forget what TCP taught the client about the node addresses: the datagrams must
    // meet the small link themselves.
    cluster.client.ip(&[family, "route", "flush", "cache"])?;
    let mut probes = Vec::new();
    for addr in &udp {
        match apps::udp_mtu_probe(&cluster.client, *addr, PROBE_BYTES, TIMEOUT) {
            Ok(p) if p.icmp_error && p.path_mtu == expected => probes.push(p),
            Ok(p) => failures.push(format!(
                "UDP {addr}: a {PROBE_BYTES}-byte datagram brought {p:?}, expected an ICMP error and path MTU {expected}"
            )),
            Err(e) => failures.push(format!("UDP {addr}: {e:#}")),
        }
    }
    match small {
        SmallLink::PodLink => cluster.set_pod_mtu(node, pod, cluster.pod_mtu())?,
        SmallLink::BetweenNodes { .. } => narrow(false)?,
    }
    cluster.client.ip(&[family, "route", "flush", "cache"])?;
    if !failures.is_empty() {
        bail!(
            "{}: path MTU (a smaller link {where_}):\n{}",
            program.name(),
            failures.join("\n")
        );
    }
    Ok(tcp
        .into_iter()
        .zip(transfers)
        .zip(udp.into_iter().zip(probes))
        .map(|((tcp, transfer), (udp, probe))| MtuCase {
            tcp,
            transfer,
            udp,
            probe,
        })
        .collect())
}

/// Bulk transfers (`BULK_BYTES` each way, `BULK_ROUNDS` per node) through `web`'s
/// NodePort on every node, to local and remote pods: the client's full-size segments
/// must reach remote pods whatever the program adds to them on the way (DSR's outer
/// header: the MSS the pods' SYN-ACKs were given, or the path MTU the client learnt
/// from the node). Returns the pod and the client's path MTU of every transfer.
pub fn bulk(
    cluster: &Cluster,
    program: &dyn NodeProgram<'_>,
    services: &[ClusterService],
    v6: bool,
) -> anyhow::Result<Vec<(SocketAddr, apps::Transfer)>> {
    let web = find(services, WEB)?;
    let node_port = web.node_port.context("no NodePort")?;
    let mut done = Vec::new();
    let mut failures = Vec::new();
    for node in &cluster.nodes {
        let addr = SocketAddr::new(node_address(node.index, v6), node_port);
        for n in 0..BULK_ROUNDS {
            match apps::transfer(&cluster.client, addr, BULK_BYTES, TIMEOUT * 5) {
                Ok(t) => done.push((addr, t)),
                Err(e) => failures.push(format!("transfer #{n} through {addr}: {e:#}")),
            }
        }
    }
    if !failures.is_empty() {
        bail!(
            "{}: bulk transfers:\n{}",
            program.name(),
            failures.join("\n")
        );
    }
    Ok(done)
}

/// The size of one [`bulk`] transfer, each way.
const BULK_BYTES: usize = 256 * 1024;
/// [`bulk`] transfers per node.
const BULK_ROUNDS: usize = 4;

/// Path MTU discovery of the pod's replies, to [`MTU_POD`] through every node's
/// NodePort of `mtu` (the pod local to one node, remote to the others): the router's
/// route to the client gets `mtu lock` [`SMALL_MTU`], as a smaller link on the client's
/// side would, so the pod's full-size segments draw the router's ICMP "fragmentation
/// needed" / "packet too big", sent to the address they came from (the node of the
/// NodePort). A 64 KiB transfer each way must complete: the error reached the pod,
/// translated to what it sent.
///
/// NodePorts only: the router spreads errors sent to an LB IP over the nodes by the
/// error's own addresses, so one reaches the node that holds the flow only by chance,
/// for kube-proxy and xlb alike. The route is removed and the pods' learnt path MTUs
/// flushed afterwards.
pub fn reply_path_mtu(
    cluster: &Cluster,
    program: &dyn NodeProgram<'_>,
    services: &[ClusterService],
    v6: bool,
) -> anyhow::Result<Vec<apps::Transfer>> {
    let svc = find(services, MTU_TCP)?;
    let node_port = svc.node_port.context("no NodePort")?;
    let family = if v6 { "-6" } else { "-4" };
    let client = host_prefix(client_address(v6));
    let mtu = SMALL_MTU.to_string();
    cluster.router.ip(&[
        family,
        "route",
        "replace",
        &client,
        "dev",
        Cluster::ROUTER_CLIENT_IF,
        "mtu",
        "lock",
        &mtu,
    ])?;
    let mut failures = Vec::new();
    let mut transfers = Vec::new();
    for i in 0..cluster.nodes.len() {
        let addr = SocketAddr::new(node_address(i, v6), node_port);
        match apps::transfer(&cluster.client, addr, TRANSFER_BYTES, TIMEOUT * 5) {
            Ok(t) => transfers.push(t),
            Err(e) => failures.push(format!("TCP {addr}: {e:#}")),
        }
    }
    let restored = cluster.router.ip(&[
        family,
        "route",
        "del",
        &client,
        "dev",
        Cluster::ROUTER_CLIENT_IF,
    ]);
    for node in &cluster.nodes {
        for pod in &node.pods {
            pod.ns.ip(&[family, "route", "flush", "cache"])?;
        }
    }
    restored?;
    if !failures.is_empty() {
        bail!(
            "{}: path MTU of the replies (the client's side at {SMALL_MTU}):\n{}",
            program.name(),
            failures.join("\n")
        );
    }
    Ok(transfers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vips_keep_their_digits_in_both_families() {
        assert_eq!(vip(false, 104).to_string(), "203.0.113.104");
        assert_eq!(vip(true, 104).to_string(), "2001:db8:f::104");
        assert_eq!(vip(true, 15).to_string(), "2001:db8:f::15");
        assert_eq!(host_prefix(vip(true, 10)), "2001:db8:f::10/128");
    }
}
