//! xlb in SNAT mode on the cluster in namespaces (`lb_testbed::cluster`): one agent per
//! node, `lb-agent run --manifests DIR --node-name node-<i> --interface eth0 --lb-mode
//! snat`, as the DaemonSet runs it, held to the same scenarios as kube-proxy's iptables
//! rules (lb-testbed/tests/cluster_baseline.rs): an LB IP through the router's ECMP, the
//! NodePort on every node and the ClusterIP routed to each node, to pods on the
//! receiving node and on others, TCP and UDP, IPv4 and IPv6, host-gw and VXLAN. For
//! `externalTrafficPolicy: Cluster` a pod on another node sees the receiving node's
//! address and a pod on the receiving node the client's (only remote backends are
//! source-NATed, as in Cilium); for `Local`, every pod sees the client's.

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
    let mut xlb = XlbAgents::new(
        Path::new(AGENT),
        "xlb snat",
        &args,
        PodSees::NodeIfRemote,
        false,
    );
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

/// 20 long-lived connections while the router withdraws one node from the VIP range's
/// multipath route. SNAT keeps its state on the receiving node (the source port it
/// allocated), so a flow the router moves to another node is source-NATed there to a
/// different address and the pod resets it: exactly the flows that did not move survive,
/// as with kube-proxy (the scenario checks this since `flows_survive_moving` is false).
fn node_drop(cluster: &Cluster, xlb: &XlbAgents<'_>, services: &[ClusterService]) {
    for v6 in [false, true] {
        let flows = scenarios::node_drop(cluster, xlb, services, v6)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", statuses(xlb)));
        let survived = flows.iter().filter(|f| f.survived).count();
        let moved = flows
            .iter()
            .filter(|f| f.node_before != f.node_after)
            .count();
        eprintln!(
            "node drop v6={v6}: {survived} of {} survived, {moved} moved",
            flows.len()
        );
        assert_eq!(survived, flows.len() - moved, "{flows:#?}");
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
fn xlb_snat_on_a_host_gw_cluster() {
    let cluster = Cluster::for_test("xs-hostgw", PodNetwork::HostGw);
    let (servers, services, xlb) = snat_cluster(&cluster, &[]);
    frontends(&cluster, &xlb, &services);
    node_drop(&cluster, &xlb, &services);
    eprintln!("served per pod: {:?}", servers.served());
}

#[test]
fn xlb_snat_on_a_vxlan_cluster() {
    let cluster = Cluster::for_test("xs-vxlan", PodNetwork::Vxlan);
    let (_servers, services, xlb) = snat_cluster(&cluster, &[]);
    frontends(&cluster, &xlb, &services);
}
