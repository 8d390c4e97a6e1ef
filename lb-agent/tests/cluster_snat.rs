//! xlb in SNAT mode on the cluster in namespaces (`lb_testbed::cluster`): one agent per
//! node, `lb-agent run --manifests DIR --node-name node-<i> --interface eth0 --lb-mode
//! snat`, as the DaemonSet runs it, held to the same scenarios as kube-proxy's iptables
//! rules (lb-testbed/tests/cluster_baseline.rs): an LB IP through the router's ECMP, the
//! NodePort on every node and the ClusterIP routed to each node, to pods on the
//! receiving node and on others, TCP and UDP, IPv4 and IPv6, host-gw and VXLAN. For
//! `externalTrafficPolicy: Cluster` a pod on another node sees the receiving node's
//! address and a pod on the receiving node the client's (only remote backends are
//! source-NATed, as in Cilium); for `Local`, every pod sees the client's.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use lb_agent::status::Report;
use lb_common::snat::{SNAT_ATTEMPTS, SNAT_TCP_CLOSED_NS};
use lb_testbed::Netns;
use lb_testbed::cluster::apps::{
    Answer, LongLived, PodServers, ask_tcp, ask_tcp_pod_closes, ask_udp,
};
use lb_testbed::cluster::scenarios::{self, POD_PORT};
use lb_testbed::cluster::xlb::{self, Mode, XlbAgents};
use lb_testbed::cluster::{
    Cluster, ClusterService, Endpoint, NodeProgram, PodNetwork, PodSees, Protocol,
};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");

/// The standard set-up with an agent in SNAT mode on every node.
fn snat_cluster(cluster: &Cluster) -> (PodServers, Vec<ClusterService>, XlbAgents<'_>) {
    xlb::start(cluster, Path::new(AGENT), Mode::Snat, &[]).unwrap_or_else(|e| panic!("{e:#}"))
}

fn frontends(cluster: &Cluster, xlb: &XlbAgents<'_>, services: &[ClusterService]) {
    for v6 in [false, true] {
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let report = scenarios::frontends(cluster, xlb, services, proto, v6)
                .unwrap_or_else(|e| panic!("{e:#}\n{}", xlb.statuses()));
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
            .unwrap_or_else(|e| panic!("{e:#}\n{}", xlb.statuses()));
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

#[test]
fn xlb_snat_on_a_host_gw_cluster() {
    let cluster = Cluster::for_test("xs-hostgw", PodNetwork::HostGw);
    let (servers, services, xlb) = snat_cluster(&cluster);
    frontends(&cluster, &xlb, &services);
    node_drop(&cluster, &xlb, &services);
    eprintln!("served per pod: {:?}", servers.served());
}

#[test]
fn xlb_snat_on_a_vxlan_cluster() {
    let cluster = Cluster::for_test("xs-vxlan", PodNetwork::Vxlan);
    let (_servers, services, xlb) = snat_cluster(&cluster);
    frontends(&cluster, &xlb, &services);
}

/// The `--snat-ports` range of [`snat_exhaustion_is_counted_and_other_backends_keep_working`]:
/// as many ports as a new flow tries (`SNAT_ATTEMPTS`), so a new flow tries every port
/// and fails exactly when all are held.
const TINY_RANGE: (u16, u16) = (61_000, 61_007);
const TINY_PORTS: usize = (TINY_RANGE.1 - TINY_RANGE.0 + 1) as usize;
const _: () = assert!((TINY_RANGE.1 - TINY_RANGE.0 + 1) as u32 == SNAT_ATTEMPTS);

/// The node that runs out (the client reaches it through its NodePorts).
const FULL_NODE: usize = 0;
/// The other node the same backend is reached through.
const OTHER_NODE: usize = 2;
const TIMEOUT: Duration = Duration::from_secs(2);

/// `spare`: a TCP Service like `mtu`, on the other pod of [`OTHER_NODE`] (a backend
/// `mtu` does not have), 203.0.113.16 / .106, NodePort 30092.
fn spare_service(cluster: &Cluster, services: &[ClusterService]) -> ClusterService {
    let mut spare = find(services, scenarios::MTU_TCP).clone();
    spare.name = "spare".into();
    spare.cluster_ips = vec![
        "203.0.113.16".parse().unwrap(),
        "2001:db8:f::16".parse().unwrap(),
    ];
    spare.load_balancer_ips = vec![
        "203.0.113.106".parse().unwrap(),
        "2001:db8:f::106".parse().unwrap(),
    ];
    spare.node_port = Some(30_092);
    let pod = &cluster.nodes[OTHER_NODE].pods[0];
    spare.endpoints = [IpAddr::V4(pod.v4()), IpAddr::V6(pod.v6())]
        .map(|address| Endpoint {
            address,
            node: cluster.nodes[OTHER_NODE].name.clone(),
            pod: pod.name.clone(),
        })
        .to_vec();
    spare
}

fn find<'s>(services: &'s [ClusterService], name: &str) -> &'s ClusterService {
    services
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no Service {name}"))
}

fn node_port(svc: &ClusterService, node: usize, v6: bool) -> SocketAddr {
    let ip = if v6 {
        IpAddr::V6(Cluster::node_v6(node))
    } else {
        IpAddr::V4(Cluster::node_v4(node))
    };
    SocketAddr::new(ip, svc.node_port.expect("a NodePort"))
}

fn exhausted_count(report: &Report) -> u64 {
    report
        .reasons
        .iter()
        .find(|(r, _)| r == "drop_snat_exhausted")
        .map_or(0, |(_, n)| *n)
}

/// Ports held for `backend` (`192.0.2.43:8080/TCP`) in a status report, and of them
/// those a new flow takes when it finds no free port.
fn held_reusable(report: &Report, backend: &str) -> (u64, u64) {
    report
        .snat
        .as_ref()
        .expect("a SNAT section")
        .backends
        .iter()
        .find(|b| b.backend == backend)
        .map_or((0, 0), |b| (b.held, b.reusable))
}

fn held(report: &Report, backend: &str) -> u64 {
    held_reusable(report, backend).0
}

/// `lb-agent status [--json]` as an operator runs it, for the agent's pins.
fn status_cli(xlb: &XlbAgents<'_>, node: usize, json: bool) -> String {
    let dir = xlb.agents()[node].pin_dir().display().to_string();
    let mut args = vec!["status", "--bpffs", &dir];
    if json {
        args.push("--json");
    }
    let out = std::process::Command::new(AGENT)
        .args(&args)
        .output()
        .expect("lb-agent status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// SNAT exhaustion with a tiny range (`--snat-ports 61000-61007`). A reservation is
/// keyed by the backend (address, port, protocol) and the node's address, as Linux's
/// NAT keeps reply tuples unique: each backend has the whole range on each node. So
/// when `mtu`'s one backend (pod 1/1, TCP 8080) holds every port of node 0:
/// - a new flow to it through node 0 is dropped as `drop_snat_exhausted`, counted on
///   node 0 (no other node), and `lb-agent status` (text, `--json`) and `/metrics`
///   there show the reason, the range and the full backend;
/// - everything else keeps serving every new connection: another Service's backend
///   (`spare`) through the same node up to its own full range, the same pod's IPv6
///   address and its UDP port (other backends), the same backend through another
///   node (another node address), a `Local` Service (never source-NATed), and the
///   established flows;
/// - a flow the client closed first keeps its port for 10 s after its last packet
///   (the pod keeps nothing), then the Service serves new connections through node 0
///   again, a full range of them;
/// - a flow the pod closed first keeps its port for the pod's `TIME_WAIT` while other
///   ports are free; with none free, 10 s after the close, a new flow takes it, and
///   the pod's `TIME_WAIT` socket takes the new connection.
#[test]
fn snat_exhaustion_is_counted_and_other_backends_keep_working() {
    let cluster = Cluster::for_test("xs-exhaust", PodNetwork::HostGw);
    let _servers = PodServers::start(&cluster, POD_PORT).expect("pod servers");
    let mut services = scenarios::standard_services(&cluster);
    services.push(spare_service(&cluster, &services));
    let range = format!("{}-{}", TINY_RANGE.0, TINY_RANGE.1);
    let mut xlb = XlbAgents::new(
        Path::new(AGENT),
        "xlb snat (tiny range)",
        &["--lb-mode", "snat", "--snat-ports", &range],
        PodSees::NodeIfRemote,
        false,
    );
    xlb.program(&cluster, &services)
        .unwrap_or_else(|e| panic!("{e:#}"));
    scenarios::announce(&cluster, &services).expect("announce Local LB IPs");
    let t = Exhaustion::new(&cluster, &services, &xlb);

    // Fill node 0's range for the backend with long-lived connections.
    let mut open = Vec::new();
    for n in 0..TINY_PORTS {
        let conn = LongLived::open(&cluster.client, t.mtu_via_full_node(), TIMEOUT)
            .unwrap_or_else(|e| panic!("long-lived #{n}: {e:#}\n{}", xlb.statuses()));
        assert_eq!((&conn.answer.pod, conn.answer.peer), (&t.pod, t.full_node));
        open.push(conn);
    }
    assert_eq!(held(&t.status(FULL_NODE), &t.backend), TINY_PORTS as u64);
    assert_eq!(exhausted_count(&t.status(FULL_NODE)), 0);

    // One more is dropped, counted on node 0 alone.
    let excess = LongLived::open(&cluster.client, t.mtu_via_full_node(), TIMEOUT);
    assert!(excess.is_err(), "a connection beyond the range: {excess:?}");
    let report = t.status(FULL_NODE);
    assert!(exhausted_count(&report) > 0, "{report}");
    for node in (0..cluster.nodes.len()).filter(|&n| n != FULL_NODE) {
        assert_eq!(exhausted_count(&t.status(node)), 0, "node-{node}");
    }
    t.reported(&range);
    t.others_keep_working();
    for conn in &mut open {
        conn.ping().expect("an established flow keeps its port");
    }
    assert_eq!(held(&t.status(FULL_NODE), &t.backend), TINY_PORTS as u64);

    t.closed_flows_give_their_ports_back(open);
}

/// What [`snat_exhaustion_is_counted_and_other_backends_keep_working`] works with.
struct Exhaustion<'a> {
    cluster: &'a Cluster,
    services: &'a [ClusterService],
    xlb: &'a XlbAgents<'a>,
    /// `mtu`'s one pod (the backend that runs out on node 0): its name and its IPv4
    /// backend as status names it.
    pod: String,
    backend: String,
    full_node: IpAddr,
}

impl<'a> Exhaustion<'a> {
    fn new(cluster: &'a Cluster, services: &'a [ClusterService], xlb: &'a XlbAgents<'a>) -> Self {
        let (node, pod) = scenarios::MTU_POD;
        let pod = &cluster.nodes[node].pods[pod];
        Exhaustion {
            cluster,
            services,
            xlb,
            pod: pod.name.clone(),
            backend: format!("{}:{POD_PORT}/TCP", pod.v4()),
            full_node: IpAddr::V4(Cluster::node_v4(FULL_NODE)),
        }
    }

    /// TCP connections from node 0 that `mtu`'s pod holds in `TIME_WAIT` (`ss`).
    fn pod_time_wait(&self) -> usize {
        let (node, pod) = scenarios::MTU_POD;
        let peer = Cluster::node_v4(FULL_NODE).to_string();
        let out = self.cluster.nodes[node].pods[pod]
            .ns
            .exec("ss", &["-Htn", "state", "time-wait", "dst", &peer])
            .expect("ss in the pod");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).lines().count()
    }

    /// Flows the client closed (`open`, which fill the range) give their ports back 10 s
    /// after the close; flows the pod closed keep them for its `TIME_WAIT` until none is
    /// free, then serve new connections from 10 s after the close.
    fn closed_flows_give_their_ports_back(&self, open: Vec<LongLived>) {
        // Flows the client closed keep their ports for a while ...
        drop(open);
        self.refused("right after the client closed its flows");
        // ... and then go: every port of the range serves a new connection again.
        let freed = Duration::from_nanos(SNAT_TCP_CLOSED_NS) + Duration::from_secs(20);
        let report = self.xlb.agents()[FULL_NODE]
            .wait_for(freed, |r| held(r, &self.backend) == 0)
            .unwrap_or_else(|e| panic!("the closed flows' ports: {e:#}"));
        assert!(
            report
                .snat
                .as_ref()
                .is_some_and(|s| s.idle >= TINY_PORTS as u64),
            "{report}"
        );

        // Flows the pod closes first keep their ports while the pod holds them in
        // TIME_WAIT ...
        let first_close = std::time::Instant::now();
        self.fill_range("after the ports were freed", ask_tcp_pod_closes, TIMEOUT);
        assert_eq!(
            held_reusable(&self.status(FULL_NODE), &self.backend),
            (TINY_PORTS as u64, 0)
        );
        // The refused connection takes 2 s; it must end within the 10 s hold.
        let elapsed = first_close.elapsed();
        assert!(
            elapsed
                < Duration::from_nanos(SNAT_TCP_CLOSED_NS).saturating_sub(Duration::from_secs(4)),
            "{elapsed:?} after the first close: too late to check that the ports are still held"
        );
        self.refused("right after the pod closed its flows");
        // ... until a new flow finds no free port, 10 s after the close: then it takes one,
        // and the pod's TIME_WAIT socket takes the new connection.
        let report = self.xlb.agents()[FULL_NODE]
            .wait_for(freed, |r| {
                held_reusable(r, &self.backend) == (TINY_PORTS as u64, TINY_PORTS as u64)
            })
            .unwrap_or_else(|e| panic!("the pod-closed flows' ports: {e:#}"));
        let text = report.to_string();
        assert!(
            text.contains(&format!("reusable when none is free {TINY_PORTS}")),
            "{text}"
        );
        assert!(!text.contains("FULL"), "{text}");
        let waiting = self.pod_time_wait();
        assert!(
            waiting >= TINY_PORTS,
            "{waiting} connections in TIME_WAIT on the pod"
        );
        // Half of the SYNs may need their retransmission, a second later.
        let retry = TIMEOUT + Duration::from_secs(3);
        self.fill_range("on a port the pod holds in TIME_WAIT", ask_tcp, retry);
    }

    /// A range's worth of new connections to `mtu` through node 0, made by `ask`
    /// within `timeout` each: every one served, none short of a port.
    fn fill_range(
        &self,
        what: &str,
        ask: fn(&Netns, SocketAddr, Duration) -> anyhow::Result<Answer>,
        timeout: Duration,
    ) {
        let before = exhausted_count(&self.status(FULL_NODE));
        for n in 0..TINY_PORTS {
            let answer = ask(&self.cluster.client, self.mtu_via_full_node(), timeout)
                .unwrap_or_else(|e| panic!("#{n} {what}: {e:#}\n{}", self.xlb.statuses()));
            assert_eq!((&answer.pod, answer.peer), (&self.pod, self.full_node));
        }
        assert_eq!(
            exhausted_count(&self.status(FULL_NODE)),
            before,
            "{what}: no port was short"
        );
    }

    fn mtu_via_full_node(&self) -> SocketAddr {
        node_port(find(self.services, scenarios::MTU_TCP), FULL_NODE, false)
    }

    /// A new flow to `mtu`'s backend through node 0 is dropped for want of a port, and
    /// counted.
    fn refused(&self, when: &str) {
        let before = exhausted_count(&self.status(FULL_NODE));
        let early = ask_tcp(&self.cluster.client, self.mtu_via_full_node(), TIMEOUT);
        assert!(early.is_err(), "a port given away {when}: {early:?}");
        assert!(exhausted_count(&self.status(FULL_NODE)) > before, "{when}");
    }

    fn status(&self, node: usize) -> Report {
        self.xlb.agents()[node]
            .wait_for(TIMEOUT, |_| true)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The exhaustion is where an operator looks on node 0: `lb-agent status` (text and
    /// JSON) names the reason, the node's address, the range and the full backend;
    /// `/metrics` counts the reason and the SNAT table.
    fn reported(&self, range: &str) {
        let text = status_cli(self.xlb, FULL_NODE, false);
        eprintln!("lb-agent status on node-{FULL_NODE}:\n{text}");
        for expected in [
            format!(
                "SNAT from {}, {}; ports {range} ({TINY_PORTS} per backend",
                self.full_node,
                Cluster::node_v6(FULL_NODE)
            ),
            format!("{} ", self.backend),
            "FULL: new flows to it from this node are dropped".to_owned(),
            "drop_snat_exhausted".to_owned(),
        ] {
            assert!(text.contains(&expected), "{expected:?} not in:\n{text}");
        }
        let json: serde_json::Value =
            serde_json::from_str(&status_cli(self.xlb, FULL_NODE, true)).expect("status --json");
        let snat = &json["snat"];
        assert_eq!(snat["address_v4"], self.full_node.to_string(), "{json}");
        assert_eq!(snat["port_min"], TINY_RANGE.0, "{snat}");
        assert_eq!(snat["port_max"], TINY_RANGE.1, "{snat}");
        assert!(snat["exhausted"].as_u64() > Some(0), "{snat}");
        assert_eq!(
            snat["backends"][0]["backend"],
            self.backend.as_str(),
            "{snat}"
        );
        assert_eq!(snat["backends"][0]["full"], true, "{snat}");
        let url = format!("http://{}:9190/metrics", self.full_node);
        let metrics = self.cluster.nodes[FULL_NODE]
            .ns
            .exec("curl", &["-sS", "--max-time", "2", &url])
            .expect("curl /metrics");
        let metrics = String::from_utf8_lossy(&metrics.stdout);
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with("xlb_xdp_packets_total{")
                    && l.contains("reason=\"drop_snat_exhausted\"")
            })
            .unwrap_or_else(|| panic!("no drop_snat_exhausted series:\n{metrics}"));
        let count: u64 = line
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .expect("a count");
        assert!(count > 0, "{line}");
        assert!(
            metrics.contains("xlb_table_entries{table=\"snat\"}"),
            "{metrics}"
        );
    }

    /// While node 0 has no port left for `mtu`'s backend, every new connection that
    /// does not need one succeeds: another Service's backend through the same node (a
    /// full range of them), the same backend through another node, the same pod's IPv6
    /// address and UDP port through the same node, and a `Local` Service.
    fn others_keep_working(&self) {
        let client = &self.cluster.client;
        let mtu = find(self.services, scenarios::MTU_TCP);
        let spare = find(self.services, "spare");
        let spare_pod = &self.cluster.nodes[OTHER_NODE].pods[0];
        for n in 0..TINY_PORTS {
            let answer = ask_tcp(client, node_port(spare, FULL_NODE, false), TIMEOUT)
                .unwrap_or_else(|e| panic!("spare #{n} through node-{FULL_NODE}: {e:#}"));
            assert_eq!(
                (&answer.pod, answer.peer),
                (&spare_pod.name, self.full_node)
            );
        }
        let spare_backend = format!("{}:{POD_PORT}/TCP", spare_pod.v4());
        let report = self.status(FULL_NODE);
        assert_eq!(held(&report, &spare_backend), TINY_PORTS as u64, "{report}");
        let answer = ask_tcp(client, node_port(mtu, OTHER_NODE, false), TIMEOUT)
            .expect("the same backend through another node");
        let other = IpAddr::V4(Cluster::node_v4(OTHER_NODE));
        assert_eq!((&answer.pod, answer.peer), (&self.pod, other));
        let answer = ask_tcp(client, node_port(mtu, FULL_NODE, true), TIMEOUT)
            .expect("the same pod's IPv6 address through the same node");
        let full_v6 = IpAddr::V6(Cluster::node_v6(FULL_NODE));
        assert_eq!((&answer.pod, answer.peer), (&self.pod, full_v6));
        let mtu_udp = find(self.services, scenarios::MTU_UDP);
        let answer = ask_udp(client, node_port(mtu_udp, FULL_NODE, false), TIMEOUT)
            .expect("the same pod's UDP port through the same node");
        assert_eq!((&answer.pod, answer.peer), (&self.pod, self.full_node));
        let local = find(self.services, scenarios::WEB_LOCAL);
        for n in 0..scenarios::CONNECTIONS {
            let answer = ask_tcp(client, node_port(local, FULL_NODE, false), TIMEOUT)
                .unwrap_or_else(|e| panic!("{} #{n}: {e:#}", local.name));
            let client_v4 = IpAddr::V4(Cluster::client_v4());
            assert_eq!(answer.peer, client_v4, "Local keeps the client's address");
        }
    }
}
