//! xlb's agents on the cluster in namespaces (`lb_testbed::cluster`): one `lb-agent run
//! --manifests DIR --node-name node-<i> --interface eth0` per node, all from the same
//! Node, Service and EndpointSlice manifests, as the DaemonSet runs them. This checks the
//! harness the data-path work is measured on: every agent attaches to its node's uplink
//! and holds every Service, with the endpoints each node's view of the Service implies.
//! (Connections through xlb on this topology are the subject of the SNAT/DSR work; the
//! same scenarios pass with kube-proxy's rules in lb-testbed/tests/cluster_baseline.rs.)

use std::path::Path;

use lb_testbed::cluster::scenarios::{self, NAMESPACE, WEB_LOCAL};
use lb_testbed::cluster::xlb::XlbAgents;
use lb_testbed::cluster::{Cluster, NodeProgram, PodNetwork, PodSees};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");

#[test]
fn an_agent_per_node_holds_every_service_of_the_shared_manifests() {
    let cluster = Cluster::for_test("xlb-agents", PodNetwork::HostGw);
    let services = scenarios::standard_services(&cluster);
    let mut xlb = XlbAgents::new(Path::new(AGENT), "xlb", &[], PodSees::Node, false);
    xlb.program(&cluster, &services)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(xlb.agents().len(), cluster.nodes.len());
    for (agent, node) in xlb.agents().iter().zip(&cluster.nodes) {
        let report = agent
            .wait_for(std::time::Duration::from_secs(5), |_| true)
            .expect("status");
        assert_eq!(report.interfaces, [Cluster::NODE_IF], "{}", node.name);
        // The Local Service's LB IP has backends only where its pods run.
        let local = format!("{NAMESPACE}/{WEB_LOCAL}");
        let lb_ip = services
            .iter()
            .find(|s| s.name == WEB_LOCAL)
            .and_then(|s| s.load_balancer_ip(false))
            .expect("LB IP");
        let local_backends: usize = report
            .services
            .iter()
            .filter(|s| {
                // External traffic, not the socket hooks' in-cluster entries.
                s.name.starts_with(&local) && s.frontends.contains(&format!("{lb_ip}/TCP"))
            })
            .map(|s| s.backends.len())
            .sum();
        let expected = services
            .iter()
            .find(|s| s.name == WEB_LOCAL)
            .map(|s| {
                s.endpoints_of(false)
                    .filter(|e| e.node == node.name)
                    .count()
            })
            .unwrap_or_default();
        assert_eq!(
            local_backends, expected,
            "{}: backends of {lb_ip} ({local}):\n{report}",
            node.name
        );
    }
}
