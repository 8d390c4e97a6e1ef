//! Path MTU discovery through xlb on the cluster in namespaces (`lb_testbed::cluster`):
//! one agent per node in SNAT mode (host-gw and VXLAN), DSR mode (host-gw and VXLAN)
//! and hybrid mode (host-gw), as the DaemonSet runs it, held to the `path_mtu` and
//! `reply_path_mtu` scenarios that kube-proxy's iptables rules pass
//! (lb-testbed/tests/cluster_baseline.rs), IPv4 and IPv6.
//! A packet larger than a smaller link's MTU on the way to the pod draws an ICMP error
//! ("fragmentation needed" / "packet too big") about the translated packet; it must
//! reach the client translated back, whether the pod is on another node (the flow was
//! source-NATed) or on the receiving node (destination only), so the client's socket
//! learns the smaller MTU and a TCP transfer completes, and a too-big UDP datagram
//! fails with `EMSGSIZE`. The other way, a smaller link on the client's side makes the
//! router answer the pod's full-size replies with an ICMP error sent to the NodePort's
//! node; it must reach the pod translated (`fwd_icmp`), so a transfer through every
//! node's NodePort completes. In DSR, a smaller link between the nodes makes the
//! client's packets too big once encapsulated: the receiving node answers them itself
//! (`dsr_icmp_too_big`), so TCP whose MSS the clamp did not cover and too-big UDP
//! datagrams learn the MTU that fits.

use std::path::Path;

use lb_common::dsr::{DSR_OVERHEAD_V4, DSR_OVERHEAD_V6};
use lb_testbed::cluster::scenarios::{self, SmallLink};
use lb_testbed::cluster::xlb::{self, Mode, XlbAgents};
use lb_testbed::cluster::{Cluster, ClusterService, PodNetwork};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");

/// Packets the agents together counted under `reason`.
fn counted(xlb: &XlbAgents<'_>, reason: &str) -> u64 {
    xlb.counted(reason)
        .unwrap_or_else(|e| panic!("status: {e:#}"))
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

/// Both scenarios with the pod's link small, IPv4 and IPv6; the errors went through
/// xlb's translation, not around it (`reply_icmp`, `fwd_icmp` counted).
fn path_mtu_both_ways(cluster: &Cluster, xlb: &XlbAgents<'_>, services: &[ClusterService]) {
    for v6 in [false, true] {
        let before = counted(xlb, "reply_icmp");
        let cases = scenarios::path_mtu(cluster, xlb, services, v6, SmallLink::PodLink)
            .unwrap_or_else(|e| panic!("path MTU v6={v6}: {e:#}\n{}", xlb.statuses()));
        eprintln!("path MTU v6={v6}: {cases:?}");
        assert!(
            counted(xlb, "reply_icmp") > before,
            "v6={v6}: reply_icmp counted"
        );
        let before = counted(xlb, "fwd_icmp");
        let replies = scenarios::reply_path_mtu(cluster, xlb, services, v6)
            .unwrap_or_else(|e| panic!("reply path MTU v6={v6}: {e:#}\n{}", xlb.statuses()));
        eprintln!("path MTU of the replies v6={v6}: {replies:?}");
        assert!(
            counted(xlb, "fwd_icmp") > before,
            "v6={v6}: fwd_icmp counted"
        );
    }
}

/// DSR with a smaller link between the nodes: the pods' SYN-ACKs leave by a 1500-byte
/// link, so the clamped MSS does not keep the client's segments small enough to
/// encapsulate; the receiving nodes answer them (`dsr_icmp_too_big`), and the TCP
/// transfers and UDP probes learn the link's MTU less the outer header.
fn too_big_to_encapsulate(cluster: &Cluster, xlb: &XlbAgents<'_>, services: &[ClusterService]) {
    for v6 in [false, true] {
        let overhead = u32::from(if v6 { DSR_OVERHEAD_V6 } else { DSR_OVERHEAD_V4 });
        let before = counted(xlb, "dsr_icmp_too_big");
        let cases = scenarios::path_mtu(
            cluster,
            xlb,
            services,
            v6,
            SmallLink::BetweenNodes { overhead },
        )
        .unwrap_or_else(|e| panic!("path MTU between nodes v6={v6}: {e:#}\n{}", xlb.statuses()));
        eprintln!("path MTU between nodes v6={v6}: {cases:?}");
        assert!(
            counted(xlb, "dsr_icmp_too_big") > before,
            "v6={v6}: dsr_icmp_too_big counted"
        );
    }
}

#[test]
fn xlb_snat_path_mtu_on_a_host_gw_cluster() {
    let cluster = Cluster::for_test("xi-hostgw", PodNetwork::HostGw);
    let (_servers, services, xlb) = start(&cluster, Mode::Snat);
    path_mtu_both_ways(&cluster, &xlb, &services);
}

#[test]
fn xlb_snat_path_mtu_on_a_vxlan_cluster() {
    let cluster = Cluster::for_test("xi-vxlan", PodNetwork::Vxlan);
    let (_servers, services, xlb) = start(&cluster, Mode::Snat);
    path_mtu_both_ways(&cluster, &xlb, &services);
}

/// DSR: the pod's node forwards the decapsulated client -> pod:targetPort; its error
/// about it quotes the pod, and the tc egress program translates the quote back with
/// the reply translation the decapsulation left (`reply_icmp`). The pod's replies leave
/// its node with the NodePort's node as their source, so the router's error about them
/// goes to that node, which sends it on to the pod (`fwd_icmp`). Then the smaller link
/// between the nodes (`dsr_icmp_too_big`).
fn dsr_path_mtu(network: PodNetwork, tag: &str) {
    let cluster = Cluster::for_test(tag, network);
    let (_servers, services, xlb) = start(&cluster, Mode::Dsr);
    let before = counted(&xlb, "dsr_delivered");
    path_mtu_both_ways(&cluster, &xlb, &services);
    // The pod is remote for most frontends: their packets reached it encapsulated.
    assert!(
        counted(&xlb, "dsr_delivered") > before,
        "dsr_delivered counted"
    );
    too_big_to_encapsulate(&cluster, &xlb, &services);
}

#[test]
fn xlb_dsr_path_mtu_on_a_host_gw_cluster() {
    dsr_path_mtu(PodNetwork::HostGw, "xi-dsr");
}

#[test]
fn xlb_dsr_path_mtu_on_a_vxlan_cluster() {
    dsr_path_mtu(PodNetwork::Vxlan, "xi-dsrvx");
}

/// Hybrid: TCP (`mtu`) as DSR, UDP (`mtu-udp`) as SNAT, each with its own translation
/// of the errors.
#[test]
fn xlb_hybrid_path_mtu_on_a_host_gw_cluster() {
    let cluster = Cluster::for_test("xi-hybrid", PodNetwork::HostGw);
    let (_servers, services, xlb) = start(&cluster, Mode::Hybrid);
    path_mtu_both_ways(&cluster, &xlb, &services);
}
