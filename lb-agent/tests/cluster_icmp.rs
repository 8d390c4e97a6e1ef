//! Path MTU discovery through xlb on the cluster in namespaces (`lb_testbed::cluster`):
//! one agent per node in SNAT mode (host-gw and VXLAN) and in DSR mode (host-gw), as the
//! DaemonSet runs it, held to the `path_mtu` and `reply_path_mtu` scenarios that
//! kube-proxy's iptables rules pass (lb-testbed/tests/cluster_baseline.rs), IPv4 and IPv6.
//! A packet larger than a smaller link's MTU on the way to the pod draws an ICMP error
//! ("fragmentation needed" / "packet too big") about the translated packet; it must
//! reach the client translated back, whether the pod is on another node (the flow was
//! source-NATed) or on the receiving node (destination only), so the client's socket
//! learns the smaller MTU and a TCP transfer completes, and a too-big UDP datagram
//! fails with `EMSGSIZE`. The other way, a smaller link on the client's side makes the
//! router answer the pod's full-size replies with an ICMP error sent to the NodePort's
//! node; it must reach the pod translated (`fwd_icmp`), so a transfer through every
//! node's NodePort completes.

use std::path::Path;

use lb_testbed::cluster::apps::PodServers;
use lb_testbed::cluster::scenarios::{self, POD_PORT};
use lb_testbed::cluster::xlb::XlbAgents;
use lb_testbed::cluster::{Cluster, ClusterService, NodeProgram, PodNetwork, PodSees};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");

/// Packets the agents together counted under `reason`.
fn counted(xlb: &XlbAgents<'_>, reason: &str) -> u64 {
    xlb.agents()
        .iter()
        .map(|agent| {
            let report = agent
                .wait_for(std::time::Duration::from_secs(5), |_| true)
                .unwrap_or_else(|e| panic!("status: {e:#}"));
            report
                .reasons
                .iter()
                .filter(|(r, _)| r == reason)
                .map(|(_, n)| n)
                .sum::<u64>()
        })
        .sum()
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

/// Builds the cluster and starts an xlb agent in `mode` on every node; `pod_sees`: the
/// source a pod sees for external traffic of a `Cluster` Service in that mode.
fn cluster_in<'c>(
    cluster: &'c Cluster,
    mode: &str,
    pod_sees: PodSees,
) -> (PodServers, Vec<ClusterService>, XlbAgents<'c>) {
    let servers = PodServers::start(cluster, POD_PORT).expect("pod servers");
    let services = scenarios::standard_services(cluster);
    let mut xlb = XlbAgents::new(
        Path::new(AGENT),
        &format!("xlb {mode}"),
        &["--lb-mode", mode],
        pod_sees,
        mode == "dsr",
    );
    xlb.program(cluster, &services)
        .unwrap_or_else(|e| panic!("{e:#}"));
    scenarios::announce(cluster, &services).expect("announce Local LB IPs");
    (servers, services, xlb)
}

/// Both scenarios, IPv4 and IPv6; the errors went through xlb's translation, not
/// around it (`reply_icmp`, `fwd_icmp` counted).
fn path_mtu_both_ways(cluster: &Cluster, xlb: &XlbAgents<'_>, services: &[ClusterService]) {
    for v6 in [false, true] {
        let before = counted(xlb, "reply_icmp");
        let cases = scenarios::path_mtu(cluster, xlb, services, v6)
            .unwrap_or_else(|e| panic!("path MTU v6={v6}: {e:#}\n{}", statuses(xlb)));
        eprintln!("path MTU v6={v6}: {cases:?}");
        assert!(
            counted(xlb, "reply_icmp") > before,
            "v6={v6}: reply_icmp counted"
        );
        let before = counted(xlb, "fwd_icmp");
        let replies = scenarios::reply_path_mtu(cluster, xlb, services, v6)
            .unwrap_or_else(|e| panic!("reply path MTU v6={v6}: {e:#}\n{}", statuses(xlb)));
        eprintln!("path MTU of the replies v6={v6}: {replies:?}");
        assert!(
            counted(xlb, "fwd_icmp") > before,
            "v6={v6}: fwd_icmp counted"
        );
    }
}

#[test]
fn xlb_snat_path_mtu_on_a_host_gw_cluster() {
    let cluster = Cluster::for_test("xi-hostgw", PodNetwork::HostGw);
    let (_servers, services, xlb) = cluster_in(&cluster, "snat", PodSees::NodeIfRemote);
    path_mtu_both_ways(&cluster, &xlb, &services);
}

#[test]
fn xlb_snat_path_mtu_on_a_vxlan_cluster() {
    let cluster = Cluster::for_test("xi-vxlan", PodNetwork::Vxlan);
    let (_servers, services, xlb) = cluster_in(&cluster, "snat", PodSees::NodeIfRemote);
    path_mtu_both_ways(&cluster, &xlb, &services);
}

/// DSR: the pod's node forwards the decapsulated client -> pod:targetPort; its error
/// about it quotes the pod, and the tc egress program translates the quote back with
/// the reply translation the decapsulation left (`reply_icmp`). The pod's replies leave
/// its node with the NodePort's node as their source, so the router's error about them
/// goes to that node, which sends it on to the pod (`fwd_icmp`).
#[test]
fn xlb_dsr_path_mtu_on_a_host_gw_cluster() {
    let cluster = Cluster::for_test("xi-dsr", PodNetwork::HostGw);
    let (_servers, services, xlb) = cluster_in(&cluster, "dsr", PodSees::Client);
    let before = counted(&xlb, "dsr_delivered");
    path_mtu_both_ways(&cluster, &xlb, &services);
    // The pod is remote for most frontends: their packets reached it encapsulated.
    assert!(
        counted(&xlb, "dsr_delivered") > before,
        "dsr_delivered counted"
    );
}
