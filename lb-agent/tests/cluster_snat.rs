//! xlb in SNAT mode on the cluster in namespaces (`lb_testbed::cluster`): one agent per
//! node, `lb-agent run --manifests DIR --node-name node-<i> --interface eth0 --lb-mode
//! snat`, as the DaemonSet runs it, held to the same scenarios as kube-proxy's iptables
//! rules (lb-testbed/tests/cluster_baseline.rs): an LB IP through the router's ECMP, the
//! NodePort on every node and the ClusterIP routed to each node, to pods on the
//! receiving node and on others, TCP and UDP, IPv4 and IPv6, host-gw and VXLAN. For
//! `externalTrafficPolicy: Cluster` the pod sees the receiving node's address; for
//! `Local`, the client's.

use std::path::Path;

use lb_testbed::cluster::apps::PodServers;
use lb_testbed::cluster::scenarios::{self, POD_PORT};
use lb_testbed::cluster::xlb::XlbAgents;
use lb_testbed::cluster::{Cluster, ClusterService, NodeProgram, PodNetwork, PodSees, Protocol};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");

/// Builds the cluster, starts an xlb agent in SNAT mode on every node and announces the
/// Local LB IPs.
fn snat_cluster<'c>(
    cluster: &'c Cluster,
    extra: &[&str],
) -> (PodServers, Vec<ClusterService>, XlbAgents<'c>) {
    let servers = PodServers::start(cluster, POD_PORT).expect("pod servers");
    let services = scenarios::standard_services(cluster);
    let mut args = vec!["--lb-mode", "snat"];
    args.extend_from_slice(extra);
    let mut xlb = XlbAgents::new(Path::new(AGENT), "xlb snat", &args, PodSees::Node, false);
    xlb.program(cluster, &services)
        .unwrap_or_else(|e| panic!("{e:#}"));
    scenarios::announce(cluster, &services).expect("announce Local LB IPs");
    (servers, services, xlb)
}

fn frontends(cluster: &Cluster, xlb: &XlbAgents<'_>, services: &[ClusterService]) {
    for v6 in [false, true] {
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let report = scenarios::frontends(cluster, xlb, services, proto, v6)
                .unwrap_or_else(|e| panic!("{e:#}\n{}", statuses(xlb)));
            eprintln!("{proto:?} v6={v6}: {report:?}");
        }
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

#[test]
#[ignore = "does not pass yet: connections to pods on other nodes time out or complete late (first replies lost); local pods are served but see the client's address where the scenario expects the node's; see the README's packet path"]
fn xlb_snat_on_a_host_gw_cluster() {
    let cluster = Cluster::for_test("xs-hostgw", PodNetwork::HostGw);
    let (servers, services, xlb) = snat_cluster(&cluster, &[]);
    frontends(&cluster, &xlb, &services);
    eprintln!("served per pod: {:?}", servers.served());
}

#[test]
#[ignore = "does not pass yet: connections to pods on other nodes time out or complete late (first replies lost); local pods are served but see the client's address where the scenario expects the node's; see the README's packet path"]
fn xlb_snat_on_a_vxlan_cluster() {
    let cluster = Cluster::for_test("xs-vxlan", PodNetwork::Vxlan);
    let (_servers, services, xlb) = snat_cluster(&cluster, &[]);
    frontends(&cluster, &xlb, &services);
}
