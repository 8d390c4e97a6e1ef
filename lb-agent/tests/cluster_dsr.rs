//! xlb in DSR and hybrid mode on the cluster in namespaces (`lb_testbed::cluster`): one
//! agent per node, `lb-agent run --manifests DIR --node-name node-<i> --interface eth0
//! --lb-mode dsr|hybrid`, as the DaemonSet runs it, held to the scenarios of
//! `cluster_snat.rs`: an LB IP through the router's ECMP, the NodePort on every node and
//! the ClusterIP routed to each node, to pods on the receiving node and on others, TCP
//! and UDP, IPv4 and IPv6. In DSR every pod sees the client's address (the packet
//! reaches the pod's node untranslated, encapsulated), and every long-lived connection
//! survives the router moving it to another node (every node picks the same pod, whose
//! node keeps the reply translation). Hybrid: TCP as DSR, UDP as SNAT.

use std::path::Path;

use lb_testbed::cluster::apps::PodServers;
use lb_testbed::cluster::scenarios::{self, POD_PORT};
use lb_testbed::cluster::xlb::XlbAgents;
use lb_testbed::cluster::{
    Cluster, ClusterService, NodeProgram, PodNetwork, PodSees, Protocol, TrafficPolicy,
};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");

/// Builds the cluster's pod servers and Services, starts an xlb agent in `mode` on every
/// node and announces the Local LB IPs.
fn cluster_in<'c>(
    cluster: &'c Cluster,
    mode: &str,
    pod_sees: PodSees,
) -> (PodServers, Vec<ClusterService>, XlbAgents<'c>) {
    let servers = PodServers::start(cluster, POD_PORT).expect("pod servers");
    let services = scenarios::standard_services(cluster);
    let mut args = vec!["--lb-mode", mode];
    if cluster.network == PodNetwork::Vxlan {
        // Encapsulated packets for a remote pod travel over the overlay and arrive on
        // its devices, not on eth0.
        args.extend(["--decap-interface", "flannel.1,flannel-v6.1"]);
    }
    let mut xlb = XlbAgents::new(
        Path::new(AGENT),
        &format!("xlb {mode}"),
        &args,
        pod_sees,
        true,
    );
    xlb.program(cluster, &services)
        .unwrap_or_else(|e| panic!("{e:#}"));
    scenarios::announce(cluster, &services).expect("announce Local LB IPs");
    (servers, services, xlb)
}

/// The agents as seen by a scenario of one protocol: what a pod sees in hybrid mode
/// depends on it.
struct Hybrid<'a, 'c> {
    agents: &'a XlbAgents<'c>,
    proto: Protocol,
}

impl<'c> NodeProgram<'c> for Hybrid<'_, 'c> {
    fn name(&self) -> String {
        format!("{} ({:?})", self.agents.name(), self.proto)
    }

    fn program(&mut self, _: &'c Cluster, _: &[ClusterService]) -> anyhow::Result<()> {
        anyhow::bail!("the hybrid view only reads; program the agents themselves")
    }

    fn pod_sees(&self, policy: TrafficPolicy) -> PodSees {
        match (policy, self.proto) {
            (TrafficPolicy::Cluster, Protocol::Udp) => PodSees::NodeIfRemote,
            _ => PodSees::Client,
        }
    }

    fn flows_survive_moving(&self) -> bool {
        self.agents.flows_survive_moving()
    }
}

fn frontends(
    cluster: &Cluster,
    program: &dyn NodeProgram<'_>,
    xlb: &XlbAgents<'_>,
    services: &[ClusterService],
    protos: &[Protocol],
) {
    for v6 in [false, true] {
        for proto in protos {
            let report = scenarios::frontends(cluster, program, services, *proto, v6)
                .unwrap_or_else(|e| panic!("{e:#}\n{}", statuses(xlb)));
            eprintln!("{proto:?} v6={v6}: {report:?}");
        }
    }
}

/// 20 long-lived connections while the router withdraws one node from the VIP range's
/// multipath route: in DSR every one survives, moved or not.
fn node_drop(cluster: &Cluster, xlb: &XlbAgents<'_>, services: &[ClusterService]) {
    for v6 in [false, true] {
        let flows = scenarios::node_drop(cluster, xlb, services, v6)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", statuses(xlb)));
        let moved = flows
            .iter()
            .filter(|f| f.node_before != f.node_after)
            .count();
        eprintln!(
            "node drop v6={v6}: {} of {} survived, {moved} moved",
            flows.iter().filter(|f| f.survived).count(),
            flows.len()
        );
        assert!(flows.iter().all(|f| f.survived), "{flows:#?}");
        assert!(
            moved > 0,
            "no flow moved, the scenario shows nothing: {flows:#?}"
        );
    }
}

/// Every agent's `lb-agent status`, for a failure's message.
fn statuses(xlb: &XlbAgents<'_>) -> String {
    xlb.agents()
        .iter()
        .map(
            |agent| match agent.wait_for(std::time::Duration::from_secs(5), |_| true) {
                Ok(report) => report.to_string(),
                Err(e) => format!("{e:#}"),
            },
        )
        .collect::<Vec<_>>()
        .join("\n")
}

/// Bulk transfers both ways through `web`'s NodePort on every node, to local and remote
/// pods: the client's full-size segments reach remote pods encapsulated only because the
/// pods' SYN-ACKs were given an MSS that leaves room for the outer header.
fn bulk(cluster: &Cluster, services: &[ClusterService]) {
    let web = services
        .iter()
        .find(|s| s.name == scenarios::WEB)
        .expect("web");
    let node_port = web.node_port.expect("NodePort");
    for v6 in [false, true] {
        for node in &cluster.nodes {
            let ip: std::net::IpAddr = if v6 {
                node.v6().into()
            } else {
                node.v4().into()
            };
            for n in 0..4 {
                let addr = std::net::SocketAddr::new(ip, node_port);
                let t = lb_testbed::cluster::apps::transfer(
                    &cluster.client,
                    addr,
                    256 * 1024,
                    std::time::Duration::from_secs(10),
                )
                .unwrap_or_else(|e| panic!("transfer #{n} through {addr}: {e:#}"));
                eprintln!("{addr} #{n}: {} (path MTU {})", t.answer.pod, t.path_mtu);
            }
        }
    }
}

#[test]
fn xlb_dsr_on_a_host_gw_cluster() {
    let cluster = Cluster::for_test("xd-hostgw", PodNetwork::HostGw);
    let (servers, services, xlb) = cluster_in(&cluster, "dsr", PodSees::Client);
    frontends(
        &cluster,
        &xlb,
        &xlb,
        &services,
        &[Protocol::Tcp, Protocol::Udp],
    );
    node_drop(&cluster, &xlb, &services);
    bulk(&cluster, &services);
    eprintln!("served per pod: {:?}", servers.served());
}

#[test]
fn xlb_hybrid_on_a_host_gw_cluster() {
    let cluster = Cluster::for_test("xh-hostgw", PodNetwork::HostGw);
    let (_servers, services, xlb) = cluster_in(&cluster, "hybrid", PodSees::Client);
    for proto in [Protocol::Tcp, Protocol::Udp] {
        let view = Hybrid {
            agents: &xlb,
            proto,
        };
        frontends(&cluster, &view, &xlb, &services, &[proto]);
    }
}

#[test]
fn xlb_dsr_on_a_vxlan_cluster() {
    let cluster = Cluster::for_test("xd-vxlan", PodNetwork::Vxlan);
    let (_servers, services, xlb) = cluster_in(&cluster, "dsr", PodSees::Client);
    frontends(
        &cluster,
        &xlb,
        &xlb,
        &services,
        &[Protocol::Tcp, Protocol::Udp],
    );
}
