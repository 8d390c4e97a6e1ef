//! xlb in DSR and hybrid mode on the cluster in namespaces (`lb_testbed::cluster`): one
//! agent per node, `lb-agent run --manifests DIR --node-name node-<i> --interface eth0
//! --lb-mode dsr|hybrid`, as the DaemonSet runs it, held to the scenarios of
//! `cluster_snat.rs`: an LB IP through the router's ECMP, the NodePort on every node and
//! the ClusterIP routed to each node, to pods on the receiving node and on others, TCP
//! and UDP, IPv4 and IPv6. In DSR every pod sees the client's address (the packet
//! reaches the pod's node untranslated, encapsulated), and every long-lived connection
//! survives the router moving it to another node (every node picks the same pod, whose
//! node keeps the reply translation). Hybrid: TCP as DSR, UDP as SNAT. Host-gw and
//! VXLAN (`--decap-interface flannel.1,flannel-v6.1`): the frontends, the router
//! dropping a node, and bulk transfers through every node.

use std::path::Path;

use lb_testbed::cluster::scenarios;
use lb_testbed::cluster::xlb::{self, Mode, XlbAgents};
use lb_testbed::cluster::{
    Cluster, ClusterService, NodeProgram, PodNetwork, PodSees, Protocol, TrafficPolicy,
};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");

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
                .unwrap_or_else(|e| panic!("{e:#}\n{}", xlb.statuses()));
            eprintln!("{proto:?} v6={v6}: {report:?}");
        }
    }
}

/// 20 long-lived TCP connections while the router withdraws one node from the VIP
/// range's multipath route: in DSR (hybrid's TCP too) every one survives, moved or not.
fn node_drop(cluster: &Cluster, xlb: &XlbAgents<'_>, services: &[ClusterService]) {
    for v6 in [false, true] {
        let flows = scenarios::node_drop(cluster, xlb, services, v6)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", xlb.statuses()));
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

/// Bulk transfers both ways through `web`'s NodePort on every node, to local and remote
/// pods: the client's full-size segments reach remote pods encapsulated only because
/// the pods' SYN-ACKs were given an MSS that leaves room for the outer header, or
/// (where the path to the pod is smaller than the link the SYN-ACK leaves by: IPv6 over
/// VXLAN) the receiving node told the client the MTU that fits (`dsr_icmp_too_big`).
fn bulk(cluster: &Cluster, xlb: &XlbAgents<'_>, services: &[ClusterService]) {
    for v6 in [false, true] {
        let done = scenarios::bulk(cluster, xlb, services, v6)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", xlb.statuses()));
        for (addr, t) in done {
            eprintln!("{addr}: {} (path MTU {})", t.answer.pod, t.path_mtu);
        }
    }
}

/// The frontends scenario in `hybrid` mode: TCP seen as `dsr`, UDP as `snat`.
fn hybrid_frontends(cluster: &Cluster, xlb: &XlbAgents<'_>, services: &[ClusterService]) {
    for proto in [Protocol::Tcp, Protocol::Udp] {
        let view = Hybrid { agents: xlb, proto };
        frontends(cluster, &view, xlb, services, &[proto]);
    }
}

/// The standard set-up with an agent in `mode` on every node.
fn start(
    cluster: &Cluster,
    mode: Mode,
) -> (
    lb_testbed::cluster::apps::PodServers,
    Vec<ClusterService>,
    XlbAgents<'_>,
) {
    xlb::start(cluster, Path::new(AGENT), mode, &[]).unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn xlb_dsr_on_a_host_gw_cluster() {
    let cluster = Cluster::for_test("xd-hostgw", PodNetwork::HostGw);
    let (servers, services, xlb) = start(&cluster, Mode::Dsr);
    frontends(
        &cluster,
        &xlb,
        &xlb,
        &services,
        &[Protocol::Tcp, Protocol::Udp],
    );
    node_drop(&cluster, &xlb, &services);
    bulk(&cluster, &xlb, &services);
    eprintln!("served per pod: {:?}", servers.served());
}

#[test]
fn xlb_hybrid_on_a_host_gw_cluster() {
    let cluster = Cluster::for_test("xh-hostgw", PodNetwork::HostGw);
    let (_servers, services, xlb) = start(&cluster, Mode::Hybrid);
    hybrid_frontends(&cluster, &xlb, &services);
    node_drop(&cluster, &xlb, &services);
}

#[test]
fn xlb_dsr_on_a_vxlan_cluster() {
    let cluster = Cluster::for_test("xd-vxlan", PodNetwork::Vxlan);
    let (_servers, services, xlb) = start(&cluster, Mode::Dsr);
    frontends(
        &cluster,
        &xlb,
        &xlb,
        &services,
        &[Protocol::Tcp, Protocol::Udp],
    );
    node_drop(&cluster, &xlb, &services);
    bulk(&cluster, &xlb, &services);
}

#[test]
fn xlb_hybrid_on_a_vxlan_cluster() {
    let cluster = Cluster::for_test("xh-vxlan", PodNetwork::Vxlan);
    let (_servers, services, xlb) = start(&cluster, Mode::Hybrid);
    hybrid_frontends(&cluster, &xlb, &services);
}
