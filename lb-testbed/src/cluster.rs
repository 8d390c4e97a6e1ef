//! A Kubernetes cluster's network in namespaces: a client behind a router (a ToR that
//! learnt the VIP range from every node over BGP, so it spreads VIP traffic over the nodes
//! by ECMP), three nodes on one L2 segment, and pods behind each node wired the way
//! Calico wires them. The nodes reach each other's pods directly (host-gw, as Calico's
//! BGP mode without encapsulation or flannel's host-gw backend do) or over VXLAN (as
//! flannel's vxlan backend does).
//!
//! ```text
//!  client ns          router ns                     switch ns        node ns i (i = 0..3)
//!  eth0 ────────────── cl      seg ──────────────── prt ┐
//!  198.51.100.2/26     .1/26   198.51.100.65/26          br0 ─ n<i> ── eth0 198.51.100.(66+i)/26
//!  2001:db8:c::2/64    c::1    2001:db8:d::1/64                            2001:db8:d::(66+i)/64
//!  default via .1      ECMP: 203.0.113.0/24 and 2001:db8:f::/64             │  default via .65 / d::1
//!                      nexthop via every node, 5-tuple hash                 │
//!                      (fib_multipath_hash_policy=3, fields 0x37)           │ cali<i>x<j> (ee:ee:ee:ee:ee:ee,
//!                                                                           │   proxy ARP, no address)
//!                                                                           │   route 192.0.2.x/32, 2001:db8:a:i::x/128
//!                                                 pod ns i/j:  eth0 ────────┘
//!                                                 192.0.2.(32i+10+j)/32, 2001:db8:a:i::(10+j)/128
//!                                                 default via 169.254.1.1 / fe80::ecee:eeff:feee:eeee
//! ```
//!
//! Node `i` owns the pod CIDRs 192.0.2.(32i)/27 and 2001:db8:a:i::/64 (its Node object's
//! `podCIDRs`) and routes the other nodes' pod CIDRs:
//! - [`PodNetwork::HostGw`]: `via` the other node's segment address;
//! - [`PodNetwork::Vxlan`]: over `flannel.1` (VNI 1, UDP 8472, IPv4 underlay) and
//!   `flannel-v6.1` (VNI 1, UDP 8472, IPv6 underlay), which hold the node's pod-CIDR
//!   network address (192.0.2.(32i)/32, 2001:db8:a:i::/128) and a fixed MAC, with the
//!   route `CIDR via <network address> onlink`, a permanent neighbour and a forwarding
//!   entry per remote node, exactly the entries flannel's vxlan backend writes.
//!
//! Pods are wired as Calico's CNI plugin does: a veth whose host end
//! (`cali<node>x<pod>`) has no address, the MAC ee:ee:ee:ee:ee:ee, proxy ARP and a
//! host route to the pod's /32 and /128; the pod's default routes go via 169.254.1.1
//! (answered by proxy ARP) and the host end's link-local address. No GRO, checksum or
//! XDP settings are changed on pod veths: they are as a CNI leaves them. Their MTU is
//! the links' (1500), less the VXLAN overhead in the VXLAN variant (1430), as the CNI
//! configures it ([`Cluster::pod_mtu`]). The node's uplink `eth0` and the other links
//! are testbed veths (full checksums, NAPI on), as NICs are.
//!
//! Pods reply through their node (their only route). Nothing is programmed for
//! Services: a [`NodeProgram`] (kube-proxy's iptables rules, xlb agents) does that.
//! VIPs are configured on no interface; the router routes the whole VIP range to the
//! nodes, and [`Cluster::set_route`] narrows a prefix to some nodes (a ClusterIP routed
//! to one node, a `Local` LB IP announced only by nodes with endpoints, a node
//! withdrawn from the ECMP group). The router hashes by the 5-tuple with policy 3
//! rather than 1 ([`MULTIPATH_HASH_POLICY`] says why), and [`Cluster::record_paths`]
//! shows which node it sent each of the client's flows to.

pub mod apps;
pub mod kube_proxy;
pub mod kube_proxy_nft;
pub mod manifests;
pub mod scenarios;
pub mod service;
pub mod xlb;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, bail};

use super::netns::{Netns, veth_pair};

pub use scenarios::{NodeProgram, PodSees};
pub use service::{ClusterService, Endpoint, TrafficPolicy};

/// Most nodes a cluster can have (pod CIDRs are /27s of 192.0.2.0/24).
pub const MAX_NODES: usize = 8;

/// Most pods per node (addresses .10 to .25 of the node's /27).
pub const MAX_PODS_PER_NODE: usize = 16;

/// The VIP ranges the router spreads over the nodes (LB IPs, and ClusterIPs where a
/// test routes them).
pub const VIP_RANGE_V4: &str = "203.0.113.0/24";
/// The IPv6 VIP range.
pub const VIP_RANGE_V6: &str = "2001:db8:f::/64";

/// Every pod CIDR of the cluster (kube-proxy's `--cluster-cidr`).
pub const CLUSTER_CIDR_V4: &str = "192.0.2.0/24";
/// Every IPv6 pod CIDR of the cluster.
pub const CLUSTER_CIDR_V6: &str = "2001:db8:a::/48";

/// The gateway Calico gives every pod; proxy ARP on the host end answers for it.
const POD_GATEWAY_V4: &str = "169.254.1.1";
/// The MAC of every host-side pod veth, as Calico sets it.
const HOST_VETH_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// The link-local address the kernel derives (EUI-64) from [`HOST_VETH_MAC`]: the pods'
/// IPv6 gateway.
const POD_GATEWAY_V6: &str = "fe80::ecee:eeff:feee:eeee";

/// flannel's VXLAN devices, VNI and port.
pub const VXLAN_IF_V4: &str = "flannel.1";
/// The IPv6-underlay VXLAN device.
pub const VXLAN_IF_V6: &str = "flannel-v6.1";
const VXLAN_VNI: &str = "1";
const VXLAN_PORT: &str = "8472";
/// Overheads of VXLAN over an IPv4 and an IPv6 underlay (outer IP + UDP + VXLAN +
/// inner Ethernet), so the devices' MTUs are 1450 and 1430, as flannel sets them.
const VXLAN_OVERHEAD_V4: u32 = 50;
const VXLAN_OVERHEAD_V6: u32 = 70;
/// The MTU of every link that is not a VXLAN device.
pub const LINK_MTU: u32 = 1500;

/// The router's multipath hash: policy 3 (custom fields) with exactly the 5-tuple
/// (source and destination address, protocol, source and destination port:
/// `fib_multipath_hash_fields` bits 0x01, 0x02, 0x04, 0x10, 0x20).
///
/// Policy 1 means the same 5-tuple on a real router, but Linux's policy 1 first takes
/// the hash already on the packet when there is one (`skb->l4_hash`), and a packet
/// sent by a local socket and moved into the router's namespace over a veth still
/// carries its socket's random `sk_txhash`, which TCP even re-rolls after a
/// retransmission timeout. The router would then spread flows by a per-connection
/// random number, not by their 5-tuple, unlike any ToR. Policy 3 hashes the listed
/// fields of the packet itself, so the path of a flow is a function of its 5-tuple,
/// stable for its lifetime ([`Cluster::record_paths`] shows it).
pub const MULTIPATH_HASH_POLICY: u8 = 3;
/// See [`MULTIPATH_HASH_POLICY`].
pub const MULTIPATH_HASH_FIELDS: &str = "0x37";

/// How long [`Cluster::wait_ready`] waits at most.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// How the nodes reach each other's pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodNetwork {
    /// A route per remote pod CIDR via that node's segment address.
    HostGw,
    /// flannel's vxlan backend: routes over `flannel.1` / `flannel-v6.1`.
    Vxlan,
}

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Goes into every namespace name, so a leftover namespace tells which test made it.
    pub tag: String,
    /// `1..=MAX_NODES`.
    pub nodes: usize,
    /// `1..=MAX_PODS_PER_NODE`.
    pub pods_per_node: usize,
    pub network: PodNetwork,
}

impl ClusterConfig {
    /// Three nodes with two pods each.
    pub fn new(tag: impl Into<String>, network: PodNetwork) -> Self {
        ClusterConfig {
            tag: tag.into(),
            nodes: 3,
            pods_per_node: 2,
            network,
        }
    }
}

/// One node: its namespace, names and addresses.
#[derive(Debug)]
pub struct Node {
    /// The Kubernetes node name, `node-<i>`: the agents' `--node-name`.
    pub name: String,
    pub index: usize,
    pub ns: Netns,
    pub pods: Vec<Pod>,
}

impl Node {
    /// Its address on the segment (its InternalIP): [`Cluster::node_v4`].
    pub fn v4(&self) -> Ipv4Addr {
        Cluster::node_v4(self.index)
    }

    /// Its IPv6 address on the segment: [`Cluster::node_v6`].
    pub fn v6(&self) -> Ipv6Addr {
        Cluster::node_v6(self.index)
    }
}

/// One pod: its namespace and addresses, and the node it runs on.
#[derive(Debug)]
pub struct Pod {
    /// `node-<i>-pod-<j>`, also what its servers answer with.
    pub name: String,
    /// The index of its node.
    pub node: usize,
    /// Its index on its node.
    pub index: usize,
    pub ns: Netns,
}

impl Pod {
    /// Its address: [`Cluster::pod_v4`].
    pub fn v4(&self) -> Ipv4Addr {
        Cluster::pod_v4(self.node, self.index)
    }

    /// Its IPv6 address: [`Cluster::pod_v6`].
    pub fn v6(&self) -> Ipv6Addr {
        Cluster::pod_v6(self.node, self.index)
    }
}

/// The client, router, switch, nodes and pods, wired as in the module docs. Dropping it
/// deletes every namespace (and kills what runs in them).
#[derive(Debug)]
pub struct Cluster {
    /// Sends traffic to VIPs and node addresses; interface `eth0`.
    pub client: Netns,
    /// The ToR: interfaces `cl` (client) and `seg` (the node segment).
    pub router: Netns,
    /// The node segment's bridge `br0`.
    pub switch: Netns,
    pub nodes: Vec<Node>,
    pub network: PodNetwork,
    /// The router's narrowed routes: prefix -> nodes (see [`Cluster::set_route`]).
    routes: Mutex<BTreeMap<String, Vec<usize>>>,
}

impl Cluster {
    /// The client's interface.
    pub const CLIENT_IF: &str = "eth0";
    /// The router's interface towards the client.
    pub const ROUTER_CLIENT_IF: &str = "cl";
    /// The router's interface on the node segment.
    pub const ROUTER_SEGMENT_IF: &str = "seg";
    /// Every node's uplink to the segment (where an XDP load balancer attaches).
    pub const NODE_IF: &str = "eth0";
    /// Every pod's interface.
    pub const POD_IF: &str = "eth0";
    /// The segment's bridge, in the switch namespace.
    pub const BRIDGE: &str = "br0";

    /// The set-up of a privileged test: checks privileges, builds the cluster and waits
    /// until it is ready.
    ///
    /// # Panics
    ///
    /// When the process lacks the privileges, or the cluster cannot be built.
    #[track_caller]
    #[must_use]
    pub fn for_test(tag: &str, network: PodNetwork) -> Cluster {
        crate::check_privileges().expect("privileges");
        let cluster = Cluster::build(&ClusterConfig::new(tag, network)).expect("cluster");
        cluster.wait_ready().expect("cluster ready");
        cluster
    }

    /// Creates the namespaces, links, addresses and routes. On error, everything
    /// already created is deleted again.
    pub fn build(cfg: &ClusterConfig) -> anyhow::Result<Cluster> {
        if !(1..=MAX_NODES).contains(&cfg.nodes) {
            bail!(
                "cluster {:?}: nodes must be 1..={MAX_NODES}, got {}",
                cfg.tag,
                cfg.nodes
            );
        }
        if !(1..=MAX_PODS_PER_NODE).contains(&cfg.pods_per_node) {
            bail!(
                "cluster {:?}: pods_per_node must be 1..={MAX_PODS_PER_NODE}, got {}",
                cfg.tag,
                cfg.pods_per_node
            );
        }
        let tag = &cfg.tag;
        let client = Netns::new(&format!("{tag}-cl"))?;
        let router = Netns::new(&format!("{tag}-rt"))?;
        let switch = Netns::new(&format!("{tag}-sw"))?;
        let mut nodes = Vec::with_capacity(cfg.nodes);
        for i in 0..cfg.nodes {
            let ns = Netns::new(&format!("{tag}-n{i}"))?;
            let mut pods = Vec::with_capacity(cfg.pods_per_node);
            for j in 0..cfg.pods_per_node {
                pods.push(Pod {
                    name: format!("node-{i}-pod-{j}"),
                    node: i,
                    index: j,
                    ns: Netns::new(&format!("{tag}-n{i}p{j}"))?,
                });
            }
            nodes.push(Node {
                name: format!("node-{i}"),
                index: i,
                ns,
                pods,
            });
        }
        let cluster = Cluster {
            client,
            router,
            switch,
            nodes,
            network: cfg.network,
            routes: Mutex::new(BTreeMap::new()),
        };
        cluster
            .configure()
            .with_context(|| format!("building cluster {tag:?}"))?;
        Ok(cluster)
    }

    fn configure(&self) -> anyhow::Result<()> {
        // Before any interface exists, so new ones inherit it: no duplicate address
        // detection (link-local gateways are usable at once).
        for ns in self.namespaces() {
            ns.exec(
                "sysctl",
                &[
                    "-qw",
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                ],
            )?;
        }
        self.switch.exec(
            "sysctl",
            &[
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        )?;
        // The ToR hashes flows by their 5-tuple, as a BGP ECMP router is set up to (see
        // `MULTIPATH_HASH` for why not policy 1).
        self.router.exec(
            "sysctl",
            &[
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                &format!("net.ipv4.fib_multipath_hash_policy={MULTIPATH_HASH_POLICY}"),
                &format!("net.ipv4.fib_multipath_hash_fields={MULTIPATH_HASH_FIELDS}"),
                &format!("net.ipv6.fib_multipath_hash_policy={MULTIPATH_HASH_POLICY}"),
                &format!("net.ipv6.fib_multipath_hash_fields={MULTIPATH_HASH_FIELDS}"),
            ],
        )?;
        for node in &self.nodes {
            node.ns.exec(
                "sysctl",
                &[
                    "-qw",
                    "net.ipv4.ip_forward=1",
                    "net.ipv6.conf.all.forwarding=1",
                ],
            )?;
        }
        self.configure_segment()?;
        for node in &self.nodes {
            for pod in &node.pods {
                self.configure_pod(node, pod)
                    .with_context(|| format!("pod {}", pod.name))?;
            }
        }
        match self.network {
            PodNetwork::HostGw => self.configure_host_gw()?,
            PodNetwork::Vxlan => self.configure_vxlan()?,
        }
        self.program_routes()
    }

    /// The client, the router, the bridge and every node's uplink.
    fn configure_segment(&self) -> anyhow::Result<()> {
        veth_pair(
            &self.client,
            Self::CLIENT_IF,
            &self.router,
            Self::ROUTER_CLIENT_IF,
        )?;
        add_addrs(
            &self.client,
            Self::CLIENT_IF,
            &format!("{}/26", Self::client_v4()),
            &format!("{}/64", Self::client_v6()),
        )?;
        add_addrs(
            &self.router,
            Self::ROUTER_CLIENT_IF,
            &format!("{}/26", Self::router_client_v4()),
            &format!("{}/64", Self::router_client_v6()),
        )?;
        self.client.ip(&[
            "-4",
            "route",
            "add",
            "default",
            "via",
            &Self::router_client_v4().to_string(),
        ])?;
        self.client.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &Self::router_client_v6().to_string(),
        ])?;

        // Forward at once (no STP delay) and flood multicast (no MLD querier here).
        self.switch.ip(&[
            "link",
            "add",
            Self::BRIDGE,
            "type",
            "bridge",
            "forward_delay",
            "0",
            "stp_state",
            "0",
            "mcast_snooping",
            "0",
        ])?;
        self.switch
            .ip(&["link", "set", "dev", Self::BRIDGE, "up"])?;
        let mut ports = vec![("prt".to_owned(), &self.router, Self::ROUTER_SEGMENT_IF)];
        for node in &self.nodes {
            ports.push((format!("n{}", node.index), &node.ns, Self::NODE_IF));
        }
        for (port, ns, ifname) in ports {
            veth_pair(ns, ifname, &self.switch, &port)?;
            self.switch
                .ip(&["link", "set", "dev", &port, "master", Self::BRIDGE])?;
            crate::enable_napi(&self.switch, &port)?;
        }
        add_addrs(
            &self.router,
            Self::ROUTER_SEGMENT_IF,
            &format!("{}/26", Self::router_segment_v4()),
            &format!("{}/64", Self::router_segment_v6()),
        )?;
        for node in &self.nodes {
            let i = node.index;
            add_addrs(
                &node.ns,
                Self::NODE_IF,
                &format!("{}/26", Self::node_v4(i)),
                &format!("{}/64", Self::node_v6(i)),
            )?;
            node.ns.ip(&[
                "-4",
                "route",
                "add",
                "default",
                "via",
                &Self::router_segment_v4().to_string(),
            ])?;
            node.ns.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &Self::router_segment_v6().to_string(),
            ])?;
        }
        Ok(())
    }

    /// One pod, as Calico's CNI plugin wires it.
    fn configure_pod(&self, node: &Node, pod: &Pod) -> anyhow::Result<()> {
        let host_if = Self::pod_host_if(pod.node, pod.index);
        let mtu = self.pod_mtu().to_string();
        // A plain veth: created in the node with its peer directly in the pod.
        node.ns.ip(&[
            "link",
            "add",
            &host_if,
            "mtu",
            &mtu,
            "address",
            HOST_VETH_MAC,
            "type",
            "veth",
            "peer",
            "name",
            Self::POD_IF,
            "mtu",
            &mtu,
            "netns",
            pod.ns.name(),
        ])?;
        for (key, value) in [
            (format!("net.ipv4.conf.{host_if}.proxy_arp"), "1"),
            (format!("net.ipv4.neigh.{host_if}.proxy_delay"), "0"),
            (format!("net.ipv4.conf.{host_if}.forwarding"), "1"),
            (format!("net.ipv6.conf.{host_if}.forwarding"), "1"),
        ] {
            node.ns.sysctl(&key, value)?;
        }
        node.ns.ip(&["link", "set", "dev", &host_if, "up"])?;
        pod.ns.ip(&["link", "set", "dev", Self::POD_IF, "up"])?;
        let (v4, v6) = (
            Self::pod_v4(pod.node, pod.index),
            Self::pod_v6(pod.node, pod.index),
        );
        add_addrs(
            &pod.ns,
            Self::POD_IF,
            &format!("{v4}/32"),
            &format!("{v6}/128"),
        )?;
        pod.ns.ip(&[
            "-4",
            "route",
            "add",
            POD_GATEWAY_V4,
            "dev",
            Self::POD_IF,
            "scope",
            "link",
        ])?;
        pod.ns.ip(&[
            "-4",
            "route",
            "add",
            "default",
            "via",
            POD_GATEWAY_V4,
            "dev",
            Self::POD_IF,
        ])?;
        pod.ns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            POD_GATEWAY_V6,
            "dev",
            Self::POD_IF,
        ])?;
        node.ns.ip(&[
            "-4",
            "route",
            "add",
            &format!("{v4}/32"),
            "dev",
            &host_if,
            "scope",
            "link",
        ])?;
        node.ns
            .ip(&["-6", "route", "add", &format!("{v6}/128"), "dev", &host_if])?;
        Ok(())
    }

    fn configure_host_gw(&self) -> anyhow::Result<()> {
        for node in &self.nodes {
            for other in self.nodes.iter().filter(|o| o.index != node.index) {
                let k = other.index;
                node.ns.ip(&[
                    "-4",
                    "route",
                    "add",
                    &Self::pod_cidr_v4(k),
                    "via",
                    &Self::node_v4(k).to_string(),
                ])?;
                node.ns.ip(&[
                    "-6",
                    "route",
                    "add",
                    &Self::pod_cidr_v6(k),
                    "via",
                    &Self::node_v6(k).to_string(),
                ])?;
            }
        }
        Ok(())
    }

    /// flannel's vxlan backend: one device per underlay family, the node's pod-CIDR
    /// network address on it, and per remote node a route, a neighbour and an FDB entry.
    fn configure_vxlan(&self) -> anyhow::Result<()> {
        for node in &self.nodes {
            let i = node.index;
            for (ifname, local, overhead, v6) in [
                (
                    VXLAN_IF_V4,
                    IpAddr::V4(Self::node_v4(i)),
                    VXLAN_OVERHEAD_V4,
                    false,
                ),
                (
                    VXLAN_IF_V6,
                    IpAddr::V6(Self::node_v6(i)),
                    VXLAN_OVERHEAD_V6,
                    true,
                ),
            ] {
                let mtu = (LINK_MTU - overhead).to_string();
                node.ns.ip(&[
                    "link",
                    "add",
                    ifname,
                    "mtu",
                    &mtu,
                    "address",
                    &Self::vtep_mac(i, v6),
                    "type",
                    "vxlan",
                    "id",
                    VXLAN_VNI,
                    "local",
                    &local.to_string(),
                    "dev",
                    Self::NODE_IF,
                    "dstport",
                    VXLAN_PORT,
                    "nolearning",
                ])?;
                node.ns.ip(&["link", "set", "dev", ifname, "up"])?;
            }
            node.ns.ip(&[
                "-4",
                "addr",
                "add",
                &format!("{}/32", Self::tunnel_v4(i)),
                "dev",
                VXLAN_IF_V4,
            ])?;
            node.ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{}/128", Self::tunnel_v6(i)),
                "dev",
                VXLAN_IF_V6,
                "nodad",
            ])?;
            self.vxlan_peers(node)?;
        }
        Ok(())
    }

    /// Node `node`'s route, neighbour and forwarding entry for every other node's pod
    /// CIDR, as flannel writes them.
    fn vxlan_peers(&self, node: &Node) -> anyhow::Result<()> {
        let i = node.index;
        for other in self.nodes.iter().filter(|o| o.index != i) {
            let k = other.index;
            for (ifname, cidr, gateway, underlay, v6) in [
                (
                    VXLAN_IF_V4,
                    Self::pod_cidr_v4(k),
                    IpAddr::V4(Self::tunnel_v4(k)),
                    IpAddr::V4(Self::node_v4(k)),
                    false,
                ),
                (
                    VXLAN_IF_V6,
                    Self::pod_cidr_v6(k),
                    IpAddr::V6(Self::tunnel_v6(k)),
                    IpAddr::V6(Self::node_v6(k)),
                    true,
                ),
            ] {
                let gateway = gateway.to_string();
                let mac = Self::vtep_mac(k, v6);
                node.ns.ip(&[
                    "route", "add", &cidr, "via", &gateway, "dev", ifname, "onlink",
                ])?;
                node.ns.ip(&[
                    "neigh",
                    "add",
                    &gateway,
                    "lladdr",
                    &mac,
                    "dev",
                    ifname,
                    "nud",
                    "permanent",
                ])?;
                node.ns.exec(
                    "bridge",
                    &[
                        "fdb",
                        "append",
                        &mac,
                        "dev",
                        ifname,
                        "dst",
                        &underlay.to_string(),
                        "self",
                        "permanent",
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// Every namespace: client, router, switch, then each node followed by its pods.
    pub fn namespaces(&self) -> impl Iterator<Item = &Netns> {
        [&self.client, &self.router, &self.switch]
            .into_iter()
            .chain(
                self.nodes
                    .iter()
                    .flat_map(|n| std::iter::once(&n.ns).chain(n.pods.iter().map(|p| &p.ns))),
            )
    }

    /// Every pod of every node.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.nodes.iter().flat_map(|n| &n.pods)
    }

    /// Node names, in index order.
    pub fn node_names(&self) -> Vec<&str> {
        self.nodes.iter().map(|n| n.name.as_str()).collect()
    }

    /// Waits (at most 5 s) until every interface is up and no IPv6 address is
    /// tentative. Sends no traffic.
    pub fn wait_ready(&self) -> anyhow::Result<()> {
        let namespaces: Vec<&Netns> = self.namespaces().collect();
        crate::topology::wait_until_ready("cluster", &namespaces, READY_TIMEOUT)
    }

    /// Routes `prefix` (an IPv4 or IPv6 CIDR, e.g. a ClusterIP's /32 or the whole VIP
    /// range) on the router over `nodes` (indices), one ECMP nexthop each, replacing
    /// whatever route it had: what a ToR does when the set of nodes announcing the
    /// prefix over BGP changes. An empty `nodes` withdraws it.
    pub fn set_route(&self, prefix: &str, nodes: &[usize]) -> anyhow::Result<()> {
        if let Some(&bad) = nodes.iter().find(|&&i| i >= self.nodes.len()) {
            bail!(
                "route {prefix}: node index {bad} out of range (the cluster has {} nodes)",
                self.nodes.len()
            );
        }
        let mut routes = self
            .routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.router_route(prefix, nodes)?;
        routes.insert(prefix.to_owned(), nodes.to_vec());
        Ok(())
    }

    /// The nodes the router currently sends `prefix` to (as set by [`Cluster::set_route`];
    /// the VIP ranges start over every node).
    pub fn route(&self, prefix: &str) -> Option<Vec<usize>> {
        self.routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(prefix)
            .cloned()
    }

    /// The VIP ranges over every node.
    fn program_routes(&self) -> anyhow::Result<()> {
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        self.set_route(VIP_RANGE_V4, &all)?;
        self.set_route(VIP_RANGE_V6, &all)
    }

    fn router_route(&self, prefix: &str, nodes: &[usize]) -> anyhow::Result<()> {
        let v6 = prefix.contains(':');
        let family = if v6 { "-6" } else { "-4" };
        if nodes.is_empty() {
            // Deleting a route that is not there is what "withdrawn" means too.
            let _ = self.router.ip(&[family, "route", "del", prefix]);
            return Ok(());
        }
        let mut args = vec![
            family.to_owned(),
            "route".into(),
            "replace".into(),
            prefix.into(),
        ];
        for &i in nodes {
            let via = if v6 {
                Self::node_v6(i).to_string()
            } else {
                Self::node_v4(i).to_string()
            };
            args.extend([
                "nexthop".into(),
                "via".into(),
                via,
                "dev".into(),
                Self::ROUTER_SEGMENT_IF.into(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.router.ip(&args)?;
        Ok(())
    }

    /// Starts recording, on the router, which node each of the client's packets to the
    /// node segment goes to (an nftables `netdev` egress table on `seg` counting by
    /// destination MAC, protocol and the client's source port); stops when dropped. It
    /// observes the path the forwarding code chose, so it holds for any hash policy and
    /// family (`ip route get` cannot: for IPv6 it hashes a flow description, not a
    /// packet, and under policy 3 the two differ).
    pub fn record_paths(&self) -> anyhow::Result<PathRecorder<'_>> {
        let macs = self
            .nodes
            .iter()
            .map(|node| {
                let json = node.ns.ip(&["-j", "link", "show", "dev", Self::NODE_IF])?;
                let links: serde_json::Value = serde_json::from_str(&json)
                    .with_context(|| format!("cannot parse `ip -j link` output {json:?}"))?;
                links
                    .get(0)
                    .and_then(|l| l.get("address"))
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_ascii_lowercase)
                    .with_context(|| format!("no MAC on {}'s {}", node.name, Self::NODE_IF))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let rules = format!(
            "table netdev {PATH_TABLE} {{\n\
             set seen {{ type ether_addr . inet_proto . inet_service; flags dynamic; counter; size 65536; }}\n\
             chain egress {{ type filter hook egress device \"{seg}\" priority 0;\n\
             ip saddr {c4} add @seen {{ ether daddr . meta l4proto . th sport }}\n\
             ip6 saddr {c6} add @seen {{ ether daddr . meta l4proto . th sport }}\n}}\n}}\n",
            seg = Self::ROUTER_SEGMENT_IF,
            c4 = Self::client_v4(),
            c6 = Self::client_v6(),
        );
        nft_from_file(&self.router, &rules)?;
        Ok(PathRecorder {
            router: &self.router,
            macs,
        })
    }

    /// The node that owns `ip` (its segment or tunnel address), if any.
    pub fn node_of_address(&self, ip: IpAddr) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| self.node_addresses(i).contains(&ip))
    }

    /// Every address of node `i` a pod may see as a masqueraded source: its segment
    /// addresses, and in the VXLAN variant its tunnel addresses.
    pub fn node_addresses(&self, i: usize) -> Vec<IpAddr> {
        let mut addrs = vec![IpAddr::V4(Self::node_v4(i)), IpAddr::V6(Self::node_v6(i))];
        if self.network == PodNetwork::Vxlan {
            addrs.extend([
                IpAddr::V4(Self::tunnel_v4(i)),
                IpAddr::V6(Self::tunnel_v6(i)),
            ]);
        }
        addrs
    }

    /// Sets the MTU of both ends of pod `(node, pod)`'s veth, as a CNI configured with a
    /// smaller MTU would (e.g. to make a link on the path smaller than the client's).
    pub fn set_pod_mtu(&self, node: usize, pod: usize, mtu: u32) -> anyhow::Result<()> {
        let n = self
            .nodes
            .get(node)
            .with_context(|| format!("set_pod_mtu: no node {node}"))?;
        let p = n
            .pods
            .get(pod)
            .with_context(|| format!("set_pod_mtu: node {node} has no pod {pod}"))?;
        let mtu = mtu.to_string();
        n.ns.ip(&[
            "link",
            "set",
            "dev",
            &Self::pod_host_if(node, pod),
            "mtu",
            &mtu,
        ])?;
        p.ns.ip(&["link", "set", "dev", Self::POD_IF, "mtu", &mtu])?;
        Ok(())
    }

    /// Gives node `node`'s host routes to its pod `pod` (both families) the locked MTU
    /// `mtu` (`None`: none), so the node sends ICMP errors for larger packets it
    /// forwards to the pod, as if a smaller link lay between them, while the pod's own
    /// link keeps its MTU (and the pod its MSS).
    pub fn set_pod_route_mtu(
        &self,
        node: usize,
        pod: usize,
        mtu: Option<u32>,
    ) -> anyhow::Result<()> {
        let n = self
            .nodes
            .get(node)
            .with_context(|| format!("set_pod_route_mtu: no node {node}"))?;
        anyhow::ensure!(
            pod < n.pods.len(),
            "set_pod_route_mtu: node {node} has no pod {pod}"
        );
        let host_if = Self::pod_host_if(node, pod);
        let mtu = mtu.map(|m| m.to_string());
        for (family, dst, scope) in [
            (
                "-4",
                format!("{}/32", Self::pod_v4(node, pod)),
                Some("link"),
            ),
            ("-6", format!("{}/128", Self::pod_v6(node, pod)), None),
        ] {
            let mut args = vec![family, "route", "replace", &dst, "dev", &host_if];
            if let Some(scope) = scope {
                args.extend(["scope", scope]);
            }
            if let Some(mtu) = &mtu {
                args.extend(["mtu", "lock", mtu]);
            }
            n.ns.ip(&args)?;
        }
        Ok(())
    }

    /// Gives node `from`'s route to node `to`'s pod CIDRs (both families) the locked MTU
    /// `mtu` (`None`: none), as a smaller link between the two nodes would: packets that
    /// `from` sends towards `to`'s pods (forwarded, or encapsulated to them) larger than
    /// that meet "fragmentation needed" / "packet too big". The route is otherwise the
    /// one the pod network wrote.
    pub fn set_pod_cidr_route_mtu(
        &self,
        from: usize,
        to: usize,
        mtu: Option<u32>,
    ) -> anyhow::Result<()> {
        let node = self
            .nodes
            .get(from)
            .with_context(|| format!("set_pod_cidr_route_mtu: no node {from}"))?;
        anyhow::ensure!(
            to < self.nodes.len() && to != from,
            "set_pod_cidr_route_mtu: node {to} is not another node of the cluster"
        );
        let mtu = mtu.map(|m| m.to_string());
        for v6 in [false, true] {
            let (family, cidr) = if v6 {
                ("-6", Self::pod_cidr_v6(to))
            } else {
                ("-4", Self::pod_cidr_v4(to))
            };
            let via = match (self.network, v6) {
                (PodNetwork::HostGw, false) => Self::node_v4(to).to_string(),
                (PodNetwork::HostGw, true) => Self::node_v6(to).to_string(),
                (PodNetwork::Vxlan, false) => Self::tunnel_v4(to).to_string(),
                (PodNetwork::Vxlan, true) => Self::tunnel_v6(to).to_string(),
            };
            let mut args = vec![family, "route", "replace", &cidr, "via", &via];
            if self.network == PodNetwork::Vxlan {
                args.extend(["dev", if v6 { VXLAN_IF_V6 } else { VXLAN_IF_V4 }, "onlink"]);
            }
            if let Some(mtu) = &mtu {
                args.extend(["mtu", "lock", mtu]);
            }
            node.ns.ip(&args)?;
        }
        Ok(())
    }

    /// The MTU of pod veths, as the CNI sets it: the link MTU, less the VXLAN overhead
    /// (the larger one, of the IPv6 underlay) in the VXLAN variant.
    pub fn pod_mtu(&self) -> u32 {
        match self.network {
            PodNetwork::HostGw => LINK_MTU,
            PodNetwork::Vxlan => LINK_MTU - VXLAN_OVERHEAD_V6,
        }
    }

    /// A description of every node's and the router's routes and every node's links, for
    /// failure messages.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (name, ns) in std::iter::once(("router", &self.router))
            .chain(self.nodes.iter().map(|n| (n.name.as_str(), &n.ns)))
        {
            for family in ["-4", "-6"] {
                let routes = ns
                    .ip(&[family, "route", "show"])
                    .unwrap_or_else(|e| format!("{e:#}"));
                let _ = writeln!(out, "{name} {family} routes:\n{routes}");
            }
        }
        out
    }

    /// The client's address, 198.51.100.2.
    pub fn client_v4() -> Ipv4Addr {
        Ipv4Addr::new(198, 51, 100, 2)
    }

    /// The client's address, `2001:db8:c::2`.
    pub fn client_v6() -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 2)
    }

    /// The router's address towards the client, 198.51.100.1.
    pub fn router_client_v4() -> Ipv4Addr {
        Ipv4Addr::new(198, 51, 100, 1)
    }

    /// The router's address towards the client, `2001:db8:c::1`.
    pub fn router_client_v6() -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 1)
    }

    /// The router's address on the node segment, 198.51.100.65: every node's gateway.
    pub fn router_segment_v4() -> Ipv4Addr {
        Ipv4Addr::new(198, 51, 100, 65)
    }

    /// The router's address on the node segment, `2001:db8:d::1`.
    pub fn router_segment_v6() -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, 0xd, 0, 0, 0, 0, 1)
    }

    /// Node `i`'s address (its InternalIP), 198.51.100.(66 + i).
    ///
    /// # Panics
    /// If `i >= MAX_NODES`.
    pub fn node_v4(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 51, 100, 66 + node_octet(i))
    }

    /// Node `i`'s IPv6 address, `2001:db8:d::<66 + i>` (the same digits as IPv4).
    ///
    /// # Panics
    /// If `i >= MAX_NODES`.
    pub fn node_v6(i: usize) -> Ipv6Addr {
        Ipv6Addr::new(
            0x2001,
            0xdb8,
            0xd,
            0,
            0,
            0,
            0,
            0x66 + u16::from(node_octet(i)),
        )
    }

    /// Node `i`'s pod CIDR, 192.0.2.(32 i)/27.
    pub fn pod_cidr_v4(i: usize) -> String {
        format!("{}/27", Self::tunnel_v4(i))
    }

    /// Node `i`'s IPv6 pod CIDR, `2001:db8:a:<i>::/64`.
    pub fn pod_cidr_v6(i: usize) -> String {
        format!("{}/64", Self::tunnel_v6(i))
    }

    /// The network address of node `i`'s pod CIDR, 192.0.2.(32 i): in the VXLAN
    /// variant, the address of its `flannel.1`.
    pub fn tunnel_v4(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(192, 0, 2, 32 * node_octet(i))
    }

    /// The network address of node `i`'s IPv6 pod CIDR, `2001:db8:a:<i>::`: in the
    /// VXLAN variant, the address of its `flannel-v6.1`.
    pub fn tunnel_v6(i: usize) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, 0xa, u16::from(node_octet(i)), 0, 0, 0, 0)
    }

    /// Pod `j` of node `i`: 192.0.2.(32 i + 10 + j).
    ///
    /// # Panics
    /// If `i >= MAX_NODES` or `j >= MAX_PODS_PER_NODE`.
    pub fn pod_v4(i: usize, j: usize) -> Ipv4Addr {
        Ipv4Addr::new(192, 0, 2, 32 * node_octet(i) + 10 + pod_octet(j))
    }

    /// Pod `j` of node `i`: `2001:db8:a:<i>::<10 + j>` (the same digits as IPv4's last
    /// octet within the /27).
    pub fn pod_v6(i: usize, j: usize) -> Ipv6Addr {
        let host = 0x10 + u16::from(pod_octet(j));
        Ipv6Addr::new(0x2001, 0xdb8, 0xa, u16::from(node_octet(i)), 0, 0, 0, host)
    }

    /// The host end of pod `j` of node `i`'s veth in the node: `cali<i>x<j>`.
    pub fn pod_host_if(i: usize, j: usize) -> String {
        format!("cali{i}x{j}")
    }

    /// The fixed MAC of node `i`'s VXLAN device (`v6`: `flannel-v6.1`).
    fn vtep_mac(i: usize, v6: bool) -> String {
        format!("02:78:6c:00:{:02x}:{:02x}", u8::from(v6), node_octet(i))
    }
}

/// The router's path-recording table (see [`Cluster::record_paths`]).
const PATH_TABLE: &str = "xlbpaths";

/// Applies `rules` with `nft -f` in `ns`, through a temporary file.
fn nft_from_file(ns: &Netns, rules: &str) -> anyhow::Result<()> {
    let file = std::env::temp_dir().join(format!("xlb-nft-{}.rules", ns.name()));
    std::fs::write(&file, rules).with_context(|| format!("write {}", file.display()))?;
    let applied = ns.exec("nft", &["-f", &file.display().to_string()]);
    let _ = std::fs::remove_file(&file);
    applied.map(|_| ())
}

/// Which node the router sent each of the client's flows to (see
/// [`Cluster::record_paths`]). Dropping it removes the router's table.
pub struct PathRecorder<'c> {
    router: &'c Netns,
    /// Node `i`'s uplink MAC, lower case.
    macs: Vec<String>,
}

/// Packets per node, by (protocol, client source port).
pub type PathCounts = BTreeMap<(Protocol, u16), Vec<u64>>;

impl PathRecorder<'_> {
    /// Packets the router has sent so far to each node, per client flow.
    pub fn counts(&self) -> anyhow::Result<PathCounts> {
        let out = self
            .router
            .exec("nft", &["-j", "list", "set", "netdev", PATH_TABLE, "seen"])?;
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("cannot parse `nft -j list set` output")?;
        let mut counts = PathCounts::new();
        let sets = json.get("nftables").and_then(serde_json::Value::as_array);
        for elem in sets
            .into_iter()
            .flatten()
            .filter_map(|o| o.get("set")?.get("elem")?.as_array())
            .flatten()
        {
            let elem = elem.get("elem").context("set element without `elem`")?;
            let key = elem
                .get("val")
                .and_then(|v| v.get("concat"))
                .and_then(serde_json::Value::as_array)
                .with_context(|| format!("set element {elem}"))?;
            let (Some(mac), Some(proto), Some(port)) = (
                key.first().and_then(serde_json::Value::as_str),
                key.get(1).and_then(serde_json::Value::as_str),
                key.get(2).and_then(serde_json::Value::as_u64),
            ) else {
                bail!("set element {elem}: not MAC . protocol . port");
            };
            let proto = match proto {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                _ => continue,
            };
            let Some(node) = self
                .macs
                .iter()
                .position(|m| m == &mac.to_ascii_lowercase())
            else {
                continue;
            };
            let packets = elem
                .get("counter")
                .and_then(|c| c.get("packets"))
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0);
            let port = u16::try_from(port).with_context(|| format!("port {port}"))?;
            counts
                .entry((proto, port))
                .or_insert_with(|| vec![0; self.macs.len()])[node] += packets;
        }
        Ok(counts)
    }
}

impl Drop for PathRecorder<'_> {
    fn drop(&mut self) {
        if let Err(e) = self
            .router
            .exec("nft", &["delete", "table", "netdev", PATH_TABLE])
        {
            tracing::warn!(error = %format!("{e:#}"), "cannot remove the path-recording table");
        }
    }
}

/// The transport protocols the cluster's Services use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// Lower case, as iptables and `ip route get ipproto` write it.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    /// Upper case, as Kubernetes writes it.
    pub fn kubernetes(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

fn node_octet(i: usize) -> u8 {
    assert!(
        i < MAX_NODES,
        "node index {i} out of range (at most {MAX_NODES} nodes)"
    );
    u8::try_from(i).expect("i < MAX_NODES")
}

fn pod_octet(j: usize) -> u8 {
    assert!(
        j < MAX_PODS_PER_NODE,
        "pod index {j} out of range (at most {MAX_PODS_PER_NODE} pods per node)"
    );
    u8::try_from(j).expect("j < MAX_PODS_PER_NODE")
}

fn add_addrs(ns: &Netns, ifname: &str, v4: &str, v6: &str) -> anyhow::Result<()> {
    ns.ip(&["-4", "addr", "add", v4, "dev", ifname])?;
    ns.ip(&["-6", "addr", "add", v6, "dev", ifname, "nodad"])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_the_documented_plan() {
        assert_eq!(Cluster::node_v4(0).to_string(), "198.51.100.66");
        assert_eq!(Cluster::node_v6(2).to_string(), "2001:db8:d::68");
        assert_eq!(Cluster::pod_cidr_v4(1), "192.0.2.32/27");
        assert_eq!(Cluster::pod_cidr_v6(2), "2001:db8:a:2::/64");
        assert_eq!(Cluster::pod_v4(1, 1).to_string(), "192.0.2.43");
        assert_eq!(Cluster::pod_v6(1, 1).to_string(), "2001:db8:a:1::11");
        assert_eq!(Cluster::tunnel_v4(2).to_string(), "192.0.2.64");
        assert!(Cluster::pod_host_if(7, 15).len() <= crate::MAX_IFNAME_LEN);
        // Pods stay inside their node's /27.
        let last = Cluster::pod_v4(MAX_NODES - 1, MAX_PODS_PER_NODE - 1);
        assert_eq!(last.octets()[3] / 32, u8::try_from(MAX_NODES - 1).unwrap());
    }
}
