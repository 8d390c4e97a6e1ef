//! kube-proxy's iptables rules on the cluster in namespaces (three nodes behind an ECMP
//! router, Calico-style pods): the baseline every xlb mode is held to, and the proof that
//! the topology itself is right. Each test builds one cluster, programs every node once
//! and runs every scenario of `lb_testbed::cluster::scenarios` in it, IPv4 and IPv6.
//! Namespaces, servers and manifests are removed on drop, also when a case fails.

use lb_testbed::cluster::apps::PodServers;
use lb_testbed::cluster::kube_proxy::KubeProxyIptables;
use lb_testbed::cluster::kube_proxy_nft::KubeProxyNftables;
use lb_testbed::cluster::manifests::ManifestDir;
use lb_testbed::cluster::scenarios::{self, DROPPED_NODE, POD_PORT, SmallLink};
use lb_testbed::cluster::{
    Cluster, ClusterService, NodeProgram, PodNetwork, Protocol, VXLAN_IF_V4, VXLAN_IF_V6,
};

/// Builds the cluster, programs kube-proxy's iptables rules on every node and announces
/// the Local LB IPs.
fn baseline(tag: &str, network: PodNetwork) -> (Cluster, PodServers, Vec<ClusterService>) {
    let cluster = Cluster::for_test(tag, network);
    let servers = PodServers::start(&cluster, POD_PORT).expect("pod servers");
    let services = scenarios::standard_services(&cluster);
    KubeProxyIptables
        .program(&cluster, &services)
        .unwrap_or_else(|e| panic!("kube-proxy rules on every node: {e:#}"));
    scenarios::announce(&cluster, &services).expect("announce Local LB IPs");
    (cluster, servers, services)
}

fn frontends(cluster: &Cluster, program: &dyn NodeProgram<'_>, services: &[ClusterService]) {
    for v6 in [false, true] {
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let report = scenarios::frontends(cluster, program, services, proto, v6)
                .unwrap_or_else(|e| panic!("{e:#}"));
            eprintln!("{proto:?} v6={v6}: {report:?}");
        }
    }
}

/// Long-lived connections while node-1 leaves the ECMP group: kube-proxy keeps per-node
/// conntrack state, so a moved flow lands on a node that never saw it and is reset;
/// exactly the flows that did not move survive (with Linux's hash-threshold ECMP and
/// the middle nexthop withdrawn, those are all but node-1's).
fn node_drop(cluster: &Cluster, services: &[ClusterService]) {
    for v6 in [false, true] {
        let flows = scenarios::node_drop(cluster, &KubeProxyIptables, services, v6)
            .unwrap_or_else(|e| panic!("{e:#}"));
        let through_dropped = flows
            .iter()
            .filter(|f| f.node_before == DROPPED_NODE)
            .count();
        let survived = flows.iter().filter(|f| f.survived).count();
        let moved = flows
            .iter()
            .filter(|f| f.node_before != f.node_after)
            .count();
        eprintln!(
            "node drop v6={v6}: {survived} of {} survived; {through_dropped} went through node-{DROPPED_NODE}, {moved} moved",
            flows.len()
        );
        assert_eq!(survived, flows.len() - moved, "{flows:#?}");
        // Hash-threshold: node-0 kept [0, 1/3) of the hash space within its new [0, 1/2),
        // node-2 [2/3, 1) within [1/2, 1); only node-1's flows moved.
        assert_eq!(moved, through_dropped, "{flows:#?}");
        assert!(
            flows
                .iter()
                .all(|f| f.node_before != DROPPED_NODE || !f.survived),
            "{flows:#?}"
        );
    }
}

#[test]
fn kube_proxy_iptables_on_a_host_gw_cluster() {
    let (cluster, servers, services) = baseline("kp-hostgw", PodNetwork::HostGw);
    frontends(&cluster, &KubeProxyIptables, &services);

    node_drop(&cluster, &services);

    for v6 in [false, true] {
        let cases = scenarios::path_mtu(
            &cluster,
            &KubeProxyIptables,
            &services,
            v6,
            SmallLink::PodLink,
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        eprintln!("path MTU v6={v6}: {cases:?}");
        let replies = scenarios::reply_path_mtu(&cluster, &KubeProxyIptables, &services, v6)
            .unwrap_or_else(|e| panic!("{e:#}"));
        eprintln!("path MTU of the replies v6={v6}: {replies:?}");
    }
    eprintln!("served per pod: {:?}", servers.served());
}

#[test]
fn kube_proxy_iptables_on_a_vxlan_cluster() {
    let (cluster, _servers, services) = baseline("kp-vxlan", PodNetwork::Vxlan);
    frontends(&cluster, &KubeProxyIptables, &services);
    // Remote pods were reached, and only VXLAN leads to them: every node sent over both
    // devices.
    for node in &cluster.nodes {
        for dev in [VXLAN_IF_V4, VXLAN_IF_V6] {
            let json = node
                .ns
                .ip(&["-j", "-s", "link", "show", "dev", dev])
                .expect("ip -s link");
            let links: serde_json::Value = serde_json::from_str(&json).expect("JSON");
            let sent = links[0]["stats64"]["tx"]["packets"]
                .as_u64()
                .expect("tx packets");
            assert!(sent > 0, "{} sent nothing over {dev}: {json}", node.name);
        }
    }
    node_drop(&cluster, &services);
    for v6 in [false, true] {
        scenarios::path_mtu(
            &cluster,
            &KubeProxyIptables,
            &services,
            v6,
            SmallLink::PodLink,
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        scenarios::reply_path_mtu(&cluster, &KubeProxyIptables, &services, v6)
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
}

/// kube-proxy's nftables mode passes the same frontends and path MTU scenarios.
#[test]
fn kube_proxy_nftables_on_a_host_gw_cluster() {
    let cluster = Cluster::for_test("kp-nft", PodNetwork::HostGw);
    let _servers = PodServers::start(&cluster, POD_PORT).expect("pod servers");
    let services = scenarios::standard_services(&cluster);
    KubeProxyNftables
        .program(&cluster, &services)
        .unwrap_or_else(|e| panic!("kube-proxy nftables on every node: {e:#}"));
    scenarios::announce(&cluster, &services).expect("announce Local LB IPs");
    frontends(&cluster, &KubeProxyNftables, &services);
    for v6 in [false, true] {
        scenarios::path_mtu(
            &cluster,
            &KubeProxyNftables,
            &services,
            v6,
            SmallLink::PodLink,
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
    }
}

/// The agents' manifests for this cluster parse as the agent reads them: one Node per
/// node with its podCIDRs, each Service with one EndpointSlice per family.
#[test]
fn manifests_describe_the_cluster() {
    let cluster = Cluster::for_test("kp-manifests", PodNetwork::HostGw);
    let services = scenarios::standard_services(&cluster);
    let dir = ManifestDir::new("kp-manifests").expect("manifest dir");
    dir.write(&cluster, &services).expect("write manifests");
    let nodes = std::fs::read_to_string(dir.path().join("nodes.yaml")).expect("nodes.yaml");
    for node in &cluster.nodes {
        assert!(nodes.contains(&format!("name: {}", node.name)), "{nodes}");
        assert!(nodes.contains(&Cluster::pod_cidr_v6(node.index)), "{nodes}");
    }
    let files = std::fs::read_dir(dir.path()).expect("read dir").count();
    assert_eq!(files, services.len() + 1);
    assert_eq!(
        dir.agent_source("node-1"),
        [
            "--manifests",
            &dir.path().display().to_string(),
            "--node-name",
            "node-1"
        ]
    );
}
